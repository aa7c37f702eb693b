//! cosign's documents: the simple-signing payload a signature signs, and the manifests that
//! attach signatures to an image, found by the `sha256-<hex>.sig` tag of cosign's tag scheme and
//! by the referrers API (<https://github.com/sigstore/cosign/blob/main/specs/SIGNATURE_SPEC.md>).
//! What cosign 2.5 writes for `cosign sign` is what these are checked against.

use std::collections::BTreeMap;

use serde_json::json;

use crate::manifest::{Digest, Manifest, OCI_CONFIG, OCI_MANIFEST};

/// The media type of a signature's payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation that holds a signature (base64 DER) on a payload layer.
pub const SIGNATURE: &str = "dev.cosignproject.cosign/signature";
/// The artifact type signatures are listed under in the referrers API (cosign's OCI 1.1 mode).
pub const SIGNATURE_ARTIFACT: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

/// The config time cosign writes: Go's zero time.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// What a signature of `digest` signs: that `reference` (`host/name`, as podman's and skopeo's
/// `signedIdentity` compare it) is the manifest `digest`.
pub fn simple_signing_payload(reference: &str, digest: &Digest) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "critical": {
            "identity": { "docker-reference": reference },
            "image": { "docker-manifest-digest": digest.as_str() },
            "type": "cosign container image signature",
        },
        "optional": null,
    }))
    .expect("a payload serialises")
}

/// One layer of an attachment: a blob, with its media type and annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub media_type: &'static str,
    pub digest: Digest,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

impl Layer {
    /// The payload layer of a signature: `payload` signed `signature`.
    pub fn signature(payload: &[u8], signature: String) -> Self {
        Layer {
            media_type: SIMPLE_SIGNING,
            digest: Digest::of(payload),
            size: payload.len() as u64,
            annotations: BTreeMap::from([(SIGNATURE.to_owned(), signature)]),
        }
    }

    fn descriptor(&self) -> serde_json::Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "annotations": self.annotations,
        })
    }
}

/// An attachment's manifest and its config, both as served.
pub struct Attachment {
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

/// The manifest that attaches `layers` (signatures) to `subject`: an OCI image
/// manifest as cosign writes it for its tag scheme (a config listing the layers as `diff_ids`),
/// with `artifact_type` and `subject` besides, so the referrers API can list it too.
pub fn attachment(artifact_type: &str, layers: &[Layer], subject: &Manifest) -> Attachment {
    let config = serde_json::to_vec(&json!({
        "architecture": "",
        "created": ZERO_TIME,
        "history": [{ "created": ZERO_TIME }],
        "os": "",
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| &l.digest).collect::<Vec<_>>(),
        },
        "config": {},
    }))
    .expect("a config serialises");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": Digest::of(&config),
            "size": config.len(),
        },
        "layers": layers.iter().map(Layer::descriptor).collect::<Vec<_>>(),
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.bytes.len(),
        },
    }))
    .expect("a manifest serialises");
    Attachment { config, manifest }
}

/// The layers of attachment `manifest`, as [`attachment`] wrote them; `None` when it is not one.
pub fn layers(manifest: &[u8]) -> Option<Vec<Layer>> {
    let parsed: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    parsed["layers"]
        .as_array()?
        .iter()
        .map(|layer| {
            let media_type = match layer["mediaType"].as_str()? {
                SIMPLE_SIGNING => SIMPLE_SIGNING,
                _ => return None,
            };
            Some(Layer {
                media_type,
                digest: layer["digest"].as_str()?.parse().ok()?,
                size: layer["size"].as_u64()?,
                annotations: serde_json::from_value(layer["annotations"].clone()).ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> crate::signing::SigningKey {
        crate::signing::SigningKey::from_pem(include_str!("testdata/pkcs8.pem"), None).unwrap()
    }

    fn digest() -> Digest {
        "sha256:f5c69cc7af9baeb0f3adbdf9c966a22ecfd9379e708aedd93e02caa38115e1e6"
            .parse()
            .unwrap()
    }

    #[test]
    fn the_payload_is_cosigns_byte_for_byte() {
        // As `cosign sign` 2.5 wrote it for this digest pushed to 127.0.0.1:15000/hello.
        assert_eq!(
            String::from_utf8(simple_signing_payload("127.0.0.1:15000/hello", &digest())).unwrap(),
            r#"{"critical":{"identity":{"docker-reference":"127.0.0.1:15000/hello"},"image":{"docker-manifest-digest":"sha256:f5c69cc7af9baeb0f3adbdf9c966a22ecfd9379e708aedd93e02caa38115e1e6"},"type":"cosign container image signature"},"optional":null}"#
        );
    }

    #[test]
    fn an_attachment_lists_its_layers_in_manifest_and_config_and_reads_back() {
        let payload = simple_signing_payload("h/hello", &digest());
        let layers = vec![
            Layer::signature(&payload, key().sign(&payload)),
            Layer::signature(b"{}", key().sign(b"{}")),
        ];
        let subject = Manifest::new(b"{}".to_vec(), OCI_MANIFEST);
        let Attachment { config, manifest } = attachment(SIGNATURE_ARTIFACT, &layers, &subject);
        let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        assert_eq!(parsed["config"]["digest"], Digest::of(&config).as_str());
        assert_eq!(parsed["subject"]["digest"], subject.digest.as_str());
        assert_eq!(parsed["artifactType"], SIGNATURE_ARTIFACT);
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"],
            json!([layers[0].digest, layers[1].digest])
        );
        assert_eq!(self::layers(&manifest).unwrap(), layers);
        assert_eq!(self::layers(b"{\"layers\":[{}]}"), None);
    }
}
