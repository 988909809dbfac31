//! The durable decision on a key that has a row, without SQL: one probe of the primary key,
//! the step computed on the version found, and `heap_update` of that version, which takes the
//! row lock. It is what `UPDATE … WHERE policy = $1 AND key = $2` does, without planning and
//! starting a statement for every call (which cost more than the update itself):
//!
//! - under READ COMMITTED, a version updated or deleted by a transaction that commits while
//!   we wait (for that transaction, then in the row's lock queue if we lose the race again)
//!   makes the whole step start again on a fresh snapshot, so a decision is always
//!   computed from the newest committed state (the executor re-evaluates its expressions on
//!   the newest version for the same effect); under REPEATABLE READ and SERIALIZABLE it is a
//!   serialization failure (40001), as for an UPDATE;
//! - the command counter is advanced around each decision, so several decisions on one key
//!   inside one statement or transaction each see the previous one;
//! - a step that writes nothing (a denial consumes nothing) takes no row lock and writes no WAL;
//! - an update that cannot be HOT (the page is full) inserts the new version's index entries
//!   with the executor's own routine, for every index of the table;
//! - the locks are the ones an UPDATE takes (RowExclusiveLock on the table and its indexes, to
//!   the end of the transaction); a read-only transaction or a standby gets 25006.
//!
//! Triggers on `keel.rate_limit_state` would not fire here, so the table must have none: an
//! error says so rather than skipping them silently.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::pg_sys::BuiltinOid;
use pgrx::prelude::*;

use crate::pgcompat::{self, IndexUpdate};
use pgrx::IntoDatum;

use super::algo::State;
use crate::relation::{attnums, keel_relid, IndexEntries};

/// What a step wants written: the key's new state and when it is back to full capacity (µs
/// since 2000-01-01, a timestamptz).
pub struct Write {
    pub state: State,
    pub expires_at: i64,
}

pub enum Outcome<T> {
    Decided(T),
    /// No visible row for the key (never decided, cleaned up, or deleted meanwhile).
    Missing,
}

const COLUMNS: [(&str, BuiltinOid); 6] = [
    ("policy", BuiltinOid::TEXTOID),
    ("key", BuiltinOid::TEXTOID),
    ("a", BuiltinOid::INT8OID),
    ("b", BuiltinOid::INT8OID),
    ("c", BuiltinOid::INT8OID),
    ("expires_at", BuiltinOid::TIMESTAMPTZOID),
];
const POLICY: usize = 0;
const KEY: usize = 1;
const A: usize = 2;
const B: usize = 3;
const C: usize = 4;
const EXPIRES_AT: usize = 5;

/// Opens keel.rate_limit_state with RowExclusiveLock, refusing a table with triggers.
///
/// # Safety
/// Inside a transaction; the caller closes the relation (keeping its lock) before the
/// transaction ends.
unsafe fn open_table() -> pg_sys::Relation {
    // SAFETY: inside a transaction (the caller's promise): table_open raises rather than
    // return a null relation, and the open relation's relcache entry (its trigdesc) stays
    // valid while we hold the lock.
    unsafe {
        let oid = keel_relid(c"rate_limit_state");
        let heap = pg_sys::table_open(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if !(*heap).trigdesc.is_null() {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pg_keel: keel.rate_limit_state has triggers, which rate-limit decisions do not fire",
                "Drop the triggers on keel.rate_limit_state; read keel.rate_limit_denials instead."
            );
        }
        heap
    }
}

/// Opens the primary key and checks it is (policy, key).
///
/// # Safety
/// `heap` is keel.rate_limit_state, open (see [`open_table`]); the caller closes the index
/// before the transaction ends.
unsafe fn open_primary_key(heap: pg_sys::Relation, cols: &[usize; 6]) -> pg_sys::Relation {
    // SAFETY: `heap` is open (the caller's promise), so its relcache entry gives its primary
    // key; index_open raises rather than return null, and `rd_index.indkey` has `indnatts`
    // entries, read while the index is open.
    unsafe {
        let oid = pgcompat::primary_key_index(heap);
        if oid == pg_sys::InvalidOid {
            crate::error::damaged(
                "keel.rate_limit_state has no primary key",
                crate::error::REINSTALL,
            );
        }
        let index = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let form = (*index).rd_index;
        let keys = (*form).indkey.values.as_slice((*form).indnatts as usize);
        if keys.len() != 2 || keys[0] as usize != cols[POLICY] || keys[1] as usize != cols[KEY] {
            crate::error::damaged(
                "the primary key of keel.rate_limit_state is not (policy, key)",
                crate::error::REINSTALL,
            );
        }
        index
    }
}

/// The index entries the new version of an updated row needs (none after a HOT update).
///
/// # Safety
/// `heap` is open with RowExclusiveLock and `tuple` was just written by [`heap_update`].
unsafe fn insert_index_entries(
    heap: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    indexes: IndexUpdate,
) {
    if indexes == IndexUpdate::None {
        return;
    }
    // SAFETY: as the caller promises.
    unsafe {
        let entries = IndexEntries::open(heap);
        entries.insert_updated(tuple, indexes);
        entries.close();
    }
}

/// `heap_update` of `tid` to `tuple`; with the transaction that holds the row when it says
/// TM_BeingModified (`wait` false), and the index entries the new version needs.
///
/// # Safety
/// `heap` is open with RowExclusiveLock, `tid` points at a row version of it and `tuple` was
/// formed with its descriptor.
unsafe fn heap_update(
    heap: pg_sys::Relation,
    tid: &mut pg_sys::ItemPointerData,
    tuple: pg_sys::HeapTuple,
    wait: bool,
) -> (pg_sys::TM_Result::Type, pg_sys::TransactionId, IndexUpdate) {
    let mut failure = pg_sys::TM_FailureData::default();
    let mut lock_mode: pg_sys::LockTupleMode::Type = 0;
    // SAFETY: as the caller promises.
    let (result, indexes) =
        unsafe { pgcompat::heap_update(heap, tid, tuple, wait, &mut failure, &mut lock_mode) };
    (result, failure.xmax, indexes)
}

/// Runs `step` on the newest committed state of (policy, key) and writes what it returns, as
/// described at the top of this module. `command` names the caller in the read-only error.
pub fn update<T>(
    command: &CStr,
    policy: &str,
    key: &str,
    mut step: impl FnMut(State) -> (T, Option<Write>),
) -> Outcome<T> {
    // SAFETY: called from a SQL function, inside a transaction. The table and its primary key
    // stay open with RowExclusiveLock (as an UPDATE takes) until closed at the end; the index
    // is the checked (policy, key) btree, so `rd_indcollation` has the two entries read and
    // both scan keys are text equality on its two columns, with datums that live through the
    // loop. Each snapshot stays pushed while its scan runs. The slot's values are read after
    // slot_getallattrs (natts of them) and the new version is formed while the slot still
    // pins the page their by-reference datums point into; only then is the slot dropped and
    // the page unpinned, before heap_update, which may prune it. `tid` is the found version's,
    // and `tuple` was formed with the table's descriptor. The columns' SQL types (text keys,
    // bigint a/b/c, timestamptz expires_at) are the installed table's: only names are checked.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(command.as_ptr());
        let heap = open_table();
        let cols = attnums(heap, "rate_limit_state", &COLUMNS);
        let index = open_primary_key(heap, &cols);
        let natts = (*(*heap).rd_att).natts as usize;
        let collations = (*index).rd_indcollation;
        let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
        for (i, value) in [policy, key].into_iter().enumerate() {
            pg_sys::ScanKeyEntryInitialize(
                &mut keys[i],
                0,
                i as pg_sys::AttrNumber + 1,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                *collations.add(i),
                pg_sys::RegProcedure::from(pg_sys::F_TEXTEQ),
                value.into_datum().unwrap_or(pg_sys::Datum::from(0)),
            );
        }
        let mut waited = false;
        let outcome = loop {
            // See what this transaction wrote so far, our previous decisions included.
            pg_sys::CommandCounterIncrement();
            pg_sys::PushCopiedSnapshot(pg_sys::GetTransactionSnapshot());
            pg_sys::UpdateActiveSnapshotCommandId();
            let snapshot = pg_sys::GetActiveSnapshot();
            let scan = pgcompat::index_beginscan(heap, index, snapshot, 2);
            pg_sys::index_rescan(scan, keys.as_mut_ptr(), 2, std::ptr::null_mut(), 0);
            let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
            let found =
                pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot);
            let planned = if found {
                pg_sys::slot_getallattrs(slot);
                let values = std::slice::from_raw_parts((*slot).tts_values, natts);
                let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts);
                let int = |k: usize| {
                    let i = cols[k] - 1;
                    if nulls[i] {
                        0
                    } else {
                        values[i].value() as i64
                    }
                };
                let state = State {
                    a: int(A),
                    b: int(B),
                    c: int(C),
                };
                let (result, write) = step(state);
                // The new version is formed while the buffer is pinned: the other columns'
                // values still point into it.
                let tuple = write.map(|w| {
                    let mut values = values.to_vec();
                    let mut nulls = nulls.to_vec();
                    for (k, v) in [
                        (A, w.state.a),
                        (B, w.state.b),
                        (C, w.state.c),
                        (EXPIRES_AT, w.expires_at),
                    ] {
                        values[cols[k] - 1] = pg_sys::Datum::from(v);
                        nulls[cols[k] - 1] = false;
                    }
                    pg_sys::heap_form_tuple((*heap).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr())
                });
                Some((result, tuple, (*slot).tts_tid))
            } else {
                None
            };
            // Ends the scan and unpins the page before the update, which may prune it.
            pg_sys::ExecDropSingleTupleTableSlot(slot);
            pg_sys::index_endscan(scan);
            let Some((result, tuple, mut tid)) = planned else {
                pg_sys::PopActiveSnapshot();
                break Outcome::Missing;
            };
            let Some(tuple) = tuple else {
                pg_sys::PopActiveSnapshot();
                break Outcome::Decided(result);
            };
            let (mut updated, xmax, mut indexes) = heap_update(heap, &mut tid, tuple, false);
            if updated == pg_sys::TM_Result::TM_BeingModified {
                if !waited
                    && xmax != pg_sys::InvalidTransactionId
                    && !pg_sys::TransactionIdIsCurrentTransactionId(xmax)
                {
                    waited = true;
                    // Another decision holds the key. The first time, wait for its
                    // transaction itself (as INSERT … ON CONFLICT's waiters do), then decide
                    // again on what it leaves: in the row's lock queue, the waiters would be
                    // woken one after the other, each only to find the row changed. A
                    // decision that loses that race too waits in the queue (below), so under
                    // heavy contention waiters line up instead of all waking at every commit.
                    // pgbench on one hot key (2 cores): the queue alone gave 2.7-3.4k/s with
                    // 4 clients, waiting for the holder alone 2.4-2.6k/s with 16; this way
                    // 3.9-4.6k/s and 3.3-3.6k/s.
                    pg_sys::PopActiveSnapshot();
                    pg_sys::heap_freetuple(tuple);
                    pg_sys::XactLockTableWait(xmax, heap, &mut tid, pg_sys::XLTW_Oper::XLTW_Update);
                    continue;
                }
                // Waited once already, or only lockers (or our own lock): the full protocol,
                // which queues on the row lock and decides whether to wait at all.
                (updated, _, indexes) = heap_update(heap, &mut tid, tuple, true);
            }
            pg_sys::PopActiveSnapshot();
            match updated {
                pg_sys::TM_Result::TM_Ok => {
                    insert_index_entries(heap, tuple, indexes);
                    pg_sys::heap_freetuple(tuple);
                    pg_sys::CommandCounterIncrement();
                    break Outcome::Decided(result);
                }
                pg_sys::TM_Result::TM_Updated | pg_sys::TM_Result::TM_Deleted => {
                    pg_sys::heap_freetuple(tuple);
                    if pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 {
                        ereport!(
                            ERROR,
                            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                            "could not serialize access due to concurrent update"
                        );
                    }
                    // READ COMMITTED: decide again on the newest committed version.
                }
                other => crate::error::internal(format!(
                    "unexpected result {other} updating a rate-limit key"
                )),
            }
        };
        // Locks stay until the end of the transaction, as for an UPDATE.
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        outcome
    }
}
