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

/// A recorded time that is 0 until it happens (shared memory's "never"), as a `timestamptz`:
/// NULL for 0 (and for the out-of-range values).
pub fn recorded(micros: i64) -> Option<TimestampWithTimeZone> {
    (micros != 0).then(|| timestamptz(micros)).flatten()
}

/// A setting in seconds as an interval for SQL (`keel.outbox_retention`, ...), or its
/// `default` (seconds) if it could not be one.
pub fn interval_of_secs(secs: i32, default: i32) -> pgrx::datum::Interval {
    let of = |secs: i32| pgrx::datum::Interval::new(0, 0, i64::from(secs) * 1_000_000);
    of(secs).unwrap_or_else(|_| of(default).expect("a setting's default is an interval"))
}

const DAY: i64 = 86_400_000_000;

/// The longest interval any pg_keel argument or setting takes: `interval '100 years'`, which
/// Postgres compares as 36,000 days (a month counting 30 days).
/// Timestamps pg_keel computes from one (now + period, a retry time, a token bucket's refill)
/// stay far inside timestamptz's range, so they can be stored, dumped and restored.
pub const MAX_INTERVAL_MICROS: i64 = 36_000 * DAY;

/// An interval as microseconds, a month counting 30 days (as `justify_days` does); saturates
/// instead of overflowing, so any interval maps to a comparable number.
pub fn interval_micros(i: &pgrx::datum::Interval) -> i64 {
    (i64::from(i.months()) * 30 + i64::from(i.days()))
        .saturating_mul(DAY)
        .saturating_add(i.micros())
}

/// Raises 22023 when `value` is longer than `MAX_INTERVAL_MICROS` (or shorter than minus it);
/// for every interval argument, from Rust and from the SQL functions (`keel._check_interval`).
pub fn check_interval(argument: &str, value: &pgrx::datum::Interval) -> i64 {
    let micros = interval_micros(value);
    // Each field on its own too: '200000 years -72000000 days' nets to zero as a comparison
    // counts it, but months and days are added to a timestamp by the calendar.
    let fields_in_range = i64::from(value.months()).abs() <= 1200
        && i64::from(value.days()).abs() <= 36_000
        && value.micros().unsigned_abs() <= MAX_INTERVAL_MICROS.unsigned_abs();
    if !fields_in_range || micros.unsigned_abs() > MAX_INTERVAL_MICROS.unsigned_abs() {
        crate::error::interval_too_long(argument)
    }
    micros
}

#[pg_extern(immutable, parallel_safe, name = "_check_interval")]
fn check_interval_sql(argument: &str, value: Option<pgrx::datum::Interval>) {
    if let Some(value) = value {
        check_interval(argument, &value);
    }
}
