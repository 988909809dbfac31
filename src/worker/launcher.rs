//! The launcher: one background worker per cluster, connected to no database, that starts and
//! stops a worker for every database pg_keel serves (pg_cron serves one; its #89 asks for this).
//!
//! Every second (at once when woken) it reads `pg_database` — the one catalog it can read
//! without a database — and gives every database that accepts connections, is no template
//! and is in `keel.database` (empty: all) a slot in the registry and a worker. The worker looks
//! whether pg_keel is installed; where it is not, it leaves at once and the slot waits, without
//! holding a connection to that database, until a `CREATE EXTENSION pg_keel` commits there (its
//! install script wakes the launcher) or a SIGHUP. A worker that ended is started again after
//! RESTART_AFTER, one that left for a DROP or ALTER DATABASE after PAUSE; a database that is
//! gone or no longer listed loses its worker and its slot. Workers are bounded by
//! max_worker_processes: when the postmaster has no slot left, the launcher says so in the log
//! (once per database) and in `worker_status()`, and tries again every NO_SLOT_RETRY.
//!
//! The launcher is started again by the postmaster if it ends (terminated or crashed); before
//! it ends it stops its workers, and the new launcher starts them again.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use super::registry::{self, Phase, MAX_DATABASES};
use crate::guc;

/// How long a worker (or the launcher) that ended waits before it is started again. Nothing
/// is started while the server shuts down.
pub const RESTART_AFTER: Duration = Duration::from_secs(2);

/// How long a worker that left for a DROP or ALTER DATABASE waits before it is started again
/// (if its database is still there).
const PAUSE: Duration = Duration::from_secs(5);
/// How often the launcher tries again when the postmaster had no background worker slot.
const NO_SLOT_RETRY: Duration = Duration::from_secs(10);
/// How often the launcher reads pg_database when nothing wakes it.
const SCAN_EVERY: Duration = Duration::from_secs(1);

pub fn register() {
    BackgroundWorkerBuilder::new("pg_keel launcher")
        .set_type("pg_keel launcher")
        .set_function("keel_launcher_main")
        .set_library("pg_keel")
        .enable_spi_access()
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

/// Registers a process of a database slot (`arg`: slot and generation) with the postmaster;
/// it is never restarted by the postmaster (the launcher decides), and its end sets the
/// launcher's latch.
fn start_dynamic(
    name: &str,
    kind: &str,
    function: &str,
    arg: usize,
) -> Result<DynamicBackgroundWorker, pgrx::bgworkers::DynamicBackgroundWorkerLoadError> {
    BackgroundWorkerBuilder::new(name)
        .set_type(kind)
        .set_function(function)
        .set_library("pg_keel")
        .enable_spi_access()
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(arg)))
        // SAFETY: this process's pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
}

fn micros(d: Duration) -> i64 {
    d.as_micros() as i64
}

/// A database the launcher may serve.
struct Database {
    oid: pg_sys::Oid,
    name: String,
}

/// The databases that accept connections, are not templates, are valid (not half dropped) and
/// are listed in keel.database (all when it is empty).
fn databases() -> Vec<Database> {
    let wanted = guc::served_databases();
    BackgroundWorker::transaction(|| {
        let mut found = Vec::new();
        // SAFETY: a catalog scan of pg_database inside a transaction, the way the autovacuum
        // launcher does it; every tuple is read while the scan holds it, and the relation is
        // closed with the lock it was opened with.
        unsafe {
            let rel = pg_sys::table_open(
                pg_sys::DatabaseRelationId,
                pg_sys::AccessShareLock as pg_sys::LOCKMODE,
            );
            let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let form = pg_sys::GETSTRUCT(tuple) as pg_sys::Form_pg_database;
                let name = CStr::from_ptr((*form).datname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                // datconnlimit -2 marks a database whose DROP was interrupted (invalid).
                let usable =
                    (*form).datallowconn && !(*form).datistemplate && (*form).datconnlimit != -2;
                if usable && wanted.as_ref().is_none_or(|w| w.contains(&name)) {
                    found.push(Database {
                        oid: (*form).oid,
                        name,
                    });
                }
            }
            pg_sys::table_endscan(scan);
            pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        }
        found
    })
}

/// How many looks at databases whose pg_keel is unknown may run at once: each takes a
/// background worker slot for a moment, and a burst of them must not take all of them.
const MAX_LOOKS: usize = 2;

/// The launcher's own view of its workers: the postmaster handle of each slot's worker.
struct Launcher {
    handles: Vec<Option<DynamicBackgroundWorker>>,
    /// Each slot's wake relay (`queue::wake`), started once its worker runs, and when the last
    /// one ended (started again after RESTART_AFTER).
    wakers: Vec<Option<DynamicBackgroundWorker>>,
    waker_ended: Vec<Option<Instant>>,
    /// Wakers were stopped to leave their background worker slots to a database's worker.
    wakers_yielded: bool,
    /// Databases found without pg_keel, and when that look began: they hold no slot, and are
    /// looked at again only after a rescan request made later than that.
    not_installed: HashMap<pg_sys::Oid, i64>,
    /// Databases that found no background worker slot once: a second time in a row is logged
    /// (the first can be a moment when the launcher's own looks at other databases fill them).
    no_slot_once: HashSet<pg_sys::Oid>,
    /// Databases that found no slot twice in a row this round, for one log line.
    waiting_for_slot: Vec<(pg_sys::Oid, String)>,
    /// When each database was last named in that line: at most once in ten minutes.
    told_no_slot: HashMap<pg_sys::Oid, Instant>,
    told_full: bool,
}

impl Launcher {
    /// Starts the worker of slot `index` (already assigned to its database). The slot is set
    /// up before the worker can run, so nothing it writes is overwritten.
    fn start(&mut self, index: usize, name: &str) {
        let now = crate::pgtime::now_micros();
        let (generation, database) = registry::exclusive(|r| {
            r.generations = r.generations.wrapping_add(1).max(1);
            let generation = r.generations;
            let slot = &mut r.slots[index];
            slot.generation = generation;
            slot.started_at = now;
            slot.phase_at = now;
            slot.phase = Phase::Starting;
            slot.status = registry::WorkerStatus::default();
            (generation, slot.database)
        });
        // The worker finds its slot (low 8 bits) and generation in its argument.
        let arg = index | ((generation as usize) << 8);
        let loaded = start_dynamic(
            &format!("pg_keel worker {name}"),
            "pg_keel",
            "keel_worker_main",
            arg,
        );
        match loaded {
            Ok(handle) => {
                self.no_slot_once.remove(&database);
                self.handles[index] = Some(handle);
            }
            Err(_) => {
                registry::set_phase(index, generation, Phase::NoWorkerSlot, now);
                if !self.no_slot_once.insert(database) {
                    self.waiting_for_slot.push((database, name.to_string()));
                }
            }
        }
    }

    /// Whether the worker of slot `index` is still alive (registered, starting or running).
    fn alive(&self, index: usize) -> bool {
        use pgrx::bgworkers::BackgroundWorkerStatus::*;
        match self.handles[index].as_ref().map(|h| h.pid()) {
            Some(Ok(_)) | Some(Err(NotYetStarted)) => true,
            Some(Err(_)) | None => false,
        }
    }

    fn stop(&mut self, index: usize) {
        if let Some(handle) = self.handles[index].take() {
            let _terminating = handle.terminate();
        }
        self.stop_waker(index);
    }

    fn stop_waker(&mut self, index: usize) {
        if let Some(handle) = self.wakers[index].take() {
            let _terminating = handle.terminate();
        }
        self.waker_ended[index] = None;
    }

    /// Keeps a wake relay beside every running worker (and none beside the others). A relay
    /// only saves producers time (without one they NOTIFY themselves), a worker is needed: while
    /// a database waits for a background worker slot, every relay leaves its slot to it; with
    /// keel.wake_relay off in the configuration none runs.
    fn keep_wakers(&mut self) {
        use pgrx::bgworkers::BackgroundWorkerStatus::*;
        let slots = registry::snapshot().slots;
        // keel.wake_relay = off in postgresql.conf: no relays at all (their slots are free).
        let wanted = crate::guc::WAKE_RELAY.get();
        if !wanted || slots.iter().any(|s| s.phase == Phase::NoWorkerSlot) {
            for i in 0..MAX_DATABASES {
                if self.wakers[i].is_some() {
                    self.stop_waker(i);
                    self.wakers_yielded = true;
                }
            }
            return;
        }
        for (i, slot) in slots.iter().enumerate() {
            if slot.phase != Phase::Running || !self.alive(i) {
                self.stop_waker(i);
                continue;
            }
            let alive = match self.wakers[i].as_ref().map(|h| h.pid()) {
                Some(Ok(_)) | Some(Err(NotYetStarted)) => true,
                Some(Err(_)) => {
                    self.wakers[i] = None;
                    self.waker_ended[i] = Some(Instant::now());
                    false
                }
                None => false,
            };
            let due = self.waker_ended[i].is_none_or(|at| at.elapsed() >= RESTART_AFTER);
            if alive || !due {
                continue;
            }
            let arg = i | ((slot.generation as usize) << 8);
            let loaded = start_dynamic("pg_keel waker", "pg_keel waker", "keel_waker_main", arg);
            match loaded {
                Ok(handle) => self.wakers[i] = Some(handle),
                Err(_) => self.waker_ended[i] = Some(Instant::now()),
            }
        }
    }

    /// One look at the databases and the slots. `rescan_at`: when pg_keel was last installed
    /// somewhere (or a SIGHUP came): databases found without it before then are looked at again.
    fn round(&mut self, rescan_at: i64) {
        let wanted = databases();
        let now = crate::pgtime::now_micros();
        let slots = registry::snapshot().slots;
        // A background worker slot may have come free: databases waiting for one try at once.
        let mut freed = std::mem::take(&mut self.wakers_yielded);
        for (i, slot) in slots.iter().enumerate() {
            if slot.phase == Phase::Free {
                continue;
            }
            if self.handles[i].is_some() && !self.alive(i) {
                self.handles[i] = None;
                freed = true;
            }
            let gone = !wanted.iter().any(|d| d.oid == slot.database);
            let without_keel = slot.phase == Phase::NotInstalled && !self.alive(i);
            if without_keel {
                self.not_installed.insert(slot.database, slot.phase_at);
            }
            if gone || without_keel {
                // Gone, no longer listed, or without pg_keel: no worker, no slot.
                self.stop(i);
                registry::exclusive(|r| r.slots[i] = registry::Slot::default());
                freed = true;
            }
        }
        self.not_installed
            .retain(|db, _| wanted.iter().any(|d| d.oid == *db));
        let mut looks = registry::snapshot()
            .slots
            .iter()
            .filter(|s| s.phase == Phase::Starting)
            .count();
        for db in &wanted {
            let slots = registry::snapshot().slots;
            let index = match slots
                .iter()
                .position(|s| s.phase != Phase::Free && s.database == db.oid)
            {
                Some(i) => i,
                None => {
                    if self
                        .not_installed
                        .get(&db.oid)
                        .is_some_and(|looked_at| *looked_at >= rescan_at)
                    {
                        continue; // without pg_keel, and nothing new since
                    }
                    if looks >= MAX_LOOKS {
                        continue; // next round
                    }
                    let Some(free) = slots.iter().position(|s| s.phase == Phase::Free) else {
                        if !self.told_full {
                            log!(
                                "pg_keel launcher: serves at most {MAX_DATABASES} databases with \
                                 pg_keel; \"{}\" and any further ones get no worker (restrict \
                                 the list with keel.database)",
                                db.name
                            );
                            self.told_full = true;
                        }
                        continue;
                    };
                    self.not_installed.remove(&db.oid);
                    registry::exclusive(|r| {
                        r.slots[free] = registry::Slot {
                            database: db.oid,
                            phase: Phase::Exited,
                            phase_at: 0,
                            ..Default::default()
                        }
                    });
                    looks += 1;
                    free
                }
            };
            let slot = registry::snapshot().slots[index];
            let waited = now - slot.phase_at;
            let start = match slot.phase {
                Phase::Starting | Phase::Running => {
                    if !self.alive(index) {
                        // It ended without saying why (crashed, or could not connect).
                        registry::set_phase(index, slot.generation, Phase::Exited, now);
                    }
                    false
                }
                Phase::Exited => !self.alive(index) && waited >= micros(RESTART_AFTER),
                Phase::Paused => !self.alive(index) && waited >= micros(PAUSE),
                Phase::NoWorkerSlot => freed || waited >= micros(NO_SLOT_RETRY),
                Phase::NotInstalled | Phase::Free => false,
            };
            if start {
                self.start(index, &db.name);
            }
        }
        self.tell_waiting_for_slot();
        self.keep_wakers();
    }

    /// One log line a round at most, naming the databases that found no background worker
    /// slot twice in a row and were not named in the last ten minutes (some of them may turn
    /// out to be without pg_keel).
    fn tell_waiting_for_slot(&mut self) {
        let mut waiting = Vec::new();
        for (db, name) in std::mem::take(&mut self.waiting_for_slot) {
            let told_lately = self
                .told_no_slot
                .get(&db)
                .is_some_and(|at| at.elapsed() < Duration::from_secs(600));
            if !told_lately {
                self.told_no_slot.insert(db, Instant::now());
                waiting.push(name);
            }
        }
        if waiting.is_empty() {
            return;
        }
        let shown: Vec<String> = waiting
            .iter()
            .take(10)
            .map(|n| format!("\"{n}\""))
            .collect();
        let more = waiting.len().saturating_sub(shown.len());
        log!(
            "pg_keel launcher: no background worker slot left for database {}{} \
             (max_worker_processes = {}); raise max_worker_processes. Trying again every {} s",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            // SAFETY: a setting fixed at server start, read only.
            unsafe { pg_sys::max_worker_processes },
            NO_SLOT_RETRY.as_secs()
        );
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn keel_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: the launcher reads only pg_database, a shared catalog.
    BackgroundWorker::connect_worker_to_spi(None, None);
    // Workers a previous launcher started are no longer tracked (their handles were its own):
    // stop them, and start every worker afresh.
    let orphans: Vec<(i32, pg_sys::Oid)> = registry::exclusive(|r| {
        // SAFETY: this process's pid and latch.
        r.launcher_pid = unsafe { pg_sys::MyProcPid };
        // SAFETY: this process's latch pointer (its PGPROC's latch, in shared memory, so the
        // same address in every backend), set at process start; copied by value.
        r.launcher_latch = unsafe { pg_sys::MyLatch } as usize;
        let pids = r
            .slots
            .iter()
            .filter(|s| s.status.pid != 0)
            .map(|s| (s.status.pid, s.database))
            .collect();
        r.slots = [registry::Slot::default(); MAX_DATABASES];
        pids
    });
    for (pid, database) in orphans {
        // Only a process of this cluster still connected to that database: a worker that
        // ended left its pid behind, and the pid may be another process's by now.
        // SAFETY: looks the pid up in the process array; the PGPROC is read while it is there.
        let ours = unsafe {
            let proc = pg_sys::BackendPidGetProc(pid);
            !proc.is_null() && (*proc).databaseId == database
        };
        if ours {
            // SAFETY: a signal to a backend of this cluster (same OS user).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    log!("pg_keel launcher started");
    let mut launcher = Launcher {
        handles: (0..MAX_DATABASES).map(|_| None).collect(),
        wakers: (0..MAX_DATABASES).map(|_| None).collect(),
        waker_ended: vec![None; MAX_DATABASES],
        wakers_yielded: false,
        not_installed: HashMap::new(),
        no_slot_once: HashSet::new(),
        waiting_for_slot: Vec::new(),
        told_no_slot: HashMap::new(),
        told_full: false,
    };
    // Whatever recovery left pending, the lease fence is settled now that it has ended.
    crate::queue::settle_fence();
    let mut nap = Duration::ZERO;
    while BackgroundWorker::wait_latch(Some(nap)) && !super::process::stop_requested() {
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereads postgresql.conf at the top of the loop, outside any transaction,
            // as the postmaster asked (SIGHUP).
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            // The list may have changed: every database is looked at again.
            registry::exclusive(|r| r.rescan_at = crate::pgtime::now_micros());
        }
        let rescan_at = registry::snapshot().rescan_at;
        launcher.round(rescan_at);
        // A worker that ends sets this latch (bgw_notify_pid): looks waiting for their turn
        // go as soon as one ends.
        nap = SCAN_EVERY;
    }
    for i in 0..MAX_DATABASES {
        launcher.stop(i);
    }
    registry::exclusive(|r| {
        r.launcher_pid = 0;
        r.launcher_latch = 0;
    });
    log!("pg_keel launcher stopping; its workers stop with it");
    // Exit code 1: the postmaster starts the launcher again (never during a shutdown).
    // SAFETY: ends this process the way PostgreSQL's own workers do; nothing of ours is held.
    unsafe { pg_sys::proc_exit(1) };
}
