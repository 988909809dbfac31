-- pg_keel privileges: nothing is granted to PUBLIC; roles get what they need through
-- keel.grant_producer / grant_consumer / grant_admin. Runs last in CREATE EXTENSION.

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
        PERFORM keel._queue_error('invalid_argument', 'role', 'must not be NULL');
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

CREATE FUNCTION keel.grant_producer(role regrole)
RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT keel._grant(role, ARRAY[
        'keel.enqueue(text, jsonb, interval, integer, text, integer)',
        'keel.enqueue_batch(text, jsonb[], interval, integer)',
        'keel.emit(text, jsonb, text, bigint, jsonb)',
        'keel.rate_limit(text, integer, interval, integer, text, integer)',
        'keel.check(text, text, integer)',
        'keel.rate_peek(text, text)',
        'keel.rate_refund(text, text, integer)',
        'keel.session_create(text, interval, interval, jsonb)',
        'keel.session_validate(text)',
        'keel.session_set_data(text, jsonb, boolean)',
        'keel.session_rotate(text)',
        'keel.session_revoke(text)',
        'keel.session_revoke_id(uuid)',
        'keel.session_revoke_user(text, uuid)',
        'keel.user_sessions(text)'
    ]::regprocedure[], NULL)
$$;

CREATE FUNCTION keel.grant_consumer(role regrole)
RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT keel._grant(role, ARRAY[
        'keel.claim(text, integer, interval, text)',
        'keel.ack(bigint, integer)',
        'keel.fail(bigint, integer, text, interval)',
        'keel.extend(bigint, integer, interval)'
    ]::regprocedure[], NULL)
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
    SELECT keel._grant(role, ARRAY[
        'keel.create_queue(text, interval, integer, interval, interval, bigint, interval)',
        'keel.alter_queue(text, interval, integer, interval, interval, bigint, interval, boolean)',
        'keel.pause_queue(text)',
        'keel.resume_queue(text)',
        'keel.drop_queue(text, boolean)',
        'keel.purge_queue(text)',
        'keel.retry_dead(text, bigint)',
        'keel.reap_expired(integer)',
        'keel._queue_counters()',
        'keel.create_route(text, text, text, bigint)',
        'keel.outbox_replay(text, bigint, bigint)',
        'keel.worker_status()',
        'keel.set_task(text, interval, boolean)',
        'keel.cleanup_done_jobs(integer)',
        'keel.cleanup_outbox(integer)',
        'keel.create_limit(text, integer, interval, text, integer, text, boolean)',
        'keel.alter_limit(text, integer, interval, text, integer, text, boolean, boolean)',
        'keel.drop_limit(text)',
        'keel.rate_reset(text, text)',
        'keel.cleanup_rate_limits(integer)',
        'keel.cleanup_sessions(integer)'
    ]::regprocedure[], ARRAY[
        'keel.queue_stats', 'keel.stuck_jobs', 'keel.attempt_histogram', 'keel.outbox_stats',
        'keel.outbox', 'keel.tasks', 'keel.task_runs', 'keel.rate_limits',
        'keel.rate_limit_denials'
    ]::regclass[])
$$;

-- Functions are executable by PUBLIC by default in PostgreSQL; not here.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA keel FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA keel FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA keel FROM PUBLIC;

-- Last: once this CREATE EXTENSION commits, the pg_keel launcher starts this database's worker
-- (a no-op without shared_preload_libraries).
SELECT keel._wake_launcher_on_commit();
