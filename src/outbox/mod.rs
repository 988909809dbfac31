//! The transactional outbox (DESIGN.md §2). `keel.emit`, `create_route` and `outbox_replay`
//! are SQL (sql/outbox.sql); this module wakes the dispatcher when an emitting transaction
//! commits, reports the worker's status, and holds the dispatcher itself (`dispatch`), the
//! Redis side (`redis_target`) and the pure entry format (`entry`).

pub mod dispatch;
pub mod entry;
pub mod redis_target;
pub mod resp;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::worker::registry::{self, Phase};
use crate::{guc, shmem};

/// Asks for the dispatcher's latch to be set when this transaction commits (nothing happens
/// on rollback). Returns true, so PL/pgSQL can call it as an expression.
#[pg_extern(volatile, parallel_unsafe, name = "_wake_dispatcher_on_commit")]
fn wake_dispatcher_on_commit() -> bool {
    if shmem::enabled() {
        crate::xact::on_commit(crate::xact::OnCommit::WakeWorker);
    }
    true
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
    let database = crate::catalog::current_database();
    if !shmem::enabled() {
        let state = "not running: pg_keel is not in shared_preload_libraries".to_string();
        return TableIterator::once((None, database, state, None, false, None, None, None, 0, 0));
    }
    let registry = registry::snapshot();
    // SAFETY: this backend's database, set once when it connected.
    let here = unsafe { pg_sys::MyDatabaseId };
    let slot = registry
        .slots
        .iter()
        .find(|s| s.phase != Phase::Free && s.database == here)
        .copied()
        .unwrap_or_default();
    let w = slot.status;
    let text = |s: String| (!s.is_empty()).then_some(s);
    // SAFETY: looks the pid up in the process array under its lock; no pointer is kept.
    let alive = w.pid != 0 && unsafe { !pg_sys::BackendPidGetProc(w.pid).is_null() };
    let restart = crate::worker::launcher::RESTART_AFTER.as_secs();
    let recorded = shmem::get_str(&w.state);
    let state = match slot.phase {
        _ if alive => recorded,
        // Workers start once recovery has finished (they need a database connection).
        // SAFETY: reads shared state every backend may read.
        _ if unsafe { pg_sys::RecoveryInProgress() } => {
            "not running: the server is in recovery (a standby); it starts when promoted".into()
        }
        Phase::Free if !guc::served_databases().is_none_or(|d| d.contains(&database)) => {
            "not running: this database is not listed in keel.database".into()
        }
        Phase::Free if registry.launcher_pid == 0 => format!(
            "not running: the pg_keel launcher is not running (the postmaster starts it again \
             within {restart} s)"
        ),
        Phase::Free | Phase::Starting if w.pid == 0 => {
            "starting: the launcher is starting this database's worker".into()
        }
        Phase::NotInstalled => {
            "starting: pg_keel was installed here; the launcher starts this database's worker"
                .into()
        }
        Phase::NoWorkerSlot => format!(
            "not running: no background worker slot left (max_worker_processes = {}); the \
             launcher tries again every 10 s",
            // SAFETY: a setting fixed at server start, read only.
            unsafe { pg_sys::max_worker_processes }
        ),
        Phase::Starting => format!(
            "not running: its worker could not connect to this database (see the server log); \
             the launcher tries again every {restart} s"
        ),
        Phase::Paused | Phase::Exited if !recorded.is_empty() => recorded,
        _ => format!(
            "not running: the worker exited (see the server log); the launcher starts it again \
             within {restart} s"
        ),
    };
    TableIterator::once((
        alive.then_some(w.pid),
        database,
        state,
        text(shmem::get_str(&w.redis_target)),
        w.redis_connected,
        crate::pgtime::recorded(w.last_dispatch_at),
        text(shmem::get_str(&w.last_error)),
        crate::pgtime::recorded(w.last_error_at),
        w.dispatched_total,
        w.failed_total,
    ))
}
