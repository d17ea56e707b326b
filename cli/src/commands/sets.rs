//! `kt sets …`: MessageSetService, and retrying every blocked set of a
//! trigger with a progress bar.

use std::collections::HashMap;

use futures::StreamExt as _;
use kt_proto::v1::{
    DiscardMessageSetRequest, GetMessageSetRequest, ListMessageSetsRequest, ListMessageSetsResponse, MessageSet,
    MessageSetState, RetryMessageSetRequest, SkipMessageRequest,
};

use super::{all_triggers, confirm, trigger_id, Ctx, PAGE_SIZE};
use crate::args::{Format, SetState, SetsCmd};
use crate::client::Api;
use crate::error::{CliError, Result};
use crate::output::{self, or_dash, print_message, Table};
use crate::proto_json;

/// Retries in flight at once with `--all-blocked`.
const RETRY_CONCURRENCY: usize = 8;

pub async fn run(ctx: &Ctx, cmd: SetsCmd) -> Result<()> {
    let api = &ctx.api;
    match cmd {
        SetsCmd::List { trigger, state, key, limit } => {
            let trigger_id = match trigger {
                Some(t) => Some(trigger_id(api, &t).await?),
                None => None,
            };
            // A key is looked up by the server (an index); `-`, the KEY
            // column's form of "no key", selects the unkeyed sets here.
            let (server_key, unkeyed_only) = match key.as_deref() {
                None => (None, false),
                Some("-") => (None, true),
                Some(k) => (Some(output::parse_key(k)?), false),
            };
            let filters = Filters { trigger_id: trigger_id.as_deref(), state: state.map(proto_state), key: server_key };
            let mut sets = list(api, filters, limit, |s| !unkeyed_only || s.key.is_none()).await?;
            sets.truncate(if limit == 0 { usize::MAX } else { limit });
            let names = trigger_names(api, ctx.format).await?;
            let response = ListMessageSetsResponse { message_sets: sets, next_page_token: String::new() };
            print_message(ctx.format, &response, |r| table(&r.message_sets, &names))
        }
        SetsCmd::Get { id } => {
            let set = api.call(api.sets().get_message_set(GetMessageSetRequest { id })).await?;
            print_message(ctx.format, &set, describe)
        }
        SetsCmd::Retry { id: Some(id), .. } => {
            let set = api.call(api.sets().retry_message_set(RetryMessageSetRequest { id })).await?;
            print_one(ctx.format, &set)
        }
        SetsCmd::Retry { id: None, trigger, .. } => {
            let trigger = trigger.ok_or_else(|| CliError::usage("--all-blocked needs --trigger"))?;
            let trigger = trigger_id(api, &trigger).await?;
            retry_all_blocked(ctx, &trigger).await
        }
        SetsCmd::Skip { id } => {
            let set = api.call(api.sets().skip_message(SkipMessageRequest { id })).await?;
            print_one(ctx.format, &set)
        }
        SetsCmd::Discard { id, yes } => {
            let set = api.call(api.sets().get_message_set(GetMessageSetRequest { id: id.clone() })).await?;
            confirm(
                &format!(
                    "Discard set {id} (key {}, {} stored message(s))?",
                    output::key(set.key.as_deref()),
                    set.stored_messages
                ),
                yes,
            )?;
            let done = api.call(api.sets().discard_message_set(DiscardMessageSetRequest { id: id.clone() })).await?;
            print_message(ctx.format, &done, |d| {
                format!(
                    "discarded set {id}: {} message(s) dropped, {} work order(s) skipped\n",
                    d.discarded_messages, d.skipped_work_orders
                )
            })
        }
    }
}

/// What the server filters sets by.
#[derive(Default)]
struct Filters<'a> {
    trigger_id: Option<&'a str>,
    state: Option<MessageSetState>,
    key: Option<Vec<u8>>,
}

/// Sets matching the server-side filters and `keep`, at most `limit` (0: all).
async fn list(
    api: &Api,
    filters: Filters<'_>,
    limit: usize,
    keep: impl Fn(&MessageSet) -> bool,
) -> Result<Vec<MessageSet>> {
    let mut sets = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = ListMessageSetsRequest {
            trigger_id: filters.trigger_id.unwrap_or_default().to_owned(),
            state: filters.state.unwrap_or(MessageSetState::Unspecified).into(),
            key: filters.key.clone(),
            page_size: PAGE_SIZE,
            page_token,
            ..Default::default()
        };
        let page = api.call(api.sets().list_message_sets(req)).await?;
        sets.extend(page.message_sets.into_iter().filter(|s| keep(s)));
        if page.next_page_token.is_empty() || (limit > 0 && sets.len() >= limit) {
            return Ok(sets);
        }
        page_token = page.next_page_token;
    }
}

async fn retry_all_blocked(ctx: &Ctx, trigger: &str) -> Result<()> {
    let api = &ctx.api;
    let filters = Filters { trigger_id: Some(trigger), state: Some(MessageSetState::Blocked), ..Default::default() };
    let blocked = list(api, filters, 0, |_| true).await?;
    // Drawn on stderr, and only when it is a terminal.
    let bar = indicatif::ProgressBar::new(blocked.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{spinner} retrying blocked sets [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let results: Vec<(String, Result<MessageSet>)> = futures::stream::iter(blocked.iter().map(|s| {
        let id = s.id.clone();
        async move {
            let r = api.call(api.sets().retry_message_set(RetryMessageSetRequest { id: id.clone() })).await;
            (id, r)
        }
    }))
    .buffer_unordered(RETRY_CONCURRENCY)
    .inspect(|(_, r)| {
        if r.is_err() {
            bar.set_message("(some failed)");
        }
        bar.inc(1);
    })
    .collect()
    .await;
    bar.finish_and_clear();

    let retried = results.iter().filter(|(_, r)| r.is_ok()).count();
    let failures: Vec<(&String, String)> = results
        .iter()
        .filter_map(|(id, r)| r.as_ref().err().map(|e| (id, e.render().trim_start_matches("error: ").to_owned())))
        .collect();
    match ctx.format {
        Format::Table => {
            let mut text = format!("retried {retried} of {} blocked set(s)", blocked.len());
            if !failures.is_empty() {
                text.push_str(&format!("; {} failed:", failures.len()));
                for (id, e) in &failures {
                    text.push_str(&format!("\n  set {id}: {e}"));
                }
            }
            output::write_stdout(&(text + "\n"))?;
        }
        f => output::print_value(
            f,
            &serde_json::json!({
                "triggerId": trigger,
                "blocked": blocked.len(),
                "retried": retried,
                "failed": failures.iter().map(|(id, e)| serde_json::json!({"id": id, "error": e})).collect::<Vec<_>>(),
            }),
        )?,
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CliError::Other(anyhow::anyhow!("{} of {} retries failed", failures.len(), blocked.len())))
    }
}

fn proto_state(state: SetState) -> MessageSetState {
    match state {
        SetState::Ready => MessageSetState::Ready,
        SetState::InFlight => MessageSetState::InFlight,
        SetState::Blocked => MessageSetState::Blocked,
        SetState::Waiting => MessageSetState::Waiting,
        SetState::Idle => MessageSetState::Idle,
    }
}

/// Trigger names by id, for tables (none needed for JSON/YAML).
pub async fn trigger_names(api: &Api, format: Format) -> Result<HashMap<String, String>> {
    if format != Format::Table {
        return Ok(HashMap::new());
    }
    Ok(all_triggers(api).await?.into_iter().map(|t| (t.id, t.name)).collect())
}

fn print_one(format: Format, set: &MessageSet) -> Result<()> {
    print_message(format, set, |s| table(std::slice::from_ref(s), &HashMap::new()))
}

fn table(sets: &[MessageSet], names: &HashMap<String, String>) -> String {
    if sets.is_empty() {
        return "no message sets\n".into();
    }
    let mut table =
        Table::new(&["id", "trigger", "topic", "key", "state", "stored", "head", "attempts", "blocked", "last error"]);
    for s in sets {
        table.row(vec![
            s.id.clone(),
            names.get(&s.trigger_id).cloned().unwrap_or_else(|| s.trigger_id.clone()),
            s.topic.clone(),
            output::key(s.key.as_deref()),
            output::enum_name(s.state().as_str_name(), "MESSAGE_SET_STATE_"),
            s.stored_messages.to_string(),
            if s.stored_messages > 0 { format!("{}:{}", s.head_partition, s.head_offset) } else { "-".into() },
            s.attempts.to_string(),
            if s.blocked_since.is_some() { output::ago(s.blocked_since.as_ref()) } else { "-".into() },
            or_dash(&output::truncate(&s.last_error, 60)),
        ]);
    }
    table.render()
}

fn describe(set: &MessageSet) -> String {
    let mut value = proto_json::to_json(set);
    // The key as people read it; JSON output keeps base64.
    value["key"] = output::key(set.key.as_deref()).into();
    output::describe::<MessageSet>(&value, &[])
}
