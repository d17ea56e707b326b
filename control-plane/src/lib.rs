//! Control plane: owns trigger configuration, tells data-plane nodes which
//! pipelines to run, and serves the public gRPC API.
//!
//! [`run`] is everything `main` does after parsing flags, so tests start a
//! control plane in process with [`start`].
//!
//! Where things live: `triggers/` the configuration (validation, secrets,
//! storage, change notifications) and `triggers/status` its status;
//! `nodes/` the node sessions, their registry and the desired assignment;
//! `scheduler/` the candidate-set server granting ready sets to workers;
//! `sets/`, `work_orders/`, `dead_letters/` the operator actions on them;
//! `events/` the event log and its subscribers; `retention.rs` the cleanup
//! of finished rows; `leader.rs` which replica schedules; `paging.rs` the
//! listings' pages; `tls.rs` the server certificates; `grpc/` the thin
//! adapters between the wire and all of these, and the one mapping of
//! domain errors to status codes (`grpc/errors.rs`).

pub mod dead_letters;
pub mod events;
pub mod grpc;
pub mod leader;
pub mod nodes;
pub mod paging;
pub mod retention;
pub mod scheduler;
pub mod sets;
pub mod tls;
pub mod triggers;
pub mod work_orders;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use kt_common::backoff::Backoff;
use kt_common::crypto::Keyring;
use kt_common::secret::Secret;
use kt_common::tasks::{Failpoints, Supervisor};
use kt_common::webhook_policy::WebhookPolicy;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Everything the control plane needs, already parsed.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub grpc_listen: SocketAddr,
    /// TLS of the gRPC listener; `None`: plaintext HTTP/2.
    pub tls: Option<tls::ServerTls>,
    pub api_token: Option<Secret>,
    pub node_token: Option<Secret>,
    /// Serve the node protocol without a node token or client certificates.
    /// It hands every trigger's decrypted credentials to its peer, so running
    /// it open has to be asked for by name (`--insecure-open-node-protocol`).
    pub insecure_open_node_protocol: bool,
    pub keys: Keyring,
    /// How often sessions exchange heartbeats with nodes.
    pub heartbeat: Duration,
    pub max_db_connections: u32,
    /// How long events are kept for replay.
    pub event_retention: Duration,
    /// How long finished (succeeded, skipped) work orders are kept.
    pub work_order_retention: Duration,
    /// The lease of a set's claim, renewed by its worker every third of it
    /// (3 s to an hour): how long a dead node's sets wait before they are
    /// granted again.
    pub claim_lease: Duration,
    /// Which webhook targets triggers may name (`--webhook-deny-cidrs`,
    /// `--webhook-allow-cidrs`).
    pub webhook_policy: WebhookPolicy,
    /// Where tests make tasks fail on purpose; inert by default.
    pub failpoints: Failpoints,
}

impl Config {
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            tls: None,
            api_token: None,
            node_token: None,
            insecure_open_node_protocol: false,
            keys: Keyring::default(),
            heartbeat: Duration::from_secs(5),
            max_db_connections: 10,
            event_retention: Duration::from_secs(7 * 24 * 3600),
            work_order_retention: Duration::from_secs(7 * 24 * 3600),
            claim_lease: kt_common::dispatch::lease::DEFAULT_LEASE,
            webhook_policy: WebhookPolicy::default(),
            failpoints: Failpoints::default(),
        }
    }
}

/// Shared handles the gRPC handlers use.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub triggers: triggers::TriggerService,
    pub registry: nodes::NodeRegistry,
    /// Connection tests on their way to nodes and back.
    pub connection_tests: nodes::ConnectionTests,
    pub scheduler: scheduler::Scheduler,
    pub events: events::stream::EventHub,
    /// Where the handlers spawn the tasks of their streams.
    pub tasks: Supervisor,
}

/// A started control plane.
pub struct Running {
    pub addr: SocketAddr,
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Connects, migrates, binds and starts serving in the background.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    check_node_auth(&config)?;
    let tls = config.tls.as_ref().map(tls::ServerTls::load).transpose()?;
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
    if config.node_token.is_none() && !node_certificates(&config) {
        tracing::warn!(
            "INSECURE: the node protocol is open (--insecure-open-node-protocol): anyone who can reach {addr} \
             receives every trigger's decrypted credentials"
        );
    }
    if !config.keys.has_key() {
        tracing::warn!("no encryption key configured: triggers with credentials will be refused");
    }
    let triggers = triggers::TriggerService::new(pool.clone(), config.keys.clone())
        .with_webhook_policy(config.webhook_policy.clone());
    // Every task of the term; a fatal failure among them ends the term with
    // its error (see `serve_until_failed`).
    let tasks = Supervisor::new();
    let scheduler = scheduler::Scheduler::start(
        pool.clone(),
        triggers.clone(),
        config.claim_lease,
        shutdown.clone(),
        &tasks,
        config.failpoints.clone(),
    )
    .await
    .context("failed to start the candidate-set scheduler")?;
    let events = events::stream::EventHub::start(pool.clone(), shutdown.clone(), &tasks)
        .await
        .context("failed to start the event stream")?;
    let retention = retention::Retention { events: config.event_retention, work_orders: config.work_order_retention };
    let retention_pool = pool.clone();
    let retention_stop = shutdown.clone();
    tasks.spawn_restarting("retention", RESTART_BACKOFF, &shutdown, move || {
        retention::run(retention_pool.clone(), retention, retention_stop.clone())
    });
    let state = AppState {
        triggers,
        registry: nodes::NodeRegistry::default(),
        connection_tests: nodes::ConnectionTests::default(),
        scheduler,
        events,
        pool,
        tasks: tasks.clone(),
    };
    let auth = grpc::AuthLayer::new(config.api_token.clone(), config.node_token.clone(), node_certificates(&config));
    tracing::info!(%addr, tls = tls.is_some(), node_certificates = node_certificates(&config), "control plane listening");
    let server = grpc::serve(state, auth, listener, tls, config.heartbeat, shutdown.clone());
    let task = tokio::spawn(serve_until_failed(server, tasks, shutdown));
    Ok(Running { addr, task })
}

/// How long a restarting task of the control plane waits before it runs
/// again, at first and at most.
const RESTART_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// The server of a term, until it ends or a fatal task fails: then the term
/// ends with that task's error, and the process with it (see [`run`]), since
/// a replica without its scheduler or event tail would go on answering the
/// API while granting nothing. The term's other tasks and its listener stop
/// with it (`term` is cancelled).
async fn serve_until_failed(
    server: impl std::future::Future<Output = anyhow::Result<()>>,
    tasks: Supervisor,
    term: CancellationToken,
) -> anyhow::Result<()> {
    tokio::select! {
        result = server => result,
        failed = tasks.failed() => {
            term.cancel();
            Err(anyhow::Error::new(failed).context("the control plane cannot go on"))
        }
    }
}

/// Whether nodes authenticate with a client certificate (mutual TLS).
fn node_certificates(config: &Config) -> bool {
    config.tls.as_ref().is_some_and(tls::ServerTls::mutual)
}

/// Refuses to serve the node protocol unauthenticated unless that was asked
/// for: its assignments carry decrypted passwords, client keys and secret
/// headers, so an open default would give them to anyone who can connect.
/// A node token, a node client certificate (mutual TLS) or both (then a
/// node needs both) authenticate nodes.
fn check_node_auth(config: &Config) -> anyhow::Result<()> {
    if config.node_token.is_none() && !node_certificates(config) && !config.insecure_open_node_protocol {
        anyhow::bail!(
            "refusing to start without node authentication: data-plane nodes receive every trigger's decrypted \
             credentials, so the node protocol must be authenticated. Set --node-token / KT_NODE_TOKEN (and give \
             the nodes the same token), or --node-client-ca / KT_NODE_CLIENT_CA with --tls-cert and --tls-key \
             (mutual TLS: nodes present client certificates), or pass --insecure-open-node-protocol to run it \
             open on purpose"
        );
    }
    Ok(())
}

/// How long a replica that stepped down waits for the calls of its term to
/// finish before it closes the server and stands by regardless. Nothing is
/// granted any more by then; what still runs is fenced in the database.
pub const STEP_DOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs until `shutdown` is cancelled, in leadership terms: stands by while
/// another replica is active (or the database is unreachable), serves as
/// long as it holds the leader lock, and on losing it stops serving at once
/// and stands by again. It returns early only on a fatal error (e.g. the
/// address cannot be bound, the migrations do not match this build).
pub async fn run(mut config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Before waiting for the leader lock: a standby with a bad configuration
    // should fail now, not when it takes over.
    check_node_auth(&config)?;
    if let Some(tls) = &config.tls {
        tls.load()?;
    }
    scheduler::check_lease(config.claim_lease)?;
    metrics::gauge!("kt_control_plane_active").set(0.0);
    loop {
        let Some(leadership) = leader::acquire(&config.database_url, &shutdown).await? else {
            return Ok(());
        };
        // Everything leader-only (scheduler, node sessions and work
        // streams, event tail, retention, the listener) lives on this token.
        let term = shutdown.child_token();
        let stop = term.clone();
        let lost = leadership.lost.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        });
        let running = match start(config.clone(), term.clone()).await {
            Ok(running) => running,
            Err(error) if database_unavailable(&error) => {
                term.cancel();
                drop(leadership);
                tracing::warn!(error = format!("{error:#}"), "cannot start serving: database unavailable; standing by");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(leader::CHECK_INTERVAL) => continue,
                }
            }
            Err(error) => {
                term.cancel();
                return Err(error);
            }
        };
        // Every term listens where the first one did (also when the port
        // was the OS's choice), so nodes and clients find this replica again.
        config.grpc_listen = running.addr;
        metrics::gauge!("kt_control_plane_active").set(1.0);
        let outcome = serve_term(running.task, &term, &shutdown).await;
        term.cancel();
        metrics::gauge!("kt_control_plane_active").set(0.0);
        let lost = leadership.lost.is_cancelled();
        drop(leadership);
        if shutdown.is_cancelled() {
            return outcome;
        }
        if !lost {
            return outcome.and_then(|()| Err(anyhow::anyhow!("the gRPC server stopped on its own")));
        }
        if let Err(error) = outcome {
            tracing::warn!(error = format!("{error:#}"), "the last term ended with an error");
        }
        tracing::info!("standing by; trying to take the leader lock again");
    }
}

/// Waits for the server of a term to end. It ends on its own only on an
/// error; when the term is cancelled (leader lock lost, or shutdown) it
/// drains, which on a step-down is waited for at most [`STEP_DOWN_GRACE`].
async fn serve_term(
    mut task: JoinHandle<anyhow::Result<()>>,
    term: &CancellationToken,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let joined = |r: Result<anyhow::Result<()>, tokio::task::JoinError>| r.context("server task panicked")?;
    tokio::select! {
        result = &mut task => return joined(result),
        _ = term.cancelled() => {}
    }
    if shutdown.is_cancelled() {
        return joined(task.await);
    }
    tracing::warn!("stepped down: no longer the active control plane");
    match tokio::time::timeout(STEP_DOWN_GRACE, &mut task).await {
        Ok(result) => joined(result),
        Err(_) => {
            // The server holds its listener until every connection has
            // drained, so a call stuck on the database (which is often why
            // the lock was lost) would keep the port from the next term.
            // Dropping the server closes the listener; what those calls
            // still do is fenced in the database.
            tracing::warn!(
                grace_ms = STEP_DOWN_GRACE.as_millis() as u64,
                "calls of the last term still running after the grace; closing the server and standing by"
            );
            task.abort();
            let _ = task.await;
            Ok(())
        }
    }
}

/// Whether `error` (from [`start`]) is the database being unreachable: worth
/// waiting out, unlike a configuration error.
fn database_unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .is_some_and(|e| kt_common::db::classify(e) == kt_common::db::DbErrorKind::Unavailable)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_nodes_authenticate_with_a_token_a_certificate_or_on_purpose_not_at_all() {
        let tls = |node_client_ca: Option<&str>| tls::ServerTls {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
            node_client_ca: node_client_ca.map(Into::into),
        };
        let config = |token: bool, tls: Option<tls::ServerTls>, open: bool| Config {
            node_token: token.then(|| Secret::new("t")),
            tls,
            insecure_open_node_protocol: open,
            ..Config::new("postgres://localhost/kt")
        };
        assert!(check_node_auth(&config(true, None, false)).is_ok());
        assert!(check_node_auth(&config(false, Some(tls(Some("ca.pem"))), false)).is_ok());
        assert!(check_node_auth(&config(true, Some(tls(Some("ca.pem"))), false)).is_ok());
        assert!(check_node_auth(&config(false, None, true)).is_ok());
        // TLS without client certificates authenticates nobody.
        let error = check_node_auth(&config(false, Some(tls(None)), false)).unwrap_err().to_string();
        assert!(error.contains("--node-client-ca"), "{error}");
        assert!(check_node_auth(&config(false, None, false)).is_err());
    }

    #[test]
    fn test_only_an_unreachable_database_is_waited_out() {
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let unavailable = [
            anyhow::Error::new(sqlx::Error::PoolTimedOut).context("failed to connect to the database"),
            anyhow::Error::new(sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(io())))
                .context("failed to apply database migrations"),
        ];
        for error in &unavailable {
            assert!(database_unavailable(error), "{error:#}");
        }
        let fatal = [
            anyhow::Error::new(io()).context("failed to listen on 127.0.0.1:1"),
            anyhow::Error::new(sqlx::migrate::MigrateError::VersionMissing(7))
                .context("failed to apply database migrations"),
            anyhow::Error::new(sqlx::Error::RowNotFound),
        ];
        for error in &fatal {
            assert!(!database_unavailable(error), "{error:#}");
        }
    }
}
