//! How layers are compressed, and which clients get zstd layers. gzip layers are read by every
//! client and described by both manifest families; zstd layers
//! (`application/vnd.oci.image.layer.v1.tar+zstd`) exist only in OCI manifests, and are read by
//! containerd (1.5 on), podman, skopeo and Docker from 23.0. A client is given zstd layers only
//! when its `Accept` lists an OCI manifest or index type and it is not a Docker older than 23
//! (Debian 12's Docker 20.10 accepts OCI manifests but fails to unpack zstd layers with
//! "invalid tar header").

use std::fmt;

use super::{OCI_INDEX, OCI_LAYER_TAR_GZIP, OCI_MANIFEST, acceptable};

/// The OCI zstd-compressed layer media type.
pub const OCI_LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The first Docker release that unpacks zstd layers.
const FIRST_ZSTD_DOCKER: u32 = 23;

/// How an image's layers are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Compression {
    /// gzip: every client reads it.
    #[default]
    Gzip,
    /// zstd: faster to unpack, for clients that read it.
    Zstd,
}

impl Compression {
    /// `gzip` or `zstd`, as settings and build pages spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// The media type of these layers in an OCI manifest.
    pub fn oci_layer_type(self) -> &'static str {
        match self {
            Compression::Gzip => OCI_LAYER_TAR_GZIP,
            Compression::Zstd => OCI_LAYER_TAR_ZSTD,
        }
    }

    /// The compression a client gets for an image that `asked` for this compression, the name
    /// itself when `by_name` (`zstd-layers/…`) or the server's default otherwise: zstd when the
    /// client reads it; gzip instead when zstd was only the server's preference; refused, with
    /// why, when the name asks for zstd and the client cannot read it.
    pub fn for_client<'a>(
        self,
        by_name: bool,
        accepted: impl IntoIterator<Item = &'a str>,
        user_agent: Option<&str>,
    ) -> Result<Compression, ZstdUnreadable> {
        if self == Compression::Gzip {
            return Ok(self);
        }
        match zstd_unreadable(accepted, user_agent) {
            None => Ok(Compression::Zstd),
            Some(_) if !by_name => Ok(Compression::Gzip),
            Some(why) => Err(why),
        }
    }
}

/// The compression of the layers `manifest` (an image manifest nixery stored) describes: zstd
/// when any layer is `tar+zstd`, gzip otherwise (also for indexes and artifacts, which name no
/// layers of their own).
pub fn of_manifest(manifest: &[u8]) -> Compression {
    #[derive(serde::Deserialize)]
    struct Layer {
        #[serde(rename = "mediaType")]
        media_type: String,
    }
    #[derive(serde::Deserialize)]
    struct Layers {
        #[serde(default)]
        layers: Vec<Layer>,
    }
    let zstd = serde_json::from_slice::<Layers>(manifest).is_ok_and(|parsed| {
        parsed
            .layers
            .iter()
            .any(|layer| layer.media_type == OCI_LAYER_TAR_ZSTD)
    });
    if zstd {
        Compression::Zstd
    } else {
        Compression::Gzip
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a client cannot be given zstd layers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ZstdUnreadable {
    /// Its `Accept` header lists no OCI manifest or index type, and only OCI manifests can
    /// describe zstd layers.
    #[error(
        "zstd layers are described by an OCI manifest only, and this client accepts no OCI manifest type"
    )]
    NoOciManifest,
    /// A Docker that accepts the manifest but cannot unpack the layers.
    #[error(
        "Docker {0} cannot unpack zstd layers (Docker reads them from {FIRST_ZSTD_DOCKER}.0 on)"
    )]
    OldDocker(String),
}

impl ZstdUnreadable {
    /// A short code for the error's detail.
    pub fn code(&self) -> &'static str {
        match self {
            ZstdUnreadable::NoOciManifest => "no_oci_manifest_accepted",
            ZstdUnreadable::OldDocker(_) => "docker_without_zstd",
        }
    }
}

/// Why a client with these `Accept` values and `User-Agent` cannot read zstd layers, if it
/// cannot.
fn zstd_unreadable<'a>(
    accepted: impl IntoIterator<Item = &'a str>,
    user_agent: Option<&str>,
) -> Option<ZstdUnreadable> {
    if let Some(version) = user_agent.and_then(old_docker) {
        return Some(ZstdUnreadable::OldDocker(version.to_owned()));
    }
    if !acceptable(accepted).any(|media_type| matches!(media_type, OCI_MANIFEST | OCI_INDEX)) {
        return Some(ZstdUnreadable::NoOciManifest);
    }
    None
}

/// The version of a Docker older than [`FIRST_ZSTD_DOCKER`] from its `User-Agent`
/// (`docker/20.10.24 go/go1.19.8 …`), if the agent is one.
fn old_docker(user_agent: &str) -> Option<&str> {
    let version = user_agent
        .strip_prefix("docker/")?
        .split_whitespace()
        .next()?;
    let major: u32 = version.split('.').next()?.parse().ok()?;
    (major < FIRST_ZSTD_DOCKER).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{MANIFEST_LIST_V2, MANIFEST_V2};

    /// What Docker (20.10 to 27), containerd and containers/image send: both families.
    fn everything() -> String {
        format!("{MANIFEST_V2}, {MANIFEST_LIST_V2}, {OCI_MANIFEST}, {OCI_INDEX}")
    }

    const DOCKER_20: &str = "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 kernel/6.1.0-18-amd64 os/linux arch/amd64 UpstreamClient(Docker-Client/20.10.24+dfsg1 \\(linux\\))";
    const DOCKER_23: &str = "docker/23.0.0 go/go1.19.5 git-commit/d7573ab kernel/6.1.0 os/linux arch/amd64 UpstreamClient(Docker-Client/23.0.0 \\(linux\\))";
    const DOCKER_27: &str = "docker/27.1.1 go/go1.21.12 git-commit/cc13f95 kernel/6.1.0 os/linux arch/amd64 UpstreamClient(Docker-Client/27.1.1 \\(linux\\))";
    const CONTAINERD: &str = "containerd/1.6.20~ds1";
    const CONTAINERS_IMAGE: &str = "Go-http-client/1.1";

    fn zstd_by_name(accept: &str, agent: &str) -> Result<Compression, ZstdUnreadable> {
        Compression::Zstd.for_client(true, [accept], Some(agent))
    }

    #[test]
    fn clients_that_list_an_oci_manifest_type_get_zstd() {
        for agent in [DOCKER_23, DOCKER_27, CONTAINERD, CONTAINERS_IMAGE] {
            assert_eq!(
                zstd_by_name(&everything(), agent),
                Ok(Compression::Zstd),
                "{agent}"
            );
        }
        assert_eq!(
            zstd_by_name(OCI_MANIFEST, CONTAINERS_IMAGE),
            Ok(Compression::Zstd)
        );
        assert_eq!(zstd_by_name(OCI_INDEX, CONTAINERD), Ok(Compression::Zstd));
        assert_eq!(
            Compression::Zstd.for_client(true, [MANIFEST_V2, OCI_MANIFEST], None),
            Ok(Compression::Zstd)
        );
    }

    #[test]
    fn docker_before_23_is_told_why() {
        assert_eq!(
            zstd_by_name(&everything(), DOCKER_20),
            Err(ZstdUnreadable::OldDocker("20.10.24+dfsg1".into()))
        );
        assert_eq!(
            zstd_by_name(&everything(), "docker/19.03.15 go/go1.13"),
            Err(ZstdUnreadable::OldDocker("19.03.15".into()))
        );
        let message = ZstdUnreadable::OldDocker("20.10.24".into()).to_string();
        assert!(message.contains("Docker 20.10.24"), "{message}");
        assert!(message.contains("23.0"), "{message}");
    }

    #[test]
    fn clients_without_an_oci_manifest_type_are_told_why() {
        for accept in [
            MANIFEST_V2,
            "*/*",
            "",
            &format!("{OCI_MANIFEST};q=0, {MANIFEST_V2}"),
        ] {
            assert_eq!(
                zstd_by_name(accept, CONTAINERD),
                Err(ZstdUnreadable::NoOciManifest),
                "{accept:?}"
            );
        }
        assert_eq!(
            Compression::Zstd.for_client(true, [], None),
            Err(ZstdUnreadable::NoOciManifest)
        );
    }

    #[test]
    fn a_zstd_default_is_a_preference() {
        let zstd = |accept: &str, agent| Compression::Zstd.for_client(false, [accept], Some(agent));
        assert_eq!(zstd(&everything(), DOCKER_20), Ok(Compression::Gzip));
        assert_eq!(zstd(MANIFEST_V2, CONTAINERD), Ok(Compression::Gzip));
        assert_eq!(zstd(&everything(), DOCKER_27), Ok(Compression::Zstd));
        // gzip is for everyone.
        assert_eq!(
            Compression::Gzip.for_client(false, [MANIFEST_V2], Some(DOCKER_20)),
            Ok(Compression::Gzip)
        );
    }

    #[test]
    fn layer_media_types() {
        assert_eq!(Compression::Zstd.oci_layer_type(), OCI_LAYER_TAR_ZSTD);
        assert_eq!(Compression::Gzip.oci_layer_type(), OCI_LAYER_TAR_GZIP);
    }

    #[test]
    fn a_manifest_is_zstd_when_a_layer_is() {
        let manifest = |layer: &str| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "layers": [{ "mediaType": layer, "digest": "sha256:00", "size": 1 }],
            }))
            .unwrap()
        };
        assert_eq!(
            of_manifest(&manifest(OCI_LAYER_TAR_ZSTD)),
            Compression::Zstd
        );
        assert_eq!(
            of_manifest(&manifest(OCI_LAYER_TAR_GZIP)),
            Compression::Gzip
        );
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": [] });
        assert_eq!(of_manifest(index.to_string().as_bytes()), Compression::Gzip);
        assert_eq!(of_manifest(b"not json"), Compression::Gzip);
    }
}
