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
//! The role checked is the caller's role as the session runs it (`SET ROLE` included), read
//! with `GetOuterUserId`: pg_keel's SECURITY DEFINER functions run as their owner, and the
//! role in effect outside them is what a grant names. Called from another SECURITY DEFINER
//! function, the session's role is checked, not that function's owner: never more than the
//! session itself may do. Superusers and members of pg_keel's owner may do everything.
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
use crate::spi_plans::{execute, param};

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

static GENERATION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_keel grant generation") };

pub fn init() {
    pg_shmem_init!(GENERATION);
}

type Key = (u32, Capability, String);

thread_local! {
    static ALLOWED: RefCell<HashMap<Key, (u64, Instant)>> = RefCell::new(HashMap::new());
    static PRIVILEGED: Cell<Option<(u32, Instant, bool)>> = const { Cell::new(None) };
    static BUMP_ON_COMMIT: Cell<bool> = const { Cell::new(false) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

fn generation() -> Option<u64> {
    crate::shmem::enabled().then(|| GENERATION.get().load(Ordering::Acquire))
}

/// The caller's role, as the session runs it (see the module header).
pub fn caller() -> pg_sys::Oid {
    // SAFETY: reads a backend global set at connection and by SET ROLE.
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

/// Raises 42501 unless the caller may use `name` for `capability` ('*' for "every one",
/// as inline rate limits need).
pub fn require(capability: Capability, name: &str) {
    let role = caller();
    let key: Key = (role.to_u32(), capability, name.to_string());
    let now = generation();
    if let Some(g) = now {
        let hit = ALLOWED.with_borrow(|a| {
            a.get(&key)
                .is_some_and(|(at_gen, at)| *at_gen == g && at.elapsed() < MAX_AGE)
        });
        if hit {
            return;
        }
    }
    let allowed = privileged(role)
        || crate::owner::as_owner(crate::owner::of(c"grants"), || {
            Spi::connect_mut(|_| {
                execute(
                    GRANTED,
                    &[param(role), param(capability.name()), param(name)],
                )
                .get::<bool>(0, 1)
                .unwrap_or(false)
            })
        });
    if !allowed {
        raise(&Denied {
            role: role_name(role),
            capability,
            name: name.to_string(),
        })
    }
    if let Some(g) = now {
        ALLOWED.with_borrow_mut(|a| {
            if a.len() > 1000 {
                a.clear();
            }
            a.insert(key, (g, Instant::now()));
        });
    }
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
                "role {} may not {} without a name (inline rate limits need every policy)",
                shown(&self.role),
                what.rsplit_once(' ').map_or(what, |(verb, _)| verb)
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

/// For the PL/pgSQL functions: raises 42501 unless the caller may use `name`.
#[pg_extern(volatile, parallel_safe, name = "_authorize")]
fn authorize(capability: &str, name: Option<&str>) {
    let Some(capability) = Capability::parse(capability) else {
        error!("pg_keel: unknown capability {}", shown(capability))
    };
    require(capability, name.unwrap_or("*"));
}

/// The caller's role (see the module header), as a claim records it.
#[pg_extern(stable, parallel_safe, name = "_caller")]
fn caller_sql() -> pg_sys::Oid {
    caller()
}

/// May the caller use a lease claimed by `claimed_by`? The same role, or a privileged one.
#[pg_extern(stable, parallel_safe, name = "_may_hold")]
fn may_hold(claimed_by: Option<pg_sys::Oid>) -> bool {
    let role = caller();
    claimed_by == Some(role) || privileged(role)
}

/// Grants change when this transaction commits. Returns true (callable from SQL).
#[pg_extern(volatile, parallel_unsafe, name = "_grants_changed")]
fn grants_changed() -> bool {
    if !crate::shmem::enabled() {
        return true;
    }
    if !REGISTERED.get() {
        // SAFETY: registers a callback that lives as long as the library; it raises nothing.
        unsafe { pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut()) };
        REGISTERED.set(true);
    }
    BUMP_ON_COMMIT.set(true);
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT if BUMP_ON_COMMIT.replace(false) => {
            GENERATION.get().fetch_add(1, Ordering::AcqRel);
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            BUMP_ON_COMMIT.set(false)
        }
        _ => {}
    }
}
