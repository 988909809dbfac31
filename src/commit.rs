//! Commit without waiting for the WAL flush, for transactions whose only writes are pg_keel
//! lease bookkeeping (claim, ack, extend) that at-least-once delivery can afford to
//! lose in a crash: a lost claim or ack only means the job is handed out again.
//!
//! The rule that keeps the caller's own data safe: the transaction qualifies only if it had
//! written nothing before the first such statement, and every WAL record it wrote up to its
//! commit came from such statements. Anything else the caller wrote (before, between or
//! after) makes it commit synchronously as usual. Checked at PRE_COMMIT, where the commit
//! mode is switched for this one commit and restored right after.
//!
//! The other way round, [`require_flush`]: a lease write that must never be forgotten (see
//! `queue::fence`) makes the commit wait for the local WAL flush even when the session runs
//! with `synchronous_commit = off`.

use std::cell::Cell;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::guc;

#[derive(Clone, Copy, PartialEq, Debug)]
enum State {
    /// Nothing of ours in this transaction yet.
    Idle,
    /// Our statements wrote `ours` WAL records since `base`.
    Eligible { base: i64, ours: i64 },
    /// The transaction wrote something that is not ours: commit as configured.
    Ineligible,
    /// PRE_COMMIT switched synchronous_commit; restore `previous` after the commit.
    Applied { previous: i32 },
}

thread_local! {
    static STATE: Cell<State> = const { Cell::new(State::Idle) };
    /// This transaction wrote a lease that a crash must not forget.
    static MUST_FLUSH: Cell<bool> = const { Cell::new(false) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

fn register() {
    if !REGISTERED.get() {
        // SAFETY: registers a callback that lives as long as the library (never unloaded);
        // the callback raises nothing.
        unsafe { pg_sys::RegisterXactCallback(Some(at_transaction_event), std::ptr::null_mut()) };
        REGISTERED.set(true);
    }
}

/// The commit of the current transaction waits for the local WAL flush, whatever
/// `keel.lease_commit` and `synchronous_commit` say (a stronger `synchronous_commit`, such as
/// waiting for a standby, is kept).
pub fn require_flush() {
    register();
    MUST_FLUSH.set(true);
}

fn wal_records() -> i64 {
    // SAFETY: pgWalUsage is this backend's own WAL counter, a plain global only this
    // (single-threaded) process writes; reading one integer field by value takes no reference.
    unsafe { pg_sys::pgWalUsage.wal_records }
}

/// Runs `write` (a lease statement) and records whether the transaction still qualifies
/// for an asynchronous commit, when `keel.lease_commit = async`.
pub fn lease_write<R>(write: impl FnOnce() -> R) -> R {
    if guc::LEASE_COMMIT.get() != guc::LeaseCommit::Async {
        return write();
    }
    async_write(write)
}

/// Runs `write` (a statement of ours that a crash may afford to lose, such as a rate-limit
/// decision of an `async` policy) and records whether the transaction still qualifies for an
/// asynchronous commit.
pub fn async_write<R>(write: impl FnOnce() -> R) -> R {
    register();
    let before = wal_records();
    let state = match STATE.get() {
        State::Idle => {
            // SAFETY: called from a SQL function, so inside a transaction; it only reads this
            // backend's transaction state and assigns nothing.
            let wrote_already =
                unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
            if wrote_already {
                State::Ineligible
            } else {
                State::Eligible {
                    base: before,
                    ours: 0,
                }
            }
        }
        other => other,
    };
    let result = write();
    let added = wal_records() - before;
    STATE.set(match state {
        State::Eligible { base, ours } => State::Eligible {
            base,
            ours: ours + added,
        },
        other => other,
    });
    result
}

/// Runs at every transaction event of this backend: must not raise.
///
/// # Safety
/// Called only by PostgreSQL as the `XactCallback` registered in [`register`], in this
/// backend's main thread, with the `arg` given there (unused).
#[pg_guard]
unsafe extern "C-unwind" fn at_transaction_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => {
            if MUST_FLUSH.get() {
                // SAFETY: synchronous_commit is the GUC's C variable, a plain int of this
                // single-threaded backend; read by value, no reference is kept.
                let previous = unsafe { pg_sys::synchronous_commit };
                let local = pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_LOCAL_FLUSH as i32;
                if previous < local {
                    // SAFETY: as above; a valid SyncCommitLevel value, which the commit reads
                    // next and the COMMIT/ABORT event below restores.
                    unsafe { pg_sys::synchronous_commit = local };
                }
                STATE.set(State::Applied { previous });
                debug1!(
                    "pg_keel: a transaction that handed out a lease a crash must not forget waits for the WAL flush"
                );
            } else if let State::Eligible { base, ours } = STATE.get() {
                if wal_records() - base == ours {
                    // SAFETY: the GUC's C variable, a plain int of this single-threaded backend,
                    // read by value.
                    let previous = unsafe { pg_sys::synchronous_commit };
                    // SAFETY: as above; a valid SyncCommitLevel value, restored by the
                    // COMMIT/ABORT event below.
                    unsafe {
                        pg_sys::synchronous_commit =
                            pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32
                    };
                    STATE.set(State::Applied { previous });
                    debug1!(
                        "pg_keel: a transaction that wrote only pg_keel bookkeeping (leases, async rate limits) commits without waiting for the WAL flush"
                    );
                }
            }
        }
        XACT_EVENT_COMMIT
        | XACT_EVENT_ABORT
        | XACT_EVENT_PARALLEL_COMMIT
        | XACT_EVENT_PARALLEL_ABORT
        | XACT_EVENT_PREPARE => {
            if let State::Applied { previous } = STATE.get() {
                // SAFETY: the GUC's C variable in this single-threaded backend, given back the
                // value PRE_COMMIT read from it.
                unsafe { pg_sys::synchronous_commit = previous };
            }
            STATE.set(State::Idle);
            MUST_FLUSH.set(false);
        }
        _ => {}
    }
}
