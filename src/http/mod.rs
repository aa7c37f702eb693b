//! Routes and thin handlers for the read-only registry API v2
//! (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md>), beside the web
//! pages and JSON API of [`crate::web`], and the layers every response passes.

mod health;
mod range;
mod route;
mod tags;

use std::collections::BTreeMap;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::any;

use futures::StreamExt;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::AppState;
use crate::builder::{BuildError, Request, Served};
use crate::error::{Error, ImageFailure};
use crate::manifest::{Digest, Format, Manifest};
use crate::metrics::{HttpLabels, METRICS, RouteLabel};
use crate::nix::NixError;
use crate::source::Pin;
use crate::storage::{Blob, Contents};
use range::ByteRange;
use route::Route;

const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let metrics_here = state.metrics_here;
    let readiness = std::sync::Arc::new(health::Readiness::new(state.storage.clone()));
    let mut router = Router::new()
        .route("/healthz", any(health::live))
        .route(
            "/readyz",
            any(health::ready).layer(axum::Extension(readiness)),
        )
        .route("/v2/", any(registry))
        .route("/v2/{*path}", any(registry))
        .merge(crate::web::routes());
    if metrics_here {
        router = router.route("/metrics", any(metrics));
    }
    let mut router = router
        .fallback(|uri: Uri| async move { Error::NoRoute(uri.path().chars().take(200).collect()) })
        .with_state(state.clone());
    if let Some(auth) = state.auth {
        router = router.layer(axum::middleware::from_fn_with_state(auth, credentials));
    }
    let router = router.layer(axum::middleware::from_fn_with_state(
        state.trusted_proxies,
        as_client,
    ));
    serve_layers(router.layer(axum::middleware::from_fn(behind_tls_proxy)))
}

/// Serves a request as its client's (see [`crate::client`]): the peer the accept loop put in
/// its extensions, or the address trusted proxies forwarded.
async fn as_client(
    State(trusted): State<crate::client::TrustedProxies>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    match peer {
        Some(peer) => {
            let client = trusted.client(peer, request.headers());
            crate::client::serve_as(client, next.run(request)).await
        }
        // Not from a socket (the router called directly, as in tests): nobody to count.
        None => next.run(request).await,
    }
}

/// `Strict-Transport-Security` behind a TLS proxy: one week, as the seed sent it.
const HSTS: &str = "max-age=604800";

/// Behind a TLS proxy (App Engine's frontend, or any that sets `X-Forwarded-Proto`), as the
/// seed did: every answer carries HSTS, and a web page asked for over plain http is redirected
/// (308) to https on the same host. Registry routes are not redirected, so pulls over plain
/// http (a local registry) keep working.
async fn behind_tls_proxy(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(scheme) = request
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        // A chain of proxies lists a scheme each; the first is the client's.
        .map(|v| {
            v.split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
    else {
        return next.run(request).await;
    };
    let hsts = (
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static(HSTS),
    );
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    if scheme == "http"
        && matches!(route_label(request.uri().path()), "index" | "pages")
        && let Some(host) = host
    {
        let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{host}{target}");
        if let Ok(location) = HeaderValue::from_str(&location) {
            return (
                StatusCode::PERMANENT_REDIRECT,
                [(header::LOCATION, location), hsts],
            )
                .into_response();
        }
    }
    let mut response = next.run(request).await;
    response.headers_mut().insert(hsts.0, hsts.1);
    response
}

/// Lets a request through only with the credentials of a user (`NIXERY_AUTH_HTPASSWD`), but
/// for the health checks, which load balancers and orchestrators ask without any.
async fn credentials(
    State(auth): State<std::sync::Arc<crate::auth::Auth>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    if path == "/healthz"
        || path == "/readyz"
        || auth
            .allows(
                request.headers(),
                // Set by `as_client`, which runs first; unspecified without a socket (router
                // tests).
                crate::client::current().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            )
            .await
    {
        next.run(request).await
    } else {
        Error::Unauthorized.into_response()
    }
}

/// Only `/metrics`, for `NIXERY_METRICS_ADDRESS`.
pub fn metrics_router() -> Router {
    serve_layers(
        Router::new()
            .route("/metrics", any(metrics))
            .fallback(
                |uri: Uri| async move { Error::NoRoute(uri.path().chars().take(200).collect()) },
            ),
    )
}

/// What every response passes through: a stray panic becomes a registry `500` (the connection is
/// not dropped), each request is counted and timed, and logged.
fn serve_layers(router: Router) -> Router {
    router
        .layer(CatchPanicLayer::custom(
            |panic: Box<dyn std::any::Any + Send>| {
                Error::Panicked(crate::sync::panic_message(panic.as_ref())).into_response()
            },
        ))
        .layer(axum::middleware::from_fn(count))
}

/// The most of a request's method, URI and User-Agent a log line keeps.
const LOGGED_METHOD_CHARS: usize = 32;
const LOGGED_URI_CHARS: usize = 2048;
const LOGGED_USER_AGENT_CHARS: usize = 256;

/// Counts and times a request in the metrics, by route (never by name: names are unbounded) and
/// method (a made-up one counts as `other`), and logs it in one line at INFO once its response's head is ready (a body may still be streaming):
/// method, URI, status, latency in seconds, user agent, client address (when the server put a
/// `ConnectInfo<SocketAddr>` in the request's extensions), response size (when known) and
/// protocol, under the target [`crate::logging::REQUEST_TARGET`], which the JSON log format
/// turns into Cloud Logging's `httpRequest`. What is logged while the request is worked on is
/// in its `request` span, with its method and URI.
async fn count(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = route_label(request.uri().path());
    let method = request.method().clone();
    let logged_method: String = method.as_str().chars().take(LOGGED_METHOD_CHARS).collect();
    let uri: String = request
        .uri()
        .to_string()
        .chars()
        .take(LOGGED_URI_CHARS)
        .collect();
    let user_agent: Option<String> = request.headers().get(header::USER_AGENT).map(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .chars()
            .take(LOGGED_USER_AGENT_CHARS)
            .collect()
    });
    let remote_ip = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    let protocol = request.version();
    let started = std::time::Instant::now();
    let span = tracing::info_span!("request", method = %logged_method, uri = %uri);
    let response = next.run(request).instrument(span).await;
    let latency = started.elapsed();
    let status = response.status().as_u16();
    METRICS
        .http_duration
        .get_or_create(&RouteLabel { route })
        .observe(latency.as_secs_f64());
    METRICS
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            method: crate::metrics::method_label(&method),
            status,
        })
        .inc();
    let response_size = if method == Method::HEAD {
        Some(0)
    } else {
        response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .or_else(|| axum::body::HttpBody::size_hint(response.body()).exact())
    };
    tracing::info!(
        target: crate::logging::REQUEST_TARGET,
        method = %logged_method,
        uri = %uri,
        status,
        latency = latency.as_secs_f64(),
        user_agent = user_agent.as_deref(),
        remote_ip = remote_ip.map(tracing::field::display),
        response_size,
        protocol = ?protocol,
        "request"
    );
    response
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/" => "index",
        p if p.starts_with("/api/v1/events/") => "events",
        p if p.starts_with("/api/") => "api",
        p if p.starts_with("/build/") || p == "/search" || p.starts_with("/static/") => "pages",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        "/v2/" | "/v2" => "base",
        p if !p.starts_with("/v2/") => "other",
        p if p.ends_with("/tags/list") => "tags",
        p if p.contains("/manifests/") => "manifests",
        p if p.contains("/blobs/") => "blobs",
        _ => "other",
    }
}

async fn metrics(method: Method) -> Result<Response, Error> {
    is_head(&method)?;
    Ok((
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::encode(),
    )
        .into_response())
}

/// GET or HEAD, or the read-only refusal.
fn is_head(method: &Method) -> Result<bool, Error> {
    match *method {
        Method::GET => Ok(false),
        Method::HEAD => Ok(true),
        _ => Err(Error::ReadOnly(method.clone())),
    }
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
    err: std::sync::Arc<BuildError>,
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

async fn registry(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let head = is_head(&method)?;
    let accepted = || {
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
    };
    let format = Format::negotiate(accepted());
    match Route::parse(uri.path())? {
        Route::Base => Ok(([API_VERSION], "{}").into_response()),
        Route::ManifestByTag(_, tag) if let Some(digest) = referrers_tag(&tag) => {
            // The referrers tag schema, for clients that do not know the referrers API.
            let index = crate::manifest::referrers_index(&state.images.referrers(&digest).await?);
            Ok(manifest_response(
                &Manifest::new(index, crate::manifest::OCI_INDEX),
                head,
            ))
        }
        Route::Referrers(_name, digest) => Ok(referrers_response(
            state.images.referrers(&digest).await?,
            uri.query(),
            head,
        )),
        Route::ManifestByTag(name, tag) => {
            let name = state.declared.resolve(name);
            // The image service admits the tag once it knows the image is not stored.
            let pin = state.sources.resolve(&tag).await?;
            let platforms = state.platforms.indexed(&name).to_vec();
            let request = Request {
                platform: state.platforms.of(&name),
                name,
                tag,
                pin,
            };
            if let Some(index_format) = Format::negotiate_index(accepted())
                && !platforms.is_empty()
            {
                let index = state
                    .images
                    .clone()
                    .index(&request, &platforms)
                    .await
                    .map_err(|failed| match failed.platform {
                        Some(platform) => {
                            let request = request.for_platform(platform);
                            image_failure(&state, &headers, &request, failed.err, true)
                        }
                        None => image_failure(&state, &headers, &request, failed.err, false),
                    })?;
                return Ok(manifest_response(index.manifest(index_format), head));
            }
            let image = state
                .images
                .clone()
                .image(&request)
                .await
                .map_err(|err| image_failure(&state, &headers, &request, err, false))?;
            Ok(manifest_response(image.manifest(format), head))
        }
        Route::ManifestByDigest(_name, digest) => {
            match state.images.stored_manifest(&digest).await? {
                Some(manifest) => Ok(manifest_response(&manifest, head)),
                None => Err(Error::ManifestUnknown(digest)),
            }
        }
        Route::Blob(_name, digest) => {
            // containerd fetches manifests by digest through this route too, and keeps the
            // Content-Type it gets.
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
        Route::Tags(name) => {
            let (tags, next) = tags::page(state.sources.tags().await?, uri.query())?;
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
    }
}

/// The referrers API's answer (distribution-spec 1.1): an OCI image index of `referrers`, only
/// those of the `artifactType` the query asks for, if it does (and then `OCI-Filters-Applied`
/// says so).
fn referrers_response(
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

/// The manifest digest a tag of the referrers tag schema (`sha256-<hex>`) names.
fn referrers_tag(tag: &crate::image::Tag) -> Option<Digest> {
    let hex = tag.as_str().strip_prefix("sha256-")?;
    format!("sha256:{hex}").parse().ok()
}

fn blob_response(
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

fn manifest_response(manifest: &Manifest, head: bool) -> Response {
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
fn redirect(url: &str, digest: &str) -> Response {
    (
        [("docker-content-digest", digest), API_VERSION],
        Redirect::to(url),
    )
        .into_response()
}

#[cfg(test)]
pub(crate) mod tests;
