//! The parts of the distribution spec and of client habits beyond a plain pull: OCI manifests by
//! Accept header, manifests through the blobs route, mirror queries, Range requests, and the
//! headers every answer carries.

mod common;

use common::{Server, client, manifest_as, pull, raw_get, registry_error, sha256};

const DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI: &str = "application/vnd.oci.image.manifest.v1+json";

#[tokio::test]
async fn clients_that_accept_only_oci_get_an_oci_manifest() {
    let server = Server::start();
    let (docker_type, docker_digest, docker_body) =
        manifest_as(&server, "hello", "latest", DOCKER).await;
    assert_eq!(docker_type, DOCKER);
    let (oci_type, oci_digest, oci_body) = manifest_as(&server, "hello", "latest", OCI).await;
    assert_eq!(oci_type, OCI);
    assert_ne!(docker_digest, oci_digest);

    // Never mixed: every media type in the OCI manifest is an OCI one, and vice versa.
    let oci_text = String::from_utf8(oci_body.clone()).unwrap();
    assert!(!oci_text.contains("vnd.docker"), "{oci_text}");
    let docker_text = String::from_utf8(docker_body).unwrap();
    assert!(!docker_text.contains("vnd.oci"), "{docker_text}");
    let oci: serde_json::Value = serde_json::from_slice(&oci_body).unwrap();
    assert_eq!(
        oci["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(
        oci["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );

    // Both are stable and servable by digest with their own type, on both routes.
    let (_, again, _) = manifest_as(&server, "hello", "latest", OCI).await;
    assert_eq!(again, oci_digest);
    for (digest, media_type) in [(&docker_digest, DOCKER), (&oci_digest, OCI)] {
        for route in ["manifests", "blobs"] {
            let response = client()
                .get(server.url(&format!("/v2/hello/{route}/{digest}")))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{route} {digest}");
            assert_eq!(response.headers()["content-type"], media_type, "{route}");
            assert_eq!(response.headers()["docker-content-digest"], digest.as_str());
            assert_eq!(&sha256(&response.bytes().await.unwrap()), digest);
        }
    }

    // After a restart, before anyone asks for the image by tag, both manifests are served by
    // digest on both routes with their own media type (containerd keeps the type it gets).
    let server = server.restart(&[]);
    for (digest, media_type) in [(&docker_digest, DOCKER), (&oci_digest, OCI)] {
        for route in ["blobs", "manifests"] {
            for head in [true, false] {
                let url = server.url(&format!("/v2/hello/{route}/{digest}"));
                let request = if head {
                    client().head(url)
                } else {
                    client().get(url)
                };
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 200, "{route} {digest}");
                assert_eq!(
                    response.headers()["content-type"],
                    media_type,
                    "{route} {digest} head={head}"
                );
            }
        }
    }
    // Other blobs are still served as bytes: the config, and a layer.
    let manifest: serde_json::Value = serde_json::from_slice(&oci_body).unwrap();
    for blob in [
        &manifest["config"]["digest"],
        &manifest["layers"][0]["digest"],
    ] {
        let response = client()
            .get(server.url(&format!("/v2/hello/blobs/{}", blob.as_str().unwrap())))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["content-type"],
            "application/octet-stream"
        );
    }

    // And the restarted server derives the same OCI manifest from its cache.
    let (_, after_restart, _) = manifest_as(&server, "hello", "latest", OCI).await;
    assert_eq!(after_restart, oci_digest);
    assert_eq!(server.nix_builds(), 0);
}

#[tokio::test]
async fn a_mixed_accept_list_gets_docker_schema_2() {
    let server = Server::start();
    let (content_type, _, _) =
        manifest_as(&server, "hello", "latest", &format!("{OCI}, {DOCKER}")).await;
    assert_eq!(content_type, DOCKER);
    let (content_type, _, _) = manifest_as(&server, "hello", "latest", "*/*").await;
    assert_eq!(content_type, DOCKER);
}

#[tokio::test]
async fn mirror_requests_with_a_namespace_query_are_served() {
    let server = Server::start();
    let image = pull(&server, "hello").await;
    let response = client()
        .get(server.url("/v2/hello/manifests/latest?ns=registry.example"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["docker-content-digest"],
        image.digest.as_str()
    );
    let layer = &image.layers[0].0;
    let response = client()
        .get(server.url(&format!("/v2/hello/blobs/{layer}?ns=registry.example")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn blob_ranges_are_served() {
    let server = Server::start();
    let image = pull(&server, "hello").await;
    let (digest, bytes) = image.layers.iter().max_by_key(|(_, b)| b.len()).unwrap();
    let size = bytes.len();
    let url = server.url(&format!("/v2/hello/blobs/{digest}"));
    let http = client();
    for (range, start, end) in [
        ("bytes=0-99", 0, 99),
        (
            &format!("bytes={}-", size - 10) as &str,
            size - 10,
            size - 1,
        ),
        ("bytes=-5", size - 5, size - 1),
        (&format!("bytes=100-{}", size * 2) as &str, 100, size - 1),
    ] {
        let response = http.get(&url).header("range", range).send().await.unwrap();
        assert_eq!(response.status(), 206, "{range}");
        assert_eq!(
            response.headers()["content-range"],
            format!("bytes {start}-{end}/{size}").as_str()
        );
        assert_eq!(
            response.headers()["content-length"],
            (end - start + 1).to_string().as_str()
        );
        assert_eq!(response.headers()["docker-content-digest"], digest.as_str());
        assert_eq!(
            &response.bytes().await.unwrap()[..],
            &bytes[start..=end],
            "{range}"
        );
    }
    let response = http
        .get(&url)
        .header("range", format!("bytes={size}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-range"],
        format!("bytes */{size}").as_str()
    );
    let (status, code, _) = registry_error(response).await;
    assert_eq!((status, code.as_str()), (416, "RANGE_INVALID"));
    // A multi-range request is answered with the whole blob.
    let response = http
        .get(&url)
        .header("range", "bytes=0-1,5-6")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().len(), size);
}

#[tokio::test]
async fn head_answers_have_headers_and_no_body() {
    let server = Server::start();
    let image = pull(&server, "hello").await;
    let http = client();
    for path in [
        "/v2/hello/manifests/latest".to_owned(),
        format!("/v2/hello/manifests/{}", image.digest),
        format!("/v2/hello/blobs/{}", image.layers[0].0),
        format!(
            "/v2/hello/blobs/{}",
            image.manifest["config"]["digest"].as_str().unwrap()
        ),
    ] {
        let get = http.get(server.url(&path)).send().await.unwrap();
        let head = http.head(server.url(&path)).send().await.unwrap();
        assert_eq!(head.status(), 200, "{path}");
        for name in ["content-type", "content-length", "docker-content-digest"] {
            assert_eq!(
                head.headers().get(name),
                get.headers().get(name),
                "{name} of {path}"
            );
        }
        assert!(head.bytes().await.unwrap().is_empty(), "{path}");
    }
    let missing = format!("/v2/hello/blobs/sha256:{}", "1".repeat(64));
    let head = http.head(server.url(&missing)).send().await.unwrap();
    assert_eq!(head.status(), 404);
    assert!(head.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn every_error_has_a_registry_body() {
    let server = Server::start();
    for path in [
        "/v3/",
        "/v2",
        "/v2/hello",
        "/v2/hello/manifests/",
        "/favicon.ico",
        "/v2/_catalog",
        "/v2/hello/blobs/uploads/",
    ] {
        let (status, body) = raw_get(&server, path);
        assert!((400..500).contains(&status), "{path}: {status}");
        let parsed: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body:?}"));
        assert!(parsed["errors"][0]["code"].is_string(), "{path}: {body}");
    }
}
