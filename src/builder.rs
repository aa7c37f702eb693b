//! The image service: from an image name to a stored manifest. Runs Nix, groups and packs
//! layers (in parallel, each packed only once), stores blobs, and caches what it built, with one
//! build at a time per image however many clients ask for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{StreamExt, TryStreamExt};
use sha2::{Digest as _, Sha256};
use tempfile::NamedTempFile;

use crate::image::ImageName;
use crate::layers::{self, LayerContents, Popularity};
use crate::manifest::{self, Digest, Format, ImageSettings, Layer, Manifest};
use crate::metrics::{InFlight, METRICS};
use crate::nix::{Closure, Derivation, Nix, NixError};
use crate::source::{Pin, SourceError, Sources};
use crate::storage::{self, Blob, Cache, Storage, StorageError};
use crate::sync::lock;
use crate::ttl::Ttl;

/// Bumped whenever packing or documents change, so old cache entries are not reused.
const FORMAT_VERSION: &str = "nixery-4";

/// Largest blob read as a manifest (the limit the distribution spec suggests).
const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Nix(Arc<NixError>),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("packing a layer failed: {0}")]
    Pack(#[source] std::io::Error),
    #[error("Nix gave a closure without the image root {0}")]
    NoRoot(String),
    #[error("the build crashed: {0}")]
    Panicked(String),
}

impl BuildError {
    /// Whether the request caused the failure (see [`NixError::is_the_requests`]).
    pub fn is_the_requests(&self) -> bool {
        matches!(self, BuildError::Nix(nix) if nix.is_the_requests())
    }

    /// How a failed build is counted in `nixery_builds_total`.
    fn outcome(&self) -> &'static str {
        match self {
            BuildError::Nix(nix) => match nix.as_ref() {
                NixError::NotFound(_) => "unknown_package",
                NixError::Timeout(..) => "timeout",
                _ => "failed",
            },
            _ => "failed",
        }
    }
}

/// A built image: its manifest in each format.
#[derive(Debug)]
pub struct Image {
    docker: Arc<Manifest>,
    oci: Arc<Manifest>,
}

impl Image {
    /// An image of these two manifests (the same config and layers).
    pub fn new(docker: Vec<u8>, oci: Vec<u8>) -> Self {
        Image {
            docker: Arc::new(Manifest::new(docker, Format::Docker)),
            oci: Arc::new(Manifest::new(oci, Format::Oci)),
        }
    }

    /// The manifest in `format`.
    pub fn manifest(&self, format: Format) -> &Arc<Manifest> {
        match format {
            Format::Docker => &self.docker,
            Format::Oci => &self.oci,
        }
    }
}

impl From<NixError> for BuildError {
    fn from(err: NixError) -> Self {
        BuildError::Nix(Arc::new(err))
    }
}

type Build = Shared<BoxFuture<'static, Result<Arc<Image>, Arc<BuildError>>>>;

/// A path source's evaluations, by (path, packages).
type Evaluations = Ttl<(PathBuf, BTreeSet<String>), Derivation, NixError>;

/// Settings of the image service.
pub struct Settings {
    /// Most layers per image, the root layer included.
    pub max_layers: usize,
    /// Popularity data guiding layering (empty: none).
    pub popularity: Arc<Popularity>,
    /// libdeflate level, 1 … 12.
    pub gzip_level: i32,
    /// GOARCH-style architecture written into image configurations.
    pub architecture: String,
    /// How long a path source's evaluation of an image is reused.
    pub source_ttl: std::time::Duration,
    /// Most images kept in memory (each with its two manifests); also the most failures
    /// remembered.
    pub memory_entries: NonZeroUsize,
    /// How long a failure the request caused is answered from memory instead of running Nix
    /// again (Docker asks again with GET after a failed HEAD).
    pub failure_ttl: std::time::Duration,
}

/// What the HTTP layer asks of the image service. A trait, so that router tests can put a small
/// in-memory service behind the same routes and run without Nix.
#[async_trait::async_trait]
pub trait Images: Send + Sync + 'static {
    /// The image `name` stands for in the package set `pin`, built now if need be.
    async fn image(
        self: Arc<Self>,
        name: &ImageName,
        pin: &Pin,
    ) -> Result<Arc<Image>, Arc<BuildError>>;

    /// Blob `digest` as clients should get it (a manifest with its own media type).
    async fn blob(&self, digest: &Digest, head: bool) -> Result<Option<Served>, StorageError>;

    /// A manifest this registry stored, by digest.
    async fn stored_manifest(&self, digest: &Digest)
    -> Result<Option<Arc<Manifest>>, StorageError>;
}

#[async_trait::async_trait]
impl Images for Builder {
    async fn image(
        self: Arc<Self>,
        name: &ImageName,
        pin: &Pin,
    ) -> Result<Arc<Image>, Arc<BuildError>> {
        Builder::image(&self, name, pin).await
    }

    async fn blob(&self, digest: &Digest, head: bool) -> Result<Option<Served>, StorageError> {
        Builder::blob(self, digest, head).await
    }

    async fn stored_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<Arc<Manifest>>, StorageError> {
        Builder::stored_manifest(self, digest).await
    }
}

/// Builds images and remembers what it built.
pub struct Builder {
    nix: Arc<Nix>,
    storage: Arc<dyn Storage>,
    sources: Arc<Sources>,
    settings: Settings,
    evaluations: Evaluations,
    /// Images built or found in storage, by manifest key, least recently used first out.
    built: Mutex<lru::LruCache<String, Arc<Image>>>,
    /// Manifests of images built or served, by digest, least recently used first out.
    manifests: Mutex<lru::LruCache<Digest, Arc<Manifest>>>,
    building: Mutex<HashMap<String, Build>>,
    /// Failures the request caused, by image and source, with when they happened.
    failures: Mutex<lru::LruCache<String, (Instant, Arc<BuildError>)>>,
}

impl Builder {
    pub fn new(
        nix: Nix,
        storage: Arc<dyn Storage>,
        sources: Arc<Sources>,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new(Builder {
            nix: Arc::new(nix),
            storage,
            sources,
            evaluations: Ttl::new(settings.source_ttl, |_| false),
            built: Mutex::new(lru::LruCache::new(settings.memory_entries)),
            manifests: Mutex::new(lru::LruCache::new(
                settings
                    .memory_entries
                    .saturating_mul(NonZeroUsize::MIN.saturating_add(1)),
            )),
            failures: Mutex::new(lru::LruCache::new(settings.memory_entries)),
            settings,
            building: Mutex::default(),
        })
    }

    /// The image `name` stands for in the package set `pin`, from cache or built now; a failure
    /// the request caused is answered again from memory for `failure_ttl`. The build
    /// runs in its own task: a client that goes away does not cancel it, and concurrent requests
    /// share it.
    pub async fn image(
        self: &Arc<Self>,
        image: &ImageName,
        pin: &Pin,
    ) -> Result<Arc<Image>, Arc<BuildError>> {
        let failure_key = format!("{pin:?} {:?}", image.packages());
        let remembered = lock(&self.failures).get(&failure_key).cloned();
        if let Some((at, err)) = remembered
            && at.elapsed() < self.settings.failure_ttl
        {
            METRICS.build_outcome("remembered_failure");
            return Err(err);
        }
        let result = self.image_once(image, pin).await;
        if let Err(err) = &result
            && err.is_the_requests()
        {
            lock(&self.failures).put(failure_key, (Instant::now(), err.clone()));
        }
        result
    }

    /// [`Builder::image`] without the memory of failures.
    async fn image_once(
        self: &Arc<Self>,
        image: &ImageName,
        pin: &Pin,
    ) -> Result<Arc<Image>, Arc<BuildError>> {
        let drv = match pin {
            Pin::Path(path) => {
                let started = Instant::now();
                let drv = self.evaluate_path(path, image.packages()).await;
                METRICS.phase("evaluate", started.elapsed());
                Some(drv.map_err(|e| Arc::new(BuildError::Nix(e)))?)
            }
            Pin::Commit { .. } => None,
        };
        let key = self.manifest_key(image.packages(), pin, drv.as_ref());
        if let Some(image) = lock(&self.built).get(&key) {
            METRICS.cache_lookup("memory");
            METRICS.build_outcome("cached");
            return Ok(image.clone());
        }
        let build = {
            let mut building = lock(&self.building);
            building
                .entry(key.clone())
                .or_insert_with(|| {
                    let this = self.clone();
                    let packages = image.packages().clone();
                    let task_key = key.clone();
                    let pin = pin.clone();
                    let cleanup = {
                        let this = self.clone();
                        let key = key.clone();
                        move || {
                            lock(&this.building).remove(&key);
                        }
                    };
                    spawn_build(
                        async move {
                            let key = task_key;
                            let result = this.cached_or_build(&key, &packages, &pin, drv).await;
                            match &result {
                                Ok(image) => this.remember(&key, image),
                                Err(err) => METRICS.build_outcome(err.outcome()),
                            }
                            result
                        },
                        cleanup,
                    )
                })
                .clone()
        };
        build.await
    }

    fn remember(&self, key: &str, image: &Arc<Image>) {
        let mut built = lock(&self.built);
        built.put(key.to_owned(), image.clone());
        METRICS.cache_size("images", built.len());
        drop(built);
        let mut manifests = lock(&self.manifests);
        for manifest in [&image.docker, &image.oci] {
            manifests.put(manifest.digest.clone(), manifest.clone());
        }
        METRICS.cache_size("manifests", manifests.len());
    }

    /// A manifest of an image this server built or served recently.
    pub fn known_manifest(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        lock(&self.manifests).get(digest).cloned()
    }

    /// Blob `digest` as clients should get it: a manifest (by its digest, containerd asks for
    /// manifests on the blobs route too) with its own media type, else the stored blob. A small
    /// file that starts like JSON is read to tell; a blob served by redirect carries its media
    /// type where it is stored.
    pub async fn blob(&self, digest: &Digest, head: bool) -> Result<Option<Served>, StorageError> {
        if let Some(manifest) = self.known_manifest(digest) {
            return Ok(Some(Served::Manifest(manifest)));
        }
        match self.storage.blob(digest, head).await? {
            Some(Blob::Stored(contents)) => {
                if contents.size() <= MAX_MANIFEST_BYTES
                    && starts_like_json(&contents).await?
                    && let Some(manifest) = self.stored_manifest(digest).await?
                {
                    return Ok(Some(Served::Manifest(manifest)));
                }
                Ok(Some(Served::Blob(Blob::Stored(contents))))
            }
            other => Ok(other.map(Served::Blob)),
        }
    }

    /// A manifest this registry stored, by digest: from memory, else read from storage (built
    /// before a restart, or by another replica) and remembered. `None` when the digest is not
    /// stored, is not a manifest, or its bytes do not match it.
    pub async fn stored_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<Arc<Manifest>>, StorageError> {
        if let Some(manifest) = self.known_manifest(digest) {
            return Ok(Some(manifest));
        }
        let Some(bytes) = self.storage.read_blob(digest, MAX_MANIFEST_BYTES).await? else {
            return Ok(None);
        };
        let Some(format) = manifest::declared_media_type(&bytes)
            .as_deref()
            .and_then(Format::of_media_type)
        else {
            return Ok(None);
        };
        let manifest = Arc::new(Manifest::new(bytes, format));
        if &manifest.digest != digest {
            tracing::error!(%digest, actual = %manifest.digest, "stored manifest does not match its digest");
            return Ok(None);
        }
        let mut manifests = lock(&self.manifests);
        manifests.put(digest.clone(), manifest.clone());
        METRICS.cache_size("manifests", manifests.len());
        Ok(Some(manifest))
    }

    /// The derivation of `packages` in the package set at `path`, evaluated at most once per
    /// source TTL: a path's contents can change under the server, and what Nix makes of them is
    /// what the image is keyed on.
    async fn evaluate_path(
        &self,
        path: &std::path::Path,
        packages: &BTreeSet<String>,
    ) -> Result<Derivation, Arc<NixError>> {
        let nix = self.nix.clone();
        let key = (path.to_path_buf(), packages.clone());
        // Evaluations are bounded by the TTL cache's own limit.
        let (path, packages) = key.clone();
        self.evaluations
            .get(&key, move || {
                async move { nix.evaluate(&path, &packages).await }.boxed()
            })
            .await
    }

    async fn cached_or_build(
        &self,
        key: &str,
        packages: &BTreeSet<String>,
        pin: &Pin,
        drv: Option<Derivation>,
    ) -> Result<Arc<Image>, BuildError> {
        if let Some(docker) = self.storage.read_cache(Cache::Manifests, key).await?
            && let Some(oci) = manifest::convert(&docker, Format::Oci)
        {
            let image = Image::new(docker, oci);
            if self.all_stored(&image).await? {
                tracing::debug!(digest = %image.docker.digest, "manifest from cache");
                METRICS.cache_lookup("storage");
                METRICS.build_outcome("cached");
                return Ok(Arc::new(image));
            }
        }
        METRICS.cache_lookup("miss");
        let _in_flight = InFlight::start();
        let drv = match drv {
            Some(drv) => drv,
            None => {
                // Nix reads the tree only while it evaluates: what a build needs from it is then
                // in the store, and the tree may go.
                let started = Instant::now();
                let tree = self.sources.tree(pin).await?;
                METRICS.phase("source", started.elapsed());
                let started = Instant::now();
                let drv = self.nix.evaluate(tree.path(), packages).await?;
                METRICS.phase("evaluate", started.elapsed());
                drv
            }
        };
        let image = self.build(&drv, packages, pin).await?;
        METRICS.build_outcome("built");
        self.storage
            .write_cache(Cache::Manifests, key, &image.docker.bytes)
            .await?;
        Ok(Arc::new(image))
    }

    /// Whether every blob of a cached image (both manifests, the config and each layer) is
    /// still stored, so a cache entry never leads a client to a missing blob.
    async fn all_stored(&self, image: &Image) -> Result<bool, StorageError> {
        let mut digests = vec![image.docker.digest.clone(), image.oci.digest.clone()];
        digests.extend(manifest::referenced_blobs(&image.docker.bytes).unwrap_or_default());
        for digest in &digests {
            if !self.storage.has_blob(digest).await? {
                tracing::warn!(%digest, "a cached image lost a blob; building it again");
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn build(
        &self,
        drv: &Derivation,
        packages: &BTreeSet<String>,
        pin: &Pin,
    ) -> Result<Image, BuildError> {
        let started = Instant::now();
        let closure = self.nix.build(drv).await?;
        METRICS.phase("build", started.elapsed());
        let started = Instant::now();
        log_popularity(&closure, &self.settings.popularity);
        let groups = layers::group(
            &closure,
            &self.settings.popularity,
            self.settings.max_layers - 1,
        )
        .ok_or_else(|| BuildError::NoRoot(closure.root.clone()))?;
        // Layers are packed as they come (a small layer does not wait behind a large one) and put
        // back in order afterwards. The first failure ends the build: the layers still in flight
        // are dropped rather than each waiting out storage retries.
        let closure = &closure;
        let mut numbered: Vec<(usize, Layer)> =
            futures::stream::iter(groups.into_iter().enumerate().map(|(i, paths)| async move {
                Ok::<_, BuildError>((i, self.layer(closure, Some(paths)).await?))
            }))
            .buffer_unordered(parallelism())
            .try_collect()
            .await?;
        numbered.sort_by_key(|(i, _)| *i);
        let mut layers: Vec<Layer> = numbered.into_iter().map(|(_, layer)| layer).collect();
        layers.push(self.layer(closure, None).await?);

        let settings = ImageSettings {
            architecture: self.settings.architecture.clone(),
            cmd: has_shell(packages).then(|| vec!["bash".to_owned()]),
            labels: labels(pin, closure),
        };
        let docs = manifest::image_documents(&layers, &settings);
        let storage = self.storage.as_ref();
        storage::put_bytes(storage, &docs.config, None).await?;
        storage::put_bytes(storage, &docs.oci, Some(Format::Oci.manifest_type())).await?;
        storage::put_bytes(storage, &docs.docker, Some(Format::Docker.manifest_type())).await?;
        let image = Image::new(docs.docker, docs.oci);
        METRICS.phase("layers", started.elapsed());
        tracing::info!(digest = %image.docker.digest, layers = layers.len(), "image built");
        Ok(image)
    }

    /// The layer of a group of store paths, or of the image root when `paths` is `None`: from
    /// the layer cache when its blob is stored, else packed and stored now.
    async fn layer(
        &self,
        closure: &Closure,
        paths: Option<Vec<String>>,
    ) -> Result<Layer, BuildError> {
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "{FORMAT_VERSION}\ngzip {}\n",
            self.settings.gzip_level
        ));
        match &paths {
            Some(paths) => paths.iter().for_each(|p| hasher.update(format!("{p}\n"))),
            None => hasher.update(format!("root {}\n", closure.root)),
        }
        let key = hex::encode(hasher.finalize());
        if let Some(bytes) = self.storage.read_cache(Cache::Layers, &key).await?
            && let Ok(layer) = serde_json::from_slice::<Layer>(&bytes)
            && self.storage.has_blob(&layer.digest).await?
        {
            return Ok(layer);
        }

        let staging = self.storage.staging_dir().to_path_buf();
        let level = self.settings.gzip_level;
        let root = closure.root.clone();
        let (staged, layer) =
            tokio::task::spawn_blocking(move || -> std::io::Result<(NamedTempFile, Layer)> {
                let staged = NamedTempFile::new_in(staging)?;
                let out = std::io::BufWriter::with_capacity(1 << 20, staged.as_file());
                let contents = match &paths {
                    Some(paths) => LayerContents::StorePaths(paths),
                    None => LayerContents::Root(std::path::Path::new(&root)),
                };
                // Two blocks per core in flight keep the shared pool busy.
                let layer = layers::pack(contents, level, 2 * parallelism(), out)?;
                Ok((staged, layer))
            })
            .await
            .unwrap_or_else(|panicked| Err(std::io::Error::other(panicked)))
            .map_err(BuildError::Pack)?;
        self.storage.commit(staged, &layer.digest, None).await?;
        let entry = serde_json::to_vec(&layer).expect("layer serialises");
        self.storage
            .write_cache(Cache::Layers, &key, &entry)
            .await?;
        tracing::debug!(digest = %layer.digest, size = layer.size, "layer packed");
        Ok(layer)
    }

    /// The manifest cache key: everything that changes an image's bytes. A commit's image is
    /// keyed on the source URL and commit, so replicas and restarts find it without Nix; a path
    /// source's on the derivation Nix evaluated, so it follows the set's contents.
    fn manifest_key(
        &self,
        packages: &BTreeSet<String>,
        pin: &Pin,
        drv: Option<&Derivation>,
    ) -> String {
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "{FORMAT_VERSION}\nlayers {}\ngzip {}\narchitecture {}\nsystem {}\n",
            self.settings.max_layers,
            self.settings.gzip_level,
            self.settings.architecture,
            self.nix.system()
        ));
        if !self.settings.popularity.is_empty() {
            hasher.update(format!(
                "popularity {}\n",
                self.settings.popularity.fingerprint()
            ));
        }
        match (pin, drv) {
            (Pin::Commit { commit, source }, _) => {
                hasher.update(format!("source {source}\ncommit {commit}\n"))
            }
            (Pin::Path(_), Some(drv)) => hasher.update(format!("drv {}\n", drv.as_str())),
            (Pin::Path(path), None) => hasher.update(format!("path {}\n", path.display())),
        }
        for package in packages {
            hasher.update(format!("{package}\n"));
        }
        hex::encode(hasher.finalize())
    }
}

/// Logs how many of a closure's paths the popularity data knows, by full name and by name
/// without the version (data from another revision of the package set mostly misses).
fn log_popularity(closure: &Closure, popularity: &Popularity) {
    if popularity.is_empty() {
        return;
    }
    let (mut exact, mut by_name) = (0, 0);
    for path in &closure.paths {
        match popularity.count(&path.path) {
            Some((_, layers::popularity::Match::Exact)) => exact += 1,
            Some((_, layers::popularity::Match::Name)) => by_name += 1,
            None => {}
        }
    }
    tracing::info!(
        paths = closure.paths.len(),
        exact,
        by_name,
        "popularity data for {} of {} paths",
        exact + by_name,
        closure.paths.len()
    );
}

/// A blob as it is to be served.
pub enum Served {
    /// A manifest, with its own media type.
    Manifest(Arc<Manifest>),
    /// Any other blob.
    Blob(Blob),
}

/// Whether a blob starts with `{` (as manifests and configs do; compressed layers never do).
async fn starts_like_json(contents: &storage::Contents) -> Result<bool, StorageError> {
    if contents.size() == 0 {
        return Ok(false);
    }
    let first = contents
        .read(0, 1)
        .next()
        .await
        .transpose()
        .map_err(StorageError::io("reading a blob"))?;
    Ok(first.is_some_and(|bytes| bytes.first() == Some(&b'{')))
}

/// Runs `build` in a task of its own (a client that goes away does not cancel it), shared by
/// everyone who awaits it, then `cleanup`. A panic in the build becomes
/// [`BuildError::Panicked`] for every waiter, and `cleanup` runs all the same: the next request
/// builds again instead of waiting on a dead task.
fn spawn_build(
    build: impl Future<Output = Result<Arc<Image>, BuildError>> + Send + 'static,
    cleanup: impl FnOnce() + Send + 'static,
) -> Build {
    let task = tokio::spawn(async move {
        let result = match std::panic::AssertUnwindSafe(build).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                let message = crate::sync::panic_message(panic.as_ref());
                tracing::error!(panic = %message, "an image build panicked");
                let err = BuildError::Panicked(message);
                METRICS.build_outcome(err.outcome());
                Err(err)
            }
        };
        cleanup();
        result.map_err(Arc::new)
    });
    async move {
        task.await.unwrap_or_else(|join| {
            // Only cancellation is left (the runtime shutting down).
            Err(Arc::new(BuildError::Panicked(join.to_string())))
        })
    }
    .boxed()
    .shared()
}

/// The labels that say where an image came from: the commit and source URL (for a commit), and
/// the attributes its packages resolved to.
fn labels(pin: &Pin, closure: &Closure) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if let Pin::Commit { commit, source } = pin {
        labels.insert(
            "org.opencontainers.image.revision".to_owned(),
            commit.to_string(),
        );
        labels.insert("org.opencontainers.image.source".to_owned(), source.clone());
    }
    let resolved: BTreeSet<&String> = closure.packages.iter().collect();
    labels.insert(
        "nixery.packages".to_owned(),
        serde_json::to_string(&resolved).unwrap_or_default(),
    );
    labels
}

/// Whether the image has an interactive shell to start by default.
fn has_shell(packages: &BTreeSet<String>) -> bool {
    packages
        .iter()
        .any(|p| p.eq_ignore_ascii_case("bashInteractive"))
}

fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn a_panicking_build_is_an_error_for_every_waiter_and_is_cleaned_up() {
        let cleaned = Arc::new(AtomicBool::new(false));
        let flag = cleaned.clone();
        let build = spawn_build(
            async {
                panic!("boom");
                #[allow(unreachable_code)]
                Err(BuildError::Panicked(String::new()))
            },
            move || flag.store(true, Ordering::SeqCst),
        );
        let (first, second) = tokio::join!(build.clone(), build);
        for result in [first, second] {
            let err = result.expect_err("a panicking build fails");
            match err.as_ref() {
                BuildError::Panicked(message) => assert_eq!(message, "boom"),
                other => panic!("not a panic error: {other:?}"),
            }
        }
        assert!(
            cleaned.load(Ordering::SeqCst),
            "the build's entry was left behind"
        );
    }
}
