//! The one place that knows HTTP status codes and registry error codes: every failure becomes
//! `{"errors":[{"code","message","detail"}]}` as the distribution spec describes
//! (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md#error-codes>).
//! Internal details are logged here; the client gets a message a person can act on.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::builder::BuildError;
use crate::image::NameError;
use crate::manifest::{Digest, DigestError};
use crate::nix::{self, NixError};
use crate::source::SourceError;
use crate::storage::StorageError;

/// What a search answered while the catalog is being made tells the client to wait (seconds).
const CATALOG_RETRY_SECONDS: u32 = 5;

/// What a client whose build was cancelled (at shutdown) is told to wait (seconds).
const CANCELLED_RETRY_SECONDS: u32 = 5;

/// What a client refused an event stream is told to wait (seconds).
const STREAMS_RETRY_SECONDS: u32 = 5;

/// Everything a registry request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("blob {0} is not stored here")]
    BlobUnknown(Digest),
    #[error("manifest {0} is not stored here")]
    ManifestUnknown(Digest),
    #[error(
        "there is no manifest '{0}': a reference is a tag ([A-Za-z0-9_][A-Za-z0-9._-], at most 128) or a digest (sha256:<64 hex>)"
    )]
    NoSuchReference(String),
    #[error("{}", .0.err)]
    Build(Box<ImageFailure>),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("'{0}' is not a page size: n must be a whole number")]
    BadPageSize(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the requested range starts past the end of the blob ({0} bytes)")]
    RangeNotSatisfiable(u64),
    #[error("this registry is read-only: {0} is not supported")]
    ReadOnly(axum::http::Method),
    #[error("nixery has no route for {0}")]
    NoRoute(String),
    #[error("storage cannot be used now")]
    NotReady(Arc<StorageError>),
    #[error("{0}")]
    BadSearch(String),
    #[error(
        "the package catalog of {0} is being made (the first search of a package set evaluates it); try again in a minute"
    )]
    CatalogNotReady(String),
    #[error(transparent)]
    Refused(crate::admission::Refusal),
    #[error("nixery failed while answering; see the server log")]
    Panicked(String),
    #[error("{0} is not supported here")]
    MethodNotAllowed(axum::http::Method),
    #[error("the request body is not what this route reads: {0}")]
    BadBody(String),
    #[error("the path cannot be read: {0}")]
    BadPath(String),
    #[error("this server has no build of {0}: start one with POST /api/v1/builds, or pull it")]
    NoBuild(String),
    #[error("too many clients follow builds now (NIXERY_MAX_EVENT_STREAMS); try again shortly")]
    TooManyStreams,
    #[error(
        "{0} has no SBOM here (it was built by a nixery without SBOMs); it gets one when it is built again"
    )]
    NoSbom(String),
    #[error("this server signs nothing: NIXERY_SIGNING_KEY is not set")]
    NoSigningKey,
    #[error("{name} has no {} of {digest} here: pull {name} by a tag first, from a server with NIXERY_SIGNING_KEY set", attached.noun())]
    NotAttached {
        name: String,
        digest: Digest,
        attached: crate::builder::Attached,
    },
    #[error("this registry needs credentials: log in to it (docker login) and try again")]
    Unauthorized,
    #[error(
        "{name} has zstd-compressed layers, and {why}: pull {gzip_name} instead, for gzip layers (drop `zstd-layers/` from the name)"
    )]
    ZstdUnreadable {
        /// The name asked for.
        name: String,
        /// The same name without `zstd-layers/`.
        gzip_name: String,
        why: crate::manifest::ZstdUnreadable,
    },
}

/// An image that could not be built, with what the person pulling needs to know about it.
#[derive(Debug)]
pub struct ImageFailure {
    pub err: Arc<BuildError>,
    /// The image name as requested (`shell/failing`).
    pub name: String,
    /// The package set in words (`nixpkgs 1a2b3c4`, `the package set /srv/pkgs`).
    pub package_set: String,
    /// Where the build and its log are shown.
    pub build_url: String,
    /// Up to three names close to each missing one.
    pub suggestions: BTreeMap<String, Vec<String>>,
    /// The platform whose image failed, when an image index was asked for (`linux/arm64`).
    pub platform: Option<String>,
}

impl ImageFailure {
    /// What Nix made of the request, when the request caused the failure.
    fn requests_fault(&self) -> Option<&NixError> {
        match self.err.as_ref() {
            BuildError::Nix(nix) if nix.is_the_requests() => Some(nix),
            _ => None,
        }
    }

    /// The failure in words for the person pulling.
    fn message(&self) -> String {
        match self.err.as_ref() {
            BuildError::Nix(nix) => match nix.as_ref() {
                NixError::NotFound(_) => not_found(nix, self),
                nix if nix.is_the_requests() => format!(
                    "building {} failed: {}; log: {}",
                    self.name,
                    nix.reason(),
                    self.build_url
                ),
                nix => nix.to_string(),
            },
            other => other.public_message(),
        }
    }
}

/// The builder's own failures in words for the person asking (Nix's failures have their own,
/// [`NixError::reason`]); the details go to the log.
impl BuildError {
    /// The failure in words for the person asking, when it is not Nix's to tell.
    pub fn public_message(&self) -> String {
        match self {
            BuildError::Nix(nix) => nix.to_string(),
            BuildError::Source(err) => err.to_string(),
            BuildError::Storage(_) => {
                "the image could not be built because storage failed; see the server log".to_owned()
            }
            BuildError::Pack(_) => {
                "a layer could not be packed into storage (is the disk full?); see the server log"
                    .to_owned()
            }
            BuildError::Refused(_) | BuildError::Cancelled => self.to_string(),
            BuildError::NoRoot(_) | BuildError::Panicked(_) => {
                "the image could not be built because of a fault in nixery; see the server log"
                    .to_owned()
            }
        }
    }
}

impl Error {
    fn parts(&self) -> (StatusCode, &'static str, serde_json::Value) {
        match self {
            Error::Name(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID", json!(null)),
            Error::Digest(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID", json!(null)),
            Error::BlobUnknown(digest) => (
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                json!({ "digest": digest }),
            ),
            Error::ManifestUnknown(digest) => (
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                json!({ "digest": digest }),
            ),
            Error::NoSuchReference(reference) => (
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                json!({ "reference": reference }),
            ),
            Error::Build(failure) => match (failure.requests_fault(), failure.err.as_ref()) {
                // Clients show the message of a 4xx answer only: a failure the request caused
                // is one, so the person pulling reads why.
                (Some(nix), _) => {
                    let reason = nix.reason_code().unwrap_or("failed");
                    (
                        StatusCode::NOT_FOUND,
                        "MANIFEST_UNKNOWN",
                        json!({
                            "reason": reason,
                            "packages": nix.packages(),
                            "suggestions": failure.suggestions,
                            "build_url": (reason != "not_found").then_some(&failure.build_url),
                            "platform": failure.platform,
                        }),
                    )
                }
                (None, BuildError::Source(err)) => source_parts(err),
                (None, BuildError::Cancelled) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    json!({ "retry_after": CANCELLED_RETRY_SECONDS }),
                ),
                (None, BuildError::Refused(refusal)) => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    json!({ "retry_after": refusal.retry_after().as_secs() }),
                ),
                (None, _) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", json!(null)),
            },
            Error::Source(err) => source_parts(err),
            Error::BadPageSize(_) => (
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                json!(null),
            ),
            Error::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", json!(null)),
            Error::ReadOnly(method) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                json!({ "method": method.as_str() }),
            ),
            Error::RangeNotSatisfiable(size) => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_INVALID",
                json!({ "size": size }),
            ),
            Error::NoRoute(_) => (StatusCode::NOT_FOUND, "UNSUPPORTED", json!(null)),
            Error::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", json!(null)),
            Error::BadSearch(_) => (StatusCode::BAD_REQUEST, "QUERY_INVALID", json!(null)),
            Error::Refused(refusal) => (
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                json!({ "retry_after": refusal.retry_after().as_secs() }),
            ),
            Error::CatalogNotReady(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                json!({ "retry_after": CATALOG_RETRY_SECONDS }),
            ),
            Error::Panicked(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", json!(null)),
            Error::MethodNotAllowed(method) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                json!({ "method": method.as_str() }),
            ),
            Error::BadBody(_) => (StatusCode::BAD_REQUEST, "BODY_INVALID", json!(null)),
            Error::BadPath(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID", json!(null)),
            Error::Unauthorized => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", json!(null)),
            // A 4xx, so that Docker prints the message.
            Error::ZstdUnreadable { why, gzip_name, .. } => (
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                json!({ "reason": why.code(), "gzip_name": gzip_name }),
            ),
            Error::NoSbom(image) => (
                StatusCode::NOT_FOUND,
                "SBOM_UNKNOWN",
                json!({ "image": image }),
            ),
            Error::NoSigningKey => (StatusCode::NOT_FOUND, "KEY_UNKNOWN", json!(null)),
            // What cosign and podman look for; MANIFEST_UNKNOWN tells them there is none.
            Error::NotAttached { .. } => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", json!(null)),
            Error::NoBuild(image) => (
                StatusCode::NOT_FOUND,
                "BUILD_UNKNOWN",
                json!({ "image": image }),
            ),
            Error::TooManyStreams => (
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                json!({ "retry_after": STREAMS_RETRY_SECONDS }),
            ),
        }
    }

    /// The message shown to the client.
    fn message(&self) -> String {
        match self {
            Error::Build(failure) => match &failure.platform {
                Some(platform) => format!("{platform}: {}", failure.message()),
                None => failure.message(),
            },
            Error::Storage(_) => "reading storage failed; see the server log".to_owned(),
            other => other.to_string(),
        }
    }

    /// Counts a refusal of new work in `nixery_builds_rejected_total`, once per answer (an
    /// index whose every platform was refused is one answer).
    fn count_refusal(&self) {
        let refusal = match self {
            Error::Refused(refusal) => refusal,
            Error::Build(failure) => match failure.err.as_ref() {
                BuildError::Refused(refusal) => refusal,
                _ => return,
            },
            _ => return,
        };
        refusal.count();
    }

    /// Logs what the client is not told.
    fn log(&self) {
        match self {
            Error::Build(failure) => match failure.err.as_ref() {
                BuildError::Nix(nix) => match nix.as_ref() {
                    NixError::NotFound(_) => {}
                    nix @ (NixError::BuildFailed(_, cmd)
                    | NixError::EvalFailed(_, cmd)
                    | NixError::Timeout(_, cmd)) => {
                        tracing::error!(error = %nix, command = %cmd, stderr = cmd.stderr_tail(), "Nix failed");
                    }
                    other => tracing::error!(error = ?other, "image build failed"),
                },
                BuildError::Source(err) => log_source(err),
                BuildError::Cancelled => {
                    tracing::info!(image = %failure.name, "a build was cancelled by the shutdown")
                }
                BuildError::Refused(refusal) => {
                    tracing::info!(image = %failure.name, %refusal, client = ?crate::server::client::current(), "a build was refused")
                }
                other => tracing::error!(error = ?other, "image build failed"),
            },
            Error::Source(err) => log_source(err),
            Error::Storage(err) => tracing::error!(error = ?err, "storage failed"),
            Error::NotReady(err) => tracing::warn!(error = %err, "not ready"),
            Error::Panicked(message) => tracing::error!(panic = %message, "a request panicked"),
            _ => {}
        }
    }
}

/// `no package "nodjs" in nixpkgs 1a2b3c4; did you mean "nodejs"?`, or for several
/// `no packages "a" and "b" in …; "a": did you mean "c"?`.
fn not_found(nix: &NixError, failure: &ImageFailure) -> String {
    let mut message = nix.describe(&failure.package_set);
    let packages = nix.packages();
    for package in packages {
        if let Some(close) = failure.suggestions.get(package).filter(|c| !c.is_empty()) {
            if packages.len() > 1 {
                message.push_str(&format!("; \"{package}\":"));
            } else {
                message.push(';');
            }
            message.push_str(&format!(" did you mean {}?", listed(close, "or")));
        }
    }
    message
}

/// A package source's failure: the request's fault (a ref, channel or commit that does not exist,
/// a commit this registry does not serve, a tree that is no package set) is `MANIFEST_UNKNOWN`,
/// as for any manifest that does not exist;
/// a source that cannot be reached is `UNAVAILABLE`; a broken download is the server's.
fn source_parts(err: &SourceError) -> (StatusCode, &'static str, serde_json::Value) {
    match err {
        SourceError::Reserved(tag) | SourceError::NotAChannelTag { tag, .. } => (
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            json!({ "tag": tag }),
        ),
        SourceError::UnknownRef { reference, url } => (
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            json!({ "ref": reference, "source": url }),
        ),
        SourceError::UnknownChannel { channel, url } => (
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            json!({ "channel": channel, "source": url }),
        ),
        SourceError::NotServed { commit, .. } => (
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            json!({ "commit": commit.as_str(), "reason": "commit_not_served" }),
        ),
        SourceError::UnknownCommit { commit, url }
        | SourceError::NotAPackageSet { commit, url, .. } => (
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            json!({ "commit": commit.as_str(), "source": url }),
        ),
        SourceError::Unreachable { url, .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            json!({ "source": url }),
        ),
        SourceError::Fetch { commit, url, .. } => (
            StatusCode::BAD_GATEWAY,
            "UNKNOWN",
            json!({ "commit": commit.as_str(), "source": url }),
        ),
        SourceError::Disk(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", json!(null)),
    }
}

fn log_source(err: &SourceError) {
    match err {
        SourceError::Unreachable { .. } | SourceError::Fetch { .. } | SourceError::Disk(_) => {
            tracing::error!(error = %err, "package source failed")
        }
        _ => {}
    }
}

/// `value` as JSON with `<`, `>` and `&` written as `\u003c`, `\u003e`, `\u0026` (they only
/// occur inside strings), so that text a client sent is never served back as markup, whatever
/// a browser makes of the response.
pub fn json_without_markup(value: &serde_json::Value) -> String {
    value
        .to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

impl Error {
    /// A build of `name` the image service would not start (its queue is full).
    pub fn refused(err: Arc<BuildError>, name: &str) -> Error {
        Error::Build(Box::new(ImageFailure {
            err,
            name: name.to_owned(),
            package_set: String::new(),
            build_url: String::new(),
            suggestions: BTreeMap::new(),
            platform: None,
        }))
    }

    /// The status and message a web page shows for this error (logged like any other).
    pub fn for_page(&self) -> (StatusCode, String) {
        self.log();
        self.count_refusal();
        (self.parts().0, self.message())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.log();
        self.count_refusal();
        let (status, code, detail) = self.parts();
        let body =
            json!({ "errors": [{ "code": code, "message": self.message(), "detail": detail }] });
        let mut response = (status, json_without_markup(&body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let retry_after = match &self {
            Error::CatalogNotReady(_) => Some(CATALOG_RETRY_SECONDS),
            Error::Refused(refusal) => {
                Some(u32::try_from(refusal.retry_after().as_secs()).unwrap_or(u32::MAX))
            }
            Error::TooManyStreams => Some(STREAMS_RETRY_SECONDS),
            Error::Build(failure) => match failure.err.as_ref() {
                BuildError::Refused(refusal) => {
                    Some(u32::try_from(refusal.retry_after().as_secs()).unwrap_or(u32::MAX))
                }
                BuildError::Cancelled => Some(CANCELLED_RETRY_SECONDS),
                _ => None,
            },
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Error::Unauthorized = self {
            // The distribution spec's challenge; browsers ask for a user and password.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"nixery\""),
            );
        }
        if let Error::RangeNotSatisfiable(size) = self {
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("a valid header value"),
            );
        }
        response
    }
}

// Nix's failures in the words clients read: `crate::nix` finds out what went wrong (a
// [`NixError`], and what Nix printed, with builders' settings and key files taken out by
// [`nix::public_text`]); what a person is told of it is written here.

impl std::fmt::Display for NixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NixError::NotFound(names) => write!(
                f,
                "the package set has no package named {}",
                quoted(names)
            ),
            NixError::Timeout(timeout, _) => write!(
                f,
                "building the image took longer than NIX_TIMEOUT ({}s)",
                timeout.as_secs()
            ),
            NixError::BuildFailed(names, _) => write!(f, "Nix failed to build {}", quoted(names)),
            NixError::EvalFailed(cause, _) => {
                write!(f, "Nix could not evaluate the image: {cause}")
            }
            NixError::Unavailable(_) => f.write_str(
                "nix-build could not be run (is Nix installed? `apt-get install nix-bin`)",
            ),
            NixError::BadOutput(what) => {
                write!(f, "nix-build gave output nixery cannot read: {what}")
            }
            NixError::StoreQuery(_) => {
                f.write_str("reading the image's closure from the Nix store failed")
            }
            NixError::NoBuilder(machine, cause, _) => write!(
                f,
                "Nix could not build on the remote builder {machine}: {cause}"
            ),
            NixError::NoSystem(system, _) => write!(
                f,
                "this server cannot build for {system}: its Nix needs a remote builder for {system} (`builders` in NIXERY_NIX_CONFIG), emulation (qemu-user-static registered with binfmt_misc, and `extra-platforms = {system}`), or a binary cache that has the packages"
            ),
            NixError::NoBuildUsers => f.write_str(
                "Nix's build users' group `nixbld` does not exist here: create it with its users (Debian's nix-bin does; `groupadd -r nixbld` and `useradd -r -g nixbld -G nixbld nixbld1`…), or build as the server's own user by setting `build-users-group =` in NIXERY_NIX_CONFIG",
            ),
            NixError::TooOld {
                required,
                installed,
            } => write!(
                f,
                "this package set needs Nix {required} or newer, and the server has Nix {installed}: install a newer Nix on the server (nixpkgs needs 2.18; Debian 13's nix-bin is 2.26)"
            ),
        }
    }
}

impl NixError {
    /// The code tools can branch on, when the request caused the failure: `not_found`,
    /// `build_failed`, `evaluation_failed`, `timeout` or `unsupported_platform`.
    pub fn reason_code(&self) -> Option<&'static str> {
        match self {
            NixError::NotFound(_) => Some("not_found"),
            NixError::BuildFailed(..) => Some("build_failed"),
            NixError::EvalFailed(..) => Some("evaluation_failed"),
            NixError::Timeout(..) => Some("timeout"),
            NixError::NoSystem(..) => Some("unsupported_platform"),
            _ => None,
        }
    }

    /// What went wrong in one line for the person pulling: the first line of Nix's error, store
    /// paths shortened to their names, and the machine when a remote builder failed; nothing
    /// of a builder's settings or key files ([`nix::public_text`]).
    pub fn reason(&self) -> String {
        let reason = match self {
            NixError::BuildFailed(_, cmd) => match nix::first_build_error(cmd.stderr_tail()) {
                Some((first, Some(machine))) => {
                    format!("{} on {machine}", nix::shorten_store_paths(first))
                }
                Some((first, None)) => nix::shorten_store_paths(first),
                None => self.to_string(),
            },
            NixError::EvalFailed(first, _) => nix::shorten_store_paths(first),
            NixError::Timeout(timeout, _) => format!(
                "it took longer than NIX_TIMEOUT ({}s) and was stopped",
                timeout.as_secs()
            ),
            other => other.to_string(),
        };
        nix::public_text(&reason)
    }

    /// The failure in a sentence for the person asking: `no package "nodjs" in nixpkgs
    /// 1a2b3c4` (every missing one named), else [`NixError::reason`].
    pub fn describe(&self, package_set: &str) -> String {
        match self {
            NixError::NotFound(packages) => match packages.as_slice() {
                [one] => format!("no package \"{one}\" in {package_set}"),
                many => format!("no packages {} in {package_set}", listed(many, "and")),
            },
            other => other.reason(),
        }
    }

    /// The end of what Nix printed, when it ran, as a client may see it
    /// ([`nix::public_text`]).
    pub fn log_tail(&self) -> String {
        match self {
            NixError::BuildFailed(_, cmd)
            | NixError::EvalFailed(_, cmd)
            | NixError::Timeout(_, cmd)
            | NixError::NoBuilder(_, _, cmd)
            | NixError::NoSystem(_, cmd)
            | NixError::StoreQuery(cmd) => nix::public_text(cmd.stderr_tail()),
            _ => String::new(),
        }
    }
}

/// `"a"`, `"a" and "b"`, `"a", "b" and "c"` (or with `or`).
fn listed(names: &[String], last_word: &str) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} {last_word} {last}", init.join(", ")),
    }
}

/// `'a', 'b'`: the packages Nix names, as logs and messages show them.
fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}
