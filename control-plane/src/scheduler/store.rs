//! SQL of the candidate-set scheduler. Every query here touches only
//! `message_sets` through partial indexes, so its cost follows the number of
//! ready sets, not the number of stored messages.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use super::model::SetId;

/// Most sets taken in one statement; the caller loops while full.
pub const TAKE_BATCH: i64 = 5_000;

/// Marks up to [`TAKE_BATCH`] ready, unqueued sets (of one trigger, or of
/// all) as queued and returns them. Rows an ingest transaction holds are
/// skipped: that transaction notifies again when it commits.
pub async fn take_unqueued(db: impl PgExecutor<'_>, trigger: Option<Uuid>) -> Result<Vec<(SetId, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE message_sets s SET queued = true
          WHERE s.id IN (SELECT id FROM message_sets
                          WHERE state = 'ready' AND NOT queued
                            AND ($1::uuid IS NULL OR trigger_id = $1)
                          ORDER BY id
                          LIMIT $2
                          FOR UPDATE SKIP LOCKED)
         RETURNING s.id, s.trigger_id",
    )
    .bind(trigger)
    .bind(TAKE_BATCH)
    .fetch_all(db)
    .await
}

/// After a restart nothing is queued in memory: forget every `queued` mark
/// so [`take_unqueued`] picks the sets up again.
pub async fn reset_queued(db: impl PgExecutor<'_>) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("UPDATE message_sets SET queued = false WHERE queued AND state = 'ready'")
        .execute(db)
        .await?
        .rows_affected())
}

/// Sets waiting for a retry, with when.
pub async fn waiting_retries(db: impl PgExecutor<'_>) -> Result<Vec<(SetId, Uuid, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as("SELECT id, trigger_id, retry_at FROM message_sets WHERE state = 'waiting' AND retry_at IS NOT NULL")
        .fetch_all(db)
        .await
}

/// Unclaimed sets whose retry time passed a while ago: normally a timer of
/// the scheduler grants them; this catches one that no timer knows about
/// (its attempt was recorded while this control plane was starting).
pub async fn overdue_retries(db: impl PgExecutor<'_>) -> Result<Vec<(SetId, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, trigger_id FROM message_sets
          WHERE state = 'waiting' AND retry_at < now() - interval '5 seconds' AND lock_id IS NULL
          LIMIT 10000",
    )
    .fetch_all(db)
    .await
}

/// Releases claims whose lease ran out (their worker died or hung) and
/// returns the sets so they are queued again. The lock id changes with the
/// release, so a late write of the old claim is fenced off.
pub async fn release_expired_claims(db: &PgPool) -> Result<Vec<(SetId, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE message_sets SET lock_id = NULL, lock_expires = NULL, updated_at = now()
          WHERE lock_id IS NOT NULL AND lock_expires < now()
         RETURNING id, trigger_id",
    )
    .fetch_all(db)
    .await
}

/// Per-trigger in-flight limits (`tuning.max_in_flight`); 0 for a disabled
/// trigger, whose stored messages wait until it is enabled again.
pub async fn trigger_limits(db: impl PgExecutor<'_>) -> Result<Vec<(Uuid, i32)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, CASE WHEN enabled THEN COALESCE((spec->'tuning'->>'max_in_flight')::int, 100) ELSE 0 END
           FROM triggers",
    )
    .fetch_all(db)
    .await
}
