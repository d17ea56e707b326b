//! TriggerService end to end: a real control plane on port 0, a real
//! database, generated clients over real gRPC.

use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::{sample_trigger, ControlPlaneOptions, TestControlPlane, TestDb};
use tonic::Code;
use tonic_types::StatusExt;

async fn setup(opts: ControlPlaneOptions) -> (TestDb, TestControlPlane) {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, opts).await.unwrap();
    (db, cp)
}

fn create(t: Trigger) -> CreateTriggerRequest {
    CreateTriggerRequest { trigger: Some(t) }
}

fn violations(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn test_trigger_lifecycle_over_grpc() {
    let (_db, cp) = setup(ControlPlaneOptions::default()).await;
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());

    let created =
        client.create_trigger(create(sample_trigger("orders", "localhost:9092", "orders"))).await.unwrap().into_inner();
    assert_eq!(created.generation, 1);
    assert_eq!(created.enabled, Some(true), "omitted means enabled");
    let group = created.kafka.as_ref().unwrap().group_id.clone();
    assert!(group.starts_with("kafka-triggers-"), "{group}");
    assert_eq!(uuid::Uuid::parse_str(&created.id).unwrap().get_version_num(), 7);

    let got = client.get_trigger(GetTriggerRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got, created);

    // Update only the topics through a field mask.
    let mut patch = Trigger { id: created.id.clone(), ..Default::default() };
    patch.kafka = Some(KafkaSource { topics: vec!["orders".into(), "refunds".into()], ..Default::default() });
    let updated = client
        .update_trigger(UpdateTriggerRequest {
            trigger: Some(patch),
            update_mask: Some(prost_types::FieldMask { paths: vec!["kafka.topics".into()] }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.kafka.as_ref().unwrap().topics, ["orders", "refunds"]);
    assert_eq!(updated.kafka.as_ref().unwrap().hosts, ["localhost:9092"]);
    assert_eq!(updated.kafka.as_ref().unwrap().group_id, group);
    assert_eq!(updated.generation, 2);

    // A full replacement echoing the trigger back unchanged is a no-op.
    let same = client
        .update_trigger(UpdateTriggerRequest { trigger: Some(updated.clone()), update_mask: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.generation, 2);

    // group_id is immutable.
    let mut moved = updated.clone();
    moved.kafka.as_mut().unwrap().group_id = "elsewhere".into();
    let err =
        client.update_trigger(UpdateTriggerRequest { trigger: Some(moved), update_mask: None }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), ["trigger.kafka.group_id"]);

    let disabled = client.disable_trigger(DisableTriggerRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(disabled.enabled, Some(false));
    assert_eq!(disabled.generation, 3);
    let again = client.disable_trigger(DisableTriggerRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(again.generation, 3, "disabling twice changes nothing");
    let enabled = client.enable_trigger(EnableTriggerRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(enabled.enabled, Some(true));
    assert_eq!(enabled.generation, 4);

    client.delete_trigger(DeleteTriggerRequest { id: created.id.clone() }).await.unwrap();
    let err = client.get_trigger(GetTriggerRequest { id: created.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client.delete_trigger(DeleteTriggerRequest { id: created.id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn test_list_pages_through_every_trigger_once() {
    let (_db, cp) = setup(ControlPlaneOptions::default()).await;
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());
    let mut ids = Vec::new();
    for i in 0..5 {
        let t = client.create_trigger(create(sample_trigger(&format!("t{i}"), "b:9092", "x"))).await.unwrap();
        ids.push(t.into_inner().id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_triggers(ListTriggersRequest { page_size: 2, page_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.triggers.len() <= 2);
        seen.extend(page.triggers.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);

    let err = client.list_triggers(ListTriggersRequest { page_size: -1, page_token: String::new() }).await.unwrap_err();
    assert_eq!(violations(&err), ["page_size"]);
    let err =
        client.list_triggers(ListTriggersRequest { page_size: 0, page_token: "garbage".into() }).await.unwrap_err();
    assert_eq!(violations(&err), ["page_token"]);
}

#[tokio::test]
async fn test_unknown_and_malformed_ids() {
    let (_db, cp) = setup(ControlPlaneOptions::default()).await;
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());
    let unknown = uuid::Uuid::now_v7().to_string();
    for status in [
        client.get_trigger(GetTriggerRequest { id: unknown.clone() }).await.unwrap_err(),
        client.enable_trigger(EnableTriggerRequest { id: unknown.clone() }).await.unwrap_err(),
        client.disable_trigger(DisableTriggerRequest { id: unknown.clone() }).await.unwrap_err(),
        client.delete_trigger(DeleteTriggerRequest { id: unknown.clone() }).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains(&unknown));
    }
    let mut t = sample_trigger("x", "b:1", "t");
    t.id = unknown;
    let status = client.update_trigger(UpdateTriggerRequest { trigger: Some(t), update_mask: None }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    for bad in ["", "42", "not-a-uuid"] {
        let status = client.get_trigger(GetTriggerRequest { id: bad.into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(violations(&status), ["id"]);
    }
    let status = client.create_trigger(CreateTriggerRequest { trigger: None }).await.unwrap_err();
    assert_eq!(violations(&status), ["trigger"]);
    let status = client
        .update_trigger(UpdateTriggerRequest { trigger: Some(sample_trigger("x", "b:1", "t")), update_mask: None })
        .await
        .unwrap_err();
    assert_eq!(violations(&status), ["trigger.id"]);
}

#[tokio::test]
async fn test_invalid_triggers_get_field_violations() {
    let (_db, cp) = setup(ControlPlaneOptions::default()).await;
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());
    let base = || sample_trigger("bad", "localhost:9092", "orders");
    let kafka = |f: &dyn Fn(&mut KafkaSource)| {
        let mut t = base();
        f(t.kafka.as_mut().unwrap());
        t
    };
    let cases: Vec<(Trigger, Vec<&str>)> = vec![
        (Trigger { name: "".into(), ..base() }, vec!["trigger.name"]),
        (kafka(&|k| k.hosts = vec!["::1:9092".into()]), vec!["trigger.kafka.hosts[0]"]),
        (
            kafka(&|k| k.hosts = vec!["h:70000".into(), "h:x".into()]),
            vec!["trigger.kafka.hosts[0]", "trigger.kafka.hosts[1]"],
        ),
        (kafka(&|k| k.topics = vec![]), vec!["trigger.kafka.topics"]),
        (kafka(&|k| k.topics = vec!["bad topic".into()]), vec!["trigger.kafka.topics[0]"]),
        (
            kafka(&|k| k.initial_offset_reset_policy = "yesterday".into()),
            vec!["trigger.kafka.initial_offset_reset_policy"],
        ),
        (kafka(&|k| k.sasl = SaslMechanism::Plain.into()), vec!["trigger.kafka.username", "trigger.kafka.password"]),
        (
            kafka(&|k| {
                k.username = "u".into();
                k.password = "p".into();
            }),
            vec!["trigger.kafka.username", "trigger.kafka.password"],
        ),
        (kafka(&|k| k.connect_timeout_seconds = Some(0)), vec!["trigger.kafka.connect_timeout_seconds"]),
        (
            Trigger { webhook: Some(WebhookTarget { url: "ftp://x/".into(), ..Default::default() }), ..base() },
            vec!["trigger.webhook.url"],
        ),
        (Trigger { webhook: None, kafka: None, ..base() }, vec!["trigger.kafka", "trigger.webhook"]),
        (
            Trigger {
                webhook: Some(WebhookTarget { url: "http://x/".into(), format: 9, ..Default::default() }),
                ..base()
            },
            vec!["trigger.webhook.format"],
        ),
        (Trigger { ordering: 9, ..base() }, vec!["trigger.ordering"]),
    ];
    for (input, expected) in cases {
        let status = client.create_trigger(create(input.clone())).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let got = violations(&status);
        for field in &expected {
            assert!(got.iter().any(|g| g == field), "expected {field} in {got:?} for {input:?}");
            assert!(status.message().contains(field), "message should name {field}: {}", status.message());
        }
    }
    // Nothing invalid was stored.
    let list = client.list_triggers(ListTriggersRequest::default()).await.unwrap().into_inner();
    assert!(list.triggers.is_empty());

    // Unknown update-mask paths are named too.
    let created = client.create_trigger(create(base())).await.unwrap().into_inner();
    let status = client
        .update_trigger(UpdateTriggerRequest {
            trigger: Some(created.clone()),
            update_mask: Some(prost_types::FieldMask { paths: vec!["kafka.bogus".into()] }),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&status), ["update_mask.paths[0]"]);

    // So is an unknown format set through its own mask path.
    let mut patch = created;
    patch.webhook.get_or_insert_with(Default::default).format = 9;
    let status = client
        .update_trigger(UpdateTriggerRequest {
            trigger: Some(patch),
            update_mask: Some(prost_types::FieldMask { paths: vec!["webhook.format".into()] }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violations(&status), ["trigger.webhook.format"]);
}

#[tokio::test]
async fn test_duplicate_names_are_already_exists() {
    let (_db, cp) = setup(ControlPlaneOptions::default()).await;
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());
    client.create_trigger(create(sample_trigger("same", "b:1", "t"))).await.unwrap();
    let status = client.create_trigger(create(sample_trigger("same", "b:1", "t"))).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains("same"));

    let other = client.create_trigger(create(sample_trigger("other", "b:1", "t"))).await.unwrap().into_inner();
    let status = client
        .update_trigger(UpdateTriggerRequest {
            trigger: Some(Trigger { id: other.id, name: "same".into(), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn test_api_token_is_required_when_configured() {
    let opts = ControlPlaneOptions { api_token: Some("api-secret".into()), ..Default::default() };
    let (_db, cp) = setup(opts).await;

    let mut anonymous = TriggerServiceClient::new(cp.channel().await.unwrap());
    let status = anonymous.list_triggers(ListTriggersRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("authorization"), "{}", status.message());

    let mut wrong = TriggerServiceClient::new(cp.authed("nope").await.unwrap());
    let status = wrong.create_trigger(create(sample_trigger("x", "b:1", "t"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!status.message().contains("api-secret"));

    let mut right = TriggerServiceClient::new(cp.authed("api-secret").await.unwrap());
    right.create_trigger(create(sample_trigger("x", "b:1", "t"))).await.unwrap();
    assert_eq!(right.list_triggers(ListTriggersRequest::default()).await.unwrap().into_inner().triggers.len(), 1);

    // Health stays open for probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(cp.channel().await.unwrap());
    let resp = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(resp.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

/// A delete cascades into the rows a worker writes. The worker locks its set
/// and then writes rows that share-lock the trigger row; the delete holds the
/// trigger row and waits for the set: a deadlock, whose victim Postgres picks.
/// When that is the delete, the control plane tries it again (before, the
/// caller got `UNAVAILABLE` and had to retry a delete that then succeeds).
#[tokio::test]
async fn test_a_delete_that_loses_a_deadlock_to_a_worker_is_tried_again() {
    let (db, cp) = setup(ControlPlaneOptions::default()).await;
    let pool = db.pool().await.unwrap();
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());
    let created = client.create_trigger(create(sample_trigger("doomed", "b:9092", "t"))).await.unwrap().into_inner();
    let trigger = uuid::Uuid::parse_str(&created.id).unwrap();
    let set_id: i64 =
        sqlx::query_scalar("INSERT INTO message_sets (trigger_id, topic, key) VALUES ($1, 't', 'k') RETURNING id")
            .bind(trigger)
            .fetch_one(&pool)
            .await
            .unwrap();

    // The worker holds its set; its own deadlock check comes late, so the
    // delete's finds the cycle first and is the victim.
    let mut worker = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL deadlock_timeout = '30s'").execute(&mut *worker).await.unwrap();
    sqlx::query("SELECT 1 FROM message_sets WHERE id = $1 FOR NO KEY UPDATE")
        .bind(set_id)
        .execute(&mut *worker)
        .await
        .unwrap();
    let id = created.id.clone();
    let delete = tokio::spawn(async move { client.delete_trigger(DeleteTriggerRequest { id }).await });
    kt_tests::wait_for("the delete waiting for the set row", std::time::Duration::from_secs(30), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM triggers%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await
    .unwrap();
    // A write that share-locks the trigger row (its foreign key): the cycle.
    sqlx::query("INSERT INTO message_sets (trigger_id, topic, key) VALUES ($1, 't', 'k2')")
        .bind(trigger)
        .execute(&mut *worker)
        .await
        .expect("the delete, not the worker, is the deadlock's victim");
    worker.commit().await.unwrap();

    delete.await.unwrap().expect("the delete is tried again and succeeds");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM message_sets WHERE trigger_id = $1")
        .bind(trigger)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the retried delete cascaded over the worker's rows too");
}
