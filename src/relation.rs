//! Finding pg_keel's own relations and their columns from native code (the session read and
//! the rate-limit update): by schema and name, and columns by name, never by position, so
//! neither a caller's search_path nor a dropped column can point them elsewhere.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pgcompat::IndexUpdate;

/// The OID of relation keel.`name`; an error if it is missing.
pub fn keel_relid(name: &CStr) -> pg_sys::Oid {
    // SAFETY: catalog lookups by NUL-terminated names (a static literal and the caller's
    // CStr), called from a SQL function or a worker's transaction, so with a transaction and
    // the syscaches available; get_namespace_oid raises (through pgrx's guard) when schema keel
    // is missing, and a missing relation is reported as InvalidOid and raised below.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"keel".as_ptr(), false);
        let oid = pg_sys::get_relname_relid(name.as_ptr(), namespace);
        if oid == pg_sys::InvalidOid {
            crate::error::damaged(
                format!("relation keel.{} is missing", name.to_string_lossy()),
                crate::error::REINSTALL,
            );
        }
        oid
    }
}

/// Attribute numbers (1-based) of `columns` in `rel`, by name; an error (55000) naming the
/// first one keel.`table` lacks or has with another type than the native code reads and
/// writes (a column altered by hand would otherwise hand it datums of the wrong type).
///
/// # Safety
/// `rel` is an open relation.
pub unsafe fn attnums<const N: usize>(
    rel: pg_sys::Relation,
    table: &str,
    columns: &[(&str, pg_sys::BuiltinOid); N],
) -> [usize; N] {
    let mut found = [0usize; N];
    let mut wrong_type = None;
    // SAFETY: `rel` is open (the caller's promise), so its relcache entry and descriptor stay
    // valid while the attributes are read; every attname is a NUL-terminated NameData.
    unsafe {
        let desc = (*rel).rd_att;
        let attrs = crate::pgcompat::attributes(desc);
        for (i, attr) in attrs.iter().enumerate() {
            if attr.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(attr.attname.data.as_ptr());
            if let Some(k) = columns
                .iter()
                .position(|(c, _)| name.to_bytes() == c.as_bytes())
            {
                found[k] = i + 1;
                if attr.atttypid != pg_sys::Oid::from(columns[k].1) {
                    wrong_type.get_or_insert(k);
                }
            }
        }
    }
    if let Some(k) = found.iter().position(|&a| a == 0) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("pg_keel: keel.{table} has no column {}", columns[k].0),
            "Reinstall the extension (DROP EXTENSION pg_keel; CREATE EXTENSION pg_keel) or restore the column."
        );
    }
    if let Some(k) = wrong_type {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_keel: column {} of keel.{table} was altered to another type",
                columns[k].0
            ),
            "pg_keel reads and writes its tables natively; give the column back its type from the install script."
        );
    }
    found
}

/// The index entries of new tuples of one table, in every index, made as the executor makes
/// them for an INSERT or a non-HOT UPDATE (unique checks, partial-index predicates): for the
/// native writes (`queue::insert`, `ratelimit::heap`).
pub struct IndexEntries {
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    /// The tuples are new versions of updated rows (see [`IndexEntries::open_for_update`]).
    update: bool,
}

impl IndexEntries {
    /// # Safety
    /// `heap` is open with RowExclusiveLock and stays open until [`IndexEntries::close`].
    pub unsafe fn open(heap: pg_sys::Relation) -> IndexEntries {
        // SAFETY: `heap` is open with RowExclusiveLock (the caller's promise), which is what
        // ExecOpenIndices needs to open its indexes with RowExclusiveLock; `rri` is zeroed
        // memory of the right size for InitResultRelInfo, in the current memory context like
        // the executor state, both freed by `close` or at the context's end.
        unsafe {
            let estate = pg_sys::CreateExecutorState();
            let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
                as *mut pg_sys::ResultRelInfo;
            pg_sys::InitResultRelInfo(rri, heap, 0, std::ptr::null_mut(), 0);
            pg_sys::ExecOpenIndices(rri, false);
            let slot = pg_sys::MakeSingleTupleTableSlot((*heap).rd_att, &pg_sys::TTSOpsHeapTuple);
            IndexEntries {
                estate,
                rri,
                slot,
                update: false,
            }
        }
    }

    /// For the new versions of rows updated in `changed` columns (attribute numbers): each
    /// index whose key columns are all unchanged gets the executor's "unchanged by update"
    /// hint, which lets a btree delete older versions' entries bottom-up before splitting a
    /// page (the primary key of a table whose rows are updated over and over stays small).
    /// The executor computes the hint from the statement's updated columns, which a native
    /// update has none of; it is given here instead.
    ///
    /// # Safety
    /// As [`IndexEntries::open`].
    pub unsafe fn open_for_update(heap: pg_sys::Relation, changed: &[usize]) -> IndexEntries {
        // SAFETY: `open` has the caller's promise; after it `ri_IndexRelationInfo` holds
        // `ri_NumIndices` IndexInfo pointers made by ExecOpenIndices, each with
        // `ii_NumIndexAttrs` entries of `ii_IndexAttrNumbers`, and nothing else refers to them
        // while they are changed here.
        unsafe {
            let mut entries = IndexEntries::open(heap);
            entries.update = true;
            let rri = &*entries.rri;
            for i in 0..rri.ri_NumIndices.max(0) as usize {
                let info = &mut **rri.ri_IndexRelationInfo.add(i);
                let keys = &info.ii_IndexAttrNumbers[..info.ii_NumIndexAttrs.max(0) as usize];
                info.ii_CheckedUnchanged = true;
                info.ii_IndexUnchanged = info.ii_Expressions.is_null()
                    && keys
                        .iter()
                        .all(|a| *a > 0 && !changed.contains(&(*a as usize)));
            }
            entries
        }
    }

    /// The entries `indexes` says the new version of an updated row needs.
    ///
    /// # Safety
    /// `tuple` was just written to the table by an update that reported `indexes`.
    pub unsafe fn insert_updated(&self, tuple: pg_sys::HeapTuple, indexes: IndexUpdate) {
        if indexes == IndexUpdate::None {
            return;
        }
        // SAFETY: the slot is this table's, and the tuple outlives its use here.
        unsafe {
            pg_sys::ExecStoreHeapTuple(tuple, self.slot, false);
            self.insert_slot_for(self.slot, indexes == IndexUpdate::Summarizing);
            pg_sys::ExecClearTuple(self.slot);
        }
    }

    /// # Safety
    /// `slot` holds a tuple just written to the table (`tts_tid` set), not heap-only.
    pub unsafe fn insert_slot(&self, slot: *mut pg_sys::TupleTableSlot) {
        // SAFETY: as the caller promises.
        unsafe { self.insert_slot_for(slot, false) }
    }

    /// # Safety
    /// As [`IndexEntries::insert_slot`]; `only_summarizing` after a HOT update that reported it.
    unsafe fn insert_slot_for(&self, slot: *mut pg_sys::TupleTableSlot, only_summarizing: bool) {
        // SAFETY: the indices were opened in this executor state by `open`.
        unsafe {
            crate::pgcompat::insert_index_tuples(
                self.rri,
                slot,
                self.estate,
                self.update,
                only_summarizing,
            );
            // What the predicates' evaluation allocated for this tuple.
            let per_tuple = (*self.estate).es_per_tuple_exprcontext;
            if !per_tuple.is_null() {
                pg_sys::MemoryContextReset((*per_tuple).ecxt_per_tuple_memory);
            }
        }
    }

    /// # Safety
    /// The table is still open.
    pub unsafe fn close(self) {
        // SAFETY: `self` owns the slot, the opened indices and the executor state made by
        // `open` (consumed here, so freed once); the table is still open, as the caller
        // promises, which ExecCloseIndices needs.
        unsafe {
            pg_sys::ExecDropSingleTupleTableSlot(self.slot);
            pg_sys::ExecCloseIndices(self.rri);
            pg_sys::FreeExecutorState(self.estate);
        }
    }
}
