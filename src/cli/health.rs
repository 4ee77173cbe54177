//! `taskq health`: exit 0 when the server is SERVING. For container
//! health checks and scripts.

use std::process::ExitCode;

use clap::Args;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::cli::connect::ClientArgs;
use crate::cli::exit::EXIT_FAILURE;

/// `taskq health` flags.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The service to ask about; "" is the server as a whole.
    #[arg(long, default_value = crate::pb::task_queue_server::SERVICE_NAME)]
    pub service: String,
}

/// Prints the serving status; exit 0 only when SERVING.
pub async fn run(args: HealthArgs) -> ExitCode {
    let client = match args.client.connect().await {
        Ok(client) => client,
        Err(code) => return code,
    };
    match client.health(&args.service).await {
        Ok(ServingStatus::Serving) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{}", status.as_str_name());
            ExitCode::from(EXIT_FAILURE)
        }
        Err(error) => {
            eprintln!("taskq: health check failed: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
