//! Services declared in the public API whose implementation lands later; they
//! answer UNIMPLEMENTED with the method name.

use std::pin::Pin;

use futures::Stream;
use kt_proto::v1::event_service_server::EventService;
use kt_proto::v1::*;
use tonic::{Request, Response, Status};

pub struct Pending;

fn pending<T>(method: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!("{method} is not implemented yet")))
}

#[tonic::async_trait]
impl EventService for Pending {
    type StreamEventsStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

    async fn stream_events(&self, _: Request<StreamEventsRequest>) -> Result<Response<Self::StreamEventsStream>, Status> {
        pending("StreamEvents")
    }
}
