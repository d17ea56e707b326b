//! The pipeline's consumer handle. Closing a librdkafka consumer blocks
//! until it has left its group, which can take forever when the group
//! coordinator is gone: the handle is never dropped on the runtime's
//! threads, and the orderly close has a deadline.

use std::sync::Arc;
use std::time::Duration;

use kt_proto::ids::TriggerId;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;

use super::context::IngestConsumer;

/// The pipeline's consumer. Closing a librdkafka consumer blocks until it
/// has left its group, which can take forever when the coordinator is gone;
/// a consumer dropped on any path other than the orderly [`close_consumer`]
/// (an early error, the task aborted by a runtime shutting down) is
/// therefore dropped on a thread of its own, never on the runtime's.
pub(super) struct DetachedConsumer(pub(super) Option<Arc<IngestConsumer>>);

impl DetachedConsumer {
    pub(super) fn take(mut self) -> Arc<IngestConsumer> {
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
pub(super) async fn close_consumer(consumer: Arc<IngestConsumer>, trigger_id: TriggerId, timeout: Duration) {
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
