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
//!   database it promises to post there (`promised`), otherwise it sends the NOTIFY itself,
//!   exactly as without the relay.
//! - It posts its queues after its commit is visible (`at_commit`) and sets the relay's latch;
//!   the relay's NOTIFY transaction begins after that, so a consumer woken by it sees the jobs.
//! - A relay that stops closes first (no new promises), waits for the promises already made
//!   (commits in flight, up to `CLOSE_WAIT`), and sends what was posted. What is posted to a
//!   relay that is gone stays on the board for the next one (started again within seconds).
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

/// The distinct queues one relay keeps for its next round; beyond, it wakes every queue.
const MAX_PENDING: usize = 32;

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
    /// Its latch and pid (0 when none runs).
    latch: usize,
    pid: i32,
    /// Producers between their decision and their commit's end.
    promised: u32,
    /// Queues posted since the last round.
    pending: [[u8; MAX_NAME_LEN]; MAX_PENDING],
    pending_lens: [u8; MAX_PENDING],
    pending_used: u8,
    /// More distinct queues were posted than fit: the next round wakes every queue.
    overflow: bool,
    /// Rounds sent and the notifications they carried, for worker_status().
    rounds: i64,
    sent: i64,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            database: pg_sys::InvalidOid,
            open: false,
            latch: 0,
            pid: 0,
            promised: 0,
            pending: [[0; MAX_NAME_LEN]; MAX_PENDING],
            pending_lens: [0; MAX_PENDING],
            pending_used: 0,
            overflow: false,
            rounds: 0,
            sent: 0,
        }
    }
}

impl Relay {
    fn post(&mut self, queue: &str) {
        let bytes = queue.as_bytes();
        let used = self.pending_used as usize;
        if (0..used).any(|i| &self.pending[i][..self.pending_lens[i] as usize] == bytes) {
            return;
        }
        if used == MAX_PENDING || bytes.len() > MAX_NAME_LEN {
            self.overflow = true;
            return;
        }
        self.pending[used][..bytes.len()].copy_from_slice(bytes);
        self.pending_lens[used] = bytes.len() as u8;
        self.pending_used += 1;
    }

    fn take(&mut self) -> (Vec<String>, bool) {
        let names = (0..self.pending_used as usize)
            .map(|i| {
                String::from_utf8_lossy(&self.pending[i][..self.pending_lens[i] as usize])
                    .into_owned()
            })
            .collect();
        let overflow = self.overflow;
        self.pending_used = 0;
        self.overflow = false;
        (names, overflow)
    }

    fn idle(&self) -> bool {
        !self.open && self.promised == 0 && self.pending_used == 0 && !self.overflow
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

static BOARD: PgLwLock<Board> = unsafe { PgLwLock::new(c"pg_keel wake relays") };

pub fn init() {
    pg_shmem_init!(BOARD);
}

thread_local! {
    /// Queues the current transaction enqueued to, in order, without repeats.
    static WANTED: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    /// The relay (index) this transaction promised to post to.
    static PROMISED: Cell<Option<usize>> = const { Cell::new(None) };
}

fn here() -> pg_sys::Oid {
    // SAFETY: this backend's database, set once when it connected.
    unsafe { pg_sys::MyDatabaseId }
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
/// database's relay if one is open, or send the NOTIFY now.
pub fn before_commit() {
    if WANTED.with_borrow(|w| w.is_empty()) {
        return;
    }
    let database = here();
    let promised = {
        let mut board = BOARD.exclusive();
        let found = board
            .relays
            .iter()
            .position(|r| r.database == database && r.open);
        if let Some(i) = found {
            board.relays[i].promised += 1;
        }
        found
    };
    match promised {
        Some(i) => PROMISED.set(Some(i)),
        None => {
            for queue in WANTED.take() {
                notify_now(&queue);
            }
        }
    }
}

/// After this transaction committed: post its queues and wake the relay. Raises nothing.
pub fn at_commit() {
    let wanted = WANTED.take();
    let Some(i) = PROMISED.take() else { return };
    let database = here();
    let latch = {
        let mut board = BOARD.exclusive();
        let relay = &mut board.relays[i];
        relay.promised = relay.promised.saturating_sub(1);
        if relay.database != database {
            return; // cannot happen: an entry with promises is never handed on
        }
        for queue in &wanted {
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
    if let Some(i) = PROMISED.take() {
        let mut board = BOARD.exclusive();
        let relay = &mut board.relays[i];
        relay.promised = relay.promised.saturating_sub(1);
    }
}

/// One round of the relay: NOTIFY for every queue posted since the last round, in one
/// transaction that does not wait for the WAL flush (a notification is not durable anyway).
fn relay_round(index: usize) -> bool {
    let (queues, every_queue) = BOARD.exclusive().relays[index].take();
    if queues.is_empty() && !every_queue {
        return false;
    }
    let sent = BackgroundWorker::transaction(|| {
        let mut queues = queues;
        if every_queue {
            // More queues than the board holds got jobs: wake them all (pg_keel may have been
            // dropped meanwhile: then there is no one to wake).
            let all: Vec<String> = Spi::connect(|c| {
                let installed = c
                    .select("SELECT to_regclass('keel.queues') IS NOT NULL", None, &[])
                    .ok()
                    .and_then(|t| t.first().get::<bool>(1).ok().flatten())
                    .unwrap_or(false);
                if !installed {
                    return Vec::new();
                }
                c.select("SELECT queue FROM keel.queues ORDER BY queue", None, &[])
                    .map(|t| {
                        t.filter_map(|row| row.get::<String>(1).ok().flatten())
                            .collect()
                    })
                    .unwrap_or_default()
            });
            for q in all {
                if !queues.contains(&q) {
                    queues.push(q);
                }
            }
        }
        for queue in &queues {
            notify_now(queue);
        }
        queues.len() as i64
    });
    let mut board = BOARD.exclusive();
    board.relays[index].rounds += 1;
    board.relays[index].sent += sent;
    true
}

/// Takes (or finds) this database's entry on the board and opens it.
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
    // SAFETY: this process's latch (in its PGPROC, shared memory) and pid.
    relay.latch = unsafe { pg_sys::MyLatch } as usize;
    relay.pid = unsafe { pg_sys::MyProcPid };
    Some(index)
}

/// Closes the entry: no new promises; waits for those made, then sends what they posted.
fn close_relay(index: usize) {
    BOARD.exclusive().relays[index].open = false;
    let until = Instant::now() + CLOSE_WAIT;
    while BOARD.share().relays[index].promised > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    relay_round(index);
    let mut board = BOARD.exclusive();
    board.relays[index].latch = 0;
    board.relays[index].pid = 0;
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
    .unwrap_or_else(|e| error!("pg_keel waker: {e}"));
    let Some(relay) = open_relay() else {
        log!("pg_keel waker: no free entry on the wake board; producers NOTIFY themselves");
        return;
    };
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
            if !slot_still_ours(index, generation) || crate::worker::database_wanted_exclusively() {
                break;
            }
            next_look = Instant::now() + LOOK_EVERY;
        }
    }
    close_relay(relay);
}
