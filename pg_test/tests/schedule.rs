//! Schedules over real connections: each slot enqueued exactly once while the worker is
//! killed in the middle of one, while the server crashes in the middle of one, and while
//! clients call keel.run_schedules beside the worker; what catch_up does after downtime;
//! daylight-saving changes in real zones; bad input refused with its SQLSTATE and nothing
//! changed; privileges.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_pg_test::{
    exec, expect_sqlstates, one, run, sqlstate, tests, wait_for, wait_worker_idle, Env,
};
use postgres::Client;

fn main() {
    let tests = tests![
        a_slot_is_enqueued_once_with_the_worker_killed_or_the_server_crashed_mid_slot,
        clients_running_schedules_beside_the_worker_enqueue_each_slot_once,
        catch_up_after_downtime_all_latest_none,
        daylight_saving_changes_in_real_zones,
        alter_disable_enable_and_a_failing_enqueue,
        bad_input_is_refused_and_changes_nothing,
        only_admins_manage_schedules,
        failing_and_blocked_schedules_do_not_hold_up_the_others,
        // Last: it crashes the primary and brings it back on its own.
        a_promoted_standby_goes_on_from_the_last_slot_it_has,
    ];
    run(tests)
}

const DEADLINE: Duration = Duration::from_secs(30);

/// The idempotency key of a schedule's slot, as keel.run_schedules writes it.
fn key_sql(schedule: &str, slot: &str) -> String {
    format!(
        "'schedule:{schedule}:' || to_char(({slot}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
    )
}

/// (jobs, distinct slots, slots the span from the first to the last holds) of a schedule with
/// an `@every <period>` expression.
fn slot_census(c: &mut Client, schedule: &str, period_secs: i64) -> (i64, i64, i64) {
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT s),
                    coalesce(extract(epoch FROM max(s) - min(s))::bigint / $2 + 1, 0)
               FROM (SELECT replace(replace(substr(idempotency_key, length($1) + 1), 'T', ' '),
                                    'Z', '+00')::timestamptz AS s
                       FROM keel.jobs WHERE idempotency_key LIKE $1 || '%') x",
            &[&format!("schedule:{schedule}:"), &period_secs],
        )
        .expect("census");
    (row.get(0), row.get(1), row.get(2))
}

fn worker_pid(c: &mut Client) -> Option<i32> {
    one(c, "SELECT pid FROM keel.worker_status()")
}

/// Waits until the worker is blocked on a lock (the enqueue of a slot whose key a client holds);
/// its pid.
fn worker_blocked(c: &mut Client, not: i32) -> i32 {
    wait_for(DEADLINE, || {
        let pid = worker_pid(c).filter(|p| *p != not)?;
        let waiting: Option<String> = c
            .query_one(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .ok()?
            .get(0);
        (waiting.as_deref() == Some("Lock")).then_some(pid)
    })
    .unwrap_or_else(|| {
        let seen: Vec<String> = c
            .query(
                "SELECT format('%s %s %s %s %s', pid, backend_type, wait_event_type, wait_event,
                               left(query, 60))
                   FROM pg_stat_activity WHERE backend_type <> 'client backend'
                  UNION ALL SELECT format('%s %s', next_run_at, last_slot) FROM keel.job_schedules",
                &[],
            )
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default();
        panic!("the worker never waited for the slot's key: {seen:#?}")
    })
}

/// A client transaction that takes the key of the schedule's next slot first; the slot time.
fn hold_next_key(blocker: &mut postgres::Transaction<'_>, schedule: &str) -> String {
    let slot: String = blocker
        .query_one(
            "SELECT next_run_at::text FROM keel.job_schedules WHERE name = $1",
            &[&schedule],
        )
        .expect("next_run_at")
        .get(0);
    blocker
        .batch_execute(&format!(
            "SELECT keel.enqueue('sched-once', '{{\"by\": \"client\"}}', idempotency_key => {})",
            key_sql(schedule, &format!("'{slot}'::timestamptz"))
        ))
        .expect("the client takes the slot's key");
    slot
}

fn jobs_of_slot(c: &mut Client, schedule: &str, slot: &str) -> Vec<serde_json::Value> {
    c.query(
        &format!(
            "SELECT payload FROM keel.jobs WHERE idempotency_key = {}",
            key_sql(schedule, &format!("'{slot}'::timestamptz"))
        ),
        &[],
    )
    .expect("jobs of the slot")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn wait_past(c: &mut Client, schedule: &str, slot: &str) {
    wait_for(DEADLINE, || {
        c.query_one(
            "SELECT last_slot >= $2::text::timestamptz FROM keel.job_schedules WHERE name = $1",
            &[&schedule, &slot],
        )
        .ok()?
        .get::<_, Option<bool>>(0)?
        .then_some(())
    })
    .unwrap_or_else(|| panic!("{schedule} never got past {slot}"));
}

fn a_slot_is_enqueued_once_with_the_worker_killed_or_the_server_crashed_mid_slot(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    exec(
        &mut c,
        "SELECT keel.create_queue('sched-once');
         SELECT keel.create_schedule('once', 'sched-once', '@every 3 seconds',
                                     '{\"by\": \"schedule\"}', catch_up => 'all')",
    );
    wait_for(DEADLINE, || {
        one::<Option<i64>>(
            &mut c,
            "SELECT last_job_id FROM keel.schedules WHERE name = 'once'",
        )
    })
    .expect("the first slot");

    // 1. Killed twice while blocked in a slot's enqueue; the client then gives the key back:
    //    the slot is the schedule's job, once.
    let mut blocker_conn = env.pg.connect();
    let mut blocker = blocker_conn.transaction().expect("begin");
    let slot = hold_next_key(&mut blocker, "once");
    let mut last = 0;
    for _ in 0..2 {
        let pid = worker_blocked(&mut c, last);
        let killed: bool = c
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .expect("terminate")
            .get(0);
        assert!(killed);
        last = pid;
    }
    blocker.rollback().expect("rollback");
    wait_past(&mut c, "once", &slot);
    assert_eq!(
        jobs_of_slot(&mut c, "once", &slot),
        vec![serde_json::json!({"by": "schedule"})],
        "killed mid-slot twice, then the key freed: the slot's job once"
    );

    // 2. Killed mid-slot; the client's job with the key commits: the slot is that job, and the
    //    schedule goes on past it.
    let mut blocker = blocker_conn.transaction().expect("begin");
    let slot = hold_next_key(&mut blocker, "once");
    let pid = worker_blocked(&mut c, 0);
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .expect("terminate");
    blocker.commit().expect("commit");
    wait_past(&mut c, "once", &slot);
    assert_eq!(
        jobs_of_slot(&mut c, "once", &slot),
        vec![serde_json::json!({"by": "client"})],
        "the key taken by a committed job: no second job for the slot"
    );

    // 3. The server crashes (immediate stop) while the worker is in a slot.
    let mut blocker = blocker_conn.transaction().expect("begin");
    let slot = hold_next_key(&mut blocker, "once");
    worker_blocked(&mut c, 0);
    env.pg.crash();
    drop(blocker);
    drop(blocker_conn);
    env.pg.start_again();
    let mut c = env.pg.connect();
    wait_past(&mut c, "once", &slot);
    assert_eq!(
        jobs_of_slot(&mut c, "once", &slot),
        vec![serde_json::json!({"by": "schedule"})],
        "after the crash the slot's job once"
    );

    // Every slot from the first to the last, each once (catch_up 'all' fills the time the
    // worker was away).
    exec(
        &mut c,
        "SELECT keel.alter_schedule('once', enabled => false)",
    );
    let (jobs, slots, span) = slot_census(&mut c, "once", 3);
    println!("    {jobs} slots enqueued over the kills and the crash, none twice, none missing");
    assert_eq!(jobs, slots, "a slot twice");
    assert_eq!(slots, span, "a slot missing between the first and the last");
    assert!(jobs >= 4);
    exec(
        &mut c,
        "SELECT keel.drop_schedule('once'); SELECT keel.drop_queue('sched-once', force => true)",
    );
}

fn clients_running_schedules_beside_the_worker_enqueue_each_slot_once(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    exec(
        &mut c,
        "SELECT keel.create_queue('sched-race');
         SELECT keel.create_schedule('race', 'sched-race', '@every 1 second', catch_up => 'all')",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let fired = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, fired) = (stop.clone(), fired.clone());
            let info = env.pg.conninfo(keel_pg_test::DATABASE);
            std::thread::spawn(move || {
                let mut c = Client::connect(&info, postgres::NoTls).expect("connect");
                while !stop.load(Ordering::Relaxed) {
                    let n: i64 = c
                        .query_one("SELECT keel.run_schedules()", &[])
                        .expect("run_schedules")
                        .get(0);
                    fired.fetch_add(n as u64, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().expect("client");
    }
    exec(
        &mut c,
        "SELECT keel.alter_schedule('race', enabled => false)",
    );
    let (jobs, slots, span) = slot_census(&mut c, "race", 1);
    println!(
        "    8 clients and the worker: {jobs} slots, {} enqueued by the clients",
        fired.load(Ordering::Relaxed)
    );
    assert_eq!(jobs, slots);
    assert_eq!(slots, span);
    assert!(jobs >= 5, "{jobs} slots in 6 s");
    exec(
        &mut c,
        "SELECT keel.drop_schedule('race'); SELECT keel.drop_queue('sched-race', force => true)",
    );
}

fn catch_up_after_downtime_all_latest_none(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('sched-catch');
         SELECT keel.create_schedule('catch-' || m, 'sched-catch', '0 * * * *', catch_up => m)
           FROM unnest(ARRAY['all', 'latest', 'none']) m;
         -- Down for five hours: the slots from then on were missed.
         UPDATE keel.job_schedules SET next_run_at = date_trunc('hour', now()) - interval '5 hours'
          WHERE queue = 'sched-catch';
         SELECT keel.run_schedules();",
    );
    // Done by the call above or by the worker, whichever locked each schedule first.
    let (past_hour, recent): (String, bool) = {
        let r = c
            .query_one(
                "SELECT date_trunc('hour', now())::text,
                        now() - date_trunc('hour', now()) <= interval '1 minute'",
                &[],
            )
            .expect("now");
        (r.get(0), r.get(1))
    };
    let keys = |c: &mut Client, m: &str| -> Vec<String> {
        c.query(
            "SELECT idempotency_key FROM keel.jobs WHERE idempotency_key LIKE $1 ORDER BY 1",
            &[&format!("schedule:catch-{m}:%")],
        )
        .expect("keys")
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let all = keys(&mut c, "all");
    let latest = keys(&mut c, "latest");
    let none = keys(&mut c, "none");
    let newest: String = one(
        &mut c,
        &format!(
            "SELECT {}",
            key_sql("catch-latest", &format!("'{past_hour}'::timestamptz"))
        ),
    );
    assert!(
        all.len() == 6 || all.len() == 7,
        "all: each missed hour, {all:?}"
    );
    assert_eq!(latest, vec![newest], "latest: the newest missed slot only");
    if !recent {
        assert!(none.is_empty(), "none: no missed slot, {none:?}");
    }
    let ahead: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.job_schedules
          WHERE queue = 'sched-catch' AND next_run_at > now() AND last_error IS NULL",
    );
    assert_eq!(ahead, 3, "every mode goes on from the next slot after now");
    exec(
        &mut c,
        "SELECT keel.drop_schedule(name) FROM keel.schedules WHERE queue = 'sched-catch';
         SELECT keel.drop_queue('sched-catch', force => true)",
    );
}

fn preview(c: &mut Client, cron: &str, zone: &str, after: &str, n: i32) -> Vec<String> {
    c.query(
        "SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')
           FROM keel.schedule_preview($1, $2, $3, $4::text::timestamptz) t",
        &[&cron, &zone, &n, &after],
    )
    .expect("preview")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn daylight_saving_changes_in_real_zones(env: &Env) {
    let mut c = env.pg.connect();
    // Berlin springs forward at 2026-03-29 02:00 local (01:00 UTC): 02:30 runs at the change.
    assert_eq!(
        preview(
            &mut c,
            "30 2 * * *",
            "Europe/Berlin",
            "2026-03-28 12:00+00",
            3
        ),
        ["2026-03-29 01:00", "2026-03-30 00:30", "2026-03-31 00:30"]
    );
    // New York falls back at 2026-11-01 02:00 EDT: 01:30 happens twice and runs once.
    assert_eq!(
        preview(
            &mut c,
            "30 1 * * *",
            "America/New_York",
            "2026-10-31 12:00+00",
            2
        ),
        ["2026-11-01 05:30", "2026-11-02 06:30"]
    );
    // Hourly across the fall-back: the repeated hour does not run again.
    assert_eq!(
        preview(
            &mut c,
            "0 * * * *",
            "America/New_York",
            "2026-11-01 04:30+00",
            3
        ),
        ["2026-11-01 05:00", "2026-11-01 07:00", "2026-11-01 08:00"]
    );
    // A half-hour zone, and UTC as the default.
    assert_eq!(
        preview(
            &mut c,
            "0 9 * * *",
            "Asia/Kolkata",
            "2026-12-07 00:00+00",
            1
        ),
        ["2026-12-07 03:30"]
    );
    let utc: String = one(
        &mut c,
        "SELECT to_char(keel.schedule_preview('@daily', count => 1, after => '2026-12-07 10:00+00')
                        AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')",
    );
    assert_eq!(utc, "2026-12-08 00:00");
    // @every is elapsed time: the zone changes nothing.
    assert_eq!(
        preview(
            &mut c,
            "@every 90 minutes",
            "Europe/Berlin",
            "2026-03-29 00:00+00",
            2
        ),
        preview(&mut c, "@every 90 minutes", "UTC", "2026-03-29 00:00+00", 2)
    );
}

fn alter_disable_enable_and_a_failing_enqueue(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('sched-alter', max_ready => 1);
         SELECT keel.create_queue('sched-alter-2');
         SELECT keel.create_schedule('alter', 'sched-alter', '0 0 1 1 *', '{\"v\": 1}')",
    );
    let created: bool = one(
        &mut c,
        "SELECT keel.create_schedule('alter', 'sched-alter-2', '@hourly')",
    );
    assert!(!created, "an existing name: false, unchanged");
    let (cron, next): (String, String) = {
        let r = c
            .query_one(
                "SELECT cron, to_char(next_run_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI')
                   FROM keel.schedules WHERE name = 'alter'",
                &[],
            )
            .expect("schedule");
        (r.get(0), r.get(1))
    };
    assert_eq!((cron.as_str(), next.as_str()), ("0 0 1 1 *", "01-01 00:00"));
    // A new expression starts from its first slot after now; disabling clears next_run_at.
    exec(
        &mut c,
        "SELECT keel.alter_schedule('alter', cron => '@every 1 second', payload => '{\"v\": 2}')",
    );
    let soon: bool = one(
        &mut c,
        "SELECT next_run_at <= now() + interval '2 seconds' FROM keel.schedules WHERE name = 'alter'",
    );
    assert!(soon);
    // The queue holds max_ready = 1: the second slot's enqueue fails (53400), is recorded, and
    // the schedule stays on that slot until there is room.
    let error = wait_for(DEADLINE, || {
        exec(&mut c, "SELECT keel.run_schedules()");
        one::<Option<String>>(
            &mut c,
            "SELECT last_error FROM keel.schedules WHERE name = 'alter'",
        )
    })
    .expect("a full queue shows in last_error");
    assert!(error.contains("is full"), "{error}");
    let stuck: bool = one(
        &mut c,
        "SELECT next_run_at < now() FROM keel.schedules WHERE name = 'alter'",
    );
    assert!(stuck, "a failed slot is tried again, not skipped");
    exec(&mut c, "SELECT keel.purge_queue('sched-alter')");
    wait_for(DEADLINE, || {
        exec(&mut c, "SELECT keel.run_schedules()");
        one::<bool>(
            &mut c,
            "SELECT last_error IS NULL AND last_job_state = 'ready' FROM keel.schedules
              WHERE name = 'alter'",
        )
        .then_some(())
    })
    .expect("enqueued once there is room");
    let payload: serde_json::Value = one(
        &mut c,
        "SELECT payload FROM keel.jobs WHERE queue = 'sched-alter'",
    );
    assert_eq!(payload, serde_json::json!({"v": 2}));
    // Disabled: nothing more is enqueued, next_run_at is NULL.
    exec(
        &mut c,
        "SELECT keel.alter_schedule('alter', enabled => false, queue => 'sched-alter-2');
         SELECT keel.purge_queue('sched-alter')",
    );
    std::thread::sleep(Duration::from_millis(2500));
    exec(&mut c, "SELECT keel.run_schedules()");
    let (next, jobs): (Option<String>, i64) = {
        let r = c
            .query_one(
                "SELECT (SELECT next_run_at::text FROM keel.schedules WHERE name = 'alter'),
                        (SELECT count(*) FROM keel.jobs WHERE queue LIKE 'sched-alter%')",
                &[],
            )
            .expect("disabled");
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (next, jobs),
        (None, 0),
        "a disabled schedule enqueues nothing"
    );
    // Enabled again: from the next slot after now (the missed ones are not caught up), into
    // its new queue.
    exec(
        &mut c,
        "SELECT keel.alter_schedule('alter', enabled => true)",
    );
    let started = Instant::now();
    wait_for(DEADLINE, || {
        (one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.jobs WHERE queue = 'sched-alter-2'",
        ) > 0)
            .then_some(())
    })
    .expect("enabled again, into the new queue");
    assert!(started.elapsed() < Duration::from_secs(10));
    exec(
        &mut c,
        "SELECT keel.drop_schedule('alter');
         SELECT keel.drop_queue('sched-alter', force => true);
         SELECT keel.drop_queue('sched-alter-2', force => true)",
    );
    let dropped: bool = one(&mut c, "SELECT keel.drop_schedule('alter')");
    assert!(!dropped, "dropping a schedule that is gone: false");
}

fn bad_input_is_refused_and_changes_nothing(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('sched-bad');
         SELECT keel.create_schedule('bad', 'sched-bad', '@daily')",
    );
    let before: String = one(
        &mut c,
        "SELECT md5(string_agg(s::text, ',' ORDER BY name)) FROM keel.job_schedules s",
    );
    let big = format!("'{{\"x\": \"{}\"}}'", "x".repeat(2_000_000));
    let long_zone = format!("'{}'", "Z".repeat(300));
    let cases: Vec<(String, &str)> = vec![
        (
            "SELECT keel.create_schedule('Bad', 'sched-bad', '@daily')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule(NULL, 'sched-bad', '@daily')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'nope', '@daily')".into(),
            "42704",
        ),
        (
            "SELECT keel.create_schedule('b2', 'No Pe', '@daily')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '61 * * * *')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '0 0 30 2 *')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '@every 0s')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', NULL)".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '@daily', timezone => 'Mars/Olympus')"
                .into(),
            "22023",
        ),
        (
            format!(
                "SELECT keel.create_schedule('b2', 'sched-bad', '@daily', timezone => {long_zone})"
            ),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '@daily', timezone => NULL)".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '@daily', timezone => 'localtime')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '@daily', timezone => 'AAA0BBB-167,J60,J200')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '*/60 * * * *')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '@daily', payload => NULL)".into(),
            "22023",
        ),
        (
            format!("SELECT keel.create_schedule('b2', 'sched-bad', '@daily', payload => {big})"),
            "54000",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '@daily', priority => NULL)".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '@daily', catch_up => 'some')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_schedule('b2', 'sched-bad', '@daily', catch_up => NULL)".into(),
            "22023",
        ),
        (
            "SELECT keel.alter_schedule('nope', enabled => false)".into(),
            "42704",
        ),
        (
            "SELECT keel.alter_schedule('bad', cron => 'x')".into(),
            "22023",
        ),
        (
            "SELECT keel.alter_schedule('bad', timezone => 'x/y')".into(),
            "22023",
        ),
        (
            "SELECT keel.alter_schedule('bad', queue => 'nope')".into(),
            "42704",
        ),
        (
            "SELECT keel.alter_schedule('bad', catch_up => 'never')".into(),
            "22023",
        ),
        ("SELECT keel.drop_schedule('Bad Name')".into(), "22023"),
        // A queue that a schedule enqueues into is not dropped, even with force.
        (
            "SELECT keel.drop_queue('sched-bad', force => true)".into(),
            "2BP01",
        ),
        ("SELECT keel.run_schedules(0)".into(), "22023"),
        (
            "SELECT keel.schedule_preview('@daily', count => 0)".into(),
            "22023",
        ),
        (
            "SELECT keel.schedule_preview('@daily', count => 1001)".into(),
            "22023",
        ),
        (
            "SELECT keel.schedule_preview('@daily', after => 'infinity')".into(),
            "22023",
        ),
        ("SELECT keel.schedule_preview('@reboot')".into(), "22023"),
    ];
    let cases: Vec<(&str, &str)> = cases.iter().map(|(s, w)| (s.as_str(), *w)).collect();
    expect_sqlstates(&mut c, &cases);
    let after: String = one(
        &mut c,
        "SELECT md5(string_agg(s::text, ',' ORDER BY name)) FROM keel.job_schedules s",
    );
    assert_eq!(before, after, "refused calls changed keel.job_schedules");
    // The error says what is wrong and how to write it right.
    let e = c
        .batch_execute("SELECT keel.create_schedule('b2', 'sched-bad', '*/0 * * * *')")
        .expect_err("a zero step");
    let db = e.as_db_error().expect("a server error");
    assert!(db.message().contains("the step \"0\""), "{}", db.message());
    assert!(db.hint().is_some_and(|h| h.contains("schedule_preview")));
    exec(
        &mut c,
        "SELECT keel.drop_schedule('bad'); SELECT keel.drop_queue('sched-bad')",
    );
}

fn only_admins_manage_schedules(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sched_app') THEN
             CREATE ROLE sched_app LOGIN;
           END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sched_admin') THEN
             CREATE ROLE sched_admin LOGIN;
           END IF;
         END $$;
         SELECT keel.create_queue('sched-priv');
         SELECT keel.grant_producer('sched_app', queues => '{sched-priv}');
         SELECT keel.grant_consumer('sched_app', queues => '{sched-priv}');
         SELECT keel.grant_admin('sched_admin');",
    );
    let mut app = env.pg.connect_as("sched_app");
    expect_sqlstates(
        &mut app,
        &[
            (
                "SELECT keel.create_schedule('p', 'sched-priv', '@daily')",
                "42501",
            ),
            ("SELECT keel.alter_schedule('p', enabled => false)", "42501"),
            ("SELECT keel.drop_schedule('p')", "42501"),
            ("SELECT keel.run_schedules()", "42501"),
            ("SELECT * FROM keel.schedules", "42501"),
            ("SELECT * FROM keel.job_schedules", "42501"),
            (
                "SELECT keel._schedule_next('@daily', 'UTC', now())",
                "42501",
            ),
        ],
    );
    let mut admin = env.pg.connect_as("sched_admin");
    exec(
        &mut admin,
        "SELECT keel.create_schedule('p', 'sched-priv', '@every 1 second');
         SELECT keel.alter_schedule('p', priority => 3);",
    );
    let n: i64 = one(
        &mut admin,
        "SELECT count(*) FROM keel.schedules WHERE name = 'p'",
    );
    assert_eq!(n, 1);
    // The worker enqueues as pg_keel's owner, whoever created the schedule.
    wait_for(DEADLINE, || {
        one::<Option<i64>>(
            &mut c,
            "SELECT last_job_id FROM keel.schedules WHERE name = 'p'",
        )
    })
    .expect("the worker enqueues an admin's schedule");
    let priority: i32 = one(
        &mut c,
        "SELECT priority FROM keel.jobs WHERE queue = 'sched-priv' LIMIT 1",
    );
    assert_eq!(priority, 3);
    assert!(one::<bool>(&mut admin, "SELECT keel.drop_schedule('p')"));
    assert_eq!(
        sqlstate(app.batch_execute("SELECT keel.create_schedule('p', 'sched-priv', '@daily')")),
        Some("42501".into())
    );
    drop(app);
    drop(admin);
    exec(
        &mut c,
        "SELECT keel.drop_queue('sched-priv', force => true);
         SELECT keel.revoke_all('sched_app'); SELECT keel.revoke_all('sched_admin');",
    );
}

/// 120 schedules whose queue is full fail at every round, and a client holds the key of
/// another's next slot: a healthy schedule still gets each of its slots, and nobody but
/// pg_keel may take a slot's key.
fn failing_and_blocked_schedules_do_not_hold_up_the_others(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    exec(
        &mut c,
        "SELECT keel.create_queue('sched-full', max_ready => 1);
         SELECT keel.enqueue('sched-full', '{}');
         SELECT keel.create_queue('sched-ok');
         SELECT keel.create_schedule('full-' || g, 'sched-full', '@every 1 second')
           FROM generate_series(1, 120) g;
         SELECT keel.create_schedule('blocked', 'sched-ok', '@every 1 second');
         SELECT keel.create_schedule('healthy', 'sched-ok', '@every 1 second');",
    );
    let mut blocker_conn = env.pg.connect();
    let mut blocker = blocker_conn.transaction().expect("begin");
    blocker
        .batch_execute(&format!(
            "SELECT keel.enqueue('sched-ok', '{{}}', idempotency_key => {})
               FROM keel.job_schedules WHERE name = 'blocked'",
            key_sql("blocked", "next_run_at + interval '1 second'")
        ))
        .expect("a client holds the next key of 'blocked'");
    std::thread::sleep(Duration::from_secs(6));
    let healthy: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.jobs WHERE idempotency_key LIKE 'schedule:healthy:%'",
    );
    let failing: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.schedules WHERE name LIKE 'full-%' AND last_error LIKE '%is full%'",
    );
    blocker.rollback().expect("rollback");
    println!(
        "    {failing} schedules failing and one blocked: the healthy one enqueued {healthy} \
         slots in 6 s"
    );
    assert!(
        healthy >= 3,
        "the healthy schedule got {healthy} slots in 6 s"
    );
    assert!(failing > 0);
    // The same expression given again keeps the schedule where it is.
    exec(
        &mut c,
        "SELECT keel.alter_schedule(name, enabled => false) FROM keel.schedules
          WHERE name LIKE 'full-%' OR name = 'blocked';
         UPDATE keel.job_schedules SET next_run_at = now() - interval '1 day' WHERE name = 'healthy';
         SELECT keel.alter_schedule('healthy', cron => '@every 1 second', timezone => 'UTC');",
    );
    let kept: bool = one(
        &mut c,
        "SELECT next_run_at < now() - interval '23 hours' FROM keel.schedules WHERE name = 'healthy'",
    );
    assert!(kept, "re-applying the same settings reset next_run_at");
    exec(
        &mut c,
        "SELECT keel.alter_schedule('healthy', enabled => false)",
    );
    // Slots' keys are pg_keel's.
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sched_forger') THEN
             CREATE ROLE sched_forger LOGIN;
           END IF;
         END $$;
         SELECT keel.grant_producer('sched_forger', queues => '{sched-ok}');",
    );
    let mut forger = env.pg.connect_as("sched_forger");
    expect_sqlstates(
        &mut forger,
        &[
            (
                "SELECT keel.enqueue('sched-ok', '{}', idempotency_key => 'schedule:healthy:2030-01-01T00:00:00Z')",
                "22023",
            ),
            (
                "SELECT keel.enqueue('sched-ok', '{}', idempotency_key => 'schedule:healthy:2030-01-01T00:00:00Z',
                                     on_duplicate => 'replace')",
                "22023",
            ),
        ],
    );
    let fine: i64 = one(
        &mut forger,
        "SELECT keel.enqueue('sched-ok', '{}', idempotency_key => 'schedules-are-fine')",
    );
    assert!(fine > 0);
    drop(forger);
    exec(
        &mut c,
        "SELECT keel.drop_schedule(name) FROM keel.schedules WHERE queue IN ('sched-full', 'sched-ok');
         SELECT keel.drop_queue('sched-full', force => true);
         SELECT keel.drop_queue('sched-ok', force => true);
         SELECT keel.revoke_all('sched_forger');",
    );
}

/// Failover: the primary crashes while a schedule runs every second and its streaming standby
/// is promoted. The new primary's worker goes on from the last slot the standby has, and
/// catch_up 'all' fills the time between: on the new primary every slot once, none missing.
fn a_promoted_standby_goes_on_from_the_last_slot_it_has(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    exec(
        &mut c,
        "SELECT keel.create_queue('sched-fo');
         SELECT keel.create_schedule('fo', 'sched-fo', '@every 1 second', catch_up => 'all')",
    );
    let standby = env.pg.standby();
    wait_for(DEADLINE, || {
        (one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.jobs WHERE idempotency_key LIKE 'schedule:fo:%'",
        ) >= 3)
            .then_some(())
    })
    .expect("slots on the primary");
    env.pg.wait_replayed_by(&standby);
    // More slots on the primary, some of them perhaps not on the standby yet.
    std::thread::sleep(Duration::from_millis(1500));
    let on_primary: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.jobs WHERE idempotency_key LIKE 'schedule:fo:%'",
    );
    drop(c);
    env.pg.crash();
    let promoted_at = Instant::now();
    standby.promote();
    let mut s = standby.connect();
    wait_for(DEADLINE, || {
        one::<Option<bool>>(
            &mut s,
            "SELECT last_slot > now() - interval '2 seconds' FROM keel.schedules WHERE name = 'fo'",
        )
        .filter(|caught_up| *caught_up)
    })
    .expect("the new primary's worker runs the schedule");
    let caught_up = promoted_at.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    exec(&mut s, "SELECT keel.alter_schedule('fo', enabled => false)");
    let (jobs, slots, span) = slot_census(&mut s, "fo", 1);
    println!(
        "    {on_primary} slots on the old primary at the crash; on the promoted standby {jobs} \
         slots, none twice, none missing, caught up {caught_up:.1} s after the promotion"
    );
    assert_eq!(jobs, slots, "a slot twice on the new primary");
    assert_eq!(slots, span, "a slot missing on the new primary");
    drop(s);
    drop(standby);
    // The old primary comes back on its own for whatever runs after this suite.
    env.pg.start_again();
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.drop_schedule('fo'); SELECT keel.drop_queue('sched-fo', force => true)",
    );
}
