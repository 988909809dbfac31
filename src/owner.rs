//! Running SQL as the owner of pg_keel's tables from a function that is not SECURITY DEFINER.
//!
//! The hot functions (`session_validate`, `check`, `rate_limit`) do their per-call work
//! natively, without SQL and so without a privilege or search_path to depend on: making them
//! SECURITY DEFINER would cost a user and GUC switch on every call (more than the work). The
//! SQL they run on their rare paths goes through [`as_owner`], which is what SECURITY DEFINER
//! with `SET search_path = pg_catalog, pg_temp` does, for that statement only.

use std::ffi::CStr;

use pgrx::pg_sys;

/// Runs `f` as `owner` with the pinned search_path. On an error, transaction (or
/// subtransaction) abort restores both, as it does for SECURITY DEFINER.
pub fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    as_user(owner, || {
        with_setting(c"search_path", c"pg_catalog, pg_temp", f)
    })
}

/// Runs `f` as `owner`, for native code that runs no SQL (so no search_path to pin): the
/// privilege checks of what it calls (a sequence's nextval) are the owner's. On an error,
/// (sub)transaction abort restores the user.
pub fn as_user<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: reads and sets this backend's current user, as fmgr does for SECURITY DEFINER;
    // the previous user is set back below, or by the (sub)transaction's abort on an error.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let result = f();
    // SAFETY: as above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    result
}

/// Runs `f` with the setting `name` = `value` for its duration only (a GUC nest level, as a
/// function's SET clause): restored after, or by the (sub)transaction's abort on an error.
pub fn with_setting<R>(name: &CStr, value: &CStr, f: impl FnOnce() -> R) -> R {
    with_settings(&[(name, value)], f)
}

/// `with_setting` for several settings at once (one nest level).
pub fn with_settings<R>(settings: &[(&CStr, &CStr)], f: impl FnOnce() -> R) -> R {
    // SAFETY: a nest level opened and closed around `f`; set_config_option with
    // GUC_ACTION_SAVE records the old value at that level; the strings are NUL-terminated.
    unsafe {
        let nest = pg_sys::NewGUCNestLevel();
        for (name, value) in settings {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        let result = f();
        pg_sys::AtEOXact_GUC(true, nest);
        result
    }
}

/// The settings pg_keel's per-job statements are planned (and replanned) under: by primary
/// key and index, never by scanning keel.jobs or hashing it. A saved plan is generic and made
/// once; made while the table looked empty (after a VACUUM of an empty queue, a consumer's
/// first call), the planner's choice would be a sequential scan, kept on every call after the
/// table has grown (an ack_batch that scanned 80,000 rows per call made a steady state 7x
/// slower than the plain way). Bitmap scans are off too: when claims were a statement, a claim
/// planned while the statistics put the claim range past the end of the histogram (a backlog
/// formed since the last ANALYZE) estimated one row and chose a bitmap scan and a sort of the
/// whole range, which read every ready job of the backlog for each claim of 64: under an
/// overload the rate fell from 48,000 to 200 jobs/s until autovacuum analyzed the table again
/// (the claim scans its index natively now, see `queue::take`; the floors' looks are still
/// statements). JIT is off as well: a scan these settings leave no choice but to take (a
/// small table without a usable index) is costed at 10^10, past `jit_above_cost`, and compiling
/// it took 60-75 ms per backend — an ack's first look at which queues keep finished jobs made
/// drains of 10,000 jobs by 16 consumers 3x slower.
pub const BY_INDEX: [(&CStr, &CStr); 5] = [
    (c"enable_seqscan", c"off"),
    (c"enable_bitmapscan", c"off"),
    (c"enable_hashjoin", c"off"),
    (c"enable_mergejoin", c"off"),
    (c"jit", c"off"),
];

/// The owner of the relation keel.`name`, from the catalog cache (no lock taken).
pub fn of(name: &CStr) -> pg_sys::Oid {
    // SAFETY: called inside a transaction (a SQL function or a worker's transaction), where
    // the syscache is usable. The pg_class tuple is checked non-null before GETSTRUCT, read
    // (relowner, by value) while the cache entry is pinned, and released exactly once; a
    // relation dropped since keel_relid found it makes the lookup NULL, which raises.
    unsafe {
        let oid = crate::relation::keel_relid(name);
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(oid),
        );
        if tuple.is_null() {
            crate::error::damaged(
                format!("relation keel.{} is missing", name.to_string_lossy()),
                crate::error::REINSTALL,
            );
        }
        let form = pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_class;
        let owner = (*form).relowner;
        pg_sys::ReleaseSysCache(tuple);
        owner
    }
}
