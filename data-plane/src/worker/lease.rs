//! Claim leases as a worker sees them. A granted set's claim lasts the
//! lease the grant names; the engine renews a claim a third of a lease
//! after it was granted or last renewed, every claim due about then in one
//! statement ([`kt_common::dispatch::lease::renew`]), and counts each lease
//! from *before* the statement (or grant) that set it, so its idea of the
//! expiry is never later than the database's. Sets handed back within a
//! sixth of their lease (most: a worker's time slice is 500 ms) are never
//! renewed at all.
//!
//! What the worker does with it: a POST starts only while more than a third
//! of the lease is left ([`Lease::may_post`]); with renewals succeeding that
//! is always, with renewals failing (the database unreachable) the set waits
//! and is handed back once its lease has run out. A claim a renewal finds
//! lost (released, taken over) is dropped at once ([`Lease::lose`]). Writes
//! that fail are retried while the lease holds ([`Lease::holds`]); every
//! write is fenced by the lock id anyway, so a late one changes nothing.

use std::collections::HashMap;
use std::time::Duration;

use kt_common::backoff::Backoff;
use kt_common::dispatch::lease::{self, Held, Renew, DEFAULT_LEASE};
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

/// A renewal that failed (the database unreachable) is tried again after
/// this backoff.
const RENEW_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
/// The least time between two renewals: a claim a renewal skipped (its row
/// was being written) is due at once, and is tried again this much later.
const MIN_GAP: Duration = Duration::from_millis(250);

/// One claim's lease.
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    length: Duration,
    /// When the claim expires at the earliest, by this node's clock.
    expires: Instant,
    lost: bool,
}

impl Lease {
    /// The lease of a claim granted with `lease_ms` (0: the default) and
    /// received at `received`.
    pub fn granted(lease_ms: u32, received: Instant) -> Self {
        let length = match lease_ms {
            0 => DEFAULT_LEASE,
            ms => Duration::from_millis(u64::from(ms)),
        };
        Self { length, expires: received + length, lost: false }
    }

    pub fn length(&self) -> Duration {
        self.length
    }

    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// Whether the claim is still this worker's as far as it knows: not
    /// lost and not run out.
    pub fn holds(&self, now: Instant) -> bool {
        !self.lost && now < self.expires
    }

    /// Whether a POST may start: more than a third of the lease left, so a
    /// renewal has time to come through before the claim could expire.
    pub fn may_post(&self, now: Instant) -> bool {
        !self.lost && now + self.length / 3 < self.expires
    }

    /// When the claim should be renewed: a third of the lease after it was
    /// granted or last renewed.
    pub fn renewal_due(&self) -> Instant {
        self.expires - self.length * 2 / 3
    }

    /// Whether a renewal at `now` should include this claim: due within a
    /// sixth of the lease (so claims due about the same time share one
    /// statement).
    pub fn wants_renewal(&self, now: Instant) -> bool {
        !self.lost && self.renewal_due() <= now + self.length / 6
    }

    /// A renewal sent at `sent` extended the claim.
    pub fn renewed(&mut self, sent: Instant) {
        self.expires = self.expires.max(sent + self.length);
    }

    /// A renewal found the claim gone: the set is someone else's now.
    pub fn lose(&mut self) {
        self.lost = true;
    }

    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// A request to renew this claim.
    pub fn renew(&self, set_id: i64, lock_id: Uuid) -> Renew {
        Renew { set_id, lock_id, lease: self.length }
    }

    /// Takes in what a renewal sent at `sent` found about this claim.
    pub fn apply(&mut self, sent: Instant, verdict: Verdict) {
        match verdict {
            Verdict::Renewed => self.renewed(sent),
            Verdict::Skipped => {}
            Verdict::Lost => self.lose(),
        }
    }

    /// What becomes, at `now`, of a POST that waits for a renewal.
    pub fn on_hold(&self, now: Instant) -> OnHold {
        if self.lost {
            OnHold::Lost
        } else if self.may_post(now) {
            OnHold::Post
        } else if self.holds(now) {
            OnHold::Wait
        } else {
            OnHold::RanOut
        }
    }
}

/// What a renewal found about one claim it was asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Extended by a lease from when the renewal was sent.
    Renewed,
    /// Still held, not extended (its row was being written).
    Skipped,
    /// Released or taken over: stop acting on the set.
    Lost,
}

/// Pairs each claim asked about with what the renewal found (`still`: the
/// claims it found held).
pub fn verdicts(asked: &[(i64, Uuid)], still: &[Held]) -> Vec<(i64, Uuid, Verdict)> {
    let still: HashMap<(i64, Uuid), bool> = still.iter().map(|h| ((h.set_id, h.lock_id), h.renewed)).collect();
    asked
        .iter()
        .map(|&(set_id, lock)| {
            let verdict = match still.get(&(set_id, lock)) {
                Some(true) => Verdict::Renewed,
                Some(false) => Verdict::Skipped,
                None => Verdict::Lost,
            };
            (set_id, lock, verdict)
        })
        .collect()
}

/// What becomes of a candidate whose POST waits for a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHold {
    /// The lease was extended: POST it.
    Post,
    /// Not yet extended, not run out either.
    Wait,
    /// The claim is gone: drop the set.
    Lost,
    /// No renewal came through in time: hand the set back (its claim
    /// expires, the set is granted again).
    RanOut,
}

/// The renewal schedule of an engine's claims: one renewal at a time, when
/// the first claim in hand is due ([`Lease::renewal_due`]).
#[derive(Debug, Default)]
pub struct Renewals {
    due: Option<Instant>,
    in_flight: bool,
    failures: u32,
}

impl Renewals {
    /// A claim in hand wants renewing at `at` (a grant: a third of its
    /// lease on).
    pub fn arm(&mut self, at: Instant) {
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }

    /// No sets in hand: nothing to renew.
    pub fn disarm(&mut self) {
        self.due = None;
    }

    /// When the next renewal should start; `None` while one runs or none
    /// is needed.
    pub fn due(&self) -> Option<Instant> {
        if self.in_flight {
            None
        } else {
            self.due
        }
    }

    pub fn start(&mut self) {
        self.in_flight = true;
        self.due = None;
    }

    /// A renewal finished at `now` (`ok`: the statement ran); `next` is when
    /// the first claim in hand is due now (`None`: nothing left to renew).
    pub fn finished(&mut self, now: Instant, next: Option<Instant>, ok: bool) {
        self.in_flight = false;
        let Some(next) = next else {
            return self.disarm();
        };
        let gap = if ok {
            self.failures = 0;
            MIN_GAP
        } else {
            self.failures += 1;
            RENEW_RETRY.delay(self.failures - 1)
        };
        self.arm(next.max(now + gap));
    }
}

/// Why a renewal did not come back.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("renewal timed out after {0:?}")]
    TimedOut(Duration),
}

/// Renews `claims` in one statement, giving up after `timeout` (a pool
/// waiting for an unreachable database would otherwise hold it for its
/// whole acquire timeout).
pub async fn renew(pool: &PgPool, claims: &[Renew], timeout: Duration) -> Result<Vec<Held>, RenewError> {
    match tokio::time::timeout(timeout, lease::renew(pool, claims)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RenewError::TimedOut(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_lease_allows_posts_until_its_last_third_and_holds_until_it_ends() {
        let start = Instant::now();
        let mut lease = Lease::granted(9_000, start);
        assert_eq!(lease.length(), Duration::from_secs(9));
        assert!(lease.may_post(start) && lease.holds(start));
        let at = |secs: f64| start + Duration::from_secs_f64(secs);
        assert!(lease.may_post(at(5.9)));
        assert!(!lease.may_post(at(6.0)), "the last third: no new POST");
        assert!(lease.holds(at(8.9)));
        assert!(!lease.holds(at(9.0)));

        // A renewal counts from when it was sent, never shortens the lease.
        lease.renewed(at(3.0));
        assert_eq!(lease.expires(), at(12.0));
        lease.renewed(at(1.0));
        assert_eq!(lease.expires(), at(12.0), "a late answer to an older renewal");
        assert!(lease.may_post(at(8.9)));

        // Waiting for a renewal: POST once renewed, hand back once run out.
        assert_eq!(lease.on_hold(at(8.0)), OnHold::Post);
        assert_eq!(lease.on_hold(at(9.5)), OnHold::Wait, "the last third of the renewed lease");
        lease.apply(at(6.0), Verdict::Skipped);
        assert_eq!(lease.on_hold(at(9.5)), OnHold::Wait, "a skipped renewal extends nothing");
        assert_eq!(lease.on_hold(at(12.0)), OnHold::RanOut);
        lease.apply(at(6.0), Verdict::Renewed);
        assert_eq!(lease.on_hold(at(9.5)), OnHold::Post);

        lease.apply(at(7.0), Verdict::Lost);
        assert!(!lease.holds(at(3.0)) && !lease.may_post(at(3.0)) && lease.is_lost());
        assert_eq!(lease.on_hold(at(7.0)), OnHold::Lost);
        assert_eq!(Lease::granted(0, start).length(), DEFAULT_LEASE);
    }

    #[test]
    fn test_a_renewal_tells_renewed_skipped_and_lost_claims_apart_by_lock_id() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let asked = [(1, a), (2, b), (3, c), (4, a)];
        let still = [
            Held { set_id: 1, lock_id: a, renewed: true },
            Held { set_id: 2, lock_id: b, renewed: false },
            // Set 3 held under another lock id: not this worker's claim.
            Held { set_id: 3, lock_id: a, renewed: true },
        ];
        let v = verdicts(&asked, &still);
        assert_eq!(
            v,
            vec![(1, a, Verdict::Renewed), (2, b, Verdict::Skipped), (3, c, Verdict::Lost), (4, a, Verdict::Lost)]
        );
    }

    #[test]
    fn test_a_claim_is_renewed_a_third_of_a_lease_after_its_last_extension() {
        let start = Instant::now();
        let at = |secs: f64| start + Duration::from_secs_f64(secs);
        let mut lease = Lease::granted(9_000, start);
        assert_eq!(lease.renewal_due(), at(3.0));
        assert!(!lease.wants_renewal(at(1.0)), "granted a moment ago");
        assert!(lease.wants_renewal(at(1.5)), "due within a sixth of the lease");
        lease.renewed(at(3.0));
        assert_eq!(lease.renewal_due(), at(6.0));
        lease.lose();
        assert!(!lease.wants_renewal(at(9.0)), "a lost claim is not renewed");
    }

    #[test]
    fn test_renewals_start_when_the_first_claim_is_due_and_back_off_after_a_failure() {
        let start = Instant::now();
        let at = |secs: f64| start + Duration::from_secs_f64(secs);
        let mut r = Renewals::default();
        assert_eq!(r.due(), None, "nothing in hand");
        r.arm(at(3.0));
        r.arm(at(4.0));
        assert_eq!(r.due(), Some(at(3.0)), "a later claim does not push the renewal back");

        r.start();
        assert_eq!(r.due(), None, "one renewal at a time");
        r.arm(at(4.5));
        assert_eq!(r.due(), None, "a grant while a renewal runs waits for it");
        r.finished(at(3.0), Some(at(6.0)), true);
        assert_eq!(r.due(), Some(at(4.5)), "the claim granted meanwhile comes first");

        r.start();
        r.finished(at(4.5), Some(at(7.5)), true);
        assert_eq!(r.due(), Some(at(7.5)));
        // A claim that was skipped is due at once: tried again a moment later.
        r.start();
        r.finished(at(7.5), Some(at(7.5)), true);
        assert_eq!(r.due(), Some(at(7.5) + MIN_GAP));

        // Failures back off from 200 ms.
        for n in 0..10 {
            r.start();
            r.finished(at(8.0), Some(at(7.5)), false);
            let wait = r.due().unwrap() - at(8.0);
            assert!(wait >= RENEW_RETRY.ceiling(n) / 2 && wait <= RENEW_RETRY.ceiling(n), "failure {n}: {wait:?}");
        }
        r.start();
        r.finished(at(8.0), Some(at(9.0)), true);
        assert_eq!(r.due(), Some(at(9.0)), "a success resets the backoff");
        r.start();
        r.finished(at(9.0), None, true);
        assert_eq!(r.due(), None, "nothing left in hand");
    }
}
