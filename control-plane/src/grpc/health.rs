//! `grpc.health.v1.Health`: every public service, and the server as a whole
//! (`""`), is SERVING while this replica serves. A replica only listens
//! while it is the active one (standbys have no listener to ask), so the
//! one change to report is the end of a term: on step-down or shutdown every
//! name turns NOT_SERVING before the server starts draining, and is then
//! cleared, which ends open `Watch` streams (after they saw NOT_SERVING) so
//! that they do not hold the drain open.

use kt_proto::v1::dead_letter_service_server::DeadLetterServiceServer;
use kt_proto::v1::event_service_server::EventServiceServer;
use kt_proto::v1::message_set_service_server::MessageSetServiceServer;
use kt_proto::v1::trigger_service_server::TriggerServiceServer;
use kt_proto::v1::work_order_service_server::WorkOrderServiceServer;
use tonic::server::NamedService;
use tonic_health::pb::health_server::{Health as HealthApi, HealthServer};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::{dead_letters, events, message_sets, triggers, work_orders};

/// The names health reports on: the whole server and each public service.
pub const REPORTED: [&str; 6] = [
    "",
    <TriggerServiceServer<triggers::TriggerHandler> as NamedService>::NAME,
    <MessageSetServiceServer<message_sets::MessageSetHandler> as NamedService>::NAME,
    <WorkOrderServiceServer<work_orders::WorkOrderHandler> as NamedService>::NAME,
    <EventServiceServer<events::EventHandler> as NamedService>::NAME,
    <DeadLetterServiceServer<dead_letters::DeadLetterHandler> as NamedService>::NAME,
];

/// The health service of one term, every name SERVING.
pub async fn serving() -> (Health, HealthServer<impl HealthApi>) {
    let (mut reporter, server) = tonic_health::server::health_reporter();
    // `""` starts SERVING; setting it again would make each Watch of it
    // repeat SERVING once.
    for name in REPORTED.into_iter().filter(|name| !name.is_empty()) {
        reporter.set_service_status(name, ServingStatus::Serving).await;
    }
    (Health { reporter }, server)
}

/// The handle that ends the term's health.
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// Reports every name NOT_SERVING, then clears them.
    pub async fn stop_serving(mut self) {
        for name in REPORTED {
            self.reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
        for name in REPORTED {
            self.reporter.clear_service_status(name).await;
        }
    }
}
