//! The operator's day against the whole system (mock Kafka → node →
//! webhook): status, blocked sets and what to do with them, work orders
//! (with a 202-accepted one completed by hand), and the stored events, each
//! in table and JSON output.

use kt_kafka_testing::produce::{produce_to, TestMessage};
use kt_tests::webhook::Reply;
use serde_json::Value;

use crate::support::{rows, Stack};

const TOPIC: &str = "orders";
/// Keys the target fails for: one to retry, one to skip, one to discard,
/// two for `--all-blocked`.
const FAILING: [&str; 5] = ["user-7", "user-9", "user-10", "user-11", "user-12"];

fn key_of(set: &Value) -> String {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.decode(set["key"].as_str().unwrap()).unwrap();
    String::from_utf8(raw).unwrap()
}

#[tokio::test]
async fn test_sets_work_orders_status_and_events_against_a_running_node() {
    let s = Stack::full(TOPIC, 2).await;
    for key in FAILING {
        s.receiver.set_failing(key, true);
    }
    // `async-1` is accepted with 202 and waits for CompleteWorkOrder.
    s.receiver.script(|body| if body["request"]["key"] == "async-1" { Reply::status(202) } else { Reply::OK });
    let created = s.kt_stdin(&["triggers", "create", "-f", "-"], &s.trigger_yaml("shop", TOPIC)).await.ok().json();
    let trigger = created["id"].as_str().unwrap().to_owned();

    let mut messages = vec![
        TestMessage::new(r#"{"n":1}"#).key("user-1"),
        TestMessage::new(r#"{"n":2}"#).key("user-1"),
        TestMessage::new(r#"{"n":3}"#).key("async-1"),
    ];
    for key in FAILING {
        messages.push(TestMessage::new(format!(r#"{{"key":"{key}","n":1}}"#)).key(key));
        messages.push(TestMessage::new(format!(r#"{{"key":"{key}","n":2}}"#)).key(key));
    }
    produce_to(&s.kafka.bootstrap_servers(), TOPIC, messages).await.unwrap();

    // Every failing key's set becomes blocked; the others flow.
    let blocked = s
        .wait_for_kt("five blocked sets", &["sets", "list", "--trigger", "shop", "--state", "blocked"], |j| {
            j["messageSets"].as_array().is_some_and(|a| a.len() == FAILING.len())
        })
        .await;
    let set_of = |key: &str| -> String {
        blocked["messageSets"].as_array().unwrap().iter().find(|s| key_of(s) == key).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for set in blocked["messageSets"].as_array().unwrap() {
        assert_eq!(set["state"], "MESSAGE_SET_STATE_BLOCKED");
        assert_eq!(set["storedMessages"], "2");
        assert_eq!(set["attempts"], 2);
        assert!(set["lastError"].as_str().unwrap().contains("500"), "{set}");
    }

    // sets list: table, with names for trigger ids and keys as text.
    let table = s.kt(&["-o", "table", "sets", "list", "--trigger", &trigger, "--state", "blocked"]).await.ok();
    assert!(table.stdout.starts_with("ID "), "{table}");
    let row = &rows(&table.stdout, &set_of("user-7"))[0];
    assert_eq!(
        [row[1], row[2], row[3], row[4], row[5], row[7]],
        ["shop", TOPIC, "user-7", "blocked", "2", "2"],
        "{table}"
    );
    assert_eq!(row[9], "ago", "blocked since: {table}");
    // --key filters; without --state every set but idle ones.
    let by_key = s.kt(&["sets", "list", "--key", "user-9"]).await.ok().json();
    assert_eq!(by_key["messageSets"].as_array().unwrap().len(), 1, "{by_key}");
    assert_eq!(by_key["messageSets"][0]["id"], set_of("user-9"));
    let yaml = s.kt(&["-o", "yaml", "sets", "list", "--key", "user-9"]).await.ok();
    assert_eq!(serde_yaml::from_str::<Value>(&yaml.stdout).unwrap(), by_key);

    // sets get.
    let get = s.kt(&["-o", "table", "sets", "get", &set_of("user-7")]).await.ok();
    for expected in ["key ", "user-7", "state ", "MESSAGE_SET_STATE_BLOCKED", "lastError ", "headWorkOrderId "] {
        assert!(get.stdout.contains(expected), "{expected}: {get}");
    }
    let got = s.kt(&["sets", "get", &set_of("user-7")]).await.ok().json();
    assert_eq!(got["headWorkOrderState"], "WORK_ORDER_STATE_FAILED");
    let failed_head = got["headWorkOrderId"].as_str().unwrap().to_owned();

    // triggers status: the node, partitions with lag, the blocked sets.
    let status = s
        .wait_for_kt("both partitions reported", &["triggers", "status", "shop"], |j| {
            j["nodes"][0]["partitions"].as_array().is_some_and(|p| p.len() == 2)
        })
        .await;
    assert_eq!(status["blockedSets"], "5");
    let node_id = s.node.as_ref().unwrap().node_id.clone();
    assert_eq!(status["nodes"][0]["nodeId"], node_id);
    let view = s.kt(&["-o", "table", "triggers", "status", "shop"]).await.ok();
    for expected in [
        format!("trigger          shop ({trigger})"),
        "blocked sets     5 (oldest blocked ".into(),
        "health           degraded: 5 blocked set(s), the oldest blocked for ".into(),
        "NODE".into(),
        "HIGH WATERMARK".into(),
        node_id.clone(),
    ] {
        assert!(view.stdout.contains(&expected), "{expected}: {view}");
    }
    assert_eq!(rows(&view.stdout, &node_id).len(), 2, "one row per partition: {view}");

    // work-orders: the failed heads, the accepted one, get with --body.
    let failed = s.kt(&["work-orders", "list", "--trigger", "shop", "--state", "failed"]).await.ok().json();
    assert_eq!(failed["workOrders"].as_array().unwrap().len(), FAILING.len(), "{failed}");
    let table = s.kt(&["-o", "table", "work-orders", "list", "--state", "failed"]).await.ok();
    let row = &rows(&table.stdout, &failed_head)[0];
    assert_eq!(row[1..3], ["shop", TOPIC], "{table}");
    assert_eq!(row[5..8], ["user-7", "failed", "2"], "{table}");
    // --key and an offset range, both served by the server: the blocked
    // key has exactly its failed head.
    let by_key = s.kt(&["work-orders", "list", "--key", "user-7"]).await.ok().json();
    let ids: Vec<&Value> = by_key["workOrders"].as_array().unwrap().iter().map(|w| &w["id"]).collect();
    assert_eq!(ids, [&Value::from(failed_head.as_str())], "{by_key}");
    let head = &by_key["workOrders"][0];
    let (partition, offset) = (head["partition"].to_string(), head["offset"].as_str().unwrap().parse::<i64>().unwrap());
    let (from, past) = (offset.to_string(), (offset + 1).to_string());
    let range = ["--topic", TOPIC, "--partition", &partition, "--from", &from];
    let one = [&range[..], &["--to", &past]].concat();
    let in_range = s.kt(&[&["work-orders", "list"][..], &one].concat()).await.ok().json();
    assert_eq!(in_range["workOrders"].as_array().unwrap().len(), 1, "{in_range}");
    assert_eq!(in_range["workOrders"][0]["id"], failed_head);
    let empty = [&range[..], &["--to", &from]].concat();
    let none = s.kt(&[&["work-orders", "list"][..], &empty].concat()).await.ok().json();
    assert!(none["workOrders"].as_array().is_none_or(|a| a.is_empty()), "from = to is empty: {none}");
    let get = s.kt(&["-o", "table", "work-orders", "get", &failed_head]).await.ok();
    assert!(get.stdout.contains("attempts:\n  1. ") && get.stdout.contains("  2. "), "{get}");
    assert!(get.stdout.contains("--body"), "{get}");
    let body = s.kt(&["work-orders", "get", &failed_head, "--body"]).await.ok().json();
    assert_eq!(body["data"], serde_json::json!({"key": "user-7", "n": 1}));
    assert_eq!(body["request"]["key"], "user-7");
    let limited = s.kt(&["-o", "table", "work-orders", "list", "--limit", "2"]).await.ok();
    assert_eq!(limited.stdout.lines().count(), 3, "header and two rows: {limited}");
    assert!(limited.stderr.contains("--limit 0"), "{limited}");

    let running = s
        .wait_for_kt("the 202-accepted work order", &["work-orders", "list", "--state", "running"], |j| {
            j["workOrders"].as_array().is_some_and(|a| a.len() == 1)
        })
        .await;
    let accepted = running["workOrders"][0]["id"].as_str().unwrap().to_owned();
    let completed = s.kt(&["work-orders", "complete", &accepted, "--success"]).await.ok().json();
    assert_eq!(completed["state"], "WORK_ORDER_STATE_SUCCESS");
    let again = s.kt(&["-o", "table", "work-orders", "get", &accepted]).await.ok();
    assert!(again.stdout.contains("WORK_ORDER_STATE_SUCCESS"), "{again}");

    // retry one set: fixed, both user-7 messages are delivered in order.
    s.receiver.set_failing("user-7", false);
    let retried = s.kt(&["-o", "table", "sets", "retry", &set_of("user-7")]).await.ok();
    assert_eq!(rows(&retried.stdout, &set_of("user-7")).len(), 1, "{retried}");
    kt_tests::wait_for("user-7 delivered", crate::support::WAIT, || async {
        let ok: Vec<_> = s.receiver.successes().into_iter().filter(|d| d.key() == Some("user-7")).collect();
        (ok.len() == 2).then_some(())
    })
    .await
    .unwrap();

    // skip: the head is skipped, the next message becomes the candidate.
    let skipped = s.kt(&["sets", "skip", &set_of("user-9")]).await.ok().json();
    assert_eq!(skipped["storedMessages"], "1", "{skipped}");

    // discard: asks first; with --yes drops the set's messages.
    s.kt(&["sets", "discard", &set_of("user-10")]).await.code(2);
    let discarded = s.kt(&["-o", "table", "sets", "discard", &set_of("user-10"), "--yes"]).await.ok();
    assert!(
        discarded.stdout.contains(&format!("discarded set {}: 2 message(s) dropped", set_of("user-10"))),
        "{discarded}"
    );

    // --all-blocked: user-9's next message (still failing) blocks again,
    // with user-11 and user-12 that makes three.
    s.wait_for_kt("three blocked sets", &["sets", "list", "--trigger", "shop", "--state", "blocked"], |j| {
        j["messageSets"].as_array().is_some_and(|a| a.len() == 3)
    })
    .await;
    for key in ["user-9", "user-11", "user-12"] {
        s.receiver.set_failing(key, false);
    }
    let all = s.kt(&["-o", "table", "sets", "retry", "--all-blocked", "--trigger", "shop"]).await.ok();
    assert_eq!(all.stdout, "retried 3 of 3 blocked set(s)\n", "{all}");
    s.wait_for_kt("no blocked set", &["sets", "list", "--trigger", "shop", "--state", "blocked"], |j| {
        j["messageSets"].as_array().is_some_and(|a| a.is_empty())
    })
    .await;
    let none = s.kt(&["sets", "retry", "--all-blocked", "--trigger", &trigger]).await.ok().json();
    assert_eq!(none["retried"], 0);
    assert_eq!(none["blocked"], 0);

    // events: the stored history, filtered, as JSON lines and as one line each.
    let events = s.kt(&["events", "--trigger", "shop", "--kind", "set_blocked"]).await.ok().json_lines();
    assert!(events.len() >= FAILING.len(), "{events:?}");
    assert!(events.iter().all(|e| e["kind"] == "EVENT_KIND_SET_BLOCKED" && e["triggerId"] == trigger.as_str()));
    let lines = s.kt(&["-o", "table", "events", "--trigger", "shop", "--kind", "set_skipped,set_discarded"]).await.ok();
    let kinds: Vec<&str> = lines.stdout.lines().map(|l| l.split_whitespace().nth(2).unwrap()).collect();
    assert_eq!(kinds, ["set_skipped", "set_discarded"], "{lines}");
    assert!(lines.stdout.lines().all(|l| l.contains("trigger=shop")), "{lines}");
}
