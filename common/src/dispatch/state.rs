//! The typed states of message sets and work orders, the event kinds their
//! transitions record, and the deterministic work-order id. These are the
//! only places the stored strings are spelled out.

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// `message_sets.state`. A claim (`lock_id`) is orthogonal: a ready or
/// waiting set a worker holds is "in flight" to an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetState {
    /// Has a candidate that needs a worker.
    Ready,
    /// No stored messages; the row is kept so the next message reuses it.
    Idle,
    /// The head work order waits for its retry time (`retry_at`) or for an
    /// asynchronous runner (202 Accepted, then `CompleteWorkOrder`).
    Waiting,
    /// The head work order failed for good; an operator must act.
    Blocked,
}

impl SetState {
    pub const fn as_str(self) -> &'static str {
        match self {
            SetState::Ready => "ready",
            SetState::Idle => "idle",
            SetState::Waiting => "waiting",
            SetState::Blocked => "blocked",
        }
    }

    pub fn parse(stored: &str) -> Option<Self> {
        [SetState::Ready, SetState::Idle, SetState::Waiting, SetState::Blocked]
            .into_iter()
            .find(|s| s.as_str() == stored)
    }
}

impl fmt::Display for SetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `work_orders.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkOrderState {
    /// Recorded, not delivered yet (its first attempt failed and a retry is
    /// due, or an operator reset it for a retry).
    Pending,
    /// The target answered 202: running until `CompleteWorkOrder`.
    Running,
    Success,
    Failed,
    Skipped,
}

impl WorkOrderState {
    pub const ALL: [WorkOrderState; 5] = [
        WorkOrderState::Pending,
        WorkOrderState::Running,
        WorkOrderState::Success,
        WorkOrderState::Failed,
        WorkOrderState::Skipped,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            WorkOrderState::Pending => "pending",
            WorkOrderState::Running => "running",
            WorkOrderState::Success => "success",
            WorkOrderState::Failed => "failed",
            WorkOrderState::Skipped => "skipped",
        }
    }

    pub fn parse(stored: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == stored)
    }

    /// The message of a finished work order is removed; its set moves on.
    pub const fn is_finished(self) -> bool {
        matches!(self, WorkOrderState::Success | WorkOrderState::Skipped)
    }
}

impl fmt::Display for WorkOrderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `events.kind`: the names match the public `EventKind` without its
/// prefix, lowercased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    PersistenceFailed,
    WorkOrderCreated,
    WorkOrderSucceeded,
    WorkOrderFailed,
    SetBlocked,
    SetUnblocked,
    SetSkipped,
    SetDiscarded,
    MessageDeadLettered,
    DeadLetterReplayed,
    DeadLetterDeleted,
}

impl EventKind {
    pub const fn as_str(self) -> &'static str {
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
            EventKind::PersistenceFailed => "persistence_failed",
            EventKind::WorkOrderCreated => "work_order_created",
            EventKind::WorkOrderSucceeded => "work_order_succeeded",
            EventKind::WorkOrderFailed => "work_order_failed",
            EventKind::SetBlocked => "set_blocked",
            EventKind::SetUnblocked => "set_unblocked",
            EventKind::SetSkipped => "set_skipped",
            EventKind::SetDiscarded => "set_discarded",
            EventKind::MessageDeadLettered => "message_dead_lettered",
            EventKind::DeadLetterReplayed => "dead_letter_replayed",
            EventKind::DeadLetterDeleted => "dead_letter_deleted",
        }
    }
}

/// What an attempt that did not succeed leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    /// Pending; the set waits until the retry time.
    RetryAt(DateTime<Utc>),
    /// The target answered 202: running until CompleteWorkOrder.
    Running,
    /// Failed for good: the set is blocked.
    Failed,
    /// Failed for good under the dead-letter policy, but its dead letter
    /// could not be produced to the trigger's dead-letter topic: the work
    /// order is failed and the set waits until then to produce it again.
    DeadLetterAt(DateTime<Utc>),
}

impl AfterAttempt {
    pub fn work_order_state(self) -> WorkOrderState {
        match self {
            AfterAttempt::RetryAt(_) => WorkOrderState::Pending,
            AfterAttempt::Running => WorkOrderState::Running,
            AfterAttempt::Failed | AfterAttempt::DeadLetterAt(_) => WorkOrderState::Failed,
        }
    }

    pub fn set_state(self) -> SetState {
        match self {
            AfterAttempt::RetryAt(_) | AfterAttempt::Running | AfterAttempt::DeadLetterAt(_) => SetState::Waiting,
            AfterAttempt::Failed => SetState::Blocked,
        }
    }

    pub fn retry_at(self) -> Option<DateTime<Utc>> {
        match self {
            AfterAttempt::RetryAt(at) | AfterAttempt::DeadLetterAt(at) => Some(at),
            _ => None,
        }
    }
}

/// One delivery attempt, as kept in `work_orders.attempt_log`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    pub at: DateTime<Utc>,
    pub ms: u64,
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The id of the work order of message (trigger, topic, partition, offset):
/// a UUID v5 named by the message's coordinates in the trigger's namespace.
/// The same message always gets the same id, so a work order re-created
/// after any crash keeps its id and the target sees the same
/// `Idempotency-Key`.
pub fn work_order_id(trigger_id: Uuid, topic: &str, partition: i32, offset: i64) -> Uuid {
    let mut name = Vec::with_capacity(topic.len() + 13);
    name.extend_from_slice(topic.as_bytes());
    // Topic names cannot contain NUL, so the split is unambiguous.
    name.push(0);
    name.extend_from_slice(&partition.to_be_bytes());
    name.extend_from_slice(&offset.to_be_bytes());
    Uuid::new_v5(&trigger_id, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_work_order_ids_are_deterministic_and_distinct() {
        let t = Uuid::from_u128(7);
        let id = work_order_id(t, "orders", 2, 41);
        assert_eq!(id, work_order_id(t, "orders", 2, 41));
        assert_eq!(id.get_version_num(), 5);
        let others = [
            work_order_id(Uuid::from_u128(8), "orders", 2, 41),
            work_order_id(t, "orders2", 2, 41),
            work_order_id(t, "orders", 3, 41),
            work_order_id(t, "orders", 2, 42),
            // The separator keeps "a" + partition from colliding with "a\x00..." forms.
            work_order_id(t, "order", 2, 41),
        ];
        for other in others {
            assert_ne!(id, other);
        }
    }

    #[test]
    fn test_states_round_trip_through_their_stored_names() {
        for s in [SetState::Ready, SetState::Idle, SetState::Waiting, SetState::Blocked] {
            assert_eq!(SetState::parse(s.as_str()), Some(s));
        }
        for s in WorkOrderState::ALL {
            assert_eq!(WorkOrderState::parse(s.as_str()), Some(s));
        }
        assert_eq!(SetState::parse("in flight"), None);
    }
}
