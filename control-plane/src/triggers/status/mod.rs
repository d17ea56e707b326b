//! `GetTriggerStatus`: what the nodes report about a trigger's pipeline
//! (state, partitions, lag, last error) joined with what Postgres knows
//! (stored messages, work orders by state, blocked sets), summed up in one
//! [`health`] state.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use kt_proto::v1::{NodeStatus, PartitionStatus, TriggerStatus};
use sqlx::PgPool;
use uuid::Uuid;

use kt_common::trigger::timestamp;

use super::{store, TriggerError};
use crate::nodes::NodeRegistry;

mod health;

pub async fn trigger_status(pool: &PgPool, registry: &NodeRegistry, id: Uuid) -> Result<TriggerStatus, TriggerError> {
    let trigger = store::get(pool, id).await?.ok_or(TriggerError::NotFound(id))?;
    let key = id.to_string();

    let mut nodes = Vec::new();
    let mut last_error: Option<(DateTime<Utc>, String)> = None;
    let connected = registry.snapshot();
    let mut pipelines = Vec::new();
    for node in &connected {
        let Some(p) = node.pipelines.get(&key) else { continue };
        let partitions = p
            .report
            .partitions
            .iter()
            .map(|r| PartitionStatus {
                topic: r.topic.clone(),
                partition: r.partition,
                committed_offset: r.committed_offset,
                high_watermark: r.high_watermark,
                // Nothing committed yet: everything up to the high watermark
                // is still to read (an upper bound when the log was trimmed).
                lag: match (r.committed_offset, r.high_watermark) {
                    (_, h) if h < 0 => -1,
                    (c, h) if c < 0 => h,
                    (c, h) => (h - c).max(0),
                },
            })
            .collect();
        pipelines.push(health::NodePipeline { node_id: &node.node_id, state: p.state, error: &p.error });
        if !p.error.is_empty() && last_error.as_ref().is_none_or(|(at, _)| p.reported_at > *at) {
            last_error = Some((p.reported_at, p.error.clone()));
        }
        nodes.push(NodeStatus {
            node_id: node.node_id.clone(),
            state: p.state.as_str_name().to_owned(),
            partitions,
            last_error: p.error.clone(),
            last_error_time: (!p.error.is_empty()).then(|| timestamp(p.reported_at)),
        });
    }

    let (stored_messages, blocked_sets, oldest_blocked, dead_letters, filtered_messages): (
        i64,
        i64,
        Option<f64>,
        i64,
        i64,
    ) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM messages WHERE trigger_id = $1),
                (SELECT count(*) FROM message_sets WHERE trigger_id = $1 AND state = 'blocked'),
                (SELECT extract(epoch FROM now() - min(blocked_since))::float8
                   FROM message_sets WHERE trigger_id = $1 AND state = 'blocked'),
                (SELECT count(*) FROM dead_letters WHERE trigger_id = $1),
                (SELECT COALESCE(sum(filtered), 0)::int8 FROM partition_checkpoints WHERE trigger_id = $1)",
    )
    .bind(id)
    .fetch_one(pool)
    .await?;
    let by_state: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM work_orders WHERE trigger_id = $1 GROUP BY state")
            .bind(id)
            .fetch_all(pool)
            .await?;
    // The most recent failure recorded by the data plane, when newer than
    // what the live nodes report (a node that failed and left).
    let recorded: Option<(DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT created_at, COALESCE(details->>'error', kind) FROM events
          WHERE trigger_id = $1 AND kind IN ('pipeline_failed', 'persistence_failed')
          ORDER BY id DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    if let Some(r) = recorded {
        if last_error.as_ref().is_none_or(|(at, _)| r.0 > *at) {
            last_error = Some(r);
        }
    }

    let oldest_blocked_age_seconds = oldest_blocked.map(|s| s.round() as i64).unwrap_or(0);
    let (summary, reason) = health::summarize(&health::HealthInput {
        enabled: trigger.enabled,
        connected_nodes: connected.len(),
        pipelines,
        blocked_sets,
        oldest_blocked_age_seconds,
    });
    Ok(TriggerStatus {
        trigger_id: key,
        nodes,
        stored_messages,
        blocked_sets,
        oldest_blocked_age_seconds,
        work_orders_by_state: by_state.into_iter().collect::<HashMap<_, _>>(),
        last_error: last_error.as_ref().map(|(_, e)| e.clone()).unwrap_or_default(),
        last_error_time: last_error.map(|(at, _)| timestamp(at)),
        health: summary.into(),
        reason,
        dead_letters,
        filtered_messages,
    })
}
