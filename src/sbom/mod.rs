//! Software bills of materials of images: an SPDX 2.3 and a CycloneDX 1.6 JSON document of an
//! image's Nix closure, one package (component) per store path, its dependencies the closure's
//! references. Both are deterministic: the same image gives the same bytes.

mod cyclonedx;
mod nix_hash;
mod spdx;

use crate::manifest::Digest;
pub use crate::nix::PackageMeta;
use crate::nix::{Closure, StorePath};

pub use nix_hash::nar_hash_hex;

/// What the documents are about: the image, where its packages came from, and when.
#[derive(Clone, Debug)]
pub struct Subject {
    /// The image: its packages joined by `/`, sorted (the same image whatever order a name
    /// gave them in: `bashInteractive/coreutils/hello/moreutils/nano` for `shell/hello`).
    pub image: String,
    /// The commit of the package set, or `latest` for a path (which has no other).
    pub tag: String,
    /// The digest of the image manifest the documents describe (`sha256:…`); the documents'
    /// namespace and serial number derive from it.
    pub digest: String,
    /// `linux/amd64`.
    pub platform: String,
    /// When the package set was made (RFC 3339, `2024-05-01T12:00:00Z`): the source commit's
    /// time for a pinned commit, else `1970-01-01T00:00:01Z`.
    pub created: String,
    /// Who supplied every package: the package source.
    pub supplier: Supplier,
}

/// The package source, as the documents name the supplier of every package.
#[derive(Clone, Debug)]
pub struct Supplier {
    /// `nixpkgs`, or the package set's name (`offline-pkgs`).
    pub name: String,
    /// The repository, channel or tarball URL (without credentials), if there is one.
    pub url: Option<String>,
    /// The full commit, for a pinned commit.
    pub commit: Option<String>,
}

/// The SPDX 2.3 JSON document of `closure`.
pub fn spdx(subject: &Subject, closure: &Closure, packages: &[PackageMeta]) -> Vec<u8> {
    spdx::document(subject, closure, packages)
}

/// The CycloneDX 1.6 JSON document of `closure`.
pub fn cyclonedx(subject: &Subject, closure: &Closure, packages: &[PackageMeta]) -> Vec<u8> {
    cyclonedx::document(subject, closure, packages)
}

/// A store path's name and version, split as Nix's `builtins.parseDrvName` splits the part after
/// the hash: at the first `-` followed by a character that is not a letter
/// (`bash-interactive-5.2` is `bash-interactive` and `5.2`). `None` for the version when there
/// is none.
pub fn name_and_version(store_path: &str) -> (&str, Option<&str>) {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    let name = base.split_once('-').map_or(base, |(_, name)| name);
    let bytes = name.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'-'
            && bytes
                .get(i + 1)
                .is_some_and(|next| !next.is_ascii_alphabetic())
        {
            return (&name[..i], Some(&name[i + 1..]));
        }
    }
    (name, None)
}

/// The 32-character hash part of a store path.
pub fn store_hash(store_path: &str) -> &str {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    base.split_once('-').map_or(base, |(hash, _)| hash)
}

/// What both documents say of one store path of the closure.
struct Entry<'a> {
    path: &'a StorePath,
    name: &'a str,
    /// The version, or the store hash when the name has none (`versioned` false).
    version: &'a str,
    versioned: bool,
    /// The NAR hash as lowercase hex, when it is a sha256 in a form Nix writes.
    sha256: Option<String>,
    purl: String,
    /// What Nix's `meta` says of it, when it is a requested package (more than one when two
    /// names resolved to the same path; the first gives licenses, homepage and description).
    meta: Vec<&'a PackageMeta>,
    /// The other paths of the closure it refers to, sorted: its references without itself.
    depends_on: Vec<&'a str>,
}

/// One [`Entry`] per store path of `closure`, each once, sorted by path.
fn entries<'a>(closure: &'a Closure, packages: &'a [PackageMeta]) -> Vec<Entry<'a>> {
    let mut paths: Vec<&StorePath> = closure.paths.iter().collect();
    paths.sort_by(|a, b| a.path.cmp(&b.path));
    paths.dedup_by(|a, b| a.path == b.path);
    let known = |path: &str| {
        paths
            .binary_search_by(|p| p.path.as_str().cmp(path))
            .is_ok()
    };
    paths
        .iter()
        .map(|&path| {
            let (name, version) = name_and_version(&path.path);
            let version_or_hash = version.unwrap_or_else(|| store_hash(&path.path));
            let mut depends_on: Vec<&str> = path
                .references
                .iter()
                .map(String::as_str)
                // A closure is closed; a reference outside it would only dangle in the document.
                .filter(|r| *r != path.path && known(r))
                .collect();
            depends_on.sort_unstable();
            depends_on.dedup();
            Entry {
                path,
                name,
                version: version_or_hash,
                versioned: version.is_some(),
                sha256: nar_hash_hex(&path.nar_hash),
                purl: format!(
                    "pkg:nix/{}@{}",
                    purl_encode(name),
                    purl_encode(version_or_hash)
                ),
                meta: packages.iter().filter(|m| m.path == path.path).collect(),
                depends_on,
            }
        })
        .collect()
}

/// `text` percent-encoded for a purl's name or version: everything but ASCII letters, digits
/// and `.-_~` ([purl spec, "Character encoding"](https://github.com/package-url/purl-spec/blob/main/PURL-SPECIFICATION.rst#character-encoding));
/// store names may hold `+`, `?` and `=`.
fn purl_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"._-~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    encoded
}

/// `url` when both documents can carry it as a URL: an absolute `http(s)` URL without spaces
/// or control characters (SPDX's `homepage` and CycloneDX's IRI fields reject anything else).
fn web_url(url: &str) -> Option<&str> {
    let url = url.trim();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let clean = !rest.is_empty()
        && url
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !"\"<>\\^`{|}".contains(c));
    clean.then_some(url)
}

/// The hex digits of the image digest `digest` (`sha256:<hex>`), when it is one.
fn digest_hex(digest: &str) -> Option<String> {
    let digest: Digest = digest.parse().ok()?;
    Some(digest.hex().to_owned())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(super) const ROOT: &str = "/nix/store/5fx6cxn24qa364clp4d2qjppczky1zgp-nixery-image-root";
    pub(super) const HELLO: &str = "/nix/store/fadqxbrvmj5f1zsn2amjx5lqzmb8fmz1-hello-2.12.1";
    pub(super) const GLIBC: &str = "/nix/store/5j39nw617kk5hap76v4wvlsli89p3zx8-glibc-2.38";
    pub(super) const BUSYBOX: &str = "/nix/store/1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz-busybox";
    pub(super) const STDENV: &str = "/nix/store/mw73l08bf8vwzh2k8f027ibxp3805lff-stdenv-linux";
    pub(super) const CURL: &str = "/nix/store/sqlf91kbfzdll28v8dsb5ja1lnzpqpj5-curl-8.4.0";

    /// The lowercase hex NAR hash of each path of [`closure`].
    pub(super) const HEX: [(&str, &str); 6] = [
        (
            BUSYBOX,
            "827ac6f6a6781282e42bb2f0ffafc23871b9e6cf4ed4cfdb30f4674b6887f636",
        ),
        (
            GLIBC,
            "823598d8b502c60d1284450a11a27192949086ab706a9450ee087df6574a9e81",
        ),
        (
            ROOT,
            "76a492b50847b1d49a779435c56e8ac2b9b2d80505b5d830f5b27659f84b9338",
        ),
        (
            HELLO,
            "ea4c602f39834b958573e35c9206378f422e5d52517be14f34fe7a1e3a1324a8",
        ),
        (
            STDENV,
            "b57699d4bc22291f3662e54efea1d09a4d190ce1ba4523062e531a9fd3d476b4",
        ),
        (
            CURL,
            "5df60bbcbb5934109af7a1c5b763095d23c3937cca087327941f39258d887fc3",
        ),
    ];

    fn path(path: &str, nar_hash: &str, references: &[&str]) -> StorePath {
        StorePath {
            path: path.to_owned(),
            deriver: None,
            nar_hash: nar_hash.to_owned(),
            nar_size: 1216,
            references: references.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    /// Part of a real image closure from nix/offline-pkgs (hashes as `nix-store --dump-db`
    /// printed them), its NAR hashes in each form Nix writes, and glibc's reference to itself
    /// as nixpkgs' glibc has one (stdenv-linux's is real).
    pub(super) fn closure() -> Closure {
        let hex = |p: &str| HEX.iter().find(|(path, _)| *path == p).unwrap().1;
        Closure {
            root: ROOT.to_owned(),
            paths: vec![
                path(BUSYBOX, hex(BUSYBOX), &[]),
                path(
                    GLIBC,
                    "sha256-gjWY2LUCxg0ShEUKEaJxkpSQhqtwapRQ7gh99ldKnoE=",
                    &[GLIBC],
                ),
                path(ROOT, hex(ROOT), &[CURL, HELLO, STDENV]),
                path(
                    HELLO,
                    "sha256:1a142cx1wypy6i7y2ysia9fjwhlg6w394p73ff2rajw374pn0k7a",
                    &[BUSYBOX, GLIBC],
                ),
                path(
                    STDENV,
                    &format!("sha256:{}", hex(STDENV)),
                    &[BUSYBOX, STDENV],
                ),
                path(CURL, &hex(CURL).to_uppercase(), &[BUSYBOX, GLIBC]),
            ],
            packages: vec!["hello".to_owned(), "stdenv".to_owned(), "curl".to_owned()],
            meta: metas(),
        }
    }

    /// The edges of [`closure`]'s graph without self references, and the image's.
    pub(super) fn edges() -> Vec<(&'static str, &'static str)> {
        vec![
            ("image", ROOT),
            (HELLO, BUSYBOX),
            (HELLO, GLIBC),
            (ROOT, CURL),
            (ROOT, HELLO),
            (ROOT, STDENV),
            (STDENV, BUSYBOX),
            (CURL, BUSYBOX),
            (CURL, GLIBC),
        ]
    }

    pub(super) fn subject() -> Subject {
        Subject {
            image: "hello/stdenv/curl".to_owned(),
            tag: "latest".to_owned(),
            digest: "sha256:4c1b1e8e1b5bb4a7b2a5e8bd2c6b0a2f9f3e8c3b1a0d9e8f7a6b5c4d3e2f1a0b"
                .to_owned(),
            platform: "linux/amd64".to_owned(),
            created: "2024-05-01T12:00:00Z".to_owned(),
            supplier: Supplier {
                name: "nixpkgs".to_owned(),
                url: Some("https://github.com/NixOS/nixpkgs".to_owned()),
                commit: Some("0123456789abcdef0123456789abcdef01234567".to_owned()),
            },
        }
    }

    /// hello under a list license, an unlisted one and a deprecated id; stdenv under a license
    /// with an exception; curl under its own listed license.
    pub(super) fn metas() -> Vec<PackageMeta> {
        vec![
            PackageMeta {
                attr: "hello".to_owned(),
                path: HELLO.to_owned(),
                licenses: vec!["GPL-3.0+".to_owned(), "unfree".to_owned(), "MIT".to_owned()],
                homepage: Some("https://www.gnu.org/software/hello/manual/".to_owned()),
                description: Some(
                    "A program that produces a familiar, friendly greeting".to_owned(),
                ),
            },
            PackageMeta {
                attr: "stdenv".to_owned(),
                path: STDENV.to_owned(),
                licenses: vec!["Apache-2.0 WITH LLVM-exception".to_owned()],
                homepage: Some("not a url".to_owned()),
                description: None,
            },
            PackageMeta {
                attr: "curl".to_owned(),
                path: CURL.to_owned(),
                licenses: vec!["curl".to_owned()],
                homepage: None,
                description: Some("  ".to_owned()),
            },
        ]
    }

    #[test]
    fn the_same_image_gives_the_same_bytes() {
        let (subject, closure, metas) = (subject(), closure(), metas());
        // The store lists paths in another order than the closure's sort.
        let mut shuffled = closure.clone();
        shuffled.paths.reverse();
        for document in [spdx, cyclonedx] {
            let first = document(&subject, &closure, &metas);
            assert_eq!(first, document(&subject, &closure, &metas));
            assert_eq!(first, document(&subject, &shuffled, &metas));
        }
    }

    #[test]
    fn entries_are_the_closure_once_each() {
        let closure = closure();
        let metas = metas();
        let mut shuffled = closure.clone();
        shuffled.paths.reverse();
        shuffled.paths.push(shuffled.paths[0].clone());
        let entries = entries(&shuffled, &metas);
        let paths: Vec<&str> = entries.iter().map(|e| e.path.path.as_str()).collect();
        let mut sorted: Vec<&str> = closure.paths.iter().map(|p| p.path.as_str()).collect();
        sorted.sort();
        assert_eq!(paths, sorted);
        for entry in &entries {
            let hex = HEX.iter().find(|(p, _)| *p == entry.path.path).unwrap().1;
            assert_eq!(entry.sha256.as_deref(), Some(hex), "{}", entry.path.path);
            assert!(!entry.depends_on.contains(&entry.path.path.as_str()));
        }
        let busybox = entries.iter().find(|e| e.path.path == BUSYBOX).unwrap();
        assert_eq!(
            (busybox.name, busybox.version, busybox.versioned),
            ("busybox", "1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz", false)
        );
        assert_eq!(
            busybox.purl,
            "pkg:nix/busybox@1qd8hsvmg52b8pm8cbsp0ahc1q5gv2dz"
        );
        let hello = entries.iter().find(|e| e.path.path == HELLO).unwrap();
        assert_eq!(hello.purl, "pkg:nix/hello@2.12.1");
        assert_eq!(hello.meta.len(), 1);
        assert_eq!(hello.depends_on, [BUSYBOX, GLIBC]);
    }

    /// A closure of `n` paths, each referring to itself and up to four paths before it.
    pub(super) fn synthetic_closure(n: usize) -> Closure {
        let name = |i: usize| format!("/nix/store/{i:032}-package{i}-1.{i}");
        let paths: Vec<StorePath> = (0..n)
            .map(|i| {
                let mut references: Vec<String> = (i.saturating_sub(4)..=i).map(name).collect();
                references.sort();
                StorePath {
                    path: name(i),
                    deriver: None,
                    nar_hash: format!("sha256:{i:064x}"),
                    nar_size: i as u64,
                    references,
                }
            })
            .collect();
        Closure {
            root: name(n - 1),
            paths,
            packages: vec!["package0".to_owned()],
            meta: Vec::new(),
        }
    }

    #[test]
    fn a_thousand_paths() {
        let closure = synthetic_closure(1000);
        let metas = [PackageMeta {
            attr: "package0".to_owned(),
            path: closure.paths[0].path.clone(),
            licenses: vec!["MIT".to_owned()],
            ..PackageMeta::default()
        }];
        let start = std::time::Instant::now();
        let spdx = spdx(&subject(), &closure, &metas);
        let cyclonedx = cyclonedx(&subject(), &closure, &metas);
        // Printed for `--nocapture`; no test asserts a time.
        println!(
            "SPDX ({} KiB) and CycloneDX ({} KiB) of 1000 paths in {:?}",
            spdx.len() / 1024,
            cyclonedx.len() / 1024,
            start.elapsed()
        );
        let spdx: serde_json::Value = serde_json::from_slice(&spdx).unwrap();
        let cyclonedx: serde_json::Value = serde_json::from_slice(&cyclonedx).unwrap();
        assert_eq!(spdx["packages"].as_array().unwrap().len(), 1001);
        // 0 to 4 references to other paths each: 4 * 1000 - 10, and the image's and the
        // document's.
        assert_eq!(spdx["relationships"].as_array().unwrap().len(), 3990 + 2);
        assert_eq!(cyclonedx["components"].as_array().unwrap().len(), 1000);
        assert_eq!(cyclonedx["dependencies"].as_array().unwrap().len(), 1001);
    }

    #[test]
    fn purls_and_urls_are_escaped_or_refused() {
        assert_eq!(purl_encode("gtk+3"), "gtk%2B3");
        assert_eq!(purl_encode("a b@c/d?e=f"), "a%20b%40c%2Fd%3Fe%3Df");
        assert_eq!(purl_encode("libfoo_bar-1.2~rc1"), "libfoo_bar-1.2~rc1");
        assert_eq!(web_url(" https://curl.se/ "), Some("https://curl.se/"));
        assert_eq!(
            web_url("http://x.org/a?b=c#d"),
            Some("http://x.org/a?b=c#d")
        );
        for bad in [
            "https://",
            "ftp://x.org",
            "not a url",
            "https://x.org/a b",
            "https://x.org/{a}",
        ] {
            assert_eq!(web_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_split_as_nix_splits_them() {
        let split = |p| name_and_version(p);
        assert_eq!(
            split("/nix/store/5541l72h3ynxh4ljsvhpkfgqjpzqx4ph-bash-interactive-5.2"),
            ("bash-interactive", Some("5.2"))
        );
        assert_eq!(
            split("/nix/store/qsdf5y4jd9na5jwkfiswinnaky5syp95-hello-2.12.1"),
            ("hello", Some("2.12.1"))
        );
        assert_eq!(
            split("/nix/store/0pq57062yad9qdys0haj263f40shikhh-busybox"),
            ("busybox", None)
        );
        assert_eq!(
            split("/nix/store/0pq57062yad9qdys0haj263f40shikhh-nixery-image-root"),
            ("nixery-image-root", None)
        );
        assert_eq!(
            split("/nix/store/0pq57062yad9qdys0haj263f40shikhh-xev-1.2.5"),
            ("xev", Some("1.2.5"))
        );
        assert_eq!(
            store_hash("/nix/store/0pq57062yad9qdys0haj263f40shikhh-busybox"),
            "0pq57062yad9qdys0haj263f40shikhh"
        );
    }
}
