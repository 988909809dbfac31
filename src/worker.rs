//! The pg_keel background worker: registered when the library is preloaded, connected to
//! `keel.database`. Its loop follows pg_cron's: signal handlers only set flags, the
//! configuration is reloaded at the top of the loop, every wait is a bounded latch wait that
//! also ends on postmaster death, and each unit of work is one short transaction. It does
//! nothing while pg_keel is not installed in its database. It starts once recovery has
//! finished: not on a standby until it is promoted (then it takes over the outbox and tasks).
//! Its work: the outbox dispatcher, and the maintenance tasks of keel.tasks when due.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use crate::outbox::dispatch::Dispatcher;
use crate::{guc, maintenance, ratelimit, shmem};

/// How often the worker looks for due maintenance tasks.
const TASK_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest the worker spends on maintenance before it dispatches again.
const TASK_BUDGET: Duration = Duration::from_millis(500);

/// How long a worker that exited (crashed, was terminated, or lost its database) waits before
/// the postmaster starts it again. The postmaster never starts one while it shuts down.
pub const RESTART_AFTER: Duration = Duration::from_secs(2);

/// SIGTERM arrived. pgrx forgets its flag once read, and both the main loop and the
/// maintenance rounds read it: whoever sees it first records it here for the others.
static STOP: AtomicBool = AtomicBool::new(false);

/// True once the worker was asked to stop (SIGTERM: shutdown, pg_terminate_backend, or a
/// DROP DATABASE ... WITH (FORCE) of its database).
pub fn stop_requested() -> bool {
    if BackgroundWorker::sigterm_received() {
        STOP.store(true, Ordering::Relaxed);
    }
    STOP.load(Ordering::Relaxed)
}

pub fn register() {
    BackgroundWorkerBuilder::new("pg_keel worker")
        .set_type("pg_keel")
        .set_function("keel_worker_main")
        .set_library("pg_keel")
        .enable_spi_access()
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

fn report_activity(what: &str) {
    if let Ok(text) = CString::new(what) {
        unsafe {
            pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, text.as_ptr())
        };
    }
}

fn snapshot_rate_limits() {
    BackgroundWorker::transaction(|| Spi::connect_mut(|_| ratelimit::snapshot()));
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn keel_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = guc::DATABASE
        .get()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".into());
    {
        // What worker_status() shows if the connection fails (FATAL: the process ends here).
        let mut w = shmem::WORKER.exclusive();
        w.pid = unsafe { pg_sys::MyProcPid };
        shmem::put_str(
            &mut w.state,
            &format!("connecting to database \"{database}\" (it may not exist yet)"),
        );
    }
    // A missing database is FATAL here; the postmaster tries again after RESTART_AFTER.
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
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
    .unwrap_or_else(|e| error!("pg_keel worker: {e}"));
    {
        let mut w = shmem::WORKER.exclusive();
        w.pid = unsafe { pg_sys::MyProcPid };
        w.latch = unsafe { pg_sys::MyLatch } as usize;
    }
    log!("pg_keel worker started in database \"{database}\"");

    let mut dispatcher = Dispatcher::new();
    let mut nap = Duration::ZERO;
    let mut next_tasks = Instant::now();
    let mut next_snapshot = Instant::now();
    // wait_latch returns false once SIGTERM arrived (or the postmaster died); a maintenance
    // round may have seen the SIGTERM first.
    while BackgroundWorker::wait_latch(Some(nap)) && !stop_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        report_activity("dispatching outbox");
        nap = dispatcher.tick();
        if Instant::now() >= next_tasks {
            if dispatcher.installed() {
                report_activity("running maintenance tasks");
                maintenance::run_due(TASK_BUDGET);
            }
            next_tasks = Instant::now() + TASK_CHECK_EVERY;
        }
        // On its interval, or early when a burst of denials has half filled their buffer.
        if Instant::now() >= next_snapshot || ratelimit::memory::denials_waiting() {
            if dispatcher.installed() {
                report_activity("writing memory rate limits");
                snapshot_rate_limits();
            }
            let every = guc::RATE_SNAPSHOT_INTERVAL.get().max(10) as u64;
            next_snapshot = Instant::now() + Duration::from_millis(every);
        }
        nap = nap
            .min(next_tasks.saturating_duration_since(Instant::now()))
            .min(next_snapshot.saturating_duration_since(Instant::now()));
        unsafe {
            pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
            // What the worker's transactions did to keel's tables (the rows it deleted, above
            // all) reaches the statistics autovacuum decides by, as a client backend's does
            // when it goes idle; at most once a second (the loop wakes at least that often),
            // and never inside a transaction.
            pg_sys::pgstat_report_stat(false);
        }
    }
    // A clean shutdown (SIGTERM) forgets no decision of a memory rate limit.
    if dispatcher.installed() {
        snapshot_rate_limits();
    }
    {
        let mut w = shmem::WORKER.exclusive();
        w.latch = 0;
        w.pid = 0;
        shmem::put_str(
            &mut w.state,
            "stopped (terminated); the postmaster starts it again",
        );
    }
    log!(
        "pg_keel worker stopping; it starts again in {} s unless the server is shutting down",
        RESTART_AFTER.as_secs()
    );
    // Exit code 1 asks the postmaster to start the worker again after RESTART_AFTER (0 would
    // unregister it for good: a pg_terminate_backend would stop dispatch until the next server
    // start). During a shutdown the postmaster starts nothing, so a shutdown is not delayed.
    unsafe { pg_sys::proc_exit(1) };
}
