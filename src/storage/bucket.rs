//! What the bucket backends (Cloud Storage, S3) share. Blobs are kept at `blobs/sha256/<hex>`
//! and caches at `cache/<kind>/<key>` in one bucket, which any number of nixery replicas share;
//! clients fetch blobs from the bucket itself through a 303 to a signed URL.
//!
//! Only single-shot object reads and writes are used, never copy, multipart or delete. A blob
//! is packed and hashed into a local staging file, checked against its digest, then uploaded
//! straight to its final key with its checksums (the service refuses bytes that do not match
//! them) and a create-only condition. A single-shot upload is atomic, so a failed or
//! interrupted upload leaves no object at all, and an object under a digest's key always has
//! that digest's bytes.
//!
//! A backend says how to look up, read, write and sign one object ([`Objects`]); [`Bucket`]
//! is the [`Storage`] on top of it, the same for every backend.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::staging::VerifiedBlob;
use super::{Blob, Cache, StagedBlob, Staging, Storage, StorageError};
use crate::manifest::Digest;
use crate::server::metrics::METRICS;
use crate::sync::lock;
use async_trait::async_trait;
use bytes::Bytes;
use md5::Md5;
use sha2::{Digest as _, Sha256};

/// How long one storage call may keep retrying transient errors before the request fails.
pub const RETRY_TIME_LIMIT: Duration = Duration::from_secs(15);

/// How many times one storage call is tried, the first included.
pub const RETRY_ATTEMPTS: u32 = 5;

/// The object whose presence the readiness check reads (and creates when missing).
const PROBE_KEY: &str = "nixery-ready";

/// The checksums an object is uploaded with: each service checks the ones it knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksums {
    pub sha256: [u8; 32],
    pub md5: [u8; 16],
    pub crc32c: u32,
}

impl Checksums {
    pub fn of(bytes: &[u8]) -> Self {
        Checksums {
            sha256: Sha256::digest(bytes).into(),
            md5: Md5::digest(bytes).into(),
            crc32c: crc32c::crc32c(bytes),
        }
    }

    /// Checksums of the verified blob `staged` (blob `digest`): its sha256 was computed while
    /// it was written, the others are read from its file.
    async fn of_staged(staged: &VerifiedBlob, digest: &Digest) -> Result<Self, StorageError> {
        let path = staged.path().to_path_buf();
        let sha256 = staged.sha256();
        tokio::task::spawn_blocking(move || -> std::io::Result<Checksums> {
            use std::io::Read;
            let mut file = std::fs::File::open(&path)?;
            let (mut md5, mut crc) = (Md5::new(), 0u32);
            let mut buf = vec![0; 1 << 20];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                md5.update(&buf[..n]);
                crc = crc32c::crc32c_append(crc, &buf[..n]);
            }
            Ok(Checksums {
                sha256,
                md5: md5.finalize().into(),
                crc32c: crc,
            })
        })
        .await
        .unwrap_or_else(|panicked| Err(std::io::Error::other(panicked)))
        .map_err(StorageError::io(format!("reading staged blob {digest}")))
    }

    /// Whether a stored object has these bytes: at least one checksum the service reports,
    /// and none that differs.
    fn matches(&self, stored: &Stored) -> bool {
        let compared = [
            stored.sha256.map(|s| s == self.sha256),
            stored.md5.map(|m| m == self.md5),
            stored.crc32c.map(|c| c == self.crc32c),
        ];
        compared.iter().any(Option::is_some) && compared.iter().all(|c| c.unwrap_or(true))
    }
}

/// What a bucket reports of a stored object.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    pub sha256: Option<[u8; 32]>,
    pub md5: Option<[u8; 16]>,
    pub crc32c: Option<u32>,
    /// What a conditional write names to replace exactly this object (a generation, an ETag).
    pub version: String,
}

/// The bytes of an upload.
pub enum Body<'a> {
    /// A staged file, read again from the start on every attempt.
    File(&'a Path),
    Bytes(Bytes),
}

/// When a write may happen.
#[derive(Clone, Debug)]
pub enum Condition {
    /// Only when there is no object under the key (create-only).
    Absent,
    /// Only when the object is still the one of this [`Stored::version`].
    Replaces(String),
}

/// How a conditional write ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    Done,
    /// The condition did not hold: another writer got there first.
    ConditionFailed,
}

/// Whether a call retries transient errors (readiness checks do not: they must answer fast).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    Transient,
    Never,
}

/// One bucket's objects, as a backend reaches them.
#[async_trait]
pub trait Objects: Send + Sync + 'static {
    /// What the service reports of object `key`, or `None` when there is no such object.
    async fn head(&self, key: &str, retry: Retry) -> Result<Option<Stored>, StorageError>;

    /// The bytes of object `key`; `None` when it does not exist or is longer than `limit`.
    async fn read(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, StorageError>;

    /// Writes `body` to `key` with `sums`, as `media_type` (octet-stream when `None`), if
    /// `condition` holds.
    async fn write(
        &self,
        key: &str,
        body: Body<'_>,
        sums: &Checksums,
        media_type: Option<&'static str>,
        condition: Condition,
        retry: Retry,
    ) -> Result<Written, StorageError>;

    /// Where a client fetches object `key` with `GET` (or `HEAD` when `head`): a signed URL,
    /// or the public one.
    async fn url(&self, key: &str, head: bool) -> Result<String, StorageError>;
}

/// Blobs and caches in a bucket reached through `O`.
pub struct Bucket<O> {
    objects: O,
    staging: Staging,
    /// Digests known to be stored: objects are immutable and never deleted, so one look-up per
    /// digest is enough while it is remembered.
    known: Mutex<lru::LruCache<Digest, ()>>,
    /// The metric the number of remembered digests is reported under.
    known_metric: &'static str,
}

impl<O: Objects> Bucket<O> {
    /// A bucket reached through `objects`, with an emptied staging directory at `staging`,
    /// remembering up to `known_entries` digests as stored (reported as `known_metric`).
    pub fn new(
        objects: O,
        staging: PathBuf,
        known_entries: std::num::NonZeroUsize,
        known_metric: &'static str,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let display = staging.display().to_string();
        let staging = Staging::open(staging).with_context(|| format!("preparing {display}"))?;
        Ok(Bucket {
            objects,
            staging,
            known: Mutex::new(lru::LruCache::new(known_entries)),
            known_metric,
        })
    }

    pub fn objects(&self) -> &O {
        &self.objects
    }

    fn blob_key(digest: &Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }

    fn cache_key(cache: Cache, key: &str) -> String {
        debug_assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        format!("cache/{}/{key}", cache.dir_name())
    }

    fn remember(&self, digest: &Digest) {
        let mut known = lock(&self.known);
        known.put(digest.clone(), ());
        METRICS.cache_size(self.known_metric, known.len());
    }

    /// Uploads `body` to `key` unless an object with the same checksums is there already. The
    /// write is conditional: on no object (create-only), or on the version of the differing
    /// object it replaces, so concurrent writers never overwrite each other blindly.
    async fn put(
        &self,
        key: &str,
        body: Body<'_>,
        sums: &Checksums,
        media_type: Option<&'static str>,
    ) -> Result<(), StorageError> {
        let existing = self.objects.head(key, Retry::Transient).await?;
        let condition = match existing {
            Some(object) if sums.matches(&object) => {
                tracing::debug!(key, "already in the bucket, not uploaded");
                return Ok(());
            }
            Some(object) => {
                tracing::warn!(key, "replacing an object whose checksums do not match");
                Condition::Replaces(object.version)
            }
            None => Condition::Absent,
        };
        let written = self
            .objects
            .write(key, body, sums, media_type, condition, Retry::Transient)
            .await?;
        match written {
            Written::Done => {
                tracing::info!(key, "uploaded object");
                METRICS.uploads.inc();
                Ok(())
            }
            // Another replica (or an earlier attempt whose answer was lost) got there first.
            Written::ConditionFailed => match self.objects.head(key, Retry::Transient).await? {
                Some(object) if sums.matches(&object) => Ok(()),
                _ => Err(StorageError::Remote {
                    context: format!("uploading {key}"),
                    source: "another writer stored different bytes under this key".into(),
                }),
            },
        }
    }
}

#[async_trait]
impl<O: Objects> Storage for Bucket<O> {
    fn staging(&self) -> &Staging {
        &self.staging
    }

    async fn commit(
        &self,
        staged: StagedBlob,
        digest: &Digest,
        media_type: Option<&'static str>,
    ) -> Result<(), StorageError> {
        let staged = staged.verify(digest)?;
        let sums = Checksums::of_staged(&staged, digest).await?;
        self.put(
            &Self::blob_key(digest),
            Body::File(staged.path()),
            &sums,
            media_type,
        )
        .await?;
        self.remember(digest);
        Ok(())
    }

    async fn has_blob(&self, digest: &Digest) -> Result<bool, StorageError> {
        if lock(&self.known).get(digest).is_some() {
            return Ok(true);
        }
        let key = Self::blob_key(digest);
        let found = self.objects.head(&key, Retry::Transient).await?.is_some();
        if found {
            self.remember(digest);
        }
        Ok(found)
    }

    async fn blob(&self, digest: &Digest, head: bool) -> Result<Option<Blob>, StorageError> {
        if !self.has_blob(digest).await? {
            return Ok(None);
        }
        let url = self.objects.url(&Self::blob_key(digest), head).await?;
        Ok(Some(Blob::Redirect(url)))
    }

    async fn read_blob(
        &self,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        self.objects.read(&Self::blob_key(digest), limit).await
    }

    async fn read_cache(&self, cache: Cache, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.objects
            .read(&Self::cache_key(cache, key), u64::MAX)
            .await
    }

    async fn write_cache(&self, cache: Cache, key: &str, value: &[u8]) -> Result<(), StorageError> {
        // Cache entries are replaced whole (one object write is atomic); every replica writes
        // the same entry for the same key, so an unchanged entry is not uploaded again.
        let body = Body::Bytes(Bytes::copy_from_slice(value));
        self.put(
            &Self::cache_key(cache, key),
            body,
            &Checksums::of(value),
            None,
        )
        .await
    }

    /// Reads and writes: a look-up of the probe object, and a create-only write of it, which
    /// the bucket refuses once it exists (a request it would refuse for want of permission is
    /// refused before the condition is looked at).
    async fn check(&self) -> Result<(), StorageError> {
        self.objects.head(PROBE_KEY, Retry::Never).await?;
        let probe = b"ok\n";
        self.objects
            .write(
                PROBE_KEY,
                Body::Bytes(Bytes::from_static(probe)),
                &Checksums::of(probe),
                None,
                Condition::Absent,
                Retry::Never,
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(sums: &Checksums) -> Stored {
        Stored {
            sha256: Some(sums.sha256),
            md5: Some(sums.md5),
            crc32c: Some(sums.crc32c),
            version: String::new(),
        }
    }

    #[test]
    fn checksums_match_only_the_same_bytes() {
        let sums = Checksums::of(b"layer");
        let other = Checksums::of(b"other");
        assert!(sums.matches(&stored(&sums)));
        for only in 0..3 {
            let mut one = Stored::default();
            match only {
                0 => one.sha256 = Some(sums.sha256),
                1 => one.md5 = Some(sums.md5),
                _ => one.crc32c = Some(sums.crc32c),
            }
            assert!(sums.matches(&one), "only checksum {only} reported");
        }
        let mut wrong = stored(&sums);
        wrong.sha256 = Some(other.sha256);
        assert!(!sums.matches(&wrong));
        let mut wrong = stored(&sums);
        wrong.md5 = Some(other.md5);
        assert!(!sums.matches(&wrong));
        let mut wrong = stored(&sums);
        wrong.crc32c = Some(other.crc32c);
        assert!(!sums.matches(&wrong));
        assert!(!sums.matches(&Stored::default()));
    }

    #[tokio::test]
    async fn a_staged_blob_is_uploaded_with_the_checksums_of_its_bytes() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(dir.path().join("tmp")).unwrap();
        let mut staged = staging.stage().unwrap();
        staged.write_all(b"layer").unwrap();
        let digest = Digest::of(b"layer");
        let verified = staged.verify(&digest).unwrap();
        let sums = Checksums::of_staged(&verified, &digest).await.unwrap();
        assert_eq!(sums, Checksums::of(b"layer"));
    }
}
