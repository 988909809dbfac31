-- pg_keel scheduled maintenance (DESIGN.md §5): built-in tasks, each a plain function that can
-- be called by hand and works in bounded batches; the background worker runs them on the
-- schedule in keel.tasks. keel.tasks has the last run of each task; keel.task_runs the runs of
-- the last keel.task_run_retention (the worker deletes older ones as it records new ones, so
-- the history never grows without bound).

CREATE TABLE keel.tasks (
    name           text        PRIMARY KEY,
    every          interval    NOT NULL,
    enabled        boolean     NOT NULL DEFAULT true,
    last_run_at    timestamptz,
    last_duration  interval,
    last_rows      bigint,
    last_error     text,
    CONSTRAINT tasks_every_valid CHECK (every >= interval '1 second')
);

-- Every run of a task by the worker, kept for keel.task_run_retention.
CREATE TABLE keel.task_runs (
    task        text        NOT NULL,
    started_at  timestamptz NOT NULL,
    duration    interval    NOT NULL,
    rows        bigint      NOT NULL,
    error       text
);
CREATE INDEX task_runs_task_started_idx ON keel.task_runs (task, started_at);
CREATE INDEX task_runs_started_idx ON keel.task_runs (started_at);

INSERT INTO keel.tasks (name, every) VALUES
    ('reap_expired',      '5 seconds'),
    ('cleanup_done_jobs', '1 minute'),
    ('cleanup_outbox',    '1 minute'),
    ('cleanup_rate_limits', '1 minute'),
    ('cleanup_sessions',  '1 minute');

-- Not registered with pg_extension_config_dump: CREATE EXTENSION inserts the built-in rows,
-- so a dump of them would collide on restore. After pg_dump/pg_restore the schedules are the
-- defaults again (re-apply keel.set_task calls).

-- Done jobs whose idempotency key is past its dedupe window (counted from the enqueue) or that
-- have none, and cancelled jobs past their dedupe window, once their queue's keep_finished
-- has passed since they finished: at most max_rows per call.
CREATE FUNCTION keel.cleanup_done_jobs(max_rows integer DEFAULT 1000)
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

-- Dispatched outbox events written more than keel.outbox_retention ago: at most max_rows per
-- call. Pending and dead events stay (dead ones visible and replayable) whatever their age.
CREATE FUNCTION keel.cleanup_outbox(max_rows integer DEFAULT 1000)
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

-- One bounded batch of a built-in task, for the worker: never raises; an error comes back as
-- text (the batch's work is rolled back). `rows` is what the task reports (rows deleted or
-- reaped); `more` says the batch was full, so another may have work. Task names map to fixed
-- calls: no dynamic SQL.
CREATE FUNCTION keel._run_task_batch(name text, max_rows integer,
                                     OUT rows bigint, OUT error text, OUT more boolean)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rechecked bigint := 0;
BEGIN
    rows := 0;
    CASE name
        WHEN 'reap_expired'      THEN rows := keel.reap_expired(max_rows);
        WHEN 'cleanup_done_jobs' THEN rows := keel.cleanup_done_jobs(max_rows);
        WHEN 'cleanup_outbox'    THEN rows := keel.cleanup_outbox(max_rows);
        WHEN 'cleanup_rate_limits' THEN rows := keel.cleanup_rate_limits(max_rows);
        WHEN 'cleanup_sessions'  THEN
            SELECT c.deleted, c.rechecked INTO rows, rechecked
              FROM keel._cleanup_sessions(max_rows) c;
        ELSE error := format('unknown task %L', name);
    END CASE;
    more := error IS NULL AND rows + rechecked >= max_rows;
EXCEPTION WHEN OTHERS THEN
    rows := 0;
    error := SQLERRM;
    more := false;
END
$$;

CREATE FUNCTION keel.set_task(name text, every interval DEFAULT NULL, enabled boolean DEFAULT NULL)
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
