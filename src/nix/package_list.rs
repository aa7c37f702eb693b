//! Listing a package set's packages for the catalog: `nix-instantiate --eval` of
//! `nix/catalog.nix`, which prints every package a client can pull with its version,
//! description, homepage and license as JSON (the catalog reads it: `crate::catalog`).

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::NixEnv;
use crate::command::{self, CommandError};

/// The expression that lists a package set's packages, shipped inside the binary.
const CATALOG_NIX: &str = include_str!("../../nix/catalog.nix");

/// Why the packages could not be listed (the catalog says what that means for it).
#[derive(Debug)]
pub enum ListingError {
    /// The expression could not be written to the work directory.
    WorkDir(std::io::Error),
    /// Writing the expression panicked.
    Panicked(String),
    /// `nix-instantiate` failed ([`super::error_cause`] reads why).
    Nix(CommandError),
}

/// What `nix/catalog.nix` prints for the package set at `pkgs_path` imported for `system`: a
/// JSON list of packages. The expression is written under `work_dir` (which `env` lets
/// evaluations read), to a file of its own for each evaluation: one rewritten while another
/// evaluation reads it could be read half written. Nix runs in `env` within `timeout`, and may
/// print up to `max_output` bytes.
pub async fn list_packages(
    pkgs_path: &Path,
    system: &str,
    work_dir: &Path,
    env: &NixEnv,
    timeout: Duration,
    max_output: usize,
) -> Result<Vec<u8>, ListingError> {
    let expression = write_expression(work_dir.to_owned()).await?;
    let mut args = env.restricted(pkgs_path);
    args.extend::<[OsString; 10]>([
        "--eval".into(),
        "--strict".into(),
        "--json".into(),
        expression.to_path_buf().into(),
        "--argstr".into(),
        "pkgsPath".into(),
        pkgs_path.into(),
        "--argstr".into(),
        "system".into(),
        system.into(),
    ]);
    let output = command::run_limited(
        "nix-instantiate",
        &args,
        env.command_env(),
        timeout,
        max_output,
    )
    .await
    .map_err(ListingError::Nix)?;
    Ok(output.stdout)
}

/// `nix/catalog.nix` written to a new file under `work_dir`, removed when the returned path is
/// dropped.
async fn write_expression(work_dir: PathBuf) -> Result<tempfile::TempPath, ListingError> {
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&work_dir)?;
        let mut file = tempfile::Builder::new()
            .prefix("catalog-")
            .suffix(".nix")
            .tempfile_in(&work_dir)?;
        file.write_all(CATALOG_NIX.as_bytes())?;
        Ok(file.into_temp_path())
    })
    .await
    .map_err(|panicked| ListingError::Panicked(panicked.to_string()))?
    .map_err(ListingError::WorkDir)
}
