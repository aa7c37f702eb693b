//! The stylesheet and script, served from the binary. Pages link them with a hash of their
//! contents in the query, so browsers may keep them for a year and still get a new version at
//! once.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::Error;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: [Asset; 2] = [
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../static/style.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/app.js"),
    },
];

/// The first 16 hex digits of each asset's sha256, by position in [`ASSETS`].
static VERSIONS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| hex::encode(Sha256::digest(a.body.as_bytes()))[..16].to_owned())
        .collect()
});

/// `/static/NAME?v=VERSION`: the URL pages use for asset `name`.
pub fn url(name: &str) -> String {
    let version = ASSETS
        .iter()
        .position(|a| a.name == name)
        .and_then(|i| VERSIONS.get(i))
        .map_or("", String::as_str);
    format!("/static/{name}?v={version}")
}

/// `GET /static/<file>`, with an `ETag` (answered `304` when it matches).
pub async fn serve(
    file: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let file = file.map(|Path(file)| file).unwrap_or_default();
    let (asset, version) = ASSETS
        .iter()
        .zip(VERSIONS.iter())
        .find(|(a, _)| a.name == file)
        .ok_or_else(|| {
            Error::NoRoute(format!(
                "/static/{}",
                file.chars().take(100).collect::<String>()
            ))
        })?;
    let etag = format!("\"{version}\"");
    let cache = [
        (header::ETAG, etag.clone()),
        (
            header::CACHE_CONTROL,
            "public, max-age=31536000, immutable".to_owned(),
        ),
    ];
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        return Ok((StatusCode::NOT_MODIFIED, cache).into_response());
    }
    let mut response = (cache, asset.body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    Ok(response)
}
