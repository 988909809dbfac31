//! Rate-limit decisions as pure functions of (limit, key state, now, cost): no Postgres, no
//! clock, no shared memory, so every algorithm is unit-tested against a simple reference model
//! with a fake clock. The SQL functions, the table and the shared-memory table only store the
//! three integers of `State`.
//!
//! Time is in microseconds (PostgreSQL's timestamp resolution). Arithmetic is exact (i128):
//! the token bucket counts time in units of 1/max µs, so an emission interval of per/max is a
//! whole number and no rounding ever lets one more call through. Durations returned to callers
//! are rounded up to the millisecond: a caller that waits `retry_after_ms` is never early.

/// The algorithms of DESIGN.md §3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// GCRA: a theoretical arrival time per key; `burst` calls at once, then max per `per`.
    TokenBucket,
    /// A counter per window aligned to `per` (windows start at multiples of `per`).
    FixedWindow,
    /// Two aligned windows, the previous one weighted by how much of it still overlaps.
    SlidingWindow,
    /// At most `max` slots held at once per key, each until released or `per` (or the
    /// acquire's ttl) has passed: `keel.acquire` / `keel.release` (sql/ratelimit.sql) keep
    /// its slots in `keel.rate_limit_slots`, not in a `State`; `decide` never sees it.
    Concurrency,
}

impl Algorithm {
    pub const NAMES: &'static str =
        "'token_bucket', 'fixed_window', 'sliding_window' or 'concurrency'";

    pub fn parse(name: &str) -> Option<Algorithm> {
        match name {
            "token_bucket" => Some(Algorithm::TokenBucket),
            "fixed_window" => Some(Algorithm::FixedWindow),
            "sliding_window" => Some(Algorithm::SlidingWindow),
            "concurrency" => Some(Algorithm::Concurrency),
            _ => None,
        }
    }

    #[cfg(test)]
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::Concurrency => "concurrency",
        }
    }
}

/// How a policy's decisions are kept (`keel.rate_limits.durability`): `durable`, each
/// decision committed like any write; `async`, committed without waiting for the WAL flush
/// (a crash may forget the last fraction of a second of them); `memory`, in shared memory,
/// written to the table by the worker's snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Durable,
    Async,
    Memory,
}

impl Durability {
    pub const NAMES: &'static str = "'durable', 'async' or 'memory'";

    pub fn parse(name: &str) -> Option<Durability> {
        match name {
            "durable" => Some(Durability::Durable),
            "async" => Some(Durability::Async),
            "memory" => Some(Durability::Memory),
            _ => None,
        }
    }

    #[cfg(test)]
    pub fn name(self) -> &'static str {
        match self {
            Durability::Durable => "durable",
            Durability::Async => "async",
            Durability::Memory => "memory",
        }
    }
}

/// A named policy as stored, and how it wants its decisions committed.
#[derive(Clone)]
pub struct Policy {
    pub limit: Limit,
    pub durability: Durability,
    pub log_denials: bool,
    /// false: shadow mode (every call allowed, would-be denials logged as shadow).
    pub enforce: bool,
}

/// The longest a token bucket may take to refill from empty (`per × burst / max`):
/// `interval '1000 years'` (360,000 days, as Postgres counts a year of intervals).
pub const MAX_REFILL_US: i64 = 360_000 * 86_400_000_000;

/// A limit: `max` units per `per_us`; `burst` is the token bucket's capacity (windows: max).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub algorithm: Algorithm,
    pub max: i64,
    pub per_us: i64,
    pub burst: i64,
}

/// Why a limit or a cost was refused; the SQL layer turns it into 22023 with a hint.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    Max,
    Per,
    Burst,
    Cost,
    /// A token bucket that would take longer than `MAX_REFILL_US` to refill.
    Refill,
    CostAboveCapacity {
        cost: i64,
        capacity: i64,
    },
}

impl Limit {
    /// Checks the numbers; `burst` None means max.
    pub fn new(
        algorithm: Algorithm,
        max: i64,
        per_us: i64,
        burst: Option<i64>,
    ) -> Result<Limit, Invalid> {
        if max < 1 {
            return Err(Invalid::Max);
        }
        if per_us < 1 {
            return Err(Invalid::Per);
        }
        let burst = burst.unwrap_or(max);
        if burst < 1 {
            return Err(Invalid::Burst);
        }
        // A key's state is a time up to one refill ahead of now: bounded, it stays a
        // timestamp that can be stored, dumped and restored.
        if algorithm == Algorithm::TokenBucket
            && i128::from(per_us) * i128::from(burst) / i128::from(max) > i128::from(MAX_REFILL_US)
        {
            return Err(Invalid::Refill);
        }
        Ok(Limit {
            algorithm,
            max,
            per_us,
            burst,
        })
    }

    /// What `remaining` counts against, and the largest cost that can ever be allowed.
    pub fn capacity(&self) -> i64 {
        match self.algorithm {
            Algorithm::TokenBucket => self.burst,
            Algorithm::FixedWindow | Algorithm::SlidingWindow | Algorithm::Concurrency => self.max,
        }
    }

    pub fn check_cost(&self, cost: i64) -> Result<(), Invalid> {
        if cost < 0 {
            Err(Invalid::Cost)
        } else if cost > self.capacity() {
            Err(Invalid::CostAboveCapacity {
                cost,
                capacity: self.capacity(),
            })
        } else {
            Ok(())
        }
    }
}

/// A key's state: three integers whose meaning depends on the algorithm.
/// - token_bucket: `a` = theoretical arrival time in whole µs, `b` = its fraction in 1/max µs;
/// - fixed_window: `a` = start of the window `b` counts;
/// - sliding_window: `a` = start of the window `b` counts, `c` = the count of the window
///   before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub a: i64,
    pub b: i64,
    pub c: i64,
}

/// One decision, as the SQL functions return it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: i64,
    pub remaining: i64,
    /// 0 when allowed; otherwise how long until the same call would be allowed.
    pub retry_after_ms: i64,
    /// How long until the key is back to full capacity (0: it is).
    pub reset_after_ms: i64,
}

fn ceil_div(n: i128, d: i128) -> i128 {
    if n <= 0 {
        0
    } else {
        (n + d - 1) / d
    }
}

fn ms(us: i128) -> i64 {
    i64::try_from(ceil_div(us, 1000)).unwrap_or(i64::MAX)
}

fn clamp(v: i128) -> i64 {
    i64::try_from(v.max(0)).unwrap_or(i64::MAX)
}

/// Decides a call of `cost` at `now_us` for a key in `state` (None: never seen, or forgotten).
/// Returns the decision and the state to keep: the same state when denied (a denied call
/// consumes nothing). `cost` must have passed `Limit::check_cost`.
pub fn decide(limit: &Limit, state: Option<State>, now_us: i64, cost: i64) -> (Decision, State) {
    match limit.algorithm {
        Algorithm::TokenBucket => token_bucket(limit, state, now_us, cost),
        Algorithm::FixedWindow => fixed_window(limit, state, now_us, cost),
        Algorithm::SlidingWindow => sliding_window(limit, state, now_us, cost),
        // The SQL functions refuse a concurrency policy before deciding (42809); were one to
        // get here, it would allow nothing and change nothing.
        Algorithm::Concurrency => (
            Decision {
                allowed: false,
                limit: limit.max,
                remaining: 0,
                retry_after_ms: ms(i128::from(limit.per_us)),
                reset_after_ms: 0,
            },
            state.unwrap_or_default(),
        ),
    }
}

fn token_bucket(limit: &Limit, state: Option<State>, now_us: i64, cost: i64) -> (Decision, State) {
    // Time in units of 1/max µs: the emission interval per/max is then exactly per_us.
    let scale = i128::from(limit.max);
    let interval = i128::from(limit.per_us);
    let tolerance = i128::from(limit.burst) * interval;
    let now = i128::from(now_us) * scale;
    let tat = state
        .map(|s| i128::from(s.a) * scale + i128::from(s.b.clamp(0, limit.max - 1)))
        .unwrap_or(now)
        .max(now);
    let new_tat = tat + i128::from(cost) * interval;
    let to_ms = |t: i128| ms(ceil_div(t, scale));
    if new_tat - now <= tolerance {
        let kept = State {
            a: clamp(new_tat.div_euclid(scale)),
            b: clamp(new_tat.rem_euclid(scale)),
            c: 0,
        };
        let decision = Decision {
            allowed: true,
            limit: limit.burst,
            remaining: clamp((tolerance - (new_tat - now)) / interval),
            retry_after_ms: 0,
            reset_after_ms: to_ms(new_tat - now),
        };
        (decision, kept)
    } else {
        let decision = Decision {
            allowed: false,
            limit: limit.burst,
            remaining: clamp((tolerance - (tat - now)) / interval),
            retry_after_ms: to_ms(new_tat - now - tolerance),
            reset_after_ms: to_ms(tat - now),
        };
        (decision, state.unwrap_or_default())
    }
}

fn window_start(now_us: i64, per_us: i64) -> i64 {
    now_us - now_us.rem_euclid(per_us)
}

fn fixed_window(limit: &Limit, state: Option<State>, now_us: i64, cost: i64) -> (Decision, State) {
    let start = window_start(now_us, limit.per_us);
    let used = match state {
        Some(s) if s.a == start => s.b,
        _ => 0,
    };
    let to_end = ms(i128::from(start) + i128::from(limit.per_us) - i128::from(now_us));
    if used + cost <= limit.max {
        let decision = Decision {
            allowed: true,
            limit: limit.max,
            remaining: limit.max - used - cost,
            retry_after_ms: 0,
            reset_after_ms: if used + cost > 0 { to_end } else { 0 },
        };
        (
            decision,
            State {
                a: start,
                b: used + cost,
                c: 0,
            },
        )
    } else {
        // The next window starts empty and cost <= max, so the call goes through there.
        let decision = Decision {
            allowed: false,
            limit: limit.max,
            remaining: (limit.max - used).max(0),
            retry_after_ms: to_end,
            reset_after_ms: to_end,
        };
        (decision, state.unwrap_or_default())
    }
}

fn sliding_window(
    limit: &Limit,
    state: Option<State>,
    now_us: i64,
    cost: i64,
) -> (Decision, State) {
    let start = window_start(now_us, limit.per_us);
    let (current, previous) = match state {
        Some(s) if s.a == start => (s.b, s.c),
        Some(s) if s.a == start - limit.per_us => (0, s.b),
        _ => (0, 0),
    };
    let per = i128::from(limit.per_us);
    let elapsed = i128::from(now_us - start);
    let (cur, prev, cost_w) = (i128::from(current), i128::from(previous), i128::from(cost));
    // Everything times `per`: estimate = prev * (per - elapsed) / per + cur.
    let capacity = i128::from(limit.max) * per;
    let used = prev * (per - elapsed) + cur * per;
    let start_w = i128::from(start);
    let now = i128::from(now_us);
    // Back to full capacity once both counted windows have slid out.
    let reset = |cur: i128| {
        if cur > 0 {
            ms(start_w + 2 * per - now)
        } else if prev > 0 {
            ms(start_w + per - now)
        } else {
            0
        }
    };
    if used + cost_w * per <= capacity {
        let decision = Decision {
            allowed: true,
            limit: limit.max,
            remaining: clamp((capacity - used - cost_w * per) / per),
            retry_after_ms: 0,
            reset_after_ms: reset(cur + cost_w),
        };
        let kept = State {
            a: start,
            b: current + cost,
            c: previous,
        };
        (decision, kept)
    } else {
        // The first instant the weighted estimate leaves room for `cost`: later in this
        // window (the previous window's weight shrinks), or in the next one (where this
        // window becomes the previous).
        let room = capacity - cost_w * per - cur * per;
        let at = if room >= 0 && prev > 0 && per - room / prev < per {
            start_w + per - room / prev
        } else {
            let room_next = capacity - cost_w * per;
            let wait = if cur > 0 { per - room_next / cur } else { 0 };
            start_w + per + wait.max(0)
        };
        let decision = Decision {
            allowed: false,
            limit: limit.max,
            remaining: clamp((capacity - used) / per),
            retry_after_ms: ms(at - now),
            reset_after_ms: reset(cur),
        };
        (decision, state.unwrap_or_default())
    }
}

/// Gives `amount` units back to a key at `now_us` (a call that did not use what it took):
/// never above full capacity. Windows give back from the current window only.
pub fn refund(limit: &Limit, state: State, now_us: i64, amount: i64) -> State {
    match limit.algorithm {
        Algorithm::TokenBucket => {
            let scale = i128::from(limit.max);
            let now = i128::from(now_us) * scale;
            let tat = i128::from(state.a) * scale + i128::from(state.b.clamp(0, limit.max - 1));
            let back = (tat - i128::from(amount) * i128::from(limit.per_us)).max(now);
            State {
                a: clamp(back.div_euclid(scale)),
                b: clamp(back.rem_euclid(scale)),
                c: 0,
            }
        }
        Algorithm::Concurrency => state,
        Algorithm::FixedWindow | Algorithm::SlidingWindow => {
            if state.a == window_start(now_us, limit.per_us) {
                State {
                    b: (state.b - amount).max(0),
                    ..state
                }
            } else {
                state
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The names Rust parses are the ones the table's CHECK constraints allow, and each
    /// parses back to itself.
    #[test]
    fn choices_match_the_table_constraints() {
        let sql = include_str!("../../sql/ratelimit.sql");
        let allowed = |constraint: &str| -> Vec<String> {
            let at = sql.find(constraint).expect("constraint");
            let list = &sql[at..];
            let list = &list[list.find(" IN (").expect("IN list") + 5..];
            let list = &list[..list.find(')').expect("end of list")];
            list.split(',')
                .map(|n| n.trim().trim_matches('\'').to_string())
                .collect()
        };
        let algorithms = allowed("rate_limits_algorithm_valid");
        for name in &algorithms {
            let a = Algorithm::parse(name).expect("an allowed algorithm parses");
            assert_eq!(a.name(), name);
            assert!(Algorithm::NAMES.contains(&format!("'{name}'")));
        }
        let durabilities = allowed("rate_limits_durability_valid");
        for name in &durabilities {
            let d = Durability::parse(name).expect("an allowed durability parses");
            assert_eq!(d.name(), name);
            assert!(Durability::NAMES.contains(&format!("'{name}'")));
        }
        assert_eq!((algorithms.len(), durabilities.len()), (4, 3));
        assert_eq!(Durability::parse("Memory"), None);
    }

    const SEC: i64 = 1_000_000;
    /// Some instant well after 2000-01-01 (PostgreSQL's epoch), as µs.
    const T0: i64 = 849_000_000 * SEC;

    fn limit(algorithm: Algorithm, max: i64, per_us: i64, burst: Option<i64>) -> Limit {
        Limit::new(algorithm, max, per_us, burst).expect("valid limit")
    }

    /// Runs calls of (µs since T0, cost) and returns each decision.
    fn run(l: &Limit, calls: &[(i64, i64)]) -> Vec<Decision> {
        let mut state = None;
        calls
            .iter()
            .map(|&(at, cost)| {
                let (d, s) = decide(l, state, T0 + at, cost);
                state = Some(s);
                d
            })
            .collect()
    }

    fn allowed(ds: &[Decision]) -> Vec<bool> {
        ds.iter().map(|d| d.allowed).collect()
    }

    #[test]
    fn bad_limits_and_costs_are_refused() {
        let tb = Algorithm::TokenBucket;
        assert_eq!(Limit::new(tb, 0, SEC, None), Err(Invalid::Max));
        assert_eq!(Limit::new(tb, 5, 0, None), Err(Invalid::Per));
        assert_eq!(Limit::new(tb, 5, SEC, Some(0)), Err(Invalid::Burst));
        let year = 365 * 86_400 * SEC;
        assert_eq!(
            Limit::new(tb, 1, 100 * year, Some(11)),
            Err(Invalid::Refill)
        );
        assert!(Limit::new(tb, 2, 100 * year, Some(19)).is_ok());
        assert!(Limit::new(
            Algorithm::FixedWindow,
            1,
            100 * year,
            Some(i64::from(i32::MAX))
        )
        .is_ok());
        let l = limit(tb, 5, SEC, Some(8));
        assert_eq!(l.check_cost(-1), Err(Invalid::Cost));
        assert_eq!(
            l.check_cost(9),
            Err(Invalid::CostAboveCapacity {
                cost: 9,
                capacity: 8
            })
        );
        assert_eq!(l.check_cost(8), Ok(()));
        assert_eq!(Algorithm::parse("leaky"), None);
        for a in [
            tb,
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::Concurrency,
        ] {
            assert_eq!(Algorithm::parse(a.name()), Some(a));
        }
        // A concurrency limit is decided by keel.acquire, never here: were it to get here,
        // it would allow nothing and change nothing.
        let c = limit(Algorithm::Concurrency, 3, SEC, None);
        let state = State { a: 7, b: 8, c: 9 };
        let (d, next) = decide(&c, Some(state), 0, 1);
        assert!(!d.allowed);
        assert_eq!(next, state);
        assert_eq!(c.capacity(), 3);
    }

    #[test]
    fn token_bucket_allows_the_burst_then_refills_at_the_rate() {
        // 3 per second, burst 3: three at once, the fourth waits a third of a second.
        let l = limit(Algorithm::TokenBucket, 3, SEC, None);
        let ds = run(
            &l,
            &[(0, 1), (0, 1), (0, 1), (0, 1), (333_333, 1), (333_334, 1)],
        );
        assert_eq!(allowed(&ds), [true, true, true, false, false, true]);
        assert_eq!(
            ds[0],
            Decision {
                allowed: true,
                limit: 3,
                remaining: 2,
                retry_after_ms: 0,
                reset_after_ms: 334
            }
        );
        assert_eq!(ds[2].remaining, 0);
        assert_eq!(ds[2].reset_after_ms, 1000);
        assert_eq!(ds[3].retry_after_ms, 334, "a third of a second, rounded up");
        assert_eq!(ds[3].remaining, 0);
        assert_eq!(
            ds[4].retry_after_ms, 1,
            "under a microsecond left still rounds up"
        );
    }

    #[test]
    fn token_bucket_denial_consumes_nothing_and_cost_counts() {
        let l = limit(Algorithm::TokenBucket, 10, SEC, None);
        let ds = run(&l, &[(0, 8), (0, 5), (0, 2), (0, 1)]);
        assert_eq!(allowed(&ds), [true, false, true, false]);
        assert_eq!(
            ds[1].remaining, 2,
            "the denied cost-5 call left the 2 in place"
        );
        assert_eq!(ds[1].retry_after_ms, 300);
    }

    #[test]
    fn fixed_window_resets_at_the_boundary() {
        let l = limit(Algorithm::FixedWindow, 2, SEC, None);
        // T0 is a multiple of a second: windows start at T0, T0+1s, ...
        let ds = run(
            &l,
            &[
                (0, 1),
                (400_000, 1),
                (999_999, 1),
                (SEC, 1),
                (SEC, 1),
                (SEC, 1),
            ],
        );
        assert_eq!(allowed(&ds), [true, true, false, true, true, false]);
        assert_eq!(ds[1].reset_after_ms, 600);
        assert_eq!(ds[2].retry_after_ms, 1);
        assert_eq!(ds[2].remaining, 0);
        assert_eq!(ds[5].retry_after_ms, 1000);
    }

    #[test]
    fn sliding_window_weighs_the_previous_window() {
        let l = limit(Algorithm::SlidingWindow, 10, SEC, None);
        let mut calls: Vec<(i64, i64)> = (0..10).map(|_| (100_000, 1)).collect();
        // A quarter into the next window: 10 * 3/4 = 7.5 used, so 2 more fit, not 3.
        calls.extend([(SEC + 250_000, 1), (SEC + 250_000, 1), (SEC + 250_000, 1)]);
        let ds = run(&l, &calls);
        assert!(ds[..10].iter().all(|d| d.allowed));
        assert_eq!(allowed(&ds[10..]), [true, true, false]);
        // 10 * (1 - e) + 2 + 1 <= 10  ⇔  e >= 0.3: at T0 + 1.3 s, 50 ms from now.
        assert_eq!(ds[12].retry_after_ms, 50);
        assert_eq!(
            ds[12].reset_after_ms, 1750,
            "two windows after the current one began"
        );
    }

    #[test]
    fn refund_gives_back_but_never_above_full() {
        for algorithm in [
            Algorithm::TokenBucket,
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
        ] {
            let l = limit(algorithm, 5, SEC, None);
            let (_, s) = decide(&l, None, T0, 4);
            let (d, _) = decide(&l, Some(s), T0, 0);
            assert_eq!(d.remaining, 1, "{algorithm:?}");
            let back = refund(&l, s, T0, 3);
            assert_eq!(
                decide(&l, Some(back), T0, 0).0.remaining,
                4,
                "{algorithm:?}"
            );
            let over = refund(&l, s, T0, 50);
            assert_eq!(
                decide(&l, Some(over), T0, 0).0.remaining,
                5,
                "{algorithm:?}"
            );
        }
    }

    /// Reference models: the plain definitions, written without the stored-state tricks.
    struct Reference {
        l: Limit,
        /// Token bucket: tokens × per_us, and when they were counted.
        tokens: i128,
        at: i64,
        /// Windows: units used per window index.
        windows: HashMap<i64, i64>,
    }

    impl Reference {
        fn new(l: Limit) -> Reference {
            Reference {
                l,
                tokens: i128::from(l.burst) * i128::from(l.per_us),
                at: i64::MIN,
                windows: HashMap::new(),
            }
        }

        fn tokens_at(&self, now: i64) -> i128 {
            let full = i128::from(self.l.burst) * i128::from(self.l.per_us);
            if self.at == i64::MIN {
                return full;
            }
            (self.tokens + i128::from(now - self.at) * i128::from(self.l.max)).min(full)
        }

        /// Would a call of `cost` at `now` be allowed (without taking it)?
        fn allows(&self, now: i64, cost: i64) -> bool {
            let per = self.l.per_us;
            let w = now.div_euclid(per);
            let used = |i: i64| i128::from(*self.windows.get(&i).unwrap_or(&0));
            match self.l.algorithm {
                Algorithm::TokenBucket => self.tokens_at(now) >= i128::from(cost) * i128::from(per),
                Algorithm::FixedWindow => used(w) + i128::from(cost) <= i128::from(self.l.max),
                Algorithm::SlidingWindow => {
                    let e = i128::from(now.rem_euclid(per));
                    let p = i128::from(per);
                    used(w - 1) * (p - e) + (used(w) + i128::from(cost)) * p
                        <= i128::from(self.l.max) * p
                }
                // Not modelled: decide allows nothing for it (see `decide`).
                Algorithm::Concurrency => false,
            }
        }

        fn take(&mut self, now: i64, cost: i64) -> bool {
            if !self.allows(now, cost) {
                return false;
            }
            match self.l.algorithm {
                Algorithm::TokenBucket => {
                    self.tokens =
                        self.tokens_at(now) - i128::from(cost) * i128::from(self.l.per_us);
                    self.at = now;
                }
                _ => {
                    *self
                        .windows
                        .entry(now.div_euclid(self.l.per_us))
                        .or_default() += cost
                }
            }
            true
        }
    }

    /// xorshift64*: a fixed-seed generator, so a failing case is reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> i64 {
            (self.next() % n) as i64
        }
    }

    #[test]
    fn every_algorithm_matches_its_reference_model() {
        let mut rng = Rng(0x6b65_656c);
        for case in 0..600 {
            let algorithm = [
                Algorithm::TokenBucket,
                Algorithm::FixedWindow,
                Algorithm::SlidingWindow,
            ][case % 3];
            let max = 1 + rng.below(20);
            let per_us = [1_000, 7_777, SEC, 3 * SEC, 60 * SEC][rng.below(5) as usize];
            let burst = (rng.below(2) == 0).then(|| 1 + rng.below(30));
            let l = limit(algorithm, max, per_us, burst);
            let mut reference = Reference::new(l);
            let mut state = None;
            let mut now = T0 + rng.below(per_us as u64 * 3);
            for step in 0..200 {
                now += match rng.below(4) {
                    0 => 0,
                    1 => rng.below(per_us as u64 / 10 + 1),
                    2 => rng.below(per_us as u64 + 1),
                    _ => rng.below(1000),
                };
                let cost = rng.below(l.capacity() as u64 + 1).min(rng.below(4));
                let (d, next) = decide(&l, state, now, cost);
                let what = format!("case {case} step {step}: {l:?} at {now} cost {cost}: {d:?}");
                let expected = reference.allows(now, cost);
                assert_eq!(d.allowed, expected, "{what}");
                if d.allowed {
                    assert_eq!(d.retry_after_ms, 0, "{what}");
                } else {
                    assert_eq!(
                        next,
                        state.unwrap_or_default(),
                        "denied keeps state: {what}"
                    );
                    // Allowed once retry_after has passed, and not a millisecond sooner.
                    let then = now + d.retry_after_ms * 1000;
                    assert!(reference.allows(then, cost), "not early: {what}");
                    assert!(
                        !reference.allows(then - 1000, cost),
                        "not a whole ms late: {what}"
                    );
                }
                // Back to full capacity after reset_after: a call of the whole capacity fits.
                let full_at = now + d.reset_after_ms * 1000;
                let mut after = Reference {
                    l,
                    tokens: reference.tokens,
                    at: reference.at,
                    windows: reference.windows.clone(),
                };
                after.take(now, cost);
                assert!(
                    after.allows(full_at, l.capacity()),
                    "full after reset_after: {what}"
                );
                assert!(d.remaining >= 0 && d.remaining <= l.capacity(), "{what}");
                reference.take(now, cost);
                state = Some(next);
            }
        }
    }

    #[test]
    fn remaining_is_what_can_still_be_taken_now() {
        let mut rng = Rng(42);
        for case in 0..300 {
            let algorithm = [
                Algorithm::TokenBucket,
                Algorithm::FixedWindow,
                Algorithm::SlidingWindow,
            ][case % 3];
            let l = limit(algorithm, 1 + rng.below(12), SEC, None);
            let mut state = None;
            let mut now = T0;
            for _ in 0..30 {
                now += rng.below(300_000);
                let (d, next) = decide(&l, state, now, rng.below(2));
                state = Some(next);
                // Exactly `remaining` more cost-1 calls at the same instant are allowed.
                let mut s = state;
                for i in 0..=d.remaining {
                    let (more, after) = decide(&l, s, now, 1);
                    assert_eq!(more.allowed, i < d.remaining, "case {case}: {l:?} {d:?}");
                    s = Some(after);
                }
            }
        }
    }
}
