//! Operability: GetTriggerStatus and the Prometheus metrics of both planes,
//! over a real flow (broker, node, failing and succeeding webhook). This
//! binary installs the global metrics recorder, so it stands alone.

use std::time::Duration;

use kt_kafka_testing::mock::MockKafka;
use kt_kafka_testing::produce::{keyed_messages, produce_to};
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::metrics::{sample, scrape};
use kt_tests::webhook::{Reply, WebhookReceiver};
use kt_tests::{wait_for, ControlPlaneOptions, TestControlPlane, TestDb, TestNode};

const WAIT: Duration = Duration::from_secs(60);

fn trigger_template(kafka: &MockKafka, receiver: &WebhookReceiver) -> Trigger {
    Trigger {
        name: "obs".into(),
        kafka: Some(KafkaSource {
            hosts: vec![kafka.bootstrap_servers()],
            topics: vec!["obs".into()],
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(WebhookTarget { url: receiver.url(), ..Default::default() }),
        retry: Some(RetryPolicy { max_attempts: Some(1), ..Default::default() }),
        ..Default::default()
    }
}

#[tokio::test]
async fn test_status_and_metrics_follow_the_flow() {
    let metrics_addr: std::net::SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    kt_common::telemetry::install_metrics(metrics_addr).unwrap();

    let db = TestDb::create().await.unwrap();
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("obs", 2).unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    receiver.script(|b| if b["request"]["key"] == "key-0" { Reply::status(503) } else { Reply::OK });
    let node = TestNode::start(&db, &cp.url(), |c| {
        c.ingest.progress_interval = Duration::from_millis(300);
        // Dedup records of delivered messages are cleaned up at once here, so
        // the cleanup's counter moves within the test.
        c.dedup.retention = Duration::ZERO;
        c.dedup.interval = Duration::from_millis(300);
    })
    .await;

    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let trigger = trigger_template(&kafka, &receiver);
    let id = triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner().id;
    produce_to(&kafka.bootstrap_servers(), "obs", keyed_messages(40, 4)).await.unwrap();

    // 30 succeed; key-0 blocks on its first message, leaving 10 stored.
    let status = wait_for("status shows the blocked key and the running pipeline", WAIT, || {
        let mut triggers = triggers.clone();
        let id = id.clone();
        async move {
            let s = triggers.get_trigger_status(GetTriggerStatusRequest { id }).await.ok()?.into_inner();
            let done = s.blocked_sets == 1
                && s.work_orders_by_state.get("success") == Some(&30)
                && s.nodes.iter().any(|n| {
                    n.state == "PIPELINE_STATE_RUNNING"
                        && n.partitions.len() == 2
                        && n.partitions.iter().all(|p| p.high_watermark >= 0)
                });
            done.then_some(s)
        }
    })
    .await
    .unwrap();
    assert_eq!(status.trigger_id, id);
    assert_eq!(status.stored_messages, 10);
    assert_eq!(status.work_orders_by_state.get("failed"), Some(&1));
    assert_eq!(status.nodes.len(), 1);
    assert_eq!(status.nodes[0].node_id, node.node_id);
    for p in &status.nodes[0].partitions {
        assert_eq!(p.topic, "obs");
        assert!(p.high_watermark >= 0 && p.lag >= 0, "{p:?}");
    }
    assert!(status.oldest_blocked_age_seconds >= 0);

    let unknown = triggers
        .get_trigger_status(GetTriggerStatusRequest { id: uuid::Uuid::now_v7().to_string() })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // A trigger whose TLS CA cannot be loaded: its pipeline fails and is
    // restarted with backoff; the failure shows in its status and metrics.
    let mut broken = Trigger { name: "obs-broken".into(), ..trigger_template(&kafka, &receiver) };
    let k = broken.kafka.as_mut().unwrap();
    k.ssl = true;
    k.ssl_ca_cert = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n".into();
    let broken_id =
        triggers.create_trigger(CreateTriggerRequest { trigger: Some(broken) }).await.unwrap().into_inner().id;
    let failed = wait_for("the broken pipeline reported failed", WAIT, || {
        let mut triggers = triggers.clone();
        let id = broken_id.clone();
        async move {
            let s = triggers.get_trigger_status(GetTriggerStatusRequest { id }).await.ok()?.into_inner();
            s.nodes.iter().any(|n| n.state == "PIPELINE_STATE_FAILED" && !n.last_error.is_empty()).then_some(s)
        }
    })
    .await
    .unwrap();
    assert!(!failed.last_error.is_empty() && failed.last_error_time.is_some(), "{failed:?}");

    // An open event stream is counted.
    let mut events = kt_proto::v1::event_service_client::EventServiceClient::new(cp.channel().await.unwrap());
    let _stream = events.stream_events(StreamEventsRequest::default()).await.unwrap().into_inner();
    let text = wait_for("gauges published by the scheduler sweep", WAIT, || async {
        let text = scrape(metrics_addr).await;
        let ready = sample(&text, "kt_sets_blocked") == Some(1.0)
            && sample(&text, "kt_dedup_records_deleted_total").is_some_and(|v| v >= 1.0)
            && sample(&text, "kt_pipeline_failures_total").is_some_and(|v| v >= 1.0);
        ready.then_some(text)
    })
    .await
    .unwrap();
    for (name, at_least) in [
        ("kt_ingest_messages_total", 40.0),
        ("kt_ingest_batch_seconds_count", 1.0),
        ("kt_work_orders_created_total", 31.0),
        ("kt_work_orders_succeeded_total", 30.0),
        ("kt_work_orders_failed_total", 1.0),
        ("kt_delivery_seconds_count", 31.0),
        ("kt_node_sessions", 1.0),
        ("kt_worker_sessions", 1.0),
        ("kt_oldest_blocked_age_seconds", 0.0),
        ("kt_consumer_lag", 0.0),
        ("kt_sets_ready", 0.0),
        ("kt_sets_in_flight", 0.0),
        ("kt_sets_waiting_retry", 0.0),
        ("kt_event_stream_subscribers", 1.0),
        ("kt_pipeline_failures_total", 1.0),
        ("kt_dedup_records_deleted_total", 1.0),
    ] {
        let value = sample(&text, name).unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"));
        assert!(value >= at_least, "{name} = {value}, expected >= {at_least}");
    }
    drop(node);
}
