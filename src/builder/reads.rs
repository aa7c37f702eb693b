//! What clients read back: blobs (a manifest served with its own media type, whatever the
//! route), manifests by digest (from memory, else from storage), and images cached in storage
//! by their manifest key, served only while every blob they name is stored.

use std::sync::Arc;

use futures::stream::StreamExt;

use super::{Builder, Built, Image};
use crate::manifest::{self, Digest, Format, Manifest};
use crate::server::metrics::METRICS;
use crate::storage::{self, Blob, Cache, StorageError};
use crate::sync::lock;

/// Largest blob read as a manifest (the limit the distribution spec suggests).
pub(super) const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// A blob as it is to be served.
pub enum Served {
    /// A manifest, with its own media type.
    Manifest(Arc<Manifest>),
    /// Any other blob.
    Blob(Blob),
}

impl Builder {
    /// The image of manifest key `key` if it is in memory.
    pub(super) fn in_memory(&self, key: Option<&str>) -> Option<Arc<Image>> {
        lock(&self.built).get(key?).cloned()
    }

    /// Keeps `image` in memory under manifest key `key`, and its manifests by digest.
    pub(super) fn remember(&self, key: &str, image: &Arc<Image>) {
        let mut built = lock(&self.built);
        built.put(key.to_owned(), image.clone());
        METRICS.cache_size("images", built.len());
        drop(built);
        self.remember_manifests(image.manifests());
    }

    /// Keeps manifests (or indexes) in memory to serve by digest.
    pub(super) fn remember_manifests<'a>(
        &self,
        served: impl IntoIterator<Item = &'a Arc<Manifest>>,
    ) {
        let mut manifests = lock(&self.manifests);
        for manifest in served {
            manifests.put(manifest.digest.clone(), manifest.clone());
        }
        METRICS.cache_size("manifests", manifests.len());
    }

    /// A manifest of an image this server built or served recently.
    pub fn known_manifest(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        lock(&self.manifests).get(digest).cloned()
    }

    /// Blob `digest` as clients should get it: a manifest (by its digest, containerd asks for
    /// manifests on the blobs route too) with its own media type, else the stored blob. A small
    /// file that starts like JSON is read to tell; a blob served by redirect carries its media
    /// type where it is stored.
    pub async fn blob(&self, digest: &Digest, head: bool) -> Result<Option<Served>, StorageError> {
        if let Some(manifest) = self.known_manifest(digest) {
            return Ok(Some(Served::Manifest(manifest)));
        }
        match self.storage.blob(digest, head).await? {
            Some(Blob::Stored(contents)) => {
                if contents.size() <= MAX_MANIFEST_BYTES
                    && starts_like_json(&contents).await?
                    && let Some(manifest) = self.stored_manifest(digest).await?
                {
                    return Ok(Some(Served::Manifest(manifest)));
                }
                Ok(Some(Served::Blob(Blob::Stored(contents))))
            }
            other => Ok(other.map(Served::Blob)),
        }
    }

    /// A manifest this registry stored, by digest: from memory, else read from storage (built
    /// before a restart, or by another replica) and remembered. `None` when the digest is not
    /// stored, is not a manifest, or its bytes do not match it.
    pub async fn stored_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<Arc<Manifest>>, StorageError> {
        if let Some(manifest) = self.known_manifest(digest) {
            return Ok(Some(manifest));
        }
        let Some(bytes) = self.storage.read_blob(digest, MAX_MANIFEST_BYTES).await? else {
            return Ok(None);
        };
        let Some(media_type) = manifest::declared_media_type(&bytes)
            .as_deref()
            .and_then(Format::known_media_type)
        else {
            return Ok(None);
        };
        let manifest = Arc::new(Manifest::new(bytes, media_type));
        if &manifest.digest != digest {
            tracing::error!(%digest, actual = %manifest.digest, "stored manifest does not match its digest");
            return Ok(None);
        }
        self.remember_manifests([&manifest]);
        Ok(Some(manifest))
    }

    /// The image of manifest key `key` from storage, when it and all its blobs are there: a gzip
    /// image is kept as its Docker manifest (the OCI one is made from it), a zstd image as its
    /// OCI manifest.
    pub(super) async fn stored(&self, key: &str) -> Result<Option<Built>, StorageError> {
        if let Some(main) = self.storage.read_cache(Cache::Manifests, key).await?
            && let Some(image) = cached_image(main)
            && self.all_stored(&image).await?
        {
            tracing::debug!(digest = %image.main().digest, "manifest from cache");
            METRICS.cache_lookup("storage");
            METRICS.build_outcome("cached");
            return Ok(Some(Built::cached(Arc::new(image), "storage")));
        }
        Ok(None)
    }

    /// Whether every blob of a cached image (its manifests, the config and each layer) is
    /// still stored, so a cache entry never leads a client to a missing blob.
    async fn all_stored(&self, image: &Image) -> Result<bool, StorageError> {
        let mut digests: Vec<Digest> = image.manifests().map(|m| m.digest.clone()).collect();
        digests.extend(manifest::referenced_blobs(&image.main().bytes).unwrap_or_default());
        for digest in &digests {
            if !self.storage.has_blob(digest).await? {
                tracing::warn!(%digest, "a cached image lost a blob; building it again");
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The image a manifest cache entry holds: a Docker manifest is a gzip image's, an OCI one a
/// zstd image's. `None` when the entry is neither.
fn cached_image(main: Vec<u8>) -> Option<Image> {
    match manifest::declared_media_type(&main).as_deref() {
        Some(manifest::OCI_MANIFEST) => Some(Image::zstd(main)),
        _ => {
            let oci = manifest::convert(&main, Format::Oci)?;
            Some(Image::new(main, oci))
        }
    }
}

/// Whether a blob starts with `{` (as manifests and configs do; compressed layers never do).
async fn starts_like_json(contents: &storage::Contents) -> Result<bool, StorageError> {
    if contents.size() == 0 {
        return Ok(false);
    }
    let first = contents
        .read(0, 1)
        .next()
        .await
        .transpose()
        .map_err(StorageError::io("reading a blob"))?;
    Ok(first.is_some_and(|bytes| bytes.first() == Some(&b'{')))
}
