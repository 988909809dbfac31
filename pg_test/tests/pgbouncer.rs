//! pg_keel behind PgBouncer in transaction pooling mode (Debian's `pgbouncer`): 32 client
//! connections share 4 server connections, so consecutive statements of one client run on
//! different backends. Claims and acks (a lease belongs to the role, not the backend), emits,
//! rate decisions and session validations stay exact. Statements go as unnamed ones
//! (`query_typed`: parse, bind and execute in one round trip), as psycopg with
//! `prepare_threshold=None` and node-postgres send them; LISTEN cannot work through
//! transaction pooling, which is why the examples have a poll-only mode.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_pg_test::{exec, free_port, one, run, tests, wait_for, Client, Env, NoTls, DATABASE};
use postgres::types::{ToSql, Type};

const CLIENTS: usize = 32;
const SERVER_CONNECTIONS: usize = 4;
const ROLE: &str = "bouncer_app";

fn main() {
    let tests = tests![
        claims_and_acks_hand_each_job_out_once_through_transaction_pooling,
        emits_through_transaction_pooling_reach_the_stream_once_each,
        rate_decisions_through_transaction_pooling_are_exact,
        session_validations_through_transaction_pooling,
        the_rust_example_worker_polls_through_transaction_pooling,
    ];
    run(tests)
}

/// A pgbouncer in transaction mode in front of the run's cluster, run as `postgres` when we
/// are root (it refuses to run as root); stopped when dropped.
struct Bouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Bouncer {
    fn start(env: &Env) -> Bouncer {
        let mut c = env.pg.connect();
        exec(
            &mut c,
            &format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
                     CREATE ROLE {ROLE} LOGIN;
                   END IF;
                 END $$;
                 SELECT keel.grant_producer('{ROLE}');
                 SELECT keel.grant_consumer('{ROLE}');
                 SELECT keel.grant_sessions('{ROLE}');"
            ),
        );
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("keel-bouncer-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bouncer dir");
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"{ROLE}\" \"\"\n\"postgres\" \"\"\n"),
        )
        .expect("userlist");
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n{DATABASE} = host=127.0.0.1 port={pg} dbname={DATABASE}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir = {dir}\nauth_type = trust\nauth_file = {dir}/userlist.txt\n\
                 pool_mode = transaction\ndefault_pool_size = {SERVER_CONNECTIONS}\n\
                 max_db_connections = {SERVER_CONNECTIONS}\nmax_client_conn = 200\n\
                 ignore_startup_parameters = extra_float_digits\n\
                 logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
                pg = env.pg.port,
                dir = dir.display(),
            ),
        )
        .expect("pgbouncer.ini");
        let program =
            std::env::var("KEEL_PGBOUNCER").unwrap_or_else(|_| "/usr/sbin/pgbouncer".into());
        let mut command = if root {
            assert!(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown")
                .success());
            let mut c = Command::new("sudo");
            c.args(["-n", "-u", "postgres", "--", &program]);
            c
        } else {
            Command::new(&program)
        };
        let child = command
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let bouncer = Bouncer { child, dir, port };
        wait_for(Duration::from_secs(10), || bouncer.try_connect())
            .expect("pgbouncer did not accept a connection within 10 s");
        bouncer
    }

    fn try_connect(&self) -> Option<Client> {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} dbname={DATABASE} user={ROLE} connect_timeout=5",
                self.port
            ),
            NoTls,
        )
        .ok()
    }

    fn connect(&self) -> Client {
        wait_for(Duration::from_secs(10), || self.try_connect()).expect("connect via pgbouncer")
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // pgbouncer runs under sudo: signal it by its pid file.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each of `CLIENTS` threads runs `body(its index, its own connection through the bouncer)`.
fn in_parallel<T: Send + 'static>(
    bouncer: &Bouncer,
    body: impl Fn(usize, &mut Client) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let body = Arc::new(body);
    let clients: Vec<Client> = (0..CLIENTS).map(|_| bouncer.connect()).collect();
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let body = body.clone();
            std::thread::spawn(move || body(i, &mut c))
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect()
}

/// The server connections pgbouncer opened for the role: never more than its pool.
fn server_connections(env: &Env) -> i64 {
    let mut c = env.pg.connect();
    one(
        &mut c,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"),
    )
}

fn claims_and_acks_hand_each_job_out_once_through_transaction_pooling(env: &Env) {
    let bouncer = Bouncer::start(env);
    let mut admin = env.pg.connect();
    exec(&mut admin, "SELECT keel.create_queue('pgb_jobs')");
    // Producers: 32 clients enqueue 100 jobs each, one per call.
    let ids: Vec<Vec<i64>> = in_parallel(&bouncer, |i, c| {
        (0..100)
            .map(|n| {
                let payload = serde_json::json!({"client": i, "n": n});
                c.query_typed_one(
                    "SELECT keel.enqueue('pgb_jobs', $1)",
                    &[(&payload as &(dyn ToSql + Sync), Type::JSONB)],
                )
                .expect("enqueue through pgbouncer")
                .get(0)
            })
            .collect()
    });
    let enqueued: HashSet<i64> = ids.into_iter().flatten().collect();
    assert_eq!(enqueued.len(), CLIENTS * 100);
    // Consumers: claim 10, ack each; every claim and every ack may run on another backend.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let lost = Arc::new(Mutex::new(0));
    {
        let (acked, lost) = (acked.clone(), lost.clone());
        in_parallel(&bouncer, move |_, c| loop {
            let rows = c
                .query_typed(
                    "SELECT job_id, attempt FROM keel.claim('pgb_jobs', 10)",
                    &[],
                )
                .expect("claim through pgbouncer");
            if rows.is_empty() {
                return;
            }
            for row in rows {
                let (id, attempt): (i64, i32) = (row.get(0), row.get(1));
                let held: bool = c
                    .query_typed_one(
                        "SELECT keel.ack($1, $2)",
                        &[(&id, Type::INT8), (&attempt, Type::INT4)],
                    )
                    .expect("ack through pgbouncer")
                    .get(0);
                if held {
                    acked.lock().expect("acked").push(id);
                } else {
                    *lost.lock().expect("lost") += 1;
                }
            }
        });
    }
    let acked = acked.lock().expect("acked").clone();
    let unique: HashSet<i64> = acked.iter().copied().collect();
    assert_eq!(*lost.lock().expect("lost"), 0, "an ack found no lease");
    assert_eq!(acked.len(), unique.len(), "a job was acked twice");
    assert_eq!(unique, enqueued, "every job acked once");
    let left: i64 = one(
        &mut admin,
        "SELECT count(*) FROM keel.jobs WHERE queue = 'pgb_jobs'",
    );
    assert_eq!(left, 0);
    assert!(server_connections(env) <= SERVER_CONNECTIONS as i64);
    println!(
        "    {} jobs enqueued, claimed and acked by {CLIENTS} clients over {SERVER_CONNECTIONS} server connections: 0 lost, 0 twice",
        unique.len()
    );
}

fn emits_through_transaction_pooling_reach_the_stream_once_each(env: &Env) {
    let bouncer = Bouncer::start(env);
    // Each client: 20 business transactions that commit, 5 that roll back.
    let committed: Vec<Vec<i64>> = in_parallel(&bouncer, |i, c| {
        let mut ids = Vec::new();
        for n in 0..25 {
            let mut tx = c.transaction().expect("begin");
            let payload = serde_json::json!({"client": i, "n": n});
            let id: i64 = tx
                .query_one("SELECT keel.emit('pgb_events', $1)", &[&payload])
                .expect("emit through pgbouncer")
                .get(0);
            if n < 20 {
                tx.commit().expect("commit");
                ids.push(id);
            } else {
                tx.rollback().expect("rollback");
            }
        }
        ids
    });
    let committed: HashSet<String> = committed
        .into_iter()
        .flatten()
        .map(|id| id.to_string())
        .collect();
    let expected = CLIENTS * 20;
    let entries = wait_for(Duration::from_secs(30), || {
        let entries = env.redis.xrange("keel:pgb_events");
        (entries.len() >= expected).then_some(entries)
    })
    .expect("every committed event in the stream");
    let ids: Vec<String> = entries
        .iter()
        .map(|(_, f)| f.get("id").cloned().unwrap_or_default())
        .collect();
    let unique: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), expected, "an event twice in the stream");
    assert_eq!(unique, committed, "exactly the committed events");
    println!(
        "    {expected} committed events once each, {} rolled back never",
        CLIENTS * 5
    );
}

fn rate_decisions_through_transaction_pooling_are_exact(env: &Env) {
    let bouncer = Bouncer::start(env);
    let mut admin = env.pg.connect();
    exec(
        &mut admin,
        // A bucket of 100 refilled over 100 days: nothing refills during the test.
        "SELECT keel.create_limit('pgb_durable', 100, '100 days');
         SELECT keel.create_limit('pgb_memory', 100, '100 days', durability => 'memory');",
    );
    for policy in ["pgb_durable", "pgb_memory"] {
        let allowed: usize = in_parallel(&bouncer, move |_, c| {
            (0..10)
                .filter(|_| {
                    c.query_typed_one(
                        "SELECT allowed FROM keel.check($1, 'tenant-1')",
                        &[(&policy, Type::TEXT)],
                    )
                    .expect("check through pgbouncer")
                    .get::<_, bool>(0)
                })
                .count()
        })
        .into_iter()
        .sum();
        assert_eq!(allowed, 100, "{policy}: 100 of {} allowed", CLIENTS * 10);
    }
}

fn session_validations_through_transaction_pooling(env: &Env) {
    let bouncer = Bouncer::start(env);
    let outcomes: Vec<(usize, usize)> = in_parallel(&bouncer, |i, c| {
        let user = format!("pgb-user-{i}");
        let token: String = c
            .query_typed_one(
                "SELECT token FROM keel.session_create($1, ttl => '1 hour')",
                &[(&user, Type::TEXT)],
            )
            .expect("session_create through pgbouncer")
            .get(0);
        let validate = |c: &mut Client| -> Option<String> {
            c.query_typed_opt(
                "SELECT user_id FROM keel.session_validate($1)",
                &[(&token, Type::TEXT)],
            )
            .expect("session_validate through pgbouncer")
            .map(|r| r.get(0))
        };
        let valid = (0..20)
            .filter(|_| validate(c).as_deref() == Some(&user))
            .count();
        if i % 2 == 0 {
            let revoked: bool = c
                .query_typed_one("SELECT keel.session_revoke($1)", &[(&token, Type::TEXT)])
                .expect("revoke")
                .get(0);
            assert!(revoked);
        }
        let after = (0..5).filter(|_| validate(c).is_some()).count();
        (valid, after)
    });
    for (i, (valid, after)) in outcomes.into_iter().enumerate() {
        assert_eq!(valid, 20, "client {i}: its session valid on every backend");
        assert_eq!(
            after,
            if i % 2 == 0 { 0 } else { 5 },
            "client {i} after revocation"
        );
    }
}

/// `examples/rust`'s worker (built by `make examples-deps`) with `--no-listen`, 3 of them
/// through the bouncer: 300 jobs, each done once.
fn the_rust_example_worker_polls_through_transaction_pooling(env: &Env) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let binary = target.join("debug/keel-worker");
    assert!(
        binary.exists(),
        "{} is missing: run `make examples-deps` first",
        binary.display()
    );
    let bouncer = Bouncer::start(env);
    let mut admin = env.pg.connect();
    exec(
        &mut admin,
        &format!(
            "CREATE SCHEMA IF NOT EXISTS examples;
             CREATE TABLE IF NOT EXISTS examples.done (
                 job_id bigint PRIMARY KEY, attempt int NOT NULL, payload jsonb NOT NULL);
             GRANT USAGE ON SCHEMA examples TO {ROLE};
             GRANT SELECT, INSERT ON examples.done TO {ROLE};
             SELECT keel.create_queue('pgb_worker');"
        ),
    );
    let payloads: Vec<serde_json::Value> = (0..300)
        .map(|n| serde_json::json!({"sleep_ms": 5, "n": n}))
        .collect();
    let ids: Vec<i64> = admin
        .query("SELECT keel.enqueue_batch('pgb_worker', $1)", &[&payloads])
        .expect("enqueue_batch")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname={DATABASE} user={ROLE}",
        bouncer.port
    );
    let mut workers: Vec<Child> = (0..3)
        .map(|_| {
            Command::new(&binary)
                .args([
                    "--queue",
                    "pgb_worker",
                    "--no-listen",
                    "--poll-interval",
                    "0.2",
                ])
                .env("DATABASE_URL", &conninfo)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start keel-worker")
        })
        .collect();
    let done = wait_for(Duration::from_secs(60), || {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM examples.done WHERE job_id = ANY($1)",
                &[&ids],
            )
            .ok()?
            .get(0);
        (n == 300).then_some(n)
    });
    for w in &mut workers {
        let _ = Command::new("kill")
            .args(["-TERM", &w.id().to_string()])
            .status();
    }
    for w in &mut workers {
        let status = wait_for(Duration::from_secs(10), || w.try_wait().ok().flatten());
        assert!(
            status.is_some_and(|s| s.success()),
            "a worker did not stop cleanly on SIGTERM: {status:?}"
        );
    }
    assert_eq!(done, Some(300), "every job done once through pgbouncer");
    let left: i64 = one(
        &mut admin,
        "SELECT count(*) FROM keel.jobs WHERE queue = 'pgb_worker'",
    );
    assert_eq!(left, 0);
}
