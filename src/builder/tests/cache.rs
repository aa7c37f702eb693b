//! Cache hits (memory, storage, a lost blob), reads by digest, platform fan-out and the keys
//! setups are told apart by.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Harness, amd64, arm64, until};
use crate::builder::Served;
use crate::image::declared::Config;
use crate::image::{ImageName, Platform};
use crate::manifest::Format;
use crate::storage::{Cache, Storage};

#[tokio::test]
async fn a_new_builder_finds_the_image_in_storage_without_building() {
    let harness = Harness::new(4, 4);
    let request = harness.request("hello");
    let built = harness.builder().image(&request).await.expect("built");
    let found = harness
        .builder()
        .image(&request)
        .await
        .expect("from storage");
    assert_eq!(
        built.manifest(Format::Docker).bytes,
        found.manifest(Format::Docker).bytes
    );
    assert_eq!(harness.nix.builds(), 1, "storage answered");
    assert_eq!(
        harness.nix.evaluations(),
        2,
        "a path's key is its evaluation's"
    );
}

#[tokio::test]
async fn an_image_that_lost_a_blob_is_built_again() {
    let harness = Harness::new(4, 4);
    let request = harness.request("hello");
    let built = harness.builder().image(&request).await.expect("built");
    let (layer, _) = crate::manifest::layers(&built.manifest(Format::Docker).bytes)
        .expect("a manifest")
        .remove(0);
    std::fs::remove_file(harness.blob_path(&layer)).expect("the layer was stored");
    let again = harness
        .builder()
        .image(&request)
        .await
        .expect("built again");
    assert_eq!(harness.nix.builds(), 2, "the cached image was incomplete");
    assert_eq!(
        built.manifest(Format::Docker).digest,
        again.manifest(Format::Docker).digest,
        "the same bytes"
    );
    assert!(harness.blob_path(&layer).exists(), "the layer is back");
}

#[tokio::test]
async fn a_stored_commit_image_needs_no_place_and_no_nix() {
    let harness = Harness::new(1, 0);
    let builder = harness.builder();
    let built = builder
        .image(&harness.request("hello"))
        .await
        .expect("built");
    let commit = harness.commit_request("hello");
    let key = builder.manifest_key(&commit, None);
    let docker = &built.manifest(Format::Docker).bytes;
    harness
        .storage
        .write_cache(Cache::Manifests, &key, docker)
        .await
        .expect("stored");

    let builder = harness.builder();
    harness.nix.hold();
    let busy = builder.clone();
    let curl = harness.request("curl");
    let holding = tokio::spawn(async move { busy.image(&curl).await });
    until("another build has the only place", || {
        harness.nix.started.load(Ordering::SeqCst) == 2
    })
    .await;
    let found = builder.image(&commit).await.expect("from storage");
    assert_eq!(&found.manifest(Format::Docker).bytes, docker);
    assert_eq!(harness.nix.evaluations(), 2, "the commit was not evaluated");
    harness.nix.release();
    holding.await.expect("no panic").expect("built");
}

#[tokio::test]
async fn manifests_are_served_by_digest_from_memory_and_from_storage() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let image = builder
        .image(&harness.request("hello"))
        .await
        .expect("built");
    let oci = image.manifest(Format::Oci).clone();
    match builder.blob(&oci.digest, false).await.expect("read") {
        Some(Served::Manifest(manifest)) => assert_eq!(manifest.media_type, oci.media_type),
        _ => panic!("a manifest on the blobs route is served as one"),
    }
    let fresh = harness.builder();
    assert!(fresh.known_manifest(&oci.digest).is_none());
    let stored = fresh.stored_manifest(&oci.digest).await.expect("read");
    assert_eq!(stored.expect("stored").bytes, oci.bytes);
    assert!(fresh.known_manifest(&oci.digest).is_some(), "remembered");
}

#[tokio::test]
async fn an_index_builds_each_platform_once() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let request = harness.request("hello");
    let platforms = [amd64(), arm64()];
    let (first, second) = tokio::join!(
        builder.index(&request, &platforms),
        builder.index(&request, &platforms)
    );
    let (first, second) = (first.expect("indexed"), second.expect("indexed"));
    assert_eq!(harness.nix.builds(), 2, "one build per platform");
    let docker = first.manifest(Format::Docker);
    assert_eq!(docker.bytes, second.manifest(Format::Docker).bytes);
    let listed: serde_json::Value = serde_json::from_slice(&docker.bytes).expect("JSON");
    let architectures: Vec<&str> = listed["manifests"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|m| m["platform"]["architecture"].as_str())
        .collect();
    assert_eq!(architectures, ["amd64", "arm64"]);
    assert!(builder.known_manifest(&docker.digest).is_some());
}

#[tokio::test]
async fn a_failing_platform_fails_the_index() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    harness.nix.fail_system(arm64().system());
    let failure = builder
        .index(&harness.request("hello"), &[amd64(), arm64()])
        .await
        .expect_err("arm64 fails");
    assert_eq!(failure.platform, Some(arm64()));
    assert!(failure.err.is_the_requests());
}

/// The manifest key of `name` as built for `platform` from the same derivation.
fn key(harness: &Harness, name: ImageName, platform: Platform) -> String {
    let mut request = harness.request("hello");
    request.name = name;
    request.platform = platform;
    let drv = crate::nix::Derivation::fake("/nix/store/x-hello.drv".to_owned());
    harness.builder().manifest_key(&request, Some(&drv))
}

#[tokio::test]
async fn setups_have_keys_of_their_own() {
    let harness = Harness::new(4, 4);
    let name = |text: &str| text.parse::<ImageName>().expect("a valid name");
    let declared = |user: &str| {
        let config = Config {
            user: Some(user.to_owned()),
            ..Config::default()
        };
        ImageName::declared(&name("app"), &name("hello"), Arc::new(config))
    };
    let plain = key(&harness, name("hello"), amd64());
    assert_eq!(plain, key(&harness, name("hello"), amd64()), "stable");
    let others = [
        key(&harness, name("nonroot/hello"), amd64()),
        key(&harness, declared("1000"), amd64()),
        key(&harness, declared("1001"), amd64()),
        key(&harness, name("hello"), arm64()),
    ];
    for (i, other) in others.iter().enumerate() {
        assert_ne!(&plain, other, "setup {i} shares the plain key");
        assert!(others[i + 1..].iter().all(|o| o != other), "setup {i}");
    }
}

#[tokio::test]
async fn the_order_of_components_does_not_change_the_key() {
    let harness = Harness::new(4, 4);
    let name = |text: &str| text.parse::<ImageName>().expect("a valid name");
    assert_eq!(
        key(&harness, name("hello/curl"), amd64()),
        key(&harness, name("curl/hello/curl"), amd64())
    );
}

#[tokio::test]
async fn a_nonroot_image_is_built_of_its_own() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let plain = builder
        .image(&harness.request("hello"))
        .await
        .expect("built");
    let nonroot = builder
        .image(&harness.request("nonroot/hello"))
        .await
        .expect("built");
    assert_ne!(
        plain.manifest(Format::Docker).digest,
        nonroot.manifest(Format::Docker).digest
    );
    assert_eq!(
        harness.nix.evaluations(),
        1,
        "one evaluation of the packages"
    );
    assert_eq!(harness.nix.builds(), 2);
}

#[tokio::test]
async fn a_path_key_is_known_without_nix_only_while_its_evaluation_is_fresh() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let request = harness.request("hello");
    assert!(builder.known_key(&request).is_none(), "not evaluated yet");
    builder.image(&request).await.expect("built");
    assert!(builder.known_key(&request).is_some());
    let commit = harness.commit_request("hello");
    assert_eq!(
        builder.known_key(&commit),
        Some(builder.manifest_key(&commit, None))
    );
}
