//! When to try a failed delivery again: a pure function of the trigger's
//! [`RetryPolicy`], the attempts made so far, the work order's age and the
//! target's `Retry-After`. No I/O and no clock of its own, so the worker decides
//! with its database timestamps and tests decide with fixed ones.

use std::time::Duration;

use chrono::{DateTime, Utc};
use kt_common::backoff::Backoff;
use kt_common::trigger::RetryPolicy;

/// The longest a `Retry-After` may postpone a retry when the policy's
/// `max_backoff_ms` is shorter. A target that answers "come back tomorrow"
/// would otherwise hold its key's whole queue for a day on one header; an hour
/// still leaves room for real maintenance windows and rate-limit resets.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Attempt again after this delay, counted from the `now` passed in.
    RetryAt(Duration),
    /// Retries are exhausted: the work order fails for good.
    GiveUp,
}

/// Decides the next step after `attempts_so_far` failed attempts (the one that
/// just failed included).
///
/// - Gives up once `attempts_so_far >= max_attempts`.
/// - Otherwise waits a jittered exponential backoff: attempt `n` (1-based)
///   waits a random delay in `[c/2, c]` with
///   `c = min(initial_backoff * 2^(n-1), max_backoff)`.
/// - A `Retry-After` from the target is honoured: the delay is never shorter
///   than it, except that it is capped at `max(max_backoff, RETRY_AFTER_CAP)`.
/// - With `max_age_seconds > 0`, gives up when the next attempt would start
///   later than `first_attempt_at + max_age`: an attempt is never started past
///   the deadline, and a retry is not scheduled only to be abandoned.
///   A `now` earlier than `first_attempt_at` (clock skew) counts as age zero.
pub fn next_step(
    policy: &RetryPolicy,
    attempts_so_far: u32,
    first_attempt_at: DateTime<Utc>,
    now: DateTime<Utc>,
    retry_after: Option<Duration>,
) -> RetryDecision {
    let backoff = backoff_for(policy);
    let jittered = backoff.delay(attempts_so_far.saturating_sub(1));
    decide(policy, attempts_so_far, first_attempt_at, now, retry_after, jittered)
}

fn backoff_for(policy: &RetryPolicy) -> Backoff {
    Backoff::new(
        Duration::from_millis(u64::from(policy.initial_backoff_ms)),
        Duration::from_millis(u64::from(policy.max_backoff_ms)),
    )
}

/// [`next_step`] with the jittered backoff already drawn, so the rules can be
/// tested without randomness.
fn decide(
    policy: &RetryPolicy,
    attempts_so_far: u32,
    first_attempt_at: DateTime<Utc>,
    now: DateTime<Utc>,
    retry_after: Option<Duration>,
    jittered_backoff: Duration,
) -> RetryDecision {
    if attempts_so_far >= policy.max_attempts {
        return RetryDecision::GiveUp;
    }

    let cap = Duration::from_millis(u64::from(policy.max_backoff_ms)).max(RETRY_AFTER_CAP);
    let delay = match retry_after {
        Some(asked) => jittered_backoff.max(asked.min(cap)),
        None => jittered_backoff,
    };

    if policy.max_age_seconds > 0 {
        let max_age = Duration::from_secs(u64::from(policy.max_age_seconds));
        // `to_std` fails only for a negative age, i.e. a clock that went back.
        let age = (now - first_attempt_at).to_std().unwrap_or(Duration::ZERO);
        if age.saturating_add(delay) > max_age {
            return RetryDecision::GiveUp;
        }
    }
    RetryDecision::RetryAt(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32, initial_ms: u32, max_ms: u32, max_age_seconds: u32) -> RetryPolicy {
        RetryPolicy { max_attempts, initial_backoff_ms: initial_ms, max_backoff_ms: max_ms, max_age_seconds }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    #[test]
    fn test_gives_up_after_max_attempts() {
        let p = policy(3, 100, 1000, 0);
        assert_eq!(decide(&p, 2, t0(), t0(), None, ms(100)), RetryDecision::RetryAt(ms(100)));
        assert_eq!(decide(&p, 3, t0(), t0(), None, ms(100)), RetryDecision::GiveUp);
        assert_eq!(decide(&p, 9, t0(), t0(), None, ms(100)), RetryDecision::GiveUp);
        assert_eq!(next_step(&p, 3, t0(), t0(), None), RetryDecision::GiveUp);
    }

    #[test]
    fn test_single_attempt_policy_never_retries() {
        let p = policy(1, 100, 1000, 0);
        assert_eq!(next_step(&p, 1, t0(), t0(), None), RetryDecision::GiveUp);
    }

    #[test]
    fn test_backoff_grows_within_jitter_bounds_and_caps() {
        let p = policy(100, 100, 1000, 0);
        // Ceilings for attempts 1..: 100, 200, 400, 800, 1000, 1000, ...
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for (i, ceiling) in ceilings.into_iter().enumerate() {
            let attempts = i as u32 + 1;
            for _ in 0..50 {
                let RetryDecision::RetryAt(d) = next_step(&p, attempts, t0(), t0(), None) else {
                    panic!("attempt {attempts} gave up");
                };
                assert!(d >= ms(ceiling / 2) && d <= ms(ceiling), "attempt {attempts}: {d:?}");
            }
        }
    }

    #[test]
    fn test_huge_attempt_count_does_not_overflow() {
        let p = policy(u32::MAX, 500, 60_000, 0);
        let RetryDecision::RetryAt(d) = next_step(&p, u32::MAX - 1, t0(), t0(), None) else { panic!() };
        assert!(d <= secs(60));
    }

    #[test]
    fn test_retry_after_longer_than_backoff_wins() {
        let p = policy(5, 100, 10_000, 0);
        assert_eq!(decide(&p, 1, t0(), t0(), Some(secs(2)), ms(100)), RetryDecision::RetryAt(secs(2)));
        assert!(matches!(next_step(&p, 1, t0(), t0(), Some(secs(2))), RetryDecision::RetryAt(d) if d == secs(2)));
    }

    #[test]
    fn test_retry_after_shorter_than_backoff_keeps_backoff() {
        let p = policy(5, 100, 10_000, 0);
        assert_eq!(decide(&p, 4, t0(), t0(), Some(ms(10)), ms(800)), RetryDecision::RetryAt(ms(800)));
        assert_eq!(decide(&p, 4, t0(), t0(), Some(Duration::ZERO), ms(800)), RetryDecision::RetryAt(ms(800)));
    }

    #[test]
    fn test_retry_after_is_capped() {
        // Short max backoff: the hour-long cap applies.
        let p = policy(5, 100, 10_000, 0);
        assert_eq!(decide(&p, 1, t0(), t0(), Some(secs(86_400)), ms(100)), RetryDecision::RetryAt(RETRY_AFTER_CAP));
        // A policy that already allows longer waits raises the cap to its own.
        let p = policy(5, 100, 7_200_000, 0);
        assert_eq!(decide(&p, 1, t0(), t0(), Some(secs(86_400)), ms(100)), RetryDecision::RetryAt(secs(7200)));
    }

    #[test]
    fn test_gives_up_when_max_age_is_exceeded() {
        let p = policy(100, 1000, 1000, 60);
        let now = t0() + chrono::Duration::seconds(61);
        assert_eq!(decide(&p, 1, t0(), now, None, ms(1000)), RetryDecision::GiveUp);
    }

    #[test]
    fn test_gives_up_when_next_attempt_would_start_after_max_age() {
        let p = policy(100, 1000, 1000, 60);
        let now = t0() + chrono::Duration::seconds(59);
        assert_eq!(decide(&p, 1, t0(), now, None, ms(1000)), RetryDecision::RetryAt(ms(1000)));
        assert_eq!(decide(&p, 1, t0(), now, None, ms(1001)), RetryDecision::GiveUp);
        // Retry-After pushing the attempt past the deadline gives up as well.
        assert_eq!(decide(&p, 1, t0(), now, Some(secs(5)), ms(1000)), RetryDecision::GiveUp);
    }

    #[test]
    fn test_zero_max_age_means_no_limit() {
        let p = policy(100, 1000, 1000, 0);
        let now = t0() + chrono::Duration::days(365);
        assert_eq!(decide(&p, 1, t0(), now, None, ms(1000)), RetryDecision::RetryAt(ms(1000)));
    }

    #[test]
    fn test_clock_skew_counts_as_zero_age() {
        let p = policy(100, 1000, 1000, 10);
        let now = t0() - chrono::Duration::seconds(30);
        assert_eq!(decide(&p, 1, t0(), now, None, ms(1000)), RetryDecision::RetryAt(ms(1000)));
    }
}
