//! Executes the README's grpcurl walkthrough against a real control plane,
//! exactly as written except for the listen address.

use std::collections::BTreeMap;

use kt_tests::readme::{blocks, grpcurl, readme_path, run_blocks};
use kt_tests::{ControlPlaneOptions, TestControlPlane, TestDb};

#[tokio::test]
async fn test_readme_trigger_walkthrough_runs_as_written() {
    let grpcurl = grpcurl().unwrap();
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let readme = std::fs::read_to_string(readme_path()).unwrap();
    let dir = std::env::temp_dir().join(format!("kt-readme-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    // Same commands, pointed at this control plane and run in a temp dir so
    // `trigger.json` lands there.
    let mut walkthrough = blocks(&readme, "triggers").unwrap();
    for block in &mut walkthrough {
        block.code = format!("cd '{}'\n{}", dir.display(), block.code.replace("localhost:50051", &cp.addr.to_string()));
    }
    let grpcurl_dir = std::path::Path::new(&grpcurl).parent().unwrap().display().to_string();
    let env = BTreeMap::from([
        ("PATH".to_owned(), format!("{grpcurl_dir}:{}", std::env::var("PATH").unwrap_or_default())),
        ("HOME".to_owned(), dir.display().to_string()),
    ]);
    let outputs = run_blocks(&walkthrough, &env).await.unwrap();

    assert!(outputs[0].contains("kafka_triggers.v1.TriggerService"), "{}", outputs[0]);
    assert!(outputs[0].contains("grpc.health.v1.Health"));
    assert!(outputs[1].contains("\"groupId\": \"kafka-triggers-"), "{}", outputs[1]);
    let lifecycle = &outputs[2];
    assert!(lifecycle.contains("\"refunds\""), "update applied: {lifecycle}");
    assert!(lifecycle.contains("\"generation\": \"4\""), "disable + enable bumped the generation: {lifecycle}");
    let pool = db.pool().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM triggers").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 0, "the walkthrough deletes its trigger");
    let invalid = &outputs[3];
    for field in ["trigger.kafka.topics[0]", "trigger.webhook.url"] {
        assert!(invalid.contains(field), "{invalid}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
