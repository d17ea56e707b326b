//! SQL of the `dead_letters` table for the operator API. A trigger's listing
//! walks `dead_letters_trigger_idx` (trigger_id, id).

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

/// A row of `dead_letters`; `attempt_log` (JSON text) only when read one at
/// a time.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub id: Uuid,
    pub trigger_id: Uuid,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub header_names: Vec<String>,
    pub header_values: Vec<Option<Vec<u8>>>,
    pub ts: Option<DateTime<Utc>>,
    pub work_order_id: Uuid,
    pub attempts: i32,
    pub attempt_log: Option<String>,
    pub last_error: Option<String>,
    pub produced_topic: Option<String>,
    pub produced_partition: Option<i32>,
    pub produced_offset: Option<i64>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, trigger_id, topic, partition, \"offset\", key, value, header_names, header_values, ts,
    work_order_id, attempts, last_error, produced_topic, produced_partition, produced_offset, created_at";

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<DeadLetterRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS}, attempt_log::text AS attempt_log FROM dead_letters WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Up to `limit` dead letters of `trigger` with id > `after`, oldest first.
pub async fn list(
    db: impl PgExecutor<'_>,
    trigger: Uuid,
    after: Uuid,
    limit: i64,
) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS}, NULL::text AS attempt_log FROM dead_letters
          WHERE trigger_id = $1 AND id > $2 ORDER BY id LIMIT $3"
    ))
    .bind(trigger)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Deletes a dead letter; returns it, `None` if there was none.
pub async fn delete(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<(Uuid, Uuid, i32, i64)>, sqlx::Error> {
    sqlx::query_as("DELETE FROM dead_letters WHERE id = $1 RETURNING trigger_id, work_order_id, partition, \"offset\"")
        .bind(id)
        .fetch_optional(db)
        .await
}
