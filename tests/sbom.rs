//! Every image's SBOMs: an SPDX and a CycloneDX document of its Nix closure, checked by real
//! validators from PyPI (`ntia-checker`, cyclonedx-python-lib's JSON schema validator; installed
//! by scripts/sbom-validators) and against the store itself (every path once, its NAR hash, the
//! references); served through the referrers API and the referrers tag schema, byte-identical
//! from two servers, there after a restart without Nix, and without changing the image.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use common::{Server, client, docker_pull_and_run_hello, manifest_as, pull, require_docker, run};

const SPDX: &str = "application/spdx+json";
const CYCLONEDX: &str = "application/vnd.cyclonedx+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Where scripts/sbom-validators installs the validators.
fn validators() -> PathBuf {
    let bin = std::env::var_os("NIXERY_TOOLS")
        .map_or_else(|| PathBuf::from("/opt/nixery"), PathBuf::from)
        .join("sbom-venv/bin");
    assert!(
        bin.join("ntia-checker").exists(),
        "the SBOM validators are not installed in {}: run `scripts/sbom-validators` (scripts/test does)",
        bin.display()
    );
    bin
}

/// The image's SBOM in `format` (`spdx`, `cyclonedx`) from the API: its bytes and JSON.
async fn sbom(server: &Server, image: &str, format: &str) -> (Vec<u8>, serde_json::Value) {
    let response = client()
        .get(server.url(&format!("/api/v1/sbom/{image}?format={format}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{format} SBOM of {image}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = response.bytes().await.unwrap().to_vec();
    assert_eq!(
        content_type,
        if format == "spdx" { SPDX } else { CYCLONEDX }
    );
    let json = serde_json::from_slice(&bytes).expect("an SBOM is JSON");
    (bytes, json)
}

/// `GET /v2/<name>/referrers/<digest>[?query]`: status, `OCI-Filters-Applied`, the index.
async fn referrers(
    server: &Server,
    name: &str,
    digest: &str,
    query: &str,
) -> (u16, Option<String>, serde_json::Value) {
    let response = client()
        .get(server.url(&format!("/v2/{name}/referrers/{digest}{query}")))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], OCI_INDEX);
    let filters = response
        .headers()
        .get("oci-filters-applied")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, filters, response.json().await.unwrap())
}

#[tokio::test]
async fn each_manifest_of_an_image_has_its_sboms_as_referrers() {
    let server = Server::start();
    let image = pull(&server, "shell/hello").await;
    let oci_digest = {
        let response = client()
            .head(server.url("/v2/shell/hello/manifests/latest"))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        response.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let (spdx_bytes, _) = sbom(&server, "shell/hello", "spdx").await;
    let (cyclonedx_bytes, _) = sbom(&server, "shell/hello", "cyclonedx").await;

    for subject in [&image.digest, &oci_digest] {
        let (status, filters, index) = referrers(&server, "shell/hello", subject, "").await;
        assert_eq!(status, 200);
        assert_eq!(filters, None);
        assert_eq!(index["mediaType"], OCI_INDEX);
        let listed = index["manifests"].as_array().unwrap();
        let types: BTreeSet<&str> = listed
            .iter()
            .map(|d| d["artifactType"].as_str().unwrap())
            .collect();
        assert_eq!(types, BTreeSet::from([SPDX, CYCLONEDX]), "{index}");
        for descriptor in listed {
            assert_eq!(descriptor["mediaType"], OCI_MANIFEST);
            let digest = descriptor["digest"].as_str().unwrap();
            let (content_type, bytes) = manifest_ref(&server, digest).await;
            assert_eq!(content_type, OCI_MANIFEST);
            assert_eq!(bytes.len() as u64, descriptor["size"].as_u64().unwrap());
            let artifact: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            // An artifact of its type whose subject is the manifest, as Trivy reads it.
            let artifact_type = descriptor["artifactType"].as_str().unwrap();
            assert_eq!(artifact["artifactType"], artifact_type);
            assert_eq!(artifact["subject"]["digest"], subject.as_str());
            assert_eq!(
                artifact["config"]["mediaType"],
                "application/vnd.oci.empty.v1+json"
            );
            assert_eq!(artifact["layers"].as_array().unwrap().len(), 1);
            assert_eq!(artifact["layers"][0]["mediaType"], artifact_type);
            // The file name `oras pull` writes the document to.
            let title = &artifact["layers"][0]["annotations"]["org.opencontainers.image.title"];
            assert!(title.as_str().unwrap().starts_with("sbom."), "{artifact}");
            let document =
                common::blob(&server, artifact["layers"][0]["digest"].as_str().unwrap()).await;
            let expected = if artifact_type == SPDX {
                &spdx_bytes
            } else {
                &cyclonedx_bytes
            };
            assert_eq!(&document, expected, "the API and the artifact differ");
        }
        // Filtered by artifact type, with the header that says so.
        let (_, filters, index) = referrers(
            &server,
            "shell/hello",
            subject,
            "?artifactType=application%2Fspdx%2Bjson",
        )
        .await;
        assert_eq!(filters.as_deref(), Some("artifactType"));
        assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(index["manifests"][0]["artifactType"], SPDX);

        // The referrers tag schema answers the same index.
        let hex = subject.strip_prefix("sha256:").unwrap();
        let (content_type, bytes) = manifest_ref(&server, &format!("sha256-{hex}")).await;
        assert_eq!(content_type, OCI_INDEX);
        let tagged: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let (_, _, all) = referrers(&server, "shell/hello", subject, "").await;
        assert_eq!(tagged, all);
    }

    // The image's manifest says nothing of its SBOMs.
    assert!(image.manifest.get("subject").is_none());
    assert!(image.manifest.get("annotations").is_none());
    // A manifest without referrers has an empty index, not a 404.
    let config_digest = image.manifest["config"]["digest"].as_str().unwrap();
    let (status, _, index) = referrers(&server, "shell/hello", config_digest, "").await;
    assert_eq!(status, 200);
    assert_eq!(index["manifests"], serde_json::json!([]));
}

#[tokio::test]
async fn two_servers_write_the_same_documents_and_a_restart_keeps_them_without_nix() {
    let first = Server::start();
    let second = Server::start();
    for image in ["shell/hello", "curl"] {
        let a = pull(&first, image).await;
        let b = pull(&second, image).await;
        assert_eq!(a.digest, b.digest);
        for format in ["spdx", "cyclonedx"] {
            assert_eq!(
                sbom(&first, image, format).await.0,
                sbom(&second, image, format).await.0,
                "{format} of {image}"
            );
        }
    }
    let before = sbom(&first, "curl", "cyclonedx").await.0;
    let digest = pull(&first, "curl").await.digest;
    let (_, _, listed) = referrers(&first, "curl", &digest, "").await;
    assert!(first.nix_builds() >= 2, "the first server built its images");
    let restarted = first.restart(&[]);
    let (_, _, again) = referrers(&restarted, "curl", &digest, "").await;
    assert_eq!(again, listed);
    assert_eq!(sbom(&restarted, "curl", "cyclonedx").await.0, before);
    assert_eq!(restarted.nix_builds(), 0, "the restart ran Nix");
}

#[test]
fn docker_pulls_and_runs_an_image_with_sboms() {
    require_docker();
    let server = Server::start();
    docker_pull_and_run_hello(&format!("{}/shell/hello", server.host()));
}

#[tokio::test]
async fn the_documents_pass_the_validators_and_are_the_closure() {
    let bin = validators();
    let server = Server::start();
    pull(&server, "shell/hello").await;
    let dir = tempfile::tempdir().unwrap();
    let (spdx_bytes, spdx) = sbom(&server, "shell/hello", "spdx").await;
    let (cyclonedx_bytes, cyclonedx) = sbom(&server, "shell/hello", "cyclonedx").await;
    let spdx_file = dir.path().join("image.spdx.json");
    let cyclonedx_file = dir.path().join("image.cdx.json");
    std::fs::write(&spdx_file, &spdx_bytes).unwrap();
    std::fs::write(&cyclonedx_file, &cyclonedx_bytes).unwrap();
    // Each exits 0 only for a valid document (the NTIA minimum elements, for ntia-checker).
    run(
        bin.join("ntia-checker").to_str().unwrap(),
        &[spdx_file.to_str().unwrap()],
    );
    run(
        bin.join("validate-cyclonedx").to_str().unwrap(),
        &[cyclonedx_file.to_str().unwrap()],
    );

    // The closure as the store has it: each path's NAR hash and references.
    let root = {
        let image_deps: Vec<&str> = relationships(&spdx)
            .into_iter()
            .filter(|(from, _)| *from == "SPDXRef-Image")
            .map(|(_, to)| to)
            .collect();
        assert_eq!(image_deps.len(), 1, "the image depends on its root only");
        spdx_paths(&spdx)[image_deps[0]].clone()
    };
    let store = store_closure(&root);
    assert!(store.len() > 5, "{store:?}");

    // SPDX: every store path once, with its hash; DEPENDS_ON equal to the references.
    let paths = spdx_paths(&spdx);
    let listed: Vec<&String> = paths.values().collect();
    assert_eq!(listed.len(), store.len(), "a path twice, or one missing");
    assert_eq!(
        listed.iter().map(|p| p.as_str()).collect::<BTreeSet<_>>(),
        store.keys().map(String::as_str).collect()
    );
    for package in spdx["packages"].as_array().unwrap() {
        let Some(path) = package["packageFileName"].as_str() else {
            continue;
        };
        assert_eq!(
            package["checksums"][0]["checksumValue"], store[path].0,
            "NAR hash of {path}"
        );
    }
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, to) in relationships(&spdx) {
        if from != "SPDXRef-Image" {
            graph
                .entry(paths[from].as_str())
                .or_default()
                .insert(paths[to].as_str());
        }
    }
    for (path, (_, references)) in &store {
        let expected: BTreeSet<&str> = references.iter().map(String::as_str).collect();
        let listed = graph.get(path.as_str()).cloned().unwrap_or_default();
        assert_eq!(listed, expected, "references of {path}");
    }
    let hello = spdx["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "hello")
        .expect("hello is a package");
    assert_eq!(hello["versionInfo"], "2.12.1");
    assert_eq!(hello["licenseDeclared"], "GPL-3.0-or-later");
    assert_eq!(hello["homepage"], "https://www.gnu.org/software/hello/");
    assert_eq!(hello["primaryPackagePurpose"], "APPLICATION");

    // CycloneDX: the same paths, hashes and graph.
    let components = cyclonedx["components"].as_array().unwrap();
    assert_eq!(components.len(), store.len());
    for component in components {
        let path = component["bom-ref"].as_str().unwrap();
        assert_eq!(component["hashes"][0]["content"], store[path].0, "{path}");
    }
    for dependency in cyclonedx["dependencies"].as_array().unwrap() {
        let from = dependency["ref"].as_str().unwrap();
        let listed: BTreeSet<&str> = dependency["dependsOn"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        match store.get(from) {
            Some((_, references)) => {
                assert_eq!(
                    listed,
                    references.iter().map(String::as_str).collect(),
                    "{from}"
                )
            }
            None => assert_eq!(listed, BTreeSet::from([root.as_str()]), "the image"),
        }
    }
}

/// SPDX ids of store path packages to their store paths.
fn spdx_paths(spdx: &serde_json::Value) -> BTreeMap<&str, String> {
    spdx["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            Some((
                p["SPDXID"].as_str()?,
                p["packageFileName"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// The DEPENDS_ON relationships, as (from, to) ids.
fn relationships(spdx: &serde_json::Value) -> Vec<(&str, &str)> {
    spdx["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["relationshipType"] == "DEPENDS_ON")
        .map(|r| {
            (
                r["spdxElementId"].as_str().unwrap(),
                r["relatedSpdxElement"].as_str().unwrap(),
            )
        })
        .collect()
}

/// The closure of `root` from the Nix store: each path's NAR hash (hex) and references (itself
/// left out).
fn store_closure(root: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let paths = run("nix-store", &["--query", "--requisites", root]);
    let paths: Vec<&str> = paths.lines().collect();
    let mut args = vec!["--dump-db"];
    args.extend(&paths);
    let dump = run("nix-store", &args);
    let mut lines = dump.lines();
    let mut closure = BTreeMap::new();
    while let Some(path) = lines.next() {
        let hash = lines.next().unwrap().to_owned();
        let _size = lines.next();
        let _deriver = lines.next();
        let count: usize = lines.next().unwrap().parse().unwrap();
        let references = (0..count)
            .map(|_| lines.next().unwrap().to_owned())
            .filter(|r| r != path)
            .collect();
        closure.insert(path.to_owned(), (hash, references));
    }
    closure
}

#[tokio::test]
async fn every_platform_has_its_sboms_and_the_index_none() {
    common::require_arm64();
    let server = Server::start().restart(&[
        ("NIXERY_PLATFORMS", "linux/amd64,linux/arm64"),
        (
            "NIXERY_NIX_CONFIG",
            "substituters =\nextra-platforms = aarch64-linux",
        ),
    ]);
    let response = client()
        .get(server.url("/v2/shell/hello/manifests/latest"))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let index_digest = response.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let index: serde_json::Value = response.json().await.unwrap();
    let mut described = BTreeSet::new();
    for image in index["manifests"].as_array().unwrap() {
        let digest = image["digest"].as_str().unwrap();
        let (_, _, listed) = referrers(&server, "shell/hello", digest, "").await;
        assert_eq!(listed["manifests"].as_array().unwrap().len(), 2, "{image}");
        let spdx = &listed["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["artifactType"] == SPDX)
            .unwrap()["digest"];
        let (_, artifact) = manifest_ref(&server, spdx.as_str().unwrap()).await;
        let artifact: serde_json::Value = serde_json::from_slice(&artifact).unwrap();
        let document =
            common::blob(&server, artifact["layers"][0]["digest"].as_str().unwrap()).await;
        let document: serde_json::Value = serde_json::from_slice(&document).unwrap();
        // Each platform's document describes its own image.
        described.insert(document["packages"][0]["checksums"][0]["checksumValue"].to_string());
    }
    assert_eq!(
        described.len(),
        2,
        "the platforms' SBOMs describe the same image"
    );
    let (status, _, listed) = referrers(&server, "shell/hello", &index_digest, "").await;
    assert_eq!(status, 200);
    assert_eq!(listed["manifests"], serde_json::json!([]));
}

/// Manifest (or index) `reference` of `shell/hello`, OCI's types accepted: its type and bytes.
async fn manifest_ref(server: &Server, reference: &str) -> (String, Vec<u8>) {
    let accept = format!("{OCI_INDEX}, {OCI_MANIFEST}");
    let (content_type, _, body) = manifest_as(server, "shell/hello", reference, &accept).await;
    (content_type, body)
}
