//! Store paths and what Nix records of them: an image's closure, the derivation that builds
//! it, the GC root that keeps it, and reading store paths' names and registrations as Nix
//! prints them.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;

/// One store path of an image's closure, as the Nix store records it (what Nix's
/// `exportReferencesGraph` reports, too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorePath {
    pub path: String,
    /// The derivation that built it, when the store knows one (a path added with
    /// `nix-store --add` has none).
    pub deriver: Option<String>,
    /// The NAR's sha256 as the store records it (`nix-store --dump-db` prints hex in Nix 2.8 and
    /// 2.26 alike).
    pub nar_hash: String,
    pub nar_size: u64,
    /// Sorted; a path may refer to itself.
    pub references: Vec<String>,
}

/// A built image: the root symlink forest and the closure it needs (the root included), sorted
/// by path.
#[derive(Clone, Debug)]
pub struct Closure {
    pub root: String,
    pub paths: Vec<StorePath>,
    /// The attribute path each requested name resolved to (`bashInteractive` for
    /// `bashinteractive`).
    pub packages: Vec<String>,
    /// What each requested package's `meta` says, for the image's SBOM.
    pub meta: Vec<PackageMeta>,
}

/// What Nix's `meta` says of a requested package (evaluated with the image).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct PackageMeta {
    /// The attribute path the name resolved to (`bashInteractive`).
    pub attr: String,
    /// The package's output store path.
    pub path: String,
    /// SPDX identifiers or names of its licenses (`MIT`, `GPL-3.0-or-later`), as `meta.license`
    /// gives them.
    #[serde(default)]
    pub licenses: Vec<String>,
    #[serde(default)]
    pub homepage: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A GC root of a built image: the link `nix-build --out-link` made, registered with Nix, to the
/// build's result, which refers to the image root and so keeps its whole closure in the store
/// (`nix-store --gc` leaves it alone). Removed when dropped: hold it until the image is packed.
#[derive(Debug)]
pub struct GcRoot {
    pub(super) link: PathBuf,
}

impl GcRoot {
    /// The link (under the Nix work directory's `roots/`).
    pub fn path(&self) -> &Path {
        &self.link
    }
}

impl Drop for GcRoot {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.link) {
            Ok(()) => {}
            // nix-build failed before making it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(link = %self.link.display(), error = %e, "could not remove a GC root")
            }
        }
    }
}

/// An evaluated image: the store derivation that builds it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Derivation(pub(super) String);

impl Derivation {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What fakes of Nix in tests hand out (the real ones come from Nix's output).
#[cfg(test)]
impl Derivation {
    pub fn fake(path: String) -> Self {
        Derivation(path)
    }
}

#[cfg(test)]
impl GcRoot {
    pub fn fake(link: PathBuf) -> Self {
        GcRoot { link }
    }
}

/// A store path's name: `/nix/store/<hash>-glibc-2.38` → `glibc-2.38`.
pub fn store_path_name(store_path: &str) -> &str {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

static STORE_PATH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"/nix/store/[0-9a-z]{32}-([^'"\s]+)"#).expect("valid regex"));

/// `text` with each store path replaced by its name (`/nix/store/<hash>-failing.drv` → `failing`).
pub(crate) fn shorten_store_paths(text: &str) -> String {
    STORE_PATH
        .replace_all(text, |c: &regex::Captures| {
            c[1].strip_suffix(".drv").unwrap_or(&c[1]).to_owned()
        })
        .into_owned()
}

/// The store paths `text` describes, as `nix-store --dump-db PATH…` prints them: for each path
/// a line with the path, then its NAR hash, NAR size, deriver (may be empty) and number of
/// references, then one reference a line. References come out sorted.
pub(super) fn parse_registrations(text: &str) -> Result<Vec<StorePath>, String> {
    let mut lines = text.lines();
    let mut paths = Vec::new();
    while let Some(path) = lines.next() {
        if path.is_empty() {
            continue;
        }
        if !path.starts_with('/') {
            return Err(format!("{path:?} is not a store path"));
        }
        let mut field = |what: &str| lines.next().ok_or_else(|| format!("{path}: no {what}"));
        let nar_hash = field("NAR hash")?.to_owned();
        let nar_size = field("NAR size")?;
        let nar_size = nar_size
            .parse()
            .map_err(|_| format!("{path}: NAR size {nar_size:?}"))?;
        let deriver = Some(field("deriver")?)
            .filter(|d| !d.is_empty())
            .map(str::to_owned);
        let count = field("reference count")?;
        let count: usize = count
            .parse()
            .map_err(|_| format!("{path}: reference count {count:?}"))?;
        let mut references = (0..count)
            .map(|_| field("reference").map(str::to_owned))
            .collect::<Result<Vec<_>, _>>()?;
        references.sort();
        paths.push(StorePath {
            path: path.to_owned(),
            deriver,
            nar_hash,
            nar_size,
            references,
        });
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_from_store_paths() {
        assert_eq!(
            store_path_name("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-glibc-2.38"),
            "glibc-2.38"
        );
        assert_eq!(
            shorten_store_paths(
                "/nix/store/zvywbj2gxkwr0rqsgkacxm4vk5a3cxqr-hello-2.12.1.drv and x"
            ),
            "hello-2.12.1 and x"
        );
    }

    /// `nix-store --dump-db` of four paths: Nix 2.8.0 printed this, and 2.26.3 the same.
    #[test]
    fn registrations_are_read_as_nix_store_dumps_them() {
        let dump = "\
/nix/store/1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz-busybox
827ac6f6a6781282e42bb2f0ffafc23871b9e6cf4ed4cfdb30f4674b6887f636
2034368
/nix/store/an28qbnn2l0c94kkyjlsv9k0368qqqaf-busybox.drv
0
/nix/store/6sbayi9wp3z2b6hjnq3dhparfgzs12nj-nixery-image-root
0743a76602927b9355b423908acfe86b49293bd93bd0f92d88fea3e1f1071c99
1040
/nix/store/2id3cxcc57r9asm3ayb58w4bznizixjl-nixery-image-root.drv
2
/nix/store/r7i21hpq7xmnfhj005h308m5d7ls4qyv-bash-interactive-5.2
/nix/store/fadqxbrvmj5f1zsn2amjx5lqzmb8fmz1-hello-2.12.1
/nix/store/mw73l08bf8vwzh2k8f027ibxp3805lff-stdenv-linux
b57699d4bc22291f3662e54efea1d09a4d190ce1ba4523062e531a9fd3d476b4
6704
/nix/store/1z1z4gyqskbid6rfx1i065bbmbg5h5z0-stdenv-linux.drv
2
/nix/store/1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz-busybox
/nix/store/mw73l08bf8vwzh2k8f027ibxp3805lff-stdenv-linux
/nix/store/x7ghpvr7h0n071ql7js6mna3cbw068lr-nixery-probe-file
10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6
120

0
";
        let path = |path: &str, nar_hash: &str, nar_size, references: &[&str]| StorePath {
            path: path.into(),
            deriver: None,
            nar_hash: nar_hash.into(),
            nar_size,
            references: references.iter().map(|r| r.to_string()).collect(),
        };
        let parsed = parse_registrations(dump).unwrap();
        assert_eq!(
            parsed
                .iter()
                .map(|p| p.deriver.as_deref())
                .collect::<Vec<_>>(),
            [
                Some("/nix/store/an28qbnn2l0c94kkyjlsv9k0368qqqaf-busybox.drv"),
                Some("/nix/store/2id3cxcc57r9asm3ayb58w4bznizixjl-nixery-image-root.drv"),
                Some("/nix/store/1z1z4gyqskbid6rfx1i065bbmbg5h5z0-stdenv-linux.drv"),
                None,
            ]
        );
        let without_derivers = parsed
            .into_iter()
            .map(|p| StorePath { deriver: None, ..p })
            .collect::<Vec<_>>();
        assert_eq!(
            without_derivers,
            [
                path(
                    "/nix/store/1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz-busybox",
                    "827ac6f6a6781282e42bb2f0ffafc23871b9e6cf4ed4cfdb30f4674b6887f636",
                    2034368,
                    &[]
                ),
                path(
                    "/nix/store/6sbayi9wp3z2b6hjnq3dhparfgzs12nj-nixery-image-root",
                    "0743a76602927b9355b423908acfe86b49293bd93bd0f92d88fea3e1f1071c99",
                    1040,
                    // Sorted.
                    &[
                        "/nix/store/fadqxbrvmj5f1zsn2amjx5lqzmb8fmz1-hello-2.12.1",
                        "/nix/store/r7i21hpq7xmnfhj005h308m5d7ls4qyv-bash-interactive-5.2"
                    ]
                ),
                // A reference to itself stays.
                path(
                    "/nix/store/mw73l08bf8vwzh2k8f027ibxp3805lff-stdenv-linux",
                    "b57699d4bc22291f3662e54efea1d09a4d190ce1ba4523062e531a9fd3d476b4",
                    6704,
                    &[
                        "/nix/store/1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz-busybox",
                        "/nix/store/mw73l08bf8vwzh2k8f027ibxp3805lff-stdenv-linux"
                    ]
                ),
                // Added with `nix-store --add`: no deriver, an empty line.
                path(
                    "/nix/store/x7ghpvr7h0n071ql7js6mna3cbw068lr-nixery-probe-file",
                    "10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6",
                    120,
                    &[]
                ),
            ]
        );
        assert!(parse_registrations("/nix/store/x\nhash\n12\n\n2\n/nix/store/y\n").is_err());
        assert!(parse_registrations("/nix/store/x\nhash\nbig\n\n0\n").is_err());
        assert!(parse_registrations("warning: something\n").is_err());
        assert_eq!(parse_registrations("").unwrap(), []);
    }
}
