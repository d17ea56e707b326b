//! Two control-plane replicas (real `control-plane` processes) on one
//! database: one active, one standing by. Killing the active one with SIGKILL
//! mid-flow hands over to the other; the node follows; nothing is lost,
//! nothing repeated, per-key order holds.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use kt_kafka_testing::mock::MockKafka;
use kt_kafka_testing::produce::{keyed_messages, produce_to};
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::webhook::WebhookReceiver;
use kt_tests::{wait_for, workspace_binary, TestDb, TestNode, TEST_ENCRYPTION_KEY};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(60);

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn replica(db: &TestDb, addr: SocketAddr) -> Child {
    Command::new(workspace_binary("control-plane").unwrap())
        .env("DATABASE_URL", &db.url)
        .env("KT_GRPC_LISTEN", addr.to_string())
        .env("KT_ENCRYPTION_KEY", TEST_ENCRYPTION_KEY)
        .env("KT_HEARTBEAT_SECONDS", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn serving(addr: SocketAddr) -> bool {
    let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await else {
        return false;
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health.check(tonic_health::pb::HealthCheckRequest::default()).await.is_ok()
}

#[tokio::test]
async fn test_killing_the_active_control_plane_hands_over_without_loss() {
    let db = TestDb::create().await.unwrap();
    let pool = db.pool().await.unwrap();
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("ha", 3).unwrap();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();

    let (a_addr, b_addr) = (free_addr(), free_addr());
    let mut a = replica(&db, a_addr);
    wait_for("replica A active", WAIT, || async { serving(a_addr).await.then_some(()) }).await.unwrap();
    let _b = replica(&db, b_addr);
    // B stands by: it does not even listen while A holds the lock.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                if serving(b_addr).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .is_err(),
        "the standby must not serve while the active replica runs"
    );

    let urls = format!("http://{a_addr},http://{b_addr}");
    let _node = TestNode::start(&db, &urls, |c| {
        c.control_plane_timeout = Duration::from_secs(3);
        c.reconnect_backoff = kt_common::backoff::Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    })
    .await;
    let mut triggers = TriggerServiceClient::connect(format!("http://{a_addr}")).await.unwrap();
    let trigger = Trigger {
        name: "ha".into(),
        kafka: Some(KafkaSource {
            hosts: vec![kafka.bootstrap_servers()],
            topics: vec!["ha".into()],
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(WebhookTarget { url: receiver.url(), ..Default::default() }),
        ..Default::default()
    };
    triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap();

    let messages = keyed_messages(400, 10);
    produce_to(&kafka.bootstrap_servers(), "ha", messages[..200].to_vec()).await.unwrap();
    receiver.wait_for_deliveries(50, WAIT).await.unwrap();

    a.kill().await.unwrap();
    produce_to(&kafka.bootstrap_servers(), "ha", messages[200..].to_vec()).await.unwrap();
    wait_for("replica B active", WAIT, || async { serving(b_addr).await.then_some(()) }).await.unwrap();

    wait_for("every message delivered after the failover", WAIT, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work_orders WHERE state = 'success'")
            .fetch_one(&pool)
            .await
            .unwrap();
        (n == 400).then_some(())
    })
    .await
    .unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM work_orders").fetch_one(&pool).await.unwrap();
    assert_eq!(total, 400, "exactly one work order per message");
    let mut last: BTreeMap<String, (i32, i64)> = BTreeMap::new();
    let mut seen = HashSet::new();
    for d in receiver.successes() {
        assert!(seen.insert((d.partition(), d.offset())), "a message succeeded twice");
        let at = (d.partition(), d.offset());
        if let Some(prev) = last.insert(d.key().unwrap().to_owned(), at) {
            assert!(prev < at, "order broken for {:?}", d.key());
        }
    }
    assert_eq!(seen.len(), 400);
}
