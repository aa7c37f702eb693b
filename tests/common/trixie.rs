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
