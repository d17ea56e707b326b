//! `kafka_triggers.v1.WorkOrderService`: parse, call the work-order service,
//! convert.

use kt_proto::status::{invalid_argument, FieldViolation};
use kt_proto::v1::work_order_service_server::WorkOrderService as WorkOrderApi;
use kt_proto::v1::*;
use tonic::{Request, Response, Status};

use super::convert::{parse_id, timestamp};
use super::message_sets::optional_id;
use crate::work_orders::store::WorkOrderRow;
use crate::work_orders::{self, WorkOrderListQuery, WorkOrderService};

pub struct WorkOrderHandler {
    pub work_orders: WorkOrderService,
}

#[tonic::async_trait]
impl WorkOrderApi for WorkOrderHandler {
    async fn list_work_orders(
        &self,
        req: Request<ListWorkOrdersRequest>,
    ) -> Result<Response<ListWorkOrdersResponse>, Status> {
        let req = req.into_inner();
        let query = WorkOrderListQuery {
            trigger_id: optional_id("trigger_id", &req.trigger_id)?,
            state: parse_state(req.state)?,
            page_size: req.page_size,
            page_token: req.page_token,
        };
        let (rows, next_page_token) = self.work_orders.list(&query).await?;
        Ok(Response::new(ListWorkOrdersResponse {
            work_orders: rows.iter().map(work_order_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_work_order(&self, req: Request<GetWorkOrderRequest>) -> Result<Response<WorkOrder>, Status> {
        let id = parse_id("id", &req.get_ref().id)?;
        Ok(Response::new(work_order_to_proto(&self.work_orders.get(id).await?)))
    }

    async fn complete_work_order(&self, req: Request<CompleteWorkOrderRequest>) -> Result<Response<WorkOrder>, Status> {
        let req = req.into_inner();
        let id = parse_id("id", &req.id)?;
        let row = self.work_orders.complete(id, req.success, &req.error).await?;
        Ok(Response::new(work_order_to_proto(&row)))
    }
}

fn parse_state(value: i32) -> Result<Option<work_orders::WorkOrderState>, Status> {
    use work_orders::WorkOrderState as S;
    match WorkOrderState::try_from(value) {
        Ok(WorkOrderState::Unspecified) => Ok(None),
        Ok(WorkOrderState::Pending) => Ok(Some(S::Pending)),
        Ok(WorkOrderState::Running) => Ok(Some(S::Running)),
        Ok(WorkOrderState::Success) => Ok(Some(S::Success)),
        Ok(WorkOrderState::Failed) => Ok(Some(S::Failed)),
        Ok(WorkOrderState::Skipped) => Ok(Some(S::Skipped)),
        Err(_) => Err(invalid_argument(&[FieldViolation::new("state", format!("unknown work order state {value}"))])),
    }
}

/// The wire state of a stored work-order state.
pub(super) fn work_order_state_to_proto(stored: &str) -> WorkOrderState {
    use work_orders::WorkOrderState as S;
    match work_orders::WorkOrderState::parse(stored) {
        Some(S::Pending) => WorkOrderState::Pending,
        Some(S::Running) => WorkOrderState::Running,
        Some(S::Success) => WorkOrderState::Success,
        Some(S::Failed) => WorkOrderState::Failed,
        Some(S::Skipped) => WorkOrderState::Skipped,
        None => WorkOrderState::Unspecified,
    }
}

fn work_order_to_proto(row: &WorkOrderRow) -> WorkOrder {
    WorkOrder {
        id: row.id.to_string(),
        trigger_id: row.trigger_id.to_string(),
        topic: row.topic.clone(),
        partition: row.partition,
        offset: row.offset,
        key: row.key.clone(),
        state: work_order_state_to_proto(&row.state).into(),
        attempts: row.attempts.max(0) as u32,
        last_error: row.last_error.clone().unwrap_or_default(),
        create_time: Some(timestamp(row.created_at)),
        update_time: Some(timestamp(row.updated_at)),
        body: row.body.clone().unwrap_or_default(),
        set_id: row.set_id.to_string(),
        attempt_log: row.attempt_log.clone().unwrap_or_default(),
    }
}
