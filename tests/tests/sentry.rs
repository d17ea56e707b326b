//! Sentry: a newly blocked set, a message that cannot be stored and a
//! pipeline that fails are
//! reported with their ids, and no secret reaches the report. The test
//! transport captures what would be sent. This binary owns the global Sentry
//! client and log subscriber, so it stands alone.

use std::sync::Arc;
use std::time::Duration;

use kt_kafka_testing::mock::MockKafka;
use kt_kafka_testing::produce::{produce_to, TestMessage};
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::webhook::{Reply, WebhookReceiver};
use kt_tests::{wait_for, ControlPlaneOptions, TestControlPlane, TestDb, TestNode};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const SECRET: &str = "hdr-S3cret-For-Sentry-Test";

fn event_text(e: &sentry::protocol::Event<'static>) -> String {
    serde_json::to_string(e).unwrap()
}

#[tokio::test]
async fn test_blocked_sets_persistence_failures_and_pipeline_crashes_are_reported() {
    let transport = sentry::test::TestTransport::new();
    let factory = transport.clone();
    let _sentry = sentry::init(sentry::ClientOptions {
        dsn: Some("https://public@sentry.invalid/1".parse().unwrap()),
        transport: Some(Arc::new(move |_: &sentry::ClientOptions| factory.clone() as Arc<dyn sentry::Transport>)),
        ..Default::default()
    });
    tracing_subscriber::registry().with(sentry_tracing::layer()).init();

    let db = TestDb::create().await.unwrap();
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("alerts", 1).unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    // The target echoes nothing useful and always fails.
    receiver.script(|_| Reply::status(500));
    let _node = TestNode::start(&db, &cp.url(), |_| {}).await;
    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let trigger = Trigger {
        name: "alerts".into(),
        kafka: Some(KafkaSource {
            hosts: vec![kafka.bootstrap_servers()],
            topics: vec!["alerts".into()],
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(WebhookTarget {
            url: receiver.url(),
            headers: vec![Header { name: "x-api-key".into(), value: SECRET.into(), secret: true }],
            ..Default::default()
        }),
        retry: Some(RetryPolicy { max_attempts: Some(1), ..Default::default() }),
        ..Default::default()
    };
    let id = triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner().id;
    // One message that fails delivery (blocked set), one whose key is too
    // large for the set index (cannot be stored: a persistence failure).
    let mut huge_key = vec![0u8; 8 * 1024];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut huge_key);
    let messages = [TestMessage::new("{}").key("k1"), TestMessage::new("{}").key(huge_key)];
    produce_to(&kafka.bootstrap_servers(), "alerts", messages).await.unwrap();

    // A trigger whose pipeline cannot start (a CA that does not load).
    let broken = Trigger {
        name: "alerts-broken".into(),
        kafka: Some(KafkaSource {
            hosts: vec![kafka.bootstrap_servers()],
            topics: vec!["alerts".into()],
            ssl: true,
            ssl_ca_cert: "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n".into(),
            ..Default::default()
        }),
        webhook: Some(WebhookTarget { url: receiver.url(), ..Default::default() }),
        ..Default::default()
    };
    let broken_id =
        triggers.create_trigger(CreateTriggerRequest { trigger: Some(broken) }).await.unwrap().into_inner().id;

    let mut events = Vec::new();
    let has = |events: &[sentry::protocol::Event<'static>], text: &str| {
        events.iter().any(|e| e.message.as_deref().is_some_and(|m| m.contains(text)))
    };
    wait_for(
        "Sentry events for the blocked set, the unstorable message and the failed pipeline",
        Duration::from_secs(60),
        || {
            events.extend(transport.fetch_and_clear_events());
            let found =
                has(&events, "set blocked") && has(&events, "cannot be stored") && has(&events, "pipeline failed");
            async move { found.then_some(()) }
        },
    )
    .await
    .unwrap();
    let crashed = events.iter().find(|e| e.message.as_deref().is_some_and(|m| m.contains("pipeline failed"))).unwrap();
    assert!(event_text(crashed).contains(&broken_id), "the pipeline failure names its trigger");
    let unstorable =
        events.iter().find(|e| e.message.as_deref().is_some_and(|m| m.contains("cannot be stored"))).unwrap();
    let text = event_text(unstorable);
    for field in ["trigger_id", "topic", "partition", "offset"] {
        assert!(text.contains(field), "the persistence failure carries {field}: {text}");
    }
    let blocked = events.iter().find(|e| e.message.as_deref().is_some_and(|m| m.contains("set blocked"))).unwrap();
    let text = event_text(blocked);
    assert!(text.contains(&id), "the event names the trigger: {text}");
    assert!(text.contains("work_order_id") && text.contains("set_id"), "{text}");
    assert!(text.contains("500"), "the event carries the error: {text}");
    for e in &events {
        assert!(!event_text(e).contains(SECRET), "a Sentry event contains the secret header value");
    }
}
