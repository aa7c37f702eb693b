//! What the tests of the bucket backends (gcs, s3) share: pulls that follow the 303 redirects
//! into the bucket, and a store that goes away in the middle of a build.

#![allow(async_fn_in_trait)] // test code: the futures are awaited where they are made

use std::time::{Duration, Instant};

use super::{Server, client, registry_error, sha256};

/// The blobs of an image's SBOMs: the empty config, the SPDX and CycloneDX documents, and an
/// artifact manifest of each for each of the image's two manifests.
pub const SBOM_BLOBS: usize = 7;

/// The bucket service's program that `script` installs at `default`, or `$variable`; a
/// missing one fails the test, naming the script.
pub fn server_binary(variable: &str, default: &str, script: &str) -> std::path::PathBuf {
    let path: std::path::PathBuf =
        std::env::var_os(variable).map_or_else(|| default.into(), Into::into);
    assert!(
        path.exists(),
        "{} is not installed: run `{script}` (scripts/test does), or set {variable}",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GETs (or HEADs) blob `digest`: checks the 303 and its headers, and returns the Location.
pub async fn redirect(server: &Server, digest: &str, head: bool) -> String {
    let url = server.url(&format!("/v2/any/blobs/{digest}"));
    let request = if head {
        client().head(url)
    } else {
        client().get(url)
    };
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 303, "blob {digest}");
    assert_eq!(response.headers()["docker-content-digest"], digest);
    response.headers()["location"].to_str().unwrap().to_owned()
}

/// Follows the redirect of blob `digest`, after `check(location)` (a signature check, say),
/// and checks the bytes against the digest.
pub async fn blob(server: &Server, digest: &str, check: &impl Fn(&str)) -> Vec<u8> {
    let location = redirect(server, digest, false).await;
    check(&location);
    let response = client().get(&location).send().await.unwrap();
    assert_eq!(response.status(), 200, "{location}");
    let bytes = response.bytes().await.unwrap().to_vec();
    assert_eq!(sha256(&bytes), digest, "bytes behind {location}");
    bytes
}

/// Pulls `name:reference` through the redirects: the manifest by tag, then every blob it names
/// (see [`blob`]). Returns the manifest's digest and the blob digests.
pub async fn pull_ref(
    server: &Server,
    name: &str,
    reference: &str,
    check: &impl Fn(&str),
) -> (String, Vec<String>) {
    let (digest, _, blobs) = pull_as(server, name, reference, None, check).await;
    (digest, blobs)
}

/// Pulls `name:reference` as [`pull_ref`] does, sending `Accept: <accept>` if given. Returns
/// the manifest's digest, the manifest, and the blob digests (the config's first).
pub async fn pull_as(
    server: &Server,
    name: &str,
    reference: &str,
    accept: Option<&str>,
    check: &impl Fn(&str),
) -> (String, serde_json::Value, Vec<String>) {
    let mut request = client().get(server.url(&format!("/v2/{name}/manifests/{reference}")));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let digest = response.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.bytes().await.unwrap();
    assert_eq!(sha256(&body), digest);
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
    for layer in manifest["layers"].as_array().unwrap() {
        blobs.push(layer["digest"].as_str().unwrap().to_owned());
    }
    for digest in &blobs {
        blob(server, digest, check).await;
    }
    (digest, manifest, blobs)
}

/// A bucket service that a test can take away and bring back, its objects kept.
pub trait Store {
    fn stop(&mut self);
    async fn start(&mut self);
    /// Checks every blob object against its key's digest; returns how many there are.
    async fn check_blobs(&self) -> usize;
}

/// `store` goes away while `server` builds `shell/hello`: the pull gets a registry error and
/// `/readyz` 503; what is in the bucket is whole; once the store is back the server is ready
/// and the next pull builds and stores the image (its redirects checked by `check`).
pub async fn store_gone_mid_build(server: &Server, store: &mut impl Store, check: &impl Fn(&str)) {
    let url = server.url("/v2/shell/hello/manifests/latest");
    let request = tokio::spawn(async move { client().get(url).send().await.unwrap() });
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.nix_builds() == 0 {
        assert!(Instant::now() < deadline, "no build started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.stop();
    let started = Instant::now();
    let (status, code, message) = registry_error(request.await.unwrap()).await;
    assert_eq!((status, code.as_str()), (500, "UNKNOWN"), "{message}");
    assert!(message.contains("storage failed"), "{message}");
    eprintln!(
        "the failed build answered {:?} after the store went away",
        started.elapsed()
    );
    super::readyz_becomes(server, 503, "ready without storage").await;

    store.start().await;
    let partial = store.check_blobs().await;
    super::readyz_becomes(server, 200, "not ready after storage came back").await;
    let (_, blobs) = pull_ref(server, "shell/hello", "latest", check).await;
    assert_eq!(store.check_blobs().await, blobs.len() + 2 + SBOM_BLOBS);
    assert!(partial <= blobs.len() + 2 + SBOM_BLOBS);
    assert_eq!(server.nix_builds(), 2);
}

/// Pulls the zstd image `name:latest` through the redirects as an OCI client asks for it (see
/// [`pull_as`]), and checks that its layers are `tar+zstd` whose bytes, fetched through the
/// redirect, decompress to the tars the config's diff_ids name. Returns the blob digests.
pub async fn pull_zstd(server: &Server, name: &str, check: &impl Fn(&str)) -> Vec<String> {
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let (_, manifest, blobs) = pull_as(server, name, "latest", Some(accept), check).await;
    assert_eq!(manifest["mediaType"], accept, "{manifest}");
    let config = blob(server, &blobs[0], check).await;
    let config: serde_json::Value = serde_json::from_slice(&config).expect("a JSON config");
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), diff_ids.len(), "{manifest}");
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        assert_eq!(
            layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd",
            "{manifest}"
        );
        let bytes = blob(server, layer["digest"].as_str().unwrap(), check).await;
        let tar = zstd::stream::decode_all(&bytes[..]).expect("a zstd layer decompresses");
        assert_eq!(sha256(&tar), diff_id.as_str().unwrap(), "{layer}");
    }
    blobs
}
