'use strict';
// The outbox consumer: a crash between applying an event and its XACK applies nothing twice.
const test = require('node:test');
const assert = require('node:assert/strict');
const Redis = require('ioredis');
const { admin, start, exitOf, waitUntil } = require('./helpers');

const TOPIC = 'node_orders_crash';
let db;
test.before(async () => {
  db = await admin();
  await db.query(`
    CREATE TABLE IF NOT EXISTS examples.applied (event_id bigint PRIMARY KEY, topic text NOT NULL);
    CREATE TABLE IF NOT EXISTS examples.order_totals (customer text PRIMARY KEY, total bigint NOT NULL);
    GRANT SELECT, INSERT, UPDATE ON examples.applied, examples.order_totals TO example_app;`);
});
test.after(async () => { await db.end(); });

test('a crash before XACK: 100 committed events applied once each, 20 rolled back never', async () => {
  const expected = {};
  for (let i = 0; i < 120; i++) {
    const customer = `${TOPIC}-c${i % 5}`;
    await db.query('BEGIN');
    await db.query('SELECT keel.emit($1, $2)', [TOPIC, { customer, amount: i + 1 }]);
    await db.query(i < 100 ? 'COMMIT' : 'ROLLBACK');
    if (i < 100) expected[customer] = (expected[customer] || 0) + i + 1;
  }
  const redis = new Redis(process.env.REDIS_URL);
  try {
    await waitUntil(async () => (await redis.xlen(`keel:${TOPIC}`)) === 100, 30, 'the stream');
    const args = ['--stream', `keel:${TOPIC}`, '--group', 'billing', '--consumer', 'b1',
      '--until-idle'];
    const crashed = start('outbox-consumer.js', [...args, '--crash-after', '30']);
    assert.equal((await exitOf(crashed, 60)).code, 3, crashed.output);
    const again = start('outbox-consumer.js', args);
    assert.equal((await exitOf(again, 60)).code, 0, again.output);
    const counts = JSON.parse(again.output.trim().split('\n').pop());
    assert.deepEqual(counts, { applied: 70, duplicates: 1 });
    const { rows } = await db.query(
      'SELECT customer, total::int AS total FROM examples.order_totals WHERE customer LIKE $1',
      [`${TOPIC}-%`]);
    assert.deepEqual(Object.fromEntries(rows.map((r) => [r.customer, r.total])), expected);
    const pending = await redis.xpending(`keel:${TOPIC}`, 'billing');
    assert.equal(pending[0], 0);
  } finally {
    redis.disconnect();
  }
});
