//! How a pipeline fails ([`PipelineError`], each followed by a restart with
//! backoff) and how it reports the Kafka errors it lives through
//! ([`KafkaErrors`]: logged and shown on the status, without flooding
//! either while an error persists).

use std::time::Duration;

use kt_proto::ids::TriggerId;
use tokio::time::Instant;

use crate::status::PipelineStatus;

/// How often the same Kafka error is logged again while it persists.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

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

/// The recent, non-fatal Kafka errors of a pipeline (librdkafka retries
/// them itself).
#[derive(Debug, Default)]
pub(super) struct KafkaErrors {
    /// The last error reported, and when.
    last: Option<(String, Instant)>,
    /// When the last error that was not a generic "brokers down"
    /// consequence was seen.
    last_cause: Option<Instant>,
}

impl KafkaErrors {
    /// Reports `text` (already free of secrets), unless it repeats the
    /// previous error within [`ERROR_LOG_INTERVAL`].
    pub fn report(&mut self, text: String, trigger_id: TriggerId, status: &PipelineStatus) {
        let repeated = self.last.as_ref().is_some_and(|(t, at)| *t == text && at.elapsed() < ERROR_LOG_INTERVAL);
        // "All brokers down" follows the real cause (an authentication
        // failure, a TLS error...) within milliseconds; the status keeps
        // showing the cause while it is recent.
        let generic = text.contains("AllBrokersDown") || text.contains("BrokerTransportFailure");
        let cause_is_recent = self.last_cause.is_some_and(|at| at.elapsed() < ERROR_LOG_INTERVAL);
        if !generic {
            self.last_cause = Some(Instant::now());
        }
        if !repeated {
            tracing::warn!(%trigger_id, error = %text, "kafka consumer error");
            if !(generic && cause_is_recent) {
                status.set_error(Some(text.clone()));
            }
            self.last = Some((text, Instant::now()));
        }
    }

    /// A message arrived: the error, if any, is over.
    pub fn clear(&mut self, status: &PipelineStatus) {
        if self.last.take().is_some() {
            status.set_error(None);
        }
    }
}
