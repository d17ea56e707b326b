//! The invariants every test checks after its fault: what was produced is
//! stored exactly once, nothing is committed before it is stored, and in the
//! end everything stored is committed. Plus the waits built on them.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kt_kafka_testing::produce::Produced;
use kt_tests::process::DataPlaneProcess;
use kt_tests::wait_for;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

/// (topic, partition)
pub type Tp = (String, i32);
/// (topic, partition, offset): what identifies a message for dedup.
pub type MessageId = (String, i32, i64);

pub fn ids(topic: &str, produced: &[Produced]) -> BTreeSet<MessageId> {
    produced.iter().map(|p| (topic.to_owned(), p.partition, p.offset)).collect()
}

/// Per partition, the offset after the last produced message.
pub fn end_offsets(produced: &BTreeSet<MessageId>) -> BTreeMap<Tp, i64> {
    let mut ends = BTreeMap::new();
    for (topic, partition, offset) in produced {
        let end = ends.entry((topic.clone(), *partition)).or_insert(0);
        *end = (*end).max(offset + 1);
    }
    ends
}

pub async fn stored_count(pool: &PgPool, trigger: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM messages WHERE trigger_id = $1")
        .bind(trigger)
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn ids_in(pool: &PgPool, table: &str, trigger: Uuid) -> Vec<MessageId> {
    sqlx::query_as(&format!("SELECT topic, partition, \"offset\" FROM {table} WHERE trigger_id = $1"))
        .bind(trigger)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Every produced message stored once, and nothing else: in `messages` and
/// in the dedup records, with no ingest failures.
pub async fn assert_stored_exactly_once(pool: &PgPool, trigger: Uuid, expected: &BTreeSet<MessageId>) {
    for table in ["messages", "message_records"] {
        let rows = ids_in(pool, table, trigger).await;
        let stored: BTreeSet<MessageId> = rows.iter().cloned().collect();
        assert_eq!(rows.len(), stored.len(), "{table}: some message is stored twice");
        let missing: Vec<_> = expected.difference(&stored).take(5).collect();
        let unexpected: Vec<_> = stored.difference(expected).take(5).collect();
        assert!(
            missing.is_empty() && unexpected.is_empty(),
            "{table}: {} rows for {} produced messages; missing e.g. {missing:?}; unexpected e.g. {unexpected:?}",
            stored.len(),
            expected.len()
        );
    }
    let failures: i64 = sqlx::query_scalar("SELECT count(*) FROM ingest_failures WHERE trigger_id = $1")
        .bind(trigger)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(failures, 0, "no message of these tests is unstorable");
}

/// The committed offsets of a trigger's consumer group, read the way an
/// operator would (OffsetFetch from a client of the same group that never
/// joins it).
pub struct CommittedOffsets {
    consumer: Arc<BaseConsumer>,
    partitions: Vec<Tp>,
}

impl CommittedOffsets {
    pub fn new(brokers: &str, group_id: &str, topics: &[(&str, i32)]) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .create()
            .expect("offsets reader");
        let partitions = topics.iter().flat_map(|(t, n)| (0..*n).map(|p| ((*t).to_owned(), p))).collect();
        Self { consumer: Arc::new(consumer), partitions }
    }

    /// Committed offset per partition; partitions without one are absent.
    pub async fn read(&self) -> anyhow::Result<BTreeMap<Tp, i64>> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in &self.partitions {
            tpl.add_partition(topic, *partition);
        }
        let consumer = self.consumer.clone();
        let tpl =
            tokio::task::spawn_blocking(move || consumer.committed_offsets(tpl, Duration::from_secs(5))).await??;
        let mut committed = BTreeMap::new();
        for e in tpl.elements() {
            e.error()?;
            if let Offset::Offset(o) = e.offset() {
                if o >= 0 {
                    committed.insert((e.topic().to_owned(), e.partition()), o);
                }
            }
        }
        Ok(committed)
    }

    /// Reads the committed offsets, then checks against `db` that every
    /// offset below each of them is stored (a dedup record exists). Reading
    /// Kafka first makes the check sound while ingest goes on: the stored
    /// set only grows.
    pub async fn assert_all_stored<'c>(&self, db: impl PgExecutor<'c>, trigger: Uuid) -> BTreeMap<Tp, i64> {
        let committed = self.read().await.expect("committed offsets");
        if committed.is_empty() {
            return committed;
        }
        let topics: Vec<&str> = committed.keys().map(|(t, _)| t.as_str()).collect();
        let partitions: Vec<i32> = committed.keys().map(|(_, p)| *p).collect();
        let offsets: Vec<i64> = committed.values().copied().collect();
        let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(
            "SELECT c.topic, c.partition, c.committed, \
                    (SELECT count(*) FROM message_records r \
                      WHERE r.trigger_id = $1 AND r.topic = c.topic AND r.partition = c.partition \
                        AND r.\"offset\" < c.committed) \
               FROM unnest($2::text[], $3::int[], $4::bigint[]) AS c(topic, partition, committed)",
        )
        .bind(trigger)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .fetch_all(db)
        .await
        .expect("stored offsets");
        for (topic, partition, committed, stored_below) in rows {
            assert_eq!(
                stored_below, committed,
                "{topic}/{partition}: offset {committed} is committed but only {stored_below} of the \
                 messages before it are stored (committed before stored)"
            );
        }
        committed
    }

    /// Waits until every partition's committed offset is `ends` (partitions
    /// absent from `ends` had no messages and must have nothing committed).
    pub async fn wait_committed(&self, ends: &BTreeMap<Tp, i64>, timeout: Duration) {
        let last = std::cell::RefCell::new(BTreeMap::new());
        let result = wait_for("every stored offset committed", timeout, || {
            let last = &last;
            async move {
                let committed = self.read().await.ok()?;
                let done =
                    self.partitions.iter().all(|tp| committed.get(tp).unwrap_or(&0) == ends.get(tp).unwrap_or(&0));
                *last.borrow_mut() = committed;
                done.then_some(())
            }
        })
        .await;
        if let Err(e) = result {
            panic!("{e}: committed {:?}, expected {ends:?}", last.borrow());
        }
    }
}

/// Polls `check` every `every` until it returns `Some` (or fails), failing
/// after `timeout`: for waits that must react quickly (e.g. to kill a node
/// in the middle of something) or give up early (a node process died).
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, every: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
    }
}

/// Waits until the trigger has `n` stored messages, checking at every look
/// that nothing was committed before it was stored and that `nodes` (child
/// processes) are still running.
pub async fn wait_stored(
    pool: &PgPool,
    trigger: Uuid,
    n: i64,
    offsets: &CommittedOffsets,
    nodes: &[&DataPlaneProcess],
    timeout: Duration,
) -> anyhow::Result<()> {
    let seen = std::cell::Cell::new(0);
    let result = poll_until("messages stored", timeout, Duration::from_millis(250), || {
        let seen = &seen;
        async move {
            for node in nodes {
                node.ensure_running()?;
            }
            offsets.assert_all_stored(pool, trigger).await;
            let count = stored_count(pool, trigger).await;
            seen.set(count);
            assert!(count <= n, "{count} messages stored, only {n} produced");
            Ok((count == n).then_some(()))
        }
    })
    .await;
    result.map_err(|e| e.context(format!("{} of {n} messages stored", seen.get())))
}

/// Checks that `check` holds at every look for `duration`: for "nothing
/// happens" claims, which no wait can prove, only bound.
pub async fn assert_stays<F, Fut>(what: &str, duration: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let end = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        if let Err(e) = check().await {
            panic!("{what}: {e:#}");
        }
    }
}
