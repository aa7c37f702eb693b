//! SIGTERM (a redeploy): responses in flight are finished, builds get NIXERY_SHUTDOWN_GRACE and
//! are then cancelled, no Nix process and no staging file is left behind, the server exits 0,
//! and the next start on the same storage serves what was built and builds what was cut short.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Server, client, fault_pkgs, nonce, processes_with_cmdline, processes_with_env, pull, read_head,
    sha256, staged_bytes,
};
use nixery::command::{self, KILL_GRACE};

/// What the server logged from SIGTERM on.
fn shutdown_log(server: &Server) -> String {
    let log = server.log();
    let start = log.find("shutting down").unwrap_or(0);
    log[start..].to_owned()
}

/// The files in the server's staging directory.
fn staging_files(storage: &Path) -> Vec<String> {
    std::fs::read_dir(storage.join("tmp"))
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_cold_build_stops_nix_after_the_grace_and_the_next_start_builds_it() {
    const GRACE: Duration = Duration::from_secs(2);
    let nonce = nonce();
    let pkgs = fault_pkgs(&nonce);
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("storage");
    let env = [
        ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
        ("NIXERY_SHUTDOWN_GRACE", "2"),
    ];
    let mut server = Server::start_on(&storage, &env);
    let built = pull(&server, "hello").await;
    assert_eq!(server.nix_builds(), 1);

    // `slowish` builds for 4 s: longer than the grace.
    let url = server.url("/v2/slowish/manifests/latest");
    let waiting = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status()) });
    let builder = format!("nonce={nonce}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes_with_env(&builder).is_empty() {
        assert!(Instant::now() < deadline, "the build never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let signalled = Instant::now();
    server.terminate();
    let status = server
        .wait_exit(GRACE + KILL_GRACE + Duration::from_secs(10))
        .expect("the server exited");
    let took = signalled.elapsed();
    println!("exited {took:?} after SIGTERM, with a build running and a grace of {GRACE:?}");
    assert!(status.success(), "{status}");
    assert!(took >= GRACE, "the build was not given its grace: {took:?}");
    assert!(
        took < GRACE + KILL_GRACE + Duration::from_secs(3),
        "{took:?}"
    );
    // Neither the builder nor nix-build (which names its GC root under the storage) is left.
    assert_eq!(processes_with_env(&builder), Vec::<String>::new());
    assert_eq!(
        processes_with_cmdline(&storage.join("nix/roots").display().to_string()),
        Vec::<String>::new()
    );
    assert_eq!(staging_files(&storage), Vec::<String>::new());
    let answer = waiting.await.unwrap();
    println!("the request waiting for the build got {answer:?}");
    let log = shutdown_log(&server);
    println!("{log}");
    for step in [
        "shutting down",
        "the grace is over",
        "builds cancelled",
        "stopped",
    ] {
        assert!(log.contains(step), "the log does not say {step:?}:\n{log}");
    }

    // The next start serves what was built without Nix, and builds what was cut short.
    let server = server.restart(&env);
    let again = pull(&server, "hello").await;
    assert_eq!(again.digest, built.digest);
    assert_eq!(server.nix_builds(), 0, "hello was built again");
    pull(&server, "slowish").await;
    assert_eq!(server.nix_builds(), 1, "slowish was not built again");
}

#[tokio::test]
async fn a_blob_download_in_flight_is_finished_after_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start_on(
        &tmp.path().join("storage"),
        &[("NIXERY_SHUTDOWN_GRACE", "30")],
    );
    let pulled = pull(&server, "big").await;
    let (digest, bytes) = pulled
        .layers
        .iter()
        .max_by_key(|(_, bytes)| bytes.len())
        .unwrap();

    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write!(
        stream,
        "GET /v2/big/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    let (status, length) = read_head(&mut stream);
    assert_eq!((status, length), (200, Some(bytes.len() as u64)));
    let mut body = vec![0u8; bytes.len()];
    let started = 1 << 20;
    stream.read_exact(&mut body[..started]).unwrap();

    server.terminate();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "the server exited with a response in flight"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", server.port)).is_err(),
        "a new connection was accepted after SIGTERM"
    );
    stream
        .read_exact(&mut body[started..])
        .expect("the rest of the blob");
    let finished = Instant::now();
    assert_eq!(&sha256(&body), digest);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server exited");
    let after = finished.elapsed();
    println!(
        "a {} byte download finished after SIGTERM; the server exited {after:?} after it",
        body.len()
    );
    assert!(status.success(), "{status}");
    assert!(
        after < Duration::from_secs(3),
        "the server waited {after:?} with nothing left to do"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_layer_is_packed_leaves_no_staging_file() {
    // `big` realised in the Nix store first, so that the server below spends its time packing.
    let warm = Server::start();
    pull(&warm, "big").await;
    drop(warm);

    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("storage");
    let mut server = Server::start_on(&storage, &[("NIXERY_SHUTDOWN_GRACE", "0")]);
    let url = server.url("/v2/big/manifests/latest");
    let _request = tokio::spawn(async move { client().get(url).send().await });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let staged = staged_bytes(&storage.join("tmp"));
        if staged > 1 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "no layer was ever staged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let signalled = Instant::now();
    server.terminate();
    let status = server
        .wait_exit(KILL_GRACE + Duration::from_secs(10))
        .expect("the server exited");
    println!(
        "exited {:?} after SIGTERM while packing",
        signalled.elapsed()
    );
    println!("{}", shutdown_log(&server));
    assert!(status.success(), "{status}");
    assert_eq!(staging_files(&storage), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_all_stops_every_running_command_and_kills_what_ignores_sigterm() {
    let marker = format!("NIXERY_STOP_ALL_TEST={}", nonce());
    let value = marker.split_once('=').unwrap().1.to_owned();
    let spawn = |script: &'static str| {
        let value = value.clone();
        tokio::spawn(async move {
            command::run(
                "sh",
                &["-c".into(), script.into()],
                nixery::command::Env::Inherited(&[("NIXERY_STOP_ALL_TEST", value)]),
                Duration::from_secs(60),
            )
            .await
        })
    };
    // Each a shell and its sleep.
    let polite = spawn("sleep 30; true");
    let stubborn = spawn("trap '' TERM; sleep 30; true");
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes_with_env(&marker).len() < 4 {
        assert!(Instant::now() < deadline, "the commands did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let stopped = tokio::task::spawn_blocking(|| command::stop_all(Duration::from_secs(1)))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        stopped,
        command::Stopped {
            groups: 2,
            killed: 1
        }
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(polite.await.unwrap().is_err());
    assert!(stubborn.await.unwrap().is_err());
    let deadline = Instant::now() + Duration::from_secs(2);
    while !processes_with_env(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left running: {:?}",
            processes_with_env(&marker)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        tokio::task::spawn_blocking(|| command::stop_all(Duration::from_secs(1)))
            .await
            .unwrap(),
        command::Stopped::default(),
        "a stopped group is still listed"
    );
}
