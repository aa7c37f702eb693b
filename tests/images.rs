//! Images people run anywhere, with real clients: `nonroot` images (docker and containerd run
//! them as uid 65532 with a writable home), declared images (`NIXERY_IMAGES`: each setting seen
//! by `docker run`, a malformed file refused at start-up and on SIGHUP, a new entry served
//! after SIGHUP, a missing package answered with a suggestion), and HSTS behind a TLS proxy.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, client, registry_error, require_containerd, require_docker, run};

/// `docker run --rm IMAGE ARGS…`: what it prints.
fn docker_run(image: &str, args: &[&str]) -> String {
    let mut all = vec!["run", "--rm", image];
    all.extend_from_slice(args);
    run("docker", &all)
}

/// The image config docker shows for `image`.
fn docker_config(image: &str) -> serde_json::Value {
    let inspect = run(
        "docker",
        &["image", "inspect", "--format", "{{json .Config}}", image],
    );
    serde_json::from_str(&inspect).unwrap()
}

#[test]
fn a_nonroot_image_runs_as_65532_with_a_writable_home_in_docker_and_containerd() {
    require_docker();
    require_containerd();
    let server = Server::start();
    let image = format!("{}/nonroot/shell/hello", server.host());
    run("docker", &["pull", &image]);
    assert_eq!(docker_run(&image, &["id", "-u"]), "65532\n");
    let written = docker_run(
        &image,
        &[
            "bash",
            "-c",
            "echo written > $HOME/file && cat $HOME/file && pwd && id -gn && stat -c '%u:%g %a' $HOME && stat -c '%u:%g' /nix/store",
        ],
    );
    assert_eq!(written, "written\n/\nnonroot\n65532:65532 755\n0:0\n");
    let config = docker_config(&image);
    assert_eq!(config["User"], "65532:65532");
    let env = config["Env"].as_array().unwrap();
    assert!(env.iter().any(|v| v == "HOME=/home/nonroot"), "{env:?}");
    // The same packages as root are another image: its own root layer, the store layers shared.
    let plain = format!("{}/shell/hello", server.host());
    run("docker", &["pull", &plain]);
    assert_eq!(docker_run(&plain, &["id", "-u"]), "0\n");
    let layers = |image: &str| {
        let layers = run(
            "docker",
            &[
                "image",
                "inspect",
                "--format",
                "{{json .RootFS.Layers}}",
                image,
            ],
        );
        serde_json::from_str::<Vec<String>>(&layers).unwrap()
    };
    let (ours, theirs) = (layers(&image), layers(&plain));
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours[..ours.len() - 1], theirs[..theirs.len() - 1]);
    assert_ne!(ours.last(), theirs.last());
    run("docker", &["rmi", &image, &plain]);

    let namespace = format!("nixery-test-{}", server.port);
    let ctr = |args: &[&str]| common::ctr(&namespace, args);
    let reference = format!("{image}:latest");
    ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "native",
        &reference,
    ]);
    let container = format!("nonroot-{}", server.port);
    let id = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        &reference,
        &container,
        "id",
        "-u",
    ]);
    assert_eq!(id, "65532\n");
    ctr(&["images", "rm", &reference]);
}

const DECLARED: &str = "\
# Two images of the tests' own.
greeter:
  contents: [hello]
  user: \"1000:1000\"
  env: { GREETING: hi there, LANG: C.UTF-8 }
  entrypoint: [bash, -c, 'echo \"$GREETING from $(id -u) in $(pwd)\"; hello']
  workdir: /tmp
  labels: { org.example.team: tools }
tools/shell:
  contents: [nonroot, shell]
  cmd: [bash, -c, 'id -u; echo $HOME']
";

/// A server with `text` as its `NIXERY_IMAGES` file (`images.yaml` in `dir`).
fn declaring_server(dir: &tempfile::TempDir, text: &str) -> Server {
    let path = dir.path().join("images.yaml");
    std::fs::write(&path, text).unwrap();
    Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_IMAGES", path.to_str().unwrap())],
    )
}

#[test]
fn declared_images_are_served_with_their_config() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    // The greeter's contents have no bash; the entrypoint needs it.
    let text = DECLARED.replace("contents: [hello]", "contents: [shell, hello]");
    let server = declaring_server(&dir, &text);
    let greeter = format!("{}/greeter", server.host());
    run("docker", &["pull", &greeter]);
    assert_eq!(
        docker_run(&greeter, &[]),
        "hi there from 1000 in /tmp\nHello, world!\n"
    );
    let config = docker_config(&greeter);
    assert_eq!(config["User"], "1000:1000");
    assert_eq!(config["WorkingDir"], "/tmp");
    assert_eq!(config["Labels"]["org.example.team"], "tools");
    assert!(
        config["Labels"]["nixery.packages"]
            .as_str()
            .unwrap()
            .contains("hello")
    );
    let env = config["Env"].as_array().unwrap();
    assert!(env.iter().any(|v| v == "LANG=C.UTF-8"), "{env:?}");
    assert!(
        env.iter().any(|v| v.as_str().unwrap().starts_with("PATH=")),
        "{env:?}"
    );
    // No `bash` appended to the entrypoint.
    assert!(config["Cmd"].is_null(), "{config}");

    let shell = format!("{}/tools/shell", server.host());
    run("docker", &["pull", &shell]);
    assert_eq!(docker_run(&shell, &[]), "65532\n/home/nonroot\n");
    run("docker", &["rmi", &greeter, &shell]);
}

/// The digest `server` answers for `name:latest`.
async fn digest(server: &Server, name: &str) -> String {
    let response = client()
        .get(server.url(&format!("/v2/{name}/manifests/latest")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{name}: {}", server.log());
    response.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// Sends SIGHUP to `server` and waits until `done()` says it took effect.
async fn hangup<F: Future<Output = bool>>(server: &Server, done: impl Fn() -> F) {
    run("kill", &["-HUP", &server.pid().to_string()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "SIGHUP had no effect:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status `server` answers for the manifest of `name:latest`.
async fn manifest_status(server: &Server, name: &str) -> u16 {
    let url = server.url(&format!("/v2/{name}/manifests/latest"));
    client().head(url).send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn sighup_serves_a_changed_file_and_keeps_the_old_one_when_it_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let server = declaring_server(&dir, DECLARED);
    let path = dir.path().join("images.yaml");
    let greeter = digest(&server, "greeter").await;
    let shell = digest(&server, "tools/shell").await;
    // Not declared yet: the name reads as a package path, and there is no such package.
    let response = client()
        .get(server.url("/v2/newcomer/manifests/latest"))
        .send()
        .await
        .unwrap();
    let (status, code, _) = registry_error(response).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));

    // A new entry, and a change to one entry's env: a new image for it, the other untouched.
    let changed = format!(
        "{}newcomer:\n  contents: [hello]\n",
        DECLARED.replace("GREETING: hi there", "GREETING: hello there")
    );
    std::fs::write(&path, changed).unwrap();
    hangup(&server, || async {
        manifest_status(&server, "newcomer").await == 200
    })
    .await;
    digest(&server, "newcomer").await;
    assert_eq!(
        server.metric(r#"nixery_reloads_total{file="images",outcome="read"}"#),
        1
    );
    assert_ne!(digest(&server, "greeter").await, greeter);
    assert_eq!(digest(&server, "tools/shell").await, shell);
    // Declared `hello` is the same image as the path `hello`.
    assert_eq!(
        digest(&server, "newcomer").await,
        digest(&server, "hello").await
    );

    // A malformed file is refused with its line, and what was declared stays.
    std::fs::write(&path, "newcomer:\n  contents: [hello]\n  colour: red\n").unwrap();
    // The refusal is counted, and told to the operator in a log line that names the line and
    // key (the operator's message, as at start-up).
    let refused = r#"nixery_reloads_total{file="images",outcome="refused"}"#;
    assert_eq!(server.metric(refused), 0);
    hangup(&server, || async { server.metric(refused) == 1 }).await;
    let line = server.logged_line("line 3");
    assert!(line.contains("colour"), "{line}");
    digest(&server, "newcomer").await;
    assert_eq!(digest(&server, "tools/shell").await, shell);
}

/// The digest `server` answers for `name:reference`.
async fn digest_at(server: &Server, name: &str, reference: &str) -> String {
    let (_, digest, _) = common::manifest_as(
        server,
        name,
        reference,
        "application/vnd.docker.distribution.manifest.v2+json",
    )
    .await;
    digest
}

#[tokio::test]
async fn a_declared_name_wins_over_the_path_and_tags_keep_their_meaning() {
    let repo = common::repo::PkgsRepo::create();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("images.json");
    // `curl` is a package of the set too: the declaration wins.
    std::fs::write(
        &path,
        r#"{"greeting": {"contents": ["hello"]}, "curl": {"contents": ["hello"]}}"#,
    )
    .unwrap();
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[
            ("NIXERY_PKGS_PATH", ""),
            ("NIXERY_PKGS_REPO", repo.path.to_str().unwrap()),
            ("NIXERY_IMAGES", path.to_str().unwrap()),
        ],
    );
    for tag in ["v1", "latest", repo.second.as_str()] {
        let hello = digest_at(&server, "hello", tag).await;
        assert_eq!(digest_at(&server, "greeting", tag).await, hello, "{tag}");
        assert_eq!(digest_at(&server, "curl", tag).await, hello, "{tag}");
    }
    // v1 is the first commit, whose hello differs from the second's.
    assert_ne!(
        digest_at(&server, "greeting", "v1").await,
        digest_at(&server, "greeting", "latest").await
    );
}

#[test]
fn a_malformed_file_stops_start_up_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("images.yaml");
    std::fs::write(
        &path,
        "good:\n  contents: [hello]\nbad:\n  contents: [hello\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .env("NIXERY_PKGS_PATH", common::offline_pkgs())
        .env("STORAGE_PATH", dir.path().join("storage"))
        .env("NIXERY_IMAGES", &path)
        .env("PORT", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("NIXERY_IMAGES=") && stderr.contains("line 5"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_declared_image_with_a_missing_package_gets_the_registry_error_and_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let server = declaring_server(&dir, "mine:\n  contents: [shell, helo]\n");
    common::search_ready(&server, "q=hello").await;
    let response = client()
        .get(server.url("/v2/mine/manifests/latest"))
        .send()
        .await
        .unwrap();
    let (status, code, message) = registry_error(response).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    assert!(
        message.contains("no package \"helo\"") && message.contains("did you mean \"hello\"?"),
        "{message}"
    );
}

#[tokio::test]
async fn behind_a_tls_proxy_answers_carry_hsts_and_pages_over_http_move_to_https() {
    let server = Server::start();
    let get = |path: &str, proto: Option<&str>| {
        let mut request = client().get(server.url(path));
        if let Some(proto) = proto {
            request = request.header("x-forwarded-proto", proto);
        }
        request.header("host", "registry.example").send()
    };
    // Without the header (no proxy): no HSTS, no redirect.
    for path in ["/", "/v2/", "/search?q=hello"] {
        let response = get(path, None).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(
            response
                .headers()
                .get("strict-transport-security")
                .is_none(),
            "{path}"
        );
    }
    // Over https through the proxy: HSTS on every answer, errors included.
    for (path, status) in [
        ("/", 200),
        ("/v2/", 200),
        ("/search?q=hello", 200),
        ("/v2/nothing-here/tags/x", 404),
    ] {
        let response = get(path, Some("https")).await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(
            response.headers()["strict-transport-security"],
            "max-age=604800",
            "{path}"
        );
    }
    // Over plain http through the proxy: pages move to https on the same host…
    for path in ["/", "/search?q=hello", "/build/shell/hello"] {
        let response = get(path, Some("http")).await.unwrap();
        assert_eq!(response.status(), 308, "{path}");
        assert_eq!(
            response.headers()["location"],
            format!("https://registry.example{path}").as_str()
        );
        assert_eq!(
            response.headers()["strict-transport-security"],
            "max-age=604800"
        );
    }
    // …and the registry, API and health routes answer as they are, so http pulls still work.
    for path in [
        "/v2/",
        "/v2/shell/hello/manifests/latest",
        "/api/v1/packages?q=hello",
        "/healthz",
    ] {
        let response = get(path, Some("http")).await.unwrap();
        assert_ne!(response.status(), 308, "{path}");
        assert!(
            response.status().is_success() || response.status() == 503,
            "{path}: {}",
            response.status()
        );
        assert_eq!(
            response.headers()["strict-transport-security"],
            "max-age=604800",
            "{path}"
        );
    }
}
