//! Errors of the rate-limit capability and their SQLSTATEs.

use pgrx::PgSqlErrorCode;

use super::algo::{Algorithm, Invalid};
use crate::error::{shown, sql_literal, KeelError};

#[derive(Debug)]
pub enum RateError {
    /// A bad argument value (22023).
    InvalidArgument { argument: String, rule: String },
    /// No such policy (42704).
    UnknownLimit { name: String },
    /// create_limit of a name that exists with other settings (42710).
    LimitExists { name: String },
    /// A memory policy without shared memory (55000).
    NotPreloaded { name: String },
    /// A memory policy outside the database the worker snapshots (55000).
    NotWorkerDatabase { name: String, database: String },
    /// A decision function for the other kind of policy: check on a concurrency limit, or
    /// acquire on a rate limit (42809).
    WrongKind { name: String, concurrency: bool },
    /// A memory concurrency limit's key in shared memory needs one more held slot and the
    /// pool of them is full (53200).
    HoldersFull { name: String, holders: usize },
    /// A key of a check_many was forgotten (rate_reset, alter_limit, drop_limit) while the
    /// call held it (40001: retry).
    Forgotten { name: String },
}

impl RateError {
    pub fn argument(argument: &str, rule: impl Into<String>) -> RateError {
        RateError::InvalidArgument {
            argument: argument.into(),
            rule: rule.into(),
        }
    }

    pub fn from_invalid(invalid: Invalid) -> RateError {
        match invalid {
            Invalid::Max => RateError::argument("max", "must be at least 1"),
            Invalid::Per => RateError::argument("per", "must be longer than zero"),
            Invalid::Burst => RateError::argument("burst", "must be at least 1 (or NULL for max)"),
            Invalid::Cost => RateError::argument("cost", "must not be negative"),
            Invalid::Refill => RateError::argument(
                "burst",
                "times per / max (the time a token bucket takes to refill) must be at most 1000 years",
            ),
            Invalid::CostAboveCapacity { cost, capacity } => RateError::argument(
                "cost",
                format!("{cost} is more than the limit can ever allow at once ({capacity})"),
            ),
        }
    }

    pub fn algorithm() -> RateError {
        RateError::argument("algorithm", format!("must be {}", Algorithm::NAMES))
    }
}

impl KeelError for RateError {
    fn code(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            RateError::InvalidArgument { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            RateError::UnknownLimit { .. } => ERRCODE_UNDEFINED_OBJECT,
            RateError::LimitExists { .. } => ERRCODE_DUPLICATE_OBJECT,
            RateError::NotPreloaded { .. } | RateError::NotWorkerDatabase { .. } => {
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            RateError::Forgotten { .. } => ERRCODE_T_R_SERIALIZATION_FAILURE,
            RateError::WrongKind { .. } => ERRCODE_WRONG_OBJECT_TYPE,
            RateError::HoldersFull { .. } => ERRCODE_OUT_OF_MEMORY,
        }
    }

    fn message(&self) -> String {
        match self {
            RateError::InvalidArgument { argument, rule } => {
                format!("invalid value for {argument}: {rule}")
            }
            RateError::UnknownLimit { name } => format!("rate limit {} does not exist", shown(name)),
            RateError::LimitExists { name } => {
                format!("rate limit {} already exists with other settings", shown(name))
            }
            RateError::NotWorkerDatabase { name, database } => format!(
                "rate limit {} has durability 'memory', which works only in the databases keel.database lists ({})",
                shown(name),
                shown(database)
            ),
            RateError::NotPreloaded { name } => format!(
                "rate limit {} has durability 'memory', which needs pg_keel in shared_preload_libraries",
                shown(name)
            ),
            RateError::WrongKind {
                name,
                concurrency: true,
            } => format!("rate limit {} is a concurrency limit", shown(name)),
            RateError::WrongKind {
                name,
                concurrency: false,
            } => format!("rate limit {} is not a concurrency limit", shown(name)),
            RateError::HoldersFull { name, holders } => format!(
                "no room in shared memory for another slot of rate limit {}: {holders} slots of memory concurrency limits are held",
                shown(name),
            ),
            RateError::Forgotten { name } => format!(
                "a key of rate limit {} was reset or its policy altered during keel.check_many",
                shown(name)
            ),
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            RateError::InvalidArgument { argument, .. } => Some(match argument.as_str() {
                "cost" => "A cost is at most the burst (token_bucket) or max (windows).".into(),
                "key" => "Keys are 1 to 1024 characters.".into(),
                "durability" => format!("Use {}.", super::algo::Durability::NAMES),
                "names" | "keys" | "costs" => "keel.check_many takes arrays of one length, 1 to 32 (name, key) pairs, each pair once.".into(),
                _ => "See keel.create_limit in the README for each argument's range.".into(),
            }),
            RateError::UnknownLimit { name } => Some(format!(
                "Create it first: SELECT keel.create_limit({}, 100, '1 minute');",
                sql_literal(name)
            )),
            RateError::LimitExists { .. } => Some("Use keel.alter_limit to change it.".into()),
            RateError::NotWorkerDatabase { .. } => Some(
                "A database's worker snapshots its memory policies, and only listed databases have one; add this database to keel.database or use 'async'."
                    .into(),
            ),
            RateError::NotPreloaded { .. } => Some(
                "Add pg_keel to shared_preload_libraries and restart, or use durability 'async'."
                    .into(),
            ),
            RateError::Forgotten { .. } => {
                Some("Nothing was charged; run the transaction again.".into())
            }
            RateError::WrongKind {
                concurrency: true, ..
            } => Some(
                "Take a slot with keel.acquire(name, key, ttl) and give it back with keel.release(name, key, token).".into(),
            ),
            RateError::WrongKind {
                concurrency: false, ..
            } => Some("Decide on it with keel.check(name, key, cost).".into()),
            RateError::HoldersFull { .. } => Some(
                "Nothing was taken. Release slots sooner, shorten their ttl, or move the busiest limits to durability 'async' (keel.alter_limit).".into(),
            ),
        }
    }
}
