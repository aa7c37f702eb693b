//! SLSA provenance (<https://slsa.dev/spec/v1.0/provenance>) of an image: what a person needs to
//! build it again and to check what went in. Nix builds from a pinned package set to store paths
//! with known NAR hashes, so the record is exact: the package set (where from, which commit,
//! the tree's NAR hash), every store path of the closure with its NAR hash and derivation, and
//! what nixery chose (layer budget, compression, the popularity data that shaped the layers).
//! It holds no times and nothing of the server it was made on, so every replica makes the same
//! bytes for the same image.

use serde_json::{Value, json};

use crate::nix::StorePath;

/// The predicate type of SLSA provenance 1.0, as `cosign verify-attestation --type
/// slsaprovenance1` expects it.
pub const SLSA_PROVENANCE: &str = "https://slsa.dev/provenance/v1";

/// What kind of build the provenance records: an image nixery built with Nix.
pub const BUILD_TYPE: &str = "urn:nixery:build-type:image:v1";

/// Where an image's packages came from.
#[derive(Clone, Debug)]
pub struct PackageSet {
    /// The source's URL (a tarball, a git repository), or the directory of a path source.
    pub uri: String,
    /// The commit, when the set is pinned to one.
    pub commit: Option<String>,
    /// The NAR hash (sha256, hex) of the set's tree, as Nix computes it.
    pub tree_sha256: String,
}

/// Everything the provenance of one image records.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// The image's packages, as a name (`hello/shell`: sorted, so the same whatever the order).
    pub image: String,
    pub tag: String,
    /// `linux/amd64`.
    pub platform: String,
    /// The setup the name chose beyond packages: `nonroot`, a declared image's config.
    pub setup: Value,
    pub package_set: PackageSet,
    /// The derivation Nix built the image from.
    pub derivation: String,
    pub closure: &'a [StorePath],
    /// `NIXERY_MAX_LAYERS`.
    pub layer_budget: usize,
    /// `gzip 4`, `zstd 3 tables 16 15`: the codec as manifest keys name it.
    pub compression: String,
    /// The sha256 (hex) of the popularity data layering followed; none without data.
    pub popularity_sha256: Option<String>,
    /// The SBOM documents stored with the image: (media type, digest).
    pub sboms: Vec<(&'static str, String)>,
}

/// The provenance predicate of `inputs`.
pub fn predicate(inputs: &Inputs<'_>) -> Value {
    let mut dependencies = vec![package_set(&inputs.package_set)];
    dependencies.push(json!({
        "uri": format!("nix:{}", inputs.derivation),
        "name": "image derivation",
    }));
    dependencies.extend(inputs.closure.iter().map(|path| {
        let mut dependency = json!({
            "uri": format!("nix:{}", path.path),
            "digest": { "sha256": path.nar_hash },
            "annotations": { "narSize": path.nar_size },
        });
        if let Some(deriver) = &path.deriver {
            dependency["annotations"]["deriver"] = Value::from(deriver.as_str());
        }
        dependency
    }));
    json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "image": inputs.image,
                "tag": inputs.tag,
                "platform": inputs.platform,
                "setup": inputs.setup,
            },
            "internalParameters": {
                "layerBudget": inputs.layer_budget,
                "compression": inputs.compression,
                "popularity": inputs.popularity_sha256.as_ref().map(|sha256| json!({ "sha256": sha256 })),
            },
            "resolvedDependencies": dependencies,
        },
        "runDetails": {
            "builder": {
                "id": "urn:nixery:builder",
                "version": { "nixery": env!("CARGO_PKG_VERSION") },
            },
            "metadata": {},
            "byproducts": inputs.sboms.iter().map(|(media_type, digest)| json!({
                "name": "sbom",
                "mediaType": media_type,
                "digest": { "sha256": digest.trim_start_matches("sha256:") },
            })).collect::<Vec<_>>(),
        },
    })
}

/// The package set as a resolved dependency: its source and commit, and its tree's NAR hash.
fn package_set(set: &PackageSet) -> Value {
    let mut digest = json!({ "sha256": set.tree_sha256 });
    if let Some(commit) = &set.commit {
        digest["gitCommit"] = Value::from(commit.as_str());
    }
    json!({
        "uri": set.uri,
        "name": "package set",
        "digest": digest,
        "annotations": { "sha256": "the NAR hash of the tree, as nix-hash --type sha256 prints it" },
    })
}
