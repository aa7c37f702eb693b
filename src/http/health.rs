//! Health checks for load balancers and App Engine: liveness (`/healthz`, 200 while the process
//! serves) and readiness (`/readyz`, 200 only while storage can be used).

use axum::extract::State;
use axum::http::Method;

use super::{AppState, is_head};
use crate::error::Error;

/// Liveness: answering at all is the proof.
pub async fn live(method: Method) -> Result<&'static str, Error> {
    is_head(&method)?;
    Ok("ok\n")
}

/// Readiness: storage is reachable and writable, so requests can be served.
pub async fn ready(State(state): State<AppState>, method: Method) -> Result<&'static str, Error> {
    is_head(&method)?;
    state.storage.check().await.map_err(Error::NotReady)?;
    Ok("ok\n")
}
