//! PostgreSQL's clock, once: timestamps are microseconds since 2000-01-01 (a `timestamptz`'s
//! value), read from the server so that every process and every client shares one clock.

use pgrx::prelude::*;

/// Now, as a PostgreSQL timestamp (microseconds since 2000-01-01).
pub fn now_micros() -> i64 {
    // SAFETY: GetCurrentTimestamp reads the system clock; it touches no shared state and
    // cannot raise.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// A PostgreSQL timestamp as a `timestamptz` (None for the out-of-range values).
pub fn timestamptz(micros: i64) -> Option<TimestampWithTimeZone> {
    // SAFETY: a timestamptz datum is the int64 itself, passed by value.
    unsafe { TimestampWithTimeZone::from_datum(pg_sys::Datum::from(micros), false) }
}
