//! Popularity data: for each store path name, in how many packages' closures of a package set it
//! appears. Layering gives popular paths layers of their own, so that they are the same blob in
//! every image (see [`super::group`]).
//!
//! The format is Nixery's: one JSON object mapping a store path's name without its hash
//! (`glibc-2.38`) to a count. `nixery popularity` writes it for a package set; Nixery's popcount
//! writes it for nixpkgs from the binary cache.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest as _, Sha256};

use crate::nix::store_path_name;

/// Why popularity data could not be had. Each stops start-up: replicas sharing a bucket must
/// lay out layers identically, so none may quietly fall back to layering without the data.
#[derive(Debug, thiserror::Error)]
pub enum PopularityError {
    #[error("cannot read the popularity file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot fetch the popularity data from {url}: {message}")]
    Fetch { url: String, message: String },
    #[error(
        "the popularity data from {location} is not a JSON object of store path names to counts ({{\"glibc-2.38\": 1234, ...}}): {message}"
    )]
    Malformed { location: String, message: String },
}

/// Popularity counts by store path name. Empty when none were given: every path then counts 0
/// and layering is the plain dominator grouping.
#[derive(Clone, Debug, Default)]
pub struct Popularity {
    /// `glibc-2.38` → count.
    exact: HashMap<String, u64>,
    /// `glibc` → the largest count of any version, for data from another revision of the set.
    by_name: HashMap<String, u64>,
    max: u64,
    /// A digest of the data, part of every image's cache key.
    fingerprint: String,
}

/// Where a path's count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// Its full name (`glibc-2.38`).
    Exact,
    /// Its name without the version (`glibc`), the data having another version.
    Name,
}

impl Popularity {
    /// Data from `location`: an `http://` or `https://` URL, or a file path.
    pub async fn load(location: &str) -> Result<Popularity, PopularityError> {
        let bytes = if location.starts_with("http://") || location.starts_with("https://") {
            let fetch = |message: String| PopularityError::Fetch {
                url: crate::source::redact(location),
                message,
            };
            let response = reqwest::get(location)
                .await
                .map_err(|e| fetch(crate::source::describe_http(&e)))?;
            if !response.status().is_success() {
                return Err(fetch(format!("HTTP status {}", response.status())));
            }
            response
                .bytes()
                .await
                .map_err(|e| fetch(crate::source::describe_http(&e)))?
                .to_vec()
        } else {
            let path = location.strip_prefix("file://").unwrap_or(location);
            tokio::fs::read(path)
                .await
                .map_err(|source| PopularityError::Read {
                    path: path.to_owned(),
                    source,
                })?
        };
        Popularity::parse(&bytes).map_err(|message| PopularityError::Malformed {
            location: crate::source::redact(location),
            message,
        })
    }

    /// Data from the JSON text of a popularity file.
    pub fn parse(json: &[u8]) -> Result<Popularity, String> {
        let counts: BTreeMap<String, u64> =
            serde_json::from_slice(json).map_err(|e| e.to_string())?;
        if counts.is_empty() {
            return Err("it has no entries".to_owned());
        }
        Ok(Popularity::from_counts(counts))
    }

    /// Data from counts by store path name.
    pub fn from_counts(counts: BTreeMap<String, u64>) -> Popularity {
        let mut hasher = Sha256::new();
        for (name, count) in &counts {
            hasher.update(format!("{name} {count}\n"));
        }
        let mut by_name: HashMap<String, u64> = HashMap::new();
        for (name, &count) in &counts {
            let entry = by_name.entry(package_name(name).to_owned()).or_default();
            *entry = (*entry).max(count);
        }
        Popularity {
            max: counts.values().copied().max().unwrap_or(0),
            exact: counts.into_iter().collect(),
            by_name,
            fingerprint: hex::encode(hasher.finalize()),
        }
    }

    /// Whether there is any data.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
    }

    /// How many names the data has.
    pub fn len(&self) -> usize {
        self.exact.len()
    }

    /// The largest count in the data (0 without data).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// A digest of the data: equal for equal data, whatever its formatting.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The count of a store path (`/nix/store/<hash>-glibc-2.38`), by its full name or else by
    /// its name without the version; `None` when the data has neither.
    pub fn count(&self, store_path: &str) -> Option<(u64, Match)> {
        let name = store_path_name(store_path);
        if let Some(&count) = self.exact.get(name) {
            return Some((count, Match::Exact));
        }
        self.by_name
            .get(package_name(name))
            .map(|&count| (count, Match::Name))
    }
}

/// A name without its version, split as Nix's `builtins.parseDrvName` does: at the first `-`
/// that is followed by something other than a letter (`python3.11-minimal-3.11.2` →
/// `python3.11-minimal`).
pub fn package_name(name: &str) -> &str {
    let bytes = name.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'-' && bytes.get(i + 1).is_some_and(|c| !c.is_ascii_alphabetic()) {
            return &name[..i];
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    const GLIBC: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-glibc-2.38";

    #[test]
    fn names_split_as_nix_splits_them() {
        assert_eq!(package_name("glibc-2.38"), "glibc");
        assert_eq!(
            package_name("python3.11-minimal-3.11.2-6"),
            "python3.11-minimal"
        );
        assert_eq!(package_name("busybox"), "busybox");
        assert_eq!(package_name("stdenv-linux"), "stdenv-linux");
    }

    #[test]
    fn counts_match_by_full_name_then_by_name_without_version() {
        let p = Popularity::parse(br#"{"glibc-2.37": 7, "glibc-2.36": 9, "zlib-1.3": 3}"#).unwrap();
        assert_eq!(p.max(), 9);
        assert_eq!(
            p.count("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-glibc-2.37"),
            Some((7, Match::Exact))
        );
        assert_eq!(p.count(GLIBC), Some((9, Match::Name)));
        assert_eq!(
            p.count("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-curl-8.4.0"),
            None
        );
    }

    #[test]
    fn the_fingerprint_follows_the_data_not_its_formatting() {
        let a = Popularity::parse(br#"{"a-1": 1, "b-2": 2}"#).unwrap();
        let b = Popularity::parse(b"{ \"b-2\": 2,\n \"a-1\": 1 }").unwrap();
        let c = Popularity::parse(br#"{"a-1": 1, "b-2": 3}"#).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn malformed_data_is_refused() {
        for bad in [
            &b"[1, 2]"[..],
            b"{\"a\": -1}",
            b"{\"a\": \"many\"}",
            b"{}",
            b"not json",
        ] {
            assert!(
                Popularity::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
