//! The one way pg_keel raises an error: a SQLSTATE, a message, and a detail and hint a user
//! can act on. Each capability has its own error enum that knows its codes and texts and
//! raises through [`raise`].

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// What every capability's error enum provides.
pub trait KeelError {
    fn code(&self) -> PgSqlErrorCode;
    fn message(&self) -> String;
    fn detail(&self) -> Option<String> {
        None
    }
    fn hint(&self) -> Option<String> {
        None
    }
}

/// The most an error's message, detail or hint carries, in bytes: what a user passed is
/// repeated in them, and a 10 MB argument must not become 10 MB of server log per call.
pub const MAX_REPORT_BYTES: usize = 2000;

/// The most of a user's string an error repeats, in characters.
const SHOWN_CHARS: usize = 64;

/// A user's string as errors repeat it: quoted and escaped (`"a\"b\n"`, so nothing in it reads
/// as part of the message or the log line), and cut after 64 characters with its size said.
pub fn shown(s: &str) -> String {
    let chars = s.chars().count();
    if chars <= SHOWN_CHARS {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(SHOWN_CHARS).collect();
    format!("{head:?}... ({} bytes)", s.len())
}

/// A user's string as a SQL literal inside a hint (`'it''s'`), or `'...'` when it is too
/// long or has control characters to repeat usefully.
pub fn sql_literal(s: &str) -> String {
    if s.chars().count() > SHOWN_CHARS || s.chars().any(char::is_control) {
        return "'...'".into();
    }
    format!("'{}'", s.replace('\'', "''"))
}

/// `text` cut to `MAX_REPORT_BYTES` at a character boundary.
fn capped(mut text: String) -> String {
    if text.len() > MAX_REPORT_BYTES {
        let mut end = MAX_REPORT_BYTES - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// Raises `err` as an ERROR; never returns (Postgres longjmps out, pgrx unwinds Rust frames).
pub fn raise(err: &dyn KeelError) -> ! {
    let mut report = ErrorReport::new(err.code(), capped(err.message()), "pg_keel");
    if let Some(detail) = err.detail() {
        report = report.set_detail(capped(detail));
    }
    if let Some(hint) = err.hint() {
        report = report.set_hint(capped(hint));
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// An error of pg_keel's own making, not the caller's: an internal statement or a random
/// source failed, or something pg_keel keeps could not be written. XX000 (internal_error).
struct Internal(String);

impl KeelError for Internal {
    fn code(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR
    }
    fn message(&self) -> String {
        format!("pg_keel: {}", self.0)
    }
}

/// Raises an internal error (XX000): `what` went wrong inside pg_keel.
pub fn internal(what: impl Into<String>) -> ! {
    raise(&Internal(what.into()))
}

/// pg_keel's own objects are not as its install script made them (dropped, altered, or the
/// library is newer than the database's pg_keel).
struct Damaged {
    what: String,
    hint: &'static str,
}

impl KeelError for Damaged {
    fn code(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
    }
    fn message(&self) -> String {
        format!("pg_keel: {}", self.what)
    }
    fn hint(&self) -> Option<String> {
        Some(self.hint.into())
    }
}

/// What to do when an object of pg_keel is missing or changed.
pub const REINSTALL: &str = "Reinstall the extension (DROP EXTENSION pg_keel; CREATE EXTENSION \
     pg_keel), or restore its objects as the install script made them.";

/// What to do when the library is newer than the database's pg_keel.
pub const UPDATE: &str = "Run ALTER EXTENSION pg_keel UPDATE.";

/// Raises 55000 (object_not_in_prerequisite_state): pg_keel's `what` is not as it made it;
/// `hint` says what to do (`REINSTALL`, `UPDATE`).
pub fn damaged(what: impl Into<String>, hint: &'static str) -> ! {
    raise(&Damaged {
        what: what.into(),
        hint,
    })
}

/// An argument that breaks its rule, whatever the capability (22023).
enum ArgumentError {
    Invalid { argument: String, rule: String },
    IntervalTooLong { argument: String },
}

impl KeelError for ArgumentError {
    fn code(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
    }
    fn message(&self) -> String {
        match self {
            ArgumentError::Invalid { argument, rule } => {
                format!("invalid value for {argument}: {rule}")
            }
            ArgumentError::IntervalTooLong { argument } => {
                format!("invalid value for {argument}: must be at most 100 years")
            }
        }
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            ArgumentError::Invalid { .. } => "Pass a value that follows the rule, or leave the \
                argument out to get its documented default."
                .into(),
            ArgumentError::IntervalTooLong { .. } => "pg_keel takes intervals up to interval \
                '100 years' (its months, days and time each within that too), so that every \
                time it stores can be dumped and restored."
                .into(),
        })
    }
}

/// Raises 22023: `argument` breaks `rule` ("must not be NULL").
pub fn invalid_argument(argument: &str, rule: &str) -> ! {
    raise(&ArgumentError::Invalid {
        argument: argument.into(),
        rule: rule.into(),
    })
}

/// Raises 22023: the interval `argument` is longer than pg_keel takes.
pub fn interval_too_long(argument: &str) -> ! {
    raise(&ArgumentError::IntervalTooLong {
        argument: argument.into(),
    })
}

/// `keel._invalid_argument(argument, rule)`: raises 22023 for an argument of any SQL function
/// of pg_keel that breaks its rule. Internal: nothing grants it.
#[pg_extern(volatile, parallel_safe, name = "_invalid_argument")]
fn invalid_argument_sql(argument: Option<&str>, rule: Option<&str>) {
    invalid_argument(argument.unwrap_or(""), rule.unwrap_or(""))
}
