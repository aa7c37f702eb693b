//! Running Nix on `nix/build-image.nix`: `nix-instantiate` evaluates an image's packages in a
//! package set to one derivation, `nix-build` builds that derivation into the image root (or the
//! list of packages the set does not have), on this machine or on the remote builders Nix's
//! `builders` setting names, and `nix-store` then reads the root's closure graph from the store.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;

use super::config::{Version, required_version};
use super::error::classify;
use super::store::{Closure, Derivation, GcRoot, PackageMeta, StorePath, parse_registrations};
use super::{NixEnv, NixError, NixProgress, progress};
use crate::command;
use crate::server::metrics::METRICS;

/// The expression nixery calls, shipped inside the binary so a server needs no source tree.
const BUILD_IMAGE_NIX: &str = include_str!("../../nix/build-image.nix");

/// Most store paths named on one `nix-store --dump-db` command line (a nixpkgs closure has a
/// few thousand; this keeps each command line well under the kernel's limit).
const PATHS_PER_QUERY: usize = 500;

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

    /// The NAR hash (sha256, hex) of the package set at `tree`, as Nix computes it for a
    /// fetched source (`nix-hash --type sha256`): what a person rebuilding an image checks the
    /// tree they fetched against.
    pub async fn tree_hash(&self, tree: &Path) -> Result<String, NixError> {
        let output = command::run(
            "nix-hash",
            &["--type".into(), "sha256".into(), tree.into()],
            self.env.command_env(),
            self.timeout,
        )
        .await
        .map_err(classify)?;
        let hash = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NixError::BadOutput(format!("nix-hash printed {hash:?}")));
        }
        Ok(hash)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::current_system;

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
        // The store also knows who built each path, which exportReferencesGraph leaves out.
        assert!(
            probe
                .deriver
                .as_deref()
                .is_some_and(|d| d.ends_with(".drv")),
            "{probe:?}"
        );
        let without_derivers: Vec<StorePath> = closure
            .paths
            .iter()
            .map(|p| StorePath {
                deriver: None,
                ..p.clone()
            })
            .collect();
        assert_eq!(without_derivers, export_references_graph(&closure.root));

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
                deriver: None,
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
}
