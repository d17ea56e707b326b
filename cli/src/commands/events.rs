//! `kt events`: StreamEvents, one line per event. Interrupted (Ctrl-C,
//! SIGTERM) or cut off, it prints the cursor to resume from.

use std::collections::HashMap;
use std::time::Duration;

use kt_proto::v1::{Event, EventKind, StreamEventsRequest};
use tokio::signal::unix::{signal, SignalKind};

use super::{all_triggers, trigger_id, Ctx};
use crate::args::{EventsArgs, Format};
use crate::error::{CliError, Result};
use crate::output;
use crate::proto_json;

pub async fn run(ctx: &Ctx, args: EventsArgs) -> Result<()> {
    // Installed first, so an interrupt at any point below is ours to handle.
    let mut interrupt = signal(SignalKind::interrupt()).map_err(anyhow::Error::from)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(anyhow::Error::from)?;
    let api = &ctx.api;
    let mut trigger_ids = Vec::new();
    for t in &args.trigger {
        trigger_ids.push(trigger_id(api, t).await?);
    }
    let kinds = args.kind.iter().map(|k| parse_kind(k).map(i32::from)).collect::<Result<Vec<_>>>()?;
    // Without --follow the point is the stored history: from the start
    // unless told otherwise. With it, no --after means "from now on".
    let after = match (&args.after, args.follow) {
        (Some(c), _) => c.trim().to_owned(),
        (None, false) => "0-0".to_owned(),
        (None, true) => String::new(),
    };
    let names: HashMap<String, String> = if ctx.format == Format::Table {
        all_triggers(api).await?.into_iter().map(|t| (t.id, t.name)).collect()
    } else {
        HashMap::new()
    };
    let request = StreamEventsRequest { trigger_ids, kinds, after_cursor: after.clone() };
    let mut stream = api.call(api.events().stream_events(request)).await?;

    let mut cursor = (!after.is_empty()).then_some(after);
    let idle = Duration::from_millis(args.idle_ms.max(1));
    loop {
        let next = tokio::select! {
            _ = interrupt.recv() => {
                eprintln!("interrupted; {}", resume_hint(cursor.as_deref(), &args));
                return Ok(());
            }
            _ = terminate.recv() => {
                eprintln!("terminated; {}", resume_hint(cursor.as_deref(), &args));
                return Ok(());
            }
            next = stream.message() => next,
            _ = tokio::time::sleep(idle), if !args.follow => return Ok(()),
        };
        match next {
            Ok(Some(event)) => {
                print_event(ctx.format, &event, &names)?;
                cursor = Some(event.cursor.clone());
            }
            Ok(None) => {
                eprintln!("the control plane closed the stream; {}", resume_hint(cursor.as_deref(), &args));
                return Err(api.error(tonic::Status::unavailable("the event stream ended")));
            }
            Err(status) => {
                eprintln!("{}", resume_hint(cursor.as_deref(), &args));
                return Err(api.error(status));
            }
        }
    }
}

/// `set_blocked`, `SET_BLOCKED`, `set-blocked` or `EVENT_KIND_SET_BLOCKED`.
fn parse_kind(text: &str) -> Result<EventKind> {
    let upper = text.trim().to_ascii_uppercase().replace('-', "_");
    let name = if upper.starts_with("EVENT_KIND_") { upper } else { format!("EVENT_KIND_{upper}") };
    match EventKind::from_str_name(&name) {
        Some(kind) if kind != EventKind::Unspecified => Ok(kind),
        _ => {
            let known = (1..)
                .map_while(|i| EventKind::try_from(i).ok())
                .map(|k| output::enum_name(k.as_str_name(), "EVENT_KIND_"))
                .collect::<Vec<_>>()
                .join(", ");
            Err(CliError::usage(format!("unknown event kind `{text}`; one of: {known}")))
        }
    }
}

fn resume_hint(cursor: Option<&str>, args: &EventsArgs) -> String {
    match cursor {
        Some(c) => format!("resume with: kt events --after {c}{}", if args.follow { " --follow" } else { "" }),
        None => "no event received; nothing to resume from".into(),
    }
}

fn print_event(format: Format, event: &Event, names: &HashMap<String, String>) -> Result<()> {
    let text = match format {
        Format::Table => event_line(event, names) + "\n",
        Format::Json => proto_json::json_text(event, false) + "\n",
        Format::Yaml => format!("---\n{}", proto_json::yaml_text(event)),
    };
    output::write_stdout(&text)
}

/// `TIME CURSOR KIND trigger=… node=… DETAILS`, the empty parts left out.
fn event_line(event: &Event, names: &HashMap<String, String>) -> String {
    let mut parts = vec![
        output::timestamp(event.time.as_ref()),
        event.cursor.clone(),
        output::enum_name(event.kind().as_str_name(), "EVENT_KIND_"),
    ];
    if !event.trigger_id.is_empty() {
        parts.push(format!("trigger={}", names.get(&event.trigger_id).unwrap_or(&event.trigger_id)));
    }
    if !event.node_id.is_empty() {
        parts.push(format!("node={}", event.node_id));
    }
    if !event.details.is_empty() && event.details != "{}" {
        parts.push(event.details.replace('\n', " "));
    }
    parts.join("  ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_kinds_parse_in_every_spelling() {
        for text in ["set_blocked", "SET_BLOCKED", "set-blocked", "EVENT_KIND_SET_BLOCKED"] {
            assert_eq!(parse_kind(text).unwrap(), EventKind::SetBlocked, "{text}");
        }
        let err = parse_kind("nope").unwrap_err().to_string();
        assert!(err.contains("work_order_succeeded"), "{err}");
        assert!(parse_kind("unspecified").is_err());
    }
}
