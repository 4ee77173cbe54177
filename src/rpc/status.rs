//! Engine errors to gRPC status codes: the whole mapping, at a glance.

use tonic::{Code, Status};

use crate::broker::BrokerError;

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        let code = match &error {
            BrokerError::InvalidQueueName { .. }
            | BrokerError::PayloadTooLarge { .. }
            | BrokerError::ResultTooLarge { .. }
            | BrokerError::InvalidArgument(_) => Code::InvalidArgument,
            BrokerError::QueueFull { .. } | BrokerError::LimitReached(_) => Code::ResourceExhausted,
            BrokerError::TaskNotFound(_) => Code::NotFound,
            BrokerError::StaleLease { .. } => Code::Aborted,
            BrokerError::TaskFinished(_) | BrokerError::Cancelled(_) => Code::FailedPrecondition,
            BrokerError::ResultConflict(_) => Code::AlreadyExists,
            BrokerError::ShuttingDown | BrokerError::StoreUnavailable { .. } => Code::Unavailable,
        };
        Status::new(code, error.to_string())
    }
}
