//! `make bench`: pg_keel beside the plain-SQL way and beside Redis, on this machine, in one run.
//!
//! Starts its own PostgreSQL cluster (pg_keel preloaded, fsync and synchronous_commit on, as in
//! production) and its own redis-server, through the test harness, and stops both at the end.
//!
//! Queues (beside pgmq 1.11.1 when `scripts/fetch-pgmq.sh` could fetch it): single and batch
//! enqueue; drain of a pre-filled backlog with 1, 4 and 16 consumers at
//! claim batch 1 and 10 (claim, then ack every job; median of 3 runs per side, alternating
//! which side goes first, each from a fresh backlog after VACUUM and CHECKPOINT); with 4 and 16
//! consumers at batch 10, each batch completed in one call (`ack_batch` beside one `DELETE`);
//! pickup latency (enqueue's commit to a LISTENing consumer's claim, 1,000 jobs/s offered);
//! the same drain while a REPEATABLE READ transaction pins the xmin horizon, with dead tuples
//! counted at the end; enqueue with 16 clients and wake-ups under that load; a steady state at
//! a kept depth with 16 and 64 consumers, then 60 % of it with the horizon pinned; an
//! under-filled claim as jobs churn through with autovacuum off.
//!
//! pg_keel is measured as installed (claims and acks commit without waiting for the WAL flush
//! when nothing else was written, `keel.lease_commit = async`) and with `keel.lease_commit =
//! sync`, where every statement waits for the flush exactly like the plain-SQL way.
//!
//! The plain-SQL queue is what a careful engineer writes by hand: the same columns and claim
//! index, one `FOR UPDATE SKIP LOCKED` statement to claim, `DELETE` to ack, prepared statements.
//! Redis is a list (LPUSH / RPOP): no lease, no retry, a popped job is lost if its consumer dies.
//!
//! Outbox, rate limits and sessions: see `outbox.rs`, `ratelimit.rs` and `session.rs`.
//!
//! Environment: KEEL_BENCH_JOBS (backlog per drain, default 10000),
//! KEEL_BENCH_ENQUEUES (jobs per enqueue row, default 10000), KEEL_BENCH_ONLY (one section).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use keel_pg_test::{Client, Cluster, Redis};

mod flow;
mod outbox;
mod ratelimit;
mod session;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;

const QUEUE: &str = "bench";

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn payload(n: usize) -> serde_json::Value {
    serde_json::json!({"user_id": n, "email": format!("user{n}@example.com"), "template": "welcome"})
}

/// The plain-SQL way, written the straightforward way.
const PLAIN_SCHEMA: &str = "
    CREATE TABLE plain_jobs (
        job_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        queue       text NOT NULL,
        state       text NOT NULL DEFAULT 'ready',
        payload     jsonb NOT NULL,
        priority    integer NOT NULL DEFAULT 0,
        attempt     integer NOT NULL DEFAULT 0,
        visible_at  timestamptz NOT NULL DEFAULT now(),
        enqueued_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX plain_jobs_claim ON plain_jobs (queue, priority, visible_at, job_id)
        WHERE state IN ('ready', 'running');
    CREATE EXTENSION IF NOT EXISTS pgstattuple;";

#[derive(Clone, Copy, PartialEq)]
enum Way {
    /// pg_keel as installed (keel.lease_commit = async).
    Keel,
    /// pg_keel with keel.lease_commit = sync: every claim and ack waits for the WAL flush.
    KeelSync,
    Plain,
    /// pgmq 1.11.1 (its SQL-only install, see scripts/fetch-pgmq.sh): send, read with a
    /// visibility timeout, delete.
    Pgmq,
}

/// Whether pgmq was installed into the bench cluster (KEEL_BENCH_PGMQ_SQL named its script).
static PGMQ: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn pgmq() -> bool {
    PGMQ.load(std::sync::atomic::Ordering::Relaxed)
}

/// The ways measured in the drain rows, in the order the first repeat runs them.
fn ways() -> Vec<Way> {
    let mut ways = vec![Way::Keel, Way::KeelSync, Way::Plain];
    if pgmq() {
        ways.push(Way::Pgmq);
    }
    ways
}

struct Statements {
    enqueue: postgres::Statement,
    enqueue_batch: postgres::Statement,
    claim: postgres::Statement,
    ack: postgres::Statement,
    ack_batch: postgres::Statement,
}

fn prepare(c: &mut Client, way: Way) -> Statements {
    if way == Way::KeelSync {
        c.batch_execute("SET keel.lease_commit = sync")
            .expect("set lease_commit");
    }
    let sql = match way {
        Way::Keel | Way::KeelSync => [
            "SELECT keel.enqueue($1, $2)",
            "SELECT keel.enqueue_batch($1, $2)",
            "SELECT job_id, attempt, payload FROM keel.claim($1, $2)",
            "SELECT keel.ack($1, $2)",
            "SELECT keel.ack_batch($1, $2)",
        ],
        Way::Plain => [
            "INSERT INTO plain_jobs (queue, payload) VALUES ($1, $2) RETURNING job_id",
            "INSERT INTO plain_jobs (queue, payload) SELECT $1, p FROM unnest($2::jsonb[]) p RETURNING job_id",
            "WITH picked AS (
                 SELECT job_id FROM plain_jobs
                  WHERE queue = $1 AND state IN ('ready', 'running') AND visible_at <= now()
                  ORDER BY priority, visible_at, job_id
                  LIMIT $2::integer
                    FOR UPDATE SKIP LOCKED)
             UPDATE plain_jobs j
                SET state = 'running', attempt = j.attempt + 1, visible_at = now() + interval '30 seconds'
               FROM picked WHERE j.job_id = picked.job_id
             RETURNING j.job_id, j.attempt, j.payload",
            "DELETE FROM plain_jobs WHERE job_id = $1 AND attempt = $2 AND state = 'running'",
            "DELETE FROM plain_jobs j USING unnest($1::int8[], $2::int4[]) AS l(job_id, attempt)
              WHERE j.job_id = l.job_id AND j.attempt = l.attempt AND j.state = 'running'",
        ],
        // pgmq's delete takes the message id alone: the attempt parameter is unused.
        Way::Pgmq => [
            "SELECT pgmq.send($1, $2)",
            "SELECT pgmq.send_batch($1, $2)",
            "SELECT msg_id, read_ct, message FROM pgmq.read($1, 30, $2)",
            "SELECT pgmq.delete('bench', $1::int8) WHERE $2::int4 IS NOT NULL",
            "SELECT pgmq.delete('bench', $1::int8[]) WHERE $2::int4[] IS NOT NULL",
        ],
    };
    let p = |c: &mut Client, s: &str| c.prepare(s).unwrap_or_else(|e| panic!("prepare {s}: {e}"));
    Statements {
        enqueue: p(c, sql[0]),
        enqueue_batch: p(c, sql[1]),
        claim: p(c, sql[2]),
        ack: p(c, sql[3]),
        ack_batch: p(c, sql[4]),
    }
}

/// Runs `work(client_index, connection)` on `clients` connections at once; returns the wall time.
fn parallel(
    pg: &Cluster,
    clients: usize,
    work: impl Fn(usize, &mut Client) + Send + Sync + 'static,
) -> Duration {
    let work = Arc::new(work);
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let mut conn = pg.connect();
            let (work, barrier) = (work.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                work(i, &mut conn);
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    for t in threads {
        t.join().expect("bench client");
    }
    started.elapsed()
}

/// Completes claimed `rows` (job_id, attempt, ...) with one `ack_batch` call; how many.
fn ack_rows(c: &mut Client, st: &Statements, rows: &[postgres::Row]) -> usize {
    let (ids, attempts): (Vec<i64>, Vec<i32>) = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1)))
        .unzip();
    c.execute(&st.ack_batch, &[&ids, &attempts])
        .expect("ack batch");
    ids.len()
}

/// A consumer until `stop`: claims up to 64 (napping 1 ms when there is none), completes
/// each batch in one call and hands `done` the batch (job_id, attempt, payload) and when its
/// claim returned.
fn spawn_consumer(
    pg: &Cluster,
    way: Way,
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: impl Fn(&[postgres::Row], Instant) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let mut c = pg.connect();
    std::thread::spawn(move || {
        let st = prepare(&mut c, way);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let rows = c.query(&st.claim, &[&QUEUE, &64i32]).expect("claim");
            let claimed = Instant::now();
            if rows.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            ack_rows(&mut c, &st, &rows);
            done(&rows, claimed);
        }
    })
}

/// A session idle in a transaction that has an xid (pinning the xmin horizon) until the
/// returned flag is cleared; join the thread to know it ended.
fn hold_xid(
    pg: &Cluster,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let holding = Arc::new(AtomicBool::new(true));
    let mut c = pg.connect();
    let h = holding.clone();
    let thread = std::thread::spawn(move || {
        c.batch_execute("BEGIN; SELECT txid_current()")
            .expect("xid");
        while h.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        c.batch_execute("ROLLBACK").expect("end holder");
    });
    (holding, thread)
}

fn reset(pg: &Cluster) {
    let mut c = pg.connect();
    for sql in ["SELECT keel.purge_queue('bench')", "TRUNCATE plain_jobs"] {
        c.batch_execute(sql).expect("reset");
    }
    if pgmq() {
        for sql in [
            "SELECT pgmq.purge_queue('bench')",
            "VACUUM ANALYZE pgmq.q_bench",
        ] {
            c.batch_execute(sql).expect("reset pgmq");
        }
    }
    vacuum(&mut c);
}

fn vacuum(c: &mut Client) {
    for sql in ["VACUUM ANALYZE keel.jobs", "VACUUM ANALYZE plain_jobs"] {
        c.batch_execute(sql).expect("vacuum");
    }
}

fn enqueue_rate(pg: &Cluster, way: Way, total: usize, batch: usize, clients: usize) -> f64 {
    reset(pg);
    let per_client = total / clients;
    let took = parallel(pg, clients, move |_, c| {
        let st = prepare(c, way);
        if batch == 1 {
            for n in 0..per_client {
                let p = payload(n);
                c.query_one(&st.enqueue, &[&QUEUE, &p]).expect("enqueue");
            }
        } else {
            for chunk in 0..per_client / batch {
                let ps: Vec<serde_json::Value> =
                    (0..batch).map(|n| payload(chunk * batch + n)).collect();
                c.query(&st.enqueue_batch, &[&QUEUE, &ps])
                    .expect("enqueue batch");
            }
        }
    });
    (per_client * clients) as f64 / took.as_secs_f64()
}

/// Wake-ups while producers enqueue as fast as they can: `clients` producers call
/// keel.enqueue one job per transaction for `seconds`; a probe enqueues to another queue every
/// 20 ms and a LISTENing connection notes when each probe's wake-up arrives. Returns the
/// producers' rate and the milliseconds from each probe's commit to its wake-up, sorted.
/// `relay` false: keel.wake_relay = off, every producer sends its own NOTIFY.
fn wake_under_load(pg: &Cluster, clients: usize, seconds: u64, relay: bool) -> (f64, Vec<f64>) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    reset(pg);
    let mut setup = pg.connect();
    setup
        .batch_execute("SELECT keel.create_queue('probe'); SELECT keel.purge_queue('probe')")
        .expect("probe queue");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let heard: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut listener = pg.connect();
    listener.batch_execute("LISTEN keel_jobs").expect("listen");
    let (stop_l, heard_l) = (stop.clone(), heard.clone());
    let listening = std::thread::spawn(move || {
        while !stop_l.load(Ordering::Relaxed) {
            let mut n = listener.notifications();
            let mut it = n.timeout_iter(Duration::from_millis(50));
            while let Ok(Some(note)) = it.next() {
                if note.payload() == "probe" {
                    heard_l.lock().expect("heard").push(Instant::now());
                }
            }
        }
    });
    let setting = if relay { "on" } else { "off" };
    let producers: Vec<_> = (0..clients)
        .map(|_| {
            let mut c = pg.connect();
            let (stop, done) = (stop.clone(), done.clone());
            let setting = setting.to_string();
            std::thread::spawn(move || {
                c.batch_execute(&format!("SET keel.wake_relay = {setting}"))
                    .expect("setting");
                let st = c.prepare("SELECT keel.enqueue($1, $2)").expect("prepare");
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    c.query_one(&st, &[&QUEUE, &payload(n)]).expect("enqueue");
                    n += 1;
                }
                done.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    let mut probe = pg.connect();
    probe
        .batch_execute(&format!("SET keel.wake_relay = {setting}"))
        .expect("setting");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        // One probe in flight at a time: each wake-up is matched to its commit.
        let before = heard.lock().expect("heard").len();
        probe
            .query_one("SELECT keel.enqueue('probe', '{}')", &[])
            .expect("probe");
        sent.lock().expect("sent").push(Instant::now());
        let deadline = Instant::now() + Duration::from_secs(2);
        while heard.lock().expect("heard").len() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.join().expect("producer");
    }
    listening.join().expect("listener");
    let sent = sent.lock().expect("sent");
    let heard = heard.lock().expect("heard");
    let mut ms: Vec<f64> = sent
        .iter()
        .zip(heard.iter())
        .map(|(s, h)| h.saturating_duration_since(*s).as_secs_f64() * 1000.0)
        .collect();
    assert_eq!(sent.len(), heard.len(), "every probe woke the listener");
    ms.sort_by(|a, b| a.total_cmp(b));
    setup
        .batch_execute("SELECT keel.drop_queue('probe', force => true)")
        .expect("drop probe queue");
    (
        done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        ms,
    )
}

/// Pickup latency: one producer enqueues one job per call at `rate` jobs/s for `seconds`; one
/// consumer LISTENs (and polls every 100 ms as a fallback), claims up to 64 on every wake-up
/// until the queue is empty, acks them in one call. Returns the milliseconds from each
/// enqueue's return (its commit) to the claim that handed the job out, sorted.
fn pickup(pg: &Cluster, way: Way, rate: usize, seconds: usize) -> Vec<f64> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    reset(pg);
    let total = rate * seconds;
    let committed: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let claimed: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let channel = if way == Way::Plain {
        "plain_jobs"
    } else {
        "keel_jobs"
    };
    let mut consumer = pg.connect();
    consumer
        .batch_execute(&format!("LISTEN {channel}"))
        .expect("listen");
    let seen = claimed.clone();
    let reader = std::thread::spawn(move || {
        let st = prepare(&mut consumer, way);
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(seconds as u64 + 30);
        while got < total && Instant::now() < deadline {
            loop {
                let rows = consumer.query(&st.claim, &[&QUEUE, &64i32]).expect("claim");
                if rows.is_empty() {
                    break;
                }
                let now = Instant::now();
                let (ids, attempts): (Vec<i64>, Vec<i32>) = rows
                    .iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1)))
                    .unzip();
                {
                    let mut seen = seen.lock().expect("claimed");
                    for id in &ids {
                        seen.insert(*id, now);
                    }
                }
                got += ids.len();
                consumer
                    .execute(&st.ack_batch, &[&ids, &attempts])
                    .expect("ack_batch");
            }
            let mut wakeups = consumer.notifications();
            let _ = wakeups.timeout_iter(Duration::from_millis(100)).next();
        }
    });
    let mut producer = pg.connect();
    let st = prepare(&mut producer, way);
    let plain_notify = producer
        .prepare("SELECT pg_notify('plain_jobs', $1)")
        .expect("prepare notify");
    let started = Instant::now();
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let p = payload(n);
        let id: i64 = if way == Way::Plain {
            let mut tx = producer.transaction().expect("begin");
            let id: i64 = tx
                .query_one(&st.enqueue, &[&QUEUE, &p])
                .expect("insert")
                .get(0);
            tx.execute(&plain_notify, &[&QUEUE]).expect("notify");
            tx.commit().expect("commit");
            id
        } else {
            producer
                .query_one(&st.enqueue, &[&QUEUE, &p])
                .expect("enqueue")
                .get(0)
        };
        committed
            .lock()
            .expect("committed")
            .insert(id, Instant::now());
    }
    reader.join().expect("consumer");
    let committed = committed.lock().expect("committed");
    let claimed = claimed.lock().expect("claimed");
    let mut ms: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| {
            let got = claimed.get(id)?;
            Some(got.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    assert_eq!(ms.len(), total, "every job was picked up");
    ms.sort_by(|a, b| a.total_cmp(b));
    ms
}

/// Steady state: `consumers` claim up to 64 and complete each batch in one call, while
/// producers (4, `enqueue_batch` of up to 128) keep the queue near `depth` waiting jobs.
/// Returns (completed jobs/s, the mean depth seen by the producers) over `seconds`, after a
/// second of warm-up.
fn steady(pg: &Cluster, way: Way, consumers: usize, depth: i64, seconds: u64) -> (f64, f64) {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    reset(pg);
    let stop = Arc::new(AtomicBool::new(false));
    let enqueued = Arc::new(AtomicI64::new(0));
    let completed = Arc::new(AtomicI64::new(0));
    let depth_sum = Arc::new(AtomicI64::new(0));
    let depth_seen = Arc::new(AtomicI64::new(0));
    let mut threads = Vec::new();
    for _ in 0..4 {
        let mut c = pg.connect();
        let (stop, enqueued, completed) = (stop.clone(), enqueued.clone(), completed.clone());
        let (depth_sum, depth_seen) = (depth_sum.clone(), depth_seen.clone());
        threads.push(std::thread::spawn(move || {
            let st = prepare(&mut c, way);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let waiting = enqueued.load(Ordering::Relaxed) - completed.load(Ordering::Relaxed);
                depth_sum.fetch_add(waiting, Ordering::Relaxed);
                depth_seen.fetch_add(1, Ordering::Relaxed);
                let want = (depth - waiting).clamp(0, 128) as usize;
                if want == 0 {
                    std::thread::sleep(Duration::from_micros(500));
                    continue;
                }
                let ps: Vec<serde_json::Value> = (0..want).map(|k| payload(n + k)).collect();
                n += want;
                c.query(&st.enqueue_batch, &[&QUEUE, &ps])
                    .expect("enqueue batch");
                enqueued.fetch_add(want as i64, Ordering::Relaxed);
            }
        }));
    }
    let counting = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicI64::new(0));
    for _ in 0..consumers {
        let completed = completed.clone();
        let (counting, counted) = (counting.clone(), counted.clone());
        threads.push(spawn_consumer(pg, way, stop.clone(), move |rows, _| {
            let n = rows.len() as i64;
            completed.fetch_add(n, Ordering::Relaxed);
            if counting.load(Ordering::Relaxed) {
                counted.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(1));
    depth_sum.store(0, Ordering::Relaxed);
    depth_seen.store(0, Ordering::Relaxed);
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    counting.store(false, Ordering::Relaxed);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("steady client");
    }
    let rate = counted.load(Ordering::Relaxed) as f64 / took.as_secs_f64();
    let seen = depth_seen.load(Ordering::Relaxed).max(1);
    (rate, depth_sum.load(Ordering::Relaxed) as f64 / seen as f64)
}

/// What pins the xmin horizon while a load runs.
#[derive(Clone, Copy)]
enum Holder {
    /// One session idle in a transaction that has an xid.
    IdleWithXid,
    /// Four REPEATABLE READ sessions scanning the job table every 200 ms in one transaction.
    RepeatableReadScans,
}

/// A steady load of `offered` jobs/s (a producer enqueues a batch every 10 ms; 16 consumers
/// claim up to 64 and complete each batch in one call) through three phases of `phase`
/// seconds: clean, with the holder, after it ended. Returns the completed jobs/s of each
/// phase and the dead tuples of the job table at the end of the held phase.
fn held_load(
    pg: &Cluster,
    way: Way,
    offered: usize,
    holder: Holder,
    phase: u64,
) -> ([f64; 3], i64) {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    reset(pg);
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicI64::new(0));
    let mut threads = Vec::new();
    {
        let mut c = pg.connect();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let st = prepare(&mut c, way);
            let per_tick = (offered / 100).max(1);
            let started = Instant::now();
            let mut tick = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = started + Duration::from_millis(10 * tick);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let ps: Vec<serde_json::Value> = (0..per_tick).map(payload).collect();
                c.query(&st.enqueue_batch, &[&QUEUE, &ps])
                    .expect("enqueue batch");
                tick += 1;
            }
        }));
    }
    for _ in 0..16 {
        let completed = completed.clone();
        threads.push(spawn_consumer(pg, way, stop.clone(), move |rows, _| {
            completed.fetch_add(rows.len() as i64, Ordering::Relaxed);
        }));
    }
    let table = match way {
        Way::Plain => "plain_jobs",
        Way::Pgmq => "pgmq.q_bench",
        _ => "keel.jobs",
    };
    let window = |from: i64| -> f64 {
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(phase));
        (completed.load(Ordering::Relaxed) - from) as f64 / started.elapsed().as_secs_f64()
    };
    std::thread::sleep(Duration::from_secs(1));
    let clean = window(completed.load(Ordering::Relaxed));
    let mut holding = Arc::new(AtomicBool::new(true));
    let mut holders = Vec::new();
    match holder {
        Holder::IdleWithXid => {
            let (flag, thread) = hold_xid(pg);
            holding = flag;
            holders.push(thread);
        }
        Holder::RepeatableReadScans => {
            for _ in 0..4 {
                let mut c = pg.connect();
                let holding = holding.clone();
                let scan = format!("SELECT count(*) FROM {table}");
                holders.push(std::thread::spawn(move || {
                    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                        .expect("rr");
                    while holding.load(Ordering::Relaxed) {
                        c.batch_execute(&scan).expect("scan");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    c.batch_execute("COMMIT").expect("end holder");
                }));
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let held = window(completed.load(Ordering::Relaxed));
    let dead: i64 = pg
        .connect()
        .query_one(
            &format!("SELECT dead_tuple_count FROM pgstattuple('{table}')"),
            &[],
        )
        .expect("pgstattuple")
        .get(0);
    holding.store(false, Ordering::Relaxed);
    for h in holders {
        h.join().expect("holder");
    }
    let after = window(completed.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("load client");
    }
    ([clean, held, after], dead)
}

/// An under-filled claim (64 asked, 10 ready) as jobs churn through the queue with autovacuum
/// off: milliseconds (median of 7) on the fresh queue and after each count of `churned` jobs
/// were enqueued, claimed and acked (in batches of 1000 and 500).
fn churned_claim(pg: &Cluster, way: Way, churned: &[usize]) -> Vec<f64> {
    reset(pg);
    let table = match way {
        Way::Plain => "plain_jobs",
        Way::Pgmq => "pgmq.q_bench",
        _ => "keel.jobs",
    };
    let mut c = pg.connect();
    c.batch_execute(&format!(
        "ALTER TABLE {table} SET (autovacuum_enabled = false)"
    ))
    .expect("autovacuum off");
    let st = prepare(&mut c, way);
    let ten: Vec<serde_json::Value> = (0..10).map(payload).collect();
    let thousand: Vec<serde_json::Value> = (0..1000).map(payload).collect();
    let drain = |c: &mut Client, batch: i32| loop {
        let rows = c.query(&st.claim, &[&QUEUE, &batch]).expect("claim");
        if rows.is_empty() {
            break;
        }
        ack_rows(c, &st, &rows);
    };
    let measure = |c: &mut Client| -> f64 {
        let mut ms = Vec::new();
        for _ in 0..7 {
            c.query(&st.enqueue_batch, &[&QUEUE, &ten])
                .expect("enqueue 10");
            let started = Instant::now();
            let rows = c.query(&st.claim, &[&QUEUE, &64i32]).expect("claim");
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(rows.len(), 10);
            ack_rows(c, &st, &rows);
        }
        median(ms)
    };
    let mut out = vec![measure(&mut c)];
    let mut done = 0;
    for &target in churned {
        while done < target {
            c.query(&st.enqueue_batch, &[&QUEUE, &thousand])
                .expect("enqueue 1000");
            drain(&mut c, 500);
            done += 1000;
        }
        out.push(measure(&mut c));
    }
    c.batch_execute(&format!("ALTER TABLE {table} RESET (autovacuum_enabled)"))
        .expect("autovacuum back");
    c.batch_execute(&format!("VACUUM {table}")).expect("vacuum");
    out
}

fn prefill(pg: &Cluster, jobs: usize) {
    reset(pg);
    let mut c = pg.connect();
    c.batch_execute(&format!(
        "SELECT keel.enqueue_batch('bench', array_agg(jsonb_build_object('user_id', g, 'email', 'user' || g || '@example.com', 'template', 'welcome')))
           FROM generate_series(1, {jobs}) g;
         INSERT INTO plain_jobs (queue, payload)
         SELECT 'bench', jsonb_build_object('user_id', g, 'email', 'user' || g || '@example.com', 'template', 'welcome')
           FROM generate_series(1, {jobs}) g;"
    ))
    .expect("prefill");
    if pgmq() {
        c.batch_execute(&format!(
            "SELECT pgmq.send_batch('bench', array_agg(jsonb_build_object('user_id', g, 'email', 'user' || g || '@example.com', 'template', 'welcome')))
               FROM generate_series(1, {jobs}) g"
        ))
        .expect("prefill pgmq");
        c.batch_execute("VACUUM ANALYZE pgmq.q_bench")
            .expect("vacuum pgmq");
    }
    vacuum(&mut c);
    c.batch_execute("CHECKPOINT").expect("checkpoint");
}

/// Drains the backlog with `consumers` clients claiming `batch` at a time; jobs/s.
/// How a consumer completes what it claimed.
#[derive(Clone, Copy, PartialEq)]
enum Acks {
    /// One `ack` per job.
    Each,
    /// One `ack_batch` per claimed batch (plain SQL: one DELETE of the batch).
    Batch,
}

fn drain(pg: &Cluster, way: Way, jobs: usize, consumers: usize, batch: i32) -> f64 {
    drain_with(pg, way, jobs, consumers, batch, Acks::Each)
}

fn drain_with(
    pg: &Cluster,
    way: Way,
    jobs: usize,
    consumers: usize,
    batch: i32,
    acks: Acks,
) -> f64 {
    let took = parallel(pg, consumers, move |_, c| {
        let st = prepare(c, way);
        loop {
            let got = c.query(&st.claim, &[&QUEUE, &batch]).expect("claim");
            if got.is_empty() {
                break;
            }
            let leases: Vec<(i64, i32)> = got
                .iter()
                .map(|row| {
                    let _payload: serde_json::Value = row.get(2);
                    (row.get(0), row.get(1))
                })
                .collect();
            match acks {
                Acks::Each => {
                    for (id, attempt) in leases {
                        let args: [&(dyn ToSql + Sync); 2] = [&id, &attempt];
                        c.execute(&st.ack, &args).expect("ack");
                    }
                }
                Acks::Batch => {
                    let (ids, attempts): (Vec<i64>, Vec<i32>) = leases.into_iter().unzip();
                    c.execute(&st.ack_batch, &[&ids, &attempts])
                        .expect("ack_batch");
                }
            }
        }
    });
    let mut c = pg.connect();
    let left: i64 = match way {
        Way::Keel | Way::KeelSync => c.query_one("SELECT count(*) FROM keel.jobs", &[]),
        Way::Plain => c.query_one("SELECT count(*) FROM plain_jobs", &[]),
        Way::Pgmq => c.query_one("SELECT count(*) FROM pgmq.q_bench", &[]),
    }
    .expect("count")
    .get(0);
    assert_eq!(left, 0, "drain left jobs behind");
    jobs as f64 / took.as_secs_f64()
}

fn dead_tuples(pg: &Cluster, way: Way) -> i64 {
    let table = if way == Way::Keel {
        "keel.jobs"
    } else {
        "plain_jobs"
    };
    pg.connect()
        .query_one(
            &format!("SELECT dead_tuple_count FROM pgstattuple('{table}')"),
            &[],
        )
        .expect("pgstattuple")
        .get(0)
}

fn redis_enqueue(redis: &Redis, total: usize, batch: usize) -> f64 {
    let mut r = redis.connection();
    let _: () = redis::cmd("DEL").arg("bench").query(&mut r).expect("DEL");
    let clients = 4;
    let per_client = total / clients;
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let mut r = redis.connection();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for chunk in 0..per_client / batch {
                    let mut cmd = redis::cmd("LPUSH");
                    cmd.arg("bench");
                    for n in 0..batch {
                        cmd.arg(payload(chunk * batch + n).to_string());
                    }
                    let _: i64 = cmd.query(&mut r).expect("LPUSH");
                }
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    for t in threads {
        t.join().expect("redis client");
    }
    (per_client * clients) as f64 / started.elapsed().as_secs_f64()
}

fn redis_drain(redis: &Redis, jobs: usize, consumers: usize, batch: usize) -> f64 {
    redis_enqueue(redis, jobs, 100);
    let barrier = Arc::new(Barrier::new(consumers + 1));
    let threads: Vec<_> = (0..consumers)
        .map(|_| {
            let mut r = redis.connection();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                loop {
                    let got: Option<Vec<String>> = redis::cmd("RPOP")
                        .arg("bench")
                        .arg(batch)
                        .query(&mut r)
                        .expect("RPOP");
                    if got.map(|v| v.is_empty()).unwrap_or(true) {
                        break;
                    }
                }
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    for t in threads {
        t.join().expect("redis client");
    }
    jobs as f64 / started.elapsed().as_secs_f64()
}

/// Drain rows are measured this many times per side; the table shows the median.
const REPEATS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One line of the queue table; `pgmq` and `redis` are None where not measured.
fn row(
    label: &str,
    keel: f64,
    keel_sync: Option<f64>,
    plain: f64,
    pgmq: Option<f64>,
    redis: Option<f64>,
) {
    let opt = |v: Option<f64>| {
        v.map(|r| format!("{r:>12.0}"))
            .unwrap_or_else(|| format!("{:>12}", "-"))
    };
    let ratio = |v: Option<f64>| {
        v.map(|d| format!("{:>9.2}x", keel / d))
            .unwrap_or_else(|| format!("{:>10}", "-"))
    };
    let sync_ratio = keel_sync
        .map(|k| format!("{:>9.2}x", k / plain))
        .unwrap_or_else(|| format!("{:>10}", "-"));
    println!(
        "{label:<34} {keel:>12.0} {} {plain:>12.0} {:>7.2}x {sync_ratio} {} {} {}",
        opt(keel_sync),
        keel / plain,
        opt(pgmq),
        ratio(pgmq),
        opt(redis)
    );
}

/// Median rate of each way over REPEATS runs of `run`, rotating who goes first so that
/// checkpoints and caches favour no side; indexed by `Way as usize`.
fn rotated(pg: &Cluster, jobs: usize, run: impl Fn(Way) -> f64) -> [Option<f64>; 4] {
    let ways = ways();
    let mut rates: [Vec<f64>; 4] = Default::default();
    for rep in 0..REPEATS {
        for k in 0..ways.len() {
            let way = ways[(rep + k) % ways.len()];
            prefill(pg, jobs);
            rates[way as usize].push(run(way));
        }
    }
    rates.map(|r| (!r.is_empty()).then(|| median(r)))
}

fn main() {
    let jobs = env_num("KEEL_BENCH_JOBS", 10_000);
    let enqueues = env_num("KEEL_BENCH_ENQUEUES", 10_000);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("pg_keel queue benchmark: {cpus} cores, backlog {jobs} jobs per drain, {enqueues} jobs per enqueue row");
    println!("PostgreSQL 15 with fsync = on, synchronous_commit = on; redis-server without persistence\n");

    let redis = Redis::start();
    let redis_url = format!("keel.redis_url = '{}'", redis.url());
    let pg = Cluster::start(&[
        "fsync = on",
        "max_connections = 200",
        "shared_buffers = '512MB'",
        &redis_url,
    ]);
    {
        let mut c = pg.connect();
        c.batch_execute(PLAIN_SCHEMA).expect("plain schema");
        c.batch_execute("SELECT keel.create_queue('bench')")
            .expect("queue");
        // pgmq beside pg_keel, when `make bench` could fetch its install script.
        let script = std::env::var("KEEL_BENCH_PGMQ_SQL").unwrap_or_default();
        match std::fs::read_to_string(&script) {
            Ok(sql) if !script.is_empty() => {
                c.batch_execute(&sql).expect("install pgmq");
                c.batch_execute("SELECT pgmq.create('bench')")
                    .expect("pgmq queue");
                PGMQ.store(true, std::sync::atomic::Ordering::Relaxed);
                println!("pgmq 1.11.1 (SQL-only install from {script})");
            }
            _ => println!("pgmq not measured (scripts/fetch-pgmq.sh could not fetch it)"),
        }
    }

    // KEEL_BENCH_ONLY=queues, =flow, =outbox, =ratelimit or =sessions runs one section.
    let only = std::env::var("KEEL_BENCH_ONLY").unwrap_or_default();
    let want = |section: &str| only.is_empty() || only == section;
    if want("queues") {
        queues(&pg, &redis, jobs, enqueues);
    }
    if only == "steady" {
        steady_section(&pg);
    }
    if only == "long" {
        long_section(&pg);
    }
    if want("flow") {
        flow::run(&pg);
    }
    if want("outbox") {
        outbox::run(&pg, &redis);
    }
    if want("ratelimit") {
        ratelimit::run(&pg, &redis);
    }
    if want("sessions") {
        session::run(&pg, &redis);
    }
    redis.stop();
    drop(pg);
}

/// Steady state at a kept depth, then a steady load at 60 % of it with the xmin horizon pinned
/// (`KEEL_BENCH_ONLY=steady` runs this alone).
fn steady_section(pg: &Cluster) -> [Option<f64>; 4] {
    // Steady state: the queue kept near a depth, completions per second (median of 3).
    let (depth, seconds) = (4000, 8);
    println!(
        "\nsteady state: 4 producers keep ~{depth} jobs waiting (enqueue_batch up to 128), consumers claim up to 64 and complete each batch in one call ({seconds} s, median of 3)"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>8} {:>12} {:>10}   mean depth keel / plain / pgmq",
        "jobs/s", "pg_keel", "", "plain SQL", "ratio", "pgmq", "vs pgmq"
    );
    let mut peaks: [Option<f64>; 4] = [None; 4];
    for consumers in [16, 64] {
        let mut ways = vec![Way::Keel, Way::Plain];
        if pgmq() {
            ways.push(Way::Pgmq);
        }
        let mut rates: [Vec<f64>; 4] = Default::default();
        let mut depths: [Vec<f64>; 4] = Default::default();
        for rep in 0..REPEATS {
            for k in 0..ways.len() {
                let way = ways[(rep + k) % ways.len()];
                let (rate, mean) = steady(pg, way, consumers, depth, seconds);
                rates[way as usize].push(rate);
                depths[way as usize].push(mean);
            }
        }
        let [k, _, p, q] = rates.map(|r| (!r.is_empty()).then(|| median(r)));
        let [dk, _, dp, dq] = depths.map(|r| (!r.is_empty()).then(|| median(r)));
        let (k, p) = (k.unwrap_or(0.0), p.unwrap_or(1.0));
        if consumers == 16 {
            peaks = [Some(k), None, Some(p), q];
        }
        println!(
            "{:<34} {k:>12.0} {:>12} {p:>12.0} {:>7.2}x {} {}   {:.0} / {:.0} / {}",
            format!("{consumers} consumers"),
            "",
            k / p,
            q.map(|v| format!("{v:>12.0}"))
                .unwrap_or_else(|| format!("{:>12}", "-")),
            q.map(|v| format!("{:>9.2}x", k / v))
                .unwrap_or_else(|| format!("{:>10}", "-")),
            dk.unwrap_or(0.0),
            dp.unwrap_or(0.0),
            dq.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into()),
        );
    }

    // The xmin horizon pinned while a steady load at 60 % of each way's peak runs.
    let phase = 10;
    println!(
        "\nsteady load at 60 % of each one's peak above (16 consumers), {phase} s clean, {phase} s with the xmin horizon pinned, {phase} s after: completed / offered"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "", "offered/s", "clean", "held", "after", "dead, held"
    );
    let mut ways = vec![("pg_keel", Way::Keel), ("plain SQL", Way::Plain)];
    if pgmq() {
        ways.push(("pgmq", Way::Pgmq));
    }
    for (holder, what) in [
        (Holder::IdleWithXid, "idle in transaction with an xid"),
        (Holder::RepeatableReadScans, "4 REPEATABLE READ scanners"),
    ] {
        for (label, way) in &ways {
            let Some(peak) = peaks[*way as usize] else {
                continue;
            };
            let offered = (peak * 0.6) as usize;
            let ([clean, held, after], dead) = held_load(pg, *way, offered, holder, phase);
            let o = offered as f64;
            println!(
                "{:<34} {offered:>10} {:>9.2}x {:>9.2}x {:>9.2}x {dead:>12}",
                format!("{label}, {what}"),
                clean / o,
                held / o,
                after / o
            );
        }
    }
    peaks
}

/// `KEEL_BENCH_ONLY=long`: the peaks of the steady state, then for each way an overload at
/// 1.5x its peak for a minute followed by 60 % (per 10 s: completed/s against the clean peak,
/// backlog, pickup p99), and a steady load at 60 % of its peak for `KEEL_BENCH_LONG_MINUTES`
/// (default 10) with an idle transaction holding an xid from the second minute to the
/// second-last (per minute: completed/offered, pickup p99, backlog).
fn long_section(pg: &Cluster) {
    let peaks = steady_section(pg);
    let minutes: u64 = std::env::var("KEEL_BENCH_LONG_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|m| *m >= 3)
        .unwrap_or(10);
    let mut ways = vec![("pg_keel", Way::Keel), ("plain SQL", Way::Plain)];
    if pgmq() {
        ways.push(("pgmq", Way::Pgmq));
    }
    // KEEL_BENCH_LONG_WAYS=keel: pg_keel alone (the peers' peaks are still measured).
    if std::env::var("KEEL_BENCH_LONG_WAYS").is_ok_and(|w| w == "keel") {
        ways.truncate(1);
    }
    // KEEL_BENCH_LONG_PARTS=overload or =pinned runs one of the two.
    let parts = std::env::var("KEEL_BENCH_LONG_PARTS").unwrap_or_default();
    if parts != "pinned" {
        overload(pg, &ways, &peaks);
    }
    if parts != "overload" {
        pinned_for_minutes(pg, &ways, &peaks, minutes);
    }
}

fn overload(pg: &Cluster, ways: &[(&str, Way)], peaks: &[Option<f64>; 4]) {
    println!(
        "\noverload: 60 s at 1.5x each one's peak (16 consumers), then 120 s at 60 %; per 10 s: completed/s as a share of the peak, backlog, pickup p99 (enqueue call -> claimed)"
    );
    for (label, way) in ways {
        let Some(peak) = peaks[*way as usize] else {
            continue;
        };
        let plan = [(60, peak * 1.5, false), (120, peak * 0.6, false)];
        let steps = timeline(pg, *way, &plan, 10);
        println!("{label} (peak {peak:.0} jobs/s)");
        print_steps(&steps, "s", 10, peak, "of peak");
    }
}

fn pinned_for_minutes(pg: &Cluster, ways: &[(&str, Way)], peaks: &[Option<f64>; 4], minutes: u64) {
    println!(
        "\n{minutes} minutes at 60 % of each one's peak, an idle transaction with an xid held from minute 2 to minute {}; per minute: completed/offered, backlog, pickup p99",
        minutes - 1
    );
    for (label, way) in ways {
        let Some(peak) = peaks[*way as usize] else {
            continue;
        };
        let offered = peak * 0.6;
        let plan = [
            (60, offered, false),
            ((minutes - 2) * 60, offered, true),
            (60, offered, false),
        ];
        let steps = timeline(pg, *way, &plan, 60);
        println!("{label} ({offered:.0} jobs/s offered)");
        print_steps(&steps, "min", 60, offered, "of offered");
    }
}

fn print_steps(steps: &[Step], unit: &str, step: u64, against: f64, what: &str) {
    for (i, s) in steps.iter().enumerate() {
        let at = if unit == "min" {
            (i as u64 + 1).to_string()
        } else {
            ((i as u64 + 1) * step).to_string()
        };
        println!(
            "  {at:>4} {unit:<3} {}  completed {:>8.0}/s = {:>5.2}x {what}   backlog {:>8}   pickup p99 {:>9.1} ms",
            if s.held { "held " } else { "     " },
            s.completed,
            s.completed / against,
            s.backlog,
            s.p99_ms
        );
    }
}

/// Enqueues `n` jobs in one call, each payload carrying its send time (µs since `epoch`).
fn send_stamped(c: &mut Client, st: &Statements, n: usize, epoch: Instant) {
    let sent = epoch.elapsed().as_micros() as i64;
    let ps: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"t": sent, "user_id": i, "template": "welcome"}))
        .collect();
    c.query(&st.enqueue_batch, &[&QUEUE, &ps])
        .expect("enqueue batch");
}

/// One step of a [`timeline`].
struct Step {
    completed: f64,
    backlog: i64,
    p99_ms: f64,
    held: bool,
}

/// Runs 4 producers (each a batch every 10 ms, together the offered rate of each phase: seconds, jobs/s,
/// whether an idle transaction holds an xid meanwhile) and 16 consumers through `plan`;
/// measures every `step` seconds the completed jobs/s, the backlog (enqueued - completed) and
/// the p99 of pickup, from the producer's call to the consumer's claim returning (each
/// payload carries its send time).
fn timeline(pg: &Cluster, way: Way, plan: &[(u64, f64, bool)], step: u64) -> Vec<Step> {
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
    use std::sync::Mutex;
    const PRODUCERS: usize = 4;
    reset(pg);
    let stop = Arc::new(AtomicBool::new(false));
    let rate = Arc::new(AtomicU64::new(plan[0].1.to_bits()));
    let enqueued = Arc::new(AtomicI64::new(0));
    let completed = Arc::new(AtomicI64::new(0));
    let pickups: Arc<Mutex<Vec<u32>>> = Arc::default();
    let epoch = Instant::now();
    let mut threads = Vec::new();
    // Four producers, each a quarter of the rate: one alone cannot offer 1.5x a peak.
    for _ in 0..PRODUCERS {
        let mut c = pg.connect();
        let (stop, rate, enqueued) = (stop.clone(), rate.clone(), enqueued.clone());
        threads.push(std::thread::spawn(move || {
            let st = prepare(&mut c, way);
            let mut owed = 0.0f64;
            let mut tick = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = epoch + Duration::from_millis(10 * tick);
                match due.checked_duration_since(Instant::now()) {
                    Some(wait) => std::thread::sleep(wait),
                    // Behind (it cannot offer this much): what it could not send is not owed
                    // later, when the phase that follows offers less.
                    None => tick = epoch.elapsed().as_millis() as u64 / 10,
                }
                tick += 1;
                owed += f64::from_bits(rate.load(Ordering::Relaxed)) / 100.0 / PRODUCERS as f64;
                let n = owed.floor() as usize;
                if n == 0 {
                    continue;
                }
                owed -= n as f64;
                send_stamped(&mut c, &st, n, epoch);
                enqueued.fetch_add(n as i64, Ordering::Relaxed);
            }
        }));
    }
    // What the producers fall behind by (when the consumers leave them too little of the two
    // cores to offer 1.5x a peak one batch at a time) is made up every 100 ms in batches of up
    // to 10,000 jobs, so the offered load is what the phase says.
    {
        let mut c = pg.connect();
        let (stop, rate, enqueued) = (stop.clone(), rate.clone(), enqueued.clone());
        threads.push(std::thread::spawn(move || {
            let st = prepare(&mut c, way);
            let mut target = 0.0f64;
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                target +=
                    f64::from_bits(rate.load(Ordering::Relaxed)) * last.elapsed().as_secs_f64();
                last = Instant::now();
                let behind = target as i64 - enqueued.load(Ordering::Relaxed);
                // Behind by more than 50 ms of load: the producers cannot keep up.
                let slack = f64::from_bits(rate.load(Ordering::Relaxed)) * 0.05;
                if (behind as f64) < slack {
                    target = target.min(enqueued.load(Ordering::Relaxed) as f64 + slack);
                    continue;
                }
                let mut left = behind;
                while left > 0 && !stop.load(Ordering::Relaxed) {
                    let n = left.min(10_000) as usize;
                    send_stamped(&mut c, &st, n, epoch);
                    enqueued.fetch_add(n as i64, Ordering::Relaxed);
                    left -= n as i64;
                }
            }
        }));
    }
    for _ in 0..16 {
        let (completed, pickups) = (completed.clone(), pickups.clone());
        threads.push(spawn_consumer(
            pg,
            way,
            stop.clone(),
            move |rows, claimed| {
                let now = claimed.duration_since(epoch).as_micros() as i64;
                let waited = rows
                    .iter()
                    .filter_map(|r| r.get::<_, serde_json::Value>(2)["t"].as_i64())
                    .map(|t| (now - t).clamp(0, u32::MAX as i64) as u32);
                pickups.lock().expect("pickups").extend(waited);
                completed.fetch_add(rows.len() as i64, Ordering::Relaxed);
            },
        ));
    }
    let mut steps = Vec::new();
    let mut holder: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)> = None;
    let mut last = 0i64;
    for &(seconds, offered, hold) in plan {
        rate.store(offered.to_bits(), Ordering::Relaxed);
        if hold && holder.is_none() {
            holder = Some(hold_xid(pg));
        } else if !hold {
            if let Some((holding, h)) = holder.take() {
                holding.store(false, Ordering::Relaxed);
                h.join().expect("holder");
            }
        }
        for _ in 0..seconds / step {
            let started = Instant::now();
            std::thread::sleep(Duration::from_secs(step));
            let done = completed.load(Ordering::Relaxed);
            let mut waited = std::mem::take(&mut *pickups.lock().expect("pickups"));
            waited.sort_unstable();
            let p99 = waited
                .get((waited.len() * 99 / 100).min(waited.len().saturating_sub(1)))
                .map_or(0.0, |v| *v as f64 / 1000.0);
            steps.push(Step {
                completed: (done - last) as f64 / started.elapsed().as_secs_f64(),
                backlog: enqueued.load(Ordering::Relaxed) - done,
                p99_ms: p99,
                held: hold,
            });
            last = done;
        }
    }
    if let Some((holding, h)) = holder.take() {
        holding.store(false, Ordering::Relaxed);
        h.join().expect("holder");
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("timeline client");
    }
    steps
}

fn queues(pg: &Cluster, redis: &Redis, jobs: usize, enqueues: usize) {
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>8} {:>10} {:>12} {:>10} {:>12}",
        "jobs/s",
        "pg_keel",
        "keel sync",
        "plain SQL",
        "ratio",
        "sync ratio",
        "pgmq",
        "vs pgmq",
        "redis list"
    );
    for (label, total, batch, clients) in [
        ("enqueue, 1 per call, 4 clients", enqueues, 1, 4),
        ("enqueue, 1 per call, 16 clients", enqueues * 2, 1, 16),
        ("enqueue, 100 per call, 4 clients", enqueues * 5, 100, 4),
    ] {
        // Median of REPEATS runs per side, rotating who goes first.
        let mut ways = vec![Way::Keel, Way::Plain];
        if pgmq() {
            ways.push(Way::Pgmq);
        }
        let mut rates: [Vec<f64>; 4] = Default::default();
        for rep in 0..REPEATS {
            for k in 0..ways.len() {
                let way = ways[(rep + k) % ways.len()];
                rates[way as usize].push(enqueue_rate(pg, way, total, batch, clients));
            }
        }
        let [k, _, p, q] = rates.map(|r| (!r.is_empty()).then(|| median(r)));
        row(
            label,
            k.unwrap_or(0.0),
            None,
            p.unwrap_or(1.0),
            q,
            Some(redis_enqueue(redis, total, batch)),
        );
    }

    // The wake-up relay: producers' commits do not queue behind each other for NOTIFY's lock,
    // and a LISTENing consumer still hears of new jobs within milliseconds.
    let seconds = 5;
    println!(
        "\nwake-ups while 16 producers enqueue 1 job per transaction ({seconds} s; a probe every 20 ms, commit -> LISTEN wake-up)"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12}",
        "", "enqueues/s", "p50 ms", "p99 ms", "max ms"
    );
    for (label, relay) in [
        ("relay (keel.wake_relay = on)", true),
        ("each producer NOTIFYs (off)", false),
    ] {
        let (rate, ms) = wake_under_load(pg, 16, seconds, relay);
        let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q) as usize];
        println!(
            "{label:<34} {rate:>12.0} {:>12.2} {:>12.2} {:>12.2}",
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
    println!();

    for consumers in [1, 4, 16] {
        for batch in [1, 10] {
            let [k, ks, p, q] = rotated(pg, jobs, |way| drain(pg, way, jobs, consumers, batch));
            let r = redis_drain(redis, jobs, consumers, batch as usize);
            row(
                &format!("drain, {consumers:>2} consumers, claim batch {batch:>2}"),
                k.unwrap_or(0.0),
                ks,
                p.unwrap_or(1.0),
                q,
                Some(r),
            );
        }
    }

    // Commit of an enqueue to a LISTENing consumer holding the job.
    let (rate, seconds) = (1000, 5);
    println!(
        "\npickup latency, commit of an enqueue -> a LISTENing consumer holds the job ({rate} jobs/s offered for {seconds} s)"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "", "p50 ms", "p99 ms", "max ms"
    );
    for (label, way) in [
        ("pg_keel", Way::Keel),
        ("plain SQL (INSERT + NOTIFY)", Way::Plain),
    ] {
        let ms = pickup(pg, way, rate, seconds);
        let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q) as usize];
        println!(
            "{label:<34} {:>12.2} {:>12.2} {:>12.2}",
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
    println!();

    // A claimed batch completed in one call: ack_batch beside one DELETE of the batch (pgmq:
    // its delete of an array of ids).
    for consumers in [4, 16] {
        let batch = 10;
        let [k, ks, p, q] = rotated(pg, jobs, |way| {
            drain_with(pg, way, jobs, consumers, batch, Acks::Batch)
        });
        row(
            &format!("ack_batch, {consumers:>2} consumers, batch 10"),
            k.unwrap_or(0.0),
            ks,
            p.unwrap_or(1.0),
            q,
            None,
        );
    }

    steady_section(pg);

    // An under-filled claim after churn, autovacuum off.
    let churned = [100_000, 200_000, 300_000];
    println!(
        "\nclaim of 64 with 10 ready, ms (median of 7): fresh queue, then after jobs churned through it with autovacuum off"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "", "fresh", "100k", "200k", "300k", "300k/fresh"
    );
    let mut ways = vec![("pg_keel", Way::Keel), ("plain SQL", Way::Plain)];
    if pgmq() {
        ways.push(("pgmq", Way::Pgmq));
    }
    for (label, way) in ways {
        let ms = churned_claim(pg, way, &churned);
        println!(
            "{label:<34} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>11.1}x",
            ms[0],
            ms[1],
            ms[2],
            ms[3],
            ms[3] / ms[0]
        );
    }

    // An analytics query holding a REPEATABLE READ snapshot pins the xmin horizon: no dead job
    // row can be vacuumed while it is open.
    println!(
        "\ndrain with 4 consumers, batch 10: normal vs a REPEATABLE READ transaction held open"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12}",
        "", "keel jobs/s", "keel dead", "plain jobs/s", "plain dead"
    );
    for pinned in [false, true] {
        prefill(pg, jobs);
        let mut analytics = pg.connect();
        let mut tx = analytics
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .start()
            .expect("rr");
        if pinned {
            tx.query_one("SELECT count(*) FROM keel.jobs", &[])
                .expect("snapshot");
        }
        let k = drain(pg, Way::Keel, jobs, 4, 10);
        let kd = dead_tuples(pg, Way::Keel);
        let p = drain(pg, Way::Plain, jobs, 4, 10);
        let pd = dead_tuples(pg, Way::Plain);
        tx.rollback().expect("end analytics");
        let label = if pinned {
            "xmin pinned by REPEATABLE READ"
        } else {
            "normal"
        };
        println!("{label:<34} {k:>12.0} {kd:>12} {p:>12.0} {pd:>12}");
    }
}
