//! Durability `memory`: key states in a fixed-capacity table in shared memory behind one
//! LWLock. A decision takes the lock, runs the pure core and writes the slot: no WAL, no row
//! lock. The background worker copies changed slots to `keel.rate_limit_state` every
//! `keel.rate_snapshot_interval` (and once more when it stops at shutdown), and a key missing
//! from memory is loaded from that table first, so a restart forgets nothing and a crash at
//! most one interval.
//!
//! Every database has its own keys (policies are per database): a slot and a denial carry the
//! database's oid, and each database's worker writes only its own.
//!
//! A key whose policy name and key do not fit in `KEY_BYTES`, or that finds its neighbourhood
//! of slots full of live keys, is decided on the durable path (with a WARNING): never a wrong
//! answer, only a slower one. A slot whose state is back to full capacity is free again: it
//! means the same as no state at all.
//!
//! A key has one authority at a time. A decision that goes to the durable path holds the key's
//! *elsewhere bucket* (one of `ELSEWHERE`, by hash) until its transaction ends; while a bucket
//! is held, and when one was released between a loader's read of the table and its taking a
//! slot (the bucket's generation moved), no key of that bucket enters memory: its decisions
//! also go to the table, where the row lock orders them. Without this, a key decided in the
//! table while another session loaded it into a slot that had just freed up could lose the
//! table-side decision (one call too many allowed).
//!
//! `keel.check_many` decides several keys at once: `pin` gives each memory key a slot that no
//! other key may take until `decide_many` (or the transaction's end), which decides every key
//! under one hold of the lock and applies all or none.
//!
//! A key of a concurrency limit (`keel.acquire`) keeps its held slots as a list of *holders*
//! (token, expiry) from a pool of `HOLDERS` shared by every such key; its state counts them and
//! its expiry is the latest of theirs, so the key's slot is free again once every holder has
//! expired. A snapshot writes the key's live holders to `keel.rate_limit_slots` and a load
//! reads them back. A key that cannot take its holders from the pool when it loads is decided
//! on the durable path like a key with no room; one already in memory that needs one more
//! holder when the pool is full is refused with 53200 (never a wrong answer).

use std::cell::Cell;
use std::time::Instant;

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgLwLock};

use super::algo::{self, Decision, Limit, State};
use crate::pgtime::now_micros;

pub const SLOTS: usize = 65_536;
/// Slots a key may occupy, from its hash's home slot on.
const NEIGHBOURHOOD: usize = 16;
/// Policy name and key together, in bytes.
pub const KEY_BYTES: usize = 192;
/// Denials buffered between snapshots; more are counted, not kept.
const DENIALS: usize = 1024;
/// Buffered denials at which a backend wakes the worker to write them early.
const WAKE_AT: usize = DENIALS / 2;
/// Elsewhere buckets (see the module's header): a held bucket sends 1/ELSEWHERE of the keys
/// not yet in memory to the table until the transaction that holds it ends.
const ELSEWHERE: usize = 1024;
/// Slots of concurrency limits held in memory at once, across keys and databases.
pub const HOLDERS: usize = 65_536;
/// How often a full pool of holders is swept for expired ones, at most (µs).
const SWEEP_EVERY: i64 = 100_000;

#[derive(Copy, Clone)]
#[repr(C)]
struct Slot {
    hash: u64,
    /// The database whose policy this is.
    db: u32,
    /// Bytes used in `id`; 0 = empty.
    len: u16,
    policy_len: u8,
    has_state: bool,
    /// Changed since the last snapshot that committed.
    dirty: bool,
    /// A concurrency limit's key: `state[0]` counts its holders.
    concurrency: bool,
    /// The table's change count at this slot's last change, so a snapshot clears `dirty` only
    /// for what it wrote (a counter of the whole table: a reused slot never repeats one).
    version: u64,
    /// The table's change count when the key took this slot: a snapshot that finds another
    /// value (or none) knows the key it copied was forgotten or moved out meanwhile.
    born: u64,
    id: [u8; KEY_BYTES],
    state: [i64; 3],
    /// µs; past it the state means full capacity.
    expires_at: i64,
    /// Pinned by `check_many`s under way: the slot is not free, even at full capacity.
    pins: u32,
    /// A concurrency limit's key's first holder, index + 1 (0: none).
    holders: u32,
}

const EMPTY_SLOT: Slot = Slot {
    hash: 0,
    db: 0,
    len: 0,
    policy_len: 0,
    has_state: false,
    dirty: false,
    concurrency: false,
    version: 0,
    born: 0,
    id: [0; KEY_BYTES],
    state: [0; 3],
    expires_at: 0,
    pins: 0,
    holders: 0,
};

/// A slot held of a concurrency limit's key (see the module's header).
#[derive(Copy, Clone)]
#[repr(C)]
struct Holder {
    token: [u8; 16],
    acquired_at: i64,
    /// µs; past it the slot is free by itself.
    expires_at: i64,
    /// The next holder of the same key, or the next free one: index + 1 (0 ends the list).
    next: u32,
}

/// A held slot as the table has it: token, acquired at and expires at (µs).
pub type HeldSlot = ([u8; 16], i64, i64);

/// A key's state as loaded from the table, and when it is back to full capacity (µs); for a
/// concurrency limit's key, its live slots.
pub struct Loaded {
    pub state: State,
    pub expires_at: i64,
    pub held: Vec<HeldSlot>,
}

/// Keys decided on the durable path right now, by hash (see the module's header).
#[derive(Copy, Clone)]
#[repr(C)]
struct Bucket {
    /// Transactions holding the bucket: they decided one of its keys in the table.
    held: u32,
    /// Releases so far: a loader whose read of the table predates one may have missed a
    /// decision the table now has.
    generation: u64,
}

#[derive(Copy, Clone)]
#[repr(C)]
struct Denial {
    db: u32,
    len: u16,
    policy_len: u8,
    id: [u8; KEY_BYTES],
    at: i64,
    cost: i64,
    retry_after_ms: i64,
    /// Denied only in the shadow of a policy that does not enforce (the call was allowed).
    shadow: bool,
}

/// All zeros is the empty table (every slot empty, no denials), which is how shared memory
/// initializes it: a value this size must never be built on a stack.
#[repr(C)]
pub struct RateTable {
    slots: [Slot; SLOTS],
    denials: [Denial; DENIALS],
    denials_used: usize,
    denials_dropped: i64,
    /// Changes to any slot since startup.
    changes: u64,
    elsewhere: [Bucket; ELSEWHERE],
    holders: [Holder; HOLDERS],
    /// The first free holder that was used before, index + 1 (0: none).
    holders_free: u32,
    /// Holders from this index on were never used (all zeros is an empty pool).
    holders_fresh: u32,
    /// When the full pool was last swept for expired holders (µs).
    swept_at: i64,
}

/// Guards the table below; it lives in its own shared-memory segment, zeroed at startup.
// SAFETY: the name is unique among the shared-memory segments and LWLock tranches of
// pg_keel (every one is a distinct "pg_keel ..." string) and of PostgreSQL itself.
static LOCK: PgLwLock<u8> = unsafe { PgLwLock::new(c"pg_keel rate limits") };
static mut TABLE: *mut RateTable = std::ptr::null_mut();
static mut PREV_REQUEST: Option<unsafe extern "C-unwind" fn()> = None;
static mut PREV_STARTUP: Option<unsafe extern "C-unwind" fn()> = None;
const SEGMENT: &std::ffi::CStr = c"pg_keel rate limit table";

pub fn init() {
    pg_shmem_init!(LOCK);
    // SAFETY: called once, from _PG_init while shared_preload_libraries are loaded (lib.rs),
    // in the single-threaded postmaster before any hook runs: the hook chain
    // is read and extended as every library does, keeping the previous hooks to call first.
    unsafe {
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_table);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(start_table);
    }
}

/// Requests the table's segment (after the hooks installed before this one).
///
/// # Safety
/// Called only by PostgreSQL as `shmem_request_hook`, in the postmaster, once `init`
/// installed it.
#[pg_guard]
unsafe extern "C-unwind" fn request_table() {
    // SAFETY: runs as the shmem_request_hook (the caller's promise), where
    // RequestAddinShmemSpace may be called; PREV_REQUEST was set once by `init` before the
    // hook was installed and is only read here, in the single-threaded postmaster.
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<RateTable>());
    }
}

/// Attaches the table's segment, zeroing it when this process creates it.
///
/// # Safety
/// Called only by PostgreSQL as `shmem_startup_hook`, after `request_table` reserved the
/// space, in the postmaster (and in each backend under EXEC_BACKEND).
#[pg_guard]
unsafe extern "C-unwind" fn start_table() {
    // SAFETY: runs as the shmem_startup_hook (the caller's promise), before any backend can
    // use the table. Under AddinShmemInitLock (`shmem::addin_shmem_init_lock`),
    // ShmemInitStruct returns the segment reserved for exactly
    // size_of::<RateTable>() bytes, MAXALIGNed, which is enough for RateTable's 8-byte
    // alignment; a new segment is zeroed, which is a valid, empty RateTable (integers, byte
    // arrays and `false` bools only). TABLE is written only here, before any reader.
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        let init_lock = crate::shmem::addin_shmem_init_lock();
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let table = pg_sys::ShmemInitStruct(
            SEGMENT.as_ptr(),
            std::mem::size_of::<RateTable>(),
            &mut found,
        )
        .cast::<RateTable>();
        if !found {
            std::ptr::write_bytes(table, 0, 1);
        }
        TABLE = table;
        pg_sys::LWLockRelease(init_lock);
    }
}

/// The table under the exclusive lock.
fn exclusive<R>(f: impl FnOnce(&mut RateTable) -> R) -> R {
    let _guard = LOCK.exclusive();
    // SAFETY: set at shared-memory startup before any backend runs; the lock is held.
    f(unsafe { &mut *TABLE })
}

/// The table under the shared lock.
fn shared<R>(f: impl FnOnce(&RateTable) -> R) -> R {
    let _guard = LOCK.share();
    // SAFETY: as above; readers only.
    f(unsafe { &*TABLE })
}

/// "policy" + "key" as one byte string, if it fits.
fn compose(policy: &str, key: &str) -> Option<([u8; KEY_BYTES], u16, u8)> {
    let (p, k) = (policy.as_bytes(), key.as_bytes());
    if p.len() + k.len() > KEY_BYTES || p.len() > u8::MAX as usize {
        return None;
    }
    let mut id = [0u8; KEY_BYTES];
    id[..p.len()].copy_from_slice(p);
    id[p.len()..p.len() + k.len()].copy_from_slice(k);
    Some((id, (p.len() + k.len()) as u16, p.len() as u8))
}

/// This backend's database.
fn here() -> u32 {
    // SAFETY: set once when the backend connected.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// FNV-1a over the id, with the policy length and the database mixed in (so "ab"+"c" differs
/// from "a"+"bc", and one database's key from another's).
fn hash(db: u32, id: &[u8], policy_len: u8) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(policy_len) ^ (u64::from(db) << 8);
    for b in id {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Slot {
    /// The key's state (None: never decided, or forgotten).
    fn current(&self) -> Option<State> {
        self.has_state.then(|| State {
            a: self.state[0],
            b: self.state[1],
            c: self.state[2],
        })
    }
}

impl RateTable {
    /// Keeps the state an allowed decision at `now` left in slot `i`, dirty for the snapshot.
    /// Its expiry never moves back (a later decision's `reset_after_ms`, rounded up to the
    /// millisecond, can end a little before an earlier one's): a snapshot writes a key only
    /// over an older expiry in the table (see `ratelimit::SNAPSHOT`).
    fn keep(&mut self, i: usize, now: i64, d: &Decision, next: State) {
        self.changes += 1;
        let s = &mut self.slots[i];
        let expires_at = now.saturating_add(d.reset_after_ms.saturating_mul(1000));
        s.expires_at = if s.has_state {
            expires_at.max(s.expires_at)
        } else {
            expires_at
        };
        s.has_state = true;
        s.state = [next.a, next.b, next.c];
        s.dirty = true;
        s.version = self.changes;
    }

    fn find(&self, h: u64, db: u32, id: &[u8], policy_len: u8) -> Option<usize> {
        let home = (h % SLOTS as u64) as usize;
        (0..NEIGHBOURHOOD).map(|i| (home + i) % SLOTS).find(|&i| {
            let s = &self.slots[i];
            s.len as usize == id.len()
                && s.hash == h
                && s.db == db
                && s.policy_len == policy_len
                && &s.id[..id.len()] == id
        })
    }

    /// An empty slot, or one whose state is back to full capacity and that no `check_many`
    /// has pinned (free to reuse).
    fn free(&self, h: u64, now: i64) -> Option<usize> {
        let home = (h % SLOTS as u64) as usize;
        (0..NEIGHBOURHOOD).map(|i| (home + i) % SLOTS).find(|&i| {
            let s = &self.slots[i];
            s.len == 0 || (s.expires_at <= now && s.pins == 0)
        })
    }

    /// Makes slot `i` key (h, db, id) with the state loaded from the table; false (slot `i`
    /// left empty) when the pool has no room for the key's held slots.
    fn take_slot(
        &mut self,
        i: usize,
        (h, db, id, policy_len): (u64, u32, &[u8], u8),
        loaded: Option<&Loaded>,
        now: i64,
    ) -> bool {
        self.clear_slot(i);
        self.changes += 1;
        let born = self.changes;
        let s = &mut self.slots[i];
        s.born = born;
        s.hash = h;
        s.db = db;
        s.len = id.len() as u16;
        s.policy_len = policy_len;
        s.id[..id.len()].copy_from_slice(id);
        let Some(loaded) = loaded else {
            return true;
        };
        s.has_state = true;
        s.state = [loaded.state.a, loaded.state.b, loaded.state.c];
        s.expires_at = loaded.expires_at;
        if loaded.held.is_empty() {
            return true;
        }
        s.concurrency = true;
        for &(token, acquired_at, expires_at) in &loaded.held {
            let Some(k) = self.take_holder(now) else {
                self.clear_slot(i);
                return false;
            };
            self.holders[k] = Holder {
                token,
                acquired_at,
                expires_at,
                next: self.slots[i].holders,
            };
            self.slots[i].holders = k as u32 + 1;
        }
        self.slots[i].state[0] = loaded.held.len() as i64;
        true
    }

    /// Empties slot `i`, giving its holders back to the pool.
    fn clear_slot(&mut self, i: usize) {
        let mut next = self.slots[i].holders;
        while next != 0 {
            let k = (next - 1) as usize;
            next = self.holders[k].next;
            self.give_holder(k);
        }
        self.slots[i] = EMPTY_SLOT;
    }

    /// A holder from the pool; when none is free, expired holders of every key are given back
    /// first. None: the pool is full of live slots.
    fn take_holder(&mut self, now: i64) -> Option<usize> {
        // A sweep reads every slot under the lock that every memory decision waits for: at
        // most one per SWEEP_EVERY while the pool stays full.
        if self.holders_free == 0
            && self.holders_fresh as usize >= HOLDERS
            && now.saturating_sub(self.swept_at) >= SWEEP_EVERY
        {
            self.swept_at = now;
            for i in 0..SLOTS {
                if self.slots[i].holders != 0 {
                    self.tidy(i, now);
                }
            }
        }
        if self.holders_free != 0 {
            let k = (self.holders_free - 1) as usize;
            self.holders_free = self.holders[k].next;
            return Some(k);
        }
        let k = self.holders_fresh as usize;
        if k >= HOLDERS {
            return None;
        }
        self.holders_fresh += 1;
        Some(k)
    }

    /// Takes holder `k` out of slot `i`'s list (`prev` the holder before it, None when it
    /// is the first) and gives it back to the pool.
    fn unlink(&mut self, i: usize, prev: Option<usize>, k: usize) {
        let next = self.holders[k].next;
        match prev {
            None => self.slots[i].holders = next,
            Some(p) => self.holders[p].next = next,
        }
        self.give_holder(k);
    }

    fn give_holder(&mut self, k: usize) {
        self.holders[k] = Holder {
            token: [0; 16],
            acquired_at: 0,
            expires_at: 0,
            next: self.holders_free,
        };
        self.holders_free = k as u32 + 1;
    }

    /// Gives slot `i`'s expired holders back; returns how many are live and the soonest
    /// expiry among them.
    fn tidy(&mut self, i: usize, now: i64) -> (i64, Option<i64>) {
        let (mut live, mut soonest) = (0, None::<i64>);
        let mut prev: Option<usize> = None;
        let mut next = self.slots[i].holders;
        while next != 0 {
            let k = (next - 1) as usize;
            next = self.holders[k].next;
            let expires_at = self.holders[k].expires_at;
            if expires_at > now {
                live += 1;
                soonest = Some(soonest.map_or(expires_at, |s| s.min(expires_at)));
                prev = Some(k);
                continue;
            }
            self.unlink(i, prev, k);
        }
        self.slots[i].state[0] = live;
        (live, soonest)
    }

    /// Slot `i` changed: dirty for the snapshot.
    fn touch(&mut self, i: usize) {
        self.changes += 1;
        self.slots[i].dirty = true;
        self.slots[i].version = self.changes;
    }

    /// Sends key hash `h` to the durable path until this transaction ends.
    fn hold_elsewhere(&mut self, h: u64) {
        let b = bucket(h);
        self.elsewhere[b].held = self.elsewhere[b].held.saturating_add(1);
        HELD.with_borrow_mut(|held| held.push(b));
        crate::xact::register();
    }

    /// May key hash `h`, not in memory, enter it with a state read from the table when the
    /// bucket's generation was `read_at`? Not while its bucket is held, nor when a holder
    /// released it since (the read may predate that holder's decision).
    fn may_load(&self, h: u64, read_at: u64) -> bool {
        let b = &self.elsewhere[bucket(h)];
        b.held == 0 && b.generation == read_at
    }
}

fn bucket(h: u64) -> usize {
    // The home slot uses the low bits; the bucket takes the high ones.
    ((h >> 48) as usize) % ELSEWHERE
}

thread_local! {
    /// Elsewhere buckets this transaction holds, one entry per hold.
    static HELD: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Slots this transaction pinned (index, hash), for `check_many`.
    static PINNED: std::cell::RefCell<Vec<(usize, u64)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether this transaction holds an elsewhere bucket or a pinned slot.
fn holds_anything() -> bool {
    HELD.with_borrow(|h| !h.is_empty()) || PINNED.with_borrow(|p| !p.is_empty())
}

/// Just before PREPARE TRANSACTION (from `crate::xact`): a memory key decided in the table
/// must stay out of memory until that decision is visible, which for a prepared transaction
/// is a COMMIT PREPARED in another session, later, without these callbacks: refused.
pub fn before_prepare() {
    if holds_anything() {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "pg_keel: a transaction that decided a memory rate-limit key in the table cannot be prepared",
            "Decide memory policies outside the two-phase transaction."
        );
    }
}

/// At the end of a transaction (commit, abort or PREPARE; from `crate::xact`): releases the
/// elsewhere buckets it held, after its table writes became visible (a commit's callbacks run
/// once the commit is), and the slots it still had pinned.
pub fn at_transaction_end() {
    let held = HELD.with_borrow_mut(std::mem::take);
    let pinned = PINNED.with_borrow_mut(std::mem::take);
    if held.is_empty() && pinned.is_empty() {
        return;
    }
    exclusive(|t| {
        for b in held {
            let bucket = &mut t.elsewhere[b];
            bucket.held = bucket.held.saturating_sub(1);
            bucket.generation = bucket.generation.wrapping_add(1);
        }
        unpin(t, &pinned);
    })
}

fn unpin(t: &mut RateTable, pinned: &[(usize, u64)]) {
    for &(i, h) in pinned {
        let s = &mut t.slots[i];
        if s.len > 0 && s.hash == h {
            s.pins = s.pins.saturating_sub(1);
        }
    }
}

/// Outcome of a memory decision.
pub enum Memory {
    Decided(Decision),
    /// Not kept in memory (key too long, or its neighbourhood full): use the durable path.
    Elsewhere,
}

/// What loading a missing key from the table found.
pub enum Load {
    Found(Loaded),
    /// No state: the key is at full capacity.
    Missing,
    /// The policy is no longer a memory policy (an alter_limit committed since the caller
    /// read it): decided in the table.
    Left,
}

/// How a missing key's state is loaded (from the table, outside the lock).
pub type Loader<'a> = &'a dyn Fn() -> Load;

thread_local! {
    static LAST_WARNING: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// At most one WARNING every ten seconds per backend.
fn warn_elsewhere(why: &str) {
    let due = LAST_WARNING
        .get()
        .is_none_or(|at| at.elapsed().as_secs() >= 10);
    if due {
        LAST_WARNING.set(Some(Instant::now()));
        warning!("pg_keel: rate limit key decided on the durable path: {why}");
    }
}

/// Runs `on_slot` on (policy, key)'s slot under the lock: the slot the key has, or else one it
/// takes, with its state loaded from the table first (`load`, outside the lock) unless
/// another session took it meanwhile. None when the key is to be decided on the durable path:
/// too long for a slot, or (after holding the key's elsewhere bucket) no room around it or
/// another transaction deciding it in the table (see the module's header).
fn on_key_slot<R>(
    policy: &str,
    key: &str,
    load: Loader,
    mut on_slot: impl FnMut(&mut RateTable, usize) -> R,
) -> Option<R> {
    let Some((id, len, policy_len)) = compose(policy, key) else {
        warn_elsewhere("policy name and key are longer than 192 bytes");
        return None;
    };
    let id = &id[..len as usize];
    let db = here();
    let h = hash(db, id, policy_len);
    let first = exclusive(|t| match t.find(h, db, id, policy_len) {
        Some(i) => Ok(on_slot(t, i)),
        None if t.elsewhere[bucket(h)].held > 0 => {
            t.hold_elsewhere(h);
            Err(None)
        }
        None => Err(Some(t.elsewhere[bucket(h)].generation)),
    });
    let read_at = match first {
        Ok(r) => return Some(r),
        Err(None) => return None, // another transaction decides it in the table
        Err(Some(generation)) => generation,
    };
    // Not in memory: load what the table has (the last snapshot, or a durable-path decision)
    // without holding the lock, then take a slot unless someone else did meanwhile.
    let loaded = match load() {
        Load::Found(loaded) => Some(loaded),
        Load::Missing => None,
        Load::Left => return None,
    };
    let placed = exclusive(|t| {
        if let Some(i) = t.find(h, db, id, policy_len) {
            return Ok(on_slot(t, i));
        }
        let now = now_micros();
        let free = t.free(h, now);
        let why = match free {
            Some(i) if t.may_load(h, read_at) => {
                if t.take_slot(i, (h, db, id, policy_len), loaded.as_ref(), now) {
                    return Ok(on_slot(t, i));
                }
                Some("the shared-memory pool of concurrency slots is full")
            }
            Some(_) => None,
            None => Some("the shared-memory table is full around this key"),
        };
        t.hold_elsewhere(h);
        Err(why)
    });
    match placed {
        Ok(r) => Some(r),
        Err(why) => {
            if let Some(why) = why {
                warn_elsewhere(why);
            }
            None
        }
    }
}

/// Decides a call of `cost` for (policy, key) in shared memory; a denial is buffered for the
/// log when `log_denial` is `Some(shadow)`.
pub fn decide(
    policy: &str,
    key: &str,
    limit: &Limit,
    cost: i64,
    log_denial: Option<bool>,
    load: Loader,
) -> Memory {
    on_key_slot(policy, key, load, |t, i| {
        apply(t, i, limit, cost, log_denial)
    })
    .map_or(Memory::Elsewhere, decided)
}

/// Gives (policy, key) a slot for a `decide_many` in this transaction, loading its state from
/// the table as `decide` does, and pins it: no other key takes the slot until `decide_many`
/// or the end of the transaction. False: the key is decided on the durable path (too long, no
/// room around it, or another transaction is deciding it in the table).
pub fn pin(policy: &str, key: &str, load: Loader) -> bool {
    on_key_slot(policy, key, load, |t, i| {
        let s = &mut t.slots[i];
        s.pins = s.pins.saturating_add(1);
        PINNED.with_borrow_mut(|p| p.push((i, s.hash)));
        crate::xact::register();
    })
    .is_some()
}

/// One key of an atomic multi-key decision, pinned by `pin`.
pub struct Want<'a> {
    pub policy: &'a str,
    pub key: &'a str,
    pub limit: &'a Limit,
    pub cost: i64,
    /// Buffer a denial for the log: Some(shadow).
    pub log_denial: Option<bool>,
    /// False: shadow mode; a denial here does not stop the others.
    pub enforce: bool,
}

/// A pinned key's slot went away (`rate_reset`, `drop_limit` or `alter_limit` forgot it
/// meanwhile): the caller raises a retryable error.
pub struct Vanished;

/// Decides every want under one hold of the lock: each enforcing want's decision must allow
/// and `others_allow` must hold for any to be applied; then all allowed ones are (a shadow
/// want that would deny consumes nothing). Denials are buffered for the log either way.
/// Returns each want's decision, in order (a cost-0 one for a want that would allow when none
/// was applied), and whether they were applied. Unpins the wants.
pub fn decide_many(wants: &[Want], others_allow: bool) -> Result<(Vec<Decision>, bool), Vanished> {
    let db = here();
    let (result, wake) = exclusive(|t| {
        let pinned = PINNED.with_borrow_mut(std::mem::take);
        unpin(t, &pinned);
        let now = now_micros();
        let mut slots = Vec::with_capacity(wants.len());
        for w in wants {
            let Some((id, len, policy_len)) = compose(w.policy, w.key) else {
                return (Err(Vanished), false);
            };
            let id = &id[..len as usize];
            let h = hash(db, id, policy_len);
            // Missing: forgotten since it was pinned, and maybe decided in the table since.
            let Some(i) = t.find(h, db, id, policy_len) else {
                return (Err(Vanished), false);
            };
            slots.push(i);
        }
        let decisions: Vec<(Decision, State)> = wants
            .iter()
            .zip(&slots)
            .map(|(w, &i)| algo::decide(w.limit, t.slots[i].current(), now, w.cost))
            .collect();
        let charge = others_allow
            && wants
                .iter()
                .zip(&decisions)
                .all(|(w, (d, _))| d.allowed || !w.enforce);
        let mut wake = false;
        let mut shown = Vec::with_capacity(wants.len());
        for ((w, &i), (d, next)) in wants.iter().zip(&slots).zip(&decisions) {
            // Would allow, but nothing is charged: the key as it is (a cost-0 decision).
            shown.push(if d.allowed && !charge {
                algo::decide(w.limit, t.slots[i].current(), now, 0).0
            } else {
                *d
            });
            if d.allowed {
                if charge {
                    t.keep(i, now, d, *next);
                }
            } else if let Some(shadow) = w.log_denial {
                wake |= buffer_denial(t, i, now, w.cost, d.retry_after_ms, shadow);
            }
        }
        (Ok((shown, charge)), wake)
    });
    if wake {
        crate::worker::registry::wake_worker();
    }
    result
}

/// A decision, after the lock is released: wakes the worker when this call's denial filled the
/// buffer to half, so a burst of denials is written early instead of overflowing it.
fn decided((d, wake): (Decision, bool)) -> Memory {
    if wake {
        crate::worker::registry::wake_worker();
    }
    Memory::Decided(d)
}

/// True when this database's denials fill at least half the buffer: its worker writes them
/// before its interval.
pub fn denials_waiting() -> bool {
    let db = here();
    shared(|t| {
        t.denials[..t.denials_used]
            .iter()
            .filter(|d| d.db == db)
            .count()
            >= WAKE_AT
    })
}

/// Applies a decision to slot `i`; also says whether to wake the worker (see [`decided`]).
fn apply(
    t: &mut RateTable,
    i: usize,
    limit: &Limit,
    cost: i64,
    log_denial: Option<bool>,
) -> (Decision, bool) {
    let now = super::clock::deciding_at(now_micros());
    let state = t.slots[i].current();
    let (d, next) = algo::decide(limit, state, now, cost);
    if d.allowed {
        t.keep(i, now, &d, next);
    } else if let Some(shadow) = log_denial {
        return (d, buffer_denial(t, i, now, cost, d.retry_after_ms, shadow));
    }
    (d, false)
}

/// Buffers a denial of slot `i`'s key for the log; true when the buffer is now half full (the
/// caller wakes the worker once the lock is released).
fn buffer_denial(
    t: &mut RateTable,
    i: usize,
    at: i64,
    cost: i64,
    retry_after_ms: i64,
    shadow: bool,
) -> bool {
    let s = &t.slots[i];
    let (id, len, policy_len, db) = (s.id, s.len, s.policy_len, s.db);
    if t.denials_used < DENIALS {
        t.denials[t.denials_used] = Denial {
            db,
            len,
            policy_len,
            id,
            at,
            cost,
            retry_after_ms,
            shadow,
        };
        t.denials_used += 1;
        // From half full on, every denial wakes its database's worker (cheap: a latch).
        return t.denials_used >= WAKE_AT;
    }
    t.denials_dropped += 1;
    false
}

/// What an acquire of a concurrency limit's key got.
pub struct Acquired {
    pub allowed: bool,
    /// The slot's token (in shadow mode, one that holds nothing); None when refused.
    pub token: Option<[u8; 16]>,
    /// Free slots left.
    pub remaining: i64,
    /// When refused: until the soonest held slot expires (ms, at least 1).
    pub retry_after_ms: i64,
}

/// Outcome of a memory acquire.
pub enum Acquire {
    Decided(Acquired),
    /// Not kept in memory (see [`Memory::Elsewhere`]): acquire in the table.
    Elsewhere,
    /// The key is in memory and has a free slot, but the pool of holders is full.
    PoolFull,
}

/// The ttl of a slot, the policy's settings an acquire needs.
pub struct Acquiring {
    pub max: i64,
    pub hold_micros: i64,
    pub enforce: bool,
    pub log_denials: bool,
}

/// Takes a slot of (policy, key), a concurrency limit's key, in shared memory: allowed while
/// fewer than `max` live slots are held (expired ones are given back first). `token` is the
/// new slot's (random, made before the lock is taken).
pub fn acquire(policy: &str, key: &str, how: &Acquiring, token: [u8; 16], load: Loader) -> Acquire {
    let outcome = on_key_slot(policy, key, load, |t, i| {
        let now = now_micros();
        t.slots[i].concurrency = true;
        let (live, soonest) = t.tidy(i, now);
        if live < how.max {
            // None out of here: the pool is full.
            let k = t.take_holder(now)?;
            let expires_at = now.saturating_add(how.hold_micros);
            t.holders[k] = Holder {
                token,
                acquired_at: now,
                expires_at,
                next: t.slots[i].holders,
            };
            let s = &mut t.slots[i];
            s.holders = k as u32 + 1;
            s.state = [live + 1, 0, 0];
            s.expires_at = if s.has_state {
                s.expires_at.max(expires_at)
            } else {
                expires_at
            };
            s.has_state = true;
            t.touch(i);
            let got = Acquired {
                allowed: true,
                token: Some(token),
                remaining: how.max - live - 1,
                retry_after_ms: 0,
            };
            return Some((got, false));
        }
        // Full: never early, the soonest slot frees itself then.
        let wait = soonest.unwrap_or(now).saturating_sub(now);
        let retry_after_ms = (wait.saturating_add(999) / 1000).max(1);
        let wake = how.log_denials && buffer_denial(t, i, now, 1, retry_after_ms, !how.enforce);
        let got = if how.enforce {
            Acquired {
                allowed: false,
                token: None,
                remaining: 0,
                retry_after_ms,
            }
        } else {
            // Shadow mode: allowed, holding nothing.
            Acquired {
                allowed: true,
                token: Some(token),
                remaining: 0,
                retry_after_ms: 0,
            }
        };
        Some((got, wake))
    });
    match outcome {
        None => Acquire::Elsewhere,
        Some(None) => Acquire::PoolFull,
        Some(Some((got, wake))) => {
            if wake {
                crate::worker::registry::wake_worker();
            }
            Acquire::Decided(got)
        }
    }
}

/// Gives back the slot `token` holds of (policy, key): Some(true) when it held a live one,
/// Some(false) when the key is in memory without it, None when the key is not in memory (the
/// caller releases it in the table; no loader may read the key's rows until this transaction
/// ends).
pub fn release(policy: &str, key: &str, token: [u8; 16]) -> Option<bool> {
    let (id, len, policy_len) = compose(policy, key)?;
    let id = &id[..len as usize];
    let db = here();
    let h = hash(db, id, policy_len);
    exclusive(|t| {
        let Some(i) = t.find(h, db, id, policy_len) else {
            t.hold_elsewhere(h);
            return None;
        };
        let now = now_micros();
        let mut prev: Option<usize> = None;
        let mut next = t.slots[i].holders;
        while next != 0 {
            let k = (next - 1) as usize;
            next = t.holders[k].next;
            if t.holders[k].token != token {
                prev = Some(k);
                continue;
            }
            if t.holders[k].expires_at <= now {
                return Some(false);
            }
            t.unlink(i, prev, k);
            t.slots[i].state[0] = t.slots[i].state[0].saturating_sub(1).max(0);
            t.touch(i);
            return Some(true);
        }
        Some(false)
    })
}

/// A concurrency limit's key in memory: its live slots, the soonest and the latest expiry
/// (µs); None if the key is not in memory.
pub fn peek_held(policy: &str, key: &str) -> Option<(i64, i64, i64)> {
    let (id, len, policy_len) = compose(policy, key)?;
    let id = &id[..len as usize];
    let db = here();
    let now = now_micros();
    shared(|t| {
        let i = t.find(hash(db, id, policy_len), db, id, policy_len)?;
        let (mut live, mut soonest, mut latest) = (0, i64::MAX, now);
        let mut next = t.slots[i].holders;
        while next != 0 {
            let k = (next - 1) as usize;
            next = t.holders[k].next;
            let e = t.holders[k].expires_at;
            if e > now {
                live += 1;
                soonest = soonest.min(e);
                latest = latest.max(e);
            }
        }
        Some((live, if live > 0 { soonest } else { now }, latest))
    })
}

/// The decision a cost-1 call would get, from memory; None if the key is not in memory.
pub fn peek(policy: &str, key: &str, limit: &Limit) -> Option<Decision> {
    let (id, len, policy_len) = compose(policy, key)?;
    let id = &id[..len as usize];
    let db = here();
    let state = shared(|t| {
        let s = &t.slots[t.find(hash(db, id, policy_len), db, id, policy_len)?];
        Some(s.current())
    })?;
    Some(algo::decide(limit, state, now_micros(), 1).0)
}

/// Gives capacity back in memory; None if the key is not in memory.
pub fn refund(policy: &str, key: &str, limit: &Limit, amount: i64) -> Option<i64> {
    let (id, len, policy_len) = compose(policy, key)?;
    let id = &id[..len as usize];
    let db = here();
    let h = hash(db, id, policy_len);
    exclusive(|t| {
        let Some(i) = t.find(h, db, id, policy_len) else {
            // Refunded in the table: no loader may read the row until this transaction ends.
            t.hold_elsewhere(h);
            return None;
        };
        let now = now_micros();
        let s = &mut t.slots[i];
        if !s.has_state {
            return Some(limit.capacity());
        }
        let state = State {
            a: s.state[0],
            b: s.state[1],
            c: s.state[2],
        };
        let back = algo::refund(limit, state, now, amount);
        let d = algo::decide(limit, Some(back), now, 0).0;
        s.state = [back.a, back.b, back.c];
        s.expires_at = now.saturating_add(d.reset_after_ms.saturating_mul(1000));
        s.dirty = true;
        t.changes += 1;
        s.version = t.changes;
        Some(d.remaining)
    })
}

/// Forgets the keys of `policy` (all of them when `key` is None) held in memory.
pub fn forget(policy: &str, key: Option<&str>) -> i64 {
    let p = policy.as_bytes();
    let db = here();
    exclusive(|t| forget_in(t, db, p, key))
}

fn forget_in(t: &mut RateTable, db: u32, p: &[u8], key: Option<&str>) -> i64 {
    let mut forgotten = Vec::new();
    for (i, s) in t.slots.iter().enumerate() {
        if s.len == 0 || s.db != db || s.policy_len as usize != p.len() || &s.id[..p.len()] != p {
            continue;
        }
        let matches = match key {
            None => true,
            Some(k) => &s.id[p.len()..s.len as usize] == k.as_bytes(),
        };
        if matches {
            forgotten.push(i);
        }
    }
    for &i in &forgotten {
        t.clear_slot(i);
    }
    forgotten.len() as i64
}

/// What the worker writes at a snapshot.
#[derive(Default)]
pub struct Snapshot {
    pub policies: Vec<String>,
    pub keys: Vec<String>,
    pub a: Vec<i64>,
    pub b: Vec<i64>,
    pub c: Vec<i64>,
    pub expires_at: Vec<i64>,
    /// Keys of concurrency limits: their live slots replace those the table has.
    pub held: HeldKeys,
    pub denied_policies: Vec<String>,
    pub denied_keys: Vec<String>,
    pub denied_at: Vec<i64>,
    pub denied_cost: Vec<i64>,
    pub denied_retry: Vec<i64>,
    pub denied_shadow: Vec<bool>,
    pub denials_dropped: i64,
    /// Slot index, key hash, version and birth of each key copied.
    pub taken: Vec<Taken>,
    /// (policy, key) of each key copied, in the order of `taken`.
    pub taken_keys: Vec<(String, String)>,
}

/// A key a snapshot copied: its slot, hash, version and birth (see `Slot::born`).
pub type Taken = (usize, u64, u64, u64);

impl Snapshot {
    /// Leaves out the keys in `gone` (and what they held).
    pub fn without(&mut self, gone: &std::collections::HashSet<(String, String)>) {
        let keep = |p: &String, k: &String| !gone.contains(&(p.clone(), k.clone()));
        let plain: Vec<bool> = self
            .policies
            .iter()
            .zip(&self.keys)
            .map(|(p, k)| keep(p, k))
            .collect();
        retain(&mut self.policies, &plain);
        retain(&mut self.keys, &plain);
        retain(&mut self.a, &plain);
        retain(&mut self.b, &plain);
        retain(&mut self.c, &plain);
        retain(&mut self.expires_at, &plain);
        let h = &mut self.held;
        let keys: Vec<bool> = h
            .policies
            .iter()
            .zip(&h.keys)
            .map(|(p, k)| keep(p, k))
            .collect();
        retain(&mut h.policies, &keys);
        retain(&mut h.keys, &keys);
        retain(&mut h.count, &keys);
        retain(&mut h.expires_at, &keys);
        let slots: Vec<bool> = h
            .slot_policies
            .iter()
            .zip(&h.slot_keys)
            .map(|(p, k)| keep(p, k))
            .collect();
        retain(&mut h.slot_policies, &slots);
        retain(&mut h.slot_keys, &slots);
        retain(&mut h.slot_tokens, &slots);
        retain(&mut h.slot_acquired_at, &slots);
        retain(&mut h.slot_expires_at, &slots);
        let taken: Vec<bool> = self.taken_keys.iter().map(|(p, k)| keep(p, k)).collect();
        retain(&mut self.taken, &taken);
        retain(&mut self.taken_keys, &taken);
    }
}

fn retain<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut i = 0;
    v.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

/// The keys of `taken` that are no longer in their slot: forgotten (rate_reset, drop_limit,
/// alter_limit) or moved out of memory since the snapshot copied them. A snapshot must not
/// write them: whoever took them out wrote or deleted their rows.
pub fn vanished(taken: &[Taken], keys: &[(String, String)]) -> Vec<(String, String)> {
    shared(|t| {
        taken
            .iter()
            .zip(keys)
            .filter(|((i, hash, _, born), _)| {
                let s = &t.slots[*i];
                !(s.len > 0 && s.hash == *hash && s.born == *born)
            })
            .map(|(_, k)| k.clone())
            .collect()
    })
}

/// Concurrency limits' keys of a snapshot (their slot count and expiry) and their live slots.
#[derive(Default)]
pub struct HeldKeys {
    pub policies: Vec<String>,
    pub keys: Vec<String>,
    pub count: Vec<i64>,
    pub expires_at: Vec<i64>,
    pub slot_policies: Vec<String>,
    pub slot_keys: Vec<String>,
    /// As text (`uuid` input).
    pub slot_tokens: Vec<String>,
    pub slot_acquired_at: Vec<i64>,
    pub slot_expires_at: Vec<i64>,
}

/// After the snapshot's transaction committed: its keys are clean unless they changed since.
pub fn written(taken: &[Taken]) {
    if taken.is_empty() {
        return;
    }
    exclusive(|t| {
        for &(i, hash, version, _) in taken {
            if let Some(s) = t.slots.get_mut(i) {
                if s.len > 0 && s.hash == hash && s.version == version {
                    s.dirty = false;
                }
            }
        }
    })
}

/// Forgets every key and denial of this database: a new install of pg_keel starts from
/// nothing, whatever the one dropped before it left in shared memory.
pub fn reset_database() {
    let db = here();
    exclusive(|t| {
        for i in 0..SLOTS {
            if t.slots[i].len > 0 && t.slots[i].db == db {
                t.clear_slot(i);
            }
        }
        take_denials(t, db, |_| {});
    })
}

/// Removes database `db`'s buffered denials, handing each to `take`; the others' move to
/// the front of the buffer.
fn take_denials(t: &mut RateTable, db: u32, mut take: impl FnMut(&Denial)) {
    let used = t.denials_used;
    let mut kept = 0;
    for i in 0..used {
        let d = t.denials[i];
        if d.db == db {
            take(&d);
        } else {
            t.denials[kept] = d;
            kept += 1;
        }
    }
    t.denials_used = kept;
}

fn split(id: &[u8], len: u16, policy_len: u8) -> (String, String) {
    let id = &id[..len as usize];
    let (p, k) = id.split_at(policy_len as usize);
    (
        String::from_utf8_lossy(p).into_owned(),
        String::from_utf8_lossy(k).into_owned(),
    )
}

/// Copies this database's changed slots and takes its buffered denials. Copying under the
/// lock is a few microseconds per changed key; the writing happens after, without it, and
/// the slots stay dirty until [`written`] is told the write committed: a snapshot that fails
/// (an error, a crash, a kill) leaves them for the next one.
pub fn take_snapshot() -> Snapshot {
    let mut out = Snapshot::default();
    let db = here();
    exclusive(|t| take_from(t, db, &mut out));
    out
}

/// Takes the keys of `policy` out of memory, returning those changed since the last snapshot
/// to be written: for an `alter_limit` that moves the policy out of memory, so that the table
/// has what memory decided, held slots included. The keys' elsewhere buckets are held until
/// the transaction ends.
pub fn take_policy(policy: &str) -> Snapshot {
    let mut out = Snapshot::default();
    let db = here();
    let p = policy.as_bytes();
    exclusive(|t| {
        let now = now_micros();
        for i in 0..SLOTS {
            let s = &t.slots[i];
            if s.len == 0 || s.db != db || s.policy_len as usize != p.len() || &s.id[..p.len()] != p
            {
                continue;
            }
            if s.dirty {
                copy_slot(t, i, now, &mut out);
            }
            t.clear_slot(i);
        }
        // Until the caller's transaction ends, a session that has not seen the policy change
        // would load a key from what the table had before the write: no key of any memory
        // policy enters memory meanwhile (their decisions go to the table, where the written
        // rows' locks order them after the write), and a load that read the table before the
        // end is read again (the buckets' generations move).
        for b in 0..ELSEWHERE {
            t.elsewhere[b].held = t.elsewhere[b].held.saturating_add(1);
        }
        HELD.with_borrow_mut(|held| held.extend(0..ELSEWHERE));
        crate::xact::register();
    });
    out
}

fn take_from(t: &mut RateTable, db: u32, out: &mut Snapshot) {
    let now = now_micros();
    for i in 0..SLOTS {
        let s = &t.slots[i];
        if s.len > 0 && s.dirty && s.db == db {
            out.taken.push((i, s.hash, s.version, s.born));
            out.taken_keys.push(split(&s.id, s.len, s.policy_len));
            copy_slot(t, i, now, out);
        }
    }
    take_denials(t, db, |d| {
        let (p, k) = split(&d.id, d.len, d.policy_len);
        out.denied_policies.push(p);
        out.denied_keys.push(k);
        out.denied_at.push(d.at);
        out.denied_cost.push(d.cost);
        out.denied_retry.push(d.retry_after_ms);
        out.denied_shadow.push(d.shadow);
    });
    // Dropped denials are counted for the whole cluster: the first worker to write reports them.
    out.denials_dropped = t.denials_dropped;
    t.denials_dropped = 0;
}

/// Copies slot `i`'s key and state (with its live slots, for a concurrency limit's key).
fn copy_slot(t: &RateTable, i: usize, now: i64, out: &mut Snapshot) {
    let s = &t.slots[i];
    let (p, k) = split(&s.id, s.len, s.policy_len);
    if !s.concurrency {
        out.policies.push(p);
        out.keys.push(k);
        out.a.push(s.state[0]);
        out.b.push(s.state[1]);
        out.c.push(s.state[2]);
        out.expires_at.push(s.expires_at);
        return;
    }
    let held = &mut out.held;
    let mut count = 0;
    let mut next = s.holders;
    while next != 0 {
        let h = &t.holders[(next - 1) as usize];
        next = h.next;
        if h.expires_at <= now {
            continue;
        }
        count += 1;
        held.slot_policies.push(p.clone());
        held.slot_keys.push(k.clone());
        held.slot_tokens.push(uuid_text(&h.token));
        held.slot_acquired_at.push(h.acquired_at);
        held.slot_expires_at.push(h.expires_at);
    }
    held.policies.push(p);
    held.keys.push(k);
    held.count.push(count);
    held.expires_at.push(s.expires_at);
}

/// A token in uuid's text form.
fn uuid_text(token: &[u8; 16]) -> String {
    pgrx::Uuid::from_bytes(*token).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_policy_and_key_apart() {
        let (a, alen, ap) = compose("ab", "c").unwrap();
        let (b, blen, bp) = compose("a", "bc").unwrap();
        assert_eq!(&a[..alen as usize], &b[..blen as usize]);
        assert_ne!(
            hash(1, &a[..alen as usize], ap),
            hash(1, &b[..blen as usize], bp)
        );
        assert_ne!(
            hash(1, &a[..alen as usize], ap),
            hash(2, &a[..alen as usize], ap),
            "databases keep their keys apart"
        );
        assert_eq!(split(&a, alen, ap), ("ab".into(), "c".into()));
        assert!(compose("p", &"k".repeat(KEY_BYTES)).is_none());
    }

    #[test]
    fn tokens_print_as_uuids() {
        let mut token = [0u8; 16];
        for (i, b) in token.iter_mut().enumerate() {
            *b = i as u8 * 17;
        }
        assert_eq!(uuid_text(&token), "00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn shared_memory_stays_within_what_the_docs_say() {
        // docs/rate-limits.md: 65,536 slots in 17 MB and a pool of 65,536 held slots, 2.6 MB.
        assert_eq!(std::mem::size_of::<Slot>(), 272);
        assert_eq!(std::mem::size_of::<Holder>(), 40);
        assert!(std::mem::size_of::<RateTable>() < 21 * 1024 * 1024);
    }
}
