//! The system under test, in process: a database of its own, a control
//! plane, one data-plane node; plus the SQL the scenarios use to build a
//! backlog exactly as ingest leaves it and to count progress.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kt_data_plane::consumer::IngestSettings;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::{CreateTriggerRequest, DeleteTriggerRequest, KafkaSource, Trigger, WebhookTarget};
use sqlx::PgPool;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::webhook::WebhookReceiver;

use super::copy::{self, Row, Table};
use super::Options;
use crate::{ControlPlaneOptions, TestControlPlane, TestDb, TestNode};

/// How often progress is polled.
pub const POLL: Duration = Duration::from_millis(100);

/// The ingest settings of the bench's node, also used by the bare-consumer
/// limit so both read Kafka with the same client settings. Group timings are
/// the sandbox's (a fresh group forms in ~3 s, the broker's initial
/// rebalance delay).
/// `extra` (`--kafka-config`) is applied last, as the node applies
/// `ingest.extra_kafka_config`.
pub fn ingest_settings(extra: &[(String, String)]) -> IngestSettings {
    IngestSettings {
        session_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(500),
        batch_linger: Duration::from_millis(5),
        commit_interval: Duration::from_millis(200),
        extra_kafka_config: extra.to_vec(),
        ..IngestSettings::default()
    }
}

pub struct Stack {
    pub pool: PgPool,
    pub triggers: TriggerServiceClient<Channel>,
    pub node: Option<TestNode>,
    /// The node's work-order capacity as configured.
    pub workers: usize,
    cp: Option<TestControlPlane>,
    // Dropped last: removes the database.
    db: TestDb,
}

impl Stack {
    /// A fresh database, a control plane and a node whose `workers` is
    /// `workers` (`None`: the node's default), connected.
    pub async fn start(opts: &Options, workers: Option<usize>) -> anyhow::Result<Self> {
        let db = TestDb::create_on(&opts.postgres.admin_url).await?;
        let cp = TestControlPlane::start(&db, ControlPlaneOptions::default())
            .await
            .context("failed to start the control plane")?;
        let pool = kt_common::db::connect(&db.url, 5).await?;
        super::server::record_settings(&pool).await?;
        let triggers = TriggerServiceClient::new(cp.channel().await?);
        let mut configured = 0;
        let node = TestNode::start(&db, &cp.url(), |c| {
            c.ingest = ingest_settings(&opts.kafka_config);
            if let Some(w) = workers {
                c.workers = w;
            }
            configured = c.workers;
        })
        .await;
        let node_id = node.node_id.clone();
        let stack = Self { pool, triggers, node: Some(node), workers: configured, cp: Some(cp), db };
        let pool = stack.pool.clone();
        poll("the node to join the control plane", Duration::from_secs(30), || {
            let (pool, node_id) = (pool.clone(), node_id.clone());
            async move {
                let joined: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM events WHERE kind = 'node_joined' AND node_id = $1)",
                )
                .bind(&node_id)
                .fetch_one(&pool)
                .await?;
                Ok(joined.then_some(()))
            }
        })
        .await?;
        Ok(stack)
    }

    pub fn database_name(&self) -> &str {
        &self.db.name
    }

    /// Creates a trigger through the public API: `topic` from the earliest
    /// offset, delivering to `webhook_url`. Returns its id and group.
    pub async fn create_trigger(
        &mut self,
        name: &str,
        hosts: Vec<String>,
        topic: &str,
        webhook_url: &str,
    ) -> anyhow::Result<(Uuid, String)> {
        let trigger = Trigger {
            name: name.into(),
            kafka: Some(KafkaSource {
                hosts,
                topics: vec![topic.into()],
                initial_offset_reset_policy: "earliest".into(),
                ..Default::default()
            }),
            webhook: Some(WebhookTarget { url: webhook_url.into(), ..Default::default() }),
            ..Default::default()
        };
        let created = self
            .triggers
            .create_trigger(CreateTriggerRequest { trigger: Some(trigger) })
            .await
            .context("CreateTrigger failed")?
            .into_inner();
        let id = Uuid::parse_str(&created.id)?;
        let group = created.kafka.map(|k| k.group_id).unwrap_or_default();
        Ok((id, group))
    }

    pub async fn delete_trigger(&mut self, id: Uuid) -> anyhow::Result<()> {
        self.triggers
            .delete_trigger(DeleteTriggerRequest { id: id.to_string() })
            .await
            .context("DeleteTrigger failed")?;
        Ok(())
    }

    /// Stops the node (gracefully, bounded) and the control plane, and
    /// removes the database.
    pub async fn stop(self) {
        drop(self.stop_keeping_database().await);
    }

    /// Stops like [`Stack::stop`] but hands the database back: once every
    /// connection of the stack is gone, the server's statistics of it are
    /// complete and can still be read. It is removed when dropped.
    pub async fn stop_keeping_database(mut self) -> TestDb {
        if let Some(node) = self.node.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), node.stop()).await;
        }
        if let Some(cp) = self.cp.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), cp.stop()).await;
        }
        self.pool.close().await;
        self.db
    }
}

/// Polls `check` every [`POLL`] until it yields a value; fails after
/// `timeout` naming `what`, or on the first error.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Work orders of `trigger` that succeeded.
pub async fn successes(pool: &PgPool, trigger: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM work_orders WHERE trigger_id = $1 AND state = 'success'")
        .bind(trigger)
        .fetch_one(pool)
        .await
}

/// When [`wait_successes`] saw its target, and how many polls it took:
/// each one statement and one transaction of the bench's own in the
/// database.
pub struct Waited {
    pub at: Instant,
    pub polls: i64,
}

/// Waits until `target` work orders of `trigger` succeeded, printing
/// progress; returns when (the poll that saw it). Progress is read from
/// `receiver` (its count of successful POSTs, free to read) every
/// `interval`; the database is counted only once that reached `target`, so
/// the wait adds no load to the path it measures until the very end.
pub async fn wait_successes(
    scenario: &str,
    pool: &PgPool,
    trigger: Uuid,
    target: i64,
    receiver: &WebhookReceiver,
    interval: Duration,
    timeout: Duration,
) -> anyhow::Result<Waited> {
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut polls = 0;
    loop {
        let posted = receiver.success_count() as i64;
        if posted >= target {
            polls += 1;
            if successes(pool, trigger).await? >= target {
                return Ok(Waited { at: Instant::now(), polls });
            }
        }
        if started.elapsed() >= timeout {
            let done = successes(pool, trigger).await?;
            anyhow::bail!(
                "timed out after {timeout:?}: {done} of {target} work orders succeeded, {posted} POSTs answered \
                 with success (are the node's workers running and is the scheduler granting sets?)"
            );
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            let rate = posted as f64 / started.elapsed().as_secs_f64();
            crate::progress!(scenario, "{posted}/{target} work orders delivered ({rate:.0}/s)");
        }
        tokio::time::sleep(interval).await;
    }
}

/// A backlog stored as ingest leaves it, ready to be announced.
pub struct Backlog {
    pub messages: usize,
    pub sets: usize,
    pub load_time: Duration,
}

/// Stores `n` messages over `keys` keys (0: keyless) of `trigger`/`topic`
/// with binary COPY (messages and their dedup records, one transaction),
/// then analyzes the tables (a long-running system has statistics; a freshly
/// loaded table has none). The sets are not written yet: see
/// [`announce_sets`].
pub async fn store_messages(
    pool: &PgPool,
    trigger: Uuid,
    topic: &str,
    n: usize,
    keys: usize,
    partitions: i32,
) -> anyhow::Result<Backlog> {
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    copy::copy_rows(&mut tx, Table::Messages, trigger, topic, copy::synthetic_rows(n, keys, partitions, 0))
        .await
        .context("COPY messages failed")?;
    copy::copy_rows(&mut tx, Table::MessageRecords, trigger, topic, copy::synthetic_rows(n, keys, partitions, 0))
        .await
        .context("COPY message_records failed")?;
    tx.commit().await?;
    sqlx::query("ANALYZE messages").execute(pool).await?;
    sqlx::query("ANALYZE message_records").execute(pool).await?;
    Ok(Backlog { messages: n, sets: if keys > 0 { keys.min(n) } else { n }, load_time: started.elapsed() })
}

/// Creates the candidate sets of the stored messages of `trigger` exactly
/// as ingest does (`kt_common::dispatch::announce`) and notifies the control
/// plane in the same transaction. Returns the instant just before the
/// commit: from then on the sets are visible and announced.
pub async fn announce_sets(pool: &PgPool, trigger: Uuid, topic: &str, keyed: bool) -> anyhow::Result<Instant> {
    let mut tx = pool.begin().await?;
    kt_common::dispatch::announce::announce_stored(&mut tx, trigger, topic, keyed)
        .await
        .context("writing the message sets failed")?;
    let at = Instant::now();
    tx.commit().await?;
    Ok(at)
}

/// Makes sure the node's workers are connected and know `trigger`: stores
/// one message of its own key, announces it and waits for its work order to
/// succeed. Its success counts in [`successes`] (callers add 1).
pub async fn warm_up(pool: &PgPool, trigger: Uuid, topic: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    let row = Row {
        partition: 0,
        offset: 1 << 40,
        key: Some(b"bench-warm-up".to_vec()),
        value: br#"{"warm_up":true}"#.to_vec(),
        ts: chrono::Utc::now(),
    };
    copy::copy_rows(&mut tx, Table::Messages, trigger, topic, [row]).await?;
    tx.commit().await?;
    announce_sets(pool, trigger, topic, true).await?;
    let pool = pool.clone();
    poll(
        "the warm-up work order to succeed (work orders are not being processed: are workers running in the node?)",
        timeout,
        || {
            let pool = pool.clone();
            async move { Ok((successes(&pool, trigger).await? >= 1).then_some(())) }
        },
    )
    .await?;
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use sqlx::postgres::PgListener;

    use super::*;

    async fn trigger_row(pool: &PgPool) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO triggers (id, name, enabled, generation, group_id, spec) VALUES ($1, $2, true, 1, $2, '{}')",
        )
        .bind(id)
        .bind(format!("t-{id}"))
        .execute(pool)
        .await
        .unwrap();
        id
    }

    async fn count(pool: &PgPool, sql: &str, trigger: Uuid) -> i64 {
        sqlx::query_scalar(sql).bind(trigger).fetch_one(pool).await.unwrap()
    }

    #[tokio::test]
    async fn test_backlog_is_stored_and_announced_as_ingest_leaves_it() {
        let db = TestDb::create().await.unwrap();
        let pool = db.pool().await.unwrap();
        kt_common::db::migrate(&pool).await.unwrap();
        let mut listener = PgListener::connect_with(&pool).await.unwrap();
        listener.listen(kt_control_plane::scheduler::NOTIFY_CHANNEL).await.unwrap();
        let mut notifications = listener.into_stream();

        let keyed = trigger_row(&pool).await;
        let backlog = store_messages(&pool, keyed, "t", 1_000, 10, 3).await.unwrap();
        assert_eq!((backlog.messages, backlog.sets), (1_000, 10));
        announce_sets(&pool, keyed, "t", true).await.unwrap();
        let n = notifications.next().await.unwrap().unwrap();
        assert_eq!(n.payload(), keyed.to_string());
        assert_eq!(count(&pool, "SELECT count(*) FROM messages WHERE trigger_id = $1", keyed).await, 1_000);
        assert_eq!(count(&pool, "SELECT count(*) FROM message_records WHERE trigger_id = $1", keyed).await, 1_000);
        let ready = "SELECT count(*) FROM message_sets WHERE trigger_id = $1 AND state = 'ready' AND lock_id IS NULL";
        assert_eq!(count(&pool, ready, keyed).await, 10);
        // A key lives in one partition with increasing offsets, as Kafka keeps it.
        let spread = "SELECT count(*) FROM (SELECT key FROM messages WHERE trigger_id = $1
                       GROUP BY key HAVING count(DISTINCT partition) > 1) k";
        assert_eq!(count(&pool, spread, keyed).await, 0);

        let keyless = trigger_row(&pool).await;
        store_messages(&pool, keyless, "t", 500, 0, 3).await.unwrap();
        announce_sets(&pool, keyless, "t", false).await.unwrap();
        assert_eq!(count(&pool, ready, keyless).await, 500);
        let one_each =
            "SELECT count(*) FROM message_sets s JOIN messages m USING (trigger_id, topic, partition, \"offset\")
                         WHERE s.trigger_id = $1 AND s.key IS NULL";
        assert_eq!(count(&pool, one_each, keyless).await, 500);
    }
}
