//! The proto3 JSON mapping of the API's messages (what grpcurl prints and
//! reads), through the descriptor set the proto crate embeds: generated
//! message → bytes → dynamic message → JSON, and back. The generated types
//! have no serde derive; this keeps them untouched.

use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::Value;

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(kt_proto::FILE_DESCRIPTOR_SET).expect("the proto crate embeds a valid descriptor set")
});

/// A generated message and its full protobuf name.
pub trait Typed: Message + Default {
    const NAME: &'static str;

    fn descriptor() -> MessageDescriptor {
        POOL.get_message_by_name(Self::NAME).unwrap_or_else(|| panic!("{} is in the descriptor set", Self::NAME))
    }
}

macro_rules! typed {
    ($($ty:ident),* $(,)?) => {
        $(impl Typed for kt_proto::v1::$ty {
            const NAME: &'static str = concat!("kafka_triggers.v1.", stringify!($ty));
        })*
    };
}

typed!(
    Trigger,
    ListTriggersResponse,
    TriggerStatus,
    MessageSet,
    ListMessageSetsResponse,
    DiscardMessageSetResponse,
    WorkOrder,
    ListWorkOrdersResponse,
    Event,
    TestTriggerConnectionResponse,
);

fn dynamic<M: Typed>(msg: &M) -> DynamicMessage {
    DynamicMessage::decode(M::descriptor(), msg.encode_to_vec().as_slice()).expect("a message decodes as itself")
}

/// Every field, defaults too, so scripts find `"enabled": false` instead of
/// nothing.
fn output_options() -> SerializeOptions {
    SerializeOptions::new().skip_default_fields(false)
}

/// The message as proto3 JSON (for reading fields; its keys are sorted).
pub fn to_json<M: Typed>(msg: &M) -> Value {
    dynamic(msg).serialize_with_options(serde_json::value::Serializer, &output_options()).expect("a message serializes")
}

/// The message as proto3 JSON text, fields in declaration order; `pretty`
/// over several lines, else on one.
pub fn json_text<M: Typed>(msg: &M, pretty: bool) -> String {
    let mut buf = Vec::new();
    let result = if pretty {
        dynamic(msg).serialize_with_options(&mut serde_json::Serializer::pretty(&mut buf), &output_options())
    } else {
        dynamic(msg).serialize_with_options(&mut serde_json::Serializer::new(&mut buf), &output_options())
    };
    result.expect("a message serializes as JSON");
    String::from_utf8(buf).expect("JSON is UTF-8")
}

/// The message as YAML, in the proto3 JSON shape, fields in declaration order.
pub fn yaml_text<M: Typed>(msg: &M) -> String {
    let mut buf = Vec::new();
    let mut serializer = serde_yaml::Serializer::new(&mut buf);
    dynamic(msg).serialize_with_options(&mut serializer, &output_options()).expect("a message serializes as YAML");
    // The document's last line break is written when the serializer ends.
    drop(serializer);
    let mut text = String::from_utf8(buf).expect("YAML is UTF-8");
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// A message from proto3 JSON (lowerCamelCase or proto field names).
pub fn from_json<M: Typed>(value: &Value) -> Result<M, String> {
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let dynamic =
        DynamicMessage::deserialize_with_options(M::descriptor(), value, &options).map_err(|e| e.to_string())?;
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| e.to_string())
}

/// Rewrites `value` in the canonical shape (lowerCamelCase names, enum
/// names), so that later edits find one spelling of each field.
pub fn canonical<M: Typed>(value: &Value) -> Result<Value, String> {
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let dynamic =
        DynamicMessage::deserialize_with_options(M::descriptor(), value, &options).map_err(|e| e.to_string())?;
    Ok(dynamic
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .expect("a message serializes as JSON"))
}

/// Sets `path` (dotted, proto or JSON field names) to `raw` in the canonical
/// JSON `value` of an `M`. Returns the path in proto field names, as an
/// update mask names it.
pub fn set_path<M: Typed>(value: &mut Value, path: &str, raw: &str) -> Result<String, String> {
    let segments: Vec<&str> = path.split('.').collect();
    let mut proto_path = Vec::new();
    set_segments(M::descriptor(), value, &segments, raw, path, &mut proto_path)?;
    Ok(proto_path.join("."))
}

fn set_segments(
    descriptor: MessageDescriptor,
    node: &mut Value,
    segments: &[&str],
    raw: &str,
    path: &str,
    proto_path: &mut Vec<String>,
) -> Result<(), String> {
    use prost_reflect::{Cardinality, Kind};

    let (segment, rest) = segments.split_first().ok_or_else(|| format!("`{path}`: empty path"))?;
    let field = descriptor
        .fields()
        .find(|f| f.name() == *segment || f.json_name() == *segment)
        .ok_or_else(|| format!("`{path}`: {} has no field `{segment}`", descriptor.name()))?;
    proto_path.push(field.name().to_owned());
    if !node.is_object() {
        *node = Value::Object(Default::default());
    }
    let object = node.as_object_mut().expect("an object");
    if !rest.is_empty() {
        return match field.kind() {
            Kind::Message(m) if !field.is_list() && !field.is_map() => {
                let child =
                    object.entry(field.json_name().to_owned()).or_insert_with(|| Value::Object(Default::default()));
                set_segments(m, child, rest, raw, path, proto_path)
            }
            _ => Err(format!("`{path}`: `{segment}` is not a message, so it has no fields")),
        };
    }
    let parsed = if field.cardinality() == Cardinality::Repeated && !field.is_map() {
        match serde_json::from_str::<Value>(raw) {
            Ok(v @ Value::Array(_)) => v,
            _ if raw.is_empty() => Value::Array(Vec::new()),
            _ => Value::Array(raw.split(',').map(|item| scalar(&field.kind(), item.trim())).collect()),
        }
    } else {
        scalar(&field.kind(), raw)
    };
    object.insert(field.json_name().to_owned(), parsed);
    Ok(())
}

/// A command-line value as JSON for a field of `kind`: strings stay
/// strings, enums accept their short name (`plain` for
/// `SASL_MECHANISM_PLAIN`), the rest is parsed as JSON when it can be.
fn scalar(kind: &prost_reflect::Kind, raw: &str) -> Value {
    use prost_reflect::Kind;
    match kind {
        Kind::String => Value::String(raw.to_owned()),
        Kind::Enum(e) => {
            let upper = raw.to_ascii_uppercase().replace('-', "_");
            let name = e
                .values()
                .map(|v| v.name().to_owned())
                .find(|n| *n == upper || n.ends_with(&format!("_{upper}")))
                .unwrap_or_else(|| raw.to_owned());
            Value::String(name)
        }
        _ => serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kt_proto::v1::{KafkaSource, SaslMechanism, Trigger};

    #[test]
    fn test_messages_round_trip_through_proto_json() {
        let trigger = Trigger {
            name: "orders".into(),
            enabled: Some(false),
            generation: 4,
            kafka: Some(KafkaSource {
                hosts: vec!["[::1]:9092".into()],
                sasl: SaslMechanism::Plain.into(),
                connect_timeout_seconds: Some(10),
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = to_json(&trigger);
        assert_eq!(json["generation"], "4", "int64 is a string in proto3 JSON");
        assert_eq!(json["enabled"], false, "defaults are printed");
        assert_eq!(json["kafka"]["sasl"], "SASL_MECHANISM_PLAIN");
        assert_eq!(json["kafka"]["connectTimeoutSeconds"], 10);
        assert_eq!(from_json::<Trigger>(&json).unwrap(), trigger);
    }

    #[test]
    fn test_input_takes_proto_names_and_refuses_unknown_fields() {
        let t: Trigger =
            from_json(&serde_json::json!({"name": "x", "kafka": {"initial_offset_reset_policy": "earliest"}})).unwrap();
        assert_eq!(t.kafka.unwrap().initial_offset_reset_policy, "earliest");
        let err = from_json::<Trigger>(&serde_json::json!({"nmae": "x"})).unwrap_err();
        assert!(err.contains("nmae"), "{err}");
    }

    #[test]
    fn test_set_path_writes_typed_values_and_names_the_mask_path() {
        let mut v = canonical::<Trigger>(&serde_json::json!({"kafka": {"topics": ["a"]}})).unwrap();
        assert_eq!(set_path::<Trigger>(&mut v, "kafka.topics", "orders, refunds").unwrap(), "kafka.topics");
        assert_eq!(set_path::<Trigger>(&mut v, "retry.maxAttempts", "3").unwrap(), "retry.max_attempts");
        assert_eq!(set_path::<Trigger>(&mut v, "kafka.sasl", "scram-sha-256").unwrap(), "kafka.sasl");
        assert_eq!(set_path::<Trigger>(&mut v, "name", "123").unwrap(), "name");
        let t: Trigger = from_json(&v).unwrap();
        assert_eq!(t.name, "123");
        assert_eq!(t.kafka.as_ref().unwrap().topics, ["orders", "refunds"]);
        assert_eq!(t.kafka.as_ref().unwrap().sasl(), SaslMechanism::ScramSha256);
        assert_eq!(t.retry.unwrap().max_attempts, Some(3));
        let err = set_path::<Trigger>(&mut v, "kafka.nope", "1").unwrap_err();
        assert!(err.contains("no field `nope`"), "{err}");
        assert!(set_path::<Trigger>(&mut v, "name.x", "1").is_err());
    }
}
