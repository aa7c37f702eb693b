//! The registry's answers, with the headers clients check: exact length, media type and
//! digest on manifests and blobs (HEAD too), ranges of blobs, redirects to a bucket.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use futures::StreamExt;

use super::range::ByteRange;
use super::tags;
use crate::error::Error;
use crate::manifest::{Digest, Manifest};
use crate::server::metrics::METRICS;
use crate::storage::Contents;

/// What every registry answer says it speaks.
pub const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// The referrers API's answer (distribution-spec 1.1): an OCI image index of `referrers`, only
/// those of the `artifactType` the query asks for, if it does (and then `OCI-Filters-Applied`
/// says so).
pub fn referrers_response(
    mut referrers: Vec<serde_json::Value>,
    query: Option<&str>,
    head: bool,
) -> Response {
    let wanted = query.unwrap_or("").split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == "artifactType").then(|| tags::percent_decode(value))
    });
    if let Some(wanted) = &wanted {
        referrers.retain(|d| d["artifactType"] == wanted.as_str());
    }
    let index = crate::manifest::referrers_index(&referrers);
    let length = index.len() as u64;
    let body = if head {
        Body::empty()
    } else {
        Body::from(index)
    };
    let mut response = (
        [
            (header::CONTENT_TYPE.as_str(), crate::manifest::OCI_INDEX),
            API_VERSION,
        ],
        body,
    )
        .into_response();
    // HEAD says how long the GET's body is, as for manifests.
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if wanted.is_some() {
        response.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    response
}

/// A blob's bytes, or the part `range` asks for.
pub fn blob_response(
    contents: &Contents,
    range: ByteRange,
    digest: &Digest,
    head: bool,
) -> Result<Response, Error> {
    let size = contents.size();
    let (start, len) = match range {
        ByteRange::Full => (0, size),
        ByteRange::Part { start, end } => (start, end - start + 1),
        ByteRange::Unsatisfiable => return Err(Error::RangeNotSatisfiable(size)),
    };
    let body = if head {
        Body::empty()
    } else {
        let stream = contents.read(start, len).inspect(|chunk| {
            if let Ok(chunk) = chunk {
                METRICS.blob_bytes_served.inc_by(chunk.len() as u64);
            }
        });
        Body::from_stream(stream)
    };
    let mut response = sized(body, len, "application/octet-stream", digest.as_str());
    if let ByteRange::Part { start, end } = range {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{end}/{size}"))
                .expect("a valid header value"),
        );
    }
    response
        .headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    Ok(response)
}

/// A manifest, its body left out for HEAD.
pub fn manifest_response(manifest: &Manifest, head: bool) -> Response {
    let body = if head {
        Body::empty()
    } else {
        Body::from(manifest.bytes.clone())
    };
    sized(
        body,
        manifest.bytes.len() as u64,
        manifest.media_type,
        manifest.digest.as_str(),
    )
}

/// A 200 with the headers clients check: exact length, type and digest (also on HEAD).
fn sized(body: Body, len: u64, content_type: &str, digest: &str) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("media types are valid header values"),
    );
    headers.insert(
        "docker-content-digest",
        HeaderValue::from_str(digest).expect("digests are valid header values"),
    );
    headers.insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    response
}

/// A 303 to where the blob's bytes are, with the digest clients check.
pub fn redirect(url: &str, digest: &str) -> Response {
    (
        [("docker-content-digest", digest), API_VERSION],
        Redirect::to(url),
    )
        .into_response()
}
