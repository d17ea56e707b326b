//! Test helpers: a fresh database per test, an in-process Kafka
//! (librdkafka's mock cluster), producers and offset probes, fast pipeline
//! settings, and waiting on conditions with timeouts.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kt_common::backoff::Backoff;
use kt_data_plane::assignment::AssignedTrigger;
use kt_data_plane::consumer::IngestSettings;
use kt_data_plane::store::PersistSettings;
use kt_proto::v1;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use uuid::Uuid;

pub type Cluster = MockCluster<'static, DefaultProducerContext>;

/// Logs of the code under test, shown for failing tests; filter with
/// RUST_LOG (default: warnings).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own, migrated, dropped by [`TestDb::drop`].
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    options: PgConnectOptions,
}

impl TestDb {
    pub async fn new() -> Self {
        init_logs();
        let db = Self::empty().await;
        kt_common::db::migrate(&db.pool).await.expect("migrate test database");
        db
    }

    /// A database without any migration applied.
    pub async fn empty() -> Self {
        let admin: PgConnectOptions = admin_url().parse().expect("DATABASE_URL");
        let name = format!("kt_test_dp_{}", Uuid::new_v4().simple());
        let mut conn = admin.connect().await.expect("connect to the admin database");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create database");
        conn.close().await.ok();
        let options = admin.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .expect("connect to the test database");
        Self { pool, name, options }
    }

    /// A URL of this database, for a node's `Config`.
    pub fn url(&self) -> String {
        let admin = admin_url();
        let base = admin.split('?').next().unwrap_or(&admin);
        let cut = base.rfind('/').expect("database URL has a path");
        format!("{}/{}", &base[..cut], self.name)
    }

    async fn admin(&self) -> PgConnection {
        let admin: PgConnectOptions = admin_url().parse().expect("DATABASE_URL");
        admin.connect().await.expect("connect to the admin database")
    }

    /// A real outage for everyone using this database: new connections are
    /// refused and existing ones are terminated.
    pub async fn cut(&self) {
        let mut admin = self.admin().await;
        sqlx::query(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", self.name))
            .execute(&mut admin)
            .await
            .unwrap();
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .execute(&mut admin)
        .await
        .unwrap();
    }

    pub async fn restore(&self) {
        let mut admin = self.admin().await;
        sqlx::query(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.name)).execute(&mut admin).await.unwrap();
    }

    pub async fn drop(self) {
        self.pool.close().await;
        let mut admin = self.admin().await;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut admin).await.ok();
        let _ = self.options;
    }
}

/// Inserts the `triggers` row the ingest tables reference.
pub async fn insert_trigger(pool: &PgPool, id: Uuid, group_id: &str) {
    sqlx::query(
        "INSERT INTO triggers (id, name, enabled, generation, group_id, spec) VALUES ($1, $2, true, 1, $3, '{}')",
    )
    .bind(id)
    .bind(format!("trigger-{id}"))
    .bind(group_id)
    .execute(pool)
    .await
    .expect("insert trigger");
}

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn cluster(brokers: i32) -> Cluster {
    MockCluster::new(brokers).expect("mock cluster")
}

pub fn create_topic(cluster: &Cluster, topic: &str, partitions: i32) {
    cluster.create_topic(topic, partitions, 1).expect("create topic");
}

/// A message to produce.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    pub fn keyed(partition: i32, key: &str, value: &str) -> Self {
        Self { partition, key: Some(key.into()), value: Some(value.into()), headers: vec![] }
    }
}

pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

/// Produces `records` in order and waits until each is acknowledged.
pub async fn produce(bootstrap: &str, topic: &str, records: &[Record]) {
    let producer = producer(bootstrap);
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (name, value) in &r.headers {
            headers = headers.insert(KafkaHeader { key: name, value: value.as_deref() });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).partition(r.partition).headers(headers);
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            record = record.payload(v.as_slice());
        }
        producer.send(record, Duration::from_secs(30)).await.expect("produce");
    }
}

/// `n` keyed messages spread round-robin over `partitions`.
pub fn keyed_records(n: usize, partitions: i32, prefix: &str) -> Vec<Record> {
    (0..n).map(|i| Record::keyed(i as i32 % partitions, &format!("key-{}", i % 7), &format!("{prefix}-{i}"))).collect()
}

/// The group's committed offsets of `topic` (partition → next offset;
/// absent: none committed).
pub async fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let (bootstrap, group, topic) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &bootstrap).set("group.id", &group).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let Ok(found) = consumer.committed_offsets(tpl, Duration::from_secs(5)) else {
            return BTreeMap::new();
        };
        found
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    })
    .await
    .unwrap()
}

/// High watermarks of `topic` (partition → next offset to be written).
pub async fn high_watermarks(bootstrap: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
        (0..partitions)
            .map(|p| (p, consumer.fetch_watermarks(&topic, p, Duration::from_secs(5)).expect("watermarks").1))
            .collect()
    })
    .await
    .unwrap()
}

/// Settings for fast tests: short group timeouts, frequent commits.
pub fn fast_settings() -> IngestSettings {
    IngestSettings {
        batch_max_messages: 100,
        batch_linger: Duration::from_millis(5),
        pause_after: Duration::from_millis(300),
        commit_interval: Duration::from_millis(100),
        session_timeout: Duration::from_secs(6),
        heartbeat_interval: Duration::from_millis(500),
        max_poll_interval: Duration::from_secs(30),
        // The mock cluster takes group.instance.id but does not implement
        // static membership: a restarted consumer would join as a new member
        // while its closed predecessor stays until the session timeout.
        static_membership: false,
        persist: PersistSettings { retry_backoff: Backoff::new(Duration::from_millis(50), Duration::from_millis(500)) },
        restart_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        healthy_after: Duration::from_secs(10),
        offset_lookup_timeout: Duration::from_secs(5),
        offset_lookup_deadline: Duration::from_secs(20),
        shutdown_grace: Duration::from_secs(5),
        progress_interval: Duration::from_millis(500),
        extra_kafka_config: vec![
            ("topic.metadata.refresh.interval.ms".into(), "1000".into()),
            ("reconnect.backoff.max.ms".into(), "500".into()),
        ],
    }
}

pub fn fast_settings_arc() -> Arc<IngestSettings> {
    Arc::new(fast_settings())
}

/// A trigger (as the control plane sends it) consuming `topics` on
/// `bootstrap` in `group_id`.
pub fn trigger_proto(id: Uuid, generation: i64, bootstrap: &str, topics: &[&str], group_id: &str) -> v1::Trigger {
    v1::Trigger {
        id: id.to_string(),
        name: format!("trigger-{id}"),
        enabled: Some(true),
        kafka: Some(v1::KafkaSource {
            hosts: bootstrap.split(',').map(str::to_owned).collect(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            group_id: group_id.to_owned(),
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(v1::WebhookTarget { url: "http://127.0.0.1:9/hook".into(), ..Default::default() }),
        generation,
        ..Default::default()
    }
}

pub fn pipeline_def(trigger: &v1::Trigger) -> Arc<AssignedTrigger> {
    Arc::new(AssignedTrigger::from_proto(trigger).expect("valid trigger"))
}

/// Stored messages of a trigger: (topic, partition, offset) in order.
pub async fn stored_offsets(pool: &PgPool, trigger_id: Uuid) -> Vec<(String, i32, i64)> {
    sqlx::query_as(r#"SELECT topic, partition, "offset" FROM messages WHERE trigger_id = $1 ORDER BY 1, 2, 3"#)
        .bind(trigger_id)
        .fetch_all(pool)
        .await
        .unwrap()
}

pub async fn count(pool: &PgPool, sql: &str, trigger_id: Uuid) -> i64 {
    sqlx::query_scalar(sql).bind(trigger_id).fetch_one(pool).await.unwrap()
}

/// Asserts that partition `p` holds exactly offsets `0..n` of `topic` for
/// every (p, n) in `expected`.
pub fn assert_contiguous(stored: &[(String, i32, i64)], topic: &str, expected: &BTreeMap<i32, i64>) {
    for (p, n) in expected {
        let offsets: Vec<i64> = stored.iter().filter(|(t, sp, _)| t == topic && sp == p).map(|(_, _, o)| *o).collect();
        assert_eq!(offsets, (0..*n).collect::<Vec<_>>(), "partition {p} of {topic}");
    }
}

/// A pipeline running in the test, with its own status board.
pub struct RunningPipeline {
    pub board: kt_data_plane::status::StatusBoard,
    pub trigger_id: Uuid,
    cancel: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), kt_data_plane::consumer::PipelineError>>,
}

impl RunningPipeline {
    pub fn start(pool: &PgPool, def: Arc<AssignedTrigger>, settings: Arc<IngestSettings>) -> Self {
        let board = kt_data_plane::status::StatusBoard::new();
        let trigger_id = def.id.0;
        let env = kt_data_plane::consumer::PipelineEnv {
            pool: pool.clone(),
            settings,
            client_id: "kt-test".into(),
            node_id: "kt-test".into(),
            status: board.pipeline(def.id.to_string(), def.generation),
        };
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(kt_data_plane::consumer::run_pipeline(def, env, cancel.clone()));
        Self { board, trigger_id, cancel, task }
    }

    pub fn report(&self) -> Option<kt_proto::internal::PipelineReport> {
        self.board.get(&self.trigger_id.to_string())
    }

    /// Waits until the group assigned this pipeline some partitions.
    pub async fn wait_assigned(&self, timeout: Duration) {
        wait_for("partitions assigned", timeout, || async {
            self.report().filter(|r| !r.partitions.is_empty()).map(|_| ())
        })
        .await
    }

    /// Ends it abruptly, like a killed process: no grace, no final commit
    /// of its own (librdkafka still closes the consumer).
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Stops it gracefully and returns how it ended.
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("pipeline stops within 30s")
            .expect("pipeline task")
            .expect("pipeline ends without error");
    }
}

/// Waits until every message up to the high watermark is committed.
pub async fn wait_committed(bootstrap: &str, group: &str, topic: &str, partitions: i32, timeout: Duration) {
    let hwm = high_watermarks(bootstrap, topic, partitions).await;
    // A partition never written to has nothing to commit.
    let expected: BTreeMap<i32, i64> = hwm.into_iter().filter(|(_, h)| *h > 0).collect();
    wait_for("offsets committed up to the high watermarks", timeout, || async {
        let c = committed(bootstrap, group, topic, partitions).await;
        expected.iter().all(|(p, h)| c.get(p) == Some(h)).then_some(())
    })
    .await
}

pub async fn wait_count(pool: &PgPool, sql: &str, trigger_id: Uuid, n: i64, timeout: Duration) {
    wait_for(&format!("{n} rows of `{sql}`"), timeout, || async {
        let c = count(pool, sql, trigger_id).await;
        assert!(c <= n, "more rows than expected ({c} > {n}) for `{sql}`");
        (c == n).then_some(())
    })
    .await
}

pub const MESSAGES: &str = "SELECT count(*) FROM messages WHERE trigger_id = $1";
pub const FAILURES: &str = "SELECT count(*) FROM ingest_failures WHERE trigger_id = $1";
