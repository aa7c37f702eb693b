//! The cache keys images and layers are found by, in memory and in storage: everything that
//! changes their bytes, hashed. Changing what goes in a key (or [`FORMAT_VERSION`]) makes every
//! server build its images again.

use sha2::{Digest as _, Sha256};

use super::{Builder, Request};
use crate::layers::Codec;
use crate::layers::group::{SMALL_UNIT, tight_factors};
use crate::layers::parallel::zstd_tables;
use crate::layers::store::Packed;
use crate::manifest::Compression;
use crate::nix::Derivation;
use crate::source::Pin;

/// Bumped whenever packing or documents change, so old cache entries are not reused.
const FORMAT_VERSION: &str = "nixery-4";

impl Builder {
    /// The manifest key of `request` when it is known without running Nix: a commit's, or a
    /// path's whose evaluation is fresh.
    pub(super) fn known_key(&self, request: &Request) -> Option<String> {
        let drv = match &request.pin {
            Pin::Commit { .. } => None,
            Pin::Path(path) => Some(self.evaluations.fresh(&(
                path.clone(),
                request.packages().clone(),
                request.platform.system(),
            ))?),
        };
        Some(self.manifest_key(request, drv.as_ref()))
    }

    /// The manifest cache key: everything that changes an image's bytes. A commit's image is
    /// keyed on the source URL, commit and platform, so replicas and restarts find it without
    /// Nix; a path source's on the derivation Nix evaluated, so it follows the set's contents.
    pub(super) fn manifest_key(&self, request: &Request, drv: Option<&Derivation>) -> String {
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "{FORMAT_VERSION}\nlayers {}\n{}\narchitecture {}\nsystem {}\n",
            self.settings.max_layers,
            codec_line(self.settings.codec(request.compression)),
            request.platform.architecture(),
            request.platform.system()
        ));
        // A tight budget's grouping joins paths the looser ones keep apart (layers::group), with
        // factors that depend on the budget: images cached before those joins existed (or with
        // other factors) are built again; the others keep their keys.
        if let Some((join, small_unit_join)) = tight_factors(self.settings.max_layers - 1) {
            hasher.update(format!(
                "tight join {join}\nsmall units {SMALL_UNIT} join {small_unit_join}\n"
            ));
        }
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

    /// The layer cache key of a layer holding `contents`, compressed with `compression`.
    pub(super) fn layer_key(&self, contents: &Packed, compression: Compression) -> String {
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "{FORMAT_VERSION}\n{}\n",
            codec_line(self.settings.codec(compression))
        ));
        match contents {
            Packed::StorePaths(paths) => paths.iter().for_each(|p| hasher.update(format!("{p}\n"))),
            Packed::Root { path, nonroot } => {
                hasher.update(format!("root {path}\n"));
                if *nonroot {
                    hasher.update("nonroot\n");
                }
            }
        }
        hex::encode(hasher.finalize())
    }
}

/// How a codec is written in keys: `gzip 4` (as keys always said, so gzip images keep theirs),
/// `zstd 5`, or with the match tables a level sets apart from libzstd's, which change its bytes
/// (`zstd 3 tables 16 15`).
pub(super) fn codec_line(codec: Codec) -> String {
    match codec {
        Codec::Gzip(level) => format!("gzip {level}"),
        Codec::Zstd(level) => match zstd_tables(level) {
            Some((hash_log, chain_log)) => format!("zstd {level} tables {hash_log} {chain_log}"),
            None => format!("zstd {level}"),
        },
    }
}
