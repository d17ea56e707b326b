//! The kt-loadgen binary against the in-process mock cluster.

use std::process::Command;
use std::time::Duration;

use kt_kafka_testing::{consume_n, subscribed_consumer, MockKafka};
use rdkafka::message::Headers as _;
use rdkafka::Message as _;

#[tokio::test]
async fn test_loadgen_produces_count_messages_with_keys_and_headers() {
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("load", 2).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_kt-loadgen"))
        .args(["--brokers", &kafka.bootstrap_servers(), "--topic", "load"])
        .args(["--count", "300", "--rate", "0", "--keys", "3", "--payload-size", "64"])
        .args(["--payload-kind", "json", "--header", "source=loadgen", "--header", "run=1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kt-loadgen failed: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["acked"], 300, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");

    let consumer = subscribed_consumer(&kafka.bootstrap_servers(), "check", &["load"]).unwrap();
    let received = consume_n(&consumer, 300, Duration::from_secs(30)).await.unwrap();
    let mut keys: Vec<&[u8]> = received.iter().filter_map(|m| m.key()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys, [&b"key-0"[..], b"key-1", b"key-2"]);
    let first = &received[0];
    let headers = first.headers().unwrap();
    assert_eq!(headers.get(0).key, "source");
    assert_eq!(headers.get(0).value, Some(&b"loadgen"[..]));
    let payload: serde_json::Value = serde_json::from_slice(first.payload().unwrap()).unwrap();
    assert!(payload["seq"].is_u64());
    assert!(first.payload().unwrap().len() >= 64);
}

#[test]
fn test_loadgen_rate_limits_and_sends_binary_payloads() {
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("slow", 1).unwrap();
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_kt-loadgen"))
        .args(["--brokers", &kafka.bootstrap_servers(), "--topic", "slow"])
        .args(["--count", "20", "--rate", "20", "--payload-kind", "binary", "--payload-size", "10"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // 20 messages at 20/s: the last one is due after 0.95 s.
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["acked"], 20);
    assert_eq!(summary["bytes"], 200);
}
