//! Faults others cause, over real connections: a crash (`pg_ctl stop -m immediate`) right after
//! a lease call returned to its client, `pg_terminate_backend` of the background worker (once,
//! and over and over during dispatch), and `DROP DATABASE ... WITH (FORCE)` of the worker's
//! database followed by its re-creation, as a restore does.
//!
//! A "ghost" is a consumer holding a lease that a crash made the server forget: what it does
//! with that lease afterwards (ack, fail, extend) must be refused, and the job must neither be
//! lost nor handed to two live leases.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use keel_pg_test::{
    exec, one, restore_tasks, run, run_tasks_every_second, tests, wait_for, wait_worker_idle,
    Client, Env, DATABASE,
};

fn main() {
    let tests = tests![
        every_state_changing_call_survives_a_crash_right_after_it_returns,
        crash_right_after_claim_never_hands_out_the_same_lease_twice,
        crash_right_after_ack_or_fail_refuses_the_ghost_and_loses_no_job,
        crash_right_after_extend_keeps_the_longer_lease,
        the_crash_fence_skips_attempt_1_only_for_jobs_that_waited_through_a_crash,
        worker_comes_back_after_pg_terminate_backend,
        worker_terminated_over_and_over_during_dispatch_loses_and_doubles_nothing,
        worker_comes_back_after_its_database_is_dropped_and_created_again,
    ];
    run(tests)
}

const DEADLINE: Duration = Duration::from_secs(30);

fn claim_one(c: &mut Client, queue: &str, lease: &str) -> Option<(i64, i32)> {
    c.query(
        "SELECT job_id, attempt FROM keel.claim($1, 1, $2::text::interval)",
        &[&queue, &lease],
    )
    .expect("claim")
    .first()
    .map(|r| (r.get(0), r.get(1)))
}

fn ack(c: &mut Client, lease: (i64, i32)) -> bool {
    c.query_one("SELECT keel.ack($1, $2)", &[&lease.0, &lease.1])
        .expect("ack")
        .get(0)
}

fn fail(c: &mut Client, lease: (i64, i32)) -> Option<String> {
    c.query_one(
        "SELECT keel.fail($1, $2, 'ghost', '0 s')",
        &[&lease.0, &lease.1],
    )
    .expect("fail")
    .get(0)
}

fn extend(c: &mut Client, lease: (i64, i32)) -> bool {
    let until: Option<std::time::SystemTime> = c
        .query_one(
            "SELECT keel.extend($1, $2, '1 minute')",
            &[&lease.0, &lease.1],
        )
        .expect("extend")
        .get(0);
    until.is_some()
}

/// What a ghost tries with its lease, and how many of those tries were refused.
fn ghost_tries(c: &mut Client, ghost: (i64, i32)) -> (usize, usize) {
    let refused = [!extend(c, ghost), fail(c, ghost).is_none(), !ack(c, ghost)];
    (refused.len(), refused.iter().filter(|r| **r).count())
}

/// Past the ghost's lease, the ghost's job is claimed again under another attempt (never lost),
/// the ghost tries its lease (see `ghost_tries`), and the live holder acks; (tried, refused).
fn claimed_again_and_ghost_refused(
    c: &mut Client,
    queue: &str,
    ghost: (i64, i32),
    round: usize,
) -> (usize, usize) {
    std::thread::sleep(Duration::from_millis(1100)); // past the ghost's lease
    let live = claim_one(c, queue, "1 minute")
        .unwrap_or_else(|| panic!("round {round}: job {} is lost", ghost.0));
    assert_eq!(live.0, ghost.0, "round {round}");
    assert_ne!(
        live, ghost,
        "round {round}: the ghost's lease was handed out again"
    );
    let tried_refused = ghost_tries(c, ghost);
    assert!(ack(c, live), "round {round}: the live holder acks");
    tried_refused
}

/// The attempt the server has on record for `job` (None: the job is gone).
fn attempt_on_record(c: &mut Client, job: i64) -> Option<i32> {
    c.query_opt("SELECT attempt FROM keel.jobs WHERE job_id = $1", &[&job])
        .expect("attempt")
        .map(|r| r.get(0))
}

fn crash_and_restart(env: &Env) {
    env.pg.crash();
    env.pg.start_again();
}

/// One state-changing call: what it needs first, the call, and what must hold after a crash
/// right after it returned (a query answering true).
struct Case {
    setup: &'static str,
    call: &'static str,
    survives: &'static str,
}

/// Waits (inside one statement) until the worker has dispatched every event of `fx-replay`.
const WAIT_DISPATCHED: &str = "DO $$ BEGIN
        FOR i IN 1..200 LOOP
            EXIT WHEN NOT EXISTS (SELECT 1 FROM keel.outbox
                                   WHERE topic = 'fx-replay' AND state <> 'dispatched');
            PERFORM pg_sleep(0.05);
        END LOOP;
    END $$";

const CASES: &[Case] = &[
    Case {
        setup: "",
        call: "SELECT keel.create_queue('fx-create')",
        survives: "SELECT EXISTS (SELECT 1 FROM keel.queues WHERE queue = 'fx-create')",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-alter')",
        call: "SELECT keel.alter_queue('fx-alter', max_attempts => 9)",
        survives: "SELECT max_attempts = 9 FROM keel.queues WHERE queue = 'fx-alter'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-pause')",
        call: "SELECT keel.pause_queue('fx-pause')",
        survives: "SELECT paused FROM keel.queues WHERE queue = 'fx-pause'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-resume'); SELECT keel.pause_queue('fx-resume')",
        call: "SELECT keel.resume_queue('fx-resume')",
        survives: "SELECT NOT paused FROM keel.queues WHERE queue = 'fx-resume'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-drop')",
        call: "SELECT keel.drop_queue('fx-drop')",
        survives: "SELECT NOT EXISTS (SELECT 1 FROM keel.queues WHERE queue = 'fx-drop')",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-purge'); SELECT keel.enqueue('fx-purge', '{}')",
        call: "SELECT keel.purge_queue('fx-purge')",
        survives: "SELECT count(*) = 0 FROM keel.jobs WHERE queue = 'fx-purge'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-enqueue')",
        call: "SELECT keel.enqueue('fx-enqueue', '{\"n\": 1}')",
        survives: "SELECT count(*) = 1 FROM keel.jobs WHERE queue = 'fx-enqueue' AND payload = '{\"n\": 1}'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-batch')",
        call: "SELECT keel.enqueue_batch('fx-batch', ARRAY['{}', '{}', '{}']::jsonb[])",
        survives: "SELECT count(*) = 3 FROM keel.jobs WHERE queue = 'fx-batch'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-key')",
        call: "SELECT keel.enqueue('fx-key', '{}', idempotency_key => 'k')",
        // The key is still taken: enqueueing it again returns the same job.
        survives: "SELECT keel.enqueue('fx-key', '{}', idempotency_key => 'k')
                        = (SELECT job_id FROM keel.jobs WHERE queue = 'fx-key')",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-fail', max_attempts => 1);
                SELECT keel.enqueue('fx-fail', '{}');
                SELECT keel.claim('fx-fail')",
        call: "SELECT keel.fail(job_id, attempt, 'boom') FROM keel.jobs WHERE queue = 'fx-fail'",
        survives: "SELECT state = 'dead' AND last_error = 'boom' FROM keel.jobs WHERE queue = 'fx-fail'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-progress');
                SELECT keel.enqueue('fx-progress', '{}');
                SELECT keel.claim('fx-progress')",
        call: "SELECT keel.progress(job_id, attempt, '{\"step\": 3}') FROM keel.jobs WHERE queue = 'fx-progress'",
        survives: "SELECT progress = '{\"step\": 3}' FROM keel.jobs WHERE queue = 'fx-progress'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-cancel');
                SELECT keel.enqueue('fx-cancel', '{}');
                SELECT keel.enqueue('fx-cancel', '{}');
                SELECT keel.claim('fx-cancel')",
        call: "SELECT keel.cancel(job_id, 'stop') FROM keel.jobs WHERE queue = 'fx-cancel'",
        survives: "SELECT bool_and(state = 'cancelled' AND dead_reason = 'stop') AND count(*) = 2
                     FROM keel.jobs WHERE queue = 'fx-cancel'",
    },
    Case {
        // A session that commits without waiting for the flush: the cancel waits anyway.
        setup: "SELECT keel.create_queue('fx-cancel-async');
                SELECT keel.enqueue('fx-cancel-async', '{}');
                SELECT keel.claim('fx-cancel-async')",
        call: "SET synchronous_commit = off;
               SELECT keel.cancel(job_id) FROM keel.jobs WHERE queue = 'fx-cancel-async'",
        survives: "SELECT state = 'cancelled' FROM keel.jobs WHERE queue = 'fx-cancel-async'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-cancel-q');
                SELECT keel.enqueue('fx-cancel-q', '{}') FROM generate_series(1, 3)",
        call: "SELECT keel.cancel_queue('fx-cancel-q')",
        survives: "SELECT bool_and(state = 'cancelled') AND count(*) = 3
                     FROM keel.jobs WHERE queue = 'fx-cancel-q'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-snooze', max_attempts => 1);
                SELECT keel.enqueue('fx-snooze', '{}');
                SELECT keel.claim('fx-snooze')",
        call: "SELECT keel.snooze(job_id, attempt, '1 hour') FROM keel.jobs WHERE queue = 'fx-snooze'",
        survives: "SELECT state = 'ready' AND attempt - attempt_base = 0
                          AND visible_at > now() + interval '50 minutes'
                     FROM keel.jobs WHERE queue = 'fx-snooze'",
    },
    Case {
        setup: "SELECT keel.create_queue('fx-revive', max_attempts => 1);
                SELECT keel.enqueue('fx-revive', '{}');
                SELECT keel.fail(job_id, attempt) FROM keel.claim('fx-revive')",
        call: "SELECT keel.retry_dead('fx-revive')",
        survives: "SELECT state = 'ready' FROM keel.jobs WHERE queue = 'fx-revive'",
    },
    Case {
        // (The worker's own reaper is off meanwhile: it commits without waiting for the flush,
        // and a crash may forget what it did; the call's promise is what is tested here.)
        setup: "SELECT keel.set_task('reap_expired', enabled => false);
                SELECT keel.create_queue('fx-reap', max_attempts => 1);
                SELECT keel.enqueue('fx-reap', '{}');
                SELECT keel.claim('fx-reap', 1, '1 millisecond');
                SELECT pg_sleep(0.01)",
        call: "SELECT keel.reap_expired()",
        survives: "SELECT state = 'dead' FROM keel.jobs WHERE queue = 'fx-reap'",
    },
    Case {
        // An ack may be forgotten (the job then runs again); the job is never lost.
        setup: "SELECT keel.create_queue('fx-ack');
                SELECT keel.enqueue('fx-ack', '{}', idempotency_key => 'k');
                SELECT keel.claim('fx-ack')",
        call: "SELECT keel.ack(job_id, attempt) FROM keel.jobs WHERE queue = 'fx-ack'",
        survives: "SELECT count(*) = 1 FROM keel.jobs WHERE queue = 'fx-ack'",
    },
    Case {
        // The same for a batch: forgotten at worst, never lost.
        setup: "SELECT keel.create_queue('fx-ackb');
                SELECT keel.enqueue_batch('fx-ackb', ARRAY['{}', '{}', '{}']::jsonb[]);
                SELECT keel.claim('fx-ackb', 3)",
        call: "SELECT keel.ack_batch(array_agg(job_id), array_agg(attempt)) FROM keel.jobs WHERE queue = 'fx-ackb'",
        survives: "SELECT count(*) <= 3 FROM keel.jobs WHERE queue = 'fx-ackb'",
    },
    Case {
        setup: "",
        call: "SELECT keel.emit('fx-emit', '{}')",
        survives: "SELECT count(*) = 1 FROM keel.outbox WHERE topic = 'fx-emit'",
    },
    Case {
        setup: "",
        call: "SELECT keel.create_route('fx-route', 'list', 'fx:list')",
        survives: "SELECT target = 'list' AND redis_key = 'fx:list' FROM keel.outbox_routes WHERE topic = 'fx-route'",
    },
    Case {
        setup: "SELECT keel.emit('fx-replay', '{}')",
        call: "SELECT keel.outbox_replay('fx-replay', 0)",
        survives: "SELECT replays = 1 FROM keel.outbox WHERE topic = 'fx-replay'",
    },
    Case {
        setup: "",
        call: "SELECT keel.create_limit('fx-limit', 5, '1 hour')",
        survives: "SELECT max = 5 FROM keel.rate_limits WHERE name = 'fx-limit'",
    },
    Case {
        setup: "SELECT keel.create_limit('fx-alter-limit', 5, '1 hour')",
        call: "SELECT keel.alter_limit('fx-alter-limit', max => 9)",
        survives: "SELECT max = 9 FROM keel.rate_limits WHERE name = 'fx-alter-limit'",
    },
    Case {
        setup: "SELECT keel.create_limit('fx-drop-limit', 5, '1 hour')",
        call: "SELECT keel.drop_limit('fx-drop-limit')",
        survives: "SELECT NOT EXISTS (SELECT 1 FROM keel.rate_limits WHERE name = 'fx-drop-limit')",
    },
    Case {
        // A durable decision is kept: of a limit of 3, two are left.
        setup: "SELECT keel.create_limit('fx-check', 3, '1 hour')",
        call: "SELECT allowed FROM keel.check('fx-check', 'k')",
        survives: "SELECT count(*) FILTER (WHERE a) = 2
                     FROM (SELECT (keel.check('fx-check', 'k')).allowed AS a
                             FROM generate_series(1, 3)) x",
    },
    Case {
        setup: "",
        call: "SELECT allowed FROM keel.rate_limit('fx-per-call', 2, '1 hour')",
        survives: "SELECT count(*) FILTER (WHERE a) = 1
                     FROM (SELECT (keel.rate_limit('fx-per-call', 2, '1 hour')).allowed AS a
                             FROM generate_series(1, 2)) x",
    },
    Case {
        setup: "SELECT keel.create_limit('fx-reset', 1, '1 hour');
                SELECT keel.check('fx-reset', 'k')",
        call: "SELECT keel.rate_reset('fx-reset', 'k')",
        survives: "SELECT allowed FROM keel.check('fx-reset', 'k')",
    },
    Case {
        setup: "SELECT keel.create_limit('fx-refund', 1, '1 hour');
                SELECT keel.check('fx-refund', 'k')",
        call: "SELECT keel.rate_refund('fx-refund', 'k')",
        survives: "SELECT allowed FROM keel.check('fx-refund', 'k')",
    },
    Case {
        setup: "",
        call: "SELECT keel.set_task('cleanup_outbox', '2 minutes', true)",
        survives: "SELECT every = '2 minutes' FROM keel.tasks WHERE name = 'cleanup_outbox'",
    },
    Case {
        setup: "",
        call: "SELECT keel.session_create('fx-user')",
        survives: "SELECT count(*) = 1 FROM keel.user_sessions('fx-user')",
    },
    Case {
        setup: "CREATE TABLE fx_data AS SELECT token FROM keel.session_create('fx-data')",
        call: "SELECT keel.session_set_data((SELECT token FROM fx_data), '{\"a\": 1}')",
        survives: "SELECT data = '{\"a\": 1}' FROM keel.session_validate((SELECT token FROM fx_data))",
    },
    Case {
        // The new token is kept by the caller in the same transaction as the rotation.
        setup: "CREATE TABLE fx_old AS SELECT token FROM keel.session_create('fx-rotate')",
        call: "CREATE TABLE fx_new AS SELECT keel.session_rotate((SELECT token FROM fx_old)) AS token",
        survives: "SELECT NOT EXISTS (SELECT 1 FROM keel.session_validate((SELECT token FROM fx_old)))
                       AND EXISTS (SELECT 1 FROM keel.session_validate((SELECT token FROM fx_new)))",
    },
    Case {
        setup: "CREATE TABLE fx_revoke AS SELECT token FROM keel.session_create('fx-revoke')",
        call: "SELECT keel.session_revoke((SELECT token FROM fx_revoke))",
        survives: "SELECT NOT EXISTS (SELECT 1 FROM keel.session_validate((SELECT token FROM fx_revoke)))",
    },
    Case {
        setup: "CREATE TABLE fx_user AS SELECT token FROM keel.session_create('fx-everywhere')",
        call: "SELECT keel.session_revoke_user('fx-everywhere')",
        survives: "SELECT NOT EXISTS (SELECT 1 FROM keel.session_validate((SELECT token FROM fx_user)))",
    },
    Case {
        setup: "DROP ROLE IF EXISTS fx_role; CREATE ROLE fx_role",
        call: "SELECT keel.grant_producer('fx_role')",
        survives: "SELECT has_function_privilege('fx_role', 'keel.emit(text, jsonb, text, bigint, jsonb)', 'EXECUTE')",
    },
];

/// For every state-changing public function:
/// its call commits and returns, the server stops at once (`pg_ctl stop -m immediate`), and
/// after the restart the call's promise holds.
fn every_state_changing_call_survives_a_crash_right_after_it_returns(env: &Env) {
    let mut broken = Vec::new();
    for case in CASES {
        let mut c = env.pg.connect();
        if !case.setup.is_empty() {
            exec(&mut c, case.setup);
        }
        if case.call.contains("fx-replay") {
            exec(&mut c, WAIT_DISPATCHED);
        }
        exec(&mut c, case.call);
        drop(c);
        crash_and_restart(env);
        let mut c = env.pg.connect();
        let held: Option<bool> = c
            .query_opt(case.survives, &[])
            .unwrap_or_else(|e| panic!("{}: {e}", case.survives))
            .and_then(|r| r.get(0));
        if held != Some(true) {
            broken.push(case.call);
        }
    }
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.set_task('cleanup_outbox', '1 minute', true);
         SELECT keel.set_task('reap_expired', enabled => true);
         DROP TABLE fx_data, fx_old, fx_new, fx_revoke, fx_user;
         DROP OWNED BY fx_role; DROP ROLE fx_role",
    );
    println!(
        "    {} state-changing calls, each followed at once by pg_ctl stop -m immediate: {} \
         promises held",
        CASES.len(),
        CASES.len() - broken.len()
    );
    assert!(broken.is_empty(), "lost in a crash: {broken:?}");
}

/// The reproduction: a committed job, a claim whose lease the client got, an
/// immediate stop right then. After the restart and past the ghost's lease, the job is handed
/// out again under another attempt, and everything the ghost does with its lease is refused.
fn crash_right_after_claim_never_hands_out_the_same_lease_twice(env: &Env) {
    const ROUNDS: usize = 8;
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('ghost-claim')");
    let (mut tried, mut refused, mut forgotten) = (0, 0, 0);
    for round in 0..ROUNDS {
        let job: i64 = one(&mut c, "SELECT keel.enqueue('ghost-claim', '{}')");
        let ghost = claim_one(&mut c, "ghost-claim", "1 second").expect("the job is claimed");
        assert_eq!(ghost, (job, 1), "round {round}: a first claim");
        drop(c);
        crash_and_restart(env);
        c = env.pg.connect();
        if attempt_on_record(&mut c, job) == Some(0) {
            forgotten += 1; // the crash forgot the claim: a true ghost
        }
        let (t, r) = claimed_again_and_ghost_refused(&mut c, "ghost-claim", ghost, round);
        tried += t;
        refused += r;
    }
    let left: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.jobs WHERE queue = 'ghost-claim'",
    );
    println!(
        "    {ROUNDS} crashes right after a claim: {forgotten} claims forgotten by the crash; \
         ghost calls tried {tried}, refused {refused}; jobs lost 0, left {left}"
    );
    assert_eq!(refused, tried, "every ghost call refused");
    assert_eq!(left, 0, "every job acked by its live holder");
    assert!(
        forgotten > 0,
        "no crash forgot a claim: the test did not make a ghost"
    );
}

/// An ack or a fail that returned before a crash may be forgotten by it: the job then runs
/// again (at-least-once), under a new attempt, and the ghost's repeated calls are refused.
/// A job is never lost.
fn crash_right_after_ack_or_fail_refuses_the_ghost_and_loses_no_job(env: &Env) {
    const ROUNDS: usize = 4;
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('ghost-ack')");
    let (mut tried, mut refused, mut again) = (0, 0, 0);
    for round in 0..ROUNDS * 2 {
        let job: i64 = one(&mut c, "SELECT keel.enqueue('ghost-ack', '{}')");
        let ghost = claim_one(&mut c, "ghost-ack", "1 second").expect("claimed");
        let acking = round % 2 == 0;
        if acking {
            assert!(ack(&mut c, ghost), "round {round}: acked");
        } else {
            assert_eq!(fail(&mut c, ghost).as_deref(), Some("retry"));
        }
        drop(c);
        crash_and_restart(env);
        c = env.pg.connect();
        if acking && attempt_on_record(&mut c, job).is_none() {
            continue; // the ack survived: done, nothing comes back
        }
        let (t, r) = claimed_again_and_ghost_refused(&mut c, "ghost-ack", ghost, round);
        again += 1;
        tried += t;
        refused += r;
    }
    let left: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.jobs WHERE queue = 'ghost-ack'",
    );
    println!(
        "    {} crashes right after an ack or a fail: {again} jobs ran again; ghost calls tried \
         {tried}, refused {refused}; jobs lost 0",
        ROUNDS * 2
    );
    assert_eq!(refused, tried, "every ghost call refused");
    assert_eq!(left, 0);
}

/// An extend that returned is kept through a crash: the job is not handed to anyone else
/// before the new expiry, and its holder can still ack it.
fn crash_right_after_extend_keeps_the_longer_lease(env: &Env) {
    const ROUNDS: usize = 3;
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('ghost-extend')");
    for round in 0..ROUNDS {
        one::<i64>(&mut c, "SELECT keel.enqueue('ghost-extend', '{}')");
        let held = claim_one(&mut c, "ghost-extend", "1 second").expect("claimed");
        assert!(extend(&mut c, held), "round {round}: extended");
        drop(c);
        crash_and_restart(env);
        c = env.pg.connect();
        std::thread::sleep(Duration::from_millis(1500)); // past the lease before the extend
        assert_eq!(
            claim_one(&mut c, "ghost-extend", "1 minute"),
            None,
            "round {round}: the extended lease was forgotten and the job handed out again"
        );
        assert!(ack(&mut c, held), "round {round}: the holder still acks");
    }
    println!("    {ROUNDS} crashes right after an extend: every extended lease kept");
}

/// The fence skips attempt 1 only for jobs that may have been handed out before a crash: a job
/// enqueued after the restart starts at attempt 1, and a later clean restart adds no fence.
fn the_crash_fence_skips_attempt_1_only_for_jobs_that_waited_through_a_crash(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('fence')");
    let before: i64 = one(&mut c, "SELECT keel.enqueue('fence', '{}')");
    drop(c);
    crash_and_restart(env);
    let mut c = env.pg.connect();
    let after: i64 = one(&mut c, "SELECT keel.enqueue('fence', '{}', priority => -1)");
    // The one enqueued after the restart comes first (priority) and starts at attempt 1.
    assert_eq!(claim_one(&mut c, "fence", "1 minute"), Some((after, 1)));
    // The one that waited through the crash may have been handed out just before it.
    assert_eq!(claim_one(&mut c, "fence", "1 minute"), Some((before, 2)));
    // A job delayed past the restart could not have been handed out before the crash.
    // A clean restart keeps the fence (in the data directory) for jobs that waited through
    // the crash, also in a queue nobody claimed from in between, and adds none for jobs
    // enqueued after it.
    exec(&mut c, "SELECT keel.create_queue('fence-idle')");
    let idle: i64 = one(&mut c, "SELECT keel.enqueue('fence-idle', '{}')");
    let delayed: i64 = one(
        &mut c,
        "SELECT keel.enqueue('fence-idle', '{}', delay => '2 s', priority => 1)",
    );
    drop(c);
    crash_and_restart(env);
    let mut c = env.pg.connect();
    let waited: i64 = one(&mut c, "SELECT keel.enqueue('fence', '{}')");
    drop(c);
    env.pg.restart();
    let mut c = env.pg.connect();
    assert_eq!(claim_one(&mut c, "fence", "1 minute"), Some((waited, 1)));
    assert_eq!(
        claim_one(&mut c, "fence-idle", "1 minute"),
        Some((idle, 2)),
        "the fence outlived a clean restart with no claim in between"
    );
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        claim_one(&mut c, "fence-idle", "1 minute"),
        Some((delayed, 1)),
        "a job not yet due at the crash was never handed out"
    );
    let tries: i32 = one(
        &mut c,
        &format!("SELECT attempt - attempt_base FROM keel.jobs WHERE job_id = {idle}"),
    );
    assert_eq!(tries, 1, "the skipped number is not counted as a try");
    exec(
        &mut c,
        "SELECT keel.drop_queue('fence', force => true); SELECT keel.drop_queue('fence-idle', force => true)",
    );
}

fn worker_pid(c: &mut Client) -> Option<i32> {
    one(c, "SELECT pid FROM keel.worker_status()")
}

fn stream_ids(env: &Env, key: &str) -> Vec<i64> {
    env.redis
        .xrange(key)
        .iter()
        .map(|(_, fields)| fields["id"].parse().expect("numeric id"))
        .collect()
}

fn stream_len(env: &Env, key: &str) -> usize {
    let mut r = env.redis.connection();
    redis::cmd("XLEN").arg(key).query(&mut r).expect("XLEN")
}

/// Waits until `n` events of `topic` are in its stream; how long that took.
fn wait_in_stream(env: &Env, topic: &str, n: usize) -> Duration {
    let started = Instant::now();
    wait_for(DEADLINE, || {
        (stream_len(env, &format!("keel:{topic}")) >= n).then_some(())
    })
    .unwrap_or_else(|| panic!("{topic}: {n} events did not reach Redis"));
    started.elapsed()
}

fn worker_comes_back_after_pg_terminate_backend(env: &Env) {
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let pid = worker_pid(&mut c).expect("a worker runs");
    let terminated = Instant::now();
    let done: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .expect("terminate")
        .get(0);
    assert!(done);
    // The pid and the state from one call: read apart, the worker could exit between them
    // and an "idle" of the living worker be taken for the state of the gone one.
    let state = wait_for(Duration::from_secs(1), || {
        let row = c
            .query_one("SELECT pid, state FROM keel.worker_status()", &[])
            .expect("worker_status");
        let (pid, state): (Option<i32>, String) = (row.get(0), row.get(1));
        pid.is_none().then_some(state)
    });
    // Seen between the exit and the new worker: why it is gone, or (once the launcher acted)
    // that the next one is starting.
    if let Some(state) = state {
        assert!(
            state.contains("starts it again") || state.starts_with("starting:"),
            "worker_status says why no worker runs: {state}"
        );
    }
    let back = wait_for(DEADLINE, || worker_pid(&mut c).filter(|p| *p != pid))
        .expect("a new worker within 30 s");
    let took = terminated.elapsed();
    wait_worker_idle(&mut c);
    one::<i64>(&mut c, "SELECT keel.emit('after-terminate', '{}')");
    wait_in_stream(env, "after-terminate", 1);
    println!(
        "    worker {pid} terminated; worker {back} running {:.1} s later, and dispatching",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(10),
        "the worker was back in {took:?}"
    );
}

/// Terminates the worker eight times, each time in the middle of the dispatch of a fresh wave
/// of 20,000 events (once the first of them are in Redis), while its tasks run every second: each event ends in the
/// stream exactly once, no task records an error, and a worker is running at the end.
fn worker_terminated_over_and_over_during_dispatch_loses_and_doubles_nothing(env: &Env) {
    const WAVES: usize = 8;
    const PER_WAVE: usize = 20_000;
    let mut c = env.pg.connect();
    wait_worker_idle(&mut c);
    let schedule = run_tasks_every_second(&mut c);
    exec(
        &mut c,
        "SELECT keel.create_limit('fx-mem', 100, '1 hour', durability => 'memory')",
    );
    let (mut terminations, mut mid_dispatch, mut last) = (0, 0, 0);
    for wave in 0..WAVES {
        let pid = wait_for(DEADLINE, || worker_pid(&mut c).filter(|p| *p != last))
            .expect("a worker runs");
        last = pid;
        exec(&mut c, &format!("SELECT keel.emit('terminated', jsonb_build_object('n', g)) FROM generate_series(1, {PER_WAVE}) g"));
        // In the middle of the dispatch: the first events of the wave are in Redis.
        let before = wave * PER_WAVE;
        wait_for(DEADLINE, || {
            (stream_len(env, "keel:terminated") > before).then_some(())
        })
        .expect("dispatch under way");
        let pending: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.outbox WHERE topic = 'terminated' AND state <> 'dispatched'",
        );
        // Memory rate-limit decisions made just before: written by the worker's last snapshot.
        c.execute(
            "SELECT keel.check('fx-mem', 'wave-' || $1::int, 3)",
            &[&(wave as i32)],
        )
        .expect("memory decision");
        let done: bool = c
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .expect("terminate")
            .get(0);
        terminations += usize::from(done);
        mid_dispatch += usize::from(pending > 0);
    }
    let total = WAVES * PER_WAVE;
    wait_in_stream(env, "terminated", total);
    let ids = stream_ids(env, "keel:terminated");
    let unique: HashSet<i64> = ids.iter().copied().collect();
    println!(
        "    {terminations} terminations ({mid_dispatch} with events pending): {} of {total} \
         events delivered, {} doubled",
        unique.len(),
        ids.len() - unique.len()
    );
    assert_eq!(terminations, WAVES, "every termination found a worker");
    assert!(mid_dispatch > 0, "no termination hit a dispatch");
    assert_eq!(unique.len(), total, "every event arrived");
    assert_eq!(ids.len(), unique.len(), "no event twice");
    let failed: Vec<String> = c
        .query(
            "SELECT name || ': ' || last_error FROM keel.tasks WHERE last_error IS NOT NULL",
            &[],
        )
        .expect("tasks")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(failed.is_empty(), "task errors: {failed:?}");
    let written = wait_for(DEADLINE, || {
        let n: i64 = one(
            &mut c,
            "SELECT count(*) FROM keel.rate_limit_state WHERE policy = 'fx-mem'",
        );
        (n == WAVES as i64).then_some(n)
    });
    assert!(
        written.is_some(),
        "every memory key written by a snapshot of a worker that was then terminated"
    );
    exec(&mut c, "SELECT keel.drop_limit('fx-mem')");
    restore_tasks(&mut c, &schedule);
    wait_worker_idle(&mut c);
}

/// A restore: the worker's database is dropped (which terminates the worker) and created again
/// with the extension. The worker is back and dispatching within seconds, without a restart.
fn worker_comes_back_after_its_database_is_dropped_and_created_again(env: &Env) {
    let mut admin = env.pg.connect_db("postgres");
    let dropped = Instant::now();
    exec(
        &mut admin,
        &format!("DROP DATABASE {DATABASE} WITH (FORCE)"),
    );
    exec(&mut admin, &format!("CREATE DATABASE {DATABASE}"));
    let mut c = env.pg.connect();
    exec(&mut c, "CREATE EXTENSION pg_keel");
    let created = Instant::now();
    wait_worker_idle(&mut c);
    one::<i64>(&mut c, "SELECT keel.emit('after-recreate', '{}')");
    wait_in_stream(env, "after-recreate", 1);
    println!(
        "    database dropped WITH (FORCE) and created again: worker dispatching {:.1} s after \
         CREATE EXTENSION ({:.1} s after the drop)",
        created.elapsed().as_secs_f64(),
        dropped.elapsed().as_secs_f64()
    );
}
