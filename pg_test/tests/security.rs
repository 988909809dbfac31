//! The attacks of the hardening review, each reproduced over real connections and shown
//! refused or contained: locks a role without grants could take to stall producers, periods
//! near the interval maximum, huge names echoed into errors, unbounded text inputs and claim
//! batches, and memory-mode state outliving its install.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_pg_test::{exec, expect_sqlstates, one, run, sqlstate, tests, wait_for, Client, Env};

fn main() {
    let tests = tests![
        a_role_without_grants_cannot_stall_enqueue_or_emit_with_locks,
        periods_near_the_interval_maximum_are_refused_and_stored_ones_restore,
        a_failed_snapshot_keeps_memory_keys_for_the_next_one,
        a_10_mb_name_is_repeated_capped_and_escaped,
        worker_and_error_texts_and_claim_batches_are_bounded,
        a_dispatch_round_is_bounded_in_bytes,
        grants_are_scoped_and_a_lease_is_useless_to_another_role,
        a_hostile_redis_cannot_crash_the_cluster_or_hold_the_worker,
        rediss_with_an_acl_user_and_a_password_file_that_nobody_else_reads,
        no_form_of_redis_url_shows_its_password,
        columns_altered_to_another_type_are_refused_not_misread,
        // Last: it drops and creates the extension.
        memory_state_does_not_outlive_drop_extension,
    ];
    run(tests)
}

fn role(env: &Env, name: &str) -> Client {
    exec(
        &mut env.pg.connect(),
        &format!("DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN"),
    );
    env.pg.connect_as(name)
}

/// 0.1.0 serialized producers on advisory locks any role could compute and take first. Now a
/// role with no grant at all takes every advisory key it can compute or read from pg_locks
/// while a producer holds its locks, and producers still go through at once.
fn a_role_without_grants_cannot_stall_enqueue_or_emit_with_locks(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('lk-jobs'); SELECT keel.create_route('lk-topic', 'stream', 'lk:t')",
    );
    let mut nobody = role(env, "sec_nobody");
    // The keys 0.1.0 used.
    exec(
        &mut nobody,
        "SELECT pg_advisory_lock(1801807212, hashtext('lk-jobs'));
         SELECT pg_advisory_lock(hashtext('keel.outbox:lk-topic'), hashtext('order-1'))",
    );
    // Whatever a producer's transaction holds, as pg_locks shows it to everyone.
    let mut producer = env.pg.connect();
    producer.batch_execute("BEGIN").expect("begin");
    exec(
        &mut producer,
        "SELECT keel.enqueue('lk-jobs', '{}'); SELECT keel.emit('lk-topic', '{}', aggregate_id => 'order-1')",
    );
    let seen = nobody
        .query(
            "SELECT locktype, classid::oid::int8, objid::oid::int8, objsubid::int8
               FROM pg_locks WHERE pid <> pg_backend_pid() AND locktype IN ('advisory', 'object')",
            &[],
        )
        .expect("pg_locks is readable by everyone");
    exec(&mut producer, "COMMIT");
    assert!(
        !seen.is_empty(),
        "the producer's locks are listed in pg_locks"
    );
    let mut taken = 0;
    for row in &seen {
        let (classid, objid): (i64, i64) = (row.get(1), row.get(2));
        // An advisory lock with the same numbers is all SQL can take.
        if nobody
            .batch_execute(&format!(
                "SELECT pg_advisory_lock({}, {})",
                classid as i32, objid as i32
            ))
            .is_ok()
        {
            taken += 1;
        }
    }
    let mut p = env.pg.connect();
    exec(&mut p, "SET lock_timeout = '2s'");
    let started = Instant::now();
    for _ in 0..3 {
        exec(
            &mut p,
            "SELECT keel.enqueue('lk-jobs', '{}');
             SELECT keel.emit('lk-topic', '{}', aggregate_id => 'order-1')",
        );
    }
    exec(&mut p, "SELECT keel.drop_queue('lk-jobs', force => true)");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "producers waited {:?} behind {taken} advisory locks of a role without grants",
        started.elapsed()
    );
    // The lock still does its job: a drop_queue waits for an enqueue in flight.
    exec(&mut c, "SELECT keel.create_queue('lk-jobs')");
    let mut open = env.pg.connect();
    exec(&mut open, "BEGIN; SELECT keel.enqueue('lk-jobs', '{}')");
    let mut dropper = env.pg.connect();
    exec(&mut dropper, "SET lock_timeout = '300ms'");
    assert_eq!(
        sqlstate(dropper.batch_execute("SELECT keel.drop_queue('lk-jobs', force => true)")),
        Some("55P03".into()),
        "drop_queue waits for the open enqueue"
    );
    exec(&mut open, "COMMIT");
    exec(&mut c, "SELECT keel.drop_queue('lk-jobs', force => true)");
    exec(&mut nobody, "SELECT pg_advisory_unlock_all()");
    println!(
        "    {} locks seen in pg_locks, {taken} advisory twins taken, producers unaffected",
        seen.len()
    );
}

/// Every interval argument is bounded (100 years; a token bucket's refill 1000 years): 22023
/// with a hint, never XX000 or a backtrace, and the timestamps pg_keel stores from the
/// longest allowed ones survive pg_dump and restore.
fn periods_near_the_interval_maximum_are_refused_and_stored_ones_restore(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('iv-jobs')");
    let huge = "'178000000 years'";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("SELECT keel.create_limit('iv-a', 1, {huge})"),
            "22023",
        ),
        (
            "SELECT keel.create_limit('iv-b', 1, '101 years')".into(),
            "22023",
        ),
        (
            format!("SELECT * FROM keel.rate_limit('iv-k', 1, {huge})"),
            "22023",
        ),
        (
            format!("SELECT keel.create_limit('iv-m', 1, {huge}, durability => 'memory')"),
            "22023",
        ),
        // A token bucket that takes longer than 1000 years to refill.
        (
            "SELECT keel.create_limit('iv-c', 1, '100 years', burst => 11)".into(),
            "22023",
        ),
        (
            "SELECT keel.set_task('reap_expired', '300000 years')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_queue('iv-q', visibility_timeout => '101 years')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_queue('iv-q', retry_backoff_max => '1000 years')".into(),
            "22023",
        ),
        (
            "SELECT keel.alter_queue('iv-jobs', dedupe_window => '1000 years')".into(),
            "22023",
        ),
        (
            "SELECT keel.enqueue('iv-jobs', '{}', delay => '101 years')".into(),
            "22023",
        ),
        // Nets to zero as intervals compare, but is 2870 years ahead on the calendar.
        (
            "SELECT keel.enqueue('iv-jobs', '{}', delay => '200000 years -72000000 days')".into(),
            "22023",
        ),
        (
            "SELECT keel.fail(1, 1, 'x', retry_in => '200000 years -72000000 days')".into(),
            "22023",
        ),
        (
            "SELECT * FROM keel.claim('iv-jobs', 1, visibility_timeout => '101 years')".into(),
            "22023",
        ),
        ("SELECT keel.extend(1, 1, '101 years')".into(), "22023"),
        (
            "SELECT keel.fail(1, 1, 'x', retry_in => '101 years')".into(),
            "22023",
        ),
        (
            "SELECT keel.session_create('u', ttl => '101 years')".into(),
            "22023",
        ),
        (
            "SELECT keel.session_create('u', idle_timeout => '101 years')".into(),
            "22023",
        ),
    ];
    let cases: Vec<(&str, &str)> = cases.iter().map(|(s, w)| (s.as_str(), *w)).collect();
    expect_sqlstates(&mut c, &cases);
    // The message and hint say what to do; no Rust panic text reaches the client.
    let e = c
        .batch_execute(&format!("SELECT * FROM keel.rate_limit('iv-k', 1, {huge})"))
        .expect_err("refused");
    let db = e.as_db_error().expect("a server error");
    assert!(
        db.message().contains("at most 100 years"),
        "{}",
        db.message()
    );
    assert!(db.hint().is_some(), "a hint");
    for text in [
        db.message(),
        db.detail().unwrap_or(""),
        db.hint().unwrap_or(""),
    ] {
        assert!(
            !text.contains("panicked")
                && !text.contains("backtrace")
                && !text.contains("MicrosOutOfBounds"),
            "{text}"
        );
    }
    // The longest allowed ones work and their stored times restore.
    exec(
        &mut c,
        "SELECT keel.create_limit('iv-long', 10, '100 years', burst => 100);
         SELECT keel.create_limit('iv-long-w', 1, '100 years', 'sliding_window');
         SELECT * FROM keel.check('iv-long', 'k', 100);
         SELECT * FROM keel.check('iv-long-w', 'k');
         SELECT * FROM keel.rate_limit('iv-inline', 1, '100 years');
         SELECT keel.enqueue('iv-jobs', '{}', delay => '100 years');
         SELECT keel.set_task('reap_expired', '100 years')",
    );
    let mut copy = env.pg.restored_copy("keel_iv_copy");
    let rows: i64 = one(
        &mut copy,
        "SELECT count(*) FROM keel.rate_limit_state WHERE policy IN ('iv-long', 'iv-long-w')",
    );
    assert_eq!(rows, 2, "the states of the longest periods restore");
    let jobs: i64 = one(
        &mut copy,
        "SELECT count(*) FROM keel.jobs WHERE queue = 'iv-jobs'",
    );
    assert_eq!(jobs, 1);
    drop(copy);
    env.pg.drop_database("keel_iv_copy");
    exec(
        &mut c,
        "SELECT keel.set_task('reap_expired', '1 minute');
         SELECT keel.drop_limit('iv-long'); SELECT keel.drop_limit('iv-long-w');
         SELECT keel.drop_queue('iv-jobs', force => true)",
    );
}

/// The worker's snapshot of memory policies fails (a constraint refuses its insert); the keys
/// it could not write stay marked changed, and the next snapshot after the fault writes them.
fn a_failed_snapshot_keeps_memory_keys_for_the_next_one(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('snap-mem', 5, '1 hour', durability => 'memory');
         ALTER TABLE keel.rate_limit_state ADD CONSTRAINT sec_refuse CHECK (policy <> 'snap-mem') NOT VALID",
    );
    let allowed: bool = one(
        &mut c,
        "SELECT allowed FROM keel.check('snap-mem', 'k1', 2)",
    );
    assert!(allowed);
    // The worker tries (and fails) at least once: it logs the violated constraint.
    let log_has = |env: &Env| env.pg.log().contains("sec_refuse");
    assert!(
        wait_for(Duration::from_secs(20), || log_has(env).then_some(())).is_some(),
        "the snapshot ran into the constraint"
    );
    exec(
        &mut c,
        "ALTER TABLE keel.rate_limit_state DROP CONSTRAINT sec_refuse",
    );
    let written = wait_for(Duration::from_secs(20), || {
        let n: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_state WHERE policy = 'snap-mem' AND key = 'k1'",
        );
        (n == 1).then_some(())
    });
    assert!(
        written.is_some(),
        "the key refused once was written by a later snapshot"
    );
    exec(&mut c, "SELECT keel.drop_limit('snap-mem')");
}

/// A 10 MB name is repeated in the error as its first 64 characters, escaped, with its size;
/// a hint never embeds it as SQL; control characters never reach the log raw.
fn a_10_mb_name_is_repeated_capped_and_escaped(env: &Env) {
    let mut c = env.pg.connect();
    let big = "q".repeat(10 * 1024 * 1024);
    let calls = [
        "SELECT keel.enqueue($1, '{}')",
        "SELECT keel.create_queue($1)",
        "SELECT * FROM keel.claim($1)",
        "SELECT * FROM keel.check($1, 'k')",
        "SELECT keel.set_task($1, '1 hour')",
        "SELECT keel.emit($1, '{}')",
    ];
    for sql in calls {
        for name in [big.as_str(), "it's\nE'\\n'); DROP TABLE keel.jobs; --"] {
            let e = c.query(sql, &[&name]).expect_err("refused");
            let db = e.as_db_error().expect("a server error");
            let total = db.message().len()
                + db.detail().map_or(0, str::len)
                + db.hint().map_or(0, str::len);
            assert!(total < 2_500, "{sql}: {total} bytes of error");
            assert!(
                !db.message().contains('\n'),
                "{sql}: raw newline in {:?}",
                db.message()
            );
            if let Some(hint) = db.hint() {
                assert!(
                    !hint.contains("DROP TABLE"),
                    "{sql}: name embedded in hint {hint:?}"
                );
            }
            if name.len() > 1000 {
                assert!(
                    db.message().contains("bytes)"),
                    "{sql}: size said: {}",
                    db.message()
                );
            }
        }
    }
    let log_size = env.pg.log().len();
    assert!(
        log_size < 5 * 1024 * 1024,
        "server log grew to {log_size} bytes"
    );
}

/// `worker` names are at most 256 characters, a failure's error text is kept to its first
/// 4096, and one claim hands out at most 16 MiB of payload whatever its batch.
fn worker_and_error_texts_and_claim_batches_are_bounded(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('tb-jobs', max_attempts => 10)",
    );
    let long = "w".repeat(257);
    assert_eq!(
        sqlstate(c.query(
            "SELECT * FROM keel.claim('tb-jobs', worker => $1)",
            &[&long]
        )),
        Some("22023".into())
    );
    exec(&mut c, "SELECT keel.enqueue('tb-jobs', '{}')");
    let (id, attempt): (i64, i32) = {
        let r = c
            .query_one(
                "SELECT job_id, attempt FROM keel.claim('tb-jobs', worker => $1)",
                &[&"w".repeat(256)],
            )
            .expect("claim");
        (r.get(0), r.get(1))
    };
    let error = "e".repeat(1024 * 1024);
    let state: String = c
        .query_one(
            "SELECT keel.fail($1, $2, $3, '0')",
            &[&id, &attempt, &error],
        )
        .expect("fail")
        .get(0);
    assert_eq!(state, "retry");
    let kept: i32 = one(
        &mut c,
        &format!("SELECT length(last_error) FROM keel.jobs WHERE job_id = {id}"),
    );
    assert_eq!(kept, 4096);
    exec(&mut c, "SELECT keel.purge_queue('tb-jobs')");
    // The payload bound is on the size a reader holds, not on what compression stores: a
    // 200 kB payload that compresses to 3 kB, read from a table, is still 200 kB.
    exec(
        &mut c,
        "SET keel.max_payload_bytes = 100000;
         CREATE TEMP TABLE tb_big (p jsonb);
         INSERT INTO tb_big SELECT jsonb_build_object('x', repeat('ab', 100000))",
    );
    let stored: i32 = one(&mut c, "SELECT pg_column_size(p) FROM tb_big");
    assert!(stored < 100_000, "stored compressed: {stored}");
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT keel.enqueue('tb-jobs', p) FROM tb_big", "54000"),
            (
                "SELECT keel.emit('tb-topic', '{}', headers => p) FROM tb_big",
                "54000",
            ),
        ],
    );
    exec(&mut c, "RESET keel.max_payload_bytes; DROP TABLE tb_big");
    // 40 payloads of ~900 kB that do not compress: 36 MB in all.
    exec(
        &mut c,
        "SELECT keel.enqueue('tb-jobs', jsonb_build_object('blob',
                (SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 28000) g)))
           FROM generate_series(1, 40)",
    );
    // The first claim's transaction stays open: the jobs past its budget were never locked,
    // so the next consumer takes them meanwhile.
    let mut holder = env.pg.connect();
    exec(&mut holder, "BEGIN");
    let first: i64 = one(
        &mut holder,
        "SELECT count(*) FROM keel.claim('tb-jobs', 10000)",
    );
    let bytes: i64 = one(
        &mut holder,
        "SELECT sum(pg_column_size(payload))::int8 FROM keel.jobs WHERE queue = 'tb-jobs' AND state = 'running'",
    );
    let meanwhile: i64 = one(&mut c, "SELECT count(*) FROM keel.claim('tb-jobs', 1)");
    assert_eq!(
        meanwhile, 1,
        "the jobs past a claim's budget are not held by it"
    );
    exec(&mut holder, "COMMIT");
    assert!(
        (1..40).contains(&first),
        "one claim took {first} of 40 large jobs"
    );
    assert!(
        bytes <= 16 * 1024 * 1024 + 1024 * 1024,
        "{bytes} bytes in one claim"
    );
    let mut total = first + meanwhile;
    while total < 40 {
        let n: i64 = one(&mut c, "SELECT count(*) FROM keel.claim('tb-jobs', 10000)");
        assert!(n >= 1, "the rest stay claimable");
        total += n;
    }
    println!("    a claim of 10000 took {first} of 40 jobs of ~900 kB ({bytes} bytes)");
    exec(&mut c, "SELECT keel.drop_queue('tb-jobs', force => true)");
}

/// 40 events of ~900 kB that compression cannot shrink in the stored row but do not compress
/// in memory either, under a batch size of 500: the worker sends them in rounds of at most
/// 16 MiB (several script calls), and every one arrives once.
fn a_dispatch_round_is_bounded_in_bytes(env: &Env) {
    let mut c = env.pg.connect();
    keel_pg_test::wait_worker_idle(&mut c);
    let mut r = env.redis.connection();
    let calls = |r: &mut redis::Connection| -> i64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(r)
            .expect("INFO");
        info.lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .and_then(|l| l.split("calls=").nth(1)?.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = calls(&mut r);
    exec(
        &mut c,
        "SELECT keel.create_route('big-round', 'stream', 'sec:big');
         SELECT keel.emit('big-round', jsonb_build_object('n', n, 'blob',
                (SELECT string_agg(md5(g::text || n::text || random()::text), '') FROM generate_series(1, 14000) g)),
                headers => jsonb_build_object('h',
                (SELECT string_agg(md5(g::text || n::text), '') FROM generate_series(1, 14000) g)))
           FROM generate_series(1, 40) n",
    );
    let len = wait_for(Duration::from_secs(60), || {
        let n: i64 = redis::cmd("XLEN").arg("sec:big").query(&mut r).ok()?;
        (n == 40).then_some(n)
    });
    assert_eq!(len, Some(40), "every event arrives");
    let rounds = calls(&mut r) - before;
    assert!(rounds >= 3, "36 MB went in {rounds} script calls");
    keel_pg_test::wait_worker_idle(&mut c);
    println!("    40 events of ~900 kB went in {rounds} rounds");
    exec(
        &mut c,
        "DELETE FROM keel.outbox_routes WHERE topic = 'big-round'",
    );
}

fn lease(c: &mut Client, queue: &str) -> (i64, i32) {
    let r = c
        .query_one("SELECT job_id, attempt FROM keel.claim($1)", &[&queue])
        .expect("claim");
    (r.get(0), r.get(1))
}

/// Two tenants on one database: each role reaches only the queues, topics and policies its
/// grant names; a lease another role claimed cannot be acked, failed or extended by guessing
/// (job_id, attempt); producing grants no session functions; a revoke applies at once.
fn grants_are_scoped_and_a_lease_is_useless_to_another_role(env: &Env) {
    let mut admin = env.pg.connect();
    exec(
        &mut admin,
        "DROP ROLE IF EXISTS sc_member; DROP ROLE IF EXISTS sc_group;
         SELECT keel.create_queue('a-jobs'); SELECT keel.create_queue('b-jobs');
         SELECT keel.create_limit('a-lim', 10, '1 minute'); SELECT keel.create_limit('b-lim', 10, '1 minute');
         CREATE ROLE sc_group; CREATE ROLE sc_member LOGIN IN ROLE sc_group;",
    );
    let mut a_prod = role(env, "sc_a_prod");
    let mut a_work = role(env, "sc_a_work");
    let mut a_work2 = role(env, "sc_a_work2");
    let mut b_work = role(env, "sc_b_work");
    exec(
        &mut admin,
        "SELECT keel.grant_producer('sc_a_prod', queues => ARRAY['a-jobs'], topics => ARRAY['a-topic'],
                                    limits => ARRAY['a-lim']);
         SELECT keel.grant_consumer('sc_a_work', queues => ARRAY['a-jobs']);
         SELECT keel.grant_consumer('sc_a_work2', queues => ARRAY['a-jobs']);
         SELECT keel.grant_consumer('sc_b_work', queues => ARRAY['b-jobs']);
         SELECT keel.grant_producer('sc_group', queues => ARRAY['b-jobs'], topics => '{}', limits => '{}');",
    );
    exec(
        &mut a_prod,
        "SELECT keel.enqueue('a-jobs', '{\"n\": 1}');
         SELECT keel.enqueue_batch('a-jobs', ARRAY['{}'::jsonb]);
         SELECT keel.emit('a-topic', '{}');
         SELECT * FROM keel.check('a-lim', 'k');
         SELECT * FROM keel.rate_peek('a-lim', 'k');
         SELECT keel.rate_refund('a-lim', 'k')",
    );
    expect_sqlstates(
        &mut a_prod,
        &[
            ("SELECT keel.enqueue('b-jobs', '{}')", "42501"),
            (
                "SELECT keel.enqueue_batch('b-jobs', ARRAY['{}'::jsonb])",
                "42501",
            ),
            ("SELECT keel.emit('b-topic', '{}')", "42501"),
            ("SELECT * FROM keel.check('b-lim', 'k')", "42501"),
            ("SELECT * FROM keel.rate_peek('b-lim', 'k')", "42501"),
            ("SELECT keel.rate_refund('b-lim', 'k')", "42501"),
            ("SELECT * FROM keel.rate_limit('k', 1, '1 minute')", "42501"),
            ("SELECT * FROM keel.claim('a-jobs')", "42501"),
            ("SELECT keel.session_create('u')", "42501"),
            ("SELECT * FROM keel.user_sessions('u')", "42501"),
        ],
    );
    let e = a_prod
        .batch_execute("SELECT keel.enqueue('b-jobs', '{}')")
        .expect_err("refused");
    let db = e.as_db_error().expect("server error");
    assert!(
        db.message().contains("sc_a_prod") && db.message().contains("b-jobs"),
        "{}",
        db.message()
    );
    assert!(
        db.hint().is_some_and(|h| h.contains("grant_producer")),
        "{:?}",
        db.hint()
    );
    // A consumer of b-jobs cannot claim a-jobs, nor use a lease on it by guessing.
    expect_sqlstates(
        &mut b_work,
        &[("SELECT * FROM keel.claim('a-jobs')", "42501")],
    );
    let (id, attempt) = lease(&mut a_work, "a-jobs");
    for other in [&mut b_work, &mut a_work2] {
        let acked: bool = other
            .query_one("SELECT keel.ack($1, $2)", &[&id, &attempt])
            .expect("ack")
            .get(0);
        let failed: Option<String> = other
            .query_one("SELECT keel.fail($1, $2, 'stolen', '0')", &[&id, &attempt])
            .expect("fail")
            .get(0);
        let batch: i64 = other
            .query_one(
                "SELECT keel.ack_batch(ARRAY[$1::int8], ARRAY[$2::int4])",
                &[&id, &attempt],
            )
            .expect("ack_batch")
            .get(0);
        assert_eq!(batch, 0, "ack_batch of another role's lease");
        let extended: Option<std::time::SystemTime> = other
            .query_one("SELECT keel.extend($1, $2, '1 hour')", &[&id, &attempt])
            .expect("extend")
            .get(0);
        assert!(
            !acked && failed.is_none() && extended.is_none(),
            "another role used the lease"
        );
    }
    let state: String = one(
        &mut admin,
        &format!("SELECT state FROM keel.jobs WHERE job_id = {id}"),
    );
    assert_eq!(state, "running", "the lease is untouched");
    let acked: bool = a_work
        .query_one("SELECT keel.ack($1, $2)", &[&id, &attempt])
        .expect("ack")
        .get(0);
    assert!(acked, "its holder acks it");
    // A grant to a group role reaches its members; SET ROLE is what is checked. The role
    // checked is current_user, as for any privilege: a SECURITY DEFINER function lends its
    // owner's rights on purpose (a superuser's here), and a producer's own SECURITY DEFINER
    // function has only the producer's rights, whoever calls it (a superuser here).
    let mut member = env.pg.connect_as("sc_member");
    exec(&mut member, "SELECT keel.enqueue('b-jobs', '{}')");
    expect_sqlstates(
        &mut member,
        &[("SELECT keel.enqueue('a-jobs', '{}')", "42501")],
    );
    exec(
        &mut admin,
        "CREATE OR REPLACE FUNCTION public.sc_lend() RETURNS bigint LANGUAGE sql SECURITY DEFINER
           SET search_path = pg_catalog AS $$ SELECT keel.enqueue('a-jobs', '{}') $$;
         GRANT EXECUTE ON FUNCTION public.sc_lend() TO sc_member;
         DROP SCHEMA IF EXISTS sc_own CASCADE; CREATE SCHEMA sc_own AUTHORIZATION sc_a_prod",
    );
    exec(&mut member, "SELECT public.sc_lend()");
    exec(
        &mut a_prod,
        "CREATE FUNCTION sc_own.trojan() RETURNS bigint LANGUAGE sql SECURITY DEFINER
           SET search_path = pg_catalog AS $$ SELECT keel.enqueue('b-jobs', '{}') $$;
         GRANT USAGE ON SCHEMA sc_own TO PUBLIC;
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA sc_own TO PUBLIC",
    );
    expect_sqlstates(&mut admin, &[("SELECT sc_own.trojan()", "42501")]);
    let mut su = env.pg.connect();
    exec(&mut su, "SET ROLE sc_b_work");
    expect_sqlstates(&mut su, &[("SELECT * FROM keel.claim('a-jobs')", "42501")]);
    exec(&mut su, "RESET ROLE");
    // The implementations behind the SQL wrappers refuse a call without the wrapper's ticket
    // (or with a ticket for another queue), the internals of the native enqueue are not
    // granted at all; pg_keel's own topics need a grant naming them.
    expect_sqlstates(
        &mut a_prod,
        &[
            (
                "SELECT keel._enqueue_keyed('b-jobs', '{}', '0', 0, 'k', NULL, now())",
                "42501",
            ),
            (
                "SELECT keel._emit(keel._authorize('emit', 'a-topic'), 'b-topic', '{}')",
                "42501",
            ),
        ],
    );
    exec(
        &mut admin,
        "SELECT keel.grant_producer('sc_b_work', queues => '{}', limits => '{}')",
    );
    expect_sqlstates(
        &mut b_work,
        &[(
            "SELECT keel.emit('keel.session_revoked', '{\"user_id\": \"victim\"}')",
            "42501",
        )],
    );
    exec(&mut b_work, "SELECT keel.emit('any-topic', '{}')");
    // A ticket left behind by a failed call is of no use (its number is random and it dies
    // with its subtransaction); a payload computed by a function with an exception block
    // inside still goes through; a bad capability is 22023.
    exec(
        &mut a_prod,
        "CREATE FUNCTION sc_own.lenient(t text) RETURNS jsonb LANGUAGE plpgsql AS $$
         BEGIN RETURN t::jsonb; EXCEPTION WHEN others THEN RETURN '{}'; END $$",
    );
    exec(
        &mut a_prod,
        "SELECT keel.enqueue('a-jobs', sc_own.lenient('not json'))",
    );
    assert!(a_prod
        .batch_execute("SELECT keel.enqueue('a-jobs', (1 / 0)::text::jsonb)")
        .is_err());
    expect_sqlstates(
        &mut a_prod,
        &[
            ("SELECT keel._emit(1, 'a-topic', '{}')", "42501"),
            ("SELECT keel._authorize('bogus', 'a-jobs')", "22023"),
        ],
    );
    // A grant deleted while a REPEATABLE READ transaction is open is gone for it too (the
    // grants are read as committed now, not as of its snapshot), within the cache's second.
    exec(
        &mut admin,
        "SELECT keel.grant_producer('sc_a_prod', queues => ARRAY['b-jobs'], topics => '{}', limits => '{}')",
    );
    exec(
        &mut a_prod,
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT keel.enqueue('b-jobs', '{}')",
    );
    exec(
        &mut admin,
        "DELETE FROM keel.grants WHERE role = 'sc_a_prod'::regrole AND capability = 'produce' AND name = 'b-jobs'",
    );
    std::thread::sleep(Duration::from_millis(1100));
    expect_sqlstates(
        &mut a_prod,
        &[("SELECT keel.enqueue('b-jobs', '{}')", "42501")],
    );
    exec(&mut a_prod, "ROLLBACK");
    // A revoke applies to connections already open.
    exec(&mut admin, "SELECT keel.revoke_all('sc_a_prod')");
    expect_sqlstates(
        &mut a_prod,
        &[("SELECT keel.enqueue('a-jobs', '{}')", "42501")],
    );
    let rows: i64 = one(
        &mut admin,
        "SELECT count(*) FROM keel.grants WHERE role::oid = 'sc_a_prod'::regrole::oid",
    );
    assert_eq!(rows, 0);
    // Sessions come with their own helper, and a sessions-only role's revocations emit their
    // events (pg_keel emits them, not the role).
    exec(
        &mut admin,
        "SELECT keel.grant_sessions('sc_b_work'); ALTER ROLE sc_b_work SET keel.session_events = on",
    );
    let mut b_work = env.pg.connect_as("sc_b_work");
    let token: String = one(
        &mut b_work,
        "SELECT token FROM keel.session_create('sc-user')",
    );
    let revoked: bool = b_work
        .query_one("SELECT keel.session_revoke($1)", &[&token])
        .expect("session_revoke")
        .get(0);
    assert!(revoked);
    let events: i64 = one(
        &mut admin,
        "SELECT count(*) FROM keel.outbox WHERE topic = 'keel.session_revoked' AND payload->>'user_id' = 'sc-user'",
    );
    assert_eq!(events, 1, "the revocation event was emitted");
    exec(&mut admin, "ALTER ROLE sc_b_work RESET keel.session_events");
    expect_sqlstates(
        &mut b_work,
        &[("SELECT keel.enqueue('b-jobs', '{}')", "42501")],
    );
    drop((a_prod, a_work, a_work2, b_work, member));
    exec(
        &mut admin,
        "DROP FUNCTION public.sc_lend(); DROP SCHEMA sc_own CASCADE;
         SELECT keel.revoke_all(r) FROM unnest(ARRAY['sc_a_work', 'sc_a_work2', 'sc_b_work', 'sc_group']::regrole[]) r;
         SELECT keel.drop_queue('a-jobs', force => true); SELECT keel.drop_queue('b-jobs', force => true);
         SELECT keel.drop_limit('a-lim'); SELECT keel.drop_limit('b-lim');
         DROP ROLE sc_member; DROP ROLE sc_group; DROP ROLE sc_a_prod; DROP ROLE sc_a_work;
         DROP ROLE sc_a_work2; DROP ROLE sc_b_work",
    );
}

/// A memory policy denies a key; the extension is dropped and created again with a policy of
/// the same name: the new install has never seen the key, and allows it.
fn memory_state_does_not_outlive_drop_extension(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_limit('re-mem', 1, '1 hour', durability => 'memory')",
    );
    let first: bool = one(&mut c, "SELECT allowed FROM keel.check('re-mem', 'k')");
    let second: bool = one(&mut c, "SELECT allowed FROM keel.check('re-mem', 'k')");
    assert!(first && !second);
    exec(&mut c, "DROP EXTENSION pg_keel CASCADE");
    exec(&mut c, "CREATE EXTENSION pg_keel");
    exec(
        &mut c,
        "SELECT keel.create_limit('re-mem', 1, '1 hour', durability => 'memory')",
    );
    let fresh: bool = one(&mut c, "SELECT allowed FROM keel.check('re-mem', 'k')");
    assert!(
        fresh,
        "a new install's policy allows a key it has never seen"
    );
}

/// Sets keel.* settings cluster-wide (ALTER SYSTEM) and reloads; None resets one.
fn set_system(c: &mut Client, settings: &[(&str, Option<&str>)]) {
    for (name, value) in settings {
        let sql = match value {
            Some(v) => format!("ALTER SYSTEM SET {name} = '{}'", v.replace('\'', "''")),
            None => format!("ALTER SYSTEM RESET {name}"),
        };
        exec(c, &sql);
    }
    exec(c, "SELECT pg_reload_conf()");
}

/// Waits until the worker's status mentions `target` (it has read the new settings).
fn wait_target(c: &mut Client, target: &str) {
    let seen = wait_for(Duration::from_secs(20), || {
        let now: Option<String> = one(c, "SELECT redis_target FROM keel.worker_status()");
        now.filter(|t| t.contains(target))
    });
    assert!(seen.is_some(), "the worker never moved to {target}");
}

/// A fake Redis on 127.0.0.1 answering every connection with one kind of hostile reply;
/// counts the bytes it managed to send and how long its longest connection lasted.
struct Hostile {
    port: u16,
    sent: Arc<AtomicU64>,
    longest_ms: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Hostile {
    fn start(mode: &'static str) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let h = Hostile {
            port,
            sent: Arc::new(AtomicU64::new(0)),
            longest_ms: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (sent, longest, connections, stop) = (
            h.sent.clone(),
            h.longest_ms.clone(),
            h.connections.clone(),
            h.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        connections.fetch_add(1, Ordering::Relaxed);
                        let (sent, longest, stop) = (sent.clone(), longest.clone(), stop.clone());
                        std::thread::spawn(move || serve(mode, stream, &sent, &longest, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        h
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    mode: &str,
    mut s: std::net::TcpStream,
    sent: &AtomicU64,
    longest: &AtomicU64,
    stop: &AtomicBool,
) {
    let opened = Instant::now();
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let write = |s: &mut std::net::TcpStream, bytes: &[u8]| -> bool {
        let ok = s.write_all(bytes).is_ok();
        if ok {
            sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        ok
    };
    let chunk = vec![b'x'; 64 * 1024];
    let ints = b":1\r\n".repeat(16 * 1024);
    let mut buf = vec![0u8; 64 * 1024];
    // Read the first command before answering (as a server would).
    let mut request = Vec::new();
    while !stop.load(Ordering::Relaxed) && opened.elapsed() < Duration::from_secs(30) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                request.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => continue,
        }
    }
    let limit = 2u64 << 30;
    let alive = |sent: &AtomicU64| {
        !stop.load(Ordering::Relaxed)
            && sent.load(Ordering::Relaxed) < limit
            && opened.elapsed() < Duration::from_secs(30)
    };
    let flood: Option<(&[u8], &[u8])> = match mode {
        "huge-bulk" => Some((b"$9999999999\r\n", &chunk)),
        "huge-array" => Some((b"*2000000000\r\n", &ints)),
        "long-line" => Some((b"+", &chunk)),
        _ => None,
    };
    if let Some((head, body)) = flood {
        if write(&mut s, head) {
            while alive(sent) && write(&mut s, body) {}
        }
    }
    match mode {
        "deep" => {
            let deep = b"*1\r\n".repeat(1 << 20);
            write(&mut s, &deep);
        }
        "dribble" => {
            for b in b"+PONG-and-more-and-more-and-more-and-more\r\n"
                .iter()
                .cycle()
            {
                if !alive(sent) || !write(&mut s, &[*b]) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(400));
            }
        }
        "garbage" => {
            write(&mut s, b"?\x00\xffnot redis at all\r\n");
        }
        _ => {}
    }
    // Hold the connection until the client leaves.
    while !stop.load(Ordering::Relaxed) && opened.elapsed() < Duration::from_secs(30) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    // +1: a connection closed within its first millisecond still counts as closed.
    longest.fetch_max(opened.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
}

fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Each kind of hostile reply, one fake server at a time: a bulk string announcing 10 GB
/// and streaming, an array of two billion elements, nesting a million deep, a reply dribbled
/// a byte every 400 ms, bytes that are not RESP, a line that never ends. The worker reads at
/// most its reply bound (8 MiB) of each, gives up on a reply within 5 s, stays the same
/// process with a small memory, the postmaster never restarts, and once Redis is real again
/// the events waiting meanwhile arrive once.
fn a_hostile_redis_cannot_crash_the_cluster_or_hold_the_worker(env: &Env) {
    let mut c = env.pg.connect();
    let pid = keel_pg_test::wait_worker_idle(&mut c);
    let started: std::time::SystemTime = one(&mut c, "SELECT pg_postmaster_start_time()");
    let mut emitted = 0;
    for mode in [
        "huge-bulk",
        "huge-array",
        "deep",
        "dribble",
        "garbage",
        "long-line",
    ] {
        let fake = Hostile::start(mode);
        let since: std::time::SystemTime = one(&mut c, "SELECT clock_timestamp()");
        set_system(&mut c, &[("keel.redis_url", Some(&fake.url()))]);
        wait_target(&mut c, &format!(":{}", fake.port));
        one::<i64>(&mut c, "SELECT keel.emit('hostile', '{}')");
        emitted += 1;
        // The worker gave up on a connection (it closed it) and said why.
        let given_up = wait_for(Duration::from_secs(25), || {
            let r = c
                .query_one(
                    "SELECT pid, last_error FROM keel.worker_status() WHERE last_error_at > $1",
                    &[&since],
                )
                .ok()?;
            (fake.longest_ms.load(Ordering::Relaxed) > 0)
                .then(|| (r.get::<_, Option<i32>>(0), r.get::<_, Option<String>>(1)))
        });
        let Some(status) = given_up else {
            panic!(
                "{mode}: the worker did not give up on the connection: {:?}",
                one::<Option<String>>(&mut c, "SELECT last_error FROM keel.worker_status()")
            )
        };
        let sent = fake.sent.load(Ordering::Relaxed);
        let held = fake.longest_ms.load(Ordering::Relaxed);
        let rss = status.0.map(rss_kb).unwrap_or(0);
        println!(
            "    {mode}: {:.1} MB sent to the worker, connection held {held} ms, worker rss {} MB, error {:?}",
            sent as f64 / 1e6,
            rss / 1024,
            status.1.as_deref().map(|e| e.chars().take(90).collect::<String>())
        );
        assert_eq!(
            status.0,
            Some(pid),
            "{mode}: the worker stayed the same process"
        );
        assert!(rss < 200 * 1024, "{mode}: worker rss {rss} kB");
        assert!(sent < 64 << 20, "{mode}: the worker read {sent} bytes");
        assert!(
            held < 7_000,
            "{mode}: the worker held the connection {held} ms"
        );
        let now: std::time::SystemTime = one(&mut c, "SELECT pg_postmaster_start_time()");
        assert_eq!(now, started, "{mode}: the postmaster did not restart");
    }
    let pending: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.outbox WHERE topic = 'hostile' AND state = 'pending'",
    );
    assert_eq!(pending, emitted, "every event waits");
    set_system(&mut c, &[("keel.redis_url", None)]);
    wait_target(&mut c, &format!(":{}", env.redis.port));
    let arrived = wait_for(Duration::from_secs(30), || {
        let n = env.redis.xrange("keel:hostile").len() as i64;
        (n >= emitted).then_some(n)
    });
    assert_eq!(arrived, Some(emitted), "each event arrives once");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(env.redis.xrange("keel:hostile").len() as i64, emitted);
}

/// A redis-server with TLS only and an ACL user whose password lives in a file only the
/// server's user may read: the outbox goes there over rediss://. A wrong CA is refused (the
/// certificate is verified), and a password file others may read is refused.
fn rediss_with_an_acl_user_and_a_password_file_that_nobody_else_reads(env: &Env) {
    let dir = std::env::temp_dir().join(format!("keel-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tls dir");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for ca in ["ca", "other-ca"] {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
        ]);
    }
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("ext");
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    let port = keel_pg_test::free_port();
    let d = |f: &str| dir.join(f).display().to_string();
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            &d("server.pem"),
            "--tls-key-file",
            &d("server.key"),
            "--tls-ca-cert-file",
            &d("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--user",
            "default",
            "off",
            "--user",
            "keel-app",
            "on",
            ">tls-pass-9f3c",
            "~*",
            "&*",
            "+@all",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server with TLS");
    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new("redis-cli")
            .args([
                "--tls",
                "--cacert",
                &d("ca.pem"),
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--user",
                "keel-app",
                "--pass",
                "tls-pass-9f3c",
                "--no-auth-warning",
            ])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(
        wait_for(Duration::from_secs(10), || (cli(&["PING"]) == "PONG")
            .then_some(()))
        .is_some()
    );
    // The password file, in the data directory's parent, owned by the server's user.
    let secret = env.pg.socket_dir().join("redis.pass");
    std::fs::write(&secret, "tls-pass-9f3c\n").expect("password file");
    let chown = |path: &std::path::Path| {
        let _ = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(path)
            .status();
    };
    chown(&secret);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut c = env.pg.connect();
    let url = format!("rediss://keel-app@localhost:{port}/0");
    set_system(
        &mut c,
        &[
            ("keel.redis_url", Some(&url)),
            (
                "keel.redis_password_file",
                Some(&secret.display().to_string()),
            ),
            ("keel.redis_tls_ca_file", Some(&d("other-ca.pem"))),
        ],
    );
    wait_target(&mut c, &format!(":{port}"));
    one::<i64>(&mut c, "SELECT keel.emit('over-tls', '{\"n\": 1}')");
    let refused = |c: &mut Client, what: &str| {
        let error = wait_for(Duration::from_secs(20), || {
            let e: Option<String> = one(c, "SELECT last_error FROM keel.worker_status()");
            e.filter(|e| e.to_lowercase().contains(what))
        });
        assert!(
            error.is_some(),
            "no error about {what}: {:?}",
            one::<Option<String>>(c, "SELECT last_error FROM keel.worker_status()")
        );
    };
    // A file others may read: refused before anything is sent.
    refused(&mut c, "chmod 600");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // A certificate from another CA: refused.
    refused(&mut c, "certificate");
    assert_eq!(cli(&["XLEN", "keel:over-tls"]), "0");
    set_system(&mut c, &[("keel.redis_tls_ca_file", Some(&d("ca.pem")))]);
    let arrived = wait_for(Duration::from_secs(30), || {
        (cli(&["XLEN", "keel:over-tls"]) == "1").then_some(())
    });
    assert!(arrived.is_some(), "the event went over TLS as keel-app");
    let target: Option<String> = one(&mut c, "SELECT redis_target FROM keel.worker_status()");
    let log = env.pg.log();
    assert!(
        !log.contains("tls-pass-9f3c"),
        "the password reached the server log"
    );
    assert!(!target.unwrap_or_default().contains("tls-pass-9f3c"));
    let shown: String = one(&mut c, "SHOW keel.redis_password_file");
    assert!(
        !shown.contains("tls-pass"),
        "SHOW gives the path, not the secret"
    );
    set_system(
        &mut c,
        &[
            ("keel.redis_url", None),
            ("keel.redis_password_file", None),
            ("keel.redis_tls_ca_file", None),
        ],
    );
    wait_target(&mut c, &format!(":{}", env.redis.port));
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every URL form hides its password from worker_status() and health(); health() warns
/// while the URL holds one; a pg_read_all_settings member sees no secret once it lives in
/// the password file.
fn no_form_of_redis_url_shows_its_password(env: &Env) {
    let mut c = env.pg.connect();
    for url in [
        "redis://:pw-a-7d1e@127.0.0.1:1/0",
        "redis://someone:pw-b-7d1e@127.0.0.1:1/0",
        "redis+unix:///tmp/keel-none.sock?db=1&pass=pw-c-7d1e",
        "unix:///tmp/keel-none.sock?password=pw-d-7d1e",
        "rediss://u:pw-e-7d1e@localhost:1",
    ] {
        set_system(&mut c, &[("keel.redis_url", Some(url))]);
        let seen = wait_for(Duration::from_secs(20), || {
            let t: Option<String> = one(&mut c, "SELECT redis_target FROM keel.worker_status()");
            t.filter(|t| t.contains("***") || t.contains("unparsable"))
        });
        let target = seen.unwrap_or_else(|| panic!("{url}: worker never showed it"));
        assert!(!target.contains("7d1e"), "{url} shown as {target}");
        let health: String = one(
            &mut c,
            "SELECT string_agg(check_name || status || coalesce(detail, '') || coalesce(advice, ''), ' ')
               FROM (SELECT h.\"check\" AS check_name, h.status, h.detail, h.advice FROM keel.health() h) x",
        );
        assert!(!health.contains("7d1e"), "{url}: health shows the password");
        let secret_status: String = one(
            &mut c,
            "SELECT status FROM keel.health() WHERE \"check\" = 'redis:secret'",
        );
        assert_eq!(
            secret_status, "warn",
            "{url}: health warns of the password in the URL"
        );
        let last_error: Option<String> = one(&mut c, "SELECT last_error FROM keel.worker_status()");
        assert!(!last_error.unwrap_or_default().contains("7d1e"));
    }
    set_system(&mut c, &[("keel.redis_url", None)]);
    wait_target(&mut c, &format!(":{}", env.redis.port));
    let secret_status: String = one(
        &mut c,
        "SELECT status FROM keel.health() WHERE \"check\" = 'redis:secret'",
    );
    assert_eq!(secret_status, "ok");
}

/// The native paths read and write keel.jobs, keel.rate_limit_state and keel.sessions as
/// the install script made them. A superuser who alters a column to another type (the
/// tables are the extension's, so nobody else can) gets 55000 from them, never a datum read
/// as the wrong type (a crash): each table in a database of its own.
fn columns_altered_to_another_type_are_refused_not_misread(env: &Env) {
    let cases = [
        (
            "ALTER TABLE keel.jobs ALTER COLUMN dead_reason TYPE varchar(300)",
            "SELECT keel.create_queue('typed');",
            [
                "SELECT keel.enqueue('typed', '{}')",
                "SELECT * FROM keel.claim('typed')",
            ],
        ),
        (
            "ALTER TABLE keel.rate_limit_state ALTER COLUMN a TYPE numeric",
            "SELECT keel.create_limit('typed', 5, '1 hour');",
            [
                "SELECT * FROM keel.check('typed', 'k')",
                "SELECT * FROM keel.rate_limit('typed-inline', 5, '1 hour')",
            ],
        ),
        (
            "ALTER TABLE keel.sessions ALTER COLUMN user_id TYPE varchar(1024)",
            "",
            [
                "SELECT * FROM keel.session_validate(repeat('A', 43))",
                "SELECT * FROM keel.session_validate(repeat('B', 42) || 'E')",
            ],
        ),
    ];
    for (alter, setup, calls) in cases {
        let mut c = env.pg.fresh_database("keel_typed");
        exec(&mut c, &format!("CREATE EXTENSION pg_keel; {setup}"));
        // One row first, so that a misread would have something to read.
        if alter.contains("jobs") {
            exec(&mut c, "SELECT keel.enqueue('typed', '{}')");
        }
        exec(&mut c, alter);
        for call in calls {
            let got = sqlstate(c.batch_execute(call));
            assert_eq!(got.as_deref(), Some("55000"), "{alter}; {call}");
        }
        drop(c);
        env.pg.drop_database("keel_typed");
    }
}
