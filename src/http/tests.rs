//! The router driven with `oneshot`, without a socket or Nix: a small in-memory image service
//! behind the same trait, real filesystem storage in a temporary directory. Error bodies,
//! headers, Range, the layers every response passes, and a fuzz of the whole router.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::get;
use futures::StreamExt;
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::ServiceExt;

use super::*;
use crate::builder::events::{Described, Event, Progress, Run, RunKey};
use crate::builder::{BuildError, Image, Images, Index, PlatformFailure, Request, Served};
use crate::image::{Platform, Platforms};
use crate::manifest::{Compression, Digest, Format, ImageSettings, Layer, Manifest};
use crate::nix::NixError;
use crate::source::{Origin, Settings};
use crate::state::AppState;
use crate::storage::{Blob, Filesystem, StorageError};

/// One image, `hello`, with one layer whose bytes are in a file (and its zstd twin, whose
/// layer is not served); every other name is unknown.
struct OneImage {
    image: Arc<Image>,
    zstd: Arc<Image>,
    config: Vec<u8>,
    layer: (Digest, PathBuf),
}

#[async_trait::async_trait]
impl Images for OneImage {
    async fn image(self: Arc<Self>, request: &Request) -> Result<Arc<Image>, Arc<BuildError>> {
        if request.name.packages() == &BTreeSet::from(["hello".to_owned()]) {
            Ok(match request.compression {
                Compression::Gzip => self.image.clone(),
                Compression::Zstd => self.zstd.clone(),
            })
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
        Ok(self
            .image
            .manifests()
            .chain(self.zstd.manifests())
            .find(|m| &m.digest == digest)
            .cloned())
    }

    /// The Docker manifest has one SPDX document; nothing else has referrers.
    async fn referrers(
        &self,
        _name: &str,
        digest: &Digest,
    ) -> Result<Vec<serde_json::Value>, StorageError> {
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

    /// Nothing is signed.
    async fn attachment(
        &self,
        _name: &str,
        _digest: &Digest,
        _attached: crate::builder::Attached,
    ) -> Result<Option<Arc<Manifest>>, StorageError> {
        Ok(None)
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
    RunKey::new(
        &request.pin,
        &request.name,
        request.platform,
        request.compression,
    )
}

fn described(request: &Request) -> Described {
    Described {
        image: request.name_alone(),
        tag: request.tag.to_string(),
        package_set: "the test set".to_owned(),
        platform: request.platform.to_string(),
        compression: request.compression.as_str(),
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
    let (state, digests) = state_with(dir, event_streams, platforms);
    (router(state), digests)
}

/// The state behind [`app_with`].
pub(crate) fn state_with(
    dir: &Path,
    event_streams: usize,
    platforms: &str,
) -> (AppState, [Digest; 4]) {
    let layer_bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let layer_path = dir.join("layer");
    std::fs::write(&layer_path, &layer_bytes).unwrap();
    let layer = Layer {
        digest: Digest::of(&layer_bytes),
        diff_id: Digest::of(b"a tarball"),
        size: layer_bytes.len() as u64,
    };
    let settings = ImageSettings {
        architecture: "amd64".into(),
        variant: None,
        ..Default::default()
    };
    let docs = crate::manifest::image_documents(
        std::slice::from_ref(&layer),
        &settings,
        Compression::Gzip,
    );
    let zstd = crate::manifest::image_documents(
        std::slice::from_ref(&layer),
        &settings,
        Compression::Zstd,
    );
    let image = Arc::new(Image::new(docs.docker.unwrap(), docs.oci));
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
            zstd: Arc::new(Image::zstd(zstd.oci)),
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
        layer_compression: Compression::Gzip,
        signer: None,
    };
    (state, digests)
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
    let router = serve_layers(
        Router::new().route(
            "/v2/boom",
            get(|| async {
                panic!("a handler panicked");
                #[allow(unreachable_code)]
                ""
            }),
        ),
        TrustedProxies::default(),
    );
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
    assert_eq!(
        headers[header::CONTENT_TYPE],
        crate::server::metrics::CONTENT_TYPE
    );
    let (status, _, body) = get_json(router.clone(), "/v2/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errors"][0]["code"], "UNSUPPORTED");
    let text = crate::server::metrics::encode();
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

/// Cases of the sequential whole-router fuzz per run (a failure is shrunk to a smallest case).
const FUZZ_CASES: u32 = 50_000;

/// Cases of the concurrent whole-router fuzz, and the most sent at once.
const CONCURRENT_CASES: usize = 20_000;
const IN_FLIGHT: usize = 128;

/// The user the fuzz's router with credentials knows, and its password.
const FUZZ_USER: &str = "fuzz";
const FUZZ_PASSWORD: &str = "right";

/// Put into headers and queries: it must never come back as markup.
const MARKER: &str = "<x-fuzz>";

/// The methods HTTP defines: any other is made up.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        8 => Just(Method::GET),
        6 => Just(Method::HEAD),
        2 => prop::sample::select(vec![
            Method::PUT,
            Method::POST,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
            Method::CONNECT,
            Method::TRACE,
        ]),
        // Any token is a method to HTTP.
        3 => prop_oneof![
            "[A-Z]{1,12}",
            "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,40}",
            Just("get".to_owned()),
            Just("M".repeat(2000)),
        ]
        .prop_filter_map("a token", |m| Method::from_bytes(m.as_bytes()).ok()),
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

/// A value in a query string: numbers in and out of range, names, hostile escapes, and a
/// few kilobytes.
fn query_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[0-9]{1,4}",
        prop::sample::select(vec![
            "-1",
            "0",
            "1",
            "100",
            "101",
            "99999999999999999999999",
            "1e3",
            "0x10",
            "latest",
            "nixos-unstable",
            "application/spdx%2Bjson",
            "application/spdx+json",
            "spdx",
            "cyclonedx",
            "%FF%FE",
            "%ZZ",
            "%00",
            "%",
            "%3Cx-fuzz%3E",
            "a+b",
            "%20%20",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z0-9._~-]{1,30}",
        "[a-zA-Z0-9%+/=;,:@!$'()*.~-]{0,40}",
        Just(format!("sha256-{}", "a".repeat(64))),
        Just("0123456789abcdef0123456789abcdef01234567".to_owned()),
        (1usize..5).prop_map(|k| "a".repeat(k * 1000)),
    ]
}

/// Up to five `key=value` pairs (or bare keys), keys from `keys` (repeated, too) or made up
/// (made-up keys start with `x`, so they are never a search's).
fn query(keys: Vec<&'static str>) -> impl Strategy<Value = String> {
    let key = prop_oneof![
        3 => prop::sample::select(keys).prop_map(str::to_owned),
        1 => "x[a-zA-Z0-9_.%-]{0,8}",
    ];
    prop::collection::vec((key, prop::option::of(query_value())), 0..6).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => format!("{key}={value}"),
                None => key,
            })
            .collect::<Vec<_>>()
            .join("&")
    })
}

/// A search's query. Unless `searches`, `q` is one a search refuses (absent, blank, too long):
/// a search that passes waits up to 3 s for the catalog, which the in-memory app never has, so
/// only the concurrent fuzz sends those.
fn search_query(searches: bool) -> BoxedStrategy<String> {
    let refused = prop_oneof![
        Just(None),
        Just(Some(String::new())),
        Just(Some("%20%20".to_owned())),
        Just(Some("a".repeat(201))),
    ];
    let (q, others) = if searches {
        (
            prop_oneof![1 => refused, 2 => query_value().prop_map(Some)].boxed(),
            vec!["q", "limit", "tag"],
        )
    } else {
        (refused.boxed(), vec!["limit", "tag"])
    };
    (q, query(others))
        .prop_map(|(q, rest)| match q {
            Some(q) => format!("q={q}&{rest}"),
            None => rest,
        })
        .boxed()
}

/// Every route that reads a query, and the others, with query strings.
fn query_path(digests: Vec<String>, searches: bool) -> impl Strategy<Value = String> {
    let image = || {
        prop_oneof![
            prop::sample::select(vec![
                "hello",
                "shell/hello",
                "hello:latest",
                "nodjs",
                "hello:sha256-aaa",
                "arm64/hello",
            ])
            .prop_map(str::to_owned),
            "[a-z0-9/:._-]{0,20}",
        ]
    };
    prop_oneof![
        search_query(searches).prop_map(|q| format!("/api/v1/packages?{q}")),
        search_query(searches).prop_map(|q| format!("/search?{q}")),
        query(vec!["image", "tag"]).prop_map(|q| format!("/api/v1/builds?{q}")),
        (image(), query(vec!["tag"])).prop_map(|(i, q)| format!("/api/v1/builds/{i}?{q}")),
        (image(), query(vec!["tag"])).prop_map(|(i, q)| format!("/api/v1/events/{i}?{q}")),
        (image(), query(vec!["format"])).prop_map(|(i, q)| format!("/api/v1/sbom/{i}?{q}")),
        (image(), query(vec!["n", "last"])).prop_map(|(i, q)| format!("/v2/{i}/tags/list?{q}")),
        (prop::sample::select(digests), query(vec!["artifactType"]))
            .prop_map(|(d, q)| format!("/v2/hello/referrers/{d}?{q}")),
        (
            prop::sample::select(vec![
                "/v2/",
                "/healthz",
                "/readyz",
                "/metrics",
                "/",
                "/build/hello"
            ]),
            query(vec!["q"]),
        )
            .prop_map(|(route, q)| format!("{route}?{q}")),
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

/// Values of one header, each with the kind the tally counts it under.
type Values = Vec<(&'static str, Vec<u8>)>;

/// A header value: one that means something to the server (`meaningful`, with their kinds),
/// garbage, empty, huge (kilobytes), or not UTF-8.
fn header_value(
    meaningful: Vec<(&'static str, Vec<u8>)>,
) -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    prop_oneof![
        3 => prop::sample::select(meaningful),
        2 => prop::collection::vec(0x20u8..0x7f, 0..60).prop_map(|v| ("garbage", v)),
        1 => Just(("empty", Vec::new())),
        1 => (1usize..5).prop_map(|k| ("huge", format!("{MARKER}, 10.0.0.1").repeat(k * 100).into_bytes())),
        1 => prop::collection::vec(proptest::arbitrary::any::<u8>(), 0..40).prop_map(|bytes| {
            // Bytes a header value may hold (no controls), at least one of them not ASCII.
            let bytes = bytes
                .into_iter()
                .map(|b| if b < 0x20 || b == 0x7f { b | 0x80 } else { b });
            ("non-UTF-8", std::iter::once(0xff).chain(bytes).collect())
        }),
    ]
}

/// A header: absent, once, or many times.
fn header(meaningful: Vec<(&'static str, String)>) -> impl Strategy<Value = Values> {
    let meaningful: Vec<(&'static str, Vec<u8>)> = meaningful
        .into_iter()
        .map(|(kind, value)| (kind, value.into_bytes()))
        .collect();
    prop_oneof![
        12 => Just(Vec::new()),
        4 => header_value(meaningful.clone()).prop_map(|v| vec![v]),
        1 => prop::collection::vec(header_value(meaningful), 2..30),
    ]
}

/// `Authorization: Basic` of `user_password`.
fn basic(user_password: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

/// The headers a client chooses that the server reads for who and where it is:
/// `Authorization`, `Host` and the proxy headers.
fn client_headers() -> impl Strategy<Value = Vec<(&'static str, Values)>> {
    let right = basic(format!("{FUZZ_USER}:{FUZZ_PASSWORD}").as_bytes());
    let authorization = [
        ("valid", right.clone()),
        ("valid", right.replacen("Basic", "basic", 1)),
        ("wrong", basic(format!("{FUZZ_USER}:wrong").as_bytes())),
        ("wrong", basic(format!("nobody:{FUZZ_PASSWORD}").as_bytes())),
        ("wrong", basic(b":")),
        ("wrong", basic(FUZZ_USER.as_bytes())),
        ("wrong", basic(&[0xff, b':', 0xfe])),
        ("wrong", "Basic !!!".to_owned()),
        ("wrong", "Basic".to_owned()),
        ("wrong", "Bearer token".to_owned()),
    ];
    let meaningful = |values: &[&str]| -> Vec<(&'static str, String)> {
        values
            .iter()
            .map(|v| ("meaningful", (*v).to_owned()))
            .collect()
    };
    (
        header(authorization.to_vec()),
        header(meaningful(&[
            "127.0.0.1:5000",
            "localhost",
            "registry.example",
            "[::1]:8080",
            "a<x-fuzz>b",
            "host:99999",
            "registry.example/path?x",
        ])),
        header(meaningful(&[
            "http",
            "https",
            "HTTP",
            "http, https",
            "https, http",
            " http ",
            "ws",
        ])),
        header(meaningful(&[
            "127.0.0.1",
            "203.0.113.7",
            "203.0.113.7, 10.0.0.1",
            "::1",
            "unknown",
            "1.2.3.4:5678",
            "[2001:db8::1]",
            "999.1.1.1",
            "127.0.0.2, 127.0.0.3, 127.0.0.4",
        ])),
        header(meaningful(&["registry.example", "a<x-fuzz>b", "a, b"])),
        header(meaningful(&["443", "-1", "99999999999"])),
        header(meaningful(&["for=203.0.113.7;proto=http", "for=\"[::1]\""])),
    )
        .prop_map(|(auth, host, proto, for_, fhost, port, forwarded)| {
            [
                ("authorization", auth),
                ("host", host),
                ("x-forwarded-proto", proto),
                ("x-forwarded-for", for_),
                ("x-forwarded-host", fhost),
                ("x-forwarded-port", port),
                ("forwarded", forwarded),
            ]
            .into_iter()
            .filter(|(_, values)| !values.is_empty())
            .collect()
        })
}

/// One request of the fuzz.
#[derive(Clone, Debug)]
struct Case {
    method: Method,
    path: String,
    accept: Option<String>,
    range: Option<String>,
    /// `Authorization`, `Host` and proxy headers, each value with its kind.
    headers: Vec<(&'static str, Values)>,
    /// Sent to the router that needs credentials (`NIXERY_AUTH_HTPASSWD`), else to the open one.
    needs_credentials: bool,
}

impl Case {
    /// The request, unless the path is no URI.
    fn request(&self) -> Option<axum::http::Request<Body>> {
        let uri = self.path.parse::<Uri>().ok()?;
        let mut request = axum::http::Request::builder()
            .method(self.method.clone())
            .uri(uri);
        for (name, value) in [(header::ACCEPT, &self.accept), (header::RANGE, &self.range)] {
            if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                request = request.header(name, value);
            }
        }
        for (name, values) in &self.headers {
            for (_, bytes) in values {
                if let Ok(value) = HeaderValue::from_bytes(bytes) {
                    request = request.header(*name, value);
                }
            }
        }
        request.body(Body::empty()).ok()
    }

    /// What the tally counts this case under.
    fn kinds(&self) -> Vec<String> {
        let mut kinds = vec![
            if STANDARD_METHODS.contains(&self.method.as_str()) {
                "method: standard".to_owned()
            } else {
                "method: made up".to_owned()
            },
            if self.needs_credentials {
                "router: needs credentials".to_owned()
            } else {
                "router: open".to_owned()
            },
        ];
        for (name, values) in &self.headers {
            let distinct: BTreeSet<&str> = values.iter().map(|(kind, _)| *kind).collect();
            kinds.extend(distinct.iter().map(|kind| format!("{name}: {kind}")));
            if values.len() > 1 {
                kinds.push(format!("{name}: many values"));
            }
        }
        if let Some((route, _)) = self.path.split_once('?') {
            let route = match route {
                "/api/v1/packages" | "/search" | "/api/v1/builds" => route,
                r if r.starts_with("/api/v1/builds/") => "/api/v1/builds/<image>",
                r if r.starts_with("/api/v1/events/") => "/api/v1/events/<image>",
                r if r.starts_with("/api/v1/sbom/") => "/api/v1/sbom/<image>",
                r if r.ends_with("/tags/list") => "/v2/<name>/tags/list",
                r if r.contains("/referrers/") => "/v2/<name>/referrers/<digest>",
                r if r.starts_with("/v2/") && r.len() > 4 => "/v2/<name>/manifests|blobs",
                _ => "other routes",
            };
            kinds.push(format!("query on {route}"));
        }
        kinds
    }

    /// Whether the first `Authorization` value is the user's.
    fn has_credentials(&self) -> bool {
        self.headers
            .iter()
            .find(|(name, _)| *name == "authorization")
            .and_then(|(_, values)| values.first())
            .is_some_and(|(kind, _)| *kind == "valid")
    }

    /// What every answer must be: no failure of the server's own (but storage or a catalog not
    /// ready where that is asked), a refusal of every made-up method, credentials required
    /// where they are, no body on HEAD, refusals as registry errors (or pages), redirects that
    /// say where, and nothing the client sent back as markup.
    fn check(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
        let uri = self.path.parse::<Uri>().unwrap_or_default();
        let route = uri.path();
        let method = &self.method;
        let fail = |what: String| {
            let headers: Vec<String> = self
                .headers
                .iter()
                .map(|(name, values)| {
                    let kinds: Vec<&str> = values.iter().map(|(kind, _)| *kind).collect();
                    format!("{name}: {kinds:?}")
                })
                .collect();
            let path: String = self.path.chars().take(300).collect();
            let method: String = method.as_str().chars().take(40).collect();
            let router = if self.needs_credentials {
                "needs credentials"
            } else {
                "open"
            };
            Err(format!(
                "{method} {path} ({router}; {headers:?}): {status}: {what}"
            ))
        };
        // Behind a TLS proxy, a page asked for over http is sent to https before anything else
        // (its method and credentials are looked at there).
        let to_https = status == StatusCode::PERMANENT_REDIRECT
            && headers
                .get(header::LOCATION)
                .is_some_and(|l| l.as_bytes().starts_with(b"https://"));
        let unavailable_here = ["/readyz", "/api/v1/packages", "/search"].contains(&route);
        if status.is_server_error()
            && !(status == StatusCode::SERVICE_UNAVAILABLE && unavailable_here)
        {
            return fail("a server error".into());
        }
        if !STANDARD_METHODS.contains(&method.as_str())
            && (status.is_success() || status.is_redirection())
            && !to_https
        {
            return fail("a made-up method was not refused".into());
        }
        if self.needs_credentials
            && route != "/healthz"
            && route != "/readyz"
            && !to_https
            && self.has_credentials() == (status == StatusCode::UNAUTHORIZED)
        {
            return fail("credentials were not checked".into());
        }
        if status == StatusCode::UNAUTHORIZED && !headers.contains_key(header::WWW_AUTHENTICATE) {
            return fail("a 401 without a challenge".into());
        }
        if *method == Method::HEAD && !body.is_empty() {
            return fail("a body on HEAD".into());
        }
        let page = ["/build/", "/search", "/static/"]
            .iter()
            .any(|p| route.starts_with(p))
            || route == "/";
        if (status.is_client_error() || status.is_server_error()) && *method != Method::HEAD {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let json = serde_json::from_slice::<serde_json::Value>(body).ok();
            let registry_error = content_type == "application/json"
                && json.is_some_and(|json| json["errors"][0]["code"].is_string());
            let page_answer = page && content_type == "text/html; charset=utf-8";
            if !(registry_error || page_answer) {
                return fail(format!(
                    "not a registry error: {content_type:?} {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ));
            }
        }
        if status.is_redirection() {
            let location = headers
                .get(header::LOCATION)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if location.is_empty() || location.contains(&b'<') {
                return fail(format!(
                    "a redirect to {:?}",
                    String::from_utf8_lossy(location)
                ));
            }
        }
        let marker = MARKER.as_bytes();
        if body.windows(marker.len()).any(|w| w == marker)
            || body.windows(8).any(|w| w == b"<script>")
        {
            return fail("markup from the request in the body".into());
        }
        Ok(())
    }
}

fn case(digests: Vec<String>, searches: bool) -> impl Strategy<Value = Case> {
    (
        method(),
        prop_oneof![3 => path(digests.clone()), 1 => query_path(digests, searches)],
        accept(),
        range(),
        client_headers(),
        prop::bool::weighted(0.25),
    )
        .prop_map(
            |(method, path, accept, range, headers, needs_credentials)| Case {
                method,
                path,
                accept,
                range,
                headers,
                needs_credentials,
            },
        )
}

/// The fuzz's two routers over one state (an open one, and one that needs [`FUZZ_USER`]'s
/// credentials), and the image's digests.
fn fuzz_routers(dir: &Path) -> ([Router; 2], Vec<String>) {
    let (state, digests) = state_with(dir, 100, "");
    let htpasswd = dir.join("htpasswd");
    let hash = bcrypt::hash(FUZZ_PASSWORD, 4).unwrap();
    std::fs::write(&htpasswd, format!("{FUZZ_USER}:{hash}\n")).unwrap();
    let auth = Arc::new(crate::server::auth::Auth::open(&htpasswd).unwrap());
    let needing = router(AppState {
        auth: Some(auth),
        ..state.clone()
    });
    let digests = digests.iter().map(|d| d.to_string()).collect();
    ([router(state), needing], digests)
}

/// How many cases of each kind were sent, and answers of each status.
#[derive(Default)]
struct Tally(std::collections::BTreeMap<String, usize>);

impl Tally {
    fn count(&mut self, case: &Case, status: Option<StatusCode>) {
        *self.0.entry("requests".into()).or_default() += 1;
        for kind in case.kinds() {
            *self.0.entry(kind).or_default() += 1;
        }
        let answer = match status {
            Some(status) => format!("answer: {}xx", status.as_u16() / 100),
            None => "not sent: the path is no URI".to_owned(),
        };
        *self.0.entry(answer).or_default() += 1;
        if let Some(status) = status.filter(StatusCode::is_server_error) {
            let uri = case.path.parse::<Uri>().unwrap_or_default();
            let route = uri.path();
            *self
                .0
                .entry(format!("answer: {status} on {route}"))
                .or_default() += 1;
        }
    }

    fn get(&self, key: &str) -> usize {
        self.0.get(key).copied().unwrap_or_default()
    }

    fn print(&self, title: &str) {
        eprintln!("{title}:");
        for (kind, count) in &self.0 {
            eprintln!("  {kind}: {count}");
        }
    }

    /// Checks the fuzz reached every kind of request and answer.
    fn assert_reached(&self) {
        for kind in [
            "method: made up",
            "router: needs credentials",
            "authorization: valid",
            "authorization: wrong",
            "host: huge",
            "x-forwarded-for: non-UTF-8",
            "x-forwarded-proto: many values",
            "query on /api/v1/packages",
            "query on /search",
            "query on /api/v1/builds",
            "query on /api/v1/builds/<image>",
            "query on /api/v1/events/<image>",
            "query on /api/v1/sbom/<image>",
            "query on /v2/<name>/tags/list",
            "query on /v2/<name>/referrers/<digest>",
            "answer: 2xx",
            "answer: 3xx",
            "answer: 4xx",
        ] {
            assert!(self.get(kind) > 0, "the fuzz sent no {kind}");
        }
    }
}

/// The `method` labels of `nixery_http_requests` outside the standard methods and `other`.
fn unbounded_method_labels() -> Vec<String> {
    crate::server::metrics::encode()
        .lines()
        .filter(|line| line.starts_with("nixery_http_requests_total{"))
        .filter_map(|line| line.split("method=\"").nth(1)?.split('"').next())
        .filter(|method| !STANDARD_METHODS.contains(method) && *method != "other")
        .map(|method| method.chars().take(40).collect())
        .collect()
}

#[test]
fn the_whole_router_never_fails_on_input_alone() {
    let dir = tempfile::tempdir().unwrap();
    let ([open, needing], digests) = fuzz_routers(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let storage = dir.path().join("storage");
    let before = files(&storage);
    let config = ProptestConfig {
        cases: FUZZ_CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let tally = std::cell::RefCell::new(Tally::default());
    let result = runner.run(&case(digests, false), |case| {
        let Some(request) = case.request() else {
            tally.borrow_mut().count(&case, None);
            return Ok(());
        };
        let router = if case.needs_credentials {
            needing.clone()
        } else {
            open.clone()
        };
        let (status, headers, body) = runtime.block_on(send(router, request));
        tally.borrow_mut().count(&case, Some(status));
        case.check(status, &headers, &body)
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let tally = tally.into_inner();
    tally.print("router fuzz, one request after the other");
    tally.assert_reached();
    assert!(
        tally.get("answer: 2xx") > 1000 && tally.get("answer: 4xx") > 10_000,
        "the fuzz hardly reached the router"
    );
    // Made-up methods did not become labels.
    let labels = unbounded_method_labels();
    assert!(labels.is_empty(), "method labels {labels:?}");
    // Nothing a request sent was written: storage holds what it held before.
    assert_eq!(files(&storage), before);
}

#[test]
fn the_whole_router_answers_hostile_requests_sent_at_once() {
    use proptest::strategy::ValueTree;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let (routers, digests) = fuzz_routers(dir.path());
    let storage = dir.path().join("storage");
    let before = files(&storage);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = case(digests, true);
    // Made first, so that sending them is not held back by making them.
    let cases: Vec<Case> = (0..CONCURRENT_CASES)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let under_way = Arc::new(AtomicUsize::new(0));
    let most_at_once = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let failures: Vec<String> = runtime.block_on(
        futures::stream::iter(cases)
            .map(|case| {
                let [open, needing] = routers.clone();
                let (tally, under_way, most_at_once) =
                    (tally.clone(), under_way.clone(), most_at_once.clone());
                tokio::spawn(async move {
                    let Some(request) = case.request() else {
                        tally.lock().unwrap().count(&case, None);
                        return None;
                    };
                    let router = if case.needs_credentials {
                        needing
                    } else {
                        open
                    };
                    let now = under_way.fetch_add(1, Ordering::SeqCst) + 1;
                    most_at_once.fetch_max(now, Ordering::SeqCst);
                    let (status, headers, body) = send(router, request).await;
                    under_way.fetch_sub(1, Ordering::SeqCst);
                    tally.lock().unwrap().count(&case, Some(status));
                    case.check(status, &headers, &body).err()
                })
            })
            .buffer_unordered(IN_FLIGHT)
            .filter_map(|joined| async move { joined.unwrap_or_else(|e| Some(e.to_string())) })
            .collect(),
    );
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    tally.print(&format!(
        "router fuzz, {IN_FLIGHT} at once (at most {} under way), in {:?}",
        most_at_once.load(Ordering::SeqCst),
        started.elapsed()
    ));
    assert!(
        failures.is_empty(),
        "{} of {CONCURRENT_CASES} answers were wrong, e.g.:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n\n")
    );
    tally.assert_reached();
    assert!(most_at_once.load(Ordering::SeqCst) > 1);
    let labels = unbounded_method_labels();
    assert!(labels.is_empty(), "method labels {labels:?}");
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

/// GET `path` with these `Accept` and `User-Agent` headers: the status, Content-Type and body.
async fn get_as(
    router: Router,
    path: &str,
    accept: &str,
    agent: &str,
) -> (StatusCode, String, serde_json::Value) {
    let request = axum::http::Request::get(path)
        .header(header::ACCEPT, accept)
        .header(header::USER_AGENT, agent)
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(router, request).await;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, content_type, json)
}

/// What Docker, containerd and containers/image send: both manifest families.
const EVERY_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

#[tokio::test]
async fn zstd_layers_go_to_clients_that_read_them_and_others_are_told_why() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _) = app(dir.path());
    let path = "/v2/zstd-layers/hello/manifests/latest";
    for agent in [
        "docker/27.1.1 go/go1.21.12 git-commit/cc13f95 os/linux arch/amd64",
        "docker/23.0.0 go/go1.19.5 os/linux arch/amd64",
        "containerd/1.6.20~ds1",
        "Go-http-client/1.1",
    ] {
        let (status, content_type, body) =
            get_as(router.clone(), path, EVERY_MANIFEST, agent).await;
        assert_eq!(status, StatusCode::OK, "{agent}");
        assert_eq!(content_type, crate::manifest::OCI_MANIFEST, "{agent}");
        assert_eq!(
            body["layers"][0]["mediaType"],
            crate::manifest::OCI_LAYER_TAR_ZSTD,
            "{agent}"
        );
    }
    let old_docker = "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 kernel/6.1.0-18-amd64 os/linux arch/amd64 UpstreamClient(Docker-Client/20.10.24+dfsg1 \\(linux\\))";
    let (status, _, body) = get_as(router.clone(), path, EVERY_MANIFEST, old_docker).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let error = &body["errors"][0];
    assert_eq!(error["code"], "MANIFEST_UNKNOWN");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("Docker 20.10.24"), "{message}");
    assert!(message.contains("drop `zstd-layers/`"), "{message}");
    assert!(message.contains("pull hello instead"), "{message}");
    assert_eq!(error["detail"]["reason"], "docker_without_zstd");

    let schema2 = crate::manifest::MANIFEST_V2;
    let (status, _, body) = get_as(router.clone(), path, schema2, "containerd/1.6.20").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("accepts no OCI manifest type"),
        "{message}"
    );
    assert_eq!(body["errors"][0]["detail"]["gzip_name"], "hello");

    // The gzip image is what it was for every client.
    let (status, content_type, body) = get_as(
        router.clone(),
        "/v2/hello/manifests/latest",
        EVERY_MANIFEST,
        old_docker,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, crate::manifest::MANIFEST_V2);
    assert_eq!(
        body["layers"][0]["mediaType"],
        crate::manifest::LAYER_TAR_GZIP
    );
}

#[tokio::test]
async fn a_zstd_default_gives_gzip_to_clients_that_cannot_read_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let (state, [docker, ..]) = state_with(dir.path(), 100, "");
    let router = router(AppState {
        layer_compression: Compression::Zstd,
        ..state
    });
    let path = "/v2/hello/manifests/latest";
    let (status, content_type, body) =
        get_as(router.clone(), path, EVERY_MANIFEST, "containerd/1.7.0").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, crate::manifest::OCI_MANIFEST);
    assert_eq!(
        body["layers"][0]["mediaType"],
        crate::manifest::OCI_LAYER_TAR_ZSTD
    );
    for (accept, agent) in [
        (EVERY_MANIFEST, "docker/20.10.24 go/go1.19.8"),
        (crate::manifest::MANIFEST_V2, "containerd/1.7.0"),
    ] {
        let request = axum::http::Request::get(path)
            .header(header::ACCEPT, accept)
            .header(header::USER_AGENT, agent)
            .body(Body::empty())
            .unwrap();
        let (status, headers, _) = send(router.clone(), request).await;
        assert_eq!(status, StatusCode::OK, "{agent}");
        assert_eq!(headers["docker-content-digest"], docker.as_str(), "{agent}");
    }
}
