//! The command line: global connection and output options, and one
//! subcommand per verb. Every global option also reads an environment
//! variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (anything not listed below)
  2  usage: bad arguments, an unreadable or invalid input file, or a request the server refused as invalid
  3  not found: an unknown trigger, set or work order
  4  unauthenticated: no or wrong API token (--token / KT_API_TOKEN)
  5  unavailable: the control plane cannot be reached, or a dependency of it is down; retrying may help

Output: a table on a terminal, JSON otherwise (-o to choose). JSON and YAML are the API's own
shape (the proto3 JSON mapping, as grpcurl prints it), so they can be fed back with -f.";

#[derive(Debug, Parser)]
#[command(
    name = "kt",
    version,
    about = "Operate Kafka triggers: triggers, message sets, work orders, events and a live view",
    after_long_help = EXIT_CODES,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Control plane URL; https:// uses TLS.
    #[arg(long, global = true, env = "KT_SERVER", default_value = "http://127.0.0.1:50051", value_name = "URL")]
    pub server: String,
    /// Bearer token for the API (the control plane's --api-token).
    #[arg(long, global = true, env = "KT_API_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// PEM CA certificate(s) that verify the server; default: the system's roots. Implies TLS.
    #[arg(long, global = true, env = "KT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --tls-key). Implies TLS.
    #[arg(long, global = true, env = "KT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "KT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Name to verify the server's certificate against, when it differs from the URL's host. Implies TLS.
    #[arg(long, global = true, env = "KT_TLS_DOMAIN", value_name = "NAME")]
    pub tls_domain: Option<String>,
    /// Output format; default: table on a terminal, JSON otherwise.
    #[arg(short = 'o', long, global = true, env = "KT_OUTPUT", value_enum, value_name = "FORMAT")]
    pub output: Option<Format>,
    /// Deadline of each request, in seconds (streams are not limited).
    #[arg(long, global = true, env = "KT_TIMEOUT", default_value_t = 30, value_name = "SECONDS")]
    pub timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, change, inspect and delete triggers.
    #[command(subcommand, visible_alias = "trigger")]
    Triggers(TriggersCmd),
    /// Message sets (messages sharing trigger, topic and key): list, inspect, unblock.
    #[command(subcommand, visible_alias = "set")]
    Sets(SetsCmd),
    /// Work orders: list, inspect, report the outcome of an accepted (202) one.
    #[command(subcommand, name = "work-orders", visible_alias = "wo")]
    WorkOrders(WorkOrdersCmd),
    /// The event stream, one line per event.
    Events(EventsArgs),
    /// A live view of every trigger: rates, lag, in flight, waiting, blocked sets.
    Top(TopArgs),
    /// Print a shell completion script (e.g. `source <(kt completion bash)`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// A trigger, by id or by name.
pub type TriggerRef = String;

#[derive(Debug, Subcommand)]
pub enum TriggersCmd {
    /// Every trigger.
    #[command(visible_alias = "ls")]
    List,
    /// One trigger's configuration (secrets are never returned).
    Get { trigger: TriggerRef },
    /// Create a trigger from a JSON or YAML file in the API's shape (`Trigger`, or `{"trigger": …}`).
    Create {
        /// The file; `-` reads standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: String,
        /// Set a field after reading the file, e.g. `--set name=orders --set kafka.topics=a,b`.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
    },
    /// Change a trigger: replace it with a file (secrets left empty keep their value), or only the
    /// fields named with --set.
    #[command(after_help = "With -f, the whole configuration is replaced by the file (then --set applies on top).\n\
                            With only --set, just those fields change (an update mask of their paths), e.g.\n  \
                            kt triggers update orders --set kafka.topics=orders,refunds --set retry.max_attempts=3")]
    Update {
        trigger: TriggerRef,
        /// The new configuration; `-` reads standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE", required_unless_present = "set")]
        file: Option<String>,
        /// Set a field, e.g. `webhook.url=https://…`; lists take `a,b` or JSON (`["a","b"]`).
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
    },
    /// Start consuming (on every node, within seconds).
    Enable { trigger: TriggerRef },
    /// Stop consuming; stored messages and sets stay.
    Disable { trigger: TriggerRef },
    /// Delete a trigger and everything stored for it.
    #[command(visible_alias = "rm")]
    Delete {
        trigger: TriggerRef,
        /// Do not ask (required when standard input is not a terminal).
        #[arg(short, long)]
        yes: bool,
    },
    /// Nodes running the trigger, partitions with lag, counts, blocked sets and the oldest's age.
    Status { trigger: TriggerRef },
    /// Connect to a trigger's brokers from a data-plane node, with exactly its pipeline's
    /// configuration: brokers, partitions, watermarks and committed offsets, or why not (exit 1).
    Test {
        /// A stored trigger (name or id).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        trigger: Option<TriggerRef>,
        /// A trigger that is not stored (YAML or JSON; `-` for stdin), as for `create`.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SetState {
    Ready,
    InFlight,
    Blocked,
    Waiting,
    Idle,
}

#[derive(Debug, Subcommand)]
pub enum SetsCmd {
    /// Message sets; without --state every set except idle ones.
    #[command(visible_alias = "ls")]
    List {
        /// Only this trigger's sets (id or name).
        #[arg(long)]
        trigger: Option<TriggerRef>,
        #[arg(long, value_enum)]
        state: Option<SetState>,
        /// Only the sets of this key, looked up by the server: text, or `base64:…` as the KEY
        /// column shows it; `-` lists the unkeyed sets.
        #[arg(long)]
        key: Option<String>,
        /// At most this many sets (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// One set: its head message, attempts, last error, why it is in its state.
    Get { id: String },
    /// Give a blocked set's head work order a fresh attempt budget, now.
    #[command(
        after_help = "kt sets retry --all-blocked --trigger ID retries every blocked set of a trigger, with progress and a summary."
    )]
    Retry {
        #[arg(required_unless_present = "all_blocked", conflicts_with = "all_blocked")]
        id: Option<String>,
        /// Every blocked set of --trigger.
        #[arg(long, requires = "trigger")]
        all_blocked: bool,
        /// With --all-blocked: the trigger (id or name).
        #[arg(long)]
        trigger: Option<TriggerRef>,
    },
    /// Skip a blocked or waiting set's head message; the next message becomes the candidate.
    Skip { id: String },
    /// Drop every stored message of a set (their open work orders become skipped).
    Discard {
        id: String,
        /// Do not ask (required when standard input is not a terminal).
        #[arg(short, long)]
        yes: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkOrderState {
    Pending,
    Running,
    Success,
    Failed,
    Skipped,
}

#[derive(Debug, Subcommand)]
pub enum WorkOrdersCmd {
    /// Work orders, oldest first.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long)]
        trigger: Option<TriggerRef>,
        #[arg(long, value_enum)]
        state: Option<WorkOrderState>,
        /// Only the work orders of this key (text, or `base64:…` as the KEY column shows it).
        #[arg(long)]
        key: Option<String>,
        /// Only offsets of this topic (with --partition; --from and --to bound them).
        #[arg(long, requires = "partition")]
        topic: Option<String>,
        #[arg(long, requires = "topic")]
        partition: Option<i32>,
        /// First offset of the range (inclusive).
        #[arg(long = "from", requires = "partition", value_name = "OFFSET")]
        offset_from: Option<i64>,
        /// End of the range (exclusive).
        #[arg(long = "to", requires = "partition", value_name = "OFFSET")]
        offset_to: Option<i64>,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One work order with its attempts.
    Get {
        id: String,
        /// Print only the body POSTed to the target: exact, or pretty-printed for a table (-o table, the default on a terminal).
        #[arg(long)]
        body: bool,
    },
    /// Report the outcome of a work order its target accepted with 202.
    Complete {
        id: String,
        #[arg(long, conflicts_with = "failure", required_unless_present = "failure")]
        success: bool,
        /// It failed, with this error; its set becomes blocked.
        #[arg(long, value_name = "MESSAGE")]
        failure: Option<String>,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "Without --follow: the stored events after --after (default: all), then exit.\n\
                        With --follow: then keep following; Ctrl-C prints the cursor to resume from.")]
pub struct EventsArgs {
    /// Only events of these triggers (id or name; repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub trigger: Vec<TriggerRef>,
    /// Only these kinds, e.g. work_order_failed,set_blocked (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub kind: Vec<String>,
    /// Start after this cursor (printed with every event, and on Ctrl-C).
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<String>,
    /// Keep following new events. Without --after: only events from now on.
    #[arg(short, long)]
    pub follow: bool,
    /// Without --follow: the replay is over once no event arrived for this many milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub idle_ms: u64,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Only these triggers (id or name; repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub trigger: Vec<TriggerRef>,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub interval: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn test_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_retry_needs_an_id_or_all_blocked_with_a_trigger() {
        assert!(Cli::try_parse_from(["kt", "sets", "retry"]).is_err());
        assert!(Cli::try_parse_from(["kt", "sets", "retry", "--all-blocked"]).is_err());
        assert!(Cli::try_parse_from(["kt", "sets", "retry", "--all-blocked", "--trigger", "t"]).is_ok());
        assert!(Cli::try_parse_from(["kt", "sets", "retry", "42"]).is_ok());
    }

    #[test]
    fn test_complete_needs_exactly_one_outcome() {
        assert!(Cli::try_parse_from(["kt", "work-orders", "complete", "x"]).is_err());
        assert!(Cli::try_parse_from(["kt", "wo", "complete", "x", "--success", "--failure", "no"]).is_err());
        assert!(Cli::try_parse_from(["kt", "wo", "complete", "x", "--failure", "no"]).is_ok());
    }
}
