//! Reading a build's progress from nix-build's stderr: how many derivations it will build or
//! paths it will fetch, and which one it is at.
//!
//! nix-build prints these lines with its plain logger whenever stderr is not a terminal (a pipe,
//! as in the server), with no flag needed; Nix 2.8 (Debian 12) and 2.26 (Debian 13) word them
//! alike (see the tests), remote builds on `builders` machines included. A builder's own output
//! comes in between, line by line, and is not progress.

/// What a line of nix-build's stderr says about the build's progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NixProgress {
    /// "these N derivations will be built:" / "this derivation will be built:": N derivations
    /// to build.
    Planned { derivations: usize },
    /// "these N paths will be fetched (…):" / "this path will be fetched (…):": N store paths to
    /// copy from a substituter.
    Fetching { paths: usize },
    /// "building '/nix/store/<hash>-<name>.drv'...": `name` without hash and `.drv`; with
    /// " on 'ssh://host?…'" when a remote builder runs it, `machine` is that builder (see
    /// [`machine_name`]).
    Building {
        name: String,
        machine: Option<String>,
    },
    /// "copying path '/nix/store/<hash>-<name>' from '…'...": `name` without hash.
    Copying { name: String },
}

/// What `line` (one line of nix-build's stderr, without its newline) says about the progress,
/// if it is one of the lines in [`NixProgress`].
pub fn parse_line(line: &str) -> Option<NixProgress> {
    let line = line.trim_end();
    if let Some(rest) = line.strip_prefix("building '") {
        let (path, rest) = rest.split_once('\'')?;
        let name = store_name(path)?.strip_suffix(".drv")?;
        // A remote build adds " on 'ssh://…'" after the path.
        let machine = rest
            .strip_prefix(" on '")
            .and_then(|uri| uri.split_once('\''))
            .map(|(uri, _)| machine_name(uri));
        return Some(NixProgress::Building {
            name: name.to_owned(),
            machine,
        });
    }
    if let Some(rest) = line.strip_prefix("copying path '") {
        let (path, source) = rest.split_once('\'')?;
        // "… to '…'" is `nix copy` sending a path away, not this build receiving one.
        source.strip_prefix(" from '")?;
        return Some(NixProgress::Copying {
            name: store_name(path)?.to_owned(),
        });
    }
    if line == "this derivation will be built:" {
        return Some(NixProgress::Planned { derivations: 1 });
    }
    if line.starts_with("this path will be fetched") {
        return Some(NixProgress::Fetching { paths: 1 });
    }
    let (count, what) = line.strip_prefix("these ")?.split_once(' ')?;
    let count = count.parse().ok()?;
    if what == "derivations will be built:" {
        Some(NixProgress::Planned { derivations: count })
    } else if what.starts_with("paths will be fetched") {
        Some(NixProgress::Fetching { paths: count })
    } else {
        None
    }
}

/// A builder as people should see it: its URI (`ssh://root@builder?remote-store=…&ssh-key=…`)
/// without the query, which holds store settings and key paths, not the machine's name.
pub fn machine_name(uri: &str) -> String {
    uri.split_once('?')
        .map_or(uri, |(machine, _)| machine)
        .to_owned()
}

/// The name part of a store path (`/nix/store/<32-character hash>-<name>`), in any store
/// directory.
fn store_name(path: &str) -> Option<&str> {
    let (dir, base) = path.rsplit_once('/')?;
    if !dir.starts_with('/') {
        return None;
    }
    let (hash, name) = base.split_once('-')?;
    let is_hash = hash.len() == 32
        && hash
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    (is_hash && !name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(stderr: &str) -> Vec<NixProgress> {
        stderr.lines().filter_map(parse_line).collect()
    }

    fn building(name: &str) -> NixProgress {
        NixProgress::Building {
            name: name.into(),
            machine: None,
        }
    }

    fn copying(name: &str) -> NixProgress {
        NixProgress::Copying { name: name.into() }
    }

    /// `nix-build --no-out-link` of two derivations, the second depending on the first, with
    /// stderr a pipe: Nix 2.8.0 (Debian 12) printed this, and Nix 2.26.3 (Debian 13) the same
    /// with other hashes.
    #[test]
    fn a_build_of_two_derivations() {
        let nix_2_8 = "\
these 2 derivations will be built:
  /nix/store/nmjl8k2qch0yc5alq175y2raidxys2kp-probe-a-2592423126.drv
  /nix/store/69i9sjyr21lgz99ryw9dhjx1d4yk7p9c-probe-b-2592423126.drv
building '/nix/store/nmjl8k2qch0yc5alq175y2raidxys2kp-probe-a-2592423126.drv'...
building a
building '/nix/store/69i9sjyr21lgz99ryw9dhjx1d4yk7p9c-probe-b-2592423126.drv'...
building b
";
        let nix_2_26 = "\
these 2 derivations will be built:
  /nix/store/ws0myp4c9bn5igzsdbbnjksyyjjri8xr-probe-a-289752685.drv
  /nix/store/df99fgd8c3lw0zw41i4m1pl9b4axn9dq-probe-b-289752685.drv
building '/nix/store/ws0myp4c9bn5igzsdbbnjksyyjjri8xr-probe-a-289752685.drv'...
building a
building '/nix/store/df99fgd8c3lw0zw41i4m1pl9b4axn9dq-probe-b-289752685.drv'...
building b
";
        let planned = NixProgress::Planned { derivations: 2 };
        assert_eq!(
            progress(nix_2_8),
            [
                planned.clone(),
                building("probe-a-2592423126"),
                building("probe-b-2592423126")
            ]
        );
        assert_eq!(
            progress(nix_2_26),
            [
                planned,
                building("probe-a-289752685"),
                building("probe-b-289752685")
            ]
        );
    }

    #[test]
    fn a_build_of_one_derivation() {
        // Nix 2.8.0; 2.26.3 printed the same.
        let stderr = "\
this derivation will be built:
  /nix/store/1zrvchinykdq01za7vind2h6znik840y-probe-one-1727210280.drv
building '/nix/store/1zrvchinykdq01za7vind2h6znik840y-probe-one-1727210280.drv'...
hi
";
        assert_eq!(
            progress(stderr),
            [
                NixProgress::Planned { derivations: 1 },
                building("probe-one-1727210280")
            ]
        );
    }

    /// The same two outputs fetched from a `file://` binary cache instead of built.
    #[test]
    fn paths_fetched_from_a_substituter() {
        let nix_2_8 = "\
these 2 paths will be fetched (0.00 MiB download, 0.00 MiB unpacked):
  /nix/store/5x7p401lnprd3siy8ikqaljw1d0rzsr6-probe-a-770632547
  /nix/store/na7icv3pf0bgcvj70sfvw2yiflaw98ld-probe-b-770632547
copying path '/nix/store/5x7p401lnprd3siy8ikqaljw1d0rzsr6-probe-a-770632547' from 'file:///tmp/probe/cache'...
copying path '/nix/store/na7icv3pf0bgcvj70sfvw2yiflaw98ld-probe-b-770632547' from 'file:///tmp/probe/cache'...
";
        let nix_2_26 = "\
this path will be fetched (0.00 MiB download, 0.00 MiB unpacked):
  /nix/store/mfxmaqndcj8ph77vg5ksjahg647wm6hk-probe-b-2451513856
copying path '/nix/store/mfxmaqndcj8ph77vg5ksjahg647wm6hk-probe-b-2451513856' from 'file:///tmp/probe/cache26'...
";
        assert_eq!(
            progress(nix_2_8),
            [
                NixProgress::Fetching { paths: 2 },
                copying("probe-a-770632547"),
                copying("probe-b-770632547")
            ]
        );
        assert_eq!(
            progress(nix_2_26),
            [
                NixProgress::Fetching { paths: 1 },
                copying("probe-b-2451513856")
            ]
        );
    }

    #[test]
    fn other_lines_are_not_progress() {
        for line in [
            "",
            "building a",
            "building 'not-a-store-path.drv'...",
            "building '/nix/store/tooshort-x.drv'...",
            "building '/nix/store/nmjl8k2qch0yc5alq175y2raidxys2kp-not-a-derivation'...",
            "copying path '/nix/store/5x7p401lnprd3siy8ikqaljw1d0rzsr6-a' to 'file:///cache'...",
            "these 2 paths will be deleted:",
            "these many derivations will be built:",
            "  /nix/store/nmjl8k2qch0yc5alq175y2raidxys2kp-probe-a-2592423126.drv",
            "error: builder for '/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-failing.drv' failed with exit code 1",
        ] {
            assert_eq!(parse_line(line), None, "{line:?}");
        }
    }

    /// A build on a `builders` machine: Nix 2.8 prints the store URI as configured, 2.26 with
    /// its first `%3F` decoded (both seen building through an sshd on 127.0.0.1).
    #[test]
    fn a_remote_build_names_its_derivation_and_machine() {
        let on = |machine: &str| NixProgress::Building {
            name: "slowish".into(),
            machine: Some(machine.into()),
        };
        let nix_2_8 = "building '/nix/store/sg5gf05n51r6ryld7qv51lxj43m8bkwa-slowish.drv' on 'ssh://root@127.0.0.1?remote-store=local%3Froot%3D/tmp/rb/remote-store'...";
        let nix_2_26 = "building '/nix/store/akqvwg5nm2w8d4f44q8cnpy9ygyp2yzl-slowish.drv' on 'ssh://root@127.0.0.1?remote-store=local?root%3D/tmp/rb/remote-store26'...";
        assert_eq!(parse_line(nix_2_8), Some(on("ssh://root@127.0.0.1")));
        assert_eq!(parse_line(nix_2_26), Some(on("ssh://root@127.0.0.1")));
        assert_eq!(
            parse_line(
                "building '/nix/store/nmjl8k2qch0yc5alq175y2raidxys2kp-hello-2.12.drv' on 'ssh-ng://builder'..."
            ),
            Some(NixProgress::Building {
                name: "hello-2.12".into(),
                machine: Some("ssh-ng://builder".into())
            })
        );
        // The outputs come back as copies from the builder, counted as fetched paths.
        assert_eq!(
            parse_line(
                "copying path '/nix/store/4miv9174j4m03awhkdz93zhzqiwlghhp-slowish' from 'ssh://root@127.0.0.1'..."
            ),
            Some(copying("slowish"))
        );
    }
}
