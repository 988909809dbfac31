'use strict';
// The cluster and Redis come from the project's harness (pg_test/tests/examples.rs) through
// KEEL_TEST_HOST, KEEL_TEST_PORT, KEEL_TEST_DBNAME and REDIS_URL. The examples run as
// example_app, a role with only the grants they need.
const path = require('node:path');
const { spawn } = require('node:child_process');
const { Client } = require('pg');

const ROLE = 'example_app';
const dsn = (user) => `postgresql://${user}@${process.env.KEEL_TEST_HOST}:`
  + `${process.env.KEEL_TEST_PORT}/${process.env.KEEL_TEST_DBNAME}`;
const ADMIN_DSN = dsn('postgres');
const APP_DSN = dsn(ROLE);

const SETUP = `
CREATE SCHEMA IF NOT EXISTS examples;
CREATE TABLE IF NOT EXISTS examples.done (
    job_id bigint PRIMARY KEY, attempt int NOT NULL, payload jsonb NOT NULL);
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '${ROLE}') THEN
    CREATE ROLE ${ROLE} LOGIN;
  END IF;
END $$;
GRANT USAGE ON SCHEMA examples TO ${ROLE};
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA examples TO ${ROLE};
SELECT keel.grant_producer('${ROLE}');
SELECT keel.grant_consumer('${ROLE}');
SELECT keel.grant_sessions('${ROLE}');
`;

async function admin() {
  const c = new Client({ connectionString: ADMIN_DSN });
  await c.connect();
  await c.query(SETUP);
  return c;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitUntil(check, seconds, what) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${seconds} s waiting for ${what}`);
    await sleep(20);
  }
}

function start(script, args) {
  const child = spawn(process.execPath, [path.join(__dirname, '..', script), ...args], {
    env: { ...process.env, DATABASE_URL: APP_DSN },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child.output = '';
  child.stdout.on('data', (d) => { child.output += d; });
  child.stderr.on('data', (d) => { child.output += d; });
  child.exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  return child;
}

async function exitOf(child, seconds) {
  let timer;
  const timeout = new Promise((r) => { timer = setTimeout(() => r(null), seconds * 1000); });
  const result = await Promise.race([child.exited, timeout]);
  clearTimeout(timer);
  if (result === null) {
    child.kill('SIGKILL');
    throw new Error(`did not exit within ${seconds} s:\n${child.output}`);
  }
  return result;
}

module.exports = { ADMIN_DSN, APP_DSN, admin, sleep, waitUntil, start, exitOf };
