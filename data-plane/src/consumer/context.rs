//! The librdkafka callbacks of a pipeline's consumer. They run inside the
//! pipeline's own `recv()` and never block: an assignment is only recorded
//! (the pipeline resolves start offsets and assigns outside the callback),
//! a revocation is applied at once and bumps the consumer's epoch so that
//! no offset of a batch read before it is ever stored after it
//! (`offsets.rs`).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use kt_proto::ids::TriggerId;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::statistics::Statistics;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::Notify;

use super::offsets::TopicPartition;

/// A pipeline's consumer.
pub type IngestConsumer = StreamConsumer<IngestContext>;

/// What the callbacks tell the pipeline loop.
#[derive(Debug, Default)]
pub struct RebalanceState {
    /// Increases on every assignment and revocation. A batch remembers the
    /// epoch its messages were read in; its offsets are stored only if the
    /// epoch is unchanged when it is acknowledged.
    pub epoch: u64,
    /// Partitions handed to us by the group, waiting for the pipeline to
    /// resolve their start offsets and assign them.
    pub pending_assignment: Option<Vec<TopicPartition>>,
    /// The partitions currently assigned (applied).
    pub assigned: Vec<TopicPartition>,
}

pub struct IngestContext {
    trigger_id: TriggerId,
    state: Mutex<RebalanceState>,
    /// Woken when an assignment is waiting.
    pub(crate) rebalanced: Notify,
    /// From librdkafka's periodic statistics: per partition, the offset
    /// last committed to the group and the broker's high watermark.
    progress: Mutex<HashMap<TopicPartition, PartitionProgress>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionProgress {
    /// -1 when unknown.
    pub committed_offset: i64,
    /// -1 when unknown.
    pub high_watermark: i64,
}

impl IngestContext {
    pub fn new(trigger_id: TriggerId) -> Self {
        Self {
            trigger_id,
            state: Mutex::new(RebalanceState::default()),
            rebalanced: Notify::new(),
            progress: Mutex::new(HashMap::new()),
        }
    }

    pub fn progress(&self, tp: &TopicPartition) -> Option<PartitionProgress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner()).get(tp).copied()
    }

    /// The shared state. Held only for short, non-async sections.
    pub fn state(&self) -> MutexGuard<'_, RebalanceState> {
        // A poisoned lock means a callback panicked; the state is still a
        // plain value and the pipeline decides what to do next.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.state().epoch
    }
}

impl ClientContext for IngestContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let trigger_id = self.trigger_id.to_string();
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", trigger_id = %trigger_id, facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", trigger_id = %trigger_id, facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", trigger_id = %trigger_id, facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", trigger_id = %trigger_id, facility = fac, "{log_message}")
            }
        }
    }

    fn stats(&self, statistics: Statistics) {
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        progress.clear();
        for (topic, t) in statistics.topics {
            // Partition -1 is librdkafka's internal "unassigned" partition.
            for (partition, p) in t.partitions.into_iter().filter(|(p, _)| *p >= 0) {
                progress.insert(
                    (topic.clone(), partition),
                    PartitionProgress { committed_offset: p.committed_offset, high_watermark: p.hi_offset },
                );
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Transport errors repeat while a broker is down; they are retried by
        // librdkafka and are not fatal.
        tracing::warn!(target: "librdkafka", trigger_id = %self.trigger_id, error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<TopicPartition> =
                    tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                tracing::info!(trigger_id = %self.trigger_id, partitions = ?partitions, "partitions assigned by the group");
                let mut state = self.state();
                state.epoch += 1;
                state.pending_assignment = Some(partitions);
                drop(state);
                // The assign call itself happens in the pipeline loop, once
                // start offsets are known (librdkafka waits for it).
                self.rebalanced.notify_one();
            }
            _ => {
                if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    let lost = consumer.assignment_lost();
                    tracing::info!(trigger_id = %self.trigger_id, lost, partitions = tpl.count(), "partitions revoked");
                } else {
                    tracing::warn!(trigger_id = %self.trigger_id, error = ?err, "rebalance error; dropping the assignment");
                }
                {
                    let mut state = self.state();
                    state.epoch += 1;
                    state.pending_assignment = None;
                    state.assigned.clear();
                }
                // Stored offsets (all of them durable in Postgres) are
                // committed by librdkafka as the partitions go; batches still
                // in flight will not store theirs (the epoch moved on)
                // and are redelivered to the next owner, then deduplicated.
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(trigger_id = %self.trigger_id, error = %e, "failed to unassign partitions");
                }
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::trace!(trigger_id = %self.trigger_id, partitions = offsets.count(), "offsets committed"),
            // Nothing to commit is reported as an error by librdkafka.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            // Part of every rebalance: the next owner rereads from the last
            // committed offset and dedup absorbs the repeat.
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId,
            )) => tracing::info!(trigger_id = %self.trigger_id, "offset commit refused during a rebalance"),
            Err(e) => tracing::warn!(trigger_id = %self.trigger_id, error = %e, "offset commit failed; will retry"),
        }
    }
}
