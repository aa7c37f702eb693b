//! Fakes the builder is tested against: a Nix that counts what it is asked, builds closures of
//! small directories, and can be told to fail or to hold its builds until released; and storage
//! on the file system that can be told to refuse writes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use crate::builder::NixRunner;
use crate::manifest::Digest;
use crate::nix::{Closure, Derivation, GcRoot, NixError, NixProgress, StorePath};
use crate::storage::{Blob, Cache, Filesystem, StagedBlob, Staging, Storage, StorageError};

/// How the fake Nix fails its builds.
#[derive(Clone, Copy, Debug)]
pub enum Failure {
    /// The package set lacks a package: the request's fault, remembered.
    NotFound,
    /// Nix's output cannot be read: the server's fault, not remembered.
    Fault,
}

/// A Nix that builds nothing: each derivation's closure is two small directories under `dir`
/// (an image root referring to a library).
pub struct FakeNix {
    dir: PathBuf,
    pub evaluations: AtomicUsize,
    pub builds: AtomicUsize,
    /// Builds that reached Nix and wait at the gate (or went through it).
    pub started: AtomicUsize,
    held: AtomicBool,
    gate: Semaphore,
    failure: Mutex<Option<Failure>>,
    /// Builds for this Nix system fail as [`Failure::NotFound`].
    failing_system: Mutex<Option<String>>,
}

impl FakeNix {
    pub fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("the fake store");
        FakeNix {
            dir,
            evaluations: AtomicUsize::new(0),
            builds: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            held: AtomicBool::new(false),
            gate: Semaphore::new(0),
            failure: Mutex::new(None),
            failing_system: Mutex::new(None),
        }
    }

    pub fn evaluations(&self) -> usize {
        self.evaluations.load(Ordering::SeqCst)
    }

    pub fn builds(&self) -> usize {
        self.builds.load(Ordering::SeqCst)
    }

    /// Builds from now on wait until [`FakeNix::release`].
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Lets every held build, and every later one, go on.
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    /// Builds from now on fail so (none: succeed).
    pub fn fail(&self, failure: Option<Failure>) {
        *self.failure.lock().expect("not poisoned") = failure;
    }

    /// Builds for Nix system `system` fail as a missing package.
    pub fn fail_system(&self, system: &str) {
        *self.failing_system.lock().expect("not poisoned") = Some(system.to_owned());
    }
}

#[async_trait]
impl NixRunner for FakeNix {
    async fn evaluate(
        &self,
        tree: &Path,
        packages: &BTreeSet<String>,
        system: &str,
    ) -> Result<Derivation, NixError> {
        self.evaluations.fetch_add(1, Ordering::SeqCst);
        let mut hasher = Sha256::new();
        hasher.update(format!("{}\n{packages:?}\n{system}", tree.display()));
        let hash = &hex::encode(hasher.finalize())[..32];
        let name = packages.iter().cloned().collect::<Vec<_>>().join("-");
        Ok(Derivation::fake(format!(
            "/nix/store/{hash}-{name}-{system}.drv"
        )))
    }

    /// The hash of the tree's path: enough to tell trees apart here.
    async fn tree_hash(&self, tree: &Path) -> Result<String, NixError> {
        Ok(hex::encode(Sha256::digest(tree.display().to_string())))
    }

    async fn build_observed(
        &self,
        drv: &Derivation,
        on_progress: &mut (dyn FnMut(NixProgress) + Send),
    ) -> Result<(Closure, GcRoot), NixError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        if self.held.load(Ordering::SeqCst) {
            drop(self.gate.acquire().await.expect("the gate stays open"));
        }
        self.builds.fetch_add(1, Ordering::SeqCst);
        on_progress(NixProgress::Planned { derivations: 1 });
        let failing_system = self.failing_system.lock().expect("not poisoned").clone();
        if failing_system.is_some_and(|system| drv.as_str().ends_with(&format!("{system}.drv"))) {
            return Err(NixError::NotFound(vec!["missing".to_owned()]));
        }
        match *self.failure.lock().expect("not poisoned") {
            Some(Failure::NotFound) => return Err(NixError::NotFound(vec!["missing".to_owned()])),
            Some(Failure::Fault) => return Err(NixError::BadOutput("a fake fault".to_owned())),
            None => {}
        }
        let name = drv
            .as_str()
            .trim_start_matches("/nix/store/")
            .trim_end_matches(".drv");
        let library = self.dir.join(format!("{name}-lib"));
        let root = self.dir.join(format!("{name}-root"));
        for (path, file, text) in [(&library, "lib.so", "a library"), (&root, "hello", name)] {
            std::fs::create_dir_all(path).map_err(|e| NixError::BadOutput(e.to_string()))?;
            std::fs::write(path.join(file), text)
                .map_err(|e| NixError::BadOutput(e.to_string()))?;
        }
        let (library, root) = (library.display().to_string(), root.display().to_string());
        let store_path = |path: &str, references: Vec<String>| StorePath {
            path: path.to_owned(),
            deriver: None,
            nar_hash: "0".repeat(64),
            nar_size: 100,
            references,
        };
        let mut paths = vec![
            store_path(&library, vec![]),
            store_path(&root, vec![library.clone()]),
        ];
        paths.sort_by(|a, b| a.path.cmp(&b.path));
        let closure = Closure {
            root,
            paths,
            packages: vec![name.to_owned()],
            meta: vec![],
        };
        Ok((
            closure,
            GcRoot::fake(self.dir.join(format!("{name}.gcroot"))),
        ))
    }
}

/// File-system storage that refuses every write while told to.
pub struct FlakyStorage {
    inner: Filesystem,
    pub refusing: AtomicBool,
}

impl FlakyStorage {
    pub fn open(root: &Path) -> Self {
        FlakyStorage {
            inner: Filesystem::open(root).expect("storage in a temporary directory"),
            refusing: AtomicBool::new(false),
        }
    }

    fn refused(&self) -> Result<(), StorageError> {
        if self.refusing.load(Ordering::SeqCst) {
            return Err(StorageError::io("writing")(std::io::Error::other(
                "told to refuse",
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Storage for FlakyStorage {
    fn staging(&self) -> &Staging {
        self.inner.staging()
    }

    async fn commit(
        &self,
        staged: StagedBlob,
        digest: &Digest,
        media_type: Option<&'static str>,
    ) -> Result<(), StorageError> {
        self.refused()?;
        self.inner.commit(staged, digest, media_type).await
    }

    async fn has_blob(&self, digest: &Digest) -> Result<bool, StorageError> {
        self.inner.has_blob(digest).await
    }

    async fn blob(&self, digest: &Digest, head: bool) -> Result<Option<Blob>, StorageError> {
        self.inner.blob(digest, head).await
    }

    async fn read_blob(
        &self,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.read_blob(digest, limit).await
    }

    async fn read_cache(&self, cache: Cache, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.read_cache(cache, key).await
    }

    async fn write_cache(&self, cache: Cache, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.refused()?;
        self.inner.write_cache(cache, key, value).await
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.inner.check().await
    }
}
