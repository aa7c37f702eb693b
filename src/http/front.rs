//! What every request passes before its route, in one middleware ([`front`]): who the client is,
//! HSTS and the redirect to https behind a TLS proxy, a stray panic turned into a registry
//! `500`, and the request counted, timed and logged.
//!
//! One middleware rather than a layer each: the steps are cheap, and each layer would box the
//! request's future and clone the service under it again, which warm manifest requests (tens of
//! thousands a second) paid for in the profile more than for the steps themselves.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::FutureExt;
use tracing::Instrument;

use crate::error::Error;
use crate::server::client::TrustedProxies;
use crate::server::metrics::{HttpLabels, METRICS, RouteLabel};

/// The most of a request's method, URI and User-Agent a log line keeps.
const LOGGED_METHOD_CHARS: usize = 32;
const LOGGED_URI_CHARS: usize = 2048;
const LOGGED_USER_AGENT_CHARS: usize = 256;

/// `Strict-Transport-Security` behind a TLS proxy: one week, as the seed sent it.
const HSTS: &str = "max-age=604800";

/// Every request, as the [module](self) says, in this order: the client is found (the peer the
/// accept loop put in the request's extensions, or the address `trusted` proxies forwarded) and
/// set for the handler ([`crate::server::client::serve_as`]); a web page asked for over plain
/// http behind a TLS proxy is redirected; the rest runs with panics caught; every answer
/// behind a TLS proxy gets HSTS; the request is counted in the metrics and logged.
pub async fn front(
    State(trusted): State<TrustedProxies>,
    request: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let route = route_label(request.uri().path());
    let method = request.method().clone();
    let uri = request.uri().clone();
    let user_agent = request.headers().get(header::USER_AGENT).cloned();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let protocol = request.version();
    let uri_text = uri_text(&uri);
    let uri_logged = Truncated(&uri_text, LOGGED_URI_CHARS);
    let method_logged = Truncated(method.as_str(), LOGGED_METHOD_CHARS);
    let span = tracing::info_span!("request", method = %method_logged, uri = %uri_logged);
    let response = async {
        let tls_proxy = TlsProxy::of(&request);
        if let Some(redirect) = tls_proxy.as_ref().and_then(|p| p.redirect(&request, route)) {
            return redirect;
        }
        let answered = AssertUnwindSafe(match peer {
            Some(peer) => {
                let client = trusted.client(peer, request.headers());
                crate::server::client::serve_as(client, next.run(request)).boxed()
            }
            // Not from a socket (the router called directly, as in tests): nobody to count.
            None => next.run(request).boxed(),
        })
        .catch_unwind()
        .await;
        let mut response = answered.unwrap_or_else(|panic| {
            Error::Panicked(crate::sync::panic_message(panic.as_ref())).into_response()
        });
        if tls_proxy.is_some() {
            response.headers_mut().insert(
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static(HSTS),
            );
        }
        response
    }
    .instrument(span)
    .await;
    log(&Served {
        route,
        method: &method,
        uri: uri_logged,
        user_agent: user_agent.as_ref(),
        peer,
        protocol,
        latency: started.elapsed(),
        response: &response,
    });
    response
}

/// A request behind a TLS proxy (App Engine's frontend, or any that sets `X-Forwarded-Proto`),
/// as the seed handled it.
struct TlsProxy {
    /// The client's scheme: the first of the list a chain of proxies writes.
    scheme: String,
}

impl TlsProxy {
    fn of(request: &Request) -> Option<TlsProxy> {
        let forwarded = request.headers().get("x-forwarded-proto")?.to_str().ok()?;
        let scheme = forwarded.split(',').next().unwrap_or_default().trim();
        Some(TlsProxy {
            scheme: scheme.to_ascii_lowercase(),
        })
    }

    /// The 308 to https on the same host for a web page asked for over plain http. Registry
    /// routes are not redirected, so pulls over plain http (a local registry) keep working.
    fn redirect(&self, request: &Request, route: &str) -> Option<Response> {
        if self.scheme != "http" || !matches!(route, "index" | "pages") {
            return None;
        }
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })?;
        let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = HeaderValue::from_str(&format!("https://{host}{target}")).ok()?;
        Some(
            (
                StatusCode::PERMANENT_REDIRECT,
                [
                    (header::LOCATION, location),
                    (
                        header::STRICT_TRANSPORT_SECURITY,
                        HeaderValue::from_static(HSTS),
                    ),
                ],
            )
                .into_response(),
        )
    }
}

/// What the log line and the metrics of one request say.
struct Served<'a> {
    route: &'static str,
    method: &'a Method,
    uri: Truncated<'a>,
    user_agent: Option<&'a HeaderValue>,
    peer: Option<IpAddr>,
    protocol: axum::http::Version,
    latency: std::time::Duration,
    response: &'a Response,
}

/// Counts and times a request in the metrics, by route (never by name: names are unbounded) and
/// method (a made-up one counts as `other`), and logs it in one line at INFO once its response's
/// head is ready (a body may still be streaming): method, URI, status, latency in seconds, user
/// agent, client address (when the server put a `ConnectInfo<SocketAddr>` in the request's
/// extensions), response size (when known) and protocol, under the target
/// [`crate::server::logging::REQUEST_TARGET`], which the JSON log format turns into Cloud
/// Logging's `httpRequest`. What is logged while the request is worked on is in its `request`
/// span, with its method and URI.
fn log(served: &Served) {
    let status = served.response.status().as_u16();
    METRICS
        .http_duration
        .get_or_create(&RouteLabel {
            route: served.route,
        })
        .observe(served.latency.as_secs_f64());
    METRICS
        .http_requests
        .get_or_create(&HttpLabels {
            route: served.route,
            method: crate::server::metrics::method_label(served.method),
            status,
        })
        .inc();
    let response_size = if served.method == Method::HEAD {
        Some(0)
    } else {
        served
            .response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .or_else(|| axum::body::HttpBody::size_hint(served.response.body()).exact())
    };
    let user_agent = served
        .user_agent
        .map(|agent| String::from_utf8_lossy(agent.as_bytes()));
    tracing::info!(
        target: crate::server::logging::REQUEST_TARGET,
        method = %Truncated(served.method.as_str(), LOGGED_METHOD_CHARS),
        uri = %served.uri,
        status,
        latency = served.latency.as_secs_f64(),
        user_agent = user_agent
            .as_deref()
            .map(|agent| first_chars(agent, LOGGED_USER_AGENT_CHARS)),
        remote_ip = served.peer.map(tracing::field::display),
        response_size,
        protocol = ?served.protocol,
        "request"
    );
}

/// The URI as the client wrote it in the request line: its path and query, without a copy, as
/// clients write it (origin form), or the whole URI.
fn uri_text(uri: &axum::http::Uri) -> Cow<'_, str> {
    match uri.path_and_query() {
        Some(path) if uri.authority().is_none() => Cow::Borrowed(path.as_str()),
        _ => Cow::Owned(uri.to_string()),
    }
}

/// At most the first `.1` characters of `.0`, shown without copying them first.
#[derive(Clone, Copy)]
struct Truncated<'a>(&'a str, usize);

impl fmt::Display for Truncated<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(first_chars(self.0, self.1))
    }
}

/// The first `n` characters of `text` (all of it when it is shorter).
fn first_chars(text: &str, n: usize) -> &str {
    if text.len() <= n {
        // At most n bytes are at most n characters.
        return text;
    }
    text.char_indices()
        .nth(n)
        .map_or(text, |(end, _)| &text[..end])
}

/// The route a path is counted under in the metrics.
pub fn route_label(path: &str) -> &'static str {
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
