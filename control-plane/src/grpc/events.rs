//! `kafka_triggers.v1.EventService`: replay from a cursor, then follow live,
//! filtered by trigger and kind.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kt_common::tasks::Supervisor;
use kt_proto::status::{invalid_argument, FieldViolation};
use kt_proto::v1::event_service_server::EventService;
use kt_proto::v1::{Event, EventKind, StreamEventsRequest};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::timestamp;
use crate::events::stream::{read_after, Cursor, EventHub, EventRow, BROADCAST_CAPACITY, PAGE};

/// Events queued towards one client; when it stops reading, the broadcast
/// behind it overflows and the stream is cut off.
const CLIENT_CAPACITY: usize = 256;

pub struct EventHandler {
    pub hub: EventHub,
    /// Runs each subscriber's replay-then-live task.
    pub tasks: Supervisor,
}

struct Filter {
    triggers: HashSet<Uuid>,
    kinds: HashSet<String>,
}

impl Filter {
    fn matches(&self, row: &EventRow) -> bool {
        (self.triggers.is_empty() || row.trigger_id.is_some_and(|t| self.triggers.contains(&t)))
            && (self.kinds.is_empty() || self.kinds.contains(&row.kind))
    }
}

#[tonic::async_trait]
impl EventService for EventHandler {
    type StreamEventsStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

    async fn stream_events(
        &self,
        req: Request<StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        let req = req.into_inner();
        let mut violations = Vec::new();
        let mut triggers = HashSet::new();
        for (i, id) in req.trigger_ids.iter().enumerate() {
            match Uuid::parse_str(id.trim()) {
                Ok(id) => {
                    triggers.insert(id);
                }
                Err(_) => violations
                    .push(FieldViolation::new(format!("trigger_ids[{i}]"), format!("`{id}` is not a valid UUID"))),
            }
        }
        let mut kinds = HashSet::new();
        for (i, kind) in req.kinds.iter().enumerate() {
            match EventKind::try_from(*kind) {
                Ok(EventKind::Unspecified) | Err(_) => {
                    violations.push(FieldViolation::new(format!("kinds[{i}]"), format!("unknown event kind {kind}")))
                }
                Ok(k) => {
                    kinds.insert(kind_name(k));
                }
            }
        }
        let after = match req.after_cursor.trim() {
            "" => None,
            c => match c.parse::<Cursor>() {
                Ok(c) => Some(c),
                Err(()) => {
                    violations.push(FieldViolation::new("after_cursor", "is not a cursor from a previous event"));
                    None
                }
            },
        };
        if let Some(cursor) = after {
            let future = crate::events::stream::is_from_the_future(self.hub.pool(), cursor)
                .await
                .map_err(|e| super::errors::database(&e))?;
            if future {
                violations.push(FieldViolation::new(
                    "after_cursor",
                    "is ahead of every event: not a cursor from this server",
                ));
            }
        }
        if !violations.is_empty() {
            return Err(invalid_argument(&violations));
        }

        // Subscribe before replaying so nothing falls between the two.
        let live = self.hub.subscribe();
        let (tx, rx) = mpsc::channel(CLIENT_CAPACITY);
        self.tasks
            .spawn_isolated("event subscriber", follow(self.hub.clone(), Filter { triggers, kinds }, after, live, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Out = mpsc::Sender<Result<Event, Status>>;

async fn follow(
    hub: EventHub,
    filter: Filter,
    after: Option<Cursor>,
    mut live: broadcast::Receiver<Arc<EventRow>>,
    tx: Out,
) {
    metrics::gauge!("kt_event_stream_subscribers").increment(1.0);
    let pool = hub.pool();
    let mut sent: Option<Cursor> = after;
    if let Some(mut cursor) = after {
        loop {
            let rows = match read_after(pool, cursor, PAGE).await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(%error, "event replay failed");
                    let _ =
                        tx.send(Err(Status::unavailable("cannot read events; resume later with after_cursor"))).await;
                    return done();
                }
            };
            let full = rows.len() as i64 == PAGE;
            for row in rows {
                cursor = row.cursor();
                if filter.matches(&row) && tx.send(Ok(to_proto(&row))).await.is_err() {
                    return done();
                }
            }
            sent = Some(cursor);
            if !full {
                break;
            }
        }
    }
    loop {
        let row = tokio::select! {
            _ = tx.closed() => return done(),
            _ = hub.stopped() => {
                // Not awaited: a client that does not read must not keep
                // this stream (and the server's drain) open.
                let resume = sent.map(|c| c.to_string()).unwrap_or_default();
                let _ = tx.try_send(Err(Status::unavailable(format!(
                    "this control plane stopped serving; reconnect (to the active replica) with after_cursor = \"{resume}\" to resume"
                ))));
                return done();
            }
            row = live.recv() => row,
        };
        match row {
            Ok(row) => {
                if sent.is_some_and(|s| row.cursor() <= s) {
                    continue;
                }
                sent = Some(row.cursor());
                if filter.matches(&row) && tx.send(Ok(to_proto(&row))).await.is_err() {
                    return done();
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let resume = sent.map(|c| c.to_string()).unwrap_or_default();
                tracing::info!(missed, "event subscriber too slow; cut off");
                let _ = tx
                    .send(Err(Status::resource_exhausted(format!(
                        "client too slow: fell more than {BROADCAST_CAPACITY} events behind; \
                         reconnect with after_cursor = \"{resume}\" to resume"
                    ))))
                    .await;
                return done();
            }
            Err(broadcast::error::RecvError::Closed) => {
                let _ = tx.send(Err(Status::unavailable("control plane shutting down"))).await;
                return done();
            }
        }
    }
}

fn done() {
    metrics::gauge!("kt_event_stream_subscribers").decrement(1.0);
}

fn to_proto(row: &EventRow) -> Event {
    let kind = EventKind::from_str_name(&format!("EVENT_KIND_{}", row.kind.to_ascii_uppercase()))
        .unwrap_or(EventKind::Unspecified);
    Event {
        cursor: row.cursor().to_string(),
        kind: kind.into(),
        trigger_id: row.trigger_id.map(|t| t.to_string()).unwrap_or_default(),
        node_id: row.node_id.clone().unwrap_or_default(),
        time: Some(timestamp(row.created_at)),
        details: row.details.clone(),
    }
}

/// `EVENT_KIND_SET_BLOCKED` → `set_blocked`, the stored name.
fn kind_name(kind: EventKind) -> String {
    kind.as_str_name().trim_start_matches("EVENT_KIND_").to_ascii_lowercase()
}
