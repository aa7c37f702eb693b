//! Each image's attestations (`NIXERY_SIGNING_KEY`): its SLSA provenance, recorded when it is
//! built ([`crate::signing::provenance`]), and its SBOMs, each an in-toto statement about one of
//! its manifests in a DSSE envelope signed with the key, attached under cosign's
//! `sha256-<hex>.att` tag (where `cosign attest` writes and `cosign verify-attestation` reads)
//! and listed by the referrers API. They are made with the image's signatures
//! ([`super::signatures`]), for the same name and under the same conditions.

use super::artifacts::{CYCLONEDX, SPDX, Sboms};
use super::signatures::Attached;
use super::{Builder, Image, Request};
use crate::manifest::Digest;
use crate::nix::Closure;
use crate::signing::provenance::{self, PackageSet, SLSA_PROVENANCE};
use crate::signing::{Signer, cosign};
use crate::source::Pin;
use crate::storage::{self, Cache, StorageError};

/// The predicate types of the SBOM attestations, as `cosign verify-attestation --type
/// spdxjson` and `--type cyclonedx` expect them.
const SPDX_PREDICATE: &str = "https://spdx.dev/Document";
const CYCLONEDX_PREDICATE: &str = "https://cyclonedx.org/bom";

/// The artifact type attestations are listed under in the referrers API.
const ATTESTATION_ARTIFACT: &str = cosign::DSSE_ENVELOPE;

impl Builder {
    /// Records the provenance of the image of manifest key `key`, built for `request` from
    /// `closure` (the package set's tree hashing to `tree_sha256`), with its `sboms`.
    pub(super) async fn store_provenance(
        &self,
        request: &Request,
        key: &str,
        derivation: &str,
        tree_sha256: &str,
        closure: &Closure,
        sboms: &Sboms,
    ) -> Result<(), StorageError> {
        let (uri, commit) = match &request.pin {
            Pin::Commit { commit, source } => (source.clone(), Some(commit.to_string())),
            Pin::Path(path) => (format!("file://{}", path.display()), None),
        };
        let setup = request.name.setup();
        let inputs = provenance::Inputs {
            image: request.packages_name(),
            tag: request.tag.to_string(),
            platform: request.platform.to_string(),
            setup: serde_json::json!({
                "nonroot": setup.nonroot,
                "declared": setup.config.as_deref(),
            }),
            package_set: PackageSet {
                uri,
                commit,
                tree_sha256: tree_sha256.to_owned(),
            },
            derivation: derivation.to_owned(),
            closure: &closure.paths,
            layer_budget: self.settings.max_layers,
            compression: super::keys::codec_line(self.settings.codec(request.compression)),
            popularity_sha256: (!self.settings.popularity.is_empty())
                .then(|| self.settings.popularity.fingerprint().to_owned()),
            sboms: sboms
                .documents
                .iter()
                .map(|(media_type, digest)| (*media_type, digest.to_string()))
                .collect(),
        };
        let predicate =
            serde_json::to_vec(&provenance::predicate(&inputs)).expect("a predicate serialises");
        self.storage
            .write_cache(Cache::Provenance, key, &predicate)
            .await
    }

    /// Adds `signer`'s attestations of `image` (of manifest key `key`) under `name` to the
    /// `.att` attachment of each of its manifests, unless they are there: its provenance, when it
    /// was recorded, and its SBOMs, when it has them. One statement covers all its manifests
    /// (they are the same image), so each is made, signed and stored once.
    pub(super) async fn attach_attestations(
        &self,
        signer: &Signer,
        name: &str,
        key: &str,
        image: &Image,
    ) -> Result<(), StorageError> {
        let reference = format!("{}/{name}", signer.registry_host());
        let mut predicates: Vec<(&str, serde_json::Value)> = Vec::new();
        if let Some(bytes) = self.storage.read_cache(Cache::Provenance, key).await?
            && let Ok(predicate) = serde_json::from_slice(&bytes)
        {
            predicates.push((SLSA_PROVENANCE, predicate));
        }
        // The image's manifests share their SBOM documents.
        for (artifact_type, predicate_type) in
            [(SPDX, SPDX_PREDICATE), (CYCLONEDX, CYCLONEDX_PREDICATE)]
        {
            if let Some(document) = self.sbom(&image.main().digest, artifact_type).await?
                && let Ok(predicate) = serde_json::from_slice(&document)
            {
                predicates.push((predicate_type, predicate));
            }
        }
        if predicates.is_empty() {
            return Ok(());
        }
        let digests: Vec<&Digest> = image.manifests().map(|m| &m.digest).collect();
        let mut attestations = Vec::new();
        for (predicate_type, predicate) in predicates {
            let statement = cosign::statement(&reference, &digests, predicate_type, predicate);
            let envelope = cosign::envelope(signer.key(), cosign::IN_TOTO, &statement);
            let layer = cosign::Layer::attestation(&envelope, predicate_type);
            attestations.push((layer, envelope));
        }
        let storage = self.storage.as_ref();
        futures::future::try_join_all(
            attestations
                .iter()
                .map(|(_, envelope)| storage::put_bytes(storage, envelope, None)),
        )
        .await?;
        futures::future::try_join_all(image.manifests().map(|manifest| {
            let attestations = &attestations;
            async move {
                let mut layers = match self
                    .attachment(name, &manifest.digest, Attached::Attestations)
                    .await?
                {
                    Some(attachment) => cosign::layers(&attachment.bytes).unwrap_or_default(),
                    None => Vec::new(),
                };
                let before = layers.len();
                for (layer, _) in attestations {
                    if !layers.contains(layer) {
                        layers.push(layer.clone());
                    }
                }
                if layers.len() == before {
                    return Ok(());
                }
                self.store_attachment(
                    name,
                    manifest,
                    Attached::Attestations,
                    ATTESTATION_ARTIFACT,
                    &layers,
                )
                .await
            }
        }))
        .await?;
        Ok(())
    }
}
