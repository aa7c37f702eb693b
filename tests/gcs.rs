//! The gcs backend against a real Cloud Storage emulator (fake-gcs-server on 127.0.0.1): what
//! lands in the bucket, uploads skipped when objects are there, 303 redirects to the object (signed
//! with a throwaway service-account key when one is configured), an emulator that stops mid-build,
//! two replicas sharing one bucket (and one signature, made once), and a real `docker pull`
//! through the redirect.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::bucket::{self, SBOM_BLOBS, free_port, redirect};
use common::{
    Background, Server, client, docker_pull_and_run_hello, registry_error, require_docker,
    require_tool, run, sha256, trixie,
};
use md5::Digest as _;
use nixery::storage::bucket::Bucket;

const BUCKET: &str = "nixery-layers";

/// Where scripts/fake-gcs-server links the emulator (or `FAKE_GCS_SERVER`).
fn emulator_binary() -> PathBuf {
    bucket::server_binary(
        "FAKE_GCS_SERVER",
        "/opt/nixery/bin/fake-gcs-server",
        "scripts/fake-gcs-server",
    )
}

/// A running fake-gcs-server; killed when dropped.
struct Emulator {
    child: Option<Child>,
    port: u16,
    /// Objects live here (filesystem backend), so they survive a restart; else in memory.
    root: Option<PathBuf>,
}

impl Emulator {
    /// An emulator with objects in memory and the test bucket created.
    async fn start() -> Emulator {
        let mut emulator = Emulator {
            child: None,
            port: free_port(),
            root: None,
        };
        emulator.run().await;
        emulator.create_bucket().await;
        emulator
    }

    /// An emulator keeping objects under `root`, so that it can be stopped and started again.
    async fn start_persistent(root: &Path) -> Emulator {
        let mut emulator = Emulator {
            child: None,
            port: free_port(),
            root: Some(root.to_path_buf()),
        };
        emulator.run().await;
        emulator.create_bucket().await;
        emulator
    }

    async fn run(&mut self) {
        let port = self.port.to_string();
        let public_host = format!("127.0.0.1:{port}");
        let mut args = vec![
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            &port,
            "-public-host",
            &public_host,
            "-log-level",
            "warn",
        ];
        let root = self.root.as_ref().map(|r| r.display().to_string());
        match &root {
            Some(root) => args.extend(["-backend", "filesystem", "-filesystem-root", root]),
            None => args.extend(["-backend", "memory"]),
        }
        self.child = Some(
            Command::new(emulator_binary())
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("fake-gcs-server starts"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while client()
            .get(self.url("/storage/v1/b"))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "fake-gcs-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn create_bucket(&self) {
        let response = client()
            .post(self.url("/storage/v1/b"))
            .json(&serde_json::json!({ "name": BUCKET }))
            .send()
            .await
            .unwrap();
        // 409: it survived a restart.
        assert!(
            response.status().is_success() || response.status() == 409,
            "{}",
            response.text().await.unwrap()
        );
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint())
    }

    /// Every object in the bucket, by name, as the JSON API lists it.
    async fn objects(&self) -> BTreeMap<String, serde_json::Value> {
        let list: serde_json::Value = client()
            .get(self.url(&format!("/storage/v1/b/{BUCKET}/o")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|o| (o["name"].as_str().unwrap().to_owned(), o))
            .collect()
    }

    /// The bytes of object `name`.
    async fn download(&self, name: &str) -> Vec<u8> {
        let name = name.replace('/', "%2F");
        let response = client()
            .get(self.url(&format!("/storage/v1/b/{BUCKET}/o/{name}?alt=media")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "download {name}");
        response.bytes().await.unwrap().to_vec()
    }

    async fn delete(&self, name: &str) {
        let name = name.replace('/', "%2F");
        let response = client()
            .delete(self.url(&format!("/storage/v1/b/{BUCKET}/o/{name}")))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "delete {name}");
    }

    /// Checks every blob object: its bytes have the digest its name says, and the MD5 the bucket
    /// reports is theirs. Returns how many blobs there are.
    async fn check_blobs(&self) -> usize {
        let objects = self.objects().await;
        let mut blobs = 0;
        for (name, object) in &objects {
            let Some(hex) = name.strip_prefix("blobs/sha256/") else {
                continue;
            };
            let bytes = self.download(name).await;
            assert_eq!(sha256(&bytes), format!("sha256:{hex}"), "bytes of {name}");
            let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&bytes));
            assert_eq!(object["md5Hash"], md5.as_str(), "MD5 of {name}");
            blobs += 1;
        }
        blobs
    }
}

impl bucket::Store for Emulator {
    fn stop(&mut self) {
        Emulator::stop(self);
    }

    async fn start(&mut self) {
        self.run().await;
    }

    async fn check_blobs(&self) -> usize {
        Emulator::check_blobs(self).await
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The environment that points a server at `emulator`'s bucket.
fn gcs_env(emulator: &Emulator) -> Vec<(&'static str, String)> {
    vec![
        ("NIXERY_STORAGE_BACKEND", "gcs".to_owned()),
        ("GCS_BUCKET", BUCKET.to_owned()),
        ("GCS_ENDPOINT", emulator.endpoint()),
        ("GCS_ANONYMOUS", "true".to_owned()),
    ]
}

/// A server with a fresh local directory on `emulator`'s bucket, with extra environment `env`.
fn start_server(
    emulator: &Emulator,
    dir: &tempfile::TempDir,
    name: &str,
    env: &[(&str, &str)],
) -> Server {
    let mut all: Vec<(&str, String)> = gcs_env(emulator);
    all.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    let all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_on(&dir.path().join(name), &all)
}

/// Pulls `name` through the redirects (see [`bucket::pull_ref`]).
async fn pull(server: &Server, name: &str) -> (String, Vec<String>) {
    pull_ref(server, name, "latest").await
}

/// Pulls `name:reference` through the redirects.
async fn pull_ref(server: &Server, name: &str, reference: &str) -> (String, Vec<String>) {
    bucket::pull_ref(server, name, reference, &|_| {}).await
}

#[tokio::test]
async fn blobs_land_in_the_bucket_under_their_digests_and_are_served_by_redirect() {
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&emulator, &dir, "a", &[]);
    let (manifest, blobs) = pull(&server, "shell/hello").await;

    let objects = emulator.objects().await;
    for digest in blobs.iter().chain([&manifest]) {
        let key = format!("blobs/sha256/{}", &digest["sha256:".len()..]);
        assert!(objects.contains_key(&key), "{key} is not in the bucket");
        if digest == &manifest {
            continue;
        }
        // The redirect names exactly that object.
        let location = redirect(&server, digest, false).await;
        assert_eq!(location, emulator.url(&format!("/{BUCKET}/{key}")));
    }
    // The layers, the config, the Docker and OCI manifests, and the SBOMs.
    assert_eq!(emulator.check_blobs().await, blobs.len() + 2 + SBOM_BLOBS);
    // A manifest this server knows is served whole through the blobs route, with its own type
    // (containerd keeps the Content-Type it gets there).
    let response = client()
        .get(server.url(&format!("/v2/any/blobs/{manifest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(sha256(&response.bytes().await.unwrap()), manifest);
    assert!(objects.keys().any(|k| k.starts_with("cache/manifests/")));
    assert!(objects.keys().any(|k| k.starts_with("cache/layers/")));

    // HEAD redirects too; the manifest by digest is served whole; unknown blobs are 404.
    redirect(&server, &blobs[1], true).await;
    let response = client()
        .get(server.url(&format!("/v2/shell/hello/manifests/{manifest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(sha256(&response.bytes().await.unwrap()), manifest);
    let response = client()
        .get(server.url(&format!("/v2/any/blobs/{}", sha256(b"nothing"))))
        .send()
        .await
        .unwrap();
    let (status, code, _) = registry_error(response).await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));
    for path in ["/healthz", "/readyz"] {
        let response = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn zstd_blobs_are_served_by_redirect_like_gzip_ones() {
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&emulator, &dir, "a", &[]);
    let blobs = bucket::pull_zstd(&server, "zstd-layers/shell/hello", &|_| {}).await;
    let objects = emulator.objects().await;
    for digest in &blobs {
        let key = format!("blobs/sha256/{}", &digest["sha256:".len()..]);
        assert!(objects.contains_key(&key), "{key} is not in the bucket");
        let location = redirect(&server, digest, false).await;
        assert_eq!(location, emulator.url(&format!("/{BUCKET}/{key}")));
    }
    emulator.check_blobs().await;
}

#[tokio::test]
async fn a_second_pull_uploads_nothing() {
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start_server(&emulator, &dir, "a", &[]);
    let (manifest, blobs) = pull(&a, "shell/hello").await;
    // Every blob, the manifest and each cache entry once.
    let first = a.uploads();
    assert!(first > blobs.len(), "{first} uploads");
    let generations: Vec<_> = emulator
        .objects()
        .await
        .into_values()
        .map(|o| (o["name"].clone(), o["generation"].clone()))
        .collect();

    pull(&a, "shell/hello").await;
    assert_eq!(a.uploads(), first, "the second pull uploaded");

    // A server that forgot every cache builds and packs again, finds each blob and cache entry
    // in the bucket with the same checksums, and uploads none of them.
    for name in emulator.objects().await.keys() {
        if name.starts_with("cache/") {
            emulator.delete(name).await;
        }
    }
    let b = start_server(&emulator, &dir, "b", &[]);
    let (again, _) = pull(&b, "shell/hello").await;
    assert_eq!(again, manifest);
    assert_eq!(b.nix_builds(), 1);
    let rewritten = b.uploads();
    // Only the deleted cache entries come back.
    let caches = emulator
        .objects()
        .await
        .keys()
        .filter(|k| k.starts_with("cache/"))
        .count();
    assert_eq!(rewritten, caches, "blobs were uploaded again:\n{}", b.log());
    let after: Vec<_> = emulator
        .objects()
        .await
        .into_values()
        .filter(|o| !o["name"].as_str().unwrap().starts_with("cache/"))
        .map(|o| (o["name"].clone(), o["generation"].clone()))
        .collect();
    let before: Vec<_> = generations
        .into_iter()
        .filter(|(n, _)| !n.as_str().unwrap().starts_with("cache/"))
        .collect();
    assert_eq!(after, before, "a stored object was rewritten");
}

#[tokio::test]
async fn a_second_replica_serves_what_the_first_built_without_nix() {
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start_server(&emulator, &dir, "a", &[]);
    // B is configured the other way: the seed app.yaml's BUCKET, the emulator through
    // STORAGE_EMULATOR_HOST (which implies anonymous access).
    let host = format!("127.0.0.1:{}", emulator.port);
    let b = Server::start_on(
        &dir.path().join("b"),
        &[
            ("NIXERY_STORAGE_BACKEND", "gcs"),
            ("BUCKET", BUCKET),
            ("STORAGE_EMULATOR_HOST", &host),
        ],
    );
    assert_ne!(a.port, b.port);
    let (manifest_a, blobs_a) = pull(&a, "shell/hello").await;
    assert_eq!(a.nix_builds(), 1);
    let (manifest_b, blobs_b) = pull(&b, "shell/hello").await;
    assert_eq!((manifest_b, blobs_b), (manifest_a, blobs_a));
    assert_eq!(b.nix_builds(), 0, "replica B ran nix-build:\n{}", b.log());
    assert_eq!(b.uploads(), 0, "replica B uploaded:\n{}", b.log());
    assert!(
        std::fs::read_dir(b.storage.join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "B's local disk holds blobs"
    );
}

#[tokio::test]
async fn an_image_of_a_pinned_commit_is_served_by_replicas_and_restarts_without_nix() {
    let repo = common::repo::PkgsRepo::create();
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", repo.path.display());
    let source = [("NIXERY_PKGS_PATH", ""), ("NIXERY_PKGS_REPO", url.as_str())];
    let a = start_server(&emulator, &dir, "a", &source);
    let b = start_server(&emulator, &dir, "b", &source);
    let (manifest_a, blobs_a) = pull_ref(&a, "shell/hello", &repo.first).await;
    assert_eq!(a.nix_builds(), 1);
    let (manifest_b, blobs_b) = pull_ref(&b, "shell/hello", &repo.first).await;
    assert_eq!((&manifest_b, &blobs_b), (&manifest_a, &blobs_a));
    assert_eq!(a.evaluations(), 1);
    assert_eq!(
        (b.nix_builds(), b.evaluations()),
        (0, 0),
        "replica B ran Nix:\n{}",
        b.log()
    );
    assert_eq!(b.uploads(), 0, "replica B uploaded:\n{}", b.log());

    // The image's SBOMs too, from the bucket: the same bytes, dated by the commit, the
    // repository and commit named as where the packages came from.
    let spdx_a = sbom(&a, &repo.first).await;
    assert_eq!(sbom(&b, &repo.first).await, spdx_a);
    let spdx: serde_json::Value = serde_json::from_slice(&spdx_a).unwrap();
    let commit_time = common::run(
        "git",
        &[
            "-C",
            repo.path.to_str().unwrap(),
            "show",
            "-s",
            "--format=%ct",
            &repo.first,
        ],
    );
    let commit_time = common::run(
        "date",
        &[
            "-u",
            "-d",
            &format!("@{}", commit_time.trim()),
            "+%Y-%m-%dT%H:%M:%SZ",
        ],
    );
    assert_eq!(spdx["creationInfo"]["created"], commit_time.trim());
    let image = &spdx["packages"][0];
    let source_info = image["sourceInfo"].as_str().unwrap();
    assert!(
        source_info.contains(&repo.first) && source_info.contains(&url),
        "{source_info}"
    );
    assert_eq!(b.nix_builds(), 0);

    // The package catalog of the commit: evaluated once, then read back by the replica.
    let tag = format!("q=hello&tag={}", repo.first);
    let found = common::search_ready(&a, &tag).await;
    let from_b = common::search_ready(&b, &tag).await;
    assert_eq!(from_b, found);
    let made = |server: &Server| {
        (
            server.metric("nixery_catalogs_total{outcome=\"evaluated\"}"),
            server.metric("nixery_catalogs_total{outcome=\"stored\"}"),
        )
    };
    assert_eq!((made(&a), made(&b)), ((1, 0), (0, 1)));

    let a = a.restart(
        &gcs_env(&emulator)
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(source)
            .collect::<Vec<_>>(),
    );
    let (manifest, _) = pull_ref(&a, "shell/hello", &repo.first).await;
    assert_eq!(manifest, manifest_a);
    assert_eq!(
        (a.nix_builds(), a.evaluations()),
        (0, 0),
        "the restarted server ran Nix"
    );
}

#[tokio::test]
async fn a_missing_bucket_stops_start_up_with_a_message() {
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .env("NIXERY_PKGS_PATH", common::offline_pkgs())
        .env("STORAGE_PATH", dir.path())
        .env("NIXERY_STORAGE_BACKEND", "gcs")
        .env("GCS_BUCKET", "no-such-bucket")
        .env("GCS_ENDPOINT", emulator.endpoint())
        .env("GCS_ANONYMOUS", "true")
        .env("PORT", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bucket no-such-bucket") && stderr.contains("GCS_BUCKET"),
        "{stderr}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .env("NIXERY_PKGS_PATH", common::offline_pkgs())
        .env("STORAGE_PATH", dir.path())
        .env("NIXERY_STORAGE_BACKEND", "gcs")
        .env_remove("BUCKET")
        .env_remove("GCS_BUCKET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("GCS_BUCKET"),
        "{stderr}"
    );
}

/// A throwaway service-account key: (key file, public key PEM file, client email).
fn service_account_key(dir: &Path) -> (PathBuf, PathBuf, String) {
    require_tool("openssl", "apt-get install openssl");
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    run(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            private.to_str().unwrap(),
        ],
    );
    run(
        "openssl",
        &[
            "pkey",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ],
    );
    let email = "nixery-test@nixery-test.iam.gserviceaccount.com".to_owned();
    let key = serde_json::json!({
        "type": "service_account",
        "project_id": "nixery-test",
        "private_key_id": "0123456789abcdef",
        "private_key": std::fs::read_to_string(&private).unwrap(),
        "client_email": email,
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let key_file = dir.join("key.json");
    std::fs::write(&key_file, key.to_string()).unwrap();
    (key_file, public, email)
}

/// Checks the V4 signature of `url` for `method` with the public key in `public`
/// (<https://cloud.google.com/storage/docs/authentication/signatures>); returns the query
/// parameters.
fn verify_v4(url: &str, method: &str, public: &Path, dir: &Path) -> BTreeMap<String, String> {
    let parsed = reqwest::Url::parse(url).unwrap();
    let params: BTreeMap<String, String> = parsed.query_pairs().into_owned().collect();
    let mut canonical_query: Vec<&str> = parsed
        .query()
        .unwrap()
        .split('&')
        .filter(|p| !p.starts_with("X-Goog-Signature="))
        .collect();
    canonical_query.sort();
    // google-cloud-storage signs the host without the port (for storage.googleapis.com there
    // is none); the emulator does not check signatures, so the test does it here.
    let host = parsed.host_str().unwrap();
    let canonical_request = format!(
        "{method}\n{}\n{}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD",
        parsed.path(),
        canonical_query.join("&")
    );
    let credential = &params["X-Goog-Credential"];
    let scope = credential.split_once('/').unwrap().1;
    let string_to_sign = format!(
        "GOOG4-RSA-SHA256\n{}\n{scope}\n{}",
        params["X-Goog-Date"],
        &sha256(canonical_request.as_bytes())["sha256:".len()..]
    );
    let message = dir.join("string-to-sign");
    let signature = dir.join("signature");
    std::fs::write(&message, &string_to_sign).unwrap();
    std::fs::write(
        &signature,
        hex::decode(&params["X-Goog-Signature"]).unwrap(),
    )
    .unwrap();
    let verify = |message: &Path| {
        Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(public)
            .arg("-signature")
            .arg(&signature)
            .arg(message)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(verify(&message), "signature of {url} does not verify");
    // And the check is real: another method's request does not verify.
    let forged = dir.join("forged");
    std::fs::write(&forged, string_to_sign.replace("GOOG4", "GOOG5")).unwrap();
    assert!(!verify(&forged), "a forged string-to-sign verified");
    params
}

#[tokio::test]
async fn signed_urls_verify_with_the_service_account_public_key() {
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key_file, public, email) = service_account_key(dir.path());
    let server = start_server(
        &emulator,
        &dir,
        "signed",
        &[
            ("GOOGLE_APPLICATION_CREDENTIALS", key_file.to_str().unwrap()),
            ("GCS_SIGNED_URL_EXPIRY", "120"),
        ],
    );
    // Every blob's bytes come through its signed URL.
    let (_, blobs) = pull(&server, "shell/hello").await;
    let redirects = server.metric("nixery_blob_redirects_total");
    for (digest, head) in [(&blobs[0], false), (&blobs[1], false), (&blobs[1], true)] {
        let location = redirect(&server, digest, head).await;
        let key = format!("/{BUCKET}/blobs/sha256/{}", &digest["sha256:".len()..]);
        assert!(location.starts_with(&emulator.url(&key)), "{location}");
        let method = if head { "HEAD" } else { "GET" };
        let params = verify_v4(&location, method, &public, dir.path());
        assert_eq!(params["X-Goog-Algorithm"], "GOOG4-RSA-SHA256");
        assert_eq!(params["X-Goog-Expires"], "120");
        assert!(params["X-Goog-Credential"].starts_with(&format!("{email}/")));
    }
    // Each of the three was answered with a redirect to a signed URL.
    assert_eq!(server.metric("nixery_blob_redirects_total"), redirects + 3);
}

/// With pull credentials (`NIXERY_AUTH_HTPASSWD`), a server that cannot sign blob URLs does not
/// start: anonymous access without a key file, and a key file whose test signature fails, each
/// stop start-up with a message naming the settings; a key that signs starts the server.
#[tokio::test]
async fn with_a_login_start_up_stops_unless_blob_urls_can_be_signed() {
    require_tool("htpasswd", "apt-get install apache2-utils");
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, run("htpasswd", &["-nbB", "alice", "wonderland"])).unwrap();
    let htpasswd = htpasswd.to_str().unwrap();

    // GCS_ANONYMOUS (gcs_env sets it) and no key file: nothing could sign.
    let stderr = start_up_refusal(&emulator, &dir, &[("NIXERY_AUTH_HTPASSWD", htpasswd)]);
    assert!(
        stderr.contains("NIXERY_AUTH_HTPASSWD")
            && stderr.contains("GCS_ANONYMOUS")
            && stderr.contains("GOOGLE_APPLICATION_CREDENTIALS"),
        "{stderr}"
    );

    // A key file that cannot sign: the start-up signature fails.
    let (key_file, _, _) = service_account_key(dir.path());
    let mut key: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&key_file).unwrap()).unwrap();
    key["private_key"] =
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n".into();
    let broken = dir.path().join("broken-key.json");
    std::fs::write(&broken, key.to_string()).unwrap();
    let stderr = start_up_refusal(
        &emulator,
        &dir,
        &[
            ("NIXERY_AUTH_HTPASSWD", htpasswd),
            ("GOOGLE_APPLICATION_CREDENTIALS", broken.to_str().unwrap()),
        ],
    );
    assert!(
        stderr.contains("NIXERY_AUTH_HTPASSWD")
            && stderr.contains("GOOGLE_APPLICATION_CREDENTIALS"),
        "{stderr}"
    );

    // A key that signs: the server starts and takes the login.
    let server = start_server(
        &emulator,
        &dir,
        "signed",
        &[
            ("NIXERY_AUTH_HTPASSWD", htpasswd),
            ("GOOGLE_APPLICATION_CREDENTIALS", key_file.to_str().unwrap()),
        ],
    );
    let status = |auth: Option<&'static str>| {
        let mut request = client().get(server.url("/v2/"));
        if let Some((user, password)) = auth.and_then(|a| a.split_once(':')) {
            request = request.basic_auth(user, Some(password));
        }
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some("alice:wonderland")).await, 200);
}

/// Starts a server on `emulator`'s bucket with `env` added, which must make it exit with an
/// error within 20 s; returns what it printed.
fn start_up_refusal(emulator: &Emulator, dir: &tempfile::TempDir, env: &[(&str, &str)]) -> String {
    let mut all: Vec<(&str, String)> = gcs_env(emulator);
    all.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    let all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (*k, v.as_str())).collect();
    common::start_up_failure(&dir.path().join("refused"), &all)
}

#[tokio::test]
async fn an_emulator_stopped_mid_build_gives_a_registry_error_and_nothing_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut emulator = Emulator::start_persistent(&dir.path().join("bucket")).await;
    let server = start_server(&emulator, &dir, "a", &[]);
    bucket::store_gone_mid_build(&server, &mut emulator, &|_| {}).await;
}

#[tokio::test]
async fn a_blob_over_16_mib_is_uploaded_whole_on_any_port() {
    use std::io::Write;
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = nixery::storage::gcs::GcsSettings {
        bucket: BUCKET.to_owned(),
        endpoint: emulator.endpoint(),
        anonymous: true,
        signed_url_expiry: Duration::ZERO,
        require_signed_urls: false,
        staging: dir.path().join("tmp"),
        known_entries: std::num::NonZeroUsize::MIN,
    };
    let storage = nixery::storage::Gcs::open(settings).await.unwrap();
    use nixery::storage::Storage as _;
    // 20 MiB that gzip cannot shrink, as a layer would be.
    let mut bytes = vec![0u8; 20 << 20];
    let mut state = 0x9e3779b97f4a7c15u64;
    for chunk in bytes.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let mut staged = storage.staging().stage().unwrap();
    staged.write_all(&bytes).unwrap();
    let digest = nixery::manifest::Digest::of(&bytes);
    let started = Instant::now();
    storage.commit(staged, &digest, None).await.unwrap();
    eprintln!("20 MiB uploaded in {:?}", started.elapsed());
    let name = format!("blobs/sha256/{}", digest.hex());
    assert_eq!(emulator.download(&name).await, bytes);
}

#[tokio::test]
async fn a_blob_under_another_digest_is_refused_and_nothing_is_uploaded() {
    use nixery::storage::Storage as _;
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let storage = open_gcs(emulator.endpoint(), dir.path()).await;
    let (wrong, _) = staged(&storage, b"not those bytes");
    let other = nixery::manifest::Digest::of(b"other bytes");
    let err = storage.commit(wrong, &other, None).await.unwrap_err();
    assert!(
        matches!(err, nixery::storage::StorageError::DigestMismatch { .. }),
        "{err}"
    );
    let objects = emulator.objects().await;
    assert!(!objects.contains_key(&format!("blobs/sha256/{}", other.hex())));
    assert!(
        !objects.keys().any(|k| k.starts_with("blobs/")),
        "{objects:?}"
    );
    // The same storage takes the bytes under their own digest.
    let (right, digest) = staged(&storage, b"not those bytes");
    storage.commit(right, &digest, None).await.unwrap();
    assert_eq!(emulator.check_blobs().await, 1);
}

#[tokio::test]
async fn docker_pulls_and_runs_shell_hello_through_the_redirect() {
    require_docker();
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&emulator, &dir, "a", &[]);
    let image = format!("{}/shell/hello", server.host());
    docker_pull_and_run_hello(&image);
    run("docker", &["rmi", &image]);
    // The gcs backend has no bytes to serve itself: docker fetched every layer from the bucket.
    assert_eq!(server.nix_builds(), 1);
}

/// A proxy on 127.0.0.1 in front of an emulator that can refuse writes (as a bucket would to
/// credentials that may only read) or alter uploaded bytes in transit. It runs on a thread of its
/// own and stops when dropped.
struct Proxy {
    server: Background,
    refuse_writes: Arc<AtomicBool>,
    corrupt: Corruption,
}

/// `(from, to)`: uploads have the first `from` in their body replaced by `to`.
type Corruption = Arc<Mutex<Option<(Vec<u8>, Vec<u8>)>>>;

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    refuse_writes: Arc<AtomicBool>,
    corrupt: Corruption,
}

impl Proxy {
    fn start(emulator: &Emulator) -> Proxy {
        use axum::body::Bytes;
        use axum::extract::{Request, State};
        use axum::http::StatusCode;
        use axum::response::{IntoResponse, Response};

        async fn forward(State(state): State<ProxyState>, request: Request) -> Response {
            let (parts, body) = request.into_parts();
            let mut body: Vec<u8> = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap()
                .to_vec();
            let write = !matches!(parts.method.as_str(), "GET" | "HEAD");
            if write && state.refuse_writes.load(Ordering::SeqCst) {
                let error = r#"{"error":{"code":403,"message":"writes are refused"}}"#;
                return (StatusCode::FORBIDDEN, error).into_response();
            }
            if write
                && let Some((from, to)) = state.corrupt.lock().unwrap().as_ref()
                && let Some(at) = body.windows(from.len()).position(|w| w == from.as_slice())
            {
                body.splice(at..at + from.len(), to.iter().copied());
            }
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut upstream = reqwest::Client::new()
                .request(parts.method.clone(), format!("{}{path}", state.upstream))
                .body(body);
            for (name, value) in &parts.headers {
                if !matches!(name.as_str(), "host" | "content-length") {
                    upstream = upstream.header(name, value);
                }
            }
            let response = upstream.send().await.unwrap();
            let status = response.status();
            let headers = response.headers().clone();
            let bytes: Bytes = response.bytes().await.unwrap();
            let mut answer = (status, bytes).into_response();
            for (name, value) in &headers {
                if !matches!(
                    name.as_str(),
                    "content-length" | "transfer-encoding" | "connection"
                ) {
                    answer.headers_mut().insert(name, value.clone());
                }
            }
            answer
        }

        let state = ProxyState {
            upstream: emulator.endpoint(),
            refuse_writes: Arc::default(),
            corrupt: Arc::default(),
        };
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(state.clone());
        Proxy {
            server: Background::serve(app),
            refuse_writes: state.refuse_writes,
            corrupt: state.corrupt,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }
}

/// A gcs backend on `endpoint`, opened directly, with its staging directory under `dir`.
async fn open_gcs(endpoint: String, dir: &Path) -> Bucket<nixery::storage::Gcs> {
    let settings = nixery::storage::gcs::GcsSettings {
        bucket: BUCKET.to_owned(),
        endpoint,
        anonymous: true,
        signed_url_expiry: Duration::ZERO,
        require_signed_urls: false,
        staging: dir.join("tmp"),
        known_entries: std::num::NonZeroUsize::MIN,
    };
    nixery::storage::Gcs::open(settings).await.unwrap()
}

/// `bytes` staged in `storage`, with their digest.
fn staged(
    storage: &Bucket<nixery::storage::Gcs>,
    bytes: &[u8],
) -> (nixery::storage::StagedBlob, nixery::manifest::Digest) {
    use nixery::storage::Storage as _;
    use std::io::Write;
    let mut staged = storage.staging().stage().unwrap();
    staged.write_all(bytes).unwrap();
    (staged, nixery::manifest::Digest::of(bytes))
}

#[tokio::test]
async fn an_upload_whose_bytes_change_in_transit_fails_and_the_next_one_heals_the_object() {
    use nixery::storage::Storage as _;
    let emulator = Emulator::start().await;
    let proxy = Proxy::start(&emulator);
    let dir = tempfile::tempdir().unwrap();
    let storage = open_gcs(proxy.endpoint(), dir.path()).await;
    // The bytes change on their way to the bucket; the CRC32C and MD5 sent with them do not.
    *proxy.corrupt.lock().unwrap() = Some((b"payload-ABC".to_vec(), b"payload-ABD".to_vec()));
    let bytes = b"a layer's bytes: payload-ABC, and more".to_vec();
    let (file, digest) = staged(&storage, &bytes);
    let err = storage.commit(file, &digest, None).await.unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // Cloud Storage refuses such an upload itself; the emulator keeps the bytes and only the
    // client notices. Either way the commit failed, and the next upload of the right bytes
    // replaces what is there, because its checksums do not match.
    *proxy.corrupt.lock().unwrap() = None;
    let (file, digest) = staged(&storage, &bytes);
    storage.commit(file, &digest, None).await.unwrap();
    let name = format!("blobs/sha256/{}", digest.hex());
    assert_eq!(emulator.download(&name).await, bytes);
    assert_eq!(emulator.check_blobs().await, 1);
}

#[tokio::test]
async fn an_existing_object_is_kept_when_it_matches_and_replaced_when_it_is_corrupt() {
    use nixery::storage::Storage as _;
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let storage = open_gcs(emulator.endpoint(), dir.path()).await;
    let bytes = b"the right bytes".to_vec();
    let (file, digest) = staged(&storage, &bytes);
    let name = format!("blobs/sha256/{}", digest.hex());
    // Another replica stored the right bytes first: they are kept, not uploaded again.
    storage.commit(file, &digest, None).await.unwrap();
    let generation = emulator.objects().await[&name]["generation"].clone();
    let other = open_gcs(emulator.endpoint(), dir.path()).await;
    let (file, _) = staged(&other, &bytes);
    other.commit(file, &digest, None).await.unwrap();
    assert_eq!(emulator.objects().await[&name]["generation"], generation);

    // An object under that name with other bytes (a corrupt one) is replaced.
    let response = client()
        .post(emulator.url(&format!(
            "/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name}"
        )))
        .body("corrupt bytes")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    assert_eq!(emulator.download(&name).await, b"corrupt bytes");
    let fresh = open_gcs(emulator.endpoint(), dir.path()).await;
    let (file, _) = staged(&fresh, &bytes);
    fresh.commit(file, &digest, None).await.unwrap();
    assert_eq!(emulator.download(&name).await, bytes);
}

#[tokio::test]
async fn readyz_checks_that_the_bucket_takes_writes() {
    let emulator = Emulator::start().await;
    let proxy = Proxy::start(&emulator);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("NIXERY_STORAGE_BACKEND", "gcs".to_owned()),
        ("GCS_BUCKET", BUCKET.to_owned()),
        ("GCS_ENDPOINT", proxy.endpoint()),
        ("GCS_ANONYMOUS", "true".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start_on(&dir.path().join("a"), &env);
    common::readyz_becomes(&server, 200, "not ready at start").await;
    // Reads still work, writes are refused: not ready (within the 5 s a probe is trusted).
    proxy.refuse_writes.store(true, Ordering::SeqCst);
    common::readyz_becomes(&server, 503, "ready without writes").await;
    proxy.refuse_writes.store(false, Ordering::SeqCst);
    common::readyz_becomes(&server, 200, "not ready once writes work").await;
}

/// The SPDX document of `shell/hello` at `tag`, from the SBOM API.
async fn sbom(server: &Server, tag: &str) -> Vec<u8> {
    let response = common::client()
        .get(server.url(&format!("/api/v1/sbom/shell/hello:{tag}?format=spdx")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn replicas_on_one_bucket_serve_the_same_signature_made_once() {
    let emulator = Emulator::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = trixie::key_pair(dir.path(), "nixery");
    let key = key.display().to_string();
    // Both replicas sign for the host clients use: here, replica A's address.
    let port = free_port().to_string();
    let host = format!("127.0.0.1:{port}");
    let signing = [
        ("NIXERY_SIGNING_KEY", key.as_str()),
        ("NIXERY_SIGNING_KEY_PASSWORD", trixie::PASSWORD),
        ("NIXERY_REGISTRY_HOST", host.as_str()),
    ];
    let a = start_server(
        &emulator,
        &dir,
        "a",
        &[signing.as_slice(), &[("PORT", port.as_str())]].concat(),
    );
    let (verified, printed) = trixie::cosign_verify(&public, &format!("{host}/shell/hello"));
    assert!(verified, "{printed}");
    assert_eq!(a.metric(r#"nixery_signings_total{outcome="signed"}"#), 1);

    // Replica B finds A's image and its signature in the bucket: it writes nothing, and what
    // it serves at the .sig tag is what A made.
    let b = start_server(&emulator, &dir, "b", &signing);
    let (_, digest, _) = common::manifest_as(
        &b,
        "shell/hello",
        "latest",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
    .await;
    assert_eq!(b.nix_builds(), 0, "{}", b.log());
    assert_eq!(b.uploads(), 0, "replica B wrote:\n{}", b.log());
    let tag = format!("sha256-{}.sig", digest.trim_start_matches("sha256:"));
    let signature = |server: &Server| {
        let url = server.url(&format!("/v2/shell/hello/manifests/{tag}"));
        async move {
            let response = client().get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap()
        }
    };
    assert_eq!(signature(&b).await, signature(&a).await);
}
