//! The candidate-set server. One task owns the [`Model`] (ready sets, grants,
//! credits); worker streams, the Postgres listener and the janitor talk to it
//! over a bounded channel. Ready sets come from `message_sets` rows that
//! ingest marks ready and announces with `NOTIFY kt_sets`, from worker
//! outcomes, from retry timers and from operator actions — never from a scan
//! of stored messages.

pub mod model;
pub mod store;

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt as _;
use kt_proto::internal::{SetGrant, SetOutcome, SetOutcomeKind, WorkGrant};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use uuid::Uuid;

pub use model::{Model, SessionId, SetId, TriggerId};

use crate::triggers::TriggerService;

/// Commands queued towards the scheduler task.
const COMMAND_CAPACITY: usize = 4_096;
/// Grant messages queued towards one worker session; a session this far
/// behind is dropped and its sets re-granted.
pub const GRANT_CAPACITY: usize = 256;
/// Postgres channel ingest notifies (payload: trigger id) when sets became ready.
pub const NOTIFY_CHANNEL: &str = "kt_sets";
/// How often the janitor releases expired claims and the sweeper takes ready
/// sets a lost notification left behind.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// Back-off before re-granting a set another worker holds.
const BUSY_DELAY: Duration = Duration::from_millis(250);
/// Back-off before re-granting a set whose worker could not reach the database.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// In-flight limit of a trigger whose configuration is not loaded yet.
const DEFAULT_LIMIT: u32 = 100;

enum Command {
    Join { session: SessionId, node_id: String, grants: mpsc::Sender<WorkGrant> },
    Leave { session: SessionId },
    Credit { session: SessionId, sets: u32 },
    Outcomes { session: SessionId, outcomes: Vec<SetOutcome> },
    Ready { sets: Vec<(SetId, TriggerId)> },
    Reclaimed { sets: Vec<(SetId, TriggerId)> },
    Limits { limits: Vec<(TriggerId, u32)>, removed: Vec<TriggerId> },
    Stats { reply: oneshot::Sender<Stats> },
}

/// A snapshot for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub ready: usize,
    pub in_flight: usize,
    pub delayed: usize,
    pub sessions: usize,
}

/// Handle to the scheduler task.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Command>,
}

impl Scheduler {
    /// Starts the scheduler, its listener and its janitor.
    pub async fn start(pool: PgPool, triggers: TriggerService, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let scheduler = Scheduler { tx };
        // Nothing is queued in memory yet: every ready set is taken afresh.
        store::reset_queued(&pool).await?;
        let mut delays = DelayQueue::new();
        let now = chrono::Utc::now();
        for (set, trigger, at) in store::waiting_retries(&pool).await? {
            let wait = (at - now).to_std().unwrap_or_default();
            delays.insert((set, trigger), wait);
        }
        let task = SchedulerTask { model: Model::new(DEFAULT_LIMIT), sessions: HashMap::new(), delays };
        tokio::spawn(task.run(rx, shutdown.clone()));
        tokio::spawn(feed(pool.clone(), scheduler.clone(), shutdown.clone()));
        tokio::spawn(watch_limits(pool, triggers, scheduler.clone(), shutdown));
        Ok(scheduler)
    }

    async fn send(&self, cmd: Command) {
        // The task only stops at shutdown; a failed send then is harmless.
        let _ = self.tx.send(cmd).await;
    }

    pub async fn join(&self, session: SessionId, node_id: String, grants: mpsc::Sender<WorkGrant>) {
        self.send(Command::Join { session, node_id, grants }).await;
    }

    pub async fn leave(&self, session: SessionId) {
        self.send(Command::Leave { session }).await;
    }

    pub async fn credit(&self, session: SessionId, sets: u32) {
        self.send(Command::Credit { session, sets }).await;
    }

    pub async fn outcomes(&self, session: SessionId, outcomes: Vec<SetOutcome>) {
        self.send(Command::Outcomes { session, outcomes }).await;
    }

    /// Queues sets an operator action or an external completion made ready.
    pub async fn ready(&self, sets: Vec<(SetId, TriggerId)>) {
        self.send(Command::Ready { sets }).await;
    }

    pub async fn stats(&self) -> Stats {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats { reply }).await;
        rx.await.unwrap_or_default()
    }
}

struct SessionHandle {
    node_id: String,
    grants: mpsc::Sender<WorkGrant>,
}

struct SchedulerTask {
    model: Model,
    sessions: HashMap<SessionId, SessionHandle>,
    delays: DelayQueue<(SetId, TriggerId)>,
}

impl SchedulerTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                Some(expired) = self.delays.next(), if !self.delays.is_empty() => {
                    let (set, trigger) = expired.into_inner();
                    self.model.push_ready(set, trigger);
                }
            }
            self.dispatch();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Join { session, node_id, grants } => {
                tracing::info!(%node_id, %session, "worker stream joined");
                self.model.add_session(session);
                self.sessions.insert(session, SessionHandle { node_id, grants });
            }
            Command::Leave { session } => self.drop_session(session, "stream ended"),
            Command::Credit { session, sets } => self.model.add_credits(session, sets),
            Command::Outcomes { session, outcomes } => {
                for outcome in outcomes {
                    self.on_outcome(session, outcome);
                }
            }
            Command::Ready { sets } => {
                for (set, trigger) in sets {
                    self.model.push_ready(set, trigger);
                }
            }
            Command::Reclaimed { sets } => {
                for (set, trigger) in sets {
                    // A claim that expired: whoever held it is gone or hung.
                    self.model.reclaim(set, trigger);
                }
            }
            Command::Limits { limits, removed } => {
                for (trigger, limit) in limits {
                    self.model.set_limit(trigger, limit);
                }
                for trigger in removed {
                    self.model.forget_trigger(trigger);
                }
            }
            Command::Stats { reply } => {
                let _ = reply.send(Stats {
                    ready: self.model.ready_len(),
                    in_flight: self.model.in_flight_len(),
                    delayed: self.delays.len(),
                    sessions: self.sessions.len(),
                });
            }
        }
    }

    fn on_outcome(&mut self, session: SessionId, outcome: SetOutcome) {
        let Some(trigger) = self.model.complete(session, outcome.set_id) else {
            return;
        };
        let set = outcome.set_id;
        match SetOutcomeKind::try_from(outcome.kind).unwrap_or(SetOutcomeKind::Unspecified) {
            SetOutcomeKind::Ready => {
                self.model.push_ready(set, trigger);
            }
            SetOutcomeKind::Waiting if outcome.retry_at_unix_ms > 0 => {
                let wait = outcome.retry_at_unix_ms - chrono::Utc::now().timestamp_millis();
                self.delays.insert((set, trigger), Duration::from_millis(wait.max(0) as u64));
            }
            SetOutcomeKind::Busy => {
                self.delays.insert((set, trigger), BUSY_DELAY);
            }
            SetOutcomeKind::Retry | SetOutcomeKind::Unspecified => {
                self.delays.insert((set, trigger), RETRY_DELAY);
            }
            // Idle, blocked, gone, or waiting for CompleteWorkOrder: nothing
            // to do until ingest, an operator or a completion makes it ready.
            SetOutcomeKind::Idle | SetOutcomeKind::Blocked | SetOutcomeKind::Gone | SetOutcomeKind::Waiting => {}
        }
    }

    fn dispatch(&mut self) {
        let grants = self.model.dispatch();
        if grants.is_empty() {
            return;
        }
        let mut per_session: HashMap<SessionId, Vec<SetGrant>> = HashMap::new();
        for g in grants {
            per_session
                .entry(g.session)
                .or_default()
                .push(SetGrant { set_id: g.set_id, trigger_id: g.trigger_id.to_string() });
        }
        for (session, sets) in per_session {
            let sent = self.sessions.get(&session).map(|s| s.grants.try_send(WorkGrant { sets }));
            if !matches!(sent, Some(Ok(()))) {
                self.drop_session(session, "not reading its grants");
            }
        }
    }

    fn drop_session(&mut self, session: SessionId, reason: &str) {
        if let Some(handle) = self.sessions.remove(&session) {
            let orphaned = self.model.remove_session(session);
            tracing::info!(node_id = %handle.node_id, %session, reason, requeued = orphaned.len(), "worker stream left");
        }
    }
}

/// Feeds ready sets from Postgres: at start, on every notification, and on a
/// periodic sweep that covers notifications lost while the listener
/// reconnected. Janitor duty (expired claims) rides on the same sweep.
async fn feed(pool: PgPool, scheduler: Scheduler, shutdown: CancellationToken) {
    let mut listener = match listen(&pool).await {
        Ok(l) => Some(l),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for ready sets; sweeping until it can");
            None
        }
    };
    take(&pool, &scheduler, None).await;
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        let notified = async {
            match listener.as_mut() {
                Some(l) => l.try_recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sweep.tick() => {
                take(&pool, &scheduler, None).await;
                match store::overdue_retries(&pool).await {
                    Ok(sets) if !sets.is_empty() => scheduler.send(Command::Ready { sets }).await,
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "cannot look for overdue retries"),
                }
                publish_gauges(&pool, &scheduler).await;
                match store::release_expired_claims(&pool).await {
                    Ok(sets) if !sets.is_empty() => {
                        tracing::warn!(count = sets.len(), "released expired set claims");
                        scheduler.send(Command::Reclaimed { sets }).await;
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "janitor cannot release expired claims"),
                }
                if listener.is_none() {
                    listener = listen(&pool).await.ok();
                }
            }
            msg = notified => match msg {
                Ok(Some(n)) => {
                    let trigger = Uuid::parse_str(n.payload()).ok();
                    take(&pool, &scheduler, trigger).await;
                }
                // The connection dropped and was re-established by sqlx:
                // notifications may have been lost, take everything.
                Ok(None) => take(&pool, &scheduler, None).await,
                Err(error) => {
                    tracing::warn!(%error, "ready-set listener failed");
                    listener = None;
                }
            },
        }
    }
}

/// Scheduler and blocked-set gauges for `/metrics`.
async fn publish_gauges(pool: &PgPool, scheduler: &Scheduler) {
    let stats = scheduler.stats().await;
    metrics::gauge!("kt_sets_ready").set(stats.ready as f64);
    metrics::gauge!("kt_sets_in_flight").set(stats.in_flight as f64);
    metrics::gauge!("kt_sets_waiting_retry").set(stats.delayed as f64);
    metrics::gauge!("kt_worker_sessions").set(stats.sessions as f64);
    let blocked: Result<(i64, Option<f64>), _> = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(blocked_since))::float8
           FROM message_sets WHERE state = 'blocked'",
    )
    .fetch_one(pool)
    .await;
    if let Ok((count, oldest)) = blocked {
        metrics::gauge!("kt_sets_blocked").set(count as f64);
        metrics::gauge!("kt_oldest_blocked_age_seconds").set(oldest.unwrap_or(0.0));
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    Ok(listener)
}

async fn take(pool: &PgPool, scheduler: &Scheduler, trigger: Option<Uuid>) {
    loop {
        match store::take_unqueued(pool, trigger).await {
            Ok(sets) => {
                let full = sets.len() as i64 >= store::TAKE_BATCH;
                if !sets.is_empty() {
                    scheduler.send(Command::Ready { sets }).await;
                }
                if !full {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot take ready sets");
                return;
            }
        }
    }
}

/// Keeps per-trigger in-flight limits current and forgets deleted triggers.
async fn watch_limits(pool: PgPool, triggers: TriggerService, scheduler: Scheduler, shutdown: CancellationToken) {
    let mut changes = triggers.subscribe();
    let mut known: Vec<TriggerId> = Vec::new();
    loop {
        match store::trigger_limits(&pool).await {
            Ok(rows) => {
                let limits: Vec<(TriggerId, u32)> = rows.into_iter().map(|(id, l)| (id, l.max(0) as u32)).collect();
                let removed = known.iter().filter(|k| !limits.iter().any(|(id, _)| id == *k)).copied().collect();
                known = limits.iter().map(|(id, _)| *id).collect();
                scheduler.send(Command::Limits { limits, removed }).await;
            }
            Err(error) => tracing::warn!(%error, "cannot load trigger limits"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}
