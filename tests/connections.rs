//! Connections a client holds on to cannot take the registry down: past NIXERY_MAX_CONNECTIONS
//! new ones wait in the backlog, a request header must be complete within
//! NIXERY_HEADER_TIMEOUT, and a connection on which nothing moves while the server works on
//! nothing for it is closed after NIXERY_IDLE_TIMEOUT. A request waiting for a build is not idle.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Server, client, fault_pkgs, nonce, pull, read_head};

/// A request cut before the blank line that ends its header.
const HALF_A_HEADER: &[u8] = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n";

/// A server on fresh storage with extra environment `env`; the directory lives as long as the
/// returned guard.
fn start(env: &[(&str, &str)]) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let server = Server::start_on(&tmp.path().join("storage"), env);
    (server, tmp)
}

fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(("127.0.0.1", server.port)).expect("connect")
}

/// Waits until `nixery_connections_open` is `expected` (the request asking counts), at most
/// `timeout`; returns how long that took.
fn wait_for_open_connections(server: &Server, expected: u64, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let open = server.metric("nixery_connections_open");
        if open == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{open} connections still open after {timeout:?}, expected {expected}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads from `stream` until the server closes it (or resets it); how many bytes came and how
/// long after `since` the end came.
fn read_until_closed(stream: &mut TcpStream, since: Instant) -> (usize, Duration) {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut received = 0;
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server never closed the connection: {e}"),
        }
    }
    (received, since.elapsed())
}

#[tokio::test]
async fn connections_sending_half_a_header_cannot_take_the_registry_down() {
    const CAP: usize = 200;
    let (server, _tmp) = start(&[
        ("NIXERY_MAX_CONNECTIONS", "200"),
        ("NIXERY_HEADER_TIMEOUT", "2"),
    ]);
    pull(&server, "hello").await;
    wait_for_open_connections(&server, 1, Duration::from_secs(10));
    let fds_before = server.open_fds();
    // Below the cap nothing is counted: the count below is the flood's.
    assert_eq!(server.metric("nixery_connection_limit_reached_total"), 0);

    // Watch the server's descriptors while the flood lasts.
    let watching = Arc::new(AtomicBool::new(true));
    let most_fds = Arc::new(AtomicUsize::new(0));
    let sampler = std::thread::spawn({
        let watching = watching.clone();
        let most_fds = most_fds.clone();
        let fd_dir = format!("/proc/{}/fd", server.pid());
        move || {
            while watching.load(Ordering::Relaxed) {
                if let Ok(fds) = std::fs::read_dir(&fd_dir) {
                    most_fds.fetch_max(fds.count(), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });

    let flood_started = Instant::now();
    let held: Vec<TcpStream> = (0..2 * CAP)
        .map(|_| {
            let mut stream = connect(&server);
            stream.write_all(HALF_A_HEADER).expect("half a header sent");
            stream
        })
        .collect();

    // A client arriving now waits behind the flood, until the header timeout frees places.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), pull(&server, "hello"))
        .await
        .expect("the pull finished within 30 s while the connections were held");
    let pull_took = started.elapsed();

    // Every half-sent header has timed out, though the client still holds its sockets.
    wait_for_open_connections(&server, 1, Duration::from_secs(15));
    let freed_after = flood_started.elapsed();
    watching.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let most_fds = most_fds.load(Ordering::Relaxed);
    println!(
        "flood of {} half headers, cap {CAP}: the pull took {pull_took:?}; one connection open (the one asking) {freed_after:?} after the flood began; server fds {fds_before} before, at most {most_fds} during",
        held.len()
    );
    assert!(
        pull_took < Duration::from_secs(10),
        "the pull took {pull_took:?}"
    );
    assert!(
        most_fds < fds_before + CAP + 20,
        "the server had {most_fds} descriptors open ({fds_before} before the flood, cap {CAP})"
    );
    // The operator is told the limit was reached.
    assert!(server.metric("nixery_connection_limit_reached_total") > 0);
    // The server closed the held connections (not the client).
    let mut first = held.into_iter().next().unwrap();
    let (received, _) = read_until_closed(&mut first, Instant::now());
    assert_eq!(received, 0, "a half-sent header got an answer");
}

#[tokio::test]
async fn a_kept_alive_connection_waiting_for_its_next_request_is_closed_after_the_header_timeout() {
    let (server, _tmp) = start(&[("NIXERY_HEADER_TIMEOUT", "2")]);
    let mut stream = connect(&server);
    stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (status, length) = read_head(&mut stream);
    assert_eq!(status, 200);
    let mut body = vec![0u8; length.expect("a Content-Length") as usize];
    stream.read_exact(&mut body).unwrap();
    let answered = Instant::now();
    let (received, closed_after) = read_until_closed(&mut stream, answered);
    println!("kept-alive connection closed {closed_after:?} after its response");
    assert_eq!(received, 0);
    assert!(
        closed_after >= Duration::from_millis(1900) && closed_after < Duration::from_secs(4),
        "closed {closed_after:?} after the response, with NIXERY_HEADER_TIMEOUT=2"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_a_blob_is_disconnected_after_the_idle_timeout() {
    let (server, _tmp) = start(&[("NIXERY_IDLE_TIMEOUT", "3")]);
    // `big` has one layer of 64 MiB that does not compress, far more than socket buffers hold.
    let pulled = pull(&server, "big").await;
    let (digest, bytes) = pulled
        .layers
        .iter()
        .max_by_key(|(_, bytes)| bytes.len())
        .unwrap();
    assert!(bytes.len() > 60 << 20, "{} bytes", bytes.len());
    wait_for_open_connections(&server, 1, Duration::from_secs(10));

    let mut stream = connect(&server);
    write!(
        stream,
        "GET /v2/big/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    let sent = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        server.metric("nixery_connections_open"),
        2,
        "the reader and the request asking"
    );
    wait_for_open_connections(&server, 1, Duration::from_secs(15));
    let closed_after = sent.elapsed();
    let (received, _) = read_until_closed(&mut stream, Instant::now());
    println!(
        "a reader that stopped: disconnected about {closed_after:?} after its request, having got {received} of {} bytes",
        bytes.len()
    );
    assert!(received < bytes.len(), "the whole blob was sent");
    assert!(
        closed_after >= Duration::from_secs(3) && closed_after < Duration::from_secs(5),
        "disconnected {closed_after:?} after the request, with NIXERY_IDLE_TIMEOUT=3"
    );
}

#[tokio::test]
async fn a_request_waiting_for_a_slow_build_is_not_idle() {
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce);
    let (server, _tmp) = start(&[
        ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
        ("NIXERY_IDLE_TIMEOUT", "1"),
    ]);
    // `slowish` builds for 4 s, during which not a byte moves on the connection.
    let started = Instant::now();
    let response = client()
        .get(server.url("/v2/slowish/manifests/latest"))
        .send()
        .await
        .expect("the manifest request was answered");
    let took = started.elapsed();
    println!("a 4 s build answered after {took:?} with NIXERY_IDLE_TIMEOUT=1");
    assert_eq!(response.status(), 200);
    assert!(took >= Duration::from_secs(4), "{took:?}");
    assert_eq!(server.nix_builds(), 1);
}

#[tokio::test]
async fn a_request_whose_body_never_comes_is_disconnected_after_the_idle_timeout() {
    let (server, _tmp) = start(&[("NIXERY_IDLE_TIMEOUT", "2")]);
    let mut stream = connect(&server);
    stream
        .write_all(
            b"POST /api/v1/builds HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
        )
        .unwrap();
    let sent = Instant::now();
    let (_, closed_after) = read_until_closed(&mut stream, sent);
    println!("a body that never came: disconnected after {closed_after:?}");
    assert!(
        closed_after >= Duration::from_millis(1900) && closed_after < Duration::from_secs(6),
        "disconnected {closed_after:?} after the request, with NIXERY_IDLE_TIMEOUT=2"
    );
}
