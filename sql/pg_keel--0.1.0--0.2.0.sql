-- pg_keel 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_keel UPDATE).
--
-- Every change to the SQL surface between the two releases goes here, in the order it was
-- made, so that a database created at 0.1.0 ends up with exactly the objects a fresh 0.2.0
-- install has: the `upgrade` client test compares the two catalogs object by object.
--
-- keel.snooze (issue 15): a consumer gives a held job back without using up a try.
-- Gives a held job back to its queue for `delay` without using up a try: the lease ends, the
-- job is ready again after `delay`, and its tries (attempt - attempt_base) are what they were
-- before the claim. Fenced like fail: false when the lease was lost.
CREATE FUNCTION keel._snooze(ticket bigint, job_id bigint, attempt integer, delay interval)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- By primary key, whatever the table held when the plan was made (src/owner.rs, BY_INDEX).
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    holder oid;
    t timestamptz;
BEGIN
    holder := keel._redeem(ticket, 'hold', NULL);
    IF _snooze.delay IS NULL OR _snooze.delay < interval '0' THEN
        PERFORM keel._queue_error('invalid_argument', 'delay', 'must be zero or a positive interval');
    END IF;
    PERFORM keel._check_interval('delay', _snooze.delay);
    -- Before the clock is read for the new visible_at (src/queue/floor.rs).
    PERFORM keel._writing_jobs(NULL, NULL);
    t := clock_timestamp();
    UPDATE keel.jobs jb
       -- Never before now: an interval with mixed signs can land in the past.
       SET state = 'ready', visible_at = greatest(t, t + _snooze.delay),
           attempt_base = jb.attempt_base + 1, worker = NULL
     -- coalesce: by primary key, never by the partial claim index (src/queue/lease.rs).
     WHERE jb.job_id = _snooze.job_id AND jb.attempt = _snooze.attempt
       AND coalesce(jb.state, '') = 'running' AND keel._may_hold(jb.claimed_by, holder);
    RETURN FOUND;
END
$$;

CREATE FUNCTION keel.snooze(job_id bigint, attempt integer, delay interval)
RETURNS boolean
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
    SELECT keel._snooze(keel._authorize('hold', NULL), job_id, attempt, delay)
$$;

-- keel.cancel and keel.cancel_queue (issue 15): a job state 'cancelled'. Changing the state
-- check and the finished-jobs index takes an exclusive lock on keel.jobs while it is scanned
-- and the index is rebuilt: run the update at a quiet moment on a large backlog.
ALTER TABLE keel.jobs
    DROP CONSTRAINT jobs_state_valid,
    ADD CONSTRAINT jobs_state_valid CHECK (state IN ('ready', 'running', 'done', 'dead', 'cancelled'));
DROP INDEX keel.jobs_finished_idx;
-- Dead, done and cancelled jobs, for stats, retry_dead and the cleanup of finished jobs.
CREATE INDEX jobs_finished_idx ON keel.jobs (queue, state, finished_at)
    WHERE state IN ('done', 'dead', 'cancelled');

CREATE OR REPLACE VIEW keel.queue_stats AS
SELECT q.queue,
       q.paused,
       count(j.job_id) FILTER (WHERE j.state = 'ready' AND j.visible_at <= now())   AS ready,
       count(j.job_id) FILTER (WHERE j.state = 'ready' AND j.visible_at > now())    AS scheduled,
       count(j.job_id) FILTER (WHERE j.state = 'running' AND j.visible_at > now())  AS running,
       count(j.job_id) FILTER (WHERE j.state = 'running' AND j.visible_at <= now()) AS expired_leases,
       count(j.job_id) FILTER (WHERE j.state = 'dead')                              AS dead,
       count(j.job_id) FILTER (WHERE j.state = 'done')                              AS done,
       now() - min(j.enqueued_at) FILTER (WHERE j.state = 'ready' AND j.visible_at <= now())
                                                                                    AS oldest_ready_age,
       c.enqueued_total,
       c.completed_total,
       -- Last: added in 0.2.0 (a view's new columns go after the old ones).
       count(j.job_id) FILTER (WHERE j.state = 'cancelled')                         AS cancelled
  FROM keel.queues q
  LEFT JOIN keel.jobs j ON j.queue = q.queue
  LEFT JOIN keel._queue_counters() c ON c.queue = q.queue
 GROUP BY q.queue, q.paused, c.enqueued_total, c.completed_total;

-- May a role use a queue, topic or policy (src/auth.rs)? For _cancel, which learns the
-- queue from the job. As `cargo pgrx schema` writes it.
CREATE FUNCTION keel."_may_use"(
	"role" oid, /* Option < pg_sys :: Oid > */
	"capability" TEXT, /* Option < & str > */
	"name" TEXT /* Option < & str > */
) RETURNS bool /* bool */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'may_use_wrapper';

-- Cancels one job: a waiting one (ready, delayed or waiting for a retry) at once; a running
-- one too, so that its holder's next extend returns NULL and its ack, fail and snooze find no
-- lease. Returns the job's state after the call: 'cancelled', or 'done' / 'dead' for a job that
-- had already finished (unchanged); NULL when there is no such job (never, or finished and
-- deleted) or the caller lacks the produce grant of the job's queue.
CREATE FUNCTION keel._cancel(ticket bigint, job_id bigint, reason text)
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- By primary key, whatever the table held when the plan was made (src/owner.rs, BY_INDEX).
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    caller oid;
    j record;
BEGIN
    caller := keel._redeem(ticket, 'cancel', NULL);
    IF _cancel.job_id IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'job_id', 'must not be NULL');
    END IF;
    IF octet_length(_cancel.reason) > 1024 THEN
        PERFORM keel._queue_error('invalid_argument', 'reason', 'must be at most 1024 bytes');
    END IF;
    -- The grant is checked before the row is locked: a role without it neither locks nor
    -- waits on another queue's jobs, and is answered as if the job did not exist (as ack
    -- answers for another role's lease), so ids and names of other queues stay hidden. A job
    -- never changes queue.
    SELECT jb.queue INTO j FROM keel.jobs jb WHERE jb.job_id = _cancel.job_id;
    IF NOT FOUND OR NOT keel._may_use(caller, 'produce', j.queue) THEN
        RETURN NULL;
    END IF;
    SELECT jb.state INTO j FROM keel.jobs jb WHERE jb.job_id = _cancel.job_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF j.state NOT IN ('ready', 'running') THEN
        RETURN j.state;
    END IF;
    -- The caller (and a running job's holder, whose ack now fails) relies on the cancel: its
    -- commit waits for the local WAL flush even in a session with synchronous_commit off.
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'local', true);
    END IF;
    UPDATE keel.jobs
       SET state = 'cancelled', finished_at = clock_timestamp(), worker = NULL,
           dead_reason = coalesce(_cancel.reason, 'cancelled')
     WHERE job_id = _cancel.job_id;
    RETURN 'cancelled';
END
$$;

CREATE FUNCTION keel.cancel(job_id bigint, reason text DEFAULT NULL)
RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
    SELECT keel._cancel(keel._authorize('cancel', NULL), job_id, reason)
$$;

-- Cancels every waiting job of a queue (ready, delayed or waiting for a retry); running jobs
-- are left to finish (cancel them one by one). Returns how many were cancelled.
CREATE FUNCTION keel._cancel_queue(ticket bigint, queue text, reason text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    cancelled bigint;
BEGIN
    PERFORM keel._redeem(ticket, 'produce', _cancel_queue.queue);
    IF octet_length(_cancel_queue.reason) > 1024 THEN
        PERFORM keel._queue_error('invalid_argument', 'reason', 'must be at most 1024 bytes');
    END IF;
    PERFORM 1 FROM keel.queues WHERE queue = _cancel_queue.queue;
    IF NOT FOUND THEN
        PERFORM keel._unknown_queue(_cancel_queue.queue);
    END IF;
    -- As for cancel: the commit waits for the local WAL flush.
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'local', true);
    END IF;
    UPDATE keel.jobs
       SET state = 'cancelled', finished_at = clock_timestamp(), worker = NULL,
           dead_reason = coalesce(_cancel_queue.reason, 'cancelled')
     WHERE queue = _cancel_queue.queue AND state = 'ready';
    GET DIAGNOSTICS cancelled = ROW_COUNT;
    RETURN cancelled;
END
$$;

CREATE FUNCTION keel.cancel_queue(queue text, reason text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
    SELECT keel._cancel_queue(keel._authorize('produce', queue), queue, reason)
$$;

CREATE OR REPLACE FUNCTION keel.cleanup_done_jobs(max_rows integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    deleted bigint;
BEGIN
    IF cleanup_done_jobs.max_rows IS NULL OR cleanup_done_jobs.max_rows < 1 THEN
        PERFORM keel._invalid_argument('max_rows', 'must be at least 1');
    END IF;
    DELETE FROM keel.jobs j
     WHERE j.job_id IN (
        SELECT d.job_id
          FROM keel.jobs d JOIN keel.queues q ON q.queue = d.queue
         WHERE d.state IN ('done', 'cancelled')
           AND (d.enqueued_at + q.dedupe_window <= clock_timestamp()
                OR (d.state = 'done' AND d.idempotency_key IS NULL))
           AND coalesce(d.finished_at, d.enqueued_at) + q.keep_finished <= clock_timestamp()
         LIMIT cleanup_done_jobs.max_rows
           FOR UPDATE OF d SKIP LOCKED);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

CREATE OR REPLACE FUNCTION keel.metrics()
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL RESTRICTED SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    db text := 'database="' || keel._prom_label(current_database()) || '"';
    w record;
    s record;
    out text := '';
BEGIN
    SELECT * INTO w FROM keel._worker_health();
    SELECT * INTO s FROM keel.worker_status();
    IF NOT w.redis_connected OR w.redis_seen_at < clock_timestamp() - interval '30 seconds' THEN
        -- Not shown stale: no sample rather than the last one.
        w.redis_latency_ms := NULL;
        w.redis_used_memory := NULL;
        w.redis_evicted_keys := NULL;
    END IF;

    out := out || keel._prom_family('keel_worker_up', 'gauge',
        'Whether this database''s pg_keel worker is running (1) or not (0).',
        ARRAY[db], ARRAY[CASE WHEN w.running THEN 1 ELSE 0 END::float8]);
    out := out || keel._prom_family('keel_outbox_dispatched_total', 'counter',
        'Events this database''s worker delivered to Redis since it started.',
        ARRAY[db], ARRAY[s.dispatched_total::float8]);
    out := out || keel._prom_family('keel_outbox_refused_total', 'counter',
        'Events Redis refused (each refusal) since this database''s worker started.',
        ARRAY[db], ARRAY[s.failed_total::float8]);
    out := out || keel._prom_family('keel_redis_connected', 'gauge',
        'Whether the worker holds a connection to Redis.',
        ARRAY[db], ARRAY[CASE WHEN w.redis_connected THEN 1 ELSE 0 END::float8]);
    out := out || keel._prom_family('keel_redis_latency_seconds', 'gauge',
        'Round trip of the worker''s last PING to Redis.',
        CASE WHEN w.redis_latency_ms IS NULL THEN '{}'::text[] ELSE ARRAY[db] END,
        CASE WHEN w.redis_latency_ms IS NULL THEN '{}'::float8[] ELSE ARRAY[w.redis_latency_ms / 1000] END);
    out := out || keel._prom_family('keel_redis_used_memory_bytes', 'gauge',
        'Redis used_memory as the worker last read it.',
        CASE WHEN w.redis_used_memory IS NULL THEN '{}'::text[] ELSE ARRAY[db] END,
        CASE WHEN w.redis_used_memory IS NULL THEN '{}'::float8[] ELSE ARRAY[w.redis_used_memory::float8] END);
    out := out || keel._prom_family('keel_redis_evicted_keys', 'gauge',
        'Keys Redis evicted since it started, as the worker last read it.',
        CASE WHEN w.redis_evicted_keys IS NULL THEN '{}'::text[] ELSE ARRAY[db] END,
        CASE WHEN w.redis_evicted_keys IS NULL THEN '{}'::float8[] ELSE ARRAY[w.redis_evicted_keys::float8] END);

    -- Queues: keel.queue_stats read once (it scans keel.jobs) for all four families.
    out := out || (
        WITH q AS MATERIALIZED (SELECT * FROM keel.queue_stats),
             l AS (SELECT q.*, format('%s,queue="%s"', db, keel._prom_label(q.queue)) AS labels FROM q)
        SELECT (SELECT keel._prom_family('keel_queue_jobs', 'gauge',
                   'Jobs per queue and state (ready: claimable now; scheduled: waiting for a delay or backoff; expired_leases: running past their lease).',
                   coalesce(array_agg(format('%s,state="%s"', l.labels, x.state) ORDER BY l.queue, x.state), '{}'),
                   coalesce(array_agg(x.n ORDER BY l.queue, x.state), '{}'))
                  FROM l, LATERAL (VALUES ('ready', l.ready::float8), ('scheduled', l.scheduled::float8),
                                          ('running', l.running::float8), ('expired_leases', l.expired_leases::float8),
                                          ('dead', l.dead::float8), ('done', l.done::float8),
                                          ('cancelled', l.cancelled::float8)) AS x(state, n))
            || keel._prom_family('keel_queue_oldest_ready_seconds', 'gauge',
                   'Age of the oldest claimable job per queue (0 when none).',
                   coalesce((SELECT array_agg(l.labels ORDER BY l.queue) FROM l), '{}'),
                   coalesce((SELECT array_agg(coalesce(extract(epoch FROM l.oldest_ready_age), 0)::float8 ORDER BY l.queue) FROM l), '{}'))
            || keel._prom_family('keel_queue_enqueued_total', 'counter',
                   'Jobs enqueued per queue since the server started.',
                   coalesce((SELECT array_agg(l.labels ORDER BY l.queue) FROM l WHERE w.preloaded), '{}'),
                   coalesce((SELECT array_agg(coalesce(l.enqueued_total, 0)::float8 ORDER BY l.queue) FROM l WHERE w.preloaded), '{}'))
            || keel._prom_family('keel_queue_completed_total', 'counter',
                   'Jobs acked per queue since the server started.',
                   coalesce((SELECT array_agg(l.labels ORDER BY l.queue) FROM l WHERE w.preloaded), '{}'),
                   coalesce((SELECT array_agg(coalesce(l.completed_total, 0)::float8 ORDER BY l.queue) FROM l WHERE w.preloaded), '{}')));

    -- Outbox: keel.outbox_stats read once for both families.
    out := out || (
        WITH o AS MATERIALIZED (SELECT * FROM keel.outbox_stats),
             l AS (SELECT o.*, format('%s,topic="%s"', db, keel._prom_label(o.topic)) AS labels FROM o)
        SELECT (SELECT keel._prom_family('keel_outbox_events', 'gauge',
                   'Outbox events per topic waiting for Redis (pending) or given up on (dead).',
                   coalesce(array_agg(format('%s,state="%s"', l.labels, x.state) ORDER BY l.topic, x.state), '{}'),
                   coalesce(array_agg(x.n ORDER BY l.topic, x.state), '{}'))
                  FROM l, LATERAL (VALUES ('pending', l.pending::float8), ('dead', l.dead::float8)) AS x(state, n))
            || keel._prom_family('keel_outbox_oldest_pending_seconds', 'gauge',
                   'Age of the oldest event per topic not yet in Redis (0 when none).',
                   coalesce((SELECT array_agg(l.labels ORDER BY l.topic) FROM l), '{}'),
                   coalesce((SELECT array_agg(coalesce(extract(epoch FROM l.oldest_pending_age), 0)::float8 ORDER BY l.topic) FROM l), '{}')));

    -- Rate limits.
    -- Denials, and apart from them the calls of policies in shadow mode that enforcing would
    -- have denied (they were allowed: an alert on denials must not see them).
    out := out || (SELECT keel._prom_family('keel_rate_limit_denials_5m', 'gauge',
            'Denials logged per policy in the last five minutes.',
            coalesce(array_agg(format('%s,policy="%s"', db, keel._prom_label(d.policy)) ORDER BY d.policy), '{}'),
            coalesce(array_agg(d.n ORDER BY d.policy), '{}'))
        FROM (SELECT policy, count(*)::float8 AS n FROM keel.rate_limit_denials
               WHERE at > clock_timestamp() - interval '5 minutes' AND NOT shadow
               GROUP BY policy) d);
    out := out || (SELECT keel._prom_family('keel_rate_limit_shadow_denials_5m', 'gauge',
            'Calls of policies in shadow mode (enforce false) that enforcing would have denied, per policy, in the last five minutes.',
            coalesce(array_agg(format('%s,policy="%s"', db, keel._prom_label(d.policy)) ORDER BY d.policy), '{}'),
            coalesce(array_agg(d.n ORDER BY d.policy), '{}'))
        FROM (SELECT policy, count(*)::float8 AS n FROM keel.rate_limit_denials
               WHERE at > clock_timestamp() - interval '5 minutes' AND shadow
               GROUP BY policy) d);
    -- keel's tables as the statistics have them (no scan: cheap to scrape often).
    out := out || (SELECT keel._prom_family('keel_table_rows', 'gauge',
            'Live and dead rows of keel''s tables (pg_stat_user_tables).',
            coalesce(array_agg(format('%s,table="%s",kind="%s"', db, keel._prom_label(t.relname), x.kind) ORDER BY t.relname, x.kind), '{}'),
            coalesce(array_agg(x.n ORDER BY t.relname, x.kind), '{}'))
        FROM pg_stat_user_tables t,
             LATERAL (VALUES ('live', t.n_live_tup::float8), ('dead', t.n_dead_tup::float8)) AS x(kind, n)
       WHERE t.schemaname = 'keel');

    -- Maintenance tasks.
    out := out || (SELECT keel._prom_family('keel_task_last_duration_seconds', 'gauge',
            'How long the last run of each maintenance task took.',
            coalesce(array_agg(format('%s,task="%s"', db, keel._prom_label(t.name)) ORDER BY t.name), '{}'),
            coalesce(array_agg(extract(epoch FROM t.last_duration)::float8 ORDER BY t.name), '{}'))
        FROM keel.tasks t WHERE t.last_duration IS NOT NULL);
    out := out || (SELECT keel._prom_family('keel_task_failed_runs', 'gauge',
            'Runs of each maintenance task that failed, within keel.task_run_retention.',
            coalesce(array_agg(format('%s,task="%s"', db, keel._prom_label(t.name)) ORDER BY t.name), '{}'),
            coalesce(array_agg((SELECT count(*) FROM keel.task_runs r
                                 WHERE r.task = t.name AND r.error IS NOT NULL)::float8 ORDER BY t.name), '{}'))
        FROM keel.tasks t);

    -- Every health check: 0 ok, 1 warn, 2 critical.
    out := out || (SELECT keel._prom_family('keel_health_status', 'gauge',
            'keel.health(): 0 ok, 1 warn, 2 critical, per check.',
            coalesce(array_agg(format('%s,check="%s"', db, keel._prom_label(h."check")) ORDER BY h."check"), '{}'),
            coalesce(array_agg(CASE h.status WHEN 'ok' THEN 0 WHEN 'warn' THEN 1 ELSE 2 END::float8 ORDER BY h."check"), '{}'))
        FROM keel.health() h);
    RETURN out;
END
$$;

-- keel.progress (issue 15): how far the holder of a lease got, kept on the job.
ALTER TABLE keel.jobs ADD COLUMN progress jsonb;

-- Records how far the holder of a lease got (any JSON, at most keel.max_payload_bytes), kept
-- on the job as keel.jobs.progress (across attempts, so a retry can resume). Fenced like fail:
-- false when the lease was lost.
CREATE FUNCTION keel._progress(ticket bigint, job_id bigint, attempt integer, progress jsonb)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- By primary key, whatever the table held when the plan was made (src/owner.rs, BY_INDEX).
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    holder oid;
    job_queue text;
    topic text;
BEGIN
    holder := keel._redeem(ticket, 'hold', NULL);
    IF _progress.progress IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'progress', 'must not be NULL');
    END IF;
    PERFORM keel._check_payload(keel._raw_bytes(_progress.progress));
    UPDATE keel.jobs jb
       SET progress = _progress.progress
     -- coalesce: by primary key, never by the partial claim index (src/queue/lease.rs).
     WHERE jb.job_id = _progress.job_id AND jb.attempt = _progress.attempt
       AND coalesce(jb.state, '') = 'running' AND keel._may_hold(jb.claimed_by, holder)
    RETURNING jb.queue INTO job_queue;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- The queue's progress_topic gets an outbox event per report, in this transaction; one
    -- job's events in order (its id is the aggregate).
    SELECT q.progress_topic INTO topic FROM keel.queues q WHERE q.queue = job_queue;
    IF topic IS NOT NULL THEN
        PERFORM keel.emit(topic,
            jsonb_build_object('job_id', _progress.job_id, 'queue', job_queue,
                               'attempt', _progress.attempt, 'progress', _progress.progress),
            aggregate_id => _progress.job_id::text);
    END IF;
    RETURN true;
END
$$;

CREATE FUNCTION keel.progress(job_id bigint, attempt integer, progress jsonb)
RETURNS boolean
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
    SELECT keel._progress(keel._authorize('hold', NULL), job_id, attempt, progress)
$$;

-- The functions 0.2.0 adds, as a fresh install has them whoever runs the update: owned by
-- pg_keel's owner (the owner of keel.jobs; the SECURITY DEFINER ones run as it), executable
-- by nobody else until a grant helper says so.
DO $$
DECLARE
    f regprocedure;
    owner regrole := (SELECT relowner::regrole FROM pg_class WHERE oid = 'keel.jobs'::regclass);
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'keel._snooze(bigint, bigint, integer, interval)',
        'keel.snooze(bigint, integer, interval)',
        'keel._progress(bigint, bigint, integer, jsonb)',
        'keel.progress(bigint, integer, jsonb)',
        'keel._may_use(oid, text, text)',
        'keel._cancel(bigint, bigint, text)',
        'keel.cancel(bigint, text)',
        'keel._cancel_queue(bigint, text, text)',
        'keel.cancel_queue(text, text)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, owner);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;

-- Roles granted at 0.1.0 get what the helpers now give with the same grant: snooze and
-- progress for grant_consumer (found by EXECUTE on keel._fail), cancel and cancel_queue for
-- grant_producer (found by EXECUTE on keel._emit).
DO $$
DECLARE
    r regrole;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel._fail(bigint, bigint, integer, text, interval)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.snooze(bigint, integer, interval), '
                       'keel._snooze(bigint, bigint, integer, interval), '
                       'keel.progress(bigint, integer, jsonb), '
                       'keel._progress(bigint, bigint, integer, jsonb) TO %s', r);
    END LOOP;
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel._emit(bigint, text, jsonb, text, bigint, jsonb)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.cancel(bigint, text), '
                       'keel.cancel_queue(text, text), keel._cancel(bigint, bigint, text), '
                       'keel._cancel_queue(bigint, text, text) TO %s', r);
    END LOOP;
END
$$;

-- Grants made by an extension script (CREATE EXTENSION or an update) count as the
-- extension's initial privileges (pg_init_privs), which pg_dump leaves out of a dump: the
-- grants just made would be lost by a dump and restore. A fresh install records the owner's
-- privilege only; so does this update, and the grants above are dumped like any other.
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = ANY (ARRAY[
        'keel._snooze(bigint, bigint, integer, interval)',
        'keel.snooze(bigint, integer, interval)',
        'keel._progress(bigint, bigint, integer, jsonb)',
        'keel.progress(bigint, integer, jsonb)',
        'keel._cancel(bigint, bigint, text)',
        'keel.cancel(bigint, text)',
        'keel._cancel_queue(bigint, text, text)',
        'keel.cancel_queue(text, text)'
    ]::pg_catalog.regprocedure[]);

-- Schedules (issue 15): periodic jobs, enqueued by the worker once per slot.
-- The expression checks and slot arithmetic, as `cargo pgrx schema` writes them.
CREATE FUNCTION keel."_schedule_due"(
	"cron" TEXT, /* Option < & str > */
	"timezone" TEXT, /* Option < & str > */
	"catch_up" TEXT, /* Option < & str > */
	"next_run_at" timestamp with time zone, /* Option < TimestampWithTimeZone > */
	"now" timestamp with time zone, /* Option < TimestampWithTimeZone > */
	"max_slots" INT /* Option < i32 > */
) RETURNS TABLE (
	"slots" timestamp with time zone[],  /* Vec < TimestampWithTimeZone > */
	"next_run_at" timestamp with time zone  /* Option < TimestampWithTimeZone > */
)
STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'schedule_due_wrapper';

CREATE FUNCTION keel."_schedule_error"(
	"kind" TEXT, /* & str */
	"subject" TEXT, /* Option < & str > */
	"detail" TEXT /* Option < & str > */
) RETURNS void
VOLATILE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'schedule_error_wrapper';

CREATE FUNCTION keel."_schedule_next"(
	"cron" TEXT, /* Option < & str > */
	"timezone" TEXT, /* Option < & str > */
	"after" timestamp with time zone /* Option < TimestampWithTimeZone > */
) RETURNS timestamp with time zone /* Option < TimestampWithTimeZone > */
STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'schedule_next_wrapper';

CREATE FUNCTION keel."schedule_preview"(
	"cron" TEXT, /* Option < & str > */
	"timezone" TEXT DEFAULT 'UTC', /* Option < & str > */
	"count" INT DEFAULT 5, /* Option < i32 > */
	"after" timestamp with time zone DEFAULT now() /* Option < TimestampWithTimeZone > */
) RETURNS SETOF timestamp with time zone /* TimestampWithTimeZone */
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'schedule_preview_wrapper';

CREATE TABLE keel.job_schedules (
    name         text        PRIMARY KEY,
    queue        text        NOT NULL REFERENCES keel.queues (queue),
    cron         text        NOT NULL,
    timezone     text        NOT NULL,
    payload      jsonb       NOT NULL,
    priority     integer     NOT NULL,
    catch_up     text        NOT NULL,
    enabled      boolean     NOT NULL DEFAULT true,
    -- The next slot to enqueue (NULL while disabled, or when the expression has no more).
    next_run_at  timestamptz,
    last_slot    timestamptz,
    last_job_id  bigint,
    last_run_at  timestamptz,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT job_schedules_catch_up_valid CHECK (catch_up IN ('latest', 'all', 'none'))
);
-- drop_queue looks up a queue's schedules.
CREATE INDEX job_schedules_queue_idx ON keel.job_schedules (queue);
-- run_schedules looks for the due ones every second.
CREATE INDEX job_schedules_due_idx ON keel.job_schedules (next_run_at) WHERE enabled;
SELECT pg_catalog.pg_extension_config_dump('keel.job_schedules', '');

CREATE VIEW keel.schedules AS
SELECT s.name, s.queue, s.cron, s.timezone, s.payload, s.priority, s.catch_up, s.enabled,
       s.next_run_at, s.last_slot, s.last_job_id, j.state AS last_job_state,
       s.last_run_at, s.last_error, s.created_at
  FROM keel.job_schedules s
  LEFT JOIN keel.jobs j ON j.job_id = s.last_job_id;

-- Checks shared by create_schedule and alter_schedule (NULL: not given).
CREATE FUNCTION keel._check_schedule(payload jsonb, priority integer, catch_up text,
                                     timezone text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- A name of PostgreSQL's tz database: not 'localtime' (the host's), not a POSIX rule
    -- string (src/schedule/cron.rs assumes a zone's offset changes at most once a day).
    IF timezone IS NOT NULL AND octet_length(timezone) <= 255
       AND (lower(timezone) IN ('localtime', 'posixrules')
            OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names n WHERE n.name = timezone)) THEN
        PERFORM keel._schedule_error('invalid_timezone', timezone, NULL);
    END IF;
    IF payload IS NOT NULL THEN
        PERFORM keel._check_payload(keel._raw_bytes(payload));
    END IF;
    IF catch_up NOT IN ('latest', 'all', 'none') THEN
        PERFORM keel._invalid_argument('catch_up', 'must be ''latest'', ''all'' or ''none''');
    END IF;
END
$$;

-- The queue a schedule enqueues into, locked against drop_queue until this transaction ends.
CREATE FUNCTION keel._schedule_target(queue text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM keel._check_name('queue', _schedule_target.queue);
    PERFORM 1 FROM keel.queues WHERE queue = _schedule_target.queue FOR KEY SHARE;
    IF NOT FOUND THEN
        PERFORM keel._unknown_queue(_schedule_target.queue);
    END IF;
END
$$;

CREATE FUNCTION keel.create_schedule(
    name text,
    queue text,
    cron text,
    payload jsonb DEFAULT '{}',
    timezone text DEFAULT 'UTC',
    priority integer DEFAULT 0,
    catch_up text DEFAULT 'latest')
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    next timestamptz;
    created boolean;
BEGIN
    PERFORM keel._check_name('schedule', create_schedule.name);
    IF create_schedule.payload IS NULL THEN
        PERFORM keel._invalid_argument('payload', 'must not be NULL (use ''{}''::jsonb)');
    ELSIF create_schedule.priority IS NULL THEN
        PERFORM keel._invalid_argument('priority', 'must not be NULL');
    ELSIF create_schedule.catch_up IS NULL THEN
        PERFORM keel._invalid_argument('catch_up', 'must not be NULL');
    END IF;
    PERFORM keel._check_schedule(create_schedule.payload, create_schedule.priority,
                                 create_schedule.catch_up, create_schedule.timezone);
    -- Checks the expression and the zone (22023).
    next := keel._schedule_next(create_schedule.cron, create_schedule.timezone, clock_timestamp());
    PERFORM keel._schedule_target(create_schedule.queue);
    INSERT INTO keel.job_schedules (name, queue, cron, timezone, payload, priority, catch_up,
                                    next_run_at)
    VALUES (create_schedule.name, create_schedule.queue, create_schedule.cron,
            create_schedule.timezone, create_schedule.payload, create_schedule.priority,
            create_schedule.catch_up, next)
    ON CONFLICT (name) DO NOTHING
    RETURNING true INTO created;
    RETURN coalesce(created, false);
END
$$;

-- Changes only the settings given. A different expression or zone, or enabling a disabled
-- schedule, starts it from its first slot after now (missed slots of a disabled schedule are
-- not caught up; the same expression given again changes nothing); disabling clears
-- next_run_at.
CREATE FUNCTION keel.alter_schedule(
    name text,
    queue text DEFAULT NULL,
    cron text DEFAULT NULL,
    payload jsonb DEFAULT NULL,
    timezone text DEFAULT NULL,
    priority integer DEFAULT NULL,
    catch_up text DEFAULT NULL,
    enabled boolean DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    s keel.job_schedules;
    next timestamptz;
BEGIN
    PERFORM keel._check_name('schedule', alter_schedule.name);
    PERFORM keel._check_schedule(alter_schedule.payload, alter_schedule.priority,
                                 alter_schedule.catch_up, alter_schedule.timezone);
    SELECT * INTO s FROM keel.job_schedules WHERE name = alter_schedule.name FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM keel._schedule_error('unknown_schedule', alter_schedule.name, NULL);
    END IF;
    next := keel._schedule_next(coalesce(alter_schedule.cron, s.cron),
                                coalesce(alter_schedule.timezone, s.timezone), clock_timestamp());
    IF alter_schedule.queue IS NOT NULL THEN
        PERFORM keel._schedule_target(alter_schedule.queue);
    END IF;
    UPDATE keel.job_schedules
       SET queue    = coalesce(alter_schedule.queue, queue),
           cron     = coalesce(alter_schedule.cron, cron),
           timezone = coalesce(alter_schedule.timezone, timezone),
           payload  = coalesce(alter_schedule.payload, payload),
           priority = coalesce(alter_schedule.priority, priority),
           catch_up = coalesce(alter_schedule.catch_up, catch_up),
           enabled  = coalesce(alter_schedule.enabled, enabled),
           next_run_at = CASE
               WHEN NOT coalesce(alter_schedule.enabled, enabled) THEN NULL
               WHEN alter_schedule.cron IS NOT NULL AND alter_schedule.cron <> cron THEN next
               WHEN alter_schedule.timezone IS NOT NULL
                    AND alter_schedule.timezone <> timezone THEN next
               WHEN NOT enabled THEN next
               ELSE next_run_at END
     WHERE name = alter_schedule.name;
END
$$;

-- Jobs already enqueued by the schedule stay.
CREATE FUNCTION keel.drop_schedule(name text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM keel._check_name('schedule', drop_schedule.name);
    DELETE FROM keel.job_schedules WHERE name = drop_schedule.name;
    RETURN FOUND;
END
$$;

-- Enqueues the due slots of up to max_rows schedules (each schedule's slots, at most 100, the
-- advance of its next_run_at and its last_* columns in one subtransaction), taking no further
-- schedule once max_duration has passed, and returns the number of jobs enqueued. A schedule whose enqueue fails (its queue full, say) keeps its next_run_at
-- and records the error in last_error; the next call tries again. Concurrent calls take
-- different schedules (SKIP LOCKED). The background worker calls it every second; call it by
-- hand where no worker runs.
CREATE FUNCTION keel.run_schedules(max_rows integer DEFAULT 100, max_duration interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    s keel.job_schedules;
    due record;
    slot timestamptz;
    job bigint;
    fired bigint := 0;
    started timestamptz := clock_timestamp();
BEGIN
    IF run_schedules.max_rows IS NULL OR run_schedules.max_rows < 1 THEN
        PERFORM keel._invalid_argument('max_rows', 'must be at least 1');
    END IF;
    PERFORM keel._check_interval('max_duration', run_schedules.max_duration);
    -- The least recently run first: a schedule that keeps failing goes to the back and does
    -- not hold the others up.
    FOR s IN SELECT * FROM keel.job_schedules
              WHERE enabled AND next_run_at <= clock_timestamp()
              ORDER BY last_run_at NULLS FIRST, next_run_at
              LIMIT run_schedules.max_rows
                FOR UPDATE SKIP LOCKED LOOP
        EXIT WHEN clock_timestamp() - started > run_schedules.max_duration;
        BEGIN
            SELECT * INTO due
              FROM keel._schedule_due(s.cron, s.timezone, s.catch_up, s.next_run_at,
                                      clock_timestamp(), 100);
            job := NULL;
            FOREACH slot IN ARRAY due.slots LOOP
                job := keel.enqueue(s.queue, s.payload, priority => s.priority,
                    idempotency_key => 'schedule:' || s.name || ':'
                        || to_char(slot AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'));
                fired := fired + 1;
            END LOOP;
            UPDATE keel.job_schedules
               SET next_run_at = due.next_run_at,
                   last_slot   = coalesce(due.slots[cardinality(due.slots)], last_slot),
                   last_job_id = coalesce(job, last_job_id),
                   last_run_at = clock_timestamp(),
                   last_error  = NULL
             WHERE name = s.name;
        EXCEPTION WHEN OTHERS THEN
            UPDATE keel.job_schedules
               SET last_run_at = clock_timestamp(), last_error = left(SQLERRM, 1000)
             WHERE name = s.name;
        END;
    END LOOP;
    -- The worker commits without waiting for the WAL flush; a slot's job waits for it as a
    -- user's commit would (and for a synchronous standby when the server asks for one).
    IF fired > 0 AND current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit',
            (SELECT CASE WHEN reset_val = 'off' THEN 'local' ELSE reset_val END
               FROM pg_catalog.pg_settings WHERE name = 'synchronous_commit'), true);
    END IF;
    RETURN fired;
END
$$;

-- For the worker, every second: schedules' slots, then jobs that waited for others
-- (keel.release_dependents, sql/queue.sql). Never raises: an error comes back as text, that
-- step's work rolled back.
CREATE FUNCTION keel._worker_round(OUT fired bigint, OUT released bigint, OUT error text)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    fired := 0;
    released := 0;
    BEGIN
        fired := keel.run_schedules(1000, interval '1 second');
    EXCEPTION WHEN OTHERS THEN
        error := 'running schedules: ' || SQLERRM;
    END;
    BEGIN
        released := keel.release_dependents(1000, interval '1 second');
    EXCEPTION WHEN OTHERS THEN
        error := concat_ws('; ', error, 'releasing dependent jobs: ' || SQLERRM);
    END;
END
$$;

-- A queue that schedules enqueue into is not dropped under them.
CREATE OR REPLACE FUNCTION keel.drop_queue(queue text, force boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    remaining bigint;
    scheduled text;
BEGIN
    PERFORM keel._check_name('queue', drop_queue.queue);
    -- Waits for enqueues in flight, and keeps new ones out until this transaction ends.
    PERFORM keel._lock_queue(drop_queue.queue, true);
    PERFORM 1 FROM keel.queues WHERE queue = drop_queue.queue FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- Enqueues remember which queues exist (src/queue/enqueue.rs); they look again once this
    -- commits, before the queue's lock is released.
    PERFORM keel._queues_changed();
    -- Even with force: a schedule would fail at every slot; it goes first, by name.
    SELECT string_agg(s.name, ', ') INTO scheduled
      FROM (SELECT name FROM keel.job_schedules WHERE queue = drop_queue.queue
             ORDER BY name LIMIT 10) s;
    IF scheduled IS NOT NULL THEN
        PERFORM keel._schedule_error('queue_has_schedules', drop_queue.queue, scheduled);
    END IF;
    IF NOT coalesce(drop_queue.force, false) THEN
        SELECT count(*) INTO remaining FROM keel.jobs WHERE queue = drop_queue.queue;
        IF remaining > 0 THEN
            PERFORM keel._queue_error('queue_not_empty', drop_queue.queue, remaining::text);
        END IF;
    END IF;
    DELETE FROM keel.jobs WHERE queue = drop_queue.queue;
    DELETE FROM keel.queue_keys WHERE queue = drop_queue.queue;
    DELETE FROM keel.queues WHERE queue = drop_queue.queue;
    RETURN true;
END
$$;

-- What schedules add, owned by pg_keel's owner whoever runs the update and closed to PUBLIC,
-- as a fresh install has them; roles granted grant_admin at 0.1.0 (found by EXECUTE on
-- keel.create_queue) get what grant_admin now gives.
DO $$
DECLARE
    owner regrole := (SELECT relowner::regrole FROM pg_catalog.pg_class
                       WHERE oid = 'keel.jobs'::pg_catalog.regclass);
    f regprocedure;
    r regrole;
BEGIN
    EXECUTE format('ALTER TABLE keel.job_schedules OWNER TO %s', owner);
    EXECUTE format('ALTER VIEW keel.schedules OWNER TO %s', owner);
    REVOKE ALL ON keel.job_schedules, keel.schedules FROM PUBLIC;
    FOREACH f IN ARRAY ARRAY[
        'keel._schedule_due(text, text, text, timestamptz, timestamptz, integer)',
        'keel._schedule_error(text, text, text)',
        'keel._schedule_next(text, text, timestamptz)',
        'keel.schedule_preview(text, text, integer, timestamptz)',
        'keel._check_schedule(jsonb, integer, text, text)',
        'keel._schedule_target(text)',
        'keel.create_schedule(text, text, text, jsonb, text, integer, text)',
        'keel.alter_schedule(text, text, text, jsonb, text, integer, text, boolean)',
        'keel.drop_schedule(text)',
        'keel.run_schedules(integer, interval)',
        'keel._worker_round()'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, owner);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel.create_queue(text, interval, integer, interval, interval, bigint, interval)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION '
                       'keel.create_schedule(text, text, text, jsonb, text, integer, text), '
                       'keel.alter_schedule(text, text, text, jsonb, text, integer, text, boolean), '
                       'keel.drop_schedule(text), keel.run_schedules(integer, interval), '
                       'keel.schedule_preview(text, text, integer, timestamptz) TO %s', r);
        EXECUTE format('GRANT SELECT ON keel.schedules TO %s', r);
    END LOOP;
END
$$;

-- As above (pg_init_privs): the grants just made are dumped like any other.
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = ANY (ARRAY[
        'keel.create_schedule(text, text, text, jsonb, text, integer, text)',
        'keel.alter_schedule(text, text, text, jsonb, text, integer, text, boolean)',
        'keel.drop_schedule(text)',
        'keel.run_schedules(integer, interval)',
        'keel.schedule_preview(text, text, integer, timestamptz)'
    ]::pg_catalog.regprocedure[]);
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = pg_catalog.acldefault('r', c.relowner)
  FROM pg_catalog.pg_class c
 WHERE i.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass AND i.objoid = c.oid
   AND i.objsubid = 0 AND c.oid = 'keel.schedules'::pg_catalog.regclass;

-- Dependencies: enqueue(..., after => ids). A job that waits for others is a ready job with
-- visible_at = 'infinity' (no claim reaches it) and one row here per job it still waits for;
-- keel.release_dependents, which the worker calls every second, removes the rows of jobs that
-- are done (or gone: an acked job without an idempotency key is deleted), makes the job
-- claimable when none is left, and cancels it when one died or was cancelled.
CREATE TABLE keel.job_dependencies (
    job_id      bigint      NOT NULL,
    after_id    bigint      NOT NULL,
    -- When the job may run at the earliest once released: its enqueue plus its delay.
    not_before  timestamptz NOT NULL,
    PRIMARY KEY (job_id, after_id)
);
SELECT pg_catalog.pg_extension_config_dump('keel.job_dependencies', '');

-- The path of keel.enqueue(..., after => ids) (src/queue/enqueue.rs), which has checked the
-- arguments and the caller's grant on `queue` and runs this as pg_keel's owner. An id the
-- sequence never handed out is refused; one whose job is gone (acked, purged, cleaned up, or
-- never committed) or in a queue the caller may not enqueue to counts as finished.
CREATE FUNCTION keel._enqueue_after(
    queue text,
    payload jsonb,
    delay interval,
    priority integer,
    max_attempts integer,
    after bigint[],
    t timestamptz,
    caller oid)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q keel.queues;
    id bigint;
    bad bigint;
    last_id bigint;
    waiting_for bigint[];
    pending boolean;
    counted boolean;
BEGIN
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO last_id
      FROM keel.jobs_job_id_seq;
    SELECT a INTO bad FROM unnest(_enqueue_after.after) a WHERE a < 1 OR a > last_id LIMIT 1;
    IF bad IS NOT NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'after', format('job %s does not exist', bad));
    END IF;
    q := keel._enqueue_target(_enqueue_after.queue, _enqueue_after.delay, _enqueue_after.priority, 1);
    -- Read once: each statement of this function sees commits made since the last, and a job
    -- waiting for nothing must not be left at 'infinity'. A job of a queue the caller may not
    -- enqueue to counts as gone, so nothing tells it apart from a finished one (whether
    -- another tenant's job exists is not the caller's to learn).
    waiting_for := ARRAY(SELECT j.job_id FROM keel.jobs j
                          WHERE j.job_id = ANY (_enqueue_after.after) AND j.state <> 'done'
                            AND keel._may_use(_enqueue_after.caller, 'produce', j.queue));
    pending := cardinality(waiting_for) > 0;
    INSERT INTO keel.jobs (queue, payload, priority, max_attempts, visible_at, enqueued_at)
    VALUES (_enqueue_after.queue, _enqueue_after.payload, _enqueue_after.priority,
            _enqueue_after.max_attempts,
            CASE WHEN pending THEN 'infinity' ELSE greatest(t, t + _enqueue_after.delay) END, t)
    RETURNING job_id INTO id;
    IF pending THEN
        INSERT INTO keel.job_dependencies (job_id, after_id, not_before)
        SELECT id, w, greatest(t, t + _enqueue_after.delay) FROM unnest(waiting_for) w;
    ELSE
        PERFORM keel._wake(_enqueue_after.queue);
    END IF;
    counted := keel._count_jobs(_enqueue_after.queue, 1, 0);
    RETURN id;
END
$$;

-- Moves the jobs that wait for others along, job by job: one waiting for a job that died or
-- was cancelled is cancelled (dead_reason names it); what it waited for that is done or gone
-- is forgotten; one that waits for nothing more becomes claimable (at its enqueue + delay at
-- the earliest). Looks at up to max_rows waiting jobs per call, for at most max_duration,
-- going round all of them from call to call (the place is kept per session); returns how many
-- it released or cancelled. A job locked by someone else is left for the next call. The
-- background worker calls it every second.
CREATE FUNCTION keel.release_dependents(max_rows integer DEFAULT 1000,
                                        max_duration interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    started timestamptz := clock_timestamp();
    after_job bigint := coalesce(
        nullif(current_setting('pg_keel_state.release_after', true), '')::bigint, 0);
    b bigint;
    w record;
    failed record;
    earliest timestamptz;
    moved bigint := 0;
    looked integer := 0;
BEGIN
    IF release_dependents.max_rows IS NULL OR release_dependents.max_rows < 1 THEN
        PERFORM keel._queue_error('invalid_argument', 'max_rows', 'must be at least 1');
    END IF;
    PERFORM keel._check_interval('max_duration', release_dependents.max_duration);
    -- One caller at a time: two releasing one job could each still see the edge the other
    -- removes and leave the job waiting with none. This lock does not stand in the way of
    -- enqueues; a caller that finds it taken does nothing this time.
    BEGIN
        LOCK TABLE keel.job_dependencies IN SHARE UPDATE EXCLUSIVE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;
    END;
    FOR b IN SELECT DISTINCT d.job_id FROM keel.job_dependencies d
              WHERE d.job_id > after_job ORDER BY d.job_id
              LIMIT release_dependents.max_rows LOOP
        EXIT WHEN clock_timestamp() - started > release_dependents.max_duration;
        looked := looked + 1;
        after_job := b;
        SELECT j.job_id, j.queue, j.priority, j.state, j.visible_at INTO w
          FROM keel.jobs j WHERE j.job_id = b FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            -- Gone (purged, dropped with its queue): its rows go too. Locked: next time.
            IF NOT EXISTS (SELECT 1 FROM keel.jobs j WHERE j.job_id = b) THEN
                DELETE FROM keel.job_dependencies d WHERE d.job_id = b;
            END IF;
            CONTINUE;
        END IF;
        IF w.state <> 'ready' OR w.visible_at <> 'infinity' THEN
            -- Cancelled (or released) by someone else meanwhile.
            DELETE FROM keel.job_dependencies d WHERE d.job_id = b;
            CONTINUE;
        END IF;
        SELECT d.after_id, a.state INTO failed
          FROM keel.job_dependencies d JOIN keel.jobs a ON a.job_id = d.after_id
         WHERE d.job_id = b AND a.state IN ('dead', 'cancelled')
         ORDER BY d.after_id LIMIT 1;
        IF FOUND THEN
            UPDATE keel.jobs
               SET state = 'cancelled', finished_at = clock_timestamp(), worker = NULL,
                   dead_reason = format('job %s, which it waited for, is %s',
                                        failed.after_id, failed.state)
             WHERE job_id = b;
            DELETE FROM keel.job_dependencies d WHERE d.job_id = b;
            moved := moved + 1;
            CONTINUE;
        END IF;
        SELECT max(d.not_before) INTO earliest FROM keel.job_dependencies d WHERE d.job_id = b;
        DELETE FROM keel.job_dependencies d
         WHERE d.job_id = b
           AND NOT EXISTS (SELECT 1 FROM keel.jobs a
                            WHERE a.job_id = d.after_id AND a.state <> 'done');
        IF NOT EXISTS (SELECT 1 FROM keel.job_dependencies d WHERE d.job_id = b) THEN
            -- Before the clock is read for visible_at (src/queue/floor.rs).
            PERFORM keel._writing_jobs(w.queue, w.priority);
            UPDATE keel.jobs SET visible_at = greatest(clock_timestamp(), earliest)
             WHERE job_id = b;
            PERFORM keel._wake(w.queue);
            moved := moved + 1;
        END IF;
    END LOOP;
    -- Next time from here, or from the start again once the end was reached.
    PERFORM set_config('pg_keel_state.release_after',
        CASE WHEN looked < release_dependents.max_rows
                  AND NOT clock_timestamp() - started > release_dependents.max_duration
             THEN '0' ELSE after_job::text END, false);
    RETURN moved;
END
$$;

-- Replace / debounce and dependencies (issue 15): keel.enqueue gains on_duplicate and after.
-- A new argument is a new
-- signature: the new function is created beside the old one, gets the old one's EXECUTE
-- grants, and the old one is dropped.
-- A key used again after its dedupe window leaves the earlier finished job in place (as
-- history) without the key, in a queue that keeps finished jobs.
CREATE OR REPLACE FUNCTION keel._enqueue_keyed(
    queue text,
    payload jsonb,
    delay interval,
    priority integer,
    idempotency_key text,
    max_attempts integer,
    t timestamptz)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q keel.queues;
    id bigint;
    existing record;
    counted boolean;
BEGIN
    FOR round IN 1..3 LOOP
        SELECT j.job_id, j.state, j.enqueued_at INTO existing
          FROM keel.jobs j
         WHERE j.queue = _enqueue_keyed.queue AND j.idempotency_key = _enqueue_keyed.idempotency_key;
        IF FOUND THEN
            SELECT * INTO q FROM keel.queues WHERE queue = _enqueue_keyed.queue;
            IF existing.state <> 'done' OR existing.enqueued_at + q.dedupe_window > t THEN
                RETURN existing.job_id;
            END IF;
            -- The key is free again. In a queue that keeps finished jobs the job stays
            -- without it (history, until cleanup_done_jobs); otherwise it goes.
            IF q.keep_finished > interval '0' THEN
                UPDATE keel.jobs SET idempotency_key = NULL
                 WHERE job_id = existing.job_id AND state = 'done';
            ELSE
                DELETE FROM keel.jobs WHERE job_id = existing.job_id AND state = 'done';
            END IF;
        END IF;
        q := keel._enqueue_target(_enqueue_keyed.queue, _enqueue_keyed.delay, _enqueue_keyed.priority, 1);
        INSERT INTO keel.jobs (queue, payload, priority, max_attempts, visible_at, enqueued_at, idempotency_key)
        VALUES (_enqueue_keyed.queue, _enqueue_keyed.payload, _enqueue_keyed.priority, _enqueue_keyed.max_attempts,
                greatest(t, t + _enqueue_keyed.delay), t, _enqueue_keyed.idempotency_key)
        ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING job_id INTO id;
        IF id IS NOT NULL THEN
            counted := keel._count_jobs(_enqueue_keyed.queue, 1, 0);
            PERFORM keel._wake(_enqueue_keyed.queue);
            RETURN id;
        END IF;
    END LOOP;
    PERFORM keel._queue_error('busy_key', _enqueue_keyed.queue, _enqueue_keyed.idempotency_key);
END
$$;

-- The path of keel.enqueue(..., on_duplicate => 'replace'): a job still waiting (ready,
-- delayed or waiting for a retry) that holds the key gets the new payload, priority, run time
-- (now + delay) and, when given, max_attempts, and keeps its id; a running or finished job
-- holding it is left as it is (its id is returned, as with 'ignore'); otherwise the job is
-- inserted, as _enqueue_keyed does. The job's row lock orders a replace against a claim: a claim skips a job
-- being replaced, and a replace that waited for a claim finds the job running.
CREATE FUNCTION keel._enqueue_replace(
    queue text,
    payload jsonb,
    delay interval,
    priority integer,
    idempotency_key text,
    max_attempts integer,
    t timestamptz)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q keel.queues;
    existing record;
    id bigint;
    counted boolean;
BEGIN
    -- The queue's shared lock before the job's row lock, in the order drop_queue takes them.
    q := keel._enqueue_target(_enqueue_replace.queue, _enqueue_replace.delay,
                              _enqueue_replace.priority, 0);
    -- Rounds: a concurrent first insert of the key (ON CONFLICT waits for it) is replaced in
    -- the next round, so the later call's payload is the one that stays.
    FOR round IN 1..3 LOOP
        SELECT j.job_id, j.state, j.enqueued_at INTO existing
          FROM keel.jobs j
         WHERE j.queue = _enqueue_replace.queue AND j.idempotency_key = _enqueue_replace.idempotency_key
           FOR UPDATE;
        IF FOUND THEN
            IF existing.state = 'ready' THEN
                UPDATE keel.jobs
                   SET payload = _enqueue_replace.payload,
                       priority = _enqueue_replace.priority,
                       visible_at = greatest(t, t + _enqueue_replace.delay),
                       max_attempts = coalesce(_enqueue_replace.max_attempts, max_attempts)
                 WHERE job_id = existing.job_id;
                PERFORM keel._wake(_enqueue_replace.queue);
                RETURN existing.job_id;
            END IF;
            IF existing.state <> 'done' OR existing.enqueued_at + q.dedupe_window > t THEN
                RETURN existing.job_id;
            END IF;
            IF q.keep_finished > interval '0' THEN
                UPDATE keel.jobs SET idempotency_key = NULL WHERE job_id = existing.job_id;
            ELSE
                DELETE FROM keel.jobs WHERE job_id = existing.job_id;
            END IF;
        END IF;
        q := keel._enqueue_target(_enqueue_replace.queue, _enqueue_replace.delay,
                                  _enqueue_replace.priority, 1);
        INSERT INTO keel.jobs (queue, payload, priority, max_attempts, visible_at, enqueued_at, idempotency_key)
        VALUES (_enqueue_replace.queue, _enqueue_replace.payload, _enqueue_replace.priority,
                _enqueue_replace.max_attempts, greatest(t, t + _enqueue_replace.delay), t,
                _enqueue_replace.idempotency_key)
        ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING job_id INTO id;
        IF id IS NOT NULL THEN
            counted := keel._count_jobs(_enqueue_replace.queue, 1, 0);
            PERFORM keel._wake(_enqueue_replace.queue);
            RETURN id;
        END IF;
    END LOOP;
    PERFORM keel._queue_error('busy_key', _enqueue_replace.queue, _enqueue_replace.idempotency_key);
END
$$;

-- As `cargo pgrx schema` writes it.
CREATE FUNCTION keel."enqueue"(
	"queue" TEXT, /* Option < & str > */
	"payload" jsonb, /* Option < RawJsonb > */
	"delay" interval DEFAULT '0', /* Option < Interval > */
	"priority" INT DEFAULT 0, /* Option < i32 > */
	"idempotency_key" TEXT DEFAULT NULL, /* Option < & str > */
	"max_attempts" INT DEFAULT NULL, /* Option < i32 > */
	"on_duplicate" TEXT DEFAULT 'ignore', /* Option < & str > */
	"after" bigint[] DEFAULT NULL, /* :: std :: option :: Option < Array < i64 > > */
	"concurrency_key" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'enqueue_on_duplicate_wrapper';

DO $$
DECLARE
    owner regrole := (SELECT relowner::regrole FROM pg_catalog.pg_class
                       WHERE oid = 'keel.jobs'::pg_catalog.regclass);
    f regprocedure;
    r regrole;
BEGIN
    EXECUTE format('ALTER TABLE keel.job_dependencies OWNER TO %s', owner);
    REVOKE ALL ON keel.job_dependencies FROM PUBLIC;
    FOREACH f IN ARRAY ARRAY[
        'keel._enqueue_replace(text, jsonb, interval, integer, text, integer, timestamptz)',
        'keel.enqueue(text, jsonb, interval, integer, text, integer, text, bigint[], text)',
        'keel._enqueue_after(text, jsonb, interval, integer, integer, bigint[], timestamptz, oid)',
        'keel.release_dependents(integer, interval)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, owner);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel.enqueue(text, jsonb, interval, integer, text, integer)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION '
                       'keel.enqueue(text, jsonb, interval, integer, text, integer, text, bigint[], text) TO %s', r);
    END LOOP;
END
$$;
DROP FUNCTION keel.enqueue(text, jsonb, interval, integer, text, integer);
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = 'keel.enqueue(text, jsonb, interval, integer, text, integer, text, bigint[], text)'::pg_catalog.regprocedure;

-- Roles granted grant_admin at 0.1.0 may release dependents by hand, as grant_admin now gives.
DO $$
DECLARE
    r regrole;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel.create_queue(text, interval, integer, interval, interval, bigint, interval)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.release_dependents(integer, interval) TO %s', r);
    END LOOP;
END
$$;
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = 'keel.release_dependents(integer, interval)'::pg_catalog.regprocedure;

-- History and progress events (issue 15): queues keep finished jobs for keep_finished, ack
-- takes a result, keel.progress reports go to a queue's progress_topic. New arguments are new
-- signatures: each new function is created beside the old one, gets its EXECUTE grants, and
-- the old one is dropped.
ALTER TABLE keel.queues
    ADD COLUMN keep_finished interval NOT NULL DEFAULT interval '0',
    ADD COLUMN progress_topic text,
    ADD CONSTRAINT queues_keep_finished_valid CHECK (keep_finished >= interval '0'),
    ADD CONSTRAINT queues_progress_topic_valid
        CHECK (progress_topic ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$');
ALTER TABLE keel.jobs ADD COLUMN result jsonb;

-- The history settings create_queue and alter_queue share (NULL: not given).
CREATE FUNCTION keel._check_history(keep_finished interval, progress_topic text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM keel._check_interval('keep_finished', keep_finished);
    IF keep_finished < interval '0' THEN
        PERFORM keel._queue_error('invalid_argument', 'keep_finished', 'must be zero or a positive interval');
    END IF;
    IF progress_topic IS NOT NULL THEN
        PERFORM keel._check_name('topic', progress_topic);
    END IF;
END
$$;

CREATE FUNCTION keel.create_queue(
    queue text,
    visibility_timeout interval DEFAULT '30 seconds',
    max_attempts integer DEFAULT 5,
    retry_backoff interval DEFAULT '1 second',
    retry_backoff_max interval DEFAULT '10 minutes',
    max_ready bigint DEFAULT NULL,
    dedupe_window interval DEFAULT '24 hours',
    keep_finished interval DEFAULT '0',
    progress_topic text DEFAULT NULL,
    max_running_per_key integer DEFAULT NULL,
    rate_limit text DEFAULT NULL,
    fairness text DEFAULT 'fifo')
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    created boolean;
BEGIN
    PERFORM keel._check_name('queue', create_queue.queue);
    IF create_queue.visibility_timeout IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'visibility_timeout', 'must not be NULL');
    ELSIF create_queue.max_attempts IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'max_attempts', 'must not be NULL');
    ELSIF create_queue.retry_backoff IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'retry_backoff', 'must not be NULL');
    ELSIF create_queue.retry_backoff_max IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'retry_backoff_max', 'must not be NULL');
    ELSIF create_queue.dedupe_window IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'dedupe_window', 'must not be NULL');
    ELSIF create_queue.keep_finished IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'keep_finished', 'must not be NULL');
    END IF;
    PERFORM keel._check_history(create_queue.keep_finished, create_queue.progress_topic);
    IF create_queue.fairness IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'fairness', 'must not be NULL');
    END IF;
    PERFORM keel._check_flow(create_queue.max_running_per_key, create_queue.rate_limit,
                             create_queue.fairness);
    PERFORM keel._check_queue_settings(create_queue.visibility_timeout, create_queue.max_attempts,
        create_queue.retry_backoff, create_queue.retry_backoff_max, create_queue.max_ready,
        create_queue.dedupe_window);
    IF create_queue.retry_backoff_max < create_queue.retry_backoff THEN
        PERFORM keel._queue_error('invalid_argument', 'retry_backoff_max', 'must not be shorter than retry_backoff');
    END IF;

    INSERT INTO keel.queues (queue, visibility_timeout, max_attempts, retry_backoff,
                             retry_backoff_max, max_ready, dedupe_window, keep_finished,
                             progress_topic, max_running_per_key, rate_limit, fairness)
    VALUES (create_queue.queue, create_queue.visibility_timeout, create_queue.max_attempts,
            create_queue.retry_backoff, create_queue.retry_backoff_max, create_queue.max_ready,
            create_queue.dedupe_window, create_queue.keep_finished, create_queue.progress_topic,
            create_queue.max_running_per_key, create_queue.rate_limit, create_queue.fairness)
    ON CONFLICT (queue) DO NOTHING
    RETURNING true INTO created;
    IF created AND create_queue.keep_finished > interval '0' THEN
        -- Acks remember which queues keep finished jobs (src/queue/lease.rs).
        PERFORM keel._queues_changed();
    END IF;
    RETURN coalesce(created, false);
END
$$;

CREATE FUNCTION keel.alter_queue(
    queue text,
    visibility_timeout interval DEFAULT NULL,
    max_attempts integer DEFAULT NULL,
    retry_backoff interval DEFAULT NULL,
    retry_backoff_max interval DEFAULT NULL,
    max_ready bigint DEFAULT NULL,
    dedupe_window interval DEFAULT NULL,
    clear_max_ready boolean DEFAULT false,
    keep_finished interval DEFAULT NULL,
    progress_topic text DEFAULT NULL,
    clear_progress_topic boolean DEFAULT false,
    max_running_per_key integer DEFAULT NULL,
    clear_max_running_per_key boolean DEFAULT false,
    rate_limit text DEFAULT NULL,
    clear_rate_limit boolean DEFAULT false,
    fairness text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q keel.queues;
BEGIN
    PERFORM keel._check_queue_settings(alter_queue.visibility_timeout, alter_queue.max_attempts,
        alter_queue.retry_backoff, alter_queue.retry_backoff_max, alter_queue.max_ready,
        alter_queue.dedupe_window);
    IF alter_queue.clear_max_ready AND alter_queue.max_ready IS NOT NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'max_ready', 'cannot be given together with clear_max_ready');
    END IF;
    PERFORM keel._check_history(alter_queue.keep_finished, alter_queue.progress_topic);
    IF alter_queue.clear_progress_topic AND alter_queue.progress_topic IS NOT NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'progress_topic', 'cannot be given together with clear_progress_topic');
    END IF;
    PERFORM keel._check_flow(alter_queue.max_running_per_key, alter_queue.rate_limit,
                             alter_queue.fairness);
    IF alter_queue.clear_max_running_per_key AND alter_queue.max_running_per_key IS NOT NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'max_running_per_key', 'cannot be given together with clear_max_running_per_key');
    END IF;
    IF alter_queue.clear_rate_limit AND alter_queue.rate_limit IS NOT NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'rate_limit', 'cannot be given together with clear_rate_limit');
    END IF;
    SELECT * INTO q FROM keel.queues WHERE queue = alter_queue.queue FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM keel._unknown_queue(alter_queue.queue);
    END IF;
    IF coalesce(alter_queue.retry_backoff_max, q.retry_backoff_max)
       < coalesce(alter_queue.retry_backoff, q.retry_backoff) THEN
        PERFORM keel._queue_error('invalid_argument', 'retry_backoff_max', 'must not be shorter than retry_backoff');
    END IF;
    UPDATE keel.queues
       SET visibility_timeout = coalesce(alter_queue.visibility_timeout, visibility_timeout),
           max_attempts       = coalesce(alter_queue.max_attempts, max_attempts),
           retry_backoff      = coalesce(alter_queue.retry_backoff, retry_backoff),
           retry_backoff_max  = coalesce(alter_queue.retry_backoff_max, retry_backoff_max),
           max_ready          = CASE WHEN alter_queue.clear_max_ready THEN NULL
                                     ELSE coalesce(alter_queue.max_ready, max_ready) END,
           dedupe_window      = coalesce(alter_queue.dedupe_window, dedupe_window),
           keep_finished      = coalesce(alter_queue.keep_finished, keep_finished),
           progress_topic     = CASE WHEN alter_queue.clear_progress_topic THEN NULL
                                     ELSE coalesce(alter_queue.progress_topic, progress_topic) END,
           max_running_per_key = CASE WHEN alter_queue.clear_max_running_per_key THEN NULL
                                      ELSE coalesce(alter_queue.max_running_per_key, max_running_per_key) END,
           rate_limit         = CASE WHEN alter_queue.clear_rate_limit THEN NULL
                                     ELSE coalesce(alter_queue.rate_limit, rate_limit) END,
           fairness           = coalesce(alter_queue.fairness, fairness)
     WHERE queue = alter_queue.queue;
    -- Enqueues remember which queues have no max_ready (src/queue/enqueue.rs).
    PERFORM keel._queues_changed();
END
$$;

-- As `cargo pgrx schema` writes it.
CREATE FUNCTION keel."ack"(
	"job_id" bigint, /* i64 */
	"attempt" INT, /* i32 */
	"result" jsonb DEFAULT NULL /* Option < RawJsonb > */
) RETURNS bool /* bool */
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ack_with_result_wrapper';

DO $$
DECLARE
    owner regrole := (SELECT relowner::regrole FROM pg_catalog.pg_class
                       WHERE oid = 'keel.jobs'::pg_catalog.regclass);
    f regprocedure;
    moved record;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'keel._check_history(interval, text)',
        'keel.create_queue(text, interval, integer, interval, interval, bigint, interval, interval, text, integer, text, text)',
        'keel.alter_queue(text, interval, integer, interval, interval, bigint, interval, boolean, interval, text, boolean, integer, boolean, text, boolean, text)',
        'keel.ack(bigint, integer, jsonb)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, owner);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    FOR moved IN
        SELECT DISTINCT a.grantee::regrole AS role, n.new
          FROM (VALUES
            ('keel.create_queue(text, interval, integer, interval, interval, bigint, interval)'::regprocedure,
             'keel.create_queue(text, interval, integer, interval, interval, bigint, interval, interval, text, integer, text, text)'::regprocedure),
            ('keel.alter_queue(text, interval, integer, interval, interval, bigint, interval, boolean)'::regprocedure,
             'keel.alter_queue(text, interval, integer, interval, interval, bigint, interval, boolean, interval, text, boolean, integer, boolean, text, boolean, text)'::regprocedure),
            ('keel.ack(bigint, integer)'::regprocedure,
             'keel.ack(bigint, integer, jsonb)'::regprocedure)) AS n(old, new),
               pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = n.old
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 2, 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', moved.new, moved.role);
    END LOOP;
END
$$;
DROP FUNCTION keel.create_queue(text, interval, integer, interval, interval, bigint, interval);
DROP FUNCTION keel.alter_queue(text, interval, integer, interval, interval, bigint, interval, boolean);
DROP FUNCTION keel.ack(bigint, integer);
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = ANY (ARRAY[
        'keel.create_queue(text, interval, integer, interval, interval, bigint, interval, interval, text, integer, text, text)',
        'keel.alter_queue(text, interval, integer, interval, interval, bigint, interval, boolean, interval, text, boolean, integer, boolean, text, boolean, text)',
        'keel.ack(bigint, integer, jsonb)'
    ]::pg_catalog.regprocedure[]);

-- Claims across queues (issue 15): keel.claim(queues text[], ...), an overload beside
-- claim(queue text, ...), granted to the roles that may claim (found by EXECUTE on it). As
-- `cargo pgrx schema` writes it.
CREATE FUNCTION keel."claim"(
	"queues" TEXT[], /* :: std :: option :: Option < pgrx :: datum :: Array < & str > > */
	"batch" INT DEFAULT 1, /* Option < i32 > */
	"visibility_timeout" interval DEFAULT NULL, /* Option < Interval > */
	"worker" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TABLE (
	"job_id" bigint,  /* i64 */
	"attempt" INT,  /* i32 */
	"payload" jsonb,  /* RawJsonb */
	"priority" INT,  /* i32 */
	"enqueued_at" timestamp with time zone,  /* TimestampWithTimeZone */
	"lease_expires_at" timestamp with time zone,  /* TimestampWithTimeZone */
	"queue" TEXT  /* String */
)
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'claim_any_wrapper';

DO $$
DECLARE
    owner regrole := (SELECT relowner::regrole FROM pg_catalog.pg_class
                       WHERE oid = 'keel.jobs'::pg_catalog.regclass);
    r regrole;
BEGIN
    EXECUTE format('ALTER FUNCTION keel.claim(text[], integer, interval, text) OWNER TO %s', owner);
    REVOKE ALL ON FUNCTION keel.claim(text[], integer, interval, text) FROM PUBLIC;
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel.claim(text, integer, interval, text)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.claim(text[], integer, interval, text) TO %s', r);
    END LOOP;
END
$$;
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = 'keel.claim(text[], integer, interval, text)'::pg_catalog.regprocedure;

-- Rate limits (issue 17): shadow mode. A policy with enforce = false allows every call and logs
-- what it would have denied, marked shadow. create_limit and alter_limit gain the argument
-- (new signatures beside the old, grants moved, old dropped).
ALTER TABLE keel.rate_limits ADD COLUMN enforce boolean NOT NULL DEFAULT true;
ALTER TABLE keel.rate_limit_denials ADD COLUMN shadow boolean NOT NULL DEFAULT false;
CREATE FUNCTION keel.create_limit(
    name text,
    max integer,
    per interval,
    algorithm text DEFAULT 'token_bucket',
    burst integer DEFAULT NULL,
    durability text DEFAULT 'durable',
    log_denials boolean DEFAULT true,
    enforce boolean DEFAULT true)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    existing keel.rate_limits;
BEGIN
    PERFORM keel._check_limit(create_limit.name, create_limit.max, create_limit.per,
                              create_limit.algorithm, create_limit.burst, create_limit.durability);
    IF create_limit.log_denials IS NULL THEN
        PERFORM keel._rate_error('invalid_argument', 'log_denials', 'must not be NULL');
    END IF;
    IF create_limit.enforce IS NULL THEN
        PERFORM keel._rate_error('invalid_argument', 'enforce', 'must not be NULL');
    END IF;
    INSERT INTO keel.rate_limits (name, max, per, algorithm, burst, durability, log_denials,
                                  enforce)
    VALUES (create_limit.name, create_limit.max, create_limit.per, create_limit.algorithm,
            create_limit.burst, create_limit.durability, create_limit.log_denials,
            create_limit.enforce)
    ON CONFLICT (name) DO NOTHING;
    IF FOUND THEN
        PERFORM keel._rate_policies_changed();
        RETURN true;
    END IF;
    SELECT * INTO existing FROM keel.rate_limits l WHERE l.name = create_limit.name;
    IF (existing.max, existing.per, existing.algorithm, existing.burst, existing.durability,
        existing.log_denials, existing.enforce) IS NOT DISTINCT FROM
       (create_limit.max, create_limit.per, create_limit.algorithm, create_limit.burst,
        create_limit.durability, create_limit.log_denials, create_limit.enforce) THEN
        RETURN false;
    END IF;
    PERFORM keel._rate_error('limit_exists', create_limit.name, '');
    RETURN false;
END
$$;

-- NULL keeps a setting. A new algorithm forgets every key's state (it means something else
-- under another algorithm); other changes keep it.
CREATE FUNCTION keel.alter_limit(
    name text,
    max integer DEFAULT NULL,
    per interval DEFAULT NULL,
    algorithm text DEFAULT NULL,
    burst integer DEFAULT NULL,
    durability text DEFAULT NULL,
    log_denials boolean DEFAULT NULL,
    clear_burst boolean DEFAULT false,
    enforce boolean DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    old keel.rate_limits;
    new keel.rate_limits;
BEGIN
    SELECT * INTO old FROM keel.rate_limits l WHERE l.name = alter_limit.name FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM keel._rate_error('unknown_limit', coalesce(alter_limit.name, 'NULL'), '');
    END IF;
    -- Before the keys change: a memory snapshot in flight finishes first (src/locks.rs).
    PERFORM keel._lock_limit(alter_limit.name, true);
    new := old;
    new.max := coalesce(alter_limit.max, old.max);
    new.per := coalesce(alter_limit.per, old.per);
    new.algorithm := coalesce(alter_limit.algorithm, old.algorithm);
    new.burst := CASE WHEN alter_limit.clear_burst THEN NULL
                      ELSE coalesce(alter_limit.burst, old.burst) END;
    new.durability := coalesce(alter_limit.durability, old.durability);
    new.log_denials := coalesce(alter_limit.log_denials, old.log_denials);
    new.enforce := coalesce(alter_limit.enforce, old.enforce);
    PERFORM keel._check_limit(new.name, new.max, new.per, new.algorithm, new.burst, new.durability);
    IF new.algorithm = 'concurrency' AND old.algorithm <> 'concurrency' THEN
        PERFORM keel._limit_unused(alter_limit.name, 'made a concurrency limit');
    END IF;
    UPDATE keel.rate_limits l
       SET max = new.max, per = new.per, algorithm = new.algorithm, burst = new.burst,
           durability = new.durability, log_denials = new.log_denials, enforce = new.enforce
     WHERE l.name = alter_limit.name;
    PERFORM keel._rate_policies_changed();
    IF new.algorithm <> old.algorithm THEN
        DELETE FROM keel.rate_limit_state s WHERE s.policy = alter_limit.name;
        DELETE FROM keel.rate_limit_slots s WHERE s.policy = alter_limit.name;
    END IF;
    -- Keys in shared memory follow the algorithm, and leave when the policy leaves memory:
    -- written to the table first, with what memory decided since the last snapshot.
    IF new.algorithm = old.algorithm AND old.durability = 'memory' AND new.durability <> 'memory' THEN
        PERFORM keel._rate_leave_memory(alter_limit.name);
    ELSIF new.algorithm <> old.algorithm OR (old.durability = 'memory') <> (new.durability = 'memory') THEN
        PERFORM keel._rate_forget(alter_limit.name, NULL);
    END IF;
END
$$;

DO $$
DECLARE
    owner regrole := (SELECT relowner::regrole FROM pg_catalog.pg_class
                       WHERE oid = 'keel.jobs'::pg_catalog.regclass);
    f regprocedure;
    moved record;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'keel.create_limit(text, integer, interval, text, integer, text, boolean, boolean)',
        'keel.alter_limit(text, integer, interval, text, integer, text, boolean, boolean, boolean)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, owner);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    FOR moved IN
        SELECT DISTINCT a.grantee::regrole AS role, n.new
          FROM (VALUES
            ('keel.create_limit(text, integer, interval, text, integer, text, boolean)'::regprocedure,
             'keel.create_limit(text, integer, interval, text, integer, text, boolean, boolean)'::regprocedure),
            ('keel.alter_limit(text, integer, interval, text, integer, text, boolean, boolean)'::regprocedure,
             'keel.alter_limit(text, integer, interval, text, integer, text, boolean, boolean, boolean)'::regprocedure)
          ) AS n(old, new),
               pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = n.old
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 2, 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', moved.new, moved.role);
    END LOOP;
END
$$;
DROP FUNCTION keel.create_limit(text, integer, interval, text, integer, text, boolean);
DROP FUNCTION keel.alter_limit(text, integer, interval, text, integer, text, boolean, boolean);
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = ANY (ARRAY[
        'keel.create_limit(text, integer, interval, text, integer, text, boolean, boolean)',
        'keel.alter_limit(text, integer, interval, text, integer, text, boolean, boolean, boolean)'
    ]::pg_catalog.regprocedure[]);

-- Rate limits (issue 17): the HTTP header field values of a decision.
-- The HTTP header field values of one decision under a named policy, as the IETF draft writes
-- them (draft-ietf-httpapi-ratelimit-headers-11, Structured Field lists of one item):
-- RateLimit-Policy "name";q=<max>;w=<per in seconds>, RateLimit "name";r=<remaining>;t=<seconds
-- until full capacity>, and Retry-After in whole seconds, rounded up (never early), NULL when
-- the decision allowed. Policy names are already sf-string safe ([a-z0-9_.:-]); integers are
-- capped at the 15 digits an sf-integer may have (windows stop at 100 years, 10 digits, but
-- reset_after_ms comes from the caller).
CREATE FUNCTION keel._rate_limit_headers(
    ticket bigint,
    name text,
    remaining integer,
    reset_after_ms bigint,
    retry_after_ms bigint)
RETURNS TABLE (ratelimit_policy text, ratelimit text, retry_after bigint)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sf_max CONSTANT numeric := 999999999999999;
    quota integer;
    window_seconds numeric;
BEGIN
    PERFORM keel._redeem(ticket, 'limit', _rate_limit_headers.name);
    IF _rate_limit_headers.name IS NULL THEN
        PERFORM keel._rate_error('invalid_argument', 'name', 'must not be NULL');
    END IF;
    IF _rate_limit_headers.remaining IS NULL OR _rate_limit_headers.remaining < 0 THEN
        PERFORM keel._rate_error('invalid_argument', 'remaining', 'must be 0 or more (the decision''s remaining)');
    END IF;
    IF _rate_limit_headers.reset_after_ms IS NULL OR _rate_limit_headers.reset_after_ms < 0 THEN
        PERFORM keel._rate_error('invalid_argument', 'reset_after_ms', 'must be 0 or more (the decision''s reset_after_ms)');
    END IF;
    IF _rate_limit_headers.retry_after_ms < 0 THEN
        PERFORM keel._rate_error('invalid_argument', 'retry_after_ms', 'must be 0 or more (the decision''s retry_after_ms)');
    END IF;
    -- The window as the limiter counts it: a month is 30 days, so a year 360 (extract counts
    -- a year as 365.25 days: take the 5.25 days back per whole year).
    SELECT l.max, extract(epoch FROM l.per) - 453600 * extract(year FROM l.per)
      INTO quota, window_seconds
      FROM keel.rate_limits l WHERE l.name = _rate_limit_headers.name;
    IF NOT FOUND THEN
        PERFORM keel._rate_error('unknown_limit', _rate_limit_headers.name, '');
    END IF;
    ratelimit_policy := format('"%s";q=%s;w=%s', _rate_limit_headers.name, quota,
                               least(ceil(window_seconds), sf_max));
    ratelimit := format('"%s";r=%s;t=%s', _rate_limit_headers.name, _rate_limit_headers.remaining,
                        least(ceil(_rate_limit_headers.reset_after_ms / 1000.0), sf_max));
    retry_after := CASE WHEN coalesce(_rate_limit_headers.retry_after_ms, 0) > 0
                        THEN least(ceil(_rate_limit_headers.retry_after_ms / 1000.0), sf_max) END;
    RETURN NEXT;
END
$$;

-- The public entry point: SECURITY INVOKER, so keel._authorize sees current_user (src/auth.rs):
-- the caller may read a policy's quota and window where it may decide on the policy.
CREATE FUNCTION keel.rate_limit_headers(
    name text,
    remaining integer,
    reset_after_ms bigint,
    retry_after_ms bigint DEFAULT 0)
RETURNS TABLE (ratelimit_policy text, ratelimit text, retry_after bigint)
LANGUAGE sql VOLATILE PARALLEL UNSAFE ROWS 1
AS $$
    SELECT * FROM keel._rate_limit_headers(keel._authorize('limit', name), name, remaining,
                                           reset_after_ms, retry_after_ms)
$$;

DO $$
DECLARE
    owner regrole := (SELECT relowner::regrole FROM pg_catalog.pg_class
                       WHERE oid = 'keel.jobs'::pg_catalog.regclass);
    f regprocedure;
    r regrole;
BEGIN
    -- Owned by pg_keel's owner whoever runs the update (the implementation is SECURITY
    -- DEFINER), closed to PUBLIC, granted to every role that may check.
    FOREACH f IN ARRAY ARRAY[
        'keel.rate_limit_headers(text, integer, bigint, bigint)',
        'keel._rate_limit_headers(bigint, text, integer, bigint, bigint)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, owner);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel.check(text, text, integer)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.rate_limit_headers(text, integer, bigint, bigint), '
                       'keel._rate_limit_headers(bigint, text, integer, bigint, bigint) TO %s', r);
    END LOOP;
END
$$;
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = ANY (ARRAY[
        'keel.rate_limit_headers(text, integer, bigint, bigint)',
        'keel._rate_limit_headers(bigint, text, integer, bigint, bigint)'
    ]::pg_catalog.regprocedure[]);

-- Rate limits (issue 17): one decision under several policies, all or nothing, and the
-- header values of such a decision. As `cargo pgrx schema` writes check_many.
CREATE  FUNCTION keel."check_many"(
	"names" TEXT[], /* :: std :: option :: Option < Vec < Option < String > > > */
	"keys" TEXT[], /* :: std :: option :: Option < Vec < Option < String > > > */
	"costs" INT[] DEFAULT NULL /* :: std :: option :: Option < Vec < Option < i32 > > > */
) RETURNS TABLE (
	"name" TEXT,  /* String */
	"allowed" bool,  /* bool */
	"limit" INT,  /* i32 */
	"remaining" INT,  /* i32 */
	"retry_after_ms" bigint,  /* i64 */
	"reset_after_ms" bigint  /* i64 */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'check_many_wrapper';

-- The same for the decisions of one keel.check_many, in its order: each field a Structured Field
-- list with one item per policy, and Retry-After the longest wait (the call is allowed once every
-- policy allows), NULL when every one allowed. Authorized per name, as the one-decision form.
CREATE FUNCTION keel.rate_limit_headers(
    names text[],
    remaining integer[],
    reset_after_ms bigint[],
    retry_after_ms bigint[] DEFAULT NULL)
RETURNS TABLE (ratelimit_policy text, ratelimit text, retry_after bigint)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE ROWS 1
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer := cardinality(rate_limit_headers.names);
BEGIN
    IF n IS NULL OR n < 1 OR n > 32
       OR cardinality(rate_limit_headers.remaining) IS DISTINCT FROM n
       OR cardinality(rate_limit_headers.reset_after_ms) IS DISTINCT FROM n
       OR cardinality(rate_limit_headers.retry_after_ms) <> n THEN
        RAISE EXCEPTION 'invalid value for names: names, remaining, reset_after_ms and retry_after_ms must have one length, 1 to 32'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the columns of one keel.check_many, aggregated in its order (retry_after_ms may be NULL).';
    END IF;
    RETURN QUERY
    SELECT string_agg(h.ratelimit_policy, ', ' ORDER BY u.i),
           string_agg(h.ratelimit, ', ' ORDER BY u.i),
           max(h.retry_after)
      FROM unnest(rate_limit_headers.names, rate_limit_headers.remaining,
                  rate_limit_headers.reset_after_ms,
                  coalesce(rate_limit_headers.retry_after_ms, array_fill(0::bigint, ARRAY[n])))
           WITH ORDINALITY AS u(name, r, t, ra, i)
     CROSS JOIN LATERAL keel.rate_limit_headers(u.name, u.r, u.t, coalesce(u.ra, 0)) h;
END
$$;

DO $$
DECLARE
    owner regrole := (SELECT relowner::regrole FROM pg_catalog.pg_class
                       WHERE oid = 'keel.jobs'::pg_catalog.regclass);
    f regprocedure;
    r regrole;
BEGIN
    -- Owned by pg_keel's owner whoever runs the update, closed to PUBLIC, granted to every
    -- role that may check.
    FOREACH f IN ARRAY ARRAY[
        'keel.check_many(text[], text[], integer[])',
        'keel.rate_limit_headers(text[], integer[], bigint[], bigint[])'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, owner);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel.check(text, text, integer)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.check_many(text[], text[], integer[]), '
                       'keel.rate_limit_headers(text[], integer[], bigint[], bigint[]) TO %s', r);
    END LOOP;
END
$$;
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = ANY (ARRAY[
        'keel.check_many(text[], text[], integer[])',
        'keel.rate_limit_headers(text[], integer[], bigint[], bigint[])'
    ]::pg_catalog.regprocedure[]);

-- Rate limits (issue 17): concurrency limits, algorithm 'concurrency', with keel.acquire and
-- keel.release; their slots in keel.rate_limit_slots, which drop_limit, rate_reset,
-- alter_limit (a new algorithm) and the cleanup task also clear.
ALTER TABLE keel.rate_limits DROP CONSTRAINT rate_limits_algorithm_valid;
ALTER TABLE keel.rate_limits ADD CONSTRAINT rate_limits_algorithm_valid
        CHECK (algorithm IN ('token_bucket', 'fixed_window', 'sliding_window', 'concurrency'));
-- The slots of concurrency limits (algorithm 'concurrency'): one row per slot held, until
-- keel.release deletes it or expires_at passes (an expired slot is free; the next acquire of
-- its key and the cleanup task delete it). Acquires of one key queue on the key's row in
-- keel.rate_limit_state, whose expires_at is the latest of its slots'.
CREATE TABLE keel.rate_limit_slots (
    policy          text COLLATE "C" NOT NULL,
    key             text COLLATE "C" NOT NULL,
    token           uuid        NOT NULL,
    acquired_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (policy, key, token)
);

SELECT pg_catalog.pg_extension_config_dump('keel.rate_limit_slots', '');

CREATE OR REPLACE FUNCTION keel.drop_limit(name text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    -- Deleted first: the row lock waits for an alter_queue naming the policy, and the check
    -- after it then sees that queue.
    DELETE FROM keel.rate_limits l WHERE l.name = drop_limit.name;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM keel._lock_limit(drop_limit.name, true);
    PERFORM keel._limit_unused(drop_limit.name, 'dropped');
    DELETE FROM keel.rate_limit_state s WHERE s.policy = drop_limit.name;
    DELETE FROM keel.rate_limit_slots s WHERE s.policy = drop_limit.name;
    PERFORM keel._rate_forget(drop_limit.name, NULL);
    PERFORM keel._rate_policies_changed();
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION keel.rate_reset(name text, key text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    deleted bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM keel.rate_limits l WHERE l.name = rate_reset.name) THEN
        PERFORM keel._rate_error('unknown_limit', coalesce(rate_reset.name, 'NULL'), '');
    END IF;
    IF rate_reset.key IS NULL THEN
        PERFORM keel._rate_error('invalid_argument', 'key', 'must not be NULL');
    END IF;
    PERFORM keel._lock_limit(rate_reset.name, true);
    DELETE FROM keel.rate_limit_state s WHERE s.policy = rate_reset.name AND s.key = rate_reset.key;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    -- A concurrency limit's key: every slot is free again (their holders' release returns false).
    DELETE FROM keel.rate_limit_slots s WHERE s.policy = rate_reset.name AND s.key = rate_reset.key;
    RETURN deleted + keel._rate_forget(rate_reset.name, rate_reset.key) > 0;
END
$$;

CREATE OR REPLACE FUNCTION keel.cleanup_rate_limits(max_rows integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    states bigint;
    denials bigint;
    slots bigint;
BEGIN
    IF cleanup_rate_limits.max_rows IS NULL OR cleanup_rate_limits.max_rows < 1 THEN
        PERFORM keel._rate_error('invalid_argument', 'max_rows', 'must be at least 1');
    END IF;
    -- A key being decided right now is locked and skipped; the next run takes it.
    DELETE FROM keel.rate_limit_state s
     WHERE (s.policy, s.key) IN (
        SELECT x.policy, x.key FROM keel.rate_limit_state x
         WHERE x.expires_at < clock_timestamp()
         LIMIT cleanup_rate_limits.max_rows
           FOR UPDATE SKIP LOCKED)
       AND s.expires_at < clock_timestamp();
    GET DIAGNOSTICS states = ROW_COUNT;
    DELETE FROM keel.rate_limit_denials d
     WHERE d.ctid = ANY (ARRAY(
        SELECT x.ctid FROM keel.rate_limit_denials x
         WHERE x.at < clock_timestamp() - keel._rate_denial_retention()
         ORDER BY x.at
         LIMIT cleanup_rate_limits.max_rows));
    GET DIAGNOSTICS denials = ROW_COUNT;
    DELETE FROM keel.rate_limit_slots s
     WHERE (s.policy, s.key, s.token) IN (
        SELECT x.policy, x.key, x.token FROM keel.rate_limit_slots x
         WHERE x.expires_at < clock_timestamp()
         LIMIT cleanup_rate_limits.max_rows
           FOR UPDATE SKIP LOCKED)
       AND s.expires_at < clock_timestamp();
    GET DIAGNOSTICS slots = ROW_COUNT;
    RETURN states + denials + slots;
END
$$;

-- Concurrency limits (algorithm 'concurrency'): at most max slots held at once per key. An
-- acquire takes a slot until keel.release gives it back or its ttl (default: the policy's per)
-- passes, so a holder that dies frees its slot by itself. Acquires of one key queue on the
-- key's row in keel.rate_limit_state (created at once if missing), so they count exactly;
-- releases only delete their slot. Authorized like emit: a ticket for the policy.
CREATE FUNCTION keel._acquire(ticket bigint, name text, key text, ttl interval)
RETURNS TABLE (allowed boolean, token uuid, remaining integer, retry_after_ms bigint)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    p keel.rate_limits;
    hold interval;
    live integer;
    soonest timestamptz;
    now_at timestamptz;
BEGIN
    PERFORM keel._redeem(ticket, 'limit', _acquire.name);
    IF _acquire.name IS NULL THEN
        PERFORM keel._rate_error('invalid_argument', 'name', 'must not be NULL');
    END IF;
    SELECT * INTO p FROM keel.rate_limits l WHERE l.name = _acquire.name;
    IF NOT FOUND THEN
        PERFORM keel._rate_error('unknown_limit', _acquire.name, '');
    END IF;
    IF p.algorithm <> 'concurrency' THEN
        PERFORM keel._rate_error('not_concurrency', _acquire.name, '');
    END IF;
    IF _acquire.key IS NULL OR length(_acquire.key) NOT BETWEEN 1 AND 1024 THEN
        PERFORM keel._rate_error('invalid_argument', 'key', 'must be 1 to 1024 characters');
    END IF;
    hold := coalesce(_acquire.ttl, p.per);
    IF hold <= interval '0' OR hold > interval '100 years' THEN
        PERFORM keel._rate_error('invalid_argument', 'ttl',
            'must be longer than zero and at most 100 years (NULL: the policy''s per)');
    END IF;
    IF p.durability = 'memory' THEN
        -- In shared memory, unless the key is decided in the table meanwhile (no row).
        SELECT m.allowed, m.token, m.remaining, m.retry_after_ms
          INTO allowed, token, remaining, retry_after_ms
          FROM keel._acquire_memory(_acquire.name, _acquire.key, p.max, hold, p.enforce,
                                    p.log_denials) m;
        IF FOUND THEN
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    LOOP
        INSERT INTO keel.rate_limit_state AS st (policy, key, a, b, c, expires_at)
        VALUES (_acquire.name, _acquire.key, 0, 0, 0, clock_timestamp())
        ON CONFLICT (policy, key) DO NOTHING;
        PERFORM 1 FROM keel.rate_limit_state s
          WHERE s.policy = _acquire.name AND s.key = _acquire.key FOR UPDATE;
        EXIT WHEN FOUND;  -- else the cleanup task deleted it meanwhile: again
    END LOOP;
    now_at := clock_timestamp();
    DELETE FROM keel.rate_limit_slots s
     WHERE s.policy = _acquire.name AND s.key = _acquire.key AND s.expires_at <= now_at;
    SELECT count(*), min(s.expires_at) INTO live, soonest
      FROM keel.rate_limit_slots s WHERE s.policy = _acquire.name AND s.key = _acquire.key;
    IF live < p.max THEN
        token := gen_random_uuid();
        INSERT INTO keel.rate_limit_slots (policy, key, token, acquired_at, expires_at)
        VALUES (_acquire.name, _acquire.key, token, now_at, now_at + hold);
        UPDATE keel.rate_limit_state s
           SET a = live + 1, expires_at = greatest(s.expires_at, now_at + hold)
         WHERE s.policy = _acquire.name AND s.key = _acquire.key;
        allowed := true;
        remaining := p.max - live - 1;
        retry_after_ms := 0;
        RETURN NEXT;
        RETURN;
    END IF;
    -- Full: never early, the soonest slot frees itself then (a release may free one sooner).
    retry_after_ms := greatest(1, ceil(extract(epoch FROM soonest - now_at) * 1000))::bigint;
    IF p.log_denials THEN
        INSERT INTO keel.rate_limit_denials (policy, key, cost, retry_after_ms, shadow)
        VALUES (_acquire.name, _acquire.key, 1, retry_after_ms, NOT p.enforce);
    END IF;
    IF NOT p.enforce THEN
        -- Shadow mode: allowed, holding nothing (its release returns false).
        allowed := true;
        token := gen_random_uuid();
        remaining := 0;
        retry_after_ms := 0;
    ELSE
        allowed := false;
        token := NULL;
        remaining := 0;
    END IF;
    RETURN NEXT;
END
$$;

CREATE FUNCTION keel.acquire(name text, key text, ttl interval DEFAULT NULL)
RETURNS TABLE (allowed boolean, token uuid, remaining integer, retry_after_ms bigint)
LANGUAGE sql VOLATILE PARALLEL UNSAFE ROWS 1
AS $$
    SELECT * FROM keel._acquire(keel._authorize('limit', name), name, key, ttl)
$$;

-- Gives a slot back: true when this token held a slot of the key that had not expired.
CREATE FUNCTION keel._release(ticket bigint, name text, key text, token uuid)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    algorithm text;
    durability text;
    released boolean;
BEGIN
    PERFORM keel._redeem(ticket, 'limit', _release.name);
    SELECT l.algorithm, l.durability INTO algorithm, durability
      FROM keel.rate_limits l WHERE l.name = _release.name;
    IF NOT FOUND THEN
        PERFORM keel._rate_error('unknown_limit', coalesce(_release.name, 'NULL'), '');
    END IF;
    IF algorithm <> 'concurrency' THEN
        PERFORM keel._rate_error('not_concurrency', _release.name, '');
    END IF;
    IF _release.key IS NULL THEN
        PERFORM keel._rate_error('invalid_argument', 'key', 'must not be NULL');
    END IF;
    IF durability = 'memory' THEN
        -- NULL: the key is not in shared memory; the table has its slots.
        released := keel._release_memory(_release.name, _release.key, _release.token);
        IF released IS NOT NULL THEN
            RETURN released;
        END IF;
    END IF;
    DELETE FROM keel.rate_limit_slots s
     WHERE s.policy = _release.name AND s.key = _release.key AND s.token = _release.token
       AND s.expires_at > clock_timestamp();
    RETURN FOUND;
END
$$;

CREATE FUNCTION keel.release(name text, key text, token uuid)
RETURNS boolean
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
    SELECT keel._release(keel._authorize('limit', name), name, key, token)
$$;

DO $$
DECLARE
    owner regrole := (SELECT relowner::regrole FROM pg_catalog.pg_class
                       WHERE oid = 'keel.jobs'::pg_catalog.regclass);
    f regprocedure;
    r regrole;
BEGIN
    EXECUTE format('ALTER TABLE keel.rate_limit_slots OWNER TO %s', owner);
    REVOKE ALL ON keel.rate_limit_slots FROM PUBLIC;
    -- Owned by pg_keel's owner whoever runs the update (the implementations are SECURITY
    -- DEFINER), closed to PUBLIC, granted to every role that may check.
    FOREACH f IN ARRAY ARRAY[
        'keel.acquire(text, text, interval)',
        'keel._acquire(bigint, text, text, interval)',
        'keel.release(text, text, uuid)',
        'keel._release(bigint, text, text, uuid)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, owner);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel.check(text, text, integer)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.acquire(text, text, interval), '
                       'keel._acquire(bigint, text, text, interval), '
                       'keel.release(text, text, uuid), '
                       'keel._release(bigint, text, text, uuid) TO %s', r);
    END LOOP;
END
$$;
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = ANY (ARRAY[
        'keel.acquire(text, text, interval)',
        'keel._acquire(bigint, text, text, interval)',
        'keel.release(text, text, uuid)',
        'keel._release(bigint, text, text, uuid)'
    ]::pg_catalog.regprocedure[]);

-- Queues (issue 17): per-key concurrency (enqueue(..., concurrency_key) and
-- max_running_per_key) and rate-limited claims (rate_limit), claimed through keel._claim_flow;
-- keel.queue_stats shows when a rate-limited queue next allows a claim.
ALTER TABLE keel.queues ADD COLUMN max_running_per_key integer;
ALTER TABLE keel.queues ADD COLUMN rate_limit text;
ALTER TABLE keel.queues ADD CONSTRAINT queues_max_running_per_key_positive
        CHECK (max_running_per_key IS NULL OR max_running_per_key >= 1);
ALTER TABLE keel.queues ADD CONSTRAINT queues_rate_limit_valid
        CHECK (rate_limit ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$');
ALTER TABLE keel.jobs ADD COLUMN concurrency_key text;
CREATE INDEX jobs_running_key_idx ON keel.jobs (queue, concurrency_key)
    WHERE state = 'running' AND concurrency_key IS NOT NULL;
ALTER TABLE keel.queues ADD COLUMN fairness text NOT NULL DEFAULT 'fifo';
ALTER TABLE keel.queues ADD CONSTRAINT queues_fairness_valid
        CHECK (fairness IN ('fifo', 'round_robin'));

-- A round_robin queue's claims find each key's next job (sql/queue.sql, keel._claim_flow), and
-- the keys with live jobs by one descent per key: only jobs that have a key.
CREATE INDEX jobs_key_claim_idx ON keel.jobs (queue, concurrency_key, priority, visible_at, job_id)
    WHERE state IN ('ready', 'running') AND concurrency_key IS NOT NULL;

-- The concurrency keys of round_robin queues: the weight keel.set_key_weight gave (1 unless
-- set) and the key's pass, its place in the round (stride scheduling: each job claimed moves
-- it on by 1,000,000 / weight; the key with the lowest pass goes next).
CREATE TABLE keel.queue_keys (
    queue            text    NOT NULL,
    concurrency_key  text    NOT NULL,
    weight           integer NOT NULL DEFAULT 1,
    pass             bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, concurrency_key),
    CONSTRAINT queue_keys_weight_valid CHECK (weight BETWEEN 1 AND 1000000)
);
SELECT pg_catalog.pg_extension_config_dump('keel.queue_keys', '');

-- As `cargo pgrx schema` writes it.
CREATE  FUNCTION keel."_try_lock_key"(
	"queue" TEXT, /* &str */
	"key" TEXT /* &str */
) RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'try_lock_key_wrapper';
CREATE  FUNCTION keel."_last_decision_at"() RETURNS timestamp with time zone /* Option < TimestampWithTimeZone > */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'last_decision_at_wrapper';
-- Concurrency limits in shared memory (durability 'memory'): keel._acquire and keel._release
-- call these, and alter_limit moves a policy's keys out of memory with the last.
CREATE  FUNCTION keel."_acquire_memory"(
	"name" TEXT, /* & str */
	"key" TEXT, /* & str */
	"max" INT, /* i32 */
	"hold" interval, /* Interval */
	"enforce" bool, /* bool */
	"log_denials" bool /* bool */
) RETURNS TABLE (
	"allowed" bool,  /* bool */
	"token" uuid,  /* Option < pgrx :: Uuid > */
	"remaining" INT,  /* i32 */
	"retry_after_ms" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'acquire_memory_wrapper';
CREATE  FUNCTION keel."_release_memory"(
	"name" TEXT, /* & str */
	"key" TEXT, /* & str */
	"token" uuid /* pgrx :: Uuid */
) RETURNS bool /* Option < bool > */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'release_memory_wrapper';
CREATE  FUNCTION keel."_lock_limit"(
	"name" TEXT, /* &str */
	"exclusive" bool /* bool */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'lock_limit_wrapper';
CREATE  FUNCTION keel."_rate_leave_memory"(
	"name" TEXT /* & str */
) RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'rate_leave_memory_wrapper';

-- The flow-control settings create_queue and alter_queue share (NULL: not given): a positive
-- max_running_per_key, a rate_limit naming an existing policy that check decides (not a
-- concurrency limit), and fairness 'fifo' or 'round_robin'.
CREATE FUNCTION keel._check_flow(max_running_per_key integer, rate_limit text, fairness text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    algorithm text;
BEGIN
    IF max_running_per_key < 1 THEN
        PERFORM keel._queue_error('invalid_argument', 'max_running_per_key', 'must be at least 1 (or NULL for no limit)');
    END IF;
    IF fairness NOT IN ('fifo', 'round_robin') THEN
        PERFORM keel._queue_error('invalid_argument', 'fairness', 'must be ''fifo'' or ''round_robin''');
    END IF;
    IF rate_limit IS NOT NULL THEN
        -- Locked until this transaction ends, so that a drop_limit under way waits and then
        -- sees the queue that claims through the policy.
        SELECT l.algorithm INTO algorithm FROM keel.rate_limits l WHERE l.name = rate_limit
           FOR KEY SHARE;
        IF NOT FOUND THEN
            PERFORM keel._rate_error('unknown_limit', rate_limit, '');
        END IF;
        IF algorithm = 'concurrency' THEN
            PERFORM keel._rate_error('is_concurrency', rate_limit, '');
        END IF;
    END IF;
END
$$;


-- The claim of a queue with flow control — max_running_per_key, rate_limit or round_robin
-- fairness (src/queue/lease.rs calls it as pg_keel's owner, having checked the arguments and the
-- caller's grant):
-- - a job whose concurrency key already has max_running_per_key live leases stays ready. A
--   claim decides a key under the key's lock (keel._try_lock_key), held to the end of its
--   transaction, counting the key's live leases only once it holds it; a claim that finds the
--   key locked passes over it, as SKIP LOCKED passes over a row;
-- - each job is charged to the queue's rate limit (keyed by its concurrency_key, else by the
--   queue) before it is taken, and one the policy refuses stays ready, with the later jobs of
--   its key. The jobs are picked and row-locked first, then charged key by key in one order
--   (byte order of the key): two claims that charge the same keys wait for each other's
--   decision in that order, never in a circle. A key whose next call the policy would refuse
--   now (keel.rate_peek, no lock) is passed over while picking. A charged job's claimed_at is
--   the time of its charge;
-- - 'fifo' picks in claim order, reading at most batch * 4 + 100 candidates (keys at their
--   limit left out). 'round_robin' goes round the keys with live jobs (up to 1,000, found by one
--   descent of jobs_key_claim_idx each) by stride scheduling: the key with the lowest pass
--   gives its next job in its own claim order, and moves on by 1,000,000 / its weight
--   (keel.queue_keys); a key new to the round starts at the lowest pass, and one that comes back
--   more than a turn behind every other is brought up to one turn behind. The claim holds the
--   lock of every key it serves, so only it moves their passes. Jobs without a key are
--   claimed after the keys' turns, when they are among the batch * 4 + 100 first in claim order
--   (give every job of a round_robin queue a key).
-- A claim locks at most 128 keys (each is an entry of the shared lock table); it passes over
-- more. Under REPEATABLE READ the counts could miss a claim that held a key's lock before:
-- src/queue/lease.rs refuses such claims there (0A000).
CREATE FUNCTION keel._claim_flow(
    queue text,
    batch integer,
    now_at timestamptz,
    lease_until timestamptz,
    worker text,
    role oid,
    max_attempts integer,
    fence timestamptz,
    max_bytes bigint)
RETURNS TABLE (job_id bigint, attempt integer, payload jsonb, priority integer,
               enqueued_at timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    unit CONSTANT bigint := 1000000;
    -- Keys one claim locks at most: each lock is an entry of the shared lock table.
    max_keys CONSTANT integer := 128;
    keys_locked integer := 0;
    q keel.queues;
    rate_enforced boolean := false;
    full_keys text[];
    c record;
    d record;
    room jsonb := '{}';      -- concurrency key -> leases it may still take in this claim
    spent text[] := '{}';    -- rate keys the policy refuses now
    rate_key text;
    live integer;
    bytes bigint := 0;
    picked bigint[] := '{}';
    picked_keys text[] := '{}';
    picked_fenced boolean[] := '{}';
    taken bigint[];
    charged_ids bigint[] := '{}';
    charged_at timestamptz[] := '{}';
    -- round_robin: the keys in the round, their pass and weight, and whether still in it.
    keys text[];
    passes bigint[];
    weights integer[];
    alive boolean[];
    floor_pass bigint;
    lowest bigint;
    lowest_at bigint;
    second bigint;
    best integer;
BEGIN
    SELECT * INTO q FROM keel.queues WHERE queue = _claim_flow.queue;
    IF q.rate_limit IS NOT NULL THEN
        -- A policy in shadow mode refuses nothing: no key is passed over for it.
        SELECT l.enforce INTO rate_enforced FROM keel.rate_limits l WHERE l.name = q.rate_limit;
    END IF;
    IF q.max_running_per_key IS NOT NULL THEN
        full_keys := ARRAY(
            SELECT j.concurrency_key FROM keel.jobs j
             WHERE j.queue = _claim_flow.queue AND j.state = 'running'
               AND j.concurrency_key IS NOT NULL AND j.visible_at > _claim_flow.now_at
             GROUP BY j.concurrency_key
            HAVING count(*) >= q.max_running_per_key);
    END IF;
    -- 1. Pick, row-locking each job.
    IF q.fairness = 'round_robin' THEN
        keys := ARRAY(
            WITH RECURSIVE k(key) AS (
                (SELECT j.concurrency_key FROM keel.jobs j
                  WHERE j.queue = _claim_flow.queue AND j.state IN ('ready', 'running')
                    AND j.concurrency_key IS NOT NULL
                  ORDER BY j.concurrency_key LIMIT 1)
                UNION ALL
                SELECT (SELECT j.concurrency_key FROM keel.jobs j
                         WHERE j.queue = _claim_flow.queue AND j.state IN ('ready', 'running')
                           AND j.concurrency_key IS NOT NULL AND j.concurrency_key > k.key
                         ORDER BY j.concurrency_key LIMIT 1)
                  FROM k WHERE k.key IS NOT NULL)
            SELECT k.key FROM k
             WHERE k.key IS NOT NULL
               AND (full_keys IS NULL OR k.key <> ALL (full_keys))
             LIMIT 1000);
        SELECT array_agg(coalesce(qk.pass, -1) ORDER BY u.o),
               array_agg(coalesce(qk.weight, 1) ORDER BY u.o)
          INTO passes, weights
          FROM unnest(keys) WITH ORDINALITY AS u(key, o)
          LEFT JOIN keel.queue_keys qk
            ON qk.queue = _claim_flow.queue AND qk.concurrency_key = u.key;
        alive := array_fill(true, ARRAY[cardinality(keys)]);
        -- New keys start at the lowest pass; one more than a turn behind every other is
        -- brought up to one turn behind.
        -- The lowest known pass and the one after it (the lowest of the others, for the key
        -- that has the lowest).
        SELECT min(x.p), (array_agg(x.o ORDER BY x.p, x.o))[1],
               (array_agg(x.p ORDER BY x.p, x.o))[2]
          INTO lowest, lowest_at, second
          FROM unnest(passes) WITH ORDINALITY AS x(p, o) WHERE x.p >= 0;
        FOR i IN 1 .. cardinality(keys) LOOP
            floor_pass := CASE WHEN i = lowest_at THEN second ELSE lowest END;
            IF passes[i] < 0 THEN
                passes[i] := coalesce(floor_pass, 0);
            ELSIF floor_pass IS NOT NULL AND passes[i] < floor_pass - unit THEN
                passes[i] := floor_pass - unit;
            END IF;
        END LOOP;
        LOOP
            EXIT WHEN cardinality(picked) >= _claim_flow.batch OR bytes >= _claim_flow.max_bytes;
            best := NULL;
            FOR i IN 1 .. cardinality(keys) LOOP
                IF alive[i] AND (best IS NULL OR passes[i] < passes[best]) THEN
                    best := i;
                END IF;
            END LOOP;
            EXIT WHEN best IS NULL;
            IF NOT room ? keys[best] THEN
                IF keys_locked >= max_keys
                   OR NOT keel._try_lock_key(_claim_flow.queue, keys[best]) THEN
                    alive[best] := false;
                    CONTINUE;
                END IF;
                keys_locked := keys_locked + 1;
                live := 0;
                IF q.max_running_per_key IS NOT NULL THEN
                    SELECT count(*) INTO live FROM keel.jobs j
                     WHERE j.queue = _claim_flow.queue AND j.concurrency_key = keys[best]
                       AND j.state = 'running' AND j.visible_at > _claim_flow.now_at;
                END IF;
                room := room || jsonb_build_object(keys[best],
                                                   coalesce(q.max_running_per_key, 2147483647) - live);
                IF rate_enforced
                   AND NOT (SELECT p.allowed FROM keel.rate_peek(q.rate_limit, keys[best]) p) THEN
                    alive[best] := false;
                    CONTINUE;
                END IF;
            END IF;
            IF (room ->> keys[best])::integer <= 0 THEN
                alive[best] := false;
                CONTINUE;
            END IF;
            SELECT j.job_id, j.attempt, j.enqueued_at, j.visible_at,
                   pg_column_size(j.payload) AS size
              INTO d
              FROM keel.jobs j
             WHERE j.queue = _claim_flow.queue AND j.concurrency_key = keys[best]
               AND j.state IN ('ready', 'running') AND j.visible_at <= _claim_flow.now_at
               AND (j.state = 'ready'
                    OR j.attempt - j.attempt_base < coalesce(j.max_attempts, _claim_flow.max_attempts))
               AND j.job_id <> ALL (picked)
             ORDER BY j.priority, j.visible_at, j.job_id
             LIMIT 1
               FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                alive[best] := false;
                CONTINUE;
            END IF;
            picked := picked || d.job_id;
            picked_keys := picked_keys || keys[best];
            picked_fenced := picked_fenced || (d.attempt = 0 AND _claim_flow.fence IS NOT NULL
                             AND d.enqueued_at < _claim_flow.fence AND d.visible_at < _claim_flow.fence);
            bytes := bytes + d.size;
            room := jsonb_set(room, ARRAY[keys[best]],
                              to_jsonb((room ->> keys[best])::integer - 1));
            passes[best] := passes[best] + unit / weights[best];
        END LOOP;
        -- The keys served keep their place in the round (their locks are this claim's).
        INSERT INTO keel.queue_keys AS qk (queue, concurrency_key, pass)
        SELECT _claim_flow.queue, u.key, u.pass
          FROM unnest(keys, passes) AS u(key, pass)
         WHERE u.key = ANY (picked_keys)
        ON CONFLICT (queue, concurrency_key) DO UPDATE SET pass = excluded.pass;
    END IF;
    -- 'fifo', and the jobs without a key of a round_robin queue: claim order.
    IF cardinality(picked) < _claim_flow.batch AND bytes < _claim_flow.max_bytes THEN
        FOR c IN
            SELECT j.job_id, j.concurrency_key
              FROM keel.jobs j
             WHERE j.queue = _claim_flow.queue AND j.state IN ('ready', 'running')
               AND j.visible_at <= _claim_flow.now_at
               AND (j.concurrency_key IS NULL OR full_keys IS NULL
                    OR j.concurrency_key <> ALL (full_keys))
             ORDER BY j.priority, j.visible_at, j.job_id
             LIMIT _claim_flow.batch * 4 + 100
        LOOP
            -- round_robin: the keys had their turns above; only jobs without a key here.
            CONTINUE WHEN q.fairness = 'round_robin' AND c.concurrency_key IS NOT NULL;
            rate_key := coalesce(c.concurrency_key, _claim_flow.queue);
            CONTINUE WHEN rate_key = ANY (spent);
            IF c.concurrency_key IS NOT NULL AND q.max_running_per_key IS NOT NULL THEN
                IF NOT room ? c.concurrency_key THEN
                    CONTINUE WHEN keys_locked >= max_keys;
                    IF keel._try_lock_key(_claim_flow.queue, c.concurrency_key) THEN
                        keys_locked := keys_locked + 1;
                        -- Under the lock: every claim of the key that held it before has
                        -- committed.
                        SELECT count(*) INTO live FROM keel.jobs j
                         WHERE j.queue = _claim_flow.queue AND j.concurrency_key = c.concurrency_key
                           AND j.state = 'running' AND j.visible_at > _claim_flow.now_at;
                        room := room || jsonb_build_object(c.concurrency_key,
                                                           q.max_running_per_key - live);
                    ELSE
                        room := room || jsonb_build_object(c.concurrency_key, 0);
                    END IF;
                END IF;
                CONTINUE WHEN (room ->> c.concurrency_key)::integer <= 0;
            END IF;
            IF rate_enforced AND NOT rate_key = ANY (picked_keys)
               AND NOT (SELECT p.allowed FROM keel.rate_peek(q.rate_limit, rate_key) p) THEN
                spent := spent || rate_key;
                CONTINUE;
            END IF;
            -- FOR UPDATE SKIP LOCKED, and still claimable (a claim may have taken it since the
            -- scan's snapshot): ready, or running with its lease expired and a try left.
            SELECT j.attempt, j.attempt_base, j.max_attempts, j.state, j.enqueued_at, j.visible_at,
                   pg_column_size(j.payload) AS size
              INTO d
              FROM keel.jobs j
             WHERE j.job_id = c.job_id AND j.state IN ('ready', 'running')
               AND j.visible_at <= _claim_flow.now_at
               FOR UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            CONTINUE WHEN d.state = 'running' AND d.attempt - d.attempt_base
                          >= coalesce(d.max_attempts, _claim_flow.max_attempts);
            picked := picked || c.job_id;
            picked_keys := picked_keys || rate_key;
            -- The crash fence, as the native claim applies it (src/queue/fence.rs).
            picked_fenced := picked_fenced || (d.attempt = 0 AND _claim_flow.fence IS NOT NULL
                             AND d.enqueued_at < _claim_flow.fence AND d.visible_at < _claim_flow.fence);
            bytes := bytes + d.size;
            IF c.concurrency_key IS NOT NULL AND q.max_running_per_key IS NOT NULL THEN
                room := jsonb_set(room, ARRAY[c.concurrency_key],
                                  to_jsonb((room ->> c.concurrency_key)::integer - 1));
            END IF;
            EXIT WHEN cardinality(picked) >= _claim_flow.batch OR bytes >= _claim_flow.max_bytes;
        END LOOP;
    END IF;
    -- 2. Charge: key by key in byte order, each key's jobs in claim order, up to the first the
    -- policy refuses.
    IF q.rate_limit IS NULL THEN
        taken := picked;
    ELSE
        taken := '{}';
        FOR rate_key IN
            SELECT DISTINCT k COLLATE "C" FROM unnest(picked_keys) k ORDER BY 1
        LOOP
            FOR c IN
                SELECT u.id FROM unnest(picked, picked_keys) WITH ORDINALITY AS u(id, k, o)
                 WHERE u.k = rate_key ORDER BY u.o
            LOOP
                EXIT WHEN NOT (SELECT r.allowed FROM keel.check(q.rate_limit, rate_key) r);
                taken := taken || c.id;
                -- claimed_at is when the job was charged: the policy's windows and the jobs'
                -- claimed_at then count the same claims.
                charged_at := charged_at || keel._last_decision_at();
                charged_ids := charged_ids || c.id;
            END LOOP;
        END LOOP;
    END IF;
    -- 3. Lease what was taken, returned in the order picked.
    RETURN QUERY
    WITH leased AS (
        UPDATE keel.jobs j
           SET state = 'running',
               attempt = j.attempt + CASE WHEN u.fenced THEN 2 ELSE 1 END,
               attempt_base = j.attempt_base + CASE WHEN u.fenced THEN 1 ELSE 0 END,
               visible_at = _claim_flow.lease_until,
               claimed_at = coalesce(
                   charged_at[array_position(charged_ids, u.id)], _claim_flow.now_at),
               worker = _claim_flow.worker,
               claimed_by = _claim_flow.role
          FROM unnest(picked, picked_fenced) WITH ORDINALITY AS u(id, fenced, o)
         WHERE j.job_id = u.id AND u.id = ANY (taken)
        RETURNING j.job_id AS id, j.attempt AS a, j.payload AS p, j.priority AS pr,
                  j.enqueued_at AS e, j.visible_at AS v, u.o)
    SELECT l.id, l.a, l.p, l.pr, l.e, l.v FROM leased l ORDER BY l.o;
END
$$;


-- When the rate limit of a queue next allows a claim keyed by the queue, for keel.queue_stats:
-- now when it allows one now. As pg_keel's owner, so a monitor needs no grant on the policy.
-- NULL, rather than an error for every reader of the view, when the policy cannot be read
-- (a memory policy outside a served database).
CREATE FUNCTION keel._queue_next_allowed(queue text, rate_limit text)
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF rate_limit IS NULL THEN
        RETURN NULL;
    END IF;
    IF NOT (SELECT l.enforce FROM keel.rate_limits l WHERE l.name = rate_limit) THEN
        RETURN now();  -- shadow mode: every claim allowed
    END IF;
    RETURN (SELECT now() + p.retry_after_ms * interval '1 millisecond'
              FROM keel.rate_peek(rate_limit, queue) p);
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;


-- A policy that queues claim through (keel.queues.rate_limit) is not dropped nor made a
-- concurrency limit under them: 2BP01, naming the first such queue.
CREATE FUNCTION keel._limit_unused(name text, change text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    used_by text;
BEGIN
    SELECT q.queue INTO used_by FROM keel.queues q WHERE q.rate_limit = _limit_unused.name
     ORDER BY q.queue LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'rate limit "%" cannot be %: queue "%" claims through it', name, change, used_by
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = format('Clear it first: SELECT keel.alter_queue(%L, clear_rate_limit => true);', used_by);
    END IF;
END
$$;


CREATE OR REPLACE VIEW keel.queue_stats AS
SELECT q.queue,
       q.paused,
       count(j.job_id) FILTER (WHERE j.state = 'ready' AND j.visible_at <= now())   AS ready,
       count(j.job_id) FILTER (WHERE j.state = 'ready' AND j.visible_at > now())    AS scheduled,
       count(j.job_id) FILTER (WHERE j.state = 'running' AND j.visible_at > now())  AS running,
       count(j.job_id) FILTER (WHERE j.state = 'running' AND j.visible_at <= now()) AS expired_leases,
       count(j.job_id) FILTER (WHERE j.state = 'dead')                              AS dead,
       count(j.job_id) FILTER (WHERE j.state = 'done')                              AS done,
       now() - min(j.enqueued_at) FILTER (WHERE j.state = 'ready' AND j.visible_at <= now())
                                                                                    AS oldest_ready_age,
       c.enqueued_total,
       c.completed_total,
       -- Last: added in 0.2.0 (a view's new columns go after the old ones).
       count(j.job_id) FILTER (WHERE j.state = 'cancelled')                         AS cancelled,
       -- A queue with a rate_limit: when its policy next allows a claim of a job without a
       -- concurrency key (now when it does already); NULL without a rate_limit.
       keel._queue_next_allowed(q.queue, q.rate_limit)                              AS next_allowed_at
  FROM keel.queues q
  LEFT JOIN keel.jobs j ON j.queue = q.queue
  LEFT JOIN keel._queue_counters() c ON c.queue = q.queue
 GROUP BY q.queue, q.paused, q.rate_limit, c.enqueued_total, c.completed_total;

-- A concurrency key's share of a round_robin queue's claims (1 to 1,000,000; every key starts
-- at 1): a key of weight 3 gets three claims for every one of a key of weight 1 while both have
-- jobs waiting.
CREATE FUNCTION keel.set_key_weight(queue text, concurrency_key text, weight integer)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT 1 FROM keel.queues q WHERE q.queue = set_key_weight.queue) THEN
        PERFORM keel._unknown_queue(coalesce(set_key_weight.queue, 'NULL'));
    END IF;
    IF set_key_weight.concurrency_key IS NULL
       OR octet_length(set_key_weight.concurrency_key) NOT BETWEEN 1 AND 1024 THEN
        PERFORM keel._queue_error('invalid_argument', 'concurrency_key', 'must be 1 to 1024 bytes');
    END IF;
    IF set_key_weight.weight IS NULL OR set_key_weight.weight NOT BETWEEN 1 AND 1000000 THEN
        PERFORM keel._queue_error('invalid_argument', 'weight', 'must be between 1 and 1000000');
    END IF;
    INSERT INTO keel.queue_keys AS qk (queue, concurrency_key, weight)
    VALUES (set_key_weight.queue, set_key_weight.concurrency_key, set_key_weight.weight)
    ON CONFLICT (queue, concurrency_key) DO UPDATE SET weight = excluded.weight;
END
$$;

DO $$
DECLARE
    owner regrole := (SELECT relowner::regrole FROM pg_catalog.pg_class
                       WHERE oid = 'keel.jobs'::pg_catalog.regclass);
    f regprocedure;
    r regrole;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'keel._try_lock_key(text, text)',
        'keel._last_decision_at()',
        'keel._acquire_memory(text, text, integer, interval, boolean, boolean)',
        'keel._release_memory(text, text, uuid)',
        'keel._rate_leave_memory(text)',
        'keel._lock_limit(text, boolean)',
        'keel.set_key_weight(text, text, integer)',
        'keel._check_flow(integer, text, text)',
        'keel._claim_flow(text, integer, timestamptz, timestamptz, text, oid, integer, timestamptz, bigint)',
        'keel._queue_next_allowed(text, text)',
        'keel._limit_unused(text, text)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, owner);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    EXECUTE format('ALTER TABLE keel.queue_keys OWNER TO %s', owner);
    REVOKE ALL ON keel.queue_keys FROM PUBLIC;
    -- Admins (who may create queues) set key weights.
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel.create_queue(text, interval, integer, interval, interval, bigint, interval, interval, text, integer, text, text)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.set_key_weight(text, text, integer) TO %s', r);
    END LOOP;
    -- Readers of keel.queue_stats call keel._queue_next_allowed, as they call _queue_counters.
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel._queue_counters()'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel._queue_next_allowed(text, text) TO %s', r);
    END LOOP;
END
$$;
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = ANY (ARRAY[
        'keel._try_lock_key(text, text)',
        'keel._last_decision_at()',
        'keel._acquire_memory(text, text, integer, interval, boolean, boolean)',
        'keel._release_memory(text, text, uuid)',
        'keel._rate_leave_memory(text)',
        'keel._lock_limit(text, boolean)',
        'keel.set_key_weight(text, text, integer)',
        'keel._check_flow(integer, text, text)',
        'keel._claim_flow(text, integer, timestamptz, timestamptz, text, oid, integer, timestamptz, bigint)',
        'keel._queue_next_allowed(text, text)',
        'keel._limit_unused(text, text)'
    ]::pg_catalog.regprocedure[]);

-- Sessions (issue 18, item 1): a rotation's grace. keel.session_rotate gains `grace`; the
-- replaced token's hash, the end of its grace and the sealed new token are kept on the
-- session until the cleanup clears them.
ALTER TABLE keel.sessions
    ADD COLUMN previous_hash bytea,
    ADD COLUMN previous_until timestamptz,
    ADD COLUMN rotated_to bytea;
CREATE INDEX sessions_previous_hash_idx ON keel.sessions (previous_hash)
    WHERE previous_hash IS NOT NULL;

-- As `cargo pgrx schema` writes them.
CREATE  FUNCTION keel."_session_seal"(
	"old" TEXT, /* Option < & str > */
	"new" TEXT /* Option < & str > */
) RETURNS bytea /* Vec < u8 > */
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'session_seal_wrapper';
CREATE  FUNCTION keel."_session_unseal"(
	"old" TEXT, /* Option < & str > */
	"sealed" bytea /* & [u8] */
) RETURNS TEXT /* Option < String > */
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'session_unseal_wrapper';

-- Who may rotate now may rotate (with a grace) and log in after the update: the old
-- function's grants go with it, so its grantees are noted first (by oid).
SELECT pg_catalog.set_config('pg_keel_update.rotate_grantees',
    coalesce((SELECT string_agg(DISTINCT a.grantee::oid::text, ',')
                FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
               WHERE p.oid = 'keel.session_rotate(text)'::pg_catalog.regprocedure
                 AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0
                 AND a.grantee <> p.proowner), ''),
    true);
DROP FUNCTION keel.session_rotate(text);
-- Same session, new token. Without a grace the old token stops working when this commits;
-- with one, it keeps validating until the grace ends (requests already in flight), and a
-- second rotation of it meanwhile returns the same new token instead of forking the session
-- (two requests that both rotate). Only the token just replaced has a grace. NULL when the
-- token has no valid session. Expiry stays; the session counts as seen now.
CREATE FUNCTION keel.session_rotate(token text, grace interval DEFAULT '0')
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    hash bytea := keel._session_hash(session_rotate.token);
    new_token text := keel._session_token();
    graced boolean;
    sid uuid;
    uid text;
    sealed bytea;
BEGIN
    PERFORM keel._check_interval('grace', session_rotate.grace);
    IF session_rotate.grace IS NULL OR session_rotate.grace < interval '0'
       OR session_rotate.grace > interval '1 hour' THEN
        PERFORM keel._invalid_argument('grace',
                                  'must be zero to 1 hour (the time requests in flight need)');
    END IF;
    graced := session_rotate.grace > interval '0';
    -- A new token hash is a new index entry anyway (not HOT): the idle check moves too.
    UPDATE keel.sessions s
       SET token_hash = keel._session_hash(new_token),
           previous_hash = CASE WHEN graced THEN hash END,
           previous_until = CASE WHEN graced THEN least(s.expires_at, now() + session_rotate.grace) END,
           rotated_to = CASE WHEN graced THEN keel._session_seal(session_rotate.token, new_token) END,
           last_seen_at = now(),
           idle_expires_at = CASE WHEN s.idle_timeout IS NULL THEN NULL
                                  ELSE least(s.expires_at, now() + s.idle_timeout) END,
           idle_check_at = CASE WHEN s.idle_timeout IS NULL THEN NULL
                                ELSE least(s.expires_at, now() + s.idle_timeout) END
     WHERE s.token_hash = hash AND s.revoked_at IS NULL AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
    RETURNING s.session_id, s.user_id INTO sid, uid;
    IF FOUND THEN
        PERFORM keel._session_revoked(sid, uid, 'rotated');
        RETURN new_token;
    END IF;
    -- Rotated away already, inside that rotation's grace: its new token (a rotation that
    -- waited for that one's row lock gets here too, once it committed).
    SELECT s.rotated_to INTO sealed FROM keel.sessions s
     WHERE s.previous_hash = hash AND s.previous_until > now() AND s.revoked_at IS NULL
       AND s.expires_at > now() AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now());
    IF sealed IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN keel._session_unseal(session_rotate.token, sealed);
END
$$;

-- Sessions (issue 18, item 3): anonymous sessions (user_id NULL) and keel.session_login.
ALTER TABLE keel.sessions ALTER COLUMN user_id DROP NOT NULL;
-- As `cargo pgrx schema` writes it (issue 19, item 3: one error for a bad argument of any
-- capability).
CREATE  FUNCTION keel."_invalid_argument"(
	"argument" TEXT, /* Option < & str > */
	"rule" TEXT /* Option < & str > */
) RETURNS void
VOLATILE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'invalid_argument_sql_wrapper';
-- Sessions (issue 18, items 2 and 5): per-user caps (session_create and session_login gain
-- max_per_user; keel.session_users holds the per-user lock rows) and lifecycle events
-- (keel.session_events = lifecycle).
-- As `cargo pgrx schema` writes it.
CREATE  FUNCTION keel."_session_lifecycle"() RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'session_lifecycle_wrapper';
-- A session lifecycle event (keel.session_events = lifecycle): a session created or logged
-- in, in order per user (aggregate_id), delivered only if the transaction commits. Never the
-- token.
CREATE FUNCTION keel._session_event(topic text, payload jsonb, user_id text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF keel._session_lifecycle() THEN
        PERFORM keel.emit(topic, payload, aggregate_id => user_id);
    END IF;
END
$$;

-- The payload of keel.session_expired for a session the cleanup deletes that ended on its
-- own (not revoked): by its ttl or by idleness, and when.
CREATE FUNCTION keel._session_expired(session_id uuid, user_id text, expires_at timestamptz,
                                      idle_expires_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_build_object(
        'session_id', session_id, 'user_id', user_id,
        'reason', CASE WHEN idle_expires_at < expires_at THEN 'idle' ELSE 'expired' END,
        'ended_at', least(expires_at, idle_expires_at))
$$;

-- One row per user whose sessions are capped (session_create or session_login with
-- max_per_user): its row lock queues that user's capped logins, so each counts the sessions
-- the one before it committed and the cap is exact under concurrency. A table row rather
-- than an advisory lock: no other role can take it. `until` is at least the latest expiry
-- of a session created under a cap; the cleanup deletes the row once that has passed (a
-- later capped login makes it again).
CREATE TABLE keel.session_users (
    user_id  text        PRIMARY KEY,
    until    timestamptz NOT NULL
);
CREATE INDEX session_users_until_idx ON keel.session_users (until);

-- Takes user_id's row lock in keel.session_users (the row is made if missing), held until
-- the transaction ends: what queues the capped logins of one user, and revoke_user behind
-- them. A conflict locks the row even when the WHERE leaves it as it is: `until` is
-- rewritten only when it falls short of the given time, and then to a day past it, so most
-- calls lock the row without writing a new version of it.
CREATE FUNCTION keel._lock_session_user(user_id text, until timestamptz)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO keel.session_users AS u (user_id, until)
    VALUES (_lock_session_user.user_id, _lock_session_user.until + interval '1 day')
    ON CONFLICT (user_id) DO UPDATE SET until = excluded.until
        WHERE u.until < _lock_session_user.until;
END
$$;

-- Caps user_id's sessions before a capped login adds one: takes the user's row lock, then
-- revokes (reason `evicted`) the least recently seen of its valid sessions other than
-- except_session until `keep` are left. Returns how many it revoked.
--
-- A session row someone holds (a request's touch, in a transaction that may be about to log
-- the same user in) is passed over for the next least recently seen one: it is in use right
-- now, and waiting for it could deadlock with that transaction. Only when every candidate is
-- held does the eviction wait. Each round counts again in a new snapshot, so a candidate
-- revoked or moved to another user meanwhile is not evicted and not miscounted.
CREATE FUNCTION keel._session_evict(user_id text, keep integer, until timestamptz,
                                    except_session uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    need bigint;
    victims uuid[];
    sid uuid;
    evicted integer := 0;
BEGIN
    PERFORM keel._lock_session_user(_session_evict.user_id, _session_evict.until);
    LOOP
        -- A new statement, so a new snapshot: it sees every session the capped logins
        -- queued before this one committed.
        SELECT count(*) - _session_evict.keep INTO need FROM keel.sessions s
         WHERE s.user_id = _session_evict.user_id AND s.revoked_at IS NULL
           AND s.expires_at > now() AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
           AND s.session_id IS DISTINCT FROM _session_evict.except_session;
        EXIT WHEN need <= 0;
        victims := ARRAY(
            SELECT s.session_id FROM keel.sessions s
             WHERE s.user_id = _session_evict.user_id AND s.revoked_at IS NULL
               AND s.expires_at > now()
               AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
               AND s.session_id IS DISTINCT FROM _session_evict.except_session
             ORDER BY s.last_seen_at, s.created_at, s.session_id DESC
             LIMIT need
               FOR UPDATE SKIP LOCKED);
        IF cardinality(victims) = 0 THEN
            victims := ARRAY(
                SELECT s.session_id FROM keel.sessions s
                 WHERE s.user_id = _session_evict.user_id AND s.revoked_at IS NULL
                   AND s.expires_at > now()
                   AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
                   AND s.session_id IS DISTINCT FROM _session_evict.except_session
                 ORDER BY s.last_seen_at, s.created_at, s.session_id DESC
                 LIMIT need
                   FOR UPDATE);
            EXIT WHEN cardinality(victims) = 0;
        END IF;
        -- Locked above and checked again on the latest version: still this user's and valid.
        FOR sid IN
            UPDATE keel.sessions s
               SET revoked_at = now(), revoke_reason = 'evicted',
                   expires_at = least(s.expires_at, now())
             WHERE s.session_id = ANY (victims)
            RETURNING s.session_id
        LOOP
            evicted := evicted + 1;
            PERFORM keel._session_revoked(sid, _session_evict.user_id, 'evicted');
        END LOOP;
    END LOOP;
    RETURN evicted;
END
$$;

CREATE FUNCTION keel._check_max_per_user(user_id text, max_per_user integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF max_per_user IS NULL THEN
        RETURN;
    END IF;
    IF max_per_user < 1 OR max_per_user > 10000 THEN
        PERFORM keel._invalid_argument('max_per_user',
                                  'must be 1 to 10000 (or NULL for no cap)');
    END IF;
    IF user_id IS NULL THEN
        PERFORM keel._invalid_argument('max_per_user',
                                  'needs a user_id: an anonymous session has no user to cap');
    END IF;
END
$$;

-- Who may create sessions now may after the update: the old function's grants go with it,
-- so its grantees are noted first (by oid).
SELECT pg_catalog.set_config('pg_keel_update.create_grantees',
    coalesce((SELECT string_agg(DISTINCT a.grantee::oid::text, ',')
                FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
               WHERE p.oid = 'keel.session_create(text, interval, interval, jsonb)'::pg_catalog.regprocedure
                 AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0
                 AND a.grantee <> p.proowner), ''),
    true);
DROP FUNCTION keel.session_create(text, interval, interval, jsonb);
CREATE FUNCTION keel.session_create(
    user_id text,
    ttl interval DEFAULT '30 days',
    idle_timeout interval DEFAULT NULL,
    data jsonb DEFAULT '{}',
    max_per_user integer DEFAULT NULL)
RETURNS TABLE (session_id uuid, token text, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_token text;
    new_id uuid;
    new_expires timestamptz;
BEGIN
    -- NULL: an anonymous session (a cart, a consent choice), bound later by session_login.
    IF session_create.user_id = '' OR length(session_create.user_id) > 1024 THEN
        PERFORM keel._invalid_argument('user_id',
                                  'must be 1 to 1024 characters (or NULL for an anonymous session)');
    END IF;
    PERFORM keel._check_interval('ttl', session_create.ttl);
    PERFORM keel._check_interval('idle_timeout', session_create.idle_timeout);
    IF session_create.ttl IS NULL OR session_create.ttl <= interval '0' THEN
        PERFORM keel._invalid_argument('ttl', 'must be a positive interval');
    END IF;
    IF session_create.idle_timeout <= interval '0' THEN
        PERFORM keel._invalid_argument('idle_timeout',
                                  'must be a positive interval (or NULL for none)');
    END IF;
    IF session_create.idle_timeout > session_create.ttl THEN
        PERFORM keel._invalid_argument('idle_timeout',
                                  'must not be longer than ttl (it could never apply)');
    END IF;
    PERFORM keel._check_session_data(session_create.data);
    PERFORM keel._check_max_per_user(session_create.user_id, session_create.max_per_user);
    new_token := keel._session_token();
    -- At the cap: the least recently seen give way to this one.
    IF session_create.max_per_user IS NOT NULL THEN
        PERFORM keel._session_evict(session_create.user_id, session_create.max_per_user - 1,
                                    now() + session_create.ttl);
    END IF;
    INSERT INTO keel.sessions AS s (token_hash, user_id, data, expires_at, idle_timeout,
                                    idle_expires_at, idle_check_at)
    VALUES (keel._session_hash(new_token), session_create.user_id, session_create.data,
            now() + session_create.ttl, session_create.idle_timeout,
            now() + session_create.idle_timeout, now() + session_create.idle_timeout)
    RETURNING s.session_id, s.expires_at INTO new_id, new_expires;
    PERFORM keel._session_event('keel.session_created',
        jsonb_build_object('session_id', new_id, 'user_id', session_create.user_id,
                           'expires_at', new_expires),
        session_create.user_id);
    RETURN QUERY SELECT new_id, new_token, new_expires;
END
$$;

-- Login on an existing session: binds user_id (an anonymous session's first user, or
-- another) and rotates the token in the same step, so a token planted before the login
-- (session fixation) is worth nothing after it. The old token stops working when this
-- commits (no grace); expiry stays, and data too unless the session was another user's.
-- NULL when the token has no valid session.
CREATE FUNCTION keel.session_login(token text, user_id text, max_per_user integer DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    hash bytea := keel._session_hash(session_login.token);
    new_token text := keel._session_token();
    sid uuid;
    before text;
    ends timestamptz;
BEGIN
    IF session_login.user_id IS NULL OR session_login.user_id = ''
       OR length(session_login.user_id) > 1024 THEN
        PERFORM keel._invalid_argument('user_id', 'must be 1 to 1024 characters');
    END IF;
    PERFORM keel._check_max_per_user(session_login.user_id, session_login.max_per_user);
    -- A capped login takes the user's lock before the session's row, as session_create
    -- does, so the two never wait for each other in opposite orders.
    IF session_login.max_per_user IS NOT NULL THEN
        PERFORM keel._lock_session_user(session_login.user_id, now());
    END IF;
    SELECT s.session_id, s.user_id, s.expires_at INTO sid, before, ends FROM keel.sessions s
     WHERE s.token_hash = hash AND s.revoked_at IS NULL AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF session_login.max_per_user IS NOT NULL THEN
        PERFORM keel._session_evict(session_login.user_id, session_login.max_per_user - 1,
                                    ends, except_session => sid);
    END IF;
    -- Another user's session: what it carried (roles, MFA flags) was theirs, not the new
    -- user's; an anonymous session keeps its data (a cart), as does the same user's.
    UPDATE keel.sessions s
       SET user_id = session_login.user_id,
           data = CASE WHEN before IS NOT NULL AND before <> session_login.user_id
                       THEN '{}'::jsonb ELSE s.data END,
           token_hash = keel._session_hash(new_token),
           previous_hash = NULL, previous_until = NULL, rotated_to = NULL,
           last_seen_at = now(),
           idle_expires_at = CASE WHEN s.idle_timeout IS NULL THEN NULL
                                  ELSE least(s.expires_at, now() + s.idle_timeout) END,
           idle_check_at = CASE WHEN s.idle_timeout IS NULL THEN NULL
                                ELSE least(s.expires_at, now() + s.idle_timeout) END
     WHERE s.session_id = sid;
    -- The old token is gone: as for a rotation, under the user it belonged to (if any).
    PERFORM keel._session_revoked(sid, coalesce(before, session_login.user_id), 'rotated');
    PERFORM keel._session_event('keel.session_login',
        jsonb_build_object('session_id', sid, 'user_id', session_login.user_id,
                           'previous_user_id', before),
        session_login.user_id);
    RETURN new_token;
END
$$;

-- Revocation ends the session now: expires_at moves to now() too, so the cleanup's expiry
-- index finds it. True when a valid session was revoked.
CREATE OR REPLACE FUNCTION keel.session_revoke(token text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    hash bytea := keel._session_hash(session_revoke.token);
    sid uuid;
    uid text;
BEGIN
    -- The current token, or one rotated away inside its grace (a logout sent with it).
    UPDATE keel.sessions s
       SET revoked_at = now(), revoke_reason = 'revoked', expires_at = least(s.expires_at, now())
     WHERE (s.token_hash = hash OR (s.previous_hash = hash AND s.previous_until > now()))
       AND s.revoked_at IS NULL AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
    RETURNING s.session_id, s.user_id INTO sid, uid;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM keel._session_revoked(sid, uid, 'revoked');
    RETURN true;
END
$$;

-- "Log out everywhere" (or everywhere else, with except_session). Returns how many
-- sessions it revoked.
CREATE OR REPLACE FUNCTION keel.session_revoke_user(user_id text, except_session uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    sid uuid;
    revoked integer := 0;
BEGIN
    IF session_revoke_user.user_id IS NULL OR session_revoke_user.user_id = ''
       OR length(session_revoke_user.user_id) > 1024 THEN
        PERFORM keel._invalid_argument('user_id', 'must be 1 to 1024 characters');
    END IF;
    -- After a capped login in progress, not beside it (its evictions lock the same rows),
    -- even the user's first: the user's lock, taken as those logins take it.
    PERFORM keel._lock_session_user(session_revoke_user.user_id, now());
    FOR sid IN
        UPDATE keel.sessions s
           SET revoked_at = now(), revoke_reason = 'revoked_user',
               expires_at = least(s.expires_at, now())
         WHERE s.user_id = session_revoke_user.user_id AND s.revoked_at IS NULL
           AND s.expires_at > now()
           AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
           AND s.session_id IS DISTINCT FROM session_revoke_user.except_session
        RETURNING s.session_id
    LOOP
        revoked := revoked + 1;
        PERFORM keel._session_revoked(sid, session_revoke_user.user_id, 'revoked_user');
    END LOOP;
    RETURN revoked;
END
$$;

-- Sessions (issue 18): one-time tokens for email verification, password reset and magic
-- links (keel.tokens, token_create, token_consume, token_revoke); the session cleanup also
-- deletes expired tokens.
-- One-time tokens (0.2.0): email verification, password reset, magic links. Made like session
-- tokens (32 random bytes, base64url) and stored only as their SHA-256, with the purpose they
-- were made for; keel.token_consume deletes the row it returns, so a token is consumed once
-- whatever the concurrency (the row lock queues the others, which then find no row).
CREATE TABLE keel.tokens (
    token_hash  bytea       PRIMARY KEY,
    purpose     text        NOT NULL,
    subject     text        NOT NULL,
    data        jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CONSTRAINT tokens_token_hash_sha256 CHECK (octet_length(token_hash) = 32)
);
-- Cleanup by expiry; token_revoke by purpose and subject.
CREATE INDEX tokens_expires_idx ON keel.tokens (expires_at);
CREATE INDEX tokens_subject_idx ON keel.tokens (purpose, subject);

SELECT pg_catalog.pg_extension_config_dump('keel.tokens', '');

CREATE FUNCTION keel._check_token_purpose(purpose text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF purpose IS NULL OR purpose !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
        PERFORM keel._invalid_argument('purpose',
            '1 to 63 characters: lower-case letters, digits, ''_'', ''.'' and ''-'', starting with a letter or digit');
    END IF;
END
$$;

CREATE FUNCTION keel.token_create(purpose text, subject text, ttl interval, data jsonb DEFAULT '{}')
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_token text;
BEGIN
    PERFORM keel._check_token_purpose(token_create.purpose);
    IF token_create.subject IS NULL OR token_create.subject = ''
       OR length(token_create.subject) > 1024 THEN
        PERFORM keel._invalid_argument('subject', 'must be 1 to 1024 characters');
    END IF;
    PERFORM keel._check_interval('ttl', token_create.ttl);
    IF token_create.ttl IS NULL OR token_create.ttl <= interval '0' THEN
        PERFORM keel._invalid_argument('ttl', 'must be a positive interval');
    END IF;
    PERFORM keel._check_session_data(token_create.data);
    new_token := keel._session_token();
    INSERT INTO keel.tokens (token_hash, purpose, subject, data, expires_at)
    VALUES (keel._session_hash(new_token), token_create.purpose, token_create.subject,
            token_create.data, now() + token_create.ttl);
    RETURN new_token;
END
$$;

-- The token's subject and data, once: the row is deleted as it is returned. No row when the
-- token is unknown, malformed, already consumed, expired or made for another purpose (which
-- it then stays valid for).
CREATE FUNCTION keel.token_consume(purpose text, token text)
RETURNS TABLE (subject text, data jsonb)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    hash bytea;
BEGIN
    PERFORM keel._check_token_purpose(token_consume.purpose);
    IF token_consume.token IS NULL THEN
        PERFORM keel._invalid_argument('token', 'must not be NULL');
    END IF;
    hash := keel._token_hash(token_consume.token);
    IF hash IS NULL THEN
        RETURN;  -- malformed: no such token
    END IF;
    RETURN QUERY
    DELETE FROM keel.tokens t
     WHERE t.token_hash = hash AND t.purpose = token_consume.purpose AND t.expires_at > now()
    RETURNING t.subject, t.data;
END
$$;

-- Withdraws every outstanding token of a purpose for a subject (a password changed: the
-- reset links already sent stop working). Returns how many.
CREATE FUNCTION keel.token_revoke(purpose text, subject text)
RETURNS integer
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    deleted integer;
BEGIN
    PERFORM keel._check_token_purpose(token_revoke.purpose);
    IF token_revoke.subject IS NULL THEN
        PERFORM keel._invalid_argument('subject', 'must not be NULL');
    END IF;
    DELETE FROM keel.tokens t
     WHERE t.purpose = token_revoke.purpose AND t.subject = token_revoke.subject;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

-- As `cargo pgrx schema` writes it.
CREATE  FUNCTION keel."_token_hash"(
	"token" TEXT /* &str */
) RETURNS bytea /* Option < Vec < u8 > > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'token_hash_wrapper';

-- One batch of the cleanup: deletes sessions that ended (expired, revoked, or idle-expired)
-- more than keel.session_cleanup_grace ago, looking at most at max_rows sessions, skipping
-- rows anyone holds. Expired and revoked ones come from the expiry index; idle-expired ones
-- from the idle-check index: a session found there idle-expired is deleted, one touched since
-- has its check moved to its current idle expiry (`rechecked`). Both indexes are read in
-- order, so a batch costs its rows, whatever the size of the table. Rotations whose grace has
-- ended are cleared first (counted in `rechecked`), then the lock rows of capped users whose
-- capped sessions have all ended (`rechecked` too), and one-time tokens expired as long ago
-- fill what is left of the batch (counted in `deleted`). With keel.session_events =
-- lifecycle, each deleted session that ended on its own emits keel.session_expired.
CREATE OR REPLACE FUNCTION keel._cleanup_sessions(max_rows integer, OUT deleted bigint, OUT rechecked bigint)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    horizon timestamptz := clock_timestamp() - keel._session_cleanup_grace();
    lifecycle boolean := keel._session_lifecycle();
    idle bigint;
    tokens bigint;
    cleared bigint;
    users bigint;
    ended jsonb[];
    idled jsonb[];
    ev jsonb;
BEGIN
    IF _cleanup_sessions.max_rows IS NULL OR _cleanup_sessions.max_rows < 1 THEN
        PERFORM keel._invalid_argument('max_rows', 'must be at least 1');
    END IF;
    -- Rotations whose grace has ended, first (cheap, and they must not wait behind churn):
    -- the old token's hash and the sealed new token go, so an old token and a copy of the
    -- table no longer give the current token.
    UPDATE keel.sessions s
       SET previous_hash = NULL, previous_until = NULL, rotated_to = NULL
     WHERE s.session_id IN (
        SELECT x.session_id FROM keel.sessions x
         WHERE x.previous_hash IS NOT NULL AND x.previous_until <= clock_timestamp()
         LIMIT _cleanup_sessions.max_rows
           FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS cleared = ROW_COUNT;
    rechecked := 0;
    -- With lifecycle events, the sessions that ended on their own (not revoked: those had
    -- their event at the revocation) are collected for keel.session_expired.
    WITH gone AS (
        DELETE FROM keel.sessions s
         WHERE s.session_id IN (
            SELECT x.session_id FROM keel.sessions x
             WHERE x.expires_at < horizon
             ORDER BY x.expires_at
             LIMIT _cleanup_sessions.max_rows
               FOR UPDATE SKIP LOCKED)
        RETURNING s.session_id, s.user_id, s.revoked_at, s.expires_at, s.idle_expires_at)
    SELECT count(*),
           array_agg(keel._session_expired(g.session_id, g.user_id, g.expires_at, g.idle_expires_at))
               FILTER (WHERE lifecycle AND g.revoked_at IS NULL)
      INTO deleted, ended FROM gone g;
    IF deleted < _cleanup_sessions.max_rows THEN
        WITH due AS (
            SELECT x.session_id FROM keel.sessions x
             WHERE x.idle_check_at < horizon
             ORDER BY x.idle_check_at
             LIMIT _cleanup_sessions.max_rows - deleted
               FOR UPDATE SKIP LOCKED),
        gone AS (
            DELETE FROM keel.sessions s USING due
             WHERE s.session_id = due.session_id
               AND (s.idle_expires_at < horizon OR s.expires_at < horizon)
            RETURNING s.session_id, s.user_id, s.revoked_at, s.expires_at, s.idle_expires_at),
        moved AS (
            UPDATE keel.sessions s SET idle_check_at = s.idle_expires_at
              FROM due
             WHERE s.session_id = due.session_id
               AND NOT (coalesce(s.idle_expires_at < horizon, false) OR s.expires_at < horizon)
            RETURNING 1)
        SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM moved),
               (SELECT array_agg(keel._session_expired(g.session_id, g.user_id, g.expires_at,
                                                       g.idle_expires_at))
                  FROM gone g WHERE lifecycle AND g.revoked_at IS NULL)
          INTO idle, rechecked, idled;
        deleted := deleted + idle;
    END IF;
    -- One event per session, and the last: no per-user order (and lock) to keep.
    FOREACH ev IN ARRAY coalesce(ended, '{}') || coalesce(idled, '{}') LOOP
        PERFORM keel.emit('keel.session_expired', ev);
    END LOOP;
    rechecked := rechecked + cleared;
    -- The lock rows of capped users whose capped sessions have all ended (counted with the
    -- rechecked: the batch's work, not sessions).
    IF deleted + rechecked < _cleanup_sessions.max_rows THEN
        DELETE FROM keel.session_users u
         WHERE u.user_id IN (
            SELECT x.user_id FROM keel.session_users x
             WHERE x.until < horizon
             ORDER BY x.until
             LIMIT _cleanup_sessions.max_rows - deleted - rechecked
               FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS users = ROW_COUNT;
        rechecked := rechecked + users;
    END IF;
    -- One-time tokens expired as long ago, in the same batch.
    IF deleted + rechecked < _cleanup_sessions.max_rows THEN
        DELETE FROM keel.tokens t
         WHERE t.token_hash IN (
            SELECT x.token_hash FROM keel.tokens x
             WHERE x.expires_at < horizon
             ORDER BY x.expires_at
             LIMIT _cleanup_sessions.max_rows - deleted - rechecked
               FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS tokens = ROW_COUNT;
        deleted := deleted + tokens;
    END IF;
END
$$;

DO $$
DECLARE
    owner regrole := (SELECT relowner::regrole FROM pg_catalog.pg_class
                       WHERE oid = 'keel.jobs'::pg_catalog.regclass);
    f regprocedure;
    r regrole;
BEGIN
    EXECUTE format('ALTER TABLE keel.tokens OWNER TO %s', owner);
    REVOKE ALL ON keel.tokens FROM PUBLIC;
    EXECUTE format('ALTER TABLE keel.session_users OWNER TO %s', owner);
    REVOKE ALL ON keel.session_users FROM PUBLIC;
    FOREACH f IN ARRAY ARRAY[
        'keel._check_token_purpose(text)',
        'keel.token_create(text, text, interval, jsonb)',
        'keel.token_consume(text, text)',
        'keel.token_revoke(text, text)',
        'keel._token_hash(text)',
        'keel.session_rotate(text, interval)',
        'keel._session_seal(text, text)',
        'keel._session_unseal(text, bytea)',
        'keel.session_login(text, text, integer)',
        'keel.session_create(text, interval, interval, jsonb, integer)',
        'keel._session_lifecycle()',
        'keel._session_event(text, jsonb, text)',
        'keel._session_expired(uuid, text, timestamptz, timestamptz)',
        'keel._session_evict(text, integer, timestamptz, uuid)',
        'keel._check_max_per_user(text, integer)',
        'keel._invalid_argument(text, text)',
        'keel._lock_session_user(text, timestamptz)'
    ]::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, owner);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    -- The roles that could rotate rotate and log in; those that serve logins (granted
    -- session_create) make and consume tokens too.
    FOR r IN
        SELECT x::oid::regrole
          FROM unnest(string_to_array(current_setting('pg_keel_update.rotate_grantees'), ',')) x
         WHERE x <> ''
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.session_rotate(text, interval), '
                       'keel.session_login(text, text, integer) TO %s', r);
    END LOOP;
    -- Who could create sessions creates them (now with max_per_user).
    FOR r IN
        SELECT x::oid::regrole
          FROM unnest(string_to_array(current_setting('pg_keel_update.create_grantees'), ',')) x
         WHERE x <> ''
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION '
                       'keel.session_create(text, interval, interval, jsonb, integer) TO %s', r);
    END LOOP;
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel.session_create(text, interval, interval, jsonb, integer)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
         ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.token_create(text, text, interval, jsonb), '
                       'keel.token_consume(text, text), keel.token_revoke(text, text) TO %s', r);
    END LOOP;
END
$$;
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = ARRAY[pg_catalog.makeaclitem(p.proowner, p.proowner, 'EXECUTE', false)]
  FROM pg_catalog.pg_proc p
 WHERE i.classoid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND i.objoid = p.oid
   AND i.objsubid = 0
   AND p.oid = ANY (ARRAY[
        'keel._check_token_purpose(text)',
        'keel.token_create(text, text, interval, jsonb)',
        'keel.token_consume(text, text)',
        'keel.token_revoke(text, text)',
        'keel._token_hash(text)',
        'keel.session_rotate(text, interval)',
        'keel._session_seal(text, text)',
        'keel._session_unseal(text, bytea)',
        'keel.session_login(text, text, integer)',
        'keel.session_create(text, interval, interval, jsonb, integer)',
        'keel._session_lifecycle()',
        'keel._session_event(text, jsonb, text)',
        'keel._session_expired(uuid, text, timestamptz, timestamptz)',
        'keel._session_evict(text, integer, timestamptz, uuid)',
        'keel._check_max_per_user(text, integer)',
        'keel._invalid_argument(text, text)',
        'keel._lock_session_user(text, timestamptz)'
    ]::pg_catalog.regprocedure[]);

-- Errors per capability (issue 19, item 3): a bad argument of any function is raised by
-- keel._invalid_argument, no longer by the queue capability's keel._queue_error; the 0.1.0
-- functions that raised theirs through it are replaced with that one change.
CREATE OR REPLACE FUNCTION keel.cleanup_outbox(max_rows integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    deleted bigint;
BEGIN
    IF cleanup_outbox.max_rows IS NULL OR cleanup_outbox.max_rows < 1 THEN
        PERFORM keel._invalid_argument('max_rows', 'must be at least 1');
    END IF;
    DELETE FROM keel.outbox_events o
     WHERE o.id IN (
        SELECT e.id FROM keel.outbox_events e
         WHERE e.created_at < clock_timestamp() - keel._outbox_retention()
           AND NOT EXISTS (SELECT 1 FROM keel.outbox_pending p WHERE p.id = e.id)
           AND NOT EXISTS (SELECT 1 FROM keel.outbox_dead d WHERE d.id = e.id)
         ORDER BY e.created_at
         LIMIT cleanup_outbox.max_rows
           FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

CREATE OR REPLACE FUNCTION keel.set_task(name text, every interval DEFAULT NULL, enabled boolean DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM keel._check_interval('every', set_task.every);
    IF set_task.every < interval '1 second' THEN
        PERFORM keel._invalid_argument('every', 'must be at least 1 second');
    END IF;
    UPDATE keel.tasks
       SET every = coalesce(set_task.every, every),
           enabled = coalesce(set_task.enabled, enabled)
     WHERE name = set_task.name;
    IF NOT FOUND THEN
        PERFORM keel._maintenance_error('unknown_task', set_task.name);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION keel._emit(
    ticket bigint,
    topic text,
    payload jsonb,
    aggregate_id text DEFAULT NULL,
    version bigint DEFAULT NULL,
    headers jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    event_id bigint;
    woken boolean;
BEGIN
    PERFORM keel._redeem(ticket, 'emit', _emit.topic);
    PERFORM keel._check_name('topic', _emit.topic);
    IF _emit.payload IS NULL THEN
        PERFORM keel._invalid_argument('payload', 'must not be NULL (use ''{}''::jsonb or ''null''::jsonb)');
    END IF;
    IF _emit.version IS NOT NULL AND _emit.aggregate_id IS NULL THEN
        PERFORM keel._invalid_argument('version', 'needs an aggregate_id');
    END IF;
    -- Everything an event stores counts against keel.max_payload_bytes: payload, headers and
    -- aggregate_id together (a dispatch batch is bounded by it times the batch size).
    PERFORM keel._check_payload(keel._raw_bytes(_emit.payload) + coalesce(keel._raw_bytes(_emit.headers), 0)
                                + coalesce(octet_length(_emit.aggregate_id), 0));
    IF _emit.aggregate_id IS NOT NULL THEN
        -- Emits for one aggregate commit one after the other, so their ids follow their
        -- commit order and the dispatcher delivers them in order.
        PERFORM keel._lock_aggregate(_emit.topic, _emit.aggregate_id);
    END IF;
    IF _emit.aggregate_id IS NOT NULL AND _emit.version IS NOT NULL THEN
        INSERT INTO keel.outbox_events (topic, aggregate_id, version, payload, headers)
        VALUES (_emit.topic, _emit.aggregate_id, _emit.version, _emit.payload, _emit.headers)
        ON CONFLICT (topic, aggregate_id, version) WHERE aggregate_id IS NOT NULL AND version IS NOT NULL
        DO NOTHING
        RETURNING outbox_events.id INTO event_id;
        IF event_id IS NULL THEN
            SELECT o.id INTO event_id FROM keel.outbox_events o
             WHERE o.topic = _emit.topic AND o.aggregate_id = _emit.aggregate_id AND o.version = _emit.version;
            RETURN event_id;
        END IF;
    ELSE
        INSERT INTO keel.outbox_events (topic, aggregate_id, version, payload, headers)
        VALUES (_emit.topic, _emit.aggregate_id, _emit.version, _emit.payload, _emit.headers)
        RETURNING outbox_events.id INTO event_id;
    END IF;
    INSERT INTO keel.outbox_pending (id) VALUES (event_id);
    woken := keel._wake_dispatcher_on_commit();
    RETURN event_id;
END
$$;

CREATE OR REPLACE FUNCTION keel.create_route(
    topic text,
    target text DEFAULT 'stream',
    redis_key text DEFAULT NULL,
    maxlen bigint DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM keel._check_name('topic', create_route.topic);
    IF create_route.target IS NULL OR create_route.target NOT IN ('stream', 'list', 'pubsub') THEN
        PERFORM keel._invalid_argument('target', 'must be ''stream'', ''list'' or ''pubsub''');
    END IF;
    IF create_route.redis_key LIKE 'keel#%' THEN
        PERFORM keel._invalid_argument('redis_key', 'must not start with keel# (pg_keel''s own keys)');
    END IF;
    IF create_route.redis_key = '' OR length(create_route.redis_key) > 512 THEN
        PERFORM keel._invalid_argument('redis_key', 'must be 1 to 512 characters (or NULL for <keel.redis_prefix><topic>)');
    END IF;
    IF create_route.maxlen < 1 THEN
        PERFORM keel._invalid_argument('maxlen', 'must be at least 1 (or NULL for no trimming)');
    END IF;
    IF create_route.maxlen IS NOT NULL AND create_route.target <> 'stream' THEN
        PERFORM keel._invalid_argument('maxlen', 'applies to streams only');
    END IF;
    INSERT INTO keel.outbox_routes (topic, target, redis_key, maxlen)
    VALUES (create_route.topic, create_route.target,
            create_route.redis_key, create_route.maxlen)
    ON CONFLICT (topic) DO UPDATE
       SET target = excluded.target, redis_key = excluded.redis_key, maxlen = excluded.maxlen;
END
$$;

CREATE OR REPLACE FUNCTION keel.outbox_replay(topic text, from_id bigint, to_id bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    requeued bigint;
    woken boolean;
BEGIN
    PERFORM keel._check_name('topic', outbox_replay.topic);
    IF outbox_replay.from_id IS NULL THEN
        PERFORM keel._invalid_argument('from_id', 'must not be NULL');
    END IF;
    IF outbox_replay.to_id < outbox_replay.from_id THEN
        PERFORM keel._invalid_argument('to_id', 'must not be below from_id');
    END IF;
    -- Events still pending are left alone (they are on their way). The replays bump gives
    -- each replayed event a new Redis dedupe key; the row lock it takes keeps cleanup away.
    WITH again AS (
        UPDATE keel.outbox_events e
           SET replays = e.replays + 1
         WHERE e.topic = outbox_replay.topic
           AND e.id >= outbox_replay.from_id
           AND (outbox_replay.to_id IS NULL OR e.id <= outbox_replay.to_id)
           AND NOT EXISTS (SELECT 1 FROM keel.outbox_pending p WHERE p.id = e.id)
        RETURNING e.id
    ), revived AS (
        DELETE FROM keel.outbox_dead d USING again a WHERE d.id = a.id
    )
    INSERT INTO keel.outbox_pending (id)
    SELECT a.id FROM again a
    ON CONFLICT (id) DO NOTHING;
    GET DIAGNOSTICS requeued = ROW_COUNT;
    IF requeued > 0 THEN
        woken := keel._wake_dispatcher_on_commit();
    END IF;
    RETURN requeued;
END
$$;

CREATE OR REPLACE FUNCTION keel._grant(role regrole, functions regprocedure[], relations regclass[])
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

CREATE OR REPLACE FUNCTION keel._grant_scope(role regrole, capability text, names text[])
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

CREATE OR REPLACE FUNCTION keel.revoke_all(role regrole)
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

CREATE OR REPLACE FUNCTION keel._check_session_data(data jsonb)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF data IS NULL OR jsonb_typeof(data) <> 'object' THEN
        PERFORM keel._invalid_argument('data', 'must be a JSON object (e.g. ''{}'')');
    END IF;
    PERFORM keel._check_payload(keel._raw_bytes(data));
END
$$;

CREATE OR REPLACE FUNCTION keel.session_set_data(token text, data jsonb, merge boolean DEFAULT true)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    hash bytea := keel._session_hash(session_set_data.token);
    merged jsonb;
BEGIN
    PERFORM keel._check_session_data(session_set_data.data);
    IF session_set_data.merge IS NULL THEN
        PERFORM keel._invalid_argument('merge', 'must not be NULL');
    END IF;
    UPDATE keel.sessions s
       SET data = CASE WHEN session_set_data.merge THEN s.data || session_set_data.data
                       ELSE session_set_data.data END
     WHERE s.token_hash = hash AND s.revoked_at IS NULL AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
    RETURNING s.data INTO merged;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM keel._check_payload(keel._raw_bytes(merged));
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION keel.session_revoke_id(session_id uuid)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    uid text;
BEGIN
    IF session_revoke_id.session_id IS NULL THEN
        PERFORM keel._invalid_argument('session_id', 'must not be NULL');
    END IF;
    UPDATE keel.sessions s
       SET revoked_at = now(), revoke_reason = 'revoked', expires_at = least(s.expires_at, now())
     WHERE s.session_id = session_revoke_id.session_id AND s.revoked_at IS NULL
       AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
    RETURNING s.user_id INTO uid;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM keel._session_revoked(session_revoke_id.session_id, uid, 'revoked');
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION keel.user_sessions(user_id text)
RETURNS TABLE (session_id uuid, created_at timestamptz, last_seen_at timestamptz,
               expires_at timestamptz, idle_expires_at timestamptz, data jsonb)
LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF user_sessions.user_id IS NULL OR user_sessions.user_id = '' THEN
        PERFORM keel._invalid_argument('user_id', 'must be 1 to 1024 characters');
    END IF;
    RETURN QUERY
    SELECT s.session_id, s.created_at, s.last_seen_at, s.expires_at, s.idle_expires_at, s.data
      FROM keel.sessions s
     WHERE s.user_id = user_sessions.user_id AND s.revoked_at IS NULL AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
     ORDER BY s.last_seen_at DESC, s.session_id;
END
$$;

-- The grant helpers name the functions above by signature (checked when they are created),
-- so they are replaced last. Producers may cancel the jobs of the queues they produce to and
-- enqueue with on_duplicate and after; consumers ack with a result and snooze; admins create
-- and alter queues with their history settings, manage schedules and release dependents.
CREATE OR REPLACE FUNCTION keel.grant_producer(
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

CREATE OR REPLACE FUNCTION keel.grant_sessions(role regrole)
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

CREATE OR REPLACE FUNCTION keel.grant_admin(role regrole)
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

CREATE OR REPLACE FUNCTION keel.grant_consumer(role regrole, queues text[] DEFAULT NULL)
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

-- Comments on every public object (issue 16): the same text as sql/comments.sql.

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
COMMENT ON TABLE keel.rate_limit_denials IS 'Denied calls of policies with log_denials (policy, key, at, cost, retry_after_ms), and with shadow true the calls a policy in shadow mode (enforce false) allowed but would have denied; kept for keel.rate_denial_retention.';
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
COMMENT ON TABLE keel.rate_limit_slots IS 'The slots held of concurrency limits (algorithm concurrency), one row per keel.acquire that was allowed (token, acquired_at, expires_at) until keel.release deletes it or it expires; expired slots are free and deleted by the next acquire of their key or by cleanup_rate_limits.';
COMMENT ON FUNCTION keel.acquire(text, text, interval) IS 'Takes a slot of key under the named concurrency limit (algorithm concurrency: at most max held at once) for ttl (NULL: the policy''s per): allowed with a token to release, or not with retry_after_ms until the soonest slot expires. Exact under concurrency; a slot not released frees itself when its ttl passes.';
COMMENT ON FUNCTION keel.release(text, text, uuid) IS 'Gives back the slot token holds of key under the named concurrency limit; true when it held one that had not expired.';
COMMENT ON FUNCTION keel.check_many(text[], text[], integer[]) IS 'One decision under several policies, all or nothing: each (names[i], keys[i]) is decided at costs[i] (NULL: 1 each), and only when every enforcing policy allows is each charged; otherwise nothing is and the denying rows say so. One row per pair, in order; concurrent calls naming the policies in any order never deadlock. Arrays of different lengths, more than 32 pairs or a pair twice: 22023.';
COMMENT ON FUNCTION keel.rate_limit_headers(text[], integer[], bigint[], bigint[]) IS 'The RateLimit-Policy, RateLimit and Retry-After values of one keel.check_many: a Structured Field list item per policy, in order, and the longest retry in whole seconds (rounded up, NULL when every policy allowed). Arrays of one length, 1 to 32: else 22023.';
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

-- Maintenance and monitoring

COMMENT ON FUNCTION keel.set_task(text, interval, boolean) IS 'Changes a maintenance task in keel.tasks: how often it runs (every, at least 1 second, else 22023) and whether it is enabled; NULL keeps a setting. Unknown task: 42704.';
COMMENT ON FUNCTION keel.health() IS 'Runs pg_keel''s incident checks in this database (worker, queues, outbox, Redis, xmin horizon, idle transactions, lock waits, dead tuples, tasks, denials): one row per check with status ok, warn or critical, detail, advice, value and threshold. Changes nothing; it reads keel.jobs, so call it every few seconds, not per request.';
COMMENT ON FUNCTION keel.metrics() IS 'The figures of keel.health() and pg_keel''s queue, outbox, table, task and rate-limit counters as one text in Prometheus'' text exposition format, every sample labelled with the database.';

-- Privileges

COMMENT ON FUNCTION keel.grant_producer(regrole, text[], text[], text[]) IS 'Lets role enqueue, enqueue_batch, cancel and cancel_queue on queues, emit on topics, and check, check_many, acquire, release, rate_peek, rate_refund and rate_limit_headers on the policies limits; NULL means every one (also later ones, but not pg_keel''s own keel.* topics), an empty array none. Grants add up; an unknown role is 42704.';
COMMENT ON FUNCTION keel.grant_consumer(regrole, text[]) IS 'Lets role claim from queues (NULL: every one) and ack, ack_batch, fail, extend, snooze and progress the leases it claimed.';
COMMENT ON FUNCTION keel.grant_sessions(regrole) IS 'Lets role use the sessions API (session_create, session_validate, session_set_data, session_rotate, session_login, the revocations and user_sessions) on every user''s sessions, and the one-time tokens (token_create, token_consume, token_revoke).';
COMMENT ON TABLE keel.tokens IS 'One row per outstanding one-time token (keel.token_create): only its SHA-256 (token_hash), the purpose it was made for, its subject and data, and its expiry. keel.token_consume deletes the row; expired ones are deleted keel.session_cleanup_grace after they expire.';
COMMENT ON TABLE keel.session_users IS 'One row per user whose sessions are capped (max_per_user of session_create or session_login): its row lock queues that user''s capped logins so the cap is exact. until is at least the latest expiry of a session created under a cap (rewritten only when a new one would outlive it); the cleanup deletes the row after it.';
COMMENT ON FUNCTION keel.cleanup_sessions(integer) IS 'Deletes one batch of at most max_rows sessions that ended (expired, revoked or idle-expired) and one-time tokens that expired more than keel.session_cleanup_grace ago, and returns how many. The worker runs it every minute.';
COMMENT ON FUNCTION keel.token_create(text, text, interval, jsonb) IS 'Makes a one-time token for purpose (e.g. ''password_reset'') and subject (e.g. a user id) that expires ttl from now, carrying data (a JSON object); returns the token (give it once: only its SHA-256 is stored).';
COMMENT ON FUNCTION keel.token_consume(text, text) IS 'Returns the subject and data of a one-time token made for purpose and deletes it, so exactly one caller ever gets them; no row when the token is unknown, malformed, consumed, expired or made for another purpose. NULL token: 22023.';
COMMENT ON FUNCTION keel.token_revoke(text, text) IS 'Deletes every outstanding one-time token of purpose for subject (a password changed: the reset links already sent stop working) and returns how many.';
COMMENT ON FUNCTION keel.grant_monitor(regrole) IS 'Lets role call keel.health() and keel.metrics(), for a monitoring role or exporter.';
COMMENT ON FUNCTION keel.grant_admin(regrole) IS 'Gives role everything: the producer, consumer, sessions and monitor grants for every name, the management functions (queues, routes, replay, limits, schedules, tasks, cleanups, worker_status) and SELECT on the views, keel.grants, keel.tasks, keel.task_runs, keel.rate_limits and keel.rate_limit_denials.';
COMMENT ON FUNCTION keel.revoke_all(regrole) IS 'Takes back everything the grant helpers gave role: its rows in keel.grants, EXECUTE on every keel function, SELECT on every keel table and view, and USAGE on the schema. Run it before DROP ROLE.';

-- Backends that remember which queues keep finished jobs, or which exist, look again.
SELECT keel._queues_changed();
