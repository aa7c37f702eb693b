//! Every setting of the server: each is a command-line flag and an environment variable whose
//! name matches the original Nixery where one existed.

use std::path::PathBuf;

use clap::{Args, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::manifest::Compression;

/// Where blobs and build caches are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageBackend {
    /// Files under `STORAGE_PATH`.
    Filesystem,
    /// A Google Cloud Storage bucket (`GCS_BUCKET`); clients fetch blobs from it directly.
    Gcs,
    /// An S3 or S3-compatible bucket (`S3_BUCKET`); clients fetch blobs from it directly.
    S3,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line, with the fields Google Cloud Logging reads.
    Json,
}

/// What `nixery` is asked to do: serve with the settings of [`Config`], or run a subcommand.
#[derive(Clone, Debug, Subcommand)]
// Made once at start-up and taken apart at once: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Invocation {
    /// Serve: what `nixery` does when no subcommand is named.
    #[command(skip)]
    Serve(Config),

    /// Popularity data for NIX_POPULARITY_URL: builds every top-level package of a package set
    /// (packages that fail are skipped and listed) and counts in how many runtime closures each
    /// store path appears.
    #[command(
        after_help = "For nixpkgs, where building everything is not an option, count the references in the binary cache's narinfo files instead (see the README)."
    )]
    Popularity(PopularityArgs),
}

impl Invocation {
    /// The command line: the server's settings, with the subcommands beside them. A subcommand
    /// needs none of the server's required settings (those the environment sets are still
    /// checked).
    pub fn command() -> clap::Command {
        let subcommands = Invocation::augment_subcommands(clap::Command::new("nixery"));
        // The server's settings last, so that its name and description are the command's.
        Config::augment_args(subcommands)
            .subcommand_negates_reqs(true)
            .propagate_version(true)
    }

    /// Reads the command line and the environment, or exits with clap's message.
    pub fn parse() -> Invocation {
        Invocation::try_parse_from(std::env::args_os()).unwrap_or_else(|err| err.exit())
    }

    /// Reads `args` (the program's name first) and the environment.
    pub fn try_parse_from<I, T>(args: I) -> Result<Invocation, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut command = Invocation::command();
        let mut matches = command.try_get_matches_from_mut(args)?;
        let invocation = match matches.subcommand_name() {
            Some(_) => Invocation::from_arg_matches_mut(&mut matches),
            None => Config::from_arg_matches_mut(&mut matches).map(Invocation::Serve),
        };
        invocation.map_err(|err| err.format(&mut command))
    }
}

/// Settings of a nixery server.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "nixery",
    version,
    about = "A container registry that builds images with Nix"
)]
pub struct Config {
    /// TCP port to listen on.
    #[arg(long, env = "PORT", default_value_t = 5726)]
    pub port: u16,

    /// Address to listen on.
    #[arg(long, env = "NIXERY_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: std::net::IpAddr,

    /// Once listening, write the bound address (`127.0.0.1:PORT`) to this file, and on a second
    /// line the metrics address when NIXERY_METRICS_ADDRESS is set: how a supervisor or a test
    /// that set PORT=0 learns the port. The file is replaced whole (written beside it, then
    /// renamed), so a reader never sees half a line.
    #[arg(long, env = "NIXERY_ADDRESS_FILE")]
    pub address_file: Option<PathBuf>,

    #[command(flatten)]
    pub packages: PackageSource,

    /// Seconds a moving name (a channel, a branch, `latest`) stays resolved to one commit before
    /// the source is asked again; for a path source, how long an image's evaluation is reused.
    #[arg(long, env = "NIXERY_SOURCE_TTL", default_value_t = 60)]
    pub source_ttl: u64,

    /// How many commits' trees are kept on disk under STORAGE_PATH/sources (older ones are
    /// removed once no build uses them).
    #[arg(long, env = "NIXERY_SOURCES_KEEP", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub sources_keep: u16,

    /// Seconds fetching one commit's tree (a tarball download and unpacking, or a git fetch) may
    /// take.
    #[arg(long, env = "NIXERY_SOURCE_FETCH_TIMEOUT", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub source_fetch_timeout: u64,

    /// Which commits a 40-hex tag may name: `seen`, those this deployment has seen at the head
    /// of its channel or of a branch or tag of its repository (recorded in storage, so restarts
    /// and replicas share them) and those in NIXERY_ALLOWED_COMMITS; or `any`, every commit the
    /// tarball URL or repository serves (any client then chooses the code the server downloads
    /// and evaluates). Images already stored are served either way.
    #[arg(long, env = "NIXERY_COMMIT_PINS", value_enum, default_value = "seen")]
    pub commit_pins: crate::source::CommitPins,

    /// A file of commits served whatever NIXERY_COMMIT_PINS says: one 40-hex commit a line, `#`
    /// starting a comment. Read again on SIGHUP (a malformed file is then refused and the old
    /// list kept).
    #[arg(long, env = "NIXERY_ALLOWED_COMMITS")]
    pub allowed_commits: Option<PathBuf>,

    /// Storage backend for blobs and caches.
    #[arg(
        long,
        env = "NIXERY_STORAGE_BACKEND",
        value_enum,
        default_value = "filesystem"
    )]
    pub storage_backend: StorageBackend,

    /// Local directory for staging files and Nix's expression, and for blobs and caches with the
    /// filesystem backend.
    #[arg(long, env = "STORAGE_PATH", value_name = "STORAGE_PATH")]
    pub storage_path: PathBuf,

    /// Seconds a single nix-build may run before it is killed.
    #[arg(long, env = "NIX_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub nix_timeout: u64,

    /// Extra Nix configuration for every nix-build, in nix.conf syntax (newlines or `\n`
    /// separate settings), e.g. `substituters =` to build without a binary cache.
    #[arg(long, env = "NIXERY_NIX_CONFIG", default_value = "")]
    pub nix_config: String,

    /// Most layers an image may have, counting the root layer (Docker refuses more than 125).
    #[arg(long, env = "NIXERY_MAX_LAYERS", default_value_t = 96, value_parser = clap::value_parser!(u16).range(2..=120))]
    pub max_layers: u16,

    /// Popularity data for layering, in Nixery's format (a JSON object from store path name to
    /// count, as `nixery popularity` writes it): an http(s) URL or a file. Popular paths get
    /// layers of their own, shared by every image that needs them. Read once at start-up; a file
    /// that is missing or malformed stops start-up.
    #[arg(long, env = "NIX_POPULARITY_URL")]
    pub popularity_url: Option<String>,

    /// Compression level for layers: libdeflate's 1 (fastest) … 12 (smallest). The default, 4,
    /// packs within 2% of `gzip -6`'s size at about 4 times pigz's speed per core (BENCHMARKS.md).
    #[arg(long, env = "NIXERY_GZIP_LEVEL", default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=12))]
    pub gzip_level: i32,

    /// How layers are compressed when the image name does not say (`zstd-layers/…` asks for
    /// zstd): `gzip`, which every client reads, or `zstd`, which containerd, podman, skopeo and
    /// Docker 23 on unpack faster. With `zstd`, a client that cannot read zstd layers (no OCI
    /// manifest type in its Accept header, or Docker before 23) gets the gzip image instead.
    #[arg(long, env = "NIXERY_LAYER_COMPRESSION", value_enum, default_value_t = Compression::Gzip)]
    pub layer_compression: Compression,

    /// zstd level for zstd layers: 1 (fastest) … 19 (smallest); the levels above 19 need far
    /// more memory per compressing thread and are refused.
    #[arg(long, env = "NIXERY_ZSTD_LEVEL", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: i32,

    /// Most images kept in memory (with their manifests); older ones are found in storage again.
    #[arg(long, env = "NIXERY_MEMORY_CACHE_ENTRIES", default_value = "1000")]
    pub memory_cache_entries: std::num::NonZeroUsize,

    /// Seconds evaluating a package set's catalog (for search and "did you mean") may take; it
    /// runs in the background, the first time a search or a suggestion needs it.
    #[arg(long, env = "NIXERY_CATALOG_TIMEOUT", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub catalog_timeout: u64,

    /// Seconds a failure the request caused (unknown packages, a package that fails to evaluate
    /// or build, a build past NIX_TIMEOUT) is answered from memory without running Nix again.
    #[arg(long, env = "NIXERY_FAILURE_TTL", default_value_t = 60)]
    pub failure_ttl: u64,

    /// Most distinct builds running at once (Nix, packing); the rest wait in a FIFO queue.
    /// Default: the number of cores.
    #[arg(long, env = "NIXERY_MAX_BUILDS", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_builds: Option<u32>,

    /// Most builds waiting for a place; past this a request that would start another build is
    /// answered 429 with Retry-After.
    #[arg(long, env = "NIXERY_MAX_QUEUE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_queue: u32,

    /// Requests a client may make per minute that start new work (a build, a source fetch or a
    /// catalog evaluation; a multi-platform index counts once); past it, 429 with Retry-After.
    /// What is served from memory or storage is never limited.
    #[arg(long, env = "NIXERY_CLIENT_BUILD_RATE", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub client_build_rate: u32,

    /// Proxies whose `X-Forwarded-For` is believed, as comma-separated CIDRs or addresses
    /// (`10.0.0.0/8,192.0.2.7`): a request from one is the client's named there, the first
    /// address read from the right that is not a trusted proxy. Default: none, so a client is
    /// its peer address.
    #[arg(long, env = "NIXERY_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: crate::server::client::TrustedProxies,

    /// Seconds a client has to send a request's headers (also how long a kept-alive connection
    /// may wait for its next request); a slower one is disconnected.
    #[arg(long, env = "NIXERY_HEADER_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout: u64,

    /// Seconds a connection may go without a byte in either direction while no request on it is
    /// being worked on (a client that stopped reading a blob); then it is closed.
    #[arg(long, env = "NIXERY_IDLE_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout: u64,

    /// Most client connections open at once; past it new connections wait in the kernel's
    /// backlog until one closes. Default: 80% of the open-file limit.
    #[arg(long, env = "NIXERY_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// When the Nix store's file system has less free space than this (`10%`, `5G`, `500M`),
    /// nixery runs `nix-store --gc` between builds. Unset: never.
    #[arg(long, env = "NIXERY_NIX_GC_MIN_FREE")]
    pub nix_gc_min_free: Option<String>,

    /// Log format: `text` (for people) or `json` (one object a line with the fields Cloud
    /// Logging reads: severity, message, httpRequest).
    #[arg(long, env = "NIXERY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Seconds after SIGTERM that builds still running are cancelled (responses in flight are
    /// finished within it too).
    #[arg(long, env = "NIXERY_SHUTDOWN_GRACE", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_grace: u64,

    /// Most Server-Sent Events streams of builds (`/api/v1/events/…`, the build pages) open at
    /// once; past this, 429 with Retry-After.
    #[arg(long, env = "NIXERY_MAX_EVENT_STREAMS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_event_streams: u32,

    /// Serve /metrics on this address (e.g. 127.0.0.1:9090) instead of on the main port.
    #[arg(long, env = "NIXERY_METRICS_ADDRESS")]
    pub metrics_address: Option<std::net::SocketAddr>,

    /// Cloud Storage bucket for blobs and caches (gcs backend); `BUCKET` is read when this is
    /// not set, as the original Nixery's app.yaml named it.
    #[arg(long, env = "GCS_BUCKET")]
    pub gcs_bucket: Option<String>,

    /// The bucket under the original Nixery's name, read when GCS_BUCKET is not set.
    #[arg(long, env = "BUCKET")]
    pub bucket: Option<String>,

    /// Cloud Storage endpoint for the API and for redirect URLs (default
    /// https://storage.googleapis.com, or `http://$STORAGE_EMULATOR_HOST` when that is set).
    #[arg(long, env = "GCS_ENDPOINT")]
    pub gcs_endpoint: Option<String>,

    /// A Cloud Storage emulator's host and port (or URL), the variable Google's other clients
    /// honour: the endpoint when GCS_ENDPOINT is not set, with no credentials sent.
    #[arg(long, env = "STORAGE_EMULATOR_HOST")]
    pub storage_emulator_host: Option<String>,

    /// Send no credentials to Cloud Storage (emulators, public buckets) instead of Application
    /// Default Credentials; implied by `STORAGE_EMULATOR_HOST`.
    #[arg(long, env = "GCS_ANONYMOUS", default_value_t = false, action = clap::ArgAction::Set)]
    pub gcs_anonymous: bool,

    /// Seconds a signed blob URL stays valid; 0 never signs and redirects to public URLs.
    #[arg(long, env = "GCS_SIGNED_URL_EXPIRY", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=604_800))]
    pub gcs_signed_url_expiry: u64,

    /// S3 bucket for blobs and caches (s3 backend).
    #[arg(long, env = "S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// Endpoint of an S3-compatible store (R2, MinIO, Ceph: e.g. `http://127.0.0.1:9000`),
    /// addressed path-style; unset: AWS S3.
    #[arg(long, env = "S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// The S3 bucket's region; unset: the AWS configuration's (`AWS_REGION`, the profile), else
    /// us-east-1.
    #[arg(long, env = "S3_REGION")]
    pub s3_region: Option<String>,

    /// Seconds a presigned S3 blob URL stays valid; 0 never signs and redirects to public URLs.
    #[arg(long, env = "S3_PRESIGN_EXPIRY", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=604_800))]
    pub s3_presign_expiry: u64,

    /// Platforms every image is built for, comma-separated (`linux/amd64,linux/arm64`). When
    /// set, a client that accepts an image index (Docker, containerd, podman) gets one listing an
    /// image per platform; the first such request builds them all. Unset: one image, for the
    /// server's own platform. Names starting with `arm64/` are arm64 images either way.
    #[arg(long, env = "NIXERY_PLATFORMS", default_value = "")]
    pub platforms: String,

    /// An htpasswd file of bcrypt entries (`htpasswd -B`): every route but /healthz and /readyz
    /// then needs the HTTP Basic credentials of one of its users (`docker login`). Read again
    /// on SIGHUP. Unset: no credentials needed.
    #[arg(long, env = "NIXERY_AUTH_HTPASSWD")]
    pub auth_htpasswd: Option<PathBuf>,

    /// A YAML or JSON file of declared images: names that stand for their `contents` (packages
    /// as in a path) and image config (`user`, `env`, `entrypoint`, `cmd`, `workdir`,
    /// `labels`). A declared name wins over the package-path reading of the same name. Read
    /// again on SIGHUP (a malformed file is then refused and the old images kept).
    #[arg(long, env = "NIXERY_IMAGES")]
    pub images: Option<PathBuf>,

    /// Options for the ssh that Nix runs to reach remote builders (the `builders` of
    /// NIXERY_NIX_CONFIG), given to Nix as NIX_SSHOPTS, e.g. `-p 2222 -o
    /// StrictHostKeyChecking=accept-new`. Empty: NIX_SSHOPTS as the server was started with.
    /// Each machine's key file is the third field of its `builders` entry.
    #[arg(long, env = "NIXERY_NIX_SSHOPTS", default_value = "")]
    pub nix_sshopts: String,

    /// A file holding the ECDSA P-256 private key images are signed with: PKCS#8 or SEC1 PEM
    /// (`openssl genpkey -algorithm ec -pkeyopt ec_paramgen_curve:P-256`), or cosign's encrypted
    /// key (`cosign generate-key-pair`) with NIXERY_SIGNING_KEY_PASSWORD. Needs
    /// NIXERY_REGISTRY_HOST. Unset: nothing is signed.
    #[arg(long, env = "NIXERY_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,

    /// The password of a cosign-encrypted NIXERY_SIGNING_KEY.
    #[arg(long, env = "NIXERY_SIGNING_KEY_PASSWORD", hide_env_values = true)]
    pub signing_key_password: Option<String>,

    /// The host (and port) clients pull from, e.g. `registry.example.com`: signatures name
    /// images as `<host>/<name>`, which podman's and skopeo's `sigstoreSigned` policies compare
    /// with what they pulled. Required with NIXERY_SIGNING_KEY.
    #[arg(long, env = "NIXERY_REGISTRY_HOST")]
    pub registry_host: Option<String>,
}

/// `nixery popularity`: counts, for a package set, in how many of its packages' runtime closures
/// each store path appears, and prints the counts as the JSON that `NIX_POPULARITY_URL` reads.
#[derive(Clone, Debug, clap::Args)]
pub struct PopularityArgs {
    #[command(flatten)]
    pub packages: PackageSource,

    /// With a channel or a repository, the tag whose package set to count, as an image tag would
    /// pick it (`latest`, a branch or tag, a 40-hex commit, another channel).
    #[arg(long, default_value = "latest")]
    pub tag: String,

    /// Where a channel's or repository's tree is fetched to (a temporary directory by default).
    #[arg(long, env = "STORAGE_PATH", value_name = "STORAGE_PATH")]
    pub storage_path: Option<PathBuf>,

    /// Write the JSON here instead of to standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,

    /// Extra Nix configuration, as for the server (e.g. `substituters =`).
    #[arg(long, env = "NIXERY_NIX_CONFIG", default_value = "")]
    pub nix_config: String,

    /// Seconds each step may run (fetching the tree; building every package is one step).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

impl Config {
    /// The Nix configuration text with `\n` escapes turned into newlines, so a one-line
    /// environment variable can hold several settings.
    pub fn nix_config_text(&self) -> String {
        self.nix_config.replace("\\n", "\n")
    }

    /// The bucket: `GCS_BUCKET`, else `BUCKET`.
    pub fn bucket_name(&self) -> Option<String> {
        self.gcs_bucket
            .clone()
            .or_else(|| self.bucket.clone())
            .filter(|b| !b.is_empty())
    }

    /// The Cloud Storage endpoint and whether it is an emulator named by
    /// `STORAGE_EMULATOR_HOST`.
    pub fn gcs_endpoint(&self) -> (String, bool) {
        if let Some(endpoint) = &self.gcs_endpoint {
            return (endpoint.clone(), false);
        }
        match &self.storage_emulator_host {
            Some(host) if host.contains("://") => (host.clone(), true),
            Some(host) if !host.is_empty() => (format!("http://{host}"), true),
            _ => (crate::storage::gcs::DEFAULT_ENDPOINT.to_owned(), false),
        }
    }
}

/// Where packages come from: the settings the server and `nixery popularity` share.
#[derive(Clone, Debug, clap::Args)]
pub struct PackageSource {
    /// Package set to build from, fixed on disk: a file or directory such that `import PATH { }`
    /// yields the set, as `import <nixpkgs> { }` does (a nixpkgs checkout, or nix/offline-pkgs).
    /// Tags do not change what is built. One of NIXERY_PKGS_PATH, NIXERY_CHANNEL and
    /// NIXERY_PKGS_REPO must be set.
    #[arg(long, env = "NIXERY_PKGS_PATH", value_name = "NIXERY_PKGS_PATH")]
    pub pkgs_path: Option<String>,

    /// A nixpkgs channel to follow (e.g. nixos-unstable): `latest` is its current commit, a tag
    /// naming another channel builds from that one, a 40-hex tag pins a commit.
    #[arg(long, env = "NIXERY_CHANNEL", value_name = "NIXERY_CHANNEL")]
    pub channel: Option<String>,

    /// A git repository holding a package set (any URL git accepts, or a local path): `latest` is
    /// its default branch, a 40-hex tag pins a commit, other tags name a git tag or branch.
    #[arg(long, env = "NIXERY_PKGS_REPO", value_name = "NIXERY_PKGS_REPO")]
    pub pkgs_repo: Option<String>,

    /// Where channels are published: `<URL>/<channel>/git-revision` holds a channel's commit.
    #[arg(
        long,
        env = "NIXERY_CHANNEL_URL",
        default_value = crate::source::DEFAULT_CHANNEL_URL
    )]
    pub channel_url: String,

    /// Where the tree of a nixpkgs commit is downloaded from, `{commit}` standing for the commit:
    /// a gzip tarball with one top-level directory.
    #[arg(
        long,
        env = "NIXERY_NIXPKGS_TARBALL_URL",
        default_value = crate::source::DEFAULT_TARBALL_URL
    )]
    pub nixpkgs_tarball_url: String,
}

impl PackageSource {
    /// Where packages come from: exactly one of `NIXERY_PKGS_PATH`, `NIXERY_CHANNEL` and
    /// `NIXERY_PKGS_REPO`, an empty value counting as unset.
    pub fn source(&self) -> Result<crate::source::Origin, String> {
        use crate::source::Origin;
        let path = self.pkgs_path.as_ref().filter(|p| !p.is_empty());
        let channel = self.channel.as_ref().filter(|c| !c.is_empty());
        let repo = self.pkgs_repo.as_ref().filter(|r| !r.is_empty());
        let given: Vec<&str> = [
            path.map(|_| "NIXERY_PKGS_PATH"),
            channel.map(|_| "NIXERY_CHANNEL"),
            repo.map(|_| "NIXERY_PKGS_REPO"),
        ]
        .into_iter()
        .flatten()
        .collect();
        match (path, channel, repo) {
            (Some(path), None, None) => Ok(Origin::Path(PathBuf::from(path))),
            (None, Some(channel), None) => Ok(Origin::Channel(channel.clone())),
            (None, None, Some(repo)) => Ok(Origin::Git(repo.clone())),
            (None, None, None) => Err("no package source: set one of NIXERY_PKGS_PATH (a package set on disk, e.g. nix/offline-pkgs), NIXERY_CHANNEL (e.g. nixos-unstable) or NIXERY_PKGS_REPO (a git repository)".to_owned()),
            _ => Err(format!(
                "{} are set together: set only one package source",
                given.join(" and ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_required_settings_name_the_variable() {
        let err = Config::try_parse_from(["nixery"]).unwrap_err();
        assert!(err.to_string().contains("STORAGE_PATH"), "{err}");
    }

    #[test]
    fn defaults_work() {
        let config =
            Config::try_parse_from(["nixery", "--storage-path", "/s", "--pkgs-path", "/p"])
                .unwrap();
        assert_eq!(config.port, 5726);
        assert_eq!(config.nix_timeout, 60);
        assert_eq!(config.storage_backend, StorageBackend::Filesystem);
        assert_eq!(config.gcs_signed_url_expiry, 300);
        assert!(!config.gcs_anonymous);
        assert_eq!(config.source_ttl, 60);
        assert_eq!(config.sources_keep, 4);
        assert_eq!(config.commit_pins, crate::source::CommitPins::Seen);
        assert_eq!(config.allowed_commits, None);
        assert_eq!(
            config.packages.source(),
            Ok(crate::source::Origin::Path("/p".into()))
        );
    }

    #[test]
    fn layer_compression_and_zstd_level() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(
                ["nixery", "--storage-path", "/s", "--pkgs-path", "/p"]
                    .iter()
                    .chain(args),
            )
        };
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.layer_compression, Compression::Gzip);
        assert_eq!(defaults.zstd_level, 3);
        let zstd = parse(&["--layer-compression", "zstd", "--zstd-level", "19"]).unwrap();
        assert_eq!(zstd.layer_compression, Compression::Zstd);
        assert_eq!(zstd.zstd_level, 19);
        for level in ["0", "20", "-1"] {
            let err = parse(&[&format!("--zstd-level={level}")])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("zstd-level") && err.contains("1..=19"),
                "{err}"
            );
        }
        let err = parse(&["--layer-compression", "brotli"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("gzip") && err.contains("zstd"), "{err}");
    }

    #[test]
    fn exactly_one_source_is_required_and_empty_counts_as_unset() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(["nixery", "--storage-path", "/s"].iter().chain(args))
                .unwrap()
                .packages
                .source()
        };
        let none = parse(&[]).unwrap_err();
        assert!(none.contains("NIXERY_CHANNEL"), "{none}");
        let two = parse(&["--channel", "nixos-unstable", "--pkgs-repo", "/r"]).unwrap_err();
        assert!(
            two.contains("NIXERY_CHANNEL and NIXERY_PKGS_REPO are set together"),
            "{two}"
        );
        assert_eq!(
            parse(&["--pkgs-path", "", "--channel", "nixos-unstable"]),
            Ok(crate::source::Origin::Channel("nixos-unstable".into()))
        );
    }

    #[test]
    fn gcs_settings_parse() {
        let config = Config::try_parse_from([
            "nixery",
            "--storage-path",
            "/s",
            "--pkgs-path",
            "/p",
            "--storage-backend",
            "gcs",
            "--gcs-bucket",
            "layers",
            "--gcs-endpoint",
            "http://127.0.0.1:4443",
            "--gcs-anonymous",
            "true",
        ])
        .unwrap();
        assert_eq!(config.storage_backend, StorageBackend::Gcs);
        assert_eq!(config.bucket_name().as_deref(), Some("layers"));
        assert_eq!(
            config.gcs_endpoint(),
            ("http://127.0.0.1:4443".to_owned(), false)
        );
        assert!(config.gcs_anonymous);
    }

    #[test]
    fn gcs_bucket_wins_over_bucket_and_an_emulator_needs_no_credentials() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(
                ["nixery", "--storage-path", "/s", "--pkgs-path", "/p"]
                    .iter()
                    .chain(args),
            )
            .unwrap()
        };
        assert_eq!(
            parse(&["--bucket", "old"]).bucket_name().as_deref(),
            Some("old")
        );
        let both = parse(&["--bucket", "old", "--gcs-bucket", "new"]);
        assert_eq!(both.bucket_name().as_deref(), Some("new"));
        assert_eq!(parse(&["--bucket", ""]).bucket_name(), None);
        assert_eq!(
            parse(&["--storage-emulator-host", "127.0.0.1:4443"]).gcs_endpoint(),
            ("http://127.0.0.1:4443".to_owned(), true)
        );
        assert_eq!(
            parse(&["--storage-emulator-host", "https://fake"]).gcs_endpoint(),
            ("https://fake".to_owned(), true)
        );
        let endpoint_wins = parse(&[
            "--storage-emulator-host",
            "127.0.0.1:4443",
            "--gcs-endpoint",
            "http://elsewhere",
        ]);
        assert_eq!(
            endpoint_wins.gcs_endpoint(),
            ("http://elsewhere".to_owned(), false)
        );
        assert_eq!(
            parse(&[]).gcs_endpoint(),
            (crate::storage::gcs::DEFAULT_ENDPOINT.to_owned(), false)
        );
    }

    #[test]
    fn s3_settings_parse() {
        let config = Config::try_parse_from([
            "nixery",
            "--storage-path",
            "/s",
            "--pkgs-path",
            "/p",
            "--storage-backend",
            "s3",
            "--s3-bucket",
            "layers",
            "--s3-endpoint",
            "http://127.0.0.1:9000",
            "--s3-region",
            "auto",
        ])
        .unwrap();
        assert_eq!(config.storage_backend, StorageBackend::S3);
        assert_eq!(config.s3_bucket.as_deref(), Some("layers"));
        assert_eq!(config.s3_endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(config.s3_region.as_deref(), Some("auto"));
        assert_eq!(config.s3_presign_expiry, 300);
        let too_long = Config::try_parse_from([
            "nixery",
            "--storage-path",
            "/s",
            "--pkgs-path",
            "/p",
            "--s3-presign-expiry",
            "604801",
        ]);
        assert!(too_long.is_err());
    }

    #[test]
    fn popularity_is_a_subcommand_that_needs_none_of_the_servers_settings() {
        let Invocation::Popularity(args) = Invocation::try_parse_from([
            "nixery",
            "popularity",
            "--pkgs-path",
            "/p",
            "-o",
            "counts.json",
        ])
        .unwrap() else {
            panic!("not the popularity subcommand");
        };
        assert_eq!(
            args.packages.source(),
            Ok(crate::source::Origin::Path("/p".into()))
        );
        assert_eq!(args.output, Some(PathBuf::from("counts.json")));
        assert_eq!(args.tag, "latest");
        assert_eq!(args.timeout, 3600);
        let Invocation::Serve(config) =
            Invocation::try_parse_from(["nixery", "--storage-path", "/s", "--pkgs-path", "/p"])
                .unwrap()
        else {
            panic!("not the server");
        };
        assert_eq!(config.port, 5726);
        let err = Invocation::try_parse_from(["nixery"]).unwrap_err();
        assert!(err.to_string().contains("STORAGE_PATH"), "{err}");
        Invocation::command().debug_assert();
    }

    #[test]
    fn bad_timeout_is_refused() {
        let err = Config::try_parse_from([
            "nixery",
            "--storage-path",
            "/s",
            "--pkgs-path",
            "/p",
            "--nix-timeout",
            "soon",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("nix-timeout"), "{err}");
    }
}
