//! `kafka_triggers.v1.EventService`: replay from a cursor, then follow live,
//! filtered by trigger and kind (`events/follow.rs`).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use kt_common::tasks::Supervisor;
use kt_proto::status::{invalid_argument, FieldViolation};
use kt_proto::v1::event_service_server::EventService;
use kt_proto::v1::{Event, EventKind, StreamEventsRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::timestamp;
use crate::events::follow::{cursor_is_known, follow, Subscription, CLIENT_CAPACITY};
use crate::events::stream::{EventHub, EventRow};

pub struct EventHandler {
    pub hub: EventHub,
    /// Runs each subscriber's replay-then-live task.
    pub tasks: Supervisor,
}

#[tonic::async_trait]
impl EventService for EventHandler {
    type StreamEventsStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

    async fn stream_events(
        &self,
        req: Request<StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        let req = req.into_inner();
        let subscription = Subscription::parse(&req.trigger_ids, &req.kinds, &req.after_cursor)
            .map_err(|violations| invalid_argument(&violations))?;
        if !cursor_is_known(&self.hub, &subscription).await.map_err(|e| super::errors::database(&e))? {
            let ahead = "is ahead of every event: not a cursor from this server";
            return Err(invalid_argument(&[FieldViolation::new("after_cursor", ahead)]));
        }
        let (tx, rx) = mpsc::channel(CLIENT_CAPACITY);
        self.tasks.spawn_isolated("event subscriber", follow(self.hub.clone(), subscription, tx));
        let events = ReceiverStream::new(rx).map(|delivery| delivery.map(|row| to_proto(&row)).map_err(Status::from));
        Ok(Response::new(Box::pin(events)))
    }
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
