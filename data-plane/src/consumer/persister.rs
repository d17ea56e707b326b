//! The persister task of a pipeline: writes batches, each until it is
//! stored, split by partition over parallel write lanes, and acknowledges
//! them to the consume loop in the order they were read; the loop then
//! stores the batches' offsets.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use kt_proto::ids::TriggerId;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::filter::PipelineFilter;
use super::offsets::Marks;
use crate::status::PipelineStatus;
use crate::store::{persist_batch, BatchOutcome, IngestMessage, PersistError, PersistSettings};

#[derive(Debug, Default)]
pub struct Batch {
    pub messages: Vec<IngestMessage>,
    pub marks: Marks,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Adds a message read in the consumer's `epoch`.
    pub fn push(&mut self, message: IngestMessage, epoch: u64) {
        self.marks.record(&message.topic, message.partition, message.offset, epoch);
        self.messages.push(message);
    }
}

/// A stored batch.
#[derive(Debug)]
pub struct Ack {
    pub marks: Marks,
    pub outcome: BatchOutcome,
}

/// Write lanes of a pipeline: each batch is split by partition into this
/// many parts, written at the same time in separate transactions. A lane
/// writes its parts strictly one after the other, and a partition always
/// maps to the same lane, so the messages of a partition (and with them the
/// messages of a key, which Kafka keeps in one partition) become visible in
/// offset order: a worker never sees a later message of a key before an
/// earlier one. Lanes touch disjoint message, set and checkpoint rows, so
/// they do not wait on each other's locks. Two keep a second database core
/// busy on a 2-core host (measured: one lane leaves the database backend
/// the only busy core).
pub const WRITE_LANES: usize = 2;

/// The lane of a partition.
fn lane_of(partition: i32) -> usize {
    partition.rem_euclid(WRITE_LANES as i32) as usize
}

/// Writes one part of a batch until it is stored (`Some`) or abandoned
/// (`None`). The database in a pipeline; scripted in tests.
pub trait PartWriter: Send + Sync + 'static {
    fn write(&self, messages: Vec<IngestMessage>) -> BoxFuture<'static, Option<BatchOutcome>>;
}

/// Stores batches until `batches` is closed (then drains it) or a write is
/// abandoned (a batch still being retried at shutdown is left unstored and,
/// since its offsets are never stored, redelivered later). Acknowledgements
/// go out strictly in the order the batches were read.
pub async fn run_persister(writer: Arc<dyn PartWriter>, mut batches: mpsc::Receiver<Batch>, acks: mpsc::Sender<Ack>) {
    let mut writing = FuturesOrdered::new();
    // Per lane, completion of the last part handed to it: the next part of
    // the lane waits for it.
    let mut lane_tails: [Option<oneshot::Receiver<()>>; WRITE_LANES] = Default::default();
    let mut closed = false;
    loop {
        tokio::select! {
            batch = batches.recv(), if !closed => match batch {
                Some(batch) => {
                    let mut parts = Vec::new();
                    for (lane, messages) in split_by_lane(batch.messages).into_iter().enumerate() {
                        if messages.is_empty() {
                            continue;
                        }
                        let (done, tail) = oneshot::channel();
                        let after = lane_tails[lane].replace(tail);
                        parts.push(write_after(writer.clone(), after, messages, done));
                    }
                    let marks = batch.marks;
                    writing.push_back(async move {
                        let mut outcome = BatchOutcome::default();
                        for written in futures::future::join_all(parts).await {
                            outcome += written?;
                        }
                        Some(Ack { marks, outcome })
                    });
                }
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

/// The messages of a batch by lane, each in the order read.
fn split_by_lane(messages: Vec<IngestMessage>) -> [Vec<IngestMessage>; WRITE_LANES] {
    let mut lanes: [Vec<IngestMessage>; WRITE_LANES] = Default::default();
    for message in messages {
        lanes[lane_of(message.partition)].push(message);
    }
    lanes
}

/// Writes `messages` once the lane's previous part is written (`after`
/// fires), then signals `done`. The part is spawned at once, so the lanes
/// really write at the same time.
fn write_after(
    writer: Arc<dyn PartWriter>,
    after: Option<oneshot::Receiver<()>>,
    messages: Vec<IngestMessage>,
    done: oneshot::Sender<()>,
) -> impl Future<Output = Option<BatchOutcome>> {
    let task = tokio::spawn(async move {
        // The previous part of the lane was abandoned (or its task died):
        // writing this one would store later offsets of its partitions
        // without the earlier ones. It is left unstored too.
        if let Some(previous) = after {
            previous.await.ok()?;
        }
        let outcome = writer.write(messages).await;
        if outcome.is_some() {
            let _ = done.send(());
        }
        outcome
    });
    async move { task.await.ok().flatten() }
}

/// Writes parts into Postgres, retrying until they are stored or the
/// pipeline abandons them at shutdown.
#[derive(Clone)]
pub struct DbWriter {
    pub pool: PgPool,
    pub trigger_id: TriggerId,
    pub settings: PersistSettings,
    pub status: PipelineStatus,
    pub abandon: CancellationToken,
    /// The trigger's filter, if it has one.
    pub filter: Option<Arc<PipelineFilter>>,
}

impl PartWriter for DbWriter {
    fn write(&self, mut messages: Vec<IngestMessage>) -> BoxFuture<'static, Option<BatchOutcome>> {
        let writer = self.clone();
        Box::pin(async move {
            // Here rather than in the consume loop: the lanes evaluate in
            // parallel, and once per part however often the write is retried.
            if let Some(filter) = &writer.filter {
                filter.apply(&mut messages);
            }
            writer.write_part(&messages).await
        })
    }
}

impl DbWriter {
    /// Writes one part until it is stored (`Some`) or abandoned (`None`).
    async fn write_part(&self, messages: &[IngestMessage]) -> Option<BatchOutcome> {
        let trigger_id = self.trigger_id;
        let label = trigger_id.to_string();
        let started = Instant::now();
        let mut failing = false;
        let result = persist_batch(&self.pool, trigger_id.0, messages, &self.settings, &self.abandon, |err| {
            failing = true;
            metrics::counter!("kt_ingest_db_retries_total", "trigger_id" => label.clone()).increment(1);
            self.status.set_error(Some(err.to_string()));
        })
        .await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(PersistError::Cancelled { .. }) => {
                tracing::info!(%trigger_id, messages = messages.len(), "left a batch unstored at shutdown; it will be redelivered");
                return None;
            }
            Err(e) => {
                // persist_batch retries everything else itself.
                tracing::error!(%trigger_id, error = %e, "unexpected persist error");
                return None;
            }
        };
        if failing {
            self.status.set_error(None);
        }
        metrics::histogram!("kt_ingest_batch_seconds", "trigger_id" => label.clone())
            .record(started.elapsed().as_secs_f64());
        if outcome.filtered > 0 {
            metrics::counter!("kt_messages_filtered_total", "trigger_id" => label.clone()).increment(outcome.filtered);
        }
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
            filtered = outcome.filtered,
            "batch stored"
        );
        Some(outcome)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn msg(partition: i32, offset: i64) -> IngestMessage {
        IngestMessage {
            topic: "t".into(),
            partition,
            offset,
            key: None,
            value: None,
            headers: Some(vec![]),
            filtered: false,
            timestamp: None,
        }
    }

    #[test]
    fn test_a_partition_always_maps_to_the_same_lane_in_read_order() {
        let messages = vec![msg(0, 1), msg(1, 1), msg(2, 1), msg(0, 2), msg(3, 1), msg(2, 2)];
        let lanes = split_by_lane(messages);
        for (lane, part) in lanes.iter().enumerate() {
            assert!(part.iter().all(|m| lane_of(m.partition) == lane));
            for p in 0..4 {
                let offsets: Vec<i64> = part.iter().filter(|m| m.partition == p).map(|m| m.offset).collect();
                assert!(offsets.windows(2).all(|w| w[0] < w[1]), "partition {p} out of order: {offsets:?}");
            }
        }
        assert_eq!(lanes.iter().map(Vec::len).sum::<usize>(), 6);
        assert_ne!(lane_of(0), lane_of(1), "neighbouring partitions share the work");
        assert_eq!(lane_of(-1), lane_of(1), "never out of range");
    }

    /// Lets a held part finish: stored (`Some(())`) or abandoned (`None`).
    type Release = oneshot::Receiver<Option<()>>;

    /// A writer that logs the (partition, first offset) of each part it
    /// starts, and holds the parts listed in `held` until released
    /// (`Some(())`) or abandoned (`None`).
    #[derive(Default)]
    struct Scripted {
        started: std::sync::Mutex<Vec<(i32, i64)>>,
        held: std::sync::Mutex<HashMap<(i32, i64), Release>>,
    }

    impl Scripted {
        fn hold(&self, part: (i32, i64)) -> oneshot::Sender<Option<()>> {
            let (tx, rx) = oneshot::channel();
            self.held.lock().unwrap().insert(part, rx);
            tx
        }

        fn started(&self) -> Vec<(i32, i64)> {
            self.started.lock().unwrap().clone()
        }
    }

    impl PartWriter for Scripted {
        fn write(&self, messages: Vec<IngestMessage>) -> BoxFuture<'static, Option<BatchOutcome>> {
            let first = (messages[0].partition, messages[0].offset);
            self.started.lock().unwrap().push(first);
            let held = self.held.lock().unwrap().remove(&first);
            let stored = messages.len() as u64;
            Box::pin(async move {
                if let Some(release) = held {
                    release.await.ok()??;
                }
                Some(BatchOutcome { stored, ..Default::default() })
            })
        }
    }

    fn batch(partitions: &[i32], offsets: std::ops::Range<i64>) -> Batch {
        let mut b = Batch::default();
        for o in offsets {
            for p in partitions {
                b.push(msg(*p, o), 1);
            }
        }
        b
    }

    /// Lets every task that can run, run (single-threaded runtime).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn start(writer: &Arc<Scripted>) -> (mpsc::Sender<Batch>, mpsc::Receiver<Ack>, tokio::task::JoinHandle<()>) {
        let (batch_tx, batch_rx) = mpsc::channel(4);
        let (ack_tx, ack_rx) = mpsc::channel(4);
        let persister = tokio::spawn(run_persister(writer.clone(), batch_rx, ack_tx));
        (batch_tx, ack_rx, persister)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn test_lanes_write_at_once_but_a_partition_strictly_in_order() {
        let writer = Arc::new(Scripted::default());
        let release = writer.hold((0, 0));
        let (batches, mut acks, persister) = start(&writer);
        batches.send(batch(&[0, 1], 0..3)).await.unwrap();
        batches.send(batch(&[0, 1], 3..6)).await.unwrap();
        settle().await;
        // Partition 1's lane went on to the second batch; partition 0's
        // second part waits for its first, still being written.
        assert_eq!(writer.started(), [(0, 0), (1, 0), (1, 3)]);
        assert!(acks.try_recv().is_err(), "nothing acknowledged before the first batch is stored");

        release.send(Some(())).unwrap();
        let first = acks.recv().await.unwrap();
        let second = acks.recv().await.unwrap();
        assert_eq!(writer.started(), [(0, 0), (1, 0), (1, 3), (0, 3)]);
        // In read order, each with the outcome of all of its parts.
        assert_eq!(first.marks.iter().map(|m| (m.partition, m.last_offset)).collect::<Vec<_>>(), [(0, 2), (1, 2)]);
        assert_eq!(second.marks.iter().map(|m| (m.partition, m.last_offset)).collect::<Vec<_>>(), [(0, 5), (1, 5)]);
        assert_eq!((first.outcome.stored, second.outcome.stored), (6, 6));
        drop(batches);
        persister.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn test_an_abandoned_part_leaves_the_rest_of_its_lane_unwritten() {
        let writer = Arc::new(Scripted::default());
        let abandon = writer.hold((0, 0));
        let (batches, mut acks, persister) = start(&writer);
        batches.send(batch(&[0, 1], 0..3)).await.unwrap();
        batches.send(batch(&[0], 3..6)).await.unwrap();
        settle().await;
        abandon.send(None).unwrap();
        persister.await.unwrap();
        settle().await;
        // Storing 3..6 of partition 0 without 0..3 would let a worker act
        // on later messages of a key before earlier ones.
        assert!(!writer.started().contains(&(0, 3)), "started {:?}", writer.started());
        assert!(acks.recv().await.is_none(), "nothing acknowledged past an abandoned batch");
    }
}
