//! The benchmark program (DESIGN §6). Runs a scenario, or all of them, with
//! everything in this process: a throwaway Postgres cluster of its own
//! (initdb in a temp dir, the server's default settings; removed at exit)
//! unless --database-url / DATABASE_URL names an existing server, the
//! in-process Kafka mock unless --brokers is given, a control plane, a
//! data-plane node and a webhook target. Progress goes to stderr; stdout
//! gets exactly one JSON object per line per scenario (per key count for
//! `ordered`; `sustained` puts its steps in one line).
//!
//!   cargo run --release -p kt-tests --bin bench -- all
//!   cargo run --release -p kt-tests --bin bench -- latency --rate 200 --seconds 5
//!   cargo run --release -p kt-tests --bin bench -- sustained --steps 500,1000 --step-seconds 10

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kt_tests::bench::{self, Options, PostgresServer};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// N messages in the broker -> durable in Postgres, offsets committed.
    Ingest,
    /// Work orders per second over K keys vs keyless, from a stored backlog.
    Ordered,
    /// Produce -> delivery latency under a steady rate.
    Latency,
    /// Produce -> delivery latency and backlog while the rate steps up.
    Sustained,
    /// Per-message dispatch cost with a 10k vs a 1M backlog.
    Backlog,
    /// Every scenario, in this order.
    All,
}

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Kafka triggers benchmark: one JSON summary per scenario on stdout",
    after_help = "Starts a throwaway Postgres cluster of its own (needs the PostgreSQL server binaries: \
                  initdb, pg_ctl, and the pg_stat_statements module) unless --database-url / DATABASE_URL \
                  names a server where it may create databases. Everything else (broker, control plane, \
                  node, webhook target) runs in this process."
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
    /// ingest, latency and sustained use the first (default 1000).
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
    /// sustained: the rates (messages per second) stepped through, in order.
    #[arg(long, value_delimiter = ',', default_values_t = bench::sustained::DEFAULT_STEPS.to_vec())]
    steps: Vec<u32>,
    /// sustained: seconds of production per step.
    #[arg(long, default_value_t = 20)]
    step_seconds: u64,
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
    /// An existing Postgres server where the bench creates (and drops) its
    /// databases; without it the bench starts a throwaway cluster of its
    /// own with the server's default settings (autovacuum on).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .init();
    bench::report::start();
    let scenarios: &[&'static str] = match cli.scenario {
        Scenario::Ingest => &["ingest"],
        Scenario::Ordered => &["ordered"],
        Scenario::Latency => &["latency"],
        Scenario::Sustained => &["sustained"],
        Scenario::Backlog => &["backlog"],
        Scenario::All => &["ingest", "ordered", "latency", "sustained", "backlog"],
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            println!("{}", json!({"scenario": scenarios[0], "error": format!("cannot start the runtime: {e}")}));
            return ExitCode::FAILURE;
        }
    };
    // The cluster lives until the end of main: every database of every
    // scenario is on it. The URL goes to the scenarios explicitly, never
    // through the environment.
    let (cluster, postgres) = match cli.database_url {
        Some(url) => (None, PostgresServer::external(url)),
        None => match runtime.block_on(bench::server::start_owned()) {
            Ok((cluster, server)) => {
                eprintln!("== postgres: a throwaway cluster of the bench's own at {}", server.admin_url);
                (Some(cluster), server)
            }
            Err(e) => {
                println!("{}", json!({"scenario": scenarios[0], "error": format!("{e:#}")}));
                return ExitCode::FAILURE;
            }
        },
    };
    bench::report::set_postgres_server(postgres.kind());
    let opts = Options {
        brokers: cli.brokers,
        messages: cli.messages,
        keys: cli.keys,
        partitions: cli.partitions,
        rate: cli.rate,
        seconds: cli.seconds,
        steps: cli.steps,
        step_seconds: cli.step_seconds,
        small: cli.small,
        large: cli.large,
        sample: cli.sample,
        depth: cli.depth,
        workers: cli.workers,
        timeout: Duration::from_secs(cli.timeout_secs),
        kafka_config: cli.kafka_config,
        postgres,
    };
    let mut failed = false;
    for scenario in scenarios {
        eprintln!("== {scenario}");
        // Ctrl-C ends the run cleanly, so the cluster is stopped and its
        // directory removed rather than left running.
        let run = runtime.block_on(async {
            tokio::select! {
                result = bench::run(scenario, &opts) => Some(result),
                _ = tokio::signal::ctrl_c() => None,
            }
        });
        let Some(result) = run else {
            eprintln!("interrupted");
            println!("{}", json!({"scenario": scenario, "error": "interrupted"}));
            failed = true;
            break;
        };
        match result {
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
    drop(cluster);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
