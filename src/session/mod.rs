//! Sessions (DESIGN.md §4): Postgres holds the authoritative record; a request costs one
//! indexed read.
//!
//! The functions that change sessions are PL/pgSQL (`sql/session.sql`); this module holds
//! what must not be SQL: the token (`token`, pure), and `keel.session_validate`, the one call
//! made on every request. It reads the session natively by the hash of its token (`read`),
//! and writes only when a touch is due (`keel.session_touch_interval`), on a primary, in a
//! transaction that may write. The touch takes the row with SKIP LOCKED: a validation never
//! waits for another one, for a revocation in progress, or for the cleanup.
//!
//! validate is not SECURITY DEFINER: the switch of user and search_path that costs on every
//! call (a GUC nest level, the search path parsed and recomputed twice) is only needed for
//! the touch, so only the touch does it, as the table's owner with `search_path =
//! pg_catalog, pg_temp` (`as_owner`). The read runs no SQL at all.

mod read;
pub mod token;

use pgrx::prelude::*;
use pgrx::{IntoDatum, PgSqlErrorCode};

use crate::commit::async_write;
use crate::error::{raise, KeelError};
use crate::spi_plans::{execute, param};
use crate::srf::Native;
use crate::v1_function;

/// A bad argument of a session function (22023).
enum SessionError {
    NullToken,
    Malformed(token::Malformed),
}

impl KeelError for SessionError {
    fn code(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
    }

    fn message(&self) -> String {
        match self {
            SessionError::NullToken => "invalid value for token: must not be NULL".into(),
            SessionError::Malformed(why) => format!("malformed session token: {why}"),
        }
    }

    fn hint(&self) -> Option<String> {
        Some(
            "Pass the token keel.session_create or keel.session_rotate returned, unchanged \
             (43 characters of base64url)."
                .into(),
        )
    }
}

/// The stored hash for a token text; raises 22023 for NULL or a malformed token.
fn hash_of(text: Option<&str>) -> [u8; 32] {
    token::hash(&bytes_of(text))
}

/// A new token from PostgreSQL's strong random source (OpenSSL's on Debian builds).
#[pg_extern(volatile, parallel_safe, name = "_session_token")]
fn new_token() -> String {
    let mut bytes = [0u8; token::TOKEN_BYTES];
    // SAFETY: writes at most `bytes.len()` bytes into `bytes`, a live local buffer of that size.
    let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    if !ok {
        crate::error::internal("could not generate random bytes for a session token");
    }
    token::encode(&bytes)
}

/// Whether keel.session_events emits revocations, for SQL (calling it also loads the library
/// that defines the setting).
#[pg_extern(stable, parallel_safe, name = "_session_events")]
fn session_events() -> bool {
    crate::guc::SESSION_EVENTS.get().revocations()
}

/// Whether keel.session_events is `lifecycle`: creations, logins and expiries are emitted too.
#[pg_extern(stable, parallel_safe, name = "_session_lifecycle")]
fn session_lifecycle() -> bool {
    crate::guc::SESSION_EVENTS.get().lifecycle()
}

/// SHA-256 of a token, as stored; 22023 for NULL or malformed. Internal: nothing grants it.
#[pg_extern(immutable, parallel_safe, name = "_session_hash")]
fn session_hash(token: Option<&str>) -> Vec<u8> {
    hash_of(token).to_vec()
}

/// The new token of a rotation with a grace, sealed under the old one (stored as
/// keel.sessions.rotated_to until the grace ends), so that a second rotation of the old token
/// inside the grace returns the same new token. 22023 for a malformed token. Internal.
#[pg_extern(immutable, parallel_safe, name = "_session_seal")]
fn session_seal(old: Option<&str>, new: Option<&str>) -> Vec<u8> {
    token::seal(&bytes_of(old), &bytes_of(new)).to_vec()
}

/// The new token `_session_seal` sealed under `old`; NULL when `sealed` is not one. Internal.
#[pg_extern(immutable, parallel_safe, name = "_session_unseal")]
fn session_unseal(old: Option<&str>, sealed: &[u8]) -> Option<String> {
    let sealed: &[u8; token::TOKEN_BYTES] = sealed.try_into().ok()?;
    Some(token::encode(&token::open(&bytes_of(old), sealed)))
}

fn bytes_of(text: Option<&str>) -> [u8; token::TOKEN_BYTES] {
    let text = text.unwrap_or_else(|| raise(&SessionError::NullToken));
    token::decode(text).unwrap_or_else(|why| raise(&SessionError::Malformed(why)))
}

/// SHA-256 of a token as stored, or NULL when it is not one (a one-time token from a link is
/// whatever the visitor sent: no such token, not an error). Internal: nothing grants it.
#[pg_extern(immutable, parallel_safe, name = "_token_hash")]
fn token_hash(token: &str) -> Option<Vec<u8>> {
    token::decode(token)
        .ok()
        .map(|bytes| token::hash(&bytes).to_vec())
}

/// Slides the idle expiry (never past the absolute one). SKIP LOCKED: if anyone holds the
/// row, this validation does not wait and does not touch; the next one will.
const TOUCH: &str = "UPDATE keel.sessions s
        SET last_seen_at = now(),
            idle_expires_at = CASE WHEN s.idle_timeout IS NULL THEN NULL
                                   ELSE least(s.expires_at, now() + s.idle_timeout) END
      WHERE s.session_id = (SELECT l.session_id FROM keel.sessions l
                             WHERE l.session_id = $1 AND l.revoked_at IS NULL
                               FOR UPDATE SKIP LOCKED)
     RETURNING s.idle_expires_at";

/// May this transaction write? Not on a standby, not in a read-only transaction.
fn can_write() -> bool {
    // SAFETY: RecoveryInProgress only reads shared state (under its spinlock when needed), and
    // XactReadOnly is a plain bool global of this single-threaded backend, read by value.
    unsafe { !pg_sys::RecoveryInProgress() && !pg_sys::XactReadOnly }
}

/// `keel.session_validate` as sql/session.sql declares it.
pub const VALIDATE: Native = Native {
    symbol: "keel_session_validate",
    function: "keel.session_validate",
    args: &[("token", "text")],
    columns: &[
        ("session_id", "uuid"),
        ("user_id", "text"),
        ("data", "jsonb"),
        ("created_at", "timestamp with time zone"),
        ("expires_at", "timestamp with time zone"),
        ("idle_expires_at", "timestamp with time zone"),
    ],
};

v1_function!(pg_finfo_keel_session_validate);

/// `keel.session_validate(token text) RETURNS TABLE(session_id, user_id, data, created_at,
/// expires_at, idle_expires_at)`, declared in sql/session.sql: the session of a token, or no
/// row when it is unknown, expired, idle-expired or revoked. A malformed token is no session
/// either (no row); NULL is a caller's bug (22023). Its row is returned by `srf::one_row`.
///
/// # Safety
/// Called only by PostgreSQL's function manager through the declaration in sql/session.sql
/// (`keel.session_validate(token text) RETURNS TABLE (uuid, text, jsonb, timestamptz,
/// timestamptz, timestamptz)`), with that call's valid `fcinfo`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn keel_session_validate(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    const TOKEN: usize = VALIDATE.index("token");
    // SAFETY: `fcinfo` is the call's (the caller's promise) and argument TOKEN is declared
    // text (VALIDATE, checked against the declaration by a test), so pg_getarg reads it as
    // &str (None when NULL). The row's values are, in order, the
    // declared result columns' types: uuid, text, jsonb, timestamptz x3, each a datum made
    // here or copied into this call's memory (the row's jsonb), alive until srf::one_row has
    // copied them into the tuplestore; a NULL user_id (an anonymous session) and a NULL
    // idle_expires_at are flagged in `nulls`.
    unsafe {
        let token = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, TOKEN);
        let Some(row) = validate(token) else {
            return crate::srf::no_row(fcinfo);
        };
        let datum = |d: Option<pg_sys::Datum>| d.unwrap_or(pg_sys::Datum::from(0));
        let anonymous = row.user_id.is_none();
        let mut values = [
            datum(row.session_id.into_datum()),
            datum(row.user_id.into_datum()),
            datum(row.data.into_datum()),
            datum(row.created_at.into_datum()),
            datum(row.expires_at.into_datum()),
            datum(row.idle_expires_at.into_datum()),
        ];
        let mut nulls = [
            false,
            anonymous,
            false,
            false,
            false,
            row.idle_expires_at.is_none(),
        ];
        crate::srf::one_row(fcinfo, &mut values, &mut nulls)
    }
}

/// The valid session of a token (touched when due), or None.
fn validate(token: Option<&str>) -> Option<read::Row> {
    let text = token.unwrap_or_else(|| raise(&SessionError::NullToken));
    let bytes = token::decode(text).ok()?;
    let hash = token::hash(&bytes);
    // The transaction's time, as now() in SQL.
    // SAFETY: reads this backend's transaction start time, a global set when the transaction
    // (inside which every SQL function runs) started.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let mut row = match read::by_token_hash(&hash) {
        Some(row) => row,
        // Not a current token: maybe one rotated away whose grace has not ended.
        None => read::by_previous_hash(&hash, now)?,
    };
    if !row.valid_at(now) {
        return None;
    }
    let touch_every = i64::from(crate::guc::SESSION_TOUCH_INTERVAL.get()) * 1_000_000;
    if now - row.last_seen_at >= touch_every && can_write() {
        // A touch a crash forgets costs nothing but an older last_seen_at: it skips the WAL
        // flush when the caller's transaction wrote nothing else.
        let touched = crate::owner::as_owner(row.owner, || {
            Spi::connect_mut(|_| {
                let rows = async_write(|| execute(TOUCH, &[param(row.session_id)]));
                if rows.is_empty() {
                    None
                } else {
                    Some(rows.get::<TimestampWithTimeZone>(0, 1))
                }
            })
        });
        if let Some(idle) = touched {
            row.idle_expires_at = idle;
        }
    }
    Some(row)
}
