//! The server under both Nix versions it supports: Debian 12's Nix 2.8 on the host, and Debian
//! 13's Nix 2.26 (what current nixpkgs accepts) in a debootstrapped trixie root run by
//! `scripts/nix-trixie`. The same cold builds, each with its own Nix and store, give
//! byte-identical manifests and blobs. And a package set that asks for a newer Nix than the
//! server has is refused with both versions named.

mod common;

use std::path::Path;

use common::trixie::{nix_trixie, start_under_trixie};
use common::{Server, blob, client, pull, registry_error, require_tool, run};

/// The fault tests' package set, in a tree under `dir` (which the trixie root sees): the offline
/// one plus `slowish`, whose derivation is new for each `nonce`, so a build of it really builds.
fn fresh_settings(dir: &Path, nonce: &str) -> Vec<(&'static str, String)> {
    let pkgs = common::fixture_tree(dir, "fault-pkgs", nonce);
    vec![("NIXERY_PKGS_PATH", pkgs.display().to_string())]
}

/// Every blob of an image, by digest: the manifest's config and layers.
async fn blobs(server: &Server, manifest: &serde_json::Value) -> Vec<(String, Vec<u8>)> {
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
    for layer in manifest["layers"].as_array().unwrap() {
        digests.push(layer["digest"].as_str().unwrap().to_owned());
    }
    let mut all = Vec::new();
    for digest in digests {
        let bytes = blob(server, &digest).await;
        all.push((digest, bytes));
    }
    all
}

/// The version of the Nix `server` builds with (`nixery_nix_version{version="…"} 1`).
fn nix_version(server: &Server) -> String {
    let (status, text) = common::raw_get(server, "/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|line| line.strip_prefix("nixery_nix_version{version=\""))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no nixery_nix_version in /metrics:\n{text}"))
        .to_owned()
}

#[tokio::test]
async fn nix_2_8_and_nix_2_26_build_byte_identical_images() {
    require_tool("debootstrap", "apt-get install debootstrap");
    require_tool("unshare", "apt-get install util-linux");
    let version = run(&nix_trixie(), &["nix-build", "--version"]);
    assert!(version.contains("(Nix) 2.26"), "trixie's Nix: {version}");

    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    // One tree for both, under the directory the trixie root sees.
    let dir = tempfile::tempdir().unwrap();
    let settings = fresh_settings(dir.path(), &nonce);
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let host_dir = tempfile::tempdir().unwrap();
    let host = Server::start_on(&host_dir.path().join("storage"), &settings);
    let trixie = start_under_trixie(dir.path(), &settings);
    assert!(
        nix_version(&host).starts_with("2.8"),
        "the host server's Nix: {}",
        nix_version(&host)
    );
    assert!(
        nix_version(&trixie).starts_with("2.26"),
        "the trixie server's Nix: {}",
        nix_version(&trixie)
    );

    // `slowish` is built anew by each Nix in its own store (a few seconds each).
    for name in ["shell/hello/slowish", "curl/xorg.xev"] {
        let on_host = pull(&host, name).await;
        let on_trixie = pull(&trixie, name).await;
        assert_eq!(on_trixie.digest, on_host.digest, "{name}: manifests differ");
        assert_eq!(on_trixie.manifest, on_host.manifest);
        let host_blobs = blobs(&host, &on_host.manifest).await;
        let trixie_blobs = blobs(&trixie, &on_trixie.manifest).await;
        assert!(host_blobs == trixie_blobs, "{name}: blobs differ");
    }
    // Each built both images itself, with its own Nix.
    assert_eq!(host.nix_builds(), 2, "{}", host.log());
    assert_eq!(trixie.nix_builds(), 2, "{}", trixie.log());
}

#[tokio::test]
async fn a_package_set_that_needs_a_newer_nix_names_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let pkgs = common::fixture_tree(dir.path(), "minver-pkgs", "");
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_PKGS_PATH", pkgs.to_str().unwrap())],
    );
    let installed = run("nix-build", &["--version"]);
    let installed = installed.split_whitespace().last().unwrap();
    for _ in 0..2 {
        let response = client()
            .get(server.url("/v2/hello/manifests/latest"))
            .send()
            .await
            .unwrap();
        let (status, code, message) = registry_error(response).await;
        assert_eq!((status, code.as_str()), (500, "UNKNOWN"));
        assert!(
            message.contains("needs Nix 99.0 or newer")
                && message.contains(&format!("the server has Nix {installed}"))
                && message.contains("install a newer Nix"),
            "{message}"
        );
    }
    // Nothing ran and nothing was cached: the second request was refused afresh.
    assert_eq!(server.nix_builds(), 0);
    assert_eq!(server.evaluations(), 0);
    let manifests = server.storage.join("cache/manifests");
    assert!(
        std::fs::read_dir(&manifests).map_or(true, |mut d| d.next().is_none()),
        "a manifest was cached"
    );
}
