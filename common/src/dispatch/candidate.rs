//! The candidate (head) query: a set's lowest-offset stored message and that
//! message's work order. It exists once, here; the workers' round reads, the
//! success commit (the next candidate) and the operator actions all use it.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::state::{SetState, WorkOrderState};

/// A claimed set and its candidate, as a worker acts on it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Candidate {
    pub set_id: i64,
    pub lock_id: Uuid,
    pub trigger_id: Uuid,
    pub topic: String,
    /// The set's key; `None` for a partition set and a set of one message.
    pub set_key: Option<Vec<u8>>,
    /// Only for a set of one message: its offset.
    pub set_offset: Option<i64>,
    pub state: String,
    pub retry_at: Option<DateTime<Utc>>,
    /// The set's ingest sequence in the same snapshot as the candidate.
    pub ingest_seq: i64,
    #[sqlx(flatten)]
    pub head: HeadColumns,
}

/// The candidate's columns; all `None` when the set has no stored message.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct HeadColumns {
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
    pub wo_last_error: Option<String>,
    pub wo_body: Option<String>,
}

/// The head work order, when there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadWorkOrder {
    pub id: Uuid,
    pub state: WorkOrderState,
    pub attempts: u32,
    pub first_attempt_at: Option<DateTime<Utc>>,
}

impl HeadColumns {
    /// (partition, offset) of the candidate, `None` for an empty set.
    pub fn position(&self) -> Option<(i32, i64)> {
        Some((self.partition?, self.offset?))
    }

    pub fn work_order(&self) -> Option<HeadWorkOrder> {
        Some(HeadWorkOrder {
            id: self.wo_id?,
            // A state this build does not know is treated as not finished.
            state: self.wo_state.as_deref().and_then(WorkOrderState::parse).unwrap_or(WorkOrderState::Pending),
            attempts: self.wo_attempts.unwrap_or(0).max(0) as u32,
            first_attempt_at: self.wo_first_attempt_at,
        })
    }
}

impl Candidate {
    pub fn set_state(&self) -> SetState {
        SetState::parse(&self.state).unwrap_or(SetState::Ready)
    }
}

/// The head columns every candidate query returns, in [`HeadColumns`] order.
pub(crate) const HEAD_COLUMNS: &str =
    "c.partition, c.\"offset\", c.key, c.value, c.header_names, c.header_values, c.ts,
     (c.wo).id AS wo_id, (c.wo).state AS wo_state, (c.wo).attempts AS wo_attempts,
     (c.wo).first_attempt_at AS wo_first_attempt_at, (c.wo).last_error AS wo_last_error, (c.wo).body AS wo_body";

/// A relation `c` with, for every row of `src`, the columns `pass` of `src`
/// followed by the candidate (select [`HEAD_COLUMNS`] and `c.<pass>` from it).
///
/// `src` must have the columns `trigger_id`, `topic`, `set_key`,
/// `set_partition`, `set_offset` (a partition set has only the partition, a
/// set of one message both) and
/// `after_partition`, `after_offset`: when not null, the candidate is the
/// first message after that position (the one just delivered, deleted in the
/// same statement and so still visible in its snapshot).
///
/// The three branches (keyed, one message, partition) are index probes
/// (`messages_set_idx`, the messages primary key), switched on per row by a
/// one-time filter. The work order is looked
/// up by its whole unique key through a scalar subquery (a lateral join let
/// a planner with stale statistics probe by trigger and topic only), and
/// `OFFSET 0` keeps the subquery whole so it runs once per row, not once per
/// column taken from it.
pub(crate) fn candidates_of(src: &str, pass: &[&str]) -> String {
    let pass: String = pass.iter().map(|c| format!("src.{c}, ")).collect();
    format!(
        "(SELECT {pass}h.partition, h.\"offset\", h.key, h.value, h.header_names, h.header_values, h.ts,
                (SELECT w FROM work_orders w
                  WHERE w.trigger_id = src.trigger_id AND w.topic = src.topic
                    AND w.partition = h.partition AND w.\"offset\" = h.\"offset\") AS wo
           FROM {src} src
           LEFT JOIN LATERAL (
                (SELECT m.partition, m.\"offset\", m.key, m.value, m.header_names, m.header_values, m.ts
                   FROM messages m
                  WHERE src.set_key IS NOT NULL
                    AND m.trigger_id = src.trigger_id AND m.topic = src.topic AND m.key = src.set_key
                    AND (m.partition, m.\"offset\")
                        > (COALESCE(src.after_partition, -1), COALESCE(src.after_offset, -1::bigint))
                  ORDER BY m.partition, m.\"offset\" LIMIT 1)
                UNION ALL
                (SELECT m.partition, m.\"offset\", m.key, m.value, m.header_names, m.header_values, m.ts
                   FROM messages m
                  WHERE src.set_key IS NULL AND src.set_offset IS NOT NULL AND src.after_offset IS NULL
                    AND m.trigger_id = src.trigger_id AND m.topic = src.topic
                    AND m.partition = src.set_partition AND m.\"offset\" = src.set_offset)
                UNION ALL
                (SELECT m.partition, m.\"offset\", m.key, m.value, m.header_names, m.header_values, m.ts
                   FROM messages m
                  WHERE src.set_key IS NULL AND src.set_offset IS NULL
                    AND m.trigger_id = src.trigger_id AND m.topic = src.topic AND m.partition = src.set_partition
                    AND m.\"offset\" > COALESCE(src.after_offset, -1::bigint)
                  ORDER BY m.\"offset\" LIMIT 1)
           ) h ON true
         OFFSET 0) c"
    )
}

/// The key of the message at (`partition`, `offset`) of a set, for its work
/// order: the set's own key when it has one; else read from the message (a
/// partition set, or an unordered trigger's set of one message, holds
/// messages of any key). Columns are given as SQL expressions; the lookup
/// is a primary-key probe, made only for sets without a key.
pub(crate) fn message_key(set_key: &str, trigger: &str, topic: &str, partition: &str, offset: &str) -> String {
    format!(
        "COALESCE({set_key}, (SELECT m.key FROM messages m WHERE m.trigger_id = {trigger} AND m.topic = {topic}
                              AND m.partition = {partition} AND m.\"offset\" = {offset}))"
    )
}
