//! The Google Cloud Storage backend, on Google's `google-cloud-storage` crate: the objects of a
//! [`Bucket`] (see there for the layout and how uploads are kept whole). Uploads carry their
//! CRC32C and MD5, which the service checks, and a generation precondition (0 for
//! create-only). Blob redirects are V4 signed URLs, or the public object URL when the
//! credentials cannot sign (unless signing is required: then the backend does not open).
//! Resumable uploads are switched off
//! (`with_resumable_upload_threshold(usize::MAX)`): they buy nothing here, since a retry
//! restarts from the staged file, and the client's resumable session URL breaks against
//! emulators that do not listen on port 80.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_auth::signer::Signer;
use google_cloud_gax::retry_policy::{NeverRetry, RetryPolicyExt};
use google_cloud_storage::builder::storage::SignedUrlBuilder;
use google_cloud_storage::client::Storage as Client;
use google_cloud_storage::model_ext::{ObjectHighlights, ReadRange};
use google_cloud_storage::retry_policy::RetryableErrors;
use google_cloud_storage::streaming_source::{Payload, Seek, StreamingSource};

use super::StorageError;
use super::bucket::{
    Body, Bucket, Checksums, Condition, Objects, RETRY_ATTEMPTS, RETRY_TIME_LIMIT, Retry, Stored,
    Written,
};
use crate::storage::Storage;

/// Google's public endpoint, for the API and for redirect URLs.
pub const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";

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
    /// Refuse to open unless URLs can be signed (pulls need credentials: a public object URL
    /// would serve blobs to anyone).
    pub require_signed_urls: bool,
    /// Local directory for staging files.
    pub staging: PathBuf,
    /// Most digests remembered as stored (each saves one look-up).
    pub known_entries: std::num::NonZeroUsize,
}

/// A Cloud Storage bucket's objects.
pub struct Gcs {
    client: Client,
    /// `projects/_/buckets/<name>`, as the client names buckets.
    bucket_path: String,
    settings: GcsSettings,
    signer: Option<Signer>,
}

impl Gcs {
    /// Connects to the bucket, decides how to sign URLs, and checks that the bucket can be
    /// read and written.
    pub async fn open(settings: GcsSettings) -> anyhow::Result<Bucket<Self>> {
        use anyhow::Context;
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
                    .with_attempt_limit(RETRY_ATTEMPTS),
            )
            .with_resumable_upload_threshold(usize::MAX)
            .build()
            .await
            .context("creating the Cloud Storage client")?;
        let signer = match signer(&settings).await {
            Ok(signer) => signer,
            Err(why) if settings.require_signed_urls => anyhow::bail!(
                "NIXERY_AUTH_HTPASSWD needs signed blob URLs, and this server cannot sign them: {why}. \
                 Set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or give the \
                 service account iam.serviceAccounts.signBlob on itself"
            ),
            Err(why) => {
                tracing::warn!(reason = %why, "redirecting to public object URLs");
                None
            }
        };
        let (staging, known_entries) = (settings.staging.clone(), settings.known_entries);
        let gcs = Gcs {
            client,
            bucket_path: format!("projects/_/buckets/{}", settings.bucket),
            settings,
            signer,
        };
        let bucket = Bucket::new(gcs, staging, known_entries, "gcs_known_blobs")?;
        let gcs = bucket.objects();
        bucket.check().await.with_context(|| {
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
        Ok(bucket)
    }

    async fn write_payload<P>(
        &self,
        key: &str,
        payload: Payload<P>,
        sums: &Checksums,
        media_type: Option<&'static str>,
        condition: Condition,
        retry: Retry,
    ) -> Result<Written, StorageError>
    where
        P: StreamingSource + Seek + Send + Sync + 'static,
        <P as StreamingSource>::Error: std::error::Error + Send + Sync + 'static,
        <P as Seek>::Error: std::error::Error + Send + Sync + 'static,
    {
        let generation: i64 = match condition {
            Condition::Absent => 0,
            Condition::Replaces(version) => version
                .parse()
                .map_err(StorageError::remote(format!("the generation of {key}")))?,
        };
        let mut request = self
            .client
            .write_object::<_, _, _, P>(&self.bucket_path, key, payload)
            .with_known_crc32c(sums.crc32c)
            .with_known_md5_hash(sums.md5)
            .set_content_type(media_type.unwrap_or("application/octet-stream"))
            .set_if_generation_match(generation);
        if retry == Retry::Never {
            request = request.with_retry_policy(NeverRetry);
        }
        match request.send_unbuffered().await {
            Ok(_) => Ok(Written::Done),
            Err(e) if e.http_status_code() == Some(412) => Ok(Written::ConditionFailed),
            Err(e) => Err(StorageError::remote(format!("uploading {key}"))(e)),
        }
    }
}

/// What Cloud Storage reports of an object, in the form the buckets share.
fn stored(object: &ObjectHighlights) -> Stored {
    let sums = object.checksums.as_ref();
    Stored {
        sha256: None,
        md5: sums.and_then(|s| s.md5_hash[..].try_into().ok()),
        crc32c: sums.and_then(|s| s.crc32c),
        version: object.generation.to_string(),
    }
}

#[async_trait]
impl Objects for Gcs {
    async fn head(&self, key: &str, retry: Retry) -> Result<Option<Stored>, StorageError> {
        let mut request = self
            .client
            .read_object(&self.bucket_path, key)
            .set_read_range(ReadRange::head(1));
        if retry == Retry::Never {
            request = request.with_retry_policy(NeverRetry);
        }
        match request.send().await {
            Ok(response) => Ok(Some(stored(&response.object()))),
            Err(e) if e.http_status_code() == Some(404) => Ok(None),
            Err(e) => Err(StorageError::remote(format!("looking up {key}"))(e)),
        }
    }

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

    async fn write(
        &self,
        key: &str,
        body: Body<'_>,
        sums: &Checksums,
        media_type: Option<&'static str>,
        condition: Condition,
        retry: Retry,
    ) -> Result<Written, StorageError> {
        match body {
            Body::File(path) => {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(StorageError::io(format!("opening {}", path.display())))?;
                let payload = Payload::from(file);
                self.write_payload(key, payload, sums, media_type, condition, retry)
                    .await
            }
            Body::Bytes(bytes) => {
                let payload = Payload::from(bytes);
                self.write_payload(key, payload, sums, media_type, condition, retry)
                    .await
            }
        }
    }

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
/// start-up decides; when they cannot sign, why not. None when signing is off
/// (`GCS_SIGNED_URL_EXPIRY=0`).
async fn signer(settings: &GcsSettings) -> Result<Option<Signer>, String> {
    if settings.signed_url_expiry.is_zero() {
        return Ok(None);
    }
    // Anonymous access to an emulator or public bucket signs only with an explicit key file.
    let key_file = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").filter(|f| !f.is_empty());
    if settings.anonymous && key_file.is_none() {
        return Err(
            "GCS_ANONYMOUS (or an emulator) sends no credentials, and GOOGLE_APPLICATION_CREDENTIALS names no key file to sign with"
                .to_owned(),
        );
    }
    let signer = google_cloud_auth::credentials::Builder::default()
        .build_signer()
        .map_err(|e| format!("the credentials cannot sign URLs ({e})"))?;
    match tokio::time::timeout(Duration::from_secs(10), signer.sign(b"nixery")).await {
        Ok(Ok(_)) => Ok(Some(signer)),
        Ok(Err(e)) => Err(format!("a test signature failed ({e})")),
        Err(_) => Err("a test signature took longer than 10 s".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use google_cloud_storage::model::ObjectChecksums;

    #[test]
    fn reported_checksums_are_read_whole_or_not_at_all() {
        let mut object = ObjectHighlights::default();
        let mut sums = ObjectChecksums::new();
        sums.crc32c = Some(7);
        sums.md5_hash = Bytes::from_static(&[1; 16]);
        object.checksums = Some(sums);
        object.generation = 42;
        let read = stored(&object);
        assert_eq!(
            (read.crc32c, read.md5, read.version.as_str()),
            (Some(7), Some([1; 16]), "42")
        );
        let empty = stored(&ObjectHighlights::default());
        assert_eq!((empty.crc32c, empty.md5), (None, None));
    }
}
