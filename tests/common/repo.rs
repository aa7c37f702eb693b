//! A git repository made from the offline package set, for tests of package sources.

use std::path::PathBuf;
use std::process::Command;

/// What `hello` prints at the repository's first and second commit.
pub const FIRST_GREETING: &str = "Hello, world!";
pub const SECOND_GREETING: &str = "Hello from the second commit!";

/// A git repository holding the offline package set: commit one as shipped, commit two with a
/// `hello` that prints [`SECOND_GREETING`]. Tag `v1` and branch `stable` are at commit one; tag
/// `both` at commit one and branch `both` at commit two (tags win); branch `feature/x` (not a
/// valid image tag) at commit two; `main` (HEAD) at commit two.
pub struct PkgsRepo {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub first: String,
    pub second: String,
}

impl PkgsRepo {
    pub fn create() -> PkgsRepo {
        super::require_tool("git", "apt-get install git");
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("nixpkgs");
        super::run(
            "cp",
            &[
                "-r",
                super::offline_pkgs().to_str().unwrap(),
                path.to_str().unwrap(),
            ],
        );
        let git = |args: &[&str]| {
            let mut all = vec![
                "-C",
                path.to_str().unwrap(),
                "-c",
                "user.name=nixery tests",
                "-c",
                "user.email=tests@nixery.invalid",
            ];
            all.extend_from_slice(args);
            super::run("git", &all).trim().to_owned()
        };
        git(&["init", "--quiet", "--initial-branch=main"]);
        // The git daemon serves commits by hash only when the repository allows it.
        git(&["config", "uploadpack.allowReachableSHA1InWant", "true"]);
        git(&["add", "--all"]);
        git(&["commit", "--quiet", "-m", "The offline package set"]);
        let first = git(&["rev-parse", "HEAD"]);
        git(&["tag", "v1"]);
        git(&["tag", "-a", "both", "-m", "an annotated tag"]);
        git(&["branch", "stable"]);
        let default_nix = path.join("default.nix");
        let text = std::fs::read_to_string(&default_nix).unwrap();
        let changed = text.replacen(
            &format!("echo '{FIRST_GREETING}'"),
            &format!("echo '{SECOND_GREETING}'"),
            1,
        );
        assert_ne!(
            text, changed,
            "hello's greeting is in nix/offline-pkgs/default.nix"
        );
        std::fs::write(&default_nix, changed).unwrap();
        git(&["commit", "--quiet", "-am", "hello greets differently"]);
        let second = git(&["rev-parse", "HEAD"]);
        git(&["branch", "both"]);
        git(&["branch", "feature/x"]);
        PkgsRepo {
            _dir: dir,
            path,
            first,
            second,
        }
    }

    /// The tarball GitHub would serve for `commit`: gzip, one top-level `nixpkgs-<commit>/`.
    pub fn tarball(&self, commit: &str) -> Vec<u8> {
        let output = Command::new("git")
            .args([
                "-C",
                self.path.to_str().unwrap(),
                "archive",
                "--format=tar.gz",
            ])
            .arg(format!("--prefix=nixpkgs-{commit}/"))
            .arg(commit)
            .output()
            .expect("git archive");
        assert!(output.status.success(), "git archive failed");
        output.stdout
    }
}
