//! What the control plane assigned this node, validated once. The session
//! turns each assignment into an [`Assignment`]: every trigger becomes an
//! [`AssignedTrigger`] (or a rejection, reported as a FAILED pipeline),
//! which the pipeline supervisor runs a consumer for and the workers look up
//! in the [`TriggerDirectory`] to deliver its sets. Both see the same value,
//! so they cannot disagree about a trigger's configuration.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kt_common::trigger::{validate_trigger, TriggerSecrets, TriggerSpec};
use kt_proto::ids::TriggerId;
use kt_proto::internal::PipelineSpec;
use kt_proto::v1;
use tokio::sync::watch;

/// A trigger of this node's assignment: its id, generation, validated
/// configuration and credentials.
#[derive(Debug, Clone)]
pub struct AssignedTrigger {
    pub id: TriggerId,
    pub generation: i64,
    pub spec: TriggerSpec,
    pub secrets: TriggerSecrets,
}

impl AssignedTrigger {
    /// From the trigger (with secrets) the control plane assigned. The same
    /// validation as the public API, so a node never runs an invalid
    /// configuration.
    pub fn from_proto(trigger: &v1::Trigger) -> Result<Self, String> {
        let id: TriggerId = trigger.id.parse().map_err(|e| format!("bad trigger id: {e}"))?;
        if trigger.kafka.as_ref().is_none_or(|k| k.group_id.trim().is_empty()) {
            // Validation would invent a fresh group, losing the committed
            // offsets: the control plane always sends the stored one.
            return Err(format!("trigger {id} has no consumer group"));
        }
        // No target policy here: the workers check the webhook target when
        // they connect, so a refused one fails its work orders, visibly.
        let validated = validate_trigger(trigger, "", None, None).map_err(|violations| {
            let list: Vec<String> = violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect();
            format!("invalid configuration of trigger {id}: {}", list.join("; "))
        })?;
        Ok(Self { id, generation: trigger.generation, spec: validated.spec, secrets: validated.secrets })
    }
}

/// An assigned trigger this node cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// As sent (empty when the entry had no trigger at all).
    pub id: String,
    pub generation: i64,
    pub reason: String,
}

/// One whole assignment (the full desired state), validated.
#[derive(Debug, Clone, Default)]
pub struct Assignment {
    pub triggers: Vec<Arc<AssignedTrigger>>,
    pub rejected: Vec<Rejected>,
}

impl Assignment {
    pub fn validate(pipelines: &[PipelineSpec]) -> Self {
        let mut assignment = Self::default();
        for spec in pipelines {
            let Some(trigger) = &spec.trigger else {
                let reason = "pipeline without a trigger".to_owned();
                assignment.rejected.push(Rejected { id: String::new(), generation: 0, reason });
                continue;
            };
            match AssignedTrigger::from_proto(trigger) {
                Ok(valid) => assignment.triggers.push(Arc::new(valid)),
                Err(reason) => {
                    let (id, generation) = (trigger.id.clone(), trigger.generation);
                    assignment.rejected.push(Rejected { id, generation, reason });
                }
            }
        }
        assignment
    }
}

/// The triggers of this node's latest assignment, where the workers look up
/// the trigger of each set they are granted. Replaced whole on every
/// assignment; each replacement is announced on [`TriggerDirectory::changes`],
/// so a grant that arrived before its trigger (the work stream and the
/// session are separate streams) waits for the next assignment, not for a
/// timer. The lock is never held across an await.
#[derive(Clone)]
pub struct TriggerDirectory {
    triggers: Arc<RwLock<HashMap<TriggerId, Arc<AssignedTrigger>>>>,
    /// How many assignments were applied.
    applied: Arc<watch::Sender<u64>>,
}

impl Default for TriggerDirectory {
    fn default() -> Self {
        Self { triggers: Arc::default(), applied: Arc::new(watch::channel(0).0) }
    }
}

impl std::fmt::Debug for TriggerDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<TriggerId> = self.triggers.read().unwrap().keys().copied().collect();
        f.debug_tuple("TriggerDirectory").field(&ids).finish()
    }
}

impl TriggerDirectory {
    pub fn replace(&self, triggers: &[Arc<AssignedTrigger>]) {
        let map = triggers.iter().map(|t| (t.id, t.clone())).collect();
        *self.triggers.write().unwrap() = map;
        self.applied.send_modify(|n| *n += 1);
    }

    pub fn get(&self, id: &TriggerId) -> Option<Arc<AssignedTrigger>> {
        self.triggers.read().unwrap().get(id).cloned()
    }

    /// Marks every replacement from now on as a change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger(id: &str, group: &str) -> v1::Trigger {
        v1::Trigger {
            id: id.to_owned(),
            name: "t".into(),
            generation: 3,
            kafka: Some(v1::KafkaSource {
                hosts: vec!["localhost:9092".into()],
                topics: vec!["orders".into()],
                group_id: group.into(),
                ..Default::default()
            }),
            webhook: Some(v1::WebhookTarget { url: "http://localhost:8080/hook".into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn an_assignment_keeps_valid_triggers_and_says_why_others_cannot_run() {
        let good = TriggerId::new();
        let pipelines = [
            PipelineSpec { trigger: Some(trigger(&good.to_string(), "g")) },
            PipelineSpec { trigger: Some(trigger("not-a-uuid", "g")) },
            PipelineSpec { trigger: Some(trigger(&TriggerId::new().to_string(), " ")) },
            PipelineSpec { trigger: None },
        ];
        let assignment = Assignment::validate(&pipelines);
        let ids: Vec<TriggerId> = assignment.triggers.iter().map(|t| t.id).collect();
        assert_eq!(ids, [good]);
        assert_eq!(assignment.triggers[0].generation, 3);
        let reasons: Vec<&str> = assignment.rejected.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons.len(), 3);
        assert!(reasons[0].starts_with("bad trigger id"), "{reasons:?}");
        assert!(reasons[1].ends_with("has no consumer group"), "{reasons:?}");
        assert_eq!(reasons[2], "pipeline without a trigger");
    }

    #[tokio::test]
    async fn every_replacement_is_announced() {
        let directory = TriggerDirectory::default();
        let mut changes = directory.changes();
        let t = Arc::new(AssignedTrigger::from_proto(&trigger(&TriggerId::new().to_string(), "g")).unwrap());
        assert!(directory.get(&t.id).is_none());
        directory.replace(std::slice::from_ref(&t));
        changes.changed().await.unwrap();
        assert_eq!(directory.get(&t.id).map(|found| found.generation), Some(3));
        directory.replace(&[]);
        changes.changed().await.unwrap();
        assert!(directory.get(&t.id).is_none());
    }
}
