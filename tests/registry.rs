//! The registry API, driven through the real server with real nix-build on the offline package
//! set: every route, errors, determinism, layer sharing, caches across restarts, and one build
//! for concurrent pulls.

mod common;

use std::collections::HashSet;
use std::io::Read;

use common::{Server, client, pull, raw_get, registry_error, sha256};

#[tokio::test]
async fn base_route_announces_the_api_version() {
    let server = Server::start();
    let response = client().get(server.url("/v2/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
}

#[tokio::test]
async fn an_image_is_built_and_every_blob_matches_its_digest() {
    let server = Server::start();
    let image = pull(&server, "shell/hello").await;
    assert_eq!(image.config["architecture"], "amd64");
    assert_eq!(image.config["os"], "linux");
    assert_eq!(image.config["config"]["Cmd"][0], "bash");
    let env: Vec<&str> = image.config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
    assert!(
        env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"),
        "{env:?}"
    );

    // Every layer: owner 0:0, and each entry's parent directory comes before it.
    for (digest, layer) in &image.layers {
        check_ownership_and_parents(digest, layer);
    }

    // The root layer (last) holds the symlink forest, /tmp and /usr/bin/env.
    let (_, root) = image.layers.last().unwrap();
    let entries = tar_entries(root);
    for expected in ["bin/hello", "bin/bash", "tmp", "usr/bin/env"] {
        assert!(
            entries.iter().any(|(n, _)| n == expected),
            "{expected} missing from {entries:?}"
        );
    }
    let tmp = entries.iter().find(|(n, _)| n == "tmp").unwrap();
    assert_eq!(tmp.1, 0o1777);

    // Every store path of the closure is in some layer, under nix/store.
    let store_entries: HashSet<String> = image.layers[..image.layers.len() - 1]
        .iter()
        .flat_map(|(_, bytes)| tar_entries(bytes))
        .map(|(name, _)| name)
        .collect();
    assert!(
        store_entries
            .iter()
            .any(|n| n.starts_with("nix/store/") && n.ends_with("/bin/hello"))
    );

    // HEAD answers the same headers with no body.
    let head = client()
        .head(server.url("/v2/shell/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["docker-content-digest"],
        image.digest.as_str()
    );
    let length = head.headers()["content-length"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(head.bytes().await.unwrap().is_empty());
    let get = client()
        .get(server.url("/v2/shell/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.bytes().await.unwrap().len().to_string(), length);

    let (layer, bytes) = &image.layers[0];
    let head = client()
        .head(server.url(&format!("/v2/shell/hello/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        bytes.len().to_string().as_str()
    );
    assert_eq!(head.headers()["docker-content-digest"], layer.as_str());
    assert!(head.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn manifests_are_served_by_digest() {
    let server = Server::start();
    let image = pull(&server, "hello").await;
    let response = client()
        .get(server.url(&format!("/v2/hello/manifests/{}", image.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        response.headers()["docker-content-digest"],
        image.digest.as_str()
    );
    let body = response.bytes().await.unwrap();
    assert_eq!(sha256(&body), image.digest);

    // A layer digest is not a manifest.
    let layer = &image.layers[0].0;
    let response = client()
        .get(server.url(&format!("/v2/hello/manifests/{layer}")))
        .send()
        .await
        .unwrap();
    let (status, code, _) = registry_error(response).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
}

#[tokio::test]
async fn unknown_packages_are_named_in_the_error() {
    let server = Server::start();
    let response = client()
        .get(server.url("/v2/shell/nosuchpackage/alsomissing/manifests/latest"))
        .send()
        .await
        .unwrap();
    let body = registry_error_body(response, 404).await;
    let error = &body["errors"][0];
    assert_eq!(error["code"], "MANIFEST_UNKNOWN");
    let message = error["message"].as_str().unwrap();
    let set = format!("in the package set {}", common::offline_pkgs().display());
    assert_eq!(
        message,
        format!("no packages \"alsomissing\" and \"nosuchpackage\" {set}")
    );
    assert_eq!(error["detail"]["reason"], "not_found");
    assert_eq!(
        error["detail"]["packages"],
        serde_json::json!(["alsomissing", "nosuchpackage"])
    );
}

#[tokio::test]
async fn a_failing_build_explains_itself_and_is_remembered_not_run_again() {
    let server = Server::start();
    let url = server.url("/v2/shell/failing/manifests/latest");
    let body = registry_error_body(client().get(&url).send().await.unwrap(), 404).await;
    let error = &body["errors"][0];
    assert_eq!(error["code"], "MANIFEST_UNKNOWN");
    let build_url = format!("http://{}/build/shell/failing", server.host());
    assert_eq!(
        error["message"],
        format!(
            "building shell/failing failed: builder for 'failing' failed with exit code 1; log: {build_url}"
        )
    );
    assert_eq!(error["detail"]["reason"], "build_failed");
    assert_eq!(error["detail"]["packages"], serde_json::json!(["failing"]));
    assert_eq!(error["detail"]["build_url"], build_url);
    // Counted as a failed build, for the operator's alerts.
    assert_eq!(server.metric("nixery_builds_total{outcome=\"failed\"}"), 1);
    let builds = (server.nix_builds(), server.evaluations());
    assert_eq!(builds.0, 1, "the first request ran nix-build");

    // Docker asks again with GET after a failed HEAD: the failure is answered from memory.
    let head = client().head(&url).send().await.unwrap();
    assert_eq!(head.status(), 404);
    let again = registry_error_body(client().get(&url).send().await.unwrap(), 404).await;
    assert_eq!(again, body);
    assert_eq!((server.nix_builds(), server.evaluations()), builds);
    assert_eq!(server.metric("nixery_builds_total{outcome=\"failed\"}"), 1);
    assert!(server.metric("nixery_builds_total{outcome=\"remembered_failure\"}") >= 1);
}

/// The JSON body of a registry error with `status`.
async fn registry_error_body(response: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.expect("error body is JSON")
}

#[tokio::test]
async fn bad_input_gets_registry_errors_and_starts_no_build() {
    let server = Server::start();
    let http = client();
    let cases = [
        ("/v2/Shell/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a//b/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/%22%24%7Bx%7D/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/nix/store/x;y/manifests/latest", 400, "NAME_INVALID"),
        // A reference that is neither a tag nor a digest names no manifest (distribution spec).
        ("/v2/hello/manifests/.bad", 404, "MANIFEST_UNKNOWN"),
        (
            "/v2/shell/hello/manifests/.INVALID",
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/hello/manifests/sha256:zzz", 404, "MANIFEST_UNKNOWN"),
        ("/v2/hello/blobs/sha512:abc", 400, "DIGEST_INVALID"),
        (
            "/v2/hello/blobs/sha256:..%2F..%2Fetc%2Fpasswd",
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/hello/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            404,
            "BLOB_UNKNOWN",
        ),
        ("/v2/hello/elsewhere/x", 404, "UNSUPPORTED"),
        ("/nothing-here", 404, "UNSUPPORTED"),
    ];
    for (path, want_status, want_code) in cases {
        let response = http.get(server.url(path)).send().await.unwrap();
        let (status, code, message) = registry_error(response).await;
        assert_eq!(
            (status, code.as_str()),
            (want_status, want_code),
            "{path}: {message}"
        );
    }
    // Paths a normalising client would never send.
    for path in [
        "/v2/a/../b/manifests/latest",
        "/v2/%2E%2E/manifests/latest",
        "/v2/hello/blobs/sha256:../../../etc/passwd",
    ] {
        let (status, body) = raw_get(&server, path);
        assert!(status == 400 || status == 404, "{path}: {status} {body}");
        assert!(body.contains("\"errors\""), "{path}: {body}");
    }
    let many = format!("/v2/{}/manifests/latest", vec!["a"; 1000].join("/"));
    let response = http.get(server.url(&many)).send().await.unwrap();
    assert_eq!(registry_error(response).await.1, "NAME_INVALID");
    // A 60 KiB name (longer than reqwest sends, so raw). hyper itself answers URIs of 64 KiB
    // and more with a bodyless 414 before any handler runs.
    let (status, body) = raw_get(
        &server,
        &format!("/v2/{}/manifests/latest", "a".repeat(60 * 1024)),
    );
    assert_eq!(status, 400, "{}", &body[..body.len().min(300)]);
    assert!(
        body.contains("NAME_INVALID"),
        "{}",
        &body[..body.len().min(300)]
    );
    for digest in [
        format!("sha256:{}", "a".repeat(63)),
        format!("sha256:{}", "a".repeat(65)),
        format!("sha256:{}", "g".repeat(64)),
        format!("md5:{}", "a".repeat(32)),
    ] {
        let response = http
            .get(server.url(&format!("/v2/hello/blobs/{digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            registry_error(response).await.1,
            "DIGEST_INVALID",
            "{digest}"
        );
    }
    // HEAD gets the same status, without a body.
    let head = http
        .head(server.url("/v2/shell/hello/manifests/.INVALID"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404);
    assert!(head.bytes().await.unwrap().is_empty());
    assert_eq!(server.nix_builds(), 0, "a bad name started nix-build");
    // The same server does build a good name: the count above can move.
    pull(&server, "hello").await;
    assert_eq!(server.nix_builds(), 1);
}

#[tokio::test]
async fn name_and_request_limits_are_where_the_readme_says() {
    let server = Server::start();
    let http = client();
    let status_and_code = |path: String| {
        let http = http.clone();
        let url = server.url(&path);
        async move { registry_error(http.get(url).send().await.unwrap()).await }
    };
    // 64 components pass validation and reach Nix (which finds no such packages); 65 do not.
    let names: Vec<String> = (0..65).map(|i| format!("p{i}")).collect();
    let (status, code, message) =
        status_and_code(format!("/v2/{}/manifests/latest", names[..64].join("/"))).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "MANIFEST_UNKNOWN"),
        "{message}"
    );
    assert!(
        message.starts_with("no packages \"p0\", \"p1\", ") && message.contains("\"p63\""),
        "{message}"
    );
    assert_eq!(server.nix_builds(), 1);
    let (status, code, message) =
        status_and_code(format!("/v2/{}/manifests/latest", names.join("/"))).await;
    assert_eq!((status, code.as_str()), (400, "NAME_INVALID"), "{message}");
    assert!(message.contains("65 components"), "{message}");
    // 255 bytes pass; 256 do not.
    let long = |len: usize| format!("/v2/{}/manifests/latest", "a".repeat(len));
    let (status, code, _) = status_and_code(long(255)).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    let (status, code, message) = status_and_code(long(256)).await;
    assert_eq!((status, code.as_str()), (400, "NAME_INVALID"), "{message}");
    // A request line of 64 KiB or more is refused by the HTTP layer, without a body.
    let (status, body) = raw_get(&server, &long(64 * 1024));
    assert_eq!(status, 414, "{}", &body[..body.len().min(300)]);
    assert!(body.is_empty(), "{}", &body[..body.len().min(300)]);
    assert_eq!(
        server.nix_builds(),
        2,
        "only the two valid names reached Nix"
    );
}

#[tokio::test]
async fn the_registry_is_read_only() {
    let server = Server::start();
    let http = client();
    for method in ["PUT", "POST", "PATCH", "DELETE"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        for path in ["/v2/hello/manifests/latest", "/v2/hello/blobs/uploads/"] {
            let response = http
                .request(method.clone(), server.url(path))
                .send()
                .await
                .unwrap();
            let (status, code, message) = registry_error(response).await;
            assert_eq!(
                (status, code.as_str()),
                (405, "UNSUPPORTED"),
                "{method} {path}"
            );
            assert!(message.contains("read-only"), "{message}");
        }
        // The index is a page: refused too, as a page.
        let response = http
            .request(method.clone(), server.url("/"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method} /");
    }
    assert_eq!(server.nix_builds(), 0);
}

#[tokio::test]
async fn names_resolve_camel_case_nested_and_digit_packages() {
    let server = Server::start();
    for name in [
        "bashinteractive",
        "xorg.xev",
        "haskellpackages.shellcheck",
        "1password",
    ] {
        let image = pull(&server, name).await;
        assert!(!image.layers.is_empty(), "{name}");
    }
}

#[tokio::test]
async fn the_same_request_gives_the_same_bytes() {
    let first = Server::start();
    let second = Server::start();
    let a = pull(&first, "shell/hello").await;
    let b = pull(&second, "hello/shell").await;
    assert_eq!(
        a.digest, b.digest,
        "separate builds gave different manifests"
    );
    assert_eq!(a.layers, b.layers);
    let c = pull(&first, "hello/shell/hello").await;
    assert_eq!(a.digest, c.digest, "duplicates changed the image");
}

#[tokio::test]
async fn images_share_the_layers_of_shared_dependencies() {
    let server = Server::start();
    let hello = pull(&server, "shell/hello").await;
    let curl = pull(&server, "shell/curl").await;
    let hello_layers: HashSet<String> = hello.layer_digests().into_iter().collect();
    let curl_layers: HashSet<String> = curl.layer_digests().into_iter().collect();
    let shared = hello_layers.intersection(&curl_layers).count();
    let new = curl_layers.difference(&hello_layers).count();
    assert!(
        shared >= 3,
        "only {shared} layers shared: {hello_layers:?} {curl_layers:?}"
    );
    assert!(
        new >= 2,
        "curl should add its own and a root layer, got {new}"
    );
    assert!(curl.manifest["layers"].as_array().unwrap().len() <= 96);
}

#[tokio::test]
async fn caches_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let server = Server::start_on(&storage, &[]);
    let before = pull(&server, "shell/hello").await;
    assert_eq!(server.nix_builds(), 1);
    server.stop();

    let server = Server::start_on(&storage, &[]);
    let after = pull(&server, "shell/hello").await;
    assert_eq!(after.digest, before.digest);
    assert_eq!(server.nix_builds(), 0, "the restarted server built again");
}

#[tokio::test]
async fn concurrent_identical_pulls_run_one_build() {
    let server = Server::start();
    let url = server.url("/v2/shell/curl/manifests/latest");
    let requests = (0..12).map(|_| {
        let url = url.clone();
        async move {
            let response = client().get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.headers()["docker-content-digest"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    });
    let digests: HashSet<String> = futures::future::join_all(requests)
        .await
        .into_iter()
        .collect();
    assert_eq!(digests.len(), 1);
    assert_eq!(server.nix_builds(), 1);
}

#[tokio::test]
async fn the_index_page_shows_this_host() {
    let server = Server::start();
    let response = client().get(server.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = response.text().await.unwrap();
    assert!(
        page.contains(&format!("docker pull {}/shell/hello", server.host())),
        "{page}"
    );
}

#[tokio::test]
async fn tags_list_names_latest() {
    let server = Server::start();
    let body: serde_json::Value = client()
        .get(server.url("/v2/shell/hello/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["name"], "shell/hello");
    assert_eq!(body["tags"][0], "latest");
}

#[test]
fn missing_settings_stop_start_up_with_a_message() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nixery"))
        .env_remove("NIXERY_PKGS_PATH")
        .env("STORAGE_PATH", "/tmp/unused")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("NIXERY_PKGS_PATH"), "{stderr}");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nixery"))
        .env("NIXERY_PKGS_PATH", "/nonexistent/pkgs")
        .env("STORAGE_PATH", "/tmp/unused")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("NIXERY_PKGS_PATH=/nonexistent/pkgs does not exist"),
        "{stderr}"
    );
}

/// Checks that every entry of the gzip-compressed tarball `blob` is owned by 0:0 and that its
/// parent directory is an earlier entry (top-level entries have none).
fn check_ownership_and_parents(digest: &str, blob: &[u8]) {
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut tar)
        .unwrap();
    let mut seen_dirs = HashSet::new();
    let mut entries = 0;
    for entry in tar::Archive::new(&tar[..]).entries().unwrap() {
        let entry = entry.unwrap();
        let header = entry.header();
        let path = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_owned();
        assert_eq!(
            (header.uid().unwrap(), header.gid().unwrap()),
            (0, 0),
            "{path} in {digest}"
        );
        if let Some((parent, _)) = path.rsplit_once('/') {
            assert!(
                seen_dirs.contains(parent),
                "{path} comes before its parent in {digest}"
            );
        }
        if header.entry_type().is_dir() {
            seen_dirs.insert(path);
        }
        entries += 1;
    }
    assert!(entries > 0, "layer {digest} is empty");
}

/// Names and modes of a gzip-compressed tarball's entries.
fn tar_entries(blob: &[u8]) -> Vec<(String, u32)> {
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut tar)
        .unwrap();
    tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_end_matches('/')
                    .to_owned(),
                e.header().mode().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_cached_image_that_lost_a_blob_is_built_again() {
    let server = Server::start();
    let before = pull(&server, "hello").await;
    let (lost, _) = &before.layers[0];
    std::fs::remove_file(
        server
            .storage
            .join("blobs/sha256")
            .join(&lost["sha256:".len()..]),
    )
    .unwrap();

    let server = server.restart(&[]);
    let after = pull(&server, "hello").await;
    assert_eq!(after.digest, before.digest);
    assert_eq!(server.nix_builds(), 1, "the cache entry was trusted");
}

#[tokio::test]
async fn metrics_move_to_nixery_metrics_address_when_it_is_set() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{port}");
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_METRICS_ADDRESS", &address)],
    );
    pull(&server, "hello").await;
    let (status, _) = raw_get(&server, "/metrics");
    assert_eq!(status, 404, "metrics are still on the main port");
    let text = client()
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("nixery_nix_builds_total 1"), "{text}");
    assert!(
        text.contains(r#"nixery_builds_total{outcome="built"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn json_logs_give_cloud_logging_its_fields() {
    let server = Server::start();
    let server = server.restart(&[("NIXERY_LOG_FORMAT", "json")]);
    let response = client()
        .get(server.url("/v2/"))
        .header("user-agent", "nixery-test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The request line is written once the answer is sent.
    let line = server.logged_line("\"requestUrl\":\"/v2/\"");
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["severity"], "INFO");
    let request = &entry["httpRequest"];
    assert_eq!(request["requestMethod"], "GET");
    assert_eq!(request["status"], 200);
    assert_eq!(request["userAgent"], "nixery-test");
    assert_eq!(request["remoteIp"], "127.0.0.1");
    assert!(
        request["latency"].as_str().unwrap().ends_with('s'),
        "{line}"
    );
    // Every line is one JSON object.
    for line in server.log().lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}
