//! Bearer-token authentication for the task-queue service.
//!
//! Tokens come from a file (one per line) or `TASKQ_TOKENS`, never from the
//! command line, where `ps` would show them. The interceptor compares the
//! presented token with every configured one in constant time, and its
//! error names no token.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The tokens a server accepts. Never printed: `Debug` shows only the count.
#[derive(Clone, Default)]
pub struct Tokens(Arc<[Box<[u8]>]>);

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

/// Why tokens could not be loaded.
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
    /// The source held no tokens.
    #[error("{origin} holds no tokens")]
    Empty {
        /// Where they were looked for.
        origin: String,
    },
}

impl Tokens {
    /// No tokens: every call is let through.
    pub fn none() -> Self {
        Self::default()
    }

    /// True when no token is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Reads a token file: one token per line; blank lines and lines
    /// starting with `#` are skipped, surrounding whitespace is trimmed.
    ///
    /// # Errors
    /// When the file cannot be read, holds no token, or a token has a
    /// character other than visible ASCII.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_iter(
            token_lines(&text),
            &format!("token file {}", path.display()),
        )
    }

    /// Parses a comma-separated list, as `TASKQ_TOKENS` holds.
    ///
    /// # Errors
    /// When the list holds no token or a token has a character other than
    /// visible ASCII.
    pub fn from_list(list: &str, origin: &str) -> Result<Self, TokenError> {
        let items = list.split(',').map(str::trim).filter(|t| !t.is_empty());
        Self::from_iter(items, origin)
    }

    fn from_iter<'a>(
        tokens: impl Iterator<Item = &'a str>,
        origin: &str,
    ) -> Result<Self, TokenError> {
        let mut all = Vec::new();
        for (i, token) in tokens.enumerate() {
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TokenError::BadCharacter {
                    index: i + 1,
                    origin: origin.into(),
                });
            }
            all.push(Box::from(token.as_bytes()));
        }
        if all.is_empty() {
            return Err(TokenError::Empty {
                origin: origin.into(),
            });
        }
        Ok(Self(all.into()))
    }

    /// Whether `presented` is one of the tokens. Every token is compared,
    /// each in constant time, so timing tells nothing about which matched
    /// or how much of one did.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |found, token| {
                found | token.as_ref().ct_eq(presented)
            })
            .into()
    }
}

/// The tokens of a token file: its lines, trimmed, without blank lines and
/// `#` comments. Servers accept every one; clients send the first.
pub fn token_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// The interceptor on the task-queue service: with tokens configured, a
/// call needs `authorization: Bearer <token>`, else UNAUTHENTICATED.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    tokens: Tokens,
}

impl TokenAuth {
    /// Checks calls against `tokens`; with none, lets every call through.
    pub fn new(tokens: Tokens) -> Self {
        Self { tokens }
    }
}

impl Interceptor for TokenAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.tokens.is_empty() {
            return Ok(request);
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        match presented {
            Some(token) if self.tokens.accepts(token) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "the bearer token is not accepted: check the token the client uses",
            )),
            None => Err(Status::unauthenticated(
                "this server requires a token: send metadata `authorization: Bearer <token>`",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut TokenAuth, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(value) = header {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        auth.call(request).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn checks_bearer_tokens() {
        let tokens = Tokens::from_list("alpha-token, beta-token", "test").unwrap();
        let mut auth = TokenAuth::new(tokens);
        assert_eq!(call(&mut auth, Some("Bearer alpha-token")), Ok(()));
        assert_eq!(call(&mut auth, Some("Bearer beta-token")), Ok(()));
        let denied = Err(tonic::Code::Unauthenticated);
        assert_eq!(call(&mut auth, Some("Bearer alpha")), denied);
        assert_eq!(call(&mut auth, Some("Bearer alpha-token2")), denied);
        assert_eq!(call(&mut auth, Some("alpha-token")), denied);
        assert_eq!(call(&mut auth, None), denied);
    }

    #[test]
    fn without_tokens_every_call_passes() {
        assert_eq!(call(&mut TokenAuth::new(Tokens::none()), None), Ok(()));
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
        assert_eq!(
            format!("{:?}", Tokens::from_list("secret", "x").unwrap()),
            "Tokens(1 configured)"
        );
    }

    #[test]
    fn token_files_skip_comments_and_blanks() {
        let dir = std::env::temp_dir().join(format!("taskq-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "# operators\n\n  first-token  \nsecond-token\n").unwrap();
        let tokens = Tokens::from_file(&path).unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens.accepts(b"first-token"));
        assert!(!tokens.accepts(b"# operators"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            Tokens::from_file(&path),
            Err(TokenError::Read { .. })
        ));
    }
}
