//! The S3 backend (AWS S3 and S3-compatible stores: Cloudflare R2, MinIO, Ceph), on the
//! official AWS SDK (`aws-sdk-s3`): the objects of a [`Bucket`] (see there for the layout and
//! how uploads are kept whole). Uploads carry their SHA-256 (`x-amz-checksum-sha256`) and MD5
//! (`Content-MD5`), which the store checks, and `If-None-Match: *` to create only (`If-Match`
//! with the ETag to replace a cache entry). Blob redirects are SigV4 presigned URLs.
//!
//! Credentials come from the usual AWS chain (environment, profile files, SSO, web identity,
//! container and instance metadata). A store at `S3_ENDPOINT` is addressed path-style
//! (`<endpoint>/<bucket>/<key>`), as S3-compatible stores expect; AWS itself virtual-hosted.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumMode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::StorageError;
use super::bucket::{
    Body, Bucket, Checksums, Condition, Objects, RETRY_ATTEMPTS, RETRY_TIME_LIMIT, Retry, Stored,
    Written,
};
use crate::storage::Storage;

/// The region when neither `S3_REGION` nor the AWS configuration names one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// How to reach the bucket.
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// The bucket's name.
    pub bucket: String,
    /// Endpoint of an S3-compatible store (e.g. `http://127.0.0.1:9000`); AWS when `None`.
    pub endpoint: Option<String>,
    /// The bucket's region; the AWS configuration's (else [`DEFAULT_REGION`]) when `None`.
    pub region: Option<String>,
    /// Lifetime of presigned URLs; zero never signs and redirects to public object URLs.
    pub presign_expiry: Duration,
    /// Local directory for staging files.
    pub staging: PathBuf,
    /// Most digests remembered as stored (each saves one look-up).
    pub known_entries: std::num::NonZeroUsize,
}

/// An S3 bucket's objects.
pub struct S3 {
    client: Client,
    settings: S3Settings,
    /// The region the client signs for.
    region: String,
}

impl S3 {
    /// Connects to the bucket and checks that it can be read and written.
    pub async fn open(settings: S3Settings) -> anyhow::Result<Bucket<Self>> {
        use anyhow::Context;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(RETRY_ATTEMPTS))
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(RETRY_TIME_LIMIT)
                    .build(),
            );
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let region = shared
            .region()
            .map_or(DEFAULT_REGION.to_owned(), |r| r.to_string());
        let mut config =
            aws_sdk_s3::config::Builder::from(&shared).region(Region::new(region.clone()));
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint).force_path_style(true);
        }
        let s3 = S3 {
            client: Client::from_conf(config.build()),
            region,
            settings,
        };
        let (staging, known) = (s3.settings.staging.clone(), s3.settings.known_entries);
        let bucket = Bucket::new(s3, staging, known, "s3_known_blobs")?;
        let s3 = bucket.objects();
        let endpoint = s3.settings.endpoint.as_deref().unwrap_or("AWS");
        bucket.check().await.with_context(|| {
            format!(
                "bucket {} at {endpoint} (region {}) cannot be used: check S3_BUCKET, S3_ENDPOINT, S3_REGION and the AWS credentials",
                s3.settings.bucket, s3.region
            )
        })?;
        tracing::info!(
            bucket = %s3.settings.bucket,
            endpoint,
            region = %s3.region,
            presigned_urls = !s3.settings.presign_expiry.is_zero(),
            "using S3"
        );
        Ok(bucket)
    }

    /// The operation's configuration when `retry` says not to retry.
    fn retry_override(retry: Retry) -> aws_sdk_s3::config::Builder {
        let mut config = aws_sdk_s3::config::Builder::default();
        if retry == Retry::Never {
            config = config.retry_config(RetryConfig::disabled());
        }
        config
    }
}

/// The HTTP status of the store's answer, if there was one.
fn status<E>(error: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    error.raw_response().map(|r| r.status().as_u16())
}

/// A storage error with the SDK error's whole chain of causes in its message.
fn remote<E: std::error::Error + Send + Sync + 'static>(context: String, error: E) -> StorageError {
    StorageError::Remote {
        context,
        source: DisplayErrorContext(error).to_string().into(),
    }
}

/// What S3 reports of an object, in the form the buckets share: the SHA-256 it was uploaded
/// with, and the MD5 that a single-shot upload's ETag is (unless the store encrypts with KMS).
fn stored(checksum_sha256: Option<&str>, etag: Option<&str>) -> Stored {
    let etag = etag.unwrap_or_default();
    let md5 = etag.trim_matches('"');
    Stored {
        sha256: checksum_sha256
            .and_then(|s| BASE64.decode(s).ok())
            .and_then(|s| s.try_into().ok()),
        md5: hex::decode(md5).ok().and_then(|m| m.try_into().ok()),
        crc32c: None,
        version: etag.to_owned(),
    }
}

#[async_trait]
impl Objects for S3 {
    async fn head(&self, key: &str, retry: Retry) -> Result<Option<Stored>, StorageError> {
        let result = self
            .client
            .head_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .customize()
            .config_override(Self::retry_override(retry))
            .send()
            .await;
        match result {
            Ok(object) => Ok(Some(stored(object.checksum_sha256(), object.e_tag()))),
            Err(e) if status(&e) == Some(404) => Ok(None),
            // S3 answers a missing object with 403 to credentials that may not list the bucket.
            Err(e) if status(&e) == Some(403) => Err(remote(
                format!(
                    "looking up {key} (403: the credentials need s3:GetObject, and s3:ListBucket on the bucket)"
                ),
                e,
            )),
            Err(e) => Err(remote(format!("looking up {key}"), e)),
        }
    }

    async fn read(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, StorageError> {
        let context = || format!("reading {key}");
        let result = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await;
        let mut body = match result {
            Ok(object) if object.content_length().is_some_and(|n| n as u64 > limit) => {
                return Ok(None);
            }
            Ok(object) => object.body,
            Err(e) if status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(remote(context(), e)),
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            bytes.extend_from_slice(&chunk.map_err(|e| remote(context(), e))?);
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
        let body = match body {
            Body::File(path) => ByteStream::from_path(path)
                .await
                .map_err(|e| remote(format!("opening {}", path.display()), e))?,
            Body::Bytes(bytes) => ByteStream::from(bytes),
        };
        let request = self
            .client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .body(body)
            // Given, the SHA-256 computed while staging is sent as is (the SDK computes none).
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(BASE64.encode(sums.sha256))
            .content_md5(BASE64.encode(sums.md5))
            .content_type(media_type.unwrap_or("application/octet-stream"));
        let request = match condition {
            Condition::Absent => request.if_none_match("*"),
            Condition::Replaces(etag) => request.if_match(etag),
        };
        let result = request
            .customize()
            .config_override(Self::retry_override(retry))
            .send()
            .await;
        match result {
            // A checksum the store echoes must be ours (S3 refuses the upload otherwise).
            Ok(put)
                if put
                    .checksum_sha256()
                    .is_some_and(|s| s != BASE64.encode(sums.sha256)) =>
            {
                Err(StorageError::Remote {
                    context: format!("uploading {key}"),
                    source: "the store reports another SHA-256 than the one sent".into(),
                })
            }
            Ok(_) => Ok(Written::Done),
            // 409: a concurrent conditional write of the same key is under way.
            Err(e) if matches!(status(&e), Some(412 | 409)) => Ok(Written::ConditionFailed),
            Err(e) => Err(remote(format!("uploading {key}"), e)),
        }
    }

    async fn url(&self, key: &str, head: bool) -> Result<String, StorageError> {
        let bucket = &self.settings.bucket;
        let expiry = self.settings.presign_expiry;
        if expiry.is_zero() {
            return Ok(match &self.settings.endpoint {
                Some(endpoint) => format!("{}/{bucket}/{key}", endpoint.trim_end_matches('/')),
                None => format!("https://{bucket}.s3.{}.amazonaws.com/{key}", self.region),
            });
        }
        let context = || format!("signing a URL for {key}");
        let presigning = PresigningConfig::expires_in(expiry).map_err(|e| remote(context(), e))?;
        let signed = if head {
            let request = self.client.head_object().bucket(bucket).key(key);
            let signed = request.presigned(presigning).await;
            signed.map_err(|e| remote(context(), e))?
        } else {
            let request = self.client.get_object().bucket(bucket).key(key);
            let signed = request.presigned(presigning).await;
            signed.map_err(|e| remote(context(), e))?
        };
        Ok(signed.uri().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_of_single_uploads_are_md5s() {
        let sums = Checksums::of(b"layer");
        let etag = format!("\"{}\"", hex::encode(sums.md5));
        let sha = BASE64.encode(sums.sha256);
        let read = stored(Some(&sha), Some(&etag));
        assert_eq!(read.md5, Some(sums.md5));
        assert_eq!(read.sha256, Some(sums.sha256));
        assert_eq!(read.version, etag);
        // A multipart or KMS ETag is no MD5; a composite checksum is no SHA-256.
        let other = stored(Some("abc=-2"), Some("\"0123-2\""));
        assert_eq!((other.md5, other.sha256), (None, None));
    }
}
