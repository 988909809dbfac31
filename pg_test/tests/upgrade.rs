//! The upgrade path over real connections: a database created at 0.1.0 — from the released
//! install script `sql/released/pg_keel--0.1.0.sql`, byte for byte what 0.1.0 shipped — holding
//! every kind of object in every state is updated with `ALTER EXTENSION pg_keel UPDATE` while
//! the new library serves it. Nothing is lost (every table's rows compared before and after),
//! the whole API goes on from where it was (old leases ack, keys stay taken, pending events are
//! dispatched once, limits keep counting, sessions stay valid or revoked), and the updated
//! catalog is object for object the catalog of a fresh install of the new version.

use std::time::Duration;

use keel_pg_test::{exec, one, pg_config, run, tests, wait_for, wait_worker_idle, Client, Env};

/// Every released version whose install script the suite can start from.
const RELEASED: &[&str] = &["0.1.0"];

fn main() {
    let tests = tests![
        a_0_1_0_database_updates_losing_nothing_and_the_api_goes_on,
        the_updated_catalog_is_the_catalog_of_a_fresh_install,
        every_public_object_has_a_comment_and_a_docs_entry,
    ];
    run(tests);
}

/// Puts the released install scripts beside the new version's in the server's extension
/// directory (the package installs only the current script and the upgrade scripts).
fn install_released_scripts() {
    let dir = std::path::PathBuf::from(pg_config("--sharedir")).join("extension");
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/released");
    for version in RELEASED {
        let name = format!("pg_keel--{version}.sql");
        let source = here.join(&name);
        let target = dir.join(&name);
        let wanted = std::fs::read(&source).unwrap_or_else(|e| panic!("{source:?}: {e}"));
        if std::fs::read(&target).ok().as_deref() == Some(&wanted[..]) {
            continue;
        }
        std::fs::write(&target, &wanted).unwrap_or_else(|e| {
            panic!(
                "cannot install {name} into {dir:?} ({e}): run the suite as root, or copy \
                 sql/released/{name} there first"
            )
        });
    }
}

/// Drops pg_keel from `c`'s database and creates it again at `version`.
fn create_at(c: &mut Client, version: &str) {
    install_released_scripts();
    exec(c, "DROP EXTENSION IF EXISTS pg_keel CASCADE");
    exec(c, &format!("CREATE EXTENSION pg_keel VERSION '{version}'"));
    let got: String = one(
        c,
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_keel'",
    );
    assert_eq!(got, version);
}

/// `ALTER EXTENSION pg_keel UPDATE`, as `role` when given (a superuser other than the one who
/// installed: what it creates must still belong to pg_keel's owner).
fn update(c: &mut Client, role: Option<&str>) {
    match role {
        Some(role) => exec(
            c,
            &format!("SET ROLE {role}; ALTER EXTENSION pg_keel UPDATE; RESET ROLE"),
        ),
        None => exec(c, "ALTER EXTENSION pg_keel UPDATE"),
    }
    let (got, default): (String, String) = {
        let row = c
            .query_one(
                "SELECT e.extversion, a.default_version
                   FROM pg_extension e JOIN pg_available_extensions a ON a.name = e.extname
                  WHERE e.extname = 'pg_keel'",
                &[],
            )
            .expect("versions");
        (row.get(0), row.get(1))
    };
    assert_eq!(got, default, "UPDATE reaches the default version");
    assert_ne!(
        got,
        RELEASED[RELEASED.len() - 1],
        "and that is a new version"
    );
}

/// Every stored row that must survive, table by table, as sorted text (volatile bookkeeping
/// excluded: task runs, and memory policies' state, which the worker writes every second).
fn contents(c: &mut Client) -> Vec<(String, Vec<String>)> {
    let tables = [
        // The columns 0.1.0 had (0.2.0 adds keep_finished, '0' for every old queue, and
        // progress_topic, NULL: checked below).
        (
            "queues",
            "SELECT (t.queue, t.visibility_timeout, t.max_attempts, t.retry_backoff,
                     t.retry_backoff_max, t.max_ready, t.dedupe_window, t.paused,
                     t.created_at)::text
               FROM keel.queues t",
        ),
        // The columns 0.1.0 had (0.2.0 adds progress and result, NULL for every old job:
        // checked below).
        (
            "jobs",
            "SELECT (t.job_id, t.queue, t.state, t.payload, t.priority, t.attempt, t.attempt_base,
                     t.max_attempts, t.visible_at, t.enqueued_at, t.claimed_at, t.worker,
                     t.idempotency_key, t.last_error, t.finished_at, t.dead_reason,
                     t.claimed_by)::text
               FROM keel.jobs t",
        ),
        ("grants", "SELECT t::text FROM keel.grants t"),
        ("outbox_events", "SELECT t::text FROM keel.outbox_events t"),
        // Not last_error: the dispatcher keeps retrying the stopped Redis during the update
        // and rewrites it with each reason ("server closed the connection", "could not
        // connect"); the events and their refusals are what the update must keep.
        (
            "outbox_pending",
            "SELECT (t.id, t.attempts)::text FROM keel.outbox_pending t",
        ),
        ("outbox_dead", "SELECT t::text FROM keel.outbox_dead t"),
        ("outbox_topics", "SELECT t::text FROM keel.outbox_topics t"),
        ("outbox_routes", "SELECT t::text FROM keel.outbox_routes t"),
        (
            "outbox_instance",
            "SELECT t::text FROM keel.outbox_instance t",
        ),
        // The columns 0.1.0 had (0.2.0 adds enforce, true for every old policy: checked
        // below).
        (
            "rate_limits",
            "SELECT (t.name, t.max, t.per, t.algorithm, t.burst, t.durability, t.log_denials,
                     t.created_at)::text
               FROM keel.rate_limits t",
        ),
        (
            "rate_limit_state",
            "SELECT t::text FROM keel.rate_limit_state t
              WHERE t.policy IN (SELECT name FROM keel.rate_limits WHERE durability <> 'memory')",
        ),
        // The columns 0.1.0 had (0.2.0 adds shadow, false for every old denial: checked below).
        (
            "rate_limit_denials",
            "SELECT (t.policy, t.key, t.at, t.cost, t.retry_after_ms)::text
               FROM keel.rate_limit_denials t",
        ),
        // The columns 0.1.0 had (0.2.0 adds previous_hash, previous_until and rotated_to, a
        // rotation's grace, NULL for every old session).
        (
            "sessions",
            "SELECT (t.session_id, t.token_hash, t.user_id, t.data, t.created_at, t.last_seen_at,
                     t.expires_at, t.idle_timeout, t.idle_expires_at, t.idle_check_at,
                     t.revoked_at, t.revoke_reason)::text
               FROM keel.sessions t",
        ),
        (
            "tasks",
            "SELECT (t.name, t.every, t.enabled)::text FROM keel.tasks t",
        ),
        (
            "sequences",
            "SELECT (last_value, is_called)::text FROM keel.jobs_job_id_seq
             UNION ALL SELECT (last_value, is_called)::text FROM keel.outbox_events_id_seq",
        ),
    ];
    tables
        .iter()
        .map(|(name, sql)| {
            let mut rows: Vec<String> = c
                .query(*sql, &[])
                .unwrap_or_else(|e| panic!("{name}: {e:?}"))
                .iter()
                .map(|r| r.get(0))
                .collect();
            rows.sort();
            (name.to_string(), rows)
        })
        .collect()
}

fn a_0_1_0_database_updates_losing_nothing_and_the_api_goes_on(env: &Env) {
    let mut c = env.pg.connect();
    create_at(&mut c, "0.1.0");
    wait_worker_idle(&mut c);
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'up_app') THEN
             CREATE ROLE up_app LOGIN;
           END IF;
         END $$;
         SELECT keel.create_queue('up-jobs', visibility_timeout => '1 hour', max_attempts => 3,
                                  retry_backoff => '1 hour', retry_backoff_max => '2 hours');
         SELECT keel.create_queue('up-fragile', max_attempts => 1);
         SELECT keel.grant_producer('up_app', queues => '{up-jobs}', topics => '{up-orders}');
         SELECT keel.grant_consumer('up_app', queues => '{up-jobs}');
         SELECT keel.grant_sessions('up_app');
         SELECT keel.create_limit('up-durable', 5, '1 hour');
         SELECT keel.create_limit('up-memory', 5, '1 hour', durability => 'memory');
         SELECT keel.create_limit('up-window', 5, '1 hour', 'fixed_window', log_denials => true);
         SELECT keel.create_route('up-listed', 'list');",
    );
    // Jobs in every state: done (kept by its key), running (its lease kept to ack later), a
    // retry scheduled an hour ahead, dead, delayed, and ready ones behind them.
    let done: i64 = one(
        &mut c,
        "SELECT keel.enqueue('up-jobs', '{\"n\": 1}', priority => -3, idempotency_key => 'once')",
    );
    let (claimed, attempt): (i64, i32) = {
        let r = c
            .query_one("SELECT job_id, attempt FROM keel.claim('up-jobs')", &[])
            .expect("claim");
        (r.get(0), r.get(1))
    };
    assert_eq!(claimed, done);
    assert!(one::<bool>(
        &mut c,
        &format!("SELECT keel.ack({done}, {attempt})")
    ));
    let running: i64 = one(
        &mut c,
        "SELECT keel.enqueue('up-jobs', '{\"n\": 2}', priority => -2)",
    );
    let retried: i64 = one(
        &mut c,
        "SELECT keel.enqueue('up-jobs', '{\"n\": 3}', priority => -1)",
    );
    let leases: Vec<(i64, i32)> = c
        .query(
            "SELECT job_id, attempt FROM keel.claim('up-jobs', batch => 2)",
            &[],
        )
        .expect("claim 2")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        leases.iter().map(|l| l.0).collect::<Vec<_>>(),
        vec![running, retried]
    );
    let retried_state: String = one(
        &mut c,
        &format!("SELECT keel.fail({retried}, {}, 'try later')", leases[1].1),
    );
    assert_eq!(retried_state, "retry");
    let dead: i64 = one(&mut c, "SELECT keel.enqueue('up-fragile', '{\"n\": 4}')");
    let dead_attempt: i32 = one(&mut c, "SELECT attempt FROM keel.claim('up-fragile')");
    let dead_state: String = one(
        &mut c,
        &format!("SELECT keel.fail({dead}, {dead_attempt}, 'boom')"),
    );
    assert_eq!(dead_state, "dead");
    let delayed: i64 = one(
        &mut c,
        "SELECT keel.enqueue('up-jobs', '{\"n\": 5}', delay => '1 hour')",
    );
    exec(
        &mut c,
        "SELECT keel.enqueue('up-jobs', jsonb_build_object('n', 10 + g)) FROM generate_series(1, 3) g",
    );
    // Limits with state: 3 of 5 used in each.
    for policy in ["up-durable", "up-memory", "up-window"] {
        let remaining: i64 = one(
            &mut c,
            &format!("SELECT remaining::bigint FROM keel.check('{policy}', 'k', 3)"),
        );
        assert_eq!(remaining, 2, "{policy}");
    }
    let denied: bool = one(
        &mut c,
        "SELECT NOT allowed FROM keel.check('up-window', 'k', 4)",
    );
    assert!(denied, "a logged denial");
    // Sessions: one live, one revoked, one rotated away.
    let live: String = one(
        &mut c,
        "SELECT token FROM keel.session_create('ada', data => '{\"theme\": \"dark\"}')",
    );
    let revoked: String = one(&mut c, "SELECT token FROM keel.session_create('bob')");
    assert!(one::<bool>(
        &mut c,
        &format!("SELECT keel.session_revoke('{revoked}')")
    ));
    let before_rotation: String = one(&mut c, "SELECT token FROM keel.session_create('cy')");
    let rotated: String = one(
        &mut c,
        &format!("SELECT keel.session_rotate('{before_rotation}')"),
    );
    // Outbox: two events dispatched, then Redis goes away and three more stay pending.
    exec(
        &mut c,
        "SELECT keel.emit('up-orders', jsonb_build_object('n', g), aggregate_id => 'o-' || g, version => 1)
           FROM generate_series(1, 2) g",
    );
    wait_for(Duration::from_secs(30), || {
        (env.redis.xrange("keel:up-orders").len() == 2).then_some(())
    })
    .expect("the first two events dispatched");
    wait_for(Duration::from_secs(30), || {
        (one::<i64>(&mut c, "SELECT count(*) FROM keel.outbox_pending") == 0).then_some(())
    })
    .expect("and recorded as dispatched");
    env.redis.stop();
    exec(
        &mut c,
        "SELECT keel.emit('up-orders', jsonb_build_object('n', g), aggregate_id => 'o-' || g, version => 1)
           FROM generate_series(3, 5) g;
         SELECT keel.emit('up-listed', '{\"to\": \"list\"}');",
    );
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM keel.outbox_pending"),
        4
    );
    // No task may change a row while the two snapshots are taken.
    let schedule: Vec<(String, String, bool)> = c
        .query(
            "SELECT name, every::text, enabled FROM keel.tasks ORDER BY name",
            &[],
        )
        .expect("tasks")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    exec(
        &mut c,
        "SELECT keel.set_task(name, enabled => false) FROM keel.tasks",
    );

    let before = contents(&mut c);
    update(&mut c, None);
    let after = contents(&mut c);
    for ((name, rows_before), (_, rows_after)) in before.iter().zip(&after) {
        assert_eq!(rows_before, rows_after, "keel.{name} changed by the update");
    }
    assert!(before
        .iter()
        .all(|(name, rows)| !rows.is_empty() || name == "outbox_dead"));
    let with_progress: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.jobs WHERE progress IS NOT NULL",
    );
    assert_eq!(with_progress, 0, "old jobs have no progress");
    let new_columns: (i64, i64) = {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM keel.jobs WHERE result IS NOT NULL),
                        (SELECT count(*) FROM keel.queues
                          WHERE keep_finished <> interval '0' OR progress_topic IS NOT NULL)",
                &[],
            )
            .expect("new columns");
        (r.get(0), r.get(1))
    };
    assert_eq!(
        new_columns,
        (0, 0),
        "no result, no history kept, no progress topic"
    );
    let shadowed: i64 = one(
        &mut c,
        "SELECT (SELECT count(*) FROM keel.rate_limits WHERE NOT enforce)
              + (SELECT count(*) FROM keel.rate_limit_denials WHERE shadow)",
    );
    assert_eq!(
        shadowed, 0,
        "old policies enforce, old denials are not shadows"
    );

    for (name, every, enabled) in &schedule {
        c.execute(
            "SELECT keel.set_task($1, $2::text::interval, $3)",
            &[name, every, enabled],
        )
        .expect("set_task");
    }
    // The queue goes on: the lease taken at 0.1.0 acks, a taken key returns its job, a dead
    // job revives, ready jobs are claimed in order and the delayed and retried ones wait.
    assert!(one::<bool>(
        &mut c,
        &format!("SELECT keel.ack({running}, {})", leases[0].1)
    ));
    let again: i64 = one(
        &mut c,
        "SELECT keel.enqueue('up-jobs', '{\"n\": 1}', idempotency_key => 'once')",
    );
    assert_eq!(again, done, "a done job's key is still taken");
    let ready: Vec<i64> = c
        .query("SELECT job_id FROM keel.claim('up-jobs', batch => 10)", &[])
        .expect("claim after update")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        ready.len(),
        3,
        "the three ready jobs, not {delayed} nor {retried}"
    );
    assert!(!ready.contains(&delayed) && !ready.contains(&retried));
    let revived: i64 = one(
        &mut c,
        &format!("SELECT keel.retry_dead('up-fragile', {dead})"),
    );
    assert_eq!(revived, 1);
    let revived_lease: i32 = one(&mut c, "SELECT attempt FROM keel.claim('up-fragile')");
    assert_eq!(revived_lease, dead_attempt + 1);
    // Limits keep counting from where they were: 2 left, then refused.
    for policy in ["up-durable", "up-memory", "up-window"] {
        let (allowed, remaining): (bool, i64) = {
            let r = c
                .query_one(
                    &format!(
                        "SELECT allowed, remaining::bigint FROM keel.check('{policy}', 'k', 2)"
                    ),
                    &[],
                )
                .expect("check");
            (r.get(0), r.get(1))
        };
        assert!(allowed && remaining == 0, "{policy}: {allowed} {remaining}");
        let refused: bool = one(
            &mut c,
            &format!("SELECT NOT allowed FROM keel.check('{policy}', 'k')"),
        );
        assert!(refused, "{policy} refuses the sixth");
    }
    // Sessions: the live one validates with its data, the revoked and rotated-away ones do not.
    let user: String = one(
        &mut c,
        &format!("SELECT user_id || ':' || (data->>'theme') FROM keel.session_validate('{live}')"),
    );
    assert_eq!(user, "ada:dark");
    for gone in [&revoked, &before_rotation] {
        let n: i64 = one(
            &mut c,
            &format!("SELECT count(*) FROM keel.session_validate('{gone}')"),
        );
        assert_eq!(n, 0);
    }
    let n: i64 = one(
        &mut c,
        &format!("SELECT count(*) FROM keel.session_validate('{rotated}')"),
    );
    assert_eq!(n, 1);
    // The outbox: Redis back, every pending event is dispatched once, none twice.
    env.redis.start_again();
    wait_for(Duration::from_secs(30), || {
        (one::<i64>(&mut c, "SELECT count(*) FROM keel.outbox_pending") == 0).then_some(())
    })
    .expect("pending events dispatched after the update");
    // (The restarted redis-server kept nothing: the stream holds what was pending.)
    let stream = env.redis.xrange("keel:up-orders");
    let mut ids: Vec<i64> = stream
        .iter()
        .filter_map(|(_, f)| f.get("id")?.parse().ok())
        .collect();
    ids.sort();
    assert_eq!(ids, vec![3, 4, 5], "each pending event once: {stream:?}");
    let listed: i64 = redis::cmd("LLEN")
        .arg("keel:up-listed")
        .query(&mut env.redis.connection())
        .expect("LLEN");
    assert_eq!(listed, 1);
    exec(&mut c, "SELECT keel.emit('up-orders', '{\"n\": 6}')");
    wait_for(Duration::from_secs(30), || {
        (env.redis.xrange("keel:up-orders").len() == 4).then_some(())
    })
    .expect("a new event after the update");
    // The role granted at 0.1.0 still works through its grants, and only through them.
    let mut app = env.pg.connect_as("up_app");
    let id: i64 = one(
        &mut app,
        "SELECT keel.enqueue('up-jobs', '{\"by\": \"app\"}')",
    );
    assert!(id > 0);
    let refused = app
        .query_one("SELECT keel.enqueue('up-fragile', '{}')", &[])
        .err()
        .and_then(|e| e.code().map(|s| s.code().to_string()));
    assert_eq!(refused.as_deref(), Some("42501"));
    // A consumer granted at 0.1.0 may use what 0.2.0 added to consuming (snooze).
    let (job, attempt): (i64, i32) = {
        let r = app
            // The claim across queues, new in 0.2.0, through the grant made at 0.1.0.
            .query_one(
                "SELECT job_id, attempt FROM keel.claim(ARRAY['up-jobs'])",
                &[],
            )
            .expect("the app claims");
        (r.get(0), r.get(1))
    };
    let reported: bool = app
        .query_one(
            "SELECT keel.progress($1, $2, '{\"done\": 1}')",
            &[&job, &attempt],
        )
        .expect("progress by a consumer granted at 0.1.0")
        .get(0);
    assert!(reported);
    let snoozed: bool = app
        .query_one("SELECT keel.snooze($1, $2, '0 s')", &[&job, &attempt])
        .expect("snooze by a consumer granted at 0.1.0")
        .get(0);
    assert!(snoozed);
    // And a producer granted at 0.1.0 what 0.2.0 added to producing (cancel).
    let cancelled: Option<String> = app
        .query_one("SELECT keel.cancel($1, 'changed my mind')", &[&job])
        .expect("cancel by a producer granted at 0.1.0")
        .get(0);
    assert_eq!(cancelled.as_deref(), Some("cancelled"));
    // And the header values of a decision (rate_limit_headers) to whoever may check.
    let fields: String = app
        .query_one(
            "SELECT h.ratelimit_policy FROM keel.check('up-durable', 'hdr') d,
                    keel.rate_limit_headers('up-durable', d.remaining, d.reset_after_ms) h",
            &[],
        )
        .expect("rate_limit_headers by a producer granted at 0.1.0")
        .get(0);
    assert_eq!(fields, "\"up-durable\";q=5;w=3600");
    let health: i64 = one(&mut c, "SELECT count(*) FROM keel.health()");
    assert!(health > 0);
    drop(app);
    // Schedules, new in 0.2.0, run in the updated database (the worker started at 0.1.0
    // enqueues them), and their table is in a dump.
    exec(
        &mut c,
        "SELECT keel.create_queue('up-sched');
         SELECT keel.create_schedule('up-every', 'up-sched', '@every 1 second');",
    );
    wait_for(Duration::from_secs(30), || {
        one::<Option<i64>>(
            &mut c,
            "SELECT last_job_id FROM keel.schedules WHERE name = 'up-every'",
        )
    })
    .expect("the worker enqueues a schedule's slot after the update");
    // pg_dump and pg_restore keep what the update granted (a grant an extension script makes
    // counts as the extension's own and is left out of a dump unless the script says so).
    let mut restored = env.pg.restored_copy("keel_up_restored");
    for f in [
        "keel.snooze(bigint, integer, interval)",
        "keel.claim(text[], integer, interval, text)",
        "keel.ack(bigint, integer, jsonb)",
        "keel.cancel(bigint, text)",
        "keel.cancel_queue(text, text)",
        "keel.enqueue(text, jsonb, interval, integer, text, integer, text, bigint[], text)",
        "keel.rate_limit_headers(text, integer, bigint, bigint)",
        "keel.session_create(text, interval, interval, jsonb, integer)",
        "keel.session_login(text, text, integer)",
    ] {
        let granted: bool = one(
            &mut restored,
            &format!("SELECT has_function_privilege('up_app', '{f}', 'EXECUTE')"),
        );
        assert!(
            granted,
            "up_app keeps EXECUTE on {f} through a dump and restore"
        );
    }
    let schedules: i64 = one(
        &mut restored,
        "SELECT count(*) FROM keel.schedules WHERE name = 'up-every' AND queue = 'up-sched'",
    );
    assert_eq!(schedules, 1, "a schedule survives a dump and restore");
    drop(restored);
    env.pg.drop_database("keel_up_restored");
    // Leave the suite's database as a fresh install would.
    exec(
        &mut c,
        "DROP EXTENSION pg_keel CASCADE; CREATE EXTENSION pg_keel",
    );
}

/// Every object of schema keel and of the extension, described by what a user or pg_dump would
/// see: definitions, columns and defaults, constraints, indexes, views, triggers, privileges,
/// comments, membership and the tables whose rows pg_dump keeps.
const CATALOG: &str = r#"
WITH k AS (SELECT 'keel'::regnamespace AS ns),
ext AS (SELECT oid FROM pg_extension WHERE extname = 'pg_keel')
SELECT 'function ' || p.oid::regprocedure::text || ' def=' || md5(pg_get_functiondef(p.oid))
       || ' owner=' || p.proowner::regrole::text
       || ' acl=' || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(p.proacl) x), '-')
       || ' comment=' || coalesce(obj_description(p.oid, 'pg_proc'), '-')
  FROM pg_proc p, k WHERE p.pronamespace = k.ns AND p.prokind <> 'a'
UNION ALL
SELECT 'relation ' || c.relname || ' kind=' || c.relkind::text || ' persistence=' || c.relpersistence::text
       || ' options=' || coalesce(c.reloptions::text, '-') || ' owner=' || c.relowner::regrole::text
       || ' acl=' || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(c.relacl) x), '-')
       || ' rls=' || c.relrowsecurity || ' comment=' || coalesce(obj_description(c.oid, 'pg_class'), '-')
  FROM pg_class c, k WHERE c.relnamespace = k.ns
UNION ALL
SELECT 'column ' || c.relname || ' #' || row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum)
       || ' ' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull
       || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-') || ' identity=' || a.attidentity::text
       || ' generated=' || a.attgenerated::text || ' collation=' || coalesce(co.collname, '-')
       || ' acl=' || coalesce(a.attacl::text, '-') || ' comment=' || coalesce(col_description(c.oid, a.attnum), '-')
  FROM pg_class c JOIN k ON c.relnamespace = k.ns
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
  LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 100
 WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
UNION ALL
SELECT 'constraint ' || c.conrelid::regclass::text || ' ' || c.conname || ' ' || pg_get_constraintdef(c.oid)
  FROM pg_constraint c, k WHERE c.connamespace = k.ns
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid, k WHERE c.relnamespace = k.ns
UNION ALL
SELECT 'view ' || c.relname || ' ' || md5(pg_get_viewdef(c.oid))
  FROM pg_class c, k WHERE c.relnamespace = k.ns AND c.relkind IN ('v', 'm')
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid, k
 WHERE c.relnamespace = k.ns AND NOT t.tgisinternal
UNION ALL
SELECT 'sequence ' || s.seqrelid::regclass::text || ' ' || format_type(s.seqtypid, NULL) || ' ' || s.seqstart
       || ' ' || s.seqincrement || ' ' || s.seqmax || ' ' || s.seqmin || ' ' || s.seqcache || ' ' || s.seqcycle
  FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid, k WHERE c.relnamespace = k.ns
UNION ALL
SELECT 'type ' || t.typname || ' ' || t.typtype::text
  FROM pg_type t, k WHERE t.typnamespace = k.ns AND t.typrelid = 0 AND t.typelem = 0
UNION ALL
SELECT 'policy ' || p.polrelid::regclass::text || ' ' || p.polname || ' ' || p.polcmd::text
       || ' ' || coalesce(pg_get_expr(p.polqual, p.polrelid), '-')
  FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid, k WHERE c.relnamespace = k.ns
UNION ALL
SELECT 'schema keel acl=' || coalesce(n.nspacl::text, '-') || ' owner=' || n.nspowner::regrole::text
  FROM pg_namespace n, k WHERE n.oid = k.ns
UNION ALL
SELECT 'member ' || pg_describe_object(d.classid, d.objid, d.objsubid)
  FROM pg_depend d, ext WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid
   AND d.deptype = 'e'
UNION ALL
SELECT 'initpriv ' || pg_describe_object(i.classoid, i.objoid, i.objsubid) || ' ' || i.privtype::text || ' '
       || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(i.initprivs) x), '-')
  FROM pg_init_privs i, ext
 WHERE (i.classoid, i.objoid) IN (SELECT d.classid, d.objid FROM pg_depend d
                                   WHERE d.refclassid = 'pg_extension'::regclass
                                     AND d.refobjid = ext.oid AND d.deptype = 'e')
UNION ALL
SELECT 'config ' || cfg::regclass::text || ' where=' || coalesce(cond, '-')
  FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(cfg, cond)
 WHERE e.extname = 'pg_keel'
UNION ALL
SELECT 'extension ' || e.extversion || ' relocatable=' || e.extrelocatable
  FROM pg_extension e WHERE e.extname = 'pg_keel'
UNION ALL
SELECT 'row ' || relname || ' ' || n
  FROM (SELECT 'tasks' AS relname, string_agg(name || '/' || every || '/' || enabled, ',' ORDER BY name) AS n
          FROM keel.tasks) seeded
"#;

fn catalog(c: &mut Client) -> Vec<String> {
    let mut rows: Vec<String> = c
        .query(CATALOG, &[])
        .expect("catalog")
        .iter()
        .map(|r| r.get(0))
        .collect();
    rows.sort();
    rows
}

fn the_updated_catalog_is_the_catalog_of_a_fresh_install(env: &Env) {
    // Roles are the cluster's: the same grants made in both databases must give the same ACLs.
    let grants = "DO $$ BEGIN
                    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'up_cat') THEN
                      CREATE ROLE up_cat;
                    END IF;
                  END $$;
                  SELECT keel.grant_producer('up_cat', queues => '{a}', topics => '{t}');
                  SELECT keel.grant_consumer('up_cat', queues => '{a}');
                  SELECT keel.grant_sessions('up_cat');
                  SELECT keel.grant_monitor('up_cat');
                  DO $$ BEGIN
                    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'up_cat_admin') THEN
                      CREATE ROLE up_cat_admin;
                    END IF;
                  END $$;
                  SELECT keel.grant_admin('up_cat_admin');";
    exec(
        &mut env.pg.connect(),
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'up_super') THEN
             CREATE ROLE up_super SUPERUSER;
           END IF;
         END $$",
    );
    let mut fresh = env.pg.fresh_database("keel_fresh");
    exec(&mut fresh, "CREATE EXTENSION pg_keel");
    exec(&mut fresh, grants);
    let expected = catalog(&mut fresh);
    drop(fresh);

    for version in RELEASED {
        let mut old = env.pg.fresh_database("keel_old");
        create_at(&mut old, version);
        exec(&mut old, grants);
        update(&mut old, Some("up_super"));
        let got = catalog(&mut old);
        let missing: Vec<&String> = expected.iter().filter(|r| !got.contains(r)).collect();
        let extra: Vec<&String> = got.iter().filter(|r| !expected.contains(r)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "updated from {version}, the catalog differs from a fresh install:\n\
             missing (fresh install has, update lacks):\n  {}\n\
             extra (update has, fresh install lacks):\n  {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  "),
            extra
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
        drop(old);
        env.pg.drop_database("keel_old");
    }
    env.pg.drop_database("keel_fresh");
}

/// `\df+ keel.*` explains every public function, view and table (a `COMMENT`), and each has an
/// entry in `docs/`: a function's name followed by `(` in a heading, a view's or table's
/// `keel.<name>` anywhere. Names starting with `_` are internal.
fn every_public_object_has_a_comment_and_a_docs_entry(env: &Env) {
    let mut c = env.pg.connect();
    let docs_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut docs = String::new();
    for entry in std::fs::read_dir(&docs_dir).expect("docs/") {
        let path = entry.expect("docs entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push_str(&std::fs::read_to_string(&path).expect("read a docs page"));
            docs.push('\n');
        }
    }
    let headings: Vec<&str> = docs.lines().filter(|l| l.starts_with('#')).collect();
    let objects = c
        .query(
            "SELECT 'function', p.proname::text, obj_description(p.oid, 'pg_proc') IS NOT NULL
               FROM pg_proc p WHERE p.pronamespace = 'keel'::regnamespace
                AND p.proname !~ '^_'
             UNION ALL
             SELECT 'relation', c.relname::text, obj_description(c.oid, 'pg_class') IS NOT NULL
               FROM pg_class c WHERE c.relnamespace = 'keel'::regnamespace
                AND c.relkind IN ('r', 'v', 'p') AND c.relname !~ '^_'
             ORDER BY 1, 2",
            &[],
        )
        .expect("public objects");
    assert!(
        objects.len() > 50,
        "too few public objects: {}",
        objects.len()
    );
    let mut missing = Vec::new();
    for row in objects {
        let (kind, name, commented): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
        if !commented {
            missing.push(format!("{kind} keel.{name}: no COMMENT"));
        }
        let documented = if kind == "function" {
            let call = format!("{name}(");
            headings.iter().any(|h| {
                h.match_indices(&call).any(|(at, _)| {
                    !h[..at]
                        .chars()
                        .next_back()
                        .is_some_and(|ch| ch.is_alphanumeric() || ch == '_')
                })
            })
        } else {
            docs.contains(&format!("keel.{name}"))
        };
        if !documented {
            missing.push(format!("{kind} keel.{name}: no entry in docs/"));
        }
    }
    assert!(missing.is_empty(), "undocumented:\n{}", missing.join("\n"));
}
