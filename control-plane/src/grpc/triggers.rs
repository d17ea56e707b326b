//! `kafka_triggers.v1.TriggerService`: parse, call the trigger service, convert.

use kt_proto::status::FieldViolation;
use kt_proto::v1::trigger_service_server::TriggerService as TriggerApi;
use kt_proto::v1::*;
use tonic::{Request, Response, Status};

use super::convert::{parse_id, required, trigger_to_proto};
use crate::triggers::ConnectionTarget;
use crate::AppState;

pub struct TriggerHandler {
    pub state: AppState,
}

#[tonic::async_trait]
impl TriggerApi for TriggerHandler {
    async fn create_trigger(&self, req: Request<CreateTriggerRequest>) -> Result<Response<Trigger>, Status> {
        let trigger = required("trigger", req.into_inner().trigger)?;
        let row = self.state.triggers.create(&trigger).await?;
        Ok(Response::new(trigger_to_proto(&row)))
    }

    async fn get_trigger(&self, req: Request<GetTriggerRequest>) -> Result<Response<Trigger>, Status> {
        let id = parse_id("id", &req.get_ref().id)?;
        Ok(Response::new(trigger_to_proto(&self.state.triggers.get(id).await?)))
    }

    async fn list_triggers(&self, req: Request<ListTriggersRequest>) -> Result<Response<ListTriggersResponse>, Status> {
        let req = req.into_inner();
        let (rows, next_page_token) = self.state.triggers.list(req.page_size, &req.page_token).await?;
        Ok(Response::new(ListTriggersResponse {
            triggers: rows.iter().map(trigger_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_trigger(&self, req: Request<UpdateTriggerRequest>) -> Result<Response<Trigger>, Status> {
        let req = req.into_inner();
        let trigger = required("trigger", req.trigger)?;
        let id = parse_id("trigger.id", &trigger.id)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let row = self.state.triggers.update(id, &trigger, &paths).await?;
        Ok(Response::new(trigger_to_proto(&row)))
    }

    async fn delete_trigger(
        &self,
        req: Request<DeleteTriggerRequest>,
    ) -> Result<Response<DeleteTriggerResponse>, Status> {
        let id = parse_id("id", &req.get_ref().id)?;
        self.state.triggers.delete(id).await?;
        Ok(Response::new(DeleteTriggerResponse {}))
    }

    async fn enable_trigger(&self, req: Request<EnableTriggerRequest>) -> Result<Response<Trigger>, Status> {
        let id = parse_id("id", &req.get_ref().id)?;
        Ok(Response::new(trigger_to_proto(&self.state.triggers.set_enabled(id, true).await?)))
    }

    async fn disable_trigger(&self, req: Request<DisableTriggerRequest>) -> Result<Response<Trigger>, Status> {
        let id = parse_id("id", &req.get_ref().id)?;
        Ok(Response::new(trigger_to_proto(&self.state.triggers.set_enabled(id, false).await?)))
    }

    async fn get_trigger_status(
        &self,
        req: Request<GetTriggerStatusRequest>,
    ) -> Result<Response<TriggerStatus>, Status> {
        let id = parse_id("id", &req.get_ref().id)?;
        let status = crate::triggers::status::trigger_status(&self.state.pool, &self.state.registry, id).await?;
        Ok(Response::new(status))
    }

    async fn test_trigger_connection(
        &self,
        req: Request<TestTriggerConnectionRequest>,
    ) -> Result<Response<TestTriggerConnectionResponse>, Status> {
        let req = req.into_inner();
        let target = match (req.id.trim().is_empty(), &req.trigger) {
            (true, Some(trigger)) => ConnectionTarget::Given(trigger),
            (false, None) => ConnectionTarget::Stored(parse_id("id", &req.id)?),
            _ => {
                let why = "set either id (a stored trigger) or trigger (one to test unsaved)";
                return Err(kt_proto::status::invalid_argument(&[FieldViolation::new("id", why)]));
            }
        };
        let trigger = self.state.triggers.connection_target(target).await?;
        Ok(Response::new(self.state.connection_tests.run(trigger).await?))
    }
}
