//! The example programs in `examples/`, each run by its own language's test runner against this
//! run's cluster and redis-server: the Python worker, web app and outbox consumer (pytest), the
//! Node worker and Express middleware (node's test runner) and the Rust worker. Their
//! dependencies come from `make examples-deps` (pinned by each example's lock file); the
//! examples' tests do the killing and the counting, this file starts them and reports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_pg_test::{exec, one, run, tests, wait_for, Client, Env, DATABASE};

fn main() {
    let tests = tests![python_examples, node_examples, rust_example,];
    run(tests)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root")
        .to_path_buf()
}

/// Runs `program args` in `dir` with the cluster and Redis in the environment; panics with its
/// output unless it exits 0.
fn suite(env: &Env, dir: &Path, program: &Path, args: &[&str]) {
    assert!(
        program.exists() || program.components().count() == 1,
        "{} is missing: run `make examples-deps` first",
        program.display()
    );
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("KEEL_TEST_HOST", "127.0.0.1")
        .env("KEEL_TEST_PORT", env.pg.port.to_string())
        .env("KEEL_TEST_DBNAME", DATABASE)
        .env("REDIS_URL", env.redis.url())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for line in text.lines() {
        println!("    {line}");
    }
    assert!(
        output.status.success(),
        "{} {:?} failed: {}",
        program.display(),
        args,
        output.status
    );
}

fn python_examples(env: &Env) {
    let python = root().join("target/examples/venv/bin/python");
    suite(
        env,
        &root().join("examples/python"),
        &python,
        &["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
    );
}

fn node_examples(env: &Env) {
    suite(
        env,
        &root().join("examples/node"),
        Path::new("node"),
        &[
            "--test",
            "test/app.test.js",
            "test/outbox.test.js",
            "test/worker.test.js",
        ],
    );
}

/// The roles and tables the examples use (each language's tests create them too).
const SETUP: &str = "
    CREATE SCHEMA IF NOT EXISTS examples;
    CREATE TABLE IF NOT EXISTS examples.done (
        job_id bigint PRIMARY KEY, attempt int NOT NULL, payload jsonb NOT NULL);
    DO $$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'example_app') THEN
        CREATE ROLE example_app LOGIN;
      END IF;
    END $$;
    GRANT USAGE ON SCHEMA examples TO example_app;
    GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA examples TO example_app;
    SELECT keel.grant_consumer('example_app');";

/// The Rust worker (`examples/rust`, built by `make examples-deps`): stopped by SIGTERM mid-job
/// it finishes the job in hand and gives the rest back (no lease left to run out); killed, its
/// jobs come back after the lease and another worker does each exactly once; LISTEN wakes it.
fn rust_example(env: &Env) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let binary = target.join("debug/keel-worker");
    assert!(
        binary.exists(),
        "{} is missing: run `make examples-deps` first",
        binary.display()
    );
    let mut c = env.pg.connect();
    exec(&mut c, SETUP);
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname={DATABASE} user=example_app",
        env.pg.port
    );
    let spawn = |queue: &str, extra: &[&str]| {
        Command::new(&binary)
            .args(["--queue", queue])
            .args(extra)
            .env("DATABASE_URL", &conninfo)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start keel-worker")
    };
    let sigterm = |child: &mut Child| {
        let pid = child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success());
        let status = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten())
            .expect("keel-worker did not stop within 10 s of SIGTERM");
        assert!(status.success(), "keel-worker exited with {status}");
    };
    let enqueue = |c: &mut Client, queue: &str, n: usize, sleep_ms: u64| -> Vec<i64> {
        let payloads: Vec<serde_json::Value> = (0..n)
            .map(|i| serde_json::json!({"sleep_ms": sleep_ms, "n": i}))
            .collect();
        c.query("SELECT keel.enqueue_batch($1, $2)", &[&queue, &payloads])
            .expect("enqueue_batch")
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let done = |c: &mut Client, ids: &[i64]| -> (i64, i32) {
        let row = c
            .query_one(
                "SELECT count(*), coalesce(max(attempt), 0) FROM examples.done
                  WHERE job_id = ANY($1)",
                &[&ids],
            )
            .expect("count done");
        (row.get(0), row.get(1))
    };
    let left = |c: &mut Client, queue: &str, state: &str| -> i64 {
        c.query_one(
            "SELECT count(*) FROM keel.jobs WHERE queue = $1 AND state = $2",
            &[&queue, &state],
        )
        .expect("count jobs")
        .get(0)
    };

    // SIGTERM mid-job: 40 jobs of 100 ms, a five-minute lease.
    exec(
        &mut c,
        "SELECT keel.create_queue('rust_sigterm', visibility_timeout => '5 min')",
    );
    let ids = enqueue(&mut c, "rust_sigterm", 40, 100);
    let mut worker = spawn("rust_sigterm", &[]);
    wait_for(Duration::from_secs(30), || {
        (done(&mut c, &ids).0 >= 5).then_some(())
    })
    .expect("5 jobs done");
    sigterm(&mut worker);
    assert_eq!(
        left(&mut c, "rust_sigterm", "running"),
        0,
        "a lease left to run out"
    );
    let stopped_at = done(&mut c, &ids).0;
    assert!(stopped_at < 40);
    let mut second = spawn("rust_sigterm", &[]);
    wait_for(Duration::from_secs(30), || {
        (done(&mut c, &ids).0 == 40).then_some(())
    })
    .expect("every job done");
    sigterm(&mut second);
    println!("    SIGTERM after {stopped_at} of 40 jobs: 40 done once each, 0 lost");

    // SIGKILL mid-job: 20 jobs of 150 ms, a two-second lease.
    exec(
        &mut c,
        "SELECT keel.create_queue('rust_sigkill', visibility_timeout => '2 s')",
    );
    let ids = enqueue(&mut c, "rust_sigkill", 20, 150);
    let mut worker = spawn("rust_sigkill", &[]);
    wait_for(Duration::from_secs(30), || {
        (done(&mut c, &ids).0 >= 3).then_some(())
    })
    .expect("3 jobs done");
    worker.kill().expect("SIGKILL");
    worker.wait().expect("reap");
    let killed_at = done(&mut c, &ids).0;
    let mut second = spawn("rust_sigkill", &[]);
    wait_for(Duration::from_secs(60), || {
        (done(&mut c, &ids).0 == 20).then_some(())
    })
    .expect("every job done");
    sigterm(&mut second);
    let (count, top_attempt) = done(&mut c, &ids);
    assert_eq!(count, 20);
    assert!(top_attempt >= 2, "the killed worker's jobs came back");
    assert_eq!(left(&mut c, "rust_sigkill", "dead"), 0);
    println!("    SIGKILL after {killed_at} of 20 jobs: 20 done once each, 0 lost");

    // LISTEN: woken long before a 30 s poll.
    exec(&mut c, "SELECT keel.create_queue('rust_listen')");
    let mut worker = spawn("rust_listen", &["--poll-interval", "30"]);
    wait_for(Duration::from_secs(30), || {
        let n: i64 = one(
            &mut c,
            "SELECT count(*) FROM pg_stat_activity
              WHERE usename = 'example_app' AND query = 'LISTEN keel_jobs'",
        );
        (n > 0).then_some(())
    })
    .expect("the worker's LISTEN");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let ids = enqueue(&mut c, "rust_listen", 1, 0);
    wait_for(Duration::from_secs(10), || {
        (done(&mut c, &ids).0 == 1).then_some(())
    })
    .expect("the job done");
    let took = started.elapsed();
    sigterm(&mut worker);
    assert!(
        took < Duration::from_secs(2),
        "took {took:?} with a 30 s poll"
    );
    println!("    LISTEN wake-up to done: {} ms", took.as_millis());
}
