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
        error::invalid_argument_sql,
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

/// What each capability does around the end of a transaction (`crate::xact`), in this
/// order. Just before the commit the queue wake-ups are decided (they may still NOTIFY)
/// before the commit mode is chosen from what the transaction wrote; after it, the commit
/// mode is restored first, and the wake-ups of the worker and the launcher come last, once
/// everything they would read is in place.
static XACT_HOOKS: xact::Hooks = xact::Hooks {
    before_commit: &[queue::wake::before_commit, commit::before_commit],
    at_end: &[
        |_| commit::after_commit(),
        |committed| {
            if committed {
                queue::stats::at_commit()
            } else {
                queue::stats::at_abort()
            }
        },
        |_| queue::floor::at_transaction_end(),
        |committed| {
            if committed {
                queue::wake::at_commit()
            } else {
                queue::wake::at_abort()
            }
        },
        |_| ratelimit::memory::at_transaction_end(),
        |_| auth::forget_ticket(),
    ],
    before_prepare: &[
        queue::floor::before_prepare,
        ratelimit::memory::before_prepare,
        queue::refuse_prepare_if_changed,
    ],
    at_subtransaction_abort: &[auth::forget_ticket_of],
    on_commit: [
        worker::registry::wake_worker,
        worker::registry::wake_launcher,
        auth::bump_generation,
        queue::queues_changed_now,
        ratelimit::cache::bump_generation,
    ],
};

/// Order matters: settings first (everything reads them), then shared memory, then the
/// background worker that uses both. Shared memory and the worker exist only when the
/// library is in `shared_preload_libraries`; every SQL function works without it.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    xact::install(&XACT_HOOKS);
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
    // Each capability sets up its own shared memory; then it is there for all of them.
    worker::registry::init();
    queue::init_shmem();
    ratelimit::memory::init();
    ratelimit::cache::init();
    auth::init();
    shmem::mark_enabled();
    worker::register();
}

/// Every hand-declared `LANGUAGE c` function.
#[cfg(any(test, feature = "pg_test"))]
const NATIVE: &[&srf::Native] = &[
    &ratelimit::CHECK,
    &ratelimit::RATE_LIMIT,
    &session::VALIDATE,
];

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Each hand-declared C function has, in pg_proc, the arguments and result columns its
    /// `Native` entry names, in that order; and no other function of the extension is
    /// declared by hand.
    #[pg_test]
    fn hand_declared_c_functions_match_their_native_entries() {
        for native in super::NATIVE {
            let described = Spi::get_one_with_args::<String>(
                "SELECT p.pronamespace::regnamespace::text || '.' || p.proname || '|' || string_agg(
                            coalesce(p.proargnames[a.n], '') || ' ' || format_type(a.t, NULL)
                            || CASE WHEN coalesce(p.proargmodes[a.n], 'i') = 't' THEN ' out' ELSE '' END,
                            ', ' ORDER BY a.n)
                   FROM pg_proc p,
                        unnest(coalesce(p.proallargtypes, p.proargtypes::oid[]))
                            WITH ORDINALITY AS a(t, n)
                  WHERE p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
                    AND p.prosrc = $1
                  GROUP BY p.oid, p.pronamespace, p.proname",
                &[native.symbol.into()],
            )
            .expect("pg_proc")
            .expect("the symbol is declared");
            let expected = format!(
                "{}|{}",
                native.function,
                native
                    .args
                    .iter()
                    .map(|(n, t)| format!("{n} {t}"))
                    .chain(native.columns.iter().map(|(n, t)| format!("{n} {t} out")))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            assert_eq!(described, expected);
        }
        let by_hand = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_proc p
              WHERE p.pronamespace = 'keel'::regnamespace
                AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
                AND p.prosrc NOT LIKE '%\\_wrapper'",
        )
        .expect("count")
        .expect("a count");
        assert_eq!(by_hand as usize, super::NATIVE.len());
    }
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
