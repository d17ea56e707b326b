//! Compiles the `.proto` files with the vendored `protoc`, so a build needs no
//! system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "kafka_triggers/v1/triggers.proto",
        "kafka_triggers/v1/message_sets.proto",
        "kafka_triggers/v1/work_orders.proto",
        "kafka_triggers/v1/events.proto",
        "kafka_triggers/v1/dead_letters.proto",
        "kafka_triggers/internal/v1/node.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_build::configure()
        .file_descriptor_set_path(out.join("kafka_triggers_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
