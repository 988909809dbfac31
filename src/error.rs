//! The one way pg_keel raises an error: a SQLSTATE, a message, and a detail and hint a user
//! can act on. Each capability has its own error enum that knows its codes and texts and
//! raises through [`raise`].

use pgrx::pg_sys::panic::ErrorReport;
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
