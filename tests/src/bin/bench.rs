//! The benchmark program (DESIGN §6). Runs a scenario, or all of them, with
//! everything in this process: its own Postgres database (on DATABASE_URL's
//! server, default postgres://postgres@127.0.0.1:5432/postgres — source
//! scripts/lib.sh and run kt_ensure_postgres to get one), the in-process
//! Kafka mock unless --brokers is given, a control plane, a data-plane node
//! and a webhook target. Progress goes to stderr; stdout gets exactly one
//! JSON object per line per scenario (per key count for `ordered`).
//!
//!   cargo run --release -p kt-tests --bin bench -- all
//!   cargo run --release -p kt-tests --bin bench -- latency --rate 200 --seconds 5

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kt_tests::bench::{self, Options};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// N messages in the broker -> durable in Postgres, offsets committed.
    Ingest,
    /// Work orders per second over K keys vs keyless, from a stored backlog.
    Ordered,
    /// Produce -> delivery latency under a steady rate.
    Latency,
    /// Per-message dispatch cost with a 10k vs a 1M backlog.
    Backlog,
    /// Every scenario, in this order.
    All,
}

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Kafka triggers benchmark: one JSON summary per scenario on stdout",
    after_help = "Needs a Postgres server where it may create databases (--database-url / DATABASE_URL; \
                  `source scripts/lib.sh && kt_ensure_postgres` provides one). Everything else (broker, \
                  control plane, node, webhook target) runs in this process."
)]
struct Cli {
    scenario: Scenario,
    /// Real Kafka brokers (host:port,...) instead of the in-process mock;
    /// the bench creates its own topics there.
    #[arg(long)]
    brokers: Option<String>,
    /// Messages: ingest (default 200000), ordered per run (default 20000).
    #[arg(long)]
    messages: Option<usize>,
    /// Key counts, comma-separated: ordered runs each (default 1,100,10000);
    /// ingest and latency use the first (default 1000).
    #[arg(long, value_delimiter = ',')]
    keys: Option<Vec<usize>>,
    /// Partitions of the topics the bench creates.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// latency: messages per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// latency: seconds of steady production.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// backlog: the small backlog.
    #[arg(long, default_value_t = 10_000)]
    small: usize,
    /// backlog: the large backlog.
    #[arg(long, default_value_t = 1_000_000)]
    large: usize,
    /// backlog: work orders timed from each backlog.
    #[arg(long, default_value_t = 5_000)]
    sample: usize,
    /// backlog: stored messages per key (keys = backlog / depth), the same
    /// for both sizes so that only the stored volume differs.
    #[arg(long, default_value_t = 10)]
    depth: usize,
    /// Work-order workers of the node (default: the node's default). The
    /// ingest scenario always runs the node with 0.
    #[arg(long)]
    workers: Option<usize>,
    /// Postgres server where the bench creates (and drops) its databases.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// librdkafka setting for the node's consumers and the bare-consumer
    /// limit alike, applied last (repeatable): e.g. fetch.queue.backoff.ms=10.
    #[arg(long = "kafka-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    kafka_config: Vec<(String, String)>,
    /// Bound of every wait, in seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got `{s}`"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // TestDb reads the server from DATABASE_URL; set before any thread starts.
    std::env::set_var("DATABASE_URL", &cli.database_url);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .init();
    bench::report::start();
    let opts = Options {
        brokers: cli.brokers,
        messages: cli.messages,
        keys: cli.keys,
        partitions: cli.partitions,
        rate: cli.rate,
        seconds: cli.seconds,
        small: cli.small,
        large: cli.large,
        sample: cli.sample,
        depth: cli.depth,
        workers: cli.workers,
        timeout: Duration::from_secs(cli.timeout_secs),
        kafka_config: cli.kafka_config,
    };
    let scenarios: &[&'static str] = match cli.scenario {
        Scenario::Ingest => &["ingest"],
        Scenario::Ordered => &["ordered"],
        Scenario::Latency => &["latency"],
        Scenario::Backlog => &["backlog"],
        Scenario::All => &["ingest", "ordered", "latency", "backlog"],
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            println!("{}", json!({"scenario": scenarios[0], "error": format!("cannot start the runtime: {e}")}));
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for scenario in scenarios {
        eprintln!("== {scenario}");
        match runtime.block_on(bench::run(scenario, &opts)) {
            Ok(objects) => {
                for o in objects {
                    failed |= o.get("error").is_some();
                    println!("{o}");
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("[{}] failed: {:#}", e.scenario, e.error);
                println!("{}", json!({"scenario": e.scenario, "error": format!("{:#}", e.error)}));
            }
        }
    }
    // Background tasks of the stacks (dropped already) must not delay exit.
    runtime.shutdown_timeout(Duration::from_secs(5));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
