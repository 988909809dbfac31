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
        PERFORM keel._queue_error('invalid_argument', 'role', 'must not be NULL');
    END IF;
    FOREACH n IN ARRAY coalesce(names, ARRAY['*']) LOOP
        IF n IS NULL THEN
            PERFORM keel._queue_error('invalid_argument', capability, 'names must not be NULL (leave the whole argument NULL for every one)');
        ELSIF n = '*' THEN
            NULL;
        ELSIF capability IN ('produce', 'consume') THEN
            PERFORM keel._check_name('queue', n);
        ELSIF capability = 'emit' THEN
            PERFORM keel._check_name('topic', n);
        ELSIF n = '' OR octet_length(n) > 1024 THEN
            PERFORM keel._queue_error('invalid_argument', 'limits', 'names are 1 to 1024 bytes');
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
        'keel.enqueue(text, jsonb, interval, integer, text, integer, text, bigint[])',
        'keel.enqueue_batch(text, jsonb[], interval, integer)',
        'keel.emit(text, jsonb, text, bigint, jsonb)',
        'keel.rate_limit(text, integer, interval, integer, text, integer)',
        'keel.check(text, text, integer)',
        'keel.rate_peek(text, text)',
        'keel.rate_refund(text, text, integer)',
        'keel.cancel(bigint, text)',
        'keel.cancel_queue(text, text)',
        -- What the SQL wrappers call, as the caller (see src/auth.rs).
        'keel._authorize(text, text)',
        'keel._emit(bigint, text, jsonb, text, bigint, jsonb)',
        'keel._cancel(bigint, bigint, text)',
        'keel._cancel_queue(bigint, text, text)'
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

-- Takes back everything the grant helpers gave `role`: its rows in keel.grants, EXECUTE on
-- every keel function, SELECT on every keel table and view, USAGE on the schema.
CREATE FUNCTION keel.revoke_all(role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF role IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'role', 'must not be NULL');
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
        'keel.create_queue(text, interval, integer, interval, interval, bigint, interval, interval, text)',
        'keel.alter_queue(text, interval, integer, interval, interval, bigint, interval, boolean, interval, text, boolean)',
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

-- Last: once this CREATE EXTENSION commits, the pg_keel launcher starts this database's worker
-- (a no-op without shared_preload_libraries).
SELECT keel._wake_launcher_on_commit();
-- Backends that remember the queues of a pg_keel dropped before look again (src/queue/enqueue.rs).
SELECT keel._queues_changed();
