//! The clock of this backend's last rate-limit decision: a rate-limited claim
//! (`keel._claim_flow`) stamps each job's claimed_at with the time it was charged, so that a
//! window of the policy and the jobs' claimed_at count the same claims. Table and memory
//! decisions both note it here.

thread_local! {
    /// The clock of this backend's last decision (µs), for `keel._last_decision_at`.
    static LAST_DECISION: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// Notes the clock a decision is taken at.
pub fn deciding_at(now: i64) -> i64 {
    LAST_DECISION.set(now);
    now
}

/// The clock of this backend's last decision (0 before any).
pub fn last_decision() -> i64 {
    LAST_DECISION.get()
}
