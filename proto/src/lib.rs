//! The Kafka triggers wire contract: generated protobuf/gRPC code, the id
//! newtypes used on both planes, and the single table that maps our error
//! codes to gRPC status codes.

pub mod ids;
pub mod status;

/// Generated code, nested like the protobuf packages so cross-package
/// references resolve.
pub mod kafka_triggers {
    /// Public API, package `kafka_triggers.v1`.
    pub mod v1 {
        #![allow(clippy::all)]
        tonic::include_proto!("kafka_triggers.v1");
    }

    pub mod internal {
        /// Internal control-plane <-> data-plane protocol.
        pub mod v1 {
            #![allow(clippy::all)]
            tonic::include_proto!("kafka_triggers.internal.v1");
        }
    }
}

pub use kafka_triggers::internal::v1 as internal;
pub use kafka_triggers::v1;

/// Encoded `FileDescriptorSet` of every service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kafka_triggers_descriptor");
