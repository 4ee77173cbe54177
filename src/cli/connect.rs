//! The flags every client command shares: where the server is, the token,
//! and timeouts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::cli::exit::{EXIT_FAILURE, config_error};
use crate::client::{Client, ClientOptions, DEFAULT_SERVER};
use crate::config::ConfigError;
use crate::tls::{ClientTls, Identity, read_certificates};
use crate::units::parse_duration;

/// How to reach the server.
#[derive(Clone, Debug, Args)]
pub struct ClientArgs {
    /// Server address, e.g. http://127.0.0.1:50051 or host:port.
    #[arg(long, env = "TASKQ_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,

    /// File holding the bearer token: the first word of its first line that
    /// is not blank or a # comment, so the server's token file format works.
    /// The token can also come from TASKQ_TOKEN.
    #[arg(long, env = "TASKQ_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Longest time to connect.
    #[arg(long, env = "TASKQ_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Deadline of each call that does not wait for work (and of a put's
    /// wait for room in a full queue).
    #[arg(long, env = "TASKQ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// PEM CA certificate(s) to trust: connect with TLS and check the
    /// server's certificate against them.
    #[arg(long, env = "TASKQ_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,

    /// Name to check the server's certificate against (default: the host of
    /// --server).
    #[arg(long, env = "TASKQ_TLS_DOMAIN", requires = "tls_ca")]
    pub tls_domain: Option<String>,

    /// PEM client certificate, for servers that require mutual TLS.
    #[arg(long, env = "TASKQ_TLS_CLIENT_CERT", value_name = "PATH", requires_all = ["tls_client_key", "tls_ca"])]
    pub tls_client_cert: Option<PathBuf>,

    /// PEM private key of --tls-client-cert.
    #[arg(long, env = "TASKQ_TLS_CLIENT_KEY", value_name = "PATH")]
    #[arg(requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

impl ClientArgs {
    /// The client options, with the token loaded.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `--token-file` or `TASKQ_TOKEN`.
    pub fn options(&self) -> Result<ClientOptions, ConfigError> {
        let token = load_token(self.token_file.as_deref())?;
        Ok(ClientOptions {
            token,
            connect_timeout: self.connect_timeout,
            call_timeout: self.timeout,
            tls: self.tls()?,
        })
    }

    fn tls(&self) -> Result<Option<ClientTls>, ConfigError> {
        let Some(ca_path) = &self.tls_ca else {
            return Ok(None);
        };
        let ca = read_certificates(ca_path).map_err(|e| ConfigError {
            flag: "--tls-ca (TASKQ_TLS_CA)",
            message: e.to_string(),
        })?;
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => {
                Some(Identity::load(cert, key).map_err(|e| ConfigError {
                    flag: "--tls-client-cert/--tls-client-key",
                    message: e.to_string(),
                })?)
            }
            _ => None,
        };
        Ok(Some(ClientTls {
            ca: Some(ca),
            domain: self.tls_domain.clone(),
            identity,
        }))
    }

    /// Connects now; on failure prints why and returns the exit code.
    pub async fn connect(&self) -> Result<Client, ExitCode> {
        let options = self.options().map_err(config_error)?;
        Client::connect(&self.server, options).await.map_err(|e| {
            eprintln!("taskq: {e}");
            ExitCode::from(EXIT_FAILURE)
        })
    }

    /// A client that connects on first use and reconnects after outages.
    pub fn connect_lazy(&self) -> Result<Client, ExitCode> {
        let options = self.options().map_err(config_error)?;
        Client::connect_lazy(&self.server, options).map_err(config_error)
    }
}

/// The bearer token of a client command: from `token_file` when given
/// (the first word of its first line that is not blank or a # comment),
/// else from `TASKQ_TOKEN`; `None` when neither holds one.
///
/// # Errors
/// A `ConfigError` naming `--token-file` when the file cannot be read or
/// holds no token.
pub fn load_token(token_file: Option<&Path>) -> Result<Option<String>, ConfigError> {
    let Some(path) = token_file else {
        return Ok(std::env::var("TASKQ_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()));
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        flag: "--token-file (TASKQ_TOKEN_FILE)",
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    let token = crate::auth::client_token(&text).ok_or_else(|| ConfigError {
        flag: "--token-file (TASKQ_TOKEN_FILE)",
        message: format!("{} holds no token", path.display()),
    })?;
    Ok(Some(token.to_string()))
}
