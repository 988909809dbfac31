'use strict';
// A pg_keel queue worker for Node.js: wake on LISTEN (or poll), claim, keep the lease while
// working, ack or fail, and stop cleanly on SIGTERM.
//
//   DATABASE_URL=postgresql://app@db/app node worker.js --queue emails [--no-listen]
//
// The guarantees it relies on are pg_keel's (docs/queues.md): a claimed job is leased; a worker
// that dies loses its leases when they run out, and the job is claimed again with a higher
// attempt that the old lease cannot ack. The handler runs in the transaction that acks, so what
// it writes to PostgreSQL commits with the ack or not at all. A heartbeat extends the lease
// every third of its length, and renewed just before the job starts (one whose lease ran out
// while earlier jobs of the batch ran, and that another worker took, is skipped). Handlers need
// their own timeouts: a hung handler with a live heartbeat holds its job for ever. SIGTERM:
// finish the job in hand, give the unstarted rest of the batch back with keel.snooze (no
// attempt used up), exit 0.

const os = require('node:os');
const { Client } = require('pg');

class LeaseLost extends Error {}

class Worker {
  constructor({ connectionString, queue, handler, batch = 10, visibilityTimeout = null,
    pollInterval = 1, listen = true, name }) {
    if (!Number.isInteger(batch) || batch < 1 || batch > 10000) {
      throw new RangeError('batch must be between 1 and 10000');
    }
    if (visibilityTimeout !== null && !(visibilityTimeout > 0)) {
      throw new RangeError('visibilityTimeout must be positive');
    }
    Object.assign(this, { connectionString, queue, handler, batch, visibilityTimeout,
      pollInterval, listen });
    this.name = name || `${os.hostname()}:${process.pid}`;
    this.stopping = false;
    this.processed = 0;
    this.wake = null; // resolves the current wait early
    this.woken = false; // a NOTIFY for our queue came while we were not waiting
    this.failure = null; // a connection's error: run() stops and rethrows it
  }

  stop() {
    this.stopping = true;
    if (this.wake) this.wake();
  }

  async run() {
    // A lost connection ends run() with its error (restart the process): the leases run out
    // and the jobs are claimed again, as after a crash. Without an 'error' listener
    // node-postgres would throw it from nowhere.
    const connect = async () => {
      const c = new Client({ connectionString: this.connectionString });
      c.on('error', (e) => { this.failure = this.failure || e; this.stop(); });
      await c.connect();
      return c;
    };
    const work = await connect();
    const beat = await connect();
    let listener = null;
    if (this.listen) {
      listener = await connect();
      listener.on('notification', (n) => {
        if (n.payload !== this.queue) return;
        this.woken = true;
        if (this.wake) this.wake();
      });
      await listener.query('LISTEN keel_jobs');
    }
    try {
      while (!this.stopping) {
        const jobs = await this.claim(work);
        if (jobs.length === 0) {
          await this.wait();
          continue;
        }
        for (let i = 0; i < jobs.length; i++) {
          if (this.stopping) {
            await this.giveBack(work, jobs.slice(i));
            break;
          }
          await this.process(work, beat, jobs[i]);
        }
      }
    } finally {
      await Promise.allSettled([work.end(), beat.end(), listener && listener.end()]);
    }
    if (this.failure) throw this.failure;
  }

  wait() {
    if (this.woken || this.stopping) {
      this.woken = false;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const timer = setTimeout(done, this.pollInterval * 1000);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wake = () => { this.wake = null; done(); };
    });
  }

  async claim(work) {
    this.woken = false;
    // NULL visibility timeout: the queue's own. now() is the claim's start, so the lease's
    // length comes without comparing clocks.
    const vt = this.visibilityTimeout === null ? null : `${this.visibilityTimeout} seconds`;
    const { rows } = await work.query(
      'SELECT job_id, attempt, payload, priority,'
      + ' extract(epoch FROM lease_expires_at - now())::float8 AS lease_seconds'
      + ' FROM keel.claim($1, $2, $3::interval, $4)',
      [this.queue, this.batch, vt, this.name]);
    // bigint arrives as a string: keep it one (job ids can pass 2^53).
    return rows;
  }

  async process(work, beat, job) {
    // The batch's later jobs waited while earlier ones ran: renew this one's lease before
    // starting, and skip it if it ran out and another worker has it now.
    const { rows: [renewed] } = await work.query('SELECT keel.extend($1, $2, $3) AS until',
      [job.job_id, job.attempt, `${job.lease_seconds} seconds`]);
    if (renewed.until === null) return;
    const heartbeat = this.heartbeat(beat, job);
    let error = null;
    try {
      await work.query('BEGIN');
      try {
        await this.handler(work, job);
        const { rows } = await work.query('SELECT keel.ack($1, $2) AS held',
          [job.job_id, job.attempt]);
        if (!rows[0].held) throw new LeaseLost(`job ${job.job_id} attempt ${job.attempt}`);
        await work.query('COMMIT');
        this.processed++;
      } catch (e) {
        await work.query('ROLLBACK');
        throw e;
      }
    } catch (e) {
      if (!(e instanceof LeaseLost)) error = `${e.name}: ${e.message}`.slice(0, 1000);
    } finally {
      await heartbeat.stop();
    }
    if (error !== null) {
      await work.query('SELECT keel.fail($1, $2, $3)', [job.job_id, job.attempt, error]);
    }
  }

  heartbeat(beat, job) {
    let running = Promise.resolve();
    const timer = setInterval(() => {
      running = beat.query('SELECT keel.extend($1, $2, $3)',
        [job.job_id, job.attempt, `${job.lease_seconds} seconds`]).catch(() => {});
    }, (job.lease_seconds * 1000) / 3);
    return { stop: async () => { clearInterval(timer); await running; } };
  }

  async giveBack(work, jobs) {
    for (const job of jobs) {
      await work.query("SELECT keel.snooze($1, $2, '0')", [job.job_id, job.attempt]);
    }
  }
}

// The demo's work, as in the Python example: sleep sleep_ms, fail while attempt <= fail_times,
// then record the job in examples.done in the ack's transaction.
async function demoHandler(client, job) {
  const payload = job.payload || {};
  await new Promise((r) => setTimeout(r, Number(payload.sleep_ms || 0)));
  if (job.attempt <= Number(payload.fail_times || 0)) {
    throw new Error(`planned failure on attempt ${job.attempt}`);
  }
  await client.query('INSERT INTO examples.done (job_id, attempt, payload) VALUES ($1, $2, $3)',
    [job.job_id, job.attempt, payload]);
}

function parseArgs(argv) {
  const args = { listen: true };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => argv[++i];
    if (flag === '--queue') args.queue = value();
    else if (flag === '--batch') args.batch = Number(value());
    else if (flag === '--visibility-timeout') args.visibilityTimeout = Number(value());
    else if (flag === '--poll-interval') args.pollInterval = Number(value());
    else if (flag === '--name') args.name = value();
    else if (flag === '--no-listen') args.listen = false;
    else throw new Error(`unknown argument ${flag}`);
  }
  if (!args.queue) throw new Error('--queue is required');
  return args;
}

if (require.main === module) {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`worker.js: ${e.message}`);
    process.exit(2);
  }
  const worker = new Worker({ connectionString: process.env.DATABASE_URL, handler: demoHandler,
    ...args });
  process.on('SIGTERM', () => worker.stop());
  process.on('SIGINT', () => worker.stop());
  worker.run().then(() => {
    console.log(`stopped after ${worker.processed} jobs`);
  }, (e) => {
    console.error(e);
    process.exit(1);
  });
}

module.exports = { Worker, demoHandler };
