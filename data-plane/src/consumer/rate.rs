//! The per-trigger ingest rate limit. It never drops a message: when the
//! budget is spent it says until when consumption must pause.

use std::time::Duration;

use tokio::time::Instant;

/// A GCRA limiter: `rate` messages per second, with bursts of up to one
/// second's worth.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    burst: Duration,
    /// Theoretical arrival time of the next message.
    tat: Instant,
}

impl RateLimiter {
    /// `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, now: Instant) -> Option<Self> {
        (per_second > 0).then(|| Self {
            interval: Duration::from_secs(1) / per_second,
            burst: Duration::from_secs(1),
            tat: now,
        })
    }

    /// Accounts one received message. Returns the instant until which
    /// consumption should pause, if the budget is exhausted.
    pub fn on_message(&mut self, now: Instant) -> Option<Instant> {
        self.tat = self.tat.max(now) + self.interval;
        let allowed_until = now + self.burst;
        (self.tat > allowed_until).then(|| self.tat - self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rate_limit_allows_a_burst_then_paces_messages() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(10, start).unwrap();
        // One second's worth goes through at once.
        for _ in 0..10 {
            assert_eq!(limiter.on_message(start), None);
        }
        // The 11th must wait 100 ms.
        let until = limiter.on_message(start).expect("throttled");
        assert_eq!(until - start, Duration::from_millis(100));
        // After waiting, one more per 100 ms.
        let later = start + Duration::from_millis(200);
        assert_eq!(limiter.on_message(later), None);
        assert!(limiter.on_message(later).is_some());
    }

    #[test]
    fn test_zero_rate_means_no_limit() {
        assert!(RateLimiter::new(0, Instant::now()).is_none());
    }
}
