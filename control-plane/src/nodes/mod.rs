//! Data-plane nodes: each node's session (`session.rs`), the registry of
//! live sessions and what each reported, the desired pipeline state sent to
//! every node, and the connection tests nodes run for the API
//! (`connection_tests.rs`).

mod connection_tests;
mod registry;
mod session;

pub use connection_tests::{ConnectionTestError, ConnectionTests};
pub use registry::{NodeInfo, NodeRegistry, PipelineInfo};
pub use session::{admit, Refused, Session, SessionEnv, SESSION_OUTBOUND_CAPACITY};

use kt_common::trigger::spec_to_proto;
use kt_proto::internal::{Assignment, PipelineSpec};

use crate::triggers::{TriggerError, TriggerService};

/// Largest encoded size of one assignment message. A node decodes at most
/// 4 MiB per message (tonic's default); a part stays well under it, and one
/// trigger (at most `MAX_TRIGGER_BYTES`, 256 KiB) always fits in a part.
pub const MAX_ASSIGNMENT_PART_BYTES: usize = 1024 * 1024;

/// The full desired state: every enabled trigger runs on every node (the
/// trigger's consumer group spreads partitions over them), as the parts that
/// carry it to a node.
pub async fn desired_assignment(triggers: &TriggerService, plan_version: i64) -> Result<Vec<Assignment>, TriggerError> {
    let pipelines = triggers
        .enabled_with_secrets()
        .await?
        .into_iter()
        .map(|(row, secrets)| {
            let mut trigger = spec_to_proto(&row.spec, Some(&secrets));
            trigger.id = row.id.to_string();
            trigger.enabled = Some(row.enabled);
            trigger.generation = row.generation;
            PipelineSpec { trigger: Some(trigger) }
        })
        .collect();
    Ok(split_assignment(plan_version, pipelines, MAX_ASSIGNMENT_PART_BYTES))
}

/// Packs `pipelines` in order into parts of at most `budget` encoded bytes
/// each (a single pipeline larger than the budget gets a part of its own).
/// An empty plan is one empty part: it still tells the node to stop
/// everything.
pub fn split_assignment(plan_version: i64, pipelines: Vec<PipelineSpec>, budget: usize) -> Vec<Assignment> {
    let mut parts: Vec<Vec<PipelineSpec>> = vec![Vec::new()];
    let mut used = 0;
    for pipeline in pipelines {
        // As a repeated field: tag and length prefix beside the message.
        let size = prost::Message::encoded_len(&pipeline);
        let size = size + prost::length_delimiter_len(size) + 1;
        let current = parts.last_mut().expect("never empty");
        if !current.is_empty() && used + size > budget {
            parts.push(Vec::new());
            used = 0;
        }
        parts.last_mut().expect("never empty").push(pipeline);
        used += size;
    }
    let count = u32::try_from(parts.len()).expect("fewer than 4 billion parts");
    parts
        .into_iter()
        .zip(0..)
        .map(|(pipelines, part)| Assignment { plan_version, pipelines, part, parts: count })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kt_proto::v1::Trigger;
    use prost::Message as _;

    fn pipeline(name: &str, padding: usize) -> PipelineSpec {
        PipelineSpec { trigger: Some(Trigger { name: format!("{name}{}", "x".repeat(padding)), ..Default::default() }) }
    }

    #[test]
    fn test_parts_stay_within_the_budget_and_keep_every_pipeline_in_order() {
        let pipelines: Vec<_> = (0..100).map(|i| pipeline(&format!("t{i:03}-"), 300)).collect();
        let parts = split_assignment(7, pipelines.clone(), 4_000);
        assert!(parts.len() > 5, "{} parts", parts.len());
        for (i, part) in parts.iter().enumerate() {
            assert_eq!((part.plan_version, part.part, part.parts), (7, i as u32, parts.len() as u32));
            assert!(part.encoded_len() <= 4_000, "part {i} is {} bytes", part.encoded_len());
        }
        let joined: Vec<_> = parts.into_iter().flat_map(|p| p.pipelines).collect();
        assert_eq!(joined, pipelines);
    }

    #[test]
    fn test_an_empty_plan_is_one_part_and_an_oversized_pipeline_gets_its_own() {
        let empty = split_assignment(1, Vec::new(), 100);
        assert_eq!(empty.len(), 1);
        assert_eq!((empty[0].part, empty[0].parts, empty[0].pipelines.len()), (0, 1, 0));

        let parts = split_assignment(1, vec![pipeline("a", 10), pipeline("big", 500), pipeline("b", 10)], 100);
        let sizes: Vec<usize> = parts.iter().map(|p| p.pipelines.len()).collect();
        assert_eq!(sizes, [1, 1, 1]);
    }
}
