//! The HTTP API: the read-only registry API v2 (`registry.rs`), beside the web pages and JSON
//! API of [`crate::web`], the health checks and the metrics, and the layers every response
//! passes.

mod health;
mod range;
mod registry;
mod response;
mod route;
mod tags;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::error::Error;
use crate::server::metrics::{HttpLabels, METRICS, RouteLabel};
use crate::state::AppState;
use registry::registry;

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

/// Serves a request as its client's (see [`crate::server::client`]): the peer the accept loop put in
/// its extensions, or the address trusted proxies forwarded.
async fn as_client(
    State(trusted): State<crate::server::client::TrustedProxies>,
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
            crate::server::client::serve_as(client, next.run(request)).await
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
    State(auth): State<std::sync::Arc<crate::server::auth::Auth>>,
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
                crate::server::client::current().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
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
/// protocol, under the target [`crate::server::logging::REQUEST_TARGET`], which the JSON log format
/// turns into Cloud Logging's `httpRequest`. What is logged while the request is worked on is
/// in its `request` span, with its method and URI.
async fn count(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = route_label(request.uri().path());
    let method = request.method().clone();
    let logged_method = first_chars(method.as_str(), LOGGED_METHOD_CHARS);
    let mut uri = request.uri().to_string();
    uri.truncate(first_chars(&uri, LOGGED_URI_CHARS).len());
    let user_agent: Option<String> = request.headers().get(header::USER_AGENT).map(|v| {
        let agent = String::from_utf8_lossy(v.as_bytes());
        first_chars(&agent, LOGGED_USER_AGENT_CHARS).to_owned()
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
            method: crate::server::metrics::method_label(&method),
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
        target: crate::server::logging::REQUEST_TARGET,
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

/// The first `n` characters of `text` (all of it when it is shorter).
fn first_chars(text: &str, n: usize) -> &str {
    text.char_indices()
        .nth(n)
        .map_or(text, |(end, _)| &text[..end])
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
        [(header::CONTENT_TYPE, crate::server::metrics::CONTENT_TYPE)],
        crate::server::metrics::encode(),
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

#[cfg(test)]
pub(crate) mod tests;
