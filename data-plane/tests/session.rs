//! The node session against a scriptable fake control plane, and a whole
//! node (`run`) in process: hello and token, assignments applied only when
//! newer, reports, reconnects that leave pipelines running, the schema
//! check, and shutdown.

mod grants;
mod support;

use std::time::Duration;

use kt_common::backoff::Backoff;
use kt_common::secret::Secret;
use kt_data_plane::control_plane::{ClientTls, ControlPlane};
use kt_data_plane::pipelines::{spawn_supervisor, SupervisorEnv, SupervisorHandle};
use kt_data_plane::session::{run_session, SessionSettings};
use kt_data_plane::status::StatusBoard;
use kt_data_plane::{run, Config};
use kt_proto::ids::TriggerId;
use kt_proto::internal::node_service_server::{NodeService, NodeServiceServer};
use kt_proto::internal::{
    control_message, node_message, Assignment, ControlMessage, NodeMessage, PipelineReport, PipelineSpec, PipelineState,
};
use kt_proto::v1;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

/// What the fake control plane sees.
#[derive(Debug)]
enum Seen {
    Connected { authorization: Option<String>, to_node: mpsc::Sender<Result<ControlMessage, Status>> },
    Rejected,
    Message(NodeMessage),
    Disconnected,
}

struct FakeControlPlane {
    seen: mpsc::Sender<Seen>,
    token: String,
}

#[tonic::async_trait]
impl NodeService for FakeControlPlane {
    type SessionStream = ReceiverStream<Result<ControlMessage, Status>>;

    async fn session(&self, request: Request<Streaming<NodeMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let authorization = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
        if authorization.as_deref() != Some(&format!("Bearer {}", self.token)) {
            let _ = self.seen.send(Seen::Rejected).await;
            return Err(Status::unauthenticated("bad node token"));
        }
        let (to_node, rx) = mpsc::channel(16);
        let _ = self.seen.send(Seen::Connected { authorization, to_node }).await;
        let mut inbound = request.into_inner();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let _ = seen.send(Seen::Message(m)).await;
            }
            let _ = seen.send(Seen::Disconnected).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves a fake control plane on a free port; returns its URL and what it
/// sees.
async fn fake_control_plane(token: &str) -> (String, mpsc::Receiver<Seen>) {
    let (seen, rx) = mpsc::channel(256);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let service = NodeServiceServer::new(FakeControlPlane { seen, token: token.to_owned() });
    tokio::spawn(
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (url, rx)
}

async fn next(seen: &mut mpsc::Receiver<Seen>) -> Seen {
    tokio::time::timeout(T, seen.recv()).await.expect("the fake control plane saw nothing").expect("open")
}

/// The next message from the node that `pick` accepts, skipping the others.
async fn next_matching<R>(seen: &mut mpsc::Receiver<Seen>, mut pick: impl FnMut(&Seen) -> Option<R>) -> R {
    loop {
        let s = next(seen).await;
        if let Some(r) = pick(&s) {
            return r;
        }
    }
}

fn report_of(s: &Seen) -> Option<PipelineReport> {
    match s {
        Seen::Message(NodeMessage { msg: Some(node_message::Msg::Pipeline(r)) }) => Some(r.clone()),
        _ => None,
    }
}

fn assignment(plan_version: i64, triggers: &[&v1::Trigger]) -> Result<ControlMessage, Status> {
    Ok(ControlMessage {
        msg: Some(control_message::Msg::Assignment(Assignment {
            plan_version,
            pipelines: triggers.iter().map(|t| PipelineSpec { trigger: Some((*t).clone()) }).collect(),
            ..Default::default()
        })),
    })
}

fn session_settings(url: &str, token: &str) -> SessionSettings {
    SessionSettings {
        heartbeat_interval: Duration::from_millis(200),
        peer_timeout: Duration::from_secs(5),
        reconnect_backoff: Backoff::new(Duration::from_millis(50), Duration::from_millis(200)),
        ..SessionSettings::new(
            ControlPlane::new(url, Some(&Secret::new(token)), &ClientTls::default()).unwrap(),
            "node-test-1",
        )
    }
}

fn supervisor(
    db: &TestDb,
    board: &StatusBoard,
    cancel: &CancellationToken,
) -> (SupervisorHandle, tokio::task::JoinHandle<()>) {
    let env = SupervisorEnv {
        pool: db.pool.clone(),
        settings: fast_settings_arc(),
        board: board.clone(),
        client_id: "kt-test".into(),
        node_id: "kt-test".into(),
    };
    spawn_supervisor(env, cancel.clone())
}

/// A node's session and pipeline supervisor, running against a fake
/// control plane.
struct SessionUnderTest {
    supervisor: SupervisorHandle,
    cancel: CancellationToken,
    session: tokio::task::JoinHandle<()>,
    supervisor_task: tokio::task::JoinHandle<()>,
}

impl SessionUnderTest {
    fn start(db: &TestDb, url: &str, token: &str) -> Self {
        let board = StatusBoard::new();
        let cancel = CancellationToken::new();
        let (supervisor, supervisor_task) = supervisor(db, &board, &cancel);
        let settings = session_settings(url, token);
        let session = tokio::spawn(run_session(settings, supervisor.clone(), board, cancel.clone()));
        Self { supervisor, cancel, session, supervisor_task }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(T, self.session).await.unwrap().unwrap();
        tokio::time::timeout(T, self.supervisor_task).await.unwrap().unwrap();
    }
}

fn invalid_trigger(id: Uuid) -> v1::Trigger {
    let mut t = trigger_proto(id, 1, "127.0.0.1:9092", &["a"], "g");
    t.kafka.as_mut().unwrap().hosts.clear();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_session_says_hello_and_applies_only_newer_assignments() {
    let db = TestDb::new().await;
    let (url, mut seen) = fake_control_plane("s3cret").await;
    let node = SessionUnderTest::start(&db, &url, "s3cret");

    let to_node = match next(&mut seen).await {
        Seen::Connected { authorization, to_node } => {
            assert_eq!(authorization.as_deref(), Some("Bearer s3cret"));
            to_node
        }
        other => panic!("expected a connection, saw {other:?}"),
    };
    let hello = next_matching(&mut seen, |s| match s {
        Seen::Message(NodeMessage { msg: Some(node_message::Msg::Hello(h)) }) => Some(h.clone()),
        _ => None,
    })
    .await;
    assert_eq!(hello.node_id, "node-test-1");
    assert_eq!(hello.schema_version, kt_common::db::expected_schema_version());

    // Plan 5 assigns a trigger that cannot run: reported FAILED.
    let (t1, t2) = (Uuid::now_v7(), Uuid::now_v7());
    to_node.send(assignment(5, &[&invalid_trigger(t1)])).await.unwrap();
    let report = next_matching(&mut seen, report_of).await;
    assert_eq!((report.trigger_id.as_str(), report.state()), (t1.to_string().as_str(), PipelineState::Failed));
    assert!(report.error.contains("kafka.hosts"), "{}", report.error);

    // Plan 4 is stale: ignored (t2 never shows up). Plan 6 empties the node:
    // t1 is reported stopped.
    to_node.send(assignment(4, &[&invalid_trigger(t2)])).await.unwrap();
    to_node.send(assignment(6, &[])).await.unwrap();
    let report = next_matching(&mut seen, report_of).await;
    assert_eq!((report.trigger_id.as_str(), report.state()), (t1.to_string().as_str(), PipelineState::Stopped));

    // Heartbeats flow.
    next_matching(&mut seen, |s| match s {
        Seen::Message(NodeMessage { msg: Some(node_message::Msg::Heartbeat(h)) }) => Some(h.unix_ms),
        _ => None,
    })
    .await;
    node.stop().await;
    next_matching(&mut seen, |s| matches!(s, Seen::Disconnected).then_some(())).await;
    db.drop().await;
}

/// A plan too large for one message comes in parts; the node applies the
/// union of the parts once the last is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_plan_in_parts_is_applied_whole() {
    let db = TestDb::new().await;
    let (url, mut seen) = fake_control_plane("s3cret").await;
    let node = SessionUnderTest::start(&db, &url, "s3cret");
    let to_node = next_matching(&mut seen, |s| match s {
        Seen::Connected { to_node, .. } => Some(to_node.clone()),
        _ => None,
    })
    .await;

    let (t1, t2) = (Uuid::now_v7(), Uuid::now_v7());
    for (part, id) in [(0, t1), (1, t2)] {
        let spec = PipelineSpec { trigger: Some(invalid_trigger(id)) };
        let msg = Assignment { plan_version: 3, pipelines: vec![spec], part, parts: 2 };
        to_node.send(Ok(ControlMessage { msg: Some(control_message::Msg::Assignment(msg)) })).await.unwrap();
    }
    let mut failed = std::collections::BTreeSet::new();
    while failed.len() < 2 {
        let report = next_matching(&mut seen, report_of).await;
        assert_eq!(report.state(), PipelineState::Failed, "{report:?}");
        failed.insert(report.trigger_id);
    }
    assert_eq!(failed, [t1.to_string(), t2.to_string()].into());

    node.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_session_retries_a_refused_token() {
    let db = TestDb::new().await;
    let (url, mut seen) = fake_control_plane("right").await;
    let node = SessionUnderTest::start(&db, &url, "wrong");
    for _ in 0..3 {
        assert!(matches!(next(&mut seen).await, Seen::Rejected));
    }
    node.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_pipelines_keep_running_while_the_control_plane_is_away() {
    let cluster = cluster(1);
    create_topic(&cluster, "orders", 1);
    let bootstrap = cluster.bootstrap_servers();
    let db = TestDb::new().await;
    let id = Uuid::now_v7();
    insert_trigger(&db.pool, id, "g1").await;
    let (url, mut seen) = fake_control_plane("t").await;
    let node = SessionUnderTest::start(&db, &url, "t");

    let to_node = next_matching(&mut seen, |s| match s {
        Seen::Connected { to_node, .. } => Some(to_node.clone()),
        _ => None,
    })
    .await;
    let trigger = trigger_proto(id, 1, &bootstrap, &["orders"], "g1");
    to_node.send(assignment(1, &[&trigger])).await.unwrap();
    next_matching(&mut seen, |s| report_of(s).filter(|r| r.state() == PipelineState::Running).map(|_| ())).await;

    // The control plane ends the session; the node reconnects, says hello
    // again and reports the pipeline, which never stopped.
    drop(to_node);
    let _to_node = next_matching(&mut seen, |s| match s {
        Seen::Connected { to_node, .. } => Some(to_node.clone()),
        _ => None,
    })
    .await;
    next_matching(&mut seen, |s| {
        matches!(s, Seen::Message(NodeMessage { msg: Some(node_message::Msg::Hello(_)) })).then_some(())
    })
    .await;
    let report = next_matching(&mut seen, report_of).await;
    assert_eq!(report.state(), PipelineState::Running);
    assert_eq!(node.supervisor.running().await.unwrap(), [(TriggerId(id), 1)]);
    produce(&bootstrap, "orders", &keyed_records(10, 1, "a")).await;
    wait_count(&db.pool, MESSAGES, id, 10, T).await;

    node.stop().await;
    drop(cluster);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_run_refuses_a_database_at_another_schema_version() {
    let db = TestDb::empty().await;
    let config = Config::new(db.url(), "http://127.0.0.1:1");
    let err = tokio::time::timeout(T, run(config, CancellationToken::new())).await.unwrap().unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("schema is at version 0"), "{text}");
    assert!(text.contains(&format!("needs version {}", kt_common::db::expected_schema_version())), "{text}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_node_ingests_as_assigned_and_shuts_down_cleanly() {
    let cluster = cluster(1);
    create_topic(&cluster, "orders", 2);
    let bootstrap = cluster.bootstrap_servers();
    let db = TestDb::new().await;
    let id = Uuid::now_v7();
    insert_trigger(&db.pool, id, "g1").await;
    let (url, mut seen) = fake_control_plane("node-token").await;

    let mut config = Config::new(db.url(), &url);
    config.node_token = Some(Secret::new("node-token"));
    config.ingest = fast_settings();
    config.heartbeat_interval = Duration::from_millis(200);
    let shutdown = CancellationToken::new();
    let node = tokio::spawn(run(config, shutdown.clone()));

    let to_node = next_matching(&mut seen, |s| match s {
        Seen::Connected { to_node, .. } => Some(to_node.clone()),
        _ => None,
    })
    .await;
    to_node.send(assignment(1, &[&trigger_proto(id, 1, &bootstrap, &["orders"], "g1")])).await.unwrap();
    produce(&bootstrap, "orders", &keyed_records(50, 2, "a")).await;
    wait_count(&db.pool, MESSAGES, id, 50, T).await;
    wait_committed(&bootstrap, "g1", "orders", 2, T).await;

    shutdown.cancel();
    tokio::time::timeout(T, node).await.unwrap().unwrap().expect("run ends cleanly");
    // The last report says the pipeline stopped, then the stream closes.
    next_matching(&mut seen, |s| report_of(s).filter(|r| r.state() == PipelineState::Stopped).map(|_| ())).await;
    next_matching(&mut seen, |s| matches!(s, Seen::Disconnected).then_some(())).await;
    drop(cluster);
    db.drop().await;
}
