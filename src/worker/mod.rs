//! The pg_keel background workers. The launcher (`launcher`) runs once per cluster and starts
//! a worker for every database where pg_keel is installed; the worker of a database (here)
//! dispatches that database's outbox and runs its maintenance tasks. Its loop follows
//! pg_cron's: signal handlers only set flags, the configuration is reloaded at the top of the
//! loop, every wait is a bounded latch wait that also ends on postmaster death, and each unit
//! of work is one short transaction. Workers start once recovery has finished: not on a standby
//! until it is promoted (then they take over the outbox and tasks).
//!
//! A worker leaves (and says why in its slot of the `registry`) when pg_keel is not installed
//! in its database or is dropped there, when a DROP DATABASE or ALTER DATABASE wants the
//! database to itself, and on SIGTERM; the launcher decides when to start it again.

pub mod launcher;
pub mod process;
pub mod registry;

use std::ffi::CString;
use std::time::{Duration, Instant};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use crate::outbox::dispatch::{self, Dispatcher};
use crate::{guc, maintenance, ratelimit};
use process::{database_wanted_exclusively, set_phase, stop_requested, with_status};
use registry::Phase;

/// How often the worker looks for due maintenance tasks.
const TASK_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often the worker enqueues the due slots of schedules and releases jobs that waited
/// for others (their latency).
const SCHEDULE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest the worker spends on maintenance before it dispatches again.
const TASK_BUDGET: Duration = Duration::from_millis(500);
/// How often the worker looks whether a DROP or ALTER DATABASE waits for its database.
const LOCK_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Registers the launcher (only from shared_preload_libraries); it starts the workers.
pub fn register() {
    launcher::register();
}

fn report_activity(what: &str) {
    if let Ok(text) = CString::new(what) {
        // SAFETY: reports this process's activity, outside any transaction.
        unsafe {
            pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, text.as_ptr())
        };
    }
}

/// The keys written are marked clean only once their transaction has committed (an error
/// before that ends this process, and the next worker writes them again).
fn snapshot_rate_limits() {
    let taken = BackgroundWorker::transaction(|| Spi::connect_mut(|_| ratelimit::snapshot()));
    ratelimit::memory::written(&taken);
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn keel_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(
        pgrx::bgworkers::SignalWakeFlags::SIGHUP | pgrx::bgworkers::SignalWakeFlags::SIGTERM,
    );
    // The launcher passes the slot index (low 8 bits) and the slot's generation.
    let arg = arg.value();
    let index = arg & 0xff;
    if index >= registry::MAX_DATABASES {
        return;
    }
    let generation = (arg >> 8) as u32;
    process::set_slot(index, generation);
    let slot = registry::snapshot().slots[index];
    if slot.generation != generation {
        return; // the slot was handed on before this worker started
    }
    let database = slot.database;
    with_status(|w| {
        // What worker_status() shows if the connection fails (FATAL: the process ends here).
        // SAFETY: this process's pid, set at its start.
        w.pid = unsafe { pg_sys::MyProcPid };
        registry::set_state(w, "connecting to its database");
    });
    // A database dropped meanwhile is FATAL here; the launcher sees it gone.
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    // Everything the worker writes can be done again after a crash: a lost "dispatched" mark
    // means a resend that Redis' dedupe check drops, a lost cleanup or reap runs again. So its
    // commits do not wait for the WAL flush (never weakens a user's transaction). The one
    // exception, the snapshot of memory rate limits, asks for the flush itself.
    // In a deadlock with a user's statement (DROP EXTENSION locks keel's tables one by one
    // while a dispatch reads some of them), the worker is the one that gives way: it checks for
    // deadlocks long before a user's backend does (1 s by default), so it is the one whose
    // transaction is aborted; it then starts again, and the user's statement goes through.
    BackgroundWorker::transaction(|| {
        Spi::run("SET search_path = pg_catalog, pg_temp")?;
        Spi::run("SET synchronous_commit = off")?;
        Spi::run("SET deadlock_timeout = '100ms'")
    })
    .unwrap_or_else(|e| crate::error::internal(format!("worker: {e}")));
    let name = BackgroundWorker::transaction(crate::catalog::current_database);
    let looked_at = crate::pgtime::now_micros();
    if !dispatch::installed() {
        // Nothing to do here, and a connection kept open would stand in the way of a DROP
        // DATABASE: leave; a CREATE EXTENSION pg_keel here wakes the launcher. The time of the
        // look (before its snapshot) lets the launcher tell whether that came later.
        set_phase(Phase::NotInstalled, looked_at);
        with_status(|w| {
            w.pid = 0;
            registry::set_state(w, "pg_keel is not installed in this database");
        });
        return;
    }
    set_phase(Phase::Running, crate::pgtime::now_micros());
    with_status(|w| {
        // SAFETY: this process's pid, set at its start.
        w.pid = unsafe { pg_sys::MyProcPid };
        // SAFETY: this process's latch pointer (its PGPROC's latch, in shared memory, so the
        // same address in every backend), set at process start; copied by value.
        w.latch = unsafe { pg_sys::MyLatch } as usize;
    });
    log!("pg_keel worker started in database \"{name}\"");

    let mut dispatcher = Dispatcher::new();
    let mut nap = Duration::ZERO;
    let mut next_tasks = Instant::now();
    let mut next_snapshot = Instant::now();
    let mut next_schedules = Instant::now();
    let mut next_lock_check = Instant::now();
    let mut why = Phase::Exited;
    // wait_latch returns false once SIGTERM arrived (or the postmaster died); a maintenance
    // round may have seen the SIGTERM first.
    while BackgroundWorker::wait_latch(Some(nap)) && !stop_requested() {
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereads postgresql.conf at the top of the loop, outside any transaction, as the postmaster asked (SIGHUP).
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if Instant::now() >= next_lock_check {
            if database_wanted_exclusively() {
                why = Phase::Paused;
                break;
            }
            next_lock_check = Instant::now() + LOCK_CHECK_EVERY;
        }
        with_status(|w| w.last_loop_at = crate::pgtime::now_micros());
        report_activity("dispatching outbox");
        nap = dispatcher.tick();
        if !dispatcher.installed() {
            why = Phase::NotInstalled; // DROP EXTENSION pg_keel
            break;
        }
        if Instant::now() >= next_tasks {
            report_activity("running maintenance tasks");
            maintenance::run_due(TASK_BUDGET);
            next_tasks = Instant::now() + TASK_CHECK_EVERY;
        }
        if Instant::now() >= next_schedules {
            report_activity("running schedules and releasing dependent jobs");
            crate::schedule::run_due();
            next_schedules = Instant::now() + SCHEDULE_CHECK_EVERY;
        }
        // On its interval, or early when a burst of denials has half filled their buffer.
        if Instant::now() >= next_snapshot || ratelimit::memory::denials_waiting() {
            report_activity("writing memory rate limits");
            snapshot_rate_limits();
            let every = guc::RATE_SNAPSHOT_INTERVAL.get().max(10) as u64;
            next_snapshot = Instant::now() + Duration::from_millis(every);
        }
        nap = nap
            .min(next_tasks.saturating_duration_since(Instant::now()))
            .min(next_snapshot.saturating_duration_since(Instant::now()))
            .min(next_schedules.saturating_duration_since(Instant::now()))
            .min(LOCK_CHECK_EVERY);
        // SAFETY: reports this process's activity, outside any transaction.
        unsafe {
            pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
            // What the worker's transactions did to keel's tables (the rows it deleted, above
            // all) reaches the statistics autovacuum decides by, as a client backend's does
            // when it goes idle; at most once a second (the loop wakes at least that often),
            // and never inside a transaction.
            pg_sys::pgstat_report_stat(false);
        }
    }
    // Leaving (shutdown, terminated, paused) forgets no decision of a memory rate limit.
    if why != Phase::NotInstalled {
        snapshot_rate_limits();
    }
    let (state, told) = match why {
        Phase::Paused => (
            "stopped: a DROP or ALTER DATABASE wants this database to itself",
            "it leaves for a DROP or ALTER DATABASE of its database",
        ),
        Phase::NotInstalled => (
            "stopped: pg_keel was dropped from this database",
            "pg_keel was dropped from its database",
        ),
        _ => (
            "stopped (terminated); the launcher starts it again",
            "terminated; the launcher starts it again unless the server is shutting down",
        ),
    };
    set_phase(why, crate::pgtime::now_micros());
    with_status(|w| {
        w.latch = 0;
        w.pid = 0;
        w.destination = 0;
        registry::set_state(w, state);
    });
    log!("pg_keel worker of database \"{name}\" stopping: {told}");
}

/// Called by the install script: when this `CREATE EXTENSION pg_keel` commits, the launcher
/// looks at this database again and starts its worker (within a second, not at the next
/// server start).
#[pg_extern(volatile, parallel_unsafe, name = "_wake_launcher_on_commit")]
fn wake_launcher_on_commit() -> bool {
    if !crate::shmem::enabled() {
        return false;
    }
    crate::xact::on_commit(crate::xact::OnCommit::WakeLauncher);
    true
}
