//! The work of `keel.claim` without SQL: what its `UPDATE … WHERE ctid = ANY (ARRAY(SELECT …
//! ORDER BY … LIMIT n FOR UPDATE SKIP LOCKED))` did, without planning and starting that
//! statement on every claim. Starting it (a sub-select, a window for the byte budget, a sort,
//! row locking, the update and its projection) cost more than the rows it leased when a claim
//! found a few jobs: with 16 consumers on a shallow queue, the claims' CPU was what the
//! producers lacked, and dropping only the window gave 13% more steady-state throughput.
//!
//! - An index scan of `jobs_claim_idx` in claim order (queue, priority, visible_at, job_id):
//!   from a priority's floor (`floor`), or over the whole queue; only entries claimable now
//!   (`visible_at <= now`), under a snapshot taken after the calls before it in this
//!   transaction.
//! - Each row the snapshot sees is checked as the statement's WHERE clause checked it (ready,
//!   or running with its lease expired before its last try), then locked as `FOR UPDATE SKIP
//!   LOCKED` locks it: a row another transaction holds, or one changed since the snapshot (by
//!   a claim, an ack, a retry), is skipped, never waited for. The statement re-checked a
//!   changed row on its newest version instead; skipping it leaves it to the next claim,
//!   which sees that version.
//! - The locked version is updated (`simple_heap_update`: it cannot fail, the row lock is
//!   ours) and its index entries made by the executor's routine (`relation::IndexEntries`).
//! - The byte budget is counted before a row is locked, so the rows past it are not touched
//!   (the statement locked them until its transaction ended).
//!
//! Like `queue::insert`: no UPDATE trigger, FORCE ROW LEVEL SECURITY or hand-made constraint
//! may be on keel.jobs (an error says so), and a read-only transaction gets 25006.

use pgrx::pg_sys;
use pgrx::{FromDatum, IntoDatum};

use super::floor::Scope;
use super::insert::{
    open_jobs, Write, ATTEMPT, ATTEMPT_BASE, CLAIMED_AT, CLAIMED_BY, ENQUEUED_AT, JOB_ID,
    MAX_ATTEMPTS, PAYLOAD, PRIORITY, QUEUE, STATE, VISIBLE_AT, WORKER,
};
use crate::jsonb::RawJsonb;
use crate::pgcompat;
use crate::relation::{keel_relid, IndexEntries};

/// The lease every job of one claim gets.
pub struct Lease<'a> {
    /// The claim's clock (µs): what is claimable, and `claimed_at`.
    pub now: i64,
    /// `lease_expires_at`, the new visible_at.
    pub until: i64,
    pub worker: Option<&'a str>,
    /// The queue's max_attempts, for jobs without their own.
    pub max_attempts: Option<i32>,
    /// The crash fence (see `fence`): a job never claimed, enqueued and due before it, skips
    /// attempt 1.
    pub fence: Option<i64>,
    pub role: pg_sys::Oid,
}

/// A leased job, as `claim` returns it.
pub struct Taken {
    pub job_id: i64,
    pub attempt: i32,
    pub payload: RawJsonb,
    pub priority: i32,
    pub enqueued_at: i64,
    pub lease_expires_at: i64,
}

/// keel.jobs, its claim index and what a claim writes with, open for one claim.
struct Jobs {
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    cols: [usize; 17],
    entries: IndexEntries,
    slot: *mut pg_sys::TupleTableSlot,
    command: pg_sys::CommandId,
    running: pg_sys::Datum,
    worker: Option<pg_sys::Datum>,
}

/// The columns a claim writes.
const WRITTEN: [usize; 7] = [
    STATE,
    ATTEMPT,
    ATTEMPT_BASE,
    VISIBLE_AT,
    CLAIMED_AT,
    WORKER,
    CLAIMED_BY,
];

/// Leases up to `batch` claimable jobs of `queue` in claim order, scope after scope, whose
/// payloads before each stay under `max_bytes` (always one at least); payloads are copied
/// into `outer`. The caller runs as pg_keel's owner and has checked every argument.
pub fn take(
    queue: &str,
    scopes: &[Scope],
    batch: i32,
    max_bytes: i64,
    lease: &Lease,
    outer: pg_sys::MemoryContext,
) -> Vec<Taken> {
    let mut taken = Vec::new();
    let mut bytes = 0i64;
    // SAFETY: inside a transaction, called by a backend function. The relations stay open and
    // locked (RowExclusiveLock, as an UPDATE takes) until closed below; the snapshot stays
    // pushed while the scans run; every tuple is formed and its datums read while the slot
    // holding the version it came from keeps that page pinned.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(c"claim".as_ptr());
        let (heap, cols) = open_jobs(Write::Update);
        let index = open_claim_index(heap, &cols);
        // What this transaction wrote before (an enqueue, an earlier claim) is seen; the
        // locks and updates below are of the same command as the snapshot, as in a statement.
        pg_sys::CommandCounterIncrement();
        pg_sys::PushCopiedSnapshot(pg_sys::GetTransactionSnapshot());
        pg_sys::UpdateActiveSnapshotCommandId();
        let snapshot = pg_sys::GetActiveSnapshot();
        let jobs = Jobs {
            heap,
            index,
            cols,
            entries: IndexEntries::open_for_update(heap, &WRITTEN.map(|k| cols[k])),
            slot: pg_sys::table_slot_create(heap, std::ptr::null_mut()),
            command: pg_sys::GetCurrentCommandId(true),
            running: "running".into_datum().unwrap_or(pg_sys::Datum::from(0)),
            worker: lease.worker.and_then(|w| w.into_datum()),
        };
        'scopes: for scope in scopes {
            for mut keys in scan_keys(&jobs, queue, *scope, lease.now) {
                let scan = pgcompat::index_beginscan(heap, index, snapshot, keys.len());
                pg_sys::index_rescan(
                    scan,
                    keys.as_mut_ptr(),
                    keys.len() as i32,
                    std::ptr::null_mut(),
                    0,
                );
                // Full: the batch, or the payload bytes before the next job (one job at least).
                let mut full = false;
                while pg_sys::index_getnext_slot(
                    scan,
                    pg_sys::ScanDirection::ForwardScanDirection,
                    jobs.slot,
                ) {
                    if let Some(job) = jobs.lease_one(lease, outer) {
                        bytes += crate::jsonb::raw_size(job.payload);
                        taken.push(job);
                        // Stop here, not at the next row: the whole-queue scan has no upper
                        // end but the queue's, and would walk every lease to find one.
                        full = taken.len() as i32 >= batch || bytes >= max_bytes;
                        if full {
                            break;
                        }
                    }
                }
                pg_sys::index_endscan(scan);
                if full {
                    break 'scopes;
                }
            }
        }
        pg_sys::PopActiveSnapshot();
        pg_sys::ExecDropSingleTupleTableSlot(jobs.slot);
        jobs.entries.close();
        // Later statements of this transaction see the leases.
        pg_sys::CommandCounterIncrement();
        // Locks stay until the end of the transaction, as for an UPDATE.
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    taken
}

/// Opens keel.jobs_claim_idx and checks it is (queue, priority, visible_at, job_id).
///
/// # Safety
/// `heap` is keel.jobs, open.
unsafe fn open_claim_index(heap: pg_sys::Relation, cols: &[usize; 17]) -> pg_sys::Relation {
    // SAFETY: `heap` is open (the caller's promise); index_open raises rather than return null,
    // and with RowExclusiveLock held the index's relcache entry stays valid: `indkey` has
    // `indnatts` entries. `rd_indoption` has one entry per *key* column (indnkeyatts); the four
    // read here are in bounds because `indnkeyatts == 4` is checked first (&& short-circuits),
    // which also refuses an index rebuilt by hand with INCLUDE columns.
    unsafe {
        let index = pg_sys::index_open(
            keel_relid(c"jobs_claim_idx"),
            pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
        );
        let form = (*index).rd_index;
        let keys = (*form).indkey.values.as_slice((*form).indnatts as usize);
        let options = (*index).rd_indoption;
        let expected = [QUEUE, PRIORITY, VISIBLE_AT, JOB_ID].map(|k| cols[k]);
        // A btree in ascending order, complete (not one a failed CREATE INDEX CONCURRENTLY
        // left, nor one being dropped): a scan of anything else could miss jobs.
        let usable = (*form).indrelid == (*heap).rd_id
            && (*(*index).rd_rel).relam
                == pg_sys::Oid::from(pg_sys::BuiltinOid::BTREE_AM_OID as u32)
            && (*form).indisvalid
            && (*form).indisready
            && (*form).indislive
            && keys.len() == 4
            && (*form).indnkeyatts == 4
            && keys.iter().zip(expected).all(|(k, e)| *k as usize == e)
            && (0..4).all(|i| *options.add(i) == 0);
        if !usable {
            crate::error::damaged(
                "keel.jobs_claim_idx is not the btree (queue, priority, visible_at, job_id) of keel.jobs",
                crate::error::REINSTALL,
            );
        }
        index
    }
}

/// One scan key on column `attno` (1-based) of the claim index.
fn key(
    attno: i16,
    strategy: u32,
    procedure: u32,
    collation: pg_sys::Oid,
    value: pg_sys::Datum,
) -> pg_sys::ScanKeyData {
    // SAFETY: ScanKeyData is plain data; ScanKeyEntryInitialize fills every field.
    unsafe {
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyEntryInitialize(
            &mut key,
            0,
            attno,
            strategy as pg_sys::StrategyNumber,
            pg_sys::InvalidOid,
            collation,
            pg_sys::RegProcedure::from(procedure),
            value,
        );
        key
    }
}

/// The scans of one scope, in claim order, each its keys in index column order. A floor with
/// a job_id is two scans: its own visible_at from that job_id up, then the later ones (a row
/// comparison would be one; two plain ranges are what a reader can check by eye).
fn scan_keys(jobs: &Jobs, queue: &str, scope: Scope, now: i64) -> Vec<Vec<pg_sys::ScanKeyData>> {
    use pg_sys::{
        BTEqualStrategyNumber as EQ, BTGreaterEqualStrategyNumber as GE,
        BTGreaterStrategyNumber as GT, BTLessEqualStrategyNumber as LE,
    };
    // SAFETY: the index is open; its collation array has one entry per key column.
    let collation = unsafe { *(*jobs.index).rd_indcollation };
    let text = queue.into_datum().unwrap_or(pg_sys::Datum::from(0));
    let at = |t: i64| pg_sys::Datum::from(t);
    let queue_key = || key(1, EQ, pg_sys::F_TEXTEQ, collation, text);
    let until_now = || key(3, LE, pg_sys::F_TIMESTAMPTZ_LE, pg_sys::InvalidOid, at(now));
    match scope {
        Scope::Whole => vec![vec![queue_key(), until_now()]],
        Scope::Priority {
            priority,
            floor: (floor_at, floor_id),
        } => {
            let priority_key = || {
                key(
                    2,
                    EQ,
                    pg_sys::F_INT4EQ,
                    pg_sys::InvalidOid,
                    pg_sys::Datum::from(priority),
                )
            };
            if floor_at > now {
                return Vec::new();
            }
            if floor_id == i64::MIN {
                return vec![vec![
                    queue_key(),
                    priority_key(),
                    key(
                        3,
                        GE,
                        pg_sys::F_TIMESTAMPTZ_GE,
                        pg_sys::InvalidOid,
                        at(floor_at),
                    ),
                    until_now(),
                ]];
            }
            vec![
                vec![
                    queue_key(),
                    priority_key(),
                    key(
                        3,
                        EQ,
                        pg_sys::F_TIMESTAMPTZ_EQ,
                        pg_sys::InvalidOid,
                        at(floor_at),
                    ),
                    key(
                        4,
                        GE,
                        pg_sys::F_INT8GE,
                        pg_sys::InvalidOid,
                        pg_sys::Datum::from(floor_id),
                    ),
                ],
                vec![
                    queue_key(),
                    priority_key(),
                    key(
                        3,
                        GT,
                        pg_sys::F_TIMESTAMPTZ_GT,
                        pg_sys::InvalidOid,
                        at(floor_at),
                    ),
                    until_now(),
                ],
            ]
        }
    }
}

impl Jobs {
    /// Leases the row in `self.slot` when it is claimable and no one else holds it.
    ///
    /// # Safety
    /// `self.slot` holds a version the scan's snapshot sees, its page pinned.
    unsafe fn lease_one(&self, lease: &Lease, outer: pg_sys::MemoryContext) -> Option<Taken> {
        // SAFETY: `self.slot` holds a visible version with its page pinned (the caller's
        // promise); after slot_getallattrs its `tts_values`/`tts_isnull` hold the table's
        // `natts` entries, and by-reference datums point into that pinned page, whose tuple
        // data heap_lock_tuple and simple_heap_update do not move (they change the old
        // version's header only; pruning needs a cleanup lock, which our pin prevents). Values
        // are read as the column types open_jobs checked (text state, integer attempts, bigint
        // job_id, timestamptz times, jsonb payload). The new tuple is formed from them before
        // the update and freed after; the payload is copied into `outer` (a live context of
        // the caller) before the slot is cleared. heap_lock_tuple's buffer pin is released
        // here; `simple_heap_update` gets our row lock's version (TM_Ok just above).
        unsafe {
            let slot = self.slot;
            pg_sys::slot_getallattrs(slot);
            let natts = (*(*self.heap).rd_att).natts as usize;
            let values = std::slice::from_raw_parts((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts);
            let col = |k: usize| {
                let i = self.cols[k] - 1;
                (!nulls[i]).then_some(values[i])
            };
            let int = |k: usize| col(k).map(|d| d.value() as i32);
            let big = |k: usize| col(k).map(|d| d.value() as i64);
            let state = String::from_datum(col(STATE)?, false)?;
            let visible_at = big(VISIBLE_AT)?;
            let attempt = int(ATTEMPT)?;
            let attempt_base = int(ATTEMPT_BASE)?;
            let enqueued_at = big(ENQUEUED_AT)?;
            let tries_left = int(MAX_ATTEMPTS)
                .or(lease.max_attempts)
                .is_some_and(|max| attempt - attempt_base < max);
            let claimable =
                visible_at <= lease.now && (state == "ready" || (state == "running" && tries_left));
            if !claimable {
                return None;
            }
            let job_id = big(JOB_ID)?;
            let priority = int(PRIORITY)?;
            let payload = col(PAYLOAD)?;
            // FOR UPDATE SKIP LOCKED: held by another transaction, or changed since the
            // snapshot (TM_Updated, TM_Deleted): not ours to take now.
            let mut locked = pg_sys::HeapTupleData {
                t_self: (*slot).tts_tid,
                ..std::mem::zeroed()
            };
            let mut buffer: pg_sys::Buffer = 0;
            let mut failure = pg_sys::TM_FailureData::default();
            let result = pg_sys::heap_lock_tuple(
                self.heap,
                &mut locked,
                self.command,
                pg_sys::LockTupleMode::LockTupleExclusive,
                pg_sys::LockWaitPolicy::LockWaitSkip,
                false,
                &mut buffer,
                &mut failure,
            );
            if buffer != 0 {
                pg_sys::ReleaseBuffer(buffer);
            }
            if result != pg_sys::TM_Result::TM_Ok {
                return None;
            }
            // A job never handed out whose attempt 1 a claim the crash forgot may have made
            // (see `fence`) skips that number, not counted as a try.
            let fenced = attempt == 0
                && lease
                    .fence
                    .is_some_and(|f| enqueued_at < f && visible_at < f);
            let new_attempt = attempt + if fenced { 2 } else { 1 };
            let mut new_values = values.to_vec();
            let mut new_nulls = nulls.to_vec();
            let mut set = |k: usize, value: Option<pg_sys::Datum>| {
                let i = self.cols[k] - 1;
                new_nulls[i] = value.is_none();
                new_values[i] = value.unwrap_or(pg_sys::Datum::from(0));
            };
            set(STATE, Some(self.running));
            set(ATTEMPT, Some(pg_sys::Datum::from(new_attempt)));
            set(
                ATTEMPT_BASE,
                Some(pg_sys::Datum::from(attempt_base + fenced as i32)),
            );
            set(VISIBLE_AT, Some(pg_sys::Datum::from(lease.until)));
            set(CLAIMED_AT, Some(pg_sys::Datum::from(lease.now)));
            set(WORKER, self.worker);
            set(CLAIMED_BY, Some(pg_sys::Datum::from(lease.role)));
            let tuple = pg_sys::heap_form_tuple(
                (*self.heap).rd_att,
                new_values.as_mut_ptr(),
                new_nulls.as_mut_ptr(),
            );
            let mut tid = (*slot).tts_tid;
            let indexes = pgcompat::simple_heap_update(self.heap, &mut tid, tuple);
            self.entries.insert_updated(tuple, indexes);
            let job = Taken {
                job_id,
                attempt: new_attempt,
                payload: RawJsonb::copy_into(payload, outer),
                priority,
                enqueued_at,
                lease_expires_at: lease.until,
            };
            pg_sys::heap_freetuple(tuple);
            Some(job)
        }
    }
}
