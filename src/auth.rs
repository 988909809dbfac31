//! Who may use which queue, topic and rate-limit policy.
//!
//! EXECUTE on a function says what a role may *do* (`grant_producer`, `grant_consumer`,
//! `grant_sessions`, `grant_admin`); the rows of `keel.grants` say *where*: per role, the
//! queues it may produce to and consume from, the topics it may emit on, and the rate-limit
//! policies it may decide on (`'*'`: all of them). A role outside a grant gets 42501 and
//! changes nothing. A lease belongs to the role that claimed it: `ack`, `fail` and `extend`
//! by another role find no lease (as if it were lost), so a lease is useless to anyone who
//! guessed it.
//!
//! The role checked is `current_user` where the call is made, as Postgres checks any
//! privilege: the session's role (`SET ROLE` included), or the owner of the SECURITY DEFINER
//! function or of the table whose index expression makes the call. So the entry points that
//! check are SECURITY INVOKER: the natives (`enqueue`, `enqueue_batch`, `claim`, `ack`,
//! `extend`, `check`, `rate_limit`, `rate_peek`, `rate_refund`) check, then run their SQL as
//! pg_keel's owner (`crate::owner::as_owner`); the PL/pgSQL ones (`emit`, `fail`) are one-line
//! SQL wrappers, `keel._emit(keel._authorize('emit', topic), ...)`, around a
//! SECURITY DEFINER implementation that first redeems the ticket `_authorize` issued for
//! exactly that action (`_redeem`): called directly, without a ticket, it refuses.
//! Superusers and members of pg_keel's owner may do everything.
//!
//! A decision is cached per backend (allowed ones only) while the shared generation is
//! unchanged and for at most a second; the grant helpers bump it when they commit.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic, PgSqlErrorCode};

use crate::error::{raise, shown, sql_literal, KeelError};
use crate::spi_plans::{execute_latest, param};

/// What a grant row allows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Capability {
    Produce,
    Consume,
    Emit,
    Limit,
}

impl Capability {
    fn name(self) -> &'static str {
        match self {
            Capability::Produce => "produce",
            Capability::Consume => "consume",
            Capability::Emit => "emit",
            Capability::Limit => "limit",
        }
    }

    fn parse(text: &str) -> Option<Capability> {
        [
            Capability::Produce,
            Capability::Consume,
            Capability::Emit,
            Capability::Limit,
        ]
        .into_iter()
        .find(|c| c.name() == text)
    }

    /// The words of the error and the helper that grants it.
    fn wording(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Capability::Produce => ("enqueue to queue", "grant_producer", "queues"),
            Capability::Consume => ("consume from queue", "grant_consumer", "queues"),
            Capability::Emit => ("emit on topic", "grant_producer", "topics"),
            Capability::Limit => ("use rate limit", "grant_producer", "limits"),
        }
    }
}

/// Bounds staleness after changes that bypass the helpers (a restore, a DROP EXTENSION).
const MAX_AGE: Duration = Duration::from_secs(1);

// SAFETY: the name is unique among the shared-memory segments of pg_keel (every one is a
// distinct "pg_keel ..." string) and of PostgreSQL itself.
static GENERATION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_keel grant generation") };

pub fn init() {
    pg_shmem_init!(GENERATION);
}

type Key = (u32, Capability, String);

thread_local! {
    static ALLOWED: RefCell<HashMap<Key, (u64, Instant)>> = RefCell::new(HashMap::new());
    static PRIVILEGED: Cell<Option<(u32, Instant, bool)>> = const { Cell::new(None) };
}

fn generation() -> Option<u64> {
    crate::shmem::enabled().then(|| GENERATION.get().load(Ordering::Acquire))
}

/// `current_user` (see the module header): call it before switching to the owner.
pub fn caller() -> pg_sys::Oid {
    // SAFETY: reads a backend global (the current user id), set by Postgres.
    unsafe { pg_sys::GetUserId() }
}

fn outer() -> pg_sys::Oid {
    // SAFETY: reads a backend global (the session's role), set by Postgres.
    unsafe { pg_sys::GetOuterUserId() }
}

/// Superusers and members of pg_keel's owner (the owner of keel.jobs); remembered per
/// backend for a second (ack and extend ask on every call).
pub fn privileged(role: pg_sys::Oid) -> bool {
    if let Some((r, at, answer)) = PRIVILEGED.get() {
        if r == role.to_u32() && at.elapsed() < MAX_AGE {
            return answer;
        }
    }
    // SAFETY: catalog lookups for existing roles; they raise nothing for a role that exists
    // (the caller's role exists while it is connected).
    let answer = unsafe {
        pg_sys::superuser_arg(role) || pg_sys::has_privs_of_role(role, crate::owner::of(c"jobs"))
    };
    PRIVILEGED.set(Some((role.to_u32(), Instant::now(), answer)));
    answer
}

const GRANTED: &str = "SELECT EXISTS (
    SELECT 1 FROM keel.grants g
     WHERE g.capability = $2 AND g.name IN ($3, '*')
       AND pg_catalog.pg_has_role($1, g.role::oid, 'USAGE'))";

/// pg_keel's own topics (`keel.session_revoked`): only a grant naming them, never '*'.
const GRANTED_EXACTLY: &str = "SELECT EXISTS (
    SELECT 1 FROM keel.grants g
     WHERE g.capability = $2 AND g.name = $3
       AND pg_catalog.pg_has_role($1, g.role::oid, 'USAGE'))";

/// Topics pg_keel emits on itself.
const OWN_TOPICS: &str = "keel.";

/// Raises 42501 unless the caller may use `name` for `capability` ('*' for "every one",
/// as inline rate limits need).
pub fn require(capability: Capability, name: &str) {
    let role = caller();
    if !allowed(role, capability, name) {
        raise(&Denied {
            role: role_name(role),
            capability,
            name: name.to_string(),
        })
    }
}

/// For the SECURITY DEFINER implementations that learn the name only from a row they read
/// (`keel._cancel`: the job's queue): may `role` — the one `_redeem` returned — use `name`
/// for `capability`? False for a NULL argument or an unknown capability. The caller decides
/// what a refusal looks like (`_cancel` answers as if the job did not exist, so job ids and
/// queue names of other queues stay hidden). Not granted to anyone: only pg_keel's own
/// functions, running as its owner, call it.
#[pg_extern(volatile, parallel_unsafe, name = "_may_use")]
fn may_use(role: Option<pg_sys::Oid>, capability: Option<&str>, name: Option<&str>) -> bool {
    match (role, capability.and_then(Capability::parse), name) {
        (Some(role), Some(capability), Some(name)) => allowed(role, capability, name),
        _ => false,
    }
}

/// May `role` use `name` for `capability`? Allowed answers are cached (see the module header).
fn allowed(role: pg_sys::Oid, capability: Capability, name: &str) -> bool {
    let key: Key = (role.to_u32(), capability, name.to_string());
    let now = generation();
    if let Some(g) = now {
        let hit = ALLOWED.with_borrow(|a| {
            a.get(&key)
                .is_some_and(|(at_gen, at)| *at_gen == g && at.elapsed() < MAX_AGE)
        });
        if hit {
            return true;
        }
    }
    let query = if capability == Capability::Emit && name.starts_with(OWN_TOPICS) {
        GRANTED_EXACTLY
    } else {
        GRANTED
    };
    let allowed = privileged(role)
        || crate::owner::as_owner(crate::owner::of(c"grants"), || {
            Spi::connect_mut(|_| {
                execute_latest(query, &[param(role), param(capability.name()), param(name)])
                    .get::<bool>(0, 1)
                    .unwrap_or(false)
            })
        });
    if allowed {
        if let Some(g) = now {
            ALLOWED.with_borrow_mut(|a| {
                if a.len() > 1000 {
                    a.clear();
                }
                a.insert(key, (g, Instant::now()));
            });
        }
    }
    allowed
}

fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: noerr: NULL for a role that does not exist.
    let name = unsafe { pg_sys::GetUserNameFromId(role, true) };
    if name.is_null() {
        return format!("with oid {}", role.to_u32());
    }
    // SAFETY: a palloc'd NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

struct Denied {
    role: String,
    capability: Capability,
    name: String,
}

impl KeelError for Denied {
    fn code(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
    }

    fn message(&self) -> String {
        let (what, _, _) = self.capability.wording();
        if self.name == "*" {
            format!(
                "role {} may not use keel.rate_limit (inline limits need a grant of every policy)",
                shown(&self.role)
            )
        } else {
            format!(
                "role {} may not {what} {}",
                shown(&self.role),
                shown(&self.name)
            )
        }
    }

    fn hint(&self) -> Option<String> {
        let (_, helper, argument) = self.capability.wording();
        let name = if self.name == "*" {
            "NULL".to_string()
        } else {
            format!("ARRAY[{}]", sql_literal(&self.name))
        };
        Some(format!(
            "A superuser or pg_keel's owner grants it: SELECT keel.{helper}({}, {argument} => {name});",
            sql_literal(&self.role)
        ))
    }
}

/// What `_authorize` allowed, for the one `_redeem` that comes next.
struct Ticket {
    number: i64,
    capability: String,
    name: Option<String>,
    role: pg_sys::Oid,
    outer: pg_sys::Oid,
    /// The subtransaction it was issued in: its abort drops the ticket.
    subtransaction: pg_sys::SubTransactionId,
}

thread_local! {
    static TICKET: RefCell<Option<Ticket>> = const { RefCell::new(None) };
}

/// An unpredictable ticket number: a ticket left behind (its call failed) cannot be guessed
/// by another call, even of the same session.
fn ticket_number() -> i64 {
    let mut bytes = [0u8; 8];
    // SAFETY: fills exactly `bytes.len()` bytes of a buffer we own.
    let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    if !ok {
        crate::error::internal("no random bytes for an authorization ticket");
    }
    i64::from_le_bytes(bytes)
}

/// Drops the ticket in flight (at the transaction's end).
pub fn forget_ticket() {
    TICKET.set(None);
}

/// Drops the ticket in flight if it was issued in `subtransaction`, which aborted (an
/// exception block around a failed call); a ticket from an enclosing one stays, for the call
/// whose other arguments ran that block.
pub fn forget_ticket_of(subtransaction: pg_sys::SubTransactionId) {
    let issued_there = TICKET.with_borrow(|t| {
        t.as_ref()
            .is_some_and(|t| t.subtransaction == subtransaction)
    });
    if issued_there {
        TICKET.set(None);
    }
}

/// For the SQL wrappers: raises 42501 unless `current_user` may use `name` for `capability`
/// ('hold' checks nothing: a lease is checked against the role by `_may_hold`); returns the
/// number of the ticket the implementation redeems. A NULL name is not checked: the
/// implementation refuses it (22023).
#[pg_extern(volatile, parallel_unsafe, name = "_authorize")]
fn authorize(capability: &str, name: Option<&str>) -> i64 {
    if let Some(name) = name {
        match Capability::parse(capability) {
            Some(c) => require(c, name),
            None if capability == "hold" => {}
            None => crate::error::invalid_argument(
                "capability",
                "must be produce, consume, emit, limit or hold",
            ),
        }
    }
    crate::xact::register();
    let number = ticket_number();
    TICKET.set(Some(Ticket {
        number,
        capability: capability.to_string(),
        name: name.map(str::to_string),
        role: caller(),
        outer: outer(),
        // SAFETY: reads the current subtransaction's id (a backend global).
        subtransaction: unsafe { pg_sys::GetCurrentSubTransactionId() },
    }));
    number
}

/// For the SECURITY DEFINER implementations: takes the ticket `_authorize` issued for exactly
/// this action in this session, or raises 42501; returns the role it was issued to.
#[pg_extern(volatile, parallel_unsafe, name = "_redeem")]
fn redeem(ticket: Option<i64>, capability: &str, name: Option<&str>) -> pg_sys::Oid {
    let taken = TICKET.take();
    match taken {
        Some(t)
            if Some(t.number) == ticket
                && t.capability == capability
                && t.name.as_deref() == name
                && t.outer == outer() =>
        {
            t.role
        }
        _ => raise(&NoTicket),
    }
}

struct NoTicket;

impl KeelError for NoTicket {
    fn code(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
    }

    fn message(&self) -> String {
        "pg_keel's implementation functions are called through their public function".into()
    }

    fn hint(&self) -> Option<String> {
        Some("Call the public function: keel.enqueue, keel.emit, keel.fail, keel.snooze, keel.cancel, keel.cancel_queue, ...".into())
    }
}

/// May `role` use a lease claimed by `claimed_by`? The same role, or a privileged one.
#[pg_extern(stable, parallel_safe, name = "_may_hold")]
fn may_hold(claimed_by: Option<pg_sys::Oid>, role: pg_sys::Oid) -> bool {
    claimed_by == Some(role) || privileged(role)
}

/// Grants change when this transaction commits (a prepared one: when it is committed, by
/// whichever session; until then cached answers live their second). Returns true.
#[pg_extern(volatile, parallel_unsafe, name = "_grants_changed")]
fn grants_changed() -> bool {
    if crate::shmem::enabled() {
        crate::xact::on_commit(crate::xact::OnCommit::GrantsChanged);
    }
    true
}

/// From the commit callback (raises nothing).
pub fn bump_generation() {
    if crate::shmem::enabled() {
        GENERATION.get().fetch_add(1, Ordering::AcqRel);
    }
}
