//! Graceful shutdown of a data-plane node (a real process) on SIGTERM in the
//! middle of ingest and delivery: it exits cleanly, leaves no claim held, and
//! a successor finishes every message exactly once.

use std::process::Stdio;
use std::time::Duration;

use kt_kafka_testing::mock::MockKafka;
use kt_kafka_testing::produce::{keyed_messages, produce_to};
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::webhook::{Reply, WebhookReceiver};
use kt_tests::{
    capture_logs, dispatch_report, group_report, wait_for, workspace_binary, ControlPlaneOptions, TestControlPlane,
    TestDb, TestNode, TEST_NODE_SESSION_TIMEOUT, TEST_NODE_TOKEN,
};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn test_sigterm_mid_flow_releases_claims_and_loses_nothing() {
    // Shown only if the test fails: what both nodes did with the partitions.
    const NODE_LOG: &str = "warn,kt_data_plane=info,kt_control_plane=info";
    capture_logs(NODE_LOG);
    let db = TestDb::create().await.unwrap();
    let pool = db.pool().await.unwrap();
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("graceful", 3).unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    // Slow enough that deliveries are in flight when the signal comes.
    receiver.script(|_| Reply { delay: Some(Duration::from_millis(50)), ..Reply::OK });

    let node_log = std::env::temp_dir().join(format!("kt-shutdown-{}.log", uuid::Uuid::new_v4().simple()));
    let log_file = std::fs::File::create(&node_log).unwrap();
    let mut node = tokio::process::Command::new(workspace_binary("data-plane").unwrap())
        .env("DATABASE_URL", &db.url)
        .env("KT_CONTROL_PLANE_URL", cp.url())
        .env("KT_NODE_TOKEN", TEST_NODE_TOKEN)
        .env("KT_WORKERS", "8")
        // The successor (a test node) joins the group while the mock
        // coordinator waits out a rebalance sized by the session timeout of
        // the member that left; with a longer one than the successor's, the
        // mock drops the waiting successor for silence and never answers its
        // join. A real broker waits by the rebalance timeout instead.
        .env("KT_KAFKA_SESSION_TIMEOUT_MS", TEST_NODE_SESSION_TIMEOUT.as_millis().to_string())
        .env("RUST_LOG", NODE_LOG)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let trigger = Trigger {
        name: "graceful".into(),
        kafka: Some(KafkaSource {
            hosts: vec![kafka.bootstrap_servers()],
            topics: vec!["graceful".into()],
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(WebhookTarget { url: receiver.url(), ..Default::default() }),
        ..Default::default()
    };
    let created = triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner();
    let group = created.kafka.map(|k| k.group_id).unwrap_or_default();
    produce_to(&kafka.bootstrap_servers(), "graceful", keyed_messages(600, 30)).await.unwrap();
    receiver.wait_for_deliveries(40, WAIT).await.unwrap();

    let pid = node.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), node.wait()).await.expect("node exits in time").unwrap();
    assert!(status.success(), "graceful shutdown exits 0, got {status:?}");

    // Nothing left claimed, and some work remains for a successor.
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM message_sets WHERE lock_id IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(held, 0, "claims left held after a graceful shutdown");
    let done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM work_orders WHERE state = 'success'").fetch_one(&pool).await.unwrap();
    assert!(done < 600, "the signal came mid-flow ({done} done)");

    let _successor = TestNode::start(&db, &cp.url(), |_| {}).await;
    receiver.script(|_| Reply::OK);
    let finished = wait_for("the successor finishes every message", WAIT, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work_orders WHERE state = 'success'")
            .fetch_one(&pool)
            .await
            .unwrap();
        (n == 600).then_some(())
    })
    .await;
    if let Err(e) = finished {
        let first_node = std::fs::read_to_string(&node_log).unwrap_or_default();
        panic!(
            "{e}; the database holds:{}\nthe broker:{}\nthe first node's log:\n{first_node}",
            dispatch_report(&pool).await,
            group_report(&kafka.bootstrap_servers(), &group, "graceful", 3),
        );
    }
    let _ = std::fs::remove_file(&node_log);
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM work_orders").fetch_one(&pool).await.unwrap();
    assert_eq!(total, 600);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM message_records").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, 600, "every message stored exactly once");
}
