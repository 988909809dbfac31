//! Operating it, over real connections: `keel.health()` runs the incident playbook on pg_keel's
//! own objects (and turns warn or critical in the incidents each check is for),
//! `keel.metrics()` is Prometheus text that a Prometheus text parser reads, and
//! `keel.task_runs` keeps the history of maintenance runs for its retention only.

use std::collections::HashMap;
use std::time::Duration;

use keel_pg_test::{
    exec, one, restore_tasks, run_tasks_every_second, run_with, tests, wait_for, wait_worker_idle,
    Client, Env,
};

fn main() {
    let tests = tests![
        health_has_a_row_per_check_with_its_figure,
        health_warns_in_the_incidents_its_checks_are_for,
        health_sees_redis_go_away_and_evict,
        metrics_are_prometheus_text_a_parser_reads,
        task_runs_keep_each_run_for_the_retention_only,
        a_monitoring_role_needs_no_more_than_grant_monitor,
    ];
    run_with(tests, &["keel.database = ''"])
}

const DEADLINE: Duration = Duration::from_secs(30);

/// check → (status, detail, value).
type Health = HashMap<String, (String, String, Option<f64>)>;

fn health(c: &mut Client) -> Health {
    c.query(
        "SELECT \"check\", status, detail, value FROM keel.health()",
        &[],
    )
    .expect("health")
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
    .collect()
}

/// Waits until `check` has `status`; its row.
fn wait_status(c: &mut Client, check: &str, status: &str) -> (String, String, Option<f64>) {
    wait_for(DEADLINE, || {
        health(c).remove(check).filter(|(s, _, _)| s == status)
    })
    .unwrap_or_else(|| {
        panic!(
            "{check} did not become {status}: {:?}",
            health(c).remove(check)
        )
    })
}

fn health_has_a_row_per_check_with_its_figure(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    exec(&mut c, "SELECT keel.create_queue('h-ok')");
    let h = wait_for(DEADLINE, || {
        let h = health(&mut c);
        h.contains_key("redis:role").then_some(h)
    })
    .expect("the worker read Redis' INFO");
    for check in [
        "worker",
        "queue:h-ok:oldest_ready",
        "queue:h-ok:expired_leases",
        "queue:h-ok:dead",
        "outbox:oldest_pending",
        "outbox:dead",
        "redis:reachable",
        "redis:secret",
        "redis:role",
        "redis:eviction_policy",
        "redis:memory",
        "redis:evicted_keys",
        "xmin_horizon",
        "lock_waits",
        "task:reap_expired",
        "rate_limits:denials",
    ] {
        let (status, detail, _) = h
            .get(check)
            .unwrap_or_else(|| panic!("no {check} in {h:?}"));
        assert_eq!(status, "ok", "{check}: {detail}");
        assert!(!detail.is_empty(), "{check} says what it saw");
    }
    assert!(h.keys().any(|k| k.starts_with("dead_tuples:")));
    assert!(
        h.values()
            .all(|(s, _, _)| ["ok", "warn", "critical"].contains(&s.as_str())),
        "{h:?}"
    );
    println!("    {} checks, all ok on a quiet cluster", h.len());
}

fn health_warns_in_the_incidents_its_checks_are_for(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('h-bad', max_attempts => 1);
         SELECT keel.enqueue_batch('h-bad', ARRAY['{}', '{}', '{}']::jsonb[]);
         -- a backlog two minutes old
         UPDATE keel.jobs SET visible_at = now() - interval '2 minutes' WHERE queue = 'h-bad';
         -- a lease that ran out a minute and a half ago
         SELECT keel.claim('h-bad', 1, '1 millisecond');
         UPDATE keel.jobs SET visible_at = now() - interval '90 seconds'
          WHERE queue = 'h-bad' AND state = 'running';
         -- a job that went dead
         SELECT keel.fail(job_id, attempt, 'boom') FROM keel.claim('h-bad', 1)",
    );
    let h = health(&mut c);
    let (status, detail, value) = &h["queue:h-bad:oldest_ready"];
    assert_eq!(status, "warn", "{detail}");
    assert!(value.is_some_and(|v| v >= 60.0), "{value:?}");
    assert_eq!(h["queue:h-bad:expired_leases"].0, "warn");
    assert_eq!(h["queue:h-bad:dead"].0, "warn");
    // A transaction held open elsewhere: the xmin horizon check names its pid.
    let mut holder = env.pg.connect();
    // (Idle in a READ COMMITTED transaction that has a transaction id: no snapshot, but the
    // horizon is held all the same.)
    exec(&mut holder, "BEGIN; SELECT txid_current()");
    let pid: i32 = one(&mut holder, "SELECT pg_backend_pid()");
    let (_, detail, _) = &health(&mut c)["xmin_horizon"];
    assert!(detail.contains(&format!("pid {pid}")), "{detail}");
    // A task run that failed.
    exec(
        &mut c,
        "INSERT INTO keel.task_runs (task, started_at, duration, rows, error)
         VALUES ('cleanup_outbox', clock_timestamp(), '1 ms', 0, 'simulated failure')",
    );
    assert_eq!(health(&mut c)["task:cleanup_outbox"].0, "warn");
    exec(&mut holder, "COMMIT");
    exec(
        &mut c,
        "DELETE FROM keel.task_runs WHERE error = 'simulated failure';
         SELECT keel.drop_queue('h-bad', force => true)",
    );
}

fn terminate_worker(c: &mut Client) {
    exec(
        c,
        "SELECT pg_terminate_backend(pid) FROM keel.worker_status() WHERE pid IS NOT NULL",
    );
}

fn health_sees_redis_go_away_and_evict(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    // An evicting policy: the worker reads INFO when it starts (and every 10 s).
    let mut r = env.redis.connection();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query(&mut r)
        .expect("CONFIG SET");
    terminate_worker(&mut c);
    let (_, detail, _) = wait_status(&mut c, "redis:eviction_policy", "warn");
    assert!(detail.contains("allkeys-lru"), "{detail}");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(&mut r)
        .expect("CONFIG SET");
    terminate_worker(&mut c);
    wait_status(&mut c, "redis:eviction_policy", "ok");
    // Redis gone: critical, and the events wait.
    env.redis.stop();
    exec(&mut c, "SELECT keel.emit('h-redis', '{}')");
    let (_, detail, _) = wait_status(&mut c, "redis:reachable", "critical");
    let (_, pending, _) = &health(&mut c)["outbox:oldest_pending"];
    assert!(pending.starts_with("1 events pending"), "{pending}");
    env.redis.start_again();
    wait_status(&mut c, "redis:reachable", "ok");
    println!("    redis stopped: {detail:?}");
}

/// A metric sample line: name, labels, value; None for comments and blank lines.
fn sample(line: &str) -> Option<(&str, &str, &str)> {
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ').expect("a sample has a value");
    let (name, labels) = match head.split_once('{') {
        Some((n, l)) => (n, l.strip_suffix('}').expect("labels close")),
        None => (head, ""),
    };
    Some((name, labels, value))
}

fn metrics_are_prometheus_text_a_parser_reads(env: &Env) {
    // A database whose name needs escaping in a label value.
    let mut admin = env.pg.connect_db("postgres");
    for sql in [
        "DROP DATABASE IF EXISTS \"we\"\"ird\\db\" WITH (FORCE)",
        "CREATE DATABASE \"we\"\"ird\\db\"",
        "ALTER DATABASE \"we\"\"ird\\db\" SET keel.redis_prefix = 'weird:'",
    ] {
        exec(&mut admin, sql);
    }
    let mut w = postgres::Config::new()
        .host_path(env.pg.socket_dir())
        .port(env.pg.port)
        .user("postgres")
        .dbname("we\"ird\\db")
        .connect(postgres::NoTls)
        .expect("connect to the oddly named database");
    exec(&mut w, "CREATE EXTENSION pg_keel");
    wait_worker_idle(&mut w);
    exec(
        &mut w,
        "SELECT keel.create_queue('m-q'); SELECT keel.enqueue('m-q', '{}');
         SELECT keel.emit('m-topic', '{}')",
    );
    let text: String = one(&mut w, "SELECT keel.metrics()");
    // What the Prometheus text format requires of every line.
    let mut typed = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(
                typed.insert(name.to_string(), kind).is_none(),
                "one TYPE per family: {line}"
            );
        } else if let Some((name, _, value)) = sample(line) {
            assert!(typed.contains_key(name), "sample before its TYPE: {line}");
            assert!(
                name.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_'),
                "{line}"
            );
            assert!(value == "NaN" || value.parse::<f64>().is_ok(), "{line}");
        } else {
            assert!(line.starts_with("# HELP ") || line.is_empty(), "{line}");
        }
    }
    // And what a parser makes of it.
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus text");
    let value = |name: &str, label: &str, want: &str| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label) == Some(want))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    // prometheus-parse hands label values back as written (escapes kept): the escaped form,
    // unescaped as the format says, is the database's name.
    let raw = r#"we\"ird\\db"#;
    assert_eq!(value("keel_worker_up", "database", raw), Some(1.0));
    assert_eq!(
        raw.replace(r"\\", "\u{0}")
            .replace(r#"\""#, "\"")
            .replace('\u{0}', "\\"),
        "we\"ird\\db",
        "label escaping"
    );
    assert!(value("keel_queue_oldest_ready_seconds", "queue", "m-q").is_some());
    assert!(scrape.samples.iter().any(|s| s.metric == "keel_queue_jobs"
        && s.labels.get("queue") == Some("m-q")
        && s.labels.get("state") == Some("ready")));
    assert!(value("keel_outbox_oldest_pending_seconds", "topic", "m-topic").is_some());
    assert!(value("keel_health_status", "check", "worker").is_some());
    assert!(scrape.docs.contains_key("keel_outbox_dispatched_total"));
    println!(
        "    {} samples in {} families, parsed",
        scrape.samples.len(),
        typed.len()
    );
    drop(w);
    exec(&mut admin, "DROP DATABASE \"we\"\"ird\\db\" WITH (FORCE)");
}

fn task_runs_keep_each_run_for_the_retention_only(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let schedule = run_tasks_every_second(&mut c);
    exec(
        &mut c,
        "SELECT keel.set_task('cleanup_done_jobs', enabled => false)",
    );
    exec(&mut c, "ALTER SYSTEM SET keel.task_run_retention = '60s'");
    exec(
        &mut c,
        "SELECT pg_reload_conf();
         INSERT INTO keel.task_runs (task, started_at, duration, rows, error)
         VALUES ('cleanup_done_jobs', clock_timestamp() - interval '2 minutes', '1 ms', 0, NULL)",
    );
    let runs = wait_for(DEADLINE, || {
        let (old, runs): (i64, i64) = {
            let row = c
                .query_one(
                    "SELECT count(*) FILTER (WHERE started_at < clock_timestamp() - interval '90 seconds'),
                            count(*) FILTER (WHERE task = 'cleanup_sessions')
                       FROM keel.task_runs",
                    &[],
                )
                .ok()?;
            (row.get(0), row.get(1))
        };
        (old == 0 && runs >= 3).then_some(runs)
    })
    .expect("runs recorded, the old one deleted");
    let tasks: i64 = one(&mut c, "SELECT count(DISTINCT task) FROM keel.task_runs");
    restore_tasks(&mut c, &schedule);
    exec(&mut c, "ALTER SYSTEM RESET keel.task_run_retention");
    exec(&mut c, "SELECT pg_reload_conf()");
    assert!(tasks >= 4, "every enabled task's runs ({tasks} tasks)");
    println!(
        "    {runs} runs of cleanup_sessions kept; a run past the retention deleted (of a \
         disabled task)"
    );
}

fn a_monitoring_role_needs_no_more_than_grant_monitor(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "DROP ROLE IF EXISTS h_monitor; CREATE ROLE h_monitor LOGIN;
         SELECT keel.grant_monitor('h_monitor')",
    );
    let info = env
        .pg
        .conninfo(keel_pg_test::DATABASE)
        .replace("user=postgres", "user=h_monitor");
    let mut m = Client::connect(&info, postgres::NoTls).expect("connect as h_monitor");
    let checks: i64 = one(&mut m, "SELECT count(*) FROM keel.health()");
    let text: String = one(&mut m, "SELECT keel.metrics()");
    assert!(checks > 5 && text.contains("keel_worker_up"));
    let denied = m.batch_execute("SELECT keel.enqueue('x', '{}')").is_err();
    assert!(denied, "nothing else");
    drop(m);
    exec(&mut c, "DROP OWNED BY h_monitor; DROP ROLE h_monitor");
}
