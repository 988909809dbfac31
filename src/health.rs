//! Operating it (DESIGN.md §6): `keel.health()` and `keel.metrics()` are SQL
//! (sql/health.sql); this module gives them what only shared memory knows — this database's
//! worker and the Redis figures it last read — as one row.

use pgrx::prelude::*;

use crate::shmem::get_str;
use crate::worker::registry;

/// This database's worker and Redis as shared memory has them (`preloaded` false: nothing
/// else is known).
// pgrx needs the named columns spelled out in the signature.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe, name = "_worker_health")]
fn worker_health() -> TableIterator<
    'static,
    (
        name!(preloaded, bool),
        name!(running, bool),
        name!(last_loop_at, Option<TimestampWithTimeZone>),
        name!(redis_target, Option<String>),
        name!(redis_connected, bool),
        name!(redis_seen_at, Option<TimestampWithTimeZone>),
        name!(redis_latency_ms, Option<f64>),
        name!(redis_used_memory, Option<i64>),
        name!(redis_maxmemory, Option<i64>),
        name!(redis_evicted_keys, Option<i64>),
        name!(redis_role, Option<String>),
        name!(redis_maxmemory_policy, Option<String>),
    ),
> {
    if !crate::shmem::enabled() {
        return TableIterator::once((
            false, false, None, None, false, None, None, None, None, None, None, None,
        ));
    }
    // SAFETY: this backend's database.
    let here = unsafe { pg_sys::MyDatabaseId };
    let slot = registry::snapshot()
        .slots
        .iter()
        .find(|s| s.phase != registry::Phase::Free && s.database == here)
        .copied()
        .unwrap_or_default();
    let w = slot.status;
    // SAFETY: looks the pid up in the process array under its lock; no pointer is kept.
    let running = w.pid != 0 && unsafe { !pg_sys::BackendPidGetProc(w.pid).is_null() };
    let text = |s: String| (!s.is_empty()).then_some(s);
    let seen = w.redis.at != 0;
    TableIterator::once((
        true,
        running,
        crate::pgtime::recorded(w.last_loop_at),
        text(get_str(&w.redis_target)),
        w.redis_connected,
        crate::pgtime::recorded(w.redis.at),
        seen.then(|| w.redis.latency_us as f64 / 1000.0),
        seen.then_some(w.redis.used_memory),
        seen.then_some(w.redis.maxmemory),
        seen.then_some(w.redis.evicted_keys),
        text(get_str(&w.redis.role)),
        text(get_str(&w.redis.maxmemory_policy)),
    ))
}
