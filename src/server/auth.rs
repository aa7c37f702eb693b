//! Pull authentication: HTTP Basic credentials checked against an htpasswd file of bcrypt
//! entries (`NIXERY_AUTH_HTPASSWD`), as a layer in front of every route but the health checks.
//! The file is read again on SIGHUP.
//!
//! bcrypt runs on the blocking threads (tens of milliseconds a check), so what it answered is
//! remembered for a minute in two caches (a pull is tens of requests, and a client retrying a
//! wrong password should not cost bcrypt each time): one of verified credentials and one of
//! refused ones, so that a flood of wrong passwords never pushes out the logins of real users.
//! At most [`CHECKS_AT_ONCE`] checks run at once, and a client whose credentials were refused
//! lately waits for the few places such clients share ([`SUSPECT_CHECKS`]), one check at a
//! time, while a new login goes ahead: a flood of wrong guesses keeps neither the blocking
//! threads blob reads need, nor the users who know their password, waiting.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::server::metrics::METRICS;
use crate::sync::lock;

/// How long checked credentials are answered without running bcrypt again.
const CHECKED_FOR: Duration = Duration::from_secs(60);

/// Most verified credentials remembered at once (only other verified credentials push one out).
const VERIFIED_KEPT: NonZeroUsize = NonZeroUsize::new(1024).unwrap();

/// Most refused credentials remembered at once.
const REFUSED_KEPT: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// Most bcrypt checks running at once (each holds a blocking thread for tens of milliseconds).
const CHECKS_AT_ONCE: usize = 4;

/// Of [`CHECKS_AT_ONCE`], the most that suspect clients (see [`Lanes`]) run at once.
const SUSPECT_CHECKS: usize = 1;

/// How long a client whose credentials were refused stays suspect.
const SUSPECT_FOR: Duration = Duration::from_secs(60);

/// Most clients whose checks and refusals are remembered at once (a client pushed out starts
/// again as a new one).
const CLIENTS_KEPT: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// The cost (log2 of bcrypt's rounds) of the dummy hash when the file has no entry.
const DEFAULT_COST: u32 = 5;

/// A bcrypt hash of nothing anyone knows (cost 05, then the salt and the hash), checked for
/// unknown users at the cost of the file's costliest entry, so that a wrong user name takes as
/// long as a wrong password.
const NOBODY: &str = "$2y$05$xgB5j4vI3dvtdR33FFAFIuAcF2KNVUos0ygVbdmcX39EvQ.CghQkq";

/// The key credentials are remembered by: the sha256 of `user:password` as the client sent
/// them, so that spellings of one header (`basic`, extra spaces) are one entry.
type Key = [u8; 32];

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

/// One reading of an htpasswd file: its users and their bcrypt hashes.
#[derive(Debug)]
struct Users {
    hashes: HashMap<String, Arc<str>>,
    /// [`NOBODY`] at the cost of the costliest entry.
    dummy: Arc<str>,
    /// Which reading this is: a refusal holds for the reading it was checked against only.
    generation: u64,
}

impl Users {
    fn read(path: &Path, generation: u64) -> Result<Users, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|error| AuthError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mut hashes = HashMap::new();
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
            hashes.insert(user.to_owned(), Arc::from(hash));
        }
        Ok(Users::new(hashes, generation))
    }

    fn new(hashes: HashMap<String, Arc<str>>, generation: u64) -> Users {
        // bcrypt takes costs 4 to 31; an entry whose cost it cannot read never verifies.
        let costliest = hashes
            .values()
            .filter_map(|hash| hash.parse::<bcrypt::HashParts>().ok())
            .map(|parts| parts.get_cost())
            .filter(|cost| (4..=31).contains(cost))
            .max()
            .unwrap_or(DEFAULT_COST);
        let (_, salt_and_hash) = NOBODY.split_at("$2y$05$".len());
        Users {
            hashes,
            dummy: Arc::from(format!("$2y${costliest:02}${salt_and_hash}")),
            generation,
        }
    }

    /// Whether `user` still has `hash`.
    fn has(&self, user: &str, hash: &str) -> bool {
        self.hashes.get(user).is_some_and(|h| **h == *hash)
    }
}

/// What bcrypt answered lately: verified and refused credentials, each in a cache of its own.
struct Memory {
    verified: lru::LruCache<Key, Verified>,
    refused: lru::LruCache<Key, Refused>,
}

/// Credentials bcrypt verified: when, and for which user and hash (they hold only while the
/// file gives that user that hash).
struct Verified {
    at: Instant,
    user: String,
    hash: Arc<str>,
}

/// Credentials bcrypt refused: when, and against which reading of the file.
struct Refused {
    at: Instant,
    generation: u64,
}

impl Memory {
    fn new() -> Memory {
        Memory {
            verified: lru::LruCache::new(VERIFIED_KEPT),
            refused: lru::LruCache::new(REFUSED_KEPT),
        }
    }

    /// What was answered for `key` in the last [`CHECKED_FOR`], if it still holds for `users`.
    fn recall(&mut self, key: &Key, users: &Users) -> Option<bool> {
        if let Some(verified) = self.verified.get(key)
            && verified.at.elapsed() < CHECKED_FOR
            && users.has(&verified.user, &verified.hash)
        {
            return Some(true);
        }
        if let Some(refused) = self.refused.get(key)
            && refused.at.elapsed() < CHECKED_FOR
            && refused.generation == users.generation
        {
            return Some(false);
        }
        None
    }

    fn verified(&mut self, key: Key, user: String, hash: Arc<str>) {
        self.refused.pop(&key);
        let at = Instant::now();
        self.verified.put(key, Verified { at, user, hash });
    }

    fn refused(&mut self, key: Key, generation: u64) {
        let at = Instant::now();
        self.refused.put(key, Refused { at, generation });
    }

    /// Forgets what does not hold for a new reading of the file: every refusal (a user may have
    /// been added), and the verified credentials of users removed or given another hash.
    fn reread(&mut self, users: &Users) {
        self.refused.clear();
        let stale: Vec<Key> = self
            .verified
            .iter()
            .filter(|(_, verified)| !users.has(&verified.user, &verified.hash))
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            self.verified.pop(&key);
        }
    }
}

/// Who runs bcrypt next. At most [`CHECKS_AT_ONCE`] checks run. A client with no refusal in the
/// last [`SUSPECT_FOR`] and no other check under way waits for a place only behind clients like
/// it. Any other client is suspect: it checks one set of credentials at a time, and suspect
/// clients take turns at [`SUSPECT_CHECKS`] places, so the others always find the rest free.
struct Lanes {
    checks: Arc<Semaphore>,
    suspect: Arc<Semaphore>,
    clients: Mutex<lru::LruCache<IpAddr, Arc<Client>>>,
}

/// What [`Lanes`] know of one client.
struct Client {
    /// Its checks under way or waiting.
    checking: AtomicUsize,
    /// When its credentials were last refused.
    refused_at: Mutex<Option<Instant>>,
    /// Its one suspect check that may run or wait for a place.
    turn: Arc<Semaphore>,
}

/// A place to run bcrypt, given back when dropped.
struct Place {
    _permits: Vec<OwnedSemaphorePermit>,
    _checking: Checking,
}

/// Counts a check in its client's `checking` while it lives.
struct Checking(Arc<Client>);

impl Drop for Checking {
    fn drop(&mut self) {
        self.0.checking.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Lanes {
    fn new() -> Lanes {
        Lanes {
            checks: Arc::new(Semaphore::new(CHECKS_AT_ONCE)),
            suspect: Arc::new(Semaphore::new(SUSPECT_CHECKS)),
            clients: Mutex::new(lru::LruCache::new(CLIENTS_KEPT)),
        }
    }

    fn client(&self, address: IpAddr) -> Arc<Client> {
        lock(&self.clients)
            .get_or_insert(client_key(address), || {
                Arc::new(Client {
                    checking: AtomicUsize::new(0),
                    refused_at: Mutex::new(None),
                    turn: Arc::new(Semaphore::new(1)),
                })
            })
            .clone()
    }

    /// Notes that credentials of the client at `address` were refused.
    fn refused(&self, address: IpAddr) {
        *lock(&self.client(address).refused_at) = Some(Instant::now());
    }

    /// Waits for a place to check credentials of the client at `address`.
    async fn place(&self, address: IpAddr) -> Option<Place> {
        let client = self.client(address);
        let others = client.checking.fetch_add(1, Ordering::SeqCst);
        let checking = Checking(client.clone());
        let refused_lately =
            (*lock(&client.refused_at)).is_some_and(|at| at.elapsed() < SUSPECT_FOR);
        let mut permits = Vec::with_capacity(3);
        if others > 0 || refused_lately {
            permits.push(client.turn.clone().acquire_owned().await.ok()?);
            permits.push(self.suspect.clone().acquire_owned().await.ok()?);
        }
        permits.push(self.checks.clone().acquire_owned().await.ok()?);
        Some(Place {
            _permits: permits,
            _checking: checking,
        })
    }
}

/// The client [`Lanes`] count a request from `address` as: the address, but an IPv6 address's
/// /64 network (one host is usually given a whole /64).
fn client_key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// The credentials a server takes.
pub struct Auth {
    path: PathBuf,
    users: RwLock<Arc<Users>>,
    /// Readings of the file so far.
    readings: AtomicU64,
    memory: Mutex<Memory>,
    lanes: Lanes,
}

impl Auth {
    /// Reads the htpasswd file at `path`.
    pub fn open(path: &Path) -> Result<Auth, AuthError> {
        let users = Users::read(path, 0)?;
        tracing::info!(path = %path.display(), users = users.hashes.len(), "pulls need credentials");
        Ok(Auth {
            path: path.to_path_buf(),
            users: RwLock::new(Arc::new(users)),
            readings: AtomicU64::new(1),
            memory: Mutex::new(Memory::new()),
            lanes: Lanes::new(),
        })
    }

    /// Reads the file again (SIGHUP): refusals are forgotten, and so are the verified
    /// credentials of users removed or given another password. A file that cannot be read
    /// leaves the users as they were.
    pub async fn reload(&self) {
        let path = self.path.clone();
        let generation = self.readings.fetch_add(1, Ordering::SeqCst);
        let read = tokio::task::spawn_blocking(move || Users::read(&path, generation))
            .await
            .unwrap_or_else(|panicked| {
                Err(AuthError::Read {
                    path: self.path.clone(),
                    error: std::io::Error::other(panicked),
                })
            });
        match read {
            Ok(users) => {
                METRICS.reloaded("htpasswd", true);
                tracing::info!(users = users.hashes.len(), "htpasswd file read again");
                let users = Arc::new(users);
                *self.users.write().unwrap_or_else(|e| e.into_inner()) = users.clone();
                lock(&self.memory).reread(&users);
            }
            Err(e) => {
                METRICS.reloaded("htpasswd", false);
                tracing::error!(error = %e, "htpasswd file not read again; the users stay")
            }
        }
    }

    /// Whether `headers` carry the Basic credentials of a user; `client` is the address the
    /// request comes from. Wrong credentials are counted (not their absence: every client's
    /// first request has none).
    pub async fn allows(&self, headers: &HeaderMap, client: IpAddr) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let allowed = match Credentials::parse(value.as_bytes()) {
            Some(credentials) => self.verify(&credentials, client).await,
            None => false,
        };
        if !allowed {
            METRICS.auth_failures.inc();
            self.lanes.refused(client);
        }
        allowed
    }

    fn users(&self) -> Arc<Users> {
        self.users.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Answers from memory, or runs bcrypt on `credentials` once there is a place for it.
    async fn verify(&self, credentials: &Credentials, client: IpAddr) -> bool {
        if let Some(allowed) = lock(&self.memory).recall(&credentials.key, &self.users()) {
            return allowed;
        }
        let Some(place) = self.lanes.place(client).await else {
            return false;
        };
        // Another request may have checked the same credentials meanwhile, or the file have
        // been read again.
        let users = self.users();
        if let Some(allowed) = lock(&self.memory).recall(&credentials.key, &users) {
            return allowed;
        }
        let (hash, known) = match users.hashes.get(&credentials.user) {
            Some(hash) => (hash.clone(), true),
            None => (users.dummy.clone(), false),
        };
        let password = credentials.password.clone();
        let checked = hash.clone();
        let verified = tokio::task::spawn_blocking(move || {
            // The place is given back when bcrypt is done, not when the client goes away.
            let _place = place;
            bcrypt::verify(password.as_bytes(), &checked).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let mut memory = lock(&self.memory);
        if known && verified {
            memory.verified(credentials.key, credentials.user.clone(), hash);
            true
        } else {
            memory.refused(credentials.key, users.generation);
            false
        }
    }
}

/// The user and password of a `Basic` `Authorization` value.
struct Credentials {
    user: String,
    password: String,
    key: Key,
}

impl Credentials {
    fn parse(value: &[u8]) -> Option<Credentials> {
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
        let key = Sha256::digest(decoded.as_bytes()).into();
        let (user, password) = decoded.split_once(':')?;
        Some(Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

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

    /// Writes `users` (user, password, bcrypt cost) into `path`.
    fn write(path: &Path, users: &[(&str, &str, u32)]) {
        let mut text = String::from("# users\n\n");
        for (user, password, cost) in users {
            let hash = bcrypt::hash(password, *cost).unwrap();
            text.push_str(&format!("{user}:{hash}\n"));
        }
        std::fs::write(path, text).unwrap();
    }

    fn dummy_cost(auth: &Auth) -> u32 {
        let dummy = auth.users().dummy.clone();
        // A dummy bcrypt could not read would be refused at once, which would tell.
        assert_eq!(bcrypt::verify("anything", &dummy).ok(), Some(false));
        dummy.parse::<bcrypt::HashParts>().unwrap().get_cost()
    }

    #[tokio::test]
    async fn only_the_right_password_of_a_listed_user_passes_and_a_reload_takes_effect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("secret", 4).unwrap();
        std::fs::write(&path, format!("# users\n\nalice:{hash}\n")).unwrap();
        let auth = Auth::open(&path).unwrap();
        assert!(auth.allows(&basic_header("alice", "secret"), HERE).await);
        // Again, from the cache of verified credentials.
        assert!(auth.allows(&basic_header("alice", "secret"), HERE).await);
        assert!(!auth.allows(&basic_header("alice", "wrong"), HERE).await);
        assert!(!auth.allows(&basic_header("bob", "secret"), HERE).await);
        assert!(!auth.allows(&HeaderMap::new(), HERE).await);
        assert!(!auth.allows(&headers("Bearer abc"), HERE).await);
        assert!(!auth.allows(&headers("Basic !!!"), HERE).await);

        std::fs::write(&path, format!("bob:{hash}\n")).unwrap();
        auth.reload().await;
        assert!(
            !auth.allows(&basic_header("alice", "secret"), HERE).await,
            "still cached"
        );
        assert!(auth.allows(&basic_header("bob", "secret"), HERE).await);
    }

    #[tokio::test]
    async fn refusals_never_push_out_verified_credentials_and_a_reload_forgets_only_changed_users()
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        write(
            &path,
            &[("alice", "a", 4), ("bob", "b", 4), ("carol", "c", 4)],
        );
        let auth = Auth::open(&path).unwrap();
        for (user, password) in [("alice", "a"), ("bob", "b"), ("carol", "c")] {
            assert!(auth.allows(&basic_header(user, password), HERE).await);
        }
        // Refusals checked by bcrypt land in their own cache...
        for i in 0..3 {
            let wrong = format!("wrong {i}");
            assert!(!auth.allows(&basic_header("alice", &wrong), HERE).await);
            assert!(!auth.allows(&basic_header("mallory", &wrong), HERE).await);
        }
        assert_eq!(lock(&auth.memory).verified.len(), 3);
        assert_eq!(lock(&auth.memory).refused.len(), 6);
        // ...which a flood of distinct wrong passwords fills many times over, as it would
        // (through bcrypt, that would take minutes), without pushing out a verified login.
        let users = auth.users();
        let flood = 2 * (REFUSED_KEPT.get() + VERIFIED_KEPT.get());
        for i in 0..flood {
            let key = Sha256::digest(format!("alice:wrong {i}")).into();
            lock(&auth.memory).refused(key, users.generation);
        }
        assert_eq!(lock(&auth.memory).refused.len(), REFUSED_KEPT.get());
        let key = |user: &str, password: &str| {
            Credentials::parse(format!("Basic {}", basic_value(user, password)).as_bytes())
                .unwrap()
                .key
        };
        for (user, password) in [("alice", "a"), ("bob", "b"), ("carol", "c")] {
            let recalled = lock(&auth.memory).recall(&key(user, password), &users);
            assert_eq!(recalled, Some(true), "{user} was pushed out");
        }

        // Alice stays, bob is removed, carol gets another password: only alice's login is
        // still remembered, and the others are refused at once.
        let alice = auth.users().hashes["alice"].clone();
        let carol = bcrypt::hash("new", 4).unwrap();
        std::fs::write(&path, format!("alice:{alice}\ncarol:{carol}\n")).unwrap();
        auth.reload().await;
        assert_eq!(lock(&auth.memory).verified.len(), 1);
        assert_eq!(lock(&auth.memory).refused.len(), 0);
        assert!(auth.allows(&basic_header("alice", "a"), HERE).await);
        assert!(!auth.allows(&basic_header("bob", "b"), HERE).await);
        assert!(!auth.allows(&basic_header("carol", "c"), HERE).await);
        assert!(auth.allows(&basic_header("carol", "new"), HERE).await);
        // A login verified against the old file is not taken for the new one, even when it
        // is remembered after the reload (a check that was under way during it).
        lock(&auth.memory).verified(
            key("bob", "b"),
            "bob".to_owned(),
            users.hashes["bob"].clone(),
        );
        assert!(!auth.allows(&basic_header("bob", "b"), HERE).await);
    }

    #[tokio::test]
    async fn the_dummy_hash_costs_what_the_costliest_entry_costs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        write(
            &path,
            &[("alice", "a", 4), ("bob", "b", 7), ("carol", "c", 5)],
        );
        let auth = Auth::open(&path).unwrap();
        assert_eq!(dummy_cost(&auth), 7);
        write(&path, &[("alice", "a", 4)]);
        auth.reload().await;
        assert_eq!(dummy_cost(&auth), 4);
        write(&path, &[]);
        auth.reload().await;
        assert_eq!(dummy_cost(&auth), DEFAULT_COST);
    }

    #[tokio::test]
    async fn a_client_without_refusals_finds_a_place_while_suspect_clients_wait() {
        let wait = Duration::from_millis(50);
        let address = |text: &str| text.parse::<IpAddr>().unwrap();
        let (a, b, c) = (
            address("10.0.0.1"),
            address("10.0.0.2"),
            address("10.0.0.3"),
        );
        let lanes = Lanes::new();
        lanes.refused(a);
        lanes.refused(b);
        let a_checks = lanes.place(a).await.unwrap();
        // A suspect client checks one set of credentials at a time; suspect clients share
        // SUSPECT_CHECKS places.
        assert!(tokio::time::timeout(wait, lanes.place(a)).await.is_err());
        assert!(tokio::time::timeout(wait, lanes.place(b)).await.is_err());
        // A client without refusals goes ahead; a second check of its own at the same time
        // counts as suspect.
        let c_checks = tokio::time::timeout(wait, lanes.place(c)).await.unwrap();
        assert!(tokio::time::timeout(wait, lanes.place(c)).await.is_err());
        // Places are bounded: CHECKS_AT_ONCE in all.
        let mut fresh = Vec::new();
        for i in 0..CHECKS_AT_ONCE - 2 {
            let client = address(&format!("10.0.1.{i}"));
            fresh.push(
                tokio::time::timeout(wait, lanes.place(client))
                    .await
                    .unwrap(),
            );
        }
        assert!(
            tokio::time::timeout(wait, lanes.place(address("10.0.2.1")))
                .await
                .is_err()
        );
        drop((c_checks, fresh));
        // The suspect place is taken until `a` is done, then `b` gets it.
        assert!(tokio::time::timeout(wait, lanes.place(b)).await.is_err());
        drop(a_checks);
        assert!(tokio::time::timeout(wait, lanes.place(b)).await.is_ok());

        // An IPv6 client is its /64; an IPv4 one seen over IPv6 is itself.
        lanes.refused(address("2001:db8:1:2::1"));
        let other = lanes.place(address("2001:db8:1:2:ffff::9")).await.unwrap();
        assert!(
            tokio::time::timeout(wait, lanes.place(address("2001:db8:1:2::7")))
                .await
                .is_err()
        );
        drop(other);
        lanes.refused(address("::ffff:10.0.3.1"));
        let v4 = lanes.place(address("10.0.3.1")).await.unwrap();
        assert!(
            tokio::time::timeout(wait, lanes.place(address("10.0.3.1")))
                .await
                .is_err()
        );
        drop(v4);
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

    fn basic_value(user: &str, password: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    }
}
