//! `ingest`: N messages already in the broker → all durable in Postgres with
//! their offsets committed, one node, no work-order processing competing.
//! Limits measured in the same run: a bare consumer reading the same topic
//! with the same client settings (no database), and a binary COPY of the
//! same rows into the same schema.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use kt_data_plane::consumer::KafkaConfig;
use kt_kafka_testing::{Produced, TestMessage};
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::Producer as _;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::broker::{self, Broker};
use super::copy::{self, key_of, value_of, Row, Table};
use super::report::{per_second, round, with_memory};
use super::stack::{self, Stack, POLL};
use super::Options;
use crate::progress;
use crate::webhook::WebhookReceiver;
use crate::TestDb;

const SCENARIO: &str = "ingest";

pub async fn run(opts: &Options) -> anyhow::Result<Value> {
    let n = opts.messages.unwrap_or(200_000);
    let keys = opts.first_keys(1_000);
    let partitions = opts.partitions;
    anyhow::ensure!(n > 0 && partitions > 0, "--messages and --partitions must be positive");

    let broker = Broker::start(opts.brokers.as_deref())?;
    let topic = broker.create_topic("ingest", partitions).await?;
    progress!(SCENARIO, "broker: {}; topic {topic} with {partitions} partitions", broker.describe());

    let produced = produce(&broker, &topic, n, keys).await?;
    // Where each partition ends: what the committed offsets must reach.
    let mut ends = BTreeMap::new();
    for p in &produced {
        let end = ends.entry(p.partition).or_insert(0);
        *end = (*end).max(p.offset + 1);
    }
    let high = broker::high_watermarks(broker.client(None)?, &topic, partitions).await?;
    if ends.iter().any(|(p, e)| high.get(p) != Some(e)) {
        progress!(SCENARIO, "note: high watermarks {high:?} differ from the acknowledged ends {ends:?}");
    }

    let (consume, consume_steady) = limit_consume(opts, &broker, &topic, n).await?;
    progress!(
        SCENARIO,
        "limit: bare consumer read {n} messages at {consume:.0}/s ({consume_steady:.0}/s after the first)"
    );
    let copy = limit_copy(opts, &topic, &produced, keys).await?;
    progress!(SCENARIO, "limit: COPY stored {n} rows at {copy:.0}/s");

    let measured = measure_ingest(opts, &broker, &topic, n, &ends).await?;
    let ingest = per_second(n, measured.elapsed);
    let limit = consume.min(copy);
    let ingest_steady = per_second(measured.steady_messages, measured.steady);
    let limit_steady = consume_steady.min(copy);
    progress!(
        SCENARIO,
        "ingest: {n} messages stored and committed in {:.2}s ({ingest:.0}/s)",
        measured.elapsed.as_secs_f64()
    );

    let mut o = Map::new();
    o.insert("scenario".into(), SCENARIO.into());
    o.insert("messages".into(), n.into());
    o.insert("partitions".into(), partitions.into());
    o.insert("keys".into(), keys.into());
    o.insert("value_bytes".into(), copy::VALUE_BYTES.into());
    o.insert("ingest_msgs_per_s".into(), ingest.into());
    o.insert("ingest_seconds".into(), round(measured.elapsed.as_secs_f64(), 3).into());
    o.insert("stored_seconds".into(), round(measured.stored.as_secs_f64(), 3).into());
    o.insert("limit_consume_msgs_per_s".into(), consume.into());
    o.insert("limit_copy_rows_per_s".into(), copy.into());
    o.insert("limit_copy_tables".into(), "messages+message_records (one transaction, binary COPY)".into());
    o.insert("ratio_to_limit".into(), round(ingest / limit, 3).into());
    // The same without the fixed start-up (assignment, group join: ~3 s on
    // a fresh group), which weighs on short runs.
    o.insert("ingest_steady_msgs_per_s".into(), ingest_steady.into());
    o.insert("limit_consume_steady_msgs_per_s".into(), consume_steady.into());
    o.insert("ratio_to_limit_steady".into(), round(ingest_steady / limit_steady, 3).into());
    o.insert("node_workers".into(), measured.workers.into());
    o.insert("work_orders_during_ingest".into(), measured.work_orders.into());
    o.insert("commit_interval_ms".into(), (stack::ingest_settings(&[]).commit_interval.as_millis() as u64).into());
    o.insert("kafka_config".into(), kafka_config_json(opts));
    o.insert("broker".into(), broker.describe().into());
    Ok(with_memory(o))
}

/// Produces the `n` messages (keys round robin, ~100-byte JSON values) and
/// waits until the broker acknowledged all of them.
async fn produce(broker: &Broker, topic: &str, n: usize, keys: usize) -> anyhow::Result<Vec<Produced>> {
    let started = Instant::now();
    let producer = kt_kafka_testing::producer(&broker.bootstrap_servers())?;
    let messages = (0..n).map(|i| {
        let key = key_of(i, keys);
        let mut m = TestMessage::new(value_of(i, key.as_deref(), None));
        if let Some(k) = key {
            m = m.key(k);
        }
        m
    });
    let produced = kt_kafka_testing::produce(&producer, topic, messages).await?;
    producer.flush(Duration::from_secs(30)).context("failed to flush the producer")?;
    progress!(SCENARIO, "produced {n} messages in {:.2}s (before measuring)", started.elapsed().as_secs_f64());
    Ok(produced)
}

/// A consumer with the node's client settings in a fresh group, reading
/// all `n` messages from the earliest offset. Messages per second, from
/// subscribing (group join included, as for the node) to the last message;
/// and from the first message to the last.
async fn limit_consume(opts: &Options, broker: &Broker, topic: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let timeout = opts.timeout;
    let t = kt_proto::v1::Trigger {
        name: "bench-limit".into(),
        kafka: Some(kt_proto::v1::KafkaSource {
            hosts: broker.hosts(),
            topics: vec![topic.into()],
            group_id: format!("kt-bench-limit-{}", Uuid::new_v4().simple()),
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(kt_proto::v1::WebhookTarget { url: "http://127.0.0.1:9/hook".into(), ..Default::default() }),
        ..Default::default()
    };
    let v = kt_common::trigger::validate_trigger(&t, "", None, None)
        .map_err(|violations| anyhow::anyhow!("invalid limit trigger: {violations:?}"))?;
    let config = KafkaConfig::for_trigger(
        &v.spec,
        &v.secrets,
        &stack::ingest_settings(&opts.kafka_config),
        "kt-bench-limit",
        None,
    );
    let consumer: StreamConsumer = config.client_config().create().context("failed to create the bare consumer")?;
    let started = Instant::now();
    consumer.subscribe(&[topic])?;
    let deadline = tokio::time::Instant::now() + timeout;
    let (mut count, mut bytes) = (0usize, 0usize);
    let mut first = None;
    while count < n {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                count += 1;
                bytes += m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len);
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "bare consumer error"),
            Err(_) => anyhow::bail!("bare consumer: timed out after {timeout:?} with {count} of {n} messages"),
        }
    }
    let elapsed = started.elapsed();
    let steady = first.map_or(elapsed, |f| f.elapsed());
    std::hint::black_box(bytes);
    consumer.unsubscribe();
    Ok((per_second(n, elapsed), per_second(n.saturating_sub(1), steady)))
}

/// Binary COPY of the same rows (same partitions, offsets, keys, values)
/// into `messages` and `message_records` of a second fresh database with
/// the schema migrated; rows per second from BEGIN to COMMIT.
async fn limit_copy(opts: &Options, topic: &str, produced: &[Produced], keys: usize) -> anyhow::Result<f64> {
    let db = TestDb::create_on(&opts.postgres.admin_url).await?;
    let pool = kt_common::db::connect(&db.url, 2).await?;
    kt_common::db::migrate(&pool).await.context("failed to migrate the COPY database")?;
    let trigger = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO triggers (id, name, enabled, generation, group_id, spec) VALUES ($1, 'bench-copy', true, 1, $2, '{}')",
    )
    .bind(trigger)
    .bind(format!("kt-bench-copy-{trigger}"))
    .execute(&pool)
    .await?;
    let rows = || {
        let ts = Utc::now();
        produced.iter().enumerate().map(move |(i, p)| {
            let key = key_of(i, keys);
            Row {
                partition: p.partition,
                offset: p.offset,
                value: value_of(i, key.as_deref(), None),
                key: key.map(String::into_bytes),
                ts,
            }
        })
    };
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    copy::copy_rows(&mut tx, Table::Messages, trigger, topic, rows()).await.context("COPY messages failed")?;
    copy::copy_rows(&mut tx, Table::MessageRecords, trigger, topic, rows())
        .await
        .context("COPY message_records failed")?;
    tx.commit().await?;
    let elapsed = started.elapsed();
    pool.close().await;
    // Dropped now so its autovacuum does not run during the measurement.
    drop(db);
    Ok(per_second(produced.len(), elapsed))
}

struct Measured {
    /// Trigger creation → all stored and offsets committed.
    elapsed: Duration,
    /// Trigger creation → all stored.
    stored: Duration,
    /// First poll that saw stored messages → all stored and committed, and
    /// the messages stored in that span.
    steady: Duration,
    steady_messages: usize,
    workers: usize,
    work_orders: i64,
}

/// Starts the stack with the node's workers at 0, creates the trigger and
/// waits until every message is stored and every partition's committed
/// offset reached its end (`ends`: the next offset after the last produced
/// message, per partition).
async fn measure_ingest(
    opts: &Options,
    broker: &Broker,
    topic: &str,
    n: usize,
    ends: &BTreeMap<i32, i64>,
) -> anyhow::Result<Measured> {
    let mut stack = Stack::start(opts, Some(0)).await?;
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse()?).await?;
    progress!(
        SCENARIO,
        "stack up (database {}, node workers {}); creating the trigger",
        stack.database_name(),
        stack.workers
    );
    let started = Instant::now();
    let (trigger, group) = stack.create_trigger("bench-ingest", broker.hosts(), topic, &receiver.url()).await?;
    let group_client = broker.client(Some(&group))?;
    let mut stored_at = None;
    let mut first_seen: Option<(Instant, i64)> = None;
    let mut last_print = Instant::now();
    let result = loop {
        if started.elapsed() >= opts.timeout {
            break Err(anyhow::anyhow!("timed out after {:?} (stored: {})", opts.timeout, stored_at.is_some()));
        }
        if stored_at.is_none() {
            // Cheap check first (one row per partition), the exact count
            // only when it passes, at the first stored batch, and for progress.
            let checkpoints: Vec<(i32, i64)> =
                sqlx::query_as("SELECT partition, last_offset FROM partition_checkpoints WHERE trigger_id = $1")
                    .bind(trigger)
                    .fetch_all(&stack.pool)
                    .await?;
            let at_end = ends.iter().all(|(p, end)| checkpoints.iter().any(|(cp, last)| cp == p && last + 1 >= *end));
            let print = last_print.elapsed() >= Duration::from_secs(2);
            if at_end || print || (first_seen.is_none() && !checkpoints.is_empty()) {
                let count = stored_records(&stack.pool, trigger).await?;
                if first_seen.is_none() && count > 0 {
                    first_seen = Some((Instant::now(), count));
                }
                if at_end && count >= n as i64 {
                    stored_at = Some(started.elapsed());
                }
                if print {
                    last_print = Instant::now();
                    let rate = count as f64 / started.elapsed().as_secs_f64();
                    progress!(SCENARIO, "{count}/{n} stored ({rate:.0}/s)");
                }
            }
        }
        if let Some(stored) = stored_at {
            let committed = broker::committed_offsets(group_client.clone(), topic, opts.partitions).await?;
            if ends.iter().all(|(p, end)| committed.get(p).is_some_and(|c| c >= end)) {
                break Ok((started.elapsed(), stored, first_seen.map(|(at, seen)| (at.elapsed(), seen))));
            }
        }
        tokio::time::sleep(POLL).await;
    };
    let work_orders: i64 = sqlx::query_scalar("SELECT count(*) FROM work_orders WHERE trigger_id = $1")
        .bind(trigger)
        .fetch_one(&stack.pool)
        .await?;
    let workers = stack.workers;
    stack.stop().await;
    let (elapsed, stored, first_seen) = result?;
    let (steady, steady_messages) = match first_seen {
        Some((span, seen)) => (span, n.saturating_sub(seen as usize)),
        None => (elapsed, n),
    };
    Ok(Measured { elapsed, stored, steady, steady_messages, workers, work_orders })
}

/// `--kafka-config` overrides, as reported.
fn kafka_config_json(opts: &Options) -> Value {
    opts.kafka_config.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect::<Map<_, _>>().into()
}

async fn stored_records(pool: &sqlx::PgPool, trigger: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM message_records WHERE trigger_id = $1").bind(trigger).fetch_one(pool).await
}
