//! The command-line contract of both binaries (DESIGN §8): `migrate`, help
//! for every flag with its environment variable, JSON logs, a clean stop on
//! SIGTERM, and a node refusing a database at another schema version.

use std::process::Stdio;
use std::time::Duration;

use kt_tests::{workspace_binary, TestDb, TEST_NODE_TOKEN};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn test_migrate_subcommand_applies_every_migration() {
    let db = TestDb::create().await.unwrap();
    let out = Command::new(workspace_binary("control-plane").unwrap())
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pool = db.pool().await.unwrap();
    assert_eq!(kt_common::db::applied_schema_version(&pool).await.unwrap(), kt_common::db::expected_schema_version());
}

#[tokio::test]
async fn test_help_explains_every_flag_and_its_environment_variable() {
    let contract = [
        (
            "control-plane",
            &[
                "--database-url",
                "DATABASE_URL",
                "--grpc-listen",
                "KT_GRPC_LISTEN",
                "--metrics-listen",
                "KT_METRICS_LISTEN",
                "--api-token",
                "KT_API_TOKEN",
                "--node-token",
                "KT_NODE_TOKEN",
                "--insecure-open-node-protocol",
                "KT_INSECURE_OPEN_NODE_PROTOCOL",
                "--encryption-key",
                "KT_ENCRYPTION_KEY",
                "KT_LOG_FORMAT",
                "SENTRY_DSN",
                "migrate",
            ][..],
        ),
        (
            "data-plane",
            &[
                "--control-plane-url",
                "KT_CONTROL_PLANE_URL",
                "--database-url",
                "DATABASE_URL",
                "--node-token",
                "KT_NODE_TOKEN",
                "--node-id",
                "KT_NODE_ID",
                "--workers",
                "KT_WORKERS",
                "--metrics-listen",
                "KT_METRICS_LISTEN",
                "KT_LOG_FORMAT",
                "SENTRY_DSN",
            ][..],
        ),
    ];
    for (binary, names) in contract {
        let out = Command::new(workspace_binary(binary).unwrap())
            .arg("--help")
            .env("KT_API_TOKEN", "must-not-be-printed")
            .env("KT_NODE_TOKEN", "must-not-be-printed")
            .output()
            .await
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        for name in names {
            assert!(help.contains(name), "{binary} --help does not mention {name}:\n{help}");
        }
        assert!(!help.contains("must-not-be-printed"), "{binary} --help shows a token from the environment");
    }
}

#[tokio::test]
async fn test_control_plane_logs_json_and_stops_cleanly_on_sigterm() {
    let db = TestDb::create().await.unwrap();
    let mut child = Command::new(workspace_binary("control-plane").unwrap())
        .env("DATABASE_URL", &db.url)
        .env("KT_GRPC_LISTEN", "127.0.0.1:0")
        .env("KT_NODE_TOKEN", TEST_NODE_TOKEN)
        .env("KT_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
            assert!(json["level"].is_string(), "{line}");
            if json["message"] == "control plane listening" {
                return json;
            }
        }
        panic!("the control plane exited before listening");
    })
    .await
    .unwrap();
    assert!(listening["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{listening}");

    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().await.unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("stops in time").unwrap();
    assert!(status.success(), "{status:?}");
}

/// Pins issue #10 item 1: without a node token the node protocol handed
/// decrypted credentials to anyone; now that takes an explicit flag.
#[tokio::test]
async fn test_control_plane_refuses_to_start_without_a_node_token_or_the_insecure_flag() {
    let db = TestDb::create().await.unwrap();
    let control_plane = || {
        let mut command = Command::new(workspace_binary("control-plane").unwrap());
        command
            .env("DATABASE_URL", &db.url)
            .env("KT_GRPC_LISTEN", "127.0.0.1:0")
            .env_remove("KT_NODE_TOKEN")
            .env_remove("KT_INSECURE_OPEN_NODE_PROTOCOL")
            .env_remove("KT_NODE_CLIENT_CA")
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        command
    };
    let out =
        tokio::time::timeout(Duration::from_secs(30), control_plane().output()).await.expect("exits at once").unwrap();
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("refusing to start without node authentication"), "{text}");
    assert!(text.contains("--node-token") && text.contains("--insecure-open-node-protocol"), "{text}");
    assert!(text.contains("--node-client-ca"), "{text}");

    // Asked for by name, it runs open, and says so loudly.
    let mut child = control_plane().arg("--insecure-open-node-protocol").stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let warning = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("the node protocol is open") {
                return line;
            }
        }
        panic!("the control plane exited without warning that the node protocol is open");
    })
    .await
    .unwrap();
    assert!(warning.contains("WARN") && warning.contains("decrypted credentials"), "{warning}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn test_data_plane_refuses_a_database_at_another_schema_version() {
    let db = TestDb::create().await.unwrap();
    let pool = db.pool().await.unwrap();
    kt_common::db::migrate(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (9999, 'from the future', true, '\\x00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(workspace_binary("data-plane").unwrap())
            .env("DATABASE_URL", &db.url)
            .env("KT_CONTROL_PLANE_URL", "http://127.0.0.1:9")
            .output(),
    )
    .await
    .expect("exits in time")
    .unwrap();
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("schema") && text.contains("9999"), "{text}");
}

/// Issue #10 item 7: an old key could only be retired by editing every
/// trigger. `rotate-keys` re-encrypts them all with the current key.
#[tokio::test]
async fn test_rotate_keys_re_encrypts_every_trigger_so_the_old_key_can_go() {
    use kt_common::crypto::Keyring;
    use kt_control_plane::triggers::TriggerService;

    const OLD: &str = "b2xkLWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMzQ1Njc=";
    const NEW: &str = "bmV3LWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMzQ1Njc=";
    const LOST: &str = "bG9zdC1rZXktMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY=";
    let db = TestDb::create().await.unwrap();
    let pool = db.pool().await.unwrap();
    kt_common::db::migrate(&pool).await.unwrap();
    let with_password = |name: &str, password: &str| {
        let mut t = kt_tests::sample_trigger(name, "b:9092", "t");
        let k = t.kafka.as_mut().unwrap();
        k.sasl = kt_proto::v1::SaslMechanism::Plain.into();
        k.username = "svc".into();
        k.password = password.into();
        t
    };
    let under_old = TriggerService::new(pool.clone(), Keyring::from_base64([OLD]).unwrap());
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(under_old.create(&with_password(&format!("t{i}"), &format!("pw-{i}"))).await.unwrap().id);
    }
    under_old.create(&kt_tests::sample_trigger("no-secrets", "b:9092", "t")).await.unwrap();
    let generations = || async {
        sqlx::query_scalar::<_, i64>("SELECT generation FROM triggers ORDER BY id").fetch_all(&pool).await.unwrap()
    };
    let before = generations().await;

    let rotate = |keys: [&str; 2]| {
        Command::new(workspace_binary("control-plane").unwrap())
            .arg("rotate-keys")
            .env("DATABASE_URL", &db.url)
            .env("KT_ENCRYPTION_KEY", keys[0])
            .env("KT_OLD_ENCRYPTION_KEYS", keys[1])
            .env_remove("KT_NODE_TOKEN")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .output()
    };
    let out = rotate([NEW, OLD]).await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("rotated=3"), "{text}");

    // With the new key alone every credential is still there; no
    // configuration changed, so no pipeline restarts.
    let under_new = TriggerService::new(pool.clone(), Keyring::from_base64([NEW]).unwrap());
    let mut opened = under_new.enabled_with_secrets().await.unwrap();
    opened.retain(|(row, _)| ids.contains(&row.id));
    let passwords: Vec<String> = opened.iter().map(|(_, s)| s.password.as_ref().unwrap().expose().to_owned()).collect();
    assert_eq!(passwords, ["pw-0", "pw-1", "pw-2"]);
    assert_eq!(generations().await, before);

    // A trigger under a key nobody configured is named, and the run fails.
    let lost = TriggerService::new(pool.clone(), Keyring::from_base64([LOST]).unwrap());
    let orphan = lost.create(&with_password("orphan", "pw-lost")).await.unwrap().id;
    let out = rotate([NEW, OLD]).await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&orphan.to_string()) && text.contains("not configured"), "{text}");

    // An update that changes nothing also moves a trigger to the current key.
    let both = TriggerService::new(pool.clone(), Keyring::from_base64([NEW, LOST]).unwrap());
    let row = both.get(orphan).await.unwrap();
    let same = kt_common::trigger::spec_to_proto(&row.spec, None);
    let updated = both.update(orphan, &same, &[]).await.unwrap();
    assert_ne!(updated.secrets_key_id, row.secrets_key_id);
    assert_eq!(updated.generation, row.generation);
    assert_eq!(under_new.enabled_with_secrets().await.unwrap().len(), 5);
}
