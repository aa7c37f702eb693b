//! The application state every handler reaches, and its wiring: settings turned into storage,
//! the package source, Nix and the image service. Also the one reading of an image name and tag
//! into a build request, which the registry routes and the web routes share.

use std::sync::Arc;

use anyhow::Context;

use crate::builder::Request;
use crate::image::{ImageName, Platform, Tag};
use crate::manifest::Compression;
use crate::server::{auth, client, metrics};
use crate::source::SourceError;
use crate::{admission, builder, catalog, config, image, layers, nix, signing, source, storage};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub images: Arc<dyn builder::Images>,
    pub storage: Arc<dyn storage::Storage>,
    pub sources: Arc<source::Sources>,
    /// The package catalogs behind search and "did you mean".
    pub catalogs: Arc<catalog::Catalogs>,
    /// Places for Server-Sent Events streams of builds (`NIXERY_MAX_EVENT_STREAMS`).
    pub event_streams: Arc<tokio::sync::Semaphore>,
    /// Whether `/metrics` is served here (else on `NIXERY_METRICS_ADDRESS`).
    pub metrics_here: bool,
    /// The platforms images are built for (`NIXERY_PLATFORMS`).
    pub platforms: image::Platforms,
    /// The credentials every route but the health checks needs (`NIXERY_AUTH_HTPASSWD`).
    pub auth: Option<Arc<auth::Auth>>,
    /// The images declared in `NIXERY_IMAGES`.
    pub declared: Arc<image::declared::DeclaredImages>,
    /// Whose `X-Forwarded-For` names the client (`NIXERY_TRUSTED_PROXIES`).
    pub trusted_proxies: client::TrustedProxies,
    /// How layers are compressed when the name does not say (`NIXERY_LAYER_COMPRESSION`).
    pub layer_compression: Compression,
    /// What signs images (`NIXERY_SIGNING_KEY`); none: nothing is signed.
    pub signer: Option<Arc<signing::Signer>>,
}

/// When a tag that names a commit is checked against `NIXERY_COMMIT_PINS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagCheck {
    /// Before anything else: the web pages and API, which look builds up and start them.
    Now,
    /// By the image service, once it knows the image is not stored: a pull of an image already
    /// stored is served whatever the setting.
    WhenBuilding,
}

/// What an image name and tag ask for.
#[derive(Clone, Debug)]
pub struct Asked {
    /// The image for the platform the name chooses, or the default one.
    pub request: Request,
    /// The platforms of the image index a client that accepts one gets; empty: no index.
    pub index: Vec<Platform>,
}

impl AppState {
    /// The one reading of an image name and tag, for every route: a declared name stands for
    /// its declaration, the tag is pinned to a package set, and the name chooses its platforms
    /// and its layers' compression (`zstd-layers/…`, else the server's; the registry routes then
    /// fit it to the client, [`Compression::for_client`]).
    pub async fn request(
        &self,
        name: ImageName,
        tag: Tag,
        check: TagCheck,
    ) -> Result<Asked, SourceError> {
        let name = self.declared.resolve(name);
        let pin = match check {
            TagCheck::Now => self.sources.pin(&tag).await?,
            TagCheck::WhenBuilding => self.sources.resolve(&tag).await?,
        };
        Ok(Asked {
            index: self.platforms.indexed(&name).to_vec(),
            request: Request {
                platform: self.platforms.of(&name),
                compression: if name.zstd_layers() {
                    Compression::Zstd
                } else {
                    self.layer_compression
                },
                name,
                tag,
                pin,
            },
        })
    }
}

/// Blob digests the bucket backends remember as stored, per image kept in memory (an image has its
/// config, two manifests and up to NIXERY_MAX_LAYERS layers; most are shared).
const KNOWN_BLOBS_PER_IMAGE: std::num::NonZeroUsize = std::num::NonZeroUsize::new(16).unwrap();

/// Opens storage and prepares Nix and the package source as `config` says, ready to serve.
pub async fn open(config: &config::Config) -> anyhow::Result<AppState> {
    let auth = open_auth(config)?;
    let signer = open_signer(config)?;
    let declared = Arc::new(match &config.images {
        Some(path) => image::declared::DeclaredImages::open(path)?,
        None => image::declared::DeclaredImages::none(),
    });
    let origin = canonical(config.packages.source().map_err(anyhow::Error::msg)?)?;
    let storage = open_storage(config).await?;
    let sources = open_sources(config, origin, storage.clone())?;
    let nix_dir = config.storage_path.join("nix");
    std::fs::create_dir_all(&nix_dir).context("creating STORAGE_PATH/nix")?;
    let nix_env = nix_environment(&config.nix_config_text(), &config.nix_sshopts, &nix_dir).await?;
    let version = match nix::installed_version(&nix_env).await {
        Ok(version) => {
            tracing::info!(nix_version = %version, "found nix-build");
            metrics::METRICS.nix_version_found(&version.to_string());
            Some(version)
        }
        Err(e) => {
            tracing::error!(error = %e, "nix-build cannot be run: every build will fail");
            None
        }
    };
    let host = image::Platform::of_system(&nix::current_system()).with_context(|| {
        format!(
            "this machine's Nix system {} is not a platform nixery builds for",
            nix::current_system()
        )
    })?;
    let platforms = image::Platforms::new(host, &config.platforms)
        .map_err(anyhow::Error::msg)
        .context("NIXERY_PLATFORMS")?;
    let nix = nix::Nix::new(
        &nix_dir,
        nix::current_system(),
        version,
        std::time::Duration::from_secs(config.nix_timeout),
        nix_env.clone(),
    )
    .context("writing the Nix expression under STORAGE_PATH")?;
    let settings = builder::Settings {
        max_layers: usize::from(config.max_layers),
        popularity: Arc::new(load_popularity(config).await?),
        gzip_level: config.gzip_level,
        zstd_level: config.zstd_level,
        source_ttl: std::time::Duration::from_secs(config.source_ttl),
        memory_entries: config.memory_cache_entries,
        failure_ttl: std::time::Duration::from_secs(config.failure_ttl),
        signer: signer.clone(),
    };
    let collector = Arc::new(nix::gc::Collector::new(
        config
            .nix_gc_min_free
            .as_deref()
            .filter(|text| !text.is_empty())
            .map(str::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        std::path::PathBuf::from("/nix/store"),
        nix.env().clone(),
    ));
    let admission = Arc::new(admission::Admission::new(
        // A build packs its layers here, so each core is a place; remote builders add theirs.
        config.max_builds.map_or_else(
            || {
                std::thread::available_parallelism().map_or(2, |n| n.get())
                    + nix::remote_build_slots(&config.nix_config_text())
            },
            |n| n as usize,
        ),
        config.max_queue as usize,
        config.client_build_rate,
    ));
    let catalogs = catalog::Catalogs::new(
        storage.clone(),
        sources.clone(),
        admission.clone(),
        catalog::CatalogSettings {
            system: nix.system().to_owned(),
            work_dir: nix_dir,
            nix_env,
            timeout: std::time::Duration::from_secs(config.catalog_timeout),
            path_ttl: settings.source_ttl,
            keep: std::num::NonZeroUsize::new(usize::from(config.sources_keep))
                .unwrap_or(std::num::NonZeroUsize::MIN),
        },
    );
    Ok(AppState {
        images: builder::Builder::new(
            Arc::new(nix),
            collector,
            storage.clone(),
            sources.clone(),
            admission,
            settings,
        ),
        storage,
        sources,
        catalogs,
        event_streams: Arc::new(tokio::sync::Semaphore::new(
            config.max_event_streams as usize,
        )),
        metrics_here: config.metrics_address.is_none(),
        platforms,
        auth,
        declared,
        trusted_proxies: config.trusted_proxies.clone(),
        layer_compression: config.layer_compression,
        signer,
    })
}

/// The signer of `NIXERY_SIGNING_KEY` and `NIXERY_REGISTRY_HOST`, if a key is set.
fn open_signer(config: &config::Config) -> anyhow::Result<Option<Arc<signing::Signer>>> {
    let Some(path) = &config.signing_key else {
        if config.signing_key_password.is_some() {
            tracing::warn!(
                "NIXERY_SIGNING_KEY_PASSWORD is set without NIXERY_SIGNING_KEY: nothing is signed"
            );
        }
        return Ok(None);
    };
    let key = signing::SigningKey::read(path, config.signing_key_password.as_deref())
        .with_context(|| format!("NIXERY_SIGNING_KEY={}", path.display()))?;
    let Some(host) = &config.registry_host else {
        anyhow::bail!(
            "NIXERY_SIGNING_KEY needs NIXERY_REGISTRY_HOST: the host and port clients pull from \
             (such as registry.example.com), which signatures name images under"
        );
    };
    let signer = signing::Signer::new(key, host).map_err(anyhow::Error::msg)?;
    tracing::info!(key = %signer.key().id(), registry_host = %signer.registry_host(), "images are signed");
    Ok(Some(Arc::new(signer)))
}

/// The credentials of `NIXERY_AUTH_HTPASSWD`, if set; refused with unsigned blob redirects,
/// since a public URL would need no credentials.
fn open_auth(config: &config::Config) -> anyhow::Result<Option<Arc<auth::Auth>>> {
    let Some(path) = &config.auth_htpasswd else {
        return Ok(None);
    };
    let unsigned = match config.storage_backend {
        config::StorageBackend::Filesystem => None,
        config::StorageBackend::Gcs => {
            (config.gcs_signed_url_expiry == 0).then_some("GCS_SIGNED_URL_EXPIRY")
        }
        config::StorageBackend::S3 => {
            (config.s3_presign_expiry == 0).then_some("S3_PRESIGN_EXPIRY")
        }
    };
    if let Some(setting) = unsigned {
        anyhow::bail!(
            "NIXERY_AUTH_HTPASSWD with {setting}=0 would send clients to public blob URLs that need no credentials: set {setting} above 0"
        );
    }
    Ok(Some(Arc::new(auth::Auth::open(path)?)))
}

/// The storage backend `NIXERY_STORAGE_BACKEND` names, counted in `nixery_storage_operations`.
async fn open_storage(config: &config::Config) -> anyhow::Result<Arc<dyn storage::Storage>> {
    Ok(match config.storage_backend {
        config::StorageBackend::Filesystem => Arc::new(storage::Counted::new(
            "filesystem",
            storage::Filesystem::open(&config.storage_path).with_context(|| {
                format!(
                    "STORAGE_PATH={} cannot be used: set it to a writable directory",
                    config.storage_path.display()
                )
            })?,
        )),
        config::StorageBackend::Gcs => Arc::new(storage::Counted::new(
            "gcs",
            storage::Gcs::open(gcs_settings(config)?).await?,
        )),
        config::StorageBackend::S3 => Arc::new(storage::Counted::new(
            "s3",
            storage::S3::open(s3_settings(config)?).await?,
        )),
    })
}

/// The package sources of `origin`, with their trees under `STORAGE_PATH/sources` and the
/// commits they have seen recorded in `storage`.
fn open_sources(
    config: &config::Config,
    origin: source::Origin,
    storage: Arc<dyn storage::Storage>,
) -> anyhow::Result<Arc<source::Sources>> {
    let sources = source::Sources::open(
        source::Settings {
            origin,
            ttl: std::time::Duration::from_secs(config.source_ttl),
            channel_url: config.packages.channel_url.clone(),
            tarball_url: config.packages.nixpkgs_tarball_url.clone(),
            keep: usize::from(config.sources_keep),
            fetch_timeout: std::time::Duration::from_secs(config.source_fetch_timeout),
            commit_pins: config.commit_pins,
            allowed_commits: match &config.allowed_commits {
                Some(path) => source::AllowedCommits::open(path)?,
                None => source::AllowedCommits::none(),
            },
            records: Some(storage),
        },
        &config.storage_path.join("sources"),
    )
    .context("preparing the package source (its HTTP client, and STORAGE_PATH/sources)")?;
    Ok(Arc::new(sources))
}

/// The popularity data of `NIX_POPULARITY_URL`, or none when it is unset.
async fn load_popularity(config: &config::Config) -> anyhow::Result<layers::Popularity> {
    let Some(location) = config.popularity_url.as_deref().filter(|l| !l.is_empty()) else {
        return Ok(layers::Popularity::default());
    };
    let popularity = layers::Popularity::load(location)
        .await
        .context("NIX_POPULARITY_URL: fix or unset it (without data, layers are grouped by the dependency graph alone)")?;
    tracing::info!(
        popularity = %source::redact(location),
        entries = popularity.len(),
        max = popularity.max(),
        "loaded popularity data"
    );
    Ok(popularity)
}

/// The environment of every Nix command, with builds isolated as well as this machine allows
/// (logged, and in the `nixery_build_isolation` metric). Start-up stops when the build users
/// Nix is told to use do not exist.
pub async fn nix_environment(
    nix_config: &str,
    ssh_opts: &str,
    expressions: &std::path::Path,
) -> anyhow::Result<nix::NixEnv> {
    let (env, isolation) =
        match nix::prepare(nix_config, ssh_opts, expressions, &nix::current_system()).await {
            Ok(prepared) => prepared,
            Err(e @ nix::NixError::NoBuildUsers) => return Err(e.into()),
            Err(e) => {
                tracing::error!(error = %e, "nix-build cannot be run: every build will fail");
                let settings = nix::environment::isolation_settings(true);
                let env = nix::NixEnv::new(nix_config, &settings, ssh_opts, expressions);
                (env, nix::Isolation::Sandboxed)
            }
        };
    match isolation {
        nix::Isolation::Sandboxed => tracing::info!(
            isolation = isolation.as_str(),
            "builds run in Nix's sandbox as build users"
        ),
        nix::Isolation::BuildUsers => tracing::warn!(
            isolation = isolation.as_str(),
            "builds run as build users without Nix's sandbox: they see the host's world-readable files and its network"
        ),
        nix::Isolation::Unisolated => tracing::warn!(
            isolation = isolation.as_str(),
            "builds run as the server's own user: a package set a client names can read what the server can"
        ),
    }
    metrics::METRICS
        .build_isolation
        .get_or_create(&metrics::IsolationLabel {
            isolation: isolation.as_str(),
        })
        .set(1);
    Ok(env)
}

/// `origin` with a path source's path made absolute (and checked to exist).
pub fn canonical(origin: source::Origin) -> anyhow::Result<source::Origin> {
    Ok(match origin {
        source::Origin::Path(path) => source::Origin::Path(path.canonicalize().with_context(|| {
            format!(
                "NIXERY_PKGS_PATH={} does not exist: set it to a Nix package set (a nixpkgs checkout, or nix/offline-pkgs)",
                path.display()
            )
        })?),
        other => other,
    })
}

/// The gcs backend's settings, from `GCS_*` (or `BUCKET`, `STORAGE_EMULATOR_HOST`).
fn gcs_settings(config: &config::Config) -> anyhow::Result<storage::gcs::GcsSettings> {
    let bucket = config.bucket_name().context(
        "NIXERY_STORAGE_BACKEND=gcs needs a bucket: set GCS_BUCKET (or BUCKET) to its name",
    )?;
    let (endpoint, emulator) = config.gcs_endpoint();
    Ok(storage::gcs::GcsSettings {
        bucket,
        endpoint,
        anonymous: config.gcs_anonymous || emulator,
        signed_url_expiry: std::time::Duration::from_secs(config.gcs_signed_url_expiry),
        require_signed_urls: config.auth_htpasswd.is_some(),
        staging: config.storage_path.join("tmp"),
        known_entries: config
            .memory_cache_entries
            .saturating_mul(KNOWN_BLOBS_PER_IMAGE),
    })
}

/// The s3 backend's settings, from `S3_*` (credentials and the default region come from the
/// AWS configuration).
fn s3_settings(config: &config::Config) -> anyhow::Result<storage::s3::S3Settings> {
    let bucket = config
        .s3_bucket
        .clone()
        .filter(|b| !b.is_empty())
        .context("NIXERY_STORAGE_BACKEND=s3 needs a bucket: set S3_BUCKET to its name")?;
    Ok(storage::s3::S3Settings {
        bucket,
        endpoint: config.s3_endpoint.clone().filter(|e| !e.is_empty()),
        region: config.s3_region.clone().filter(|r| !r.is_empty()),
        presign_expiry: std::time::Duration::from_secs(config.s3_presign_expiry),
        staging: config.storage_path.join("tmp"),
        known_entries: config
            .memory_cache_entries
            .saturating_mul(KNOWN_BLOBS_PER_IMAGE),
    })
}
