//! pg_keel: Postgres as the authority for state that must survive failures (queues, outbox,
//! rate limits, sessions), Redis as the acceleration.
//!
//! This file holds the module list, the hand-written SQL entry points and `_PG_init`.

use pgrx::prelude::*;

mod auth;
mod catalog;
mod commit;
mod error;
mod guc;
mod health;
mod jsonb;
mod locks;
mod maintenance;
mod names;
mod outbox;
mod owner;
mod pgcompat;
mod pgtime;
mod queue;
mod ratelimit;
mod relation;
mod schedule;
mod session;
mod shmem;
mod spi_plans;
mod srf;
mod worker;
mod xact;

pg_module_magic!();

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!(
    "../sql/queue.sql",
    name = "queue",
    requires = ["bootstrap", queue::queue_counters, locks::lock_queue]
);
extension_sql_file!(
    "../sql/outbox.sql",
    name = "outbox",
    requires = [
        "queue",
        outbox::wake_dispatcher_on_commit,
        locks::lock_aggregate
    ]
);
extension_sql_file!(
    "../sql/ratelimit.sql",
    name = "ratelimit",
    requires = [
        "outbox",
        auth::authorize,
        auth::redeem,
        ratelimit::check_limit,
        ratelimit::rate_error,
        ratelimit::rate_denial_retention,
        ratelimit::rate_forget,
        ratelimit::rate_memory_reset,
        ratelimit::cache::policies_changed
    ]
);
extension_sql_file!(
    "../sql/session.sql",
    name = "session",
    requires = [
        "ratelimit",
        session::new_token,
        session::session_hash,
        session::session_events,
        session::session_lifecycle,
        maintenance::session_cleanup_grace
    ]
);
extension_sql_file!(
    "../sql/maintenance.sql",
    name = "maintenance",
    requires = [
        "session",
        maintenance::maintenance_error,
        maintenance::outbox_retention
    ]
);
extension_sql_file!(
    "../sql/schedule.sql",
    name = "schedule",
    requires = [
        "maintenance",
        schedule::schedule_due,
        schedule::schedule_next,
        schedule::schedule_error
    ]
);
extension_sql_file!(
    "../sql/health.sql",
    name = "health",
    requires = [
        "maintenance",
        health::worker_health,
        outbox::redis_target::redis_url_has_password
    ]
);
extension_sql_file!(
    "../sql/privileges.sql",
    name = "privileges",
    finalize,
    requires = [worker::wake_launcher_on_commit]
);

/// Order matters: settings first (everything reads them), then shared memory, then the
/// background worker that uses both. Shared memory and the worker exist only when the
/// library is in `shared_preload_libraries`; every SQL function works without it.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    // pg_upgrade starts the server with the library loaded but must not see a worker.
    // SAFETY: a plain bool global, set from the command line before any library is loaded;
    // read by value in this single-threaded process.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        return;
    }
    // SAFETY: a plain bool global the postmaster sets around loading shared_preload_libraries;
    // read by value in this single-threaded process.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    shmem::init();
    worker::register();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_keel'",
            "keel.database = 'pgrx_tests'",
        ]
    }
}
