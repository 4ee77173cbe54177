//! `taskq migrate`: applies the PostgreSQL store's schema migrations ahead
//! of a deploy (servers also apply them at start, under the same advisory
//! lock, so running this is optional).

use std::process::ExitCode;

use clap::Args;

use crate::cli::exit::{EXIT_FAILURE, config_error};
use crate::server::{DEFAULT_SCHEMA, PostgresConfig, migrate};

/// `taskq migrate` flags.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The database: `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`.
    #[arg(long, env = "TASKQ_STORE")]
    pub store: String,
    /// The schema holding taskq's tables.
    #[arg(long, env = "TASKQ_STORE_SCHEMA", default_value = DEFAULT_SCHEMA)]
    pub store_schema: String,
}

/// Applies what the database lacks and says what it did.
pub async fn run(args: MigrateArgs) -> ExitCode {
    if !PostgresConfig::is_url(&args.store) {
        return config_error("--store (TASKQ_STORE): give a URL postgres://USER@HOST:PORT/DB");
    }
    let mut config = PostgresConfig::new(args.store);
    config.schema = args.store_schema;
    if let Err(problem) = config.validate() {
        return config_error(format!("--store: {problem}"));
    }
    match migrate(&config).await {
        Ok(applied) if applied.is_empty() => {
            println!("schema {} is up to date", config.schema);
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            let versions: Vec<String> = applied.iter().map(ToString::to_string).collect();
            println!(
                "schema {}: applied version {}",
                config.schema,
                versions.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("taskq: migrate failed: {error}; check --store and that the database is up");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
