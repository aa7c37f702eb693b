//! What nixery reads of Nix's configuration and installation: the Nix version (installed, and
//! the oldest a package set needs), the remote builders' slots, and this machine's system.

use std::path::Path;
use std::time::Duration;

use super::{NixEnv, NixError};
use crate::command;

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
pub(super) fn required_version(pkgs_path: &Path) -> Option<Version> {
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
}
