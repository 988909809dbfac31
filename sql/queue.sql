-- pg_keel queues: at-least-once jobs with a visibility timeout, retries, dead letter,
-- idempotency keys and backpressure (DESIGN.md §1).
--
-- Admin calls, enqueue and fail are PL/pgSQL: plans prepared once per session, payloads
-- passed as jsonb datums, every statement readable SQL. The per-job calls of a worker (claim,
-- ack, extend) are native functions over saved plans (src/queue/lease.rs). Errors, name
-- validation and the backoff math live in Rust (src/queue/) and are called from here:
-- keel._queue_error(kind, queue, detail), keel._check_name, keel._check_payload,
-- keel._retry_delay.
--
-- Every function that touches the tables is SECURITY DEFINER with a pinned search_path, so
-- a role granted EXECUTE through keel.grant_* needs no table privileges; every name below
-- is schema-qualified.

-- keel._lock_queue(queue, exclusive), in src/locks.rs, serializes enqueue (shared) against
-- drop_queue (exclusive) for one queue, on a lock no other role can take.

-- Settings that create_queue and alter_queue share, checked in one place.
CREATE FUNCTION keel._check_queue_settings(
    visibility_timeout interval, max_attempts integer, retry_backoff interval,
    retry_backoff_max interval, max_ready bigint, dedupe_window interval)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM keel._check_interval('visibility_timeout', visibility_timeout);
    PERFORM keel._check_interval('retry_backoff', retry_backoff);
    PERFORM keel._check_interval('retry_backoff_max', retry_backoff_max);
    PERFORM keel._check_interval('dedupe_window', dedupe_window);
    IF visibility_timeout <= interval '0' THEN
        PERFORM keel._queue_error('invalid_argument', 'visibility_timeout', 'must be a positive interval');
    END IF;
    IF max_attempts < 1 THEN
        PERFORM keel._queue_error('invalid_argument', 'max_attempts', 'must be at least 1');
    END IF;
    IF retry_backoff <= interval '0' THEN
        PERFORM keel._queue_error('invalid_argument', 'retry_backoff', 'must be a positive interval');
    END IF;
    IF retry_backoff_max <= interval '0' THEN
        PERFORM keel._queue_error('invalid_argument', 'retry_backoff_max', 'must be a positive interval');
    END IF;
    IF max_ready < 1 THEN
        PERFORM keel._queue_error('invalid_argument', 'max_ready', 'must be at least 1 (or NULL for no limit)');
    END IF;
    IF dedupe_window <= interval '0' THEN
        PERFORM keel._queue_error('invalid_argument', 'dedupe_window', 'must be a positive interval');
    END IF;
END
$$;

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

-- Unknown queue: 22023 when the name itself is malformed, 42704 otherwise.
CREATE FUNCTION keel._unknown_queue(queue text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM keel._check_name('queue', queue);
    PERFORM keel._queue_error('unknown_queue', queue, NULL);
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

CREATE FUNCTION keel._set_paused(queue text, paused boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    UPDATE keel.queues SET paused = _set_paused.paused WHERE queue = _set_paused.queue;
    IF NOT FOUND THEN
        PERFORM keel._unknown_queue(_set_paused.queue);
    END IF;
END
$$;

CREATE FUNCTION keel.pause_queue(queue text)
RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT keel._set_paused(queue, true) $$;

CREATE FUNCTION keel.resume_queue(queue text)
RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT keel._set_paused(queue, false) $$;

CREATE FUNCTION keel.drop_queue(queue text, force boolean DEFAULT false)
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

CREATE FUNCTION keel.purge_queue(queue text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    deleted bigint;
BEGIN
    PERFORM 1 FROM keel.queues WHERE queue = purge_queue.queue;
    IF NOT FOUND THEN
        PERFORM keel._unknown_queue(purge_queue.queue);
    END IF;
    DELETE FROM keel.jobs WHERE queue = purge_queue.queue;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

-- Checks shared by enqueue and enqueue_batch; returns the queue row, locked against drop.
CREATE FUNCTION keel._enqueue_target(queue text, delay interval, priority integer, incoming bigint)
RETURNS keel.queues
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q keel.queues;
    waiting bigint;
BEGIN
    IF delay IS NULL OR delay < interval '0' THEN
        PERFORM keel._queue_error('invalid_argument', 'delay', 'must be zero or a positive interval');
    ELSE
        PERFORM keel._check_interval('delay', delay);
    END IF;
    IF priority IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'priority', 'must not be NULL');
    END IF;
    PERFORM keel._lock_queue(_enqueue_target.queue, false);
    SELECT * INTO q FROM keel.queues WHERE queue = _enqueue_target.queue;
    IF NOT FOUND THEN
        PERFORM keel._unknown_queue(_enqueue_target.queue);
    END IF;
    IF q.max_ready IS NOT NULL THEN
        -- Bounded count: never reads more than max_ready index entries.
        SELECT count(*) INTO waiting FROM (
            SELECT 1 FROM keel.jobs
             WHERE queue = q.queue AND state IN ('ready', 'running') AND state = 'ready'
             LIMIT q.max_ready) w;
        IF waiting + incoming > q.max_ready THEN
            PERFORM keel._queue_error('queue_full', q.queue, q.max_ready::text);
        END IF;
    END IF;
    RETURN q;
END
$$;

-- The idempotency-key path of keel.enqueue (src/queue/enqueue.rs), which has checked the
-- arguments and the caller's grant and runs this as pg_keel's owner. A key is taken while its
-- job exists in any state but done, and for dedupe_window after enqueue once done. Three
-- rounds cover a concurrent insert or cleanup.
CREATE FUNCTION keel._enqueue_keyed(
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

CREATE FUNCTION keel._fail(
    ticket bigint, job_id bigint, attempt integer, error text DEFAULT NULL, retry_in interval DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- By primary key, whatever the table held when the plan was made (src/owner.rs, BY_INDEX).
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    holder oid;
    t timestamptz;
    j record;
BEGIN
    holder := keel._redeem(ticket, 'hold', NULL);
    -- Before the clock is read for the retry time (src/queue/floor.rs).
    PERFORM keel._writing_jobs(NULL, NULL);
    t := clock_timestamp();
    IF _fail.retry_in < interval '0' THEN
        PERFORM keel._queue_error('invalid_argument', 'retry_in', 'must be zero or a positive interval (or NULL for the backoff)');
    ELSE
        PERFORM keel._check_interval('retry_in', _fail.retry_in);
    END IF;
    SELECT jb.job_id, jb.attempt - jb.attempt_base AS tries,
           coalesce(jb.max_attempts, qs.max_attempts) AS max_attempts,
           qs.retry_backoff, qs.retry_backoff_max
      INTO j
      FROM keel.jobs jb JOIN keel.queues qs ON qs.queue = jb.queue
     -- coalesce: by primary key, never by the partial claim index (src/queue/lease.rs).
     WHERE jb.job_id = _fail.job_id AND jb.attempt = _fail.attempt AND coalesce(jb.state, '') = 'running'
       AND keel._may_hold(jb.claimed_by, holder)
       FOR UPDATE OF jb;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF j.tries >= j.max_attempts THEN
        UPDATE keel.jobs
           SET state = 'dead', finished_at = t, last_error = left(_fail.error, 4096), dead_reason = 'failed'
         WHERE job_id = _fail.job_id;
        RETURN 'dead';
    END IF;
    UPDATE keel.jobs
       SET state = 'ready',
           -- Never before now: an interval with mixed signs can land in the past.
           visible_at = greatest(t, t + coalesce(_fail.retry_in,
                                     keel._retry_delay(j.retry_backoff, j.retry_backoff_max,
                                                       j.tries, _fail.job_id))),
           last_error = left(_fail.error, 4096),
           worker = NULL
     WHERE job_id = _fail.job_id;
    RETURN 'retry';
END
$$;

CREATE FUNCTION keel.fail(job_id bigint, attempt integer, error text DEFAULT NULL, retry_in interval DEFAULT NULL)
RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
    SELECT keel._fail(keel._authorize('hold', NULL), job_id, attempt, error, retry_in)
$$;

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

CREATE FUNCTION keel.retry_dead(queue text, job_id bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    revived bigint;
    priorities integer[];
BEGIN
    PERFORM 1 FROM keel.queues WHERE queue = retry_dead.queue;
    IF NOT FOUND THEN
        PERFORM keel._unknown_queue(retry_dead.queue);
    END IF;
    -- Claims must know the priorities before the jobs are back (src/queue/floor.rs): only
    -- jobs of the priorities recorded here are revived (one that died meanwhile with another
    -- priority stays dead for the next call).
    SELECT array_agg(DISTINCT priority) INTO priorities
      FROM keel.jobs
     WHERE queue = retry_dead.queue AND state = 'dead'
       AND (retry_dead.job_id IS NULL OR job_id = retry_dead.job_id);
    PERFORM keel._writing_jobs(retry_dead.queue, p) FROM unnest(priorities) p;
    PERFORM keel._writing_jobs(retry_dead.queue, NULL);
    UPDATE keel.jobs
       SET state = 'ready', attempt_base = attempt, visible_at = clock_timestamp(), finished_at = NULL,
           dead_reason = NULL, worker = NULL
     WHERE queue = retry_dead.queue AND state = 'dead'
       AND (retry_dead.job_id IS NULL OR job_id = retry_dead.job_id)
       AND priority = ANY (priorities);
    GET DIAGNOSTICS revived = ROW_COUNT;
    IF revived > 0 THEN
        PERFORM keel._wake(retry_dead.queue);
    END IF;
    RETURN revived;
END
$$;

-- Leases that expired after the job's last allowed attempt: such a job is never handed out
-- again, so it becomes dead (reason 'lease expired'). At most max_rows per call, so a
-- scheduler can call it in short transactions until it returns less than max_rows.
CREATE FUNCTION keel.reap_expired(max_rows integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    t timestamptz := clock_timestamp();
    reaped bigint;
BEGIN
    IF reap_expired.max_rows IS NULL OR reap_expired.max_rows < 1 THEN
        PERFORM keel._queue_error('invalid_argument', 'max_rows', 'must be at least 1');
    END IF;
    WITH expired AS (
        SELECT j.job_id
          FROM keel.jobs j JOIN keel.queues qs ON qs.queue = j.queue
         WHERE j.state = 'running' AND j.visible_at <= t
           AND j.attempt - j.attempt_base >= coalesce(j.max_attempts, qs.max_attempts)
         ORDER BY j.visible_at
         LIMIT reap_expired.max_rows
           FOR UPDATE OF j SKIP LOCKED
    )
    UPDATE keel.jobs j
       SET state = 'dead', finished_at = t, dead_reason = 'lease expired',
           last_error = coalesce(j.last_error, format('lease expired on attempt %s', j.attempt))
      FROM expired
     WHERE j.job_id = expired.job_id;
    GET DIAGNOSTICS reaped = ROW_COUNT;
    RETURN reaped;
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

CREATE VIEW keel.queue_stats AS
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

-- Jobs in progress whose lease has expired, or that have been running for longer than
-- keel.stuck_threshold (default 15 minutes).
CREATE VIEW keel.stuck_jobs AS
SELECT j.job_id,
       j.queue,
       j.attempt,
       coalesce(j.max_attempts, q.max_attempts) AS max_attempts,
       j.worker,
       j.claimed_at,
       j.visible_at AS lease_expires_at,
       now() - j.claimed_at AS running_for,
       j.visible_at <= now() AS lease_expired,
       j.last_error
  FROM keel.jobs j
  JOIN keel.queues q ON q.queue = j.queue
 WHERE j.state = 'running'
   AND (j.visible_at <= now()
        OR j.claimed_at < now() - coalesce(nullif(current_setting('keel.stuck_threshold', true), '')::interval,
                                           interval '15 minutes'));

-- How many jobs sit at each attempt count, per queue and state: the retry distribution.
CREATE VIEW keel.attempt_histogram AS
SELECT queue, state, attempt, count(*) AS jobs
  FROM keel.jobs
 GROUP BY queue, state, attempt;

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
