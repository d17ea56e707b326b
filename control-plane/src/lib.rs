//! Control plane: owns trigger configuration, tells data-plane nodes which
//! pipelines to run, and serves the public gRPC API.
//!
//! [`run`] is everything `main` does after parsing flags, so tests start a
//! control plane in process with [`start`].

pub mod events;
pub mod grpc;
pub mod leader;
pub mod nodes;
pub mod retention;
pub mod scheduler;
pub mod sets;
pub mod status;
pub mod triggers;
pub mod work_orders;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use kt_common::crypto::Keyring;
use kt_common::secret::Secret;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Everything the control plane needs, already parsed.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub grpc_listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub api_token: Option<Secret>,
    pub node_token: Option<Secret>,
    pub keys: Keyring,
    /// How often sessions exchange heartbeats with nodes.
    pub heartbeat: Duration,
    pub max_db_connections: u32,
    /// How long events are kept for replay.
    pub event_retention: Duration,
    /// How long finished (succeeded, skipped) work orders are kept.
    pub work_order_retention: Duration,
}

impl Config {
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            api_token: None,
            node_token: None,
            keys: Keyring::default(),
            heartbeat: Duration::from_secs(5),
            max_db_connections: 10,
            event_retention: Duration::from_secs(7 * 24 * 3600),
            work_order_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Shared handles the gRPC handlers use.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub triggers: triggers::TriggerService,
    pub registry: nodes::NodeRegistry,
    pub scheduler: scheduler::Scheduler,
    pub events: events::stream::EventHub,
}

/// A started control plane.
pub struct Running {
    pub addr: SocketAddr,
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Connects, migrates, binds and starts serving in the background.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let pool = kt_common::db::connect(&config.database_url, config.max_db_connections)
        .await
        .context("failed to connect to the database")?;
    kt_common::db::migrate(&pool).await.context("failed to apply database migrations")?;
    let listener = TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("failed to listen on {}", config.grpc_listen))?;
    let addr = listener.local_addr()?;
    if config.api_token.is_none() {
        tracing::warn!("no API token configured: the public API is open to anyone who can reach {addr}");
    }
    if config.node_token.is_none() {
        tracing::warn!("no node token configured: any client can register as a data-plane node");
    }
    if !config.keys.has_key() {
        tracing::warn!("no encryption key configured: triggers with credentials will be refused");
    }
    let triggers = triggers::TriggerService::new(pool.clone(), config.keys.clone());
    let scheduler = scheduler::Scheduler::start(pool.clone(), triggers.clone(), shutdown.clone())
        .await
        .context("failed to start the candidate-set scheduler")?;
    let events = events::stream::EventHub::start(pool.clone(), shutdown.clone())
        .await
        .context("failed to start the event stream")?;
    let retention = retention::Retention { events: config.event_retention, work_orders: config.work_order_retention };
    tokio::spawn(retention::run(pool.clone(), retention, shutdown.clone()));
    let state = AppState { triggers, registry: nodes::NodeRegistry::default(), scheduler, events, pool };
    let auth = grpc::AuthLayer::new(config.api_token.clone(), config.node_token.clone());
    tracing::info!(%addr, "control plane listening");
    let task = tokio::spawn(grpc::serve(state, auth, listener, config.heartbeat, shutdown));
    Ok(Running { addr, task })
}

/// Runs until `shutdown` is cancelled: stands by while another replica is
/// active, then serves as long as it holds the leader lock. Losing the lock
/// is an error, so a supervisor restarts the process (as a standby).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(leadership) = leader::acquire(&config.database_url, &shutdown).await? else {
        return Ok(());
    };
    let serving = shutdown.child_token();
    let stop = serving.clone();
    let lost = leadership.lost.clone();
    tokio::spawn(async move {
        lost.cancelled().await;
        stop.cancel();
    });
    let running = start(config, serving).await?;
    running.task.await.context("server task panicked")??;
    if leadership.lost.is_cancelled() {
        anyhow::bail!("lost the leader lock; stopped serving so another replica can take over");
    }
    Ok(())
}
