//! The gRPC face of the broker: the only server code that knows protobuf.
//!
//! - [`service`]: the `taskq.v1.TaskQueue` handlers. Each validates and
//!   converts its request, calls the broker, and converts the answer back.
//! - `convert`: wire types to engine types and back, in one place.
//! - `status`: engine errors to gRPC status codes, one table.
//! - `deadline`: how long a blocking call may wait, from `grpc-timeout`.
//! - `streams`: PutTasks, StreamTasks and WatchResults.
//! - `fuzz` (tests and the `fuzzing` feature only): the request fuzz
//!   target's harness.

mod convert;
mod deadline;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod service;
mod status;
mod streams;

pub use deadline::{answer_margin, grpc_timeout};
pub use service::TaskQueueService;
