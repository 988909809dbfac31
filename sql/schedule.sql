-- pg_keel schedules: periodic jobs. A schedule enqueues one job into its queue for each of
-- its slots (the times its cron expression or `@every` period names, in its time zone); the
-- background worker calls keel.run_schedules every second. Each slot's job is enqueued in the
-- same transaction that advances the schedule, with the idempotency key
-- 'schedule:<name>:<slot as UTC, 2026-12-07T15:30:00Z>', so a slot is enqueued once whatever
-- kills the worker or the server in between. Expressions and time zones are Rust
-- (src/schedule/).

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
