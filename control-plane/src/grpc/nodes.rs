//! `kafka_triggers.internal.v1.NodeService`: admits a node's session (its
//! hello, certificate and schema version) and hands it to
//! [`crate::nodes::Session`].

use std::pin::Pin;

use futures::Stream;
use kt_common::tasks::Supervisor;
use kt_proto::internal::node_service_server::NodeService;
use kt_proto::internal::{ControlMessage, NodeMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::peer::NodeIdentity;
use crate::nodes::{self, Session, SessionEnv, SESSION_OUTBOUND_CAPACITY};

pub struct NodeHandler {
    pub env: SessionEnv,
    /// Runs each session's task.
    pub tasks: Supervisor,
}

#[tonic::async_trait]
impl NodeService for NodeHandler {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

    async fn session(&self, req: Request<Streaming<NodeMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let certificate = NodeIdentity::of(&req);
        let mut inbound = req.into_inner();
        let node_id = nodes::admit(inbound.message().await?)?;
        NodeIdentity::admit(certificate.as_ref(), &node_id)?;
        let (tx, rx) = mpsc::channel(SESSION_OUTBOUND_CAPACITY);
        let session = Session::new(node_id, self.env.clone());
        self.tasks.spawn_isolated("node session", session.run(inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
