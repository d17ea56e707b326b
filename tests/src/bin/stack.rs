//! `stack`: the whole system on one machine, for trying it out. A control
//! plane, one data-plane node, an in-process Kafka broker (librdkafka's mock
//! cluster) unless `--brokers` is given, and a local webhook receiver that
//! prints every delivery. With `--demo` (the default) it also creates a demo
//! trigger and prints what to try next. `scripts/stack.sh` provides Postgres.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kt_common::crypto::Keyring;
use kt_common::secret::Secret;
use kt_kafka_testing::mock::MockKafka;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::webhook::WebhookReceiver;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "stack", about = "Run control plane, data plane, broker and a webhook receiver together")]
struct Args {
    /// Postgres URL of the stack's database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Kafka bootstrap servers; none = an in-process mock cluster.
    #[arg(long, env = "KT_BROKERS")]
    brokers: Option<String>,
    /// Where the control plane listens.
    #[arg(long, env = "KT_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    grpc_listen: SocketAddr,
    /// Where the demo webhook receiver listens.
    #[arg(long, env = "KT_WEBHOOK_LISTEN", default_value = "127.0.0.1:8080")]
    webhook_listen: SocketAddr,
    /// Topic of the demo trigger (created with 3 partitions on the mock cluster).
    #[arg(long, default_value = "orders")]
    topic: String,
    /// Create the demo trigger (skip with --demo=false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    demo: bool,
    /// Base64 key for credentials; without one a random key is used for this
    /// run only.
    #[arg(long, env = "KT_ENCRYPTION_KEY", hide_env_values = true)]
    encryption_key: Option<String>,
    /// Write shell variables (KT_BROKERS, KT_TRIGGER_ID, ...) to this file.
    #[arg(long, default_value = ".stack/env")]
    env_file: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = kt_common::telemetry::init("stack", kt_common::telemetry::LogFormat::Text, None);
    let shutdown = kt_common::telemetry::shutdown_on_signal();

    let mock = match &args.brokers {
        Some(_) => None,
        None => {
            let mock = MockKafka::new(1).context("failed to start the in-process Kafka broker")?;
            mock.create_topic(&args.topic, 3)?;
            Some(mock)
        }
    };
    let brokers = args.brokers.clone().unwrap_or_else(|| mock.as_ref().expect("mock").bootstrap_servers());

    let key = match &args.encryption_key {
        Some(k) => k.clone(),
        None => {
            use base64::Engine as _;
            let raw: [u8; 32] = rand::random();
            base64::engine::general_purpose::STANDARD.encode(raw)
        }
    };
    // Both planes live in this process, so a token of this run only
    // authenticates the node without anything to configure; nothing else
    // (a stray client on the port) can take the node's place.
    let node_token = {
        let raw: [u8; 32] = rand::random();
        Secret::new(raw.iter().map(|b| format!("{b:02x}")).collect::<String>())
    };
    let cp_config = kt_control_plane::Config {
        grpc_listen: args.grpc_listen,
        node_token: Some(node_token.clone()),
        keys: Keyring::from_base64([key.as_str()])?,
        heartbeat: Duration::from_secs(2),
        ..kt_control_plane::Config::new(args.database_url.clone())
    };
    let cp = kt_control_plane::start(cp_config, shutdown.clone()).await?;
    let cp_url = format!("http://{}", cp.addr);

    let receiver = WebhookReceiver::start(args.webhook_listen)
        .await
        .with_context(|| format!("failed to listen on {} for the demo webhook", args.webhook_listen))?;

    let mut node_config = kt_data_plane::Config::new(args.database_url.clone(), cp_url.clone());
    node_config.ingest.batch_linger = Duration::from_millis(5);
    node_config.ingest.commit_interval = Duration::from_millis(500);
    node_config.ingest.session_timeout = Duration::from_secs(6);
    node_config.ingest.heartbeat_interval = Duration::from_millis(500);
    node_config.heartbeat_interval = Duration::from_secs(2);
    node_config.node_token = Some(node_token);
    let node_shutdown = CancellationToken::new();
    let node = tokio::spawn(kt_data_plane::run(node_config, node_shutdown.clone()));

    let trigger_id =
        if args.demo { Some(create_demo_trigger(&cp_url, &brokers, &args.topic, &receiver).await?) } else { None };
    write_env_file(&args, &brokers, &cp, &receiver, trigger_id.as_deref())?;
    print_next_steps(&args, &brokers, &cp.addr, &receiver, trigger_id.as_deref());

    // Print deliveries as they arrive.
    let mut counter = receiver.counter();
    let mut printed = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = counter.changed() => {
                if changed.is_err() {
                    break;
                }
                let all = receiver.deliveries();
                for d in &all[printed..] {
                    println!(
                        "webhook <- {} key={} partition={} offset={} data={}",
                        d.status,
                        d.key().unwrap_or("(none)"),
                        d.partition(),
                        d.offset(),
                        d.body["data"]
                    );
                }
                printed = all.len();
            }
        }
    }
    node_shutdown.cancel();
    let _ = node.await;
    let _ = cp.task.await;
    drop(mock);
    Ok(())
}

async fn create_demo_trigger(
    cp_url: &str,
    brokers: &str,
    topic: &str,
    receiver: &WebhookReceiver,
) -> anyhow::Result<String> {
    let mut client = TriggerServiceClient::connect(cp_url.to_owned()).await?;
    let listed = client.list_triggers(ListTriggersRequest::default()).await?.into_inner();
    if let Some(existing) = listed.triggers.iter().find(|t| t.name == "demo") {
        // A database from an earlier run: point the demo trigger at this
        // run's broker and receiver.
        let mut update = existing.clone();
        let kafka = update.kafka.get_or_insert_with(Default::default);
        kafka.hosts = vec![brokers.to_owned()];
        kafka.topics = vec![topic.to_owned()];
        update.webhook.get_or_insert_with(Default::default).url = receiver.url();
        let paths = ["kafka.hosts", "kafka.topics", "webhook.url"].map(String::from).to_vec();
        client
            .update_trigger(UpdateTriggerRequest {
                trigger: Some(update),
                update_mask: Some(prost_types::FieldMask { paths }),
            })
            .await?;
        return Ok(existing.id.clone());
    }
    let trigger = Trigger {
        name: "demo".into(),
        kafka: Some(KafkaSource {
            hosts: vec![brokers.to_owned()],
            topics: vec![topic.to_owned()],
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(WebhookTarget { url: receiver.url(), timeout_ms: Some(5_000), ..Default::default() }),
        retry: Some(RetryPolicy {
            max_attempts: Some(3),
            initial_backoff_ms: Some(200),
            max_backoff_ms: Some(1_000),
            max_age_seconds: 0,
        }),
        ..Default::default()
    };
    let created = client.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await?.into_inner();
    Ok(created.id)
}

fn write_env_file(
    args: &Args,
    brokers: &str,
    cp: &kt_control_plane::Running,
    receiver: &WebhookReceiver,
    trigger_id: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(dir) = args.env_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // KT_SERVER is where `kt` connects: exported, since `kt` reads it from
    // its environment (the others are used by the shell that sources this).
    let mut text = format!(
        "KT_BROKERS={brokers}\nKT_CONTROL_PLANE={}\nexport KT_SERVER=http://{}\nKT_WEBHOOK={}\nKT_TOPIC={}\n",
        cp.addr, cp.addr, receiver.addr, args.topic
    );
    if let Some(id) = trigger_id {
        text.push_str(&format!("KT_TRIGGER_ID={id}\n"));
    }
    // `kt` is built next to this binary (scripts/stack.sh, cargo build
    // --workspace): sourcing the file puts it on the PATH.
    if let Some(dir) = kt_dir() {
        text.push_str(&format!("PATH=\"{}:$PATH\"\n", dir.display()));
    }
    std::fs::write(&args.env_file, text).with_context(|| format!("failed to write {}", args.env_file.display()))?;
    Ok(())
}

/// The directory of the `kt` binary built beside this one, if any.
fn kt_dir() -> Option<std::path::PathBuf> {
    let dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
    dir.join("kt").is_file().then_some(dir)
}

fn print_next_steps(args: &Args, brokers: &str, cp: &SocketAddr, receiver: &WebhookReceiver, trigger_id: Option<&str>) {
    println!();
    println!("kafka triggers stack is up");
    println!("  control plane (gRPC):  {cp}");
    println!("  kafka brokers:         {brokers}");
    println!("  webhook receiver:      {}", receiver.url());
    if let Some(id) = trigger_id {
        println!("  demo trigger:          {id} (topic {})", args.topic);
    }
    println!("  shell variables:       {}", args.env_file.display());
    println!();
    println!("next, in another terminal (see README \"Walkthrough\"):");
    println!("  source {}", args.env_file.display());
    println!("  printf 'user-1:{{\"n\":1}}\\nuser-2:{{\"n\":2}}\\nuser-1:{{\"n\":3}}\\n' | kcat -P -b $KT_BROKERS -t $KT_TOPIC -K:");
    match kt_dir() {
        Some(dir) => {
            println!("  kt work-orders list        # kt is {}", dir.join("kt").display());
            println!("  kt events --follow         # Ctrl-C prints the cursor to resume from");
            println!("  kt top");
        }
        None => println!(
            "  cargo build -p kt-cli      # then kt is target/debug/kt; see README \"Managing triggers with kt\""
        ),
    }
    println!("  grpcurl -plaintext $KT_CONTROL_PLANE list");
    println!();
    println!("deliveries are printed below; Ctrl-C stops everything");
}
