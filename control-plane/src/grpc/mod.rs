//! The gRPC server: public services, the node protocol, reflection and
//! health, behind the authentication layer, over TLS when configured.
//! Handlers are thin adapters: request to domain call to response, with
//! every domain error mapped to a status code in `errors.rs`.

mod auth;
mod convert;
mod dead_letters;
mod errors;
mod events;
pub mod health;
mod message_sets;
mod nodes;
mod peer;
mod triggers;
mod work;
mod work_orders;

use std::time::Duration;

use futures::Stream;
use kt_proto::internal::node_service_server::NodeServiceServer;
use kt_proto::internal::work_service_server::WorkServiceServer;
use kt_proto::v1::dead_letter_service_server::DeadLetterServiceServer;
use kt_proto::v1::event_service_server::EventServiceServer;
use kt_proto::v1::message_set_service_server::MessageSetServiceServer;
use kt_proto::v1::trigger_service_server::TriggerServiceServer;
use kt_proto::v1::work_order_service_server::WorkOrderServiceServer;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use auth::AuthLayer;
pub use convert::timestamp;

use crate::dead_letters::DeadLetterService;
use crate::nodes::SessionEnv;
use crate::sets::SetService;
use crate::work_orders::WorkOrderService;
use crate::AppState;

/// Serves until `shutdown` is cancelled, then drains in-flight calls. The
/// listener closes at once: a replica that stopped serving refuses new
/// connections (clients move on to the next replica) while it drains.
pub async fn serve(
    state: AppState,
    auth: AuthLayer,
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    heartbeat: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kt_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kt_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (health_state, health) = health::serving().await;

    let node_handler = nodes::NodeHandler {
        env: SessionEnv::new(
            state.triggers.clone(),
            state.pool.clone(),
            state.registry.clone(),
            state.connection_tests.clone(),
            heartbeat,
            shutdown.clone(),
        ),
        tasks: state.tasks.clone(),
    };

    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(auth)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(TriggerServiceServer::new(triggers::TriggerHandler { state: state.clone() }))
        .add_service(MessageSetServiceServer::new(message_sets::MessageSetHandler {
            sets: SetService::new(state.pool.clone(), state.scheduler.clone()),
        }))
        .add_service(WorkOrderServiceServer::new(work_orders::WorkOrderHandler {
            work_orders: WorkOrderService::new(state.pool.clone(), state.scheduler.clone()),
        }))
        .add_service(DeadLetterServiceServer::new(dead_letters::DeadLetterHandler {
            dead_letters: DeadLetterService::new(state.pool.clone(), state.scheduler.clone()),
        }))
        .add_service(EventServiceServer::new(events::EventHandler {
            hub: state.events.clone(),
            tasks: state.tasks.clone(),
        }))
        .add_service(NodeServiceServer::new(node_handler))
        .add_service(WorkServiceServer::new(work::WorkHandler {
            scheduler: state.scheduler.clone(),
            tasks: state.tasks.clone(),
        }))
        .serve_with_incoming_shutdown(accept_until(listener, shutdown.clone()), async move {
            shutdown.cancelled().await;
            // Before the drain: clients still connected learn at once that
            // this replica no longer serves.
            health_state.stop_serving().await;
        })
        .await?;
    Ok(())
}

/// The connections `listener` accepts until `stop`. The listener lives in a
/// task of its own and is dropped (its port closed) as soon as `stop` is
/// cancelled: the server stops polling its incoming stream on the shutdown
/// signal, so a listener inside the stream would stay open (and the port
/// taken) until every connection has drained.
fn accept_until(listener: TcpListener, stop: CancellationToken) -> impl Stream<Item = std::io::Result<TcpStream>> {
    let (accepted_tx, accepted_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted.map(|(stream, _)| stream),
            };
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                sent = accepted_tx.send(accepted) => if sent.is_err() { return },
            }
        }
    });
    futures::stream::unfold(accepted_rx, |mut rx| async move { rx.recv().await.map(|accepted| (accepted, rx)) })
}
