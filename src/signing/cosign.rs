//! cosign's documents: the simple-signing payload a signature signs, DSSE envelopes of in-toto
//! statements (attestations), and the manifests that attach both to an image, found by the
//! `sha256-<hex>.sig` and `.att` tags of cosign's tag scheme and by the referrers API
//! (<https://github.com/sigstore/cosign/blob/main/specs/SIGNATURE_SPEC.md>,
//! <https://github.com/secure-systems-lab/dsse/blob/master/protocol.md>). What cosign 2.5 writes
//! for `cosign sign` and `cosign attest` is what these are checked against.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::json;

use super::SigningKey;
use crate::manifest::{Digest, EMPTY_CONFIG, Manifest, OCI_EMPTY, OCI_MANIFEST};

/// The media type of a signature's payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The media type of an attestation's layer: a DSSE envelope.
pub const DSSE_ENVELOPE: &str = "application/vnd.dsse.envelope.v1+json";
/// The annotation that holds a signature (base64 DER) on a payload layer.
pub const SIGNATURE: &str = "dev.cosignproject.cosign/signature";
/// The annotation that names an attestation layer's predicate type.
pub const PREDICATE_TYPE: &str = "predicateType";
/// The artifact type signatures are listed under in the referrers API (cosign's OCI 1.1 mode).
pub const SIGNATURE_ARTIFACT: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// The payload type of a DSSE envelope that holds an in-toto statement.
pub const IN_TOTO: &str = "application/vnd.in-toto+json";
/// The in-toto statement type cosign writes and reads.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v0.1";

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

/// The in-toto statement that `predicate` (of `predicate_type`) is about the manifests
/// `digests`, all named `reference` (an image's Docker and OCI manifests share one statement).
pub fn statement(
    reference: &str,
    digests: &[&Digest],
    predicate_type: &str,
    predicate: serde_json::Value,
) -> Vec<u8> {
    let subjects: Vec<serde_json::Value> = digests
        .iter()
        .map(|digest| json!({ "name": reference, "digest": { "sha256": digest.hex() } }))
        .collect();
    serde_json::to_vec(&json!({
        "_type": STATEMENT_TYPE,
        "predicateType": predicate_type,
        "subject": subjects,
        "predicate": predicate,
    }))
    .expect("a statement serialises")
}

/// A DSSE envelope of `payload` (of `payload_type`), signed by `key` over DSSE's
/// pre-authentication encoding.
pub fn envelope(key: &SigningKey, payload_type: &str, payload: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "payloadType": payload_type,
        "payload": BASE64.encode(payload),
        "signatures": [{ "keyid": "", "sig": key.sign(&pae(payload_type, payload)) }],
    }))
    .expect("an envelope serialises")
}

/// DSSE's pre-authentication encoding: what an envelope's signature signs.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut encoded = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    encoded.extend_from_slice(payload);
    encoded
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

    /// The layer of an attestation: a DSSE `envelope` of a statement of `predicate_type`.
    pub fn attestation(envelope: &[u8], predicate_type: &str) -> Self {
        Layer {
            media_type: DSSE_ENVELOPE,
            digest: Digest::of(envelope),
            size: envelope.len() as u64,
            annotations: BTreeMap::from([
                (SIGNATURE.to_owned(), String::new()),
                (PREDICATE_TYPE.to_owned(), predicate_type.to_owned()),
            ]),
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

/// The manifest that attaches `layers` (signatures, or attestations) to `subject`: an OCI
/// artifact manifest (image-spec 1.1) of `artifact_type` with the empty config, as cosign's OCI
/// 1.1 mode writes it, which cosign's tag scheme, podman and skopeo read too (they read only the
/// layers), and the referrers API lists. The empty config is the SBOMs' (stored once), so an
/// attachment is one object besides its layers.
pub fn attachment(artifact_type: &str, layers: &[Layer], subject: &Manifest) -> Attachment {
    let config = EMPTY_CONFIG.to_vec();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {
            "mediaType": OCI_EMPTY,
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
                DSSE_ENVELOPE => DSSE_ENVELOPE,
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
    use p256::ecdsa::signature::Verifier as _;
    use p256::ecdsa::{DerSignature, VerifyingKey};
    use p256::pkcs8::DecodePublicKey;

    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_pem(include_str!("testdata/pkcs8.pem"), None).unwrap()
    }

    fn verifies(key: &SigningKey, signed: &[u8], signature: &str) -> bool {
        let public = VerifyingKey::from_public_key_pem(key.public_pem()).unwrap();
        let der = BASE64.decode(signature).unwrap();
        public
            .verify(signed, &DerSignature::from_bytes(&der).unwrap())
            .is_ok()
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
    fn an_envelope_signs_the_pre_authentication_encoding_of_its_statement() {
        let key = key();
        let statement = statement(
            "127.0.0.1:15000/hello",
            &[&digest()],
            "https://slsa.dev/provenance/v1",
            json!({"buildDefinition": {}}),
        );
        let envelope: serde_json::Value =
            serde_json::from_slice(&envelope(&key, IN_TOTO, &statement)).unwrap();
        assert_eq!(envelope["payloadType"], IN_TOTO);
        let payload = BASE64
            .decode(envelope["payload"].as_str().unwrap())
            .unwrap();
        assert_eq!(payload, statement);
        let signature = envelope["signatures"][0]["sig"].as_str().unwrap();
        let mut signed = format!("DSSEv1 28 {IN_TOTO} {} ", statement.len()).into_bytes();
        signed.extend_from_slice(&statement);
        assert!(verifies(&key, &signed, signature));
        assert!(!verifies(&key, &statement, signature));
        let parsed: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(parsed["_type"], STATEMENT_TYPE);
        assert_eq!(parsed["subject"][0]["digest"]["sha256"], digest().hex());
    }

    #[test]
    fn an_attachment_is_an_artifact_of_its_layers_with_the_empty_config_and_reads_back() {
        let payload = simple_signing_payload("h/hello", &digest());
        let layers = vec![
            Layer::signature(&payload, key().sign(&payload)),
            Layer::attestation(b"{}", "https://slsa.dev/provenance/v1"),
        ];
        let subject = Manifest::new(b"{}".to_vec(), OCI_MANIFEST);
        let Attachment { config, manifest } = attachment(SIGNATURE_ARTIFACT, &layers, &subject);
        let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        assert_eq!(config, EMPTY_CONFIG);
        assert_eq!(parsed["config"]["mediaType"], OCI_EMPTY);
        assert_eq!(parsed["config"]["digest"], Digest::of(&config).as_str());
        assert_eq!(parsed["subject"]["digest"], subject.digest.as_str());
        assert_eq!(parsed["artifactType"], SIGNATURE_ARTIFACT);
        assert_eq!(
            parsed["layers"][1]["annotations"]["predicateType"],
            "https://slsa.dev/provenance/v1"
        );
        assert_eq!(self::layers(&manifest).unwrap(), layers);
        assert_eq!(self::layers(b"{\"layers\":[{}]}"), None);
    }
}
