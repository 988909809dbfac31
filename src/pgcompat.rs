//! The PostgreSQL C functions and fields pg_keel's native paths use whose shape differs
//! between the versions it supports (15, 17 and 18), each wrapped once, with the version that
//! changed it. Everything else calls `pg_sys` directly.
//!
//! PG16 added `update_indexes` to `heap_update`/`simple_heap_update` and `onlySummarizing` to
//! `ExecInsertIndexTuples`; PG17 renamed `PGPROC.pgprocno` to `MyProcNumber` and made
//! `getIdentitySequence` take the relation; PG18 added index-scan instrumentation to
//! `index_beginscan`, `deferrable_ok` to `RelationGetPrimaryKeyIndex`, and moved a tuple
//! descriptor's attributes behind its compact attributes.

use pgrx::pg_sys;

/// Which index entries the new version of an updated row needs (PG16's `TU_UpdateIndexes`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IndexUpdate {
    /// A heap-only (HOT) update: the old entries lead to the new version.
    None,
    /// Every index gets an entry.
    All,
    /// Only summarizing indexes (BRIN) get one (PG16+: a HOT update of a summarized column).
    Summarizing,
}

impl IndexUpdate {
    #[cfg(not(feature = "pg15"))]
    fn from_pg(t: pg_sys::TU_UpdateIndexes::Type) -> IndexUpdate {
        match t {
            pg_sys::TU_UpdateIndexes::TU_None => IndexUpdate::None,
            pg_sys::TU_UpdateIndexes::TU_Summarizing => IndexUpdate::Summarizing,
            _ => IndexUpdate::All,
        }
    }

    /// PG15 says it by marking the new tuple heap-only.
    ///
    /// # Safety
    /// `tuple` was just written by `heap_update` (its header is the stored one).
    #[cfg(feature = "pg15")]
    unsafe fn of_written(tuple: pg_sys::HeapTuple) -> IndexUpdate {
        // SAFETY: the caller's tuple was just passed to heap_update, which points `t_data` at
        // its header and (PG15) marks this copy heap-only too on a HOT update; read by value.
        let infomask2 = unsafe { (*(*tuple).t_data).t_infomask2 };
        if infomask2 as u32 & pg_sys::HEAP_ONLY_TUPLE != 0 {
            IndexUpdate::None
        } else {
            IndexUpdate::All
        }
    }
}

/// `simple_heap_update`: replaces the row at `tid` (locked by this transaction, or raising
/// on a concurrent change) with `tuple`; which index entries the new version needs.
///
/// # Safety
/// `heap` is open with RowExclusiveLock inside a transaction, `tid` points at a visible row
/// version of it and `tuple` was formed with its descriptor.
pub unsafe fn simple_heap_update(
    heap: pg_sys::Relation,
    tid: &mut pg_sys::ItemPointerData,
    tuple: pg_sys::HeapTuple,
) -> IndexUpdate {
    #[cfg(feature = "pg15")]
    // SAFETY: `heap` is open with RowExclusiveLock in a transaction, `tid` is a row version of
    // it and `tuple` has its descriptor (the caller's promises); simple_heap_update raises on
    // a concurrent change instead of returning, and writes `tuple`'s header (t_self, the
    // heap-only bit) that of_written then reads.
    unsafe {
        pg_sys::simple_heap_update(heap, tid, tuple);
        IndexUpdate::of_written(tuple)
    }
    #[cfg(not(feature = "pg15"))]
    // SAFETY: as in the PG15 branch (the caller's promises); PG16+ reports the index work in
    // `update_indexes`, a local the call writes before returning.
    unsafe {
        let mut update_indexes = pg_sys::TU_UpdateIndexes::TU_None;
        pg_sys::simple_heap_update(heap, tid, tuple, &mut update_indexes);
        IndexUpdate::from_pg(update_indexes)
    }
}

/// `heap_update` with the current command id and no crosscheck snapshot: its result, and on
/// TM_Ok which index entries the new version needs.
///
/// # Safety
/// As [`simple_heap_update`].
pub unsafe fn heap_update(
    heap: pg_sys::Relation,
    tid: &mut pg_sys::ItemPointerData,
    tuple: pg_sys::HeapTuple,
    wait: bool,
    failure: &mut pg_sys::TM_FailureData,
    lock_mode: &mut pg_sys::LockTupleMode::Type,
) -> (pg_sys::TM_Result::Type, IndexUpdate) {
    // SAFETY: `heap`, `tid` and `tuple` are as the caller promises (open with RowExclusiveLock
    // in a transaction, a row version of it, formed with its descriptor); `failure`,
    // `lock_mode` and `update_indexes` are exclusive references or locals the call only
    // writes; GetCurrentCommandId(true) marks the command used, as any write does. The
    // tuple's header is read (of_written) only on TM_Ok, when heap_update has written it.
    unsafe {
        let cid = pg_sys::GetCurrentCommandId(true);
        #[cfg(feature = "pg15")]
        {
            let result = pg_sys::heap_update(
                heap,
                tid,
                tuple,
                cid,
                std::ptr::null_mut(),
                wait,
                failure,
                lock_mode,
            );
            let update = if result == pg_sys::TM_Result::TM_Ok {
                IndexUpdate::of_written(tuple)
            } else {
                IndexUpdate::None
            };
            (result, update)
        }
        #[cfg(not(feature = "pg15"))]
        {
            let mut update_indexes = pg_sys::TU_UpdateIndexes::TU_None;
            let result = pg_sys::heap_update(
                heap,
                tid,
                tuple,
                cid,
                std::ptr::null_mut(),
                wait,
                failure,
                lock_mode,
                &mut update_indexes,
            );
            (result, IndexUpdate::from_pg(update_indexes))
        }
    }
}

/// `ExecInsertIndexTuples` without arbiter indexes or speculative insertion.
///
/// # Safety
/// `rri` has its indices open in `estate` and `slot` holds a tuple just written to its table.
pub unsafe fn insert_index_tuples(
    rri: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
    update: bool,
    only_summarizing: bool,
) {
    #[cfg(feature = "pg15")]
    // SAFETY: `rri` has its indices open in `estate` and `slot` holds a tuple just written to
    // its table (the caller's promises); no arbiter list, no speculative-conflict output
    // (both null, as for a plain INSERT). PG15 has no summarizing-only HOT updates, so a caller
    // never asks for them there.
    unsafe {
        debug_assert!(!only_summarizing);
        pg_sys::ExecInsertIndexTuples(
            rri,
            slot,
            estate,
            update,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
    }
    #[cfg(not(feature = "pg15"))]
    // SAFETY: as in the PG15 branch; `only_summarizing` is PG16's flag for the new version of
    // a HOT update that changed a summarized column.
    unsafe {
        pg_sys::ExecInsertIndexTuples(
            rri,
            slot,
            estate,
            update,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            only_summarizing,
        );
    }
}

/// `index_beginscan` for `nkeys` scan keys and no ordering operators (PG18: without
/// instrumentation).
///
/// # Safety
/// `heap` and `index` are open, `index` is an index of `heap`, and `snapshot` stays
/// registered or active until the scan ends.
pub unsafe fn index_beginscan(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    nkeys: usize,
) -> pg_sys::IndexScanDesc {
    let nkeys = nkeys as std::ffi::c_int;
    #[cfg(not(feature = "pg18"))]
    // SAFETY: `heap` and `index` are open, `index` is an index of `heap`, and `snapshot` stays
    // valid until the scan ends (the caller's promises); no ordering operators.
    unsafe {
        pg_sys::index_beginscan(heap, index, snapshot, nkeys, 0)
    }
    #[cfg(feature = "pg18")]
    // SAFETY: as in the other branch (the caller's promises); a null instrumentation pointer
    // turns counting off.
    unsafe {
        pg_sys::index_beginscan(heap, index, snapshot, std::ptr::null_mut(), nkeys, 0)
    }
}

/// The primary key index of `heap`, or InvalidOid (PG18: a deferrable one does not count,
/// as before).
///
/// # Safety
/// `heap` is open.
pub unsafe fn primary_key_index(heap: pg_sys::Relation) -> pg_sys::Oid {
    #[cfg(not(feature = "pg18"))]
    // SAFETY: `heap` is open (the caller's promise), so its relcache entry, whose index list
    // this reads (building it if needed), is valid.
    unsafe {
        pg_sys::RelationGetPrimaryKeyIndex(heap)
    }
    #[cfg(feature = "pg18")]
    // SAFETY: as in the other branch: `heap` is open, so its relcache entry is valid.
    unsafe {
        pg_sys::RelationGetPrimaryKeyIndex(heap, false)
    }
}

/// The identity sequence of column `attnum` of `heap`; raises when it has none.
///
/// # Safety
/// Inside a transaction, with `heap` open.
pub unsafe fn identity_sequence(heap: pg_sys::Relation, attnum: usize) -> pg_sys::Oid {
    let attnum = attnum as pg_sys::AttrNumber;
    #[cfg(feature = "pg15")]
    // SAFETY: `heap` is open in a transaction (the caller's promise), so `rd_id` is readable
    // and pg_depend can be searched; raises (missing_ok false) when there is no sequence.
    unsafe {
        pg_sys::getIdentitySequence((*heap).rd_id, attnum, false)
    }
    #[cfg(not(feature = "pg15"))]
    // SAFETY: `heap` is open in a transaction (the caller's promise), as PG17+ needs the
    // relation itself; raises (missing_ok false) when there is no sequence.
    unsafe {
        pg_sys::getIdentitySequence(heap, attnum, false)
    }
}

/// This backend's index in the array of PGPROCs (`MyProc->pgprocno` before PG17).
pub fn my_proc_number() -> usize {
    #[cfg(feature = "pg15")]
    // SAFETY: MyProc is this backend's PGPROC, set by InitProcess before any SQL runs; every
    // caller is a SQL function or a background worker, which have one (not the postmaster).
    unsafe {
        (*pg_sys::MyProc).pgprocno as usize
    }
    #[cfg(not(feature = "pg15"))]
    // SAFETY: MyProcNumber is a plain int global set at backend start, before any SQL runs;
    // read by value.
    unsafe {
        pg_sys::MyProcNumber as usize
    }
}

/// The attributes of a tuple descriptor, dropped ones included, in attribute-number order.
///
/// # Safety
/// `desc` is a valid descriptor that outlives the returned slice.
pub unsafe fn attributes<'a>(desc: pg_sys::TupleDesc) -> &'a [pg_sys::FormData_pg_attribute] {
    // SAFETY: `desc` is a valid descriptor that outlives the slice (the caller's promise), and
    // a descriptor is allocated with room for its `natts` FormData_pg_attribute entries (before
    // PG18 in `attrs`; PG18 after its `natts` compact attributes), initialized, and aligned as
    // PostgreSQL's own TupleDescAttr() reads them.
    unsafe {
        let natts = (*desc).natts.max(0) as usize;
        #[cfg(not(feature = "pg18"))]
        {
            (*desc).attrs.as_slice(natts)
        }
        #[cfg(feature = "pg18")]
        {
            // PG18 stores the full attributes right after the `natts` compact ones (what its
            // TupleDescAttr() computes).
            let first =
                (*desc).compact_attrs.as_ptr().add(natts) as *const pg_sys::FormData_pg_attribute;
            std::slice::from_raw_parts(first, natts)
        }
    }
}
