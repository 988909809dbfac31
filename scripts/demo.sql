-- pg_keel walk-through: queues, then the outbox. Every statement is echoed with its result.
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE EXTENSION pg_keel;

-- A queue: 30 s leases, 3 attempts, backoff from 1 s, at most 1000 waiting jobs.
SELECT keel.create_queue('emails', max_attempts => 3, max_ready => 1000);

-- Enqueue in the business transaction: the job exists if and only if the order commits.
BEGIN;
SELECT keel.enqueue('emails', '{"to": "ada@example.com", "template": "welcome"}',
                    idempotency_key => 'welcome:ada') AS job_id;
COMMIT;
-- A client retry with the same idempotency key returns the same job, inserts nothing.
SELECT keel.enqueue('emails', '{"to": "ada@example.com", "template": "welcome"}',
                    idempotency_key => 'welcome:ada') AS same_job_id;
SELECT keel.enqueue('emails', '{"to": "bob@example.com"}', priority => -1) AS urgent_job_id;
SELECT keel.enqueue('emails', '{"to": "cy@example.com"}', delay => '1 hour') AS later_job_id;

-- A worker claims a batch: lower priority number first, then oldest; the delayed job stays hidden.
SELECT job_id, attempt, payload, lease_expires_at > now() AS leased FROM keel.claim('emails', 10, worker => 'demo-1');

-- The urgent job fails once: it comes back after the backoff, with the error kept.
SELECT keel.fail(job_id, 1, 'SMTP 451 try again') FROM keel.jobs WHERE payload->>'to' = 'bob@example.com';
-- Ada's job is done: ack with its lease identity (job_id, attempt). A second ack is refused.
SELECT keel.ack(job_id, 1) AS acked FROM keel.jobs WHERE idempotency_key = 'welcome:ada';
SELECT keel.ack(job_id, 1) AS acked_again FROM keel.jobs WHERE idempotency_key = 'welcome:ada';

-- What an operator sees.
SELECT queue, ready, scheduled, running, dead, done, enqueued_total, completed_total FROM keel.queue_stats;
SELECT job_id, state, attempt, last_error, state = 'ready' AND visible_at > now() AS not_yet_due FROM keel.jobs ORDER BY job_id;

-- The outbox: the background worker connects once this database exists (it retries every 2 s).
DO $$ BEGIN
  FOR i IN 1..100 LOOP
    EXIT WHEN (SELECT state LIKE 'idle: nothing pending%' FROM keel.worker_status());
    PERFORM pg_sleep(0.1);
  END LOOP;
END $$;
SELECT pid IS NOT NULL AS worker_running, state, redis_target, redis_connected FROM keel.worker_status();

-- An event is written in the business transaction: it exists if and only if the order commits.
BEGIN;
SELECT keel.emit('orders', '{"order_id": 42, "total": 99.5}', aggregate_id => 'order-42', version => 1) AS event_id;
COMMIT;
BEGIN;
SELECT keel.emit('orders', '{"order_id": 43, "total": 10}', aggregate_id => 'order-43', version => 1) AS rolled_back_event;
ROLLBACK;
-- A retried emit of the same (topic, aggregate, version) is the same event.
SELECT keel.emit('orders', '{"order_id": 42, "total": 99.5}', aggregate_id => 'order-42', version => 1) AS same_event_id;
SELECT pg_sleep(0.2);
SELECT topic, pending, dispatched, dead, last_error FROM keel.outbox_stats;
SELECT name, every, last_run_at IS NOT NULL AS has_run FROM keel.tasks ORDER BY name;

-- Rate limits: 2 calls a minute per user, counted in shared memory; the third is denied and
-- says when to come back.
SELECT keel.create_limit('login', 2, '1 minute', durability => 'memory');
SELECT * FROM keel.check('login', 'user-42');
SELECT * FROM keel.check('login', 'user-42');
SELECT * FROM keel.check('login', 'user-42');
-- The denial is logged; for a memory policy the worker writes it at its next snapshot (1 s).
SELECT pg_sleep(1.5);
SELECT policy, key, cost, retry_after_ms > 0 AS told_when FROM keel.rate_limit_denials;

-- Sessions: Postgres holds the record, only the token's hash is stored.
SELECT session_id, token FROM keel.session_create('user-42', idle_timeout => '2 hours', data => '{"mfa": true}') \gset
SELECT user_id, data, idle_expires_at > now() AS idle_expiry_set FROM keel.session_validate(:'token');
SELECT keel.session_rotate(:'token') AS new_token \gset
SELECT count(*) AS old_token_rows FROM keel.session_validate(:'token');
SELECT session_id = :'session_id' AS same_session FROM keel.session_validate(:'new_token');
SELECT keel.session_revoke_user('user-42') AS revoked;
SELECT count(*) AS after_revoke FROM keel.session_validate(:'new_token');

-- Errors are clean SQLSTATEs with a hint, and change nothing.
\set ON_ERROR_STOP 0
SELECT keel.enqueue('newsletters', '{}');
SELECT keel.create_queue('Bad Name!');
\set ON_ERROR_STOP 1

-- Operating it: the incident playbook as one query, and Prometheus text for a scraper.
SELECT "check", status, detail FROM keel.health()
 WHERE "check" IN ('worker', 'queue:emails:oldest_ready', 'outbox:oldest_pending', 'redis:reachable', 'xmin_horizon');
SELECT line FROM regexp_split_to_table(keel.metrics(), E'\n') AS line
 WHERE line LIKE 'keel_worker_up%' OR line LIKE 'keel_queue_jobs%state="ready"%';
