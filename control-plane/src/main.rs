//! `control-plane`: serve the API (default) or apply migrations.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kt_common::crypto::Keyring;
use kt_common::secret::Secret;
use kt_common::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(name = "control-plane", version, about = "Kafka triggers control plane: trigger API and pipeline assignment")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    /// Address of the gRPC server (public API and node protocol).
    #[arg(long, env = "KT_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    grpc_listen: SocketAddr,

    /// PEM certificate (chain, leaf first) of the gRPC listener: with
    /// --tls-key, the listener speaks TLS only. None: plaintext HTTP/2.
    #[arg(long, env = "KT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "KT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) that sign data-plane nodes' client
    /// certificates (mutual TLS; needs --tls-cert). Nodes must then present
    /// one whose subject CN or a DNS name is their node id; API callers need
    /// none. Authenticates nodes on its own or, with --node-token, together
    /// with the token.
    #[arg(long, env = "KT_NODE_CLIENT_CA", requires = "tls_cert")]
    node_client_ca: Option<PathBuf>,

    /// Address of the Prometheus /metrics endpoint; none = no metrics server.
    #[arg(long, env = "KT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    /// Bearer token API callers must present; none = the API is open.
    #[arg(long, env = "KT_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,

    /// Bearer token data-plane nodes must present. Required unless nodes
    /// authenticate with client certificates (--node-client-ca): the control
    /// plane refuses to start without either unless
    /// --insecure-open-node-protocol is given.
    #[arg(long, env = "KT_NODE_TOKEN", hide_env_values = true)]
    node_token: Option<String>,

    /// Serve the node protocol without node authentication (no node token,
    /// no --node-client-ca). Anyone who can reach the port then receives
    /// every trigger's decrypted credentials; only for a port nothing else
    /// can reach.
    #[arg(long, env = "KT_INSECURE_OPEN_NODE_PROTOCOL")]
    insecure_open_node_protocol: bool,

    /// Base64 of 32 random bytes that encrypts credentials at rest
    /// (`openssl rand -base64 32`). Without it, triggers with credentials are
    /// refused.
    #[arg(long, env = "KT_ENCRYPTION_KEY", global = true, hide_env_values = true)]
    encryption_key: Option<String>,

    /// Older keys, comma-separated, still used to decrypt after a rotation.
    #[arg(long, env = "KT_OLD_ENCRYPTION_KEYS", global = true, hide_env_values = true, value_delimiter = ',')]
    old_encryption_keys: Vec<String>,

    /// Seconds between heartbeats on node sessions.
    #[arg(long, env = "KT_HEARTBEAT_SECONDS", default_value_t = 5)]
    heartbeat_seconds: u64,

    /// Seconds a set's claim lasts unless its worker renews it (every third
    /// of it, while the worker holds the set): a node that dies has its
    /// sets granted again within about this long. 3 to 3600.
    #[arg(long, env = "KT_CLAIM_LEASE_SECONDS", default_value_t = 10, value_parser = parse_claim_lease_seconds)]
    claim_lease_seconds: u64,

    /// Hours events are kept for replay by StreamEvents.
    #[arg(long, env = "KT_EVENT_RETENTION_HOURS", default_value_t = 168)]
    event_retention_hours: u64,

    /// Hours finished (succeeded or skipped) work orders are kept; failed
    /// ones stay until an operator acts.
    #[arg(long, env = "KT_WORK_ORDER_RETENTION_HOURS", default_value_t = 168)]
    work_order_retention_hours: u64,

    /// Log format: text or json.
    #[arg(long, env = "KT_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,

    /// Sentry DSN; errors are reported there when set.
    #[arg(long, env = "SENTRY_DSN", hide_env_values = true)]
    sentry_dsn: Option<String>,

    #[command(flatten)]
    webhook_policy: kt_common::webhook_policy::WebhookPolicyArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Re-encrypt every trigger's credentials with --encryption-key (the
    /// old keys in --old-encryption-keys decrypt), then exit; afterwards
    /// the old keys can be dropped. Safe while the control plane runs.
    RotateKeys,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = telemetry::init("control-plane", cli.log_format, cli.sentry_dsn.as_deref());
    let database_url = cli.database_url.clone().context("--database-url or DATABASE_URL is required")?;

    if let Some(Command::Migrate) = cli.command {
        let pool = kt_common::db::connect(&database_url, 2).await.context("failed to connect to the database")?;
        kt_common::db::migrate(&pool).await.context("failed to apply migrations")?;
        tracing::info!(version = kt_common::db::expected_schema_version(), "database migrated");
        return Ok(());
    }

    let keys =
        Keyring::from_base64(cli.encryption_key.iter().chain(cli.old_encryption_keys.iter()).map(String::as_str))
            .context("invalid KT_ENCRYPTION_KEY / KT_OLD_ENCRYPTION_KEYS")?;
    if let Some(Command::RotateKeys) = cli.command {
        return rotate_keys(&database_url, keys).await;
    }
    if let Some(addr) = cli.metrics_listen {
        telemetry::install_metrics(addr).context("failed to start the metrics endpoint")?;
    }
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty()).map(Secret::new);
    let tls = match (cli.tls_cert, cli.tls_key) {
        (Some(cert), Some(key)) => {
            Some(kt_control_plane::tls::ServerTls { cert, key, node_client_ca: cli.node_client_ca })
        }
        // clap enforces the pairs (`requires`).
        _ => None,
    };
    let config = kt_control_plane::Config {
        grpc_listen: cli.grpc_listen,
        tls,
        api_token: non_empty(cli.api_token),
        node_token: non_empty(cli.node_token),
        insecure_open_node_protocol: cli.insecure_open_node_protocol,
        keys,
        heartbeat: Duration::from_secs(cli.heartbeat_seconds.max(1)),
        event_retention: Duration::from_secs(cli.event_retention_hours * 3600),
        work_order_retention: Duration::from_secs(cli.work_order_retention_hours * 3600),
        claim_lease: Duration::from_secs(cli.claim_lease_seconds),
        webhook_policy: cli.webhook_policy.policy(),
        ..kt_control_plane::Config::new(database_url)
    };
    kt_control_plane::run(config, telemetry::shutdown_on_signal()).await
}

/// `control-plane rotate-keys`: fails (non-zero exit) when any trigger could
/// not be re-encrypted, naming it, since dropping its key would lose its
/// credentials.
async fn rotate_keys(database_url: &str, keys: Keyring) -> anyhow::Result<()> {
    anyhow::ensure!(keys.has_key(), "rotate-keys needs the new key in --encryption-key / KT_ENCRYPTION_KEY");
    let pool = kt_common::db::connect(database_url, 2).await.context("failed to connect to the database")?;
    kt_common::db::migrate(&pool).await.context("failed to apply migrations")?;
    let key_id = keys.primary_id().unwrap_or_default().to_owned();
    let rotation = kt_control_plane::triggers::TriggerService::new(pool, keys).rotate_keys().await?;
    tracing::info!(rotated = rotation.rotated, failed = rotation.failed.len(), %key_id, "credentials re-encrypted");
    if !rotation.failed.is_empty() {
        let failed: Vec<String> = rotation.failed.iter().map(|(id, why)| format!("{id}: {why}")).collect();
        anyhow::bail!(
            "{} trigger(s) could not be re-encrypted; keep their old key configured:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// `--claim-lease-seconds`: a whole number of seconds the scheduler accepts
/// (`kt_control_plane::scheduler::check_lease`).
fn parse_claim_lease_seconds(value: &str) -> Result<u64, String> {
    let secs: u64 = value.trim().parse().map_err(|_| format!("`{value}` is not a whole number of seconds"))?;
    kt_control_plane::scheduler::check_lease(Duration::from_secs(secs)).map_err(|e| e.to_string())?;
    Ok(secs)
}
