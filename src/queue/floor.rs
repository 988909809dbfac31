//! Where a claim starts looking: per queue and priority, the *floor*, a time no claimable job
//! of that priority is below.
//!
//! Every claim, ack and retry leaves index entries of dead row versions in `jobs_claim_idx`
//! (queue, priority, visible_at, job_id), and they pile up at the low end of each priority's
//! range, exactly where a claim starts: until VACUUM removes them (and while an old snapshot
//! anywhere holds the xmin horizon back, it cannot), a claim walks all of them. With 10 jobs
//! ready and 300,000 processed since the last vacuum, a claim of 64 read thousands of index
//! pages. A claim here scans only `(visible_at, job_id) >= floor` of each priority instead,
//! which skips them by one index descent.
//!
//! Why a floor holds. Every pg_keel function that writes a claimable entry (enqueue, claim,
//! extend, fail, snooze, retry_dead) first calls [`writing`], which records in shared memory
//! the start time of its transaction (once per transaction, cleared when it ends), and only
//! then reads the clock for the entry's `visible_at`, which is never before that moment. A
//! floor is a pair (visible_at, job_id), compared in the claim order, computed ([`refresh`],
//! [`look_whole`]) as the least of:
//! - `r`, the clock, read first, less `CLOCK_MARGIN`, as (r - margin, -infinity);
//! - the oldest start time recorded by a transaction still writing, read next (a transaction
//!   that records only later reads its clock later, after `r`), the same way;
//! - the least (visible_at, job_id) of the live entries (ready or running, claimable or not)
//!   that a snapshot taken after both sees (from the previous floor up, or from the start).
//!
//! An entry a later claim can see is in that snapshot, or was written by a transaction still
//! open then (recorded: its entries are above its start time), or written later (above `r`);
//! so it is above the floor. Floors only rise between the whole looks of [`look_whole`], by
//! [`refresh`] from the previous one.
//!
//! The priorities of a queue are kept beside its floors: a writer records a new one before it
//! writes (enqueue, retry_dead), and a full [`look`] adds those it finds; a claim scans each
//! in turn. A queue with more than `MAX_PRIORITIES` priorities, one beyond `MAX_QUEUES`
//! tracked, a transaction of a backend beyond `MAX_WRITERS`, or no shared memory (not
//! preloaded): claims scan the whole queue, as without floors.
//!
//! Writes pg_keel does not make (an UPDATE of keel.jobs by hand, a restore into a running
//! database, a clock stepped back) can put an entry below a floor: every `LOOK_EVERY` a claim
//! looks at the whole queue again and lowers the floors to what it finds, so such a job waits
//! at most that long. A transaction that wrote jobs cannot be prepared (two-phase commit):
//! its entries would become visible after its backend forgot it.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

use crate::names::MAX_NAME_LEN;
use crate::pgtime::{now_micros, timestamptz};
use crate::spi_plans::{execute_latest, param};

/// Where one scan of a claim looks (`plan` makes them, `take` runs them).
#[derive(Clone, Copy)]
pub enum Scope {
    /// The whole queue, every priority from its start.
    Whole,
    /// One priority from its floor: (visible_at, job_id) at or above it (see `Floor`).
    Priority { priority: i32, floor: Floor },
}

/// Queues tracked (per cluster); more are claimed by scanning the whole queue.
const MAX_QUEUES: usize = 1024;
/// Priorities tracked per queue; a queue with more is claimed by scanning all of it.
pub const MAX_PRIORITIES: usize = 8;
/// Backends whose writing transactions are tracked (by PGPROC number).
const MAX_WRITERS: usize = 4096;
/// How often a priority's floor is moved up to its queue's first live job (µs).
const REFRESH_EVERY: i64 = 5_000;
/// How often a queue is looked at whole, from the start (µs).
const LOOK_EVERY: i64 = 30_000_000;
/// A look that did not finish within this is taken over by the next claim (µs).
const LOOK_TIMEOUT: i64 = 10_000_000;
/// A slot unused this long may be handed to another queue (µs).
const EVICT_AFTER: i64 = 600_000_000;
/// A floor: (visible_at in µs, job_id), in the claim order within a priority. No claimable
/// entry of the priority is below it. The job_id matters when many jobs share one visible_at
/// (an `enqueue_batch`, a backlog whose delay ended at once): the dead entries of those claimed
/// before lie at the same visible_at, and while the xmin horizon is held each claim walked them
/// all (a drain with a REPEATABLE READ transaction open ran at a fifth of its clean rate).
pub type Floor = (i64, i64);
/// No floor: from the start (a timestamptz of -infinity).
pub const NO_FLOOR: Floor = (i64::MIN, i64::MIN);

#[derive(Copy, Clone)]
struct Slot {
    database: pg_sys::Oid,
    name: [u8; MAX_NAME_LEN],
    name_len: u8,
    /// The queue's priorities seen so far (by writers and looks) and each one's floor.
    count: u8,
    priorities: [i32; MAX_PRIORITIES],
    floors: [Floor; MAX_PRIORITIES],
    refreshed_at: [i64; MAX_PRIORITIES],
    /// More priorities than fit.
    overflow: bool,
    /// A look completed: the priorities and floors hold.
    known: bool,
    looked_at: i64,
    /// A look started at (0: none running).
    looking_since: i64,
    /// Bumped by every look: a refresh computed across one is dropped.
    generation: u32,
    used_at: i64,
    /// When the slot was made: a writer that began before may have recorded its priorities
    /// in a slot evicted since.
    created_at: i64,
}

impl Slot {
    fn is(&self, database: pg_sys::Oid, queue: &[u8]) -> bool {
        self.database == database && &self.name[..self.name_len as usize] == queue
    }

    fn position(&self, priority: i32) -> Option<usize> {
        self.priorities[..self.count as usize]
            .iter()
            .position(|p| *p == priority)
    }

    /// Adds `priority` (with no floor) unless known; false when there is no room.
    fn add(&mut self, priority: i32) -> bool {
        if self.position(priority).is_some() {
            return true;
        }
        let n = self.count as usize;
        if n == MAX_PRIORITIES {
            self.overflow = true;
            self.known = false;
            return false;
        }
        self.priorities[n] = priority;
        self.floors[n] = NO_FLOOR;
        self.refreshed_at[n] = 0;
        self.count += 1;
        true
    }
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            database: pg_sys::InvalidOid,
            name: [0; MAX_NAME_LEN],
            name_len: 0,
            count: 0,
            priorities: [0; MAX_PRIORITIES],
            floors: [NO_FLOOR; MAX_PRIORITIES],
            refreshed_at: [0; MAX_PRIORITIES],
            overflow: false,
            known: false,
            looked_at: 0,
            looking_since: 0,
            generation: 0,
            used_at: 0,
            created_at: 0,
        }
    }
}

#[derive(Copy, Clone)]
pub struct Floors {
    used: usize,
    slots: [Slot; MAX_QUEUES],
}

impl Default for Floors {
    fn default() -> Self {
        Floors {
            used: 0,
            slots: [Slot::default(); MAX_QUEUES],
        }
    }
}

// SAFETY: plain data (integers, byte arrays, booleans), no pointers.
unsafe impl PGRXSharedMemory for Floors {}

/// The start time of each backend's transaction that is writing claimable entries (0: none).
pub struct Writers {
    started: [AtomicI64; MAX_WRITERS],
    /// Writing transactions of backends beyond MAX_WRITERS: no floor rises while any runs.
    untracked: AtomicU32,
}

impl Default for Writers {
    fn default() -> Self {
        Writers {
            started: std::array::from_fn(|_| AtomicI64::new(0)),
            untracked: AtomicU32::new(0),
        }
    }
}

// SAFETY: atomics only, no pointers; every access goes through them.
unsafe impl PGRXSharedMemory for Writers {}

// SAFETY: the name is unique among the shared-memory segments and LWLock tranches of
// pg_keel (every one is a distinct "pg_keel ..." string) and of PostgreSQL itself.
static FLOORS: PgLwLock<Floors> = unsafe { PgLwLock::new(c"pg_keel claim floors") };
// SAFETY: as for FLOORS: a distinct "pg_keel ..." name.
static WRITERS: PgLwLock<Writers> = unsafe { PgLwLock::new(c"pg_keel job writers") };

pub fn init() {
    pg_shmem_init!(FLOORS);
    pg_shmem_init!(WRITERS);
}

thread_local! {
    /// This backend's entry in WRITERS is set for the current transaction (or it counts in
    /// `untracked`).
    static WRITING: Cell<Option<Tracked>> = const { Cell::new(None) };
}

#[derive(Clone, Copy)]
enum Tracked {
    At(usize),
    Untracked,
}

fn here() -> pg_sys::Oid {
    // SAFETY: this backend's database, set once when it connected.
    unsafe { pg_sys::MyDatabaseId }
}

/// This transaction is about to write claimable entries of `queue` (of `priority`, when it
/// may be one the queue has not had): call it before reading the clock for their visible_at.
pub fn writing(queue: Option<&str>, priority: Option<i32>) {
    if !crate::shmem::enabled() {
        return;
    }
    if WRITING.get().is_none() {
        crate::xact::register();
        let procno = crate::pgcompat::my_proc_number();
        // SAFETY: the transaction's start time is a backend global.
        let started = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
        let writers = WRITERS.share();
        let tracked = if procno < MAX_WRITERS {
            writers.started[procno].store(started.max(1), Ordering::SeqCst);
            Tracked::At(procno)
        } else {
            writers.untracked.fetch_add(1, Ordering::SeqCst);
            Tracked::Untracked
        };
        WRITING.set(Some(tracked));
    }
    if let (Some(queue), Some(priority)) = (queue, priority) {
        record(queue, priority);
    }
}

/// The transaction ended (commit, abort): its writes are visible or gone. Raises nothing.
pub fn at_transaction_end() {
    let Some(tracked) = WRITING.take() else {
        return;
    };
    let writers = WRITERS.share();
    match tracked {
        Tracked::At(i) => writers.started[i].store(0, Ordering::SeqCst),
        Tracked::Untracked => {
            writers.untracked.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Just before PREPARE TRANSACTION: refused when this transaction wrote jobs.
pub fn before_prepare() {
    if WRITING.get().is_some() {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "pg_keel: a transaction that enqueued, claimed, extended, failed, snoozed or retried jobs cannot be prepared",
            "Make those calls outside the two-phase transaction."
        );
    }
}

/// The oldest start time of a transaction writing entries, None when one is not tracked.
fn oldest_writer() -> Option<i64> {
    let writers = WRITERS.share();
    if writers.untracked.load(Ordering::SeqCst) > 0 {
        return None;
    }
    Some(
        writers
            .started
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .filter(|v| *v != 0)
            .min()
            .unwrap_or(i64::MAX),
    )
}

/// The slot of `queue` in this database, made when missing (evicting one long unused when
/// full); None when there is no room.
fn slot_of(floors: &mut Floors, queue: &[u8], now: i64) -> Option<usize> {
    let database = here();
    let used = floors.used;
    if let Some(i) = floors.slots[..used]
        .iter()
        .position(|s| s.is(database, queue))
    {
        floors.slots[i].used_at = now;
        return Some(i);
    }
    if queue.len() > MAX_NAME_LEN {
        return None;
    }
    let i = if used < MAX_QUEUES {
        floors.used += 1;
        used
    } else {
        floors
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| now - s.used_at > EVICT_AFTER && s.looking_since == 0)
            .min_by_key(|(_, s)| s.used_at)
            .map(|(i, _)| i)?
    };
    let mut slot = Slot {
        database,
        used_at: now,
        created_at: now,
        ..Slot::default()
    };
    slot.name[..queue.len()].copy_from_slice(queue);
    slot.name_len = queue.len() as u8;
    floors.slots[i] = slot;
    Some(i)
}

/// Records that `queue` may get entries of `priority`.
fn record(queue: &str, priority: i32) {
    let database = here();
    let bytes = queue.as_bytes();
    {
        let floors = FLOORS.share();
        let found = floors.slots[..floors.used]
            .iter()
            .find(|s| s.is(database, bytes));
        if found.is_some_and(|s| s.position(priority).is_some()) {
            return;
        }
    }
    let mut floors = FLOORS.exclusive();
    if let Some(i) = slot_of(&mut floors, bytes, now_micros()) {
        floors.slots[i].add(priority);
    }
}

/// The least (visible_at, job_id) per priority of the live entries of queue $1 up to $2 (the
/// bound: floors are never above it; priorities written by pg_keel are recorded by their
/// writers, and one written otherwise with entries only beyond the bound is found by a later
/// look).
/// One index descent per priority (a loose scan), not a read of the whole queue: with a backlog
/// of a million jobs the look would read every one of them.
const LOOK_ALL: &str = "WITH RECURSIVE least AS (
         (SELECT priority, visible_at, job_id FROM keel.jobs
           WHERE queue = $1 AND state IN ('ready', 'running') AND visible_at <= $2
           ORDER BY priority, visible_at, job_id LIMIT 1)
         UNION ALL
         SELECT n.priority, n.visible_at, n.job_id FROM least l, LATERAL (
             SELECT priority, visible_at, job_id FROM keel.jobs
              WHERE queue = $1 AND state IN ('ready', 'running') AND visible_at <= $2
                AND priority > l.priority
              ORDER BY priority, visible_at, job_id LIMIT 1) n)
     SELECT priority, visible_at, job_id FROM least";

/// The least (visible_at, job_id) of the live entries of queue $1, priority $2, from ($3, $5)
/// up to visible_at $4 (the bound: a floor is never above it, so what lies beyond does not
/// matter). Without the upper end the walk went on through the entries of leases, live and
/// dead, up to the visibility timeout ahead: while the xmin horizon was held, 30 s of claims'
/// dead entries, 30–40 ms per refresh.
const LOOK_ONE: &str = "SELECT visible_at, job_id FROM keel.jobs
     WHERE queue = $1 AND priority = $2 AND state IN ('ready', 'running')
       AND (visible_at, job_id) >= ($3, $5) AND visible_at <= $4
     ORDER BY visible_at, job_id LIMIT 1";

/// How a claim on `queue` scans it: looks at the queue whole when due, moves floors up that
/// are older than REFRESH_EVERY. Runs SQL: call inside SPI, as pg_keel's owner.
pub fn plan(queue: &str) -> Vec<Scope> {
    if !crate::shmem::enabled() {
        return whole();
    }
    let now = now_micros();
    let bytes = queue.as_bytes();
    let (index, look) = {
        let mut floors = FLOORS.exclusive();
        let Some(i) = slot_of(&mut floors, bytes, now) else {
            return whole();
        };
        let s = &mut floors.slots[i];
        if s.overflow {
            return whole(); // more priorities than floors are kept for
        }
        // A transaction that wrote already would see its own uncommitted changes in a look,
        // which a rollback takes back: it claims with the floors as they are.
        // SAFETY: reads this backend's transaction state.
        let wrote = unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
        if wrote {
            return if s.known { current(s) } else { whole() };
        }
        let look_due = !s.known || now - s.looked_at > LOOK_EVERY;
        let free = s.looking_since == 0 || now - s.looking_since > LOOK_TIMEOUT;
        let look = if look_due && free {
            s.looking_since = now;
            s.generation = s.generation.wrapping_add(1);
            Some(s.generation)
        } else {
            None
        };
        (i, look)
    };
    if let Some(generation) = look {
        look_whole(index, queue, generation);
    }
    let is_stale = |s: &Slot, k: usize| now - s.refreshed_at[k] > REFRESH_EVERY;
    let any_stale = {
        let floors = FLOORS.share();
        let s = &floors.slots[index];
        if !s.is(here(), bytes) || !s.known {
            return whole();
        }
        (0..s.count as usize).any(|k| is_stale(s, k))
    };
    // One claim refreshes a stale floor (it marks it refreshed first); the others meanwhile
    // claim from the floor as it is, which holds, only a little lower than it could be.
    let (generation, stale) = if any_stale {
        let mut floors = FLOORS.exclusive();
        let s = &mut floors.slots[index];
        if !s.is(here(), bytes) || !s.known {
            return whole();
        }
        let stale: Vec<(usize, i32, Floor)> = (0..s.count as usize)
            .filter(|&k| is_stale(s, k))
            .map(|k| (k, s.priorities[k], s.floors[k]))
            .collect();
        for (k, _, _) in &stale {
            s.refreshed_at[*k] = now;
        }
        (s.generation, stale)
    } else {
        (0, Vec::new())
    };
    for (k, priority, floor) in stale {
        refresh(index, queue, generation, k, priority, floor);
    }
    let floors = FLOORS.share();
    let s = &floors.slots[index];
    if !s.is(here(), bytes) || !s.known {
        return whole();
    }
    current(s)
}

/// The whole queue, priority by priority from the start (floors unknown or not kept).
fn whole() -> Vec<Scope> {
    vec![Scope::Whole]
}

/// Each priority from its floor, as the slot has them, in priority order.
fn current(s: &Slot) -> Vec<Scope> {
    let mut list: Vec<(i32, Floor)> = (0..s.count as usize)
        .map(|k| (s.priorities[k], s.floors[k]))
        .collect();
    list.sort_unstable();
    list.into_iter()
        .map(|(priority, floor)| Scope::Priority { priority, floor })
        .collect()
}

/// How far below the clock a floor stays, so that a system clock stepped back a little never
/// puts a new entry below it (every process reads the same clock). Small: a claim walks the
/// dead entries this span of churn left.
const CLOCK_MARGIN: i64 = 2_000;

/// The bound every entry not yet visible is above: min(r, the oldest writer) less the clock
/// margin; with the oldest writer's start. None when a writer is not tracked.
fn bound() -> Option<(i64, i64)> {
    let r = now_micros();
    oldest_writer().map(|o| (o.min(r).saturating_sub(CLOCK_MARGIN), o))
}

/// Looks at the whole queue: its priorities and each one's floor, from the start.
fn look_whole(index: usize, queue: &str, generation: u32) {
    let (bound, oldest) = match bound() {
        Some((b, o)) => (Some(b), o),
        None => (None, i64::MIN),
    };
    let Some(to) = timestamptz(bound.unwrap_or(i64::MAX)) else {
        return;
    };
    let rows = execute_latest(LOOK_ALL, &[param(queue), param(to)]);
    let found: Vec<(i32, Floor)> = (0..rows.len())
        .filter_map(|i| {
            let p = rows.get::<i32>(i, 1)?;
            let at = rows.get::<TimestampWithTimeZone>(i, 2)?;
            let id = rows.get::<i64>(i, 3)?;
            Some((p, (at.into_inner(), id)))
        })
        .collect();
    let now = now_micros();
    let mut floors = FLOORS.exclusive();
    let s = &mut floors.slots[index];
    if !s.is(here(), queue.as_bytes()) || s.generation != generation {
        return;
    }
    s.looking_since = 0;
    for (p, _) in &found {
        s.add(*p);
    }
    for k in 0..s.count as usize {
        let least = found
            .iter()
            .find(|(p, _)| *p == s.priorities[k])
            .map_or((i64::MAX, i64::MAX), |(_, at)| *at);
        s.floors[k] = bound.map_or(NO_FLOOR, |b| (b, i64::MIN).min(least));
        s.refreshed_at[k] = now;
    }
    s.looked_at = now;
    // Every writer still open began after the slot was made (so recorded its priorities
    // here); otherwise look again at the next claim.
    s.known = !s.overflow && bound.is_some() && oldest > s.created_at;
}

/// Moves the floor of one priority up to its first live entry (or the bound).
fn refresh(index: usize, queue: &str, generation: u32, k: usize, priority: i32, floor: Floor) {
    let Some((bound, _)) = bound() else { return };
    let (Some(from), Some(to)) = (timestamptz(floor.0), timestamptz(bound)) else {
        return;
    };
    let rows = execute_latest(
        LOOK_ONE,
        &[
            param(queue),
            param(priority),
            param(from),
            param(to),
            param(floor.1),
        ],
    );
    let least = (|| {
        if rows.is_empty() {
            return None;
        }
        let at = rows.get::<TimestampWithTimeZone>(0, 1)?;
        Some((at.into_inner(), rows.get::<i64>(0, 2)?))
    })()
    .unwrap_or((i64::MAX, i64::MAX));
    let now = now_micros();
    let mut floors = FLOORS.exclusive();
    let s = &mut floors.slots[index];
    if !s.is(here(), queue.as_bytes())
        || s.generation != generation
        || s.priorities.get(k) != Some(&priority)
    {
        return;
    }
    s.floors[k] = s.floors[k].max((bound, i64::MIN).min(least));
    s.refreshed_at[k] = now;
}

/// For the PL/pgSQL writers (fail, retry_dead): see [`writing`].
#[pg_extern(volatile, parallel_unsafe, name = "_writing_jobs")]
fn writing_jobs(queue: Option<&str>, priority: Option<i32>) -> bool {
    writing(queue, priority);
    true
}

/// The claim floors of this database's queues, for diagnosis: (queue, priority, floor as
/// visible_at and job_id, when it was last moved, whether the queue's floors hold), and the
/// oldest writing transaction's start.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe, name = "_claim_floors")]
fn claim_floors() -> TableIterator<
    'static,
    (
        name!(queue, String),
        name!(priority, i32),
        name!(floor, Option<TimestampWithTimeZone>),
        name!(floor_job_id, i64),
        name!(refreshed_at, Option<TimestampWithTimeZone>),
        name!(known, bool),
        name!(oldest_writer, Option<TimestampWithTimeZone>),
    ),
> {
    if !crate::shmem::enabled() {
        return TableIterator::new(Vec::new());
    }
    let oldest = oldest_writer()
        .filter(|o| *o != i64::MAX)
        .and_then(timestamptz);
    let floors = FLOORS.share();
    let database = here();
    let mut rows = Vec::new();
    for s in floors.slots[..floors.used]
        .iter()
        .filter(|s| s.database == database)
    {
        let name = String::from_utf8_lossy(&s.name[..s.name_len as usize]).into_owned();
        for k in 0..s.count as usize {
            rows.push((
                name.clone(),
                s.priorities[k],
                timestamptz(s.floors[k].0),
                s.floors[k].1,
                timestamptz(s.refreshed_at[k]),
                s.known,
                oldest,
            ));
        }
    }
    TableIterator::new(rows)
}
