//! One launcher, a worker per database, over real connections: a cluster whose launcher serves
//! every database (`keel.database = ''`). Databases with pg_keel get a worker within seconds of
//! CREATE EXTENSION, each dispatching to its own key prefix and keeping its own memory rate
//! limits; databases without it hold no connection; a plain DROP DATABASE and DROP EXTENSION
//! are not stood in the way of; two databases that would share streams by accident are told
//! so; max_worker_processes bounds the workers with a clear log line.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use keel_pg_test::{
    exec, one, restore_tasks, run_tasks_every_second, run_with, tests, wait_for, wait_worker_idle,
    Client, Cluster, Env, DATABASE,
};

fn main() {
    let tests = tests![
        every_database_with_pg_keel_gets_a_worker_of_its_own,
        create_extension_right_after_create_database_always_gets_a_worker,
        memory_rate_limits_are_kept_per_database,
        a_database_created_and_dropped_while_the_cluster_runs,
        a_terminated_launcher_comes_back_with_every_worker,
        a_role_failing_drop_database_in_a_loop_does_not_stop_the_worker,
        two_databases_on_one_redis_with_one_prefix_are_told_apart,
        a_shared_prefix_stays_refused_while_redis_restarts,
        a_prefix_that_could_reach_internal_keys_is_refused,
        a_database_with_its_own_redis_url_dispatches_there,
        keel_database_restricts_the_served_databases_on_reload,
        a_fast_shutdown_is_not_delayed_by_busy_workers,
        max_worker_processes_bounds_the_workers_with_a_clear_log_line,
    ];
    run_with(tests, &["keel.database = ''"])
}

const DEADLINE: Duration = Duration::from_secs(30);

/// Creates `name` (dropped first if it exists), with `keel.redis_prefix` set for it when
/// given, and pg_keel installed when `install`; a connection to it.
fn database(pg: &Cluster, name: &str, prefix: Option<&str>, install: bool) -> Client {
    let mut admin = pg.connect_db("postgres");
    exec(
        &mut admin,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );
    exec(&mut admin, &format!("CREATE DATABASE {name}"));
    if let Some(prefix) = prefix {
        exec(
            &mut admin,
            &format!("ALTER DATABASE {name} SET keel.redis_prefix = '{prefix}'"),
        );
    }
    let mut c = pg.connect_db(name);
    if install {
        exec(&mut c, "CREATE EXTENSION pg_keel");
    }
    c
}

/// Waits until this database's worker is connected and idle; its pid and how long it took.
fn wait_worker(c: &mut Client) -> (i32, Duration) {
    let started = Instant::now();
    let pid = wait_worker_idle(c);
    (pid, started.elapsed())
}

/// pg_keel backends connected to `db`, from pg_stat_activity.
fn keel_backends(pg: &Cluster, db: &str) -> i64 {
    let mut admin = pg.connect_db("postgres");
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'pg_keel'",
            &[&db],
        )
        .expect("pg_stat_activity")
        .get(0)
}

fn stream_len(env: &Env, key: &str) -> usize {
    let mut r = env.redis.connection();
    redis::cmd("XLEN").arg(key).query(&mut r).expect("XLEN")
}

/// Emits one event to `topic` and returns how long it took to be in `key`.
fn emit_and_wait(env: &Env, c: &mut Client, topic: &str, key: &str) -> Duration {
    let before = stream_len(env, key);
    let started = Instant::now();
    c.execute("SELECT keel.emit($1, '{}')", &[&topic])
        .expect("emit");
    wait_for(DEADLINE, || (stream_len(env, key) > before).then_some(()))
        .unwrap_or_else(|| panic!("{topic} did not reach {key}"));
    started.elapsed()
}

fn every_database_with_pg_keel_gets_a_worker_of_its_own(env: &Env) {
    let mut main = env.pg.connect();
    let mut a = database(&env.pg, "app_a", Some("a:"), true);
    let installed = Instant::now();
    let (pid_a, _) = wait_worker(&mut a);
    let took = installed.elapsed();
    let mut b = database(&env.pg, "app_b", Some("b:"), true);
    let (pid_b, _) = wait_worker(&mut b);
    let plain = database(&env.pg, "app_plain", None, false);
    let (pid_main, _) = wait_worker(&mut main);
    let pids: HashSet<i32> = [pid_main, pid_a, pid_b].into();
    assert_eq!(pids.len(), 3, "three databases, three workers");
    // Each database dispatches to its own keys; a committed emit wakes its own worker.
    let mut latencies = Vec::new();
    for _ in 0..5 {
        latencies.push(emit_and_wait(env, &mut main, "t", "keel:t"));
        latencies.push(emit_and_wait(env, &mut a, "t", "a:t"));
        latencies.push(emit_and_wait(env, &mut b, "t", "b:t"));
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    assert_eq!(
        (
            stream_len(env, "keel:t"),
            stream_len(env, "a:t"),
            stream_len(env, "b:t")
        ),
        (5, 5, 5),
        "each database's events in its own stream"
    );
    // The worker's idle wait is 1 s: under it, the commit woke the right worker.
    assert!(
        median < Duration::from_millis(500),
        "commit to Redis took {median:?} (median): the emit did not wake its database's worker"
    );
    // A database without pg_keel: no connection is kept to it, and it drops at once.
    assert_eq!(keel_backends(&env.pg, "app_plain"), 0);
    drop(plain);
    let dropped = Instant::now();
    exec(
        &mut env.pg.connect_db("postgres"),
        "DROP DATABASE app_plain",
    );
    println!(
        "    3 databases served ({DATABASE}, app_a, app_b), worker running {:.1} s after CREATE \
         EXTENSION; commit to Redis median {:.1} ms; a database without pg_keel held no \
         connection (dropped in {:.2} s)",
        took.as_secs_f64(),
        median.as_secs_f64() * 1000.0,
        dropped.elapsed().as_secs_f64()
    );
}

/// The usual provisioning: CREATE DATABASE, then CREATE EXTENSION at once, while the launcher
/// is already looking at the new database (a look that began before the extension committed
/// must not leave the database without a worker).
fn create_extension_right_after_create_database_always_gets_a_worker(env: &Env) {
    const ROUNDS: usize = 6;
    let mut admin = env.pg.connect_db("postgres");
    for round in 0..ROUNDS {
        let mut c = database(&env.pg, "app_p", Some("p:"), true);
        let state = wait_for(DEADLINE, || {
            let row = c
                .query_one("SELECT pid, state FROM keel.worker_status()", &[])
                .ok()?;
            let pid: Option<i32> = row.get(0);
            pid.map(|_| row.get::<_, String>(1))
        });
        assert!(state.is_some(), "round {round}: no worker");
        // Sometimes wait a moment before the next round's CREATE EXTENSION, sometimes not.
        std::thread::sleep(Duration::from_millis(50 * round as u64));
        drop(c);
    }
    exec(&mut admin, "DROP DATABASE app_p WITH (FORCE)");
    println!("    {ROUNDS} databases created with the extension at once: a worker each");
}

fn memory_rate_limits_are_kept_per_database(env: &Env) {
    let mut main = env.pg.connect();
    let mut a = database(&env.pg, "app_mem", Some("mem:"), true);
    wait_worker(&mut a);
    for c in [&mut main, &mut a] {
        exec(
            c,
            "SELECT keel.create_limit('per-db', 3, '1 hour', durability => 'memory')",
        );
    }
    let allowed = |c: &mut Client| -> i64 {
        (0..5)
            .filter(|_| one::<bool>(c, "SELECT allowed FROM keel.check('per-db', 'k')"))
            .count() as i64
    };
    assert_eq!(allowed(&mut main), 3, "the limit in the first database");
    assert_eq!(
        allowed(&mut a),
        3,
        "the same policy name and key in another database is another key"
    );
    assert_eq!(allowed(&mut main), 0);
    // Each database's worker writes its own keys' states.
    for c in [&mut main, &mut a] {
        wait_for(DEADLINE, || {
            let n: i64 = one(
                c,
                "SELECT count(*) FROM keel.rate_limit_state WHERE policy = 'per-db'",
            );
            (n == 1).then_some(())
        })
        .expect("the snapshot of its own database's key");
    }
    exec(&mut main, "SELECT keel.drop_limit('per-db')");
    drop(a);
    exec(
        &mut env.pg.connect_db("postgres"),
        "DROP DATABASE app_mem WITH (FORCE)",
    );
}

fn a_database_created_and_dropped_while_the_cluster_runs(env: &Env) {
    let mut d = database(&env.pg, "app_d", Some("d:"), true);
    let (_, took) = wait_worker(&mut d);
    emit_and_wait(env, &mut d, "t", "d:t");
    // DROP EXTENSION: its worker leaves.
    exec(&mut d, "DROP EXTENSION pg_keel");
    wait_for(DEADLINE, || {
        (keel_backends(&env.pg, "app_d") == 0).then_some(())
    })
    .expect("the worker left after DROP EXTENSION");
    // And comes back with CREATE EXTENSION.
    exec(&mut d, "CREATE EXTENSION pg_keel");
    wait_worker(&mut d);
    drop(d);
    // A plain DROP DATABASE (no FORCE) is not refused because of the worker: it leaves.
    let dropped = Instant::now();
    exec(&mut env.pg.connect_db("postgres"), "DROP DATABASE app_d");
    let drop_took = dropped.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(keel_backends(&env.pg, "app_d"), 0);
    // The others are served as before.
    let mut main = env.pg.connect();
    wait_worker(&mut main);
    emit_and_wait(env, &mut main, "after-drop", "keel:after-drop");
    println!(
        "    app_d: worker {:.1} s after CREATE EXTENSION; left on DROP EXTENSION, back on \
         CREATE EXTENSION; plain DROP DATABASE went through in {:.1} s",
        took.as_secs_f64(),
        drop_took.as_secs_f64()
    );
}

fn a_terminated_launcher_comes_back_with_every_worker(env: &Env) {
    let mut main = env.pg.connect();
    let mut f = database(&env.pg, "app_f", Some("f:"), true);
    let (before_main, _) = wait_worker(&mut main);
    let (before_f, _) = wait_worker(&mut f);
    let terminated = Instant::now();
    exec(
        &mut main,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pg_keel launcher'",
    );
    // Its workers stop with it, and come back with the new launcher.
    let (after_main, _) = wait_for(DEADLINE, || {
        let (pid, took) = wait_worker(&mut main);
        (pid != before_main).then_some((pid, took))
    })
    .expect("a new worker for the test database");
    let (after_f, _) = wait_worker(&mut f);
    assert_ne!(after_f, before_f);
    let took = terminated.elapsed();
    emit_and_wait(env, &mut f, "t", "f:t");
    println!(
        "    launcher terminated: workers {before_main}, {before_f} replaced by {after_main}, \
         {after_f}, dispatching {:.1} s later",
        took.as_secs_f64()
    );
    drop(f);
    exec(
        &mut env.pg.connect_db("postgres"),
        "DROP DATABASE app_f WITH (FORCE)",
    );
}

/// DROP DATABASE takes the database's lock before it checks privileges: a role without any,
/// failing it in a loop, must not make the worker leave (it leaves for a lock held or waited
/// for over 40 ms, as a real DROP DATABASE does for up to 5 s).
fn a_role_failing_drop_database_in_a_loop_does_not_stop_the_worker(env: &Env) {
    let mut h = database(&env.pg, "app_h", Some("h:"), true);
    let (pid, _) = wait_worker(&mut h);
    exec(
        &mut env.pg.connect_db("postgres"),
        "DROP ROLE IF EXISTS nobody_h; CREATE ROLE nobody_h LOGIN",
    );
    let info = env
        .pg
        .conninfo("postgres")
        .replace("user=postgres", "user=nobody_h");
    let mut nobody = Client::connect(&info, postgres::NoTls).expect("connect as nobody_h");
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(5) {
        if nobody.batch_execute("DROP DATABASE app_h").is_err() {
            refused += 1;
        }
    }
    let (after, _) = wait_worker(&mut h);
    assert_eq!(
        after, pid,
        "the worker stayed through {refused} failed DROP DATABASE"
    );
    emit_and_wait(env, &mut h, "t", "h:t");
    println!(
        "    {refused} failed DROP DATABASE by a role without privileges: worker {pid} stayed"
    );
    drop((h, nobody));
    let mut admin = env.pg.connect_db("postgres");
    exec(&mut admin, "DROP DATABASE app_h WITH (FORCE)");
    exec(&mut admin, "DROP ROLE nobody_h");
}

fn two_databases_on_one_redis_with_one_prefix_are_told_apart(env: &Env) {
    // app_e keeps the default prefix, which the test database already dispatches to, and
    // reaches the same Redis by another name.
    let mut admin = env.pg.connect_db("postgres");
    exec(&mut admin, "DROP DATABASE IF EXISTS app_e WITH (FORCE)");
    exec(&mut admin, "CREATE DATABASE app_e");
    let alias = env.redis.url().replace("127.0.0.1", "localhost");
    assert_ne!(alias, env.redis.url());
    exec(
        &mut admin,
        &format!("ALTER DATABASE app_e SET keel.redis_url = '{alias}'"),
    );
    let mut e = env.pg.connect_db("app_e");
    exec(&mut e, "CREATE EXTENSION pg_keel");
    let state = wait_for(DEADLINE, || {
        let state: String = one(&mut e, "SELECT state FROM keel.worker_status()");
        state.starts_with("not dispatching").then_some(state)
    })
    .expect("the worker says it does not dispatch");
    assert!(state.contains(DATABASE), "{state}");
    assert!(state.contains("keel.redis_prefix"), "{state}");
    let health: String = one(
        &mut e,
        "SELECT status FROM keel.health() WHERE \"check\" = 'worker'",
    );
    assert_eq!(health, "critical", "keel.health() says so too");
    let before = stream_len(env, "keel:shared");
    exec(&mut e, "SELECT keel.emit('shared', '{}')");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        stream_len(env, "keel:shared"),
        before,
        "nothing sent into the other database's stream"
    );
    // Given its own prefix, its worker (started again) sends what waited.
    exec(
        &mut env.pg.connect_db("postgres"),
        "ALTER DATABASE app_e SET keel.redis_prefix = 'e:'",
    );
    exec(
        &mut e,
        "SELECT pg_terminate_backend(pid) FROM keel.worker_status() WHERE pid IS NOT NULL",
    );
    wait_for(DEADLINE, || {
        (stream_len(env, "e:shared") == 1).then_some(())
    })
    .expect("sent to e:shared");
    drop(e);
    exec(
        &mut env.pg.connect_db("postgres"),
        "DROP DATABASE app_e WITH (FORCE)",
    );
    println!("    a second database on the same Redis and prefix: refused with {state:?}");
}

/// The refusal does not depend on Redis being up: with Redis down while both workers start
/// again, and when it comes back, only one of the two databases dispatches into the shared
/// streams (whichever claimed the prefix first); the other's events wait.
fn a_shared_prefix_stays_refused_while_redis_restarts(env: &Env) {
    let mut admin = env.pg.connect_db("postgres");
    exec(&mut admin, "DROP DATABASE IF EXISTS app_s WITH (FORCE)");
    exec(&mut admin, "CREATE DATABASE app_s");
    let alias = env.redis.url().replace("127.0.0.1", "localhost");
    exec(
        &mut admin,
        &format!("ALTER DATABASE app_s SET keel.redis_url = '{alias}'"),
    );
    let mut s = env.pg.connect_db("app_s");
    exec(&mut s, "CREATE EXTENSION pg_keel");
    let mut main = env.pg.connect();
    wait_worker(&mut main);
    let refused = |c: &mut Client| -> bool {
        one::<String>(c, "SELECT state FROM keel.worker_status()").starts_with("not dispatching")
    };
    wait_for(DEADLINE, || refused(&mut s).then_some(())).expect("app_s refused");
    env.redis.stop();
    for c in [&mut main, &mut s] {
        exec(
            c,
            "SELECT pg_terminate_backend(pid) FROM keel.worker_status() WHERE pid IS NOT NULL",
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    exec(
        &mut s,
        "SELECT keel.emit('shared-restart', '{\"from\": \"app_s\"}')",
    );
    exec(
        &mut main,
        "SELECT keel.emit('shared-restart', '{\"from\": \"main\"}')",
    );
    env.redis.start_again();
    wait_for(DEADLINE, || {
        (stream_len(env, "keel:shared-restart") >= 1).then_some(())
    })
    .expect("one database's event arrived");
    std::thread::sleep(Duration::from_secs(2));
    let from: Vec<String> = env
        .redis
        .xrange("keel:shared-restart")
        .iter()
        .map(|(_, f)| f["payload"].clone())
        .collect();
    let waiting: i64 = [&mut main, &mut s]
        .into_iter()
        .map(|c| one::<i64>(c, "SELECT count(*) FROM keel.outbox WHERE topic = 'shared-restart' AND state = 'pending'"))
        .sum();
    let refusing: usize = [&mut main, &mut s]
        .into_iter()
        .map(|c| usize::from(refused(c)))
        .sum();
    drop(s);
    exec(&mut admin, "DROP DATABASE app_s WITH (FORCE)");
    assert_eq!(from.len(), 1, "one database's events only: {from:?}");
    assert_eq!(
        (waiting, refusing),
        (1, 1),
        "the other's event waits, and it refuses"
    );
    wait_worker(&mut main);
}

/// pg_keel's own keys start with `keel#`: a prefix with a `#` could make a topic's key one of
/// them, so such a database does not dispatch (and says why).
fn a_prefix_that_could_reach_internal_keys_is_refused(env: &Env) {
    let mut q = database(&env.pg, "app_q", Some("keel#"), true);
    let state = wait_for(DEADLINE, || {
        let state: String = one(&mut q, "SELECT state FROM keel.worker_status()");
        state.contains("must not contain '#'").then_some(state)
    })
    .expect("refused");
    drop(q);
    exec(
        &mut env.pg.connect_db("postgres"),
        "DROP DATABASE app_q WITH (FORCE)",
    );
    println!("    keel.redis_prefix = 'keel#': {state:?}");
}

fn a_database_with_its_own_redis_url_dispatches_there(env: &Env) {
    let other = keel_pg_test::Redis::start();
    let mut admin = env.pg.connect_db("postgres");
    exec(&mut admin, "DROP DATABASE IF EXISTS app_r WITH (FORCE)");
    exec(&mut admin, "CREATE DATABASE app_r");
    exec(
        &mut admin,
        &format!(
            "ALTER DATABASE app_r SET keel.redis_url = '{}'",
            other.url()
        ),
    );
    let mut r = env.pg.connect_db("app_r");
    exec(&mut r, "CREATE EXTENSION pg_keel");
    wait_worker(&mut r);
    let target: String = one(&mut r, "SELECT redis_target FROM keel.worker_status()");
    assert_eq!(target, other.url());
    exec(&mut r, "SELECT keel.emit('own', '{}')");
    let mut conn = other.connection();
    wait_for(DEADLINE, || {
        let n: usize = redis::cmd("XLEN").arg("keel:own").query(&mut conn).ok()?;
        (n == 1).then_some(())
    })
    .expect("the event reached this database's own Redis");
    assert_eq!(stream_len(env, "keel:own"), 0, "and not the cluster's");
    drop(r);
    exec(&mut admin, "DROP DATABASE app_r WITH (FORCE)");
}

fn keel_database_restricts_the_served_databases_on_reload(env: &Env) {
    let mut g = database(&env.pg, "app_g", Some("g:"), true);
    wait_worker(&mut g);
    let mut admin = env.pg.connect_db("postgres");
    exec(
        &mut admin,
        &format!("ALTER SYSTEM SET keel.database = '{DATABASE}'"),
    );
    exec(&mut admin, "SELECT pg_reload_conf()");
    wait_for(DEADLINE, || {
        (keel_backends(&env.pg, "app_g") == 0).then_some(())
    })
    .expect("app_g's worker stopped once it was no longer listed");
    let state: String = one(&mut g, "SELECT state FROM keel.worker_status()");
    assert!(state.contains("not listed in keel.database"), "{state}");
    // Memory policies need a worker: refused where none serves.
    let refused = g
        .batch_execute("SELECT keel.create_limit('mem-g', 5, '1 minute', durability => 'memory'); SELECT keel.check('mem-g', 'k')")
        .err()
        .and_then(|e| e.code().map(|c| c.code().to_string()));
    assert_eq!(refused.as_deref(), Some("55000"));
    exec(&mut admin, "ALTER SYSTEM RESET keel.database");
    exec(&mut admin, "SELECT pg_reload_conf()");
    wait_worker(&mut g);
    drop(g);
    exec(&mut admin, "DROP DATABASE app_g WITH (FORCE)");
}

/// Workers dispatching a burst and running every task each second: a fast shutdown takes
/// them down at once (nothing is started again while the server shuts down).
fn a_fast_shutdown_is_not_delayed_by_busy_workers(env: &Env) {
    let mut main = env.pg.connect();
    wait_worker(&mut main);
    let schedule = run_tasks_every_second(&mut main);
    exec(
        &mut main,
        "SELECT keel.emit('shutdown', jsonb_build_object('n', g)) FROM generate_series(1, 50000) g",
    );
    drop(main);
    let started = Instant::now();
    env.pg.restart();
    let took = started.elapsed();
    let mut main = env.pg.connect();
    restore_tasks(&mut main, &schedule);
    wait_worker(&mut main);
    println!(
        "    pg_ctl restart -m fast while dispatching 50,000 events: {:.1} s",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(20), "the restart took {took:?}");
}

/// A cluster of its own with room for the logical replication launcher, pg_keel's launcher and
/// two workers only.
fn max_worker_processes_bounds_the_workers_with_a_clear_log_line(env: &Env) {
    let pg = Cluster::start(&[
        &format!("keel.redis_url = '{}'", env.redis.url()),
        "keel.database = ''",
        "keel.redis_prefix = 'small:'",
        "max_worker_processes = 4",
        "max_parallel_workers = 0",
    ]);
    let mut x = database(&pg, "app_x", Some("x:"), true);
    wait_worker(&mut x);
    let mut y = database(&pg, "app_y", Some("y:"), true);
    let state = wait_for(DEADLINE, || {
        let state: String = one(&mut y, "SELECT state FROM keel.worker_status()");
        state.contains("max_worker_processes").then_some(state)
    })
    .expect("worker_status says why no worker runs");
    // Logged when it happens twice in a row (the next try, within 10 s).
    wait_for(DEADLINE, || {
        pg.log()
            .lines()
            .any(|l| l.contains("no background worker slot left") && l.contains("\"app_y\""))
            .then_some(())
    })
    .expect("the launcher says so in the log");
    // A slot freed (app_x dropped) lets app_y's worker start.
    drop(x);
    exec(
        &mut pg.connect_db("postgres"),
        "DROP DATABASE app_x WITH (FORCE)",
    );
    // (Its next try is within 10 s; a look at a database without pg_keel may take the slot
    // for a moment first.)
    wait_for(Duration::from_secs(60), || {
        let pid: Option<i32> = one(&mut y, "SELECT pid FROM keel.worker_status()");
        pid
    })
    .expect("app_y's worker started once a slot was free");
    println!("    max_worker_processes = 4: the third database waited with {state:?}");
}
