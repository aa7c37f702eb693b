//! The image service: from an image name to a stored manifest, with one build at a time per
//! image however many clients ask for it. Each build publishes its phases ([`events`]) for the
//! build pages and the builds API. A request goes through:
//!
//! - [`flight`]: memory, remembered failures, the running build to join, admission;
//! - [`pipeline`]: one build, from the package set's evaluation to stored layers and documents;
//! - [`keys`]: the cache keys an image and its layers are found by;
//! - [`reads`]: what clients read back (blobs, manifests by digest);
//! - [`image_index`] and [`artifacts`]: multi-platform indexes, and each image's SBOMs.
//!
//! Nix sits behind [`NixRunner`], so this logic is tested without it.

mod artifacts;
mod attestations;
pub mod events;
mod flight;
mod image_config;
mod image_index;
mod keys;
mod pipeline;
mod reads;
mod runner;
mod signatures;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::admission::{Admission, Refusal};
use crate::image::{ImageName, Platform, Tag, ZSTD_LAYERS};
use crate::layers::store::LayerError;
use crate::layers::{Codec, Popularity};
use crate::manifest::{self, Compression, Digest, Format, Manifest};
use crate::nix::{Derivation, NixError, gc};
use crate::source::{Pin, SourceError, Sources};
use crate::storage::{Storage, StorageError};
use crate::ttl::Ttl;
pub use artifacts::{CYCLONEDX, SPDX};
use events::{Event, LayerSummary, Progress, Run, RunKey};
use flight::Build;
pub use image_index::{Index, PlatformFailure};
pub use reads::Served;
pub use runner::NixRunner;
pub use signatures::Attached;

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

impl From<NixError> for BuildError {
    fn from(err: NixError) -> Self {
        BuildError::Nix(Arc::new(err))
    }
}

impl From<LayerError> for BuildError {
    fn from(err: LayerError) -> Self {
        match err {
            LayerError::Storage(err) => BuildError::Storage(err),
            LayerError::Pack(err) => BuildError::Pack(err),
        }
    }
}

/// A built image: its manifests. A gzip image has a Docker and an OCI manifest of the same
/// config and layers; a zstd image has only its OCI manifest (Docker's family has no zstd layer
/// type), answered whatever the format: the registry routes give a zstd image only to clients
/// that read OCI.
#[derive(Debug)]
pub struct Image {
    docker: Option<Arc<Manifest>>,
    oci: Arc<Manifest>,
}

impl Image {
    /// A gzip image of these two manifests (the same config and layers).
    pub fn new(docker: Vec<u8>, oci: Vec<u8>) -> Self {
        Image {
            docker: Some(Arc::new(Manifest::new(
                docker,
                Format::Docker.manifest_type(),
            ))),
            oci: Arc::new(Manifest::new(oci, Format::Oci.manifest_type())),
        }
    }

    /// A zstd image of this OCI manifest.
    pub fn zstd(oci: Vec<u8>) -> Self {
        Image {
            docker: None,
            oci: Arc::new(Manifest::new(oci, Format::Oci.manifest_type())),
        }
    }

    /// The image of `docs`: gzip when they have a Docker manifest, else zstd.
    fn of(docs: manifest::ImageDocuments) -> Self {
        match docs.docker {
            Some(docker) => Image::new(docker, docs.oci),
            None => Image::zstd(docs.oci),
        }
    }

    /// The manifest in `format` (a zstd image's OCI manifest in either).
    pub fn manifest(&self, format: Format) -> &Arc<Manifest> {
        match (format, &self.docker) {
            (Format::Docker, Some(docker)) => docker,
            _ => &self.oci,
        }
    }

    /// The manifest the image is known by, and kept under its manifest key: the Docker one of a
    /// gzip image, the OCI one of a zstd image.
    pub fn main(&self) -> &Arc<Manifest> {
        self.manifest(Format::Docker)
    }

    /// Each of the image's manifests, once.
    pub fn manifests(&self) -> impl Iterator<Item = &Arc<Manifest>> {
        self.docker.iter().chain(std::iter::once(&self.oci))
    }

    /// How the image's layers are compressed.
    pub fn compression(&self) -> Compression {
        match self.docker {
            Some(_) => Compression::Gzip,
            None => Compression::Zstd,
        }
    }
}

/// One image asked for: its name, the tag, the package set the tag pinned, the platform, and
/// how its layers are compressed.
#[derive(Clone, Debug)]
pub struct Request {
    pub name: ImageName,
    pub tag: Tag,
    pub pin: Pin,
    pub platform: Platform,
    pub compression: Compression,
}

impl Request {
    fn key(&self) -> RunKey {
        RunKey::new(&self.pin, &self.name, self.platform, self.compression)
    }

    fn packages(&self) -> &BTreeSet<String> {
        self.name.packages()
    }

    /// The packages as one name, sorted (`hello/shell`): the same image whatever the order of
    /// the name's components, as SBOMs and provenance name it.
    fn packages_name(&self) -> String {
        self.packages()
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The name that asks for this image alone: the name, with the platform's component in
    /// front when the name does not choose it (`arm64/shell/hello` for the arm64 image of an
    /// index of `shell/hello`), and `zstd-layers` when the layers are zstd and the name does not
    /// say so (the server's default).
    pub fn name_alone(&self) -> String {
        let name = match (self.name.platform(), self.platform.name_component()) {
            (None, Some(component)) => format!("{component}/{}", self.name),
            _ => self.name.to_string(),
        };
        if self.compression == Compression::Zstd && !self.name.zstd_layers() {
            format!("{ZSTD_LAYERS}/{name}")
        } else {
            name
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
        let layers = manifest::layers(&image.main().bytes)
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
            digest: self.image.main().digest.to_string(),
            cached: self.cached,
            layers: self.layers.clone(),
        }
    }
}

/// A path source's evaluations, by (path, packages, Nix system).
type Evaluations = Ttl<(PathBuf, BTreeSet<String>, &'static str), Derivation, NixError>;

/// The NAR hash of each package set's tree, for provenance: one `nix-hash` per tree and source
/// TTL, however many images are built from it.
type TreeHashes = Ttl<PathBuf, String, NixError>;

/// Settings of the image service.
pub struct Settings {
    /// Most layers per image, the root layer included.
    pub max_layers: usize,
    /// Popularity data guiding layering (empty: none).
    pub popularity: Arc<Popularity>,
    /// libdeflate level, 1 … 12.
    pub gzip_level: i32,
    /// zstd level, 1 … 19.
    pub zstd_level: i32,
    /// How long a path source's evaluation of an image is reused.
    pub source_ttl: std::time::Duration,
    /// Most images kept in memory (each with its two manifests); also the most failures
    /// remembered.
    pub memory_entries: NonZeroUsize,
    /// How long a failure the request caused is answered from memory instead of running Nix
    /// again (Docker asks again with GET after a failed HEAD).
    pub failure_ttl: std::time::Duration,
    /// What signs images (`NIXERY_SIGNING_KEY`); none: nothing is signed.
    pub signer: Option<Arc<crate::signing::Signer>>,
}

impl Settings {
    /// How layers compressed with `compression` are packed, at the level set for it.
    pub fn codec(&self, compression: Compression) -> Codec {
        match compression {
            Compression::Gzip => Codec::Gzip(self.gzip_level),
            Compression::Zstd => Codec::Zstd(self.zstd_level),
        }
    }
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

    /// The descriptors of the artifacts whose subject is manifest `digest` under `name`, for
    /// the referrers API: its SBOMs, signatures and attestations; none when there are none.
    async fn referrers(
        &self,
        name: &str,
        digest: &Digest,
    ) -> Result<Vec<serde_json::Value>, StorageError>;

    /// The signatures or attestations of manifest `digest` under `name` (cosign's `.sig` and
    /// `.att` tags), if it has them.
    async fn attachment(
        &self,
        name: &str,
        digest: &Digest,
        attached: Attached,
    ) -> Result<Option<Arc<Manifest>>, StorageError>;

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
        let image = Builder::image(&self, request).await?;
        self.sign_image(request, &image).await;
        Ok(image)
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
        Builder::cancel_builds(self)
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

    async fn referrers(
        &self,
        name: &str,
        digest: &Digest,
    ) -> Result<Vec<serde_json::Value>, StorageError> {
        Builder::referrers_of(self, name, digest).await
    }

    async fn attachment(
        &self,
        name: &str,
        digest: &Digest,
        attached: Attached,
    ) -> Result<Option<Arc<Manifest>>, StorageError> {
        Builder::attachment(self, name, digest, attached).await
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
    nix: Arc<dyn NixRunner>,
    storage: Arc<dyn Storage>,
    sources: Arc<Sources>,
    settings: Settings,
    evaluations: Evaluations,
    tree_hashes: TreeHashes,
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
    /// Whether each name's image (by name and manifest key) or index (by name and digest) is
    /// signed, once it was looked at ([`signatures`]).
    signed: Mutex<lru::LruCache<String, bool>>,
    /// Places for new work (NIXERY_MAX_BUILDS), the queue, and each client's rate: shared
    /// with the catalogs.
    admission: Arc<Admission>,
    /// The Nix store's collector, whose lock builds share.
    collector: Arc<gc::Collector>,
}

impl Builder {
    /// A builder running `nix`, sharing the Nix store with `collector` (and running it), keeping
    /// images in `storage`, packages from `sources`, its builds admitted by `admission`.
    pub fn new(
        nix: Arc<dyn NixRunner>,
        collector: Arc<gc::Collector>,
        storage: Arc<dyn Storage>,
        sources: Arc<Sources>,
        admission: Arc<Admission>,
        settings: Settings,
    ) -> Arc<Self> {
        let builder = Arc::new(Builder {
            admission,
            collector: collector.clone(),
            nix,
            storage,
            sources,
            evaluations: Ttl::new(settings.source_ttl, |_| false),
            tree_hashes: Ttl::new(settings.source_ttl, |_| false),
            built: Mutex::new(lru::LruCache::new(settings.memory_entries)),
            manifests: Mutex::new(lru::LruCache::new(
                settings
                    .memory_entries
                    .saturating_mul(NonZeroUsize::MIN.saturating_add(1)),
            )),
            failures: Mutex::new(lru::LruCache::new(settings.memory_entries)),
            signed: Mutex::new(lru::LruCache::new(settings.memory_entries)),
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
}
