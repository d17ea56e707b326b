//! Reading test messages back: consumer settings that join groups quickly (on Tansu and on
//! the mock cluster alike) and "give me N messages within a deadline".

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::OwnedMessage;

/// Consumer settings for tests: start from the earliest offset, no auto-commit, and short
/// group timeouts. Brokers such as Tansu make a joining member wait out the group's
/// rebalance timeout (`max.poll.interval.ms`); with the defaults the first message takes
/// ~23 s, with these ~3 s.
pub fn consumer_config(bootstrap_servers: &str, group_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", group_id)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("max.poll.interval.ms", "6000")
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "1000");
    config
}

/// A `StreamConsumer` with [`consumer_config`], subscribed to `topics`.
pub fn subscribed_consumer(bootstrap_servers: &str, group_id: &str, topics: &[&str]) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer =
        consumer_config(bootstrap_servers, group_id).create().context("failed to create consumer")?;
    consumer.subscribe(topics).with_context(|| format!("failed to subscribe to {topics:?}"))?;
    Ok(consumer)
}

/// Receives `n` messages from `consumer`, failing if they have not all arrived within
/// `timeout` (the error says how many did).
pub async fn consume_n(consumer: &StreamConsumer, n: usize, timeout: Duration) -> anyhow::Result<Vec<OwnedMessage>> {
    let mut messages = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + timeout;
    while messages.len() < n {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => messages.push(message.detach()),
            Ok(Err(err)) => {
                // Transient errors (a broker going away, a rebalance) are reported here too;
                // the consumer recovers by itself, so keep reading until the deadline.
                tracing::debug!(error = %err, "consumer error while reading test messages");
            }
            Err(_) => anyhow::bail!("timed out after {timeout:?}: received {} of {n} messages", messages.len()),
        }
    }
    Ok(messages)
}
