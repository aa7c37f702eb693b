//! What each build is doing and did, for the build pages and the builds API. A build publishes
//! its phases as events: a short history (progress updates of one phase replace each other) that
//! any number of readers follow live, keyed by the image's packages, the pinned package set and
//! the platform.
//! A bounded number of finished builds keep their events, the index page's "recent builds".

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::watch;

use crate::image::{ImageName, Platform, Setup};
use crate::manifest::Compression;
use crate::source::Pin;
use crate::sync::lock;

/// Finished builds kept in memory, most recently finished first out last.
pub const FINISHED_KEPT: NonZeroUsize = NonZeroUsize::new(200).expect("not zero");

/// Most events one build keeps. Progress updates of a phase replace each other, so a build has
/// about ten; past this, the oldest after the first are dropped.
const MAX_EVENTS: usize = 64;

/// Which build: the packages of an image (the order of the name's components does not matter)
/// and what else makes it (`nonroot`, a declaration), in one pinned package set, for one
/// platform, with its layers compressed one way.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RunKey {
    pin: Pin,
    packages: BTreeSet<String>,
    setup: Setup,
    platform: Platform,
    compression: Compression,
}

impl RunKey {
    pub fn new(pin: &Pin, name: &ImageName, platform: Platform, compression: Compression) -> Self {
        RunKey {
            pin: pin.clone(),
            packages: name.packages().clone(),
            setup: name.setup().clone(),
            platform,
            compression,
        }
    }
}

/// What a build page says a build is of, in words.
#[derive(Clone, Debug)]
pub struct Described {
    /// The image name that asks for this build alone (`shell/curl`, `arm64/shell/curl`).
    pub image: String,
    pub tag: String,
    /// The package set (`nixpkgs 1a2b3c4`).
    pub package_set: String,
    /// `linux/arm64`.
    pub platform: String,
    /// How the layers are compressed: `gzip` or `zstd`.
    pub compression: &'static str,
}

/// One step of a build, as the build page and `GET /api/v1/events/…` show it.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Event {
    /// The build was asked for.
    Started {
        image: String,
        tag: String,
        package_set: String,
        platform: String,
        compression: &'static str,
    },
    /// Waiting for a place (`NIXERY_MAX_BUILDS` builds are running): number `position` of the
    /// `waiting` builds in the queue.
    Queued { position: usize, waiting: usize },
    /// The package set is at hand (a commit's tree fetched, or the path).
    Source { package_set: String },
    /// Nix evaluated the image to the derivation that builds it.
    Evaluated { derivation: String },
    /// nix-build at work: derivations built of those it has to build, the one building now,
    /// and store paths fetched from a binary cache.
    Derivations {
        done: usize,
        total: usize,
        current: Option<String>,
        fetched: usize,
    },
    /// nix-build finished: the image's closure.
    Built { paths: usize, bytes: u64 },
    /// Layers packed (or found packed) of the image's layers, and their compressed bytes.
    Layers {
        done: usize,
        total: usize,
        bytes: u64,
    },
    /// The configuration and manifests are stored: the image can be pulled.
    Stored { blobs: usize },
    /// The image: its (Docker) manifest digest and layers. `cached` says where it was found
    /// when it was not built now (`memory` or `storage`).
    Done {
        digest: String,
        cached: Option<&'static str>,
        layers: Vec<LayerSummary>,
    },
    /// No image: why (`reason` as in the registry error's detail), in a sentence, and the tail
    /// of Nix's log.
    Failed {
        reason: &'static str,
        packages: Vec<String>,
        message: String,
        log: String,
    },
}

impl Event {
    fn phase(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::Queued { .. } => "queued",
            Event::Source { .. } => "source",
            Event::Evaluated { .. } => "evaluated",
            Event::Derivations { .. } => "derivations",
            Event::Built { .. } => "built",
            Event::Layers { .. } => "layers",
            Event::Stored { .. } => "stored",
            Event::Done { .. } => "done",
            Event::Failed { .. } => "failed",
        }
    }

    /// The event in words, as the build page shows it (one wording for the page and its script).
    pub fn text(&self) -> String {
        match self {
            Event::Started { image, tag, .. } => format!("{image}:{tag} asked for"),
            Event::Queued { position, waiting } => {
                format!("number {position} of {waiting} waiting for a place")
            }
            Event::Source { package_set } => package_set.clone(),
            Event::Evaluated { derivation } => derivation
                .rsplit('/')
                .next()
                .and_then(|file| file.get(33..))
                .unwrap_or(derivation)
                .to_owned(),
            Event::Derivations {
                done,
                total,
                current,
                fetched,
            } => {
                let mut text = match (total, current) {
                    (0, _) => "nothing to build, all in the store".to_owned(),
                    (total, Some(current)) => {
                        format!("{done} of {total} built, building {current}")
                    }
                    (total, None) => format!("{done} of {total} built"),
                };
                if *fetched > 0 {
                    text.push_str(&format!(", {fetched} fetched"));
                }
                text
            }
            Event::Built { paths, bytes } => {
                format!("{paths} store paths, {}", human_bytes(*bytes))
            }
            Event::Layers { done, total, bytes } => {
                format!("{done} of {total} packed, {}", human_bytes(*bytes))
            }
            Event::Stored { .. } => "configuration, manifests and SBOMs stored".to_owned(),
            Event::Done { digest, cached, .. } => match cached {
                Some(level) => format!("{digest} (found in {level})"),
                None => digest.clone(),
            },
            Event::Failed { message, .. } => message.clone(),
        }
    }

    /// Whether a later event of the same phase replaces this one in the history.
    fn is_progress(&self) -> bool {
        matches!(
            self,
            Event::Queued { .. } | Event::Derivations { .. } | Event::Layers { .. }
        )
    }
}

/// `1.5 MiB`: a size for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// One layer of a finished image.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSummary {
    pub digest: String,
    pub size: u64,
    /// Its store paths (none for the image root layer; unknown for an image found cached).
    pub paths: Option<Vec<String>>,
    /// Whether this build packed it (`false`: it was stored already, shared with an image built
    /// before); unknown for an image found cached.
    pub new: Option<bool>,
}

/// An event as published: its number in the build (readers resume after the last they saw),
/// its phase, and its JSON (made once, however many read it).
#[derive(Clone, Debug)]
pub struct Published {
    pub seq: u64,
    pub phase: &'static str,
    /// The event in words ([`Event::text`]).
    pub text: Arc<str>,
    pub json: Arc<str>,
}

/// Where a build is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Done,
    Failed,
}

/// One build, running or finished.
pub struct Run {
    key: RunKey,
    /// The image name as first asked for (`shell/curl`), and the tag.
    pub image: String,
    pub tag: String,
    /// The package set in words (`nixpkgs 1a2b3c4`).
    pub package_set: String,
    /// `linux/amd64`.
    pub platform: String,
    /// `gzip` or `zstd`.
    pub compression: &'static str,
    pub started_at: SystemTime,
    started: Instant,
    state: Mutex<State>,
    /// The number of the last event, for readers waiting on the next.
    latest: watch::Sender<u64>,
}

struct State {
    events: VecDeque<Published>,
    next_seq: u64,
    status: Status,
    digest: Option<String>,
    finished_at: Option<SystemTime>,
}

impl crate::admission::Waiter for Run {
    fn placed(&self, position: usize, waiting: usize) {
        self.emit(Event::Queued { position, waiting });
    }
}

impl Run {
    fn new(key: RunKey, described: Described) -> Arc<Run> {
        let Described {
            image,
            tag,
            package_set,
            platform,
            compression,
        } = described;
        let run = Arc::new(Run {
            key,
            started_at: SystemTime::now(),
            started: Instant::now(),
            state: Mutex::new(State {
                events: VecDeque::new(),
                next_seq: 1,
                status: Status::Running,
                digest: None,
                finished_at: None,
            }),
            latest: watch::Sender::new(0),
            image: image.clone(),
            tag: tag.clone(),
            package_set: package_set.clone(),
            platform: platform.clone(),
            compression,
        });
        run.emit(Event::Started {
            image,
            tag,
            package_set,
            platform,
            compression,
        });
        run
    }

    /// Publishes `event`; nothing once the build has finished.
    pub fn emit(&self, event: Event) {
        let mut state = lock(&self.state);
        if state.status != Status::Running {
            return;
        }
        match &event {
            Event::Done { digest, .. } => {
                state.status = Status::Done;
                state.digest = Some(digest.clone());
            }
            Event::Failed { .. } => state.status = Status::Failed,
            _ => {}
        }
        if state.status != Status::Running {
            state.finished_at = Some(SystemTime::now());
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let phase = event.phase();
        let text: Arc<str> = event.text().into();
        let mut json = serde_json::to_value(&event).unwrap_or_default();
        if let Some(object) = json.as_object_mut() {
            object.insert("seq".into(), seq.into());
            let elapsed = self.started.elapsed().as_millis() as u64;
            object.insert("elapsed_ms".into(), elapsed.into());
            object.insert("text".into(), text.to_string().into());
        }
        let published = Published {
            seq,
            phase,
            text,
            json: json.to_string().into(),
        };
        let replaces = event.is_progress() && state.events.back().is_some_and(|e| e.phase == phase);
        if replaces {
            state.events.pop_back();
        } else if state.events.len() >= MAX_EVENTS {
            state.events.remove(1);
        }
        state.events.push_back(published);
        drop(state);
        self.latest.send_replace(seq);
    }

    pub fn status(&self) -> Status {
        lock(&self.state).status
    }

    /// The manifest digest, once done.
    pub fn digest(&self) -> Option<String> {
        lock(&self.state).digest.clone()
    }

    pub fn finished_at(&self) -> Option<SystemTime> {
        lock(&self.state).finished_at
    }

    /// The events kept, oldest first.
    pub fn events(&self) -> Vec<Published> {
        lock(&self.state).events.iter().cloned().collect()
    }

    /// Waits until the build has finished.
    pub async fn finished(&self) {
        let mut latest = self.latest.subscribe();
        while self.status() == Status::Running {
            if latest.changed().await.is_err() {
                return;
            }
        }
    }

    /// The events after `seq`, and whether the build has finished.
    fn after(&self, seq: u64) -> (Vec<Published>, bool) {
        let state = lock(&self.state);
        let events = state
            .events
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect();
        (events, state.status != Status::Running)
    }

    /// Every event from the first kept, then each as it comes; ends after the last one.
    pub fn follow(self: Arc<Self>) -> impl Stream<Item = Published> + Send + 'static {
        let latest = self.latest.subscribe();
        futures::stream::unfold(
            (self, latest, 0u64, false),
            |(run, mut latest, seen, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    let (events, finished) = run.after(seen);
                    if let Some(last) = events.last() {
                        let seen = last.seq;
                        return Some((events, (run, latest, seen, finished)));
                    }
                    if finished || latest.changed().await.is_err() {
                        return None;
                    }
                }
            },
        )
        .flat_map(futures::stream::iter)
    }
}

/// Every build's events: running builds, and the finished ones kept.
pub struct Progress {
    running: Mutex<HashMap<RunKey, Arc<Run>>>,
    finished: Mutex<lru::LruCache<RunKey, Arc<Run>>>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            running: Mutex::default(),
            finished: Mutex::new(lru::LruCache::new(FINISHED_KEPT)),
        }
    }
}

impl Progress {
    /// A new running build of `key` (the caller makes sure there is one at a time).
    pub fn start(&self, key: RunKey, described: Described) -> Arc<Run> {
        let run = Run::new(key.clone(), described);
        lock(&self.running).insert(key, run.clone());
        run
    }

    /// Ends `run` with its last event (`Done` or `Failed`); it is kept among the finished
    /// builds if `keep`.
    pub fn finish(&self, run: &Arc<Run>, last: Event, keep: bool) {
        run.emit(last);
        if keep {
            lock(&self.finished).put(run.key.clone(), run.clone());
        }
        let mut running = lock(&self.running);
        if running.get(&run.key).is_some_and(|r| Arc::ptr_eq(r, run)) {
            running.remove(&run.key);
        }
    }

    /// The build of `key`: the running one, else the last finished one kept.
    pub fn get(&self, key: &RunKey) -> Option<Arc<Run>> {
        if let Some(run) = lock(&self.running).get(key) {
            return Some(run.clone());
        }
        lock(&self.finished).peek(key).cloned()
    }

    /// A build that finished without being kept (an image found in memory), ready to read.
    pub fn finished_now(key: &RunKey, described: Described, last: Event) -> Arc<Run> {
        let run = Run::new(key.clone(), described);
        run.emit(last);
        run
    }

    /// Up to `n` builds, running ones first (newest first), then the most recently finished.
    pub fn recent(&self, n: usize) -> Vec<Arc<Run>> {
        let mut running: Vec<Arc<Run>> = lock(&self.running).values().cloned().collect();
        running.sort_by_key(|run| std::cmp::Reverse(run.started));
        let finished = lock(&self.finished);
        running
            .into_iter()
            .chain(finished.iter().map(|(_, run)| run.clone()))
            .take(n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RunKey {
        RunKey::new(
            &Pin::Path("/pkgs".into()),
            &"hello".parse().unwrap(),
            "linux/amd64".parse().unwrap(),
            Compression::Gzip,
        )
    }

    fn described() -> Described {
        Described {
            image: "hello".into(),
            tag: "latest".into(),
            package_set: "set".into(),
            platform: "linux/amd64".into(),
            compression: "gzip",
        }
    }

    fn layers(done: usize) -> Event {
        Event::Layers {
            done,
            total: 3,
            bytes: done as u64 * 10,
        }
    }

    #[tokio::test]
    async fn readers_get_every_phase_once_and_the_stream_ends_after_the_last() {
        let progress = Progress::default();
        let run = progress.start(key(), described());
        let early = run.clone().follow();
        run.emit(layers(1));
        run.emit(layers(2));
        let reader = tokio::spawn(early.map(|e| e.phase).collect::<Vec<_>>());
        tokio::task::yield_now().await;
        run.emit(layers(3));
        progress.finish(
            &run,
            Event::Done {
                digest: "sha256:x".into(),
                cached: None,
                layers: Vec::new(),
            },
            true,
        );
        let phases = reader.await.unwrap();
        assert_eq!(phases.first(), Some(&"started"));
        assert_eq!(phases.last(), Some(&"done"));
        // A late reader sees the history with progress updates folded into the last one.
        let late: Vec<Published> = run.clone().follow().collect().await;
        let phases: Vec<_> = late.iter().map(|e| e.phase).collect();
        assert_eq!(phases, ["started", "layers", "done"]);
        assert!(late[1].json.contains("\"done\":3"), "{}", late[1].json);
        assert!(late.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(run.status(), Status::Done);
        assert!(Arc::ptr_eq(&progress.get(&key()).unwrap(), &run));
    }

    #[test]
    fn events_after_the_end_are_ignored_and_history_is_bounded() {
        let progress = Progress::default();
        let run = progress.start(key(), described());
        for _ in 0..2 * MAX_EVENTS {
            run.emit(Event::Stored { blobs: 1 });
        }
        assert_eq!(run.events().len(), MAX_EVENTS);
        assert_eq!(run.events()[0].phase, "started");
        progress.finish(
            &run,
            Event::Failed {
                reason: "build_failed",
                packages: vec![],
                message: "no".into(),
                log: String::new(),
            },
            false,
        );
        run.emit(Event::Stored { blobs: 2 });
        assert_eq!(run.events().last().unwrap().phase, "failed");
        assert!(progress.get(&key()).is_none(), "an unkept run is gone");
    }
}
