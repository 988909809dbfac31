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

-- Consumers may snooze what they may fail.
CREATE OR REPLACE FUNCTION keel.grant_consumer(role regrole, queues text[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM keel._grant(role, ARRAY[
        'keel.claim(text, integer, interval, text)',
        'keel.ack(bigint, integer)',
        'keel.ack_batch(bigint[], integer[])',
        'keel.fail(bigint, integer, text, interval)',
        'keel.extend(bigint, integer, interval)',
        'keel._authorize(text, text)',
        'keel._fail(bigint, bigint, integer, text, interval)',
        'keel.snooze(bigint, integer, interval)',
        'keel._snooze(bigint, bigint, integer, interval)'
    ]::regprocedure[], NULL);
    PERFORM keel._grant_scope(role, 'consume', queues);
END
$$;

REVOKE ALL ON FUNCTION keel._snooze(bigint, bigint, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION keel.snooze(bigint, integer, interval) FROM PUBLIC;

-- Roles granted grant_consumer at 0.1.0 get snooze as grant_consumer now gives it (the
-- catalog then equals a fresh install where the same grants were made).
DO $$
DECLARE
    r regrole;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_proc p, aclexplode(p.proacl) a
         WHERE p.oid = 'keel._fail(bigint, bigint, integer, text, interval)'::regprocedure
           AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION keel.snooze(bigint, integer, interval), '
                       'keel._snooze(bigint, bigint, integer, interval) TO %s', r);
    END LOOP;
END
$$;
