//! Returning the one row of a `RETURNS TABLE` function without pgrx's per-call set-returning
//! machinery, for the hottest functions (`keel.check`, `keel.rate_limit`,
//! `keel.session_validate`).
//!
//! pgrx's value-per-call protocol builds the result's tuple descriptor from the catalog on
//! every call and is called twice per row; measured, that was a sixth of a memory-mode
//! decision. Here the function is called once and hands back a one-row tuplestore
//! (materialize mode) built with the descriptor the executor already made for the call
//! (`expectedDesc`). The SQL declaration of such a function is written by hand next to its
//! siblings (`LANGUAGE c AS 'MODULE_PATHNAME', '<symbol>'`), and `v1_function!` emits the
//! symbol PostgreSQL looks up to learn the calling convention.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The SQL signature of a function declared by hand as `LANGUAGE c` in sql/*.sql: the one
/// place that says which argument sits at which position and which columns the row has. The
/// Rust side reads each argument at `index(name)`, computed when it compiles; a `#[pg_test]`
/// in lib.rs checks every entry of its `NATIVE` list against `pg_proc`, so a reordered
/// declaration fails a test instead of reading an integer as text.
// The names and columns are read by that test only; they are the declaration, kept here.
#[cfg_attr(not(any(test, feature = "pg_test")), allow(dead_code))]
pub struct Native {
    /// The C symbol (`AS 'MODULE_PATHNAME', '<symbol>'`).
    pub symbol: &'static str,
    /// The function's qualified name.
    pub function: &'static str,
    /// Arguments in order: (name, type as `format_type` writes it).
    pub args: &'static [(&'static str, &'static str)],
    /// Result columns in order, the same way.
    pub columns: &'static [(&'static str, &'static str)],
}

impl Native {
    /// The position of argument `name` (a compile error when used in a const and missing).
    pub const fn index(&self, name: &str) -> usize {
        let mut i = 0;
        while i < self.args.len() {
            if same(self.args[i].0, name) {
                return i;
            }
            i += 1;
        }
        panic!("no such argument")
    }
}

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Declares `$name` as a version-1 C function (`pg_finfo_$name`).
#[macro_export]
macro_rules! v1_function {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static pgrx::pg_sys::Pg_finfo_record {
            const V1: pgrx::pg_sys::Pg_finfo_record =
                pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}

/// Hands `values` back as the only row of the set-returning call `fcinfo`.
///
/// # Safety
/// `fcinfo` is the call's, and `values` match its declared result columns in number and type.
pub unsafe fn one_row(
    fcinfo: pg_sys::FunctionCallInfo,
    values: &mut [pg_sys::Datum],
    nulls: &mut [bool],
) -> pg_sys::Datum {
    // SAFETY: the caller's promises are materialize's: the call's own fcinfo, and a row whose
    // values match the declared result columns.
    unsafe { materialize(fcinfo, Some((values, nulls))) }
}

/// Hands back no row from the set-returning call `fcinfo` (an empty tuplestore: in the
/// select list a materialize-mode function must always hand one back).
///
/// # Safety
/// `fcinfo` is the call's.
pub unsafe fn no_row(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the call's own fcinfo (the caller's promise); no row, so no values to match.
    unsafe { materialize(fcinfo, None) }
}

/// Hands back a tuplestore holding `row` (or nothing) as the result of the set-returning call
/// `fcinfo`, in materialize mode.
///
/// # Safety
/// `fcinfo` is the FunctionCallInfo PostgreSQL passed to the running version-1 function (its
/// `resultinfo`, when set, a ReturnSetInfo of this call), and `row`'s values are datums of the
/// types of the function's declared result columns, in order, valid until this returns.
unsafe fn materialize(
    fcinfo: pg_sys::FunctionCallInfo,
    row: Option<(&mut [pg_sys::Datum], &mut [bool])>,
) -> pg_sys::Datum {
    // SAFETY: `fcinfo` is the call's (the caller's promise). `resultinfo` is dereferenced only
    // once checked non-null and tagged T_ReturnSetInfo, and a ReturnSetInfo the executor
    // passes always has an `econtext`. The tuplestore and a catalog descriptor are made in the
    // per-query memory, which outlives the rows' reading; the executor's `expectedDesc` is
    // not handed back as `setDesc`, which the executor would free. `values` and `nulls` are
    // checked to have the descriptor's `natts` entries before tuplestore_putvalues reads them;
    // their types are the caller's promise.
    unsafe {
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        let materialize = pg_sys::SetFunctionReturnMode::SFRM_Materialize as i32;
        if rsinfo.is_null()
            || (*rsinfo).type_ != pg_sys::NodeTag::T_ReturnSetInfo
            || (*rsinfo).allowedModes & materialize == 0
        {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "set-valued function called in context that cannot accept a set"
            );
        }
        let old = pg_sys::MemoryContextSwitchTo((*(*rsinfo).econtext).ecxt_per_query_memory);
        // The executor's descriptor for this call when it has one (it must then not be
        // handed back as setDesc, which the executor frees); otherwise one from the catalog.
        let (desc, own) = if !(*rsinfo).expectedDesc.is_null() {
            ((*rsinfo).expectedDesc, false)
        } else {
            let mut desc: pg_sys::TupleDesc = std::ptr::null_mut();
            let class = pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut desc);
            if class != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE || desc.is_null() {
                crate::error::internal("the result type of this function is not a row");
            }
            (desc, true)
        };
        let store = pg_sys::tuplestore_begin_heap(true, false, pg_sys::work_mem);
        if let Some((values, nulls)) = row {
            if (*desc).natts as usize != values.len() || values.len() != nulls.len() {
                crate::error::damaged(
                    "the function's declared result columns do not match its result",
                    crate::error::UPDATE,
                );
            }
            pg_sys::tuplestore_putvalues(store, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        }
        pg_sys::MemoryContextSwitchTo(old);
        (*rsinfo).returnMode = pg_sys::SetFunctionReturnMode::SFRM_Materialize;
        (*rsinfo).setResult = store;
        (*rsinfo).setDesc = if own { desc } else { std::ptr::null_mut() };
        (*fcinfo).isnull = true;
        pg_sys::Datum::from(0)
    }
}
