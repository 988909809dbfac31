-- pg_keel health and metrics (DESIGN.md §6): the seed's incident playbook run on pg_keel's own
-- objects. keel.health() is one row per check with its status, the figure and the threshold it
-- was held against; keel.metrics() is the same figures in Prometheus' text exposition format,
-- for any exporter that can run SQL. What only shared memory knows (this database's worker,
-- Redis' INFO as the worker last read it) comes from keel._worker_health() (src/health.rs).
--
-- Both are SECURITY DEFINER with a pinned search_path: they read keel's tables and the
-- statistics views as their owner, so a monitoring role needs EXECUTE only
-- (keel.grant_monitor). They change nothing.

-- Thresholds, one place: (check family, warn at, critical at). NULL: that level is not used.
CREATE FUNCTION keel._health_thresholds()
RETURNS TABLE(family text, warn double precision, critical double precision)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    VALUES ('worker_loop_age_s',      10,   60),
           ('queue_oldest_ready_s',   60,   600),
           ('queue_expired_leases',   1,    NULL),
           ('queue_dead_last_hour',   1,    NULL),
           ('outbox_oldest_pending_s', 10,  60),
           ('outbox_dead',            1,    NULL),
           ('redis_memory_ratio',     0.9,  0.98),
           ('redis_evicted_keys',     1,    NULL),
           ('xmin_horizon_age_s',     300,  3600),
           ('dead_tuple_ratio',       0.2,  0.5),
           ('task_failures',          1,    NULL),
           ('idle_in_transaction_s',  60,   600),
           ('lock_waits',             1,    NULL)
$$;

-- 'ok', 'warn' or 'critical' for `value` against a family's thresholds.
CREATE FUNCTION keel._health_status(family text, value double precision)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN value IS NULL THEN 'ok'
                WHEN t.critical IS NOT NULL AND value >= t.critical THEN 'critical'
                WHEN value >= t.warn THEN 'warn'
                ELSE 'ok' END
      FROM keel._health_thresholds() t WHERE t.family = _health_status.family
$$;

CREATE FUNCTION keel._health_threshold(family text)
RETURNS double precision
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT t.warn FROM keel._health_thresholds() t WHERE t.family = _health_threshold.family $$;

CREATE FUNCTION keel.health()
RETURNS TABLE("check" text, status text, detail text, advice text,
              value double precision, threshold double precision)
LANGUAGE plpgsql VOLATILE PARALLEL RESTRICTED SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w record;
    v double precision;
    r record;
BEGIN
    SELECT * INTO w FROM keel._worker_health();

    -- The worker of this database: alive and going round its loop.
    IF NOT w.preloaded THEN
        RETURN QUERY SELECT 'worker', 'warn',
            'inactive: pg_keel is not in shared_preload_libraries (no worker: nothing dispatches the outbox or runs the tasks)',
            'Add pg_keel to shared_preload_libraries and restart.', NULL::float8, NULL::float8;
    ELSIF NOT w.running THEN
        SELECT s.state INTO r FROM keel.worker_status() s;
        RETURN QUERY SELECT 'worker',
            CASE WHEN pg_is_in_recovery() THEN 'ok'
                 WHEN r.state LIKE '%not listed in keel.database%' THEN 'warn'
                 ELSE 'critical' END,
            r.state,
            'See keel.worker_status() and the server log.', NULL::float8, NULL::float8;
    ELSIF (SELECT s.state FROM keel.worker_status() s) LIKE 'not dispatching%' THEN
        RETURN QUERY SELECT 'worker', 'critical', (SELECT s.state FROM keel.worker_status() s),
            'Events wait in the outbox (nothing is lost) until this database has its own keel.redis_prefix.',
            NULL::float8, NULL::float8;
    ELSE
        v := extract(epoch FROM clock_timestamp() - w.last_loop_at);
        RETURN QUERY SELECT 'worker', keel._health_status('worker_loop_age_s', v),
            format('running; last went round its loop %s s ago', round(v::numeric, 1)),
            CASE WHEN v >= 10 THEN 'The worker is stuck in one step: see pg_stat_activity for its query and wait event.' END,
            v, keel._health_threshold('worker_loop_age_s');
    END IF;

    -- Queues: backlog, leases that ran out and nobody took over, dead letters growing.
    FOR r IN
        SELECT q.queue,
               count(*) FILTER (WHERE j.state = 'ready' AND j.visible_at <= now()) AS ready,
               extract(epoch FROM now() - min(j.visible_at) FILTER (WHERE j.state = 'ready' AND j.visible_at <= now())) AS oldest,
               count(*) FILTER (WHERE j.state = 'running' AND j.visible_at < now() - interval '1 minute') AS expired,
               count(*) FILTER (WHERE j.state = 'dead' AND j.finished_at > now() - interval '1 hour') AS dead_hour,
               count(*) FILTER (WHERE j.state = 'dead') AS dead
          FROM keel.queues q LEFT JOIN keel.jobs j ON j.queue = q.queue
         GROUP BY q.queue ORDER BY q.queue
    LOOP
        RETURN QUERY SELECT 'queue:' || r.queue || ':oldest_ready',
            keel._health_status('queue_oldest_ready_s', coalesce(r.oldest, 0)),
            CASE WHEN r.ready = 0 THEN 'nothing ready'
                 ELSE format('%s ready, the oldest claimable for %s s', r.ready, round(r.oldest::numeric, 1)) END,
            CASE WHEN coalesce(r.oldest, 0) >= 60 THEN 'Consumers are not keeping up: add consumers or check that they run (keel.stuck_jobs).' END,
            coalesce(r.oldest, 0)::float8, keel._health_threshold('queue_oldest_ready_s');
        RETURN QUERY SELECT 'queue:' || r.queue || ':expired_leases',
            keel._health_status('queue_expired_leases', r.expired),
            format('%s running jobs whose lease ran out over a minute ago and nobody claimed again', r.expired),
            CASE WHEN r.expired > 0 THEN 'Consumers died holding jobs, or none claims from this queue: see keel.stuck_jobs.' END,
            r.expired::float8, keel._health_threshold('queue_expired_leases');
        RETURN QUERY SELECT 'queue:' || r.queue || ':dead',
            keel._health_status('queue_dead_last_hour', r.dead_hour),
            format('%s jobs went dead in the last hour (%s dead in all)', r.dead_hour, r.dead),
            CASE WHEN r.dead_hour > 0 THEN 'Look at keel.jobs.last_error of the dead jobs; fix, then keel.retry_dead.' END,
            r.dead_hour::float8, keel._health_threshold('queue_dead_last_hour');
    END LOOP;

    -- Outbox: lag to Redis and events that gave up.
    SELECT count(*) AS pending,
           extract(epoch FROM clock_timestamp() - min(e.created_at)) AS oldest,
           (SELECT p2.last_error FROM keel.outbox_pending p2 WHERE p2.last_error IS NOT NULL
             ORDER BY p2.id LIMIT 1) AS last_error
      INTO r
      FROM keel.outbox_pending p JOIN keel.outbox_events e ON e.id = p.id;
    RETURN QUERY SELECT 'outbox:oldest_pending',
        keel._health_status('outbox_oldest_pending_s', coalesce(r.oldest, 0)),
        CASE WHEN r.pending = 0 THEN 'nothing pending'
             ELSE format('%s events pending, the oldest for %s s%s', r.pending,
                         round(coalesce(r.oldest, 0)::numeric, 1),
                         coalesce('; last error: ' || r.last_error, '')) END,
        CASE WHEN coalesce(r.oldest, 0) >= 10 THEN 'Redis refuses or is unreachable (see redis checks), or the worker is not running.' END,
        coalesce(r.oldest, 0)::float8, keel._health_threshold('outbox_oldest_pending_s');
    SELECT count(*) INTO v FROM keel.outbox_dead;
    RETURN QUERY SELECT 'outbox:dead', keel._health_status('outbox_dead', v),
        format('%s events Redis refused too often (keel.outbox, state dead)', v),
        CASE WHEN v > 0 THEN 'Fix what Redis refused (their last_error), then keel.outbox_replay.' END,
        v, keel._health_threshold('outbox_dead');

    -- Redis, as the worker last saw it.
    IF w.preloaded AND w.redis_target IS NOT NULL THEN
        RETURN QUERY SELECT 'redis:reachable',
            CASE WHEN w.redis_connected THEN 'ok' ELSE 'critical' END,
            CASE WHEN w.redis_connected
                 THEN format('%s answers in %s ms', w.redis_target, round(coalesce(w.redis_latency_ms, 0)::numeric, 2))
                 ELSE format('%s is not connected', w.redis_target) END,
            CASE WHEN NOT w.redis_connected THEN 'Events wait in the outbox (nothing is lost); bring Redis back or fix keel.redis_url.' END,
            w.redis_latency_ms, NULL::float8;
        RETURN QUERY SELECT 'redis:secret',
            CASE WHEN keel._redis_url_has_password() THEN 'warn' ELSE 'ok' END,
            CASE WHEN keel._redis_url_has_password() THEN 'keel.redis_url holds the Redis password'
                 ELSE 'no password in keel.redis_url' END,
            CASE WHEN keel._redis_url_has_password() THEN
                'Move it to keel.redis_password_file (a file only the server may read): a URL is written to the server log at every reload and pg_read_all_settings members read it.' END,
            NULL::float8, NULL::float8;
        -- Figures older than three reads (or from before Redis went away) are not shown.
        -- (A Redis that refuses INFO gives no role: then there is nothing to show.)
        IF w.redis_connected AND w.redis_seen_at > clock_timestamp() - interval '30 seconds'
           AND w.redis_role IS NOT NULL THEN
            RETURN QUERY SELECT 'redis:role',
                CASE WHEN w.redis_role = 'master' THEN 'ok' ELSE 'critical' END,
                format('role %s', w.redis_role),
                CASE WHEN w.redis_role <> 'master' THEN 'A replica refuses writes (READONLY): point keel.redis_url at the primary.' END,
                NULL::float8, NULL::float8;
            RETURN QUERY SELECT 'redis:eviction_policy',
                CASE WHEN w.redis_maxmemory_policy = 'noeviction' THEN 'ok' ELSE 'warn' END,
                format('maxmemory-policy %s', w.redis_maxmemory_policy),
                CASE WHEN w.redis_maxmemory_policy <> 'noeviction' THEN
                    'Redis may evict keel''s dedupe records and stream entries under memory pressure: use noeviction for the Redis pg_keel writes to.' END,
                NULL::float8, NULL::float8;
            v := CASE WHEN w.redis_maxmemory > 0 THEN w.redis_used_memory::float8 / w.redis_maxmemory END;
            RETURN QUERY SELECT 'redis:memory', keel._health_status('redis_memory_ratio', v),
                format('%s bytes used of %s', w.redis_used_memory,
                       CASE WHEN w.redis_maxmemory > 0 THEN w.redis_maxmemory::text ELSE 'no maxmemory' END),
                CASE WHEN v >= 0.9 THEN 'Redis is near maxmemory: it will refuse writes (OOM) or evict.' END,
                v, keel._health_threshold('redis_memory_ratio');
            RETURN QUERY SELECT 'redis:evicted_keys', keel._health_status('redis_evicted_keys', w.redis_evicted_keys),
                format('%s keys evicted since Redis started', w.redis_evicted_keys),
                CASE WHEN w.redis_evicted_keys > 0 THEN 'Redis has evicted keys: streams or dedupe records may be gone.' END,
                w.redis_evicted_keys::float8, keel._health_threshold('redis_evicted_keys');
        END IF;
    END IF;

    -- The xmin horizon: who keeps vacuum from removing keel's dead rows.
    -- A session's snapshot (backend_xmin) or its own transaction id (backend_xid), and
    -- prepared transactions, all hold it.
    SELECT h.who, h.age INTO r FROM (
        SELECT format('pid %s (%s, %s, %s)', a.pid, a.usename,
                      coalesce(nullif(a.application_name, ''), a.backend_type), a.state) AS who,
               extract(epoch FROM clock_timestamp() - coalesce(a.xact_start, a.backend_start)) AS age,
               greatest(pg_catalog.age(a.backend_xmin), pg_catalog.age(a.backend_xid)) AS xids
          FROM pg_stat_activity a
         WHERE (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
           AND a.pid <> pg_backend_pid()
           -- sessions of this database (others do not hold back vacuum of its tables);
           -- walsenders report a standby's horizon, not a transaction of their own
           AND a.datname = current_database() AND a.backend_type <> 'walsender'
        UNION ALL
        SELECT format('prepared transaction %L (%s)', p.gid, p.owner),
               extract(epoch FROM clock_timestamp() - p.prepared), pg_catalog.age(p.transaction)
          FROM pg_prepared_xacts p
    ) h ORDER BY h.xids DESC, h.age DESC LIMIT 1;
    RETURN QUERY SELECT 'xmin_horizon',
        keel._health_status('xmin_horizon_age_s', coalesce(r.age, 0)),
        CASE WHEN r.who IS NULL THEN 'no session holds back the xmin horizon'
             ELSE format('%s holds it since %s s', r.who, round(r.age::numeric, 1)) END,
        CASE WHEN coalesce(r.age, 0) >= 300 THEN 'Dead rows of queues and sessions pile up while it runs: end that transaction (pg_terminate_backend) or shorten it.' END,
        coalesce(r.age, 0)::float8, keel._health_threshold('xmin_horizon_age_s');
    SELECT a.pid, a.usename, extract(epoch FROM clock_timestamp() - a.state_change) AS age
      INTO r
      FROM pg_stat_activity a
     WHERE a.state IN ('idle in transaction', 'idle in transaction (aborted)')
       AND a.datname = current_database()
     ORDER BY a.state_change LIMIT 1;
    RETURN QUERY SELECT 'idle_in_transaction',
        keel._health_status('idle_in_transaction_s', coalesce(r.age, 0)),
        CASE WHEN r.pid IS NULL THEN 'no session is idle in a transaction'
             ELSE format('pid %s (%s) idle in a transaction for %s s', r.pid, r.usename, round(r.age::numeric, 1)) END,
        CASE WHEN r.age >= 60 THEN 'Set idle_in_transaction_session_timeout, or end it: it holds locks and the xmin horizon.' END,
        coalesce(r.age, 0)::float8, keel._health_threshold('idle_in_transaction_s');
    SELECT count(*) INTO v
      FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
     WHERE NOT l.granted AND c.relnamespace = 'keel'::regnamespace
       AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database());
    RETURN QUERY SELECT 'lock_waits', keel._health_status('lock_waits', v),
        format('%s lock requests waiting on keel''s tables', v),
        CASE WHEN v > 0 THEN 'See pg_locks and pg_blocking_pids() for who holds them.' END,
        v, keel._health_threshold('lock_waits');

    -- Dead tuples of keel's tables, and their last (auto)vacuum.
    FOR r IN
        SELECT s.relname, s.n_live_tup, s.n_dead_tup,
               greatest(s.last_vacuum, s.last_autovacuum) AS vacuumed,
               s.n_dead_tup::float8 / greatest(s.n_live_tup + s.n_dead_tup, 1) AS ratio
          FROM pg_stat_user_tables s
         WHERE s.schemaname = 'keel'
         ORDER BY s.relname
    LOOP
        v := CASE WHEN r.n_dead_tup >= 10000 THEN r.ratio ELSE 0 END;
        RETURN QUERY SELECT 'dead_tuples:' || r.relname, keel._health_status('dead_tuple_ratio', v),
            format('%s dead of %s rows; last vacuum %s', r.n_dead_tup, r.n_live_tup + r.n_dead_tup,
                   coalesce(r.vacuumed::text, 'never')),
            CASE WHEN v >= 0.2 THEN 'Autovacuum falls behind: check the xmin horizon, then autovacuum settings for this table.' END,
            r.ratio, keel._health_threshold('dead_tuple_ratio');
    END LOOP;

    -- Maintenance tasks: failing, or not run on schedule.
    FOR r IN
        SELECT t.name, t.every, t.last_run_at, t.last_error, t.enabled,
               (SELECT count(*) FROM keel.task_runs x
                 WHERE x.task = t.name AND x.error IS NOT NULL
                   AND x.started_at > clock_timestamp() - interval '1 hour') AS failures
          FROM keel.tasks t ORDER BY t.name
    LOOP
        RETURN QUERY SELECT 'task:' || r.name,
            CASE WHEN r.failures > 0 OR r.last_error IS NOT NULL THEN 'warn'
                 WHEN r.enabled AND w.running
                      AND coalesce(r.last_run_at, '-infinity') < clock_timestamp() - 3 * r.every - interval '10 seconds'
                 THEN 'warn' ELSE 'ok' END,
            format('%s failed runs in the last hour; last run %s%s', r.failures,
                   coalesce(r.last_run_at::text, 'never'), coalesce('; last error: ' || r.last_error, '')),
            CASE WHEN r.failures > 0 OR r.last_error IS NOT NULL THEN 'See keel.task_runs for its errors.' END,
            r.failures::float8, keel._health_threshold('task_failures');
    END LOOP;

    -- Rate limits: how many denials the last five minutes logged.
    SELECT count(*) INTO v FROM keel.rate_limit_denials d WHERE d.at > clock_timestamp() - interval '5 minutes';
    RETURN QUERY SELECT 'rate_limits:denials', 'ok',
        format('%s denials logged in the last 5 minutes', v), NULL::text, v, NULL::float8;
END
$$;

-- A Prometheus label value: backslash, double quote and newline escaped.
CREATE FUNCTION keel._prom_label(value text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
SET search_path = pg_catalog, pg_temp
AS $$ SELECT replace(replace(replace(value, E'\\', E'\\\\'), '"', E'\\"'), E'\n', E'\\n') $$;

-- One metric family: HELP, TYPE and its samples (labels as a ready text, value).
CREATE FUNCTION keel._prom_family(name text, kind text, help text, labels text[], vals double precision[])
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format(E'# HELP %s %s\n# TYPE %s %s\n', name, help, name, kind)
        || coalesce(string_agg(format(E'%s{%s} %s\n', name, l,
                                      CASE WHEN v IS NULL THEN 'NaN' ELSE v::text END), ''), '')
      FROM unnest(labels, vals) AS u(l, v)
$$;

CREATE FUNCTION keel.metrics()
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL RESTRICTED SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    db text := 'database="' || keel._prom_label(current_database()) || '"';
    w record;
    s record;
    out text := '';
BEGIN
    SELECT * INTO w FROM keel._worker_health();
    SELECT * INTO s FROM keel.worker_status();
    IF NOT w.redis_connected OR w.redis_seen_at < clock_timestamp() - interval '30 seconds' THEN
        -- Not shown stale: no sample rather than the last one.
        w.redis_latency_ms := NULL;
        w.redis_used_memory := NULL;
        w.redis_evicted_keys := NULL;
    END IF;

    out := out || keel._prom_family('keel_worker_up', 'gauge',
        'Whether this database''s pg_keel worker is running (1) or not (0).',
        ARRAY[db], ARRAY[CASE WHEN w.running THEN 1 ELSE 0 END::float8]);
    out := out || keel._prom_family('keel_outbox_dispatched_total', 'counter',
        'Events this database''s worker delivered to Redis since it started.',
        ARRAY[db], ARRAY[s.dispatched_total::float8]);
    out := out || keel._prom_family('keel_outbox_refused_total', 'counter',
        'Events Redis refused (each refusal) since this database''s worker started.',
        ARRAY[db], ARRAY[s.failed_total::float8]);
    out := out || keel._prom_family('keel_redis_connected', 'gauge',
        'Whether the worker holds a connection to Redis.',
        ARRAY[db], ARRAY[CASE WHEN w.redis_connected THEN 1 ELSE 0 END::float8]);
    out := out || keel._prom_family('keel_redis_latency_seconds', 'gauge',
        'Round trip of the worker''s last PING to Redis.',
        CASE WHEN w.redis_latency_ms IS NULL THEN '{}'::text[] ELSE ARRAY[db] END,
        CASE WHEN w.redis_latency_ms IS NULL THEN '{}'::float8[] ELSE ARRAY[w.redis_latency_ms / 1000] END);
    out := out || keel._prom_family('keel_redis_used_memory_bytes', 'gauge',
        'Redis used_memory as the worker last read it.',
        CASE WHEN w.redis_used_memory IS NULL THEN '{}'::text[] ELSE ARRAY[db] END,
        CASE WHEN w.redis_used_memory IS NULL THEN '{}'::float8[] ELSE ARRAY[w.redis_used_memory::float8] END);
    out := out || keel._prom_family('keel_redis_evicted_keys', 'gauge',
        'Keys Redis evicted since it started, as the worker last read it.',
        CASE WHEN w.redis_evicted_keys IS NULL THEN '{}'::text[] ELSE ARRAY[db] END,
        CASE WHEN w.redis_evicted_keys IS NULL THEN '{}'::float8[] ELSE ARRAY[w.redis_evicted_keys::float8] END);

    -- Queues: keel.queue_stats read once (it scans keel.jobs) for all four families.
    out := out || (
        WITH q AS MATERIALIZED (SELECT * FROM keel.queue_stats),
             l AS (SELECT q.*, format('%s,queue="%s"', db, keel._prom_label(q.queue)) AS labels FROM q)
        SELECT (SELECT keel._prom_family('keel_queue_jobs', 'gauge',
                   'Jobs per queue and state (ready: claimable now; scheduled: waiting for a delay or backoff; expired_leases: running past their lease).',
                   coalesce(array_agg(format('%s,state="%s"', l.labels, x.state) ORDER BY l.queue, x.state), '{}'),
                   coalesce(array_agg(x.n ORDER BY l.queue, x.state), '{}'))
                  FROM l, LATERAL (VALUES ('ready', l.ready::float8), ('scheduled', l.scheduled::float8),
                                          ('running', l.running::float8), ('expired_leases', l.expired_leases::float8),
                                          ('dead', l.dead::float8), ('done', l.done::float8),
                                          ('cancelled', l.cancelled::float8)) AS x(state, n))
            || keel._prom_family('keel_queue_oldest_ready_seconds', 'gauge',
                   'Age of the oldest claimable job per queue (0 when none).',
                   coalesce((SELECT array_agg(l.labels ORDER BY l.queue) FROM l), '{}'),
                   coalesce((SELECT array_agg(coalesce(extract(epoch FROM l.oldest_ready_age), 0)::float8 ORDER BY l.queue) FROM l), '{}'))
            || keel._prom_family('keel_queue_enqueued_total', 'counter',
                   'Jobs enqueued per queue since the server started.',
                   coalesce((SELECT array_agg(l.labels ORDER BY l.queue) FROM l WHERE w.preloaded), '{}'),
                   coalesce((SELECT array_agg(coalesce(l.enqueued_total, 0)::float8 ORDER BY l.queue) FROM l WHERE w.preloaded), '{}'))
            || keel._prom_family('keel_queue_completed_total', 'counter',
                   'Jobs acked per queue since the server started.',
                   coalesce((SELECT array_agg(l.labels ORDER BY l.queue) FROM l WHERE w.preloaded), '{}'),
                   coalesce((SELECT array_agg(coalesce(l.completed_total, 0)::float8 ORDER BY l.queue) FROM l WHERE w.preloaded), '{}')));

    -- Outbox: keel.outbox_stats read once for both families.
    out := out || (
        WITH o AS MATERIALIZED (SELECT * FROM keel.outbox_stats),
             l AS (SELECT o.*, format('%s,topic="%s"', db, keel._prom_label(o.topic)) AS labels FROM o)
        SELECT (SELECT keel._prom_family('keel_outbox_events', 'gauge',
                   'Outbox events per topic waiting for Redis (pending) or given up on (dead).',
                   coalesce(array_agg(format('%s,state="%s"', l.labels, x.state) ORDER BY l.topic, x.state), '{}'),
                   coalesce(array_agg(x.n ORDER BY l.topic, x.state), '{}'))
                  FROM l, LATERAL (VALUES ('pending', l.pending::float8), ('dead', l.dead::float8)) AS x(state, n))
            || keel._prom_family('keel_outbox_oldest_pending_seconds', 'gauge',
                   'Age of the oldest event per topic not yet in Redis (0 when none).',
                   coalesce((SELECT array_agg(l.labels ORDER BY l.topic) FROM l), '{}'),
                   coalesce((SELECT array_agg(coalesce(extract(epoch FROM l.oldest_pending_age), 0)::float8 ORDER BY l.topic) FROM l), '{}')));

    -- Rate limits.
    -- Denials, and apart from them the calls of policies in shadow mode that enforcing would
    -- have denied (they were allowed: an alert on denials must not see them).
    out := out || (SELECT keel._prom_family('keel_rate_limit_denials_5m', 'gauge',
            'Denials logged per policy in the last five minutes.',
            coalesce(array_agg(format('%s,policy="%s"', db, keel._prom_label(d.policy)) ORDER BY d.policy), '{}'),
            coalesce(array_agg(d.n ORDER BY d.policy), '{}'))
        FROM (SELECT policy, count(*)::float8 AS n FROM keel.rate_limit_denials
               WHERE at > clock_timestamp() - interval '5 minutes' AND NOT shadow
               GROUP BY policy) d);
    out := out || (SELECT keel._prom_family('keel_rate_limit_shadow_denials_5m', 'gauge',
            'Calls of policies in shadow mode (enforce false) that enforcing would have denied, per policy, in the last five minutes.',
            coalesce(array_agg(format('%s,policy="%s"', db, keel._prom_label(d.policy)) ORDER BY d.policy), '{}'),
            coalesce(array_agg(d.n ORDER BY d.policy), '{}'))
        FROM (SELECT policy, count(*)::float8 AS n FROM keel.rate_limit_denials
               WHERE at > clock_timestamp() - interval '5 minutes' AND shadow
               GROUP BY policy) d);
    -- keel's tables as the statistics have them (no scan: cheap to scrape often).
    out := out || (SELECT keel._prom_family('keel_table_rows', 'gauge',
            'Live and dead rows of keel''s tables (pg_stat_user_tables).',
            coalesce(array_agg(format('%s,table="%s",kind="%s"', db, keel._prom_label(t.relname), x.kind) ORDER BY t.relname, x.kind), '{}'),
            coalesce(array_agg(x.n ORDER BY t.relname, x.kind), '{}'))
        FROM pg_stat_user_tables t,
             LATERAL (VALUES ('live', t.n_live_tup::float8), ('dead', t.n_dead_tup::float8)) AS x(kind, n)
       WHERE t.schemaname = 'keel');

    -- Maintenance tasks.
    out := out || (SELECT keel._prom_family('keel_task_last_duration_seconds', 'gauge',
            'How long the last run of each maintenance task took.',
            coalesce(array_agg(format('%s,task="%s"', db, keel._prom_label(t.name)) ORDER BY t.name), '{}'),
            coalesce(array_agg(extract(epoch FROM t.last_duration)::float8 ORDER BY t.name), '{}'))
        FROM keel.tasks t WHERE t.last_duration IS NOT NULL);
    out := out || (SELECT keel._prom_family('keel_task_failed_runs', 'gauge',
            'Runs of each maintenance task that failed, within keel.task_run_retention.',
            coalesce(array_agg(format('%s,task="%s"', db, keel._prom_label(t.name)) ORDER BY t.name), '{}'),
            coalesce(array_agg((SELECT count(*) FROM keel.task_runs r
                                 WHERE r.task = t.name AND r.error IS NOT NULL)::float8 ORDER BY t.name), '{}'))
        FROM keel.tasks t);

    -- Every health check: 0 ok, 1 warn, 2 critical.
    out := out || (SELECT keel._prom_family('keel_health_status', 'gauge',
            'keel.health(): 0 ok, 1 warn, 2 critical, per check.',
            coalesce(array_agg(format('%s,check="%s"', db, keel._prom_label(h."check")) ORDER BY h."check"), '{}'),
            coalesce(array_agg(CASE h.status WHEN 'ok' THEN 0 WHEN 'warn' THEN 1 ELSE 2 END::float8 ORDER BY h."check"), '{}'))
        FROM keel.health() h);
    RETURN out;
END
$$;
