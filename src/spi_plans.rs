//! Saved SPI plans for the hot-path statements of native functions.
//!
//! Each statement is prepared once per backend as a *generic* plan (CURSOR_OPT_GENERIC_PLAN)
//! and kept with SPI_keepplan. Generic on purpose: with a parameter in LIMIT the planner's
//! cost guess makes the plan cache prefer re-planning on every call, which costs more than
//! the statement itself; the statements here are written so that the generic plan is the
//! right one (index scans by key). Saved plans live in the plan cache, so DDL on the tables,
//! or dropping and re-creating the extension, re-plans them transparently.
//!
//! Call [`execute`] inside `Spi::connect_mut`; read the rows before the connection ends.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

use pgrx::{pg_sys, FromDatum, IntoDatum};

thread_local! {
    static PLANS: RefCell<HashMap<&'static str, pg_sys::SPIPlanPtr>> = RefCell::new(HashMap::new());
}

/// One statement parameter: its type and its value (None is NULL).
pub struct Param(pg_sys::Oid, Option<pg_sys::Datum>);

pub fn param<T: IntoDatum>(value: T) -> Param {
    Param(T::type_oid(), value.into_datum())
}

fn plan_for(sql: &'static str, params: &[Param]) -> pg_sys::SPIPlanPtr {
    if let Some(plan) = PLANS.with_borrow(|plans| plans.get(sql).copied()) {
        return plan;
    }
    let text = CString::new(sql).expect("statement texts are constants without NUL");
    let mut types: Vec<pg_sys::Oid> = params.iter().map(|p| p.0).collect();
    // SAFETY: `text` is a NUL-terminated copy of the statement and `types` holds exactly
    // `types.len()` parameter type OIDs; both outlive the call (SPI copies what it keeps).
    // Called inside an SPI connection (the module's contract); outside one SPI returns NULL
    // with SPI_ERROR_UNCONNECTED, which the check below turns into an error.
    let plan = unsafe {
        pg_sys::SPI_prepare_cursor(
            text.as_ptr(),
            types.len() as i32,
            types.as_mut_ptr(),
            pg_sys::CURSOR_OPT_GENERIC_PLAN as i32,
        )
    };
    if plan.is_null() {
        crate::error::internal(format!(
            "could not prepare an internal statement (SPI code {})",
            // SAFETY: SPI_result is a plain int global of this single-threaded backend, set by
            // the SPI_prepare_cursor call just above; read by value.
            unsafe { pg_sys::SPI_result }
        ));
    }
    // SAFETY: `plan` is the non-null, not yet saved plan SPI_prepare_cursor just returned;
    // SPI_keepplan moves it under CacheMemoryContext, so the pointer cached in PLANS stays
    // valid for the life of the backend (the plan cache re-plans it after DDL).
    unsafe { pg_sys::SPI_keepplan(plan) };
    PLANS.with_borrow_mut(|plans| plans.insert(sql, plan));
    plan
}

/// Runs the saved plan of `sql` with `params`; the rows stay readable until SPI ends.
pub fn execute(sql: &'static str, params: &[Param]) -> Rows {
    run(sql, params, false)
}

/// A read-only `sql` that sees what is committed now, whatever this transaction's snapshot
/// (as foreign-key checks do under REPEATABLE READ): for decisions that must follow a change
/// another session committed after this transaction began (a revoked grant).
pub fn execute_latest(sql: &'static str, params: &[Param]) -> Rows {
    run(sql, params, true)
}

fn run(sql: &'static str, params: &[Param], latest: bool) -> Rows {
    let plan = plan_for(sql, params);
    let mut values: Vec<pg_sys::Datum> = params
        .iter()
        .map(|p| p.1.unwrap_or(pg_sys::Datum::from(0)))
        .collect();
    let mut nulls: Vec<std::os::raw::c_char> = params
        .iter()
        .map(|p| if p.1.is_some() { b' ' } else { b'n' } as std::os::raw::c_char)
        .collect();
    // SAFETY: `plan` is a saved plan for exactly these parameter types; `values` and `nulls`
    // have one entry per parameter and outlive the call; GetLatestSnapshot's snapshot is valid
    // until the next call of it, and SPI pushes it for this statement only.
    let code = unsafe {
        if latest {
            pg_sys::SPI_execute_snapshot(
                plan,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
                pg_sys::GetLatestSnapshot(),
                std::ptr::null_mut(),
                true,
                false,
                0,
            )
        } else {
            pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_mut_ptr(), false, 0)
        }
    };
    if code < 0 {
        crate::error::internal(format!("internal statement failed (SPI code {code})"));
    }
    // SAFETY: SPI_tuptable is the global SPI set for the statement that just ran in this
    // connection (or NULL when it returned no rows); copying the pointer reads nothing behind it.
    let table = unsafe { pg_sys::SPI_tuptable };
    let count = if table.is_null() {
        0
    } else {
        // SAFETY: the global row count SPI set for the same statement: the number of tuples in
        // `table`; read by value.
        (unsafe { pg_sys::SPI_processed }) as usize
    };
    Rows { table, count }
}

/// The rows a statement returned.
pub struct Rows {
    table: *mut pg_sys::SPITupleTable,
    count: usize,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn raw(&self, row: usize, col: i32) -> Option<pg_sys::Datum> {
        assert!(row < self.count, "row {row} of {}", self.count);
        let mut is_null = false;
        // SAFETY: `table` is non-null whenever `count` > 0 (see `run`), and `row < count`
        // (asserted above), so `vals[row]` is one of its SPI_processed tuples; the table lives
        // until the SPI connection that made it ends, which the module's contract says the
        // rows are read before. SPI_getbinval checks `col` against `tupdesc` and reports a
        // column out of range as NULL (SPI_ERROR_NOATTRIBUTE) rather than reading past it.
        let datum = unsafe {
            let tuple = *(*self.table).vals.add(row);
            pg_sys::SPI_getbinval(tuple, (*self.table).tupdesc, col, &mut is_null)
        };
        (!is_null).then_some(datum)
    }

    /// Column `col` (1-based) of row `row`, for by-value types and String (which copies).
    pub fn get<T: FromDatum>(&self, row: usize, col: i32) -> Option<T> {
        self.raw(row, col)
            // SAFETY: a non-null datum of the statement's result, still in SPI memory (see
            // `raw`); the callers ask for the Rust type of the column's SQL type (each
            // statement here is a constant whose result columns they match), and every T they
            // use copies what it reads (by-value types, String, Interval), so nothing borrows
            // SPI memory past the connection.
            .and_then(|d| unsafe { T::from_datum(d, false) })
    }
}
