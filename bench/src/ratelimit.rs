//! Rate-limit decisions per second: pg_keel's three durabilities beside a bare `SELECT 1` (the
//! cost of a round trip to Postgres), a plain-SQL upsert counter (what people write by hand),
//! and Redis (INCR + EXPIRE pipelined in one round trip, and a Lua token bucket) on the same
//! machine. 1, 4 and 16 clients, over 10,000 keys and over one hot key; each cell runs for
//! KEEL_BENCH_SECONDS (default 1), three times in rounds (median shown), with every call allowed (the limit is far away), so every
//! decision writes its state.
//!
//! Then concurrency limits (`keel.acquire` + `keel.release` pairs): pg_keel's three
//! durabilities beside the hand-written slot table (count the live slots, insert one, delete
//! it) and the usual Redis semaphore (a sorted set of tokens scored by expiry, taken by a Lua
//! script, given back by ZREM), over 10,000 keys with room on every key.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use keel_pg_test::{Cluster, Redis};

const CLIENTS: [usize; 3] = [1, 4, 16];
const KEYS: u64 = 10_000;

const PLAIN_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS plain_counters (
        key          text PRIMARY KEY,
        window_start timestamptz NOT NULL,
        n            integer NOT NULL
    ) WITH (fillfactor = 50)";

/// The hand-written fixed-window counter: one upsert, the caller compares n with the limit.
const PLAIN_UPSERT: &str = "
    INSERT INTO plain_counters AS c (key, window_start, n)
    VALUES ($1, date_trunc('hour', now()), 1)
    ON CONFLICT (key) DO UPDATE
       SET n = CASE WHEN c.window_start = excluded.window_start THEN c.n + 1 ELSE 1 END,
           window_start = excluded.window_start
    RETURNING n <= 1000000000";

/// GCRA in Lua, the usual Redis token bucket: KEYS[1], ARGV = emission interval (ms), burst
/// tolerance (ms), now (ms).
const LUA_BUCKET: &str = r#"
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[3])
local now = tonumber(ARGV[3])
if tat < now then tat = now end
local new = tat + tonumber(ARGV[1])
if new - now > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], new, 'PX', math.max(1, math.ceil(new - now)))
return 1
"#;

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Select1,
    Plain,
    Keel(&'static str),
    RedisIncr,
    RedisLua,
}

impl Way {
    fn label(self) -> String {
        match self {
            Way::Select1 => "SELECT 1".into(),
            Way::Plain => "plain upsert counter".into(),
            Way::Keel(mode) => format!("pg_keel {mode}"),
            Way::RedisIncr => "redis INCR+EXPIRE".into(),
            Way::RedisLua => "redis Lua token bucket".into(),
        }
    }
}

/// xorshift, so each client picks its keys without sharing a generator.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn key(seed: &mut u64, hot: bool) -> String {
    if hot {
        "hot".into()
    } else {
        format!("k{}", next(seed) % KEYS)
    }
}

fn rate(pg: &Cluster, redis: &Redis, way: Way, clients: usize, hot: bool, run: Duration) -> f64 {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let barrier = barrier.clone();
            let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1);
            let mut c = pg.connect();
            let mut r = redis.connection();
            std::thread::spawn(move || {
                let sql = match way {
                    Way::Select1 => "SELECT 1",
                    Way::Plain => PLAIN_UPSERT,
                    Way::Keel("durable") => "SELECT allowed FROM keel.check('bench-durable', $1)",
                    Way::Keel("async") => "SELECT allowed FROM keel.check('bench-async', $1)",
                    Way::Keel(_) => "SELECT allowed FROM keel.check('bench-memory', $1)",
                    Way::RedisIncr | Way::RedisLua => "SELECT 1",
                };
                let stmt = c.prepare(sql).expect("prepare");
                // One call before the clock starts: a new backend loads the extension's library
                // and plans its statements on its first call, which is start-up, not the
                // steady state an application's pooled connections see.
                match way {
                    Way::Plain | Way::Keel(_) => {
                        c.query_one(&stmt, &[&"warm-up"]).expect("warm-up");
                    }
                    _ => {
                        c.query_one(&stmt, &[]).expect("warm-up");
                    }
                }
                let sha: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(LUA_BUCKET)
                    .query(&mut r)
                    .expect("SCRIPT LOAD");
                barrier.wait();
                let started = Instant::now();
                let mut n = 0u64;
                while started.elapsed() < run {
                    for _ in 0..20 {
                        let k = key(&mut seed, hot);
                        match way {
                            Way::Select1 => {
                                c.query_one(&stmt, &[]).expect("SELECT 1");
                            }
                            Way::Plain | Way::Keel(_) => {
                                let ok: bool = c.query_one(&stmt, &[&k]).expect("decide").get(0);
                                assert!(ok, "the benchmark's limits are never reached");
                            }
                            Way::RedisIncr => {
                                let _: (i64, i64) = redis::pipe()
                                    .cmd("INCR")
                                    .arg(&k)
                                    .cmd("EXPIRE")
                                    .arg(&k)
                                    .arg(3600)
                                    .query(&mut r)
                                    .expect("INCR");
                            }
                            Way::RedisLua => {
                                let now = std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map(|d| d.as_millis() as u64)
                                    .unwrap_or(0);
                                let _: i64 = redis::cmd("EVALSHA")
                                    .arg(&sha)
                                    .arg(1)
                                    .arg(format!("lua:{k}"))
                                    .arg(1)
                                    .arg(1_000_000_000)
                                    .arg(now)
                                    .query(&mut r)
                                    .expect("EVALSHA");
                            }
                        }
                        n += 1;
                    }
                }
                (n, started.elapsed())
            })
        })
        .collect();
    barrier.wait();
    total_rate(handles)
}

/// Every way starts from the same state, the steady state of a server that has been
/// deciding for a while: no dead rows left by the way before (the `async` way churns the state
/// table that `durable` uses, and autovacuum would clean up after it during whichever way runs
/// next), and every page of its keys already written once since the last checkpoint. (The
/// first change to a page after a checkpoint writes the whole page to the WAL; a server pays
/// that once per page per checkpoint interval, minutes, but in a 1-second cell right after a
/// checkpoint it would be most of what is measured.)
fn settle(pg: &Cluster, way: Way) {
    let mut c = pg.connect();
    let touch = match way {
        Way::Plain => "INSERT INTO plain_counters AS c (key, window_start, n)
                       SELECT k, date_trunc('hour', now()), 1
                         FROM (SELECT 'k' || i FROM generate_series(0, 9999) i
                               UNION ALL SELECT 'hot') keys(k)
                       ON CONFLICT (key) DO UPDATE SET n = c.n + 1"
            .to_string(),
        Way::Keel(mode) => format!(
            "SELECT count(*)
               FROM (SELECT 'k' || i FROM generate_series(0, 9999) i UNION ALL SELECT 'hot') keys(k),
                    LATERAL keel.check('bench-{mode}', keys.k) d"
        ),
        _ => "SELECT 1".to_string(),
    };
    for sql in [
        "CHECKPOINT",
        &touch,
        "VACUUM keel.rate_limit_state",
        "VACUUM plain_counters",
    ] {
        c.batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

pub fn run(pg: &Cluster, redis: &Redis) {
    let seconds: u64 = std::env::var("KEEL_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let run = Duration::from_secs(seconds);
    {
        let mut c = pg.connect();
        c.batch_execute(PLAIN_SCHEMA).expect("plain counters");
        for mode in ["durable", "async", "memory"] {
            c.batch_execute(&format!(
                "SELECT keel.create_limit('bench-{mode}', 1000000000, '1 hour', 'fixed_window', durability => '{mode}')"
            ))
            .expect("policy");
        }
    }
    let ways = [
        Way::Select1,
        Way::Plain,
        Way::Keel("durable"),
        Way::Keel("async"),
        Way::Keel("memory"),
        Way::RedisIncr,
        Way::RedisLua,
    ];
    println!(
        "\nrate limit: decisions/s, median of 3 runs of {seconds} s per cell, every call allowed (and so written)"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}   {:>10} {:>10} {:>10}",
        "", "10k keys", "", "", "hot key", "", ""
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}   {:>10} {:>10} {:>10}",
        "clients", 1, 4, 16, 1, 4, 16
    );
    // Three rounds over every way and cell, so a slow stretch of this machine's disk does not
    // land on one way only; each cell is the median of its three.
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); 6]; ways.len()];
    for _ in 0..3 {
        for (w, way) in ways.iter().enumerate() {
            settle(pg, *way);
            let mut cell = 0;
            for hot in [false, true] {
                for clients in CLIENTS {
                    samples[w][cell].push(rate(pg, redis, *way, clients, hot, run));
                    cell += 1;
                }
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut at4 = std::collections::HashMap::new();
    let mut all = std::collections::HashMap::new();
    for (w, way) in ways.iter().enumerate() {
        let cells: Vec<f64> = samples[w].iter().map(|c| median(c)).collect();
        at4.insert(way.label(), (cells[1], cells[4]));
        all.insert(way.label(), cells.clone());
        println!(
            "{:<28} {:>10.0} {:>10.0} {:>10.0}   {:>10.0} {:>10.0} {:>10.0}",
            way.label(),
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5]
        );
    }
    let get = |w: Way| at4.get(&w.label()).copied().unwrap_or((0.0, 0.0));
    let (memory, select1) = (get(Way::Keel("memory")), get(Way::Select1));
    let (durable, plain) = (get(Way::Keel("durable")), get(Way::Plain));
    println!(
        "4 clients: memory / SELECT 1 = {:.2}x (10k keys), {:.2}x (hot key); durable / plain upsert = {:.2}x, {:.2}x",
        memory.0 / select1.0,
        memory.1 / select1.1,
        durable.0 / plain.0,
        durable.1 / plain.1,
    );
    // One figure for durable against the upsert over every cell, since a single commit-bound
    // cell moves by about 10% between runs on a small machine.
    let cells = |w: Way| all.get(&w.label()).cloned().unwrap_or_default();
    let (d, p) = (cells(Way::Keel("durable")), cells(Way::Plain));
    if d.len() == p.len() && !d.is_empty() {
        let logs: f64 = d.iter().zip(&p).map(|(d, p)| (d / p).ln()).sum();
        println!(
            "durable / plain upsert over all six cells (geometric mean) = {:.2}x",
            (logs / d.len() as f64).exp()
        );
    }
    run_slots(pg, redis, run);
}

const PLAIN_SLOTS_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS plain_slots (
        key        text NOT NULL,
        token      uuid NOT NULL,
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (key, token)
    )";

/// The hand-written semaphore: a slot while fewer than max are live (not exact under
/// concurrency: two callers can both count max - 1).
const PLAIN_ACQUIRE: &str = "
    INSERT INTO plain_slots (key, token, expires_at)
    SELECT $1, gen_random_uuid(), now() + interval '1 hour'
     WHERE (SELECT count(*) FROM plain_slots WHERE key = $1 AND expires_at > now()) < 1000
    RETURNING token::text";

const PLAIN_RELEASE: &str = "DELETE FROM plain_slots WHERE key = $1 AND token = $2::text::uuid";

/// The usual Redis semaphore: KEYS[1] a sorted set of tokens scored by expiry; ARGV = now (ms),
/// ttl (ms), max, token.
const LUA_SEMAPHORE: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

#[derive(Clone, Copy)]
enum SlotWay {
    Plain,
    Keel(&'static str),
    Redis,
}

impl SlotWay {
    fn label(self) -> String {
        match self {
            SlotWay::Plain => "plain slot table".into(),
            SlotWay::Keel(mode) => format!("pg_keel {mode}"),
            SlotWay::Redis => "redis ZSET semaphore (Lua)".into(),
        }
    }
}

/// Acquire + release pairs per second over 10,000 keys.
fn slot_rate(pg: &Cluster, redis: &Redis, way: SlotWay, clients: usize, run: Duration) -> f64 {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let barrier = barrier.clone();
            let mut seed = 0x2545_f491_4f6c_dd1d ^ (i as u64 + 1);
            let mut tokens = seed.rotate_left(32);
            let mut c = pg.connect();
            let mut r = redis.connection();
            std::thread::spawn(move || {
                let (take, give) = match way {
                    SlotWay::Keel(mode) => (
                        format!("SELECT token::text FROM keel.acquire('slots-{mode}', $1)"),
                        format!("SELECT keel.release('slots-{mode}', $1, $2::text::uuid)"),
                    ),
                    _ => (PLAIN_ACQUIRE.to_string(), PLAIN_RELEASE.to_string()),
                };
                let take = c.prepare(&take).expect("prepare");
                let give = c.prepare(&give).expect("prepare");
                let sha: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(LUA_SEMAPHORE)
                    .query(&mut r)
                    .expect("SCRIPT LOAD");
                let mut pair = |k: &str, c: &mut postgres::Client, r: &mut redis::Connection| {
                    if let SlotWay::Redis = way {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(0);
                        let token = format!("{:016x}", next(&mut tokens));
                        let got: i64 = redis::cmd("EVALSHA")
                            .arg(&sha)
                            .arg(1)
                            .arg(format!("sem:{k}"))
                            .arg(now)
                            .arg(3_600_000)
                            .arg(1000)
                            .arg(&token)
                            .query(r)
                            .expect("EVALSHA");
                        assert_eq!(got, 1, "the benchmark's keys always have room");
                        let _: i64 = redis::cmd("ZREM")
                            .arg(format!("sem:{k}"))
                            .arg(&token)
                            .query(r)
                            .expect("ZREM");
                        return;
                    }
                    let token: Option<String> = c.query_one(&take, &[&k]).expect("acquire").get(0);
                    let token = token.expect("the benchmark's keys always have room");
                    c.execute(&give, &[&k, &token]).expect("release");
                };
                pair("warm-up", &mut c, &mut r);
                barrier.wait();
                let started = Instant::now();
                let mut n = 0u64;
                while started.elapsed() < run {
                    for _ in 0..20 {
                        let k = format!("k{}", next(&mut seed) % KEYS);
                        pair(&k, &mut c, &mut r);
                        n += 1;
                    }
                }
                (n, started.elapsed())
            })
        })
        .collect();
    barrier.wait();
    total_rate(handles)
}

/// The concurrency-limit table of the section (see the module's header).
pub fn run_slots(pg: &Cluster, redis: &Redis, run: Duration) {
    {
        let mut c = pg.connect();
        c.batch_execute(PLAIN_SLOTS_SCHEMA).expect("plain slots");
        for mode in ["durable", "async", "memory"] {
            c.batch_execute(&format!(
                "SELECT keel.create_limit('slots-{mode}', 1000, '1 hour', 'concurrency', durability => '{mode}')"
            ))
            .expect("policy");
        }
    }
    let ways = [
        SlotWay::Plain,
        SlotWay::Keel("durable"),
        SlotWay::Keel("async"),
        SlotWay::Keel("memory"),
        SlotWay::Redis,
    ];
    println!(
        "\nconcurrency limit: acquire + release pairs/s over 10k keys, median of 3 runs of {} s per cell",
        run.as_secs()
    );
    println!("{:<28} {:>10} {:>10} {:>10}", "clients", 1, 4, 16);
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); CLIENTS.len()]; ways.len()];
    for _ in 0..3 {
        for (w, way) in ways.iter().enumerate() {
            for (cell, clients) in CLIENTS.iter().enumerate() {
                samples[w][cell].push(slot_rate(pg, redis, *way, *clients, run));
            }
        }
    }
    let mut at4 = Vec::new();
    for (w, way) in ways.iter().enumerate() {
        let cells: Vec<f64> = samples[w]
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.sort_by(|a, b| a.total_cmp(b));
                c[c.len() / 2]
            })
            .collect();
        at4.push(cells[1]);
        println!(
            "{:<28} {:>10.0} {:>10.0} {:>10.0}",
            way.label(),
            cells[0],
            cells[1],
            cells[2]
        );
    }
    println!(
        "4 clients: memory / plain slot table = {:.2}x, memory / redis = {:.2}x, durable / plain slot table = {:.2}x",
        at4[3] / at4[0],
        at4[3] / at4[4],
        at4[1] / at4[0]
    );
}

/// Calls per second of every client together, once each has run its stretch.
pub fn total_rate(handles: Vec<std::thread::JoinHandle<(u64, Duration)>>) -> f64 {
    handles
        .into_iter()
        .map(|h| {
            let (n, took) = h.join().expect("client");
            n as f64 / took.as_secs_f64()
        })
        .sum()
}
