//! The builds API: start a build before a slow pull (`POST /api/v1/builds`), ask how it is
//! going (`GET /api/v1/builds/<image>[:tag]`), follow it as Server-Sent Events
//! (`GET /api/v1/events/<image>[:tag]`), get an image's SBOM (`GET /api/v1/sbom/<image>[:tag]`)
//! and the key its signatures verify with (`GET /api/v1/signing-key`).
//! Answers and errors are JSON (SBOMs are SPDX or CycloneDX JSON).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::{host, json, origin, parse_reference, pull_command, reference};
use crate::builder::events::{Run, Status};
use crate::error::Error;
use crate::image::{ImageName, Tag};
use crate::manifest::Compression;
use crate::state::{AppState, TagCheck};

/// How long `POST /api/v1/builds` waits for a build to end before answering `202`: an image
/// already built (in memory or storage) is answered `200` with its digest.
const SETTLE: Duration = Duration::from_secs(1);

/// What `POST /api/v1/builds` reads.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBuild {
    image: String,
    tag: Option<String>,
}

/// `POST /api/v1/builds` `{"image": "shell/curl", "tag": "latest"}`: starts the build (or joins
/// the running one) and answers `202` with its status while it runs, `200` once it has ended.
pub async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<StartBuild>, JsonRejection>,
) -> Result<Response, Error> {
    let Json(body) = body.map_err(|e| Error::BadBody(e.body_text()))?;
    let name: ImageName = body.image.parse()?;
    let tag: Tag = body.tag.as_deref().unwrap_or("latest").parse()?;
    let request = state.request(name, tag, TagCheck::Now).await?.request;
    let run = state
        .images
        .clone()
        .start(&request)
        .map_err(|err| Error::refused(err, request.name.as_str()))?;
    let _still_running = tokio::time::timeout(SETTLE, run.finished()).await;
    let status = match run.status() {
        Status::Running => StatusCode::ACCEPTED,
        Status::Done | Status::Failed => StatusCode::OK,
    };
    let mut response = json(status, &status_json(&run, &headers));
    if let Ok(location) = HeaderValue::from_str(&status_path(&run)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `GET /api/v1/builds/<image>[:tag]`: the build's status, or `404` when there is none.
pub async fn status(
    State(state): State<AppState>,
    image: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let run = build_of(&state, image).await?;
    Ok(json(StatusCode::OK, &status_json(&run, &headers)))
}

/// `GET /api/v1/events/<image>[:tag]`: the build's events as Server-Sent Events, from its start
/// (progress folded into the latest), ending after its last event. At most
/// `NIXERY_MAX_EVENT_STREAMS` streams are open at once.
pub async fn events(
    State(state): State<AppState>,
    image: Result<Path<String>, PathRejection>,
) -> Result<Response, Error> {
    let run = build_of(&state, image).await?;
    let permit = state
        .event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::TooManyStreams)?;
    let stream = run.follow().map(move |event| {
        // The stream holds its place among the streams allowed until it ends.
        let _held = &permit;
        Ok::<_, Infallible>(
            sse::Event::default()
                .event(event.phase)
                .id(event.seq.to_string())
                .data(event.json.replace('<', "\\u003c").replace('>', "\\u003e")),
        )
    });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies that buffer (nginx) would hold the events back.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// `GET /api/v1/signing-key`: the public key this server's signatures verify with, in PEM as
/// `cosign verify --key` and podman's `keyPath` read it; `404` when it signs nothing.
pub async fn signing_key(State(state): State<AppState>) -> Result<Response, Error> {
    let signer = state.signer.as_ref().ok_or(Error::NoSigningKey)?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        signer.key().public_pem().to_owned(),
    )
        .into_response())
}

/// Any other method on an API route.
pub async fn wrong_method(method: Method) -> Error {
    Error::MethodNotAllowed(method)
}

/// Anything else under `/api/`.
pub async fn no_route(uri: Uri) -> Error {
    Error::NoRoute(uri.path().chars().take(200).collect())
}

/// The build the path's `shell/curl[:tag]` names, or `404` when this server has none.
async fn build_of(
    state: &AppState,
    image: Result<Path<String>, PathRejection>,
) -> Result<Arc<Run>, Error> {
    let (name, tag) = parse_reference(image)?;
    let request = state.request(name, tag, TagCheck::Now).await?.request;
    state
        .images
        .build_of(&request)
        .ok_or_else(|| Error::NoBuild(reference(request.name.as_str(), request.tag.as_str())))
}

fn status_path(run: &Run) -> String {
    format!("/api/v1/builds/{}", reference(&run.image, &run.tag))
}

/// A build's status as the API answers it.
pub fn status_json(run: &Run, headers: &HeaderMap) -> serde_json::Value {
    let origin = origin(headers);
    let name = reference(&run.image, &run.tag);
    let events: Vec<serde_json::Value> = run
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str(&e.json).ok())
        .collect();
    json!({
        "image": run.image,
        "tag": run.tag,
        "package_set": run.package_set,
        "platform": run.platform,
        "compression": run.compression,
        "status": run.status(),
        "digest": run.digest(),
        "started_at": unix_seconds(run.started_at),
        "finished_at": run.finished_at().map(unix_seconds),
        "url": format!("{origin}/build/{name}"),
        "events_url": format!("{origin}/api/v1/events/{name}"),
        // The build's own name says `zstd-layers/` whenever its layers are zstd.
        "pull": pull_command(host(headers), run.compression == Compression::Zstd.as_str(), &name),
        "events": events,
    })
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `GET /api/v1/sbom/<image>[:tag]?format=spdx|cyclonedx`: the image's SBOM (SPDX unless asked
/// otherwise), the image built first if need be, as a pull would.
pub async fn sbom(
    State(state): State<AppState>,
    image: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Response, Error> {
    let (name, tag) = parse_reference(image)?;
    let format = uri.query().unwrap_or("").split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == "format").then_some(value)
    });
    let artifact_type = match format.unwrap_or("spdx") {
        "spdx" => crate::builder::SPDX,
        "cyclonedx" => crate::builder::CYCLONEDX,
        other => {
            return Err(Error::BadSearch(format!(
                "format '{}' is not one nixery writes: use spdx or cyclonedx",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    let request = state.request(name, tag, TagCheck::Now).await?.request;
    let image = state
        .images
        .clone()
        .image(&request)
        .await
        .map_err(|err| Error::refused(err, request.name.as_str()))?;
    let digest = &image.manifest(crate::manifest::Format::Docker).digest;
    match state.images.sbom(digest, artifact_type).await? {
        Some(document) => Ok(([(header::CONTENT_TYPE, artifact_type)], document).into_response()),
        None => Err(Error::NoSbom(request.name.to_string())),
    }
}
