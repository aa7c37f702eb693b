//! A storage backend with every call counted in `nixery_storage_operations_total`, by backend,
//! operation and outcome: one wrapper, so no backend has to remember to count.

use async_trait::async_trait;

use super::{Blob, Cache, StagedBlob, Staging, Storage, StorageError};
use crate::manifest::Digest;
use crate::server::metrics::METRICS;

/// `inner`, counted under the backend name `backend`.
pub struct Counted<S> {
    backend: &'static str,
    inner: S,
}

impl<S> Counted<S> {
    pub fn new(backend: &'static str, inner: S) -> Self {
        Counted { backend, inner }
    }

    fn count<T>(
        &self,
        operation: &'static str,
        result: Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        METRICS.storage_operation(self.backend, operation, result.is_ok());
        result
    }
}

#[async_trait]
impl<S: Storage> Storage for Counted<S> {
    fn staging(&self) -> &Staging {
        self.inner.staging()
    }

    async fn commit(
        &self,
        staged: StagedBlob,
        digest: &Digest,
        media_type: Option<&'static str>,
    ) -> Result<(), StorageError> {
        self.count(
            "commit",
            self.inner.commit(staged, digest, media_type).await,
        )
    }

    async fn has_blob(&self, digest: &Digest) -> Result<bool, StorageError> {
        self.count("has_blob", self.inner.has_blob(digest).await)
    }

    async fn blob(&self, digest: &Digest, head: bool) -> Result<Option<Blob>, StorageError> {
        self.count("blob", self.inner.blob(digest, head).await)
    }

    async fn read_blob(
        &self,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        self.count("read_blob", self.inner.read_blob(digest, limit).await)
    }

    async fn read_cache(&self, cache: Cache, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.count("read_cache", self.inner.read_cache(cache, key).await)
    }

    async fn write_cache(&self, cache: Cache, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.count(
            "write_cache",
            self.inner.write_cache(cache, key, value).await,
        )
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.count("check", self.inner.check().await)
    }
}
