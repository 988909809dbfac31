//! The one transaction callback of pg_keel (and its subtransaction callback): what must happen
//! when the current transaction commits, and never when it rolls back. A committed emit wakes
//! its database's worker, a committed CREATE EXTENSION wakes the launcher, committed grants
//! and policies invalidate every backend's caches. It also drives the queue wake-ups of
//! `queue::wake` (decided just before the commit, posted after it), the queue totals
//! (`queue::stats`, added at commit), the commit mode of `crate::commit` (chosen just before
//! the commit, restored after it) and the rate-limit memory's holds (`ratelimit::memory`,
//! released once the transaction's writes are visible or gone). No other module registers a
//! callback.
//!
//! This module calls no capability by name: what each does at those moments is a [`Hooks`]
//! that lib.rs installs from `_PG_init`, so the capabilities depend on it and never the other
//! way round.

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
    /// Rate-limit policies changed: backends drop their cached policies
    /// (`crate::ratelimit::cache`).
    PoliciesChanged = 16,
}

/// What the capabilities do around the end of every transaction, in the order listed. None
/// may raise, except `before_prepare`, which refuses a PREPARE TRANSACTION it cannot honour.
pub struct Hooks {
    /// Just before the commit (the transaction can still NOTIFY and write).
    pub before_commit: &'static [fn()],
    /// After the commit (`true`), or after an abort or a PREPARE (`false`: a prepared
    /// transaction commits later, in another session, without these hooks).
    pub at_end: &'static [fn(bool)],
    /// Just before PREPARE TRANSACTION.
    pub before_prepare: &'static [fn()],
    /// A subtransaction aborted.
    pub at_subtransaction_abort: &'static [fn(pg_sys::SubTransactionId)],
    /// What each `OnCommit` does once its transaction committed, in the order of its bits:
    /// wake the worker, wake the launcher, grants changed, queues changed, policies changed.
    pub on_commit: [fn(); 5],
}

static HOOKS: std::sync::OnceLock<&'static Hooks> = std::sync::OnceLock::new();

/// Installs the capabilities' hooks (from `_PG_init`, once per process).
pub fn install(hooks: &'static Hooks) {
    let _ = HOOKS.set(hooks);
}

/// Whether the current transaction asked for `what` at commit.
pub fn pending(what: OnCommit) -> bool {
    PENDING.get() & what as u8 != 0
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
        for hook in HOOKS.get().map_or(&[][..], |h| h.at_subtransaction_abort) {
            hook(sub);
        }
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
    let Some(hooks) = HOOKS.get() else {
        return;
    };
    match event {
        XACT_EVENT_PRE_COMMIT => {
            for hook in hooks.before_commit {
                hook();
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            for hook in hooks.at_end {
                hook(true);
            }
            let pending = PENDING.replace(0);
            for (bit, hook) in hooks.on_commit.iter().enumerate() {
                if pending & (1 << bit) != 0 {
                    hook();
                }
            }
        }
        XACT_EVENT_PRE_PREPARE => {
            for hook in hooks.before_prepare {
                hook();
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            for hook in hooks.at_end {
                hook(false);
            }
            PENDING.set(0)
        }
        _ => {}
    }
}
