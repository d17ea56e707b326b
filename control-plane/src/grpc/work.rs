//! `kafka_triggers.internal.v1.WorkService`: a node's workers ask for sets
//! (credits), receive grants and report outcomes. The stream is a thin pipe
//! to the scheduler task.

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use kt_proto::internal::work_service_server::WorkService;
use kt_proto::internal::worker_message::Msg;
use kt_proto::internal::{WorkGrant, WorkerMessage};
use kt_proto::status::{invalid_argument, FieldViolation};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use kt_common::tasks::Supervisor;

use super::peer::NodeIdentity;
use crate::scheduler::{Scheduler, GRANT_CAPACITY};

pub struct WorkHandler {
    pub scheduler: Scheduler,
    /// Runs each stream's reader.
    pub tasks: Supervisor,
}

#[tonic::async_trait]
impl WorkService for WorkHandler {
    type WorkStream = Pin<Box<dyn Stream<Item = Result<WorkGrant, Status>> + Send>>;

    async fn work(&self, req: Request<Streaming<WorkerMessage>>) -> Result<Response<Self::WorkStream>, Status> {
        let certificate = NodeIdentity::of(&req);
        let mut inbound = req.into_inner();
        let node_id = match inbound.message().await? {
            Some(WorkerMessage { msg: Some(Msg::Hello(h)) }) if !h.node_id.trim().is_empty() => h.node_id,
            _ => {
                return Err(invalid_argument(&[FieldViolation::new(
                    "msg",
                    "the first message must be hello with a node_id",
                )]))
            }
        };
        NodeIdentity::admit(certificate.as_ref(), &node_id)?;
        let (tx, rx) = mpsc::channel(GRANT_CAPACITY);
        // A broken stream ends like a closed one: the node reconnects.
        let messages = Box::pin(futures::stream::unfold(inbound, |mut s| async move {
            s.message().await.ok().flatten().map(|m| (m, s))
        }));
        let scheduler = self.scheduler.clone();
        self.tasks.spawn_isolated("work stream", async move { scheduler.serve_stream(node_id, tx, messages).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}
