//! Wake-ups for LISTENing consumers (`NOTIFY keel_jobs, '<queue>'`) that do not serialize
//! producers' commits.
//!
//! A transaction that sends NOTIFY holds one cluster-wide lock from just before its commit
//! until its commit record is flushed (PostgreSQL's `PreCommit_Notify`), so producers that
//! each NOTIFY commit one after another: 4 producers made 5,600 enqueues/s here where plain
//! INSERTs made 10,800 (16 producers: 4,500 vs 22,700). So a producer only asks, and a relay
//! (`keel_waker_main`, one process per database, started by the launcher beside the worker)
//! sends the NOTIFY in a transaction of its own, for every queue that got jobs since its last
//! round: one NOTIFY commit per round instead of one per producer commit.
//!
//! Never a lost wake-up:
//! - A producer decides just before its commit (`before_commit`): when a relay is open in its
//!   database and has room for the producer's queues, it promises to post there and reserves
//!   that room; otherwise it sends the NOTIFY itself, exactly as without the relay, and with
//!   it whatever a relay that is gone left on the board.
//! - It posts its queues after its commit is visible (`at_commit`) and sets the relay's latch;
//!   the relay's NOTIFY transaction begins after that, so a consumer woken by it sees the jobs.
//! - A relay that stops closes first (no new promises), waits for the promises already made
//!   (commits in flight, up to `CLOSE_WAIT`), and sends what was posted. What is posted to a
//!   relay that is gone (a commit slower than that) stays on the board until the next
//!   producer's commit or the next relay takes it. A relay that ends on an error puts back
//!   the queues of the round it was sending (`at_exit`).
//! - Each relay writes only the entry it owns (its pid): one that is still closing never
//!   writes over its successor's.
//! - A relay that is slow never delays anything but wake-ups; it never touches Redis.
//!
//! Not relayed: a transaction that is PREPAREd (two-phase commit) wakes no one (NOTIFY itself
//! cannot be prepared); its jobs are found by the consumers' polling.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

use crate::names::MAX_NAME_LEN;
use crate::worker::registry::{self, Phase, MAX_DATABASES};
use crate::{guc, shmem};

/// The distinct queues one relay keeps for its next round. A transaction whose queues do not
/// fit notifies itself.
const MAX_PENDING: usize = 64;

/// How long a relay that stops waits for the producers that promised to post to it.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Rounds are at least this far apart: under a stream of commits one round carries the
/// wake-ups of many (a round is a transaction: xid, commit record, NOTIFY's lock), and a
/// wake-up waits at most this long beyond its commit.
const MIN_ROUND_GAP: Duration = Duration::from_micros(500);

/// How often an idle relay looks whether it should leave.
const LOOK_EVERY: Duration = Duration::from_millis(250);

#[derive(Copy, Clone)]
struct Relay {
    /// The database this entry serves (InvalidOid: free).
    database: pg_sys::Oid,
    /// A relay runs and takes promises.
    open: bool,
    /// The relay that owns the entry, its latch (0 when none runs).
    latch: usize,
    pid: i32,
    /// Producers between their decision and their commit's end, and the places on the board
    /// they reserved for their queues.
    promised: u32,
    reserved: u32,
    /// Queues posted since the last round.
    pending: [[u8; MAX_NAME_LEN]; MAX_PENDING],
    pending_lens: [u8; MAX_PENDING],
    pending_used: u8,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            database: pg_sys::InvalidOid,
            open: false,
            latch: 0,
            pid: 0,
            promised: 0,
            reserved: 0,
            pending: [[0; MAX_NAME_LEN]; MAX_PENDING],
            pending_lens: [0; MAX_PENDING],
            pending_used: 0,
        }
    }
}

impl Relay {
    fn has(&self, queue: &[u8]) -> bool {
        (0..self.pending_used as usize)
            .any(|i| &self.pending[i][..self.pending_lens[i] as usize] == queue)
    }

    /// Posts `queue`; false when it does not fit (never for a producer that reserved).
    fn post(&mut self, queue: &str) -> bool {
        let bytes = queue.as_bytes();
        if self.has(bytes) {
            return true;
        }
        let used = self.pending_used as usize;
        if used == MAX_PENDING || bytes.len() > MAX_NAME_LEN {
            return false;
        }
        self.pending[used][..bytes.len()].copy_from_slice(bytes);
        self.pending_lens[used] = bytes.len() as u8;
        self.pending_used += 1;
        true
    }

    fn take(&mut self) -> Vec<String> {
        let names = (0..self.pending_used as usize)
            .map(|i| {
                String::from_utf8_lossy(&self.pending[i][..self.pending_lens[i] as usize])
                    .into_owned()
            })
            .collect();
        self.pending_used = 0;
        names
    }

    fn room(&self) -> usize {
        MAX_PENDING.saturating_sub(self.pending_used as usize + self.reserved as usize)
    }

    fn idle(&self) -> bool {
        !self.open && self.promised == 0 && self.pending_used == 0
    }
}

#[derive(Copy, Clone)]
pub struct Board {
    relays: [Relay; MAX_DATABASES],
}

impl Default for Board {
    fn default() -> Self {
        Board {
            relays: [Relay::default(); MAX_DATABASES],
        }
    }
}

// SAFETY: plain data (integers, byte arrays); the latch is an address in shared memory, the
// same in every backend.
unsafe impl PGRXSharedMemory for Board {}

// SAFETY: the name is unique among the shared-memory segments and LWLock tranches of
// pg_keel (every one is a distinct "pg_keel ..." string) and of PostgreSQL itself.
static BOARD: PgLwLock<Board> = unsafe { PgLwLock::new(c"pg_keel wake relays") };

pub fn init() {
    pg_shmem_init!(BOARD);
}

thread_local! {
    /// Queues the current transaction enqueued to, in order, without repeats.
    static WANTED: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    /// The relay (index) this transaction promised to post to, and the places it reserved.
    static PROMISED: Cell<Option<(usize, u32)>> = const { Cell::new(None) };
    /// In a relay: the queues of the round being sent (put back if it fails).
    static IN_FLIGHT: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn here() -> pg_sys::Oid {
    // SAFETY: this backend's database, set once when it connected.
    unsafe { pg_sys::MyDatabaseId }
}

fn my_pid() -> i32 {
    // SAFETY: this process's pid, set at its start.
    unsafe { pg_sys::MyProcPid }
}

/// NOTIFY keel_jobs, '<queue>' in the current transaction (PostgreSQL's pg_notify).
fn notify_now(queue: &str) {
    // SAFETY: pg_notify takes two text datums, made here in the current memory context; it
    // copies them into the transaction's list of pending notifications.
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::pg_notify,
            &["keel_jobs".into_datum(), queue.into_datum()],
        );
    }
}

/// `keel._wake(queue)`: wake the consumers of `queue` when this transaction commits.
#[pg_extern(volatile, parallel_unsafe, name = "_wake")]
fn wake(queue: &str) {
    request(queue)
}

/// Wake the consumers of `queue` when this transaction commits.
pub fn request(queue: &str) {
    if !shmem::enabled() || !guc::WAKE_RELAY.get() {
        notify_now(queue);
        return;
    }
    crate::xact::register();
    WANTED.with_borrow_mut(|w| {
        if !w.iter().any(|q| q == queue) {
            w.push(queue.to_string());
        }
    });
}

/// Just before this transaction commits (it can still NOTIFY): promise to post to this
/// database's relay if one is open and has room, or send the NOTIFY now (with what a relay
/// that is gone left behind).
pub fn before_commit() {
    if WANTED.with_borrow(|w| w.is_empty()) {
        return;
    }
    let database = here();
    let wanted = WANTED.with_borrow(|w| w.len()) as u32;
    let (promised, left_behind) = {
        let mut board = BOARD.exclusive();
        match board.relays.iter().position(|r| r.database == database) {
            Some(i) if board.relays[i].open && board.relays[i].room() >= wanted as usize => {
                let relay = &mut board.relays[i];
                relay.promised += 1;
                relay.reserved += wanted;
                (Some((i, wanted)), Vec::new())
            }
            Some(i) if !board.relays[i].open => (None, board.relays[i].take()),
            _ => (None, Vec::new()),
        }
    };
    match promised {
        Some(p) => PROMISED.set(Some(p)),
        None => {
            let mut queues = WANTED.take();
            for q in left_behind {
                if !queues.contains(&q) {
                    queues.push(q);
                }
            }
            for queue in queues {
                notify_now(&queue);
            }
        }
    }
}

/// After this transaction committed: post its queues and wake the relay. Raises nothing.
pub fn at_commit() {
    let wanted = WANTED.take();
    let Some((i, reserved)) = PROMISED.take() else {
        return;
    };
    let database = here();
    let latch = {
        let mut board = BOARD.exclusive();
        let relay = &mut board.relays[i];
        relay.promised = relay.promised.saturating_sub(1);
        relay.reserved = relay.reserved.saturating_sub(reserved);
        if relay.database != database {
            return; // cannot happen: an entry with promises is never handed on
        }
        for queue in &wanted {
            // Fits: the places were reserved.
            relay.post(queue);
        }
        relay.latch
    };
    if latch != 0 {
        // SAFETY: the relay's PGPROC latch, in shared memory; setting the latch of a process
        // that just ended is harmless.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// The transaction rolled back (or was prepared): nothing to wake. Raises nothing.
pub fn at_abort() {
    WANTED.take();
    if let Some((i, reserved)) = PROMISED.take() {
        let mut board = BOARD.exclusive();
        let relay = &mut board.relays[i];
        relay.promised = relay.promised.saturating_sub(1);
        relay.reserved = relay.reserved.saturating_sub(reserved);
    }
}

/// One round of the relay: NOTIFY for every queue posted since the last round, in one
/// transaction that does not wait for the WAL flush (a notification is not durable anyway).
/// Only while this process owns the entry. True when it sent something.
fn relay_round(index: usize) -> bool {
    let queues = {
        let mut board = BOARD.exclusive();
        let relay = &mut board.relays[index];
        if relay.pid != my_pid() || relay.database != here() {
            return false;
        }
        relay.take()
    };
    if queues.is_empty() {
        return false;
    }
    IN_FLIGHT.set(queues.clone());
    BackgroundWorker::transaction(|| {
        for queue in &queues {
            notify_now(queue);
        }
    });
    IN_FLIGHT.take();
    true
}

/// Takes this database's entry on the board (or a free one) and opens it: a relay still
/// closing there no longer owns it.
fn open_relay() -> Option<usize> {
    let database = here();
    let mut board = BOARD.exclusive();
    let index = board
        .relays
        .iter()
        .position(|r| r.database == database)
        .or_else(|| {
            board
                .relays
                .iter()
                .position(|r| r.database == pg_sys::InvalidOid || r.idle())
        })?;
    let relay = &mut board.relays[index];
    if relay.database != database {
        *relay = Relay {
            database,
            ..Relay::default()
        };
    }
    relay.open = true;
    // SAFETY: this process's latch (in its PGPROC, shared memory).
    relay.latch = unsafe { pg_sys::MyLatch } as usize;
    relay.pid = my_pid();
    Some(index)
}

/// Closes the entry (if still ours): no new promises; waits for those made, then sends what
/// they posted.
fn close_relay(index: usize) {
    {
        let mut board = BOARD.exclusive();
        if board.relays[index].pid != my_pid() {
            return;
        }
        board.relays[index].open = false;
    }
    let until = Instant::now() + CLOSE_WAIT;
    while BOARD.share().relays[index].promised > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    relay_round(index);
    let mut board = BOARD.exclusive();
    let relay = &mut board.relays[index];
    if relay.pid == my_pid() {
        relay.latch = 0;
        relay.pid = 0;
    }
}

/// When a relay process ends however it ends (an error included): the queues of a round it
/// did not finish go back on the board, and its entry is closed if it still owns it.
///
/// # Safety
/// Called only by PostgreSQL as the `before_shmem_exit` callback registered in
/// `keel_waker_main`, in the relay process, with the relay's board index as `arg` (checked
/// against the board's size before use); shared memory is still attached at that point.
#[pg_guard]
unsafe extern "C-unwind" fn at_exit(_code: std::os::raw::c_int, arg: pg_sys::Datum) {
    let index = arg.value();
    if index >= MAX_DATABASES {
        return;
    }
    let in_flight = IN_FLIGHT.take();
    let mut board = BOARD.exclusive();
    let relay = &mut board.relays[index];
    if relay.database == here() {
        for queue in &in_flight {
            relay.post(queue);
        }
    }
    if relay.pid == my_pid() {
        relay.open = false;
        relay.latch = 0;
        relay.pid = 0;
    }
}

/// Whether slot `index` still belongs to the worker generation this relay was started for.
fn slot_still_ours(index: usize, generation: u32) -> bool {
    let slot = registry::snapshot().slots[index];
    slot.generation == generation && matches!(slot.phase, Phase::Running | Phase::Starting)
}

/// The relay of one database, started by the launcher beside the database's worker (same slot
/// and generation in its argument); it leaves when the worker's slot is handed on, when a DROP
/// or ALTER DATABASE wants the database, and on SIGTERM.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn keel_waker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(
        pgrx::bgworkers::SignalWakeFlags::SIGHUP | pgrx::bgworkers::SignalWakeFlags::SIGTERM,
    );
    let arg = arg.value();
    let index = arg & 0xff;
    let generation = (arg >> 8) as u32;
    if index >= MAX_DATABASES || !slot_still_ours(index, generation) {
        return;
    }
    let database = registry::snapshot().slots[index].database;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    BackgroundWorker::transaction(|| {
        Spi::run("SET search_path = pg_catalog, pg_temp")?;
        Spi::run("SET synchronous_commit = off")
    })
    .unwrap_or_else(|e| crate::error::internal(format!("waker: {e}")));
    let Some(relay) = open_relay() else {
        log!("pg_keel waker: no free entry on the wake board; producers NOTIFY themselves");
        return;
    };
    // SAFETY: registers a callback with this process's exit; it takes one LWLock and raises
    // nothing.
    unsafe { pg_sys::before_shmem_exit(Some(at_exit), pg_sys::Datum::from(relay)) };
    // What a relay that is gone left behind.
    relay_round(relay);
    let mut next_look = Instant::now();
    let mut last_round = Instant::now();
    while BackgroundWorker::wait_latch(Some(LOOK_EVERY)) && !BackgroundWorker::sigterm_received() {
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereads postgresql.conf outside any transaction, as the postmaster asked.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let since = last_round.elapsed();
        if since < MIN_ROUND_GAP {
            std::thread::sleep(MIN_ROUND_GAP - since);
        }
        if relay_round(relay) {
            last_round = Instant::now();
        }
        if Instant::now() >= next_look {
            if !slot_still_ours(index, generation)
                || crate::worker::process::database_wanted_exclusively()
            {
                break;
            }
            next_look = Instant::now() + LOOK_EVERY;
        }
    }
    close_relay(relay);
}
