//! Load: many clients at once, cold and warm. Every pull must succeed, a cold image must be built
//! once, and the server's peak memory is reported.

mod common;

use std::time::{Duration, Instant};

use common::{Server, pull, sha256};

/// A memory figure of process `pid` from /proc/PID/status, in KiB: `VmHWM` (peak resident) or
/// `VmRSS` (resident now).
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

fn peak_rss_kib(pid: u32) -> u64 {
    memory_kib(pid, "VmHWM")
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
    nixery::server::serve::raise_open_file_limit();
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

fn rss_kib(pid: u32) -> u64 {
    memory_kib(pid, "VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_caches_stay_within_nixery_memory_cache_entries() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    // One client builds 200 images here: past any per-client rate worth having.
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[
            ("NIXERY_MEMORY_CACHE_ENTRIES", "50"),
            ("NIXERY_CLIENT_BUILD_RATE", "1000"),
        ],
    );
    // 200 distinct images: sets of one to three of the offline set's packages.
    let packages = [
        "busybox",
        "glibc",
        "openssl",
        "hello",
        "bashinteractive",
        "coreutils",
        "moreutils",
        "nano",
        "stdenv",
        "cacert",
        "curl",
        "xorg.xev",
        "1password",
    ];
    let mut names = Vec::new();
    for (i, a) in packages.iter().enumerate() {
        names.push(a.to_string());
        for (j, b) in packages.iter().enumerate().skip(i + 1) {
            names.push(format!("{a}/{b}"));
            for c in packages.iter().skip(j + 1) {
                names.push(format!("{a}/{b}/{c}"));
            }
        }
    }
    names.truncate(200);
    let images = || server.metric("nixery_cache_entries{cache=\"images\"}");
    let pull_all = |names: Vec<String>| {
        let server = &server;
        futures::stream::iter(names)
            .map(move |name| async move { pull(server, &name).await.digest })
            .buffer_unordered(4)
            .collect::<Vec<_>>()
    };
    pull_all(names[..10].to_vec()).await;
    assert_eq!(images(), 10, "the entry count follows the images built");
    pull_all(names[10..100].to_vec()).await;
    let rss_at_100 = rss_kib(server.pid());
    assert_eq!(images(), 50);
    pull_all(names[100..].to_vec()).await;
    let rss_at_200 = rss_kib(server.pid());
    assert_eq!(server.nix_builds(), 200);
    assert_eq!(images(), 50);
    assert_eq!(
        server.metric("nixery_cache_entries{cache=\"manifests\"}"),
        100
    );
    eprintln!(
        "RSS after 100 images: {} MiB, after 200: {} MiB",
        rss_at_100 / 1024,
        rss_at_200 / 1024
    );
    assert!(
        rss_at_200 < rss_at_100 + 16 * 1024,
        "memory grew from {rss_at_100} KiB to {rss_at_200} KiB"
    );
    // An image pushed out of memory is still served, from storage, without Nix.
    pull(&server, &names[0]).await;
    assert_eq!(server.nix_builds(), 200);
}
