//! Sessions over real connections: tokens and what is stored, expiry by ttl and by idle
//! timeout, touch throttling, rotation and revocation, events after commit only, errors,
//! privileges, reads that never wait, validation on a real hot standby, and the worker's cleanup in batches while validations
//! keep going.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_pg_test::{exec, expect_sqlstates, one, run, sqlstate, tests, wait_for, Client, Env};

fn main() {
    let tests = tests![
        create_validate_and_what_is_stored,
        expiry_by_ttl_and_idle_timeout_and_touch_throttling,
        rotation_and_revocation_take_effect_at_once,
        revocation_events_reach_the_outbox_at_commit_only,
        validate_never_waits_and_reads_without_writing_when_read_only,
        a_hot_standby_validates_without_writing,
        pg_dump_keeps_sessions_and_their_tokens,
        a_crash_loses_no_session_and_no_revocation,
        bad_input_gets_a_sqlstate_and_changes_nothing,
        privileges_go_through_the_grant_helpers,
        idle_expiry_is_found_by_index_and_touches_stay_hot,
        cleanup_task_deletes_in_batches_while_validations_continue,
        rotation_grace_keeps_the_old_token_briefly_and_never_forks,
        rotations_racing_on_one_token_fork_nothing,
        rotation_grace_bad_input_crash_and_cleanup,
        anonymous_sessions_log_in_with_a_new_token,
        one_time_tokens_are_consumed_once_for_their_purpose,
        one_time_token_consumed_by_exactly_one_of_eight_racing_clients,
        one_time_tokens_bad_input_privileges_crash_and_cleanup,
        per_user_cap_evicts_the_least_recently_seen,
        per_user_cap_is_exact_under_eight_concurrent_logins,
        lifecycle_events_carry_the_session_id_never_the_token,
    ];
    run(tests)
}

/// (session_id, token) of a new session.
fn create(c: &mut Client, args: &str) -> (String, String) {
    let r = c
        .query_one(
            &format!("SELECT session_id::text, token FROM keel.session_create({args})"),
            &[],
        )
        .unwrap_or_else(|e| panic!("session_create({args}): {e:?}"));
    (r.get(0), r.get(1))
}

/// The user of the token's session, or None when validate returns no row.
fn validate(c: &mut Client, token: &str) -> Option<String> {
    c.query_opt("SELECT user_id FROM keel.session_validate($1)", &[&token])
        .unwrap_or_else(|e| panic!("validate: {e:?}"))
        .map(|r| r.get(0))
}

/// The row version of a session (its xmin): changes exactly when the row is written.
fn version(c: &mut Client, id: &str) -> String {
    one(
        c,
        &format!("SELECT xmin::text FROM keel.sessions WHERE session_id = '{id}'"),
    )
}

fn create_validate_and_what_is_stored(env: &Env) {
    let mut c = env.pg.connect();
    let (id, token) = create(
        &mut c,
        "'alice', idle_timeout => '10 minutes', data => '{\"mfa\": true}'",
    );
    assert_eq!(token.len(), 43, "32 bytes in unpadded base64url");
    assert!(token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    let (_, other) = create(&mut c, "'alice'");
    assert_ne!(token, other, "tokens are random");

    let r = c
        .query_one(
            "SELECT session_id::text, user_id, data::text, expires_at - created_at,
                    idle_expires_at - created_at
               FROM keel.session_validate($1)",
            &[&token],
        )
        .expect("validate");
    assert_eq!(r.get::<_, String>(0), id);
    assert_eq!(r.get::<_, String>(1), "alice");
    assert_eq!(r.get::<_, String>(2), r#"{"mfa": true}"#);
    // Only SHA-256 of the token's 32 bytes is stored, and nowhere the token itself.
    let stored: bool = c
        .query_one(
            "SELECT token_hash = sha256(decode(translate($1, '-_', '+/') || '=', 'base64'))
               FROM keel.sessions WHERE session_id::text = $2",
            &[&token, &id],
        )
        .expect("hash")
        .get(0);
    assert!(stored, "token_hash is sha256 of the token's bytes");
    let leaks: i64 = one(
        &mut c,
        &format!(
            "SELECT count(*) FROM keel.sessions s WHERE s::text LIKE '%{}%'",
            &token[..20]
        ),
    );
    assert_eq!(leaks, 0, "the token is not stored in any column");
    // No function of the API returns a token hash.
    let exposing: i64 = one(
        &mut c,
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = 'keel' AND p.proname NOT LIKE '\\_%'
            AND 'token_hash' = ANY (coalesce(p.proargnames, '{}'))",
    );
    assert_eq!(exposing, 0);

    // Data: merge adds keys, replace replaces.
    exec(
        &mut c,
        &format!("SELECT keel.session_set_data('{token}', '{{\"role\": \"admin\"}}')"),
    );
    let data: String = one(
        &mut c,
        &format!("SELECT data::text FROM keel.session_validate('{token}')"),
    );
    assert_eq!(data, r#"{"mfa": true, "role": "admin"}"#);
    exec(
        &mut c,
        &format!("SELECT keel.session_set_data('{token}', '{{\"x\": 1}}', merge => false)"),
    );
    let data: String = one(
        &mut c,
        &format!("SELECT data::text FROM keel.session_validate('{token}')"),
    );
    assert_eq!(data, r#"{"x": 1}"#);

    // user_sessions: both of alice's, never the hash.
    let rows = c
        .query("SELECT * FROM keel.user_sessions('alice')", &[])
        .expect("user_sessions");
    assert_eq!(rows.len(), 2);
    let columns: Vec<&str> = rows[0].columns().iter().map(|c| c.name()).collect();
    assert_eq!(
        columns,
        [
            "session_id",
            "created_at",
            "last_seen_at",
            "expires_at",
            "idle_expires_at",
            "data"
        ]
    );
    // Unknown and malformed tokens are no session.
    let unknown = "A".repeat(43);
    assert_eq!(validate(&mut c, &unknown), None);
    assert_eq!(validate(&mut c, "not a token"), None);
    assert_eq!(validate(&mut c, ""), None);
    let changed: bool = one(
        &mut c,
        &format!("SELECT keel.session_set_data('{unknown}', '{{}}')"),
    );
    assert!(!changed, "set_data on no session is false");

    // Called the other ways SQL allows: in the select list (a set of zero or one row per
    // token), LATERAL over many tokens, and with its columns expanded.
    let bad = "not a token";
    let users: Vec<String> = c
        .query(
            "SELECT (keel.session_validate(t)).user_id FROM unnest($1::text[]) t",
            &[&vec![token.as_str(), unknown.as_str(), bad, other.as_str()]],
        )
        .expect("select list")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(users, ["alice", "alice"], "no row for unknown or malformed");
    let lateral: i64 = one(
        &mut c,
        &format!(
            "SELECT count(*) FROM (VALUES ('{token}'), ('{unknown}'), ('{other}')) v(t)
               CROSS JOIN LATERAL keel.session_validate(v.t) s WHERE s.user_id = 'alice'"
        ),
    );
    assert_eq!(lateral, 2);
    let expanded: String = one(
        &mut c,
        &format!("SELECT s.session_id::text FROM (SELECT (keel.session_validate('{token}')).*) s"),
    );
    assert_eq!(expanded, id, "columns expanded in the select list");
    let none: i64 = one(
        &mut c,
        &format!("SELECT count(*) FROM (SELECT keel.session_validate('{unknown}')) s"),
    );
    assert_eq!(none, 0, "no row in the select list either");
}

fn expiry_by_ttl_and_idle_timeout_and_touch_throttling(env: &Env) {
    let mut c = env.pg.connect();
    // ttl.
    let (_, short) = create(&mut c, "'ttl-user', ttl => '1 second'");
    assert_eq!(validate(&mut c, &short).as_deref(), Some("ttl-user"));
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(validate(&mut c, &short), None, "expired by ttl");

    // Touch throttling: inside the interval a validation writes nothing.
    exec(&mut c, "SET keel.session_touch_interval = 1");
    let (id, token) = create(&mut c, "'touch-user'");
    let v0 = version(&mut c, &id);
    for _ in 0..5 {
        assert!(validate(&mut c, &token).is_some());
    }
    assert_eq!(version(&mut c, &id), v0, "no write inside the interval");
    std::thread::sleep(Duration::from_millis(1100));
    let seen_before: String = one(
        &mut c,
        &format!("SELECT last_seen_at::text FROM keel.sessions WHERE session_id = '{id}'"),
    );
    assert!(validate(&mut c, &token).is_some());
    let v1 = version(&mut c, &id);
    assert_ne!(v1, v0, "the touch is due: one write");
    let seen_after: String = one(
        &mut c,
        &format!("SELECT last_seen_at::text FROM keel.sessions WHERE session_id = '{id}'"),
    );
    assert!(seen_after > seen_before, "{seen_after} > {seen_before}");
    assert!(validate(&mut c, &token).is_some());
    assert_eq!(version(&mut c, &id), v1, "two validations, one write");

    // Idle timeout: each touch slides it; without a touch it ends the session.
    exec(&mut c, "SET keel.session_touch_interval = 0");
    let (_, idle) = create(
        &mut c,
        "'idle-user', ttl => '1 hour', idle_timeout => '2 seconds'",
    );
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        assert!(
            validate(&mut c, &idle).is_some(),
            "used every 1.2 s with a 2 s idle timeout: still valid"
        );
    }
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(validate(&mut c, &idle), None, "idle-expired");
    // The idle expiry never slides past the absolute one.
    let (id, capped) = create(
        &mut c,
        "'cap-user', ttl => '3 seconds', idle_timeout => '3 seconds'",
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert!(validate(&mut c, &capped).is_some());
    let capped_ok: bool = one(
        &mut c,
        &format!(
            "SELECT idle_expires_at = expires_at FROM keel.sessions WHERE session_id = '{id}'"
        ),
    );
    assert!(capped_ok, "idle expiry capped at expires_at");
    exec(&mut c, "RESET keel.session_touch_interval");
}

fn rotation_and_revocation_take_effect_at_once(env: &Env) {
    let mut c = env.pg.connect();
    let mut other = env.pg.connect();
    let (id, old) = create(&mut c, "'rot-user', data => '{\"a\": 1}'");
    let new: String = one(&mut c, &format!("SELECT keel.session_rotate('{old}')"));
    assert_ne!(new, old);
    assert_eq!(validate(&mut other, &old), None, "old token dead at once");
    let same: String = one(
        &mut other,
        &format!("SELECT session_id::text || data::text FROM keel.session_validate('{new}')"),
    );
    assert_eq!(same, format!("{id}{{\"a\": 1}}"), "same session, same data");
    let again: Option<String> = one(&mut c, &format!("SELECT keel.session_rotate('{old}')"));
    assert_eq!(again, None, "an old token cannot be rotated");

    // revoke by token, by id.
    let revoked: bool = one(&mut c, &format!("SELECT keel.session_revoke('{new}')"));
    assert!(revoked);
    assert_eq!(validate(&mut other, &new), None);
    let twice: bool = one(&mut c, &format!("SELECT keel.session_revoke('{new}')"));
    assert!(!twice, "already revoked");
    let (id2, t2) = create(&mut c, "'rot-user'");
    let by_id: bool = one(&mut c, &format!("SELECT keel.session_revoke_id('{id2}')"));
    assert!(by_id);
    assert_eq!(validate(&mut other, &t2), None);

    // Log out my other devices.
    let (keep_id, keep) = create(&mut c, "'many-user'");
    let others: Vec<String> = (0..4).map(|_| create(&mut c, "'many-user'").1).collect();
    let (_, bystander) = create(&mut c, "'someone-else'");
    let n: i32 = one(
        &mut c,
        &format!("SELECT keel.session_revoke_user('many-user', except_session => '{keep_id}')"),
    );
    assert_eq!(n, 4);
    assert!(
        validate(&mut other, &keep).is_some(),
        "the current device stays"
    );
    for t in &others {
        assert_eq!(validate(&mut other, t), None);
    }
    assert!(validate(&mut other, &bystander).is_some());
    let listed: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.user_sessions('many-user')",
    );
    assert_eq!(listed, 1);
    let all: i32 = one(&mut c, "SELECT keel.session_revoke_user('many-user')");
    assert_eq!(all, 1);
    assert_eq!(validate(&mut other, &keep), None);
}

fn revocation_events_reach_the_outbox_at_commit_only(env: &Env) {
    let mut c = env.pg.connect();
    let mut watcher = env.pg.connect();
    let count = |w: &mut Client| -> i64 {
        one(
            w,
            "SELECT count(*) FROM keel.outbox WHERE topic = 'keel.session_revoked'",
        )
    };
    let base = count(&mut watcher);
    // Off (the default): nothing is emitted.
    let (_, t) = create(&mut c, "'ev-user'");
    exec(&mut c, &format!("SELECT keel.session_revoke('{t}')"));
    assert_eq!(count(&mut watcher), base);

    exec(&mut c, "SET keel.session_events = on");
    let (id1, t1) = create(&mut c, "'ev-user'");
    let (id2, _) = create(&mut c, "'ev-user'");
    let (id3, _) = create(&mut c, "'ev-user'");
    let mut tx = c.transaction().expect("begin");
    tx.batch_execute(&format!("SELECT keel.session_rotate('{t1}')"))
        .expect("rotate");
    tx.batch_execute(&format!(
        "SELECT keel.session_revoke_user('ev-user', except_session => '{id2}')"
    ))
    .expect("revoke_user");
    assert_eq!(count(&mut watcher), base, "nothing before commit");
    tx.commit().expect("commit");
    exec(&mut c, &format!("SELECT keel.session_revoke_id('{id2}')"));
    let mut events: Vec<(String, String, String)> = watcher
        .query(
            "SELECT payload->>'session_id', payload->>'user_id', payload->>'reason'
               FROM keel.outbox WHERE topic = 'keel.session_revoked' ORDER BY id",
            &[],
        )
        .expect("events")
        .iter()
        .skip(base as usize)
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let u = "ev-user".to_string();
    let mut expected = vec![
        (id1.clone(), u.clone(), "rotated".to_string()),
        (id1, u.clone(), "revoked_user".to_string()),
        (id3, u.clone(), "revoked_user".to_string()),
        (id2, u, "revoked".to_string()),
    ];
    events.sort();
    expected.sort();
    assert_eq!(events, expected);
    // A rolled-back revocation emits nothing and revokes nothing.
    let (_, t4) = create(&mut c, "'ev-user'");
    let mut tx = c.transaction().expect("begin");
    tx.batch_execute(&format!("SELECT keel.session_revoke('{t4}')"))
        .expect("revoke");
    tx.rollback().expect("rollback");
    assert_eq!(count(&mut watcher), base + 4);
    assert!(validate(&mut watcher, &t4).is_some());
    exec(&mut c, "RESET keel.session_events");
}

fn validate_never_waits_and_reads_without_writing_when_read_only(env: &Env) {
    let mut c = env.pg.connect();
    let (id, token) = create(&mut c, "'lock-user', idle_timeout => '1 hour'");
    // Someone holds the session's row (a set_data not yet committed)...
    let mut holder = env.pg.connect();
    let mut tx = holder.transaction().expect("begin");
    tx.batch_execute(&format!(
        "SELECT keel.session_set_data('{token}', '{{\"k\": 1}}')"
    ))
    .expect("set_data");
    // ...and a touch is due on every call: validate neither waits nor fails.
    exec(
        &mut c,
        "SET keel.session_touch_interval = 0; SET lock_timeout = '5s'",
    );
    let started = Instant::now();
    for _ in 0..20 {
        assert!(validate(&mut c, &token).is_some());
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "20 validations took {:?} with the row held",
        started.elapsed()
    );
    tx.commit().expect("commit");
    // In a read-only transaction (as on a hot standby) a due touch is skipped, not an error.
    let v0 = version(&mut c, &id);
    exec(&mut c, "BEGIN READ ONLY");
    assert!(validate(&mut c, &token).is_some());
    exec(&mut c, "COMMIT");
    assert_eq!(version(&mut c, &id), v0, "nothing written read-only");
    assert!(validate(&mut c, &token).is_some());
    assert_ne!(version(&mut c, &id), v0, "written when it may");
    exec(
        &mut c,
        "RESET keel.session_touch_interval; RESET lock_timeout",
    );
}

/// A streaming standby of the test cluster: validate answers from what was replayed, a touch
/// due there is skipped (no error, no slide), revocation and rotation on the primary reach it
/// with the WAL, and whatever would write gets 25006.
fn a_hot_standby_validates_without_writing(env: &Env) {
    let mut p = env.pg.connect();
    let (id, token) = create(&mut p, "'standby-user', idle_timeout => '1 hour'");
    let (_, revoked) = create(&mut p, "'standby-user'");
    let (idle_id, idle) = create(&mut p, "'standby-user', idle_timeout => '1 hour'");
    let (_, rotated) = create(&mut p, "'standby-user'");
    exec(
        &mut p,
        &format!(
            "UPDATE keel.sessions SET idle_expires_at = now() - interval '1 second'
              WHERE session_id = '{idle_id}'"
        ),
    );
    let standby = env.pg.standby();
    env.pg.wait_replayed_by(&standby);
    let mut s = standby.connect();
    // The worker does not run on a standby (it needs recovery finished), and says why.
    let (pid, state): (Option<i32>, String) = {
        let r = s
            .query_one("SELECT pid, state FROM keel.worker_status()", &[])
            .expect("worker_status on the standby");
        (r.get(0), r.get(1))
    };
    assert_eq!(pid, None, "no worker on the standby");
    assert!(state.contains("recovery"), "the standby's worker: {state}");

    // A touch is due on every call: skipped on the standby, the session still validates.
    exec(&mut s, "SET keel.session_touch_interval = 0");
    let stored: String = one(
        &mut s,
        &format!("SELECT idle_expires_at::text FROM keel.sessions WHERE session_id = '{id}'"),
    );
    for _ in 0..3 {
        let r = s
            .query_one(
                "SELECT user_id, idle_expires_at::text FROM keel.session_validate($1)",
                &[&token],
            )
            .expect("validate on the standby");
        assert_eq!(r.get::<_, String>(0), "standby-user");
        assert_eq!(
            r.get::<_, String>(1),
            stored,
            "the idle expiry does not slide"
        );
    }
    assert_eq!(
        validate(&mut s, &idle),
        None,
        "idle-expired on the standby too"
    );
    let listed: i64 = one(
        &mut s,
        "SELECT count(*) FROM keel.user_sessions('standby-user')",
    );
    assert_eq!(listed, 3, "user_sessions reads on the standby");

    // What writes is refused there, with the read-only SQLSTATE.
    expect_sqlstates(
        &mut s,
        &[
            ("SELECT keel.session_create('standby-user')", "25006"),
            (
                &format!("SELECT keel.session_set_data('{token}', '{{\"k\": 1}}')"),
                "25006",
            ),
            (&format!("SELECT keel.session_revoke('{token}')"), "25006"),
        ],
    );

    // Revocation and rotation on the primary take effect on the standby with the WAL.
    let fresh: String = one(&mut p, &format!("SELECT keel.session_rotate('{rotated}')"));
    exec(&mut p, &format!("SELECT keel.session_revoke('{revoked}')"));
    env.pg.wait_replayed_by(&standby);
    assert_eq!(validate(&mut s, &revoked), None, "revoked on the primary");
    assert_eq!(
        validate(&mut s, &rotated),
        None,
        "the old token of a rotation"
    );
    assert_eq!(validate(&mut s, &fresh).as_deref(), Some("standby-user"));

    // The primary's touch slides the idle expiry; the standby then answers with the new one.
    exec(&mut p, "SET keel.session_touch_interval = 0");
    assert!(validate(&mut p, &token).is_some());
    env.pg.wait_replayed_by(&standby);
    let slid: String = one(
        &mut s,
        &format!("SELECT idle_expires_at::text FROM keel.session_validate('{token}')"),
    );
    assert!(
        slid > stored,
        "the primary's touch replayed: {slid} after {stored}"
    );
    exec(&mut p, "RESET keel.session_touch_interval");

    // Promoted, the standby is the authority: its worker starts, and a due touch writes.
    standby.promote();
    let started = wait_for(Duration::from_secs(30), || {
        one::<Option<i32>>(&mut s, "SELECT pid FROM keel.worker_status()")
    });
    assert!(
        started.is_some(),
        "no worker after promotion\n{}",
        standby.log()
    );
    let v0 = version(&mut s, &id);
    assert!(validate(&mut s, &token).is_some());
    assert_ne!(
        version(&mut s, &id),
        v0,
        "the touch is written after promotion"
    );
    assert_eq!(
        validate(&mut s, &revoked),
        None,
        "still revoked after promotion"
    );
    exec(
        &mut p,
        "DELETE FROM keel.sessions WHERE user_id = 'standby-user'",
    );
}

/// Sessions are data: a database restored from pg_dump keeps them, so a restore does not log
/// everyone out, and a revoked token stays revoked.
fn pg_dump_keeps_sessions_and_their_tokens(env: &Env) {
    let mut c = env.pg.connect();
    let (id, token) = create(
        &mut c,
        "'dump-user', idle_timeout => '1 hour', data => '{\"mfa\": true}'",
    );
    let (_, revoked) = create(&mut c, "'dump-user'");
    exec(&mut c, &format!("SELECT keel.session_revoke('{revoked}')"));
    let mut r = env.pg.restored_copy("keel_sessions_restored");
    let row = r
        .query_one(
            "SELECT session_id::text, user_id, data::text, idle_expires_at IS NOT NULL
               FROM keel.session_validate($1)",
            &[&token],
        )
        .expect("validate in the restored database");
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2),
            row.get::<_, bool>(3)
        ),
        (
            id.clone(),
            "dump-user".into(),
            r#"{"mfa": true}"#.into(),
            true
        )
    );
    assert_eq!(validate(&mut r, &revoked), None, "still revoked");
    let checks: bool = one(
        &mut r,
        &format!("SELECT idle_check_at IS NOT NULL FROM keel.sessions WHERE session_id = '{id}'"),
    );
    assert!(checks, "the idle check is restored with the session");
    drop(r);
    env.pg.drop_database("keel_sessions_restored");
    exec(
        &mut c,
        "DELETE FROM keel.sessions WHERE user_id = 'dump-user'",
    );
}

/// `pg_ctl stop -m immediate` right after the calls returned: what session_create,
/// session_rotate and the revocations committed is there after crash recovery (they commit as
/// the caller's transaction does, with the flush); only a touch may be forgotten.
fn a_crash_loses_no_session_and_no_revocation(env: &Env) {
    let mut c = env.pg.connect();
    let (id, token) = create(&mut c, "'crash-user', idle_timeout => '1 hour'");
    let (_, revoked) = create(&mut c, "'crash-user'");
    let (_, rotated) = create(&mut c, "'crash-user'");
    let (_, others) = create(&mut c, "'crash-other'");
    exec(&mut c, &format!("SELECT keel.session_revoke('{revoked}')"));
    let fresh: String = one(&mut c, &format!("SELECT keel.session_rotate('{rotated}')"));
    let ended: i32 = one(&mut c, "SELECT keel.session_revoke_user('crash-other')");
    assert_eq!(ended, 1);
    exec(&mut c, "SET keel.session_touch_interval = 0");
    assert!(validate(&mut c, &token).is_some());
    drop(c);
    env.pg.crash();
    env.pg.start_again();
    let mut c = env.pg.connect();
    assert!(validate(&mut c, &token).is_some(), "a created session");
    assert!(validate(&mut c, &fresh).is_some(), "a rotated token");
    for (what, t) in [
        ("revoked", &revoked),
        ("rotated away", &rotated),
        ("revoked with its user", &others),
    ] {
        assert_eq!(
            validate(&mut c, t),
            None,
            "{what}: still ended after the crash"
        );
    }
    exec(
        &mut c,
        &format!(
            "DELETE FROM keel.sessions WHERE user_id IN ('crash-user', 'crash-other')
                 OR session_id = '{id}'"
        ),
    );
}

fn bad_input_gets_a_sqlstate_and_changes_nothing(env: &Env) {
    let mut c = env.pg.connect();
    let (id, token) = create(&mut c, "'bad-user'");
    let snapshot = |c: &mut Client| -> String {
        one(
            c,
            "SELECT count(*)::text || md5(coalesce(string_agg(s::text, ',' ORDER BY session_id), ''))
               FROM keel.sessions s",
        )
    };
    let before = snapshot(&mut c);
    let short = &token[..42];
    let plus = format!("+{}", &token[1..]);
    let cases: Vec<(String, &str)> = vec![
        ("SELECT keel.session_create('')".into(), "22023"),
        ("SELECT keel.session_create('')".into(), "22023"),
        (
            format!("SELECT keel.session_create('{}')", "u".repeat(1025)),
            "22023",
        ),
        (
            "SELECT keel.session_create('u', ttl => NULL)".into(),
            "22023",
        ),
        (
            "SELECT keel.session_create('u', ttl => '-1 day')".into(),
            "22023",
        ),
        (
            "SELECT keel.session_create('u', ttl => '0')".into(),
            "22023",
        ),
        (
            "SELECT keel.session_create('u', idle_timeout => '-1 minute')".into(),
            "22023",
        ),
        (
            "SELECT keel.session_create('u', ttl => '1 hour', idle_timeout => '2 hours')".into(),
            "22023",
        ),
        (
            "SELECT keel.session_create('u', data => NULL)".into(),
            "22023",
        ),
        (
            "SELECT keel.session_create('u', data => '[1, 2]')".into(),
            "22023",
        ),
        (
            "SELECT keel.session_create('u', data => '\"text\"')".into(),
            "22023",
        ),
        ("SELECT keel.session_validate(NULL)".into(), "22023"),
        ("SELECT keel.session_set_data(NULL, '{}')".into(), "22023"),
        (
            format!("SELECT keel.session_set_data('{short}', '{{}}')"),
            "22023",
        ),
        (
            format!("SELECT keel.session_set_data('{token}', NULL)"),
            "22023",
        ),
        (
            format!("SELECT keel.session_set_data('{token}', '[1]')"),
            "22023",
        ),
        (
            format!("SELECT keel.session_set_data('{token}', '{{}}', NULL)"),
            "22023",
        ),
        ("SELECT keel.session_rotate(NULL)".into(), "22023"),
        (format!("SELECT keel.session_rotate('{plus}')"), "22023"),
        ("SELECT keel.session_rotate('')".into(), "22023"),
        ("SELECT keel.session_revoke(NULL)".into(), "22023"),
        (format!("SELECT keel.session_revoke('{short}')"), "22023"),
        ("SELECT keel.session_revoke_id(NULL)".into(), "22023"),
        (
            "SELECT keel.session_revoke_id('not-a-uuid')".into(),
            "22P02",
        ),
        ("SELECT keel.session_revoke_user(NULL)".into(), "22023"),
        ("SELECT keel.session_revoke_user('')".into(), "22023"),
        ("SELECT keel.user_sessions(NULL)".into(), "22023"),
        ("SELECT keel.cleanup_sessions(0)".into(), "22023"),
        ("SELECT keel.cleanup_sessions(NULL)".into(), "22023"),
    ];
    let cases: Vec<(&str, &str)> = cases.iter().map(|(s, e)| (s.as_str(), *e)).collect();
    expect_sqlstates(&mut c, &cases);
    // Too-large data is refused with keel.max_payload_bytes' error.
    exec(&mut c, "SET keel.max_payload_bytes = 1024");
    let big = format!("{{\"k\": \"{}\"}}", "x".repeat(4000));
    expect_sqlstates(
        &mut c,
        &[
            (
                &format!("SELECT keel.session_create('u', data => '{big}')"),
                "54000",
            ),
            (
                &format!("SELECT keel.session_set_data('{token}', '{big}')"),
                "54000",
            ),
        ],
    );
    exec(&mut c, "RESET keel.max_payload_bytes");
    assert_eq!(snapshot(&mut c), before, "nothing changed");
    // A malformed token's message never repeats it.
    let err = c
        .batch_execute(&format!("SELECT keel.session_revoke('{short}')"))
        .expect_err("malformed");
    let db = err.as_db_error().expect("db error");
    assert!(!db.message().contains(short), "{}", db.message());
    assert!(db.hint().is_some());
    let _ = id;
}

fn privileges_go_through_the_grant_helpers(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sess_app') THEN
             CREATE ROLE sess_app LOGIN;
           END IF;
         END $$",
    );
    exec(&mut c, "SET ROLE sess_app");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.session_create('p')")).as_deref(),
        Some("42501"),
        "nothing for PUBLIC"
    );
    exec(&mut c, "RESET ROLE; SELECT keel.grant_sessions('sess_app')");
    exec(&mut c, "SET ROLE sess_app");
    let (id, token) = create(&mut c, "'p'");
    assert_eq!(validate(&mut c, &token).as_deref(), Some("p"));
    // A due touch writes as the table's owner, though the caller may not write the table.
    exec(
        &mut c,
        "SET keel.session_touch_interval = 0; SET search_path = public",
    );
    assert_eq!(validate(&mut c, &token).as_deref(), Some("p"));
    exec(
        &mut c,
        "RESET keel.session_touch_interval; RESET search_path; RESET ROLE",
    );
    let touched: bool = one(
        &mut c,
        &format!("SELECT last_seen_at > created_at FROM keel.sessions WHERE session_id = '{id}'"),
    );
    assert!(touched, "the touch was written");
    exec(&mut c, "SET ROLE sess_app");
    exec(&mut c, "SELECT * FROM keel.user_sessions('p')");
    exec(&mut c, &format!("SELECT keel.session_revoke('{token}')"));
    // A capped login works for the granted role; the lock rows stay closed to it (nobody
    // but the owner can hold a user's logins).
    let _ = create(&mut c, "'p', max_per_user => 2");
    for sql in [
        "SELECT * FROM keel.sessions",
        "SELECT keel._session_hash('AAAA')",
        "SELECT keel.cleanup_sessions()",
        "SELECT * FROM keel.session_users FOR UPDATE",
        "SELECT keel._session_evict('p', 0, now())",
    ] {
        assert_eq!(
            sqlstate(c.batch_execute(sql)).as_deref(),
            Some("42501"),
            "{sql}"
        );
    }
    exec(&mut c, "RESET ROLE");
}

/// The cleanup finds idle-expired sessions through an index that touches do not update: a
/// batch reads no more than its rows however large the table (no sequential scan), a session
/// touched since its idle check is rechecked rather than deleted, and a touch is still a HOT
/// update.
fn idle_expiry_is_found_by_index_and_touches_stay_hot(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.set_task('cleanup_sessions', enabled => false)",
    );
    let (gone_id, _) = create(&mut c, "'idle-check', idle_timeout => '1 hour'");
    let (kept_id, kept) = create(&mut c, "'idle-check', idle_timeout => '1 hour'");
    let (hot_id, hot) = create(&mut c, "'idle-check', idle_timeout => '1 hour'");
    // As if hours had passed: one idle-expired (past the 1 h grace), one touched since its check.
    exec(
        &mut c,
        &format!(
            "UPDATE keel.sessions SET idle_expires_at = now() - interval '3 hours',
                                      idle_check_at = now() - interval '3 hours'
              WHERE session_id = '{gone_id}';
             UPDATE keel.sessions SET idle_expires_at = now() + interval '30 minutes',
                                      idle_check_at = now() - interval '3 hours'
              WHERE session_id = '{kept_id}';
             INSERT INTO keel.sessions (token_hash, user_id, expires_at, idle_timeout,
                                        idle_expires_at, idle_check_at)
             SELECT sha256(int8send(-g)), 'idle-filler', now() + interval '1 day', '1 hour',
                    now() + interval '1 hour', now() + interval '1 hour'
               FROM generate_series(1, 20000) g;
             ANALYZE keel.sessions"
        ),
    );
    let stat = |c: &mut Client, column: &str| -> i64 {
        one(
            c,
            &format!(
                "SELECT {column} FROM pg_stat_xact_user_tables
                  WHERE relid = 'keel.sessions'::regclass"
            ),
        )
    };
    exec(&mut c, "BEGIN");
    let scans = stat(&mut c, "seq_scan");
    let deleted: i64 = one(&mut c, "SELECT keel.cleanup_sessions()");
    assert_eq!(stat(&mut c, "seq_scan"), scans, "no sequential scan");
    exec(&mut c, "COMMIT");
    assert_eq!(deleted, 1, "only the idle-expired session");
    let ids: Vec<String> = c
        .query(
            "SELECT session_id::text FROM keel.sessions WHERE user_id = 'idle-check'
              ORDER BY session_id",
            &[],
        )
        .expect("left")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut want = vec![kept_id.clone(), hot_id.clone()];
    want.sort();
    assert_eq!(ids, want);
    let moved: bool = one(
        &mut c,
        &format!(
            "SELECT idle_check_at = idle_expires_at FROM keel.sessions
              WHERE session_id = '{kept_id}'"
        ),
    );
    assert!(
        moved,
        "the touched session's check moved to its idle expiry"
    );
    assert!(validate(&mut c, &kept).is_some());
    // A second batch finds nothing due (the moved check is in the future).
    let again: i64 = one(&mut c, "SELECT keel.cleanup_sessions()");
    assert_eq!(again, 0);

    // A touch changes no indexed column: HOT.
    exec(&mut c, "BEGIN; SET LOCAL keel.session_touch_interval = 0");
    let (updates, hot_updates) = (stat(&mut c, "n_tup_upd"), stat(&mut c, "n_tup_hot_upd"));
    assert!(validate(&mut c, &hot).is_some());
    assert_eq!(stat(&mut c, "n_tup_upd"), updates + 1, "the touch wrote");
    assert_eq!(
        stat(&mut c, "n_tup_hot_upd"),
        hot_updates + 1,
        "as a HOT update"
    );
    exec(&mut c, "COMMIT");
    exec(
        &mut c,
        "DELETE FROM keel.sessions WHERE user_id IN ('idle-check', 'idle-filler');
         SELECT keel.set_task('cleanup_sessions', enabled => true)",
    );
}

fn cleanup_task_deletes_in_batches_while_validations_continue(env: &Env) {
    const EXPIRED: i64 = 150_000;
    const IDLE: i64 = 50_000;
    const LIVE: i64 = 50_000;
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.set_task('cleanup_sessions', enabled => false)",
    );
    // Made directly: 150k past their ttl, 50k idle-expired, 50k live (hashes of numbers), of
    // which 20k have an idle timeout, were touched since their idle check and must stay.
    exec(
        &mut c,
        &format!(
            "INSERT INTO keel.sessions (token_hash, user_id, created_at, last_seen_at, expires_at)
             SELECT sha256(int8send(g)), 'bulk-' || (g % 1000), now() - '3 days'::interval,
                    now() - '3 days'::interval, now() - '2 days'::interval
               FROM generate_series(1, {EXPIRED}) g;
             INSERT INTO keel.sessions (token_hash, user_id, expires_at, idle_timeout, idle_expires_at,
                                        idle_check_at, last_seen_at)
             SELECT sha256(int8send(g)), 'bulk-' || (g % 1000), now() + '20 days'::interval,
                    '1 hour', now() - '2 days'::interval, now() - '2 days'::interval,
                    now() - '2 days 1 hour'::interval
               FROM generate_series({EXPIRED} + 1, {EXPIRED} + {IDLE}) g;
             INSERT INTO keel.sessions (token_hash, user_id, expires_at)
             SELECT sha256(int8send(g)), 'bulk-' || (g % 1000), now() + '20 days'::interval
               FROM generate_series({EXPIRED} + {IDLE} + 1, {EXPIRED} + {IDLE} + {LIVE} - 20000) g;
             INSERT INTO keel.sessions (token_hash, user_id, expires_at, idle_timeout, idle_expires_at,
                                        idle_check_at)
             SELECT sha256(int8send(g)), 'bulk-touched', now() + '20 days'::interval,
                    '1 day', now() + '20 hours'::interval, now() - '2 days'::interval
               FROM generate_series({EXPIRED} + {IDLE} + {LIVE} - 20000 + 1,
                                    {EXPIRED} + {IDLE} + {LIVE}) g;
             ANALYZE keel.sessions"
        ),
    );
    let live_before: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.sessions WHERE expires_at > now()
            AND (idle_expires_at IS NULL OR idle_expires_at > now())",
    );
    // Real sessions validated throughout, touch due on every call.
    let tokens: Vec<String> = (0..20).map(|_| create(&mut c, "'busy-user'").1).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let validators: Vec<_> = (0..2)
        .map(|i| {
            let mut v = env.pg.connect();
            let (stop, tokens) = (stop.clone(), tokens.clone());
            std::thread::spawn(move || {
                exec(&mut v, "SET keel.session_touch_interval = 0");
                let stmt = v
                    .prepare("SELECT user_id FROM keel.session_validate($1)")
                    .expect("prepare");
                let (mut n, mut worst) = (0u64, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let t = &tokens[(n as usize + i) % tokens.len()];
                    let started = Instant::now();
                    let row = v.query_opt(&stmt, &[t]).expect("validate");
                    worst = worst.max(started.elapsed());
                    assert!(row.is_some(), "a live session stays valid during cleanup");
                    n += 1;
                }
                (n, worst)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    exec(
        &mut c,
        "SELECT keel.set_task('cleanup_sessions', every => '1 second', enabled => true)",
    );
    let done = wait_for(Duration::from_secs(120), || {
        let left: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.sessions WHERE user_id LIKE 'bulk-%'",
        );
        (left == LIVE).then_some(())
    });
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut calls, mut worst) = (0, Duration::ZERO);
    for h in validators {
        let (n, w) = h.join().expect("validator");
        calls += n;
        worst = worst.max(w);
    }
    assert!(done.is_some(), "cleanup did not finish in 120 s");
    let live_after: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.sessions WHERE expires_at > now()
            AND (idle_expires_at IS NULL OR idle_expires_at > now())",
    );
    assert_eq!(
        live_after,
        live_before + tokens.len() as i64,
        "no live session deleted"
    );
    // Their checks move in the same batches (maybe the last one still running).
    let rechecked = wait_for(Duration::from_secs(30), || {
        let n: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.sessions
              WHERE user_id = 'bulk-touched' AND idle_check_at = idle_expires_at",
        );
        (n == 20_000).then_some(n)
    });
    assert_eq!(
        rechecked,
        Some(20_000),
        "touched sessions' idle checks moved, not deleted"
    );
    let rows = (EXPIRED + IDLE) as f64;
    let (last_rows, error): (Option<i64>, Option<String>) = {
        let r = c
            .query_one(
                "SELECT last_rows, last_error FROM keel.tasks WHERE name = 'cleanup_sessions'",
                &[],
            )
            .expect("task");
        (r.get(0), r.get(1))
    };
    assert_eq!(error, None);
    println!(
        "    cleanup: {} ended sessions among {LIVE} live (20000 of them rechecked) deleted in \
         {:.1} s by the task (≈ {:.0} rows/s incl. scheduling; last run {} rows); {calls} \
         validations meanwhile, longest {:.1} ms",
        EXPIRED + IDLE,
        took.as_secs_f64(),
        rows / took.as_secs_f64(),
        last_rows.unwrap_or(0),
        worst.as_secs_f64() * 1000.0
    );
    assert!(
        worst < Duration::from_secs(1),
        "a validation waited {worst:?} during cleanup"
    );
    exec(
        &mut c,
        "SELECT keel.set_task('cleanup_sessions', every => '1 minute');
         DELETE FROM keel.sessions WHERE user_id LIKE 'bulk-%'",
    );
}

/// (subject, data as text) of a consumed one-time token, or None.
fn consume(c: &mut Client, purpose: &str, token: &str) -> Option<(String, String)> {
    c.query_opt(
        "SELECT subject, data::text FROM keel.token_consume($1, $2)",
        &[&purpose, &token],
    )
    .unwrap_or_else(|e| panic!("token_consume: {e:?}"))
    .map(|r| (r.get(0), r.get(1)))
}

fn one_time_tokens_are_consumed_once_for_their_purpose(env: &Env) {
    let mut c = env.pg.connect();
    let reset: String = one(
        &mut c,
        "SELECT keel.token_create('password_reset', 'user-7', '1 hour', '{\"ip\": \"10.0.0.1\"}')",
    );
    assert_eq!(reset.len(), 43, "32 bytes, base64url: {reset}");
    // Stored as its SHA-256 only, with what it was made for.
    let (purpose, subject, stored_len, plain): (String, String, i32, bool) = {
        let r = c
            .query_one(
                "SELECT purpose, subject, octet_length(token_hash),
                        position(convert_to($1, 'UTF8') IN token_hash) > 0
                   FROM keel.tokens WHERE token_hash = sha256(decode(translate($1 || '=', '-_', '+/'), 'base64'))",
                &[&reset],
            )
            .expect("stored row");
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };
    assert_eq!(
        (purpose.as_str(), subject.as_str(), stored_len, plain),
        ("password_reset", "user-7", 32, false)
    );
    // Another purpose does not consume it (and leaves it valid for its own).
    assert_eq!(consume(&mut c, "email_verify", &reset), None);
    let got = consume(&mut c, "password_reset", &reset);
    assert_eq!(got, Some(("user-7".into(), r#"{"ip": "10.0.0.1"}"#.into())));
    assert_eq!(consume(&mut c, "password_reset", &reset), None, "once");
    // Unknown and malformed tokens: no row, no error.
    for t in [
        "",
        "not a token",
        "AAAA",
        &"A".repeat(43),
        &"x".repeat(5000),
    ] {
        assert_eq!(consume(&mut c, "password_reset", t), None, "{t:.20}");
    }
    // Expiry: an expired token is not consumed.
    let short: String = one(
        &mut c,
        "SELECT keel.token_create('magic_link', 'user-7', '200 milliseconds')",
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(consume(&mut c, "magic_link", &short), None, "expired");
    // A consumption rolled back leaves the token to consume again.
    let link: String = one(
        &mut c,
        "SELECT keel.token_create('magic_link', 'user-8', '1 hour')",
    );
    exec(&mut c, "BEGIN");
    assert!(consume(&mut c, "magic_link", &link).is_some());
    exec(&mut c, "ROLLBACK");
    assert!(
        consume(&mut c, "magic_link", &link).is_some(),
        "after a rollback"
    );
    // token_revoke withdraws every outstanding token of a purpose for a subject.
    let a: String = one(
        &mut c,
        "SELECT keel.token_create('password_reset', 'user-9', '1 hour')",
    );
    let b: String = one(
        &mut c,
        "SELECT keel.token_create('password_reset', 'user-9', '1 hour')",
    );
    let other: String = one(
        &mut c,
        "SELECT keel.token_create('email_verify', 'user-9', '1 hour')",
    );
    let n: i32 = one(
        &mut c,
        "SELECT keel.token_revoke('password_reset', 'user-9')",
    );
    assert_eq!(n, 2);
    assert_eq!(consume(&mut c, "password_reset", &a), None);
    assert_eq!(consume(&mut c, "password_reset", &b), None);
    assert!(
        consume(&mut c, "email_verify", &other).is_some(),
        "other purposes stay"
    );
    exec(
        &mut c,
        "DELETE FROM keel.tokens WHERE subject LIKE 'user-%'",
    );
}

fn one_time_token_consumed_by_exactly_one_of_eight_racing_clients(env: &Env) {
    use std::sync::Barrier;
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 25;
    let mut c = env.pg.connect();
    let mut winners_per_token = Vec::new();
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| env.pg.connect()).collect();
    for _ in 0..ROUNDS {
        let token: String = one(
            &mut c,
            "SELECT keel.token_create('race', 'racer', '1 hour')",
        );
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let handles: Vec<_> = clients
            .drain(..)
            .map(|mut client| {
                let (barrier, token) = (barrier.clone(), token.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let got = client
                        .query(
                            "SELECT subject FROM keel.token_consume('race', $1)",
                            &[&token],
                        )
                        .expect("consume")
                        .len();
                    (client, got)
                })
            })
            .collect();
        let mut winners = 0;
        for h in handles {
            let (client, got) = h.join().expect("client");
            winners += got;
            clients.push(client);
        }
        winners_per_token.push(winners);
    }
    println!(
        "    {CLIENTS} clients racing to consume each of {ROUNDS} tokens: winners per token {:?}",
        winners_per_token
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert!(
        winners_per_token.iter().all(|&w| w == 1),
        "exactly one consumer per token: {winners_per_token:?}"
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.tokens WHERE purpose = 'race'"
        ),
        0
    );
}

fn one_time_tokens_bad_input_privileges_crash_and_cleanup(env: &Env) {
    let mut c = env.pg.connect();
    let count = |c: &mut Client| -> i64 { one(c, "SELECT count(*) FROM keel.tokens") };
    let before = count(&mut c);
    let big = "x".repeat(2_000_000);
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT keel.token_create(NULL, 's', '1 hour')", "22023"),
            ("SELECT keel.token_create('', 's', '1 hour')", "22023"),
            ("SELECT keel.token_create('Reset Password', 's', '1 hour')", "22023"),
            ("SELECT keel.token_create(repeat('p', 64), 's', '1 hour')", "22023"),
            ("SELECT keel.token_create('p', NULL, '1 hour')", "22023"),
            ("SELECT keel.token_create('p', '', '1 hour')", "22023"),
            ("SELECT keel.token_create('p', repeat('s', 1025), '1 hour')", "22023"),
            ("SELECT keel.token_create('p', 's', NULL)", "22023"),
            ("SELECT keel.token_create('p', 's', '0 seconds')", "22023"),
            ("SELECT keel.token_create('p', 's', '-1 hour')", "22023"),
            ("SELECT keel.token_create('p', 's', '178000000 years')", "22023"),
            ("SELECT keel.token_create('p', 's', '1 hour', '[1]')", "22023"),
            ("SELECT keel.token_create('p', 's', '1 hour', NULL)", "22023"),
            (
                &format!("SELECT keel.token_create('p', 's', '1 hour', jsonb_build_object('x', '{big}'))"),
                "54000",
            ),
            ("SELECT * FROM keel.token_consume('p', NULL)", "22023"),
            ("SELECT * FROM keel.token_consume(NULL, 'AAAA')", "22023"),
            ("SELECT keel.token_revoke('p', NULL)", "22023"),
            ("SELECT keel.token_revoke('P!', 's')", "22023"),
        ],
    );
    assert_eq!(count(&mut c), before, "bad input stored nothing");
    // Privileges: nothing for PUBLIC; grant_sessions gives the three functions, never the table.
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tok_app') THEN
             CREATE ROLE tok_app LOGIN;
           END IF;
         END $$",
    );
    exec(&mut c, "SET ROLE tok_app");
    for sql in [
        "SELECT keel.token_create('p', 's', '1 hour')",
        "SELECT * FROM keel.token_consume('p', 'AAAA')",
        "SELECT keel.token_revoke('p', 's')",
    ] {
        assert_eq!(
            sqlstate(c.batch_execute(sql)).as_deref(),
            Some("42501"),
            "{sql}"
        );
    }
    exec(
        &mut c,
        "RESET ROLE; SELECT keel.grant_sessions('tok_app'); SET ROLE tok_app",
    );
    let token: String = one(
        &mut c,
        "SELECT keel.token_create('verify', 'tok-user', '1 hour')",
    );
    assert_eq!(
        sqlstate(c.batch_execute("SELECT * FROM keel.tokens")).as_deref(),
        Some("42501"),
        "the table stays closed"
    );
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel._token_hash('AAAA')")).as_deref(),
        Some("42501")
    );
    exec(&mut c, "RESET ROLE");
    // A crash right after create and after consume loses neither.
    let consumed: String = one(
        &mut c,
        "SELECT keel.token_create('verify', 'tok-user', '1 hour')",
    );
    assert!(consume(&mut c, "verify", &consumed).is_some());
    drop(c);
    env.pg.crash();
    env.pg.start_again();
    let mut c = env.pg.connect();
    assert_eq!(
        consume(&mut c, "verify", &consumed),
        None,
        "consumed stays consumed"
    );
    assert_eq!(
        consume(&mut c, "verify", &token).map(|r| r.0).as_deref(),
        Some("tok-user"),
        "a created token survives the crash"
    );
    // The cleanup task deletes tokens expired more than keel.session_cleanup_grace ago (after
    // whatever earlier tests left for it).
    while one::<i64>(&mut c, "SELECT keel.cleanup_sessions(100000)") > 0 {}
    exec(
        &mut c,
        "INSERT INTO keel.tokens (token_hash, purpose, subject, expires_at)
         SELECT sha256(('old-' || i)::bytea), 'old', 'x', now() - interval '30 days'
           FROM generate_series(1, 5) i;
         INSERT INTO keel.tokens (token_hash, purpose, subject, expires_at)
         SELECT sha256(('live-' || i)::bytea), 'live', 'x', now() + interval '1 day'
           FROM generate_series(1, 3) i",
    );
    let deleted: i64 = one(&mut c, "SELECT keel.cleanup_sessions(3)");
    assert_eq!(deleted, 3, "a batch is at most max_rows");
    let deleted: i64 = one(&mut c, "SELECT keel.cleanup_sessions(100)");
    assert_eq!(deleted, 2);
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.tokens WHERE purpose IN ('old', 'live')"
        ),
        3,
        "live tokens stay"
    );
    exec(&mut c, "DELETE FROM keel.tokens");
}

fn rotate(c: &mut Client, token: &str, grace: &str) -> Option<String> {
    c.query_one(
        "SELECT keel.session_rotate($1, $2::text::interval)",
        &[&token, &grace],
    )
    .unwrap_or_else(|e| panic!("rotate: {e:?}"))
    .get(0)
}

fn rotation_grace_keeps_the_old_token_briefly_and_never_forks(env: &Env) {
    let mut c = env.pg.connect();
    let (id, t0) = create(&mut c, "'grace-user'");
    let t1 = rotate(&mut c, &t0, "800 milliseconds").expect("rotated");
    assert_ne!(t1, t0);
    let rotated_at = Instant::now();
    // Inside the grace: both tokens validate, to the same session.
    assert_eq!(
        validate(&mut c, &t0).as_deref(),
        Some("grace-user"),
        "old, in grace"
    );
    assert_eq!(validate(&mut c, &t1).as_deref(), Some("grace-user"), "new");
    // A second rotation of the old token returns the same new token: no fork.
    assert_eq!(
        rotate(&mut c, &t0, "800 milliseconds").as_deref(),
        Some(t1.as_str())
    );
    assert_eq!(rotate(&mut c, &t0, "0").as_deref(), Some(t1.as_str()));
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.user_sessions('grace-user')"
        ),
        1
    );
    assert!(
        rotated_at.elapsed() < Duration::from_millis(800),
        "too slow to test the grace"
    );
    // After the grace: the old token is refused and rotates to nothing.
    std::thread::sleep(
        Duration::from_millis(800).saturating_sub(rotated_at.elapsed()) + Duration::from_millis(50),
    );
    assert_eq!(validate(&mut c, &t0), None, "old, after the grace");
    assert_eq!(rotate(&mut c, &t0, "800 milliseconds"), None);
    assert_eq!(validate(&mut c, &t1).as_deref(), Some("grace-user"));
    // Only the token just replaced has a grace: rotating again ends the earlier one's at once.
    let t2 = rotate(&mut c, &t1, "1 minute").expect("rotated");
    assert_eq!(validate(&mut c, &t1).as_deref(), Some("grace-user"));
    let t3 = rotate(&mut c, &t2, "1 minute").expect("rotated");
    assert_eq!(validate(&mut c, &t1), None, "two rotations back");
    assert_eq!(rotate(&mut c, &t1, "1 minute"), None);
    assert_eq!(validate(&mut c, &t2).as_deref(), Some("grace-user"));
    // Without a grace, the old token stops at once, as before.
    let t4 = rotate(&mut c, &t3, "0").expect("rotated");
    assert_eq!(validate(&mut c, &t3), None, "no grace");
    assert_eq!(
        validate(&mut c, &t2),
        None,
        "a rotation without grace ends the last grace"
    );
    // A revocation ends the session for every token, graced or not; a logout sent with the
    // old token inside its grace revokes the session too.
    let t5 = rotate(&mut c, &t4, "1 minute").expect("rotated");
    assert!(one::<bool>(
        &mut c,
        &format!("SELECT keel.session_revoke('{t4}')")
    ));
    assert_eq!(validate(&mut c, &t5), None, "revoked with the old token");
    assert_eq!(validate(&mut c, &t4), None, "revoked inside the grace");
    assert_eq!(rotate(&mut c, &t4, "1 minute"), None);
    exec(
        &mut c,
        &format!("DELETE FROM keel.sessions WHERE session_id = '{id}'"),
    );
}

fn rotations_racing_on_one_token_fork_nothing(env: &Env) {
    use std::sync::Barrier;
    const CLIENTS: usize = 8;
    let mut c = env.pg.connect();
    for grace in ["1 minute", "0"] {
        let (id, token) = create(&mut c, "'race-user'");
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let handles: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let mut client = env.pg.connect();
                let (barrier, token, grace) = (barrier.clone(), token.clone(), grace.to_string());
                std::thread::spawn(move || {
                    barrier.wait();
                    rotate(&mut client, &token, &grace)
                })
            })
            .collect();
        let got: Vec<Option<String>> = handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect();
        let distinct: std::collections::BTreeSet<&String> = got.iter().flatten().collect();
        let answered = got.iter().filter(|t| t.is_some()).count();
        println!(
            "    grace {grace}: {CLIENTS} clients rotating one token: {answered} got a token, {} distinct",
            distinct.len()
        );
        assert_eq!(distinct.len(), 1, "one new token: {got:?}");
        if grace == "0" {
            assert_eq!(
                answered, 1,
                "without a grace only the first rotation gets one"
            );
        } else {
            assert_eq!(
                answered, CLIENTS,
                "every request in flight gets the same new token"
            );
        }
        let new = distinct.into_iter().next().cloned().expect("new token");
        assert_eq!(validate(&mut c, &new).as_deref(), Some("race-user"));
        assert_eq!(
            one::<i64>(
                &mut c,
                "SELECT count(*) FROM keel.user_sessions('race-user')"
            ),
            1
        );
        exec(
            &mut c,
            &format!("DELETE FROM keel.sessions WHERE session_id = '{id}'"),
        );
    }
}

fn rotation_grace_bad_input_crash_and_cleanup(env: &Env) {
    let mut c = env.pg.connect();
    let (id, token) = create(&mut c, "'grace-bad'");
    let row = |c: &mut Client| -> String {
        one(
            c,
            &format!("SELECT s::text FROM keel.sessions s WHERE session_id = '{id}'"),
        )
    };
    let before = row(&mut c);
    expect_sqlstates(
        &mut c,
        &[
            (
                &format!("SELECT keel.session_rotate('{token}', NULL)"),
                "22023",
            ),
            (
                &format!("SELECT keel.session_rotate('{token}', '-1 second')"),
                "22023",
            ),
            (
                &format!("SELECT keel.session_rotate('{token}', '61 minutes')"),
                "22023",
            ),
            (
                &format!("SELECT keel.session_rotate('{token}', '178000000 years')"),
                "22023",
            ),
            (
                "SELECT keel.session_rotate('not a token', '1 minute')",
                "22023",
            ),
            ("SELECT keel.session_rotate(NULL, '1 minute')", "22023"),
        ],
    );
    assert_eq!(row(&mut c), before, "bad input changed nothing");
    // A crash right after a rotation with a grace loses neither token nor the grace.
    let new = rotate(&mut c, &token, "1 minute").expect("rotated");
    drop(c);
    env.pg.crash();
    env.pg.start_again();
    let mut c = env.pg.connect();
    assert_eq!(
        validate(&mut c, &token).as_deref(),
        Some("grace-bad"),
        "old, in grace"
    );
    assert_eq!(validate(&mut c, &new).as_deref(), Some("grace-bad"), "new");
    assert_eq!(
        rotate(&mut c, &token, "1 minute").as_deref(),
        Some(new.as_str())
    );
    // Once the grace has ended, the cleanup erases the link from the old token to the new.
    let newer = rotate(&mut c, &new, "200 milliseconds").expect("rotated");
    let linked = format!(
        "SELECT previous_hash IS NOT NULL AND rotated_to IS NOT NULL FROM keel.sessions WHERE session_id = '{id}'"
    );
    assert!(one::<bool>(&mut c, &linked));
    std::thread::sleep(Duration::from_millis(300));
    exec(&mut c, "SELECT keel.cleanup_sessions()");
    assert!(
        !one::<bool>(&mut c, &linked),
        "the link is gone after the grace"
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            &format!("SELECT count(*) FROM keel.sessions WHERE session_id = '{id}' AND previous_until IS NULL")
        ),
        1
    );
    assert_eq!(validate(&mut c, &new), None);
    assert_eq!(validate(&mut c, &newer).as_deref(), Some("grace-bad"));
    exec(
        &mut c,
        &format!("DELETE FROM keel.sessions WHERE session_id = '{id}'"),
    );
}

fn anonymous_sessions_log_in_with_a_new_token(env: &Env) {
    let mut c = env.pg.connect();
    let r = c
        .query_one(
            "SELECT session_id::text, token FROM keel.session_create(NULL, data => '{\"cart\": [7]}')",
            &[],
        )
        .expect("anonymous session");
    let (id, anon): (String, String) = (r.get(0), r.get(1));
    // Valid, with no user.
    let row = c
        .query_one(
            "SELECT session_id::text, user_id, data::text FROM keel.session_validate($1)",
            &[&anon],
        )
        .expect("validates");
    let (sid, uid, data): (String, Option<String>, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (sid.as_str(), uid, data.as_str()),
        (id.as_str(), None, r#"{"cart": [7]}"#)
    );
    // Login binds the user and rotates the token in one step: the planted token is dead.
    let logged: String = one(
        &mut c,
        &format!("SELECT keel.session_login('{anon}', 'login-user')"),
    );
    assert_ne!(logged, anon);
    assert_eq!(
        validate(&mut c, &anon),
        None,
        "the token from before the login"
    );
    assert_eq!(validate(&mut c, &logged).as_deref(), Some("login-user"));
    let seen: (String, String) = {
        let r = c
            .query_one(
                "SELECT session_id::text, data::text FROM keel.user_sessions('login-user')",
                &[],
            )
            .expect("user_sessions");
        (r.get(0), r.get(1))
    };
    assert_eq!(
        seen,
        (id.clone(), r#"{"cart": [7]}"#.to_string()),
        "same session, same data"
    );
    assert_eq!(
        one::<Option<String>>(
            &mut c,
            &format!("SELECT keel.session_login('{anon}', 'login-user')")
        ),
        None,
        "a token that is not current logs nobody in"
    );
    // Another login on the session binds the other user (and rotates again); what the
    // session carried was the previous user's, so it is emptied.
    exec(
        &mut c,
        &format!("SELECT keel.session_set_data('{logged}', '{{\"role\": \"admin\"}}')"),
    );
    let other: String = one(
        &mut c,
        &format!("SELECT keel.session_login('{logged}', 'login-other')"),
    );
    assert_eq!(validate(&mut c, &other).as_deref(), Some("login-other"));
    assert_eq!(
        one::<String>(
            &mut c,
            &format!("SELECT data::text FROM keel.sessions WHERE session_id = '{id}'")
        ),
        "{}"
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.user_sessions('login-user')"
        ),
        0
    );
    assert_eq!(
        one::<i32>(&mut c, "SELECT keel.session_revoke_user('login-other')"),
        1,
        "revoke_user sees it"
    );
    assert_eq!(validate(&mut c, &other), None);
    // Bad input changes nothing.
    let (_, anon2) = create(&mut c, "NULL");
    expect_sqlstates(
        &mut c,
        &[
            (
                &format!("SELECT keel.session_login('{anon2}', NULL)"),
                "22023",
            ),
            (
                &format!("SELECT keel.session_login('{anon2}', '')"),
                "22023",
            ),
            (
                &format!("SELECT keel.session_login('{anon2}', repeat('u', 1025))"),
                "22023",
            ),
            ("SELECT keel.session_login('not a token', 'u')", "22023"),
            ("SELECT keel.session_login(NULL, 'u')", "22023"),
        ],
    );
    let still: Option<String> = c
        .query_one("SELECT user_id FROM keel.session_validate($1)", &[&anon2])
        .expect("still anonymous")
        .get(0);
    assert_eq!(still, None);
    // A crash right after the login keeps it.
    let bound: String = one(
        &mut c,
        &format!("SELECT keel.session_login('{anon2}', 'login-crash')"),
    );
    drop(c);
    env.pg.crash();
    env.pg.start_again();
    let mut c = env.pg.connect();
    assert_eq!(validate(&mut c, &bound).as_deref(), Some("login-crash"));
    assert_eq!(validate(&mut c, &anon2), None);
    exec(
        &mut c,
        &format!("DELETE FROM keel.sessions WHERE session_id = '{id}' OR user_id = 'login-crash'"),
    );
}

/// The valid sessions of a user, by id, and the ids revoked with reason `evicted`.
fn capped(c: &mut Client, user: &str) -> (Vec<String>, Vec<String>) {
    let ids = |c: &mut Client, sql: &str| -> Vec<String> {
        let mut v: Vec<String> = c
            .query(sql, &[&user])
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        v.sort();
        v
    };
    (
        ids(
            c,
            "SELECT session_id::text FROM keel.user_sessions($1::text)",
        ),
        ids(
            c,
            "SELECT session_id::text FROM keel.sessions
              WHERE user_id = $1::text AND revoke_reason = 'evicted'",
        ),
    )
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn per_user_cap_evicts_the_least_recently_seen(env: &Env) {
    let mut c = env.pg.connect();
    let mut watcher = env.pg.connect();
    exec(
        &mut c,
        "SET keel.session_touch_interval = 0; SET keel.session_events = on",
    );
    let events = |w: &mut Client| -> Vec<String> {
        sorted(
            w.query(
                "SELECT payload->>'session_id' FROM keel.outbox
                  WHERE topic = 'keel.session_revoked' AND payload->>'reason' = 'evicted'
                    AND payload->>'user_id' = 'cap-user'",
                &[],
            )
            .expect("events")
            .iter()
            .map(|r| r.get(0))
            .collect(),
        )
    };
    // Three under a cap of 3, each in its own transaction (so each is seen at its own time);
    // the first is then validated, which makes the second the least recently seen.
    let (s1, t1) = create(&mut c, "'cap-user', max_per_user => 3");
    let (s2, t2) = create(&mut c, "'cap-user', max_per_user => 3");
    let (s3, _) = create(&mut c, "'cap-user', max_per_user => 3");
    assert!(validate(&mut c, &t1).is_some());
    assert_eq!(capped(&mut c, "cap-user").1, Vec::<String>::new());
    let (s4, t4) = create(&mut c, "'cap-user', max_per_user => 3");
    assert_eq!(
        capped(&mut c, "cap-user"),
        (
            sorted(vec![s1.clone(), s3.clone(), s4.clone()]),
            vec![s2.clone()]
        ),
        "the least recently seen gives way"
    );
    assert_eq!(validate(&mut c, &t2), None, "an evicted token is refused");
    assert_eq!(events(&mut watcher), vec![s2.clone()]);
    // Sessions made without a cap count too; a lower cap evicts down to it.
    let (s5, _) = create(&mut c, "'cap-user'");
    let (s6, t6) = create(&mut c, "'cap-user', max_per_user => 2");
    let (valid, evicted) = capped(&mut c, "cap-user");
    assert_eq!(valid, sorted(vec![s5.clone(), s6.clone()]));
    assert_eq!(
        evicted,
        sorted(vec![s1.clone(), s2.clone(), s3.clone(), s4.clone()])
    );
    assert_eq!(events(&mut watcher).len(), 4);
    assert_eq!(validate(&mut c, &t4), None);
    // A capped login counts the session it logs in as the new one, never evicts it, and
    // anonymous sessions are no one's: they are neither counted nor evicted.
    let (anon_id, anon) = create(&mut c, "NULL");
    let (other_anon, other_token) = create(&mut c, "NULL");
    let logged: String = one(
        &mut c,
        &format!("SELECT keel.session_login('{anon}', 'cap-user', max_per_user => 2)"),
    );
    assert_eq!(validate(&mut c, &logged).as_deref(), Some("cap-user"));
    let (valid, _) = capped(&mut c, "cap-user");
    assert_eq!(valid, sorted(vec![s6.clone(), anon_id.clone()]));
    let still: Option<String> = c
        .query_opt(
            "SELECT session_id::text FROM keel.session_validate($1)",
            &[&other_token],
        )
        .expect("validate")
        .map(|r| r.get(0));
    assert_eq!(still, Some(other_anon), "another anonymous session stays");
    // The same user logging in again on a session of theirs at the cap evicts nobody.
    let again: String = one(
        &mut c,
        &format!("SELECT keel.session_login('{t6}', 'cap-user', max_per_user => 2)"),
    );
    assert_eq!(capped(&mut c, "cap-user").0.len(), 2);
    assert_eq!(validate(&mut c, &again).as_deref(), Some("cap-user"));
    // A session in use (its row held by a request's open transaction) is passed over for
    // the next least recently seen, without waiting for it.
    let (held, t_held) = create(&mut c, "'cap-held', max_per_user => 2");
    let (next, _) = create(&mut c, "'cap-held', max_per_user => 2");
    let mut holder = env.pg.connect();
    let mut tx = holder.transaction().expect("begin");
    tx.batch_execute(&format!(
        "SELECT keel.session_set_data('{t_held}', '{{\"busy\": true}}')"
    ))
    .expect("hold the row");
    exec(&mut c, "SET statement_timeout = '5s'");
    let (newest, _) = create(&mut c, "'cap-held', max_per_user => 2");
    exec(&mut c, "RESET statement_timeout");
    tx.commit().expect("commit");
    assert_eq!(
        capped(&mut c, "cap-held"),
        (sorted(vec![held, newest]), vec![next]),
        "the held session stays, the next one goes"
    );
    // session_revoke_user waits for a capped login in progress, even the user's first (whose
    // lock row is not committed yet), and then revokes its session too.
    let mut tx = holder.transaction().expect("begin");
    tx.batch_execute("SELECT keel.session_create('cap-first', max_per_user => 2)")
        .expect("capped create");
    let revoker = {
        let mut r = env.pg.connect();
        std::thread::spawn(move || {
            let started = Instant::now();
            let n: i32 = one(&mut r, "SELECT keel.session_revoke_user('cap-first')");
            (n, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    tx.commit().expect("commit");
    let (revoked, waited) = revoker.join().expect("revoker");
    assert_eq!(
        revoked, 1,
        "the session the capped login committed is revoked"
    );
    assert!(waited >= Duration::from_millis(400), "waited {waited:?}");
    drop(holder);
    // A rolled-back capped create evicts nobody.
    let mut tx = c.transaction().expect("begin");
    tx.batch_execute("SELECT keel.session_create('cap-user', max_per_user => 1)")
        .expect("create");
    tx.rollback().expect("rollback");
    assert_eq!(capped(&mut c, "cap-user").0.len(), 2);
    // Bad input gets 22023 and changes nothing.
    let before: i64 = one(&mut c, "SELECT count(*) FROM keel.sessions");
    expect_sqlstates(
        &mut c,
        &[
            (
                "SELECT keel.session_create('cap-user', max_per_user => 0)",
                "22023",
            ),
            (
                "SELECT keel.session_create('cap-user', max_per_user => -1)",
                "22023",
            ),
            (
                "SELECT keel.session_create('cap-user', max_per_user => 10001)",
                "22023",
            ),
            (
                "SELECT keel.session_create(NULL, max_per_user => 1)",
                "22023",
            ),
            (
                &format!("SELECT keel.session_login('{again}', 'cap-user', max_per_user => 0)"),
                "22023",
            ),
        ],
    );
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM keel.sessions"),
        before
    );
    assert_eq!(capped(&mut c, "cap-user").0.len(), 2);
    // A crash right after a capped create keeps both the new session and the eviction.
    let (s7, t7) = create(&mut c, "'cap-user', max_per_user => 1");
    drop(c);
    drop(watcher);
    env.pg.crash();
    env.pg.start_again();
    let mut c = env.pg.connect();
    assert_eq!(capped(&mut c, "cap-user").0, vec![s7]);
    assert_eq!(validate(&mut c, &t7).as_deref(), Some("cap-user"));
    assert_eq!(validate(&mut c, &again), None);
    // The lock row goes once the capped sessions have all ended and the grace is over.
    exec(
        &mut c,
        "UPDATE keel.session_users SET until = now() - interval '2 days' WHERE user_id = 'cap-user';
         SET keel.session_cleanup_grace = 0",
    );
    let _: i64 = one(&mut c, "SELECT keel.cleanup_sessions(100000)");
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.session_users WHERE user_id = 'cap-user'"
        ),
        0
    );
    exec(
        &mut c,
        "DELETE FROM keel.sessions
          WHERE user_id IN ('cap-user', 'cap-held', 'cap-first') OR user_id IS NULL",
    );
}

/// 8 clients log the same user in 12 times each under a cap of 3, half with session_create
/// and half with session_login of an anonymous session, while a watcher counts the user's
/// valid sessions: never more than 3, exactly 3 at the end, and every other one evicted.
fn per_user_cap_is_exact_under_eight_concurrent_logins(env: &Env) {
    const CLIENTS: usize = 8;
    const EACH: usize = 12;
    const CAP: i64 = 3;
    let mut setup = env.pg.connect();
    exec(
        &mut setup,
        "DELETE FROM keel.sessions WHERE user_id = 'race-user'",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let mut w = env.pg.connect();
        std::thread::spawn(move || {
            let (mut most, mut looks) = (0i64, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = one(
                    &mut w,
                    "SELECT count(*) FROM keel.sessions
                      WHERE user_id = 'race-user' AND revoked_at IS NULL AND expires_at > now()",
                );
                most = most.max(n);
                looks += 1;
            }
            (most, looks)
        })
    };
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut c = env.pg.connect();
            std::thread::spawn(move || {
                let mut made = Vec::new();
                for n in 0..EACH {
                    let id: String = if (i + n) % 2 == 0 {
                        one(
                            &mut c,
                            "SELECT session_id::text FROM
                               keel.session_create('race-user', max_per_user => 3)",
                        )
                    } else {
                        let (id, anon): (String, String) = {
                            let r = c
                                .query_one(
                                    "SELECT session_id::text, token FROM keel.session_create(NULL)",
                                    &[],
                                )
                                .expect("anonymous");
                            (r.get(0), r.get(1))
                        };
                        let token: Option<String> = one(
                            &mut c,
                            &format!(
                                "SELECT keel.session_login('{anon}', 'race-user', max_per_user => 3)"
                            ),
                        );
                        assert!(token.is_some(), "login on a fresh anonymous session");
                        id
                    };
                    made.push(id);
                }
                made
            })
        })
        .collect();
    let mut made: Vec<String> = clients
        .into_iter()
        .flat_map(|h| h.join().expect("client"))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let (most, looks) = watcher.join().expect("watcher");
    made.sort();
    let (valid, evicted) = capped(&mut setup, "race-user");
    let total = (CLIENTS * EACH) as i64;
    println!(
        "{total} capped logins by {CLIENTS} clients: {} valid, {} evicted; the watcher saw at most {most} in {looks} looks",
        valid.len(),
        evicted.len()
    );
    assert_eq!(valid.len() as i64, CAP, "exactly the cap is left");
    assert_eq!(
        evicted.len() as i64,
        total - CAP,
        "every other one was evicted"
    );
    let mut all = valid.clone();
    all.extend(evicted);
    assert_eq!(
        sorted(all),
        made,
        "each login made one session, kept or evicted"
    );
    assert!(most <= CAP, "the watcher saw {most} valid sessions at once");
    assert!(looks > 10, "the watcher looked while the logins ran");
    exec(
        &mut setup,
        "DELETE FROM keel.sessions WHERE user_id = 'race-user'",
    );
}

fn lifecycle_events_carry_the_session_id_never_the_token(env: &Env) {
    let mut c = env.pg.connect();
    let mut watcher = env.pg.connect();
    let base: i64 = one(&mut watcher, "SELECT coalesce(max(id), 0) FROM keel.outbox");
    // `on` (and a bool spelling of it, as 0.1.0 took) emits revocations only.
    exec(&mut c, "SET keel.session_events = true");
    let (_, quiet) = create(&mut c, "'life-user'");
    exec(&mut c, &format!("SELECT keel.session_revoke('{quiet}')"));
    assert_eq!(
        one::<i64>(
            &mut watcher,
            &format!("SELECT count(*) FROM keel.outbox WHERE id > {base} AND topic <> 'keel.session_revoked'")
        ),
        0
    );
    assert_eq!(one::<String>(&mut c, "SHOW keel.session_events"), "true");
    exec(&mut c, "SET keel.session_events = lifecycle");
    let base: i64 = one(&mut watcher, "SELECT coalesce(max(id), 0) FROM keel.outbox");
    // Created, logged in (an anonymous session), rotated, evicted, revoked; an expiry by ttl
    // and one by idleness, found by the cleanup.
    let (created, t_created) = create(&mut c, "'life-user', max_per_user => 2");
    let (anon_id, anon) = create(&mut c, "NULL");
    let logged: String = one(
        &mut c,
        &format!("SELECT keel.session_login('{anon}', 'life-user', max_per_user => 2)"),
    );
    let rotated: String = one(&mut c, &format!("SELECT keel.session_rotate('{logged}')"));
    let (third, _) = create(&mut c, "'life-user', max_per_user => 2");
    exec(&mut c, &format!("SELECT keel.session_revoke('{rotated}')"));
    let (short, t_short) = create(&mut c, "'life-user', ttl => '1 second'");
    let (idle, t_idle) = create(&mut c, "'life-user', idle_timeout => '1 second'");
    std::thread::sleep(Duration::from_millis(1500));
    exec(&mut c, "SET keel.session_cleanup_grace = 0");
    let _: i64 = one(&mut c, "SELECT keel.cleanup_sessions(100000)");
    exec(&mut c, "RESET keel.session_cleanup_grace");
    let rows = watcher
        .query(
            &format!(
                "SELECT topic, payload::text, coalesce(aggregate_id, '') FROM keel.outbox
                  WHERE id > {base} AND topic LIKE 'keel.session%' ORDER BY id"
            ),
            &[],
        )
        .expect("events");
    let events: Vec<(String, serde_json::Value, String)> = rows
        .iter()
        .map(|r| {
            let payload: String = r.get(1);
            // Never the token, nor its hash.
            for t in [&t_created, &anon, &logged, &rotated, &t_short, &t_idle] {
                assert!(!payload.contains(t.as_str()), "a token in {payload}");
            }
            (
                r.get(0),
                serde_json::from_str::<serde_json::Value>(&payload).expect("json"),
                r.get(2),
            )
        })
        .filter(|(_, p, _)| {
            [&created, &anon_id, &third, &short, &idle]
                .iter()
                .any(|id| p["session_id"] == id.as_str())
        })
        .collect();
    let brief: Vec<(String, String, String)> = events
        .iter()
        .map(|(topic, p, _)| {
            let id = p["session_id"].as_str().unwrap_or_default();
            let name = [
                (&created, "created"),
                (&anon_id, "anon"),
                (&third, "third"),
                (&short, "short"),
                (&idle, "idle"),
            ]
            .iter()
            .find(|(s, _)| s.as_str() == id)
            .map(|(_, n)| n.to_string())
            .unwrap_or_default();
            let what = p["reason"]
                .as_str()
                .or(p["previous_user_id"].as_str())
                .unwrap_or("")
                .to_string();
            (topic.clone(), name, what)
        })
        .collect();
    let e = |t: &str, n: &str, w: &str| (t.to_string(), n.to_string(), w.to_string());
    assert_eq!(
        brief,
        vec![
            e("keel.session_created", "created", ""),
            e("keel.session_created", "anon", ""),
            e("keel.session_revoked", "anon", "rotated"),
            e("keel.session_login", "anon", ""),
            e("keel.session_revoked", "anon", "rotated"),
            e("keel.session_revoked", "created", "evicted"),
            e("keel.session_created", "third", ""),
            e("keel.session_revoked", "anon", "revoked"),
            e("keel.session_created", "short", ""),
            e("keel.session_created", "idle", ""),
            e("keel.session_expired", "short", "expired"),
            e("keel.session_expired", "idle", "idle"),
        ]
    );
    // Payload fields: the user (none for an anonymous session's creation), the expiry, and,
    // for a login, the user before it; per-user order through aggregate_id except for the
    // cleanup's expiries.
    let created_event = &events[0];
    assert_eq!(created_event.1["user_id"], "life-user");
    assert!(created_event.1["expires_at"].is_string());
    assert_eq!(created_event.2, "life-user");
    assert!(events[1].1["user_id"].is_null());
    assert_eq!(events[3].1["user_id"], "life-user");
    assert!(events[3].1["previous_user_id"].is_null());
    assert_eq!(events[10].2, "", "expiries carry no aggregate_id");
    assert!(events[11].1["ended_at"].is_string());
    // A crash right after a create keeps its event.
    let (after, _) = create(&mut c, "'life-user'");
    drop(c);
    drop(watcher);
    env.pg.crash();
    env.pg.start_again();
    let mut c = env.pg.connect();
    let mut watcher = env.pg.connect();
    assert_eq!(
        one::<i64>(
            &mut watcher,
            &format!(
                "SELECT count(*) FROM keel.outbox WHERE topic = 'keel.session_created'
                  AND payload->>'session_id' = '{after}'"
            )
        ),
        1
    );
    // The worker's cleanup emits expiries too, with the setting of the server (it rereads
    // postgresql.conf on SIGHUP; a session's SET never reaches it).
    for sql in [
        "ALTER SYSTEM SET keel.session_events = lifecycle",
        "ALTER SYSTEM SET keel.session_cleanup_grace = 0",
        "SELECT pg_reload_conf()",
        "SELECT keel.set_task('cleanup_sessions', '1 second')",
    ] {
        exec(&mut c, sql);
    }
    let (by_worker, _) = create(&mut c, "'life-user', ttl => '1 second'");
    let seen = wait_for(Duration::from_secs(30), || {
        let n: i64 = one(
            &mut watcher,
            &format!(
                "SELECT count(*) FROM keel.outbox WHERE topic = 'keel.session_expired'
                  AND payload->>'session_id' = '{by_worker}' AND payload->>'reason' = 'expired'"
            ),
        );
        (n == 1).then_some(())
    });
    for sql in [
        "ALTER SYSTEM RESET keel.session_events",
        "ALTER SYSTEM RESET keel.session_cleanup_grace",
        "SELECT pg_reload_conf()",
        "SELECT keel.set_task('cleanup_sessions', '1 minute')",
    ] {
        exec(&mut c, sql);
    }
    assert!(seen.is_some(), "the worker's cleanup emitted the expiry");
    // Off: nothing.
    exec(&mut c, "SET keel.session_events = off");
    let base: i64 = one(&mut watcher, "SELECT coalesce(max(id), 0) FROM keel.outbox");
    let (_, t) = create(&mut c, "'life-user', max_per_user => 1");
    exec(&mut c, &format!("SELECT keel.session_revoke('{t}')"));
    assert_eq!(
        one::<i64>(
            &mut watcher,
            &format!(
                "SELECT count(*) FROM keel.outbox WHERE id > {base} AND topic LIKE 'keel.session%'"
            )
        ),
        0
    );
    exec(
        &mut c,
        "RESET keel.session_events; DELETE FROM keel.sessions WHERE user_id = 'life-user'",
    );
}
