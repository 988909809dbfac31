//! Scheduled maintenance run by the background worker, with nobody calling the tasks:
//! abandoned last attempts become dead, done jobs leave after their dedupe window, dispatched
//! outbox rows leave after retention; set_task changes the schedule; what the worker deletes
//! is counted where autovacuum looks.

use std::time::Duration;

use keel_pg_test::{exec, one, run, sqlstate, tests, wait_for, Env};

fn main() {
    let tests = tests![
        set_task_changes_the_schedule_and_refuses_bad_input,
        abandoned_last_attempt_is_reaped_by_the_schedule,
        done_jobs_leave_after_their_dedupe_window,
        dispatched_events_leave_after_retention,
        the_workers_deletes_reach_the_statistics_autovacuum_reads,
    ];
    run(tests)
}

const DEADLINE: Duration = Duration::from_secs(20);

fn set_task_changes_the_schedule_and_refuses_bad_input(env: &Env) {
    let mut c = env.pg.connect();
    let names: Vec<String> = c
        .query("SELECT name FROM keel.tasks ORDER BY name", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        names,
        [
            "cleanup_done_jobs",
            "cleanup_outbox",
            "cleanup_rate_limits",
            "cleanup_sessions",
            "reap_expired"
        ]
    );
    exec(
        &mut c,
        "SELECT keel.set_task('cleanup_outbox', '2 minutes', false)",
    );
    let r = c
        .query_one(
            "SELECT every::text, enabled FROM keel.tasks WHERE name = 'cleanup_outbox'",
            &[],
        )
        .unwrap();
    assert_eq!(
        (r.get::<_, String>(0).as_str(), r.get::<_, bool>(1)),
        ("00:02:00", false)
    );
    exec(
        &mut c,
        "SELECT keel.set_task('cleanup_outbox', enabled => true)",
    );
    assert!(one::<bool>(
        &mut c,
        "SELECT enabled FROM keel.tasks WHERE name = 'cleanup_outbox'"
    ));
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.set_task('vacuum_everything', '1 minute')"))
            .as_deref(),
        Some("42704")
    );
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.set_task('reap_expired', '0 seconds')")).as_deref(),
        Some("22023")
    );
    assert_eq!(
        one::<String>(
            &mut c,
            "SELECT every::text FROM keel.tasks WHERE name = 'reap_expired'"
        ),
        "00:00:05"
    );
}

fn abandoned_last_attempt_is_reaped_by_the_schedule(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.set_task('reap_expired', '1 second')");
    exec(
        &mut c,
        "SELECT keel.create_queue('abandoned', max_attempts => 1, visibility_timeout => '300 ms')",
    );
    let id: i64 = one(&mut c, "SELECT keel.enqueue('abandoned', '{}')");
    let claimed: i64 = one(&mut c, "SELECT job_id FROM keel.claim('abandoned')");
    assert_eq!(claimed, id);
    // The worker dies with the job: nobody acks, fails or reaps by hand.
    let dead = wait_for(DEADLINE, || {
        let r = c
            .query_one(
                "SELECT state, coalesce(dead_reason, '') FROM keel.jobs WHERE job_id = $1",
                &[&id],
            )
            .unwrap();
        (r.get::<_, String>(0) == "dead").then(|| r.get::<_, String>(1))
    });
    assert_eq!(dead.as_deref(), Some("lease expired"));
    let r = c
        .query_one("SELECT last_run_at IS NOT NULL, last_error FROM keel.tasks WHERE name = 'reap_expired'", &[])
        .unwrap();
    assert!(r.get::<_, bool>(0));
    assert_eq!(r.get::<_, Option<String>>(1), None);
}

fn done_jobs_leave_after_their_dedupe_window(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.set_task('cleanup_done_jobs', '1 second')",
    );
    exec(
        &mut c,
        "SELECT keel.create_queue('windowed', dedupe_window => '1 second')",
    );
    let id: i64 = one(
        &mut c,
        "SELECT keel.enqueue('windowed', '{}', idempotency_key => 'k1')",
    );
    let attempt: i32 = one(&mut c, "SELECT attempt FROM keel.claim('windowed')");
    assert!(c
        .query_one("SELECT keel.ack($1, $2)", &[&id, &attempt])
        .unwrap()
        .get::<_, bool>(0));
    assert_eq!(
        one::<String>(
            &mut c,
            &format!("SELECT state FROM keel.jobs WHERE job_id = {id}")
        ),
        "done"
    );
    let gone = wait_for(DEADLINE, || {
        let n: i64 = one(
            &mut c,
            &format!("SELECT count(*) FROM keel.jobs WHERE job_id = {id}"),
        );
        (n == 0).then_some(())
    });
    assert!(
        gone.is_some(),
        "the done job was cleaned up by the schedule"
    );
}

fn dispatched_events_leave_after_retention(env: &Env) {
    let mut c = env.pg.connect();
    let ids: Vec<i64> = c
        .query(
            "SELECT keel.emit('retained', jsonb_build_object('n', g)) FROM generate_series(1, 3) g",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_for(DEADLINE, || {
        let n: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.outbox WHERE topic = 'retained' AND state = 'dispatched'",
        );
        (n == 3).then_some(())
    })
    .expect("dispatched");
    // Two of them are past retention (7 days by default); one is recent.
    c.execute(
        "UPDATE keel.outbox_events SET created_at = now() - interval '8 days' WHERE id = ANY($1)",
        &[&ids[..2].to_vec()],
    )
    .unwrap();
    exec(&mut c, "SELECT keel.set_task('cleanup_outbox', '1 second')");
    let left = wait_for(DEADLINE, || {
        let n: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.outbox WHERE topic = 'retained'",
        );
        (n == 1).then_some(n)
    });
    assert_eq!(left, Some(1));
    let rest: i64 = one(
        &mut c,
        "SELECT id FROM keel.outbox WHERE topic = 'retained'",
    );
    assert_eq!(rest, ids[2]);
}

/// Autovacuum decides by the statistics (dead tuples per table); a worker that never reported
/// its own would leave every row it deletes (dispatched outbox entries, ended sessions)
/// invisible to it. Both kinds are counted within seconds, with nobody else deleting.
fn the_workers_deletes_reach_the_statistics_autovacuum_reads(env: &Env) {
    const SESSIONS: i64 = 2000;
    const EVENTS: i64 = 500;
    let mut c = env.pg.connect();
    let deleted = |c: &mut keel_pg_test::Client, table: &str| -> i64 {
        exec(c, "SELECT pg_stat_clear_snapshot()");
        one(
            c,
            &format!(
                "SELECT n_tup_del FROM pg_stat_user_tables
                  WHERE schemaname = 'keel' AND relname = '{table}'"
            ),
        )
    };
    let sessions_before = deleted(&mut c, "sessions");
    let pending_before = deleted(&mut c, "outbox_pending");
    exec(
        &mut c,
        &format!(
            "INSERT INTO keel.sessions (token_hash, user_id, created_at, last_seen_at, expires_at)
             SELECT sha256(int8send(-g)), 'stats-user', now() - interval '3 days',
                    now() - interval '3 days', now() - interval '2 days'
               FROM generate_series(1, {SESSIONS}) g;
             SELECT keel.emit('stats', jsonb_build_object('n', g))
               FROM generate_series(1, {EVENTS}) g;
             SELECT keel.set_task('cleanup_sessions', '1 second');"
        ),
    );
    let counted = wait_for(DEADLINE, || {
        let s = deleted(&mut c, "sessions") - sessions_before;
        let p = deleted(&mut c, "outbox_pending") - pending_before;
        (s >= SESSIONS && p >= EVENTS).then_some((s, p))
    });
    let left: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.sessions WHERE user_id = 'stats-user'",
    );
    exec(
        &mut c,
        "SELECT keel.set_task('cleanup_sessions', '1 minute')",
    );
    assert_eq!(left, 0, "the cleanup task deleted the ended sessions");
    assert!(
        counted.is_some(),
        "the worker's deletes are not in pg_stat_user_tables: sessions {}, outbox_pending {}",
        deleted(&mut c, "sessions") - sessions_before,
        deleted(&mut c, "outbox_pending") - pending_before
    );
}
