//! Signatures (`NIXERY_SIGNING_KEY`) checked by real verifiers: `cosign verify` (2.5) and
//! skopeo (1.18) with a `policy.json` that requires sigstore signatures, both Debian 13's from
//! the root `scripts/nix-trixie` makes (Debian 12 has no cosign, and its skopeo and podman are
//! built with sigstore disabled: "Debian-local change: sigstore disabled").

mod common;

use std::path::Path;

use common::trixie::{PASSWORD, cosign_offline, cosign_verify, key_pair, skopeo};
use common::{Server, bucket::free_port, client, manifest_as};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A server on `storage` at `port` that signs with `key` (none: signs nothing).
fn server(storage: &Path, port: u16, key: Option<&Path>) -> Server {
    let port = port.to_string();
    let host = format!("127.0.0.1:{port}");
    let key = key.map(|k| k.display().to_string());
    let mut env = vec![("PORT", port.as_str())];
    if let Some(key) = &key {
        env.extend([
            ("NIXERY_SIGNING_KEY", key.as_str()),
            ("NIXERY_SIGNING_KEY_PASSWORD", PASSWORD),
            ("NIXERY_REGISTRY_HOST", host.as_str()),
        ]);
    }
    Server::start_on(storage, &env)
}

/// skopeo copying `image` to a directory under `dir` with a policy that accepts only images
/// signed by `public` for their repository, finding signatures as cosign attaches them.
fn skopeo_copy(dir: &Path, host: &str, public: &Path, image: &str) -> (bool, String) {
    let policy = serde_json::json!({
        "default": [{ "type": "reject" }],
        "transports": {
            "docker": { host: [{
                "type": "sigstoreSigned",
                "keyPath": public,
                "signedIdentity": { "type": "matchRepository" },
            }] },
            "dir": { "": [{ "type": "insecureAcceptAnything" }] },
        },
    });
    std::fs::write(dir.join("policy.json"), policy.to_string()).unwrap();
    let registries = dir.join("registries.d");
    std::fs::create_dir_all(&registries).unwrap();
    std::fs::write(
        registries.join("nixery.yaml"),
        format!("docker:\n  {host}:\n    use-sigstore-attachments: true\n"),
    )
    .unwrap();
    let out = dir.join(format!("copy-{}", common::nonce()));
    skopeo(
        dir,
        &[
            "--policy",
            &dir.join("policy.json").display().to_string(),
            "--registries.d",
            &registries.display().to_string(),
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &format!("dir:{}", out.display()),
        ],
    )
}

#[test]
fn cosign_and_skopeo_verify_images_signed_for_the_name_pulled() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "nixery");
    let (_, other) = key_pair(dir.path(), "other");
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let server = server(&dir.path().join("storage"), port, Some(&key));

    // The public key is served as cosign wrote it.
    let (status, served) = common::raw_get(&server, "/api/v1/signing-key");
    assert_eq!(status, 200);
    assert_eq!(served, std::fs::read_to_string(&public).unwrap());

    let (verified, printed) = cosign_verify(&public, &format!("{host}/shell/hello"));
    assert!(verified, "{printed}");
    assert!(
        printed.contains(&format!("\"docker-reference\":\"{host}/shell/hello\"")),
        "{printed}"
    );
    assert_eq!(
        server.metric(r#"nixery_signings_total{outcome="signed"}"#),
        1
    );
    // Another order of the same packages is the same image, signed for that name too.
    let (verified, printed) = cosign_verify(&public, &format!("{host}/hello/shell"));
    assert!(verified, "{printed}");
    assert_eq!(
        server.metric(r#"nixery_signings_total{outcome="signed"}"#),
        2
    );
    // Verifying again signs nothing more.
    assert!(cosign_verify(&public, &format!("{host}/shell/hello")).0);
    assert_eq!(
        server.metric(r#"nixery_signings_total{outcome="signed"}"#),
        2
    );

    let (verified, printed) = cosign_verify(&other, &format!("{host}/shell/hello"));
    assert!(!verified, "verified with another key:\n{printed}");
    assert!(printed.contains("no matching signatures"), "{printed}");

    let (copied, printed) = skopeo_copy(dir.path(), &host, &public, &format!("{host}/shell/hello"));
    assert!(copied, "{printed}");
    let (copied, printed) = skopeo_copy(dir.path(), &host, &other, &format!("{host}/shell/hello"));
    assert!(!copied, "copied with another key:\n{printed}");
    assert!(
        printed.contains("signature verification failed"),
        "{printed}"
    );

    // A server without a key signs nothing, and its images are refused.
    drop(server);
    let unsigned = self::server(&dir.path().join("unsigned"), port, None);
    let (verified, printed) = cosign_verify(&public, &format!("{host}/shell/hello"));
    assert!(!verified, "{printed}");
    let (copied, printed) = skopeo_copy(dir.path(), &host, &public, &format!("{host}/shell/hello"));
    assert!(!copied, "{printed}");
    assert!(printed.contains("no signature exists"), "{printed}");
    let (status, _) = common::raw_get(&unsigned, "/api/v1/signing-key");
    assert_eq!(status, 404);
    let (_, metrics) = common::raw_get(&unsigned, "/metrics");
    assert!(!metrics.contains("nixery_signings_total{"), "{metrics}");
}

#[tokio::test]
async fn an_image_built_before_the_key_is_signed_a_new_key_signs_beside_the_old_and_a_changed_entry_is_not()
 {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "nixery");
    let (new_key, new_public) = key_pair(dir.path(), "new");
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let storage = dir.path().join("storage");
    // Built before a key was set: signed on its next request.
    let server = server(&storage, port, None);
    let (_, _, hello) = manifest_as(&server, "shell/hello", "latest", DOCKER_MANIFEST).await;
    let (_, _, shell) = manifest_as(&server, "shell", "latest", DOCKER_MANIFEST).await;
    assert!(!cosign_verify(&public, &format!("{host}/shell/hello")).0);
    drop(server);
    let server = self::server(&storage, port, Some(&key));
    let (verified, printed) = cosign_verify(&public, &format!("{host}/shell/hello"));
    assert!(verified, "{printed}");
    assert_eq!(server.nix_builds(), 0);

    // A new key signs on the next request, beside the old key's signature.
    drop(server);
    let server = self::server(&storage, port, Some(&new_key));
    let (verified, printed) = cosign_verify(&new_public, &format!("{host}/shell/hello"));
    assert!(verified, "{printed}");
    let (verified, printed) = cosign_verify(&public, &format!("{host}/shell/hello"));
    assert!(verified, "{printed}");

    // The tag's manifest cache entry pointed at another image's manifest: served (its blobs are
    // all stored), but never signed, so verification fails.
    let entries = storage.join("cache/manifests");
    let entry = std::fs::read_dir(&entries)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap() == hello)
        .expect("hello's manifest cache entry");
    std::fs::write(&entry, &shell).unwrap();
    drop(server);
    let server = self::server(&storage, port, Some(&new_key));
    let (_, digest, _) = manifest_as(&server, "shell/hello", "latest", DOCKER_MANIFEST).await;
    assert_eq!(digest, common::sha256(&shell));
    let (verified, printed) = cosign_verify(&new_public, &format!("{host}/shell/hello"));
    assert!(!verified, "a changed entry verified:\n{printed}");
    assert!(server.metric(r#"nixery_signings_total{outcome="refused"}"#) >= 1);
    // What cosign asked for: no signature of that digest under that name.
    let hex = digest.trim_start_matches("sha256:");
    let response = client()
        .get(server.url(&format!("/v2/shell/hello/manifests/sha256-{hex}.sig")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

/// `cosign verify-attestation --type <kind>` of `image` with `public`, offline: whether it
/// verified, and the statements it printed (one JSON envelope a line).
fn cosign_verify_attestation(
    public: &Path,
    kind: &str,
    image: &str,
) -> (bool, Vec<serde_json::Value>, String) {
    let output = cosign_offline(&[
        "verify-attestation",
        "--key",
        &public.display().to_string(),
        "--type",
        kind,
        image,
    ]);
    let statements = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|envelope| {
            use base64::Engine as _;
            let payload = base64::engine::general_purpose::STANDARD
                .decode(envelope["payload"].as_str()?)
                .ok()?;
            serde_json::from_slice(&payload).ok()
        })
        .collect();
    (
        output.status.success(),
        statements,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn provenance_and_sboms_are_attested_and_a_changed_byte_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "nixery");
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let storage = dir.path().join("storage");
    let server = server(&storage, port, Some(&key));
    let image = format!("{host}/shell/hello");
    let (_, digest, _) = manifest_as(&server, "shell/hello", "latest", DOCKER_MANIFEST).await;

    let (verified, statements, printed) =
        cosign_verify_attestation(&public, "slsaprovenance1", &image);
    assert!(verified, "{printed}");
    let [statement] = statements.as_slice() else {
        panic!("{statements:?}")
    };
    assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(statement["subject"][0]["name"], image);
    let predicate = &statement["predicate"];
    let definition = &predicate["buildDefinition"];
    let packages = definition["externalParameters"]["image"].as_str().unwrap();
    assert!(packages.split('/').any(|p| p == "hello"), "{packages}");
    assert_eq!(definition["externalParameters"]["tag"], "latest");
    assert_eq!(definition["internalParameters"]["layerBudget"], 96);
    let dependencies = definition["resolvedDependencies"].as_array().unwrap();
    // The package set's tree, hashed as Nix hashes it.
    let tree_hash = common::run(
        "nix-hash",
        &["--type", "sha256", common::offline_pkgs().to_str().unwrap()],
    );
    assert_eq!(dependencies[0]["name"], "package set");
    assert_eq!(dependencies[0]["digest"]["sha256"], tree_hash.trim());
    // Every store path of the closure, with its NAR hash and derivation, as the store has them.
    let busybox = dependencies
        .iter()
        .find(|d| d["uri"].as_str().is_some_and(|u| u.ends_with("-busybox")))
        .unwrap_or_else(|| panic!("no busybox in {dependencies:?}"));
    let path = busybox["uri"].as_str().unwrap().trim_start_matches("nix:");
    let nar_hash = common::run("nix-store", &["--query", "--hash", path]);
    let deriver = common::run("nix-store", &["--query", "--deriver", path]);
    assert_eq!(
        Some(busybox["digest"]["sha256"].as_str().unwrap()),
        nixery::sbom::nar_hash_hex(nar_hash.trim()).as_deref()
    );
    assert_eq!(busybox["annotations"]["deriver"], deriver.trim());
    // The SBOMs: attested, and named in the provenance by digest.
    for kind in ["spdxjson", "cyclonedx"] {
        let (verified, statements, printed) = cosign_verify_attestation(&public, kind, &image);
        assert!(verified, "{kind}: {printed}");
        assert_eq!(statements.len(), 1, "{kind}");
    }
    assert_eq!(
        predicate["runDetails"]["byproducts"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // The referrers API lists the SBOMs, the signatures and the attestations.
    let referrers = common::get_json(
        &server,
        &format!("/v2/shell/hello/referrers/{digest}"),
        None,
    )
    .await;
    let mut types: Vec<&str> = referrers["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["artifactType"].as_str().unwrap())
        .collect();
    types.sort();
    assert_eq!(
        types,
        [
            "application/spdx+json",
            "application/vnd.cyclonedx+json",
            "application/vnd.dev.cosign.artifact.sig.v1+json",
            "application/vnd.dsse.envelope.v1+json",
        ]
    );

    // A changed byte in the stored provenance envelope: verification fails.
    let hex = digest.trim_start_matches("sha256:");
    let attachment = common::get_json(
        &server,
        &format!("/v2/shell/hello/manifests/sha256-{hex}.att"),
        Some("application/vnd.oci.image.manifest.v1+json"),
    )
    .await;
    let provenance = attachment["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["annotations"]["predicateType"] == "https://slsa.dev/provenance/v1")
        .expect("a provenance layer");
    let blob = storage.join(format!(
        "blobs/sha256/{}",
        provenance["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
    ));
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();
    let (verified, _, printed) = cosign_verify_attestation(&public, "slsaprovenance1", &image);
    assert!(!verified, "a changed envelope verified:\n{printed}");
}

#[test]
fn a_key_that_cannot_be_read_stops_start_up_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "nixery");
    let storage = dir.path().join("storage");
    let host = ("NIXERY_REGISTRY_HOST", "127.0.0.1:5000");
    let key = key.display().to_string();
    let public = public.display().to_string();
    for (env, says) in [
        // A public key is not a private key.
        (
            vec![("NIXERY_SIGNING_KEY", public.as_str()), host],
            "NIXERY_SIGNING_KEY",
        ),
        (
            vec![
                ("NIXERY_SIGNING_KEY", key.as_str()),
                ("NIXERY_SIGNING_KEY_PASSWORD", "wrong"),
                host,
            ],
            "wrong NIXERY_SIGNING_KEY_PASSWORD",
        ),
        (
            vec![("NIXERY_SIGNING_KEY", key.as_str()), host],
            "set NIXERY_SIGNING_KEY_PASSWORD",
        ),
        (
            vec![
                ("NIXERY_SIGNING_KEY", key.as_str()),
                ("NIXERY_SIGNING_KEY_PASSWORD", PASSWORD),
            ],
            "needs NIXERY_REGISTRY_HOST",
        ),
        (
            vec![
                ("NIXERY_SIGNING_KEY", key.as_str()),
                ("NIXERY_SIGNING_KEY_PASSWORD", PASSWORD),
                ("NIXERY_REGISTRY_HOST", "https://registry.example"),
            ],
            "is not a host or host:port",
        ),
    ] {
        let printed = common::start_up_failure(&storage, &env);
        assert!(printed.contains(says), "{env:?}: {printed}");
    }
}

#[tokio::test]
async fn an_index_and_every_platforms_image_are_signed() {
    common::require_arm64();
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = key_pair(dir.path(), "nixery");
    let port = free_port().to_string();
    let host = format!("127.0.0.1:{port}");
    let key = key.display().to_string();
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[
            ("PORT", port.as_str()),
            ("NIXERY_SIGNING_KEY", key.as_str()),
            ("NIXERY_SIGNING_KEY_PASSWORD", PASSWORD),
            ("NIXERY_REGISTRY_HOST", host.as_str()),
            ("NIXERY_PLATFORMS", "linux/amd64,linux/arm64"),
            (
                "NIXERY_NIX_CONFIG",
                "substituters =\nextra-platforms = aarch64-linux",
            ),
        ],
    );
    let (_, index_digest, index) = manifest_as(
        &server,
        "shell/hello",
        "latest",
        "application/vnd.oci.image.index.v1+json",
    )
    .await;
    let (_, list_digest, _) = manifest_as(
        &server,
        "shell/hello",
        "latest",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
    .await;
    // cosign resolves the tag to an index (the Docker manifest list, by the Accept it sends)
    // and checks that index's signature.
    let (verified, printed) = cosign_verify(&public, &format!("{host}/shell/hello"));
    assert!(verified, "{printed}");
    assert!(
        printed.contains(&list_digest) || printed.contains(&index_digest),
        "{printed}"
    );
    // And each platform's image, by digest.
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2);
    for manifest in manifests {
        let digest = manifest["digest"].as_str().unwrap();
        let (verified, printed) = cosign_verify(&public, &format!("{host}/shell/hello@{digest}"));
        assert!(verified, "{digest}: {printed}");
    }
}
