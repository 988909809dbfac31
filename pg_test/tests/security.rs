//! The attacks of the hardening review, each reproduced over real connections and shown
//! refused or contained: locks a role without grants could take to stall producers, periods
//! near the interval maximum, huge names echoed into errors, unbounded text inputs and claim
//! batches, and memory-mode state outliving its install.

use std::time::{Duration, Instant};

use keel_pg_test::{exec, expect_sqlstates, one, run, sqlstate, wait_for, Client, Env, TestFn};

fn main() {
    let tests: &[(&str, TestFn)] = &[
        (
            "a_role_without_grants_cannot_stall_enqueue_or_emit_with_locks",
            a_role_without_grants_cannot_stall_enqueue_or_emit_with_locks,
        ),
        (
            "periods_near_the_interval_maximum_are_refused_and_stored_ones_restore",
            periods_near_the_interval_maximum_are_refused_and_stored_ones_restore,
        ),
        (
            "a_failed_snapshot_keeps_memory_keys_for_the_next_one",
            a_failed_snapshot_keeps_memory_keys_for_the_next_one,
        ),
        (
            "a_10_mb_name_is_repeated_capped_and_escaped",
            a_10_mb_name_is_repeated_capped_and_escaped,
        ),
        (
            "worker_and_error_texts_and_claim_batches_are_bounded",
            worker_and_error_texts_and_claim_batches_are_bounded,
        ),
        (
            "a_dispatch_round_is_bounded_in_bytes",
            a_dispatch_round_is_bounded_in_bytes,
        ),
        // Last: it drops and creates the extension.
        (
            "memory_state_does_not_outlive_drop_extension",
            memory_state_does_not_outlive_drop_extension,
        ),
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
    // 40 payloads of ~900 kB that do not compress: 36 MB in all.
    exec(
        &mut c,
        "SELECT keel.enqueue('tb-jobs', jsonb_build_object('blob',
                (SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 28000) g)))
           FROM generate_series(1, 40)",
    );
    let first: i64 = one(&mut c, "SELECT count(*) FROM keel.claim('tb-jobs', 10000)");
    let bytes: i64 = one(
        &mut c,
        "SELECT sum(pg_column_size(payload))::int8 FROM keel.jobs WHERE queue = 'tb-jobs' AND state = 'running'",
    );
    assert!(
        (1..40).contains(&first),
        "one claim took {first} of 40 large jobs"
    );
    assert!(
        bytes <= 16 * 1024 * 1024 + 1024 * 1024,
        "{bytes} bytes in one claim"
    );
    let mut total = first;
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
