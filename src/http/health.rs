//! Health checks for load balancers and App Engine: liveness (`/healthz`, 200 while the process
//! serves) and readiness (`/readyz`, 200 only while storage can be used). Readiness is probed at
//! most once per [`PROBED_EVERY`] however often it is asked: the probe writes to storage (a
//! bucket request), and anyone can ask.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::http::Method;

use super::is_head;
use crate::error::Error;
use crate::storage::{Storage, StorageError};

/// The oldest probe result `/readyz` answers from.
pub const PROBED_EVERY: Duration = Duration::from_secs(5);

/// Liveness: answering at all is the proof.
pub async fn live(method: Method) -> Result<&'static str, Error> {
    is_head(&method)?;
    Ok("ok\n")
}

/// What a probe found: `Ok` when storage can be used.
type Probed = Result<(), Arc<StorageError>>;

/// The last readiness probe of storage, shared by every `/readyz`.
pub struct Readiness {
    storage: Arc<dyn Storage>,
    /// When the last probe started, and what it found. Behind an async lock, so that requests
    /// arriving while a probe runs wait for it instead of starting their own.
    last: tokio::sync::Mutex<Option<(Instant, Probed)>>,
}

impl Readiness {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Readiness {
            storage,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether storage can be used: the last probe's answer if it started less than
    /// [`PROBED_EVERY`] ago, else a new probe's.
    async fn check(&self) -> Probed {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = last.as_ref()
            && at.elapsed() < PROBED_EVERY
        {
            return result.clone();
        }
        let started = Instant::now();
        let result = self.storage.check().await.map_err(Arc::new);
        *last = Some((started, result.clone()));
        result
    }
}

/// Readiness: storage is reachable and writable, so requests can be served.
pub async fn ready(
    Extension(readiness): Extension<Arc<Readiness>>,
    method: Method,
) -> Result<&'static str, Error> {
    is_head(&method)?;
    readiness.check().await.map_err(Error::NotReady)?;
    Ok("ok\n")
}
