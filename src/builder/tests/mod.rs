//! The builder's logic without Nix: single flight, failure memory, admission and the queue,
//! cache hits, platform fan-out, setup keys and zstd images, against [`fake::FakeNix`] and file-system storage
//! in a temporary directory.

mod cache;
mod fake;
mod flight;
mod zstd;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{Builder, Request, Settings, gc};
use crate::admission::Admission;
use crate::image::{Platform, Tag};
use crate::layers::Popularity;
use crate::manifest::Compression;
use crate::source::{AllowedCommits, Commit, CommitPins, Origin, Pin, Sources};
use fake::{FakeNix, FlakyStorage};

/// A commit the path source serves nothing of (its images are found in storage or not at all).
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A builder's surroundings: a fake Nix, storage and a path source in a temporary directory.
struct Harness {
    dir: tempfile::TempDir,
    nix: Arc<FakeNix>,
    storage: Arc<FlakyStorage>,
    sources: Arc<Sources>,
    admission: Arc<Admission>,
    failure_ttl: Duration,
}

impl Harness {
    /// Room for `places` builds at once and `queue` more waiting; failures remembered for a
    /// minute.
    fn new(places: usize, queue: usize) -> Self {
        // Storage syncs every blob it commits: tmpfs makes that free, where there is one.
        let dir = tempfile::Builder::new()
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("a temporary directory");
        let pkgs = dir.path().join("pkgs");
        std::fs::create_dir_all(&pkgs).expect("the package set");
        let sources = Sources::open(
            crate::source::Settings {
                origin: Origin::Path(pkgs),
                ttl: Duration::from_secs(60),
                channel_url: String::new(),
                tarball_url: String::new(),
                keep: 1,
                fetch_timeout: Duration::from_secs(1),
                commit_pins: CommitPins::Seen,
                allowed_commits: AllowedCommits::none(),
                records: None,
            },
            &dir.path().join("sources"),
        )
        .expect("a path source");
        Harness {
            nix: Arc::new(FakeNix::new(dir.path().join("store"))),
            storage: Arc::new(FlakyStorage::open(&dir.path().join("storage"))),
            sources: Arc::new(sources),
            admission: Arc::new(Admission::new(places, queue, 1000)),
            failure_ttl: Duration::from_secs(60),
            dir,
        }
    }

    /// A new builder (with empty memory) on this harness's Nix, storage and places.
    fn builder(&self) -> Arc<Builder> {
        let collector = gc::Collector::new(
            None,
            self.dir.path().join("store"),
            crate::nix::NixEnv::new("", "", "", self.dir.path()),
        );
        Builder::new(
            self.nix.clone(),
            Arc::new(collector),
            self.storage.clone(),
            self.sources.clone(),
            self.admission.clone(),
            Settings {
                max_layers: 4,
                popularity: Arc::new(Popularity::default()),
                gzip_level: 1,
                zstd_level: 3,
                source_ttl: Duration::from_secs(60),
                memory_entries: NonZeroUsize::new(16).expect("not zero"),
                failure_ttl: self.failure_ttl,
                signer: None,
            },
        )
    }

    fn pkgs(&self) -> PathBuf {
        self.dir.path().join("pkgs")
    }

    /// `name` in the path source, for `linux/amd64`.
    fn request(&self, name: &str) -> Request {
        Request {
            name: name.parse().expect("a valid name"),
            tag: Tag::latest(),
            pin: Pin::Path(self.pkgs()),
            platform: amd64(),
            compression: Compression::Gzip,
        }
    }

    /// `name` in the path source, for `linux/amd64`, with zstd layers.
    fn zstd_request(&self, name: &str) -> Request {
        Request {
            compression: Compression::Zstd,
            ..self.request(name)
        }
    }

    /// `name` at [`COMMIT`], for `linux/amd64`.
    fn commit_request(&self, name: &str) -> Request {
        Request {
            name: name.parse().expect("a valid name"),
            tag: COMMIT.parse().expect("a valid tag"),
            pin: Pin::Commit {
                commit: Commit::parse(COMMIT).expect("a commit"),
                source: "https://example.com/pkgs.git".to_owned(),
            },
            platform: amd64(),
            compression: Compression::Gzip,
        }
    }

    /// Where storage keeps blob `digest`.
    fn blob_path(&self, digest: &crate::manifest::Digest) -> PathBuf {
        self.dir
            .path()
            .join("storage/blobs/sha256")
            .join(digest.hex())
    }
}

fn amd64() -> Platform {
    "linux/amd64".parse().expect("a platform")
}

fn arm64() -> Platform {
    "linux/arm64".parse().expect("a platform")
}

/// Waits (a few seconds at most) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let wait = async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}
