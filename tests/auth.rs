//! Pull authentication (`NIXERY_AUTH_HTPASSWD`): every route but the health checks asks for HTTP
//! Basic credentials of an htpasswd entry, written by the real `htpasswd -B`; real clients (docker,
//! skopeo) log in and pull; SIGHUP re-reads the file; start-up refuses a missing or non-bcrypt
//! file, and public GCS blob URLs behind a login; a flood of wrong passwords keeps neither logged-in
//! users nor new logins waiting.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Server, client, require_docker, require_tool, run, sha256, start_up_failure};

const ALICE: (&str, &str) = ("alice", "correct horse: battery");
const BOB: (&str, &str) = ("bob", "hunter2");
const CAROL: (&str, &str) = ("carol", "swordfish");
const DAVE: (&str, &str) = ("dave", "letmein");

/// The bcrypt cost of the flood test's file. The test server is an unoptimised build, in which
/// a check at cost 8 takes about 50 ms, as one at cost 10 does in a release build.
const FLOOD_COST: u32 = 8;

/// Requests a flood keeps under way at once, each on a connection of its own.
const FLOOD_CONNECTIONS: usize = 200;

/// How long a flood runs at most if it is never told to stop.
const FLOOD_LIMIT: Duration = Duration::from_secs(60);

/// The header every refusal carries.
const CHALLENGE: &str = r#"Basic realm="nixery""#;

#[tokio::test]
async fn every_route_but_the_health_checks_refuses_a_request_without_valid_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let file = htpasswd_file(dir.path(), &[ALICE, BOB]);
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_AUTH_HTPASSWD", file.to_str().unwrap())],
    );
    let zeros = format!("sha256:{}", "0".repeat(64));
    let blob = format!("/v2/shell/hello/blobs/{zeros}");
    let referrers = format!("/v2/shell/hello/referrers/{zeros}");
    let build = r#"{"image":"shell/hello"}"#;
    // (method, path, body): the registry API, the web pages, the JSON API, /metrics, and a path
    // that is no route (which must not tell a stranger that it is none).
    let routes: &[(&str, &str, &str)] = &[
        ("GET", "/v2/", ""),
        ("HEAD", "/v2/", ""),
        ("GET", "/v2/shell/hello/manifests/latest", ""),
        ("HEAD", "/v2/shell/hello/manifests/latest", ""),
        ("GET", &blob, ""),
        ("HEAD", &blob, ""),
        ("GET", "/v2/shell/hello/tags/list", ""),
        ("GET", &referrers, ""),
        ("POST", "/v2/shell/hello/blobs/uploads/", ""),
        ("GET", "/", ""),
        ("HEAD", "/", ""),
        ("GET", "/search?q=hello", ""),
        ("GET", "/build/shell/hello", ""),
        ("POST", "/build/shell/hello", ""),
        ("GET", "/static/style.css", ""),
        ("GET", "/api/v1/packages?q=hello", ""),
        ("POST", "/api/v1/builds", build),
        ("GET", "/api/v1/builds/shell/hello", ""),
        ("GET", "/api/v1/events/shell/hello", ""),
        ("GET", "/api/v1/sbom/shell/hello", ""),
        ("GET", "/metrics", ""),
        ("GET", "/no-such-page", ""),
    ];
    let http = client();
    assert_eq!(
        metric(&server, ALICE, "nixery_auth_failures_total").await,
        0
    );

    let mut refused = 0;
    for (method, path, body) in routes {
        for (how, authorization) in wrong_credentials() {
            let mut request = http
                .request(method.parse().unwrap(), server.url(path))
                .body(body.to_string());
            if !body.is_empty() {
                request = request.header("content-type", "application/json");
            }
            if let Some(authorization) = authorization {
                request = request.header("authorization", authorization);
            }
            let response = request.send().await.unwrap();
            let what = format!("{method} {path} with {how}");
            assert_unauthorized(response, *method == "HEAD", &what).await;
            refused += 1;
        }
    }
    for path in ["/healthz", "/readyz"] {
        let response = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path} without credentials");
    }

    // Nothing was built for a stranger; the failures were counted. Requests with a user and a
    // wrong password are failures whatever the server thinks of an empty header.
    assert_eq!(metric(&server, ALICE, "nixery_nix_builds_total").await, 0);
    let failures = metric(&server, ALICE, "nixery_auth_failures_total").await;
    let wrong_passwords = 3 * routes.len() as u64;
    assert!(
        (wrong_passwords..=refused).contains(&failures),
        "nixery_auth_failures_total is {failures} after {refused} refusals, {wrong_passwords} of them with a user and a wrong password"
    );

    // With credentials (the password has a colon), the registry answers as usual: a pull
    // through manifests and blobs, with one build; so does every other route.
    let digest = pull_as(&server, ALICE, "shell/hello").await;
    assert_eq!(metric(&server, ALICE, "nixery_nix_builds_total").await, 1);
    let pulled = pull_as(&server, BOB, "shell/hello").await;
    assert_eq!(pulled, digest, "bob pulled another image");
    for (method, path, body) in routes {
        let response = http
            .request(method.parse().unwrap(), server.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .basic_auth(ALICE.0, Some(ALICE.1))
            .send()
            .await
            .unwrap();
        assert_ne!(response.status(), 401, "{method} {path} as alice");
    }
    assert_eq!(
        metric(&server, ALICE, "nixery_auth_failures_total").await,
        failures,
        "a request with credentials counted as a failure"
    );
}

#[test]
fn docker_logs_in_then_pulls_and_runs_shell_hello() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let file = htpasswd_file(dir.path(), &[BOB]);
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_AUTH_HTPASSWD", file.to_str().unwrap())],
    );
    let config = dir.path().join("docker");
    std::fs::create_dir(&config).unwrap();
    let config = config.to_str().unwrap();
    let image = format!("{}/shell/hello", server.host());

    // Docker 20.10 asks /v2/, is challenged for Basic credentials, and has none to send.
    let refused = docker(config, &["pull", &image], None);
    assert!(
        !refused.status.success(),
        "docker pulled without logging in"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no basic auth credentials"), "{stderr}");

    let wrong = docker(
        config,
        &["login", &server.host(), "-u", BOB.0, "--password-stdin"],
        Some("not-the-password"),
    );
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && stderr.contains("401 Unauthorized"),
        "{stderr}"
    );

    let login = docker(
        config,
        &["login", &server.host(), "-u", BOB.0, "--password-stdin"],
        Some(BOB.1),
    );
    let stdout = String::from_utf8_lossy(&login.stdout);
    assert!(
        login.status.success() && stdout.contains("Login Succeeded"),
        "docker login failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&login.stderr)
    );
    let pull = docker(config, &["pull", &image], None);
    assert!(
        pull.status.success(),
        "docker pull after login failed:\n{}",
        String::from_utf8_lossy(&pull.stderr)
    );
    let hello = docker(
        config,
        &["run", "--rm", "--network", "none", &image, "hello"],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&hello.stdout), "Hello, world!\n");
    run("docker", &["rmi", &image]);
}

#[test]
fn skopeo_inspects_with_credentials_and_fails_without() {
    require_tool("skopeo", "apt-get install skopeo");
    let dir = tempfile::tempdir().unwrap();
    let file = htpasswd_file(dir.path(), &[BOB]);
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_AUTH_HTPASSWD", file.to_str().unwrap())],
    );
    let image = format!("docker://{}/shell/hello", server.host());
    // No login a user made elsewhere may answer for this registry.
    let authfile = dir.path().join("auth.json");
    let authfile = authfile.to_str().unwrap();
    let creds = format!("{}:{}", BOB.0, BOB.1);
    let wrong = format!("{}:wrong", BOB.0);
    for flags in [
        &["--authfile", authfile][..],
        &["--no-creds"],
        &["--creds", &wrong],
    ] {
        let mut args = vec!["inspect", "--tls-verify=false"];
        args.extend_from_slice(flags);
        args.push(&image);
        let output = Command::new("skopeo")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("skopeo runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("unauthorized"),
            "skopeo {args:?}:\n{stderr}"
        );
    }
    let inspect = run(
        "skopeo",
        &["inspect", "--tls-verify=false", "--creds", &creds, &image],
    );
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
}

#[tokio::test]
async fn sighup_rereads_the_htpasswd_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = htpasswd_file(dir.path(), &[ALICE]);
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_AUTH_HTPASSWD", file.to_str().unwrap())],
    );
    assert_eq!(status_as(&server, ALICE).await, 200);
    assert_eq!(status_as(&server, BOB).await, 401);

    // A user added to the file gets in once the server is told.
    htpasswd_file(dir.path(), &[ALICE, BOB]);
    hang_up(&server);
    wait_for_200(&server, BOB).await;
    assert_eq!(status_as(&server, ALICE).await, 200);

    // A user removed from the file is out as soon as the reload is seen (carol, added with the
    // same reload, gets in), although alice's credentials were verified a moment ago.
    htpasswd_file(dir.path(), &[BOB, CAROL]);
    hang_up(&server);
    wait_for_200(&server, CAROL).await;
    assert_eq!(
        status_as(&server, ALICE).await,
        401,
        "alice is still let in"
    );
    assert_eq!(status_as(&server, BOB).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_keeps_neither_logged_in_users_nor_new_logins_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let file = htpasswd_file_at(dir.path(), &[ALICE, BOB, CAROL], Some(FLOOD_COST));
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_AUTH_HTPASSWD", file.to_str().unwrap())],
    );
    // Alice logged in before the flood; her client keeps its connection, as docker does.
    let alice = client();
    let v2 = || {
        alice
            .get(server.url("/v2/"))
            .basic_auth(ALICE.0, Some(ALICE.1))
            .send()
    };
    assert_eq!(v2().await.unwrap().status(), 200);

    let one: Vec<IpAddr> = vec![Ipv4Addr::new(127, 0, 0, 2).into()];
    let fifty: Vec<IpAddr> = (10..60)
        .map(|i| Ipv4Addr::new(127, 0, 0, i).into())
        .collect();
    // Each shape has a user whose credentials were never checked log in during it.
    for (shape, addresses, new_user) in [("one address", one, BOB), ("50 addresses", fifty, CAROL)]
    {
        let flood = Flood::start(&server, &addresses, FLOOD_CONNECTIONS);
        // A client is known to guess only once its first guess was refused.
        flood.until_every_address_is_refused().await;

        let mut times = Vec::new();
        for _ in 0..200 {
            let started = Instant::now();
            let status = v2().await.unwrap().status();
            times.push(started.elapsed());
            assert_eq!(status, 200, "alice during the flood from {shape}");
        }
        times.sort();
        // The nearest rank: the 198th of 200.
        let p99 = times[197];

        let started = Instant::now();
        let status = status_as(&server, new_user).await;
        let login = started.elapsed();
        assert_eq!(status, 200, "{}'s first login", new_user.0);

        let flood = flood.stop().await;
        println!(
            "flood of wrong passwords from {shape} ({FLOOD_CONNECTIONS} connections, bcrypt cost {FLOOD_COST}): \
             GET /v2/ of a logged-in user p50 {:?}, p99 {p99:?}, max {:?}; a new login {login:?}; \
             {} wrong passwords refused, {} other answers, {} errors",
            times[99], times[199], flood.refused, flood.other, flood.errors,
        );
        assert!(
            flood.refused > 0 && flood.other == 0 && flood.errors == 0,
            "the flood from {shape}: {} refused with the challenge, {} other answers, {} errors",
            flood.refused,
            flood.other,
            flood.errors
        );
        assert!(
            p99 < Duration::from_millis(50),
            "p99 of a logged-in user's GET /v2/ during the flood from {shape}: {p99:?}"
        );
        assert!(
            login < Duration::from_secs(1),
            "a new login during the flood from {shape} took {login:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_that_removes_a_user_refuses_their_next_request_at_once_even_under_a_flood() {
    let dir = tempfile::tempdir().unwrap();
    let cost = Some(FLOOD_COST);
    let file = htpasswd_file_at(dir.path(), &[ALICE, BOB, CAROL], cost);
    let server = Server::start_on(
        &dir.path().join("storage"),
        &[("NIXERY_AUTH_HTPASSWD", file.to_str().unwrap())],
    );
    for user in [ALICE, BOB, CAROL] {
        assert_eq!(status_as(&server, user).await, 200, "{}", user.0);
    }
    let flooding = [Ipv4Addr::new(127, 0, 0, 3).into()];
    let flood = Flood::start(&server, &flooding, FLOOD_CONNECTIONS);
    flood.until_every_address_is_refused().await;

    // Alice is removed, bob gets another password, carol stays, and dave is added, whose
    // first login shows the reload was seen.
    let bob = (BOB.0, "a new password");
    htpasswd_file_at(dir.path(), &[bob, CAROL, DAVE], cost);
    let signalled = Instant::now();
    hang_up(&server);
    wait_for_200(&server, DAVE).await;
    let seen = signalled.elapsed();
    let started = Instant::now();
    let alice = status_as(&server, ALICE).await;
    let refused = started.elapsed();
    assert_eq!(alice, 401, "alice is still let in");
    assert_eq!(status_as(&server, BOB).await, 401, "bob's old password");
    assert_eq!(status_as(&server, bob).await, 200, "bob's new password");
    assert_eq!(status_as(&server, CAROL).await, 200, "carol");
    let flood = flood.stop().await;
    println!(
        "during a flood of wrong passwords ({} refused): a user added by SIGHUP let in after \
         {seen:?}, the next request of the user it removed refused in {refused:?}",
        flood.refused
    );
    assert_eq!((flood.other, flood.errors), (0, 0));
    assert!(
        seen < Duration::from_secs(1),
        "a user added by SIGHUP was let in {seen:?} after it"
    );
    assert!(
        refused < Duration::from_secs(1),
        "refusing a user removed by SIGHUP took {refused:?}"
    );
}

#[tokio::test]
async fn metrics_on_nixery_metrics_address_need_no_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let file = htpasswd_file(dir.path(), &[ALICE]);
    let mut server = Server::start_on(
        &dir.path().join("storage"),
        &[
            ("NIXERY_AUTH_HTPASSWD", file.to_str().unwrap()),
            ("NIXERY_METRICS_ADDRESS", "127.0.0.1:0"),
        ],
    );
    let response = client().get(server.url("/metrics")).send().await.unwrap();
    assert_unauthorized(response, false, "/metrics on the main port").await;
    let response = client()
        .get(server.url("/metrics"))
        .basic_auth(ALICE.0, Some("not alice's password"))
        .send()
        .await
        .unwrap();
    assert_unauthorized(response, false, "/metrics with a wrong password").await;

    // The address file's second line is the metrics address.
    let metrics = server.addresses()[1];
    let response = client()
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    // The wrong password is counted; the request without credentials is not.
    assert_eq!(
        metric_in(&text, "nixery_auth_failures_total"),
        1,
        "failures counted:\n{text}"
    );
}

#[test]
fn start_up_stops_on_a_missing_or_non_bcrypt_file_and_on_public_gcs_urls() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let missing = dir.path().join("no-such-htpasswd");
    let file = htpasswd_file(dir.path(), &[ALICE]);
    let sha1 = dir.path().join("sha1-htpasswd");
    let bob = run("htpasswd", &["-nbs", BOB.0, BOB.1]);
    std::fs::write(
        &sha1,
        format!("{}{bob}", std::fs::read_to_string(&file).unwrap()),
    )
    .unwrap();
    let gcs = [
        ("NIXERY_STORAGE_BACKEND", "gcs"),
        ("GCS_BUCKET", "b"),
        ("GCS_ENDPOINT", "http://127.0.0.1:9"),
        ("GCS_ANONYMOUS", "true"),
    ];
    let with = |extra: &[(&'static str, &'static str)], path: &Path| {
        let mut env = extra.to_vec();
        env.push(("NIXERY_AUTH_HTPASSWD", path.to_str().unwrap()));
        start_up_failure(&storage, &env)
    };

    // Each names the setting and the file.
    for path in [&missing, &sha1] {
        let stderr = with(&[], path);
        assert!(
            stderr.contains("NIXERY_AUTH_HTPASSWD") && stderr.contains(path.to_str().unwrap()),
            "{stderr}"
        );
    }

    let public = [&gcs[..], &[("GCS_SIGNED_URL_EXPIRY", "0")]].concat();
    let stderr = with(&public, &file);
    assert!(
        stderr.contains("NIXERY_AUTH_HTPASSWD") && stderr.contains("GCS_SIGNED_URL_EXPIRY"),
        "{stderr}"
    );
    // Anonymous, with no key file to sign with: no signed URLs either (tests/gcs.rs starts one
    // that can sign).
    let stderr = with(&gcs, &file);
    assert!(
        stderr.contains("GCS_ANONYMOUS") && !stderr.contains("GCS_SIGNED_URL_EXPIRY"),
        "{stderr}"
    );
}

/// What a request without valid credentials sends as its `Authorization` header.
fn wrong_credentials() -> Vec<(&'static str, Option<String>)> {
    vec![
        ("no credentials", None),
        ("a wrong password", Some(basic(ALICE.0, "battery staple"))),
        ("a user not in the file", Some(basic("mallory", ALICE.1))),
        ("the password of another user", Some(basic(ALICE.0, BOB.1))),
        (
            "a broken Basic header",
            Some("Basic !!!not-base64".to_owned()),
        ),
        ("a bearer token", Some("Bearer abc.def.ghi".to_owned())),
    ]
}

/// Writes `users` with their passwords as `htpasswd -B` does into `dir/htpasswd` (after a
/// comment, with blank lines) and returns the file.
fn htpasswd_file(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    htpasswd_file_at(dir, users, None)
}

/// [`htpasswd_file`] with bcrypt at `cost` (`htpasswd -C`; its default is 5).
fn htpasswd_file_at(dir: &Path, users: &[(&str, &str)], cost: Option<u32>) -> PathBuf {
    require_tool("htpasswd", "apt-get install apache2-utils");
    let mut text = String::from("# written by tests/auth.rs\n\n");
    let cost = cost.map(|cost| cost.to_string());
    for (user, password) in users {
        let mut args = vec!["-nbB"];
        if let Some(cost) = &cost {
            args.extend(["-C", cost]);
        }
        args.extend([*user, *password]);
        // `-n` prints the entry and a blank line.
        text.push_str(&run("htpasswd", &args));
    }
    let path = dir.join("htpasswd");
    // Written whole and renamed, as an editor or a secret mount replaces a file.
    let staged = dir.join("htpasswd.new");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    path
}

/// A flood of wrong credentials: `GET /v2/` from many connections at once, spread over local
/// addresses, each request with a password never sent before (for alice, or for a user who is
/// not in the file, in turn). It stops when told, or after [`FLOOD_LIMIT`] by itself.
struct Flood {
    tasks: tokio::task::JoinSet<()>,
    stop: Arc<AtomicBool>,
    counts: Arc<FloodCounts>,
}

/// What a flood's requests were answered.
#[derive(Default)]
struct FloodCounts {
    /// 401 with the challenge.
    refused: AtomicUsize,
    other: AtomicUsize,
    errors: AtomicUsize,
    /// Whether each address had a request refused yet.
    refused_from: Vec<AtomicBool>,
}

/// The counts of a stopped [`Flood`].
struct FloodReport {
    refused: usize,
    other: usize,
    errors: usize,
}

impl Flood {
    fn start(server: &Server, addresses: &[IpAddr], connections: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(FloodCounts {
            refused_from: addresses.iter().map(|_| AtomicBool::new(false)).collect(),
            ..FloodCounts::default()
        });
        let clients: Vec<reqwest::Client> = addresses
            .iter()
            .map(|address| {
                reqwest::Client::builder()
                    .local_address(*address)
                    .pool_max_idle_per_host(connections)
                    .timeout(Duration::from_secs(30))
                    .build()
                    .expect("a flood client")
            })
            .collect();
        let deadline = Instant::now() + FLOOD_LIMIT;
        let url = server.url("/v2/");
        let mut tasks = tokio::task::JoinSet::new();
        for connection in 0..connections {
            let from = connection % addresses.len();
            let client = clients[from].clone();
            let (stop, counts, url) = (stop.clone(), counts.clone(), url.clone());
            tasks.spawn(async move {
                for n in 0usize.. {
                    if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                        break;
                    }
                    let user = if n % 2 == 0 {
                        ALICE.0.to_owned()
                    } else {
                        format!("mallory{connection}")
                    };
                    let password = format!("guess {connection} {n}");
                    let answer = client
                        .get(&url)
                        .basic_auth(user, Some(password))
                        .send()
                        .await;
                    let counter = match answer {
                        Ok(response)
                            if response.status() == 401
                                && response
                                    .headers()
                                    .get("www-authenticate")
                                    .map(|v| v.as_bytes())
                                    == Some(CHALLENGE.as_bytes()) =>
                        {
                            counts.refused_from[from].store(true, Ordering::SeqCst);
                            &counts.refused
                        }
                        Ok(_) => &counts.other,
                        Err(_) => &counts.errors,
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        Flood {
            tasks,
            stop,
            counts,
        }
    }

    /// Waits (at most 20 s) until a request from every address was refused.
    async fn until_every_address_is_refused(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self
            .counts
            .refused_from
            .iter()
            .all(|refused| refused.load(Ordering::SeqCst))
        {
            assert!(
                Instant::now() < deadline,
                "the flood's addresses are not all refused after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the flood (requests under way are dropped) and says what it was answered.
    async fn stop(mut self) -> FloodReport {
        self.stop.store(true, Ordering::SeqCst);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        FloodReport {
            refused: self.counts.refused.load(Ordering::SeqCst),
            other: self.counts.other.load(Ordering::SeqCst),
            errors: self.counts.errors.load(Ordering::SeqCst),
        }
    }
}

/// An `Authorization` header of HTTP Basic credentials.
fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// Checks that `response` is the refusal of `what`: 401, the challenge, and the registry's JSON
/// error (a HEAD has no body).
async fn assert_unauthorized(response: reqwest::Response, head: bool, what: &str) {
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 401, "{what}: {text}");
    assert_eq!(
        headers.get("www-authenticate").map(|v| v.as_bytes()),
        Some(CHALLENGE.as_bytes()),
        "{what}"
    );
    assert_eq!(headers["content-type"], "application/json", "{what}");
    for leak in ["docker-content-digest", "location", "etag"] {
        assert!(!headers.contains_key(leak), "{what}: {leak} sent");
    }
    if head {
        assert!(body.is_empty(), "{what}: {text}");
        return;
    }
    let json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{what}: the body is not JSON ({e}): {text}"));
    let errors = json["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{what}: {text}");
    let error = errors[0].as_object().expect("an error object");
    assert_eq!(error["code"], "UNAUTHORIZED", "{what}: {text}");
    assert!(error["message"].is_string(), "{what}: {text}");
    assert!(error.contains_key("detail"), "{what}: {text}");
}

/// Pulls `name:latest` as `(user, password)`: the manifest, then its config and layers, each
/// checked against its digest; returns the manifest's digest.
async fn pull_as(server: &Server, (user, password): (&str, &str), name: &str) -> String {
    let http = client();
    let get = |path: String| {
        http.get(server.url(&path))
            .basic_auth(user, Some(password))
            .send()
    };
    let response = get(format!("/v2/{name}/manifests/latest")).await.unwrap();
    assert_eq!(response.status(), 200, "the manifest of {name} as {user}");
    let digest = response.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.bytes().await.unwrap();
    assert_eq!(sha256(&body), digest);
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert!(!layers.is_empty());
    for blob in layers.iter().chain([&manifest["config"]]) {
        let blob = blob["digest"].as_str().unwrap();
        let response = get(format!("/v2/{name}/blobs/{blob}")).await.unwrap();
        assert_eq!(response.status(), 200, "blob {blob} as {user}");
        assert_eq!(sha256(&response.bytes().await.unwrap()), blob);
    }
    digest
}

/// The status of `GET /v2/` as `(user, password)`.
async fn status_as(server: &Server, (user, password): (&str, &str)) -> u16 {
    client()
        .get(server.url("/v2/"))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Waits (at most 5 s) until `user` gets in.
async fn wait_for_200(server: &Server, user: (&str, &str)) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_as(server, user).await != 200 {
        assert!(
            Instant::now() < deadline,
            "{} is not let in 5 s after SIGHUP:\n{}",
            user.0,
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends SIGHUP to the server.
fn hang_up(server: &Server) {
    let pid = rustix::process::Pid::from_raw(server.pid() as i32).expect("a process id");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP sent");
}

/// The value of `name` (summed over its labels) in `/metrics`, read as `(user, password)`.
async fn metric(server: &Server, (user, password): (&str, &str), name: &str) -> u64 {
    let response = client()
        .get(server.url("/metrics"))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "/metrics as {user}");
    metric_in(&response.text().await.unwrap(), name)
}

/// The value of `name` (summed over its labels) in the metrics text `text`; its family must be
/// there.
fn metric_in(text: &str, name: &str) -> u64 {
    let family = name.trim_end_matches("_total");
    assert!(
        text.contains(&format!("# TYPE {family} ")),
        "no metric {name}:\n{text}"
    );
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name} ")) || line.starts_with(&format!("{name}{{"))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Runs `docker --config <config> args`, with `stdin` on its standard input.
fn docker(config: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new("docker")
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker runs");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}
