//! Admission of new work: every build, and every source fetch or catalog evaluation a request
//! starts, takes one of `NIXERY_MAX_BUILDS` places; the others wait their turn in arrival order
//! (a build is told its place through its events), and past `NIXERY_MAX_QUEUE` waiting a new
//! one is refused. Each client may also start new work at most `NIXERY_CLIENT_BUILD_RATE` times
//! a minute ([`crate::server::client`] says who the client is), so one client's flood cannot take every
//! place. What is served from memory or storage is never admitted nor counted.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use crate::server::client;
use crate::server::metrics::METRICS;
use crate::sync::lock;

/// Most clients whose rate is tracked at once; past it the least recent is forgotten (and
/// starts afresh when it comes back, so a flood must come from this many addresses to matter).
const TRACKED_CLIENTS: NonZeroUsize = NonZeroUsize::new(100_000).unwrap();

/// Something waiting in the queue that wants to know its place.
pub trait Waiter: Send + Sync {
    /// It is `position`th (from 1) of `waiting`.
    fn placed(&self, position: usize, waiting: usize);
}

/// What waits for a place, in arrival order, each with an id of its own.
type Queue = Mutex<VecDeque<(u64, Option<Arc<dyn Waiter>>)>>;

/// Why new work was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many builds are waiting (NIXERY_MAX_QUEUE); try again shortly")]
    QueueFull,
    #[error(
        "this client started new builds more than {per_minute} times in the last minute (NIXERY_CLIENT_BUILD_RATE); try again in {}s",
        retry_after.as_secs()
    )]
    ClientRate {
        per_minute: u32,
        retry_after: Duration,
    },
}

impl Refusal {
    /// The `reason` label of `nixery_builds_rejected_total`.
    fn reason(&self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::ClientRate { .. } => "client_rate",
        }
    }

    /// Counts the refusal in `nixery_builds_rejected_total`, where it is answered with 429 (a
    /// suggestion skipped for want of a place is not counted).
    pub fn count(&self) {
        METRICS.build_rejected(self.reason());
    }

    /// How long the client is told to wait before trying again.
    pub fn retry_after(&self) -> Duration {
        match self {
            Refusal::QueueFull => Duration::from_secs(30),
            Refusal::ClientRate { retry_after, .. } => *retry_after,
        }
    }
}

/// Places for new work, the queue of what waits for one, and each client's rate.
pub struct Admission {
    places: Arc<Semaphore>,
    max_queue: usize,
    queue: Arc<Queue>,
    next_waiter: AtomicU64,
    rate: ClientRate,
}

impl Admission {
    /// `max_builds` places, `max_queue` waiting, and each client starting new work at most
    /// `per_minute` times a minute.
    pub fn new(max_builds: usize, max_queue: usize, per_minute: u32) -> Self {
        Admission {
            places: Arc::new(Semaphore::new(max_builds.max(1))),
            max_queue,
            queue: Arc::default(),
            next_waiter: AtomicU64::new(0),
            rate: ClientRate::new(per_minute),
        }
    }

    /// Whether the request being served may start new work: refused when every place is taken
    /// and the queue is full, or when its client has started new work too often (see
    /// [`Refusal::count`]). A request
    /// counts against its client's rate once, however much work it starts (every platform of an
    /// index, say); work started outside a request (by the server itself) is not counted.
    pub fn may_start(&self) -> Result<(), Refusal> {
        if self.places.available_permits() == 0 && lock(&self.queue).len() >= self.max_queue {
            return Err(Refusal::QueueFull);
        }
        client::charge_once(|addr| self.rate.take(addr))
    }

    /// A place, at once or after those queued before (Tokio's semaphore serves waiters in
    /// order); `waiter` is told its place meanwhile. The place is given back when the permit is
    /// dropped; the error (the places closed) does not happen.
    pub async fn admit(
        &self,
        waiter: Option<Arc<dyn Waiter>>,
    ) -> Result<OwnedSemaphorePermit, AcquireError> {
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            return Ok(place);
        }
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting::join(self.queue.clone(), id, waiter);
        self.places.clone().acquire_owned().await
    }
}

/// Something in the queue; leaving it (admitted, or cancelled) tells those behind their new
/// place.
struct Waiting {
    queue: Arc<Queue>,
    id: u64,
}

impl Waiting {
    fn join(queue: Arc<Queue>, id: u64, waiter: Option<Arc<dyn Waiter>>) -> Waiting {
        lock(&queue).push_back((id, waiter));
        tell_places(&queue);
        Waiting { queue, id }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        lock(&self.queue).retain(|(id, _)| *id != self.id);
        tell_places(&self.queue);
    }
}

/// Tells everything queued its place, and the metrics how long the queue is.
fn tell_places(queue: &Queue) {
    let queue = lock(queue);
    METRICS.build_queue_length.set(queue.len() as i64);
    for (i, (_, waiter)) in queue.iter().enumerate() {
        if let Some(waiter) = waiter {
            waiter.placed(i + 1, queue.len());
        }
    }
}

/// Each client's allowance of new work: a bucket of `per_minute` tokens, refilled evenly over a
/// minute.
struct ClientRate {
    per_minute: u32,
    buckets: Mutex<lru::LruCache<IpAddr, (f64, Instant)>>,
}

impl ClientRate {
    fn new(per_minute: u32) -> Self {
        ClientRate {
            per_minute,
            buckets: Mutex::new(lru::LruCache::new(TRACKED_CLIENTS)),
        }
    }

    /// One token of `addr`'s bucket, or how long until it has one.
    fn take(&self, addr: IpAddr) -> Result<(), Refusal> {
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        let (tokens, at) = buckets.get_or_insert_mut(addr, || (capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        let wait = if per_second > 0.0 {
            ((1.0 - *tokens) / per_second).ceil().max(1.0)
        } else {
            60.0
        };
        Err(Refusal::ClientRate {
            per_minute: self.per_minute,
            retry_after: Duration::from_secs(wait as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_client_gets_its_rate_and_then_waits() {
        let rate = ClientRate::new(3);
        for _ in 0..3 {
            rate.take(addr(2)).unwrap();
        }
        let Err(Refusal::ClientRate { retry_after, .. }) = rate.take(addr(2)) else {
            panic!("a fourth start within the minute was allowed");
        };
        assert_eq!(retry_after, Duration::from_secs(20));
        // Another client is not held back by the first.
        rate.take(addr(3)).unwrap();
    }

    #[tokio::test]
    async fn a_request_is_charged_once_and_work_outside_requests_never() {
        let admission = Admission::new(4, 4, 2);
        // Not in a request: the server's own work.
        for _ in 0..5 {
            admission.may_start().unwrap();
        }
        client::serve_as(addr(2), async {
            admission.may_start().unwrap();
            admission.may_start().unwrap();
        })
        .await;
        client::serve_as(addr(2), async { admission.may_start().unwrap() }).await;
        let refused = client::serve_as(addr(2), async { admission.may_start() }).await;
        assert!(
            matches!(refused, Err(Refusal::ClientRate { .. })),
            "{refused:?}"
        );
        client::serve_as(addr(3), async { admission.may_start().unwrap() }).await;
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_does_not_charge_the_client() {
        let admission = Arc::new(Admission::new(1, 1, 1));
        let first = admission.admit(None).await.unwrap();
        let queued = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(None).await.map(drop) }
        });
        while lock(&admission.queue).is_empty() {
            tokio::task::yield_now().await;
        }
        let refused = client::serve_as(addr(2), async { admission.may_start() }).await;
        assert_eq!(refused, Err(Refusal::QueueFull));
        drop(first);
        queued.await.unwrap().unwrap();
        client::serve_as(addr(2), async { admission.may_start().unwrap() }).await;
    }
}
