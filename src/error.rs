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

/// Raises `err` as an ERROR; never returns (Postgres longjmps out, pgrx unwinds Rust frames).
pub fn raise(err: &dyn KeelError) -> ! {
    let mut report = ErrorReport::new(err.code(), err.message(), "pg_keel");
    if let Some(detail) = err.detail() {
        report = report.set_detail(detail);
    }
    if let Some(hint) = err.hint() {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}
