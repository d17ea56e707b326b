//! Grants of sets whose trigger this node does not know yet.
//!
//! The work stream and the session are separate streams, so the control
//! plane can grant a set of a trigger before the assignment naming that
//! trigger reaches this node (a trigger just created or enabled, a node just
//! connected). Such a grant is parked until the trigger directory changes:
//! then it is taken in hand if the trigger is known, and released (ready,
//! for the control plane to grant again) if the assignment that came after
//! the grant still does not name it. A grant is never parked past its
//! lease's renewal point, since nothing renews a parked claim.

use kt_proto::internal::SetGrant;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use super::lease::Lease;

/// A granted set waiting for its trigger.
pub struct ParkedGrant {
    pub grant: SetGrant,
    pub lock: Uuid,
    pub lease: Lease,
    /// The directory's count of applied assignments when the grant arrived.
    seen: u64,
}

impl ParkedGrant {
    /// Whether the set is released when its trigger is still unknown: an
    /// assignment newer than the grant did not name it, or the claim has
    /// waited as long as its lease allows.
    pub fn give_up(&self, applied: u64, now: Instant) -> bool {
        applied > self.seen || self.lease.renewal_due() <= now
    }
}

pub struct Parked {
    grants: Vec<ParkedGrant>,
    changes: watch::Receiver<u64>,
}

impl Parked {
    pub fn new(changes: watch::Receiver<u64>) -> Self {
        Self { grants: Vec::new(), changes }
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    pub fn park(&mut self, grant: SetGrant, lock: Uuid, lease: Lease) {
        let seen = *self.changes.borrow();
        self.grants.push(ParkedGrant { grant, lock, lease, seen });
    }

    /// Every parked grant, for giving back.
    pub fn take_all(&mut self) -> Vec<SetGrant> {
        self.grants.drain(..).map(|p| p.grant).collect()
    }

    /// Parks again a grant [`Parked::wait`] returned and that waits on.
    pub fn repark(&mut self, grant: ParkedGrant) {
        self.grants.push(grant);
    }

    /// Waits for the directory to change or the first parked grant's lease
    /// to reach its renewal point; returns the grants to look at again
    /// (all of them after a change) and the directory's count of applied
    /// assignments, for [`ParkedGrant::give_up`]. Pending forever while
    /// nothing is parked, so it can sit in a `select!`.
    pub async fn wait(&mut self) -> (Vec<ParkedGrant>, u64) {
        let Some(deadline) = self.grants.iter().map(|p| p.lease.renewal_due()).min() else {
            return std::future::pending().await;
        };
        let changed = tokio::select! {
            changed = self.changes.changed() => changed.is_ok(),
            () = tokio::time::sleep_until(deadline) => false,
        };
        let applied = *self.changes.borrow_and_update();
        let now = Instant::now();
        let (due, waiting): (Vec<ParkedGrant>, Vec<ParkedGrant>) =
            self.grants.drain(..).partition(|p| changed || p.lease.renewal_due() <= now);
        self.grants = waiting;
        (due, applied)
    }
}
