//! This worker process: its slot in the registry (and the generation it was started for),
//! whether it was asked to stop, its status there, and whether its database is wanted by a
//! DROP or ALTER DATABASE. What the outbox dispatcher, the maintenance rounds and the wake
//! relay ask of the worker they run in; it depends on nothing but the registry.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use super::registry::{self, Phase, WorkerStatus};

/// SIGTERM arrived. pgrx forgets its flag once read, and both the main loop and the
/// maintenance rounds read it: whoever sees it first records it here for the others.
static STOP: AtomicBool = AtomicBool::new(false);

/// This worker's slot in the registry, and the generation of the slot it was started for.
static SLOT: AtomicUsize = AtomicUsize::new(usize::MAX);
static GENERATION: AtomicU32 = AtomicU32::new(0);

/// This process is the worker of slot `index` of `generation` (at its start).
pub fn set_slot(index: usize, generation: u32) {
    SLOT.store(index, Ordering::Relaxed);
    GENERATION.store(generation, Ordering::Relaxed);
}

/// True once the worker was asked to stop (SIGTERM: shutdown, pg_terminate_backend, or a
/// DROP DATABASE ... WITH (FORCE) of its database).
pub fn stop_requested() -> bool {
    if BackgroundWorker::sigterm_received() {
        STOP.store(true, Ordering::Relaxed);
    }
    STOP.load(Ordering::Relaxed)
}

/// Runs `f` on this worker's status in the registry (nothing when the slot was handed to
/// another worker meanwhile: a stopped worker never writes over its successor).
pub fn with_status(f: impl FnOnce(&mut WorkerStatus)) {
    let index = SLOT.load(Ordering::Relaxed);
    if index >= registry::MAX_DATABASES {
        return;
    }
    let generation = GENERATION.load(Ordering::Relaxed);
    registry::exclusive(|r| {
        let slot = &mut r.slots[index];
        if slot.generation == generation {
            f(&mut slot.status)
        }
    })
}

/// This worker's slot and the generation it was started for (None outside a worker).
pub fn own_slot() -> Option<(usize, u32)> {
    let index = SLOT.load(Ordering::Relaxed);
    (index < registry::MAX_DATABASES).then(|| (index, GENERATION.load(Ordering::Relaxed)))
}

/// Records that this worker dispatches to `destination` (a hash of a Redis and a prefix),
/// unless the running worker of another database already does: then returns that database,
/// and this one must not dispatch.
pub fn claim_destination(destination: u64) -> Option<pg_sys::Oid> {
    // SAFETY: this backend's database, a plain global set at connection.
    let here = unsafe { pg_sys::MyDatabaseId };
    let own = own_slot();
    registry::exclusive(|r| {
        let other = r
            .slots
            .iter()
            .find(|s| {
                s.database != here
                    && s.phase == registry::Phase::Running
                    && s.status.destination == destination
            })
            .map(|s| s.database);
        if let (None, Some((index, generation))) = (other, own) {
            let mine = &mut r.slots[index];
            if mine.generation == generation {
                mine.status.destination = destination;
            }
        }
        other
    })
}

/// Sets this worker's phase (why it ends) as of `at`, unless its slot belongs to another
/// worker by now.
pub fn set_phase(phase: Phase, at: i64) {
    if let Some((index, generation)) = own_slot() {
        registry::set_phase(index, generation, phase, at);
    }
}

/// Whether a DROP DATABASE or ALTER DATABASE (rename, tablespace) holds or waits for the
/// exclusive lock on this database: it needs every other connection gone, ours included, and
/// waits up to 5 s for them. DROP DATABASE takes the lock before it checks the caller's
/// privileges, so a role without any could make the worker leave by failing DROP DATABASE in a
/// loop: the lock must be held or wanted by a role that may drop or rename the database (its
/// owner or a superuser), as pg_locks shows.
pub fn database_wanted_exclusively() -> bool {
    if !exclusive_lock_wanted() {
        return false;
    }
    // SAFETY: this backend's database, set once when it connected.
    let here = unsafe { pg_sys::MyDatabaseId };
    BackgroundWorker::transaction(|| {
        Spi::connect_mut(|_| {
            crate::spi_plans::execute(WANTED_BY_OWNER, &[crate::spi_plans::param(here)])
                .get::<bool>(0, 1)
        })
    })
    .unwrap_or(false)
}

/// Whether a role that may drop or rename database $1 holds or waits for its exclusive lock.
const WANTED_BY_OWNER: &str = "SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_locks l
      JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
      JOIN pg_catalog.pg_database d ON d.oid = l.objid
      JOIN pg_catalog.pg_roles r ON r.oid = a.usesysid
     WHERE l.locktype = 'object' AND l.classid = 'pg_catalog.pg_database'::pg_catalog.regclass
       AND l.objid = $1 AND l.mode = 'AccessExclusiveLock'
       AND (r.rolsuper OR pg_catalog.pg_has_role(a.usesysid, d.datdba, 'MEMBER')))";

fn exclusive_lock_wanted() -> bool {
    // SAFETY: a conditional session-level lock on this database's object, released at once
    // when granted; no transaction or resource owner is needed for a session lock.
    unsafe {
        let tag = pg_sys::LOCKTAG {
            locktag_field1: 0, // shared object: no database
            locktag_field2: pg_sys::DatabaseRelationId.to_u32(),
            locktag_field3: pg_sys::MyDatabaseId.to_u32(),
            locktag_field4: 0,
            locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
            locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
        };
        let mode = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let got = pg_sys::LockAcquire(&tag, mode, true, true);
        if got == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL {
            return true;
        }
        pg_sys::LockRelease(&tag, mode, true);
        false
    }
}
