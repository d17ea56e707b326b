//! Reading `-f FILE` (JSON or YAML, `-` for stdin) into a message of the API,
//! with `--set path=value` edits on top.

use std::io::Read as _;

use serde_json::Value;

use crate::error::{CliError, Result};
use crate::proto_json::{self, Typed};

/// The text of `file`; `-` reads standard input.
pub fn read_source(file: &str) -> Result<String> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| CliError::usage(format!("cannot read stdin: {e}")))?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).map_err(|e| CliError::usage(format!("cannot read {file}: {e}")))
    }
}

/// JSON when it looks like JSON, YAML otherwise.
pub fn parse_document(text: &str, origin: &str) -> Result<Value> {
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(CliError::usage(format!("{origin} is empty")));
    }
    if trimmed.starts_with('{') {
        serde_json::from_str(text).map_err(|e| CliError::usage(format!("{origin} is not valid JSON: {e}")))
    } else {
        serde_yaml::from_str(text).map_err(|e| CliError::usage(format!("{origin} is not valid YAML: {e}")))
    }
}

/// A message `M` from an optional file plus `--set` edits. `wrapper` is the
/// request field that holds it (`trigger` in `{"trigger": {…}}`, grpcurl's
/// request shape), accepted too. Returns the message and the proto paths
/// the edits named.
pub fn message_with_edits<M: Typed>(file: Option<&str>, sets: &[String], wrapper: &str) -> Result<(M, Vec<String>)> {
    let mut value = match file {
        Some(file) => {
            let origin = if file == "-" { "stdin".to_owned() } else { file.to_owned() };
            let mut value = parse_document(&read_source(file)?, &origin)?;
            if let Value::Object(map) = &value {
                if map.len() == 1 && map.contains_key(wrapper) {
                    value = map[wrapper].clone();
                }
            }
            if !value.is_object() {
                return Err(CliError::usage(format!("{origin} must hold one object, a {}", short_name::<M>())));
            }
            proto_json::canonical::<M>(&value)
                .map_err(|e| CliError::usage(format!("{origin} is not a valid {}: {e}", short_name::<M>())))?
        }
        None => Value::Object(Default::default()),
    };
    let mut paths = Vec::new();
    for set in sets {
        let (path, raw) = set
            .split_once('=')
            .ok_or_else(|| CliError::usage(format!("--set `{set}` must be PATH=VALUE, e.g. kafka.topics=a,b")))?;
        let path = proto_json::set_path::<M>(&mut value, path.trim(), raw)
            .map_err(|e| CliError::usage(format!("--set {e}")))?;
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    let message = proto_json::from_json::<M>(&value).map_err(|e| CliError::usage(format!("invalid --set: {e}")))?;
    Ok((message, paths))
}

fn short_name<M: Typed>() -> &'static str {
    M::NAME.rsplit('.').next().unwrap_or(M::NAME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kt_proto::v1::Trigger;

    #[test]
    fn test_yaml_and_json_documents_parse_to_the_same_value() {
        let yaml = "name: orders\nkafka:\n  hosts: [\"localhost:9092\"]\n  topics:\n    - orders\n";
        let json = r#"{"name": "orders", "kafka": {"hosts": ["localhost:9092"], "topics": ["orders"]}}"#;
        assert_eq!(parse_document(yaml, "a").unwrap(), parse_document(json, "b").unwrap());
        let err = parse_document("{\"name\": ", "trigger.json").unwrap_err();
        assert!(err.to_string().contains("trigger.json is not valid JSON"), "{err}");
        assert!(parse_document("  \n", "x").is_err());
    }

    #[test]
    fn test_edits_alone_name_their_mask_paths() {
        let (t, paths) = message_with_edits::<Trigger>(
            None,
            &["kafka.topics=orders,refunds".into(), "kafka.topics=a".into(), "name=n".into()],
            "trigger",
        )
        .unwrap();
        assert_eq!(paths, ["kafka.topics", "name"]);
        assert_eq!(t.kafka.unwrap().topics, ["a"]);
        let (t, paths) =
            message_with_edits::<Trigger>(None, &["webhook.format=cloudevents".into()], "trigger").unwrap();
        assert_eq!(paths, ["webhook.format"]);
        assert_eq!(t.webhook.unwrap().format(), kt_proto::v1::WebhookFormat::Cloudevents);
        assert!(message_with_edits::<Trigger>(None, &["name".into()], "trigger").is_err());
    }
}
