//! Builds beyond one machine: Nix's remote builders over ssh. A second machine is stood in for
//! by an sshd on 127.0.0.1 (Debian's openssh-server, started by each test with a config, host
//! key and authorized key of its own), whose Nix builds in a store of its own under a temporary
//! directory (`?remote-store=local?root=DIR`). A server whose Nix may not build itself
//! (`max-jobs = 0`) builds an image there and serves the same bytes as a server that built it
//! here; a build that fails there, and a builder that cannot be reached, are named.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;

use common::{Server, client, fault_pkgs, nonce, pull, registry_error, require_tool, run};

const SSHD: &str = "/usr/sbin/sshd";

/// An sshd on a free port of 127.0.0.1 that lets root in with a key made for it; stopped when
/// dropped.
struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Sshd {
    fn start() -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is not installed: run `apt-get install openssh-server` (or scripts/test, which installs it)"
        );
        require_tool("ssh-keygen", "apt-get install openssh-client");
        assert!(
            run("id", &["-u"]).trim() == "0",
            "the remote builder tests log in as root through their own sshd: run them as root"
        );
        // sshd's privilege separation directory (the Debian package's service makes it).
        std::fs::create_dir_all("/run/sshd").unwrap();
        let dir = tempfile::tempdir().unwrap();
        for key in ["host_key", "client_key"] {
            let path = dir.path().join(key);
            run(
                "ssh-keygen",
                &[
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-f",
                    path.to_str().unwrap(),
                ],
            );
        }
        std::fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("sshd_config");
        let d = dir.path().display();
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPidFile {d}/sshd.pid\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("sshd.log")).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut sshd = Sshd { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sshd.log().contains("Server listening") {
            if let Ok(Some(status)) = sshd.child.try_wait() {
                panic!("sshd exited with {status}:\n{}", sshd.log());
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not start:\n{}",
                sshd.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sshd
    }

    fn log(&self) -> String {
        let mut text = String::new();
        std::fs::File::open(self.dir.path().join("sshd.log"))
            .and_then(|mut f| f.read_to_string(&mut text))
            .unwrap();
        text
    }

    /// The key that logs in.
    fn key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A store of its own for the remote builder, under a temporary directory.
struct RemoteStore(tempfile::TempDir);

impl RemoteStore {
    fn new() -> RemoteStore {
        RemoteStore(tempfile::tempdir().unwrap())
    }

    /// Where store path `path` is in this store.
    fn path_of(&self, path: &str) -> PathBuf {
        self.0.path().join(path.trim_start_matches('/'))
    }
}

/// The settings of a server whose Nix builds nothing itself and everything on the builder
/// behind `port`, as an operator writes them (`\n` between Nix settings).
fn remote_settings(port: u16, key: &Path, store: &RemoteStore) -> Vec<(&'static str, String)> {
    let builder = format!(
        "ssh://root@127.0.0.1?remote-store=local%3Froot%3D{} {} {}",
        store.0.path().display(),
        nixery::nix::current_system(),
        key.display()
    );
    vec![
        (
            "NIXERY_NIX_CONFIG",
            format!("substituters =\\nmax-jobs = 0\\nbuilders = {builder}"),
        ),
        (
            "NIXERY_NIX_SSHOPTS",
            format!(
                "-p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
            ),
        ),
    ]
}

fn start(storage: &Path, settings: &[(&str, String)]) -> Server {
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_on(storage, &settings)
}

/// The outputs of the derivations new to this test (those of `slowish`, which reads the nonce,
/// and the image's own two) in the image of hello and slowish, as the server evaluates it from
/// the package set at `pkgs`.
fn new_outputs(server: &Server, pkgs: &str) -> Vec<String> {
    let output = Command::new("nix-instantiate")
        .arg(server.storage.join("nix/build-image.nix"))
        .args(["--argstr", "pkgsPath", pkgs])
        .args(["--argstr", "packages", r#"["hello","slowish"]"#])
        .args(["--argstr", "system", &nixery::nix::current_system()])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let drv = String::from_utf8(output.stdout).unwrap();
    let derivations: Vec<String> = run("nix-store", &["--query", "--requisites", drv.trim()])
        .lines()
        .filter(|d| d.contains("-slowish.drv") || d.contains("-nixery-image"))
        .map(str::to_owned)
        .collect();
    assert_eq!(derivations.len(), 3, "{derivations:?}");
    let mut args = vec!["--query", "--outputs"];
    args.extend(derivations.iter().map(String::as_str));
    run("nix-store", &args).lines().map(str::to_owned).collect()
}

/// The `derivations` events of the build stream at `url`, read to its end.
async fn derivation_events(url: String) -> Vec<serde_json::Value> {
    let response = client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str::<serde_json::Value>(data).unwrap())
        .filter(|event| event["phase"] == "derivations")
        .collect()
}

#[tokio::test]
async fn a_remote_builder_builds_the_image_a_local_build_gives() {
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce).display().to_string();
    let set = |extra: Vec<(&'static str, String)>| {
        let mut all = vec![("NIXERY_PKGS_PATH", pkgs.clone())];
        all.extend(extra);
        all
    };
    let dir = tempfile::tempdir().unwrap();
    let image = "hello/slowish";

    // Built here, by the server's own Nix.
    let local = start(&dir.path().join("local"), &set(vec![]));
    let here = pull(&local, image).await;
    assert_eq!(local.nix_builds(), 1);
    let outputs = new_outputs(&local, &pkgs);
    drop(local);
    // Forgotten, so that Nix has to build them again: deleting works only because the server
    // let go of the image's GC root once it was packed.
    let mut args = vec!["--delete"];
    args.extend(outputs.iter().map(String::as_str));
    run("nix-store", &args);
    assert!(outputs.iter().all(|o| !Path::new(o).exists()));

    // Built on the remote builder.
    let sshd = Sshd::start();
    let store = RemoteStore::new();
    let remote = start(
        &dir.path().join("remote"),
        &set(remote_settings(sshd.port, &sshd.key(), &store)),
    );
    let response = client()
        .post(remote.url("/api/v1/builds"))
        .json(&serde_json::json!({"image": image, "tag": "latest"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", remote.log());
    // Followed live from here on (a stream starts with the latest event of each phase).
    let events = tokio::spawn(derivation_events(
        remote.url(&format!("/api/v1/events/{image}")),
    ));
    let there = pull(&remote, image).await;
    let events = events.await.unwrap();

    assert_eq!(there.digest, here.digest, "{}", remote.log());
    assert_eq!(there.manifest, here.manifest);
    assert_eq!(remote.nix_builds(), 1);
    for output in &outputs {
        assert!(
            store.path_of(output).exists(),
            "{output} was not built in the remote store\n{}",
            remote.log()
        );
        assert!(Path::new(output).exists(), "{output} was not copied back");
    }
    // The build page named the machine (and not the store settings in its URI).
    let currents: Vec<&str> = events
        .iter()
        .filter_map(|e| e["current"].as_str())
        .collect();
    assert!(
        currents
            .iter()
            .any(|c| c.ends_with(" on ssh://root@127.0.0.1")),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e["text"]
            .as_str()
            .unwrap()
            .contains(" on ssh://root@127.0.0.1")),
        "{events:#?}"
    );
    assert!(currents.iter().all(|c| !c.contains("remote-store")));
}

#[tokio::test]
async fn a_build_that_fails_on_the_remote_builder_names_it() {
    let sshd = Sshd::start();
    let store = RemoteStore::new();
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        &dir.path().join("storage"),
        &remote_settings(sshd.port, &sshd.key(), &store),
    );
    let response = client()
        .get(server.url("/v2/hello/failing/manifests/latest"))
        .send()
        .await
        .unwrap();
    let (status, code, message) = registry_error(response).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "MANIFEST_UNKNOWN"),
        "{message}"
    );
    assert!(
        message.starts_with(
            "building hello/failing failed: builder for 'failing' failed with exit code 1 on ssh://root@127.0.0.1; log: "
        ),
        "{message}"
    );
    assert_eq!(server.nix_builds(), 1);
}

#[tokio::test]
async fn a_builder_that_cannot_be_reached_is_named_and_not_held_against_the_image() {
    let nonce = nonce();
    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RemoteStore::new();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = remote_settings(port, Path::new("/nonexistent/key"), &store);
    settings.push(("NIXERY_PKGS_PATH", fault_pkgs(&nonce).display().to_string()));
    let server = start(&dir.path().join("storage"), &settings);
    for attempt in 1..=2 {
        let response = client()
            .get(server.url("/v2/hello/slowish/manifests/latest"))
            .send()
            .await
            .unwrap();
        let (status, code, message) = registry_error(response).await;
        assert_eq!((status, code.as_str()), (500, "UNKNOWN"), "{message}");
        assert!(
            message.starts_with("Nix could not build on the remote builder ssh://root@127.0.0.1: ")
                && message.contains(&format!("port {port}: Connection refused")),
            "{message}"
        );
        // The server's fault, not the image's: the next request tries again.
        assert_eq!(server.nix_builds(), attempt);
        // Neither the message nor the build's record (its log tail included) shows the key
        // file or the builder's store settings.
        let build = client()
            .get(server.url("/api/v1/builds/hello/slowish"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(build.contains("Connection refused"), "{build}");
        for shown in [&message, &build] {
            assert!(
                !shown.contains("/nonexistent/key") && !shown.contains("remote-store"),
                "{shown}"
            );
        }
    }
}
