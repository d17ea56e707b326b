//! The sandbox of these tests: a database, the mock broker and a control
//! plane; triggers, nodes and the events they report.

use std::collections::BTreeSet;
use std::time::Duration;

use kt_kafka_testing::mock::MockKafka;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::process::{DataPlaneOptions, DataPlaneProcess};
use kt_tests::{wait_for, ControlPlaneOptions, TestControlPlane, TestDb, TestNode};
use sqlx::PgPool;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::invariants::CommittedOffsets;

/// Upper bound of any single wait; tests stay well under a minute when healthy.
pub const WAIT: Duration = Duration::from_secs(45);

/// Logs of the in-process nodes and control plane, filtered by
/// `KT_TEST_LOG` (e.g. `KT_TEST_LOG=kt_data_plane=info`); none by default.
pub fn init_logs() {
    if let Ok(filter) = std::env::var("KT_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

// ---------------------------------------------------------------------------
// The sandbox: database, mock broker, control plane.
// ---------------------------------------------------------------------------

pub struct Sandbox {
    pub db: TestDb,
    pub pool: PgPool,
    /// Never dropped: a consumer still open when the test's runtime shuts
    /// down (e.g. after a failed assertion) closes inline and can wait
    /// forever for a broker that is gone. The mock cluster lives until the
    /// test process exits instead.
    pub kafka: std::mem::ManuallyDrop<MockKafka>,
    pub cp: TestControlPlane,
    pub triggers: TriggerServiceClient<Channel>,
}

pub async fn sandbox(topics: &[(&str, i32)]) -> Sandbox {
    sandbox_with(topics, ControlPlaneOptions::default()).await
}

/// A sandbox for `data-plane` child processes: the binary's nodes heartbeat
/// every 5 s (not configurable), so the control plane must not declare them
/// dead sooner (it does after 3 of its own heartbeats); 5 s is its default.
pub async fn sandbox_for_processes(topics: &[(&str, i32)]) -> Sandbox {
    sandbox_with(topics, ControlPlaneOptions { heartbeat: Some(Duration::from_secs(5)), ..Default::default() }).await
}

pub async fn sandbox_with(topics: &[(&str, i32)], options: ControlPlaneOptions) -> Sandbox {
    init_logs();
    let db = TestDb::create().await.unwrap();
    let kafka = std::mem::ManuallyDrop::new(MockKafka::new(1).unwrap());
    for (topic, partitions) in topics {
        kafka.create_topic(topic, *partitions).unwrap();
    }
    let cp = TestControlPlane::start(&db, options).await.unwrap();
    let pool = db.pool().await.unwrap();
    let triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    Sandbox { db, pool, kafka, cp, triggers }
}

impl Sandbox {
    pub fn brokers(&self) -> String {
        self.kafka.bootstrap_servers()
    }

    pub async fn create_trigger(&self, name: &str, topics: &[&str]) -> Trigger {
        create_trigger(&self.triggers, name, &self.brokers(), topics).await
    }

    /// An in-process ingest-only node with the sandbox's test timings.
    pub async fn ingest_node(&self, tweak: impl FnOnce(&mut kt_data_plane::Config)) -> TestNode {
        TestNode::start(&self.db, &self.cp.url(), |c| {
            c.workers = 0;
            tweak(c);
        })
        .await
    }

    /// Options for a `data-plane` child process of this sandbox.
    pub fn child_options(&self, node_id: &str) -> DataPlaneOptions {
        DataPlaneOptions::new(&self.db.url, &self.cp.url(), node_id)
    }

    pub fn offsets(&self, trigger: &Trigger, partitions: &[(&str, i32)]) -> CommittedOffsets {
        CommittedOffsets::new(&self.brokers(), group_id(trigger), partitions)
    }
}

pub async fn create_trigger(
    client: &TriggerServiceClient<Channel>,
    name: &str,
    brokers: &str,
    topics: &[&str],
) -> Trigger {
    let trigger = Trigger {
        name: name.into(),
        kafka: Some(KafkaSource {
            hosts: vec![brokers.into()],
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(WebhookTarget { url: "http://127.0.0.1:9/hook".into(), ..Default::default() }),
        ..Default::default()
    };
    client.clone().create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner()
}

pub fn trigger_uuid(trigger: &Trigger) -> Uuid {
    Uuid::parse_str(&trigger.id).unwrap()
}

pub fn group_id(trigger: &Trigger) -> &str {
    &trigger.kafka.as_ref().unwrap().group_id
}

pub async fn update_trigger(
    s: &Sandbox,
    trigger: &Trigger,
    paths: &[&str],
    patch: impl FnOnce(&mut Trigger),
) -> Trigger {
    let mut t = Trigger { id: trigger.id.clone(), ..Default::default() };
    patch(&mut t);
    let mask = prost_types::FieldMask { paths: paths.iter().map(|p| (*p).to_owned()).collect() };
    s.triggers
        .clone()
        .update_trigger(UpdateTriggerRequest { trigger: Some(t), update_mask: Some(mask) })
        .await
        .unwrap()
        .into_inner()
}

pub async fn wait_nodes_reporting(s: &Sandbox, trigger: Uuid, kind: &str, generation: i64, nodes: &[&TestNode]) {
    let want: BTreeSet<String> = nodes.iter().map(|n| n.node_id.clone()).collect();
    let what = format!("{kind} of generation {generation} from {want:?}");
    wait_for(&what, WAIT, || async {
        (nodes_reporting(&s.pool, trigger, kind, generation).await == want).then_some(())
    })
    .await
    .unwrap();
}

/// `(node_id, details)` of the events of `kind` for `trigger`, oldest first.
pub async fn events(pool: &PgPool, trigger: Uuid, kind: &str) -> Vec<(Option<String>, serde_json::Value)> {
    sqlx::query_as("SELECT node_id, details FROM events WHERE trigger_id = $1 AND kind = $2 ORDER BY id")
        .bind(trigger)
        .bind(kind)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Nodes that reported `kind` (e.g. `pipeline_started`) for `generation`.
pub async fn nodes_reporting(pool: &PgPool, trigger: Uuid, kind: &str, generation: i64) -> BTreeSet<String> {
    events(pool, trigger, kind)
        .await
        .into_iter()
        .filter(|(_, d)| d["generation"].as_i64() == Some(generation))
        .filter_map(|(node, _)| node)
        .collect()
}

pub fn with_output(child: &DataPlaneProcess) -> impl Fn(anyhow::Error) -> String + '_ {
    move |e| format!("{e:#}\n--- output of data-plane {} ---\n{}", child.node_id, child.output())
}
