//! SQL of the operator view of `message_sets`. Listing walks the set indexes
//! only (`message_sets_state_idx`, the claims index); per-row details (head
//! message, stored count, head work order) are looked up for the rows of
//! one page through `messages_set_idx`, the messages primary key and the
//! work-order unique key, never by scanning `messages`.
//!
//! Writes take a transaction that already holds the set row (`lock`): the
//! workers lock the same row (their claim) before touching its messages or
//! work orders, so the two never interleave.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Postgres, Transaction};
use uuid::Uuid;

/// A set with what the operator needs to know about its head.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SetRow {
    pub id: i64,
    pub trigger_id: Uuid,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub state: String,
    /// The claim's expiry while a worker holds a live claim, else `None`.
    pub claimed_until: Option<DateTime<Utc>>,
    pub retry_at: Option<DateTime<Utc>>,
    pub blocked_since: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub stored_messages: i64,
    pub head_partition: Option<i32>,
    pub head_offset: Option<i64>,
    pub wo_id: Option<Uuid>,
    pub wo_state: Option<String>,
    pub wo_attempts: Option<i32>,
    pub wo_last_error: Option<String>,
}

/// Adds the per-row details to `source`, a query returning `message_sets`
/// rows (at most one page of them).
fn with_details(source: &str) -> String {
    format!(
        "SELECT s.id, s.trigger_id, s.topic, s.key, s.state,
                CASE WHEN s.lock_id IS NOT NULL AND s.lock_expires > now() THEN s.lock_expires END AS claimed_until,
                s.retry_at, s.blocked_since, s.updated_at,
                CASE WHEN s.key IS NULL THEN (h.partition IS NOT NULL)::int::bigint ELSE c.n END AS stored_messages,
                h.partition AS head_partition, h.\"offset\" AS head_offset,
                w.id AS wo_id, w.state AS wo_state, w.attempts AS wo_attempts, w.last_error AS wo_last_error
           FROM ({source}) s
           LEFT JOIN LATERAL (
                (SELECT m.partition, m.\"offset\" FROM messages m
                  WHERE s.key IS NOT NULL AND m.trigger_id = s.trigger_id AND m.topic = s.topic AND m.key = s.key
                  ORDER BY m.partition, m.\"offset\" LIMIT 1)
                UNION ALL
                (SELECT m.partition, m.\"offset\" FROM messages m
                  WHERE s.key IS NULL AND m.trigger_id = s.trigger_id AND m.topic = s.topic
                    AND m.partition = s.partition AND m.\"offset\" = s.\"offset\")
           ) h ON true
           LEFT JOIN LATERAL (
                SELECT count(*) AS n FROM messages m
                 WHERE s.key IS NOT NULL AND m.trigger_id = s.trigger_id AND m.topic = s.topic AND m.key = s.key
           ) c ON true
           LEFT JOIN work_orders w
             ON w.trigger_id = s.trigger_id AND w.topic = s.topic
            AND w.partition = h.partition AND w.\"offset\" = h.\"offset\"
          ORDER BY s.id"
    )
}

pub async fn get(db: impl PgExecutor<'_>, id: i64) -> Result<Option<SetRow>, sqlx::Error> {
    sqlx::query_as(&with_details("SELECT * FROM message_sets WHERE id = $1")).bind(id).fetch_optional(db).await
}

/// Up to `limit` sets with id > `after` in the given states, of one trigger
/// or of every trigger, in id order. `with_live_claims = false` leaves out
/// sets a worker holds right now.
///
/// Each (trigger, state) pair reads at most `limit` rows from
/// `message_sets_state_idx` (trigger_id, state, id); the union is cut to
/// `limit`. Triggers are few, so this stays an index walk whatever the
/// number of sets in other states (idle keys pile up over time).
pub async fn list_in_states(
    db: impl PgExecutor<'_>,
    trigger: Option<Uuid>,
    states: &[&str],
    with_live_claims: bool,
    after: i64,
    limit: i64,
) -> Result<Vec<SetRow>, sqlx::Error> {
    let source = "SELECT p.* FROM (SELECT id FROM triggers WHERE $1::uuid IS NULL OR id = $1) t
                   CROSS JOIN unnest($2::text[]) AS st(state)
                   CROSS JOIN LATERAL (
                        SELECT ms.* FROM message_sets ms
                         WHERE ms.trigger_id = t.id AND ms.state = st.state AND ms.id > $3
                           AND ($5::boolean OR ms.lock_id IS NULL OR ms.lock_expires <= now())
                         ORDER BY ms.id LIMIT $4) p
                  ORDER BY p.id LIMIT $4";
    sqlx::query_as(&with_details(source))
        .bind(trigger)
        .bind(states)
        .bind(after)
        .bind(limit)
        .bind(with_live_claims)
        .fetch_all(db)
        .await
}

/// Up to `limit` sets a worker holds a live claim on, through the claims
/// index (live claims are bounded by the number of workers).
pub async fn list_claimed(
    db: impl PgExecutor<'_>,
    trigger: Option<Uuid>,
    after: i64,
    limit: i64,
) -> Result<Vec<SetRow>, sqlx::Error> {
    let source = "SELECT ms.* FROM message_sets ms
                   WHERE ms.lock_id IS NOT NULL AND ms.lock_expires > now()
                     AND ms.state IN ('ready', 'waiting')
                     AND ($1::uuid IS NULL OR ms.trigger_id = $1) AND ms.id > $2
                   ORDER BY ms.id LIMIT $3";
    sqlx::query_as(&with_details(source)).bind(trigger).bind(after).bind(limit).fetch_all(db).await
}

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
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HeadRow {
    pub partition: i32,
    pub offset: i64,
    pub wo_id: Option<Uuid>,
    pub wo_state: Option<String>,
    pub wo_attempts: Option<i32>,
    pub wo_last_error: Option<String>,
}

pub async fn head(tx: &mut Transaction<'_, Postgres>, set: &LockedSet) -> Result<Option<HeadRow>, sqlx::Error> {
    const COLUMNS: &str = "m.partition, m.\"offset\", w.id AS wo_id, w.state AS wo_state,
                           w.attempts AS wo_attempts, w.last_error AS wo_last_error
                      FROM messages m
                      LEFT JOIN work_orders w
                        ON w.trigger_id = m.trigger_id AND w.topic = m.topic
                       AND w.partition = m.partition AND w.\"offset\" = m.\"offset\"";
    match &set.key {
        Some(key) => {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} WHERE m.trigger_id = $1 AND m.topic = $2 AND m.key = $3
                  ORDER BY m.partition, m.\"offset\" LIMIT 1"
            ))
            .bind(set.trigger_id)
            .bind(&set.topic)
            .bind(key)
            .fetch_optional(&mut **tx)
            .await
        }
        None => {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} WHERE m.trigger_id = $1 AND m.topic = $2 AND m.partition = $3 AND m.\"offset\" = $4"
            ))
            .bind(set.trigger_id)
            .bind(&set.topic)
            .bind(set.partition)
            .bind(set.offset)
            .fetch_optional(&mut **tx)
            .await
        }
    }
}

/// The set has a candidate to act on: ready, already in the scheduler's
/// queue (the caller hands it to the scheduler after commit), and any stale
/// claim is cleared so its late writes are fenced off.
pub async fn mark_ready(tx: &mut Transaction<'_, Postgres>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE message_sets
            SET state = 'ready', queued = true, retry_at = NULL, blocked_since = NULL,
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
            SET state = 'blocked', queued = false, retry_at = NULL, blocked_since = COALESCE(blocked_since, now()),
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
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO work_orders (id, trigger_id, set_id, topic, partition, \"offset\", key, state, body)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'skipped', '{}')",
    )
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
                "WITH del AS (DELETE FROM messages WHERE trigger_id = $1 AND topic = $2 AND partition = $3 AND \"offset\" = $4
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
