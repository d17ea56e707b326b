//! The event log: every change and operator action is appended to `events`
//! in the transaction that made it; [`stream`] tails it for the live
//! subscribers, and [`follow`] serves each one its replay, then the live
//! events.

pub mod follow;
pub mod stream;

use sqlx::types::Json;
use sqlx::PgExecutor;
use uuid::Uuid;

/// Event kinds as stored: one list for the whole system, beside the set and
/// work-order states whose transitions record them.
pub use kt_common::dispatch::EventKind;

pub async fn record(
    db: impl PgExecutor<'_>,
    kind: EventKind,
    trigger_id: Option<Uuid>,
    node_id: Option<&str>,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO events (kind, trigger_id, node_id, details) VALUES ($1, $2, $3, $4)")
        .bind(kind.as_str())
        .bind(trigger_id)
        .bind(node_id)
        .bind(Json(details))
        .execute(db)
        .await?;
    Ok(())
}
