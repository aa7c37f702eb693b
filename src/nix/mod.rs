//! Running Nix on `nix/build-image.nix` and reading what it yields: `nix-instantiate` evaluates
//! an image's packages in a package set to one derivation, `nix-build` builds that derivation
//! into the image root (or the list of packages the set does not have), on this machine or on
//! the remote builders Nix's `builders` setting names, and `nix-store` then reads the root's
//! closure graph from the store.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use crate::command::{self, CommandError};
use crate::metrics::METRICS;

pub mod environment;
pub mod popularity;
pub mod progress;
pub mod public;

pub use environment::{Isolation, NixEnv, prepare};
pub use progress::{NixProgress, machine_name};
pub use public::public_text;

/// The expression nixery calls, shipped inside the binary so a server needs no source tree.
const BUILD_IMAGE_NIX: &str = include_str!("../../nix/build-image.nix");

/// Most store paths named on one `nix-store --dump-db` command line (a nixpkgs closure has a
/// few thousand; this keeps each command line well under the kernel's limit).
const PATHS_PER_QUERY: usize = 500;

/// One store path of an image's closure, as the Nix store records it (what Nix's
/// `exportReferencesGraph` reports, too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorePath {
    pub path: String,
    /// The NAR's sha256 as the store records it (`nix-store --dump-db` prints hex in Nix 2.8 and
    /// 2.26 alike).
    pub nar_hash: String,
    pub nar_size: u64,
    /// Sorted; a path may refer to itself.
    pub references: Vec<String>,
}

/// A built image: the root symlink forest and the closure it needs (the root included), sorted
/// by path.
#[derive(Clone, Debug)]
pub struct Closure {
    pub root: String,
    pub paths: Vec<StorePath>,
    /// The attribute path each requested name resolved to (`bashInteractive` for
    /// `bashinteractive`).
    pub packages: Vec<String>,
    /// What each requested package's `meta` says, for the image's SBOM.
    pub meta: Vec<PackageMeta>,
}

/// What Nix's `meta` says of a requested package (evaluated with the image).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct PackageMeta {
    /// The attribute path the name resolved to (`bashInteractive`).
    pub attr: String,
    /// The package's output store path.
    pub path: String,
    /// SPDX identifiers or names of its licenses (`MIT`, `GPL-3.0-or-later`), as `meta.license`
    /// gives them.
    #[serde(default)]
    pub licenses: Vec<String>,
    #[serde(default)]
    pub homepage: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A GC root of a built image: the link `nix-build --out-link` made, registered with Nix, to the
/// build's result, which refers to the image root and so keeps its whole closure in the store
/// (`nix-store --gc` leaves it alone). Removed when dropped: hold it until the image is packed.
#[derive(Debug)]
pub struct GcRoot {
    link: PathBuf,
}

impl GcRoot {
    /// The link (under the Nix work directory's `roots/`).
    pub fn path(&self) -> &Path {
        &self.link
    }
}

impl Drop for GcRoot {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.link) {
            Ok(()) => {}
            // nix-build failed before making it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(link = %self.link.display(), error = %e, "could not remove a GC root")
            }
        }
    }
}

/// An evaluated image: the store derivation that builds it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Derivation(String);

impl Derivation {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What fakes of Nix in tests hand out (the real ones come from Nix's output).
#[cfg(test)]
impl Derivation {
    pub fn fake(path: String) -> Self {
        Derivation(path)
    }
}

#[cfg(test)]
impl GcRoot {
    pub fn fake(link: PathBuf) -> Self {
        GcRoot { link }
    }
}

/// What build-image.nix yields.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BuildOutput {
    NotFound {
        error: String,
        pkgs: Vec<String>,
    },
    Built {
        #[serde(rename = "nixeryRoot")]
        root: String,
        #[serde(rename = "nixeryPackages")]
        packages: Vec<String>,
        #[serde(rename = "nixeryMeta", default)]
        meta: Vec<PackageMeta>,
    },
}

/// Why Nix gave no image.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("the package set has no package named {}", quoted(.0))]
    NotFound(Vec<String>),
    #[error("building the image took longer than NIX_TIMEOUT ({}s)", .0.as_secs())]
    Timeout(Duration, #[source] CommandError),
    #[error("Nix failed to build {}", quoted(.0))]
    BuildFailed(Vec<String>, #[source] CommandError),
    #[error("Nix could not evaluate the image: {0}")]
    EvalFailed(String, #[source] CommandError),
    #[error("nix-build could not be run (is Nix installed? `apt-get install nix-bin`)")]
    Unavailable(#[source] CommandError),
    #[error("nix-build gave output nixery cannot read: {0}")]
    BadOutput(String),
    #[error("reading the image's closure from the Nix store failed")]
    StoreQuery(#[source] CommandError),
    #[error("Nix could not build on the remote builder {0}: {1}")]
    NoBuilder(String, String, #[source] CommandError),
    #[error(
        "this server cannot build for {0}: its Nix needs a remote builder for {0} (`builders` in NIXERY_NIX_CONFIG), emulation (qemu-user-static registered with binfmt_misc, and `extra-platforms = {0}`), or a binary cache that has the packages"
    )]
    NoSystem(String, #[source] CommandError),
    #[error(
        "Nix's build users' group `nixbld` does not exist here: create it with its users (Debian's nix-bin does; `groupadd -r nixbld` and `useradd -r -g nixbld -G nixbld nixbld1`…), or build as the server's own user by setting `build-users-group =` in NIXERY_NIX_CONFIG"
    )]
    NoBuildUsers,
    #[error(
        "this package set needs Nix {required} or newer, and the server has Nix {installed}: install a newer Nix on the server (nixpkgs needs 2.18; Debian 13's nix-bin is 2.26)"
    )]
    TooOld { required: String, installed: String },
}

impl NixError {
    /// Whether the request itself caused this (a name the set lacks, a package that fails to
    /// evaluate or build, a build past NIX_TIMEOUT, a platform this server cannot build for), as
    /// opposed to a fault of the server.
    pub fn is_the_requests(&self) -> bool {
        matches!(
            self,
            NixError::NotFound(_)
                | NixError::BuildFailed(..)
                | NixError::EvalFailed(..)
                | NixError::Timeout(..)
                | NixError::NoSystem(..)
        )
    }

    /// What went wrong in one line for the person pulling: the first line of Nix's error, store
    /// paths shortened to their names, and the machine when a remote builder failed; nothing
    /// of a builder's settings or key files ([`public_text`]).
    pub fn reason(&self) -> String {
        let reason = match self {
            NixError::BuildFailed(derivations, cmd) => EVAL_ERROR
                .captures(cmd.stderr_tail())
                .map(|c| {
                    let first = c[1].trim();
                    match REMOTE_FAILURE.captures(first) {
                        Some(remote) => format!(
                            "{} on {}",
                            shorten_store_paths(remote[2].trim()),
                            machine_name(&remote[1])
                        ),
                        None => shorten_store_paths(first),
                    }
                })
                .unwrap_or_else(|| format!("Nix failed to build {}", quoted(derivations))),
            NixError::EvalFailed(first, _) => shorten_store_paths(first),
            NixError::Timeout(timeout, _) => format!(
                "it took longer than NIX_TIMEOUT ({}s) and was stopped",
                timeout.as_secs()
            ),
            other => other.to_string(),
        };
        public_text(&reason)
    }
}

impl NixError {
    /// The code tools can branch on, when the request caused the failure: `not_found`,
    /// `build_failed`, `evaluation_failed`, `timeout` or `unsupported_platform`.
    pub fn reason_code(&self) -> Option<&'static str> {
        match self {
            NixError::NotFound(_) => Some("not_found"),
            NixError::BuildFailed(..) => Some("build_failed"),
            NixError::EvalFailed(..) => Some("evaluation_failed"),
            NixError::Timeout(..) => Some("timeout"),
            NixError::NoSystem(..) => Some("unsupported_platform"),
            _ => None,
        }
    }

    /// The packages the failure is about: those the set lacks, or the derivations that failed.
    pub fn packages(&self) -> &[String] {
        match self {
            NixError::NotFound(packages) | NixError::BuildFailed(packages, _) => packages,
            _ => &[],
        }
    }

    /// The failure in a sentence for the person asking: `no package "nodjs" in nixpkgs
    /// 1a2b3c4` (every missing one named), else [`NixError::reason`].
    pub fn describe(&self, package_set: &str) -> String {
        match self {
            NixError::NotFound(packages) => match packages.as_slice() {
                [one] => format!("no package \"{one}\" in {package_set}"),
                many => format!("no packages {} in {package_set}", listed(many, "and")),
            },
            other => other.reason(),
        }
    }

    /// The end of what Nix printed, when it ran, as a client may see it ([`public_text`]).
    pub fn log_tail(&self) -> String {
        match self {
            NixError::BuildFailed(_, cmd)
            | NixError::EvalFailed(_, cmd)
            | NixError::Timeout(_, cmd)
            | NixError::NoBuilder(_, _, cmd)
            | NixError::NoSystem(_, cmd)
            | NixError::StoreQuery(cmd) => public_text(cmd.stderr_tail()),
            _ => String::new(),
        }
    }
}

/// `"a"`, `"a" and "b"`, `"a", "b" and "c"` (or with `or`).
pub(crate) fn listed(names: &[String], last_word: &str) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} {last_word} {last}", init.join(", ")),
    }
}

static STORE_PATH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"/nix/store/[0-9a-z]{32}-([^'"\s]+)"#).expect("valid regex"));

/// `text` with each store path replaced by its name (`/nix/store/<hash>-failing.drv` → `failing`).
fn shorten_store_paths(text: &str) -> String {
    STORE_PATH
        .replace_all(text, |c: &regex::Captures| {
            c[1].strip_suffix(".drv").unwrap_or(&c[1]).to_owned()
        })
        .into_owned()
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A Nix version such as `2.26.3`, ordered by its numeric components (what nixpkgs'
/// `lib/minver.nix` is checked against).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    text: String,
    numbers: Vec<u64>,
}

impl Version {
    /// The version at the start of `text` (`2.18`, `2.26.3`, `2.19pre20231010`), if any.
    pub fn parse(text: &str) -> Option<Version> {
        let numbers: Vec<u64> = text
            .split('.')
            .map_while(|part| {
                let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .collect();
        (!numbers.is_empty()).then(|| Version {
            text: text.to_owned(),
            numbers,
        })
    }

    /// Whether this version is older than `other` (missing components count as 0).
    pub fn older_than(&self, other: &Version) -> bool {
        let len = self.numbers.len().max(other.numbers.len());
        let at = |v: &Version, i: usize| v.numbers.get(i).copied().unwrap_or(0);
        (0..len)
            .map(|i| at(self, i).cmp(&at(other, i)))
            .find(|o| o.is_ne())
            .is_some_and(|o| o.is_lt())
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The installed Nix's version, from `nix-build --version` (`nix-build (Nix) 2.8.0`).
pub async fn installed_version(env: &NixEnv) -> Result<Version, NixError> {
    let output = command::run(
        "nix-build",
        &["--version".into()],
        env.command_env(),
        Duration::from_secs(30),
    )
    .await
    .map_err(NixError::Unavailable)?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .last()
        .and_then(Version::parse)
        .ok_or_else(|| NixError::BadOutput(format!("nix-build --version printed {text:?}")))
}

/// The oldest Nix a package set says it needs: the string in its `lib/minver.nix`, as nixpkgs
/// has it (`"2.18"`, after comments). `None` when there is no such file.
fn required_version(pkgs_path: &Path) -> Option<Version> {
    let dir = if pkgs_path.is_dir() {
        pkgs_path
    } else {
        pkgs_path.parent()?
    };
    let text = std::fs::read_to_string(dir.join("lib/minver.nix")).ok()?;
    let code: String = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let literal = code.split('"').nth(1)?;
    Version::parse(literal)
}

/// Evaluates and builds images.
pub struct Nix {
    expression: PathBuf,
    system: String,
    version: Option<Version>,
    timeout: Duration,
    env: NixEnv,
    /// Where the GC roots of builds in progress are.
    roots: PathBuf,
    next_root: AtomicU64,
}

impl Nix {
    /// Writes the build expression under `work_dir`, on a server whose Nix system is `system`
    /// (images' helper derivations are built for it, whatever their platform), with the installed
    /// Nix of `version` (when known, package sets that need a newer one are refused), running
    /// every Nix command in `env`. GC roots go to `work_dir/roots`, emptied here: the roots a
    /// killed server left would keep their closures forever.
    pub fn new(
        work_dir: &Path,
        system: String,
        version: Option<Version>,
        timeout: Duration,
        env: NixEnv,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(work_dir)?;
        let expression = work_dir.join("build-image.nix");
        std::fs::write(&expression, BUILD_IMAGE_NIX)?;
        let roots = work_dir.join("roots");
        match std::fs::remove_dir_all(&roots) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => std::fs::create_dir(&roots)?,
        }
        Ok(Nix {
            expression,
            system,
            version,
            timeout,
            env,
            roots,
            next_root: AtomicU64::new(0),
        })
    }

    /// The server's own Nix system double.
    pub fn system(&self) -> &str {
        &self.system
    }

    /// The environment every Nix command runs in.
    pub fn env(&self) -> &NixEnv {
        &self.env
    }

    /// Evaluates the image of `packages` in the package set at `pkgs_path`, imported for Nix
    /// system `system`, to the derivation that builds it. Nothing is built.
    pub async fn evaluate(
        &self,
        pkgs_path: &Path,
        packages: &BTreeSet<String>,
        system: &str,
    ) -> Result<Derivation, NixError> {
        if let (Some(installed), Some(required)) = (&self.version, required_version(pkgs_path))
            && installed.older_than(&required)
        {
            return Err(NixError::TooOld {
                required: required.to_string(),
                installed: installed.to_string(),
            });
        }
        let packages_json = serde_json::to_string(packages).unwrap_or_default();
        let mut args = self.env.restricted(pkgs_path);
        args.extend::<[OsString; 13]>([
            self.expression.clone().into(),
            "--argstr".into(),
            "pkgsPath".into(),
            pkgs_path.into(),
            "--argstr".into(),
            "packages".into(),
            packages_json.into(),
            "--argstr".into(),
            "system".into(),
            system.into(),
            "--argstr".into(),
            "hostSystem".into(),
            self.system.clone().into(),
        ]);
        METRICS.nix_evaluations.inc();
        tracing::info!(pkgs = %pkgs_path.display(), ?packages, system, "running nix-instantiate");
        let started = std::time::Instant::now();
        let output = command::run(
            "nix-instantiate",
            &args,
            self.env.command_env(),
            self.timeout,
        )
        .await
        .map_err(classify)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let drv = stdout
            .lines()
            .rfind(|l| l.starts_with('/') && l.ends_with(".drv"))
            .ok_or_else(|| NixError::BadOutput(format!("no derivation in {stdout:?}")))?;
        tracing::info!(
            drv,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "nix-instantiate finished"
        );
        Ok(Derivation(drv.to_owned()))
    }

    /// Builds an evaluated image, telling `on_progress` what nix-build reports as it goes, and
    /// reads its closure from the store. The [`GcRoot`] keeps the closure in the store: hold it
    /// until the image is packed.
    pub async fn build_observed(
        &self,
        drv: &Derivation,
        on_progress: &mut (dyn FnMut(NixProgress) + Send),
    ) -> Result<(Closure, GcRoot), NixError> {
        let gc_root = self.gc_root(drv);
        // No flag is needed for the progress lines: nix-build prints them to a pipe at its
        // default verbosity (so no `--quiet` here).
        let args: Vec<OsString> = vec![
            "--out-link".into(),
            gc_root.path().into(),
            drv.as_str().into(),
        ];
        METRICS.nix_builds.inc();
        tracing::info!(drv = drv.as_str(), "running nix-build");
        let started = std::time::Instant::now();
        let mut on_line = |line: &str| {
            if let Some(progress) = progress::parse_line(line) {
                on_progress(progress);
            }
        };
        let output = command::run_observed(
            "nix-build",
            &args,
            self.env.command_env(),
            self.timeout,
            &mut on_line,
        )
        .await
        .map_err(classify)?;
        tracing::info!(
            drv = drv.as_str(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "nix-build finished"
        );

        let stdout = String::from_utf8_lossy(&output.stdout);
        let result_path = stdout
            .lines()
            .last()
            .ok_or_else(|| NixError::BadOutput("no output path".into()))?;
        let json = tokio::fs::read(result_path)
            .await
            .map_err(|e| NixError::BadOutput(format!("{result_path}: {e}")))?;
        match serde_json::from_slice(&json) {
            Ok(BuildOutput::Built {
                root,
                packages,
                meta,
            }) => {
                let paths = self.closure_of(&root).await?;
                let closure = Closure {
                    root,
                    paths,
                    packages,
                    meta,
                };
                Ok((closure, gc_root))
            }
            Ok(BuildOutput::NotFound { error, pkgs }) if error == "not_found" => {
                Err(NixError::NotFound(pkgs))
            }
            Ok(BuildOutput::NotFound { error, .. }) => Err(NixError::BadOutput(error)),
            Err(e) => Err(NixError::BadOutput(format!("{result_path}: {e}"))),
        }
    }

    /// A new place for the GC root of a build of `drv`.
    fn gc_root(&self, drv: &Derivation) -> GcRoot {
        let n = self.next_root.fetch_add(1, Ordering::Relaxed);
        let hash = drv
            .as_str()
            .rsplit('/')
            .next()
            .and_then(|file| file.get(..32))
            .unwrap_or("image");
        GcRoot {
            link: self.roots.join(format!("{n}-{hash}")),
        }
    }

    /// The closure of store path `root` with each path's NAR size and references as the store
    /// records them, sorted by path: what exportReferencesGraph would give a builder, read here
    /// because a builder on another machine is not given it (see nix/build-image.nix).
    /// `nix-store --query --requisites`, then `nix-store --dump-db` of those paths, which Nix
    /// 2.8 and 2.26 both print in the same format (see [`parse_registrations`]).
    async fn closure_of(&self, root: &str) -> Result<Vec<StorePath>, NixError> {
        let env = self.env.command_env();
        let args: Vec<OsString> = vec!["--query".into(), "--requisites".into(), root.into()];
        let output = command::run("nix-store", &args, env, self.timeout)
            .await
            .map_err(NixError::StoreQuery)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let requisites: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
        let mut paths = Vec::with_capacity(requisites.len());
        for chunk in requisites.chunks(PATHS_PER_QUERY) {
            let args: Vec<OsString> = std::iter::once("--dump-db".into())
                .chain(chunk.iter().map(OsString::from))
                .collect();
            let output = command::run("nix-store", &args, env, self.timeout)
                .await
                .map_err(NixError::StoreQuery)?;
            let described = parse_registrations(&String::from_utf8_lossy(&output.stdout))
                .map_err(|e| NixError::BadOutput(format!("nix-store --dump-db: {e}")))?;
            paths.extend(described);
        }
        paths.sort_by(|a, b| a.path.cmp(&b.path));
        paths.dedup_by(|a, b| a.path == b.path);
        let has_root = paths
            .binary_search_by(|p| p.path.as_str().cmp(root))
            .is_ok();
        if paths.len() != requisites.len() || !has_root {
            return Err(NixError::BadOutput(format!(
                "nix-store --dump-db described {} of the {} paths of the closure of {root}",
                paths.len(),
                requisites.len()
            )));
        }
        Ok(paths)
    }
}

/// The store paths `text` describes, as `nix-store --dump-db PATH…` prints them: for each path
/// a line with the path, then its NAR hash, NAR size, deriver (may be empty) and number of
/// references, then one reference a line. References come out sorted.
fn parse_registrations(text: &str) -> Result<Vec<StorePath>, String> {
    let mut lines = text.lines();
    let mut paths = Vec::new();
    while let Some(path) = lines.next() {
        if path.is_empty() {
            continue;
        }
        if !path.starts_with('/') {
            return Err(format!("{path:?} is not a store path"));
        }
        let mut field = |what: &str| lines.next().ok_or_else(|| format!("{path}: no {what}"));
        let nar_hash = field("NAR hash")?.to_owned();
        let nar_size = field("NAR size")?;
        let nar_size = nar_size
            .parse()
            .map_err(|_| format!("{path}: NAR size {nar_size:?}"))?;
        let _deriver = field("deriver")?;
        let count = field("reference count")?;
        let count: usize = count
            .parse()
            .map_err(|_| format!("{path}: reference count {count:?}"))?;
        let mut references = (0..count)
            .map(|_| field("reference").map(str::to_owned))
            .collect::<Result<Vec<_>, _>>()?;
        references.sort();
        paths.push(StorePath {
            path: path.to_owned(),
            nar_hash,
            nar_size,
            references,
        });
    }
    Ok(paths)
}

static FAILED_DERIVATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"builder for '/nix/store/[0-9a-z]{32}-([^']+)\.drv' failed").expect("valid regex")
});

/// The error a remote builder's failure starts with (Nix 2.8 and 2.26 alike): `build of
/// '/nix/store/….drv' on 'ssh://…' failed: builder for '…' failed with exit code 1`.
static REMOTE_FAILURE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^build of '[^']*' on '([^']+)' failed: (.*)$").expect("valid regex")
});

/// A remote builder Nix could not use (then, with no other machine and `max-jobs = 0`, nothing
/// builds): `cannot build on 'ssh://…': error: cannot connect to 'root@host': ` (2.8) or `…
/// error: failed to start SSH connection to 'root@host': ` (2.26), then what ssh printed, over
/// as many lines, up to `Failed to find a machine for remote build!`.
static CANNOT_BUILD_ON: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ms)^cannot build on '([^']+)': (?:error: )?(.*?)(?:^Failed to find a machine|\z)",
    )
    .expect("valid regex")
});

/// A derivation for a system no machine Nix has builds for (Nix 2.8 and 2.26 alike): `error: a
/// 'aarch64-linux' with features {} is required to build '…', but I am a 'x86_64-linux' …`.
static NO_SYSTEM: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"a '([^']+)' with features \{[^}]*\} is required to build").expect("valid regex")
});

/// The most of a remote builder's error kept in [`NixError::NoBuilder`].
const BUILDER_ERROR_CHARS: usize = 500;

/// An error line: `error: …` at the start (Nix 2.8), or indented under an `error:` heading and
/// its trace (Nix 2.26), where the last one is the cause.
static EVAL_ERROR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?m)^\s*error: (\S.*)$").expect("valid regex"));

/// Turns a failed nix-build into what went wrong, in words a user can act on.
fn classify(err: CommandError) -> NixError {
    let stderr = match &err {
        CommandError::Spawn { .. } | CommandError::Io { .. } => return NixError::Unavailable(err),
        CommandError::TooMuchOutput { .. } => return NixError::BadOutput(err.to_string()),
        CommandError::Timeout { timeout, .. } => {
            let timeout = *timeout;
            return NixError::Timeout(timeout, err);
        }
        CommandError::Failed { stderr_tail, .. } => stderr_tail.clone(),
    };
    let failed: BTreeSet<String> = FAILED_DERIVATION
        .captures_iter(&stderr)
        .map(|c| c[1].to_owned())
        .collect();
    if !failed.is_empty() {
        return NixError::BuildFailed(failed.into_iter().collect(), err);
    }
    if let Some(c) = CANNOT_BUILD_ON.captures(&stderr) {
        let cause = public_text(&c[2]);
        let cause: Vec<&str> = cause.split_whitespace().collect();
        let cause: String = cause.join(" ").chars().take(BUILDER_ERROR_CHARS).collect();
        return NixError::NoBuilder(machine_name(&c[1]), cause, err);
    }
    if let Some(c) = NO_SYSTEM.captures(&stderr) {
        return NixError::NoSystem(c[1].to_owned(), err);
    }
    NixError::EvalFailed(error_cause(&stderr), err)
}

/// The cause of a failed Nix command from its stderr: the last `error:` line (Nix 2.8 starts the
/// line with it; 2.26 indents the cause under a trace), as a client may see it.
pub(crate) fn error_cause(stderr: &str) -> String {
    EVAL_ERROR
        .captures_iter(stderr)
        .last()
        .map(|c| public_text(c[1].trim()))
        .unwrap_or_else(|| "see the server log".to_owned())
}

/// How many builds the remote builders that `nix_config` names (nix.conf syntax, newlines
/// between settings: [`crate::config::Config::nix_config_text`]) take at once: the sum of
/// their `maxJobs`, 0 when it names none.
///
/// The last `builders = …` counts, plus any `extra-builders = …`. Machines are separated by
/// `;` or newlines, each `URI SYSTEMS KEY MAXJOBS …` (the machines file format; `-` or a missing
/// field is the default, 1 job), and `@FILE` lists those in FILE, as Nix reads it (a file that
/// cannot be read names none). Every machine counts, whatever systems it builds for; Nix's own
/// nix.conf and `/etc/nix/machines` (its default) are not read unless named here.
pub fn remote_build_slots(nix_config: &str) -> usize {
    let mut machines = String::new();
    for line in nix_config.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key.trim() {
            "builders" => machines = value.trim().to_owned(),
            "extra-builders" => {
                machines.push('\n');
                machines.push_str(value.trim());
            }
            _ => {}
        }
    }
    machine_slots(&machines, true)
}

/// The jobs of the machines in `spec` (see [`remote_build_slots`]); `@FILE` is followed only
/// `at_top` (a machines file does not name others).
fn machine_slots(spec: &str, at_top: bool) -> usize {
    spec.split(['\n', ';'])
        .map(|machine| {
            let machine = machine.split('#').next().unwrap_or_default().trim();
            if let Some(file) = machine.strip_prefix('@') {
                return match std::fs::read_to_string(file.trim()) {
                    Ok(text) if at_top => machine_slots(&text, false),
                    _ => 0,
                };
            }
            let mut fields = machine.split_whitespace();
            match (fields.next(), fields.nth(2)) {
                (None, _) => 0,
                (Some(_), None | Some("-")) => 1,
                // Nix refuses a machine whose maxJobs is not a number.
                (Some(_), Some(jobs)) => jobs.parse().unwrap_or(0),
            }
        })
        .sum()
}

/// The Nix system double for this machine, e.g. `x86_64-linux`.
pub fn current_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_packages_not_store_paths() {
        let failed = CommandError::Failed {
            command: "nix-build".into(),
            status: std::os::unix::process::ExitStatusExt::from_raw(256),
            stderr_tail: "building '/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-failing.drv'...\n\
                failing: this package always fails\n\
                error: builder for '/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-failing.drv' failed with exit code 1\n\
                error: 1 dependencies of derivation '/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-nixery-image-root.drv' failed to build\n"
                .into(),
        };
        let err = NixError::BuildFailed(vec!["failing".into()], failed);
        assert_eq!(
            err.reason(),
            "builder for 'failing' failed with exit code 1"
        );
        assert_eq!(
            shorten_store_paths(
                "/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-hello-2.12.1.drv and x"
            ),
            "hello-2.12.1 and x"
        );
    }

    #[test]
    fn failed_builds_name_the_derivation() {
        let stderr = "building '/nix/store/x.drv'...\nerror: builder for '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-failing.drv' failed with exit code 1\n";
        let status = std::process::Command::new("false").status().unwrap();
        let err = classify(CommandError::Failed {
            command: "nix-build".into(),
            status,
            stderr_tail: stderr.into(),
        });
        assert_eq!(err.to_string(), "Nix failed to build 'failing'");
    }

    #[test]
    fn evaluation_errors_of_nix_2_26_keep_the_cause() {
        let status = std::process::Command::new("false").status().unwrap();
        let stderr = "error:\n       … while evaluating a branch condition\n         at /p/default.nix:1:1:\n\n       (stack trace truncated; use '--show-trace' to show the full, detailed trace)\n\n       error: boom\n";
        let err = classify(CommandError::Failed {
            command: "nix-instantiate".into(),
            status,
            stderr_tail: stderr.into(),
        });
        assert_eq!(err.to_string(), "Nix could not evaluate the image: boom");
    }

    #[test]
    fn versions_compare_by_their_numbers() {
        let v = |t: &str| Version::parse(t).unwrap();
        assert!(v("2.8.0").older_than(&v("2.18")));
        assert!(!v("2.26.3").older_than(&v("2.18")));
        assert!(!v("2.18").older_than(&v("2.18.0")));
        assert!(v("2.18").older_than(&v("99.0")));
        assert_eq!(v("2.19pre20231010").numbers, [2, 19]);
        assert!(Version::parse("unknown").is_none());
    }

    #[test]
    fn minver_is_read_as_nixpkgs_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(required_version(dir.path()), None);
        std::fs::create_dir(dir.path().join("lib")).unwrap();
        std::fs::write(
            dir.path().join("lib/minver.nix"),
            "# Expose the minimum required version for evaluating Nixpkgs (\"old\")\n\"2.18\"\n",
        )
        .unwrap();
        assert_eq!(required_version(dir.path()).unwrap().to_string(), "2.18");
    }

    /// The real thing: an image of a package no store has yet (its name is new each run), built
    /// with nix-build on nix/offline-pkgs (well under a second).
    #[tokio::test]
    async fn an_observed_build_reports_what_nix_build_does() {
        let found = std::process::Command::new("nix-build")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "nix-build is not on PATH: `apt-get install -y nix-bin busybox-static` (scripts/test does)"
        );
        let offline = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("nix/offline-pkgs");
        let unique = format!(
            "progress-probe-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        // Evaluation reads nothing outside the tree: the offline set is copied in.
        let pkgs = tempfile::tempdir().unwrap();
        std::fs::create_dir(pkgs.path().join("offline")).unwrap();
        for file in std::fs::read_dir(&offline).unwrap() {
            let file = file.unwrap();
            std::fs::copy(
                file.path(),
                pkgs.path().join("offline").join(file.file_name()),
            )
            .unwrap();
        }
        std::fs::write(
            pkgs.path().join("default.nix"),
            format!(
                "args: let pkgs = import ./offline args; in pkgs // {{ probe = pkgs.runCommand \"{unique}\" {{ }} \"mkdir -p $out/share; echo $PATH > $out/share/probe\"; }}"
            ),
        )
        .unwrap();
        let work = tempfile::tempdir().unwrap();
        // A root a killed server left behind is cleared at start-up.
        std::fs::create_dir_all(work.path().join("roots")).unwrap();
        std::os::unix::fs::symlink("/nix/store/gone", work.path().join("roots/0-left")).unwrap();
        let nix = Nix::new(
            work.path(),
            current_system(),
            None,
            Duration::from_secs(120),
            NixEnv::new("substituters =", "", "", work.path()),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_dir(work.path().join("roots"))
                .unwrap()
                .count(),
            0
        );
        let drv = nix
            .evaluate(
                pkgs.path(),
                &BTreeSet::from(["probe".to_owned()]),
                &current_system(),
            )
            .await
            .unwrap();

        let mut seen = Vec::new();
        let (closure, gc_root) = nix
            .build_observed(&drv, &mut |p| seen.push(p))
            .await
            .unwrap();
        assert!(closure.packages.contains(&"probe".to_owned()));
        let building = |name: &str| NixProgress::Building {
            name: name.into(),
            machine: None,
        };
        // What the offline set needs may not be built yet (a fresh store, or one just
        // collected): each derivation planned is built, the probe and the image's two last.
        let Some((NixProgress::Planned { derivations }, built)) = seen.split_first() else {
            panic!("no plan first: {seen:?}");
        };
        assert_eq!(built.len(), *derivations, "{seen:?}");
        assert!(
            built.ends_with(&[
                building(&unique),
                building("nixery-image-root"),
                building("nixery-image.json"),
            ]),
            "{seen:?}"
        );

        // The closure is the store's (the root, the probe and the busybox it refers to), and
        // what exportReferencesGraph gives a builder.
        let probe = closure
            .paths
            .iter()
            .find(|p| p.path.ends_with(&unique))
            .expect("the probe is in the closure");
        assert!(probe.nar_size > 0);
        assert!(
            probe.references.iter().any(|r| r.ends_with("-busybox")),
            "{probe:?}"
        );
        assert_eq!(closure.paths, export_references_graph(&closure.root));

        // The GC root is registered with Nix and refers to the image root while it is held.
        let link = gc_root.path().to_owned();
        let roots = run_nix_store(&["--gc", "--print-roots"]);
        assert!(
            roots
                .lines()
                .any(|l| l.starts_with(&format!("{} -> ", link.display()))),
            "{} is not among Nix's roots:\n{roots}",
            link.display()
        );
        let held = run_nix_store(&["--query", "--requisites", link.to_str().unwrap()]);
        assert!(held.lines().any(|l| l == closure.root), "{held}");
        drop(gc_root);
        assert!(!link.exists() && link.symlink_metadata().is_err());

        // Built now: a second build has nothing to report.
        let mut again = Vec::new();
        nix.build_observed(&drv, &mut |p| again.push(p))
            .await
            .unwrap();
        assert_eq!(again, []);
    }

    fn run_nix_store(args: &[&str]) -> String {
        let output = std::process::Command::new("nix-store")
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "nix-store {args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    /// The closure of `root` as a builder is given it by exportReferencesGraph (structured
    /// attributes, as nixery used before), sorted by path.
    fn export_references_graph(root: &str) -> Vec<StorePath> {
        let offline = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("nix/offline-pkgs");
        let expression = format!(
            r#"{{ root }}: let pkgs = import {} {{ }}; in derivation {{
                name = "graph"; system = builtins.currentSystem; __structuredAttrs = true;
                exportReferencesGraph.closure = [ (builtins.storePath root) ];
                builder = "${{pkgs.busybox}}/bin/busybox";
                args = [ "sh" "-c" "sed -n \"s/.*\\['out'\\]='\\([^']*\\)'.*/\\1/p\" \"$NIX_ATTRS_SH_FILE\" > out && cp \"$NIX_ATTRS_JSON_FILE\" \"$(cat out)\"" ];
            }}"#,
            offline.display()
        );
        let output = std::process::Command::new("nix-build")
            .args([
                "--no-out-link",
                "--option",
                "substituters",
                "",
                "--argstr",
                "root",
                root,
                "-E",
            ])
            .arg(&expression)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let result = String::from_utf8(output.stdout).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(result.trim()).unwrap()).unwrap();
        let mut paths: Vec<StorePath> = json["closure"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| StorePath {
                path: p["path"].as_str().unwrap().to_owned(),
                // Nix 2.8 writes `sha256:<base32>` here, the store dump hex.
                nar_hash: crate::sbom::nar_hash_hex(p["narHash"].as_str().unwrap()).unwrap(),
                nar_size: p["narSize"].as_u64().unwrap(),
                references: p["references"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_owned())
                    .collect(),
            })
            .collect();
        paths.sort_by(|a, b| a.path.cmp(&b.path));
        paths
    }

    /// `nix-store --dump-db` of four paths: Nix 2.8.0 printed this, and 2.26.3 the same.
    #[test]
    fn registrations_are_read_as_nix_store_dumps_them() {
        let dump = "\
/nix/store/1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz-busybox
827ac6f6a6781282e42bb2f0ffafc23871b9e6cf4ed4cfdb30f4674b6887f636
2034368
/nix/store/an28qbnn2l0c94kkyjlsv9k0368qqqaf-busybox.drv
0
/nix/store/6sbayi9wp3z2b6hjnq3dhparfgzs12nj-nixery-image-root
0743a76602927b9355b423908acfe86b49293bd93bd0f92d88fea3e1f1071c99
1040
/nix/store/2id3cxcc57r9asm3ayb58w4bznizixjl-nixery-image-root.drv
2
/nix/store/r7i21hpq7xmnfhj005h308m5d7ls4qyv-bash-interactive-5.2
/nix/store/fadqxbrvmj5f1zsn2amjx5lqzmb8fmz1-hello-2.12.1
/nix/store/mw73l08bf8vwzh2k8f027ibxp3805lff-stdenv-linux
b57699d4bc22291f3662e54efea1d09a4d190ce1ba4523062e531a9fd3d476b4
6704
/nix/store/1z1z4gyqskbid6rfx1i065bbmbg5h5z0-stdenv-linux.drv
2
/nix/store/1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz-busybox
/nix/store/mw73l08bf8vwzh2k8f027ibxp3805lff-stdenv-linux
/nix/store/x7ghpvr7h0n071ql7js6mna3cbw068lr-nixery-probe-file
10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6
120

0
";
        let path = |path: &str, nar_hash: &str, nar_size, references: &[&str]| StorePath {
            path: path.into(),
            nar_hash: nar_hash.into(),
            nar_size,
            references: references.iter().map(|r| r.to_string()).collect(),
        };
        assert_eq!(
            parse_registrations(dump).unwrap(),
            [
                path(
                    "/nix/store/1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz-busybox",
                    "827ac6f6a6781282e42bb2f0ffafc23871b9e6cf4ed4cfdb30f4674b6887f636",
                    2034368,
                    &[]
                ),
                path(
                    "/nix/store/6sbayi9wp3z2b6hjnq3dhparfgzs12nj-nixery-image-root",
                    "0743a76602927b9355b423908acfe86b49293bd93bd0f92d88fea3e1f1071c99",
                    1040,
                    // Sorted.
                    &[
                        "/nix/store/fadqxbrvmj5f1zsn2amjx5lqzmb8fmz1-hello-2.12.1",
                        "/nix/store/r7i21hpq7xmnfhj005h308m5d7ls4qyv-bash-interactive-5.2"
                    ]
                ),
                // A reference to itself stays.
                path(
                    "/nix/store/mw73l08bf8vwzh2k8f027ibxp3805lff-stdenv-linux",
                    "b57699d4bc22291f3662e54efea1d09a4d190ce1ba4523062e531a9fd3d476b4",
                    6704,
                    &[
                        "/nix/store/1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz-busybox",
                        "/nix/store/mw73l08bf8vwzh2k8f027ibxp3805lff-stdenv-linux"
                    ]
                ),
                // Added with `nix-store --add`: no deriver, an empty line.
                path(
                    "/nix/store/x7ghpvr7h0n071ql7js6mna3cbw068lr-nixery-probe-file",
                    "10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6",
                    120,
                    &[]
                ),
            ]
        );
        assert!(parse_registrations("/nix/store/x\nhash\n12\n\n2\n/nix/store/y\n").is_err());
        assert!(parse_registrations("/nix/store/x\nhash\nbig\n\n0\n").is_err());
        assert!(parse_registrations("warning: something\n").is_err());
        assert_eq!(parse_registrations("").unwrap(), []);
    }

    #[test]
    fn remote_slots_add_up_the_builders_max_jobs() {
        assert_eq!(remote_build_slots(""), 0);
        assert_eq!(remote_build_slots("substituters =\nmax-jobs = 0"), 0);
        assert_eq!(remote_build_slots("builders ="), 0);
        // One machine, maxJobs missing: 1.
        assert_eq!(
            remote_build_slots("builders = ssh://root@a x86_64-linux /root/.ssh/id"),
            1
        );
        // `;` between machines, `-` for defaults, maxJobs the fourth field.
        assert_eq!(
            remote_build_slots(
                "substituters =\nbuilders = ssh://a x86_64-linux - 4 2 kvm ; ssh-ng://b x86_64-linux,aarch64-linux /k 3;ssh://c - - -\nmax-jobs = 0"
            ),
            8
        );
        // The last `builders` wins; `extra-builders` adds; comments are no machines.
        assert_eq!(
            remote_build_slots(
                "builders = ssh://a x86_64-linux - 4\nbuilders = ssh://b x86_64-linux - 2 # two\nextra-builders = ssh://c x86_64-linux - 5"
            ),
            7
        );
        // A maxJobs Nix would refuse gives no slots; 0 is 0.
        assert_eq!(
            remote_build_slots("builders = ssh://a x86_64-linux - many; ssh://b x86_64-linux - 0"),
            0
        );

        // `@FILE`: the machines in the file, one a line or separated by `;`.
        let dir = tempfile::tempdir().unwrap();
        let machines = dir.path().join("machines");
        std::fs::write(
            &machines,
            "# builders\nssh://a x86_64-linux /k 6\n\nssh://b x86_64-linux /k; ssh://c x86_64-linux /k 2\n",
        )
        .unwrap();
        let at = format!("builders = @{}", machines.display());
        assert_eq!(remote_build_slots(&at), 9);
        assert_eq!(
            remote_build_slots(&format!("{at}; ssh://d x86_64-linux - 10")),
            19
        );
        assert_eq!(remote_build_slots("builders = @/nonexistent/machines"), 0);
    }

    /// A build that failed on a `builders` machine (Nix 2.8 printed this through an sshd on
    /// 127.0.0.1; 2.26 the same with `local?root%3D` in the URI).
    #[test]
    fn a_remote_failure_names_the_machine() {
        let status = std::process::Command::new("false").status().unwrap();
        let stderr = "\
building '/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-failing.drv' on 'ssh://root@127.0.0.1?remote-store=local%3Froot%3D/tmp/rb/remote-store'...
copying 0 paths...
failing: this package always fails to build (nix/offline-pkgs uses it to test build errors)
error: build of '/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-failing.drv' on 'ssh://root@127.0.0.1?remote-store=local%3Froot%3D/tmp/rb/remote-store' failed: builder for '/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-failing.drv' failed with exit code 1
error: builder for '/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-failing.drv' failed with exit code 1
error: 1 dependencies of derivation '/nix/store/vi1kf0fdspcaa9smv308ccwkyhr3dira-nixery-image-root.drv' failed to build
";
        let err = classify(CommandError::Failed {
            command: "nix-build".into(),
            status,
            stderr_tail: stderr.into(),
        });
        assert_eq!(err.to_string(), "Nix failed to build 'failing'");
        assert_eq!(
            err.reason(),
            "builder for 'failing' failed with exit code 1 on ssh://root@127.0.0.1"
        );
        assert!(err.is_the_requests());
    }

    /// No builder could be reached (nothing listens on its port): Nix 2.8's and 2.26's words.
    #[test]
    fn an_unreachable_builder_is_the_servers_fault_and_named() {
        let status = std::process::Command::new("false").status().unwrap();
        let nix_2_8 = "\
cannot build on 'ssh://root@127.0.0.1?remote-store=local%3Froot%3D/tmp/rb/remote-store': error: cannot connect to 'root@127.0.0.1': ssh: connect to host 127.0.0.1 port 22556: Connection refused
Failed to find a machine for remote build!
error: unable to start any build; remote machines may not have all required system features.
       https://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html
";
        let nix_2_26 = "\
cannot build on 'ssh://root@127.0.0.1?remote-store=local?root%3D/tmp/rb/remote-store26': error: failed to start SSH connection to 'root@127.0.0.1': ssh: connect to host 127.0.0.1 port 22556: Connection refused
Failed to find a machine for remote build!
error:
                           Unable to start any build;
                           remote machines may not have all required system features.
";
        // ssh's own words come on a line of their own after a warning.
        let no_key = "\
cannot build on 'ssh://root@127.0.0.1?remote-store=local%3Froot%3D/tmp/rb/remote-store': error: cannot connect to 'root@127.0.0.1': Warning: Identity file /nonexistent/key not accessible: No such file or directory.
ssh: connect to host 127.0.0.1 port 22556: Connection refused
Failed to find a machine for remote build!
derivation: h8b3l49nffkgbd1m7yvbqglqdbh9fz74-slowish.drv
";
        for (stderr, cause) in [
            (nix_2_8, "cannot connect to 'root@127.0.0.1'"),
            (
                nix_2_26,
                "failed to start SSH connection to 'root@127.0.0.1'",
            ),
            (
                no_key,
                "cannot connect to 'root@127.0.0.1': Warning: Identity file [key file] not accessible: No such file or directory.",
            ),
        ] {
            let refused = "ssh: connect to host 127.0.0.1 port 22556: Connection refused";
            let separator = if stderr == no_key { " " } else { ": " };
            let err = classify(CommandError::Failed {
                command: "nix-build".into(),
                status,
                stderr_tail: stderr.into(),
            });
            assert!(matches!(err, NixError::NoBuilder(..)), "{err:?}");
            assert!(!err.is_the_requests());
            assert_eq!(
                err.reason(),
                format!(
                    "Nix could not build on the remote builder ssh://root@127.0.0.1: {cause}{separator}{refused}"
                )
            );
        }
    }

    /// Builders named with a key file in the URI (`ssh-key=`), and ssh naming the key again:
    /// what Nix 2.8 printed through an sshd on 127.0.0.1 (a build that failed there, and a
    /// builder refused with a key that is not there) and 2.26's first line, with the key's path
    /// made `/root/.ssh/id_secret`. Nothing a client sees has the query or the key.
    #[test]
    fn builders_settings_and_key_files_never_reach_clients() {
        let status = std::process::Command::new("false").status().unwrap();
        let failed = "\
this derivation will be built:
  /nix/store/n2x04ydfcws88c6krj09pzlj0dlyg9by-failing-remote.drv
building '/nix/store/n2x04ydfcws88c6krj09pzlj0dlyg9by-failing-remote.drv' on 'ssh://root@127.0.0.1?remote-store=local%3Froot%3D/tmp/leaks/rs&ssh-key=/root/.ssh/id_secret'...
copying 0 paths...
error: build of '/nix/store/n2x04ydfcws88c6krj09pzlj0dlyg9by-failing-remote.drv' on 'ssh://root@127.0.0.1?remote-store=local%3Froot%3D/tmp/leaks/rs&ssh-key=/root/.ssh/id_secret' failed: builder for '/nix/store/n2x04ydfcws88c6krj09pzlj0dlyg9by-failing-remote.drv' failed with exit code 1
error: builder for '/nix/store/n2x04ydfcws88c6krj09pzlj0dlyg9by-failing-remote.drv' failed with exit code 1
";
        let refused = "\
cannot build on 'ssh://root@127.0.0.1?ssh-key=/root/.ssh/id_secret': error: cannot connect to 'root@127.0.0.1': Warning: Identity file /root/.ssh/id_secret not accessible: No such file or directory.
ssh: connect to host 127.0.0.1 port 22556: Connection refused
Failed to find a machine for remote build!
derivation: 6kn78s33x7g09c5xpc0w7n80qydzjm32-failing-remote.drv
required (system, features): (x86_64-linux, )
1 available machines:
(systems, maxjobs, supportedFeatures, mandatoryFeatures)
(x86_64-linux, 1, , )
error: unable to start any build; remote machines may not have all required system features.
";
        let nix_2_26 = "\
cannot build on 'ssh://root@127.0.0.1?remote-store=local?root%3D/tmp/leaks/rs26&ssh-key=/root/.ssh/id_secret': error: failed to start SSH connection to 'root@127.0.0.1': Load key \"/root/.ssh/id_secret\": bad permissions
Failed to find a machine for remote build!
";
        for (stderr, reason) in [
            (
                failed,
                "builder for 'failing-remote' failed with exit code 1 on ssh://root@127.0.0.1",
            ),
            (
                refused,
                "Nix could not build on the remote builder ssh://root@127.0.0.1: cannot connect to 'root@127.0.0.1': Warning: Identity file [key file] not accessible: No such file or directory. ssh: connect to host 127.0.0.1 port 22556: Connection refused",
            ),
            (
                nix_2_26,
                "Nix could not build on the remote builder ssh://root@127.0.0.1: failed to start SSH connection to 'root@127.0.0.1': Load key \"[key file]\": bad permissions",
            ),
        ] {
            let err = classify(CommandError::Failed {
                command: "nix-build".into(),
                status,
                stderr_tail: stderr.into(),
            });
            assert_eq!(err.reason(), reason);
            let log = err.log_tail();
            assert!(log.contains("ssh://root@127.0.0.1"), "{log}");
            for shown in [err.reason(), err.describe("nixpkgs"), err.to_string(), log] {
                for private in ["id_secret", ".ssh", "ssh-key", "remote-store", "/tmp/leaks"] {
                    assert!(!shown.contains(private), "{private} in {shown}");
                }
            }
        }
    }

    /// A platform no machine builds for: Nix 2.8's and 2.26's words (the same), seen building
    /// nix/offline-pkgs' aarch64-linux `nano` on x86_64 without `extra-platforms`.
    #[test]
    fn a_system_nothing_builds_for_is_named() {
        let status = std::process::Command::new("false").status().unwrap();
        let stderr = "\
these 3 derivations will be built:
  /nix/store/7r8jhrm64dw4812b71cwdfvgrwzzzx3a-busybox.drv
error: a 'aarch64-linux' with features {} is required to build '/nix/store/7r8jhrm64dw4812b71cwdfvgrwzzzx3a-busybox.drv', but I am a 'x86_64-linux' with features {benchmark, big-parallel, kvm, nixos-test, uid-range}
";
        let err = classify(CommandError::Failed {
            command: "nix-build".into(),
            status,
            stderr_tail: stderr.into(),
        });
        assert!(matches!(&err, NixError::NoSystem(system, _) if system == "aarch64-linux"));
        assert_eq!(err.reason_code(), Some("unsupported_platform"));
        assert!(
            err.reason()
                .starts_with("this server cannot build for aarch64-linux: "),
            "{}",
            err.reason()
        );
    }

    #[test]
    fn evaluation_errors_of_nix_2_8_keep_the_error_line() {
        let status = std::process::Command::new("false").status().unwrap();
        let err = classify(CommandError::Failed {
            command: "nix-build".into(),
            status,
            stderr_tail: "error: attribute 'x' missing\n\n       at foo.nix:1:1\n".into(),
        });
        assert_eq!(
            err.to_string(),
            "Nix could not evaluate the image: attribute 'x' missing"
        );
    }
}
