//! Single flight, failure memory, admission and the queue, cancellation.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::fake::Failure;
use super::{Harness, until};
use crate::admission::Refusal;
use crate::builder::events::Status;
use crate::builder::{BuildError, Builder, Image, Request};
use crate::nix::NixError;

/// `request`'s image, asked for in a task of its own.
fn spawn_image(
    builder: &Arc<Builder>,
    request: &Request,
) -> tokio::task::JoinHandle<Result<Arc<Image>, Arc<BuildError>>> {
    let (builder, request) = (builder.clone(), request.clone());
    tokio::spawn(async move { builder.image(&request).await })
}

fn is_not_found(err: &BuildError) -> bool {
    matches!(err, BuildError::Nix(nix) if matches!(nix.as_ref(), NixError::NotFound(_)))
}

#[tokio::test]
async fn concurrent_requests_for_one_image_share_one_build() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let request = harness.request("hello");
    harness.nix.hold();
    let waiting: Vec<_> = (0..8).map(|_| spawn_image(&builder, &request)).collect();
    until("the build reaches Nix", || {
        harness.nix.started.load(Ordering::SeqCst) == 1
    })
    .await;
    harness.nix.release();
    let mut digests = Vec::new();
    for waiter in waiting {
        let image = waiter.await.expect("no panic").expect("built");
        digests.push(
            image
                .manifest(crate::manifest::Format::Docker)
                .digest
                .clone(),
        );
    }
    digests.dedup();
    assert_eq!(digests.len(), 1, "every waiter got the same image");
    assert_eq!(harness.nix.builds(), 1);
    assert_eq!(harness.nix.evaluations(), 1);
}

#[tokio::test]
async fn a_started_build_is_joined_by_a_pull() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let request = harness.request("hello");
    harness.nix.hold();
    let run = builder.start(&request).expect("started");
    assert_eq!(run.status(), Status::Running);
    let again = builder.start(&request).expect("joined");
    assert!(Arc::ptr_eq(&run, &again), "a second start joins the first");
    let pull = spawn_image(&builder, &request);
    harness.nix.release();
    pull.await.expect("no panic").expect("built");
    assert_eq!(run.status(), Status::Done);
    assert_eq!(harness.nix.builds(), 1);
}

#[tokio::test]
async fn an_image_built_is_answered_from_memory_without_nix() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let request = harness.request("hello");
    let first = builder.image(&request).await.expect("built");
    let second = builder.image(&request).await.expect("from memory");
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(harness.nix.builds(), 1);
    assert_eq!(harness.nix.evaluations(), 1, "the evaluation is fresh");
    let run = builder.build_of(&request).expect("a build to show");
    assert_eq!(run.status(), Status::Done);
}

#[tokio::test]
async fn a_missing_package_is_answered_from_memory_within_failure_ttl() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let request = harness.request("missing");
    harness.nix.fail(Some(Failure::NotFound));
    let first = builder.image(&request).await.expect_err("not found");
    assert!(is_not_found(&first));
    let second = builder.image(&request).await.expect_err("remembered");
    assert!(
        Arc::ptr_eq(&first, &second),
        "the same failure, from memory"
    );
    assert_eq!(harness.nix.builds(), 1);
}

#[tokio::test]
async fn a_remembered_failure_starts_no_build() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let request = harness.request("missing");
    harness.nix.fail(Some(Failure::NotFound));
    builder.image(&request).await.expect_err("not found");
    let run = builder.start(&request).expect("a finished build");
    assert_eq!(run.status(), Status::Failed);
    assert_eq!(harness.nix.builds(), 1);
}

#[tokio::test]
async fn a_failure_is_forgotten_after_failure_ttl() {
    let mut harness = Harness::new(4, 4);
    harness.failure_ttl = Duration::from_millis(20);
    let builder = harness.builder();
    let request = harness.request("hello");
    harness.nix.fail(Some(Failure::NotFound));
    builder.image(&request).await.expect_err("not found");
    builder.image(&request).await.expect_err("remembered");
    assert_eq!(harness.nix.builds(), 1);
    tokio::time::sleep(Duration::from_millis(30)).await;
    harness.nix.fail(None);
    builder.image(&request).await.expect("built once forgotten");
    assert_eq!(harness.nix.builds(), 2);
}

#[tokio::test]
async fn a_fault_of_nix_is_not_remembered() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let request = harness.request("hello");
    harness.nix.fail(Some(Failure::Fault));
    let err = builder.image(&request).await.expect_err("a fault");
    assert!(!err.is_the_requests());
    harness.nix.fail(None);
    builder
        .image(&request)
        .await
        .expect("built on the next request");
    assert_eq!(harness.nix.builds(), 2);
}

#[tokio::test]
async fn a_storage_failure_is_not_remembered() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    let request = harness.request("hello");
    harness.storage.refusing.store(true, Ordering::SeqCst);
    let err = builder.image(&request).await.expect_err("storage refused");
    assert!(matches!(err.as_ref(), BuildError::Storage(_)), "{err:?}");
    harness.storage.refusing.store(false, Ordering::SeqCst);
    builder
        .image(&request)
        .await
        .expect("built on the next request");
    assert_eq!(harness.nix.builds(), 2);
}

#[tokio::test]
async fn a_full_queue_refuses_new_builds() {
    let harness = Harness::new(1, 0);
    let builder = harness.builder();
    harness.nix.hold();
    let first = spawn_image(&builder, &harness.request("hello"));
    until("the first build has the place", || {
        harness.nix.started.load(Ordering::SeqCst) == 1
    })
    .await;
    let refused = builder
        .image(&harness.request("curl"))
        .await
        .expect_err("no place, no queue");
    assert!(matches!(
        refused.as_ref(),
        BuildError::Refused(Refusal::QueueFull)
    ));
    let refused = builder.start(&harness.request("curl"));
    assert!(refused.is_err_and(|err| matches!(*err, BuildError::Refused(Refusal::QueueFull))));
    harness.nix.release();
    first.await.expect("no panic").expect("built");
    assert_eq!(harness.nix.builds(), 1);
}

#[tokio::test]
async fn a_build_waits_in_the_queue_for_a_place() {
    let harness = Harness::new(1, 1);
    let builder = harness.builder();
    harness.nix.hold();
    let first = spawn_image(&builder, &harness.request("hello"));
    until("the first build has the place", || {
        harness.nix.started.load(Ordering::SeqCst) == 1
    })
    .await;
    let queued = builder.start(&harness.request("curl")).expect("queued");
    until("the second build is queued", || {
        queued.events().iter().any(|e| e.phase == "queued")
    })
    .await;
    let refused = builder.start(&harness.request("jq"));
    assert!(refused.is_err_and(|err| matches!(*err, BuildError::Refused(Refusal::QueueFull))));
    harness.nix.release();
    first.await.expect("no panic").expect("built");
    builder
        .image(&harness.request("curl"))
        .await
        .expect("built after waiting");
    assert_eq!(harness.nix.builds(), 2);
}

#[tokio::test]
async fn cancel_builds_stops_every_running_build() {
    let harness = Harness::new(4, 4);
    let builder = harness.builder();
    assert_eq!(builder.cancel_builds(), 0, "nothing runs yet");
    harness.nix.hold();
    let first = spawn_image(&builder, &harness.request("hello"));
    let second = spawn_image(&builder, &harness.request("curl"));
    until("both builds reach Nix", || {
        harness.nix.started.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(builder.cancel_builds(), 2);
    for waiter in [first, second] {
        let err = waiter.await.expect("no panic").expect_err("cancelled");
        assert!(matches!(err.as_ref(), BuildError::Cancelled), "{err:?}");
    }
    assert_eq!(harness.nix.builds(), 0, "no build got past Nix");
}
