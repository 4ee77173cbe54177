//! The gRPC face of the broker: the only server code that knows protobuf.
//!
//! - [`service`]: the `taskq.v1.TaskQueue` service. Each handler checks
//!   access and hands the request to its call family.
//! - Call families, each converting, calling the broker and converting
//!   back: `tasks` (PutTask, PutTasks, GetTask, ExtendLease, PutResult),
//!   `worker_stream` (StreamTasks), `results` (GetResult, WatchResults,
//!   WatchResultBatches), `stats` (GetStats).
//! - `access`: the access checks and request helpers every family shares.
//! - `batch`: the one batch filler (tasks, results by queue, results by
//!   task ids). `outbound`: serving a response stream from a task.
//! - `convert`: wire types to engine types and back, in one place.
//! - `status`: engine errors to gRPC status codes, one table.
//! - `deadline`: how long a blocking call may wait, from `grpc-timeout`.
//! - `fuzz` (tests and the `fuzzing` feature only): the request fuzz
//!   target's harness.
//!
//! Imports go one way: `service` → families → `access`, `batch`,
//! `outbound`, `convert`; no family imports `service`.

mod access;
mod batch;
mod convert;
mod deadline;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
mod outbound;
mod results;
pub mod service;
mod stats;
mod status;
mod tasks;
mod worker_stream;

pub use service::TaskQueueService;
