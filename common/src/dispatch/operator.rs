//! Operator and completion transitions: what `RetryMessageSet`,
//! `SkipMessage`, `DiscardMessageSet` and `CompleteWorkOrder` change. Each
//! takes a transaction that already holds the set row ([`lock`]): the
//! workers write through the same row (their claim), so the two never
//! interleave.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::candidate::{candidates_of, message_key, HeadColumns, HEAD_COLUMNS};
use super::state::{work_order_id, SetState, WorkOrderState};

/// A set row locked for the rest of the transaction.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LockedSet {
    pub id: i64,
    pub trigger_id: Uuid,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub state: String,
    /// Expiry of a live worker claim, if any.
    pub claimed_until: Option<DateTime<Utc>>,
}

impl LockedSet {
    pub fn set_state(&self) -> SetState {
        SetState::parse(&self.state).unwrap_or(SetState::Ready)
    }
}

/// Locks the set row (`FOR UPDATE`): workers claim and write through the
/// same row, so they wait for this transaction.
pub async fn lock(tx: &mut Transaction<'_, Postgres>, id: i64) -> Result<Option<LockedSet>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, trigger_id, topic, key, partition, \"offset\", state,
                CASE WHEN lock_id IS NOT NULL AND lock_expires > now() THEN lock_expires END AS claimed_until
           FROM message_sets WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
}

/// The candidate of a locked set and its work order, if any.
#[derive(Debug, Clone)]
pub struct HeadRow {
    pub partition: i32,
    pub offset: i64,
    pub wo_id: Option<Uuid>,
    pub wo_state: Option<WorkOrderState>,
    pub wo_attempts: Option<i32>,
    pub wo_last_error: Option<String>,
}

pub async fn head(tx: &mut Transaction<'_, Postgres>, set: &LockedSet) -> Result<Option<HeadRow>, sqlx::Error> {
    let src = "(SELECT $1::uuid AS trigger_id, $2::text AS topic, $3::bytea AS set_key, $4::int4 AS set_partition,
                       $5::int8 AS set_offset, NULL::int4 AS after_partition, NULL::int8 AS after_offset)";
    let sql = format!("SELECT {HEAD_COLUMNS} FROM {}", candidates_of(src, &[]));
    let row: Option<HeadColumns> = sqlx::query_as(&sql)
        .bind(set.trigger_id)
        .bind(&set.topic)
        .bind(&set.key)
        .bind(set.partition)
        .bind(set.offset)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row.and_then(|h| {
        let (partition, offset) = h.position()?;
        Some(HeadRow {
            partition,
            offset,
            wo_id: h.wo_id,
            wo_state: h.wo_state.as_deref().and_then(WorkOrderState::parse),
            wo_attempts: h.wo_attempts,
            wo_last_error: h.wo_last_error,
        })
    }))
}

/// The set has a candidate to act on: ready and unclaimed, so grantable
/// (the caller wakes the scheduler after commit); any stale claim is cleared
/// so its late writes are fenced off.
pub async fn mark_ready(tx: &mut Transaction<'_, Postgres>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE message_sets
            SET state = 'ready', retry_at = NULL, blocked_since = NULL,
                lock_id = NULL, lock_expires = NULL, updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The head work order failed for good: an operator must act.
pub async fn mark_blocked(tx: &mut Transaction<'_, Postgres>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE message_sets
            SET state = 'blocked', retry_at = NULL, blocked_since = COALESCE(blocked_since, now()),
                lock_id = NULL, lock_expires = NULL, updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A failed work order gets a fresh retry budget: the worker's give-up check
/// counts `attempts` and the age since `first_attempt_at`, so both restart;
/// `attempt_log` and `last_error` keep the history.
pub async fn reset_for_retry(tx: &mut Transaction<'_, Postgres>, work_order: Uuid) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE work_orders SET state = 'pending', attempts = 0, first_attempt_at = NULL, updated_at = now()
          WHERE id = $1 AND state = 'failed'",
    )
    .bind(work_order)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Marks an unfinished work order skipped.
pub async fn skip_work_order(tx: &mut Transaction<'_, Postgres>, work_order: Uuid) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE work_orders SET state = 'skipped', updated_at = now()
          WHERE id = $1 AND state IN ('pending', 'running', 'failed')",
    )
    .bind(work_order)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Records a skipped message that never had a work order, so the message
/// still has exactly one. Its body is `{}`: nothing was ever POSTed.
pub async fn insert_skipped_work_order(
    tx: &mut Transaction<'_, Postgres>,
    set: &LockedSet,
    partition: i32,
    offset: i64,
) -> Result<Uuid, sqlx::Error> {
    let id = work_order_id(set.trigger_id, &set.topic, partition, offset);
    let key = message_key("$7::bytea", "$2", "$4", "$5", "$6");
    sqlx::query(&format!(
        "INSERT INTO work_orders (id, trigger_id, set_id, topic, partition, \"offset\", key, state, body)
         VALUES ($1, $2, $3, $4, $5, $6, {key}, 'skipped', '{{}}')"
    ))
    .bind(id)
    .bind(set.trigger_id)
    .bind(set.id)
    .bind(&set.topic)
    .bind(partition)
    .bind(offset)
    .bind(&set.key)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

pub async fn delete_message(
    tx: &mut Transaction<'_, Postgres>,
    trigger_id: Uuid,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<bool, sqlx::Error> {
    let n =
        sqlx::query("DELETE FROM messages WHERE trigger_id = $1 AND topic = $2 AND partition = $3 AND \"offset\" = $4")
            .bind(trigger_id)
            .bind(topic)
            .bind(partition)
            .bind(offset)
            .execute(&mut **tx)
            .await?
            .rows_affected();
    Ok(n == 1)
}

/// Deletes every stored message of the set and marks their unfinished work
/// orders skipped. Returns (messages deleted, work orders skipped).
pub async fn delete_messages(tx: &mut Transaction<'_, Postgres>, set: &LockedSet) -> Result<(i64, i64), sqlx::Error> {
    const SKIP: &str = "wo AS (
            UPDATE work_orders w SET state = 'skipped', updated_at = now()
              FROM del
             WHERE w.trigger_id = $1 AND w.topic = $2 AND w.partition = del.partition AND w.\"offset\" = del.\"offset\"
               AND w.state IN ('pending', 'running', 'failed')
            RETURNING w.id)
        SELECT (SELECT count(*) FROM del), (SELECT count(*) FROM wo)";
    match &set.key {
        Some(key) => {
            sqlx::query_as(&format!(
                "WITH del AS (DELETE FROM messages WHERE trigger_id = $1 AND topic = $2 AND key = $3
                              RETURNING partition, \"offset\"), {SKIP}"
            ))
            .bind(set.trigger_id)
            .bind(&set.topic)
            .bind(key)
            .fetch_one(&mut **tx)
            .await
        }
        None => {
            sqlx::query_as(&format!(
                // A partition set (no offset) holds every stored message of
                // its partition; a set of one message just that one.
                "WITH del AS (DELETE FROM messages WHERE trigger_id = $1 AND topic = $2 AND partition = $3
                                 AND ($4::int8 IS NULL OR \"offset\" = $4)
                              RETURNING partition, \"offset\"), {SKIP}"
            ))
            .bind(set.trigger_id)
            .bind(&set.topic)
            .bind(set.partition)
            .bind(set.offset)
            .fetch_one(&mut **tx)
            .await
        }
    }
}

/// Deletes the set row. A keyed set's next message creates a fresh row.
pub async fn delete(tx: &mut Transaction<'_, Postgres>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM message_sets WHERE id = $1").bind(id).execute(&mut **tx).await?;
    Ok(())
}
