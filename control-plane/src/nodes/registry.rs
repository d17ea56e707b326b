//! Which nodes are connected and what their pipelines reported. Sessions
//! update it; status queries read it. The lock is never held across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use kt_proto::internal::{PipelineReport, PipelineState};

#[derive(Debug, Clone)]
pub struct PipelineInfo {
    pub generation: i64,
    pub state: PipelineState,
    pub error: String,
    pub reported_at: DateTime<Utc>,
    pub report: PipelineReport,
}

#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node_id: String,
    /// Distinguishes a reconnect from the session it replaced.
    pub session: Uuid,
    pub connected_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub pipelines: HashMap<String, PipelineInfo>,
}

#[derive(Clone, Default)]
pub struct NodeRegistry {
    nodes: Arc<Mutex<HashMap<String, NodeInfo>>>,
}

impl NodeRegistry {
    pub fn joined(&self, node_id: &str, session: Uuid) {
        let now = Utc::now();
        self.nodes.lock().unwrap().insert(
            node_id.to_owned(),
            NodeInfo {
                node_id: node_id.to_owned(),
                session,
                connected_at: now,
                last_seen: now,
                pipelines: HashMap::new(),
            },
        );
    }

    /// Removes the node unless a newer session already replaced it. Returns
    /// whether it was removed.
    pub fn left(&self, node_id: &str, session: Uuid) -> bool {
        let mut nodes = self.nodes.lock().unwrap();
        if nodes.get(node_id).is_some_and(|n| n.session == session) {
            nodes.remove(node_id);
            true
        } else {
            false
        }
    }

    pub fn seen(&self, node_id: &str) {
        if let Some(n) = self.nodes.lock().unwrap().get_mut(node_id) {
            n.last_seen = Utc::now();
        }
    }

    /// Records a pipeline report; returns the previous state of that pipeline.
    pub fn report(&self, node_id: &str, report: PipelineReport) -> Option<PipelineState> {
        let mut nodes = self.nodes.lock().unwrap();
        let node = nodes.get_mut(node_id)?;
        let now = Utc::now();
        node.last_seen = now;
        let state = PipelineState::try_from(report.state).unwrap_or(PipelineState::Unspecified);
        let info = PipelineInfo {
            generation: report.generation,
            state,
            error: report.error.clone(),
            reported_at: now,
            report,
        };
        node.pipelines.insert(info.report.trigger_id.clone(), info).map(|old| old.state)
    }

    pub fn snapshot(&self) -> Vec<NodeInfo> {
        let mut nodes: Vec<_> = self.nodes.lock().unwrap().values().cloned().collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        nodes
    }
}
