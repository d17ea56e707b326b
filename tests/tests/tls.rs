//! TLS on the control plane's listener and on the node's connection to it,
//! and mutual TLS for nodes (`--node-client-ca`): grpcurl and the generated
//! client over TLS, real nodes delivering over TLS and mutual TLS, nodes
//! refused without the right certificate, and start-up errors. The tests
//! make their certificates themselves (`tls/pki.rs`).
//!
//! The process tests run `target/<profile>/{control-plane,data-plane}`:
//! build them first (`cargo build -p kt-control-plane -p kt-data-plane`).

#[path = "tls/pki.rs"]
mod pki;

use std::time::Duration;

use kt_control_plane::tls::ServerTls;
use kt_data_plane::control_plane::ClientTls;
use kt_kafka_testing::mock::MockKafka;
use kt_kafka_testing::produce::{keyed_messages, produce_to};
use kt_proto::internal::node_service_client::NodeServiceClient;
use kt_proto::internal::work_service_client::WorkServiceClient;
use kt_proto::internal::{node_message, worker_message, Hello, NodeMessage, WorkerHello, WorkerMessage};
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::{CreateTriggerRequest, GetTriggerRequest, ListTriggersRequest, WebhookTarget};
use kt_tests::process::{DataPlaneOptions, DataPlaneProcess};
use kt_tests::webhook::WebhookReceiver;
use kt_tests::{
    sample_trigger, wait_for, workspace_binary, BearerToken, ControlPlaneOptions, TestControlPlane, TestDb, TestNode,
    TEST_NODE_TOKEN,
};
use pki::{Issued, Pki};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

/// A control plane serving TLS with `pki`'s server certificate; with
/// `mutual`, nodes need a client certificate from `pki`'s CA. `node_token`:
/// as [`ControlPlaneOptions::node_token`].
async fn tls_control_plane(db: &TestDb, pki: &Pki, mutual: bool, node_token: Option<&str>) -> TestControlPlane {
    let server = pki.server();
    let tls = ServerTls { cert: server.cert, key: server.key, node_client_ca: mutual.then(|| pki.ca()) };
    let opts = ControlPlaneOptions { tls: Some(tls), node_token: node_token.map(Into::into), ..Default::default() };
    TestControlPlane::start(db, opts).await.unwrap()
}

/// A TLS channel trusting `pki`'s CA, presenting `identity` if given.
async fn tls_channel(cp: &TestControlPlane, pki: &Pki, identity: Option<&Issued>) -> anyhow::Result<Channel> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki.ca_pem()));
    if let Some(issued) = identity {
        tls = tls.identity(issued.identity());
    }
    Ok(Channel::from_shared(cp.url())?.tls_config(tls)?.connect().await?)
}

type Authed = InterceptedService<Channel, BearerToken>;

async fn node_client(
    cp: &TestControlPlane,
    pki: &Pki,
    identity: Option<&Issued>,
    token: &str,
) -> NodeServiceClient<Authed> {
    NodeServiceClient::new(InterceptedService::new(
        tls_channel(cp, pki, identity).await.unwrap(),
        BearerToken::new(token),
    ))
}

/// Opens a node session as `node_id`; the status it is refused with, if
/// it is.
async fn open_session(client: &mut NodeServiceClient<Authed>, node_id: &str) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    let hello = Hello {
        node_id: node_id.into(),
        schema_version: kt_common::db::expected_schema_version(),
        version: "test".into(),
    };
    tx.send(NodeMessage { msg: Some(node_message::Msg::Hello(hello)) }).await.unwrap();
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    // Admitted: the first assignment comes.
    inbound.message().await?.expect("a first message");
    Ok(())
}

/// Opens a work stream as `node_id`; the status it is refused with, if it is.
async fn open_work(
    cp: &TestControlPlane,
    pki: &Pki,
    identity: Option<&Issued>,
    token: &str,
    node_id: &str,
) -> Result<(), tonic::Status> {
    let channel = tls_channel(cp, pki, identity).await.unwrap();
    let mut client = WorkServiceClient::new(InterceptedService::new(channel, BearerToken::new(token)));
    let (tx, rx) = mpsc::channel(4);
    let hello = WorkerHello { node_id: node_id.into() };
    tx.send(WorkerMessage { msg: Some(worker_message::Msg::Hello(hello)) }).await.unwrap();
    client.work(ReceiverStream::new(rx)).await.map(drop)
}

async fn grpcurl(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(kt_tests::readme::grpcurl().unwrap())
        .args(["-connect-timeout", "5"])
        .args(args)
        .output()
        .await
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
async fn test_grpcurl_lists_and_calls_over_tls_and_plaintext_is_refused() {
    let db = TestDb::create().await.unwrap();
    let pki = Pki::new("grpcurl");
    let cp = tls_control_plane(&db, &pki, false, None).await;
    let mut triggers = TriggerServiceClient::new(tls_channel(&cp, &pki, None).await.unwrap());
    triggers
        .create_trigger(CreateTriggerRequest { trigger: Some(sample_trigger("over-tls", "b:9092", "t")) })
        .await
        .unwrap();
    let ca = pki.ca().display().to_string();
    let addr = cp.addr.to_string();

    let (ok, out) = grpcurl(&["-cacert", &ca, &addr, "list"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("kafka_triggers.v1.TriggerService"), "{out}");
    assert!(out.contains("kafka_triggers.internal.v1.NodeService"), "{out}");

    let (ok, out) =
        grpcurl(&["-cacert", &ca, "-d", "{}", &addr, "kafka_triggers.v1.TriggerService/ListTriggers"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("\"over-tls\""), "{out}");

    let (ok, out) = grpcurl(&["-plaintext", &addr, "list"]).await;
    assert!(!ok, "plaintext grpcurl reached a TLS listener:\n{out}");
    // Nor does a client that does not trust the server's CA.
    let other = Pki::new("untrusted");
    let (ok, out) = grpcurl(&["-cacert", &other.ca().display().to_string(), &addr, "list"]).await;
    assert!(!ok, "grpcurl trusted a certificate of another CA:\n{out}");
}

#[tokio::test]
async fn test_generated_client_creates_and_gets_a_trigger_over_tls() {
    let db = TestDb::create().await.unwrap();
    let pki = Pki::new("client");
    let cp = tls_control_plane(&db, &pki, false, None).await;
    assert!(cp.url().starts_with("https://127.0.0.1:"), "{}", cp.url());
    let mut client = TriggerServiceClient::new(tls_channel(&cp, &pki, None).await.unwrap());
    let created = client
        .create_trigger(CreateTriggerRequest { trigger: Some(sample_trigger("tls", "b:9092", "t")) })
        .await
        .unwrap()
        .into_inner();
    let got = client.get_trigger(GetTriggerRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.name, "tls");
    assert_eq!(got.id, created.id);

    // A plaintext client gets nothing from the TLS listener.
    let plain = async {
        let channel = Channel::from_shared(format!("http://{}", cp.addr))?.connect().await?;
        TriggerServiceClient::new(channel).list_triggers(ListTriggersRequest::default()).await?;
        anyhow::Ok(())
    };
    assert!(tokio::time::timeout(Duration::from_secs(10), plain).await.expect("no hang").is_err());
}

/// Mock Kafka with `topic`, a webhook receiver, and a trigger from one to
/// the other created over TLS.
struct Pipeline {
    kafka: MockKafka,
    receiver: WebhookReceiver,
    topic: String,
}

async fn pipeline(cp: &TestControlPlane, pki: &Pki, topic: &str) -> Pipeline {
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic(topic, 1).unwrap();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut trigger = sample_trigger(&format!("t-{topic}"), &kafka.bootstrap_servers(), topic);
    trigger.webhook = Some(WebhookTarget { url: receiver.url(), timeout_ms: Some(2_000), ..Default::default() });
    let mut client = TriggerServiceClient::new(tls_channel(cp, pki, None).await.unwrap());
    client.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap();
    Pipeline { kafka, receiver, topic: topic.into() }
}

impl Pipeline {
    /// Produces `n` messages and waits until each was delivered and its
    /// work order succeeded.
    async fn deliver(&self, db: &TestDb, n: usize) {
        produce_to(&self.kafka.bootstrap_servers(), &self.topic, keyed_messages(n, 2)).await.unwrap();
        self.receiver.wait_for_deliveries(n, WAIT).await.unwrap();
        let pool = db.pool().await.unwrap();
        wait_for("the work orders to succeed", WAIT, || async {
            let done: i64 = sqlx::query_scalar("SELECT count(*) FROM work_orders WHERE state = 'success'")
                .fetch_one(&pool)
                .await
                .ok()?;
            (done == n as i64).then_some(())
        })
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn test_a_node_delivers_over_tls() {
    kt_tests::capture_logs("warn");
    let db = TestDb::create().await.unwrap();
    let pki = Pki::new("node");
    let cp = tls_control_plane(&db, &pki, false, None).await;
    let p = pipeline(&cp, &pki, "tls-orders").await;
    let _node = TestNode::start(&db, &cp.url(), |c| {
        c.tls = ClientTls { ca: Some(pki.ca()), ..ClientTls::default() };
        c.workers = 4;
    })
    .await;
    p.deliver(&db, 5).await;
}

#[tokio::test]
async fn test_a_node_process_delivers_over_mutual_tls_and_nodes_without_the_right_certificate_are_refused() {
    let db = TestDb::create().await.unwrap();
    let pki = Pki::new("mtls-node");
    let cp = tls_control_plane(&db, &pki, true, None).await;
    let p = pipeline(&cp, &pki, "mtls-orders").await;
    let node = |node_id: &str, cert: Option<&Issued>| {
        let mut opts = DataPlaneOptions::new(&db.url, &cp.url(), node_id);
        opts.workers = 4;
        opts.env.push(("KT_TLS_CA".into(), pki.ca().display().to_string()));
        if let Some(cert) = cert {
            opts.env.push(("KT_TLS_CERT".into(), cert.cert.display().to_string()));
            opts.env.push(("KT_TLS_KEY".into(), cert.key.display().to_string()));
        }
        DataPlaneProcess::spawn(&opts).unwrap()
    };

    let good = node("node-mtls-1", Some(&pki.client("node-1", "node-mtls-1", &[])));
    p.deliver(&db, 5).await;
    good.ensure_running().unwrap();

    let impostor = node("node-mtls-2", Some(&pki.client("node-other", "node-mtls-1", &[])));
    let anonymous = node("node-mtls-3", None);
    for (process, says) in [(&impostor, "PermissionDenied"), (&anonymous, "Unauthenticated")] {
        wait_for(&format!("{} to be refused with {says}", process.node_id), WAIT, || async {
            (!process.lines_containing(says).is_empty()).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; its output:\n{}", process.output()));
    }
    let refused = impostor.lines_containing("PermissionDenied").join("\n");
    assert!(refused.contains("node-mtls-2") && refused.contains("node-mtls-1"), "{refused}");
    // The refused nodes hold no session: only the good node is registered.
    let pool = db.pool().await.unwrap();
    let joined: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT node_id FROM events WHERE kind = 'node_joined' ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(joined, ["node-mtls-1"]);
}

#[tokio::test]
async fn test_mutual_tls_binds_the_node_id_to_the_certificate_on_both_streams() {
    let db = TestDb::create().await.unwrap();
    let pki = Pki::new("binding");
    let cp = tls_control_plane(&db, &pki, true, None).await;
    let right = pki.client("right", "node-a", &[]);
    let wrong = pki.client("wrong", "node-b", &[]);
    let by_dns = pki.client("dns", "some-host", &["node-c.nodes.test"]);
    let token = TEST_NODE_TOKEN;

    // No certificate.
    let mut client = node_client(&cp, &pki, None, token).await;
    let status = open_session(&mut client, "node-a").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("client certificate"), "{status:?}");
    assert_eq!(open_work(&cp, &pki, None, token, "node-a").await.unwrap_err().code(), Code::Unauthenticated);

    // Another node's certificate.
    let mut client = node_client(&cp, &pki, Some(&wrong), token).await;
    let status = open_session(&mut client, "node-a").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("`node-a`") && status.message().contains("node-b"), "{status:?}");
    assert!(!status.message().contains(token), "{status:?}");
    let status = open_work(&cp, &pki, Some(&wrong), token, "node-a").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // The node's own certificate, by CN or by DNS name.
    let mut client = node_client(&cp, &pki, Some(&right), token).await;
    open_session(&mut client, "node-a").await.unwrap();
    open_work(&cp, &pki, Some(&right), token, "node-a").await.unwrap();
    let mut client = node_client(&cp, &pki, Some(&by_dns), token).await;
    open_session(&mut client, "node-c.nodes.test").await.unwrap();
    assert_eq!(open_session(&mut client, "some-host.nodes.test").await.unwrap_err().code(), Code::PermissionDenied);

    // With a node token as well, a node needs both.
    let status = open_session(&mut node_client(&cp, &pki, Some(&right), "").await, "node-a").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A certificate of another CA does not get through the handshake.
    let other = Pki::new("other-ca");
    let foreign = other.client("foreign", "node-a", &[]);
    let refused = async {
        let channel = tls_channel(&cp, &pki, Some(&foreign)).await?;
        let mut client = NodeServiceClient::new(InterceptedService::new(channel, BearerToken::new(token)));
        open_session(&mut client, "node-a").await?;
        anyhow::Ok(())
    };
    assert!(refused.await.is_err(), "a certificate of another CA was accepted");

    // The public API on the same listener needs no client certificate.
    let mut api = TriggerServiceClient::new(tls_channel(&cp, &pki, None).await.unwrap());
    api.list_triggers(ListTriggersRequest::default()).await.unwrap();
}

#[tokio::test]
async fn test_mutual_tls_alone_authenticates_nodes() {
    let db = TestDb::create().await.unwrap();
    let pki = Pki::new("mtls-only");
    // No node token: the control plane starts, since certificates authenticate nodes.
    let cp = tls_control_plane(&db, &pki, true, Some("")).await;
    let right = pki.client("right", "node-a", &[]);
    open_session(&mut node_client(&cp, &pki, Some(&right), "").await, "node-a").await.unwrap();
    let status = open_session(&mut node_client(&cp, &pki, None, "").await, "node-a").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // TLS without client certificates authenticates nobody: refused at start.
    let server = pki.server();
    let tls = ServerTls { cert: server.cert, key: server.key, node_client_ca: None };
    let opts = ControlPlaneOptions { tls: Some(tls), node_token: Some(String::new()), ..Default::default() };
    let error = TestControlPlane::start(&db, opts).await.err().expect("refused").to_string();
    assert!(error.contains("refusing to start without node authentication"), "{error}");
}

/// Runs a binary of the workspace with `args` and only `env` (plus a
/// database nobody listens on); returns its exit code and output.
async fn run_binary(name: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(workspace_binary(name).unwrap())
            .env_clear()
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nothing")
            .env("RUST_LOG", "error")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .args(args)
            .output(),
    )
    .await
    .expect("the binary exits on its own")
    .unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
async fn test_tls_configuration_errors_stop_the_planes_at_start_up() {
    let pki = Pki::new("errors");
    let server = pki.server();
    let (cert, key, ca) =
        (server.cert.display().to_string(), server.key.display().to_string(), pki.ca().display().to_string());
    let other_key = pki.client("other", "x", &[]).key.display().to_string();
    let token = [("KT_NODE_TOKEN", "t")];

    // Usage errors (exit 2) name the missing flag.
    for (args, missing) in [
        (vec!["--tls-cert", cert.as_str()], "--tls-key"),
        (vec!["--tls-key", key.as_str()], "--tls-cert"),
        (vec!["--node-client-ca", ca.as_str()], "--tls-cert"),
    ] {
        let (code, out) = run_binary("control-plane", &args, &token).await;
        assert_eq!(code, Some(2), "{args:?}: {out}");
        assert!(out.contains(missing), "{args:?}: {out}");
    }
    let (code, out) = run_binary("data-plane", &["--tls-cert", &cert], &[]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--tls-key"), "{out}");

    // Files that cannot be read or hold the wrong thing name their flag,
    // before the control plane touches the database.
    for (args, says) in [
        (
            vec!["--tls-cert", "/nonexistent/kt/cert.pem", "--tls-key", key.as_str()],
            "--tls-cert /nonexistent/kt/cert.pem",
        ),
        (vec!["--tls-cert", cert.as_str(), "--tls-key", cert.as_str()], "--tls-key"),
        (vec!["--tls-cert", key.as_str(), "--tls-key", key.as_str()], "--tls-cert"),
        (vec!["--tls-cert", cert.as_str(), "--tls-key", other_key.as_str()], "invalid TLS configuration"),
        (
            vec!["--tls-cert", cert.as_str(), "--tls-key", key.as_str(), "--node-client-ca", "/nonexistent/kt/ca.pem"],
            "--node-client-ca /nonexistent/kt/ca.pem",
        ),
    ] {
        let (code, out) = run_binary("control-plane", &args, &token).await;
        assert_eq!(code, Some(1), "{args:?}: {out}");
        assert!(out.contains(says), "{args:?} should say `{says}`: {out}");
        assert!(!out.contains("database"), "{args:?} went on to the database: {out}");
    }

    let (code, out) = run_binary(
        "data-plane",
        &["--control-plane-url", "https://127.0.0.1:1", "--tls-ca", "/nonexistent/kt/ca.pem"],
        &[],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("--tls-ca /nonexistent/kt/ca.pem"), "{out}");
    let (code, out) =
        run_binary("data-plane", &["--control-plane-url", "http://127.0.0.1:1", "--tls-ca", &ca], &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("need https://"), "{out}");
}
