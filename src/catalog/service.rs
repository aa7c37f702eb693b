//! The catalogs of the package sets being served, one per pinned source: made in the background
//! the first time a search or a suggestion asks (never blocking a pull or start-up), a commit's
//! kept in storage so restarts and replicas read it back instead of evaluating, the most recent
//! few in memory. Making one is new work like a build: it is admitted ([`Admission`]) and
//! counted against the client that asked, and each is made once at a time.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::Catalog;
use crate::admission::{Admission, Refusal};
use crate::nix::NixEnv;
use crate::server::metrics::{METRICS, OutcomeLabel};
use crate::source::{Pin, Sources};
use crate::storage::{Cache, Storage};
use crate::sync::lock;

/// How long a catalog that could not be made is not tried again.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// How catalogs are made.
pub struct Settings {
    /// The Nix system double to evaluate for.
    pub system: String,
    /// Where the Nix expression is written (a directory `nix_env` lets evaluations read).
    pub work_dir: PathBuf,
    /// The environment of Nix processes.
    pub nix_env: NixEnv,
    /// How long one evaluation may take.
    pub timeout: Duration,
    /// How long a path source's catalog is used before it is made again (the set may change).
    pub path_ttl: Duration,
    /// Most catalogs kept in memory (NIXERY_SOURCES_KEEP).
    pub keep: std::num::NonZeroUsize,
}

#[derive(Default)]
struct Entry {
    /// The catalog, and when it was made.
    catalog: Option<(Arc<Catalog>, Instant)>,
    /// When making it last failed.
    failed: Option<Instant>,
}

/// The catalogs, by pinned source.
pub struct Catalogs {
    storage: Arc<dyn Storage>,
    sources: Arc<Sources>,
    admission: Arc<Admission>,
    settings: Settings,
    entries: Mutex<lru::LruCache<String, Entry>>,
    /// The catalogs being made, apart from `entries` so that none is forgotten (and made twice
    /// at once) while it is made; bounded by the admission queue.
    making: Mutex<HashSet<String>>,
}

impl Catalogs {
    pub fn new(
        storage: Arc<dyn Storage>,
        sources: Arc<Sources>,
        admission: Arc<Admission>,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new(Catalogs {
            storage,
            sources,
            admission,
            entries: Mutex::new(lru::LruCache::new(settings.keep)),
            making: Mutex::default(),
            settings,
        })
    }

    /// The catalog of `pin` when it is ready. When it is not (or a path source's is older than
    /// its TTL), it is made in the background, once, and this answers with what there is; or
    /// is refused when making it may not start now (the queue is full, or the client has
    /// started too much).
    pub fn ready(self: &Arc<Self>, pin: &Pin) -> Result<Option<Arc<Catalog>>, Refusal> {
        let key = key(pin, &self.settings.system);
        let mut entries = lock(&self.entries);
        let entry = entries.get_or_insert_mut(key.clone(), Entry::default);
        let due = match (&entry.catalog, pin) {
            (None, _) => entry.failed.is_none_or(|at| at.elapsed() >= RETRY_AFTER),
            (Some((_, made)), Pin::Path(_)) => made.elapsed() >= self.settings.path_ttl,
            (Some(_), Pin::Commit { .. }) => false,
        };
        let catalog = entry.catalog.as_ref().map(|(catalog, _)| catalog.clone());
        let mut making = lock(&self.making);
        if due && !making.contains(&key) {
            match self.admission.may_start() {
                Ok(()) => {
                    making.insert(key.clone());
                    let this = self.clone();
                    let pin = pin.clone();
                    tokio::spawn(async move { this.make(key, pin).await });
                }
                // An old catalog of a path is still an answer.
                Err(refusal) if catalog.is_none() => return Err(refusal),
                Err(_) => {}
            }
        }
        Ok(catalog)
    }

    /// [`Catalogs::ready`], waiting up to `patience` for a catalog being made (a small set's
    /// takes well under a second).
    pub async fn ready_within(
        self: &Arc<Self>,
        pin: &Pin,
        patience: Duration,
    ) -> Result<Option<Arc<Catalog>>, Refusal> {
        let deadline = Instant::now() + patience;
        loop {
            let catalog = self.ready(pin)?;
            if catalog.is_some() || Instant::now() >= deadline {
                return Ok(catalog);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn make(self: Arc<Self>, key: String, pin: Pin) {
        let result = match self.admission.admit(None).await {
            Ok(_place) => self.stored_or_evaluated(&key, &pin).await,
            Err(closed) => Err(closed.to_string()),
        };
        let mut entries = lock(&self.entries);
        lock(&self.making).remove(&key);
        let entry = entries.get_or_insert_mut(key, Entry::default);
        match result {
            Ok(catalog) => {
                tracing::info!(source = %self.sources.describe_pin(&pin), packages = catalog.len(), "package catalog ready");
                entry.catalog = Some((catalog, Instant::now()));
                entry.failed = None;
            }
            Err(e) => {
                entry.failed = Some(Instant::now());
                tracing::warn!(source = %self.sources.describe_pin(&pin), error = %e, "the package catalog could not be made; searches and suggestions wait for the next try");
            }
        }
    }

    /// A commit's catalog from storage, else evaluated (and a commit's stored).
    async fn stored_or_evaluated(&self, key: &str, pin: &Pin) -> Result<Arc<Catalog>, String> {
        let stored_key = hex::encode(Sha256::digest(key.as_bytes()));
        let commit = matches!(pin, Pin::Commit { .. });
        if commit {
            match self.storage.read_cache(Cache::Catalogs, &stored_key).await {
                // Reading a large catalog takes a quarter of a second of CPU.
                Ok(Some(bytes)) => match tokio::task::spawn_blocking(move || {
                    Catalog::from_bytes(&bytes).map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|panicked| Err(panicked.to_string()))
                {
                    Ok(catalog) => {
                        count("stored");
                        return Ok(Arc::new(catalog));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a stored catalog is unreadable; making it again")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading a stored catalog failed; making it again")
                }
            }
        }
        let catalog = match self.sources.packages_json(pin).await {
            Some(bytes) => match tokio::task::spawn_blocking(move || {
                Catalog::from_packages_json_br(&bytes).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|panicked| Err(panicked.to_string()))
            {
                Ok(catalog) => {
                    count("packages_json");
                    Some(catalog)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the channel's packages.json.br is unreadable; evaluating instead");
                    None
                }
            },
            None => None,
        };
        let catalog = match catalog {
            Some(catalog) => catalog,
            None => self.evaluated(pin).await?,
        };
        let catalog = Arc::new(catalog);
        if commit {
            let to_store = catalog.clone();
            let stored = match tokio::task::spawn_blocking(move || to_store.to_bytes()).await {
                Ok(bytes) => self
                    .storage
                    .write_cache(Cache::Catalogs, &stored_key, &bytes)
                    .await
                    .map_err(|e| e.to_string()),
                Err(panicked) => Err(panicked.to_string()),
            };
            if let Err(e) = stored {
                tracing::warn!(error = %e, "storing the package catalog failed");
            }
        }
        Ok(catalog)
    }
}

impl Catalogs {
    /// The catalog Nix makes of `pin`'s tree.
    async fn evaluated(&self, pin: &Pin) -> Result<Catalog, String> {
        let tree = self.sources.tree(pin).await.map_err(|e| e.to_string())?;
        let catalog = Catalog::evaluate(
            tree.path(),
            &self.settings.system,
            &self.settings.work_dir,
            &self.settings.nix_env,
            self.settings.timeout,
            super::MAX_EVALUATED_BYTES,
        )
        .await
        .map_err(|e| e.to_string())?;
        count("evaluated");
        Ok(catalog)
    }
}

fn count(outcome: &'static str) {
    METRICS
        .catalogs
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

/// What a catalog is made of: a commit of a source, or a path, evaluated for `system`.
fn key(pin: &Pin, system: &str) -> String {
    match pin {
        Pin::Commit { commit, source } => {
            format!("catalog-1\nsystem {system}\ncommit {source} {commit}\n")
        }
        Pin::Path(path) => format!("catalog-1\nsystem {system}\npath {}\n", path.display()),
    }
}
