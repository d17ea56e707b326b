//! Claim leases: a claim (lock id) lasts as long as its lease, and the
//! worker that holds it renews it while it works on the set. A worker that
//! dies stops renewing, its claims expire within one lease, and the
//! scheduler's janitor ([`super::grant::release_expired_claims`]) releases
//! them for another grant.
//!
//! Renewing is fenced like every other write of a claim: only a row whose
//! lock id is still the worker's is extended, so a claim that expired and
//! was released (or taken over) is never revived.

use std::time::Duration;

use sqlx::PgExecutor;
use uuid::Uuid;

/// Shortest and longest claim lease the control plane accepts. Below 3 s a
/// renewal every third of the lease (1 s) races ordinary database latency;
/// above an hour a dead node's sets wait longer than anyone would.
pub const MIN_LEASE: Duration = Duration::from_secs(3);
pub const MAX_LEASE: Duration = Duration::from_secs(3_600);
/// The lease when none is configured, and what a worker assumes when a
/// grant does not say.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// A claim a worker asks to renew: set, lock id and the lease to extend by
/// (from now).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Renew {
    pub set_id: i64,
    pub lock_id: Uuid,
    pub lease: Duration,
}

/// A claim the renewal found still held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Held {
    pub set_id: i64,
    pub lock_id: Uuid,
    /// Extended to now + lease. False when the row was locked by another
    /// transaction at that moment (the worker's own group commit, an
    /// ingest batch waking the set): the claim still holds, with its
    /// previous expiry, and the next renewal extends it.
    pub renewed: bool,
}

/// Extends the lease of every claim in `claims` still held under its lock
/// id, in one statement. Rows locked right now are skipped, never waited
/// for (`FOR NO KEY UPDATE SKIP LOCKED`), so a renewal cannot block on, or
/// deadlock with, a commit of the same sets. Returns the claims that still
/// hold, each saying whether it was extended; a claim missing from the
/// result is lost (released or taken over): its worker must stop acting on
/// the set.
pub async fn renew(db: impl PgExecutor<'_>, claims: &[Renew]) -> Result<Vec<Held>, sqlx::Error> {
    let ids: Vec<i64> = claims.iter().map(|c| c.set_id).collect();
    let locks: Vec<Uuid> = claims.iter().map(|c| c.lock_id).collect();
    let leases: Vec<f64> = claims.iter().map(|c| c.lease.as_secs_f64()).collect();
    sqlx::query_as(
        "WITH input AS (SELECT * FROM unnest($1::int8[], $2::uuid[], $3::float8[]) AS t(set_id, lock_id, lease_secs)),
         locked AS (
            SELECT s.id, i.lease_secs FROM message_sets s JOIN input i ON s.id = i.set_id AND s.lock_id = i.lock_id
             -- Repeated as an array condition so the planner probes the
             -- primary key instead of scanning the table.
             WHERE s.id = ANY($1)
               FOR NO KEY UPDATE OF s SKIP LOCKED),
         renewed AS (
            UPDATE message_sets s SET lock_expires = now() + make_interval(secs => l.lease_secs)
              FROM locked l
             WHERE s.id = l.id
            RETURNING s.id)
         -- Held: renewed now, or locked by someone else and still ours in
         -- the statement's snapshot.
         SELECT i.set_id, i.lock_id, (r.id IS NOT NULL) AS renewed
           FROM input i
           JOIN message_sets s ON s.id = i.set_id AND s.lock_id = i.lock_id
           LEFT JOIN renewed r ON r.id = i.set_id
          WHERE s.id = ANY($1)",
    )
    .bind(&ids)
    .bind(&locks)
    .bind(&leases)
    .fetch_all(db)
    .await
}
