//! `latency`: a steady producer at R msg/s for T s over the full stack
//! (ingest, scheduler, workers, webhook target answering 200) → p50/p95/p99
//! from produce to delivery. Each message carries the instant it was handed
//! to the producer (`sent_at_us`, microseconds on this process's monotonic
//! clock); the target stamps its arrival on the same clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kt_kafka_testing::TestMessage;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use serde_json::{Map, Value};

use super::broker::Broker;
use super::copy::{key_of, value_of};
use super::limits::Limits;
use super::report::{micros_at, per_second, percentile, round, unix_micros, with_memory};
use super::stack::Stack;
use super::Options;
use crate::progress;
use crate::webhook::WebhookReceiver;

const SCENARIO: &str = "latency";
/// Messages sent (and awaited) before measuring: the pipeline has joined its
/// group and the workers know the trigger.
pub(super) const WARM_UP_MESSAGES: usize = 20;
/// The producer sends every message at once: at 500 msg/s, latency is
/// measured without any batching in front of the broker.
const PRODUCER_LINGER_MS: u32 = 0;
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(opts: &Options) -> anyhow::Result<Value> {
    let rate = opts.rate.max(1);
    let seconds = opts.seconds.max(1);
    let keys = opts.first_keys(1_000);
    let total = rate as usize * seconds as usize;

    let limits = Limits::measure(SCENARIO, opts).await;
    let Pipeline { broker, topic, stack, receiver, trigger, producer, opts } =
        Pipeline::start(SCENARIO, "latency", opts, PRODUCER_LINGER_MS).await?;
    let opts = &opts;
    let workers = stack.workers;

    progress!(SCENARIO, "producing {total} messages at {rate}/s for {seconds}s over {keys} keys");
    let produce = steady_produce(SCENARIO, &producer, &topic, rate, 0..total, keys).await?;
    progress!(SCENARIO, "produced; waiting for the last deliveries");
    let waited = receiver.wait_for_deliveries(WARM_UP_MESSAGES + total, opts.timeout).await;
    let mut latencies = latencies_ms(&receiver);
    let trigger_successes = super::stack::successes(&stack.pool, trigger).await.unwrap_or(-1);
    let stages = stages(&stack.pool, trigger, &receiver).await;
    stack.stop().await;
    waited.with_context(|| format!("{} of {total} measured messages delivered", latencies.len()))?;
    anyhow::ensure!(latencies.len() == total, "{} of {total} measured messages delivered", latencies.len());
    latencies.sort_by(f64::total_cmp);

    let mut o = Map::new();
    o.insert("scenario".into(), SCENARIO.into());
    o.insert("rate".into(), rate.into());
    o.insert("seconds".into(), seconds.into());
    o.insert("messages".into(), total.into());
    o.insert("keys".into(), keys.into());
    o.insert("p50_ms".into(), round(percentile(&latencies, 50.0), 2).into());
    o.insert("p95_ms".into(), round(percentile(&latencies, 95.0), 2).into());
    o.insert("p99_ms".into(), round(percentile(&latencies, 99.0), 2).into());
    o.insert("max_ms".into(), round(latencies.last().copied().unwrap_or(f64::NAN), 2).into());
    o.insert("mean_ms".into(), round(latencies.iter().sum::<f64>() / latencies.len() as f64, 2).into());
    match stages {
        Ok(stages) => o.insert("stages_ms".into(), stages),
        Err(e) => o.insert("stages_ms".into(), format!("unavailable: {e:#}").into()),
    };
    let achieved = per_second(total, produce.elapsed);
    o.insert("achieved_rate".into(), achieved.into());
    // The steady rate the system kept up with, against what it could take.
    limits.report(&mut o, achieved);
    o.insert("producer_behind_max_ms".into(), round(produce.behind_max.as_secs_f64() * 1e3, 2).into());
    o.insert("work_orders_succeeded".into(), trigger_successes.into());
    o.insert(
        "latency_span".into(),
        "hand-over to the producer -> webhook target received the POST (it answers 200 at once; the work order's \
         success row is written right after)"
            .into(),
    );
    o.insert("node_workers".into(), workers.into());
    o.insert(
        "kafka_config".into(),
        opts.kafka_config.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect::<Map<_, _>>().into(),
    );
    o.insert("partitions".into(), opts.partitions.into());
    o.insert("broker".into(), broker.describe().into());
    o.insert("producer_linger_ms".into(), PRODUCER_LINGER_MS.into());
    Ok(with_memory(o))
}

/// The full path, warmed up and ready to measure: a stack whose trigger
/// reads a fresh topic and delivers to the bench's target, and a producer
/// that sends each message at once. Shared with `sustained`.
pub(super) struct Pipeline {
    pub broker: Broker,
    pub topic: String,
    pub stack: Stack,
    pub receiver: WebhookReceiver,
    pub trigger: uuid::Uuid,
    pub producer: FutureProducer,
    /// The options the node runs with (see [`mock_compensation`]).
    pub opts: Options,
}

impl Pipeline {
    /// Starts everything and waits until [`WARM_UP_MESSAGES`] were
    /// delivered: the pipeline has joined its group and the workers know
    /// the trigger. The receiver's count includes them. The producer
    /// lingers `linger_ms` to batch (`linger.ms`).
    pub(super) async fn start(scenario: &str, name: &str, opts: &Options, linger_ms: u32) -> anyhow::Result<Self> {
        let broker = Broker::start(opts.brokers.as_deref())?;
        let topic = broker.create_topic(name, opts.partitions).await?;
        let opts = mock_compensation(opts, &broker);
        let mut stack = Stack::start(&opts, opts.workers).await?;
        let receiver = WebhookReceiver::start("127.0.0.1:0".parse()?).await?;
        let (trigger, _) =
            stack.create_trigger(&format!("bench-{name}"), broker.hosts(), &topic, &receiver.url()).await?;
        progress!(
            scenario,
            "stack up (database {}, node workers {}); warming up",
            stack.database_name(),
            stack.workers
        );

        // Latency counts from the hand-over to the producer, so the linger
        // (if any) is part of what is measured.
        let mut config = kt_kafka_testing::producer_config(&broker.bootstrap_servers());
        config.set("linger.ms", linger_ms.to_string());
        let producer: FutureProducer = config.create().context("failed to create the producer")?;

        warm_up(&producer, &topic, &receiver, 0).await?;
        Ok(Self { broker, topic, stack, receiver, trigger, producer, opts })
    }
}

/// Produces [`WARM_UP_MESSAGES`] to `topic` and waits until the target
/// received them after the `before` deliveries it had: the trigger's
/// pipeline has joined its group and the workers know the trigger.
pub(super) async fn warm_up(
    producer: &FutureProducer,
    topic: &str,
    receiver: &WebhookReceiver,
    before: usize,
) -> anyhow::Result<()> {
    let warm = (0..WARM_UP_MESSAGES).map(|i| TestMessage::new(r#"{"warm_up":true}"#).key(format!("warm-up-{i}")));
    kt_kafka_testing::produce(producer, topic, warm).await?;
    receiver
        .wait_for_deliveries(before + WARM_UP_MESSAGES, WARM_UP_TIMEOUT)
        .await
        .context("warm-up messages were not delivered (does ingest mark sets ready and are workers running?)")
}

/// librdkafka's mock broker answers a fetch that found no data only after
/// the full `fetch.wait.max.ms` (500 ms by default), even when messages
/// arrive meanwhile (rdkafka_mock_handlers.c: "This isn't strictly correct
/// since we should cut the wait short..."); a real broker answers as soon as
/// data arrives. On the mock, the node's consumer therefore waits at most
/// 10 ms per fetch, unless `--kafka-config` sets it.
fn mock_compensation(opts: &Options, broker: &Broker) -> Options {
    let mut opts = opts.clone();
    let set = opts.kafka_config.iter().any(|(k, _)| k == "fetch.wait.max.ms");
    if matches!(broker, Broker::Mock(_)) && !set {
        opts.kafka_config.push(("fetch.wait.max.ms".into(), "10".into()));
    }
    opts
}

pub(super) struct Produced {
    pub elapsed: Duration,
    /// How far the producer loop ever fell behind its schedule.
    pub behind_max: Duration,
}

/// Sends messages `seqs` (their sequence numbers, which pick their keys),
/// the `n`-th at `start + n / rate` (absolute schedule: no drift),
/// stamping `sent_at_us` just before the hand-over; then waits for every
/// acknowledgement.
pub(super) async fn steady_produce(
    scenario: &str,
    producer: &FutureProducer,
    topic: &str,
    rate: u32,
    seqs: std::ops::Range<usize>,
    keys: usize,
) -> anyhow::Result<Produced> {
    let total = seqs.len();
    let start = tokio::time::Instant::now();
    let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(total);
    let mut behind_max = Duration::ZERO;
    let mut last_print = Instant::now();
    for (n, i) in seqs.enumerate() {
        let due = start + Duration::from_micros(n as u64 * 1_000_000 / u64::from(rate));
        tokio::time::sleep_until(due).await;
        behind_max = behind_max.max(tokio::time::Instant::now().saturating_duration_since(due));
        let key = key_of(i, keys);
        let value = value_of(i, key.as_deref(), Some(micros_at(Instant::now())));
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(value.as_slice());
            if let Some(k) = &key {
                record = record.key(k.as_bytes());
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(anyhow::anyhow!(e).context(format!("failed to produce message {i}"))),
            }
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            progress!(scenario, "{}/{total} produced", n + 1);
        }
    }
    let elapsed = start.elapsed();
    for (i, d) in pending.into_iter().enumerate() {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(anyhow::anyhow!(e).context(format!("message {i} was not delivered"))),
            Err(_) => anyhow::bail!("message {i}: producer dropped before delivery"),
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(Produced { elapsed, behind_max })
}

/// Produce → arrival at the target, in milliseconds, of each measured
/// message (first delivery of each; warm-up messages carry no timestamp).
fn latencies_ms(receiver: &WebhookReceiver) -> Vec<f64> {
    latencies_by_seq(receiver).into_values().collect()
}

/// Produce → arrival at the target, in milliseconds, by sequence number,
/// of the first delivery of each measured message.
pub(super) fn latencies_by_seq(receiver: &WebhookReceiver) -> HashMap<u64, f64> {
    let mut out = HashMap::new();
    for d in receiver.deliveries().iter().filter(|d| (200..300).contains(&d.status)) {
        let (Some(sent), Some(seq)) = (d.body["data"]["sent_at_us"].as_u64(), d.body["data"]["seq"].as_u64()) else {
            continue;
        };
        out.entry(seq).or_insert_with(|| (micros_at(d.received_at) as f64 - sent as f64) / 1e3);
    }
    out
}

/// Where the time goes, cumulative from the hand-over to the producer, at
/// p50/p99: `stored` (the ingest transaction that wrote the message's dedup
/// record began), `work_order_created` (a worker claimed its set and wrote
/// the work order), `delivered` (the target received the POST). Database
/// timestamps are `now()` of their transaction on the same machine's clock.
async fn stages(pool: &sqlx::PgPool, trigger: uuid::Uuid, receiver: &WebhookReceiver) -> anyhow::Result<Value> {
    let mut sent: HashMap<(i32, i64), (i64, f64)> = HashMap::new();
    for d in receiver.deliveries() {
        if let Some(us) = d.body["data"]["sent_at_us"].as_u64() {
            let delivered = (micros_at(d.received_at) as f64 - us as f64) / 1e3;
            sent.entry((d.partition(), d.offset())).or_insert((unix_micros(us), delivered));
        }
    }
    let rows: Vec<(i32, i64, f64, f64)> = sqlx::query_as(
        "SELECT w.partition, w.\"offset\",
                extract(epoch FROM r.created_at)::float8 * 1e6, extract(epoch FROM w.created_at)::float8 * 1e6
           FROM work_orders w
           JOIN message_records r USING (trigger_id, topic, partition, \"offset\")
          WHERE w.trigger_id = $1",
    )
    .bind(trigger)
    .fetch_all(pool)
    .await?;
    let (mut stored, mut created, mut delivered) = (Vec::new(), Vec::new(), Vec::new());
    for (p, o, stored_us, created_us) in rows {
        if let Some((sent_us, d)) = sent.get(&(p, o)) {
            stored.push((stored_us - *sent_us as f64) / 1e3);
            created.push((created_us - *sent_us as f64) / 1e3);
            delivered.push(*d);
        }
    }
    let summary = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        serde_json::json!({"p50": round(percentile(&v, 50.0), 2), "p99": round(percentile(&v, 99.0), 2)})
    };
    Ok(serde_json::json!({
        "stored": summary(stored),
        "work_order_created": summary(created),
        "delivered": summary(delivered),
    }))
}
