//! Scheduled maintenance (DESIGN.md §5): the background worker runs the built-in tasks of
//! `keel.tasks` when they are due, each as bounded batches in short transactions, and keeps
//! only the last run per task. The tasks themselves are SQL functions (sql/maintenance.sql),
//! callable by hand.

use std::time::{Duration, Instant};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::error::{raise, KeelError};
use crate::spi_plans::{execute, param};

/// Rows one batch of a task may touch.
const BATCH_ROWS: i32 = 1000;
/// Batches one task may run per round before the worker turns to other work.
const MAX_BATCHES: usize = 100;

const DUE: &str = "SELECT name, clock_timestamp() FROM keel.tasks
     WHERE enabled AND (last_run_at IS NULL OR last_run_at + every <= clock_timestamp())
     ORDER BY last_run_at NULLS FIRST, name";

const RUN_BATCH: &str = "SELECT rows, error, more FROM keel._run_task_batch($1, $2)";

const RECORD: &str = "UPDATE keel.tasks
       SET last_run_at = $2, last_duration = clock_timestamp() - $2, last_rows = $3, last_error = $4
     WHERE name = $1";

const RECORD_RUN: &str = "INSERT INTO keel.task_runs (task, started_at, duration, rows, error)
     VALUES ($1, $2, clock_timestamp() - $2, $3, $4)";

/// Runs older than the retention ($1), of any task (a disabled one too), a bounded number per
/// recorded run: the history shrinks faster than it grows, in short transactions.
const TRIM_RUNS: &str = "DELETE FROM keel.task_runs
     WHERE ctid = ANY (ARRAY(SELECT ctid FROM keel.task_runs
                              WHERE started_at < clock_timestamp() - $1
                              ORDER BY started_at LIMIT 100))";

pub enum MaintenanceError {
    UnknownTask { name: String },
}

impl KeelError for MaintenanceError {
    fn code(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT
    }

    fn message(&self) -> String {
        match self {
            MaintenanceError::UnknownTask { name } => {
                format!("task {} does not exist", crate::error::shown(name))
            }
        }
    }

    fn hint(&self) -> Option<String> {
        Some("The built-in tasks are listed in keel.tasks.".into())
    }
}

#[pg_extern(volatile, parallel_safe, name = "_maintenance_error")]
fn maintenance_error(kind: &str, subject: Option<&str>) {
    let name = subject.unwrap_or("").to_string();
    match kind {
        "unknown_task" => raise(&MaintenanceError::UnknownTask { name }),
        other => crate::error::invalid_argument(
            "kind",
            &format!("unknown maintenance error kind {other:?}"),
        ),
    }
}

/// keel.outbox_retention as an interval, for SQL.
#[pg_extern(stable, parallel_safe, name = "_outbox_retention")]
fn outbox_retention() -> Interval {
    crate::pgtime::interval_of_secs(crate::guc::OUTBOX_RETENTION.get(), 7 * 86_400)
}

/// keel.session_cleanup_grace as an interval, for SQL.
#[pg_extern(stable, parallel_safe, name = "_session_cleanup_grace")]
fn session_cleanup_grace() -> Interval {
    crate::pgtime::interval_of_secs(crate::guc::SESSION_CLEANUP_GRACE.get(), 3_600)
}

/// Runs every due task; returns early (leaving the rest for the next round) once `budget`
/// is spent or SIGTERM arrived.
pub fn run_due(budget: Duration) {
    let started = Instant::now();
    let due: Vec<(String, TimestampWithTimeZone)> = BackgroundWorker::transaction(|| {
        Spi::connect_mut(|_| {
            let rows = execute(DUE, &[]);
            (0..rows.len())
                .filter_map(|i| Some((rows.get::<String>(i, 1)?, rows.get(i, 2)?)))
                .collect()
        })
    });
    for (name, at) in due {
        if started.elapsed() > budget || crate::worker::process::stop_requested() {
            return;
        }
        let (rows, error) = run_task(&name);
        let retention = crate::guc::task_run_retention();
        BackgroundWorker::transaction(|| {
            Spi::connect_mut(|_| {
                let run = [
                    param(name.as_str()),
                    param(at),
                    param(rows),
                    param(error.as_deref()),
                ];
                execute(RECORD, &run);
                execute(RECORD_RUN, &run);
                execute(TRIM_RUNS, &[param(retention)]);
            })
        });
    }
}

/// Batches of one task, each its own transaction, until a batch does less than a full one.
fn run_task(name: &str) -> (i64, Option<String>) {
    let mut total = 0;
    for _ in 0..MAX_BATCHES {
        let (rows, error, more) = BackgroundWorker::transaction(|| {
            Spi::connect_mut(|_| {
                let r = execute(RUN_BATCH, &[param(name), param(BATCH_ROWS)]);
                (
                    r.get::<i64>(0, 1).unwrap_or(0),
                    r.get::<String>(0, 2),
                    r.get::<bool>(0, 3).unwrap_or(false),
                )
            })
        });
        total += rows;
        if error.is_some() {
            return (total, error);
        }
        if !more || crate::worker::process::stop_requested() {
            break;
        }
    }
    (total, None)
}
