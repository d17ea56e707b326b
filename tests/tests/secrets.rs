//! Credentials: encrypted at rest, never in API responses, never in logs.
//! This file installs a global log subscriber that captures every line, so it
//! is its own test binary.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use kt_proto::internal::node_message::Msg;
use kt_proto::internal::node_service_client::NodeServiceClient;
use kt_proto::internal::{control_message, Hello, NodeMessage};
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::{sample_trigger, wait_for, ControlPlaneOptions, TestControlPlane, TestDb};
use tonic::Code;
use tonic_types::StatusExt as _;

const PASSWORD: &str = "pw-Sup3r-S3cret-Value";
const HEADER_SECRET: &str = "hdr-T0ken-Never-Logged";
const KEY_BODY: &str = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-private-bytes";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt().with_env_filter("trace").with_writer(move || writer.clone()).with_ansi(false).init();
        captured
    })
    .clone()
}

fn secret_trigger(name: &str) -> Trigger {
    let mut t = sample_trigger(name, "localhost:9092", "orders");
    let k = t.kafka.as_mut().unwrap();
    k.sasl = SaslMechanism::ScramSha512.into();
    k.username = "svc-user".into();
    k.password = PASSWORD.into();
    k.ssl = true;
    k.ssl_client_cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into();
    k.ssl_client_key = format!("-----BEGIN PRIVATE KEY-----\n{KEY_BODY}\n-----END PRIVATE KEY-----\n");
    t.webhook.as_mut().unwrap().headers = vec![
        Header { name: "x-api-key".into(), value: HEADER_SECRET.into(), secret: true },
        Header { name: "x-team".into(), value: "payments".into(), secret: false },
    ];
    t
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [PASSWORD, HEADER_SECRET, KEY_BODY] {
        assert!(!text.contains(secret), "{what} contains a secret value");
    }
}

#[tokio::test]
async fn test_secrets_are_encrypted_hidden_and_never_logged() {
    let logs = capture_logs();
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());

    let created = client
        .create_trigger(CreateTriggerRequest { trigger: Some(secret_trigger("secure")) })
        .await
        .unwrap()
        .into_inner();
    let k = created.kafka.as_ref().unwrap();
    assert!(k.password.is_empty() && k.password_set);
    assert!(k.ssl_client_key.is_empty() && k.ssl_client_key_set);
    let headers = &created.webhook.as_ref().unwrap().headers;
    assert_eq!(headers[0].value, "", "secret header value is not returned");
    assert!(headers[0].secret);
    assert_eq!(headers[1].value, "payments");
    assert_no_secret("CreateTrigger response", &format!("{created:?}"));

    // Echo the trigger back with a change: secrets are kept, not erased.
    let mut echoed = created.clone();
    echoed.name = "secure-renamed".into();
    let updated = client
        .update_trigger(UpdateTriggerRequest { trigger: Some(echoed), update_mask: None })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.kafka.as_ref().unwrap().password_set);
    for resp in [
        format!("{:?}", client.get_trigger(GetTriggerRequest { id: created.id.clone() }).await.unwrap()),
        format!("{:?}", client.list_triggers(ListTriggersRequest::default()).await.unwrap()),
    ] {
        assert_no_secret("read response", &resp);
    }

    // The raw tables hold ciphertext only.
    let pool = db.pool().await.unwrap();
    let dump: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT t::text, COALESCE(secrets_ciphertext, '') FROM triggers t")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(dump.len(), 1);
    assert_no_secret("triggers row", &dump[0].0);
    let cipher = &dump[0].1;
    assert!(cipher.len() > 32);
    for secret in [PASSWORD, HEADER_SECRET, KEY_BODY] {
        assert!(!cipher.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
    let events: Vec<String> = sqlx::query_scalar("SELECT e::text FROM events e").fetch_all(&pool).await.unwrap();
    assert!(!events.is_empty());
    for e in &events {
        assert_no_secret("event row", e);
    }

    // The node protocol is the one place secrets travel: decrypted for the
    // consumer that needs them.
    let mut nodes = NodeServiceClient::new(cp.authed(kt_tests::TEST_NODE_TOKEN).await.unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(NodeMessage {
        msg: Some(Msg::Hello(Hello {
            node_id: "n1".into(),
            schema_version: kt_common::db::expected_schema_version(),
            version: "test".into(),
        })),
    })
    .await
    .unwrap();
    let mut inbound = nodes.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let assignment = loop {
        match inbound.message().await.unwrap().unwrap().msg {
            Some(control_message::Msg::Assignment(a)) => break a,
            _ => continue,
        }
    };
    let trigger = assignment.pipelines[0].trigger.as_ref().unwrap();
    assert_eq!(trigger.kafka.as_ref().unwrap().password, PASSWORD);
    assert_eq!(trigger.webhook.as_ref().unwrap().headers[0].value, HEADER_SECRET);
    drop(tx);

    // Everything logged so far, at TRACE, is free of secrets.
    let text = wait_for("logs to contain the trigger id", std::time::Duration::from_secs(5), || {
        let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        let found = text.contains(&created.id);
        async move { found.then_some(text) }
    })
    .await
    .unwrap();
    assert!(text.contains("trigger created"));
    assert_no_secret("logs", &text);
}

#[tokio::test]
async fn test_credentials_without_encryption_key_are_refused() {
    capture_logs();
    let db = TestDb::create().await.unwrap();
    let opts = ControlPlaneOptions { encryption_key: Some(String::new()), ..Default::default() };
    let cp = TestControlPlane::start(&db, opts).await.unwrap();
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());

    let status =
        client.create_trigger(CreateTriggerRequest { trigger: Some(secret_trigger("needs-key")) }).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("KT_ENCRYPTION_KEY"), "{}", status.message());

    // Triggers without credentials need no key.
    client.create_trigger(CreateTriggerRequest { trigger: Some(sample_trigger("plain", "b:1", "t")) }).await.unwrap();
}

fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    let details = status.get_details_bad_request().expect("field violations");
    details.field_violations.into_iter().map(|v| (v.field, v.description)).collect()
}

/// A case: its name, what it changes, the field it must be refused on, and a
/// word the field's description names.
type Refusal<'a> = (&'a str, &'a dyn Fn(&mut Trigger), &'a str, &'a str);

/// Pins issue #10 item 5: an update that only moved the destination kept
/// the stored secrets, so the secret header went to the new URL and the
/// password would have gone to the new broker.
#[tokio::test]
async fn test_a_secret_must_be_sent_again_when_its_destination_changes() {
    capture_logs();
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());
    let mut initial = secret_trigger("follows");
    initial.kafka.as_mut().unwrap().hosts = vec!["a:9092".into(), "b:9092".into()];
    let created = client.create_trigger(CreateTriggerRequest { trigger: Some(initial) }).await.unwrap().into_inner();
    let update = |change: &dyn Fn(&mut Trigger)| {
        let mut t = created.clone();
        change(&mut t);
        UpdateTriggerRequest { trigger: Some(t), update_mask: None }
    };

    let refused: [Refusal; 4] = [
        (
            "a new broker",
            &|t| t.kafka.as_mut().unwrap().hosts.push("evil:9092".into()),
            "trigger.kafka.password",
            "evil:9092",
        ),
        (
            "another SASL mechanism",
            &|t| t.kafka.as_mut().unwrap().sasl = SaslMechanism::Plain.into(),
            "trigger.kafka.password",
            "kafka.sasl",
        ),
        (
            "TLS turned off",
            &|t| {
                let k = t.kafka.as_mut().unwrap();
                k.ssl = false;
                k.ssl_client_cert.clear();
                k.ssl_client_key.clear();
            },
            "trigger.kafka.password",
            "kafka.ssl",
        ),
        (
            "another webhook URL",
            &|t| t.webhook.as_mut().unwrap().url = "http://127.0.0.1:9/other-tenant".into(),
            "trigger.webhook.headers[0].value",
            "x-api-key",
        ),
    ];
    for (what, change, field, named) in refused {
        let status = client.update_trigger(update(change)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}");
        let found = violations(&status);
        assert!(
            found.iter().any(|(f, d)| f == field && d.contains("must be sent again") && d.contains(named)),
            "{what}: {found:?}"
        );
    }
    // Nothing changed meanwhile.
    let stored = client.get_trigger(GetTriggerRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(stored.generation, created.generation);

    // Sent again with the new destination, the change is accepted; so is
    // dropping a broker, which sends the password nowhere new.
    let moved = update(&|t| {
        t.kafka.as_mut().unwrap().hosts = vec!["b:9092".into(), "c:9092".into()];
        t.kafka.as_mut().unwrap().password = "pw-for-the-new-broker".into();
        t.webhook.as_mut().unwrap().url = "http://127.0.0.1:9/new".into();
        t.webhook.as_mut().unwrap().headers[0].value = "hdr-for-the-new-url".into();
    });
    let moved = client.update_trigger(moved).await.unwrap().into_inner();
    let mut fewer = moved.clone();
    fewer.kafka.as_mut().unwrap().hosts = vec!["c:9092".into()];
    let fewer = UpdateTriggerRequest { trigger: Some(fewer), update_mask: None };
    let fewer = client.update_trigger(fewer).await.unwrap().into_inner();
    assert!(fewer.kafka.unwrap().password_set);

    // The new values are what a node now receives.
    let pool = db.pool().await.unwrap();
    let keys = kt_common::crypto::Keyring::from_base64([kt_tests::TEST_ENCRYPTION_KEY]).unwrap();
    let triggers = kt_control_plane::triggers::TriggerService::new(pool, keys);
    let (_, secrets) = triggers.enabled_with_secrets().await.unwrap().pop().unwrap();
    assert_eq!(secrets.password.unwrap().expose(), "pw-for-the-new-broker");
    assert_eq!(secrets.headers["x-api-key"].expose(), "hdr-for-the-new-url");
}

/// Pins issue #10 item 8: a ciphertext that fails to decrypt was reported
/// as `Internal: credential encryption failed`, naming nothing.
#[tokio::test]
async fn test_a_decrypt_failure_is_a_failed_precondition_naming_the_key() {
    capture_logs();
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut client = TriggerServiceClient::new(cp.channel().await.unwrap());
    let created = client
        .create_trigger(CreateTriggerRequest { trigger: Some(secret_trigger("tampered")) })
        .await
        .unwrap()
        .into_inner();
    let pool = db.pool().await.unwrap();
    let key_id: String = sqlx::query_scalar(
        "UPDATE triggers SET secrets_ciphertext = set_byte(secrets_ciphertext, 20, get_byte(secrets_ciphertext, 20) # 1)
          RETURNING secrets_key_id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();

    let mut renamed = created.clone();
    renamed.name = "tampered-renamed".into();
    let status =
        client.update_trigger(UpdateTriggerRequest { trigger: Some(renamed), update_mask: None }).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(&key_id) && status.message().contains("failed authentication"),
        "{}",
        status.message()
    );
}
