//! Queues over real client connections: every function's happy path and errors, lease
//! expiry, retries, dead letter, idempotency, backpressure, pause, priority, delays, NOTIFY,
//! privileges, restart, and many consumers draining one queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_pg_test::{exec, expect_sqlstates, one, run_with, sqlstate, tests, wait_for, Client, Env};
use postgres::fallible_iterator::FallibleIterator;

fn main() {
    let tests = tests![
        a_claim_plan_made_on_an_empty_table_stays_an_index_scan,
        an_under_filled_claim_does_not_walk_what_churn_left_behind,
        native_claims_and_enqueues_refuse_what_they_would_skip,
        a_drain_with_the_horizon_held_skips_what_it_claimed_from_one_batch,
        the_claim_floor_passes_over_no_job,
        enqueue_refuses_what_its_direct_insert_would_skip_and_two_phase_commit,
        ack_batch_completes_a_claimed_batch_in_one_call,
        create_queue_is_idempotent_and_keeps_settings,
        bad_input_gets_a_sqlstate_and_changes_nothing,
        enqueue_claim_ack_round_trip,
        enqueue_batch_returns_ids_in_input_order,
        fail_retries_with_backoff_then_dies,
        snooze_gives_a_job_back_without_using_a_try,
        progress_is_kept_on_the_job_and_fenced_by_the_lease,
        cancel_ends_waiting_and_running_jobs_and_leaves_finished_ones,
        cancel_racing_ack_has_exactly_one_winner,
        replace_updates_a_waiting_job_and_debounces,
        replace_racing_claim_never_changes_a_held_job,
        two_first_replaces_of_a_key_keep_the_later_payload,
        a_job_after_1000_others_runs_once_all_are_done_by_8_consumers,
        a_job_after_a_dead_or_cancelled_one_is_cancelled,
        finished_jobs_stay_for_keep_finished_with_their_result,
        a_claim_across_queues_goes_by_priority_then_by_the_order_given,
        eight_consumers_claiming_across_queues_get_every_job_once,
        expired_lease_comes_back_and_stale_worker_is_refused,
        extend_keeps_the_lease,
        last_attempt_expiry_is_reaped_to_dead_and_retried,
        idempotency_key_survives_completion_until_window_ends,
        concurrent_idempotent_enqueues_make_one_job,
        backpressure_refuses_over_max_ready,
        paused_queue_accepts_but_does_not_hand_out,
        priority_then_age,
        delayed_jobs_are_invisible_until_due,
        notify_after_commit_only,
        wake_ups_come_from_the_relay_and_from_the_producer_while_it_is_gone,
        drop_and_purge,
        stats_and_stuck_jobs_views,
        privileges_nothing_to_public_and_grants_work,
        search_path_cannot_hijack_keel_functions,
        jobs_survive_restart_and_crash,
        lease_commit_async_only_when_nothing_else_was_written,
        pg_dump_keeps_queues_and_jobs,
        abandoned_leases_come_back_and_are_acked_once,
        many_consumers_drain_every_job_exactly_once,
        with_the_xmin_horizon_held_no_job_is_lost_or_doubled,
    ];
    // Prepared transactions on, to show which calls refuse PREPARE TRANSACTION.
    run_with(tests, &["max_prepared_transactions = 4"])
}

/// (job_id, attempt) of the claimed jobs.
fn claim(c: &mut Client, queue: &str, batch: i32) -> Vec<(i64, i32)> {
    c.query(
        "SELECT job_id, attempt FROM keel.claim($1, $2)",
        &[&queue, &batch],
    )
    .expect("claim")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn ack(c: &mut Client, job: (i64, i32)) -> bool {
    c.query_one("SELECT keel.ack($1, $2)", &[&job.0, &job.1])
        .expect("ack")
        .get(0)
}

/// A consumer's first claims run before any job exists (a fresh install: an empty, never
/// analyzed `keel.jobs`); 20,000 jobs arrive later and autovacuum never analyzes them. Its
/// claims must still use the claim index, not scan the table: no sequential scan of
/// `keel.jobs` from 60 claims.
fn a_claim_plan_made_on_an_empty_table_stays_an_index_scan(env: &Env) {
    let mut c = env.pg.fresh_database("keel_plan");
    exec(
        &mut c,
        "CREATE EXTENSION pg_keel;
         ALTER TABLE keel.jobs SET (autovacuum_enabled = false);
         SELECT keel.create_queue('plan')",
    );
    for _ in 0..10 {
        assert!(claim(&mut c, "plan", 1).is_empty());
        // The batch ack's plans too (a join: hashed over a scan of the table when planned on
        // an empty one).
        assert_eq!(
            one::<i64>(&mut c, "SELECT keel.ack_batch(ARRAY[-1], ARRAY[1])"),
            0
        );
        assert!(!ack(&mut c, (-1, 1)));
    }
    let mut producer = env.pg.connect_db("keel_plan");
    exec(
        &mut producer,
        "SELECT keel.enqueue_batch('plan', array_fill('{}'::jsonb, ARRAY[1000])) FROM generate_series(1, 20)",
    );
    let seq_scans = |c: &mut Client| -> i64 {
        exec(c, "SELECT pg_stat_force_next_flush()");
        one(
            c,
            "SELECT seq_scan FROM pg_stat_user_tables WHERE schemaname = 'keel' AND relname = 'jobs'",
        )
    };
    let before = seq_scans(&mut c);
    let started = Instant::now();
    for _ in 0..60 {
        let jobs = claim(&mut c, "plan", 1);
        assert_eq!(jobs.len(), 1);
        assert!(ack(&mut c, jobs[0]));
    }
    for _ in 0..20 {
        let (ids, attempts): (Vec<i64>, Vec<i32>) = claim(&mut c, "plan", 50).into_iter().unzip();
        let acked: i64 = c
            .query_one("SELECT keel.ack_batch($1, $2)", &[&ids, &attempts])
            .unwrap()
            .get(0);
        assert_eq!(acked, 50);
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    let after = seq_scans(&mut c);
    println!(
        "    60 claims and acks, 20 claims of 50 and ack_batch, among 20,000 jobs with plans made on an empty table: {:.1} ms each, {} seq scans",
        took.as_secs_f64() * 1000.0 / 80.0,
        after - before
    );
    assert_eq!(after - before, 0, "claims scanned keel.jobs sequentially");
    drop((c, producer));
    env.pg.drop_database("keel_plan");
}

/// Index blocks read (hit or read) of keel.jobs' claim index so far, as the statistics say.
fn claim_index_blocks(c: &mut Client) -> i64 {
    exec(c, "SELECT pg_stat_force_next_flush()");
    one(
        c,
        "SELECT idx_blks_hit + idx_blks_read FROM pg_statio_user_indexes
          WHERE schemaname = 'keel' AND indexrelname = 'jobs_claim_idx'",
    )
}

/// The index entries scans of `jobs_claim_idx` returned so far, dead ones included.
fn claim_index_entries(c: &mut Client) -> i64 {
    exec(c, "SELECT pg_stat_force_next_flush()");
    one(
        c,
        "SELECT idx_tup_read FROM pg_stat_user_indexes
          WHERE schemaname = 'keel' AND indexrelname = 'jobs_claim_idx'",
    )
}

/// With autovacuum off, 50,000 jobs claimed and acked leave their dead index entries at the
/// low end of the queue's range; a claim of 64 with 10 ready then reads about as many index
/// blocks as on a fresh queue (it starts at the queue's floor), where the same claim
/// statement without the floor walks all of them.
fn an_under_filled_claim_does_not_walk_what_churn_left_behind(env: &Env) {
    let mut c = env.pg.fresh_database("keel_floor");
    exec(
        &mut c,
        "CREATE EXTENSION pg_keel;
         ALTER TABLE keel.jobs SET (autovacuum_enabled = false);
         SELECT keel.create_queue('fresh'); SELECT keel.create_queue('churn')",
    );
    let under_filled = |c: &mut Client, queue: &str| -> i64 {
        exec(
            c,
            &format!("SELECT keel.enqueue_batch('{queue}', array_fill('{{}}'::jsonb, ARRAY[10]))"),
        );
        let before = claim_index_blocks(c);
        let jobs = claim(c, queue, 64);
        let blocks = claim_index_blocks(c) - before;
        assert_eq!(jobs.len(), 10);
        let (ids, attempts): (Vec<i64>, Vec<i32>) = jobs.into_iter().unzip();
        c.execute("SELECT keel.ack_batch($1, $2)", &[&ids, &attempts])
            .unwrap();
        blocks
    };
    under_filled(&mut c, "fresh");
    let fresh = under_filled(&mut c, "fresh");
    for _ in 0..50 {
        exec(
            &mut c,
            "SELECT keel.enqueue_batch('churn', array_fill('{}'::jsonb, ARRAY[1000]))",
        );
        loop {
            let jobs = claim(&mut c, "churn", 500);
            if jobs.is_empty() {
                break;
            }
            let (ids, attempts): (Vec<i64>, Vec<i32>) = jobs.into_iter().unzip();
            c.execute("SELECT keel.ack_batch($1, $2)", &[&ids, &attempts])
                .unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    under_filled(&mut c, "churn");
    let churned = under_filled(&mut c, "churn");
    // What the same claim reads without a floor: the whole range of the queue.
    exec(
        &mut c,
        "SELECT keel.enqueue_batch('churn', array_fill('{}'::jsonb, ARRAY[10]))",
    );
    let before = claim_index_blocks(&mut c);
    exec(
        &mut c,
        "SET enable_seqscan = off;
         SELECT count(*) FROM (SELECT job_id FROM keel.jobs
          WHERE queue = 'churn' AND state IN ('ready', 'running') AND visible_at <= now()
          ORDER BY priority, visible_at, job_id LIMIT 64) w;
         RESET enable_seqscan",
    );
    let whole = claim_index_blocks(&mut c) - before;
    println!(
        "    claim of 64 with 10 ready, index blocks: fresh queue {fresh}, after 50,000 jobs churned {churned}, the whole range {whole}"
    );
    // A claim that lands on a floor refresh (every 5 ms) or on the queue's whole look (every
    // 30 s) reads a few dozen blocks more: 22 to 34 after churn were seen where a fresh queue
    // read 12. The whole range is about a thousand.
    assert!(
        churned <= 4 * fresh + 8,
        "after churn {churned} blocks, fresh {fresh}"
    );
    assert!(
        whole > 10 * churned,
        "the churn left no dead entries? {whole}"
    );
    drop(c);
    env.pg.drop_database("keel_floor");
}

/// `claim` and `enqueue` write keel.jobs natively, without the executor: a trigger they would
/// not fire, FORCE ROW LEVEL SECURITY they would not apply, or a constraint they would not
/// check is refused (55000) rather than skipped, as is a read-only transaction (25006); each
/// refusal changes nothing.
fn native_claims_and_enqueues_refuse_what_they_would_skip(env: &Env) {
    let mut c = env.pg.fresh_database("keel_native");
    exec(
        &mut c,
        "CREATE EXTENSION pg_keel; SELECT keel.create_queue('native');
         SELECT keel.enqueue('native', '{}');
         CREATE FUNCTION public.nothing() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'",
    );
    let jobs = |c: &mut Client| -> (i64, i64) {
        (
            one(c, "SELECT count(*) FROM keel.jobs WHERE state = 'ready'"),
            one(c, "SELECT count(*) FROM keel.jobs"),
        )
    };
    let before = jobs(&mut c);
    let refused = [
        (
            "CREATE TRIGGER t BEFORE UPDATE ON keel.jobs FOR EACH ROW EXECUTE FUNCTION public.nothing()",
            "DROP TRIGGER t ON keel.jobs",
        ),
        (
            "CREATE TRIGGER t AFTER UPDATE ON keel.jobs FOR EACH STATEMENT EXECUTE FUNCTION public.nothing()",
            "DROP TRIGGER t ON keel.jobs",
        ),
        (
            "ALTER TABLE keel.jobs FORCE ROW LEVEL SECURITY",
            "ALTER TABLE keel.jobs NO FORCE ROW LEVEL SECURITY",
        ),
        (
            "ALTER TABLE keel.jobs ADD CONSTRAINT small CHECK (attempt < 100)",
            "ALTER TABLE keel.jobs DROP CONSTRAINT small",
        ),
    ];
    for (make, undo) in refused {
        exec(&mut c, make);
        assert_eq!(
            sqlstate(c.query("SELECT * FROM keel.claim('native')", &[])),
            Some("55000".into()),
            "claim with {make}"
        );
        exec(&mut c, undo);
        assert_eq!(jobs(&mut c), before, "{make} changed nothing");
    }
    exec(
        &mut c,
        "CREATE TRIGGER t BEFORE INSERT ON keel.jobs FOR EACH ROW EXECUTE FUNCTION public.nothing()",
    );
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT keel.enqueue('native', '{}')", "55000"),
            (
                "SELECT keel.enqueue_batch('native', ARRAY['{}'::jsonb, '{}'])",
                "55000",
            ),
        ],
    );
    exec(&mut c, "DROP TRIGGER t ON keel.jobs");
    expect_sqlstates(
        &mut c,
        &[
            (
                "BEGIN READ ONLY; SELECT * FROM keel.claim('native')",
                "25006",
            ),
            (
                "ROLLBACK; BEGIN READ ONLY; SELECT keel.enqueue('native', '{}')",
                "25006",
            ),
        ],
    );
    exec(&mut c, "ROLLBACK");
    assert_eq!(jobs(&mut c), before);
    // With all of it undone, both work again.
    assert_eq!(claim(&mut c, "native", 5).len(), 1);
    exec(&mut c, "SELECT keel.enqueue('native', '{}')");
    drop(c);
    env.pg.drop_database("keel_native");
}

/// One `enqueue_batch` gives its jobs one visible_at. Drained while a REPEATABLE READ snapshot
/// holds the xmin horizon, the entries of the jobs already claimed stay in the index at that
/// same visible_at, before the ones left; a claim near the end reads about as many index
/// entries as an early one (its floor carries the job_id), where the claim order's scan from
/// the start of that visible_at walks all of them.
fn a_drain_with_the_horizon_held_skips_what_it_claimed_from_one_batch(env: &Env) {
    let mut c = env.pg.fresh_database("keel_floor_tie");
    exec(
        &mut c,
        "CREATE EXTENSION pg_keel; SELECT keel.create_queue('tie');
         SELECT keel.enqueue_batch('tie', array_fill('{}'::jsonb, ARRAY[20000]))",
    );
    let mut reader = env.pg.connect_db("keel_floor_tie");
    exec(&mut reader, "BEGIN ISOLATION LEVEL REPEATABLE READ");
    one::<i64>(&mut reader, "SELECT count(*) FROM keel.jobs");
    let claim_entries = |c: &mut Client| -> (i64, usize) {
        let before = claim_index_entries(c);
        let jobs = claim(c, "tie", 200);
        let entries = claim_index_entries(c) - before;
        let n = jobs.len();
        let (ids, attempts): (Vec<i64>, Vec<i32>) = jobs.into_iter().unzip();
        c.execute("SELECT keel.ack_batch($1, $2)", &[&ids, &attempts])
            .unwrap();
        // Past the floor's refresh interval: every claim starts from a fresh floor.
        std::thread::sleep(Duration::from_millis(8));
        (entries, n)
    };
    claim_entries(&mut c);
    let (first, _) = claim_entries(&mut c);
    let mut drained = 400;
    while drained < 19_800 {
        drained += claim_entries(&mut c).1;
    }
    let (last, n) = claim_entries(&mut c);
    assert_eq!(n, 200);
    let before = claim_index_entries(&mut c);
    exec(
        &mut c,
        "SET enable_seqscan = off;
         SELECT count(*) FROM (SELECT job_id FROM keel.jobs
          WHERE queue = 'tie' AND state IN ('ready', 'running') AND visible_at <= now()
          ORDER BY priority, visible_at, job_id LIMIT 200) w;
         RESET enable_seqscan",
    );
    let whole = claim_index_entries(&mut c) - before;
    exec(&mut reader, "COMMIT");
    println!(
        "    claim of 200 from one batch of 20,000, horizon held, index entries: second {first}, last {last}, from the start of its visible_at {whole}"
    );
    assert!(last <= 2 * first, "last {last} entries, first {first}");
    assert!(whole > 20 * last, "no dead entries to skip? {whole}");
    drop((c, reader));
    env.pg.drop_database("keel_floor_tie");
}

/// Floors never hide a job: one enqueued by a transaction that stays open while others are
/// claimed past it, a retry due at once, a job revived after a restart made its queue's
/// priorities forgotten, and a queue with more priorities than floors are kept for.
fn the_claim_floor_passes_over_no_job(env: &Env) {
    let mut c = env.pg.connect();
    let mut late = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('floor-late', max_attempts => 1)",
    );
    let mut tx = late.transaction().unwrap();
    let late_id: i64 = tx
        .query_one("SELECT keel.enqueue('floor-late', '{\"late\": true}')", &[])
        .unwrap()
        .get(0);
    let started = Instant::now();
    let mut claimed = 0;
    while started.elapsed() < Duration::from_millis(400) {
        exec(
            &mut c,
            "SELECT keel.enqueue_batch('floor-late', array_fill('{}'::jsonb, ARRAY[20]))",
        );
        for job in claim(&mut c, "floor-late", 50) {
            assert_ne!(job.0, late_id);
            assert!(ack(&mut c, job));
            claimed += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(claimed > 0);
    tx.commit().unwrap();
    assert_eq!(
        claim(&mut c, "floor-late", 10),
        vec![(late_id, 1)],
        "the late job at once"
    );
    // A retry due at once.
    exec(&mut c, "SELECT keel.create_queue('floor-retry')");
    let id = one::<i64>(&mut c, "SELECT keel.enqueue('floor-retry', '{}')");
    assert_eq!(claim(&mut c, "floor-retry", 1), vec![(id, 1)]);
    assert_eq!(
        one::<String>(
            &mut c,
            &format!("SELECT keel.fail({id}, 1, 'x', retry_in => '0')")
        ),
        "retry"
    );
    assert_eq!(claim(&mut c, "floor-retry", 1), vec![(id, 2)]);
    // A dead job of a priority its queue has no other job of, revived after a restart.
    let dead = one::<i64>(
        &mut c,
        "SELECT keel.enqueue('floor-late', '{}', priority => 7)",
    );
    assert_eq!(claim(&mut c, "floor-late", 1), vec![(dead, 1)]);
    assert_eq!(
        one::<String>(&mut c, &format!("SELECT keel.fail({dead}, 1, 'x')")),
        "dead"
    );
    drop((c, late));
    env.pg.restart();
    let mut c = env.pg.connect();
    assert!(claim(&mut c, "floor-late", 1).is_empty());
    assert_eq!(
        one::<i64>(&mut c, "SELECT keel.retry_dead('floor-late')"),
        1
    );
    assert_eq!(claim(&mut c, "floor-late", 1), vec![(dead, 2)]);
    // A claim taken back by a rollback, after a second claim in its transaction (whose look
    // must not count the first one's uncommitted lease).
    exec(&mut c, "SELECT keel.create_queue('floor-rollback')");
    let id = one::<i64>(&mut c, "SELECT keel.enqueue('floor-rollback', '{}')");
    std::thread::sleep(Duration::from_millis(1200));
    exec(&mut c, "BEGIN");
    assert_eq!(claim(&mut c, "floor-rollback", 1), vec![(id, 1)]);
    std::thread::sleep(Duration::from_millis(100));
    assert!(claim(&mut c, "floor-rollback", 1).is_empty());
    exec(&mut c, "ROLLBACK");
    let mut other = env.pg.connect();
    assert_eq!(claim(&mut other, "floor-rollback", 1), vec![(id, 1)]);
    // An interval that compares as positive but lands in the past by the calendar starts now.
    let mixed = one::<i64>(
        &mut c,
        "SELECT keel.enqueue('floor-rollback', '{}', delay => '-1 month 30 days')",
    );
    assert!(one::<bool>(
        &mut c,
        &format!("SELECT visible_at >= enqueued_at FROM keel.jobs WHERE job_id = {mixed}")
    ));
    // Twelve priorities (floors are kept for eight): claimed in priority order all the same.
    exec(&mut c, "SELECT keel.create_queue('floor-many')");
    let mut ids: Vec<(i64, i32)> = Vec::new();
    for p in (0..12).rev() {
        let id = one::<i64>(
            &mut c,
            &format!("SELECT keel.enqueue('floor-many', '{{}}', priority => {p})"),
        );
        ids.push((id, p));
    }
    ids.sort_by_key(|(_, p)| *p);
    let got: Vec<i64> = claim(&mut c, "floor-many", 20)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, ids.iter().map(|(id, _)| *id).collect::<Vec<_>>());
}

/// The enqueues insert their rows without SQL: a CHECK constraint or an INSERT
/// trigger added to keel.jobs by hand would be skipped, so it is refused (55000) instead, and
/// nothing is inserted; a foreign key that references keel.jobs is fine. A transaction that
/// wrote jobs or dropped a queue cannot be prepared (0A000): its writes would become visible
/// in another session, after this one forgot them.
fn enqueue_refuses_what_its_direct_insert_would_skip_and_two_phase_commit(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('direct')");
    let count =
        |c: &mut Client| one::<i64>(c, "SELECT count(*) FROM keel.jobs WHERE queue = 'direct'");
    for (add, drop) in [
        (
            "ALTER TABLE keel.jobs ADD CONSTRAINT small_payloads CHECK (octet_length(payload::text) < 100)",
            "ALTER TABLE keel.jobs DROP CONSTRAINT small_payloads",
        ),
        (
            "CREATE FUNCTION public.no_jobs() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
             CREATE TRIGGER no_jobs BEFORE INSERT ON keel.jobs FOR EACH ROW EXECUTE FUNCTION public.no_jobs()",
            "DROP TRIGGER no_jobs ON keel.jobs; DROP FUNCTION public.no_jobs()",
        ),
    ] {
        exec(&mut c, add);
        expect_sqlstates(
            &mut c,
            &[
                ("SELECT keel.enqueue('direct', '{}')", "55000"),
                ("SELECT keel.enqueue_batch('direct', ARRAY['{}'::jsonb])", "55000"),
            ],
        );
        exec(&mut c, drop);
        assert_eq!(count(&mut c), 0);
    }
    exec(
        &mut c,
        "CREATE TABLE public.job_notes (job_id bigint REFERENCES keel.jobs (job_id) ON DELETE CASCADE, note text)",
    );
    let id = one::<i64>(&mut c, "SELECT keel.enqueue('direct', '{}')");
    exec(
        &mut c,
        &format!("INSERT INTO public.job_notes VALUES ({id}, 'ok')"),
    );
    exec(&mut c, "DROP TABLE public.job_notes");
    assert_eq!(count(&mut c), 1);
    // Two-phase commit.
    for sql in [
        "SELECT keel.enqueue('direct', '{}')",
        "SELECT keel.enqueue_batch('direct', ARRAY['{}'::jsonb])",
        "SELECT * FROM keel.claim('direct')",
        "SELECT keel.drop_queue('direct', force => true)",
    ] {
        exec(&mut c, "BEGIN");
        exec(&mut c, sql);
        assert_eq!(
            sqlstate(c.batch_execute("PREPARE TRANSACTION 'keel_2pc'")).as_deref(),
            Some("0A000"),
            "{sql}"
        );
        exec(&mut c, "ROLLBACK");
    }
    assert_eq!(count(&mut c), 1);
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM pg_prepared_xacts"),
        0
    );
}

/// `ack_batch` acks a claimed batch in one call: the pairs still held are completed (keyed
/// jobs stay done for their dedupe window), lost leases and repeats
/// count nothing, and bad arrays are 22023 and change nothing.
fn ack_batch_completes_a_claimed_batch_in_one_call(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('ab');
         SELECT keel.enqueue_batch('ab', array_fill('{}'::jsonb, ARRAY[20]));
         SELECT keel.enqueue('ab', '{}', idempotency_key => 'ab-key')",
    );
    let jobs = claim(&mut c, "ab", 21);
    assert_eq!(jobs.len(), 21);
    let (ids, attempts): (Vec<i64>, Vec<i32>) = jobs.iter().copied().unzip();
    let bad = [
        ("SELECT keel.ack_batch(NULL, ARRAY[1])", "22023"),
        ("SELECT keel.ack_batch(ARRAY[1, 2], ARRAY[1])", "22023"),
        (
            "SELECT keel.ack_batch(ARRAY[1, NULL], ARRAY[1, 1])",
            "22023",
        ),
    ];
    expect_sqlstates(&mut c, &bad);
    // Half of them with a wrong attempt: a lost lease, nothing done.
    let wrong: Vec<i32> = attempts.iter().map(|a| a + 1).collect();
    let none: i64 = c
        .query_one("SELECT keel.ack_batch($1, $2)", &[&ids, &wrong])
        .expect("ack_batch")
        .get(0);
    assert_eq!(none, 0);
    let acked: i64 = c
        .query_one("SELECT keel.ack_batch($1, $2)", &[&ids, &attempts])
        .expect("ack_batch")
        .get(0);
    assert_eq!(acked, 21);
    let again: i64 = c
        .query_one("SELECT keel.ack_batch($1, $2)", &[&ids, &attempts])
        .expect("ack_batch")
        .get(0);
    assert_eq!(again, 0, "a batch acks once");
    let left: String = one(
        &mut c,
        "SELECT string_agg(state, ',') FROM keel.jobs WHERE queue = 'ab'",
    );
    assert_eq!(left, "done", "only the keyed job stays, done");
    let completed: i64 = one(
        &mut c,
        "SELECT coalesce(completed_total, 21) FROM keel.queue_stats WHERE queue = 'ab'",
    );
    assert_eq!(completed, 21);
    let empty: i64 = one(&mut c, "SELECT keel.ack_batch('{}', '{}')");
    assert_eq!(empty, 0);
    // Both NULL (array_agg over no rows) is an empty batch.
    let none: i64 = one(
        &mut c,
        "SELECT keel.ack_batch(array_agg(job_id), array_agg(attempt)) FROM keel.claim('ab', 10)",
    );
    assert_eq!(none, 0);
    exec(&mut c, "SELECT keel.drop_queue('ab', force => true)");
}

fn create_queue_is_idempotent_and_keeps_settings(env: &Env) {
    let mut c = env.pg.connect();
    assert!(one::<bool>(
        &mut c,
        "SELECT keel.create_queue('cq', visibility_timeout => '7 s', max_attempts => 3)"
    ));
    assert!(!one::<bool>(
        &mut c,
        "SELECT keel.create_queue('cq', visibility_timeout => '9 s', max_attempts => 8)"
    ));
    let (vt, max): (String, i32) = {
        let r = c
            .query_one(
                "SELECT visibility_timeout::text, max_attempts FROM keel.queues WHERE queue = 'cq'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((vt.as_str(), max), ("00:00:07", 3));
    exec(&mut c, "SELECT keel.alter_queue('cq', max_attempts => 4)");
    let r = c
        .query_one(
            "SELECT visibility_timeout::text, max_attempts FROM keel.queues WHERE queue = 'cq'",
            &[],
        )
        .unwrap();
    assert_eq!(
        (r.get::<_, String>(0).as_str(), r.get::<_, i32>(1)),
        ("00:00:07", 4),
        "alter changes only what is given"
    );
}

fn bad_input_gets_a_sqlstate_and_changes_nothing(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('errs'); SELECT keel.enqueue('errs', '{}')",
    );
    exec(&mut c, "SELECT keel.create_queue('errs-full', max_ready => 1); SELECT keel.enqueue('errs-full', '{}')");
    let snapshot = |c: &mut Client| -> String {
        one(c, "SELECT (SELECT string_agg(format('%s', q), ';' ORDER BY queue) FROM keel.queues q)
                    || '|' || (SELECT string_agg(format('%s', j), ';' ORDER BY job_id) FROM keel.jobs j)")
    };
    let before = snapshot(&mut c);
    let cases: &[(&str, &str)] = &[
        // unknown queue
        ("SELECT keel.enqueue('nope', '{}')", "42704"),
        ("SELECT keel.enqueue_batch('nope', ARRAY['{}'::jsonb])", "42704"),
        ("SELECT * FROM keel.claim('nope')", "42704"),
        ("SELECT keel.pause_queue('nope')", "42704"),
        ("SELECT keel.resume_queue('nope')", "42704"),
        ("SELECT keel.purge_queue('nope')", "42704"),
        ("SELECT keel.alter_queue('nope', max_attempts => 2)", "42704"),
        ("SELECT keel.retry_dead('nope')", "42704"),
        // bad names and NULL names
        ("SELECT keel.create_queue('Bad Name')", "22023"),
        ("SELECT keel.create_queue('')", "22023"),
        ("SELECT keel.create_queue(NULL)", "22023"),
        ("SELECT keel.create_queue(repeat('a', 129))", "22023"),
        ("SELECT keel.create_queue('x; DROP TABLE keel.jobs')", "22023"),
        ("SELECT keel.enqueue('Bad Name', '{}')", "22023"),
        ("SELECT * FROM keel.claim('Bad Name')", "22023"),
        ("SELECT keel.drop_queue('Bad Name')", "22023"),
        // zero, negative and NULL settings
        ("SELECT keel.create_queue('e1', visibility_timeout => '0 s')", "22023"),
        ("SELECT keel.create_queue('e1', visibility_timeout => '-1 s')", "22023"),
        ("SELECT keel.create_queue('e1', visibility_timeout => NULL)", "22023"),
        ("SELECT keel.create_queue('e1', max_attempts => 0)", "22023"),
        ("SELECT keel.create_queue('e1', retry_backoff => '0 s')", "22023"),
        ("SELECT keel.create_queue('e1', retry_backoff => '10 s', retry_backoff_max => '1 s')", "22023"),
        ("SELECT keel.create_queue('e1', max_ready => 0)", "22023"),
        ("SELECT keel.create_queue('e1', dedupe_window => '-1 h')", "22023"),
        ("SELECT keel.alter_queue('errs', visibility_timeout => '0 s')", "22023"),
        ("SELECT keel.alter_queue('errs', retry_backoff => '1 h')", "22023"),
        // enqueue arguments
        ("SELECT keel.enqueue('errs', NULL)", "22023"),
        ("SELECT keel.enqueue('errs', '{}', delay => '-1 s')", "22023"),
        ("SELECT keel.enqueue('errs', '{}', delay => NULL)", "22023"),
        ("SELECT keel.enqueue('errs', '{}', priority => NULL)", "22023"),
        ("SELECT keel.enqueue('errs', '{}', max_attempts => 0)", "22023"),
        ("SELECT keel.enqueue('errs', '{}', idempotency_key => '')", "22023"),
        ("SELECT keel.enqueue('errs', jsonb_build_object('blob', repeat('x', 2000000)))", "54000"),
        ("SELECT keel.enqueue_batch('errs', NULL)", "22023"),
        ("SELECT keel.enqueue_batch('errs', ARRAY['{}'::jsonb, NULL])", "22023"),
        ("SELECT keel.enqueue_batch('errs', ARRAY[jsonb_build_object('blob', repeat('x', 2000000))])", "54000"),
        // backpressure
        ("SELECT keel.enqueue('errs-full', '{}')", "53400"),
        ("SELECT keel.enqueue_batch('errs-full', ARRAY['{}'::jsonb])", "53400"),
        // claim, fail, extend, reap arguments
        ("SELECT * FROM keel.claim('errs', 0)", "22023"),
        ("SELECT * FROM keel.claim('errs', -1)", "22023"),
        ("SELECT * FROM keel.claim('errs', NULL)", "22023"),
        ("SELECT * FROM keel.claim('errs', 100001)", "22023"),
        ("SELECT * FROM keel.claim('errs', 1, visibility_timeout => '0 s')", "22023"),
        ("SELECT keel.fail(1, 1, 'x', retry_in => '-1 s')", "22023"),
        ("SELECT keel.extend(1, 1, '0 s')", "22023"),
        ("SELECT keel.extend(1, 1, NULL)", "22023"),
        ("SELECT keel.reap_expired(0)", "22023"),
        // drop of a non-empty queue
        ("SELECT keel.drop_queue('errs')", "55006"),
        // grants to unknown roles
        ("SELECT keel.grant_producer('no_such_role')", "42704"),
    ];
    keel_pg_test::expect_sqlstates(&mut c, cases);
    assert_eq!(snapshot(&mut c), before, "a refused call changed something");

    // The messages carry a hint a user can act on.
    let err = c
        .batch_execute("SELECT keel.enqueue('nope', '{}')")
        .unwrap_err();
    let db = err.as_db_error().expect("db error");
    assert!(
        db.message().contains("\"nope\" does not exist"),
        "{}",
        db.message()
    );
    assert!(
        db.hint().unwrap_or("").contains("keel.create_queue"),
        "{:?}",
        db.hint()
    );
}

fn enqueue_claim_ack_round_trip(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('rt')");
    let id: i64 = one(
        &mut c,
        "SELECT keel.enqueue('rt', '{\"to\":\"a@example.com\"}')",
    );
    let rows = c
        .query("SELECT job_id, attempt, payload, priority, enqueued_at <= now(), lease_expires_at > now() + interval '29 s'
                  FROM keel.claim('rt', 5, worker => 'w1')", &[])
        .unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.get::<_, i64>(0), id);
    assert_eq!(r.get::<_, i32>(1), 1);
    assert_eq!(
        r.get::<_, serde_json::Value>(2),
        serde_json::json!({"to": "a@example.com"})
    );
    assert_eq!(r.get::<_, i32>(3), 0);
    assert!(
        r.get::<_, bool>(4) && r.get::<_, bool>(5),
        "lease uses the queue's 30 s visibility timeout"
    );
    assert!(
        claim(&mut c, "rt", 5).is_empty(),
        "a leased job is not handed out again"
    );
    assert!(ack(&mut c, (id, 1)));
    assert!(
        !ack(&mut c, (id, 1)),
        "second ack of the same lease is false"
    );
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM keel.jobs WHERE queue = 'rt'"),
        0,
        "acked job without key is deleted"
    );
}

fn enqueue_batch_returns_ids_in_input_order(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('batch')");
    let rows = c
        .query("SELECT id FROM keel.enqueue_batch('batch', ARRAY['{\"n\":1}', '{\"n\":2}', '{\"n\":3}']::jsonb[]) AS id", &[])
        .unwrap();
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids.len(), 3);
    for (i, id) in ids.iter().enumerate() {
        let n: String = c
            .query_one(
                "SELECT payload->>'n' FROM keel.jobs WHERE job_id = $1",
                &[id],
            )
            .unwrap()
            .get(0);
        assert_eq!(n, (i + 1).to_string());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let none: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.enqueue_batch('batch', '{}')",
    );
    assert_eq!(none, 0);
}

fn fail_retries_with_backoff_then_dies(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('fl', max_attempts => 3, retry_backoff => '10 s', retry_backoff_max => '15 s')");
    let id: i64 = one(&mut c, "SELECT keel.enqueue('fl', '{}')");
    let job = claim(&mut c, "fl", 1)[0];
    let outcome: String = c
        .query_one(
            "SELECT keel.fail($1, $2, 'smtp timeout')",
            &[&job.0, &job.1],
        )
        .unwrap()
        .get(0);
    assert_eq!(outcome, "retry");
    let (delay, err): (f64, String) = {
        let r = c
            .query_one("SELECT extract(epoch FROM visible_at - clock_timestamp())::float8, last_error FROM keel.jobs WHERE job_id = $1", &[&id])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        (7.0..=10.0).contains(&delay),
        "first retry after ~10 s minus jitter, got {delay}"
    );
    assert_eq!(err, "smtp timeout");
    assert!(claim(&mut c, "fl", 1).is_empty(), "not before the backoff");
    // Second failure: backoff doubles but is capped at 15 s.
    exec(
        &mut c,
        &format!("UPDATE keel.jobs SET visible_at = now() WHERE job_id = {id}"),
    );
    let job = claim(&mut c, "fl", 1)[0];
    assert_eq!(job.1, 2);
    let outcome: String = c
        .query_one("SELECT keel.fail($1, $2, 'again')", &[&job.0, &job.1])
        .unwrap()
        .get(0);
    assert_eq!(outcome, "retry");
    let delay: f64 = c
        .query_one("SELECT extract(epoch FROM visible_at - clock_timestamp())::float8 FROM keel.jobs WHERE job_id = $1", &[&id])
        .unwrap()
        .get(0);
    assert!(
        (11.0..=15.0).contains(&delay),
        "capped at 15 s, got {delay}"
    );
    // Third and last attempt: retry_in overrides the backoff; then the failure is final.
    exec(
        &mut c,
        &format!("UPDATE keel.jobs SET visible_at = now() WHERE job_id = {id}"),
    );
    let job = claim(&mut c, "fl", 1)[0];
    assert_eq!(job.1, 3);
    let outcome: String = c
        .query_one("SELECT keel.fail($1, $2, 'final')", &[&job.0, &job.1])
        .unwrap()
        .get(0);
    assert_eq!(outcome, "dead");
    let r = c
        .query_one(
            "SELECT state, last_error, dead_reason FROM keel.jobs WHERE job_id = $1",
            &[&id],
        )
        .unwrap();
    assert_eq!(
        (
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2)
        ),
        ("dead".into(), "final".into(), "failed".into())
    );
    assert!(
        claim(&mut c, "fl", 1).is_empty(),
        "dead jobs are never handed out"
    );
    let lost: Option<String> = c
        .query_one("SELECT keel.fail($1, $2)", &[&job.0, &job.1])
        .unwrap()
        .get(0);
    assert_eq!(
        lost, None,
        "fail on a job that is no longer leased returns NULL"
    );
    // retry_dead: back to ready with its tries again (retry_in = 0 makes it claimable at
    // once), under attempt numbers never handed out before.
    assert_eq!(one::<i64>(&mut c, "SELECT keel.retry_dead('fl')"), 1);
    let job = claim(&mut c, "fl", 1)[0];
    assert_eq!(job, (id, 4));
    let outcome: String = c
        .query_one(
            "SELECT keel.fail($1, $2, retry_in => '0 s')",
            &[&job.0, &job.1],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        outcome, "retry",
        "a revived job's tries are counted again from zero"
    );
    assert_eq!(claim(&mut c, "fl", 1), vec![(id, 5)]);
}

/// `snooze` ends the lease and puts the job back after its delay with the try not counted:
/// with max_attempts 1, a job snoozed twice still gets its one try; fenced like `fail` (a
/// stale or repeated call, another role's lease: false, nothing changed); bad delays 22023.
fn snooze_gives_a_job_back_without_using_a_try(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('sz', max_attempts => 1)");
    let id: i64 = one(&mut c, "SELECT keel.enqueue('sz', '{}')");
    let first = claim(&mut c, "sz", 1)[0];
    let snoozed: bool = c
        .query_one(
            "SELECT keel.snooze($1, $2, '1 hour')",
            &[&first.0, &first.1],
        )
        .unwrap()
        .get(0);
    assert!(snoozed);
    let row = c
        .query_one(
            "SELECT state, extract(epoch FROM visible_at - clock_timestamp())::float8,
                    attempt - attempt_base, worker IS NULL
               FROM keel.jobs WHERE job_id = $1",
            &[&id],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ready");
    let delay: f64 = row.get(1);
    assert!((3590.0..=3600.0).contains(&delay), "{delay}");
    assert_eq!(row.get::<_, i32>(2), 0, "the try is not counted");
    assert!(row.get::<_, bool>(3));
    assert!(claim(&mut c, "sz", 1).is_empty(), "not before its delay");
    // The same lease again, or acked after the snooze: refused, nothing changed.
    for sql in [
        "SELECT keel.snooze($1, $2, '0 s')",
        "SELECT keel.ack($1, $2)",
    ] {
        let done: bool = c.query_one(sql, &[&first.0, &first.1]).unwrap().get(0);
        assert!(!done, "{sql} with the snoozed lease");
    }
    assert_eq!(
        one::<String>(
            &mut c,
            &format!("SELECT state FROM keel.jobs WHERE job_id = {id}")
        ),
        "ready"
    );
    // Snoozed for 0 s: claimable at once, under a new attempt, still with its one try.
    exec(
        &mut c,
        &format!("UPDATE keel.jobs SET visible_at = now() WHERE job_id = {id}"),
    );
    let second = claim(&mut c, "sz", 1)[0];
    assert_eq!(second, (id, 2));
    let again: bool = c
        .query_one("SELECT keel.snooze($1, $2, '0 s')", &[&second.0, &second.1])
        .unwrap()
        .get(0);
    assert!(again);
    let third = claim(&mut c, "sz", 1)[0];
    assert_eq!(third, (id, 3), "a zero delay hands it out again at once");
    let outcome: String = c
        .query_one(
            "SELECT keel.fail($1, $2, 'real failure')",
            &[&third.0, &third.1],
        )
        .unwrap()
        .get(0);
    assert_eq!(outcome, "dead", "the one real try was the last");
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT keel.snooze(1, 1, '-1 s')", "22023"),
            ("SELECT keel.snooze(1, 1, NULL)", "22023"),
            ("SELECT keel.snooze(1, 1, '200 years')", "22023"),
        ],
    );
    // Another role cannot snooze a lease it does not hold; a consumer of the queue can
    // snooze its own.
    exec(
        &mut c,
        "DROP ROLE IF EXISTS sz_a; DROP ROLE IF EXISTS sz_b;
         CREATE ROLE sz_a LOGIN; CREATE ROLE sz_b LOGIN;
         SELECT keel.grant_consumer('sz_a', queues => '{sz}');
         SELECT keel.grant_consumer('sz_b', queues => '{sz}');
         SELECT keel.enqueue('sz', '{}')",
    );
    let mut a = env.pg.connect_as("sz_a");
    let mut b = env.pg.connect_as("sz_b");
    let lease = claim(&mut a, "sz", 1)[0];
    let stolen: bool = b
        .query_one("SELECT keel.snooze($1, $2, '0 s')", &[&lease.0, &lease.1])
        .unwrap()
        .get(0);
    assert!(!stolen, "another role's lease");
    let own: bool = a
        .query_one("SELECT keel.snooze($1, $2, '0 s')", &[&lease.0, &lease.1])
        .unwrap()
        .get(0);
    assert!(own);
    drop(a);
    drop(b);
    exec(
        &mut c,
        "SELECT keel.revoke_all('sz_a'); SELECT keel.revoke_all('sz_b');
         DROP OWNED BY sz_a, sz_b; DROP ROLE sz_a; DROP ROLE sz_b;
         SELECT keel.purge_queue('sz')",
    );
}

fn progress(c: &mut Client, lease: (i64, i32), report: &str) -> bool {
    c.query_one(
        "SELECT keel.progress($1, $2, $3::text::jsonb)",
        &[&lease.0, &lease.1, &report],
    )
    .expect("progress")
    .get(0)
}

/// `progress`: the holder's report is kept on the job (the last one wins) and across a
/// retry; a stale lease, another role's lease or a finished job get false and change
/// nothing; NULL is 22023, a report over keel.max_payload_bytes 54000.
fn progress_is_kept_on_the_job_and_fenced_by_the_lease(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('pg-progress')");
    let id: i64 = one(&mut c, "SELECT keel.enqueue('pg-progress', '{}')");
    let first = claim(&mut c, "pg-progress", 1)[0];
    assert!(progress(&mut c, first, r#"{"rows": 10}"#));
    assert!(progress(&mut c, first, r#"{"rows": 20, "of": 100}"#));
    let kept = |c: &mut Client| -> Option<String> {
        c.query_one(
            "SELECT progress::text FROM keel.jobs WHERE job_id = $1",
            &[&id],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(kept(&mut c).as_deref(), Some(r#"{"of": 100, "rows": 20}"#));
    let f: String = one(
        &mut c,
        &format!("SELECT keel.fail({id}, {}, 'x', '0 s')", first.1),
    );
    assert_eq!(f, "retry");
    assert!(!progress(&mut c, first, r#"{"rows": 99}"#), "a stale lease");
    let second = claim(&mut c, "pg-progress", 1)[0];
    assert_eq!(
        kept(&mut c).as_deref(),
        Some(r#"{"of": 100, "rows": 20}"#),
        "kept across the retry, for the next attempt to resume"
    );
    exec(
        &mut c,
        "DROP ROLE IF EXISTS keel_prog_b; CREATE ROLE keel_prog_b LOGIN;
         SELECT keel.grant_consumer('keel_prog_b', queues => '{pg-progress}')",
    );
    let mut b = env.pg.connect_as("keel_prog_b");
    assert!(!progress(&mut b, second, "{}"), "another role's lease");
    drop(b);
    assert!(ack(&mut c, second));
    assert!(!progress(&mut c, second, "{}"), "a finished job");
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT keel.progress(1, 1, NULL)", "22023"),
            (
                "SELECT keel.progress(1, 1, jsonb_build_object('blob', repeat('x', 2000000)))",
                "54000",
            ),
        ],
    );
    exec(
        &mut c,
        "SELECT keel.revoke_all('keel_prog_b'); DROP OWNED BY keel_prog_b; DROP ROLE keel_prog_b",
    );
}

fn cancel(c: &mut Client, job_id: i64, reason: Option<&str>) -> Option<String> {
    c.query_one("SELECT keel.cancel($1, $2)", &[&job_id, &reason])
        .expect("cancel")
        .get(0)
}

/// `cancel`: a ready, a delayed and a retry-scheduled job become cancelled at once and are
/// never claimed; a running one too, and its holder's extend gets NULL, its ack false, its
/// fail NULL and its snooze false; done and dead jobs stay as they are (the call says so);
/// an unknown id gives NULL. `cancel_queue` takes every waiting job of a queue and leaves the
/// running ones. Cancelled jobs show in queue_stats and metrics, keep their key taken and
/// their reason, and leave with the cleanup after the dedupe window. Producers of the queue
/// may cancel; a producer of another queue gets NULL (as for no such job), a consumer 42501.
fn cancel_ends_waiting_and_running_jobs_and_leaves_finished_ones(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('cx', max_attempts => 2, retry_backoff => '1 hour',
                                  retry_backoff_max => '1 hour')",
    );
    let ready: i64 = one(&mut c, "SELECT keel.enqueue('cx', '{}', priority => 5)");
    let delayed: i64 = one(
        &mut c,
        "SELECT keel.enqueue('cx', '{}', delay => '1 hour', idempotency_key => 'cx-key')",
    );
    let retrying: i64 = one(&mut c, "SELECT keel.enqueue('cx', '{}', priority => -2)");
    let running: i64 = one(&mut c, "SELECT keel.enqueue('cx', '{}', priority => -1)");
    let done: i64 = one(
        &mut c,
        "SELECT keel.enqueue('cx', '{}', priority => -3, idempotency_key => 'cx-done')",
    );
    let dead: i64 = one(
        &mut c,
        "SELECT keel.enqueue('cx', '{}', priority => -4, max_attempts => 1)",
    );
    let leases = claim(&mut c, "cx", 4);
    let lease_of = |id: i64| *leases.iter().find(|l| l.0 == id).expect("claimed");
    assert!(ack(&mut c, lease_of(done)));
    let f: String = one(
        &mut c,
        &format!("SELECT keel.fail({dead}, {}, 'x')", lease_of(dead).1),
    );
    assert_eq!(f, "dead");
    let f: String = one(
        &mut c,
        &format!(
            "SELECT keel.fail({retrying}, {}, 'x')",
            lease_of(retrying).1
        ),
    );
    assert_eq!(f, "retry");
    let held = lease_of(running);

    for id in [ready, delayed, retrying] {
        assert_eq!(cancel(&mut c, id, None).as_deref(), Some("cancelled"));
    }
    assert_eq!(
        cancel(&mut c, running, Some("customer left")).as_deref(),
        Some("cancelled")
    );
    assert_eq!(cancel(&mut c, done, None).as_deref(), Some("done"));
    assert_eq!(cancel(&mut c, dead, None).as_deref(), Some("dead"));
    assert_eq!(
        cancel(&mut c, ready, None).as_deref(),
        Some("cancelled"),
        "again"
    );
    assert_eq!(cancel(&mut c, i64::MAX, None), None);
    // The holder of the running job learns it: the lease is gone.
    let extended: Option<std::time::SystemTime> = c
        .query_one("SELECT keel.extend($1, $2, '1 min')", &[&held.0, &held.1])
        .unwrap()
        .get(0);
    assert_eq!(extended, None);
    assert!(!ack(&mut c, held));
    let failed: Option<String> = c
        .query_one("SELECT keel.fail($1, $2)", &[&held.0, &held.1])
        .unwrap()
        .get(0);
    assert_eq!(failed, None);
    let snoozed: bool = c
        .query_one("SELECT keel.snooze($1, $2, '0 s')", &[&held.0, &held.1])
        .unwrap()
        .get(0);
    assert!(!snoozed);
    exec(
        &mut c,
        "UPDATE keel.jobs SET visible_at = now() WHERE queue = 'cx'",
    );
    assert!(
        claim(&mut c, "cx", 10).is_empty(),
        "a cancelled job is never claimed"
    );
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'cancelled'),
                    count(*) FILTER (WHERE state = 'cancelled' AND finished_at IS NOT NULL),
                    max(dead_reason) FILTER (WHERE job_id = $1),
                    max(dead_reason) FILTER (WHERE job_id = $2)
               FROM keel.jobs WHERE queue = 'cx'",
            &[&running, &ready],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 4);
    assert_eq!(row.get::<_, i64>(1), 4);
    assert_eq!(row.get::<_, String>(2), "customer left");
    assert_eq!(row.get::<_, String>(3), "cancelled");
    let (stats, metric): (i64, bool) = {
        let r = c
            .query_one(
                "SELECT cancelled, keel.metrics() LIKE '%keel_queue_jobs{%queue=\"cx\",state=\"cancelled\"} 4%'
                   FROM keel.queue_stats WHERE queue = 'cx'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(stats, 4);
    assert!(metric, "keel_queue_jobs counts them");
    // The key of a cancelled job stays taken until its window ends, then the cleanup frees it.
    let again: i64 = one(
        &mut c,
        "SELECT keel.enqueue('cx', '{}', idempotency_key => 'cx-key')",
    );
    assert_eq!(again, delayed);
    exec(
        &mut c,
        "UPDATE keel.jobs SET enqueued_at = enqueued_at - interval '25 hours'
          WHERE queue = 'cx' AND state = 'cancelled'",
    );
    let removed: i64 = one(&mut c, "SELECT keel.cleanup_done_jobs(1000)");
    assert!(removed >= 4, "{removed}");
    let fresh: i64 = one(
        &mut c,
        "SELECT keel.enqueue('cx', '{}', idempotency_key => 'cx-key')",
    );
    assert_ne!(fresh, delayed);

    // cancel_queue: the waiting ones, not the running one.
    let waiting: Vec<i64> = (0..3)
        .map(|i| {
            one(
                &mut c,
                &format!("SELECT keel.enqueue('cx', '{{}}', delay => '{i} minutes')"),
            )
        })
        .collect();
    let busy = claim(&mut c, "cx", 1)[0];
    let n: i64 = one(&mut c, "SELECT keel.cancel_queue('cx', 'shutting down')");
    assert_eq!(n, 3, "the fresh job and the two delayed ones: {waiting:?}");
    assert!(ack(&mut c, busy), "the running job was left to finish");

    // Who may cancel: the queue's producers.
    exec(
        &mut c,
        "DROP ROLE IF EXISTS cx_p; DROP ROLE IF EXISTS cx_other; DROP ROLE IF EXISTS cx_c;
         CREATE ROLE cx_p LOGIN; CREATE ROLE cx_other LOGIN; CREATE ROLE cx_c LOGIN;
         SELECT keel.grant_producer('cx_p', queues => '{cx}');
         SELECT keel.grant_producer('cx_other', queues => '{cy}');
         SELECT keel.grant_consumer('cx_c', queues => '{cx}');",
    );
    let job: i64 = one(&mut c, "SELECT keel.enqueue('cx', '{}')");
    // A producer of another queue is answered as if the job did not exist; a consumer has no
    // cancel at all; neither changes the job.
    let mut other = env.pg.connect_as("cx_other");
    assert_eq!(cancel(&mut other, job, None), None);
    assert_eq!(
        sqlstate(other.batch_execute("SELECT keel.cancel_queue('cx')")).as_deref(),
        Some("42501")
    );
    let mut consumer = env.pg.connect_as("cx_c");
    assert_eq!(
        sqlstate(consumer.query_one("SELECT keel.cancel($1)", &[&job])).as_deref(),
        Some("42501")
    );
    assert_eq!(
        sqlstate(consumer.batch_execute("SELECT keel.cancel_queue('cx')")).as_deref(),
        Some("42501")
    );
    drop((other, consumer));
    assert_eq!(
        one::<String>(
            &mut c,
            &format!("SELECT state FROM keel.jobs WHERE job_id = {job}")
        ),
        "ready"
    );
    let mut p = env.pg.connect_as("cx_p");
    assert_eq!(cancel(&mut p, job, None).as_deref(), Some("cancelled"));
    assert_eq!(one::<i64>(&mut p, "SELECT keel.cancel_queue('cx')"), 0);
    drop(p);
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT keel.cancel(NULL)", "22023"),
            ("SELECT keel.cancel(1, repeat('x', 1025))", "22023"),
            ("SELECT keel.cancel_queue('Bad Name')", "22023"),
            ("SELECT keel.cancel_queue('no-such-queue')", "42704"),
            ("SELECT keel.cancel_queue('cx', repeat('x', 1025))", "22023"),
            ("SELECT keel._cancel(1, 1, NULL)", "42501"),
        ],
    );
    exec(
        &mut c,
        "SELECT keel.revoke_all(r) FROM unnest(ARRAY['cx_p', 'cx_other', 'cx_c']::regrole[]) r;
         DROP OWNED BY cx_p, cx_other, cx_c; DROP ROLE cx_p; DROP ROLE cx_other; DROP ROLE cx_c;
         SELECT keel.purge_queue('cx')",
    );
}

/// 8 rounds of 50 claimed jobs, each acked by one connection and cancelled by another at the
/// same time, in opposite orders: every job ends with exactly one winner — acked (true; cancel
/// says 'done' or NULL, the job gone) or cancelled ('cancelled'; ack false).
fn cancel_racing_ack_has_exactly_one_winner(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('cx-race')");
    let (mut acked, mut cancelled) = (0, 0);
    for _ in 0..8 {
        exec(
            &mut c,
            "SELECT keel.enqueue('cx-race', jsonb_build_object('n', g)) FROM generate_series(1, 50) g",
        );
        let leases = claim(&mut c, "cx-race", 50);
        assert_eq!(leases.len(), 50);
        let to_ack = leases.clone();
        let mut a = env.pg.connect();
        let acker = std::thread::spawn(move || {
            to_ack
                .iter()
                .map(|l| ack(&mut a, *l))
                .collect::<Vec<bool>>()
        });
        let mut b = env.pg.connect();
        let mut said: Vec<Option<String>> = leases
            .iter()
            .rev()
            .map(|l| cancel(&mut b, l.0, Some("race")))
            .collect();
        said.reverse();
        let acks = acker.join().expect("acker");
        for ((lease, acked_it), cancel_said) in leases.iter().zip(&acks).zip(&said) {
            let state: Option<String> = c
                .query_opt("SELECT state FROM keel.jobs WHERE job_id = $1", &[&lease.0])
                .unwrap()
                .map(|r| r.get(0));
            match (acked_it, cancel_said.as_deref(), state.as_deref()) {
                (true, None | Some("done"), None) => acked += 1,
                (false, Some("cancelled"), Some("cancelled")) => cancelled += 1,
                other => panic!("job {}: ack, cancel, state = {other:?}", lease.0),
            }
        }
    }
    println!("    400 jobs, ack racing cancel: {acked} acked, {cancelled} cancelled, none both");
    assert_eq!(acked + cancelled, 400);
    exec(&mut c, "SELECT keel.purge_queue('cx-race')");
}

fn replace(c: &mut Client, queue: &str, key: &str, payload: &str, delay: &str) -> i64 {
    c.query_one(
        "SELECT keel.enqueue($1, $2::text::jsonb, delay => $4::text::interval,
                             idempotency_key => $3, on_duplicate => 'replace')",
        &[&queue, &payload, &key, &delay],
    )
    .expect("enqueue with replace")
    .get(0)
}

fn replace_updates_a_waiting_job_and_debounces(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('rp')");
    // Debounce: five calls in a row, each pushing the run time 2 s past itself: one job, the
    // last payload, due 2 s after the last call.
    let first = replace(&mut c, "rp", "typing", "{\"v\": 0}", "2 seconds");
    for v in 1..5 {
        let id = replace(
            &mut c,
            "rp",
            "typing",
            &format!("{{\"v\": {v}}}"),
            "2 seconds",
        );
        assert_eq!(id, first, "the same job, replaced");
    }
    let (jobs, payload, due_in): (i64, serde_json::Value, f64) = {
        let r = c
            .query_one(
                "SELECT count(*) OVER (), payload,
                        extract(epoch FROM visible_at - clock_timestamp())::float8
                   FROM keel.jobs WHERE queue = 'rp'",
                &[],
            )
            .expect("the job");
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(jobs, 1);
    assert_eq!(payload, serde_json::json!({"v": 4}));
    assert!(due_in > 1.0 && due_in <= 2.0, "due {due_in} s from now");
    assert!(
        claim(&mut c, "rp", 1).is_empty(),
        "not before its new run time"
    );
    // Replaced to run now, with a priority: claimable at once, with what the last call said.
    let id: i64 = one(
        &mut c,
        "SELECT keel.enqueue('rp', '{\"v\": 5}', priority => -1, idempotency_key => 'typing',
                             on_duplicate => 'replace')",
    );
    assert_eq!(id, first);
    let lease = {
        let r = c
            .query_one(
                "SELECT job_id, attempt, payload, priority FROM keel.claim('rp')",
                &[],
            )
            .expect("claim");
        let (p, pr): (serde_json::Value, i32) = (r.get(2), r.get(3));
        assert_eq!((p, pr), (serde_json::json!({"v": 5}), -1));
        (r.get::<_, i64>(0), r.get::<_, i32>(1))
    };
    // A running job is never replaced: its id comes back, nothing changes, nothing is added.
    assert_eq!(replace(&mut c, "rp", "typing", "{\"v\": 6}", "0"), first);
    assert!(ack(&mut c, lease));
    // Nor a finished one (within the dedupe window, the key stays taken).
    assert_eq!(replace(&mut c, "rp", "typing", "{\"v\": 7}", "0"), first);
    let (state, payload, jobs): (String, serde_json::Value, i64) = {
        let r = c
            .query_one(
                "SELECT state, payload, count(*) OVER () FROM keel.jobs WHERE queue = 'rp'",
                &[],
            )
            .expect("done job");
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((state.as_str(), jobs), ("done", 1));
    assert_eq!(
        payload,
        serde_json::json!({"v": 5}),
        "the held and finished job unchanged"
    );
    // A key nobody holds: 'replace' inserts, like 'ignore'.
    let fresh = replace(&mut c, "rp", "other", "{}", "0");
    assert_ne!(fresh, first);
    let before: i64 = one(&mut c, "SELECT count(*) FROM keel.jobs");
    expect_sqlstates(
        &mut c,
        &[
            ("SELECT keel.enqueue('rp', '{}', idempotency_key => 'k', on_duplicate => 'merge')", "22023"),
            ("SELECT keel.enqueue('rp', '{}', idempotency_key => 'k', on_duplicate => NULL)", "22023"),
            ("SELECT keel.enqueue('rp', '{}', on_duplicate => 'replace')", "22023"),
            ("SELECT keel.enqueue('rp', '{}', idempotency_key => repeat('k', 1025))", "22023"),
            ("SELECT keel.enqueue('rp', '{}', idempotency_key => repeat('é', 513), on_duplicate => 'replace')", "22023"),
            ("SELECT keel.enqueue('nope', '{}', idempotency_key => 'k', on_duplicate => 'replace')", "42704"),
        ],
    );
    let after: i64 = one(&mut c, "SELECT count(*) FROM keel.jobs");
    assert_eq!(before, after, "refused enqueues added nothing");
    let longest: i64 = one(
        &mut c,
        "SELECT keel.enqueue('rp', '{}', idempotency_key => repeat('k', 1024))",
    );
    assert!(longest > 0, "a key of 1024 bytes is taken");
    exec(&mut c, "SELECT keel.drop_queue('rp', force => true)");
}

/// The key's first two replaces at once: the second waits for the first's insert, then
/// replaces it (one job, the later payload).
fn two_first_replaces_of_a_key_keep_the_later_payload(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('rp-first')");
    let mut first = env.pg.connect();
    let mut tx = first.transaction().expect("begin");
    let id1: i64 = tx
        .query_one(
            "SELECT keel.enqueue('rp-first', '{\"v\": 1}', idempotency_key => 'new',
                                 on_duplicate => 'replace')",
            &[],
        )
        .expect("first")
        .get(0);
    let mut second = env.pg.connect();
    let later = std::thread::spawn(move || -> i64 {
        second
            .query_one(
                "SELECT keel.enqueue('rp-first', '{\"v\": 2}', idempotency_key => 'new',
                                     on_duplicate => 'replace')",
                &[],
            )
            .expect("second")
            .get(0)
    });
    std::thread::sleep(Duration::from_millis(300));
    tx.commit().expect("commit");
    let id2 = later.join().expect("second caller");
    assert_eq!(id1, id2, "one job");
    let payload: serde_json::Value = one(
        &mut c,
        "SELECT payload FROM keel.jobs WHERE queue = 'rp-first'",
    );
    assert_eq!(
        payload,
        serde_json::json!({"v": 2}),
        "the later call's payload"
    );
    // ack of NULLs answers NULL, as 0.1.0's strict ack did.
    let nothing: Option<bool> = one(&mut c, "SELECT keel.ack(NULL, 1)");
    assert_eq!(nothing, None);
    exec(&mut c, "SELECT keel.drop_queue('rp-first', force => true)");
}

/// 4 producers keep replacing the payload of each key's job while 4 consumers claim: a job a
/// consumer holds (or has finished) keeps the payload the consumer was handed.
fn replace_racing_claim_never_changes_a_held_job(env: &Env) {
    const KEYS: i32 = 40;
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('rp-race')");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let mut c = env.pg.connect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut v = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    v += 1;
                    for k in 0..KEYS {
                        c.execute(
                            "SELECT keel.enqueue('rp-race', jsonb_build_object('p', $1::int, 'v', $2::int),
                                                 idempotency_key => 'k' || $3::int,
                                                 on_duplicate => 'replace')",
                            &[&p, &v, &k],
                        )
                        .expect("replace");
                    }
                }
            })
        })
        .collect();
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let mut c = env.pg.connect();
            std::thread::spawn(move || {
                let mut handed: Vec<(i64, serde_json::Value)> = Vec::new();
                let started = Instant::now();
                while handed.len() < (KEYS as usize) && started.elapsed() < Duration::from_secs(60)
                {
                    let rows = c
                        .query(
                            "SELECT job_id, attempt, payload FROM keel.claim('rp-race', 2)",
                            &[],
                        )
                        .expect("claim");
                    for r in rows {
                        let (id, attempt, payload): (i64, i32, serde_json::Value) =
                            (r.get(0), r.get(1), r.get(2));
                        // Held a moment while the producers keep trying to replace it.
                        std::thread::sleep(Duration::from_millis(5));
                        assert!(ack(&mut c, (id, attempt)));
                        handed.push((id, payload));
                    }
                    if handed.len() >= KEYS as usize / 4 {
                        break;
                    }
                }
                handed
            })
        })
        .collect();
    let handed: Vec<(i64, serde_json::Value)> = consumers
        .into_iter()
        .flat_map(|t| t.join().expect("consumer"))
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in producers {
        t.join().expect("producer");
    }
    let mut replaced = 0;
    for (id, payload) in &handed {
        let (state, stored): (String, serde_json::Value) = {
            let r = c
                .query_one(
                    "SELECT state, payload FROM keel.jobs WHERE job_id = $1",
                    &[id],
                )
                .expect("the finished job");
            (r.get(0), r.get(1))
        };
        assert_eq!(state, "done");
        assert_eq!(&stored, payload, "job {id} changed after it was handed out");
        replaced += usize::from(payload["v"].as_i64().unwrap_or(0) > 1);
    }
    let per_key: i64 = one(
        &mut c,
        "SELECT max(n) FROM (SELECT count(*) n FROM keel.jobs WHERE queue = 'rp-race'
                             GROUP BY idempotency_key) x",
    );
    println!(
        "    {} jobs handed out while 4 producers replaced them: {replaced} with a replaced \
         payload, none changed after the claim",
        handed.len()
    );
    assert_eq!(per_key, 1, "one job per key");
    assert!(handed.len() >= KEYS as usize);
    exec(&mut c, "SELECT keel.drop_queue('rp-race', force => true)");
}

/// Fan-in: a job enqueued after 1,000 others; 8 consumers drain the queue. The job is handed
/// out once, and only when every one of the 1,000 is done.
fn a_job_after_1000_others_runs_once_all_are_done_by_8_consumers(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('fan-in')");
    let deps: Vec<i64> = c
        .query(
            "SELECT keel.enqueue('fan-in', jsonb_build_object('n', g)) FROM generate_series(1, 1000) g",
            &[],
        )
        .expect("deps")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let last: i64 = c
        .query_one(
            "SELECT keel.enqueue('fan-in', '{\"last\": true}', after => $1)",
            &[&deps],
        )
        .expect("the job after them")
        .get(0);
    let waiting: bool = one(
        &mut c,
        &format!("SELECT visible_at = 'infinity' FROM keel.jobs WHERE job_id = {last}"),
    );
    assert!(waiting, "not claimable while the others are not done");
    let deps = Arc::new(deps);
    let consumers: Vec<_> = (0..8)
        .map(|_| {
            let mut c = env.pg.connect();
            let deps = deps.clone();
            std::thread::spawn(move || {
                let (mut handed, mut last_seen) = (0, 0);
                let started = Instant::now();
                while last_seen == 0 && started.elapsed() < Duration::from_secs(60) {
                    let leases = c
                        .query("SELECT job_id, attempt FROM keel.claim('fan-in', 8)", &[])
                        .expect("claim");
                    if leases.is_empty() {
                        std::thread::sleep(Duration::from_millis(20));
                        let left: i64 = c
                            .query_one("SELECT count(*) FROM keel.jobs WHERE queue = 'fan-in'", &[])
                            .expect("left")
                            .get(0);
                        if left == 0 {
                            break;
                        }
                    }
                    for r in leases {
                        let (id, attempt): (i64, i32) = (r.get(0), r.get(1));
                        if !deps.contains(&id) {
                            let undone: i64 = c
                                .query_one(
                                    "SELECT count(*) FROM keel.jobs
                                      WHERE job_id = ANY ($1) AND state <> 'done'",
                                    &[&*deps],
                                )
                                .expect("undone")
                                .get(0);
                            assert_eq!(
                                undone, 0,
                                "handed out while {undone} it waits for are not done"
                            );
                            last_seen = id;
                        }
                        assert!(ack(&mut c, (id, attempt)));
                        handed += 1;
                    }
                }
                (handed, last_seen)
            })
        })
        .collect();
    let results: Vec<(i64, i64)> = consumers
        .into_iter()
        .map(|t| t.join().expect("consumer"))
        .collect();
    let handed: i64 = results.iter().map(|r| r.0).sum();
    let seen: Vec<i64> = results.iter().map(|r| r.1).filter(|id| *id != 0).collect();
    println!("    8 consumers: {handed} jobs handed out, the one after 1,000 once and last");
    assert_eq!(seen, vec![last], "the job after them handed out once");
    assert_eq!(handed, 1001);
    let edges: i64 = one(&mut c, "SELECT count(*) FROM keel.job_dependencies");
    assert_eq!(edges, 0, "nothing left to wait for");
    exec(&mut c, "SELECT keel.drop_queue('fan-in', force => true)");
}

fn job_state(c: &mut Client, id: i64) -> (String, Option<String>) {
    let r = c
        .query_one(
            "SELECT state, dead_reason FROM keel.jobs WHERE job_id = $1",
            &[&id],
        )
        .expect("job");
    (r.get(0), r.get(1))
}

fn a_job_after_a_dead_or_cancelled_one_is_cancelled(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('dq', max_attempts => 1);
         SELECT keel.create_queue('dq-other');",
    );
    let id = |c: &mut Client, sql: &str| -> i64 { one(c, sql) };
    let dies = id(&mut c, "SELECT keel.enqueue('dq', '{\"dies\": 1}')");
    let after_dead = id(
        &mut c,
        &format!("SELECT keel.enqueue('dq', '{{}}', after => ARRAY[{dies}])"),
    );
    let after_after = id(
        &mut c,
        &format!("SELECT keel.enqueue('dq', '{{}}', after => ARRAY[{after_dead}])"),
    );
    let cancelled = id(
        &mut c,
        "SELECT keel.enqueue('dq-other', '{}', delay => '1 hour')",
    );
    let after_cancelled = id(
        &mut c,
        &format!("SELECT keel.enqueue('dq', '{{}}', after => ARRAY[{cancelled}, {dies}])"),
    );
    let lease = claim(&mut c, "dq", 1);
    assert_eq!(
        lease.iter().map(|l| l.0).collect::<Vec<_>>(),
        vec![dies],
        "only the one not waiting"
    );
    let state: String = one(
        &mut c,
        &format!("SELECT keel.fail({dies}, {}, 'boom')", lease[0].1),
    );
    assert_eq!(state, "dead");
    exec(
        &mut c,
        &format!("SELECT keel.cancel({cancelled}, 'not needed')"),
    );
    wait_for(Duration::from_secs(20), || {
        (job_state(&mut c, after_after).0 == "cancelled").then_some(())
    })
    .expect("the cancel goes down the chain");
    assert_eq!(
        job_state(&mut c, after_dead),
        (
            "cancelled".into(),
            Some(format!("job {dies}, which it waited for, is dead"))
        )
    );
    assert_eq!(
        job_state(&mut c, after_after),
        (
            "cancelled".into(),
            Some(format!(
                "job {after_dead}, which it waited for, is cancelled"
            ))
        )
    );
    assert_eq!(job_state(&mut c, after_cancelled).0, "cancelled");
    // After a job that is done and gone (acked, no key): claimable at once; with a delay, not
    // before it.
    let done = id(&mut c, "SELECT keel.enqueue('dq-other', '{}')");
    let lease = claim(&mut c, "dq-other", 1);
    assert!(ack(&mut c, lease[0]));
    let now_ok = id(
        &mut c,
        &format!("SELECT keel.enqueue('dq', '{{\"n\": 1}}', after => ARRAY[{done}])"),
    );
    let delayed = id(
        &mut c,
        &format!(
            "SELECT keel.enqueue('dq', '{{\"n\": 2}}', delay => '1 hour', after => ARRAY[{done}])"
        ),
    );
    assert_eq!(
        claim(&mut c, "dq", 5)
            .iter()
            .map(|l| l.0)
            .collect::<Vec<_>>(),
        vec![now_ok]
    );
    let later: bool = one(&mut c, &format!("SELECT visible_at > now() + interval '59 minutes' FROM keel.jobs WHERE job_id = {delayed}"));
    assert!(later);
    // A delay counts from the enqueue, also for a job released later.
    let blocker = id(&mut c, "SELECT keel.enqueue('dq-other', '{}')");
    let held = id(
        &mut c,
        &format!("SELECT keel.enqueue('dq', '{{}}', delay => '1 hour', after => ARRAY[{blocker}])"),
    );
    let lease = claim(&mut c, "dq-other", 1);
    assert!(ack(&mut c, lease[0]));
    wait_for(Duration::from_secs(20), || {
        one::<bool>(
            &mut c,
            &format!("SELECT visible_at <> 'infinity' FROM keel.jobs WHERE job_id = {held}"),
        )
        .then_some(())
    })
    .expect("released");
    let later: bool = one(&mut c, &format!("SELECT visible_at > now() + interval '59 minutes' FROM keel.jobs WHERE job_id = {held}"));
    assert!(later, "released, due an hour after its enqueue");
    // Bad input, and jobs of queues the caller may not enqueue to.
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dq_app') THEN
             CREATE ROLE dq_app LOGIN;
           END IF;
         END $$;
         SELECT keel.grant_producer('dq_app', queues => '{dq}');",
    );
    let before: i64 = one(&mut c, "SELECT count(*) FROM keel.jobs");
    let mine = id(&mut c, "SELECT keel.enqueue('dq', '{}')");
    let theirs = id(&mut c, "SELECT keel.enqueue('dq-other', '{}')");
    let mut app = env.pg.connect_as("dq_app");
    let cases = [
        ("SELECT keel.enqueue('dq', '{}', after => ARRAY[NULL]::bigint[])".to_string(), "22023"),
        ("SELECT keel.enqueue('dq', '{}', after => ARRAY[0])".into(), "22023"),
        ("SELECT keel.enqueue('dq', '{}', after => ARRAY[1], on_duplicate => 'x')".into(), "22023"),
        ("SELECT keel.enqueue('dq', '{}', after => ARRAY[9223372036854775807])".into(), "22023"),
        (format!("SELECT keel.enqueue('dq', '{{}}', after => ARRAY[{mine}], idempotency_key => 'k')"), "22023"),
        (format!("SELECT keel.enqueue('dq-other', '{{}}', after => ARRAY[{mine}])"), "42501"),
        ("SELECT keel.enqueue('dq', '{}', after => ARRAY(SELECT generate_series(1, 10001)::bigint))".into(), "22023"),
    ];
    let refs: Vec<(&str, &str)> = cases.iter().map(|(s, w)| (s.as_str(), *w)).collect();
    expect_sqlstates(&mut app, &refs);
    let ok: i64 = one(
        &mut app,
        &format!("SELECT keel.enqueue('dq', '{{}}', after => ARRAY[{mine}, {mine}])"),
    );
    assert!(ok > 0, "its own queue's job, named twice");
    let edges: i64 = one(
        &mut c,
        &format!("SELECT count(*) FROM keel.job_dependencies WHERE job_id = {ok}"),
    );
    assert_eq!(edges, 1);
    // Another tenant's job counts as gone: the job does not wait for it, and nothing tells
    // the caller whether it exists.
    let blind: i64 = one(
        &mut app,
        &format!("SELECT keel.enqueue('dq', '{{}}', after => ARRAY[{theirs}])"),
    );
    let waits: bool = one(
        &mut c,
        &format!("SELECT visible_at = 'infinity' FROM keel.jobs WHERE job_id = {blind}"),
    );
    assert!(!waits, "another tenant's job is not waited for");
    let after: i64 = one(&mut c, "SELECT count(*) FROM keel.jobs");
    assert_eq!(after, before + 4, "the refused calls added nothing");
    drop(app);
    exec(
        &mut c,
        "SELECT keel.drop_queue('dq', force => true); SELECT keel.drop_queue('dq-other', force => true);
         SELECT keel.revoke_all('dq_app');",
    );
    // Jobs dropped with their queue leave nothing to wait for behind.
    wait_for(Duration::from_secs(20), || {
        (one::<i64>(&mut c, "SELECT count(*) FROM keel.job_dependencies") == 0).then_some(())
    })
    .expect("no edge left");
}

fn finished_jobs_stay_for_keep_finished_with_their_result(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('hist', max_attempts => 1, keep_finished => '1 hour',
                                  progress_topic => 'hist.progress');
         SELECT keel.create_queue('no-hist');",
    );
    let ids: Vec<i64> = c
        .query(
            "SELECT keel.enqueue('hist', jsonb_build_object('n', g)) FROM generate_series(1, 5) g",
            &[],
        )
        .expect("enqueue")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let leases = claim(&mut c, "hist", 4);
    assert_eq!(leases.len(), 4);
    // Progress goes to the queue's topic, one event per report, the job's id as aggregate.
    assert!(progress(&mut c, leases[0], "{\"pct\": 50}"));
    let event: serde_json::Value = one(
        &mut c,
        &format!(
            "SELECT payload FROM keel.outbox WHERE topic = 'hist.progress' AND aggregate_id = '{}'",
            leases[0].0
        ),
    );
    assert_eq!(event["progress"], serde_json::json!({"pct": 50}));
    assert_eq!(event["job_id"], serde_json::json!(leases[0].0));
    // Done with a result, done in a batch, dead, cancelled: all stay, with what they ended with.
    let acked: bool = c
        .query_one(
            "SELECT keel.ack($1, $2, '{\"rows\": 7}')",
            &[&leases[0].0, &leases[0].1],
        )
        .expect("ack with a result")
        .get(0);
    assert!(acked);
    let batch: i64 = c
        .query_one(
            "SELECT keel.ack_batch(ARRAY[$1::int8], ARRAY[$2::int4])",
            &[&leases[1].0, &leases[1].1],
        )
        .expect("ack_batch")
        .get(0);
    assert_eq!(batch, 1);
    let dead: String = one(
        &mut c,
        &format!(
            "SELECT keel.fail({}, {}, 'no luck')",
            leases[2].0, leases[2].1
        ),
    );
    assert_eq!(dead, "dead");
    exec(&mut c, &format!("SELECT keel.cancel({})", ids[4]));
    let kept: Vec<(i64, String, Option<serde_json::Value>, bool)> = c
        .query(
            "SELECT job_id, state, result, finished_at IS NOT NULL FROM keel.jobs
              WHERE queue = 'hist' AND state <> 'running' ORDER BY job_id",
            &[],
        )
        .expect("history")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let states: Vec<&str> = kept.iter().map(|k| k.1.as_str()).collect();
    assert_eq!(states, ["done", "done", "dead", "cancelled"]);
    assert_eq!(kept[0].2, Some(serde_json::json!({"rows": 7})));
    assert!(kept.iter().all(|k| k.3), "each has finished_at");
    // The cleanup leaves them for keep_finished...
    exec(&mut c, "SELECT keel.cleanup_done_jobs()");
    let n: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.jobs WHERE queue = 'hist' AND state <> 'running'",
    );
    assert_eq!(n, 4);
    // ...then removes done and (past their dedupe window) cancelled ones; dead ones stay.
    exec(
        &mut c,
        "SELECT keel.alter_queue('hist', keep_finished => '1 second', dedupe_window => '1 second',
                                 clear_progress_topic => true)",
    );
    std::thread::sleep(Duration::from_millis(1200));
    exec(&mut c, "SELECT keel.cleanup_done_jobs()");
    let left: Vec<String> = c
        .query(
            "SELECT state FROM keel.jobs WHERE queue = 'hist' AND state <> 'running'",
            &[],
        )
        .expect("left")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["dead"]);
    // A key used again after its dedupe window: a new job, the finished one stays (history)
    // without the key.
    exec(
        &mut c,
        "SELECT keel.alter_queue('hist', keep_finished => '1 hour');
         SELECT keel.enqueue('hist', '{\"take\": 1}', idempotency_key => 'again')",
    );
    let lease = claim(&mut c, "hist", 5);
    let again: Vec<(i64, i32)> = lease;
    for l in &again {
        assert!(ack(&mut c, *l));
    }
    std::thread::sleep(Duration::from_millis(1100));
    let second: i64 = one(
        &mut c,
        "SELECT keel.enqueue('hist', '{\"take\": 2}', idempotency_key => 'again')",
    );
    let kept: (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE payload = '{\"take\": 1}' AND idempotency_key IS NULL
                                                AND state = 'done'),
                        count(*) FILTER (WHERE idempotency_key = 'again')
                   FROM keel.jobs WHERE queue = 'hist'",
                &[],
            )
            .expect("kept");
        (r.get(0), r.get(1))
    };
    assert_eq!(
        kept,
        (1, 1),
        "the earlier job kept without its key, {second} holds it"
    );
    exec(
        &mut c,
        "SELECT keel.alter_queue('hist', keep_finished => '1 second')",
    );
    assert!(progress(&mut c, leases[3], "{\"pct\": 90}"));
    let events: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.outbox WHERE topic = 'hist.progress'",
    );
    assert_eq!(events, 1, "no event once the topic is cleared");
    // A queue that keeps nothing: an unkeyed job is deleted at ack, its result with it; a
    // keyed one stays done for its dedupe window, with its result.
    exec(
        &mut c,
        "SELECT keel.enqueue('no-hist', '{}'); SELECT keel.enqueue('no-hist', '{}', idempotency_key => 'k')",
    );
    for lease in claim(&mut c, "no-hist", 2) {
        let ok: bool = c
            .query_one(
                "SELECT keel.ack($1, $2, '{\"r\": 1}')",
                &[&lease.0, &lease.1],
            )
            .expect("ack")
            .get(0);
        assert!(ok);
    }
    let rest: Vec<(Option<String>, Option<serde_json::Value>)> = c
        .query(
            "SELECT idempotency_key, result FROM keel.jobs WHERE queue = 'no-hist'",
            &[],
        )
        .expect("rest")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rest,
        vec![(Some("k".into()), Some(serde_json::json!({"r": 1})))]
    );
    let big = format!("'{{\"x\": \"{}\"}}'", "x".repeat(2_000_000));
    let cases = [
        (
            "SELECT keel.create_queue('h2', keep_finished => '-1 second')".to_string(),
            "22023",
        ),
        (
            "SELECT keel.create_queue('h2', keep_finished => '200 years')".into(),
            "22023",
        ),
        (
            "SELECT keel.create_queue('h2', keep_finished => NULL)".into(),
            "22023",
        ),
        (
            "SELECT keel.create_queue('h2', progress_topic => 'Bad Topic')".into(),
            "22023",
        ),
        (
            "SELECT keel.alter_queue('hist', progress_topic => 't', clear_progress_topic => true)"
                .into(),
            "22023",
        ),
        (
            "SELECT keel.alter_queue('hist', keep_finished => '-1 day')".into(),
            "22023",
        ),
        (
            format!("SELECT keel.ack({}, {}, {big})", leases[3].0, leases[3].1),
            "54000",
        ),
    ];
    let refs: Vec<(&str, &str)> = cases.iter().map(|(s, w)| (s.as_str(), *w)).collect();
    expect_sqlstates(&mut c, &refs);
    let h2: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.queues WHERE queue = 'h2'",
    );
    assert_eq!(h2, 0);
    assert!(ack(&mut c, leases[3]), "the refused ack left the lease");
    exec(
        &mut c,
        "SELECT keel.drop_queue('hist', force => true); SELECT keel.drop_queue('no-hist', force => true)",
    );
}

fn claim_any(c: &mut Client, queues: &[&str], batch: i32) -> Vec<(i64, i32, i32, String)> {
    let queues: Vec<String> = queues.iter().map(|q| q.to_string()).collect();
    c.query(
        "SELECT job_id, attempt, priority, queue FROM keel.claim($1::text[], $2)",
        &[&queues, &batch],
    )
    .expect("claim across queues")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

fn a_claim_across_queues_goes_by_priority_then_by_the_order_given(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue(q) FROM unnest(ARRAY['mq-a', 'mq-b', 'mq-c', 'mq-wide']) q;
         SELECT keel.enqueue('mq-a', '{}', priority => 5) FROM generate_series(1, 3);
         SELECT keel.enqueue('mq-b', '{}', priority => 0) FROM generate_series(1, 2);
         SELECT keel.enqueue('mq-c', '{}', priority => 5) FROM generate_series(1, 2);
         SELECT keel.enqueue('mq-c', '{}', priority => -1);
         -- More priorities than a queue's floors are kept for: claimed from the whole queue.
         SELECT keel.enqueue('mq-wide', '{}', priority => p) FROM generate_series(1, 12) p;",
    );
    let got = claim_any(&mut c, &["mq-a", "mq-b", "mq-c", "mq-wide"], 9);
    let order: Vec<(i32, &str)> = got.iter().map(|j| (j.2, j.3.as_str())).collect();
    assert_eq!(
        order,
        [
            (-1, "mq-c"),
            (0, "mq-b"),
            (0, "mq-b"),
            (1, "mq-wide"),
            (2, "mq-wide"),
            (3, "mq-wide"),
            (4, "mq-wide"),
            (5, "mq-a"),
            (5, "mq-a"),
        ]
    );
    // Within a priority, the queues in the order given; a paused one is passed over; a
    // queue named twice counts once.
    exec(&mut c, "SELECT keel.pause_queue('mq-a')");
    let got = claim_any(&mut c, &["mq-c", "mq-a", "mq-wide", "mq-c"], 4);
    let order: Vec<(i32, &str)> = got.iter().map(|j| (j.2, j.3.as_str())).collect();
    assert_eq!(
        order,
        [(5, "mq-c"), (5, "mq-c"), (5, "mq-wide"), (6, "mq-wide")]
    );
    // The single-queue claim is still what a plain text argument means.
    let one_queue: i64 = one(&mut c, "SELECT count(*) FROM keel.claim('mq-wide', 2)");
    assert_eq!(one_queue, 2);
    exec(
        &mut c,
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mq_app') THEN
             CREATE ROLE mq_app LOGIN;
           END IF;
         END $$;
         SELECT keel.grant_consumer('mq_app', queues => '{mq-b}');",
    );
    let mut app = env.pg.connect_as("mq_app");
    let many = "SELECT * FROM keel.claim(ARRAY(SELECT 'q' || g FROM generate_series(1, 101) g))";
    expect_sqlstates(
        &mut app,
        &[
            ("SELECT * FROM keel.claim(ARRAY['mq-b', 'mq-c'])", "42501"),
            ("SELECT * FROM keel.claim(ARRAY['mq-b', NULL])", "22023"),
            ("SELECT * FROM keel.claim(ARRAY[]::text[])", "22023"),
            ("SELECT * FROM keel.claim(NULL::text[])", "22023"),
            ("SELECT * FROM keel.claim(ARRAY['mq-b', 'Bad'])", "22023"),
            ("SELECT * FROM keel.claim(ARRAY['mq-b'], 0)", "22023"),
            (
                "SELECT * FROM keel.claim(ARRAY['mq-b'], visibility_timeout => '-1 s')",
                "22023",
            ),
            (many, "22023"),
        ],
    );
    expect_sqlstates(
        &mut c,
        &[(
            "SELECT * FROM keel.claim(ARRAY['mq-b', 'mq-none'])",
            "42704",
        )],
    );
    let mine: i64 = one(
        &mut app,
        "SELECT count(*) FROM keel.claim(ARRAY['mq-b'], 10)",
    );
    assert_eq!(mine, 0, "mq-b's two were claimed above");
    drop(app);
    exec(
        &mut c,
        "SELECT keel.drop_queue(q, force => true) FROM unnest(ARRAY['mq-a', 'mq-b', 'mq-c', 'mq-wide']) q;
         SELECT keel.revoke_all('mq_app');",
    );
}

fn eight_consumers_claiming_across_queues_get_every_job_once(env: &Env) {
    const PER_QUEUE: i64 = 1000;
    let mut c = env.pg.connect();
    exec(
        &mut c,
        &format!(
            "SELECT keel.create_queue(q) FROM unnest(ARRAY['mx-1', 'mx-2', 'mx-3']) q;
             SELECT keel.enqueue(q, jsonb_build_object('q', q, 'n', g), priority => g % 3)
               FROM unnest(ARRAY['mx-1', 'mx-2', 'mx-3']) q, generate_series(1, {PER_QUEUE}) g;"
        ),
    );
    let consumers: Vec<_> = (0..8)
        .map(|i| {
            let mut c = env.pg.connect();
            std::thread::spawn(move || {
                let mut seen: Vec<(i64, i32)> = Vec::new();
                let queues: &[&str] = if i % 2 == 0 {
                    &["mx-1", "mx-2", "mx-3"]
                } else {
                    &["mx-3", "mx-1", "mx-2"]
                };
                loop {
                    let got = claim_any(&mut c, queues, 16);
                    if got.is_empty() {
                        break;
                    }
                    for (id, attempt, _, _) in got {
                        assert!(ack(&mut c, (id, attempt)));
                        seen.push((id, attempt));
                    }
                }
                seen
            })
        })
        .collect();
    let mut all: Vec<(i64, i32)> = consumers
        .into_iter()
        .flat_map(|t| t.join().expect("consumer"))
        .collect();
    let handed = all.len();
    all.sort();
    all.dedup_by_key(|j| j.0);
    println!(
        "    8 consumers across 3 queues: {handed} jobs handed out, {} distinct",
        all.len()
    );
    assert_eq!(handed as i64, 3 * PER_QUEUE);
    assert_eq!(all.len(), handed, "a job handed out twice");
    let left: i64 = one(
        &mut c,
        "SELECT count(*) FROM keel.jobs WHERE queue LIKE 'mx-%'",
    );
    assert_eq!(left, 0);
    exec(
        &mut c,
        "SELECT keel.drop_queue(q) FROM unnest(ARRAY['mx-1', 'mx-2', 'mx-3']) q",
    );
}

fn expired_lease_comes_back_and_stale_worker_is_refused(env: &Env) {
    let mut a = env.pg.connect();
    let mut b = env.pg.connect();
    exec(&mut a, "SELECT keel.create_queue('lease')");
    let id: i64 = one(&mut a, "SELECT keel.enqueue('lease', '{}')");
    let old: (i64, i32) = {
        let r = a.query_one("SELECT job_id, attempt FROM keel.claim('lease', 1, visibility_timeout => '300 ms')", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(old, (id, 1));
    assert!(claim(&mut b, "lease", 1).is_empty(), "lease still live");
    std::thread::sleep(Duration::from_millis(400));
    let new = claim(&mut b, "lease", 1);
    assert_eq!(
        new,
        vec![(id, 2)],
        "expired lease comes back with attempt + 1"
    );
    // The stale worker can no longer ack, fail or extend.
    assert!(!ack(&mut a, old));
    let f: Option<String> = a
        .query_one("SELECT keel.fail($1, $2, 'late')", &[&old.0, &old.1])
        .unwrap()
        .get(0);
    assert_eq!(f, None);
    let e: Option<std::time::SystemTime> = a
        .query_one("SELECT keel.extend($1, $2, '1 min')", &[&old.0, &old.1])
        .unwrap()
        .get(0);
    assert_eq!(e, None);
    assert!(ack(&mut b, new[0]), "the live lease acks");
}

fn extend_keeps_the_lease(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('ext')");
    exec(&mut c, "SELECT keel.enqueue('ext', '{}')");
    let r = c
        .query_one(
            "SELECT job_id, attempt FROM keel.claim('ext', 1, visibility_timeout => '300 ms')",
            &[],
        )
        .unwrap();
    let job: (i64, i32) = (r.get(0), r.get(1));
    let in_future: bool = c
        .query_one(
            "SELECT keel.extend($1, $2, '1 hour') > clock_timestamp() + interval '59 min'",
            &[&job.0, &job.1],
        )
        .unwrap()
        .get(0);
    assert!(in_future);
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        claim(&mut c, "ext", 1).is_empty(),
        "extended lease is not handed out"
    );
    assert!(ack(&mut c, job));
}

fn last_attempt_expiry_is_reaped_to_dead_and_retried(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('reap', max_attempts => 2, visibility_timeout => '200 ms')",
    );
    let id: i64 = one(&mut c, "SELECT keel.enqueue('reap', '{}')");
    assert_eq!(claim(&mut c, "reap", 1), vec![(id, 1)]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(claim(&mut c, "reap", 1), vec![(id, 2)]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        claim(&mut c, "reap", 1).is_empty(),
        "a lease expired on the last attempt is never handed out"
    );
    // Reaped by this call, or a moment before by the worker's task (every 5 s).
    one::<i64>(&mut c, "SELECT keel.reap_expired()");
    let r = c
        .query_one(
            "SELECT state, dead_reason, last_error FROM keel.jobs WHERE job_id = $1",
            &[&id],
        )
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "dead");
    assert_eq!(r.get::<_, String>(1), "lease expired");
    assert_eq!(r.get::<_, String>(2), "lease expired on attempt 2");
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT dead FROM keel.queue_stats WHERE queue = 'reap'"
        ),
        1
    );
    assert_eq!(
        c.query_one("SELECT keel.retry_dead('reap', $1)", &[&id])
            .unwrap()
            .get::<_, i64>(0),
        1
    );
    // Its tries again, under new attempt numbers: a lease from before never matches again.
    assert_eq!(claim(&mut c, "reap", 1), vec![(id, 3)]);
    assert!(
        !ack(&mut c, (id, 1)) && !ack(&mut c, (id, 2)),
        "the leases from before retry_dead are refused"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(claim(&mut c, "reap", 1), vec![(id, 4)]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        claim(&mut c, "reap", 1).is_empty(),
        "two tries again, then no more"
    );
}

fn idempotency_key_survives_completion_until_window_ends(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('idem', dedupe_window => '1 hour')",
    );
    let first: i64 = one(
        &mut c,
        "SELECT keel.enqueue('idem', '{\"v\":1}', idempotency_key => 'order-42')",
    );
    let again: i64 = one(
        &mut c,
        "SELECT keel.enqueue('idem', '{\"v\":2}', idempotency_key => 'order-42')",
    );
    assert_eq!(first, again);
    let job = claim(&mut c, "idem", 1)[0];
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT keel.enqueue('idem', '{}', idempotency_key => 'order-42')"
        ),
        first,
        "duplicate while running"
    );
    assert!(ack(&mut c, job));
    assert_eq!(
        one::<String>(
            &mut c,
            &format!("SELECT state FROM keel.jobs WHERE job_id = {first}")
        ),
        "done"
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT keel.enqueue('idem', '{}', idempotency_key => 'order-42')"
        ),
        first,
        "duplicate after completion"
    );
    assert!(claim(&mut c, "idem", 1).is_empty(), "nothing new to do");
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.jobs WHERE queue = 'idem'"
        ),
        1
    );
    // Once the window has passed, the key may be used again.
    exec(
        &mut c,
        "SELECT keel.alter_queue('idem', dedupe_window => '200 ms')",
    );
    std::thread::sleep(Duration::from_millis(300));
    let fresh: i64 = one(
        &mut c,
        "SELECT keel.enqueue('idem', '{\"v\":3}', idempotency_key => 'order-42')",
    );
    assert_ne!(fresh, first);
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.jobs WHERE queue = 'idem'"
        ),
        1
    );
    // Other keys and other queues are independent.
    exec(&mut c, "SELECT keel.create_queue('idem2')");
    let other: i64 = one(
        &mut c,
        "SELECT keel.enqueue('idem2', '{}', idempotency_key => 'order-42')",
    );
    assert_ne!(other, fresh);
}

fn concurrent_idempotent_enqueues_make_one_job(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('idem-race')");
    let ids = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let mut conn = env.pg.connect();
            let ids = ids.clone();
            std::thread::spawn(move || {
                for k in 0..50 {
                    let id: i64 = conn
                        .query_one(
                            "SELECT keel.enqueue('idem-race', '{}', idempotency_key => $1)",
                            &[&format!("k{k}")],
                        )
                        .unwrap()
                        .get(0);
                    ids.lock().unwrap().push((k, id));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("producer thread");
    }
    let mut by_key: HashMap<i32, std::collections::HashSet<i64>> = HashMap::new();
    for (k, id) in ids.lock().unwrap().iter() {
        by_key.entry(*k).or_default().insert(*id);
    }
    assert_eq!(by_key.len(), 50);
    assert!(
        by_key.values().all(|s| s.len() == 1),
        "every producer got the same id per key"
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.jobs WHERE queue = 'idem-race'"
        ),
        50
    );
}

fn backpressure_refuses_over_max_ready(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('bp', max_ready => 3)");
    for _ in 0..3 {
        exec(&mut c, "SELECT keel.enqueue('bp', '{}')");
    }
    let err = c
        .batch_execute("SELECT keel.enqueue('bp', '{}')")
        .unwrap_err();
    assert_eq!(err.code().map(|s| s.code()), Some("53400"));
    assert!(err
        .as_db_error()
        .and_then(|d| d.hint())
        .unwrap_or("")
        .contains("max_ready"));
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM keel.jobs WHERE queue = 'bp'"),
        3
    );
    // A duplicate of an existing key is not new work: it is answered even when full.
    exec(&mut c, "SELECT keel.alter_queue('bp', max_ready => 4)");
    let id: i64 = one(
        &mut c,
        "SELECT keel.enqueue('bp', '{}', idempotency_key => 'k')",
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT keel.enqueue('bp', '{}', idempotency_key => 'k')"
        ),
        id
    );
    // Consumers make room.
    let job = claim(&mut c, "bp", 1)[0];
    assert!(ack(&mut c, job));
    exec(&mut c, "SELECT keel.enqueue('bp', '{}')");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.enqueue_batch('bp', ARRAY['{}'::jsonb])")).as_deref(),
        Some("53400")
    );
    exec(
        &mut c,
        "SELECT keel.alter_queue('bp', clear_max_ready => true)",
    );
    exec(
        &mut c,
        "SELECT keel.enqueue_batch('bp', ARRAY['{}'::jsonb, '{}'])",
    );
}

fn paused_queue_accepts_but_does_not_hand_out(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('pz'); SELECT keel.pause_queue('pz')",
    );
    let id: i64 = one(&mut c, "SELECT keel.enqueue('pz', '{}')");
    assert!(claim(&mut c, "pz", 10).is_empty());
    assert!(one::<bool>(
        &mut c,
        "SELECT paused FROM keel.queue_stats WHERE queue = 'pz'"
    ));
    exec(&mut c, "SELECT keel.resume_queue('pz')");
    assert_eq!(claim(&mut c, "pz", 10), vec![(id, 1)]);
}

fn priority_then_age(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('prio')");
    let mut expect = Vec::new();
    let low1: i64 = one(&mut c, "SELECT keel.enqueue('prio', '{}', priority => 10)");
    let high1: i64 = one(&mut c, "SELECT keel.enqueue('prio', '{}', priority => -5)");
    let mid: i64 = one(&mut c, "SELECT keel.enqueue('prio', '{}', priority => 0)");
    let high2: i64 = one(&mut c, "SELECT keel.enqueue('prio', '{}', priority => -5)");
    let low2: i64 = one(&mut c, "SELECT keel.enqueue('prio', '{}', priority => 10)");
    expect.extend([high1, high2, mid, low1, low2]);
    let got: Vec<i64> = (0..5).map(|_| claim(&mut c, "prio", 1)[0].0).collect();
    assert_eq!(got, expect, "one at a time");
    exec(&mut c, "SELECT keel.purge_queue('prio')");
    let ids: Vec<i64> = [3, 1, 2, 1]
        .iter()
        .map(|p| {
            c.query_one("SELECT keel.enqueue('prio', '{}', priority => $1)", &[p])
                .unwrap()
                .get(0)
        })
        .collect();
    let got: Vec<i64> = claim(&mut c, "prio", 10).iter().map(|j| j.0).collect();
    assert_eq!(
        got,
        vec![ids[1], ids[3], ids[2], ids[0]],
        "a batch comes in claim order"
    );
}

fn delayed_jobs_are_invisible_until_due(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('later')");
    let id: i64 = one(
        &mut c,
        "SELECT keel.enqueue('later', '{}', delay => '500 ms')",
    );
    assert!(claim(&mut c, "later", 1).is_empty());
    let r = c
        .query_one(
            "SELECT ready, scheduled FROM keel.queue_stats WHERE queue = 'later'",
            &[],
        )
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (0, 1));
    let got = wait_for(Duration::from_secs(5), || claim(&mut c, "later", 1).pop());
    assert_eq!(got, Some((id, 1)));
}

fn notify_after_commit_only(env: &Env) {
    let mut listener = env.pg.connect();
    let mut producer = env.pg.connect();
    exec(&mut producer, "SELECT keel.create_queue('ntf')");
    exec(&mut listener, "LISTEN keel_jobs");
    let drain = |l: &mut Client, wait: Duration| -> Vec<String> {
        let mut got = Vec::new();
        let mut n = l.notifications();
        let mut it = n.timeout_iter(wait);
        while let Ok(Some(note)) = it.next() {
            got.push(note.payload().to_string());
        }
        got
    };
    drain(&mut listener, Duration::from_millis(100));
    let mut tx = producer.transaction().unwrap();
    tx.execute("SELECT keel.enqueue('ntf', '{}')", &[]).unwrap();
    assert!(
        drain(&mut listener, Duration::from_millis(300)).is_empty(),
        "nothing before commit"
    );
    tx.commit().unwrap();
    assert_eq!(
        drain(&mut listener, Duration::from_secs(2)),
        vec!["ntf".to_string()]
    );
    let mut tx = producer.transaction().unwrap();
    tx.execute("SELECT keel.enqueue('ntf', '{}')", &[]).unwrap();
    tx.rollback().unwrap();
    assert!(
        drain(&mut listener, Duration::from_millis(500)).is_empty(),
        "nothing after rollback"
    );
    assert_eq!(
        one::<i64>(
            &mut producer,
            "SELECT count(*) FROM keel.jobs WHERE queue = 'ntf'"
        ),
        1
    );
}

/// (payload, sending pid) of the notifications that arrive within `wait`.
fn notes(l: &mut Client, wait: Duration) -> Vec<(String, i32)> {
    let mut got = Vec::new();
    let mut n = l.notifications();
    let mut it = n.timeout_iter(wait);
    while let Ok(Some(note)) = it.next() {
        got.push((note.payload().to_string(), note.process_id()));
    }
    got
}

fn waker_pid(c: &mut Client) -> Option<i32> {
    c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_keel waker' AND datname = current_database()",
        &[],
    )
    .ok()
    .flatten()
    .map(|r| r.get(0))
}

/// Producers leave NOTIFY to the database's relay (one round for many commits, so their commits
/// do not queue for NOTIFY's lock); while it is gone they send it themselves, and every commit
/// still wakes the listeners; a batch and every queue of a transaction wake too.
fn wake_ups_come_from_the_relay_and_from_the_producer_while_it_is_gone(env: &Env) {
    let mut listener = env.pg.connect();
    let mut producer = env.pg.connect();
    let mut admin = env.pg.connect();
    exec(
        &mut producer,
        "SELECT keel.create_queue('wake-a'); SELECT keel.create_queue('wake-b')",
    );
    exec(&mut listener, "LISTEN keel_jobs");
    let relay = wait_for(Duration::from_secs(10), || waker_pid(&mut admin)).expect("a relay runs");
    notes(&mut listener, Duration::from_millis(100));
    let started = Instant::now();
    exec(&mut producer, "SELECT keel.enqueue('wake-a', '{}')");
    let got = notes(&mut listener, Duration::from_millis(500));
    assert_eq!(
        got,
        vec![("wake-a".to_string(), relay)],
        "sent by the relay"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // One transaction, two queues, a batch: one wake-up per queue.
    exec(
        &mut producer,
        "BEGIN; SELECT keel.enqueue('wake-a', '{}'); SELECT keel.enqueue_batch('wake-b', ARRAY['{}', '{}']::jsonb[]); SELECT keel.enqueue('wake-a', '{}'); COMMIT",
    );
    let mut got: Vec<String> = notes(&mut listener, Duration::from_millis(500))
        .into_iter()
        .map(|(q, _)| q)
        .collect();
    got.sort();
    assert_eq!(got, vec!["wake-a".to_string(), "wake-b".to_string()]);
    // Gone: the producer sends it itself, at its commit.
    exec(&mut admin, &format!("SELECT pg_terminate_backend({relay})"));
    wait_for(Duration::from_secs(5), || {
        (waker_pid(&mut admin) != Some(relay)).then_some(())
    })
    .expect("the relay ends");
    // The launcher starts it again 2 s after it ended, not before.
    let producer_pid = one::<i32>(&mut producer, "SELECT pg_backend_pid()");
    assert_eq!(waker_pid(&mut admin), None);
    exec(&mut producer, "SELECT keel.enqueue('wake-a', '{}')");
    assert_eq!(
        notes(&mut listener, Duration::from_millis(300)),
        vec![("wake-a".to_string(), producer_pid)]
    );
    // It comes back, and relays again.
    let again = wait_for(Duration::from_secs(10), || {
        waker_pid(&mut admin).filter(|p| *p != relay)
    })
    .expect("the relay is started again");
    std::thread::sleep(Duration::from_millis(300));
    notes(&mut listener, Duration::from_millis(100));
    exec(&mut producer, "SELECT keel.enqueue('wake-a', '{}')");
    assert_eq!(
        notes(&mut listener, Duration::from_millis(500)),
        vec![("wake-a".to_string(), again)]
    );
    // keel.wake_relay = off: the producer's own NOTIFY, as before the relay.
    exec(
        &mut producer,
        "SET keel.wake_relay = off; SELECT keel.enqueue('wake-a', '{}'); RESET keel.wake_relay",
    );
    assert_eq!(
        notes(&mut listener, Duration::from_millis(500)),
        vec![("wake-a".to_string(), producer_pid)]
    );
    // Off in the configuration: the launcher stops the relays (their slots are free) and
    // producers notify themselves; on again, a relay is back.
    exec(&mut admin, "ALTER SYSTEM SET keel.wake_relay = off");
    exec(&mut admin, "SELECT pg_reload_conf()");
    wait_for(Duration::from_secs(10), || {
        waker_pid(&mut admin).is_none().then_some(())
    })
    .expect("no relay with keel.wake_relay = off");
    let mut fresh = env.pg.connect();
    let fresh_pid = one::<i32>(&mut fresh, "SELECT pg_backend_pid()");
    exec(&mut fresh, "SELECT keel.enqueue('wake-a', '{}')");
    assert_eq!(
        notes(&mut listener, Duration::from_millis(500)),
        vec![("wake-a".to_string(), fresh_pid)]
    );
    exec(&mut admin, "ALTER SYSTEM RESET keel.wake_relay");
    exec(&mut admin, "SELECT pg_reload_conf()");
    wait_for(Duration::from_secs(10), || waker_pid(&mut admin)).expect("the relay is back");
}

fn drop_and_purge(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('dq'); SELECT keel.enqueue('dq', '{}'); SELECT keel.enqueue('dq', '{}')");
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.drop_queue('dq')")).as_deref(),
        Some("55006")
    );
    assert_eq!(one::<i64>(&mut c, "SELECT keel.purge_queue('dq')"), 2);
    assert!(one::<bool>(&mut c, "SELECT keel.drop_queue('dq')"));
    assert!(
        !one::<bool>(&mut c, "SELECT keel.drop_queue('dq')"),
        "dropping a missing queue is false"
    );
    exec(
        &mut c,
        "SELECT keel.create_queue('dq2'); SELECT keel.enqueue('dq2', '{}')",
    );
    assert!(one::<bool>(
        &mut c,
        "SELECT keel.drop_queue('dq2', force => true)"
    ));
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM keel.jobs WHERE queue = 'dq2'"),
        0
    );
    assert_eq!(
        sqlstate(c.batch_execute("SELECT keel.enqueue('dq2', '{}')")).as_deref(),
        Some("42704")
    );
}

fn stats_and_stuck_jobs_views(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('st', visibility_timeout => '200 ms')",
    );
    for _ in 0..4 {
        exec(&mut c, "SELECT keel.enqueue('st', '{}')");
    }
    exec(&mut c, "SELECT keel.enqueue('st', '{}', delay => '1 hour')");
    // A rolled-back enqueue is not counted.
    exec(&mut c, "BEGIN; SELECT keel.enqueue('st', '{}'); ROLLBACK;");
    let jobs = claim(&mut c, "st", 2);
    assert!(ack(&mut c, jobs[0]));
    std::thread::sleep(Duration::from_millis(300));
    let r = c
        .query_one("SELECT ready, scheduled, running, expired_leases, dead, done, oldest_ready_age > interval '0',
                           enqueued_total, completed_total FROM keel.queue_stats WHERE queue = 'st'", &[])
        .unwrap();
    let got: (i64, i64, i64, i64, i64, i64, bool, i64, i64) = (
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
        r.get(7),
        r.get(8),
    );
    assert_eq!(got, (2, 1, 0, 1, 0, 0, true, 5, 1));
    let stuck: Vec<(i64, bool)> = c
        .query(
            "SELECT job_id, lease_expired FROM keel.stuck_jobs WHERE queue = 'st'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(stuck, vec![(jobs[1].0, true)]);
    let hist: i64 = one(
        &mut c,
        "SELECT sum(jobs)::bigint FROM keel.attempt_histogram WHERE queue = 'st' AND attempt = 1",
    );
    assert_eq!(hist, 1);
}

fn privileges_nothing_to_public_and_grants_work(env: &Env) {
    let mut admin = env.pg.connect();
    exec(
        &mut admin,
        "DROP ROLE IF EXISTS keel_app; DROP ROLE IF EXISTS keel_worker;
         CREATE ROLE keel_app LOGIN; CREATE ROLE keel_worker LOGIN;
         SELECT keel.create_queue('priv');",
    );
    let as_role = |role: &str| -> Client {
        let info = env
            .pg
            .conninfo(keel_pg_test::DATABASE)
            .replace("user=postgres", &format!("user={role}"));
        Client::connect(&info, keel_pg_test::NoTls).expect("connect as role")
    };
    let mut app = as_role("keel_app");
    assert_eq!(
        sqlstate(app.batch_execute("SELECT keel.enqueue('priv', '{}')")).as_deref(),
        Some("42501")
    );
    exec(
        &mut admin,
        "SELECT keel.grant_producer('keel_app'); SELECT keel.grant_consumer('keel_worker')",
    );
    let mut app = as_role("keel_app");
    let mut worker = as_role("keel_worker");
    exec(&mut app, "SELECT keel.enqueue('priv', '{}')");
    assert_eq!(
        sqlstate(app.batch_execute("SELECT * FROM keel.claim('priv')")).as_deref(),
        Some("42501")
    );
    assert_eq!(
        sqlstate(app.batch_execute("SELECT * FROM keel.jobs")).as_deref(),
        Some("42501"),
        "no direct table access"
    );
    assert_eq!(
        sqlstate(app.batch_execute("SELECT keel.create_queue('mine')")).as_deref(),
        Some("42501")
    );
    let job = claim(&mut worker, "priv", 1)[0];
    assert!(ack(&mut worker, job));
    assert_eq!(
        sqlstate(worker.batch_execute("SELECT keel.purge_queue('priv')")).as_deref(),
        Some("42501")
    );
    let public_grants: i64 = one(
        &mut admin,
        "SELECT count(*) FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
          WHERE p.pronamespace = 'keel'::regnamespace AND a.grantee = 0",
    );
    assert_eq!(public_grants, 0, "no keel function is executable by PUBLIC");
    drop(app);
    drop(worker);
    exec(
        &mut admin,
        "DROP OWNED BY keel_app, keel_worker; DROP ROLE keel_app; DROP ROLE keel_worker;",
    );
}

fn search_path_cannot_hijack_keel_functions(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "CREATE SCHEMA IF NOT EXISTS evil;
         CREATE OR REPLACE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'infinity'::timestamptz $$;
         CREATE OR REPLACE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$;
         SELECT keel.create_queue('hij');",
    );
    exec(&mut c, "SET search_path = evil, pg_catalog, public");
    let id: i64 = one(&mut c, "SELECT keel.enqueue('hij', '{}')");
    assert_eq!(
        claim(&mut c, "hij", 1),
        vec![(id, 1)],
        "keel functions ignore the caller's search_path"
    );
    exec(&mut c, "RESET search_path; DROP SCHEMA evil CASCADE");
}

fn jobs_survive_restart_and_crash(env: &Env) {
    let mut c = env.pg.connect();
    exec(&mut c, "SELECT keel.create_queue('durable')");
    let a: i64 = one(&mut c, "SELECT keel.enqueue('durable', '{\"n\":1}')");
    drop(c);
    env.pg.restart();
    let mut c = env.pg.connect();
    let b: i64 = one(&mut c, "SELECT keel.enqueue('durable', '{\"n\":2}')");
    drop(c);
    env.pg.crash();
    env.pg.start_again();
    let mut c = env.pg.connect();
    let got: Vec<i64> = claim(&mut c, "durable", 10).iter().map(|j| j.0).collect();
    assert_eq!(got, vec![a, b]);
}

fn many_consumers_drain_every_job_exactly_once(env: &Env) {
    const PRODUCERS: usize = 2;
    const CONSUMERS: usize = 8;
    const PREFILLED: i64 = 4000;
    const PER_PRODUCER: i64 = 1000;
    let total = PREFILLED + PRODUCERS as i64 * PER_PRODUCER;
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('drain', visibility_timeout => '10 min')",
    );
    exec(&mut c, &format!("SELECT keel.enqueue_batch('drain', array_agg(jsonb_build_object('n', g))) FROM generate_series(1, {PREFILLED}) g"));

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let mut conn = env.pg.connect();
            std::thread::spawn(move || {
                for n in 0..PER_PRODUCER {
                    conn.execute(
                        "SELECT keel.enqueue('drain', jsonb_build_object('p', $1::bigint))",
                        &[&n],
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    let (claims, acks) = consume(env, "drain", CONSUMERS, None);
    for t in producers {
        t.join().expect("producer");
    }
    assert_eq!(acks.len() as i64, total, "every job acked");
    assert!(acks.values().all(|n| *n == 1), "no job acked twice");
    let doubled: Vec<_> = claims.iter().filter(|(_, a)| a.len() > 1).collect();
    assert!(
        doubled.is_empty(),
        "jobs handed to two live leases: {doubled:?}"
    );
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.jobs WHERE queue = 'drain'"
        ),
        0,
        "none left behind"
    );
    println!("    drained {total} jobs with {CONSUMERS} consumers and {PRODUCERS} producers");
}

/// While nothing can be vacuumed (a session idle in a transaction with an xid, another in a
/// REPEATABLE READ transaction that scanned keel.jobs), claims run from floors that move every
/// few milliseconds over dead entries of the jobs just claimed: producers enqueue one by one
/// and in batches, at two priorities, a few jobs with a short delay; consumers leave about one
/// job in ten unacked (its lease comes back). Every job is acked exactly once, no attempt is
/// handed out twice, and none is left behind.
fn with_the_xmin_horizon_held_no_job_is_lost_or_doubled(env: &Env) {
    const PER_PRODUCER: i64 = 600;
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('pinned', visibility_timeout => '200 ms', max_attempts => 100)",
    );
    let mut idle = env.pg.connect();
    exec(&mut idle, "BEGIN");
    one::<i64>(&mut idle, "SELECT txid_current()");
    let mut scanner = env.pg.connect();
    exec(&mut scanner, "BEGIN ISOLATION LEVEL REPEATABLE READ");
    one::<i64>(&mut scanner, "SELECT count(*) FROM keel.jobs");
    let producers: Vec<_> = (0..2i64)
        .map(|p| {
            let mut conn = env.pg.connect();
            std::thread::spawn(move || {
                let mut made = 0;
                for n in 0..PER_PRODUCER / 10 {
                    if n % 2 == 0 {
                        for k in 0..10 {
                            let delay = if k == 0 { "30 ms" } else { "0" };
                            conn.execute(
                                "SELECT keel.enqueue('pinned', jsonb_build_object('n', $1::bigint), delay => $2::text::interval, priority => $3)",
                                &[&(n * 10 + k), &delay, &((n % 4 == 0) as i32)],
                            )
                            .unwrap();
                        }
                    } else {
                        conn.execute(
                            "SELECT keel.enqueue_batch('pinned', array_fill(jsonb_build_object('p', $1::bigint), ARRAY[10]), priority => $2)",
                            &[&p, &((n % 3 == 0) as i32)],
                        )
                        .unwrap();
                    }
                    made += 10;
                    std::thread::sleep(Duration::from_millis(2));
                }
                made
            })
        })
        .collect();
    let (claims, acks) = consume(env, "pinned", 6, Some(10));
    let made: i64 = producers
        .into_iter()
        .map(|t| t.join().expect("producer"))
        .sum();
    // The horizon was held all along.
    one::<i64>(&mut idle, "SELECT txid_current()");
    exec(&mut idle, "COMMIT");
    exec(&mut scanner, "COMMIT");
    assert_eq!(made, 2 * PER_PRODUCER);
    assert_eq!(acks.len() as i64, made, "every job acked");
    assert_each_acked_once_and_no_attempt_twice(&claims, &acks);
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.jobs WHERE queue = 'pinned'"
        ),
        0,
        "none left behind"
    );
    let reclaimed = claims.values().filter(|a| a.len() > 1).count();
    println!(
        "    {made} jobs with the horizon held, {reclaimed} claimed again after an abandoned lease"
    );
}

fn lease_commit_async_only_when_nothing_else_was_written(env: &Env) {
    const ASYNC: &str = "commits without waiting for the WAL flush";
    let (mut c, notices) = env.pg.connect_with_notices();
    exec(
        &mut c,
        "SELECT keel.create_queue('lc'); CREATE TABLE IF NOT EXISTS lc_results (job bigint)",
    );
    exec(&mut c, "SET client_min_messages = debug1");
    let async_commits = |c: &mut Client, sql: &str| -> usize {
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
    exec(
        &mut c,
        "SELECT keel.enqueue_batch('lc', array_fill('{}'::jsonb, ARRAY[6]))",
    );
    // Claim and ack alone: nothing of the caller's is at stake.
    assert_eq!(
        async_commits(&mut c, "SELECT * FROM keel.claim('lc', 6)"),
        1,
        "claim alone"
    );
    let jobs: Vec<i64> = c
        .query(
            "SELECT job_id FROM keel.jobs WHERE queue = 'lc' ORDER BY job_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        async_commits(&mut c, &format!("SELECT keel.ack({}, 1)", jobs[0])),
        1,
        "ack alone"
    );
    assert_eq!(
        async_commits(
            &mut c,
            &format!(
                "BEGIN; SELECT keel.ack({}, 1); SELECT keel.ack({}, 1); COMMIT",
                jobs[1], jobs[2]
            )
        ),
        1,
        "several acks in one transaction"
    );
    // The caller's own writes, before or after, keep the commit synchronous.
    assert_eq!(
        async_commits(
            &mut c,
            &format!(
                "BEGIN; INSERT INTO lc_results VALUES ({0}); SELECT keel.ack({0}, 1); COMMIT",
                jobs[3]
            )
        ),
        0,
        "a write before the ack"
    );
    assert_eq!(
        async_commits(
            &mut c,
            &format!(
                "BEGIN; SELECT keel.ack({0}, 1); INSERT INTO lc_results VALUES ({0}); COMMIT",
                jobs[4]
            )
        ),
        0,
        "a write after the ack"
    );
    assert_eq!(
        async_commits(
            &mut c,
            &format!(
                "SET keel.lease_commit = sync; SELECT keel.ack({}, 1); RESET keel.lease_commit",
                jobs[5]
            )
        ),
        0,
        "keel.lease_commit = sync"
    );
    // A claim that hands out a second attempt waits for the flush, even with
    // synchronous_commit = off (a crash must not make it hand out the same lease twice).
    const FLUSH: &str = "a lease a crash must not forget waits for the WAL flush";
    exec(
        &mut c,
        "SELECT keel.enqueue('lc', '{}');
         SELECT keel.fail(job_id, attempt, 'again', '0 s') FROM keel.claim('lc')",
    );
    notices.lock().unwrap().clear();
    exec(
        &mut c,
        "SET synchronous_commit = off; SELECT * FROM keel.claim('lc'); RESET synchronous_commit",
    );
    let flushed = notices
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.contains(FLUSH))
        .count();
    assert_eq!(flushed, 1, "a claim of attempt 2 waits for the flush");
    assert_eq!(
        async_commits(
            &mut c,
            "SELECT keel.extend(job_id, 2, '1 minute') FROM keel.jobs WHERE queue = 'lc'"
        ),
        0,
        "extend never commits without the flush"
    );
    exec(
        &mut c,
        "SELECT keel.ack(job_id, 2) FROM keel.jobs WHERE queue = 'lc'",
    );
    assert_eq!(one::<i64>(&mut c, "SELECT count(*) FROM lc_results"), 2);
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM keel.jobs WHERE queue = 'lc'"),
        0
    );
    assert_eq!(
        one::<String>(&mut c, "SHOW synchronous_commit"),
        "on",
        "the session's setting is restored"
    );
    exec(&mut c, "DROP TABLE lc_results");
}

/// Consumers that sometimes "die" holding a job (never ack it): with a short visibility
/// timeout the job comes back to another consumer with a higher attempt; every job still ends
/// acked exactly once, and no attempt number of a job is ever handed out twice.
fn abandoned_leases_come_back_and_are_acked_once(env: &Env) {
    const JOBS: i64 = 600;
    const CONSUMERS: usize = 6;
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('abandon', visibility_timeout => '300 ms', max_attempts => 100)",
    );
    exec(&mut c, &format!("SELECT keel.enqueue_batch('abandon', array_agg(jsonb_build_object('n', g))) FROM generate_series(1, {JOBS}) g"));
    let (claims, acks) = consume(env, "abandon", CONSUMERS, Some(10));
    assert_eq!(acks.len() as i64, JOBS, "every job acked");
    assert_each_acked_once_and_no_attempt_twice(&claims, &acks);
    let reclaimed = claims.values().filter(|a| a.len() > 1).count();
    assert!(reclaimed > 0, "some abandoned jobs were claimed again");
    assert_eq!(
        one::<i64>(
            &mut c,
            "SELECT count(*) FROM keel.jobs WHERE queue = 'abandon'"
        ),
        0
    );
    println!("    {JOBS} jobs, {reclaimed} of them claimed again after an abandoned lease");
}

/// Every acked job was acked once; no job's attempt was handed out twice.
fn assert_each_acked_once_and_no_attempt_twice(
    claims: &HashMap<i64, Vec<i32>>,
    acks: &HashMap<i64, usize>,
) {
    assert!(acks.values().all(|n| *n == 1), "no job acked twice");
    for (job, attempts) in claims.iter() {
        let mut sorted = attempts.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            attempts.len(),
            "job {job}: an attempt was handed out twice: {attempts:?}"
        );
    }
}

/// Claims by job id (the attempts handed out) and acks that returned true by job id.
type Ledger = (HashMap<i64, Vec<i32>>, HashMap<i64, usize>);

/// Runs `consumers` connections that claim from `queue` (batch 1, 10, 3 or 7 by consumer) and
/// ack each job, until the queue has stayed empty for about half a second. With
/// `abandon_one_in = Some(n)`, about one job in n is left unacked, as by a worker that died.
fn consume(
    env: &Env,
    queue: &'static str,
    consumers: usize,
    abandon_one_in: Option<u64>,
) -> Ledger {
    let claims = Arc::new(Mutex::new(HashMap::<i64, Vec<i32>>::new()));
    let acks = Arc::new(Mutex::new(HashMap::<i64, usize>::new()));
    let threads: Vec<_> = (0..consumers)
        .map(|i| {
            let mut conn = env.pg.connect();
            let (claims, acks) = (claims.clone(), acks.clone());
            std::thread::spawn(move || {
                let batch = [1, 10, 3, 7][i % 4];
                let mut rng = i as u64;
                let mut idle = 0;
                while idle < 20 {
                    let got = claim(&mut conn, queue, batch);
                    if got.is_empty() {
                        idle += 1;
                        std::thread::sleep(Duration::from_millis(25));
                        continue;
                    }
                    idle = 0;
                    for job in got {
                        claims.lock().unwrap().entry(job.0).or_default().push(job.1);
                        rng = rng
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        if abandon_one_in.is_some_and(|n| (rng >> 33).is_multiple_of(n)) {
                            continue;
                        }
                        if ack(&mut conn, job) {
                            *acks.lock().unwrap().entry(job.0).or_default() += 1;
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("consumer");
    }
    let ledger = (claims.lock().unwrap().clone(), acks.lock().unwrap().clone());
    ledger
}

/// Queues and jobs are data: pg_dump of the database must carry them to a restored copy.
fn pg_dump_keeps_queues_and_jobs(env: &Env) {
    let mut c = env.pg.connect();
    exec(
        &mut c,
        "SELECT keel.create_queue('dumped', max_attempts => 7)",
    );
    let id: i64 = one(
        &mut c,
        "SELECT keel.enqueue('dumped', '{\"k\": 1}', idempotency_key => 'dump-1')",
    );
    let mut r = env.pg.restored_copy("keel_restored");
    let max: i32 = one(
        &mut r,
        "SELECT max_attempts FROM keel.queues WHERE queue = 'dumped'",
    );
    assert_eq!(max, 7);
    let again: i64 = one(
        &mut r,
        "SELECT keel.enqueue('dumped', '{}', idempotency_key => 'dump-1')",
    );
    assert_eq!(again, id, "the restored job keeps its id and key");
    let next: i64 = one(&mut r, "SELECT keel.enqueue('dumped', '{}')");
    assert!(
        next > id,
        "the job id sequence continues after the restored ids"
    );
    assert_eq!(claim(&mut r, "dumped", 10).len(), 2);
    drop(r);
    env.pg.drop_database("keel_restored");
}
