//! Executes the README's walkthroughs (the stack on `kt`, managing triggers
//! with `kt` and with grpcurl) against a real control plane, exactly as
//! written except for the listen address.

use std::collections::BTreeMap;

use kt_tests::readme::{blocks, grpcurl, readme_path, run_blocks};
use kt_tests::{workspace_binary, ControlPlaneOptions, TestControlPlane, TestDb};

/// PATH with the workspace's `kt` in front.
fn kt_path() -> String {
    let kt = workspace_binary("kt").unwrap();
    format!("{}:{}", kt.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default())
}

#[tokio::test]
async fn test_readme_kt_walkthrough_runs_as_written() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let readme = std::fs::read_to_string(readme_path()).unwrap();
    let dir = std::env::temp_dir().join(format!("kt-readme-kt-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut walkthrough = blocks(&readme, "kt").unwrap();
    for block in &mut walkthrough {
        block.code = format!("cd '{}'\n{}", dir.display(), block.code);
    }
    // kt's default server is 127.0.0.1:50051; KT_SERVER points it here.
    let env = BTreeMap::from([
        ("PATH".to_owned(), kt_path()),
        ("HOME".to_owned(), dir.display().to_string()),
        ("KT_SERVER".to_owned(), cp.url()),
    ]);
    let outputs = run_blocks(&walkthrough, &env).await.unwrap();

    let created: serde_json::Value =
        serde_json::from_str(&outputs[0]).unwrap_or_else(|e| panic!("{e}: {}", outputs[0]));
    assert!(created["kafka"]["groupId"].as_str().unwrap().starts_with("kafka-triggers-"), "{created}");
    let lifecycle = &outputs[1];
    assert!(lifecycle.contains("\"refunds\""), "update applied: {lifecycle}");
    assert!(lifecycle.contains("\"generation\": \"5\""), "update, disable, enable, replace: {lifecycle}");
    assert!(lifecycle.contains("\"maxAttempts\": 8"), "the edited file replaced the configuration: {lifecycle}");
    assert!(lifecycle.contains("\"deleted\": true"), "{lifecycle}");
    let pool = db.pool().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM triggers").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 0, "the walkthrough deletes its trigger");
    let invalid = &outputs[2];
    for field in ["\n  trigger.kafka.topics[0]: ", "\n  trigger.webhook.url: "] {
        assert!(invalid.contains(field), "one violation per line: {invalid}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs the grpcurl walkthrough `name` against a fresh control plane, the
/// same commands pointed at it and run in a temp dir (so files such as
/// `trigger.json` land there). Returns the database and each block's output.
async fn run_grpcurl_walkthrough(name: &str) -> (TestDb, Vec<String>) {
    let grpcurl = grpcurl().unwrap();
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let readme = std::fs::read_to_string(readme_path()).unwrap();
    let dir = std::env::temp_dir().join(format!("kt-readme-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut walkthrough = blocks(&readme, name).unwrap();
    for block in &mut walkthrough {
        block.code = format!("cd '{}'\n{}", dir.display(), block.code.replace("localhost:50051", &cp.addr.to_string()));
    }
    let grpcurl_dir = std::path::Path::new(&grpcurl).parent().unwrap().display().to_string();
    let env = BTreeMap::from([
        ("PATH".to_owned(), format!("{grpcurl_dir}:{}", std::env::var("PATH").unwrap_or_default())),
        ("HOME".to_owned(), dir.display().to_string()),
    ]);
    let outputs = run_blocks(&walkthrough, &env).await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
    (db, outputs)
}

#[tokio::test]
async fn test_readme_trigger_walkthrough_runs_as_written() {
    let (db, outputs) = run_grpcurl_walkthrough("triggers").await;
    assert!(outputs[0].contains("kafka_triggers.v1.TriggerService"), "{}", outputs[0]);
    assert!(outputs[0].contains("grpc.health.v1.Health"));
    assert!(outputs[1].contains("\"groupId\": \"kafka-triggers-"), "{}", outputs[1]);
    let cloudevents = &outputs[2];
    assert!(cloudevents.contains("\"format\": \"WEBHOOK_FORMAT_CLOUDEVENTS\""), "format updated: {cloudevents}");
    assert!(cloudevents.contains("\"url\": \"http://localhost:8080/hook\""), "the mask kept the url: {cloudevents}");
    assert!(cloudevents.contains("\"generation\": \"2\""), "{cloudevents}");
    let lifecycle = &outputs[3];
    assert!(lifecycle.contains("\"refunds\""), "update applied: {lifecycle}");
    assert!(lifecycle.contains("WEBHOOK_FORMAT_CLOUDEVENTS"), "the format stays: {lifecycle}");
    assert!(lifecycle.contains("\"generation\": \"5\""), "disable + enable bumped the generation: {lifecycle}");
    let pool = db.pool().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM triggers").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 0, "the walkthrough deletes its trigger");
    let invalid = &outputs[4];
    for field in ["trigger.kafka.topics[0]", "trigger.webhook.url"] {
        assert!(invalid.contains(field), "{invalid}");
    }
}

#[tokio::test]
async fn test_readme_filters_walkthrough_runs_as_written() {
    let (_db, outputs) = run_grpcurl_walkthrough("filters").await;
    let changed = &outputs[0];
    // grpcurl escapes `&` and `>` in JSON strings; the part before them is enough.
    assert!(changed.contains(r#""filter": "value.type == \"order\" "#), "created: {changed}");
    assert!(changed.contains(r#""filter": "headers['source'] == 'web'""#), "updated: {changed}");
    assert!(changed.contains("\"generation\": \"2\""), "{changed}");
    assert!(outputs[1].contains("trigger.filter: ERROR: <input>:1:"), "{}", outputs[1]);
}

#[tokio::test]
async fn test_readme_ordering_walkthrough_runs_as_written() {
    let (_db, outputs) = run_grpcurl_walkthrough("ordering").await;
    let changed = &outputs[0];
    assert!(changed.contains(r#""ordering": "ORDERING_PARTITION""#), "created: {changed}");
    assert!(changed.contains(r#""ordering": "ORDERING_UNORDERED""#), "updated: {changed}");
    assert!(changed.contains("\"generation\": \"2\""), "{changed}");
    assert!(outputs[1].contains("trigger.ordering: unknown ordering mode 7"), "{}", outputs[1]);
}

#[tokio::test]
async fn test_readme_operating_walkthrough_runs_as_written() {
    let (_db, outputs) = run_grpcurl_walkthrough("operating").await;
    let health = &outputs[0];
    assert_eq!(health.matches("\"status\": \"SERVING\"").count(), 5, "the server and four services: {health}");
    let created = &outputs[1];
    assert_eq!(created.matches("\"enabled\": false").count(), 2, "created and read back disabled: {created}");
    let status = &outputs[2];
    let disabled = status.find("\"health\": \"TRIGGER_HEALTH_DISABLED\"").expect(status);
    let degraded = status.find("\"health\": \"TRIGGER_HEALTH_DEGRADED\"").expect(status);
    assert!(disabled < degraded, "disabled, then enabled: {status}");
    assert!(status.contains("\"reason\": \"no data-plane node is connected\""), "{status}");
    let lookups = &outputs[3];
    // Two empty answers (grpcurl leaves out empty fields).
    assert_eq!(lookups.split_whitespace().collect::<String>(), "{}{}", "{lookups}");
    let invalid = &outputs[4];
    for violation in ["key_utf8: cannot be combined with key", "partition: is required", "offset_from: must not be"] {
        assert!(invalid.contains(violation), "{violation}: {invalid}");
    }
}

#[tokio::test]
async fn test_readme_dead_letters_walkthrough_runs_as_written() {
    let (_db, outputs) = run_grpcurl_walkthrough("deadletters").await;
    let created = &outputs[0];
    assert!(created.contains("\"onFailure\": \"ON_FAILURE_DEAD_LETTER\""), "{created}");
    assert!(created.contains("\"deadLetterTopic\": \"payments.dead\""), "{created}");
    let compact: String = created.split_whitespace().collect();
    assert!(compact.ends_with("}{}"), "no dead letters yet: {created}");
    let updated = &outputs[1];
    assert!(updated.contains("\"onFailure\": \"ON_FAILURE_BLOCK\""), "{updated}");
    assert!(!updated.contains("deadLetterTopic"), "{updated}");
    let invalid = &outputs[2];
    assert!(invalid.contains("dead_letter_topic: is only valid with on_failure ON_FAILURE_DEAD_LETTER"), "{invalid}");
}

#[tokio::test]
async fn test_readme_stack_walkthrough_runs_as_written() {
    let grpcurl = grpcurl().unwrap();
    let db = TestDb::create().await.unwrap();
    let dir = std::env::temp_dir().join(format!("kt-stack-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.join("stack.log")).unwrap();
    let mut stack = tokio::process::Command::new(kt_tests::workspace_binary("stack").unwrap())
        .args(["--grpc-listen", "127.0.0.1:0", "--webhook-listen", "127.0.0.1:0"])
        .current_dir(&dir)
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .env_remove("KT_BROKERS")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let env_file = dir.join(".stack/env");
    kt_tests::wait_for("the stack to write .stack/env", std::time::Duration::from_secs(60), || {
        let ready = std::fs::read_to_string(&env_file).is_ok_and(|t| t.contains("KT_TRIGGER_ID="));
        async move { ready.then_some(()) }
    })
    .await
    .unwrap();

    let readme = std::fs::read_to_string(readme_path()).unwrap();
    let mut walkthrough = blocks(&readme, "stack").unwrap();
    for block in &mut walkthrough {
        block.code = format!("cd '{}'\n{}", dir.display(), block.code);
    }
    let env_text = std::fs::read_to_string(&env_file).unwrap();
    assert!(env_text.contains("KT_SERVER=http://127.0.0.1:"), "{env_text}");
    let kt_dir = workspace_binary("kt").unwrap().parent().unwrap().display().to_string();
    assert!(env_text.contains(&format!("PATH=\"{kt_dir}:$PATH\"")), "kt on the PATH: {env_text}");
    // Without kt on the test's own PATH: `source .stack/env` provides it.
    let grpcurl_dir = std::path::Path::new(&grpcurl).parent().unwrap().display().to_string();
    let env = BTreeMap::from([
        ("PATH".to_owned(), format!("{grpcurl_dir}:{}", std::env::var("PATH").unwrap_or_default())),
        ("HOME".to_owned(), dir.display().to_string()),
    ]);
    let outputs = tokio::time::timeout(std::time::Duration::from_secs(120), run_blocks(&walkthrough, &env))
        .await
        .expect("the walkthrough finishes in time")
        .unwrap();
    assert!(outputs[0].contains("\"WORK_ORDER_STATE_SUCCESS\""), "{}", outputs[0]);
    assert_eq!(outputs[1].lines().count(), 3, "one line per event: {}", outputs[1]);
    assert!(outputs[1].lines().all(|l| l.contains("EVENT_KIND_WORK_ORDER_SUCCEEDED")), "{}", outputs[1]);
    assert!(outputs[2].contains("MESSAGE_SET_STATE_BLOCKED"), "{}", outputs[2]);
    assert!(outputs[2].contains("\"blockedSets\": \"1\""), "kt triggers status: {}", outputs[2]);
    assert!(outputs[2].contains("\"health\": \"TRIGGER_HEALTH_DEGRADED\""), "a blocked set: {}", outputs[2]);
    assert!(outputs[2].contains("\"reason\": \"1 blocked set(s), the oldest blocked for "), "{}", outputs[2]);
    assert!(outputs[3].contains("EVENT_KIND_SET_UNBLOCKED"), "the retry: {}", outputs[3]);
    assert!(outputs[4].contains("\"ok\": true"), "the connection test: {}", outputs[4]);
    assert!(outputs[4].contains("\"committedOffset\""), "the group's offsets: {}", outputs[4]);

    // The stack printed user-7's deliveries: failures, then both in order.
    let printed = std::fs::read_to_string(dir.join("stack.log")).unwrap();
    let user7: Vec<&str> = printed.lines().filter(|l| l.contains("key=user-7")).collect();
    assert!(user7.len() >= 5, "{printed}");
    let ok: Vec<&str> = user7.iter().copied().filter(|l| l.starts_with("webhook <- 200")).collect();
    assert_eq!(ok.len(), 2, "{printed}");
    assert!(ok[0].contains(r#"{"n":4}"#) && ok[1].contains(r#"{"n":5}"#), "{printed}");
    stack.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
