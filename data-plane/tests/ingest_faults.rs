//! Pipelines under faults: Postgres going away (nothing committed that is
//! not stored, everything stored exactly once after recovery), brokers
//! going down and failing requests, and a rebalance between two consumers
//! of the same trigger.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use support::*;
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_offsets_are_not_committed_while_postgres_is_down() {
    let cluster = cluster(1);
    create_topic(&cluster, "orders", 2);
    let bootstrap = cluster.bootstrap_servers();
    let db = TestDb::new().await;
    let trigger_id = Uuid::now_v7();
    insert_trigger(&db.pool, trigger_id, "g1").await;

    produce(&bootstrap, "orders", &keyed_records(100, 2, "a")).await;
    let trigger = trigger_proto(trigger_id, 1, &bootstrap, &["orders"], "g1");
    let p = RunningPipeline::start(&db.pool, pipeline_def(&trigger), fast_settings_arc());
    wait_count(&db.pool, MESSAGES, trigger_id, 100, T).await;
    wait_committed(&bootstrap, "g1", "orders", 2, T).await;
    let before_outage = high_watermarks(&bootstrap, "orders", 2).await;

    db.cut().await;
    produce(&bootstrap, "orders", &keyed_records(100, 2, "b")).await;
    // The pipeline has read the new messages and fails to store them...
    wait_for("the persister to report the outage", T, || async {
        p.report().filter(|r| r.error.contains("database")).map(|_| ())
    })
    .await;
    // ...and while it retries, no offset moves past what was stored before
    // the outage (several commit intervals observed).
    for _ in 0..10 {
        let c = committed(&bootstrap, "g1", "orders", 2).await;
        assert_eq!(c, before_outage, "an offset was committed for messages not in Postgres");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    db.restore().await;
    wait_count(&db.pool, MESSAGES, trigger_id, 200, T).await;
    wait_committed(&bootstrap, "g1", "orders", 2, T).await;
    wait_for("the error to clear", T, || async { p.report().filter(|r| r.error.is_empty()).map(|_| ()) }).await;
    p.stop().await;
    let hwm = high_watermarks(&bootstrap, "orders", 2).await;
    assert_contiguous(&stored_offsets(&db.pool, trigger_id).await, "orders", &hwm);
    drop(cluster);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_crash_between_storage_and_commit_redelivers_without_duplicates() {
    let cluster = cluster(1);
    create_topic(&cluster, "orders", 1);
    let bootstrap = cluster.bootstrap_servers();
    let db = TestDb::new().await;
    let trigger_id = Uuid::now_v7();
    insert_trigger(&db.pool, trigger_id, "g1").await;
    produce(&bootstrap, "orders", &keyed_records(50, 1, "a")).await;
    let trigger = trigger_proto(trigger_id, 1, &bootstrap, &["orders"], "g1");
    let p = RunningPipeline::start(&db.pool, pipeline_def(&trigger), fast_settings_arc());
    wait_committed(&bootstrap, "g1", "orders", 1, T).await;

    // Commits now fail at the broker, and the node dies after storing more:
    // stored in Postgres, not committed in Kafka.
    cluster.request_errors(RDKafkaApiKey::OffsetCommit, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 500]);
    produce(&bootstrap, "orders", &keyed_records(50, 1, "b")).await;
    wait_count(&db.pool, MESSAGES, trigger_id, 100, T).await;
    p.kill().await;
    assert_eq!(committed(&bootstrap, "g1", "orders", 1).await.get(&0), Some(&50));
    cluster.clear_request_errors(RDKafkaApiKey::OffsetCommit);

    // The next run rereads 50..99 from the committed offset: all duplicates.
    let p = RunningPipeline::start(&db.pool, pipeline_def(&trigger), fast_settings_arc());
    wait_committed(&bootstrap, "g1", "orders", 1, T).await;
    p.stop().await;
    assert_eq!(count(&db.pool, MESSAGES, trigger_id).await, 100);
    drop(cluster);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_broker_faults_end_with_everything_stored_once() {
    let cluster = cluster(3);
    create_topic(&cluster, "orders", 4);
    let bootstrap = cluster.bootstrap_servers();
    let db = TestDb::new().await;
    let trigger_id = Uuid::now_v7();
    insert_trigger(&db.pool, trigger_id, "g1").await;
    produce(&bootstrap, "orders", &keyed_records(200, 4, "a")).await;

    let trigger = trigger_proto(trigger_id, 1, &bootstrap, &["orders"], "g1");
    let p = RunningPipeline::start(&db.pool, pipeline_def(&trigger), fast_settings_arc());
    p.wait_assigned(T).await;

    // Fetches and commits fail for a while, a broker goes away, and a
    // partition changes leader, while more messages arrive.
    cluster.request_errors(RDKafkaApiKey::Fetch, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 5]);
    cluster.request_errors(RDKafkaApiKey::OffsetCommit, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 5]);
    cluster.broker_down(2).unwrap();
    let producer = {
        let bootstrap = bootstrap.clone();
        tokio::spawn(async move { produce(&bootstrap, "orders", &keyed_records(200, 4, "b")).await })
    };
    // The fault window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.partition_leader("orders", 0, Some(3)).unwrap();
    cluster.broker_up(2).unwrap();
    producer.await.unwrap();

    wait_count(&db.pool, MESSAGES, trigger_id, 400, T).await;
    wait_committed(&bootstrap, "g1", "orders", 4, T).await;
    p.stop().await;
    let hwm = high_watermarks(&bootstrap, "orders", 4).await;
    assert_eq!(hwm.values().sum::<i64>(), 400);
    assert_contiguous(&stored_offsets(&db.pool, trigger_id).await, "orders", &hwm);
    drop(cluster);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rebalance_between_two_nodes_loses_nothing() {
    let cluster = cluster(1);
    create_topic(&cluster, "orders", 4);
    let bootstrap = cluster.bootstrap_servers();
    let db = TestDb::new().await;
    let trigger_id = Uuid::now_v7();
    insert_trigger(&db.pool, trigger_id, "g1").await;
    let trigger = trigger_proto(trigger_id, 1, &bootstrap, &["orders"], "g1");

    produce(&bootstrap, "orders", &keyed_records(200, 4, "a")).await;
    let first = RunningPipeline::start(&db.pool, pipeline_def(&trigger), fast_settings_arc());
    first.wait_assigned(T).await;
    // A second node joins: the group rebalances over both.
    let second = RunningPipeline::start(&db.pool, pipeline_def(&trigger), fast_settings_arc());
    let producer = {
        let bootstrap = bootstrap.clone();
        tokio::spawn(async move { produce(&bootstrap, "orders", &keyed_records(200, 4, "b")).await })
    };
    second.wait_assigned(T).await;
    producer.await.unwrap();
    // The first leaves mid-stream; the second takes everything over.
    produce(&bootstrap, "orders", &keyed_records(100, 4, "c")).await;
    first.stop().await;
    produce(&bootstrap, "orders", &keyed_records(100, 4, "d")).await;

    wait_count(&db.pool, MESSAGES, trigger_id, 600, T).await;
    wait_committed(&bootstrap, "g1", "orders", 4, T).await;
    let partitions: BTreeMap<i32, i64> =
        second.report().unwrap().partitions.iter().map(|p| (p.partition, p.committed_offset)).collect();
    assert_eq!(partitions.len(), 4, "the remaining node owns every partition");
    second.stop().await;
    let hwm = high_watermarks(&bootstrap, "orders", 4).await;
    assert_contiguous(&stored_offsets(&db.pool, trigger_id).await, "orders", &hwm);
    drop(cluster);
    db.drop().await;
}

/// A pipeline aborted while its brokers are gone (a node's runtime shutting
/// down, a panic): closing its consumer waits for a group coordinator that
/// never answers, so that must not happen on the runtime's threads. On a
/// single-threaded runtime a blocking drop would freeze every timer.
#[tokio::test(flavor = "current_thread")]
async fn test_aborting_a_pipeline_never_blocks_the_runtime_on_its_consumer() {
    let cluster = cluster(1);
    create_topic(&cluster, "orders", 1);
    let bootstrap = cluster.bootstrap_servers();
    let db = TestDb::new().await;
    let trigger_id = Uuid::now_v7();
    insert_trigger(&db.pool, trigger_id, "g1").await;
    produce(&bootstrap, "orders", &keyed_records(10, 1, "a")).await;
    let trigger = trigger_proto(trigger_id, 1, &bootstrap, &["orders"], "g1");
    let p = RunningPipeline::start(&db.pool, pipeline_def(&trigger), fast_settings_arc());
    wait_count(&db.pool, MESSAGES, trigger_id, 10, T).await;
    // The broker goes away for good.
    drop(cluster);
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), p.kill()).await.expect("the abort returns");
    assert!(started.elapsed() < Duration::from_secs(5), "the runtime was blocked for {:?}", started.elapsed());
    db.drop().await;
}
