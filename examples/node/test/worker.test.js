'use strict';
// The Node worker: nothing lost when it is stopped or killed mid-job, and the LISTEN wake-up.
const test = require('node:test');
const assert = require('node:assert/strict');
const { admin, waitUntil, start, exitOf, sleep } = require('./helpers');

let db;
test.before(async () => { db = await admin(); });
test.after(async () => { await db.end(); });

async function enqueue(queue, payloads) {
  const { rows } = await db.query('SELECT keel.enqueue_batch($1, $2::jsonb[]) AS id',
    [queue, payloads.map((p) => JSON.stringify(p))]);
  return rows.map((r) => r.id);
}
async function doneOf(ids) {
  const { rows } = await db.query(
    'SELECT count(*)::int AS n, max(attempt) AS top FROM examples.done WHERE job_id = ANY($1)', [ids]);
  return rows[0];
}
async function running(queue) {
  const { rows } = await db.query(
    "SELECT count(*)::int AS n FROM keel.jobs WHERE queue = $1 AND state IN ('running', 'ready')",
    [queue]);
  return rows[0].n;
}

test('SIGTERM mid-job loses nothing and leaves no lease behind', async () => {
  const queue = 'node_sigterm';
  await db.query("SELECT keel.create_queue($1, visibility_timeout => '5 minutes')", [queue]);
  const ids = await enqueue(queue, Array.from({ length: 40 }, (_, n) => ({ sleep_ms: 100, n })));
  const w = start('worker.js', ['--queue', queue]);
  await waitUntil(async () => (await doneOf(ids)).n >= 5, 30, '5 jobs done');
  w.kill('SIGTERM');
  assert.deepEqual(await exitOf(w, 10), { code: 0, signal: null }, w.output);
  const { rows } = await db.query(
    "SELECT count(*)::int AS n FROM keel.jobs WHERE queue = $1 AND state = 'running'", [queue]);
  assert.equal(rows[0].n, 0, 'a lease left to run out');
  const second = start('worker.js', ['--queue', queue]);
  await waitUntil(async () => (await doneOf(ids)).n === 40, 30, 'every job done');
  second.kill('SIGTERM');
  assert.equal((await exitOf(second, 10)).code, 0);
  assert.equal(await running(queue), 0);
});

test('SIGKILL mid-job: the lease runs out and another worker finishes, each effect once', async () => {
  const queue = 'node_sigkill';
  await db.query("SELECT keel.create_queue($1, visibility_timeout => '2 seconds')", [queue]);
  const ids = await enqueue(queue, Array.from({ length: 20 }, (_, n) => ({ sleep_ms: 150, n })));
  const w = start('worker.js', ['--queue', queue]);
  await waitUntil(async () => (await doneOf(ids)).n >= 3, 30, '3 jobs done');
  w.kill('SIGKILL');
  await w.exited;
  const second = start('worker.js', ['--queue', queue]);
  await waitUntil(async () => (await doneOf(ids)).n === 20, 60, 'every job done');
  second.kill('SIGTERM');
  assert.equal((await exitOf(second, 10)).code, 0);
  const done = await doneOf(ids);
  assert.equal(done.n, 20);
  assert.ok(done.top >= 2, 'the killed worker\'s jobs came back with a higher attempt');
  assert.equal(await running(queue), 0);
});

test('LISTEN wakes the worker long before its poll', async () => {
  const queue = 'node_listen';
  await db.query('SELECT keel.create_queue($1)', [queue]);
  const w = start('worker.js', ['--queue', queue, '--poll-interval', '30']);
  await waitUntil(async () => (await db.query(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = 'example_app'"
    + " AND query = 'LISTEN keel_jobs'")).rows[0].n > 0, 30, 'the worker\'s LISTEN');
  await sleep(200);
  const started = Date.now();
  const ids = await enqueue(queue, [{ n: 1 }]);
  await waitUntil(async () => (await doneOf(ids)).n === 1, 10, 'the job done');
  const took = Date.now() - started;
  w.kill('SIGTERM');
  assert.equal((await exitOf(w, 10)).code, 0);
  assert.ok(took < 2000, `took ${took} ms with a 30 s poll`);
});

test('a failing job is retried, then succeeds on its third attempt', async () => {
  const queue = 'node_retry';
  await db.query("SELECT keel.create_queue($1, retry_backoff => '50 ms', retry_backoff_max => '100 ms')",
    [queue]);
  const ids = await enqueue(queue, [{ fail_times: 2 }]);
  const w = start('worker.js', ['--queue', queue, '--poll-interval', '0.1', '--no-listen']);
  await waitUntil(async () => (await doneOf(ids)).n === 1, 30, 'the job done');
  w.kill('SIGTERM');
  assert.equal((await exitOf(w, 10)).code, 0);
  assert.equal((await doneOf(ids)).top, 3);
});
