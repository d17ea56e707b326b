//! `backlog`: the per-message cost of dispatching work orders with a small
//! (10k) and a large (1M) backlog stored. Each size gets a stack of its own;
//! the backlog is stored with COPY as ingest leaves it, with the same depth
//! (messages per key) in both, so that only the stored volume (messages,
//! sets, index sizes) differs; it is announced and the clock measures a
//! fixed sample of work orders from that moment. The cost should be flat:
//! ratio = large / small.

use std::time::Duration;

use serde_json::{Map, Value};

use super::broker::Broker;
use super::limits::Limits;
use super::report::{round, with_memory};
use super::stack::{self, Stack};
use super::Options;
use crate::progress;
use crate::webhook::WebhookReceiver;

const SCENARIO: &str = "backlog";
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Finer than the default poll: a sample lasts only seconds.
const POLL: Duration = Duration::from_millis(20);

struct Sampled {
    per_msg_us: f64,
    keys: usize,
    load_seconds: f64,
}

pub async fn run(opts: &Options) -> anyhow::Result<Value> {
    let (small, large) = (opts.small, opts.large);
    let depth = opts.depth.max(1);
    let sample = opts.sample.min(small).max(1);
    anyhow::ensure!(small > 0 && large >= small, "need 0 < --small <= --large");
    let limits = Limits::measure(SCENARIO, opts).await;
    let broker = Broker::start(opts.brokers.as_deref())?;
    let topic = broker.create_topic("backlog", opts.partitions).await?;

    let s = measure(opts, &broker, &topic, small, depth, sample).await?;
    let l = measure(opts, &broker, &topic, large, depth, sample).await?;

    let mut o = Map::new();
    o.insert("scenario".into(), SCENARIO.into());
    o.insert("per_msg_us_10k".into(), round(s.per_msg_us, 1).into());
    o.insert("per_msg_us_1m".into(), round(l.per_msg_us, 1).into());
    o.insert("ratio".into(), round(l.per_msg_us / s.per_msg_us, 3).into());
    o.insert("small_backlog".into(), small.into());
    o.insert("large_backlog".into(), large.into());
    o.insert("sample".into(), sample.into());
    o.insert("depth".into(), depth.into());
    o.insert("keys_small".into(), s.keys.into());
    o.insert("keys_large".into(), l.keys.into());
    o.insert("load_seconds_small".into(), round(s.load_seconds, 2).into());
    o.insert("load_seconds_large".into(), round(l.load_seconds, 2).into());
    // Work orders per second of the sample from the small backlog; the
    // large one's ratio beside it.
    limits.report(&mut o, 1e6 / s.per_msg_us);
    o.insert("ratio_to_limit_1m".into(), limits.ratio(1e6 / l.per_msg_us).map(|r| round(r, 3)).into());
    Ok(with_memory(o))
}

/// A fresh stack with `backlog` stored messages, `depth` per key; the time
/// per work order of the first `sample` work orders after the announcement.
async fn measure(
    opts: &Options,
    broker: &Broker,
    topic: &str,
    backlog: usize,
    depth: usize,
    sample: usize,
) -> anyhow::Result<Sampled> {
    let keys = (backlog / depth).max(1);
    let mut stack = Stack::start(opts, opts.workers).await?;
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse()?).await?;
    let name = format!("bench-backlog-{backlog}");
    let (trigger, _) = stack.create_trigger(&name, broker.hosts(), topic, &receiver.url()).await?;
    stack::warm_up(&stack.pool, trigger, topic, WARM_UP_TIMEOUT).await?;
    progress!(SCENARIO, "{backlog}: storing {backlog} messages over {keys} keys (node workers {})", stack.workers);
    let stored = stack::store_messages(&stack.pool, trigger, topic, backlog, keys, opts.partitions).await?;
    progress!(SCENARIO, "{backlog}: stored in {:.2}s; announcing", stored.load_time.as_secs_f64());
    let started = stack::announce_sets(&stack.pool, trigger, topic, true).await?;
    let done =
        stack::wait_successes(SCENARIO, &stack.pool, trigger, sample as i64 + 1, &receiver, POLL, opts.timeout).await;
    stack.stop().await;
    let elapsed = done?.at - started;
    let per_msg_us = elapsed.as_secs_f64() * 1e6 / sample as f64;
    progress!(SCENARIO, "{backlog}: {sample} work orders in {:.2}s ({per_msg_us:.0} us each)", elapsed.as_secs_f64());
    Ok(Sampled { per_msg_us, keys, load_seconds: stored.load_time.as_secs_f64() })
}
