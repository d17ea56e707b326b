//! Offset arithmetic and start positions. Kafka commits the offset of the
//! *next* message to read, so the "+1" lives here, in one tested place; and
//! where a newly assigned partition starts is decided here: its committed
//! offset, else the trigger's partition checkpoints (a group that lost its
//! offsets), else the trigger's initial policy.

use std::collections::HashMap;

use kt_common::trigger::OffsetPolicy;
use rdkafka::Offset;

/// A (topic, partition) pair.
pub type TopicPartition = (String, i32);

/// The offset to store/commit once the message at `last_stored` (and every
/// message before it in the partition) is durable: the next one to read.
pub fn next_offset(last_stored: i64) -> i64 {
    last_stored + 1
}

/// The last message covered by a committed offset (the inverse of
/// [`next_offset`]); `None` when nothing was consumed yet.
pub fn last_consumed(committed: i64) -> Option<i64> {
    (committed > 0).then(|| committed - 1)
}

/// Where one partition starts consuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The group's committed offset (the next message to read).
    Committed(i64),
    /// One past the last message the trigger stored from the partition
    /// (its checkpoint), for a group that lost its committed offset.
    AfterCheckpoint(i64),
    Beginning,
    End,
    /// The first message at or after this unix-millisecond timestamp.
    AtTimestamp(i64),
}

impl StartPosition {
    /// The librdkafka offset to assign. `by_time` holds the result of the
    /// offsets-for-times lookup for [`StartPosition::AtTimestamp`]; a
    /// timestamp after the last message resolves to the end.
    pub fn to_offset(self, by_time: Option<Offset>) -> Offset {
        match self {
            StartPosition::Committed(o) | StartPosition::AfterCheckpoint(o) => Offset::Offset(o),
            StartPosition::Beginning => Offset::Beginning,
            StartPosition::End => Offset::End,
            StartPosition::AtTimestamp(_) => match by_time {
                Some(Offset::Offset(o)) if o >= 0 => Offset::Offset(o),
                _ => Offset::End,
            },
        }
    }
}

/// What the trigger's partition checkpoints say: the last offset it stored
/// of each partition, and per topic the earliest last-seen timestamp.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoints {
    last_offsets: HashMap<TopicPartition, i64>,
    earliest_ms: HashMap<String, i64>,
}

impl Checkpoints {
    /// From checkpoint rows: (topic, partition), last offset, last-seen
    /// timestamp.
    pub fn new(rows: impl IntoIterator<Item = (TopicPartition, i64, Option<i64>)>) -> Self {
        let mut c = Self::default();
        for (tp, last_offset, ts) in rows {
            if let Some(ts) = ts {
                let e = c.earliest_ms.entry(tp.0.clone()).or_insert(ts);
                *e = (*e).min(ts);
            }
            c.last_offsets.insert(tp, last_offset);
        }
        c
    }

    pub fn last_offset(&self, tp: &TopicPartition) -> Option<i64> {
        self.last_offsets.get(tp).copied()
    }

    pub fn earliest_ms(&self, topic: &str) -> Option<i64> {
        self.earliest_ms.get(topic).copied()
    }
}

/// The start of a partition: its committed offset, or where to start when
/// the group has none (`committed`: `None`).
///
/// A partition the trigger already stored messages of resumes right after
/// its checkpoint: the group lost its offsets (the trigger was disabled
/// longer than the broker's offset retention, or its first owner died before
/// committing), and applying the initial policy again would skip ("latest")
/// or replay ("earliest") the partition. Everything up to the checkpoint is
/// stored; if the log no longer reaches that offset (truncated, topic
/// recreated), librdkafka's reset to the earliest offset applies.
///
/// A partition the trigger never stored anything of follows the initial
/// policy, except "latest" when the trigger has already consumed the topic:
/// it starts at the topic's earliest last-seen timestamp, so what arrived
/// since the trigger was consuming the topic is not skipped.
pub fn start_position(
    committed: Option<i64>,
    policy: OffsetPolicy,
    checkpoint_last_offset: Option<i64>,
    topic_earliest_ms: Option<i64>,
) -> StartPosition {
    if let Some(offset) = committed.filter(|o| *o >= 0) {
        return StartPosition::Committed(offset);
    }
    if let Some(last) = checkpoint_last_offset {
        return StartPosition::AfterCheckpoint(next_offset(last));
    }
    match policy {
        OffsetPolicy::Earliest => StartPosition::Beginning,
        OffsetPolicy::Latest => topic_earliest_ms.map_or(StartPosition::End, StartPosition::AtTimestamp),
        OffsetPolicy::Timestamp(ms) => StartPosition::AtTimestamp(ms),
    }
}

/// Whether some of `partitions` has no committed offset, so the trigger's
/// checkpoints matter (they cost a query).
pub fn any_uncommitted(partitions: &[TopicPartition], committed: &HashMap<TopicPartition, i64>) -> bool {
    partitions.iter().any(|tp| !committed.contains_key(tp))
}

/// Start positions for `partitions`, given the committed offsets found for
/// them and the trigger's checkpoints.
pub fn plan_starts(
    partitions: &[TopicPartition],
    committed: &HashMap<TopicPartition, i64>,
    policy: OffsetPolicy,
    checkpoints: &Checkpoints,
) -> Vec<(TopicPartition, StartPosition)> {
    partitions
        .iter()
        .map(|tp| {
            let pos = start_position(
                committed.get(tp).copied(),
                policy,
                checkpoints.last_offset(tp),
                checkpoints.earliest_ms(&tp.0),
            );
            (tp.clone(), pos)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_next_offset_is_one_past_the_last_stored_message() {
        assert_eq!(next_offset(0), 1);
        assert_eq!(next_offset(41), 42);
        assert_eq!(last_consumed(next_offset(41)), Some(41));
        assert_eq!(last_consumed(0), None);
    }

    #[test]
    fn test_committed_offset_wins_over_everything() {
        for policy in [OffsetPolicy::Earliest, OffsetPolicy::Latest, OffsetPolicy::Timestamp(1_700_000_000_000)] {
            assert_eq!(start_position(Some(17), policy, Some(30), Some(5)), StartPosition::Committed(17));
        }
    }

    #[test]
    fn test_initial_policy_applies_to_a_new_group() {
        assert_eq!(start_position(None, OffsetPolicy::Earliest, None, None), StartPosition::Beginning);
        assert_eq!(start_position(None, OffsetPolicy::Latest, None, None), StartPosition::End);
        assert_eq!(
            start_position(None, OffsetPolicy::Timestamp(1_700_000_000_000), None, None),
            StartPosition::AtTimestamp(1_700_000_000_000)
        );
        // A negative (logical) committed offset means "none".
        assert_eq!(start_position(Some(-1001), OffsetPolicy::Latest, None, None), StartPosition::End);
    }

    #[test]
    fn test_timestamp_policy_resolves_through_offsets_for_times() {
        let pos = start_position(None, OffsetPolicy::Timestamp(1_700_000_000_000), None, None);
        assert_eq!(pos.to_offset(Some(Offset::Offset(120))), Offset::Offset(120));
        // No message at or after the timestamp: start at the end, like Kafka.
        assert_eq!(pos.to_offset(Some(Offset::End)), Offset::End);
        assert_eq!(pos.to_offset(None), Offset::End);
        assert_eq!(StartPosition::Committed(9).to_offset(None), Offset::Offset(9));
        assert_eq!(StartPosition::AfterCheckpoint(9).to_offset(None), Offset::Offset(9));
        assert_eq!(StartPosition::Beginning.to_offset(None), Offset::Beginning);
    }

    #[test]
    fn test_lost_group_offsets_resume_right_after_the_checkpoint() {
        for policy in [OffsetPolicy::Earliest, OffsetPolicy::Latest, OffsetPolicy::Timestamp(1)] {
            assert_eq!(start_position(None, policy, Some(41), Some(1_234)), StartPosition::AfterCheckpoint(42));
        }
    }

    #[test]
    fn test_partition_never_stored_keeps_the_policy_unless_latest() {
        // "earliest" must not skip what the trigger never read.
        assert_eq!(start_position(None, OffsetPolicy::Earliest, None, Some(1_234)), StartPosition::Beginning);
        // "latest" resumes where the trigger was already consuming the topic.
        assert_eq!(start_position(None, OffsetPolicy::Latest, None, Some(1_234)), StartPosition::AtTimestamp(1_234));
        assert_eq!(start_position(None, OffsetPolicy::Timestamp(7), None, Some(1_234)), StartPosition::AtTimestamp(7));
    }

    #[test]
    fn test_plan_uses_each_partitions_own_checkpoint() {
        let p = |t: &str, n: i32| (t.to_owned(), n);
        let checkpoints =
            Checkpoints::new([(p("t", 0), 99, Some(500)), (p("t", 1), 7, Some(300)), (p("u", 0), 3, None)]);
        assert_eq!(checkpoints.earliest_ms("t"), Some(300));
        assert_eq!(checkpoints.earliest_ms("u"), None);
        let parts = vec![p("t", 0), p("t", 1), p("t", 2), p("u", 1), p("new", 0)];
        let committed: HashMap<_, _> = [(p("t", 1), 42)].into();
        assert!(any_uncommitted(&parts, &committed));
        assert!(!any_uncommitted(&parts[1..2], &committed));
        let starts = |policy| -> Vec<StartPosition> {
            plan_starts(&parts, &committed, policy, &checkpoints).into_iter().map(|(_, s)| s).collect()
        };
        assert_eq!(
            starts(OffsetPolicy::Earliest),
            [
                StartPosition::AfterCheckpoint(100),
                StartPosition::Committed(42),
                StartPosition::Beginning,
                StartPosition::Beginning,
                StartPosition::Beginning,
            ]
        );
        assert_eq!(
            starts(OffsetPolicy::Latest),
            [
                StartPosition::AfterCheckpoint(100),
                StartPosition::Committed(42),
                StartPosition::AtTimestamp(300),
                // No timestamps to go by: the policy.
                StartPosition::End,
                StartPosition::End,
            ]
        );
    }
}
