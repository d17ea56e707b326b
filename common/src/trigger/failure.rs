//! The failure policy of a trigger: what a work order that failed for good
//! does to its key — block it until an operator acts, or record a dead
//! letter (optionally also produced to a Kafka topic) and move on.

use kt_proto::v1;
use serde::{Deserialize, Serialize};

use super::validate::{check_topic, Checker};

/// `Trigger.on_failure` and `Trigger.dead_letter_topic`, validated. Stored
/// in the spec; triggers stored before the policy existed block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum OnFailure {
    #[default]
    Block,
    DeadLetter {
        /// Also produce each dead letter here, acknowledged before the dead
        /// letter is committed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
    },
}

impl OnFailure {
    /// The topic dead letters are produced to, if any.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        match self {
            OnFailure::DeadLetter { topic } => topic.as_deref(),
            OnFailure::Block => None,
        }
    }
}

pub(super) fn check_on_failure(c: &mut Checker, t: &v1::Trigger) -> OnFailure {
    let topic = t.dead_letter_topic.trim();
    let policy = match v1::OnFailure::try_from(t.on_failure) {
        Ok(v1::OnFailure::Unspecified | v1::OnFailure::Block) => OnFailure::Block,
        Ok(v1::OnFailure::DeadLetter) => OnFailure::DeadLetter { topic: None },
        Err(_) => {
            c.bad("on_failure", format!("unknown failure policy {}", t.on_failure));
            return OnFailure::Block;
        }
    };
    if topic.is_empty() {
        return policy;
    }
    if policy == OnFailure::Block {
        c.bad("dead_letter_topic", "is only valid with on_failure ON_FAILURE_DEAD_LETTER");
        return policy;
    }
    if let Err(why) = check_topic(topic) {
        c.bad("dead_letter_topic", why);
    } else if t.kafka.as_ref().is_some_and(|k| k.topics.iter().any(|s| s.trim() == topic)) {
        c.bad(
            "dead_letter_topic",
            format!("`{topic}` is one of kafka.topics: the trigger would consume its own dead letters"),
        );
    }
    OnFailure::DeadLetter { topic: Some(topic.to_owned()) }
}

/// Writes the policy into a wire trigger.
pub(super) fn on_failure_to_proto(policy: &OnFailure, t: &mut v1::Trigger) {
    let (on_failure, topic) = match policy {
        OnFailure::Block => (v1::OnFailure::Block, None),
        OnFailure::DeadLetter { topic } => (v1::OnFailure::DeadLetter, topic.clone()),
    };
    t.on_failure = on_failure.into();
    t.dead_letter_topic = topic.unwrap_or_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(on_failure: v1::OnFailure, topic: &str) -> (OnFailure, Vec<String>) {
        let t = v1::Trigger {
            kafka: Some(v1::KafkaSource { topics: vec!["orders".into()], ..Default::default() }),
            on_failure: on_failure.into(),
            dead_letter_topic: topic.into(),
            ..Default::default()
        };
        let mut c = Checker::new("trigger.");
        let policy = check_on_failure(&mut c, &t);
        (policy, c.into_violations().into_iter().map(|v| format!("{}: {}", v.field, v.description)).collect())
    }

    #[test]
    fn test_unspecified_blocks() {
        assert_eq!(checked(v1::OnFailure::Unspecified, ""), (OnFailure::Block, vec![]));
    }

    #[test]
    fn test_dead_letter_with_and_without_topic() {
        assert_eq!(checked(v1::OnFailure::DeadLetter, ""), (OnFailure::DeadLetter { topic: None }, vec![]));
        let with_topic = OnFailure::DeadLetter { topic: Some("orders.dlq".into()) };
        assert_eq!(checked(v1::OnFailure::DeadLetter, " orders.dlq "), (with_topic, vec![]));
    }

    #[test]
    fn test_bad_dead_letter_topics_are_field_violations() {
        let (_, v) = checked(v1::OnFailure::Block, "orders.dlq");
        assert_eq!(v, ["trigger.dead_letter_topic: is only valid with on_failure ON_FAILURE_DEAD_LETTER"]);
        let (_, v) = checked(v1::OnFailure::DeadLetter, "bad topic");
        assert!(v[0].starts_with("trigger.dead_letter_topic: `bad topic` contains ` `"), "{v:?}");
        let (_, v) = checked(v1::OnFailure::DeadLetter, "orders");
        assert!(v[0].contains("would consume its own dead letters"), "{v:?}");
    }

    #[test]
    fn test_unknown_policy_is_a_field_violation() {
        let t = v1::Trigger { on_failure: 7, ..Default::default() };
        let mut c = Checker::new("");
        check_on_failure(&mut c, &t);
        let fields: Vec<String> = c.into_violations().into_iter().map(|v| v.field).collect();
        assert_eq!(fields, ["on_failure"]);
    }

    #[test]
    fn test_policy_round_trips_through_the_wire_and_storage() {
        for policy in
            [OnFailure::Block, OnFailure::DeadLetter { topic: None }, OnFailure::DeadLetter { topic: Some("d".into()) }]
        {
            let mut t = v1::Trigger::default();
            on_failure_to_proto(&policy, &mut t);
            assert_eq!(check_on_failure(&mut Checker::new(""), &t), policy);
            let stored = serde_json::to_string(&policy).unwrap();
            assert_eq!(serde_json::from_str::<OnFailure>(&stored).unwrap(), policy);
        }
    }
}
