//! The transactional outbox (DESIGN.md §2). `keel.emit`, `create_route` and `outbox_replay`
//! are SQL (sql/outbox.sql); this module wakes the dispatcher when an emitting transaction
//! commits, reports the worker's status, and holds the dispatcher itself (`dispatch`), the
//! Redis side (`redis_target`) and the pure entry format (`entry`).

pub mod dispatch;
pub mod entry;
pub mod redis_target;

use std::cell::Cell;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::{guc, shmem};

thread_local! {
    static WAKE_ON_COMMIT: Cell<bool> = const { Cell::new(false) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Asks for the dispatcher's latch to be set when this transaction commits (nothing happens
/// on rollback). Returns true, so PL/pgSQL can call it as an expression.
#[pg_extern(volatile, parallel_unsafe, name = "_wake_dispatcher_on_commit")]
fn wake_dispatcher_on_commit() -> bool {
    if !shmem::enabled() {
        return true;
    }
    if !REGISTERED.get() {
        unsafe { pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut()) };
        REGISTERED.set(true);
    }
    WAKE_ON_COMMIT.set(true);
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT if WAKE_ON_COMMIT.replace(false) => {
            shmem::wake_worker()
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            WAKE_ON_COMMIT.set(false)
        }
        _ => {}
    }
}

fn timestamp(t: i64) -> Option<TimestampWithTimeZone> {
    (t != 0)
        .then(|| unsafe { TimestampWithTimeZone::from_datum(pg_sys::Datum::from(t), false) })
        .flatten()
}

/// What the background worker is doing.
// pgrx needs the named columns spelled out in the signature.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(pid, Option<i32>),
        name!(database, String),
        name!(state, String),
        name!(redis_target, Option<String>),
        name!(redis_connected, bool),
        name!(last_dispatch_at, Option<TimestampWithTimeZone>),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(dispatched_total, i64),
        name!(failed_total, i64),
    ),
> {
    let database = guc::DATABASE
        .get()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !shmem::enabled() {
        let state = "not running: pg_keel is not in shared_preload_libraries".to_string();
        return TableIterator::once((None, database, state, None, false, None, None, None, 0, 0));
    }
    let w = *shmem::WORKER.share();
    let text = |s: String| (!s.is_empty()).then_some(s);
    // SAFETY: looks the pid up in the process array under its lock; no pointer is kept.
    let alive = w.pid != 0 && unsafe { !pg_sys::BackendPidGetProc(w.pid).is_null() };
    let restart = crate::worker::RESTART_AFTER.as_secs();
    // The worker starts once recovery has finished (it needs a database connection): on a
    // standby it is not running until the standby is promoted.
    let state = match text(shmem::get_str(&w.state)) {
        Some(state) if alive || w.pid == 0 => state,
        Some(state) if state.starts_with("connecting") => format!(
            "not running: could not connect to database \"{database}\" (does it exist?); \
             the postmaster tries again every {restart} s"
        ),
        Some(_) => format!(
            "not running: the worker exited (see the server log); the postmaster starts it \
             again within {restart} s"
        ),
        None if unsafe { pg_sys::RecoveryInProgress() } => {
            "not running: the server is in recovery (a standby); it starts when promoted".into()
        }
        None => "not running: not started yet".into(),
    };
    TableIterator::once((
        alive.then_some(w.pid),
        database,
        state,
        text(shmem::get_str(&w.redis_target)),
        w.redis_connected,
        timestamp(w.last_dispatch_at),
        text(shmem::get_str(&w.last_error)),
        timestamp(w.last_error_at),
        w.dispatched_total,
        w.failed_total,
    ))
}
