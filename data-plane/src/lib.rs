//! Data plane: stateless nodes that run one Kafka ingest pipeline per
//! assigned trigger and the workers that turn stored messages into work orders
//! delivered to each trigger's webhook.
//!
//! Where things live: `assignment.rs` validates what the control plane
//! assigned (one value shared by pipelines and workers), `consumer/` reads
//! Kafka and stores/commits offsets, `store/` writes messages to Postgres,
//! `pipelines/` starts and stops consumers as assigned, `control_plane.rs`
//! connects to the control plane, `session/` holds the node's session with
//! it, `worker/` its work stream, `delivery/` builds and POSTs the webhook
//! requests, `status/` holds what is reported back.

pub mod assignment;
pub mod consumer;
pub mod control_plane;
pub mod delivery;
pub mod pipelines;
pub mod session;
pub mod status;
pub mod store;
pub mod worker;

use std::time::Duration;

use anyhow::Context;
use kt_common::backoff::Backoff;
use kt_common::secret::Secret;
use kt_common::tasks::{self, Failpoints};
use kt_common::webhook_policy::WebhookPolicy;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::assignment::TriggerDirectory;
use crate::consumer::IngestSettings;
use crate::control_plane::{ClientTls, ControlPlane};
use crate::pipelines::{pipeline_supervisor, SupervisorEnv};
use crate::session::{run_session, SessionSettings};
use crate::status::StatusBoard;
use crate::store::{run_dedup_cleanup, DedupCleanupSettings};
use crate::worker::WorkerConfig;

/// Message sets a node works on at once by default. A set in hand costs a
/// few hundred bytes and, while its POST runs, one connection to the
/// target; the per-trigger `tuning.max_in_flight` bounds what one target
/// sees.
pub const DEFAULT_WORKERS: usize = 256;

/// Everything a node needs; [`Config::new`] fills the defaults.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub control_plane_url: String,
    /// What the node presents to the control plane.
    pub node_token: Option<Secret>,
    /// TLS towards an `https://` control plane (CA, client certificate).
    pub tls: ClientTls,
    /// Unique per running node; a generated one by default.
    pub node_id: String,
    /// Message sets this node works on at once (see `worker/`); 0 runs no
    /// workers (an ingest-only node).
    pub workers: usize,
    /// Connections of each of the node's two pools (ingest and the
    /// workers'), so up to twice this in all.
    pub db_max_connections: u32,
    pub ingest: IngestSettings,
    pub dedup: DedupCleanupSettings,
    pub heartbeat_interval: Duration,
    /// Silence from the control plane after which the session reconnects.
    pub control_plane_timeout: Duration,
    pub reconnect_backoff: Backoff,
    /// Which addresses webhooks may reach (`--webhook-deny-cidrs`,
    /// `--webhook-allow-cidrs`), checked at every connection.
    pub webhook_policy: WebhookPolicy,
    /// Where tests make tasks fail on purpose (`workers`); inert by default.
    pub failpoints: Failpoints,
}

impl Config {
    pub fn new(database_url: impl Into<String>, control_plane_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            control_plane_url: control_plane_url.into(),
            node_token: None,
            tls: ClientTls::default(),
            node_id: generate_node_id(),
            workers: DEFAULT_WORKERS,
            db_max_connections: 10,
            ingest: IngestSettings::default(),
            dedup: DedupCleanupSettings::default(),
            heartbeat_interval: Duration::from_secs(5),
            control_plane_timeout: Duration::from_secs(30),
            reconnect_backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            webhook_policy: WebhookPolicy::default(),
            failpoints: Failpoints::default(),
        }
    }

    /// The connection both the session and the work stream use; an error
    /// (bad URL, token or TLS file) stops the node at start-up.
    fn control_plane(&self) -> anyhow::Result<ControlPlane> {
        let control_plane = ControlPlane::new(&self.control_plane_url, self.node_token.as_ref(), &self.tls)
            .context("invalid control plane connection settings")?;
        Ok(control_plane.with_keepalive(self.heartbeat_interval, self.control_plane_timeout))
    }

    fn session_settings(&self, control_plane: ControlPlane, triggers: TriggerDirectory) -> SessionSettings {
        SessionSettings {
            triggers: Some(triggers),
            heartbeat_interval: self.heartbeat_interval,
            peer_timeout: self.control_plane_timeout,
            reconnect_backoff: self.reconnect_backoff,
            ingest: std::sync::Arc::new(self.ingest.clone()),
            ..SessionSettings::new(control_plane, &self.node_id)
        }
    }
}

/// `--control-plane-url` may list several control-plane replicas,
/// comma-separated; connection attempt `n` goes to the `n`-th of them (in a
/// cycle), so a node finds the active one after a failover.
pub fn control_plane_url(list: &str, attempt: usize) -> String {
    let urls: Vec<&str> = list.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    match urls.len() {
        0 => list.trim().to_owned(),
        n => urls[attempt % n].to_owned(),
    }
}

/// A fresh node id: time-ordered, so node lists sort by start.
pub fn generate_node_id() -> String {
    format!("node-{}", uuid::Uuid::now_v7())
}

/// The database is not at the schema version this build was made for.
#[derive(Debug, thiserror::Error)]
#[error(
    "database schema is at version {applied} but this data plane needs version {expected}; \
     migrate the database with the matching release (`control-plane migrate`) or run the matching data plane"
)]
pub struct SchemaMismatch {
    pub applied: i64,
    pub expected: i64,
}

/// Refuses a database whose schema differs from the one this build expects.
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    let applied =
        kt_common::db::applied_schema_version(pool).await.context("failed to read the database schema version")?;
    let expected = kt_common::db::expected_schema_version();
    if applied != expected {
        return Err(SchemaMismatch { applied, expected }.into());
    }
    Ok(())
}

/// How long a restarting task of the node waits before it runs again, at
/// first and at most.
const RESTART_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// Runs a node until `shutdown`: pipelines as assigned by the control
/// plane, the session with it, the workers and the dedup retention cleanup,
/// each a supervised task (`kt_common::tasks`):
///
/// - the pipeline supervisor is fatal: it holds which consumers run, and
///   without it the node could neither start nor stop one, so the node stops
///   (in order, as below) and returns the error, and its partitions move to
///   the other nodes;
/// - the session, the workers and the dedup cleanup restart with backoff:
///   each rebuilds what it needs from the control plane and the database
///   (sets a failed worker loop held are released when its stream ends, or
///   when their claims expire).
///
/// Shutdown order, on `shutdown` or a fatal failure: stop claiming sets and
/// finish the ones in hand, stop intake and commit what is stored, then send
/// the final reports and close the session.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let triggers = TriggerDirectory::default();
    let control_plane = config.control_plane()?;
    let session_settings = config.session_settings(control_plane.clone(), triggers.clone());
    let pool = kt_common::db::connect(&config.database_url, config.db_max_connections)
        .await
        .context("failed to connect to the database")?;
    check_schema(&pool).await?;
    tracing::info!(node_id = %config.node_id, control_plane = %config.control_plane_url, "data plane starting");

    let tasks = tasks::Supervisor::new();
    // One token per shutdown stage, cancelled in turn below. Not children of
    // `shutdown`: those would all be cancelled at once, and the session
    // would close before intake has committed and reported.
    let workers_stop = CancellationToken::new();
    let intake_stop = CancellationToken::new();
    let session_stop = CancellationToken::new();

    let board = StatusBoard::new();
    let (supervisor, supervisor_run) = pipeline_supervisor(
        SupervisorEnv {
            pool: pool.clone(),
            settings: session_settings.ingest.clone(),
            board: board.clone(),
            client_id: consumer::client_id(&config.node_id),
            node_id: config.node_id.clone(),
        },
        intake_stop.clone(),
    );
    let intake = tasks.spawn_fatal("pipeline supervisor", &intake_stop, supervisor_run);
    // The workers' rounds get a pool of their own, tuned for dispatch.
    let worker_pool = kt_common::db::dispatch_pool(&pool, config.db_max_connections);
    let workers = (config.workers > 0).then(|| {
        let worker_config = WorkerConfig {
            control_plane,
            node_id: config.node_id.clone(),
            capacity: config.workers as u32,
            webhook_policy: config.webhook_policy.clone(),
            failpoints: config.failpoints.clone(),
        };
        let (pool, stop) = (worker_pool.clone(), workers_stop.clone());
        tasks.spawn_restarting("workers", RESTART_BACKOFF, &workers_stop, move || {
            worker::run(worker_config.clone(), pool.clone(), triggers.clone(), stop.clone())
        })
    });
    let stop = session_stop.clone();
    tasks.spawn_restarting("session", RESTART_BACKOFF, &session_stop, move || {
        run_session(session_settings.clone(), supervisor.clone(), board.clone(), stop.clone())
    });
    let (dedup_pool, dedup, stop) = (pool.clone(), config.dedup, session_stop.clone());
    tasks.spawn_restarting("dedup cleanup", RESTART_BACKOFF, &session_stop, move || {
        run_dedup_cleanup(dedup_pool.clone(), dedup, stop.clone())
    });

    let failed = tokio::select! {
        _ = shutdown.cancelled() => None,
        failed = tasks.failed() => Some(failed),
    };
    match &failed {
        None => tracing::info!("data plane shutting down"),
        Some(failed) => tracing::error!(error = %failed, "data plane stopping after a fatal task failure"),
    }
    // Stop claiming sets; the sets in hand finish and release their claims.
    workers_stop.cancel();
    if let Some(workers) = workers {
        let _ = workers.await;
    }
    worker_pool.close().await;
    // Stop intake; what is stored gets its offsets committed.
    intake_stop.cancel();
    let _ = intake.await;
    session_stop.cancel();
    tasks.wait().await;
    pool.close().await;
    tracing::info!("data plane stopped");
    match failed {
        None => Ok(()),
        Some(failed) => Err(anyhow::Error::new(failed).context("the data plane cannot go on")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_control_plane_urls_rotate_per_attempt() {
        let list = "http://a:1, http://b:2,";
        assert_eq!(control_plane_url(list, 0), "http://a:1");
        assert_eq!(control_plane_url(list, 1), "http://b:2");
        assert_eq!(control_plane_url(list, 2), "http://a:1");
        assert_eq!(control_plane_url("http://only:1", 7), "http://only:1");
    }
}
