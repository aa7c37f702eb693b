//! zstd images: the same layering as the gzip image of the same packages but blobs of their own,
//! an OCI manifest alone, found in storage by a new builder, listed in an OCI index, with SBOMs;
//! and gzip's keys as they always were.

use sha2::{Digest as _, Sha256};

use super::{Harness, amd64, arm64};
use crate::builder::{CYCLONEDX, SPDX};
use crate::layers::store::Packed;
use crate::manifest::{self, Compression, Format, OCI_INDEX, OCI_LAYER_TAR_ZSTD};

/// The `diff_id`s of an image's config: which tarballs, in which order.
fn diff_ids(harness: &Harness, manifest: &[u8]) -> serde_json::Value {
    let config = manifest::referenced_blobs(manifest).expect("a manifest")[0].clone();
    let bytes = std::fs::read(harness.blob_path(&config)).expect("the config is stored");
    let config: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    config["rootfs"]["diff_ids"].clone()
}

#[tokio::test]
async fn a_zstd_image_has_the_gzip_images_layering_and_its_own_blobs() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let gzip = builder
        .image(&harness.request("hello"))
        .await
        .expect("built");
    let zstd = builder
        .image(&harness.zstd_request("hello"))
        .await
        .expect("built");
    assert_eq!(harness.nix.builds(), 2, "one build per compression");
    assert_eq!(zstd.compression(), Compression::Zstd);
    let oci = zstd.manifest(Format::Oci);
    assert_eq!(oci.media_type, manifest::OCI_MANIFEST);
    assert!(std::sync::Arc::ptr_eq(oci, zstd.manifest(Format::Docker)));
    assert_eq!(zstd.manifests().count(), 1);
    let parsed: serde_json::Value = serde_json::from_slice(&oci.bytes).expect("JSON");
    for layer in parsed["layers"].as_array().expect("layers") {
        assert_eq!(layer["mediaType"], OCI_LAYER_TAR_ZSTD);
    }
    // The same tarballs in the same order: the same paths in the same layers.
    let gzip_docker = &gzip.manifest(Format::Docker).bytes;
    assert_eq!(
        diff_ids(&harness, &oci.bytes),
        diff_ids(&harness, gzip_docker)
    );
    let gzip_layers = manifest::layers(gzip_docker).expect("layers");
    let zstd_layers = manifest::layers(&oci.bytes).expect("layers");
    assert_eq!(gzip_layers.len(), zstd_layers.len());
    for ((gzip, _), (zstd, _)) in gzip_layers.iter().zip(&zstd_layers) {
        assert_ne!(gzip, zstd, "the blobs are each compression's own");
        let blob = std::fs::read(harness.blob_path(zstd)).expect("stored");
        let tar = ::zstd::stream::decode_all(&blob[..]).expect("a zstd stream");
        assert!(!tar.is_empty());
    }
}

#[tokio::test]
async fn a_new_builder_finds_a_zstd_image_in_storage_without_building() {
    let harness = Harness::new(4, 4);
    let request = harness.zstd_request("hello");
    let built = harness.builder().image(&request).await.expect("built");
    let fresh = harness.builder();
    let found = fresh.image(&request).await.expect("from storage");
    assert_eq!(harness.nix.builds(), 1, "storage answered");
    assert_eq!(found.compression(), Compression::Zstd);
    assert_eq!(
        found.manifest(Format::Oci).bytes,
        built.manifest(Format::Oci).bytes
    );
    // By digest too, from a builder that never saw it.
    let digest = &built.manifest(Format::Oci).digest;
    let stored = harness
        .builder()
        .stored_manifest(digest)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored.media_type, manifest::OCI_MANIFEST);
    // The gzip image is another build.
    harness
        .builder()
        .image(&harness.request("hello"))
        .await
        .expect("built");
    assert_eq!(harness.nix.builds(), 2);
}

#[tokio::test]
async fn a_zstd_index_is_oci_alone() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let index = builder
        .index(&harness.zstd_request("hello"), &[amd64(), arm64()])
        .await
        .expect("indexed");
    let oci = index.manifest(Format::Oci);
    assert_eq!(oci.media_type, OCI_INDEX);
    assert!(std::sync::Arc::ptr_eq(oci, index.manifest(Format::Docker)));
    let listed: serde_json::Value = serde_json::from_slice(&oci.bytes).expect("JSON");
    for image in listed["manifests"].as_array().expect("a list") {
        assert_eq!(image["mediaType"], manifest::OCI_MANIFEST);
    }
    assert!(
        builder
            .stored_manifest(&oci.digest)
            .await
            .expect("read")
            .is_some()
    );
}

#[tokio::test]
async fn a_zstd_image_has_its_sboms_and_referrers() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let image = builder
        .image(&harness.zstd_request("hello"))
        .await
        .expect("built");
    let digest = &image.manifest(Format::Oci).digest;
    let referrers = builder.referrers(digest).await.expect("read");
    assert_eq!(referrers.len(), 2, "{referrers:?}");
    for artifact_type in [SPDX, CYCLONEDX] {
        assert!(
            builder
                .sbom(digest, artifact_type)
                .await
                .expect("read")
                .is_some(),
            "{artifact_type}"
        );
    }
}

#[tokio::test]
async fn gzip_keys_are_what_they_were() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let commit = harness.commit_request("hello");
    // The manifest key as it was written before zstd layers existed, with the lines of the tight
    // budget's joins (this harness's budget of 4 layers is tight).
    let mut before = Sha256::new();
    before.update(
        "nixery-4\nlayers 4\ngzip 1\narchitecture amd64\nsystem x86_64-linux\ntight join 1.2\nsmall units 3000000 join 2.5\nsboms\n\
         source https://example.com/pkgs.git\ncommit 0123456789abcdef0123456789abcdef01234567\nhello\n",
    );
    assert_eq!(
        builder.manifest_key(&commit, None),
        hex::encode(before.finalize())
    );
    let zstd = crate::builder::Request {
        compression: Compression::Zstd,
        ..commit.clone()
    };
    assert_ne!(
        builder.manifest_key(&zstd, None),
        builder.manifest_key(&commit, None)
    );

    let paths = Packed::StorePaths(vec!["/nix/store/abc-hello".to_owned()]);
    let mut before = Sha256::new();
    before.update("nixery-4\ngzip 1\n/nix/store/abc-hello\n");
    assert_eq!(
        builder.layer_key(&paths, Compression::Gzip),
        hex::encode(before.finalize())
    );
    let mut zstd = Sha256::new();
    zstd.update("nixery-4\nzstd 3 tables 16 15\n/nix/store/abc-hello\n");
    assert_eq!(
        builder.layer_key(&paths, Compression::Zstd),
        hex::encode(zstd.finalize())
    );
}
