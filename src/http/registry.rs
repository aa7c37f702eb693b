//! The registry API v2's routes, read-only
//! (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md>): one handler per
//! route, behind the one entry that refuses writes and parses the path (a name may hold the
//! route words themselves, so axum's path patterns cannot tell the routes apart).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::response::{
    API_VERSION, blob_response, manifest_response, redirect, referrers_response,
};
use super::route::Route;
use super::{is_head, range, tags};
use crate::builder::{Attached, BuildError, Request, Served};
use crate::error::{Error, ImageFailure};
use crate::image::{ImageName, Tag, ZSTD_LAYERS};
use crate::manifest::{Compression, Digest, Format, Manifest, ZstdUnreadable, compression};
use crate::nix::NixError;
use crate::server::metrics::METRICS;
use crate::source::Pin;
use crate::state::{AppState, TagCheck};
use crate::storage::Blob;

/// Every `/v2/` request: GET or HEAD (anything else is refused, whatever the path), then the
/// route its path names.
pub async fn registry(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<Response, Error> {
    let (uri, headers) = (request.uri(), request.headers());
    let head = is_head(request.method())?;
    match Route::parse(uri.path())? {
        Route::Base => Ok(base()),
        Route::ManifestByTag(name, tag)
            if let Some((attached, digest)) = Attached::of_tag(tag.as_str()) =>
        {
            attachment(&state, &name, &digest, attached, head).await
        }
        Route::ManifestByTag(name, tag) if let Some(digest) = referrers_tag(&tag) => {
            referrers_by_tag(&state, &name, &digest, head).await
        }
        Route::ManifestByTag(name, tag) => manifest_by_tag(&state, name, tag, headers, head).await,
        Route::ManifestByDigest(name, digest) => {
            manifest_by_digest(&state, &name, digest, headers, head).await
        }
        Route::Blob(_name, digest) => blob(&state, digest, headers, head).await,
        Route::Tags(name) => tags_list(&state, &name, uri.query()).await,
        Route::Referrers(name, digest) => {
            referrers(&state, &name, &digest, uri.query(), head).await
        }
    }
}

/// `/v2/`: the API version check.
fn base() -> Response {
    ([API_VERSION], "{}").into_response()
}

/// `/v2/<name>/manifests/<tag>`: the image, built if need be, or an index of one per platform
/// for a client that accepts one (`NIXERY_PLATFORMS`).
async fn manifest_by_tag(
    state: &AppState,
    name: ImageName,
    tag: Tag,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, Error> {
    let accepted = || accepted(headers);
    // The image service admits the tag once it knows the image is not stored.
    let asked = state.request(name, tag, TagCheck::WhenBuilding).await?;
    let mut request = asked.request;
    request.compression = request
        .compression
        .for_client(request.name.zstd_layers(), accepted(), user_agent(headers))
        .map_err(|why| zstd_unreadable(&request.name, why))?;
    if let Some(index_format) = Format::negotiate_index_of(request.compression, accepted())
        && !asked.index.is_empty()
    {
        let index = state
            .images
            .clone()
            .index(&request, &asked.index)
            .await
            .map_err(|failed| match failed.platform {
                Some(platform) => {
                    let request = request.for_platform(platform);
                    image_failure(state, headers, &request, failed.err, true)
                }
                None => image_failure(state, headers, &request, failed.err, false),
            })?;
        return Ok(manifest_response(index.manifest(index_format), head));
    }
    let image = state
        .images
        .clone()
        .image(&request)
        .await
        .map_err(|err| image_failure(state, headers, &request, err, false))?;
    Ok(manifest_response(
        image.manifest(Format::negotiate(accepted())),
        head,
    ))
}

/// `name` without its `zstd-layers` component: the name of the same image with gzip layers.
fn without_zstd_layers(name: &str) -> String {
    let mut components: Vec<&str> = name.split('/').collect();
    if let Some(at) = components.iter().position(|c| *c == ZSTD_LAYERS) {
        components.remove(at);
    }
    components.join("/")
}

/// `/v2/<name>/manifests/<digest>`: a manifest this registry stored. One of zstd layers is
/// refused, with why, to a client that cannot read them, as by tag: a digest is what deployments
/// pin, and what a client resolved the tag to.
async fn manifest_by_digest(
    state: &AppState,
    name: &ImageName,
    digest: Digest,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, Error> {
    let Some(manifest) = state.images.stored_manifest(&digest).await? else {
        return Err(Error::ManifestUnknown(digest));
    };
    if compression::of_manifest(&manifest.bytes) == Compression::Zstd {
        Compression::Zstd
            .for_client(true, accepted(headers), user_agent(headers))
            .map_err(|why| zstd_unreadable(name, why))?;
    }
    Ok(manifest_response(&manifest, head))
}

/// The values of a request's `Accept` headers.
fn accepted(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
}

fn user_agent(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
}

/// The refusal of zstd layers under `name` to a client that cannot read them, naming the gzip
/// image to pull instead.
fn zstd_unreadable(name: &ImageName, why: ZstdUnreadable) -> Error {
    Error::ZstdUnreadable {
        name: name.to_string(),
        gzip_name: without_zstd_layers(name.as_str()),
        why,
    }
}

/// `/v2/<name>/blobs/<digest>`: a layer or config (a `Range` of it if asked), a redirect to
/// where the bucket serves it, or a manifest: containerd fetches manifests by digest through
/// this route too, and keeps the Content-Type it gets.
async fn blob(
    state: &AppState,
    digest: Digest,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, Error> {
    match state.images.blob(&digest, head).await? {
        Some(Served::Manifest(manifest)) => Ok(manifest_response(&manifest, head)),
        Some(Served::Blob(Blob::Stored(contents))) => {
            let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
            let range = range::parse(range, contents.size());
            blob_response(&contents, range, &digest, head)
        }
        Some(Served::Blob(Blob::Redirect(url))) => {
            METRICS.blob_redirects.inc();
            Ok(redirect(&url, digest.as_str()))
        }
        None => Err(Error::BlobUnknown(digest)),
    }
}

/// `/v2/<name>/tags/list`: the tags the package source knows, a page at a time.
async fn tags_list(
    state: &AppState,
    name: &ImageName,
    query: Option<&str>,
) -> Result<Response, Error> {
    let (tags, next) = tags::page(state.sources.tags().await?, query)?;
    let body = serde_json::json!({ "name": name.as_str(), "tags": tags });
    let mut response = (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Some(last) = next {
        let link = format!(
            "</v2/{name}/tags/list?n={}&last={last}>; rel=\"next\"",
            tags.len()
        );
        if let Ok(link) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, link);
        }
    }
    Ok(response)
}

/// `/v2/<name>/referrers/<digest>`: the artifacts (SBOMs, signatures, attestations) that refer
/// to a manifest.
async fn referrers(
    state: &AppState,
    name: &ImageName,
    digest: &Digest,
    query: Option<&str>,
    head: bool,
) -> Result<Response, Error> {
    Ok(referrers_response(
        state.images.referrers(name.as_str(), digest).await?,
        query,
        head,
    ))
}

/// `/v2/<name>/manifests/sha256-<hex>`: the referrers tag schema, for clients that do not know
/// the referrers API.
async fn referrers_by_tag(
    state: &AppState,
    name: &ImageName,
    digest: &Digest,
    head: bool,
) -> Result<Response, Error> {
    let referrers = state.images.referrers(name.as_str(), digest).await?;
    let index = crate::manifest::referrers_index(&referrers);
    Ok(manifest_response(
        &Manifest::new(index, crate::manifest::OCI_INDEX),
        head,
    ))
}

/// `/v2/<name>/manifests/sha256-<hex>.sig` (or `.att`): the signatures (or attestations) of
/// manifest `<hex>` under `name`, where cosign, podman and skopeo look for them.
async fn attachment(
    state: &AppState,
    name: &ImageName,
    digest: &Digest,
    attached: Attached,
    head: bool,
) -> Result<Response, Error> {
    match state
        .images
        .attachment(name.as_str(), digest, attached)
        .await?
    {
        Some(manifest) => Ok(manifest_response(&manifest, head)),
        None => Err(Error::NotAttached {
            name: name.to_string(),
            digest: digest.clone(),
            attached,
        }),
    }
}

/// The manifest digest a tag of the referrers tag schema (`sha256-<hex>`) names.
fn referrers_tag(tag: &Tag) -> Option<Digest> {
    let hex = tag.as_str().strip_prefix("sha256-")?;
    format!("sha256:{hex}").parse().ok()
}

/// Names close to each package the set lacks, from its catalog when that is ready (asking starts
/// making it, for the next time).
fn suggestions(state: &AppState, pin: &Pin, err: &BuildError) -> BTreeMap<String, Vec<String>> {
    let BuildError::Nix(nix) = err else {
        return BTreeMap::new();
    };
    let NixError::NotFound(missing) = nix.as_ref() else {
        return BTreeMap::new();
    };
    // A client past its rate gets no suggestions, rather than a refusal for asking.
    let Ok(Some(catalog)) = state.catalogs.ready(pin) else {
        return BTreeMap::new();
    };
    missing
        .iter()
        .map(|name| (name.clone(), catalog.suggest(name)))
        .filter(|(_, close)| !close.is_empty())
        .collect()
}

/// The error for an image of `request` that could not be built, naming its platform if
/// `in_index` (the name did not).
fn image_failure(
    state: &AppState,
    headers: &HeaderMap,
    request: &Request,
    err: Arc<BuildError>,
    in_index: bool,
) -> Error {
    Error::Build(Box::new(ImageFailure {
        suggestions: suggestions(state, &request.pin, &err),
        err,
        name: request.name.to_string(),
        package_set: state.sources.describe_pin(&request.pin),
        build_url: crate::web::build_page_url(headers, request),
        platform: in_index.then(|| request.platform.to_string()),
    }))
}
