//! Data plane: stateless nodes that run one Kafka ingest pipeline per
//! assigned trigger and the workers that turn stored messages into work orders
//! delivered to each trigger's webhook.

pub mod delivery;
