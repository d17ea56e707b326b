//! Producing test messages (keys, payloads, binary-safe headers) and waiting until the
//! broker has acknowledged every one of them.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::error::{KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

/// How long a message may wait for delivery before the producer gives up on it.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// One message to produce. Every field is optional; build it with the methods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestMessage {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Header keys are strings (Kafka's rule); values are bytes or null, in order, repeats allowed.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// `None`: the producer's partitioner picks (by key hash, or spread when unkeyed).
    pub partition: Option<i32>,
    /// Milliseconds since the epoch; `None`: the producer's clock.
    pub timestamp_ms: Option<i64>,
}

impl TestMessage {
    /// A message with this payload, no key, no headers.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Self { payload: Some(payload.into()), ..Self::default() }
    }

    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((key.into(), Some(value.into())));
        self
    }

    /// A header whose value is null (distinct from an empty value).
    pub fn null_header(mut self, key: impl Into<String>) -> Self {
        self.headers.push((key.into(), None));
        self
    }

    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    pub fn timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    fn owned_headers(&self) -> Option<OwnedHeaders> {
        if self.headers.is_empty() {
            return None;
        }
        let headers =
            self.headers.iter().fold(OwnedHeaders::new_with_capacity(self.headers.len()), |headers, (key, value)| {
                headers.insert(Header { key: key.as_str(), value: value.as_deref() })
            });
        Some(headers)
    }
}

/// `n` messages over `keys` distinct keys (`key-0` … `key-{keys-1}`, round robin; `keys == 0`:
/// unkeyed), each with a JSON payload `{"seq": i, "key": …}` and a `seq` header.
pub fn keyed_messages(n: usize, keys: usize) -> Vec<TestMessage> {
    (0..n)
        .map(|i| {
            let key = (keys > 0).then(|| format!("key-{}", i % keys));
            let payload = serde_json::json!({ "seq": i, "key": key }).to_string();
            let mut message = TestMessage::new(payload).header("seq", i.to_string());
            if let Some(key) = key {
                message = message.key(key);
            }
            message
        })
        .collect()
}

/// Where a message landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
}

/// Producer settings for tests: acks from all in-sync replicas, a bounded delivery time,
/// quick reconnects (brokers go down and up in fault tests).
pub fn producer_config(bootstrap_servers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", MESSAGE_TIMEOUT.as_millis().to_string())
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "1000");
    config
}

/// A `FutureProducer` with [`producer_config`].
pub fn producer(bootstrap_servers: &str) -> KafkaResult<FutureProducer> {
    producer_config(bootstrap_servers).create()
}

/// Produces `messages` to `topic` and waits until the broker acknowledged each one.
/// Returns where each landed, in the order given. Fails on the first message that could not
/// be delivered, naming its index.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    messages: impl IntoIterator<Item = TestMessage>,
) -> anyhow::Result<Vec<Produced>> {
    let mut produced = Vec::new();
    let mut pending: VecDeque<(usize, DeliveryFuture)> = VecDeque::new();
    for (index, message) in messages.into_iter().enumerate() {
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(key) = &message.key {
                record = record.key(key.as_slice());
            }
            if let Some(payload) = &message.payload {
                record = record.payload(payload.as_slice());
            }
            if let Some(headers) = message.owned_headers() {
                record = record.headers(headers);
            }
            if let Some(partition) = message.partition {
                record = record.partition(partition);
            }
            if let Some(ts) = message.timestamp_ms {
                record = record.timestamp(ts);
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back((index, delivery));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The local queue is full: wait for the oldest delivery, then try again.
                    match pending.pop_front() {
                        Some((i, delivery)) => produced.push(await_delivery(i, delivery).await?),
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((err, _)) => return Err(anyhow!(err).context(format!("failed to queue message {index}"))),
            }
        }
    }
    for (index, delivery) in pending {
        produced.push(await_delivery(index, delivery).await?);
    }
    Ok(produced)
}

async fn await_delivery(index: usize, delivery: DeliveryFuture) -> anyhow::Result<Produced> {
    match delivery.await {
        Ok(Ok((partition, offset))) => Ok(Produced { partition, offset }),
        Ok(Err((err, _))) => Err(anyhow!(err).context(format!("message {index} was not delivered"))),
        Err(_) => Err(anyhow!("message {index}: producer dropped before delivery")),
    }
}

/// Creates a producer for `bootstrap_servers`, produces `messages` to `topic`, waits for
/// every acknowledgement and flushes.
pub async fn produce_to(
    bootstrap_servers: &str,
    topic: &str,
    messages: impl IntoIterator<Item = TestMessage>,
) -> anyhow::Result<Vec<Produced>> {
    let producer = producer(bootstrap_servers).context("failed to create producer")?;
    let produced = produce(&producer, topic, messages).await?;
    producer.flush(Timeout::After(MESSAGE_TIMEOUT)).context("failed to flush producer")?;
    Ok(produced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keyed_messages_cycle_keys() {
        let messages = keyed_messages(5, 2);
        let keys: Vec<_> = messages.iter().map(|m| m.key.clone().unwrap()).collect();
        assert_eq!(
            keys,
            [b"key-0".to_vec(), b"key-1".to_vec(), b"key-0".to_vec(), b"key-1".to_vec(), b"key-0".to_vec()]
        );
        assert!(keyed_messages(3, 0).iter().all(|m| m.key.is_none()));
    }
}
