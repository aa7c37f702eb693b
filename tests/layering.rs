//! Popularity-aware layering, end to end: `nixery popularity` counts the offline package set, and
//! servers given those counts lay out layers that separate images share.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Background, Server, pull};

/// Runs `nixery popularity` on the offline package set and returns its JSON text and stderr.
fn count_offline_pkgs() -> (String, String) {
    common::require_tool("nix-build", "apt-get install nix-bin");
    let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .args(["popularity", "--pkgs-path"])
        .arg(common::offline_pkgs())
        .env("NIXERY_NIX_CONFIG", common::NIX_CONFIG)
        .stdin(Stdio::null())
        .output()
        .expect("nixery popularity runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "nixery popularity failed:\n{stderr}"
    );
    (
        String::from_utf8(output.stdout).expect("UTF-8 JSON"),
        stderr,
    )
}

#[test]
fn nixery_popularity_counts_a_commit_of_a_git_source() {
    // The repository's first commit is the offline set as shipped: the same counts.
    let repo = common::repo::PkgsRepo::create();
    let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .args(["popularity", "--tag", "v1", "--pkgs-repo"])
        .arg(&repo.path)
        .env("NIXERY_NIX_CONFIG", common::NIX_CONFIG)
        .env_remove("NIXERY_PKGS_PATH")
        .stdin(Stdio::null())
        .output()
        .expect("nixery popularity runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&repo.first),
        "the log names the commit: {stderr}"
    );
    let counts: BTreeMap<String, u64> = serde_json::from_slice(&output.stdout).unwrap();
    let offline: BTreeMap<String, u64> = serde_json::from_str(&count_offline_pkgs().0).unwrap();
    assert_eq!(counts, offline);
}

/// Writes the offline package set's popularity data into `dir` and returns the file.
fn popularity_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("popularity.json");
    std::fs::write(&path, count_offline_pkgs().0).unwrap();
    path
}

/// The store paths (`/nix/store/<hash>-name`) a layer's tarball holds.
fn store_paths(gzipped: &[u8]) -> BTreeSet<String> {
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(gzipped)
        .read_to_end(&mut tar)
        .unwrap();
    let mut archive = tar::Archive::new(tar.as_slice());
    archive
        .entries()
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path().unwrap().to_string_lossy().into_owned();
            let mut parts = path.trim_start_matches('/').split('/');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("nix"), Some("store"), Some(name)) if !name.is_empty() => {
                    Some(format!("/nix/store/{name}"))
                }
                _ => None,
            }
        })
        .collect()
}

/// The name of a store path without its hash.
fn name(store_path: &str) -> &str {
    store_path
        .rsplit('/')
        .next()
        .unwrap()
        .split_once('-')
        .unwrap()
        .1
}

#[test]
fn nixery_popularity_counts_the_closures_each_path_is_in() {
    let (json, stderr) = count_offline_pkgs();
    let counts: BTreeMap<String, u64> = serde_json::from_str(&json).expect("a JSON object");
    // 18 top-level attributes: `bash` and `shellcheck` are other names of `bashInteractive` and
    // `haskellPackages.shellcheck` and count once; `failing` does not build. That leaves 16.
    // By hand, from nix/offline-pkgs/default.nix:
    // - nss-cacert is in the closures of cacert itself, curl and 1password-cli: 3.
    assert_eq!(counts["nss-cacert-3.95"], 3, "{json}");
    // - openssl is in openssl's own, curl's, coreutils' (its sha256sum) and stdenv's (through
    //   coreutils): 4.
    assert_eq!(counts["openssl-3.0.12"], 4, "{json}");
    // - busybox is in every closure but those of glibc, cacert, iana-etc and big, which are
    //   plain files that refer to nothing: 16 - 4 = 12.
    assert_eq!(counts["busybox"], 12, "{json}");
    assert_eq!(counts["hello-2.12.1"], 1, "{json}");
    assert!(!counts.contains_key("failing"), "{json}");
    assert!(
        stderr.contains("skipped 1 packages that failed to build: failing"),
        "{stderr}"
    );
}

#[tokio::test]
async fn hello_and_curl_pulled_alone_share_their_common_dependencies_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let popularity = popularity_file(tmp.path());
    let server = Server::start_on(
        &tmp.path().join("storage"),
        &[("NIX_POPULARITY_URL", popularity.to_str().unwrap())],
    );
    let hello = pull(&server, "hello").await;
    let curl = pull(&server, "curl").await;
    let shared: BTreeSet<String> = hello
        .layer_digests()
        .into_iter()
        .filter(|d| curl.layer_digests().contains(d))
        .collect();
    let shared_paths: BTreeSet<String> = hello
        .layers
        .iter()
        .filter(|(digest, _)| shared.contains(digest))
        .flat_map(|(_, bytes)| store_paths(bytes))
        .map(|p| name(&p).to_owned())
        .collect();
    assert_eq!(
        shared_paths,
        BTreeSet::from(["busybox".to_owned(), "glibc-2.38".to_owned()]),
        "hello and curl need busybox and glibc, and should share their layers"
    );
    // Each is a layer of its own, and the most popular come first.
    for image in [&hello, &curl] {
        let first: Vec<BTreeSet<String>> = image.layers[..2]
            .iter()
            .map(|(_, bytes)| {
                store_paths(bytes)
                    .iter()
                    .map(|p| name(p).to_owned())
                    .collect()
            })
            .collect();
        assert_eq!(
            first,
            vec![
                BTreeSet::from(["busybox".to_owned()]),
                BTreeSet::from(["glibc-2.38".to_owned()])
            ]
        );
    }

    // Without the data, the two images share nothing: glibc and busybox stay inside each
    // package's own layer.
    let plain = Server::start_on(&tmp.path().join("plain"), &[]);
    let hello = pull(&plain, "hello").await;
    let curl = pull(&plain, "curl").await;
    assert!(
        hello
            .layer_digests()
            .iter()
            .all(|d| !curl.layer_digests().contains(d)),
        "without popularity data hello and curl were expected to share no layer"
    );
}

#[tokio::test]
async fn two_servers_with_the_same_popularity_data_build_the_same_image() {
    let tmp = tempfile::tempdir().unwrap();
    let file = popularity_file(tmp.path());
    // The second server reads the same counts, formatted differently, over HTTP.
    let counts: BTreeMap<String, u64> =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let compact = serde_json::to_string(&counts).unwrap();
    let web = Background::serve(axum::Router::new().route(
        "/popularity.json",
        axum::routing::get(move || async move { compact }),
    ));
    let url = format!("http://127.0.0.1:{}/popularity.json", web.port);

    let a = Server::start_on(
        &tmp.path().join("a"),
        &[("NIX_POPULARITY_URL", file.to_str().unwrap())],
    );
    let b = Server::start_on(&tmp.path().join("b"), &[("NIX_POPULARITY_URL", &url)]);
    let from_a = pull(&a, "shell/curl/hello").await;
    let from_b = pull(&b, "shell/curl/hello").await;
    assert_eq!(from_a.digest, from_b.digest);
    assert_eq!(from_a.layer_digests(), from_b.layer_digests());
    assert!(from_a.layers.len() > 3, "expected several layers");
}

#[test]
fn popularity_data_that_is_missing_unreachable_or_malformed_stops_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let malformed = tmp.path().join("malformed.json");
    std::fs::write(&malformed, r#"["glibc", "busybox"]"#).unwrap();
    let missing = tmp.path().join("missing.json");
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = format!(
        "http://127.0.0.1:{}/popularity.json",
        closed.local_addr().unwrap().port()
    );
    drop(closed);
    for (location, expected) in [
        (missing.to_str().unwrap(), "cannot read the popularity file"),
        (unreachable.as_str(), "cannot fetch the popularity data"),
        (malformed.to_str().unwrap(), "is not a JSON object"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
            .envs(Server::env(
                &tmp.path().join("storage"),
                &[("NIX_POPULARITY_URL", location)],
            ))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "nixery started with {location}:\n{stderr}"
        );
        assert!(
            stderr.contains("NIX_POPULARITY_URL") && stderr.contains(expected),
            "{location}: {stderr}"
        );
    }
}
