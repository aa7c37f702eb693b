//! Build admission: at most `NIXERY_MAX_BUILDS` builds run at once; the others wait their turn
//! in arrival order (each told its place in the queue through its events), and past
//! `NIXERY_MAX_QUEUE` waiting builds a new one is refused.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use super::events::{Event, Run};
use crate::metrics::METRICS;
use crate::sync::lock;

/// Places for builds, and the queue of those waiting for one.
pub struct Admission {
    places: Arc<Semaphore>,
    max_queue: usize,
    queue: Arc<Mutex<VecDeque<Arc<Run>>>>,
}

impl Admission {
    pub fn new(max_builds: usize, max_queue: usize) -> Self {
        Admission {
            places: Arc::new(Semaphore::new(max_builds.max(1))),
            max_queue,
            queue: Arc::default(),
        }
    }

    /// Whether a new build would be refused: every place is taken and the queue is full.
    pub fn is_full(&self) -> bool {
        self.places.available_permits() == 0 && lock(&self.queue).len() >= self.max_queue
    }

    /// A place for `run`'s build, at once or after those queued before it (Tokio's semaphore
    /// serves waiters in order). The place is given back when the permit is dropped; the error
    /// (the places closed) does not happen.
    pub async fn admit(&self, run: &Arc<Run>) -> Result<OwnedSemaphorePermit, AcquireError> {
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            return Ok(place);
        }
        let _waiting = Waiting::join(self.queue.clone(), run.clone());
        self.places.clone().acquire_owned().await
    }
}

/// A build in the queue; leaving it (admitted, or cancelled) tells those behind their new place.
struct Waiting {
    queue: Arc<Mutex<VecDeque<Arc<Run>>>>,
    run: Arc<Run>,
}

impl Waiting {
    fn join(queue: Arc<Mutex<VecDeque<Arc<Run>>>>, run: Arc<Run>) -> Waiting {
        lock(&queue).push_back(run.clone());
        tell_places(&queue);
        Waiting { queue, run }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        lock(&self.queue).retain(|r| !Arc::ptr_eq(r, &self.run));
        tell_places(&self.queue);
    }
}

/// Tells every queued build its place, and the metrics how long the queue is.
fn tell_places(queue: &Mutex<VecDeque<Arc<Run>>>) {
    let queue = lock(queue);
    METRICS.build_queue_length.set(queue.len() as i64);
    for (i, run) in queue.iter().enumerate() {
        run.emit(Event::Queued {
            position: i + 1,
            waiting: queue.len(),
        });
    }
}
