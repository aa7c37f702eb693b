//! Nix store collection (`NIXERY_NIX_GC_MIN_FREE`) with a threshold that always triggers. This
//! is the only test of its binary, so it runs alone: it sweeps the shared Nix store, and later
//! tests build again what they need.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Server, build_status, fault_pkgs, nonce, pull};

/// The store paths the last build of `image` packed, from its build's events.
async fn store_paths(server: &Server, image: &str) -> Vec<String> {
    let status = build_status(server, image).await;
    let done = status["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["phase"] == "done")
        .unwrap_or_else(|| panic!("{image} is not done: {status}"))
        .clone();
    done["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["paths"].as_array().cloned().unwrap_or_default())
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the server has run `runs` collections.
async fn collections(server: &Server, runs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while server.metric("nixery_nix_gc_runs_total") < runs {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn collection_frees_finished_images_and_waits_for_running_builds() {
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce);
    let env = [
        ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
        ("NIXERY_NIX_GC_MIN_FREE", "100%"),
    ];
    let server = Server::start().restart(&env);
    // A finished image's paths are collected once its build is over.
    let first = pull(&server, "slowish").await;
    let paths = store_paths(&server, "slowish").await;
    let slowish = paths
        .iter()
        .find(|p| p.ends_with("-slowish"))
        .unwrap_or_else(|| panic!("{paths:?}"))
        .clone();
    collections(&server, 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while Path::new(&slowish).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{slowish} was not collected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The collection that deleted it has ended and counted what it deleted.
    while server.metric("nixery_nix_gc_deleted_paths_total") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no deleted paths counted:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A build running while collections are asked for completes and pulls: the collection
    // waits until its layers are packed.
    let runs = server.metric("nixery_nix_gc_runs_total");
    let pulled = pull(&server, "slowish/hello").await;
    assert!(!pulled.layers.is_empty());
    collections(&server, runs + 1).await;

    // The images are stored: pulled again after a restart, they need no nix-build.
    let server = server.restart(&env);
    let again = pull(&server, "slowish").await;
    assert_eq!(again.digest, first.digest);
    assert_eq!(server.nix_builds(), 0);
}
