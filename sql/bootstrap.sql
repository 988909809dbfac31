-- pg_keel bootstrap: the tables every capability builds on.
-- Runs first in CREATE EXTENSION (schema keel already exists: the control file names it).

-- Queue settings, one row per queue.
CREATE TABLE keel.queues (
    queue               text        PRIMARY KEY,
    visibility_timeout  interval    NOT NULL,
    max_attempts        integer     NOT NULL,
    retry_backoff       interval    NOT NULL,
    retry_backoff_max   interval    NOT NULL,
    max_ready           bigint,
    dedupe_window       interval    NOT NULL,
    paused              boolean     NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- Added in 0.2.0 (after the old columns): how long done and cancelled jobs stay
    -- queryable (0: done jobs without an idempotency key are deleted at ack), and the topic
    -- that keel.progress reports are emitted to.
    keep_finished       interval    NOT NULL DEFAULT interval '0',
    progress_topic      text,
    -- Flow control (0.2.0, issue 17): at most this many live leases per concurrency_key, and
    -- the keel.create_limit policy claims are charged to (per concurrency_key, else the queue).
    max_running_per_key integer,
    rate_limit          text,
    -- 'fifo': claim order; 'round_robin': claims go round the concurrency keys, in proportion
    -- to their weights (keel.queue_keys).
    fairness            text        NOT NULL DEFAULT 'fifo',
    CONSTRAINT queues_keep_finished_valid CHECK (keep_finished >= interval '0'),
    CONSTRAINT queues_progress_topic_valid
        CHECK (progress_topic ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$'),
    CONSTRAINT queues_name_valid CHECK (queue ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$'),
    CONSTRAINT queues_visibility_timeout_positive CHECK (visibility_timeout > interval '0'),
    CONSTRAINT queues_max_attempts_positive CHECK (max_attempts >= 1),
    CONSTRAINT queues_backoff_positive CHECK (retry_backoff > interval '0'),
    CONSTRAINT queues_backoff_max_ge_backoff CHECK (retry_backoff_max >= retry_backoff),
    CONSTRAINT queues_max_ready_positive CHECK (max_ready IS NULL OR max_ready >= 1),
    CONSTRAINT queues_dedupe_window_positive CHECK (dedupe_window > interval '0'),
    CONSTRAINT queues_max_running_per_key_positive
        CHECK (max_running_per_key IS NULL OR max_running_per_key >= 1),
    CONSTRAINT queues_rate_limit_valid CHECK (rate_limit ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$'),
    CONSTRAINT queues_fairness_valid CHECK (fairness IN ('fifo', 'round_robin'))
);

-- Every job of every queue.
--
-- `visible_at` is the one column the claim path orders and filters on:
--   state 'ready'   -> the time the job becomes claimable (enqueue time + delay, or retry time);
--   state 'running' -> the lease expiry; once it has passed the job is claimable again
--                      (unless that was its last attempt: then the reaper makes it dead).
-- The lease identity is (job_id, attempt): attempt grows on every claim, and never goes back.
--
-- No foreign key to keel.queues on purpose: a FK check would take a KEY SHARE lock on the
-- queue row for every enqueue (multixact churn under many producers). Enqueue and drop_queue
-- serialize on a per-queue lock instead (keel._lock_queue, src/locks.rs).
CREATE TABLE keel.jobs (
    job_id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue            text        NOT NULL,
    state            text        NOT NULL DEFAULT 'ready',
    payload          jsonb       NOT NULL,
    priority         integer     NOT NULL DEFAULT 0,
    attempt          integer     NOT NULL DEFAULT 0,
    -- Tries are counted from here (attempt - attempt_base): retry_dead moves it up to attempt,
    -- so a revived job gets its tries again while attempt, the lease identity, keeps growing.
    attempt_base     integer     NOT NULL DEFAULT 0,
    max_attempts     integer,
    visible_at       timestamptz NOT NULL,
    enqueued_at      timestamptz NOT NULL,
    claimed_at       timestamptz,
    worker           text,
    idempotency_key  text,
    last_error       text,
    finished_at      timestamptz,
    dead_reason      text,
    -- The role whose claim holds the lease (src/auth.rs): ack, fail and extend by any other
    -- role find no lease.
    claimed_by       oid,
    -- What the holder last reported with keel.progress (kept across attempts). Last: added in
    -- 0.2.0 (a table's new columns go after the old ones).
    progress         jsonb,
    -- What ack(job_id, attempt, result) was given, kept with a finished job (0.2.0).
    result           jsonb,
    -- The job's key for its queue's max_running_per_key and rate_limit (0.2.0).
    concurrency_key  text,
    CONSTRAINT jobs_state_valid CHECK (state IN ('ready', 'running', 'done', 'dead', 'cancelled')),
    CONSTRAINT jobs_max_attempts_positive CHECK (max_attempts IS NULL OR max_attempts >= 1)
) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 1);

-- The claim path: equality on queue, then the claim order (priority, visible_at, job_id).
CREATE INDEX jobs_claim_idx ON keel.jobs (queue, priority, visible_at, job_id)
    WHERE state IN ('ready', 'running');

-- The live leases of each concurrency key, for claims of queues with max_running_per_key
-- (sql/queue.sql, keel._claim_flow): only running jobs that have a key.
CREATE INDEX jobs_running_key_idx ON keel.jobs (queue, concurrency_key)
    WHERE state = 'running' AND concurrency_key IS NOT NULL;

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

-- Idempotency keys are unique per queue for as long as the job row exists.
CREATE UNIQUE INDEX jobs_idempotency_idx ON keel.jobs (queue, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Dead, done and cancelled jobs, for stats, retry_dead and the cleanup of finished jobs.
CREATE INDEX jobs_finished_idx ON keel.jobs (queue, state, finished_at)
    WHERE state IN ('done', 'dead', 'cancelled');

-- Where each role may act (src/auth.rs): the queues it may produce to or consume from, the
-- topics it may emit on, the rate-limit policies it may decide on; '*' is every one. Written
-- by the grant helpers (keel.grant_producer, grant_consumer, grant_admin, revoke_all). regrole,
-- so pg_dump writes role names and a restore into another cluster finds the same roles.
CREATE TABLE keel.grants (
    role        regrole     NOT NULL,
    capability  text        NOT NULL,
    name        text        NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role, capability, name),
    CONSTRAINT grants_capability_valid CHECK (capability IN ('produce', 'consume', 'emit', 'limit')),
    CONSTRAINT grants_name_length CHECK (octet_length(name) BETWEEN 1 AND 1024)
);
SELECT pg_catalog.pg_extension_config_dump('keel.grants', '');

-- pg_dump keeps queues and jobs (they are data, not extension objects).
SELECT pg_catalog.pg_extension_config_dump('keel.queues', '');
SELECT pg_catalog.pg_extension_config_dump('keel.jobs', '');
SELECT pg_catalog.pg_extension_config_dump('keel.jobs_job_id_seq', '');
