//! The web side from the outside: the pages in real headless Chromium (screenshots land in
//! `target/screenshots/`), the pre-build API followed by a real `docker pull`, and many clients
//! following one build's events.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::{Server, build_status, client, nonce, require_docker, run};
use fantoccini::Locator;
use futures::StreamExt;

/// The phases a build page lists, in order (the events the API streams, `started` and the last
/// one aside).
const PHASES: [&str; 7] = [
    // (and `queued` first, for a build that waited for a place)
    "source",
    "evaluated",
    "derivations",
    "built",
    "layers",
    "stored",
    "done",
];

/// The offline set with a `big` that is new for `nonce` and builds slowly enough to watch.
fn web_pkgs(nonce: &str) -> PathBuf {
    common::fixture_tree(&std::env::temp_dir(), "web-pkgs", nonce)
}

/// A server on the web fixture, its `big` new for this test.
fn server_with_a_cold_big(env: &[(&str, &str)]) -> Server {
    let nonce = nonce();
    let pkgs = web_pkgs(&nonce);
    let mut all = vec![("NIXERY_PKGS_PATH", pkgs.to_str().unwrap())];
    all.extend_from_slice(env);
    Server::start().restart(&all)
}

/// What a page's script ran into: errors on the console (a refused script or style, an
/// exception). A build page asks for its build until there is one: those 404s are expected.
async fn assert_no_console_errors(browser: &Browser) {
    let errors: Vec<String> = browser
        .console_errors()
        .await
        .into_iter()
        .filter(|e| !(e.contains("/api/v1/builds/") && e.contains("status of 404")))
        .collect();
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
}

#[tokio::test]
async fn the_index_page_shows_this_host_and_finds_packages() {
    let server = Server::start();
    let browser = Browser::start().await;
    browser.goto(&server.url("/")).await;
    let host = server.host();
    assert_eq!(
        browser
            .find("#pull-example code")
            .await
            .text()
            .await
            .unwrap(),
        format!("docker pull {host}/shell/hello")
    );
    let source = browser.find("#source").await.text().await.unwrap();
    assert!(source.contains("offline-pkgs"), "{source}");
    browser.screenshot("index").await;

    // Search as you type (the catalog is made on the first search; the page asks again).
    browser.find("#q").await.send_keys("hel").await.unwrap();
    browser
        .wait_for("#results li.package", Duration::from_secs(60))
        .await;
    let first = "#results li.package:first-child";
    assert_eq!(
        browser
            .find(&format!("{first} .name"))
            .await
            .text()
            .await
            .unwrap(),
        "hello"
    );
    assert_eq!(
        browser
            .find(&format!("{first} .command code"))
            .await
            .text()
            .await
            .unwrap(),
        format!("docker pull {host}/shell/hello")
    );
    browser.screenshot("index-search").await;
    browser.set_window_size(390, 844).await;
    browser.screenshot("index-phone").await;
    assert_no_console_errors(&browser).await;

    // The same without JavaScript: /search?q= renders the results.
    let html = client()
        .get(server.url("/search?q=hel"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains(&format!("docker pull {host}/shell/hello")),
        "{html}"
    );

    // A query with a script in it is shown as text, and nothing runs.
    browser
        .goto(&server.url("/search?q=%3Cscript%3Ewindow.pwned%3D1%3C%2Fscript%3E"))
        .await;
    let value = browser.find("#q").await.prop("value").await.unwrap();
    assert_eq!(value.as_deref(), Some("<script>window.pwned=1</script>"));
    assert_eq!(
        browser
            .execute("return window.pwned === undefined", vec![])
            .await
            .unwrap(),
        true
    );
}

/// One look at a build page: its status and each phase's state and text.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    status: String,
    phases: Vec<(String, String, String)>,
}

async fn snapshot(browser: &Browser) -> Option<Snapshot> {
    let value = browser
        .execute(
            "const build = document.getElementById('build');
             if (!build) return null;
             return {
               status: build.dataset.status,
               phases: [...document.querySelectorAll('#phases li')].map(
                 (li) => [li.dataset.phase, li.className, li.querySelector('.text').textContent]),
             };",
            vec![],
        )
        .await
        .unwrap();
    let status = value["status"].as_str()?.to_owned();
    let phases = value["phases"]
        .as_array()?
        .iter()
        .map(|p| {
            let part = |i: usize| p[i].as_str().unwrap_or_default().to_owned();
            (part(0), part(1), part(2))
        })
        .collect();
    Some(Snapshot { status, phases })
}

#[tokio::test]
async fn a_build_page_opened_before_a_cold_build_shows_its_phases_live() {
    let server = server_with_a_cold_big(&[]);
    let browser = Browser::start().await;
    browser.goto(&server.url("/build/shell/big")).await;
    assert_eq!(
        browser
            .find("#build")
            .await
            .attr("data-status")
            .await
            .unwrap()
            .unwrap(),
        "none"
    );
    browser.screenshot("build-none").await;
    assert_eq!(server.nix_builds(), 0);

    browser.find("#start").await.click().await.unwrap();
    // Watch the page until it shows the digest, keeping every state it went through.
    let started = Instant::now();
    let mut seen: Vec<Snapshot> = Vec::new();
    let mut screenshot_taken = false;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "no digest after 3 minutes; the page went through {seen:#?}"
        );
        if let Some(now) = snapshot(&browser).await {
            if now.status == "done" {
                seen.push(now);
                break;
            }
            let building_big = now.phases.iter().any(|(id, class, text)| {
                id == "derivations" && class == "active" && text.contains("building big")
            });
            if building_big && !screenshot_taken {
                browser.screenshot("build-running").await;
                screenshot_taken = true;
            }
            if seen.last() != Some(&now) {
                seen.push(now);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Phases arrived one by one while the build ran: the page showed the build running with
    // some phases done and the rest to come, and showed Nix building `big`.
    let running: Vec<&Snapshot> = seen.iter().filter(|s| s.status == "running").collect();
    let partial = running.iter().any(|s| {
        let done = s
            .phases
            .iter()
            .filter(|(_, class, _)| class == "done")
            .count();
        done > 0 && done < PHASES.len() - 1
    });
    assert!(partial, "the phases did not arrive live: {seen:#?}");
    let derivations = seen
        .iter()
        .flat_map(|s| &s.phases)
        .filter(|(id, _, _)| id == "derivations")
        .map(|(_, _, text)| text.as_str())
        .collect::<Vec<_>>();
    assert!(
        derivations
            .iter()
            .any(|t| t.contains("of 3 built, building big")),
        "{derivations:?}"
    );
    assert!(screenshot_taken);

    // The end: the digest the registry serves, the layers, the pull command.
    let digest = browser
        .wait_for("#digest", Duration::from_secs(10))
        .await
        .text()
        .await
        .unwrap();
    let manifest = client()
        .head(server.url("/v2/shell/big/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.headers()["docker-content-digest"], digest.as_str());
    let layers = browser
        .find_all(Locator::Css("#layers tbody tr"))
        .await
        .unwrap();
    assert!(layers.len() >= 3, "{} layers", layers.len());
    let table = browser.find("#layers").await.text().await.unwrap();
    assert!(
        table.contains("big") && table.contains("64.0 MiB"),
        "{table}"
    );
    assert_eq!(
        browser.find("#pull code").await.text().await.unwrap(),
        format!("docker pull {}/shell/big", server.host())
    );
    assert_eq!(server.nix_builds(), 1);
    browser.screenshot("build-done").await;
    browser.set_window_size(390, 844).await;
    browser.screenshot("build-done-phone").await;
    assert_no_console_errors(&browser).await;

    // The index page lists it among the recent builds.
    browser.goto(&server.url("/")).await;
    let recent = browser.find("#recent").await.text().await.unwrap();
    assert!(
        recent.contains("shell/big") && recent.contains("done"),
        "{recent}"
    );
}

#[tokio::test]
async fn the_page_of_a_failing_build_shows_the_error_and_the_end_of_nix_log() {
    let server = Server::start();
    let browser = Browser::start().await;
    browser.goto(&server.url("/build/shell/failing")).await;
    browser.find("#start").await.click().await.unwrap();
    let message = browser
        .wait_for("#error .message", Duration::from_secs(120))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(message, "builder for 'failing' failed with exit code 1");
    let log = browser.find("#log").await.text().await.unwrap();
    assert!(
        log.contains("failing: this package always fails to build"),
        "{log}"
    );
    let failed = browser
        .find("#phases li.failed")
        .await
        .attr("data-phase")
        .await
        .unwrap();
    assert_eq!(failed.as_deref(), Some("derivations"));
    browser.screenshot("build-failed").await;
    assert_no_console_errors(&browser).await;
}

/// The events of a build's stream, read to its end: (event name, data).
async fn events(server: &Server, image: &str) -> Vec<(String, serde_json::Value)> {
    let response = client()
        .get(server.url(&format!("/api/v1/events/{image}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    read_events(response).await
}

async fn read_events(response: reqwest::Response) -> Vec<(String, serde_json::Value)> {
    let mut text = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    text.split("\n\n")
        .filter_map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .map(str::to_owned)
            };
            let data = field("data")?;
            Some((field("event")?, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

#[tokio::test]
async fn building_ahead_then_docker_pull_runs_one_nix_build() {
    require_docker();
    let server = server_with_a_cold_big(&[]);
    let response = client()
        .post(server.url("/api/v1/builds"))
        .json(&serde_json::json!({"image": "shell/big", "tag": "latest"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "running");
    assert_eq!(body["url"], server.url("/build/shell/big"));

    // The stream replays the build from its start and ends after its last event.
    let streamed = events(&server, "shell/big:latest").await;
    let names: Vec<&str> = streamed.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names.first(), Some(&"started"));
    let mut phases: Vec<&str> = names.clone();
    phases.dedup();
    assert_eq!(&phases[1..], PHASES, "{names:?}");
    let (_, done) = streamed.last().unwrap();
    let digest = done["digest"].as_str().unwrap().to_owned();
    let seqs: Vec<u64> = streamed
        .iter()
        .map(|(_, d)| d["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // Asked again, the build is done.
    let response = client()
        .post(server.url("/api/v1/builds"))
        .json(&serde_json::json!({"image": "shell/big"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        (body["status"].as_str(), body["digest"].as_str()),
        (Some("done"), Some(digest.as_str()))
    );
    let status = build_status(&server, "shell/big").await;
    assert_eq!(status["digest"], digest.as_str());

    let image = format!("{}/shell/big", server.host());
    let pulled = run("docker", &["pull", &image]);
    assert!(pulled.contains(&digest), "{pulled}");
    run("docker", &["rmi", &image]);
    assert_eq!(server.nix_builds(), 1, "{}", server.log());
}

#[tokio::test]
async fn two_hundred_clients_follow_one_build_to_its_end_in_bounded_memory() {
    const CLIENTS: usize = 200;
    let server = server_with_a_cold_big(&[("NIXERY_MAX_EVENT_STREAMS", "200")]);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    // Warm the server up (the first request of each kind allocates), then measure.
    let before = server.rss_kib();
    let response = http
        .post(server.url("/api/v1/builds"))
        .json(&serde_json::json!({"image": "shell/big"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    let mut streams = Vec::new();
    for _ in 0..CLIENTS {
        let response = http
            .get(server.url("/api/v1/events/shell/big"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        streams.push(response);
    }
    // Every place is taken while they read: one more is refused.
    let refused = http
        .get(server.url("/api/v1/events/shell/big"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    let while_streaming = server.rss_kib();

    let readers: Vec<_> = streams
        .into_iter()
        .map(|response| tokio::spawn(read_events(response)))
        .collect();
    let mut digests = std::collections::BTreeSet::new();
    for reader in readers {
        let events = reader.await.unwrap();
        let (last, data) = events.last().expect("events");
        assert_eq!(last, "done");
        digests.insert(data["digest"].as_str().unwrap().to_owned());
    }
    assert_eq!(digests.len(), 1);
    assert_eq!(server.nix_builds(), 1);
    let grown = while_streaming.saturating_sub(before);
    eprintln!(
        "{CLIENTS} event streams: server RSS {before} KiB before, {while_streaming} KiB with them open (+{grown} KiB)"
    );
    assert!(
        grown < 32 * 1024,
        "{CLIENTS} streams took {grown} KiB of server memory"
    );
    // The places are given back once the streams end.
    let again = http
        .get(server.url("/api/v1/events/shell/big"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
}
