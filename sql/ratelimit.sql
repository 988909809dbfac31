-- pg_keel rate limits (DESIGN.md §3): named policies, per-key state, denial log. Decisions are
-- native functions (src/ratelimit/): keel.rate_limit, keel.check, keel.rate_peek,
-- keel.rate_refund; the pure algorithms are src/ratelimit/algo.rs.

CREATE TABLE keel.rate_limits (
    name         text        PRIMARY KEY,
    max          integer     NOT NULL,
    per          interval    NOT NULL,
    algorithm    text        NOT NULL,
    burst        integer,
    durability   text        NOT NULL,
    log_denials  boolean     NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- false: shadow mode, every decision allows; what would have been denied is logged,
    -- marked shadow, and the key's state counts as if it had been (0.2.0: last).
    enforce      boolean     NOT NULL DEFAULT true,
    CONSTRAINT rate_limits_name_valid CHECK (name ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$'),
    CONSTRAINT rate_limits_max_positive CHECK (max >= 1),
    CONSTRAINT rate_limits_per_positive CHECK (per > interval '0'),
    CONSTRAINT rate_limits_algorithm_valid
        CHECK (algorithm IN ('token_bucket', 'fixed_window', 'sliding_window', 'concurrency')),
    CONSTRAINT rate_limits_burst_positive CHECK (burst IS NULL OR burst >= 1),
    CONSTRAINT rate_limits_durability_valid CHECK (durability IN ('durable', 'async', 'memory'))
);

-- One row per (policy, key) that is not at full capacity; policy '' holds keel.rate_limit's
-- per-call keys. a, b, c are the algorithm's state (src/ratelimit/algo.rs); expires_at is when
-- the key is back to full capacity: past it, the row means nothing and the cleanup task
-- deletes it. Decisions update the row in place (src/ratelimit/heap.rs). Only the primary key
-- is indexed and it never changes, so with room left on each page every decision is a HOT
-- update. Keys are compared byte for byte (COLLATE "C"): they are identifiers, and the index
-- probe of every decision then needs no locale-aware comparison.
CREATE TABLE keel.rate_limit_state (
    policy          text COLLATE "C" NOT NULL,
    key             text COLLATE "C" NOT NULL,
    a               bigint      NOT NULL,
    b               bigint      NOT NULL,
    c               bigint      NOT NULL,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (policy, key)
) WITH (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.02);

-- Why was tenant X throttled yesterday? Denials of policies with log_denials.
CREATE TABLE keel.rate_limit_denials (
    policy          text        NOT NULL,
    key             text        NOT NULL,
    at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    cost            integer     NOT NULL,
    retry_after_ms  bigint      NOT NULL,
    -- A policy in shadow mode allowed the call this row would have denied (0.2.0).
    shadow          boolean     NOT NULL DEFAULT false
);
CREATE INDEX rate_limit_denials_at_idx ON keel.rate_limit_denials (at);
CREATE INDEX rate_limit_denials_key_idx ON keel.rate_limit_denials (policy, key, at);

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

SELECT pg_catalog.pg_extension_config_dump('keel.rate_limits', '');
SELECT pg_catalog.pg_extension_config_dump('keel.rate_limit_slots', '');
SELECT pg_catalog.pg_extension_config_dump('keel.rate_limit_state', '');
SELECT pg_catalog.pg_extension_config_dump('keel.rate_limit_denials', '');

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

CREATE FUNCTION keel.drop_limit(name text)
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

-- Forgets a key's state: its next call starts at full capacity. True if there was state.
CREATE FUNCTION keel.rate_reset(name text, key text)
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

-- Keys back at full capacity (their rows mean nothing any more), denials older than
-- keel.rate_denial_retention and expired slots of concurrency limits: at most max_rows of each
-- per call.
CREATE FUNCTION keel.cleanup_rate_limits(max_rows integer DEFAULT 1000)
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

-- The decision functions return their one row natively (src/srf.rs), so they are declared
-- here rather than generated.
CREATE FUNCTION keel.check(name text, key text, cost integer DEFAULT 1)
RETURNS TABLE (
    allowed         boolean,
    "limit"         integer,
    remaining       integer,
    retry_after_ms  bigint,
    reset_after_ms  bigint)
VOLATILE PARALLEL UNSAFE ROWS 1
LANGUAGE c AS 'MODULE_PATHNAME', 'keel_check';

CREATE FUNCTION keel.rate_limit(
    key text,
    max integer,
    per interval,
    cost integer DEFAULT 1,
    algorithm text DEFAULT 'token_bucket',
    burst integer DEFAULT NULL)
RETURNS TABLE (
    allowed         boolean,
    "limit"         integer,
    remaining       integer,
    retry_after_ms  bigint,
    reset_after_ms  bigint)
VOLATILE PARALLEL UNSAFE ROWS 1
LANGUAGE c AS 'MODULE_PATHNAME', 'keel_rate_limit';

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

-- A new install starts with no key of a memory policy in shared memory, whatever an install
-- dropped before it left there (the same policy name must not inherit old decisions).
SELECT keel._rate_memory_reset();
