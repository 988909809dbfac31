//! Retry backoff: `retry_backoff * 2^(attempt-1)`, capped at `retry_backoff_max`, with jitter.
//!
//! Jitter takes up to a quarter off the nominal delay, so the result lies in
//! `(0.75 * nominal, nominal]`: it never exceeds the cap and never collapses to zero, and
//! jobs that failed together do not all come back in the same instant. The jitter is a hash
//! of a seed (the job id) and the attempt, so the function is pure and repeatable.

/// Delay before the next attempt, in microseconds.
pub fn retry_delay_micros(base: i64, cap: i64, attempt: i32, seed: u64) -> i64 {
    let base = base.max(1);
    let cap = cap.max(base);
    let doublings = attempt.saturating_sub(1).clamp(0, 62) as u32;
    let nominal = base.saturating_mul(1i64 << doublings.min(62)).min(cap);
    let fraction = unit_interval(seed ^ (attempt as u64).rotate_left(32));
    let jitter = ((nominal / 4) as f64 * fraction) as i64;
    nominal - jitter
}

/// A uniform value in [0, 1) from a 64-bit seed (splitmix64 finaliser).
fn unit_interval(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000;

    fn nominal(base: i64, cap: i64, attempt: i32) -> i64 {
        (base as i128 * 2i128.pow((attempt - 1) as u32)).min(cap as i128) as i64
    }

    #[test]
    fn doubles_per_attempt_within_a_quarter_of_jitter() {
        for seed in 0..200u64 {
            for attempt in 1..=8 {
                let d = retry_delay_micros(SEC, 3600 * SEC, attempt, seed);
                let n = nominal(SEC, 3600 * SEC, attempt);
                assert!(d <= n && d > n - n / 4 - 1, "attempt {attempt}: {d} vs {n}");
            }
        }
    }

    #[test]
    fn never_exceeds_the_cap_even_for_huge_attempts() {
        for attempt in [11, 30, 62, 63, 1000, i32::MAX] {
            let d = retry_delay_micros(SEC, 600 * SEC, attempt, 42);
            assert!(d <= 600 * SEC && d > 450 * SEC, "{attempt}: {d}");
        }
    }

    #[test]
    fn odd_inputs_stay_sane() {
        // attempt 0 or negative behaves like the first attempt; a cap below base is base.
        assert!(retry_delay_micros(SEC, SEC, 0, 1) <= SEC);
        assert!(retry_delay_micros(SEC, SEC, -5, 1) > 0);
        assert!(retry_delay_micros(10 * SEC, SEC, 3, 1) <= 10 * SEC);
        assert!(retry_delay_micros(0, 0, 1, 1) >= 1);
        assert!(retry_delay_micros(i64::MAX, i64::MAX, 5, 1) > 0);
    }

    #[test]
    fn jitter_spreads_jobs_that_failed_together() {
        let delays: std::collections::HashSet<i64> = (0..100)
            .map(|job| retry_delay_micros(SEC, 600 * SEC, 3, job))
            .collect();
        assert!(delays.len() > 90, "only {} distinct delays", delays.len());
        assert_eq!(
            retry_delay_micros(SEC, 600 * SEC, 3, 7),
            retry_delay_micros(SEC, 600 * SEC, 3, 7)
        );
    }
}
