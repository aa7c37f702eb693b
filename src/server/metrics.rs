//! The numbers operators alert on and tests count, served at `/metrics` in the Prometheus text
//! format (OpenMetrics). One set per process: every part of the server counts into [`METRICS`].

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// The media type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the duration histograms, in seconds: up to the longest a build may take.
const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The labels of a request: each from a set the server chooses, never the client (see
/// [`method_label`]; the route is one of a fixed few, the status one the server answered).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

/// The methods HTTP defines (RFC 9110 and RFC 5789), each its own label value.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// `method` as a label: one of the standard methods, or `other` for any a client made up, so
/// that made-up methods cannot add series.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    STANDARD_METHODS
        .into_iter()
        .find(|standard| *standard == method.as_str())
        .unwrap_or("other")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IsolationLabel {
    pub isolation: &'static str,
}

/// The Nix the server found at start-up, as `nix-build --version` names it (one value per process).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub file: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LevelLabel {
    pub level: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    pub cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StorageLabels {
    pub backend: &'static str,
    pub operation: &'static str,
    pub outcome: &'static str,
}

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route, method and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Time to answer a request (to its headers), by route.
    pub http_duration: Family<RouteLabel, Histogram>,
    /// Image requests by outcome: `built`, `cached`, `failed`, `timeout`, `unknown_package`.
    pub builds: Family<OutcomeLabel, Counter>,
    /// nix-build runs.
    pub nix_builds: Counter,
    /// nix-instantiate runs for images (catalogs count in `catalogs`).
    pub nix_evaluations: Counter,
    /// Package catalogs made, by how: `packages_json` (a channel's list), `evaluated` (Nix
    /// walked the set) or `stored` (read back from storage).
    pub catalogs: Family<OutcomeLabel, Counter>,
    /// Time spent in each phase of a build: `source`, `evaluate`, `build`, `layers`, `sbom`.
    pub build_phase: Family<PhaseLabel, Histogram>,
    /// Builds running now.
    pub builds_in_flight: Gauge,
    /// Where image lookups were answered: `memory`, `storage`, or a `miss`.
    pub cache_lookups: Family<LevelLabel, Counter>,
    /// Entries of the in-memory caches, by cache.
    pub cache_entries: Family<CacheLabel, Gauge>,
    /// Blob bytes sent to clients (redirected blobs not included).
    pub blob_bytes_served: Counter,
    /// Blob requests answered with a redirect.
    pub blob_redirects: Counter,
    /// Storage calls by backend, operation and outcome (`ok`, `error`).
    pub storage_operations: Family<StorageLabels, Counter>,
    /// Objects written to storage that were not there before (blobs and cache entries).
    pub uploads: Counter,
    /// Bytes of files under /nix/store, measured in the background.
    pub nix_store_bytes: Gauge,
    /// Bytes of blobs on disk (filesystem backend), measured in the background.
    pub storage_bytes: Gauge,
    /// Builds waiting for a place (NIXERY_MAX_BUILDS).
    pub build_queue_length: Gauge,
    /// Requests refused because the build queue was full (NIXERY_MAX_QUEUE).
    pub builds_rejected: Family<ReasonLabel, Counter>,
    /// 1 for how builds are isolated from the server (`sandboxed`, `build_users`, `none`).
    pub build_isolation: Family<IsolationLabel, Gauge>,
    /// 1 for the version of the Nix that builds run with (none when nix-build cannot be run).
    pub nix_version: Family<VersionLabel, Gauge>,
    /// Files read again on SIGHUP, by file (`htpasswd`, `images`, `allowed_commits`) and outcome
    /// (`read`, or `refused`: the file was not read, and what it said before stays).
    pub reloads: Family<ReloadLabels, Counter>,
    /// Images and indexes signed for a name (NIXERY_SIGNING_KEY), by outcome.
    pub signings: Family<OutcomeLabel, Counter>,
    /// Requests with wrong credentials (NIXERY_AUTH_HTPASSWD).
    pub auth_failures: Counter,
    /// Client connections open now.
    pub connections_open: Gauge,
    /// Times NIXERY_MAX_CONNECTIONS was reached (new connections then wait in the backlog).
    pub connection_limit_reached: Counter,
    /// nix-store --gc runs, the store paths they deleted and the bytes they freed.
    pub nix_gc_runs: Counter,
    pub nix_gc_deleted_paths: Counter,
    pub nix_gc_freed_bytes: Counter,
}

impl Metrics {
    fn new() -> Self {
        let duration = || Histogram::new(DURATION_BUCKETS);
        let mut metrics = Metrics {
            registry: Registry::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(duration),
            builds: Family::default(),
            nix_builds: Counter::default(),
            nix_evaluations: Counter::default(),
            catalogs: Family::default(),
            build_phase: Family::new_with_constructor(duration),
            builds_in_flight: Gauge::default(),
            cache_lookups: Family::default(),
            cache_entries: Family::default(),
            blob_bytes_served: Counter::default(),
            blob_redirects: Counter::default(),
            storage_operations: Family::default(),
            uploads: Counter::default(),
            nix_store_bytes: Gauge::default(),
            storage_bytes: Gauge::default(),
            build_queue_length: Gauge::default(),
            builds_rejected: Family::default(),
            build_isolation: Family::default(),
            nix_version: Family::default(),
            reloads: Family::default(),
            signings: Family::default(),
            auth_failures: Counter::default(),
            connections_open: Gauge::default(),
            connection_limit_reached: Counter::default(),
            nix_gc_runs: Counter::default(),
            nix_gc_deleted_paths: Counter::default(),
            nix_gc_freed_bytes: Counter::default(),
        };
        let r = &mut metrics.registry;
        // Counters get their `_total` suffix from the encoder.
        r.register(
            "nixery_http_requests",
            "Requests answered",
            metrics.http_requests.clone(),
        );
        r.register(
            "nixery_http_request_duration_seconds",
            "Time to answer a request",
            metrics.http_duration.clone(),
        );
        r.register(
            "nixery_builds",
            "Image requests by outcome",
            metrics.builds.clone(),
        );
        r.register(
            "nixery_nix_builds",
            "nix-build runs",
            metrics.nix_builds.clone(),
        );
        r.register(
            "nixery_nix_evaluations",
            "nix-instantiate runs for images",
            metrics.nix_evaluations.clone(),
        );
        r.register(
            "nixery_catalogs",
            "Package catalogs made, by how: from a channel's packages.json, evaluated, or read back from storage",
            metrics.catalogs.clone(),
        );
        r.register(
            "nixery_build_phase_seconds",
            "Time spent in each phase of a build",
            metrics.build_phase.clone(),
        );
        r.register(
            "nixery_builds_in_flight",
            "Builds running now",
            metrics.builds_in_flight.clone(),
        );
        r.register(
            "nixery_cache_lookups",
            "Where image lookups were answered",
            metrics.cache_lookups.clone(),
        );
        r.register(
            "nixery_cache_entries",
            "Entries of the in-memory caches",
            metrics.cache_entries.clone(),
        );
        r.register(
            "nixery_blob_bytes_served",
            "Blob bytes sent to clients",
            metrics.blob_bytes_served.clone(),
        );
        r.register(
            "nixery_blob_redirects",
            "Blob requests answered with a redirect",
            metrics.blob_redirects.clone(),
        );
        r.register(
            "nixery_storage_operations",
            "Storage calls by backend, operation and outcome",
            metrics.storage_operations.clone(),
        );
        r.register(
            "nixery_uploads",
            "Objects written to storage that were not there before",
            metrics.uploads.clone(),
        );
        r.register(
            "nixery_nix_store_bytes",
            "Bytes of files under /nix/store",
            metrics.nix_store_bytes.clone(),
        );
        r.register(
            "nixery_storage_bytes",
            "Bytes of blobs on disk (filesystem backend)",
            metrics.storage_bytes.clone(),
        );
        r.register(
            "nixery_build_queue_length",
            "Builds waiting for a place (NIXERY_MAX_BUILDS)",
            metrics.build_queue_length.clone(),
        );
        r.register(
            "nixery_builds_rejected",
            "Requests refused new work: the queue was full (NIXERY_MAX_QUEUE), or the client past its rate (NIXERY_CLIENT_BUILD_RATE)",
            metrics.builds_rejected.clone(),
        );
        r.register(
            "nixery_build_isolation",
            "How builds are isolated from the server: sandboxed, build_users or none (1 for the one in force)",
            metrics.build_isolation.clone(),
        );
        r.register(
            "nixery_nix_version",
            "The Nix builds run with, in its version label (1 for the one found at start-up)",
            metrics.nix_version.clone(),
        );
        r.register(
            "nixery_signings",
            "Images and indexes signed for a name (NIXERY_SIGNING_KEY), by outcome: signed, refused (a manifest the key never signed) or failed (storage)",
            metrics.signings.clone(),
        );
        r.register(
            "nixery_reloads",
            "Files read again on SIGHUP, by file (htpasswd, images, allowed_commits) and outcome (read, or refused: the old contents stay)",
            metrics.reloads.clone(),
        );
        r.register(
            "nixery_auth_failures",
            "Requests with wrong credentials (NIXERY_AUTH_HTPASSWD)",
            metrics.auth_failures.clone(),
        );
        r.register(
            "nixery_connections_open",
            "Client connections open now",
            metrics.connections_open.clone(),
        );
        r.register(
            "nixery_connection_limit_reached",
            "Times NIXERY_MAX_CONNECTIONS connections were open and new ones had to wait",
            metrics.connection_limit_reached.clone(),
        );
        r.register(
            "nixery_nix_gc_runs",
            "nix-store --gc runs (NIXERY_NIX_GC_MIN_FREE)",
            metrics.nix_gc_runs.clone(),
        );
        r.register(
            "nixery_nix_gc_deleted_paths",
            "Store paths nix-store --gc deleted",
            metrics.nix_gc_deleted_paths.clone(),
        );
        r.register(
            "nixery_nix_gc_freed_bytes",
            "Bytes nix-store --gc freed",
            metrics.nix_gc_freed_bytes.clone(),
        );
        // Known label values start at zero, so their series exist (and rates work) before the
        // first event.
        for outcome in ["built", "cached", "failed", "timeout", "unknown_package"] {
            drop(metrics.builds.get_or_create(&OutcomeLabel { outcome }));
        }
        for level in ["memory", "storage", "miss"] {
            drop(metrics.cache_lookups.get_or_create(&LevelLabel { level }));
        }
        for phase in ["source", "evaluate", "build", "layers", "sbom"] {
            drop(metrics.build_phase.get_or_create(&PhaseLabel { phase }));
        }
        for cache in ["images", "manifests"] {
            drop(metrics.cache_entries.get_or_create(&CacheLabel { cache }));
        }
        for reason in ["queue_full", "client_rate"] {
            drop(
                metrics
                    .builds_rejected
                    .get_or_create(&ReasonLabel { reason }),
            );
        }
        metrics
    }

    /// Counts a request refused new work, and why.
    pub fn build_rejected(&self, reason: &'static str) {
        self.builds_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts an image request's outcome.
    pub fn build_outcome(&self, outcome: &'static str) {
        self.builds.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Records the Nix version found at start-up (`nixery_nix_version`).
    pub fn nix_version_found(&self, version: &str) {
        self.nix_version
            .get_or_create(&VersionLabel {
                version: version.to_owned(),
            })
            .set(1);
    }

    /// Counts a file read again on SIGHUP (`ok`), or refused.
    /// Counts an image or index signed for a name: `signed`, `refused` or `failed`.
    pub fn signing(&self, outcome: &'static str) {
        self.signings.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn reloaded(&self, file: &'static str, ok: bool) {
        let outcome = if ok { "read" } else { "refused" };
        self.reloads
            .get_or_create(&ReloadLabels { file, outcome })
            .inc();
    }

    /// Counts where an image lookup was answered.
    pub fn cache_lookup(&self, level: &'static str) {
        self.cache_lookups
            .get_or_create(&LevelLabel { level })
            .inc();
    }

    /// Records how long a build phase took.
    pub fn phase(&self, phase: &'static str, took: Duration) {
        self.build_phase
            .get_or_create(&PhaseLabel { phase })
            .observe(took.as_secs_f64());
    }

    /// Sets the number of entries of an in-memory cache.
    pub fn cache_size(&self, cache: &'static str, entries: usize) {
        self.cache_entries
            .get_or_create(&CacheLabel { cache })
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// Counts a storage call.
    pub fn storage_operation(&self, backend: &'static str, operation: &'static str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.storage_operations
            .get_or_create(&StorageLabels {
                backend,
                operation,
                outcome,
            })
            .inc();
    }
}

/// The server's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Every metric, in the text format.
pub fn encode() -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &METRICS.registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    text
}

/// Counts the builds in flight while it lives.
pub struct InFlight;

impl InFlight {
    pub fn start() -> InFlight {
        METRICS.builds_in_flight.inc();
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        METRICS.builds_in_flight.dec();
    }
}

/// Total size of the regular files under `dir` (not following symlinks); 0 when unreadable.
/// `None` when `stop` was cancelled during the walk, which ends it.
pub fn disk_bytes(dir: &std::path::Path, stop: &CancellationToken) -> Option<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if stop.is_cancelled() {
            return None;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => stack.push(entry.path()),
                Ok(meta) if meta.is_file() => total += meta.len(),
                _ => {}
            }
        }
    }
    Some(total)
}

/// Measures the store and blob sizes now and every `every` after, in the background, until
/// `stop`: a walk of a large /nix/store takes seconds of a core, and one still running would
/// hold the runtime's shutdown for its whole grace.
pub fn measure_disks(blobs: Option<std::path::PathBuf>, every: Duration, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let blobs = blobs.clone();
            let walking = stop.clone();
            let measured = tokio::task::spawn_blocking(move || {
                let store = disk_bytes(std::path::Path::new("/nix/store"), &walking)?;
                let blobs = match blobs {
                    Some(blobs) => Some(disk_bytes(&blobs, &walking)?),
                    None => None,
                };
                Some((store, blobs))
            })
            .await;
            if let Ok(Some((store, blobs))) = measured {
                METRICS
                    .nix_store_bytes
                    .set(i64::try_from(store).unwrap_or(i64::MAX));
                if let Some(blobs) = blobs {
                    METRICS
                        .storage_bytes
                        .set(i64::try_from(blobs).unwrap_or(i64::MAX));
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_walk_counts_regular_files_and_ends_when_the_server_stops() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 100]).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 23]).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("link")).unwrap();
        let stop = CancellationToken::new();
        assert_eq!(disk_bytes(dir.path(), &stop), Some(123));
        stop.cancel();
        assert_eq!(disk_bytes(dir.path(), &stop), None);
    }

    #[test]
    fn the_text_names_every_metric_the_readme_lists() {
        METRICS.nix_builds.inc();
        METRICS.build_outcome("built");
        // Families whose label values come from requests exist once they have a sample.
        METRICS
            .http_requests
            .get_or_create(&HttpLabels {
                route: "base",
                method: "GET",
                status: 200,
            })
            .inc();
        METRICS
            .http_duration
            .get_or_create(&RouteLabel { route: "base" })
            .observe(0.001);
        METRICS.storage_operation("filesystem", "check", true);
        let text = encode();
        // Counters are named with `_total` on their samples; families with no samples yet
        // still have their TYPE line.
        assert!(
            text.contains("nixery_builds_total{outcome=\"built\"} "),
            "{text}"
        );
        assert!(text.contains("nixery_nix_builds_total "), "{text}");
        for name in [
            "nixery_http_requests counter",
            "nixery_http_request_duration_seconds histogram",
            "nixery_builds counter",
            "nixery_nix_builds counter",
            "nixery_build_phase_seconds histogram",
            "nixery_builds_in_flight gauge",
            "nixery_cache_lookups counter",
            "nixery_cache_entries gauge",
            "nixery_blob_bytes_served counter",
            "nixery_blob_redirects counter",
            "nixery_storage_operations counter",
            "nixery_uploads counter",
            "nixery_nix_store_bytes gauge",
            "nixery_storage_bytes gauge",
        ] {
            let name = format!("# TYPE {name}");
            assert!(text.contains(&name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn only_standard_methods_have_a_label_of_their_own() {
        use axum::http::Method;
        for method in STANDARD_METHODS {
            let parsed = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(method_label(&parsed), method);
        }
        for made_up in ["get", "MADEUP", "PROPFIND", "X"] {
            let parsed = Method::from_bytes(made_up.as_bytes()).unwrap();
            assert_eq!(method_label(&parsed), "other", "{made_up}");
        }
    }
}
