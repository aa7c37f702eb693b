//! Running Nix on `nix/build-image.nix` and reading what it yields: `nix-instantiate` evaluates
//! an image's packages in a package set to one derivation, and `nix-build` builds that derivation
//! into the closure graph and image root, or the list of packages the set does not have.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use crate::command::{self, CommandError};
use crate::metrics::METRICS;

pub mod popularity;
pub mod progress;

pub use progress::NixProgress;

/// The expression nixery calls, shipped inside the binary so a server needs no source tree.
const BUILD_IMAGE_NIX: &str = include_str!("../../nix/build-image.nix");

/// One store path of an image's closure, as Nix's `exportReferencesGraph` reports it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct StorePath {
    pub path: String,
    #[serde(rename = "narSize")]
    pub nar_size: u64,
    pub references: Vec<String>,
}

/// A built image: the root symlink forest and the closure it needs (the root included).
#[derive(Clone, Debug, Deserialize)]
pub struct Closure {
    #[serde(rename = "nixeryRoot")]
    pub root: String,
    #[serde(rename = "closure")]
    pub paths: Vec<StorePath>,
    /// The attribute path each requested name resolved to (`bashInteractive` for
    /// `bashinteractive`).
    #[serde(rename = "nixeryPackages")]
    pub packages: Vec<String>,
}

/// An evaluated image: the store derivation that builds it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Derivation(String);

impl Derivation {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What build-image.nix yields.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BuildOutput {
    NotFound { error: String, pkgs: Vec<String> },
    Built(Closure),
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
    #[error(
        "this package set needs Nix {required} or newer, and the server has Nix {installed}: install a newer Nix on the server (nixpkgs needs 2.18; Debian 13's nix-bin is 2.26)"
    )]
    TooOld { required: String, installed: String },
}

impl NixError {
    /// Whether the request itself caused this (a name the set lacks, a package that fails to
    /// evaluate or build, a build past NIX_TIMEOUT), as opposed to a fault of the server.
    pub fn is_the_requests(&self) -> bool {
        matches!(
            self,
            NixError::NotFound(_)
                | NixError::BuildFailed(..)
                | NixError::EvalFailed(..)
                | NixError::Timeout(..)
        )
    }

    /// What went wrong in one line for the person pulling: the first line of Nix's error, store
    /// paths shortened to their names.
    pub fn reason(&self) -> String {
        match self {
            NixError::BuildFailed(derivations, cmd) => EVAL_ERROR
                .captures(cmd.stderr_tail())
                .map(|c| shorten_store_paths(c[1].trim()))
                .unwrap_or_else(|| format!("Nix failed to build {}", quoted(derivations))),
            NixError::EvalFailed(first, _) => shorten_store_paths(first),
            NixError::Timeout(timeout, _) => format!(
                "it took longer than NIX_TIMEOUT ({}s) and was stopped",
                timeout.as_secs()
            ),
            other => other.to_string(),
        }
    }
}

impl NixError {
    /// The code tools can branch on, when the request caused the failure: `not_found`,
    /// `build_failed`, `evaluation_failed` or `timeout`.
    pub fn reason_code(&self) -> Option<&'static str> {
        match self {
            NixError::NotFound(_) => Some("not_found"),
            NixError::BuildFailed(..) => Some("build_failed"),
            NixError::EvalFailed(..) => Some("evaluation_failed"),
            NixError::Timeout(..) => Some("timeout"),
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

    /// The end of what Nix printed, when it ran.
    pub fn log_tail(&self) -> &str {
        match self {
            NixError::BuildFailed(_, cmd)
            | NixError::EvalFailed(_, cmd)
            | NixError::Timeout(_, cmd) => cmd.stderr_tail(),
            _ => "",
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
pub async fn installed_version() -> Result<Version, NixError> {
    let output = command::run(
        "nix-build",
        &["--version".into()],
        &[],
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
    nix_config: String,
}

impl Nix {
    /// Writes the build expression under `work_dir`, to build for `system` with the installed
    /// Nix of `version` (when known, package sets that need a newer one are refused).
    pub fn new(
        work_dir: &Path,
        system: String,
        version: Option<Version>,
        timeout: Duration,
        nix_config: String,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(work_dir)?;
        let expression = work_dir.join("build-image.nix");
        std::fs::write(&expression, BUILD_IMAGE_NIX)?;
        Ok(Nix {
            expression,
            system,
            version,
            timeout,
            nix_config,
        })
    }

    /// The Nix system double images are built for.
    pub fn system(&self) -> &str {
        &self.system
    }

    /// The environment every Nix command runs with: the server's extra settings, if any.
    fn env(&self) -> Vec<(&'static str, String)> {
        config_env(&self.nix_config)
    }

    /// Evaluates the image of `packages` in the package set at `pkgs_path` to the derivation
    /// that builds it. Nothing is built.
    pub async fn evaluate(
        &self,
        pkgs_path: &Path,
        packages: &BTreeSet<String>,
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
        let args: Vec<OsString> = vec![
            self.expression.clone().into(),
            "--argstr".into(),
            "pkgsPath".into(),
            pkgs_path.into(),
            "--argstr".into(),
            "packages".into(),
            packages_json.into(),
            "--argstr".into(),
            "system".into(),
            self.system.clone().into(),
        ];
        METRICS.nix_evaluations.inc();
        tracing::info!(pkgs = %pkgs_path.display(), ?packages, "running nix-instantiate");
        let started = std::time::Instant::now();
        let output = command::run("nix-instantiate", &args, &self.env(), self.timeout)
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

    /// Builds an evaluated image and returns its closure.
    pub async fn build(&self, drv: &Derivation) -> Result<Closure, NixError> {
        self.build_observed(drv, &mut |_: NixProgress| {}).await
    }

    /// Builds an evaluated image like [`Nix::build`], telling `on_progress` what nix-build
    /// reports as it goes.
    pub async fn build_observed(
        &self,
        drv: &Derivation,
        on_progress: &mut (dyn FnMut(NixProgress) + Send),
    ) -> Result<Closure, NixError> {
        // No flag is needed for the progress lines: nix-build prints them to a pipe at its
        // default verbosity (so no `--quiet` here).
        let args: Vec<OsString> = vec!["--no-out-link".into(), drv.as_str().into()];
        METRICS.nix_builds.inc();
        tracing::info!(drv = drv.as_str(), "running nix-build");
        let started = std::time::Instant::now();
        let mut on_line = |line: &str| {
            if let Some(progress) = progress::parse_line(line) {
                on_progress(progress);
            }
        };
        let output =
            command::run_observed("nix-build", &args, &self.env(), self.timeout, &mut on_line)
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
            Ok(BuildOutput::Built(closure)) => Ok(closure),
            Ok(BuildOutput::NotFound { error, pkgs }) if error == "not_found" => {
                Err(NixError::NotFound(pkgs))
            }
            Ok(BuildOutput::NotFound { error, .. }) => Err(NixError::BadOutput(error)),
            Err(e) => Err(NixError::BadOutput(format!("{result_path}: {e}"))),
        }
    }
}

static FAILED_DERIVATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"builder for '/nix/store/[0-9a-z]{32}-([^']+)\.drv' failed").expect("valid regex")
});

/// An error line: `error: …` at the start (Nix 2.8), or indented under an `error:` heading and
/// its trace (Nix 2.26), where the last one is the cause.
static EVAL_ERROR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?m)^\s*error: (\S.*)$").expect("valid regex"));

/// Turns a failed nix-build into what went wrong, in words a user can act on.
fn classify(err: CommandError) -> NixError {
    let stderr = match &err {
        CommandError::Spawn { .. } | CommandError::Io { .. } => return NixError::Unavailable(err),
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
    NixError::EvalFailed(error_cause(&stderr), err)
}

/// The cause of a failed Nix command from its stderr: the last `error:` line (Nix 2.8 starts the
/// line with it; 2.26 indents the cause under a trace).
pub(crate) fn error_cause(stderr: &str) -> String {
    EVAL_ERROR
        .captures_iter(stderr)
        .last()
        .map(|c| c[1].trim().to_owned())
        .unwrap_or_else(|| "see the server log".to_owned())
}

/// The environment that gives Nix commands the extra settings `nix_config` (nix.conf syntax)
/// on top of the inherited `NIX_CONFIG`; empty when there are none.
pub fn config_env(nix_config: &str) -> Vec<(&'static str, String)> {
    if nix_config.is_empty() {
        return Vec::new();
    }
    let inherited = std::env::var("NIX_CONFIG").unwrap_or_default();
    vec![("NIX_CONFIG", format!("{inherited}\n{nix_config}"))]
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
        let pkgs = tempfile::tempdir().unwrap();
        std::fs::write(
            pkgs.path().join("default.nix"),
            format!(
                "args: let pkgs = import {} args; in pkgs // {{ probe = pkgs.runCommand \"{unique}\" {{ }} \"mkdir -p $out\"; }}",
                offline.display()
            ),
        )
        .unwrap();
        let work = tempfile::tempdir().unwrap();
        let nix = Nix::new(
            work.path(),
            current_system(),
            None,
            Duration::from_secs(120),
            "substituters =".into(),
        )
        .unwrap();
        let drv = nix
            .evaluate(pkgs.path(), &BTreeSet::from(["probe".to_owned()]))
            .await
            .unwrap();

        let mut seen = Vec::new();
        let closure = nix
            .build_observed(&drv, &mut |p| seen.push(p))
            .await
            .unwrap();
        assert!(closure.packages.contains(&"probe".to_owned()));
        let building = |name: &str| NixProgress::Building { name: name.into() };
        assert_eq!(
            seen,
            [
                NixProgress::Planned { derivations: 3 },
                building(&unique),
                building("nixery-image-root"),
                building("nixery-image-closure.json"),
            ]
        );

        // Built now: a second build has nothing to report.
        let mut again = Vec::new();
        nix.build_observed(&drv, &mut |p| again.push(p))
            .await
            .unwrap();
        assert_eq!(again, []);
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
