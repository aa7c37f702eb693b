//! Every setting of the server: each is a command-line flag and an environment variable whose
//! name matches the original Nixery where one existed.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Where blobs and build caches are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageBackend {
    /// Files under `STORAGE_PATH`.
    Filesystem,
    /// A Google Cloud Storage bucket (`GCS_BUCKET`); clients fetch blobs from it directly.
    Gcs,
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

    /// Nix package set to build from: a file or directory such that `import PATH { }` yields the
    /// set, as `import <nixpkgs> { }` does (a nixpkgs checkout, or nix/offline-pkgs).
    #[arg(long, env = "NIXERY_PKGS_PATH", value_name = "NIXERY_PKGS_PATH")]
    pub pkgs_path: PathBuf,

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

    /// Compression level for layers: libdeflate's 1 (fastest) … 12 (smallest). The default, 4,
    /// packs within 2% of `gzip -6`'s size at about 4 times pigz's speed per core (BENCHMARKS.md).
    #[arg(long, env = "NIXERY_GZIP_LEVEL", default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=12))]
    pub gzip_level: i32,

    /// Cloud Storage bucket for blobs and caches (gcs backend); `BUCKET` is read when this is
    /// not set, as the original Nixery's app.yaml named it.
    #[arg(long, env = "GCS_BUCKET")]
    pub gcs_bucket: Option<String>,

    /// Cloud Storage endpoint for the API and for redirect URLs (default
    /// https://storage.googleapis.com, or `http://$STORAGE_EMULATOR_HOST` when that is set).
    #[arg(long, env = "GCS_ENDPOINT")]
    pub gcs_endpoint: Option<String>,

    /// Send no credentials to Cloud Storage (emulators, public buckets) instead of Application
    /// Default Credentials; implied by `STORAGE_EMULATOR_HOST`.
    #[arg(long, env = "GCS_ANONYMOUS", default_value_t = false, action = clap::ArgAction::Set)]
    pub gcs_anonymous: bool,

    /// Seconds a signed blob URL stays valid; 0 never signs and redirects to public URLs.
    #[arg(long, env = "GCS_SIGNED_URL_EXPIRY", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=604_800))]
    pub gcs_signed_url_expiry: u64,
}

impl Config {
    /// The Nix configuration text with `\n` escapes turned into newlines, so a one-line
    /// environment variable can hold several settings.
    pub fn nix_config_text(&self) -> String {
        self.nix_config.replace("\\n", "\n")
    }

    /// The bucket: `GCS_BUCKET`, else `BUCKET`.
    pub fn bucket(&self) -> Option<String> {
        self.gcs_bucket
            .clone()
            .or_else(|| std::env::var("BUCKET").ok())
            .filter(|b| !b.is_empty())
    }

    /// The Cloud Storage endpoint and whether it is an emulator named by
    /// `STORAGE_EMULATOR_HOST` (the variable Google's other clients honour).
    pub fn gcs_endpoint(&self) -> (String, bool) {
        if let Some(endpoint) = &self.gcs_endpoint {
            return (endpoint.clone(), false);
        }
        match std::env::var("STORAGE_EMULATOR_HOST") {
            Ok(host) if host.contains("://") => (host, true),
            Ok(host) if !host.is_empty() => (format!("http://{host}"), true),
            _ => (crate::storage::gcs::DEFAULT_ENDPOINT.to_owned(), false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_required_settings_name_the_variable() {
        let err = Config::try_parse_from(["nixery", "--storage-path", "/tmp/x"]).unwrap_err();
        assert!(err.to_string().contains("NIXERY_PKGS_PATH"), "{err}");
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
        assert_eq!(config.bucket().as_deref(), Some("layers"));
        assert_eq!(
            config.gcs_endpoint(),
            ("http://127.0.0.1:4443".to_owned(), false)
        );
        assert!(config.gcs_anonymous);
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
