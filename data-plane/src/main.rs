//! The `data-plane` binary: parse flags (each also read from the
//! environment), set up telemetry and metrics, run the node until SIGINT or
//! SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kt_common::secret::Secret;
use kt_common::telemetry::{self, LogFormat};
use kt_data_plane::control_plane::ClientTls;
use kt_data_plane::{run, Config};

/// A Kafka triggers data-plane node: consumes the Kafka topics of the
/// triggers the control plane assigns to it, stores their messages in
/// Postgres, and delivers work orders.
#[derive(Debug, Parser)]
#[command(name = "data-plane", version)]
struct Args {
    /// gRPC URL of the control plane; several replicas comma-separated
    /// (the node connects to whichever is active). https:// speaks TLS.
    #[arg(long, env = "KT_CONTROL_PLANE_URL", default_value = "http://127.0.0.1:50051")]
    control_plane_url: String,

    /// PEM CA certificate(s) to verify an https:// control plane with;
    /// none: the system's trusted roots.
    #[arg(long, env = "KT_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// PEM client certificate this node presents to an https:// control
    /// plane (mutual TLS: its subject CN or a DNS name must be the node id).
    #[arg(long, env = "KT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "KT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// The name the control plane's certificate must be issued for, when
    /// it is not the URL's host.
    #[arg(long, env = "KT_TLS_DOMAIN")]
    tls_domain: Option<String>,

    /// Postgres URL, e.g. postgres://user@host:5432/kafka_triggers.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,

    /// Token this node presents to the control plane (the control plane's
    /// --node-token).
    #[arg(long, env = "KT_NODE_TOKEN", hide_env_values = true)]
    node_token: Option<String>,

    /// Unique id of this node; generated when not given.
    #[arg(long, env = "KT_NODE_ID")]
    node_id: Option<String>,

    /// Message sets this node works on at once (each delivers one work order
    /// at a time; a trigger's `tuning.max_in_flight` caps its own share); 0
    /// makes an ingest-only node.
    #[arg(long, env = "KT_WORKERS", default_value_t = kt_data_plane::DEFAULT_WORKERS)]
    workers: usize,

    /// Address for the Prometheus metrics endpoint (e.g. 127.0.0.1:9101);
    /// none: no endpoint.
    #[arg(long, env = "KT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    /// How long dedup records are kept, in hours: a message redelivered
    /// within this window is recognised as a duplicate.
    #[arg(long, env = "KT_DEDUP_RETENTION_HOURS", default_value_t = 168)]
    dedup_retention_hours: u64,

    /// Kafka consumer group session timeout, in milliseconds: a node that
    /// stops heartbeating (killed, cut off) keeps its partitions this long
    /// before the group hands them to the other nodes. The broker bounds it
    /// (group.min/max.session.timeout.ms, 6 s to 30 min on Apache Kafka).
    #[arg(long, env = "KT_KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    kafka_session_timeout_ms: u64,

    /// Kafka consumer max.poll.interval.ms, which is also the group's
    /// rebalance timeout: how long a rebalance waits for members to rejoin.
    /// Some brokers (Tansu) make every join wait this long: set it low there.
    #[arg(long, env = "KT_KAFKA_MAX_POLL_INTERVAL_MS", default_value_t = 300_000)]
    kafka_max_poll_interval_ms: u64,

    /// Static consumer group membership (KIP-345): the node's consumers
    /// join with a group.instance.id derived from --node-id and the
    /// trigger, so a node restarted under the same id within the session
    /// timeout gets its partitions back without a rebalance. Its consumers
    /// then do not leave the group when they stop: a node stopped for good
    /// hands over after the session timeout. auto: on when --node-id is
    /// given (a generated id is new on every start); off: dynamic
    /// membership, for brokers that do not implement static membership
    /// (Tansu never reassigns a dead static member's partitions).
    #[arg(long, env = "KT_KAFKA_STATIC_MEMBERSHIP", value_enum, default_value_t = StaticMembership::Auto)]
    kafka_static_membership: StaticMembership,

    /// Maximum Postgres connections of each of the node's two pools
    /// (ingest, workers).
    #[arg(long, env = "KT_DB_MAX_CONNECTIONS", default_value_t = 10)]
    db_max_connections: u32,

    /// Log format: text or json (the filter is RUST_LOG).
    #[arg(long, env = "KT_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,

    /// Sentry DSN; none: errors are only logged.
    #[arg(long, env = "SENTRY_DSN", hide_env_values = true)]
    sentry_dsn: Option<String>,

    #[command(flatten)]
    webhook_policy: kt_common::webhook_policy::WebhookPolicyArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StaticMembership {
    Auto,
    #[value(alias = "true")]
    On,
    #[value(alias = "false")]
    Off,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = telemetry::init("data-plane", args.log_format, args.sentry_dsn.as_deref());
    if let Some(addr) = args.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("failed to serve metrics on {addr}"))?;
    }
    let mut config = Config::new(args.database_url, args.control_plane_url);
    config.node_token = args.node_token.filter(|t| !t.is_empty()).map(Secret::new);
    config.tls = ClientTls { ca: args.tls_ca, cert: args.tls_cert, key: args.tls_key, domain: args.tls_domain };
    let fixed_id = args.node_id.filter(|id| !id.trim().is_empty());
    config.ingest.static_membership = match args.kafka_static_membership {
        StaticMembership::Auto => fixed_id.is_some(),
        StaticMembership::On => true,
        StaticMembership::Off => false,
    };
    if let Some(id) = fixed_id {
        config.node_id = id.trim().to_owned();
    }
    config.workers = args.workers;
    config.db_max_connections = args.db_max_connections;
    config.ingest.session_timeout = Duration::from_millis(args.kafka_session_timeout_ms.max(1));
    config.ingest.max_poll_interval = Duration::from_millis(args.kafka_max_poll_interval_ms.max(1));
    config.dedup.retention = Duration::from_secs(args.dedup_retention_hours.saturating_mul(3600));
    config.webhook_policy = args.webhook_policy.policy();
    let shutdown = telemetry::shutdown_on_signal();
    run(config, shutdown).await.inspect_err(|e| tracing::error!(error = format!("{e:#}"), "data plane failed"))
}
