//! Rate limits over real connections: decisions of each algorithm, exactness when many clients
//! hit one key, durability across restart and crash, keys that never block each other, the
//! async commit rule, errors, denial log, cleanup and privileges.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use keel_pg_test::{exec, expect_sqlstates, one, run, sqlstate, tests, wait_for, Client, Env};

fn main() {
    let tests = tests![
        each_algorithm_allows_its_limit_then_says_when,
        hot_key_under_many_clients_allows_exactly_the_limit,
        distinct_keys_never_wait_for_each_other,
        a_decision_sees_the_previous_one_and_waits_for_the_newest_version,
        repeatable_read_read_only_and_triggers_fail_cleanly,
        updates_that_leave_their_page_keep_every_index_right,
        async_policy_skips_the_flush_only_when_alone,
        peek_refund_reset_and_alter,
        denials_are_logged_and_cleanup_removes_what_expired,
        bad_input_gets_a_sqlstate_and_changes_nothing,
        privileges_go_through_the_grant_helpers,
        header_values_are_structured_fields_and_retry_after_is_never_early,
        shadow_mode_allows_every_call_and_logs_exactly_what_it_would_deny,
        memory_policy_peek_refund_reset_and_a_full_table,
        memory_policy_needs_the_preloaded_library,
        check_many_charges_every_policy_or_none,
        check_many_is_exact_and_never_deadlocks_under_many_clients,
        check_many_bad_input_and_privileges_change_nothing,
        check_many_header_values_list_every_policy,
        a_memory_key_decided_in_the_table_is_never_also_decided_in_memory,
        concurrency_limit_holds_exactly_max_slots_under_many_clients,
        concurrency_slots_expire_by_themselves_and_release_once,
        concurrency_limit_bad_input_kinds_and_privileges,
        memory_concurrency_limit_keeps_its_slots_through_snapshots_restarts_and_alter,
        memory_concurrency_pool_full_is_refused_and_takes_nothing,
        a_rate_reset_left_open_never_stalls_the_snapshot,
        counts_survive_restart_and_crash,
    ];
    run(tests)
}

/// (allowed, limit, remaining, retry_after_ms, reset_after_ms)
type Decision = (bool, i32, i32, i64, i64);

fn decide(c: &mut Client, sql: &str) -> Decision {
    let r = c
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

fn each_algorithm_allows_its_limit_then_says_when(env: &Env) {
    let mut c = env.pg.connect();
    for algorithm in ["token_bucket", "fixed_window", "sliding_window"] {
        let name = format!("seq-{}", algorithm.replace('_', "-"));
        // Token bucket: 5 an hour. Windows: 1000 hours, so no window boundary falls inside
        // the test (they are aligned to multiples of `per`).
        let per = if algorithm == "token_bucket" {
            "1 hour"
        } else {
            "1000 hours"
        };
        exec(
            &mut c,
            &format!("SELECT keel.create_limit('{name}', 5, '{per}', '{algorithm}')"),
        );
        let check = format!("SELECT * FROM keel.check('{name}', 'user-1')");
        let ds: Vec<Decision> = (0..7).map(|_| decide(&mut c, &check)).collect();
        let allowed: Vec<bool> = ds.iter().map(|d| d.0).collect();
        assert_eq!(
            allowed,
            [true, true, true, true, true, false, false],
            "{algorithm}"
        );
        let remaining: Vec<i32> = ds.iter().map(|d| d.2).collect();
        assert_eq!(remaining, [4, 3, 2, 1, 0, 0, 0], "{algorithm}");
        assert!(ds.iter().all(|d| d.1 == 5), "limit column: {ds:?}");
        assert!(
            ds[..5].iter().all(|d| d.3 == 0),
            "retry_after 0 when allowed"
        );
        let (retry, reset) = (ds[5].3, ds[5].4);
        // A token comes back after per/max = 12 minutes; a window ends within its period
        // (the sliding one counts this window again in the next, so up to two).
        const PERIOD: i64 = 1000 * 3_600_000;
        match algorithm {
            "token_bucket" => assert!((719_000..=720_000).contains(&retry), "{retry}"),
            "fixed_window" => assert!(retry > 0 && retry <= PERIOD, "{retry}"),
            _ => assert!(retry > 0 && retry <= 2 * PERIOD, "{retry}"),
        }
        assert!(
            reset >= retry,
            "{algorithm}: reset {reset} >= retry {retry}"
        );
        // Another key has its own budget.
        let other = decide(
            &mut c,
            &format!("SELECT * FROM keel.check('{name}', 'user-2')"),
        );
        assert_eq!((other.0, other.2), (true, 4), "{algorithm}");
    }
    // The per-call form keeps its keys apart from named policies.
    let per_call = "SELECT * FROM keel.rate_limit('user-1', 2, '1000 hours', 1, 'fixed_window')";
    let ds: Vec<bool> = (0..3).map(|_| decide(&mut c, per_call).0).collect();
    assert_eq!(ds, [true, true, false]);
    // Cost counts, and a denied call consumes nothing.
    exec(&mut c, "SELECT keel.create_limit('costly', 10, '1 hour')");
    let costs: Vec<(bool, i32)> = [8, 5, 2, 1]
        .iter()
        .map(|cost| {
            let d = decide(
                &mut c,
                &format!("SELECT * FROM keel.check('costly', 'k', {cost})"),
            );
            (d.0, d.2)
        })
        .collect();
    assert_eq!(costs, [(true, 2), (false, 2), (true, 0), (false, 0)]);
}

fn hot_key_under_many_clients_allows_exactly_the_limit(env: &Env) {
    const CLIENTS: usize = 8;
    const CALLS: usize = 150;
    const LIMIT: i64 = 400;
    let mut c = env.pg.connect();
    for durability in ["durable", "async", "memory"] {
        for algorithm in ["token_bucket", "fixed_window", "sliding_window"] {
            let name = format!("hot-{durability}-{}", algorithm.replace('_', "-"));
            exec(
                &mut c,
                &format!("SELECT keel.create_limit('{name}', {LIMIT}, '1000 hours', '{algorithm}', durability => '{durability}')"),
            );
            let sql = format!("SELECT allowed FROM keel.check('{name}', 'the-key')");
            let allowed = hammer(env, CLIENTS, CALLS, &sql);
            println!(
                "    {durability} {algorithm}: {CLIENTS} clients × {CALLS} calls → {allowed} allowed (limit {LIMIT})"
            );
            assert_eq!(allowed, LIMIT, "{durability} {algorithm}");
        }
    }
    let per_call = format!(
        "SELECT allowed FROM keel.rate_limit('per-call-hot', {LIMIT}, '1000 hours', 1, 'token_bucket')"
    );
    assert_eq!(hammer(env, CLIENTS, CALLS, &per_call), LIMIT, "per call");
}

/// `clients` connections each run `sql` `calls` times, all starting together; counts `true`.
fn hammer(env: &Env, clients: usize, calls: usize, sql: &str) -> i64 {
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let mut c = env.pg.connect();
            let (barrier, sql) = (barrier.clone(), sql.to_string());
            std::thread::spawn(move || {
                let stmt = c.prepare(&sql).expect("prepare");
                barrier.wait();
                (0..calls)
                    .filter(|_| c.query_one(&stmt, &[]).expect("decide").get::<_, bool>(0))
                    .count() as i64
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("client")).sum()
}

fn distinct_keys_never_wait_for_each_other(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_limit('apart', 100, '1 hour')");
    // One caller decides on key A inside a transaction it keeps open (its row stays locked).
    let mut holder = env.pg.connect();
    let mut tx = holder.transaction().unwrap();
    tx.query_one("SELECT allowed FROM keel.check('apart', 'A')", &[])
        .unwrap();
    // Others, on other keys, go straight through; A itself would wait.
    exec(&mut c, "SET lock_timeout = '2s'");
    let started = Instant::now();
    for i in 0..50 {
        let d = decide(
            &mut c,
            &format!("SELECT * FROM keel.check('apart', 'B{i}')"),
        );
        assert!(d.0);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "50 other keys took {took:?} while A was held"
    );
    exec(&mut c, "SET lock_timeout = '200ms'");
    assert_eq!(
        sqlstate(c.query_one("SELECT allowed FROM keel.check('apart', 'A')", &[])).as_deref(),
        Some("55P03"),
        "key A waits for its holder"
    );
    tx.rollback().unwrap();
    exec(&mut c, "RESET lock_timeout");
}

fn remaining(c: &mut Client, key: &str) -> i32 {
    decide(c, &format!("SELECT * FROM keel.check('order', '{key}')")).2
}

/// A decision is an in-place update of the key's row (src/ratelimit/heap.rs); these are the
/// UPDATE semantics it keeps.
fn a_decision_sees_the_previous_one_and_waits_for_the_newest_version(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('order', 5, '1000 hours', 'fixed_window')",
    );
    // Called in the select list as well as in FROM (the row is returned natively).
    let projected: i32 = one(
        &mut c,
        "SELECT (keel.check('order', 'projected')).remaining",
    );
    assert_eq!(projected, 4);
    let record: String = one(
        &mut c,
        "SELECT keel.rate_limit('projected', 2, '1000 hours', 1, 'fixed_window')::text",
    );
    assert!(record.starts_with("(t,2,1,0,"), "{record}");
    // Several decisions in one statement each see the one before.
    let r = c
        .query_one(
            "SELECT array_agg(r.remaining ORDER BY g), array_agg(r.allowed ORDER BY g)
               FROM generate_series(1, 7) g,
                    LATERAL keel.check('order', 'one-statement' || left(g::text, 0)) r",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, Vec<i32>>(0), [4, 3, 2, 1, 0, 0, 0]);
    assert_eq!(
        r.get::<_, Vec<bool>>(1),
        [true, true, true, true, true, false, false]
    );
    // In a transaction too, and a rollback takes them all back.
    let mut tx = c.transaction().unwrap();
    for expected in [4, 3, 2] {
        let got: i32 = tx
            .query_one("SELECT remaining FROM keel.check('order', 'tx')", &[])
            .unwrap()
            .get(0);
        assert_eq!(got, expected);
    }
    tx.rollback().unwrap();
    assert_eq!(
        remaining(&mut c, "tx"),
        4,
        "the rolled-back decisions are gone"
    );

    // A decision on a row someone holds waits, then decides on what they leave: their
    // version if they commit, the previous one if they roll back, a fresh key if they
    // deleted it.
    let wait_for_holder = |holder_sql: &str, commit: bool, key: &str| -> i32 {
        let mut holder = env.pg.connect();
        exec(&mut holder, &format!("BEGIN; {holder_sql}"));
        let mut other = env.pg.connect();
        let key = key.to_string();
        let waiter = std::thread::spawn(move || remaining(&mut other, &key));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiter.is_finished(), "the decision waits for the holder");
        exec(&mut holder, if commit { "COMMIT" } else { "ROLLBACK" });
        waiter.join().expect("waiter")
    };
    assert_eq!(remaining(&mut c, "held"), 4);
    let held = "SELECT keel.check('order', 'held')";
    assert_eq!(wait_for_holder(held, true, "held"), 2, "after a commit");
    assert_eq!(wait_for_holder(held, false, "held"), 1, "after a rollback");
    assert_eq!(
        wait_for_holder("SELECT keel.rate_reset('order', 'held')", true, "held"),
        4,
        "after a reset (the row deleted): a fresh key"
    );
    let rows: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.rate_limit_state WHERE policy = 'order' AND key = 'held'",
    );
    assert_eq!(rows, 1);
}

fn repeatable_read_read_only_and_triggers_fail_cleanly(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('iso', 100, '1000 hours', 'fixed_window')",
    );
    decide(&mut c, "SELECT * FROM keel.check('iso', 'k')");
    // REPEATABLE READ: a key changed by a transaction that committed after the snapshot is a
    // serialization failure, as for an UPDATE; the application retries the transaction.
    let mut rr = env.pg.connect();
    exec(&mut rr, "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1");
    decide(&mut c, "SELECT * FROM keel.check('iso', 'k')");
    assert_eq!(
        sqlstate(rr.batch_execute("SELECT keel.check('iso', 'k')")).as_deref(),
        Some("40001")
    );
    exec(&mut rr, "ROLLBACK");
    exec(&mut rr, "BEGIN ISOLATION LEVEL REPEATABLE READ");
    let ds: Vec<i32> = (0..3)
        .map(|_| decide(&mut rr, "SELECT * FROM keel.check('iso', 'k')").2)
        .collect();
    assert_eq!(ds, [97, 96, 95], "alone, it sees its own decisions");
    exec(&mut rr, "COMMIT");
    // A read-only transaction (or a standby) cannot decide: 25006, allowed or not.
    let before: i64 = one(
        &mut c,
        "SELECT a FROM keel.rate_limit_state WHERE policy = 'iso' AND key = 'k'",
    );
    exec(&mut c, "BEGIN READ ONLY");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.check('iso', 'k')")).as_deref(),
        Some("25006")
    );
    exec(&mut c, "ROLLBACK; BEGIN READ ONLY");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.rate_limit('ro', 1, '1 hour')")).as_deref(),
        Some("25006")
    );
    exec(&mut c, "ROLLBACK");
    let after: i64 = one(
        &mut c,
        "SELECT a FROM keel.rate_limit_state WHERE policy = 'iso' AND key = 'k'",
    );
    assert_eq!(before, after);
    // Decisions do not fire triggers, so a trigger on the state table is refused, not
    // skipped.
    exec(
        &mut c,
        "CREATE FUNCTION rl_noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
         CREATE TRIGGER rl_noop BEFORE UPDATE ON keel.rate_limit_state
            FOR EACH ROW EXECUTE FUNCTION rl_noop()",
    );
    let refused = c.batch_execute("SELECT keel.check('iso', 'k')");
    exec(
        &mut c,
        "DROP TRIGGER rl_noop ON keel.rate_limit_state; DROP FUNCTION rl_noop()",
    );
    assert_eq!(sqlstate(refused).as_deref(), Some("55000"));
    decide(&mut c, "SELECT * FROM keel.check('iso', 'k')");
}

fn updates_that_leave_their_page_keep_every_index_right(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "CREATE EXTENSION IF NOT EXISTS amcheck;
         SELECT keel.create_limit('spill', 1000000, '1000 hours', 'fixed_window');
         SELECT keel.create_limit('spill-tb', 1000000, '1000 hours');
         -- An index of the user's own, on a column every token-bucket decision changes.
         CREATE INDEX rl_user_index ON keel.rate_limit_state (expires_at)",
    );
    // Inside one transaction no old version can be pruned, so 3,000 versions of one key fill
    // its page and go on to others: those updates are not HOT and must add index entries.
    let mut tx = c.transaction().unwrap();
    for policy in ["spill", "spill-tb"] {
        let n: i64 = tx
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE r.allowed)
                       FROM generate_series(1, 3000) g,
                            LATERAL keel.check('{policy}', 'hot' || left(g::text, 0)) r"
                ),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(n, 3000, "{policy}");
    }
    let (updated, hot): (i64, i64) = {
        let r = tx
            .query_one(
                "SELECT pg_stat_get_xact_tuples_updated('keel.rate_limit_state'::regclass),
                        pg_stat_get_xact_tuples_hot_updated('keel.rate_limit_state'::regclass)",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        updated >= 5998 && hot < updated,
        "{updated} updates, {hot} HOT"
    );
    tx.commit().unwrap();
    for policy in ["spill", "spill-tb"] {
        let d = decide(
            &mut c,
            &format!("SELECT * FROM keel.check('{policy}', 'hot')"),
        );
        // The token bucket refills one token in 3.6 s meanwhile.
        assert!(
            (0..=2).contains(&(d.2 - (1_000_000 - 3001))),
            "{policy}: {d:?}"
        );
    }
    // Every version reachable from every index, and every index entry right.
    exec(
        &mut c,
        "SELECT bt_index_check('keel.rate_limit_state_pkey', true);
         SELECT bt_index_check('keel.rl_user_index', true);
         DROP INDEX keel.rl_user_index",
    );
}

fn async_policy_skips_the_flush_only_when_alone(env: &Env) {
    const ASYNC: &str = "commits without waiting for the WAL flush";
    let (mut c, notices) = env.pg.connect_with_notices();
    exec(
        &mut c,
        "SELECT keel.create_limit('quick', 1000, '1 hour', durability => 'async');
         SELECT keel.create_limit('safe', 1000, '1 hour');
         CREATE TABLE IF NOT EXISTS rl_orders (id bigint)",
    );
    exec(&mut c, "SET client_min_messages = debug1");
    let mut async_commits = |sql: &str| -> usize {
        notices.lock().unwrap().clear();
        c.batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        notices
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains(ASYNC))
            .count()
    };
    assert_eq!(async_commits("SELECT keel.check('quick', 'k')"), 1, "alone");
    assert_eq!(
        async_commits("SELECT keel.check('safe', 'k')"),
        0,
        "durable policy"
    );
    assert_eq!(
        async_commits(
            "BEGIN; INSERT INTO rl_orders VALUES (1); SELECT keel.check('quick', 'k'); COMMIT"
        ),
        0,
        "the caller wrote first"
    );
    assert_eq!(
        async_commits(
            "BEGIN; SELECT keel.check('quick', 'k'); INSERT INTO rl_orders VALUES (2); COMMIT"
        ),
        0,
        "the caller wrote after"
    );
    exec(&mut c, "RESET client_min_messages");
}

fn peek_refund_reset_and_alter(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_limit('pr', 3, '1 hour')");
    let peek = "SELECT * FROM keel.rate_peek('pr', 'k')";
    assert_eq!(
        decide(&mut c, peek).2,
        2,
        "peek of a fresh key: a cost-1 call leaves 2"
    );
    assert_eq!(decide(&mut c, peek).2, 2, "peek consumes nothing");
    for _ in 0..3 {
        decide(&mut c, "SELECT * FROM keel.check('pr', 'k')");
    }
    let d = decide(&mut c, peek);
    assert!(!d.0 && d.3 > 0, "peek tells the denial: {d:?}");
    let left: i32 = one(&mut c, "SELECT keel.rate_refund('pr', 'k', 2)");
    assert_eq!(left, 2);
    let left: i32 = one(&mut c, "SELECT keel.rate_refund('pr', 'k', 100)");
    assert_eq!(left, 3, "never above full");
    decide(&mut c, "SELECT * FROM keel.check('pr', 'k', 3)");
    assert!(one::<bool>(&mut c, "SELECT keel.rate_reset('pr', 'k')"));
    assert!(!one::<bool>(&mut c, "SELECT keel.rate_reset('pr', 'k')"));
    assert_eq!(decide(&mut c, "SELECT * FROM keel.check('pr', 'k')").2, 2);
    // create_limit again with the same settings: false; with others: 42710.
    assert!(!one::<bool>(
        &mut c,
        "SELECT keel.create_limit('pr', 3, '1 hour')"
    ));
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.create_limit('pr', 4, '1 hour')")).as_deref(),
        Some("42710")
    );
    // A larger max applies to existing keys at once.
    exec(&mut c, "SELECT keel.alter_limit('pr', max => 10)");
    let d = decide(&mut c, "SELECT * FROM keel.check('pr', 'k')");
    assert_eq!((d.0, d.1), (true, 10));
    assert!(one::<bool>(&mut c, "SELECT keel.drop_limit('pr')"));
    assert!(!one::<bool>(&mut c, "SELECT keel.drop_limit('pr')"));
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_state WHERE policy = 'pr'"
        ),
        0
    );
}

fn denials_are_logged_and_cleanup_removes_what_expired(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('logged', 1, '1 hour');
         SELECT keel.create_limit('quiet', 1, '1 hour', log_denials => false)",
    );
    for name in ["logged", "quiet"] {
        for _ in 0..3 {
            decide(
                &mut c,
                &format!("SELECT * FROM keel.check('{name}', 'tenant-9')"),
            );
        }
    }
    let rows = c
        .query(
            "SELECT policy, key, cost, retry_after_ms FROM keel.rate_limit_denials
              WHERE key = 'tenant-9' ORDER BY at",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 2, "two denials of 'logged', none of 'quiet'");
    assert_eq!(rows[0].get::<_, String>(0), "logged");
    assert_eq!(rows[0].get::<_, i32>(2), 1);
    assert!(rows[0].get::<_, i64>(3) > 0);
    // A key whose state ran out is deleted by the cleanup, live keys stay; so do recent denials.
    exec(
        &mut c,
        "UPDATE keel.rate_limit_state SET expires_at = now() - interval '1 second'
          WHERE policy = 'quiet';
         UPDATE keel.rate_limit_denials SET at = now() - interval '31 days'
          WHERE policy = 'logged' AND at = (SELECT min(at) FROM keel.rate_limit_denials
                                             WHERE policy = 'logged')",
    );
    // (Keys of earlier tests may have run out too: at least these two.)
    let deleted: i64 = one(&mut c, "SELECT keel.cleanup_rate_limits()");
    assert!(deleted >= 2, "one expired state, one old denial: {deleted}");
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_state WHERE policy IN ('logged', 'quiet')"
        ),
        1
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_denials WHERE key = 'tenant-9'"
        ),
        1
    );
    let task: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.tasks WHERE name = 'cleanup_rate_limits' AND enabled",
    );
    assert_eq!(task, 1, "scheduled");
}

fn bad_input_gets_a_sqlstate_and_changes_nothing(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_limit('strict', 5, '1 minute')");
    let snapshot = |c: &mut Client| -> (i64, i64, i64) {
        (
            one(c, "SELECT count(*) FROM keel.rate_limits"),
            one(
                c,
                "SELECT coalesce(sum(a + b + c), 0)::bigint FROM keel.rate_limit_state",
            ),
            one(c, "SELECT count(*) FROM keel.rate_limit_denials"),
        )
    };
    let before = snapshot(&mut c);
    let cases: &[(&str, &str)] = &[
        ("SELECT * FROM keel.rate_limit('k', 0, '1 minute')", "22023"),
        (
            "SELECT * FROM keel.rate_limit('k', -3, '1 minute')",
            "22023",
        ),
        (
            "SELECT * FROM keel.rate_limit('k', 5, '0 seconds')",
            "22023",
        ),
        (
            "SELECT * FROM keel.rate_limit('k', 5, '-1 minute')",
            "22023",
        ),
        ("SELECT * FROM keel.rate_limit('k', 5, NULL)", "22023"),
        (
            "SELECT * FROM keel.rate_limit('k', NULL, '1 minute')",
            "22023",
        ),
        (
            "SELECT * FROM keel.rate_limit('k', 5, '1 minute', -1)",
            "22023",
        ),
        (
            "SELECT * FROM keel.rate_limit('k', 5, '1 minute', 6)",
            "22023",
        ),
        (
            "SELECT * FROM keel.rate_limit('k', 5, '1 minute', 1, 'leaky')",
            "22023",
        ),
        (
            "SELECT * FROM keel.rate_limit('k', 5, '1 minute', 1, 'token_bucket', 0)",
            "22023",
        ),
        (
            "SELECT * FROM keel.rate_limit('k', 5, '1 minute', 8, 'token_bucket', 7)",
            "22023",
        ),
        (
            "SELECT * FROM keel.rate_limit(NULL, 5, '1 minute')",
            "22023",
        ),
        ("SELECT * FROM keel.rate_limit('', 5, '1 minute')", "22023"),
        (
            "SELECT * FROM keel.rate_limit(repeat('k', 1025), 5, '1 minute')",
            "22023",
        ),
        ("SELECT * FROM keel.check('nope', 'k')", "42704"),
        ("SELECT * FROM keel.check(NULL, 'k')", "22023"),
        ("SELECT * FROM keel.check('strict', NULL)", "22023"),
        ("SELECT * FROM keel.check('strict', 'k', -1)", "22023"),
        ("SELECT * FROM keel.check('strict', 'k', 6)", "22023"),
        ("SELECT * FROM keel.check('strict', 'k', NULL)", "22023"),
        ("SELECT * FROM keel.rate_peek('nope', 'k')", "42704"),
        ("SELECT keel.rate_refund('nope', 'k', 1)", "42704"),
        ("SELECT keel.rate_refund('strict', 'k', -1)", "22023"),
        ("SELECT keel.rate_reset('nope', 'k')", "42704"),
        ("SELECT keel.rate_reset('strict', NULL)", "22023"),
        (
            "SELECT keel.create_limit('Bad Name', 5, '1 minute')",
            "22023",
        ),
        ("SELECT keel.create_limit('ok', 0, '1 minute')", "22023"),
        ("SELECT keel.create_limit('ok', 5, '0 seconds')", "22023"),
        (
            "SELECT keel.create_limit('ok', 5, '1 minute', 'leaky')",
            "22023",
        ),
        (
            "SELECT keel.create_limit('ok', 5, '1 minute', burst => 0)",
            "22023",
        ),
        (
            "SELECT keel.create_limit('ok', 5, '1 minute', durability => 'eventually')",
            "22023",
        ),
        (
            "SELECT keel.create_limit('ok', 5, '1 minute', log_denials => NULL)",
            "22023",
        ),
        ("SELECT keel.alter_limit('nope', max => 3)", "42704"),
        ("SELECT keel.alter_limit('strict', max => 0)", "22023"),
        (
            "SELECT keel.alter_limit('strict', algorithm => 'leaky')",
            "22023",
        ),
        ("SELECT keel.cleanup_rate_limits(0)", "22023"),
    ];
    expect_sqlstates(&mut c, cases);
    assert_eq!(snapshot(&mut c), before, "bad input changed nothing");
}

fn privileges_go_through_the_grant_helpers(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rl_app') THEN
             CREATE ROLE rl_app LOGIN;
           END IF;
         END $$;
         SELECT keel.create_limit('granted', 5, '1 minute')",
    );
    exec(&mut c, "SET ROLE rl_app");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.check('granted', 'k')")).as_deref(),
        Some("42501"),
        "nothing for PUBLIC"
    );
    exec(&mut c, "RESET ROLE; SELECT keel.grant_producer('rl_app')");
    exec(&mut c, "SET ROLE rl_app");
    // check and rate_limit are not SECURITY DEFINER: their SQL (a key's first row, a denial
    // logged) runs as the tables' owner, whatever the caller's search_path.
    exec(&mut c, "SET search_path = ''");
    let allowed: Vec<bool> = (0..6)
        .map(|_| decide(&mut c, "SELECT * FROM keel.check('granted', 'k')").0)
        .collect();
    assert_eq!(allowed, [true, true, true, true, true, false]);
    exec(&mut c, "SELECT keel.rate_limit('k', 5, '1 minute')");
    exec(&mut c, "RESET search_path; RESET ROLE");
    let logged: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.rate_limit_denials WHERE policy = 'granted'",
    );
    assert_eq!(logged, 1, "the denial is logged for the caller");
    exec(&mut c, "SET ROLE rl_app");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.create_limit('mine', 5, '1 minute')")).as_deref(),
        Some("42501"),
        "producers do not create policies"
    );
    assert_eq!(
        sqlstate(c.batch_execute("SELECT * FROM keel.rate_limit_state")).as_deref(),
        Some("42501"),
        "nor read the state table"
    );
    exec(&mut c, "RESET ROLE");
}

fn counts_survive_restart_and_crash(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('kept', 5, '1000 hours', 'fixed_window');
         SELECT keel.create_limit('kept-async', 5, '1000 hours', 'fixed_window', durability => 'async');
         SELECT keel.create_limit('kept-memory', 5, '1000 hours', 'fixed_window', durability => 'memory')",
    );
    for _ in 0..3 {
        for name in ["kept", "kept-async", "kept-memory"] {
            decide(&mut c, &format!("SELECT * FROM keel.check('{name}', 'k')"));
        }
    }
    drop(c);
    // A clean restart: the worker writes memory states as it stops.
    env.pg.restart();
    let mut c = env.pg.connect();
    let remaining = |c: &mut Client, name: &str| -> i32 {
        decide(c, &format!("SELECT * FROM keel.rate_peek('{name}', 'k')")).2
    };
    assert_eq!(
        remaining(&mut c, "kept"),
        1,
        "durable across a clean restart"
    );
    assert_eq!(
        remaining(&mut c, "kept-async"),
        1,
        "async across a clean restart"
    );
    assert_eq!(
        remaining(&mut c, "kept-memory"),
        1,
        "memory across a clean restart"
    );
    // The memory key comes back from the table on its next decision.
    let d = decide(&mut c, "SELECT * FROM keel.check('kept-memory', 'k')");
    assert_eq!((d.0, d.2), (true, 1));
    decide(&mut c, "SELECT * FROM keel.check('kept', 'k')");
    // A slot of a concurrency limit taken right before the crash is still held after it.
    exec(
        &mut c,
        "SELECT keel.create_limit('kept-slots', 1, '1000 hours', 'concurrency')",
    );
    let token: String = one(
        &mut c,
        "SELECT token::text FROM keel.acquire('kept-slots', 'k')",
    );
    // Past one snapshot interval (1 s), a crash forgets nothing of the memory policy either.
    std::thread::sleep(Duration::from_millis(1500));
    drop(c);
    env.pg.crash();
    env.pg.start_again();
    let mut c = env.pg.connect();
    assert_eq!(
        remaining(&mut c, "kept"),
        0,
        "durable across pg_ctl stop -m immediate"
    );
    assert_eq!(
        remaining(&mut c, "kept-memory"),
        0,
        "memory across a crash after a snapshot"
    );
    assert!(
        !one::<bool>(
            &mut c,
            "SELECT allowed FROM keel.acquire('kept-slots', 'k')"
        ),
        "the slot taken before the crash is still held"
    );
    assert!(one::<bool>(
        &mut c,
        &format!("SELECT keel.release('kept-slots', 'k', '{token}')")
    ));
    assert!(one::<bool>(
        &mut c,
        "SELECT allowed FROM keel.acquire('kept-slots', 'k')"
    ));
}

fn memory_policy_peek_refund_reset_and_a_full_table(env: &Env) {
    let (mut c, notices) = env.pg.connect_with_notices();
    exec(
        &mut c,
        "SELECT keel.create_limit('mem', 3, '1000 hours', durability => 'memory')",
    );
    for _ in 0..3 {
        decide(&mut c, "SELECT * FROM keel.check('mem', 'k')");
    }
    let d = decide(&mut c, "SELECT * FROM keel.rate_peek('mem', 'k')");
    assert!(!d.0, "peek sees the memory state: {d:?}");
    assert_eq!(
        one::<i32>(&mut c, "SELECT keel.rate_refund('mem', 'k', 1)"),
        1
    );
    assert!(one::<bool>(&mut c, "SELECT keel.rate_reset('mem', 'k')"));
    assert_eq!(decide(&mut c, "SELECT * FROM keel.check('mem', 'k')").2, 2);
    // Denials of a memory policy are buffered and written by the worker at its next snapshot.
    exec(
        &mut c,
        "SELECT keel.create_limit('mem-log', 1, '1000 hours', durability => 'memory')",
    );
    for _ in 0..3 {
        decide(&mut c, "SELECT * FROM keel.check('mem-log', 'k')");
    }
    let logged = keel_pg_test::wait_for(Duration::from_secs(10), || {
        let n: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_denials WHERE policy = 'mem-log'",
        );
        (n == 2).then_some(n)
    });
    let now: Vec<String> = c
        .query(
            "SELECT key || ' ' || at::text FROM keel.rate_limit_denials WHERE policy = 'mem-log'",
            &[],
        )
        .expect("denials")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        logged,
        Some(2),
        "two denials written by the worker; found {now:?}"
    );
    // More keys than their slots hold: every decision stays right; the overflow goes the
    // durable path with a WARNING. The keys are picked to share one home slot (the table's
    // hash, FNV-1a, recomputed here), so 17 keys overflow a neighbourhood of 16 slots.
    exec(
        &mut c,
        "SELECT keel.create_limit('mem-many', 1, '1000 hours', durability => 'memory', log_denials => false)",
    );
    let keys = colliding_keys(&mut c, "mem-many", 20);
    let mut allowed = Vec::new();
    for round in 0..2 {
        let n = keys
            .iter()
            .filter(|k| {
                c.query_one("SELECT allowed FROM keel.check('mem-many', $1)", &[k])
                    .unwrap()
                    .get::<_, bool>(0)
            })
            .count();
        allowed.push(n);
        assert_eq!(n, if round == 0 { keys.len() } else { 0 }, "round {round}");
    }
    assert!(
        notices
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("decided on the durable path")),
        "a WARNING says the table is full around these keys"
    );
    let on_disk: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.rate_limit_state WHERE policy = 'mem-many'",
    );
    println!(
        "    {} keys sharing one neighbourhood of 16 slots: allowed {:?} in two rounds, {on_disk} rows in the table (overflow, and any snapshot)",
        keys.len(),
        allowed
    );
    assert!(on_disk >= 4, "the keys beyond 16 went to the table");
    exec(&mut c, "SELECT keel.drop_limit('mem-many')");
}

/// `n` keys whose (policy, key) hash to the same home slot of the shared-memory table in the
/// database `c` is connected to (as in src/ratelimit/memory.rs: FNV-1a seeded with the policy
/// length and the database's oid, modulo 65,536 slots).
fn colliding_keys(c: &mut Client, policy: &str, n: usize) -> Vec<String> {
    let db: i64 = one(
        c,
        "SELECT oid::bigint FROM pg_database WHERE datname = current_database()",
    );
    let home = |key: &str| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ policy.len() as u64 ^ ((db as u64) << 8);
        for b in policy.bytes().chain(key.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h % 65_536
    };
    let target = home("key-0");
    (0..)
        .map(|i| format!("key-{i}"))
        .filter(|k| home(k) == target)
        .take(n)
        .collect()
}

fn memory_policy_needs_the_preloaded_library(_env: &Env) {
    let pg = keel_pg_test::Cluster::start(&["shared_preload_libraries = ''"]);
    let mut c = pg.connect();
    assert_eq!(
        sqlstate(
            c.batch_execute("SELECT keel.create_limit('mem', 3, '1 hour', durability => 'memory')")
        )
        .as_deref(),
        Some("55000")
    );
    // Everything else works without it: the other modes, queues, the outbox table.
    exec(&mut c, "SELECT keel.create_limit('plain', 3, '1 hour')");
    assert!(decide(&mut c, "SELECT * FROM keel.check('plain', 'k')").0);
    exec(
        &mut c,
        "SELECT keel.create_queue('unloaded'); SELECT keel.enqueue('unloaded', '{}')",
    );
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM keel.claim('unloaded')"),
        1
    );
    exec(&mut c, "SELECT keel.emit('unloaded', '{}')");
}

/// One member of a Structured Field list as sfparse reads it: the string and its integer
/// parameters. Panics unless the value is exactly one such member.
fn sf_member(value: &str) -> (String, Vec<(String, i64)>) {
    let mut p = sfparse::Parser::new(value.as_bytes());
    let name = match p.parse_list() {
        Ok(Some(sfparse::Value::String {
            range,
            escape: false,
        })) => value[range].to_string(),
        other => panic!("{value:?}: not a list of one string item: {other:?}"),
    };
    let mut params = Vec::new();
    loop {
        match p.parse_param() {
            Ok(Some((k, sfparse::Value::Integer(v)))) => params.push((k.to_string(), v)),
            Ok(None) => break,
            other => panic!("{value:?}: a parameter that is not an integer: {other:?}"),
        }
    }
    assert!(
        matches!(p.parse_list(), Ok(None)),
        "{value:?}: more than one member"
    );
    (name, params)
}

/// `rate_limit_headers` gives the draft's `RateLimit-Policy` and `RateLimit` values for a
/// decision, which a Structured Fields parser (sfparse, RFC 9651) reads back to the policy and
/// the decision, and a `Retry-After` in whole seconds that is never before the decision's
/// retry time; a window near the interval maximum stays within an sf-integer's 15 digits; bad
/// input gets a SQLSTATE; only roles that may decide on the policy may call it.
fn header_values_are_structured_fields_and_retry_after_is_never_early(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('hdr', 3, '1 minute');
         SELECT keel.create_limit('hdr.long', 5, '100 years', 'fixed_window')",
    );
    let with_headers = |c: &mut Client, policy: &str| {
        let row = c
            .query_one(
                "SELECT d.allowed, d.remaining, d.retry_after_ms, d.reset_after_ms,
                        h.ratelimit_policy, h.ratelimit, h.retry_after
                   FROM keel.check($1, 'k') d,
                        keel.rate_limit_headers($1, d.remaining, d.reset_after_ms,
                                                d.retry_after_ms) h",
                &[&policy],
            )
            .expect("check with headers");
        (
            row.get::<_, bool>(0),
            row.get::<_, i32>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3),
            row.get::<_, String>(4),
            row.get::<_, String>(5),
            row.get::<_, Option<i64>>(6),
        )
    };
    for i in 0..4 {
        let (allowed, remaining, retry_ms, reset_ms, policy, state, retry_after) =
            with_headers(&mut c, "hdr");
        assert_eq!(allowed, i < 3);
        assert_eq!(
            sf_member(&policy),
            ("hdr".into(), vec![("q".into(), 3), ("w".into(), 60)])
        );
        let t = (reset_ms + 999) / 1000;
        assert_eq!(
            sf_member(&state),
            (
                "hdr".into(),
                vec![("r".into(), i64::from(remaining)), ("t".into(), t)]
            )
        );
        match retry_after {
            None => assert!(allowed && retry_ms == 0),
            Some(s) => {
                assert!(!allowed);
                assert!(
                    s * 1000 >= retry_ms,
                    "Retry-After {s} s before {retry_ms} ms"
                );
                assert!(
                    (s - 1) * 1000 < retry_ms,
                    "Retry-After {s} s later than needed"
                );
            }
        }
    }
    let (_, _, _, _, policy, state, _) = with_headers(&mut c, "hdr.long");
    let (name, params) = sf_member(&policy);
    assert_eq!(name, "hdr.long");
    // A year is 360 days to the limiter (months of 30 days), and so to the header.
    assert_eq!(
        params[1],
        ("w".into(), 3_110_400_000),
        "the longest window pg_keel takes"
    );
    sf_member(&state);
    // Past an sf-integer's 15 digits, the values stop at its maximum (and still parse).
    let capped: String = one(
        &mut c,
        "SELECT ratelimit FROM keel.rate_limit_headers('hdr', 0, 9223372036854775807)",
    );
    assert_eq!(
        sf_member(&capped).1,
        vec![("r".into(), 0), ("t".into(), 999_999_999_999_999)]
    );
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT keel.rate_limit_headers('nope', 1, 0)", "42704"),
            ("SELECT keel.rate_limit_headers(NULL, 1, 0)", "22023"),
            ("SELECT keel.rate_limit_headers('hdr', -1, 0)", "22023"),
            ("SELECT keel.rate_limit_headers('hdr', NULL, 0)", "22023"),
            ("SELECT keel.rate_limit_headers('hdr', 1, -1)", "22023"),
            ("SELECT keel.rate_limit_headers('hdr', 1, 0, -5)", "22023"),
            (
                "SELECT keel._rate_limit_headers(1, 'hdr', 1, 0, 0)",
                "42501",
            ),
        ],
    );
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rl_headers') THEN
             CREATE ROLE rl_headers LOGIN;
           END IF;
         END $$;",
    );
    exec(&mut c, "SET ROLE rl_headers");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.rate_limit_headers('hdr', 1, 0)")).as_deref(),
        Some("42501"),
        "nothing for PUBLIC"
    );
    exec(
        &mut c,
        "RESET ROLE; SELECT keel.grant_producer('rl_headers', limits => ARRAY['hdr'])",
    );
    exec(&mut c, "SET ROLE rl_headers; SET search_path = ''");
    exec(&mut c, "SELECT keel.rate_limit_headers('hdr', 1, 0)");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.rate_limit_headers('hdr.long', 1, 0)")).as_deref(),
        Some("42501"),
        "another policy's quota stays with those who may decide on it"
    );
    exec(&mut c, "RESET search_path; RESET ROLE");
}

/// `create_limit(..., enforce => false)`: 8 clients × 10 calls on one key of a 10-call policy
/// are all allowed, exactly 70 denials are logged marked `shadow` (durable and memory alike),
/// the key's state is what enforcing would have left (peek: 0 remaining, denied), and
/// `alter_limit(enforce => true)` turns it on for the next call, which is denied and logged
/// unmarked.
fn shadow_mode_allows_every_call_and_logs_exactly_what_it_would_deny(env: &Env) {
    const CLIENTS: usize = 8;
    const CALLS: usize = 10;
    let mut c = env.pg.connect();
    for durability in ["durable", "memory"] {
        let name = format!("shadow-{durability}");
        exec(
            &mut c,
            &format!(
                "SELECT keel.create_limit('{name}', 10, '1000 hours', 'fixed_window',
                                          durability => '{durability}', enforce => false)"
            ),
        );
        let again: bool = one(
            &mut c,
            &format!(
                "SELECT keel.create_limit('{name}', 10, '1000 hours', 'fixed_window',
                                          durability => '{durability}', enforce => false)"
            ),
        );
        assert!(!again, "the same settings again: false");
        assert_eq!(
            sqlstate(c.batch_execute(&format!(
                "SELECT keel.create_limit('{name}', 10, '1000 hours', 'fixed_window',
                                          durability => '{durability}')"
            )))
            .as_deref(),
            Some("42710"),
            "enforcing is another setting"
        );
        let sql = format!("SELECT allowed FROM keel.check('{name}', 'the-key')");
        let allowed = hammer(env, CLIENTS, CALLS, &sql);
        assert_eq!(
            allowed,
            (CLIENTS * CALLS) as i64,
            "{durability}: every call allowed"
        );
        let logged = |c: &mut Client, shadow: bool| -> i64 {
            one(
                c,
                &format!(
                    "SELECT count(*) FROM keel.rate_limit_denials
                      WHERE policy = '{name}' AND shadow = {shadow}"
                ),
            )
        };
        // Memory policies' denials reach the table with the worker's next snapshot.
        let shadowed = keel_pg_test::wait_for(Duration::from_secs(10), || {
            let n = logged(&mut c, true);
            (n >= 70).then_some(n)
        });
        assert_eq!(
            shadowed,
            Some(70),
            "{durability}: the 70 it would have denied"
        );
        let peek = decide(
            &mut c,
            &format!("SELECT * FROM keel.rate_peek('{name}', 'the-key')"),
        );
        assert_eq!(
            (peek.0, peek.2),
            (false, 0),
            "the state is what enforcing leaves"
        );
        exec(
            &mut c,
            &format!("SELECT keel.alter_limit('{name}', enforce => true)"),
        );
        let now = decide(
            &mut c,
            &format!("SELECT * FROM keel.check('{name}', 'the-key')"),
        );
        assert!(
            !now.0 && now.3 > 0,
            "{durability}: enforced from the next call"
        );
        let enforced = keel_pg_test::wait_for(Duration::from_secs(10), || {
            let n = logged(&mut c, false);
            (n >= 1).then_some(n)
        });
        assert_eq!(
            enforced,
            Some(1),
            "{durability}: an enforced denial, unmarked"
        );
        assert_eq!(logged(&mut c, true), 70);
        // An alert on denials sees the enforced one only; the shadows have their own gauge.
        let metrics: String = one(&mut c, "SELECT keel.metrics()");
        let sample = |family: &str| -> Option<f64> {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!("{family}{{"))
                        && l.contains(&format!("policy=\"{name}\""))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        };
        assert_eq!(
            sample("keel_rate_limit_denials_5m"),
            Some(1.0),
            "{durability}"
        );
        assert_eq!(
            sample("keel_rate_limit_shadow_denials_5m"),
            Some(70.0),
            "{durability}"
        );
    }
    expect_sqlstates(
        &mut c,
        &[(
            "SELECT keel.create_limit('shadow-null', 5, '1 hour', enforce => NULL)",
            "22023",
        )],
    );
}

/// One row of `check_many`: (name, allowed, limit, remaining, retry_after_ms).
type ManyRow = (String, bool, i32, i32, i64);

fn check_many(c: &mut Client, sql: &str) -> Vec<ManyRow> {
    c.query(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// `check_many` charges every policy when all allow and none when one denies (the denying row
/// says so, the others show their capacity untouched), durable and memory keys together;
/// input order is the output's; a shadow policy never stops the others.
fn check_many_charges_every_policy_or_none(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('many-a', 2, '1000 hours', 'fixed_window');
         SELECT keel.create_limit('many-b', 3, '1000 hours');
         SELECT keel.create_limit('many-m', 5, '1000 hours', durability => 'memory');
         SELECT keel.create_limit('many-s', 1, '1000 hours', enforce => false)",
    );
    let sql = "SELECT name, allowed, \"limit\", remaining, retry_after_ms
                 FROM keel.check_many(ARRAY['many-b', 'many-a', 'many-m'], ARRAY['u1', 'u1', 'ip1'])";
    let first = check_many(&mut c, sql);
    assert_eq!(
        first,
        [
            ("many-b".into(), true, 3, 2, 0),
            ("many-a".into(), true, 2, 1, 0),
            ("many-m".into(), true, 5, 4, 0),
        ]
    );
    check_many(&mut c, sql);
    // many-a is spent: the third call is refused as a whole.
    let third = check_many(&mut c, sql);
    assert_eq!(third[1].0, "many-a");
    assert!(!third[1].1 && third[1].4 > 0, "many-a denies: {third:?}");
    assert_eq!(
        (third[0].1, third[0].3, third[2].1, third[2].3),
        (true, 1, true, 3),
        "the others would allow and show what they still have: {third:?}"
    );
    // (peek's `remaining` is what a cost-1 call would leave.)
    for (name, key, left) in [("many-b", "u1", 0), ("many-m", "ip1", 2)] {
        let d = decide(
            &mut c,
            &format!("SELECT * FROM keel.rate_peek('{name}', '{key}')"),
        );
        assert_eq!(d.2, left, "{name} was not charged by the refused call");
    }
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_denials WHERE policy = 'many-a'"
        ),
        1,
        "the denying policy's denial is logged"
    );
    // A shadow policy that would deny lets the call through, charging the others.
    let with_shadow = "SELECT name, allowed, \"limit\", remaining, retry_after_ms
                         FROM keel.check_many(ARRAY['many-s', 'many-b'], ARRAY['s', 'u2'], ARRAY[1, 1])";
    check_many(&mut c, with_shadow);
    let rows = check_many(&mut c, with_shadow);
    assert!(rows[0].1 && rows[1].1, "shadow never denies: {rows:?}");
    assert_eq!(
        decide(&mut c, "SELECT * FROM keel.rate_peek('many-b', 'u2')").2,
        0,
        "both calls charged many-b (1 of 3 left: a cost-1 call would leave 0)"
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_denials WHERE policy = 'many-s' AND shadow"
        ),
        1
    );
}

/// 8 clients call `check_many` on one pair of keys, half naming the policies in one order and
/// half in the other, with a memory policy in the mix: exactly the tighter limit's calls are
/// allowed, every other policy is charged exactly that many times, and no call fails (a
/// deadlock would be 40P01).
fn check_many_is_exact_and_never_deadlocks_under_many_clients(env: &Env) {
    const CLIENTS: usize = 8;
    const CALLS: usize = 60;
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('pair-wide', 300, '1000 hours');
         SELECT keel.create_limit('pair-tight', 150, '1000 hours', 'sliding_window');
         SELECT keel.create_limit('pair-mem', 400, '1000 hours', durability => 'memory')",
    );
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut c = env.pg.connect();
            let barrier = barrier.clone();
            let names = if i % 2 == 0 {
                "ARRAY['pair-wide', 'pair-tight', 'pair-mem']"
            } else {
                "ARRAY['pair-mem', 'pair-tight', 'pair-wide']"
            };
            let sql = format!(
                "SELECT bool_and(allowed) FROM keel.check_many({names}, ARRAY['k', 'k', 'k'])"
            );
            std::thread::spawn(move || {
                let stmt = c.prepare(&sql).expect("prepare");
                barrier.wait();
                (0..CALLS)
                    .filter(|_| {
                        c.query_one(&stmt, &[])
                            .unwrap_or_else(|e| panic!("check_many failed: {e:?}"))
                            .get::<_, bool>(0)
                    })
                    .count() as i64
            })
        })
        .collect();
    let allowed: i64 = handles.into_iter().map(|h| h.join().expect("client")).sum();
    let left = |c: &mut Client, name: &str| {
        decide(c, &format!("SELECT * FROM keel.rate_peek('{name}', 'k')")).2
    };
    let (wide, tight, mem) = (
        left(&mut c, "pair-wide"),
        left(&mut c, "pair-tight"),
        left(&mut c, "pair-mem"),
    );
    println!(
        "    check_many, {CLIENTS} clients × {CALLS} calls in two name orders: {allowed} allowed; peek after: wide {wide}/300, tight {tight}/150, memory {mem}/400"
    );
    assert_eq!(allowed, 150, "exactly the tighter limit");
    // peek's `remaining` is what a cost-1 call would leave: 150 and 250 left.
    assert_eq!((wide, tight, mem), (149, 0, 249), "all or nothing");
}

fn check_many_bad_input_and_privileges_change_nothing(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('many-x', 5, '1 hour');
         SELECT keel.create_limit('many-y', 5, '1 hour');
         SELECT keel.create_limit('many-z', 5, '1 hour')",
    );
    let state = |c: &mut Client| -> (i64, i64) {
        (
            one(
                c,
                "SELECT count(*) FROM keel.rate_limit_state WHERE policy LIKE 'many-_'",
            ),
            one(
                c,
                "SELECT count(*) FROM keel.rate_limit_denials WHERE policy LIKE 'many-_'",
            ),
        )
    };
    let before = state(&mut c);
    let q = |args: &str| format!("SELECT * FROM keel.check_many({args})");
    let cases = [
        (q("ARRAY['many-x'], ARRAY['a', 'b']"), "22023"),
        (q("ARRAY['many-x', 'many-y'], ARRAY['a']"), "22023"),
        (q("NULL, ARRAY['a']"), "22023"),
        (q("ARRAY['many-x'], NULL"), "22023"),
        (q("ARRAY[]::text[], ARRAY[]::text[]"), "22023"),
        (q("ARRAY['many-x', 'many-x'], ARRAY['a', 'a']"), "22023"),
        (q("ARRAY['many-x', 'many-y'], ARRAY['a', 'a'], ARRAY[1]"), "22023"),
        (q("ARRAY['many-x', 'many-y'], ARRAY['a', 'a'], ARRAY[1, 6]"), "22023"),
        (q("ARRAY['many-x', 'many-y'], ARRAY['a', 'a'], ARRAY[1, -1]"), "22023"),
        (q("ARRAY['many-x', 'many-y'], ARRAY['a', 'a'], ARRAY[1, NULL]"), "22023"),
        (q("ARRAY['many-x', NULL], ARRAY['a', 'a']"), "22023"),
        (q("ARRAY['many-x', 'many-y'], ARRAY['a', NULL]"), "22023"),
        (q("ARRAY['many-x', 'many-y'], ARRAY['a', '']"), "22023"),
        (q("ARRAY['many-x', 'nope'], ARRAY['a', 'a']"), "42704"),
        (
            q("array_fill('many-x'::text, ARRAY[33]), (SELECT array_agg(i::text) FROM generate_series(1, 33) i)"),
            "22023",
        ),
    ];
    let cases: Vec<(&str, &str)> = cases.iter().map(|(s, e)| (s.as_str(), *e)).collect();
    expect_sqlstates(&mut c, &cases);
    assert_eq!(state(&mut c), before, "bad input charged nothing");
    // In a read-only transaction: 25006, nothing charged.
    exec(&mut c, "BEGIN READ ONLY");
    assert_eq!(
        sqlstate(c.batch_execute(
            "SELECT * FROM keel.check_many(ARRAY['many-x', 'many-y'], ARRAY['a', 'a'])"
        ))
        .as_deref(),
        Some("25006")
    );
    exec(&mut c, "ROLLBACK");
    // A role granted some policies may not name another: 42501, nothing charged.
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'many_app') THEN
             CREATE ROLE many_app LOGIN;
           END IF;
         END $$;
         SELECT keel.grant_producer('many_app', limits => ARRAY['many-x', 'many-y'])",
    );
    exec(&mut c, "SET ROLE many_app");
    assert_eq!(
        sqlstate(c.batch_execute(
            "SELECT * FROM keel.check_many(ARRAY['many-x', 'many-z'], ARRAY['a', 'a'])"
        ))
        .as_deref(),
        Some("42501")
    );
    let rows = check_many(
        &mut c,
        "SELECT name, allowed, \"limit\", remaining, retry_after_ms
           FROM keel.check_many(ARRAY['many-y', 'many-x'], ARRAY['a', 'a'])",
    );
    assert!(rows.iter().all(|r| r.1), "granted policies: {rows:?}");
    exec(&mut c, "RESET ROLE");
    assert_eq!(state(&mut c), (before.0 + 2, before.1));
}

/// The array form of `rate_limit_headers` writes one Structured Field list member per policy of
/// a `check_many`, in its order, and the longest Retry-After.
fn check_many_header_values_list_every_policy(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('hdr-min', 1, '1 minute');
         SELECT keel.create_limit('hdr-hour', 100, '1 hour', 'fixed_window')",
    );
    let sql = "SELECT h.ratelimit_policy, h.ratelimit, h.retry_after
                 FROM (SELECT array_agg(name ORDER BY ord) n, array_agg(remaining ORDER BY ord) r,
                              array_agg(reset_after_ms ORDER BY ord) t,
                              array_agg(retry_after_ms ORDER BY ord) ra
                         FROM keel.check_many(ARRAY['hdr-min', 'hdr-hour'], ARRAY['k', 'k'])
                              WITH ORDINALITY AS d(name, allowed, lim, remaining, retry_after_ms,
                                                   reset_after_ms, ord)) d,
                      keel.rate_limit_headers(d.n, d.r, d.t, d.ra) h";
    let read = |c: &mut Client| -> (String, String, Option<i64>) {
        let r = c.query_one(sql, &[]).expect("headers");
        (r.get(0), r.get(1), r.get(2))
    };
    let members = |value: &str| -> Vec<(String, Vec<(String, i64)>)> {
        let mut p = sfparse::Parser::new(value.as_bytes());
        let mut out = Vec::new();
        loop {
            match p.parse_list() {
                Ok(Some(sfparse::Value::String {
                    range,
                    escape: false,
                })) => {
                    let name = value[range].to_string();
                    let mut params = Vec::new();
                    while let Ok(Some((k, sfparse::Value::Integer(v)))) = p.parse_param() {
                        params.push((k.to_string(), v));
                    }
                    out.push((name, params));
                }
                Ok(None) => break,
                other => panic!("{value:?}: {other:?}"),
            }
        }
        out
    };
    let (policy, limit, retry) = read(&mut c);
    let kv = |pairs: &[(&str, i64)]| -> Vec<(String, i64)> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    assert_eq!(
        members(&policy),
        [
            ("hdr-min".to_string(), kv(&[("q", 1), ("w", 60)])),
            ("hdr-hour".to_string(), kv(&[("q", 100), ("w", 3600)])),
        ],
        "{policy}"
    );
    let first = members(&limit);
    assert_eq!(first.len(), 2, "{limit}");
    assert_eq!(first[0].1[0], ("r".to_string(), 0), "{limit}");
    assert_eq!(first[1].1[0], ("r".to_string(), 99), "{limit}");
    assert_eq!(retry, None, "allowed: no Retry-After");
    let (_, limit, retry) = read(&mut c);
    let second = members(&limit);
    assert_eq!(
        second[1].1[0],
        ("r".to_string(), 99),
        "not charged: {limit}"
    );
    let retry = retry.expect("refused: a Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    expect_sqlstates(
        &mut c,
        &[
            (
                "SELECT * FROM keel.rate_limit_headers(ARRAY['hdr-min'], ARRAY[1, 2], ARRAY[0]::bigint[])",
                "22023",
            ),
            (
                "SELECT * FROM keel.rate_limit_headers(ARRAY[]::text[], ARRAY[]::int[], ARRAY[]::bigint[])",
                "22023",
            ),
            (
                "SELECT * FROM keel.rate_limit_headers(ARRAY['hdr-min'], ARRAY[1], ARRAY[0]::bigint[], ARRAY[0, 0]::bigint[])",
                "22023",
            ),
            (
                "SELECT * FROM keel.rate_limit_headers(ARRAY['nope'], ARRAY[1], ARRAY[0]::bigint[])",
                "42704",
            ),
        ],
    );
}

/// A memory key whose neighbourhood of slots is full is decided in the table; while that
/// decision's transaction is open, and after it, the key must not also be decided from a stale
/// copy loaded into a slot that freed up meanwhile (issue 17, item 8). Then the same under 8
/// clients while a ninth keeps freeing and refilling the neighbourhood: a key allowed once
/// per 1000 hours is allowed exactly once.
fn a_memory_key_decided_in_the_table_is_never_also_decided_in_memory(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('race', 1, '1000 hours', durability => 'memory', log_denials => false)",
    );
    let keys = colliding_keys(&mut c, "race", 19);
    let (neighbours, late) = keys.split_at(16);
    for k in neighbours {
        assert!(decide_key(&mut c, "race", k), "{k} fills a slot");
    }
    // The 17th key goes to the table, in a transaction left open.
    let mut holder = env.pg.connect();
    exec(&mut holder, "BEGIN");
    assert!(decide_key(&mut holder, "race", &late[0]));
    // A slot frees up; another session decides the same key.
    exec(
        &mut c,
        &format!("SELECT keel.rate_reset('race', '{}')", neighbours[0]),
    );
    let key = late[0].clone();
    let mut other = env.pg.connect();
    let waiter = std::thread::spawn(move || decide_key(&mut other, "race", &key));
    std::thread::sleep(Duration::from_millis(300));
    exec(&mut holder, "COMMIT");
    let second = waiter.join().expect("second decision");
    assert!(
        !second,
        "the second decision sees the first one, committed in the table"
    );
    // Once the holder is gone, the key may enter memory again, carrying the table's state.
    assert!(!decide_key(&mut c, "race", &late[0]));
    // Under load: 8 clients on two late keys while the neighbourhood is freed and refilled.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let mut c = env.pg.connect();
        let stop = stop.clone();
        let neighbours: Vec<String> = neighbours.to_vec();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for k in &neighbours {
                    exec(&mut c, &format!("SELECT keel.rate_reset('race', '{k}')"));
                    decide_key(&mut c, "race", k);
                }
            }
        })
    };
    let mut allowed = 0;
    for key in &late[1..] {
        let sql = format!("SELECT allowed FROM keel.check('race', '{key}')");
        allowed += hammer(env, 8, 40, &sql);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().expect("churn");
    println!(
        "    2 keys allowed once per 1000 hours, 8 clients × 40 calls each while their neighbourhood churns: {allowed} allowed"
    );
    assert_eq!(allowed, 2, "each key exactly once");
    exec(&mut c, "SELECT keel.drop_limit('race')");
}

fn decide_key(c: &mut Client, policy: &str, key: &str) -> bool {
    c.query_one("SELECT allowed FROM keel.check($1, $2)", &[&policy, &key])
        .unwrap_or_else(|e| panic!("check {policy} {key}: {e:?}"))
        .get(0)
}

/// `acquire`/`release` under 8 clients, durable and async: each client takes a slot, holds it
/// a moment and gives it back; a shared count of holders never exceeds `max`, every release
/// finds its slot, and the table never holds more than `max` live slots.
fn concurrency_limit_holds_exactly_max_slots_under_many_clients(env: &Env) {
    use std::sync::atomic::{AtomicI64, Ordering};
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 40;
    const MAX: i64 = 3;
    let mut c = env.pg.connect();
    for durability in ["durable", "async", "memory"] {
        let name = format!("slots-{durability}");
        exec(
            &mut c,
            &format!(
                "SELECT keel.create_limit('{name}', {MAX}, '1 minute', 'concurrency', durability => '{durability}', log_denials => false)"
            ),
        );
        let holders = Arc::new(AtomicI64::new(0));
        let most = Arc::new(AtomicI64::new(0));
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let handles: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let mut c = env.pg.connect();
                let (holders, most, barrier, name) =
                    (holders.clone(), most.clone(), barrier.clone(), name.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let (mut taken, mut released) = (0, 0);
                    for _ in 0..ROUNDS {
                        let r = c
                            .query_one(
                                "SELECT allowed, token::text, remaining FROM keel.acquire($1, 'hot')",
                                &[&name],
                            )
                            .expect("acquire");
                        if !r.get::<_, bool>(0) {
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        taken += 1;
                        let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(2));
                        holders.fetch_sub(1, Ordering::SeqCst);
                        let token: String = r.get(1);
                        let back: bool = c
                            .query_one(
                                "SELECT keel.release($1, 'hot', $2::text::uuid)",
                                &[&name, &token],
                            )
                            .expect("release")
                            .get(0);
                        released += back as i64;
                    }
                    (taken, released)
                })
            })
            .collect();
        let (taken, released) = handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let most = most.load(Ordering::SeqCst);
        println!(
            "    {durability}: {CLIENTS} clients × {ROUNDS} acquire/hold 2 ms/release on one key of {MAX} slots: {taken} taken, {released} released, at most {most} held at once"
        );
        assert!(most <= MAX, "{most} holders at once");
        assert!(taken > MAX, "slots were reused: {taken}");
        assert_eq!(released, taken, "every release found its slot");
        assert_eq!(
            decide(
                &mut c,
                &format!("SELECT * FROM keel.rate_peek('{name}', 'hot')")
            )
            .2,
            (MAX - 1) as i32,
            "every slot is free again"
        );
        if durability == "memory" {
            // The worker's snapshot (every second) leaves no slot in the table either.
            let sql = format!("SELECT count(*) FROM keel.rate_limit_slots WHERE policy = '{name}'");
            wait_for(Duration::from_secs(10), || {
                (one::<i64>(&mut c, &sql) == 0).then_some(())
            });
        }
        assert_eq!(
            one::<i64>(
                &mut c,
                &format!("SELECT count(*) FROM keel.rate_limit_slots WHERE policy = '{name}'")
            ),
            0
        );
    }
}

/// (allowed, token, remaining, retry_after_ms) of one acquire.
type Acquired = (bool, Option<String>, i32, i64);

fn acquire(c: &mut Client, name: &str, key: &str, ttl: &str) -> Acquired {
    let r = c
        .query_one(
            &format!("SELECT allowed, token::text, remaining, retry_after_ms FROM keel.acquire('{name}', '{key}', {ttl})"),
            &[],
        )
        .unwrap_or_else(|e| panic!("acquire {name} {key}: {e:?}"));
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

fn release(c: &mut Client, name: &str, key: &str, token: &str) -> bool {
    one(
        c,
        &format!("SELECT keel.release('{name}', '{key}', '{token}')"),
    )
}

/// Whether keel.rate_limit_slots comes to hold exactly `tokens` for (name, key) within 10 s
/// (the worker writes a memory policy's slots every second).
fn table_holds(c: &mut Client, name: &str, key: &str, tokens: &[&str]) -> bool {
    let mut want: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    want.sort();
    let sql = format!(
        "SELECT coalesce(array_agg(token::text ORDER BY token::text), '{{}}') FROM keel.rate_limit_slots
          WHERE policy = '{name}' AND key = '{key}' AND expires_at > now()"
    );
    wait_for(Duration::from_secs(10), || {
        (one::<Vec<String>>(c, &sql) == want).then_some(())
    })
    .is_some()
}

fn memory_concurrency_limit_keeps_its_slots_through_snapshots_restarts_and_alter(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('mslots', 2, '1 hour', 'concurrency', durability => 'memory')",
    );
    let a = acquire(&mut c, "mslots", "k", "NULL");
    let b = acquire(&mut c, "mslots", "k", "NULL");
    assert_eq!((a.0, a.2, b.0, b.2), (true, 1, true, 0), "{a:?} {b:?}");
    let full = acquire(&mut c, "mslots", "k", "NULL");
    assert!(!full.0 && full.1.is_none(), "{full:?}");
    assert!(
        (3_599_000..=3_600_000).contains(&full.3),
        "retry when the soonest slot expires: {full:?}"
    );
    let peek = decide(&mut c, "SELECT * FROM keel.rate_peek('mslots', 'k')");
    assert_eq!((peek.0, peek.1, peek.2), (false, 2, 0), "{peek:?}");
    let (a, b) = (a.1.expect("token"), b.1.expect("token"));
    assert!(release(&mut c, "mslots", "k", &a));
    assert!(
        !release(&mut c, "mslots", "k", &a),
        "a slot is released once"
    );
    let d = acquire(&mut c, "mslots", "k", "NULL");
    assert!(d.0, "a released slot is free again: {d:?}");
    let d = d.1.expect("token");
    // The worker writes the live slots to the table: b and d, not the released a.
    assert!(table_holds(&mut c, "mslots", "k", &[&b, &d]));
    // A clean restart: the worker writes memory as it stops; the key comes back from the table.
    drop(c);
    env.pg.restart();
    let mut c = env.pg.connect();
    assert!(
        !acquire(&mut c, "mslots", "k", "NULL").0,
        "both held after a restart"
    );
    assert!(release(&mut c, "mslots", "k", &b));
    let e = acquire(&mut c, "mslots", "k", "NULL");
    assert!(e.0, "{e:?}");
    let e = e.1.expect("token");
    // A crash after a snapshot: d and e are still held.
    assert!(table_holds(&mut c, "mslots", "k", &[&d, &e]));
    drop(c);
    env.pg.crash();
    env.pg.start_again();
    let mut c = env.pg.connect();
    assert!(
        !acquire(&mut c, "mslots", "k", "NULL").0,
        "both held after a crash"
    );
    // Slots expire by themselves in memory too, and retry_after_ms is never early.
    let short: Vec<Acquired> = (0..3)
        .map(|_| acquire(&mut c, "mslots", "short", "'300 milliseconds'"))
        .collect();
    assert!(short[0].0 && short[1].0 && !short[2].0, "{short:?}");
    assert!((1..=300).contains(&short[2].3), "{short:?}");
    std::thread::sleep(Duration::from_millis(short[2].3 as u64));
    assert!(acquire(&mut c, "mslots", "short", "'1 hour'").0);
    assert!(
        !release(
            &mut c,
            "mslots",
            "short",
            short[0].1.as_deref().expect("token")
        ),
        "an expired slot is not released"
    );
    // Moving the policy out of memory writes what memory holds now, without waiting for a
    // snapshot: a slot taken just before is held in the table.
    let f = acquire(&mut c, "mslots", "moved", "NULL");
    assert!(f.0);
    exec(
        &mut c,
        "SELECT keel.alter_limit('mslots', durability => 'durable')",
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_slots WHERE policy = 'mslots' AND key = 'moved'"
        ),
        1
    );
    assert!(acquire(&mut c, "mslots", "moved", "NULL").0);
    assert!(
        !acquire(&mut c, "mslots", "moved", "NULL").0,
        "f and one more"
    );
    assert!(
        !acquire(&mut c, "mslots", "k", "NULL").0,
        "d and e moved too"
    );
    assert!(release(&mut c, "mslots", "k", &d), "released in the table");
    assert!(release(
        &mut c,
        "mslots",
        "moved",
        f.1.as_deref().expect("token")
    ));
    // While an alter_limit leaving memory is open, a session that still sees the policy in
    // memory decides a key that is not in memory in the table, never loading it into memory
    // (where, once the policy is durable, nothing would write it to the table).
    exec(
        &mut c,
        "SELECT keel.alter_limit('mslots', durability => 'memory')",
    );
    let mut leaving = env.pg.connect();
    exec(
        &mut leaving,
        "BEGIN; SELECT keel.alter_limit('mslots', durability => 'durable')",
    );
    let fresh = acquire(&mut c, "mslots", "fresh", "NULL");
    assert!(fresh.0, "{fresh:?}");
    exec(&mut leaving, "COMMIT");
    let both = acquire(&mut c, "mslots", "fresh", "NULL");
    assert!(both.0, "one slot held of two: {both:?}");
    assert!(
        !acquire(&mut c, "mslots", "fresh", "NULL").0,
        "the slot taken during the alter is held in the table"
    );
    exec(&mut c, "SELECT keel.rate_reset('mslots', 'fresh')");
    // And back into memory: keys load their slots from the table.
    exec(
        &mut c,
        "SELECT keel.alter_limit('mslots', durability => 'memory')",
    );
    let g = acquire(&mut c, "mslots", "k", "NULL");
    assert!(g.0, "{g:?}");
    assert!(!acquire(&mut c, "mslots", "k", "NULL").0, "e and g");
    assert!(
        release(&mut c, "mslots", "k", &e),
        "a slot loaded from the table"
    );
    // A key too long for a memory slot is decided in the table: held there at once.
    let long = "x".repeat(300);
    let l = acquire(&mut c, "mslots", &long, "NULL");
    assert!(l.0, "{l:?}");
    assert!(table_holds(
        &mut c,
        "mslots",
        &long,
        &[l.1.as_deref().expect("token")]
    ));
    assert!(release(
        &mut c,
        "mslots",
        &long,
        l.1.as_deref().expect("token")
    ));
    // rate_reset frees every slot of a key at once; drop_limit forgets the policy's keys.
    assert!(one::<bool>(&mut c, "SELECT keel.rate_reset('mslots', 'k')"));
    let all: Vec<Acquired> = (0..2)
        .map(|_| acquire(&mut c, "mslots", "k", "NULL"))
        .collect();
    assert!(all.iter().all(|r| r.0), "{all:?}");
    // Shadow mode in memory: a full key allows with a token that holds nothing, logged.
    exec(
        &mut c,
        "SELECT keel.create_limit('mslots-shadow', 1, '1 hour', 'concurrency', durability => 'memory', enforce => false)",
    );
    let first = acquire(&mut c, "mslots-shadow", "k", "NULL");
    let second = acquire(&mut c, "mslots-shadow", "k", "NULL");
    assert!(first.0 && second.0, "{first:?} {second:?}");
    assert!(!release(
        &mut c,
        "mslots-shadow",
        "k",
        second.1.as_deref().expect("token")
    ));
    assert!(release(
        &mut c,
        "mslots-shadow",
        "k",
        first.1.as_deref().expect("token")
    ));
    let sql =
        "SELECT count(*) FROM keel.rate_limit_denials WHERE policy = 'mslots-shadow' AND shadow";
    let logged = wait_for(Duration::from_secs(10), || {
        (one::<i64>(&mut c, sql) == 1).then_some(())
    });
    assert!(
        logged.is_some(),
        "the shadow denial is logged by the snapshot"
    );
    exec(
        &mut c,
        "SELECT keel.drop_limit('mslots'); SELECT keel.drop_limit('mslots-shadow')",
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_slots WHERE policy LIKE 'mslots%'"
        ),
        0
    );
    // A new policy of the same name starts with no slot held.
    exec(
        &mut c,
        "SELECT keel.create_limit('mslots', 2, '1 hour', 'concurrency', durability => 'memory')",
    );
    assert_eq!(acquire(&mut c, "mslots", "k", "NULL").2, 1);
    exec(&mut c, "SELECT keel.drop_limit('mslots')");
}

fn memory_concurrency_pool_full_is_refused_and_takes_nothing(env: &Env) {
    let mut c = env.pg.connect();
    // 4,096 keys × 16 slots fill the pool of 65,536 held slots.
    let fill = |c: &mut Client| -> i64 {
        exec(
            c,
            "SELECT keel.create_limit('pool', 100, '1 hour', 'concurrency', durability => 'memory', log_denials => false)",
        );
        one(
            c,
            "SELECT count(*) FILTER (WHERE a.allowed)
               FROM generate_series(0, 65535) g, keel.acquire('pool', 'key-' || (g % 4096)) a",
        )
    };
    assert_eq!(fill(&mut c), 65_536);
    let before: i32 = one(
        &mut c,
        "SELECT remaining FROM keel.rate_peek('pool', 'key-7')",
    );
    let refused = c.batch_execute("SELECT * FROM keel.acquire('pool', 'key-7')");
    assert_eq!(sqlstate(refused).as_deref(), Some("53200"));
    assert_eq!(
        one::<i32>(
            &mut c,
            "SELECT remaining FROM keel.rate_peek('pool', 'key-7')"
        ),
        before,
        "the refused acquire took nothing"
    );
    // rate_reset gives a key's slots back to the pool.
    exec(&mut c, "SELECT keel.rate_reset('pool', 'key-8')");
    let again: Vec<Acquired> = (0..16)
        .map(|_| acquire(&mut c, "pool", "key-7", "NULL"))
        .collect();
    assert!(again.iter().all(|r| r.0), "room after a reset");
    exec(&mut c, "SELECT keel.drop_limit('pool')");
    // Dropping the policy gave every slot back.
    assert_eq!(fill(&mut c), 65_536, "the pool is whole again");
    exec(&mut c, "SELECT keel.drop_limit('pool')");
}

fn concurrency_slots_expire_by_themselves_and_release_once(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('slots-ttl', 2, '400 milliseconds', 'concurrency')",
    );
    let acquire = |c: &mut Client, ttl: &str| -> (bool, Option<String>, i32, i64) {
        let r = c
            .query_one(
                &format!("SELECT allowed, token::text, remaining, retry_after_ms FROM keel.acquire('slots-ttl', 'k', {ttl})"),
                &[],
            )
            .expect("acquire");
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };
    // The default ttl is the policy's per.
    let a = acquire(&mut c, "NULL");
    let b = acquire(&mut c, "'10 seconds'");
    assert_eq!((a.0, a.2, b.0, b.2), (true, 1, true, 0));
    let full = acquire(&mut c, "NULL");
    assert!(!full.0 && full.1.is_none(), "{full:?}");
    assert!(
        (1..=400).contains(&full.3),
        "retry when the soonest slot expires: {full:?}"
    );
    let peek = decide(&mut c, "SELECT * FROM keel.rate_peek('slots-ttl', 'k')");
    assert_eq!((peek.0, peek.1, peek.2), (false, 2, 0), "{peek:?}");
    // Waiting retry_after_ms is never early: the expired slot is free by itself.
    std::thread::sleep(Duration::from_millis(full.3 as u64));
    let again = acquire(&mut c, "NULL");
    assert!(again.0, "after retry_after_ms: {again:?}");
    let expired = a.1.expect("token");
    assert!(
        !one::<bool>(
            &mut c,
            &format!("SELECT keel.release('slots-ttl', 'k', '{expired}')")
        ),
        "an expired slot is not released"
    );
    let live = b.1.expect("token");
    let release = format!("SELECT keel.release('slots-ttl', 'k', '{live}')");
    assert!(one::<bool>(&mut c, &release));
    assert!(!one::<bool>(&mut c, &release), "a slot is released once");
    // rate_reset frees every slot of a key; cleanup deletes expired slots.
    acquire(&mut c, "'1 hour'");
    assert!(one::<bool>(
        &mut c,
        "SELECT keel.rate_reset('slots-ttl', 'k')"
    ));
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_slots WHERE policy = 'slots-ttl'"
        ),
        0
    );
    acquire(&mut c, "'1 millisecond'");
    std::thread::sleep(Duration::from_millis(20));
    exec(&mut c, "SELECT keel.cleanup_rate_limits()");
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_slots WHERE policy = 'slots-ttl'"
        ),
        0,
        "cleanup deletes expired slots"
    );
    // Shadow mode: a full key still allows, holds nothing, and the denial is logged as shadow.
    exec(
        &mut c,
        "SELECT keel.create_limit('slots-shadow', 1, '1 hour', 'concurrency', enforce => false)",
    );
    let first: String = one(
        &mut c,
        "SELECT token::text FROM keel.acquire('slots-shadow', 'k')",
    );
    let r = c
        .query_one(
            "SELECT allowed, token::text FROM keel.acquire('slots-shadow', 'k')",
            &[],
        )
        .unwrap();
    assert!(r.get::<_, bool>(0), "shadow allows");
    let shadow_token: String = r.get(1);
    assert!(!one::<bool>(
        &mut c,
        &format!("SELECT keel.release('slots-shadow', 'k', '{shadow_token}')")
    ));
    assert!(one::<bool>(
        &mut c,
        &format!("SELECT keel.release('slots-shadow', 'k', '{first}')")
    ));
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_denials WHERE policy = 'slots-shadow' AND shadow"
        ),
        1
    );
    exec(
        &mut c,
        "SELECT keel.drop_limit('slots-shadow'); SELECT keel.drop_limit('slots-ttl')",
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_slots WHERE policy LIKE 'slots-%'"
        ),
        0
    );
}

fn concurrency_limit_bad_input_kinds_and_privileges(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('slots-bad', 2, '1 minute', 'concurrency');
         SELECT keel.create_limit('slots-rate', 2, '1 minute')",
    );
    let count = |c: &mut Client| -> i64 {
        one(
            c,
            "SELECT count(*) FROM keel.rate_limit_slots WHERE policy = 'slots-bad'",
        )
    };
    let before = count(&mut c);
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT * FROM keel.check('slots-bad', 'k')", "42809"),
            (
                "SELECT * FROM keel.check_many(ARRAY['slots-bad'], ARRAY['k'])",
                "42809",
            ),
            ("SELECT keel.rate_refund('slots-bad', 'k')", "42809"),
            ("SELECT * FROM keel.acquire('slots-rate', 'k')", "42809"),
            (
                "SELECT keel.release('slots-rate', 'k', gen_random_uuid())",
                "42809",
            ),
            ("SELECT * FROM keel.acquire('nope', 'k')", "42704"),
            (
                "SELECT keel.release('nope', 'k', gen_random_uuid())",
                "42704",
            ),
            ("SELECT * FROM keel.acquire('slots-bad', NULL)", "22023"),
            ("SELECT * FROM keel.acquire('slots-bad', '')", "22023"),
            (
                "SELECT * FROM keel.acquire('slots-bad', repeat('k', 1025))",
                "22023",
            ),
            (
                "SELECT * FROM keel.acquire('slots-bad', 'k', '0 seconds')",
                "22023",
            ),
            (
                "SELECT * FROM keel.acquire('slots-bad', 'k', '-1 second')",
                "22023",
            ),
            (
                "SELECT * FROM keel.acquire('slots-bad', 'k', '101 years')",
                "22023",
            ),
            (
                "SELECT * FROM keel.acquire('slots-bad', 'k', '178000000 years')",
                "22023",
            ),
            (
                "SELECT keel.release('slots-bad', NULL, gen_random_uuid())",
                "22023",
            ),
            (
                "SELECT * FROM keel.rate_limit('k', 5, '1 minute', 1, 'concurrency')",
                "22023",
            ),
        ],
    );
    exec(&mut c, "BEGIN READ ONLY");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT * FROM keel.acquire('slots-bad', 'k')")).as_deref(),
        Some("25006")
    );
    exec(&mut c, "ROLLBACK");
    assert_eq!(count(&mut c), before, "bad input took no slot");
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'slots_app') THEN
             CREATE ROLE slots_app LOGIN;
           END IF;
         END $$",
    );
    exec(&mut c, "SET ROLE slots_app");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT * FROM keel.acquire('slots-bad', 'k')")).as_deref(),
        Some("42501"),
        "nothing for PUBLIC"
    );
    exec(
        &mut c,
        "RESET ROLE; SELECT keel.grant_producer('slots_app', limits => ARRAY['slots-rate'])",
    );
    exec(&mut c, "SET ROLE slots_app");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT * FROM keel.acquire('slots-bad', 'k')")).as_deref(),
        Some("42501"),
        "only the policies granted"
    );
    exec(
        &mut c,
        "RESET ROLE; SELECT keel.grant_producer('slots_app', limits => ARRAY['slots-bad'])",
    );
    exec(&mut c, "SET ROLE slots_app; SET search_path = ''");
    let token: String = one(
        &mut c,
        "SELECT token::text FROM keel.acquire('slots-bad', 'k')",
    );
    assert!(one::<bool>(
        &mut c,
        &format!("SELECT keel.release('slots-bad', 'k', '{token}')")
    ));
    exec(&mut c, "RESET search_path; RESET ROLE");
    assert_eq!(count(&mut c), before);
}

/// A rate_reset (or alter_limit, drop_limit) takes its policy's lock until its transaction
/// ends; the worker's snapshot, which also dispatches the outbox, must not wait for one left
/// open: it writes the other policies' keys and leaves that policy's for later.
fn a_rate_reset_left_open_never_stalls_the_snapshot(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('stall-p', 5, '1000 hours', 'fixed_window', durability => 'memory');
         SELECT keel.create_limit('stall-q', 5, '1000 hours', 'fixed_window', durability => 'memory')",
    );
    let mut holder = env.pg.connect();
    exec(
        &mut holder,
        "BEGIN; SELECT keel.rate_reset('stall-p', 'other')",
    );
    decide(&mut c, "SELECT * FROM keel.check('stall-p', 'k')");
    decide(&mut c, "SELECT * FROM keel.check('stall-q', 'k')");
    let row = |c: &mut Client, policy: &str| -> i64 {
        one(
            c,
            &format!("SELECT count(*) FROM keel.rate_limit_state WHERE policy = '{policy}' AND key = 'k'"),
        )
    };
    let written = wait_for(Duration::from_secs(10), || {
        (row(&mut c, "stall-q") == 1).then_some(())
    });
    assert!(
        written.is_some(),
        "the snapshot went on while the reset was open"
    );
    assert_eq!(row(&mut c, "stall-p"), 0, "the held policy's key waits");
    exec(&mut holder, "COMMIT");
    let written = wait_for(Duration::from_secs(10), || {
        (row(&mut c, "stall-p") == 1).then_some(())
    });
    assert!(
        written.is_some(),
        "written by a snapshot after the reset ended"
    );
    exec(
        &mut c,
        "SELECT keel.drop_limit('stall-p'); SELECT keel.drop_limit('stall-q')",
    );
}
