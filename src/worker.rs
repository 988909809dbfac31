//! The pg_keel background worker. Registered when the library is preloaded; for now it only
//! keeps its place (signal handling, bounded waits, clean exit). Outbox dispatch and the
//! maintenance schedule arrive with the next capabilities.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

/// How long a crashed worker waits before the postmaster starts it again.
const RESTART_AFTER: Duration = Duration::from_secs(5);
/// Longest sleep between two looks at the world.
const MAX_NAP: Duration = Duration::from_secs(1);

pub fn register() {
    BackgroundWorkerBuilder::new("pg_keel worker")
        .set_type("pg_keel")
        .set_function("keel_worker_main")
        .set_library("pg_keel")
        .enable_spi_access()
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn keel_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    log!("pg_keel worker started");
    // wait_latch returns false once SIGTERM arrived (or the postmaster died).
    while BackgroundWorker::wait_latch(Some(MAX_NAP)) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    log!("pg_keel worker stopping");
}
