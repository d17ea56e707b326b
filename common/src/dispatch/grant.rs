//! The scheduler's transitions: claiming grantable sets for the workers it
//! grants them to, giving back claims it could not hand out, and releasing
//! claims whose lease ran out. Every query walks a partial index
//! (`message_sets_grantable_idx`, `message_sets_retry_idx`,
//! `message_sets_claims_idx`), so its cost follows the number of ready sets,
//! not the number of stored messages.

use sqlx::PgExecutor;
use uuid::Uuid;

/// How many sets of a trigger the scheduler may grant now, and the lease
/// their claims get.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Room {
    pub trigger_id: Uuid,
    pub sets: i32,
    pub lease_secs: f64,
}

/// A set claimed for a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Claimed {
    pub set_id: i64,
    pub trigger_id: Uuid,
    pub lock_id: Uuid,
}

/// Claims up to `total` grantable sets — unclaimed and ready, or waiting
/// with a retry time that has passed — at most `room.sets` per trigger,
/// taking the triggers in turn (each trigger's first set, then each one's
/// second...) so one trigger's backlog does not starve another. Each claim
/// gets a fresh lock id and the trigger's lease. Rows another transaction
/// holds (an ingest batch waking the set) are skipped: its commit announces
/// the set again.
pub async fn claim_grantable(db: impl PgExecutor<'_>, rooms: &[Room], total: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let triggers: Vec<Uuid> = rooms.iter().map(|r| r.trigger_id).collect();
    let sets: Vec<i32> = rooms.iter().map(|r| r.sets).collect();
    let leases: Vec<f64> = rooms.iter().map(|r| r.lease_secs).collect();
    sqlx::query_as(
        "WITH room AS (SELECT * FROM unnest($1::uuid[], $2::int4[], $3::float8[]) AS t(trigger_id, sets, lease_secs)),
         pick AS (
            SELECT c.id, r.lease_secs,
                   row_number() OVER (PARTITION BY r.trigger_id ORDER BY c.prio, c.id) AS turn, r.trigger_id
              FROM room r
             CROSS JOIN LATERAL (
                (SELECT id, 0 AS prio FROM message_sets
                  WHERE trigger_id = r.trigger_id AND state = 'ready' AND lock_id IS NULL
                  ORDER BY id LIMIT r.sets)
                UNION ALL
                (SELECT id, 1 FROM message_sets
                  WHERE trigger_id = r.trigger_id AND state = 'waiting' AND retry_at <= now() AND lock_id IS NULL
                  ORDER BY retry_at LIMIT r.sets)) c),
         chosen AS (
            SELECT id, lease_secs FROM pick p
             WHERE turn <= (SELECT sets FROM room WHERE room.trigger_id = p.trigger_id)
             ORDER BY turn, trigger_id LIMIT $4),
         locked AS (
            SELECT s.id, c.lease_secs FROM message_sets s JOIN chosen c ON c.id = s.id
             WHERE s.lock_id IS NULL
               FOR UPDATE OF s SKIP LOCKED)
         UPDATE message_sets s
            SET lock_id = gen_random_uuid(), lock_expires = now() + make_interval(secs => l.lease_secs),
                updated_at = now()
           FROM locked l
          WHERE s.id = l.id
            AND (s.state = 'ready' OR (s.state = 'waiting' AND s.retry_at <= now()))
         RETURNING s.id AS set_id, s.trigger_id, s.lock_id",
    )
    .bind(&triggers)
    .bind(&sets)
    .bind(&leases)
    .bind(total)
    .fetch_all(db)
    .await
}

/// Gives back claims that were never handed to a worker (its stream was
/// gone). The set's state is unchanged, so it is grantable again at once.
pub async fn give_back(db: impl PgExecutor<'_>, claims: &[(i64, Uuid)]) -> Result<u64, sqlx::Error> {
    let ids: Vec<i64> = claims.iter().map(|c| c.0).collect();
    let locks: Vec<Uuid> = claims.iter().map(|c| c.1).collect();
    Ok(sqlx::query(
        "UPDATE message_sets s SET lock_id = NULL, lock_expires = NULL, updated_at = now()
           FROM unnest($1::int8[], $2::uuid[]) AS i(set_id, lock_id)
          WHERE s.id = i.set_id AND s.lock_id = i.lock_id AND s.id = ANY($1)",
    )
    .bind(&ids)
    .bind(&locks)
    .execute(db)
    .await?
    .rows_affected())
}

/// Releases claims whose lease ran out (their worker died or hung), making
/// their sets grantable again. The lock id goes with the release, so a late
/// write of the old claim is fenced off. Rows locked right now (their
/// worker is writing) are skipped, never waited for.
pub async fn release_expired_claims(db: impl PgExecutor<'_>) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE message_sets s SET lock_id = NULL, lock_expires = NULL, updated_at = now()
          WHERE s.id IN (SELECT id FROM message_sets
                          WHERE lock_id IS NOT NULL AND lock_expires < now()
                          ORDER BY id LIMIT 10000
                            FOR UPDATE SKIP LOCKED)",
    )
    .execute(db)
    .await?
    .rows_affected())
}
