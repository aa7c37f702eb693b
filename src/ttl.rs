//! Values worked out at most once per time-to-live and shared by every request: a channel's
//! commit, a git repository's refs, a path source's evaluation. Between resolutions no request
//! waits on the network or on Nix; when a value expires, the first request resolves it again and
//! every concurrent request for the same key waits for that one resolution.
//!
//! Keys can come from clients (a channel named in a tag, the packages of an image name), so at
//! most [`MAX_ENTRIES`] are kept: a new key takes the place of the least recently used one that
//! is not being resolved. A failure the resolution reports as a value (a channel that does not
//! exist) is remembered like any value, for the TTL.

use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use lru::LruCache;

/// Keys kept at most, per map.
pub(crate) const MAX_ENTRIES: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

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

/// What a caller of [`Ttl::get`] awaits: the resolution shared by every caller of its key, or
/// one of its own (no place was free).
enum Next<V, E> {
    Wait(Pending<V, E>),
    Alone(BoxFuture<'static, Result<V, E>>),
}

/// The slots, most recently used first. A slot being resolved is never evicted, so the task
/// resolving it always finds it.
type Slots<K, V, E> = Arc<Mutex<LruCache<K, Slot<V, E>>>>;

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
        Self::bounded(ttl, fall_back, MAX_ENTRIES)
    }

    /// [`Ttl::new`] keeping at most `max` keys.
    fn bounded(ttl: Duration, fall_back: fn(&E) -> bool, max: NonZeroUsize) -> Self {
        Ttl {
            ttl,
            fall_back,
            slots: Arc::new(Mutex::new(LruCache::new(max))),
        }
    }

    /// Forgets every value resolved (resolutions under way go on).
    pub fn clear(&self) {
        let mut slots = lock(&self.slots);
        let idle: Vec<K> = slots
            .iter()
            .filter(|(_, slot)| slot.pending.is_none())
            .map(|(key, _)| key.clone())
            .collect();
        for key in idle {
            slots.pop(&key);
        }
        for (_, slot) in slots.iter_mut() {
            slot.value = None;
        }
    }

    /// Keys kept now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.slots).len()
    }

    /// The value of `key` if it was confirmed less than the TTL ago; nothing is resolved.
    pub fn fresh(&self, key: &K) -> Option<V> {
        let mut slots = lock(&self.slots);
        let (value, at) = slots.get(key)?.value.as_ref()?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    /// The value of `key`: remembered if it was confirmed less than the TTL ago, else resolved
    /// by `resolve` (in a task of its own, so a client that goes away cancels nothing), once
    /// for all concurrent callers. When every place is taken by a key being resolved, `key` is
    /// resolved for this caller alone and not remembered.
    pub async fn get<F>(&self, key: &K, resolve: F) -> Resolution<V, E>
    where
        F: FnOnce() -> BoxFuture<'static, Result<V, E>>,
    {
        let next = {
            let mut slots = lock(&self.slots);
            if !slots.contains(key) && !make_room(&mut slots) {
                Next::Alone(resolve())
            } else {
                let slot = slots.get_or_insert_mut(key.clone(), Slot::default);
                if let Some((value, at)) = &slot.value
                    && at.elapsed() < self.ttl
                {
                    return Ok(value.clone());
                }
                Next::Wait(match &slot.pending {
                    Some(pending) => pending.clone(),
                    None => {
                        let pending = self.spawn(key.clone(), resolve());
                        slot.pending = Some(pending.clone());
                        pending
                    }
                })
            }
        };
        match next {
            Next::Wait(pending) => pending.await,
            Next::Alone(resolution) => resolution.await.map_err(Arc::new),
        }
    }

    fn spawn(&self, key: K, resolution: BoxFuture<'static, Result<V, E>>) -> Pending<V, E> {
        let slots = self.slots.clone();
        let fall_back = self.fall_back;
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            let result = resolution.await;
            let mut slots = lock(&slots);
            // The slot is there: slots being resolved are neither evicted nor cleared.
            let Some(slot) = slots.peek_mut(&task_key) else {
                return result.map_err(Arc::new);
            };
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
                if let Some(slot) = lock(&slots).peek_mut(&key) {
                    slot.pending = None;
                }
                std::panic::resume_unwind(panic.into_panic())
            })
        }
        .boxed()
        .shared()
    }
}

/// Makes room for one more key in `slots` if they are full, by evicting the least recently used
/// slot not being resolved; `false` when every slot is being resolved.
fn make_room<K: Hash + Eq + Clone, V, E>(slots: &mut LruCache<K, Slot<V, E>>) -> bool {
    if slots.len() < slots.cap().get() {
        return true;
    }
    let idle = slots
        .iter()
        .rev()
        .find(|(_, slot)| slot.pending.is_none())
        .map(|(key, _)| key.clone());
    match idle {
        Some(key) => {
            slots.pop(&key);
            true
        }
        None => false,
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

    #[tokio::test]
    async fn at_most_max_keys_are_kept_and_the_least_recently_used_goes() {
        let max = NonZeroUsize::new(3).unwrap();
        let cache: Ttl<u32, u32, Fault> = Ttl::bounded(Duration::from_secs(60), |_| false, max);
        let calls = Arc::new(AtomicUsize::new(0));
        for key in 0..3 {
            assert!(matches!(cache.get(&key, counting(&calls, Ok(key))).await, Ok(k) if k == key));
        }
        // 0 is used again, so 1 is the least recently used when 3 comes.
        assert!(matches!(
            cache.get(&0, counting(&calls, Ok(9))).await,
            Ok(0)
        ));
        assert!(matches!(
            cache.get(&3, counting(&calls, Ok(3))).await,
            Ok(3)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(cache.len(), 3);
        assert!(matches!(
            cache.get(&0, counting(&calls, Ok(9))).await,
            Ok(0)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(matches!(
            cache.get(&1, counting(&calls, Ok(1))).await,
            Ok(1)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        // A flood of new keys keeps the bound.
        for key in 100..130 {
            cache.get(&key, counting(&calls, Ok(key))).await.ok();
            assert!(cache.len() <= 3);
        }
    }

    #[tokio::test]
    async fn keys_being_resolved_keep_their_places() {
        let max = NonZeroUsize::new(2).unwrap();
        let cache: Ttl<u32, u32, Fault> = Ttl::bounded(Duration::from_secs(60), |_| false, max);
        let calls = Arc::new(AtomicUsize::new(0));
        // 1 and 2 are being resolved when 3 comes: 3 is resolved for its caller alone.
        let (one, two, three) = futures::join!(
            cache.get(&1, counting(&calls, Ok(1))),
            cache.get(&2, counting(&calls, Ok(2))),
            cache.get(&3, counting(&calls, Ok(3))),
        );
        assert!(matches!((one, two, three), (Ok(1), Ok(2), Ok(3))));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(cache.len(), 2);
        // 1 and 2 were remembered.
        assert!(matches!(
            cache.get(&1, counting(&calls, Ok(9))).await,
            Ok(1)
        ));
        assert!(matches!(
            cache.get(&2, counting(&calls, Ok(9))).await,
            Ok(2)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
