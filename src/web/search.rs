//! Package search: `GET /api/v1/packages?q=…&limit=…&tag=…` answers the packages of the current
//! source (or of `tag`'s) that match a query, best first, as JSON; the search page shows the same.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use crate::catalog::Package;
use crate::error::Error;
use crate::image::Tag;
use crate::state::AppState;

/// Longest query, in bytes: longer is no package name.
pub const MAX_QUERY: usize = 200;

/// Results when `limit` is not given, and the most it may ask for.
pub const DEFAULT_LIMIT: usize = 20;
pub const MAX_LIMIT: usize = 100;

/// How long a search waits for a catalog being made before answering 503 with Retry-After.
const CATALOG_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// A search as the query string gives it.
#[derive(Debug, Default, Deserialize)]
pub struct Params {
    pub q: Option<String>,
    pub limit: Option<String>,
    pub tag: Option<String>,
}

/// What a search found.
pub struct Found {
    pub query: String,
    pub package_set: String,
    pub packages: Vec<Package>,
}

/// `GET /api/v1/packages`.
pub async fn packages(
    State(state): State<AppState>,
    params: Result<Query<Params>, QueryRejection>,
) -> Result<Response, Error> {
    let Query(params) = params.map_err(|e| Error::BadSearch(e.body_text()))?;
    let found = find(&state, &params).await?;
    let body = serde_json::json!({
        "query": found.query,
        "package_set": found.package_set,
        "packages": found.packages,
    });
    Ok(super::json(StatusCode::OK, &body))
}

/// The packages `params` ask for: the query checked, the catalog of the tag's package set
/// searched (waiting a little for one being made).
pub async fn find(state: &AppState, params: &Params) -> Result<Found, Error> {
    let query = params.q.as_deref().map(str::trim).unwrap_or_default();
    if query.is_empty() {
        return Err(Error::BadSearch(
            "q is empty: give part of a package name, e.g. ?q=pyth".to_owned(),
        ));
    }
    if query.len() > MAX_QUERY {
        return Err(Error::BadSearch(format!(
            "q has {} bytes; at most {MAX_QUERY}",
            query.len()
        )));
    }
    let limit = match params.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                Error::BadSearch(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}, not '{}'",
                    text.chars().take(40).collect::<String>()
                ))
            })?,
    };
    let tag: Tag = params.tag.as_deref().unwrap_or("latest").parse()?;
    let pin = state.sources.pin(&tag).await?;
    let package_set = state.sources.describe_pin(&pin);
    let catalog = state
        .catalogs
        .ready_within(&pin, CATALOG_PATIENCE)
        .await
        .map_err(Error::Refused)?
        .ok_or_else(|| Error::CatalogNotReady(package_set.clone()))?;
    Ok(Found {
        query: query.to_owned(),
        package_set,
        packages: catalog.search(query, limit).into_iter().cloned().collect(),
    })
}
