//! `kt work-orders …`: WorkOrderService.

use std::collections::HashMap;

use kt_proto::v1::{
    CompleteWorkOrderRequest, GetWorkOrderRequest, ListWorkOrdersRequest, ListWorkOrdersResponse, WorkOrder,
    WorkOrderState,
};

use super::sets::trigger_names;
use super::{trigger_id, Ctx, PAGE_SIZE};
use crate::args::{self, Format, WorkOrdersCmd};
use crate::error::Result;
use crate::output::{self, or_dash, print_message, Table};
use crate::proto_json;

pub async fn run(ctx: &Ctx, cmd: WorkOrdersCmd) -> Result<()> {
    let api = &ctx.api;
    match cmd {
        WorkOrdersCmd::List { trigger, state, key, topic, partition, offset_from, offset_to, limit } => {
            let trigger_id = match trigger {
                Some(t) => trigger_id(api, &t).await?,
                None => String::new(),
            };
            let state = state.map(proto_state).unwrap_or(WorkOrderState::Unspecified);
            let key = key.as_deref().map(output::parse_key).transpose()?;
            let mut work_orders = Vec::new();
            let mut page_token = String::new();
            let mut more = false;
            loop {
                let page_size =
                    if limit == 0 { PAGE_SIZE } else { (limit - work_orders.len()).min(PAGE_SIZE as usize) as i32 };
                let req = ListWorkOrdersRequest {
                    trigger_id: trigger_id.clone(),
                    state: state.into(),
                    key: key.clone(),
                    topic: topic.clone().unwrap_or_default(),
                    partition,
                    offset_from,
                    offset_to,
                    page_size,
                    page_token,
                    ..Default::default()
                };
                let page = api.call(api.work_orders().list_work_orders(req)).await?;
                work_orders.extend(page.work_orders);
                if page.next_page_token.is_empty() {
                    break;
                }
                if limit > 0 && work_orders.len() >= limit {
                    more = true;
                    break;
                }
                page_token = page.next_page_token;
            }
            if more && ctx.format == Format::Table {
                eprintln!("(the first {limit} work orders; --limit 0 lists all)");
            }
            let names = trigger_names(api, ctx.format).await?;
            let response = ListWorkOrdersResponse { work_orders, next_page_token: String::new() };
            print_message(ctx.format, &response, |r| table(&r.work_orders, &names))
        }
        WorkOrdersCmd::Get { id, body } => {
            let wo = api.call(api.work_orders().get_work_order(GetWorkOrderRequest { id })).await?;
            if body {
                return output::write_stdout(&(body_text(&wo.body, ctx.format == Format::Table) + "\n"));
            }
            print_message(ctx.format, &wo, describe)
        }
        WorkOrdersCmd::Complete { id, success, failure } => {
            let req = CompleteWorkOrderRequest {
                id,
                success: success && failure.is_none(),
                error: failure.unwrap_or_default(),
            };
            let wo = api.call(api.work_orders().complete_work_order(req)).await?;
            print_message(ctx.format, &wo, |w| table(std::slice::from_ref(w), &HashMap::new()))
        }
    }
}

/// The body as POSTed; on a terminal pretty-printed, keys in their order.
fn body_text(body: &str, pretty: bool) -> String {
    if !pretty {
        return body.to_owned();
    }
    let mut out = Vec::new();
    let mut from = serde_json::Deserializer::from_str(body);
    match serde_transcode::transcode(&mut from, &mut serde_json::Serializer::pretty(&mut out)) {
        Ok(()) => String::from_utf8(out).unwrap_or_else(|_| body.to_owned()),
        Err(_) => body.to_owned(),
    }
}

fn proto_state(state: args::WorkOrderState) -> WorkOrderState {
    match state {
        args::WorkOrderState::Pending => WorkOrderState::Pending,
        args::WorkOrderState::Running => WorkOrderState::Running,
        args::WorkOrderState::Success => WorkOrderState::Success,
        args::WorkOrderState::Failed => WorkOrderState::Failed,
        args::WorkOrderState::Skipped => WorkOrderState::Skipped,
    }
}

fn table(work_orders: &[WorkOrder], names: &HashMap<String, String>) -> String {
    if work_orders.is_empty() {
        return "no work orders\n".into();
    }
    let mut table = Table::new(&[
        "id",
        "trigger",
        "topic",
        "partition",
        "offset",
        "key",
        "state",
        "attempts",
        "updated",
        "last error",
    ]);
    for w in work_orders {
        table.row(vec![
            w.id.clone(),
            names.get(&w.trigger_id).cloned().unwrap_or_else(|| w.trigger_id.clone()),
            w.topic.clone(),
            w.partition.to_string(),
            w.offset.to_string(),
            output::key(w.key.as_deref()),
            output::enum_name(w.state().as_str_name(), "WORK_ORDER_STATE_"),
            w.attempts.to_string(),
            output::ago(w.update_time.as_ref()),
            or_dash(&output::truncate(&w.last_error, 60)),
        ]);
    }
    table.render()
}

/// The work order's fields, then one line per attempt; the body only with
/// `--body` (it can be large).
fn describe(w: &WorkOrder) -> String {
    let mut value = proto_json::to_json(w);
    value["key"] = output::key(w.key.as_deref()).into();
    let mut out = output::describe::<WorkOrder>(&value, &["body", "attemptLog"]);
    if let Ok(serde_json::Value::Array(attempts)) = serde_json::from_str::<serde_json::Value>(&w.attempt_log) {
        if !attempts.is_empty() {
            out.push_str("\nattempts:\n");
            for (i, a) in attempts.iter().enumerate() {
                let fields = a
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter(|(_, v)| !v.is_null())
                            .map(|(k, v)| {
                                format!("{k}={}", v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_else(|| a.to_string());
                out.push_str(&format!("  {}. {}\n", i + 1, output::truncate(&fields, 200)));
            }
        }
    }
    out.push_str(&format!("body: {} bytes (kt work-orders get {} --body)\n", w.body.len(), w.id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_body_keeps_its_key_order_when_pretty() {
        let body = r#"{"data":{"z":1,"a":2},"request":{"topic":"t"}}"#;
        assert_eq!(body_text(body, false), body);
        assert_eq!(
            body_text(body, true),
            "{\n  \"data\": {\n    \"z\": 1,\n    \"a\": 2\n  },\n  \"request\": {\n    \"topic\": \"t\"\n  }\n}"
        );
        assert_eq!(body_text("not json", true), "not json");
    }
}
