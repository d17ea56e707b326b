//! SQL of the `work_orders` table for the operator API. Listing walks the
//! primary key (no filter) or `work_orders_state_trigger_idx` (state,
//! trigger_id, id) per (trigger, state) pair, so a page costs at most a page
//! of index rows per pair, whatever the history kept. A key filter walks
//! `work_orders_key_idx` (key, id); an offset range reads the range from the
//! unique key (trigger_id, topic, partition, offset) of each trigger.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgExecutor, Postgres, Transaction};
use uuid::Uuid;

/// A row of `work_orders`; `body` and `attempt_log` (as JSON text) only when
/// read one at a time.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkOrderRow {
    pub id: Uuid,
    pub trigger_id: Uuid,
    pub set_id: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub body: Option<String>,
    pub attempt_log: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const SUMMARY_COLUMNS: &str = "w.id, w.trigger_id, w.set_id, w.topic, w.partition, w.\"offset\", w.key, w.state,
    w.attempts, w.last_error, NULL::text AS body, NULL::text AS attempt_log, w.created_at, w.updated_at";

const FULL_COLUMNS: &str = "w.id, w.trigger_id, w.set_id, w.topic, w.partition, w.\"offset\", w.key, w.state,
    w.attempts, w.last_error, w.body, w.attempt_log::text AS attempt_log, w.created_at, w.updated_at";

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<WorkOrderRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {FULL_COLUMNS} FROM work_orders w WHERE w.id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Up to `limit` work orders with id > `after`, in id order (ids derive from
/// the message, so this is a stable order, not creation order), without
/// bodies.
pub async fn list_all(db: impl PgExecutor<'_>, after: Uuid, limit: i64) -> Result<Vec<WorkOrderRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {SUMMARY_COLUMNS} FROM work_orders w WHERE w.id > $1 ORDER BY w.id LIMIT $2"))
        .bind(after)
        .bind(limit)
        .fetch_all(db)
        .await
}

/// Like [`list_all`], restricted to one trigger (or every trigger) and to
/// `states`: each (trigger, state) pair reads at most `limit` index rows.
pub async fn list_filtered(
    db: impl PgExecutor<'_>,
    trigger: Option<Uuid>,
    states: &[&str],
    after: Uuid,
    limit: i64,
) -> Result<Vec<WorkOrderRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT p.* FROM (SELECT id FROM triggers WHERE $1::uuid IS NULL OR id = $1) t
          CROSS JOIN unnest($2::text[]) AS st(state)
          CROSS JOIN LATERAL (
               SELECT {SUMMARY_COLUMNS} FROM work_orders w
                WHERE w.trigger_id = t.id AND w.state = st.state AND w.id > $3
                ORDER BY w.id LIMIT $4) p
         ORDER BY p.id LIMIT $4"
    ))
    .bind(trigger)
    .bind(states)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// What [`list_by_key`] and [`list_in_range`] filter on besides their index.
#[derive(Debug, Clone, Copy)]
pub struct Filter<'a> {
    pub trigger: Option<Uuid>,
    pub states: &'a [&'a str],
    pub after: Uuid,
    pub limit: i64,
}

/// The query of [`list_by_key`] (public for the EXPLAIN test).
pub fn by_key_query() -> String {
    format!(
        "SELECT {SUMMARY_COLUMNS} FROM work_orders w
          WHERE w.key = $1 AND w.key IS NOT NULL AND ($2::uuid IS NULL OR w.trigger_id = $2)
            AND w.state = ANY($3::text[]) AND w.id > $4
          ORDER BY w.id LIMIT $5"
    )
}

/// Up to `limit` work orders of messages keyed `key`, in id order.
pub async fn list_by_key(db: impl PgExecutor<'_>, key: &[u8], f: Filter<'_>) -> Result<Vec<WorkOrderRow>, sqlx::Error> {
    sqlx::query_as(&by_key_query())
        .bind(key)
        .bind(f.trigger)
        .bind(f.states)
        .bind(f.after)
        .bind(f.limit)
        .fetch_all(db)
        .await
}

/// The query of [`list_in_range`] (public for the EXPLAIN test). Both
/// bounds are index conditions, also in a generic plan (no upper bound is
/// `i64::MAX`, an offset Kafka never reaches).
pub fn in_range_query() -> String {
    format!(
        "SELECT p.* FROM (SELECT id FROM triggers WHERE $1::uuid IS NULL OR id = $1) t
          CROSS JOIN LATERAL (
               SELECT {SUMMARY_COLUMNS} FROM work_orders w
                WHERE w.trigger_id = t.id AND w.topic = $2 AND w.partition = $3
                  AND w.\"offset\" >= $4 AND w.\"offset\" < COALESCE($5::bigint, 9223372036854775807)
                  AND ($6::bytea IS NULL OR w.key = $6)
                  AND w.state = ANY($7::text[]) AND w.id > $8
                ORDER BY w.id LIMIT $9) p
         ORDER BY p.id LIMIT $9"
    )
}

/// Up to `limit` work orders of the messages at `from <= offset < to` (no
/// upper bound when `to` is `None`) in one topic and partition, optionally
/// only those keyed `key`, in id order.
#[allow(clippy::too_many_arguments)]
pub async fn list_in_range(
    db: impl PgExecutor<'_>,
    topic: &str,
    partition: i32,
    from: i64,
    to: Option<i64>,
    key: Option<&[u8]>,
    f: Filter<'_>,
) -> Result<Vec<WorkOrderRow>, sqlx::Error> {
    sqlx::query_as(&in_range_query())
        .bind(f.trigger)
        .bind(topic)
        .bind(partition)
        .bind(from)
        .bind(to)
        .bind(key)
        .bind(f.states)
        .bind(f.after)
        .bind(f.limit)
        .fetch_all(db)
        .await
}

/// The set a work order belongs to, read without locking (the caller locks
/// the set row first, then reads the work order again).
pub async fn set_of(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT set_id FROM work_orders WHERE id = $1").bind(id).fetch_optional(db).await
}

pub async fn get_for_update(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<Option<WorkOrderRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {FULL_COLUMNS} FROM work_orders w WHERE w.id = $1 FOR UPDATE"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
}

/// Whether the trigger's failure policy records dead letters (then a
/// failed work order does not block its set).
pub async fn dead_letters_failures(db: impl PgExecutor<'_>, trigger_id: Uuid) -> Result<bool, sqlx::Error> {
    let policy: Option<String> =
        sqlx::query_scalar("SELECT spec #>> '{on_failure,policy}' FROM triggers WHERE id = $1")
            .bind(trigger_id)
            .fetch_optional(db)
            .await?
            .flatten();
    Ok(policy.as_deref() == Some("dead_letter"))
}

/// Records the reported outcome of a running work order. The attempt that
/// got the 202 is already counted; the report is appended to its log.
pub async fn finish(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    state: &str,
    error: Option<&str>,
    log_entry: &serde_json::Value,
) -> Result<Option<WorkOrderRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE work_orders w
            SET state = $2, last_error = $3, attempt_log = w.attempt_log || jsonb_build_array($4::jsonb), updated_at = now()
          WHERE w.id = $1 AND w.state = 'running'
         RETURNING {FULL_COLUMNS}"
    ))
    .bind(id)
    .bind(state)
    .bind(error)
    .bind(Json(log_entry))
    .fetch_optional(&mut **tx)
    .await
}
