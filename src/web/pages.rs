//! The pages: the index (how to pull, the package set, search, recent builds), search results
//! (they work without JavaScript), and each image's build page (start a build, its phases live,
//! its layers or its error).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use askama::Template;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};

use super::search::{self, Params};
use super::{assets, host, parse_reference, pull_command, reference};
use crate::builder::events::{Published, Run, Status, human_bytes};
use crate::error::Error;
use crate::image::Tag;
use crate::source::Pin;
use crate::state::{AppState, TagCheck};

/// Builds the index page lists.
const RECENT_BUILDS: usize = 12;

/// How long the index page waits for the package source to say what `latest` is.
const SOURCE_PATIENCE: Duration = Duration::from_secs(2);

/// The build phases the page lists, in order, with their labels.
const PHASES: [(&str, &str); 8] = [
    ("queued", "Queue"),
    ("source", "Package set"),
    ("evaluated", "Evaluated"),
    ("derivations", "Derivations"),
    ("built", "Closure"),
    ("layers", "Layers"),
    ("stored", "Stored"),
    ("done", "Image"),
];

/// A page, or an error shown as one.
pub struct Page(Result<Response, Error>);

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        match self.0 {
            Ok(response) => response,
            Err(err) => {
                let (status, message) = err.for_page();
                let page = ErrorPage {
                    assets: Assets::get(),
                    status: status.as_u16(),
                    message,
                };
                (status, render(&page)).into_response()
            }
        }
    }
}

impl<T: Into<Error>> From<T> for Page {
    fn from(err: T) -> Self {
        Page(Err(err.into()))
    }
}

fn render(template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "a page failed to render");
            Error::Panicked(err.to_string()).into_response()
        }
    }
}

/// The asset URLs every page links.
struct Assets {
    style: String,
    script: String,
}

impl Assets {
    fn get() -> Assets {
        Assets {
            style: assets::url("style.css"),
            script: assets::url("app.js"),
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    assets: Assets,
    status: u16,
    message: String,
}

/// One package in search results.
struct Hit {
    name: String,
    version: String,
    description: String,
    pull: String,
}

/// One line of "recent builds".
struct RecentBuild {
    reference: String,
    status: &'static str,
    detail: String,
    when: String,
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    assets: Assets,
    host: String,
    source: String,
    package_set: Option<String>,
    recent: Vec<RecentBuild>,
    /// `NIXERY_PLATFORMS` in words (`linux/amd64, linux/arm64`); empty when unset.
    platforms: String,
    /// What a name without `arm64/` is built for otherwise.
    default_platform: String,
    /// The host signatures name images under, when images are signed (`NIXERY_SIGNING_KEY`).
    signed_for: Option<String>,
}

#[derive(Template)]
#[template(path = "search.html")]
struct SearchPage {
    assets: Assets,
    query: String,
    package_set: String,
    hits: Vec<Hit>,
    /// Why there are no results to show, when there are none.
    problem: Option<String>,
}

/// `GET /`.
pub async fn index(State(state): State<AppState>, headers: HeaderMap) -> Page {
    let latest = Tag::latest();
    // A path is the same set whatever the tag; a channel or repository has a commit now.
    let package_set = tokio::time::timeout(SOURCE_PATIENCE, state.sources.pin(&latest))
        .await
        .ok()
        .and_then(Result::ok)
        .filter(|pin| matches!(pin, Pin::Commit { .. }))
        .map(|pin| state.sources.describe_pin(&pin));
    let now = SystemTime::now();
    let recent = state
        .images
        .recent_builds(RECENT_BUILDS)
        .iter()
        .map(|run| recent_build(run, now))
        .collect();
    let page = IndexPage {
        assets: Assets::get(),
        host: host(&headers).to_owned(),
        source: state.sources.describe(),
        package_set,
        recent,
        platforms: state
            .platforms
            .listed()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        default_platform: state.platforms.default_platform().to_string(),
        signed_for: state
            .signer
            .as_ref()
            .map(|signer| signer.registry_host().to_owned()),
    };
    Page(Ok(render(&page)))
}

fn recent_build(run: &Run, now: SystemTime) -> RecentBuild {
    let events = run.events();
    let detail = match run.status() {
        Status::Running => events
            .last()
            .map(|e| e.text.to_string())
            .unwrap_or_default(),
        Status::Done => run.digest().map(|d| short_digest(&d)).unwrap_or_default(),
        Status::Failed => events
            .last()
            .map(|e| e.text.to_string())
            .unwrap_or_default(),
    };
    RecentBuild {
        reference: reference(&run.image, &run.tag),
        status: status_word(run.status()),
        detail,
        when: ago(now, run.finished_at().unwrap_or(run.started_at)),
    }
}

/// `GET /search?q=…`: the results of a search, without JavaScript.
pub async fn search(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<Params>, QueryRejection>,
) -> Page {
    let params = params.map(|Query(p)| p).unwrap_or_default();
    let host = host(&headers).to_owned();
    let query = params.q.clone().unwrap_or_default();
    let (status, page) = match search::find(&state, &params).await {
        Ok(found) => {
            let hits: Vec<Hit> = found
                .packages
                .into_iter()
                .map(|p| Hit {
                    pull: format!("docker pull {host}/shell/{}", p.name),
                    name: p.name,
                    version: p.version.unwrap_or_default(),
                    description: p.description.unwrap_or_default(),
                })
                .collect();
            let problem = hits
                .is_empty()
                .then(|| format!("No package matches “{}”.", found.query));
            (
                StatusCode::OK,
                SearchPage {
                    assets: Assets::get(),
                    query: found.query,
                    package_set: found.package_set,
                    hits,
                    problem,
                },
            )
        }
        Err(err) => {
            let (status, message) = err.for_page();
            let problem = if params.q.as_deref().map(str::trim).unwrap_or("").is_empty() {
                "Type part of a package name.".to_owned()
            } else {
                message
            };
            (
                status,
                SearchPage {
                    assets: Assets::get(),
                    query: query.chars().take(search::MAX_QUERY).collect(),
                    package_set: String::new(),
                    hits: Vec::new(),
                    problem: Some(problem),
                },
            )
        }
    };
    let mut response = (status, render(&page)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    Page(Ok(response))
}

/// One phase of a build as the page lists it.
struct PhaseView {
    id: &'static str,
    label: &'static str,
    /// `pending`, `active`, `done`, `skipped` or `failed`.
    state: &'static str,
    text: String,
}

/// One layer of a built image.
struct LayerView {
    digest: String,
    size: String,
    /// The store paths' names (without `/nix/store/<hash>-`).
    paths: Vec<String>,
    /// What stands in for paths: `image root`, or that they were not recorded.
    note: &'static str,
    /// `new`, `shared` or empty when unknown.
    new: &'static str,
}

#[derive(Template)]
#[template(path = "build.html")]
struct BuildPage {
    assets: Assets,
    reference: String,
    /// `none` (no build yet), `running`, `done` or `failed`.
    status: &'static str,
    package_set: String,
    /// `linux/amd64`.
    platform: String,
    /// How the layers are compressed: `gzip` or `zstd`.
    compression: &'static str,
    phases: Vec<PhaseView>,
    digest: String,
    layers: Vec<LayerView>,
    total_size: String,
    error: String,
    log: String,
    pull: String,
}

impl BuildPage {
    /// A page without a result (none yet, or none to show); `build_page` adds it.
    fn new(
        reference: String,
        status: &'static str,
        package_set: String,
        (platform, compression): (String, &'static str),
        phases: Vec<PhaseView>,
        pull: String,
    ) -> BuildPage {
        BuildPage {
            assets: Assets::get(),
            reference,
            status,
            package_set,
            platform,
            compression,
            phases,
            digest: String::new(),
            layers: Vec::new(),
            total_size: String::new(),
            error: String::new(),
            log: String::new(),
            pull,
        }
    }
}

/// `GET /build/<image>[:tag]`.
pub async fn build(
    State(state): State<AppState>,
    image: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Page {
    let (name, tag) = match parse_reference(image) {
        Ok(parsed) => parsed,
        Err(err) => return err.into(),
    };
    let request = match state.request(name, tag, TagCheck::Now).await {
        Ok(asked) => asked.request,
        Err(err) => return err.into(),
    };
    let name = reference(request.name.as_str(), request.tag.as_str());
    let pull = pull_command(host(&headers), request.name.zstd_layers(), &name);
    let package_set = state.sources.describe_pin(&request.pin);
    let page = match state.images.build_of(&request) {
        None => BuildPage::new(
            name,
            "none",
            package_set,
            (request.platform.to_string(), request.compression.as_str()),
            phases(&[], Status::Running),
            pull,
        ),
        Some(run) => build_page(&run, name, pull),
    };
    Page(Ok(render(&page)))
}

fn build_page(run: &Arc<Run>, reference: String, pull: String) -> BuildPage {
    let events = run.events();
    let status = run.status();
    let last = events
        .last()
        .and_then(|e| serde_json::from_str::<serde_json::Value>(&e.json).ok())
        .unwrap_or_default();
    let mut page = BuildPage::new(
        reference,
        status_word(status),
        run.package_set.clone(),
        (run.platform.clone(), run.compression),
        phases(&events, status),
        pull,
    );
    match status {
        Status::Done => {
            page.digest = run.digest().unwrap_or_default();
            let layers = last["layers"].as_array().cloned().unwrap_or_default();
            let total: u64 = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
            page.total_size = human_bytes(total);
            page.layers = layers.iter().map(layer_view).collect();
        }
        Status::Failed => {
            page.error = last["text"].as_str().unwrap_or_default().to_owned();
            page.log = log_tail(last["log"].as_str().unwrap_or_default());
        }
        Status::Running => {}
    }
    page
}

fn layer_view(layer: &serde_json::Value) -> LayerView {
    let paths: Option<Vec<String>> = layer["paths"].as_array().map(|paths| {
        paths
            .iter()
            .filter_map(|p| p.as_str())
            .map(|p| store_name(p).to_owned())
            .collect()
    });
    let note = match &paths {
        None => "not recorded (the image was built before)",
        Some(paths) if paths.is_empty() => "image root: /bin, /etc, … linking into the store",
        Some(_) => "",
    };
    LayerView {
        paths: paths.unwrap_or_default(),
        note,
        digest: short_digest(layer["digest"].as_str().unwrap_or_default()),
        size: human_bytes(layer["size"].as_u64().unwrap_or_default()),
        new: match layer["new"].as_bool() {
            Some(true) => "new",
            Some(false) => "shared",
            None => "",
        },
    }
}

/// The phases in order, each with the latest word about it.
fn phases(events: &[Published], status: Status) -> Vec<PhaseView> {
    let seen = |id: &str| events.iter().rev().find(|e| e.phase == id);
    let last_seen = PHASES.iter().rposition(|(id, _)| seen(id).is_some());
    let last_is_progress = last_seen.is_some_and(|i| is_progress(PHASES[i].0));
    PHASES
        .iter()
        .enumerate()
        .map(|(i, (id, label))| {
            let event = seen(id);
            // The queue is only there for builds that had to wait.
            let next = last_seen.map_or(1, |last| last + 1);
            let at_last = Some(i) == last_seen && is_progress(id);
            let state = match (event, status) {
                (None, _) if *id == "queued" => "skipped",
                // A phase that reports progress ended with the build, or is still going.
                (Some(_), Status::Running) if at_last => "active",
                (Some(_), Status::Failed) if at_last => "failed",
                (Some(_), _) => "done",
                (None, Status::Running) if i == next => "active",
                (None, Status::Failed) if i == next && !last_is_progress => "failed",
                (None, Status::Done) => "skipped",
                (None, _) => "pending",
            };
            PhaseView {
                id,
                label,
                state,
                text: event.map(|e| e.text.to_string()).unwrap_or_default(),
            }
        })
        .collect()
}

/// Phases that report progress before they are over.
fn is_progress(id: &str) -> bool {
    matches!(id, "queued" | "derivations" | "layers")
}

/// `POST /build/<image>[:tag]` (the page's button): starts the build, back to its page.
pub async fn start(
    State(state): State<AppState>,
    image: Result<Path<String>, PathRejection>,
) -> Page {
    let result = async {
        let (name, tag) = parse_reference(image)?;
        let request = state.request(name, tag, TagCheck::Now).await?.request;
        state
            .images
            .clone()
            .start(&request)
            .map_err(|err| Error::refused(err, request.name.as_str()))?;
        let page = format!(
            "/build/{}",
            reference(request.name.as_str(), request.tag.as_str())
        );
        Ok::<_, Error>(Redirect::to(&page).into_response())
    };
    Page(result.await)
}

/// Any other method on a page.
pub async fn wrong_method(method: Method) -> Page {
    Error::MethodNotAllowed(method).into()
}

fn status_word(status: Status) -> &'static str {
    match status {
        Status::Running => "running",
        Status::Done => "done",
        Status::Failed => "failed",
    }
}

/// `sha256:0123456789ab`: enough of a digest to tell images apart.
fn short_digest(digest: &str) -> String {
    digest.chars().take("sha256:".len() + 12).collect()
}

/// `hello-2.12.1` of `/nix/store/<hash>-hello-2.12.1`.
fn store_name(path: &str) -> &str {
    path.strip_prefix("/nix/store/")
        .and_then(|rest| rest.get(33..))
        .unwrap_or(path)
}

/// The last lines of Nix's log, as much as a page shows.
fn log_tail(log: &str) -> String {
    const LINES: usize = 40;
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LINES)..].join("\n")
}

/// `just now`, `5 min ago`, `3 h ago`, `2 days ago`.
fn ago(now: SystemTime, then: SystemTime) -> String {
    let seconds = now.duration_since(then).map_or(0, |d| d.as_secs());
    match seconds {
        0..60 => "just now".to_owned(),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86400 => format!("{} h ago", seconds / 3600),
        _ => format!("{} days ago", seconds / 86400),
    }
}
