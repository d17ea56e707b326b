//! The webhook target policy (issue #10 item 6) end to end: the control plane
//! refuses triggers whose webhook reaches a denied range, and a node refuses
//! to connect to one, with an error that does not tell an open port from a
//! closed one.

mod work_order_checks;

use kt_common::webhook_policy::{WebhookPolicy, DEFAULT_DENY_CIDRS};
use kt_data_plane::delivery::target_policy::REFUSED;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::{sample_trigger, wait_for, ControlPlaneOptions, TestControlPlane, TestDb, TestNode};
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;
use work_order_checks::*;

const METADATA_URLS: [&str; 2] = ["http://169.254.169.254/latest", "http://[::ffff:169.254.169.254]/"];

fn with_url(name: &str, url: &str) -> Trigger {
    let mut t = sample_trigger(name, "localhost:9092", "orders");
    t.webhook.as_mut().unwrap().url = url.into();
    t
}

fn policy(deny: &str, allow: &str) -> ControlPlaneOptions {
    ControlPlaneOptions { webhook_policy: Some(WebhookPolicy::parse(deny, allow).unwrap()), ..Default::default() }
}

/// The status must be InvalidArgument with one violation, on the URL, that
/// names the policy and the flag that allows the address.
fn assert_refused(status: &tonic::Status, what: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    let violations = status.get_details_bad_request().expect("field violations").field_violations;
    assert_eq!(violations.len(), 1, "{what}: {violations:?}");
    assert_eq!(violations[0].field, "trigger.webhook.url", "{what}");
    let why = &violations[0].description;
    assert!(
        why.contains("refused by the webhook target policy") && why.contains("--webhook-allow-cidrs"),
        "{what}: {why}"
    );
}

#[tokio::test]
async fn test_metadata_targets_are_refused_unless_allowed() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());
    for (i, url) in METADATA_URLS.iter().enumerate() {
        let status = client.create_trigger(CreateTriggerRequest { trigger: Some(with_url(&format!("m{i}"), url)) });
        assert_refused(&status.await.unwrap_err(), url);
    }

    // An update to a refused URL is refused too, by mask or whole.
    let created = client.create_trigger(CreateTriggerRequest { trigger: Some(with_url("ok", "http://127.0.0.1:9/")) });
    let created = created.await.unwrap().into_inner();
    let mut moved = created.clone();
    moved.webhook.as_mut().unwrap().url = METADATA_URLS[0].into();
    for mask in [None, Some(prost_types::FieldMask { paths: vec!["webhook.url".into()] })] {
        let request = UpdateTriggerRequest { trigger: Some(moved.clone()), update_mask: mask.clone() };
        assert_refused(&client.update_trigger(request).await.unwrap_err(), &format!("update, mask {mask:?}"));
    }
    let stored = client.get_trigger(GetTriggerRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(stored, created);
    cp.stop().await.unwrap();

    // `--webhook-allow-cidrs 169.254.169.254/32` lets them through.
    let cp = TestControlPlane::start(&db, policy(DEFAULT_DENY_CIDRS, "169.254.169.254/32")).await.unwrap();
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());
    for (i, url) in METADATA_URLS.iter().enumerate() {
        let request = CreateTriggerRequest { trigger: Some(with_url(&format!("m{i}"), url)) };
        client.create_trigger(request).await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
    }
    let request = UpdateTriggerRequest { trigger: Some(moved), update_mask: None };
    client.update_trigger(request).await.unwrap();
}

#[tokio::test]
async fn test_host_names_are_checked_by_their_dns_answers() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, policy("127.0.0.0/8,::1/128", "")).await.unwrap();
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());
    let status =
        client.create_trigger(CreateTriggerRequest { trigger: Some(with_url("lo", "http://localhost:8080/")) });
    let status = status.await.unwrap_err();
    assert_refused(&status, "localhost");
    let why = &status.get_details_bad_request().unwrap().field_violations[0].description;
    assert!(why.starts_with("`localhost` resolves to 127.0.0.1"), "{why}");

    // A name that does not resolve now is left to the nodes' check.
    let request = CreateTriggerRequest { trigger: Some(with_url("later", "http://hooks.does-not-exist.invalid/")) };
    client.create_trigger(request).await.unwrap();
}

/// Waits for a failed work order of `trigger`: its state and last error.
async fn failed_work_order(s: &Stack, trigger: Uuid) -> (String, Option<String>) {
    wait_for("a failed work order", WAIT, || async {
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT state, last_error FROM work_orders WHERE trigger_id = $1 AND state = 'failed'")
                .bind(trigger)
                .fetch_optional(&s.pool)
                .await
                .unwrap();
        row
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn test_a_node_refuses_to_connect_to_a_denied_target_listening_or_not() {
    let s = Stack::start("denied", 1).await;
    // The control plane has the default policy and accepts localhost; the
    // node denies loopback.
    let _node = TestNode::start(&s.db, &s.cp().url(), |c| {
        c.webhook_policy = WebhookPolicy::parse("127.0.0.0/8,::1/128", "").unwrap();
    })
    .await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut client = TriggerServiceClient::new(s.cp().channel().await.unwrap());
    let mut triggers = Vec::new();
    for (name, port) in [("listening", s.receiver.addr.port()), ("closed", closed)] {
        let mut t = sample_trigger(name, &s.kafka.bootstrap_servers(), "denied");
        t.webhook.as_mut().unwrap().url = format!("http://localhost:{port}/");
        t.retry = Some(retry(2, 20, 50));
        let id = client.create_trigger(CreateTriggerRequest { trigger: Some(t) }).await.unwrap().into_inner().id;
        triggers.push(Uuid::parse_str(&id).unwrap());
    }
    s.produce("denied", messages_for(Some("k"), 0, 1)).await;

    for trigger in triggers {
        let (state, error) = failed_work_order(&s, trigger).await;
        assert_eq!((state.as_str(), error.as_deref()), ("failed", Some(REFUSED)), "trigger {trigger}");
    }
    assert!(s.receiver.deliveries().is_empty(), "the receiver got {:?}", s.receiver.deliveries());
}
