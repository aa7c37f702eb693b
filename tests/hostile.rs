//! A package set written by an attacker (tests/fixtures/hostile-pkgs), served as a client could
//! make any server serve one (a commit of a fork): its evaluation reads neither the server's
//! environment nor a file outside its tree, its builders see neither the server's environment
//! nor a root-only file, and in the sandbox they neither write into the store nor reach the
//! server's port; a builder that prints a gibibyte leaves the server's memory as it was. Under
//! Debian 12's Nix 2.8 on the host (sandboxed) and Debian 13's Nix 2.26 in the trixie root
//! (build users without the sandbox, which a chroot cannot give).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::trixie::start_under_trixie;
use common::{Server, client, fixture_tree, nonce, pull, registry_error, require_tool};

/// What the server must never let a package set see.
struct Secrets {
    /// A value in the server's environment (`NIXERY_HOSTILE_SECRET`).
    env: String,
    /// The contents of a root-only file (mode 0600, in a world-readable directory).
    file: String,
    path: PathBuf,
}

/// The hostile tree under `dir` (which must be world-readable, as the trixie root sees it), with
/// a root-only secret file beside it.
fn hostile_tree(dir: &Path, nonce: &str) -> (PathBuf, Secrets) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secrets = Secrets {
        env: format!("env-secret-{nonce}"),
        file: format!("file-secret-{nonce}"),
        path: dir.join("secret"),
    };
    std::fs::write(&secrets.path, &secrets.file).unwrap();
    std::fs::set_permissions(&secrets.path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tree = fixture_tree(dir, "hostile-pkgs", nonce);
    std::fs::write(tree.join("secret-path"), secrets.path.display().to_string()).unwrap();
    std::fs::write(tree.join("port"), "0").unwrap();
    (tree, secrets)
}

fn settings<'a>(tree: &'a Path, secrets: &'a Secrets) -> Vec<(&'static str, &'a str)> {
    vec![
        ("NIXERY_PKGS_PATH", tree.to_str().unwrap()),
        ("NIXERY_HOSTILE_SECRET", secrets.env.as_str()),
        ("NIX_TIMEOUT", "300"),
    ]
}

/// Pulling the images that read the environment and the file at evaluation: each is refused
/// without a word of either secret.
async fn evaluation_sees_nothing(server: &Server, secrets: &Secrets) {
    for (name, what) in [("envleak", "env:"), ("fileleak", "restricted mode")] {
        let response = client()
            .get(server.url(&format!("/v2/{name}/manifests/latest")))
            .send()
            .await
            .unwrap();
        let (status, code, message) = registry_error(response).await;
        assert_eq!(
            (status, code.as_str()),
            (404, "MANIFEST_UNKNOWN"),
            "{message}"
        );
        assert!(message.contains(what), "{name}: {message}");
        for secret in [&secrets.env, &secrets.file] {
            assert!(
                !message.contains(secret.as_str()),
                "{name} leaked: {message}"
            );
        }
    }
}

/// Builds `hostile` and reads what its builder saw, from the store at `store`.
async fn what_the_builder_saw(server: &Server, tree: &Path, store: &Path, nonce: &str) -> String {
    std::fs::write(tree.join("port"), server.port.to_string()).unwrap();
    pull(server, "hostile").await;
    let suffix = format!("-hostile-{nonce}");
    let output = std::fs::read_dir(store)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.to_string_lossy().ends_with(&suffix) && path.is_dir())
        .expect("the hostile package's output in the store");
    std::fs::read_to_string(output.join("seen")).unwrap()
}

/// The isolation the server says its builds have (`nixery_build_isolation`).
fn isolation(server: &Server) -> &'static str {
    ["sandboxed", "build_users", "none"]
        .into_iter()
        .find(|i| server.metric(&format!("nixery_build_isolation{{isolation=\"{i}\"}}")) == 1)
        .expect("one isolation in force")
}

#[tokio::test]
async fn under_nix_2_8_a_hostile_set_reads_nothing_and_its_builder_is_sandboxed() {
    let nonce = nonce();
    let dir = tempfile::tempdir().unwrap();
    let (tree, secrets) = hostile_tree(dir.path(), &nonce);
    let server = Server::start_on(&dir.path().join("storage"), &settings(&tree, &secrets));
    evaluation_sees_nothing(&server, &secrets).await;

    assert_eq!(isolation(&server), "sandboxed");
    let seen = what_the_builder_saw(&server, &tree, Path::new("/nix/store"), &nonce).await;
    println!("the sandboxed builder saw:\n{seen}");
    assert!(!seen.contains("uid=0\n"), "{seen}");
    assert!(seen.contains("environ=hidden"), "{seen}");
    assert!(seen.contains("secret=hidden"), "{seen}");
    assert!(seen.contains("port=unreachable"), "{seen}");
    let written = Path::new("/nix/store").join(format!("nixery-hostile-{nonce}"));
    assert!(!written.exists(), "the builder wrote {}", written.display());
}

#[tokio::test]
async fn under_nix_2_26_a_hostile_set_reads_nothing_and_its_builder_runs_as_a_build_user() {
    require_tool("debootstrap", "apt-get install debootstrap");
    let nonce = nonce();
    let dir = tempfile::tempdir().unwrap();
    let (tree, secrets) = hostile_tree(dir.path(), &nonce);
    let server = start_under_trixie(dir.path(), &settings(&tree, &secrets));
    evaluation_sees_nothing(&server, &secrets).await;

    // A chroot cannot give the sandbox: the server says so, and builds as build users.
    assert_eq!(isolation(&server), "build_users");
    let store = Path::new("/var/tmp/nixery-trixie/nix/store");
    let seen = what_the_builder_saw(&server, &tree, store, &nonce).await;
    println!("the unsandboxed build user saw:\n{seen}");
    assert!(!seen.contains("uid=0\n"), "{seen}");
    assert!(seen.contains("environ=hidden"), "{seen}");
    assert!(seen.contains("secret=hidden"), "{seen}");
}

/// The peak of the server's resident memory (VmHWM), in KiB.
fn peak_rss_kib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builders_that_print_a_gibibyte_leave_the_servers_memory_as_it_was() {
    let nonce = nonce();
    let dir = tempfile::tempdir().unwrap();
    let (tree, secrets) = hostile_tree(dir.path(), &nonce);
    let mut settings = settings(&tree, &secrets);
    // Nix would keep each gibibyte in its log directory too.
    settings.push((
        "NIXERY_NIX_CONFIG",
        "substituters =\\nkeep-build-log = false",
    ));
    let server = Server::start_on(&dir.path().join("storage"), &settings);
    pull(&server, "hello").await;
    let before = peak_rss_kib(&server);

    let started = std::time::Instant::now();
    let (succeeding, failing) = tokio::join!(
        client()
            .get(server.url("/v2/noisy/manifests/latest"))
            .send(),
        client()
            .get(server.url("/v2/noisyfailing/manifests/latest"))
            .send()
    );
    let succeeding = succeeding.unwrap();
    let status = succeeding.status();
    assert_eq!(status, 200, "{}", succeeding.text().await.unwrap());
    let (status, code, message) = registry_error(failing.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "MANIFEST_UNKNOWN"),
        "{message}"
    );
    assert!(message.contains("noisy-failing"), "{message}");
    let peak = peak_rss_kib(&server);
    println!(
        "2 GiB of builder output in {:?}: VmHWM {before} KiB before, {peak} KiB after",
        started.elapsed()
    );
    assert!(peak < 100 * 1024, "VmHWM {peak} KiB");
    assert_eq!(server.nix_builds(), 3);
}
