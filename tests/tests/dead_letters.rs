//! The dead-letter policy end to end: a real control plane, a data-plane
//! node, the MockCluster broker and a webhook that fails one message for
//! good. The message becomes a dead letter (bytes, headers, attempts), its
//! key moves on in order, the other key is unaffected, the dead-letter
//! topic receives it with the kt-* headers; then List/Get/Replay/Delete
//! through the real server, and their events.

mod work_order_checks;

use kt_kafka_testing::consume::{consume_n, subscribed_consumer};
use kt_kafka_testing::produce::TestMessage;
use kt_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
use kt_proto::v1::work_order_service_client::WorkOrderServiceClient;
use kt_proto::v1::*;
use kt_tests::webhook::Reply;
use kt_tests::{wait_for, TestNode};
use rdkafka::message::{Headers, Message};
use tonic::Code;
use work_order_checks::*;

const TOPIC: &str = "dl";
const DLQ: &str = "dl.dead";
/// The message the target refuses for good.
const POISON: i64 = 100;

fn seq(body: &serde_json::Value) -> i64 {
    body["data"]["seq"].as_i64().unwrap_or(-1)
}

fn message(key: &str, seq: i64) -> TestMessage {
    TestMessage::new(serde_json::json!({ "seq": seq }).to_string()).key(key).header("origin", "test")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_failed_message_becomes_a_dead_letter_and_its_key_moves_on() {
    let s = Stack::start(TOPIC, 1).await;
    s.kafka.create_topic(DLQ, 1).unwrap();
    s.receiver.script(|body| if seq(body) == POISON { Reply::status(500) } else { Reply::OK });
    let mut target = Target::new(2_000, retry(2, 10, 20));
    target.on_failure = OnFailure::DeadLetter;
    target.dead_letter_topic = DLQ.into();
    let trigger = s.create_trigger(TOPIC, &target).await;
    let _node = TestNode::start(&s.db, &s.cp().url(), |_| {}).await;
    let mut dead_letters = DeadLetterServiceClient::new(s.cp().channel().await.unwrap());

    s.produce(TOPIC, vec![message("bad", POISON), message("good", 1), message("bad", 101), message("good", 2)]).await;
    wait_for("the other messages delivered", WAIT, || async { (s.receiver.successes().len() == 3).then_some(()) })
        .await
        .unwrap();
    // In order per key: the poison message's two attempts, then its key's next message.
    let bad: Vec<i64> =
        s.receiver.deliveries().iter().filter(|d| d.key() == Some("bad")).map(|d| seq(&d.body)).collect();
    assert_eq!(bad, [POISON, POISON, 101]);
    let good: Vec<i64> =
        s.receiver.successes().iter().filter(|d| d.key() == Some("good")).map(|d| seq(&d.body)).collect();
    assert_eq!(good, [1, 2]);

    let list = dead_letters
        .list_dead_letters(ListDeadLettersRequest { trigger_id: trigger.to_string(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.dead_letters.len(), 1, "{list:?}");
    let id = list.dead_letters[0].id.clone();
    let dl = dead_letters.get_dead_letter(GetDeadLetterRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(dl.key.as_deref(), Some(&b"bad"[..]));
    assert_eq!(dl.value.as_deref(), Some(serde_json::json!({ "seq": POISON }).to_string().as_bytes()));
    assert_eq!(dl.headers, [DeadLetterHeader { name: "origin".into(), value: Some(b"test".to_vec()) }]);
    assert_eq!(dl.attempts, 2);
    assert!(dl.last_error.contains("500"), "{}", dl.last_error);
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&dl.attempt_log).unwrap().len(), 2);
    assert!(dl.timestamp.is_some());
    assert_eq!((dl.produced_topic.as_str(), dl.produced_offset), (DLQ, 0));

    // The dead-letter topic got it, acknowledged before the dead letter was recorded.
    let consumer = subscribed_consumer(&s.kafka.bootstrap_servers(), "dlq-reader", &[DLQ]).unwrap();
    let produced = consume_n(&consumer, 1, WAIT).await.unwrap();
    let m = &produced[0];
    assert_eq!((m.key(), m.payload()), (dl.key.as_deref(), dl.value.as_deref()));
    let headers: Vec<(String, String)> = m
        .headers()
        .unwrap()
        .iter()
        .map(|h| (h.key.to_owned(), String::from_utf8(h.value.unwrap().to_vec()).unwrap()))
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(header("origin"), "test");
    assert_eq!(header("kt-error"), dl.last_error);
    assert_eq!(header("kt-attempts"), "2");
    assert_eq!(header("kt-trigger-id"), trigger.to_string());
    assert_eq!(header("kt-original-topic"), TOPIC);
    assert_eq!(header("kt-original-partition"), dl.partition.to_string());
    assert_eq!(header("kt-original-offset"), dl.offset.to_string());

    // A replay while a worker holds the key's set is refused, to be tried again.
    let claim = "UPDATE message_sets SET lock_id = gen_random_uuid(), lock_expires = now() + interval '1 hour'
                  WHERE key = 'bad'";
    sqlx::query(claim).execute(&s.pool).await.unwrap();
    let busy = dead_letters.replay_dead_letter(ReplayDeadLetterRequest { id: id.clone() }).await.unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    sqlx::query("UPDATE message_sets SET lock_id = NULL, lock_expires = NULL WHERE key = 'bad'")
        .execute(&s.pool)
        .await
        .unwrap();

    // Once the target recovers, the replay delivers it again, same work order.
    s.receiver.script(|_| Reply::OK);
    let replayed =
        dead_letters.replay_dead_letter(ReplayDeadLetterRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(replayed.work_order_id, dl.work_order_id);
    wait_for("the replayed message delivered", WAIT, || async {
        s.receiver.successes().iter().any(|d| seq(&d.body) == POISON).then_some(())
    })
    .await
    .unwrap();
    let again = dead_letters.get_dead_letter(GetDeadLetterRequest { id: id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    let state: String = sqlx::query_scalar("SELECT state FROM work_orders WHERE id = $1::uuid")
        .bind(&dl.work_order_id)
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert_eq!(state, "success");

    // Another poison message, deleted this time.
    s.receiver.script(|body| if seq(body) == 102 { Reply::status(500) } else { Reply::OK });
    s.produce(TOPIC, vec![message("bad", 102)]).await;
    let second = wait_for("a second dead letter", WAIT, || async {
        let mut client = dead_letters.clone();
        let req = ListDeadLettersRequest { trigger_id: trigger.to_string(), ..Default::default() };
        client.list_dead_letters(req).await.unwrap().into_inner().dead_letters.pop()
    })
    .await
    .unwrap();
    dead_letters.delete_dead_letter(DeleteDeadLetterRequest { id: second.id.clone() }).await.unwrap();
    let gone = dead_letters.get_dead_letter(GetDeadLetterRequest { id: second.id }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM events WHERE trigger_id = $1 AND kind LIKE '%dead_letter%' ORDER BY id")
            .bind(trigger)
            .fetch_all(&s.pool)
            .await
            .unwrap();
    assert_eq!(
        kinds,
        ["message_dead_lettered", "dead_letter_replayed", "message_dead_lettered", "dead_letter_deleted"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_failure_reported_by_complete_work_order_becomes_a_dead_letter() {
    let s = Stack::start(TOPIC, 1).await;
    // The target hands the poison message to an asynchronous runner (202),
    // which later reports that it failed.
    s.receiver.script(|body| if seq(body) == POISON { Reply::status(202) } else { Reply::OK });
    let mut target = Target::new(2_000, retry(2, 10, 20));
    target.on_failure = OnFailure::DeadLetter;
    let trigger = s.create_trigger(TOPIC, &target).await;
    let _node = TestNode::start(&s.db, &s.cp().url(), |_| {}).await;
    let channel = s.cp().channel().await.unwrap();
    let mut work_orders = WorkOrderServiceClient::new(channel.clone());
    let mut dead_letters = DeadLetterServiceClient::new(channel);

    s.produce(TOPIC, vec![message("bad", POISON), message("bad", 101)]).await;
    let running = wait_for("the 202 recorded", WAIT, || {
        let mut client = work_orders.clone();
        async move {
            let req = ListWorkOrdersRequest {
                trigger_id: trigger.to_string(),
                state: WorkOrderState::Running.into(),
                ..Default::default()
            };
            client.list_work_orders(req).await.unwrap().into_inner().work_orders.pop()
        }
    })
    .await
    .unwrap();
    let report = CompleteWorkOrderRequest { id: running.id.clone(), success: false, error: "runner crashed".into() };
    let failed = work_orders.complete_work_order(report).await.unwrap().into_inner();
    assert_eq!(failed.state(), WorkOrderState::Failed);

    // The key moves on instead of blocking, and the message is a dead letter.
    wait_for("the key's next message delivered", WAIT, || async {
        s.receiver.successes().iter().any(|d| seq(&d.body) == 101).then_some(())
    })
    .await
    .unwrap();
    let bad: Vec<i64> =
        s.receiver.deliveries().iter().filter(|d| d.key() == Some("bad")).map(|d| seq(&d.body)).collect();
    assert_eq!(bad, [POISON, 101], "one POST each, in order");
    let list = dead_letters
        .list_dead_letters(ListDeadLettersRequest { trigger_id: trigger.to_string(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.dead_letters.len(), 1, "{list:?}");
    let dl = &list.dead_letters[0];
    assert_eq!(
        (dl.work_order_id.as_str(), dl.last_error.as_str(), dl.attempts),
        (running.id.as_str(), "runner crashed", 1)
    );
    let blocked: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM events WHERE trigger_id = $1 AND kind = 'set_blocked'")
            .bind(trigger)
            .fetch_all(&s.pool)
            .await
            .unwrap();
    assert!(blocked.is_empty(), "no set was blocked: {blocked:?}");
}
