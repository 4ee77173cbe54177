//! Bearer tokens: who may call (authentication) and what each caller may
//! do (authorization).
//!
//! Tokens come from a file or `TASKQ_TOKENS`, never from the command line,
//! where `ps` would show them. Each line of a token file is
//! `TOKEN [ROLE [QUEUE,...]]`: a role (`producer`, `worker`, `monitor` or
//! `admin`)
//! and optionally the queues the token may touch. A line with only a token
//! means full access, so files written before roles keep working.
//!
//! The interceptor compares the presented token with every configured one
//! in constant time and attaches the caller's [`Access`] to the request;
//! the handlers check it against the call and its queue. No error, log
//! line or `Debug` output contains a token.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use subtle::{ConditionallySelectable, ConstantTimeEq};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::broker::QueueName;

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Puts tasks and reads results.
    Producer,
    /// Takes tasks, extends leases and reports results.
    Worker,
    /// Reads statistics and metrics (GetStats, `/metrics`), nothing else.
    Monitor,
    /// Everything.
    Admin,
}

impl Role {
    /// The name used in token files.
    pub fn name(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Worker => "worker",
            Role::Monitor => "monitor",
            Role::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "producer" => Some(Role::Producer),
            "worker" => Some(Role::Worker),
            "monitor" => Some(Role::Monitor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A call of `taskq.v1.TaskQueue`, or a read of the HTTP listener's
/// `/metrics`, for the authorization table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `PutTask`.
    PutTask,
    /// `PutTasks`.
    PutTasks,
    /// `GetResult`.
    GetResult,
    /// `WatchResults`.
    WatchResults,
    /// `WatchResultBatches`.
    WatchResultBatches,
    /// `GetTask`.
    GetTask,
    /// `StreamTasks`.
    StreamTasks,
    /// `ExtendLease`, unary or on a worker stream.
    ExtendLease,
    /// `PutResult`, unary or on a worker stream.
    PutResult,
    /// `GetStats`.
    GetStats,
    /// `CancelTask`.
    CancelTask,
    /// `PauseQueue`, `ResumeQueue` and `PurgeQueue`.
    ManageQueue,
    /// `GET /metrics` on the HTTP listener.
    ReadMetrics,
}

impl Call {
    /// Every call, for tables over them all.
    pub const ALL: [Self; 13] = [
        Self::PutTask,
        Self::PutTasks,
        Self::GetResult,
        Self::WatchResults,
        Self::WatchResultBatches,
        Self::GetTask,
        Self::StreamTasks,
        Self::ExtendLease,
        Self::PutResult,
        Self::GetStats,
        Self::CancelTask,
        Self::ManageQueue,
        Self::ReadMetrics,
    ];
}

impl Call {
    /// The role a call needs besides `admin`, which may make every call:
    /// the whole authorization table.
    fn role(self) -> Role {
        match self {
            Call::PutTask
            | Call::PutTasks
            | Call::GetResult
            | Call::WatchResults
            | Call::WatchResultBatches
            | Call::CancelTask => Role::Producer,
            Call::GetTask | Call::StreamTasks | Call::ExtendLease | Call::PutResult => Role::Worker,
            Call::GetStats | Call::ReadMetrics => Role::Monitor,
            Call::ManageQueue => Role::Admin,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Call::PutTask => "PutTask",
            Call::PutTasks => "PutTasks",
            Call::GetResult => "GetResult",
            Call::WatchResults => "WatchResults",
            Call::WatchResultBatches => "WatchResultBatches",
            Call::GetTask => "GetTask",
            Call::StreamTasks => "StreamTasks",
            Call::ExtendLease => "ExtendLease",
            Call::PutResult => "PutResult",
            Call::GetStats => "GetStats",
            Call::CancelTask => "CancelTask",
            Call::ManageQueue => "PauseQueue, ResumeQueue or PurgeQueue",
            Call::ReadMetrics => "/metrics",
        }
    }
}

/// What the caller of one request may do: the role and queues of its
/// token. The interceptor puts one in every request it lets through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    role: Role,
    /// `None`: every queue.
    queues: Option<Arc<[QueueName]>>,
}

impl Access {
    /// Every call on every queue: a token without a role, or a server
    /// without tokens.
    pub fn full() -> Self {
        Self {
            role: Role::Admin,
            queues: None,
        }
    }

    /// Access of `role` to `queues` (`None`: all).
    pub fn new(role: Role, queues: Option<Vec<QueueName>>) -> Self {
        Self {
            role,
            queues: queues.map(Arc::from),
        }
    }

    /// The token's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The queues the token is limited to; `None`: every queue.
    pub fn queues(&self) -> Option<&[QueueName]> {
        self.queues.as_deref()
    }

    /// Whether the token is limited to some queues; only then do calls
    /// that name a task rather than a queue need the task's queue.
    pub fn limits_queues(&self) -> bool {
        self.queues.is_some()
    }

    /// Checks that the role may make `call`.
    ///
    /// # Errors
    /// PERMISSION_DENIED naming the role the call needs.
    pub fn permit(&self, call: Call) -> Result<(), Status> {
        let needed = call.role();
        if self.role == Role::Admin || self.role == needed {
            return Ok(());
        }
        let with = if needed == Role::Admin {
            "an admin token".to_string()
        } else {
            format!("a {} or admin token", needed.name())
        };
        Err(Status::permission_denied(format!(
            "a {} token may not call {}: use {with}",
            self.role.name(),
            call.name()
        )))
    }

    /// Checks that the token may touch `queue`.
    ///
    /// # Errors
    /// PERMISSION_DENIED naming the queue.
    pub fn permit_queue(&self, queue: &QueueName) -> Result<(), Status> {
        match &self.queues {
            Some(queues) if !queues.contains(queue) => Err(Status::permission_denied(format!(
                "this token may not use queue {:?}: the token file lists the queues it may use",
                queue.as_str()
            ))),
            _ => Ok(()),
        }
    }
}

/// One token and what it may do.
struct Grant {
    token: Box<[u8]>,
    access: Access,
}

/// The tokens a server accepts, shared by every clone so that a reload
/// (`replace`) reaches all interceptors at once. Never printed: `Debug`
/// shows only the count.
#[derive(Clone)]
pub struct Tokens(Arc<RwLock<Arc<[Grant]>>>);

impl Default for Tokens {
    fn default() -> Self {
        Self(Arc::new(RwLock::new(Arc::from(Vec::new()))))
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tokens({} configured)", self.len())
    }
}

/// Why tokens could not be loaded. No variant holds a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A token has characters that cannot travel in a gRPC header.
    #[error("token {index} in {origin} has a character other than visible ASCII")]
    BadCharacter {
        /// Which token, from 1.
        index: usize,
        /// Where it came from.
        origin: String,
    },
    /// A line of a token file does not read `TOKEN [ROLE [QUEUE,...]]`.
    #[error("line {line} of {origin}: {message}")]
    BadLine {
        /// The line, from 1.
        line: usize,
        /// Where it came from.
        origin: String,
        /// What is wrong, without the token.
        message: String,
    },
    /// The source held no tokens.
    #[error("{origin} holds no tokens")]
    Empty {
        /// Where they were looked for.
        origin: String,
    },
}

impl Tokens {
    /// No tokens: every call is let through with full access.
    pub fn none() -> Self {
        Self::default()
    }

    fn current(&self) -> Arc<[Grant]> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// True when no token is configured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.current().len()
    }

    /// Reads a token file: one `TOKEN [ROLE [QUEUE,...]]` per line, fields
    /// separated by spaces, queues by commas; blank lines and lines
    /// starting with `#` are skipped.
    ///
    /// # Errors
    /// When the file cannot be read, holds no token, or a line is not of
    /// that form (an unknown role, a bad queue name, a token given twice,
    /// a character other than visible ASCII).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let origin = format!("token file {}", path.display());
        let mut grants = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: String| TokenError::BadLine {
                line: number + 1,
                origin: origin.clone(),
                message,
            };
            let mut fields = line.split_whitespace();
            let token = fields.next().unwrap_or_default();
            let role = match fields.next() {
                None => Role::Admin,
                Some(name) => Role::parse(name).ok_or_else(|| {
                    bad(format!(
                        "unknown role {name:?}: write producer, worker, monitor or admin"
                    ))
                })?,
            };
            let queues = match fields.next() {
                None => None,
                Some(list) => Some(
                    list.split(',')
                        .map(|name| match name {
                            "" => Err(bad("queue list: an empty queue name".into())),
                            name => {
                                QueueName::parse(name).map_err(|e| bad(format!("queue list: {e}")))
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            if fields.next().is_some() {
                return Err(bad(
                    "too many fields: write TOKEN [ROLE [QUEUE,...]] with queues separated \
                     by commas and no spaces"
                        .into(),
                ));
            }
            grants.push((token, Access::new(role, queues)));
        }
        Self::from_grants(grants, &origin)
    }

    /// Parses a comma-separated list, as `TASKQ_TOKENS` holds; each token
    /// has full access (roles and queue lists need a token file).
    ///
    /// # Errors
    /// When the list holds no token or a token has a character other than
    /// visible ASCII.
    pub fn from_list(list: &str, origin: &str) -> Result<Self, TokenError> {
        let grants = list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|token| (token, Access::full()))
            .collect();
        Self::from_grants(grants, origin)
    }

    fn from_grants(grants: Vec<(&str, Access)>, origin: &str) -> Result<Self, TokenError> {
        let mut all: Vec<Grant> = Vec::with_capacity(grants.len());
        for (i, (token, access)) in grants.into_iter().enumerate() {
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TokenError::BadCharacter {
                    index: i + 1,
                    origin: origin.into(),
                });
            }
            // One token with two meanings would be granted whichever came
            // first: refuse it rather than guess.
            if let Some(first) = all.iter().position(|g| *g.token == *token.as_bytes()) {
                return Err(TokenError::BadLine {
                    line: i + 1,
                    origin: origin.into(),
                    message: format!("token {} repeats token {}", i + 1, first + 1),
                });
            }
            all.push(Grant {
                token: token.as_bytes().into(),
                access,
            });
        }
        if all.is_empty() {
            return Err(TokenError::Empty {
                origin: origin.into(),
            });
        }
        Ok(Self(Arc::new(RwLock::new(all.into()))))
    }

    /// Puts the tokens of `other` in place of these, for every clone (the
    /// interceptors of a running server see them on their next call).
    pub fn replace(&self, other: &Tokens) {
        let fresh = other.current();
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = fresh;
    }

    /// What `presented` may do, if it is one of the tokens. Every token is
    /// compared, each in constant time, and the match is selected without
    /// a branch, so timing tells nothing about which matched or how much of
    /// one did.
    pub fn access(&self, presented: &[u8]) -> Option<Access> {
        Self::find(&self.current(), presented)
    }

    fn find(grants: &[Grant], presented: &[u8]) -> Option<Access> {
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, grant) in grants.iter().enumerate() {
            let matches = grant.token.as_ref().ct_eq(presented);
            // Fewer than 2^32 tokens: the file would not fit in memory.
            index.conditional_assign(&u32::try_from(i).unwrap_or(u32::MAX), matches);
            found |= matches;
        }
        bool::from(found).then(|| grants[index as usize].access.clone())
    }
}

/// The token a client sends, from a token file's text: the first field of
/// its first line that is not blank or a `#` comment, so a client can read
/// the same file format as the server.
pub fn client_token(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
}

/// The interceptor on the task-queue service: with tokens configured, a
/// call needs `authorization: Bearer <token>`, else UNAUTHENTICATED. Every
/// call let through carries its [`Access`] in the request's extensions.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    tokens: Tokens,
}

impl TokenAuth {
    /// Checks calls against `tokens`; with none, lets every call through
    /// with full access.
    pub fn new(tokens: Tokens) -> Self {
        Self { tokens }
    }
}

impl Interceptor for TokenAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let grants = self.tokens.current();
        let access = if grants.is_empty() {
            Access::full()
        } else {
            let presented = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
            match presented {
                Some(token) => Tokens::find(&grants, token).ok_or_else(|| {
                    Status::unauthenticated(
                        "the bearer token is not accepted: check the token the client uses",
                    )
                })?,
                None => {
                    return Err(Status::unauthenticated(
                        "this server requires a token: send metadata `authorization: Bearer <token>`",
                    ));
                }
            }
        };
        request.extensions_mut().insert(access);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut TokenAuth, header: Option<&str>) -> Result<Access, tonic::Code> {
        let mut request = Request::new(());
        if let Some(value) = header {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        auth.call(request)
            .map(|r| r.extensions().get::<Access>().cloned().unwrap())
            .map_err(|s| s.code())
    }

    fn write_file(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("taskq-auth-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn queue(name: &str) -> QueueName {
        QueueName::parse(name).unwrap()
    }

    #[test]
    fn checks_bearer_tokens() {
        let tokens = Tokens::from_list("alpha-token, beta-token", "test").unwrap();
        let mut auth = TokenAuth::new(tokens);
        assert_eq!(
            call(&mut auth, Some("Bearer alpha-token")),
            Ok(Access::full())
        );
        assert_eq!(
            call(&mut auth, Some("Bearer beta-token")),
            Ok(Access::full())
        );
        let denied = Err(tonic::Code::Unauthenticated);
        assert_eq!(call(&mut auth, Some("Bearer alpha")), denied);
        assert_eq!(call(&mut auth, Some("Bearer alpha-token2")), denied);
        assert_eq!(call(&mut auth, Some("Bearer ")), denied);
        assert_eq!(call(&mut auth, Some("bearer alpha-token")), denied);
        assert_eq!(call(&mut auth, Some("Bearer  alpha-token")), denied);
        assert_eq!(call(&mut auth, Some("alpha-token")), denied);
        assert_eq!(call(&mut auth, None), denied);
    }

    #[test]
    fn without_tokens_every_call_has_full_access() {
        assert_eq!(
            call(&mut TokenAuth::new(Tokens::none()), None),
            Ok(Access::full())
        );
    }

    #[test]
    fn token_lists_are_validated() {
        assert!(matches!(
            Tokens::from_list(" , ", "TASKQ_TOKENS"),
            Err(TokenError::Empty { .. })
        ));
        assert!(matches!(
            Tokens::from_list("good,bad token", "TASKQ_TOKENS"),
            Err(TokenError::BadCharacter { index: 2, .. })
        ));
        let repeated = Tokens::from_list("same-token,other,same-token", "TASKQ_TOKENS")
            .unwrap_err()
            .to_string();
        assert!(repeated.contains("token 3 repeats token 1"), "{repeated}");
        assert!(!repeated.contains("same-token"), "{repeated}");
        assert_eq!(
            format!("{:?}", Tokens::from_list("secret", "x").unwrap()),
            "Tokens(1 configured)"
        );
    }

    #[test]
    fn token_files_give_roles_and_queues() {
        let path = write_file(
            "roles",
            "# operators\n\n  full-token  \nput-token producer\n\
             work-token worker emails,thumbnails\nboss-token admin\n",
        );
        let tokens = Tokens::from_file(&path).unwrap();
        assert_eq!(tokens.len(), 4);
        assert_eq!(tokens.access(b"full-token"), Some(Access::full()));
        assert_eq!(
            tokens.access(b"put-token"),
            Some(Access::new(Role::Producer, None))
        );
        let worker = tokens.access(b"work-token").unwrap();
        assert_eq!(worker.role(), Role::Worker);
        assert!(worker.limits_queues());
        assert!(worker.permit_queue(&queue("emails")).is_ok());
        assert!(worker.permit_queue(&queue("thumbnails")).is_ok());
        assert_eq!(
            worker.permit_queue(&queue("billing")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(tokens.access(b"boss-token").unwrap().role(), Role::Admin);
        assert_eq!(tokens.access(b"# operators"), None);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        assert!(matches!(
            Tokens::from_file(&path),
            Err(TokenError::Read { .. })
        ));
    }

    #[test]
    fn bad_token_file_lines_name_the_line_not_the_token() {
        for (text, expected) in [
            ("ok-token\nsecret-token reader\n", "line 2"),
            ("secret-token worker bad/queue\n", "queue list"),
            ("secret-token worker a,,b\n", "queue list"),
            ("secret-token worker a b\n", "too many fields"),
            ("# only a comment\n", "holds no tokens"),
        ] {
            let path = write_file("bad", text);
            let message = Tokens::from_file(&path).unwrap_err().to_string();
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(!message.contains("secret-token"), "{message}");
            std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        }
    }

    #[test]
    fn roles_permit_their_calls_only() {
        use Call::*;
        let all = Call::ALL;
        let allowed = |role: Role| {
            all.iter()
                .copied()
                .filter(|c| Access::new(role, None).permit(*c).is_ok())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            allowed(Role::Producer),
            [
                PutTask,
                PutTasks,
                GetResult,
                WatchResults,
                WatchResultBatches,
                CancelTask
            ]
        );
        assert_eq!(
            allowed(Role::Worker),
            [GetTask, StreamTasks, ExtendLease, PutResult]
        );
        assert_eq!(allowed(Role::Monitor), [GetStats, ReadMetrics]);
        assert_eq!(allowed(Role::Admin), all);
        assert!(
            Access::new(Role::Producer, None)
                .permit(ManageQueue)
                .is_err()
        );
        let denied = Access::new(Role::Worker, None)
            .permit(GetStats)
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("admin token"),
            "{}",
            denied.message()
        );
    }

    #[test]
    fn a_reload_reaches_every_clone() {
        let tokens = Tokens::from_list("old-token", "test").unwrap();
        let mut auth = TokenAuth::new(tokens.clone());
        assert!(call(&mut auth, Some("Bearer old-token")).is_ok());
        tokens.replace(&Tokens::from_list("new-token", "test").unwrap());
        assert!(call(&mut auth, Some("Bearer old-token")).is_err());
        assert!(call(&mut auth, Some("Bearer new-token")).is_ok());
    }

    #[test]
    fn clients_send_the_first_field_of_the_first_line() {
        assert_eq!(
            client_token("# me\n\n  my-token worker jobs\nother\n"),
            Some("my-token")
        );
        assert_eq!(client_token("# nothing\n"), None);
    }
}
