-- pg_keel transactional outbox (DESIGN.md §2): events written in the caller's transaction,
-- dispatched to Redis by the background worker (src/outbox/, src/worker.rs).

-- The events themselves: written once by emit, never updated on dispatch (only a replay bumps
-- `replays`). What is still to be sent lives in the narrow keel.outbox_pending, and dispatch
-- deletes from it: no new version of a wide row, no index entry per dispatched event.
CREATE TABLE keel.outbox_events (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic          text        NOT NULL,
    aggregate_id   text,
    version        bigint,
    payload        jsonb       NOT NULL,
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Bumped by outbox_replay: part of the Redis dedupe key, so a replay appends again.
    replays        integer     NOT NULL DEFAULT 0,
    CONSTRAINT outbox_topic_valid CHECK (topic ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$')
) WITH (autovacuum_vacuum_scale_factor = 0.02);

-- A retried emit of the same (topic, aggregate, version) returns the first event.
CREATE UNIQUE INDEX outbox_idempotency_idx ON keel.outbox_events (topic, aggregate_id, version)
    WHERE aggregate_id IS NOT NULL AND version IS NOT NULL;
-- Retention cleanup, oldest first.
CREATE INDEX outbox_created_idx ON keel.outbox_events (created_at);

-- Committed events not yet in Redis: the dispatcher's work list, in id order.
CREATE TABLE keel.outbox_pending (
    id          bigint  PRIMARY KEY,
    -- Refusals of this event by Redis (not counting Redis being down).
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text
) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.01);

-- Events Redis refused keel.outbox_max_attempts times: kept until replayed.
CREATE TABLE keel.outbox_dead (
    id          bigint      PRIMARY KEY,
    attempts    integer     NOT NULL,
    last_error  text,
    died_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- When the dispatcher last delivered an event of each topic (one row per topic, updated
-- once per batch).
CREATE TABLE keel.outbox_topics (
    topic               text        PRIMARY KEY,
    last_dispatched_at  timestamptz NOT NULL
) WITH (fillfactor = 50);

-- Where a topic goes. Without a row (or without a redis_key), a topic goes to the key
-- <keel.redis_prefix><topic>, by default the stream keel:<topic>.
CREATE TABLE keel.outbox_routes (
    topic      text   PRIMARY KEY,
    target     text   NOT NULL,
    redis_key  text,
    maxlen     bigint,
    CONSTRAINT outbox_routes_topic_valid CHECK (topic ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$'),
    CONSTRAINT outbox_routes_target_valid CHECK (target IN ('stream', 'list', 'pubsub')),
    CONSTRAINT outbox_routes_key_valid CHECK (redis_key <> '' AND length(redis_key) <= 512),
    CONSTRAINT outbox_routes_maxlen_positive CHECK (maxlen IS NULL OR maxlen >= 1)
);

SELECT pg_catalog.pg_extension_config_dump('keel.outbox_events', '');
SELECT pg_catalog.pg_extension_config_dump('keel.outbox_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keel.outbox_pending', '');
SELECT pg_catalog.pg_extension_config_dump('keel.outbox_dead', '');
SELECT pg_catalog.pg_extension_config_dump('keel.outbox_topics', '');
SELECT pg_catalog.pg_extension_config_dump('keel.outbox_routes', '');

-- Names this outbox in Redis' dedupe records. Ids start again at 1 when the extension is
-- re-created, and a restored database may reuse ids its original went on to send: a new epoch
-- keeps such events from being taken for ones already sent. Deliberately not dumped, so a
-- restore gets a new one (a pending event the original had already sent may then arrive twice;
-- consumers dedupe on id). A promoted standby keeps it, with the history it continues.
CREATE TABLE keel.outbox_instance (
    epoch  text NOT NULL
);
INSERT INTO keel.outbox_instance (epoch)
VALUES (substr(replace(pg_catalog.gen_random_uuid()::text, '-', ''), 1, 16));

-- Every event with its delivery state, for people and tests: pending (in the work list),
-- dead (refused too often), or dispatched (neither: it is in Redis).
CREATE VIEW keel.outbox AS
SELECT e.id, e.topic, e.aggregate_id, e.version, e.payload, e.headers, e.created_at,
       CASE WHEN p.id IS NOT NULL THEN 'pending'
            WHEN d.id IS NOT NULL THEN 'dead'
            ELSE 'dispatched' END                    AS state,
       coalesce(p.attempts, d.attempts, 0)          AS attempts,
       coalesce(p.last_error, d.last_error)         AS last_error,
       d.died_at,
       e.replays
  FROM keel.outbox_events e
  LEFT JOIN keel.outbox_pending p ON p.id = e.id
  LEFT JOIN keel.outbox_dead d ON d.id = e.id;

CREATE FUNCTION keel._emit(
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

-- The public entry point: SECURITY INVOKER, so keel._authorize sees current_user (src/auth.rs).
CREATE FUNCTION keel.emit(
    topic text,
    payload jsonb,
    aggregate_id text DEFAULT NULL,
    version bigint DEFAULT NULL,
    headers jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
    SELECT keel._emit(keel._authorize('emit', topic), topic, payload, aggregate_id, version, headers)
$$;

CREATE FUNCTION keel.create_route(
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

CREATE FUNCTION keel.outbox_replay(topic text, from_id bigint, to_id bigint DEFAULT NULL)
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

CREATE VIEW keel.outbox_stats AS
WITH events AS (
    SELECT e.topic, count(*) AS total FROM keel.outbox_events e GROUP BY e.topic
), pending AS (
    SELECT e.topic, count(*) AS pending, min(e.created_at) AS oldest,
           (array_agg(p.last_error ORDER BY p.id DESC) FILTER (WHERE p.last_error IS NOT NULL))[1]
               AS last_error
      FROM keel.outbox_pending p JOIN keel.outbox_events e ON e.id = p.id
     GROUP BY e.topic
), dead AS (
    SELECT e.topic, count(*) AS dead,
           (array_agg(d.last_error ORDER BY d.id DESC) FILTER (WHERE d.last_error IS NOT NULL))[1]
               AS last_error
      FROM keel.outbox_dead d JOIN keel.outbox_events e ON e.id = d.id
     GROUP BY e.topic
)
SELECT ev.topic,
       coalesce(p.pending, 0)                                  AS pending,
       now() - p.oldest                                        AS oldest_pending_age,
       ev.total - coalesce(p.pending, 0) - coalesce(d.dead, 0) AS dispatched,
       coalesce(d.dead, 0)                                     AS dead,
       coalesce(p.last_error, d.last_error)                    AS last_error,
       t.last_dispatched_at
  FROM events ev
  LEFT JOIN pending p ON p.topic = ev.topic
  LEFT JOIN dead d ON d.topic = ev.topic
  LEFT JOIN keel.outbox_topics t ON t.topic = ev.topic;
