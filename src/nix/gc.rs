//! Nix store collection: when the store's file system has less free space than
//! `NIXERY_NIX_GC_MIN_FREE`, `nix-store --gc` runs between builds. Builds hold the shared side of
//! a lock from their evaluation until their last layer is packed (and a GC root for what they
//! built), the collection the exclusive side: it never takes a path from under a build.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use regex::Regex;
use tokio::sync::{Notify, RwLock, RwLockReadGuard};

use crate::command;
use crate::server::metrics::METRICS;

/// How long one `nix-store --gc` may run.
const GC_TIMEOUT: Duration = Duration::from_secs(3600);

/// How often free space is looked at besides before and after each build.
const CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// How much free space to keep: a share of the file system or a number of bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinFree {
    Percent(f64),
    Bytes(u64),
}

impl FromStr for MinFree {
    type Err = String;

    /// `10%`, `5G`, `500M`, `64K` or a number of bytes.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let bad = || {
            format!(
                "NIXERY_NIX_GC_MIN_FREE={text:?} is not a size: write a share of the disk (10%) or bytes (5G, 500M, 64K, 1000000)"
            )
        };
        if let Some(percent) = text.strip_suffix('%') {
            let percent: f64 = percent.trim().parse().map_err(|_| bad())?;
            return (0.0..=100.0)
                .contains(&percent)
                .then_some(MinFree::Percent(percent))
                .ok_or_else(bad);
        }
        let (number, unit) = match text.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_uppercase()),
            _ => (text, 'B'),
        };
        let factor: u64 = match unit {
            'B' => 1,
            'K' => 1 << 10,
            'M' => 1 << 20,
            'G' => 1 << 30,
            'T' => 1 << 40,
            _ => return Err(bad()),
        };
        let number: u64 = number.trim().parse().map_err(|_| bad())?;
        number
            .checked_mul(factor)
            .map(MinFree::Bytes)
            .ok_or_else(bad)
    }
}

impl MinFree {
    /// Whether a file system with `free` of `total` bytes free has less than this.
    fn wanted(self, free: u64, total: u64) -> bool {
        match self {
            MinFree::Percent(percent) => (free as f64) < total as f64 * percent / 100.0,
            MinFree::Bytes(bytes) => free < bytes,
        }
    }
}

/// Free and total bytes of the file system holding `path`.
fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    let stat = rustix::fs::statvfs(path)?;
    Ok((
        stat.f_bavail.saturating_mul(stat.f_frsize),
        stat.f_blocks.saturating_mul(stat.f_frsize),
    ))
}

/// The store's collector, and the lock builds share with it.
pub struct Collector {
    min_free: Option<MinFree>,
    store: PathBuf,
    nix_env: crate::nix::NixEnv,
    lock: RwLock<()>,
    wake: Notify,
}

impl Collector {
    /// A collector keeping `min_free` free on the file system of `store` (none: never runs),
    /// running Nix with `nix_env`.
    pub fn new(min_free: Option<MinFree>, store: PathBuf, nix_env: crate::nix::NixEnv) -> Self {
        Collector {
            min_free,
            store,
            nix_env,
            lock: RwLock::new(()),
            wake: Notify::new(),
        }
    }

    /// What a build holds while it needs its store paths.
    pub async fn hold(&self) -> RwLockReadGuard<'_, ()> {
        self.wake.notify_one();
        self.lock.read().await
    }

    /// Asks for a look at free space now (after a build).
    pub fn check_soon(&self) {
        self.wake.notify_one();
    }

    /// Looks at free space before and after builds and every [`CHECK_INTERVAL`], and collects
    /// when it is short; `collected` runs after each collection, before any build may use the
    /// store again. Returns when there is no threshold.
    pub async fn run(&self, collected: impl Fn()) {
        let Some(min_free) = self.min_free else {
            return;
        };
        loop {
            let _woken = tokio::time::timeout(CHECK_INTERVAL, self.wake.notified()).await;
            match space(&self.store) {
                Ok((free, total)) if min_free.wanted(free, total) => {
                    self.exclusively(self.collect(free), &collected).await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(store = %self.store.display(), error = %e, "cannot read the Nix store's free space");
                    tokio::time::sleep(CHECK_INTERVAL).await;
                }
            }
        }
    }

    /// Runs `collection` with the store to itself, then `collected` while it still has it: a
    /// build that waited meanwhile must not find what the collection made stale (evaluations
    /// naming derivations it deleted).
    async fn exclusively(&self, collection: impl Future<Output = ()>, collected: impl Fn()) {
        let _exclusive = self.lock.write().await;
        collection.await;
        collected();
    }

    async fn collect(&self, free: u64) {
        tracing::info!(
            free_bytes = free,
            "the Nix store is short of space: running nix-store --gc"
        );
        let started = Instant::now();
        METRICS.nix_gc_runs.inc();
        match command::run(
            "nix-store",
            &["--gc".into()],
            self.nix_env.command_env(),
            GC_TIMEOUT,
        )
        .await
        {
            Ok(output) => {
                let text =
                    String::from_utf8_lossy(&output.stdout).into_owned() + &output.stderr_tail;
                let Some((paths, freed)) = freed(&text) else {
                    tracing::warn!(output = %text, "nix-store --gc said nothing nixery can read about what it freed");
                    return;
                };
                METRICS.nix_gc_deleted_paths.inc_by(paths);
                METRICS.nix_gc_freed_bytes.inc_by(freed);
                let after = space(&self.store).map_or(0, |(free, _)| free);
                tracing::info!(
                    paths,
                    freed_bytes = freed,
                    free_bytes = after,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "nix-store --gc deleted {paths} store paths, {freed} bytes freed"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, stderr = e.stderr_tail(), "nix-store --gc failed")
            }
        }
    }
}

/// `nix-store --gc`'s summary line: `12 store paths deleted, 80.52 MiB freed` (Nix 2.8 and
/// 2.26 alike) as paths and bytes (to Nix's precision: small paths free "0.00 MiB").
fn freed(text: &str) -> Option<(u64, u64)> {
    static SUMMARY: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(\d+) store paths deleted, ([0-9.]+) (B|KiB|MiB|GiB|TiB) freed")
            .expect("valid regex")
    });
    let captures = SUMMARY.captures(text)?;
    let paths = captures[1].parse().ok()?;
    let amount: f64 = captures[2].parse().ok()?;
    let unit = match &captures[3] {
        "KiB" => 1u64 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => 1,
    };
    Some((paths, (amount * unit as f64) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_read_as_people_write_them() {
        assert_eq!("10%".parse(), Ok(MinFree::Percent(10.0)));
        assert_eq!("5G".parse(), Ok(MinFree::Bytes(5 << 30)));
        assert_eq!("500m".parse(), Ok(MinFree::Bytes(500 << 20)));
        assert_eq!("1000".parse(), Ok(MinFree::Bytes(1000)));
        for bad in ["", "ten", "101%", "5X", "-1", "99999999999999999999T"] {
            assert!(bad.parse::<MinFree>().is_err(), "{bad}");
        }
        assert!(MinFree::Percent(10.0).wanted(5, 100));
        assert!(!MinFree::Percent(10.0).wanted(50, 100));
        assert!(MinFree::Bytes(100).wanted(99, 1000));
    }

    /// A build that asks for the store while a collection runs gets it only after what the
    /// collection made stale is forgotten.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_waiting_for_a_collection_finds_its_evaluations_forgotten() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let collector = Arc::new(Collector::new(
            None,
            PathBuf::from("/nix/store"),
            crate::nix::NixEnv::new("", "", "", Path::new("/nonexistent")),
        ));
        let forgotten = Arc::new(AtomicBool::new(false));
        let (started, collecting) = tokio::sync::oneshot::channel();
        let build = {
            let (collector, forgotten) = (collector.clone(), forgotten.clone());
            tokio::spawn(async move {
                collecting.await.unwrap();
                let _store = collector.hold().await;
                forgotten.load(Ordering::SeqCst)
            })
        };
        let collection = async {
            started.send(()).unwrap();
            // The build is now waiting for the store.
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        collector
            .exclusively(collection, || {
                // Forgetting takes a while, long enough for a build let in early to look.
                std::thread::sleep(Duration::from_millis(200));
                forgotten.store(true, Ordering::SeqCst);
            })
            .await;
        assert!(
            build.await.unwrap(),
            "a build used the store before the collection's evaluations were forgotten"
        );
    }

    #[test]
    fn the_summary_of_a_collection_is_read() {
        assert_eq!(
            freed(
                "finding garbage collector roots...\ndeleting unused links...\nnote: currently hard linking saves 0.00 MiB\n12 store paths deleted, 80.50 MiB freed\n"
            ),
            Some((12, 84_410_368))
        );
        assert_eq!(freed("0 store paths deleted, 0.00 MiB freed"), Some((0, 0)));
        assert_eq!(freed("nothing"), None);
    }
}
