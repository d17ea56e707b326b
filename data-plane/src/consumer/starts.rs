//! Where newly assigned partitions start: the group's committed offset,
//! else the trigger's partition checkpoints (a group that lost its
//! offsets), else the trigger's initial policy; and the lookups that decide
//! it (committed offsets, checkpoints, offsets for times).

use std::collections::HashMap;
use std::time::Duration;

use kt_common::backoff::Backoff;
use kt_common::trigger::OffsetPolicy;
use kt_proto::ids::TriggerId;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::context::IngestConsumer;
use super::offsets::{next_offset, TopicPartition};
use crate::store::load_checkpoints;

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

/// What resolving start offsets needs from its pipeline.
pub(super) struct StartLookup<'a> {
    pub consumer: &'a std::sync::Arc<IngestConsumer>,
    pub pool: &'a PgPool,
    pub trigger_id: TriggerId,
    pub policy: OffsetPolicy,
    /// Of each librdkafka lookup.
    pub timeout: Duration,
}

/// [`resolve_starts`], tried again with `backoff` while it fails, for up to
/// `deadline` (then its last error); `None` when cancelled meanwhile.
pub(super) async fn resolve_starts_retrying(
    lookup: &StartLookup<'_>,
    partitions: &[TopicPartition],
    (deadline, backoff): (Duration, Backoff),
    cancel: &CancellationToken,
) -> Result<Option<Vec<(TopicPartition, StartPosition, Offset)>>, String> {
    let deadline = Instant::now() + deadline;
    let mut attempt = 0;
    loop {
        match resolve_starts(lookup, partitions).await {
            Ok(starts) => return Ok(Some(starts)),
            Err(message) if Instant::now() >= deadline => return Err(message),
            Err(message) => {
                let trigger_id = lookup.trigger_id;
                tracing::warn!(%trigger_id, error = %message, attempt, "cannot resolve start offsets; retrying");
                let delay = backoff.delay(attempt);
                attempt += 1;
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Committed offsets of `partitions`, and for those without one, where
/// the trigger's checkpoints or initial policy say to start: each
/// partition's start position and the librdkafka offset it resolves to.
async fn resolve_starts(
    lookup: &StartLookup<'_>,
    partitions: &[TopicPartition],
) -> Result<Vec<(TopicPartition, StartPosition, Offset)>, String> {
    let timeout = lookup.timeout;
    let mut query = TopicPartitionList::new();
    for (topic, partition) in partitions {
        query.add_partition(topic, *partition);
    }
    // Both lookups are blocking network calls of librdkafka.
    let consumer = lookup.consumer.clone();
    let committed_tpl = tokio::task::spawn_blocking(move || consumer.committed_offsets(query, timeout))
        .await
        .map_err(|e| format!("committed offsets lookup panicked: {e}"))?
        .map_err(|e| format!("cannot fetch committed offsets: {e}"))?;
    let mut committed = HashMap::new();
    for e in committed_tpl.elements() {
        e.error().map_err(|err| format!("cannot fetch committed offset of {}/{}: {err}", e.topic(), e.partition()))?;
        if let Offset::Offset(o) = e.offset() {
            committed.insert((e.topic().to_owned(), e.partition()), o);
        }
    }
    let checkpoints = if any_uncommitted(partitions, &committed) {
        let rows = load_checkpoints(lookup.pool, lookup.trigger_id.0)
            .await
            .map_err(|e| format!("cannot read partition checkpoints: {e}"))?;
        Checkpoints::new(
            rows.into_iter()
                .map(|c| ((c.topic, c.partition), c.last_offset, c.last_ts.map(|ts| ts.timestamp_millis()))),
        )
    } else {
        Checkpoints::default()
    };
    let plan = plan_starts(partitions, &committed, lookup.policy, &checkpoints);
    let mut by_time_query = TopicPartitionList::new();
    for ((topic, partition), pos) in &plan {
        if let StartPosition::AtTimestamp(ts) = pos {
            by_time_query.add_partition_offset(topic, *partition, Offset::Offset(*ts)).map_err(|e| e.to_string())?;
        }
    }
    let mut by_time = HashMap::new();
    if by_time_query.count() > 0 {
        let consumer = lookup.consumer.clone();
        let found = tokio::task::spawn_blocking(move || consumer.offsets_for_times(by_time_query, timeout))
            .await
            .map_err(|e| format!("offsets-for-times lookup panicked: {e}"))?
            .map_err(|e| format!("cannot look up offsets by timestamp: {e}"))?;
        for e in found.elements() {
            e.error()
                .map_err(|err| format!("cannot look up offset by time of {}/{}: {err}", e.topic(), e.partition()))?;
            by_time.insert((e.topic().to_owned(), e.partition()), e.offset());
        }
    }
    let from_checkpoints: Vec<&TopicPartition> =
        plan.iter().filter(|(_, pos)| matches!(pos, StartPosition::AfterCheckpoint(_))).map(|(tp, _)| tp).collect();
    if !from_checkpoints.is_empty() {
        tracing::info!(
            trigger_id = %lookup.trigger_id,
            partitions = ?from_checkpoints,
            "group has no committed offset; resuming from the partition checkpoints"
        );
    }
    Ok(plan
        .into_iter()
        .map(|(tp, pos)| {
            let offset = pos.to_offset(by_time.get(&tp).copied());
            (tp, pos, offset)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

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
