//! Pull authentication: HTTP Basic credentials checked against an htpasswd file of bcrypt
//! entries (`NIXERY_AUTH_HTPASSWD`), as a layer in front of every route but the health checks.
//! bcrypt runs on the blocking threads (tens of milliseconds a check), and credentials verified
//! lately, and refused ones, are remembered for a short while (a pull is tens of requests, and
//! a client retrying a wrong password should not cost bcrypt each time); at most a few checks
//! run at once, so wrong guesses cannot take the blocking threads blob reads need. The file is
//! read again on SIGHUP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use sha2::{Digest as _, Sha256};

use crate::metrics::METRICS;
use crate::sync::lock;

/// How long checked credentials are answered without running bcrypt again.
const CHECKED_FOR: Duration = Duration::from_secs(60);

/// Most checked credentials remembered at once.
const CHECKED_KEPT: std::num::NonZeroUsize = std::num::NonZeroUsize::new(1024).unwrap();

/// Most bcrypt checks running at once (each holds a blocking thread for tens of milliseconds).
const CHECKS_AT_ONCE: usize = 4;

/// A bcrypt hash of nothing anyone knows, checked for unknown users so that a wrong user name
/// takes as long as a wrong password.
const NOBODY: &str = "$2y$05$xgB5j4vI3dvtdR33FFAFIuAcF2KNVUos0ygVbdmcX39EvQ.CghQkq";

/// Why the htpasswd file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("NIXERY_AUTH_HTPASSWD={path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "NIXERY_AUTH_HTPASSWD={path}, line {line}: not a `user:bcrypt-hash` entry (make entries with `htpasswd -B`)"
    )]
    Entry { path: PathBuf, line: usize },
}

/// The users of an htpasswd file and their bcrypt hashes.
#[derive(Debug, Default)]
struct Users(HashMap<String, String>);

impl Users {
    fn read(path: &Path) -> Result<Users, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|error| AuthError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let entry = line.split_once(':').filter(|(user, hash)| {
                !user.is_empty()
                    && ["$2a$", "$2b$", "$2y$"]
                        .iter()
                        .any(|prefix| hash.starts_with(prefix))
            });
            let Some((user, hash)) = entry else {
                return Err(AuthError::Entry {
                    path: path.to_path_buf(),
                    line: i + 1,
                });
            };
            users.insert(user.to_owned(), hash.to_owned());
        }
        Ok(Users(users))
    }
}

/// The credentials a server takes.
pub struct Auth {
    path: PathBuf,
    users: RwLock<Arc<Users>>,
    /// Credentials checked lately, by the sha256 of the `Authorization` value: when, and
    /// whether they were right.
    checked: Mutex<lru::LruCache<[u8; 32], (Instant, bool)>>,
    /// Places for bcrypt checks ([`CHECKS_AT_ONCE`]).
    checks: tokio::sync::Semaphore,
}

impl Auth {
    /// Reads the htpasswd file at `path`.
    pub fn open(path: &Path) -> Result<Auth, AuthError> {
        let users = Users::read(path)?;
        tracing::info!(path = %path.display(), users = users.0.len(), "pulls need credentials");
        Ok(Auth {
            path: path.to_path_buf(),
            users: RwLock::new(Arc::new(users)),
            checked: Mutex::new(lru::LruCache::new(CHECKED_KEPT)),
            checks: tokio::sync::Semaphore::new(CHECKS_AT_ONCE),
        })
    }

    /// Reads the file again (SIGHUP); what was checked before must be checked again. A file
    /// that cannot be read leaves the users as they were.
    pub async fn reload(&self) {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || Users::read(&path))
            .await
            .unwrap_or_else(|panicked| {
                Err(AuthError::Read {
                    path: self.path.clone(),
                    error: std::io::Error::other(panicked),
                })
            });
        match read {
            Ok(users) => {
                tracing::info!(users = users.0.len(), "htpasswd file read again");
                *self.users.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(users);
                lock(&self.checked).clear();
            }
            Err(e) => tracing::error!(error = %e, "htpasswd file not read again; the users stay"),
        }
    }

    /// Whether `headers` carry the Basic credentials of a user. Wrong credentials are counted
    /// (not their absence: every client's first request has none).
    pub async fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        let remembered = lock(&self.checked)
            .get(&key)
            .filter(|(at, _)| at.elapsed() < CHECKED_FOR)
            .map(|(_, allowed)| *allowed);
        let allowed = match remembered {
            Some(allowed) => allowed,
            None => {
                let allowed = self.check(value.as_bytes()).await;
                lock(&self.checked).put(key, (Instant::now(), allowed));
                allowed
            }
        };
        if !allowed {
            METRICS.auth_failures.inc();
        }
        allowed
    }

    /// Runs bcrypt on the credentials of `value`, when there is a place for it.
    async fn check(&self, value: &[u8]) -> bool {
        let Some((user, password)) = basic(value) else {
            return false;
        };
        let Ok(_place) = self.checks.acquire().await else {
            return false;
        };
        let users = self.users.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (hash, known) = match users.0.get(&user) {
            Some(hash) => (hash.clone(), true),
            None => (NOBODY.to_owned(), false),
        };
        let verified = tokio::task::spawn_blocking(move || {
            bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        known && verified
    }
}

/// The user and password of a `Basic` `Authorization` value.
fn basic(value: &[u8]) -> Option<(String, String)> {
    use base64::Engine as _;
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    fn basic_header(user: &str, password: &str) -> HeaderMap {
        use base64::Engine as _;
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        headers(&format!("Basic {encoded}"))
    }

    #[tokio::test]
    async fn only_the_right_password_of_a_listed_user_passes_and_a_reload_takes_effect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("secret", 4).unwrap();
        std::fs::write(&path, format!("# users\n\nalice:{hash}\n")).unwrap();
        let auth = Auth::open(&path).unwrap();
        assert!(auth.allows(&basic_header("alice", "secret")).await);
        // Again, from the cache of verified credentials.
        assert!(auth.allows(&basic_header("alice", "secret")).await);
        assert!(!auth.allows(&basic_header("alice", "wrong")).await);
        assert!(!auth.allows(&basic_header("bob", "secret")).await);
        assert!(!auth.allows(&HeaderMap::new()).await);
        assert!(!auth.allows(&headers("Bearer abc")).await);
        assert!(!auth.allows(&headers("Basic !!!")).await);

        std::fs::write(&path, format!("bob:{hash}\n")).unwrap();
        auth.reload().await;
        assert!(
            !auth.allows(&basic_header("alice", "secret")).await,
            "still cached"
        );
        assert!(auth.allows(&basic_header("bob", "secret")).await);
    }

    #[test]
    fn entries_that_are_not_bcrypt_are_refused_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        std::fs::write(
            &path,
            "alice:$2y$05$abc\nbob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n",
        )
        .unwrap();
        let err = Auth::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("line 2") && err.contains("htpasswd -B"),
            "{err}"
        );
        let err = Auth::open(&dir.path().join("missing"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("NIXERY_AUTH_HTPASSWD"), "{err}");
    }
}
