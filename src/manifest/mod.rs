//! Digests, media types, and the documents served to clients: image manifests and
//! configurations (Docker's Image Manifest V2, Schema 2, and OCI's), and image indexes listing an
//! image per platform (Docker's manifest list, OCI's image index), built with the types of
//! `oci-spec`. Layers are gzip-compressed, described in both families, or zstd-compressed,
//! described in OCI's alone ([`compression`]).

pub mod compression;

use std::fmt;
use std::str::FromStr;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndexBuilder, ImageManifest,
    ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};

use crate::image::Platform;
pub use compression::{Compression, OCI_LAYER_TAR_ZSTD, ZstdUnreadable};

/// Docker's Image Manifest V2, Schema 2: served unless a client accepts only OCI.
pub const MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker's image configuration media type.
pub const CONFIG_V1: &str = "application/vnd.docker.container.image.v1+json";
/// Docker's gzip-compressed layer media type.
pub const LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The OCI image configuration media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The OCI gzip-compressed layer media type.
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker's Manifest List: an image per platform, each a Docker manifest.
pub const MANIFEST_LIST_V2: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The OCI image index: an image per platform, each an OCI manifest.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The config of an artifact manifest that needs none, and its bytes (image-spec 1.1).
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_CONFIG: &[u8] = b"{}";

/// The two manifest formats. Both describe the same config and layer blobs; only the media
/// types differ, and a manifest never mixes the two families (containers/image refuses that).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Docker,
    Oci,
}

impl Format {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Format::Docker => MANIFEST_V2,
            Format::Oci => OCI_MANIFEST,
        }
    }

    fn config_type(self) -> &'static str {
        match self {
            Format::Docker => CONFIG_V1,
            Format::Oci => OCI_CONFIG,
        }
    }

    /// The media type of layers compressed with `compression` in this family (Docker's has
    /// gzip only: zstd images are never written in it).
    fn layer_type(self, compression: Compression) -> &'static str {
        match self {
            Format::Docker => LAYER_TAR_GZIP,
            Format::Oci => compression.oci_layer_type(),
        }
    }

    /// The media type of this family's image index.
    pub fn index_type(self) -> &'static str {
        match self {
            Format::Docker => MANIFEST_LIST_V2,
            Format::Oci => OCI_INDEX,
        }
    }

    /// The media type, as a constant, of a manifest or index of either family that
    /// `media_type` names.
    pub fn known_media_type(media_type: &str) -> Option<&'static str> {
        [Format::Docker, Format::Oci]
            .into_iter()
            .flat_map(|f| [f.manifest_type(), f.index_type()])
            .find(|known| *known == media_type)
    }

    /// The format to answer a client with, from its `Accept` values: Docker's unless the client
    /// accepts OCI manifests (or OCI indexes) and not Docker's manifests.
    pub fn negotiate<'a>(accepted: impl IntoIterator<Item = &'a str>) -> Format {
        let mut oci = false;
        for media_type in acceptable(accepted) {
            match media_type {
                MANIFEST_V2 => return Format::Docker,
                OCI_MANIFEST | OCI_INDEX => oci = true,
                _ => {}
            }
        }
        if oci { Format::Oci } else { Format::Docker }
    }

    /// The family of image index to answer a client with, from its `Accept` values: Docker's
    /// manifest list if it accepts one, else the OCI index if it accepts that; `None` for a
    /// client that accepts no index (`*/*` is not taken as one: it would give `curl` an index).
    pub fn negotiate_index<'a>(accepted: impl IntoIterator<Item = &'a str>) -> Option<Format> {
        let mut oci = false;
        for media_type in acceptable(accepted) {
            match media_type {
                MANIFEST_LIST_V2 => return Some(Format::Docker),
                OCI_INDEX => oci = true,
                _ => {}
            }
        }
        oci.then_some(Format::Oci)
    }

    /// [`Format::negotiate_index`] for an image whose layers are compressed with `compression`:
    /// a zstd image's index is OCI's alone, given only to a client that accepts that.
    pub fn negotiate_index_of<'a>(
        compression: Compression,
        accepted: impl IntoIterator<Item = &'a str>,
    ) -> Option<Format> {
        match compression {
            Compression::Gzip => Format::negotiate_index(accepted),
            Compression::Zstd => acceptable(accepted)
                .any(|media_type| media_type == OCI_INDEX)
                .then_some(Format::Oci),
        }
    }
}

/// The media types `Accept` values list, in order, but those marked unacceptable (`q=0`).
fn acceptable<'a>(accepted: impl IntoIterator<Item = &'a str>) -> impl Iterator<Item = &'a str> {
    accepted
        .into_iter()
        .flat_map(|value| value.split(','))
        .filter_map(|item| {
            let mut parts = item.split(';');
            let media_type = parts.next()?.trim();
            let refused = parts.any(|param| {
                param
                    .trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (!refused).then_some(media_type)
        })
}

/// `PATH` inside every image.
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where `cacert` puts its bundle; set so TLS clients in the image find it.
const SSL_CERT_FILE: &str = "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt";

/// A content digest in its canonical form, `sha256:` followed by 64 lowercase hex digits.
/// Parsing refuses any other algorithm or spelling, so a digest is always safe to use as a file
/// name or object key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// Why a digest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("unsupported digest algorithm in '{0}': only sha256 is supported")]
    Algorithm(String),
    #[error("'{0}' is not a sha256 digest: expected 64 lowercase hex digits")]
    Encoding(String),
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_sha256(Sha256::digest(bytes).into())
    }

    /// The digest with the given raw sha256 value.
    pub fn from_sha256(hash: [u8; 32]) -> Self {
        Digest(format!("sha256:{}", hex::encode(hash)))
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown = || s.chars().take(100).collect::<String>();
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(DigestError::Algorithm(shown()));
        };
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Digest(s.to_owned()))
        } else {
            Err(DigestError::Encoding(shown()))
        }
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A manifest or image index ready to serve: its bytes exactly as served, their digest, and its
/// media type.
#[derive(Debug)]
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub media_type: &'static str,
}

impl Manifest {
    pub fn new(bytes: Vec<u8>, media_type: &'static str) -> Self {
        Manifest {
            digest: Digest::of(&bytes),
            bytes,
            media_type,
        }
    }
}

/// A packed layer: the digest and size of its compressed blob, and the digest of the
/// uncompressed tarball (its `diff_id`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
}

/// What an image's configuration says beyond its layers.
#[derive(Clone, Debug, Default)]
pub struct ImageSettings {
    /// GOARCH-style architecture, e.g. `amd64`.
    pub architecture: String,
    /// The CPU variant (`v7` of `arm`), if the architecture has several.
    pub variant: Option<String>,
    /// The default command, if the image has a shell to run.
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// Variables set besides `PATH` and `SSL_CERT_FILE` (replacing those of the same name).
    pub env: std::collections::BTreeMap<String, String>,
    /// `User`, when not root.
    pub user: Option<String>,
    pub working_dir: Option<String>,
    /// `Labels` of the configuration.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// An image configuration and its manifests, serialised exactly as served: an OCI one always,
/// a Docker one for gzip layers (Docker's family has no zstd layer type).
pub struct ImageDocuments {
    pub config: Vec<u8>,
    pub docker: Option<Vec<u8>>,
    pub oci: Vec<u8>,
}

/// Builds the configuration and manifests for `layers` (base layer first), compressed with
/// `compression`.
pub fn image_documents(
    layers: &[Layer],
    settings: &ImageSettings,
    compression: Compression,
) -> ImageDocuments {
    let mut env = vec![PATH.to_owned(), SSL_CERT_FILE.to_owned()];
    for (name, value) in &settings.env {
        env.retain(|set| set.split_once('=').is_none_or(|(n, _)| n != name));
        env.push(format!("{name}={value}"));
    }
    let mut runtime = ConfigBuilder::default().env(env);
    if let Some(cmd) = &settings.cmd {
        runtime = runtime.cmd(cmd.clone());
    }
    if let Some(entrypoint) = &settings.entrypoint {
        runtime = runtime.entrypoint(entrypoint.clone());
    }
    if let Some(user) = &settings.user {
        runtime = runtime.user(user.clone());
    }
    if let Some(dir) = &settings.working_dir {
        runtime = runtime.working_dir(dir.clone());
    }
    if !settings.labels.is_empty() {
        runtime = runtime.labels(
            settings
                .labels
                .clone()
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        );
    }
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(
            layers
                .iter()
                .map(|l| l.diff_id.to_string())
                .collect::<Vec<_>>(),
        )
        .build()
        .expect("rootfs has every required field");
    let mut config = ImageConfigurationBuilder::default();
    if let Some(variant) = &settings.variant {
        config = config.variant(variant.clone());
    }
    let config = config
        .architecture(Arch::from(settings.architecture.as_str()))
        .os(Os::Linux)
        .config(
            runtime
                .build()
                .expect("runtime config has no required field"),
        )
        .rootfs(rootfs)
        .build()
        .expect("image configuration has every required field");
    // Through a JSON value, whose maps are ordered: oci-spec keeps labels in a HashMap, whose
    // order would change the config's digest from one run to the next.
    let config = serde_json::to_value(&config)
        .and_then(|value| serde_json::to_vec(&value))
        .expect("configuration serialises");
    let config_blob = (Digest::of(&config), config.len() as u64);
    let layer_blobs: Vec<(Digest, u64)> =
        layers.iter().map(|l| (l.digest.clone(), l.size)).collect();
    let docker = (compression == Compression::Gzip)
        .then(|| manifest_document(Format::Docker, compression, &config_blob, &layer_blobs));
    ImageDocuments {
        docker,
        oci: manifest_document(Format::Oci, compression, &config_blob, &layer_blobs),
        config,
    }
}

/// An image index of `images` (each a manifest of `format` and its platform), in that family's
/// index media type, serialised exactly as served.
pub fn index_document(format: Format, images: &[(&Manifest, Platform)]) -> Vec<u8> {
    let manifests: Vec<Descriptor> = images
        .iter()
        .map(|(manifest, platform)| {
            let mut descriptor = descriptor(
                manifest.media_type,
                &manifest.digest,
                manifest.bytes.len() as u64,
            );
            let mut described = PlatformBuilder::default()
                .architecture(Arch::from(platform.architecture()))
                .os(Os::from(platform.os()));
            if let Some(variant) = platform.variant() {
                described = described.variant(variant);
            }
            descriptor.set_platform(Some(
                described
                    .build()
                    .expect("platform has every required field"),
            ));
            descriptor
        })
        .collect();
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::Other(format.index_type().to_owned()))
        .manifests(manifests)
        .build()
        .expect("index has every required field");
    serde_json::to_vec(&index).expect("index serialises")
}

/// An OCI artifact manifest (image-spec 1.1) of `artifact_type`: the empty config, `blob` (its
/// digest and size) as its one layer with that same media type (as Trivy expects), titled
/// `title` (the file name `oras pull` writes it to), and `subject` as the manifest it refers
/// to. Serialised exactly as served, annotations sorted.
pub fn artifact_manifest(
    artifact_type: &str,
    (blob, title): (&(Digest, u64), &str),
    subject: &Manifest,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Vec<u8> {
    let mut layer = descriptor(artifact_type, &blob.0, blob.1);
    layer.set_annotations(Some(std::collections::HashMap::from([(
        "org.opencontainers.image.title".to_owned(),
        title.to_owned(),
    )])));
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::Other(OCI_MANIFEST.to_owned()))
        .artifact_type(MediaType::Other(artifact_type.to_owned()))
        .config(descriptor(
            OCI_EMPTY,
            &Digest::of(EMPTY_CONFIG),
            EMPTY_CONFIG.len() as u64,
        ))
        .layers(vec![layer])
        .subject(descriptor(
            subject.media_type,
            &subject.digest,
            subject.bytes.len() as u64,
        ))
        .annotations(
            annotations
                .clone()
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        )
        .build()
        .expect("artifact manifest has every required field");
    // Through a JSON value, whose maps are ordered (oci-spec keeps annotations in a HashMap).
    serde_json::to_value(&manifest)
        .and_then(|value| serde_json::to_vec(&value))
        .expect("artifact manifest serialises")
}

/// How the referrers API lists an artifact manifest (distribution-spec 1.1): its descriptor
/// with its `artifactType` and annotations.
pub fn referrer_descriptor(manifest: &[u8]) -> Option<serde_json::Value> {
    let parsed: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    let mut descriptor = serde_json::json!({
        "mediaType": parsed.get("mediaType")?,
        "digest": Digest::of(manifest),
        "size": manifest.len(),
        "artifactType": parsed.get("artifactType")?,
    });
    if let Some(annotations) = parsed.get("annotations") {
        descriptor["annotations"] = annotations.clone();
    }
    Some(descriptor)
}

/// The OCI image index the referrers API answers with: `descriptors`, in the order given.
pub fn referrers_index(descriptors: &[serde_json::Value]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": descriptors,
    }))
    .expect("an index serialises")
}

/// A manifest's config blob and layer blobs, as (digest, size).
type Blobs = ((Digest, u64), Vec<(Digest, u64)>);

/// The config and layer blobs a manifest names. `None` when `manifest` is not a manifest nixery
/// can read.
fn blobs(manifest: &[u8]) -> Option<Blobs> {
    let parsed: ImageManifest = serde_json::from_slice(manifest).ok()?;
    let blob = |d: &Descriptor| Some((d.digest().to_string().parse::<Digest>().ok()?, d.size()));
    let config = blob(parsed.config())?;
    let layers = parsed
        .layers()
        .iter()
        .map(blob)
        .collect::<Option<Vec<_>>>()?;
    Some((config, layers))
}

/// The digests of the config and layers a manifest names.
pub fn referenced_blobs(manifest: &[u8]) -> Option<Vec<Digest>> {
    let (config, layers) = blobs(manifest)?;
    Some(
        std::iter::once(config)
            .chain(layers)
            .map(|(digest, _)| digest)
            .collect(),
    )
}

/// The digests and sizes of the layers a manifest names, in order.
pub fn layers(manifest: &[u8]) -> Option<Vec<(Digest, u64)>> {
    Some(blobs(manifest)?.1)
}

/// The same manifest of gzip layers in another format: same config and layers, the other
/// family's media types. `None` when `manifest` is not a manifest nixery can read.
pub fn convert(manifest: &[u8], format: Format) -> Option<Vec<u8>> {
    let (config, layers) = blobs(manifest)?;
    Some(manifest_document(
        format,
        Compression::Gzip,
        &config,
        &layers,
    ))
}

fn manifest_document(
    format: Format,
    compression: Compression,
    config: &(Digest, u64),
    layers: &[(Digest, u64)],
) -> Vec<u8> {
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::Other(format.manifest_type().to_owned()))
        .config(descriptor(format.config_type(), &config.0, config.1))
        .layers(
            layers
                .iter()
                .map(|(digest, size)| descriptor(format.layer_type(compression), digest, *size))
                .collect::<Vec<_>>(),
        )
        .build()
        .expect("manifest has every required field");
    serde_json::to_vec(&manifest).expect("manifest serialises")
}

fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Descriptor {
    let digest = oci_spec::image::Digest::from_str(digest.as_str()).expect("canonical digest");
    Descriptor::new(MediaType::Other(media_type.to_owned()), size, digest)
}

/// The media type a stored manifest declares, for serving it by digest.
pub fn declared_media_type(manifest: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(manifest).ok()?.media_type
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_canonical() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert!(ok.parse::<Digest>().is_ok());
        for bad in [
            format!("sha512:{}", "a".repeat(128)),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            "sha256:../../etc/passwd".to_owned(),
            "a".repeat(64),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn digest_of_empty_input() {
        assert_eq!(
            Digest::of(b"").hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn documents_reference_each_other() {
        let layer = Layer {
            digest: Digest::of(b"blob"),
            diff_id: Digest::of(b"tar"),
            size: 4,
        };
        let labels: std::collections::BTreeMap<String, String> = (0..20)
            .map(|i| (format!("label.{i}"), i.to_string()))
            .collect();
        let settings = ImageSettings {
            architecture: "amd64".into(),
            cmd: Some(vec!["bash".into()]),
            labels,
            ..Default::default()
        };
        let docs = image_documents(std::slice::from_ref(&layer), &settings, Compression::Gzip);
        // Labels come out in one order, so the config's digest never changes.
        for _ in 0..10 {
            assert_eq!(
                image_documents(std::slice::from_ref(&layer), &settings, Compression::Gzip).config,
                docs.config
            );
        }
        let docker = docs.docker.clone().unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&docker).unwrap();
        assert_eq!(manifest["mediaType"], MANIFEST_V2);
        assert_eq!(
            manifest["config"]["digest"],
            Digest::of(&docs.config).as_str()
        );
        assert_eq!(manifest["config"]["size"], docs.config.len());
        assert_eq!(manifest["layers"][0]["digest"], layer.digest.as_str());
        let config: serde_json::Value = serde_json::from_slice(&docs.config).unwrap();
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["rootfs"]["diff_ids"][0], layer.diff_id.as_str());
        assert_eq!(config["config"]["Cmd"][0], "bash");
        assert_eq!(config["config"]["Labels"]["label.7"], "7");
        assert!(
            config["config"]["Env"][0]
                .as_str()
                .unwrap()
                .starts_with("PATH=")
        );
        assert_eq!(declared_media_type(&docker).as_deref(), Some(MANIFEST_V2));

        let oci: serde_json::Value = serde_json::from_slice(&docs.oci).unwrap();
        assert_eq!(oci["mediaType"], OCI_MANIFEST);
        assert_eq!(oci["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(oci["config"]["digest"], manifest["config"]["digest"]);
        assert_eq!(oci["layers"][0]["mediaType"], OCI_LAYER_TAR_GZIP);
        assert_eq!(convert(&docker, Format::Oci).unwrap(), docs.oci);
        assert_eq!(convert(&docs.oci, Format::Docker).unwrap(), docker);
    }

    #[test]
    fn zstd_layers_are_in_an_oci_manifest_only() {
        let layer = Layer {
            digest: Digest::of(b"blob"),
            diff_id: Digest::of(b"tar"),
            size: 4,
        };
        let settings = ImageSettings {
            architecture: "amd64".into(),
            ..Default::default()
        };
        let gzip = image_documents(std::slice::from_ref(&layer), &settings, Compression::Gzip);
        let zstd = image_documents(std::slice::from_ref(&layer), &settings, Compression::Zstd);
        assert!(zstd.docker.is_none());
        assert_eq!(
            zstd.config, gzip.config,
            "the config names the same tarballs"
        );
        let oci: serde_json::Value = serde_json::from_slice(&zstd.oci).unwrap();
        assert_eq!(oci["mediaType"], OCI_MANIFEST);
        assert_eq!(oci["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(oci["layers"][0]["mediaType"], OCI_LAYER_TAR_ZSTD);
        assert_eq!(
            declared_media_type(&zstd.oci).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(layers(&zstd.oci), Some(vec![(layer.digest.clone(), 4)]));
    }

    #[test]
    fn a_zstd_index_is_oci_only() {
        let everything = format!("{MANIFEST_V2}, {MANIFEST_LIST_V2}, {OCI_MANIFEST}, {OCI_INDEX}");
        assert_eq!(
            Format::negotiate_index_of(Compression::Zstd, [everything.as_str()]),
            Some(Format::Oci)
        );
        assert_eq!(
            Format::negotiate_index_of(Compression::Gzip, [everything.as_str()]),
            Some(Format::Docker)
        );
        let no_oci_index = format!("{MANIFEST_LIST_V2}, {OCI_MANIFEST}");
        assert_eq!(
            Format::negotiate_index_of(Compression::Zstd, [no_oci_index.as_str()]),
            None
        );
    }

    #[test]
    fn the_config_carries_user_entrypoint_workdir_and_env() {
        let layer = Layer {
            digest: Digest::of(b"blob"),
            diff_id: Digest::of(b"tar"),
            size: 4,
        };
        let settings = ImageSettings {
            architecture: "amd64".into(),
            entrypoint: Some(vec!["curl".into()]),
            cmd: Some(vec!["--help".into()]),
            user: Some("65532:65532".into()),
            working_dir: Some("/work".into()),
            env: [("HOME", "/home/nonroot"), ("PATH", "/bin")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            ..Default::default()
        };
        let docs = image_documents(std::slice::from_ref(&layer), &settings, Compression::Gzip);
        let config: serde_json::Value = serde_json::from_slice(&docs.config).unwrap();
        let config = &config["config"];
        assert_eq!(config["User"], "65532:65532");
        assert_eq!(config["Entrypoint"], serde_json::json!(["curl"]));
        assert_eq!(config["Cmd"], serde_json::json!(["--help"]));
        assert_eq!(config["WorkingDir"], "/work");
        // A variable set replaces nixery's of the same name; the others stay.
        assert_eq!(
            config["Env"],
            serde_json::json!([SSL_CERT_FILE, "HOME=/home/nonroot", "PATH=/bin"])
        );
        // Without any of them, the config is what it always was.
        let plain = ImageSettings {
            architecture: "amd64".into(),
            ..Default::default()
        };
        let docs = image_documents(std::slice::from_ref(&layer), &plain, Compression::Gzip);
        let config: serde_json::Value = serde_json::from_slice(&docs.config).unwrap();
        assert!(config["config"].get("User").is_none());
        assert_eq!(
            config["config"]["Env"],
            serde_json::json!([PATH, SSL_CERT_FILE])
        );
    }

    #[test]
    fn negotiation_prefers_docker_and_honours_oci_only_clients() {
        assert_eq!(Format::negotiate([]), Format::Docker);
        assert_eq!(Format::negotiate(["*/*"]), Format::Docker);
        assert_eq!(Format::negotiate([OCI_MANIFEST]), Format::Oci);
        assert_eq!(
            Format::negotiate([&format!("{OCI_MANIFEST}, {MANIFEST_V2};q=0.5") as &str]),
            Format::Docker
        );
        assert_eq!(Format::negotiate([OCI_INDEX, OCI_MANIFEST]), Format::Oci);
        // A client that takes only OCI indexes takes OCI's media types.
        assert_eq!(Format::negotiate([OCI_INDEX]), Format::Oci);
    }

    #[test]
    fn index_negotiation_prefers_the_docker_list_and_ignores_wildcards() {
        let docker = format!("{MANIFEST_V2}, {MANIFEST_LIST_V2}, {OCI_MANIFEST}, {OCI_INDEX}");
        assert_eq!(
            Format::negotiate_index([docker.as_str()]),
            Some(Format::Docker)
        );
        assert_eq!(
            Format::negotiate_index([OCI_MANIFEST, OCI_INDEX]),
            Some(Format::Oci)
        );
        assert_eq!(Format::negotiate_index([MANIFEST_V2, OCI_MANIFEST]), None);
        assert_eq!(Format::negotiate_index(["*/*"]), None);
        // `q=0` says "not acceptable".
        let refused = format!("{MANIFEST_LIST_V2};q=0, {MANIFEST_V2}");
        assert_eq!(Format::negotiate_index([refused.as_str()]), None);
        let refused = format!("{MANIFEST_V2}; q=0.0, {OCI_MANIFEST};q=0.5");
        assert_eq!(Format::negotiate([refused.as_str()]), Format::Oci);
        assert_eq!(Format::negotiate_index([]), None);
    }

    #[test]
    fn an_index_lists_each_manifest_with_its_platform() {
        let amd64 = Manifest::new(b"{\"a\":1}".to_vec(), MANIFEST_V2);
        let arm64 = Manifest::new(b"{\"b\":2}".to_vec(), MANIFEST_V2);
        let index = index_document(
            Format::Docker,
            &[
                (&amd64, "linux/amd64".parse().unwrap()),
                (&arm64, "linux/arm64".parse().unwrap()),
            ],
        );
        let parsed: serde_json::Value = serde_json::from_slice(&index).unwrap();
        assert_eq!(parsed["schemaVersion"], 2);
        assert_eq!(parsed["mediaType"], MANIFEST_LIST_V2);
        assert_eq!(parsed["manifests"][0]["mediaType"], MANIFEST_V2);
        assert_eq!(parsed["manifests"][0]["digest"], amd64.digest.as_str());
        assert_eq!(parsed["manifests"][0]["size"], amd64.bytes.len());
        assert_eq!(
            parsed["manifests"][1]["platform"],
            serde_json::json!({ "architecture": "arm64", "os": "linux" })
        );
        assert_eq!(
            declared_media_type(&index).as_deref(),
            Some(MANIFEST_LIST_V2)
        );
        let oci = index_document(Format::Oci, &[(&amd64, "linux/arm/v7".parse().unwrap())]);
        let parsed: serde_json::Value = serde_json::from_slice(&oci).unwrap();
        assert_eq!(parsed["mediaType"], OCI_INDEX);
        assert_eq!(parsed["manifests"][0]["platform"]["variant"], "v7");
    }
}
