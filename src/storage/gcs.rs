//! The Google Cloud Storage backend, on Google's `google-cloud-storage` crate: blobs at
//! `blobs/sha256/<hex>`, caches at `cache/<kind>/<key>` in one bucket that any number of nixery
//! replicas share. Clients fetch blobs from the bucket itself through a 303 to a V4 signed URL
//! (or the public object URL when the credentials cannot sign).
//!
//! Only the JSON API's object reads and single-shot writes are used, never copy, rewrite or
//! delete: a blob is packed and hashed into a local staging file, then uploaded straight to its
//! final key with its CRC32C and MD5 (the service refuses bytes that do not match them) and a
//! create-only precondition. A single-shot upload is atomic, so a failed or interrupted upload
//! leaves no object at all, and an object under a digest's key always has that digest's bytes.
//! Resumable uploads are switched off (`with_resumable_upload_threshold(usize::MAX)`): they buy
//! nothing here, since a retry restarts from the staged file, and the client's resumable
//! session URL breaks against emulators that do not listen on port 80.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use google_cloud_auth::signer::Signer;
use google_cloud_gax::retry_policy::{NeverRetry, RetryPolicyExt};
use google_cloud_storage::builder::storage::SignedUrlBuilder;
use google_cloud_storage::client::Storage as Client;
use google_cloud_storage::model_ext::{ObjectHighlights, ReadRange};
use google_cloud_storage::retry_policy::RetryableErrors;
use google_cloud_storage::streaming_source::{Payload, Seek, StreamingSource};
use md5::Md5;
use sha2::{Digest as _, Sha256};
use tempfile::NamedTempFile;

use super::{Blob, Cache, Storage, StorageError};
use crate::manifest::Digest;
use crate::metrics::METRICS;
use crate::sync::lock;

/// Google's public endpoint, for the API and for redirect URLs.
pub const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";

/// How long one storage call may keep retrying transient errors before the request fails.
const RETRY_TIME_LIMIT: Duration = Duration::from_secs(15);

/// The object whose presence the readiness check reads (and creates when missing).
const PROBE_KEY: &str = "nixery-ready";

/// How to reach the bucket.
#[derive(Clone, Debug)]
pub struct GcsSettings {
    /// The bucket's name.
    pub bucket: String,
    /// Endpoint for the API and redirect URLs, e.g. an emulator's `http://127.0.0.1:4443`.
    pub endpoint: String,
    /// Send no credentials (emulators, public buckets) instead of Application Default
    /// Credentials.
    pub anonymous: bool,
    /// Lifetime of signed URLs; zero never signs and redirects to public object URLs.
    pub signed_url_expiry: Duration,
    /// Local directory for staging files.
    pub staging: PathBuf,
    /// Most digests remembered as stored (each saves one look-up).
    pub known_entries: std::num::NonZeroUsize,
}

/// Blobs and caches in a Cloud Storage bucket.
pub struct Gcs {
    client: Client,
    /// `projects/_/buckets/<name>`, as the client names buckets.
    bucket_path: String,
    settings: GcsSettings,
    signer: Option<Signer>,
    /// Digests known to be stored: objects are immutable and never deleted, so one look-up per
    /// digest is enough while it is remembered.
    known: Mutex<lru::LruCache<Digest, ()>>,
}

/// The checksums a blob is uploaded with.
struct Checksums {
    crc32c: u32,
    md5: [u8; 16],
}

impl Checksums {
    fn of(bytes: &[u8]) -> Self {
        Checksums {
            crc32c: crc32c::crc32c(bytes),
            md5: Md5::digest(bytes).into(),
        }
    }

    /// Whether a stored object has these checksums (either one the service reports suffices).
    fn matches(&self, object: &ObjectHighlights) -> bool {
        let Some(stored) = &object.checksums else {
            return false;
        };
        let crc = stored.crc32c.is_none_or(|c| c == self.crc32c);
        let md5 = stored.md5_hash.is_empty() || stored.md5_hash[..] == self.md5;
        crc && md5 && (stored.crc32c.is_some() || !stored.md5_hash.is_empty())
    }
}

impl Gcs {
    /// Connects to the bucket, decides how to sign URLs, and checks that the bucket can be
    /// read and written.
    pub async fn open(settings: GcsSettings) -> anyhow::Result<Self> {
        use anyhow::Context;
        super::clear_staging(&settings.staging)
            .with_context(|| format!("preparing {}", settings.staging.display()))?;
        let credentials = if settings.anonymous {
            google_cloud_auth::credentials::anonymous::Builder::new().build()
        } else {
            google_cloud_auth::credentials::Builder::default()
                .build()
                .context("no Google credentials found: set GOOGLE_APPLICATION_CREDENTIALS to a key file, run on Google Cloud, or set GCS_ANONYMOUS=true")?
        };
        let client = Client::builder()
            .with_endpoint(settings.endpoint.clone())
            .with_credentials(credentials)
            .with_retry_policy(
                RetryableErrors
                    .with_time_limit(RETRY_TIME_LIMIT)
                    .with_attempt_limit(5),
            )
            .with_resumable_upload_threshold(usize::MAX)
            .build()
            .await
            .context("creating the Cloud Storage client")?;
        let signer = signer(&settings).await;
        let gcs = Gcs {
            client,
            bucket_path: format!("projects/_/buckets/{}", settings.bucket),
            known: Mutex::new(lru::LruCache::new(settings.known_entries)),
            settings,
            signer,
        };
        gcs.check().await.with_context(|| {
            format!(
                "bucket {} at {} cannot be used: check GCS_BUCKET, GCS_ENDPOINT and the credentials",
                gcs.settings.bucket, gcs.settings.endpoint
            )
        })?;
        tracing::info!(
            bucket = %gcs.settings.bucket,
            endpoint = %gcs.settings.endpoint,
            signed_urls = gcs.signer.is_some(),
            "using Cloud Storage"
        );
        Ok(gcs)
    }

    fn blob_key(digest: &Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }

    fn cache_key(cache: Cache, key: &str) -> String {
        debug_assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        format!("cache/{}/{key}", cache.dir_name())
    }

    /// The metadata of object `key`, or `None` when there is no such object.
    async fn head(&self, key: &str, retry: bool) -> Result<Option<ObjectHighlights>, StorageError> {
        let mut request = self
            .client
            .read_object(&self.bucket_path, key)
            .set_read_range(ReadRange::head(1));
        if !retry {
            request = request.with_retry_policy(NeverRetry);
        }
        match request.send().await {
            Ok(response) => Ok(Some(response.object())),
            Err(e) if e.http_status_code() == Some(404) => Ok(None),
            Err(e) => Err(StorageError::remote(format!("looking up {key}"))(e)),
        }
    }

    /// The bytes of object `key`; `None` when it does not exist or is longer than `limit`.
    async fn read(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, StorageError> {
        let context = || format!("reading {key}");
        let mut response = match self.client.read_object(&self.bucket_path, key).send().await {
            Ok(response) => response,
            Err(e) if e.http_status_code() == Some(404) => return Ok(None),
            Err(e) => return Err(StorageError::remote(context())(e)),
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = response.next().await {
            bytes.extend_from_slice(&chunk.map_err(StorageError::remote(context()))?);
            if bytes.len() as u64 > limit {
                return Ok(None);
            }
        }
        Ok(Some(bytes))
    }

    /// Uploads `payload` to `key` unless an object with the same checksums is there already.
    /// The write is conditional: on no object (create-only), or on the generation of the
    /// differing object it replaces, so concurrent writers never overwrite each other blindly.
    async fn put<P>(
        &self,
        key: &str,
        payload: Payload<P>,
        sums: &Checksums,
        media_type: Option<&'static str>,
    ) -> Result<(), StorageError>
    where
        P: StreamingSource + Seek + Send + Sync + 'static,
        <P as StreamingSource>::Error: std::error::Error + Send + Sync + 'static,
        <P as Seek>::Error: std::error::Error + Send + Sync + 'static,
    {
        let existing = self.head(key, true).await?;
        if let Some(object) = &existing
            && sums.matches(object)
        {
            tracing::debug!(key, "already in the bucket, not uploaded");
            return Ok(());
        }
        let generation = existing.as_ref().map_or(0, |o| o.generation);
        if generation != 0 {
            tracing::warn!(key, "replacing an object whose checksums do not match");
        }
        let result = self
            .client
            .write_object::<_, _, _, P>(&self.bucket_path, key, payload)
            .with_known_crc32c(sums.crc32c)
            .with_known_md5_hash(sums.md5)
            .set_content_type(media_type.unwrap_or("application/octet-stream"))
            .set_if_generation_match(generation)
            .send_unbuffered()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(key, "uploaded object");
                METRICS.uploads.inc();
                Ok(())
            }
            // Another replica (or an earlier attempt whose answer was lost) got there first.
            Err(e) if e.http_status_code() == Some(412) => match self.head(key, true).await? {
                Some(object) if sums.matches(&object) => Ok(()),
                _ => Err(StorageError::remote(format!("uploading {key}"))(e)),
            },
            Err(e) => Err(StorageError::remote(format!("uploading {key}"))(e)),
        }
    }

    /// Where a client fetches object `key`: a signed URL, or the public one.
    async fn url(&self, key: &str, head: bool) -> Result<String, StorageError> {
        let endpoint = self.settings.endpoint.trim_end_matches('/');
        let Some(signer) = &self.signer else {
            return Ok(format!("{endpoint}/{}/{key}", self.settings.bucket));
        };
        let method = if head {
            google_cloud_storage::http::Method::HEAD
        } else {
            google_cloud_storage::http::Method::GET
        };
        SignedUrlBuilder::for_object(&self.bucket_path, key)
            .with_method(method)
            .with_expiration(self.settings.signed_url_expiry)
            .with_endpoint(endpoint)
            .sign_with(signer)
            .await
            .map_err(StorageError::remote(format!("signing a URL for {key}")))
    }
}

/// A signer for V4 URLs from Application Default Credentials, if they can sign: a service
/// account key file signs locally, Google Cloud's metadata server through the IAM API (the
/// service account needs `iam.serviceAccounts.signBlob` on itself). One test signature at
/// start-up decides, so a deployment that cannot sign falls back to public URLs at once.
async fn signer(settings: &GcsSettings) -> Option<Signer> {
    if settings.signed_url_expiry.is_zero() {
        return None;
    }
    // Anonymous access to an emulator or public bucket signs only with an explicit key file.
    if settings.anonymous && std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").is_none() {
        return None;
    }
    let signer = match google_cloud_auth::credentials::Builder::default().build_signer() {
        Ok(signer) => signer,
        Err(e) => {
            tracing::warn!(error = %e, "credentials cannot sign URLs: redirecting to public object URLs");
            return None;
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), signer.sign(b"nixery")).await {
        Ok(Ok(_)) => Some(signer),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "credentials cannot sign URLs: redirecting to public object URLs");
            None
        }
        Err(_) => {
            tracing::warn!("signing timed out: redirecting to public object URLs");
            None
        }
    }
}

/// Checksums of the staged file, after checking that its sha256 is `digest`, so that what is
/// uploaded under a digest's name is exactly that digest's bytes.
async fn staged_checksums(path: &Path, digest: &Digest) -> Result<Checksums, StorageError> {
    let path = path.to_path_buf();
    let digest_ = digest.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<Checksums> {
        use std::io::Read;
        let mut file = std::fs::File::open(&path)?;
        let (mut sha, mut md5, mut crc) = (Sha256::new(), Md5::new(), 0u32);
        let mut buf = vec![0; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            sha.update(&buf[..n]);
            md5.update(&buf[..n]);
            crc = crc32c::crc32c_append(crc, &buf[..n]);
        }
        if Digest::from_sha256(sha.finalize().into()) != digest_ {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the staged file does not match its digest",
            ));
        }
        Ok(Checksums {
            crc32c: crc,
            md5: md5.finalize().into(),
        })
    })
    .await
    .unwrap_or_else(|panicked| Err(std::io::Error::other(panicked)))
    .map_err(StorageError::io(format!("checking staged blob {digest}")))
}

impl Gcs {
    fn remember(&self, digest: &Digest) {
        let mut known = lock(&self.known);
        known.put(digest.clone(), ());
        METRICS.cache_size("gcs_known_blobs", known.len());
    }
}

#[async_trait]
impl Storage for Gcs {
    fn staging_dir(&self) -> &Path {
        &self.settings.staging
    }

    async fn commit(
        &self,
        staged: NamedTempFile,
        digest: &Digest,
        media_type: Option<&'static str>,
    ) -> Result<(), StorageError> {
        let sums = staged_checksums(staged.path(), digest).await?;
        let file = tokio::fs::File::open(staged.path())
            .await
            .map_err(StorageError::io(format!("opening staged blob {digest}")))?;
        self.put(
            &Self::blob_key(digest),
            Payload::from(file),
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
        let found = self.head(&Self::blob_key(digest), true).await?.is_some();
        if found {
            self.remember(digest);
        }
        Ok(found)
    }

    async fn blob(&self, digest: &Digest, head: bool) -> Result<Option<Blob>, StorageError> {
        if !self.has_blob(digest).await? {
            return Ok(None);
        }
        Ok(Some(Blob::Redirect(
            self.url(&Self::blob_key(digest), head).await?,
        )))
    }

    async fn read_blob(
        &self,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        self.read(&Self::blob_key(digest), limit).await
    }

    async fn read_cache(&self, cache: Cache, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.read(&Self::cache_key(cache, key), u64::MAX).await
    }

    async fn write_cache(&self, cache: Cache, key: &str, value: &[u8]) -> Result<(), StorageError> {
        // Cache entries are replaced whole (one object write is atomic); every replica writes
        // the same entry for the same key, so an unchanged entry is not uploaded again.
        let payload = Payload::from(Bytes::copy_from_slice(value));
        self.put(
            &Self::cache_key(cache, key),
            payload,
            &Checksums::of(value),
            None,
        )
        .await
    }

    /// Reads and writes: a look-up of the probe object, and a create-only write of it, which
    /// the bucket answers with 412 once it exists (a request it would refuse for want of
    /// permission is refused before the precondition is looked at).
    async fn check(&self) -> Result<(), StorageError> {
        self.head(PROBE_KEY, false).await?;
        let result = self
            .client
            .write_object(&self.bucket_path, PROBE_KEY, Bytes::from_static(b"ok\n"))
            .with_known_crc32c(crc32c::crc32c(b"ok\n"))
            .set_if_generation_match(0)
            .with_retry_policy(NeverRetry)
            .send_unbuffered()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.http_status_code() == Some(412) => Ok(()),
            Err(e) => Err(StorageError::remote(format!("writing {PROBE_KEY}"))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use google_cloud_storage::model::ObjectChecksums;

    fn object(crc32c: Option<u32>, md5: &[u8]) -> ObjectHighlights {
        let mut object = ObjectHighlights::default();
        let mut sums = ObjectChecksums::new();
        sums.crc32c = crc32c;
        sums.md5_hash = Bytes::copy_from_slice(md5);
        object.checksums = Some(sums);
        object
    }

    #[test]
    fn checksums_match_only_the_same_bytes() {
        let sums = Checksums::of(b"layer");
        let other = Checksums::of(b"other");
        assert!(sums.matches(&object(Some(sums.crc32c), &sums.md5)));
        assert!(sums.matches(&object(None, &sums.md5)));
        assert!(sums.matches(&object(Some(sums.crc32c), &[])));
        assert!(!sums.matches(&object(Some(other.crc32c), &sums.md5)));
        assert!(!sums.matches(&object(Some(sums.crc32c), &other.md5)));
        assert!(!sums.matches(&object(None, &[])));
        assert!(!sums.matches(&ObjectHighlights::default()));
    }

    #[tokio::test]
    async fn staged_files_must_match_their_digest() {
        use std::io::Write;
        let mut file = NamedTempFile::new().unwrap();
        file.write_all(b"layer").unwrap();
        let sums = staged_checksums(file.path(), &Digest::of(b"layer"))
            .await
            .unwrap();
        assert_eq!(sums.crc32c, crc32c::crc32c(b"layer"));
        assert!(
            staged_checksums(file.path(), &Digest::of(b"other"))
                .await
                .is_err()
        );
    }
}
