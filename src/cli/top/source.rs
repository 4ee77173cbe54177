//! Where `taskq top` gets its numbers: the status report the server's
//! HTTP listener serves (`GET <prefix>/status`, `Accept:
//! application/json`), the same the status page shows, over one HTTP/1.1
//! connection kept between refreshes and made again when it breaks.
//!
//! Every failure is a [`FetchError`] whose message says what to do next;
//! the dashboard shows it and tries again at the next refresh.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, HOST, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::cli::top::report::Report;

/// The largest report read: far above what a server sends (its worker
/// list is capped at 200), so only a wrong address reaches it.
const MAX_REPORT_BYTES: usize = 16 << 20;

/// The status report's address: `http://host:port` and the path of
/// `/status` under the server's `--http-path-prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusUrl {
    /// `host:port`, an IPv6 host in brackets.
    authority: String,
    /// `/status`, or `/prefix/status`.
    path: PathAndQuery,
}

impl StatusUrl {
    /// Reads an address as people write it: `http://host:port`, with or
    /// without the scheme, with the server's path prefix (`/taskq`) or the
    /// page's whole path (`/taskq/status`).
    ///
    /// # Errors
    /// A message saying what is wrong and how to write it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let full = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        let uri: Uri = full
            .parse()
            .map_err(|e| format!("{e}: write it like http://127.0.0.1:50052"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err("the server's HTTP listener speaks plain HTTP, and so does \
                            taskq top: write http://"
                    .into());
            }
            _ => return Err("write it like http://127.0.0.1:50052".into()),
        }
        let Some(authority) = uri.authority() else {
            return Err("no host: write it like http://127.0.0.1:50052".into());
        };
        let port = authority.port_u16().unwrap_or(80);
        let prefix = uri.path().trim_end_matches('/');
        let path = if prefix.ends_with("/status") {
            prefix.to_string()
        } else {
            format!("{prefix}/status")
        };
        let path = PathAndQuery::try_from(path).map_err(|e| format!("{e} in the path"))?;
        Ok(Self {
            authority: format!("{}:{port}", authority.host()),
            path,
        })
    }

    /// The HTTP listener of the server at `server` (a `--server` address,
    /// gRPC's) when it keeps the default HTTP port: the same host, port
    /// `http_port`, no path prefix.
    ///
    /// # Errors
    /// A message when `server` names no host.
    pub fn beside(server: &str, http_port: u16) -> Result<Self, String> {
        let rest = server.split_once("://").map_or(server, |(_, rest)| rest);
        let authority = rest.split('/').next().unwrap_or_default();
        let parsed: http::uri::Authority = authority
            .parse()
            .map_err(|e| format!("{e}: no host in --server {server:?}"))?;
        Self::parse(&format!("http://{}:{http_port}", parsed.host()))
    }
}

impl fmt::Display for StatusUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// Why a report could not be read: each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No connection, or it broke before the answer.
    #[error(
        "cannot reach {url}: {reason}. Is `taskq serve` running there with its HTTP listener \
         on (--http-listen)? Point --http at it"
    )]
    Unreachable {
        /// Where.
        url: String,
        /// The system's or hyper's reason.
        reason: String,
    },
    /// No whole answer in time.
    #[error("no answer from {url} within {timeout} (--timeout): the server or the network is slow")]
    TimedOut {
        /// Where.
        url: String,
        /// The deadline, as people write it.
        timeout: String,
    },
    /// 401: no token, or one the server does not know.
    #[error(
        "{url} refused: {message}. Give a monitor or admin token with --token-file or TASKQ_TOKEN"
    )]
    SignIn {
        /// Where.
        url: String,
        /// The server's reason.
        message: String,
    },
    /// 403: a known token that may not read the report.
    #[error("{url} refused this token: {message}")]
    Forbidden {
        /// Where.
        url: String,
        /// The server's reason.
        message: String,
    },
    /// 404: no status page there.
    #[error("no status page at {url}: check --http (and the server's --http-path-prefix)")]
    NotFound {
        /// Where.
        url: String,
    },
    /// Any other answer than 200.
    #[error("{url} answered {status}: {message}")]
    Refused {
        /// Where.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The server's reason.
        message: String,
    },
    /// A 200 that is not the status report.
    #[error("{url} answered, but not with taskq's status report: check --http")]
    NotAReport {
        /// Where.
        url: String,
    },
}

/// An open connection: the handle that sends requests and the task that
/// drives the socket, stopped when this is dropped.
struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Reads reports from one server.
pub struct StatusSource {
    url: StatusUrl,
    host: HeaderValue,
    authorization: Option<HeaderValue>,
    connect_timeout: Duration,
    timeout: Duration,
    connection: Option<Connection>,
}

impl StatusSource {
    /// A source that connects on its first fetch.
    ///
    /// # Errors
    /// A message when the token or the host cannot be sent in a header.
    pub fn new(
        url: StatusUrl,
        token: Option<&str>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, String> {
        let authorization = token
            .map(|token| {
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| "the token holds characters a header cannot carry")?;
                value.set_sensitive(true);
                Ok::<_, String>(value)
            })
            .transpose()?;
        let host = HeaderValue::from_str(&url.authority)
            .map_err(|_| "the host holds characters a header cannot carry")?;
        Ok(Self {
            url,
            host,
            authorization,
            connect_timeout,
            timeout,
            connection: None,
        })
    }

    /// The address reports come from.
    pub fn url(&self) -> &StatusUrl {
        &self.url
    }

    /// Reads one report, within `--timeout` (connecting included).
    ///
    /// # Errors
    /// A [`FetchError`] saying what went wrong and what to do.
    pub async fn fetch(&mut self) -> Result<Report, FetchError> {
        match tokio::time::timeout(self.timeout, self.exchange()).await {
            Ok(answer) => answer,
            Err(_) => {
                // A late answer would arrive on this connection: drop it.
                self.connection = None;
                Err(FetchError::TimedOut {
                    url: self.url.to_string(),
                    timeout: humantime::format_duration(self.timeout).to_string(),
                })
            }
        }
    }

    async fn exchange(&mut self) -> Result<Report, FetchError> {
        let mut connection = match self.connection.take() {
            Some(mut kept) => match kept.sender.ready().await {
                Ok(()) => kept,
                // Closed by the server (idle, restarted): a new one.
                Err(_) => self.connect().await?,
            },
            None => self.connect().await?,
        };
        let response = connection
            .sender
            .send_request(self.request())
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_REPORT_BYTES)
            .collect()
            .await
            .map_err(|e| self.unreachable(e))?
            .to_bytes();
        // Whole answer read: the connection can carry the next request.
        self.connection = Some(connection);
        let url = self.url.to_string();
        let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
        if status != StatusCode::OK {
            let message = json
                .as_ref()
                .and_then(|json| json["error"].as_str())
                .map_or_else(|| first_line(&body), str::to_string);
            return Err(match status {
                StatusCode::UNAUTHORIZED => FetchError::SignIn { url, message },
                StatusCode::FORBIDDEN => FetchError::Forbidden { url, message },
                StatusCode::NOT_FOUND => FetchError::NotFound { url },
                status => FetchError::Refused {
                    url,
                    status,
                    message,
                },
            });
        }
        json.as_ref()
            .and_then(|json| Report::from_json(json).ok())
            .ok_or(FetchError::NotAReport { url })
    }

    async fn connect(&self) -> Result<Connection, FetchError> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(&self.url.authority),
        )
        .await
        .map_err(|_| FetchError::Unreachable {
            url: self.url.to_string(),
            reason: format!(
                "no connection within {} (--connect-timeout)",
                humantime::format_duration(self.connect_timeout)
            ),
        })?
        .map_err(|e| self.unreachable(e))?;
        let _ = stream.set_nodelay(true);
        let (sender, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        let driver = tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes; a
            // broken connection shows at the next request.
            let _ = driver.await;
        });
        Ok(Connection { sender, driver })
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = Uri::from(self.url.path.clone());
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("taskq-top/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(value) = &self.authorization {
            headers.insert(AUTHORIZATION, value.clone());
        }
        request
    }

    fn unreachable(&self, reason: impl fmt::Display) -> FetchError {
        FetchError::Unreachable {
            url: self.url.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The first line of a non-JSON answer, short enough for one screen line.
fn first_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.lines().next().unwrap_or_default().trim();
    line.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_urls_read_as_people_write_them() {
        let url = |text| StatusUrl::parse(text).map(|u| u.to_string());
        assert_eq!(
            url("http://127.0.0.1:50052").unwrap(),
            "http://127.0.0.1:50052/status"
        );
        assert_eq!(
            url("localhost:8080/").unwrap(),
            "http://localhost:8080/status"
        );
        assert_eq!(
            url("http://ops.example/taskq").unwrap(),
            "http://ops.example:80/taskq/status"
        );
        assert_eq!(
            url("http://[::1]:50052/taskq/status").unwrap(),
            "http://[::1]:50052/taskq/status"
        );
        assert!(
            url("https://ops.example")
                .unwrap_err()
                .contains("plain HTTP")
        );
        assert!(url("ftp://ops.example").is_err());
        assert!(url("http://").is_err());
    }

    #[test]
    fn the_default_is_the_servers_host_on_the_http_port() {
        let beside = |server| StatusUrl::beside(server, 50052).map(|u| u.to_string());
        assert_eq!(
            beside("http://127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50052/status"
        );
        assert_eq!(
            beside("queue.internal:7000").unwrap(),
            "http://queue.internal:50052/status"
        );
        assert_eq!(
            beside("https://[::1]:50051").unwrap(),
            "http://[::1]:50052/status"
        );
        assert!(beside("http://").is_err());
    }

    /// Nothing listens on port 1 of loopback: the message says where and
    /// what to check.
    #[tokio::test]
    async fn an_unreachable_server_is_an_error_that_says_what_to_do() {
        let url = StatusUrl::parse("http://127.0.0.1:1").unwrap();
        let mut source =
            StatusSource::new(url, None, Duration::from_secs(5), Duration::from_secs(5)).unwrap();
        let error = source.fetch().await.unwrap_err().to_string();
        assert!(
            error.contains("cannot reach http://127.0.0.1:1/status"),
            "{error}"
        );
        assert!(error.contains("--http"), "{error}");
    }
}
