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

mod connection_tests {
    //! `TriggerService.TestTriggerConnection`: run by a connected node with
    //! the pipeline's configuration, answered with what it found or why not.

    use super::*;
    use kt_proto::v1::{ConnectionFailure, TestTriggerConnectionRequest, TestTriggerConnectionResponse};
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
    use rdkafka::{Offset, TopicPartitionList};

    type Triggers = TriggerServiceClient<tonic::transport::Channel>;

    async fn test_connection(
        triggers: &mut Triggers,
        request: TestTriggerConnectionRequest,
    ) -> Result<TestTriggerConnectionResponse, tonic::Status> {
        triggers.test_trigger_connection(request).await.map(|r| r.into_inner())
    }

    fn given(trigger: Trigger) -> TestTriggerConnectionRequest {
        TestTriggerConnectionRequest { trigger: Some(trigger), ..Default::default() }
    }

    /// `trigger` failing fast: a 2 s connect timeout.
    fn quick(mut trigger: Trigger) -> Trigger {
        trigger.kafka.as_mut().unwrap().connect_timeout_seconds = Some(2);
        trigger
    }

    /// `trigger` logging in as alice with `password`.
    fn with_sasl(mut trigger: Trigger, mechanism: SaslMechanism, password: &str) -> Trigger {
        let k = trigger.kafka.as_mut().unwrap();
        (k.sasl, k.username, k.password) = (mechanism as i32, "alice".into(), password.into());
        trigger
    }

    /// Commits `offsets` (partition, next offset) for `group` on `topic`, as a
    /// consumer of the group that joined no generation would.
    fn commit(brokers: &str, group: &str, topic: &str, offsets: &[(i32, i64)]) {
        let consumer: BaseConsumer = kt_kafka_testing::consume::consumer_config(brokers, group).create().unwrap();
        let mut list = TopicPartitionList::new();
        for &(partition, offset) in offsets {
            list.add_partition_offset(topic, partition, Offset::Offset(offset)).unwrap();
        }
        consumer.commit(&list, CommitMode::Sync).unwrap();
    }

    async fn started(db: &TestDb) -> (TestControlPlane, TestNode, Triggers) {
        let cp = TestControlPlane::start(db, ControlPlaneOptions::default()).await.unwrap();
        let node = TestNode::start(db, &cp.url(), |_| {}).await;
        let triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
        (cp, node, triggers)
    }

    /// Until a node has joined, a test is UNAVAILABLE; then it answers.
    async fn first_answer(
        triggers: &mut Triggers,
        request: TestTriggerConnectionRequest,
    ) -> TestTriggerConnectionResponse {
        wait_for("a node to run the connection test", WAIT, || {
            let (mut triggers, request) = (triggers.clone(), request.clone());
            async move {
                match test_connection(&mut triggers, request).await {
                    Ok(answer) => Some(answer),
                    Err(status) if status.code() == Code::Unavailable => None,
                    Err(status) => panic!("{status:?}"),
                }
            }
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn test_a_connection_test_reports_brokers_partitions_watermarks_and_committed_offsets() {
        let kafka = kt_kafka_testing::MockKafka::new(2).unwrap();
        kafka.create_topic("orders", 3).unwrap();
        let brokers = kafka.bootstrap_servers();
        let messages = (0..9).map(|i| kt_kafka_testing::TestMessage::new(format!("m{i}")).partition(i % 3));
        kt_kafka_testing::produce::produce_to(&brokers, "orders", messages).await.unwrap();
        let db = TestDb::create().await.unwrap();
        let (_cp, node, mut triggers) = started(&db).await;

        // A stored trigger, disabled so that no pipeline moves its group's
        // offsets, tested by id: its own group's commits are reported.
        let mut trigger = sample_trigger("orders", &brokers, "orders");
        trigger.kafka.as_mut().unwrap().hosts = brokers.split(',').map(str::to_owned).collect();
        trigger.enabled = Some(false);
        trigger.kafka.as_mut().unwrap().group_id = "orders-group".into();
        let stored =
            triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner();
        commit(&brokers, "orders-group", "orders", &[(0, 2), (2, 3)]);
        let by_id = TestTriggerConnectionRequest { id: stored.id.clone(), ..Default::default() };
        let answer = first_answer(&mut triggers, by_id).await;
        let brokers_one = brokers.split(',').next().unwrap();
        assert!(answer.ok, "{answer:?}");
        assert_eq!(answer.failure, ConnectionFailure::Unspecified as i32);
        assert_eq!(answer.node_id, node.node_id);
        assert_eq!(answer.brokers.len(), 2, "{:?}", answer.brokers);
        let [topic] = answer.topics.as_slice() else { panic!("{:?}", answer.topics) };
        assert_eq!(topic.name, "orders");
        let found: Vec<_> = topic
            .partitions
            .iter()
            .map(|p| (p.partition, p.low_watermark, p.high_watermark, p.committed_offset))
            .collect();
        assert_eq!(found, [(0, 0, 3, Some(2)), (1, 0, 3, None), (2, 0, 3, Some(3))]);

        // The same, given rather than stored (one bootstrap broker is
        // enough): a fresh group with no commits.
        let answer = test_connection(&mut triggers, given(sample_trigger("x", brokers_one, "orders"))).await.unwrap();
        assert!(answer.ok, "{answer:?}");
        assert!(answer.topics[0].partitions.iter().all(|p| p.committed_offset.is_none()), "{answer:?}");
        let stored_after: Vec<String> =
            sqlx::query_scalar("SELECT name FROM triggers").fetch_all(&db.pool().await.unwrap()).await.unwrap();
        assert_eq!(stored_after, ["orders"], "a given trigger is never stored");

        // A topic the cluster does not have.
        let answer = test_connection(&mut triggers, given(quick(sample_trigger("x", brokers_one, "no-such-topic"))))
            .await
            .unwrap();
        assert!(!answer.ok);
        assert_eq!(answer.failure(), ConnectionFailure::TopicMissing, "{answer:?}");
        assert!(answer.error.contains("no-such-topic"), "{}", answer.error);
    }

    #[tokio::test]
    async fn test_a_connection_test_names_a_refused_port_an_unknown_host_and_a_failed_sasl_handshake() {
        let kafka = kt_kafka_testing::MockKafka::new(1).unwrap();
        kafka.create_topic("orders", 1).unwrap();
        let db = TestDb::create().await.unwrap();
        let (_cp, _node, mut triggers) = started(&db).await;

        // Port 9 (discard) on loopback: nothing listens there.
        let refused = given(quick(sample_trigger("x", "127.0.0.1:9", "orders")));
        let answer = first_answer(&mut triggers, refused).await;
        assert!(!answer.ok);
        assert_eq!(answer.failure(), ConnectionFailure::Refused, "{answer:?}");
        assert!(answer.elapsed_ms < 10_000, "answered within the connect timeout: {answer:?}");

        // A name that cannot resolve (`.invalid` never does).
        let answer = test_connection(&mut triggers, given(quick(sample_trigger("x", "kafka.invalid:9092", "orders"))))
            .await
            .unwrap();
        assert_eq!(answer.failure(), ConnectionFailure::Dns, "{answer:?}");

        // SASL towards a broker that speaks none (librdkafka's mock).
        let sasl = with_sasl(
            quick(sample_trigger("x", &kafka.bootstrap_servers(), "orders")),
            SaslMechanism::Plain,
            "not-her-password",
        );
        let answer = test_connection(&mut triggers, given(sasl)).await.unwrap();
        assert!(!answer.ok);
        assert_eq!(answer.failure(), ConnectionFailure::SaslAuthentication, "{answer:?}");
        assert!(!answer.error.contains("not-her-password"), "no secret in the answer: {}", answer.error);
    }

    #[tokio::test]
    async fn test_a_connection_test_without_a_node_or_a_target_is_refused() {
        let db = TestDb::create().await.unwrap();
        let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
        let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());

        let status = test_connection(&mut triggers, given(sample_trigger("x", "b:9092", "t"))).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("no data-plane node"), "{status:?}");

        let neither = test_connection(&mut triggers, TestTriggerConnectionRequest::default()).await.unwrap_err();
        assert_eq!(neither.code(), Code::InvalidArgument, "{neither:?}");
        let both = TestTriggerConnectionRequest {
            id: uuid::Uuid::now_v7().to_string(),
            trigger: Some(sample_trigger("x", "b:9092", "t")),
        };
        assert_eq!(test_connection(&mut triggers, both).await.unwrap_err().code(), Code::InvalidArgument);

        let mut invalid = sample_trigger("x", "b:9092", "t");
        invalid.kafka.as_mut().unwrap().topics.clear();
        let status = test_connection(&mut triggers, given(invalid)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("trigger.kafka.topics"), "{status:?}");

        let missing = TestTriggerConnectionRequest { id: uuid::Uuid::now_v7().to_string(), ..Default::default() };
        assert_eq!(test_connection(&mut triggers, missing).await.unwrap_err().code(), Code::NotFound);
    }

    /// DESIGN §5's separate broker process: one open, one that requires
    /// SASL and knows no user.
    #[tokio::test]
    async fn test_a_connection_test_against_tansu_lists_its_partitions_and_names_wrong_credentials() {
        use kt_kafka_testing::Tansu;
        let tansu = Tansu::start().unwrap();
        tansu.create_topic("orders", 2).unwrap();
        // One at a time: Tansu counts a batch of several as one offset.
        for i in 0..3 {
            let message = kt_kafka_testing::TestMessage::new(format!("m{i}")).partition(0);
            kt_kafka_testing::produce::produce_to(&tansu.bootstrap_servers(), "orders", [message]).await.unwrap();
        }
        let locked = Tansu::start_with(&["--authentication"]).unwrap();
        let db = TestDb::create().await.unwrap();
        let (_cp, _node, mut triggers) = started(&db).await;

        let answer =
            first_answer(&mut triggers, given(sample_trigger("x", &tansu.bootstrap_servers(), "orders"))).await;
        assert!(answer.ok, "{answer:?}");
        assert_eq!(answer.brokers.len(), 1);
        assert_eq!(answer.brokers[0].port, i32::from(tansu.port()));
        let found: Vec<_> = answer.topics[0].partitions.iter().map(|p| (p.partition, p.high_watermark)).collect();
        assert_eq!(found, [(0, 3), (1, 0)]);

        let wrong = with_sasl(
            quick(sample_trigger("x", &locked.bootstrap_servers(), "orders")),
            SaslMechanism::ScramSha256,
            "wrong-password",
        );
        let answer = test_connection(&mut triggers, given(wrong)).await.unwrap();
        assert!(!answer.ok);
        assert_eq!(answer.failure(), ConnectionFailure::SaslAuthentication, "{answer:?}");
        assert!(answer.error.contains("authentication failed"), "{}", answer.error);
        assert!(answer.elapsed_ms < 2_000, "a refused login answers before the connect timeout: {answer:?}");
    }
}
