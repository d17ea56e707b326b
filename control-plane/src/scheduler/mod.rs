//! The candidate-set server: grants ready message sets to the workers of the
//! nodes that asked for work.
//!
//! How a set becomes ready, who grants it, how a lost wake-up is recovered:
//!
//! - **Ready** is a fact of `message_sets` only (`kt_common::dispatch`):
//!   unclaimed and `ready`, or `waiting` with a retry time that has passed.
//!   Ingest, a worker that releases a set, an operator action and
//!   `CompleteWorkOrder` make sets ready by writing that row.
//! - **Grants**: one task owns the [`Model`] (streams, credits, grants,
//!   per-trigger in-flight counts). Whenever it has credit and something
//!   may have changed, it *fills*: one statement claims up to that many
//!   grantable sets through their partial indexes (a lock id and a lease per
//!   set, triggers taken in turn) and the task hands them to the streams
//!   with the most credit. Nothing in memory says which sets are ready.
//! - **Leases**: a claim lasts [`Scheduler::start`]'s lease (10 s by
//!   default, `--claim-lease-seconds`), which the grant tells the worker;
//!   the worker renews it every third of that while it holds the set
//!   (`kt_common::dispatch::lease`). A worker that dies stops renewing, so
//!   its sets are released by the janitor within a lease and a tick, then
//!   granted again.
//! - **Wake-ups** only say "fill now": `NOTIFY kt_sets` from ingest, worker
//!   outcomes (credit came back), operator actions, the earliest retry time
//!   reported by an outcome, and a one-second tick. The tick is the one
//!   recovery mechanism: a notification lost while the listener
//!   reconnected, a retry time this replica never heard of, a claim that
//!   expired (released by the janitor on the same tick) — each is found by
//!   the next fill, within a second.

pub mod model;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kt_common::dispatch::{self, grant};
use kt_common::tasks::{Failpoints, Supervisor};
use kt_proto::internal::{SetGrant, SetOutcome, SetOutcomeKind, WorkGrant, WorkerMessage};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use model::{Model, SetId, StreamId, TriggerId};

use crate::triggers::TriggerService;

/// Commands queued towards the scheduler task.
const COMMAND_CAPACITY: usize = 4_096;
/// Grant messages queued towards one worker stream; a stream this far
/// behind is dropped and its unsent grants given back.
pub const GRANT_CAPACITY: usize = 256;
/// Postgres channel ingest notifies (payload: trigger id) when sets became ready.
pub const NOTIFY_CHANNEL: &str = dispatch::SETS_CHANNEL;
/// The recovery tick: fill, release expired claims, publish gauges.
const TICK: Duration = Duration::from_secs(1);
/// Gauges are read from the database this often (they count rows).
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

enum Command {
    Join {
        stream: StreamId,
        node_id: String,
        grants: mpsc::Sender<WorkGrant>,
    },
    Leave {
        stream: StreamId,
    },
    Credit {
        stream: StreamId,
        sets: u32,
    },
    Outcomes {
        stream: StreamId,
        outcomes: Vec<SetOutcome>,
    },
    /// Something may have become ready.
    Wake,
    Limits {
        limits: Vec<TriggerLimit>,
        removed: Vec<TriggerId>,
    },
    Stats {
        reply: oneshot::Sender<Stats>,
    },
}

/// What the scheduler needs of a trigger's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TriggerLimit {
    pub trigger: TriggerId,
    /// `tuning.max_in_flight`, 0 while disabled.
    pub max_in_flight: u32,
}

/// A snapshot for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub in_flight: usize,
    pub streams: usize,
    pub credits: u32,
}

/// Handle to the scheduler task.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Command>,
}

impl Scheduler {
    /// Starts the scheduler, its listener and its janitor; claims are
    /// granted with `lease` (see [`check_lease`]).
    pub async fn start(
        pool: PgPool,
        triggers: TriggerService,
        lease: Duration,
        shutdown: CancellationToken,
        tasks: &Supervisor,
        failpoints: Failpoints,
    ) -> anyhow::Result<Self> {
        check_lease(lease)?;
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let scheduler = Scheduler { tx };
        let task = SchedulerTask {
            model: Model::new(),
            streams: HashMap::new(),
            lease,
            // The task is the only user, one statement at a time.
            pool: kt_common::db::dispatch_pool(&pool, 1),
            dirty: true,
            next_retry: None,
            failpoints,
        };
        // Grants, claims and limits are held in memory by these tasks and
        // rebuilt from the database only at the start of a term: without any
        // of them the replica would answer the API but never grant work, so
        // each is fatal (the replica exits and a standby, or its restart,
        // takes over with fresh state).
        tasks.spawn_fatal("scheduler", &shutdown, task.run(rx, shutdown.clone()));
        tasks.spawn_fatal(
            "scheduler listener",
            &shutdown,
            listen_and_sweep(pool.clone(), scheduler.clone(), shutdown.clone()),
        );
        tasks.spawn_fatal(
            "trigger limits",
            &shutdown,
            watch_limits(pool, triggers, scheduler.clone(), shutdown.clone()),
        );
        Ok(scheduler)
    }

    async fn send(&self, cmd: Command) {
        // The task only stops at shutdown; a failed send then is harmless.
        let _ = self.tx.send(cmd).await;
    }

    pub async fn join(&self, stream: StreamId, node_id: String, grants: mpsc::Sender<WorkGrant>) {
        self.send(Command::Join { stream, node_id, grants }).await;
    }

    pub async fn leave(&self, stream: StreamId) {
        self.send(Command::Leave { stream }).await;
    }

    pub async fn credit(&self, stream: StreamId, sets: u32) {
        self.send(Command::Credit { stream, sets }).await;
    }

    pub async fn outcomes(&self, stream: StreamId, outcomes: Vec<SetOutcome>) {
        self.send(Command::Outcomes { stream, outcomes }).await;
    }

    /// Serves one node's work stream: registers it, then feeds its credits
    /// and outcomes to the scheduler until the node ends it (or it breaks),
    /// and removes it. Grants go out on `grants`.
    pub async fn serve_stream(
        &self,
        node_id: String,
        grants: mpsc::Sender<WorkGrant>,
        mut messages: impl futures::Stream<Item = WorkerMessage> + Unpin,
    ) {
        use futures::StreamExt as _;
        use kt_proto::internal::worker_message::Msg;
        let stream = Uuid::now_v7();
        self.join(stream, node_id, grants).await;
        while let Some(message) = messages.next().await {
            match message.msg {
                Some(Msg::Credit(c)) => self.credit(stream, c.sets).await,
                Some(Msg::Outcomes(o)) => self.outcomes(stream, o.outcomes).await,
                Some(Msg::Hello(_)) | None => {}
            }
        }
        self.leave(stream).await;
    }

    /// Sets may have become ready (an operator action, a completion): fill.
    pub async fn wake(&self) {
        self.send(Command::Wake).await;
    }

    pub async fn stats(&self) -> Stats {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats { reply }).await;
        rx.await.unwrap_or_default()
    }
}

struct StreamHandle {
    node_id: String,
    grants: mpsc::Sender<WorkGrant>,
}

struct SchedulerTask {
    model: Model,
    streams: HashMap<StreamId, StreamHandle>,
    /// The lease of every claim this scheduler writes.
    lease: Duration,
    /// Its own connection, on generic plans (see `dispatch_pool`).
    pool: PgPool,
    /// Something may be grantable that was not when we last filled.
    dirty: bool,
    /// The earliest retry time an outcome reported: a wake-up, not a record.
    next_retry: Option<Instant>,
    /// `scheduler`, hit for every command (tests).
    failpoints: Failpoints,
}

impl SchedulerTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry = self.next_retry;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        self.handle(cmd);
                        // Everything already queued, before one fill for all of it.
                        while let Ok(cmd) = rx.try_recv() {
                            self.handle(cmd);
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {
                    self.next_retry = None;
                    self.dirty = true;
                }
                _ = tick.tick() => self.dirty = true,
            }
            if self.dirty {
                self.fill().await;
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        self.failpoints.hit("scheduler");
        match cmd {
            Command::Join { stream, node_id, grants } => {
                tracing::info!(%node_id, %stream, "worker stream joined");
                self.model.add_stream(stream);
                self.streams.insert(stream, StreamHandle { node_id, grants });
            }
            Command::Leave { stream } => self.drop_stream(stream, "stream ended"),
            Command::Credit { stream, sets } => {
                self.model.add_credits(stream, sets);
                self.dirty = true;
            }
            Command::Outcomes { stream, outcomes } => {
                for outcome in outcomes {
                    self.on_outcome(stream, outcome);
                }
                self.dirty = true;
            }
            Command::Wake => self.dirty = true,
            Command::Limits { limits, removed } => {
                for l in limits {
                    self.model.set_limit(l.trigger, l.max_in_flight);
                }
                for trigger in removed {
                    self.model.forget_trigger(trigger);
                }
                self.dirty = true;
            }
            Command::Stats { reply } => {
                let _ = reply.send(Stats {
                    in_flight: self.model.in_flight_len(),
                    streams: self.model.streams_len(),
                    credits: self.model.credits(),
                });
            }
        }
    }

    fn on_outcome(&mut self, stream: StreamId, outcome: SetOutcome) {
        if self.model.complete(stream, outcome.set_id).is_none() {
            return;
        }
        let kind = SetOutcomeKind::try_from(outcome.kind).unwrap_or(SetOutcomeKind::Unspecified);
        if kind == SetOutcomeKind::Waiting && outcome.retry_at_unix_ms > 0 {
            let wait = (outcome.retry_at_unix_ms - chrono::Utc::now().timestamp_millis()).max(0) as u64;
            let at = Instant::now() + Duration::from_millis(wait);
            self.next_retry = Some(self.next_retry.map_or(at, |t| t.min(at)));
        }
    }

    /// Claims grantable sets for the credit there is and hands them out.
    async fn fill(&mut self) {
        self.dirty = false;
        let rooms: Vec<grant::Room> = self
            .model
            .rooms()
            .into_iter()
            .map(|(trigger_id, sets)| grant::Room {
                trigger_id,
                sets: sets.min(i32::MAX as u32) as i32,
                lease_secs: self.lease.as_secs_f64(),
            })
            .collect();
        if rooms.is_empty() {
            return;
        }
        let credits = i64::from(self.model.credits());
        // The leases run from the claim's statement; the grant says how much
        // of them is left when it is sent.
        let claiming = Instant::now();
        let claimed = match grant::claim_grantable(&self.pool, &rooms, credits).await {
            Ok(claimed) => claimed,
            Err(error) => {
                // The next tick tries again.
                tracing::warn!(%error, "cannot claim ready sets");
                return;
            }
        };
        if claimed.is_empty() {
            return;
        }
        let locks: HashMap<SetId, Uuid> = claimed.iter().map(|c| (c.set_id, c.lock_id)).collect();
        let (grants, unassigned) = self.model.assign(claimed.iter().map(|c| (c.set_id, c.trigger_id)));
        let mut give_back: Vec<(SetId, Uuid)> = unassigned.iter().map(|s| (*s, locks[s])).collect();
        let mut per_stream: HashMap<StreamId, Vec<SetGrant>> = HashMap::new();
        for g in grants {
            per_stream.entry(g.stream).or_default().push(SetGrant {
                set_id: g.set_id,
                trigger_id: g.trigger_id.to_string(),
                lock_id: locks[&g.set_id].to_string(),
            });
        }
        let lease_ms = self.lease.saturating_sub(claiming.elapsed()).as_millis().min(u128::from(u32::MAX)) as u32;
        for (stream, sets) in per_stream {
            let sent = self.streams.get(&stream).map(|s| s.grants.try_send(WorkGrant { sets, lease_ms }));
            match sent {
                Some(Ok(())) => {}
                Some(Err(mpsc::error::TrySendError::Full(w) | mpsc::error::TrySendError::Closed(w))) => {
                    give_back.extend(w.sets.iter().map(|g| (g.set_id, locks[&g.set_id])));
                    self.drop_stream(stream, "not reading its grants");
                }
                None => {}
            }
        }
        if !give_back.is_empty() {
            if let Err(error) = grant::give_back(&self.pool, &give_back).await {
                // They come back when their lease runs out.
                tracing::warn!(%error, count = give_back.len(), "cannot give back unsent claims");
            }
            self.dirty = true;
        }
    }

    fn drop_stream(&mut self, stream: StreamId, reason: &str) {
        if let Some(handle) = self.streams.remove(&stream) {
            let orphaned = self.model.remove_stream(stream);
            tracing::info!(node_id = %handle.node_id, %stream, reason, held = orphaned.len(), "worker stream left");
        }
    }
}

/// Wakes the scheduler on every notification from ingest, and runs the
/// janitor (expired claims) and the gauges on the recovery tick.
async fn listen_and_sweep(pool: PgPool, scheduler: Scheduler, shutdown: CancellationToken) {
    let mut listener = listen(&pool).await.ok();
    if listener.is_none() {
        tracing::warn!("cannot listen for ready sets; the recovery tick finds them");
    }
    let mut tick = tokio::time::interval(TICK);
    let mut gauges_at = Instant::now();
    loop {
        let notified = async {
            match listener.as_mut() {
                Some(l) => l.try_recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                match grant::release_expired_claims(&pool).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(count = n, "released expired set claims");
                        scheduler.wake().await;
                    }
                    Err(error) => tracing::warn!(%error, "janitor cannot release expired claims"),
                }
                if gauges_at.elapsed() >= GAUGE_INTERVAL {
                    gauges_at = Instant::now();
                    publish_gauges(&pool, &scheduler).await;
                }
                if listener.is_none() {
                    listener = listen(&pool).await.ok();
                    // Notifications may have been lost meanwhile.
                    scheduler.wake().await;
                }
            }
            msg = notified => match msg {
                // `None`: the connection dropped and sqlx re-established it;
                // notifications may have been lost, and a fill finds them.
                Ok(_) => scheduler.wake().await,
                Err(error) => {
                    tracing::warn!(%error, "ready-set listener failed");
                    listener = None;
                }
            },
        }
    }
}

/// Scheduler and set gauges for `/metrics`. Counts are capped so a huge
/// backlog costs a bounded index walk.
async fn publish_gauges(pool: &PgPool, scheduler: &Scheduler) {
    let stats = scheduler.stats().await;
    metrics::gauge!("kt_sets_in_flight").set(stats.in_flight as f64);
    metrics::gauge!("kt_worker_sessions").set(stats.streams as f64);
    let counts: Result<(i64, i64, i64, Option<f64>), _> = sqlx::query_as(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM message_sets
                                        WHERE state = 'ready' AND lock_id IS NULL LIMIT 100000) r),
                (SELECT count(*) FROM (SELECT 1 FROM message_sets
                                        WHERE state = 'waiting' AND retry_at IS NOT NULL AND lock_id IS NULL
                                        LIMIT 100000) w),
                count(*), extract(epoch FROM now() - min(blocked_since))::float8
           FROM message_sets WHERE state = 'blocked'",
    )
    .fetch_one(pool)
    .await;
    if let Ok((ready, waiting, blocked, oldest)) = counts {
        metrics::gauge!("kt_sets_ready").set(ready as f64);
        metrics::gauge!("kt_sets_waiting_retry").set(waiting as f64);
        metrics::gauge!("kt_sets_blocked").set(blocked as f64);
        metrics::gauge!("kt_oldest_blocked_age_seconds").set(oldest.unwrap_or(0.0));
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    Ok(listener)
}

/// Keeps per-trigger limits current and forgets deleted triggers.
async fn watch_limits(pool: PgPool, triggers: TriggerService, scheduler: Scheduler, shutdown: CancellationToken) {
    let mut changes = triggers.subscribe();
    let mut known: HashSet<TriggerId> = HashSet::new();
    loop {
        match trigger_limits(&pool).await {
            Ok(limits) => {
                let current: HashSet<TriggerId> = limits.iter().map(|l| l.trigger).collect();
                let removed = known.difference(&current).copied().collect();
                known = current;
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

/// Every trigger's in-flight limit (`tuning.max_in_flight`, 0 while
/// disabled: its stored messages wait until it is enabled again).
async fn trigger_limits(pool: &PgPool) -> Result<Vec<TriggerLimit>, sqlx::Error> {
    // Only the one field: with thousands of triggers, their whole specs
    // would be megabytes to read and parse on every change.
    let rows: Vec<(Uuid, bool, Option<i64>)> =
        sqlx::query_as("SELECT id, enabled, (spec #>> '{tuning,max_in_flight}')::bigint FROM triggers")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(trigger, enabled, max_in_flight)| {
            let max_in_flight = max_in_flight
                .and_then(|v| u32::try_from(v.max(0)).ok())
                .unwrap_or(kt_common::trigger::DEFAULT_MAX_IN_FLIGHT);
            TriggerLimit { trigger, max_in_flight: if enabled { max_in_flight } else { 0 } }
        })
        .collect())
}

/// A claim lease the scheduler can work with: from
/// [`lease::MIN_LEASE`](kt_common::dispatch::lease::MIN_LEASE) (renewed every
/// second) to [`lease::MAX_LEASE`](kt_common::dispatch::lease::MAX_LEASE).
pub fn check_lease(lease: Duration) -> anyhow::Result<()> {
    use kt_common::dispatch::lease::{MAX_LEASE, MIN_LEASE};
    anyhow::ensure!(
        (MIN_LEASE..=MAX_LEASE).contains(&lease),
        "the claim lease must be {} to {} seconds, not {:?} (--claim-lease-seconds / KT_CLAIM_LEASE_SECONDS)",
        MIN_LEASE.as_secs(),
        MAX_LEASE.as_secs(),
        lease
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_claim_leases_from_3_seconds_to_an_hour_are_accepted() {
        for secs in [3, 10, 3_600] {
            assert!(check_lease(Duration::from_secs(secs)).is_ok(), "{secs} s");
        }
        for lease in [Duration::ZERO, Duration::from_millis(2_999), Duration::from_secs(3_601)] {
            let error = check_lease(lease).unwrap_err().to_string();
            assert!(error.contains("3 to 3600 seconds") && error.contains("--claim-lease-seconds"), "{error}");
        }
    }
}
