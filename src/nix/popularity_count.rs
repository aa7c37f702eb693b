//! `nixery popularity`: for a package set, in how many of its top-level packages' runtime
//! closures each store path appears, the data `NIX_POPULARITY_URL` reads.
//!
//! Runtime closures exist only once packages are built, so every top-level package is built
//! (with `--keep-going`: a package that fails is skipped and listed, the others still count).
//! Packages that are the same store path under several names (`bash` and `bashInteractive`)
//! count once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::error::classify;
use super::{NixError, store_path_name};
use crate::command::{self, CommandError};

const POPULARITY_NIX: &str = include_str!("../../nix/popularity.nix");

/// What counting found.
#[derive(Debug)]
pub struct Counts {
    /// Store path name (without its hash) → number of packages whose closure has it.
    pub counts: BTreeMap<String, u64>,
    /// The packages counted (one attribute per distinct output).
    pub packages: Vec<String>,
    /// Packages that did not build, skipped.
    pub failed: Vec<String>,
}

/// A package as `popularity.nix` lists it.
#[derive(Debug, Deserialize)]
struct Listed {
    attr: String,
    out: String,
}

/// One path of a closure as exportReferencesGraph writes it.
#[derive(Debug, Deserialize)]
struct GraphPath {
    path: String,
}

/// Counts, for the package set at `pkgs_path` built for `system`, how many top-level packages'
/// closures each store path is in. `work_dir` receives the Nix expression; `timeout` bounds each
/// Nix command (building every package is one of them).
pub async fn count(
    pkgs_path: &Path,
    system: &str,
    work_dir: &Path,
    env: &super::NixEnv,
    timeout: Duration,
) -> Result<Counts, NixError> {
    let expression = work_dir.join("popularity.nix");
    std::fs::write(&expression, POPULARITY_NIX)
        .map_err(|e| NixError::BadOutput(format!("{}: {e}", expression.display())))?;
    let base = |attr: &str, attrs: &[&String]| -> Vec<OsString> {
        let mut args = env.restricted(pkgs_path);
        args.extend::<[OsString; 12]>([
            expression.clone().into(),
            "--argstr".into(),
            "pkgsPath".into(),
            pkgs_path.into(),
            "--argstr".into(),
            "system".into(),
            system.into(),
            "--argstr".into(),
            "attrs".into(),
            serde_json::to_string(attrs).unwrap_or_default().into(),
            "-A".into(),
            attr.into(),
        ]);
        args
    };

    // Every package, one attribute per distinct output (the first name in order).
    let mut args = vec!["--eval".into(), "--strict".into(), "--json".into()];
    args.extend(base("list", &[]));
    let output = command::run("nix-instantiate", &args, env.command_env(), timeout)
        .await
        .map_err(classify)?;
    let listed: Vec<Listed> = serde_json::from_slice(&output.stdout)
        .map_err(|e| NixError::BadOutput(format!("the package list: {e}")))?;
    let mut by_out: BTreeMap<String, String> = BTreeMap::new();
    for package in listed {
        by_out.entry(package.out).or_insert(package.attr);
    }
    let mut attrs: Vec<&String> = by_out.values().collect();
    attrs.sort();
    tracing::info!(packages = attrs.len(), "building every package");

    let mut args: Vec<OsString> = vec!["--no-out-link".into(), "--keep-going".into()];
    args.extend(base("packages", &attrs));
    match command::run("nix-build", &args, env.command_env(), timeout).await {
        Ok(_) | Err(CommandError::Failed { .. }) => {}
        Err(e) => return Err(classify(e)),
    }
    let outs: Vec<OsString> = by_out.keys().map(OsString::from).collect();
    let mut args: Vec<OsString> = vec!["--check-validity".into(), "--print-invalid".into()];
    args.extend(outs);
    let output = command::run("nix-store", &args, env.command_env(), timeout)
        .await
        .map_err(classify)?;
    let invalid: BTreeSet<&str> = std::str::from_utf8(&output.stdout)
        .unwrap_or_default()
        .lines()
        .collect();
    let mut failed: Vec<String> = Vec::new();
    let mut built: Vec<&String> = Vec::new();
    for (out, attr) in &by_out {
        if invalid.contains(out.as_str()) {
            failed.push(attr.clone());
        } else {
            built.push(attr);
        }
    }
    failed.sort();
    built.sort();

    let mut counts = BTreeMap::new();
    if !built.is_empty() {
        let mut args: Vec<OsString> = vec!["--no-out-link".into()];
        args.extend(base("closures", &built));
        let output = command::run("nix-build", &args, env.command_env(), timeout)
            .await
            .map_err(classify)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let result = stdout
            .lines()
            .last()
            .ok_or_else(|| NixError::BadOutput("no closures".into()))?;
        let json = tokio::fs::read(result)
            .await
            .map_err(|e| NixError::BadOutput(format!("{result}: {e}")))?;
        let graphs: HashMap<String, serde_json::Value> = serde_json::from_slice(&json)
            .map_err(|e| NixError::BadOutput(format!("{result}: {e}")))?;
        for i in 0..built.len() {
            let closure: Vec<GraphPath> = graphs
                .get(&format!("p{i}"))
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| NixError::BadOutput(format!("{result}: closure {i}: {e}")))?
                .ok_or_else(|| NixError::BadOutput(format!("{result}: no closure {i}")))?;
            let names: BTreeSet<&str> = closure.iter().map(|p| store_path_name(&p.path)).collect();
            for name in names {
                *counts.entry(name.to_owned()).or_insert(0) += 1;
            }
        }
    }
    Ok(Counts {
        counts,
        packages: built.into_iter().cloned().collect(),
        failed,
    })
}
