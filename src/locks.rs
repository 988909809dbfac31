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
//!
//! A key is 48 bits of SHA-256 over the install's secret (the outbox epoch, 64 random bits
//! only pg_keel's owner reads) and the name: a producer who sees another's lock in `pg_locks`
//! cannot pick an aggregate id or queue name of its own that lands on the same key.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Class id of every keel lock ('keel' in ASCII, the class id 0.1.0's advisory locks used).
/// Never a catalog oid: those are below 10000 (FirstNormalObjectId is 16384).
const KEEL_LOCK_CLASS: u32 = 1_801_807_212;

/// Object id and sub-id for a key: 48 bits of SHA-256 over the secret and each part with its
/// length. Two keys that collide only wait for each other, which is safe.
fn lock_key(secret: &[u8], parts: &[&[u8]]) -> (u32, u16) {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update((secret.len() as u64).to_le_bytes());
    hash.update(secret);
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    let d = hash.finalize();
    (
        u32::from_le_bytes([d[0], d[1], d[2], d[3]]),
        u16::from_le_bytes([d[4], d[5]]),
    )
}

thread_local! {
    /// The secret, with the oid of the table it was read from (a new install has another).
    static SECRET: std::cell::RefCell<Option<(pg_sys::Oid, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The install's secret; read once per backend and install, as pg_keel's owner (whoever the
/// caller: `enqueue` is SECURITY INVOKER).
fn secret() -> Vec<u8> {
    let relid = crate::relation::keel_relid(c"outbox_instance");
    if let Some(s) = SECRET.with_borrow(|s| {
        s.as_ref()
            .filter(|(r, _)| *r == relid)
            .map(|(_, v)| v.clone())
    }) {
        return s;
    }
    let epoch: Option<String> =
        crate::owner::as_owner(crate::owner::of(c"outbox_instance"), || {
            Spi::get_one("SELECT epoch FROM keel.outbox_instance LIMIT 1")
                .ok()
                .flatten()
        });
    let value = epoch.unwrap_or_default().into_bytes();
    SECRET.set(Some((relid, value.clone())));
    value
}

fn lock(kind: u8, parts: &[&[u8]], mode: pg_sys::LOCKMODE) {
    let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
    let kind = [kind];
    all.push(&kind);
    all.extend_from_slice(parts);
    let (objid, subid) = lock_key(&secret(), &all);
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

/// Takes the lock of a concurrency key of a queue if it is free, for the rest of the
/// transaction: claims of a queue with max_running_per_key decide one key at a time
/// (`keel._claim_flow`, sql/queue.sql); false when another transaction holds it (the claim
/// passes over the key, as SKIP LOCKED passes over a row, and so never waits nor deadlocks).
#[pg_extern(volatile, parallel_unsafe, name = "_try_lock_key")]
fn try_lock_key(queue: &str, key: &str) -> bool {
    try_lock(
        &[b"k", queue.as_bytes(), key.as_bytes()],
        pg_sys::ExclusiveLock,
    )
}

/// A rate-limit policy's lock (see `lock_limit`) taken shared if no transaction holds it
/// exclusive, for the rest of the transaction: the worker's snapshot, which must not wait for
/// a rate_reset or alter_limit left open (it also dispatches the outbox), skips the policy's
/// keys this time instead (they stay to be written by the next one).
pub(crate) fn try_lock_limit_shared(name: &str) -> bool {
    try_lock(&[b"l", name.as_bytes()], pg_sys::AccessShareLock)
}

/// Takes the keel lock of `parts` in `mode` if it is free now; never waits.
fn try_lock(parts: &[&[u8]], mode: u32) -> bool {
    let (objid, subid) = lock_key(&secret(), parts);
    // What LockDatabaseObject builds (SET_LOCKTAG_OBJECT), for LockAcquire with dontWait.
    let tag = pg_sys::LOCKTAG {
        // SAFETY: set once when the backend connected to its database.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: KEEL_LOCK_CLASS,
        locktag_field3: objid,
        locktag_field4: subid,
        locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    };
    // SAFETY: in a transaction (a SQL function runs in one), a transaction-scoped lock
    // (sessionLock false) on a fully initialized tag; with dontWait it returns NOT_AVAIL instead
    // of waiting, and reports other failures (out of shared memory) with ereport, which pgrx's
    // guard turns into a Postgres error.
    let got = unsafe { pg_sys::LockAcquire(&tag, mode as pg_sys::LOCKMODE, false, true) };
    got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Enqueue takes it shared, drop_queue exclusive: a drop waits for enqueues in flight and
/// an enqueue after the drop sees no queue.
#[pg_extern(volatile, parallel_unsafe, name = "_lock_queue")]
pub(crate) fn lock_queue(queue: &str, exclusive: bool) {
    let mode = if exclusive {
        pg_sys::AccessExclusiveLock
    } else {
        pg_sys::AccessShareLock
    };
    lock(b'q', &[queue.as_bytes()], mode as pg_sys::LOCKMODE);
}

/// A rate-limit policy's lock: the worker's snapshot takes it shared (`ratelimit::snapshot`),
/// and rate_reset, drop_limit and alter_limit exclusive before they change the policy's keys,
/// so a snapshot's copy of a key is never written over what one of them did after the copy.
#[pg_extern(volatile, parallel_unsafe, name = "_lock_limit")]
pub(crate) fn lock_limit(name: &str, exclusive: bool) {
    let mode = if exclusive {
        pg_sys::AccessExclusiveLock
    } else {
        pg_sys::AccessShareLock
    };
    lock(b'l', &[name.as_bytes()], mode as pg_sys::LOCKMODE);
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
    fn keys_differ_by_every_part_its_boundary_and_the_secret() {
        let s = b"0123456789abcdef";
        assert_ne!(
            lock_key(s, &[b"q", b"ab"]),
            lock_key(s, &[b"q", b"a", b"b"])
        );
        assert_ne!(lock_key(s, &[b"q", b"a"]), lock_key(s, &[b"a", b"a"]));
        assert_eq!(lock_key(s, &[b"q", b"jobs"]), lock_key(s, &[b"q", b"jobs"]));
        assert_ne!(
            lock_key(s, &[b"q", b"jobs"]),
            lock_key(b"another", &[b"q", b"jobs"])
        );
    }
}
