//! Why Nix gave no image, read from what it printed: which failures the request caused (a
//! name the set lacks, a package that fails to evaluate or build, a platform nothing builds
//! for) and which are the server's. The words clients read are in `crate::error`.

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;

use super::{machine_name, public_text};
use crate::command::CommandError;

/// Why Nix gave no image. Its words (`Display`, and what clients read) are in `crate::error`.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    /// The names the package set does not have.
    NotFound(Vec<String>),
    /// The command ran longer than `NIX_TIMEOUT` and was stopped.
    Timeout(Duration, #[source] CommandError),
    /// The derivations (their names) that failed to build.
    BuildFailed(Vec<String>, #[source] CommandError),
    /// Evaluation failed, for the cause Nix gave ([`error_cause`]).
    EvalFailed(String, #[source] CommandError),
    /// Nix could not be run.
    Unavailable(#[source] CommandError),
    /// Nix printed what nixery cannot read (what, in words).
    BadOutput(String),
    /// Reading the image's closure from the store failed.
    StoreQuery(#[source] CommandError),
    /// A remote builder (the machine) could not be used, and why.
    NoBuilder(String, String, #[source] CommandError),
    /// No machine Nix has builds for this system.
    NoSystem(String, #[source] CommandError),
    /// Nix's build users' group does not exist.
    NoBuildUsers,
    /// The package set needs a newer Nix than the installed one.
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

    /// The packages the failure is about: those the set lacks, or the derivations that failed.
    pub fn packages(&self) -> &[String] {
        match self {
            NixError::NotFound(packages) | NixError::BuildFailed(packages, _) => packages,
            _ => &[],
        }
    }
}

/// The first error a failed build printed (its store paths as Nix wrote them), and the machine
/// it failed on when a remote builder's build failed (`ssh://user@host`, see [`machine_name`]).
pub(crate) fn first_build_error(stderr: &str) -> Option<(&str, Option<String>)> {
    let first = EVAL_ERROR.captures(stderr)?.get(1)?.as_str().trim();
    Some(match REMOTE_FAILURE.captures(first) {
        Some(remote) => (
            remote.get(2)?.as_str().trim(),
            Some(machine_name(&remote[1])),
        ),
        None => (first, None),
    })
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
pub(super) fn classify(err: CommandError) -> NixError {
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
