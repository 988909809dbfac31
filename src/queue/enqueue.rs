//! `keel.enqueue` and `keel.enqueue_batch`: the producer's calls, native like the consumer's.
//!
//! A producer's call is one job in one transaction at a few thousand a second per client, so
//! what the call costs beside its INSERT is what a producer loses to a plain INSERT. Here the
//! common case (no idempotency key, no `max_ready`) takes the queue's shared lock
//! (`locks::lock_queue`: drop_queue waits for enqueues in flight) and inserts the row without
//! SQL (`insert`). The wake-up is left to the relay (`wake`), the counters to commit
//! (`stats`).
//!
//! Each backend remembers for a second which queues exist without `max_ready` (so it need
//! not read the queue's row); drop_queue and alter_queue make every backend look again: they
//! bump a shared generation when they commit, before drop_queue releases the queue's lock, so
//! an enqueue that waited for that lock sees the queue gone. Without shared memory (not
//! preloaded) every enqueue reads the row.
//!
//! `enqueue_batch` the same, its rows inserted one after the other with one executor state. An
//! idempotency key goes through `keel._enqueue_keyed` (sql/queue.sql), which resolves a key
//! already taken or being taken concurrently.
//!
//! SECURITY INVOKER like `claim` (see `crate::auth`): the grant is checked for the caller,
//! then the statements run as pg_keel's owner.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgrx::datum::Array;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, IntoDatum, PgAtomic};

use super::error::QueueError;
use super::{insert, stats, wake};
use crate::error::invalid_argument as invalid;
use crate::error::raise;
use crate::jsonb::RawJsonb;
use crate::pgtime::{check_interval, now_micros, timestamptz};
use crate::spi_plans::{execute, execute_latest, param};
use crate::{auth, guc, locks, names};

/// Bumped when a queue is dropped or altered (commit callback).
// SAFETY: the name is unique among the shared-memory segments of pg_keel (every one is a
// distinct "pg_keel ..." string) and of PostgreSQL itself.
static GENERATION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_keel queue generation") };

/// How long a backend trusts what it remembered about a queue without the generation moving
/// (an UPDATE of keel.queues by hand bumps nothing).
const REMEMBER_FOR: Duration = Duration::from_secs(1);

thread_local! {
    /// Queues seen existing without max_ready: the generation and time they were seen at.
    static PLAIN_QUEUES: RefCell<HashMap<String, (u64, Instant)>> = RefCell::new(HashMap::new());
}

pub fn init() {
    pg_shmem_init!(GENERATION);
}

pub fn bump_generation() {
    if crate::shmem::enabled() {
        GENERATION.get().fetch_add(1, Ordering::AcqRel);
    }
}

pub(super) fn generation() -> Option<u64> {
    crate::shmem::enabled().then(|| GENERATION.get().load(Ordering::Acquire))
}

/// Whether `queue` was seen existing without max_ready, since the last drop or alter.
fn known_plain(queue: &str, now: Option<u64>) -> bool {
    let Some(now) = now else { return false };
    PLAIN_QUEUES.with_borrow(|q| {
        q.get(queue)
            .is_some_and(|(g, at)| *g == now && at.elapsed() < REMEMBER_FOR)
    })
}

fn remember_plain(queue: &str, seen: Option<u64>) {
    let Some(seen) = seen else { return };
    PLAIN_QUEUES.with_borrow_mut(|q| {
        if q.len() >= 1000 {
            q.clear();
        }
        q.insert(queue.to_string(), (seen, Instant::now()));
    });
}

/// A queue was dropped or altered in this transaction: every backend looks again after commit.
#[pg_extern(volatile, parallel_unsafe, name = "_queues_changed")]
fn queues_changed() {
    crate::xact::on_commit(crate::xact::OnCommit::QueuesChanged);
}

const MAX_READY: &str = "SELECT max_ready FROM keel.queues WHERE queue = $1";

/// Ready jobs, counted up to $2 (never reads more index entries than the limit).
const READY_UP_TO: &str = "SELECT count(*) FROM (
    SELECT 1 FROM keel.jobs
     WHERE queue = $1 AND state IN ('ready', 'running') AND state = 'ready'
     LIMIT $2) w";

const ENQUEUE_KEYED: &str = "SELECT keel._enqueue_keyed($1, $2, $3, $4, $5, $6, $7)";
const ENQUEUE_REPLACE: &str = "SELECT keel._enqueue_replace($1, $2, $3, $4, $5, $6, $7)";
/// The idempotency keys of schedules' slots (sql/schedule.sql).
const SCHEDULE_KEY_PREFIX: &str = "schedule:";
/// The longest idempotency key, in bytes (a btree entry must fit in a third of a page).
const MAX_KEY_BYTES: usize = 1024;

/// The checks every enqueue makes before it writes: the queue name (NULL refused), the
/// caller's grant, the delay and the priority.
fn checked_target<'a>(
    queue: Option<&'a str>,
    delay: Option<&Interval>,
    priority: Option<i32>,
) -> (&'a str, i32) {
    let Some(queue) = queue else {
        invalid("queue", "must not be NULL")
    };
    auth::require(auth::Capability::Produce, queue);
    match delay {
        Some(d) if check_interval("delay", d) >= 0 => {}
        _ => invalid("delay", "must be zero or a positive interval"),
    }
    let Some(priority) = priority else {
        invalid("priority", "must not be NULL")
    };
    (queue, priority)
}

pub(crate) fn check_payload_bytes(payload: RawJsonb) {
    let bytes = crate::jsonb::raw_size(payload);
    let limit = guc::MAX_PAYLOAD_BYTES.get();
    if bytes > i64::from(limit) {
        raise(&QueueError::PayloadTooLarge {
            bytes,
            limit: limit.into(),
        })
    }
}

/// No row for `queue`: 22023 for a malformed name, else 42704.
fn unknown(queue: &str) -> ! {
    if let Err(problem) = names::check(queue) {
        raise(&QueueError::InvalidName {
            kind: "queue".into(),
            name: queue.into(),
            problem: problem.to_string(),
        })
    }
    raise(&QueueError::UnknownQueue {
        queue: queue.into(),
    })
}

/// Raises for an unknown queue, or 53400 when `incoming` more ready jobs would pass its
/// `max_ready`; true when it has none (nothing to count next time).
fn check_room(queue: &str, incoming: i64) -> bool {
    // As committed now, whatever this transaction's snapshot: what is remembered from it
    // must hold for the enqueues of later transactions too.
    let settings = execute_latest(MAX_READY, &[param(queue)]);
    if settings.is_empty() {
        unknown(queue)
    }
    if let Some(max_ready) = settings.get::<i64>(0, 1) {
        let waiting = execute(READY_UP_TO, &[param(queue), param(max_ready)])
            .get::<i64>(0, 1)
            .unwrap_or(0);
        if waiting.saturating_add(incoming) > max_ready {
            raise(&QueueError::QueueFull {
                queue: queue.into(),
                max_ready: max_ready.to_string(),
            })
        }
        return false;
    }
    true
}

/// Runs `f` as the owner of keel.jobs with the pinned search_path, inside SPI.
fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    crate::owner::as_owner(crate::owner::of(c"jobs"), || Spi::connect_mut(|_| f()))
}

/// Adds one job to a queue; returns its id (with an idempotency key already taken: the id of
/// that job, and nothing is inserted unless `on_duplicate` is 'replace' and that job still
/// waits, which then takes the new payload, priority and run time).
// Its arguments are the SQL function's, named and defaulted for callers.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe, name = "enqueue")]
fn enqueue_on_duplicate(
    queue: Option<&str>,
    payload: Option<RawJsonb>,
    delay: default!(Option<Interval>, "'0'"),
    priority: default!(Option<i32>, 0),
    idempotency_key: default!(Option<&str>, "NULL"),
    max_attempts: default!(Option<i32>, "NULL"),
    on_duplicate: default!(Option<&str>, "'ignore'"),
    after: default!(Option<Array<i64>>, "NULL"),
    concurrency_key: default!(Option<&str>, "NULL"),
) -> i64 {
    if let Some(key) = concurrency_key {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            invalid(
                "concurrency_key",
                "must be 1 to 1024 bytes (or NULL for none)",
            );
        }
        if idempotency_key.is_some() || after.is_some() {
            raise(&QueueError::NotSupported {
                what: "a concurrency_key together with an idempotency_key or after".into(),
            })
        }
    }
    let after = after.map(|ids| {
        let mut out = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            match id {
                Some(id) => out.push(id),
                None => invalid("after", &format!("element {} is NULL", i + 1)),
            }
        }
        out
    });
    if let Some(ids) = after.as_ref().filter(|ids| !ids.is_empty()) {
        if on_duplicate != Some("ignore") {
            invalid(
                "on_duplicate",
                "must be 'ignore' with after (a job that waits for others has no key to replace)",
            );
        }
        return enqueue_after(
            queue,
            payload,
            delay,
            priority,
            idempotency_key,
            max_attempts,
            ids,
        );
    }
    enqueue_one(
        queue,
        payload,
        delay,
        priority,
        idempotency_key,
        max_attempts,
        on_duplicate,
        concurrency_key,
    )
}

/// The most jobs one job may wait for.
const MAX_AFTER: usize = 10_000;
const ENQUEUE_AFTER: &str = "SELECT keel._enqueue_after($1, $2, $3, $4, $5, $6, $7, $8)";

/// The checks of one job's own arguments (after its queue's, see `checked_target`): its
/// payload (not NULL, within keel.max_payload_bytes) and max_attempts.
fn checked_job(payload: Option<RawJsonb>, max_attempts: Option<i32>) -> RawJsonb {
    let Some(payload) = payload else {
        invalid(
            "payload",
            "must not be NULL (use '{}'::jsonb or 'null'::jsonb)",
        )
    };
    check_payload_bytes(payload);
    if max_attempts.is_some_and(|m| m < 1) {
        invalid(
            "max_attempts",
            "must be at least 1 (or NULL for the queue's setting)",
        );
    }
    payload
}

/// enqueue(..., after => ids): a job that becomes claimable once every job of `ids` is done
/// (sql/queue.sql, keel._enqueue_after and keel.release_dependents).
fn enqueue_after(
    queue: Option<&str>,
    payload: Option<RawJsonb>,
    delay: Option<Interval>,
    priority: Option<i32>,
    idempotency_key: Option<&str>,
    max_attempts: Option<i32>,
    ids: &[i64],
) -> i64 {
    let (queue, priority) = checked_target(queue, delay.as_ref(), priority);
    let payload = checked_job(payload, max_attempts);
    if idempotency_key.is_some() {
        invalid(
            "after",
            "cannot be combined with an idempotency_key (not supported yet)",
        );
    }
    if ids.len() > MAX_AFTER {
        invalid("after", "must list at most 10000 jobs");
    }
    let caller = crate::auth::caller();
    super::floor::writing(Some(queue), Some(priority));
    let now = now_micros();
    let args = [
        param(queue),
        param(payload),
        param(delay),
        param(priority),
        param(max_attempts),
        param(ids.to_vec()),
        param(timestamptz(now)),
        param(caller),
    ];
    as_owner(|| execute(ENQUEUE_AFTER, &args).get::<i64>(0, 1))
        .unwrap_or_else(|| crate::error::internal("enqueue returned no job id"))
}

/// 0.1.0's keel.enqueue, six arguments at the C symbol `enqueue_wrapper`: what a database
/// created at 0.1.0 calls until `ALTER EXTENSION pg_keel UPDATE` (no SQL of its own).
#[pg_extern(volatile, parallel_unsafe, sql = false)]
fn enqueue(
    queue: Option<&str>,
    payload: Option<RawJsonb>,
    delay: Option<Interval>,
    priority: Option<i32>,
    idempotency_key: Option<&str>,
    max_attempts: Option<i32>,
) -> i64 {
    enqueue_one(
        queue,
        payload,
        delay,
        priority,
        idempotency_key,
        max_attempts,
        Some("ignore"),
        None,
    )
}

// The arguments of `keel.enqueue`, passed through as the SQL function takes them.
#[allow(clippy::too_many_arguments)]
fn enqueue_one(
    queue: Option<&str>,
    payload: Option<RawJsonb>,
    delay: Option<Interval>,
    priority: Option<i32>,
    idempotency_key: Option<&str>,
    max_attempts: Option<i32>,
    on_duplicate: Option<&str>,
    concurrency_key: Option<&str>,
) -> i64 {
    let (queue, priority) = checked_target(queue, delay.as_ref(), priority);
    let payload = checked_job(payload, max_attempts);
    if idempotency_key == Some("") {
        invalid("idempotency_key", "must not be empty (or NULL for none)");
    }
    if idempotency_key.is_some_and(|k| k.len() > MAX_KEY_BYTES) {
        invalid("idempotency_key", "must be at most 1024 bytes");
    }
    // A slot's key taken first would take the slot (keel.run_schedules enqueues it as
    // pg_keel's owner).
    if idempotency_key.is_some_and(|k| k.starts_with(SCHEDULE_KEY_PREFIX))
        && !crate::auth::privileged(crate::auth::caller())
    {
        invalid(
            "idempotency_key",
            "keys starting with 'schedule:' are the slots of schedules, enqueued by pg_keel only",
        );
    }
    let replace = match on_duplicate {
        Some("ignore") => false,
        Some("replace") if idempotency_key.is_some() => true,
        Some("replace") => invalid(
            "on_duplicate",
            "'replace' needs an idempotency_key (the job to replace is the one holding it)",
        ),
        _ => invalid("on_duplicate", "must be 'ignore' or 'replace'"),
    };
    // Before the clock is read for visible_at (see `floor`).
    super::floor::writing(Some(queue), Some(priority));
    let now = now_micros();
    if idempotency_key.is_some() {
        let args = [
            param(queue),
            param(payload),
            param(delay),
            param(priority),
            param(idempotency_key),
            param(max_attempts),
            param(timestamptz(now)),
        ];
        // Counts and wakes itself when it inserted (or replaced).
        let sql = if replace {
            ENQUEUE_REPLACE
        } else {
            ENQUEUE_KEYED
        };
        return as_owner(|| execute(sql, &args).get::<i64>(0, 1))
            .unwrap_or_else(|| crate::error::internal("enqueue returned no job id"));
    }
    locks::lock_queue(queue, false);
    // Read after the lock: a drop_queue we waited for has bumped it.
    let seen = generation();
    if !known_plain(queue, seen) && as_owner(|| check_room(queue, 1)) {
        remember_plain(queue, seen);
    }
    let visible_at = at_delay(now, delay);
    let jobs = insert::NewJobs {
        queue,
        payloads: &[payload],
        priority,
        max_attempts,
        visible_at,
        enqueued_at: now,
        concurrency_key,
    };
    let id = crate::owner::as_user(crate::owner::of(c"jobs"), || insert::insert(&jobs));
    stats::count_on_commit(queue, 1, 0);
    wake::request(queue);
    id.first()
        .copied()
        .unwrap_or_else(|| crate::error::internal("enqueue inserted no job"))
}

/// `at` + `delay` (timestamptz + interval, by the calendar in the session's time zone).
/// Never before `at`: an interval whose fields have mixed signs ('1 month -30 days') passes
/// as positive yet can land in the past by the calendar.
fn at_delay(at: i64, delay: Option<Interval>) -> i64 {
    match delay.as_ref() {
        Some(d) if d.months() == 0 && d.days() == 0 && d.micros() == 0 => at,
        _ => plus(at, delay).max(at),
    }
}

fn plus(at: i64, delay: Option<Interval>) -> i64 {
    // SAFETY: timestamptz_pl_interval takes a timestamptz (by value) and an interval datum.
    unsafe {
        pgrx::direct_function_call::<i64>(
            pg_sys::timestamptz_pl_interval,
            &[Some(pg_sys::Datum::from(at)), delay.into_datum()],
        )
    }
    .unwrap_or(at)
}

/// Adds jobs to a queue; returns their ids in the order of `payloads`.
#[pg_extern(volatile, parallel_unsafe)]
fn enqueue_batch(
    queue: Option<&str>,
    payloads: Option<Array<RawJsonb>>,
    delay: default!(Option<Interval>, "'0'"),
    priority: default!(Option<i32>, 0),
) -> SetOfIterator<'static, i64> {
    let Some(payloads) = payloads else {
        // The name and grant first, as for every other argument.
        checked_target(queue, delay.as_ref(), priority);
        invalid("payloads", "must not be NULL")
    };
    let mut jobs: Vec<RawJsonb> = Vec::with_capacity(payloads.len());
    for (i, p) in payloads.iter().enumerate() {
        match p {
            Some(p) => jobs.push(p),
            None => invalid("payloads", &format!("element {} is NULL", i + 1)),
        }
    }
    let (queue, priority) = checked_target(queue, delay.as_ref(), priority);
    for p in &jobs {
        check_payload_bytes(*p);
    }
    let n = jobs.len() as i64;
    super::floor::writing(Some(queue), Some(priority));
    let now = now_micros();
    locks::lock_queue(queue, false);
    let seen = generation();
    if !known_plain(queue, seen) && as_owner(|| check_room(queue, n)) {
        remember_plain(queue, seen);
    }
    let batch = insert::NewJobs {
        queue,
        payloads: &jobs,
        priority,
        max_attempts: None,
        visible_at: at_delay(now, delay),
        enqueued_at: now,
        concurrency_key: None,
    };
    let ids = crate::owner::as_user(crate::owner::of(c"jobs"), || insert::insert(&batch));
    if n > 0 {
        stats::count_on_commit(queue, n, 0);
        wake::request(queue);
    }
    SetOfIterator::new(ids)
}
