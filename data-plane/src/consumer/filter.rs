//! A pipeline's trigger filter: compiled once when the pipeline (one
//! trigger generation) starts, applied to each part before it is stored.
//! A message it does not match is marked filtered (its offset is committed
//! with the others, it gets no work order); a run-time failure counts as a
//! non-match and is logged once per generation, never with message contents.

use std::sync::atomic::{AtomicBool, Ordering};

use kt_common::filter::{Filter, MessageView};
use kt_proto::ids::TriggerId;

use crate::store::IngestMessage;

pub struct PipelineFilter {
    filter: Filter,
    trigger_id: TriggerId,
    generation: i64,
    /// A run-time failure was logged for this generation already.
    logged: AtomicBool,
}

impl PipelineFilter {
    /// `None` for an empty expression (every message matches). The spec
    /// was validated, so an expression that does not compile here is a bug
    /// of the version skew kind; it is reported as the pipeline's error.
    pub fn new(source: &str, trigger_id: TriggerId, generation: i64) -> Result<Option<Self>, String> {
        if source.is_empty() {
            return Ok(None);
        }
        let filter = Filter::compile(source).map_err(|why| format!("invalid filter of trigger {trigger_id}: {why}"))?;
        Ok(Some(Self { filter, trigger_id, generation, logged: AtomicBool::new(false) }))
    }

    /// Marks the messages the filter does not match. Messages whose headers
    /// could not be read are left alone: they are recorded as ingest
    /// failures whatever the filter says.
    pub fn apply(&self, messages: &mut [IngestMessage]) {
        for m in messages.iter_mut() {
            let Some(headers) = &m.headers else { continue };
            let headers: Vec<(&str, Option<&[u8]>)> =
                headers.iter().map(|h| (h.name.as_str(), h.value.as_deref())).collect();
            let view = MessageView {
                topic: &m.topic,
                partition: m.partition,
                offset: m.offset,
                key: m.key.as_deref(),
                value: m.value.as_deref(),
                headers: &headers,
                timestamp: m.timestamp,
            };
            let matched = self.filter.matches(&view).unwrap_or_else(|e| {
                if !self.logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        trigger_id = %self.trigger_id,
                        generation = self.generation,
                        topic = %m.topic,
                        partition = m.partition,
                        offset = m.offset,
                        error = %e,
                        "filter failed on a message; counting it as not matching (logged once per trigger generation)"
                    );
                }
                false
            });
            m.filtered = !matched;
        }
    }
}
