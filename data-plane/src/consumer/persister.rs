//! The persister task of a pipeline: writes batches (possibly several at once),
//! each until it is stored, and acknowledges them to the consume loop in
//! the order they were read; the loop then stores the batches' offsets.

use std::time::Instant;

use futures::stream::{FuturesOrdered, StreamExt};
use kt_proto::ids::TriggerId;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::status::PipelineStatus;
use crate::store::{persist_batch, BatchOutcome, IngestMessage, PersistError, PersistSettings};

/// The highest offset of one partition in a batch, and the assignment
/// generation it was read in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub topic: String,
    pub partition: i32,
    pub last_offset: i64,
    pub generation: u64,
}

#[derive(Debug, Default)]
pub struct Batch {
    pub messages: Vec<IngestMessage>,
    pub marks: Vec<Mark>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Adds a message read in assignment `generation`. A partition read
    /// again in a newer generation (revoked, then assigned back) restarts
    /// its mark: only offsets read in the current generation count.
    pub fn push(&mut self, message: IngestMessage, generation: u64) {
        match self.marks.iter_mut().find(|m| m.topic == message.topic && m.partition == message.partition) {
            Some(mark) if mark.generation == generation => mark.last_offset = mark.last_offset.max(message.offset),
            Some(mark) => {
                mark.generation = generation;
                mark.last_offset = message.offset;
            }
            None => self.marks.push(Mark {
                topic: message.topic.clone(),
                partition: message.partition,
                last_offset: message.offset,
                generation,
            }),
        }
        self.messages.push(message);
    }
}

/// A stored batch.
#[derive(Debug)]
pub struct Ack {
    pub marks: Vec<Mark>,
    pub outcome: BatchOutcome,
}

/// Batches of one pipeline written at the same time, in separate
/// transactions. They touch disjoint message rows; only the small checkpoint
/// upsert at the end of each can wait on the other. Acknowledgements still
/// go out strictly in the order the batches were read. One is as fast as two
/// on a 2-core host shared with Postgres (measured); more can pay off where
/// the database has cores to spare.
pub const PARALLEL_WRITES: usize = 1;

/// Stores batches until `batches` is closed (then drains it) or `abandon`
/// fires (a batch still being retried is then left unstored and, since its
/// offsets are never stored, redelivered later).
pub async fn run_persister(
    pool: PgPool,
    trigger_id: TriggerId,
    settings: PersistSettings,
    status: PipelineStatus,
    mut batches: mpsc::Receiver<Batch>,
    acks: mpsc::Sender<Ack>,
    abandon: CancellationToken,
) {
    let mut writing = FuturesOrdered::new();
    let mut closed = false;
    loop {
        tokio::select! {
            batch = batches.recv(), if !closed && writing.len() < PARALLEL_WRITES => match batch {
                Some(batch) => writing.push_back(write(pool.clone(), trigger_id, settings, status.clone(), batch, abandon.clone())),
                None => closed = true,
            },
            Some(written) = writing.next() => match written {
                Some(ack) => {
                    if acks.send(ack).await.is_err() {
                        // The consume loop is gone; nothing left to acknowledge to.
                        return;
                    }
                }
                // Abandoned at shutdown: later batches must not be
                // acknowledged past it.
                None => return,
            },
            else => return,
        }
    }
}

/// Writes one batch until it is stored (`Some`) or abandoned (`None`).
async fn write(
    pool: PgPool,
    trigger_id: TriggerId,
    settings: PersistSettings,
    status: PipelineStatus,
    batch: Batch,
    abandon: CancellationToken,
) -> Option<Ack> {
    let label = trigger_id.to_string();
    let started = Instant::now();
    let mut failing = false;
    let result = persist_batch(&pool, trigger_id.0, &batch.messages, &settings, &abandon, |err| {
        failing = true;
        metrics::counter!("kt_ingest_db_retries_total", "trigger_id" => label.clone()).increment(1);
        status.set_error(Some(err.to_string()));
    })
    .await;
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(PersistError::Cancelled { .. }) => {
            tracing::info!(%trigger_id, messages = batch.len(), "left a batch unstored at shutdown; it will be redelivered");
            return None;
        }
        Err(e) => {
            // persist_batch retries everything else itself.
            tracing::error!(%trigger_id, error = %e, "unexpected persist error");
            return None;
        }
    };
    if failing {
        status.set_error(None);
    }
    metrics::histogram!("kt_ingest_batch_seconds", "trigger_id" => label.clone())
        .record(started.elapsed().as_secs_f64());
    for (kind, n) in [("stored", outcome.stored), ("duplicate", outcome.duplicates), ("failed", outcome.failed)] {
        if n > 0 {
            metrics::counter!("kt_ingest_messages_total", "trigger_id" => label.clone(), "outcome" => kind)
                .increment(n);
        }
    }
    tracing::debug!(
        %trigger_id,
        stored = outcome.stored,
        duplicates = outcome.duplicates,
        failed = outcome.failed,
        "batch stored"
    );
    Some(Ack { marks: batch.marks, outcome })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(partition: i32, offset: i64) -> IngestMessage {
        IngestMessage {
            topic: "t".into(),
            partition,
            offset,
            key: None,
            value: None,
            headers: Some(vec![]),
            timestamp: None,
        }
    }

    #[test]
    fn test_batch_marks_track_the_highest_offset_of_the_current_generation() {
        let mut b = Batch::default();
        b.push(msg(0, 10), 1);
        b.push(msg(0, 11), 1);
        b.push(msg(1, 3), 1);
        assert_eq!(b.marks[0].last_offset, 11);
        // Revoked and assigned back: re-read from the committed offset.
        b.push(msg(0, 5), 3);
        assert_eq!((b.marks[0].last_offset, b.marks[0].generation), (5, 3));
        assert_eq!(b.len(), 4);
    }
}
