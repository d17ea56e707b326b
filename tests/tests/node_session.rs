//! The internal node protocol: a node session receives its full desired
//! state on every trigger change, is authenticated, and is dropped when it
//! goes silent.

use std::time::Duration;

use kt_proto::internal::node_message::Msg;
use kt_proto::internal::node_service_client::NodeServiceClient;
use kt_proto::internal::work_service_client::WorkServiceClient;
use kt_proto::internal::*;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::{
    CreateTriggerRequest, DeleteTriggerRequest, DisableTriggerRequest, EnableTriggerRequest, GetTriggerRequest,
    GetTriggerStatusRequest, SaslMechanism, Trigger, TriggerHealth,
};
use kt_tests::{sample_trigger, wait_for, ControlPlaneOptions, TestControlPlane, TestDb, TestNode, TEST_NODE_TOKEN};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

fn hello(node_id: &str, schema_version: i64) -> NodeMessage {
    NodeMessage { msg: Some(Msg::Hello(Hello { node_id: node_id.into(), schema_version, version: "test".into() })) }
}

type Client = NodeServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, kt_tests::BearerToken>,
>;

async fn open(
    client: &mut Client,
    first: NodeMessage,
) -> Result<(mpsc::Sender<NodeMessage>, Streaming<ControlMessage>), tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound))
}

/// The next assignment on the stream, skipping heartbeats.
async fn next_assignment(inbound: &mut Streaming<ControlMessage>) -> Assignment {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(control_message::Msg::Assignment(a)) = inbound.message().await.unwrap().unwrap().msg {
                return a;
            }
        }
    })
    .await
    .expect("an assignment within the timeout")
}

fn trigger_ids(a: &Assignment) -> Vec<(String, i64)> {
    a.pipelines.iter().map(|p| p.trigger.as_ref().unwrap()).map(|t| (t.id.clone(), t.generation)).collect()
}

#[tokio::test]
async fn test_assignments_follow_trigger_changes() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let mut nodes = NodeServiceClient::new(cp.authed(TEST_NODE_TOKEN).await.unwrap());
    let version = kt_common::db::expected_schema_version();

    let (_tx, mut inbound) = open(&mut nodes, hello("node-a", version)).await.unwrap();
    let first = next_assignment(&mut inbound).await;
    assert!(first.pipelines.is_empty());

    let t = triggers
        .create_trigger(CreateTriggerRequest { trigger: Some(sample_trigger("a", "b:9092", "t")) })
        .await
        .unwrap()
        .into_inner();
    let second = next_assignment(&mut inbound).await;
    assert!(second.plan_version > first.plan_version);
    assert_eq!(trigger_ids(&second), [(t.id.clone(), 1)]);

    triggers.disable_trigger(DisableTriggerRequest { id: t.id.clone() }).await.unwrap();
    assert!(next_assignment(&mut inbound).await.pipelines.is_empty());
    triggers.enable_trigger(EnableTriggerRequest { id: t.id.clone() }).await.unwrap();
    assert_eq!(trigger_ids(&next_assignment(&mut inbound).await), [(t.id.clone(), 3)]);

    // A second node gets the same full state: every node runs every trigger.
    let (_tx2, mut inbound2) = open(&mut nodes, hello("node-b", version)).await.unwrap();
    assert_eq!(trigger_ids(&next_assignment(&mut inbound2).await), [(t.id.clone(), 3)]);

    triggers.delete_trigger(DeleteTriggerRequest { id: t.id.clone() }).await.unwrap();
    assert!(next_assignment(&mut inbound).await.pipelines.is_empty());
    assert!(next_assignment(&mut inbound2).await.pipelines.is_empty());
}

/// `CreateTrigger` with `enabled: false` (before, the flag was ignored and
/// every trigger was created enabled).
#[tokio::test]
async fn test_a_trigger_created_disabled_runs_nowhere_until_enabled() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let mut nodes = NodeServiceClient::new(cp.authed(TEST_NODE_TOKEN).await.unwrap());
    let (_tx, mut inbound) = open(&mut nodes, hello("node-d", kt_common::db::expected_schema_version())).await.unwrap();
    assert!(next_assignment(&mut inbound).await.pipelines.is_empty());

    let disabled = Trigger { enabled: Some(false), ..sample_trigger("off", "b:9092", "t") };
    let off = triggers.create_trigger(CreateTriggerRequest { trigger: Some(disabled) }).await.unwrap().into_inner();
    assert_eq!(off.enabled, Some(false));
    let got = triggers.get_trigger(GetTriggerRequest { id: off.id.clone() }).await.unwrap().into_inner();
    assert_eq!((got.enabled, got.generation), (Some(false), 1));
    // An enabled trigger created after it shows that plans were sent, and
    // that they leave the disabled one out.
    let on = triggers
        .create_trigger(CreateTriggerRequest { trigger: Some(sample_trigger("on", "b:9092", "t")) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on.enabled, Some(true), "omitted means enabled");
    let plan = loop {
        let plan = trigger_ids(&next_assignment(&mut inbound).await);
        assert!(plan.iter().all(|(id, _)| *id != off.id), "a disabled trigger is assigned: {plan:?}");
        if !plan.is_empty() {
            break plan;
        }
    };
    assert_eq!(plan, [(on.id.clone(), 1)]);

    let enabled = triggers.enable_trigger(EnableTriggerRequest { id: off.id.clone() }).await.unwrap().into_inner();
    assert_eq!((enabled.enabled, enabled.generation), (Some(true), 2));
    let mut plan = trigger_ids(&next_assignment(&mut inbound).await);
    plan.sort();
    let mut expected = vec![(on.id.clone(), 1), (off.id.clone(), 2)];
    expected.sort();
    assert_eq!(plan, expected);

    // Created disabled: the events a create and a disable would record.
    let pool = db.pool().await.unwrap();
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM events WHERE trigger_id = $1 ORDER BY id")
        .bind(uuid::Uuid::parse_str(&off.id).unwrap())
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(kinds, ["trigger_created", "trigger_disabled", "trigger_enabled"]);
}

/// Waits for the trigger's summary state to be `health` with a reason
/// containing `reason`.
async fn wait_health(
    triggers: &mut TriggerServiceClient<tonic::transport::Channel>,
    id: &str,
    health: TriggerHealth,
    reason: &str,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let request = GetTriggerStatusRequest { id: id.to_owned() };
        let status = triggers.get_trigger_status(request).await.unwrap().into_inner();
        if status.health() == health && status.reason.contains(reason) {
            return;
        }
        let seen = (status.health(), status.reason);
        assert!(tokio::time::Instant::now() < deadline, "waiting for {health:?} ({reason}), last seen: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report(trigger_id: &str, state: PipelineState, error: &str) -> NodeMessage {
    let report = PipelineReport {
        trigger_id: trigger_id.into(),
        generation: 1,
        state: state.into(),
        error: error.into(),
        partitions: vec![],
    };
    NodeMessage { msg: Some(Msg::Pipeline(report)) }
}

#[tokio::test]
async fn test_trigger_health_follows_what_nodes_report() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let mut nodes = NodeServiceClient::new(cp.authed(TEST_NODE_TOKEN).await.unwrap());
    let pool = db.pool().await.unwrap();
    let create = |t: Trigger| CreateTriggerRequest { trigger: Some(t) };

    let off = Trigger { enabled: Some(false), ..sample_trigger("off", "b:9092", "t") };
    let off = triggers.create_trigger(create(off)).await.unwrap().into_inner();
    let status = triggers.get_trigger_status(GetTriggerStatusRequest { id: off.id }).await.unwrap().into_inner();
    assert_eq!((status.health(), status.reason.as_str()), (TriggerHealth::Disabled, ""));

    let id = triggers.create_trigger(create(sample_trigger("on", "b:9092", "t"))).await.unwrap().into_inner().id;
    wait_health(&mut triggers, &id, TriggerHealth::Degraded, "no data-plane node is connected").await;

    let version = kt_common::db::expected_schema_version();
    let (tx, mut inbound) = open(&mut nodes, hello("node-h", version)).await.unwrap();
    next_assignment(&mut inbound).await;
    wait_health(&mut triggers, &id, TriggerHealth::Degraded, "no node reports the pipeline running yet").await;
    tx.send(report(&id, PipelineState::Running, "")).await.unwrap();
    wait_health(&mut triggers, &id, TriggerHealth::Healthy, "").await;

    let trigger_id = uuid::Uuid::parse_str(&id).unwrap();
    sqlx::query(
        "INSERT INTO message_sets (trigger_id, topic, key, state, blocked_since)
         VALUES ($1, 't', 'k', 'blocked', now() - interval '5 seconds')",
    )
    .bind(trigger_id)
    .execute(&pool)
    .await
    .unwrap();
    wait_health(&mut triggers, &id, TriggerHealth::Degraded, "1 blocked set(s), the oldest blocked for").await;
    sqlx::query("DELETE FROM message_sets WHERE trigger_id = $1").bind(trigger_id).execute(&pool).await.unwrap();

    tx.send(report(&id, PipelineState::Failed, "broker unreachable")).await.unwrap();
    wait_health(&mut triggers, &id, TriggerHealth::Failed, "node node-h: broker unreachable").await;

    // Another node runs it: still served, but not well.
    let (tx2, mut inbound2) = open(&mut nodes, hello("node-i", version)).await.unwrap();
    next_assignment(&mut inbound2).await;
    tx2.send(report(&id, PipelineState::Running, "")).await.unwrap();
    wait_health(&mut triggers, &id, TriggerHealth::Degraded, "node node-h: broker unreachable").await;
}

#[tokio::test]
async fn test_reports_and_membership_become_events() {
    let db = TestDb::create().await.unwrap();
    let opts = ControlPlaneOptions { heartbeat: Some(Duration::from_millis(100)), ..Default::default() };
    let cp = TestControlPlane::start(&db, opts).await.unwrap();
    let mut nodes = NodeServiceClient::new(cp.authed(TEST_NODE_TOKEN).await.unwrap());
    let pool = db.pool().await.unwrap();
    let trigger_id = uuid::Uuid::now_v7().to_string();

    let (tx, mut inbound) = open(&mut nodes, hello("node-r", kt_common::db::expected_schema_version())).await.unwrap();
    next_assignment(&mut inbound).await;
    for (state, error) in [(PipelineState::Running, ""), (PipelineState::Failed, "broker unreachable")] {
        let report = PipelineReport {
            trigger_id: trigger_id.clone(),
            generation: 1,
            state: state.into(),
            error: error.into(),
            partitions: vec![],
        };
        tx.send(NodeMessage { msg: Some(Msg::Pipeline(report)) }).await.unwrap();
    }
    let kinds = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT kind FROM events WHERE node_id = 'node-r' ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    wait_for("pipeline events", WAIT, || async {
        let k = kinds().await;
        (k == ["node_joined", "pipeline_started", "pipeline_failed"]).then_some(())
    })
    .await
    .unwrap();
    let error: String = sqlx::query_scalar("SELECT details->>'error' FROM events WHERE kind = 'pipeline_failed'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(error, "broker unreachable");

    // The node goes silent without closing its stream: after three missed
    // heartbeats the control plane drops it.
    wait_for("node_left after silence", WAIT, || async {
        kinds().await.last().is_some_and(|k| k == "node_left").then_some(())
    })
    .await
    .unwrap();
    drop(tx);
}

#[tokio::test]
async fn test_sessions_are_authenticated_and_checked() {
    let db = TestDb::create().await.unwrap();
    let opts = ControlPlaneOptions { node_token: Some("node-secret".into()), ..Default::default() };
    let cp = TestControlPlane::start(&db, opts).await.unwrap();
    let version = kt_common::db::expected_schema_version();

    let mut anonymous = NodeServiceClient::new(cp.authed("").await.unwrap());
    let status = open(&mut anonymous, hello("n", version)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let mut node = NodeServiceClient::new(cp.authed("node-secret").await.unwrap());
    let status = open(&mut node, hello("n", version + 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("schema version"), "{}", status.message());

    let beat = NodeMessage { msg: Some(Msg::Heartbeat(Heartbeat { unix_ms: 0 })) };
    let status = open(&mut node, beat).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let (_tx, mut inbound) = open(&mut node, hello("n", version)).await.unwrap();
    next_assignment(&mut inbound).await;
}

/// Pins issue #10 item 1: the node protocol answered anyone, even with an
/// API token set, and its assignments carry decrypted passwords.
#[tokio::test]
async fn test_the_node_protocol_gives_nothing_to_a_peer_without_the_node_token() {
    let db = TestDb::create().await.unwrap();
    let opts = ControlPlaneOptions { api_token: Some("api-secret".into()), ..Default::default() };
    let cp = TestControlPlane::start(&db, opts).await.unwrap();
    let mut triggers = TriggerServiceClient::new(cp.authed("api-secret").await.unwrap());
    let mut trigger = sample_trigger("with-password", "b:9092", "t");
    let kafka = trigger.kafka.as_mut().unwrap();
    kafka.sasl = SaslMechanism::Plain.into();
    kafka.username = "svc".into();
    kafka.password = "pw-must-stay-inside".into();
    triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap();
    let version = kt_common::db::expected_schema_version();

    // No token, the API token, a wrong one: refused before any assignment.
    for token in ["", "api-secret", "not-the-node-token"] {
        let mut peer = NodeServiceClient::new(cp.authed(token).await.unwrap());
        let status = open(&mut peer, hello("intruder", version)).await.err();
        assert_eq!(status.map(|s| s.code()), Some(Code::Unauthenticated), "session with token {token:?}");

        let mut work = WorkServiceClient::new(cp.authed(token).await.unwrap());
        let (tx, rx) = mpsc::channel(4);
        drop(tx);
        let status = work.work(ReceiverStream::new(rx)).await.err();
        assert_eq!(status.map(|s| s.code()), Some(Code::Unauthenticated), "work stream with token {token:?}");
    }

    let mut node = NodeServiceClient::new(cp.authed(TEST_NODE_TOKEN).await.unwrap());
    let (_tx, mut inbound) = open(&mut node, hello("node", version)).await.unwrap();
    let assignment = next_assignment(&mut inbound).await;
    assert_eq!(
        assignment.pipelines[0].trigger.as_ref().unwrap().kafka.as_ref().unwrap().password,
        "pw-must-stay-inside"
    );
}

/// Without a node token the control plane does not start, unless it is told
/// by name to run the node protocol open.
#[tokio::test]
async fn test_a_control_plane_without_a_node_token_refuses_to_start_unless_told_to_run_open() {
    let db = TestDb::create().await.unwrap();
    let config = || kt_control_plane::Config {
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        ..kt_control_plane::Config::new(db.url.clone())
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let error = kt_control_plane::start(config(), shutdown.clone()).await.err().expect("refused");
    let message = format!("{error:#}");
    assert!(message.contains("--node-token") && message.contains("--insecure-open-node-protocol"), "{message}");

    let open_config = kt_control_plane::Config { insecure_open_node_protocol: true, ..config() };
    let running = kt_control_plane::start(open_config, shutdown.clone()).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", running.addr)).unwrap();
    let mut anyone = NodeServiceClient::new(tonic::service::interceptor::InterceptedService::new(
        channel.connect().await.unwrap(),
        kt_tests::BearerToken::new(""),
    ));
    let (_tx, mut inbound) =
        open(&mut anyone, hello("anyone", kt_common::db::expected_schema_version())).await.unwrap();
    next_assignment(&mut inbound).await;
    shutdown.cancel();
}

/// The control plane judges liveness by its own heartbeat interval, here far
/// shorter than the node's: the node answers each heartbeat, so it is not
/// dropped (and does not rejoin over and over).
#[tokio::test]
async fn test_a_node_keeps_its_session_under_a_faster_control_plane_heartbeat() {
    let db = TestDb::create().await.unwrap();
    let opts = ControlPlaneOptions { heartbeat: Some(Duration::from_millis(100)), ..Default::default() };
    let cp = TestControlPlane::start(&db, opts).await.unwrap();
    let pool = db.pool().await.unwrap();
    let node = TestNode::start(&db, &cp.url(), |c| c.heartbeat_interval = Duration::from_secs(5)).await;
    let membership = || {
        let pool = pool.clone();
        let node_id = node.node_id.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT kind FROM events WHERE node_id = $1 AND kind IN ('node_joined', 'node_left') ORDER BY id",
            )
            .bind(node_id)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    wait_for("the node joined", WAIT, || async { (!membership().await.is_empty()).then_some(()) }).await.unwrap();
    // An observation window of 20 control-plane heartbeats (the peer is
    // dropped after 3 missed ones); the node's own would come after 5 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(membership().await, ["node_joined"]);
    node.stop().await.unwrap();
}

/// Issue 10: a node's whole desired state once travelled in one message, so
/// enough triggers (or a few large ones) passed the node's 4 MiB decode
/// limit and cut every node off. 5 000 triggers of about 1.2 KiB each make a
/// plan of some 6 MiB; it must reach a node whole, in parts the node can
/// decode, through the node's own reassembly.
#[tokio::test]
async fn test_five_thousand_triggers_reach_a_node_in_parts_it_can_decode() {
    use kt_proto::v1::Header;
    use prost::Message as _;

    const TRIGGERS: usize = 5_000;
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let mut trigger = sample_trigger("t0", "b:9092", "t");
    let header = Header { name: "x-tenant".into(), value: "v".repeat(1_024), secret: false };
    trigger.webhook.as_mut().unwrap().headers.push(header);
    let first = triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner();
    // The other 4 999 as copies of the first, in one statement: 5 000 calls
    // would make this test minutes long on a small machine.
    let copies = sqlx::query(
        "INSERT INTO triggers (id, name, enabled, generation, group_id, spec)
         SELECT gen_random_uuid(), 't' || i, enabled, generation, group_id || '-' || i,
                jsonb_set(jsonb_set(spec, '{name}', to_jsonb('t' || i)), '{kafka,group_id}', to_jsonb(group_id || '-' || i))
         FROM triggers, generate_series(1, $2) AS i WHERE id = $1::uuid",
    )
    .bind(&first.id)
    .bind(TRIGGERS as i32 - 1)
    .execute(&db.pool().await.unwrap())
    .await
    .unwrap();
    assert_eq!(copies.rows_affected() as usize, TRIGGERS - 1);
    let created: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM triggers").fetch_all(&db.pool().await.unwrap()).await.unwrap();

    // The same client a node uses, with tonic's default 4 MiB decode limit.
    let mut nodes = NodeServiceClient::new(cp.authed(TEST_NODE_TOKEN).await.unwrap());
    let (_tx, mut inbound) = open(&mut nodes, hello("node-a", kt_common::db::expected_schema_version())).await.unwrap();
    let mut plans = kt_data_plane::session::PlanAssembler::default();
    let (mut parts, mut total_bytes) = (0, 0);
    let plan = loop {
        let part = next_assignment(&mut inbound).await;
        let size = part.encoded_len();
        assert!(size <= kt_control_plane::nodes::MAX_ASSIGNMENT_PART_BYTES, "a part of {size} bytes");
        (parts, total_bytes) = (parts + 1, total_bytes + size);
        if let Some(plan) = plans.accept(part) {
            break plan;
        }
    };
    assert!(total_bytes > 4 * 1024 * 1024, "the plan ({total_bytes} bytes) would fit one message");
    assert!(parts >= 6, "{parts} parts");
    let mut got: Vec<String> = plan.pipelines.iter().map(|p| p.trigger.as_ref().unwrap().id.clone()).collect();
    let mut want = created;
    got.sort();
    want.sort();
    assert_eq!(got, want);
}
