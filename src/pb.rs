//! The generated `taskq.v1` protobuf messages and gRPC stubs. Nothing else.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("taskq.v1");
