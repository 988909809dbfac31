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
}

/// The transaction callback (`crate::xact`) calls `before_commit` and `after_commit`.
fn register() {
    crate::xact::register();
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

/// Just before the commit (the transaction callback's PRE_COMMIT): switches
/// synchronous_commit for this one commit, to wait for the flush of a lease a crash must not
/// forget, or not to wait for a transaction that wrote only our bookkeeping. Raises nothing.
pub fn before_commit() {
    if MUST_FLUSH.get() {
        // SAFETY: synchronous_commit is the GUC's C variable, a plain int of this
        // single-threaded backend; read by value, no reference is kept.
        let previous = unsafe { pg_sys::synchronous_commit };
        let local = pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_LOCAL_FLUSH as i32;
        if previous < local {
            // SAFETY: as above; a valid SyncCommitLevel value, which the commit reads next
            // and after_commit restores.
            unsafe { pg_sys::synchronous_commit = local };
        }
        STATE.set(State::Applied { previous });
        debug1!(
            "pg_keel: a transaction that handed out a lease a crash must not forget waits for the WAL flush"
        );
    } else if let State::Eligible { base, ours } = STATE.get() {
        if wal_records() - base == ours {
            // SAFETY: the GUC's C variable, a plain int of this single-threaded backend, read
            // by value.
            let previous = unsafe { pg_sys::synchronous_commit };
            // SAFETY: as above; a valid SyncCommitLevel value, restored by after_commit.
            unsafe {
                pg_sys::synchronous_commit = pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32
            };
            STATE.set(State::Applied { previous });
            debug1!(
                "pg_keel: a transaction that wrote only pg_keel bookkeeping (leases, async rate limits) commits without waiting for the WAL flush"
            );
        }
    }
}

/// The transaction ended (committed, aborted or prepared): synchronous_commit back to what
/// it was, and nothing carried into the next transaction. Raises nothing.
pub fn after_commit() {
    if let State::Applied { previous } = STATE.get() {
        // SAFETY: the GUC's C variable in this single-threaded backend, given back the value
        // before_commit read from it.
        unsafe { pg_sys::synchronous_commit = previous };
    }
    STATE.set(State::Idle);
    MUST_FLUSH.set(false);
}
