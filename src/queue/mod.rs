//! Queues (DESIGN.md §1). The data path is PL/pgSQL in `sql/queue.sql`; this module holds
//! what it calls into: name and payload checks, the error enum, the backoff math and the
//! enqueue/complete counters.

mod backoff;
mod enqueue;
mod error;
mod fence;
pub mod floor;
mod insert;
mod lease;
pub mod stats;
mod take;
pub mod wake;

use pgrx::prelude::*;

use crate::error::raise;
use crate::guc;
use crate::names;
pub(crate) use enqueue::check_payload_bytes;
pub use error::QueueError;

/// Shared memory of the queues (needs shared_preload_libraries): the crash fence of leases.
pub fn init_shmem() {
    stats::init();
    fence::init();
    wake::init();
    enqueue::init();
    floor::init();
}

/// Just before PREPARE TRANSACTION (from `crate::xact`): refused when the transaction
/// dropped or altered a queue: COMMIT PREPARED runs in another session, later, without these
/// callbacks, so the backends that remember the queue would never learn it changed.
pub fn refuse_prepare_if_changed() {
    if crate::xact::pending(crate::xact::OnCommit::QueuesChanged) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "pg_keel: a transaction that dropped or altered a queue cannot be prepared",
            "Call keel.drop_queue and keel.alter_queue outside the two-phase transaction."
        );
    }
}

/// A queue was dropped or altered (commit callback: raises nothing).
pub fn queues_changed_now() {
    enqueue::bump_generation();
}

/// Settles the lease fence of a server that started in recovery, once recovery has ended (the
/// launcher calls it when it starts), so a clean restart soon after a promotion still fences.
pub fn settle_fence() {
    fence::current();
}

/// Raises 22023 for an argument that breaks its rule ("must not be NULL").
pub fn invalid(argument: &str, rule: &str) -> ! {
    crate::error::invalid_argument(argument, rule)
}

/// Raises 22023 unless `name` is a valid name of the given kind; NULL is refused too.
#[pg_extern(volatile, parallel_safe, name = "_check_name")]
fn check_name(kind: Option<&str>, name: Option<&str>) {
    let kind = kind.unwrap_or("queue");
    let Some(name) = name else {
        invalid(kind, "must not be NULL")
    };
    if let Err(problem) = names::check(name) {
        raise(&QueueError::InvalidName {
            kind: kind.to_string(),
            name: name.to_string(),
            problem: problem.to_string(),
        })
    }
}

/// Raises 54000 when a payload of `bytes` exceeds `keel.max_payload_bytes`.
#[pg_extern(volatile, parallel_safe, name = "_check_payload")]
fn check_payload(bytes: Option<i32>) {
    let limit = guc::MAX_PAYLOAD_BYTES.get();
    if let Some(bytes) = bytes.filter(|b| *b > limit) {
        raise(&QueueError::PayloadTooLarge {
            bytes: bytes.into(),
            limit: limit.into(),
        })
    }
}

/// Raises the queue error `kind` for `subject` (a queue, or an argument for
/// 'invalid_argument'); `detail` carries the numbers or the rule.
#[pg_extern(volatile, parallel_safe, name = "_queue_error")]
fn queue_error(kind: &str, subject: Option<&str>, detail: Option<&str>) {
    let subject = subject.unwrap_or("").to_string();
    let detail = detail.unwrap_or("").to_string();
    let err = match kind {
        "invalid_argument" => invalid(&subject, &detail),
        "unknown_queue" => QueueError::UnknownQueue { queue: subject },
        "queue_full" => QueueError::QueueFull {
            queue: subject,
            max_ready: detail,
        },
        "queue_not_empty" => QueueError::QueueNotEmpty {
            queue: subject,
            jobs: detail,
        },
        "busy_key" => QueueError::BusyKey {
            queue: subject,
            key: detail,
        },
        other => invalid("kind", &format!("unknown queue error kind {other:?}")),
    };
    raise(&err)
}

use crate::pgtime::interval_micros;

/// The delay before retry number `attempt + 1` of job `seed` (see `backoff`).
#[pg_extern(immutable, strict, parallel_safe, name = "_retry_delay")]
fn retry_delay(
    retry_backoff: Interval,
    retry_backoff_max: Interval,
    attempt: i32,
    seed: i64,
) -> Interval {
    let micros = backoff::retry_delay_micros(
        interval_micros(&retry_backoff),
        interval_micros(&retry_backoff_max),
        attempt,
        seed as u64,
    );
    Interval::new(0, 0, micros).unwrap_or(retry_backoff_max)
}

/// Adds to the enqueued/completed counters of `queue` when the transaction commits. Returns
/// true, so PL/pgSQL can call it as a (fast) expression rather than a PERFORM query.
#[pg_extern(volatile, parallel_unsafe, name = "_count_jobs")]
fn count_jobs(queue: &str, enqueued: i64, completed: i64) -> bool {
    stats::count_on_commit(queue, enqueued, completed);
    true
}

/// Jobs enqueued and completed per queue since the server started (needs
/// shared_preload_libraries; empty otherwise).
#[pg_extern(volatile, parallel_safe, name = "_queue_counters")]
pub fn queue_counters() -> TableIterator<
    'static,
    (
        name!(queue, String),
        name!(enqueued_total, i64),
        name!(completed_total, i64),
    ),
> {
    TableIterator::new(stats::snapshot())
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn retry_delay_is_capped_and_jittered() {
        let d = Spi::get_one::<bool>(
            "SELECT keel._retry_delay('1 second', '10 seconds', 20, 1) <= interval '10 seconds'
                AND keel._retry_delay('1 second', '10 seconds', 20, 1) > interval '7.5 seconds'",
        );
        assert_eq!(d, Ok(Some(true)));
    }

    #[pg_test]
    #[should_panic(expected = "invalid queue name")]
    fn bad_name_is_refused() {
        Spi::run("SELECT keel.create_queue('Bad Name')").unwrap();
    }

    #[pg_test]
    fn claim_takes_priority_then_age_in_one_backend() {
        Spi::run("SELECT keel.create_queue('t')").unwrap();
        Spi::run("SELECT keel.enqueue('t', '{\"n\":1}', priority => 5)").unwrap();
        Spi::run("SELECT keel.enqueue('t', '{\"n\":2}', priority => 1)").unwrap();
        Spi::run("SELECT keel.enqueue('t', '{\"n\":3}', priority => 1)").unwrap();
        let order = Spi::get_one::<String>(
            "SELECT string_agg(payload->>'n', ',') FROM keel.claim('t', 10)",
        );
        assert_eq!(order, Ok(Some("2,3,1".into())));
    }
}
