//! The pipeline supervisor reconciling full desired sets: start, restart on
//! a new generation, stop, reject what cannot run, restart what crashed.

mod support;

use std::time::Duration;

use kt_data_plane::assignment::Assignment;
use kt_data_plane::pipelines::{spawn_supervisor, SupervisorEnv, SupervisorHandle};
use kt_data_plane::status::StatusBoard;
use kt_proto::ids::TriggerId;
use kt_proto::internal::{PipelineSpec, PipelineState};
use kt_proto::v1;
use support::*;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

fn spec(trigger: &v1::Trigger) -> PipelineSpec {
    PipelineSpec { trigger: Some(trigger.clone()) }
}

struct Node {
    supervisor: SupervisorHandle,
    board: StatusBoard,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn node(db: &TestDb) -> Node {
    let board = StatusBoard::new();
    let cancel = CancellationToken::new();
    let env = SupervisorEnv {
        pool: db.pool.clone(),
        settings: fast_settings_arc(),
        board: board.clone(),
        client_id: "kt-test".into(),
        node_id: "kt-test".into(),
    };
    let (supervisor, task) = spawn_supervisor(env, cancel.clone());
    Node { supervisor, board, cancel, task }
}

async fn wait_state(board: &StatusBoard, id: Uuid, generation: i64, state: PipelineState) {
    wait_for(&format!("{id} to be {state:?} at generation {generation}"), T, || async {
        board.get(&id.to_string()).filter(|r| r.generation == generation && r.state() == state).map(|_| ())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_reconciler_starts_restarts_and_stops_pipelines() {
    let cluster = cluster(1);
    create_topic(&cluster, "a", 1);
    create_topic(&cluster, "b", 1);
    let bootstrap = cluster.bootstrap_servers();
    let db = TestDb::new().await;
    let (t1, t2) = (Uuid::now_v7(), Uuid::now_v7());
    insert_trigger(&db.pool, t1, "g1").await;
    insert_trigger(&db.pool, t2, "g2").await;
    let n = node(&db);

    let t1_v1 = trigger_proto(t1, 1, &bootstrap, &["a"], "g1");
    let t2_v1 = trigger_proto(t2, 1, &bootstrap, &["a"], "g2");
    let summary = n.supervisor.apply(Assignment::validate(&[spec(&t1_v1), spec(&t2_v1)])).await.unwrap();
    assert_eq!(summary.started.len(), 2);
    wait_state(&n.board, t1, 1, PipelineState::Running).await;
    wait_state(&n.board, t2, 1, PipelineState::Running).await;
    produce(&bootstrap, "a", &keyed_records(10, 1, "a")).await;
    wait_count(&db.pool, MESSAGES, t1, 10, T).await;
    wait_count(&db.pool, MESSAGES, t2, 10, T).await;

    // The same desired state again changes nothing.
    let summary = n.supervisor.apply(Assignment::validate(&[spec(&t1_v1), spec(&t2_v1)])).await.unwrap();
    assert_eq!(summary, Default::default());

    // t1 changes (now also reads topic b): restarted with the new config.
    let t1_v2 = trigger_proto(t1, 2, &bootstrap, &["a", "b"], "g1");
    let summary = n.supervisor.apply(Assignment::validate(&[spec(&t1_v2), spec(&t2_v1)])).await.unwrap();
    assert_eq!(summary.restarted, [TriggerId(t1)]);
    assert_eq!(n.supervisor.running().await.unwrap(), {
        let mut v = vec![(TriggerId(t1), 2), (TriggerId(t2), 1)];
        v.sort();
        v
    });
    wait_state(&n.board, t1, 2, PipelineState::Running).await;
    produce(&bootstrap, "b", &keyed_records(5, 1, "b")).await;
    wait_count(&db.pool, MESSAGES, t1, 15, T).await;

    // t2 is no longer assigned: stopped, and forgotten at the next apply.
    let summary = n.supervisor.apply(Assignment::validate(&[spec(&t1_v2)])).await.unwrap();
    assert_eq!(summary.stopped, [TriggerId(t2)]);
    assert_eq!(n.supervisor.running().await.unwrap(), [(TriggerId(t1), 2)]);
    wait_state(&n.board, t2, 1, PipelineState::Stopped).await;
    n.supervisor.apply(Assignment::validate(&[spec(&t1_v2)])).await.unwrap();
    assert!(n.board.get(&t2.to_string()).is_none());

    // Shutdown stops everything and waits for it.
    n.cancel.cancel();
    tokio::time::timeout(T, n.task).await.unwrap().unwrap();
    assert_eq!(n.board.get(&t1.to_string()).unwrap().state(), PipelineState::Stopped);
    drop(cluster);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_unrunnable_pipeline_is_reported_failed() {
    let db = TestDb::new().await;
    let n = node(&db);
    let id = Uuid::now_v7();
    let mut bad = trigger_proto(id, 3, "127.0.0.1:9092", &["a"], "g");
    bad.kafka.as_mut().unwrap().hosts = vec!["no-port".into()];
    let summary = n.supervisor.apply(Assignment::validate(&[spec(&bad)])).await.unwrap();
    assert_eq!(summary.rejected.len(), 1);
    assert!(n.supervisor.running().await.unwrap().is_empty());
    let report = n.board.get(&id.to_string()).unwrap();
    assert_eq!((report.state(), report.generation), (PipelineState::Failed, 3));
    assert!(report.error.contains("kafka.hosts[0]"), "{}", report.error);

    // No group id: refused rather than consuming in a made-up group.
    let mut no_group = trigger_proto(id, 4, "127.0.0.1:9092", &["a"], "");
    no_group.kafka.as_mut().unwrap().group_id.clear();
    let summary = n.supervisor.apply(Assignment::validate(&[spec(&no_group)])).await.unwrap();
    assert!(summary.rejected[0].1.contains("consumer group"), "{:?}", summary.rejected);

    // Once unassigned, the failure is forgotten.
    n.supervisor.apply(Assignment::validate(&[])).await.unwrap();
    assert!(n.board.get(&id.to_string()).is_none());
    n.cancel.cancel();
    n.task.await.unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_crashed_pipeline_restarts_with_backoff() {
    let db = TestDb::new().await;
    let n = node(&db);
    let id = Uuid::now_v7();
    insert_trigger(&db.pool, id, "g").await;
    // Valid for the API, but librdkafka cannot load this CA: the consumer
    // cannot be created, every time.
    let mut broken = trigger_proto(id, 1, "127.0.0.1:9092", &["a"], "g");
    let kafka = broken.kafka.as_mut().unwrap();
    kafka.ssl = true;
    kafka.ssl_ca_cert = "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----".into();
    n.supervisor.apply(Assignment::validate(&[spec(&broken)])).await.unwrap();
    let report = wait_for("a third failure in a row", T, || async {
        n.board.get(&id.to_string()).filter(|r| r.error.contains("failure #3"))
    })
    .await;
    assert_eq!(report.state(), PipelineState::Failed);
    assert!(report.error.contains("Kafka consumer"), "{}", report.error);
    // Still supervised, not given up.
    assert_eq!(n.supervisor.running().await.unwrap(), [(TriggerId(id), 1)]);

    // A fixed configuration (new generation) replaces it.
    n.supervisor.apply(Assignment::validate(&[])).await.unwrap();
    wait_state(&n.board, id, 1, PipelineState::Stopped).await;
    n.cancel.cancel();
    n.task.await.unwrap();
    db.drop().await;
}
