//! Schedule expressions and their slots, with no PostgreSQL in sight so that every rule is
//! unit-tested: standard 5-field cron (`minute hour day-of-month month day-of-week`, with
//! lists, ranges, steps and month and day names), the `@hourly`-style macros, and
//! `@every <duration>`.
//!
//! Cron fields are matched against the wall-clock time of a time zone, which the caller
//! supplies as a [`Zone`] (its UTC offset at an instant). How wall-clock times map to instants
//! is where daylight-saving changes are decided, as Vixie cron decides them for jobs at fixed
//! times:
//! - a wall-clock time that a spring-forward change skips runs at the change (02:30 runs at
//!   the instant 02:00 became 03:00), once however many slots the gap held;
//! - a wall-clock time that a fall-back change repeats runs once, at its first occurrence.
//!
//! `@every` slots are whole multiples of the period since 1970-01-01 00:00 UTC: elapsed time,
//! not wall-clock time, so the zone plays no part.

use std::fmt;

/// The longest expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 256;
/// The shortest and longest `@every` periods, in seconds.
pub const MIN_EVERY_SECONDS: i64 = 1;
pub const MAX_EVERY_SECONDS: i64 = 366 * 86_400;
/// Slots are searched up to the end of this year.
const LAST_YEAR: i32 = 9999;

/// A parsed schedule expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Cron(Cron),
    Every { seconds: i64 },
}

/// The five cron fields as sets (bit n set: value n matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// The day-of-month and day-of-week fields started with `*`. When neither did, a day
    /// matches if either field does (cron's rule); otherwise both must.
    days_star: bool,
    weekdays_star: bool,
}

/// Why an expression was refused, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronError(pub String);

impl fmt::Display for CronError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse<T>(why: impl Into<String>) -> Result<T, CronError> {
    Err(CronError(why.into()))
}

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ],
    },
    // 7 is Sunday too.
    Field {
        name: "day of week",
        min: 0,
        max: 7,
        names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    },
];

/// Parses an expression: five fields, a macro, or `@every <duration>`.
pub fn parse(text: &str) -> Result<Spec, CronError> {
    if text.len() > MAX_EXPRESSION_BYTES {
        return refuse(format!(
            "it is {} bytes long, the limit is {MAX_EXPRESSION_BYTES}",
            text.len()
        ));
    }
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('@') {
        let (word, arg) = match rest.split_once(char::is_whitespace) {
            Some((w, a)) => (w, a.trim()),
            None => (rest, ""),
        };
        let word = word.to_ascii_lowercase();
        if word == "every" {
            return Ok(Spec::Every {
                seconds: parse_duration(arg)?,
            });
        }
        let fields = match word.as_str() {
            "yearly" | "annually" => "0 0 1 1 *",
            "monthly" => "0 0 1 * *",
            "weekly" => "0 0 * * 0",
            "daily" | "midnight" => "0 0 * * *",
            "hourly" => "0 * * * *",
            _ => {
                return refuse(format!(
                    "unknown macro @{word}; use @yearly, @monthly, @weekly, @daily, @hourly or \
                     @every <duration>"
                ))
            }
        };
        if !arg.is_empty() {
            return refuse(format!("@{word} takes nothing after it"));
        }
        return parse_fields(fields);
    }
    parse_fields(text)
}

fn parse_fields(text: &str) -> Result<Spec, CronError> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    if parts.len() != 5 {
        return refuse(format!(
            "it has {} fields; cron takes 5: minute hour day-of-month month day-of-week",
            parts.len()
        ));
    }
    let mut sets = [0u64; 5];
    for (i, (part, field)) in parts.iter().zip(FIELDS.iter()).enumerate() {
        sets[i] = parse_field(part, field)?;
    }
    // Sunday is 0 and 7.
    let weekdays = (sets[4] | (sets[4] >> 7)) & 0x7f;
    let cron = Cron {
        minutes: sets[0],
        hours: sets[1] as u32,
        days: sets[2] as u32,
        months: sets[3] as u16,
        weekdays: weekdays as u8,
        days_star: parts[2].starts_with('*'),
        weekdays_star: parts[4].starts_with('*'),
    };
    // A day of month that no chosen month has (February 30) would never run.
    if cron.weekdays_star && !cron.days_star {
        let possible = (1..=12u32)
            .filter(|m| cron.months & (1 << m) != 0)
            .any(|m| (1..=max_days(m)).any(|d| cron.days & (1 << d) != 0));
        if !possible {
            return refuse("no chosen month has the chosen days of month, so it would never run");
        }
    }
    Ok(Spec::Cron(cron))
}

fn parse_field(text: &str, field: &Field) -> Result<u64, CronError> {
    let mut set = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        let (lo, hi) = if range == "*" {
            (field.min, field.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a, field)?, value(b, field)?);
            if a > b {
                return refuse(format!("{}: the range {range} runs backwards", field.name));
            }
            (a, b)
        } else {
            let v = value(range, field)?;
            // "5/15" is 5 to the end in steps of 15, as in Vixie cron.
            (v, if step.is_some() { field.max } else { v })
        };
        let step = match step {
            None => 1,
            Some(s) => match number(s) {
                Some(n) if n >= 1 && n <= field.max - field.min => n,
                Some(n) if n >= 1 => {
                    return refuse(format!(
                        "{}: the step {n} is larger than the field's range {}-{}",
                        field.name, field.min, field.max
                    ))
                }
                _ => {
                    return refuse(format!(
                        "{}: the step {s:?} is not a positive whole number",
                        field.name
                    ))
                }
            },
        };
        let mut v = lo;
        while v <= hi {
            set |= 1 << v;
            v = v.saturating_add(step);
        }
    }
    Ok(set)
}

/// A number of at most 4 digits.
fn number(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > 4 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn value(text: &str, field: &Field) -> Result<u32, CronError> {
    let lower = text.to_ascii_lowercase();
    if let Some(i) = field.names.iter().position(|n| *n == lower) {
        return Ok(i as u32 + if field.name == "month" { 1 } else { 0 });
    }
    match number(text) {
        Some(n) if (field.min..=field.max).contains(&n) => Ok(n),
        Some(n) => refuse(format!(
            "{}: {n} is outside {}-{}",
            field.name, field.min, field.max
        )),
        None if text.is_empty() => refuse(format!("{}: a value is missing", field.name)),
        None => refuse(format!("{}: {text:?} is not a value", field.name)),
    }
}

/// `30 seconds`, `5m`, `1h 30m`, `2 days`: whole numbers with units, added up.
fn parse_duration(text: &str) -> Result<i64, CronError> {
    if text.is_empty() {
        return refuse("@every needs a duration, such as @every 5 minutes");
    }
    let mut total: i64 = 0;
    let mut rest = text.trim();
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return refuse(format!(
                "@every {text:?}: expected a whole number at {rest:?}"
            ));
        }
        let n: i64 = rest[..digits].parse().unwrap_or(i64::MAX);
        rest = rest[digits..].trim_start();
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = rest[..letters].to_ascii_lowercase();
        rest = rest[letters..].trim_start();
        let seconds = match unit.as_str() {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            _ => {
                return refuse(format!(
                    "@every {text:?}: unknown unit {unit:?}; use seconds, minutes, hours or days"
                ))
            }
        };
        total = total.saturating_add(n.saturating_mul(seconds));
    }
    if !(MIN_EVERY_SECONDS..=MAX_EVERY_SECONDS).contains(&total) {
        return refuse(format!(
            "@every {text:?}: the period must be from 1 second to 366 days"
        ));
    }
    Ok(total)
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn max_days(month: u32) -> u32 {
    match month {
        2 => 29,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn days_in(y: i32, month: u32) -> u32 {
    if month == 2 && !is_leap(y) {
        28
    } else {
        max_days(month)
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number since 1970-01-01.
fn civil_from_days(z: i64) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
}

/// A wall-clock minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Minute {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
}

impl Minute {
    /// The wall-clock minute of `seconds` (a wall-clock time counted like Unix time).
    pub fn of(seconds: i64) -> Minute {
        let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
        let secs = seconds.rem_euclid(86_400);
        Minute {
            year,
            month,
            day,
            hour: (secs / 3600) as u32,
            minute: (secs % 3600 / 60) as u32,
        }
    }

    /// This wall-clock minute counted like Unix time.
    pub fn seconds(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
    }

    fn weekday(&self) -> u32 {
        // 1970-01-01 was a Thursday (4).
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u32
    }

    fn next_month(&mut self) {
        *self = Minute {
            year: self.year + i32::from(self.month == 12),
            month: self.month % 12 + 1,
            day: 1,
            hour: 0,
            minute: 0,
        };
    }

    fn next_day(&mut self) {
        if self.day >= days_in(self.year, self.month) {
            self.next_month();
        } else {
            *self = Minute {
                day: self.day + 1,
                hour: 0,
                minute: 0,
                ..*self
            };
        }
    }

    fn next_hour(&mut self) {
        if self.hour == 23 {
            self.next_day();
        } else {
            self.hour += 1;
            self.minute = 0;
        }
    }

    fn next_minute(&mut self) {
        if self.minute == 59 {
            self.next_hour();
        } else {
            self.minute += 1;
        }
    }
}

impl Cron {
    fn day_matches(&self, m: &Minute) -> bool {
        let by_day = self.days & (1 << m.day) != 0;
        let by_weekday = self.weekdays & (1 << m.weekday()) != 0;
        if self.days_star || self.weekdays_star {
            by_day && by_weekday
        } else {
            by_day || by_weekday
        }
    }

    /// The first matching wall-clock minute after `after`.
    pub fn next_minute(&self, after: Minute) -> Option<Minute> {
        let mut m = after;
        m.next_minute();
        // Each step moves to the next minute, hour, day or month; a valid expression matches
        // within 8 years (29 February), far fewer steps than this.
        for _ in 0..100_000 {
            if m.year > LAST_YEAR {
                return None;
            }
            if self.months & (1 << m.month) == 0 {
                m.next_month();
            } else if !self.day_matches(&m) {
                m.next_day();
            } else if self.hours & (1 << m.hour) == 0 {
                m.next_hour();
            } else if self.minutes & (1 << m.minute) == 0 {
                m.next_minute();
            } else {
                return Some(m);
            }
        }
        None
    }
}

/// A time zone: its offset from UTC, in seconds, at a Unix time (None outside its range).
pub trait Zone {
    fn offset(&self, at: i64) -> Option<i64>;

    /// The wall-clock time at `at`, counted like Unix time.
    fn wall(&self, at: i64) -> Option<i64> {
        Some(at + self.offset(at)?)
    }
}

/// The instant a wall-clock minute runs at: its first occurrence, or, when a spring-forward
/// change skipped it, the instant of the change.
pub fn instant_of(zone: &impl Zone, wall: Minute) -> Option<i64> {
    let n = wall.seconds();
    // The offsets around it: a change of offset is never closer than a day to another.
    let mut candidates: Vec<i64> = [n - 86_400, n, n + 86_400]
        .iter()
        .filter_map(|&t| zone.offset(t))
        .map(|off| n - off)
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    if let Some(&first) = candidates.iter().find(|&&x| zone.wall(x) == Some(n)) {
        return Some(first);
    }
    // Skipped: the first instant whose wall-clock time is past it is the change.
    let (mut lo, mut hi) = (*candidates.first()?, *candidates.last()?);
    if zone.wall(lo)? >= n || zone.wall(hi)? <= n {
        return Some(hi);
    }
    // Invariant: wall(lo) < n < wall(hi).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if zone.wall(mid)? > n {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

impl Spec {
    /// The first slot strictly after `after` (Unix seconds); None past the year 9999.
    pub fn next_after(&self, zone: &impl Zone, after: i64) -> Option<i64> {
        match self {
            Spec::Every { seconds } => after
                .div_euclid(*seconds)
                .checked_add(1)?
                .checked_mul(*seconds)
                .filter(|&t| Minute::of(t).year <= LAST_YEAR),
            Spec::Cron(cron) => {
                let mut wall = Minute::of(zone.wall(after)?);
                // Wall-clock minutes that map to `after` or earlier (the repeated hour of a
                // fall-back, the minutes of a gap after its first) are passed over.
                for _ in 0..10_000 {
                    wall = cron.next_minute(wall)?;
                    let at = instant_of(zone, wall)?;
                    if at > after {
                        // The limit is on the instant too: a zone west of UTC puts a wall-clock
                        // time of 9999-12-31 in the year 10000.
                        return Some(at).filter(|&t| Minute::of(t).year <= LAST_YEAR);
                    }
                }
                None
            }
        }
    }

    /// The newest slot at or before `now` and at or after `from` (None when none is).
    pub fn latest(&self, zone: &impl Zone, from: i64, now: i64) -> Option<i64> {
        if from > now {
            return None;
        }
        // Look back over a window that doubles until it holds a slot, then walk it forward.
        let mut window: i64 = 3600;
        loop {
            let start = (now - window).max(from);
            if let Some(mut slot) = self.next_after(zone, start - 1).filter(|&s| s <= now) {
                // At most the slots of one window: the window doubled only while it held none.
                while let Some(next) = self.next_after(zone, slot).filter(|&n| n <= now) {
                    slot = next;
                }
                return Some(slot);
            }
            if start == from {
                return None;
            }
            window = window.saturating_mul(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(i64);
    impl Zone for Fixed {
        fn offset(&self, _: i64) -> Option<i64> {
            Some(self.0)
        }
    }

    /// Central European time in 2026: +1, +2 from 2026-03-29 01:00 UTC to 2026-10-25 01:00 UTC.
    struct Berlin;
    const SPRING: i64 = 1_774_746_000; // 2026-03-29T01:00:00Z
    const AUTUMN: i64 = 1_792_890_000; // 2026-10-25T01:00:00Z
    impl Zone for Berlin {
        fn offset(&self, at: i64) -> Option<i64> {
            Some(if (SPRING..AUTUMN).contains(&at) {
                7200
            } else {
                3600
            })
        }
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        Minute {
            year: y,
            month: mo,
            day: d,
            hour: h,
            minute: mi,
        }
        .seconds()
    }

    fn cron(text: &str) -> Spec {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn slots(spec: &Spec, zone: &impl Zone, after: i64, n: usize) -> Vec<i64> {
        let mut out = Vec::new();
        let mut t = after;
        for _ in 0..n {
            t = spec.next_after(zone, t).expect("a next slot");
            out.push(t);
        }
        out
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(utc(2026, 3, 29, 1, 0), SPRING);
        assert_eq!(utc(2026, 10, 25, 1, 0), AUTUMN);
        for z in (-800_000..3_000_000).step_by(97) {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        // 2026-12-07 is a Monday.
        assert_eq!(Minute::of(utc(2026, 12, 7, 0, 0)).weekday(), 1);
        assert_eq!(Minute::of(utc(2000, 2, 29, 23, 59)).minute, 59);
    }

    #[test]
    fn fields_lists_ranges_steps_and_names() {
        let Spec::Cron(c) = cron("*/15 9-17 * jan,JUL mon-fri") else {
            panic!()
        };
        assert_eq!(c.minutes, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        assert_eq!(c.hours, 0b11_1111_1110_0000_0000);
        assert_eq!(c.months, 1 << 1 | 1 << 7);
        assert_eq!(c.weekdays, 0b011_1110);
        let Spec::Cron(c) = cron("5/20 0 1,15 * 7") else {
            panic!()
        };
        assert_eq!(c.minutes, 1 << 5 | 1 << 25 | 1 << 45);
        assert_eq!(c.weekdays, 1, "7 is Sunday");
        assert_eq!(cron("@daily"), cron("0 0 * * *"));
        assert_eq!(cron("@midnight"), cron("0 0 * * *"));
        assert_eq!(cron("@hourly"), cron("0 * * * *"));
        assert_eq!(cron("@weekly"), cron("0 0 * * sun"));
        assert_eq!(cron("@monthly"), cron("0 0 1 * *"));
        assert_eq!(cron("@annually"), cron("@yearly"));
        assert_eq!(cron("  0  0 * *  *  "), cron("0 0 * * *"));
    }

    #[test]
    fn every_durations() {
        let every = |t: &str| match parse(t) {
            Ok(Spec::Every { seconds }) => seconds,
            other => panic!("{t}: {other:?}"),
        };
        assert_eq!(every("@every 30 seconds"), 30);
        assert_eq!(every("@every 5m"), 300);
        assert_eq!(every("@every 1h30m"), 5400);
        assert_eq!(every("@every 1 hour 30 minutes"), 5400);
        assert_eq!(every("@EVERY 2 Days"), 172_800);
        assert_eq!(every("@every 366 days"), MAX_EVERY_SECONDS);
    }

    #[test]
    fn refuses_what_cron_refuses_with_a_reason() {
        for (text, why) in [
            ("", "0 fields"),
            ("* * * *", "4 fields"),
            ("* * * * * *", "6 fields"),
            ("60 * * * *", "minute: 60 is outside 0-59"),
            ("* 24 * * *", "hour: 24"),
            ("* * 0 * *", "day of month: 0"),
            ("* * * 13 *", "month: 13"),
            ("* * * * 8", "day of week: 8"),
            ("5-1 * * * *", "runs backwards"),
            ("*/0 * * * *", "step \"0\""),
            ("*/x * * * *", "step \"x\""),
            ("*/60 * * * *", "step 60 is larger"),
            ("0 0 * * */8", "step 8 is larger"),
            ("a * * * *", "\"a\" is not a value"),
            ("1,,2 * * * *", "a value is missing"),
            ("99999 * * * *", "is not a value"),
            ("0 0 30 2 *", "never run"),
            ("0 0 31 apr,jun *", "never run"),
            ("@reboot", "unknown macro @reboot"),
            ("@daily 5", "takes nothing"),
            ("@every", "needs a duration"),
            ("@every 0s", "from 1 second"),
            ("@every 367 days", "from 1 second"),
            ("@every 5 weeks", "unknown unit"),
            ("@every 1.5h", "unknown unit"),
            ("@every 9999999999s", "whole number"),
            ("@every -5s", "whole number"),
            ("? * * * *", "not a value"),
        ] {
            match parse(text) {
                Err(e) => assert!(e.0.contains(why), "{text:?}: {e} lacks {why:?}"),
                Ok(s) => panic!("{text:?} parsed as {s:?}"),
            }
        }
        assert!(parse(&"*".repeat(300))
            .unwrap_err()
            .0
            .contains("limit is 256"));
        // 30 February never, but 30 of any month with February also chosen does.
        assert!(parse("0 0 30 1,2 *").is_ok());
        // Either day field: the 30th or any Monday, February included.
        assert!(parse("0 0 30 2 mon").is_ok());
    }

    #[test]
    fn next_slots_in_utc() {
        let z = Fixed(0);
        let t = utc(2026, 12, 7, 15, 31);
        assert_eq!(
            slots(&cron("*/15 * * * *"), &z, t, 3),
            vec![
                utc(2026, 12, 7, 15, 45),
                utc(2026, 12, 7, 16, 0),
                utc(2026, 12, 7, 16, 15)
            ]
        );
        // Strictly after: a slot time itself gives the next one.
        assert_eq!(
            cron("0 * * * *").next_after(&z, utc(2026, 12, 7, 16, 0)),
            Some(utc(2026, 12, 7, 17, 0))
        );
        // Month end, year end, leap day.
        assert_eq!(
            slots(&cron("0 12 31 * *"), &z, t, 2),
            vec![utc(2026, 12, 31, 12, 0), utc(2027, 1, 31, 12, 0)]
        );
        assert_eq!(
            slots(&cron("0 0 29 2 *"), &z, t, 2),
            vec![utc(2028, 2, 29, 0, 0), utc(2032, 2, 29, 0, 0)]
        );
        // Weekdays: Monday 2026-12-07 at 09:00 is past, so Tuesday.
        assert_eq!(
            slots(&cron("0 9 * * mon-fri"), &z, t, 5),
            vec![
                utc(2026, 12, 8, 9, 0),
                utc(2026, 12, 9, 9, 0),
                utc(2026, 12, 10, 9, 0),
                utc(2026, 12, 11, 9, 0),
                utc(2026, 12, 14, 9, 0)
            ]
        );
        // Both day fields restricted: the 1st or any Sunday.
        assert_eq!(
            slots(&cron("0 0 1 * sun"), &z, t, 3),
            vec![
                utc(2026, 12, 13, 0, 0),
                utc(2026, 12, 20, 0, 0),
                utc(2026, 12, 27, 0, 0)
            ]
        );
        assert_eq!(
            cron("0 0 1 * sun").next_after(&z, utc(2026, 12, 27, 0, 0)),
            Some(utc(2027, 1, 1, 0, 0))
        );
        // Day of week with a star-started step is still "both must match".
        assert_eq!(
            cron("0 0 1 * */3").next_after(&z, t),
            Some(utc(2027, 5, 1, 0, 0)), // the first 1st that is a Sunday, Wednesday or Saturday
        );
        // A fixed offset shifts the wall clock: 09:00 at +05:30 is 03:30 UTC.
        assert_eq!(
            cron("0 9 * * *").next_after(&Fixed(19_800), t),
            Some(utc(2026, 12, 8, 3, 30))
        );
        // Nothing past 9999, in UTC: 23:59 on 9999-12-31 at -12:00 is in the year 10000.
        assert_eq!(
            cron("0 0 1 1 *").next_after(&z, utc(9999, 6, 1, 0, 0)),
            None
        );
        assert_eq!(
            cron("59 23 31 12 *").next_after(&Fixed(-43_200), utc(9999, 6, 1, 0, 0)),
            None
        );
    }

    #[test]
    fn every_is_elapsed_time_since_the_epoch() {
        let s = cron("@every 7 minutes");
        let t = utc(2026, 12, 7, 15, 31) + 17;
        let next = s.next_after(&Berlin, t).unwrap();
        assert_eq!(next % 420, 0);
        assert!(next > t && next - t <= 420);
        assert_eq!(s.next_after(&Fixed(3600), t), Some(next), "no zone");
        assert_eq!(s.next_after(&Berlin, next), Some(next + 420));
        assert_eq!(cron("@every 1s").next_after(&Berlin, -5), Some(-4));
    }

    #[test]
    fn spring_forward_runs_skipped_times_once_at_the_change() {
        // 02:00 local became 03:00 at SPRING (01:00 UTC).
        let daily = cron("30 2 * * *");
        let before = utc(2026, 3, 28, 12, 0);
        assert_eq!(
            slots(&daily, &Berlin, before, 2),
            vec![SPRING, utc(2026, 3, 30, 0, 30)]
        );
        // Every 15 minutes: 01:45 CET, then one run at the change for 02:00-02:45 and 03:00
        // alike, then 03:15 CEST.
        let quarter = cron("*/15 * * * *");
        assert_eq!(
            slots(&quarter, &Berlin, utc(2026, 3, 29, 0, 30), 3),
            vec![utc(2026, 3, 29, 0, 45), SPRING, SPRING + 900]
        );
    }

    #[test]
    fn fall_back_runs_repeated_times_once() {
        // 03:00 CEST became 02:00 CET at AUTUMN (01:00 UTC): 02:00-02:59 happen twice.
        let daily = cron("30 2 * * *");
        assert_eq!(
            slots(&daily, &Berlin, utc(2026, 10, 24, 12, 0), 2),
            vec![utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
        );
        // Hourly: 02:00 CEST (00:00 UTC), not again at 02:00 CET; then 03:00 CET (02:00 UTC).
        let hourly = cron("0 * * * *");
        assert_eq!(
            slots(&hourly, &Berlin, utc(2026, 10, 24, 23, 30), 3),
            vec![
                utc(2026, 10, 25, 0, 0),
                utc(2026, 10, 25, 2, 0),
                utc(2026, 10, 25, 3, 0)
            ]
        );
        // Asked from inside the repeated hour, the next slot is after the repetition.
        assert_eq!(
            hourly.next_after(&Berlin, utc(2026, 10, 25, 1, 10)),
            Some(utc(2026, 10, 25, 2, 0))
        );
    }

    #[test]
    fn latest_slot_at_or_before_now() {
        let z = Fixed(0);
        let minutely = cron("* * * * *");
        let now = utc(2026, 12, 7, 15, 31) + 30;
        assert_eq!(
            minutely.latest(&z, utc(2026, 1, 1, 0, 0), now),
            Some(utc(2026, 12, 7, 15, 31))
        );
        // From a slot a year back, a monthly schedule's newest.
        assert_eq!(
            cron("0 0 1 * *").latest(&z, utc(2025, 12, 1, 0, 0), now),
            Some(utc(2026, 12, 1, 0, 0))
        );
        // `from` itself counts; nothing before it does.
        assert_eq!(
            cron("0 0 1 1 *").latest(&z, utc(2026, 1, 1, 0, 0), now),
            Some(utc(2026, 1, 1, 0, 0))
        );
        assert_eq!(
            cron("0 0 1 1 *").latest(&z, utc(2026, 1, 1, 0, 1), now),
            None
        );
        assert_eq!(minutely.latest(&z, now + 1, now), None);
        assert_eq!(cron("@every 1s").latest(&z, 0, now), Some(now));
    }
}
