//! Offset arithmetic and start positions. Kafka commits the offset of the
//! *next* message to read, so the "+1" lives here, in one tested place; and
//! where a newly assigned partition starts is decided here: its committed
//! offset, else the trigger's partition checkpoints of that topic (a group
//! that lost its offsets), else the trigger's initial policy.

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
            StartPosition::Committed(o) => Offset::Offset(o),
            StartPosition::Beginning => Offset::Beginning,
            StartPosition::End => Offset::End,
            StartPosition::AtTimestamp(_) => match by_time {
                Some(Offset::Offset(o)) if o >= 0 => Offset::Offset(o),
                _ => Offset::End,
            },
        }
    }
}

/// The start of a partition. `committed` is the group's committed offset
/// (`None`: the group never committed one, or it expired);
/// `earliest_checkpoint_ms` the earliest last-seen timestamp among the
/// trigger's partition checkpoints, if it has any.
///
/// A group without a committed offset whose trigger has checkpoints has been
/// consuming before and lost its offsets (e.g. disabled for longer than the
/// broker's offset retention): it resumes from the checkpoints rather than
/// applying the initial policy again, which could skip ("latest") or replay
/// ("earliest") a whole topic. Re-reading from the earliest checkpoint may
/// redeliver messages; dedup records absorb them.
pub fn start_position(
    committed: Option<i64>,
    policy: OffsetPolicy,
    earliest_checkpoint_ms: Option<i64>,
) -> StartPosition {
    if let Some(offset) = committed.filter(|o| *o >= 0) {
        return StartPosition::Committed(offset);
    }
    if let Some(ts) = earliest_checkpoint_ms {
        return StartPosition::AtTimestamp(ts);
    }
    match policy {
        OffsetPolicy::Earliest => StartPosition::Beginning,
        OffsetPolicy::Latest => StartPosition::End,
        OffsetPolicy::Timestamp(ms) => StartPosition::AtTimestamp(ms),
    }
}

/// Whether some of `partitions` has no committed offset, so the trigger's
/// checkpoints matter (they cost a query).
pub fn any_uncommitted(partitions: &[TopicPartition], committed: &HashMap<TopicPartition, i64>) -> bool {
    partitions.iter().any(|tp| !committed.contains_key(tp))
}

/// Start positions for `partitions`, given the committed offsets found for
/// them and, per topic, the earliest checkpoint timestamp of the trigger.
/// A topic without checkpoints was never consumed by the trigger (e.g. just
/// added to it): its partitions follow the initial policy.
pub fn plan_starts(
    partitions: &[TopicPartition],
    committed: &HashMap<TopicPartition, i64>,
    policy: OffsetPolicy,
    earliest_checkpoint_ms: &HashMap<String, i64>,
) -> Vec<(TopicPartition, StartPosition)> {
    partitions
        .iter()
        .map(|tp| {
            let checkpoint = earliest_checkpoint_ms.get(&tp.0).copied();
            (tp.clone(), start_position(committed.get(tp).copied(), policy, checkpoint))
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
            assert_eq!(start_position(Some(17), policy, Some(5)), StartPosition::Committed(17));
        }
    }

    #[test]
    fn test_initial_policy_applies_to_a_new_group() {
        assert_eq!(start_position(None, OffsetPolicy::Earliest, None), StartPosition::Beginning);
        assert_eq!(start_position(None, OffsetPolicy::Latest, None), StartPosition::End);
        assert_eq!(
            start_position(None, OffsetPolicy::Timestamp(1_700_000_000_000), None),
            StartPosition::AtTimestamp(1_700_000_000_000)
        );
        // A negative (logical) committed offset means "none".
        assert_eq!(start_position(Some(-1001), OffsetPolicy::Latest, None), StartPosition::End);
    }

    #[test]
    fn test_timestamp_policy_resolves_through_offsets_for_times() {
        let pos = start_position(None, OffsetPolicy::Timestamp(1_700_000_000_000), None);
        assert_eq!(pos.to_offset(Some(Offset::Offset(120))), Offset::Offset(120));
        // No message at or after the timestamp: start at the end, like Kafka.
        assert_eq!(pos.to_offset(Some(Offset::End)), Offset::End);
        assert_eq!(pos.to_offset(None), Offset::End);
        assert_eq!(StartPosition::Committed(9).to_offset(None), Offset::Offset(9));
        assert_eq!(StartPosition::Beginning.to_offset(None), Offset::Beginning);
    }

    #[test]
    fn test_lost_group_offsets_resume_from_the_earliest_checkpoint() {
        for policy in [OffsetPolicy::Earliest, OffsetPolicy::Latest, OffsetPolicy::Timestamp(1)] {
            assert_eq!(start_position(None, policy, Some(1_234)), StartPosition::AtTimestamp(1_234));
        }
    }

    #[test]
    fn test_checkpoints_matter_only_when_an_offset_is_missing() {
        let parts: Vec<TopicPartition> = vec![("t".into(), 0), ("t".into(), 1), ("new".into(), 0)];
        let checkpoints: HashMap<String, i64> = [("t".to_owned(), 77)].into();
        let all: HashMap<_, _> = parts.iter().map(|tp| (tp.clone(), 5)).collect();
        assert!(!any_uncommitted(&parts, &all));
        let plan = plan_starts(&parts, &all, OffsetPolicy::Latest, &checkpoints);
        assert!(plan.iter().all(|(_, pos)| *pos == StartPosition::Committed(5)));

        let some: HashMap<_, _> = [(parts[0].clone(), 5)].into();
        assert!(any_uncommitted(&parts, &some));
        let plan = plan_starts(&parts, &some, OffsetPolicy::Latest, &checkpoints);
        assert_eq!(
            plan,
            vec![
                (parts[0].clone(), StartPosition::Committed(5)),
                (parts[1].clone(), StartPosition::AtTimestamp(77)),
                // A topic the trigger never consumed follows the policy.
                (parts[2].clone(), StartPosition::End),
            ]
        );
        let plan = plan_starts(&parts, &some, OffsetPolicy::Earliest, &HashMap::new());
        assert_eq!(plan[1].1, StartPosition::Beginning);
    }
}
