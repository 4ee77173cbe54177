//! The generated `taskq.v1` protobuf messages and gRPC stubs, and the
//! encoded descriptor set that server reflection serves. Nothing else.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("taskq.v1");

/// The encoded `FileDescriptorSet` of `proto/taskq/v1/taskq.proto` (with
/// its imports), for `grpc.reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/taskq_v1_descriptor.bin"));
