//! The HTTP API: the read-only registry API v2 (`registry.rs`), beside the web pages and JSON
//! API of [`crate::web`], the health checks and the metrics, and what every request passes
//! before its route (`front.rs`).

mod front;
mod health;
mod range;
mod registry;
mod response;
mod route;
mod tags;

use axum::Router;
use axum::extract::State;
use axum::http::{Method, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use crate::error::Error;
use crate::server::client::TrustedProxies;
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
    serve_layers(router, state.trusted_proxies)
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
                // Set by `front::front`, which runs first; unspecified without a socket (router
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
        TrustedProxies::default(),
    )
}

/// What every request passes before its route ([`front::front`]), its client found among
/// `trusted` proxies.
fn serve_layers(router: Router, trusted: TrustedProxies) -> Router {
    router.layer(axum::middleware::from_fn_with_state(trusted, front::front))
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
