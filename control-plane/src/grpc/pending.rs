//! Services declared in the public API whose implementation lands later; they
//! answer UNIMPLEMENTED with the method name.

use std::pin::Pin;

use futures::Stream;
use kt_proto::v1::event_service_server::EventService;
use kt_proto::v1::message_set_service_server::MessageSetService;
use kt_proto::v1::work_order_service_server::WorkOrderService;
use kt_proto::v1::*;
use tonic::{Request, Response, Status};

pub struct Pending;

fn pending<T>(method: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!("{method} is not implemented yet")))
}

#[tonic::async_trait]
impl MessageSetService for Pending {
    async fn list_message_sets(&self, _: Request<ListMessageSetsRequest>) -> Result<Response<ListMessageSetsResponse>, Status> {
        pending("ListMessageSets")
    }
    async fn get_message_set(&self, _: Request<GetMessageSetRequest>) -> Result<Response<MessageSet>, Status> {
        pending("GetMessageSet")
    }
    async fn retry_message_set(&self, _: Request<RetryMessageSetRequest>) -> Result<Response<MessageSet>, Status> {
        pending("RetryMessageSet")
    }
    async fn skip_message(&self, _: Request<SkipMessageRequest>) -> Result<Response<MessageSet>, Status> {
        pending("SkipMessage")
    }
    async fn discard_message_set(&self, _: Request<DiscardMessageSetRequest>) -> Result<Response<DiscardMessageSetResponse>, Status> {
        pending("DiscardMessageSet")
    }
}

#[tonic::async_trait]
impl WorkOrderService for Pending {
    async fn list_work_orders(&self, _: Request<ListWorkOrdersRequest>) -> Result<Response<ListWorkOrdersResponse>, Status> {
        pending("ListWorkOrders")
    }
    async fn get_work_order(&self, _: Request<GetWorkOrderRequest>) -> Result<Response<WorkOrder>, Status> {
        pending("GetWorkOrder")
    }
    async fn complete_work_order(&self, _: Request<CompleteWorkOrderRequest>) -> Result<Response<WorkOrder>, Status> {
        pending("CompleteWorkOrder")
    }
}

#[tonic::async_trait]
impl EventService for Pending {
    type StreamEventsStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

    async fn stream_events(&self, _: Request<StreamEventsRequest>) -> Result<Response<Self::StreamEventsStream>, Status> {
        pending("StreamEvents")
    }
}
