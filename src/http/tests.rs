//! The router driven with `oneshot`, without a socket or Nix: a small in-memory image service
//! behind the same trait, real filesystem storage in a temporary directory. Error bodies,
//! headers, Range, the layers every response passes, and a fuzz of the whole router.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::routing::get;
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::ServiceExt;

use super::*;
use crate::AppState;
use crate::builder::events::{Described, Event, Progress, Run, RunKey};
use crate::builder::{BuildError, Image, Images, Index, PlatformFailure, Request};
use crate::image::{Platform, Platforms};
use crate::manifest::{ImageSettings, Layer};
use crate::nix::NixError;
use crate::source::{Origin, Settings};
use crate::storage::{Filesystem, StorageError};

/// One image, `hello`, with one layer whose bytes are in a file; every other name is unknown.
struct OneImage {
    image: Arc<Image>,
    config: Vec<u8>,
    layer: (Digest, PathBuf),
}

#[async_trait::async_trait]
impl Images for OneImage {
    async fn image(self: Arc<Self>, request: &Request) -> Result<Arc<Image>, Arc<BuildError>> {
        if request.name.packages() == &BTreeSet::from(["hello".to_owned()]) {
            Ok(self.image.clone())
        } else {
            let missing = request.name.packages().iter().cloned().collect();
            Err(Arc::new(BuildError::Nix(Arc::new(NixError::NotFound(
                missing,
            )))))
        }
    }

    fn start(self: Arc<Self>, request: &Request) -> Result<Arc<Run>, Arc<BuildError>> {
        let last = match self.build_of(request) {
            Some(run) => return Ok(run),
            None => Event::Failed {
                reason: "not_found",
                packages: request.name.packages().iter().cloned().collect(),
                message: "no such package".to_owned(),
                log: String::new(),
            },
        };
        Ok(Progress::finished_now(
            &key(request),
            described(request),
            last,
        ))
    }

    async fn index(
        self: Arc<Self>,
        request: &Request,
        platforms: &[Platform],
    ) -> Result<Arc<Index>, PlatformFailure> {
        let mut images = Vec::new();
        for &platform in platforms {
            let image = self
                .clone()
                .image(&request.for_platform(platform))
                .await
                .map_err(|err| PlatformFailure {
                    platform: Some(platform),
                    err,
                })?;
            images.push((image, platform));
        }
        Ok(Arc::new(Index::of(&images)))
    }

    /// `hello` is built; nothing else is.
    fn build_of(&self, request: &Request) -> Option<Arc<Run>> {
        (request.name.packages() == &BTreeSet::from(["hello".to_owned()])).then(|| {
            Progress::finished_now(
                &key(request),
                described(request),
                Event::Done {
                    digest: self.image.manifest(Format::Docker).digest.to_string(),
                    cached: Some("memory"),
                    layers: Vec::new(),
                },
            )
        })
    }

    fn recent_builds(&self, _n: usize) -> Vec<Arc<Run>> {
        Vec::new()
    }

    fn cancel_builds(&self) -> usize {
        0
    }

    async fn blob(&self, digest: &Digest, _head: bool) -> Result<Option<Served>, StorageError> {
        if let Some(manifest) = self.stored_manifest(digest).await? {
            return Ok(Some(Served::Manifest(manifest)));
        }
        let bytes = if digest == &self.layer.0 {
            std::fs::read(&self.layer.1).map_err(StorageError::io("reading a test blob"))?
        } else if digest == &Digest::of(&self.config) {
            self.config.clone()
        } else {
            return Ok(None);
        };
        let bytes = bytes::Bytes::from(bytes);
        let contents = crate::storage::Contents::new(bytes.len() as u64, move |start, len| {
            let part = bytes.slice(start as usize..(start + len) as usize);
            futures::stream::once(async move { Ok(part) }).boxed()
        });
        Ok(Some(Served::Blob(Blob::Stored(contents))))
    }

    async fn stored_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<Arc<Manifest>>, StorageError> {
        Ok([Format::Docker, Format::Oci]
            .into_iter()
            .map(|f| self.image.manifest(f))
            .find(|m| &m.digest == digest)
            .cloned())
    }

    /// The Docker manifest has one SPDX document; nothing else has referrers.
    async fn referrers(&self, digest: &Digest) -> Result<Vec<serde_json::Value>, StorageError> {
        let docker = self.image.manifest(Format::Docker);
        Ok(if digest == &docker.digest {
            let artifact = crate::manifest::artifact_manifest(
                crate::builder::SPDX,
                (&(Digest::of(b"{}"), 2), "sbom.spdx.json"),
                docker,
                &Default::default(),
            );
            crate::manifest::referrer_descriptor(&artifact)
                .into_iter()
                .collect()
        } else {
            Vec::new()
        })
    }

    async fn sbom(
        &self,
        _digest: &Digest,
        _artifact_type: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(None)
    }
}

fn key(request: &Request) -> RunKey {
    RunKey::new(&request.pin, &request.name, request.platform)
}

fn described(request: &Request) -> Described {
    Described {
        image: request.name_alone(),
        tag: request.tag.to_string(),
        package_set: "the test set".to_owned(),
        platform: request.platform.to_string(),
    }
}

/// The router over [`OneImage`], storage and a path source in `dir`, and the image's digests:
/// (docker manifest, oci manifest, config, layer).
pub(crate) fn app(dir: &Path) -> (Router, [Digest; 4]) {
    app_with(dir, 100, "")
}

/// [`app`] allowing `event_streams` event streams at once, with `NIXERY_PLATFORMS` set to
/// `platforms`.
pub(crate) fn app_with(dir: &Path, event_streams: usize, platforms: &str) -> (Router, [Digest; 4]) {
    let layer_bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let layer_path = dir.join("layer");
    std::fs::write(&layer_path, &layer_bytes).unwrap();
    let layer = Layer {
        digest: Digest::of(&layer_bytes),
        diff_id: Digest::of(b"a tarball"),
        size: layer_bytes.len() as u64,
    };
    let docs = crate::manifest::image_documents(
        std::slice::from_ref(&layer),
        &ImageSettings {
            architecture: "amd64".into(),
            variant: None,
            ..Default::default()
        },
    );
    let image = Arc::new(Image::new(docs.docker, docs.oci));
    let digests = [
        image.manifest(Format::Docker).digest.clone(),
        image.manifest(Format::Oci).digest.clone(),
        Digest::of(&docs.config),
        layer.digest.clone(),
    ];
    let sources = crate::source::Sources::open(
        Settings {
            origin: Origin::Path(dir.to_path_buf()),
            ttl: std::time::Duration::from_secs(60),
            channel_url: String::new(),
            tarball_url: String::new(),
            keep: 1,
            fetch_timeout: std::time::Duration::from_secs(1),
            commit_pins: crate::source::CommitPins::Seen,
            allowed_commits: crate::source::AllowedCommits::none(),
            records: None,
        },
        &dir.join("sources"),
    )
    .unwrap();
    let storage: Arc<dyn crate::storage::Storage> =
        Arc::new(Filesystem::open(&dir.join("storage")).unwrap());
    let sources = Arc::new(sources);
    let catalogs = crate::catalog::Catalogs::new(
        storage.clone(),
        sources.clone(),
        Arc::new(crate::admission::Admission::new(1, 1, 30)),
        crate::catalog::CatalogSettings {
            system: "x86_64-linux".to_owned(),
            work_dir: dir.join("nix"),
            nix_env: crate::nix::NixEnv::new("", "", "", &dir.join("nix")),
            timeout: std::time::Duration::from_secs(1),
            path_ttl: std::time::Duration::from_secs(60),
            keep: std::num::NonZeroUsize::MIN,
        },
    );
    let state = AppState {
        images: Arc::new(OneImage {
            image,
            config: docs.config,
            layer: (layer.digest, layer_path),
        }),
        storage,
        sources,
        catalogs,
        event_streams: Arc::new(tokio::sync::Semaphore::new(event_streams)),
        metrics_here: true,
        platforms: Platforms::new("linux/amd64".parse().unwrap(), platforms).unwrap(),
        auth: None,
        declared: Arc::new(crate::image::declared::DeclaredImages::none()),
        trusted_proxies: Default::default(),
    };
    (router(state), digests)
}

/// Sends `request` and returns the status, headers and body.
pub(crate) async fn send(
    router: Router,
    request: axum::http::Request<Body>,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let response = router.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status, parts.headers, bytes)
}

pub(crate) async fn get_json(
    router: Router,
    path: &str,
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
    let (status, headers, body) = send(router, request).await;
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, headers, json)
}

#[tokio::test]
async fn a_panic_in_a_handler_is_a_registry_500_not_a_dropped_connection() {
    let router = serve_layers(Router::new().route(
        "/v2/boom",
        get(|| async {
            panic!("a handler panicked");
            #[allow(unreachable_code)]
            ""
        }),
    ));
    let (status, headers, body) = get_json(router.clone(), "/v2/boom").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(body["errors"][0]["code"], "UNKNOWN");
    // The router still answers afterwards.
    let (status, _, _) = get_json(router, "/v2/boom").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let router = metrics_router();
    let (status, headers, _) = get_json(router.clone(), "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], crate::metrics::CONTENT_TYPE);
    let (status, _, body) = get_json(router.clone(), "/v2/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], "UNSUPPORTED");
    let text = crate::metrics::encode();
    assert!(
        text.contains(r#"nixery_http_requests_total{route="metrics",method="GET",status="200"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"nixery_http_requests_total{route="base",method="GET",status="404"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn manifests_blobs_and_errors_without_nix() {
    let dir = tempfile::tempdir().unwrap();
    let (router, [docker, oci, config, layer]) = app(dir.path());

    let (status, headers, body) = get_json(router.clone(), "/v2/hello/manifests/latest").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["docker-content-digest"], docker.as_str());
    assert_eq!(headers[header::CONTENT_TYPE], crate::manifest::MANIFEST_V2);
    assert_eq!(body["layers"][0]["digest"], layer.as_str());

    // By digest, on both routes, each manifest with its own type.
    for (digest, media_type) in [
        (&docker, crate::manifest::MANIFEST_V2),
        (&oci, crate::manifest::OCI_MANIFEST),
    ] {
        for route in ["manifests", "blobs"] {
            let (status, headers, _) =
                get_json(router.clone(), &format!("/v2/x/{route}/{digest}")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers[header::CONTENT_TYPE], media_type);
        }
    }
    let (status, headers, _) = get_json(router.clone(), &format!("/v2/x/blobs/{config}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");

    // Range: a part, and one past the end.
    let request = axum::http::Request::get(format!("/v2/x/blobs/{layer}"))
        .header(header::RANGE, "bytes=10-19")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(router.clone(), request).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(headers[header::CONTENT_RANGE], "bytes 10-19/10000");
    assert_eq!(body.len(), 10);
    let request = axum::http::Request::get(format!("/v2/x/blobs/{layer}"))
        .header(header::RANGE, "bytes=20000-")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(router.clone(), request).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(headers[header::CONTENT_RANGE], "bytes */10000");
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["errors"][0]["code"], "RANGE_INVALID");

    // Unknown packages, and a reference that is neither a tag nor a digest.
    let (status, _, body) = get_json(router.clone(), "/v2/shell/nodjs/manifests/latest").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let (status, _, body) = get_json(router.clone(), "/v2/hello/manifests/.INVALID").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let request = axum::http::Request::head("/v2/hello/manifests/.INVALID")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(router, request).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.is_empty());
}

/// Files under `dir`, for checking that requests wrote nothing.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    found
}

/// Cases of the whole-router fuzz per run.
const FUZZ_CASES: u32 = 100_000;

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => Just(Method::GET),
        3 => Just(Method::HEAD),
        1 => prop_oneof![
            Just(Method::PUT),
            Just(Method::POST),
            Just(Method::DELETE),
            Just(Method::PATCH),
            Just(Method::OPTIONS),
        ],
    ]
}

/// Request paths: registry-shaped ones with hostile pieces, the image's own digests, and
/// anything at all.
fn path(digests: Vec<String>) -> impl Strategy<Value = String> {
    let component = prop_oneof![
        Just("hello".to_owned()),
        Just("shell".to_owned()),
        "[a-z0-9]{1,10}",
        "[a-zA-Z0-9._%-]{0,10}",
        Just("..".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("%2F".to_owned()),
        Just("a".repeat(300)),
    ];
    let reference = prop_oneof![
        Just("latest".to_owned()),
        prop::sample::select(digests),
        "[a-zA-Z0-9_.-]{0,140}",
        "sha256:[0-9a-fA-F]{60,66}",
        "[a-z0-9]{1,8}:[a-zA-Z0-9./%]{0,70}",
        "\\PC{0,20}",
    ];
    prop_oneof![
        8 => (
            prop::collection::vec(component.clone(), 0..8),
            prop_oneof![Just("manifests"), Just("blobs"), Just("tags")],
            reference,
            prop_oneof![Just(""), Just("?ns=example.org"), Just("?n=2&last=a"), Just("?n=x")],
        )
            .prop_map(|(components, kind, reference, query)| {
                let tail = if kind == "tags" { "list".to_owned() } else { reference };
                format!("/v2/{}/{kind}/{tail}{query}", components.join("/"))
            }),
        2 => (
            prop_oneof![
                Just("/build/"),
                Just("/api/v1/builds/"),
                Just("/api/v1/events/"),
                Just("/api/v1/"),
                Just("/static/"),
            ],
            prop::collection::vec(component, 0..4),
            prop_oneof![Just(String::new()), "\\PC{0,20}".prop_map(|t| format!(":{t}"))],
        )
            .prop_map(|(prefix, components, tag)| format!("{prefix}{}{tag}", components.join("/"))),
        1 => prop_oneof![
            Just("/".to_owned()),
            Just("/search".to_owned()),
            Just("/static/style.css".to_owned()),
            Just("/static/app.js".to_owned()),
            Just("/api/v1/builds".to_owned()),
            Just("/v2/".to_owned()),
            Just("/v2".to_owned()),
            Just("/healthz".to_owned()),
            Just("/readyz".to_owned()),
            Just("/metrics".to_owned()),
        ],
        1 => "/\\PC{0,80}",
    ]
}

fn accept() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(crate::manifest::OCI_MANIFEST.to_owned())),
        Just(Some(format!(
            "{}, {};q=0.5",
            crate::manifest::MANIFEST_V2,
            crate::manifest::OCI_MANIFEST
        ))),
        "[ -~]{0,60}".prop_map(Some),
    ]
}

fn range() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        2 => Just(None),
        1 => (0u64..20_000, 0u64..20_000).prop_map(|(a, b)| Some(format!("bytes={a}-{b}"))),
        1 => (0u64..20_000).prop_map(|a| Some(format!("bytes={a}-"))),
        1 => (0u64..20_000).prop_map(|a| Some(format!("bytes=-{a}"))),
        1 => "[ -~]{0,40}".prop_map(Some),
    ]
}

#[test]
fn the_whole_router_never_fails_on_input_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (router, digests) = app(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let storage = dir.path().join("storage");
    let before = files(&storage);
    let digests: Vec<String> = digests.iter().map(|d| d.to_string()).collect();
    let config = ProptestConfig {
        cases: FUZZ_CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    // Answers by status class, to show the fuzz reached every kind of answer.
    let tally = std::cell::RefCell::new([0usize; 6]);
    let result = runner.run(
        &(method(), path(digests), accept(), range()),
        |(method, path, accept, range)| {
            let Ok(uri) = path.parse::<Uri>() else {
                return Ok(());
            };
            let route = uri.path().to_owned();
            let mut request = axum::http::Request::builder()
                .method(method.clone())
                .uri(uri);
            for (name, value) in [(header::ACCEPT, accept), (header::RANGE, range)] {
                if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    request = request.header(name, value);
                }
            }
            let request = request.body(Body::empty()).unwrap();
            let (status, headers, body) = runtime.block_on(send(router.clone(), request));
            tally.borrow_mut()[usize::from(status.as_u16() / 100)] += 1;
            prop_assert!(!status.is_server_error(), "{method} {path}: {status}");
            let page = ["/build/", "/search", "/static/"]
                .iter()
                .any(|p| route.starts_with(p))
                || route == "/";
            if status.is_client_error() {
                if method == Method::HEAD {
                    prop_assert!(body.is_empty(), "HEAD {path}: a body");
                } else if page {
                    let html = String::from_utf8_lossy(&body);
                    prop_assert!(
                        headers[header::CONTENT_TYPE] == "text/html; charset=utf-8"
                            || html.starts_with('{'),
                        "{method} {path}: {:?}",
                        headers[header::CONTENT_TYPE]
                    );
                    prop_assert!(!html.contains("<script>"), "{method} {path}: {html}");
                } else {
                    prop_assert_eq!(&headers[header::CONTENT_TYPE], "application/json");
                    let json: serde_json::Value = serde_json::from_slice(&body)
                        .map_err(|e| TestCaseError::fail(format!("{method} {path}: {e}")))?;
                    prop_assert!(
                        json["errors"][0]["code"].is_string(),
                        "{method} {path}: {json}"
                    );
                }
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    let [_, _, ok, redirected, refused, failed] = *tally.borrow();
    eprintln!("router fuzz: {ok} 2xx, {redirected} 3xx, {refused} 4xx, {failed} 5xx");
    assert!(
        ok > 1000 && refused > 10_000,
        "the fuzz hardly reached the router: {ok} 2xx, {refused} 4xx"
    );
    // Nothing a request sent was written: storage holds what it held before.
    assert_eq!(files(&storage), before);
}

/// `GET /v2/<name>/manifests/latest` with `accept`: status, headers and body.
async fn manifest_accepting(
    router: Router,
    name: &str,
    accept: &str,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let request = axum::http::Request::get(format!("/v2/{name}/manifests/latest"))
        .header(header::ACCEPT, accept)
        .body(Body::empty())
        .unwrap();
    send(router, request).await
}

#[tokio::test]
async fn clients_that_accept_an_index_get_one_when_platforms_are_set() {
    use crate::manifest::{MANIFEST_LIST_V2, MANIFEST_V2, OCI_INDEX, OCI_MANIFEST};
    let dir = tempfile::tempdir().unwrap();
    let (router, [docker, oci, ..]) = app_with(dir.path(), 1, "linux/amd64,linux/arm64");
    let docker_client = format!("{MANIFEST_V2}, {MANIFEST_LIST_V2}, {OCI_MANIFEST}, {OCI_INDEX}");

    let (status, headers, body) = manifest_accepting(router.clone(), "hello", &docker_client).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], MANIFEST_LIST_V2);
    assert_eq!(headers["docker-content-digest"], Digest::of(&body).as_str());
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let platforms: Vec<&str> = list["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, ["amd64", "arm64"]);
    assert_eq!(list["manifests"][0]["digest"], docker.as_str());
    assert_eq!(list["manifests"][0]["mediaType"], MANIFEST_V2);

    let (_, headers, body) = manifest_accepting(
        router.clone(),
        "hello",
        &format!("{OCI_MANIFEST}, {OCI_INDEX}"),
    )
    .await;
    assert_eq!(headers[header::CONTENT_TYPE], OCI_INDEX);
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(index["manifests"][1]["digest"], oci.as_str());

    // No index for a client that accepts none, nor for a name that chooses its platform.
    for (name, accept) in [
        ("hello", MANIFEST_V2),
        ("hello", "*/*"),
        ("arm64/hello", docker_client.as_str()),
    ] {
        let (status, headers, _) = manifest_accepting(router.clone(), name, accept).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers["docker-content-digest"],
            docker.as_str(),
            "{name} {accept}"
        );
    }

    // A platform that fails is named, in the message and the detail.
    let (status, _, body) = manifest_accepting(router, "nodjs", &docker_client).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let message = error["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("linux/amd64: no package \"nodjs\""),
        "{message}"
    );
    assert_eq!(error["errors"][0]["detail"]["platform"], "linux/amd64");
}

#[tokio::test]
async fn without_platforms_a_docker_client_gets_the_manifest_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let (router, [docker, ..]) = app(dir.path());
    let accept = format!(
        "{}, {}",
        crate::manifest::MANIFEST_V2,
        crate::manifest::MANIFEST_LIST_V2
    );
    let (status, headers, _) = manifest_accepting(router, "hello", &accept).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["docker-content-digest"], docker.as_str());
}

/// The referrers API of the distribution spec 1.1
/// (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers>),
/// rule by rule.
#[tokio::test]
async fn the_referrers_api_follows_the_distribution_spec() {
    use crate::manifest::{OCI_INDEX, OCI_MANIFEST};
    let dir = tempfile::tempdir().unwrap();
    let (router, [docker, oci, ..]) = app(dir.path());
    let hex = docker.hex();

    // An image index of descriptors, each with its artifactType (and annotations).
    let (status, headers, index) =
        get_json(router.clone(), &format!("/v2/hello/referrers/{docker}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], OCI_INDEX);
    assert!(!headers.contains_key("oci-filters-applied"));
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], OCI_INDEX);
    let listed = index["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["mediaType"], OCI_MANIFEST);
    assert_eq!(listed[0]["artifactType"], crate::builder::SPDX);
    assert!(listed[0]["digest"].as_str().unwrap().starts_with("sha256:"));

    // Filtering by artifactType says so in OCI-Filters-Applied.
    for (query, count) in [
        ("artifactType=application/spdx%2Bjson", 1),
        ("artifactType=application/spdx+json", 1),
        ("artifactType=application/vnd.cyclonedx%2Bjson", 0),
    ] {
        let (status, headers, index) = get_json(
            router.clone(),
            &format!("/v2/hello/referrers/{docker}?{query}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{query}");
        assert_eq!(headers["oci-filters-applied"], "artifactType", "{query}");
        assert_eq!(
            index["manifests"].as_array().unwrap().len(),
            count,
            "{query}"
        );
    }

    // A manifest with no referrers, or unknown here, has an empty index, never a 404.
    for digest in [oci.clone(), Digest::of(b"nothing")] {
        let (status, headers, index) =
            get_json(router.clone(), &format!("/v2/hello/referrers/{digest}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], OCI_INDEX);
        assert_eq!(index["manifests"], serde_json::json!([]));
    }

    // A digest that is not one is a 400.
    let (status, _, body) = get_json(router.clone(), "/v2/hello/referrers/sha256:abc").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["errors"][0]["code"], "DIGEST_INVALID");

    // HEAD answers the same headers without a body.
    let request = axum::http::Request::head(format!("/v2/hello/referrers/{docker}"))
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(router.clone(), request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], OCI_INDEX);
    assert!(body.is_empty());
    let get_length = serde_json::to_vec(&index).unwrap().len();
    assert_eq!(
        headers[header::CONTENT_LENGTH],
        get_length.to_string().as_str()
    );

    // The referrers tag schema: the same index as a manifest, for clients without the API.
    let (status, headers, body) = send(
        router.clone(),
        axum::http::Request::get(format!("/v2/hello/manifests/sha256-{hex}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], OCI_INDEX);
    assert_eq!(headers["docker-content-digest"], Digest::of(&body).as_str());
    let tagged: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(tagged, index);
}
