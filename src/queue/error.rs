//! Errors of the queue capability and their SQLSTATEs.

use pgrx::PgSqlErrorCode;

use crate::error::{shown, sql_literal, KeelError};

#[derive(Debug)]
pub enum QueueError {
    /// A malformed queue (or topic) name (22023).
    InvalidName {
        kind: String,
        name: String,
        problem: String,
    },
    /// No such queue (42704).
    UnknownQueue { queue: String },
    /// Backpressure: `max_ready` reached (53400).
    QueueFull { queue: String, max_ready: String },
    /// Payload larger than `keel.max_payload_bytes` (54000).
    PayloadTooLarge { bytes: i64, limit: i64 },
    /// drop_queue without force while jobs exist (55006).
    QueueNotEmpty { queue: String, jobs: String },
    /// An idempotency key kept changing under three attempts to read or insert it (40001).
    BusyKey { queue: String, key: String },
    /// A combination of features not built yet (0A000).
    NotSupported { what: String },
}

impl KeelError for QueueError {
    fn code(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            QueueError::InvalidName { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            QueueError::UnknownQueue { .. } => ERRCODE_UNDEFINED_OBJECT,
            QueueError::QueueFull { .. } => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            QueueError::PayloadTooLarge { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            QueueError::QueueNotEmpty { .. } => ERRCODE_OBJECT_IN_USE,
            QueueError::BusyKey { .. } => ERRCODE_T_R_SERIALIZATION_FAILURE,
            QueueError::NotSupported { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
        }
    }

    fn message(&self) -> String {
        match self {
            QueueError::InvalidName {
                kind,
                name,
                problem,
            } => {
                format!("invalid {kind} name {}: {problem}", shown(name))
            }
            QueueError::UnknownQueue { queue } => format!("queue {} does not exist", shown(queue)),
            QueueError::QueueFull { queue, max_ready } => {
                format!(
                    "queue {} is full: it already holds max_ready = {max_ready} ready jobs",
                    shown(queue)
                )
            }
            QueueError::PayloadTooLarge { bytes, limit } => {
                format!(
                    "job payload is {bytes} bytes, larger than keel.max_payload_bytes = {limit}"
                )
            }
            QueueError::QueueNotEmpty { queue, jobs } => {
                format!("queue {} still holds {jobs} jobs", shown(queue))
            }
            QueueError::BusyKey { queue, key } => {
                format!(
                    "idempotency key {} of queue {} changed concurrently",
                    shown(key),
                    shown(queue)
                )
            }
            QueueError::NotSupported { what } => format!("{what} is not supported yet"),
        }
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            QueueError::InvalidName { .. } => {
                "Names of queues and topics match ^[a-z0-9][a-z0-9_.:-]{0,127}$.".into()
            }
            QueueError::UnknownQueue { queue } => {
                format!("Create it first: SELECT keel.create_queue({});", sql_literal(queue))
            }
            QueueError::QueueFull { .. } => "Retry later with backoff, or raise the limit with \
                keel.alter_queue(queue, max_ready => ...). Consumers may be down: check keel.queue_stats."
                .into(),
            QueueError::PayloadTooLarge { .. } => {
                "Store large data elsewhere and enqueue a reference to it.".into()
            }
            QueueError::QueueNotEmpty { .. } => {
                "Drain or purge it first (keel.purge_queue), or use keel.drop_queue(queue, force => true).".into()
            }
            QueueError::BusyKey { .. } => "Retry the enqueue.".into(),
            QueueError::NotSupported { .. } => {
                "See the docs of the function for what combines with what.".into()
            }
        })
    }
}
