//! What every Nix process starts from: a cleared environment holding only what Nix needs from
//! the operator, and the Nix settings the server itself asks for, so that a package set a client
//! names (a commit of a fork, say) reaches no secret of the server's.
//!
//! - The environment: of the server's own, only `PATH`, `TMPDIR`, `HOME` and the locale pass,
//!   plus, when set, `NIX_REMOTE` (daemon installs), `SSH_AUTH_SOCK` and `NIX_SSHOPTS` (remote
//!   builders). Cloud credentials and nixery's own settings never reach Nix, nor its builders.
//! - `NIX_CONFIG`: an inherited `NIX_CONFIG`, then the server's isolation settings (builds as
//!   the `nixbld` build users, in Nix's sandbox where it works, with no silent fallback), then
//!   `NIXERY_NIX_CONFIG`, which is where an operator turns either off (a later line wins).
//! - Evaluation ([`NixEnv::restricted`]): `restrict-eval`, with only the paths an evaluation
//!   needs allowed (`-I`): the package tree, the server's expression directory, `/nix/store`
//!   and what nix/offline-pkgs imports from Debian's busybox-static. `builtins.getEnv` then
//!   answers "", and reading any other file is an error.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::NixError;
use crate::command::{self, CommandError, Env};

/// Variables of the server's environment that Nix processes get, when set.
const PASSED: &[&str] = &[
    "PATH",
    "TMPDIR",
    "HOME",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_COLLATE",
    "LC_CTYPE",
    "LC_MESSAGES",
    "LC_NUMERIC",
    "LC_TIME",
    "NIX_REMOTE",
    "SSH_AUTH_SOCK",
    "NIX_SSHOPTS",
];

/// Paths outside the package tree that an evaluation may read: the store (packages refer to
/// store paths, and the offline set's busybox is one), and where nix/offline-pkgs finds Debian's
/// busybox-static to import (`/usr/bin/busybox`, or
/// `/usr/local/lib/busybox-static/<system>/busybox` for another platform).
const ALLOWED_PATHS: &[&str] = &[
    "/nix/store",
    "/usr/bin/busybox",
    "/usr/local/lib/busybox-static",
];

/// The group of Nix's build users, which every setup nixery ships has (Debian's nix-bin makes
/// it, as do scripts/nix-trixie and the Dockerfile).
pub const BUILD_USERS_GROUP: &str = "nixbld";

/// How builds are isolated from the server, as the start-up probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// In Nix's sandbox, as build users: no view of the host's files, no network, no writes to
    /// the store beyond the build's outputs.
    Sandboxed,
    /// As build users, without the sandbox (the kernel refused the namespaces it needs, or the
    /// operator turned it off): the host's world-readable files are visible, root-only ones are
    /// not.
    BuildUsers,
    /// As the user the server runs as (`build-users-group =` in NIXERY_NIX_CONFIG, or a server
    /// that is not root).
    Unisolated,
}

impl Isolation {
    /// The word the log and the metric use.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Sandboxed => "sandboxed",
            Isolation::BuildUsers => "build_users",
            Isolation::Unisolated => "none",
        }
    }
}

/// The environment and settings of every Nix process the server starts.
#[derive(Clone, Debug)]
pub struct NixEnv {
    /// The whole environment, `NIX_CONFIG` included.
    vars: Vec<(&'static str, String)>,
    /// Directories evaluations may read besides the package tree.
    allowed: Vec<PathBuf>,
}

impl NixEnv {
    /// The environment for Nix commands on this server: the passed variables of the server's
    /// environment, `NIX_SSHOPTS` replaced by `ssh_opts` unless empty, and `NIX_CONFIG` made of
    /// the inherited one, `isolation_settings` and `nix_config` (nix.conf syntax), in that order.
    /// Evaluations may also read `expressions` (the server's own Nix files).
    pub fn new(
        nix_config: &str,
        isolation_settings: &str,
        ssh_opts: &str,
        expressions: &Path,
    ) -> Self {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
            nix_config,
            isolation_settings,
            ssh_opts,
            expressions,
        )
    }

    fn from_vars(
        inherited: impl Iterator<Item = (String, String)>,
        nix_config: &str,
        isolation_settings: &str,
        ssh_opts: &str,
        expressions: &Path,
    ) -> Self {
        let mut vars: Vec<(&'static str, String)> = Vec::new();
        let mut inherited_config = String::new();
        for (name, value) in inherited {
            if name == "NIX_CONFIG" {
                inherited_config = value;
            } else if let Some(&passed) = PASSED.iter().find(|&&p| p == name) {
                vars.push((passed, value));
            }
        }
        if !ssh_opts.is_empty() {
            vars.retain(|(k, _)| *k != "NIX_SSHOPTS");
            vars.push(("NIX_SSHOPTS", ssh_opts.to_owned()));
        }
        let config = [inherited_config.as_str(), isolation_settings, nix_config]
            .iter()
            .filter(|part| !part.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
        if !config.is_empty() {
            vars.push(("NIX_CONFIG", config));
        }
        vars.sort();
        let mut allowed: Vec<PathBuf> = ALLOWED_PATHS.iter().map(PathBuf::from).collect();
        allowed.push(expressions.to_path_buf());
        NixEnv { vars, allowed }
    }

    /// The environment of a Nix command.
    pub fn command_env(&self) -> Env<'_> {
        Env::Only(&self.vars)
    }

    /// The variables of that environment, sorted by name.
    pub fn vars(&self) -> &[(&'static str, String)] {
        &self.vars
    }

    /// The arguments that make an evaluation of the package set at `tree` restricted: it may
    /// read `tree`, the server's expressions, the store and the offline set's busybox, and
    /// nothing else. Paths are given as they really are (Nix 2.8 refuses a symlink's target
    /// that was not given), and only those that exist (Nix ignores the others, with a warning).
    pub fn restricted(&self, tree: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> =
            vec!["--option".into(), "restrict-eval".into(), "true".into()];
        for path in std::iter::once(tree).chain(self.allowed.iter().map(PathBuf::as_path)) {
            if let Ok(real) = path.canonicalize() {
                args.push("-I".into());
                args.push(real.into());
            }
        }
        args
    }
}

/// The Nix settings that isolate builds, asked for by the server itself so that a host whose
/// nix.conf says otherwise (Debian's says `sandbox = false`) still gets them: build users, and
/// the sandbox when `sandbox` (what the start-up probe found to work), never falling back to an
/// unsandboxed build without saying so.
pub fn isolation_settings(sandbox: bool) -> String {
    format!(
        "build-users-group = {BUILD_USERS_GROUP}\nsandbox = {sandbox}\nsandbox-fallback = false"
    )
}

/// The environment of every Nix command on this server, and how its builds are isolated:
/// build users, and Nix's sandbox unless a probe build shows this machine cannot give it (then
/// builds run unsandboxed, said in the log and the metric) or `nix_config` (NIXERY_NIX_CONFIG)
/// turns it off. `expressions` is the directory of the server's Nix files.
pub async fn prepare(
    nix_config: &str,
    ssh_opts: &str,
    expressions: &Path,
    system: &str,
) -> Result<(NixEnv, Isolation), NixError> {
    let wanted = !matches!(setting(nix_config, "sandbox"), Some("false" | "no" | "0"));
    let env_with = |sandbox: bool| {
        NixEnv::new(
            nix_config,
            &isolation_settings(sandbox),
            ssh_opts,
            expressions,
        )
    };
    let mut env = env_with(wanted);
    let mut sandboxed = false;
    // Built even when the sandbox is off: it also shows whether the build users exist.
    {
        let args: Vec<OsString> = vec![
            "--no-out-link".into(),
            "-E".into(),
            probe_expression(system).into(),
        ];
        let stderr = match command::run(
            "nix-build",
            &args,
            env.command_env(),
            Duration::from_secs(60),
        )
        .await
        {
            Ok(output) => output.stderr_tail,
            Err(CommandError::Failed { stderr_tail, .. }) => stderr_tail,
            Err(e) => return Err(NixError::Unavailable(e)),
        };
        match read_probe(&stderr) {
            Probed::Sandboxed => sandboxed = wanted,
            Probed::NoBuildUsers => return Err(NixError::NoBuildUsers),
            Probed::NoSandbox(said) => {
                tracing::warn!(nix_said = %said, "Nix cannot sandbox builds on this machine: they run as build users without the sandbox");
                env = env_with(false);
            }
        }
    }
    let users = setting(
        env.vars()
            .iter()
            .find(|(k, _)| *k == "NIX_CONFIG")
            .map_or("", |(_, v)| v.as_str()),
        "build-users-group",
    )
    .is_some_and(|group| !group.is_empty());
    // Build users need a root Nix: the server's own, or a daemon's.
    let root =
        rustix::process::geteuid().is_root() || env.vars().iter().any(|(k, _)| *k == "NIX_REMOTE");
    let isolation = match (sandboxed, users && root) {
        (true, _) => Isolation::Sandboxed,
        (false, true) => Isolation::BuildUsers,
        (false, false) => Isolation::Unisolated,
    };
    Ok((env, isolation))
}

/// What building the probe derivation showed of this machine's builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probed {
    /// Nix started the builder in the sandbox.
    Sandboxed,
    /// Nix cannot sandbox builds here; what it said.
    NoSandbox(String),
    /// The build users' group does not exist.
    NoBuildUsers,
}

/// Reads what Nix printed building a derivation whose builder does not exist, with the sandbox
/// asked for and no fallback: Nix 2.8 and 2.26 say the builder could not be executed once they
/// have set the sandbox up and started it there, and say why when they could not set it up
/// (2.26: "does not support the kernel namespaces"; 2.8 in a chroot: "unable to make '/'
/// private").
pub fn read_probe(stderr: &str) -> Probed {
    if stderr.contains("build-users-group") && stderr.contains("does not exist") {
        return Probed::NoBuildUsers;
    }
    // Nix 2.8 frames the builder's own error in binary; the words are there all the same.
    if stderr.contains("executing '/nixery-isolation-probe'") {
        return Probed::Sandboxed;
    }
    let said = super::error_cause(stderr);
    Probed::NoSandbox(said)
}

/// The expression of the probe: a derivation for `system` whose builder does not exist, so that
/// building it fails (and is tried anew each time) right after Nix has set the build up.
pub fn probe_expression(system: &str) -> String {
    format!(
        "derivation {{ name = \"nixery-isolation-probe\"; system = \"{system}\"; builder = \"/nixery-isolation-probe\"; }}"
    )
}

/// The value the last `NAME = value` line of `config` (nix.conf syntax) gives `name`, if any.
pub fn setting<'a>(config: &'a str, name: &str) -> Option<&'a str> {
    config.lines().rev().find_map(|line| {
        let line = line.split('#').next().unwrap_or_default();
        let (key, value) = line.split_once('=')?;
        (key.trim() == name).then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(inherited: &[(&str, &str)], nix_config: &str, ssh_opts: &str) -> NixEnv {
        NixEnv::from_vars(
            inherited
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
            nix_config,
            &isolation_settings(true),
            ssh_opts,
            Path::new("/srv/nixery/nix"),
        )
    }

    #[test]
    fn only_what_nix_needs_passes() {
        let env = env_of(
            &[
                ("PATH", "/usr/bin"),
                ("HOME", "/root"),
                ("LC_ALL", "C.UTF-8"),
                ("AWS_SECRET_ACCESS_KEY", "secret"),
                ("GOOGLE_APPLICATION_CREDENTIALS", "/etc/key.json"),
                ("NIXERY_AUTH_HTPASSWD", "/etc/htpasswd"),
                ("SECRET", "leak"),
                ("NIX_PATH", "nixpkgs=/root/nixpkgs"),
                ("NIX_REMOTE", "daemon"),
                ("NIX_CONFIG", "cores = 2"),
            ],
            "substituters =",
            "",
        );
        let names: Vec<&str> = env.vars().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            ["HOME", "LC_ALL", "NIX_CONFIG", "NIX_REMOTE", "PATH"]
        );
        let config = &env.vars()[2].1;
        assert_eq!(
            config,
            "cores = 2\nbuild-users-group = nixbld\nsandbox = true\nsandbox-fallback = false\nsubstituters ="
        );
    }

    #[test]
    fn the_operator_has_the_last_word_on_isolation() {
        let env = env_of(&[("NIX_CONFIG", "sandbox = true")], "sandbox = false", "");
        let config = &env
            .vars()
            .iter()
            .find(|(k, _)| *k == "NIX_CONFIG")
            .unwrap()
            .1;
        assert_eq!(setting(config, "sandbox"), Some("false"));
        assert_eq!(setting(config, "build-users-group"), Some("nixbld"));
        assert_eq!(
            setting("build-users-group =\n", "build-users-group"),
            Some("")
        );
        assert_eq!(setting("x = 1", "sandbox"), None);
    }

    #[test]
    fn ssh_options_replace_inherited_ones() {
        let env = env_of(&[("NIX_SSHOPTS", "-v")], "", "-i /key");
        assert_eq!(
            env.vars()
                .iter()
                .find(|(k, _)| *k == "NIX_SSHOPTS")
                .unwrap()
                .1,
            "-i /key"
        );
    }

    #[test]
    fn evaluations_read_only_the_tree_and_the_servers_paths() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&tree, &link).unwrap();
        let env = NixEnv::from_vars(
            std::iter::empty(),
            "",
            "",
            "",
            &dir.path().join("no-such-directory"),
        );
        let args: Vec<String> = env
            .restricted(&link)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let mut expected = vec![
            "--option".to_owned(),
            "restrict-eval".to_owned(),
            "true".to_owned(),
            "-I".to_owned(),
            tree.canonicalize().unwrap().display().to_string(),
            "-I".to_owned(),
            "/nix/store".to_owned(),
        ];
        for path in ["/usr/bin/busybox", "/usr/local/lib/busybox-static"] {
            if Path::new(path).exists() {
                expected.extend(["-I".to_owned(), path.to_owned()]);
            }
        }
        assert_eq!(args, expected);
    }

    #[test]
    fn the_probe_is_read_in_both_versions_words() {
        // Nix 2.8 with its binary framing of the builder's error.
        let sandboxed = "building '/nix/store/x-nixery-isolation-probe.drv'...\n\u{1}\n\u{5}\0Error\0executing '/nixery-isolation-probe': No such file or directory\0\nerror: builder for '/nix/store/x-nixery-isolation-probe.drv' failed with exit code 1\n";
        assert_eq!(read_probe(sandboxed), Probed::Sandboxed);
        let unsupported = "error: this system does not support the kernel namespaces that are required for sandboxing; use '--no-sandbox' to disable sandboxing\n";
        assert_eq!(
            read_probe(unsupported),
            Probed::NoSandbox("this system does not support the kernel namespaces that are required for sandboxing; use '--no-sandbox' to disable sandboxing".to_owned())
        );
        let no_group =
            "error: the group 'nixbld' specified in 'build-users-group' does not exist\n";
        assert_eq!(read_probe(no_group), Probed::NoBuildUsers);
    }
}
