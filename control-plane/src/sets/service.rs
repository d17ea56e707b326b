//! Message-set operations. Each action locks the set row, checks the state,
//! writes the change and its events in one transaction, and hands a set that
//! became ready to the scheduler after the commit, so a worker gets it at
//! once instead of at the next sweep.
//!
//! - retry: only a blocked set. The head work order gets a fresh retry budget
//!   and the set is ready again.
//! - skip: a blocked or waiting set (a retry scheduled, or a 202 waiting for
//!   CompleteWorkOrder). The head message's work order becomes `skipped` (one
//!   with body `{}` is recorded if the head never had one), the message is
//!   deleted, and the set is ready so the next message becomes the candidate
//!   (a worker that finds none marks the set idle).
//! - discard: any set no worker holds. Every stored message of the set is
//!   deleted, their unfinished work orders (pending, running, failed) become
//!   `skipped` so none stays `failed` silently, and the set row goes.
//!
//! A set a worker holds a live claim on is refused (skip, discard): the
//! worker is acting on its head right now. Any stale (expired) claim is
//! cleared by the action, so the late writes of its worker are fenced off.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use kt_common::dispatch::{SetState as Stored, WorkOrderState};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::store::{self, SetRow};
use super::SetError;
use crate::events::{self, EventKind};
use crate::scheduler::Scheduler;

pub use crate::paging::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};

/// A set's state as operators see it: the stored state, with a live worker
/// claim shown as in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetState {
    Ready,
    InFlight,
    Waiting,
    Blocked,
    Idle,
}

impl SetState {
    /// The operator's view of a stored state: a claimed ready or waiting
    /// set is in flight.
    fn of(stored: &str, claimed: bool) -> Self {
        match Stored::parse(stored) {
            Some(Stored::Ready | Stored::Waiting) if claimed => SetState::InFlight,
            Some(Stored::Ready) => SetState::Ready,
            Some(Stored::Waiting) => SetState::Waiting,
            Some(Stored::Blocked) => SetState::Blocked,
            Some(Stored::Idle) | None => SetState::Idle,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SetState::Ready => "ready",
            SetState::InFlight => "in flight",
            SetState::Waiting => "waiting",
            SetState::Blocked => "blocked",
            SetState::Idle => "idle",
        }
    }
}

impl fmt::Display for SetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which sets to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetFilter {
    /// Every set with stored messages: all but idle ones.
    Active,
    /// Exactly the sets shown in this state.
    Only(SetState),
}

#[derive(Debug, Clone)]
pub struct SetListQuery {
    pub trigger_id: Option<Uuid>,
    /// Only the keyed sets of this key.
    pub key: Option<Vec<u8>>,
    pub filter: SetFilter,
    pub page_size: i32,
    pub page_token: String,
}

/// A set ready to be shown.
#[derive(Debug, Clone)]
pub struct SetView {
    pub row: SetRow,
    pub state: SetState,
    /// Why the set is in its state, for humans.
    pub reason: String,
}

impl SetView {
    fn new(row: SetRow) -> Self {
        let state = SetState::of(&row.state, row.claimed_until.is_some());
        let reason = reason(&row, state);
        Self { row, state, reason }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn reason(row: &SetRow, state: SetState) -> String {
    let attempts = row.wo_attempts.unwrap_or(0);
    let error = row.wo_last_error.as_deref().unwrap_or("no error recorded");
    let wo_state = row.wo_state.as_deref().map(|s| (s, WorkOrderState::parse(s)));
    match (state, row.wo_id, wo_state) {
        (SetState::Blocked, Some(wo), Some((_, Some(WorkOrderState::Failed)))) => {
            format!("work order {wo} failed after {attempts} attempt(s): {error}")
        }
        (SetState::Blocked, Some(wo), Some((wo_state, _))) => format!("blocked on work order {wo} ({wo_state})"),
        (SetState::Blocked, _, _) => "blocked; the head message has no work order yet".into(),
        (SetState::Waiting, Some(wo), Some((_, Some(WorkOrderState::Running)))) => {
            format!("work order {wo} was accepted by the target; waiting for CompleteWorkOrder")
        }
        (SetState::Waiting, Some(wo), _) => match row.retry_at {
            Some(at) => {
                format!("work order {wo} failed {attempts} attempt(s), last: {error}; next attempt at {}", rfc3339(at))
            }
            None => format!("waiting on work order {wo}"),
        },
        (SetState::Waiting, None, _) => "waiting".into(),
        (SetState::InFlight, _, _) => match row.claimed_until {
            Some(until) => format!("a worker holds the set until {}", rfc3339(until)),
            None => "a worker holds the set".into(),
        },
        (SetState::Ready, _, _) => "waiting for a worker".into(),
        (SetState::Idle, _, _) => "no stored messages".into(),
    }
}

/// What `DiscardMessageSet` removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discarded {
    pub messages: i64,
    pub skipped_work_orders: i64,
}

#[derive(Clone)]
pub struct SetService {
    pool: PgPool,
    scheduler: Scheduler,
}

impl SetService {
    pub fn new(pool: PgPool, scheduler: Scheduler) -> Self {
        Self { pool, scheduler }
    }

    pub async fn get(&self, id: i64) -> Result<SetView, SetError> {
        let row = store::get(&self.pool, id).await?.ok_or(SetError::NotFound(id))?;
        Ok(SetView::new(row))
    }

    /// A page of sets in id order and the token of the next page (empty on
    /// the last).
    pub async fn list(&self, query: &SetListQuery) -> Result<(Vec<SetView>, String), SetError> {
        let (limit, after) =
            crate::paging::page::<i64>(query.page_size, &query.page_token).map_err(|v| SetError::Invalid(vec![v]))?;
        let trigger = query.trigger_id;
        let fetch = limit + 1;
        // Which stored states a filter lists, and whether sets a worker
        // holds are included; the sets in flight come from the claims.
        let by_state: Option<(&[Stored], bool)> = match query.filter {
            SetFilter::Only(SetState::InFlight) => None,
            SetFilter::Active => Some((&[Stored::Ready, Stored::Waiting, Stored::Blocked], true)),
            SetFilter::Only(SetState::Ready) => Some((&[Stored::Ready], false)),
            SetFilter::Only(SetState::Waiting) => Some((&[Stored::Waiting], false)),
            SetFilter::Only(SetState::Blocked) => Some((&[Stored::Blocked], true)),
            SetFilter::Only(SetState::Idle) => Some((&[Stored::Idle], true)),
        };
        let mut rows = match (by_state, &query.key) {
            (None, None) => store::list_claimed(&self.pool, trigger, after, fetch).await?,
            (None, Some(key)) => {
                let claimable = [Stored::Ready, Stored::Waiting];
                store::list_by_key(&self.pool, key, trigger, &claimable, true, true, after, fetch).await?
            }
            (Some((states, with_live_claims)), None) => {
                store::list_in_states(&self.pool, trigger, states, with_live_claims, after, fetch).await?
            }
            (Some((states, with_live_claims)), Some(key)) => {
                store::list_by_key(&self.pool, key, trigger, states, with_live_claims, false, after, fetch).await?
            }
        };
        let next = crate::paging::next_token(&mut rows, limit, |r| r.id);
        Ok((rows.into_iter().map(SetView::new).collect(), next))
    }

    /// Starts a new attempt of the head work order of a blocked set.
    pub async fn retry(&self, id: i64) -> Result<SetView, SetError> {
        let mut tx = self.pool.begin().await?;
        let set = store::lock(&mut tx, id).await?.ok_or(SetError::NotFound(id))?;
        let state = SetState::of(&set.state, set.claimed_until.is_some());
        if state != SetState::Blocked {
            return Err(SetError::NotBlocked { id, state });
        }
        let head = store::head(&mut tx, &set).await?;
        let work_order = head.as_ref().and_then(|h| h.wo_id);
        if let Some(wo) = work_order {
            store::reset_for_retry(&mut tx, wo).await?;
        }
        store::mark_ready(&mut tx, id).await?;
        events::record(
            &mut *tx,
            EventKind::SetUnblocked,
            Some(set.trigger_id),
            None,
            json!({
                "set_id": id,
                "action": "retry",
                "work_order_id": work_order,
                "topic": set.topic,
                "partition": head.as_ref().map(|h| h.partition),
                "offset": head.as_ref().map(|h| h.offset),
            }),
        )
        .await?;
        let view = store::get(&mut *tx, id).await?.ok_or(SetError::NotFound(id))?;
        tx.commit().await?;
        self.scheduler.wake().await;
        tracing::info!(set_id = id, trigger_id = %set.trigger_id, work_order_id = ?work_order, "blocked set retried");
        Ok(SetView::new(view))
    }

    /// Skips the head message of a blocked or waiting set.
    pub async fn skip(&self, id: i64) -> Result<SetView, SetError> {
        let mut tx = self.pool.begin().await?;
        let set = store::lock(&mut tx, id).await?.ok_or(SetError::NotFound(id))?;
        if let Some(until) = set.claimed_until {
            return Err(SetError::Claimed { id, until });
        }
        let state = SetState::of(&set.state, false);
        if !matches!(state, SetState::Blocked | SetState::Waiting) {
            return Err(SetError::NotSkippable { id, state });
        }
        let head = store::head(&mut tx, &set).await?.ok_or(SetError::NothingToSkip { id })?;
        let work_order = match head.wo_id {
            Some(wo) => {
                store::skip_work_order(&mut tx, wo).await?;
                wo
            }
            None => store::insert_skipped_work_order(&mut tx, &set, head.partition, head.offset).await?,
        };
        store::delete_message(&mut tx, set.trigger_id, &set.topic, head.partition, head.offset).await?;
        store::mark_ready(&mut tx, id).await?;
        events::record(
            &mut *tx,
            EventKind::SetSkipped,
            Some(set.trigger_id),
            None,
            json!({
                "set_id": id,
                "work_order_id": work_order,
                "work_order_state": head.wo_state.map(|s| s.as_str()),
                "attempts": head.wo_attempts,
                "topic": set.topic,
                "partition": head.partition,
                "offset": head.offset,
            }),
        )
        .await?;
        if state == SetState::Blocked {
            unblocked(&mut tx, &set, "skip", Some(work_order)).await?;
        }
        let view = store::get(&mut *tx, id).await?.ok_or(SetError::NotFound(id))?;
        tx.commit().await?;
        self.scheduler.wake().await;
        tracing::info!(set_id = id, trigger_id = %set.trigger_id, work_order_id = %work_order,
            partition = head.partition, offset = head.offset, "head message skipped");
        Ok(SetView::new(view))
    }

    /// Drops every stored message of a set, and the set.
    pub async fn discard(&self, id: i64) -> Result<Discarded, SetError> {
        let mut tx = self.pool.begin().await?;
        let set = store::lock(&mut tx, id).await?.ok_or(SetError::NotFound(id))?;
        if let Some(until) = set.claimed_until {
            return Err(SetError::Claimed { id, until });
        }
        let state = SetState::of(&set.state, false);
        let (messages, skipped_work_orders) = store::delete_messages(&mut tx, &set).await?;
        store::delete(&mut tx, id).await?;
        events::record(
            &mut *tx,
            EventKind::SetDiscarded,
            Some(set.trigger_id),
            None,
            json!({
                "set_id": id,
                "state": state.as_str(),
                "topic": set.topic,
                "key": set.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()),
                "key_hex": set.key.as_deref().map(hex),
                "partition": set.partition,
                "offset": set.offset,
                "discarded_messages": messages,
                "skipped_work_orders": skipped_work_orders,
            }),
        )
        .await?;
        if state == SetState::Blocked {
            unblocked(&mut tx, &set, "discard", None).await?;
        }
        tx.commit().await?;
        tracing::info!(set_id = id, trigger_id = %set.trigger_id, messages, skipped_work_orders, "message set discarded");
        Ok(Discarded { messages, skipped_work_orders })
    }
}

/// Every way out of `blocked` emits `set_unblocked`, so a consumer tracking
/// blocked sets from the event stream sees each one end.
async fn unblocked(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    set: &store::LockedSet,
    action: &str,
    work_order: Option<Uuid>,
) -> Result<(), sqlx::Error> {
    events::record(
        &mut **tx,
        EventKind::SetUnblocked,
        Some(set.trigger_id),
        None,
        json!({"set_id": set.id, "action": action, "work_order_id": work_order, "topic": set.topic}),
    )
    .await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_live_claim_shows_as_in_flight() {
        assert_eq!(SetState::of("ready", true), SetState::InFlight);
        assert_eq!(SetState::of("waiting", true), SetState::InFlight);
        assert_eq!(SetState::of("ready", false), SetState::Ready);
        assert_eq!(SetState::of("waiting", false), SetState::Waiting);
        assert_eq!(SetState::of("blocked", false), SetState::Blocked);
        assert_eq!(SetState::of("idle", false), SetState::Idle);
    }

    #[test]
    fn test_hex_encodes_every_byte() {
        assert_eq!(hex(&[0x00, 0xff, 0x1a]), "00ff1a");
    }
}
