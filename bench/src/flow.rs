//! Claims of queues with flow control (issue 17) beside the plain claim: one backlog of jobs
//! in 64 concurrency keys drained by 8 consumers claiming 10 and acking with `ack_batch`, on a
//! queue without settings (the native claim), with `max_running_per_key` (4 per key: 256 may
//! run, so the limit itself never holds a job back and the row shows the path's cost), and
//! with a `rate_limit` whose policy allows every claim (durable, then memory), so every job is
//! charged. Median of three drains each, in rounds.

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
    SELECT keel.create_queue('bench-rated-mem', rate_limit => 'bench-flow-memory');";

/// The backlog, inserted directly (the bench runs as the superuser that owns the tables).
const FILL: &str = "
    INSERT INTO keel.jobs (queue, payload, visible_at, enqueued_at, concurrency_key)
    SELECT $1, jsonb_build_object('n', i), now(), now(), 'key-' || (i % 64)
      FROM generate_series(1, $2::bigint) i";

fn drain(pg: &Cluster, queue: &'static str) -> f64 {
    let took = crate::parallel(pg, CONSUMERS, move |_, c: &mut Client| loop {
        let rows = c
            .query(
                "SELECT job_id, attempt FROM keel.claim($1, $2)",
                &[&queue, &BATCH],
            )
            .expect("claim");
        if rows.is_empty() {
            break;
        }
        let (ids, attempts): (Vec<i64>, Vec<i32>) = rows
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1)))
            .unzip();
        c.execute("SELECT keel.ack_batch($1, $2)", &[&ids, &attempts])
            .expect("ack_batch");
    });
    JOBS as f64 / took.as_secs_f64()
}

pub fn run(pg: &Cluster) {
    let mut c = pg.connect();
    c.batch_execute(SETUP).expect("flow setup");
    let paths: [(&str, &'static str); 4] = [
        ("claim, no flow control (native)", "bench-native"),
        ("claim, max_running_per_key 4", "bench-keyed"),
        ("claim, rate_limit (durable)", "bench-rated"),
        ("claim, rate_limit (memory)", "bench-rated-mem"),
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
}
