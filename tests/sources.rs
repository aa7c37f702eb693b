//! Package sources on real parts: a git repository made from the offline package set, served as a
//! local path, a `file://` URL and by a real `git daemon` on 127.0.0.1; a nixpkgs-style channel
//! host (`<channel>/git-revision` behind a redirect, `{commit}.tar.gz` tarballs made by
//! `git archive`) that counts its requests and can be stopped; and a path source whose package
//! set reads a file outside its directory. Which commits a client may name
//! (`NIXERY_COMMIT_PINS`, `NIXERY_ALLOWED_COMMITS`) is checked on every route, across a restart
//! and a SIGHUP.

mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::repo::{FIRST_GREETING, PkgsRepo, SECOND_GREETING};
use common::{Background, Pulled, Server, client, pull_ref, registry_error, require_docker, run};

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until something accepts connections on `port`.
fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `git daemon` serving the repository's parent directory on 127.0.0.1; stopped when dropped.
struct GitDaemon {
    child: Child,
    url: String,
}

impl GitDaemon {
    fn start(repo: &PkgsRepo) -> GitDaemon {
        let port = free_port();
        let base = repo.path.parent().unwrap();
        let child = Command::new("git")
            .arg("daemon")
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon starts (apt-get install git)");
        wait_for_port(port, "git daemon");
        GitDaemon {
            child,
            url: format!("git://127.0.0.1:{port}/nixpkgs"),
        }
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// What the channel host serves, and what it was asked.
#[derive(Default)]
struct ChannelState {
    /// Channel name -> the text of its git-revision file.
    revisions: HashMap<String, String>,
    /// Commit -> the bytes of its tarball.
    tarballs: HashMap<String, Vec<u8>>,
    /// Channel name -> its packages.json.br.
    packages_json: HashMap<String, Vec<u8>>,
    revision_requests: usize,
    tarball_requests: usize,
}

/// A channel host laid out as nixos.org's: `/channels/<channel>/git-revision` redirects to
/// `/releases/<channel>/git-revision`; tarballs are `/tarballs/<commit>.tar.gz`. It runs on a
/// thread of its own (tests block on docker), and stops when dropped or [`Self::stop`]ped.
struct ChannelHost {
    server: Background,
    state: Arc<Mutex<ChannelState>>,
}

impl ChannelHost {
    fn start() -> ChannelHost {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::StatusCode;
        use axum::response::{IntoResponse, Redirect, Response};
        use axum::routing::get;

        type Shared = Arc<Mutex<ChannelState>>;
        async fn channel(UrlPath(name): UrlPath<String>) -> Redirect {
            Redirect::to(&format!("/releases/{name}/git-revision"))
        }
        async fn revision(State(state): State<Shared>, UrlPath(name): UrlPath<String>) -> Response {
            let mut state = state.lock().unwrap();
            state.revision_requests += 1;
            match state.revisions.get(&name) {
                Some(text) => text.clone().into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }
        async fn tarball(State(state): State<Shared>, UrlPath(file): UrlPath<String>) -> Response {
            let mut state = state.lock().unwrap();
            state.tarball_requests += 1;
            let commit = file.trim_end_matches(".tar.gz");
            match state.tarballs.get(commit) {
                Some(bytes) => bytes.clone().into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }

        async fn packages_json(
            State(state): State<Shared>,
            UrlPath(name): UrlPath<String>,
        ) -> Response {
            match state.lock().unwrap().packages_json.get(&name) {
                Some(bytes) => bytes.clone().into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }

        let state: Shared = Arc::default();
        let app = axum::Router::new()
            .route("/channels/{name}/packages.json.br", get(packages_json))
            .route("/channels/{name}/git-revision", get(channel))
            .route("/releases/{name}/git-revision", get(revision))
            .route("/tarballs/{file}", get(tarball))
            .with_state(state.clone());
        ChannelHost {
            server: Background::serve(app),
            state,
        }
    }

    fn set_channel(&self, name: &str, commit: &str) {
        let mut state = self.state.lock().unwrap();
        state
            .revisions
            .insert(name.to_owned(), format!("{commit}\n"));
    }

    fn set_tarball(&self, commit: &str, bytes: Vec<u8>) {
        self.state
            .lock()
            .unwrap()
            .tarballs
            .insert(commit.to_owned(), bytes);
    }

    /// Publishes `json` as the channel's packages.json.br.
    fn set_packages_json(&self, name: &str, json: &serde_json::Value) {
        let mut compressed = Vec::new();
        brotli::BrotliCompress(
            &mut json.to_string().as_bytes(),
            &mut compressed,
            &Default::default(),
        )
        .unwrap();
        self.state
            .lock()
            .unwrap()
            .packages_json
            .insert(name.to_owned(), compressed);
    }

    fn revision_requests(&self) -> usize {
        self.state.lock().unwrap().revision_requests
    }

    fn tarball_requests(&self) -> usize {
        self.state.lock().unwrap().tarball_requests
    }

    /// The server settings that follow `channel` on this host.
    fn settings(&self, channel: &str) -> Vec<(&'static str, String)> {
        vec![
            ("NIXERY_PKGS_PATH", String::new()),
            ("NIXERY_CHANNEL", channel.to_owned()),
            (
                "NIXERY_CHANNEL_URL",
                format!("http://127.0.0.1:{}/channels", self.port()),
            ),
            (
                "NIXERY_NIXPKGS_TARBALL_URL",
                format!(
                    "http://127.0.0.1:{}/tarballs/{{commit}}.tar.gz",
                    self.port()
                ),
            ),
        ]
    }

    fn port(&self) -> u16 {
        self.server.port
    }

    /// Stops serving: connections are refused from now on.
    fn stop(&mut self) {
        self.server.stop();
    }
}

/// A server on fresh storage with `settings` (string pairs) on top of the test defaults.
fn server_with(settings: &[(&str, String)]) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start_on(&dir.path().join("storage"), &env);
    (dir, server)
}

fn git_settings(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("NIXERY_PKGS_PATH", String::new()),
        ("NIXERY_PKGS_REPO", url.to_owned()),
    ]
}

/// The image's labels, from the config of `name:reference` pulled over HTTP.
async fn labels(server: &Server, name: &str, reference: &str) -> serde_json::Value {
    pull_ref(server, name, reference).await.config["config"]["Labels"].clone()
}

/// The registry error `GET /v2/<name>/manifests/<reference>` answers.
async fn manifest_error(server: &Server, name: &str, reference: &str) -> (u16, String, String) {
    let response = client()
        .get(server.url(&format!("/v2/{name}/manifests/{reference}")))
        .send()
        .await
        .unwrap();
    registry_error(response).await
}

/// Checks that pinning `commit` gives 404 MANIFEST_UNKNOWN saying the commit does not exist.
async fn assert_commit_does_not_exist(server: &Server, commit: &str) {
    let (status, code, message) = manifest_error(server, "hello", commit).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "MANIFEST_UNKNOWN"),
        "{message}"
    );
    assert!(
        message.contains(&format!("commit {commit} does not exist")),
        "{message}"
    );
}

/// Pulls `reference` of image `hello` with docker, runs `hello` and returns what it printed.
fn docker_hello(server: &Server, reference: &str) -> String {
    let image = format!("{}/hello:{reference}", server.host());
    run("docker", &["pull", "--quiet", &image]);
    let out = run(
        "docker",
        &["run", "--rm", "--network", "none", &image, "hello"],
    );
    run("docker", &["rmi", "--force", &image]);
    out.trim().to_owned()
}

/// Names of the entries of `dir` (none when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn a_git_server_gives_each_ref_its_commit_and_docker_sees_the_labels() {
    require_docker();
    let repo = PkgsRepo::create();
    let daemon = GitDaemon::start(&repo);
    let (_dir, server) = server_with(&git_settings(&daemon.url));

    let first = repo.first.as_str();
    let second = repo.second.as_str();
    for (reference, greeting) in [
        ("latest", SECOND_GREETING),
        ("v1", FIRST_GREETING),
        ("stable", FIRST_GREETING),
        ("both", FIRST_GREETING),
        (first, FIRST_GREETING),
        (second, SECOND_GREETING),
    ] {
        assert_eq!(
            docker_hello(&server, reference),
            greeting,
            "hello:{reference}"
        );
    }

    let image = format!("{}/shell/bashinteractive/hello:v1", server.host());
    run("docker", &["pull", "--quiet", &image]);
    let inspected = run(
        "docker",
        &["inspect", "--format", "{{json .Config.Labels}}", &image],
    );
    run("docker", &["rmi", "--force", &image]);
    let labels: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(labels["org.opencontainers.image.revision"], first);
    assert_eq!(
        labels["org.opencontainers.image.source"],
        daemon.url.as_str()
    );
    let packages: Vec<String> =
        serde_json::from_str(labels["nixery.packages"].as_str().unwrap()).unwrap();
    assert_eq!(
        packages,
        ["bashInteractive", "coreutils", "hello", "moreutils", "nano"]
    );
}

#[tokio::test]
async fn unknown_refs_commits_and_reserved_tags_are_manifest_unknown() {
    let repo = PkgsRepo::create();
    let url = format!("file://{}", repo.path.display());
    // Any commit may be named, so that one the repository lacks is asked of it.
    let mut settings = git_settings(&url);
    settings.push(("NIXERY_COMMIT_PINS", "any".to_owned()));
    let (_dir, server) = server_with(&settings);

    let (status, code, message) = manifest_error(&server, "hello", "no-such-branch").await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    assert!(
        message.contains("no-such-branch") && message.contains(&url),
        "{message}"
    );

    // A short hash is a ref, not a commit.
    let short = &repo.first[..12];
    let (status, _, message) = manifest_error(&server, "hello", short).await;
    assert_eq!(status, 404);
    assert!(
        message.contains(&format!("no tag or branch named '{short}'")),
        "{message}"
    );

    let missing = "0123456789abcdef0123456789abcdef01234567";
    assert_commit_does_not_exist(&server, missing).await;

    // A tag of the referrers tag schema names the documents attached to a manifest: the
    // registry answers their index (empty for this digest), and no build takes it as a tag.
    let reserved = format!("sha256-{}", "a".repeat(64));
    let index_type = "application/vnd.oci.image.index.v1+json";
    let (content_type, _, body) =
        common::manifest_as(&server, "hello", &reserved, index_type).await;
    assert_eq!(content_type, index_type);
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(index["manifests"], serde_json::json!([]));
    let response = common::client()
        .post(server.url("/api/v1/builds"))
        .json(&serde_json::json!({ "image": "hello", "tag": reserved }))
        .send()
        .await
        .unwrap();
    let (status, code, message) = common::registry_error(response).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    assert!(message.contains("reserved"), "{message}");

    // None of that built anything or left a tree behind.
    assert_eq!(server.nix_builds(), 0);
    assert_eq!(
        entries(&server.storage.join("sources/trees")),
        Vec::<String>::new()
    );
    // And the server still builds what exists.
    assert_eq!(
        labels(&server, "hello", "v1").await["org.opencontainers.image.revision"],
        repo.first.as_str()
    );
    assert_eq!(server.nix_builds(), 1);
}

#[tokio::test]
async fn tags_list_names_the_repository_tags_and_branches_with_paging() {
    let repo = PkgsRepo::create();
    let (_dir, server) = server_with(&git_settings(repo.path.to_str().unwrap()));
    let list = |query: &'static str| {
        let url = server.url(&format!("/v2/shell/hello/tags/list{query}"));
        async move {
            let response = client().get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let link = response
                .headers()
                .get("link")
                .map(|l| l.to_str().unwrap().to_owned());
            let body: serde_json::Value = response.json().await.unwrap();
            (body, link)
        }
    };
    let (body, link) = list("").await;
    assert_eq!(body["name"], "shell/hello");
    // `feature/x` is no valid image tag: it cannot be named, so it is not listed.
    assert_eq!(
        body["tags"],
        serde_json::json!(["both", "latest", "main", "stable", "v1"])
    );
    assert_eq!(link, None);

    let (body, link) = list("?n=2").await;
    assert_eq!(body["tags"], serde_json::json!(["both", "latest"]));
    assert_eq!(
        link.as_deref(),
        Some("</v2/shell/hello/tags/list?n=2&last=latest>; rel=\"next\"")
    );
    let (body, _) = list("?n=2&last=latest").await;
    assert_eq!(body["tags"], serde_json::json!(["main", "stable"]));

    let response = client()
        .get(server.url("/v2/shell/hello/tags/list?n=many"))
        .send()
        .await
        .unwrap();
    let (status, code, _) = registry_error(response).await;
    assert_eq!((status, code.as_str()), (400, "PAGINATION_NUMBER_INVALID"));
}

#[tokio::test]
async fn one_commit_gives_one_image_per_url_across_servers_and_restarts() {
    require_docker();
    let repo = PkgsRepo::create();
    let daemon = GitDaemon::start(&repo);
    let urls = [
        repo.path.display().to_string(),
        format!("file://{}", repo.path.display()),
        daemon.url.clone(),
    ];
    let mut configs = Vec::new();
    for url in &urls {
        let (_dir, server) = server_with(&git_settings(url));
        let image = pull_ref(&server, "shell/hello", &repo.first).await;
        assert_eq!(
            image.config["config"]["Labels"]["org.opencontainers.image.revision"],
            repo.first.as_str()
        );
        assert_eq!(
            pull_ref(&server, "shell/hello", &repo.second).await.config["config"]["Labels"]["org.opencontainers.image.revision"],
            repo.second.as_str()
        );
        assert_eq!(docker_hello(&server, "latest"), SECOND_GREETING, "{url}");

        // A second server on its own storage, and this one restarted: the same manifest.
        let (_other_dir, other) = server_with(&git_settings(url));
        assert_eq!(
            pull_ref(&other, "shell/hello", &repo.first).await.digest,
            image.digest
        );
        let builds = server.nix_builds();
        assert!(builds >= 2, "each commit was built: {builds}");
        let server = server.restart(
            &git_settings(url)
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
        );
        assert_eq!(
            pull_ref(&server, "shell/hello", &repo.first).await.digest,
            image.digest
        );
        assert_eq!(server.nix_builds(), 0, "the restarted server built again");
        assert_eq!(
            server.evaluations(),
            0,
            "the restarted server evaluated again"
        );
        configs.push(image);
    }

    // Through different URLs the same commit differs only in the source label: same layers,
    // and configs that are equal once that label is set aside.
    for image in &configs[1..] {
        assert_eq!(image.layer_digests(), configs[0].layer_digests());
        assert_ne!(image.digest, configs[0].digest);
        let strip = |config: &serde_json::Value| {
            let mut config = config.clone();
            config["config"]["Labels"]
                .as_object_mut()
                .unwrap()
                .remove("org.opencontainers.image.source");
            config
        };
        assert_eq!(strip(&image.config), strip(&configs[0].config));
    }
}

#[tokio::test]
async fn a_channel_moves_after_the_ttl_and_its_old_images_stay_pullable() {
    require_docker();
    let repo = PkgsRepo::create();
    let host = ChannelHost::start();
    host.set_channel("nixos-test", &repo.first);
    host.set_channel("nixos-other", &repo.second);
    host.set_tarball(&repo.first, repo.tarball(&repo.first));
    host.set_tarball(&repo.second, repo.tarball(&repo.second));
    let ttl = 8;
    let mut settings = host.settings("nixos-test");
    settings.push(("NIXERY_SOURCE_TTL", ttl.to_string()));
    // Any commit may be named, so that one the host lacks is asked of it.
    settings.push(("NIXERY_COMMIT_PINS", "any".to_owned()));
    let (_dir, server) = server_with(&settings);

    let started = Instant::now();
    let first = pull_ref(&server, "hello", "latest").await;
    let labels = &first.config["config"]["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.revision"],
        repo.first.as_str()
    );
    assert_eq!(
        labels["org.opencontainers.image.source"],
        format!("http://127.0.0.1:{}/channels/nixos-test", host.port())
    );
    for _ in 0..10 {
        assert_eq!(
            pull_ref(&server, "hello", "latest").await.digest,
            first.digest
        );
    }
    assert_eq!(host.revision_requests(), 1, "one resolution per TTL");

    // The channel moves: until the TTL has passed, `latest` stays where it was.
    host.set_channel("nixos-test", &repo.second);
    assert_eq!(
        pull_ref(&server, "hello", "latest").await.digest,
        first.digest
    );
    assert!(
        started.elapsed() < Duration::from_secs(ttl),
        "the test ran too slowly to check the TTL"
    );
    assert_eq!(host.revision_requests(), 1);
    tokio::time::sleep(Duration::from_secs(ttl) - started.elapsed() + Duration::from_millis(500))
        .await;
    let moved = pull_ref(&server, "hello", "latest").await;
    assert_ne!(moved.digest, first.digest);
    assert_eq!(
        moved.config["config"]["Labels"]["org.opencontainers.image.revision"],
        repo.second.as_str()
    );
    assert_eq!(host.revision_requests(), 2);
    assert_eq!(docker_hello(&server, "latest"), SECOND_GREETING);

    // The image pulled before the move is still there by digest.
    let by_digest = client()
        .get(server.url(&format!("/v2/hello/manifests/{}", first.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(by_digest.status(), 200);
    assert_eq!(docker_hello(&server, &repo.first), FIRST_GREETING);

    // Another channel by name, and tags that mean nothing here.
    assert_eq!(
        labels_of(&server, "nixos-other").await["org.opencontainers.image.source"],
        format!("http://127.0.0.1:{}/channels/nixos-other", host.port())
    );
    let (status, code, message) = manifest_error(&server, "hello", "nixos-missing").await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    assert!(message.contains("no channel 'nixos-missing'"), "{message}");
    let (status, code, message) = manifest_error(&server, "hello", "v1").await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    assert!(
        message.contains("nixos-test") && message.contains("40-character commit"),
        "{message}"
    );
    // Each commit's tarball was downloaded once.
    assert_eq!(host.tarball_requests(), 2);

    // A pinned commit the host has no tarball for does not exist.
    let missing = "0123456789abcdef0123456789abcdef01234567";
    assert_commit_does_not_exist(&server, missing).await;
    assert!(
        entries(&server.storage.join("sources/trees")).len() == 2,
        "a tree was left for the missing commit"
    );
}

async fn labels_of(server: &Server, reference: &str) -> serde_json::Value {
    labels(server, "hello", reference).await
}

#[tokio::test]
async fn twenty_concurrent_cold_pulls_download_the_tarball_once() {
    let repo = PkgsRepo::create();
    let host = ChannelHost::start();
    host.set_channel("nixos-test", &repo.second);
    host.set_tarball(&repo.second, repo.tarball(&repo.second));
    let (_dir, server) = server_with(&host.settings("nixos-test"));

    let pulls = (0..20).map(|_| {
        let url = server.url("/v2/shell/hello/manifests/latest");
        async move { client().get(url).send().await.unwrap() }
    });
    let responses = futures::future::join_all(pulls).await;
    let mut digests: Vec<String> = responses
        .iter()
        .map(|r| {
            assert_eq!(r.status(), 200);
            r.headers()["docker-content-digest"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    digests.dedup();
    assert_eq!(digests.len(), 1);
    assert_eq!(host.tarball_requests(), 1);
    assert_eq!(host.revision_requests(), 1);
    assert_eq!(server.nix_builds(), 1);
    assert_eq!(
        entries(&server.storage.join("sources/trees")),
        [repo.second.as_str()]
    );
}

#[tokio::test]
async fn a_channels_catalog_comes_from_its_packages_json_not_from_evaluating() {
    let repo = PkgsRepo::create();
    let host = ChannelHost::start();
    host.set_channel("nixos-test", &repo.first);
    host.set_tarball(&repo.first, repo.tarball(&repo.first));
    host.set_tarball(&repo.second, repo.tarball(&repo.second));
    host.set_packages_json(
        "nixos-test",
        &serde_json::json!({
            "version": 2,
            "packages": {
                "hello": { "pname": "hello", "version": "2.12.1",
                           "meta": { "description": "From packages.json" } },
                "onlyinthelist": { "pname": "onlyinthelist", "version": "1.0", "meta": {} }
            }
        }),
    );
    // Any commit may be named: the catalog of one the channel never was at is asked for below.
    let mut settings = host.settings("nixos-test");
    settings.push(("NIXERY_COMMIT_PINS", "any".to_owned()));
    let (_dir, server) = server_with(&settings);
    let found = common::search_ready(&server, "q=onlyinthelist").await;
    assert_eq!(found["packages"][0]["name"], "onlyinthelist", "{found}");
    let hello = common::search_ready(&server, "q=hello").await;
    assert_eq!(hello["packages"][0]["description"], "From packages.json");
    let made =
        |outcome: &str| server.metric(&format!("nixery_catalogs_total{{outcome=\"{outcome}\"}}"));
    assert_eq!((made("packages_json"), made("evaluated")), (1, 0));

    // A commit the channel is not at is evaluated: its list describes another release.
    let other = common::search_ready(&server, &format!("q=hello&tag={}", repo.second)).await;
    assert_eq!(other["packages"][0]["name"], "hello", "{other}");
    assert_ne!(other["packages"][0]["description"], "From packages.json");
    assert_eq!((made("packages_json"), made("evaluated")), (1, 1));
}

#[tokio::test]
async fn a_stopped_channel_host_serves_what_was_resolved_before_and_else_says_so() {
    let repo = PkgsRepo::create();
    let mut host = ChannelHost::start();
    host.set_channel("nixos-test", &repo.first);
    host.set_tarball(&repo.first, repo.tarball(&repo.first));
    let mut settings = host.settings("nixos-test");
    settings.push(("NIXERY_SOURCE_TTL", "1".to_owned()));
    let (_dir, server) = server_with(&settings);
    let before = pull_ref(&server, "hello", "latest").await;
    let (_fresh_dir, fresh) = server_with(&settings);

    host.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The TTL has passed and the host is gone: the commit resolved before still serves.
    assert_eq!(
        pull_ref(&server, "hello", "latest").await.digest,
        before.digest
    );
    // A server that never resolved the channel says the source cannot be reached.
    let (status, code, message) = manifest_error(&fresh, "hello", "latest").await;
    assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"), "{message}");
    assert!(
        message.contains("cannot be reached") && message.contains("nixos-test"),
        "{message}"
    );
    assert_eq!(fresh.nix_builds(), 0);
}

#[tokio::test]
async fn a_broken_tarball_leaves_nothing_behind_and_a_good_one_then_works() {
    let repo = PkgsRepo::create();
    let host = ChannelHost::start();
    let good = repo.tarball(&repo.first);
    host.set_channel("nixos-test", &repo.first);
    host.set_tarball(&repo.first, good[..good.len() / 2].to_vec());
    let (_dir, server) = server_with(&host.settings("nixos-test"));

    let (status, code, message) = manifest_error(&server, "hello", "latest").await;
    assert_eq!((status, code.as_str()), (502, "UNKNOWN"), "{message}");
    assert!(
        message.contains(&repo.first) && message.contains("not a complete tar"),
        "{message}"
    );
    let sources = server.storage.join("sources");
    assert_eq!(entries(&sources.join("trees")), Vec::<String>::new());
    assert_eq!(entries(&sources.join("tmp")), Vec::<String>::new());
    assert_eq!(server.nix_builds(), 0);

    // A tarball that unpacks but holds no package set.
    let foreign = {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("top")).unwrap();
        std::fs::write(dir.path().join("top/README"), "not nixpkgs").unwrap();
        let out = Command::new("tar")
            .args(["-cz", "-C", dir.path().to_str().unwrap(), "top"])
            .output()
            .unwrap();
        out.stdout
    };
    host.set_tarball(&repo.first, foreign);
    let (status, code, message) = manifest_error(&server, "hello", "latest").await;
    assert_eq!(
        (status, code.as_str()),
        (404, "MANIFEST_UNKNOWN"),
        "{message}"
    );
    assert!(message.contains("is not a Nix package set"), "{message}");
    assert_eq!(entries(&sources.join("trees")), Vec::<String>::new());

    host.set_tarball(&repo.first, good);
    let image = pull_ref(&server, "hello", "latest").await;
    assert_eq!(
        image.config["config"]["Labels"]["org.opencontainers.image.revision"],
        repo.first.as_str()
    );
    assert_eq!(entries(&sources.join("trees")), [repo.first.as_str()]);
    assert_eq!(entries(&sources.join("tmp")), Vec::<String>::new());
}

#[tokio::test]
async fn old_trees_are_removed_past_nixery_sources_keep() {
    let repo = PkgsRepo::create();
    let mut settings = git_settings(repo.path.to_str().unwrap());
    settings.push(("NIXERY_SOURCES_KEEP", "1".to_owned()));
    let (_dir, server) = server_with(&settings);
    let trees = server.storage.join("sources/trees");
    pull_ref(&server, "hello", &repo.first).await;
    assert_eq!(entries(&trees), [repo.first.as_str()]);
    pull_ref(&server, "hello", &repo.second).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while entries(&trees) != [repo.second.as_str()] {
        assert!(
            Instant::now() < deadline,
            "old tree still there: {:?}",
            entries(&trees)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The image of the removed tree is still served from its cache, without Nix.
    let builds = server.nix_builds();
    pull_ref(&server, "hello", &repo.first).await;
    assert_eq!(server.nix_builds(), builds);
}

#[tokio::test]
async fn a_path_source_follows_what_nix_evaluates_at_most_once_per_ttl() {
    // A package set whose `greeting` package reads a file of the set: a change there changes
    // the image, once Nix evaluates it again (at most once per TTL).
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("pkgs");
    common::copy_dir(&common::offline_pkgs(), &set.join("offline-pkgs"));
    let greeting = set.join("greeting.txt");
    std::fs::write(&greeting, "first").unwrap();
    std::fs::write(
        set.join("default.nix"),
        format!(
            r#"args:
let pkgs = import ./offline-pkgs args;
in pkgs // {{
  greeting = pkgs.runCommand "greeting" {{ text = builtins.readFile {greeting}; }} ''
    mkdir -p "$out/share"
    printf '%s' "$text" > "$out/share/greeting"
  '';
}}
"#,
            greeting = greeting.display()
        ),
    )
    .unwrap();
    let ttl = 8;
    let (_storage, server) = server_with(&[
        ("NIXERY_PKGS_PATH", set.display().to_string()),
        ("NIXERY_SOURCE_TTL", ttl.to_string()),
    ]);
    let evaluations = || server.evaluations();

    let started = Instant::now();
    let first = pull_ref(&server, "greeting", "latest").await;
    assert_eq!((evaluations(), server.nix_builds()), (1, 1));
    std::fs::write(&greeting, "second").unwrap();
    for _ in 0..5 {
        assert_eq!(
            pull_ref(&server, "greeting", "latest").await.digest,
            first.digest
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(ttl),
        "the test ran too slowly to check the TTL"
    );
    assert_eq!(
        (evaluations(), server.nix_builds()),
        (1, 1),
        "warm pulls ran Nix"
    );
    // Path images carry no revision or source label.
    assert_eq!(
        first.config["config"]["Labels"],
        serde_json::json!({ "nixery.packages": "[\"greeting\"]" })
    );

    tokio::time::sleep(Duration::from_secs(ttl) - started.elapsed() + Duration::from_millis(300))
        .await;
    let changed = pull_ref(&server, "greeting", "latest").await;
    assert_ne!(changed.digest, first.digest);
    assert_eq!((evaluations(), server.nix_builds()), (2, 2));
}

#[test]
fn exactly_one_source_must_be_set() {
    let start = |env: &[(&str, &str)]| {
        let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
            .env_remove("NIXERY_PKGS_PATH")
            .env_remove("NIXERY_CHANNEL")
            .env_remove("NIXERY_PKGS_REPO")
            .env("STORAGE_PATH", "/tmp/nixery-unused")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let none = start(&[("NIXERY_PKGS_PATH", "")]);
    assert!(none.contains("no package source"), "{none}");
    let two = start(&[
        ("NIXERY_PKGS_PATH", "/srv/pkgs"),
        ("NIXERY_CHANNEL", "nixos-unstable"),
    ]);
    assert!(
        two.contains("NIXERY_PKGS_PATH and NIXERY_CHANNEL are set together"),
        "{two}"
    );
}

/// Runs git in `repo` and returns what it printed, trimmed.
fn git(repo: &PkgsRepo, args: &[&str]) -> String {
    let mut all = vec![
        "-C",
        repo.path.to_str().unwrap(),
        "-c",
        "user.name=nixery tests",
        "-c",
        "user.email=tests@nixery.invalid",
    ];
    all.extend_from_slice(args);
    run("git", &all).trim().to_owned()
}

/// A new commit on top of `parent` with the same tree (the same package set), pointed at by no
/// branch or tag.
fn commit_on(repo: &PkgsRepo, parent: &str, message: &str) -> String {
    let tree = format!("{parent}^{{tree}}");
    git(repo, &["commit-tree", &tree, "-p", parent, "-m", message])
}

/// The commit an image was built from, as its labels say.
fn revision(image: &Pulled) -> String {
    image.config["config"]["Labels"]["org.opencontainers.image.revision"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Checks that `response` refuses `commit` as one this registry does not serve, saying how an
/// operator allows it.
async fn assert_not_served(response: reqwest::Response, commit: &str) -> String {
    let (status, code, message) = registry_error(response).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "MANIFEST_UNKNOWN"),
        "{message}"
    );
    assert!(
        message.contains(&format!("commit {commit} is not one this registry serves"))
            && message.contains("NIXERY_ALLOWED_COMMITS")
            && message.contains("NIXERY_COMMIT_PINS=any"),
        "{message}"
    );
    message
}

/// `GET /v2/<name>/manifests/<reference>`.
async fn get_manifest(server: &Server, name: &str, reference: &str) -> reqwest::Response {
    client()
        .get(server.url(&format!("/v2/{name}/manifests/{reference}")))
        .send()
        .await
        .unwrap()
}

/// What the server shows of fetching and evaluating: image lookups that missed every cache
/// (each then fetches its tree), trees fetched for builds, image evaluations.
fn fetched(server: &Server) -> (u64, u64, u64) {
    (
        server.metric("nixery_cache_lookups_total{level=\"miss\"}"),
        server.metric("nixery_build_phase_seconds_count{phase=\"source\"}"),
        server.metric("nixery_nix_evaluations_total"),
    )
}

#[tokio::test]
async fn a_commit_never_at_a_head_is_refused_on_every_route_before_anything_is_fetched() {
    let repo = PkgsRepo::create();
    // A commit of the repository that no branch or tag points at (`topic` is one past it).
    let hidden = commit_on(&repo, &repo.second, "never at a head");
    git(
        &repo,
        &["branch", "topic", &commit_on(&repo, &hidden, "tip")],
    );
    let url = format!("file://{}", repo.path.display());
    let (_dir, server) = server_with(&git_settings(&url));
    let http = client();
    let get = |path: String| http.get(server.url(&path)).send();

    let message = assert_not_served(get_manifest(&server, "hello", &hidden).await, &hidden).await;
    assert!(
        message.contains(&format!("a branch or tag of {url}")),
        "{message}"
    );
    for path in [
        format!("/v2/shell/hello/manifests/{hidden}"),
        format!("/api/v1/packages?q=hello&tag={hidden}"),
        format!("/api/v1/builds/hello:{hidden}"),
        format!("/api/v1/events/hello:{hidden}"),
        format!("/api/v1/sbom/hello:{hidden}"),
    ] {
        assert_not_served(get(path).await.unwrap(), &hidden).await;
    }
    let start = http
        .post(server.url("/api/v1/builds"))
        .json(&serde_json::json!({ "image": "hello", "tag": hidden }))
        .send()
        .await
        .unwrap();
    assert_not_served(start, &hidden).await;
    // The build page and its button.
    let page = format!("/build/hello:{hidden}");
    for response in [
        get(page.clone()).await.unwrap(),
        http.post(server.url(&page)).send().await.unwrap(),
    ] {
        assert_eq!(response.status(), 404);
        let html = response.text().await.unwrap();
        assert!(
            html.contains(&format!("commit {hidden} is not one this registry serves")),
            "{html}"
        );
    }

    // Nothing was fetched, evaluated or built for any of that.
    assert_eq!(fetched(&server), (0, 0, 0));
    assert_eq!(server.nix_builds(), 0);
    assert_eq!(
        entries(&server.storage.join("sources/trees")),
        Vec::<String>::new()
    );
    // A commit at a head is served, and the counters show its tree fetched and evaluated.
    assert_eq!(
        revision(&pull_ref(&server, "hello", &repo.second).await),
        repo.second
    );
    assert_eq!(fetched(&server), (1, 1, 1));
}

#[tokio::test]
async fn commits_seen_at_a_head_or_allowed_by_the_operator_are_served_after_a_restart() {
    let repo = PkgsRepo::create();
    let hidden = commit_on(&repo, &repo.second, "never at a head");
    let tip = commit_on(&repo, &hidden, "the topic's first tip");
    git(&repo, &["branch", "topic", &tip]);
    let url = format!("file://{}", repo.path.display());
    let tmp = tempfile::tempdir().unwrap();
    let allowed = tmp.path().join("allowed-commits");
    std::fs::write(&allowed, "# commits served though never at a head\n").unwrap();
    let mut settings = git_settings(&url);
    settings.push(("NIXERY_ALLOWED_COMMITS", allowed.display().to_string()));
    let env: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (_dir, server) = server_with(&settings);

    // `topic` is at `tip`: served; `hidden` is not.
    assert_eq!(revision(&pull_ref(&server, "hello", &tip).await), tip);
    assert_not_served(get_manifest(&server, "hello", &hidden).await, &hidden).await;

    // The branch moves on. A new server on the same storage serves `tip`, which it never saw at
    // a head itself, for an image not built before.
    let next = commit_on(&repo, &tip, "the topic's next tip");
    git(&repo, &["branch", "--force", "topic", &next]);
    let server = server.restart(&env);
    assert_eq!(revision(&pull_ref(&server, "shell/hello", &tip).await), tip);
    assert_not_served(get_manifest(&server, "hello", &hidden).await, &hidden).await;

    // Listed in NIXERY_ALLOWED_COMMITS, read again on SIGHUP: served.
    std::fs::write(
        &allowed,
        format!("# commits served though never at a head\n{hidden}  # a release candidate\n"),
    )
    .unwrap();
    run("kill", &["-HUP", &server.pid().to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_manifest(&server, "hello", &hidden).await.status() != 200 {
        assert!(
            Instant::now() < deadline,
            "SIGHUP had no effect:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(revision(&pull_ref(&server, "hello", &hidden).await), hidden);

    // With NIXERY_COMMIT_PINS=any, a server that never saw it serves it without a list.
    let mut any = git_settings(&url);
    any.push(("NIXERY_COMMIT_PINS", "any".to_owned()));
    let (_any_dir, any) = server_with(&any);
    let built = pull_ref(&any, "hello", &hidden).await;
    assert_eq!(revision(&built), hidden);

    // Back to `seen` on that storage: the image already stored is still served, without Nix;
    // another image of the commit is refused.
    let seen = git_settings(&url);
    let seen: Vec<(&str, &str)> = seen.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = any.restart(&seen);
    assert_eq!(
        pull_ref(&server, "hello", &hidden).await.digest,
        built.digest
    );
    assert_eq!((server.nix_builds(), server.evaluations()), (0, 0));
    assert_not_served(get_manifest(&server, "shell/hello", &hidden).await, &hidden).await;
}

#[tokio::test]
async fn a_channel_source_serves_the_commit_its_channel_is_at_and_refuses_others() {
    let repo = PkgsRepo::create();
    let host = ChannelHost::start();
    host.set_channel("nixos-test", &repo.first);
    host.set_tarball(&repo.first, repo.tarball(&repo.first));
    host.set_tarball(&repo.second, repo.tarball(&repo.second));
    let (_dir, server) = server_with(&host.settings("nixos-test"));

    // The channel was never at the second commit: refused, its tarball not downloaded.
    let message = assert_not_served(
        get_manifest(&server, "hello", &repo.second).await,
        &repo.second,
    )
    .await;
    let channel = format!("http://127.0.0.1:{}/channels/nixos-test", host.port());
    assert!(
        message.contains(&format!("the channel {channel}")),
        "{message}"
    );
    let search = client()
        .get(server.url(&format!("/api/v1/packages?q=hello&tag={}", repo.second)))
        .send()
        .await
        .unwrap();
    assert_not_served(search, &repo.second).await;
    assert_eq!(host.tarball_requests(), 0);
    assert_eq!(fetched(&server), (0, 0, 0));

    // The commit the channel is at, named by its hash, is served.
    assert_eq!(
        revision(&pull_ref(&server, "hello", &repo.first).await),
        repo.first
    );
    assert_eq!(host.tarball_requests(), 1);
}
