//! Pull authentication: HTTP Basic credentials checked against an htpasswd file of bcrypt
//! entries (`NIXERY_AUTH_HTPASSWD`), as a layer in front of every route but the health checks.
//! bcrypt runs on the blocking threads (tens of milliseconds a check), and credentials verified
//! lately are remembered for a short while, since a pull is tens of requests. The file is read
//! again on SIGHUP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use sha2::{Digest as _, Sha256};

use crate::metrics::METRICS;
use crate::sync::lock;

/// How long verified credentials are taken without running bcrypt again.
const VERIFIED_FOR: Duration = Duration::from_secs(60);

/// Most verified credentials remembered at once.
const VERIFIED_KEPT: std::num::NonZeroUsize = std::num::NonZeroUsize::new(1024).unwrap();

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
    /// Credentials verified lately, by the sha256 of the `Authorization` value, and when.
    verified: Mutex<lru::LruCache<[u8; 32], Instant>>,
}

impl Auth {
    /// Reads the htpasswd file at `path`.
    pub fn open(path: &Path) -> Result<Auth, AuthError> {
        let users = Users::read(path)?;
        tracing::info!(path = %path.display(), users = users.0.len(), "pulls need credentials");
        Ok(Auth {
            path: path.to_path_buf(),
            users: RwLock::new(Arc::new(users)),
            verified: Mutex::new(lru::LruCache::new(VERIFIED_KEPT)),
        })
    }

    /// Reads the file again (SIGHUP); what was verified before must be verified again. A file
    /// that cannot be read leaves the users as they were.
    pub fn reload(&self) {
        match Users::read(&self.path) {
            Ok(users) => {
                tracing::info!(users = users.0.len(), "htpasswd file read again");
                *self.users.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(users);
                lock(&self.verified).clear();
            }
            Err(e) => tracing::error!(error = %e, "htpasswd file not read again; the users stay"),
        }
    }

    /// Whether `headers` carry the Basic credentials of a user. Failures are counted.
    pub async fn allows(&self, headers: &HeaderMap) -> bool {
        let allowed = self.check(headers).await;
        if !allowed {
            METRICS.auth_failures.inc();
        }
        allowed
    }

    async fn check(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        if lock(&self.verified)
            .get(&key)
            .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
        {
            return true;
        }
        let Some((user, password)) = basic(value.as_bytes()) else {
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
        let allowed = known && verified;
        if allowed {
            lock(&self.verified).put(key, Instant::now());
        }
        allowed
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
        auth.reload();
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
