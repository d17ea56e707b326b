//! The consume loop of one pipeline: reads messages into batches, hands
//! them to the persister, stores the offsets of acknowledged batches,
//! resolves start offsets of new assignments, and pauses the partitions
//! when the persister is saturated or the rate limit is reached.
//!
//! On cancel: intake stops, the open batch is handed over, batches in flight
//! get a grace period to be stored, stored offsets are committed, and the
//! consumer leaves its group. Whatever was not stored is not committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kt_proto::ids::TriggerId;
use kt_proto::internal::{PartitionReport, PipelineState};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::context::IngestContext;
use super::filter::PipelineFilter;
use super::message::to_ingest_message;
use super::offsets::{any_uncommitted, next_offset, plan_starts, Checkpoints, StartPosition, TopicPartition};
use super::persister::{run_persister, Ack, Batch, DbWriter};
use super::rate::RateLimiter;
use super::{group_instance_id, scrub, IngestSettings, KafkaConfig, MAX_BATCHES_IN_FLIGHT};
use crate::assignment::AssignedTrigger;
use crate::status::PipelineStatus;
use crate::store::{load_checkpoints, BatchOutcome, IngestMessage};

type IngestConsumer = StreamConsumer<IngestContext>;

/// How often the same Kafka error is logged again while it persists.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// What a pipeline needs from its node.
#[derive(Clone)]
pub struct PipelineEnv {
    pub pool: PgPool,
    pub settings: Arc<IngestSettings>,
    /// librdkafka client.id: names this node in broker logs.
    pub client_id: String,
    /// This node's id: its consumers' static group membership is derived
    /// from it (when [`IngestSettings::static_membership`] is on).
    pub node_id: String,
    pub status: PipelineStatus,
}

/// Why a pipeline stopped on its own. Each is followed by a restart with
/// backoff.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot create the Kafka consumer of trigger {trigger_id}: {message}")]
    CreateConsumer { trigger_id: TriggerId, message: String },
    #[error("cannot subscribe trigger {trigger_id} to its topics: {message}")]
    Subscribe { trigger_id: TriggerId, message: String },
    #[error("cannot resolve the start offsets of trigger {trigger_id}: {message}")]
    StartOffsets { trigger_id: TriggerId, message: String },
    #[error("fatal Kafka error in trigger {trigger_id}: {message}")]
    Fatal { trigger_id: TriggerId, message: String },
    #[error("{message}")]
    Filter { trigger_id: TriggerId, message: String },
    #[error("the persister of trigger {trigger_id} stopped unexpectedly")]
    PersisterGone { trigger_id: TriggerId },
}

/// Runs the pipeline of `def` until `cancel` (→ `Ok`) or a failure.
pub async fn run_pipeline(
    def: Arc<AssignedTrigger>,
    env: PipelineEnv,
    cancel: CancellationToken,
) -> Result<(), PipelineError> {
    let trigger_id = def.id;
    let settings = env.settings.clone();
    let instance_id = settings.static_membership.then(|| group_instance_id(&env.node_id, trigger_id));
    let config = KafkaConfig::for_trigger(&def.spec, &def.secrets, &settings, &env.client_id, instance_id.as_deref());
    // KafkaConfig's Debug masks the credentials.
    tracing::info!(%trigger_id, generation = def.generation, config = ?config, "starting pipeline");
    // Compiled once per generation: an UpdateTrigger of the filter is a new
    // generation, which restarts the pipeline.
    let filter = PipelineFilter::new(&def.spec.filter, trigger_id, def.generation)
        .map_err(|message| PipelineError::Filter { trigger_id, message })?
        .map(Arc::new);
    let consumer: IngestConsumer = config
        .client_config()
        .create_with_context(IngestContext::new(trigger_id))
        .map_err(|e| PipelineError::CreateConsumer { trigger_id, message: scrub(&e.to_string(), &def.secrets) })?;
    let consumer = DetachedConsumer(Some(Arc::new(consumer)));
    let topics: Vec<&str> = def.spec.kafka.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| PipelineError::Subscribe { trigger_id, message: scrub(&e.to_string(), &def.secrets) })?;
    env.status.set_state(PipelineState::Running, Some(String::new()));

    let (batch_tx, batch_rx) = mpsc::channel(MAX_BATCHES_IN_FLIGHT);
    let (ack_tx, ack_rx) = mpsc::channel(MAX_BATCHES_IN_FLIGHT);
    let abandon = CancellationToken::new();
    let writer = DbWriter {
        pool: env.pool.clone(),
        trigger_id,
        settings: settings.persist,
        status: env.status.clone(),
        abandon: abandon.clone(),
        filter,
    };
    let persister = tokio::spawn(run_persister(Arc::new(writer), batch_rx, ack_tx));
    let now = Instant::now();
    let mut lp = ConsumeLoop {
        limiter: RateLimiter::new(def.spec.tuning.rate_limit_per_second, now),
        def,
        env,
        consumer,
        batches: Some(batch_tx),
        acks: ack_rx,
        batch: Batch::default(),
        batch_started: None,
        in_flight: 0,
        paused: false,
        holding_since: None,
        throttle_until: None,
        stored: HashMap::new(),
        stored_generation: 0,
        last_error: None,
        last_cause: None,
        totals: BatchOutcome::default(),
    };
    let result = lp.run(&cancel).await;
    lp.shutdown(persister, abandon).await;
    result
}

struct ConsumeLoop {
    def: Arc<AssignedTrigger>,
    env: PipelineEnv,
    consumer: DetachedConsumer,
    /// `None` once closed at shutdown.
    batches: Option<mpsc::Sender<Batch>>,
    acks: mpsc::Receiver<Ack>,
    /// The batch being filled.
    batch: Batch,
    batch_started: Option<Instant>,
    /// Batches handed to the persister and not acknowledged yet.
    in_flight: usize,
    paused: bool,
    /// Since when no more messages are taken (persister saturated or rate
    /// limit reached).
    holding_since: Option<Instant>,
    limiter: Option<RateLimiter>,
    throttle_until: Option<Instant>,
    /// Offsets stored per partition in `stored_generation` (next to read).
    stored: HashMap<TopicPartition, i64>,
    stored_generation: u64,
    last_error: Option<(String, Instant)>,
    /// The last error that was not a generic "brokers down" consequence.
    last_cause: Option<Instant>,
    /// What this pipeline stored, for the log at the end.
    totals: BatchOutcome,
}

impl ConsumeLoop {
    fn trigger_id(&self) -> TriggerId {
        self.def.id
    }

    fn settings(&self) -> &IngestSettings {
        &self.env.settings
    }

    async fn run(&mut self, cancel: &CancellationToken) -> Result<(), PipelineError> {
        let mut progress = tokio::time::interval(self.settings().progress_interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let far = || Instant::now() + Duration::from_secs(86_400);
        loop {
            let linger_at = self.batch_started.map(|t| t + self.settings().batch_linger);
            let can_flush = self.in_flight < MAX_BATCHES_IN_FLIGHT;
            let pause_at = self.holding_since.filter(|_| !self.paused).map(|t| t + self.settings().pause_after);
            // While holding, messages stay in librdkafka's (bounded) local
            // queue; once paused, polling resumes to serve the callbacks.
            let take_messages = self.holding_since.is_none() || self.paused;
            let consumer = self.consumer.clone();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                ack = self.acks.recv() => match ack {
                    Some(ack) => self.on_ack(ack),
                    None => return Err(PipelineError::PersisterGone { trigger_id: self.trigger_id() }),
                },
                _ = consumer.context().rebalanced.notified() => {}
                _ = sleep_until(linger_at.unwrap_or_else(far)), if linger_at.is_some() && can_flush => self.flush(),
                _ = sleep_until(self.throttle_until.unwrap_or_else(far)), if self.throttle_until.is_some() => {
                    self.throttle_until = None;
                }
                _ = sleep_until(pause_at.unwrap_or_else(far)), if pause_at.is_some() => self.set_paused(true),
                _ = progress.tick() => self.publish_progress(),
                // Also serves the rebalance, commit and statistics callbacks.
                received = consumer.recv(), if take_messages => match received {
                    Ok(m) => {
                        let message = to_ingest_message(&m);
                        drop(m);
                        self.on_message(message);
                    }
                    Err(e) => self.on_kafka_error(e)?,
                },
            }
            self.apply_pending_assignment(cancel).await?;
            if self.batch.len() >= self.settings().batch_max_messages {
                self.flush();
            }
            self.update_flow();
        }
    }

    fn on_message(&mut self, message: IngestMessage) {
        if self.last_error.take().is_some() {
            self.env.status.set_error(None);
        }
        let generation = self.consumer.context().generation();
        let now = Instant::now();
        if self.batch.is_empty() {
            self.batch_started = Some(now);
        }
        self.batch.push(message, generation);
        if let Some(until) = self.limiter.as_mut().and_then(|l| l.on_message(now)) {
            self.throttle_until = Some(until);
        }
    }

    fn on_kafka_error(&mut self, e: KafkaError) -> Result<(), PipelineError> {
        if let Some((code, reason)) = self.consumer.client().fatal_error() {
            let message = scrub(&format!("{code:?}: {reason}"), &self.def.secrets);
            return Err(PipelineError::Fatal { trigger_id: self.trigger_id(), message });
        }
        let text = scrub(&e.to_string(), &self.def.secrets);
        let repeated = self.last_error.as_ref().is_some_and(|(t, at)| *t == text && at.elapsed() < ERROR_LOG_INTERVAL);
        // "All brokers down" follows the real cause (an authentication
        // failure, a TLS error...) within milliseconds; the status keeps
        // showing the cause while it is recent.
        let generic = text.contains("AllBrokersDown") || text.contains("BrokerTransportFailure");
        let cause_is_recent = self.last_cause.is_some_and(|at| at.elapsed() < ERROR_LOG_INTERVAL);
        if !generic {
            self.last_cause = Some(Instant::now());
        }
        if !repeated {
            tracing::warn!(trigger_id = %self.trigger_id(), error = %text, "kafka consumer error");
            if !(generic && cause_is_recent) {
                self.env.status.set_error(Some(text.clone()));
            }
            self.last_error = Some((text, Instant::now()));
        }
        Ok(())
    }

    /// Hands the open batch to the persister, if there is room.
    fn flush(&mut self) {
        if self.batch.is_empty() || self.in_flight >= MAX_BATCHES_IN_FLIGHT {
            return;
        }
        let Some(tx) = &self.batches else { return };
        match tx.try_send(std::mem::take(&mut self.batch)) {
            Ok(()) => {
                self.in_flight += 1;
                self.batch_started = None;
            }
            // Cannot happen while in_flight < capacity; keep the batch.
            Err(mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b)) => self.batch = b,
        }
    }

    /// A batch is durable: store its offsets, unless its partitions were
    /// revoked since it was read (then the next owner rereads them).
    fn on_ack(&mut self, ack: Ack) {
        self.in_flight -= 1;
        self.totals += ack.outcome;
        let generation = self.consumer.context().generation();
        if generation != self.stored_generation {
            self.stored.clear();
            self.stored_generation = generation;
        }
        let mut tpl = TopicPartitionList::new();
        for mark in ack.marks.iter().filter(|m| m.generation == generation) {
            let next = next_offset(mark.last_offset);
            let key = (mark.topic.clone(), mark.partition);
            if self.stored.get(&key).is_some_and(|s| *s >= next) {
                continue;
            }
            if let Err(e) = tpl.add_partition_offset(&mark.topic, mark.partition, Offset::Offset(next)) {
                tracing::warn!(trigger_id = %self.trigger_id(), error = %e, "cannot build offset list");
                continue;
            }
            self.stored.insert(key, next);
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.store_offsets(&tpl) {
                // E.g. the partition was just lost: its next owner rereads
                // from the last committed offset; dedup absorbs the repeat.
                tracing::warn!(trigger_id = %self.trigger_id(), error = %e, "failed to store offsets");
            }
        }
    }

    /// Flow control, never dropping a message: while the persister is
    /// saturated or the rate limit is reached, stop taking messages; if that
    /// lasts longer than `pause_after` (a slow or unavailable database),
    /// pause the partitions so the loop can keep serving the group's
    /// callbacks. Short holds do not pause: librdkafka refetches paused
    /// partitions from the broker on resume, which costs far more than a
    /// brief wait.
    fn update_flow(&mut self) {
        let saturated =
            self.batch.len() >= self.settings().batch_max_messages && self.in_flight >= MAX_BATCHES_IN_FLIGHT;
        let hold = saturated || self.throttle_until.is_some();
        match (hold, self.holding_since) {
            (true, None) => self.holding_since = Some(Instant::now()),
            (false, Some(_)) => {
                self.holding_since = None;
                if self.paused {
                    self.set_paused(false);
                }
            }
            _ => {}
        }
    }

    /// Pauses or resumes every assigned partition. Paused partitions resume
    /// exactly after the last message handed to us.
    fn set_paused(&mut self, pause: bool) {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(trigger_id = %self.trigger_id(), error = %e, "cannot read the assignment");
                return;
            }
        };
        let result = if pause { self.consumer.pause(&assignment) } else { self.consumer.resume(&assignment) };
        match result {
            Ok(()) => {
                tracing::debug!(trigger_id = %self.trigger_id(), paused = pause, "consumption paused or resumed");
                self.paused = pause;
            }
            Err(e) => tracing::warn!(trigger_id = %self.trigger_id(), error = %e, "cannot pause or resume"),
        }
    }

    /// Assigns partitions the group handed us, at their resolved start
    /// offsets. Runs outside the rebalance callback, which only records
    /// them; librdkafka waits for this assign call.
    async fn apply_pending_assignment(&mut self, cancel: &CancellationToken) -> Result<(), PipelineError> {
        let (partitions, generation) = {
            let mut state = self.consumer.context().state();
            match state.pending_assignment.take() {
                Some(p) => (p, state.generation),
                None => return Ok(()),
            }
        };
        let trigger_id = self.trigger_id();
        let deadline = Instant::now() + self.settings().offset_lookup_deadline;
        let mut attempt = 0;
        let starts = loop {
            match self.resolve_starts(&partitions).await {
                Ok(starts) => break starts,
                Err(message) if Instant::now() >= deadline => {
                    return Err(PipelineError::StartOffsets { trigger_id, message })
                }
                Err(message) => {
                    tracing::warn!(%trigger_id, error = %message, attempt, "cannot resolve start offsets; retrying");
                    let delay = self.settings().persist.retry_backoff.delay(attempt);
                    attempt += 1;
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        // Only our own recv() runs callbacks, so nothing can have changed;
        // but a stale assignment must never be applied.
        if self.consumer.context().generation() != generation {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        let mut resumed = TopicPartitionList::new();
        for ((topic, partition), position, offset) in &starts {
            tpl.add_partition_offset(topic, *partition, *offset)
                .map_err(|e| PipelineError::StartOffsets { trigger_id, message: e.to_string() })?;
            if let StartPosition::AfterCheckpoint(next) = position {
                resumed
                    .add_partition_offset(topic, *partition, Offset::Offset(*next))
                    .map_err(|e| PipelineError::StartOffsets { trigger_id, message: e.to_string() })?;
            }
        }
        self.consumer.assign(&tpl).map_err(|e| PipelineError::Fatal { trigger_id, message: e.to_string() })?;
        if self.paused {
            if let Err(e) = self.consumer.pause(&tpl) {
                tracing::warn!(%trigger_id, error = %e, "cannot pause new partitions");
            }
        }
        self.store_resume_positions(&resumed, generation);
        tracing::info!(%trigger_id, starts = ?starts, "partitions assigned");
        self.consumer.context().state().assigned = partitions;
        self.publish_progress();
        Ok(())
    }

    /// A partition resumed from its checkpoint has no committed offset, but
    /// everything before its start is durable: store the start as its offset
    /// at once. Otherwise a partition with nothing new to read would never
    /// be committed, and its group would report lag it does not have (and
    /// fall back to the checkpoints again on every hand-over).
    fn store_resume_positions(&mut self, resumed: &TopicPartitionList, generation: u64) {
        if resumed.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.store_offsets(resumed) {
            // Harmless: the first stored batch of the partition stores a
            // later offset anyway.
            tracing::warn!(trigger_id = %self.trigger_id(), error = %e, "cannot store the resume positions");
            return;
        }
        if generation != self.stored_generation {
            self.stored.clear();
            self.stored_generation = generation;
        }
        for e in resumed.elements() {
            if let Offset::Offset(next) = e.offset() {
                self.stored.insert((e.topic().to_owned(), e.partition()), next);
            }
        }
    }

    /// Committed offsets of `partitions`, and for those without one, where
    /// the trigger's checkpoints or initial policy say to start: each
    /// partition's start position and the librdkafka offset it resolves to.
    async fn resolve_starts(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, StartPosition, Offset)>, String> {
        let timeout = self.settings().offset_lookup_timeout;
        let mut query = TopicPartitionList::new();
        for (topic, partition) in partitions {
            query.add_partition(topic, *partition);
        }
        // Both lookups are blocking network calls of librdkafka.
        let consumer = self.consumer.clone();
        let committed_tpl = tokio::task::spawn_blocking(move || consumer.committed_offsets(query, timeout))
            .await
            .map_err(|e| format!("committed offsets lookup panicked: {e}"))?
            .map_err(|e| format!("cannot fetch committed offsets: {e}"))?;
        let mut committed = HashMap::new();
        for e in committed_tpl.elements() {
            e.error()
                .map_err(|err| format!("cannot fetch committed offset of {}/{}: {err}", e.topic(), e.partition()))?;
            if let Offset::Offset(o) = e.offset() {
                committed.insert((e.topic().to_owned(), e.partition()), o);
            }
        }
        let checkpoints = if any_uncommitted(partitions, &committed) {
            let rows = load_checkpoints(&self.env.pool, self.trigger_id().0)
                .await
                .map_err(|e| format!("cannot read partition checkpoints: {e}"))?;
            Checkpoints::new(
                rows.into_iter()
                    .map(|c| ((c.topic, c.partition), c.last_offset, c.last_ts.map(|ts| ts.timestamp_millis()))),
            )
        } else {
            Checkpoints::default()
        };
        let policy = self.def.spec.kafka.initial_offset_reset_policy;
        let plan = plan_starts(partitions, &committed, policy, &checkpoints);
        let mut by_time_query = TopicPartitionList::new();
        for ((topic, partition), pos) in &plan {
            if let StartPosition::AtTimestamp(ts) = pos {
                by_time_query
                    .add_partition_offset(topic, *partition, Offset::Offset(*ts))
                    .map_err(|e| e.to_string())?;
            }
        }
        let mut by_time = HashMap::new();
        if by_time_query.count() > 0 {
            let consumer = self.consumer.clone();
            let found = tokio::task::spawn_blocking(move || consumer.offsets_for_times(by_time_query, timeout))
                .await
                .map_err(|e| format!("offsets-for-times lookup panicked: {e}"))?
                .map_err(|e| format!("cannot look up offsets by timestamp: {e}"))?;
            for e in found.elements() {
                e.error().map_err(|err| {
                    format!("cannot look up offset by time of {}/{}: {err}", e.topic(), e.partition())
                })?;
                by_time.insert((e.topic().to_owned(), e.partition()), e.offset());
            }
        }
        let from_checkpoints: Vec<&TopicPartition> =
            plan.iter().filter(|(_, pos)| matches!(pos, StartPosition::AfterCheckpoint(_))).map(|(tp, _)| tp).collect();
        if !from_checkpoints.is_empty() {
            tracing::info!(
                trigger_id = %self.trigger_id(),
                partitions = ?from_checkpoints,
                "group has no committed offset; resuming from the partition checkpoints"
            );
        }
        Ok(plan
            .into_iter()
            .map(|(tp, pos)| {
                let offset = pos.to_offset(by_time.get(&tp).copied());
                (tp, pos, offset)
            })
            .collect())
    }

    fn publish_progress(&self) {
        let ctx = self.consumer.context();
        let assigned = ctx.state().assigned.clone();
        let partitions = assigned
            .into_iter()
            .map(|tp| {
                let progress = ctx.progress(&tp);
                let committed = progress.map(|p| p.committed_offset).filter(|o| *o >= 0);
                let committed = committed.or_else(|| self.stored.get(&tp).copied()).unwrap_or(-1);
                let high_watermark = progress.map_or(-1, |p| p.high_watermark);
                if committed >= 0 && high_watermark >= 0 {
                    metrics::gauge!(
                        "kt_consumer_lag",
                        "trigger_id" => self.trigger_id().to_string(),
                        "topic" => tp.0.clone(),
                        "partition" => tp.1.to_string()
                    )
                    .set((high_watermark - committed).max(0) as f64);
                }
                PartitionReport { committed_offset: committed, high_watermark, topic: tp.0, partition: tp.1 }
            })
            .collect();
        self.env.status.set_partitions(partitions);
    }

    /// Stops intake and commits what is stored. Batches not stored within
    /// the grace period are abandoned: never committed, redelivered later.
    async fn shutdown(mut self, persister: JoinHandle<()>, abandon: CancellationToken) {
        let trigger_id = self.trigger_id();
        self.flush();
        // Closing the channel lets the persister finish what it has, then end.
        self.batches = None;
        let grace = sleep_until(Instant::now() + self.settings().shutdown_grace);
        tokio::pin!(grace);
        while self.in_flight > 0 {
            tokio::select! {
                ack = self.acks.recv() => match ack {
                    Some(ack) => self.on_ack(ack),
                    None => break,
                },
                _ = &mut grace => {
                    tracing::warn!(%trigger_id, batches = self.in_flight, "batches not stored within the shutdown grace; leaving them uncommitted");
                    break;
                }
            }
        }
        abandon.cancel();
        if let Err(e) = persister.await {
            tracing::error!(%trigger_id, error = %e, "persister task failed");
        }
        if !self.batch.is_empty() {
            tracing::info!(%trigger_id, messages = self.batch.len(), "left unstored messages uncommitted at shutdown");
        }
        close_consumer(self.consumer.take(), trigger_id, self.env.settings.shutdown_grace).await;
        tracing::info!(
            %trigger_id,
            stored = self.totals.stored,
            duplicates = self.totals.duplicates,
            failed = self.totals.failed,
            "pipeline stopped"
        );
    }
}

/// The pipeline's consumer. Closing a librdkafka consumer blocks until it
/// has left its group, which can take forever when the coordinator is gone;
/// a consumer dropped on any path other than the orderly [`close_consumer`]
/// (an early error, the task aborted by a runtime shutting down) is
/// therefore dropped on a thread of its own, never on the runtime's.
struct DetachedConsumer(Option<Arc<IngestConsumer>>);

impl DetachedConsumer {
    fn take(mut self) -> Arc<IngestConsumer> {
        self.0.take().expect("the consumer is present until taken")
    }
}

impl std::ops::Deref for DetachedConsumer {
    type Target = Arc<IngestConsumer>;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("the consumer is present until taken")
    }
}

impl Drop for DetachedConsumer {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let detached = std::thread::Builder::new().name("kt-consumer-drop".into()).spawn(move || drop(consumer));
            if let Err(e) = detached {
                tracing::error!(error = %e, "cannot start a thread to drop a Kafka consumer");
            }
        }
    }
}

/// Commits the stored offsets and closes the consumer (it leaves the group).
/// Both are blocking librdkafka calls that can wait forever for a group
/// coordinator that is gone, so they run on a thread of their own, waited
/// for at most `timeout`: a stuck close must neither hold up the successor
/// pipeline nor the process exit (the blocking pool would).
async fn close_consumer(consumer: Arc<IngestConsumer>, trigger_id: TriggerId, timeout: Duration) {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let close = move || {
        // With offset storing manual, this commits the stored offsets:
        // exactly what is durable in Postgres.
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(%trigger_id, error = %e, "final offset commit failed"),
        }
        // Dropping the last handle closes the consumer; librdkafka commits
        // the stored offsets once more on the way out.
        drop(consumer);
        let _ = done_tx.send(());
    };
    if let Err(e) = std::thread::Builder::new().name("kt-consumer-close".into()).spawn(close) {
        tracing::error!(%trigger_id, error = %e, "cannot start a thread to close the consumer");
        return;
    }
    if tokio::time::timeout(timeout, done_rx).await.is_err() {
        tracing::warn!(%trigger_id, timeout_ms = timeout.as_millis() as u64, "kafka consumer did not close in time; leaving it to finish in the background");
    }
}
