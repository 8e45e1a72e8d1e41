//! Generates the gRPC client from the descriptors of Triton's `grpc_service.proto`
//! and `model_config.proto` that `proto/extract_descriptors.py` took from the
//! tritonclient wheel matching our tritonserver, so no `protoc` is needed.

use prost::Message;
use tonic_prost_build::FileDescriptorSet;

const DESCRIPTORS: &str = "proto/triton-grpc-2.51.0.binpb";

fn main() {
    println!("cargo:rerun-if-changed={DESCRIPTORS}");
    let bytes = std::fs::read(DESCRIPTORS).expect("reading Triton's gRPC descriptors");
    let descriptors =
        FileDescriptorSet::decode(bytes.as_slice()).expect("decoding Triton's gRPC descriptors");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)
        .expect("generating the Triton gRPC client");
}
