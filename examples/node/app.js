'use strict';
// Express middleware backed by pg_keel: a memory-mode rate limit and a session cookie checked
// on every request.
//
//   DATABASE_URL=postgresql://app@db/app RATE_POLICY=api node app.js
//
// keelRateLimit answers 429 with Retry-After (whole seconds, never early) and the RateLimit-
// Policy / RateLimit fields of the IETF draft, and sets the same fields on allowed answers.
// keelSession puts the session of the `session` cookie on req.session (null when the token is
// unknown, expired, idle-expired, revoked or malformed).

const crypto = require('node:crypto');
const express = require('express');
const { Pool } = require('pg');

function parseCookies(header) {
  const out = {};
  for (const part of (header || '').split(';')) {
    const at = part.indexOf('=');
    if (at > 0) out[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return out;
}

function keelSession(pool, cookie = 'session') {
  return async (req, res, next) => {
    try {
      const token = parseCookies(req.headers.cookie)[cookie];
      req.session = null;
      req.sessionToken = null;
      if (token) {
        const { rows } = await pool.query(
          'SELECT session_id, user_id, data FROM keel.session_validate($1)', [token]);
        if (rows.length) {
          req.session = rows[0];
          req.sessionToken = token;
        }
      }
      next();
    } catch (e) {
      next(e);
    }
  };
}

// A user's key, short enough for any policy: keys over 192 bytes leave shared memory for the
// durable path, and over 1,024 are refused.
function rateKey(userId) {
  if (Buffer.byteLength(userId) <= 128) return `user:${userId}`;
  return `user-sha256:${crypto.createHash('sha256').update(userId).digest('hex')}`;
}

// Signed-in users are limited per user, anonymous ones per address (put keelSession first).
function keelRateLimit(pool, { policy }) {
  return async (req, res, next) => {
    try {
      const key = req.session ? rateKey(req.session.user_id) : `ip:${req.ip}`;
      // The decision and its header values in one statement (keel.rate_limit_headers knows
      // the policy's quota and window, and rounds Retry-After up).
      const { rows: [d] } = await pool.query(
        'SELECT d.allowed, h.ratelimit_policy, h.ratelimit, h.retry_after'
        + ' FROM keel.check($1, $2) d,'
        + ' keel.rate_limit_headers($1, d.remaining, d.reset_after_ms, d.retry_after_ms) h',
        [policy, key]);
      res.set({ 'RateLimit-Policy': d.ratelimit_policy, RateLimit: d.ratelimit });
      if (!d.allowed) {
        res.set('Retry-After', String(d.retry_after));
        return res.status(429).json({ error: 'rate limited' });
      }
      next();
    } catch (e) {
      next(e);
    }
  };
}

function createApp(pool, { policy = 'api', secureCookie = true } = {}) {
  const app = express();
  app.use(express.json({ limit: '16kb' }));
  app.use(keelSession(pool));
  app.use(keelRateLimit(pool, { policy }));

  app.post('/login', async (req, res, next) => {
    try {
      const user = req.body && req.body.user;
      if (typeof user !== 'string' || !user || user.length > 1024) {
        return res.status(400).json({ error: 'user required' });
      }
      // A real app checks the password here. Never keep a pre-login token (session fixation).
      if (req.sessionToken) await pool.query('SELECT keel.session_revoke($1)', [req.sessionToken]);
      const { rows: [s] } = await pool.query(
        "SELECT session_id, token FROM keel.session_create($1, ttl => '7 days',"
        + " idle_timeout => '2 hours')", [user]);
      res.cookie('session', s.token, { httpOnly: true, secure: secureCookie, sameSite: 'lax',
        maxAge: 7 * 86400 * 1000 });
      return res.json({ session_id: s.session_id });
    } catch (e) {
      return next(e);
    }
  });

  app.post('/logout', async (req, res, next) => {
    try {
      if (req.sessionToken) await pool.query('SELECT keel.session_revoke($1)', [req.sessionToken]);
      res.clearCookie('session');
      res.json({ ok: true });
    } catch (e) {
      next(e);
    }
  });

  app.get('/me', (req, res) => {
    if (!req.session) return res.status(401).json({ error: 'not signed in' });
    return res.json(req.session);
  });

  app.get('/health', (req, res) => res.json({ ok: true }));
  return app;
}

if (require.main === module) {
  const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 10 });
  // An idle client's lost connection: log it, the pool replaces the client (without a
  // listener node-postgres would throw and end the process).
  pool.on('error', (e) => console.error('database connection lost:', e.message));
  const app = createApp(pool, {
    policy: process.env.RATE_POLICY || 'api',
  });
  const server = app.listen(Number(process.env.PORT || 3000));
  process.on('SIGTERM', () => server.close(() => pool.end()));
}

module.exports = { createApp, keelSession, keelRateLimit };
