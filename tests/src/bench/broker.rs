//! The broker a scenario talks to: librdkafka's in-process mock cluster by
//! default, or a real cluster given with `--brokers` (topics are then created
//! through the admin API). Topic names are unique per run, so runs against a
//! long-lived broker never see each other's messages.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use kt_kafka_testing::MockKafka;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

/// Timeout of one metadata, watermark or committed-offsets request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub enum Broker {
    Mock(MockKafka),
    External(String),
}

impl Broker {
    /// The mock cluster (one broker) unless `brokers` names a real one.
    pub fn start(brokers: Option<&str>) -> anyhow::Result<Self> {
        Ok(match brokers {
            Some(b) => Broker::External(b.to_owned()),
            None => Broker::Mock(MockKafka::new(1).context("failed to start the in-process Kafka mock cluster")?),
        })
    }

    pub fn bootstrap_servers(&self) -> String {
        match self {
            Broker::Mock(m) => m.bootstrap_servers(),
            Broker::External(b) => b.clone(),
        }
    }

    /// The trigger's `kafka.hosts`.
    pub fn hosts(&self) -> Vec<String> {
        self.bootstrap_servers().split(',').map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect()
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Broker::Mock(_) => "in-process mock (librdkafka mock cluster, 1 broker)",
            Broker::External(_) => "external (--brokers)",
        }
    }

    /// Creates a fresh topic named `bench-<prefix>-<random>` and waits until
    /// its metadata shows every partition.
    pub async fn create_topic(&self, prefix: &str, partitions: i32) -> anyhow::Result<String> {
        let name = format!("bench-{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        match self {
            Broker::Mock(m) => {
                m.create_topic(&name, partitions).with_context(|| format!("failed to create topic {name}"))?
            }
            Broker::External(b) => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", b)
                    .create()
                    .context("failed to create admin client")?;
                let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
                let results = admin
                    .create_topics([&topic], &AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT)))
                    .await
                    .context("create_topics request failed")?;
                for r in results {
                    r.map_err(|(t, e)| anyhow::anyhow!("failed to create topic {t}: {e}"))?;
                }
            }
        }
        let consumer = self.client(None)?;
        let topic = name.clone();
        crate::wait_for(&format!("metadata of topic {name}"), Duration::from_secs(30), || {
            let consumer = consumer.clone();
            let topic = topic.clone();
            async move {
                let n = tokio::task::spawn_blocking(move || {
                    consumer
                        .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
                        .ok()
                        .and_then(|md| md.topics().first().map(|t| t.partitions().len()))
                })
                .await
                .ok()
                .flatten()?;
                (n == partitions as usize).then_some(())
            }
        })
        .await?;
        Ok(name)
    }

    /// A plain consumer handle (not subscribed): metadata, watermarks, and
    /// the committed offsets of `group`.
    pub fn client(&self, group: Option<&str>) -> anyhow::Result<std::sync::Arc<BaseConsumer>> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.bootstrap_servers())
            .set("group.id", group.unwrap_or("kt-bench-inspector"))
            .set("enable.auto.commit", "false");
        Ok(std::sync::Arc::new(config.create().context("failed to create Kafka client")?))
    }
}

/// High watermark (the next offset to be written) of every partition.
pub async fn high_watermarks(
    client: std::sync::Arc<BaseConsumer>,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        (0..partitions)
            .map(|p| {
                let (_, high) = client
                    .fetch_watermarks(&topic, p, REQUEST_TIMEOUT)
                    .with_context(|| format!("failed to fetch the watermarks of {topic}/{p}"))?;
                Ok((p, high))
            })
            .collect()
    })
    .await?
}

/// The offsets `client`'s group committed, per partition (-1: none).
pub async fn committed_offsets(
    client: std::sync::Arc<BaseConsumer>,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let committed = client.committed_offsets(tpl, REQUEST_TIMEOUT).context("failed to fetch committed offsets")?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                };
                (e.partition(), offset)
            })
            .collect())
    })
    .await?
}
