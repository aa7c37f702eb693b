//! The image service: from an image name to a stored manifest. Runs Nix, groups and packs
//! layers (in parallel, each packed only once), stores blobs, and caches what it built, with one
//! build at a time per image however many clients ask for it. Each build publishes its phases
//! ([`events`]) for the build pages and the builds API.

pub mod events;
mod index;
mod sbom;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::StreamExt;
use sha2::{Digest as _, Sha256};

use crate::admission::{Admission, Refusal};
use crate::image::{ImageName, Platform, Tag, nonroot};
use crate::layers::{self, LayerContents, Popularity};
use crate::manifest::{self, Digest, Format, ImageSettings, Layer, Manifest};
use crate::metrics::{InFlight, METRICS};
use crate::nix::{Closure, Derivation, Nix, NixError, NixProgress, gc};
use crate::source::{Pin, SourceError, Sources};
use crate::storage::{self, Blob, Cache, StagedBlob, Storage, StorageError};
use crate::sync::lock;
use crate::ttl::Ttl;
use events::{Event, LayerSummary, Progress, Run, RunKey};
pub use index::{Index, PlatformFailure};
pub use sbom::{CYCLONEDX, SPDX};

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
    #[error(transparent)]
    Refused(Refusal),
    #[error("the server is shutting down; try again in a moment")]
    Cancelled,
}

impl BuildError {
    /// Whether the request caused the failure (see [`NixError::is_the_requests`]).
    pub fn is_the_requests(&self) -> bool {
        matches!(self, BuildError::Nix(nix) if nix.is_the_requests())
    }

    /// The failure in words for the person asking, when it is not Nix's to tell (details go to
    /// the log).
    pub fn public_message(&self) -> String {
        match self {
            BuildError::Nix(nix) => nix.to_string(),
            BuildError::Source(err) => err.to_string(),
            BuildError::Storage(_) => {
                "the image could not be built because storage failed; see the server log".to_owned()
            }
            BuildError::Pack(_) => {
                "a layer could not be packed into storage (is the disk full?); see the server log"
                    .to_owned()
            }
            BuildError::Refused(_) | BuildError::Cancelled => self.to_string(),
            BuildError::NoRoot(_) | BuildError::Panicked(_) => {
                "the image could not be built because of a fault in nixery; see the server log"
                    .to_owned()
            }
        }
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
            docker: Arc::new(Manifest::new(docker, Format::Docker.manifest_type())),
            oci: Arc::new(Manifest::new(oci, Format::Oci.manifest_type())),
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

/// One image asked for: its name, the tag, the package set the tag pinned, and the platform.
#[derive(Clone, Debug)]
pub struct Request {
    pub name: ImageName,
    pub tag: Tag,
    pub pin: Pin,
    pub platform: Platform,
}

impl Request {
    fn key(&self) -> RunKey {
        RunKey::new(&self.pin, &self.name, self.platform)
    }

    fn packages(&self) -> &BTreeSet<String> {
        self.name.packages()
    }

    /// The name that asks for this image alone: the name, with the platform's component in
    /// front when the name does not choose it (`arm64/shell/hello` for the arm64 image of an
    /// index of `shell/hello`).
    pub fn name_alone(&self) -> String {
        match (self.name.platform(), self.platform.name_component()) {
            (None, Some(component)) => format!("{component}/{}", self.name),
            _ => self.name.to_string(),
        }
    }

    /// The same image for another platform.
    pub fn for_platform(&self, platform: Platform) -> Request {
        Request {
            platform,
            ..self.clone()
        }
    }
}

/// What a build yields: the image, where it was found if it was not built now, its layers.
struct Built {
    image: Arc<Image>,
    cached: Option<&'static str>,
    layers: Vec<LayerSummary>,
}

impl Built {
    /// An image found cached: its layers as its manifest lists them.
    fn cached(image: Arc<Image>, level: &'static str) -> Built {
        let layers = manifest::layers(&image.docker.bytes)
            .unwrap_or_default()
            .into_iter()
            .map(|(digest, size)| LayerSummary {
                digest: digest.to_string(),
                size,
                paths: None,
                new: None,
            })
            .collect();
        Built {
            image,
            cached: Some(level),
            layers,
        }
    }

    fn event(&self) -> Event {
        Event::Done {
            digest: self.image.docker.digest.to_string(),
            cached: self.cached,
            layers: self.layers.clone(),
        }
    }
}

/// The last event of a failed build.
fn failed_event(err: &BuildError, package_set: &str) -> Event {
    match err {
        BuildError::Nix(nix) => Event::Failed {
            reason: nix.reason_code().unwrap_or("error"),
            packages: nix.packages().to_vec(),
            message: nix.describe(package_set),
            log: nix.log_tail(),
        },
        other => Event::Failed {
            reason: "error",
            packages: Vec::new(),
            message: other.public_message(),
            log: String::new(),
        },
    }
}

impl From<NixError> for BuildError {
    fn from(err: NixError) -> Self {
        BuildError::Nix(Arc::new(err))
    }
}

type Build = Shared<BoxFuture<'static, Result<Arc<Image>, Arc<BuildError>>>>;

/// A path source's evaluations, by (path, packages, Nix system).
type Evaluations = Ttl<(PathBuf, BTreeSet<String>, &'static str), Derivation, NixError>;

/// Settings of the image service.
pub struct Settings {
    /// Most layers per image, the root layer included.
    pub max_layers: usize,
    /// Popularity data guiding layering (empty: none).
    pub popularity: Arc<Popularity>,
    /// libdeflate level, 1 … 12.
    pub gzip_level: i32,
    /// How long a path source's evaluation of an image is reused.
    pub source_ttl: std::time::Duration,
    /// Most images kept in memory (each with its two manifests); also the most failures
    /// remembered.
    pub memory_entries: NonZeroUsize,
    /// How long a failure the request caused is answered from memory instead of running Nix
    /// again (Docker asks again with GET after a failed HEAD).
    pub failure_ttl: std::time::Duration,
    /// Free space to keep in the Nix store's file system (none: never collect).
    pub gc_min_free: Option<gc::MinFree>,
}

/// What the HTTP layer asks of the image service. A trait, so that router tests can put a small
/// in-memory service behind the same routes and run without Nix.
#[async_trait::async_trait]
pub trait Images: Send + Sync + 'static {
    /// The image `request` names, built now if need be.
    async fn image(self: Arc<Self>, request: &Request) -> Result<Arc<Image>, Arc<BuildError>>;

    /// The index of `request`'s image for each of `platforms`, in that order: each platform's
    /// image built now if need be (in parallel, each one build however many ask), then listed.
    /// Fails with the first platform whose image fails; no index is stored then.
    async fn index(
        self: Arc<Self>,
        request: &Request,
        platforms: &[Platform],
    ) -> Result<Arc<Index>, PlatformFailure>;

    /// The build of `request`, started now unless one is running (joined) or the image is in
    /// memory (a build already done); does not wait for it. Refused when the build queue is
    /// full.
    fn start(self: Arc<Self>, request: &Request) -> Result<Arc<Run>, Arc<BuildError>>;

    /// The build of `request` this server is running or finished lately (or, for an image in
    /// memory, a finished one made now); `None` when there is none.
    fn build_of(&self, request: &Request) -> Option<Arc<Run>>;

    /// Up to `n` builds, running ones first, then the most recently finished.
    fn recent_builds(&self, n: usize) -> Vec<Arc<Run>>;

    /// Cancels every running build (at shutdown): their Nix processes are stopped, their
    /// staging files removed. Returns how many there were.
    fn cancel_builds(&self) -> usize;

    /// Blob `digest` as clients should get it (a manifest with its own media type).
    async fn blob(&self, digest: &Digest, head: bool) -> Result<Option<Served>, StorageError>;

    /// A manifest this registry stored, by digest.
    async fn stored_manifest(&self, digest: &Digest)
    -> Result<Option<Arc<Manifest>>, StorageError>;

    /// The descriptors of the artifacts (SBOMs) whose subject is manifest `digest`, for the
    /// referrers API: none when there are none.
    async fn referrers(&self, digest: &Digest) -> Result<Vec<serde_json::Value>, StorageError>;

    /// The SBOM of image manifest `digest` in `artifact_type` ([`SPDX`] or [`CYCLONEDX`]).
    async fn sbom(
        &self,
        digest: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Vec<u8>>, StorageError>;
}

#[async_trait::async_trait]
impl Images for Builder {
    async fn image(self: Arc<Self>, request: &Request) -> Result<Arc<Image>, Arc<BuildError>> {
        Builder::image(&self, request).await
    }

    async fn index(
        self: Arc<Self>,
        request: &Request,
        platforms: &[Platform],
    ) -> Result<Arc<Index>, PlatformFailure> {
        Builder::index(&self, request, platforms).await
    }

    fn start(self: Arc<Self>, request: &Request) -> Result<Arc<Run>, Arc<BuildError>> {
        Builder::start(&self, request)
    }

    fn build_of(&self, request: &Request) -> Option<Arc<Run>> {
        Builder::build_of(self, request)
    }

    fn recent_builds(&self, n: usize) -> Vec<Arc<Run>> {
        self.progress.recent(n)
    }

    fn cancel_builds(&self) -> usize {
        let building = lock(&self.building);
        for (_, abort) in building.values() {
            abort.abort();
        }
        building.len()
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

    async fn referrers(&self, digest: &Digest) -> Result<Vec<serde_json::Value>, StorageError> {
        Builder::referrers(self, digest).await
    }

    async fn sbom(
        &self,
        digest: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        Builder::sbom(self, digest, artifact_type).await
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
    /// The build running for each image and package set, and how to cancel it.
    building: Mutex<HashMap<RunKey, (Build, tokio::task::AbortHandle)>>,
    /// Every build's events.
    progress: Progress,
    /// Failures the request caused, by image and package set, with when they happened.
    failures: Mutex<lru::LruCache<RunKey, (Instant, Arc<BuildError>)>>,
    /// Places for new work (NIXERY_MAX_BUILDS), the queue, and each client's rate: shared
    /// with the catalogs.
    admission: Arc<Admission>,
    /// The Nix store's collector, whose lock builds share.
    collector: Arc<gc::Collector>,
}

impl Builder {
    pub fn new(
        nix: Nix,
        storage: Arc<dyn Storage>,
        sources: Arc<Sources>,
        admission: Arc<Admission>,
        settings: Settings,
    ) -> Arc<Self> {
        let collector = Arc::new(gc::Collector::new(
            settings.gc_min_free,
            PathBuf::from("/nix/store"),
            nix.env().clone(),
        ));
        let builder = Arc::new(Builder {
            admission,
            collector: collector.clone(),
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
            progress: Progress::default(),
        });
        // Evaluations name derivations a collection may have deleted: forget them after one.
        let evaluations = Arc::downgrade(&builder);
        tokio::spawn(async move {
            collector
                .run(|| {
                    if let Some(builder) = evaluations.upgrade() {
                        builder.evaluations.clear();
                    }
                })
                .await
        });
        builder
    }

    /// The image `request` names, from memory, else from its build (joined if one is running,
    /// started if not). A failure the request caused is answered again from memory for
    /// `failure_ttl`. The build runs in its own task: a client that goes away does not cancel
    /// it, and concurrent requests share it. A commit clients may not name
    /// ([`Sources::admit`]) is served only from storage.
    pub async fn image(self: &Arc<Self>, request: &Request) -> Result<Arc<Image>, Arc<BuildError>> {
        if let Some(err) = self.remembered_failure(&request.key()) {
            METRICS.build_outcome("remembered_failure");
            return Err(err);
        }
        if let Some(image) = self.in_memory(request) {
            METRICS.cache_lookup("memory");
            METRICS.build_outcome("cached");
            return Ok(image);
        }
        // A commit's image stored before a restart (or by another replica) is a warm pull:
        // served whoever may name the commit (NIXERY_COMMIT_PINS), and never admitted nor
        // counted against the client.
        if let Pin::Commit { .. } = request.pin {
            let key = self.manifest_key(request, None);
            if let Ok(Some(built)) = self.stored(&key).await {
                self.remember(&key, &built.image);
                return Ok(built.image);
            }
        }
        // A commit clients may not name: nothing is fetched or built.
        if let Err(refused) = self.sources.admit(&request.tag).await {
            return Err(Arc::new(refused.into()));
        }
        match self.join_or_start(request) {
            Ok((_, build)) => build.await,
            Err(refused) => Err(refused),
        }
    }

    /// See [`Images::start`]. A failure the request caused is answered from memory for
    /// `failure_ttl`, as for a pull.
    pub fn start(self: &Arc<Self>, request: &Request) -> Result<Arc<Run>, Arc<BuildError>> {
        let key = request.key();
        let run = self.progress.get(&key);
        if let Some(run) = &run
            && run.status() == events::Status::Running
        {
            return Ok(run.clone());
        }
        if let Some(err) = self.remembered_failure(&key) {
            return Ok(
                match run.filter(|run| run.status() == events::Status::Failed) {
                    Some(run) => run,
                    None => {
                        let package_set = self.sources.describe_pin(&request.pin);
                        let failed = failed_event(&err, &package_set);
                        Progress::finished_now(&key, self.described(request), failed)
                    }
                },
            );
        }
        if let Some(image) = self.in_memory(request) {
            return Ok(self.finished_in_memory(request, image));
        }
        Ok(self.join_or_start(request)?.0)
    }

    /// See [`Images::build_of`].
    pub fn build_of(&self, request: &Request) -> Option<Arc<Run>> {
        if let Some(run) = self.progress.get(&request.key()) {
            return Some(run);
        }
        let image = self.in_memory(request)?;
        Some(self.finished_in_memory(request, image))
    }

    /// A finished build for an image found in memory (not kept: it costs nothing to make).
    fn finished_in_memory(&self, request: &Request, image: Arc<Image>) -> Arc<Run> {
        Progress::finished_now(
            &request.key(),
            self.described(request),
            Built::cached(image, "memory").event(),
        )
    }

    /// What a build page says of the build of `request`.
    fn described(&self, request: &Request) -> events::Described {
        events::Described {
            image: request.name_alone(),
            tag: request.tag.to_string(),
            package_set: self.sources.describe_pin(&request.pin),
            platform: request.platform.to_string(),
        }
    }

    /// A failure of this image the request caused, less than `failure_ttl` ago.
    fn remembered_failure(&self, key: &RunKey) -> Option<Arc<BuildError>> {
        let (at, err) = lock(&self.failures).get(key).cloned()?;
        (at.elapsed() < self.settings.failure_ttl).then_some(err)
    }

    /// The image `request` names if it is in memory and its key is known without running Nix
    /// (a commit, or a path whose evaluation is fresh).
    fn in_memory(&self, request: &Request) -> Option<Arc<Image>> {
        let drv = match &request.pin {
            Pin::Commit { .. } => None,
            Pin::Path(path) => Some(self.evaluations.fresh(&(
                path.clone(),
                request.packages().clone(),
                request.platform.system(),
            ))?),
        };
        let key = self.manifest_key(request, drv.as_ref());
        lock(&self.built).get(&key).cloned()
    }

    /// The running build of `request`, or a new one unless the queue is full.
    fn join_or_start(
        self: &Arc<Self>,
        request: &Request,
    ) -> Result<(Arc<Run>, Build), Arc<BuildError>> {
        let key = request.key();
        let mut building = lock(&self.building);
        if let Some((build, _)) = building.get(&key)
            && let Some(run) = self.progress.get(&key)
        {
            return Ok((run, build.clone()));
        }
        self.admission
            .may_start()
            .map_err(|refusal| Arc::new(BuildError::Refused(refusal)))?;
        let run = self.progress.start(key.clone(), self.described(request));
        let finish = {
            let this = self.clone();
            let run = run.clone();
            let key = key.clone();
            move |result: &Result<Built, Arc<BuildError>>| {
                match result {
                    Ok(built) => this.progress.finish(&run, built.event(), true),
                    Err(err) => {
                        METRICS.build_outcome(err.outcome());
                        if err.is_the_requests() {
                            lock(&this.failures).put(key.clone(), (Instant::now(), err.clone()));
                        }
                        this.progress
                            .finish(&run, failed_event(err, &run.package_set), true);
                    }
                }
                lock(&this.building).remove(&key);
            }
        };
        let this = self.clone();
        let task_run = run.clone();
        let task_request = request.clone();
        let (build, abort) = spawn_build(
            async move { this.run_build(&task_run, &task_request).await },
            finish,
        );
        building.insert(request.key(), (build.clone(), abort));
        Ok((run, build))
    }

    /// One build, from the package set to a stored image, telling `run` how it goes. An image
    /// of a commit found in storage needs no place; anything else waits for one, and holds the
    /// Nix store against collection until its layers are packed.
    async fn run_build(&self, run: &Arc<Run>, request: &Request) -> Result<Built, BuildError> {
        if let Pin::Commit { .. } = request.pin {
            let key = self.manifest_key(request, None);
            if let Some(built) = self.stored(&key).await? {
                self.remember(&key, &built.image);
                return Ok(built);
            }
        }
        let _place = self
            .admission
            .admit(Some(run.clone()))
            .await
            .map_err(|e| BuildError::Panicked(e.to_string()))?;
        let _store = self.collector.hold().await;
        let built = self.build_held(run, request).await;
        self.collector.check_soon();
        built
    }

    /// [`Builder::run_build`] once it has a place and holds the store.
    async fn build_held(&self, run: &Run, request: &Request) -> Result<Built, BuildError> {
        let drv = match &request.pin {
            Pin::Path(path) => {
                run.emit(Event::Source {
                    package_set: run.package_set.clone(),
                });
                let started = Instant::now();
                let drv = self.evaluate_path(path, request).await;
                METRICS.phase("evaluate", started.elapsed());
                let drv = drv.map_err(BuildError::Nix)?;
                run.emit(Event::Evaluated {
                    derivation: drv.as_str().to_owned(),
                });
                Some(drv)
            }
            Pin::Commit { .. } => None,
        };
        let key = self.manifest_key(request, drv.as_ref());
        let cached = lock(&self.built).get(&key).cloned();
        if let Some(image) = cached {
            METRICS.cache_lookup("memory");
            METRICS.build_outcome("cached");
            return Ok(Built::cached(image, "memory"));
        }
        let built = self.cached_or_build(run, &key, request, drv).await?;
        self.remember(&key, &built.image);
        Ok(built)
    }

    fn remember(&self, key: &str, image: &Arc<Image>) {
        let mut built = lock(&self.built);
        built.put(key.to_owned(), image.clone());
        METRICS.cache_size("images", built.len());
        drop(built);
        self.remember_manifests([&image.docker, &image.oci]);
    }

    /// Keeps manifests (or indexes) in memory to serve by digest.
    fn remember_manifests<'a>(&self, served: impl IntoIterator<Item = &'a Arc<Manifest>>) {
        let mut manifests = lock(&self.manifests);
        for manifest in served {
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
        let Some(media_type) = manifest::declared_media_type(&bytes)
            .as_deref()
            .and_then(Format::known_media_type)
        else {
            return Ok(None);
        };
        let manifest = Arc::new(Manifest::new(bytes, media_type));
        if &manifest.digest != digest {
            tracing::error!(%digest, actual = %manifest.digest, "stored manifest does not match its digest");
            return Ok(None);
        }
        self.remember_manifests([&manifest]);
        Ok(Some(manifest))
    }

    /// The derivation of `request`'s image in the package set at `path`, evaluated at most once
    /// per source TTL: a path's contents can change under the server, and what Nix makes of them
    /// is what the image is keyed on.
    async fn evaluate_path(
        &self,
        path: &std::path::Path,
        request: &Request,
    ) -> Result<Derivation, Arc<NixError>> {
        let nix = self.nix.clone();
        let system = request.platform.system();
        let key = (path.to_path_buf(), request.packages().clone(), system);
        // Evaluations are bounded by the TTL cache's own limit.
        let (path, packages, _) = key.clone();
        self.evaluations
            .get(&key, move || {
                async move { nix.evaluate(&path, &packages, system).await }.boxed()
            })
            .await
    }

    async fn cached_or_build(
        &self,
        run: &Run,
        key: &str,
        request: &Request,
        drv: Option<Derivation>,
    ) -> Result<Built, BuildError> {
        if let Some(built) = self.stored(key).await? {
            return Ok(built);
        }
        METRICS.cache_lookup("miss");
        let _in_flight = InFlight::start();
        let (drv, created) = match drv {
            Some(drv) => (drv, sbom::no_time()),
            None => {
                // Nix reads the tree only while it evaluates: what a build needs from it is then
                // in the store, and the tree may go.
                let started = Instant::now();
                let tree = self.sources.tree(&request.pin).await?;
                METRICS.phase("source", started.elapsed());
                let created = sbom::commit_time(tree.path());
                run.emit(Event::Source {
                    package_set: run.package_set.clone(),
                });
                let started = Instant::now();
                let drv = self
                    .nix
                    .evaluate(tree.path(), request.packages(), request.platform.system())
                    .await?;
                METRICS.phase("evaluate", started.elapsed());
                run.emit(Event::Evaluated {
                    derivation: drv.as_str().to_owned(),
                });
                (drv, created)
            }
        };
        let built = self.build(run, &drv, request, created).await?;
        METRICS.build_outcome("built");
        self.storage
            .write_cache(Cache::Manifests, key, &built.image.docker.bytes)
            .await?;
        Ok(built)
    }

    /// The image of manifest key `key` from storage, when it and all its blobs are there.
    async fn stored(&self, key: &str) -> Result<Option<Built>, StorageError> {
        if let Some(docker) = self.storage.read_cache(Cache::Manifests, key).await?
            && let Some(oci) = manifest::convert(&docker, Format::Oci)
        {
            let image = Image::new(docker, oci);
            if self.all_stored(&image).await? {
                tracing::debug!(digest = %image.docker.digest, "manifest from cache");
                METRICS.cache_lookup("storage");
                METRICS.build_outcome("cached");
                return Ok(Some(Built::cached(Arc::new(image), "storage")));
            }
        }
        Ok(None)
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

    /// Builds the image of `drv` for `request` (its package set made at `created`): runs Nix,
    /// packs and stores the layers, config, manifests and SBOMs.
    async fn build(
        &self,
        run: &Run,
        drv: &Derivation,
        request: &Request,
        created: String,
    ) -> Result<Built, BuildError> {
        let started = Instant::now();
        let mut derivations = DerivationCount::default();
        // The GC root keeps the closure in the store until the image is packed and stored.
        let (closure, _gc_root) = self
            .nix
            .build_observed(drv, &mut |progress| {
                if derivations.saw(progress) {
                    run.emit(derivations.event());
                }
            })
            .await?;
        derivations.finished();
        run.emit(derivations.event());
        METRICS.phase("build", started.elapsed());
        run.emit(Event::Built {
            paths: closure.paths.len(),
            bytes: closure.paths.iter().map(|p| p.nar_size).sum(),
        });
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
        let total = groups.len() + 1;
        let mut packing =
            futures::stream::iter(groups.into_iter().enumerate().map(|(i, paths)| async move {
                let (layer, new) = self.layer(closure, Some(&paths), false).await?;
                let summary = summary(&layer, Some(paths), new);
                Ok::<_, BuildError>((i, layer, summary))
            }))
            .buffer_unordered(parallelism());
        let mut numbered = Vec::with_capacity(total);
        let mut bytes = 0;
        while let Some(packed) = packing.next().await {
            let (i, layer, summary) = packed?;
            bytes += layer.size;
            numbered.push((i, layer, summary));
            run.emit(Event::Layers {
                done: numbered.len(),
                total,
                bytes,
            });
        }
        drop(packing);
        numbered.sort_by_key(|(i, ..)| *i);
        let (mut layers, mut summaries): (Vec<Layer>, Vec<LayerSummary>) =
            numbered.into_iter().map(|(_, l, s)| (l, s)).unzip();
        let setup = request.name.setup();
        let (root, new) = self.layer(closure, None, setup.nonroot).await?;
        run.emit(Event::Layers {
            done: total,
            total,
            bytes: bytes + root.size,
        });
        summaries.push(summary(&root, None, new));
        layers.push(root);

        let settings = image_settings(request, closure);
        let docs = manifest::image_documents(&layers, &settings);
        let storage = self.storage.as_ref();
        storage::put_bytes(storage, &docs.config, None).await?;
        storage::put_bytes(storage, &docs.oci, Some(Format::Oci.manifest_type())).await?;
        storage::put_bytes(storage, &docs.docker, Some(Format::Docker.manifest_type())).await?;
        let image = Image::new(docs.docker, docs.oci);
        METRICS.phase("layers", started.elapsed());
        let started = Instant::now();
        let sboms = self.store_sboms(request, &image, closure, created).await?;
        METRICS.phase("sbom", started.elapsed());
        run.emit(Event::Stored { blobs: 3 + sboms });
        tracing::info!(digest = %image.docker.digest, layers = layers.len(), platform = %request.platform, "image built");
        Ok(Built {
            image: Arc::new(image),
            cached: None,
            layers: summaries,
        })
    }

    /// The layer of a group of store paths, or of the image root (with the `nonroot` user when
    /// `nonroot`) when `paths` is `None`: from the layer cache when its blob is stored, else
    /// packed and stored now.
    async fn layer(
        &self,
        closure: &Closure,
        paths: Option<&Vec<String>>,
        nonroot: bool,
    ) -> Result<(Layer, bool), BuildError> {
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "{FORMAT_VERSION}\ngzip {}\n",
            self.settings.gzip_level
        ));
        match &paths {
            Some(paths) => paths.iter().for_each(|p| hasher.update(format!("{p}\n"))),
            None => hasher.update(format!("root {}\n", closure.root)),
        }
        if nonroot {
            hasher.update("nonroot\n");
        }
        let key = hex::encode(hasher.finalize());
        if let Some(bytes) = self.storage.read_cache(Cache::Layers, &key).await?
            && let Ok(layer) = serde_json::from_slice::<Layer>(&bytes)
            && self.storage.has_blob(&layer.digest).await?
        {
            return Ok((layer, false));
        }

        let staging = self.storage.staging().clone();
        let level = self.settings.gzip_level;
        let root = closure.root.clone();
        let paths = paths.cloned();
        let (staged, layer) =
            tokio::task::spawn_blocking(move || -> std::io::Result<(StagedBlob, Layer)> {
                let mut staged = staging.stage()?;
                let out = std::io::BufWriter::with_capacity(1 << 20, &mut staged);
                let contents = match &paths {
                    Some(paths) => LayerContents::StorePaths(paths),
                    None => LayerContents::Root {
                        path: std::path::Path::new(&root),
                        nonroot,
                    },
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
        Ok((layer, true))
    }

    /// The manifest cache key: everything that changes an image's bytes. A commit's image is
    /// keyed on the source URL, commit and platform, so replicas and restarts find it without
    /// Nix; a path source's on the derivation Nix evaluated, so it follows the set's contents.
    fn manifest_key(&self, request: &Request, drv: Option<&Derivation>) -> String {
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "{FORMAT_VERSION}\nlayers {}\ngzip {}\narchitecture {}\nsystem {}\n",
            self.settings.max_layers,
            self.settings.gzip_level,
            request.platform.architecture(),
            request.platform.system()
        ));
        if let Some(variant) = request.platform.variant() {
            hasher.update(format!("variant {variant}\n"));
        }
        hasher.update(request.name.setup().key_lines());
        // Images cached before they had SBOMs are built again (to the same bytes) to get them.
        hasher.update("sboms\n");
        if !self.settings.popularity.is_empty() {
            hasher.update(format!(
                "popularity {}\n",
                self.settings.popularity.fingerprint()
            ));
        }
        match (&request.pin, drv) {
            (Pin::Commit { commit, source }, _) => {
                hasher.update(format!("source {source}\ncommit {commit}\n"))
            }
            (Pin::Path(_), Some(drv)) => hasher.update(format!("drv {}\n", drv.as_str())),
            (Pin::Path(path), None) => hasher.update(format!("path {}\n", path.display())),
        }
        for package in request.packages() {
            hasher.update(format!("{package}\n"));
        }
        hex::encode(hasher.finalize())
    }
}

/// What the build page shows of a layer.
fn summary(layer: &Layer, paths: Option<Vec<String>>, new: bool) -> LayerSummary {
    LayerSummary {
        digest: layer.digest.to_string(),
        size: layer.size,
        paths: Some(paths.unwrap_or_default()),
        new: Some(new),
    }
}

/// nix-build's derivations, counted from what it prints: how many it has to build, how many it
/// started (they run one at a time unless `max-jobs` says otherwise), the one building now.
#[derive(Default)]
struct DerivationCount {
    total: usize,
    started: usize,
    current: Option<String>,
    fetched: usize,
    finished: bool,
}

impl DerivationCount {
    /// Counts `progress`; whether it changed what the build page shows.
    fn saw(&mut self, progress: NixProgress) -> bool {
        match progress {
            NixProgress::Planned { derivations } => self.total += derivations,
            NixProgress::Building { name, machine } => {
                self.started += 1;
                self.current = Some(match machine {
                    Some(machine) => format!("{name} on {machine}"),
                    None => name,
                });
            }
            NixProgress::Copying { .. } => self.fetched += 1,
            NixProgress::Fetching { .. } => return false,
        }
        true
    }

    fn finished(&mut self) {
        self.finished = true;
        self.current = None;
    }

    fn event(&self) -> Event {
        let done = if self.finished {
            self.total.max(self.started)
        } else {
            self.started.saturating_sub(1)
        };
        Event::Derivations {
            done,
            total: self.total.max(self.started),
            current: self.current.clone(),
            fetched: self.fetched,
        }
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
/// everyone who awaits it; `finish` sees the result before any waiter does. A panic in the
/// build becomes [`BuildError::Panicked`] for `finish` and every waiter: the next request builds
/// again instead of waiting on a dead task.
fn spawn_build(
    build: impl Future<Output = Result<Built, BuildError>> + Send + 'static,
    finish: impl FnOnce(&Result<Built, Arc<BuildError>>) + Send + 'static,
) -> (Build, tokio::task::AbortHandle) {
    let task = tokio::spawn(async move {
        let result = match std::panic::AssertUnwindSafe(build).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                let message = crate::sync::panic_message(panic.as_ref());
                tracing::error!(panic = %message, "an image build panicked");
                Err(BuildError::Panicked(message))
            }
        }
        .map_err(Arc::new);
        finish(&result);
        result.map(|built| built.image)
    });
    let abort = task.abort_handle();
    let build = async move {
        task.await.unwrap_or_else(|join| {
            // Panics are caught in the task: only cancellation (at shutdown) is left.
            Err(Arc::new(if join.is_cancelled() {
                BuildError::Cancelled
            } else {
                BuildError::Panicked(join.to_string())
            }))
        })
    }
    .boxed()
    .shared();
    (build, abort)
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

/// The image config of `request`: nixery's defaults (`bash` to run when the image has it, where
/// the image came from), then what `nonroot` and a declaration set.
fn image_settings(request: &Request, closure: &Closure) -> ImageSettings {
    let mut settings = ImageSettings {
        architecture: request.platform.architecture().to_owned(),
        variant: request.platform.variant().map(str::to_owned),
        cmd: has_shell(request.packages()).then(|| vec!["bash".to_owned()]),
        labels: labels(&request.pin, closure),
        ..ImageSettings::default()
    };
    let setup = request.name.setup();
    if setup.nonroot {
        settings.user = Some(nonroot::USER.to_owned());
        settings
            .env
            .insert("HOME".to_owned(), nonroot::HOME.to_owned());
    }
    if let Some(config) = &setup.config {
        settings.user = config.user.clone().or(settings.user);
        settings.env.extend(config.env.clone());
        settings.labels.extend(config.labels.clone());
        // An entrypoint of the declaration's own gets no `bash` to run as its arguments.
        if config.entrypoint.is_some() {
            settings.cmd = None;
        }
        settings.entrypoint = config.entrypoint.clone();
        settings.cmd = config.cmd.clone().or(settings.cmd);
        settings.working_dir = config.workdir.clone();
    }
    settings
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
        let (build, _) = spawn_build(
            async {
                panic!("boom");
                #[allow(unreachable_code)]
                Err(BuildError::Panicked(String::new()))
            },
            move |result: &Result<Built, Arc<BuildError>>| {
                flag.store(result.is_err(), Ordering::SeqCst)
            },
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
            "finish did not see the failure"
        );
    }
}
