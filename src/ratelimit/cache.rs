//! A per-backend cache of named policies, so a decision does not read `keel.rate_limits` on
//! every call. An entry is used while the shared generation it was read under is unchanged
//! and for at most `MAX_AGE`. create_limit, alter_limit and drop_limit bump the generation when
//! their transaction commits (not before: until then the old policy is the committed one).
//! Without shared memory (not preloaded) nothing is cached.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

/// Bounds staleness after changes that bypass the functions (a restore, a DROP EXTENSION).
const MAX_AGE: Duration = Duration::from_secs(1);

// SAFETY: the name is unique among the shared-memory segments of pg_keel (every one is a
// distinct "pg_keel ..." string) and of PostgreSQL itself.
static GENERATION: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"pg_keel rate policy generation") };

pub fn init() {
    pg_shmem_init!(GENERATION);
}

thread_local! {
    static ENTRIES: RefCell<HashMap<String, (u64, Instant, super::algo::Policy)>> =
        RefCell::new(HashMap::new());
}

fn generation() -> Option<u64> {
    crate::shmem::enabled().then(|| GENERATION.get().load(Ordering::Acquire))
}

/// The cached policy `name`, or `read()` (whose result is cached).
pub fn policy(name: &str, read: impl FnOnce() -> super::algo::Policy) -> super::algo::Policy {
    let Some(now) = generation() else {
        return read();
    };
    let hit = ENTRIES.with_borrow(|e| {
        e.get(name)
            .filter(|(g, at, _)| *g == now && at.elapsed() < MAX_AGE)
            .map(|(_, _, p)| p.clone())
    });
    if let Some(p) = hit {
        return p;
    }
    let p = read();
    ENTRIES.with_borrow_mut(|e| {
        if e.len() > 1000 {
            e.clear();
        }
        e.insert(name.to_string(), (now, Instant::now(), p.clone()));
    });
    p
}

/// Policies change when this transaction commits. Returns true (callable from PL/pgSQL).
#[pg_extern(volatile, parallel_unsafe, name = "_rate_policies_changed")]
fn policies_changed() -> bool {
    if !crate::shmem::enabled() {
        return true;
    }
    crate::xact::on_commit(crate::xact::OnCommit::PoliciesChanged);
    true
}

/// A transaction that changed policies committed: every backend's cached policies are stale.
/// Raises nothing; only asked for (`policies_changed`) when shared memory is enabled, so
/// GENERATION is initialized.
pub fn bump_generation() {
    GENERATION.get().fetch_add(1, Ordering::AcqRel);
}
