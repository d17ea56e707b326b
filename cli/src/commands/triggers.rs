//! `kt triggers …`: TriggerService.

use kt_proto::v1::{
    CreateTriggerRequest, DeleteTriggerRequest, DisableTriggerRequest, EnableTriggerRequest, GetTriggerRequest,
    GetTriggerStatusRequest, ListTriggersResponse, TestTriggerConnectionRequest, TestTriggerConnectionResponse,
    Trigger, TriggerStatus, UpdateTriggerRequest,
};

use super::{all_triggers, confirm, trigger_id, Ctx};
use crate::args::{Format, TriggersCmd};
use crate::error::{CliError, Result};
use crate::input::message_with_edits;
use crate::output::{self, or_dash, print_message, Table};
use crate::proto_json;

pub async fn run(ctx: &Ctx, cmd: TriggersCmd) -> Result<()> {
    let api = &ctx.api;
    match cmd {
        TriggersCmd::List => {
            let list = ListTriggersResponse { triggers: all_triggers(api).await?, next_page_token: String::new() };
            print_message(ctx.format, &list, |l| list_table(&l.triggers))
        }
        TriggersCmd::Get { trigger } => {
            let id = trigger_id(api, &trigger).await?;
            let t = api.call(api.triggers().get_trigger(GetTriggerRequest { id })).await?;
            print_message(ctx.format, &t, |t| output::describe::<Trigger>(&proto_json::to_json(t), &[]))
        }
        TriggersCmd::Create { file, set } => {
            let (trigger, _) = message_with_edits::<Trigger>(Some(&file), &set, "trigger")?;
            let created =
                api.call(api.triggers().create_trigger(CreateTriggerRequest { trigger: Some(trigger) })).await?;
            print_one(ctx.format, &created)
        }
        TriggersCmd::Update { trigger, file, set } => {
            let id = trigger_id(api, &trigger).await?;
            let (mut patch, paths) = message_with_edits::<Trigger>(file.as_deref(), &set, "trigger")?;
            patch.id = id;
            // A file replaces the whole configuration; edits alone change
            // only the fields they name.
            let update_mask = file.is_none().then_some(prost_types::FieldMask { paths });
            let updated = api
                .call(api.triggers().update_trigger(UpdateTriggerRequest { trigger: Some(patch), update_mask }))
                .await?;
            print_one(ctx.format, &updated)
        }
        TriggersCmd::Enable { trigger } => {
            let id = trigger_id(api, &trigger).await?;
            let t = api.call(api.triggers().enable_trigger(EnableTriggerRequest { id })).await?;
            print_one(ctx.format, &t)
        }
        TriggersCmd::Disable { trigger } => {
            let id = trigger_id(api, &trigger).await?;
            let t = api.call(api.triggers().disable_trigger(DisableTriggerRequest { id })).await?;
            print_one(ctx.format, &t)
        }
        TriggersCmd::Delete { trigger, yes } => {
            let id = trigger_id(api, &trigger).await?;
            let t = api.call(api.triggers().get_trigger(GetTriggerRequest { id: id.clone() })).await?;
            confirm(&format!("Delete trigger `{}` ({id}) and everything stored for it?", t.name), yes)?;
            api.call(api.triggers().delete_trigger(DeleteTriggerRequest { id: id.clone() })).await?;
            match ctx.format {
                Format::Table => output::write_stdout(&format!("deleted trigger {} ({id})\n", t.name)),
                f => output::print_value(f, &serde_json::json!({"id": id, "name": t.name, "deleted": true})),
            }
        }
        TriggersCmd::Status { trigger } => {
            let id = trigger_id(api, &trigger).await?;
            let t = api.call(api.triggers().get_trigger(GetTriggerRequest { id: id.clone() })).await?;
            let status = api.call(api.triggers().get_trigger_status(GetTriggerStatusRequest { id })).await?;
            print_message(ctx.format, &status, |s| status_view(&t, s))
        }
        TriggersCmd::Test { trigger, file } => {
            let request = match (trigger, file) {
                (Some(trigger), None) => {
                    TestTriggerConnectionRequest { id: trigger_id(api, &trigger).await?, trigger: None }
                }
                (None, Some(file)) => {
                    let (trigger, _) = message_with_edits::<Trigger>(Some(&file), &[], "trigger")?;
                    TestTriggerConnectionRequest { id: String::new(), trigger: Some(trigger) }
                }
                _ => return Err(CliError::usage("name a stored trigger, or give one with -f FILE")),
            };
            let answer = api.call(api.triggers().test_trigger_connection(request)).await?;
            print_message(ctx.format, &answer, connection_view)?;
            if answer.ok {
                return Ok(());
            }
            let failure = output::enum_name(answer.failure().as_str_name(), "CONNECTION_FAILURE_");
            Err(CliError::Other(anyhow::anyhow!("connection test failed ({failure}): {}", answer.error)))
        }
    }
}

/// The outcome, the brokers, then one row per partition.
fn connection_view(answer: &TestTriggerConnectionResponse) -> String {
    let mut summary = Table::new(&["", ""]);
    let outcome = if answer.ok {
        "ok".to_owned()
    } else {
        format!("FAILED: {}", output::enum_name(answer.failure().as_str_name(), "CONNECTION_FAILURE_"))
    };
    summary.row(vec!["connection".into(), outcome]);
    if !answer.error.is_empty() {
        summary.row(vec!["error".into(), answer.error.clone()]);
    }
    let brokers: Vec<String> = answer.brokers.iter().map(|b| format!("{}:{} (id {})", b.host, b.port, b.id)).collect();
    summary.row(vec!["brokers".into(), or_dash(&brokers.join(", "))]);
    summary.row(vec!["tested by".into(), format!("{} in {} ms", answer.node_id, answer.elapsed_ms)]);
    let mut partitions = Table::new(&["topic", "partition", "low", "high", "committed"]);
    for topic in &answer.topics {
        for p in &topic.partitions {
            partitions.row(vec![
                topic.name.clone(),
                p.partition.to_string(),
                p.low_watermark.to_string(),
                p.high_watermark.to_string(),
                p.committed_offset.map_or_else(|| "-".to_owned(), |o| o.to_string()),
            ]);
        }
    }
    let mut out = summary.render();
    if !partitions.is_empty() {
        out.push('\n');
        out.push_str(&partitions.render());
    }
    out
}

fn print_one(format: Format, t: &Trigger) -> Result<()> {
    print_message(format, t, |t| list_table(std::slice::from_ref(t)))
}

fn list_table(triggers: &[Trigger]) -> String {
    let mut table = Table::new(&["id", "name", "enabled", "topics", "hosts", "webhook", "generation"]);
    for t in triggers {
        let kafka = t.kafka.clone().unwrap_or_default();
        table.row(vec![
            t.id.clone(),
            t.name.clone(),
            if t.enabled() { "yes" } else { "no" }.into(),
            kafka.topics.join(","),
            kafka.hosts.join(","),
            or_dash(&t.webhook.as_ref().map(|w| w.url.clone()).unwrap_or_default()),
            t.generation.to_string(),
        ]);
    }
    if table.is_empty() {
        return "no triggers\n".into();
    }
    table.render()
}

fn status_view(trigger: &Trigger, s: &TriggerStatus) -> String {
    let mut summary = Table::new(&["", ""]);
    summary.row(vec!["trigger".into(), format!("{} ({})", trigger.name, s.trigger_id)]);
    summary.row(vec!["enabled".into(), if trigger.enabled() { "yes" } else { "no" }.into()]);
    let health = output::enum_name(s.health().as_str_name(), "TRIGGER_HEALTH_");
    summary.row(vec!["health".into(), if s.reason.is_empty() { health } else { format!("{health}: {}", s.reason) }]);
    summary.row(vec!["stored messages".into(), s.stored_messages.to_string()]);
    let blocked = if s.blocked_sets > 0 {
        format!("{} (oldest blocked {} ago)", s.blocked_sets, output::duration(s.oldest_blocked_age_seconds))
    } else {
        "0".into()
    };
    summary.row(vec!["blocked sets".into(), blocked]);
    let mut states: Vec<_> = s.work_orders_by_state.iter().collect();
    states.sort();
    let work_orders = states.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
    summary.row(vec!["work orders".into(), or_dash(&work_orders)]);
    let lag: i64 = s.nodes.iter().flat_map(|n| &n.partitions).map(|p| p.lag.max(0)).sum();
    summary.row(vec!["lag".into(), lag.to_string()]);
    let last_error = if s.last_error.is_empty() {
        "-".into()
    } else {
        format!("{} ({})", s.last_error, output::ago(s.last_error_time.as_ref()))
    };
    summary.row(vec!["last error".into(), last_error]);
    let mut out = summary.render().split_once('\n').map(|(_, r)| r.to_owned()).unwrap_or_default();

    out.push('\n');
    if s.nodes.is_empty() {
        out.push_str("no node runs this trigger\n");
        return out;
    }
    let mut nodes = Table::new(&["node", "state", "topic", "partition", "committed", "high watermark", "lag"]);
    for n in &s.nodes {
        let state = output::enum_name(&n.state, "PIPELINE_STATE_");
        if n.partitions.is_empty() {
            nodes.row(vec![
                n.node_id.clone(),
                state.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for p in &n.partitions {
            nodes.row(vec![
                n.node_id.clone(),
                state.clone(),
                p.topic.clone(),
                p.partition.to_string(),
                offset(p.committed_offset),
                offset(p.high_watermark),
                offset(p.lag),
            ]);
        }
    }
    out.push_str(&nodes.render());
    for n in s.nodes.iter().filter(|n| !n.last_error.is_empty()) {
        out.push_str(&format!("{}: {}\n", n.node_id, n.last_error));
    }
    out
}

/// Negative offsets mean "not known yet".
fn offset(v: i64) -> String {
    if v < 0 {
        "-".into()
    } else {
        v.to_string()
    }
}
