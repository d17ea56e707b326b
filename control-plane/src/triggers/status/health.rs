//! The one summary state of `GetTriggerStatus` (`TriggerHealth` and its
//! reason), decided from what the status already holds. Pure, so every rule
//! has a table test; the rules are documented on `TriggerHealth` in
//! `triggers.proto` and in the README.

use kt_proto::internal::PipelineState;
use kt_proto::v1::TriggerHealth;

/// What one connected node reports of the trigger's pipeline.
#[derive(Debug, Clone)]
pub struct NodePipeline<'a> {
    pub node_id: &'a str,
    pub state: PipelineState,
    pub error: &'a str,
}

/// What the summary is decided from.
#[derive(Debug, Clone)]
pub struct HealthInput<'a> {
    pub enabled: bool,
    pub connected_nodes: usize,
    /// The nodes that report the pipeline (a connected node may not yet).
    pub pipelines: Vec<NodePipeline<'a>>,
    pub blocked_sets: i64,
    pub oldest_blocked_age_seconds: i64,
}

/// The summary state and, for DEGRADED and FAILED, why.
pub fn summarize(input: &HealthInput<'_>) -> (TriggerHealth, String) {
    if !input.enabled {
        return (TriggerHealth::Disabled, String::new());
    }
    let live = |p: &&NodePipeline<'_>| matches!(p.state, PipelineState::Running | PipelineState::Starting);
    let failed: Vec<&NodePipeline<'_>> = input.pipelines.iter().filter(|p| p.state == PipelineState::Failed).collect();
    if !failed.is_empty() && !input.pipelines.iter().any(|p| live(&p)) {
        let why = failed.iter().map(|p| node_error(p)).collect::<Vec<_>>().join("; ");
        return (TriggerHealth::Failed, why);
    }
    let mut reasons = Vec::new();
    if input.connected_nodes == 0 {
        reasons.push("no data-plane node is connected".to_owned());
    }
    reasons.extend(input.pipelines.iter().filter(|p| !p.error.is_empty()).map(node_error));
    if input.connected_nodes > 0 && !input.pipelines.iter().any(|p| p.state == PipelineState::Running) {
        reasons.push("no node reports the pipeline running yet".to_owned());
    }
    if input.blocked_sets > 0 {
        reasons.push(format!(
            "{} blocked set(s), the oldest blocked for {}s",
            input.blocked_sets, input.oldest_blocked_age_seconds
        ));
    }
    if reasons.is_empty() {
        (TriggerHealth::Healthy, String::new())
    } else {
        (TriggerHealth::Degraded, reasons.join("; "))
    }
}

/// A node's error as a reason; a failure reported without a message says so.
fn node_error(p: &NodePipeline<'_>) -> String {
    match p.error {
        "" => format!("node {} reports the pipeline failed", p.node_id),
        error => format!("node {}: {error}", p.node_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(node_id: &'static str, state: PipelineState, error: &'static str) -> NodePipeline<'static> {
        NodePipeline { node_id, state, error }
    }

    fn input(connected_nodes: usize, pipelines: Vec<NodePipeline<'static>>, blocked_sets: i64) -> HealthInput<'static> {
        HealthInput { enabled: true, connected_nodes, pipelines, blocked_sets, oldest_blocked_age_seconds: 7 }
    }

    #[test]
    fn test_each_rule_in_order() {
        use PipelineState::{Failed, Running, Starting, Stopped};
        use TriggerHealth::{Degraded, Disabled, Healthy};
        let running = || node("a", Running, "");
        let cases: Vec<(&str, HealthInput<'static>, TriggerHealth, &str)> = vec![
            (
                "disabled wins over everything",
                HealthInput { enabled: false, ..input(0, vec![node("a", Failed, "x")], 3) },
                Disabled,
                "",
            ),
            ("running everywhere", input(2, vec![running(), node("b", Running, "")], 0), Healthy, ""),
            (
                "failed on its only node",
                input(1, vec![node("a", Failed, "broker down")], 0),
                TriggerHealth::Failed,
                "node a: broker down",
            ),
            (
                "failed and stopped, none running",
                input(2, vec![node("a", Failed, ""), node("b", Stopped, "")], 0),
                TriggerHealth::Failed,
                "node a reports the pipeline failed",
            ),
            (
                "failed on one node, running on another",
                input(2, vec![node("a", Failed, "boom"), node("b", Running, "")], 0),
                Degraded,
                "node a: boom",
            ),
            (
                "failed on one node, restarting on another",
                input(2, vec![node("a", Failed, "boom"), node("b", Starting, "")], 0),
                Degraded,
                "node a: boom; no node reports the pipeline running yet",
            ),
            ("no node connected", input(0, vec![], 0), Degraded, "no data-plane node is connected"),
            (
                "no node connected, sets blocked",
                input(0, vec![], 2),
                Degraded,
                "no data-plane node is connected; 2 blocked set(s), the oldest blocked for 7s",
            ),
            ("running with an error", input(1, vec![node("a", Running, "lag")], 0), Degraded, "node a: lag"),
            ("connected, not reported yet", input(1, vec![], 0), Degraded, "no node reports the pipeline running yet"),
            ("blocked sets", input(1, vec![running()], 1), Degraded, "1 blocked set(s), the oldest blocked for 7s"),
        ];
        for (what, input, health, reason) in cases {
            assert_eq!(summarize(&input), (health, reason.to_owned()), "{what}");
        }
    }
}
