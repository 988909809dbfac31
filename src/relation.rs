//! Finding pg_keel's own relations and their columns from native code (the session read and
//! the rate-limit update): by schema and name, and columns by name, never by position, so
//! neither a caller's search_path nor a dropped column can point them elsewhere.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The OID of relation keel.`name`; an error if it is missing.
pub fn keel_relid(name: &CStr) -> pg_sys::Oid {
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"keel".as_ptr(), false);
        let oid = pg_sys::get_relname_relid(name.as_ptr(), namespace);
        if oid == pg_sys::InvalidOid {
            error!(
                "pg_keel: relation keel.{} is missing; reinstall the extension",
                name.to_string_lossy()
            );
        }
        oid
    }
}

/// Attribute numbers (1-based) of `columns` in `rel`, by name; an error naming the first one
/// keel.`table` lacks.
///
/// # Safety
/// `rel` is an open relation.
pub unsafe fn attnums<const N: usize>(
    rel: pg_sys::Relation,
    table: &str,
    columns: &[&str; N],
) -> [usize; N] {
    let mut found = [0usize; N];
    unsafe {
        let desc = (*rel).rd_att;
        let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
        for (i, attr) in attrs.iter().enumerate() {
            if attr.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(attr.attname.data.as_ptr());
            if let Some(k) = columns.iter().position(|c| name.to_bytes() == c.as_bytes()) {
                found[k] = i + 1;
            }
        }
    }
    if let Some(k) = found.iter().position(|&a| a == 0) {
        error!("pg_keel: keel.{table} has no column {}", columns[k]);
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

    /// # Safety
    /// `tuple` was just written to the table (its `t_self` set) and is not heap-only.
    pub unsafe fn insert(&self, tuple: pg_sys::HeapTuple) {
        unsafe {
            pg_sys::ExecStoreHeapTuple(tuple, self.slot, false);
            self.insert_slot(self.slot);
            pg_sys::ExecClearTuple(self.slot);
        }
    }

    /// # Safety
    /// `slot` holds a tuple just written to the table (`tts_tid` set), not heap-only.
    pub unsafe fn insert_slot(&self, slot: *mut pg_sys::TupleTableSlot) {
        unsafe {
            pg_sys::ExecInsertIndexTuples(
                self.rri,
                slot,
                self.estate,
                self.update,
                false,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
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
        unsafe {
            pg_sys::ExecDropSingleTupleTableSlot(self.slot);
            pg_sys::ExecCloseIndices(self.rri);
            pg_sys::FreeExecutorState(self.estate);
        }
    }
}
