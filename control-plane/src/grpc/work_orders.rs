//! `kafka_triggers.v1.WorkOrderService`: parse, call the work-order service,
//! convert.

use kt_proto::status::{invalid_argument, FieldViolation};
use kt_proto::v1::work_order_service_server::WorkOrderService as WorkOrderApi;
use kt_proto::v1::*;
use tonic::{Request, Response, Status};

use super::convert::{key_filter, parse_id, timestamp};
use super::message_sets::optional_id;
use crate::work_orders::store::WorkOrderRow;
use crate::work_orders::{self, OffsetRange, WorkOrderListQuery, WorkOrderService};

pub struct WorkOrderHandler {
    pub work_orders: WorkOrderService,
}

#[tonic::async_trait]
impl WorkOrderApi for WorkOrderHandler {
    async fn list_work_orders(
        &self,
        req: Request<ListWorkOrdersRequest>,
    ) -> Result<Response<ListWorkOrdersResponse>, Status> {
        let query = list_query(req.into_inner())?;
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

/// The query of a listing request: the filters' bad fields are one
/// violation each.
fn list_query(req: ListWorkOrdersRequest) -> Result<WorkOrderListQuery, Status> {
    let trigger_id = optional_id("trigger_id", &req.trigger_id)?;
    let state = parse_state(req.state)?;
    let mut violations = Vec::new();
    let key = key_filter(req.key, req.key_utf8).map_err(|v| violations.push(v)).ok().flatten();
    let range = parse_range(&req.topic, req.partition, req.offset_from, req.offset_to)
        .map_err(|v| violations.extend(v))
        .ok()
        .flatten();
    if !violations.is_empty() {
        return Err(invalid_argument(&violations));
    }
    Ok(WorkOrderListQuery { trigger_id, state, key, range, page_size: req.page_size, page_token: req.page_token })
}

/// An offset range, if any of its fields is set.
fn parse_range(
    topic: &str,
    partition: Option<i32>,
    from: Option<i64>,
    to: Option<i64>,
) -> Result<Option<OffsetRange>, Vec<FieldViolation>> {
    if topic.is_empty() && partition.is_none() && from.is_none() && to.is_none() {
        return Ok(None);
    }
    let mut violations = Vec::new();
    if topic.trim().is_empty() {
        violations.push(FieldViolation::new("topic", "is required with an offset range"));
    }
    match partition {
        None => violations.push(FieldViolation::new("partition", "is required with an offset range")),
        Some(p) if p < 0 => violations.push(FieldViolation::new("partition", format!("must be >= 0, not {p}"))),
        Some(_) => {}
    }
    for (field, value) in [("offset_from", from), ("offset_to", to)] {
        if let Some(v) = value.filter(|v| *v < 0) {
            violations.push(FieldViolation::new(field, format!("must be >= 0, not {v}")));
        }
    }
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            violations
                .push(FieldViolation::new("offset_from", format!("must not be greater than offset_to ({f} > {t})")));
        }
    }
    match partition {
        Some(partition) if violations.is_empty() => {
            Ok(Some(OffsetRange { topic: topic.to_owned(), partition, from: from.unwrap_or(0), to }))
        }
        _ => Err(violations),
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
