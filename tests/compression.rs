//! zstd layers end to end: a `zstd-layers/` name (or `NIXERY_LAYER_COMPRESSION=zstd`) gives an OCI
//! manifest of `tar+zstd` layers that containerd pulls and runs, podman pulls and skopeo copies
//! into an OCI layout (each checked against its digests and diff_ids); Debian 12's Docker 20.10
//! and schema2-only clients get a message naming the reason and the fix instead of a broken pull;
//! the same packages give the same bytes on one thread and on every core, the same layering as
//! the gzip image (not its blobs), and a restart serves them without Nix; SBOMs and
//! multi-platform indexes work as for gzip images.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::{
    Server, blob, client, manifest_as, raw_get, registry_error, require_arm64, require_containerd,
    require_docker, require_tool, run, run_failing, sha256,
};

const MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_GZIP_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// What containerd 1.6 sends for a manifest: Docker's types first, then OCI's.
const CONTAINERD_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

/// A pulled image of OCI type: its manifest and config, and each layer's compressed bytes
/// (checked against digest and size) with the media type the manifest gives it.
struct Image {
    digest: String,
    manifest: serde_json::Value,
    config: serde_json::Value,
    layers: Vec<(String, Vec<u8>)>,
}

impl Image {
    fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|(d, _)| d.clone()).collect()
    }

    fn diff_ids(&self) -> Vec<String> {
        strings(&self.config["rootfs"]["diff_ids"])
    }

    fn layer_types(&self) -> BTreeSet<String> {
        self.manifest["layers"]
            .as_array()
            .expect("a manifest lists layers")
            .iter()
            .map(|l| l["mediaType"].as_str().expect("a media type").to_owned())
            .collect()
    }
}

/// Pulls `name:latest` with `Accept: <accept>` as a client would: the manifest (which must be of
/// `manifest_type`), the config and every layer, checking each digest and size, and that each
/// layer decompressed (zstd or gzip, as its media type says) hashes to its diff_id.
async fn pull_as(server: &Server, name: &str, accept: &str, manifest_type: &str) -> Image {
    let (content_type, digest, body) = manifest_as(server, name, "latest", accept).await;
    assert_eq!(content_type, manifest_type, "{name} with Accept: {accept}");
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("a JSON manifest");
    assert_eq!(manifest["mediaType"], manifest_type);
    let config_bytes = blob(server, manifest["config"]["digest"].as_str().unwrap()).await;
    let config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
    let diff_ids = strings(&config["rootfs"]["diff_ids"]);
    let listed = manifest["layers"]
        .as_array()
        .expect("a manifest lists layers");
    assert_eq!(listed.len(), diff_ids.len(), "a diff_id per layer");
    let mut layers = Vec::new();
    for (layer, diff_id) in listed.iter().zip(&diff_ids) {
        let digest = layer["digest"].as_str().unwrap().to_owned();
        let bytes = blob(server, &digest).await;
        assert_eq!(bytes.len() as u64, layer["size"].as_u64().unwrap(), "size");
        let media_type = layer["mediaType"].as_str().unwrap();
        assert_eq!(
            &sha256(&decompress(media_type, &bytes)),
            diff_id,
            "{digest}"
        );
        layers.push((digest, bytes));
    }
    Image {
        digest,
        manifest,
        config,
        layers,
    }
}

/// Pulls `name` as containerd asks for it: an OCI manifest of zstd layers.
async fn pull_zstd(server: &Server, name: &str) -> Image {
    let image = pull_as(server, name, CONTAINERD_ACCEPT, OCI_MANIFEST).await;
    assert_eq!(
        image.layer_types(),
        BTreeSet::from([ZSTD_LAYER.to_owned()]),
        "{name}: {}",
        image.manifest
    );
    image
}

/// The tar a layer of `media_type` holds.
fn decompress(media_type: &str, bytes: &[u8]) -> Vec<u8> {
    match media_type {
        ZSTD_LAYER => zstd::stream::decode_all(bytes).expect("a zstd layer decompresses"),
        GZIP_LAYER | DOCKER_GZIP_LAYER => {
            let mut tar = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(bytes), &mut tar)
                .expect("a gzip layer decompresses");
            tar
        }
        other => panic!("a layer of unexpected type {other}"),
    }
}

/// A JSON array of strings.
fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Real clients

#[test]
fn containerd_pulls_and_runs_a_zstd_image() {
    require_containerd();
    let server = Server::start();
    let namespace = format!("nixery-test-{}", server.port);
    let image = format!("{}/zstd-layers/shell/hello:latest", server.host());
    common::ctr_pull(&namespace, &image, &[]);
    // containerd stored an OCI manifest of zstd layers, and unpacked them (a run needs that).
    let line = common::ctr_listed(&namespace, &image);
    assert!(line.contains(OCI_MANIFEST), "{line}");
    let digest = line
        .split_whitespace()
        .find(|f| f.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in {line}"));
    let manifest: serde_json::Value =
        serde_json::from_str(&common::ctr(&namespace, &["content", "get", digest]))
            .expect("a JSON manifest");
    for layer in manifest["layers"].as_array().unwrap() {
        assert_eq!(layer["mediaType"], ZSTD_LAYER, "{manifest}");
    }
    assert_eq!(server.nix_builds(), 1);
    let container = format!("zstd-hello-{}", server.port);
    let out = common::ctr_run_hello(&namespace, &image, &container);
    assert_eq!(out, "Hello, world!\n");
    common::ctr_remove(&namespace, &image);
}

#[test]
fn podman_pulls_a_zstd_image() {
    require_tool("podman", "apt-get install podman");
    require_tool("skopeo", "apt-get install skopeo");
    let server = Server::start();
    let image = format!("{}/zstd-layers/shell/hello", server.host());
    // Storage of its own, empty: podman reuses layers it holds (by diff_id) without fetching
    // them, and here it must decompress every layer and check it against its diff_id.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let runroot = dir.path().join("runroot");
    let (root, runroot) = (root.to_str().unwrap(), runroot.to_str().unwrap());
    run(
        "podman",
        &[
            "--root",
            root,
            "--runroot",
            runroot,
            "--storage-driver",
            "vfs",
            "pull",
            "--tls-verify=false",
            &image,
        ],
    );
    let stored = run(
        "skopeo",
        &[
            "inspect",
            "--raw",
            &format!("containers-storage:[vfs@{root}+{runroot}]{image}"),
        ],
    );
    let manifest: serde_json::Value = serde_json::from_str(&stored).expect("a JSON manifest");
    assert_eq!(manifest["mediaType"], OCI_MANIFEST, "{stored}");
    for layer in manifest["layers"].as_array().unwrap() {
        assert_eq!(layer["mediaType"], ZSTD_LAYER, "{stored}");
    }
}

#[tokio::test]
async fn skopeo_copies_a_zstd_image_into_an_oci_layout_with_its_digests_and_diff_ids() {
    require_tool("skopeo", "apt-get install skopeo");
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    run(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/zstd-layers/shell/hello:latest", server.host()),
            &format!("oci:{}:latest", layout.display()),
        ],
    );
    let index = std::fs::read(layout.join("index.json")).expect("the layout's index.json");
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{index}");
    assert_eq!(entries[0]["mediaType"], OCI_MANIFEST);
    let manifest_digest = entries[0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&layout_blob(&layout, manifest_digest)).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&layout_blob(&layout, config_digest)).unwrap();
    let diff_ids = strings(&config["rootfs"]["diff_ids"]);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len(), "{manifest}");
    for (layer, diff_id) in layers.iter().zip(&diff_ids) {
        assert_eq!(layer["mediaType"], ZSTD_LAYER, "{manifest}");
        let bytes = layout_blob(&layout, layer["digest"].as_str().unwrap());
        assert_eq!(bytes.len() as u64, layer["size"].as_u64().unwrap());
        assert_eq!(&sha256(&decompress(ZSTD_LAYER, &bytes)), diff_id);
    }
    // skopeo copied the image as the server serves it: the same manifest, byte for byte.
    let served = pull_zstd(&server, "zstd-layers/shell/hello").await;
    assert_eq!(served.digest, manifest_digest);
}

/// Blob `digest` of the OCI layout at `layout`, checked against the digest.
fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).expect("a blob of the layout");
    assert_eq!(sha256(&bytes), digest, "the layout's blob {digest}");
    bytes
}

// ---------------------------------------------------------------------------------------------
// Clients that cannot read zstd

#[tokio::test]
async fn docker_20_10_and_schema2_only_clients_are_told_to_drop_zstd_layers() {
    require_docker();
    let server = Server::start();
    let name = "zstd-layers/shell/hello";

    // Docker 20.10 lists OCI manifests in its Accept but cannot unpack zstd: its User-Agent says
    // which Docker it is.
    let docker = run_failing("docker", &["pull", &format!("{}/{name}", server.host())]);
    assert!(docker.contains("manifest unknown: "), "{docker}");
    assert!(
        docker.contains("Docker 20.10.24+dfsg1 cannot unpack zstd layers"),
        "no reason in: {docker}"
    );
    assert_fix(&docker);
    assert_eq!(
        server.nix_builds(),
        0,
        "an image Docker cannot read was built"
    );

    assert_refused_without_oci(&server, name, MANIFEST_V2).await;
    // No Accept header at all is a schema2 client too (a plain HTTP/1.1 request).
    let (status, body) = raw_get(&server, &format!("/v2/{name}/manifests/latest"));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains(NO_OCI_REASON), "no reason in: {body}");
    assert_fix(&body);

    // A client that lists both gets the OCI manifest of zstd layers.
    let image = pull_zstd(&server, name).await;
    assert_eq!(image.config["architecture"], "amd64");
    let accept = format!("{MANIFEST_V2}, {OCI_MANIFEST}");
    let both = pull_as(&server, name, &accept, OCI_MANIFEST).await;
    assert_eq!(both.digest, image.digest);
    assert_eq!(server.nix_builds(), 1);
}

#[tokio::test]
async fn docker_20_10_is_told_why_when_it_pulls_a_zstd_image_by_digest() {
    require_docker();
    // A package no earlier pull gave Docker: its layer must be downloaded and unpacked.
    let pkgs = common::fault_pkgs(&common::nonce());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_PKGS_PATH", pkgs.to_str().unwrap())],
    );
    let name = "zstd-layers/shell/slowish";
    let image = pull_zstd(&server, name).await;
    // A digest is what a deployment pins, and what containerd resolved the tag to.
    let pinned = format!("{}/{name}@{}", server.host(), image.digest);
    let docker = run_failing("docker", &["pull", &pinned]);
    assert!(
        !docker.contains("invalid tar header"),
        "a broken pull: {docker}"
    );
    assert!(
        docker.contains("Docker 20.10.24+dfsg1 cannot unpack zstd layers"),
        "no reason in: {docker}"
    );
}

/// Why a client that accepts no OCI manifest type cannot have zstd layers.
const NO_OCI_REASON: &str = "zstd layers are described by an OCI manifest only";

/// Asks for `name`'s manifest accepting `accept` alone (no OCI type) and checks the refusal:
/// 404 `MANIFEST_UNKNOWN`, why, and the fix.
async fn assert_refused_without_oci(server: &Server, name: &str, accept: &str) {
    let response = client()
        .get(server.url(&format!("/v2/{name}/manifests/latest")))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    let (status, code, message) = registry_error(response).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "MANIFEST_UNKNOWN"),
        "{message}"
    );
    assert!(message.contains(NO_OCI_REASON), "no reason in: {message}");
    assert_fix(&message);
}

/// Checks that a refusal of `zstd-layers/shell/hello` names the fix: the name without
/// `zstd-layers/`.
fn assert_fix(printed: &str) {
    assert!(
        printed.contains("pull shell/hello instead") && printed.contains("drop `zstd-layers/`"),
        "no fix in: {printed}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bytes and layering

#[tokio::test]
async fn one_thread_and_every_core_pack_byte_identical_zstd_layers() {
    require_tool("taskset", "apt-get install util-linux");
    // `big` is a 64 MiB layer: many compression blocks, spread over the pool when it has threads.
    let name = "zstd-layers/shell/big";
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(
        cores > 1,
        "this test needs more than one core to compare with one"
    );

    let all = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("one-core");
    let mut pinned = Command::new("taskset");
    pinned
        .args(["-c", "0", env!("CARGO_BIN_EXE_nixery")])
        .envs(Server::env(&storage, &[]));
    let one = Server::start_command(&storage, pinned);
    assert_eq!(allowed_cpus(&one), 1, "taskset did not pin the server");
    assert_eq!(allowed_cpus(&all), cores);

    let a = pull_zstd(&one, name).await;
    let b = pull_zstd(&all, name).await;
    assert_eq!(a.digest, b.digest, "{}\n{}", a.manifest, b.manifest);
    for ((digest_a, bytes_a), (digest_b, bytes_b)) in a.layers.iter().zip(&b.layers) {
        assert_eq!(digest_a, digest_b);
        assert!(bytes_a == bytes_b, "layer {digest_a} differs");
    }
    let largest = a.layers.iter().map(|(_, b)| b.len()).max().unwrap();
    assert!(largest > 32 << 20, "no large layer: {largest} bytes");
}

/// How many CPUs the server may run on (`Cpus_allowed_list` of its /proc status).
fn allowed_cpus(server: &Server) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/<pid>/status");
    list.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((from, to)) => to.parse::<usize>().unwrap() - from.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

#[tokio::test]
async fn zstd_and_gzip_images_of_the_same_packages_share_their_layering_not_their_blobs() {
    let server = Server::start();
    let zstd = pull_zstd(&server, "zstd-layers/shell/curl").await;
    let gzip = pull_as(&server, "shell/curl", OCI_MANIFEST, OCI_MANIFEST).await;
    assert_eq!(gzip.layer_types(), BTreeSet::from([GZIP_LAYER.to_owned()]));
    assert!(zstd.layers.len() > 2, "{}", zstd.manifest);
    // The same tars, so the same paths in the same layers.
    assert_eq!(zstd.diff_ids(), gzip.diff_ids());
    let zstd_blobs: BTreeSet<String> = zstd.layer_digests().into_iter().collect();
    let gzip_blobs: BTreeSet<String> = gzip.layer_digests().into_iter().collect();
    assert!(
        zstd_blobs.is_disjoint(&gzip_blobs),
        "shared blobs: {:?}",
        zstd_blobs.intersection(&gzip_blobs).collect::<Vec<_>>()
    );
    assert_ne!(zstd.digest, gzip.digest);
}

#[tokio::test]
async fn a_restart_serves_a_zstd_image_without_nix_or_packing() {
    let server = Server::start();
    let before = pull_zstd(&server, "zstd-layers/shell/hello").await;
    assert_eq!(server.nix_builds(), 1);
    assert!(server.uploads() > 0);
    let server = server.restart(&[]);
    let after = pull_zstd(&server, "zstd-layers/shell/hello").await;
    assert_eq!(after.digest, before.digest);
    assert_eq!(after.layer_digests(), before.layer_digests());
    assert_eq!(server.nix_builds(), 0, "the restarted server built again");
    assert_eq!(server.uploads(), 0, "the restarted server packed again");
}

// ---------------------------------------------------------------------------------------------
// SBOMs, platforms, the server's default

#[tokio::test]
async fn a_zstd_image_has_its_sboms_as_referrers() {
    let server = Server::start();
    let name = "zstd-layers/shell/hello";
    let image = pull_zstd(&server, name).await;
    let response = client()
        .get(server.url(&format!("/v2/{name}/referrers/{}", image.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let index: serde_json::Value = response.json().await.unwrap();
    let listed = index["manifests"].as_array().unwrap();
    let types: BTreeSet<&str> = listed
        .iter()
        .map(|d| d["artifactType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        BTreeSet::from(["application/spdx+json", "application/vnd.cyclonedx+json"]),
        "{index}"
    );
    // Each is an artifact about this manifest.
    for descriptor in listed {
        let digest = descriptor["digest"].as_str().unwrap();
        let (_, _, body) = manifest_as(&server, name, digest, OCI_MANIFEST).await;
        let artifact: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(artifact["subject"]["digest"], image.digest.as_str());
    }
}

#[tokio::test]
async fn a_multi_platform_zstd_index_lists_zstd_images_of_each_platform() {
    require_arm64();
    let server = Server::start().restart(&[
        ("NIXERY_PLATFORMS", "linux/amd64,linux/arm64"),
        (
            "NIXERY_NIX_CONFIG",
            "substituters =\nextra-platforms = aarch64-linux",
        ),
    ]);
    let name = "zstd-layers/shell/hello";
    let (content_type, _, body) = manifest_as(&server, name, "latest", CONTAINERD_ACCEPT).await;
    assert_eq!(
        content_type,
        OCI_INDEX,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut architectures = BTreeSet::new();
    for entry in index["manifests"].as_array().unwrap() {
        assert_eq!(entry["mediaType"], OCI_MANIFEST, "{index}");
        let digest = entry["digest"].as_str().unwrap();
        let (_, _, body) = manifest_as(&server, name, digest, OCI_MANIFEST).await;
        let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for layer in manifest["layers"].as_array().unwrap() {
            assert_eq!(layer["mediaType"], ZSTD_LAYER, "{manifest}");
        }
        let config = blob(&server, manifest["config"]["digest"].as_str().unwrap()).await;
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(entry["platform"]["architecture"], config["architecture"]);
        architectures.insert(config["architecture"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        architectures,
        BTreeSet::from(["amd64".to_owned(), "arm64".to_owned()])
    );
    assert_eq!(server.nix_builds(), 2, "one build per platform");
    // Docker's manifest list cannot hold zstd images: a client that asks only for it is told so.
    assert_refused_without_oci(&server, name, MANIFEST_LIST).await;
}

#[tokio::test]
async fn a_zstd_default_gives_oci_clients_zstd_and_docker_20_10_gzip() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_LAYER_COMPRESSION", "zstd")],
    );
    let zstd = pull_zstd(&server, "shell/hello").await;
    // A schema2 client gets the gzip image of the same packages.
    let gzip = pull_as(&server, "shell/hello", MANIFEST_V2, MANIFEST_V2).await;
    assert_eq!(
        gzip.layer_types(),
        BTreeSet::from([DOCKER_GZIP_LAYER.to_owned()])
    );
    assert_eq!(gzip.diff_ids(), zstd.diff_ids());
    // So does Docker 20.10, which lists OCI types but cannot read zstd; it runs the image. Docker
    // skips the layers of an image it holds (the zstd image has the gzip one's config), so the
    // manifest it pulled is what shows which image it was given.
    let image = format!("{}/shell/hello", server.host());
    common::docker_pull_and_run_hello(&image);
    let pulled = run(
        "docker",
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            &image,
        ],
    );
    assert!(
        pulled.contains(&format!("{image}@{}", gzip.digest)),
        "Docker pulled {pulled}, the gzip manifest is {}",
        gzip.digest
    );
    run("docker", &["rmi", &image]);
}
