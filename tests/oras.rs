//! An image's SBOMs as a real OCI client reads them: the ORAS Python SDK, oras-py 0.2.43 (from
//! PyPI, driven by scripts/oras-referrers; installed by scripts/sbom-validators), lists the
//! referrers of the image's manifest over plain HTTP and pulls each artifact by digest. That
//! version has no call for the referrers API, so it lists them from the referrers tag schema
//! (`sha256-<hex>`); the test checks that this is what the referrers API lists, that both
//! artifact types are there with the image as their subject, and that the documents the client
//! downloads are byte for byte those of `GET /api/v1/sbom/<image>`.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::{Server, client, pull, run};

const SPDX: &str = "application/spdx+json";
const CYCLONEDX: &str = "application/vnd.cyclonedx+json";

/// Where scripts/sbom-validators installs the oras-py driver.
fn oras_referrers() -> PathBuf {
    let program = std::env::var_os("NIXERY_TOOLS")
        .map_or_else(|| PathBuf::from("/opt/nixery"), PathBuf::from)
        .join("sbom-venv/bin/oras-referrers");
    assert!(
        program.exists(),
        "the ORAS Python SDK is not installed ({} is missing): run `scripts/sbom-validators` (scripts/test does)",
        program.display()
    );
    program
}

/// `GET <path>` on the server: its body, after checking the status is 200.
async fn get(server: &Server, path: &str) -> Vec<u8> {
    let response = client().get(server.url(path)).send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn oras_lists_the_sboms_of_an_image_and_pulls_each_document() {
    let oras = oras_referrers();
    let server = Server::start();
    let image = pull(&server, "shell/hello").await;
    let listed: serde_json::Value = serde_json::from_slice(
        &get(
            &server,
            &format!("/v2/shell/hello/referrers/{}", image.digest),
        )
        .await,
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let target = format!("{}/shell/hello@{}", server.host(), image.digest);
    let output = run(
        oras.to_str().unwrap(),
        &[&target, dir.path().to_str().unwrap()],
    );
    let read: serde_json::Value =
        serde_json::from_str(&output).expect("oras-referrers prints JSON");

    // What the client lists is what the referrers API lists: the same descriptors.
    assert_eq!(read["referrers"], listed["manifests"], "{output}");
    let types: BTreeSet<&str> = read["referrers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["artifactType"].as_str().unwrap())
        .collect();
    assert_eq!(types, BTreeSet::from([SPDX, CYCLONEDX]), "{output}");

    // Each artifact the client pulled is of its listed type, refers to the image, and holds the
    // document the API serves.
    let pulled = read["pulled"].as_array().unwrap();
    assert_eq!(pulled.len(), 2, "{output}");
    for artifact in pulled {
        let artifact_type = artifact["artifactType"].as_str().unwrap();
        assert_eq!(artifact["subject"], image.digest.as_str(), "{output}");
        let files = artifact["files"].as_array().unwrap();
        assert_eq!(files.len(), 1, "one document in {artifact}");
        let document = std::fs::read(files[0].as_str().unwrap()).unwrap();
        let format = if artifact_type == SPDX {
            "spdx"
        } else {
            "cyclonedx"
        };
        let expected = get(
            &server,
            &format!("/api/v1/sbom/shell/hello?format={format}"),
        )
        .await;
        assert!(
            document == expected,
            "the {format} document oras pulled differs from the API's"
        );
    }
}
