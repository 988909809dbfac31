//! Every `keel.*` setting, in one place. Contexts are chosen on purpose: what the postmaster
//! needs at start is Postmaster, intervals and limits an operator tunes live are Sighup or
//! Userset.

use std::ffi::CString;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// Databases the launcher serves (comma-separated); empty: every database with pg_keel.
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Prefix of the Redis keys of topics without a route of their own.
pub static REDIS_PREFIX: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"keel:"));

/// Redis the outbox is dispatched to; empty disables dispatch.
pub static REDIS_URL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"redis://127.0.0.1:6379"));

/// A file holding the Redis password (first line), readable only by the server.
pub static REDIS_PASSWORD_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// TLS for rediss:// URLs: the CA bundle (empty: the system's), whether to verify the
/// server's certificate and name, and a client certificate and key.
pub static REDIS_TLS_CA_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static REDIS_TLS_VERIFY: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static REDIS_TLS_CERT_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static REDIS_TLS_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// Outbox rows dispatched per batch.
pub static DISPATCH_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);

/// How long dispatched outbox rows (and their Redis dedupe keys) are kept, in seconds.
pub static OUTBOX_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);

/// How often the worker writes memory rate-limit states to their table, in milliseconds.
pub static RATE_SNAPSHOT_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// How long keel.task_runs keeps a run of a task, in seconds.
pub static TASK_RUN_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(24 * 3600);

/// How long denials of rate-limit policies are kept in keel.rate_limit_denials, in seconds.
pub static RATE_DENIAL_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(30 * 24 * 3600);

/// A valid session's last_seen_at (and idle expiry) is written at most this often, in seconds.
pub static SESSION_TOUCH_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);

/// How long expired and revoked sessions are kept before cleanup_sessions deletes them, in
/// seconds.
pub static SESSION_CLEANUP_GRACE: GucSetting<i32> = GucSetting::<i32>::new(3600);

/// Which session transitions are emitted to the outbox (`keel.session_events`): `off`,
/// `on` (every revocation, topic keel.session_revoked, as in 0.1.0) or `lifecycle` (those and
/// creations, logins and expiries, each on its own topic). A bool in 0.1.0: every spelling
/// PostgreSQL's bool parser took (true, yes, 1 and their prefixes, and the same for off)
/// stays accepted (hidden), so a setting written then keeps its meaning.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum SessionEvents {
    #[name = c"off"]
    Off,
    #[name = c"on"]
    On,
    #[name = c"lifecycle"]
    Lifecycle,
    #[name = c"true"]
    #[hidden = true]
    True,
    #[name = c"yes"]
    #[hidden = true]
    Yes,
    #[name = c"1"]
    #[hidden = true]
    One,
    #[name = c"t"]
    #[hidden = true]
    T,
    #[name = c"tr"]
    #[hidden = true]
    Tr,
    #[name = c"tru"]
    #[hidden = true]
    Tru,
    #[name = c"y"]
    #[hidden = true]
    Y,
    #[name = c"ye"]
    #[hidden = true]
    Ye,
    #[name = c"false"]
    #[hidden = true]
    False,
    #[name = c"no"]
    #[hidden = true]
    No,
    #[name = c"0"]
    #[hidden = true]
    Zero,
    #[name = c"f"]
    #[hidden = true]
    F,
    #[name = c"fa"]
    #[hidden = true]
    Fa,
    #[name = c"fal"]
    #[hidden = true]
    Fal,
    #[name = c"fals"]
    #[hidden = true]
    Fals,
    #[name = c"n"]
    #[hidden = true]
    N,
    #[name = c"of"]
    #[hidden = true]
    Of,
}

impl SessionEvents {
    /// Revocations are emitted (`on`, `lifecycle`, or a bool spelling of on).
    pub fn revocations(self) -> bool {
        !matches!(
            self,
            Self::Off
                | Self::False
                | Self::No
                | Self::Zero
                | Self::F
                | Self::Fa
                | Self::Fal
                | Self::Fals
                | Self::N
                | Self::Of
        )
    }

    /// Creations, logins and expiries are emitted too.
    pub fn lifecycle(self) -> bool {
        self == Self::Lifecycle
    }
}

pub static SESSION_EVENTS: GucSetting<SessionEvents> =
    GucSetting::<SessionEvents>::new(SessionEvents::Off);

/// Dispatch attempts Redis may refuse an event before it is marked dead.
pub static OUTBOX_MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(10);

/// Largest accepted job payload, in bytes (as stored, `pg_column_size`).
pub static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);

/// Running jobs older than this appear in `keel.stuck_jobs`.
pub static STUCK_THRESHOLD: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"15 minutes"));

/// How lease statements (claim, ack, extend) commit when their transaction wrote
/// nothing else: `async` does not wait for the WAL flush (a crash may forget the last
/// fraction of a second of them; those jobs are handed out again), `sync` always waits.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum LeaseCommit {
    #[name = c"sync"]
    Sync,
    #[name = c"async"]
    Async,
}

pub static LEASE_COMMIT: GucSetting<LeaseCommit> =
    GucSetting::<LeaseCommit>::new(LeaseCommit::Async);

/// Whether producers leave their NOTIFY to the database's wake relay (`queue::wake`).
pub static WAKE_RELAY: GucSetting<bool> = GucSetting::<bool>::new(true);

/// The databases keel.database lists, or None for all.
pub fn served_databases() -> Option<std::collections::HashSet<String>> {
    let list = DATABASE.get()?;
    let names: std::collections::HashSet<String> = list
        .to_string_lossy()
        .split(',')
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    (!names.is_empty()).then_some(names)
}

/// keel.task_run_retention as an interval.
pub fn task_run_retention() -> pgrx::datum::Interval {
    crate::pgtime::interval_of_secs(TASK_RUN_RETENTION.get(), 86_400)
}

/// A string setting's value (None when unset).
pub fn text(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting.get().map(|v| v.to_string_lossy().into_owned())
}

/// The key prefix of topics without a route of their own.
pub fn redis_prefix() -> String {
    REDIS_PREFIX
        .get()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn init() {
    GucRegistry::define_enum_guc(
        c"keel.lease_commit",
        c"How a job's first claim and ack commit when their transaction wrote nothing else.",
        c"async: without waiting for the WAL flush; a crash may forget the last fraction of a second of \
          them, and those jobs are handed out again under a new attempt (at-least-once). sync: wait, \
          like any commit. Other claims and extend always wait.",
        &LEASE_COMMIT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"keel.wake_relay",
        c"Producers leave the NOTIFY keel_jobs of their enqueues to the database's wake relay.",
        c"on: a relay process sends it just after the commit, so producers' commits do not queue \
          behind one another for NOTIFY's cluster-wide lock; off (or no relay running): the \
          enqueuing transaction sends it itself, as NOTIFY does.",
        &WAKE_RELAY,
        GucContext::Userset,
        GucFlags::default(),
    );
    // Only the launcher reads it, and only a preloaded library has a launcher.
    // SAFETY: a plain bool global the postmaster sets around loading shared_preload_libraries;
    // read by value, from _PG_init, in this single-threaded process.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_string_guc(
            c"keel.database",
            c"Databases the pg_keel launcher serves, comma-separated; empty: every database where pg_keel is installed.",
            c"Each served database where pg_keel is installed gets a background worker of its own.",
            &DATABASE,
            GucContext::Sighup,
            GucFlags::default(),
        );
    }
    // Suset, not Sighup, so that it can differ per database: ALTER DATABASE ... SET.
    GucRegistry::define_string_guc(
        c"keel.redis_url",
        c"Redis the outbox is dispatched to: redis://[user@]host:port/db, rediss:// for TLS, redis+unix:///path.",
        c"Empty disables dispatch. Keep the password in keel.redis_password_file: one in the URL works but is logged at every reload. Per database with ALTER DATABASE ... SET.",
        &REDIS_URL,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"keel.redis_password_file",
        c"A file whose first line is the Redis password (overrides one in keel.redis_url).",
        c"Keeps the secret out of settings others can read and out of the server log. Relative to the data directory; must not be readable by group or others.",
        &REDIS_PASSWORD_FILE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"keel.redis_tls_ca_file",
        c"PEM bundle of the CAs a rediss:// server's certificate must chain to (empty: the system's).",
        c"",
        &REDIS_TLS_CA_FILE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"keel.redis_tls_verify",
        c"Verify a rediss:// server's certificate and host name.",
        c"Turn off for tests only: without verification anyone on the path can read and change the outbox.",
        &REDIS_TLS_VERIFY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"keel.redis_tls_cert_file",
        c"Client certificate (PEM) for rediss:// servers that require one.",
        c"",
        &REDIS_TLS_CERT_FILE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"keel.redis_tls_key_file",
        c"Private key (PEM) of keel.redis_tls_cert_file.",
        c"",
        &REDIS_TLS_KEY_FILE,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"keel.redis_prefix",
        c"Prefix of the Redis key of a topic without a route of its own (the stream <prefix><topic>).",
        c"Per database with ALTER DATABASE ... SET: two databases that dispatch to one Redis with the same prefix are refused.",
        &REDIS_PREFIX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"keel.dispatch_batch_size",
        c"Outbox rows the worker dispatches per batch.",
        c"",
        &DISPATCH_BATCH_SIZE,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"keel.outbox_retention",
        c"How long dispatched outbox events are kept for keel.outbox_replay.",
        c"Redis remembers each dispatched event id as long, so a retried dispatch never appends it twice.",
        &OUTBOX_RETENTION,
        60,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"keel.rate_snapshot_interval",
        c"How often the worker writes the states of memory rate limits to keel.rate_limit_state.",
        c"A crash forgets at most this much of their decisions; a clean shutdown none.",
        &RATE_SNAPSHOT_INTERVAL,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"keel.task_run_retention",
        c"How long keel.task_runs keeps a run of a maintenance task.",
        c"The worker deletes older runs as it records new ones.",
        &TASK_RUN_RETENTION,
        60,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"keel.rate_denial_retention",
        c"How long keel.rate_limit_denials keeps a denial.",
        c"The cleanup_rate_limits task deletes older ones.",
        &RATE_DENIAL_RETENTION,
        60,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"keel.session_touch_interval",
        c"How often keel.session_validate writes a valid session's last_seen_at and slides its idle expiry.",
        c"0 writes on every validation. Between touches a validation is a read only.",
        &SESSION_TOUCH_INTERVAL,
        0,
        86_400,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"keel.session_cleanup_grace",
        c"How long expired and revoked sessions stay in keel.sessions before cleanup_sessions deletes them.",
        c"They are never valid during the grace; it only keeps them for inspection.",
        &SESSION_CLEANUP_GRACE,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_enum_guc(
        c"keel.session_events",
        c"Emit outbox events for sessions: off, on (every revocation) or lifecycle (also creations, logins and expiries).",
        c"on: topic keel.session_revoked, reason revoked, revoked_user, rotated or evicted. lifecycle adds keel.session_created, keel.session_login and keel.session_expired. Sent when the transaction commits; never the token.",
        &SESSION_EVENTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"keel.outbox_max_attempts",
        c"Times Redis may refuse one outbox event (e.g. WRONGTYPE) before it is marked dead.",
        c"Transient refusals (Redis down, OOM, READONLY) do not count.",
        &OUTBOX_MAX_ATTEMPTS,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"keel.max_payload_bytes",
        c"Largest job payload keel.enqueue accepts, in bytes as stored.",
        c"Larger payloads are refused with SQLSTATE 54000; store big blobs elsewhere and enqueue a reference.",
        &MAX_PAYLOAD_BYTES,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"keel.stuck_threshold",
        c"Running jobs claimed longer ago than this are listed in keel.stuck_jobs.",
        c"",
        &STUCK_THRESHOLD,
        GucContext::Userset,
        GucFlags::default(),
    );
    // SAFETY: called once from _PG_init with a NUL-terminated static prefix; it only marks
    // the prefix in the GUC tables of this process.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"keel".as_ptr()) };
}
