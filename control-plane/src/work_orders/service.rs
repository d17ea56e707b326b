//! Work-order operations: list and inspect, and `CompleteWorkOrder`, the
//! report of an asynchronous runner on a work order its target accepted
//! with 202 (state `running`, its set `waiting` with no retry time).
//!
//! Completion locks the set row first, then the work order, like the
//! workers do, and writes the outcome, the set's next state and the events
//! in one transaction:
//!
//! - success: the work order succeeds, its message is deleted and the set is
//!   ready (handed to the scheduler after commit) so the next message becomes
//!   the candidate;
//! - failure: the work order fails for good. Under the trigger's default
//!   policy its set is blocked until an operator retries, skips or discards
//!   it; under `ON_FAILURE_DEAD_LETTER` the set is made ready instead, and
//!   the worker that gets it finds the failed head and records (and
//!   produces) its dead letter exactly as for a failed delivery, so the key
//!   moves on.
//!
//! A worker claim on the set is cleared (fenced off): a worker looking at a
//! running head only parks the set, and would otherwise overwrite the new
//! state with `waiting`. A report that races the delivery itself (the target
//! answered 202 and its runner reported before the worker recorded
//! `running`) finds the work order pending under a live claim and gets
//! UNAVAILABLE, so the runner reports again.

use chrono::Utc;
use kt_common::dispatch::SetState;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::store::{self, WorkOrderRow};
use super::WorkOrderError;
use crate::events::{self, EventKind};
use crate::scheduler::Scheduler;
use crate::sets;

pub use crate::paging::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
/// Longest error text kept from a CompleteWorkOrder report; longer ones are
/// cut (a runner's stack trace should not be refused and leave the work
/// order running forever).
pub const MAX_ERROR_BYTES: usize = 8 * 1024;

/// The stored states of a work order: the shared state machine's.
pub use kt_common::dispatch::WorkOrderState;

/// Messages at `from <= offset < to` (no upper bound when `to` is `None`)
/// of one topic and partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetRange {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct WorkOrderListQuery {
    pub trigger_id: Option<Uuid>,
    pub state: Option<WorkOrderState>,
    /// Only work orders of messages with this key.
    pub key: Option<Vec<u8>>,
    pub range: Option<OffsetRange>,
    pub page_size: i32,
    pub page_token: String,
}

#[derive(Clone)]
pub struct WorkOrderService {
    pool: PgPool,
    scheduler: Scheduler,
}

impl WorkOrderService {
    pub fn new(pool: PgPool, scheduler: Scheduler) -> Self {
        Self { pool, scheduler }
    }

    pub async fn get(&self, id: Uuid) -> Result<WorkOrderRow, WorkOrderError> {
        store::get(&self.pool, id).await?.ok_or(WorkOrderError::NotFound(id))
    }

    /// A page of work orders in id order, without bodies, and the token of
    /// the next page (empty on the last).
    pub async fn list(&self, query: &WorkOrderListQuery) -> Result<(Vec<WorkOrderRow>, String), WorkOrderError> {
        let (limit, after) =
            crate::paging::page(query.page_size, &query.page_token).map_err(|v| WorkOrderError::Invalid(vec![v]))?;
        let states: Vec<&str> = match query.state {
            Some(s) => vec![s.as_str()],
            None => WorkOrderState::ALL.iter().map(|s| s.as_str()).collect(),
        };
        let filter = store::Filter { trigger: query.trigger_id, states: &states, after, limit: limit + 1 };
        let mut rows = match (&query.range, &query.key) {
            (Some(r), key) => {
                store::list_in_range(&self.pool, &r.topic, r.partition, r.from, r.to, key.as_deref(), filter).await?
            }
            (None, Some(key)) => store::list_by_key(&self.pool, key, filter).await?,
            (None, None) if query.trigger_id.is_none() && query.state.is_none() => {
                store::list_all(&self.pool, after, limit + 1).await?
            }
            (None, None) => store::list_filtered(&self.pool, query.trigger_id, &states, after, limit + 1).await?,
        };
        let next = crate::paging::next_token(&mut rows, limit, |r| r.id);
        Ok((rows, next))
    }

    /// Records the outcome an asynchronous runner reports for a running
    /// work order.
    pub async fn complete(&self, id: Uuid, success: bool, error: &str) -> Result<WorkOrderRow, WorkOrderError> {
        let error = (!success).then(|| clean_error(error));
        let mut tx = self.pool.begin().await?;
        let set_id = store::set_of(&mut *tx, id).await?.ok_or(WorkOrderError::NotFound(id))?;
        // The set row first, as the workers do; it may be gone (discarded).
        let set = sets::store::lock(&mut tx, set_id).await?;
        let current = store::get_for_update(&mut tx, id).await?.ok_or(WorkOrderError::NotFound(id))?;
        let claimed = set.as_ref().is_some_and(|s| s.claimed_until.is_some());
        if current.state == WorkOrderState::Pending.as_str() && claimed {
            return Err(WorkOrderError::InDelivery { id });
        }
        if current.state != WorkOrderState::Running.as_str() {
            return Err(WorkOrderError::NotRunning { id, state: current.state });
        }
        let (state, outcome) =
            if success { (WorkOrderState::Success, "success") } else { (WorkOrderState::Failed, "failure") };
        let entry = json!({"at": Utc::now(), "outcome": outcome, "error": error, "source": "complete_work_order"});
        let row = store::finish(&mut tx, id, state.as_str(), error.as_deref(), &entry)
            .await?
            .ok_or_else(|| WorkOrderError::NotRunning { id, state: current.state.clone() })?;
        let details = json!({
            "work_order_id": id,
            "set_id": row.set_id,
            "attempts": row.attempts,
            "error": error,
            "topic": row.topic,
            "partition": row.partition,
            "offset": row.offset,
            "source": "complete_work_order",
        });
        let mut ready = None;
        if success {
            sets::store::delete_message(&mut tx, row.trigger_id, &row.topic, row.partition, row.offset).await?;
            events::record(&mut *tx, EventKind::WorkOrderSucceeded, Some(row.trigger_id), None, details).await?;
            // A set blocked on another work order stays blocked.
            if let Some(set) = set.as_ref().filter(|s| s.state != SetState::Blocked.as_str()) {
                sets::store::mark_ready(&mut tx, set.id).await?;
                ready = Some((set.id, set.trigger_id));
            }
        } else {
            events::record(&mut *tx, EventKind::WorkOrderFailed, Some(row.trigger_id), None, details.clone()).await?;
            let dead_letters = store::dead_letters_failures(&mut *tx, row.trigger_id).await?;
            match &set {
                Some(set) if dead_letters && set.state != SetState::Blocked.as_str() => {
                    sets::store::mark_ready(&mut tx, set.id).await?;
                    ready = Some((set.id, set.trigger_id));
                }
                Some(set) => {
                    sets::store::mark_blocked(&mut tx, set.id).await?;
                    events::record(&mut *tx, EventKind::SetBlocked, Some(row.trigger_id), None, details).await?;
                }
                None => {}
            }
        }
        tx.commit().await?;
        if ready.is_some() {
            self.scheduler.wake().await;
        }
        tracing::info!(work_order_id = %id, trigger_id = %row.trigger_id, set_id = row.set_id, success, "work order completed");
        Ok(row)
    }
}

/// The error text as stored: never empty, no NUL (Postgres text refuses
/// it), at most [`MAX_ERROR_BYTES`] cut at a character boundary.
fn clean_error(error: &str) -> String {
    let error = error.trim();
    if error.is_empty() {
        return "reported failed by CompleteWorkOrder without an error message".into();
    }
    let mut text = error.replace('\0', "\u{fffd}");
    if text.len() > MAX_ERROR_BYTES {
        let mut cut = MAX_ERROR_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("… (truncated)");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_clean_error_never_empty_and_bounded() {
        assert!(!clean_error("  ").is_empty());
        assert_eq!(clean_error("a\0b"), "a\u{fffd}b");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cleaned = clean_error(&long);
        assert!(cleaned.len() <= MAX_ERROR_BYTES + "… (truncated)".len());
        assert!(cleaned.ends_with("(truncated)"));
    }

    #[test]
    fn test_state_names_round_trip() {
        for s in WorkOrderState::ALL {
            assert_eq!(WorkOrderState::parse(s.as_str()), Some(s));
        }
        assert_eq!(WorkOrderState::parse("nope"), None);
    }
}
