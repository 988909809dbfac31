//! The transactional outbox over real connections, with the background worker dispatching to a
//! real redis-server: commit → entry, rollback → nothing, idempotent emits, routes, replay,
//! Redis going away while events are emitted, crashes, and failover to a streaming standby.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use keel_pg_test::{
    exec, expect_sqlstates, one, run, sqlstate, tests, wait_for, wait_worker_idle, Client, Env,
};

fn main() {
    let tests = tests![
        worker_reports_itself_and_hides_the_password,
        committed_emit_reaches_the_stream_with_every_field,
        rolled_back_emit_never_reaches_redis,
        retried_idempotent_emit_is_one_entry,
        routes_to_list_and_pubsub,
        replay_appends_again,
        bad_input_gets_a_sqlstate_and_changes_nothing,
        sighup_moves_dispatch_to_a_new_redis,
        oom_and_readonly_redis_keep_events_pending,
        refused_event_goes_dead_without_blocking_its_topic,
        no_topic_or_route_reaches_the_internal_keys_and_a_refusal_there_spares_the_batch,
        every_stored_field_of_an_event_is_bounded,
        immediate_shutdown_loses_no_pending_event,
        killed_worker_mid_dispatch_loses_and_doubles_nothing,
        failover_to_a_standby_loses_and_doubles_nothing,
        redis_down_keeps_events_pending_then_delivers_each_once,
        in_a_deadlock_with_a_user_the_worker_gives_way,
        late_commit_is_never_passed_over_and_aggregates_keep_order,
        // Last: they drop and re-create the extension.
        recreated_outbox_reuses_ids_without_losing_events,
        drop_extension_while_the_worker_dispatches_is_never_refused,
    ];
    run(tests)
}

const DEADLINE: Duration = Duration::from_secs(20);

type Entry = (String, HashMap<String, String>);

/// Every entry of a stream: (entry id, fields).
fn xrange(env: &Env, key: &str) -> Vec<Entry> {
    env.redis.xrange(key)
}

/// Waits until the stream holds `n` entries (or the deadline passes) and returns them.
fn wait_entries(env: &Env, key: &str, n: usize) -> Vec<Entry> {
    wait_for(DEADLINE, || {
        let entries = xrange(env, key);
        (entries.len() >= n).then_some(entries)
    })
    .unwrap_or_else(|| {
        panic!(
            "{key}: fewer than {n} entries after {DEADLINE:?}: {:?}",
            xrange(env, key)
        )
    })
}

fn worker_reports_itself_and_hides_the_password(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let r = c
        .query_one(
            "SELECT pid, database, redis_target, redis_connected FROM keel.worker_status()",
            &[],
        )
        .unwrap();
    assert!(r.get::<_, Option<i32>>(0).is_some());
    assert_eq!(r.get::<_, String>(1), keel_pg_test::DATABASE);
    assert_eq!(r.get::<_, String>(2), env.redis.url());
    assert!(r.get::<_, bool>(3));
    let worker_seen: i64 = one(
        &mut c,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_keel'",
    );
    assert_eq!(worker_seen, 1, "the worker shows in pg_stat_activity");
}

fn committed_emit_reaches_the_stream_with_every_field(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let mut tx = c.transaction().unwrap();
    let id: i64 = tx
        .query_one(
            "SELECT keel.emit('orders', '{\"total\": 12.5, \"items\": [1, 2]}', 'order-7', 3, '{\"trace\": \"abc\"}')",
            &[],
        )
        .unwrap()
        .get(0);
    let created: String = tx
        .query_one(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM keel.outbox WHERE id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    let entries = wait_entries(env, "keel:orders", 1);
    assert_eq!(entries.len(), 1);
    let f = &entries[0].1;
    assert_eq!(f["id"], id.to_string());
    assert_eq!(f["topic"], "orders");
    assert_eq!(f["aggregate_id"], "order-7");
    assert_eq!(f["version"], "3");
    let payload: serde_json::Value = serde_json::from_str(&f["payload"]).unwrap();
    assert_eq!(payload, serde_json::json!({"total": 12.5, "items": [1, 2]}));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&f["headers"]).unwrap(),
        serde_json::json!({"trace": "abc"})
    );
    assert_eq!(f["created_at"], created);
    let state = wait_for(DEADLINE, || {
        let s: String = c
            .query_one("SELECT state FROM keel.outbox WHERE id = $1", &[&id])
            .unwrap()
            .get(0);
        (s == "dispatched").then_some(s)
    });
    assert_eq!(state.as_deref(), Some("dispatched"));
    let r = c
        .query_one(
            "SELECT pending, dispatched, dead FROM keel.outbox_stats WHERE topic = 'orders'",
            &[],
        )
        .unwrap();
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)),
        (0, 1, 0)
    );
}

fn rolled_back_emit_never_reaches_redis(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT keel.emit('rb', '{\"n\": \"rolled back\"}')", &[])
        .unwrap();
    tx.rollback().unwrap();
    let marker: i64 = one(&mut c, "SELECT keel.emit('rb', '{\"n\": \"committed\"}')");
    let entries = wait_entries(env, "keel:rb", 1);
    std::thread::sleep(Duration::from_millis(300));
    let entries_later = xrange(env, "keel:rb");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries_later.len(), 1, "nothing else arrives later");
    assert_eq!(entries[0].1["id"], marker.to_string());
}

fn retried_idempotent_emit_is_one_entry(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let first: i64 = one(
        &mut c,
        "SELECT keel.emit('idem', '{\"v\": 1}', 'acct-1', 1)",
    );
    let again: i64 = one(
        &mut c,
        "SELECT keel.emit('idem', '{\"v\": 1}', 'acct-1', 1)",
    );
    assert_eq!(first, again);
    let next: i64 = one(
        &mut c,
        "SELECT keel.emit('idem', '{\"v\": 2}', 'acct-1', 2)",
    );
    wait_entries(env, "keel:idem", 2);
    std::thread::sleep(Duration::from_millis(300));
    let ids: Vec<String> = xrange(env, "keel:idem")
        .iter()
        .map(|e| e.1["id"].clone())
        .collect();
    assert_eq!(
        ids,
        vec![first.to_string(), next.to_string()],
        "one entry per version, in order"
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.outbox WHERE topic = 'idem'"
        ),
        2
    );
}

fn routes_to_list_and_pubsub(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    exec(
        &mut c,
        "SELECT keel.create_route('to-list', 'list', 'app:inbox');
         SELECT keel.create_route('to-chan', 'pubsub', 'app:events');
         SELECT keel.create_route('to-capped', 'stream', maxlen => 5);",
    );
    let mut sub = redis::Client::open(env.redis.url().as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe("app:events").unwrap();
    pubsub.set_read_timeout(Some(DEADLINE)).unwrap();
    let listed: i64 = one(&mut c, "SELECT keel.emit('to-list', '{\"k\": \"list\"}')");
    let published: i64 = one(&mut c, "SELECT keel.emit('to-chan', '{\"k\": \"chan\"}')");
    let msg = pubsub.get_message().expect("published message");
    let body: serde_json::Value =
        serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
    assert_eq!(body["id"], serde_json::json!(published));
    assert_eq!(body["payload"], serde_json::json!({"k": "chan"}));
    let mut r = env.redis.connection();
    let item = wait_for(DEADLINE, || {
        redis::cmd("RPOP")
            .arg("app:inbox")
            .query::<Option<String>>(&mut r)
            .ok()
            .flatten()
    })
    .expect("list item");
    let body: serde_json::Value = serde_json::from_str(&item).unwrap();
    assert_eq!(body["id"], serde_json::json!(listed));
    assert_eq!(body["topic"], serde_json::json!("to-list"));
    exec(
        &mut c,
        "SELECT keel.emit('to-capped', jsonb_build_object('n', g)) FROM generate_series(1, 300) g",
    );
    let all_dispatched = wait_for(DEADLINE, || {
        let pending: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.outbox WHERE topic = 'to-capped' AND state <> 'dispatched'",
        );
        (pending == 0).then_some(())
    });
    assert!(all_dispatched.is_some());
    let len: i64 = redis::cmd("XLEN")
        .arg("keel:to-capped")
        .query(&mut r)
        .unwrap();
    // MAXLEN ~ trims whole stream nodes (100 entries each by default), never below maxlen.
    assert!(
        (5..300).contains(&len),
        "MAXLEN ~ 5 trims the stream, got {len}"
    );
}

fn replay_appends_again(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let a: i64 = one(&mut c, "SELECT keel.emit('replayed', '{\"n\": 1}')");
    let b: i64 = one(&mut c, "SELECT keel.emit('replayed', '{\"n\": 2}')");
    wait_entries(env, "keel:replayed", 2);
    wait_for(DEADLINE, || {
        let pending: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.outbox WHERE topic = 'replayed' AND state <> 'dispatched'",
        );
        (pending == 0).then_some(())
    })
    .expect("dispatched");
    let requeued: i64 = c
        .query_one("SELECT keel.outbox_replay('replayed', $1)", &[&b])
        .unwrap()
        .get(0);
    assert_eq!(requeued, 1);
    let entries = wait_entries(env, "keel:replayed", 3);
    let ids: Vec<String> = entries.iter().map(|e| e.1["id"].clone()).collect();
    assert_eq!(ids, vec![a.to_string(), b.to_string(), b.to_string()]);
}

fn bad_input_gets_a_sqlstate_and_changes_nothing(env: &Env) {
    let mut c = env.pg.connect();
    let before: i64 = one(&mut c, "SELECT count(*) FROM keel.outbox");
    let routes: i64 = one(&mut c, "SELECT count(*) FROM keel.outbox_routes");
    let cases: &[(&str, &str)] = &[
        ("SELECT keel.emit('Bad Topic', '{}')", "22023"),
        ("SELECT keel.emit(NULL, '{}')", "22023"),
        ("SELECT keel.emit('t', NULL)", "22023"),
        ("SELECT keel.emit('t', '{}', version => 1)", "22023"),
        (
            "SELECT keel.emit('t', jsonb_build_object('blob', repeat('x', 2000000)))",
            "54000",
        ),
        ("SELECT keel.create_route('t', 'kafka')", "22023"),
        ("SELECT keel.create_route('t', 'list', '')", "22023"),
        (
            "SELECT keel.create_route('t', 'list', maxlen => 10)",
            "22023",
        ),
        (
            "SELECT keel.create_route('t', 'stream', maxlen => 0)",
            "22023",
        ),
        ("SELECT keel.outbox_replay('t', NULL)", "22023"),
        ("SELECT keel.outbox_replay('t', 10, 5)", "22023"),
    ];
    keel_pg_test::expect_sqlstates(&mut c, cases);
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM keel.outbox"),
        before
    );
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM keel.outbox_routes"),
        routes
    );
}

fn redis_down_keeps_events_pending_then_delivers_each_once(env: &Env) {
    const EVENTS: i64 = 250;
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    env.redis.stop();
    for n in 0..EVENTS {
        c.execute(
            "SELECT keel.emit('while-down', jsonb_build_object('n', $1::bigint))",
            &[&n],
        )
        .unwrap();
    }
    let recorded = wait_for(DEADLINE, || {
        let with_error: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.outbox WHERE topic = 'while-down' AND state = 'pending' AND last_error IS NOT NULL",
        );
        (with_error > 0).then_some(with_error)
    });
    assert!(
        recorded.is_some(),
        "pending rows get last_error while Redis is down"
    );
    let pending: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.outbox WHERE topic = 'while-down' AND state = 'pending'",
    );
    assert_eq!(
        pending, EVENTS,
        "nothing lost, nothing marked dead while Redis is down"
    );
    let r = c
        .query_one(
            "SELECT redis_connected, last_error FROM keel.worker_status()",
            &[],
        )
        .unwrap();
    assert!(!r.get::<_, bool>(0));
    assert!(r.get::<_, Option<String>>(1).is_some());
    let stats_error: Option<String> = one(
        &mut c,
        "SELECT last_error FROM keel.outbox_stats WHERE topic = 'while-down'",
    );
    assert!(stats_error.is_some());

    env.redis.start_again();
    let entries = wait_entries(env, "keel:while-down", EVENTS as usize);
    std::thread::sleep(Duration::from_millis(500));
    let entries_later = xrange(env, "keel:while-down");
    assert_eq!(entries_later.len(), entries.len(), "no late duplicates");
    let ids: Vec<i64> = entries.iter().map(|e| e.1["id"].parse().unwrap()).collect();
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len() as i64, EVENTS, "every event delivered");
    assert_eq!(unique.len(), ids.len(), "no event id twice");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "delivered in id order");
    let undelivered: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.outbox WHERE topic = 'while-down' AND state <> 'dispatched'",
    );
    assert_eq!(undelivered, 0);
    println!(
        "    {EVENTS} emitted while Redis was down: {} delivered, {} duplicated",
        ids.len(),
        ids.len() - unique.len()
    );
}

fn stream_ids(env: &Env, key: &str) -> Vec<i64> {
    xrange(env, key)
        .iter()
        .map(|e| e.1["id"].parse().expect("numeric id"))
        .collect()
}

fn wait_all_dispatched(c: &mut Client, topic: &str) {
    wait_for(Duration::from_secs(120), || {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM keel.outbox WHERE topic = $1 AND state <> 'dispatched'",
                &[&topic],
            )
            .ok()?
            .get(0);
        (n == 0).then_some(())
    })
    .unwrap_or_else(|| panic!("{topic}: events still pending"));
}

fn sighup_moves_dispatch_to_a_new_redis(env: &Env) {
    let other = keel_pg_test::Redis::start();
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    exec(
        &mut c,
        &format!("ALTER SYSTEM SET keel.redis_url = '{}'", other.url()),
    );
    exec(&mut c, "SELECT pg_reload_conf()");
    let moved = wait_for(DEADLINE, || {
        let target: Option<String> = one(&mut c, "SELECT redis_target FROM keel.worker_status()");
        (target.as_deref() == Some(other.url().as_str())).then_some(())
    });
    assert!(
        moved.is_some(),
        "the worker picked up the new keel.redis_url"
    );
    let id: i64 = one(&mut c, "SELECT keel.emit('moved', '{}')");
    let mut r = other.connection();
    let got = wait_for(DEADLINE, || {
        let len: i64 = redis::cmd("XLEN").arg("keel:moved").query(&mut r).ok()?;
        (len == 1).then_some(())
    });
    assert!(got.is_some(), "event {id} reached the new Redis");
    assert!(xrange(env, "keel:moved").is_empty(), "and not the old one");
    exec(&mut c, "ALTER SYSTEM RESET keel.redis_url");
    exec(&mut c, "SELECT pg_reload_conf()");
    wait_for(DEADLINE, || {
        let target: Option<String> = one(&mut c, "SELECT redis_target FROM keel.worker_status()");
        (target.as_deref() == Some(env.redis.url().as_str())).then_some(())
    })
    .expect("back on the first Redis");
}

fn immediate_shutdown_loses_no_pending_event(env: &Env) {
    const EVENTS: i64 = 300;
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    env.redis.stop();
    exec(&mut c, &format!("SELECT keel.emit('crash-pending', jsonb_build_object('n', g)) FROM generate_series(1, {EVENTS}) g"));
    drop(c);
    env.pg.crash();
    env.redis.start_again();
    env.pg.start_again();
    let mut c = env.pg.connect();
    wait_all_dispatched(&mut c, "crash-pending");
    let ids = stream_ids(env, "keel:crash-pending");
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(
        (ids.len() as i64, unique.len() as i64),
        (EVENTS, EVENTS),
        "each pending event once after crash recovery"
    );
    println!(
        "    {EVENTS} pending at pg_ctl stop -m immediate: {} delivered, {} duplicated",
        unique.len(),
        ids.len() - unique.len()
    );
}

fn killed_worker_mid_dispatch_loses_and_doubles_nothing(env: &Env) {
    const EVENTS: i64 = 30_000;
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    exec(&mut c, "SELECT keel.create_route('kill9', 'stream')");
    exec(&mut c, &format!("SELECT keel.emit('kill9', jsonb_build_object('n', g)) FROM generate_series(1, {EVENTS}) g"));
    // Let dispatch get going, then kill -9 the worker in the middle of it.
    let mut r = env.redis.connection();
    wait_for(DEADLINE, || {
        let len: i64 = redis::cmd("XLEN").arg("keel:kill9").query(&mut r).ok()?;
        (len >= 3000).then_some(())
    })
    .expect("dispatch under way");
    let pid: i32 = one(&mut c, "SELECT pid FROM keel.worker_status()");
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let at_kill: i64 = redis::cmd("XLEN").arg("keel:kill9").query(&mut r).unwrap();
    drop(c);
    // The postmaster restarts every backend after a crash; reconnect and wait for the rest.
    std::thread::sleep(Duration::from_millis(500));
    let mut c = env.pg.connect();
    wait_all_dispatched(&mut c, "kill9");
    let ids = stream_ids(env, "keel:kill9");
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len() as i64, EVENTS, "every event arrived");
    assert_eq!(ids.len(), unique.len(), "no event id twice");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order");
    println!(
        "    kill -9 of the worker after {at_kill} of {EVENTS} events: {} delivered, {} duplicated",
        unique.len(),
        ids.len() - unique.len()
    );
}

/// The seed's failover: the primary dies in the middle of a dispatch and its streaming standby
/// is promoted. The worker's "delivered" marks commit without waiting for the flush, so some
/// of what the old primary sent is pending again on the new one, which sends it again: Redis'
/// dedupe record (same epoch, replicated with the data) drops it. Then the old primary comes
/// back on its own (split brain, same Redis) and sends its own pending copies: dropped too.
fn failover_to_a_standby_loses_and_doubles_nothing(env: &Env) {
    const EVENTS: i64 = 50_000;
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let standby = env.pg.standby();
    exec(&mut c, "SELECT keel.create_route('failover', 'stream')");
    // Emitted while Redis is away, so that the crash lands in the middle of the dispatch.
    env.redis.stop();
    exec(&mut c, &format!("SELECT keel.emit('failover', jsonb_build_object('n', g)) FROM generate_series(1, {EVENTS}) g"));
    // Replication is asynchronous: the emits must be on the standby for it to have them.
    env.pg.wait_replayed_by(&standby);
    env.redis.start_again();
    let mut r = env.redis.connection();
    wait_for(Duration::from_secs(60), || {
        let len: i64 = redis::cmd("XLEN").arg("keel:failover").query(&mut r).ok()?;
        (len >= 1000).then_some(())
    })
    .expect("dispatch under way on the primary");
    drop(c);
    env.pg.crash();
    let at_crash: i64 = redis::cmd("XLEN")
        .arg("keel:failover")
        .query(&mut r)
        .expect("XLEN");
    standby.promote();
    let mut s = standby.connect();
    wait_all_dispatched(&mut s, "failover");
    let ids = stream_ids(env, "keel:failover");
    let unique: HashSet<i64> = ids.iter().copied().collect();
    let resent: i64 = one(&mut s, "SELECT dispatched_total FROM keel.worker_status()");
    assert_eq!(unique.len() as i64, EVENTS, "every event arrived");
    assert_eq!(ids.len(), unique.len(), "no event id twice after failover");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order");

    // The old primary returns as a second primary on the same Redis.
    env.pg.start_again();
    let mut c = env.pg.connect();
    wait_all_dispatched(&mut c, "failover");
    let again = stream_ids(env, "keel:failover");
    assert_eq!(
        again.len() as i64,
        EVENTS,
        "the old primary's copies were dropped"
    );
    println!(
        "    failover after {at_crash} of {EVENTS} events: the promoted standby sent {resent} \
         ({} of them already in Redis, dropped by the dedupe); {} delivered, {} duplicated, \
         also after the old primary came back",
        resent - (EVENTS - at_crash),
        unique.len(),
        again.len() - unique.len()
    );
    drop(s);
    drop(standby);
}

/// A deadlock between the worker and a user, made on purpose with the user waiting first
/// (the order in which PostgreSQL's own check would refuse the user): the worker records a
/// delivery by deleting the event's work-list row and then updating its topic. A user holds
/// the topic table (SHARE), the row is held by a third session so the worker waits in its
/// DELETE, the user then asks for the work list the worker holds, and the third session lets
/// go: the worker now waits for the user's table. The worker must be the one refused; it
/// starts again and the event is in Redis once.
fn in_a_deadlock_with_a_user_the_worker_gives_way(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    exec(&mut c, "SELECT keel.emit('deadlock', '{}')");
    wait_all_dispatched(&mut c, "deadlock");
    // The next event waits while Redis is away; a third session then holds its row.
    env.redis.stop();
    let id: i64 = one(&mut c, "SELECT keel.emit('deadlock', '{}')");
    std::thread::sleep(Duration::from_millis(300));
    let mut holder = env.pg.connect();
    let mut holding = holder.transaction().expect("begin");
    holding
        .batch_execute(&format!(
            "SELECT 1 FROM keel.outbox_pending WHERE id = {id} FOR UPDATE"
        ))
        .expect("hold the row");
    let mut user = env.pg.connect();
    exec(
        &mut user,
        "BEGIN; LOCK TABLE keel.outbox_topics IN SHARE MODE",
    );
    let user_pid: i32 = one(&mut user, "SELECT pg_backend_pid()");
    // Redis stays away a while longer: the worker retries and notes why the held event waits
    // without waiting for its row (a run once saw it blocked there, and no deadlock followed).
    std::thread::sleep(Duration::from_millis(1500));
    env.redis.start_again();
    let worker: i32 = one(&mut c, "SELECT pid FROM keel.worker_status()");
    let waiting_on = |c: &mut Client, pid: i32| -> String {
        one(
            c,
            &format!(
                "SELECT coalesce(wait_event_type || ':' || wait_event, '')
                   FROM pg_stat_activity WHERE pid = {pid}"
            ),
        )
    };
    wait_for(DEADLINE, || {
        (waiting_on(&mut c, worker) == "Lock:transactionid").then_some(())
    })
    .expect("the worker sent the event and waits for the row in its DELETE");
    let asking = std::thread::spawn(move || {
        let got =
            sqlstate(user.batch_execute("LOCK TABLE keel.outbox_pending IN ACCESS EXCLUSIVE MODE"));
        let _ = user.batch_execute("ROLLBACK");
        got
    });
    wait_for(DEADLINE, || {
        (waiting_on(&mut c, user_pid) == "Lock:relation").then_some(())
    })
    .expect("the user waits for the work list");
    // The user has waited a while when the cycle closes.
    std::thread::sleep(Duration::from_millis(300));
    holding.commit().expect("let the row go");
    let refused = asking.join().expect("user");
    assert_eq!(
        refused, None,
        "the user's LOCK went through: the worker gave way"
    );
    assert!(
        env.pg.log().contains("deadlock detected"),
        "there was a deadlock"
    );
    wait_all_dispatched(&mut c, "deadlock");
    // (Redis without persistence forgot the first event when it restarted.)
    assert_eq!(
        stream_ids(env, "keel:deadlock"),
        [id],
        "sent before the deadlock, sent again after it, in the stream once"
    );
}

fn oom_and_readonly_redis_keep_events_pending(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let mut r = env.redis.connection();
    for (refusal, on, off) in [
        (
            "OOM",
            vec!["CONFIG", "SET", "maxmemory", "1"],
            vec!["CONFIG", "SET", "maxmemory", "0"],
        ),
        (
            "READONLY",
            vec!["REPLICAOF", "127.0.0.1", "1"],
            vec!["REPLICAOF", "NO", "ONE"],
        ),
    ] {
        let topic = format!("refused-{}", refusal.to_lowercase());
        let mut cmd = redis::cmd(on[0]);
        cmd.arg(&on[1..]);
        let _: redis::Value = cmd.query(&mut r).expect("make redis refuse writes");
        let id: i64 = c
            .query_one("SELECT keel.emit($1, '{}')", &[&topic])
            .unwrap()
            .get(0);
        let error = wait_for(DEADLINE, || {
            c.query_one("SELECT last_error FROM keel.outbox WHERE id = $1", &[&id])
                .ok()?
                .get::<_, Option<String>>(0)
        })
        .unwrap_or_else(|| panic!("{refusal}: no last_error recorded"));
        assert!(error.to_uppercase().contains(refusal), "{refusal}: {error}");
        let (state, attempts): (String, i32) = {
            let row = c
                .query_one(
                    "SELECT state, attempts FROM keel.outbox WHERE id = $1",
                    &[&id],
                )
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!(
            (state.as_str(), attempts),
            ("pending", 0),
            "{refusal} is not the event's fault"
        );
        let mut cmd = redis::cmd(off[0]);
        cmd.arg(&off[1..]);
        let _: redis::Value = cmd.query(&mut r).expect("let redis accept writes");
        let ids = wait_for(DEADLINE, || {
            let ids = stream_ids(env, &format!("keel:{topic}"));
            (!ids.is_empty()).then_some(ids)
        });
        assert_eq!(
            ids,
            Some(vec![id]),
            "{refusal}: delivered once Redis accepts writes"
        );
    }
}

/// The attack of issue 12: a topic named like pg_keel's dedupe records (`dispatched:<epoch>:n`)
/// made its stream key equal to one of them and stopped every topic. Internal keys now live
/// under `keel#`, which no topic key or route can reach; and a refusal at an internal key (here
/// a string planted where a dedupe hash goes) refuses the events of that key only.
fn no_topic_or_route_reaches_the_internal_keys_and_a_refusal_there_spares_the_batch(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let epoch: String = one(&mut c, "SELECT epoch FROM keel.outbox_instance");
    let odd = format!("dispatched:{epoch}:0");
    let id: i64 = c
        .query_one("SELECT keel.emit($1, '{}')", &[&odd])
        .expect("emit")
        .get(0);
    let fine: i64 = one(&mut c, "SELECT keel.emit('after-odd', '{}')");
    wait_for(DEADLINE, || {
        (stream_ids(env, "keel:after-odd") == vec![fine]).then_some(())
    })
    .expect("other topics keep flowing");
    assert_eq!(stream_ids(env, &format!("keel:{odd}")), vec![id]);
    let refused = sqlstate(c.batch_execute(&format!(
        "SELECT keel.create_route('to-internal', 'stream', 'keel#dispatched:{epoch}:7')"
    )));
    assert_eq!(
        refused.as_deref(),
        Some("22023"),
        "a route into keel# is refused"
    );
    // A wrong-type key where the dedupe hash of the next block of 100 ids goes: 250 events
    // span three blocks; the 100 of the planted one are refused, the other 150 arrive.
    let next: i64 = one(
        &mut c,
        "SELECT last_value + 1 FROM keel.outbox_events_id_seq",
    );
    let planted = format!("keel#dispatched:{epoch}:{}", next / 100 + 1);
    let mut r = env.redis.connection();
    let _: () = redis::cmd("SET")
        .arg(&planted)
        .arg("x")
        .query(&mut r)
        .unwrap();
    exec(
        &mut c,
        "SELECT keel.emit('spared', jsonb_build_object('n', g)) FROM generate_series(1, 250) g",
    );
    wait_for(DEADLINE, || {
        (stream_ids(env, "keel:spared").len() == 150).then_some(())
    })
    .expect("the events of the other blocks arrived");
    let refused: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.outbox WHERE topic = 'spared' AND state <> 'dispatched'
            AND last_error LIKE '%WRONGTYPE%'",
    );
    assert_eq!(refused, 100, "only the planted block's events are refused");
    let _: () = redis::cmd("DEL").arg(&planted).query(&mut r).unwrap();
    println!("    a topic named like a dedupe record delivered; a planted key refused 100 of 250, 150 delivered");
}

/// Payload, headers and aggregate_id together are bounded by keel.max_payload_bytes (the
/// headers were not: 30 events of 60 MB headers put the worker out of memory).
fn every_stored_field_of_an_event_is_bounded(env: &Env) {
    let mut c = env.pg.connect();
    let before: i64 = one(&mut c, "SELECT count(*) FROM keel.outbox_events");
    expect_sqlstates(
        &mut c,
        &[
            (
                "SELECT keel.emit('big', '{}', headers => jsonb_build_object('h', repeat('x', 2 * 1024 * 1024)))",
                "54000",
            ),
            (
                "SELECT keel.emit('big', '{}', aggregate_id => repeat('x', 2 * 1024 * 1024))",
                "54000",
            ),
            (
                "SELECT keel.emit('big', jsonb_build_object('p', repeat('x', 700 * 1024)), headers => jsonb_build_object('h', repeat('y', 700 * 1024)))",
                "54000",
            ),
        ],
    );
    let after: i64 = one(&mut c, "SELECT count(*) FROM keel.outbox_events");
    assert_eq!(after, before, "nothing stored");
}

fn refused_event_goes_dead_without_blocking_its_topic(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let mut r = env.redis.connection();
    // The route of 'wrongtype' points at a string key: XADD fails with WRONGTYPE every time.
    let _: () = redis::cmd("SET")
        .arg("app:not-a-stream")
        .arg("x")
        .query(&mut r)
        .unwrap();
    exec(
        &mut c,
        "SELECT keel.create_route('wrongtype', 'stream', 'app:not-a-stream')",
    );
    let bad: i64 = one(&mut c, "SELECT keel.emit('wrongtype', '{\"n\": 1}')");
    let good: i64 = one(&mut c, "SELECT keel.emit('fine', '{\"n\": 2}')");
    let dead = wait_for(DEADLINE, || {
        let s: String = c
            .query_one("SELECT state FROM keel.outbox WHERE id = $1", &[&bad])
            .ok()?
            .get(0);
        (s == "dead").then_some(())
    });
    assert!(dead.is_some(), "the refused event is marked dead");
    let r2 = c
        .query_one(
            "SELECT attempts, last_error FROM keel.outbox WHERE id = $1",
            &[&bad],
        )
        .unwrap();
    assert_eq!(
        r2.get::<_, i32>(0),
        10,
        "after keel.outbox_max_attempts refusals"
    );
    assert!(r2.get::<_, String>(1).contains("WRONGTYPE"));
    assert_eq!(
        stream_ids(env, "keel:fine"),
        vec![good],
        "other events keep flowing"
    );
    let later: i64 = one(&mut c, "SELECT keel.emit('fine', '{\"n\": 3}')");
    wait_for(DEADLINE, || {
        (stream_ids(env, "keel:fine").len() == 2).then_some(())
    })
    .expect("later event");
    assert_eq!(stream_ids(env, "keel:fine"), vec![good, later]);
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT dead FROM keel.outbox_stats WHERE topic = 'wrongtype'"
        ),
        1
    );
    // Fixed on the Redis side: a replay delivers it.
    let _: () = redis::cmd("DEL")
        .arg("app:not-a-stream")
        .query(&mut r)
        .unwrap();
    assert_eq!(
        c.query_one("SELECT keel.outbox_replay('wrongtype', $1)", &[&bad])
            .unwrap()
            .get::<_, i64>(0),
        1
    );
    let ids = wait_for(DEADLINE, || {
        let ids = stream_ids(env, "app:not-a-stream");
        (!ids.is_empty()).then_some(ids)
    });
    assert_eq!(ids, Some(vec![bad]));
}

/// While the dispatcher works through a backlog (Redis running one batch while the next is
/// read), an event with a lower id commits late: it is delivered, once, and the next event of
/// its aggregate arrives after it.
fn late_commit_is_never_passed_over_and_aggregates_keep_order(env: &Env) {
    const BACKLOG: i64 = 20_000;
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let mut late = env.pg.connect();
    let mut tx = late.transaction().unwrap();
    let late_id: i64 = tx
        .query_one("SELECT keel.emit('late', '{\"v\": 1}', 'acct-1', 1)", &[])
        .unwrap()
        .get(0);
    exec(&mut c, &format!("SELECT keel.emit('late', jsonb_build_object('n', g)) FROM generate_series(1, {BACKLOG}) g"));
    let mut r = env.redis.connection();
    wait_for(DEADLINE, || {
        let len: i64 = redis::cmd("XLEN").arg("keel:late").query(&mut r).ok()?;
        (len >= 2000).then_some(())
    })
    .expect("dispatch under way");
    tx.commit().unwrap();
    let next_id: i64 = one(
        &mut c,
        "SELECT keel.emit('late', '{\"v\": 2}', 'acct-1', 2)",
    );
    wait_all_dispatched(&mut c, "late");
    let ids = stream_ids(env, "keel:late");
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len() as i64, BACKLOG + 2, "every event arrived");
    assert_eq!(ids.len(), unique.len(), "no event id twice");
    let at = |id: i64| ids.iter().position(|&x| x == id).expect("in the stream");
    assert!(
        at(late_id) < at(next_id),
        "acct-1 version 1 (id {late_id}) arrives before version 2 (id {next_id})"
    );
    assert!(
        at(late_id) > 0,
        "the late event came after events with higher ids"
    );
}

/// Ids start again at 1 when the extension is dropped and created again; Redis still remembers
/// the old ids for the retention window. New events are delivered all the same.
fn recreated_outbox_reuses_ids_without_losing_events(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let used: i64 = one(&mut c, "SELECT max(id) FROM keel.outbox");
    exec(&mut c, "DROP EXTENSION pg_keel CASCADE");
    exec(&mut c, "CREATE EXTENSION pg_keel");
    let ids: Vec<i64> = (0..5)
        .map(|i| {
            c.query_one(
                "SELECT keel.emit('again', jsonb_build_object('n', $1::int))",
                &[&i],
            )
            .unwrap()
            .get(0)
        })
        .collect();
    assert!(ids[0] <= used, "ids start again ({} after {used})", ids[0]);
    let entries = wait_entries(env, "keel:again", 5);
    let got: Vec<i64> = entries
        .iter()
        .map(|e| e.1["id"].parse().expect("numeric id"))
        .collect();
    assert_eq!(got, ids);
}

/// DROP EXTENSION locks keel's tables one after another while the worker, dispatching, reads
/// some of them: the two can deadlock (seen once by hand, at the worker's start). The user's
/// statement must not be the one refused (the deterministic case is
/// `in_a_deadlock_with_a_user_the_worker_gives_way`).
fn drop_extension_while_the_worker_dispatches_is_never_refused(env: &Env) {
    const ROUNDS: usize = 3;
    const EVENTS: i64 = 20_000;
    let mut c = env.pg.connect();
    let mut r = env.redis.connection();
    let log_before = env.pg.log().len();
    for round in 0..ROUNDS {
        let topic = format!("dropbusy{round}");
        exec(
            &mut c,
            &format!(
                "SELECT keel.emit('{topic}', jsonb_build_object('n', g))
                   FROM generate_series(1, {EVENTS}) g"
            ),
        );
        wait_for(DEADLINE, || {
            let len: i64 = redis::cmd("XLEN")
                .arg(format!("keel:{topic}"))
                .query(&mut r)
                .ok()?;
            (len > 0).then_some(())
        })
        .unwrap_or_else(|| panic!("round {round}: dispatch did not start"));
        if let Err(e) = c.batch_execute("DROP EXTENSION pg_keel CASCADE") {
            panic!(
                "round {round}: DROP EXTENSION refused while the worker dispatched: {:?}",
                e.as_db_error()
                    .map(|d| (d.code().code().to_string(), d.message().to_string()))
            );
        }
        exec(&mut c, "CREATE EXTENSION pg_keel");
    }
    wait_worker_idle(&mut c);
    let deadlocks = env.pg.log()[log_before..]
        .matches("deadlock detected")
        .count();
    println!("    {ROUNDS} DROP EXTENSION while dispatching: all done, {deadlocks} deadlocks the worker gave way in");
}
