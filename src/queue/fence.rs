//! The lease fence: a lease handed out before a crash is never equal to one handed out after it.
//!
//! Why it is needed: with `keel.lease_commit = async` a claim returns its lease before its
//! commit is on disk. A crash right then forgets the claim; the job is ready again at the same
//! attempt, and the next claim would hand out the very (job_id, attempt) the first consumer
//! still holds ("a ghost"), so the ghost's ack, fail or extend would act on the new lease.
//!
//! How it is kept, in two rules:
//! 1. Only a job's *first* claim may commit without waiting for the WAL flush. A claim that
//!    hands out any other attempt (a retry, an expired lease taken over, a job claimed again
//!    after a crash) waits for the flush, and that flush also makes every earlier lease write
//!    of the job durable. So a crash can forget at most one lease per job: attempt 1.
//! 2. After a crash, a job never claimed that was enqueued and due before the server came back
//!    may have been handed out as attempt 1 by a claim the crash forgot; its first claim now
//!    skips that number and hands out attempt 2 (without counting it as one of its tries).
//!    The time the server came back is the *fence*. It is kept in shared memory for this
//!    server's life and in the file `pg_keel_lease_fence` in the data directory, written
//!    and flushed before any backend can claim, so a later clean restart still knows it.
//!
//! Whether the last life of the server ended in a crash is read from `global/pg_control` when
//! shared memory is set up (at start, and again after every crash restart), before recovery
//! runs: anything but a clean shutdown fences. A server that starts in recovery (a standby, a
//! restored backup) fences when it first hands out a lease after recovery has ended, since
//! whatever the old primary handed out and did not replicate is as lost as a crash's.
//!
//! Without shared_preload_libraries nothing can tell a crash apart, so every claim waits for
//! the flush (rule 1 with no exception) and no ghost can arise.

use std::sync::atomic::{AtomicI64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

/// No fence: the last life of the server ended cleanly.
const NONE: i64 = i64::MIN;
/// The server started in recovery: it fences at its first lease after recovery ends.
const PENDING: i64 = i64::MIN + 1;

/// The fence of this server's life (microseconds since 2000-01-01, PostgreSQL's timestamp),
/// or NONE / PENDING.
// SAFETY: the name is unique among the shared-memory segments of pg_keel (every one is a
// distinct "pg_keel ..." string) and of PostgreSQL itself.
static FENCE: PgAtomic<AtomicI64> = unsafe { PgAtomic::new(c"pg_keel lease fence") };

pub fn init() {
    // The expression is evaluated in the postmaster each time shared memory is (re)created: at
    // start and after a crash restart, always before the startup process replays any WAL.
    pg_shmem_init!(FENCE = AtomicI64::new(fence_at_start()));
}

/// Where the fence outlives the server (relative to the data directory, every process's
/// working directory).
const FENCE_FILE: &str = "pg_keel_lease_fence";

fn fence_at_start() -> i64 {
    match last_life() {
        LastLife::Clean => kept_fence().unwrap_or(NONE),
        LastLife::InRecovery => PENDING,
        LastLife::Crashed => {
            let now = crate::pgtime::now_micros();
            keep_fence(now);
            now
        }
    }
}

/// The fence of an earlier life, if one was kept.
fn kept_fence() -> Option<i64> {
    std::fs::read_to_string(FENCE_FILE)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Writes the fence durably (a new file, flushed, renamed over the old one, the directory
/// flushed): a clean restart after this crash still fences. A failure is logged; the fence
/// still holds for this life.
fn keep_fence(at: i64) {
    use std::io::Write;
    let tmp = format!("{FENCE_FILE}.tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(at.to_string().as_bytes())?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, FENCE_FILE))
        .and_then(|_| std::fs::File::open(".")?.sync_all());
    if let Err(e) = written {
        log!("pg_keel: could not keep the lease fence in {FENCE_FILE}: {e}");
    }
}

enum LastLife {
    Clean,
    Crashed,
    InRecovery,
}

/// How the server's last life ended, from the control file (the postmaster's working directory
/// is the data directory). Unreadable counts as a crash: fencing is always safe.
fn last_life() -> LastLife {
    use pg_sys::DBState::*;
    if std::path::Path::new("standby.signal").exists()
        || std::path::Path::new("recovery.signal").exists()
    {
        return LastLife::InRecovery;
    }
    // ControlFileData starts with system_identifier (8 bytes), pg_control_version and
    // catalog_version_no (4 each), then state: the same in every supported version.
    let state = std::fs::read("global/pg_control")
        .ok()
        .and_then(|bytes| bytes.get(16..20)?.try_into().ok())
        .map(u32::from_ne_bytes);
    match state {
        Some(DB_SHUTDOWNED) => LastLife::Clean,
        Some(DB_SHUTDOWNED_IN_RECOVERY) | Some(DB_IN_ARCHIVE_RECOVERY) => LastLife::InRecovery,
        _ => LastLife::Crashed,
    }
}

/// What a claim needs to know about crashes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fence {
    /// Not preloaded: a crash cannot be told apart, so every lease waits for the flush.
    Unknown,
    /// Jobs never claimed, enqueued and due before this time, skip attempt 1 (None: no crash
    /// to fence).
    Known(Option<i64>),
}

/// The fence of this server's life. Never raises.
pub fn current() -> Fence {
    if !crate::shmem::enabled() {
        return Fence::Unknown;
    }
    let fence = FENCE.get();
    match fence.load(Ordering::Acquire) {
        NONE => Fence::Known(None),
        PENDING => {
            // SAFETY: both read shared state the server keeps for every backend.
            if unsafe { pg_sys::RecoveryInProgress() } {
                return Fence::Known(None); // a standby hands out no lease
            }
            let now = crate::pgtime::now_micros();
            match fence.compare_exchange(PENDING, now, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    keep_fence(now);
                    Fence::Known(Some(now))
                }
                Err(other) => Fence::Known((other != NONE).then_some(other)),
            }
        }
        at => Fence::Known(Some(at)),
    }
}
