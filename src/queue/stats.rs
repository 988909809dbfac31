//! Enqueued/completed totals per queue, kept in shared memory like pg_stat counters: they
//! count committed work since the server started. A backend collects its counts during the
//! transaction and adds them at commit (nothing on abort), so producers never contend on a
//! counter row. Without shared_preload_libraries there is no shared memory and no totals.

use std::cell::RefCell;

use pgrx::{register_xact_callback, PgXactCallbackEvent};

use crate::shmem;

thread_local! {
    /// (queue, enqueued, completed) accumulated by the current transaction.
    static PENDING: RefCell<Option<Vec<(String, i64, i64)>>> = const { RefCell::new(None) };
}

pub fn count_on_commit(queue: &str, enqueued: i64, completed: i64) {
    if !shmem::enabled() {
        return;
    }
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        let list = pending.get_or_insert_with(|| {
            register_xact_callback(PgXactCallbackEvent::Commit, flush);
            register_xact_callback(PgXactCallbackEvent::Abort, discard);
            Vec::new()
        });
        match list.iter_mut().find(|(q, _, _)| q == queue) {
            Some(entry) => {
                entry.1 += enqueued;
                entry.2 += completed;
            }
            None => list.push((queue.to_string(), enqueued, completed)),
        }
    });
}

fn take() -> Vec<(String, i64, i64)> {
    PENDING.with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.take()).unwrap_or_default())
}

fn flush() {
    for (queue, enqueued, completed) in take() {
        shmem::add_queue_counts(&queue, enqueued, completed);
    }
}

fn discard() {
    take();
}

pub fn snapshot() -> Vec<(String, i64, i64)> {
    shmem::queue_counts()
}
