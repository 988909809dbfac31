'use strict';
// The Express middleware: sessions and a memory-mode rate limit with 429, Retry-After and the
// RateLimit fields.
const test = require('node:test');
const assert = require('node:assert/strict');
const { Pool } = require('pg');
const { admin, APP_DSN } = require('./helpers');
const { createApp } = require('../app');

const POLICY = 'example_api_node';
let db; let pool; let server; let base;

test.before(async () => {
  db = await admin();
  await db.query("SELECT keel.create_limit($1, 5, '1 minute', durability => 'memory')", [POLICY]);
  pool = new Pool({ connectionString: APP_DSN, max: 2 });
  const app = createApp(pool, { policy: POLICY, secureCookie: false });
  app.set('trust proxy', 'loopback'); // the tests choose their address with X-Forwarded-For
  await new Promise((r) => { server = app.listen(0, '127.0.0.1', r); });
  base = `http://127.0.0.1:${server.address().port}`;
});
test.after(async () => {
  await new Promise((r) => server.close(r));
  await pool.end();
  await db.end();
});

const get = (path, from, cookie) => fetch(base + path,
  { headers: { 'x-forwarded-for': from, ...(cookie ? { cookie } : {}) } });
const post = (path, from, body, cookie) => fetch(base + path, {
  method: 'POST',
  headers: { 'x-forwarded-for': from, 'content-type': 'application/json', ...(cookie ? { cookie } : {}) },
  body: JSON.stringify(body || {}),
});
// "name";q=5;w=60 -> { name, q: 5, w: 60 }
function item(value) {
  const m = /^"([A-Za-z0-9_.:-]+)"((?:;[a-z]+=\d+)+)$/.exec(value || '');
  assert.ok(m, `not a structured field item: ${value}`);
  const out = { name: m[1] };
  for (const p of m[2].slice(1).split(';')) { const [k, v] = p.split('='); out[k] = Number(v); }
  return out;
}

test('login, validate, logout; a revoked or tampered token is no session', async () => {
  const from = '192.0.2.11';
  assert.equal((await get('/me', from)).status, 401);
  const login = await post('/login', from, { user: 'ada' });
  assert.equal(login.status, 200);
  const cookie = login.headers.get('set-cookie').split(';')[0];
  assert.match(login.headers.get('set-cookie'), /HttpOnly/);
  const me = await get('/me', from, cookie);
  assert.equal(me.status, 200);
  assert.equal((await me.json()).user_id, 'ada');
  assert.equal((await post('/logout', from, {}, cookie)).status, 200);
  assert.equal((await get('/me', from, cookie)).status, 401);
  assert.equal((await get('/me', '192.0.2.12', 'session=tampered')).status, 401);
});

test('the sixth request in a minute gets 429 with Retry-After and RateLimit fields', async () => {
  const answers = [];
  for (let i = 0; i < 6; i++) answers.push(await get('/health', '192.0.2.13'));
  assert.deepEqual(answers.map((a) => a.status), [200, 200, 200, 200, 200, 429]);
  answers.slice(0, 5).forEach((a, i) => {
    assert.deepEqual(item(a.headers.get('ratelimit-policy')), { name: POLICY, q: 5, w: 60 });
    assert.equal(item(a.headers.get('ratelimit')).r, 4 - i);
  });
  const retry = Number(answers[5].headers.get('retry-after'));
  assert.ok(Number.isInteger(retry) && retry >= 1 && retry <= 12, `Retry-After ${retry}`);
  const state = item(answers[5].headers.get('ratelimit'));
  assert.equal(state.r, 0);
  assert.ok(state.t >= retry);
});
