//! The status page's sign-in sessions: a token exchanged once for a random
//! session id in an HttpOnly, SameSite=Strict cookie, so the token is
//! never kept by the browser. The token stays on the server beside the
//! id and is checked again on every request, so a token removed from the
//! token file (SIGHUP) ends its sessions at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The cookie's name.
pub const COOKIE: &str = "taskq_session";

/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Most sessions held; signing in past it ends the oldest.
const MAX_SESSIONS: usize = 1024;

#[derive(Debug)]
struct Session {
    token: Vec<u8>,
    expires: Instant,
}

/// The sessions signed in; a cheap-clone handle.
#[derive(Clone, Debug, Default)]
pub struct Sessions {
    /// Taken only by the page's requests, never by a call of the task
    /// queue.
    held: Arc<Mutex<HashMap<String, Session>>>,
}

impl Sessions {
    /// Opens a session for `token` (already checked); returns its id.
    pub fn open(&self, token: &[u8]) -> String {
        let id = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.retain(|_, session| session.expires > now);
        if held.len() >= MAX_SESSIONS
            && let Some(oldest) = held
                .iter()
                .min_by_key(|(_, session)| session.expires)
                .map(|(id, _)| id.clone())
        {
            held.remove(&oldest);
        }
        held.insert(
            id.clone(),
            Session {
                token: token.to_vec(),
                expires: now + SESSION_TTL,
            },
        );
        id
    }

    /// The token of a live session.
    pub fn token(&self, id: &str) -> Option<Vec<u8>> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(id)
            .filter(|session| session.expires > Instant::now())
            .map(|session| session.token.clone())
    }

    /// Ends a session.
    pub fn close(&self, id: &str) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

/// The value of `name` in an `application/x-www-form-urlencoded` body.
pub fn form_field(body: &[u8], name: &str) -> Option<Vec<u8>> {
    body.split(|b| *b == b'&').find_map(|pair| {
        let (key, value) = match pair.iter().position(|b| *b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        (percent_decode(key)? == name.as_bytes()).then(|| percent_decode(value))?
    })
}

fn percent_decode(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [*bytes.next()?, *bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b => out.push(b),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_cookies_are_read() {
        assert_eq!(
            form_field(b"a=1&token=t%2Bk+n%3D", "token").as_deref(),
            Some(&b"t+k n="[..])
        );
        assert_eq!(form_field(b"token", "token").as_deref(), Some(&b""[..]));
        assert_eq!(form_field(b"token=%zz", "token"), None);
        assert_eq!(form_field(b"other=1", "token"), None);
        assert_eq!(cookie("a=1; taskq_session=abc", COOKIE), Some("abc"));
        assert_eq!(cookie("taskq_sessionx=abc", COOKIE), None);
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_end_after_their_ttl_and_when_closed() {
        let sessions = Sessions::default();
        let id = sessions.open(b"token");
        assert_eq!(id.len(), 64);
        assert_eq!(sessions.token(&id).as_deref(), Some(&b"token"[..]));
        let other = sessions.open(b"token");
        sessions.close(&other);
        assert_eq!(sessions.token(&other), None);
        tokio::time::advance(SESSION_TTL).await;
        assert_eq!(sessions.token(&id), None);
    }
}
