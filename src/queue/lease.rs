//! The calls a worker makes on every job it holds: `keel.claim`, `keel.ack` and `keel.extend`.
//! They run per job, so they are native functions rather than PL/pgSQL: `claim` scans,
//! locks and updates the jobs itself (see `take`), the others run saved generic plans (see
//! `spi_plans`); payloads pass through as jsonb datums (see `jsonb`).
//!
//! A job's first claim and every ack commit without waiting for the WAL flush when nothing
//! else was written in the transaction (`keel.lease_commit`, see `commit`); every other claim
//! and every extend wait for it, so a crash never makes a lease handed out twice (see `fence`).
//!
//! The lease identity is (job_id, attempt): `attempt` grows on every claim, so a worker whose
//! lease was taken over by a later claim matches no row and gets false / NULL.

use pgrx::prelude::*;

use super::fence::{self, Fence};
use super::floor::Scope;
use super::take::{take, Lease, Taken};
use super::QueueError;
use super::{invalid, stats};
use crate::auth;
use crate::commit::{async_write, require_flush};
use crate::error::raise;
use crate::jsonb::RawJsonb;
use crate::names;
use crate::pgtime::check_interval;
use crate::pgtime::{now_micros, timestamptz};
use crate::spi_plans::{execute, param};

/// Runs `write` (a lease statement) and records whether the transaction still qualifies
/// for an asynchronous commit, when `keel.lease_commit = async` (`crate::commit`).
fn lease_write<R>(write: impl FnOnce() -> R) -> R {
    if crate::guc::LEASE_COMMIT.get() != crate::guc::LeaseCommit::Async {
        return write();
    }
    async_write(write)
}

/// Largest claim batch.
const MAX_BATCH: i32 = 10_000;

/// The payload bytes (detoasted) one claim hands out at most, beyond its first job, whatever its batch: a batch of
/// 10,000 large payloads would otherwise sit in one backend's memory.
pub const MAX_CLAIM_BYTES: i64 = 16 * 1024 * 1024;

/// The longest `worker` name a claim stores.
const MAX_WORKER_CHARS: usize = 256;

const QUEUE_SETTINGS: &str =
    "SELECT paused, visibility_timeout, max_attempts FROM keel.queues WHERE queue = $1";

/// The same in a catalog with flow control (0.2.0): whether the queue claims through
/// `keel._claim_flow` (max_running_per_key or rate_limit set, or round_robin fairness).
const QUEUE_SETTINGS_FLOW: &str = "SELECT paused, visibility_timeout, max_attempts,
            max_running_per_key IS NOT NULL OR rate_limit IS NOT NULL OR fairness <> 'fifo'
       FROM keel.queues WHERE queue = $1";

/// The claim of a queue with flow control (sql/queue.sql).
const CLAIM_FLOW: &str = "SELECT job_id, attempt, payload, priority, enqueued_at, lease_expires_at
       FROM keel._claim_flow($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// Whether this database's catalog has flow control (0.2.0 on), by a syscache lookup.
fn has_flow_control() -> bool {
    let queues = crate::relation::keel_relid(c"queues");
    // SAFETY: a syscache lookup of an existing relation's column by a NUL-terminated name;
    // InvalidAttrNumber (0) when there is none.
    unsafe { pg_sys::get_attnum(queues, c"rate_limit".as_ptr()) > 0 }
}

/// Leases up to `batch` jobs of a queue with flow control through `keel._claim_flow`, in an
/// SPI connection as pg_keel's owner; payloads are copied into `outer`.
fn take_flow(queue: &str, batch: i32, lease: &Lease, outer: pg_sys::MemoryContext) -> Vec<Taken> {
    // As the native claim: 25006 in a read-only transaction, even with nothing to claim.
    // SAFETY: called from a SQL function, inside a transaction; the name is NUL-terminated.
    unsafe { pg_sys::PreventCommandIfReadOnly(c"claim".as_ptr()) };
    // A key's live leases are counted once its lock is held: under a transaction snapshot
    // the count could miss the claim that held the lock before.
    // SAFETY: reads this backend's isolation level, a plain global.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        raise(&QueueError::NotSupported {
            what: format!(
                "claiming queue {} (it has flow control) under REPEATABLE READ or SERIALIZABLE",
                crate::error::shown(queue)
            ),
        })
    }
    let rows = execute(
        CLAIM_FLOW,
        &[
            param(queue),
            param(batch),
            param(timestamptz(lease.now)),
            param(timestamptz(lease.until)),
            param(lease.worker),
            param(lease.role),
            param(lease.max_attempts),
            param(lease.fence.and_then(timestamptz)),
            param(MAX_CLAIM_BYTES),
        ],
    );
    // Every row is a job leased in this transaction: one that could not be read is an error
    // (rolling the leases back), never a job dropped from the result.
    (0..rows.len())
        .map(|r| {
            let read = || {
                let payload = rows.get::<RawJsonb>(r, 3)?.into_datum()?;
                Some(Taken {
                    job_id: rows.get::<i64>(r, 1)?,
                    attempt: rows.get::<i32>(r, 2)?,
                    // SAFETY: a non-null jsonb datum of the row, alive until SPI_finish,
                    // copied into the caller's context (which outlives the SPI connection).
                    payload: unsafe { RawJsonb::copy_into(payload, outer) },
                    priority: rows.get::<i32>(r, 4)?,
                    enqueued_at: rows.get::<TimestampWithTimeZone>(r, 5)?.into_inner(),
                    lease_expires_at: rows.get::<TimestampWithTimeZone>(r, 6)?.into_inner(),
                })
            };
            read().unwrap_or_else(|| {
                crate::error::internal("a flow claim returned an unreadable row")
            })
        })
        .collect()
}

// The statements below find a job by its id, and test its state as `coalesce(state, '') =
// 'running'` on purpose: a plain `state = 'running'` would let the planner prove the predicate
// of the partial claim index (state IN ('ready', 'running')) and pick that index to look up
// job_id, its fourth column, by walking all of it. It did, whenever the table's statistics
// said it was empty (after a VACUUM of a drained queue): an ack_batch of 64 read 3,000 blocks.
// The coalesce keeps every lookup on the primary key.

/// A job without an idempotency key is simply deleted: the common path, one statement.
const DELETE_DONE: &str = "DELETE FROM keel.jobs
     WHERE job_id = $1 AND attempt = $2 AND coalesce(state, '') = 'running' AND idempotency_key IS NULL
       AND (claimed_by = $3 OR $4)
    RETURNING queue";

/// A job with a key stays as 'done' until its dedupe window ends, so the key stays taken...
const MARK_DONE: &str = "UPDATE keel.jobs j
       SET state = 'done', finished_at = clock_timestamp()
      FROM keel.queues q
     WHERE j.job_id = $1 AND j.attempt = $2 AND coalesce(j.state, '') = 'running' AND q.queue = j.queue
       AND (j.claimed_by = $3 OR $4)
    RETURNING j.queue, j.enqueued_at + q.dedupe_window <= clock_timestamp()";

/// ...or is deleted when its window is already over.
const DELETE_BY_ID: &str = "DELETE FROM keel.jobs WHERE job_id = $1 AND state = 'done'";

// The same three for a catalog with job history (0.2.0: keel.queues.keep_finished and
// keel.jobs.result): a job of a queue that keeps finished jobs is kept as done, with its
// result, until cleanup_done_jobs removes it. 0.1.0's catalog (before ALTER EXTENSION
// UPDATE) has neither column and is served by the statements above.
const DELETE_DONE_KEPT: &str = "DELETE FROM keel.jobs j
     USING keel.queues q
     WHERE j.job_id = $1 AND j.attempt = $2 AND coalesce(j.state, '') = 'running'
       AND j.idempotency_key IS NULL AND (j.claimed_by = $3 OR $4)
       AND q.queue = j.queue AND q.keep_finished = interval '0'
    RETURNING j.queue";

/// DELETE_DONE_KEPT with the queues that keep finished jobs known ($5, remembered per
/// backend, see `history_queues`): no join on the path of every ack.
const DELETE_DONE_UNLESS: &str = "DELETE FROM keel.jobs
     WHERE job_id = $1 AND attempt = $2 AND coalesce(state, '') = 'running' AND idempotency_key IS NULL
       AND (claimed_by = $3 OR $4) AND queue <> ALL ($5)
    RETURNING queue";

const DELETE_DONE_BATCH_UNLESS: &str = "DELETE FROM keel.jobs j
     USING unnest($1::int8[], $2::int4[]) AS l(job_id, attempt)
     WHERE j.job_id = l.job_id AND j.attempt = l.attempt AND coalesce(j.state, '') = 'running'
       AND j.idempotency_key IS NULL AND (j.claimed_by = $3 OR $4) AND j.queue <> ALL ($5)
    RETURNING j.queue";

const HISTORY_QUEUES: &str =
    "SELECT coalesce(array_agg(queue), '{}') FROM keel.queues WHERE keep_finished > interval '0'";

/// How the catalog treats a done job without an idempotency key.
#[derive(Clone)]
enum Finished {
    /// 0.1.0's catalog: deleted.
    Deleted,
    /// Kept in these queues (keep_finished), deleted in the others.
    KeptIn(Vec<String>),
    /// Not known here (no shared memory to tell when queues change): the statements join
    /// keel.queues.
    Ask,
}

thread_local! {
    /// What `history_queues` found, at which queue generation and when.
    static HISTORY: std::cell::RefCell<Option<(u64, std::time::Instant, Finished)>> =
        const { std::cell::RefCell::new(None) };
}

/// The queues that keep finished jobs, remembered until a queue is created with history,
/// altered or dropped (the generation moves) and for a second at most (an UPDATE by hand moves
/// nothing).
fn history_queues() -> Finished {
    let Some(now) = super::enqueue::generation() else {
        return if keeps_history() {
            Finished::Ask
        } else {
            Finished::Deleted
        };
    };
    let known = HISTORY.with_borrow(|h| {
        h.as_ref()
            .filter(|(g, at, _)| *g == now && at.elapsed() < std::time::Duration::from_secs(1))
            .map(|(_, _, f)| f.clone())
    });
    if let Some(known) = known {
        return known;
    }
    let found = if keeps_history() {
        Finished::KeptIn(
            crate::spi_plans::execute_latest(HISTORY_QUEUES, &[])
                .get::<Vec<String>>(0, 1)
                .unwrap_or_default(),
        )
    } else {
        Finished::Deleted
    };
    HISTORY.set(Some((now, std::time::Instant::now(), found.clone())));
    found
}

const MARK_DONE_KEPT: &str = "UPDATE keel.jobs j
       SET state = 'done', finished_at = clock_timestamp(), result = $5
      FROM keel.queues q
     WHERE j.job_id = $1 AND j.attempt = $2 AND coalesce(j.state, '') = 'running' AND q.queue = j.queue
       AND (j.claimed_by = $3 OR $4)
    RETURNING j.queue, q.keep_finished = interval '0'
                       AND j.enqueued_at + q.dedupe_window <= clock_timestamp()";

const DELETE_DONE_BATCH_KEPT: &str = "DELETE FROM keel.jobs j
     USING keel.queues q, unnest($1::int8[], $2::int4[]) AS l(job_id, attempt)
     WHERE j.job_id = l.job_id AND j.attempt = l.attempt AND coalesce(j.state, '') = 'running'
       AND j.idempotency_key IS NULL AND (j.claimed_by = $3 OR $4)
       AND q.queue = j.queue AND q.keep_finished = interval '0'
    RETURNING j.queue";

const MARK_DONE_BATCH_KEPT: &str = "UPDATE keel.jobs j
       SET state = 'done', finished_at = clock_timestamp()
      FROM keel.queues q, unnest($1::int8[], $2::int4[]) AS l(job_id, attempt)
     WHERE j.job_id = l.job_id AND j.attempt = l.attempt AND coalesce(j.state, '') = 'running'
       AND q.queue = j.queue AND (j.claimed_by = $3 OR $4)
    RETURNING j.queue, j.job_id, q.keep_finished = interval '0'
                                 AND j.enqueued_at + q.dedupe_window <= clock_timestamp()";

/// Whether this database's catalog keeps job history (0.2.0 on), by a syscache lookup.
fn keeps_history() -> bool {
    let queues = crate::relation::keel_relid(c"queues");
    // SAFETY: a syscache lookup of an existing relation's column by a NUL-terminated name;
    // InvalidAttrNumber (0) when there is none.
    unsafe { pg_sys::get_attnum(queues, c"keep_finished".as_ptr()) > 0 }
}

const EXTEND: &str = "UPDATE keel.jobs
       SET visible_at = greatest(clock_timestamp(), clock_timestamp() + $3)
     WHERE job_id = $1 AND attempt = $2 AND coalesce(state, '') = 'running' AND (claimed_by = $4 OR $5)
    RETURNING visible_at";

/// The same in a catalog with flow control (0.2.0): a job with a concurrency key whose lease
/// has expired is not extended (a claim may have given its key's place to another job).
const EXTEND_KEYED: &str = "UPDATE keel.jobs
       SET visible_at = greatest(clock_timestamp(), clock_timestamp() + $3)
     WHERE job_id = $1 AND attempt = $2 AND coalesce(state, '') = 'running' AND (claimed_by = $4 OR $5)
       AND (concurrency_key IS NULL OR visible_at > clock_timestamp())
    RETURNING visible_at";

/// The checks both claims make of their batch, lease and worker name; the batch.
fn checked_claim(
    batch: Option<i32>,
    visibility_timeout: Option<&Interval>,
    worker: Option<&str>,
) -> i32 {
    let batch = batch
        .filter(|b| (1..=MAX_BATCH).contains(b))
        .unwrap_or_else(|| invalid("batch", "must be between 1 and 10000"));
    if visibility_timeout.is_some_and(|vt| check_interval("visibility_timeout", vt) <= 0) {
        invalid(
            "visibility_timeout",
            "must be a positive interval (or NULL for the queue's setting)",
        );
    }
    if worker.is_some_and(|w| w.chars().count() > MAX_WORKER_CHARS) {
        invalid("worker", "must be at most 256 characters");
    }
    batch
}

/// Leases up to `batch` ready jobs of `queue`, lower priority number first, then oldest.
#[pg_extern(volatile, parallel_unsafe)]
fn claim(
    queue: Option<&str>,
    batch: default!(Option<i32>, 1),
    visibility_timeout: default!(Option<Interval>, "NULL"),
    worker: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(job_id, i64),
        name!(attempt, i32),
        name!(payload, RawJsonb),
        name!(priority, i32),
        name!(enqueued_at, TimestampWithTimeZone),
        name!(lease_expires_at, TimestampWithTimeZone),
    ),
> {
    let batch = checked_claim(batch, visibility_timeout.as_ref(), worker);
    let Some(queue) = queue else {
        invalid("queue", "must not be NULL")
    };
    if let Err(problem) = names::check(queue) {
        raise(&QueueError::InvalidName {
            kind: "queue".into(),
            name: queue.into(),
            problem: problem.to_string(),
        })
    }
    auth::require(auth::Capability::Consume, queue);
    // SPI frees its memory at the end of the connection; payloads are copied out to here.
    // SAFETY: reads the current-context global by value. pgrx runs the first call of this
    // value-per-call SRF in its multi-call memory context, which lives until the last row is
    // returned, so payloads copied there outlive SPI_finish and are still valid when returned.
    let outer = unsafe { pg_sys::CurrentMemoryContext };
    let role = auth::caller();
    // SECURITY INVOKER (see `crate::auth`): the SQL runs as pg_keel's owner.
    let jobs = as_owner(|| {
        Spi::connect_mut(|_| {
            let flow_catalog = has_flow_control();
            let settings = execute(
                if flow_catalog {
                    QUEUE_SETTINGS_FLOW
                } else {
                    QUEUE_SETTINGS
                },
                &[param(queue)],
            );
            if settings.is_empty() {
                raise(&QueueError::UnknownQueue {
                    queue: queue.into(),
                })
            }
            if settings.get::<bool>(0, 1).unwrap_or(false) {
                return Vec::new(); // paused
            }
            let flow = flow_catalog && settings.get::<bool>(0, 4).unwrap_or(false);
            let lease = visibility_timeout.or_else(|| settings.get::<Interval>(0, 2));
            let max_attempts = settings.get::<i32>(0, 3);
            let fence = fence::current();
            // Before the clock is read for the leases (see `floor`).
            super::floor::writing(Some(queue), None);
            let now = now_micros();
            let until = lease_end(now, lease);
            let mut jobs = Vec::new();
            lease_write(|| {
                // Inside: what its looks write (pruning a page) is the claim's own.
                let scopes = super::floor::plan(queue);
                let lease = Lease {
                    now,
                    until,
                    worker,
                    max_attempts,
                    fence: match fence {
                        Fence::Known(at) => at,
                        Fence::Unknown => None,
                    },
                    role,
                };
                jobs = if flow {
                    take_flow(queue, batch, &lease, outer)
                } else {
                    take(queue, &scopes, batch, MAX_CLAIM_BYTES, &lease, outer)
                };
            });
            // Rule 1 of `fence`: only first hand-outs may be forgotten by a crash.
            let all_first = jobs.iter().all(|j| j.attempt == 1);
            // A flow claim's leases are always flushed: its SQL (a rate-limit charge, key
            // locks) is more than the lease, and it is not the hot path.
            if fence == Fence::Unknown || !all_first || flow {
                require_flush();
            }
            jobs
        })
    });
    TableIterator::new(jobs.into_iter().filter_map(|j| {
        Some((
            j.job_id,
            j.attempt,
            j.payload,
            j.priority,
            timestamptz(j.enqueued_at)?,
            timestamptz(j.lease_expires_at)?,
        ))
    }))
}

/// The most queues one claim may name.
const MAX_QUEUES: usize = 100;

/// The priorities with live jobs (ready or running) of a queue, by one descent of the claim
/// index each: for a queue whose floors are not kept (see `floor`), so that a claim across
/// queues can go priority by priority.
const PRIORITIES: &str = "WITH RECURSIVE p(priority) AS (
        SELECT min(priority) FROM keel.jobs WHERE queue = $1 AND state IN ('ready', 'running')
        UNION ALL
        SELECT (SELECT min(j.priority) FROM keel.jobs j
                 WHERE j.queue = $1 AND j.state IN ('ready', 'running') AND j.priority > p.priority)
          FROM p WHERE p.priority IS NOT NULL)
    SELECT priority FROM p WHERE priority IS NOT NULL LIMIT 65";

/// A queue with more live priorities than this (and no floors kept) is claimed from as a whole.
const MAX_PRIORITIES_WALKED: usize = 64;

/// Leases up to `batch` ready jobs from several queues in priority order: every job of
/// priority p in any of them before any of priority p + 1; within one priority, queue by
/// queue in the order given, each oldest first. Paused queues are passed over. Each job's
/// lease is its queue's `visibility_timeout` (or the one given); `queue` says where it came
/// from.
#[pg_extern(volatile, parallel_unsafe, name = "claim")]
fn claim_any(
    queues: Option<pgrx::datum::Array<&str>>,
    batch: default!(Option<i32>, 1),
    visibility_timeout: default!(Option<Interval>, "NULL"),
    worker: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(job_id, i64),
        name!(attempt, i32),
        name!(payload, RawJsonb),
        name!(priority, i32),
        name!(enqueued_at, TimestampWithTimeZone),
        name!(lease_expires_at, TimestampWithTimeZone),
        name!(queue, String),
    ),
> {
    let batch = checked_claim(batch, visibility_timeout.as_ref(), worker);
    let Some(queues) = queues else {
        invalid("queues", "must not be NULL")
    };
    // Before anything looks at the elements: an array of a million names is refused at once.
    if queues.is_empty() || queues.len() > MAX_QUEUES {
        invalid("queues", "must name 1 to 100 queues");
    }
    let mut names: Vec<String> = Vec::with_capacity(queues.len());
    for (i, q) in queues.iter().enumerate() {
        let Some(q) = q else {
            invalid("queues", &format!("element {} is NULL", i + 1))
        };
        if let Err(problem) = names::check(q) {
            raise(&QueueError::InvalidName {
                kind: "queue".into(),
                name: q.into(),
                problem: problem.to_string(),
            })
        }
        // At most 100 names: a linear look is cheap.
        if !names.iter().any(|n| n == q) {
            names.push(q.to_string());
        }
    }
    for q in &names {
        auth::require(auth::Capability::Consume, q);
    }
    // SAFETY: as in `claim`: the multi-call memory context of this SRF's first call.
    let outer = unsafe { pg_sys::CurrentMemoryContext };
    let role = auth::caller();
    let jobs = as_owner(|| {
        Spi::connect_mut(|_| {
            // Each queue's settings; paused ones are left out.
            let mut live: Vec<(&str, Option<Interval>, Option<i32>)> = Vec::new();
            let flow_catalog = has_flow_control();
            for q in &names {
                let settings = execute(
                    if flow_catalog {
                        QUEUE_SETTINGS_FLOW
                    } else {
                        QUEUE_SETTINGS
                    },
                    &[param(q.as_str())],
                );
                if settings.is_empty() {
                    raise(&QueueError::UnknownQueue { queue: q.clone() })
                }
                if flow_catalog && settings.get::<bool>(0, 4).unwrap_or(false) {
                    raise(&QueueError::NotSupported {
                        what: format!(
                            "claiming queue {} (it has max_running_per_key, rate_limit or round_robin fairness) together with other queues",
                            crate::error::shown(q)
                        ),
                    })
                }
                if settings.get::<bool>(0, 1).unwrap_or(false) {
                    continue;
                }
                let lease = visibility_timeout.or_else(|| settings.get::<Interval>(0, 2));
                live.push((q.as_str(), lease, settings.get::<i32>(0, 3)));
            }
            let fence = fence::current();
            // Before the clock is read for the leases (see `floor`).
            for (q, _, _) in &live {
                super::floor::writing(Some(q), None);
            }
            let now = now_micros();
            let mut taken: Vec<(Taken, String)> = Vec::new();
            lease_write(|| {
                // (priority, position of the queue, scope) in the order they are taken.
                let mut plan: Vec<(i32, usize, Scope)> = Vec::new();
                for (i, (q, _, _)) in live.iter().enumerate() {
                    for scope in super::floor::plan(q) {
                        match scope {
                            Scope::Priority { priority, .. } => plan.push((priority, i, scope)),
                            Scope::Whole => {
                                let found = execute(PRIORITIES, &[param(*q)]);
                                let priorities: Vec<i32> =
                                    (0..found.len()).filter_map(|k| found.get(k, 1)).collect();
                                if priorities.len() > MAX_PRIORITIES_WALKED {
                                    // Too many to go one by one: the whole queue in its own
                                    // order, at its first priority's place.
                                    plan.push((priorities[0], i, Scope::Whole));
                                    continue;
                                }
                                for p in priorities {
                                    plan.push((
                                        p,
                                        i,
                                        Scope::Priority {
                                            priority: p,
                                            floor: super::floor::NO_FLOOR,
                                        },
                                    ));
                                }
                            }
                        }
                    }
                }
                plan.sort_by_key(|(p, i, _)| (*p, *i));
                let mut bytes = 0i64;
                for (_, i, scope) in plan {
                    let left = batch - taken.len() as i32;
                    if left <= 0 || bytes >= MAX_CLAIM_BYTES {
                        break;
                    }
                    let (q, lease, max_attempts) = live[i];
                    let lease = Lease {
                        now,
                        until: lease_end(now, lease),
                        worker,
                        max_attempts,
                        fence: match fence {
                            Fence::Known(at) => at,
                            Fence::Unknown => None,
                        },
                        role,
                    };
                    for job in take(q, &[scope], left, MAX_CLAIM_BYTES - bytes, &lease, outer) {
                        bytes += crate::jsonb::raw_size(job.payload);
                        taken.push((job, q.to_string()));
                    }
                }
            });
            let all_first = taken.iter().all(|(j, _)| j.attempt == 1);
            if fence == Fence::Unknown || !all_first {
                require_flush();
            }
            taken
        })
    });
    TableIterator::new(jobs.into_iter().filter_map(|(j, queue)| {
        Some((
            j.job_id,
            j.attempt,
            j.payload,
            j.priority,
            timestamptz(j.enqueued_at)?,
            timestamptz(j.lease_expires_at)?,
            queue,
        ))
    }))
}

/// When a lease taken at `now` for `lease` ends: `greatest(now, now + lease)`, as a
/// timestamptz (µs); `now` without a lease.
fn lease_end(now: i64, lease: Option<Interval>) -> i64 {
    let Some(lease) = lease else { return now };
    let Some(at) = timestamptz(now) else {
        return now;
    };
    // SAFETY: timestamptz + interval with both arguments non-null and of those types.
    unsafe {
        pgrx::direct_function_call::<TimestampWithTimeZone>(
            pg_sys::timestamptz_pl_interval,
            &[at.into_datum(), lease.into_datum()],
        )
    }
    .map_or(now, |end| end.into_inner().max(now))
}

/// Completes a job: true, or false when the lease was lost. `result` is kept on the job when
/// its queue keeps finished jobs (`keep_finished`) or it has an idempotency key.
#[pg_extern(volatile, parallel_unsafe, name = "ack")]
fn ack_with_result(
    job_id: Option<i64>,
    attempt: Option<i32>,
    result: default!(Option<RawJsonb>, "NULL"),
) -> Option<bool> {
    // NULL for a NULL job or attempt, as 0.1.0's strict ack answered.
    let (job_id, attempt) = (job_id?, attempt?);
    if let Some(result) = result {
        crate::queue::check_payload_bytes(result);
    }
    Some(ack_one(job_id, attempt, result))
}

/// 0.1.0's keel.ack (two arguments, C symbol `ack_wrapper`), for a database not yet updated.
#[pg_extern(volatile, parallel_unsafe, sql = false)]
fn ack(job_id: i64, attempt: i32) -> bool {
    ack_one(job_id, attempt, None)
}

fn ack_one(job_id: i64, attempt: i32, result: Option<RawJsonb>) -> bool {
    let (role, privileged) = holder();
    let queue: Option<String> = as_owner(|| {
        Spi::connect_mut(|_| lease_write(|| complete(job_id, attempt, role, privileged, result)))
    });
    match queue {
        Some(queue) => {
            stats::count_on_commit(&queue, 0, 1);
            true
        }
        None => false,
    }
}

/// The jobs of a batch without an idempotency key, in one statement (see `DELETE_DONE`).
const DELETE_DONE_BATCH: &str = "DELETE FROM keel.jobs j
     USING unnest($1::int8[], $2::int4[]) AS l(job_id, attempt)
     WHERE j.job_id = l.job_id AND j.attempt = l.attempt AND coalesce(j.state, '') = 'running'
       AND j.idempotency_key IS NULL AND (j.claimed_by = $3 OR $4)
    RETURNING j.queue";

/// The rest, keyed: done, and deleted at once when their dedupe window is over (`MARK_DONE`).
const MARK_DONE_BATCH: &str = "UPDATE keel.jobs j
       SET state = 'done', finished_at = clock_timestamp()
      FROM keel.queues q, unnest($1::int8[], $2::int4[]) AS l(job_id, attempt)
     WHERE j.job_id = l.job_id AND j.attempt = l.attempt AND coalesce(j.state, '') = 'running'
       AND q.queue = j.queue AND (j.claimed_by = $3 OR $4)
    RETURNING j.queue, j.job_id, j.enqueued_at + q.dedupe_window <= clock_timestamp()";

const DELETE_BY_IDS: &str = "DELETE FROM keel.jobs WHERE job_id = ANY ($1) AND state = 'done'";

/// Completes the jobs of a claimed batch in one call (one transaction): each pair
/// `(job_ids[i], attempts[i])` is acked as `ack` would, with the same lease fencing and
/// commit mode. Returns how many were still held (the others' leases were lost). Both arrays
/// NULL is an empty batch.
#[pg_extern(volatile, parallel_unsafe)]
fn ack_batch(
    job_ids: Option<pgrx::datum::Array<i64>>,
    attempts: Option<pgrx::datum::Array<i32>>,
) -> i64 {
    // Both NULL is an empty batch: `ack_batch(array_agg(job_id), array_agg(attempt))` over a
    // claim that returned nothing.
    let (job_ids, attempts) = match (job_ids, attempts) {
        (Some(j), Some(a)) => (j, a),
        (None, None) => return 0,
        _ => invalid(
            "attempts",
            "must have one element per job id (both NULL: none)",
        ),
    };
    if job_ids.len() != attempts.len() {
        invalid("attempts", "must have one element per job id");
    }
    if job_ids.len() > MAX_BATCH as usize {
        invalid("job_ids", "at most 10000 per call");
    }
    let ids: Option<Vec<i64>> = job_ids.iter().collect();
    let tries: Option<Vec<i32>> = attempts.iter().collect();
    let (Some(ids), Some(tries)) = (ids, tries) else {
        invalid("job_ids", "no element may be NULL")
    };
    if ids.is_empty() {
        return 0;
    }
    let (role, privileged) = holder();
    let queues: Vec<String> = as_owner(|| {
        Spi::connect_mut(|_| {
            lease_write(|| {
                let lease = [
                    param(ids.clone()),
                    param(tries.clone()),
                    param(role),
                    param(privileged),
                ];
                let history = history_queues();
                let deleted = match &history {
                    Finished::Deleted => execute(DELETE_DONE_BATCH, &lease),
                    Finished::KeptIn(kept) if kept.is_empty() => execute(DELETE_DONE_BATCH, &lease),
                    Finished::Ask => execute(DELETE_DONE_BATCH_KEPT, &lease),
                    Finished::KeptIn(kept) => execute(
                        DELETE_DONE_BATCH_UNLESS,
                        &[
                            param(ids.clone()),
                            param(tries.clone()),
                            param(role),
                            param(privileged),
                            param(kept.clone()),
                        ],
                    ),
                };
                let mark = match history {
                    Finished::Deleted => MARK_DONE_BATCH,
                    _ => MARK_DONE_BATCH_KEPT,
                };
                let mut queues: Vec<String> = (0..deleted.len())
                    .filter_map(|i| deleted.get(i, 1))
                    .collect();
                let marked = execute(mark, &lease);
                let mut expired: Vec<i64> = Vec::new();
                for i in 0..marked.len() {
                    if let Some(queue) = marked.get::<String>(i, 1) {
                        queues.push(queue);
                    }
                    if marked.get::<bool>(i, 3) == Some(true) {
                        expired.extend(marked.get::<i64>(i, 2));
                    }
                }
                if !expired.is_empty() {
                    execute(DELETE_BY_IDS, &[param(expired)]);
                }
                queues
            })
        })
    });
    let acked = queues.len() as i64;
    let mut per_queue: std::collections::BTreeMap<&str, i64> = Default::default();
    for q in &queues {
        *per_queue.entry(q.as_str()).or_default() += 1;
    }
    for (queue, n) in per_queue {
        stats::count_on_commit(queue, 0, n);
    }
    acked
}

/// Runs `f` as the owner of keel.jobs with the pinned search_path, its statements planned by
/// index (`owner::BY_INDEX`).
fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    crate::owner::as_owner(crate::owner::of(c"jobs"), || {
        crate::owner::with_settings(&crate::owner::BY_INDEX, f)
    })
}

/// The caller's role and whether it may use any role's lease (see `crate::auth`).
fn holder() -> (pg_sys::Oid, bool) {
    let role = auth::caller();
    (role, auth::privileged(role))
}

fn complete(
    job_id: i64,
    attempt: i32,
    role: pg_sys::Oid,
    privileged: bool,
    result: Option<RawJsonb>,
) -> Option<String> {
    let history = history_queues();
    let lease = [
        param(job_id),
        param(attempt),
        param(role),
        param(privileged),
    ];
    let deleted = match &history {
        Finished::Deleted => execute(DELETE_DONE, &lease),
        // No queue keeps finished jobs (the common case): 0.1.0's statement.
        Finished::KeptIn(kept) if kept.is_empty() => execute(DELETE_DONE, &lease),
        Finished::Ask => execute(DELETE_DONE_KEPT, &lease),
        Finished::KeptIn(kept) => execute(
            DELETE_DONE_UNLESS,
            &[
                param(job_id),
                param(attempt),
                param(role),
                param(privileged),
                param(kept.clone()),
            ],
        ),
    };
    if !deleted.is_empty() {
        return deleted.get::<String>(0, 1);
    }
    let marked = match history {
        Finished::Deleted => execute(MARK_DONE, &lease),
        _ => {
            let [a, b, c, d] = lease;
            execute(MARK_DONE_KEPT, &[a, b, c, d, param(result)])
        }
    };
    if marked.is_empty() {
        return None;
    }
    let queue = marked.get::<String>(0, 1);
    if marked.get::<bool>(0, 2) == Some(true) {
        execute(DELETE_BY_ID, &[param(job_id)]);
    }
    queue
}

/// Heartbeat: the lease now expires `extend_by` from now; NULL when the lease was lost.
#[pg_extern(volatile, parallel_unsafe)]
fn extend(job_id: i64, attempt: i32, extend_by: Option<Interval>) -> Option<TimestampWithTimeZone> {
    let extend_by = extend_by
        .filter(|i| check_interval("extend_by", i) > 0)
        .unwrap_or_else(|| invalid("extend_by", "must be a positive interval"));
    let (role, privileged) = holder();
    // Before the clock is read for the new expiry (see `floor`).
    super::floor::writing(None, None);
    as_owner(|| {
        Spi::connect_mut(|_| {
            let rows = execute(
                if has_flow_control() {
                    EXTEND_KEYED
                } else {
                    EXTEND
                },
                &[
                    param(job_id),
                    param(attempt),
                    param(extend_by),
                    param(role),
                    param(privileged),
                ],
            );
            if rows.is_empty() {
                None
            } else {
                // The holder relies on the new expiry: a crash must not bring back the old one.
                require_flush();
                rows.get::<TimestampWithTimeZone>(0, 1)
            }
        })
    })
}
