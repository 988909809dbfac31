//! Transaction-scoped locks that no other role can take, see or predict into a stall.
//!
//! 0.1.0 serialized enqueue against drop_queue, and emits of one aggregate, on advisory locks
//! with keys any login role could compute (`pg_advisory_lock(1801807212, hashtext(queue))`)
//! and take first, stalling every producer of that queue or aggregate until `lock_timeout`.
//! Advisory locks are open to every role by design, and a secret key would not help: their
//! keys are listed in `pg_locks`, which everyone can read.
//!
//! These are *object* locks (`LockDatabaseObject`) under a class id that is not a catalog:
//! Postgres takes object locks only for the objects its DDL works on, with a catalog's oid as
//! the class, so no SQL a role can run reaches this key space. They conflict, wait, time out
//! (`lock_timeout`) and join deadlock detection like any heavyweight lock, and are released at
//! the end of the transaction.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Class id of every keel lock ('keel' in ASCII, the class id 0.1.0's advisory locks used).
/// Never a catalog oid: those are below 10000 (FirstNormalObjectId is 16384).
const KEEL_LOCK_CLASS: u32 = 1_801_807_212;

/// Object id and sub-id for a key: 48 bits of FNV-1a. Two keys that collide only wait for
/// each other, which is safe.
fn lock_key(parts: &[&[u8]]) -> (u32, u16) {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(std::iter::once(&0xffu8)) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    // Truncation on purpose: the low 32 bits and the next 16.
    (hash as u32, (hash >> 32) as u16)
}

fn lock(kind: u8, parts: &[&[u8]], mode: pg_sys::LOCKMODE) {
    let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
    let kind = [kind];
    all.push(&kind);
    all.extend_from_slice(parts);
    let (objid, subid) = lock_key(&all);
    // SAFETY: LockDatabaseObject is called in a transaction (SQL functions run in one); it
    // reports failures (deadlock, lock_timeout, cancel) with ereport, which pgrx's guard turns
    // into a Postgres error instead of unwinding through C.
    unsafe {
        pg_sys::LockDatabaseObject(
            pg_sys::Oid::from(KEEL_LOCK_CLASS),
            pg_sys::Oid::from(objid),
            subid,
            mode,
        )
    }
}

/// Enqueue takes it shared, drop_queue exclusive: a drop waits for enqueues in flight and
/// an enqueue after the drop sees no queue.
#[pg_extern(volatile, parallel_unsafe, name = "_lock_queue")]
fn lock_queue(queue: &str, exclusive: bool) {
    let mode = if exclusive {
        pg_sys::AccessExclusiveLock
    } else {
        pg_sys::AccessShareLock
    };
    lock(b'q', &[queue.as_bytes()], mode as pg_sys::LOCKMODE);
}

/// Emits for one aggregate of a topic commit one after the other.
#[pg_extern(volatile, parallel_unsafe, name = "_lock_aggregate")]
fn lock_aggregate(topic: &str, aggregate_id: &str) {
    lock(
        b'a',
        &[topic.as_bytes(), aggregate_id.as_bytes()],
        pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
    );
}

#[cfg(test)]
mod tests {
    use super::lock_key;

    #[test]
    fn keys_differ_by_every_part_and_its_boundary() {
        assert_ne!(lock_key(&[b"q", b"ab"]), lock_key(&[b"q", b"a", b"b"]));
        assert_ne!(lock_key(&[b"q", b"a"]), lock_key(&[b"a", b"a"]));
        assert_eq!(lock_key(&[b"q", b"jobs"]), lock_key(&[b"q", b"jobs"]));
    }
}
