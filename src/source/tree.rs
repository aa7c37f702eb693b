//! Commits' trees on disk, under `STORAGE_PATH/sources/trees/<commit>`: each fetched and unpacked
//! at most once however many builds want it at the same time, checked to be a package set, and
//! moved into place only when complete, so a broken download leaves nothing behind. When more
//! than `keep` trees are on disk, the least recently used ones that no build holds are removed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use std::time::SystemTime;

use futures::future::{BoxFuture, FutureExt, Shared};

use super::{Commit, SourceError};

type Fetching = Shared<BoxFuture<'static, Result<(), SourceError>>>;

#[derive(Debug, Default)]
struct State {
    /// Trees being fetched, by commit.
    fetching: HashMap<Commit, Fetching>,
    /// How many builds hold each tree.
    in_use: HashMap<Commit, usize>,
}

/// The trees directory and what is being done with it.
pub struct Trees {
    dir: PathBuf,
    staging: PathBuf,
    keep: usize,
    state: Arc<Mutex<State>>,
}

/// A package set on disk for one build. A commit's tree is not removed while a `Tree` for it
/// lives.
#[derive(Debug)]
pub struct Tree {
    path: PathBuf,
    lease: Option<Lease>,
}

#[derive(Debug)]
struct Lease {
    commit: Commit,
    trees: Arc<TreesRef>,
}

/// What a lease needs to give its tree back and tidy up.
#[derive(Debug)]
struct TreesRef {
    dir: PathBuf,
    staging: PathBuf,
    keep: usize,
    state: Arc<Mutex<State>>,
}

impl Tree {
    /// A package set at a fixed path, which nixery never removes.
    pub fn fixed(path: &Path) -> Tree {
        Tree {
            path: path.to_path_buf(),
            lease: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let mut state = lock(&lease.trees.state);
        if let Some(count) = state.in_use.get_mut(&lease.commit) {
            *count -= 1;
            if *count == 0 {
                state.in_use.remove(&lease.commit);
            }
        }
        drop(state);
        let trees = lease.trees.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || trees.collect());
        }
    }
}

impl Trees {
    /// Trees under `dir/trees`, staged in `dir/tmp` (emptied now: what a crash left there is
    /// never used).
    pub fn open(dir: &Path, keep: usize) -> std::io::Result<Self> {
        let staging = dir.join("tmp");
        crate::storage::clear_staging(&staging)?;
        let dir = dir.join("trees");
        std::fs::create_dir_all(&dir)?;
        Ok(Trees {
            dir,
            staging,
            keep,
            state: Arc::default(),
        })
    }

    fn shared(&self) -> Arc<TreesRef> {
        Arc::new(TreesRef {
            dir: self.dir.clone(),
            staging: self.staging.clone(),
            keep: self.keep,
            state: self.state.clone(),
        })
    }

    /// The tree of `commit` from `source`, fetched by `fetch` (which writes a tar or tar.gz
    /// archive to the path it is given) unless it is on disk already.
    pub async fn get<F>(&self, commit: &Commit, source: &str, fetch: F) -> Result<Tree, SourceError>
    where
        F: FnOnce(PathBuf) -> BoxFuture<'static, Result<(), SourceError>>,
    {
        let trees = self.shared();
        let pending = {
            let mut state = lock(&self.state);
            if !state.fetching.contains_key(commit) && trees.path(commit).is_dir() {
                return Ok(trees.lease(&mut state, commit));
            }
            match state.fetching.get(commit) {
                Some(pending) => pending.clone(),
                None => {
                    let pending =
                        trees
                            .clone()
                            .spawn_fetch(commit.clone(), source.to_owned(), fetch);
                    state.fetching.insert(commit.clone(), pending.clone());
                    pending
                }
            }
        };
        pending.await?;
        let mut state = lock(&self.state);
        if trees.path(commit).is_dir() {
            Ok(trees.lease(&mut state, commit))
        } else {
            Err(SourceError::Disk(format!(
                "the tree of {commit} was removed as soon as it was fetched (NIXERY_SOURCES_KEEP is too small for the builds running)"
            )))
        }
    }
}

impl TreesRef {
    fn path(&self, commit: &Commit) -> PathBuf {
        self.dir.join(commit.as_str())
    }

    fn lease(self: &Arc<Self>, state: &mut State, commit: &Commit) -> Tree {
        *state.in_use.entry(commit.clone()).or_default() += 1;
        let path = self.path(commit);
        // The modification time orders trees by last use.
        if let Err(e) = std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now())) {
            tracing::warn!(path = %path.display(), error = %e, "could not mark a tree as used");
        }
        Tree {
            path,
            lease: Some(Lease {
                commit: commit.clone(),
                trees: self.clone(),
            }),
        }
    }

    /// Fetches and unpacks `commit` in a task of its own (a client that goes away does not
    /// cancel it), then tidies up.
    fn spawn_fetch<F>(self: Arc<Self>, commit: Commit, source: String, fetch: F) -> Fetching
    where
        F: FnOnce(PathBuf) -> BoxFuture<'static, Result<(), SourceError>>,
    {
        let trees = self.clone();
        let task_commit = commit.clone();
        let archive = tempfile::Builder::new()
            .prefix("archive-")
            .tempfile_in(&trees.staging)
            .map(|file| file.into_temp_path());
        let download = archive
            .as_ref()
            .ok()
            .map(|archive| fetch(archive.to_path_buf()));
        let task = tokio::spawn(async move {
            let commit = task_commit;
            let result = async {
                let archive = archive.map_err(|e| SourceError::Disk(e.to_string()))?;
                if let Some(download) = download {
                    download.await?;
                }
                let unpack_trees = trees.clone();
                let unpack_commit = commit.clone();
                tokio::task::spawn_blocking(move || {
                    unpack_trees.unpack(&archive, &unpack_commit, &source)
                })
                .await
                .map_err(|e| SourceError::Disk(format!("unpacking panicked: {e}")))?
            }
            .await;
            lock(&trees.state).fetching.remove(&commit);
            let collect = trees.clone();
            tokio::task::spawn_blocking(move || collect.collect());
            if let Err(e) = &result {
                tracing::warn!(%commit, error = %e, "fetching a tree failed");
            }
            result
        });
        async move {
            task.await.unwrap_or_else(|e| {
                lock(&self.state).fetching.remove(&commit);
                Err(SourceError::Disk(format!("fetching a tree panicked: {e}")))
            })
        }
        .boxed()
        .shared()
    }

    /// Unpacks `archive` (tar or tar.gz, one top-level directory) into the tree of `commit`.
    fn unpack(&self, archive: &Path, commit: &Commit, source: &str) -> Result<(), SourceError> {
        let disk = |e: std::io::Error| SourceError::Disk(e.to_string());
        let started = std::time::Instant::now();
        let bytes = std::fs::metadata(archive).map_or(0, |m| m.len());
        let unpacked = tempfile::Builder::new()
            .prefix("tree-")
            .tempdir_in(&self.staging)
            .map_err(disk)?;
        let source = || source.to_owned();
        let corrupt = |detail: String| SourceError::Fetch {
            commit: commit.clone(),
            url: source(),
            detail,
        };
        extract(archive, unpacked.path())
            .map_err(|e| corrupt(format!("it is not a complete tar or tar.gz archive ({e})")))?;
        let entries = std::fs::read_dir(unpacked.path())
            .and_then(|d| d.collect::<Result<Vec<_>, _>>())
            .map_err(disk)?;
        let top = match entries.as_slice() {
            [only] if only.path().is_dir() => only.path(),
            _ => {
                return Err(SourceError::NotAPackageSet {
                    commit: commit.clone(),
                    url: source(),
                    detail: format!(
                        "its archive has {} top-level entries, not one directory",
                        entries.len()
                    ),
                });
            }
        };
        if !top.join("default.nix").is_file() {
            return Err(SourceError::NotAPackageSet {
                commit: commit.clone(),
                url: source(),
                detail: "it has no default.nix at its top".to_owned(),
            });
        }
        let path = self.path(commit);
        std::fs::rename(&top, &path).map_err(disk)?;
        // The modification time orders trees by last use; the archive's own time says nothing.
        std::fs::File::open(&path)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .map_err(disk)?;
        tracing::info!(%commit, archive_bytes = bytes, elapsed_ms = started.elapsed().as_millis() as u64, "tree unpacked");
        Ok(())
    }

    /// Removes the least recently used trees beyond `keep` that no build holds. A tree is first
    /// renamed into staging (so it vanishes from `trees/` at once), then deleted.
    fn collect(&self) {
        let doomed: Vec<PathBuf> = {
            let state = lock(&self.state);
            let Ok(entries) = std::fs::read_dir(&self.dir) else {
                return;
            };
            let mut trees: Vec<(SystemTime, PathBuf, Option<Commit>)> = entries
                .filter_map(Result::ok)
                .map(|e| {
                    let used = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    let commit = e.file_name().to_str().and_then(Commit::parse);
                    (used, e.path(), commit)
                })
                .collect();
            if trees.len() <= self.keep {
                return;
            }
            trees.sort_by_key(|(used, _, _)| std::cmp::Reverse(*used));
            let mut excess = trees.len() - self.keep;
            let mut doomed = Vec::new();
            for (_, path, commit) in trees.into_iter().rev() {
                if excess == 0 {
                    break;
                }
                let busy = commit.as_ref().is_some_and(|c| {
                    state.in_use.contains_key(c) || state.fetching.contains_key(c)
                });
                if busy {
                    continue;
                }
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let trash = self.staging.join(format!("removed-{name}"));
                match std::fs::rename(&path, &trash) {
                    Ok(()) => {
                        excess -= 1;
                        doomed.push(trash);
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove an old tree")
                    }
                }
            }
            doomed
        };
        for trash in doomed {
            tracing::info!(tree = %trash.display(), "old tree removed");
            if let Err(e) = std::fs::remove_dir_all(&trash) {
                tracing::warn!(path = %trash.display(), error = %e, "could not delete an old tree");
            }
        }
    }
}

/// Unpacks the tar or gzip-compressed tar `archive` into `dest`, reading it to the end so that
/// gzip checks its length and checksum: a truncated or corrupt archive is an error.
fn extract(archive: &Path, dest: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(std::fs::File::open(archive)?);
    let gzip = reader.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let input: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut tar = tar::Archive::new(input);
    tar.set_overwrite(false);
    tar.unpack(dest)?;
    std::io::copy(&mut tar.into_inner(), &mut std::io::sink())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(n: u8) -> Commit {
        Commit::parse(&format!("{n:02x}").repeat(20)).unwrap()
    }

    /// A tar.gz of one directory `top` holding `files`.
    fn tarball(top: &str, files: &[(&str, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (name, text) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, format!("{top}/{name}"), text.as_bytes())
                .unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    fn serve(
        bytes: Vec<u8>,
    ) -> impl FnOnce(PathBuf) -> BoxFuture<'static, Result<(), SourceError>> {
        move |path| {
            async move {
                std::fs::write(path, bytes).unwrap();
                Ok(())
            }
            .boxed()
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("tmp"))
            .unwrap()
            .chain(std::fs::read_dir(dir.join("trees")).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_tree_is_unpacked_without_its_top_directory() {
        let dir = tempfile::tempdir().unwrap();
        let trees = Trees::open(dir.path(), 4).unwrap();
        let bytes = tarball(
            "nixpkgs-x",
            &[("default.nix", "{ ... }: { }"), ("lib/a", "a")],
        );
        let tree = trees.get(&commit(1), "test", serve(bytes)).await.unwrap();
        assert_eq!(
            tree.path(),
            dir.path().join("trees").join(commit(1).as_str())
        );
        assert_eq!(
            std::fs::read_to_string(tree.path().join("lib/a")).unwrap(),
            "a"
        );
        // A second request finds it on disk and fetches nothing.
        let again = trees
            .get(&commit(1), "test", |_| {
                async { panic!("fetched twice") }.boxed()
            })
            .await
            .unwrap();
        assert_eq!(again.path(), tree.path());
    }

    #[tokio::test]
    async fn truncated_or_foreign_archives_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let trees = Trees::open(dir.path(), 4).unwrap();
        let whole = tarball("top", &[("default.nix", &"x".repeat(100_000))]);
        let truncated = whole[..whole.len() / 2].to_vec();
        let err = trees
            .get(&commit(1), "test", serve(truncated))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::Fetch { .. }), "{err}");
        let err = trees
            .get(
                &commit(1),
                "test",
                serve(tarball("top", &[("README", "no set")])),
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(err, SourceError::NotAPackageSet { .. }), "{err}");
        let err = trees
            .get(
                &commit(1),
                "test",
                serve(b"<html>not found</html>".to_vec()),
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(err, SourceError::Fetch { .. }), "{err}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
        assert!(trees.get(&commit(1), "test", serve(whole)).await.is_ok());
    }

    #[tokio::test]
    async fn old_trees_go_once_no_build_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let trees = Trees::open(dir.path(), 2).unwrap();
        let set = || serve(tarball("t", &[("default.nix", "{ ... }: { }")]));
        let first = trees.get(&commit(1), "test", set()).await.unwrap();
        drop(trees.get(&commit(2), "test", set()).await.unwrap());
        drop(trees.get(&commit(3), "test", set()).await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // Three on disk, but the first is in use: the second, least recently used of the rest, goes.
        let on_disk = leftovers(dir.path());
        assert_eq!(on_disk, [commit(1).to_string(), commit(3).to_string()]);
        assert!(first.path().join("default.nix").exists());
    }
}
