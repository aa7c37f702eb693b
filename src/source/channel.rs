//! nixpkgs channels the way nixos.org publishes them: `<base>/<channel>/git-revision` holds the
//! channel's current commit (the base answers with a redirect to the release directory, which is
//! followed), and the tree of a commit is a tarball downloaded from a URL template.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use tokio::io::AsyncWriteExt;

use super::{Commit, SourceError, describe_http, redact};

/// The largest `packages.json.br` read (nixpkgs' is about 6 MB).
pub const MAX_PACKAGES_JSON: usize = 64 << 20;

/// Channel look-ups (`git-revision` requests) under way at once, at most: a client names any
/// channel it likes in a tag, and a flood of made-up names must not become a flood of requests
/// to the channel host.
pub const MAX_LOOKUPS: usize = 4;

/// Asks channels for their commits and downloads commits' trees.
pub struct Channels {
    base: String,
    tarball: String,
    http: reqwest::Client,
    resolve_timeout: Duration,
    fetch_timeout: Duration,
    /// Places for look-ups ([`MAX_LOOKUPS`]).
    lookups: tokio::sync::Semaphore,
}

impl Channels {
    pub fn new(
        base: String,
        tarball: String,
        resolve_timeout: Duration,
        fetch_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        Ok(Channels {
            base: base.trim_end_matches('/').to_owned(),
            tarball,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .user_agent(concat!("nixery/", env!("CARGO_PKG_VERSION")))
                .build()?,
            resolve_timeout,
            fetch_timeout,
            lookups: tokio::sync::Semaphore::new(MAX_LOOKUPS),
        })
    }

    /// The URL of `channel` (without credentials): what images built from it name as their source.
    pub fn channel_url(&self, channel: &str) -> String {
        redact(&format!("{}/{channel}", self.base))
    }

    /// The tarball URL of `commit` (without credentials).
    pub fn tarball_url(&self, commit: &Commit) -> String {
        redact(&self.tarball.replace("{commit}", commit.as_str()))
    }

    /// The response for `<channel>/<file>`, within `timeout`; `None` when it is not there.
    async fn file(
        &self,
        channel: &str,
        file: &str,
        timeout: Duration,
    ) -> Result<Option<reqwest::Response>, SourceError> {
        let url = format!("{}/{channel}/{file}", self.base);
        let response = self
            .http
            .get(&url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(channel, describe_http(&e)))?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            status if !status.is_success() => {
                Err(self.unreachable(channel, format!("{} answered {status}", redact(&url))))
            }
            _ => Ok(Some(response)),
        }
    }

    /// `channel`'s host could not be asked, or answered nonsense.
    fn unreachable(&self, channel: &str, detail: String) -> SourceError {
        SourceError::Unreachable {
            url: self.channel_url(channel),
            detail,
        }
    }

    /// The package list `channel` publishes beside its git-revision (`packages.json.br`, as
    /// nixos.org channels do), at most [`MAX_PACKAGES_JSON`] bytes; `None` when it has none.
    pub async fn packages_json(&self, channel: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let file = "packages.json.br";
        let Some(mut response) = self.file(channel, file, self.fetch_timeout).await? else {
            return Ok(None);
        };
        let unreachable = |detail: String| self.unreachable(channel, detail);
        let url = format!("{}/{channel}/{file}", self.base);
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| unreachable(describe_http(&e)))?
        {
            if bytes.len() + chunk.len() > MAX_PACKAGES_JSON {
                return Err(unreachable(format!(
                    "{} is larger than {MAX_PACKAGES_JSON} bytes",
                    redact(&url)
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }

    /// The commit `channel` is at now; `None` when the channel does not exist. Waits for a
    /// place among the [`MAX_LOOKUPS`] look-ups under way, as long as a look-up may take.
    pub async fn revision(&self, channel: &str) -> Result<Option<Commit>, SourceError> {
        let _place = tokio::time::timeout(self.resolve_timeout, self.lookups.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                self.unreachable(
                    channel,
                    format!(
                        "{MAX_LOOKUPS} other channel look-ups were under way for {}s",
                        self.resolve_timeout.as_secs()
                    ),
                )
            })?;
        let file = "git-revision";
        let Some(response) = self.file(channel, file, self.resolve_timeout).await? else {
            return Ok(None);
        };
        let unreachable = |detail: String| self.unreachable(channel, detail);
        let url = format!("{}/{channel}/{file}", self.base);
        let body = response
            .text()
            .await
            .map_err(|e| unreachable(describe_http(&e)))?;
        let commit = Commit::parse(body.trim()).ok_or_else(|| {
            unreachable(format!(
                "{} holds no commit ({} bytes that are not 40 hex digits)",
                redact(&url),
                body.len()
            ))
        })?;
        tracing::info!(channel, %commit, "channel resolved");
        Ok(Some(commit))
    }

    /// Downloads the tarball of `commit` into the file `out`.
    pub async fn download(&self, commit: &Commit, out: &Path) -> Result<(), SourceError> {
        let url = self.tarball.replace("{commit}", commit.as_str());
        let source = self.tarball_url(commit);
        let started = Instant::now();
        tokio::time::timeout(self.fetch_timeout, self.download_to(&url, commit, out))
            .await
            .map_err(|_| SourceError::Fetch {
                commit: commit.clone(),
                url: source.clone(),
                detail: format!(
                    "the download took longer than NIXERY_SOURCE_FETCH_TIMEOUT ({}s)",
                    self.fetch_timeout.as_secs()
                ),
            })??;
        let size = tokio::fs::metadata(out).await.map_or(0, |m| m.len());
        tracing::info!(%commit, url = %source, bytes = size, elapsed_ms = started.elapsed().as_millis() as u64, "tarball downloaded");
        Ok(())
    }

    async fn download_to(&self, url: &str, commit: &Commit, out: &Path) -> Result<(), SourceError> {
        let source = self.tarball_url(commit);
        let failed = |detail: String| SourceError::Fetch {
            commit: commit.clone(),
            url: source.clone(),
            detail,
        };
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| SourceError::Unreachable {
                url: source.clone(),
                detail: describe_http(&e),
            })?;
        match response.status() {
            StatusCode::NOT_FOUND => {
                return Err(SourceError::UnknownCommit {
                    commit: commit.clone(),
                    url: source.clone(),
                });
            }
            status if !status.is_success() => return Err(failed(format!("answered {status}"))),
            _ => {}
        }
        let mut file = tokio::fs::File::create(out)
            .await
            .map_err(|e| SourceError::Disk(format!("{}: {e}", out.display())))?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|e| failed(format!("the download broke off: {}", describe_http(&e))))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| SourceError::Disk(format!("{}: {e}", out.display())))?;
        }
        file.flush()
            .await
            .map_err(|e| SourceError::Disk(format!("{}: {e}", out.display())))?;
        Ok(())
    }
}
