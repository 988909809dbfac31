//! Outbox dispatch: pg_keel's worker beside a plain external poller and beside Redis itself.
//!
//! - burst: 50,000 events committed at once; events/s from commit until the last is in Redis
//!   (median of three bursts per side, alternating);
//! - latency: single emits at a low rate; commit-to-Redis p50/p99, seen by a blocking XREAD;
//! - the poller is what people write by hand: every 100 ms (or at once after a full batch)
//!   claim up to 1,000 rows with SKIP LOCKED, pipeline the XADDs, delete the rows, commit;
//! - raw: pipelined XADD of the same entries straight into the same Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_pg_test::{Client, Cluster, Redis};

/// XREAD's reply: streams of (entry id, field/value pairs).
type XreadReply = Option<Vec<(String, Vec<(String, Vec<(String, String)>)>)>>;

const POLL_EVERY: Duration = Duration::from_millis(100);
const POLL_BATCH: i64 = 1000;

const PLAIN_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS plain_outbox (
        id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        topic      text NOT NULL,
        payload    jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )";

/// The hand-written poller; runs until `stop`.
fn poller(mut c: Client, redis: &Redis, stop: Arc<AtomicBool>) {
    let mut r = redis.connection();
    let claim = c
        .prepare(
            "SELECT id, topic, payload::text, created_at::text FROM plain_outbox
              ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .expect("prepare poll");
    while !stop.load(Ordering::Relaxed) {
        let mut tx = c.transaction().expect("begin");
        let rows = tx.query(&claim, &[&POLL_BATCH]).expect("poll");
        if !rows.is_empty() {
            let mut pipe = redis::pipe();
            let mut ids = Vec::with_capacity(rows.len());
            for row in &rows {
                let (id, topic, payload, created): (i64, String, String, String) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                pipe.cmd("XADD")
                    .arg(format!("plain:{topic}"))
                    .arg("*")
                    .arg("id")
                    .arg(id)
                    .arg("payload")
                    .arg(payload)
                    .arg("created_at")
                    .arg(created)
                    .ignore();
                ids.push(id);
            }
            let _: () = pipe.query(&mut r).expect("XADD pipeline");
            tx.execute("DELETE FROM plain_outbox WHERE id = ANY($1)", &[&ids])
                .expect("delete");
        }
        tx.commit().expect("commit");
        if (rows.len() as i64) < POLL_BATCH {
            std::thread::sleep(POLL_EVERY);
        }
    }
}

fn xlen(r: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("XLEN").arg(key).query(r).expect("XLEN")
}

fn wait_len(r: &mut redis::Connection, key: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while xlen(r, key) < n {
        assert!(Instant::now() < deadline, "{key} never reached {n} entries");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Events/s of a burst of `n` events committed in one transaction.
fn burst(pg: &Cluster, redis: &Redis, keel: bool, n: i64) -> f64 {
    let mut c = pg.connect();
    let mut r = redis.connection();
    let (key, sql) = if keel {
        ("keel:burst", format!("SELECT count(keel.emit('burst', jsonb_build_object('n', g))) FROM generate_series(1, {n}) g"))
    } else {
        (
            "plain:burst",
            format!("INSERT INTO plain_outbox (topic, payload) SELECT 'burst', jsonb_build_object('n', g) FROM generate_series(1, {n}) g"),
        )
    };
    let _: () = redis::cmd("DEL").arg(key).query(&mut r).expect("DEL");
    c.batch_execute(&sql).expect("burst");
    let started = Instant::now();
    wait_len(&mut r, key, n);
    n as f64 / started.elapsed().as_secs_f64()
}

/// Commit-to-Redis latency of `n` single emits, one every `gap`; (p50, p99) in ms.
fn latency(pg: &Cluster, redis: &Redis, keel: bool, n: usize, gap: Duration) -> (f64, f64) {
    let key = if keel {
        "keel:latency"
    } else {
        "plain:latency"
    };
    let mut r = redis.connection();
    let _: () = redis::cmd("DEL").arg(key).query(&mut r).expect("DEL");
    let arrivals = Arc::new(Mutex::new(HashMap::<i64, Instant>::new()));
    let reader = {
        let arrivals = arrivals.clone();
        let mut r = redis.connection();
        std::thread::spawn(move || {
            let mut last = "0-0".to_string();
            while arrivals.lock().expect("arrivals").len() < n {
                let reply: XreadReply = redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(5000)
                    .arg("STREAMS")
                    .arg(key)
                    .arg(&last)
                    .query(&mut r)
                    .expect("XREAD");
                let now = Instant::now();
                for (_, entries) in reply.unwrap_or_default() {
                    for (entry_id, fields) in entries {
                        last = entry_id;
                        if let Some((_, id)) = fields.iter().find(|(k, _)| k == "id") {
                            arrivals
                                .lock()
                                .expect("arrivals")
                                .insert(id.parse().expect("id"), now);
                        }
                    }
                }
            }
        })
    };
    let mut c = pg.connect();
    let sql = if keel {
        "SELECT keel.emit('latency', '{\"k\": 1}')"
    } else {
        "INSERT INTO plain_outbox (topic, payload) VALUES ('latency', '{\"k\": 1}') RETURNING id"
    };
    let stmt = c.prepare(sql).expect("prepare");
    let mut commits = HashMap::new();
    for _ in 0..n {
        let id: i64 = c.query_one(&stmt, &[]).expect("emit").get(0);
        commits.insert(id, Instant::now());
        std::thread::sleep(gap);
    }
    reader.join().expect("reader");
    let arrivals = arrivals.lock().expect("arrivals");
    let mut ms: Vec<f64> = commits
        .iter()
        .filter_map(|(id, at)| {
            arrivals
                .get(id)
                .map(|a| a.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    (pick(0.50), pick(0.99))
}

/// Pipelined XADD of `n` entries (1,000 per pipeline) straight into Redis; entries/s.
fn raw_xadd(redis: &Redis, n: i64) -> f64 {
    let mut r = redis.connection();
    let _: () = redis::cmd("DEL")
        .arg("raw:burst")
        .query(&mut r)
        .expect("DEL");
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let mut pipe = redis::pipe();
        for i in sent..(sent + 1000).min(n) {
            pipe.cmd("XADD")
                .arg("raw:burst")
                .arg("*")
                .arg("id")
                .arg(i)
                .arg("payload")
                .arg(format!("{{\"n\": {i}}}"))
                .arg("created_at")
                .arg("2026-11-26T00:00:00Z")
                .ignore();
        }
        let _: () = pipe.query(&mut r).expect("XADD");
        sent = (sent + 1000).min(n);
    }
    n as f64 / started.elapsed().as_secs_f64()
}

pub fn run(pg: &Cluster, redis: &Redis) {
    let n: i64 = std::env::var("KEEL_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let samples: usize = std::env::var("KEEL_BENCH_LATENCY_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    pg.connect()
        .batch_execute(PLAIN_SCHEMA)
        .expect("plain outbox");
    let stop = Arc::new(AtomicBool::new(false));
    let poll = {
        let (c, stop) = (pg.connect(), stop.clone());
        let port = redis.port;
        std::thread::spawn(move || {
            let redis = keel_pg_test::Redis::attach(port);
            poller(c, &redis, stop)
        })
    };
    // Bursts vary a lot between runs on a small machine: the median of three, sides alternating.
    let (mut keel, mut plain, mut raws) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        keel.push(burst(pg, redis, true, n));
        plain.push(burst(pg, redis, false, n));
        raws.push(raw_xadd(redis, n));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (keel_burst, plain_burst, raw) = (median(keel), median(plain), median(raws));
    let gap = Duration::from_millis(20);
    let (k50, k99) = latency(pg, redis, true, samples, gap);
    let (p50, p99) = latency(pg, redis, false, samples, gap);
    stop.store(true, Ordering::Relaxed);
    poll.join().expect("poller");
    println!("\noutbox → Redis stream: burst of {n} events committed at once (median of 3); {samples} single emits 20 ms apart");
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "", "pg_keel", "poller", "raw XADD"
    );
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>12.0}",
        "burst, events/s", keel_burst, plain_burst, raw
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>12}",
        "commit → Redis p50, ms", k50, p50, "-"
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>12}",
        "commit → Redis p99, ms", k99, p99, "-"
    );
}
