//! Claims of queues with flow control (issue 17) beside the plain claim: one backlog of jobs
//! in 64 concurrency keys drained by 8 consumers claiming 10 and acking with `ack_batch`, on a
//! queue without settings (the native claim), with `max_running_per_key` (4 per key: 256 may
//! run, so the limit itself never holds a job back and the row shows the path's cost), and
//! with a `rate_limit` whose policy allows every claim (durable, then memory), so every job is
//! charged, and with `fairness => 'round_robin'` over the 64 keys. Median of three drains
//! each, in rounds. Then a small tenant's 10 jobs enqueued behind a big one's 20,000: how long
//! until its first job is claimed, fifo and round robin.

use keel_pg_test::{Client, Cluster};

const JOBS: i64 = 5_000;
const CONSUMERS: usize = 8;
const BATCH: i32 = 10;
const REPEATS: usize = 3;

const SETUP: &str = "
    SELECT keel.create_limit('bench-flow-durable', 1000000000, '1 hour');
    SELECT keel.create_limit('bench-flow-memory', 1000000000, '1 hour', durability => 'memory');
    SELECT keel.create_queue('bench-native');
    SELECT keel.create_queue('bench-keyed', max_running_per_key => 4);
    SELECT keel.create_queue('bench-rated', rate_limit => 'bench-flow-durable');
    SELECT keel.create_queue('bench-rated-mem', rate_limit => 'bench-flow-memory');
    SELECT keel.create_queue('bench-fair', fairness => 'round_robin');
    SELECT keel.create_queue('bench-tenant-fifo');
    SELECT keel.create_queue('bench-tenant-fair', fairness => 'round_robin');";

/// The backlog, inserted directly (the bench runs as the superuser that owns the tables).
const FILL: &str = "
    INSERT INTO keel.jobs (queue, payload, visible_at, enqueued_at, concurrency_key)
    SELECT $1, jsonb_build_object('n', i), now(), now(), 'key-' || (i % 64)
      FROM generate_series(1, $2::bigint) i";

/// CONSUMERS consumers claim BATCH from `queue` (with each job's payload "t") and ack them
/// with one `ack_batch`, until a claim finds nothing; `seen` gets each claim's "t" values.
fn consume(
    pg: &Cluster,
    queue: &'static str,
    seen: impl Fn(&[String]) + Send + Sync + 'static,
) -> f64 {
    let took = crate::parallel(pg, CONSUMERS, move |_, c: &mut Client| loop {
        let rows = c
            .query(
                "SELECT job_id, attempt, coalesce(payload ->> 't', '') FROM keel.claim($1, $2)",
                &[&queue, &BATCH],
            )
            .expect("claim");
        if rows.is_empty() {
            break;
        }
        seen(
            &rows
                .iter()
                .map(|r| r.get::<_, String>(2))
                .collect::<Vec<_>>(),
        );
        let (ids, attempts): (Vec<i64>, Vec<i32>) = rows
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1)))
            .unzip();
        c.execute("SELECT keel.ack_batch($1, $2)", &[&ids, &attempts])
            .expect("ack_batch");
    });
    took.as_secs_f64()
}

fn drain(pg: &Cluster, queue: &'static str) -> f64 {
    JOBS as f64 / consume(pg, queue, |_| {})
}

pub fn run(pg: &Cluster) {
    let mut c = pg.connect();
    c.batch_execute(SETUP).expect("flow setup");
    let paths: [(&str, &'static str); 5] = [
        ("claim, no flow control (native)", "bench-native"),
        ("claim, max_running_per_key 4", "bench-keyed"),
        ("claim, rate_limit (durable)", "bench-rated"),
        ("claim, rate_limit (memory)", "bench-rated-mem"),
        ("claim, round_robin over 64 keys", "bench-fair"),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for rep in 0..REPEATS {
        for k in 0..paths.len() {
            let i = (rep + k) % paths.len();
            let queue = paths[i].1;
            c.execute(FILL, &[&queue, &JOBS]).expect("fill");
            c.batch_execute("VACUUM ANALYZE keel.jobs").expect("vacuum");
            rates[i].push(drain(pg, queue));
        }
    }
    println!(
        "\nFlow control: {JOBS} jobs in 64 keys drained by {CONSUMERS} consumers claiming {BATCH} (jobs/s, median of {REPEATS})"
    );
    println!("{:<34} {:>12} {:>10}", "", "jobs/s", "vs native");
    let native = crate::median(rates[0].clone());
    for (i, (label, _)) in paths.iter().enumerate() {
        let rate = crate::median(rates[i].clone());
        println!("{label:<34} {rate:>12.0} {:>9.2}x", rate / native);
    }
    println!(
        "\nA small tenant's 10 jobs behind a big one's {BIG}: time to its first claim, {CONSUMERS} consumers claiming {BATCH} (median of {REPEATS})"
    );
    for (label, queue) in [
        ("fifo (native claim)", "bench-tenant-fifo"),
        ("round_robin", "bench-tenant-fair"),
    ] {
        let waits: Vec<f64> = (0..REPEATS).map(|_| first_small_claim(pg, queue)).collect();
        println!("{label:<34} {:>9.1} ms", crate::median(waits));
    }
}

const BIG: i64 = 20_000;

/// Fills `queue` with BIG jobs of tenant "big", then 10 of "small"; drains it with CONSUMERS
/// consumers; returns the milliseconds from the start until a claim returned a small job.
fn first_small_claim(pg: &Cluster, queue: &'static str) -> f64 {
    let mut c = pg.connect();
    c.execute(
        "INSERT INTO keel.jobs (queue, payload, visible_at, enqueued_at, concurrency_key)
         SELECT $1, jsonb_build_object('t', 'big'), now(), now(), 'big'
           FROM generate_series(1, $2::bigint)",
        &[&queue, &BIG],
    )
    .expect("fill big");
    c.execute(
        "INSERT INTO keel.jobs (queue, payload, visible_at, enqueued_at, concurrency_key)
         SELECT $1, jsonb_build_object('t', 'small'), now() + interval '1 millisecond',
                now() + interval '1 millisecond', 'small'
           FROM generate_series(1, 10)",
        &[&queue],
    )
    .expect("fill small");
    c.batch_execute("VACUUM ANALYZE keel.jobs").expect("vacuum");
    let started = std::time::Instant::now();
    let first = std::sync::Arc::new(std::sync::Mutex::new(None::<f64>));
    let seen = first.clone();
    consume(pg, queue, move |ts| {
        if ts.iter().any(|t| t == "small") {
            let mut f = seen.lock().expect("first");
            if f.is_none() {
                *f = Some(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
    });
    let at = first.lock().expect("first").unwrap_or(f64::NAN);
    at
}
