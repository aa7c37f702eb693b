//! A soak test, bounded to about a minute on 127.0.0.1: rounds of warm pulls, cold builds of
//! distinct images in bursts past the build queue, misspelled names, a failing build, a build
//! past NIX_TIMEOUT and clients that hang up mid-blob, all at once. At the end: no answer the
//! test did not expect, the server's own counts equal to what the test sent, memory and open
//! files back to their level after the warm-up, and no process left from any build.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Server, client, fault_pkgs, nonce, processes_with_env, pull};
use futures::future::join_all;

const ROUNDS: usize = 6;
/// Distinct cold images per round, sent at once: more than the places and the queue hold.
const BURST: usize = 8;
const WARM_PULLS: usize = 10;

/// Packages of the offline set that combine into distinct images.
const PACKAGES: [&str; 10] = [
    "bashinteractive",
    "coreutils",
    "moreutils",
    "nano",
    "cacert",
    "iana-etc",
    "curl",
    "1password",
    "stdenv",
    "hello",
];

/// Every image of three of [`PACKAGES`], in a fixed order.
fn distinct_images() -> Vec<String> {
    let mut images = Vec::new();
    for (i, a) in PACKAGES.iter().enumerate() {
        for (j, b) in PACKAGES.iter().enumerate().skip(i + 1) {
            for c in &PACKAGES[j + 1..] {
                images.push(format!("{a}/{b}/{c}"));
            }
        }
    }
    images
}

/// What the test got, by (route, status), as the server's metrics label them.
type Tally = BTreeMap<(&'static str, u16), u64>;

/// GETs a manifest; its status and body.
async fn manifest(server: &Server, name: &str) -> (u16, String) {
    let response = client()
        .get(server.url(&format!("/v2/{name}/manifests/latest")))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// A client that asks for a blob, reads the start of it and hangs up.
async fn hang_up_mid_blob(server: &Server, digest: &str) -> u16 {
    let mut response = client()
        .get(server.url(&format!("/v2/hello/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let _first = response.chunk().await.unwrap();
    drop(response);
    status
}

/// One round: everything at once. Adds what it got to `tally`.
async fn round(
    server: &Server,
    cold: &[String],
    biggest_layer: &str,
    typo: &str,
    tally: &mut Tally,
) {
    let warm = join_all((0..WARM_PULLS).map(|_| pull(server, "hello")));
    let cold = join_all(cold.iter().map(|name| manifest(server, name)));
    let typos = join_all((0..3).map(|_| manifest(server, typo)));
    let failing = manifest(server, "failing");
    let slow = manifest(server, "slow");
    let hang_ups = join_all((0..3).map(|_| hang_up_mid_blob(server, biggest_layer)));
    let (warm, cold, typos, failing, slow, hang_ups) =
        tokio::join!(warm, cold, typos, failing, slow, hang_ups);

    // Warm pulls: the manifest, the config and every layer, each checked by `pull`.
    for pulled in &warm {
        *tally.entry(("manifests", 200)).or_default() += 1;
        *tally.entry(("blobs", 200)).or_default() += 1 + pulled.layers.len() as u64;
    }
    for (status, body) in cold {
        assert!(
            status == 200 || status == 429,
            "a cold build answered {status}: {body}"
        );
        *tally.entry(("manifests", status)).or_default() += 1;
    }
    for (status, body) in typos.into_iter().chain([failing, slow]) {
        assert!(
            status == 404 || status == 429,
            "a failure answered {status}: {body}"
        );
        *tally.entry(("manifests", status)).or_default() += 1;
    }
    for status in hang_ups {
        assert_eq!(status, 200);
        *tally.entry(("blobs", 200)).or_default() += 1;
    }
}

/// Waits until no build is running or waiting.
async fn quiet(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("nixery_builds_in_flight") > 0
        || server.metric("nixery_build_queue_length") > 0
    {
        assert!(Instant::now() < deadline, "builds never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_minute_of_mixed_traffic_leaves_nothing_behind() {
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce);
    let server = Server::start().restart(&[
        ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
        // Long enough for a cold image on a busy machine; `slow` never finishes.
        ("NIX_TIMEOUT", "8"),
        ("NIXERY_MAX_BUILDS", "2"),
        ("NIXERY_MAX_QUEUE", "3"),
        ("NIXERY_FAILURE_TTL", "1"),
    ]);
    let started = Instant::now();
    let images = distinct_images();
    let mut tally = Tally::new();
    let hello = pull(&server, "hello").await;
    *tally.entry(("manifests", 200)).or_default() += 1;
    *tally.entry(("blobs", 200)).or_default() += 1 + hello.layers.len() as u64;
    let biggest = hello
        .layers
        .iter()
        .max_by_key(|(_, bytes)| bytes.len())
        .map(|(digest, _)| digest.clone())
        .unwrap();

    // Warm-up: one round, then the level memory and open files should come back to.
    round(&server, &images[..BURST], &biggest, "helo0", &mut tally).await;
    quiet(&server).await;
    let (warm_rss, warm_fds) = (server.rss_kib(), server.open_fds());

    for r in 1..ROUNDS {
        let cold = &images[r * BURST..(r + 1) * BURST];
        round(&server, cold, &biggest, &format!("helo{r}"), &mut tally).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    quiet(&server).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, fds) = (server.rss_kib(), server.open_fds());
    eprintln!(
        "soak: {:?} in {:.0?}; RSS {warm_rss} KiB after warm-up, {rss} KiB at the end; open files {warm_fds}, then {fds}",
        tally,
        started.elapsed()
    );

    // The server counted what the test sent, answer by answer.
    for ((route, status), sent) in &tally {
        let counted = server.metric(&format!(
            "nixery_http_requests_total{{route=\"{route}\",method=\"GET\",status=\"{status}\"}}"
        ));
        assert_eq!(counted, *sent, "{route} {status}");
    }
    let server_errors = (500..600)
        .map(|status| {
            ["manifests", "blobs"]
                .iter()
                .map(|route| {
                    server.metric(&format!(
                        "nixery_http_requests_total{{route=\"{route}\",method=\"GET\",status=\"{status}\"}}"
                    ))
                })
                .sum::<u64>()
        })
        .sum::<u64>();
    assert_eq!(server_errors, 0);
    let refused = tally.get(&("manifests", 429)).copied().unwrap_or(0);
    assert!(refused > 0, "the queue limit was never reached: {tally:?}");
    assert_eq!(server.metric("nixery_builds_rejected_total"), refused);

    // Memory and open files are back where they were after the warm-up.
    assert!(
        fds <= warm_fds + 4,
        "open files grew from {warm_fds} to {fds}"
    );
    assert!(
        rss <= warm_rss + warm_rss / 2 + 16 * 1024,
        "memory grew from {warm_rss} KiB to {rss} KiB"
    );
    // No builder is left from the builds past NIX_TIMEOUT.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = processes_with_env(&format!("nonce={nonce}"));
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
