//! The s3 backend against a real S3 implementation (moto's server on 127.0.0.1): what lands in
//! the bucket (each object's bytes, MD5 ETag and SHA-256 checksum), uploads skipped when objects
//! are there, 303 redirects to presigned URLs whose SigV4 signatures the test recomputes with
//! the secret key (moto does not check presigned signatures), a store that becomes unreachable
//! mid-build, two replicas sharing one bucket, and a real `docker pull` through the redirect.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::types::ChecksumMode;
use base64::Engine as _;
use common::bucket::{self, SBOM_BLOBS, free_port, redirect};
use common::{
    Server, client, docker_pull_and_run_hello, registry_error, require_docker, run, sha256,
};
use hmac::{KeyInit, Mac};
use md5::Digest as _;

const BUCKET: &str = "nixery-layers";
const REGION: &str = "eu-central-1";
const ACCESS_KEY: &str = "AKIANIXERYTEST";
const SECRET_KEY: &str = "nixery-test-secret-key";

/// Where scripts/moto-server links moto's server (or `MOTO_SERVER`).
fn moto_binary() -> PathBuf {
    bucket::server_binary(
        "MOTO_SERVER",
        "/opt/nixery/bin/moto_server",
        "scripts/moto-server",
    )
}

/// A running moto server with the test bucket; killed when dropped.
struct Moto {
    child: Child,
    port: u16,
    s3: aws_sdk_s3::Client,
}

impl Moto {
    async fn start() -> Moto {
        let port = free_port();
        let child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let moto = Moto {
            child,
            port,
            s3: s3_client(&format!("http://127.0.0.1:{port}")),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while client().get(moto.url("/")).send().await.is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let location = aws_sdk_s3::types::CreateBucketConfiguration::builder()
            .location_constraint(REGION.into())
            .build();
        moto.s3
            .create_bucket()
            .bucket(BUCKET)
            .create_bucket_configuration(location)
            .send()
            .await
            .expect("the test bucket is created");
        moto
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint())
    }

    /// Every object in the bucket: its key and ETag.
    async fn objects(&self) -> BTreeMap<String, String> {
        let list = self
            .s3
            .list_objects_v2()
            .bucket(BUCKET)
            .send()
            .await
            .unwrap();
        assert_ne!(list.is_truncated(), Some(true));
        list.contents()
            .iter()
            .map(|o| (o.key().unwrap().to_owned(), o.e_tag().unwrap().to_owned()))
            .collect()
    }

    /// The bytes of object `key`.
    async fn download(&self, key: &str) -> Vec<u8> {
        let object = self.s3.get_object().bucket(BUCKET).key(key).send().await;
        let object = object.unwrap_or_else(|e| panic!("download {key}: {e:?}"));
        object.body.collect().await.unwrap().to_vec()
    }

    async fn delete(&self, key: &str) {
        let deleted = self.s3.delete_object().bucket(BUCKET).key(key).send().await;
        deleted.unwrap_or_else(|e| panic!("delete {key}: {e:?}"));
    }

    /// Checks every blob object: its bytes have the digest its key says, its ETag is their MD5,
    /// and the SHA-256 checksum it was uploaded with is theirs. Returns how many there are.
    async fn check_blobs(&self) -> usize {
        let mut blobs = 0;
        for (key, etag) in self.objects().await {
            let Some(hex) = key.strip_prefix("blobs/sha256/") else {
                continue;
            };
            let bytes = self.download(&key).await;
            assert_eq!(sha256(&bytes), format!("sha256:{hex}"), "bytes of {key}");
            let md5 = hex::encode(md5::Md5::digest(&bytes));
            assert_eq!(etag, format!("\"{md5}\""), "ETag of {key}");
            let head = self
                .s3
                .head_object()
                .bucket(BUCKET)
                .key(&key)
                .checksum_mode(ChecksumMode::Enabled)
                .send()
                .await
                .unwrap();
            let sent = base64::engine::general_purpose::STANDARD.encode(hex::decode(hex).unwrap());
            assert_eq!(
                head.checksum_sha256(),
                Some(sent.as_str()),
                "SHA-256 of {key}"
            );
            blobs += 1;
        }
        blobs
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The test's own S3 client of moto at `endpoint`, with the credentials nixery gets.
fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The environment that points a server at the bucket behind `endpoint`, with credentials
/// through the AWS chain's first link (the environment) and no AWS configuration of the
/// machine's.
fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("NIXERY_STORAGE_BACKEND", "s3".to_owned()),
        ("S3_BUCKET", BUCKET.to_owned()),
        ("S3_ENDPOINT", endpoint.to_owned()),
        ("S3_REGION", REGION.to_owned()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
        ("AWS_CONFIG_FILE", "/dev/null".to_owned()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ]
}

/// A server with a fresh local directory on the bucket behind `endpoint`, with extra
/// environment `env`.
fn start_server(
    endpoint: &str,
    dir: &tempfile::TempDir,
    name: &str,
    env: &[(&str, &str)],
) -> Server {
    let all = s3_env(endpoint);
    let mut all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend(env);
    Server::start_on(&dir.path().join(name), &all)
}

/// Pulls `name` through the redirects (see [`bucket::pull_ref`]), each redirect's signature
/// checked.
async fn pull(server: &Server, name: &str) -> (String, Vec<String>) {
    bucket::pull_ref(server, name, "latest", &|url| verify_sigv4(url, "GET", 300)).await
}

/// RFC 3986 percent-encoding of everything but the unreserved characters, as SigV4 encodes
/// query names and values.
fn uri_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Recomputes the SigV4 query signature of presigned `url` for `method` with the secret key,
/// as S3 does (<https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html>),
/// and checks it and the other parameters: the credential, region, lifetime and date.
fn verify_sigv4(url: &str, method: &str, expiry: u64) {
    let parsed = reqwest::Url::parse(url).unwrap();
    let params: BTreeMap<String, String> = parsed.query_pairs().into_owned().collect();
    let mut canonical_query: Vec<String> = params
        .iter()
        .filter(|(k, _)| *k != "X-Amz-Signature")
        .map(|(k, v)| format!("{}={}", uri_encode(k), uri_encode(v)))
        .collect();
    canonical_query.sort();
    let host = format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap());
    let canonical_request = format!(
        "{method}\n{}\n{}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD",
        parsed.path(),
        canonical_query.join("&")
    );
    let date = &params["X-Amz-Date"];
    let day = &date[..8];
    let scope = format!("{day}/{REGION}/s3/aws4_request");
    assert_eq!(params["X-Amz-Algorithm"], "AWS4-HMAC-SHA256", "{url}");
    assert_eq!(params["X-Amz-Credential"], format!("{ACCESS_KEY}/{scope}"));
    assert_eq!(params["X-Amz-Expires"], expiry.to_string());
    assert_eq!(params["X-Amz-SignedHeaders"], "host");
    let today = run("date", &["-u", "+%Y%m%d"]);
    assert_eq!(day, today.trim(), "signed on another day");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
        &sha256(canonical_request.as_bytes())["sha256:".len()..]
    );
    let key = [day, REGION, "s3", "aws4_request"]
        .iter()
        .fold(format!("AWS4{SECRET_KEY}").into_bytes(), |key, part| {
            hmac(&key, part)
        });
    let signature = hex::encode(hmac(&key, &string_to_sign));
    assert_eq!(
        params["X-Amz-Signature"], signature,
        "the signature of {url} does not verify"
    );
}

#[tokio::test]
async fn blobs_land_in_the_bucket_under_their_digests_and_are_served_by_presigned_redirect() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&moto.endpoint(), &dir, "a", &[]);
    let (manifest, blobs) = pull(&server, "shell/hello").await;

    let objects = moto.objects().await;
    for digest in blobs.iter().chain([&manifest]) {
        let key = format!("blobs/sha256/{}", &digest["sha256:".len()..]);
        assert!(objects.contains_key(&key), "{key} is not in the bucket");
    }
    // The layers, the config, the Docker and OCI manifests, and the SBOMs.
    assert_eq!(moto.check_blobs().await, blobs.len() + 2 + SBOM_BLOBS);
    assert!(objects.keys().any(|k| k.starts_with("cache/manifests/")));
    assert!(objects.keys().any(|k| k.starts_with("cache/layers/")));

    // The redirect names exactly that object, signed; HEAD gets a URL signed for HEAD.
    let key = format!("/{BUCKET}/blobs/sha256/{}", &blobs[1]["sha256:".len()..]);
    let location = redirect(&server, &blobs[1], false).await;
    assert!(
        location.starts_with(&moto.url(&format!("{key}?"))),
        "{location}"
    );
    let head = redirect(&server, &blobs[1], true).await;
    verify_sigv4(&head, "HEAD", 300);
    let response = client().head(&head).send().await.unwrap();
    assert_eq!(response.status(), 200, "{head}");
    // The bucket's objects are not public: without its signature the URL is refused.
    let unsigned = location.split('?').next().unwrap();
    let response = client().get(unsigned).send().await.unwrap();
    assert_eq!(response.status(), 403, "{unsigned}");

    // A manifest this server knows is served whole, with its own type, by both routes.
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
    let response = client()
        .get(server.url(&format!("/v2/shell/hello/manifests/{manifest}")))
        .send()
        .await
        .unwrap();
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
    assert!(
        server.metric(
            "nixery_storage_operations_total{backend=\"s3\",operation=\"commit\",outcome=\"ok\"}"
        ) > 0
    );
}

#[tokio::test]
async fn zstd_blobs_are_served_by_presigned_redirect_like_gzip_ones() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&moto.endpoint(), &dir, "a", &[]);
    let check = |url: &str| verify_sigv4(url, "GET", 300);
    let blobs = bucket::pull_zstd(&server, "zstd-layers/shell/hello", &check).await;
    let objects = moto.objects().await;
    for digest in &blobs {
        let key = format!("blobs/sha256/{}", &digest["sha256:".len()..]);
        assert!(objects.contains_key(&key), "{key} is not in the bucket");
        let location = redirect(&server, digest, false).await;
        assert!(
            location.starts_with(&moto.url(&format!("/{BUCKET}/{key}?"))),
            "{location}"
        );
    }
    moto.check_blobs().await;
}

#[test]
fn a_forged_or_misdirected_signature_does_not_verify() {
    // The check above is real: a URL signed with another secret, or for another region, or
    // with an edited parameter, fails it.
    let today = run("date", &["-u", "+%Y%m%d"]);
    let today = today.trim();
    let sign = |secret: &str, region: &str, expires: &str| {
        let scope = format!("{today}/{region}/s3/aws4_request");
        let query = format!(
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={}&X-Amz-Date={today}T000000Z&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host&x-id=GetObject",
            uri_encode(&format!("{ACCESS_KEY}/{scope}"))
        );
        let canonical =
            format!("GET\n/{BUCKET}/k\n{query}\nhost:127.0.0.1:9\n\nhost\nUNSIGNED-PAYLOAD");
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{today}T000000Z\n{scope}\n{}",
            &sha256(canonical.as_bytes())["sha256:".len()..]
        );
        let key = [today, region, "s3", "aws4_request"]
            .iter()
            .fold(format!("AWS4{secret}").into_bytes(), |key, part| {
                hmac(&key, part)
            });
        format!(
            "http://127.0.0.1:9/{BUCKET}/k?{query}&X-Amz-Signature={}",
            hex::encode(hmac(&key, &string_to_sign))
        )
    };
    verify_sigv4(&sign(SECRET_KEY, REGION, "300"), "GET", 300);
    let fails = |url: String, method: &'static str| {
        std::panic::catch_unwind(move || verify_sigv4(&url, method, 300)).is_err()
    };
    assert!(fails(sign("another-secret", REGION, "300"), "GET"));
    assert!(fails(sign(SECRET_KEY, "us-east-1", "300"), "GET"));
    assert!(fails(sign(SECRET_KEY, REGION, "300"), "HEAD"));
    let edited = sign(SECRET_KEY, REGION, "300").replace("Expires=300", "Expires=3000");
    assert!(fails(edited, "GET"));
}

#[tokio::test]
async fn a_second_pull_uploads_nothing() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start_server(&moto.endpoint(), &dir, "a", &[]);
    let (manifest, blobs) = pull(&a, "shell/hello").await;
    let first = a.uploads();
    assert!(first > blobs.len(), "{first} uploads");
    let before = moto.objects().await;

    pull(&a, "shell/hello").await;
    assert_eq!(a.uploads(), first, "the second pull uploaded");

    // A server that forgot every cache builds and packs again, finds each blob and cache entry
    // in the bucket with the same checksums, and uploads none of them.
    let caches: Vec<String> = before
        .keys()
        .filter(|k| k.starts_with("cache/"))
        .cloned()
        .collect();
    for key in &caches {
        moto.delete(key).await;
    }
    let b = start_server(&moto.endpoint(), &dir, "b", &[]);
    let (again, _) = pull(&b, "shell/hello").await;
    assert_eq!(again, manifest);
    assert_eq!(b.nix_builds(), 1);
    // Only the deleted cache entries come back.
    assert_eq!(
        b.uploads(),
        caches.len(),
        "blobs were uploaded again:\n{}",
        b.log()
    );
    assert_eq!(moto.objects().await, before);
}

#[tokio::test]
async fn a_second_replica_serves_what_the_first_built_without_nix() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start_server(&moto.endpoint(), &dir, "a", &[]);
    let b = start_server(&moto.endpoint(), &dir, "b", &[]);
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

/// A TCP gate on 127.0.0.1 in front of moto: closed, it refuses connections and cuts the open
/// ones, as a store that went away would; the objects stay in moto.
struct Gate {
    port: u16,
    target: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gate {
    async fn open_to(target: u16) -> Gate {
        let mut gate = Gate {
            port: free_port(),
            target,
            task: None,
        };
        gate.open().await;
        gate
    }

    async fn open(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            // Dropped with this task when the gate closes, which cuts every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                            .await
                            .ok();
                    }
                });
            }
        }));
    }

    fn close(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_gone_mid_build_gives_a_registry_error_then_recovers() {
    let moto = Moto::start().await;
    let gate = Gate::open_to(moto.port).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&gate.endpoint(), &dir, "a", &[]);
    let mut store = GatedMoto { moto, gate };
    let check = |url: &str| verify_sigv4(url, "GET", 300);
    bucket::store_gone_mid_build(&server, &mut store, &check).await;
}

/// moto behind a [`Gate`]: stopped and started by closing and opening the gate.
struct GatedMoto {
    moto: Moto,
    gate: Gate,
}

impl bucket::Store for GatedMoto {
    fn stop(&mut self) {
        self.gate.close();
    }

    async fn start(&mut self) {
        self.gate.open().await;
    }

    async fn check_blobs(&self) -> usize {
        self.moto.check_blobs().await
    }
}

#[tokio::test]
async fn docker_pulls_and_runs_shell_hello_through_the_presigned_redirect() {
    require_docker();
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&moto.endpoint(), &dir, "a", &[]);
    let image = format!("{}/shell/hello", server.host());
    docker_pull_and_run_hello(&image);
    run("docker", &["rmi", &image]);
    // The s3 backend has no bytes to serve itself: docker fetched every layer from the bucket.
    assert_eq!(server.nix_builds(), 1);
}

/// The output of a nixery that should refuse to start with `env`.
fn refused_start(env: &[(&str, String)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .env("NIXERY_PKGS_PATH", common::offline_pkgs())
        .env("STORAGE_PATH", dir.path())
        .env("PORT", "0")
        .env_remove("S3_BUCKET")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "nixery started:\n{stderr}");
    stderr
}

#[tokio::test]
async fn a_missing_bucket_or_public_urls_with_auth_stop_start_up_with_a_message() {
    let moto = Moto::start().await;
    let mut env = s3_env(&moto.endpoint());
    env.retain(|(k, _)| *k != "S3_BUCKET");
    let stderr = refused_start(&env);
    assert!(stderr.contains("S3_BUCKET"), "{stderr}");

    env.push(("S3_BUCKET", "no-such-bucket".to_owned()));
    let stderr = refused_start(&env);
    assert!(
        stderr.contains("bucket no-such-bucket") && stderr.contains("S3_ENDPOINT"),
        "{stderr}"
    );

    // Blob URLs must stay signed when pulls need credentials.
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    run(
        "htpasswd",
        &["-Bbc", htpasswd.to_str().unwrap(), "user", "password"],
    );
    let mut env = s3_env(&moto.endpoint());
    env.push(("S3_PRESIGN_EXPIRY", "0".to_owned()));
    env.push(("NIXERY_AUTH_HTPASSWD", htpasswd.display().to_string()));
    let stderr = refused_start(&env);
    assert!(
        stderr.contains("S3_PRESIGN_EXPIRY=0") && stderr.contains("NIXERY_AUTH_HTPASSWD"),
        "{stderr}"
    );
}

#[tokio::test]
async fn public_urls_name_the_object_when_presigning_is_off() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&moto.endpoint(), &dir, "a", &[("S3_PRESIGN_EXPIRY", "0")]);
    // moto's objects are private, so the public URL is not followed; the manifest is enough to
    // have the blobs stored.
    let response = client()
        .get(server.url("/v2/shell/hello/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let manifest: serde_json::Value = response.json().await.unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap();
    let location = redirect(&server, config, false).await;
    let key = format!("/{BUCKET}/blobs/sha256/{}", &config["sha256:".len()..]);
    assert_eq!(location, moto.url(&key));
}

#[tokio::test]
async fn an_object_with_other_bytes_under_a_digest_is_replaced_by_the_next_build() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start_server(&moto.endpoint(), &dir, "a", &[]);
    let (manifest, blobs) = pull(&a, "shell/hello").await;
    // A layer's object gets other bytes (written around nixery), and the caches are dropped,
    // so that the next server packs the layers again.
    let key = format!("blobs/sha256/{}", &blobs[1]["sha256:".len()..]);
    moto.s3
        .put_object()
        .bucket(BUCKET)
        .key(&key)
        .body(b"corrupt".to_vec().into())
        .send()
        .await
        .unwrap();
    let caches: Vec<String> = moto
        .objects()
        .await
        .into_keys()
        .filter(|k| k.starts_with("cache/"))
        .collect();
    for cache in &caches {
        moto.delete(cache).await;
    }
    let b = start_server(&moto.endpoint(), &dir, "b", &[]);
    let (again, _) = pull(&b, "shell/hello").await;
    assert_eq!(again, manifest);
    // The corrupt object and the caches were written; every other blob was kept.
    assert_eq!(b.uploads(), caches.len() + 1, "{}", b.log());
    assert_eq!(moto.check_blobs().await, blobs.len() + 2 + SBOM_BLOBS);
}

/// Carries moto's endpoint to [`s3_opened_directly_refuses_a_blob_under_another_digest`].
const CHILD_ENDPOINT: &str = "NIXERY_TEST_S3_ENDPOINT";

#[tokio::test]
async fn a_blob_under_another_digest_is_refused_and_nothing_is_uploaded() {
    let moto = Moto::start().await;
    // The backend takes its credentials from the AWS chain, that is from the environment,
    // which a test must not change in its own (threaded) process: a child of this test binary
    // opens it, with the environment a server gets.
    let child = "s3_opened_directly_refuses_a_blob_under_another_digest";
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child, "--ignored", "--nocapture"])
        .envs(s3_env(&moto.endpoint()))
        .env(CHILD_ENDPOINT, moto.endpoint())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{shown}");
    assert!(shown.contains("1 passed"), "{shown}");
    let other = format!(
        "blobs/sha256/{}",
        &sha256(b"other bytes")["sha256:".len()..]
    );
    let objects = moto.objects().await;
    assert!(!objects.contains_key(&other), "{objects:?}");
    assert_eq!(moto.check_blobs().await, 1, "{objects:?}");
}

#[tokio::test]
#[ignore = "run by a_blob_under_another_digest_is_refused_and_nothing_is_uploaded, in a child process with credentials in its environment"]
async fn s3_opened_directly_refuses_a_blob_under_another_digest() {
    use nixery::storage::Storage as _;
    use std::io::Write;
    let endpoint = std::env::var(CHILD_ENDPOINT).unwrap_or_else(|_| {
        panic!("{CHILD_ENDPOINT} is not set: a_blob_under_another_digest_is_refused_and_nothing_is_uploaded runs this test")
    });
    let dir = tempfile::tempdir().unwrap();
    let settings = nixery::storage::s3::S3Settings {
        bucket: BUCKET.to_owned(),
        endpoint: Some(endpoint),
        region: Some(REGION.to_owned()),
        presign_expiry: Duration::ZERO,
        staging: dir.path().join("tmp"),
        known_entries: std::num::NonZeroUsize::MIN,
    };
    let storage = nixery::storage::S3::open(settings).await.unwrap();
    let mut wrong = storage.staging().stage().unwrap();
    wrong.write_all(b"not those bytes").unwrap();
    let other = nixery::manifest::Digest::of(b"other bytes");
    let err = storage.commit(wrong, &other, None).await.unwrap_err();
    assert!(
        matches!(err, nixery::storage::StorageError::DigestMismatch { .. }),
        "{err}"
    );
    assert!(!storage.has_blob(&other).await.unwrap());
    // The same storage takes the bytes under their own digest.
    let mut right = storage.staging().stage().unwrap();
    right.write_all(b"not those bytes").unwrap();
    let digest = nixery::manifest::Digest::of(b"not those bytes");
    storage.commit(right, &digest, None).await.unwrap();
    assert!(storage.has_blob(&digest).await.unwrap());
}
