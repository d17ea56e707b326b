//! The Tansu launcher: a real broker process that takes topics, messages and consumer groups.
//! Needs the tansu binary (TANSU_BIN or PATH): scripts/test.sh installs it. Without it these
//! tests fail, on purpose, with a message saying so.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use kt_kafka_testing::{consume_n, keyed_messages, produce_to, Tansu};
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::Message as _;

fn start_tansu() -> Tansu {
    Tansu::start().unwrap_or_else(|err| panic!("could not start tansu: {err:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_tansu_round_trip_through_a_consumer_group() {
    let tansu = start_tansu();
    tansu.create_topic("events", 3).unwrap();

    let messages = keyed_messages(50, 5);
    let produced = produce_to(&tansu.bootstrap_servers(), "events", messages.clone())
        .await
        .unwrap_or_else(|err| panic!("produce failed: {err:#}\ntansu log:\n{}", tansu.log()));
    assert_eq!(produced.len(), 50);
    assert!(produced.iter().all(|p| (0..3).contains(&p.partition)));

    let started = Instant::now();
    let consumer: StreamConsumer = tansu.consumer_config("tansu-group").create().unwrap();
    consumer.subscribe(&["events"]).unwrap();
    let received = consume_n(&consumer, messages.len(), Duration::from_secs(60))
        .await
        .unwrap_or_else(|err| panic!("{err:#}\ntansu log:\n{}", tansu.log()));
    eprintln!("tansu: 50 messages consumed through a group in {:?}", started.elapsed());

    let mut payloads: Vec<Vec<u8>> = received.iter().filter_map(|m| m.payload().map(<[u8]>::to_vec)).collect();
    let mut expected: Vec<Vec<u8>> = messages.iter().filter_map(|m| m.payload.clone()).collect();
    payloads.sort();
    expected.sort();
    assert_eq!(payloads, expected);
}

#[test]
fn test_tansu_create_topic_reports_duplicates() {
    let tansu = start_tansu();
    tansu.create_topic("once", 1).unwrap();
    let err = tansu.create_topic("once", 1).unwrap_err();
    assert!(format!("{err:#}").contains("once"), "{err:#}");
}

#[test]
fn test_tansu_is_stopped_on_drop() {
    let tansu = start_tansu();
    let port = tansu.port();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(tansu);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} still answers");
}
