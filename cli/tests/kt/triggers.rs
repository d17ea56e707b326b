//! `kt triggers …` against a real control plane: every verb in table and
//! JSON (and YAML) output, files and stdin, names for ids.

use kt_tests::ControlPlaneOptions;

use crate::support::{rows, temp_file, Stack};

#[tokio::test]
async fn test_triggers_verbs_print_tables_and_json() {
    let s = Stack::api_only(ControlPlaneOptions::default()).await;

    // create -f FILE (YAML), table output.
    let file = temp_file("orders.yaml", &s.trigger_yaml("orders", "orders"));
    let created = s.kt(&["-o", "table", "triggers", "create", "-f", file.to_str().unwrap()]).await.ok();
    let header = created.stdout.lines().next().unwrap();
    assert!(header.starts_with("ID") && header.contains("NAME") && header.contains("GENERATION"), "{created}");
    let row: Vec<&str> = created.stdout.lines().nth(1).expect("one trigger").split_whitespace().collect();
    let id = row[0].to_owned();
    assert_eq!(row[1..3], ["orders", "yes"], "{created}");
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{created}");

    // create -f - (JSON on stdin, grpcurl's request shape), JSON output by
    // default since stdout is not a terminal.
    let json = format!(
        r#"{{"trigger": {{"name": "refunds", "kafka": {{"hosts": ["{}"], "topics": ["refunds"]}}, "webhook": {{"url": "{}"}}}}}}"#,
        s.kafka.bootstrap_servers(),
        s.receiver.url()
    );
    let refunds = s.kt_stdin(&["triggers", "create", "-f", "-"], &json).await.ok().json();
    assert_eq!(refunds["name"], "refunds");
    assert_eq!(refunds["enabled"], true);
    assert!(refunds["kafka"]["groupId"].as_str().unwrap().starts_with("kafka-triggers-"), "{refunds}");
    let refunds_id = refunds["id"].as_str().unwrap().to_owned();

    // list: table and JSON, and YAML in the same shape.
    let table = s.kt(&["-o", "table", "triggers", "list"]).await.ok();
    assert_eq!(rows(&table.stdout, &id)[0][1], "orders", "{table}");
    assert_eq!(rows(&table.stdout, &refunds_id)[0][1], "refunds", "{table}");
    let list = s.kt(&["-o", "json", "triggers", "list"]).await.ok().json();
    let names: Vec<&str> = list["triggers"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{list}");
    assert!(names.contains(&"orders") && names.contains(&"refunds"), "{list}");
    let yaml = s.kt(&["-o", "yaml", "triggers", "list"]).await.ok();
    let from_yaml: serde_json::Value = serde_yaml::from_str(&yaml.stdout).unwrap();
    assert_eq!(from_yaml, list, "YAML is the same document as JSON");

    // get, by name and by id.
    let get = s.kt(&["-o", "table", "triggers", "get", "orders"]).await.ok();
    let fields: Vec<(&str, &str)> =
        get.stdout.lines().filter_map(|l| l.split_once(char::is_whitespace)).map(|(k, v)| (k, v.trim())).collect();
    assert!(fields.contains(&("id", id.as_str())), "{get}");
    assert!(fields.contains(&("kafka.topics", "orders")), "{get}");
    assert!(fields.contains(&("retry.maxAttempts", "2")), "{get}");
    assert_eq!(fields[0].0, "id", "fields in declaration order: {get}");
    let got = s.kt(&["triggers", "get", &id]).await.ok().json();
    assert_eq!(got["kafka"]["initialOffsetResetPolicy"], "earliest");
    assert_eq!(got["generation"], "1");

    // update --set: only the named fields (an update mask).
    let updated = s
        .kt(&["triggers", "update", "orders", "--set", "kafka.topics=orders,returns", "--set", "retry.max_attempts=4"])
        .await
        .ok()
        .json();
    assert_eq!(updated["kafka"]["topics"], serde_json::json!(["orders", "returns"]));
    assert_eq!(updated["retry"]["maxAttempts"], 4);
    assert_eq!(updated["webhook"]["url"], s.receiver.url(), "untouched fields stay");
    assert_eq!(updated["generation"], "2");

    // update -f: the file replaces the configuration; --set applies on top.
    let replacement = temp_file("t.json", &serde_json::to_string(&got).unwrap());
    let replaced = s
        .kt(&["-o", "table", "triggers", "update", &id, "-f", replacement.to_str().unwrap(), "--set", "name=orders-v2"])
        .await
        .ok();
    assert_eq!(rows(&replaced.stdout, &id)[0][1..3], ["orders-v2", "yes"], "{replaced}");
    let after = s.kt(&["triggers", "get", &id]).await.ok().json();
    assert_eq!(after["kafka"]["topics"], serde_json::json!(["orders"]), "the file's topics: {after}");
    assert_eq!(after["retry"]["maxAttempts"], 2);

    // disable / enable, table and JSON.
    let disabled = s.kt(&["-o", "table", "triggers", "disable", "orders-v2"]).await.ok();
    assert_eq!(rows(&disabled.stdout, &id)[0][2], "no", "{disabled}");
    let enabled = s.kt(&["triggers", "enable", &id]).await.ok().json();
    assert_eq!(enabled["enabled"], true);
    assert_eq!(enabled["generation"], "5");

    // delete: refused without --yes when stdin is not a terminal.
    let refused = s.kt(&["triggers", "delete", "refunds"]).await.code(2);
    assert!(refused.stderr.contains("--yes"), "{refused}");
    s.kt(&["triggers", "get", &refunds_id]).await.ok();
    let deleted = s.kt(&["-o", "table", "triggers", "delete", "refunds", "--yes"]).await.ok();
    assert!(deleted.stdout.contains(&format!("deleted trigger refunds ({refunds_id})")), "{deleted}");
    s.kt(&["triggers", "get", &refunds_id]).await.code(3);
    let deleted_json = s.kt(&["triggers", "delete", &id, "-y"]).await.ok().json();
    assert_eq!(deleted_json["deleted"], true);
    let empty = s.kt(&["-o", "table", "triggers", "list"]).await.ok();
    assert_eq!(empty.stdout, "no triggers\n");
    assert_eq!(s.kt(&["triggers", "list"]).await.ok().json()["triggers"], serde_json::json!([]));
}

#[tokio::test]
async fn test_help_and_completions() {
    let s = Stack::api_only(ControlPlaneOptions::default()).await;
    let help = s.kt(&["--help"]).await.ok();
    for name in [
        "--server",
        "KT_SERVER",
        "http://127.0.0.1:50051",
        "--token",
        "KT_API_TOKEN",
        "--tls-ca",
        "--tls-cert",
        "--tls-key",
        "--tls-domain",
        "--output",
        "Exit codes",
        "triggers",
        "sets",
        "work-orders",
        "events",
        "top",
        "completion",
    ] {
        assert!(help.stdout.contains(name), "--help does not mention {name}:\n{help}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let script = s.kt(&["completion", shell]).await.ok();
        assert!(script.stdout.contains("kt") && script.stdout.contains("work-orders"), "{script}");
    }
    let test_help = s.kt(&["triggers", "test", "--help"]).await.ok();
    assert!(test_help.stdout.contains("committed offsets"), "{test_help}");
}

#[tokio::test]
async fn test_triggers_test_reports_partitions_or_the_failure_and_its_exit_code() {
    let s = Stack::full("orders", 2).await;
    let file = temp_file("orders.yaml", &s.trigger_yaml("orders", "orders"));
    s.kt(&["triggers", "create", "-f", file.to_str().unwrap()]).await.ok();

    // A stored trigger, by name, once the node has joined.
    let answer = s.wait_for_kt("the node to test", &["triggers", "test", "orders"], |a| a["ok"] == true).await;
    let partitions = answer["topics"][0]["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 2, "{answer}");
    let table = s.kt(&["-o", "table", "triggers", "test", "orders"]).await.ok();
    assert!(table.stdout.contains("connection") && table.stdout.contains("ok"), "{table}");
    assert_eq!(rows(&table.stdout, "orders").len(), 2, "one row per partition: {table}");

    // One given in a file, for a topic the cluster lacks: exit 1, the reason.
    let missing =
        s.trigger_yaml("missing", "no-such-topic").replace("kafka:\n", "kafka:\n  connectTimeoutSeconds: 2\n");
    let file = temp_file("missing.yaml", &missing);
    let failed = s.kt(&["-o", "table", "triggers", "test", "-f", file.to_str().unwrap()]).await.code(1);
    assert!(failed.stdout.contains("FAILED: topic_missing"), "{failed}");
    assert!(failed.stderr.contains("connection test failed (topic_missing): topic no-such-topic"), "{failed}");
    let unnamed = s.kt(&["triggers", "test"]).await.code(2);
    assert!(unnamed.stderr.contains("required arguments were not provided"), "{unnamed}");
}

#[tokio::test]
async fn test_triggers_test_without_a_node_exits_unavailable() {
    let s = Stack::api_only(ControlPlaneOptions::default()).await;
    let file = temp_file("orders.yaml", &s.trigger_yaml("orders", "orders"));
    let out = s.kt(&["triggers", "test", "-f", file.to_str().unwrap()]).await.code(5);
    assert!(out.stderr.contains("no data-plane node"), "{out}");
}
