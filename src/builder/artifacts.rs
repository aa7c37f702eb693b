//! Each image's artifacts, its software bills of materials: its SPDX and CycloneDX documents
//! ([`crate::sbom`] writes them), made from the closure while the image is built, stored as
//! blobs, each behind an OCI artifact manifest whose subject is one of the image's manifests
//! (a gzip image's Docker and OCI manifests each have their own; a zstd image has its OCI
//! manifest alone), and listed per manifest for the
//! referrers API.

use std::collections::BTreeMap;
use std::path::Path;

use super::reads::MAX_MANIFEST_BYTES;
use super::{Builder, Image, Request};
use crate::manifest::{self, Digest, EMPTY_CONFIG, OCI_MANIFEST};
use crate::nix::Closure;
use crate::sbom;
use crate::source::Pin;
use crate::storage::{self, Cache, StorageError};

/// The artifact type (and layer media type) of an SPDX document.
pub const SPDX: &str = "application/spdx+json";
/// The artifact type (and layer media type) of a CycloneDX document.
pub const CYCLONEDX: &str = "application/vnd.cyclonedx+json";

/// When a package set with no commit time was made, as the documents say: the first second
/// after the epoch (0 reads as "unset" to some tools).
const NO_TIME: &str = "1970-01-01T00:00:01Z";

/// When the package set of `tree` (a commit's, unpacked from its archive) was made: the time
/// of its `default.nix`, which `git archive` and forges' tarballs set to the commit's time.
pub(super) fn commit_time(tree: &Path) -> String {
    std::fs::metadata(tree.join("default.nix"))
        .and_then(|meta| meta.modified())
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .filter(|since| since.as_secs() > 1)
        .map_or_else(|| NO_TIME.to_owned(), |since| rfc3339(since.as_secs()))
}

/// [`commit_time`] for images whose package set has no commit.
pub(super) fn no_time() -> String {
    NO_TIME.to_owned()
}

/// `2024-05-01T12:00:00Z` for `unix` seconds (a proleptic Gregorian calendar, UTC).
fn rfc3339(unix: u64) -> String {
    let (days, seconds) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds % 3600 / 60,
        seconds % 60
    )
}

/// The SBOMs stored with an image.
pub(super) struct Sboms {
    /// How many blobs were stored: the documents, their artifact manifests and the empty config.
    pub blobs: usize,
    /// Each document's artifact type ([`SPDX`], [`CYCLONEDX`]) and digest.
    pub documents: Vec<(&'static str, Digest)>,
}

impl Builder {
    /// Makes the SBOMs of `image`, built from `closure` for `request` out of a package set made
    /// at `created`, and stores them with their artifact manifests and the referrers of both of
    /// the image's manifests.
    pub(super) async fn store_sboms(
        &self,
        request: &Request,
        image: &Image,
        closure: &Closure,
        created: String,
    ) -> Result<Sboms, StorageError> {
        let subject = self.subject(request, image, &created);
        let storage = self.storage.as_ref();
        storage::put_bytes(storage, EMPTY_CONFIG, None).await?;
        let mut blobs = 1;
        let mut documents = Vec::new();
        let mut referrers: BTreeMap<&Digest, Vec<serde_json::Value>> = BTreeMap::new();
        for (artifact_type, title, document) in [
            (
                SPDX,
                "sbom.spdx.json",
                sbom::spdx(&subject, closure, &closure.meta),
            ),
            (
                CYCLONEDX,
                "sbom.cdx.json",
                sbom::cyclonedx(&subject, closure, &closure.meta),
            ),
        ] {
            let blob = (
                storage::put_bytes(storage, &document, None).await?,
                document.len() as u64,
            );
            documents.push((artifact_type, blob.0.clone()));
            blobs += 1;
            let annotations = BTreeMap::from([(
                "org.opencontainers.image.created".to_owned(),
                created.clone(),
            )]);
            for subject in image.manifests() {
                let artifact = manifest::artifact_manifest(
                    artifact_type,
                    (&blob, title),
                    subject,
                    &annotations,
                );
                storage::put_bytes(storage, &artifact, Some(OCI_MANIFEST)).await?;
                blobs += 1;
                if let Some(descriptor) = manifest::referrer_descriptor(&artifact) {
                    referrers
                        .entry(&subject.digest)
                        .or_default()
                        .push(descriptor);
                }
            }
        }
        for (subject, descriptors) in referrers {
            let entry = serde_json::to_vec(&descriptors).expect("descriptors serialise");
            storage
                .write_cache(Cache::Referrers, subject.hex(), &entry)
                .await?;
        }
        Ok(Sboms { blobs, documents })
    }

    /// What the SBOMs of `image` (built for `request` out of a package set made at `created`)
    /// say it is.
    fn subject(&self, request: &Request, image: &Image, created: &str) -> sbom::Subject {
        let (url, commit) = match &request.pin {
            Pin::Commit { commit, source } => (Some(source.clone()), Some(commit.to_string())),
            Pin::Path(_) => (None, None),
        };
        sbom::Subject {
            image: request.packages_name(),
            tag: commit.clone().unwrap_or_else(|| "latest".to_owned()),
            digest: image.main().digest.to_string(),
            platform: request.platform.to_string(),
            created: created.to_owned(),
            supplier: sbom::Supplier {
                name: self.sources.set_name(),
                url,
                commit,
            },
        }
    }

    /// The descriptors of the artifacts whose subject is manifest `digest`: none when it has
    /// none (or is not a manifest here).
    pub async fn referrers(&self, digest: &Digest) -> Result<Vec<serde_json::Value>, StorageError> {
        Ok(self
            .storage
            .read_cache(Cache::Referrers, digest.hex())
            .await?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default())
    }

    /// The SBOM of `artifact_type` ([`SPDX`] or [`CYCLONEDX`]) of image manifest `digest`, when
    /// it has one.
    pub async fn sbom(
        &self,
        digest: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let referrers = self.referrers(digest).await?;
        let Some(artifact) = referrers
            .iter()
            .find(|d| d["artifactType"] == artifact_type)
            .and_then(|d| d["digest"].as_str()?.parse::<Digest>().ok())
        else {
            return Ok(None);
        };
        let Some(bytes) = self
            .storage
            .read_blob(&artifact, MAX_MANIFEST_BYTES)
            .await?
        else {
            return Ok(None);
        };
        let Some(document) = manifest::layers(&bytes).and_then(|layers| layers.into_iter().next())
        else {
            return Ok(None);
        };
        self.storage.read_blob(&document.0, MAX_SBOM_BYTES).await
    }
}

/// Largest SBOM read back (a nixpkgs closure of a few thousand paths makes a few MB).
const MAX_SBOM_BYTES: u64 = 64 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1), NO_TIME);
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_714_564_800), "2024-05-01T12:00:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
