//! The dispatcher, run by the background worker: read a batch of committed pending events in
//! one short transaction, send it to Redis with no transaction open, record the outcome in a
//! second short transaction. Redis down, slow or refusing: rows stay pending with last_error,
//! and the dispatcher backs off exponentially until Redis answers again.

use std::time::{Duration, Instant};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use super::entry::{redact_url, scrub, Event, Route};
use super::redis_target::{Outcome, RedisTarget};
use crate::guc;
use crate::shmem::{self, get_str, put_str};
use crate::spi_plans::{execute, param};

/// Longest wait when there is nothing to do (new work usually wakes the latch at once).
pub const IDLE_NAP: Duration = Duration::from_secs(1);
/// How often a busy dispatcher re-checks that pg_keel is installed.
const INSTALLED_CHECK: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

const INSTALLED: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_keel')
       AND pg_catalog.to_regclass('keel.outbox') IS NOT NULL
       AND pg_catalog.to_regclass('keel.tasks') IS NOT NULL";

const FETCH: &str =
    "SELECT o.id, o.topic, o.aggregate_id, o.version, o.payload::text, o.headers::text,
           to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           o.replays, r.target, r.redis_key, r.maxlen
      FROM keel.outbox o LEFT JOIN keel.outbox_routes r ON r.topic = o.topic
     WHERE o.state = 'pending'
     ORDER BY o.id
     LIMIT $1";

const MARK_DELIVERED: &str = "UPDATE keel.outbox
       SET state = 'dispatched', dispatched_at = clock_timestamp(), last_error = NULL
     WHERE id = ANY ($1) AND state = 'pending'";

const MARK_REFUSED: &str = "UPDATE keel.outbox
       SET attempts = attempts + 1, last_error = $2,
           state = CASE WHEN attempts + 1 >= $3 THEN 'dead' ELSE 'pending' END
     WHERE id = $1 AND state = 'pending'";

const MARK_WAITING: &str =
    "UPDATE keel.outbox SET last_error = $2 WHERE id = ANY ($1) AND state = 'pending'";

pub struct Dispatcher {
    /// Whether pg_keel was installed in this database at the last look, and when that was.
    installed: bool,
    checked_at: Option<Instant>,
    target: Option<RedisTarget>,
    backoff: Duration,
    retry_at: Option<Instant>,
}

impl Default for Dispatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Dispatcher {
    pub fn new() -> Dispatcher {
        Dispatcher {
            installed: false,
            checked_at: None,
            target: None,
            backoff: BACKOFF_MIN,
            retry_at: None,
        }
    }

    pub fn installed(&self) -> bool {
        self.installed
    }

    fn set_state(&self, state: &str) {
        let mut w = shmem::WORKER.exclusive();
        if get_str(&w.state) != state {
            put_str(&mut w.state, state);
        }
        w.redis_connected = self.target.as_ref().is_some_and(|t| t.is_connected());
    }

    fn record_error(&self, message: &str) {
        let mut w = shmem::WORKER.exclusive();
        put_str(&mut w.last_error, message);
        w.last_error_at = unsafe { pg_sys::GetCurrentTimestamp() };
        w.redis_connected = self.target.as_ref().is_some_and(|t| t.is_connected());
    }

    fn fail(&mut self, message: &str) -> Duration {
        self.record_error(message);
        let nap = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.retry_at = Some(Instant::now() + nap);
        nap
    }

    /// One round of work; returns how long to sleep before the next (zero: more to do).
    pub fn tick(&mut self) -> Duration {
        if unsafe { pg_sys::RecoveryInProgress() } {
            self.installed = false;
            self.checked_at = None;
            self.set_state("idle: server is in recovery (standby)");
            return IDLE_NAP;
        }
        // Look again at most once per INSTALLED_CHECK, not on every busy round. (A DROP
        // EXTENSION in between makes the next statement fail; the worker then restarts.)
        if self
            .checked_at
            .is_none_or(|at| at.elapsed() >= INSTALLED_CHECK)
        {
            self.installed = BackgroundWorker::transaction(|| {
                Spi::connect_mut(|_| execute(INSTALLED, &[]).get::<bool>(0, 1).unwrap_or(false))
            });
            self.checked_at = Some(Instant::now());
        }
        if !self.installed {
            self.set_state(
                "idle: pg_keel is not installed in this database (CREATE EXTENSION pg_keel)",
            );
            return IDLE_NAP;
        }
        let url = guc::REDIS_URL
            .get()
            .map(|u| u.to_string_lossy().into_owned())
            .unwrap_or_default();
        if url.is_empty() {
            self.target = None;
            self.set_state("idle: dispatch disabled (keel.redis_url is empty)");
            return IDLE_NAP;
        }
        if self.target.as_ref().is_none_or(|t| t.url() != url) {
            // First start, or SIGHUP moved us to another Redis.
            self.target = Some(RedisTarget::new(&url));
            self.backoff = BACKOFF_MIN;
            self.retry_at = None;
            put_str(
                &mut shmem::WORKER.exclusive().redis_target,
                &redact_url(&url),
            );
        }
        if let Some(at) = self.retry_at {
            let now = Instant::now();
            if at > now {
                return at - now;
            }
        }
        let limit = guc::DISPATCH_BATCH_SIZE.get();
        let t0 = Instant::now();
        let events = BackgroundWorker::transaction(|| Spi::connect_mut(|_| fetch(limit)));
        let t_fetch = t0.elapsed();
        if events.is_empty() {
            // Keep a live connection honest while idle, and notice Redis coming back.
            let ping = self.target.as_mut().map(|t| t.ping());
            if let Some(Err(e)) = ping {
                let nap = self.fail(&format!("redis unreachable: {}", scrub(&e, &url)));
                self.set_state("backing off: redis unreachable");
                return nap.min(IDLE_NAP);
            }
            self.set_state("idle: nothing pending");
            return IDLE_NAP;
        }
        self.set_state("dispatching");
        let ttl = i64::from(guc::OUTBOX_RETENTION.get());
        let Some(target) = self.target.as_mut() else {
            return IDLE_NAP;
        };
        let t1 = Instant::now();
        let sent = target.dispatch(&events, ttl);
        let t_send = t1.elapsed();
        match sent {
            Err(e) => {
                let message = format!("redis: {}", scrub(&e, &url));
                let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
                BackgroundWorker::transaction(|| {
                    Spi::connect_mut(|_| {
                        execute(MARK_WAITING, &[param(ids), param(message.as_str())])
                    })
                });
                let nap = self.fail(&message);
                self.set_state("backing off: redis unreachable");
                nap
            }
            Ok(outcomes) => {
                let t2 = Instant::now();
                let summary = record(&events, &outcomes, &url);
                debug1!(
                    "pg_keel dispatch: {} events, fetch {:?}, send {:?}, record {:?}",
                    events.len(),
                    t_fetch,
                    t_send,
                    t2.elapsed()
                );
                {
                    let mut w = shmem::WORKER.exclusive();
                    w.dispatched_total += summary.delivered;
                    w.failed_total += summary.refused;
                    if summary.delivered > 0 {
                        w.last_dispatch_at = unsafe { pg_sys::GetCurrentTimestamp() };
                    }
                }
                match summary.transient {
                    Some(message) => {
                        let nap = self.fail(&message);
                        self.set_state("backing off: redis refuses writes");
                        nap
                    }
                    None => {
                        if let Some(message) = summary.permanent {
                            self.record_error(&message);
                        }
                        self.backoff = BACKOFF_MIN;
                        self.retry_at = None;
                        Duration::ZERO
                    }
                }
            }
        }
    }
}

fn fetch(limit: i32) -> Vec<Event> {
    let rows = execute(FETCH, &[param(limit)]);
    (0..rows.len())
        .filter_map(|i| {
            let topic: String = rows.get(i, 2)?;
            let route = Route::resolve(
                &topic,
                rows.get::<String>(i, 9).as_deref(),
                rows.get(i, 10),
                rows.get(i, 11),
            );
            Some(Event {
                id: rows.get(i, 1)?,
                topic,
                aggregate_id: rows.get(i, 3),
                version: rows.get(i, 4),
                payload: rows.get(i, 5)?,
                headers: rows.get(i, 6),
                created_at: rows.get(i, 7)?,
                replays: rows.get(i, 8)?,
                route,
            })
        })
        .collect()
}

struct Summary {
    delivered: i64,
    refused: i64,
    /// The last "not now" refusal, if any: back off.
    transient: Option<String>,
    /// The last refusal of an event itself, if any.
    permanent: Option<String>,
}

fn record(events: &[Event], outcomes: &[Outcome], url: &str) -> Summary {
    let mut summary = Summary {
        delivered: 0,
        refused: 0,
        transient: None,
        permanent: None,
    };
    let mut delivered = Vec::new();
    let mut waiting = Vec::new();
    let mut refused = Vec::new();
    for (event, outcome) in events.iter().zip(outcomes) {
        match outcome {
            Outcome::Delivered => delivered.push(event.id),
            Outcome::Transient(e) => {
                waiting.push(event.id);
                summary.transient = Some(format!("redis: {}", scrub(e, url)));
            }
            Outcome::Permanent(e) => {
                let message = format!("redis refused event {}: {}", event.id, scrub(e, url));
                refused.push((event.id, message.clone()));
                summary.permanent = Some(message);
            }
        }
    }
    summary.delivered = delivered.len() as i64;
    summary.refused = refused.len() as i64;
    let max_attempts = guc::OUTBOX_MAX_ATTEMPTS.get();
    let transient = summary.transient.clone();
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|_| {
            if !delivered.is_empty() {
                execute(MARK_DELIVERED, &[param(delivered)]);
            }
            if let (false, Some(message)) = (waiting.is_empty(), transient) {
                execute(MARK_WAITING, &[param(waiting), param(message.as_str())]);
            }
            for (id, message) in refused {
                execute(
                    MARK_REFUSED,
                    &[param(id), param(message.as_str()), param(max_attempts)],
                );
            }
        })
    });
    summary
}
