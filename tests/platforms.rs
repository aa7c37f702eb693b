//! Multi-platform images: with NIXERY_PLATFORMS a client that accepts an image index gets one
//! listing an amd64 and an arm64 image, and real clients (skopeo, docker, containerd) pick, pull
//! and run the arm64 one under emulation; an `arm64/` name is an arm64 image; clients that accept
//! no index still get the unchanged amd64 manifest; concurrent cold requests run one build per
//! platform; and a platform that cannot be built fails the index, naming the platform.
//!
//! Building arm64 on this (x86_64) machine needs qemu-user-static registered with binfmt_misc
//! and Debian's arm64 busybox-static at /usr/local/lib/busybox-static/aarch64-linux/busybox
//! (scripts/test sets both up), and Nix's `extra-platforms = aarch64-linux`, which the servers
//! here get through NIXERY_NIX_CONFIG.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

use common::{
    Server, blob, client, fault_pkgs, nonce, pull, raw_get, require_arm64, require_containerd,
    require_docker, require_tool, run, sha256,
};

/// The platforms every index here lists.
const PLATFORMS: &str = "linux/amd64,linux/arm64";
/// Nix settings that let the server build aarch64-linux packages under qemu emulation.
const EMULATED_NIX_CONFIG: &str = "substituters =\nextra-platforms = aarch64-linux";

const MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// What docker sends for a manifest: the list first, then single manifests.
const ACCEPT_ANY_MANIFEST: &str = "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

/// ELF `e_machine` values.
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

#[test]
fn skopeo_sees_both_platforms_and_copies_the_arm64_image_with_arm64_binaries() {
    require_tool("skopeo", "apt-get install skopeo");
    let server = platforms_server();
    let image = format!("docker://{}/shell/hello", server.host());

    let raw = run(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &image],
    );
    let index: serde_json::Value = serde_json::from_str(&raw).expect("the index is JSON");
    assert_eq!(index["mediaType"], MANIFEST_LIST, "{raw}");
    assert_eq!(
        listed_platforms(&index),
        BTreeSet::from([
            ("amd64".to_owned(), "linux".to_owned()),
            ("arm64".to_owned(), "linux".to_owned())
        ]),
        "{raw}"
    );

    let dir = tempfile::tempdir().unwrap();
    let copy = |arch: &str| {
        let target = dir.path().join(arch);
        run(
            "skopeo",
            &[
                "copy",
                "--override-arch",
                arch,
                "--src-tls-verify=false",
                &image,
                &format!("dir:{}", target.display()),
            ],
        );
        target
    };
    let arm64 = copy("arm64");
    assert_eq!(copied_config(&arm64)["architecture"], "arm64");
    assert_eq!(copied_config(&arm64)["os"], "linux");
    assert_eq!(busybox_machine(&arm64), EM_AARCH64);
    // The same check tells the amd64 image apart.
    let amd64 = copy("amd64");
    assert_eq!(copied_config(&amd64)["architecture"], "amd64");
    assert_eq!(busybox_machine(&amd64), EM_X86_64);
}

#[test]
fn docker_pulls_and_runs_the_arm64_image_under_emulation() {
    require_docker();
    let server = platforms_server();
    // The port is in the name: tests running at once pull different repositories.
    let image = format!("{}/shell/hello", server.host());
    run("docker", &["pull", "--platform", "linux/arm64", &image]);
    let architecture = run(
        "docker",
        &["image", "inspect", "--format", "{{.Architecture}}", &image],
    );
    assert_eq!(architecture.trim(), "arm64");
    let in_container = |command: &[&str]| {
        let mut args = vec![
            "run",
            "--rm",
            "--network",
            "none",
            "--platform",
            "linux/arm64",
            &image,
        ];
        args.extend_from_slice(command);
        run("docker", &args)
    };
    assert_eq!(in_container(&["hello"]), "Hello, world!\n");
    assert_eq!(in_container(&["uname", "-m"]), "aarch64\n");
    run("docker", &["rmi", &image]);
}

#[test]
fn containerd_pulls_every_platform_of_the_index() {
    require_containerd();
    let server = platforms_server();
    let namespace = format!("nixery-test-{}", server.port);
    let image = format!("{}/shell/hello:latest", server.host());
    common::ctr_pull(&namespace, &image, &["--all-platforms"]);
    let line = common::ctr_listed(&namespace, &image);
    assert!(line.contains("linux/amd64,linux/arm64"), "{line}");
    assert_eq!(server.nix_builds(), 2, "one build per platform");
    common::ctr_remove(&namespace, &image);
}

#[tokio::test]
async fn clients_that_accept_no_index_get_the_same_amd64_manifest_as_without_platforms() {
    let plain = Server::start();
    let indexed = platforms_server();
    let (status, headers, body) = manifest(&plain, "shell/hello", "latest", MANIFEST_V2).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], MANIFEST_V2);
    let amd64 = sha256(&body);

    // Docker's v2 manifest only, anything, or no Accept header at all: no index.
    for accept in [MANIFEST_V2, "*/*"] {
        let (status, headers, body) = manifest(&indexed, "shell/hello", "latest", accept).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(headers["content-type"], MANIFEST_V2, "Accept: {accept}");
        assert_eq!(sha256(&body), amd64, "Accept: {accept}");
    }
    let (status, body) = raw_get(&indexed, "/v2/shell/hello/manifests/latest");
    assert_eq!(status, 200, "{body}");
    assert_eq!(sha256(body.as_bytes()), amd64, "no Accept header");

    let (status, _, body) = manifest(&indexed, "shell/hello", "latest", MANIFEST_LIST).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(listed_digest(&index, "amd64"), amd64);
    assert_ne!(listed_digest(&index, "arm64"), amd64);
}

#[tokio::test]
async fn concurrent_cold_index_requests_run_one_build_per_platform() {
    let server = platforms_server();
    let requests = (0..20).map(|_| manifest(&server, "shell/hello", "latest", MANIFEST_LIST));
    let answers = futures::future::join_all(requests).await;
    let (_, headers, body) = &answers[0];
    let digest = headers["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(digest, sha256(body));
    for (status, headers, answer) in &answers {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(answer));
        assert_eq!(headers["content-type"], MANIFEST_LIST);
        assert_eq!(headers["docker-content-digest"], digest.as_str());
        assert_eq!(answer, body);
    }
    assert_eq!(server.nix_builds(), 2, "one build per platform");

    let head = client()
        .head(server.url("/v2/shell/hello/manifests/latest"))
        .header("accept", MANIFEST_LIST)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(
        head.headers()["content-length"],
        body.len().to_string().as_str()
    );

    // The index is stored: a client that resolved the tag fetches it by digest.
    let (status, headers, by_digest) =
        manifest(&server, "shell/hello", &digest, MANIFEST_LIST).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&by_digest));
    assert_eq!(headers["content-type"], MANIFEST_LIST);
    assert_eq!(&by_digest, body);
    // Stored once in each family (the OCI index is the other one).
    assert_eq!(stored_indexes(&server.storage).len(), 2);

    // A client that accepts only OCI gets an OCI index of OCI manifests, of the same images.
    let (status, headers, oci) = manifest(&server, "shell/hello", "latest", OCI_INDEX).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&oci));
    assert_eq!(headers["content-type"], OCI_INDEX);
    let oci: serde_json::Value = serde_json::from_slice(&oci).unwrap();
    assert_eq!(oci["mediaType"], OCI_INDEX);
    for entry in oci["manifests"].as_array().unwrap() {
        assert_eq!(entry["mediaType"], OCI_MANIFEST, "{oci}");
    }
    assert_eq!(listed_platforms(&oci).len(), 2, "{oci}");
    assert_eq!(server.nix_builds(), 2, "answering again built again");

    // A restarted server answers the same index from storage, building nothing.
    let server = server.restart(&platforms_env());
    let (status, _, again) = manifest(&server, "shell/hello", "latest", MANIFEST_LIST).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&again));
    assert_eq!(&again, body);
    assert_eq!(server.nix_builds(), 0, "the restarted server built again");
}

#[tokio::test]
async fn an_arm64_name_is_an_arm64_image_without_platforms_configured() {
    require_arm64();
    let server = Server::start().restart(&[("NIXERY_NIX_CONFIG", EMULATED_NIX_CONFIG)]);
    for name in ["arm64/shell/hello", "shell/arm64/hello"] {
        // Even to a client that accepts an index, the name is one image.
        let (status, headers, body) = manifest(&server, name, "latest", ACCEPT_ANY_MANIFEST).await;
        assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&body));
        assert_eq!(headers["content-type"], MANIFEST_V2, "{name}");
        let document: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let config = blob(&server, document["config"]["digest"].as_str().unwrap()).await;
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(config["architecture"], "arm64", "{name}");
    }
    let amd64 = pull(&server, "shell/hello").await;
    assert_eq!(amd64.config["architecture"], "amd64");
}

#[tokio::test]
async fn a_platform_that_cannot_be_built_fails_the_index_and_names_the_platform() {
    // No `extra-platforms`: this Nix cannot build aarch64-linux. `slowish` reads the nonce, so its
    // arm64 build is new to the Nix store (no earlier test can have built it) and must be built.
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce);
    let server = Server::start().restart(&[
        ("NIXERY_PLATFORMS", PLATFORMS),
        ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
    ]);
    let (status, headers, body) = manifest(&server, "shell/slowish", "latest", MANIFEST_LIST).await;
    let body: serde_json::Value = serde_json::from_slice(&body).expect("an error body");
    assert_eq!(headers["content-type"], "application/json");
    let error = &body["errors"][0];
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("MANIFEST_UNKNOWN")),
        "{body}"
    );
    let message = error["message"].as_str().unwrap();
    assert!(message.starts_with("linux/arm64: "), "{message}");
    assert!(
        message.contains("cannot build for aarch64-linux"),
        "{message}"
    );
    assert_eq!(error["detail"]["platform"], "linux/arm64", "{body}");
    assert_eq!(error["detail"]["reason"], "unsupported_platform", "{body}");

    // The amd64 image alone still builds, and no index was stored.
    let (status, _, body) = manifest(&server, "shell/slowish", "latest", MANIFEST_V2).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let amd64 = pull(&server, "shell/slowish").await;
    assert_eq!(amd64.digest, sha256(&body));
    assert_eq!(amd64.config["architecture"], "amd64");
    let stored = stored_indexes(&server.storage);
    assert!(stored.is_empty(), "indexes stored: {stored:?}");
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A server with fresh storage that serves indexes of amd64 and arm64 images and can build arm64.
fn platforms_server() -> Server {
    require_arm64();
    Server::start().restart(&platforms_env())
}

/// The settings of [`platforms_server`].
fn platforms_env() -> [(&'static str, &'static str); 2] {
    [
        ("NIXERY_PLATFORMS", PLATFORMS),
        ("NIXERY_NIX_CONFIG", EMULATED_NIX_CONFIG),
    ]
}

/// `GET /v2/<name>/manifests/<reference>` with `Accept: <accept>`: status, headers and body.
async fn manifest(
    server: &Server,
    name: &str,
    reference: &str,
    accept: &str,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let response = client()
        .get(server.url(&format!("/v2/{name}/manifests/{reference}")))
        .header("accept", accept)
        .send()
        .await
        .expect("manifest request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("manifest body").to_vec();
    (status, headers, body)
}

/// The (architecture, os) of every manifest an index lists.
fn listed_platforms(index: &serde_json::Value) -> BTreeSet<(String, String)> {
    index["manifests"]
        .as_array()
        .expect("an index lists manifests")
        .iter()
        .map(|m| {
            let field = |f: &str| m["platform"][f].as_str().expect("a platform").to_owned();
            (field("architecture"), field("os"))
        })
        .collect()
}

/// The digest of the manifest an index lists for `architecture`.
fn listed_digest(index: &serde_json::Value, architecture: &str) -> String {
    let listed = index["manifests"]
        .as_array()
        .expect("an index lists manifests");
    let found: Vec<_> = listed
        .iter()
        .filter(|m| m["platform"]["architecture"] == architecture)
        .collect();
    assert_eq!(found.len(), 1, "{architecture} in {index}");
    found[0]["digest"].as_str().unwrap().to_owned()
}

/// The bytes of blob `digest` in a directory skopeo copied an image into (`dir:` transport).
fn copied_blob(dir: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let bytes = std::fs::read(dir.join(hex)).expect("skopeo copied the blob");
    assert_eq!(sha256(&bytes), digest);
    bytes
}

/// The manifest skopeo copied into `dir`.
fn copied_manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// The image configuration skopeo copied into `dir`.
fn copied_config(dir: &Path) -> serde_json::Value {
    let digest = copied_manifest(dir)["config"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    serde_json::from_slice(&copied_blob(dir, &digest)).unwrap()
}

/// The ELF machine of the busybox binary (`nix/store/…-busybox/bin/busybox`, a regular file) in
/// the layers of the image skopeo copied into `dir`.
fn busybox_machine(dir: &Path) -> u16 {
    let manifest = copied_manifest(dir);
    for layer in manifest["layers"].as_array().unwrap() {
        let gzipped = copied_blob(dir, layer["digest"].as_str().unwrap());
        let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(&gzipped[..]));
        for entry in archive.entries().expect("a tar layer") {
            let mut entry = entry.expect("a tar entry");
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            if entry.header().entry_type().is_file() && path.ends_with("-busybox/bin/busybox") {
                let mut elf = Vec::new();
                entry.read_to_end(&mut elf).unwrap();
                assert_eq!(&elf[..4], b"\x7fELF", "{path} is not an ELF file");
                return u16::from_le_bytes([elf[18], elf[19]]);
            }
        }
    }
    panic!("no busybox binary in the layers of {}", dir.display());
}

/// The blobs in a filesystem storage directory that are image indexes (either family).
fn stored_indexes(storage: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(storage.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        let Ok(document) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue; // a layer
        };
        if [MANIFEST_LIST, OCI_INDEX].contains(&document["mediaType"].as_str().unwrap_or("")) {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}
