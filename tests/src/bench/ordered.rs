//! `ordered` / keyless: a backlog of N stored messages over K keys (and the
//! same volume keyless), a target that answers 200 at once → work orders
//! succeeded per second, and ordered / keyless. The backlog is stored with
//! COPY exactly as ingest leaves it (messages, dedup records, ready sets),
//! then announced with NOTIFY; the clock runs from that commit until every
//! work order succeeded.
//!
//! Each run has a stack (database, control plane, node) of its own, so its
//! database statistics cover that run alone: the window of
//! `commits_per_work_order` and `statements_per_work_order` opens just
//! before the announcing transaction and closes once the stopped stack's
//! connections are gone. It therefore holds the announcement (one commit, a
//! few statements) and the stack's shutdown, but not the bench's progress
//! polls, which are counted and subtracted.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{Map, Value};

use super::broker::Broker;
use super::limits::Limits;
use super::pgstats::{self, Observer};
use super::report::{per_second, round, with_memory};
use super::stack::{self, Stack, POLL};
use super::Options;
use crate::progress;
use crate::webhook::WebhookReceiver;

const SCENARIO: &str = "ordered";
/// Bound of the warm-up (workers connecting, trigger assignment).
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the stopped stack's connections may take to go: past
/// Postgres's 10 s idle flush, any left have published their counts anyway.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(12);

struct RunResult {
    rate: f64,
    elapsed: Duration,
    order_violations: usize,
    duplicates: usize,
    workers: usize,
    /// The database's statistics of the run (see the module docs).
    stats: Value,
}

/// One object per key count; a failed key count yields an error object and
/// the others still run.
pub async fn run(opts: &Options) -> anyhow::Result<Vec<Value>> {
    let n = opts.messages.unwrap_or(20_000);
    let key_counts = opts.keys.clone().unwrap_or_else(|| vec![1, 100, 10_000]);
    anyhow::ensure!(n > 0, "--messages must be positive");
    let limits = Limits::measure(SCENARIO, opts).await;
    let broker = Broker::start(opts.brokers.as_deref())?;
    // The triggers read this (empty) topic; their backlog is stored directly.
    let topic = broker.create_topic("ordered", opts.partitions).await?;

    let keyless = run_once(&broker, &topic, n, 0, opts).await;
    let mut out = Vec::new();
    for k in key_counts {
        let mut o = Map::new();
        o.insert("scenario".into(), SCENARIO.into());
        o.insert("keys".into(), k.into());
        o.insert("messages".into(), n.into());
        if let Err(e) = &keyless {
            // Nothing is processed at all: running the keyed backlogs would
            // only wait out the same timeout again.
            o.insert("error".into(), format!("keyless run failed, keyed run skipped: {e:#}").into());
            out.push(Value::Object(o));
            continue;
        }
        let keyed = run_once(&broker, &topic, n, k, opts).await;
        match (&keyed, &keyless) {
            (Ok(keyed), Ok(keyless)) => {
                o.insert("work_orders_per_s".into(), keyed.rate.into());
                o.insert("seconds".into(), round(keyed.elapsed.as_secs_f64(), 3).into());
                o.insert("keyless_work_orders_per_s".into(), keyless.rate.into());
                o.insert("ratio_to_keyless".into(), round(keyed.rate / keyless.rate, 3).into());
                o.insert("order_violations".into(), keyed.order_violations.into());
                o.insert("duplicate_deliveries".into(), (keyed.duplicates + keyless.duplicates).into());
                o.insert("commits_per_work_order".into(), keyed.stats["commits_per_work_order"].clone());
                o.insert("statements_per_work_order".into(), keyed.stats["statements_per_work_order"].clone());
                o.insert("keyless_commits_per_work_order".into(), keyless.stats["commits_per_work_order"].clone());
                o.insert(
                    "keyless_statements_per_work_order".into(),
                    keyless.stats["statements_per_work_order"].clone(),
                );
                o.insert("db_stats".into(), keyed.stats.clone());
                o.insert("node_workers".into(), keyed.workers.into());
                o.insert("partitions".into(), opts.partitions.into());
                limits.report(&mut o, keyed.rate);
                out.push(with_memory(o));
            }
            (Err(e), _) | (_, Err(e)) => {
                o.insert("error".into(), format!("{e:#}").into());
                out.push(Value::Object(o));
            }
        }
    }
    Ok(out)
}

/// What one run stores and where.
struct Run<'a> {
    broker: &'a Broker,
    topic: &'a str,
    n: usize,
    /// 0: keyless.
    keys: usize,
    label: String,
}

/// One backlog of `n` messages over `keys` keys (0: keyless) on a stack of
/// its own, processed to the end.
async fn run_once(broker: &Broker, topic: &str, n: usize, keys: usize, opts: &Options) -> anyhow::Result<RunResult> {
    let label = if keys == 0 { "keyless".to_owned() } else { format!("K={keys}") };
    let run = Run { broker, topic, n, keys, label };
    let label = &run.label;
    let mut stack = Stack::start(opts, opts.workers).await?;
    let workers = stack.workers;
    progress!(SCENARIO, "{label}: stack up (database {}, node workers {workers})", stack.database_name());
    let mut observer = Observer::connect(&opts.postgres.admin_url, stack.database_name()).await?;
    let measured = measure(&mut stack, &mut observer, &run, opts).await;
    // Stopped whatever happened, and before the window closes: only then
    // are the transaction counts of the run all published.
    let db = stack.stop_keeping_database().await;
    let (waited, before, receiver, elapsed) = measured?;
    let left = observer.wait_disconnected(DISCONNECT_TIMEOUT).await?;
    let after = observer.snapshot().await?;
    drop(db);
    let note = match (left, observer.note()) {
        (0, note) => note.map(str::to_owned),
        (left, note) => Some(format!(
            "{left} connection(s) of the stack still open at the end of the window: their last second may be \
             missing{}",
            note.map(|n| format!("; {n}")).unwrap_or_default()
        )),
    };
    let stats = pgstats::report(before, after, waited.polls, n, note.as_deref());
    let rate = per_second(n, elapsed);
    let (order_violations, duplicates) = check_order(&receiver);
    progress!(
        SCENARIO,
        "{label}: {n} work orders succeeded in {:.2}s ({rate:.0}/s); {} commits, {} statements per work order",
        elapsed.as_secs_f64(),
        stats["commits_per_work_order"],
        stats["statements_per_work_order"]
    );
    Ok(RunResult { rate, elapsed, order_violations, duplicates, workers, stats })
}

/// The measured part of a run: a trigger of its own, warmed up, its backlog
/// stored, the statistics read, the backlog announced and waited for.
async fn measure(
    stack: &mut Stack,
    observer: &mut Observer,
    run: &Run<'_>,
    opts: &Options,
) -> anyhow::Result<(stack::Waited, pgstats::Counters, WebhookReceiver, Duration)> {
    let Run { broker, topic, n, keys, ref label } = *run;
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse()?).await?;
    let name = format!("bench-ordered-{}-{}", label.replace('=', ""), &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let (trigger, _) = stack.create_trigger(&name, broker.hosts(), topic, &receiver.url()).await?;
    let warm = stack::warm_up(&stack.pool, trigger, topic, WARM_UP_TIMEOUT).await?;
    progress!(SCENARIO, "{label}: workers ready (warm-up {:.2}s); storing {n} messages", warm.as_secs_f64());
    let backlog = stack::store_messages(&stack.pool, trigger, topic, n, keys, opts.partitions).await?;
    progress!(
        SCENARIO,
        "{label}: stored {} messages in {} sets in {:.2}s; announcing",
        backlog.messages,
        backlog.sets,
        backlog.load_time.as_secs_f64()
    );
    let before = observer.snapshot().await?;
    let started = stack::announce_sets(&stack.pool, trigger, topic, keys > 0).await?;
    let waited =
        stack::wait_successes(SCENARIO, &stack.pool, trigger, n as i64 + 1, &receiver, POLL, opts.timeout).await?;
    let elapsed = waited.at - started;
    Ok((waited, before, receiver, elapsed))
}

/// Deliveries that arrived after a later message of the same key (keyed
/// only), and deliveries of a message already delivered.
fn check_order(receiver: &WebhookReceiver) -> (usize, usize) {
    let mut newest: HashMap<String, (i32, i64)> = HashMap::new();
    let mut seen = HashSet::new();
    let (mut violations, mut duplicates) = (0, 0);
    for d in receiver.deliveries() {
        let at = (d.partition(), d.offset());
        if !seen.insert(at) {
            duplicates += 1;
            continue;
        }
        if let Some(key) = d.key() {
            let prev = newest.entry(key.to_owned()).or_insert(at);
            if at < *prev {
                violations += 1;
            } else {
                *prev = at;
            }
        }
    }
    (violations, duplicates)
}
