//! The filesystem backend: blobs at `STORAGE_PATH/blobs/sha256/<hex>`, caches at
//! `STORAGE_PATH/cache/<kind>/<key>`, staging files in `STORAGE_PATH/tmp` (same filesystem, so a
//! commit is an atomic rename; leftovers of a crash are removed at start-up).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures::StreamExt;
use tempfile::NamedTempFile;

use super::file_stream::{CHUNK, file_chunks};
use super::{Blob, Cache, Contents, StagedBlob, Staging, Storage, StorageError};
use crate::manifest::Digest;
use crate::server::metrics::METRICS;

/// Blobs and caches in a local directory.
pub struct Filesystem {
    root: PathBuf,
    staging: Staging,
}

impl Filesystem {
    /// Opens (creating if needed) storage at `root` and clears staging files left by a crash.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        let staging = Staging::open(root.join("tmp"))?;
        for dir in [
            root.join("blobs/sha256"),
            root.join("cache").join(Cache::Layers.dir_name()),
            root.join("cache").join(Cache::Manifests.dir_name()),
            root.join("cache").join(Cache::Catalogs.dir_name()),
            root.join("cache").join(Cache::Referrers.dir_name()),
            root.join("cache").join(Cache::Commits.dir_name()),
            root.join("cache").join(Cache::Signed.dir_name()),
            root.join("cache").join(Cache::Provenance.dir_name()),
            root.join("cache").join(Cache::Attachments.dir_name()),
        ] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Filesystem {
            root: root.to_path_buf(),
            staging,
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn cache_path(&self, cache: Cache, key: &str) -> PathBuf {
        debug_assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        self.root.join("cache").join(cache.dir_name()).join(key)
    }
}

/// Flushes `staged` to disk and renames it to `target`, so `target` is either absent or whole.
async fn persist(staged: NamedTempFile, target: PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::PermissionsExt;
        let file = staged.as_file();
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.sync_all()?;
        staged.persist(&target).map_err(|e| e.error)?;
        Ok(())
    })
    .await
    .unwrap_or_else(|panicked| Err(std::io::Error::other(panicked)))
}

impl Filesystem {
    /// The size of blob `digest`, or `None` when it is not stored.
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        match tokio::fs::metadata(self.blob_path(digest)).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io(format!("looking up blob {digest}"))(e)),
        }
    }
}

/// Opens the file at `path` for reading, with its size; `None` when there is none.
async fn open_sized(path: PathBuf) -> std::io::Result<Option<(std::fs::File, u64)>> {
    tokio::task::spawn_blocking(move || match std::fs::File::open(path) {
        Ok(file) => {
            let size = file.metadata()?.len();
            Ok(Some((file, size)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    })
    .await
    .unwrap_or_else(|panicked| Err(std::io::Error::other(panicked)))
}

#[async_trait]
impl Storage for Filesystem {
    fn staging(&self) -> &Staging {
        &self.staging
    }

    async fn commit(
        &self,
        staged: StagedBlob,
        digest: &Digest,
        _media_type: Option<&'static str>,
    ) -> Result<(), StorageError> {
        let verified = staged.verify(digest)?;
        persist(verified.into_file(), self.blob_path(digest))
            .await
            .map_err(StorageError::io(format!("storing blob {digest}")))?;
        METRICS.uploads.inc();
        Ok(())
    }

    async fn has_blob(&self, digest: &Digest) -> Result<bool, StorageError> {
        tokio::fs::try_exists(self.blob_path(digest))
            .await
            .map_err(StorageError::io(format!("looking up blob {digest}")))
    }

    async fn blob(&self, digest: &Digest, _head: bool) -> Result<Option<Blob>, StorageError> {
        // Opened once: every part read from it is a `pread`, with no seek to share.
        let Some((file, size)) = open_sized(self.blob_path(digest))
            .await
            .map_err(StorageError::io(format!("opening blob {digest}")))?
        else {
            return Ok(None);
        };
        let file = std::sync::Arc::new(file);
        Ok(Some(Blob::Stored(Contents::new(
            size,
            move |start, len| file_chunks(file.clone(), start, len, CHUNK).boxed(),
        ))))
    }

    async fn read_blob(
        &self,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        match self.blob_size(digest).await? {
            Some(size) if size <= limit => tokio::fs::read(self.blob_path(digest))
                .await
                .map(Some)
                .map_err(StorageError::io(format!("reading blob {digest}"))),
            _ => Ok(None),
        }
    }

    async fn read_cache(&self, cache: Cache, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        match tokio::fs::read(self.cache_path(cache, key)).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io(format!("reading cache entry {key}"))(e)),
        }
    }

    async fn write_cache(&self, cache: Cache, key: &str, value: &[u8]) -> Result<(), StorageError> {
        let context = format!("writing cache entry {key}");
        let staging = self.staging.clone();
        let value = value.to_vec();
        let staged = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut file = staging.file()?;
            file.write_all(&value)?;
            Ok::<_, std::io::Error>(file)
        })
        .await
        .unwrap_or_else(|panicked| Err(std::io::Error::other(panicked)))
        .map_err(StorageError::io(context.clone()))?;
        persist(staged, self.cache_path(cache, key))
            .await
            .map_err(StorageError::io(context))?;
        METRICS.uploads.inc();
        Ok(())
    }

    async fn check(&self) -> Result<(), StorageError> {
        let staging = self.staging.clone();
        tokio::task::spawn_blocking(move || staging.file().map(drop))
            .await
            .unwrap_or_else(|panicked| Err(std::io::Error::other(panicked)))
            .map_err(StorageError::io(self.staging.describe()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::put_bytes;

    #[tokio::test]
    async fn blobs_round_trip_under_their_digest() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Filesystem::open(dir.path()).unwrap();
        let digest = put_bytes(&storage, b"hello", None).await.unwrap();
        assert_eq!(digest, Digest::of(b"hello"));
        assert!(storage.has_blob(&digest).await.unwrap());
        let Some(Blob::Stored(contents)) = storage.blob(&digest, false).await.unwrap() else {
            panic!("blob is missing");
        };
        assert_eq!(contents.size(), 5);
        let read = |start, len| {
            let stream = contents.read(start, len);
            async move {
                use futures::TryStreamExt;
                let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
                chunks.concat()
            }
        };
        assert_eq!(read(0, 5).await, b"hello");
        assert_eq!(read(1, 3).await, b"ell");
        assert!(
            std::fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_blob_is_refused_under_a_digest_that_is_not_its_own() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let storage = Filesystem::open(dir.path()).unwrap();
        let mut staged = storage.staging().stage().unwrap();
        staged.write_all(b"hello").unwrap();
        let claimed = Digest::of(b"other");
        let err = storage.commit(staged, &claimed, None).await.unwrap_err();
        assert!(
            matches!(&err, StorageError::DigestMismatch { expected, actual }
                if *expected == claimed && *actual == Digest::of(b"hello")),
            "{err}"
        );
        assert!(!storage.has_blob(&claimed).await.unwrap());
        assert!(!storage.has_blob(&Digest::of(b"hello")).await.unwrap());
        assert!(
            std::fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[tokio::test]
    async fn missing_blobs_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Filesystem::open(dir.path()).unwrap();
        assert!(
            storage
                .blob(&Digest::of(b"x"), false)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            storage
                .read_blob(&Digest::of(b"x"), 10)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn small_blobs_are_read_whole_and_big_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Filesystem::open(dir.path()).unwrap();
        let digest = put_bytes(&storage, b"hello", None).await.unwrap();
        assert_eq!(
            storage.read_blob(&digest, 5).await.unwrap(),
            Some(b"hello".to_vec())
        );
        assert_eq!(storage.read_blob(&digest, 4).await.unwrap(), None);
        storage.check().await.unwrap();
    }

    #[tokio::test]
    async fn staging_leftovers_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        Filesystem::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("tmp/partial"), b"half a layer").unwrap();
        Filesystem::open(dir.path()).unwrap();
        assert!(!dir.path().join("tmp/partial").exists());
    }

    #[tokio::test]
    async fn caches_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Filesystem::open(dir.path()).unwrap();
        storage
            .write_cache(Cache::Manifests, "ab12", b"{}")
            .await
            .unwrap();
        let storage = Filesystem::open(dir.path()).unwrap();
        assert_eq!(
            storage.read_cache(Cache::Manifests, "ab12").await.unwrap(),
            Some(b"{}".to_vec())
        );
        assert_eq!(
            storage.read_cache(Cache::Layers, "ab12").await.unwrap(),
            None
        );
    }
}
