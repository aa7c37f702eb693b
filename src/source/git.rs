//! Git repositories as package sources, through the `git` program (it speaks every transport
//! a user's git does, with their ssh keys and credential helpers, and runs through the one
//! subprocess helper with its timeout and process group). Refs are resolved with
//! `git ls-remote`; each wanted commit is fetched alone and shallow (`--depth 1`: nixpkgs' whole
//! history is ~5 GB) into a bare mirror, and exported with `git archive`.
//!
//! Credentials in an http(s) URL (`https://user:token@host/repo`) never reach git's command
//! line, which any local user can read in `/proc/<pid>/cmdline`: git is given the URL without
//! them, and a credential helper for that host alone that reads them from git's environment
//! (see [`Credentials`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::{Commit, SourceError, redact};
use crate::command::{self, CommandError};

/// What a repository's refs point at.
#[derive(Debug, Default)]
pub struct Listing {
    /// The default branch's commit (`HEAD`).
    pub head: Option<Commit>,
    pub branches: BTreeMap<String, Commit>,
    /// Tags, annotated ones peeled to their commit.
    pub tags: BTreeMap<String, Commit>,
}

/// One repository and its mirror.
pub struct Git {
    /// The URL git is given: without credentials.
    url: String,
    credentials: Option<Credentials>,
    source: String,
    mirror: PathBuf,
    resolve_timeout: Duration,
    fetch_timeout: Duration,
    /// One fetch at a time: git's shallow bookkeeping does not take concurrent fetches.
    fetching: tokio::sync::Mutex<()>,
}

impl Git {
    /// The repository at `url`, mirrored under `dir`.
    pub fn new(
        url: String,
        dir: &Path,
        resolve_timeout: Duration,
        fetch_timeout: Duration,
    ) -> Self {
        let name = hex::encode(&Sha256::digest(url.as_bytes())[..8]);
        let (bare, credentials) = Credentials::split(&url);
        Git {
            source: redact(&url),
            mirror: dir.join(name),
            url: bare,
            credentials,
            resolve_timeout,
            fetch_timeout,
            fetching: tokio::sync::Mutex::default(),
        }
    }

    /// The repository's URL without credentials.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The repository's branches and tags, and `HEAD`.
    pub async fn list(&self) -> Result<Listing, SourceError> {
        let args = [
            "ls-remote",
            self.url.as_str(),
            "HEAD",
            "refs/heads/*",
            "refs/tags/*",
        ];
        let output =
            self.git(&args, self.resolve_timeout)
                .await
                .map_err(|e| SourceError::Unreachable {
                    url: self.source.clone(),
                    detail: failure(&e),
                })?;
        let listing = parse_listing(&String::from_utf8_lossy(&output.stdout));
        tracing::info!(
            repository = %self.source,
            head = ?listing.head.as_ref().map(Commit::as_str),
            branches = listing.branches.len(),
            tags = listing.tags.len(),
            "git refs resolved"
        );
        Ok(listing)
    }

    /// Writes the tree of `commit` as a tar file `out` (one top-level directory, the commit),
    /// fetching the commit first unless the mirror has it.
    pub async fn archive(&self, commit: &Commit, out: &Path) -> Result<(), SourceError> {
        let _one_at_a_time = self.fetching.lock().await;
        let mirror: OsString = self.mirror.clone().into();
        let git_dir = || -> Vec<OsString> { vec!["--git-dir".into(), mirror.clone()] };
        let disk = |e: CommandError| SourceError::Disk(format!("git mirror: {}", failure(&e)));
        if !self.mirror.join("HEAD").exists() {
            let mut args: Vec<OsString> = vec!["init".into(), "--quiet".into(), "--bare".into()];
            args.push(mirror.clone());
            self.git(&args, self.resolve_timeout).await.map_err(disk)?;
        }

        let object = format!("{commit}^{{commit}}");
        let mut has = git_dir();
        has.extend(["cat-file".into(), "-e".into(), object.clone().into()]);
        if self.git(&has, self.resolve_timeout).await.is_err() {
            let started = Instant::now();
            let mut fetch = git_dir();
            fetch.extend(
                [
                    "fetch",
                    "--quiet",
                    "--no-tags",
                    "--depth",
                    "1",
                    &self.url,
                    commit.as_str(),
                ]
                .map(OsString::from),
            );
            self.git(&fetch, self.fetch_timeout)
                .await
                .map_err(|e| self.fetch_error(commit, e))?;
            tracing::info!(repository = %self.source, %commit, elapsed_ms = started.elapsed().as_millis() as u64, "git commit fetched");
        }

        let mut archive = git_dir();
        archive.extend(["archive".into(), "--format=tar".into()]);
        archive.push(format!("--prefix={commit}/").into());
        archive.push("-o".into());
        archive.push(out.into());
        archive.push(commit.as_str().into());
        self.git(&archive, self.fetch_timeout).await.map_err(disk)?;
        Ok(())
    }

    fn fetch_error(&self, commit: &Commit, err: CommandError) -> SourceError {
        let stderr = err.stderr_tail();
        let unknown = [
            "not our ref",
            "couldn't find remote ref",
            "no such remote ref",
            "unadvertised object",
        ];
        if unknown.iter().any(|m| stderr.contains(m)) {
            return SourceError::UnknownCommit {
                commit: commit.clone(),
                url: self.source.clone(),
            };
        }
        match err {
            CommandError::Timeout { .. } => SourceError::Fetch {
                commit: commit.clone(),
                url: self.source.clone(),
                detail: format!(
                    "git fetch took longer than NIXERY_SOURCE_FETCH_TIMEOUT ({}s)",
                    self.fetch_timeout.as_secs()
                ),
            },
            err => SourceError::Unreachable {
                url: self.source.clone(),
                detail: failure(&err),
            },
        }
    }

    /// Runs git with `args`, never prompting for credentials, with English messages, and with
    /// the URL's credentials in its environment.
    async fn git<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
        timeout: Duration,
    ) -> Result<command::Output, CommandError> {
        let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let mut env = vec![
            ("GIT_TERMINAL_PROMPT".to_owned(), "0".to_owned()),
            ("LC_ALL".to_owned(), "C".to_owned()),
        ];
        if let Some(credentials) = &self.credentials {
            env.extend(credentials.env());
        }
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        command::run("git", &args, command::Env::Inherited(&env), timeout).await
    }
}

/// The user name and password of an http(s) URL, given to git through its environment: a
/// credential helper configured for the URL's scheme, host and port only (with
/// `GIT_CONFIG_COUNT`, git 2.31 and later), which prints them from two environment variables.
/// The helper runs as `sh -c '<helper>'`, so only the variables' names are on a command line;
/// it replaces any other helper for that host, and git sends them only to that host, when it
/// asks for credentials, as with credentials in the URL.
struct Credentials {
    /// `https://host:port`, what git matches `credential.<url>.*` settings against.
    scope: String,
    username: String,
    password: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// The helper: answers `get` with the credentials, ignores `store` and `erase`.
const CREDENTIAL_HELPER: &str = r#"!f() { test "$1" = get || return 0; printf 'username=%s\n' "$NIXERY_GIT_USERNAME"; test -z "${NIXERY_GIT_PASSWORD+set}" || printf 'password=%s\n' "$NIXERY_GIT_PASSWORD"; }; f"#;

impl Credentials {
    /// `url` without the credentials its user information (the part of the authority before
    /// its last `@`) holds, and those credentials, for an http or https URL; other URLs
    /// unchanged (ssh authenticates with keys, and its user name is no secret).
    fn split(url: &str) -> (String, Option<Credentials>) {
        let Some((scheme, rest)) = url.split_once("://") else {
            return (url.to_owned(), None);
        };
        if !["http", "https"].contains(&scheme.to_ascii_lowercase().as_str()) {
            return (url.to_owned(), None);
        }
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let Some((userinfo, host)) = authority.rsplit_once('@') else {
            return (url.to_owned(), None);
        };
        let decode = |text: &str| {
            percent_encoding::percent_decode_str(text)
                .decode_utf8_lossy()
                .into_owned()
        };
        let (username, password) = match userinfo.split_once(':') {
            Some((user, password)) => (decode(user), Some(decode(password))),
            None => (decode(userinfo), None),
        };
        let credentials = Credentials {
            scope: format!("{scheme}://{host}"),
            username,
            password,
        };
        (format!("{scheme}://{host}{path}"), Some(credentials))
    }

    /// The environment that gives git these credentials (after any `GIT_CONFIG_COUNT` settings
    /// the server was started with).
    fn env(&self) -> Vec<(String, String)> {
        let inherited: usize = std::env::var("GIT_CONFIG_COUNT")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let helper = format!("credential.{}.helper", self.scope);
        // An empty helper first clears the helpers configured before.
        let settings = [(helper.clone(), ""), (helper, CREDENTIAL_HELPER)];
        let mut env = vec![
            (
                "GIT_CONFIG_COUNT".to_owned(),
                (inherited + settings.len()).to_string(),
            ),
            ("NIXERY_GIT_USERNAME".to_owned(), self.username.clone()),
        ];
        if let Some(password) = &self.password {
            env.push(("NIXERY_GIT_PASSWORD".to_owned(), password.clone()));
        }
        for (i, (key, value)) in settings.into_iter().enumerate() {
            env.push((format!("GIT_CONFIG_KEY_{}", inherited + i), key));
            env.push((
                format!("GIT_CONFIG_VALUE_{}", inherited + i),
                value.to_owned(),
            ));
        }
        env
    }
}

/// What a failed git command said, in one line: its last `fatal:` or `error:` line.
fn failure(err: &CommandError) -> String {
    let stderr = err.stderr_tail();
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("fatal:") || l.starts_with("error:"))
        .map(|l| redact(l.trim()))
        .unwrap_or_else(|| redact(&err.to_string()))
}

/// Reads `git ls-remote` output: `<commit>\t<ref>` lines, `<tag>^{}` giving an annotated tag's
/// commit.
fn parse_listing(text: &str) -> Listing {
    let mut listing = Listing::default();
    let mut peeled = BTreeMap::new();
    for line in text.lines() {
        let Some((hash, name)) = line.split_once('\t') else {
            continue;
        };
        let Some(commit) = Commit::parse(hash) else {
            continue;
        };
        if name == "HEAD" {
            listing.head = Some(commit);
        } else if let Some(branch) = name.strip_prefix("refs/heads/") {
            listing.branches.insert(branch.to_owned(), commit);
        } else if let Some(tag) = name.strip_prefix("refs/tags/") {
            match tag.strip_suffix("^{}") {
                Some(tag) => {
                    peeled.insert(tag.to_owned(), commit);
                }
                None => {
                    listing.tags.insert(tag.to_owned(), commit);
                }
            }
        }
    }
    listing.tags.extend(peeled);
    listing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotated_tags_are_peeled() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let c = "c".repeat(40);
        let text = format!(
            "{a}\tHEAD\n{a}\trefs/heads/main\n{b}\trefs/heads/feature/x\n{b}\trefs/tags/v1\n{c}\trefs/tags/v2\n{a}\trefs/tags/v2^{{}}\n"
        );
        let listing = parse_listing(&text);
        assert_eq!(listing.head.as_ref().map(Commit::as_str), Some(a.as_str()));
        assert_eq!(listing.branches["feature/x"].as_str(), b);
        assert_eq!(listing.tags["v1"].as_str(), b);
        assert_eq!(listing.tags["v2"].as_str(), a);
    }

    #[test]
    fn failures_keep_the_fatal_line_without_credentials() {
        let status = std::process::Command::new("false").status().unwrap();
        let err = CommandError::Failed {
            command: "git ls-remote".into(),
            status,
            stderr_tail: "warning: x\nfatal: unable to access 'https://u:secret@example.com/r/': Could not resolve host\n".into(),
        };
        assert_eq!(
            failure(&err),
            "fatal: unable to access 'https://example.com/r/': Could not resolve host"
        );
    }

    #[test]
    fn credentials_are_taken_out_of_http_urls() {
        let split = |url: &str| {
            let (bare, credentials) = Credentials::split(url);
            let credentials = credentials.map(|c| (c.scope, c.username, c.password));
            (bare, credentials)
        };
        let some = |scope: &str, user: &str, password: Option<&str>| {
            Some((
                scope.to_owned(),
                user.to_owned(),
                password.map(str::to_owned),
            ))
        };
        // An `@` in the password: the user information ends at the authority's last `@`.
        assert_eq!(
            split("https://user:p@ss@example.com/nixpkgs.git"),
            (
                "https://example.com/nixpkgs.git".to_owned(),
                some("https://example.com", "user", Some("p@ss"))
            )
        );
        assert_eq!(
            split("HTTP://us%65r:p%40ss%3Aw@127.0.0.1:8080/r?x=a@b"),
            (
                "HTTP://127.0.0.1:8080/r?x=a@b".to_owned(),
                some("HTTP://127.0.0.1:8080", "user", Some("p@ss:w"))
            )
        );
        assert_eq!(
            split("https://token@example.com"),
            (
                "https://example.com".to_owned(),
                some("https://example.com", "token", None)
            )
        );
        for unchanged in [
            "https://example.com/a@b.git",
            "ssh://git@example.com/nixpkgs.git",
            "git@github.com:NixOS/nixpkgs",
            "file:///srv/nixpkgs",
            "/srv/nixpkgs",
        ] {
            assert_eq!(
                split(unchanged),
                (unchanged.to_owned(), None),
                "{unchanged}"
            );
        }
    }

    /// Lists and fetches with credentials from a real git smart-HTTP server that asks for them,
    /// which looks at every process's command line while git talks to it.
    #[tokio::test]
    async fn credentials_reach_git_through_its_environment_never_a_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let commit = http::repository(&dir.path().join("root/nixpkgs"));
        let remote = http::Remote::start(dir.path().join("root"), "nix-user", "s3cr@t-w0rd").await;
        // The password as an operator may write it, `@` and all, and percent-encoded.
        for (i, userinfo) in ["nix-user:s3cr@t-w0rd", "nix-user:s3cr%40t-w0rd"]
            .into_iter()
            .enumerate()
        {
            let git = Git::new(
                remote.url(userinfo),
                &dir.path().join(format!("mirrors{i}")),
                Duration::from_secs(30),
                Duration::from_secs(60),
            );
            assert_eq!(git.source(), remote.url(""));
            let listing = git.list().await.unwrap();
            assert_eq!(listing.head.as_ref(), Some(&commit));
            let tar = dir.path().join(format!("tree{i}.tar"));
            git.archive(&commit, &tar).await.unwrap();
            let mut archive = tar::Archive::new(std::fs::File::open(&tar).unwrap());
            let names: Vec<String> = archive
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().display().to_string())
                .collect();
            assert!(
                names.contains(&format!("{commit}/default.nix")),
                "{names:?}"
            );
        }
        let seen = remote.seen();
        // The look is real: git's own processes were seen, with the URL they were given.
        assert!(seen.git >= 4, "git's command lines were not seen: {seen:?}");
        assert_eq!(
            seen.secret,
            Vec::<String>::new(),
            "the password on a command line"
        );

        // A wrong password: refused, and the error does not repeat it.
        let git = Git::new(
            remote.url("nix-user:wr0ng@pw"),
            &dir.path().join("mirrors-wrong"),
            Duration::from_secs(30),
            Duration::from_secs(60),
        );
        let err = git.list().await.unwrap_err().to_string();
        assert!(
            !err.contains("wr0ng") && err.contains("Authentication failed"),
            "{err}"
        );
    }

    /// A git smart-HTTP server for tests: `git http-backend` as a CGI program behind HTTP Basic
    /// authentication.
    mod http {
        use std::path::{Path, PathBuf};
        use std::sync::{Arc, Mutex};

        use axum::body::Body;
        use axum::extract::{Request, State};
        use axum::http::{HeaderMap, StatusCode, header};
        use axum::response::{IntoResponse, Response};
        use base64::Engine as _;
        use tokio::io::AsyncWriteExt;

        use crate::source::Commit;

        /// A repository at `path` with one commit; returns it.
        pub fn repository(path: &Path) -> Commit {
            std::fs::create_dir_all(path).unwrap();
            std::fs::write(path.join("default.nix"), "{ ... }: { }\n").unwrap();
            let git = |args: &[&str]| {
                let output = std::process::Command::new("git")
                    .arg("-C")
                    .arg(path)
                    .args(["-c", "user.name=t", "-c", "user.email=t@nixery.invalid"])
                    .args(args)
                    .output()
                    .expect("git runs (apt-get install git)");
                assert!(output.status.success(), "git {args:?}: {output:?}");
                String::from_utf8(output.stdout).unwrap().trim().to_owned()
            };
            git(&["init", "--quiet", "--initial-branch=main"]);
            git(&["config", "uploadpack.allowReachableSHA1InWant", "true"]);
            git(&["add", "--all"]);
            git(&["commit", "--quiet", "-m", "one"]);
            Commit::parse(&git(&["rev-parse", "HEAD"])).unwrap()
        }

        /// What the server saw on processes' command lines while it answered.
        #[derive(Debug, Default, Clone)]
        pub struct Seen {
            /// Command lines holding the server's address (git's, for one).
            pub git: usize,
            /// Command lines holding the password, as written or percent-encoded.
            pub secret: Vec<String>,
        }

        struct Shared {
            root: PathBuf,
            authorization: String,
            password: String,
            address: String,
            seen: Mutex<Seen>,
        }

        pub struct Remote {
            shared: Arc<Shared>,
            task: tokio::task::JoinHandle<()>,
        }

        impl Drop for Remote {
            fn drop(&mut self) {
                self.task.abort();
            }
        }

        impl Remote {
            /// Serves the repositories under `root` to `user` with `password`.
            pub async fn start(root: PathBuf, user: &str, password: &str) -> Remote {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let address = listener.local_addr().unwrap().to_string();
                let basic =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                let shared = Arc::new(Shared {
                    root,
                    authorization: format!("Basic {basic}"),
                    password: password.to_owned(),
                    address,
                    seen: Mutex::default(),
                });
                let app = axum::Router::new()
                    .fallback(serve)
                    .with_state(shared.clone());
                let task = tokio::spawn(async move {
                    axum::serve(listener, app).await.unwrap();
                });
                Remote { shared, task }
            }

            /// `http://<userinfo>@<address>/nixpkgs` (no `@` when `userinfo` is empty).
            pub fn url(&self, userinfo: &str) -> String {
                let at = if userinfo.is_empty() { "" } else { "@" };
                format!("http://{userinfo}{at}{}/nixpkgs", self.shared.address)
            }

            pub fn seen(&self) -> Seen {
                self.shared.seen.lock().unwrap().clone()
            }
        }

        /// Every process's command line, its arguments joined by spaces.
        fn command_lines() -> Vec<String> {
            let mut lines = Vec::new();
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                if let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) {
                    let line: Vec<u8> = bytes
                        .into_iter()
                        .map(|b| if b == 0 { b' ' } else { b })
                        .collect();
                    lines.push(String::from_utf8_lossy(&line).into_owned());
                }
            }
            lines
        }

        async fn serve(State(shared): State<Arc<Shared>>, request: Request) -> Response {
            {
                let lines = command_lines();
                let encoded = shared.password.replace('@', "%40");
                let mut seen = shared.seen.lock().unwrap();
                seen.git += lines.iter().filter(|l| l.contains(&shared.address)).count();
                seen.secret.extend(
                    lines
                        .into_iter()
                        .filter(|l| l.contains(&shared.password) || l.contains(&encoded)),
                );
            }
            let authorized = request
                .headers()
                .get(header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes() == shared.authorization.as_bytes());
            if !authorized {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Basic realm=\"git\"")],
                )
                    .into_response();
            }
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 64 << 20).await.unwrap();
            let header = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            let mut child = tokio::process::Command::new("git")
                .arg("http-backend")
                .env("GIT_PROJECT_ROOT", &shared.root)
                .env("GIT_HTTP_EXPORT_ALL", "1")
                .env("PATH_INFO", parts.uri.path())
                .env("QUERY_STRING", parts.uri.query().unwrap_or_default())
                .env("REQUEST_METHOD", parts.method.as_str())
                .env("CONTENT_TYPE", header("content-type"))
                .env("CONTENT_LENGTH", body.len().to_string())
                .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
                .env("HTTP_GIT_PROTOCOL", header("git-protocol"))
                .env("REMOTE_USER", "nix-user")
                .env("REMOTE_ADDR", "127.0.0.1")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("git http-backend runs");
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(&body).await.unwrap();
            drop(stdin);
            let output = child.wait_with_output().await.unwrap();
            cgi_response(&output.stdout)
        }

        /// A CGI program's output as a response: its header lines (`Status:` among them), a
        /// blank line, the body.
        fn cgi_response(output: &[u8]) -> Response {
            let end = output
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("CGI headers");
            let mut status = StatusCode::OK;
            let mut headers = HeaderMap::new();
            for line in String::from_utf8_lossy(&output[..end]).split("\r\n") {
                let (name, value) = line.split_once(": ").expect("a CGI header");
                if name.eq_ignore_ascii_case("status") {
                    let code = value.split(' ').next().unwrap().parse().unwrap();
                    status = StatusCode::from_u16(code).unwrap();
                } else {
                    headers.append(
                        header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                        value.parse().unwrap(),
                    );
                }
            }
            let mut response = Response::new(Body::from(output[end + 4..].to_vec()));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
    }
}
