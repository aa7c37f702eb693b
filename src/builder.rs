//! The image service: from an image name to a stored manifest. Runs Nix, groups and packs
//! layers (in parallel, each packed only once), stores blobs, and caches what it built, with one
//! build at a time per image however many clients ask for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{StreamExt, TryStreamExt};
use sha2::{Digest as _, Sha256};
use tempfile::NamedTempFile;

use crate::image::ImageName;
use crate::layers::{self, LayerContents};
use crate::manifest::{self, Digest, Format, ImageSettings, Layer};
use crate::nix::{Closure, Derivation, Nix, NixError};
use crate::source::{Pin, SourceError, Sources};
use crate::storage::{self, Cache, Storage, StorageError};
use crate::ttl::Ttl;

/// Bumped whenever packing or documents change, so old cache entries are not reused.
const FORMAT_VERSION: &str = "nixery-3";

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
}

/// A manifest ready to serve.
#[derive(Debug)]
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub format: Format,
}

impl Manifest {
    fn new(bytes: Vec<u8>, format: Format) -> Self {
        Manifest {
            digest: Digest::of(&bytes),
            bytes,
            format,
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
    fn new(docker: Vec<u8>, oci: Vec<u8>) -> Self {
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
    /// libdeflate level, 1 … 12.
    pub gzip_level: i32,
    /// GOARCH-style architecture written into image configurations.
    pub architecture: String,
    /// How long a path source's evaluation of an image is reused.
    pub source_ttl: std::time::Duration,
}

/// Builds images and remembers what it built.
pub struct Builder {
    nix: Arc<Nix>,
    storage: Arc<dyn Storage>,
    sources: Arc<Sources>,
    settings: Settings,
    evaluations: Evaluations,
    built: Mutex<HashMap<String, Arc<Image>>>,
    /// Every manifest of `built`, by digest.
    manifests: Mutex<HashMap<Digest, Arc<Manifest>>>,
    building: Mutex<HashMap<String, Build>>,
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
            settings,
            built: Mutex::default(),
            manifests: Mutex::default(),
            building: Mutex::default(),
        })
    }

    /// How many times nix-build has run.
    pub fn nix_builds(&self) -> u64 {
        self.nix.builds_started()
    }

    /// The image `name` stands for in the package set `pin`, from cache or built now. The build
    /// runs in its own task: a client that goes away does not cancel it, and concurrent requests
    /// share it.
    pub async fn image(
        self: &Arc<Self>,
        image: &ImageName,
        pin: &Pin,
    ) -> Result<Arc<Image>, Arc<BuildError>> {
        let drv = match pin {
            Pin::Path(path) => Some(
                self.evaluate_path(path, image.packages())
                    .await
                    .map_err(|e| Arc::new(BuildError::Nix(e)))?,
            ),
            Pin::Commit { .. } => None,
        };
        let key = self.manifest_key(image.packages(), pin, drv.as_ref());
        if let Some(manifest) = self.built.lock().expect("lock").get(&key) {
            return Ok(manifest.clone());
        }
        let build = {
            let mut building = self.building.lock().expect("lock");
            building
                .entry(key.clone())
                .or_insert_with(|| {
                    let this = self.clone();
                    let packages = image.packages().clone();
                    let key = key.clone();
                    let pin = pin.clone();
                    let task = tokio::spawn(async move {
                        let result = this.cached_or_build(&key, &packages, &pin, drv).await;
                        if let Ok(image) = &result {
                            this.remember(&key, image);
                        }
                        this.building.lock().expect("lock").remove(&key);
                        result.map_err(Arc::new)
                    });
                    async move { task.await.expect("image builds do not panic") }
                        .boxed()
                        .shared()
                })
                .clone()
        };
        build.await
    }

    fn remember(&self, key: &str, image: &Arc<Image>) {
        self.built
            .lock()
            .expect("lock")
            .insert(key.to_owned(), image.clone());
        let mut manifests = self.manifests.lock().expect("lock");
        for manifest in [&image.docker, &image.oci] {
            manifests.insert(manifest.digest.clone(), manifest.clone());
        }
    }

    /// A manifest of an image this server built or served since it started.
    pub fn known_manifest(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        self.manifests.lock().expect("lock").get(digest).cloned()
    }

    /// A manifest this registry stored, by digest: from memory, else read from storage (built
    /// before a restart, or by another replica). `None` when the digest is not stored, is not a
    /// manifest, or its bytes do not match it.
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
        let manifest = Manifest::new(bytes, format);
        if &manifest.digest != digest {
            tracing::error!(%digest, actual = %manifest.digest, "stored manifest does not match its digest");
            return Ok(None);
        }
        Ok(Some(Arc::new(manifest)))
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
                return Ok(Arc::new(image));
            }
        }
        let drv = match drv {
            Some(drv) => drv,
            None => {
                // Nix reads the tree only while it evaluates: what a build needs from it is then
                // in the store, and the tree may go.
                let tree = self.sources.tree(pin).await?;
                self.nix.evaluate(tree.path(), packages).await?
            }
        };
        let image = self.build(&drv, packages, pin).await?;
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
        let closure = self.nix.build(drv).await?;
        let groups = layers::group(&closure, self.settings.max_layers - 1);
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
        storage::put_bytes(self.storage.as_ref(), &docs.config).await?;
        storage::put_bytes(self.storage.as_ref(), &docs.oci).await?;
        storage::put_bytes(self.storage.as_ref(), &docs.docker).await?;
        let image = Image::new(docs.docker, docs.oci);
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
                let layer = layers::pack(contents, level, parallelism(), out)?;
                Ok((staged, layer))
            })
            .await
            .expect("packing does not panic")
            .map_err(BuildError::Pack)?;
        self.storage.commit(staged, &layer.digest).await?;
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
