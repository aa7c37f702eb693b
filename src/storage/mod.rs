//! Where blobs and build caches live: a trait, and its backends.
//!
//! Blobs are written to a local staging file while they are hashed ([`StagedBlob`]), and
//! committed under their digest only when complete and shown to have that digest, so a
//! half-written or mislabelled blob is never visible under a digest.

pub mod bucket;
mod counted;
mod file_stream;
pub mod filesystem;
pub mod gcs;
pub mod s3;
mod staging;

use async_trait::async_trait;

use crate::manifest::Digest;

pub use counted::Counted;
pub use filesystem::Filesystem;
pub use gcs::Gcs;
pub use s3::S3;
pub(crate) use staging::clear_staging;
pub use staging::{StagedBlob, Staging};

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage is not writable or readable: {context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("the bucket could not be reached or refused: {context}: {source}")]
    Remote {
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("a blob to be stored as {expected} has the digest {actual}: not stored")]
    DigestMismatch { expected: Digest, actual: Digest },
}

impl StorageError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StorageError {
        let context = context.into();
        move |source| StorageError::Io { context, source }
    }

    pub fn remote<E: std::error::Error + Send + Sync + 'static>(
        context: impl Into<String>,
    ) -> impl FnOnce(E) -> StorageError {
        let context = context.into();
        move |source| StorageError::Remote {
            context,
            source: Box::new(source),
        }
    }
}

/// A stream of a blob's bytes.
pub type ByteStream = futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>;

/// A stored blob's bytes: their size, and any part of them as a stream. How they are read (a
/// file, a bucket) is the backend's business.
pub struct Contents {
    size: u64,
    read: Box<dyn Fn(u64, u64) -> ByteStream + Send + Sync>,
}

impl Contents {
    /// Contents of `size` bytes, of which `read(start, len)` streams `len` from `start`.
    pub fn new(size: u64, read: impl Fn(u64, u64) -> ByteStream + Send + Sync + 'static) -> Self {
        Contents {
            size,
            read: Box::new(read),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// `len` bytes from `start` (within [`Contents::size`]).
    pub fn read(&self, start: u64, len: u64) -> ByteStream {
        (self.read)(start, len)
    }
}

/// A stored blob, ready to be served.
pub enum Blob {
    /// The bytes, streamed by nixery.
    Stored(Contents),
    /// Elsewhere: the client is sent to this URL (a 303), so the bytes never pass through
    /// nixery.
    Redirect(String),
}

/// The build caches nixery keeps beside the blobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// Which store paths gave which layer blob.
    Layers,
    /// Which package list gave which manifest.
    Manifests,
    /// The package catalog of a commit's package set.
    Catalogs,
    /// The artifacts (SBOMs) that refer to a manifest, by the manifest's digest: descriptors
    /// for the referrers API.
    Referrers,
    /// The commits a deployment has seen at the head of its source's channel, branches or tags
    /// (which commits clients may name: `NIXERY_COMMIT_PINS`).
    Commits,
    /// The manifests each signing key signed of an image, by its manifest key.
    Signed,
    /// The SLSA provenance predicate of an image, by its manifest key.
    Provenance,
    /// The digest of a manifest's signatures or attestations for a name (cosign's `.sig` and
    /// `.att`), by a hash of both.
    Attachments,
}

impl Cache {
    fn dir_name(self) -> &'static str {
        match self {
            Cache::Layers => "layers",
            Cache::Manifests => "manifests",
            Cache::Catalogs => "catalogs",
            Cache::Referrers => "referrers",
            Cache::Commits => "commits",
            Cache::Signed => "signed",
            Cache::Provenance => "provenance",
            Cache::Attachments => "attachments",
        }
    }
}

/// A place to keep blobs and caches.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Where blobs are staged ([`Staging::stage`]) before [`Storage::commit`].
    fn staging(&self) -> &Staging;

    /// Makes the complete blob `staged` available as blob `digest`, after checking that its
    /// bytes have that digest ([`StorageError::DigestMismatch`] when not: then nothing is stored
    /// under `digest`). A backend that sends clients elsewhere for blobs serves it there with
    /// `media_type` (a manifest's), when given.
    async fn commit(
        &self,
        staged: StagedBlob,
        digest: &Digest,
        media_type: Option<&'static str>,
    ) -> Result<(), StorageError>;

    /// Whether blob `digest` is stored.
    async fn has_blob(&self, digest: &Digest) -> Result<bool, StorageError>;

    /// Blob `digest`, or `None` when it is not stored. `head` says the client will send `HEAD`
    /// rather than `GET` to a redirect URL (a signed URL is only valid for one method).
    async fn blob(&self, digest: &Digest, head: bool) -> Result<Option<Blob>, StorageError>;

    /// The bytes of blob `digest` when it is stored and at most `limit` bytes long (for small
    /// documents nixery reads itself, such as manifests).
    async fn read_blob(&self, digest: &Digest, limit: u64)
    -> Result<Option<Vec<u8>>, StorageError>;

    /// The cache entry under `key` (a hex string), if any.
    async fn read_cache(&self, cache: Cache, key: &str) -> Result<Option<Vec<u8>>, StorageError>;

    /// Replaces the cache entry under `key` (a hex string), atomically.
    async fn write_cache(&self, cache: Cache, key: &str, value: &[u8]) -> Result<(), StorageError>;

    /// Whether storage can be used now (readiness): `Ok` when it is reachable and writable.
    async fn check(&self) -> Result<(), StorageError>;
}

/// Stores `bytes` as a blob (of `media_type`, if it is a manifest) and returns its digest.
pub async fn put_bytes(
    storage: &dyn Storage,
    bytes: &[u8],
    media_type: Option<&'static str>,
) -> Result<Digest, StorageError> {
    let digest = Digest::of(bytes);
    if storage.has_blob(&digest).await? {
        return Ok(digest);
    }
    let staging = storage.staging().clone();
    let data = bytes.to_vec();
    let staged = tokio::task::spawn_blocking(move || -> std::io::Result<StagedBlob> {
        use std::io::Write;
        let mut staged = staging.stage()?;
        staged.write_all(&data)?;
        Ok(staged)
    })
    .await
    .unwrap_or_else(|panicked| Err(std::io::Error::other(panicked)))
    .map_err(StorageError::io("staging a blob"))?;
    storage.commit(staged, &digest, media_type).await?;
    Ok(digest)
}
