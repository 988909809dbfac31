//! Lookups in the system catalogs that several capabilities need.

use pgrx::prelude::*;

/// The name of database `oid` (None if there is none); needs a transaction.
pub fn database_name(oid: pg_sys::Oid) -> Option<String> {
    // SAFETY: a catalog lookup inside the caller's transaction; the palloc'd name is copied
    // before this returns.
    unsafe {
        let name = pg_sys::get_database_name(oid);
        (!name.is_null()).then(|| {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        })
    }
}

/// The name of this backend's database; needs a transaction.
pub fn current_database() -> String {
    // SAFETY: this backend's database, set once when it connected.
    database_name(unsafe { pg_sys::MyDatabaseId }).unwrap_or_default()
}
