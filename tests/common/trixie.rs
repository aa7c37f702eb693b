//! Servers under Debian 13's Nix 2.26, in the trixie root `scripts/nix-trixie` makes.

use std::path::Path;
use std::process::Command;

use super::Server;

/// The trixie root's script, which creates the root the first time (about a minute).
pub fn nix_trixie() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/nix-trixie")
        .display()
        .to_string()
}

/// A server on fresh storage under `dir` with `settings`, run inside the trixie root with its
/// Nix 2.26.
pub fn start_under_trixie(dir: &Path, settings: &[(&str, &str)]) -> Server {
    let storage = dir.join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_nixery"));
    let mut command = Command::new(nix_trixie());
    // The root sees this checkout; the storage and the binary (if built outside it) are bound
    // at their own paths. The script clears the environment: settings go through `env`.
    command.env(
        "NIXERY_TRIXIE_BIND",
        format!("{}:{}", dir.display(), binary.parent().unwrap().display()),
    );
    command.arg("env");
    for (key, value) in Server::env(&storage, settings) {
        command.arg(format!("{key}={value}"));
    }
    command.arg(binary);
    Server::start_command(&storage, command)
}

/// The trixie root's directory (`NIXERY_TRIXIE_ROOT`, as the script reads it).
fn root() -> std::path::PathBuf {
    std::env::var_os("NIXERY_TRIXIE_ROOT")
        .map_or_else(|| "/var/tmp/nixery-trixie".into(), std::path::PathBuf::from)
}

/// cosign 2.5 from the trixie root (made, with its verifiers, if need be), which runs on the
/// host as it is.
pub fn cosign() -> std::path::PathBuf {
    super::run(&nix_trixie(), &["true"]);
    let cosign = root().join("usr/bin/cosign");
    assert!(
        cosign.exists(),
        "{} is missing: delete the root for scripts/nix-trixie to make it afresh",
        cosign.display()
    );
    cosign
}

/// Runs the trixie root's skopeo (1.18, with sigstore verification, which Debian 12's lacks)
/// with `args`, `dir` bound inside at its own path; returns whether it succeeded and what it
/// printed.
pub fn skopeo(dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(nix_trixie())
        .env("NIXERY_TRIXIE_BIND", dir)
        .arg("skopeo")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("scripts/nix-trixie runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

/// The password of the keys [`key_pair`] makes.
pub const PASSWORD: &str = "nixery-test";

/// A key pair `cosign generate-key-pair` writes under `dir` as `<prefix>.key` (encrypted with
/// [`PASSWORD`]) and `<prefix>.pub`.
pub fn key_pair(dir: &Path, prefix: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let output = std::process::Command::new(cosign())
        .args(["generate-key-pair", "--output-key-prefix", prefix])
        .env("COSIGN_PASSWORD", PASSWORD)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cosign runs");
    assert!(output.status.success(), "{output:?}");
    (
        dir.join(format!("{prefix}.key")),
        dir.join(format!("{prefix}.pub")),
    )
}

/// cosign (2.5) offline with `args` (a verb, its options and the image), against registries on
/// plain http and without the transparency log (nixery's signatures are not in it).
pub fn cosign_offline(args: &[&str]) -> std::process::Output {
    std::process::Command::new(cosign())
        .args(args)
        .args(["--insecure-ignore-tlog=true", "--allow-http-registry=true"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cosign runs")
}

/// `cosign verify` of `image` with public key `public`, offline: whether it verified, and what
/// it printed.
pub fn cosign_verify(public: &Path, image: &str) -> (bool, String) {
    let output = cosign_offline(&["verify", "--key", &public.display().to_string(), image]);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}
