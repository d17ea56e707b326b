//! One trigger's ingest pipeline: a Kafka consumer in the trigger's group,
//! batching what it reads, persisting each batch in Postgres, and storing
//! (then committing) offsets only after the batch is durable, in order per
//! partition.
//!
//! Two tasks per pipeline: the consume loop (owns the consumer, serves its
//! callbacks, batches, pauses, stores offsets) and the persister (writes
//! batches, retrying until they are stored). They talk over bounded
//! channels; when the persister falls behind, the loop pauses the
//! partitions instead of buffering without bound.
//!
//! Files: `pipeline.rs` the consume loop, `persister.rs` the writer task,
//! `offsets.rs` what may be committed (the only offset store), `starts.rs`
//! where new partitions start, `context.rs` the librdkafka callbacks,
//! `config.rs` the client configuration, `handle.rs` closing the consumer,
//! `errors.rs` failures, `message.rs` / `filter.rs` / `rate.rs` per-message
//! conversion, filtering and rate limiting.

mod config;
mod context;
mod errors;
mod filter;
mod handle;
mod message;
pub mod offsets;
mod persister;
mod pipeline;
pub mod probe;
mod rate;
mod starts;

use std::time::Duration;

use kt_common::backoff::Backoff;

pub use config::{client_id, group_instance_id, scrub, KafkaConfig};
pub use errors::PipelineError;
pub use pipeline::{run_pipeline, PipelineEnv};
pub use rate::RateLimiter;

use crate::store::PersistSettings;

/// Batches handed to the persister and not yet acknowledged: one being
/// written (over its lanes) and one whose parts queue behind it, so a lane
/// that finishes early goes on at once while the next batch fills; more
/// would only add memory.
pub const MAX_BATCHES_IN_FLIGHT: usize = 2;

/// The default session timeout: a dead node's partitions move to the others
/// within about this long (plus a heartbeat and the rebalance itself).
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Tunables of every pipeline on a node (per-trigger ones are in the
/// trigger's spec). Durations are injected so tests can shrink them.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// A batch is written when it has this many messages...
    pub batch_max_messages: usize,
    /// ...or when its first message has waited this long.
    pub batch_linger: Duration,
    /// How long intake may be held back (persister saturated, rate limit)
    /// before the partitions are paused.
    pub pause_after: Duration,
    /// librdkafka's auto.commit.interval.ms: how often stored offsets are
    /// committed.
    pub commit_interval: Duration,
    /// librdkafka's session.timeout.ms: how long the group waits for a
    /// silent member (a node killed, or cut off) before it reassigns the
    /// member's partitions.
    pub session_timeout: Duration,
    /// librdkafka's heartbeat.interval.ms; at most a third of the session
    /// timeout is used, so a few lost heartbeats never cost the membership.
    pub heartbeat_interval: Duration,
    pub max_poll_interval: Duration,
    /// Static group membership (KIP-345): each consumer joins with a
    /// `group.instance.id` derived from the node id and the trigger, so a
    /// node restarted under the same id within the session timeout gets its
    /// partitions back without a rebalance; its consumers then do not leave
    /// the group when they close (their partitions move after the session
    /// timeout). Only worth it with a node id that survives restarts: off
    /// by default (dynamic membership: leave on close, a new member on every
    /// start); the binary turns it on for a fixed `--node-id`.
    pub static_membership: bool,
    /// Retries while the database cannot store a batch.
    pub persist: PersistSettings,
    /// Delay before a failed pipeline is started again.
    pub restart_backoff: Backoff,
    /// A pipeline that ran this long before failing restarts without delay
    /// escalation.
    pub healthy_after: Duration,
    /// Timeout of one committed-offsets or offsets-for-times request.
    pub offset_lookup_timeout: Duration,
    /// How long resolving start offsets may keep failing before the
    /// pipeline gives up (and restarts).
    pub offset_lookup_deadline: Duration,
    /// At shutdown, how long to wait for batches in flight to be stored.
    pub shutdown_grace: Duration,
    /// How often partition progress is published in the status.
    pub progress_interval: Duration,
    /// Extra librdkafka settings applied last (operations and tests).
    pub extra_kafka_config: Vec<(String, String)>,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            batch_max_messages: 2000,
            batch_linger: Duration::from_millis(5),
            pause_after: Duration::from_millis(500),
            commit_interval: Duration::from_secs(1),
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            heartbeat_interval: Duration::from_secs(1),
            max_poll_interval: Duration::from_secs(300),
            static_membership: false,
            persist: PersistSettings::default(),
            restart_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            healthy_after: Duration::from_secs(60),
            offset_lookup_timeout: Duration::from_secs(10),
            offset_lookup_deadline: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            progress_interval: Duration::from_secs(5),
            extra_kafka_config: Vec::new(),
        }
    }
}
