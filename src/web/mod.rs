//! The web side, beside the registry routes: the index page, package search, build pages with
//! live progress, and the JSON API under `/api/v1/` that the pages and scripts use. Pages are
//! rendered on the server (askama templates, escaped), with one stylesheet and one small script
//! served from the binary.

mod api;
mod assets;
mod pages;
mod search;

use std::str::FromStr;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::PathRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};

use crate::builder::Request;
use crate::error::Error;
use crate::image::{ImageName, Tag};
use crate::state::AppState;

/// Largest request body the API reads (a build request is a few dozen bytes).
const MAX_BODY_BYTES: usize = 4096;

/// What every page and API answer carries: scripts and styles only from this server, no
/// framing, no sniffing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The pages and the JSON API.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(pages::index).fallback(pages::wrong_method))
        .route("/search", get(pages::search).fallback(pages::wrong_method))
        .route(
            "/build/{*image}",
            get(pages::build)
                .post(pages::start)
                .fallback(pages::wrong_method),
        )
        .route(
            "/static/{file}",
            get(assets::serve).fallback(pages::wrong_method),
        )
        .route(
            "/api/v1/packages",
            get(search::packages).fallback(api::wrong_method),
        )
        .route(
            "/api/v1/builds",
            post(api::start).fallback(api::wrong_method),
        )
        .route(
            "/api/v1/builds/{*image}",
            get(api::status).fallback(api::wrong_method),
        )
        .route(
            "/api/v1/events/{*image}",
            get(api::events).fallback(api::wrong_method),
        )
        .route(
            "/api/v1/sbom/{*image}",
            get(api::sbom).fallback(api::wrong_method),
        )
        .route(
            "/api/v1/signing-key",
            get(api::signing_key).fallback(api::wrong_method),
        )
        .route("/api", any(api::no_route))
        .route("/api/{*rest}", any(api::no_route))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(security_headers))
}

async fn security_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// The command that pulls `reference` (`shell/hello:tag`) from `host`: `docker pull`, but
/// `podman pull` for a name with zstd layers (`zstd_layers`), which Docker before 23.0 cannot
/// unpack (and podman, containerd and later Docker can). Under a zstd default a plain name stays
/// `docker pull`: an old Docker gets that image's gzip layers.
pub fn pull_command(host: &str, zstd_layers: bool, reference: &str) -> String {
    let client = if zstd_layers { "podman" } else { "docker" };
    format!("{client} pull {host}/{reference}")
}

/// The host the visitor used (`registry.example`, `127.0.0.1:5726`), for pull commands.
pub fn host(headers: &HeaderMap) -> &str {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or("localhost")
}

/// `http://HOST` or, behind a proxy that says so, `https://HOST`.
pub fn origin(headers: &HeaderMap) -> String {
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{}", host(headers))
}

/// `shell/curl`, or `shell/curl:TAG` for any tag but `latest`: how pages and commands name an
/// image.
pub fn reference(image: &str, tag: &str) -> String {
    if tag == "latest" {
        image.to_owned()
    } else {
        format!("{image}:{tag}")
    }
}

/// Where the build of `request` is shown, on the host the client asked.
pub fn build_page_url(headers: &HeaderMap, request: &Request) -> String {
    format!(
        "{}/build/{}",
        origin(headers),
        reference(&request.name_alone(), request.tag.as_str())
    )
}

/// A JSON answer, without markup characters (see [`crate::error::json_without_markup`]).
fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut response = (status, crate::error::json_without_markup(value)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An image and tag from a path's `shell/curl` or `shell/curl:TAG` (tag `latest` if none).
fn parse_reference(
    path: Result<axum::extract::Path<String>, PathRejection>,
) -> Result<(ImageName, Tag), Error> {
    let axum::extract::Path(text) = path.map_err(|e| Error::BadPath(e.body_text()))?;
    let (name, tag) = match text.rsplit_once(':') {
        Some((name, tag)) => (name, tag),
        None => (text.as_str(), "latest"),
    };
    Ok((ImageName::from_str(name)?, Tag::from_str(tag)?))
}

#[cfg(test)]
mod tests;
