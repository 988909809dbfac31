'use strict';
// Consume a pg_keel outbox topic from its Redis stream with a consumer group (ioredis),
// applying each event exactly once to PostgreSQL: the event's id is recorded in
// examples.applied in the same transaction as its effect, so a redelivered event (read, not
// yet XACKed, when a consumer crashed) changes nothing; XACK follows the commit.
//
//   DATABASE_URL=... REDIS_URL=redis://... node outbox-consumer.js --stream keel:orders \
//     --group billing --consumer billing-1 [--until-idle]

const { Client } = require('pg');
const Redis = require('ioredis');

class Consumer {
  constructor({ connectionString, redisUrl, stream, group, name, crashAfter = null }) {
    Object.assign(this, { connectionString, stream, group, name, crashAfter });
    // Bounded: a Redis that hangs fails the call instead of hanging the consumer.
    this.redis = new Redis(redisUrl, { commandTimeout: 5000, connectTimeout: 5000,
      maxRetriesPerRequest: 2 });
    this.applied = 0;
    this.duplicates = 0;
    this.stopping = false;
  }

  async run({ untilIdle = false } = {}) {
    try {
      await this.redis.xgroup('CREATE', this.stream, this.group, '0', 'MKSTREAM');
    } catch (e) {
      if (!String(e.message).includes('BUSYGROUP')) throw e;
    }
    const db = new Client({ connectionString: this.connectionString });
    await db.connect();
    try {
      // First what this consumer read and never acknowledged (it crashed), then new entries.
      while (!this.stopping && await this.read(db, '0', null) > 0);
      while (!this.stopping) {
        const got = await this.read(db, '>', 500);
        if (!got && untilIdle) return;
      }
    } finally {
      await db.end();
      this.redis.disconnect();
    }
  }

  async read(db, start, blockMs) {
    const args = ['GROUP', this.group, this.name, 'COUNT', 100];
    if (blockMs !== null) args.push('BLOCK', blockMs);
    const reply = await this.redis.xreadgroup(...args, 'STREAMS', this.stream, start);
    const entries = reply ? reply[0][1] : [];
    for (const [entryId, flat] of entries) {
      if (flat && flat.length) {
        const fields = {};
        for (let i = 0; i < flat.length; i += 2) fields[flat[i]] = flat[i + 1];
        await this.apply(db, fields);
      }
      await this.redis.xack(this.stream, this.group, entryId);
    }
    return entries.length;
  }

  async apply(db, fields) {
    const payload = JSON.parse(fields.payload);
    await db.query('BEGIN');
    let fresh;
    try {
      const r = await db.query('INSERT INTO examples.applied (event_id, topic) VALUES ($1, $2)'
        + ' ON CONFLICT (event_id) DO NOTHING', [fields.id, fields.topic]);
      fresh = r.rowCount === 1;
      if (fresh) {
        await db.query('INSERT INTO examples.order_totals (customer, total) VALUES ($1, $2)'
          + ' ON CONFLICT (customer) DO UPDATE'
          + ' SET total = examples.order_totals.total + excluded.total',
        [payload.customer, payload.amount]);
      }
      await db.query('COMMIT');
    } catch (e) {
      await db.query('ROLLBACK');
      throw e;
    }
    if (fresh) this.applied++; else this.duplicates++;
    if (this.crashAfter !== null && this.applied >= this.crashAfter) {
      console.error(`crashing on purpose after ${this.applied} events, before XACK`);
      process.exit(3);
    }
  }
}

if (require.main === module) {
  const opts = { untilIdle: false };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === '--stream') opts.stream = argv[++i];
    else if (flag === '--group') opts.group = argv[++i];
    else if (flag === '--consumer') opts.name = argv[++i];
    else if (flag === '--crash-after') opts.crashAfter = Number(argv[++i]);
    else if (flag === '--until-idle') opts.untilIdle = true;
    else throw new Error(`unknown argument ${flag}`);
  }
  const consumer = new Consumer({ connectionString: process.env.DATABASE_URL,
    redisUrl: process.env.REDIS_URL, ...opts });
  process.on('SIGTERM', () => { consumer.stopping = true; });
  consumer.run({ untilIdle: opts.untilIdle }).then(() => {
    console.log(JSON.stringify({ applied: consumer.applied, duplicates: consumer.duplicates }));
  }, (e) => { console.error(e); process.exit(1); });
}

module.exports = { Consumer };
