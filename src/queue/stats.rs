//! Enqueued/completed totals per queue, kept in shared memory like pg_stat counters: they
//! count committed work since the server started. A backend collects its counts during the
//! transaction and adds them to shared memory at commit (dropping them on abort), so producers
//! never contend on a counter row and the request path costs a few hundred nanoseconds.
//! Without shared_preload_libraries there is no shared memory and no totals.
//!
//! Counts made inside a subtransaction that later rolls back are still added at commit.

use std::cell::{Cell, RefCell};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem;

thread_local! {
    /// (queue, enqueued, completed) accumulated by the current transaction.
    static PENDING: RefCell<Vec<(String, i64, i64)>> = const { RefCell::new(Vec::new()) };
    /// Whether this backend registered its transaction callback (once per backend).
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

pub fn count_on_commit(queue: &str, enqueued: i64, completed: i64) {
    if !shmem::enabled() {
        return;
    }
    if !REGISTERED.get() {
        // SAFETY: registers, once per backend (REGISTERED), a callback that lives as long as
        // the library (never unloaded) and takes no argument; it raises nothing.
        unsafe { pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut()) };
        REGISTERED.set(true);
    }
    PENDING.with_borrow_mut(|list| match list.iter_mut().find(|(q, _, _)| q == queue) {
        Some(entry) => {
            entry.1 += enqueued;
            entry.2 += completed;
        }
        None => list.push((queue.to_string(), enqueued, completed)),
    });
}

/// Runs at the end of every transaction of this backend: must not raise.
///
/// # Safety
/// Called only by PostgreSQL as the `XactCallback` registered in `count_on_commit`, in this
/// backend's main thread, with the null `arg` given there (unused).
#[pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    let commit = match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            true
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => false,
        _ => return,
    };
    let pending = PENDING.with(|p| {
        p.try_borrow_mut()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    });
    if commit {
        for (queue, enqueued, completed) in pending {
            shmem::add_queue_counts(&queue, enqueued, completed);
        }
    }
}

pub fn snapshot() -> Vec<(String, i64, i64)> {
    shmem::queue_counts()
}
