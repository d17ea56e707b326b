//! Data-plane nodes: the registry of live sessions and what each reported,
//! and the desired pipeline state sent to every node.

mod registry;

pub use registry::{NodeInfo, NodeRegistry, PipelineInfo};

use kt_common::trigger::spec_to_proto;
use kt_proto::internal::{Assignment, PipelineSpec};

use crate::triggers::{TriggerError, TriggerService};

/// The full desired state: every enabled trigger runs on every node (the
/// trigger's consumer group spreads partitions over them).
pub async fn desired_assignment(triggers: &TriggerService, plan_version: i64) -> Result<Assignment, TriggerError> {
    let pipelines = triggers
        .enabled_with_secrets()
        .await?
        .into_iter()
        .map(|(row, secrets)| {
            let mut trigger = spec_to_proto(&row.spec, Some(&secrets));
            trigger.id = row.id.to_string();
            trigger.enabled = row.enabled;
            trigger.generation = row.generation;
            PipelineSpec { trigger: Some(trigger) }
        })
        .collect();
    Ok(Assignment { plan_version, pipelines })
}
