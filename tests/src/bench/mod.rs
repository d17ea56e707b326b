//! The benchmark program's scenarios (DESIGN §6): each starts what it needs
//! in this process (database, broker, control plane, node, webhook target),
//! measures the system and, in the same run, the limits it is compared
//! against, and returns one JSON object. `bin/bench.rs` parses the command
//! line and prints the objects.

pub mod backlog;
pub mod broker;
pub mod copy;
pub mod ingest;
pub mod latency;
pub mod limits;
pub mod ordered;
pub mod pgstats;
pub mod report;
pub mod server;
pub mod stack;
pub mod sustained;

use std::time::Duration;

use serde_json::Value;

pub use server::PostgresServer;

/// What the command line chose; each scenario picks the fields it uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// `host:port[,host:port]` of a real broker; `None`: the in-process mock.
    pub brokers: Option<String>,
    /// Messages per run (`ingest`: produced; `ordered`: stored per K).
    pub messages: Option<usize>,
    /// Key counts (`ordered` runs one line per value; others use the first).
    pub keys: Option<Vec<usize>>,
    pub partitions: i32,
    /// `latency`: produce rate (messages per second) and duration.
    pub rate: u32,
    pub seconds: u64,
    /// `sustained`: the rates stepped through (empty: the default steps)
    /// and how long each lasts.
    pub steps: Vec<u32>,
    pub step_seconds: u64,
    /// `backlog`: the small and large backlog sizes and the sample measured.
    pub small: usize,
    pub large: usize,
    pub sample: usize,
    /// `backlog`: stored messages per key, the same for both sizes.
    pub depth: usize,
    /// Work-order workers of the node; `None`: the node's default.
    pub workers: Option<usize>,
    /// Bound of every wait.
    pub timeout: Duration,
    /// librdkafka settings applied last to the node's consumers and the
    /// bare-consumer limit alike (`--kafka-config key=value`).
    pub kafka_config: Vec<(String, String)>,
    /// Where the databases are created: the bench's own cluster, or
    /// `--database-url`'s server.
    pub postgres: PostgresServer,
}

impl Options {
    /// The first `--keys` value, or `default`.
    pub fn first_keys(&self, default: usize) -> usize {
        self.keys.as_ref().and_then(|k| k.first().copied()).unwrap_or(default)
    }
}

/// A scenario failed: what it was doing and why.
#[derive(Debug)]
pub struct ScenarioError {
    pub scenario: &'static str,
    pub error: anyhow::Error,
}

/// Runs one scenario; `ordered` yields one object per key count,
/// `sustained` one with its steps inside.
pub async fn run(scenario: &'static str, opts: &Options) -> Result<Vec<Value>, ScenarioError> {
    report::reset_peak_rss();
    let result = match scenario {
        "ingest" => ingest::run(opts).await.map(|v| vec![v]),
        "ordered" => ordered::run(opts).await,
        "latency" => latency::run(opts).await.map(|v| vec![v]),
        "sustained" => sustained::run(opts).await.map(|v| vec![v]),
        "backlog" => backlog::run(opts).await.map(|v| vec![v]),
        other => Err(anyhow::anyhow!("unknown scenario {other}")),
    };
    result.map_err(|error| ScenarioError { scenario, error })
}

/// Progress on stderr, prefixed with the scenario.
#[macro_export]
macro_rules! progress {
    ($scenario:expr, $($arg:tt)*) => {
        eprintln!("[{} {:>8.1}s] {}", $scenario, $crate::bench::report::since_start().as_secs_f64(), format!($($arg)*))
    };
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The command line's defaults, on the shared test server.
    pub(crate) fn options() -> Options {
        Options {
            brokers: None,
            messages: None,
            keys: None,
            partitions: 6,
            rate: 500,
            seconds: 30,
            steps: Vec::new(),
            step_seconds: 20,
            small: 10_000,
            large: 1_000_000,
            sample: 5_000,
            depth: 10,
            workers: None,
            timeout: Duration::from_secs(900),
            kafka_config: Vec::new(),
            postgres: PostgresServer::external(crate::admin_database_url()),
        }
    }
}
