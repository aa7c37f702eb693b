//! Every setting of the server: each is a command-line flag and an environment variable whose
//! name matches the original Nixery where one existed.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Where blobs and build caches are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageBackend {
    /// Files under `STORAGE_PATH`.
    Filesystem,
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

    /// Directory for blobs, caches and temporary files (filesystem backend).
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
}

impl Config {
    /// The Nix configuration text with `\n` escapes turned into newlines, so a one-line
    /// environment variable can hold several settings.
    pub fn nix_config_text(&self) -> String {
        self.nix_config.replace("\\n", "\n")
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
