//! Build admission from the outside: `NIXERY_MAX_BUILDS` builds at once, the next ones queued
//! in order with their place in their events, and past `NIXERY_MAX_QUEUE` a 429 with
//! Retry-After, from the builds API and from the registry alike.

mod common;

use common::{Server, build_status, client, fault_pkgs, nonce, registry_error};

/// Starts the build of `image` through the API: the status code and the body.
async fn start(server: &Server, image: &str) -> (u16, serde_json::Value) {
    let response = client()
        .post(server.url("/api/v1/builds"))
        .json(&serde_json::json!({ "image": image }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").cloned();
    let body: serde_json::Value = response.json().await.unwrap();
    if status == 429 {
        assert_eq!(retry_after.unwrap(), "30", "{body}");
    }
    (status, body)
}

/// The phases of a build's events so far, with their text.
async fn events(server: &Server, image: &str) -> Vec<(String, String)> {
    let status = build_status(server, image).await;
    status["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let field = |name: &str| e[name].as_str().unwrap_or_default().to_owned();
            (field("phase"), field("text"))
        })
        .collect()
}

/// Waits until the build of `image` has ended; its status.
async fn finished(server: &Server, image: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let status = build_status(server, image).await;
        let status = status["status"].as_str().unwrap().to_owned();
        if status != "running" {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "{image} never ended");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn builds_past_the_limit_wait_in_order_and_past_the_queue_are_refused() {
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce);
    let server = Server::start().restart(&[
        ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
        ("NIXERY_MAX_BUILDS", "1"),
        ("NIXERY_MAX_QUEUE", "2"),
        ("NIX_TIMEOUT", "8"),
    ]);
    // `slow` never finishes: the one place is taken until NIX_TIMEOUT stops it.
    assert_eq!(start(&server, "slow").await.0, 202);
    let (status, _) = start(&server, "hello").await;
    assert_eq!(status, 202);
    let (status, _) = start(&server, "curl").await;
    assert_eq!(status, 202);
    assert_eq!(server.metric("nixery_build_queue_length"), 2);
    assert!(
        events(&server, "curl").await.contains(&(
            "queued".to_owned(),
            "number 2 of 2 waiting for a place".to_owned()
        )),
        "{:?}",
        events(&server, "curl").await
    );

    // The queue is full: a new build is refused, by the API and by the registry.
    let (status, body) = start(&server, "nano").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
    let response = client()
        .get(server.url("/v2/moreutils/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "30");
    let (status, code, message) = registry_error(response).await;
    assert_eq!((status, code.as_str()), (429, "TOOMANYREQUESTS"));
    assert!(message.contains("NIXERY_MAX_QUEUE"), "{message}");
    assert_eq!(server.metric("nixery_builds_rejected_total"), 2);
    // Joining a build already queued is not a new build.
    assert_eq!(start(&server, "hello").await.0, 202);

    assert_eq!(finished(&server, "slow").await, "failed");
    for image in ["hello", "curl"] {
        assert_eq!(finished(&server, image).await, "done", "{image}");
    }
    // `hello` got the place before `curl`, which waited behind it.
    let curl = events(&server, "curl").await;
    let places: Vec<&str> = curl
        .iter()
        .filter(|(phase, _)| phase == "queued")
        .map(|(_, text)| text.as_str())
        .collect();
    assert_eq!(places, ["number 1 of 1 waiting for a place"], "{curl:?}");
    assert_eq!(server.metric("nixery_build_queue_length"), 0);
    assert_eq!(server.nix_builds(), 3);
    // Room again (a quick build may be over within the second the API waits: 200).
    let (status, body) = start(&server, "nano").await;
    assert!(status == 202 || status == 200, "{status} {body}");
    assert_eq!(finished(&server, "nano").await, "done");
}

/// A client whose connections come from the loopback address `addr` (127.0.0.2, 127.0.0.3, …).
fn client_from(addr: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(addr.parse::<std::net::IpAddr>().unwrap())
        .timeout(std::time::Duration::from_secs(300))
        .build()
        .unwrap()
}

/// GET of `name`'s manifest by `client`, with `forwarded` as X-Forwarded-For: the status, the
/// registry error code (none for a 200) and Retry-After.
async fn manifest_by(
    client: &reqwest::Client,
    server: &Server,
    name: &str,
    forwarded: Option<&str>,
) -> (u16, String, Option<u64>) {
    let mut request = client.get(server.url(&format!("/v2/{name}/manifests/latest")));
    if let Some(forwarded) = forwarded {
        request = request.header("x-forwarded-for", forwarded);
    }
    let response = request.send().await.unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    if response.status() == 200 {
        return (200, String::new(), retry_after);
    }
    let (status, code, message) = registry_error(response).await;
    if status == 429 {
        assert!(message.contains("NIXERY_CLIENT_BUILD_RATE"), "{message}");
    }
    (status, code, retry_after)
}

#[tokio::test]
async fn one_clients_flood_does_not_stop_anothers_build_and_warm_pulls_are_never_limited() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[
            ("NIXERY_CLIENT_BUILD_RATE", "1"),
            ("NIXERY_TRUSTED_PROXIES", "127.0.0.1"),
        ],
    );
    let flooder = client_from("127.0.0.2");
    let other = client_from("127.0.0.3");
    let proxy = client_from("127.0.0.1");
    let nonce = nonce();
    let cold = |i: usize| format!("made-up-{i}-{}", nonce.replace('-', "x"));

    // Each made-up name is new work (an evaluation): one a minute, then 429 with Retry-After.
    let (status, code, _) = manifest_by(&flooder, &server, &cold(0), None).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    for i in 1..4 {
        let (status, code, retry_after) = manifest_by(&flooder, &server, &cold(i), None).await;
        assert_eq!(
            (status, code.as_str()),
            (429, "TOOMANYREQUESTS"),
            "request {i}"
        );
        let retry_after = retry_after.expect("Retry-After");
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    }
    let rejected = "nixery_builds_rejected_total{reason=\"client_rate\"}";
    assert_eq!(server.metric(rejected), 3);
    assert_eq!(server.evaluations(), 1);

    // Another client builds meanwhile; what it built is warm for the first one too.
    let builds = server.nix_builds();
    assert_eq!(manifest_by(&other, &server, "hello", None).await.0, 200);
    assert_eq!(manifest_by(&flooder, &server, "hello", None).await.0, 200);
    assert_eq!(server.nix_builds(), builds + 1);
    assert_eq!(server.metric(rejected), 3);

    // Behind the trusted proxy the client is whom it forwards for: the flooder still waits, a
    // new address does not; an untrusted peer's own X-Forwarded-For changes nothing (the other
    // client has used its one start of the minute on hello).
    let (status, ..) = manifest_by(&proxy, &server, &cold(4), Some("127.0.0.2")).await;
    assert_eq!(status, 429);
    let (status, ..) = manifest_by(&proxy, &server, &cold(5), Some("198.51.100.7")).await;
    assert_eq!(status, 404);
    let (status, ..) = manifest_by(&other, &server, &cold(6), Some("198.51.100.8")).await;
    assert_eq!(status, 429);
    assert_eq!(server.metric(rejected), 5);
}

#[tokio::test]
async fn a_catalog_evaluation_takes_a_place_like_a_build() {
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[
            ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
            ("NIXERY_MAX_BUILDS", "1"),
            ("NIXERY_MAX_QUEUE", "0"),
            ("NIX_TIMEOUT", "600"),
        ],
    );
    // `slow` holds the one place, and nothing may wait.
    assert_eq!(start(&server, "slow").await.0, 202);
    let response = client()
        .get(server.url("/api/v1/packages?q=hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "30");
    let (status, code, message) = registry_error(response).await;
    assert_eq!(
        (status, code.as_str()),
        (429, "TOOMANYREQUESTS"),
        "{message}"
    );
    assert_eq!(
        server.metric("nixery_builds_rejected_total{reason=\"queue_full\"}"),
        1
    );
}

#[tokio::test]
async fn a_burst_of_300_distinct_cold_images_admits_three_and_refuses_the_rest_at_once() {
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[
            ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
            ("NIXERY_MAX_BUILDS", "1"),
            ("NIXERY_MAX_QUEUE", "2"),
        ],
    );
    // Each image has `slowish` (4 s), so the first build is still running when the last
    // request comes.
    let packages = [
        "bashinteractive",
        "coreutils",
        "moreutils",
        "nano",
        "curl",
        "hello",
        "cacert",
        "iana-etc",
        "xorg.xev",
        "1password",
        "stdenv",
    ];
    // Every four of them: 330 images.
    let mut names = Vec::new();
    let n = packages.len();
    for a in 0..n {
        for b in a + 1..n {
            for c in b + 1..n {
                for d in c + 1..n {
                    let [a, b, c, d] = [a, b, c, d].map(|i| packages[i]);
                    names.push(format!("slowish/{a}/{b}/{c}/{d}"));
                }
            }
        }
    }
    names.truncate(300);
    assert_eq!(names.len(), 300);
    let http = client();
    let statuses = futures::future::join_all(names.iter().map(|name| {
        let request = http.get(server.url(&format!("/v2/{name}/manifests/latest")));
        async move { request.send().await.unwrap().status().as_u16() }
    }))
    .await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    println!("300 cold images at once: {admitted} admitted and built, {refused} answered 429");
    assert_eq!((admitted, refused), (3, 297), "{statuses:?}");
    assert_eq!(
        server.metric("nixery_builds_rejected_total{reason=\"queue_full\"}"),
        297
    );
    assert_eq!(
        server.metric("nixery_builds_rejected_total{reason=\"client_rate\"}"),
        0
    );
}
