//! `UpdateTrigger`'s field mask: copies the named fields of the request onto
//! the stored trigger. Whole sections (`kafka`, `webhook`, `retry`, `tuning`)
//! and their direct fields are supported, and the top-level `ordering`,
//! `on_failure`, `dead_letter_topic` and `filter`.

use kt_proto::status::FieldViolation;
use kt_proto::v1;

/// Applies `paths` from `patch` onto `current`; an empty mask replaces every
/// configuration field.
pub fn apply(current: &mut v1::Trigger, patch: &v1::Trigger, paths: &[String]) -> Result<(), Vec<FieldViolation>> {
    if paths.is_empty() {
        current.name = patch.name.clone();
        current.kafka = patch.kafka.clone();
        current.webhook = patch.webhook.clone();
        current.retry = patch.retry;
        current.tuning = patch.tuning;
        current.ordering = patch.ordering;
        current.on_failure = patch.on_failure;
        current.dead_letter_topic = patch.dead_letter_topic.clone();
        current.filter = patch.filter.clone();
        return Ok(());
    }
    let mut violations = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        if !apply_path(current, patch, path.trim()) {
            violations.push(FieldViolation::new(
                format!("update_mask.paths[{i}]"),
                format!("unknown or unsupported path `{path}`"),
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// Copies one field; `false` when the path is unknown.
fn apply_path(current: &mut v1::Trigger, patch: &v1::Trigger, path: &str) -> bool {
    macro_rules! section_field {
        ($section:ident, $field:ident) => {{
            let from = patch.$section.clone().unwrap_or_default().$field;
            current.$section.get_or_insert_with(Default::default).$field = from;
            true
        }};
    }
    match path {
        "name" => {
            current.name = patch.name.clone();
            true
        }
        "kafka" => {
            current.kafka = patch.kafka.clone();
            true
        }
        "webhook" => {
            current.webhook = patch.webhook.clone();
            true
        }
        "retry" => {
            current.retry = patch.retry;
            true
        }
        "tuning" => {
            current.tuning = patch.tuning;
            true
        }
        "filter" => {
            current.filter = patch.filter.clone();
            true
        }
        "kafka.hosts" => section_field!(kafka, hosts),
        "kafka.topics" => section_field!(kafka, topics),
        "kafka.group_id" => section_field!(kafka, group_id),
        "kafka.initial_offset_reset_policy" => section_field!(kafka, initial_offset_reset_policy),
        "kafka.ssl" => section_field!(kafka, ssl),
        "kafka.ssl_ca_cert" => section_field!(kafka, ssl_ca_cert),
        "kafka.ssl_client_cert" => section_field!(kafka, ssl_client_cert),
        "kafka.ssl_client_key" => section_field!(kafka, ssl_client_key),
        "kafka.sasl" => section_field!(kafka, sasl),
        "kafka.username" => section_field!(kafka, username),
        "kafka.password" => section_field!(kafka, password),
        "kafka.connect_timeout_seconds" => section_field!(kafka, connect_timeout_seconds),
        "webhook.url" => section_field!(webhook, url),
        "webhook.headers" => section_field!(webhook, headers),
        "webhook.timeout_ms" => section_field!(webhook, timeout_ms),
        "webhook.format" => section_field!(webhook, format),
        "retry.max_attempts" => section_field!(retry, max_attempts),
        "retry.initial_backoff_ms" => section_field!(retry, initial_backoff_ms),
        "retry.max_backoff_ms" => section_field!(retry, max_backoff_ms),
        "retry.max_age_seconds" => section_field!(retry, max_age_seconds),
        "tuning.rate_limit_per_second" => section_field!(tuning, rate_limit_per_second),
        "tuning.max_in_flight" => section_field!(tuning, max_in_flight),
        "tuning.fetch_max_bytes" => section_field!(tuning, fetch_max_bytes),
        "ordering" => {
            current.ordering = patch.ordering;
            true
        }
        "on_failure" => {
            current.on_failure = patch.on_failure;
            true
        }
        "dead_letter_topic" => {
            current.dead_letter_topic = patch.dead_letter_topic.clone();
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger(topic: &str, url: &str) -> v1::Trigger {
        v1::Trigger {
            name: "t".into(),
            kafka: Some(v1::KafkaSource { topics: vec![topic.into()], ..Default::default() }),
            webhook: Some(v1::WebhookTarget { url: url.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn test_mask_copies_only_named_fields() {
        let mut current = trigger("a", "http://old/");
        let patch = trigger("b", "http://new/");
        apply(&mut current, &patch, &["kafka.topics".into()]).unwrap();
        assert_eq!(current.kafka.as_ref().unwrap().topics, ["b"]);
        assert_eq!(current.webhook.as_ref().unwrap().url, "http://old/");
    }

    #[test]
    fn test_mask_changes_only_the_webhook_format() {
        let mut current = trigger("a", "http://old/");
        let mut patch = trigger("b", "http://new/");
        patch.webhook.as_mut().unwrap().format = v1::WebhookFormat::Cloudevents.into();
        apply(&mut current, &patch, &["webhook.format".into()]).unwrap();
        let webhook = current.webhook.unwrap();
        assert_eq!((webhook.url.as_str(), webhook.format()), ("http://old/", v1::WebhookFormat::Cloudevents));
    }

    #[test]
    fn test_mask_changes_only_the_failure_policy() {
        let mut current = trigger("a", "http://old/");
        let mut patch = trigger("b", "http://new/");
        patch.on_failure = v1::OnFailure::DeadLetter.into();
        patch.dead_letter_topic = "a.dlq".into();
        apply(&mut current, &patch, &["on_failure".into()]).unwrap();
        assert_eq!((current.on_failure(), current.dead_letter_topic.as_str()), (v1::OnFailure::DeadLetter, ""));
        apply(&mut current, &patch, &["dead_letter_topic".into()]).unwrap();
        assert_eq!(current.dead_letter_topic, "a.dlq");
        assert_eq!(current.kafka.unwrap().topics, ["a"]);
    }

    #[test]
    fn test_mask_changes_only_the_filter() {
        let mut current = trigger("a", "http://old/");
        let patch = v1::Trigger { filter: "key == 'x'".into(), ..trigger("b", "http://new/") };
        apply(&mut current, &patch, &["filter".into()]).unwrap();
        assert_eq!((current.filter.as_str(), current.webhook.unwrap().url.as_str()), ("key == 'x'", "http://old/"));
    }

    #[test]
    fn test_empty_mask_replaces_everything() {
        let mut current = trigger("a", "http://old/");
        apply(&mut current, &trigger("b", "http://new/"), &[]).unwrap();
        assert_eq!(current.webhook.as_ref().unwrap().url, "http://new/");
    }

    #[test]
    fn test_unknown_paths_are_reported_by_index() {
        let mut current = trigger("a", "http://old/");
        let err =
            apply(&mut current, &trigger("b", "x"), &["name".into(), "kafka.nope".into(), "id".into()]).unwrap_err();
        let fields: Vec<_> = err.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["update_mask.paths[1]", "update_mask.paths[2]"]);
    }
}
