//! The in-process sandbox for whole-system tests and the benchmark: a fresh
//! Postgres database per test, a control plane on port 0, clients, and
//! helpers that wait on conditions with a timeout instead of sleeping.

pub mod bench;
pub mod metrics;
pub mod postgres;
pub mod process;
pub mod readme;
pub mod webhook;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use kt_common::crypto::Keyring;
use kt_common::secret::Secret;
use kt_common::webhook_policy::WebhookPolicy;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use uuid::Uuid;

/// A fixed 32-byte test key (base64). Never use outside tests.
pub const TEST_ENCRYPTION_KEY: &str = "dGVzdC1rZXktMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY=";

/// The node token of every sandboxed control plane and node (the control
/// plane refuses to run without one). Never use outside tests.
pub const TEST_NODE_TOKEN: &str = "test-node-token-0123456789";

/// The server where test databases are created: `DATABASE_URL`, else the
/// local default.
pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for one test, dropped when the value is.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    pub async fn create() -> anyhow::Result<Self> {
        Self::create_on(&admin_database_url()).await
    }

    /// A database on the server of `admin_url` (e.g. a [`postgres::PgCluster`]).
    pub async fn create_on(admin_url: &str) -> anyhow::Result<Self> {
        let admin_url = admin_url.to_owned();
        let name = format!("kt_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await.with_context(|| {
            format!("cannot reach Postgres at {admin_url}; run scripts/test.sh or set DATABASE_URL")
        })?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await?;
        let url = replace_database(&admin_url, &name);
        Ok(Self { name, url, admin_url })
    }

    pub async fn pool(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(kt_common::db::connect(&self.url, 5).await?)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside async; a short-lived thread with its own runtime
        // removes the database even when the test panicked.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await.ok()
            })
        })
        .join();
    }
}

fn replace_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let base = match base.rfind('/') {
        Some(i) if base[..i].contains("://") && i > base.find("://").unwrap() + 2 => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Options for a sandboxed control plane.
#[derive(Clone, Default)]
pub struct ControlPlaneOptions {
    pub api_token: Option<String>,
    /// Defaults to [`TEST_NODE_TOKEN`], which [`TestNode`] presents;
    /// `Some("")` means no node token (nodes then need another way in).
    pub node_token: Option<String>,
    /// TLS of the listener (and mutual TLS for nodes); plaintext when `None`.
    pub tls: Option<kt_control_plane::tls::ServerTls>,
    /// Defaults to [`TEST_ENCRYPTION_KEY`]; `Some("")` means no key.
    pub encryption_key: Option<String>,
    pub heartbeat: Option<Duration>,
    /// Where to listen; a free port when `None`. A restarted control plane
    /// passes its predecessor's address so nodes find it again.
    pub listen: Option<SocketAddr>,
    /// The claims' lease (`--claim-lease-seconds`); the default when `None`.
    pub claim_lease: Option<Duration>,
    /// The webhook target policy; the default one when `None`.
    pub webhook_policy: Option<WebhookPolicy>,
    /// Failpoints a test arms (`kt_common::tasks::Failpoints::armable`).
    pub failpoints: Option<kt_common::tasks::Failpoints>,
}

/// A control plane running in this process on a free port.
pub struct TestControlPlane {
    pub addr: SocketAddr,
    /// Serves TLS: [`Self::url`] is `https://`.
    pub tls: bool,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestControlPlane {
    pub async fn start(db: &TestDb, opts: ControlPlaneOptions) -> anyhow::Result<Self> {
        let key = opts.encryption_key.unwrap_or_else(|| TEST_ENCRYPTION_KEY.into());
        let config = kt_control_plane::Config {
            grpc_listen: opts.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            api_token: opts.api_token.map(Secret::new),
            node_token: match opts.node_token.as_deref() {
                None => Some(Secret::new(TEST_NODE_TOKEN)),
                Some("") => None,
                Some(token) => Some(Secret::new(token)),
            },
            tls: opts.tls.clone(),
            keys: Keyring::from_base64([key.as_str()])?,
            heartbeat: opts.heartbeat.unwrap_or(Duration::from_millis(500)),
            claim_lease: opts.claim_lease.unwrap_or(kt_common::dispatch::lease::DEFAULT_LEASE),
            webhook_policy: opts.webhook_policy.unwrap_or_default(),
            failpoints: opts.failpoints.unwrap_or_default(),
            ..kt_control_plane::Config::new(db.url.clone())
        };
        let shutdown = CancellationToken::new();
        let running = kt_control_plane::start(config, shutdown.clone()).await?;
        Ok(Self { addr: running.addr, tls: opts.tls.is_some(), shutdown, task: running.task })
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.url())?.connect().await?)
    }

    /// A channel whose calls carry `authorization: Bearer <token>`.
    pub async fn authed(&self, token: &str) -> anyhow::Result<InterceptedService<Channel, BearerToken>> {
        Ok(InterceptedService::new(self.channel().await?, BearerToken::new(token)))
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        (&mut self.task).await?
    }
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A data-plane node running in this process.
pub struct TestNode {
    pub node_id: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The Kafka session timeout of a [`TestNode`]'s consumers. A node process
/// a test runs beside test nodes in one group must use the same (see
/// `tests/shutdown.rs`).
pub const TEST_NODE_SESSION_TIMEOUT: Duration = Duration::from_secs(6);

impl TestNode {
    /// Starts a node against `db` and the control plane at `cp_url`, with
    /// test-friendly timings and [`TEST_NODE_TOKEN`]; `tweak` adjusts the
    /// config.
    pub async fn start(db: &TestDb, cp_url: &str, tweak: impl FnOnce(&mut kt_data_plane::Config)) -> Self {
        let mut config = kt_data_plane::Config::new(db.url.clone(), cp_url.to_owned());
        config.heartbeat_interval = Duration::from_millis(500);
        config.ingest.session_timeout = TEST_NODE_SESSION_TIMEOUT;
        config.ingest.heartbeat_interval = Duration::from_millis(500);
        config.ingest.batch_linger = Duration::from_millis(5);
        config.ingest.commit_interval = Duration::from_millis(200);
        config.node_token = Some(Secret::new(TEST_NODE_TOKEN));
        tweak(&mut config);
        let node_id = config.node_id.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(kt_data_plane::run(config, shutdown.clone()));
        Self { node_id, shutdown, task }
    }

    /// Graceful stop: waits for the node to finish its shutdown sequence.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        (&mut self.task).await?
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A binary of this workspace (`control-plane`, `data-plane`), built next to
/// the test executables by `cargo test --workspace --all-targets`.
pub fn workspace_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|deps| deps.parent()).context("unexpected test binary location")?;
    let path = dir.join(name);
    anyhow::ensure!(path.exists(), "{} not built; run `cargo build --workspace` first", path.display());
    Ok(path)
}

/// Adds a bearer token to every call; an empty token adds nothing.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    pub fn new(token: &str) -> Self {
        Self((!token.is_empty()).then(|| format!("Bearer {token}").parse().expect("token is ASCII")))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// Polls `check` until it returns `Some`, failing after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// What the dispatch tables hold, for a test's failure message: stored
/// messages per partition, sets by state and claim, work orders by state,
/// and the database's sessions that are in a transaction or waiting.
pub async fn dispatch_report(pool: &sqlx::PgPool) -> String {
    const QUERIES: [(&str, &str); 5] = [
        (
            "message_records",
            "SELECT partition::text || ': ' || count(*) || ' up to ' || max(\"offset\") \
             FROM message_records GROUP BY partition ORDER BY partition",
        ),
        ("messages", "SELECT count(*)::text FROM messages"),
        (
            "message_sets",
            "SELECT s || ': ' || count(*) FROM \
               (SELECT state || CASE WHEN lock_id IS NULL THEN '' ELSE ' claimed' END \
                       || coalesce(' retry in ' || (retry_at - now())::text, '') AS s FROM message_sets) k \
             GROUP BY s ORDER BY s",
        ),
        ("work_orders", "SELECT state || ': ' || count(*) FROM work_orders GROUP BY state ORDER BY state"),
        // Sessions in a transaction or waiting: a stuck lock holder shows here.
        (
            "sessions",
            "SELECT '\n    ' || state || coalesce(' waiting on ' || wait_event_type || '/' || wait_event, '') \
                    || ' for ' || coalesce((now() - xact_start)::text, '-') || ': ' \
                    || left(regexp_replace(query, '\\s+', ' ', 'g'), 100) \
               FROM pg_stat_activity \
              WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle' \
              ORDER BY xact_start",
        ),
    ];
    let mut report = String::new();
    for (table, sql) in QUERIES {
        let rows: Result<Vec<String>, _> = sqlx::query_scalar(sql).fetch_all(pool).await;
        let rows = rows.map_or_else(|e| e.to_string(), |rows| rows.join(", "));
        report.push_str(&format!("\n  {table}: {rows}"));
    }
    report
}

/// What the broker knows of `group` on `topic`: its members, and each
/// partition's committed offset and high watermark, for a test's failure
/// message.
pub fn group_report(bootstrap_servers: &str, group: &str, topic: &str, partitions: i32) -> String {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::TopicPartitionList;
    let timeout = Duration::from_secs(5);
    let consumer: BaseConsumer = match kt_kafka_testing::consumer_config(bootstrap_servers, group).create() {
        Ok(c) => c,
        Err(e) => return format!("\n  (no consumer: {e})"),
    };
    let mut report = String::new();
    match consumer.fetch_group_list(Some(group), timeout) {
        Ok(list) => {
            for g in list.groups() {
                let members: Vec<&str> = g.members().iter().map(|m| m.client_id()).collect();
                report.push_str(&format!("\n  group {} ({}): members {members:?}", g.name(), g.state()));
            }
        }
        Err(e) => report.push_str(&format!("\n  group: {e}")),
    }
    let mut query = TopicPartitionList::new();
    for p in 0..partitions {
        query.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(query, timeout);
    for p in 0..partitions {
        let at = committed
            .as_ref()
            .map(|c| c.find_partition(topic, p).map(|e| format!("{:?}", e.offset())).unwrap_or_default())
            .unwrap_or_else(|e| e.to_string());
        let watermarks = consumer.fetch_watermarks(topic, p, timeout);
        report.push_str(&format!("\n  {topic}/{p}: committed {at}, watermarks {watermarks:?}"));
    }
    report
}

/// Captures the logs of in-process planes for the test harness, which
/// shows them only for a test that fails (`filter` as in `RUST_LOG`).
pub fn capture_logs(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// A minimal valid trigger for tests.
pub fn sample_trigger(name: &str, hosts: &str, topic: &str) -> kt_proto::v1::Trigger {
    kt_proto::v1::Trigger {
        name: name.into(),
        kafka: Some(kt_proto::v1::KafkaSource {
            hosts: vec![hosts.into()],
            topics: vec![topic.into()],
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(kt_proto::v1::WebhookTarget { url: "http://127.0.0.1:9/hook".into(), ..Default::default() }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_replace_database_keeps_credentials_and_query() {
        assert_eq!(replace_database("postgres://u:p@h:5/postgres", "x"), "postgres://u:p@h:5/x");
        assert_eq!(replace_database("postgres://h/postgres?sslmode=disable", "x"), "postgres://h/x?sslmode=disable");
        assert_eq!(replace_database("postgres://h:5432", "x"), "postgres://h:5432/x");
    }
}
