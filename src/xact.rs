//! Wake-ups that must happen when the current transaction commits, and never when it rolls
//! back: a committed emit wakes its database's worker, a committed CREATE EXTENSION wakes the
//! launcher, committed grants invalidate every backend's cached authorizations. One
//! transaction callback per backend serves them all, the queue wake-ups of `queue::wake`
//! (decided just before the commit, posted after it) and the rate-limit memory's holds
//! (`ratelimit::memory`, released once the transaction's writes are visible or gone).

use std::cell::Cell;

use pgrx::prelude::*;

/// What to do at commit.
#[derive(Clone, Copy)]
pub enum OnCommit {
    /// Set the latch of this database's worker (new outbox events, memory denials).
    WakeWorker = 1,
    /// Ask the launcher to look at the databases again (pg_keel was installed here).
    WakeLauncher = 2,
    /// Grants changed: backends drop their cached authorizations (`crate::auth`).
    GrantsChanged = 4,
    /// A queue was dropped or altered: enqueues look it up again (`crate::queue`).
    QueuesChanged = 8,
}

thread_local! {
    static PENDING: Cell<u8> = const { Cell::new(0) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Registers the callbacks, once per backend.
pub fn register() {
    if !REGISTERED.get() {
        // SAFETY: registers callbacks that live as long as the library (never unloaded); they
        // raise nothing.
        unsafe {
            pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(at_subtransaction_end), std::ptr::null_mut());
        }
        REGISTERED.set(true);
    }
}

/// Does `what` when the current transaction commits (nothing on rollback).
pub fn on_commit(what: OnCommit) {
    register();
    PENDING.set(PENDING.get() | what as u8);
}

/// A (sub)transaction that aborts takes the authorization ticket in flight with it
/// (`crate::auth`): an error between `_authorize` and its `_redeem` leaves nothing behind.
///
/// # Safety
/// Called only by PostgreSQL as the `SubXactCallback` registered in [`register`], in this
/// backend's main thread, with the null `arg` given there (unused).
#[pg_guard]
unsafe extern "C-unwind" fn at_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    sub: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        crate::auth::forget_ticket_of(sub);
    }
}

/// Does at commit what the transaction asked for and forgets it on abort or PREPARE.
///
/// # Safety
/// Called only by PostgreSQL as the `XactCallback` registered in [`register`], in this
/// backend's main thread, with the null `arg` given there (unused).
#[pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => crate::queue::wake::before_commit(),
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            crate::queue::floor::at_transaction_end();
            crate::queue::wake::at_commit();
            crate::ratelimit::memory::at_transaction_end();
            crate::auth::forget_ticket();
            let pending = PENDING.replace(0);
            if pending & OnCommit::WakeWorker as u8 != 0 {
                crate::worker::registry::wake_worker();
            }
            if pending & OnCommit::WakeLauncher as u8 != 0 {
                crate::worker::registry::wake_launcher();
            }
            if pending & OnCommit::GrantsChanged as u8 != 0 {
                crate::auth::bump_generation();
            }
            if pending & OnCommit::QueuesChanged as u8 != 0 {
                crate::queue::queues_changed_now();
            }
        }
        XACT_EVENT_PRE_PREPARE => {
            crate::queue::floor::before_prepare();
            // A memory key decided in the table must stay out of memory until that decision
            // is visible, which for a prepared transaction is a COMMIT PREPARED in another
            // session, later, without these callbacks.
            if crate::ratelimit::memory::holds_anything() {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "pg_keel: a transaction that decided a memory rate-limit key in the table cannot be prepared",
                    "Decide memory policies outside the two-phase transaction."
                );
            }
            // COMMIT PREPARED runs in another session, later, without these callbacks: the
            // backends that remember the queue would never learn it was dropped or altered.
            if PENDING.get() & OnCommit::QueuesChanged as u8 != 0 {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "pg_keel: a transaction that dropped or altered a queue cannot be prepared",
                    "Call keel.drop_queue and keel.alter_queue outside the two-phase transaction."
                );
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            crate::queue::floor::at_transaction_end();
            crate::queue::wake::at_abort();
            crate::ratelimit::memory::at_transaction_end();
            crate::auth::forget_ticket();
            PENDING.set(0)
        }
        _ => {}
    }
}
