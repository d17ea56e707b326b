//! The round engine: a node acts on many granted sets at once.
//!
//! Granted sets arrive already claimed (the control plane wrote their lock
//! ids). The engine reads the candidates of every set granted since its last
//! read in one statement, POSTs them concurrently, and commits outcomes in
//! groups as they complete: whatever finished while the previous commit
//! ran goes into the next one (at most [`MAX_COMMITS`] at a time), so a slow
//! target never holds up the commits of fast ones. A success's commit reads
//! the set's next candidate in the same statement, and that candidate is
//! POSTed only then: a key's next message goes out only after its
//! predecessor's success is committed. A set is handed back (released) when
//! it is empty, waits, is blocked, or has used up its [`TIME_SLICE`].
//!
//! A claim in hand is renewed a third of a lease after it was granted or
//! last renewed, with every other claim due about then, in one statement
//! ([`super::lease`]). A POST starts only while the lease has
//! more than a third left, and a read or a commit that fails because the
//! database is unreachable is tried again for as long as the lease holds:
//! an outage shorter than that costs no redelivery.
//!
//! The work order is written with its outcome, not before the POST: its id
//! is derived from the message, so a node killed mid-POST leaves a set whose
//! claim expires (within a lease) and whose next holder POSTs the same work
//! order, with the same `Idempotency-Key`, again (at least once towards the
//! target; exactly one work order per message in the database).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use kt_common::backoff::Backoff;
use kt_common::db::{classify, DbErrorKind};
use kt_common::dispatch::dead_letter::{self, DeadLetter, Produced};
use kt_common::dispatch::grant;
use kt_common::dispatch::lease::Held as StillHeld;
use kt_common::dispatch::round::{self, AfterSuccess, Failure, Posted, Success};
use kt_common::dispatch::{work_order_id, AfterAttempt, Attempt, Candidate, SetState, WorkOrderState};
use kt_common::trigger::{OnFailure, WebhookFormat};
use kt_proto::internal::{SetGrant, SetOutcome, SetOutcomeKind, WorkGrant};
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

use super::dead_letters::{self, Letter, Producers};
use super::lease::{self, Lease, OnHold, RenewError, Renewals, Verdict};
use super::parked::{Parked, ParkedGrant};
use crate::assignment::{AssignedTrigger, TriggerDirectory};
use crate::delivery::{
    build_body, cloud_event, next_step, DeliveryOutcome, MessageForBody, Payload, RetryDecision, WebhookClient,
};

/// Longest a worker keeps draining one set before handing it back, so a
/// single hot key cannot hold a worker forever.
pub const TIME_SLICE: Duration = Duration::from_millis(500);
/// Group commits in flight at once.
pub const MAX_COMMITS: usize = 2;
/// Most outcomes in one group commit, and most sets in one read.
const MAX_BATCH: usize = 512;
/// A read or commit that fails is tried again with this backoff: while the
/// lease of its sets holds when the database is unreachable, at most
/// [`DB_TRIES`] times for other errors. Then its sets are given up (their
/// claims expire and the control plane grants them again).
const DB_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
const DB_TRIES: u32 = 10;
/// A dead letter that could not be produced to its topic is tried again
/// after this (the set waits meanwhile).
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);

/// Shared by every task of a node's engine.
pub struct Context {
    pub pool: PgPool,
    pub webhook: WebhookClient,
    /// Producers of the triggers' dead-letter topics.
    pub dead_letters: Producers,
}

struct Held {
    lock: Uuid,
    trigger_id: String,
    trigger: Arc<AssignedTrigger>,
    /// When this claim began: the time slice runs from here.
    since: Instant,
    lease: Lease,
    /// A candidate to POST that waits for a renewal: its lease is in its
    /// last third (renewals have been failing).
    on_hold: Option<Box<Candidate>>,
}

/// A finished POST, waiting for its group commit.
struct Delivered {
    candidate: Candidate,
    partition: i32,
    offset: i64,
    body: String,
    attempt: Attempt,
    outcome: DeliveryOutcome,
    previous_attempts: u32,
    first_attempt_at: Option<chrono::DateTime<Utc>>,
}

enum Slow {
    /// The claim was released (or lost): report this.
    Done(SetOutcomeKind, i64),
    /// Read the set's candidate again.
    Reread,
}

enum Event {
    Read {
        claims: Vec<(i64, Uuid)>,
        result: Result<Vec<Candidate>, sqlx::Error>,
        tries: u32,
    },
    Delivered(Box<Delivered>),
    /// A dead letter's produce to its topic finished.
    Produced {
        dead: Box<DeadLetter>,
        result: Result<Produced, String>,
    },
    Committed {
        batch: Batch,
        result: Result<Committed, sqlx::Error>,
        tries: u32,
    },
    Slow {
        set_id: i64,
        result: Result<Slow, sqlx::Error>,
    },
    Unheld {
        set_id: i64,
        trigger_id: String,
        result: Result<Slow, sqlx::Error>,
    },
    GivenBack {
        grants: Vec<SetGrant>,
        result: Result<(), sqlx::Error>,
    },
    Renewed {
        sent: Instant,
        claims: Vec<(i64, Uuid)>,
        result: Result<Vec<StillHeld>, RenewError>,
    },
}

#[derive(Default)]
struct Batch {
    successes: Vec<Success>,
    failures: Vec<Failure>,
    dead_letters: Vec<DeadLetter>,
}

impl Batch {
    fn sets(&self) -> impl Iterator<Item = i64> + '_ {
        self.successes
            .iter()
            .map(|s| s.posted.set_id)
            .chain(self.failures.iter().map(|f| f.posted.set_id))
            .chain(self.dead_letters.iter().map(|d| d.posted.set_id))
    }

    fn len(&self) -> usize {
        self.successes.len() + self.failures.len() + self.dead_letters.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the outcomes of the sets `keep` accepts; returns the others' set ids.
    fn retain(&mut self, keep: impl Fn(i64) -> bool) -> Vec<i64> {
        let dropped: Vec<i64> = self.sets().filter(|s| !keep(*s)).collect();
        self.successes.retain(|s| keep(s.posted.set_id));
        self.failures.retain(|f| keep(f.posted.set_id));
        self.dead_letters.retain(|d| keep(d.posted.set_id));
        dropped
    }
}

struct Committed {
    /// Sets whose head succeeded or became a dead letter, and what they became.
    successes: Vec<(i64, AfterSuccess)>,
    /// Sets whose failed attempt was recorded (their claim held).
    failures: Vec<i64>,
}

pub struct Engine {
    ctx: Arc<Context>,
    held: HashMap<i64, Held>,
    to_read: Vec<(i64, Uuid)>,
    reading: bool,
    pending: Batch,
    commits: usize,
    tasks: FuturesUnordered<BoxFuture<'static, Event>>,
    /// Shutting down or reconnecting: every set is released after its
    /// current delivery.
    draining: bool,
    outcomes: Vec<SetOutcome>,
    renewals: Renewals,
    /// Where granted sets' triggers are looked up.
    triggers: TriggerDirectory,
    /// Grants whose trigger is not in the directory yet.
    parked: Parked,
}

impl Engine {
    pub fn new(ctx: Arc<Context>, triggers: TriggerDirectory) -> Self {
        Self {
            parked: Parked::new(triggers.changes()),
            triggers,
            ctx,
            held: HashMap::new(),
            to_read: Vec::new(),
            reading: false,
            pending: Batch::default(),
            commits: 0,
            tasks: FuturesUnordered::new(),
            draining: false,
            outcomes: Vec::new(),
            renewals: Renewals::default(),
        }
    }

    /// Sets in hand (granted and not handed back yet).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether anything is under way (then [`Engine::next`] yields): a
    /// task, sets in hand, whose claims it renews, or parked grants.
    pub fn busy(&self) -> bool {
        !self.tasks.is_empty() || self.renewal_due().is_some() || !self.parked.is_empty()
    }

    /// When the claims in hand are to be renewed next, if any are in hand.
    fn renewal_due(&self) -> Option<Instant> {
        if self.held.is_empty() {
            None
        } else {
            self.renewals.due()
        }
    }

    /// Release every set after its current delivery.
    pub fn drain(&mut self) {
        self.draining = true;
        let parked = self.parked.take_all();
        if !parked.is_empty() {
            self.give_back(parked);
        }
    }

    /// Takes the outcomes to report since the last call.
    pub fn take_outcomes(&mut self) -> Vec<SetOutcome> {
        std::mem::take(&mut self.outcomes)
    }

    /// The next event of the work under way (or the renewal of the claims
    /// in hand when it is due); `None` when idle.
    pub async fn next(&mut self) -> Option<()> {
        let renew_at = self.renewal_due();
        tokio::select! {
            Some(event) = self.tasks.next() => self.handle(event),
            (due, applied) = self.parked.wait(), if !self.parked.is_empty() => self.unpark(due, applied),
            () = tokio::time::sleep_until(renew_at.unwrap_or_else(Instant::now)), if renew_at.is_some() => self.renew(),
            else => return None,
        }
        Some(())
    }

    /// Takes granted sets in hand and reads their candidates (with any
    /// other sets waiting for a read).
    pub fn grant(&mut self, grant: WorkGrant) {
        if self.draining {
            return self.give_back(grant.sets);
        }
        let now = Instant::now();
        let lease = Lease::granted(grant.lease_ms, now);
        for g in grant.sets {
            let Ok(lock) = Uuid::parse_str(&g.lock_id) else {
                tracing::warn!(set_id = g.set_id, "grant without a valid lock id; ignored");
                self.report(g.set_id, &g.trigger_id, SetOutcomeKind::Busy, 0);
                continue;
            };
            match g.trigger_id.parse().ok().and_then(|id| self.triggers.get(&id)) {
                Some(trigger) => self.take(g, lock, lease, trigger, now),
                None => self.parked.park(g, lock, lease),
            }
        }
        self.maybe_read();
    }

    /// Takes a granted set in hand: its candidate is read next.
    fn take(&mut self, g: SetGrant, lock: Uuid, lease: Lease, trigger: Arc<AssignedTrigger>, since: Instant) {
        let held = Held { lock, trigger_id: g.trigger_id, trigger, since, lease, on_hold: None };
        self.held.insert(g.set_id, held);
        self.to_read.push((g.set_id, lock));
        self.renewals.arm(lease.renewal_due());
    }

    /// Takes in hand the parked grants whose trigger is known now, releases
    /// those that waited in vain (see `parked`), parks the others again.
    fn unpark(&mut self, due: Vec<ParkedGrant>, applied: u64) {
        let now = Instant::now();
        for p in due {
            if self.draining {
                self.give_back(vec![p.grant]);
                continue;
            }
            match p.grant.trigger_id.parse().ok().and_then(|id| self.triggers.get(&id)) {
                Some(trigger) if p.lease.holds(now) => self.take(p.grant, p.lock, p.lease, trigger, now),
                _ if p.give_up(applied, now) => {
                    tracing::debug!(set_id = p.grant.set_id, trigger_id = %p.grant.trigger_id, "granted set of a trigger not assigned here; releasing it");
                    let pool = self.ctx.pool.clone();
                    let (set_id, lock) = (p.grant.set_id, p.lock);
                    self.report_later(set_id, p.grant.trigger_id, async move {
                        round::release_ready(&pool, set_id, lock).await?;
                        Ok(Slow::Done(SetOutcomeKind::Retry, 0))
                    });
                }
                _ => self.parked.repark(p),
            }
        }
        self.maybe_read();
    }

    /// Gives claims back unworked (the node is stopping); the sets stay as
    /// they were, grantable again at once.
    fn give_back(&mut self, grants: Vec<SetGrant>) {
        let pool = self.ctx.pool.clone();
        self.tasks.push(
            async move {
                let claims: Vec<(i64, Uuid)> =
                    grants.iter().filter_map(|g| Some((g.set_id, Uuid::parse_str(&g.lock_id).ok()?))).collect();
                let result = grant::give_back(&pool, &claims).await.map(|_| ());
                Event::GivenBack { grants, result }
            }
            .boxed(),
        );
    }

    fn maybe_read(&mut self) {
        if self.reading || self.to_read.is_empty() {
            return;
        }
        let take = self.to_read.len().min(MAX_BATCH);
        let claims: Vec<(i64, Uuid)> = self.to_read.drain(..take).collect();
        self.spawn_read(claims, 0);
    }

    fn spawn_read(&mut self, claims: Vec<(i64, Uuid)>, tries: u32) {
        self.reading = true;
        let pool = self.ctx.pool.clone();
        self.tasks.push(
            async move {
                if tries > 0 {
                    tokio::time::sleep(DB_RETRY.delay(tries)).await;
                }
                let result = round::read_candidates(&pool, &claims).await;
                Event::Read { claims, result, tries }
            }
            .boxed(),
        );
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Read { claims, result, tries } => {
                self.reading = false;
                match result {
                    Ok(candidates) => {
                        let mut missing: HashMap<i64, ()> = claims.iter().map(|c| (c.0, ())).collect();
                        for c in candidates {
                            missing.remove(&c.set_id);
                            self.act(c);
                        }
                        // Gone (deleted) or taken over since it was granted.
                        for (set_id, ()) in missing {
                            self.finish(set_id, SetOutcomeKind::Busy, 0);
                        }
                    }
                    Err(error) => {
                        let (retry, now) = (self.retry_db(&error, tries), Instant::now());
                        let (again, given_up): (Vec<_>, Vec<_>) =
                            claims.into_iter().partition(|(set, _)| retry && self.lease_holds(*set, now));
                        if !again.is_empty() {
                            tracing::warn!(%error, sets = again.len(), "cannot read granted sets; trying again");
                            self.spawn_read(again, tries + 1);
                        }
                        if !given_up.is_empty() {
                            tracing::warn!(%error, sets = given_up.len(), "cannot read granted sets; handing them back");
                        }
                        for (set_id, _) in given_up {
                            self.finish(set_id, SetOutcomeKind::Retry, 0);
                        }
                    }
                }
                self.maybe_read();
            }
            Event::Delivered(d) => self.on_delivered(*d),
            Event::Produced { dead, result } => self.on_produced(*dead, result),
            Event::Committed { batch, result, tries } => {
                self.commits -= 1;
                match result {
                    Ok(committed) => self.on_committed(batch, committed),
                    Err(error) => {
                        let (retry, now, mut batch) = (self.retry_db(&error, tries), Instant::now(), batch);
                        let given_up = batch.retain(|set| retry && self.lease_holds(set, now));
                        if !batch.is_empty() {
                            tracing::warn!(%error, outcomes = batch.len(), "cannot record outcomes; trying again while the claims hold");
                            self.spawn_commit(batch, tries + 1);
                        }
                        if !given_up.is_empty() {
                            // What was delivered is POSTed again by the sets' next holders.
                            tracing::error!(%error, sets = given_up.len(), "cannot record outcomes; giving the sets up (their claims expire)");
                        }
                        for set_id in given_up {
                            self.finish(set_id, SetOutcomeKind::Retry, 0);
                        }
                    }
                }
                self.maybe_commit();
            }
            Event::GivenBack { grants, result } => {
                if let Err(error) = &result {
                    tracing::warn!(%error, sets = grants.len(), "cannot give claims back; they expire");
                }
                let kind = if result.is_ok() { SetOutcomeKind::Ready } else { SetOutcomeKind::Retry };
                for g in grants {
                    self.report(g.set_id, &g.trigger_id, kind, 0);
                }
            }
            Event::Unheld { set_id, trigger_id, result } => {
                let kind = match result {
                    Ok(Slow::Done(kind, _)) => kind,
                    Ok(Slow::Reread) | Err(_) => SetOutcomeKind::Retry,
                };
                self.report(set_id, &trigger_id, kind, 0);
            }
            Event::Renewed { sent, claims, result } => self.on_renewed(sent, claims, result),
            Event::Slow { set_id, result } => match result {
                Ok(Slow::Done(kind, retry_at)) => self.finish(set_id, kind, retry_at),
                Ok(Slow::Reread) => {
                    if let Some(h) = self.held.get(&set_id) {
                        self.to_read.push((set_id, h.lock));
                        self.maybe_read();
                    }
                }
                Err(error) => {
                    tracing::warn!(set_id, %error, "cannot act on set; handing it back");
                    self.finish(set_id, SetOutcomeKind::Retry, 0);
                }
            },
        }
    }

    /// Acts on a set's candidate: deliver it, or settle the set.
    fn act(&mut self, c: Candidate) {
        let Some(held) = self.held.get(&c.set_id) else { return };
        let (set_id, lock) = (c.set_id, held.lock);
        let trigger = held.trigger.clone();
        let may_post = held.lease.may_post(Instant::now());
        if c.set_state() == SetState::Waiting {
            if let Some(at) = c.retry_at.filter(|at| *at > Utc::now()) {
                let after = AfterAttempt::RetryAt(at);
                return self.slow(set_id, move |pool| async move { park(&pool, set_id, lock, after).await }.boxed());
            }
        }
        let Some((partition, offset)) = c.head.position() else {
            let (keyed, seq) = (c.set_offset.is_none(), c.ingest_seq);
            return self.slow(set_id, move |pool| {
                async move {
                    Ok(match round::finish_empty(&pool, set_id, lock, keyed, seq).await? {
                        Some(SetState::Ready) => Slow::Done(SetOutcomeKind::Ready, 0),
                        Some(_) => Slow::Done(SetOutcomeKind::Idle, 0),
                        None => Slow::Done(SetOutcomeKind::Busy, 0),
                    })
                }
                .boxed()
            });
        };
        let (body, previous_attempts, first_attempt_at) = match c.head.work_order() {
            None => (build_body(&body_input(&c, partition, offset)), 0, None),
            Some(wo) if wo.state.is_finished() => {
                return self.slow(set_id, move |pool| {
                    async move {
                        Ok(if round::delete_finished_head(&pool, set_id, lock, &c).await? {
                            Slow::Reread
                        } else {
                            Slow::Done(SetOutcomeKind::Busy, 0)
                        })
                    }
                    .boxed()
                });
            }
            Some(wo)
                if wo.state == WorkOrderState::Failed
                    && matches!(trigger.spec.on_failure, OnFailure::DeadLetter { .. }) =>
            {
                // Its dead letter could not be produced before (or the
                // trigger's policy changed since it failed): record it now.
                let body = c.head.wo_body.clone().unwrap_or_default();
                let error = c.head.wo_last_error.clone().unwrap_or_default();
                return self.dead_letter(c, partition, offset, body, None, wo.attempts, error);
            }
            Some(wo) if wo.state == WorkOrderState::Failed => {
                let after = AfterAttempt::Failed;
                return self.slow(set_id, move |pool| async move { park(&pool, set_id, lock, after).await }.boxed());
            }
            Some(wo) if wo.state == WorkOrderState::Running => {
                let after = AfterAttempt::Running;
                return self.slow(set_id, move |pool| async move { park(&pool, set_id, lock, after).await }.boxed());
            }
            Some(wo) => {
                let body = c.head.wo_body.clone().unwrap_or_else(|| build_body(&body_input(&c, partition, offset)));
                (body, wo.attempts, wo.first_attempt_at)
            }
        };
        if !may_post {
            return self.hold_for_renewal(c);
        }
        if previous_attempts == 0 {
            metrics::counter!("kt_work_orders_created_total").increment(1);
        }
        let ctx = self.ctx.clone();
        let wo = work_order_id(c.trigger_id, &c.topic, partition, offset).to_string();
        // The work order records the JSON body whatever the format: it
        // describes the message in text, which a CloudEvent's binary value
        // cannot be stored as. A CloudEvent is built from the message at
        // every attempt, so a format change applies to retries too.
        let payload = match trigger.spec.webhook.format {
            WebhookFormat::Json => Payload::json(body.clone()),
            WebhookFormat::CloudEvents => cloud_event(&body_input(&c, partition, offset), &wo),
        };
        self.tasks.push(
            async move {
                let at = Utc::now();
                let clock = Instant::now();
                let outcome = ctx.webhook.deliver(&trigger.spec.webhook, &trigger.secrets, payload, &wo).await;
                let elapsed = clock.elapsed();
                metrics::histogram!("kt_delivery_seconds").record(elapsed.as_secs_f64());
                let attempt = Attempt { at, ms: elapsed.as_millis() as u64, outcome: "success", error: None };
                Event::Delivered(Box::new(Delivered {
                    candidate: c,
                    partition,
                    offset,
                    body,
                    attempt,
                    outcome,
                    previous_attempts,
                    first_attempt_at,
                }))
            }
            .boxed(),
        );
    }

    fn on_delivered(&mut self, d: Delivered) {
        let set_id = d.candidate.set_id;
        let Some(held) = self.held.get(&set_id) else { return };
        if held.lease.is_lost() {
            // Its next holder POSTs it again; this outcome cannot be written.
            tracing::warn!(set_id, "delivered, but the claim was lost meanwhile; leaving the set to its new holder");
            return self.finish(set_id, SetOutcomeKind::Busy, 0);
        }
        let trigger = &held.trigger;
        let attempts = d.previous_attempts + 1;
        let (after, label, error) = match d.outcome {
            DeliveryOutcome::Succeeded => {
                metrics::counter!("kt_work_orders_succeeded_total").increment(1);
                let keep = !self.draining && held.since.elapsed() < TIME_SLICE;
                let posted = posted(held.lock, d.candidate, d.partition, d.offset, d.body, Some(d.attempt));
                self.pending.successes.push(Success { posted, keep });
                return self.maybe_commit();
            }
            DeliveryOutcome::Accepted => (AfterAttempt::Running, "accepted", None),
            DeliveryOutcome::RetryableFailure { error, retry_after } => {
                let first = d.first_attempt_at.unwrap_or(d.attempt.at);
                let now = Utc::now();
                let after = match next_step(&trigger.spec.retry, attempts, first, now, retry_after) {
                    RetryDecision::RetryAt(delay) => {
                        AfterAttempt::RetryAt(now + chrono::Duration::from_std(delay).unwrap_or_default())
                    }
                    RetryDecision::GiveUp => AfterAttempt::Failed,
                };
                (after, "failure", Some(error))
            }
            DeliveryOutcome::PermanentFailure { error } => (AfterAttempt::Failed, "failure", Some(error)),
        };
        let wo = work_order_id(d.candidate.trigger_id, &d.candidate.topic, d.partition, d.offset);
        if after == AfterAttempt::Failed && matches!(trigger.spec.on_failure, OnFailure::DeadLetter { .. }) {
            metrics::counter!("kt_work_orders_failed_total").increment(1);
            let error = error.unwrap_or_default();
            tracing::warn!(trigger_id = %trigger.id, set_id, work_order_id = %wo, attempts, %error, "work order failed for good; recording a dead letter");
            let attempt = Attempt { outcome: label, error: Some(error.clone()), ..d.attempt };
            return self.dead_letter(d.candidate, d.partition, d.offset, d.body, Some(attempt), attempts, error);
        }
        if after == AfterAttempt::Failed {
            metrics::counter!("kt_work_orders_failed_total").increment(1);
            // Error level: a newly blocked set is reported to Sentry (when
            // configured) with these ids; the error text never holds secrets.
            tracing::error!(trigger_id = %trigger.id, set_id, work_order_id = %wo, attempts, error = error.as_deref().unwrap_or(""), "work order failed for good; set blocked");
        } else if let Some(error) = &error {
            tracing::info!(trigger_id = %trigger.id, set_id, work_order_id = %wo, attempts, %error, "delivery failed; will retry");
        }
        let attempt = Attempt { outcome: label, error, ..d.attempt };
        let posted = posted(held.lock, d.candidate, d.partition, d.offset, d.body, Some(attempt));
        self.pending.failures.push(Failure { posted, after });
        self.maybe_commit();
    }

    /// The head of a held set failed for good under the dead-letter policy:
    /// record it as a dead letter, after producing it to the trigger's
    /// dead-letter topic (acknowledged) if it has one.
    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &mut self,
        c: Candidate,
        partition: i32,
        offset: i64,
        body: String,
        attempt: Option<Attempt>,
        attempts: u32,
        error: String,
    ) {
        let Some(held) = self.held.get(&c.set_id) else { return };
        let trigger = held.trigger.clone();
        let keep = !self.draining && held.since.elapsed() < TIME_SLICE;
        let letter = Letter {
            trigger_id: c.trigger_id,
            topic: c.topic.clone(),
            partition,
            offset,
            key: c.head.key.clone(),
            value: c.head.value.clone(),
            headers: c.head.headers(),
            attempts,
            error,
        };
        let posted = posted(held.lock, c, partition, offset, body, attempt);
        let dead = DeadLetter { posted, id: Uuid::now_v7(), produced: None, keep };
        let Some(topic) = trigger.spec.on_failure.dead_letter_topic().map(str::to_owned) else {
            self.pending.dead_letters.push(dead);
            return self.maybe_commit();
        };
        let ctx = self.ctx.clone();
        self.tasks.push(
            async move {
                let result = match ctx.dead_letters.get(&trigger) {
                    Ok(producer) => dead_letters::produce(&producer, &topic, &letter, &trigger.secrets).await,
                    Err(error) => Err(error),
                };
                Event::Produced { dead: Box::new(dead), result }
            }
            .boxed(),
        );
    }

    /// A dead letter's produce finished: commit it, or let the set wait and
    /// produce it again (its work order is recorded failed meanwhile).
    fn on_produced(&mut self, mut dead: DeadLetter, result: Result<Produced, String>) {
        let set_id = dead.posted.set_id;
        let Some(held) = self.held.get(&set_id) else { return };
        if held.lease.is_lost() {
            return self.finish(set_id, SetOutcomeKind::Busy, 0);
        }
        match result {
            Ok(produced) => {
                metrics::counter!("kt_dead_letters_produced_total").increment(1);
                dead.produced = Some(produced);
                self.pending.dead_letters.push(dead);
            }
            Err(error) => {
                metrics::counter!("kt_dead_letter_produce_failures_total").increment(1);
                tracing::warn!(trigger_id = %held.trigger.id, set_id, %error, "cannot produce a dead letter; the set waits and tries again");
                let at = Utc::now() + chrono::Duration::from_std(DEAD_LETTER_RETRY).unwrap_or_default();
                let after = AfterAttempt::DeadLetterAt(at);
                if dead.posted.attempt.is_some() {
                    self.pending.failures.push(Failure { posted: dead.posted, after });
                } else {
                    let lock = held.lock;
                    return self
                        .slow(set_id, move |pool| async move { park(&pool, set_id, lock, after).await }.boxed());
                }
            }
        }
        self.maybe_commit();
    }

    fn maybe_commit(&mut self) {
        if self.commits >= MAX_COMMITS || self.pending.is_empty() {
            return;
        }
        let s = self.pending.successes.len().min(MAX_BATCH);
        let f = self.pending.failures.len().min(MAX_BATCH);
        let d = self.pending.dead_letters.len().min(MAX_BATCH);
        let batch = Batch {
            successes: self.pending.successes.drain(..s).collect(),
            failures: self.pending.failures.drain(..f).collect(),
            dead_letters: self.pending.dead_letters.drain(..d).collect(),
        };
        self.spawn_commit(batch, 0);
    }

    fn spawn_commit(&mut self, batch: Batch, tries: u32) {
        self.commits += 1;
        let pool = self.ctx.pool.clone();
        self.tasks.push(
            async move {
                if tries > 0 {
                    tokio::time::sleep(DB_RETRY.delay(tries)).await;
                }
                let result = commit(&pool, &batch).await;
                Event::Committed { batch, result, tries }
            }
            .boxed(),
        );
    }

    fn on_committed(&mut self, batch: Batch, committed: Committed) {
        for (set_id, after) in committed.successes {
            match after {
                AfterSuccess::Next(c) => self.act(*c),
                AfterSuccess::Released(SetState::Idle) | AfterSuccess::Dropped => {
                    self.finish(set_id, SetOutcomeKind::Idle, 0)
                }
                AfterSuccess::Released(_) => self.finish(set_id, SetOutcomeKind::Ready, 0),
                AfterSuccess::Lost => {
                    tracing::warn!(set_id, "claim lost (expired and taken over); stopping");
                    self.finish(set_id, SetOutcomeKind::Busy, 0)
                }
            }
        }
        for f in batch.failures {
            let set_id = f.posted.set_id;
            if committed.failures.contains(&set_id) {
                let (kind, at) = outcome_after(f.after);
                self.finish(set_id, kind, at);
            } else {
                tracing::warn!(set_id, "claim lost (expired and taken over); stopping");
                self.finish(set_id, SetOutcomeKind::Busy, 0);
            }
        }
    }

    /// Runs a rare, single-set transition (park, empty, finished head) as
    /// its own statement.
    fn slow(
        &mut self,
        set_id: i64,
        action: impl FnOnce(PgPool) -> BoxFuture<'static, Result<Slow, sqlx::Error>> + Send + 'static,
    ) {
        let pool = self.ctx.pool.clone();
        self.tasks.push(async move { Event::Slow { set_id, result: action(pool).await } }.boxed());
    }

    /// Like [`Engine::slow`] for a set that is not held (its trigger is not
    /// known here).
    fn report_later(
        &mut self,
        set_id: i64,
        trigger_id: String,
        action: impl std::future::Future<Output = Result<Slow, sqlx::Error>> + Send + 'static,
    ) {
        self.tasks.push(async move { Event::Unheld { set_id, trigger_id, result: action.await } }.boxed());
    }

    /// The set leaves our hands: report it.
    fn finish(&mut self, set_id: i64, kind: SetOutcomeKind, retry_at_unix_ms: i64) {
        if let Some(held) = self.held.remove(&set_id) {
            self.outcomes.push(SetOutcome { set_id, trigger_id: held.trigger_id, kind: kind.into(), retry_at_unix_ms });
        }
        if self.held.is_empty() {
            self.renewals.disarm();
        }
    }

    /// Whether a failed read or commit is worth trying again: always when
    /// the database is unreachable (for as long as the claims hold), a
    /// few times otherwise.
    fn retry_db(&self, error: &sqlx::Error, tries: u32) -> bool {
        classify(error) == DbErrorKind::Unavailable || tries + 1 < DB_TRIES
    }

    fn lease_holds(&self, set_id: i64, now: Instant) -> bool {
        self.held.get(&set_id).is_some_and(|h| h.lease.holds(now))
    }

    /// Keeps a candidate whose lease is in its last third until a renewal
    /// extends it (or it runs out, and the set is handed back).
    fn hold_for_renewal(&mut self, c: Candidate) {
        let set_id = c.set_id;
        let Some(held) = self.held.get_mut(&set_id) else { return };
        if held.lease.is_lost() {
            return self.finish(set_id, SetOutcomeKind::Busy, 0);
        }
        tracing::debug!(set_id, "claim not renewed lately; the next POST waits for a renewal");
        held.on_hold = Some(Box::new(c));
    }

    /// Renews the claims in hand that are due (or nearly), in one statement.
    fn renew(&mut self) {
        let now = Instant::now();
        let claims: Vec<(i64, Uuid)> =
            self.held.iter().filter(|(_, h)| h.lease.wants_renewal(now)).map(|(set, h)| (*set, h.lock)).collect();
        let Some(length) = self.shortest_lease().filter(|_| !claims.is_empty()) else {
            return self.renewals.finished(now, self.next_renewal(), true);
        };
        self.renewals.start();
        let requests: Vec<_> = claims.iter().map(|(set, lock)| self.held[set].lease.renew(*set, *lock)).collect();
        let pool = self.ctx.pool.clone();
        // Counted from before the statement: the database's expiry is later.
        let sent = now;
        self.tasks.push(
            async move {
                let result = lease::renew(&pool, &requests, length / 3).await;
                Event::Renewed { sent, claims, result }
            }
            .boxed(),
        );
    }

    fn shortest_lease(&self) -> Option<Duration> {
        self.held.values().filter(|h| !h.lease.is_lost()).map(|h| h.lease.length()).min()
    }

    /// When the first claim in hand is due for renewal.
    fn next_renewal(&self) -> Option<Instant> {
        self.held.values().filter(|h| !h.lease.is_lost()).map(|h| h.lease.renewal_due()).min()
    }

    fn on_renewed(&mut self, sent: Instant, claims: Vec<(i64, Uuid)>, result: Result<Vec<StillHeld>, RenewError>) {
        let now = Instant::now();
        let ok = match result {
            Ok(still) => {
                let verdicts = lease::verdicts(&claims, &still);
                for &(set_id, lock, verdict) in &verdicts {
                    // Released and granted again since the renewal was sent: not that claim.
                    let Some(held) = self.held.get_mut(&set_id).filter(|h| h.lock == lock) else { continue };
                    if verdict == Verdict::Lost {
                        metrics::counter!("kt_claims_lost_total").increment(1);
                        tracing::warn!(set_id, "claim lost (expired and released); stopping work on the set");
                    }
                    held.lease.apply(sent, verdict);
                }
                true
            }
            Err(error) => {
                metrics::counter!("kt_claim_renewal_failures_total").increment(1);
                tracing::warn!(%error, sets = claims.len(), "cannot renew the claims in hand; trying again");
                false
            }
        };
        self.renewals.finished(now, self.next_renewal(), ok);
        // Sets whose POST waits for a renewal.
        let waiting: Vec<i64> = self.held.iter().filter(|(_, h)| h.on_hold.is_some()).map(|(set, _)| *set).collect();
        for set_id in waiting {
            let held = self.held.get_mut(&set_id).expect("listed above");
            match held.lease.on_hold(now) {
                OnHold::Post => {
                    let c = held.on_hold.take().expect("listed above");
                    self.act(*c);
                }
                OnHold::Wait => {}
                OnHold::Lost => self.finish(set_id, SetOutcomeKind::Busy, 0),
                OnHold::RanOut => {
                    tracing::warn!(set_id, "claim ran out without a renewal; handing the set back");
                    self.finish(set_id, SetOutcomeKind::Retry, 0);
                }
            }
        }
    }

    fn report(&mut self, set_id: i64, trigger_id: &str, kind: SetOutcomeKind, retry_at_unix_ms: i64) {
        self.outcomes.push(SetOutcome {
            set_id,
            trigger_id: trigger_id.to_owned(),
            kind: kind.into(),
            retry_at_unix_ms,
        });
    }
}

/// One group commit: successes alone are one autocommit statement; with
/// failures or dead letters, the statements share a transaction.
async fn commit(pool: &PgPool, batch: &Batch) -> Result<Committed, sqlx::Error> {
    if batch.failures.is_empty() && batch.dead_letters.is_empty() {
        let successes = round::commit_successes(pool, &batch.successes).await?;
        return Ok(Committed { successes, failures: Vec::new() });
    }
    let mut tx = pool.begin().await?;
    let mut successes = if batch.successes.is_empty() {
        Vec::new()
    } else {
        round::commit_successes(&mut *tx, &batch.successes).await?
    };
    if !batch.dead_letters.is_empty() {
        successes.extend(dead_letter::commit_dead_letters(&mut *tx, &batch.dead_letters).await?);
    }
    let failures =
        if batch.failures.is_empty() { Vec::new() } else { round::record_failures(&mut *tx, &batch.failures).await? };
    tx.commit().await?;
    Ok(Committed { successes, failures })
}

async fn park(pool: &PgPool, set_id: i64, lock: Uuid, after: AfterAttempt) -> Result<Slow, sqlx::Error> {
    Ok(if round::park(pool, set_id, lock, after).await? {
        let (kind, at) = outcome_after(after);
        Slow::Done(kind, at)
    } else {
        Slow::Done(SetOutcomeKind::Busy, 0)
    })
}

fn outcome_after(after: AfterAttempt) -> (SetOutcomeKind, i64) {
    match after {
        AfterAttempt::RetryAt(at) => (SetOutcomeKind::Waiting, at.timestamp_millis()),
        AfterAttempt::Running => (SetOutcomeKind::Waiting, 0),
        AfterAttempt::Failed => (SetOutcomeKind::Blocked, 0),
        AfterAttempt::DeadLetterAt(at) => (SetOutcomeKind::Waiting, at.timestamp_millis()),
    }
}

fn posted(lock_id: Uuid, c: Candidate, partition: i32, offset: i64, body: String, attempt: Option<Attempt>) -> Posted {
    Posted {
        set_id: c.set_id,
        lock_id,
        trigger_id: c.trigger_id,
        topic: c.topic,
        set_key: c.set_key,
        partition,
        offset,
        body,
        attempt,
    }
}

fn body_input(c: &Candidate, partition: i32, offset: i64) -> MessageForBody {
    MessageForBody {
        topic: c.topic.clone(),
        partition,
        offset,
        key: c.head.key.clone(),
        value: c.head.value.clone(),
        ts_ms: c.head.ts.map(|t| t.timestamp_millis()),
        headers: c.head.headers(),
    }
}
