//! Flow control over real connections (issue 17): per-key concurrency
//! (`enqueue(..., concurrency_key)` with `max_running_per_key`) and rate-limited queues
//! (`rate_limit`), counted exactly under 8 consumers; what they refuse, with SQLSTATEs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use keel_pg_test::{exec, expect_sqlstates, one, run, sqlstate, tests, Client, Env};

fn main() {
    let tests = tests![
        a_claim_passes_over_a_full_key_and_takes_the_others,
        per_key_concurrency_is_exact_under_8_consumers,
        a_rate_limited_queue_never_hands_out_more_than_its_policy,
        round_robin_serves_a_small_tenant_behind_a_big_one_at_once,
        round_robin_shares_claims_by_weight_and_loses_nothing_under_8_consumers,
        flow_settings_refuse_bad_input_and_change_nothing,
    ];
    run(tests)
}

/// (job_id, attempt, payload's "n")
fn claim(c: &mut Client, queue: &str, batch: i32) -> Vec<(i64, i32, i64)> {
    c.query(
        "SELECT job_id, attempt, (payload ->> 'n')::bigint FROM keel.claim($1, $2)",
        &[&queue, &batch],
    )
    .expect("claim")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

fn ack(c: &mut Client, job_id: i64, attempt: i32) -> bool {
    c.query_one("SELECT keel.ack($1, $2)", &[&job_id, &attempt])
        .expect("ack")
        .get(0)
}

fn enqueue(c: &mut Client, queue: &str, n: i64, key: Option<&str>) -> i64 {
    c.query_one(
        "SELECT keel.enqueue($1, jsonb_build_object('n', $2::bigint), concurrency_key => $3)",
        &[&queue, &n, &key],
    )
    .expect("enqueue")
    .get(0)
}

/// `consumers` connections claim up to 4 from `queue`, hold each job for `hold` and ack it,
/// until 50 claims in a row find nothing; the payloads' "n" of every job acked.
fn consume_all(env: &Env, queue: &'static str, consumers: usize, hold: Duration) -> Vec<i64> {
    let done = Arc::new(Mutex::new(Vec::<i64>::new()));
    let barrier = Arc::new(Barrier::new(consumers));
    let threads: Vec<_> = (0..consumers)
        .map(|_| {
            let mut c = env.pg.connect();
            let (barrier, done) = (barrier.clone(), done.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut idle = 0;
                while idle < 50 {
                    let jobs = claim(&mut c, queue, 4);
                    if jobs.is_empty() {
                        idle += 1;
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    idle = 0;
                    for (id, attempt, n) in jobs {
                        std::thread::sleep(hold);
                        assert!(ack(&mut c, id, attempt), "ack of a held lease");
                        done.lock().unwrap().push(n);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("consumer");
    }
    let mut out = Vec::new();
    std::mem::swap(&mut out, &mut done.lock().unwrap());
    out
}

/// With max_running_per_key = 1: a claim of 10 takes the oldest job of each key and the
/// unkeyed ones, passing over the rest of a key that already has its lease; an ack, or a
/// lease that expires, frees the key for its next job.
fn a_claim_passes_over_a_full_key_and_takes_the_others(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('one-each', visibility_timeout => '1 second', max_running_per_key => 1)",
    );
    for (n, key) in [
        (1, Some("a")),
        (2, Some("a")),
        (3, Some("a")),
        (4, Some("b")),
        (5, None),
        (6, None),
    ] {
        enqueue(&mut c, "one-each", n, key);
    }
    let first = claim(&mut c, "one-each", 10);
    let ns: Vec<i64> = first.iter().map(|j| j.2).collect();
    assert_eq!(
        ns,
        [1, 4, 5, 6],
        "the oldest of a and b, and every unkeyed job"
    );
    assert!(claim(&mut c, "one-each", 10).is_empty(), "a and b are held");
    assert!(ack(&mut c, first[0].0, first[0].1));
    assert_eq!(
        claim(&mut c, "one-each", 10)
            .iter()
            .map(|j| j.2)
            .collect::<Vec<_>>(),
        [2],
        "the ack freed a"
    );
    // b's lease runs out (1 s): it can no longer be extended (a claim may give b's place to
    // another job), and b's job comes back, attempt 2.
    std::thread::sleep(Duration::from_millis(1200));
    let b_first = first.iter().find(|j| j.2 == 4).expect("b");
    let extended: Option<f64> = c
        .query_one(
            "SELECT extract(epoch FROM keel.extend($1, $2, '1 minute'))::float8",
            &[&b_first.0, &b_first.1],
        )
        .unwrap()
        .get(0);
    assert_eq!(extended, None, "an expired keyed lease is not extended");
    let again = claim(&mut c, "one-each", 10);
    let b = again.iter().find(|j| j.2 == 4).expect("b's job again");
    assert_eq!(b.1, 2, "second attempt");
    // The keyed jobs keep their key; the unkeyed have none.
    let keys: Vec<(i64, Option<String>)> = c
        .query(
            "SELECT (payload ->> 'n')::bigint, concurrency_key FROM keel.jobs
              WHERE queue = 'one-each' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(keys[0], (2, Some("a".into())));
    assert_eq!(keys.last().unwrap().1, None);
}

/// 8 consumers claim up to 4, hold each job 3 ms and ack, on a queue of 3 keys × 40 jobs and
/// 40 unkeyed ones with max_running_per_key = 2. A watcher reads the live leases per key all
/// along, in one snapshot each time: never more than 2. Every job is done exactly once.
fn per_key_concurrency_is_exact_under_8_consumers(env: &Env) {
    const CONSUMERS: usize = 8;
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('per-key', max_running_per_key => 2, keep_finished => '1 hour')",
    );
    let mut n = 0;
    for key in ["k1", "k2", "k3"] {
        for _ in 0..40 {
            n += 1;
            enqueue(&mut c, "per-key", n, Some(key));
        }
    }
    for _ in 0..40 {
        n += 1;
        enqueue(&mut c, "per-key", n, None);
    }
    let total = n;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let mut c = env.pg.connect();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most: HashMap<String, i64> = HashMap::new();
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                for r in c
                    .query(
                        "SELECT concurrency_key, count(*) FROM keel.jobs
                          WHERE queue = 'per-key' AND state = 'running'
                            AND concurrency_key IS NOT NULL AND visible_at > now()
                          GROUP BY 1",
                        &[],
                    )
                    .expect("watch")
                {
                    let (k, n): (String, i64) = (r.get(0), r.get(1));
                    let m = most.entry(k).or_default();
                    *m = (*m).max(n);
                }
                reads += 1;
            }
            (most, reads)
        })
    };
    let started = Instant::now();
    let mut done = consume_all(env, "per-key", CONSUMERS, Duration::from_millis(3));
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (most, reads) = watcher.join().expect("watcher");
    done.sort();
    println!(
        "    {CONSUMERS} consumers, 3 keys × 40 jobs + 40 unkeyed, max_running_per_key 2: {} done in {took:?}; most live leases per key in {reads} reads: {most:?}",
        done.len()
    );
    assert_eq!(done, (1..=total).collect::<Vec<_>>(), "every job once");
    assert!(most.values().all(|m| *m <= 2), "{most:?}");
    assert!(
        most.values().any(|m| *m == 2),
        "the limit was reached: {most:?}"
    );
}

/// A queue claiming through a fixed window of 10 per 2 seconds: 8 consumers claiming as fast
/// as they can for 5 seconds never get more than 10 jobs in one window (counted from the jobs'
/// claimed_at, windows aligned as the limiter aligns them), jobs keyed by concurrency_key are
/// limited per key, and keel.queue_stats says when the next claim is allowed.
fn a_rate_limited_queue_never_hands_out_more_than_its_policy(env: &Env) {
    const CONSUMERS: usize = 8;
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('claims', 10, '2 seconds', 'fixed_window', log_denials => false);
         SELECT keel.create_queue('limited', rate_limit => 'claims', keep_finished => '1 hour')",
    );
    for n in 0..200 {
        let key = match n % 4 {
            0 => Some("tenant-a"),
            1 => Some("tenant-b"),
            _ => None,
        };
        enqueue(&mut c, "limited", n, key);
    }
    let barrier = Arc::new(Barrier::new(CONSUMERS));
    let until = Instant::now() + Duration::from_secs(5);
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| {
            let mut c = env.pg.connect();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut got = 0;
                while Instant::now() < until {
                    let jobs = claim(&mut c, "limited", 5);
                    if jobs.is_empty() {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    for (id, attempt, _) in jobs {
                        assert!(ack(&mut c, id, attempt));
                        got += 1;
                    }
                }
                got
            })
        })
        .collect();
    let claimed: i64 = consumers
        .into_iter()
        .map(|h| h.join().expect("consumer"))
        .sum();
    // Windows of 2 s from 2000-01-01 00:00 UTC, per rate key (the concurrency key, else the
    // queue).
    let windows: Vec<(String, f64, i64)> = c
        .query(
            "SELECT coalesce(concurrency_key, queue),
                    floor(extract(epoch FROM claimed_at - timestamptz '2000-01-01 00:00:00+00') / 2)::float8,
                    count(*)
               FROM keel.jobs WHERE queue = 'limited' AND state = 'done'
              GROUP BY 1, 2 ORDER BY 2, 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    println!(
        "    rate-limited queue, 10 per 2 s per key, {CONSUMERS} consumers for 5 s: {claimed} claimed; per window and key: {:?}",
        windows.iter().map(|w| (w.0.as_str(), w.2)).collect::<Vec<_>>()
    );
    assert!(
        windows.iter().all(|w| w.2 <= 10),
        "never more than the policy: {windows:?}"
    );
    for key in ["limited", "tenant-a", "tenant-b"] {
        let most = windows.iter().filter(|w| w.0 == key).map(|w| w.2).max();
        assert_eq!(most, Some(10), "{key} reached its limit in some window");
    }
    assert!(claimed < 200, "the limit held jobs back: {claimed}");
    // The queue's own key is spent in this window: queue_stats says when it is allowed again.
    loop {
        let got = claim(&mut c, "limited", 20);
        if got.is_empty() {
            break;
        }
        for (id, attempt, _) in got {
            ack(&mut c, id, attempt);
        }
    }
    let wait: f64 = one(
        &mut c,
        "SELECT coalesce(extract(epoch FROM next_allowed_at - now()), -1)::float8
           FROM keel.queue_stats WHERE queue = 'limited'",
    );
    assert!(
        (0.0..=2.0).contains(&wait),
        "next_allowed_at within the window: {wait}"
    );
    let unlimited: Option<f64> = one(
        &mut c,
        "SELECT extract(epoch FROM next_allowed_at)::float8 FROM keel.queue_stats WHERE queue = 'one-each'",
    );
    assert_eq!(unlimited, None, "NULL without a rate_limit");
}

fn flow_settings_refuse_bad_input_and_change_nothing(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('flow-slots', 2, '1 minute', 'concurrency');
         SELECT keel.create_limit('flow-rate', 5, '1 minute');
         SELECT keel.create_queue('flow-bad', max_running_per_key => 1);
         SELECT keel.create_queue('flow-plain')",
    );
    let snapshot = |c: &mut Client| -> (i64, String) {
        (
            one(c, "SELECT count(*) FROM keel.jobs WHERE queue LIKE 'flow-%'"),
            one(
                c,
                "SELECT string_agg(queue || ':' || coalesce(max_running_per_key::text, '-') || ':' || coalesce(rate_limit, '-'), ',' ORDER BY queue)
                   FROM keel.queues WHERE queue LIKE 'flow-%'",
            ),
        )
    };
    let before = snapshot(&mut c);
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT keel.create_queue('flow-x', max_running_per_key => 0)", "22023"),
            ("SELECT keel.create_queue('flow-x', rate_limit => 'nope')", "42704"),
            ("SELECT keel.create_queue('flow-x', rate_limit => 'flow-slots')", "42809"),
            ("SELECT keel.alter_queue('flow-bad', max_running_per_key => -1)", "22023"),
            (
                "SELECT keel.alter_queue('flow-bad', max_running_per_key => 3, clear_max_running_per_key => true)",
                "22023",
            ),
            (
                "SELECT keel.alter_queue('flow-bad', rate_limit => 'flow-rate', clear_rate_limit => true)",
                "22023",
            ),
            ("SELECT keel.alter_queue('flow-bad', rate_limit => 'nope')", "42704"),
            ("SELECT keel.enqueue('flow-bad', '{}', concurrency_key => '')", "22023"),
            (
                "SELECT keel.enqueue('flow-bad', '{}', concurrency_key => repeat('k', 1025))",
                "22023",
            ),
            (
                "SELECT keel.enqueue('flow-bad', '{}', idempotency_key => 'i', concurrency_key => 'k')",
                "0A000",
            ),
            (
                "SELECT keel.enqueue('flow-bad', '{}', after => ARRAY[1]::bigint[], concurrency_key => 'k')",
                "0A000",
            ),
            (
                "SELECT * FROM keel.claim(ARRAY['flow-plain', 'flow-bad'])",
                "0A000",
            ),
            ("SELECT keel.create_queue('flow-x', fairness => 'lifo')", "22023"),
            ("SELECT keel.create_queue('flow-x', fairness => NULL)", "22023"),
            ("SELECT keel.alter_queue('flow-bad', fairness => 'random')", "22023"),
            ("SELECT keel.set_key_weight('nope', 'k', 2)", "42704"),
            ("SELECT keel.set_key_weight('flow-bad', '', 2)", "22023"),
            ("SELECT keel.set_key_weight('flow-bad', NULL, 2)", "22023"),
            ("SELECT keel.set_key_weight('flow-bad', repeat('k', 1025), 2)", "22023"),
            ("SELECT keel.set_key_weight('flow-bad', 'k', 0)", "22023"),
            ("SELECT keel.set_key_weight('flow-bad', 'k', 1000001)", "22023"),
            ("SELECT keel.set_key_weight('flow-bad', 'k', NULL)", "22023"),
        ],
    );
    assert_eq!(snapshot(&mut c), before, "bad input changed nothing");
    // A policy a queue claims through is neither dropped nor made a concurrency limit.
    exec(
        &mut c,
        "SELECT keel.alter_queue('flow-plain', rate_limit => 'flow-rate')",
    );
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT keel.drop_limit('flow-rate')", "2BP01"),
            (
                "SELECT keel.alter_limit('flow-rate', algorithm => 'concurrency')",
                "2BP01",
            ),
        ],
    );
    exec(
        &mut c,
        "SELECT keel.alter_queue('flow-plain', clear_rate_limit => true);
         SELECT keel.alter_queue('flow-bad', clear_max_running_per_key => true)",
    );
    assert!(one::<bool>(&mut c, "SELECT keel.drop_limit('flow-rate')"));
    let settings: String = one(
        &mut c,
        "SELECT string_agg(coalesce(max_running_per_key::text, '-') || ':' || coalesce(rate_limit, '-'), ',')
           FROM keel.queues WHERE queue IN ('flow-bad', 'flow-plain')",
    );
    assert_eq!(settings, "-:-,-:-");
    // Without flow settings again, the queue claims natively, keys and all.
    enqueue(&mut c, "flow-bad", 1, Some("k"));
    enqueue(&mut c, "flow-bad", 2, Some("k"));
    assert_eq!(claim(&mut c, "flow-bad", 5).len(), 2);
    // A rate limit in shadow mode holds nothing back.
    exec(
        &mut c,
        "SELECT keel.create_limit('flow-shadow', 1, '1 hour', enforce => false, log_denials => false);
         SELECT keel.create_queue('flow-shadowed', rate_limit => 'flow-shadow');
         SELECT keel.enqueue('flow-shadowed', jsonb_build_object('n', i)) FROM generate_series(1, 5) i",
    );
    assert_eq!(
        claim(&mut c, "flow-shadowed", 10).len(),
        5,
        "shadow: every job"
    );
    let next: f64 = one(
        &mut c,
        "SELECT extract(epoch FROM next_allowed_at - now())::float8 FROM keel.queue_stats WHERE queue = 'flow-shadowed'",
    );
    assert!(next <= 0.0, "shadow: allowed now ({next})");
    // A read-only transaction cannot claim from a flow queue either.
    exec(
        &mut c,
        "SELECT keel.alter_queue('flow-bad', max_running_per_key => 1)",
    );
    // Under REPEATABLE READ a flow claim is refused (its counts need fresh snapshots).
    exec(&mut c, "BEGIN ISOLATION LEVEL REPEATABLE READ");
    assert_eq!(
        sqlstate(c.query("SELECT * FROM keel.claim('flow-bad')", &[])).as_deref(),
        Some("0A000")
    );
    exec(&mut c, "ROLLBACK");
    exec(&mut c, "BEGIN READ ONLY");
    assert_eq!(
        sqlstate(c.query("SELECT * FROM keel.claim('flow-bad')", &[])).as_deref(),
        Some("25006")
    );
    exec(&mut c, "ROLLBACK");
}

/// Key order of the jobs one consumer gets, claiming 10 at a time and acking.
fn drain_keys(c: &mut Client, queue: &str, claims: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for _ in 0..claims {
        let rows = c
            .query(
                "SELECT c.job_id, c.attempt, j.concurrency_key
                   FROM keel.claim($1, 10) c JOIN keel.jobs j USING (job_id)",
                &[&queue],
            )
            .expect("claim");
        for r in &rows {
            keys.push(r.get::<_, Option<String>>(2).unwrap_or_default());
            assert!(ack(c, r.get(0), r.get(1)));
        }
    }
    keys
}

/// 2,000 jobs of one tenant, then 10 of another: a round_robin queue's first claim of 10 holds
/// 5 of each, where a fifo queue hands the small tenant's jobs out after the 2,000.
fn round_robin_serves_a_small_tenant_behind_a_big_one_at_once(env: &Env) {
    let mut c = env.pg.connect();
    for (queue, fairness) in [("fair-rr", "round_robin"), ("fair-fifo", "fifo")] {
        exec(
            &mut c,
            &format!("SELECT keel.create_queue('{queue}', fairness => '{fairness}')"),
        );
        exec(
            &mut c,
            &format!(
                "SELECT keel.enqueue('{queue}', jsonb_build_object('n', i), concurrency_key => 'big')
                   FROM generate_series(1, 2000) i;
                 SELECT keel.enqueue('{queue}', jsonb_build_object('n', i), concurrency_key => 'small')
                   FROM generate_series(1, 10) i"
            ),
        );
    }
    let rr = drain_keys(&mut c, "fair-rr", 3);
    let first: Vec<&str> = rr[..10].iter().map(|k| k.as_str()).collect();
    assert_eq!(
        first.iter().filter(|k| **k == "small").count(),
        5,
        "round robin: {first:?}"
    );
    assert_eq!(
        rr.iter().filter(|k| *k == "small").count(),
        10,
        "all 10 within 3 claims"
    );
    let fifo = drain_keys(&mut c, "fair-fifo", 3);
    assert!(fifo.iter().all(|k| k == "big"), "fifo keeps claim order");
    // The small tenant done, the big one goes on alone.
    let after = drain_keys(&mut c, "fair-rr", 2);
    assert!(after.iter().all(|k| k == "big") && after.len() == 20);
    let places: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.queue_keys WHERE queue = 'fair-rr'",
    );
    assert_eq!(places, 2, "each key has its place in the round");
}

/// Weights 3 and 1: 40 jobs claimed 10 at a time are 30 and 10. Then 8 consumers drain 5 keys
/// of 100 jobs each in a round_robin queue with max_running_per_key 3: every job once.
fn round_robin_shares_claims_by_weight_and_loses_nothing_under_8_consumers(env: &Env) {
    const CONSUMERS: usize = 8;
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('fair-weighted', fairness => 'round_robin');
         SELECT keel.set_key_weight('fair-weighted', 'heavy', 3);
         SELECT keel.enqueue('fair-weighted', jsonb_build_object('n', i), concurrency_key => 'light')
           FROM generate_series(1, 400) i;
         SELECT keel.enqueue('fair-weighted', jsonb_build_object('n', i), concurrency_key => 'heavy')
           FROM generate_series(1, 400) i",
    );
    let keys = drain_keys(&mut c, "fair-weighted", 4);
    let heavy = keys.iter().filter(|k| *k == "heavy").count();
    println!(
        "    weights 3 and 1, 40 jobs claimed 10 at a time: {heavy} heavy, {} light",
        keys.len() - heavy
    );
    assert_eq!((heavy, keys.len() - heavy), (30, 10));
    exec(
        &mut c,
        "SELECT keel.create_queue('fair-many', fairness => 'round_robin', max_running_per_key => 3)",
    );
    let mut n = 0i64;
    for k in 0..5 {
        for _ in 0..100 {
            n += 1;
            enqueue(&mut c, "fair-many", n, Some(&format!("t{k}")));
        }
    }
    let mut done = consume_all(env, "fair-many", CONSUMERS, Duration::ZERO);
    done.sort();
    assert_eq!(done, (1..=n).collect::<Vec<_>>(), "every job once");
}
