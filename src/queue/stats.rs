//! Enqueued/completed totals per queue, kept in shared memory like pg_stat counters: they
//! count committed work since the server started. A backend collects its counts during the
//! transaction and adds them to shared memory at commit (dropping them on abort), so producers
//! never contend on a counter row and the request path costs a few hundred nanoseconds.
//! Without shared_preload_libraries there is no shared memory and no totals.
//!
//! Counts made inside a subtransaction that later rolls back are still added at commit.

use std::cell::RefCell;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

use crate::shmem;

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

/// Sets up the totals' segment (from `queue::init_shmem`, in `_PG_init`).
pub fn init() {
    pg_shmem_init!(QUEUE_COUNTS);
}

thread_local! {
    /// (queue, enqueued, completed) accumulated by the current transaction.
    static PENDING: RefCell<Vec<(String, i64, i64)>> = const { RefCell::new(Vec::new()) };
}

pub fn count_on_commit(queue: &str, enqueued: i64, completed: i64) {
    if !shmem::enabled() {
        return;
    }
    // The transaction callback (`crate::xact`) calls `at_commit` or `at_abort`.
    crate::xact::register();
    PENDING.with_borrow_mut(|list| match list.iter_mut().find(|(q, _, _)| q == queue) {
        Some(entry) => {
            entry.1 += enqueued;
            entry.2 += completed;
        }
        None => list.push((queue.to_string(), enqueued, completed)),
    });
}

/// The transaction committed: its counts go to shared memory. Raises nothing.
pub fn at_commit() {
    for (queue, enqueued, completed) in take_pending() {
        add_queue_counts(&queue, enqueued, completed);
    }
}

/// The transaction aborted or was prepared: its counts are dropped (a prepared one commits
/// later, in another session, which never sees them). Raises nothing.
pub fn at_abort() {
    take_pending();
}

fn take_pending() -> Vec<(String, i64, i64)> {
    PENDING.with(|p| {
        p.try_borrow_mut()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    })
}

/// Runs in a commit callback: must not raise.
fn add_queue_counts(queue: &str, enqueued: i64, completed: i64) {
    let bytes = queue.as_bytes();
    if !shmem::enabled() || bytes.len() > NAME_BYTES {
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

/// The totals of every counted queue: (queue, enqueued, completed).
pub fn snapshot() -> Vec<(String, i64, i64)> {
    if !shmem::enabled() {
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
