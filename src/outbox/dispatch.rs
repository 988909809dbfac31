//! The dispatcher, run by the background worker: read a batch of committed pending events in
//! one short transaction, send it to Redis with no transaction open, record the outcome in a
//! second short transaction. Redis down, slow or refusing: rows stay pending with last_error,
//! and the dispatcher backs off exponentially until Redis answers again.
//!
//! While Redis runs one batch, the dispatcher reads the next (ids above the batch in flight)
//! and, once the first is answered, sends it before recording the first: Postgres and Redis
//! work at the same time. That next batch is only used when the batch in flight is the whole
//! of what is pending below it (checked in the same snapshot): an event committed late, with
//! a lower id, is never passed over, and events of one aggregate keep their order.

use std::time::{Duration, Instant};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use super::entry::{Event, Route};
use super::redis_target::{scrub, Outcome, RedisTarget};
use super::resp::{self, redact_url, Address};
use crate::guc;
use crate::shmem::put_str;
use crate::spi_plans::{execute, param};
use crate::worker::{process, registry};

/// Longest wait when there is nothing to do (new work usually wakes the latch at once).
pub const IDLE_NAP: Duration = Duration::from_secs(1);
/// How often a busy dispatcher re-checks that pg_keel is installed.
const INSTALLED_CHECK: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// How often the dispatcher reads Redis' INFO for keel.health() (between batches only).
const REDIS_INFO_EVERY: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

const INSTALLED: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_keel')
       AND pg_catalog.to_regclass('keel.outbox_instance') IS NOT NULL
       AND pg_catalog.to_regclass('keel.tasks') IS NOT NULL";

/// Whether pg_keel is installed (and complete) in this database; in a transaction of its own.
pub fn installed() -> bool {
    BackgroundWorker::transaction(|| {
        Spi::connect_mut(|_| execute(INSTALLED, &[]).get::<bool>(0, 1) == Some(true))
    })
}

/// Records that this worker dispatches to `server` (a Redis and its logical database) with
/// `prefix`, unless another database's worker already does: then returns that database's name,
/// and this one must not dispatch (two applications would share streams by accident).
fn claim_destination(server: &str, prefix: &str) -> Option<String> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (server, prefix).hash(&mut h);
    let other = process::claim_destination(h.finish() | 1)?;
    let name = BackgroundWorker::transaction(|| crate::catalog::database_name(other));
    Some(name.unwrap_or_else(|| format!("with oid {}", other.to_u32())))
}

/// Host, port and logical database of a Redis URL, without credentials, as one key: the
/// same Redis under any of its names (the host resolved to its lowest address), stable while
/// Redis restarts or is down. A unix socket is its path. An unparsable URL is itself (its
/// connection fails anyway).
fn server_of(url: &str) -> String {
    use std::net::ToSocketAddrs;
    let Ok(parsed) = resp::parse_url(url) else {
        return redact_url(url);
    };
    let address = match parsed.address {
        Address::Tcp { host, port } => {
            let host = host.to_ascii_lowercase();
            (host.as_str(), port)
                .to_socket_addrs()
                .ok()
                .and_then(|addrs| addrs.map(|a| a.to_string()).min())
                .unwrap_or_else(|| format!("{host}:{port}"))
        }
        Address::Unix(path) => format!("unix:{}", path.display()),
    };
    format!("{address}/{}", parsed.db)
}

/// Asked only once INSTALLED said yes (the table is named in the statement).
const EPOCH: &str = "SELECT epoch FROM keel.outbox_instance";

/// Pending events above id $2, in id order, and, from the same snapshot, the lowest pending id
/// and how many pending events there are from id $3 to $2.
///
/// Shaped for the work list's churn: every lookup is a bounded index scan (counting from the
/// start of the work list would walk every event delivered since the last vacuum); each event
/// is fetched by id in a nested loop (the LIMIT in the lateral subquery keeps the planner from
/// a merge join that would read the events table from its first row); and the scans from the
/// start of the work list read a heap column (`attempts`) on purpose, because a plain index
/// scan marks the entries of delivered events dead as it passes them so the next scan skips
/// them, which an index-only scan does not do.
///
/// A round is bounded in bytes as well as in events: only the events whose predecessors in
/// the round hold fewer than $4 bytes (payload and headers, detoasted, read from their
/// headers) are returned, so a round always has at least one event and never much more than
/// $4 bytes in this process (each event is itself bounded by keel.max_payload_bytes at emit).
const FETCH: &str =
    "SELECT (SELECT b.id FROM keel.outbox_pending b WHERE b.attempts >= 0 ORDER BY b.id LIMIT 1),
           (SELECT count(*) FROM keel.outbox_pending b WHERE b.id >= $3 AND b.id <= $2),
           e.id, e.topic, e.aggregate_id, e.version, e.payload::text, e.headers::text,
           to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           e.replays, r.target, r.redis_key, r.maxlen
      FROM (SELECT s.*, sum(s.size) OVER (ORDER BY s.id) - s.size AS before
              FROM (SELECT x.*, keel._raw_bytes(x.payload) + coalesce(keel._raw_bytes(x.headers), 0) AS size
                      FROM (SELECT p.id FROM keel.outbox_pending p
                             WHERE p.id > $2 AND p.attempts >= 0
                             ORDER BY p.id LIMIT $1) p
                     CROSS JOIN LATERAL (SELECT * FROM keel.outbox_events x WHERE x.id = p.id LIMIT 1) x) s) e
      LEFT JOIN keel.outbox_routes r ON r.topic = e.topic
     WHERE e.before < $4
     ORDER BY e.id";

/// The bytes of events one dispatch round reads at most (beyond its first event).
pub const MAX_ROUND_BYTES: i64 = 16 * 1024 * 1024;

const MARK_DELIVERED: &str = "DELETE FROM keel.outbox_pending WHERE id = ANY ($1)";

const MARK_TOPICS: &str = "INSERT INTO keel.outbox_topics AS t (topic, last_dispatched_at)
     SELECT topic, clock_timestamp() FROM unnest($1::text[]) AS u(topic)
     ON CONFLICT (topic) DO UPDATE SET last_dispatched_at = excluded.last_dispatched_at";

/// Dead after this refusal: moved from the work list to keel.outbox_dead.
const MARK_DEAD: &str = "WITH gone AS (
        DELETE FROM keel.outbox_pending WHERE id = $1 AND attempts + 1 >= $3
        RETURNING id, attempts + 1 AS attempts)
     INSERT INTO keel.outbox_dead (id, attempts, last_error)
     SELECT id, attempts, $2 FROM gone
     ON CONFLICT (id) DO NOTHING";

const MARK_REFUSED: &str = "UPDATE keel.outbox_pending
       SET attempts = attempts + 1, last_error = $2
     WHERE id = $1";

/// Notes why events wait. Best effort: rows someone else holds are skipped, so that a user's
/// lock on an event never keeps the worker waiting just to write an error (it waits only to
/// delete what it delivered).
const MARK_WAITING: &str = "UPDATE keel.outbox_pending p SET last_error = $2
      FROM (SELECT id FROM keel.outbox_pending WHERE id = ANY ($1) FOR UPDATE SKIP LOCKED) l
     WHERE p.id = l.id";

/// A batch sent to Redis whose answer has not been read yet.
/// How a step of a round ends it early: the nap until the next round.
type Step<T> = Result<T, Duration>;

struct InFlight {
    events: Vec<Event>,
}

impl InFlight {
    fn low(&self) -> i64 {
        self.events.first().map_or(0, |e| e.id)
    }

    fn high(&self) -> i64 {
        self.events.last().map_or(0, |e| e.id)
    }
}

pub struct Dispatcher {
    /// Whether pg_keel was installed in this database at the last look, and when that was.
    installed: bool,
    checked_at: Option<Instant>,
    target: Option<RedisTarget>,
    backoff: Duration,
    retry_at: Option<Instant>,
    in_flight: Option<InFlight>,
    /// keel.outbox_instance.epoch: part of every Redis dedupe key.
    epoch: String,
    /// keel.redis_prefix: the key of a topic without a route is `<prefix><topic>`.
    prefix: String,
    /// Another database already dispatches to this Redis with this prefix: its name.
    shared_with: Option<String>,
    /// When Redis' INFO was last read.
    info_at: Option<Instant>,
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
            in_flight: None,
            epoch: String::new(),
            prefix: String::new(),
            shared_with: None,
            info_at: None,
        }
    }

    pub fn installed(&self) -> bool {
        self.installed
    }

    fn set_state(&self, state: &str) {
        let connected = self.target.as_ref().is_some_and(|t| t.is_connected());
        process::with_status(|w| {
            registry::set_state(w, state);
            w.redis_connected = connected;
        });
    }

    fn record_error(&self, message: &str) {
        let connected = self.target.as_ref().is_some_and(|t| t.is_connected());
        process::with_status(|w| {
            put_str(&mut w.last_error, message);
            w.last_error_at = crate::pgtime::now_micros();
            w.redis_connected = connected;
        });
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
        let nap = self.round();
        if self.in_flight.is_some() && nap > Duration::ZERO {
            // Never leave an answer unread on the connection while sleeping.
            self.abandon_in_flight();
        }
        nap
    }

    /// Checks again that no other database dispatches to the same Redis (its address and
    /// logical database, see `server_of`) with the same prefix — from the URL alone, so the
    /// answer does not depend on Redis being up — and reads Redis' figures for keel.health().
    /// Only between batches: nothing may be unread on the connection.
    fn refresh_info(&mut self, url: &str) {
        self.info_at = Some(Instant::now());
        self.shared_with = claim_destination(&server_of(url), &self.prefix);
        let Some(target) = self.target.as_mut() else {
            return;
        };
        let Ok(latency) = target.ping() else {
            return; // unreachable: nothing is sent either
        };
        let info = target.info().unwrap_or_default();
        process::with_status(|w| {
            let r = &mut w.redis;
            r.at = crate::pgtime::now_micros();
            r.latency_us = latency.as_micros() as i64;
            r.used_memory = info.used_memory;
            r.maxmemory = info.maxmemory;
            r.evicted_keys = info.evicted_keys;
            put_str(&mut r.role, &info.role);
            put_str(&mut r.maxmemory_policy, &info.maxmemory_policy);
        });
    }

    /// Forgets the batch in flight: its events are still pending and go again (Redis' dedupe
    /// check drops any it already appended). The connection is dropped with its unread answer.
    fn abandon_in_flight(&mut self) {
        if self.in_flight.take().is_some() {
            if let Some(t) = self.target.as_mut() {
                t.disconnect();
            }
        }
    }

    /// One round: the checks that may idle the worker, then one batch: the batch in flight
    /// (or a new one), the next one fetched while Redis works on it and sent as soon as that
    /// one came back clean, then its outcome recorded. Returns how long to nap.
    fn round(&mut self) -> Duration {
        match self.try_round() {
            Ok(nap) | Err(nap) => nap,
        }
    }

    fn try_round(&mut self) -> Step<Duration> {
        self.check_installed()?;
        let url = self.redis_target()?;
        self.wait_for_retry()?;
        let limit = guc::DISPATCH_BATCH_SIZE.get();
        let ttl = i64::from(guc::OUTBOX_RETENTION.get());
        let t0 = Instant::now();
        let current = self.take_batch(limit, ttl, &url)?;
        self.set_state("dispatching");
        let next = self.fetch_next(&current, limit);
        let t_fetch = t0.elapsed();
        let t1 = Instant::now();
        let outcomes = self.receive(&current, &url)?;
        let t_send = t1.elapsed();
        let next_failed = self.send_next_early(&outcomes, next, ttl);
        Ok(self.record_outcome(&current, &outcomes, next_failed, &url, (t_fetch, t_send)))
    }

    /// Whether pg_keel is installed in this database, and the outbox's epoch: looked up at
    /// most once per INSTALLED_CHECK, not on every busy round (a DROP EXTENSION in between
    /// makes the next statement fail; the worker then restarts).
    fn check_installed(&mut self) -> Step<()> {
        if self
            .checked_at
            .is_none_or(|at| at.elapsed() >= INSTALLED_CHECK)
        {
            let epoch = BackgroundWorker::transaction(|| {
                Spi::connect_mut(|_| {
                    let installed = execute(INSTALLED, &[]).get::<bool>(0, 1);
                    if installed == Some(true) {
                        execute(EPOCH, &[]).get::<String>(0, 1)
                    } else {
                        None
                    }
                })
            });
            self.installed = epoch.is_some();
            if let Some(epoch) = epoch {
                self.epoch = epoch;
            }
            self.checked_at = Some(Instant::now());
        }
        if !self.installed {
            self.set_state(
                "idle: pg_keel is not installed in this database (CREATE EXTENSION pg_keel)",
            );
            return Err(IDLE_NAP);
        }
        Ok(())
    }

    /// The Redis URL to dispatch to, with a target made anew when the settings moved it;
    /// idle while dispatch is off, the prefix is unusable, or another database dispatches to
    /// this destination.
    fn redis_target(&mut self) -> Step<String> {
        let url = guc::REDIS_URL
            .get()
            .map(|u| u.to_string_lossy().into_owned())
            .unwrap_or_default();
        if url.is_empty() {
            self.abandon_in_flight();
            self.target = None;
            self.set_state("idle: dispatch disabled (keel.redis_url is empty)");
            return Err(IDLE_NAP);
        }
        let prefix = guc::redis_prefix();
        if prefix.contains('#') {
            self.abandon_in_flight();
            self.set_state(
                "not dispatching: keel.redis_prefix must not contain '#' (pg_keel's own keys start \
                 with keel#); set another one and terminate this worker",
            );
            return Err(IDLE_NAP);
        }
        if self.target.as_ref().is_none_or(|t| t.url() != url) || self.prefix != prefix {
            self.retarget(&url, prefix);
        }
        if self.in_flight.is_none()
            && self
                .info_at
                .is_none_or(|at| at.elapsed() >= REDIS_INFO_EVERY)
        {
            self.refresh_info(&url);
        }
        self.refuse_shared()?;
        Ok(url)
    }

    /// First start, or SIGHUP moved us to another Redis (or prefix): a new target, and
    /// nothing learnt about the old one carries over.
    fn retarget(&mut self, url: &str, prefix: String) {
        self.abandon_in_flight();
        self.target = Some(RedisTarget::new(url));
        self.prefix = prefix;
        self.backoff = BACKOFF_MIN;
        self.retry_at = None;
        self.info_at = None;
        self.shared_with = None;
        let shown = redact_url(url);
        process::with_status(|w| put_str(&mut w.redis_target, &shown));
    }

    /// Idle while another database dispatches to the same Redis and prefix.
    fn refuse_shared(&mut self) -> Step<()> {
        let Some(other) = self.shared_with.clone() else {
            return Ok(());
        };
        self.abandon_in_flight();
        self.set_state(&format!(
            "not dispatching: database \"{other}\" dispatches to this Redis with keel.redis_prefix \
             '{}' already; give one of them another prefix (ALTER DATABASE ... SET \
             keel.redis_prefix) and terminate its worker",
            self.prefix
        ));
        Err(IDLE_NAP)
    }

    /// Backing off: nap until the retry is due.
    fn wait_for_retry(&self) -> Step<()> {
        let now = Instant::now();
        match self.retry_at {
            Some(at) if at > now => Err(at - now),
            _ => Ok(()),
        }
    }

    /// The batch to finish this round: the one sent early last round, or a new one fetched
    /// and sent now. Nothing pending: idle.
    fn take_batch(&mut self, limit: i32, ttl: i64, url: &str) -> Step<InFlight> {
        if let Some(batch) = self.in_flight.take() {
            return Ok(batch);
        }
        let (events, _) = BackgroundWorker::transaction(|| {
            Spi::connect_mut(|_| fetch(limit, 0, 0, &self.prefix))
        });
        if events.is_empty() {
            return Err(self.idle(url));
        }
        let Some(target) = self.target.as_mut() else {
            return Err(IDLE_NAP);
        };
        if let Err(e) = target.send(&events, &self.epoch, ttl) {
            return Err(self.unreachable(&events, &e, url));
        }
        Ok(InFlight { events })
    }

    /// While Redis works on `current`: the next batch, if it may go right after it (nothing
    /// pending below the batch in flight, nothing between its ids but itself); else none.
    fn fetch_next(&self, current: &InFlight, limit: i32) -> Vec<Event> {
        let prefix = self.prefix.as_str();
        let (next, (lowest, in_range)) = BackgroundWorker::transaction(|| {
            Spi::connect_mut(|_| fetch(limit, current.high(), current.low(), prefix))
        });
        if lowest == current.low() && in_range == current.events.len() as i64 {
            next
        } else {
            Vec::new()
        }
    }

    /// Redis' answer for each event of `current`.
    fn receive(&mut self, current: &InFlight, url: &str) -> Step<Vec<Outcome>> {
        let Some(target) = self.target.as_mut() else {
            return Err(IDLE_NAP);
        };
        match target.receive(current.events.len()) {
            Ok(outcomes) => Ok(outcomes),
            Err(e) => Err(self.unreachable(&current.events, &e, url)),
        }
    }

    /// Sends `next` before `current` is recorded, but only after a batch Redis fully took;
    /// it becomes the batch in flight. A send that failed comes back, to be reported once the
    /// current batch is recorded.
    fn send_next_early(
        &mut self,
        outcomes: &[Outcome],
        next: Vec<Event>,
        ttl: i64,
    ) -> Option<(Vec<Event>, String)> {
        let clean = !outcomes.iter().any(|o| matches!(o, Outcome::Transient(_)));
        if !clean || next.is_empty() {
            return None;
        }
        let target = self.target.as_mut()?;
        match target.send(&next, &self.epoch, ttl) {
            Ok(()) => {
                self.in_flight = Some(InFlight { events: next });
                None
            }
            Err(e) => Some((next, e)),
        }
    }

    /// Records what Redis did with `current` (and the worker's counters), then how long to
    /// nap: none after a clean batch, the backoff after a refusal to write.
    fn record_outcome(
        &mut self,
        current: &InFlight,
        outcomes: &[Outcome],
        next_failed: Option<(Vec<Event>, String)>,
        url: &str,
        (t_fetch, t_send): (Duration, Duration),
    ) -> Duration {
        let t2 = Instant::now();
        let summary = record(&current.events, outcomes, url);
        debug1!(
            "pg_keel dispatch: {} events, fetch {:?}, wait for redis {:?}, record {:?}, next {}",
            current.events.len(),
            t_fetch,
            t_send,
            t2.elapsed(),
            self.in_flight.as_ref().map_or(0, |b| b.events.len())
        );
        process::with_status(|w| {
            w.dispatched_total += summary.delivered;
            w.failed_total += summary.refused;
            if summary.delivered > 0 {
                w.last_dispatch_at = crate::pgtime::now_micros();
            }
        });
        if let Some((events, e)) = next_failed {
            return self.unreachable(&events, &e, url);
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

    /// Nothing pending: keep a live connection honest, and notice Redis coming back.
    fn idle(&mut self, url: &str) -> Duration {
        let ping = self.target.as_mut().map(|t| t.ping());
        if let Some(Err(e)) = ping {
            let nap = self.fail(&format!("redis unreachable: {}", scrub(&e, url)));
            self.set_state("backing off: redis unreachable");
            return nap.min(IDLE_NAP);
        }
        self.set_state("idle: nothing pending");
        IDLE_NAP
    }

    /// The batch as a whole failed (no connection, timeout): its events wait with the error.
    fn unreachable(&mut self, events: &[Event], error: &str, url: &str) -> Duration {
        self.abandon_in_flight();
        let message = format!("redis: {}", scrub(error, url));
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        BackgroundWorker::transaction(|| {
            Spi::connect_mut(|_| execute(MARK_WAITING, &[param(ids), param(message.as_str())]))
        });
        let nap = self.fail(&message);
        self.set_state("backing off: redis unreachable");
        nap
    }
}

/// Up to `limit` pending events above id `after`; with them, from the same snapshot, the lowest
/// pending id and the number of pending events from `low` to `after`.
fn fetch(limit: i32, after: i64, low: i64, prefix: &str) -> (Vec<Event>, (i64, i64)) {
    let rows = execute(
        FETCH,
        &[
            param(limit),
            param(after),
            param(low),
            param(MAX_ROUND_BYTES),
        ],
    );
    let seen = if rows.is_empty() {
        (0, 0)
    } else {
        (
            rows.get::<i64>(0, 1).unwrap_or(0),
            rows.get::<i64>(0, 2).unwrap_or(0),
        )
    };
    let events = (0..rows.len())
        .filter_map(|i| {
            let topic: String = rows.get(i, 4)?;
            let route = Route::resolve(
                &topic,
                prefix,
                rows.get::<String>(i, 11).as_deref(),
                rows.get(i, 12),
                rows.get(i, 13),
            );
            Some(Event {
                id: rows.get(i, 3)?,
                topic,
                aggregate_id: rows.get(i, 5),
                version: rows.get(i, 6),
                payload: rows.get(i, 7)?,
                headers: rows.get(i, 8),
                created_at: rows.get(i, 9)?,
                replays: rows.get(i, 10)?,
                route,
            })
        })
        .collect();
    (events, seen)
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
    let mut topics: Vec<&str> = Vec::new();
    let mut waiting = Vec::new();
    let mut refused = Vec::new();
    for (event, outcome) in events.iter().zip(outcomes) {
        match outcome {
            Outcome::Delivered => {
                delivered.push(event.id);
                if !topics.contains(&event.topic.as_str()) {
                    topics.push(&event.topic);
                }
            }
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
    let topics: Vec<String> = topics.into_iter().map(String::from).collect();
    let max_attempts = guc::OUTBOX_MAX_ATTEMPTS.get();
    let transient = summary.transient.clone();
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|_| {
            if !delivered.is_empty() {
                execute(MARK_DELIVERED, &[param(delivered)]);
                execute(MARK_TOPICS, &[param(topics)]);
            }
            if let (false, Some(message)) = (waiting.is_empty(), transient) {
                execute(MARK_WAITING, &[param(waiting), param(message.as_str())]);
            }
            for (id, message) in refused {
                let args = [param(id), param(message.as_str()), param(max_attempts)];
                execute(MARK_DEAD, &args);
                execute(MARK_REFUSED, &args[..2]);
            }
        })
    });
    summary
}

#[cfg(test)]
mod tests {
    use super::server_of;

    #[test]
    fn one_redis_by_any_of_its_names() {
        assert_eq!(
            server_of("redis://127.0.0.1:6379/0"),
            server_of("redis://localhost:6379")
        );
        assert_eq!(
            server_of("redis://:secret@127.0.0.1:6379/2"),
            "127.0.0.1:6379/2"
        );
        assert_eq!(server_of("redis://127.0.0.1"), "127.0.0.1:6379/0");
        assert_ne!(server_of("redis://h:6379/1"), server_of("redis://h:6379/2"));
        assert_eq!(
            server_of("rediss://app@127.0.0.1:6380/3"),
            "127.0.0.1:6380/3"
        );
        assert_eq!(
            server_of("redis+unix:///run/redis.sock?db=2&pass=secret"),
            "unix:/run/redis.sock/2"
        );
        assert!(!server_of("redis://u:secret@h:notaport").contains("secret"));
    }
}
