//! Which commits a client may name with a 40-hex tag (`NIXERY_COMMIT_PINS`). A commit's tree is
//! downloaded and evaluated by the server, so with `seen` (the default) only commits this
//! deployment has seen at the head of its channel or of a branch or tag of its repository are
//! served, and those the operator lists in `NIXERY_ALLOWED_COMMITS`; with `any`, every commit
//! the source serves.
//!
//! Every head seen is recorded in storage (one small cache entry per commit, under a key scoped
//! to the configured source), so restarts and replicas share what each of them saw; answers
//! found are remembered in a bounded LRU, which also keeps a listing from writing the same
//! heads again.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use futures::StreamExt;
use sha2::{Digest as _, Sha256};

use super::Commit;
use crate::storage::{Cache, Storage};
use crate::sync::lock;

/// Commits remembered as served (seen, or found recorded in storage): about 100 bytes each, so
/// at most ~1.6 MB; nixpkgs lists well under a tenth of this many branches and tags.
const SEEN_KEPT: NonZeroUsize = NonZeroUsize::new(16_384).expect("non-zero");

/// Records written at once when a listing brings new heads (after a restart, every head of the
/// first listing: a few hundred for nixpkgs, about a second on a bucket).
const RECORD_CONCURRENCY: usize = 16;

/// Largest `NIXERY_ALLOWED_COMMITS` file read (about 100,000 commits).
const MAX_ALLOWED_FILE_BYTES: u64 = 4 << 20;

/// Which commits a 40-hex tag may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CommitPins {
    /// Commits this deployment has seen at the head of its channel or of a branch or tag of its
    /// repository, and those listed in NIXERY_ALLOWED_COMMITS.
    Seen,
    /// Any commit the tarball URL or the repository serves.
    Any,
}

/// Why `NIXERY_ALLOWED_COMMITS` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AllowedCommitsError {
    #[error("NIXERY_ALLOWED_COMMITS={path} cannot be read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("NIXERY_ALLOWED_COMMITS={path} is larger than {MAX_ALLOWED_FILE_BYTES} bytes")]
    TooLarge { path: String },
    #[error(
        "NIXERY_ALLOWED_COMMITS={path}, line {line}: '{text}' is not a full 40-character commit (one commit a line, `#` starts a comment)"
    )]
    Malformed {
        path: String,
        line: usize,
        text: String,
    },
}

/// The commits of `NIXERY_ALLOWED_COMMITS`, read at start-up and again on SIGHUP.
#[derive(Debug, Default)]
pub struct AllowedCommits {
    path: Option<PathBuf>,
    commits: RwLock<Arc<HashSet<Commit>>>,
}

impl AllowedCommits {
    /// No file: no commit is allowed beyond what the rule allows.
    pub fn none() -> Self {
        AllowedCommits::default()
    }

    /// The commits listed in the file at `path`.
    pub fn open(path: &Path) -> Result<Self, AllowedCommitsError> {
        let commits = read(path)?;
        tracing::info!(path = %path.display(), commits = commits.len(), "allowed commits read");
        Ok(AllowedCommits {
            path: Some(path.to_path_buf()),
            commits: RwLock::new(Arc::new(commits)),
        })
    }

    /// Reads the file again: the commits it lists now replace the old ones, unless it cannot be
    /// read or is malformed, in which case the old ones stay (and the error is returned).
    /// Returns how many commits are listed; `None` when there is no file.
    pub fn reload(&self) -> Result<Option<usize>, AllowedCommitsError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let commits = read(path)?;
        let count = commits.len();
        *self.commits.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(commits);
        Ok(Some(count))
    }

    fn contains(&self, commit: &Commit) -> bool {
        self.commits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(commit)
    }
}

/// The commits the file at `path` lists.
fn read(path: &Path) -> Result<HashSet<Commit>, AllowedCommitsError> {
    use std::io::Read;
    let shown = || path.display().to_string();
    let failed = |source| AllowedCommitsError::Read {
        path: shown(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(failed)?
        .take(MAX_ALLOWED_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(failed)?;
    if text.len() as u64 > MAX_ALLOWED_FILE_BYTES {
        return Err(AllowedCommitsError::TooLarge { path: shown() });
    }
    parse(&text).map_err(|(line, text)| AllowedCommitsError::Malformed {
        path: shown(),
        line,
        text,
    })
}

/// The commits of a file's `text`: one a line, `#` starting a comment; the line number and text
/// of the first line that is not a commit.
fn parse(text: &str) -> Result<HashSet<Commit>, (usize, String)> {
    let mut commits = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let commit = Commit::parse(&entry.to_ascii_lowercase())
            .ok_or_else(|| (i + 1, entry.chars().take(80).collect()))?;
        commits.insert(commit);
    }
    Ok(commits)
}

/// Where heads are recorded: storage, under keys scoped to one source.
struct Records {
    storage: Arc<dyn Storage>,
    /// The source the records belong to (its URL, without credentials).
    source: String,
    /// Hex prefix of every key: the source's hash, so that deployments of different sources
    /// sharing a bucket keep apart.
    prefix: String,
}

impl Records {
    fn key(&self, commit: &Commit) -> String {
        format!("{}{commit}", self.prefix)
    }
}

/// The rule, and what this deployment has seen.
pub struct Pins {
    rule: CommitPins,
    allowed: AllowedCommits,
    records: Option<Records>,
    /// Commits known to be served (seen here, or found recorded), least recently used first out.
    seen: Mutex<lru::LruCache<Commit, ()>>,
}

impl Pins {
    /// `rule` with `allowed`; heads of `source` are recorded in `storage` when there is one.
    pub fn new(
        rule: CommitPins,
        allowed: AllowedCommits,
        storage: Option<Arc<dyn Storage>>,
        source: &str,
    ) -> Self {
        let records = storage.map(|storage| Records {
            storage,
            source: source.to_owned(),
            prefix: hex::encode(&Sha256::digest(format!("commits-1\n{source}\n"))[..8]),
        });
        Pins {
            rule,
            allowed,
            records,
            seen: Mutex::new(lru::LruCache::new(SEEN_KEPT)),
        }
    }

    /// Whether `commit` is served without asking the source: any commit under `any`, one the
    /// operator listed, or one seen at a head by this deployment (here, before a restart, or
    /// by a replica).
    pub async fn allows(&self, commit: &Commit) -> bool {
        if self.rule == CommitPins::Any
            || self.allowed.contains(commit)
            || lock(&self.seen).get(commit).is_some()
        {
            return true;
        }
        let Some(records) = &self.records else {
            return false;
        };
        match records
            .storage
            .read_cache(Cache::Commits, &records.key(commit))
            .await
        {
            Ok(Some(_)) => {
                lock(&self.seen).put(commit.clone(), ());
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, %commit, "reading the record of a commit failed; it counts as not seen");
                false
            }
        }
    }

    /// Records `heads` as seen: remembered now, and each one not remembered before written to
    /// storage (a failed write is logged; the head stays remembered here).
    pub async fn record<'a>(&self, heads: impl IntoIterator<Item = &'a Commit>) {
        let new: Vec<Commit> = {
            let mut seen = lock(&self.seen);
            heads
                .into_iter()
                .filter(|commit| seen.put((*commit).clone(), ()).is_none())
                .cloned()
                .collect()
        };
        let Some(records) = &self.records else {
            return;
        };
        let heads = new.len();
        // Each write owns what it needs: the futures outlive no borrow of `new`.
        let writes: Vec<_> = new
            .into_iter()
            .map(|commit| {
                let storage = records.storage.clone();
                let key = records.key(&commit);
                let value =
                    serde_json::json!({ "source": records.source, "commit": commit.as_str() })
                        .to_string();
                async move {
                    storage
                        .write_cache(Cache::Commits, &key, value.as_bytes())
                        .await
                }
            })
            .collect();
        let failed: Vec<_> = futures::stream::iter(writes)
            .buffer_unordered(RECORD_CONCURRENCY)
            .filter_map(|written| std::future::ready(written.err()))
            .collect()
            .await;
        if let Some(first) = failed.first() {
            tracing::warn!(error = %first, failed = failed.len(), heads, "recording the heads seen in storage failed; replicas and restarts will not know them");
        }
    }

    /// Reads `NIXERY_ALLOWED_COMMITS` again (see [`AllowedCommits::reload`]).
    pub fn reload(&self) -> Result<Option<usize>, AllowedCommitsError> {
        self.allowed.reload()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowed_file_lists_one_commit_a_line_with_comments() {
        let a = "a".repeat(40);
        let b = "B".repeat(40);
        let text = format!(
            "# pinned by hand\n\n{a}  # release\n  {b}\n#{}\n",
            "c".repeat(40)
        );
        let commits = parse(&text).unwrap();
        assert_eq!(commits.len(), 2);
        assert!(commits.contains(&Commit::parse(&a).unwrap()));
        assert!(commits.contains(&Commit::parse(&"b".repeat(40)).unwrap()));
        assert_eq!(
            parse(&format!("{a}\nmain\n")).unwrap_err(),
            (2, "main".to_owned())
        );
        assert_eq!(parse(&a[..39]).unwrap_err().0, 1);
    }

    #[tokio::test]
    async fn heads_are_recorded_once_per_source_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> =
            Arc::new(crate::storage::Filesystem::open(dir.path()).unwrap());
        let commit = Commit::parse(&"1".repeat(40)).unwrap();
        let pins = |source: &str| {
            Pins::new(
                CommitPins::Seen,
                AllowedCommits::none(),
                Some(storage.clone()),
                source,
            )
        };
        let first = pins("git https://example.com/pkgs.git");
        assert!(!first.allows(&commit).await);
        first.record([&commit, &commit]).await;
        assert!(first.allows(&commit).await);
        let cached = dir.path().join("cache/commits");
        assert_eq!(std::fs::read_dir(&cached).unwrap().count(), 1);

        // A restart of the same source reads the record; another source does not share it.
        assert!(
            pins("git https://example.com/pkgs.git")
                .allows(&commit)
                .await
        );
        assert!(
            !pins("git https://example.com/other.git")
                .allows(&commit)
                .await
        );

        // Recording again writes nothing new.
        let before = std::fs::metadata(cached.join(first.records.as_ref().unwrap().key(&commit)))
            .unwrap()
            .modified()
            .unwrap();
        first.record([&commit]).await;
        let after = std::fs::metadata(cached.join(first.records.as_ref().unwrap().key(&commit)))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);

        let any = Pins::new(CommitPins::Any, AllowedCommits::none(), None, "");
        assert!(any.allows(&commit).await);
    }
}
