//! Each image's signatures (`NIXERY_SIGNING_KEY`): every manifest of an image, and of an index,
//! signed for the name a client asked for, in cosign's formats ([`crate::signing::cosign`]),
//! attached under the `sha256-<hex>.sig` tag and listed by the referrers API; with them, the
//! image's attestations ([`super::attestations`]).
//!
//! What is signed is what this server made: an image is signed when it is built, or (built
//! before the key was set, or under another key) on its next request, and its manifest key's
//! record (`Cache::Signed`) keeps the digests each key vouched for. A manifest that is not
//! among them, because the cache entry was changed to point at another one, is never signed:
//! its tag then fails verification. A new key signs what storage holds when it first signs.
//!
//! Signatures are deterministic (RFC 6979), so replicas sharing a bucket write the same bytes;
//! the attachment of a name and digest keeps one signature per key, and a new key's is added
//! beside the old ones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::image_index::Index;
use super::reads::MAX_MANIFEST_BYTES;
use super::{Builder, Image, Request};
use crate::manifest::{Digest, Manifest, OCI_MANIFEST};
use crate::server::metrics::METRICS;
use crate::signing::{Signer, cosign};
use crate::storage::{self, Cache, StorageError};
use crate::sync::lock;

/// Which of an image's attachments a tag or referrer names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// `sha256-<hex>.sig`: signatures.
    Signatures,
    /// `sha256-<hex>.att`: attestations (provenance, SBOMs).
    Attestations,
}

impl Attached {
    /// The attachment and digest a tag of cosign's tag scheme names (`sha256-<hex>.sig`,
    /// `sha256-<hex>.att`), if it is one.
    pub fn of_tag(tag: &str) -> Option<(Attached, Digest)> {
        let (hex, attached) = match tag.strip_prefix("sha256-")?.split_once('.')? {
            (hex, "sig") => (hex, Attached::Signatures),
            (hex, "att") => (hex, Attached::Attestations),
            _ => return None,
        };
        Some((attached, format!("sha256:{hex}").parse().ok()?))
    }

    /// What the attachment holds, in words.
    pub fn noun(self) -> &'static str {
        match self {
            Attached::Signatures => "signature",
            Attached::Attestations => "attestation",
        }
    }

    fn word(self) -> &'static str {
        match self {
            Attached::Signatures => "sig",
            Attached::Attestations => "att",
        }
    }
}

/// The digests each key (by [`crate::signing::SigningKey::id`]) signed of one manifest key's
/// image.
type Record = BTreeMap<String, BTreeSet<Digest>>;

impl Builder {
    /// Signs `image` for `request`'s name, unless it is signed already (remembered in memory
    /// after the first time): see the [module](self). Storage failures are logged, and the
    /// image served unsigned; the next request tries again. Returns whether the image is
    /// signed now.
    pub(super) async fn sign_image(&self, request: &Request, image: &Image) -> bool {
        let Some(signer) = self.settings.signer.as_deref() else {
            return false;
        };
        // The manifest key names what was built, whatever its cache entry now points at.
        let Some(key) = self.known_key(request) else {
            return false;
        };
        let remembered = signed_key(request.name.as_str(), &key);
        if let Some(&signed) = lock(&self.signed).get(&remembered) {
            return signed;
        }
        let started = std::time::Instant::now();
        let signing = self.sign_image_now(signer, request, &key, image).await;
        METRICS.phase("sign", started.elapsed());
        match signing {
            Ok(signed) => {
                METRICS.signing(if signed { "signed" } else { "refused" });
                lock(&self.signed).put(remembered, signed);
                signed
            }
            Err(e) => {
                METRICS.signing("failed");
                tracing::error!(image = %request.name, error = %e, "signing failed; the image is served unsigned");
                false
            }
        }
    }

    async fn sign_image_now(
        &self,
        signer: &Signer,
        request: &Request,
        key: &str,
        image: &Image,
    ) -> Result<bool, StorageError> {
        let key_id = signer.key().id();
        let digests: BTreeSet<Digest> = image.manifests().map(|m| m.digest.clone()).collect();
        let mut record: Record = self
            .storage
            .read_cache(Cache::Signed, key)
            .await?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        match record.get(&key_id) {
            Some(signed) if !digests.is_subset(signed) => {
                tracing::warn!(
                    image = %request.name,
                    manifest = %image.main().digest,
                    "the image's cache entry names a manifest this key never signed: not signing it"
                );
                return Ok(false);
            }
            Some(_) => {}
            None => {
                record.insert(key_id, digests);
                let bytes = serde_json::to_vec(&record).expect("a record serialises");
                self.storage.write_cache(Cache::Signed, key, &bytes).await?;
            }
        }
        // Everything at once: most of the time is storage's.
        let name = request.name.as_str();
        let signatures = futures::future::try_join_all(
            image
                .manifests()
                .map(|manifest| self.attach_signature(signer, name, manifest)),
        );
        let attestations = self.attach_attestations(signer, name, key, image);
        futures::future::try_join(signatures, attestations).await?;
        Ok(true)
    }

    /// Signs `index` for `request`'s name when each of its images is signed (so it lists only
    /// manifests this server vouched for).
    pub(super) async fn sign_index(&self, request: &Request, index: &Index, images_signed: bool) {
        let Some(signer) = self.settings.signer.as_deref() else {
            return;
        };
        if !images_signed {
            return;
        }
        for manifest in index.manifests() {
            let remembered = signed_key(request.name.as_str(), manifest.digest.hex());
            if lock(&self.signed).get(&remembered).is_some() {
                continue;
            }
            match self
                .attach_signature(signer, request.name.as_str(), manifest)
                .await
            {
                Ok(()) => {
                    METRICS.signing("signed");
                    lock(&self.signed).put(remembered, true);
                }
                Err(e) => {
                    METRICS.signing("failed");
                    tracing::error!(image = %request.name, error = %e, "signing an index failed; it is served unsigned");
                }
            }
        }
    }

    /// Adds `signer`'s signature that `<host>/<name>` is `manifest` to their `.sig` attachment,
    /// unless it is there.
    async fn attach_signature(
        &self,
        signer: &Signer,
        name: &str,
        manifest: &Manifest,
    ) -> Result<(), StorageError> {
        let reference = format!("{}/{name}", signer.registry_host());
        let payload = cosign::simple_signing_payload(&reference, &manifest.digest);
        let layer = cosign::Layer::signature(&payload, signer.key().sign(&payload));
        let mut layers = match self
            .attachment(name, &manifest.digest, Attached::Signatures)
            .await?
        {
            Some(attachment) => cosign::layers(&attachment.bytes).unwrap_or_default(),
            None => Vec::new(),
        };
        if layers.contains(&layer) {
            return Ok(());
        }
        storage::put_bytes(self.storage.as_ref(), &payload, None).await?;
        layers.push(layer);
        self.store_attachment(
            name,
            manifest,
            Attached::Signatures,
            cosign::SIGNATURE_ARTIFACT,
            &layers,
        )
        .await
    }

    /// Stores the attachment of `layers` (their blobs stored already) to `subject` under `name`.
    pub(super) async fn store_attachment(
        &self,
        name: &str,
        subject: &Manifest,
        attached: Attached,
        artifact_type: &str,
        layers: &[cosign::Layer],
    ) -> Result<(), StorageError> {
        let cosign::Attachment { config, manifest } =
            cosign::attachment(artifact_type, layers, subject);
        let storage = self.storage.as_ref();
        storage::put_bytes(storage, &config, None).await?;
        let digest = storage::put_bytes(storage, &manifest, Some(OCI_MANIFEST)).await?;
        storage
            .write_cache(
                Cache::Attachments,
                &attachment_key(name, &subject.digest, attached),
                digest.as_str().as_bytes(),
            )
            .await
    }

    /// The attachment (`.sig` or `.att`) of manifest `digest` under `name`, if it has one.
    pub async fn attachment(
        &self,
        name: &str,
        digest: &Digest,
        attached: Attached,
    ) -> Result<Option<Arc<Manifest>>, StorageError> {
        let Some(entry) = self
            .storage
            .read_cache(Cache::Attachments, &attachment_key(name, digest, attached))
            .await?
        else {
            return Ok(None);
        };
        let Some(attachment) = std::str::from_utf8(&entry)
            .ok()
            .and_then(|text| text.parse::<Digest>().ok())
        else {
            return Ok(None);
        };
        self.stored_manifest(&attachment).await
    }

    /// The referrers of manifest `digest` under `name`: its SBOMs, and its attachments.
    pub async fn referrers_of(
        &self,
        name: &str,
        digest: &Digest,
    ) -> Result<Vec<serde_json::Value>, StorageError> {
        let mut referrers = self.referrers(digest).await?;
        for attached in [Attached::Signatures, Attached::Attestations] {
            if let Some(attachment) = self.attachment(name, digest, attached).await?
                && attachment.bytes.len() as u64 <= MAX_MANIFEST_BYTES
                && let Some(descriptor) = crate::manifest::referrer_descriptor(&attachment.bytes)
            {
                referrers.push(descriptor);
            }
        }
        Ok(referrers)
    }
}

/// What the memory of signed images is keyed by: a name and what it was signed for.
fn signed_key(name: &str, of: &str) -> String {
    hex::encode(Sha256::digest(format!("{name}\n{of}")))
}

/// The cache key of the attachment of manifest `digest` under `name`.
fn attachment_key(name: &str, digest: &Digest, attached: Attached) -> String {
    hex::encode(Sha256::digest(format!(
        "{}\n{name}\n{digest}",
        attached.word()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosigns_tags_name_an_attachment_and_a_digest() {
        let hex = "ab".repeat(32);
        let digest: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(
            Attached::of_tag(&format!("sha256-{hex}.sig")),
            Some((Attached::Signatures, digest.clone()))
        );
        assert_eq!(
            Attached::of_tag(&format!("sha256-{hex}.att")),
            Some((Attached::Attestations, digest))
        );
        for tag in [
            format!("sha256-{hex}"),
            format!("sha256-{hex}.sbom"),
            format!("sha256-{}.sig", "AB".repeat(32)),
            format!("sha256-{}.sig", "ab".repeat(31)),
            "latest".to_owned(),
        ] {
            assert_eq!(Attached::of_tag(&tag), None, "{tag}");
        }
    }
}
