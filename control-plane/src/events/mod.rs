//! The event log: every change and operator action is appended to `events`
//! in the transaction that made it; [`stream`] serves it to subscribers.

pub mod stream;

use sqlx::types::Json;
use sqlx::PgExecutor;
use uuid::Uuid;

/// Event kinds as stored; the names match `EventKind` without its prefix,
/// lowercased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    TriggerCreated,
    TriggerUpdated,
    TriggerEnabled,
    TriggerDisabled,
    TriggerDeleted,
    NodeJoined,
    NodeLeft,
    PipelineStarted,
    PipelineStopped,
    PipelineFailed,
    WorkOrderSucceeded,
    WorkOrderFailed,
    SetBlocked,
    SetUnblocked,
    SetSkipped,
    SetDiscarded,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::TriggerCreated => "trigger_created",
            EventKind::TriggerUpdated => "trigger_updated",
            EventKind::TriggerEnabled => "trigger_enabled",
            EventKind::TriggerDisabled => "trigger_disabled",
            EventKind::TriggerDeleted => "trigger_deleted",
            EventKind::NodeJoined => "node_joined",
            EventKind::NodeLeft => "node_left",
            EventKind::PipelineStarted => "pipeline_started",
            EventKind::PipelineStopped => "pipeline_stopped",
            EventKind::PipelineFailed => "pipeline_failed",
            // The data plane's workers write these four in SQL: same strings.
            EventKind::WorkOrderSucceeded => "work_order_succeeded",
            EventKind::WorkOrderFailed => "work_order_failed",
            EventKind::SetBlocked => "set_blocked",
            EventKind::SetUnblocked => "set_unblocked",
            EventKind::SetSkipped => "set_skipped",
            EventKind::SetDiscarded => "set_discarded",
        }
    }
}

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
