//! Exit codes and error messages: not found (3), unauthenticated (4),
//! unavailable (5), invalid input (2) with the server's field violations
//! one per line, usage errors (2).

use kt_tests::ControlPlaneOptions;

use crate::support::{kt_command, run, temp_file, Stack};

const UNKNOWN_ID: &str = "0190b4c8-9c1e-7000-8000-000000000000";

#[tokio::test]
async fn test_not_found_is_exit_3() {
    let s = Stack::api_only(ControlPlaneOptions::default()).await;
    for args in [
        &["triggers", "get", UNKNOWN_ID][..],
        &["triggers", "get", "no-such-trigger"],
        &["triggers", "status", UNKNOWN_ID],
        &["triggers", "enable", UNKNOWN_ID],
        &["triggers", "delete", UNKNOWN_ID, "--yes"],
        &["sets", "get", "987654321"],
        &["sets", "retry", "987654321"],
        &["sets", "list", "--trigger", "no-such-trigger"],
        &["work-orders", "get", UNKNOWN_ID],
        &["work-orders", "complete", UNKNOWN_ID, "--success"],
        &["events", "--trigger", "no-such-trigger"],
    ] {
        let out = s.kt(args).await.code(3);
        assert!(out.stderr.starts_with("error: not found: "), "{out}");
        assert!(out.stdout.is_empty(), "{out}");
    }
}

#[tokio::test]
async fn test_invalid_input_is_exit_2_with_one_field_violation_per_line() {
    let s = Stack::api_only(ControlPlaneOptions::default()).await;
    let bad = r#"{"name": "bad", "kafka": {"hosts": ["::1:9092"], "topics": ["a b"]}, "webhook": {"url": "ftp://example.com"}}"#;
    let out = s.kt_stdin(&["triggers", "create", "-f", "-"], bad).await.code(2);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines[0], "error: invalid argument: the server refused these fields:", "{out}");
    for field in ["trigger.kafka.hosts[0]: ", "trigger.kafka.topics[0]: ", "trigger.webhook.url: "] {
        assert_eq!(lines.iter().filter(|l| l.starts_with(&format!("  {field}"))).count(), 1, "{field}: {out}");
    }

    // Refused before reaching the server: not JSON, unknown field, wrong
    // type, not there, a --set that names nothing.
    let cases = [
        ("{\"name\": ", "is not valid JSON"),
        ("{\"name\": \"x\", \"kafak\": {}}", "kafak"),
        ("name: [1, 2]\n", "is not a valid Trigger"),
        ("- a\n- b\n", "must hold one object"),
    ];
    for (text, expected) in cases {
        let file = temp_file("bad.json", text);
        let out = s.kt(&["triggers", "create", "-f", file.to_str().unwrap()]).await.code(2);
        assert!(out.stderr.contains(expected), "{expected}: {out}");
    }
    let out = s.kt(&["triggers", "create", "-f", "/nonexistent/trigger.yaml"]).await.code(2);
    assert!(out.stderr.contains("cannot read /nonexistent/trigger.yaml"), "{out}");
    let out = s.kt(&["triggers", "update", UNKNOWN_ID, "--set", "kafka.nope=1"]).await.code(2);
    assert!(out.stderr.contains("no field `nope`"), "{out}");
    let out = s.kt(&["triggers", "update", UNKNOWN_ID, "--set", "name"]).await.code(2);
    assert!(out.stderr.contains("PATH=VALUE"), "{out}");
    let out = s.kt(&["events", "--kind", "nope"]).await.code(2);
    assert!(out.stderr.contains("unknown event kind `nope`"), "{out}");
    let out = s.kt(&["events", "--after", "not-a-cursor"]).await.code(2);
    assert!(out.stderr.contains("after_cursor"), "the server's violation: {out}");

    // Usage errors are clap's, also exit 2.
    for args in [
        &["triggers", "frobnicate"][..],
        &["sets", "retry"],
        &["work-orders", "complete", "x"],
        &["-o", "xml", "triggers", "list"],
    ] {
        s.kt(args).await.code(2);
    }
    let out = s.kt(&["--tls-ca", "/etc/hostname", "triggers", "list"]).await.code(2);
    assert!(out.stderr.contains("https://"), "{out}");
}

#[tokio::test]
async fn test_unauthenticated_is_exit_4_and_a_token_gets_in() {
    let mut s = Stack::api_only(ControlPlaneOptions { api_token: Some("s3cret".into()), ..Default::default() }).await;
    s.token = None;
    let out = s.kt(&["triggers", "list"]).await.code(4);
    assert!(out.stderr.starts_with("error: unauthenticated: "), "{out}");
    assert!(out.stderr.contains("KT_API_TOKEN"), "the hint: {out}");
    s.kt(&["--token", "wrong", "triggers", "list"]).await.code(4);
    s.kt(&["events", "--follow"]).await.code(4);
    s.kt(&["--token", "s3cret", "triggers", "list"]).await.ok();
    s.token = Some("s3cret".into());
    let list = s.kt(&["triggers", "list"]).await.ok().json();
    assert_eq!(list["triggers"], serde_json::json!([]), "KT_API_TOKEN from the environment");
}

#[tokio::test]
async fn test_unavailable_is_exit_5() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = format!("http://127.0.0.1:{port}");
    for args in [&["triggers", "list"][..], &["sets", "list"], &["events", "--follow"], &["work-orders", "list"]] {
        let out = run(kt_command(&server, args), args, None).await.code(5);
        assert!(out.stderr.starts_with(&format!("error: unavailable: {server}: ")), "{out}");
    }
    // --server beats KT_SERVER.
    let s = Stack::api_only(ControlPlaneOptions::default()).await;
    let args = ["--server", &s.cp.url(), "triggers", "list"];
    run(kt_command(&server, &args), &args, None).await.ok();
}
