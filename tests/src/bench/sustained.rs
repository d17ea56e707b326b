//! `sustained`: the full path of `latency` (producer → broker → ingest →
//! scheduler → workers → target) under a producer that steps its rate up
//! without pausing between steps, over 1 000 keys. Per step: produce →
//! delivered latency of the step's messages, the delivered rate, and whether
//! the backlog (produced but not yet delivered) stayed flat. The summary
//! `max_rate_msgs_per_s` is the highest rate up to which every step kept
//! p99 within [`P99_BUDGET_MS`] with a flat backlog.
//!
//! Stepping stops after the first step whose backlog grew: the next, faster
//! step could only grow it further, and the drain would take longer. A step
//! that only missed the latency budget is seen after the drain, so stepping
//! goes on past it.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::broker::Broker;
use super::latency::{latencies_by_seq, steady_produce, warm_up, Pipeline, WARM_UP_MESSAGES};
use super::limits::Limits;
use super::report::{per_second, percentile, round, with_memory};
use super::Options;
use crate::progress;

const SCENARIO: &str = "sustained";
/// The latency a step must keep at p99.
pub const P99_BUDGET_MS: f64 = 100.0;
/// Backlog growth tolerated at any rate: a few messages in flight more or
/// less between two samples is noise, not a trend.
pub const MIN_BACKLOG_SLACK: i64 = 20;
/// A step's offered rate counts as reached at this share of the target
/// (the load generator shares the machine with the system under test).
pub const RATE_REACHED: f64 = 0.95;
/// How long the last messages may take to arrive once stepping ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// The default `--steps`.
pub const DEFAULT_STEPS: &[u32] = &[500, 1_000, 2_000, 3_000, 4_000, 8_000];

/// The producer batches as librdkafka does by default (`linger.ms` 5), as a
/// producer sending thousands of messages a second would. With no linger,
/// every message is a request and a record batch of its own, and the
/// in-process broker, which walks a partition's whole log on every fetch
/// (`rd_kafka_mock_msgset_find`), takes a fifth of the machine at 2 000
/// msg/s, and more the longer the log.
/// The linger is inside the measured latency (from the hand-over to the
/// producer).
const PRODUCER_LINGER_MS: u32 = 5;

/// How much the backlog may grow during a step at `rate` and still be
/// flat: what the producer sends within the latency budget. A path that
/// delivers every message within the budget holds at most that many, so
/// moving up from a slower step grows the backlog by less.
pub fn backlog_slack(rate: u32) -> i64 {
    (f64::from(rate) * P99_BUDGET_MS / 1e3).ceil().max(MIN_BACKLOG_SLACK as f64) as i64
}

/// Whether the backlog stayed flat from `start` to `end` of a step at `rate`.
pub fn backlog_flat(start: i64, end: i64, rate: u32) -> bool {
    end - start <= backlog_slack(rate)
}

/// What one step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    pub rate: u32,
    pub achieved_rate: f64,
    /// Over the delivered messages of the step; `None` when none was.
    pub p99_ms: Option<f64>,
    /// Messages of the step never delivered within the drain.
    pub undelivered: usize,
    pub backlog_start: i64,
    pub backlog_end: i64,
}

/// Why a step failed; empty when it passed.
pub fn failures(step: &StepResult) -> Vec<&'static str> {
    let mut why = Vec::new();
    if step.p99_ms.is_none_or(|p| p > P99_BUDGET_MS) {
        why.push("p99 above the latency budget");
    }
    if !backlog_flat(step.backlog_start, step.backlog_end, step.rate) {
        why.push("backlog grew");
    }
    if step.undelivered > 0 {
        why.push("messages not delivered");
    }
    if step.achieved_rate < f64::from(step.rate) * RATE_REACHED {
        why.push("producer did not reach the rate");
    }
    why
}

/// The highest rate of the steps that passed before the first that failed:
/// a rate above a failed step is not sustained even if its own step
/// happened to pass.
pub fn max_rate(steps: &[StepResult]) -> Option<u32> {
    steps.iter().take_while(|s| failures(s).is_empty()).map(|s| s.rate).max()
}

/// One step's production: which sequence numbers, and the backlog and
/// deliveries around it.
struct Sent {
    rate: u32,
    seqs: std::ops::Range<usize>,
    elapsed: Duration,
    behind_max: Duration,
    backlog_start: i64,
    backlog_end: i64,
    delivered_during: usize,
}

pub async fn run(opts: &Options) -> anyhow::Result<Value> {
    let steps = if opts.steps.is_empty() { DEFAULT_STEPS.to_vec() } else { opts.steps.clone() };
    anyhow::ensure!(steps.iter().all(|r| *r > 0), "--steps must be positive rates");
    let step_seconds = opts.step_seconds.max(1);
    let keys = opts.first_keys(1_000);

    let limits = Limits::measure(SCENARIO, opts).await;
    let Pipeline { broker, mut topic, mut stack, receiver, producer, opts, mut trigger } =
        Pipeline::start(SCENARIO, "sustained", opts, PRODUCER_LINGER_MS).await?;
    let workers = stack.workers;
    let fresh_topics = matches!(broker, Broker::Mock(_));
    // The target's count: every delivery, the warm-ups' included.
    let counter = receiver.counter();
    let warm_ups = std::cell::Cell::new(WARM_UP_MESSAGES);
    let delivered = || (*counter.borrow()).saturating_sub(warm_ups.get());

    let mut sent: Vec<Sent> = Vec::new();
    let mut next = 0usize;
    let mut stopped_after = None;
    let produced = async {
        for (i, &rate) in steps.iter().enumerate() {
            if fresh_topics && i > 0 {
                // The mock broker walks a partition's whole log on every
                // fetch: each step gets a topic (and trigger) of its own, so
                // that cost does not grow from step to step as it would not
                // on a real broker. The previous step is delivered first.
                progress!(SCENARIO, "step {rate}/s: delivering the last step, then a fresh topic and trigger");
                let drain = DRAIN_TIMEOUT.min(opts.timeout);
                receiver.wait_for_deliveries(warm_ups.get() + next, drain).await?;
                stack.delete_trigger(trigger).await?;
                topic = broker.create_topic("sustained", opts.partitions).await?;
                let url = receiver.url();
                (trigger, _) =
                    stack.create_trigger(&format!("bench-sustained-{rate}"), broker.hosts(), &topic, &url).await?;
                warm_up(&producer, &topic, &receiver, warm_ups.get() + next).await?;
                warm_ups.set(warm_ups.get() + WARM_UP_MESSAGES);
            }
            let count = rate as usize * step_seconds as usize;
            let seqs = next..next + count;
            let before = delivered();
            let backlog_start = next as i64 - before as i64;
            progress!(SCENARIO, "step {rate}/s: {count} messages over {keys} keys (backlog {backlog_start})");
            let p = steady_produce(SCENARIO, &producer, &topic, rate, seqs.clone(), keys).await?;
            next += count;
            let after = delivered();
            let backlog_end = next as i64 - after as i64;
            progress!(
                SCENARIO,
                "step {rate}/s: produced at {:.0}/s, delivered {:.0}/s, backlog {backlog_start} -> {backlog_end}",
                per_second(count, p.elapsed),
                per_second(after - before, p.elapsed)
            );
            sent.push(Sent {
                rate,
                seqs,
                elapsed: p.elapsed,
                behind_max: p.behind_max,
                backlog_start,
                backlog_end,
                delivered_during: after - before,
            });
            if !backlog_flat(backlog_start, backlog_end, rate) {
                stopped_after = Some(rate);
                progress!(SCENARIO, "step {rate}/s: the backlog grew; no faster step");
                break;
            }
        }
        anyhow::Ok(())
    }
    .await;
    if produced.is_ok() {
        progress!(SCENARIO, "waiting for the last deliveries");
        let drain = DRAIN_TIMEOUT.min(opts.timeout);
        if let Err(e) = receiver.wait_for_deliveries(warm_ups.get() + next, drain).await {
            progress!(SCENARIO, "not everything arrived: {e:#}");
        }
    }
    let latencies = latencies_by_seq(&receiver);
    stack.stop().await;
    produced?;

    let mut results = Vec::new();
    let mut lines = Vec::new();
    for s in &sent {
        let mut step: Vec<f64> = s.seqs.clone().filter_map(|seq| latencies.get(&(seq as u64)).copied()).collect();
        step.sort_by(f64::total_cmp);
        let result = StepResult {
            rate: s.rate,
            achieved_rate: per_second(s.seqs.len(), s.elapsed),
            p99_ms: (!step.is_empty()).then(|| round(percentile(&step, 99.0), 2)),
            undelivered: s.seqs.len() - step.len(),
            backlog_start: s.backlog_start,
            backlog_end: s.backlog_end,
        };
        let why = failures(&result);
        let at = |p: f64| (!step.is_empty()).then(|| round(percentile(&step, p), 2));
        lines.push(json!({
            "rate": s.rate,
            "messages": s.seqs.len(),
            "seconds": round(s.elapsed.as_secs_f64(), 3),
            "achieved_rate": result.achieved_rate,
            "delivered_per_s": per_second(s.delivered_during, s.elapsed),
            "p50_ms": at(50.0),
            "p99_ms": result.p99_ms,
            "max_ms": step.last().map(|m| round(*m, 2)),
            "undelivered": result.undelivered,
            "backlog_start": s.backlog_start,
            "backlog_end": s.backlog_end,
            "backlog_slack": backlog_slack(s.rate),
            "backlog_flat": backlog_flat(s.backlog_start, s.backlog_end, s.rate),
            "producer_behind_max_ms": round(s.behind_max.as_secs_f64() * 1e3, 2),
            "ok": why.is_empty(),
            "failed_because": why,
        }));
        results.push(result);
    }
    let max = max_rate(&results);
    progress!(SCENARIO, "max sustained rate: {max:?} msg/s");

    let mut o = Map::new();
    o.insert("scenario".into(), SCENARIO.into());
    o.insert("max_rate_msgs_per_s".into(), max.into());
    o.insert("steps".into(), lines.into());
    o.insert("steps_requested".into(), steps.clone().into());
    o.insert("step_seconds".into(), step_seconds.into());
    o.insert("stopped_early".into(), (sent.len() < steps.len()).into());
    o.insert(
        "stop_reason".into(),
        stopped_after.map(|r| format!("the backlog grew at {r}/s; the faster steps were not run")).into(),
    );
    o.insert("keys".into(), keys.into());
    o.insert("p99_budget_ms".into(), P99_BUDGET_MS.into());
    o.insert(
        "backlog".into(),
        "produced minus delivered (first deliveries and repeats alike) before and after each step's production; \
         flat: grew by at most the step's rate times the latency budget (backlog_slack)"
            .into(),
    );
    o.insert(
        "latency_span".into(),
        "hand-over to the producer -> webhook target received the POST, per message of the step".into(),
    );
    limits.report(&mut o, max.map_or(f64::NAN, f64::from));
    o.insert("node_workers".into(), workers.into());
    o.insert("partitions".into(), opts.partitions.into());
    o.insert("broker".into(), broker.describe().into());
    o.insert("producer_linger_ms".into(), PRODUCER_LINGER_MS.into());
    o.insert("topic_per_step".into(), fresh_topics.into());
    Ok(with_memory(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(rate: u32, p99: f64, backlog: (i64, i64)) -> StepResult {
        StepResult {
            rate,
            achieved_rate: f64::from(rate),
            p99_ms: Some(p99),
            undelivered: 0,
            backlog_start: backlog.0,
            backlog_end: backlog.1,
        }
    }

    #[test]
    fn test_backlog_slack_is_the_budget_at_the_rate_with_a_floor() {
        assert_eq!(backlog_slack(8_000), 800);
        assert_eq!(backlog_slack(1_000), 100);
        assert_eq!(backlog_slack(50), MIN_BACKLOG_SLACK);
        assert!(backlog_flat(10, 110, 1_000));
        assert!(!backlog_flat(10, 111, 1_000));
        // A backlog that shrank is flat.
        assert!(backlog_flat(500, 0, 1_000));
    }

    #[test]
    fn test_a_step_fails_for_each_reason() {
        assert!(failures(&step(1_000, 40.0, (5, 60))).is_empty());
        assert_eq!(failures(&step(1_000, 100.5, (5, 60))), ["p99 above the latency budget"]);
        assert_eq!(failures(&step(1_000, 40.0, (5, 5_000))), ["backlog grew"]);
        let mut lost = step(1_000, 40.0, (5, 60));
        lost.undelivered = 3;
        assert_eq!(failures(&lost), ["messages not delivered"]);
        let mut none = step(1_000, 40.0, (5, 60));
        none.p99_ms = None;
        assert_eq!(failures(&none), ["p99 above the latency budget"]);
        let mut slow = step(1_000, 40.0, (5, 60));
        slow.achieved_rate = 900.0;
        assert_eq!(failures(&slow), ["producer did not reach the rate"]);
    }

    #[test]
    fn test_max_rate_stops_at_the_first_failing_step() {
        let steps = [step(500, 20.0, (0, 5)), step(1_000, 30.0, (5, 10)), step(2_000, 300.0, (10, 15))];
        assert_eq!(max_rate(&steps), Some(1_000));
        let recovered = [step(500, 20.0, (0, 5)), step(1_000, 300.0, (5, 10)), step(2_000, 30.0, (10, 15))];
        assert_eq!(max_rate(&recovered), Some(500));
        assert_eq!(max_rate(&[step(500, 300.0, (0, 5))]), None);
        assert_eq!(max_rate(&[]), None);
    }
}
