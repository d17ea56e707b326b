//! The consume loop of one pipeline: reads messages into batches, hands
//! them to the persister, stores the offsets of acknowledged batches,
//! resolves start offsets of new assignments, and pauses the partitions
//! when the persister is saturated or the rate limit is reached.
//!
//! On cancel: intake stops, the open batch is handed over, batches in flight
//! get a grace period to be stored, stored offsets are committed, and the
//! consumer leaves its group. Whatever was not stored is not committed.

use std::sync::Arc;
use std::time::Duration;

use kt_proto::ids::TriggerId;
use kt_proto::internal::{PartitionReport, PipelineState};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::TopicPartitionList;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::context::{IngestConsumer, IngestContext};
use super::errors::KafkaErrors;
use super::filter::PipelineFilter;
use super::handle::{close_consumer, DetachedConsumer};
use super::message::to_ingest_message;
use super::offsets::OffsetTracker;
use super::persister::{run_persister, Ack, Batch, DbWriter};
use super::rate::RateLimiter;
use super::starts::{resolve_starts_retrying, StartLookup, StartPosition};
use super::{group_instance_id, scrub, IngestSettings, KafkaConfig, PipelineError, MAX_BATCHES_IN_FLIGHT};
use crate::assignment::AssignedTrigger;
use crate::status::PipelineStatus;
use crate::store::{BatchOutcome, IngestMessage};

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
        offsets: OffsetTracker::default(),
        errors: KafkaErrors::default(),
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
    offsets: OffsetTracker,
    errors: KafkaErrors,
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
        self.errors.clear(&self.env.status);
        let epoch = self.consumer.context().epoch();
        let now = Instant::now();
        if self.batch.is_empty() {
            self.batch_started = Some(now);
        }
        self.batch.push(message, epoch);
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
        self.errors.report(text, self.def.id, &self.env.status);
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
        let epoch = self.consumer.context().epoch();
        self.offsets.store_durable(&**self.consumer, epoch, &ack.marks, self.def.id);
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
        let (partitions, epoch) = {
            let mut state = self.consumer.context().state();
            match state.pending_assignment.take() {
                Some(p) => (p, state.epoch),
                None => return Ok(()),
            }
        };
        let trigger_id = self.trigger_id();
        let lookup = StartLookup {
            consumer: &self.consumer,
            pool: &self.env.pool,
            trigger_id,
            policy: self.def.spec.kafka.initial_offset_reset_policy,
            timeout: self.settings().offset_lookup_timeout,
        };
        let settings = self.settings();
        let retry = (settings.offset_lookup_deadline, settings.persist.retry_backoff);
        let Some(starts) = resolve_starts_retrying(&lookup, &partitions, retry, cancel)
            .await
            .map_err(|message| PipelineError::StartOffsets { trigger_id, message })?
        else {
            return Ok(());
        };
        // Only our own recv() runs callbacks, so nothing can have changed;
        // but a stale assignment must never be applied.
        if self.consumer.context().epoch() != epoch {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), _, offset) in &starts {
            tpl.add_partition_offset(topic, *partition, *offset)
                .map_err(|e| PipelineError::StartOffsets { trigger_id, message: e.to_string() })?;
        }
        self.consumer.assign(&tpl).map_err(|e| PipelineError::Fatal { trigger_id, message: e.to_string() })?;
        if self.paused {
            if let Err(e) = self.consumer.pause(&tpl) {
                tracing::warn!(%trigger_id, error = %e, "cannot pause new partitions");
            }
        }
        let resumed = starts.iter().filter_map(|(tp, position, _)| match position {
            StartPosition::AfterCheckpoint(next) => Some((tp.clone(), *next)),
            _ => None,
        });
        self.offsets.store_resumed(&**self.consumer, epoch, resumed, trigger_id);
        tracing::info!(%trigger_id, starts = ?starts, "partitions assigned");
        self.consumer.context().state().assigned = partitions;
        self.publish_progress();
        Ok(())
    }

    fn publish_progress(&self) {
        let ctx = self.consumer.context();
        let assigned = ctx.state().assigned.clone();
        let partitions = assigned
            .into_iter()
            .map(|tp| {
                let progress = ctx.progress(&tp);
                let committed = progress.map(|p| p.committed_offset).filter(|o| *o >= 0);
                let committed = committed.or_else(|| self.offsets.stored(&tp)).unwrap_or(-1);
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
