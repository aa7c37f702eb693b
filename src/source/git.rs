//! Git repositories as package sources, through the `git` program (it speaks every transport
//! a user's git does, with their ssh keys and credential helpers, and runs through the one
//! subprocess helper with its timeout and process group). Refs are resolved with
//! `git ls-remote`; each wanted commit is fetched alone and shallow (`--depth 1`: nixpkgs' whole
//! history is ~5 GB) into a bare mirror, and exported with `git archive`.

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
    url: String,
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
        Git {
            source: redact(&url),
            mirror: dir.join(name),
            url,
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
            git(&args, self.resolve_timeout)
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
            git(&args, self.resolve_timeout).await.map_err(disk)?;
        }

        let object = format!("{commit}^{{commit}}");
        let mut has = git_dir();
        has.extend(["cat-file".into(), "-e".into(), object.clone().into()]);
        if git(&has, self.resolve_timeout).await.is_err() {
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
            git(&fetch, self.fetch_timeout)
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
        git(&archive, self.fetch_timeout).await.map_err(disk)?;
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
}

/// Runs git with `args`, never prompting for credentials, with English messages.
async fn git<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    timeout: Duration,
) -> Result<command::Output, CommandError> {
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    let env = [
        ("GIT_TERMINAL_PROMPT", "0".to_owned()),
        ("LC_ALL", "C".to_owned()),
    ];
    command::run("git", &args, command::Env::Inherited(&env), timeout).await
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
}
