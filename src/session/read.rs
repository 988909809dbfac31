//! The per-request read of `keel.session_validate`, without SQL: one probe of the token-hash
//! index (and, for a token that is not current, one of the rotated-away index: a rotation's
//! grace) under the statement's snapshot, like the executor's index scan but without planning
//! and starting a statement per call (which cost more than the lookup itself). Locks are the
//! ones a SELECT takes (AccessShareLock on table and index, kept to the end of the
//! transaction). Reading a relation from C checks no table privilege: the gate is EXECUTE on
//! keel.session_validate, which nothing grants to PUBLIC.

use pgrx::pg_sys;
use pgrx::pg_sys::BuiltinOid;
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum, Uuid};

use crate::jsonb::RawJsonb;
use crate::pgcompat;
use crate::relation::{attnums, keel_relid};

/// A session row as validate needs it.
pub struct Row {
    pub session_id: Uuid,
    /// None: an anonymous session (no user bound yet).
    pub user_id: Option<String>,
    pub data: RawJsonb,
    pub created_at: TimestampWithTimeZone,
    pub expires_at: TimestampWithTimeZone,
    pub idle_expires_at: Option<TimestampWithTimeZone>,
    pub last_seen_at: i64,
    pub revoked: bool,
    /// Owner of keel.sessions: whom the touch runs as.
    pub owner: pg_sys::Oid,
    expires_us: i64,
    idle_expires_us: Option<i64>,
}

impl Row {
    /// Valid at `now` (µs): not revoked, before its expiry and idle expiry.
    pub fn valid_at(&self, now: i64) -> bool {
        !self.revoked && self.expires_us > now && self.idle_expires_us.is_none_or(|idle| idle > now)
    }
}

const COLUMNS: [(&str, BuiltinOid); 8] = [
    ("session_id", BuiltinOid::UUIDOID),
    ("user_id", BuiltinOid::TEXTOID),
    ("data", BuiltinOid::JSONBOID),
    ("created_at", BuiltinOid::TIMESTAMPTZOID),
    ("expires_at", BuiltinOid::TIMESTAMPTZOID),
    ("idle_expires_at", BuiltinOid::TIMESTAMPTZOID),
    ("last_seen_at", BuiltinOid::TIMESTAMPTZOID),
    ("revoked_at", BuiltinOid::TIMESTAMPTZOID),
];

/// The session whose token hash is `hash`, as the current snapshot sees it, valid or not.
pub fn by_token_hash(hash: &[u8; 32]) -> Option<Row> {
    lookup(keel_relid(c"sessions_token_hash_idx"), hash, false).map(|(row, _)| row)
}

/// The session that a rotation with a grace took the token of hash `hash` from, while that
/// grace has not ended at `now` (µs); valid or not otherwise. None too on a catalog from
/// before 0.2.0 (the extension's update not run yet), which has no grace.
pub fn by_previous_hash(hash: &[u8; 32], now: i64) -> Option<Row> {
    // SAFETY: catalog lookups by NUL-terminated names inside a transaction, as in keel_relid.
    let index = unsafe {
        let namespace = pg_sys::get_namespace_oid(c"keel".as_ptr(), false);
        pg_sys::get_relname_relid(c"sessions_previous_hash_idx".as_ptr(), namespace)
    };
    if index == pg_sys::InvalidOid {
        return None;
    }
    let (row, until) = lookup(index, hash, true)?;
    until.is_some_and(|until| until > now).then_some(row)
}

/// Probes `index_oid` (an index of keel.sessions on one bytea column) for `hash`; with
/// `grace`, also returns the row's previous_until (µs).
fn lookup(index_oid: pg_sys::Oid, hash: &[u8; 32], grace: bool) -> Option<(Row, Option<i64>)> {
    // SAFETY: called from keel.session_validate, inside a transaction. keel.sessions and the
    // index are opened with AccessShareLock and stay open until closed at the end. The scan
    // key is bytea equality on the index's first column (token_hash or previous_hash, bytea),
    // with a datum that lives through the scan; the snapshot is the active one or the
    // transaction's, valid while the scan runs. Columns are read from the slot while it pins
    // the page, and copied out (Uuid, String, RawJsonb::copy_into into the caller's context;
    // timestamps by value) before the slot is dropped. The datums are read as the installed
    // column types (uuid, text, jsonb, timestamptz), which `attnums` checks.
    unsafe {
        let table_oid = keel_relid(c"sessions");
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let heap = pg_sys::table_open(table_oid, lock);
        let index = pg_sys::index_open(index_oid, lock);
        let cols = attnums(heap, "sessions", &COLUMNS).map(|a| a as i32);
        let until_col = grace.then(|| {
            attnums(
                heap,
                "sessions",
                &[("previous_until", BuiltinOid::TIMESTAMPTZOID)],
            )[0] as i32
        });

        let key_datum = (&hash[..]).into_datum().unwrap_or(pg_sys::Datum::from(0));
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            1,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_BYTEAEQ),
            key_datum,
        );
        // The statement's snapshot, as a SELECT in the function would see (outside any
        // statement, e.g. a bare CALL, the transaction's).
        let snapshot = if pg_sys::ActiveSnapshotSet() {
            pg_sys::GetActiveSnapshot()
        } else {
            pg_sys::GetTransactionSnapshot()
        };
        let scan = pgcompat::index_beginscan(heap, index, snapshot, 1);
        pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
        let found =
            pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot);
        let row = if found {
            let get = |col: i32| {
                let mut is_null = false;
                let d = pg_sys::slot_getattr(slot, col, &mut is_null);
                (!is_null).then_some(d)
            };
            let context = pg_sys::CurrentMemoryContext;
            let ts = |k: usize| get(cols[k]).map(|d| d.value() as i64);
            let tstz =
                |k: usize| get(cols[k]).and_then(|d| TimestampWithTimeZone::from_datum(d, false));
            (|| {
                let row = Row {
                    session_id: Uuid::from_datum(get(cols[0])?, false)?,
                    user_id: get(cols[1]).and_then(|d| String::from_datum(d, false)),
                    data: RawJsonb::copy_into(get(cols[2])?, context),
                    created_at: tstz(3)?,
                    expires_at: tstz(4)?,
                    idle_expires_at: tstz(5),
                    last_seen_at: ts(6)?,
                    revoked: get(cols[7]).is_some(),
                    owner: (*(*heap).rd_rel).relowner,
                    expires_us: ts(4)?,
                    idle_expires_us: ts(5),
                };
                let until = until_col.and_then(&get).map(|d| d.value() as i64);
                Some((row, until))
            })()
        } else {
            None
        };
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        // Locks stay until the end of the transaction, as for a SELECT.
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        row
    }
}
