//! What a flood of hostile requests can grow, asked of the real server: made-up HTTP methods do
//! not add request-metric series, and `/readyz` probes storage at most once per 5 seconds
//! however often it is asked, while a broken storage still shows within that time.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Server, client};

/// The `nixery_http_requests_total` series in the server's `/metrics`, as the text writes them.
async fn request_series(server: &Server) -> Vec<String> {
    let text = client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with("nixery_http_requests_total{"))
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

#[tokio::test]
async fn made_up_methods_do_not_add_request_series() {
    let server = Server::start();
    let http = client();
    let standard = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];
    // Every request answers, with a status of its own route.
    let routes = ["/v2/", "/v2/hello/manifests/latest", "/api/v1/builds", "/"];
    for i in 0..3000 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let route = routes[i % routes.len()];
        let response = http
            .request(method, server.url(route))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_client_error(),
            "MADEUP{i} {route}: {}",
            response.status()
        );
    }
    // Lower case is another method than GET, and counts as `other` too.
    let response = http
        .request(
            reqwest::Method::from_bytes(b"get").unwrap(),
            server.url("/v2/"),
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error());
    for method in standard {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        http.request(method, server.url("/v2/"))
            .send()
            .await
            .unwrap();
    }

    let series = request_series(&server).await;
    let methods: BTreeSet<&str> = series
        .iter()
        .filter_map(|s| s.split("method=\"").nth(1)?.split('"').next())
        .collect();
    eprintln!(
        "after 3,001 made-up methods: {} nixery_http_requests series, methods {methods:?}",
        series.len()
    );
    let allowed: BTreeSet<&str> = standard.into_iter().chain(["other"]).collect();
    assert!(
        methods.is_subset(&allowed),
        "methods outside the standard ones: {methods:?}"
    );
    assert!(methods.contains("other"), "{series:?}");
    // One series per route, status and method seen: a few dozen, whatever the methods were.
    assert!(series.len() <= 40, "{} series: {series:#?}", series.len());
}

/// The storage probes the server ran: `check` calls of either outcome (none before the first).
fn probes(server: &Server) -> u64 {
    let (status, text) = common::raw_get(server, "/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|line| {
            line.starts_with("nixery_storage_operations_total{")
                && line.contains("operation=\"check\"")
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The status of `GET /readyz`, asked with `http`.
async fn ready(http: &reqwest::Client, server: &Server) -> u16 {
    http.get(server.url("/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Asks `/readyz` every 100 ms until it answers `status`, and returns how long that took.
async fn until_ready_is(http: &reqwest::Client, server: &Server, status: u16) -> Duration {
    let started = Instant::now();
    while ready(http, server).await != status {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "/readyz did not answer {status} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn readiness_is_probed_at_most_once_per_five_seconds() {
    let server = Server::start();
    let http = client();
    // The first 100, all at once, share one probe.
    let before = probes(&server);
    let concurrent = futures::future::join_all((0..100).map(|_| ready(&http, &server))).await;
    assert!(concurrent.iter().all(|&s| s == 200), "{concurrent:?}");
    let probed = probes(&server) - before;
    eprintln!("100 concurrent /readyz: {probed} storage probes");
    assert_eq!(
        probed, 1,
        "100 concurrent /readyz probed storage {probed} times"
    );

    // Storage that breaks shows within 5 s (and a little), and so does its repair.
    let staging = server.storage.join("tmp");
    std::fs::remove_dir_all(&staging).unwrap();
    let failed_after = until_ready_is(&http, &server, 503).await;
    std::fs::create_dir_all(&staging).unwrap();
    let repaired_after = until_ready_is(&http, &server, 200).await;
    eprintln!(
        "a broken storage showed after {failed_after:?}, its repair after {repaired_after:?}"
    );
    assert!(failed_after < Duration::from_secs(6), "{failed_after:?}");
    assert!(
        repaired_after < Duration::from_secs(6),
        "{repaired_after:?}"
    );

    // 100 more, one after the other for about a second: one probe at most.
    let before = probes(&server);
    for _ in 0..100 {
        assert_eq!(ready(&http, &server).await, 200);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let probed = probes(&server) - before;
    eprintln!("100 sequential /readyz: {probed} storage probes");
    assert!(probed <= 2, "100 /readyz probed storage {probed} times");
}
