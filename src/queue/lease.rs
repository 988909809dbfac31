//! The calls a lease holder makes on every job: `keel.ack` and `keel.extend`. They run once
//! per job, so they are native functions over saved SPI plans (see `spi_plans`) rather than
//! PL/pgSQL. The lease identity is (job_id, attempt): a worker whose lease was taken over by
//! a later claim (a higher attempt) matches no row and gets false / NULL.

use pgrx::pg_sys::{BuiltinOid, PgOid};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::stats;
use super::QueueError;
use crate::error::raise;
use crate::spi_plans::with_plan;

const INT8: PgOid = PgOid::BuiltIn(BuiltinOid::INT8OID);
const INT4: PgOid = PgOid::BuiltIn(BuiltinOid::INT4OID);
const INTERVAL: PgOid = PgOid::BuiltIn(BuiltinOid::INTERVALOID);

/// A job without an idempotency key is simply deleted: the common path, one statement.
const DELETE_DONE: &str = "DELETE FROM keel.jobs
     WHERE job_id = $1 AND attempt = $2 AND state = 'running' AND idempotency_key IS NULL
    RETURNING queue";

/// A job with a key stays as 'done' until its dedupe window ends, so the key stays taken.
const MARK_DONE: &str = "UPDATE keel.jobs j
       SET state = 'done', finished_at = clock_timestamp()
      FROM keel.queues q
     WHERE j.job_id = $1 AND j.attempt = $2 AND j.state = 'running' AND q.queue = j.queue
    RETURNING j.queue, j.enqueued_at + q.dedupe_window <= clock_timestamp()";

/// ...or is deleted when its window is already over.
const DELETE_BY_ID: &str = "DELETE FROM keel.jobs WHERE job_id = $1 AND state = 'done'";

const EXTEND: &str = "UPDATE keel.jobs
       SET visible_at = clock_timestamp() + $3
     WHERE job_id = $1 AND attempt = $2 AND state = 'running'
    RETURNING visible_at";

fn spi_failed(e: pgrx::spi::Error) -> ! {
    error!("pg_keel: internal SPI error: {e}")
}

/// Completes a job: true, or false when the lease was lost.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn ack(job_id: i64, attempt: i32) -> bool {
    let queue = Spi::connect_mut(|client| complete(client, job_id, attempt))
        .unwrap_or_else(|e| spi_failed(e));
    match queue {
        Some(queue) => {
            stats::count_on_commit(&queue, 0, 1);
            true
        }
        None => false,
    }
}

fn complete(
    client: &mut SpiClient<'_>,
    job_id: i64,
    attempt: i32,
) -> pgrx::spi::Result<Option<String>> {
    let deleted = with_plan(client, DELETE_DONE, &[INT8, INT4], |plan| {
        let table = client.select(plan, None, &[job_id.into(), attempt.into()])?;
        if table.is_empty() {
            Ok(None)
        } else {
            table.first().get_one::<String>()
        }
    })?;
    if deleted.is_some() {
        return Ok(deleted);
    }
    let marked = with_plan(client, MARK_DONE, &[INT8, INT4], |plan| {
        let table = client.select(plan, None, &[job_id.into(), attempt.into()])?;
        if table.is_empty() {
            Ok(None)
        } else {
            table.first().get_two::<String, bool>().map(Some)
        }
    })?;
    let Some((Some(queue), window_over)) = marked else {
        return Ok(None);
    };
    if window_over == Some(true) {
        with_plan(client, DELETE_BY_ID, &[INT8], |plan| {
            client.select(plan, None, &[job_id.into()]).map(|_| ())
        })?;
    }
    Ok(Some(queue))
}

/// Heartbeat: the lease now expires `extend_by` from now; NULL when the lease was lost.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn extend(job_id: i64, attempt: i32, extend_by: Option<Interval>) -> Option<TimestampWithTimeZone> {
    let extend_by = extend_by
        .filter(|i| super::interval_micros(i) > 0)
        .unwrap_or_else(|| {
            raise(&QueueError::InvalidArgument {
                argument: "extend_by".into(),
                rule: "must be a positive interval".into(),
            })
        });
    Spi::connect_mut(|client| {
        with_plan(client, EXTEND, &[INT8, INT4, INTERVAL], |plan| {
            let table = client.select(
                plan,
                None,
                &[job_id.into(), attempt.into(), extend_by.into()],
            )?;
            if table.is_empty() {
                Ok(None)
            } else {
                table.first().get_one::<TimestampWithTimeZone>()
            }
        })
    })
    .unwrap_or_else(|e| spi_failed(e))
}
