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
