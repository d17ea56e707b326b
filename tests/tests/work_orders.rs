//! Whole system: Kafka (mock cluster) → ingest → candidate sets → workers →
//! a real HTTP target. Per-key order, exactly one work order per message,
//! blocked keys that block only themselves, and the operator's way out.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use kt_kafka_testing::mock::MockKafka;
use kt_kafka_testing::produce::{keyed_messages, produce_to, TestMessage};
use kt_proto::v1::message_set_service_client::MessageSetServiceClient;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::work_order_service_client::WorkOrderServiceClient;
use kt_proto::v1::*;
use kt_tests::webhook::{Delivery, Reply, WebhookReceiver};
use kt_tests::{wait_for, ControlPlaneOptions, TestControlPlane, TestDb, TestNode};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);

struct Stack {
    db: TestDb,
    pool: PgPool,
    kafka: MockKafka,
    cp: TestControlPlane,
    receiver: WebhookReceiver,
    _node: TestNode,
}

async fn stack(topic: &str, partitions: i32) -> Stack {
    let db = TestDb::create().await.unwrap();
    let pool = db.pool().await.unwrap();
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic(topic, partitions).unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let node = TestNode::start(&db, &cp.url(), |_| {}).await;
    Stack { db, pool, kafka, cp, receiver, _node: node }
}

async fn create_trigger(s: &Stack, topic: &str, retry: RetryPolicy) -> String {
    create_trigger_with(s, topic, retry, |_| {}).await
}

async fn create_trigger_with(s: &Stack, topic: &str, retry: RetryPolicy, edit: impl FnOnce(&mut Trigger)) -> String {
    let mut client = TriggerServiceClient::new(s.cp.channel().await.unwrap());
    let mut trigger = Trigger {
        name: format!("t-{topic}"),
        kafka: Some(KafkaSource {
            hosts: vec![s.kafka.bootstrap_servers()],
            topics: vec![topic.into()],
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(WebhookTarget { url: s.receiver.url(), timeout_ms: Some(2_000), ..Default::default() }),
        retry: Some(retry),
        ..Default::default()
    };
    edit(&mut trigger);
    client.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner().id
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: Some(max_attempts),
        initial_backoff_ms: Some(20),
        max_backoff_ms: Some(100),
        max_age_seconds: 0,
    }
}

/// Successful deliveries must come per key in offset order, each message once.
fn assert_ordered_once(deliveries: &[Delivery]) {
    let mut last: BTreeMap<String, (i32, i64)> = BTreeMap::new();
    let mut seen = HashSet::new();
    for d in deliveries {
        assert!(seen.insert((d.partition(), d.offset())), "message {}:{} delivered twice", d.partition(), d.offset());
        if let Some(key) = d.key() {
            let at = (d.partition(), d.offset());
            if let Some(prev) = last.insert(key.to_owned(), at) {
                assert!(prev < at, "key {key}: {at:?} delivered after {prev:?}");
            }
        }
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// The trigger's first blocked set, once there is one.
async fn blocked_set(s: &Stack, trigger_id: &str) -> MessageSet {
    let sets = MessageSetServiceClient::new(s.cp.channel().await.unwrap());
    wait_for("a blocked set", WAIT, || {
        let (mut sets, trigger_id) = (sets.clone(), trigger_id.to_owned());
        async move {
            let request =
                ListMessageSetsRequest { trigger_id, state: MessageSetState::Blocked.into(), ..Default::default() };
            sets.list_message_sets(request).await.unwrap().into_inner().message_sets.into_iter().next()
        }
    })
    .await
    .unwrap()
}

/// The `seq` of each successful delivery from `partition`, in delivery order.
fn seqs_of(deliveries: &[Delivery], partition: i32) -> Vec<u64> {
    let seqs = deliveries.iter().filter(|d| d.partition() == partition);
    seqs.map(|d| d.body["data"]["seq"].as_u64().expect("a numbered message")).collect()
}

#[tokio::test]
async fn test_keyed_and_unkeyed_messages_become_work_orders_in_order_exactly_once() {
    let s = stack("orders", 3).await;
    create_trigger(&s, "orders", fast_retry(3)).await;
    let mut messages = keyed_messages(300, 10);
    messages.extend(keyed_messages(50, 0));
    produce_to(&s.kafka.bootstrap_servers(), "orders", messages).await.unwrap();

    s.receiver.wait_for_deliveries(350, WAIT).await.unwrap();
    let deliveries = s.receiver.successes();
    assert_eq!(deliveries.len(), 350);
    assert_ordered_once(&deliveries);
    // Every body is what DESIGN §3 promises.
    let d = &deliveries[0];
    assert!(d.body["data"]["seq"].is_number(), "{}", d.body);
    assert_eq!(d.body["request"]["topic"], "orders");
    assert!(d.body["request"]["headers"][0][0] == "seq");

    wait_for("messages deleted after success", WAIT, || async {
        (count(&s.pool, "SELECT count(*) FROM messages").await == 0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(count(&s.pool, "SELECT count(*) FROM work_orders WHERE state = 'success'").await, 350);
    assert_eq!(count(&s.pool, "SELECT count(DISTINCT (topic, partition, \"offset\")) FROM work_orders").await, 350);
    assert_eq!(count(&s.pool, "SELECT count(*) FROM events WHERE kind = 'work_order_succeeded'").await, 350);
    drop(s.db);
}

#[tokio::test]
async fn test_a_failing_key_blocks_only_itself_until_retried() {
    let s = stack("payments", 2).await;
    s.receiver.script(|body| if body["request"]["key"] == "key-0" { Reply::status(500) } else { Reply::OK });
    let trigger_id = create_trigger(&s, "payments", fast_retry(2)).await;
    produce_to(&s.kafka.bootstrap_servers(), "payments", keyed_messages(40, 4)).await.unwrap();

    // The other three keys finish while key-0 is stuck on its first message.
    wait_for("other keys delivered", WAIT, || async {
        let ok = s.receiver.successes().iter().filter(|d| d.key() != Some("key-0")).count();
        (ok == 30).then_some(())
    })
    .await
    .unwrap();
    let mut sets = MessageSetServiceClient::new(s.cp.channel().await.unwrap());
    let blocked = blocked_set(&s, &trigger_id).await;
    assert_eq!(blocked.key.as_deref(), Some(&b"key-0"[..]));
    assert_eq!(blocked.attempts, 2);
    assert!(blocked.last_error.contains("500"), "{}", blocked.last_error);
    assert_eq!(blocked.stored_messages, 10);
    let attempts_before = s.receiver.deliveries().iter().filter(|d| d.key() == Some("key-0")).count();
    assert_eq!(attempts_before, 2, "exactly max_attempts tries, then blocked");
    assert_eq!(count(&s.pool, "SELECT count(*) FROM events WHERE kind = 'set_blocked'").await, 1);

    // The operator fixes the target and retries: key-0 drains in order.
    s.receiver.script(|_| Reply::OK);
    sets.retry_message_set(RetryMessageSetRequest { id: blocked.id.clone() }).await.unwrap();
    wait_for("key-0 delivered after retry", WAIT, || async {
        let ok = s.receiver.successes().iter().filter(|d| d.key() == Some("key-0")).count();
        (ok == 10).then_some(())
    })
    .await
    .unwrap();
    assert_ordered_once(&s.receiver.successes());
    // A work order is recorded with its outcome, just after the target answered.
    wait_for("every work order recorded", WAIT, || async {
        (count(&s.pool, "SELECT count(*) FROM work_orders WHERE state = 'success'").await == 40).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(count(&s.pool, "SELECT count(*) FROM work_orders").await, 40);
}

/// Issue 12 item 1: `ordering`. A trigger ordered by partition delivers each
/// partition in offset order whatever the keys, and a failing message holds
/// back its partition only. The mode of a trigger with stored messages
/// cannot change: they would be delivered beside later ones of another mode.
#[tokio::test]
async fn test_partition_ordering_holds_back_only_the_failing_partition() {
    let s = stack("by-partition", 2).await;
    s.receiver.script(|body| match body["data"]["seq"].as_u64() {
        Some(7 | 999) => Reply::status(500),
        _ => Reply::OK,
    });
    let id = create_trigger(&s, "by-partition", fast_retry(1)).await;
    let stuck = TestMessage::new(r#"{"seq": 999}"#).key("stuck").partition(0);
    produce_to(&s.kafka.bootstrap_servers(), "by-partition", [stuck]).await.unwrap();
    let stuck = blocked_set(&s, &id).await;

    let mut triggers = TriggerServiceClient::new(s.cp.channel().await.unwrap());
    let to_partition = || UpdateTriggerRequest {
        trigger: Some(Trigger { id: id.clone(), ordering: Ordering::Partition.into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["ordering".into()] }),
    };
    let refused = triggers.update_trigger(to_partition()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("stored messages"), "{}", refused.message());
    let mut sets = MessageSetServiceClient::new(s.cp.channel().await.unwrap());
    sets.discard_message_set(DiscardMessageSetRequest { id: stuck.id }).await.unwrap();
    let updated = triggers.update_trigger(to_partition()).await.unwrap().into_inner();
    assert_eq!(updated.ordering(), Ordering::Partition);
    let shown = triggers.get_trigger(GetTriggerRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(shown.ordering(), Ordering::Partition);

    // Every message a key of its own: by key they would all run in parallel.
    let messages =
        (0..20).map(|i| TestMessage::new(format!(r#"{{"seq": {i}}}"#)).key(format!("k{i}")).partition(i % 2));
    produce_to(&s.kafka.bootstrap_servers(), "by-partition", messages.collect::<Vec<_>>()).await.unwrap();
    let blocked = blocked_set(&s, &id).await;
    assert_eq!((blocked.partition, blocked.key.as_deref()), (Some(1), None));
    assert_eq!((blocked.head_partition, blocked.stored_messages), (1, 7), "seq 7 and the six after it wait");
    wait_for("partition 0 delivered", WAIT, || async { (s.receiver.success_count() == 13).then_some(()) })
        .await
        .unwrap();
    let successes = s.receiver.successes();
    assert_eq!(seqs_of(&successes, 0), (0..20).step_by(2).collect::<Vec<_>>());
    assert_eq!(seqs_of(&successes, 1), [1, 3, 5], "nothing of partition 1 passes seq 7");

    s.receiver.script(|_| Reply::OK);
    sets.retry_message_set(RetryMessageSetRequest { id: blocked.id }).await.unwrap();
    wait_for("partition 1 drained", WAIT, || async { (seqs_of(&s.receiver.successes(), 1).len() == 10).then_some(()) })
        .await
        .unwrap();
    assert_eq!(seqs_of(&s.receiver.successes(), 1), (1..20).step_by(2).collect::<Vec<_>>());
    // A partition set has no key; each work order carries its message's.
    let expected: BTreeMap<(i32, i64), String> =
        s.receiver.successes().iter().map(|d| ((d.partition(), d.offset()), d.key().unwrap().to_owned())).collect();
    let recorded = "SELECT partition, \"offset\", convert_from(key, 'UTF8') FROM work_orders WHERE state = 'success'";
    let recorded = wait_for("every work order recorded", WAIT, || async {
        let rows: Vec<(i32, i64, String)> = sqlx::query_as(recorded).fetch_all(&s.pool).await.unwrap();
        (rows.len() == 20).then_some(rows)
    })
    .await
    .unwrap();
    assert_eq!(recorded.into_iter().map(|(p, o, k)| ((p, o), k)).collect::<BTreeMap<_, _>>(), expected);
}

/// Issue 12 item 1: an unordered trigger gives every message a set of its
/// own, so a key's messages run past one that fails.
#[tokio::test]
async fn test_unordered_trigger_lets_a_key_run_past_its_failing_message() {
    let s = stack("unordered", 1).await;
    s.receiver.script(|body| if body["data"]["seq"] == 0 { Reply::status(500) } else { Reply::OK });
    let id = create_trigger_with(&s, "unordered", fast_retry(1), |t| t.ordering = Ordering::Unordered.into()).await;
    produce_to(&s.kafka.bootstrap_servers(), "unordered", keyed_messages(20, 1)).await.unwrap();

    let blocked = blocked_set(&s, &id).await;
    assert_eq!((blocked.key.as_deref(), blocked.partition), (None, None));
    assert_eq!((blocked.head_offset, blocked.stored_messages), (0, 1));
    wait_for("the rest of the key delivered", WAIT, || async { (s.receiver.success_count() == 19).then_some(()) })
        .await
        .unwrap();
    let mut seqs = seqs_of(&s.receiver.successes(), 0);
    seqs.sort();
    assert_eq!(seqs, (1..20).collect::<Vec<_>>());
    let sql = format!("SELECT count(*) FROM work_orders WHERE trigger_id = '{id}' AND key = 'key-0'");
    wait_for("every work order recorded", WAIT, || async { (count(&s.pool, &sql).await == 20).then_some(()) })
        .await
        .unwrap();
    // Sets of delivered messages are gone; only the blocked one is left.
    assert_eq!(count(&s.pool, "SELECT count(*) FROM message_sets").await, 1);
}

#[tokio::test]
async fn test_retry_after_is_honoured_and_accepted_work_orders_wait_for_completion() {
    let s = stack("async", 1).await;
    // First message: 429 with Retry-After 1 s, then 202 (an asynchronous runner).
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    s.receiver.script(move |_| match c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
        0 => Reply { status: 429, retry_after: Some(1), delay: None },
        1 => Reply::status(202),
        _ => Reply::OK,
    });
    create_trigger(&s, "async", fast_retry(5)).await;
    let msgs = vec![TestMessage::new(r#"{"n":1}"#).key("k"), TestMessage::new("not json").key("k")];
    produce_to(&s.kafka.bootstrap_servers(), "async", msgs).await.unwrap();

    s.receiver.wait_for_deliveries(2, WAIT).await.unwrap();
    let d = s.receiver.deliveries();
    let gap = d[1].received_at - d[0].received_at;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}, before Retry-After");

    // 202: running until CompleteWorkOrder; the second message waits.
    let wo_id = d[1].work_order_id.clone();
    let mut wos = WorkOrderServiceClient::new(s.cp.channel().await.unwrap());
    let wo = wait_for("work order running", WAIT, || {
        let mut wos = wos.clone();
        let id = wo_id.clone();
        async move {
            let wo = wos.get_work_order(GetWorkOrderRequest { id }).await.ok()?.into_inner();
            (wo.state == WorkOrderState::Running as i32).then_some(wo)
        }
    })
    .await
    .unwrap();
    assert_eq!(wo.attempts, 2);
    assert_eq!(s.receiver.deliveries().len(), 2, "the next message waits behind the running one");

    wos.complete_work_order(CompleteWorkOrderRequest { id: wo_id, success: true, error: String::new() }).await.unwrap();
    s.receiver.wait_for_deliveries(3, WAIT).await.unwrap();
    let last = &s.receiver.deliveries()[2];
    assert_eq!(last.body["encoding"], "base64", "non-JSON values arrive base64: {}", last.body);
    assert_eq!(last.body["data"], "bm90IGpzb24=");
}

/// Issue 12 item 5: `webhook.format`. A CloudEvents trigger POSTs each
/// message as a CloudEvent in binary content mode; switching it to JSON with
/// UpdateTrigger reaches the running node.
#[tokio::test]
async fn test_cloudevents_format_delivers_events_until_switched_to_json() {
    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let s = stack("events", 2).await;
    let id = create_trigger_with(&s, "events", fast_retry(3), |t| {
        let webhook = t.webhook.as_mut().unwrap();
        webhook.format = WebhookFormat::Cloudevents.into();
        webhook.headers = vec![Header { name: "x-tenant".into(), value: "acme".into(), secret: false }];
    })
    .await;
    let ts = 1_700_000_000_123;
    let value = r#"{"order": 7}"#;
    let first = TestMessage::new(value).key("user-1").timestamp_ms(ts).header("traceparent", TRACEPARENT);
    produce_to(&s.kafka.bootstrap_servers(), "events", [first]).await.unwrap();
    s.receiver.wait_for_deliveries(1, WAIT).await.unwrap();
    let d = s.receiver.deliveries().remove(0);

    let wos = WorkOrderServiceClient::new(s.cp.channel().await.unwrap());
    let wo = wait_for("the work order listed", WAIT, || {
        let (mut wos, trigger_id) = (wos.clone(), id.clone());
        async move {
            let request =
                ListWorkOrdersRequest { trigger_id, state: WorkOrderState::Success.into(), ..Default::default() };
            wos.list_work_orders(request).await.unwrap().into_inner().work_orders.into_iter().next()
        }
    })
    .await
    .unwrap();
    assert_eq!((wo.topic.as_str(), wo.key.as_deref()), ("events", Some(&b"user-1"[..])));
    let time = chrono::DateTime::parse_from_rfc3339(d.header("ce-time").unwrap()).unwrap();
    assert_eq!(time.timestamp_millis(), ts, "ce-time is the message timestamp");
    for (name, expected) in [
        ("ce-specversion", "1.0".to_owned()),
        ("ce-id", wo.id.clone()),
        ("ce-source", format!("kafka://events#{}", wo.partition)),
        ("ce-type", "dev.kafka-triggers.message".to_owned()),
        ("ce-subject", "user-1".to_owned()),
        ("ce-partitionkey", "user-1".to_owned()),
        ("ce-kafkaoffset", wo.offset.to_string()),
        ("ce-traceparent", TRACEPARENT.to_owned()),
        ("content-type", "application/json".to_owned()),
        ("x-tenant", "acme".to_owned()),
        ("idempotency-key", wo.id.clone()),
    ] {
        assert_eq!(d.header(name), Some(expected.as_str()), "{name}");
    }
    assert_eq!(d.raw, value.as_bytes(), "the body is the message value");

    let mut triggers = TriggerServiceClient::new(s.cp.channel().await.unwrap());
    let shown = triggers.get_trigger(GetTriggerRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(shown.webhook.unwrap().format(), WebhookFormat::Cloudevents);
    let patch = Trigger {
        id: id.clone(),
        webhook: Some(WebhookTarget { format: WebhookFormat::Json.into(), ..Default::default() }),
        ..Default::default()
    };
    let mask = prost_types::FieldMask { paths: vec!["webhook.format".into()] };
    let updated = triggers
        .update_trigger(UpdateTriggerRequest { trigger: Some(patch), update_mask: Some(mask) })
        .await
        .unwrap()
        .into_inner();
    let webhook = updated.webhook.unwrap();
    assert_eq!((webhook.format(), webhook.url), (WebhookFormat::Json, s.receiver.url()), "only the format changed");
    // The node replaces its workers' configuration before it restarts the
    // pipeline, so once the new generation runs, workers have the new format.
    let started = format!(
        "SELECT count(*) FROM events WHERE kind = 'pipeline_started' AND trigger_id = '{id}'
           AND (details->>'generation')::bigint = {}",
        updated.generation
    );
    wait_for("the new generation running", WAIT, || async { (count(&s.pool, &started).await > 0).then_some(()) })
        .await
        .unwrap();

    let second = TestMessage::new(r#"{"order": 8}"#).key("user-1").timestamp_ms(ts + 1);
    produce_to(&s.kafka.bootstrap_servers(), "events", [second]).await.unwrap();
    s.receiver.wait_for_deliveries(2, WAIT).await.unwrap();
    let d = s.receiver.deliveries().remove(1);
    assert_eq!(d.body["data"], serde_json::json!({"order": 8}), "the JSON body: {}", d.body);
    assert_eq!(d.key(), Some("user-1"));
    assert_eq!(d.header("content-type"), Some("application/json"));
    assert_eq!(d.header("ce-specversion"), None);
}

#[tokio::test]
async fn test_retention_removes_only_old_finished_work_orders_in_chunks() {
    let db = TestDb::create().await.unwrap();
    let pool = db.pool().await.unwrap();
    kt_common::db::migrate(&pool).await.unwrap();
    let trigger = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO triggers (id, name, enabled, generation, group_id, spec) VALUES ($1, 'r', true, 1, 'r', '{}')",
    )
    .bind(trigger)
    .execute(&pool)
    .await
    .unwrap();
    // 5 old successes, 2 old skipped, 1 old failed, 1 old pending, 3 recent successes.
    let rows = [("success", 48, 5), ("skipped", 48, 2), ("failed", 48, 1), ("pending", 48, 1), ("success", 0, 3)];
    let mut offset = 0i64;
    for (state, hours_ago, n) in rows {
        for _ in 0..n {
            offset += 1;
            sqlx::query(
                "INSERT INTO work_orders (id, trigger_id, set_id, topic, partition, \"offset\", state, body, updated_at)
                 VALUES ($1, $2, 1, 't', 0, $3, $4, '{}', now() - make_interval(hours => $5))",
            )
            .bind(kt_common::dispatch::work_order_id(trigger, "t", 0, offset))
            .bind(trigger)
            .bind(offset)
            .bind(state)
            .bind(hours_ago)
            .execute(&pool)
            .await
            .unwrap();
        }
    }
    let day = Duration::from_secs(24 * 3600);
    // Chunks of 2: the 7 old finished ones take four statements.
    let removed = kt_control_plane::retention::remove_finished_work_orders(&pool, day, 2).await.unwrap();
    assert_eq!(removed, 7);
    let left: Vec<(String, bool)> =
        sqlx::query_as("SELECT state, updated_at < now() - interval '1 day' FROM work_orders ORDER BY \"offset\"")
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected: Vec<(String, bool)> =
        [("failed", true), ("pending", true), ("success", false), ("success", false), ("success", false)]
            .into_iter()
            .map(|(s, old)| (s.to_owned(), old))
            .collect();
    assert_eq!(left, expected);
    assert_eq!(kt_control_plane::retention::remove_finished_work_orders(&pool, day, 2).await.unwrap(), 0);
}

/// Pins issue #10 item 4: a work stream that said hello and asked for
/// u32::MAX sets got every grant (the scheduler served the session with the
/// most credit) and, never reporting back, stalled delivery for everyone.
#[tokio::test]
async fn test_a_greedy_work_stream_does_not_starve_a_real_node() {
    use kt_control_plane::scheduler::model::INITIAL_WINDOW;
    use kt_proto::internal::work_service_client::WorkServiceClient;
    use kt_proto::internal::worker_message::Msg;
    use kt_proto::internal::{Credit, WorkerHello, WorkerMessage};

    const MESSAGES: usize = 200;
    let s = stack("greedy", 2).await;
    let mut greedy = WorkServiceClient::new(s.cp.authed(kt_tests::TEST_NODE_TOKEN).await.unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WorkerMessage { msg: Some(Msg::Hello(WorkerHello { node_id: "greedy".into() })) }).await.unwrap();
    tx.send(WorkerMessage { msg: Some(Msg::Credit(Credit { sets: u32::MAX })) }).await.unwrap();
    let mut grants = greedy.work(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let (held_tx, held) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        while let Ok(Some(grant)) = grants.message().await {
            held_tx.send_modify(|n| *n += grant.sets.len());
        }
    });

    create_trigger(&s, "greedy", fast_retry(3)).await;
    produce_to(&s.kafka.bootstrap_servers(), "greedy", keyed_messages(MESSAGES, 0)).await.unwrap();
    // Everything but what the greedy stream sits on reaches the target.
    let window = INITIAL_WINDOW as usize;
    s.receiver.wait_for_deliveries(MESSAGES - window, WAIT).await.unwrap();
    let taken = *held.borrow();
    assert!(taken <= window, "the greedy stream holds {taken} sets, more than its window of {window}");
    drop(tx);
}
