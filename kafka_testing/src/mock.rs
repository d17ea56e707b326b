//! [`MockKafka`]: librdkafka's in-process mock cluster (speaks the real Kafka protocol,
//! consumer groups and offsets included) with fault injection, behind a `Send + Sync` handle.
//!
//! rdkafka's `MockCluster` holds a raw pointer, so it is neither `Send` nor `Sync`. To let
//! tests keep the cluster in shared fixtures and call it from any task, the cluster lives on
//! a dedicated thread that owns it; the handle sends it closures and waits for the answer.
//! Every call is a quick operation on librdkafka's mock thread, so blocking is fine even
//! from async code.

use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaErrorCode, RDKafkaRespErr};

/// The cluster type owned by the mock thread.
pub type Cluster = MockCluster<'static, DefaultProducerContext>;

type Job = Box<dyn FnOnce(&Cluster) + Send>;

/// An in-process Kafka cluster (librdkafka's mock brokers) on localhost ports.
///
/// Brokers are numbered `1..=broker_count()`. Dropping the handle destroys the cluster;
/// clients still connected then see their brokers disappear.
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// let kafka = kt_kafka_testing::MockKafka::new(3)?;
/// kafka.create_topic("orders", 4)?;
/// let brokers = kafka.bootstrap_servers(); // give this to producers and consumers
/// kafka.broker_down(1)?;
/// kafka.broker_up(1)?;
/// # let _ = brokers; Ok(()) }
/// ```
pub struct MockKafka {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    bootstrap_servers: String,
    broker_count: i32,
}

impl MockKafka {
    /// Starts a mock cluster with `broker_count` brokers (at least 1).
    pub fn new(broker_count: i32) -> KafkaResult<Self> {
        let (ready_tx, ready_rx) = mpsc::sync_channel::<KafkaResult<String>>(1);
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name("kt-mock-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(broker_count) {
                    Ok(cluster) => cluster,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Runs until every handle is gone; the cluster is destroyed when this returns.
                for job in jobs_rx {
                    job(&cluster);
                }
            })
            .map_err(|_| KafkaError::MockCluster(RDKafkaErrorCode::Fail))?;
        let bootstrap_servers = ready_rx.recv().map_err(|_| KafkaError::MockCluster(RDKafkaErrorCode::Fail))??;
        Ok(Self { jobs: Some(jobs_tx), thread: Some(thread), bootstrap_servers, broker_count })
    }

    /// The `bootstrap.servers` list of the cluster (`127.0.0.1:PORT,...`).
    pub fn bootstrap_servers(&self) -> String {
        self.bootstrap_servers.clone()
    }

    /// Number of brokers; their ids are `1..=broker_count`.
    pub fn broker_count(&self) -> i32 {
        self.broker_count
    }

    /// Runs `f` on the thread that owns the cluster and returns its result: the way to use
    /// any `MockCluster` method this wrapper has no helper for.
    pub fn with_cluster<R, F>(&self, f: F) -> R
    where
        R: Send + 'static,
        F: FnOnce(&Cluster) -> R + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |cluster| {
            let _ = tx.send(f(cluster));
        });
        self.jobs
            .as_ref()
            .expect("mock cluster handle used after drop")
            .send(job)
            .expect("mock cluster thread is gone");
        rx.recv().expect("mock cluster thread is gone")
    }

    /// Creates a topic with `partitions` partitions, replicated on every broker (up to 3).
    pub fn create_topic(&self, name: &str, partitions: i32) -> KafkaResult<()> {
        self.create_topic_with_replication(name, partitions, self.broker_count.min(3))
    }

    /// Creates a topic with an explicit replication factor (at most `broker_count`).
    pub fn create_topic_with_replication(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
    ) -> KafkaResult<()> {
        let name = name.to_owned();
        self.with_cluster(move |c| c.create_topic(&name, partitions, replication_factor))
    }

    /// Takes a broker down: its connections are closed and new ones refused until
    /// [`broker_up`](Self::broker_up). Partition leadership does not move.
    pub fn broker_down(&self, broker_id: i32) -> KafkaResult<()> {
        self.with_cluster(move |c| c.broker_down(broker_id))
    }

    /// Brings a broker taken down by [`broker_down`](Self::broker_down) back.
    pub fn broker_up(&self, broker_id: i32) -> KafkaResult<()> {
        self.with_cluster(move |c| c.broker_up(broker_id))
    }

    /// Takes every broker down.
    pub fn all_brokers_down(&self) -> KafkaResult<()> {
        (1..=self.broker_count).try_for_each(|id| self.broker_down(id))
    }

    /// Brings every broker back up.
    pub fn all_brokers_up(&self) -> KafkaResult<()> {
        (1..=self.broker_count).try_for_each(|id| self.broker_up(id))
    }

    /// Delays every response of a broker by `delay` (round-trip time).
    pub fn set_round_trip_time(&self, broker_id: i32, delay: Duration) -> KafkaResult<()> {
        self.with_cluster(move |c| c.broker_round_trip_time(broker_id, delay))
    }

    /// Makes the next `errors.len()` requests of kind `api_key` (on any broker) fail, in
    /// order, with the given errors. E.g. `(RDKafkaApiKey::Produce,
    /// &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION])`.
    pub fn request_errors(&self, api_key: RDKafkaApiKey, errors: &[RDKafkaRespErr]) {
        let errors = errors.to_vec();
        self.with_cluster(move |c| c.request_errors(api_key, &errors));
    }

    /// Forgets the request errors still queued for `api_key`.
    pub fn clear_request_errors(&self, api_key: RDKafkaApiKey) {
        self.with_cluster(move |c| c.clear_request_errors(api_key));
    }

    /// Makes metadata for `topic` report `error` (e.g. `RD_KAFKA_RESP_ERR_NO_ERROR` to clear).
    pub fn topic_error(&self, topic: &str, error: RDKafkaRespErr) -> KafkaResult<()> {
        let topic = topic.to_owned();
        self.with_cluster(move |c| c.topic_error(&topic, error))
    }

    /// Moves the leadership of a partition to `broker_id` (`None`: no leader).
    pub fn partition_leader(&self, topic: &str, partition: i32, broker_id: Option<i32>) -> KafkaResult<()> {
        let topic = topic.to_owned();
        self.with_cluster(move |c| c.partition_leader(&topic, partition, broker_id))
    }

    /// Makes `broker_id` the coordinator of consumer group `group_id`.
    pub fn group_coordinator(&self, group_id: &str, broker_id: i32) -> KafkaResult<()> {
        let group = MockCoordinator::Group(group_id.to_owned());
        self.with_cluster(move |c| c.coordinator(group, broker_id))
    }
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("broker_count", &self.broker_count)
            .finish()
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which destroys the cluster.
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_handle_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<MockKafka>();
    }

    #[test]
    fn test_bootstrap_servers_lists_every_broker() {
        let kafka = MockKafka::new(3).unwrap();
        assert_eq!(kafka.bootstrap_servers().split(',').count(), 3);
        assert!(kafka.broker_down(2).is_ok());
        assert!(kafka.broker_up(2).is_ok());
    }
}
