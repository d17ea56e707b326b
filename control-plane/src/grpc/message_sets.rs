//! `kafka_triggers.v1.MessageSetService`: parse, call the set service, convert.

use kt_proto::status::{invalid_argument, FieldViolation};
use kt_proto::v1::message_set_service_server::MessageSetService as MessageSetApi;
use kt_proto::v1::*;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{key_filter, parse_id, timestamp};
use super::work_orders::work_order_state_to_proto;
use crate::sets::{SetFilter, SetListQuery, SetService, SetState, SetView};

pub struct MessageSetHandler {
    pub sets: SetService,
}

#[tonic::async_trait]
impl MessageSetApi for MessageSetHandler {
    async fn list_message_sets(
        &self,
        req: Request<ListMessageSetsRequest>,
    ) -> Result<Response<ListMessageSetsResponse>, Status> {
        let req = req.into_inner();
        let query = SetListQuery {
            trigger_id: optional_id("trigger_id", &req.trigger_id)?,
            key: key_filter(req.key, req.key_utf8).map_err(|v| invalid_argument(&[v]))?,
            filter: parse_filter(req.state)?,
            page_size: req.page_size,
            page_token: req.page_token,
        };
        let (views, next_page_token) = self.sets.list(&query).await?;
        Ok(Response::new(ListMessageSetsResponse {
            message_sets: views.iter().map(set_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_message_set(&self, req: Request<GetMessageSetRequest>) -> Result<Response<MessageSet>, Status> {
        let id = parse_set_id("id", &req.get_ref().id)?;
        Ok(Response::new(set_to_proto(&self.sets.get(id).await?)))
    }

    async fn retry_message_set(&self, req: Request<RetryMessageSetRequest>) -> Result<Response<MessageSet>, Status> {
        let id = parse_set_id("id", &req.get_ref().id)?;
        Ok(Response::new(set_to_proto(&self.sets.retry(id).await?)))
    }

    async fn skip_message(&self, req: Request<SkipMessageRequest>) -> Result<Response<MessageSet>, Status> {
        let id = parse_set_id("id", &req.get_ref().id)?;
        Ok(Response::new(set_to_proto(&self.sets.skip(id).await?)))
    }

    async fn discard_message_set(
        &self,
        req: Request<DiscardMessageSetRequest>,
    ) -> Result<Response<DiscardMessageSetResponse>, Status> {
        let id = parse_set_id("id", &req.get_ref().id)?;
        let discarded = self.sets.discard(id).await?;
        Ok(Response::new(DiscardMessageSetResponse {
            discarded_messages: discarded.messages,
            skipped_work_orders: discarded.skipped_work_orders,
        }))
    }
}

/// Set ids are the decimal row id: opaque to clients, positive.
fn parse_set_id(field: &str, value: &str) -> Result<i64, Status> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(invalid_argument(&[FieldViolation::new(field, "is required")]));
    }
    trimmed
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| invalid_argument(&[FieldViolation::new(field, format!("`{value}` is not a message set id"))]))
}

/// An optional UUID filter: empty means none.
pub(super) fn optional_id(field: &str, value: &str) -> Result<Option<Uuid>, Status> {
    if value.trim().is_empty() {
        Ok(None)
    } else {
        parse_id(field, value).map(Some)
    }
}

fn parse_filter(value: i32) -> Result<SetFilter, Status> {
    match MessageSetState::try_from(value) {
        Ok(MessageSetState::Unspecified) => Ok(SetFilter::Active),
        Ok(MessageSetState::Ready) => Ok(SetFilter::Only(SetState::Ready)),
        Ok(MessageSetState::InFlight) => Ok(SetFilter::Only(SetState::InFlight)),
        Ok(MessageSetState::Waiting) => Ok(SetFilter::Only(SetState::Waiting)),
        Ok(MessageSetState::Blocked) => Ok(SetFilter::Only(SetState::Blocked)),
        Ok(MessageSetState::Idle) => Ok(SetFilter::Only(SetState::Idle)),
        Err(_) => Err(invalid_argument(&[FieldViolation::new("state", format!("unknown message set state {value}"))])),
    }
}

fn state_to_proto(state: SetState) -> MessageSetState {
    match state {
        SetState::Ready => MessageSetState::Ready,
        SetState::InFlight => MessageSetState::InFlight,
        SetState::Waiting => MessageSetState::Waiting,
        SetState::Blocked => MessageSetState::Blocked,
        SetState::Idle => MessageSetState::Idle,
    }
}

fn set_to_proto(view: &SetView) -> MessageSet {
    let row = &view.row;
    MessageSet {
        id: row.id.to_string(),
        trigger_id: row.trigger_id.to_string(),
        topic: row.topic.clone(),
        key: row.key.clone(),
        partition: row.partition_set,
        state: state_to_proto(view.state).into(),
        stored_messages: row.stored_messages,
        head_partition: row.head_partition.unwrap_or_default(),
        head_offset: row.head_offset.unwrap_or_default(),
        head_work_order_id: row.wo_id.map(|id| id.to_string()).unwrap_or_default(),
        attempts: row.wo_attempts.unwrap_or_default().max(0) as u32,
        last_error: row.wo_last_error.clone().unwrap_or_default(),
        blocked_since: row.blocked_since.filter(|_| view.state == SetState::Blocked).map(timestamp),
        reason: view.reason.clone(),
        retry_at: row.retry_at.filter(|_| view.state == SetState::Waiting).map(timestamp),
        head_work_order_state: row.wo_state.as_deref().map(work_order_state_to_proto).unwrap_or_default().into(),
        claimed_until: row.claimed_until.map(timestamp),
    }
}
