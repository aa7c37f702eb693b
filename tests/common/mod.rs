//! Starts the real `nixery` binary on the offline package set with its own storage directory,
//! and checks what a registry client would check.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod browser;
pub mod bucket;
pub mod repo;
pub mod trixie;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// Nix settings for every test server: no binary cache can be reached from here.
pub const NIX_CONFIG: &str = "substituters =";

/// The offline package set shipped with the project.
pub fn offline_pkgs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nix/offline-pkgs")
}

/// Fails the test, naming the install step, when `program` is not installed.
pub fn require_tool(program: &str, install: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is not installed: run `{install}` (or scripts/test, which installs it)"
    );
}

/// Fails unless a Docker daemon answers.
pub fn require_docker() {
    require_tool("docker", "apt-get install docker.io");
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "no Docker daemon answers: start one with `dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs &` (scripts/test does)"
    );
}

/// containerd's socket, where scripts/test starts it.
pub const CONTAINERD: &str = "/run/containerd/containerd.sock";

/// Runs `ctr` with `args` in containerd `namespace` (on [`CONTAINERD`]) and returns its stdout.
pub fn ctr(namespace: &str, args: &[&str]) -> String {
    let mut all = vec!["--address", CONTAINERD, "--namespace", namespace];
    all.extend_from_slice(args);
    run("ctr", &all)
}

/// `ctr images pull` of `image` over plain http into containerd `namespace`, unpacked with the
/// native snapshotter (the test machine's storage may not take overlayfs); `flags` go before
/// the image (`--all-platforms`).
pub fn ctr_pull(namespace: &str, image: &str, flags: &[&str]) {
    let mut args = vec!["images", "pull", "--plain-http"];
    args.extend_from_slice(flags);
    args.extend(["--snapshotter", "native", image]);
    ctr(namespace, &args);
}

/// The line of `ctr images ls` in `namespace` that lists `image` (its type, digest, platforms).
pub fn ctr_listed(namespace: &str, image: &str) -> String {
    let listed = ctr(namespace, &["images", "ls"]);
    listed
        .lines()
        .find(|l| l.starts_with(&format!("{image} ")))
        .unwrap_or_else(|| panic!("{image} not listed:\n{listed}"))
        .to_owned()
}

/// Runs `hello` in a new container `container` of `image` (pulled into `namespace`), removed
/// afterwards; returns what it printed.
pub fn ctr_run_hello(namespace: &str, image: &str, container: &str) -> String {
    ctr(
        namespace,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "native",
            image,
            container,
            "hello",
        ],
    )
}

/// Removes `image` (its content too) and then `namespace` from containerd.
pub fn ctr_remove(namespace: &str, image: &str) {
    ctr(namespace, &["images", "rm", "--sync", image]);
    run(
        "ctr",
        &["--address", CONTAINERD, "namespaces", "rm", namespace],
    );
}

/// Fails unless containerd answers on [`CONTAINERD`].
pub fn require_containerd() {
    require_tool("ctr", "apt-get install containerd");
    let ok = Command::new("ctr")
        .args(["--address", CONTAINERD, "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "containerd does not answer on {CONTAINERD}: start it with `containerd &` (scripts/test does)"
    );
}

/// Fails unless this machine can build aarch64-linux packages of the offline set: qemu
/// registered with binfmt_misc, and the arm64 busybox where nix/offline-pkgs reads it.
pub fn require_arm64() {
    let emulated = Path::new("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists();
    let busybox = Path::new("/usr/local/lib/busybox-static/aarch64-linux/busybox").exists();
    assert!(
        emulated && busybox,
        "arm64 builds need qemu-aarch64 in binfmt_misc ({emulated}) and the arm64 busybox-static ({busybox}): run `. scripts/lib.sh && ensure_arm64` (scripts/test does)"
    );
}

/// An axum app served on 127.0.0.1 from a thread of its own (tests block on docker and other
/// processes while it must answer); stopped when dropped or [`Background::stop`]ped.
pub struct Background {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    pub fn serve(app: axum::Router) -> Background {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let port = listener.local_addr().expect("the bound port").port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        stopped.await.ok();
                    })
                    .await
                    .expect("serving");
            });
        });
        Background {
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops serving: connections are refused from now on.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running nixery server; killed when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
    pub storage: PathBuf,
    log_path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// A server with fresh storage.
    pub fn start() -> Server {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let storage = tmp.path().join("storage");
        let mut server = Server::start_on(&storage, &[]);
        server._tmp = Some(tmp);
        server
    }

    /// A server on `storage` (kept after the server stops), with extra environment `env`.
    pub fn start_on(storage: &Path, env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nixery"));
        command.envs(Server::env(storage, env));
        Server::start_command(storage, command)
    }

    /// The environment of a test server on `storage`: the defaults, then `env`.
    pub fn env(storage: &Path, env: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = [
            ("PORT", "0"),
            ("NIXERY_LISTEN_ADDRESS", "127.0.0.1"),
            ("NIXERY_PKGS_PATH", offline_pkgs().to_str().unwrap()),
            ("STORAGE_PATH", storage.to_str().unwrap()),
            (
                "NIXERY_ADDRESS_FILE",
                address_file(storage).to_str().unwrap(),
            ),
            ("NIXERY_NIX_CONFIG", NIX_CONFIG),
            ("RUST_LOG", "info"),
        ]
        .iter()
        .chain(env)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // Later settings win, as with `Command::envs`.
        let mut seen = std::collections::HashSet::new();
        all.reverse();
        all.retain(|(k, _)| seen.insert(k.clone()));
        all.reverse();
        all
    }

    /// A server started by `command` (the binary, or a wrapper that runs it) on `storage`.
    pub fn start_command(storage: &Path, mut command: Command) -> Server {
        require_tool("nix-build", "apt-get install nix-bin");
        std::fs::create_dir_all(storage).expect("storage directory");
        let log_path = storage.with_extension(format!("log.{}", unique()));
        let log = std::fs::File::create(&log_path).expect("log file");
        // A server earlier on this storage wrote the file too: wait for this one's.
        match std::fs::remove_file(address_file(storage)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                panic!("removing the address file: {e}")
            }
            _ => {}
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nixery starts");
        let mut server = Server {
            child,
            port: 0,
            storage: storage.to_path_buf(),
            log_path,
            _tmp: None,
        };
        server.port = server.addresses()[0].port();
        server
    }

    /// The addresses the server listens on, from its NIXERY_ADDRESS_FILE: the main one, then
    /// the metrics one when NIXERY_METRICS_ADDRESS is set. Waits up to 30 s for the file.
    pub fn addresses(&mut self) -> Vec<std::net::SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The server renames the file into place whole: it is absent or complete.
            if let Ok(text) = std::fs::read_to_string(address_file(&self.storage)) {
                return text
                    .lines()
                    .map(|line| line.parse().expect("an address in NIXERY_ADDRESS_FILE"))
                    .collect();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nixery exited with {status} before serving:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nixery did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `host:port` as clients name the registry.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.host())
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        std::fs::File::open(&self.log_path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .expect("server log");
        text
    }

    /// The server's log once its line containing `text` is written (lines reach the log in
    /// batches, up to `nixery::server::log_writer::GATHER` after they are logged): that line.
    pub fn logged_line(&self, text: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(text)) {
                return line.to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no line with {text:?}:\n{log}"
            );
            std::thread::sleep(nixery::server::log_writer::GATHER);
        }
    }

    /// The value of `series` in the server's `/metrics`: a metric name (the sum over all its
    /// labels) or a name with labels as the text writes them (`nixery_builds_total{outcome="built"}`).
    pub fn metric(&self, series: &str) -> u64 {
        let (status, text) = raw_get(self, "/metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {text}");
        let mut total = 0.0;
        let mut found = false;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let bare = name.split('{').next().unwrap_or(name);
            if name == series || (!series.contains('{') && bare == series) {
                total += value.parse::<f64>().expect("a metric value");
                found = true;
            }
        }
        // A metric with no samples yet counts as 0, but its family must exist.
        let family = series.split('{').next().unwrap().trim_end_matches("_total");
        assert!(
            found || text.contains(&format!("# TYPE {family} ")),
            "no metric {series} in /metrics:\n{text}"
        );
        total as u64
    }

    /// How many times this server ran nix-build (`nixery_nix_builds_total`).
    pub fn nix_builds(&self) -> usize {
        self.metric("nixery_nix_builds_total") as usize
    }

    /// How many times this server ran nix-instantiate (`nixery_nix_evaluations_total`).
    pub fn evaluations(&self) -> usize {
        self.metric("nixery_nix_evaluations_total") as usize
    }

    /// How many objects this server wrote to storage (`nixery_uploads_total`).
    pub fn uploads(&self) -> usize {
        self.metric("nixery_uploads_total") as usize
    }

    /// Stops the server (SIGKILL), keeping its storage.
    pub fn stop(mut self) -> PathBuf {
        self.child.kill().ok();
        self.child.wait().ok();
        self.storage.clone()
    }

    /// Kills the server (SIGKILL) and starts a new one on the same storage.
    pub fn restart(mut self, env: &[(&str, &str)]) -> Server {
        self.child.kill().ok();
        self.child.wait().ok();
        let mut server = Server::start_on(&self.storage, env);
        server._tmp = self._tmp.take();
        server
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Where a test server on `storage` writes the addresses it listens on (NIXERY_ADDRESS_FILE):
/// beside the storage directory, which a server run in the trixie root sees too.
fn address_file(storage: &Path) -> PathBuf {
    storage.with_extension("address")
}

/// The offline set plus packages that misbehave on purpose (`slow`, `slowish`; new for every
/// `nonce`), in a tree of its own.
pub fn fault_pkgs(nonce: &str) -> PathBuf {
    fixture_tree(&trees_dir(), "fault-pkgs", nonce)
}

/// Where the trees of [`fault_pkgs`] are made (kept after the tests: the servers built from them
/// may outlive a test).
fn trees_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("nixery-test-trees");
    std::fs::create_dir_all(&dir).expect("a directory for package trees");
    dir
}

/// A package set for one test, in a new directory under `parent`: the files of
/// tests/fixtures/`fixture`, a copy of nix/offline-pkgs at `offline-pkgs/`, and `nonce` in the
/// file `nonce` (which fixtures read to make derivations no earlier test built). A tree of its
/// own because the server's evaluation is restricted: it reads nothing outside the tree it is
/// given, and no environment variable.
pub fn fixture_tree(parent: &Path, fixture: &str, nonce: &str) -> PathBuf {
    let tree = parent.join(format!("{fixture}-{}", unique()));
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    copy_dir(&fixtures.join(fixture), &tree);
    copy_dir(&offline_pkgs(), &tree.join("offline-pkgs"));
    std::fs::write(tree.join("nonce"), nonce).expect("the nonce file");
    tree
}

/// Copies the directory `from` to `to` (made), files and directories only.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("a directory to copy into");
    for entry in std::fs::read_dir(from)
        .expect("a directory to copy")
        .flatten()
    {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("a copied file");
        }
    }
}

/// Asks `/readyz` until it answers `status`, for up to 7 s (it answers from a probe at most 5 s
/// old); panics saying `what` when it never does. Returns how long it took.
pub async fn readyz_becomes(server: &Server, status: u16, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let got = client()
            .get(server.url("/readyz"))
            .send()
            .await
            .expect("/readyz answers")
            .status()
            .as_u16();
        if got == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "{what}: /readyz still answers {got}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a server on `storage` with `env` added, which must make it exit with an error within
/// 20 s; returns what it printed. Of Google's credentials it has only the key file `env` names.
pub fn start_up_failure(storage: &Path, env: &[(&str, &str)]) -> String {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .envs(Server::env(storage, env))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("nixery starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!(
                "nixery still runs 20 s after start with {env:?}:\n{}",
                std::fs::read_to_string(log.path()).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(log.path()).unwrap();
    assert!(!status.success(), "nixery exited with {status}:\n{stderr}");
    stderr
}

/// A value no earlier test run used, so that fixtures reading it (see [`fixture_tree`]) give
/// new derivations.
pub fn nonce() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An HTTP client with a timeout long enough for a cold build.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

/// A pulled image: its manifest and the bytes of every blob, each checked against its digest.
pub struct Pulled {
    pub digest: String,
    pub manifest: serde_json::Value,
    pub config: serde_json::Value,
    pub layers: Vec<(String, Vec<u8>)>,
}

impl Pulled {
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|(d, _)| d.clone()).collect()
    }
}

/// Pulls `name` as a client would: the manifest by tag, then the config and each layer, checking
/// every digest, size and diff_id.
pub async fn pull(server: &Server, name: &str) -> Pulled {
    pull_ref(server, name, "latest").await
}

/// Pulls `name:reference` as [`pull`] does.
pub async fn pull_ref(server: &Server, name: &str, reference: &str) -> Pulled {
    let http = client();
    let response = http
        .get(server.url(&format!("/v2/{name}/manifests/{reference}")))
        .send()
        .await
        .expect("manifest request");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("manifest body");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let digest = headers["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(digest, sha256(&body), "manifest digest header");
    assert_eq!(
        headers["content-type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("manifest is JSON");

    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config_bytes = blob(server, config_digest).await;
    assert_eq!(
        config_bytes.len() as u64,
        manifest["config"]["size"].as_u64().unwrap()
    );
    let config: serde_json::Value = serde_json::from_slice(&config_bytes).expect("config is JSON");

    let mut layers = Vec::new();
    for (i, layer) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let digest = layer["digest"].as_str().unwrap();
        let bytes = blob(server, digest).await;
        assert_eq!(
            bytes.len() as u64,
            layer["size"].as_u64().unwrap(),
            "layer size"
        );
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut tar)
            .expect("layer is gzip");
        assert_eq!(
            sha256(&tar),
            config["rootfs"]["diff_ids"][i].as_str().unwrap(),
            "diff_id of layer {i}"
        );
        layers.push((digest.to_owned(), bytes));
    }
    Pulled {
        digest,
        manifest,
        config,
        layers,
    }
}

/// `GET /v2/<name>/manifests/<reference>` with `Accept: <accept>`: a 200 whose
/// `Docker-Content-Digest` is its body's; returns the content type, the digest and the body.
pub async fn manifest_as(
    server: &Server,
    name: &str,
    reference: &str,
    accept: &str,
) -> (String, String, Vec<u8>) {
    let response = client()
        .get(server.url(&format!("/v2/{name}/manifests/{reference}")))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{name}:{reference}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let digest = response.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.bytes().await.unwrap().to_vec();
    assert_eq!(sha256(&body), digest);
    (content_type, digest, body)
}

/// GETs blob `digest` and checks its bytes and headers.
pub async fn blob(server: &Server, digest: &str) -> Vec<u8> {
    let response = client()
        .get(server.url(&format!("/v2/any/blobs/{digest}")))
        .send()
        .await
        .expect("blob request");
    assert_eq!(response.status(), 200, "blob {digest}");
    assert_eq!(response.headers()["docker-content-digest"], digest);
    let length: u64 = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = response.bytes().await.expect("blob body").to_vec();
    assert_eq!(bytes.len() as u64, length, "Content-Length of {digest}");
    assert_eq!(sha256(&bytes), digest, "bytes of {digest}");
    bytes
}

/// The registry error a response carries: (status, code, message).
pub async fn registry_error(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.expect("error body is JSON");
    let error = &body["errors"][0];
    (
        status,
        error["code"].as_str().expect("code").to_owned(),
        error["message"].as_str().expect("message").to_owned(),
    )
}

/// `GET path` with `Accept: accept` (any when `None`): a 200 whose body is JSON, parsed.
pub async fn get_json(server: &Server, path: &str, accept: Option<&str>) -> serde_json::Value {
    let mut request = client().get(server.url(path));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

/// Runs a command and returns its stdout, failing the test with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} could not be run: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command that must fail and returns everything it printed.
pub fn run_failing(program: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} could not be run: {e}"));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !output.status.success(),
        "{program} {args:?} succeeded:\n{printed}"
    );
    printed
}

/// Sends `GET path` exactly as written (no client-side normalisation of `..` or
/// percent-encoding) and returns the status and body.
pub fn raw_get(server: &Server, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.host()
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// Pulls `image` with docker, runs `hello` in it and checks it greets, then removes the image.
pub fn docker_pull_and_run_hello(image: &str) {
    run("docker", &["pull", image]);
    let out = run(
        "docker",
        &["run", "--rm", "--network", "none", image, "hello"],
    );
    assert_eq!(out, "Hello, world!\n");
}

/// `GET /api/v1/packages?QUERY`: the status and the JSON body (always JSON).
pub async fn search(server: &Server, query: &str) -> (u16, serde_json::Value) {
    let response = client()
        .get(server.url(&format!("/api/v1/packages?{query}")))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json");
    (status, response.json().await.expect("a JSON body"))
}

/// A search once the catalog is ready: the first search of a set may be told to come back.
pub async fn search_ready(server: &Server, query: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = search(server, query).await;
        match status {
            200 => return body,
            503 => assert!(Instant::now() < deadline, "the catalog never got ready"),
            _ => panic!("{status}: {body}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Server {
    /// Sends SIGTERM to the server, as a platform does before it stops an instance.
    pub fn terminate(&self) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a process id");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .expect("SIGTERM sent to the server");
    }

    /// The server's exit status once it has exited, waiting at most `timeout` (`None`: still
    /// running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("the server's status") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the server's /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// How many file descriptors the server has open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("the server's /proc/<pid>/fd")
            .count()
    }
}

/// Processes whose environment contains `needle` (a Nix builder gets its derivation's
/// attributes as environment variables).
pub fn processes_with_env(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
        {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

/// Processes whose command line contains `needle` (nix-build names the GC root it makes under
/// the server's storage).
pub fn processes_with_cmdline(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline
            .windows(needle.len().max(1))
            .any(|window| window == needle.as_bytes())
        {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

/// Reads a response's status line and headers from `stream` (byte by byte, so nothing of the
/// body is taken); returns the status and the `Content-Length`.
pub fn read_head(stream: &mut std::net::TcpStream) -> (u16, Option<u64>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("a response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    });
    (status, length)
}

/// `GET /api/v1/builds/<image>`: the build's status JSON (panics unless the server has one).
pub async fn build_status(server: &Server, image: &str) -> serde_json::Value {
    let response = client()
        .get(server.url(&format!("/api/v1/builds/{image}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "no build of {image}");
    response.json().await.unwrap()
}

/// Bytes of the files in a server's staging directory `dir` (0 when there is none).
pub fn staged_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
