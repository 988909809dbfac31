-- pg_keel privileges: nothing is granted to PUBLIC; roles get what they need through
-- keel.grant_producer / grant_consumer / grant_sessions / grant_monitor / grant_admin, which
-- grant EXECUTE (what a role may do) and write keel.grants (where: src/auth.rs).
-- Runs last in CREATE EXTENSION.

-- The role arrives as regrole: the cast rejects unknown roles (42704) and its text form is a
-- correctly quoted identifier, so the GRANT text is built from catalog objects only.
CREATE FUNCTION keel._grant(role regrole, functions regprocedure[], relations regclass[])
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f regprocedure;
    r regclass;
BEGIN
    IF role IS NULL THEN
        PERFORM keel._invalid_argument('role', 'must not be NULL');
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA keel TO %s', role);
    FOREACH f IN ARRAY functions LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, role);
    END LOOP;
    FOREACH r IN ARRAY coalesce(relations, '{}') LOOP
        EXECUTE format('GRANT SELECT ON %s TO %s', r, role);
    END LOOP;
END
$$;

-- Records where `role` may act for `capability`: each of `names`, or every one ('*') when
-- `names` is NULL. Names are checked like the objects they name; they need not exist yet.
CREATE FUNCTION keel._grant_scope(role regrole, capability text, names text[])
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n text;
BEGIN
    IF role IS NULL THEN
        PERFORM keel._invalid_argument('role', 'must not be NULL');
    END IF;
    FOREACH n IN ARRAY coalesce(names, ARRAY['*']) LOOP
        IF n IS NULL THEN
            PERFORM keel._invalid_argument(capability, 'names must not be NULL (leave the whole argument NULL for every one)');
        ELSIF n = '*' THEN
            NULL;
        ELSIF capability IN ('produce', 'consume') THEN
            PERFORM keel._check_name('queue', n);
        ELSIF capability = 'emit' THEN
            PERFORM keel._check_name('topic', n);
        ELSIF n = '' OR octet_length(n) > 1024 THEN
            PERFORM keel._invalid_argument('limits', 'names are 1 to 1024 bytes');
        END IF;
        INSERT INTO keel.grants (role, capability, name) VALUES (role, capability, n)
        ON CONFLICT DO NOTHING;
    END LOOP;
    PERFORM keel._grants_changed();
END
$$;

-- A producer: enqueue to `queues`, emit on `topics`, decide on the rate-limit policies
-- `limits` (NULL: every one; an empty array: none). Inline keel.rate_limit needs every policy.
CREATE FUNCTION keel.grant_producer(
    role regrole,
    queues text[] DEFAULT NULL,
    topics text[] DEFAULT NULL,
    limits text[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM keel._grant(role, ARRAY[
        'keel.enqueue(text, jsonb, interval, integer, text, integer, text, bigint[], text)',
        'keel.enqueue_batch(text, jsonb[], interval, integer)',
        'keel.emit(text, jsonb, text, bigint, jsonb)',
        'keel.rate_limit(text, integer, interval, integer, text, integer)',
        'keel.check(text, text, integer)',
        'keel.rate_peek(text, text)',
        'keel.rate_refund(text, text, integer)',
        'keel.rate_limit_headers(text, integer, bigint, bigint)',
        'keel.rate_limit_headers(text[], integer[], bigint[], bigint[])',
        'keel.check_many(text[], text[], integer[])',
        'keel.acquire(text, text, interval)',
        'keel.release(text, text, uuid)',
        'keel.cancel(bigint, text)',
        'keel.cancel_queue(text, text)',
        -- What the SQL wrappers call, as the caller (see src/auth.rs).
        'keel._authorize(text, text)',
        'keel._emit(bigint, text, jsonb, text, bigint, jsonb)',
        'keel._cancel(bigint, bigint, text)',
        'keel._cancel_queue(bigint, text, text)',
        'keel._rate_limit_headers(bigint, text, integer, bigint, bigint)',
        'keel._acquire(bigint, text, text, interval)',
        'keel._release(bigint, text, text, uuid)'
    ]::regprocedure[], NULL);
    PERFORM keel._grant_scope(role, 'produce', queues);
    PERFORM keel._grant_scope(role, 'emit', topics);
    PERFORM keel._grant_scope(role, 'limit', limits);
END
$$;

-- A consumer: claim from `queues` (NULL: every one), and ack, fail and extend the leases it
-- claimed (a lease belongs to the role that claimed it).
CREATE FUNCTION keel.grant_consumer(role regrole, queues text[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM keel._grant(role, ARRAY[
        'keel.claim(text, integer, interval, text)',
        'keel.claim(text[], integer, interval, text)',
        'keel.ack(bigint, integer, jsonb)',
        'keel.ack_batch(bigint[], integer[])',
        'keel.fail(bigint, integer, text, interval)',
        'keel.extend(bigint, integer, interval)',
        'keel._authorize(text, text)',
        'keel._fail(bigint, bigint, integer, text, interval)',
        'keel.snooze(bigint, integer, interval)',
        'keel._snooze(bigint, bigint, integer, interval)',
        'keel.progress(bigint, integer, jsonb)',
        'keel._progress(bigint, bigint, integer, jsonb)'
    ]::regprocedure[], NULL);
    PERFORM keel._grant_scope(role, 'consume', queues);
END
$$;

-- The sessions API, for the role that serves logins: it reads and revokes every user's
-- sessions, so it is granted on its own, not with producing.
CREATE FUNCTION keel.grant_sessions(role regrole)
RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT keel._grant(role, ARRAY[
        'keel.session_create(text, interval, interval, jsonb, integer)',
        'keel.session_validate(text)',
        'keel.session_set_data(text, jsonb, boolean)',
        'keel.session_rotate(text, interval)',
        'keel.session_login(text, text, integer)',
        'keel.session_revoke(text)',
        'keel.session_revoke_id(uuid)',
        'keel.session_revoke_user(text, uuid)',
        'keel.user_sessions(text)',
        'keel.token_create(text, text, interval, jsonb)',
        'keel.token_consume(text, text)',
        'keel.token_revoke(text, text)'
    ]::regprocedure[], NULL)
$$;

-- Takes back everything the grant helpers gave `role`: its rows in keel.grants, EXECUTE on
-- every keel function, SELECT on every keel table and view, USAGE on the schema.
CREATE FUNCTION keel.revoke_all(role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF role IS NULL THEN
        PERFORM keel._invalid_argument('role', 'must not be NULL');
    END IF;
    DELETE FROM keel.grants g WHERE g.role = revoke_all.role;
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA keel FROM %s', role);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA keel FROM %s', role);
    EXECUTE format('REVOKE USAGE ON SCHEMA keel FROM %s', role);
    PERFORM keel._grants_changed();
END
$$;

-- For a monitoring role or exporter: health and metrics only (they read as their owner).
CREATE FUNCTION keel.grant_monitor(role regrole)
RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT keel._grant(role, ARRAY[
        'keel.health()',
        'keel.metrics()'
    ]::regprocedure[], NULL)
$$;

CREATE FUNCTION keel.grant_admin(role regrole)
RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT keel.grant_producer(role);
    SELECT keel.grant_consumer(role);
    SELECT keel.grant_monitor(role);
    SELECT keel.grant_sessions(role);
    SELECT keel._grant(role, ARRAY[
        'keel.create_queue(text, interval, integer, interval, interval, bigint, interval, interval, text, integer, text, text)',
        'keel.alter_queue(text, interval, integer, interval, interval, bigint, interval, boolean, interval, text, boolean, integer, boolean, text, boolean, text)',
        'keel.set_key_weight(text, text, integer)',
        'keel.pause_queue(text)',
        'keel.resume_queue(text)',
        'keel.drop_queue(text, boolean)',
        'keel.purge_queue(text)',
        'keel.retry_dead(text, bigint)',
        'keel.reap_expired(integer)',
        'keel._queue_counters()',
        'keel._queue_next_allowed(text, text)',
        'keel.create_route(text, text, text, bigint)',
        'keel.outbox_replay(text, bigint, bigint)',
        'keel.worker_status()',
        'keel.set_task(text, interval, boolean)',
        'keel.cleanup_done_jobs(integer)',
        'keel.cleanup_outbox(integer)',
        'keel.create_limit(text, integer, interval, text, integer, text, boolean, boolean)',
        'keel.alter_limit(text, integer, interval, text, integer, text, boolean, boolean, boolean)',
        'keel.drop_limit(text)',
        'keel.rate_reset(text, text)',
        'keel.cleanup_rate_limits(integer)',
        'keel.cleanup_sessions(integer)',
        'keel.create_schedule(text, text, text, jsonb, text, integer, text)',
        'keel.alter_schedule(text, text, text, jsonb, text, integer, text, boolean)',
        'keel.drop_schedule(text)',
        'keel.run_schedules(integer, interval)',
        'keel.schedule_preview(text, text, integer, timestamptz)',
        'keel.release_dependents(integer, interval)'
    ]::regprocedure[], ARRAY[
        'keel.queue_stats', 'keel.stuck_jobs', 'keel.attempt_histogram', 'keel.outbox_stats',
        'keel.outbox', 'keel.tasks', 'keel.task_runs', 'keel.rate_limits',
        'keel.rate_limit_denials', 'keel.grants', 'keel.schedules'
    ]::regclass[])
$$;

-- Functions are executable by PUBLIC by default in PostgreSQL; not here.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA keel FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA keel FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA keel FROM PUBLIC;

-- What every public object is for, so \df+ keel.* and \dv+ keel.* explain themselves. Here,
-- in the file that runs after every object exists (pgrx allows one such file); the update
-- script repeats them. pg_test/tests/upgrade.rs checks that none is missing.
COMMENT ON SCHEMA keel IS 'pg_keel: job queues, a transactional outbox to Redis, rate limits and sessions as SQL functions, with PostgreSQL as the authority and Redis as the acceleration. Objects whose names start with _ are internal.';

-- Tables

COMMENT ON TABLE keel.queues IS 'Queue settings, one row per queue: default lease (visibility_timeout), max_attempts, retry backoff, max_ready, dedupe_window, paused, keep_finished, progress_topic, max_running_per_key and rate_limit. Written by keel.create_queue and keel.alter_queue; kept by pg_dump.';
COMMENT ON TABLE keel.queue_keys IS 'The concurrency keys of round_robin queues: the weight keel.set_key_weight gave (1 unless set) and the key''s pass, its place in the round of claims. Written by claims and set_key_weight; kept by pg_dump.';
COMMENT ON TABLE keel.jobs IS 'Every job of every queue: state is ready, running, done, dead or cancelled, a lease is (job_id, attempt), and for running jobs visible_at is the lease expiry. Enqueues insert natively, so a CHECK or NOT NULL constraint, an INSERT trigger or FORCE ROW LEVEL SECURITY added to it makes them fail with 55000.';
COMMENT ON TABLE keel.job_dependencies IS 'One row per job enqueued with after => ids and each job it still waits for (after_id), with not_before, the earliest time it may run. keel.release_dependents removes the rows as those jobs finish.';
COMMENT ON TABLE keel.job_schedules IS 'The schedules behind the view keel.schedules: expression, time zone, payload, priority, catch_up, next slot and last run of each. Written by keel.create_schedule and keel.alter_schedule; kept by pg_dump.';
COMMENT ON TABLE keel.grants IS 'Where each role may act: queues it may produce to (produce) or consume from (consume), topics it may emit on (emit) and rate-limit policies it may decide on (limit); name ''*'' is every one. Written by the grant helpers; delete a row to take one name back.';
COMMENT ON TABLE keel.outbox_events IS 'The outbox events, written once by keel.emit and never updated on dispatch (only keel.outbox_replay bumps replays). Dispatched events are deleted once older than keel.outbox_retention.';
COMMENT ON TABLE keel.outbox_pending IS 'Committed events not yet in Redis: the dispatcher''s work list in id order, with attempts (refusals by Redis) and last_error. Delivering an event deletes its row here.';
COMMENT ON TABLE keel.outbox_dead IS 'Events Redis refused keel.outbox_max_attempts times, kept until replayed with keel.outbox_replay.';
COMMENT ON TABLE keel.outbox_topics IS 'When the dispatcher last delivered an event of each topic, one row per topic.';
COMMENT ON TABLE keel.outbox_routes IS 'Where each topic goes (target stream, list or pubsub, redis_key, stream maxlen), written by keel.create_route. A topic without a row goes to the stream <keel.redis_prefix><topic>.';
COMMENT ON TABLE keel.outbox_instance IS 'The outbox''s dedupe epoch, naming this outbox in Redis'' dedupe records. Made at CREATE EXTENSION and not dumped, so a re-created or restored outbox is never taken for an old one.';
COMMENT ON TABLE keel.rate_limits IS 'Named rate-limit policies (max per per, algorithm, burst, durability, log_denials, enforce), written by keel.create_limit and keel.alter_limit; kept by pg_dump.';
COMMENT ON TABLE keel.rate_limit_state IS 'One row per (policy, key) that is not at full capacity, holding the algorithm''s state; policy '''' holds the keys of keel.rate_limit. Decisions update it natively, so they refuse with 55000 while the table has triggers.';
COMMENT ON TABLE keel.rate_limit_slots IS 'The slots held of concurrency limits (algorithm concurrency), one row per keel.acquire that was allowed (token, acquired_at, expires_at) until keel.release deletes it or it expires; expired slots are free and deleted by the next acquire of their key or by cleanup_rate_limits.';
COMMENT ON TABLE keel.rate_limit_denials IS 'Denied calls of policies with log_denials (policy, key, at, cost, retry_after_ms), and with shadow true the calls a policy in shadow mode (enforce false) allowed but would have denied; kept for keel.rate_denial_retention.';
COMMENT ON TABLE keel.tokens IS 'One row per outstanding one-time token (keel.token_create): only its SHA-256 (token_hash), the purpose it was made for, its subject and data, and its expiry. keel.token_consume deletes the row; expired ones are deleted keel.session_cleanup_grace after they expire.';
COMMENT ON TABLE keel.session_users IS 'One row per user whose sessions are capped (max_per_user of session_create or session_login): its row lock queues that user''s capped logins so the cap is exact. until is at least the latest expiry of a session created under a cap (rewritten only when a new one would outlive it); the cleanup deletes the row after it.';
COMMENT ON TABLE keel.sessions IS 'One row per session: only the SHA-256 of its token (token_hash), user_id, data, expiry, idle expiry and revocation. Ended sessions are deleted keel.session_cleanup_grace after they end.';
COMMENT ON TABLE keel.tasks IS 'The background worker''s maintenance tasks (reap_expired and the cleanups): how often each runs, whether it is enabled, and its last run. Change with keel.set_task; not dumped, so a restore has the defaults.';
COMMENT ON TABLE keel.task_runs IS 'Every run of a maintenance task by the worker (started_at, duration, rows, error), kept for keel.task_run_retention. Not dumped.';

-- Views

COMMENT ON VIEW keel.queue_stats IS 'Per queue: paused, job counts (ready: claimable now; scheduled: waiting for a delay, backoff or dependencies; running; expired_leases; dead; done; cancelled) and oldest_ready_age. enqueued_total and completed_total count since server start and are NULL without shared_preload_libraries; next_allowed_at is when a queue''s rate_limit next allows a claim (NULL without one).';
COMMENT ON VIEW keel.stuck_jobs IS 'Running jobs whose lease expired, or claimed longer ago than keel.stuck_threshold (default 15 minutes), with worker, claim time, lease expiry and last error.';
COMMENT ON VIEW keel.attempt_histogram IS 'Number of jobs per queue, state and attempt: the retry-count distribution.';
COMMENT ON VIEW keel.outbox IS 'Every outbox event kept, with its delivery state (pending, dispatched or dead), attempts (refusals by Redis), last_error, died_at and replays.';
COMMENT ON VIEW keel.outbox_stats IS 'Per topic: pending events and the age of the oldest, dispatched and dead events still kept, the last error, and when an event of the topic last reached Redis.';
COMMENT ON VIEW keel.schedules IS 'Every schedule with its expression, time zone, next slot, the last slot it enqueued and that job''s id and current state (NULL once the job is gone), and last_error of its last round (NULL when it went well).';

-- Queues

COMMENT ON FUNCTION keel.create_queue(text, interval, integer, interval, interval, bigint, interval, interval, text, integer, text, text) IS 'Creates a queue with its default lease (visibility_timeout), max_attempts, retry backoff, backpressure limit max_ready (NULL: none), idempotency dedupe_window, keep_finished history, optional progress_topic, and flow control: max_running_per_key (live leases per concurrency_key), rate_limit (a keel.create_limit policy charged per claimed job) and fairness (fifo, or round_robin across concurrency keys by weight). Returns true when created, false when it already existed (left unchanged); bad settings: 22023.';
COMMENT ON FUNCTION keel.alter_queue(text, interval, integer, interval, interval, bigint, interval, boolean, interval, text, boolean, integer, boolean, text, boolean, text) IS 'Changes only the queue settings given (NULL keeps one); clear_max_ready, clear_progress_topic, clear_max_running_per_key and clear_rate_limit remove a setting. A new max_attempts applies to every job without its own, waiting ones included; unknown queue: 42704.';
COMMENT ON FUNCTION keel.set_key_weight(text, text, integer) IS 'Sets a concurrency key''s weight in a round_robin queue (1 to 1000000; every key starts at 1): a key of weight 3 gets three claims for every one of a key of weight 1 while both have jobs waiting. Unknown queue: 42704; bad key or weight: 22023.';
COMMENT ON FUNCTION keel.pause_queue(text) IS 'Pauses a queue: enqueues are still accepted but claims hand out nothing; leases already given keep running. Unknown queue: 42704.';
COMMENT ON FUNCTION keel.resume_queue(text) IS 'Resumes a paused queue, so claims hand out its jobs again. Unknown queue: 42704.';
COMMENT ON FUNCTION keel.drop_queue(text, boolean) IS 'Drops a queue (and with force its jobs) after waiting for enqueues in flight; returns false when there was no such queue. Refuses with 55006 while it holds jobs unless force, and with 2BP01 while a schedule enqueues into it.';
COMMENT ON FUNCTION keel.purge_queue(text) IS 'Deletes every job of the queue, in any state, and returns how many. Unknown queue: 42704.';
COMMENT ON FUNCTION keel.enqueue(text, jsonb, interval, integer, text, integer, text, bigint[], text) IS 'Adds a job in the caller''s transaction and returns its id; it becomes claimable after delay, lower priority numbers first, after => ids makes it wait until those jobs are done, and concurrency_key is its key for the queue''s max_running_per_key and rate_limit. A taken idempotency_key returns the existing job (on_duplicate => ''replace'' updates it while it waits); a queue holding max_ready waiting jobs refuses with 53400, a payload over keel.max_payload_bytes with 54000.';
COMMENT ON FUNCTION keel.enqueue_batch(text, jsonb[], interval, integer) IS 'Enqueues one job per element of payloads in one call and returns their ids in input order, with one wake-up. The whole batch counts against max_ready (53400); a NULL element is 22023 and nothing is inserted.';
COMMENT ON FUNCTION keel.claim(text, integer, interval, text) IS 'Claims up to batch (1 to 10000) claimable jobs of the queue, lowest priority number first, with a lease of visibility_timeout (default: the queue''s); returns one row per job. Ack, fail, extend or snooze with (job_id, attempt); unknown queue: 42704, a queue outside the caller''s grant: 42501.';
COMMENT ON FUNCTION keel.claim(text[], integer, interval, text) IS 'Claims up to batch jobs across up to 100 queues: every job of one priority before any of the next, then queue by queue in the order given; each row also says its queue. Paused queues are passed over; leases and errors as in the single-queue claim.';
COMMENT ON FUNCTION keel.ack(bigint, integer, jsonb) IS 'Completes the job held by the lease (job_id, attempt): it is deleted, or kept as done with result when its queue keeps finished jobs or it has an idempotency key. Returns false when the lease was lost (claimed again, finished, cancelled, or held by another role).';
COMMENT ON FUNCTION keel.ack_batch(bigint[], integer[]) IS 'Acks each lease (job_ids[i], attempts[i]) as ack would, in one call; returns how many were still held. Arrays of different lengths, one of them NULL, NULL elements or more than 10000 pairs: 22023.';
COMMENT ON FUNCTION keel.fail(bigint, integer, text, interval) IS 'Records a failed attempt of the held job, keeping error as last_error: returns ''retry'' (ready again after retry_in, or exponential backoff with jitter) or ''dead'' once max_attempts are used up. NULL when the lease was lost.';
COMMENT ON FUNCTION keel.extend(bigint, integer, interval) IS 'Heartbeat: the lease (job_id, attempt) now expires extend_by from now; returns the new expiry, or NULL when the lease was lost or the job cancelled (stop working on it). Its commit waits for the WAL flush.';
COMMENT ON FUNCTION keel.snooze(bigint, integer, interval) IS 'Gives a held job back without using up a try: the lease ends and the job is ready again after delay. Returns false when the lease was lost; a delay that is NULL, negative or over 100 years is 22023.';
COMMENT ON FUNCTION keel.progress(bigint, integer, jsonb) IS 'The lease holder reports how far it got: any JSON, kept in keel.jobs.progress across retries (the last report wins) and also emitted as an outbox event when the queue has a progress_topic. Returns false when the lease was lost or the job finished; NULL is 22023, over keel.max_payload_bytes 54000.';
COMMENT ON FUNCTION keel.cancel(bigint, text) IS 'Cancels a waiting or running job (a running job''s holder learns it at its next call with the lease), keeping reason as dead_reason. Returns the state after the call: ''cancelled'', ''done'' or ''dead'' for a job already finished, or NULL when there is no such job or the caller lacks the produce grant of its queue.';
COMMENT ON FUNCTION keel.cancel_queue(text, text) IS 'Cancels every waiting job (ready, delayed or waiting for a retry) of the queue and returns how many; running jobs are left to finish. Needs the produce grant of the queue; unknown queue: 42704.';
COMMENT ON FUNCTION keel.retry_dead(text, bigint) IS 'Sends the dead jobs of the queue (or only job_id) back to ready now with all their tries again, and returns how many. Their attempt keeps growing, so leases from before they died stay refused; unknown queue: 42704.';
COMMENT ON FUNCTION keel.reap_expired(integer) IS 'Marks dead (reason lease expired) the running jobs whose lease expired on their last attempt, at most max_rows per call, and returns how many. The worker runs it every 5 seconds (task reap_expired).';
COMMENT ON FUNCTION keel.release_dependents(integer, interval) IS 'Moves jobs enqueued with after => ids along: one becomes claimable once every job it waits for is done or gone, and is cancelled when one of them is dead or cancelled; returns how many it released or cancelled. Looks at up to max_rows waiting jobs for at most max_duration; the worker calls it every second.';
COMMENT ON FUNCTION keel.cleanup_done_jobs(integer) IS 'Deletes done jobs without an idempotency key or past their queue''s dedupe_window, and cancelled jobs past it, once keep_finished has passed since they finished; at most max_rows per call, returns how many. Dead jobs stay; the worker runs it every minute.';

-- Schedules

COMMENT ON FUNCTION keel.create_schedule(text, text, text, jsonb, text, integer, text) IS 'Creates a schedule that enqueues one job (payload, priority) into queue for each slot of cron (five cron fields, a macro such as @daily, or @every <duration>) in timezone, exactly once per slot; catch_up (latest, all or none) decides what happens to missed slots. True when created, false when the name existed; a bad expression or zone: 22023, unknown queue: 42704.';
COMMENT ON FUNCTION keel.alter_schedule(text, text, text, jsonb, text, integer, text, boolean) IS 'Changes only the schedule settings given; a different cron or timezone, or enabled => true, starts it again from its first slot after now, and enabled => false stops it. Unknown schedule: 42704.';
COMMENT ON FUNCTION keel.drop_schedule(text) IS 'Deletes a schedule; false when there was no such schedule. Jobs it already enqueued stay.';
COMMENT ON FUNCTION keel.run_schedules(integer, interval) IS 'Enqueues the due slots of up to max_rows schedules, least recently run first, taking no further schedule once max_duration has passed; returns how many jobs it enqueued. A schedule whose enqueue fails keeps its slot and records last_error; the worker calls it every second.';
COMMENT ON FUNCTION keel.schedule_preview(text, text, integer, timestamp with time zone) IS 'Returns the next count (1 to 1000) slots of a cron expression in timezone after the time after, to check an expression before creating a schedule. A bad expression or zone: 22023.';

-- Outbox

COMMENT ON FUNCTION keel.emit(text, jsonb, text, bigint, jsonb) IS 'Writes an event on topic in the caller''s transaction and returns its id; the worker sends it to Redis after commit (never on rollback), in order per (topic, aggregate_id). With aggregate_id and version a retried emit returns the first id; over keel.max_payload_bytes: 54000.';
COMMENT ON FUNCTION keel.create_route(text, text, text, bigint) IS 'Sets where a topic''s events go: target ''stream'' (XADD, the default), ''list'' (LPUSH) or ''pubsub'' (PUBLISH) at redis_key (default <keel.redis_prefix><topic>), a stream trimmed approximately to maxlen. Calling it again replaces the route.';
COMMENT ON FUNCTION keel.outbox_replay(text, bigint, bigint) IS 'Sends the dispatched or dead events of topic with ids from from_id to to_id (NULL: no upper bound) to Redis again, while still kept, and returns how many. A replay appends again even to a stream that has the event.';
COMMENT ON FUNCTION keel.cleanup_outbox(integer) IS 'Deletes dispatched outbox events created more than keel.outbox_retention ago, at most max_rows per call, and returns how many. Pending and dead events stay; the worker runs it every minute.';
COMMENT ON FUNCTION keel.worker_status() IS 'Reports this database''s background worker: pid, state, Redis target (never with a password) and connection, last dispatch, last error and dispatch totals. When no worker runs, state says why (not preloaded, in recovery, not listed in keel.database, no slot, and so on).';

-- Rate limits

COMMENT ON FUNCTION keel.create_limit(text, integer, interval, text, integer, text, boolean, boolean) IS 'Creates a named rate-limit policy: max calls per per for each key, algorithm token_bucket (the default, bursts up to burst), fixed_window, sliding_window or concurrency (at most max slots held at once, taken with keel.acquire), durability durable, async or memory (not for concurrency); enforce => false is shadow mode (every call allowed, would-be denials logged, marked shadow). True when created, false when it exists with exactly these settings, 42710 when it exists with others.';
COMMENT ON FUNCTION keel.alter_limit(text, integer, interval, text, integer, text, boolean, boolean, boolean) IS 'Changes the settings of a rate-limit policy that are given (NULL keeps one; clear_burst removes burst); a new algorithm forgets the state of every key. Unknown policy: 42704.';
COMMENT ON FUNCTION keel.drop_limit(text) IS 'Deletes a rate-limit policy and the state of all its keys; false when there was no such policy.';
COMMENT ON FUNCTION keel."check"(text, text, integer) IS 'Decides a call of cost for key under the named policy, taking the capacity when allowed; returns allowed, limit, remaining, retry_after_ms (0 when allowed, never early) and reset_after_ms. A denial consumes nothing and is logged in keel.rate_limit_denials when the policy logs denials; unknown policy: 42704.';
COMMENT ON FUNCTION keel.rate_limit(text, integer, interval, integer, text, integer) IS 'A durable limit given with the call, without a named policy: at most max per per for key (algorithm and burst as in create_limit); returns the same row as check. The key''s state is shared by every call with that key whatever its limit, so use distinct keys for distinct limits.';
COMMENT ON FUNCTION keel.rate_limit_headers(text, integer, bigint, bigint) IS 'The HTTP RateLimit-Policy and RateLimit field values (IETF draft-ietf-httpapi-ratelimit-headers-11, Structured Fields) and Retry-After in whole seconds (rounded up, NULL when allowed) for one decision of the named policy: pass the decision''s remaining, reset_after_ms and retry_after_ms. Where the caller may check the policy.';
COMMENT ON FUNCTION keel.check_many(text[], text[], integer[]) IS 'One decision under several policies, all or nothing: each (names[i], keys[i]) is decided at costs[i] (NULL: 1 each), and only when every enforcing policy allows is each charged; otherwise nothing is and the denying rows say so. One row per pair, in order; concurrent calls naming the policies in any order never deadlock. Arrays of different lengths, more than 32 pairs or a pair twice: 22023.';
COMMENT ON FUNCTION keel.rate_limit_headers(text[], integer[], bigint[], bigint[]) IS 'The RateLimit-Policy, RateLimit and Retry-After values of one keel.check_many: a Structured Field list item per policy, in order, and the longest retry in whole seconds (rounded up, NULL when every policy allowed). Arrays of one length, 1 to 32: else 22023.';
COMMENT ON FUNCTION keel.acquire(text, text, interval) IS 'Takes a slot of key under the named concurrency limit (algorithm concurrency: at most max held at once) for ttl (NULL: the policy''s per): allowed with a token to release, or not with retry_after_ms until the soonest slot expires. Exact under concurrency; a slot not released frees itself when its ttl passes.';
COMMENT ON FUNCTION keel.release(text, text, uuid) IS 'Gives back the slot token holds of key under the named concurrency limit; true when it held one that had not expired.';
COMMENT ON FUNCTION keel.rate_peek(text, text) IS 'The decision a cost-1 call for key under the named policy would get now, as check returns it; consumes nothing and writes nothing.';
COMMENT ON FUNCTION keel.rate_refund(text, text, integer) IS 'Gives amount of capacity back to key under the named policy (never above full) and returns remaining. Windows give back from the current window only.';
COMMENT ON FUNCTION keel.rate_reset(text, text) IS 'Forgets the state of key under the named policy, so its next call starts at full capacity; true if it had state.';
COMMENT ON FUNCTION keel.cleanup_rate_limits(integer) IS 'Deletes rate-limit keys back at full capacity and denials older than keel.rate_denial_retention, at most max_rows of each per call; returns how many rows. The worker runs it every minute.';

-- Sessions

COMMENT ON FUNCTION keel.session_create(text, interval, interval, jsonb, integer) IS 'Creates a session for user_id (NULL: an anonymous session, bound later by session_login) that expires ttl from now (and, with idle_timeout, when not validated for that long), with data a JSON object; returns session_id, the token (give it to the client once: only its SHA-256 is stored) and expires_at. With max_per_user, the user''s least recently seen sessions beyond the cap are revoked (reason evicted), exactly under concurrent logins. idle_timeout longer than ttl, or data not an object: 22023.';
COMMENT ON FUNCTION keel.session_validate(text) IS 'Returns the session of a token (session_id, user_id, data and its times), or no row when the token is unknown, malformed, expired, idle-expired or revoked; NULL is 22023. Writes last_seen_at and slides the idle expiry at most once per keel.session_touch_interval.';
COMMENT ON FUNCTION keel.session_set_data(text, jsonb, boolean) IS 'Sets the data of the token''s session: merge (the default) adds the given top-level keys, false replaces it. Returns false when the token has no valid session.';
COMMENT ON FUNCTION keel.session_rotate(text, interval) IS 'Gives the token''s session (same id, data and expiry) a new token and returns it; the old token stops working when this commits, or with a grace (at most 1 hour) when the grace ends: until then it still validates, and rotating it again returns the same new token. NULL when the token has no valid session.';
COMMENT ON FUNCTION keel.session_login(text, text, integer) IS 'Binds user_id to the token''s session (an anonymous one, or another user''s) and gives it a new token in the same step, returned; the old token stops working when this commits (session-fixation defence). With max_per_user, the user''s other least recently seen sessions beyond the cap are revoked (reason evicted). NULL when the token has no valid session.';
COMMENT ON FUNCTION keel.session_revoke(text) IS 'Revokes the token''s session at once; true when a valid session was revoked. Its row stays, with revoked_at, until the cleanup.';
COMMENT ON FUNCTION keel.session_revoke_id(uuid) IS 'Revokes the session with this id at once; true when a valid session was revoked.';
COMMENT ON FUNCTION keel.session_revoke_user(text, uuid) IS 'Revokes every valid session of user_id except except_session (log out everywhere, or everywhere else) and returns how many it revoked.';
COMMENT ON FUNCTION keel.user_sessions(text) IS 'The valid sessions of user_id, most recently seen first, never with a token or its hash.';
COMMENT ON FUNCTION keel.cleanup_sessions(integer) IS 'Deletes one batch of at most max_rows sessions that ended (expired, revoked or idle-expired) and one-time tokens that expired more than keel.session_cleanup_grace ago, and returns how many. The worker runs it every minute.';
COMMENT ON FUNCTION keel.token_create(text, text, interval, jsonb) IS 'Makes a one-time token for purpose (e.g. ''password_reset'') and subject (e.g. a user id) that expires ttl from now, carrying data (a JSON object); returns the token (give it once: only its SHA-256 is stored).';
COMMENT ON FUNCTION keel.token_consume(text, text) IS 'Returns the subject and data of a one-time token made for purpose and deletes it, so exactly one caller ever gets them; no row when the token is unknown, malformed, consumed, expired or made for another purpose. NULL token: 22023.';
COMMENT ON FUNCTION keel.token_revoke(text, text) IS 'Deletes every outstanding one-time token of purpose for subject (a password changed: the reset links already sent stop working) and returns how many.';

-- Maintenance and monitoring

COMMENT ON FUNCTION keel.set_task(text, interval, boolean) IS 'Changes a maintenance task in keel.tasks: how often it runs (every, at least 1 second, else 22023) and whether it is enabled; NULL keeps a setting. Unknown task: 42704.';
COMMENT ON FUNCTION keel.health() IS 'Runs pg_keel''s incident checks in this database (worker, queues, outbox, Redis, xmin horizon, idle transactions, lock waits, dead tuples, tasks, denials): one row per check with status ok, warn or critical, detail, advice, value and threshold. Changes nothing; it reads keel.jobs, so call it every few seconds, not per request.';
COMMENT ON FUNCTION keel.metrics() IS 'The figures of keel.health() and pg_keel''s queue, outbox, table, task and rate-limit counters as one text in Prometheus'' text exposition format, every sample labelled with the database.';

-- Privileges

COMMENT ON FUNCTION keel.grant_producer(regrole, text[], text[], text[]) IS 'Lets role enqueue, enqueue_batch, cancel and cancel_queue on queues, emit on topics, and check, check_many, acquire, release, rate_peek, rate_refund and rate_limit_headers on the policies limits; NULL means every one (also later ones, but not pg_keel''s own keel.* topics), an empty array none. Grants add up; an unknown role is 42704.';
COMMENT ON FUNCTION keel.grant_consumer(regrole, text[]) IS 'Lets role claim from queues (NULL: every one) and ack, ack_batch, fail, extend, snooze and progress the leases it claimed.';
COMMENT ON FUNCTION keel.grant_sessions(regrole) IS 'Lets role use the sessions API (session_create, session_validate, session_set_data, session_rotate, session_login, the revocations and user_sessions) on every user''s sessions, and the one-time tokens (token_create, token_consume, token_revoke).';
COMMENT ON FUNCTION keel.grant_monitor(regrole) IS 'Lets role call keel.health() and keel.metrics(), for a monitoring role or exporter.';
COMMENT ON FUNCTION keel.grant_admin(regrole) IS 'Gives role everything: the producer, consumer, sessions and monitor grants for every name, the management functions (queues, routes, replay, limits, schedules, tasks, cleanups, worker_status) and SELECT on the views, keel.grants, keel.tasks, keel.task_runs, keel.rate_limits and keel.rate_limit_denials.';
COMMENT ON FUNCTION keel.revoke_all(regrole) IS 'Takes back everything the grant helpers gave role: its rows in keel.grants, EXECUTE on every keel function, SELECT on every keel table and view, and USAGE on the schema. Run it before DROP ROLE.';

-- Last: once this CREATE EXTENSION commits, the pg_keel launcher starts this database's worker
-- (a no-op without shared_preload_libraries).
SELECT keel._wake_launcher_on_commit();
-- Backends that remember the queues of a pg_keel dropped before look again (src/queue/enqueue.rs).
SELECT keel._queues_changed();
