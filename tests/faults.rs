//! Faults: builds that run too long, a server killed while packing, a full disk, clients that
//! give up. None of them may leave a corrupt blob or take the server down.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Server, client, fault_pkgs, nonce, processes_with_env, pull, registry_error, sha256,
    staged_bytes,
};

/// Every blob in the storage directory has the digest its name says.
fn assert_blobs_intact(storage: &Path) {
    for entry in std::fs::read_dir(storage.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path()).unwrap();
        assert_eq!(
            sha256(&bytes),
            format!("sha256:{name}"),
            "blob {name} is corrupt"
        );
    }
}

#[tokio::test]
async fn a_build_past_nix_timeout_is_stopped_and_nothing_is_cached() {
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce);
    let server = Server::start();
    let server = server.restart(&[
        ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
        ("NIX_TIMEOUT", "3"),
        ("NIXERY_FAILURE_TTL", "2"),
    ]);
    let started = Instant::now();
    let response = client()
        .get(server.url("/v2/slow/manifests/latest"))
        .send()
        .await
        .unwrap();
    let (status, code, message) = registry_error(response).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    assert!(
        message.starts_with("building slow failed: it took longer than NIX_TIMEOUT (3s)"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // The builder (in a session of its own) and its children are gone.
    let needle = format!("nonce={nonce}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !processes_with_env(&needle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "builder still running: {:?}",
            processes_with_env(&needle)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Nothing was cached but the failure, for NIXERY_FAILURE_TTL: after it the next request
    // builds again.
    std::thread::sleep(Duration::from_millis(2100));
    let response = client()
        .get(server.url("/v2/slow/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(server.nix_builds(), 2);
}

#[tokio::test]
async fn a_server_killed_while_packing_leaves_no_partial_blob() {
    let server = Server::start();
    // Make sure `big` is realised so the test times packing, not Nix.
    let warm = Server::start();
    pull(&warm, "big").await;
    drop(warm);

    let url = server.url("/v2/big/manifests/latest");
    let request = tokio::spawn(async move { client().get(url).send().await });
    let staging = server.storage.join("tmp");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let staged = staged_bytes(&staging);
        if staged > 1024 * 1024 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "packing never started:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server = server.restart(&[]);
    assert!(
        request.await.unwrap().is_err(),
        "the killed server answered"
    );

    assert_blobs_intact(&server.storage);
    assert_eq!(
        std::fs::read_dir(server.storage.join("tmp"))
            .unwrap()
            .count(),
        0
    );
    let image = pull(&server, "big").await;
    assert!(image.layers.iter().map(|(_, b)| b.len()).sum::<usize>() > 64 << 20);
    assert_blobs_intact(&server.storage);
}

/// A tmpfs of `size` mounted for one test, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_is_a_registry_error_and_the_server_stays_up() {
    let disk = SmallDisk::mount("16m");
    let storage = disk.0.path().join("storage");
    let server = Server::start_on(&storage, &[]);
    let response = client()
        .get(server.url("/v2/big/manifests/latest"))
        .send()
        .await
        .unwrap();
    let (status, code, message) = registry_error(response).await;
    assert_eq!((status, code.as_str()), (500, "UNKNOWN"));
    assert!(
        message.contains("could not be packed into storage"),
        "{message}"
    );
    // Counted as a failed build, for the operator's alerts.
    assert_eq!(server.metric("nixery_builds_total{outcome=\"failed\"}"), 1);

    // Still serving, nothing corrupt, no staging leftovers, and a small image still fits.
    let response = client().get(server.url("/v2/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_blobs_intact(&storage);
    assert_eq!(std::fs::read_dir(storage.join("tmp")).unwrap().count(), 0);
    pull(&server, "hello").await;
    assert_eq!(server.metric("nixery_builds_total{outcome=\"built\"}"), 1);
    assert_eq!(server.metric("nixery_builds_total{outcome=\"failed\"}"), 1);
    drop(server);
}

#[tokio::test]
async fn a_build_goes_on_when_the_client_gives_up() {
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce);
    let server = Server::start();
    let server = server.restart(&[("NIXERY_PKGS_PATH", pkgs.to_str().unwrap())]);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let gave_up = impatient
        .get(server.url("/v2/slowish/manifests/latest"))
        .send()
        .await;
    assert!(
        gave_up.is_err(),
        "the build was not slow enough to test this"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("nixery_builds_total{outcome=\"built\"}") == 0 {
        assert!(
            Instant::now() < deadline,
            "the build stopped:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pull(&server, "slowish").await;
    assert_eq!(server.nix_builds(), 1);
}
