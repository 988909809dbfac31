//! Shared memory of pg_keel, set up in `_PG_init` when preloaded: the per-queue totals here;
//! the workers' registry (`worker::registry`), the lease fence and the rate-limit tables in
//! their modules, registered from `init`.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

/// Queues whose totals are tracked; more queues than this simply go uncounted.
const MAX_COUNTED_QUEUES: usize = 1024;
const NAME_BYTES: usize = crate::names::MAX_NAME_LEN;

#[derive(Copy, Clone)]
struct QueueCount {
    name: [u8; NAME_BYTES],
    name_len: u8,
    enqueued: i64,
    completed: i64,
}

#[derive(Copy, Clone)]
pub struct QueueCounts {
    used: usize,
    entries: [QueueCount; MAX_COUNTED_QUEUES],
}

impl Default for QueueCounts {
    fn default() -> Self {
        let empty = QueueCount {
            name: [0; NAME_BYTES],
            name_len: 0,
            enqueued: 0,
            completed: 0,
        };
        QueueCounts {
            used: 0,
            entries: [empty; MAX_COUNTED_QUEUES],
        }
    }
}

// SAFETY: plain data (byte arrays and integers, Copy), no pointers: the same bytes mean the
// same in every process that maps the segment, and all zeros or `default` is a valid value.
unsafe impl PGRXSharedMemory for QueueCounts {}

// SAFETY: the name is unique among the shared-memory segments and LWLock tranches of
// pg_keel (every one is a distinct "pg_keel ..." string) and of PostgreSQL itself.
static QUEUE_COUNTS: PgLwLock<QueueCounts> = unsafe { PgLwLock::new(c"pg_keel queue counts") };

/// Set in the postmaster by `init`, inherited by every backend it forks.
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

pub fn init() {
    pg_shmem_init!(QUEUE_COUNTS);
    crate::worker::registry::init();
    crate::queue::init_shmem();
    crate::ratelimit::memory::init();
    crate::ratelimit::cache::init();
    crate::auth::init();
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Runs in a commit callback: must not raise.
pub fn add_queue_counts(queue: &str, enqueued: i64, completed: i64) {
    let bytes = queue.as_bytes();
    if !enabled() || bytes.len() > NAME_BYTES {
        return;
    }
    let mut counts = QUEUE_COUNTS.exclusive();
    let used = counts.used;
    let slot = match counts.entries[..used]
        .iter()
        .position(|e| &e.name[..e.name_len as usize] == bytes)
    {
        Some(i) => i,
        None if used < MAX_COUNTED_QUEUES => {
            let e = &mut counts.entries[used];
            e.name[..bytes.len()].copy_from_slice(bytes);
            e.name_len = bytes.len() as u8;
            counts.used += 1;
            used
        }
        None => return,
    };
    let e = &mut counts.entries[slot];
    e.enqueued = e.enqueued.saturating_add(enqueued);
    e.completed = e.completed.saturating_add(completed);
}

pub fn queue_counts() -> Vec<(String, i64, i64)> {
    if !enabled() {
        return Vec::new();
    }
    let counts = QUEUE_COUNTS.share();
    counts.entries[..counts.used]
        .iter()
        .map(|e| {
            let name = String::from_utf8_lossy(&e.name[..e.name_len as usize]).into_owned();
            (name, e.enqueued, e.completed)
        })
        .collect()
}
