//! Values worked out at most once per time-to-live and shared by every request: a channel's
//! commit, a git repository's refs, a path source's evaluation. Between resolutions no request
//! waits on the network or on Nix; when a value expires, the first request resolves it again and
//! every concurrent request for the same key waits for that one resolution.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};

/// Keys kept at most; past this, expired entries are dropped when a new one is added.
const MAX_ENTRIES: usize = 4096;

/// What a resolution gives: the value, or why there is none (shared by every waiter).
pub type Resolution<V, E> = Result<V, Arc<E>>;

type Pending<V, E> = Shared<BoxFuture<'static, Resolution<V, E>>>;

struct Slot<V, E> {
    /// The last value resolved, and when it was last confirmed.
    value: Option<(V, Instant)>,
    pending: Option<Pending<V, E>>,
}

impl<V, E> Default for Slot<V, E> {
    fn default() -> Self {
        Slot {
            value: None,
            pending: None,
        }
    }
}

type Slots<K, V, E> = Arc<Mutex<HashMap<K, Slot<V, E>>>>;

/// Resolved values by key, each reused for `ttl`.
pub struct Ttl<K, V, E> {
    ttl: Duration,
    /// Failures for which the last value is served instead (the source is unreachable).
    fall_back: fn(&E) -> bool,
    slots: Slots<K, V, E>,
}

impl<K, V, E> Ttl<K, V, E>
where
    K: Clone + Eq + Hash + Send + 'static,
    V: Clone + Send + Sync + 'static,
    E: Send + Sync + std::fmt::Display + 'static,
{
    /// Values kept for `ttl`; when resolving again fails with an error for which `fall_back`
    /// holds, the previous value is served for another `ttl` (with a warning in the log).
    pub fn new(ttl: Duration, fall_back: fn(&E) -> bool) -> Self {
        Ttl {
            ttl,
            fall_back,
            slots: Arc::default(),
        }
    }

    /// Forgets every value resolved (resolutions under way go on).
    pub fn clear(&self) {
        let mut slots = lock(&self.slots);
        slots.retain(|_, slot| slot.pending.is_some());
        for slot in slots.values_mut() {
            slot.value = None;
        }
    }

    /// The value of `key` if it was confirmed less than the TTL ago; nothing is resolved.
    pub fn fresh(&self, key: &K) -> Option<V> {
        let slots = lock(&self.slots);
        let (value, at) = slots.get(key)?.value.as_ref()?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    /// The value of `key`: remembered if it was confirmed less than the TTL ago, else resolved
    /// by `resolve` (in a task of its own, so a client that goes away cancels nothing), once
    /// for all concurrent callers.
    pub async fn get<F>(&self, key: &K, resolve: F) -> Resolution<V, E>
    where
        F: FnOnce() -> BoxFuture<'static, Result<V, E>>,
    {
        let pending = {
            let mut slots = lock(&self.slots);
            if slots.len() >= MAX_ENTRIES && !slots.contains_key(key) {
                let ttl = self.ttl;
                slots.retain(|_, slot| {
                    slot.pending.is_some()
                        || slot
                            .value
                            .as_ref()
                            .is_some_and(|(_, at)| at.elapsed() < ttl)
                });
            }
            let slot = slots.entry(key.clone()).or_default();
            if let Some((value, at)) = &slot.value
                && at.elapsed() < self.ttl
            {
                return Ok(value.clone());
            }
            match &slot.pending {
                Some(pending) => pending.clone(),
                None => {
                    let pending = self.spawn(key.clone(), resolve());
                    slot.pending = Some(pending.clone());
                    pending
                }
            }
        };
        pending.await
    }

    fn spawn(&self, key: K, resolution: BoxFuture<'static, Result<V, E>>) -> Pending<V, E> {
        let slots = self.slots.clone();
        let fall_back = self.fall_back;
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            let result = resolution.await;
            let mut slots = lock(&slots);
            let slot = slots.entry(task_key).or_default();
            slot.pending = None;
            match (result, &mut slot.value) {
                (Ok(value), _) => {
                    slot.value = Some((value.clone(), Instant::now()));
                    Ok(value)
                }
                (Err(err), Some((value, at))) if fall_back(&err) => {
                    tracing::warn!(error = %err, "serving what was resolved before");
                    *at = Instant::now();
                    Ok(value.clone())
                }
                (Err(err), _) => Err(Arc::new(err)),
            }
        });
        let slots = self.slots.clone();
        async move {
            task.await.unwrap_or_else(|panic| {
                // The task panicked before it could clear its slot: clear it here, so the next
                // request resolves again instead of waiting on a dead task.
                if let Some(slot) = lock(&slots).get_mut(&key) {
                    slot.pending = None;
                }
                std::panic::resume_unwind(panic.into_panic())
            })
        }
        .boxed()
        .shared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug)]
    enum Fault {
        Down,
        Gone,
    }

    impl std::fmt::Display for Fault {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{self:?}")
        }
    }

    fn counting(
        calls: &Arc<AtomicUsize>,
        result: Result<u32, Fault>,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<u32, Fault>> {
        let calls = calls.clone();
        move || {
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                result
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_resolution_per_ttl() {
        let cache: Arc<Ttl<&str, u32, Fault>> =
            Arc::new(Ttl::new(Duration::from_millis(300), |_| true));
        let calls = Arc::new(AtomicUsize::new(0));
        let results = futures::future::join_all(
            (0..20).map(|_| cache.get(&"channel", counting(&calls, Ok(1)))),
        )
        .await;
        assert!(results.iter().all(|r| matches!(r, Ok(1))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(
            cache.get(&"channel", counting(&calls, Ok(2))).await,
            Ok(1)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(matches!(
            cache.get(&"channel", counting(&calls, Ok(2))).await,
            Ok(2)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_source_serves_the_last_value_and_other_errors_do_not() {
        let cache: Ttl<&str, u32, Fault> = Ttl::new(Duration::ZERO, |e| matches!(e, Fault::Down));
        let calls = Arc::new(AtomicUsize::new(0));
        assert!(
            cache
                .get(&"a", counting(&calls, Err(Fault::Down)))
                .await
                .is_err()
        );
        assert!(matches!(
            cache.get(&"a", counting(&calls, Ok(7))).await,
            Ok(7)
        ));
        assert!(matches!(
            cache.get(&"a", counting(&calls, Err(Fault::Down))).await,
            Ok(7)
        ));
        let gone = cache.get(&"a", counting(&calls, Err(Fault::Gone))).await;
        assert!(matches!(gone, Err(e) if matches!(*e, Fault::Gone)));
    }
}
