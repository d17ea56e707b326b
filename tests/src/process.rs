//! A `data-plane` node or a `control-plane` replica as a child process of
//! the test: the real binary, its flags and signal handling, for faults only
//! a process has (`kill -9`, SIGTERM, an exit). Its output is kept (the last
//! lines) for failure messages and for what its log says.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

use crate::workspace_binary;

/// Output lines kept per process: enough to see why it failed.
const OUTPUT_LINES: usize = 2_000;

/// Environment of the developer's shell that would change what the child
/// does (auth, ports, telemetry); the test says what it wants instead.
const SCRUBBED_ENV: &[&str] = &[
    "KT_NODE_TOKEN",
    "KT_TLS_CA",
    "KT_TLS_CERT",
    "KT_TLS_KEY",
    "KT_TLS_DOMAIN",
    "KT_NODE_CLIENT_CA",
    "KT_METRICS_LISTEN",
    "KT_LOG_FORMAT",
    "KT_WORKERS",
    "KT_DB_MAX_CONNECTIONS",
    "KT_DEDUP_RETENTION_HOURS",
    "SENTRY_DSN",
];

/// How to start a `data-plane` child.
#[derive(Debug, Clone)]
pub struct DataPlaneOptions {
    pub database_url: String,
    pub control_plane_url: String,
    pub node_id: String,
    /// `KT_WORKERS`; 0 makes an ingest-only node.
    pub workers: usize,
    /// `RUST_LOG` of the child.
    pub rust_log: String,
    /// More environment (e.g. `KT_LOG_FORMAT=json`).
    pub env: Vec<(String, String)>,
}

impl DataPlaneOptions {
    /// An ingest-only node logging warnings.
    pub fn new(database_url: &str, control_plane_url: &str, node_id: &str) -> Self {
        Self {
            database_url: database_url.to_owned(),
            control_plane_url: control_plane_url.to_owned(),
            node_id: node_id.to_owned(),
            workers: 0,
            rust_log: "warn".into(),
            env: Vec::new(),
        }
    }
}

/// A running `data-plane` process; killed (SIGKILL) when dropped.
pub struct DataPlaneProcess {
    pub node_id: String,
    pid: Option<u32>,
    /// Sending (or dropping) it makes the waiter task SIGKILL the child.
    kill: Option<oneshot::Sender<()>>,
    exit: watch::Receiver<Option<ExitStatus>>,
    output: Arc<Mutex<VecDeque<String>>>,
}

impl DataPlaneProcess {
    /// Starts `target/<profile>/data-plane`. Cargo builds it with `cargo
    /// build --workspace` or `cargo test --workspace --all-targets`, not
    /// with `cargo test -p kt-tests` alone: a stale binary shows up as an
    /// early exit (e.g. a schema version mismatch) in [`Self::exited`].
    pub fn spawn(opts: &DataPlaneOptions) -> anyhow::Result<Self> {
        let bin = workspace_binary("data-plane")?;
        let mut command = Command::new(&bin);
        for var in SCRUBBED_ENV {
            command.env_remove(var);
        }
        command
            .env("DATABASE_URL", &opts.database_url)
            .env("KT_CONTROL_PLANE_URL", &opts.control_plane_url)
            .env("KT_NODE_ID", &opts.node_id)
            .env("KT_NODE_TOKEN", crate::TEST_NODE_TOKEN)
            .env("KT_WORKERS", opts.workers.to_string())
            .env("RUST_LOG", &opts.rust_log)
            .env("NO_COLOR", "1")
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let (pid, kill, exit, output) = spawn_kept(command, &bin)?;
        Ok(Self { node_id: opts.node_id.clone(), pid, kill: Some(kill), exit, output })
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// How the process ended, if it has.
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// An error with the process's output if it is not running any more.
    pub fn ensure_running(&self) -> anyhow::Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(status) => {
                anyhow::bail!("data-plane {} exited ({status}); its output:\n{}", self.node_id, self.output())
            }
        }
    }

    /// `kill -9`: the process gets no chance to commit, leave its group or
    /// close its connections. Returns once it is gone.
    pub async fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// SIGTERM (the binary's graceful stop), then waits up to `timeout` for
    /// the exit; a process still running then is killed and reported.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let pid = self.pid.context("no pid")?;
        if self.exited().is_none() {
            let status = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await
                .context("failed to run kill -TERM")?;
            anyhow::ensure!(status.success(), "kill -TERM {pid} failed: {status}");
        }
        match self.wait_exit(timeout).await {
            Ok(status) => Ok(status),
            Err(e) => {
                if let Some(kill) = self.kill.take() {
                    let _ = kill.send(());
                }
                Err(e.context(format!("data-plane {} ignored SIGTERM", self.node_id)))
            }
        }
    }

    async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut exit = self.exit.clone();
        let status = tokio::time::timeout(timeout, exit.wait_for(Option::is_some))
            .await
            .map_err(|_| anyhow::anyhow!("data-plane {} still running after {timeout:?}", self.node_id))??;
        Ok((*status).expect("waited for an exit status"))
    }

    /// The last lines the process printed (stdout and stderr interleaved).
    pub fn output(&self) -> String {
        let lines = self.output.lock().unwrap();
        lines.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }

    /// Output lines containing `needle`, oldest first.
    pub fn lines_containing(&self, needle: &str) -> Vec<String> {
        self.output.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }
}

/// A `control-plane` replica (`serve`) as a child of the test, on a fixed
/// address; killed (SIGKILL) when dropped. It logs JSON, so a test can read
/// when it became active and when it stepped down.
pub struct ControlPlaneProcess {
    pub name: String,
    pub addr: std::net::SocketAddr,
    kill: Option<oneshot::Sender<()>>,
    exit: watch::Receiver<Option<ExitStatus>>,
    output: Arc<Mutex<VecDeque<String>>>,
}

impl ControlPlaneProcess {
    /// Starts `target/<profile>/control-plane` against `database_url`,
    /// listening on `addr`, with the test encryption key and node token, 1 s heartbeats
    /// and `rust_log`.
    pub fn spawn(name: &str, database_url: &str, addr: std::net::SocketAddr, rust_log: &str) -> anyhow::Result<Self> {
        Self::spawn_with(name, database_url, addr, rust_log, &[])
    }

    /// [`Self::spawn`] with more environment (e.g. `KT_CLAIM_LEASE_SECONDS`).
    pub fn spawn_with(
        name: &str,
        database_url: &str,
        addr: std::net::SocketAddr,
        rust_log: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let bin = workspace_binary("control-plane")?;
        let mut command = Command::new(&bin);
        for var in SCRUBBED_ENV.iter().chain(&[
            "KT_API_TOKEN",
            "KT_GRPC_LISTEN",
            "KT_OLD_ENCRYPTION_KEYS",
            "KT_CLAIM_LEASE_SECONDS",
        ]) {
            command.env_remove(var);
        }
        command
            .env("DATABASE_URL", database_url)
            .env("KT_GRPC_LISTEN", addr.to_string())
            .env("KT_ENCRYPTION_KEY", crate::TEST_ENCRYPTION_KEY)
            .env("KT_NODE_TOKEN", crate::TEST_NODE_TOKEN)
            .env("KT_HEARTBEAT_SECONDS", "1")
            .env("KT_LOG_FORMAT", "json")
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied());
        let (_, kill, exit, output) = spawn_kept(command, &bin)?;
        Ok(Self { name: name.to_owned(), addr, kill: Some(kill), exit, output })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How the process ended, if it has.
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// An error with the process's output if it is not running any more.
    pub fn ensure_running(&self) -> anyhow::Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(status) => {
                anyhow::bail!("control-plane {} exited ({status}); its output:\n{}", self.name, self.output())
            }
        }
    }

    /// `kill -9`; returns once it is gone.
    pub async fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        let mut exit = self.exit.clone();
        let status = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(Option::is_some))
            .await
            .map_err(|_| anyhow::anyhow!("control-plane {} still running after SIGKILL", self.name))??;
        Ok((*status).expect("waited for an exit status"))
    }

    /// The last lines the process printed.
    pub fn output(&self) -> String {
        let lines = self.output.lock().unwrap();
        lines.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }

    /// Output lines containing `needle`, oldest first.
    pub fn lines_containing(&self, needle: &str) -> Vec<String> {
        self.output.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }
}

/// A test that fails with a control plane running prints what the control
/// plane logged: its side of the failure is otherwise lost.
impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- control-plane {} output ---\n{}\n--- end of control-plane {} ---",
                self.name,
                self.output(),
                self.name
            );
        }
    }
}

type Kept = (Option<u32>, oneshot::Sender<()>, watch::Receiver<Option<ExitStatus>>, Arc<Mutex<VecDeque<String>>>);

/// Spawns `command` (stdout and stderr piped) with one task owning the
/// child: it keeps the last output lines and reaps the child whenever it
/// exits, so the test can ask "still running?" without a `&mut`; sending
/// (or dropping) the returned sender SIGKILLs it.
fn spawn_kept(mut command: Command, bin: &std::path::Path) -> anyhow::Result<Kept> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn().with_context(|| format!("failed to run {}", bin.display()))?;
    let output = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(out) = child.stdout.take() {
        tokio::spawn(keep_lines(out, output.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(keep_lines(err, output.clone()));
    }
    let pid = child.id();
    let (kill_tx, kill_rx) = oneshot::channel();
    let (exit_tx, exit) = watch::channel(None);
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = kill_rx => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        let status = status.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(-1));
        let _ = exit_tx.send(Some(status));
    });
    Ok((pid, kill_tx, exit, output))
}

async fn keep_lines(stream: impl AsyncRead + Unpin, output: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut kept = output.lock().unwrap();
        if kept.len() == OUTPUT_LINES {
            kept.pop_front();
        }
        kept.push_back(line);
    }
}
