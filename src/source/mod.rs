//! Where packages come from: a package set on disk, a nixpkgs channel, or a git repository. A
//! request's tag becomes a [`Pin`] (the commit an image is built from, or the path), and a pin
//! becomes a [`Tree`] on disk that Nix imports.
//!
//! Moving names (a channel, a branch, `latest`) are resolved to a commit at most once per
//! `NIXERY_SOURCE_TTL`, shared by all requests: between resolutions no request touches the
//! network. Each commit's tree is fetched at most once however many builds want it.

mod channel;
mod git;
mod pins;
mod tree;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures::FutureExt;
use regex::Regex;

use crate::image::Tag;
use crate::storage::Storage;
use crate::ttl::Ttl;
use channel::Channels;
use git::{Git, Listing};
use pins::Pins;
use tree::Trees;

pub use pins::{AllowedCommits, AllowedCommitsError, CommitPins};
pub use tree::Tree;

/// Where nixos.org publishes its channels.
pub const DEFAULT_CHANNEL_URL: &str = "https://channels.nixos.org";

/// Where GitHub serves the tree of a nixpkgs commit.
pub const DEFAULT_TARBALL_URL: &str = "https://github.com/NixOS/nixpkgs/archive/{commit}.tar.gz";

/// How long resolving a name (asking a channel or `git ls-remote`) may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Tags of these forms are reserved for documents attached to an image: `sha256-<hex>` (the
/// referrers tag schema), `sha256-<hex>.sig` and `sha256-<hex>.att` (cosign's signatures and
/// attestations).
static RESERVED_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^sha256-[0-9a-f]{64}(\.sig|\.att)?$").expect("valid regex"));

/// Tags that name a nixpkgs channel.
static CHANNEL_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(nixos|nixpkgs)-[a-zA-Z0-9._-]+$").expect("valid regex"));

/// The configured source, as its setting gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `NIXERY_PKGS_PATH`: a package set on disk; tags do not matter.
    Path(PathBuf),
    /// `NIXERY_CHANNEL`: a nixpkgs channel's name.
    Channel(String),
    /// `NIXERY_PKGS_REPO`: a git URL or path.
    Git(String),
}

/// Everything that decides how sources are resolved and fetched.
pub struct Settings {
    pub origin: Origin,
    /// How long a resolved name is reused.
    pub ttl: Duration,
    /// Base URL of the channels (`<URL>/<channel>/git-revision`).
    pub channel_url: String,
    /// Tarball URL of a commit's tree, `{commit}` standing for the commit.
    pub tarball_url: String,
    /// Trees kept on disk.
    pub keep: usize,
    /// How long fetching one tree may take.
    pub fetch_timeout: Duration,
    /// Which commits a 40-hex tag may name (NIXERY_COMMIT_PINS).
    pub commit_pins: CommitPins,
    /// Commits served whatever `commit_pins` says (NIXERY_ALLOWED_COMMITS).
    pub allowed_commits: AllowedCommits,
    /// Where the heads seen are recorded, so that restarts and replicas share them (none: they
    /// are remembered in memory only).
    pub records: Option<Arc<dyn Storage>>,
}

/// Why a tag gave no package set.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "tag '{0}' is reserved: tags of the forms sha256-<hex>, sha256-<hex>.sig and sha256-<hex>.att name documents attached to an image, not packages"
    )]
    Reserved(String),
    #[error(
        "tag '{tag}' names nothing here: this registry follows the nixpkgs channel {channel}, so a tag is `latest` (that channel), another channel's name (nixos-…, nixpkgs-…) or a full 40-character commit"
    )]
    NotAChannelTag { tag: String, channel: String },
    #[error("{url} has no tag or branch named '{reference}'")]
    UnknownRef { reference: String, url: String },
    #[error("there is no channel '{channel}' at {url}")]
    UnknownChannel { channel: String, url: String },
    #[error("commit {commit} does not exist in {url}")]
    UnknownCommit { commit: Commit, url: String },
    #[error(
        "commit {commit} is not one this registry serves: it serves the commits it has seen at the head of {heads}, and those its operator allows (by listing them in NIXERY_ALLOWED_COMMITS, or all of them with NIXERY_COMMIT_PINS=any)"
    )]
    NotServed { commit: Commit, heads: String },
    #[error("the package source {url} cannot be reached: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("commit {commit} of {url} is not a Nix package set: {detail}")]
    NotAPackageSet {
        commit: Commit,
        url: String,
        detail: String,
    },
    #[error("fetching commit {commit} from {url} failed: {detail}")]
    Fetch {
        commit: Commit,
        url: String,
        detail: String,
    },
    #[error("the sources directory cannot be used: {0}")]
    Disk(String),
}

impl SourceError {
    /// Whether the source could not be asked at all (then a name resolved before still serves).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, SourceError::Unreachable { .. })
    }
}

/// A full git commit: 40 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Commit(String);

impl Commit {
    /// `text` as a commit, if it is 40 lowercase hex digits (shorter ones are refs, not commits).
    pub fn parse(text: &str) -> Option<Commit> {
        (text.len() == 40 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Commit(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 7 hex digits, as git abbreviates.
    pub fn short(&self) -> &str {
        self.0.get(..7).unwrap_or(&self.0)
    }
}

impl fmt::Display for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which package set one request builds from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pin {
    /// The package set at a path (whatever it holds when Nix evaluates it).
    Path(PathBuf),
    /// A commit's tree, from `source` (the repository or channel URL, credentials removed).
    Commit { commit: Commit, source: String },
}

/// Where packages come from, for the whole server.
pub struct Sources {
    backend: Backend,
    trees: Arc<Trees>,
    /// Which commits clients may name, and the heads seen.
    pins: Arc<Pins>,
}

enum Backend {
    Path(PathBuf),
    Channel {
        channel: String,
        channels: Arc<Channels>,
        revisions: Ttl<String, Option<Commit>, SourceError>,
    },
    Git {
        git: Arc<Git>,
        listing: Ttl<(), Arc<Listing>, SourceError>,
    },
}

impl Sources {
    /// Sources as `settings` say, keeping trees and git mirrors under `dir`.
    pub fn open(settings: Settings, dir: &Path) -> std::io::Result<Self> {
        let trees = Arc::new(Trees::open(dir, settings.keep)?);
        let fall_back: fn(&SourceError) -> bool = SourceError::is_unreachable;
        // Heads are recorded under the source that serves the commits: a channel's trees come
        // from the tarball URL.
        let scope = match &settings.origin {
            Origin::Path(path) => format!("path {}", path.display()),
            Origin::Channel(_) => format!(
                "channel {} tarball {}",
                redact(settings.channel_url.trim_end_matches('/')),
                redact(&settings.tarball_url)
            ),
            Origin::Git(url) => format!("git {}", redact(url)),
        };
        let pins = Arc::new(Pins::new(
            settings.commit_pins,
            settings.allowed_commits,
            settings.records,
            &scope,
        ));
        let backend = match settings.origin {
            Origin::Path(path) => Backend::Path(path),
            Origin::Channel(channel) => Backend::Channel {
                channel,
                channels: Arc::new(
                    Channels::new(
                        settings.channel_url,
                        settings.tarball_url,
                        RESOLVE_TIMEOUT,
                        settings.fetch_timeout,
                    )
                    .map_err(std::io::Error::other)?,
                ),
                revisions: Ttl::new(settings.ttl, fall_back),
            },
            Origin::Git(url) => Backend::Git {
                git: Arc::new(Git::new(
                    url,
                    &dir.join("git"),
                    RESOLVE_TIMEOUT,
                    settings.fetch_timeout,
                )),
                listing: Ttl::new(settings.ttl, fall_back),
            },
        };
        Ok(Sources {
            backend,
            trees,
            pins,
        })
    }

    /// What the source is, for the log.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Path(path) => format!("path {}", path.display()),
            Backend::Channel {
                channel, channels, ..
            } => format!("channel {}", channels.channel_url(channel)),
            Backend::Git { git, .. } => format!("git {}", git.source()),
        }
    }

    /// The package set's name, as an SBOM names the supplier of its packages: `nixpkgs` for a
    /// channel, the repository's name (`packages` of `https://host/org/packages.git`), or the
    /// directory's (`offline-pkgs`).
    pub fn set_name(&self) -> String {
        let last = |text: &str| {
            let last = text
                .trim_end_matches('/')
                .rsplit(['/', ':'])
                .next()
                .unwrap_or(text);
            last.strip_suffix(".git").unwrap_or(last).to_owned()
        };
        match &self.backend {
            Backend::Path(path) => last(&path.to_string_lossy()),
            Backend::Channel { .. } => "nixpkgs".to_owned(),
            Backend::Git { git, .. } => last(git.source()),
        }
    }

    /// The package set `pin` names, in words for the person pulling: `nixpkgs 1a2b3c4` (a
    /// channel's commit), `<repository> 1a2b3c4`, or `the package set <path>`.
    pub fn describe_pin(&self, pin: &Pin) -> String {
        match (pin, &self.backend) {
            (Pin::Path(path), _) => format!("the package set {}", path.display()),
            (Pin::Commit { commit, .. }, Backend::Channel { .. }) => {
                format!("nixpkgs {}", commit.short())
            }
            (Pin::Commit { commit, source }, _) => format!("{source} {}", commit.short()),
        }
    }

    /// The package list the channel publishes, when `pin` is the configured channel's current
    /// commit (the list describes only the current release); `None` for any other pin, or when
    /// the list cannot be had (logged).
    pub async fn packages_json(&self, pin: &Pin) -> Option<Vec<u8>> {
        let (
            Pin::Commit { commit, .. },
            Backend::Channel {
                channel, channels, ..
            },
        ) = (pin, &self.backend)
        else {
            return None;
        };
        let current = || async { channels.revision(channel).await.ok().flatten() };
        if current().await.as_ref() != Some(commit) {
            return None;
        }
        let bytes = match channels.packages_json(channel).await {
            Ok(bytes) => bytes?,
            Err(e) => {
                tracing::warn!(error = %e, "the channel's packages.json.br cannot be had; evaluating instead");
                return None;
            }
        };
        // The channel may have moved on while the list was downloaded.
        (current().await.as_ref() == Some(commit)).then_some(bytes)
    }

    /// The package set `tag` stands for, refused when the tag is a commit clients may not name
    /// (see [`Sources::admit`]).
    pub async fn pin(&self, tag: &Tag) -> Result<Pin, SourceError> {
        self.admit(tag).await?;
        self.resolve(tag).await
    }

    /// Whether a client may name `tag`. A name (`latest`, a branch or tag, a channel) always:
    /// what it resolves to is a head. A 40-hex commit when `NIXERY_COMMIT_PINS` allows it: under
    /// `seen`, a commit listed in `NIXERY_ALLOWED_COMMITS` or seen at a head before, else one
    /// the source has at a head now (asked at most once per TTL). Nothing is fetched to decide.
    pub async fn admit(&self, tag: &Tag) -> Result<(), SourceError> {
        match Commit::parse(tag.as_str()) {
            Some(commit) => self.admit_commit(&commit).await,
            None => Ok(()),
        }
    }

    async fn admit_commit(&self, commit: &Commit) -> Result<(), SourceError> {
        if matches!(self.backend, Backend::Path(_)) || self.pins.allows(commit).await {
            return Ok(());
        }
        let (at_a_head, heads) = match &self.backend {
            Backend::Path(_) => return Ok(()),
            Backend::Channel {
                channel,
                channels,
                revisions,
            } => (
                self.channel_head(channels, revisions, channel)
                    .await?
                    .as_ref()
                    == Some(commit),
                format!("the channel {}", channels.channel_url(channel)),
            ),
            Backend::Git { git, listing } => (
                heads(&*self.listing(git, listing).await?).any(|head| head == commit),
                format!("a branch or tag of {}", git.source()),
            ),
        };
        if at_a_head {
            Ok(())
        } else {
            Err(SourceError::NotServed {
                commit: commit.clone(),
                heads,
            })
        }
    }

    /// Reads `NIXERY_ALLOWED_COMMITS` again (on SIGHUP): the commits it lists now replace the
    /// old ones, unless it is malformed (then the old ones stay). How many it lists; `None`
    /// without a file.
    pub fn reload_allowed_commits(&self) -> Result<Option<usize>, AllowedCommitsError> {
        self.pins.reload()
    }

    /// The package set `tag` stands for, whether or not clients may name it: for pulls, whose
    /// image may be stored already (the image service admits the tag before it fetches
    /// anything, and [`Sources::tree`] refuses a commit not admitted).
    pub async fn resolve(&self, tag: &Tag) -> Result<Pin, SourceError> {
        let tag = tag.as_str();
        if RESERVED_TAG.is_match(tag) {
            return Err(SourceError::Reserved(tag.to_owned()));
        }
        match &self.backend {
            Backend::Path(path) => Ok(Pin::Path(path.clone())),
            Backend::Channel {
                channel,
                channels,
                revisions,
            } => {
                if let Some(commit) = Commit::parse(tag) {
                    let source = channels.tarball_url(&commit);
                    return Ok(Pin::Commit { commit, source });
                }
                let name = match tag {
                    "latest" => channel.clone(),
                    _ if CHANNEL_TAG.is_match(tag) => tag.to_owned(),
                    _ => {
                        return Err(SourceError::NotAChannelTag {
                            tag: tag.to_owned(),
                            channel: channel.clone(),
                        });
                    }
                };
                let commit = self
                    .channel_head(channels, revisions, &name)
                    .await?
                    .ok_or_else(|| SourceError::UnknownChannel {
                        url: channels.channel_url(&name),
                        channel: name.clone(),
                    })?;
                Ok(Pin::Commit {
                    commit,
                    source: channels.channel_url(&name),
                })
            }
            Backend::Git { git, listing } => {
                let source = git.source().to_owned();
                if let Some(commit) = Commit::parse(tag) {
                    return Ok(Pin::Commit { commit, source });
                }
                let listing = self.listing(git, listing).await?;
                let commit = match tag {
                    "latest" => listing.head.as_ref(),
                    _ => listing.tags.get(tag).or_else(|| listing.branches.get(tag)),
                };
                match commit {
                    Some(commit) => Ok(Pin::Commit {
                        commit: commit.clone(),
                        source,
                    }),
                    None => Err(SourceError::UnknownRef {
                        reference: if tag == "latest" { "HEAD" } else { tag }.to_owned(),
                        url: source,
                    }),
                }
            }
        }
    }

    /// The tags worth listing, sorted: `latest`, and for a git source every tag and branch whose
    /// name is a valid image tag.
    pub async fn tags(&self) -> Result<Vec<String>, SourceError> {
        let mut tags = BTreeSet::from(["latest".to_owned()]);
        if let Backend::Git { git, listing } = &self.backend {
            let listing = self.listing(git, listing).await?;
            tags.extend(
                listing
                    .tags
                    .keys()
                    .chain(listing.branches.keys())
                    .filter(|name| name.parse::<Tag>().is_ok() && !RESERVED_TAG.is_match(name))
                    .cloned(),
            );
        }
        Ok(tags.into_iter().collect())
    }

    /// The repository's refs, listed at most once per TTL; every head of each listing is
    /// recorded as seen.
    async fn listing(
        &self,
        git: &Arc<Git>,
        listing: &Ttl<(), Arc<Listing>, SourceError>,
    ) -> Result<Arc<Listing>, SourceError> {
        let git = git.clone();
        let pins = self.pins.clone();
        listing
            .get(&(), move || {
                async move {
                    let listing = git.list().await?;
                    pins.record(heads(&listing)).await;
                    Ok(Arc::new(listing))
                }
                .boxed()
            })
            .await
            .map_err(unshare)
    }

    /// The commit channel `name` is at, asked at most once per TTL; each answer is recorded as
    /// a head seen. `None` when there is no such channel.
    async fn channel_head(
        &self,
        channels: &Arc<Channels>,
        revisions: &Ttl<String, Option<Commit>, SourceError>,
        name: &str,
    ) -> Result<Option<Commit>, SourceError> {
        let resolve = {
            let channels = channels.clone();
            let pins = self.pins.clone();
            let name = name.to_owned();
            move || {
                async move {
                    let commit = channels.revision(&name).await?;
                    pins.record(commit.as_ref()).await;
                    Ok(commit)
                }
                .boxed()
            }
        };
        revisions
            .get(&name.to_owned(), resolve)
            .await
            .map_err(unshare)
    }

    /// The tree of `pin` on disk, fetched now if it is not there yet; it stays on disk while the
    /// returned lease lives. A commit clients may not name is refused, whoever asks.
    pub async fn tree(&self, pin: &Pin) -> Result<Tree, SourceError> {
        let commit = match pin {
            Pin::Path(path) => return Ok(Tree::fixed(path)),
            Pin::Commit { commit, .. } => commit.clone(),
        };
        self.admit_commit(&commit).await?;
        match &self.backend {
            Backend::Path(_) => Err(SourceError::Disk(format!(
                "commit {commit} asked of a path source"
            ))),
            Backend::Channel { channels, .. } => {
                let channels = channels.clone();
                let fetch_commit = commit.clone();
                let source = channels.tarball_url(&commit);
                self.trees
                    .get(&commit, &source, move |archive| {
                        async move { channels.download(&fetch_commit, &archive).await }.boxed()
                    })
                    .await
            }
            Backend::Git { git, .. } => {
                let git = git.clone();
                let fetch_commit = commit.clone();
                let source = git.source().to_owned();
                self.trees
                    .get(&commit, &source, move |archive| {
                        async move { git.archive(&fetch_commit, &archive).await }.boxed()
                    })
                    .await
            }
        }
    }
}

/// Every commit a listing names: `HEAD`, the branches', the tags'.
fn heads(listing: &Listing) -> impl Iterator<Item = &Commit> {
    listing
        .head
        .iter()
        .chain(listing.branches.values())
        .chain(listing.tags.values())
}

/// A shared resolution's error, for one caller.
fn unshare(err: Arc<SourceError>) -> SourceError {
    Arc::unwrap_or_clone(err)
}

/// `text` with the user names and passwords that URLs in it may carry (`https://user:token@host/…`)
/// removed, for labels, messages and logs. The user information is everything of the authority
/// (up to `/`, `?`, `#`, a space or a quote) before its last `@`, so an `@` written unencoded in a
/// password goes with it.
pub fn redact(text: &str) -> String {
    static USERINFO: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s'\x22]*@").expect("valid regex")
    });
    USERINFO.replace_all(text, "$scheme").into_owned()
}

/// An HTTP error in words, with its causes (reqwest's own message is only the outermost one, and
/// names the URL, which may carry credentials).
pub fn describe_http(err: &reqwest::Error) -> String {
    let mut text = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "could not connect"
    } else if err.is_redirect() {
        "too many redirects"
    } else {
        "the request failed"
    }
    .to_owned();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    #[test]
    fn only_full_lowercase_hashes_are_commits() {
        assert!(Commit::parse(&"a".repeat(40)).is_some());
        assert!(Commit::parse(&"a".repeat(39)).is_none());
        assert!(Commit::parse(&"A".repeat(40)).is_none());
        assert!(Commit::parse(&"g".repeat(40)).is_none());
        assert!(Commit::parse("deadbeef").is_none());
    }

    #[test]
    fn credentials_are_removed_from_urls() {
        assert_eq!(
            redact("https://user:token@example.com/nixpkgs.git"),
            "https://example.com/nixpkgs.git"
        );
        assert_eq!(
            redact("https://example.com/a@b.git"),
            "https://example.com/a@b.git"
        );
        assert_eq!(
            redact("git@github.com:NixOS/nixpkgs"),
            "git@github.com:NixOS/nixpkgs"
        );
        assert_eq!(redact("/srv/nixpkgs"), "/srv/nixpkgs");
        // An `@` in the password: nothing of it is left.
        assert_eq!(redact("https://user:p@ss@host/repo"), "https://host/repo");
        assert_eq!(
            redact(
                "fatal: unable to access 'https://u:p@s@s@example.com/r/': 401; also http://a:b@c@h?q=x@y"
            ),
            "fatal: unable to access 'https://example.com/r/': 401; also http://h?q=x@y"
        );
        assert_eq!(redact("https://user:p%40ss@host"), "https://host");
    }

    #[tokio::test]
    async fn channel_tags_are_latest_a_channel_or_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let sources = Sources::open(
            Settings {
                origin: Origin::Channel("nixos-unstable".into()),
                ttl: Duration::from_secs(60),
                // Nothing listens here: resolving a channel fails, but tags that need no
                // resolution are answered without it.
                channel_url: "http://127.0.0.1:9".into(),
                tarball_url: "http://127.0.0.1:9/{commit}.tar.gz".into(),
                keep: 4,
                fetch_timeout: Duration::from_secs(5),
                // Which commits may be named is not the subject here.
                commit_pins: CommitPins::Any,
                allowed_commits: AllowedCommits::none(),
                records: None,
            },
            dir.path(),
        )
        .unwrap();
        let tag = |t: &str| t.parse::<Tag>().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            sources.pin(&tag(commit)).await.unwrap(),
            Pin::Commit {
                commit: Commit::parse(commit).unwrap(),
                source: format!("http://127.0.0.1:9/{commit}.tar.gz"),
            }
        );
        let err = sources.pin(&tag("v1.0")).await.unwrap_err();
        assert!(matches!(err, SourceError::NotAChannelTag { .. }), "{err}");
        for suffix in ["", ".sig", ".att"] {
            let reserved = format!("sha256-{}{suffix}", "a".repeat(64));
            let err = sources.pin(&tag(&reserved)).await.unwrap_err();
            assert!(matches!(err, SourceError::Reserved(_)), "{err}");
        }
        let err = sources.pin(&tag("nixos-25.05")).await.unwrap_err();
        assert!(err.is_unreachable(), "{err}");
        assert_eq!(sources.tags().await.unwrap(), ["latest"]);
    }

    /// A channel host on 127.0.0.1 that knows one channel, `nixos-unstable`, at [`COMMIT`]: it
    /// counts the lookups it answers and the most under way at once, each taking `delay_ms`.
    #[derive(Clone, Default)]
    struct ChannelHost {
        lookups: Arc<AtomicUsize>,
        under_way: Arc<AtomicUsize>,
        most_at_once: Arc<AtomicUsize>,
        delay_ms: Arc<AtomicU64>,
    }

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    impl ChannelHost {
        /// Serves on a free port in the background, and returns the sources that follow
        /// `nixos-unstable` there (each name resolved at most once an hour), keeping their
        /// files in `dir`.
        async fn sources(&self, dir: &Path) -> Sources {
            let host = self.clone();
            let app = axum::Router::new().route(
                "/{name}/git-revision",
                axum::routing::get(
                    move |axum::extract::Path(name): axum::extract::Path<String>| {
                        let host = host.clone();
                        async move { host.answer(&name).await }
                    },
                ),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(async move { axum::serve(listener, app).await });
            Sources::open(
                Settings {
                    origin: Origin::Channel("nixos-unstable".into()),
                    ttl: Duration::from_secs(3600),
                    channel_url: format!("http://127.0.0.1:{port}"),
                    tarball_url: format!("http://127.0.0.1:{port}/{{commit}}.tar.gz"),
                    keep: 1,
                    fetch_timeout: Duration::from_secs(5),
                    commit_pins: CommitPins::Any,
                    allowed_commits: AllowedCommits::none(),
                    records: None,
                },
                dir,
            )
            .unwrap()
        }

        async fn answer(&self, name: &str) -> axum::response::Response {
            use axum::response::IntoResponse;
            self.lookups.fetch_add(1, Ordering::SeqCst);
            let now = self.under_way.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_at_once.fetch_max(now, Ordering::SeqCst);
            let delay = self.delay_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            self.under_way.fetch_sub(1, Ordering::SeqCst);
            if name == "nixos-unstable" {
                format!("{COMMIT}\n").into_response()
            } else {
                axum::http::StatusCode::NOT_FOUND.into_response()
            }
        }

        fn lookups(&self) -> usize {
            self.lookups.load(Ordering::SeqCst)
        }
    }

    fn tag(text: &str) -> Tag {
        text.parse().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn channel_lookups_run_four_at_once_and_unknown_names_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let host = ChannelHost::default();
        host.delay_ms.store(50, Ordering::SeqCst);
        let sources = host.sources(dir.path()).await;

        // 64 made-up names at once: each looked up, at most four at a time.
        let names: Vec<Tag> = (0..64).map(|i| tag(&format!("nixos-madeup-{i}"))).collect();
        let pins = futures::future::join_all(names.iter().map(|t| sources.pin(t))).await;
        for pin in pins {
            assert!(
                matches!(pin, Err(SourceError::UnknownChannel { .. })),
                "{pin:?}"
            );
        }
        assert_eq!(host.lookups(), 64);
        let most = host.most_at_once.load(Ordering::SeqCst);
        eprintln!("64 made-up channels at once: at most {most} lookups under way");
        assert!(most <= 4, "{most} lookups under way at once");

        // A name no channel has is looked up once per TTL, however often it is asked.
        let before = host.lookups();
        let nope = tag("nixos-nope");
        let pins = futures::future::join_all((0..100).map(|_| sources.pin(&nope))).await;
        assert!(
            pins.iter()
                .all(|p| matches!(p, Err(SourceError::UnknownChannel { .. })))
        );
        for _ in 0..100 {
            let pin = sources.pin(&nope).await;
            assert!(
                matches!(pin, Err(SourceError::UnknownChannel { .. })),
                "{pin:?}"
            );
        }
        assert_eq!(host.lookups() - before, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_made_up_channel_names_stays_within_the_cache_bound() {
        let dir = tempfile::tempdir().unwrap();
        let host = ChannelHost::default();
        let sources = host.sources(dir.path()).await;
        let remembered = || match &sources.backend {
            Backend::Channel { revisions, .. } => revisions.len(),
            _ => unreachable!("a channel source"),
        };
        let latest = tag("latest");
        assert!(matches!(
            sources.pin(&latest).await,
            Ok(Pin::Commit { commit, .. }) if commit.as_str() == COMMIT
        ));

        // More distinct names than the cache keeps, within one TTL.
        let flood = crate::ttl::MAX_ENTRIES.get() + 1000;
        let started = std::time::Instant::now();
        let unknown = futures::stream::iter(0..flood)
            .map(|i| {
                let sources = &sources;
                async move { sources.pin(&tag(&format!("nixpkgs-flood-{i}"))).await }
            })
            .buffer_unordered(16)
            .filter(|pin| {
                futures::future::ready(matches!(pin, Err(SourceError::UnknownChannel { .. })))
            })
            .count()
            .await;
        assert_eq!(unknown, flood);
        eprintln!(
            "{flood} made-up channels in {:?}: {} lookups, {} names remembered",
            started.elapsed(),
            host.lookups(),
            remembered()
        );
        assert!(
            remembered() <= crate::ttl::MAX_ENTRIES.get(),
            "{} names remembered",
            remembered()
        );
        // The configured channel still resolves.
        assert!(matches!(
            sources.pin(&latest).await,
            Ok(Pin::Commit { commit, .. }) if commit.as_str() == COMMIT
        ));
    }
}
