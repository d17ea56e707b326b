//! A throwaway Postgres cluster of a test's (or the benchmark's) own:
//! `initdb` in a temp dir, `pg_ctl` on a free port of 127.0.0.1, removed
//! when the value is dropped. Unlike the shared server it can be stopped
//! and started again (fault tests), and it runs with the server's default
//! settings unless told otherwise (the benchmark: autovacuum on, as in
//! production).
//!
//! `initdb` and `postgres` refuse to run as root; as root the cluster runs
//! as the `postgres` account (Debian's server package creates it), through
//! `runuser`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use sqlx::{Connection, PgConnection};

/// How long a start or stop may take.
const PG_CTL_WAIT_SECS: &str = "60";

pub struct PgCluster {
    base: PathBuf,
    bindir: PathBuf,
    /// The account the server runs as, when it is not the current one.
    run_as: Option<String>,
    port: u16,
    settings: Vec<(String, String)>,
}

impl PgCluster {
    /// Initializes and starts a cluster with the server's defaults plus
    /// `settings` (`name`, `value`) passed as `-c name=value`.
    pub async fn start(settings: &[(&str, &str)]) -> anyhow::Result<Self> {
        let bindir = bindir().context("no PostgreSQL server binaries (initdb, pg_ctl) found")?;
        let run_as = is_root().then(|| "postgres".to_owned());
        let base = std::env::temp_dir().join(format!("kt-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(base.join("data"))?;
        std::fs::create_dir_all(base.join("run"))?;
        let cluster = Self {
            base,
            bindir,
            run_as,
            port: free_port()?,
            settings: settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        };
        if let Some(user) = &cluster.run_as {
            let status = Command::new("chown").args(["-R", user]).arg(&cluster.base).status()?;
            anyhow::ensure!(status.success(), "chown of {} to {user} failed", cluster.base.display());
        }
        set_mode(&cluster.base, 0o755)?;
        set_mode(&cluster.base.join("data"), 0o700)?;
        let initdb = cluster.bindir.join("initdb");
        let data = cluster.base.join("data");
        cluster.run(
            "initdb",
            cluster.command(&initdb).arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
            ]),
        )?;
        cluster.start_server().await?;
        Ok(cluster)
    }

    /// The admin URL (database `postgres`, user `postgres`, trust auth).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once (`-m immediate`: like a crash, no
    /// checkpoint, every connection cut).
    pub fn stop(&self) -> anyhow::Result<()> {
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.base.join("data");
        self.run(
            "pg_ctl stop",
            self.command(&pg_ctl).arg("-D").arg(&data).args(["-m", "immediate", "-w", "-t", PG_CTL_WAIT_SECS, "stop"]),
        )
    }

    /// Starts the (stopped) server again on the same port and waits until
    /// it answers.
    pub async fn start_server(&self) -> anyhow::Result<()> {
        let mut opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={}",
            self.port,
            self.base.join("run").display()
        );
        for (k, v) in &self.settings {
            opts.push_str(&format!(" -c {k}={v}"));
        }
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.base.join("data");
        let log = self.base.join("postgres.log");
        self.run(
            "pg_ctl start",
            self.command(&pg_ctl).arg("-D").arg(&data).arg("-l").arg(&log).arg("-o").arg(&opts).args([
                "-w",
                "-t",
                PG_CTL_WAIT_SECS,
                "start",
            ]),
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match PgConnection::connect(&self.url()).await {
                Ok(c) => {
                    let _ = c.close().await;
                    return Ok(());
                }
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(e).context("the throwaway cluster started but does not answer")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.base.join("postgres.log")).unwrap_or_default()
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, what: &str, command: &mut Command) -> anyhow::Result<()> {
        let out = command.output().with_context(|| format!("cannot run {what}"))?;
        anyhow::ensure!(
            out.status.success(),
            "{what} failed ({}): {}{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// The bin directory of the PostgreSQL server: `pg_config --bindir` when
/// it holds initdb, else the newest `/usr/lib/postgresql/N/bin`.
fn bindir() -> Option<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

fn is_root() -> bool {
    // The effective uid, from /proc (no libc dependency for one call).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_a_throwaway_cluster_starts_stops_and_starts_again() {
        let cluster = PgCluster::start(&[("max_connections", "50")]).await.unwrap();
        let mut c = PgConnection::connect(&cluster.url()).await.unwrap();
        let max: String = sqlx::query_scalar("SHOW max_connections").fetch_one(&mut c).await.unwrap();
        assert_eq!(max, "50");
        sqlx::query("CREATE TABLE kept (x int)").execute(&mut c).await.unwrap();
        cluster.stop().unwrap();
        assert!(sqlx::query("SELECT 1").execute(&mut c).await.is_err(), "a stopped server still answers");
        cluster.start_server().await.unwrap();
        let mut c = PgConnection::connect(&cluster.url()).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM kept").fetch_one(&mut c).await.unwrap();
        assert_eq!(n, 0);
    }
}
