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
//! validates its arguments), and the state is the literal 'ready'. Triggers on `keel.jobs`
//! would not fire here, so the table must have none (an error says so), and a column this
//! code does not know (a table changed by hand) is an error rather than a NULL written in it.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::IntoDatum;

use crate::jsonb::RawJsonb;
use crate::relation::{attnums, keel_relid};

/// Every column of keel.jobs (sql/bootstrap.sql), in any order.
const COLUMNS: [&str; 17] = [
    "job_id",
    "queue",
    "state",
    "payload",
    "priority",
    "attempt",
    "attempt_base",
    "max_attempts",
    "visible_at",
    "enqueued_at",
    "claimed_at",
    "worker",
    "idempotency_key",
    "last_error",
    "finished_at",
    "dead_reason",
    "claimed_by",
];
const JOB_ID: usize = 0;
const QUEUE: usize = 1;
const STATE: usize = 2;
const PAYLOAD: usize = 3;
const PRIORITY: usize = 4;
const ATTEMPT: usize = 5;
const ATTEMPT_BASE: usize = 6;
const MAX_ATTEMPTS: usize = 7;
const VISIBLE_AT: usize = 8;
const ENQUEUED_AT: usize = 9;

/// Jobs to insert into one queue, their arguments already checked.
pub struct NewJobs<'a> {
    pub queue: &'a str,
    pub payloads: &'a [RawJsonb],
    pub priority: i32,
    pub max_attempts: Option<i32>,
    /// timestamptz values (µs since 2000-01-01).
    pub visible_at: i64,
    pub enqueued_at: i64,
}

/// Opens keel.jobs for an insert, after checking it is the table this code writes.
///
/// # Safety
/// Inside a transaction; the caller closes the relation (keeping its lock).
unsafe fn open_jobs() -> (pg_sys::Relation, [usize; 17]) {
    unsafe {
        let heap = pg_sys::table_open(
            keel_relid(c"jobs"),
            pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
        );
        if !(*heap).trigdesc.is_null() {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pg_keel: keel.jobs has triggers, which enqueue does not fire",
                "Drop the triggers on keel.jobs; emit an outbox event from your own transaction instead."
            );
        }
        if (*(*heap).rd_rel).relam != pg_sys::HEAP_TABLE_AM_OID {
            error!("pg_keel: keel.jobs is not a heap table; reinstall the extension");
        }
        let cols = attnums(heap, "jobs", &COLUMNS);
        let desc = (*heap).rd_att;
        let live = (*desc)
            .attrs
            .as_slice((*desc).natts as usize)
            .iter()
            .filter(|a| !a.attisdropped)
            .count();
        if live != COLUMNS.len() {
            error!("pg_keel: keel.jobs has columns pg_keel does not know; reinstall the extension");
        }
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
        let (heap, cols) = open_jobs();
        let sequence = identity_sequence((*heap).rd_id, cols[JOB_ID]);
        let estate = pg_sys::CreateExecutorState();
        let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            as *mut pg_sys::ResultRelInfo;
        pg_sys::InitResultRelInfo(rri, heap, 0, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(rri, false);
        let slot = pg_sys::MakeSingleTupleTableSlot((*heap).rd_att, &pg_sys::TTSOpsHeapTuple);
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
        for payload in jobs.payloads {
            let id: i64 = pgrx::direct_function_call(pg_sys::nextval_oid, &[sequence.into_datum()])
                .unwrap_or_else(|| error!("pg_keel: nextval returned NULL"));
            set(&mut values, &mut nulls, JOB_ID, id.into_datum());
            set(&mut values, &mut nulls, PAYLOAD, payload.into_datum());
            let tuple =
                pg_sys::heap_form_tuple((*heap).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::heap_insert(heap, tuple, command, 0, std::ptr::null_mut());
            pg_sys::ExecStoreHeapTuple(tuple, slot, false);
            // The unique check of the primary key and the partial indexes' predicates, as
            // the executor does for an INSERT.
            pg_sys::ExecInsertIndexTuples(
                rri,
                slot,
                estate,
                false,
                false,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            pg_sys::ExecClearTuple(slot);
            pg_sys::heap_freetuple(tuple);
            // What the predicates' evaluation allocated for this tuple.
            let per_tuple = (*estate).es_per_tuple_exprcontext;
            if !per_tuple.is_null() {
                pg_sys::MemoryContextReset((*per_tuple).ecxt_per_tuple_memory);
            }
            ids.push(id);
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::ExecCloseIndices(rri);
        pg_sys::FreeExecutorState(estate);
        // Later statements of this transaction see the jobs.
        pg_sys::CommandCounterIncrement();
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    ids
}

thread_local! {
    /// keel.jobs and its identity sequence, as last looked up (pg_depend is not cached).
    static SEQUENCE: std::cell::Cell<(pg_sys::Oid, pg_sys::Oid)> =
        const { std::cell::Cell::new((pg_sys::InvalidOid, pg_sys::InvalidOid)) };
}

/// The sequence behind keel.jobs.job_id; looked up again when the table is another one (the
/// extension was dropped and created again).
///
/// # Safety
/// Inside a transaction, with keel.jobs (`relid`) open.
unsafe fn identity_sequence(relid: pg_sys::Oid, attnum: usize) -> pg_sys::Oid {
    let (table, sequence) = SEQUENCE.get();
    if table == relid {
        return sequence;
    }
    // SAFETY: a catalog lookup of an existing column; raises if it has no identity sequence.
    let sequence =
        unsafe { pg_sys::getIdentitySequence(relid, attnum as pg_sys::AttrNumber, false) };
    SEQUENCE.set((relid, sequence));
    sequence
}
