//! Who builds what, and when: an image in memory is answered at once, a failure the request
//! caused is answered from memory for `failure_ttl`, a running build is joined (one build per
//! image however many ask), and a new one is admitted (a place of `NIXERY_MAX_BUILDS`, or the
//! queue) before it runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};

use super::events::{self, Event, Progress, Run, RunKey};
use super::{BuildError, Builder, Built, Image, Request};
use crate::server::metrics::METRICS;
use crate::source::Pin;
use crate::sync::lock;

/// A build, shared by everyone who waits for it.
pub(super) type Build = Shared<BoxFuture<'static, Result<Arc<Image>, Arc<BuildError>>>>;

impl Builder {
    /// The image `request` names, from memory, else from its build (joined if one is running,
    /// started if not). A failure the request caused is answered again from memory for
    /// `failure_ttl`. The build runs in its own task: a client that goes away does not cancel
    /// it, and concurrent requests share it. A commit clients may not name
    /// ([`crate::source::Sources::admit`]) is served only from storage.
    pub async fn image(self: &Arc<Self>, request: &Request) -> Result<Arc<Image>, Arc<BuildError>> {
        if let Some(err) = self.remembered_failure(&request.key()) {
            METRICS.build_outcome("remembered_failure");
            return Err(err);
        }
        let known = self.known_key(request);
        if let Some(image) = self.in_memory(known.as_deref()) {
            METRICS.cache_lookup("memory");
            METRICS.build_outcome("cached");
            return Ok(image);
        }
        let commit_key = commit_only(request, known);
        // A commit's image stored before a restart (or by another replica) is a warm pull:
        // served whoever may name the commit (NIXERY_COMMIT_PINS), and never admitted nor
        // counted against the client.
        if let Some(key) = &commit_key
            && let Ok(Some(built)) = self.stored(key).await
        {
            self.remember(key, &built.image);
            return Ok(built.image);
        }
        // A commit clients may not name: nothing is fetched or built.
        if let Err(refused) = self.sources.admit(&request.tag).await {
            return Err(Arc::new(refused.into()));
        }
        match self.join_or_start(request, commit_key) {
            Ok((_, build)) => build.await,
            Err(refused) => Err(refused),
        }
    }

    /// See [`super::Images::start`]. A failure the request caused is answered from memory for
    /// `failure_ttl`, as for a pull.
    pub fn start(self: &Arc<Self>, request: &Request) -> Result<Arc<Run>, Arc<BuildError>> {
        let key = request.key();
        let run = self.progress.get(&key);
        if let Some(run) = &run
            && run.status() == events::Status::Running
        {
            return Ok(run.clone());
        }
        if let Some(err) = self.remembered_failure(&key) {
            return Ok(
                match run.filter(|run| run.status() == events::Status::Failed) {
                    Some(run) => run,
                    None => {
                        let package_set = self.sources.describe_pin(&request.pin);
                        let failed = failed_event(&err, &package_set);
                        Progress::finished_now(&key, self.described(request), failed)
                    }
                },
            );
        }
        let known = self.known_key(request);
        if let Some(image) = self.in_memory(known.as_deref()) {
            return Ok(self.finished_in_memory(request, image));
        }
        Ok(self.join_or_start(request, commit_only(request, known))?.0)
    }

    /// See [`super::Images::build_of`].
    pub fn build_of(&self, request: &Request) -> Option<Arc<Run>> {
        if let Some(run) = self.progress.get(&request.key()) {
            return Some(run);
        }
        let image = self.in_memory(self.known_key(request).as_deref())?;
        Some(self.finished_in_memory(request, image))
    }

    /// See [`super::Images::cancel_builds`].
    pub fn cancel_builds(&self) -> usize {
        let building = lock(&self.building);
        for (_, abort) in building.values() {
            abort.abort();
        }
        building.len()
    }

    /// A finished build for an image found in memory (not kept: it costs nothing to make).
    fn finished_in_memory(&self, request: &Request, image: Arc<Image>) -> Arc<Run> {
        Progress::finished_now(
            &request.key(),
            self.described(request),
            Built::cached(image, "memory").event(),
        )
    }

    /// What a build page says of the build of `request`.
    fn described(&self, request: &Request) -> events::Described {
        events::Described {
            image: request.name_alone(),
            tag: request.tag.to_string(),
            package_set: self.sources.describe_pin(&request.pin),
            platform: request.platform.to_string(),
            compression: request.compression.as_str(),
        }
    }

    /// A failure of this image the request caused, less than `failure_ttl` ago.
    fn remembered_failure(&self, key: &RunKey) -> Option<Arc<BuildError>> {
        let (at, err) = lock(&self.failures).get(key).cloned()?;
        (at.elapsed() < self.settings.failure_ttl).then_some(err)
    }

    /// The running build of `request`, or a new one unless the queue is full. `commit_key` is
    /// the manifest key of a commit's image, known before the build.
    fn join_or_start(
        self: &Arc<Self>,
        request: &Request,
        commit_key: Option<String>,
    ) -> Result<(Arc<Run>, Build), Arc<BuildError>> {
        let key = request.key();
        let mut building = lock(&self.building);
        if let Some((build, _)) = building.get(&key)
            && let Some(run) = self.progress.get(&key)
        {
            return Ok((run, build.clone()));
        }
        self.admission
            .may_start()
            .map_err(|refusal| Arc::new(BuildError::Refused(refusal)))?;
        let run = self.progress.start(key.clone(), self.described(request));
        let finish = {
            let this = self.clone();
            let run = run.clone();
            let key = key.clone();
            move |result: &Result<Built, Arc<BuildError>>| {
                match result {
                    Ok(built) => this.progress.finish(&run, built.event(), true),
                    Err(err) => {
                        METRICS.build_outcome(err.outcome());
                        if err.is_the_requests() {
                            lock(&this.failures).put(key.clone(), (Instant::now(), err.clone()));
                        }
                        this.progress
                            .finish(&run, failed_event(err, &run.package_set), true);
                    }
                }
                lock(&this.building).remove(&key);
            }
        };
        let this = self.clone();
        let task_run = run.clone();
        let task_request = request.clone();
        let (build, abort) = spawn_build(
            async move { this.run_build(&task_run, &task_request, commit_key).await },
            finish,
        );
        building.insert(key, (build.clone(), abort));
        Ok((run, build))
    }

    /// One build, from the package set to a stored image, telling `run` how it goes. An image
    /// of a commit found in storage needs no place; anything else waits for one, and holds the
    /// Nix store against collection until its layers are packed.
    async fn run_build(
        &self,
        run: &Arc<Run>,
        request: &Request,
        commit_key: Option<String>,
    ) -> Result<Built, BuildError> {
        if let Some(key) = &commit_key
            && let Some(built) = self.stored(key).await?
        {
            self.remember(key, &built.image);
            return Ok(built);
        }
        let _place = self
            .admission
            .admit(Some(run.clone()))
            .await
            .map_err(|e| BuildError::Panicked(e.to_string()))?;
        let _store = self.collector.hold().await;
        let built = self.build_held(run, request, commit_key).await;
        self.collector.check_soon();
        built
    }
}

/// `key` when `request` pins a commit: a commit's key is known before its build, a path's only
/// from the build's own evaluation.
fn commit_only(request: &Request, key: Option<String>) -> Option<String> {
    key.filter(|_| matches!(request.pin, Pin::Commit { .. }))
}

/// The last event of a failed build.
pub(super) fn failed_event(err: &BuildError, package_set: &str) -> Event {
    match err {
        BuildError::Nix(nix) => Event::Failed {
            reason: nix.reason_code().unwrap_or("error"),
            packages: nix.packages().to_vec(),
            message: nix.describe(package_set),
            log: nix.log_tail(),
        },
        other => Event::Failed {
            reason: "error",
            packages: Vec::new(),
            message: other.public_message(),
            log: String::new(),
        },
    }
}

/// Runs `build` in a task of its own (a client that goes away does not cancel it), shared by
/// everyone who awaits it; `finish` sees the result before any waiter does. A panic in the
/// build becomes [`BuildError::Panicked`] for `finish` and every waiter: the next request builds
/// again instead of waiting on a dead task.
fn spawn_build(
    build: impl Future<Output = Result<Built, BuildError>> + Send + 'static,
    finish: impl FnOnce(&Result<Built, Arc<BuildError>>) + Send + 'static,
) -> (Build, tokio::task::AbortHandle) {
    let task = tokio::spawn(async move {
        let result = match std::panic::AssertUnwindSafe(build).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                let message = crate::sync::panic_message(panic.as_ref());
                tracing::error!(panic = %message, "an image build panicked");
                Err(BuildError::Panicked(message))
            }
        }
        .map_err(Arc::new);
        finish(&result);
        result.map(|built| built.image)
    });
    let abort = task.abort_handle();
    let build = async move {
        task.await.unwrap_or_else(|join| {
            // Panics are caught in the task: only cancellation (at shutdown) is left.
            Err(Arc::new(if join.is_cancelled() {
                BuildError::Cancelled
            } else {
                BuildError::Panicked(join.to_string())
            }))
        })
    }
    .boxed()
    .shared();
    (build, abort)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn a_panicking_build_is_an_error_for_every_waiter_and_is_cleaned_up() {
        let cleaned = Arc::new(AtomicBool::new(false));
        let flag = cleaned.clone();
        let (build, _) = spawn_build(
            async {
                panic!("boom");
                #[allow(unreachable_code)]
                Err(BuildError::Panicked(String::new()))
            },
            move |result: &Result<Built, Arc<BuildError>>| {
                flag.store(result.is_err(), Ordering::SeqCst)
            },
        );
        let (first, second) = tokio::join!(build.clone(), build);
        for result in [first, second] {
            let err = result.expect_err("a panicking build fails");
            match err.as_ref() {
                BuildError::Panicked(message) => assert_eq!(message, "boom"),
                other => panic!("not a panic error: {other:?}"),
            }
        }
        assert!(
            cleaned.load(Ordering::SeqCst),
            "finish did not see the failure"
        );
    }
}
