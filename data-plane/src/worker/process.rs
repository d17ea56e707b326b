//! What a worker does with one granted set: claim it, then act on its
//! candidate until the set is empty, waits, is blocked, or the time slice is
//! used up. The three paths of the design:
//!
//! - no work order → create it (pending) and deliver it;
//! - work order not successful yet → leave the set waiting (a retry time, or
//!   an asynchronous runner's CompleteWorkOrder), or blocked once it failed
//!   for good;
//! - work order succeeded → delete the message; the next one is the candidate.
//!
//! The work order is written before the POST, so a worker killed mid-delivery
//! leaves a pending work order that the next claim delivers again (at least
//! once towards the target, with the same `Idempotency-Key`; exactly one work
//! order per message in the database).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use kt_proto::internal::SetOutcomeKind;
use sqlx::PgPool;
use uuid::Uuid;

use super::store::{self, AfterAttempt, Attempt, ClaimedSet, Head, Unclaimable};
use super::TriggerConfig;
use crate::delivery::{build_body, next_step, DeliveryOutcome, MessageForBody, RetryDecision, WebhookClient};

/// Longest a worker keeps draining one set before handing it back, so a
/// single hot key cannot hold a worker forever.
pub const TIME_SLICE: Duration = Duration::from_millis(500);
/// Slack added to the webhook timeout for the claim's lease.
const LEASE_SLACK_SECS: f64 = 30.0;

/// The outcome of processing a set, as reported to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub kind: SetOutcomeKind,
    pub retry_at_unix_ms: i64,
}

impl Outcome {
    fn of(kind: SetOutcomeKind) -> Self {
        Self { kind, retry_at_unix_ms: 0 }
    }
}

/// Shared by every set task of a node.
pub struct Context {
    pub pool: PgPool,
    pub webhook: WebhookClient,
}

pub async fn process_set(ctx: &Context, set_id: i64, trigger: Arc<TriggerConfig>) -> Outcome {
    match process(ctx, set_id, &trigger).await {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::warn!(set_id, trigger_id = %trigger.id, %error, "cannot process set");
            Outcome::of(SetOutcomeKind::Retry)
        }
    }
}

async fn process(ctx: &Context, set_id: i64, trigger: &TriggerConfig) -> Result<Outcome, sqlx::Error> {
    let lease = f64::from(trigger.spec.webhook.timeout_ms) / 1000.0 + LEASE_SLACK_SECS;
    let lock = Uuid::now_v7();
    let set = match store::claim(&ctx.pool, set_id, lock, lease).await? {
        Ok(set) => set,
        Err(why) => {
            return Ok(Outcome::of(match why {
                Unclaimable::Gone => SetOutcomeKind::Gone,
                Unclaimable::Busy => SetOutcomeKind::Busy,
                Unclaimable::Idle => SetOutcomeKind::Idle,
                Unclaimable::Blocked => SetOutcomeKind::Blocked,
                Unclaimable::Waiting => SetOutcomeKind::Waiting,
            }))
        }
    };
    // A set waiting for its retry time is not acted on early.
    if set.state == "waiting" {
        if let Some(at) = set.retry_at.filter(|at| *at > Utc::now()) {
            store::park(&ctx.pool, set_id, lock, AfterAttempt::RetryAt(at)).await?;
            return Ok(Outcome { kind: SetOutcomeKind::Waiting, retry_at_unix_ms: at.timestamp_millis() });
        }
    }
    let started = Instant::now();
    loop {
        let Some(head) = store::head(&ctx.pool, set_id, &set).await? else {
            return Ok(Outcome::of(SetOutcomeKind::Gone));
        };
        let (Some(partition), Some(offset)) = (head.partition, head.offset) else {
            if store::finish_empty(&ctx.pool, set_id, lock, set.key.is_some(), head.ingest_seq).await? {
                return Ok(Outcome::of(SetOutcomeKind::Idle));
            }
            // Ingest added to the set since we looked, or the claim is gone:
            // a fresh look tells which.
            if !still_claimed(ctx, set_id, lock).await? {
                return Ok(Outcome::of(SetOutcomeKind::Busy));
            }
            continue;
        };
        if started.elapsed() >= TIME_SLICE {
            store::release_ready(&ctx.pool, set_id, lock).await?;
            return Ok(Outcome::of(SetOutcomeKind::Ready));
        }
        let step = match (head.wo_id, head.wo_state.as_deref()) {
            (None, _) => {
                let body = build_body(&body_input(&set, &head, partition, offset));
                match store::create_work_order(&ctx.pool, set_id, lock, &set, partition, offset, &body).await? {
                    Some(wo) => {
                        metrics::counter!("kt_work_orders_created_total").increment(1);
                        deliver(ctx, trigger, set_id, lock, wo, body, 0, None).await?
                    }
                    None if still_claimed(ctx, set_id, lock).await? => Step::Continue,
                    None => Step::Lost,
                }
            }
            (Some(_), Some("success" | "skipped")) => {
                if store::delete_finished_head(&ctx.pool, set_id, lock, &set, partition, offset).await? {
                    Step::Continue
                } else {
                    Step::Lost
                }
            }
            (Some(_), Some("failed")) => park(ctx, set_id, lock, AfterAttempt::Failed).await?,
            (Some(_), Some("running")) => park(ctx, set_id, lock, AfterAttempt::Running).await?,
            (Some(wo), _) => {
                let body = head.wo_body.clone().unwrap_or_default();
                let attempts = head.wo_attempts.unwrap_or(0).max(0) as u32;
                deliver(ctx, trigger, set_id, lock, wo, body, attempts, head.wo_first_attempt_at).await?
            }
        };
        match step {
            Step::Continue => continue,
            Step::Done(outcome) => return Ok(outcome),
            Step::Lost => {
                tracing::warn!(set_id, "claim lost (expired and taken over); stopping");
                return Ok(Outcome::of(SetOutcomeKind::Busy));
            }
        }
    }
}

enum Step {
    /// Act on the next candidate.
    Continue,
    Done(Outcome),
    /// The claim expired and was released or taken over: stop writing.
    Lost,
}

async fn still_claimed(ctx: &Context, set_id: i64, lock: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM message_sets WHERE id = $1 AND lock_id = $2)")
        .bind(set_id)
        .bind(lock)
        .fetch_one(&ctx.pool)
        .await
}

async fn park(ctx: &Context, set_id: i64, lock: Uuid, after: AfterAttempt) -> Result<Step, sqlx::Error> {
    if !store::park(&ctx.pool, set_id, lock, after).await? {
        return Ok(Step::Lost);
    }
    Ok(Step::Done(outcome_after(after)))
}

fn outcome_after(after: AfterAttempt) -> Outcome {
    match after {
        AfterAttempt::RetryAt(at) => Outcome { kind: SetOutcomeKind::Waiting, retry_at_unix_ms: at.timestamp_millis() },
        AfterAttempt::Running => Outcome::of(SetOutcomeKind::Waiting),
        AfterAttempt::Failed => Outcome::of(SetOutcomeKind::Blocked),
    }
}

#[allow(clippy::too_many_arguments)]
async fn deliver(
    ctx: &Context,
    trigger: &TriggerConfig,
    set_id: i64,
    lock: Uuid,
    wo: Uuid,
    body: String,
    previous_attempts: u32,
    first_attempt_at: Option<chrono::DateTime<Utc>>,
) -> Result<Step, sqlx::Error> {
    let at = Utc::now();
    let clock = Instant::now();
    let outcome =
        ctx.webhook.deliver(&trigger.spec.webhook, &trigger.secrets, Bytes::from(body), &wo.to_string()).await;
    let ms = clock.elapsed().as_millis() as u64;
    metrics::histogram!("kt_delivery_seconds").record(clock.elapsed().as_secs_f64());
    let attempts = previous_attempts + 1;
    let (label, after, error) = match &outcome {
        DeliveryOutcome::Succeeded => {
            let attempt = Attempt { at, ms, outcome: "success", error: None };
            metrics::counter!("kt_work_orders_succeeded_total").increment(1);
            return Ok(if store::succeed(&ctx.pool, set_id, lock, lease_of(trigger), wo, &attempt).await? {
                Step::Continue
            } else {
                Step::Lost
            });
        }
        DeliveryOutcome::Accepted => ("accepted", AfterAttempt::Running, None),
        DeliveryOutcome::RetryableFailure { error, retry_after } => {
            let first = first_attempt_at.unwrap_or(at);
            let after = match next_step(&trigger.spec.retry, attempts, first, Utc::now(), *retry_after) {
                RetryDecision::RetryAt(delay) => {
                    AfterAttempt::RetryAt(Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default())
                }
                RetryDecision::GiveUp => AfterAttempt::Failed,
            };
            ("failure", after, Some(error.clone()))
        }
        DeliveryOutcome::PermanentFailure { error } => ("failure", AfterAttempt::Failed, Some(error.clone())),
    };
    if after == AfterAttempt::Failed {
        metrics::counter!("kt_work_orders_failed_total").increment(1);
        // Error level: a newly blocked set is reported to Sentry (when
        // configured) with these ids; the error text never holds secrets.
        tracing::error!(trigger_id = %trigger.id, set_id, work_order_id = %wo, attempts, error = error.as_deref().unwrap_or(""), "work order failed for good; set blocked");
    } else if let Some(error) = &error {
        tracing::info!(trigger_id = %trigger.id, set_id, work_order_id = %wo, attempts, %error, "delivery failed; will retry");
    }
    let attempt = Attempt { at, ms, outcome: label, error };
    if !store::record_attempt(&ctx.pool, set_id, lock, wo, &attempt, after).await? {
        return Ok(Step::Lost);
    }
    Ok(Step::Done(outcome_after(after)))
}

fn lease_of(trigger: &TriggerConfig) -> f64 {
    f64::from(trigger.spec.webhook.timeout_ms) / 1000.0 + LEASE_SLACK_SECS
}

fn body_input(set: &ClaimedSet, head: &Head, partition: i32, offset: i64) -> MessageForBody {
    let names = head.header_names.clone().unwrap_or_default();
    let values = head.header_values.clone().unwrap_or_default();
    MessageForBody {
        topic: set.topic.clone(),
        partition,
        offset,
        key: head.key.clone(),
        value: head.value.clone(),
        ts_ms: head.ts.map(|t| t.timestamp_millis()),
        headers: names.into_iter().zip(values).collect(),
    }
}
