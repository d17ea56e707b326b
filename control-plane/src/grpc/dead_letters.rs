//! `kafka_triggers.v1.DeadLetterService`: parse, call the dead-letter
//! service, convert.

use kt_proto::v1::dead_letter_service_server::DeadLetterService as DeadLetterApi;
use kt_proto::v1::*;
use tonic::{Request, Response, Status};

use super::convert::{parse_id, timestamp};
use crate::dead_letters::{DeadLetterRow, DeadLetterService};

pub struct DeadLetterHandler {
    pub dead_letters: DeadLetterService,
}

#[tonic::async_trait]
impl DeadLetterApi for DeadLetterHandler {
    async fn list_dead_letters(
        &self,
        req: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let req = req.into_inner();
        let trigger = parse_id("trigger_id", &req.trigger_id)?;
        let (rows, next_page_token) = self.dead_letters.list(trigger, req.page_size, &req.page_token).await?;
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters: rows.iter().map(dead_letter_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_dead_letter(&self, req: Request<GetDeadLetterRequest>) -> Result<Response<DeadLetter>, Status> {
        let id = parse_id("id", &req.get_ref().id)?;
        Ok(Response::new(dead_letter_to_proto(&self.dead_letters.get(id).await?)))
    }

    async fn replay_dead_letter(
        &self,
        req: Request<ReplayDeadLetterRequest>,
    ) -> Result<Response<ReplayDeadLetterResponse>, Status> {
        let id = parse_id("id", &req.get_ref().id)?;
        let replayed = self.dead_letters.replay(id).await?;
        Ok(Response::new(ReplayDeadLetterResponse {
            set_id: replayed.set_id.to_string(),
            work_order_id: replayed.work_order_id.to_string(),
        }))
    }

    async fn delete_dead_letter(
        &self,
        req: Request<DeleteDeadLetterRequest>,
    ) -> Result<Response<DeleteDeadLetterResponse>, Status> {
        let id = parse_id("id", &req.get_ref().id)?;
        self.dead_letters.delete(id).await?;
        Ok(Response::new(DeleteDeadLetterResponse {}))
    }
}

fn dead_letter_to_proto(row: &DeadLetterRow) -> DeadLetter {
    let headers = row
        .header_names
        .iter()
        .zip(&row.header_values)
        .map(|(name, value)| DeadLetterHeader { name: name.clone(), value: value.clone() })
        .collect();
    DeadLetter {
        id: row.id.to_string(),
        trigger_id: row.trigger_id.to_string(),
        topic: row.topic.clone(),
        partition: row.partition,
        offset: row.offset,
        key: row.key.clone(),
        value: row.value.clone(),
        headers,
        timestamp: row.ts.map(timestamp),
        work_order_id: row.work_order_id.to_string(),
        attempts: row.attempts.max(0) as u32,
        last_error: row.last_error.clone().unwrap_or_default(),
        attempt_log: row.attempt_log.clone().unwrap_or_default(),
        create_time: Some(timestamp(row.created_at)),
        produced_topic: row.produced_topic.clone().unwrap_or_default(),
        produced_partition: row.produced_partition.unwrap_or_default(),
        produced_offset: row.produced_offset.unwrap_or_default(),
    }
}
