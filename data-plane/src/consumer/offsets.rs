//! Offset bookkeeping of a pipeline: which offsets may be committed, and
//! the one place that stores them.
//!
//! Offsets are stored, never committed, here: the consumer runs with
//! `enable.auto.offset.store=false` and `enable.auto.commit=true`, so
//! librdkafka commits whatever was stored, every `commit_interval` and on a
//! revocation (see `config.rs`); at shutdown `handle.rs` commits the stored
//! offsets once more before closing. Storing is the promise; [`OffsetTracker`]
//! makes it only for messages durable in Postgres.
//!
//! Two rules make that promise safe:
//!
//! - Kafka commits the offset of the *next* message to read: the `+1` is
//!   [`next_offset`], used by every store.
//! - A batch read before a rebalance must not store its offsets after it:
//!   the partition may have moved to another node, which rereads it from
//!   the last commit. The rebalance callbacks (`context.rs`) count
//!   assignments and revocations as the consumer's **epoch**; each batch's
//!   [`Marks`] remember the epoch their messages were read in, and the
//!   tracker stores only marks of the current epoch, forgetting what it
//!   stored in earlier ones.

use std::collections::HashMap;

use kt_proto::ids::TriggerId;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use super::context::IngestConsumer;

/// A (topic, partition) pair.
pub type TopicPartition = (String, i32);

/// The offset to store/commit once the message at `last_stored` (and every
/// message before it in the partition) is durable: the next one to read.
pub fn next_offset(last_stored: i64) -> i64 {
    last_stored + 1
}

/// The highest offset of one partition in a batch, and the epoch it was
/// read in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub topic: String,
    pub partition: i32,
    pub last_offset: i64,
    pub epoch: u64,
}

/// The marks of one batch, one per partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks(Vec<Mark>);

impl Marks {
    /// Records a message read in `epoch`. A partition read again in a newer
    /// epoch (revoked, then assigned back) restarts its mark: only offsets
    /// read in the current epoch count.
    pub fn record(&mut self, topic: &str, partition: i32, offset: i64, epoch: u64) {
        match self.0.iter_mut().find(|m| m.topic == topic && m.partition == partition) {
            Some(mark) if mark.epoch == epoch => mark.last_offset = mark.last_offset.max(offset),
            Some(mark) => {
                mark.epoch = epoch;
                mark.last_offset = offset;
            }
            None => self.0.push(Mark { topic: topic.to_owned(), partition, last_offset: offset, epoch }),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Mark> {
        self.0.iter()
    }
}

/// Where offsets are stored: the pipeline's consumer, a recorder in tests.
pub trait OffsetStore {
    fn store_offsets(&self, offsets: &TopicPartitionList) -> KafkaResult<()>;
}

impl OffsetStore for IngestConsumer {
    fn store_offsets(&self, offsets: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::store_offsets(self, offsets)
    }
}

/// The offsets this pipeline stored in the current epoch, and the only
/// code that stores offsets.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    epoch: u64,
    /// Next offset to read, per partition.
    stored: HashMap<TopicPartition, i64>,
}

impl OffsetTracker {
    /// A batch is durable: stores the offsets after its marks of `epoch`
    /// (the consumer's current one). Marks of an earlier epoch are dropped:
    /// their partitions were revoked since, and the next owner rereads them.
    pub fn store_durable(&mut self, store: &impl OffsetStore, epoch: u64, marks: &Marks, trigger_id: TriggerId) {
        let offsets = marks
            .iter()
            .filter(|m| m.epoch == epoch)
            .map(|m| ((m.topic.clone(), m.partition), next_offset(m.last_offset)));
        self.store(store, epoch, offsets, trigger_id);
    }

    /// Partitions that resume from the trigger's checkpoints have no
    /// committed offset, but everything before their start is durable:
    /// stores each start (already the next offset to read) at once. Else a
    /// partition with nothing new to read would never be committed, and its
    /// group would report lag it does not have (and fall back to the
    /// checkpoints again on every hand-over).
    pub fn store_resumed(
        &mut self,
        store: &impl OffsetStore,
        epoch: u64,
        starts: impl IntoIterator<Item = (TopicPartition, i64)>,
        trigger_id: TriggerId,
    ) {
        self.store(store, epoch, starts, trigger_id);
    }

    /// The next offset to read stored for `tp` in the current epoch.
    pub fn stored(&self, tp: &TopicPartition) -> Option<i64> {
        self.stored.get(tp).copied()
    }

    fn store(
        &mut self,
        store: &impl OffsetStore,
        epoch: u64,
        offsets: impl IntoIterator<Item = (TopicPartition, i64)>,
        trigger_id: TriggerId,
    ) {
        if epoch != self.epoch {
            self.stored.clear();
            self.epoch = epoch;
        }
        let mut tpl = TopicPartitionList::new();
        let mut advanced = Vec::new();
        for (tp, next) in offsets {
            if self.stored(&tp).is_some_and(|s| s >= next) {
                continue;
            }
            if let Err(e) = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(next)) {
                tracing::warn!(%trigger_id, error = %e, "cannot build offset list");
                continue;
            }
            advanced.push((tp, next));
        }
        if advanced.is_empty() {
            return;
        }
        match store.store_offsets(&tpl) {
            Ok(()) => self.stored.extend(advanced),
            // E.g. the partition was just lost: its next owner rereads from
            // the last committed offset, and dedup absorbs the repeat.
            Err(e) => tracing::warn!(%trigger_id, error = %e, "failed to store offsets"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    use super::*;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<Vec<(String, i32, i64)>>>,
        fail: bool,
    }

    impl OffsetStore for Recorder {
        fn store_offsets(&self, offsets: &TopicPartitionList) -> KafkaResult<()> {
            if self.fail {
                return Err(KafkaError::StoreOffset(RDKafkaErrorCode::UnknownPartition));
            }
            let call = offsets
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => (e.topic().to_owned(), e.partition(), o),
                    other => panic!("stored {other:?}"),
                })
                .collect();
            self.calls.lock().unwrap().push(call);
            Ok(())
        }
    }

    fn marks(list: &[(i32, i64, u64)]) -> Marks {
        let mut m = Marks::default();
        for (partition, offset, epoch) in list {
            m.record("t", *partition, *offset, *epoch);
        }
        m
    }

    fn calls(r: &Recorder) -> Vec<Vec<(String, i32, i64)>> {
        r.calls.lock().unwrap().clone()
    }

    #[test]
    fn test_next_offset_is_one_past_the_last_stored_message() {
        assert_eq!(next_offset(0), 1);
        assert_eq!(next_offset(41), 42);
    }

    #[test]
    fn test_marks_track_the_highest_offset_of_the_current_epoch() {
        let m = marks(&[(0, 10, 1), (0, 11, 1), (1, 3, 1)]);
        let last: Vec<(i32, i64)> = m.iter().map(|m| (m.partition, m.last_offset)).collect();
        assert_eq!(last, [(0, 11), (1, 3)]);
        // Revoked and assigned back: re-read from the committed offset.
        let m = marks(&[(0, 10, 1), (0, 5, 3)]);
        assert_eq!(m.iter().map(|m| (m.last_offset, m.epoch)).collect::<Vec<_>>(), [(5, 3)]);
    }

    #[test]
    fn test_durable_batches_store_the_next_offset_once_and_only_forward() {
        let (r, mut t, id) = (Recorder::default(), OffsetTracker::default(), TriggerId::new());
        t.store_durable(&r, 1, &marks(&[(0, 9, 1), (1, 4, 1)]), id);
        t.store_durable(&r, 1, &marks(&[(0, 7, 1)]), id);
        t.store_durable(&r, 1, &marks(&[(0, 12, 1), (1, 4, 1)]), id);
        assert_eq!(calls(&r), [vec![("t".into(), 0, 10), ("t".into(), 1, 5)], vec![("t".into(), 0, 13)]]);
        assert_eq!((t.stored(&("t".into(), 0)), t.stored(&("t".into(), 1))), (Some(13), Some(5)));
    }

    #[test]
    fn test_marks_of_an_earlier_epoch_are_never_stored() {
        let (r, mut t, id) = (Recorder::default(), OffsetTracker::default(), TriggerId::new());
        t.store_durable(&r, 1, &marks(&[(0, 9, 1)]), id);
        // A rebalance since: the batch read in epoch 1 stores nothing, and
        // the new epoch starts from nothing stored.
        t.store_durable(&r, 2, &marks(&[(0, 20, 1)]), id);
        assert_eq!(t.stored(&("t".into(), 0)), None);
        t.store_durable(&r, 2, &marks(&[(0, 3, 2)]), id);
        assert_eq!(calls(&r), [vec![("t".into(), 0, 10)], vec![("t".into(), 0, 4)]]);
    }

    #[test]
    fn test_resumed_partitions_store_their_start_and_a_failed_store_is_not_remembered() {
        let (r, mut t, id) = (Recorder::default(), OffsetTracker::default(), TriggerId::new());
        t.store_resumed(&r, 4, [(("t".into(), 2), 42)], id);
        assert_eq!(calls(&r), [vec![("t".into(), 2, 42)]]);
        let failing = Recorder { fail: true, ..Default::default() };
        t.store_durable(&failing, 4, &marks(&[(2, 50, 4)]), id);
        assert_eq!(t.stored(&("t".into(), 2)), Some(42));
    }
}
