//! Schedules (periodic jobs): the SQL-facing half. The expressions and their slots are in
//! [`cron`], pure and unit-tested; here they meet PostgreSQL's time zones (the server's own
//! tz database, so a zone means what it means to `AT TIME ZONE`), its timestamps and its
//! errors. The table, the admin functions and `keel.run_schedules`, which the background
//! worker calls every second, are SQL (sql/schedule.sql).

pub mod cron;

use std::ffi::CString;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::error::{raise, shown, sql_literal, KeelError};
use cron::{Spec, Zone};

/// The most slots of one schedule that one round enqueues (catch_up = 'all').
const MAX_SLOTS_PER_ROUND: i32 = 100;
/// A slot later than this when the worker reaches it counts as missed for `catch_up = 'none'`.
const MISSED_AFTER_SECONDS: i64 = 60;
/// Seconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_UNIX: i64 = 946_684_800;
/// The longest time zone name PostgreSQL takes (TZ_STRLEN_MAX).
const MAX_TIMEZONE_BYTES: usize = 255;

pub enum ScheduleError {
    /// A cron expression or `@every` that does not parse (22023).
    InvalidExpression { expression: String, why: String },
    /// A time zone PostgreSQL does not know (22023).
    InvalidTimezone { name: String },
    /// No such schedule (42704).
    UnknownSchedule { name: String },
    /// drop_queue of a queue that schedules still enqueue into (2BP01).
    QueueHasSchedules { queue: String, schedules: String },
}

impl KeelError for ScheduleError {
    fn code(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            ScheduleError::InvalidExpression { .. } | ScheduleError::InvalidTimezone { .. } => {
                ERRCODE_INVALID_PARAMETER_VALUE
            }
            ScheduleError::UnknownSchedule { .. } => ERRCODE_UNDEFINED_OBJECT,
            ScheduleError::QueueHasSchedules { .. } => ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
        }
    }

    fn message(&self) -> String {
        match self {
            ScheduleError::InvalidExpression { expression, why } => {
                format!("invalid schedule {}: {why}", shown(expression))
            }
            ScheduleError::InvalidTimezone { name } => {
                format!(
                    "invalid value for timezone: time zone {} is unknown",
                    shown(name)
                )
            }
            ScheduleError::UnknownSchedule { name } => {
                format!("schedule {} does not exist", shown(name))
            }
            ScheduleError::QueueHasSchedules { queue, schedules } => format!(
                "queue {} is the target of schedules: {schedules}",
                shown(queue)
            ),
        }
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            ScheduleError::InvalidExpression { .. } => "Use five cron fields (minute hour \
                day-of-month month day-of-week, such as '*/15 9-17 * * mon-fri'), a macro \
                (@hourly, @daily, @weekly, @monthly, @yearly) or '@every 5 minutes'. \
                keel.schedule_preview shows the next times of an expression."
                .into(),
            ScheduleError::InvalidTimezone { .. } => {
                "Use a name from pg_timezone_names, such as 'Europe/Berlin' or 'UTC'.".into()
            }
            ScheduleError::UnknownSchedule { name } => format!(
                "The schedules are listed in keel.schedules; create one with \
                 keel.create_schedule({}, queue, cron).",
                sql_literal(name)
            ),
            ScheduleError::QueueHasSchedules { .. } => {
                "Drop them first with keel.drop_schedule(name), or point them at another queue \
                 with keel.alter_schedule(name, queue => ...)."
                    .into()
            }
        })
    }
}

#[pg_extern(volatile, parallel_safe, name = "_schedule_error")]
fn schedule_error(kind: &str, subject: Option<&str>, detail: Option<&str>) {
    let subject = subject.unwrap_or("").to_string();
    let detail = detail.unwrap_or("").to_string();
    raise(&match kind {
        "queue_has_schedules" => ScheduleError::QueueHasSchedules {
            queue: subject,
            schedules: detail,
        },
        "invalid_timezone" => ScheduleError::InvalidTimezone { name: subject },
        _ => ScheduleError::UnknownSchedule { name: subject },
    })
}

/// A PostgreSQL time zone (from the server's tz database, cached by PostgreSQL for the life
/// of the process).
struct PgZone(*const pg_sys::pg_tz);

impl Zone for PgZone {
    fn offset(&self, at: i64) -> Option<i64> {
        let t: pg_sys::pg_time_t = at;
        // SAFETY: `self.0` came from pg_tzset, whose zones live until the process ends;
        // pg_localtime only reads it and `t`, and returns a pointer to a static struct (or
        // NULL when `t` is out of its range), read here at once, before anything else can
        // overwrite it.
        let tm = unsafe { pg_sys::pg_localtime(&t, self.0) };
        if tm.is_null() {
            return None;
        }
        // SAFETY: non-null, so it points at pg_localtime's static result.
        let offset: std::ffi::c_long = unsafe { (*tm).tm_gmtoff };
        // A c_long is 64 bits on every platform PostgreSQL builds pg_keel for here (Linux).
        Some(offset as i64)
    }
}

fn zone(name: Option<&str>) -> PgZone {
    let Some(name) = name else {
        crate::error::invalid_argument("timezone", "must not be NULL")
    };
    let refused = || -> ! {
        raise(&ScheduleError::InvalidTimezone {
            name: name.to_string(),
        })
    };
    if name.is_empty() || name.len() > MAX_TIMEZONE_BYTES {
        refused()
    }
    let Ok(c_name) = CString::new(name) else {
        refused()
    };
    // SAFETY: a NUL-terminated string of at most TZ_STRLEN_MAX bytes; pg_tzset returns NULL
    // for an unknown zone, or a zone cached in TopMemoryContext.
    let tz = unsafe { pg_sys::pg_tzset(c_name.as_ptr()) };
    // SAFETY: non-null, from pg_tzset; pg_tz_acceptable only reads it. Zones with leap
    // seconds are refused, as PostgreSQL's own TimeZone setting refuses them.
    if tz.is_null() || !unsafe { pg_sys::pg_tz_acceptable(tz) } {
        refused()
    }
    PgZone(tz)
}

fn spec(expression: Option<&str>) -> Spec {
    let Some(expression) = expression else {
        crate::error::invalid_argument("cron", "must not be NULL")
    };
    cron::parse(expression).unwrap_or_else(|e| {
        raise(&ScheduleError::InvalidExpression {
            expression: expression.to_string(),
            why: e.0,
        })
    })
}

/// A timestamptz as whole Unix seconds (rounded down); None for ±infinity.
fn unix(t: TimestampWithTimeZone) -> Option<i64> {
    if t.is_infinity() || t.is_neg_infinity() {
        return None;
    }
    let micros: i64 = t.into_inner();
    Some(micros.div_euclid(1_000_000) + PG_EPOCH_UNIX)
}

fn timestamptz(unix: i64) -> Option<TimestampWithTimeZone> {
    let micros = unix.checked_sub(PG_EPOCH_UNIX)?.checked_mul(1_000_000)?;
    crate::pgtime::timestamptz(micros)
}

fn instant(argument: &str, t: Option<TimestampWithTimeZone>) -> i64 {
    t.and_then(unix)
        .unwrap_or_else(|| crate::error::invalid_argument(argument, "must be a finite timestamp"))
}

/// The first slot of `cron` in `timezone` strictly after `after` (NULL when there is none
/// before the year 10000); raises 22023 for a bad expression or zone. create_schedule and
/// alter_schedule check their arguments with it.
#[pg_extern(stable, parallel_safe, name = "_schedule_next")]
fn schedule_next(
    cron: Option<&str>,
    timezone: Option<&str>,
    after: Option<TimestampWithTimeZone>,
) -> Option<TimestampWithTimeZone> {
    let spec = spec(cron);
    let zone = zone(timezone);
    spec.next_after(&zone, instant("after", after))
        .and_then(timestamptz)
}

/// What the worker enqueues for a due schedule: the slots from `next_run_at` up to `now`
/// that `catch_up` keeps (`all`: each, at most `max_slots`; `latest`: the newest; `none`: the
/// newest if it is at most a minute late), and the schedule's next slot after them.
#[pg_extern(stable, parallel_safe, name = "_schedule_due")]
fn schedule_due(
    cron: Option<&str>,
    timezone: Option<&str>,
    catch_up: Option<&str>,
    next_run_at: Option<TimestampWithTimeZone>,
    now: Option<TimestampWithTimeZone>,
    max_slots: Option<i32>,
) -> TableIterator<
    'static,
    (
        name!(slots, Vec<TimestampWithTimeZone>),
        name!(next_run_at, Option<TimestampWithTimeZone>),
    ),
> {
    let spec = spec(cron);
    let zone = zone(timezone);
    let from = instant("next_run_at", next_run_at);
    let now = instant("now", now);
    // At most MAX_SLOTS_PER_ROUND, whatever is asked: the rest go in the next rounds.
    let max = usize::try_from(max_slots.unwrap_or(1).clamp(1, MAX_SLOTS_PER_ROUND)).unwrap_or(1);
    let (slots, next) = match catch_up {
        Some("all") => {
            let mut slots = Vec::new();
            let mut s = Some(from);
            while let Some(slot) = s.filter(|&t| t <= now && slots.len() < max) {
                slots.push(slot);
                s = spec.next_after(&zone, slot);
            }
            (slots, s)
        }
        Some(mode @ ("latest" | "none")) => {
            let newest = spec.latest(&zone, from, now);
            let kept = newest.filter(|&t| mode == "latest" || now - t <= MISSED_AFTER_SECONDS);
            (kept.into_iter().collect(), spec.next_after(&zone, now))
        }
        _ => crate::error::invalid_argument("catch_up", "must be 'latest', 'all' or 'none'"),
    };
    let slots = slots.into_iter().filter_map(timestamptz).collect();
    TableIterator::once((slots, next.and_then(timestamptz)))
}

/// The next `count` times (at most 1000) a schedule expression runs in `timezone` after
/// `after`: to check an expression, and what a daylight-saving change does to it, before
/// creating a schedule.
#[pg_extern(stable, parallel_safe)]
fn schedule_preview(
    cron: Option<&str>,
    timezone: default!(Option<&str>, "'UTC'"),
    count: default!(Option<i32>, 5),
    after: default!(Option<TimestampWithTimeZone>, "now()"),
) -> SetOfIterator<'static, TimestampWithTimeZone> {
    let spec = spec(cron);
    let zone = zone(timezone);
    let count = match count {
        Some(n @ 1..=1000) => n,
        _ => crate::error::invalid_argument("count", "must be from 1 to 1000"),
    };
    let mut t = instant("after", after);
    let mut out = Vec::new();
    for _ in 0..count {
        match spec.next_after(&zone, t) {
            Some(next) => {
                out.extend(timestamptz(next));
                t = next;
            }
            None => break,
        }
    }
    SetOfIterator::new(out)
}

/// Whether this database's catalog has schedules (a library newer than the catalog serves it
/// until `ALTER EXTENSION pg_keel UPDATE`).
const HAS_SCHEDULES: &str = "SELECT to_regprocedure('keel._worker_round()') IS NOT NULL";
const RUN: &str = "SELECT fired, released, error FROM keel._worker_round()";
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '500ms'";

/// The worker's round, every second, in one short transaction: enqueues the due slots of every
/// schedule, then releases (or cancels) the jobs that waited for others. An error that fails a
/// whole step (not one schedule's, which goes to its last_error) is logged at most once a
/// minute.
pub fn run_due() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static LOGGED: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let error = pgrx::bgworkers::BackgroundWorker::transaction(|| {
        Spi::connect_mut(|_| {
            // A client holding a slot's idempotency key (or a queue's lock) makes that
            // schedule's enqueue wait: not for long, so that a SIGTERM (which the worker
            // reads between steps) is obeyed soon. The schedule keeps the slot and says
            // why in last_error; the next round tries again.
            if let Err(e) = Spi::run(LOCK_TIMEOUT) {
                return Some(e.to_string());
            }
            let exists = crate::spi_plans::execute(HAS_SCHEDULES, &[]);
            if !exists.get::<bool>(0, 1).unwrap_or(false) {
                return None;
            }
            crate::spi_plans::execute(RUN, &[]).get::<String>(0, 3)
        })
    });
    if let Some(error) = error {
        let quiet = LOGGED
            .get()
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        if !quiet {
            LOGGED.set(Some(Instant::now()));
            warning!("pg_keel worker: {error}");
        }
    }
}
