//! SQL of the workers. A worker claims a set by writing a fresh lock id into
//! its `message_sets` row; every later write of that claim locks the row and
//! checks the lock id in the same statement (fencing), so a worker whose
//! claim expired and was handed to another cannot write anything.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// A claimed set.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedSet {
    pub trigger_id: Uuid,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub state: String,
    pub retry_at: Option<DateTime<Utc>>,
}

/// Why a set could not be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unclaimable {
    Gone,
    Busy,
    Idle,
    Blocked,
    /// Waiting for CompleteWorkOrder.
    Waiting,
}

/// The set's candidate and its work order, read in one snapshot together
/// with the set's ingest sequence.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Head {
    pub ingest_seq: i64,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub header_names: Option<Vec<String>>,
    pub header_values: Option<Vec<Option<Vec<u8>>>>,
    pub ts: Option<DateTime<Utc>>,
    pub wo_id: Option<Uuid>,
    pub wo_state: Option<String>,
    pub wo_attempts: Option<i32>,
    pub wo_first_attempt_at: Option<DateTime<Utc>>,
    pub wo_body: Option<String>,
}

pub async fn claim(
    pool: &PgPool,
    set_id: i64,
    lock: Uuid,
    lease_secs: f64,
) -> Result<Result<ClaimedSet, Unclaimable>, sqlx::Error> {
    let claimed: Option<ClaimedSet> = sqlx::query_as(
        "UPDATE message_sets
            SET lock_id = $2, lock_expires = now() + make_interval(secs => $3), updated_at = now()
          WHERE id = $1 AND state IN ('ready', 'waiting') AND (lock_id IS NULL OR lock_expires < now())
         RETURNING trigger_id, topic, key, partition, \"offset\", state, retry_at",
    )
    .bind(set_id)
    .bind(lock)
    .bind(lease_secs)
    .fetch_optional(pool)
    .await?;
    if let Some(set) = claimed {
        return Ok(Ok(set));
    }
    let row: Option<(String, bool, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT state, lock_id IS NOT NULL AND lock_expires >= now(), retry_at FROM message_sets WHERE id = $1",
    )
    .bind(set_id)
    .fetch_optional(pool)
    .await?;
    Ok(Err(match row {
        None => Unclaimable::Gone,
        Some((_, true, _)) => Unclaimable::Busy,
        Some((state, false, _)) => match state.as_str() {
            "idle" => Unclaimable::Idle,
            "blocked" => Unclaimable::Blocked,
            "waiting" => Unclaimable::Waiting,
            _ => Unclaimable::Busy,
        },
    }))
}

/// The head's work order, looked up by its unique key with the message's
/// coordinates as parameters of a subquery: always one index probe on the
/// whole key. (As a lateral join, a planner with stale statistics probes by
/// trigger and topic only and filters every work order of the trigger,
/// which made dispatch quadratic in the trigger's history.)
const HEAD_WORK_ORDER: &str = "(SELECT w FROM work_orders w
         WHERE w.trigger_id = s.trigger_id AND w.topic = s.topic
           AND w.partition = h.partition AND w.\"offset\" = h.\"offset\") AS wo";

/// The candidate of a set (`None` fields when the set has no messages).
pub async fn head(pool: &PgPool, set_id: i64, set: &ClaimedSet) -> Result<Option<Head>, sqlx::Error> {
    let candidate = match set.key {
        Some(_) => "m.trigger_id = s.trigger_id AND m.topic = s.topic AND m.key = s.key",
        None => {
            "m.trigger_id = s.trigger_id AND m.topic = s.topic
                 AND m.partition = s.partition AND m.\"offset\" = s.\"offset\""
        }
    };
    // OFFSET 0 keeps the inner query whole, so the work order is looked up
    // once, not once per column taken from it.
    let sql = format!(
        "SELECT ingest_seq, partition, \"offset\", key, value, header_names, header_values, ts,
                (wo).id AS wo_id, (wo).state AS wo_state, (wo).attempts AS wo_attempts,
                (wo).first_attempt_at AS wo_first_attempt_at, (wo).body AS wo_body
           FROM (SELECT s.ingest_seq, h.partition, h.\"offset\", h.key, h.value, h.header_names, h.header_values, h.ts,
                        {HEAD_WORK_ORDER}
                   FROM message_sets s
                   LEFT JOIN LATERAL (
                     SELECT m.partition, m.\"offset\", m.key, m.value, m.header_names, m.header_values, m.ts
                       FROM messages m
                      WHERE {candidate}
                      ORDER BY m.partition, m.\"offset\" LIMIT 1) h ON true
                  WHERE s.id = $1
                 OFFSET 0) head"
    );
    sqlx::query_as(&sql).bind(set_id).fetch_optional(pool).await
}

/// Creates the work order of the head message. `Ok(None)` when the claim
/// was lost or the work order already exists (the caller reads the head again).
pub async fn create_work_order(
    pool: &PgPool,
    set_id: i64,
    lock: Uuid,
    set: &ClaimedSet,
    partition: i32,
    offset: i64,
    body: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let id = Uuid::now_v7();
    sqlx::query_scalar(
        "WITH claim AS (SELECT id FROM message_sets WHERE id = $1 AND lock_id = $2 FOR UPDATE),
              ins AS (
                INSERT INTO work_orders (id, trigger_id, set_id, topic, partition, \"offset\", key, state, body)
                SELECT $3, $4, $1, $5, $6, $7, $8, 'pending', $9 FROM claim
                ON CONFLICT (trigger_id, topic, partition, \"offset\") DO NOTHING
                RETURNING id),
              ev AS (
                INSERT INTO events (kind, trigger_id, details)
                SELECT 'work_order_created', $4,
                       jsonb_build_object('work_order_id', ins.id, 'set_id', $1, 'topic', $5, 'partition', $6, 'offset', $7)
                  FROM ins)
         SELECT id FROM ins",
    )
    .bind(set_id)
    .bind(lock)
    .bind(id)
    .bind(set.trigger_id)
    .bind(&set.topic)
    .bind(partition)
    .bind(offset)
    .bind(&set.key)
    .bind(body)
    .fetch_optional(pool)
    .await
}

/// One attempt, as kept in `work_orders.attempt_log`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    pub at: DateTime<Utc>,
    pub ms: u64,
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Success: the work order succeeded, its message is deleted, the claim is
/// extended. Returns whether the claim still held.
pub async fn succeed(
    pool: &PgPool,
    set_id: i64,
    lock: Uuid,
    lease_secs: f64,
    wo: Uuid,
    attempt: &Attempt,
) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "WITH claim AS (
                UPDATE message_sets SET lock_expires = now() + make_interval(secs => $3)
                 WHERE id = $1 AND lock_id = $2 RETURNING id),
              wo AS (
                UPDATE work_orders
                   SET state = 'success', attempts = attempts + 1, last_error = NULL,
                       attempt_log = attempt_log || $5::jsonb,
                       first_attempt_at = COALESCE(first_attempt_at, $6), updated_at = now()
                 WHERE id = $4 AND EXISTS (SELECT 1 FROM claim)
                 RETURNING trigger_id, topic, partition, \"offset\", attempts),
              del AS (
                DELETE FROM messages m USING wo
                 WHERE m.trigger_id = wo.trigger_id AND m.topic = wo.topic
                   AND m.partition = wo.partition AND m.\"offset\" = wo.\"offset\"),
              ev AS (
                INSERT INTO events (kind, trigger_id, details)
                SELECT 'work_order_succeeded', wo.trigger_id,
                       jsonb_build_object('work_order_id', $4, 'set_id', $1, 'attempts', wo.attempts,
                                          'topic', wo.topic, 'partition', wo.partition, 'offset', wo.\"offset\")
                  FROM wo)
         SELECT count(*) FROM wo",
    )
    .bind(set_id)
    .bind(lock)
    .bind(lease_secs)
    .bind(wo)
    .bind(sqlx::types::Json(attempt))
    .bind(attempt.at)
    .fetch_one(pool)
    .await?;
    Ok(n == 1)
}

/// Removes the head message whose work order already finished (success or
/// skipped) before the worker that finished it could delete it.
pub async fn delete_finished_head(
    pool: &PgPool,
    set_id: i64,
    lock: Uuid,
    set: &ClaimedSet,
    partition: i32,
    offset: i64,
) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "DELETE FROM messages m
          WHERE m.trigger_id = $3 AND m.topic = $4 AND m.partition = $5 AND m.\"offset\" = $6
            AND EXISTS (SELECT 1 FROM message_sets WHERE id = $1 AND lock_id = $2)",
    )
    .bind(set_id)
    .bind(lock)
    .bind(set.trigger_id)
    .bind(&set.topic)
    .bind(partition)
    .bind(offset)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// What a failed or deferred attempt leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    /// Pending; the set waits until `retry_at`.
    RetryAt(DateTime<Utc>),
    /// The target answered 202: running until CompleteWorkOrder.
    Running,
    /// Failed for good: the set is blocked.
    Failed,
}

/// Records an attempt that did not succeed and releases the claim with the
/// set waiting or blocked. Returns whether the claim still held.
pub async fn record_attempt(
    pool: &PgPool,
    set_id: i64,
    lock: Uuid,
    wo: Uuid,
    attempt: &Attempt,
    after: AfterAttempt,
) -> Result<bool, sqlx::Error> {
    let (wo_state, set_state, retry_at) = match after {
        AfterAttempt::RetryAt(at) => ("pending", "waiting", Some(at)),
        AfterAttempt::Running => ("running", "waiting", None),
        AfterAttempt::Failed => ("failed", "blocked", None),
    };
    let n: i64 = sqlx::query_scalar(
        "WITH claim AS (SELECT id FROM message_sets WHERE id = $1 AND lock_id = $2 FOR UPDATE),
              wo AS (
                UPDATE work_orders
                   SET state = $4, attempts = attempts + 1, last_error = $5,
                       attempt_log = attempt_log || $6::jsonb,
                       first_attempt_at = COALESCE(first_attempt_at, $7), updated_at = now()
                 WHERE id = $3 AND EXISTS (SELECT 1 FROM claim)
                 RETURNING trigger_id, attempts, topic, partition, \"offset\"),
              s AS (
                UPDATE message_sets
                   SET state = $8, retry_at = $9, lock_id = NULL, lock_expires = NULL,
                       queued = ($8 = 'waiting' AND $9::timestamptz IS NOT NULL),
                       blocked_since = CASE WHEN $8 = 'blocked' THEN now() ELSE NULL END,
                       updated_at = now()
                 WHERE id = $1 AND EXISTS (SELECT 1 FROM wo)),
              ev AS (
                INSERT INTO events (kind, trigger_id, details)
                SELECT k, wo.trigger_id,
                       jsonb_build_object('work_order_id', $3, 'set_id', $1, 'attempts', wo.attempts, 'error', $5,
                                          'topic', wo.topic, 'partition', wo.partition, 'offset', wo.\"offset\")
                  FROM wo, unnest(CASE WHEN $4 = 'failed' THEN ARRAY['work_order_failed', 'set_blocked']
                                       ELSE ARRAY[]::text[] END) AS k)
         SELECT count(*) FROM wo",
    )
    .bind(set_id)
    .bind(lock)
    .bind(wo)
    .bind(wo_state)
    .bind(&attempt.error)
    .bind(sqlx::types::Json(attempt))
    .bind(attempt.at)
    .bind(set_state)
    .bind(retry_at)
    .fetch_one(pool)
    .await?;
    Ok(n == 1)
}

/// Releases the claim of a set whose head work order already waits (running,
/// retry scheduled) or failed (set blocked).
pub async fn park(pool: &PgPool, set_id: i64, lock: Uuid, after: AfterAttempt) -> Result<bool, sqlx::Error> {
    let (state, retry_at) = match after {
        AfterAttempt::RetryAt(at) => ("waiting", Some(at)),
        AfterAttempt::Running => ("waiting", None),
        AfterAttempt::Failed => ("blocked", None),
    };
    let n = sqlx::query(
        "UPDATE message_sets
            SET state = $3, retry_at = $4, lock_id = NULL, lock_expires = NULL,
                queued = ($3 = 'waiting' AND $4::timestamptz IS NOT NULL),
                blocked_since = CASE WHEN $3 = 'blocked' THEN COALESCE(blocked_since, now()) ELSE NULL END,
                updated_at = now()
          WHERE id = $1 AND lock_id = $2",
    )
    .bind(set_id)
    .bind(lock)
    .bind(state)
    .bind(retry_at)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Releases the claim of a set that still has a candidate to act on.
pub async fn release_ready(pool: &PgPool, set_id: i64, lock: Uuid) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE message_sets SET state = 'ready', retry_at = NULL, lock_id = NULL, lock_expires = NULL, updated_at = now()
          WHERE id = $1 AND lock_id = $2",
    )
    .bind(set_id)
    .bind(lock)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Marks an emptied keyed set idle, unless ingest added to it since
/// `seen_seq` was read (then the caller looks again). Deletes an emptied
/// unkeyed set: no message can join it.
pub async fn finish_empty(
    pool: &PgPool,
    set_id: i64,
    lock: Uuid,
    keyed: bool,
    seen_seq: i64,
) -> Result<bool, sqlx::Error> {
    let sql = if keyed {
        "UPDATE message_sets
            SET state = 'idle', queued = false, retry_at = NULL, lock_id = NULL, lock_expires = NULL, updated_at = now()
          WHERE id = $1 AND lock_id = $2 AND ingest_seq = $3"
    } else {
        "DELETE FROM message_sets WHERE id = $1 AND lock_id = $2 AND ingest_seq = $3"
    };
    let n = sqlx::query(sql).bind(set_id).bind(lock).bind(seen_seq).execute(pool).await?.rows_affected();
    Ok(n == 1)
}
