//! Trigger filters over a real flow (mock broker, node, webhook receiver):
//! matching messages are delivered, the others are counted (status and
//! metric) and their offsets committed; a failing expression is a
//! non-match; a bad one is refused; an update changes what is delivered.
//! This binary installs the global metrics recorder, so it stands alone.

use std::collections::BTreeSet;
use std::time::Duration;

use kt_kafka_testing::mock::MockKafka;
use kt_kafka_testing::produce::{produce_to, TestMessage};
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::metrics::{sample, scrape};
use kt_tests::webhook::WebhookReceiver;
use kt_tests::{sample_trigger, wait_for, ControlPlaneOptions, TestControlPlane, TestDb, TestNode};
use tonic::transport::Channel;
use tonic_types::StatusExt;

const WAIT: Duration = Duration::from_secs(60);

/// (field, description) of each field violation of `status`.
fn field_violations(status: &tonic::Status) -> Vec<(String, String)> {
    let violations = status.get_details_bad_request().map(|b| b.field_violations).unwrap_or_default();
    violations.into_iter().map(|v| (v.field, v.description)).collect()
}

/// Waits until the trigger's status shows `delivered` successes and
/// `filtered` filtered messages, with the lag at 0 (the filtered offsets
/// committed too) in every partition, or, with `only_committed`, in every
/// partition the running pipeline has committed in: a pipeline restarted on
/// a new generation reports no committed offset (-1) for a partition it
/// has read nothing from yet.
async fn wait_settled(
    triggers: &TriggerServiceClient<Channel>,
    id: &str,
    delivered: i64,
    filtered: i64,
    only_committed: bool,
) {
    let what = format!("{delivered} delivered, {filtered} filtered, lag 0");
    let last = std::sync::Mutex::new(None);
    let settled = wait_for(&what, WAIT, || {
        let mut triggers = triggers.clone();
        let id = id.to_owned();
        let last = &last;
        async move {
            let s = triggers.get_trigger_status(GetTriggerStatusRequest { id }).await.ok()?.into_inner();
            *last.lock().unwrap() = Some(s.clone());
            let partitions: Vec<_> = s
                .nodes
                .iter()
                .flat_map(|n| &n.partitions)
                .filter(|p| !only_committed || p.committed_offset >= 0)
                .collect();
            let settled = s.work_orders_by_state.get("success") == Some(&delivered)
                && s.filtered_messages == filtered
                && !partitions.is_empty()
                && partitions.iter().all(|p| p.lag == 0 && p.committed_offset == p.high_watermark);
            settled.then_some(())
        }
    })
    .await;
    if let Err(e) = settled {
        panic!("{e}; last status: {:?}", last.lock().unwrap());
    }
}

#[tokio::test]
async fn test_filter_delivers_matching_messages_counts_the_rest_and_follows_updates() {
    let metrics_addr: std::net::SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    kt_common::telemetry::install_metrics(metrics_addr).unwrap();

    let db = TestDb::create().await.unwrap();
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("orders", 2).unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let _node = TestNode::start(&db, &cp.url(), |c| c.ingest.progress_interval = Duration::from_millis(200)).await;
    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());

    let mut trigger = sample_trigger("filtered", &kafka.bootstrap_servers(), "orders");
    trigger.webhook.as_mut().unwrap().url = receiver.url();
    trigger.filter = r#"value.type == "order" && value.amount > 100"#.into();
    let created = triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner();
    assert_eq!(created.filter, r#"value.type == "order" && value.amount > 100"#);

    // Amounts 0, 30, ..., 270: the last six match. Two payloads that are not
    // JSON make `value.type` fail at run time: non-matches.
    let mut messages: Vec<TestMessage> = (0..10)
        .map(|i| TestMessage::new(format!(r#"{{"type":"order","amount":{}}}"#, i * 30)).key(format!("k{i}")))
        .collect();
    messages.push(TestMessage::new("not json").key("k-text"));
    messages.push(TestMessage::new(vec![0xff, 0x00]).key("k-bytes"));
    produce_to(&kafka.bootstrap_servers(), "orders", messages).await.unwrap();

    wait_settled(&triggers, &created.id, 6, 6, false).await;
    let keys: BTreeSet<String> = receiver.successes().iter().filter_map(|d| d.key().map(str::to_owned)).collect();
    assert_eq!(keys, (4..10).map(|i| format!("k{i}")).collect());
    let metrics = scrape(metrics_addr).await;
    assert_eq!(sample(&metrics, "kt_messages_filtered_total"), Some(6.0), "{metrics}");

    // Only the filter changes; the running pipeline restarts on the new
    // generation and applies it to what comes next.
    let patch =
        Trigger { id: created.id.clone(), filter: r#"headers["source"] == "web""#.into(), ..Default::default() };
    let mask = prost_types::FieldMask { paths: vec!["filter".into()] };
    let updated = triggers
        .update_trigger(UpdateTriggerRequest { trigger: Some(patch), update_mask: Some(mask) })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.generation > created.generation);
    assert_eq!(updated.filter, r#"headers["source"] == "web""#);
    let shown = triggers.get_trigger(GetTriggerRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(shown.filter, updated.filter);
    let pool = db.pool().await.unwrap();
    wait_for("the pipeline of the new generation started", WAIT, || async {
        let started: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events WHERE trigger_id = $1::uuid AND kind = 'pipeline_started'
                              AND (details->>'generation')::int8 = $2)",
        )
        .bind(&created.id)
        .bind(updated.generation)
        .fetch_one(&pool)
        .await
        .ok()?;
        started.then_some(())
    })
    .await
    .unwrap();

    // Both would pass the old filter; only the one from "web" passes the new.
    let order = r#"{"type":"order","amount":500}"#;
    produce_to(
        &kafka.bootstrap_servers(),
        "orders",
        [
            TestMessage::new(order).key("from-web").header("source", "web"),
            TestMessage::new(order).key("from-app").header("source", "app"),
        ],
    )
    .await
    .unwrap();
    wait_settled(&triggers, &created.id, 7, 7, true).await;
    assert!(receiver.successes().iter().any(|d| d.key() == Some("from-web")));
    assert!(!receiver.deliveries().iter().any(|d| d.key() == Some("from-app")));
    let metrics = scrape(metrics_addr).await;
    assert_eq!(sample(&metrics, "kt_messages_filtered_total"), Some(7.0), "{metrics}");
}

#[tokio::test]
async fn test_a_filter_that_does_not_compile_is_refused_with_the_compiler_message() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let mut trigger = sample_trigger("bad-filter", "127.0.0.1:9092", "orders");
    trigger.filter = "value.amount >".into();
    let err = triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger.clone()) }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let violations = field_violations(&err);
    let (_, why) =
        violations.iter().find(|(field, _)| field == "trigger.filter").expect("a violation on trigger.filter");
    assert!(why.contains("ERROR: <input>:1:"), "{why}");

    trigger.filter = format!("key == \"{}\"", "x".repeat(5_000));
    let err = triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap_err();
    let violations = field_violations(&err);
    assert!(violations.iter().any(|(field, why)| field == "trigger.filter" && why.contains("at most 4096 bytes")));
}
