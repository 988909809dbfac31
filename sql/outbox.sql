-- pg_keel transactional outbox (DESIGN.md §2): events written in the caller's transaction,
-- dispatched to Redis by the background worker (src/outbox/, src/worker.rs).

CREATE TABLE keel.outbox (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic          text        NOT NULL,
    aggregate_id   text,
    version        bigint,
    payload        jsonb       NOT NULL,
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    state          text        NOT NULL DEFAULT 'pending',
    attempts       integer     NOT NULL DEFAULT 0,
    last_error     text,
    dispatched_at  timestamptz,
    -- Bumped by outbox_replay: part of the Redis dedupe key, so a replay appends again.
    replays        integer     NOT NULL DEFAULT 0,
    CONSTRAINT outbox_topic_valid CHECK (topic ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$'),
    CONSTRAINT outbox_state_valid CHECK (state IN ('pending', 'dispatched', 'dead'))
) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.02);

-- A retried emit of the same (topic, aggregate, version) returns the first event.
CREATE UNIQUE INDEX outbox_idempotency_idx ON keel.outbox (topic, aggregate_id, version)
    WHERE aggregate_id IS NOT NULL AND version IS NOT NULL;
-- The dispatcher's work list, in id order.
CREATE INDEX outbox_pending_idx ON keel.outbox (id) WHERE state = 'pending';
-- Retention cleanup of dispatched rows.
CREATE INDEX outbox_dispatched_idx ON keel.outbox (dispatched_at) WHERE state = 'dispatched';

-- Where a topic goes. Without a row, a topic goes to the stream keel:<topic>.
CREATE TABLE keel.outbox_routes (
    topic      text   PRIMARY KEY,
    target     text   NOT NULL,
    redis_key  text   NOT NULL,
    maxlen     bigint,
    CONSTRAINT outbox_routes_topic_valid CHECK (topic ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$'),
    CONSTRAINT outbox_routes_target_valid CHECK (target IN ('stream', 'list', 'pubsub')),
    CONSTRAINT outbox_routes_key_valid CHECK (redis_key <> '' AND length(redis_key) <= 512),
    CONSTRAINT outbox_routes_maxlen_positive CHECK (maxlen IS NULL OR maxlen >= 1)
);

SELECT pg_catalog.pg_extension_config_dump('keel.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('keel.outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keel.outbox_routes', '');

CREATE FUNCTION keel.emit(
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
    id bigint;
    woken boolean;
BEGIN
    PERFORM keel._check_name('topic', emit.topic);
    IF emit.payload IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'payload', 'must not be NULL (use ''{}''::jsonb or ''null''::jsonb)');
    END IF;
    IF emit.version IS NOT NULL AND emit.aggregate_id IS NULL THEN
        PERFORM keel._queue_error('invalid_argument', 'version', 'needs an aggregate_id');
    END IF;
    PERFORM keel._check_payload(pg_column_size(emit.payload));
    IF emit.aggregate_id IS NOT NULL THEN
        -- Emits for one aggregate commit one after the other, so their ids follow their
        -- commit order and the dispatcher delivers them in order.
        PERFORM pg_advisory_xact_lock(hashtext('keel.outbox:' || emit.topic), hashtext(emit.aggregate_id));
    END IF;
    IF emit.aggregate_id IS NOT NULL AND emit.version IS NOT NULL THEN
        INSERT INTO keel.outbox (topic, aggregate_id, version, payload, headers)
        VALUES (emit.topic, emit.aggregate_id, emit.version, emit.payload, emit.headers)
        ON CONFLICT (topic, aggregate_id, version) WHERE aggregate_id IS NOT NULL AND version IS NOT NULL
        DO NOTHING
        RETURNING outbox.id INTO id;
        IF id IS NULL THEN
            SELECT o.id INTO id FROM keel.outbox o
             WHERE o.topic = emit.topic AND o.aggregate_id = emit.aggregate_id AND o.version = emit.version;
            RETURN id;
        END IF;
    ELSE
        INSERT INTO keel.outbox (topic, aggregate_id, version, payload, headers)
        VALUES (emit.topic, emit.aggregate_id, emit.version, emit.payload, emit.headers)
        RETURNING outbox.id INTO id;
    END IF;
    woken := keel._wake_dispatcher_on_commit();
    RETURN id;
END
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
        PERFORM keel._queue_error('invalid_argument', 'target', 'must be ''stream'', ''list'' or ''pubsub''');
    END IF;
    IF create_route.redis_key = '' OR length(create_route.redis_key) > 512 THEN
        PERFORM keel._queue_error('invalid_argument', 'redis_key', 'must be 1 to 512 characters (or NULL for keel:<topic>)');
    END IF;
    IF create_route.maxlen < 1 THEN
        PERFORM keel._queue_error('invalid_argument', 'maxlen', 'must be at least 1 (or NULL for no trimming)');
    END IF;
    IF create_route.maxlen IS NOT NULL AND create_route.target <> 'stream' THEN
        PERFORM keel._queue_error('invalid_argument', 'maxlen', 'applies to streams only');
    END IF;
    INSERT INTO keel.outbox_routes (topic, target, redis_key, maxlen)
    VALUES (create_route.topic, create_route.target,
            coalesce(create_route.redis_key, 'keel:' || create_route.topic), create_route.maxlen)
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
        PERFORM keel._queue_error('invalid_argument', 'from_id', 'must not be NULL');
    END IF;
    IF outbox_replay.to_id < outbox_replay.from_id THEN
        PERFORM keel._queue_error('invalid_argument', 'to_id', 'must not be below from_id');
    END IF;
    UPDATE keel.outbox
       SET state = 'pending', attempts = 0, last_error = NULL, dispatched_at = NULL,
           replays = replays + 1
     WHERE topic = outbox_replay.topic AND state IN ('dispatched', 'dead')
       AND id >= outbox_replay.from_id
       AND (outbox_replay.to_id IS NULL OR id <= outbox_replay.to_id);
    GET DIAGNOSTICS requeued = ROW_COUNT;
    IF requeued > 0 THEN
        woken := keel._wake_dispatcher_on_commit();
    END IF;
    RETURN requeued;
END
$$;

CREATE VIEW keel.outbox_stats AS
SELECT o.topic,
       count(*) FILTER (WHERE o.state = 'pending')                            AS pending,
       now() - min(o.created_at) FILTER (WHERE o.state = 'pending')           AS oldest_pending_age,
       count(*) FILTER (WHERE o.state = 'dispatched')                         AS dispatched,
       count(*) FILTER (WHERE o.state = 'dead')                               AS dead,
       (array_agg(o.last_error ORDER BY o.id DESC) FILTER (WHERE o.last_error IS NOT NULL))[1]
                                                                              AS last_error,
       max(o.dispatched_at)                                                   AS last_dispatched_at
  FROM keel.outbox o
 GROUP BY o.topic;
