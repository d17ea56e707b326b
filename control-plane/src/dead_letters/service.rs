//! Dead-letter operations and their errors.
//!
//! - replay: locks the dead letter, then the set of its key (created idle if
//!   it is gone). Refused while a worker holds a live claim (ABORTED: try
//!   again) and while the set waits or is blocked (FAILED_PRECONDITION: the
//!   key's head has work under way, which the replay would overtake).
//!   Otherwise the message goes back at its original position, which
//!   precedes every stored message of the key, so it is the head; its work
//!   order is pending with a fresh retry budget and the set is ready.
//! - delete: drops the dead letter; its work order stays failed.

use chrono::{DateTime, SecondsFormat, Utc};
use kt_common::dispatch::dead_letter;
use kt_common::dispatch::SetState;
use kt_proto::status::FieldViolation;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::store::{self, DeadLetterRow};
use crate::events::{self, EventKind};
use crate::paging;
use crate::scheduler::Scheduler;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    #[error("dead letter {0} not found")]
    NotFound(Uuid),
    #[error("the message set {set_id} of dead letter {id} is being processed by a worker (claim held until {}); try again shortly", .until.to_rfc3339_opts(SecondsFormat::Millis, true))]
    Claimed { id: Uuid, set_id: i64, until: DateTime<Utc> },
    #[error("the message set {set_id} of dead letter {id} is {state}: its head message has work under way; replay it once the set is ready or idle")]
    Busy { id: Uuid, set_id: i64, state: SetState },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub set_id: i64,
    pub work_order_id: Uuid,
}

#[derive(Clone)]
pub struct DeadLetterService {
    pool: PgPool,
    scheduler: Scheduler,
}

impl DeadLetterService {
    pub fn new(pool: PgPool, scheduler: Scheduler) -> Self {
        Self { pool, scheduler }
    }

    pub async fn get(&self, id: Uuid) -> Result<DeadLetterRow, DeadLetterError> {
        store::get(&self.pool, id).await?.ok_or(DeadLetterError::NotFound(id))
    }

    /// A page of the trigger's dead letters, oldest first, and the next
    /// page's token (empty on the last).
    pub async fn list(
        &self,
        trigger: Uuid,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<DeadLetterRow>, String), DeadLetterError> {
        let (limit, after) = paging::page(page_size, page_token).map_err(|v| DeadLetterError::Invalid(vec![v]))?;
        let mut rows = store::list(&self.pool, trigger, after, limit + 1).await?;
        let next = paging::next_token(&mut rows, limit, |r| r.id);
        Ok((rows, next))
    }

    pub async fn replay(&self, id: Uuid) -> Result<Replayed, DeadLetterError> {
        let mut tx = self.pool.begin().await?;
        let dl = dead_letter::lock(&mut tx, id).await?.ok_or(DeadLetterError::NotFound(id))?;
        let set = dead_letter::lock_set(&mut tx, &dl).await?;
        if let Some(until) = set.claimed_until {
            return Err(DeadLetterError::Claimed { id, set_id: set.id, until });
        }
        let state = set.set_state();
        if matches!(state, SetState::Waiting | SetState::Blocked) {
            return Err(DeadLetterError::Busy { id, set_id: set.id, state });
        }
        dead_letter::put_back(&mut tx, &dl, &set).await?;
        let details = json!({
            "dead_letter_id": id, "set_id": set.id, "work_order_id": dl.work_order_id,
            "topic": dl.topic, "partition": dl.partition, "offset": dl.offset,
        });
        events::record(&mut *tx, EventKind::DeadLetterReplayed, Some(dl.trigger_id), None, details).await?;
        tx.commit().await?;
        self.scheduler.wake().await;
        tracing::info!(dead_letter_id = %id, trigger_id = %dl.trigger_id, set_id = set.id, "dead letter replayed");
        Ok(Replayed { set_id: set.id, work_order_id: dl.work_order_id })
    }

    pub async fn delete(&self, id: Uuid) -> Result<(), DeadLetterError> {
        let mut tx = self.pool.begin().await?;
        let (trigger, work_order, partition, offset) =
            store::delete(&mut *tx, id).await?.ok_or(DeadLetterError::NotFound(id))?;
        let details =
            json!({"dead_letter_id": id, "work_order_id": work_order, "partition": partition, "offset": offset});
        events::record(&mut *tx, EventKind::DeadLetterDeleted, Some(trigger), None, details).await?;
        tx.commit().await?;
        tracing::info!(dead_letter_id = %id, trigger_id = %trigger, "dead letter deleted");
        Ok(())
    }
}
