//! `kt top`: a live view of every trigger, refreshed in place with plain
//! ANSI (crossterm). Numbers come from `GetTriggerStatus` (lag, stored
//! messages, work orders by state, blocked sets) and the event stream
//! (work orders succeeded and failed per second).

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossterm::event::{Event as TermEvent, EventStream, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, queue, style, terminal};
use futures::StreamExt as _;
use kt_proto::v1::{EventKind, GetTriggerStatusRequest, StreamEventsRequest, Trigger, TriggerStatus};

use super::{all_triggers, trigger_id, Ctx};
use crate::args::TopArgs;
use crate::client::Api;
use crate::error::{CliError, Result};
use crate::output::{self, Table};

pub async fn run(ctx: &Ctx, args: TopArgs) -> Result<()> {
    if !std::io::stdout().is_terminal() {
        return Err(CliError::usage("kt top needs a terminal; for one trigger's numbers use `kt triggers status`"));
    }
    let api = &ctx.api;
    let mut only = HashSet::new();
    for t in &args.trigger {
        only.insert(trigger_id(api, t).await?);
    }
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 3600.0));
    let counts = Arc::new(EventCounts::default());
    let counter = tokio::spawn(count_events(api.clone(), only.iter().cloned().collect(), counts.clone()));

    let _screen = Screen::enter()?;
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous: HashMap<String, Sample> = HashMap::new();
    let result = loop {
        tokio::select! {
            key = keys.next() => match key {
                Some(Ok(TermEvent::Key(k))) if k.kind != KeyEventKind::Release => {
                    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        break Ok(());
                    }
                    if k.code == KeyCode::Char('r') {
                        tick.reset_immediately();
                    }
                }
                Some(Ok(TermEvent::Resize(..))) => tick.reset_immediately(),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(CliError::Other(anyhow::Error::from(e).context("cannot read the terminal"))),
                None => break Ok(()),
            },
            _ = tick.tick() => {
                let frame = sample(api, &only, &counts, &mut previous).await;
                let (width, height) = terminal::size().unwrap_or((120, 40));
                let lines = render(&frame, api.server(), interval, &counts.state());
                draw(&lines, width as usize, height as usize)?;
            }
        }
    };
    counter.abort();
    result
}

/// Restores the terminal when dropped, also on errors.
struct Screen;

impl Screen {
    fn enter() -> Result<Self> {
        terminal::enable_raw_mode().map_err(anyhow::Error::from)?;
        execute!(std::io::stdout(), terminal::EnterAlternateScreen, cursor::Hide).map_err(anyhow::Error::from)?;
        Ok(Screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(std::io::stdout(), cursor::Show, terminal::LeaveAlternateScreen);
        let _ = terminal::disable_raw_mode();
    }
}

/// What one refresh saw of one trigger.
#[derive(Clone)]
struct Sample {
    at: Instant,
    /// Sum of committed offsets over the trigger's partitions.
    consumed: Option<i64>,
    succeeded: u64,
}

struct Row {
    trigger: Trigger,
    status: std::result::Result<TriggerStatus, String>,
    in_rate: Option<f64>,
    out_rate: Option<f64>,
}

struct Frame {
    rows: Vec<Row>,
    error: Option<String>,
}

async fn sample(
    api: &Api,
    only: &HashSet<String>,
    counts: &EventCounts,
    previous: &mut HashMap<String, Sample>,
) -> Frame {
    let triggers = match all_triggers(api).await {
        Ok(t) => t,
        Err(e) => return Frame { rows: Vec::new(), error: Some(e.render()) },
    };
    let mut rows = Vec::new();
    for trigger in triggers.into_iter().filter(|t| only.is_empty() || only.contains(&t.id)) {
        let status = api
            .call(api.triggers().get_trigger_status(GetTriggerStatusRequest { id: trigger.id.clone() }))
            .await
            .map_err(|e| e.render());
        let now = Sample {
            at: Instant::now(),
            consumed: status.as_ref().ok().and_then(consumed),
            succeeded: counts.succeeded(&trigger.id),
        };
        let (in_rate, out_rate) = match previous.get(&trigger.id) {
            Some(before) => {
                let secs = now.at.duration_since(before.at).as_secs_f64().max(0.001);
                let in_rate = match (before.consumed, now.consumed) {
                    (Some(a), Some(b)) if b >= a => Some((b - a) as f64 / secs),
                    _ => None,
                };
                (in_rate, Some(now.succeeded.saturating_sub(before.succeeded) as f64 / secs))
            }
            None => (None, None),
        };
        previous.insert(trigger.id.clone(), now);
        rows.push(Row { trigger, status, in_rate, out_rate });
    }
    Frame { rows, error: None }
}

/// Committed offsets summed over distinct partitions (two nodes may both
/// report one during a hand-over: the higher counts).
fn consumed(status: &TriggerStatus) -> Option<i64> {
    let mut by_partition: HashMap<(&str, i32), i64> = HashMap::new();
    for p in status.nodes.iter().flat_map(|n| &n.partitions) {
        if p.committed_offset >= 0 {
            let e = by_partition.entry((p.topic.as_str(), p.partition)).or_insert(p.committed_offset);
            *e = (*e).max(p.committed_offset);
        }
    }
    (!by_partition.is_empty()).then(|| by_partition.values().sum())
}

fn render(frame: &Frame, server: &str, interval: Duration, events: &str) -> Vec<String> {
    let mut lines = vec![format!(
        "kt top  {server}  every {:.1}s  events: {events}  (q quits, r refreshes)",
        interval.as_secs_f64()
    )];
    lines.push(String::new());
    if let Some(e) = &frame.error {
        lines.push(e.clone());
        return lines;
    }
    let mut table =
        Table::new(&["trigger", "state", "in/s", "out/s", "lag", "in-flight", "waiting", "blocked", "oldest", "error"]);
    for row in &frame.rows {
        let t = &row.trigger;
        match &row.status {
            Err(e) => table.row(vec![
                t.name.clone(),
                "?".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                e.clone(),
            ]),
            Ok(s) => {
                let by_state = |k: &str| s.work_orders_by_state.get(k).copied().unwrap_or(0);
                let in_flight = by_state("pending") + by_state("running");
                let waiting = (s.stored_messages - in_flight - by_state("failed")).max(0);
                let lag: i64 = s.nodes.iter().flat_map(|n| &n.partitions).map(|p| p.lag.max(0)).sum();
                table.row(vec![
                    t.name.clone(),
                    pipeline_state(t, s),
                    rate(row.in_rate),
                    rate(row.out_rate),
                    lag.to_string(),
                    in_flight.to_string(),
                    waiting.to_string(),
                    s.blocked_sets.to_string(),
                    if s.blocked_sets > 0 { output::duration(s.oldest_blocked_age_seconds) } else { "-".into() },
                    if s.last_error.is_empty() { "-".into() } else { output::truncate(&s.last_error, 80) },
                ]);
            }
        }
    }
    if frame.rows.is_empty() {
        lines.push("no triggers".into());
    } else {
        lines.extend(table.render().lines().map(str::to_owned));
    }
    lines.push(String::new());
    lines.push(
        "in/s: messages consumed  out/s: work orders succeeded  in-flight: work orders pending or running  \
         waiting: stored messages without one  oldest: oldest blocked set's age"
            .into(),
    );
    lines
}

/// `disabled`, `no node`, or the pipelines' states (`running`, `running x2`).
fn pipeline_state(t: &Trigger, s: &TriggerStatus) -> String {
    if !t.enabled() {
        return "disabled".into();
    }
    if s.nodes.is_empty() {
        return "no-node".into();
    }
    let mut states: Vec<String> = s.nodes.iter().map(|n| output::enum_name(&n.state, "PIPELINE_STATE_")).collect();
    states.sort();
    states.dedup();
    if s.nodes.len() > 1 && states.len() == 1 {
        format!("{}x{}", states[0], s.nodes.len())
    } else {
        states.join(",")
    }
}

fn rate(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r >= 100.0 => format!("{r:.0}"),
        Some(r) => format!("{r:.1}"),
    }
}

fn draw(lines: &[String], width: usize, height: usize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| CliError::Other(e.into());
    for (i, line) in lines.iter().take(height).enumerate() {
        let line: String = line.chars().take(width).collect();
        queue!(
            out,
            cursor::MoveTo(0, i as u16),
            style::Print(line),
            terminal::Clear(terminal::ClearType::UntilNewLine)
        )
        .map_err(io)?;
    }
    queue!(out, terminal::Clear(terminal::ClearType::FromCursorDown)).map_err(io)?;
    out.flush().map_err(io)
}

/// Work orders succeeded and failed per trigger since `kt top` started,
/// counted from the live event stream.
#[derive(Default)]
struct EventCounts {
    succeeded: Mutex<HashMap<String, u64>>,
    state: Mutex<String>,
}

impl EventCounts {
    fn succeeded(&self, trigger: &str) -> u64 {
        self.succeeded.lock().expect("not poisoned").get(trigger).copied().unwrap_or(0)
    }

    fn state(&self) -> String {
        let s = self.state.lock().expect("not poisoned").clone();
        if s.is_empty() {
            "connecting".into()
        } else {
            s
        }
    }

    fn set_state(&self, s: impl Into<String>) {
        *self.state.lock().expect("not poisoned") = s.into();
    }
}

/// Follows the stream, reconnecting from the last cursor so nothing is
/// counted twice or missed.
async fn count_events(client: Api, triggers: Vec<String>, counts: Arc<EventCounts>) {
    let mut after = String::new();
    loop {
        let request = StreamEventsRequest {
            trigger_ids: triggers.clone(),
            kinds: vec![EventKind::WorkOrderSucceeded.into()],
            after_cursor: after.clone(),
        };
        match client.events().stream_events(request).await {
            Ok(response) => {
                counts.set_state("live");
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            after = event.cursor.clone();
                            *counts.succeeded.lock().expect("not poisoned").entry(event.trigger_id).or_default() += 1;
                        }
                        Ok(None) => {
                            counts.set_state("stream ended; reconnecting");
                            break;
                        }
                        Err(status) => {
                            counts.set_state(format!("{}; reconnecting", output::truncate(status.message(), 60)));
                            break;
                        }
                    }
                }
            }
            Err(status) => counts.set_state(format!("{}; retrying", output::truncate(status.message(), 60))),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
