//! Rate limits (DESIGN.md §3): one atomic decision per call.
//!
//! A durable decision is an in-place update of the key's row in `keel.rate_limit_state`
//! (`heap`: the primary-key probe, the pure step of `algo` on the newest committed version,
//! `heap_update` under the row lock, retried on a concurrent update like an UPDATE under READ
//! COMMITTED), or, for a key without a row, `INSERT … ON CONFLICT DO NOTHING` of the state it
//! leaves. Only the caller's key is locked, so callers of one hot key queue on that row and
//! never on another key. No indexed column changes, so with the table's fillfactor the update
//! is HOT. A denial consumes nothing and writes nothing.
//!
//! Durability `async` runs the same decision through `commit::async_write`: the deciding
//! transaction skips the WAL flush only when it wrote nothing else.

pub mod algo;
pub mod cache;
mod clock;
mod error;
mod heap;
pub mod memory;

use std::ffi::CStr;

use pgrx::prelude::*;

use self::algo::{Algorithm, Decision, Durability, Limit, Policy, State};
use self::error::RateError;
use crate::commit::async_write;
use crate::error::raise;
use crate::pgtime::check_interval;
use crate::pgtime::now_micros;
use crate::spi_plans::{execute, execute_latest, param};
use crate::srf::Native;
use crate::v1_function;

/// Longest key, in characters.
const MAX_KEY: usize = 1024;

/// Policy name under which `keel.rate_limit`'s per-call limits keep their keys.
const PER_CALL: &str = "";

/// `enforce` is read through the row's JSON so that the library also serves a 0.1.0 catalog,
/// which has no such column, between its install and `ALTER EXTENSION pg_keel UPDATE` (only on
/// a cache miss).
const POLICY: &str = "SELECT max, per, algorithm, burst, durability, log_denials,
            coalesce((to_jsonb(l) -> 'enforce')::boolean, true)
       FROM keel.rate_limits l WHERE name = $1";

/// A key's first decision (or its first after cleanup): a row at full capacity does not
/// exist, so this inserts the state the decision leaves. Someone else inserting the key
/// meanwhile makes it insert nothing; the decision is then taken on their row.
const INSERT_FRESH: &str =
    "INSERT INTO keel.rate_limit_state AS st (policy, key, a, b, c, expires_at)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (policy, key) DO NOTHING
     RETURNING true";

const LOG_DENIAL: &str = "INSERT INTO keel.rate_limit_denials (policy, key, cost, retry_after_ms)
     VALUES ($1, $2, $3, $4)";

/// A denial of a policy in shadow mode (which only a 0.2.0 catalog can have).
const LOG_SHADOW_DENIAL: &str =
    "INSERT INTO keel.rate_limit_denials (policy, key, cost, retry_after_ms, shadow)
     VALUES ($1, $2, $3, $4, true)";

const READ_STATE: &str = "SELECT a, b, c FROM keel.rate_limit_state WHERE policy = $1 AND key = $2";

/// For a key entering shared memory: its state and when it is back to full capacity (µs
/// since 2000-01-01, PostgreSQL's timestamp epoch), NULL without state; no row when the
/// policy is no longer a memory policy.
const LOAD_STATE: &str = "SELECT s.a, s.b, s.c,
            ((extract(epoch FROM s.expires_at) - 946684800) * 1000000)::bigint
       FROM keel.rate_limits l
       LEFT JOIN keel.rate_limit_state s ON s.policy = l.name AND s.key = $2
      WHERE l.name = $1 AND l.durability = 'memory'";

/// The same under the key's row lock, for a read-modify-write.
const READ_STATE_LOCKED: &str =
    "SELECT a, b, c FROM keel.rate_limit_state WHERE policy = $1 AND key = $2 FOR UPDATE";

const WRITE_STATE: &str = "UPDATE keel.rate_limit_state
        SET a = $3, b = $4, c = $5, expires_at = $6
      WHERE policy = $1 AND key = $2";

fn timestamp(micros: i64) -> TimestampWithTimeZone {
    crate::pgtime::timestamptz(micros)
        .unwrap_or_else(|| crate::error::internal("timestamp out of range"))
}

fn check_key(key: Option<&str>) -> &str {
    match key {
        Some(k) if !k.is_empty() && k.chars().count() <= MAX_KEY => k,
        Some(_) => raise(&RateError::argument(
            "key",
            format!("must be 1 to {MAX_KEY} characters"),
        )),
        None => raise(&RateError::argument("key", "must not be NULL")),
    }
}

fn to_i32(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// Builds and checks a limit from SQL arguments; raises 22023 on anything out of range.
fn limit_from(
    max: Option<i32>,
    per: Option<Interval>,
    algorithm: Option<&str>,
    burst: Option<i32>,
) -> Limit {
    let algorithm = algorithm
        .and_then(Algorithm::parse)
        .unwrap_or_else(|| raise(&RateError::algorithm()));
    let max = max.unwrap_or_else(|| raise(&RateError::argument("max", "must not be NULL")));
    let per = per
        .as_ref()
        .map(|per| check_interval("per", per))
        .unwrap_or_else(|| raise(&RateError::argument("per", "must not be NULL")));
    Limit::new(algorithm, i64::from(max), per, burst.map(i64::from))
        .unwrap_or_else(|e| raise(&RateError::from_invalid(e)))
}

fn check_cost(limit: &Limit, cost: Option<i32>) -> i64 {
    let cost =
        i64::from(cost.unwrap_or_else(|| raise(&RateError::argument("cost", "must not be NULL"))));
    limit
        .check_cost(cost)
        .unwrap_or_else(|e| raise(&RateError::from_invalid(e)));
    cost
}

/// Runs SQL (in an SPI connection) as the owner of pg_keel's rate-limit tables with the pinned
/// search_path: `check` and `rate_limit` are not SECURITY DEFINER (see `crate::owner`), and
/// they only need SQL on a key's first decision, a denial to log, a policy not yet cached, or
/// a memory key to load.
fn as_table_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = crate::owner::of(c"rate_limit_state");
    crate::owner::as_owner(owner, || Spi::connect_mut(|_| f()))
}

fn policy(name: Option<&str>) -> (String, Policy) {
    let name = name.unwrap_or_else(|| raise(&RateError::argument("name", "must not be NULL")));
    crate::auth::require(crate::auth::Capability::Limit, name);
    // SPI only on a cache miss: a memory decision with a cached policy never connects.
    let policy = cache::policy(name, || {
        let rows = as_table_owner(|| execute(POLICY, &[param(name)]));
        if rows.is_empty() {
            raise(&RateError::UnknownLimit { name: name.into() })
        }
        let limit = limit_from(
            rows.get::<i32>(0, 1),
            rows.get::<Interval>(0, 2),
            rows.get::<String>(0, 3).as_deref(),
            rows.get::<i32>(0, 4),
        );
        Policy {
            limit,
            // The table's CHECK allows only the three; anything else decides as durable.
            durability: rows
                .get::<String>(0, 5)
                .as_deref()
                .and_then(Durability::parse)
                .unwrap_or(Durability::Durable),
            log_denials: rows.get::<bool>(0, 6).unwrap_or(false),
            enforce: rows.get::<bool>(0, 7).unwrap_or(true),
        }
    });
    (name.to_string(), policy)
}

/// A policy decided by `check`, `check_many` and `rate_refund`: not a concurrency limit.
fn rate_policy(name: Option<&str>) -> (String, Policy) {
    let (name, policy) = policy(name);
    if policy.limit.algorithm == Algorithm::Concurrency {
        raise(&RateError::WrongKind {
            name,
            concurrency: true,
        })
    }
    (name, policy)
}

/// The clock of this backend's last rate-limit decision: a rate-limited claim
/// (`keel._claim_flow`) stamps each job's claimed_at with the time it was charged, so that a
/// window of the policy and the jobs' claimed_at count the same claims.
#[pg_extern(volatile, parallel_unsafe, name = "_last_decision_at")]
fn last_decision_at() -> Option<TimestampWithTimeZone> {
    crate::pgtime::timestamptz(clock::last_decision())
}

/// When a key decided at `now` is back to full capacity (µs).
fn expires_at(now: i64, d: &Decision) -> i64 {
    now.saturating_add(d.reset_after_ms.saturating_mul(1000))
}

/// One durable decision: on the key's row in place (`heap::update`), or, when it has none, by
/// inserting the row. `command` names the SQL function for the read-only error.
fn decide_durable(command: &CStr, policy: &str, key: &str, limit: &Limit, cost: i64) -> Decision {
    // Each round that does not decide means another transaction created the key's row
    // meanwhile; a few are already unusual.
    for _ in 0..100 {
        let step = |state: State| {
            let now = clock::deciding_at(now_micros());
            let (d, next) = algo::decide(limit, Some(state), now, cost);
            // A denial consumes nothing, so it writes nothing and locks nothing.
            let write = (d.allowed && next != state).then(|| heap::Write {
                state: next,
                expires_at: expires_at(now, &d),
            });
            (d, write)
        };
        if let heap::Outcome::Decided(d) = heap::update(command, policy, key, step) {
            return d;
        }
        let now = clock::deciding_at(now_micros());
        let (d, next) = algo::decide(limit, None, now, cost);
        if !d.allowed || cost == 0 {
            return d;
        }
        let inserted = as_table_owner(|| {
            execute(
                INSERT_FRESH,
                &[
                    param(policy),
                    param(key),
                    param(next.a),
                    param(next.b),
                    param(next.c),
                    param(timestamp(expires_at(now, &d))),
                ],
            )
        });
        if !inserted.is_empty() {
            return d;
        }
    }
    crate::error::internal(format!(
        "no decision on rate-limit key {} after 100 attempts",
        crate::error::shown(key)
    ))
}

fn row(
    d: Decision,
) -> TableIterator<
    'static,
    (
        name!(allowed, bool),
        name!(limit, i32),
        name!(remaining, i32),
        name!(retry_after_ms, i64),
        name!(reset_after_ms, i64),
    ),
> {
    TableIterator::once((
        d.allowed,
        to_i32(d.limit),
        to_i32(d.remaining),
        d.retry_after_ms,
        d.reset_after_ms,
    ))
}

/// Raises the rate-limit error `kind` for `subject` (a policy, or an argument for
/// 'invalid_argument'); `detail` carries the rule. For the PL/pgSQL admin functions.
#[pg_extern(volatile, parallel_safe, name = "_rate_error")]
fn rate_error(kind: &str, subject: Option<&str>, detail: Option<&str>) {
    let subject = subject.unwrap_or("").to_string();
    let err = match kind {
        "unknown_limit" => RateError::UnknownLimit { name: subject },
        "limit_exists" => RateError::LimitExists { name: subject },
        "invalid_argument" => RateError::argument(&subject, detail.unwrap_or("")),
        "not_concurrency" => RateError::WrongKind {
            name: subject,
            concurrency: false,
        },
        "is_concurrency" => RateError::WrongKind {
            name: subject,
            concurrency: true,
        },
        other => RateError::argument("kind", format!("unknown rate-limit error {other:?}")),
    };
    raise(&err)
}

/// keel.rate_denial_retention as an interval, for SQL.
#[pg_extern(stable, parallel_safe, name = "_rate_denial_retention")]
fn rate_denial_retention() -> Interval {
    crate::pgtime::interval_of_secs(crate::guc::RATE_DENIAL_RETENTION.get(), 30 * 86_400)
}

/// Checks the numbers of a policy for create_limit / alter_limit (raises 22023 or 0A000).
#[pg_extern(volatile, parallel_safe, name = "_check_limit")]
fn check_limit(
    name: Option<&str>,
    max: Option<i32>,
    per: Option<Interval>,
    algorithm: Option<&str>,
    burst: Option<i32>,
    durability: Option<&str>,
) {
    crate::names::check(name.unwrap_or_default())
        .unwrap_or_else(|problem| raise(&RateError::argument("name", problem.to_string())));
    limit_from(max, per, algorithm, burst);
    match durability.and_then(Durability::parse) {
        Some(Durability::Durable | Durability::Async) => {}
        Some(Durability::Memory) => require_preload(name.unwrap_or_default()),
        None => raise(&RateError::argument(
            "durability",
            format!("must be {}", Durability::NAMES),
        )),
    }
}

/// The columns of a decision's row (`keel.check`, `keel.rate_limit`).
const DECISION_COLUMNS: &[(&str, &str)] = &[
    ("allowed", "boolean"),
    ("limit", "integer"),
    ("remaining", "integer"),
    ("retry_after_ms", "bigint"),
    ("reset_after_ms", "bigint"),
];

/// `keel.rate_limit` as sql/ratelimit.sql declares it.
pub const RATE_LIMIT: Native = Native {
    symbol: "keel_rate_limit",
    function: "keel.rate_limit",
    args: &[
        ("key", "text"),
        ("max", "integer"),
        ("per", "interval"),
        ("cost", "integer"),
        ("algorithm", "text"),
        ("burst", "integer"),
    ],
    columns: DECISION_COLUMNS,
};

/// `keel.check` as sql/ratelimit.sql declares it.
pub const CHECK: Native = Native {
    symbol: "keel_check",
    function: "keel.check",
    args: &[("name", "text"), ("key", "text"), ("cost", "integer")],
    columns: DECISION_COLUMNS,
};

v1_function!(pg_finfo_keel_rate_limit);

/// `keel.rate_limit(key, max, per, cost, algorithm, burst) RETURNS TABLE(...)`, declared in
/// sql/ratelimit.sql: a per-call limit. The limit travels with every call, the key's state
/// lives in the table. Not SECURITY DEFINER (its SQL runs as the tables' owner), and its row
/// is returned by `srf::one_row`.
///
/// # Safety
/// Called only by PostgreSQL's function manager through the declaration in
/// sql/ratelimit.sql (`key text, max integer, per interval, cost integer, algorithm text,
/// burst integer`, not STRICT), with that call's valid `fcinfo`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn keel_rate_limit(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    const KEY: usize = RATE_LIMIT.index("key");
    const MAX: usize = RATE_LIMIT.index("max");
    const PER: usize = RATE_LIMIT.index("per");
    const COST: usize = RATE_LIMIT.index("cost");
    const ALGORITHM: usize = RATE_LIMIT.index("algorithm");
    const BURST: usize = RATE_LIMIT.index("burst");
    // SAFETY: `fcinfo` is the call's (the caller's promise), and each pg_getarg reads its
    // argument as the type RATE_LIMIT gives it at that position (checked against the
    // declaration by a test), giving None for a NULL; the &str borrow the argument's memory,
    // which lives for the whole call.
    unsafe {
        use pgrx::fcinfo::pg_getarg;
        // Inline limits share one key space: only a role granted every policy may use them.
        crate::auth::require(crate::auth::Capability::Limit, "*");
        let key = check_key(pg_getarg::<&str>(fcinfo, KEY));
        let limit = limit_from(
            pg_getarg::<i32>(fcinfo, MAX),
            pg_getarg::<Interval>(fcinfo, PER),
            pg_getarg::<&str>(fcinfo, ALGORITHM),
            pg_getarg::<i32>(fcinfo, BURST),
        );
        if limit.algorithm == Algorithm::Concurrency {
            raise(&RateError::argument(
                "algorithm",
                "must be 'token_bucket', 'fixed_window' or 'sliding_window' (a concurrency limit is a policy: keel.create_limit, then keel.acquire)",
            ))
        }
        let cost = check_cost(&limit, pg_getarg::<i32>(fcinfo, COST));
        let d = decide_durable(c"keel.rate_limit", PER_CALL, key, &limit, cost);
        one_row(fcinfo, d)
    }
}

/// Returns a decision as the one row of `keel.check` / `keel.rate_limit`.
///
/// # Safety
/// `fcinfo` is the running call of `keel_check` or `keel_rate_limit`, whose result columns
/// are `allowed boolean, "limit" integer, remaining integer, retry_after_ms bigint,
/// reset_after_ms bigint`.
unsafe fn one_row(fcinfo: pg_sys::FunctionCallInfo, d: Decision) -> pg_sys::Datum {
    let mut values = [
        pg_sys::Datum::from(d.allowed),
        pg_sys::Datum::from(to_i32(d.limit)),
        pg_sys::Datum::from(to_i32(d.remaining)),
        pg_sys::Datum::from(d.retry_after_ms),
        pg_sys::Datum::from(d.reset_after_ms),
    ];
    // SAFETY: the call's fcinfo (the caller's promise), and five by-value datums of the five
    // declared result columns' types, in order, none NULL.
    unsafe { crate::srf::one_row(fcinfo, &mut values, &mut [false; 5]) }
}

v1_function!(pg_finfo_keel_check);

/// `keel.check(name text, key text, cost int = 1) RETURNS TABLE(...)`, declared in
/// sql/ratelimit.sql: a decision under a named policy. Not SECURITY DEFINER (its SQL runs as
/// the tables' owner, `as_table_owner`), and its row is returned by `srf::one_row`.
///
/// # Safety
/// Called only by PostgreSQL's function manager through the declaration in
/// sql/ratelimit.sql (`name text, key text, cost integer`, not STRICT), with that call's
/// valid `fcinfo`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn keel_check(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    const NAME: usize = CHECK.index("name");
    const KEY: usize = CHECK.index("key");
    const COST: usize = CHECK.index("cost");
    // SAFETY: `fcinfo` is the call's (the caller's promise), and each pg_getarg reads its
    // argument as the type CHECK gives it at that position (checked against the declaration
    // by a test), giving None for a NULL; the &str borrow the arguments' memory, which lives
    // for the whole call.
    unsafe {
        let name = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, NAME);
        let key = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, KEY);
        let cost = pgrx::fcinfo::pg_getarg::<i32>(fcinfo, COST);
        one_row(fcinfo, check(name, key, cost))
    }
}

fn check(name: Option<&str>, key: Option<&str>, cost: Option<i32>) -> Decision {
    let (name, policy) = rate_policy(name);
    let key = check_key(key);
    let cost = check_cost(&policy.limit, cost);
    let decide = || {
        let d = decide_durable(c"keel.check", &name, key, &policy.limit, cost);
        if !d.allowed && policy.log_denials {
            as_table_owner(|| {
                execute(
                    if policy.enforce {
                        LOG_DENIAL
                    } else {
                        LOG_SHADOW_DENIAL
                    },
                    &[
                        param(name.as_str()),
                        param(key),
                        param(cost),
                        param(d.retry_after_ms),
                    ],
                )
            });
        }
        d
    };
    let log = policy.log_denials.then_some(!policy.enforce);
    let d = match policy.durability {
        Durability::Async => async_write(decide),
        Durability::Memory => {
            require_preload(&name);
            let load = || as_table_owner(|| load_state(&name, key));
            match memory::decide(&name, key, &policy.limit, cost, log, &load) {
                memory::Memory::Decided(d) => d,
                memory::Memory::Elsewhere => decide(),
            }
        }
        Durability::Durable => decide(),
    };
    if d.allowed || policy.enforce {
        return d;
    }
    // Shadow mode: the call goes through; the denial was logged (marked) and, since a denial
    // consumes nothing, the key's state is what enforcing would have left.
    Decision {
        allowed: true,
        retry_after_ms: 0,
        ..d
    }
}

/// Most (name, key) pairs one `check_many` decides.
const MAX_MANY: usize = 32;

/// Locks a key's row for `check_many`.
const LOCK_STATE: &str =
    "SELECT a, b, c FROM keel.rate_limit_state WHERE policy = $1 AND key = $2 FOR UPDATE";

/// A row for a key that has none, so `check_many` can lock it in its turn: the state of a key
/// at full capacity (what a cost-0 decision leaves), back to full at once.
const INSERT_FULL: &str = "INSERT INTO keel.rate_limit_state (policy, key, a, b, c, expires_at)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (policy, key) DO NOTHING";

/// One (name, key) of a `check_many`.
struct Many {
    name: String,
    policy: Policy,
    key: String,
    cost: i64,
    /// Decided in shared memory (pinned there), not in the table.
    memory: bool,
    /// The durable path's locked state (None: full capacity).
    state: Option<State>,
    decision: Option<(Decision, State)>,
}

/// `keel.check_many(names, keys, costs)`: one decision under several policies, all or
/// nothing. Every enforcing policy must allow for any to be charged; then each is charged as
/// `check` would. A policy in shadow mode never stops the others.
///
/// The durable keys are locked in one order, (name, key) byte by byte, so concurrent calls
/// naming the same policies in any order queue instead of deadlocking; a key without a row
/// gets one at full capacity to lock. Memory keys are pinned in shared memory first (a key
/// that cannot be joins the durable ones), then decided together under the table's lock once
/// the durable decisions are known.
// SECURITY INVOKER: `policy` checks the caller's grant for every name (crate::auth); the SQL
// runs as the tables' owner.
#[pg_extern(volatile, parallel_unsafe)]
fn check_many(
    names: Option<Vec<Option<String>>>,
    keys: Option<Vec<Option<String>>>,
    costs: default!(Option<Vec<Option<i32>>>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(allowed, bool),
        name!(limit, i32),
        name!(remaining, i32),
        name!(retry_after_ms, i64),
        name!(reset_after_ms, i64),
    ),
> {
    let names = names.unwrap_or_else(|| raise(&RateError::argument("names", "must not be NULL")));
    let keys = keys.unwrap_or_else(|| raise(&RateError::argument("keys", "must not be NULL")));
    if names.is_empty() || names.len() > MAX_MANY {
        raise(&RateError::argument(
            "names",
            format!("must have 1 to {MAX_MANY} elements"),
        ));
    }
    if keys.len() != names.len() {
        raise(&RateError::argument(
            "keys",
            "must have as many elements as names",
        ));
    }
    let costs = match costs {
        None => vec![Some(1); names.len()],
        Some(c) if c.len() == names.len() => c,
        Some(_) => raise(&RateError::argument(
            "costs",
            "must have as many elements as names (or be NULL: 1 each)",
        )),
    };
    let mut many: Vec<Many> = names
        .iter()
        .zip(&keys)
        .zip(&costs)
        .map(|((name, key), cost)| {
            let (name, policy) = rate_policy(name.as_deref());
            let key = check_key(key.as_deref()).to_string();
            let cost = check_cost(&policy.limit, *cost);
            let memory = policy.durability == Durability::Memory;
            if memory {
                require_preload(&name);
            }
            Many {
                name,
                policy,
                key,
                cost,
                memory,
                state: None,
                decision: None,
            }
        })
        .collect();
    // Input order is the output's; the locks follow the byte order of (name, key).
    let mut order: Vec<usize> = (0..many.len()).collect();
    order.sort_by(|&x, &y| {
        (many[x].name.as_bytes(), many[x].key.as_bytes())
            .cmp(&(many[y].name.as_bytes(), many[y].key.as_bytes()))
    });
    if order
        .windows(2)
        .any(|w| many[w[0]].name == many[w[1]].name && many[w[0]].key == many[w[1]].key)
    {
        raise(&RateError::argument(
            "keys",
            "each (name, key) pair may appear once",
        ));
    }
    let all_async = many
        .iter()
        .all(|m| m.policy.durability == Durability::Async);
    if all_async {
        async_write(|| decide_many(&mut many, &order))
    } else {
        decide_many(&mut many, &order)
    }
    TableIterator::new(many.into_iter().map(|m| {
        let (d, _) = m
            .decision
            .unwrap_or_else(|| crate::error::internal("check_many left a key undecided"));
        (
            m.name,
            d.allowed,
            to_i32(d.limit),
            to_i32(d.remaining),
            d.retry_after_ms,
            d.reset_after_ms,
        )
    }))
}

/// The work of `check_many` once its arguments are checked: sets every `decision`.
fn decide_many(many: &mut [Many], order: &[usize]) {
    // Memory keys first: one that cannot be pinned joins the durable path before any row
    // is locked, so the rows are still locked in order.
    for &i in order {
        let m = &mut many[i];
        if m.memory {
            let (name, key) = (m.name.clone(), m.key.clone());
            let load = || as_table_owner(|| load_state(&name, &key));
            m.memory = memory::pin(&name, &key, &load);
        }
    }
    as_table_owner(|| {
        for &i in order {
            let m = &mut many[i];
            if !m.memory {
                m.state = lock_row(&m.name, &m.key, &m.policy.limit);
            }
        }
    });
    let now = now_micros();
    for m in many.iter_mut().filter(|m| !m.memory) {
        m.decision = Some(algo::decide(&m.policy.limit, m.state, now, m.cost));
    }
    let table_allows = many
        .iter()
        .filter_map(|m| m.decision.map(|(d, _)| d.allowed || !m.policy.enforce))
        .all(|ok| ok);
    let in_memory: Vec<usize> = (0..many.len()).filter(|&i| many[i].memory).collect();
    let charged = if in_memory.is_empty() {
        table_allows
    } else {
        let wants: Vec<memory::Want> = in_memory
            .iter()
            .map(|&i| {
                let m = &many[i];
                memory::Want {
                    policy: &m.name,
                    key: &m.key,
                    limit: &m.policy.limit,
                    cost: m.cost,
                    log_denial: m.policy.log_denials.then_some(!m.policy.enforce),
                    enforce: m.policy.enforce,
                }
            })
            .collect();
        let decided = memory::decide_many(&wants, table_allows);
        let (decisions, charged) = decided.unwrap_or_else(|memory::Vanished| {
            let name = wants.first().map(|w| w.policy).unwrap_or_default();
            raise(&RateError::Forgotten { name: name.into() })
        });
        for (&i, d) in in_memory.iter().zip(decisions) {
            many[i].decision = Some((d, State::default()));
        }
        charged
    };
    as_table_owner(|| {
        for &i in order {
            let m = &many[i];
            let (Some((d, next)), false) = (m.decision, m.memory) else {
                continue;
            };
            if d.allowed && charged && Some(next) != m.state {
                execute(
                    WRITE_STATE,
                    &[
                        param(m.name.as_str()),
                        param(m.key.as_str()),
                        param(next.a),
                        param(next.b),
                        param(next.c),
                        param(timestamp(expires_at(now, &d))),
                    ],
                );
            }
            if !d.allowed && m.policy.log_denials {
                execute(
                    if m.policy.enforce {
                        LOG_DENIAL
                    } else {
                        LOG_SHADOW_DENIAL
                    },
                    &[
                        param(m.name.as_str()),
                        param(m.key.as_str()),
                        param(m.cost),
                        param(d.retry_after_ms),
                    ],
                );
            }
        }
    });
    for m in many.iter_mut() {
        let Some((d, next)) = m.decision else {
            continue;
        };
        let d = if !d.allowed && !m.policy.enforce {
            // Shadow mode: allowed, consuming nothing (as `check`).
            Decision {
                allowed: true,
                retry_after_ms: 0,
                ..d
            }
        } else if d.allowed && !charged && !m.memory {
            // Would allow, but another policy denied: nothing was taken, so the row shows
            // the key as it is (memory::decide_many does the same for its keys).
            algo::decide(&m.policy.limit, m.state, now, 0).0
        } else {
            d
        };
        m.decision = Some((d, next));
    }
}

/// Locks (policy, key)'s row for `check_many`, creating it at full capacity when it has
/// none; returns its state. In an SPI connection, as the tables' owner.
fn lock_row(policy: &str, key: &str, limit: &Limit) -> Option<State> {
    for _ in 0..100 {
        if let Some(state) = read_state(LOCK_STATE, policy, key) {
            return Some(state);
        }
        let now = now_micros();
        let (_, full) = algo::decide(limit, None, now, 0);
        execute(
            INSERT_FULL,
            &[
                param(policy),
                param(key),
                param(full.a),
                param(full.b),
                param(full.c),
                param(timestamp(now)),
            ],
        );
    }
    crate::error::internal(format!(
        "could not lock rate-limit key {} after 100 attempts",
        crate::error::shown(key)
    ))
}

/// Memory policies live in shared memory, which exists only when pg_keel is preloaded, and
/// are snapshotted by the database's worker, which only databases keel.database lists have.
fn require_preload(name: &str) {
    if !crate::shmem::enabled() {
        raise(&RateError::NotPreloaded { name: name.into() })
    }
    let Some(listed) = crate::guc::served_databases() else {
        return; // every database is served
    };
    let here = crate::catalog::current_database();
    if !listed.contains(&here) {
        let mut names: Vec<String> = listed.into_iter().collect();
        names.sort();
        raise(&RateError::NotWorkerDatabase {
            name: name.into(),
            database: names.join(", "),
        })
    }
}

fn load_state(policy: &str, key: &str) -> memory::Load {
    // What is committed now, whatever the transaction's snapshot: under REPEATABLE READ a
    // loader must still see a decision the table took after the transaction began.
    let rows = execute_latest(LOAD_STATE, &[param(policy), param(key)]);
    if rows.is_empty() {
        return memory::Load::Left;
    }
    let Some(a) = rows.get::<i64>(0, 1) else {
        return memory::Load::Missing;
    };
    memory::Load::Found(memory::Loaded {
        state: State {
            a,
            b: rows.get::<i64>(0, 2).unwrap_or(0),
            c: rows.get::<i64>(0, 3).unwrap_or(0),
        },
        expires_at: rows.get::<i64>(0, 4).unwrap_or(0),
        held: Vec::new(),
    })
}

/// A concurrency limit's live slots, for its key entering shared memory (µs since
/// 2000-01-01); what is committed now, as for `LOAD_STATE`.
const LOAD_HELD: &str = "SELECT token,
            ((extract(epoch FROM acquired_at) - 946684800) * 1000000)::bigint,
            ((extract(epoch FROM expires_at) - 946684800) * 1000000)::bigint
       FROM keel.rate_limit_slots
      WHERE policy = $1 AND key = $2 AND expires_at > clock_timestamp()";

/// A concurrency limit's key as the table has it: its row and its live slots.
fn load_held(policy: &str, key: &str) -> memory::Load {
    let mut loaded = match load_state(policy, key) {
        memory::Load::Found(loaded) => loaded,
        other => return other,
    };
    let rows = execute_latest(LOAD_HELD, &[param(policy), param(key)]);
    for r in 0..rows.len() {
        let (Some(token), Some(at), Some(until)) = (
            rows.get::<pgrx::Uuid>(r, 1),
            rows.get::<i64>(r, 2),
            rows.get::<i64>(r, 3),
        ) else {
            continue;
        };
        loaded.expires_at = loaded.expires_at.max(until);
        loaded.held.push((*token.as_bytes(), at, until));
    }
    loaded.state = State {
        a: loaded.held.len() as i64,
        b: 0,
        c: 0,
    };
    memory::Load::Found(loaded)
}

/// A slot of a memory concurrency limit's key, taken in shared memory (see `keel._acquire`);
/// no row when the key is decided in the table (`keel._acquire` goes on there). Internal:
/// nothing grants it; `keel._acquire` has checked the caller's ticket and the arguments.
#[pg_extern(volatile, parallel_unsafe, name = "_acquire_memory")]
fn acquire_memory(
    name: &str,
    key: &str,
    max: i32,
    hold: Interval,
    enforce: bool,
    log_denials: bool,
) -> TableIterator<
    'static,
    (
        name!(allowed, bool),
        name!(token, Option<pgrx::Uuid>),
        name!(remaining, i32),
        name!(retry_after_ms, i64),
    ),
> {
    require_preload(name);
    let how = memory::Acquiring {
        max: i64::from(max),
        hold_micros: crate::pgtime::interval_micros(&hold),
        enforce,
        log_denials,
    };
    let mut token = [0u8; 16];
    // SAFETY: fills exactly `token.len()` bytes of a buffer we own.
    if !unsafe { pg_sys::pg_strong_random(token.as_mut_ptr().cast(), token.len()) } {
        crate::error::internal("no random bytes for a concurrency slot's token");
    }
    // A version 4 (random) UUID, as gen_random_uuid() makes.
    token[6] = (token[6] & 0x0f) | 0x40;
    token[8] = (token[8] & 0x3f) | 0x80;
    let load = || as_table_owner(|| load_held(name, key));
    match memory::acquire(name, key, &how, token, &load) {
        memory::Acquire::Decided(got) => TableIterator::once((
            got.allowed,
            got.token.map(pgrx::Uuid::from_bytes),
            to_i32(got.remaining),
            got.retry_after_ms,
        )),
        memory::Acquire::Elsewhere => TableIterator::new(std::iter::empty()),
        memory::Acquire::PoolFull => raise(&RateError::HoldersFull {
            name: name.into(),
            holders: memory::HOLDERS,
        }),
    }
}

/// Gives back a slot of a memory concurrency limit's key in shared memory: NULL when the key
/// is not in memory (`keel._release` deletes the row). Internal, like `_acquire_memory`.
#[pg_extern(volatile, parallel_unsafe, name = "_release_memory")]
fn release_memory(name: &str, key: &str, token: pgrx::Uuid) -> Option<bool> {
    require_preload(name);
    memory::release(name, key, *token.as_bytes())
}

/// Moves a memory policy's keys out of shared memory into the table, with what memory decided
/// since the last snapshot (the held slots of a concurrency limit included): for an
/// `alter_limit` that gives the policy another durability. The keys are gone from memory at
/// once, whether or not the caller's transaction commits, as with `_rate_forget`.
#[pg_extern(volatile, parallel_unsafe, name = "_rate_leave_memory")]
fn rate_leave_memory(name: &str) -> i64 {
    if !crate::shmem::enabled() {
        return 0;
    }
    let s = memory::take_policy(name);
    let n = (s.keys.len() + s.held.keys.len()) as i64;
    Spi::connect_mut(|_| write_snapshot(s, true));
    n
}

/// The decision a cost-1 call would get now; consumes nothing and writes nothing.
// SECURITY INVOKER: `policy` checks the caller's grant (crate::auth), the SQL runs as owner.
#[pg_extern(volatile, parallel_unsafe)]
fn rate_peek(
    name: Option<&str>,
    key: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(allowed, bool),
        name!(limit, i32),
        name!(remaining, i32),
        name!(retry_after_ms, i64),
        name!(reset_after_ms, i64),
    ),
> {
    let (name, policy) = policy(name);
    let key = check_key(key);
    if policy.limit.algorithm == Algorithm::Concurrency {
        if policy.durability == Durability::Memory {
            require_preload(&name);
            if let Some((live, soonest, latest)) = memory::peek_held(&name, key) {
                let now = now_micros();
                let ms = |at: i64| (at.saturating_sub(now).max(0).saturating_add(999)) / 1000;
                return row(held_decision(&policy.limit, live, ms(soonest), ms(latest)));
            }
        }
        return row(as_table_owner(|| peek_slots(&name, key, &policy.limit)));
    }
    if policy.durability == Durability::Memory {
        require_preload(&name);
        if let Some(d) = memory::peek(&name, key, &policy.limit) {
            return row(d);
        }
    }
    let state = as_table_owner(|| read_state(READ_STATE, &name, key));
    row(algo::decide(&policy.limit, state, now_micros(), 1).0)
}

/// A concurrency limit's key: its live slots, the soonest and the latest expiry (ms from now).
const PEEK_SLOTS: &str = "SELECT count(*),
            ceil(extract(epoch FROM min(expires_at) - clock_timestamp()) * 1000)::bigint,
            ceil(extract(epoch FROM max(expires_at) - clock_timestamp()) * 1000)::bigint
       FROM keel.rate_limit_slots
      WHERE policy = $1 AND key = $2 AND expires_at > clock_timestamp()";

/// What an acquire of a concurrency limit's key would get now: allowed while a slot is free
/// (`remaining` the free slots it would leave), else `retry_after_ms` until the soonest slot
/// expires; `reset_after_ms` until every slot held now has expired.
fn peek_slots(policy: &str, key: &str, limit: &Limit) -> Decision {
    let rows = execute(PEEK_SLOTS, &[param(policy), param(key)]);
    let live = rows.get::<i64>(0, 1).unwrap_or(0);
    let soonest = rows.get::<i64>(0, 2).unwrap_or(0).max(0);
    let latest = rows.get::<i64>(0, 3).unwrap_or(0).max(0);
    held_decision(limit, live, soonest, latest)
}

/// What an acquire would get with `live` slots held, the soonest and the latest expiring in
/// that many ms.
fn held_decision(limit: &Limit, live: i64, soonest: i64, latest: i64) -> Decision {
    let allowed = live < limit.max;
    Decision {
        allowed,
        limit: limit.max,
        remaining: if allowed { limit.max - live - 1 } else { 0 },
        retry_after_ms: if allowed { 0 } else { soonest.max(1) },
        reset_after_ms: latest,
    }
}

fn read_state(sql: &'static str, policy: &str, key: &str) -> Option<State> {
    let rows = execute(sql, &[param(policy), param(key)]);
    if rows.is_empty() {
        return None;
    }
    Some(State {
        a: rows.get::<i64>(0, 1)?,
        b: rows.get::<i64>(0, 2).unwrap_or(0),
        c: rows.get::<i64>(0, 3).unwrap_or(0),
    })
}

/// Gives `amount` units back to a key (never above full); returns what remains now.
// SECURITY INVOKER: `policy` checks the caller's grant (crate::auth), the SQL runs as owner.
#[pg_extern(volatile, parallel_unsafe)]
fn rate_refund(name: Option<&str>, key: Option<&str>, amount: default!(Option<i32>, 1)) -> i32 {
    let (name, policy) = rate_policy(name);
    let key = check_key(key);
    let amount = match amount {
        Some(a) if a >= 0 => i64::from(a),
        _ => raise(&RateError::argument(
            "amount",
            "must be zero or more (not NULL)",
        )),
    };
    if policy.durability == Durability::Memory {
        require_preload(&name);
        if let Some(remaining) = memory::refund(&name, key, &policy.limit, amount) {
            return to_i32(remaining);
        }
    }
    as_table_owner(|| {
        let now = now_micros();
        let Some(state) = read_state(READ_STATE_LOCKED, &name, key) else {
            // No state: the key is already at full capacity.
            return to_i32(policy.limit.capacity());
        };
        let refunded = algo::refund(&policy.limit, state, now, amount);
        let peek = algo::decide(&policy.limit, Some(refunded), now, 0).0;
        execute(
            WRITE_STATE,
            &[
                param(name.as_str()),
                param(key),
                param(refunded.a),
                param(refunded.b),
                param(refunded.c),
                param(timestamp(
                    now.saturating_add(peek.reset_after_ms.saturating_mul(1000)),
                )),
            ],
        );
        to_i32(peek.remaining)
    })
}

/// Forgets keys of a memory policy held in shared memory (all of them when `key` is NULL);
/// for rate_reset, drop_limit and alter_limit. Takes effect at once, whatever the caller's
/// transaction does next.
/// Run by the install script: a new install starts with no key in memory (see
/// `memory::reset_database`).
#[pg_extern(volatile, parallel_unsafe, name = "_rate_memory_reset")]
fn rate_memory_reset() {
    if crate::shmem::enabled() {
        memory::reset_database();
    }
}

#[pg_extern(volatile, parallel_unsafe, name = "_rate_forget")]
fn rate_forget(policy: &str, key: Option<&str>) -> i64 {
    if !crate::shmem::enabled() {
        return 0;
    }
    memory::forget(policy, key)
}

const SNAPSHOT: &str = "INSERT INTO keel.rate_limit_state AS st (policy, key, a, b, c, expires_at)
     SELECT u.p, u.k, u.a, u.b, u.c,
            timestamptz '2000-01-01 00:00:00+00' + u.e * interval '1 microsecond'
       FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])
            AS u(p, k, a, b, c, e)
       -- A policy still in memory ($7: one leaving it, see `rate_leave_memory`).
       JOIN keel.rate_limits l ON l.name = u.p AND (l.durability = 'memory' OR $7)
      ORDER BY u.p COLLATE \"C\", u.k COLLATE \"C\"
     ON CONFLICT (policy, key) DO UPDATE
        SET a = excluded.a, b = excluded.b, c = excluded.c, expires_at = excluded.expires_at
      -- Not over a newer decision the table took after the key left memory (its slot expired
      -- and was reused before this snapshot committed): that one reaches further. A slot's
      -- expiry never moves back while it lives (`memory::RateTable::keep`; a refund may, and is
      -- then written once a later decision passes the table's expiry again).
      WHERE st.expires_at <= excluded.expires_at OR st.expires_at <= clock_timestamp()";

/// Keys of memory concurrency limits: their rows as `SNAPSHOT` writes them; returns the keys
/// written, whose slots `write_held` then makes the live ones.
const SNAPSHOT_HELD: &str =
    "INSERT INTO keel.rate_limit_state AS st (policy, key, a, b, c, expires_at)
     SELECT u.p, u.k, u.n, 0, 0,
            timestamptz '2000-01-01 00:00:00+00' + u.e * interval '1 microsecond'
       FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS u(p, k, n, e)
       JOIN keel.rate_limits l ON l.name = u.p AND (l.durability = 'memory' OR $5)
      ORDER BY u.p COLLATE \"C\", u.k COLLATE \"C\"
     ON CONFLICT (policy, key) DO UPDATE
        SET a = excluded.a, b = 0, c = 0, expires_at = excluded.expires_at
      WHERE st.expires_at <= excluded.expires_at OR st.expires_at <= clock_timestamp()
     RETURNING st.policy, st.key";

/// The slots the table has of some keys (one index probe per key, whatever the planner
/// expects of the arrays).
const HELD_IN_TABLE: &str = "SELECT s.policy, s.key, s.token::text
       FROM unnest($1::text[], $2::text[]) AS w(p, k)
       JOIN keel.rate_limit_slots s ON s.policy = w.p AND s.key = w.k";

const DELETE_HELD: &str = "DELETE FROM keel.rate_limit_slots s
      USING unnest($1::text[], $2::text[], $3::text[]) AS x(p, k, t)
      WHERE s.policy = x.p AND s.key = x.k AND s.token = x.t::uuid";

const INSERT_HELD: &str =
    "INSERT INTO keel.rate_limit_slots (policy, key, token, acquired_at, expires_at)
     SELECT h.p, h.k, h.t::uuid,
            timestamptz '2000-01-01 00:00:00+00' + h.a * interval '1 microsecond',
            timestamptz '2000-01-01 00:00:00+00' + h.e * interval '1 microsecond'
       FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[]) AS h(p, k, t, a, e)
     ON CONFLICT (policy, key, token) DO NOTHING";

/// Writes memory concurrency limits' keys: each key's row, and where it was written (not over
/// a newer table-side decision, as for `SNAPSHOT`), its slots in the table become exactly the
/// live ones memory holds: a slot released or expired in memory is deleted, a new one inserted.
fn write_held(h: memory::HeldKeys, leaving: bool) {
    use std::collections::HashSet;
    let rows = execute(
        SNAPSHOT_HELD,
        &[
            param(h.policies),
            param(h.keys),
            param(h.count),
            param(h.expires_at),
            param(leaving),
        ],
    );
    let mut written: HashSet<(String, String)> = HashSet::new();
    for r in 0..rows.len() {
        if let (Some(p), Some(k)) = (rows.get::<String>(r, 1), rows.get::<String>(r, 2)) {
            written.insert((p, k));
        }
    }
    if written.is_empty() {
        return;
    }
    let (wp, wk): (Vec<String>, Vec<String>) = written.iter().cloned().unzip();
    let rows = execute(HELD_IN_TABLE, &[param(wp), param(wk)]);
    let mut in_table: HashSet<(String, String, String)> = HashSet::new();
    for r in 0..rows.len() {
        if let (Some(p), Some(k), Some(t)) = (
            rows.get::<String>(r, 1),
            rows.get::<String>(r, 2),
            rows.get::<String>(r, 3),
        ) {
            in_table.insert((p, k, t));
        }
    }
    let mut live: HashSet<(String, String, String)> = HashSet::new();
    let mut new = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..h.slot_tokens.len() {
        let (p, k) = (&h.slot_policies[i], &h.slot_keys[i]);
        if !written.contains(&(p.clone(), k.clone())) {
            continue;
        }
        let slot = (p.clone(), k.clone(), h.slot_tokens[i].clone());
        if !in_table.contains(&slot) {
            new.0.push(p.clone());
            new.1.push(k.clone());
            new.2.push(h.slot_tokens[i].clone());
            new.3.push(h.slot_acquired_at[i]);
            new.4.push(h.slot_expires_at[i]);
        }
        live.insert(slot);
    }
    let mut gone = (Vec::new(), Vec::new(), Vec::new());
    for (p, k, t) in in_table.into_iter().filter(|s| !live.contains(s)) {
        gone.0.push(p);
        gone.1.push(k);
        gone.2.push(t);
    }
    if !gone.0.is_empty() {
        execute(DELETE_HELD, &[param(gone.0), param(gone.1), param(gone.2)]);
    }
    if !new.0.is_empty() {
        execute(
            INSERT_HELD,
            &[
                param(new.0),
                param(new.1),
                param(new.2),
                param(new.3),
                param(new.4),
            ],
        );
    }
}

const SNAPSHOT_DENIALS: &str =
    "INSERT INTO keel.rate_limit_denials (policy, key, at, cost, retry_after_ms)
     SELECT u.p, u.k, timestamptz '2000-01-01 00:00:00+00' + u.t * interval '1 microsecond',
            u.c, u.r
       FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[])
            AS u(p, k, t, c, r)";

/// With shadow denials among them (which only a 0.2.0 catalog can have).
const SNAPSHOT_SHADOW_DENIALS: &str =
    "INSERT INTO keel.rate_limit_denials (policy, key, at, cost, retry_after_ms, shadow)
     SELECT u.p, u.k, timestamptz '2000-01-01 00:00:00+00' + u.t * interval '1 microsecond',
            u.c, u.r, u.s
       FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::bool[])
            AS u(p, k, t, c, r, s)";

/// Writes the memory policies' changed keys and buffered denials to their tables; for the
/// background worker, inside a transaction. Returns the keys written, for
/// `memory::written` once the transaction has committed.
pub fn snapshot() -> Vec<memory::Taken> {
    let mut s = memory::take_snapshot();
    if !s.taken.is_empty() {
        // The policies of the keys copied, locked shared: a rate_reset, drop_limit or
        // alter_limit (which take their policy's lock exclusive before changing its keys) that
        // took a key out of memory after the copy has committed once the lock is ours, and the
        // key is then missing from its slot: it is left out, else this older copy would
        // overwrite what that did. One that starts after waits for this commit. A policy
        // whose lock is held now (such a transaction still open) is left for the next
        // snapshot: the worker never waits for it.
        let mut policies: Vec<&String> = s.taken_keys.iter().map(|(p, _)| p).collect();
        policies.sort();
        policies.dedup();
        let busy: std::collections::HashSet<&String> = policies
            .into_iter()
            .filter(|p| !crate::locks::try_lock_limit_shared(p))
            .collect();
        let mut gone: std::collections::HashSet<(String, String)> = s
            .taken_keys
            .iter()
            .filter(|(p, _)| busy.contains(p))
            .cloned()
            .collect();
        gone.extend(memory::vanished(&s.taken, &s.taken_keys));
        if !gone.is_empty() {
            s.without(&gone);
        }
    }
    let taken = std::mem::take(&mut s.taken);
    write_snapshot(s, false);
    taken
}

/// Writes keys and denials taken from memory; `leaving`: the keys of a policy that an
/// `alter_limit` in this transaction moves out of memory.
fn write_snapshot(s: memory::Snapshot, leaving: bool) {
    let written = s.keys.len() + s.held.keys.len();
    if written > 0 || !s.denied_keys.is_empty() {
        // The worker's other commits skip the WAL flush (they can be redone); a snapshot
        // cannot, and "a crash forgets at most one interval" needs it on disk at commit.
        if let Err(e) = Spi::run("SET LOCAL synchronous_commit = on") {
            crate::error::internal(e.to_string());
        }
    }
    if !s.keys.is_empty() {
        execute(
            SNAPSHOT,
            &[
                param(s.policies),
                param(s.keys),
                param(s.a),
                param(s.b),
                param(s.c),
                param(s.expires_at),
                param(leaving),
            ],
        );
    }
    if !s.held.keys.is_empty() {
        write_held(s.held, leaving);
    }
    if !s.denied_keys.is_empty() {
        let mut args = vec![
            param(s.denied_policies),
            param(s.denied_keys),
            param(s.denied_at),
            param(s.denied_cost),
            param(s.denied_retry),
        ];
        let sql = if s.denied_shadow.contains(&true) {
            args.push(param(s.denied_shadow));
            SNAPSHOT_SHADOW_DENIALS
        } else {
            SNAPSHOT_DENIALS
        };
        execute(sql, &args);
    }
    if s.denials_dropped > 0 {
        warning!(
            "pg_keel: {} rate-limit denials of memory policies were not logged (buffer full between snapshots)",
            s.denials_dropped
        );
    }
}
