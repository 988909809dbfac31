//! One job inserted into `keel.jobs` without SQL: what `INSERT INTO keel.jobs ... VALUES ...`
//! does, without planning and starting a statement for every call (which cost a producer more
//! than the insert itself: `keel.enqueue` went from 0.63x to 0.8x a plain INSERT here):
//!
//! - the next job id from the identity sequence (`nextval`, so as the caller's checks
//!   demand: `enqueue` calls this as pg_keel's owner);
//! - `heap_insert`, which TOASTs a large payload as an INSERT does, and the index entries with
//!   the executor's own routine (unique check of the primary key, partial-index predicates);
//! - the locks an INSERT takes (RowExclusiveLock on the table and its indexes, to the end of
//!   the transaction); a read-only transaction or a standby gets 25006.
//!
//! The table's CHECK constraints are not evaluated: every value is checked before (`enqueue`
//! validates its arguments), and the state is the literal 'ready'; a constraint added by hand
//! (CHECK, NOT NULL), an INSERT trigger, FORCE ROW LEVEL SECURITY, or a column this code does
//! not know is an error rather than something skipped silently.

use pgrx::pg_sys;
use pgrx::pg_sys::BuiltinOid;
use pgrx::prelude::*;
use pgrx::IntoDatum;

use crate::jsonb::RawJsonb;
use crate::relation::{attnums, keel_relid, IndexEntries};

/// Every column of keel.jobs (sql/bootstrap.sql) with its type, in any order.
const COLUMNS: [(&str, BuiltinOid); 17] = [
    ("job_id", BuiltinOid::INT8OID),
    ("queue", BuiltinOid::TEXTOID),
    ("state", BuiltinOid::TEXTOID),
    ("payload", BuiltinOid::JSONBOID),
    ("priority", BuiltinOid::INT4OID),
    ("attempt", BuiltinOid::INT4OID),
    ("attempt_base", BuiltinOid::INT4OID),
    ("max_attempts", BuiltinOid::INT4OID),
    ("visible_at", BuiltinOid::TIMESTAMPTZOID),
    ("enqueued_at", BuiltinOid::TIMESTAMPTZOID),
    ("claimed_at", BuiltinOid::TIMESTAMPTZOID),
    ("worker", BuiltinOid::TEXTOID),
    ("idempotency_key", BuiltinOid::TEXTOID),
    ("last_error", BuiltinOid::TEXTOID),
    ("finished_at", BuiltinOid::TIMESTAMPTZOID),
    ("dead_reason", BuiltinOid::TEXTOID),
    ("claimed_by", BuiltinOid::OIDOID),
];
/// Columns of keel.jobs that the native paths never read or write themselves (an insert leaves
/// them NULL, a claim's update copies them), added by an upgrade: the library works on the
/// catalog of the version before it (between installing it and ALTER EXTENSION UPDATE).
const CARRIED: [&str; 3] = [
    // 0.2.0
    "progress",
    "result",
    "concurrency_key",
];
pub const JOB_ID: usize = 0;
pub const QUEUE: usize = 1;
pub const STATE: usize = 2;
pub const PAYLOAD: usize = 3;
pub const PRIORITY: usize = 4;
pub const ATTEMPT: usize = 5;
pub const ATTEMPT_BASE: usize = 6;
pub const MAX_ATTEMPTS: usize = 7;
pub const VISIBLE_AT: usize = 8;
pub const ENQUEUED_AT: usize = 9;
pub const CLAIMED_AT: usize = 10;
pub const WORKER: usize = 11;
pub const CLAIMED_BY: usize = 16;

/// Rows per heap_multi_insert (COPY buffers up to 1,000).
const MULTI_INSERT_ROWS: usize = 1000;

/// The CHECK constraints of keel.jobs (sql/bootstrap.sql): what `enqueue` checks before
/// inserting, so they hold for every row it makes.
const CHECKS: [&str; 2] = ["jobs_state_valid", "jobs_max_attempts_positive"];

/// The columns an inserted job always has a value in (`max_attempts` may be NULL).
const NOT_NULL: [usize; 9] = [
    JOB_ID,
    QUEUE,
    STATE,
    PAYLOAD,
    PRIORITY,
    ATTEMPT,
    ATTEMPT_BASE,
    VISIBLE_AT,
    ENQUEUED_AT,
];

/// Refuses a keel.jobs whose constraints are not the ones this code satisfies by
/// construction (a CHECK or NOT NULL added by hand), rather than insert past them.
///
/// # Safety
/// `heap` is open.
unsafe fn check_constraints(heap: pg_sys::Relation, cols: &[usize; 17], command: &str) {
    // SAFETY: `heap` is open (the caller's promise), so its descriptor and TupleConstr stay
    // valid while read: `check` holds `num_check` entries (checked non-null first), each with a
    // NUL-terminated `ccname`, and the attributes are the descriptor's `natts`.
    unsafe {
        let desc = (*heap).rd_att;
        let constr = (*desc).constr;
        if constr.is_null() {
            return;
        }
        let checks = std::slice::from_raw_parts((*constr).check, (*constr).num_check as usize);
        let unknown_check = checks.iter().any(|c| {
            let name = std::ffi::CStr::from_ptr(c.ccname).to_bytes();
            !CHECKS.iter().any(|k| k.as_bytes() == name)
        });
        let attrs = crate::pgcompat::attributes(desc);
        let unknown_not_null = attrs.iter().enumerate().any(|(i, a)| {
            a.attnotnull && !a.attisdropped && !NOT_NULL.iter().any(|k| cols[*k] == i + 1)
        });
        if unknown_check || unknown_not_null {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_keel: keel.jobs has constraints pg_keel does not know, which {command} does not check"),
                "Drop the constraints added to keel.jobs; check payloads before enqueue instead."
            );
        }
    }
}

/// Jobs to insert into one queue, their arguments already checked.
pub struct NewJobs<'a> {
    pub queue: &'a str,
    pub payloads: &'a [RawJsonb],
    pub priority: i32,
    pub max_attempts: Option<i32>,
    /// timestamptz values (µs since 2000-01-01).
    pub visible_at: i64,
    pub enqueued_at: i64,
    /// `enqueue(..., concurrency_key)`: written to the column of that name (0.2.0's catalog).
    pub concurrency_key: Option<&'a str>,
}

/// What native code writes to keel.jobs: the triggers it would have to fire.
#[derive(Clone, Copy, PartialEq)]
pub enum Write {
    /// `enqueue`: INSERT triggers.
    Insert,
    /// `claim`: UPDATE triggers.
    Update,
}

/// Opens keel.jobs for a native insert or update, after checking it is the table this code
/// writes: no trigger of that kind, no FORCE ROW LEVEL SECURITY, no constraint or column
/// added by hand. Returns the attribute numbers of `COLUMNS`.
///
/// # Safety
/// Inside a transaction; the caller closes the relation (keeping its lock).
pub unsafe fn open_jobs(write: Write) -> (pg_sys::Relation, [usize; 17]) {
    // SAFETY: inside a transaction (the caller's promise): table_open raises rather than return
    // null, and with RowExclusiveLock held the relcache entry it returns (trigdesc, rd_rel,
    // rd_att) stays valid while it is checked here and until the caller closes it.
    unsafe {
        let heap = pg_sys::table_open(
            keel_relid(c"jobs"),
            pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
        );
        let triggers = (*heap).trigdesc;
        let fires = !triggers.is_null() && {
            let t = &*triggers;
            match write {
                Write::Insert => {
                    t.trig_insert_before_row
                        || t.trig_insert_after_row
                        || t.trig_insert_instead_row
                        || t.trig_insert_before_statement
                        || t.trig_insert_after_statement
                        || t.trig_insert_new_table
                }
                Write::Update => {
                    t.trig_update_before_row
                        || t.trig_update_after_row
                        || t.trig_update_instead_row
                        || t.trig_update_before_statement
                        || t.trig_update_after_statement
                        || t.trig_update_old_table
                        || t.trig_update_new_table
                }
            }
        };
        let (command, kind) = match write {
            Write::Insert => ("enqueue", "INSERT"),
            Write::Update => ("claim", "UPDATE"),
        };
        if fires {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_keel: keel.jobs has {kind} triggers, which {command} does not fire"),
                "Drop them; emit an outbox event from your own transaction instead."
            );
        }
        if (*(*heap).rd_rel).relforcerowsecurity {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_keel: keel.jobs has FORCE ROW LEVEL SECURITY, which {command} does not apply"),
                "ALTER TABLE keel.jobs NO FORCE ROW LEVEL SECURITY; grant per queue with keel.grant_producer or keel.grant_consumer."
            );
        }
        let cols = attnums(heap, "jobs", &COLUMNS);
        let desc = (*heap).rd_att;
        let live = crate::pgcompat::attributes(desc)
            .iter()
            .filter(|a| {
                !a.attisdropped
                    && !CARRIED.iter().any(|c| {
                        c.as_bytes() == std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_bytes()
                    })
            })
            .count();
        if live != COLUMNS.len() {
            crate::error::damaged(
                "keel.jobs has columns pg_keel does not know",
                crate::error::REINSTALL,
            );
        }
        check_constraints(heap, &cols, command);
        (heap, cols)
    }
}

/// Inserts `jobs` as ready jobs and returns their ids, in the order of their payloads. The
/// caller holds the queue's lock and runs as the owner of keel.jobs.
pub fn insert(jobs: &NewJobs) -> Vec<i64> {
    let mut ids = Vec::with_capacity(jobs.payloads.len());
    if jobs.payloads.is_empty() {
        return ids;
    }
    // SAFETY: called inside a transaction by a backend function; the relation, its indexes,
    // the executor state and the slot stay open while the tuples are formed, inserted and
    // indexed, and every datum passed lives in the current memory context until then.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(c"enqueue".as_ptr());
        let (heap, cols) = open_jobs(Write::Insert);
        let sequence = identity_sequence(heap, cols[JOB_ID]);
        let entries = IndexEntries::open(heap);
        let natts = (*(*heap).rd_att).natts as usize;
        let command = pg_sys::GetCurrentCommandId(true);
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        let set = |values: &mut [pg_sys::Datum],
                   nulls: &mut [bool],
                   k: usize,
                   value: Option<pg_sys::Datum>| {
            if let Some(v) = value {
                values[cols[k] - 1] = v;
                nulls[cols[k] - 1] = false;
            }
        };
        set(&mut values, &mut nulls, QUEUE, jobs.queue.into_datum());
        set(&mut values, &mut nulls, STATE, "ready".into_datum());
        set(
            &mut values,
            &mut nulls,
            PRIORITY,
            jobs.priority.into_datum(),
        );
        set(&mut values, &mut nulls, ATTEMPT, 0i32.into_datum());
        set(&mut values, &mut nulls, ATTEMPT_BASE, 0i32.into_datum());
        set(
            &mut values,
            &mut nulls,
            MAX_ATTEMPTS,
            jobs.max_attempts.into_datum(),
        );
        set(
            &mut values,
            &mut nulls,
            VISIBLE_AT,
            Some(pg_sys::Datum::from(jobs.visible_at)),
        );
        set(
            &mut values,
            &mut nulls,
            ENQUEUED_AT,
            Some(pg_sys::Datum::from(jobs.enqueued_at)),
        );
        if let Some(key) = jobs.concurrency_key {
            // A carried column, found by name (`enqueue` has checked the catalog has it).
            let attnum = pg_sys::get_attnum((*heap).rd_id, c"concurrency_key".as_ptr());
            if attnum <= 0 {
                crate::error::damaged(
                    "keel.jobs has no concurrency_key column",
                    crate::error::UPDATE,
                );
            }
            let i = attnum as usize - 1;
            values[i] = key.into_datum().unwrap_or(pg_sys::Datum::from(0));
            nulls[i] = false;
        }
        // The rows of a batch go in with heap_multi_insert, as COPY writes them: one WAL
        // record and one buffer lock per page instead of per row. Then their index entries
        // (the unique check of the primary key, the partial indexes' predicates), as the
        // executor makes them for an INSERT.
        for chunk in jobs.payloads.chunks(MULTI_INSERT_ROWS) {
            let mut slots = Vec::with_capacity(chunk.len());
            for payload in chunk {
                let id: i64 =
                    pgrx::direct_function_call(pg_sys::nextval_oid, &[sequence.into_datum()])
                        .unwrap_or_else(|| crate::error::internal("nextval returned NULL"));
                set(&mut values, &mut nulls, JOB_ID, id.into_datum());
                set(&mut values, &mut nulls, PAYLOAD, payload.into_datum());
                let tuple = pg_sys::heap_form_tuple(
                    (*heap).rd_att,
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                );
                let slot =
                    pg_sys::MakeSingleTupleTableSlot((*heap).rd_att, &pg_sys::TTSOpsHeapTuple);
                pg_sys::ExecStoreHeapTuple(tuple, slot, true);
                slots.push(slot);
                ids.push(id);
            }
            if let [slot] = slots[..] {
                // One row (`enqueue`): a plain heap_insert, whose WAL record is the smaller.
                let tuple = pg_sys::ExecFetchSlotHeapTuple(slot, true, std::ptr::null_mut());
                pg_sys::heap_insert(heap, tuple, command, 0, std::ptr::null_mut());
                (*slot).tts_tid = (*tuple).t_self;
            } else {
                pg_sys::heap_multi_insert(
                    heap,
                    slots.as_mut_ptr(),
                    slots.len() as i32,
                    command,
                    0,
                    std::ptr::null_mut(),
                );
            }
            for slot in slots {
                entries.insert_slot(slot);
                pg_sys::ExecDropSingleTupleTableSlot(slot);
            }
        }
        entries.close();
        // Later statements of this transaction see the jobs.
        pg_sys::CommandCounterIncrement();
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    ids
}

thread_local! {
    /// keel.jobs and its identity sequence, as last looked up (pg_depend is not cached);
    /// forgotten when keel.jobs' relcache entry is invalidated (an ALTER TABLE).
    static SEQUENCE: std::cell::Cell<(pg_sys::Oid, pg_sys::Oid)> =
        const { std::cell::Cell::new((pg_sys::InvalidOid, pg_sys::InvalidOid)) };
    static CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Forgets the cached sequence when keel.jobs' relcache entry (or every entry) is invalidated.
///
/// # Safety
/// Called only by PostgreSQL as the relcache callback registered in [`identity_sequence`], in
/// this backend's main thread; it reads and writes only a thread-local cell.
#[pg_guard]
unsafe extern "C-unwind" fn forget_sequence(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let (table, _) = SEQUENCE.get();
    if relid == pg_sys::InvalidOid || relid == table {
        SEQUENCE.set((pg_sys::InvalidOid, pg_sys::InvalidOid));
    }
}

/// The sequence behind keel.jobs.job_id; looked up again when the table is another one (the
/// extension was dropped and created again).
///
/// # Safety
/// Inside a transaction, with keel.jobs (`heap`) open.
unsafe fn identity_sequence(heap: pg_sys::Relation, attnum: usize) -> pg_sys::Oid {
    // SAFETY: the caller's relation is open.
    let relid = unsafe { (*heap).rd_id };
    let (table, sequence) = SEQUENCE.get();
    if table == relid {
        return sequence;
    }
    if !CALLBACK.get() {
        // SAFETY: registers a callback for the life of the backend; it only clears a cell.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(forget_sequence), pg_sys::Datum::from(0))
        };
        CALLBACK.set(true);
    }
    // SAFETY: a catalog lookup of an existing column; raises if it has no identity sequence.
    let sequence = unsafe { crate::pgcompat::identity_sequence(heap, attnum) };
    SEQUENCE.set((relid, sequence));
    sequence
}
