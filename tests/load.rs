//! Load: many clients at once, cold and warm. Every pull must succeed, a cold image must be built
//! once, and the server's peak memory is reported.

mod common;

use std::time::{Duration, Instant};

use common::{Server, pull, sha256};

/// The server's peak resident memory in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_cold_pulls_run_one_build() {
    let server = Server::start();
    let pulls = (0..50).map(|_| pull(&server, "shell/curl"));
    let images = futures::future::join_all(pulls).await;
    let digests: std::collections::HashSet<&str> =
        images.iter().map(|i| i.digest.as_str()).collect();
    assert_eq!(digests.len(), 1);
    assert_eq!(server.nix_builds(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_warm_pulls_all_succeed() {
    // 500 concurrent connections need more descriptors than the usual soft limit of 1024.
    nixery::raise_open_file_limit();
    let server = Server::start();
    let image = pull(&server, "shell/curl").await;
    eprintln!(
        "after the cold pull: peak RSS {} MiB",
        peak_rss_kib(server.pid()) / 1024
    );
    let mut paths = vec!["/v2/shell/curl/manifests/latest".to_owned()];
    paths.push(format!(
        "/v2/shell/curl/blobs/{}",
        image.manifest["config"]["digest"].as_str().unwrap()
    ));
    for (digest, _) in &image.layers {
        paths.push(format!("/v2/shell/curl/blobs/{digest}"));
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(500)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let started = Instant::now();
    let clients = (0..500).map(|_| {
        let http = http.clone();
        let paths = paths.clone();
        let server = &server;
        async move {
            let mut errors = 0;
            for path in &paths {
                match http.get(server.url(path)).send().await {
                    Ok(response) if response.status() == 200 => {
                        let digest = response.headers()["docker-content-digest"]
                            .to_str()
                            .unwrap()
                            .to_owned();
                        match response.bytes().await {
                            Ok(body) if sha256(&body) == digest => {}
                            _ => errors += 1,
                        }
                    }
                    _ => errors += 1,
                }
            }
            errors
        }
    });
    let errors: usize = futures::future::join_all(clients).await.into_iter().sum();
    let elapsed = started.elapsed();
    let peak = peak_rss_kib(server.pid());
    eprintln!(
        "500 warm pulls ({} requests each): {errors} errors in {elapsed:?}; server peak RSS {} MiB",
        paths.len(),
        peak / 1024
    );
    assert_eq!(errors, 0);
    assert_eq!(server.nix_builds(), 1);
}
