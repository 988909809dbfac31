//! Shared memory of pg_keel: whether it exists, and the helpers its capabilities share. Each
//! capability owns its segments and sets them up in its own `init` (the queue totals in
//! `queue::stats`, the workers' registry in `worker::registry`, the lease fence and the
//! rate-limit tables in theirs); `_PG_init` calls them in turn, when preloaded, then
//! `mark_enabled`. This module imports none of them.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;

/// Set in the postmaster by `mark_enabled`, inherited by every backend it forks.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Copies `text` into a fixed buffer, cut at a character boundary, NUL-padded.
pub fn put_str<const N: usize>(buf: &mut [u8; N], text: &str) {
    let mut end = text.len().min(N - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    buf.fill(0);
    buf[..end].copy_from_slice(&text.as_bytes()[..end]);
}

pub fn get_str<const N: usize>(buf: &[u8; N]) -> String {
    let end = buf.iter().position(|b| *b == 0).unwrap_or(N);
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Every capability has requested its shared memory (from `_PG_init`).
pub fn mark_enabled() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether pg_keel has shared memory (it was preloaded).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// PostgreSQL's `AddinShmemInitLock`, the lock an extension's `shmem_startup_hook` holds
/// while it looks up or creates its segments: `&MainLWLockArray[21].lock` (a C macro, which
/// bindgen does not carry over; 21 in the lwlock lists of 15, 17 and 18).
///
/// # Safety
/// Only after the postmaster made the main LWLock array (in a `shmem_startup_hook`).
pub unsafe fn addin_shmem_init_lock() -> *mut pg_sys::LWLock {
    const ADDIN_SHMEM_INIT_LOCK: usize = 21;
    // SAFETY: MainLWLockArray holds NUM_FIXED_LWLOCKS (> 21) entries once shared memory is
    // up (the caller's promise); this takes the address of one, reading nothing.
    unsafe { &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock }
}
