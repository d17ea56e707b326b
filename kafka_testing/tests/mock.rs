//! The mock cluster wrapper: messages make the round trip intact, and injected faults
//! (broker down/up, request errors) show up in what clients see.

use std::collections::HashMap;
use std::time::Duration;

use kt_kafka_testing::{
    consume_n, keyed_messages, produce, produce_to, producer_config, subscribed_consumer, MockKafka, TestMessage,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::Message as _;

const CONSUME_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn test_mock_round_trip_keeps_keys_payloads_headers_and_key_order() {
    let kafka = MockKafka::new(3).unwrap();
    kafka.create_topic("orders", 4).unwrap();

    let mut messages = keyed_messages(200, 7);
    // Edge cases: binary payload and key, null payload, null and empty header values.
    messages.push(
        TestMessage::new(vec![0xff, 0x00, 0xfe])
            .key(vec![0x80, 0x81])
            .header("bin", vec![0xc3, 0x28])
            .null_header("nothing")
            .header("empty", Vec::new()),
    );
    messages.push(TestMessage { key: Some(b"tombstone".to_vec()), ..TestMessage::default() });
    let produced = produce_to(&kafka.bootstrap_servers(), "orders", messages.clone()).await.unwrap();
    assert_eq!(produced.len(), messages.len());

    let consumer = subscribed_consumer(&kafka.bootstrap_servers(), "g1", &["orders"]).unwrap();
    let received = consume_n(&consumer, messages.len(), CONSUME_TIMEOUT).await.unwrap();

    // Every message arrived once, where the producer was told it landed.
    let mut by_position: HashMap<(i32, i64), _> = received.iter().map(|m| ((m.partition(), m.offset()), m)).collect();
    assert_eq!(by_position.len(), messages.len());
    for (sent, at) in messages.iter().zip(&produced) {
        let got = by_position.remove(&(at.partition, at.offset)).expect("message missing");
        assert_eq!(got.key().map(<[u8]>::to_vec), sent.key);
        assert_eq!(got.payload().map(<[u8]>::to_vec), sent.payload);
        let headers: Vec<(String, Option<Vec<u8>>)> = got
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default();
        assert_eq!(headers, sent.headers);
    }

    // Per key, messages come back in the order they were produced.
    let mut last_seq: HashMap<Vec<u8>, u64> = HashMap::new();
    for m in &received {
        let (Some(key), Some(payload)) = (m.key(), m.payload()) else {
            continue;
        };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload) else {
            continue;
        };
        let seq = value["seq"].as_u64().unwrap();
        if let Some(prev) = last_seq.insert(key.to_vec(), seq) {
            assert!(prev < seq, "key {key:?}: seq {seq} after {prev}");
        }
    }
    assert_eq!(last_seq.len(), 7);
}

fn short_timeout_producer(kafka: &MockKafka, message_timeout_ms: u32) -> FutureProducer {
    producer_config(&kafka.bootstrap_servers())
        .set("message.timeout.ms", message_timeout_ms.to_string())
        .set("reconnect.backoff.max.ms", "200")
        .create()
        .unwrap()
}

#[tokio::test]
async fn test_broker_down_holds_deliveries_until_broker_up() {
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("t", 1).unwrap();
    let producer = short_timeout_producer(&kafka, 30_000);
    // Connected and working first.
    produce(&producer, "t", [TestMessage::new("before")]).await.unwrap();

    kafka.broker_down(1).unwrap();
    let delivery =
        producer.send_result(FutureRecord::<(), _>::to("t").payload("while down")).map_err(|(e, _)| e).unwrap();
    let mut delivery = Box::pin(delivery);
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), &mut delivery).await.is_err(),
        "a message was acknowledged while its only broker was down"
    );

    kafka.broker_up(1).unwrap();
    let (partition, offset) = tokio::time::timeout(Duration::from_secs(20), delivery)
        .await
        .expect("not delivered within 20 s of broker_up")
        .unwrap()
        .unwrap();
    assert_eq!((partition, offset), (0, 1));
}

#[tokio::test]
async fn test_broker_down_times_out_messages_then_recovers() {
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("t", 1).unwrap();
    let producer = short_timeout_producer(&kafka, 1_000);
    produce(&producer, "t", [TestMessage::new("before")]).await.unwrap();

    kafka.all_brokers_down().unwrap();
    let err = produce(&producer, "t", [TestMessage::new("lost")]).await.unwrap_err();
    let kafka_err = err.downcast_ref::<KafkaError>().expect("a Kafka error");
    assert_eq!(kafka_err.rdkafka_error_code(), Some(RDKafkaErrorCode::MessageTimedOut), "{err:#}");

    kafka.all_brokers_up().unwrap();
    let producer = short_timeout_producer(&kafka, 20_000);
    let produced = produce(&producer, "t", [TestMessage::new("after")]).await.unwrap();
    assert_eq!(produced[0].offset, 1, "the timed-out message must not have been stored");
}

#[tokio::test]
async fn test_request_errors_fail_or_are_retried() {
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("t", 1).unwrap();
    let producer = short_timeout_producer(&kafka, 10_000);
    produce(&producer, "t", [TestMessage::new("warm up")]).await.unwrap();

    // A permanent error fails the message.
    kafka.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);
    let err = produce(&producer, "t", [TestMessage::new("refused")]).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<KafkaError>().and_then(KafkaError::rdkafka_error_code),
        Some(RDKafkaErrorCode::MessageSizeTooLarge),
        "{err:#}"
    );

    // Retriable errors are retried by the producer: the message is stored once.
    kafka.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS],
    );
    let produced = produce(&producer, "t", [TestMessage::new("accepted")]).await.unwrap();
    assert_eq!(produced[0].offset, 1);
}
