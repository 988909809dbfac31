//! Shared memory of the workers: one slot per database the launcher serves, and the
//! launcher's own latch. The launcher owns the slots (it hands one to a database and frees
//! it); a database's worker writes only its own slot's status; client backends read them
//! (`worker_status()`) and set a worker's latch (a committed emit) or the launcher's (a
//! `CREATE EXTENSION pg_keel` that committed).

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

use crate::shmem::{get_str, put_str};

/// Databases one cluster's launcher serves at most (each also needs a background worker slot,
/// see max_worker_processes).
pub const MAX_DATABASES: usize = 64;

/// Where a database's worker is in its life, as the launcher sees it.
#[derive(Copy, Clone, PartialEq, Eq, Debug, Default)]
#[repr(u8)]
pub enum Phase {
    /// The slot serves no database.
    #[default]
    Free,
    /// Registered with the postmaster, not connected yet.
    Starting,
    /// Connected to its database, pg_keel installed.
    Running,
    /// It looked: pg_keel is not installed there. Looked at again when a CREATE EXTENSION
    /// pg_keel commits, or on SIGHUP.
    NotInstalled,
    /// It ended (terminated, crashed, could not connect): started again after RESTART_AFTER.
    Exited,
    /// It left because a DROP DATABASE or ALTER DATABASE wanted its database to itself:
    /// started again after PAUSE, if the database is still there.
    Paused,
    /// The postmaster had no background worker slot left (max_worker_processes).
    NoWorkerSlot,
}

/// What a database's worker is doing, for `keel.worker_status()`.
#[derive(Copy, Clone)]
pub struct WorkerStatus {
    pub pid: i32,
    /// The worker's latch (PGPROC lives in shared memory, at the same address in every
    /// backend); 0 while no worker runs.
    pub latch: usize,
    pub state: [u8; 512],
    pub redis_connected: bool,
    pub redis_target: [u8; 256],
    /// Redis target and key prefix this worker dispatches to, as a hash: two databases must not
    /// share one by accident (0: not dispatching).
    pub destination: u64,
    pub last_dispatch_at: i64,
    pub last_error: [u8; 512],
    pub last_error_at: i64,
    pub dispatched_total: i64,
    pub failed_total: i64,
    /// When the worker last went round its loop (PostgreSQL timestamp): it is alive and not
    /// stuck.
    pub last_loop_at: i64,
    /// Redis as last seen (every `REDIS_INFO_EVERY`), for keel.health(): 0 / empty when never.
    pub redis: RedisFigures,
}

/// Redis' figures as the worker last read them.
#[derive(Copy, Clone, Default)]
pub struct RedisFigures {
    pub at: i64,
    pub latency_us: i64,
    pub used_memory: i64,
    pub maxmemory: i64,
    pub evicted_keys: i64,
    pub role: [u8; 32],
    pub maxmemory_policy: [u8; 32],
}

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            pid: 0,
            latch: 0,
            state: [0; 512],
            redis_connected: false,
            redis_target: [0; 256],
            destination: 0,
            last_dispatch_at: 0,
            last_error: [0; 512],
            last_error_at: 0,
            dispatched_total: 0,
            failed_total: 0,
            last_loop_at: 0,
            redis: RedisFigures::default(),
        }
    }
}

#[derive(Copy, Clone, Default)]
pub struct Slot {
    pub database: pg_sys::Oid,
    /// Which start of a worker this slot is for: a worker that was stopped never writes over
    /// the slot of its successor (see `worker::process::with_status`).
    pub generation: u32,
    pub phase: Phase,
    /// When the phase last changed (PostgreSQL timestamp).
    pub phase_at: i64,
    /// When the worker was started last (PostgreSQL timestamp).
    pub started_at: i64,
    pub status: WorkerStatus,
}

#[derive(Copy, Clone)]
pub struct Registry {
    pub launcher_pid: i32,
    pub launcher_latch: usize,
    /// When a CREATE EXTENSION pg_keel last committed (or a SIGHUP came): a database found
    /// without pg_keel before then is looked at again (a look that began before the CREATE
    /// EXTENSION committed saw nothing).
    pub rescan_at: i64,
    /// Generations handed out so far (never reset while the server runs).
    pub generations: u32,
    pub slots: [Slot; MAX_DATABASES],
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            launcher_pid: 0,
            launcher_latch: 0,
            rescan_at: 0,
            generations: 0,
            slots: [Slot::default(); MAX_DATABASES],
        }
    }
}

// SAFETY: plain data (integers, byte arrays, an enum of u8), no pointers into process memory:
// the latches are addresses inside shared memory, the same in every backend.
unsafe impl PGRXSharedMemory for Registry {}

// SAFETY: the name is unique among the shared-memory segments and LWLock tranches of
// pg_keel (every one is a distinct "pg_keel ..." string) and of PostgreSQL itself.
static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"pg_keel workers") };

pub fn init() {
    pg_shmem_init!(REGISTRY);
}

/// Runs `f` on the whole registry under its exclusive lock: only the worker module writes it.
pub(super) fn exclusive<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    f(&mut REGISTRY.exclusive())
}

/// A copy of the registry (never holds the lock while the caller works).
pub fn snapshot() -> Registry {
    *REGISTRY.share()
}

/// Sets the phase of slot `index` as of `at`, if the slot still belongs to `generation` (a
/// worker that was stopped never writes over its successor).
pub fn set_phase(index: usize, generation: u32, phase: Phase, at: i64) {
    let mut r = REGISTRY.exclusive();
    let slot = &mut r.slots[index];
    if slot.generation == generation {
        slot.phase = phase;
        slot.phase_at = at;
    }
}

pub fn set_state(status: &mut WorkerStatus, state: &str) {
    if get_str(&status.state) != state {
        put_str(&mut status.state, state);
    }
}

/// Sets the latch of this database's worker, if one runs. Safe in a commit callback: takes one
/// LWLock and raises nothing.
pub fn wake_worker() {
    if !crate::shmem::enabled() {
        return;
    }
    // SAFETY: MyDatabaseId is this backend's database, set once at connection.
    let here = unsafe { pg_sys::MyDatabaseId };
    let r = REGISTRY.share();
    if let Some(slot) = r
        .slots
        .iter()
        .find(|s| s.database == here && s.status.latch != 0)
    {
        // SAFETY: the latch is the worker's PGPROC latch in shared memory; setting a latch of
        // a process that just exited is harmless (PGPROC latches are never freed).
        unsafe { pg_sys::SetLatch(slot.status.latch as *mut pg_sys::Latch) };
    }
}

/// Asks the launcher to look at the databases without pg_keel again (a CREATE EXTENSION
/// committed). Safe in a commit callback.
pub fn wake_launcher() {
    if !crate::shmem::enabled() {
        return;
    }
    let mut r = REGISTRY.exclusive();
    r.rescan_at = crate::pgtime::now_micros();
    if r.launcher_latch != 0 {
        // SAFETY: as in wake_worker, a latch in shared memory.
        unsafe { pg_sys::SetLatch(r.launcher_latch as *mut pg_sys::Latch) };
    }
}
