//! The package catalog of a pinned package source, behind search and "did you mean": every
//! package a client can pull, with its pullable name, attribute path, version, description,
//! homepage and license.
//!
//! A catalog comes from evaluating `nix/catalog.nix` on the set ([`Catalog::evaluate`]), or for
//! a nixos.org channel from the `packages.json.br` it publishes
//! ([`Catalog::from_packages_json_br`]); it is stored compactly ([`Catalog::to_bytes`]) so it
//! is made once per commit. Searching and suggesting are in [`index`].
//!
//! Bounded: at most [`MAX_PACKAGES`] packages, each field cut to a few hundred bytes; a
//! catalog of nixpkgs' 120,000 packages takes about 46 MB of memory (BENCHMARKS.md).

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::CommandError;
use crate::nix::ListingError;

mod index;
mod name;
mod packages_json;
mod service;

pub use index::{MAX_RESULTS, MAX_SUGGESTIONS};
pub use name::pullable_name;
pub use service::{Catalogs, Settings as CatalogSettings};

/// Most packages in one catalog: more than three times nixpkgs' 120,000, so a real package set
/// always fits and a runaway one is refused before it takes gigabytes.
pub const MAX_PACKAGES: usize = 400_000;

/// Most bytes the evaluation of a catalog may print: nixpkgs' 120,000 packages print about 40
/// MB, and [`MAX_PACKAGES`] with every field at its limit would print more than any real set.
pub const MAX_EVALUATED_BYTES: usize = 128 << 20;

/// Longest version kept, in bytes; longer ones are cut (as are the fields below).
const MAX_VERSION_BYTES: usize = 64;
/// Longest description kept: nixpkgs' are one line (its long descriptions are not read).
const MAX_DESCRIPTION_BYTES: usize = 512;
/// Longest homepage kept.
const MAX_HOMEPAGE_BYTES: usize = 512;
/// Longest license text kept (several licenses joined).
const MAX_LICENSE_BYTES: usize = 256;

/// What stored catalogs start with, then the format byte, then a zlib stream of the packages.
const MAGIC: &[u8] = b"nixery-catalog\n";
/// The stored format this code writes and reads. Change it with the layout of [`Stored`].
const FORMAT: u8 = 1;
/// Most bytes a stored catalog may unpack to: what [`MAX_PACKAGES`] packages with every field at
/// its longest take (about 750 MB), so whatever [`Catalog::to_bytes`] writes reads back; a real
/// one is some 16 MB for 120,000 packages.
const MAX_STORED_BYTES: u64 = 1 << 30;

/// One package of the catalog, as search results show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Package {
    /// What a client pulls: `xorg.xev`, `bashinteractive`, `1password`.
    pub name: String,
    /// The attribute path in the package set: `xorg.xev`, `bashInteractive`, `_1password`.
    pub attr: String,
    pub version: Option<String>,
    pub description: Option<String>,
    pub homepage: Option<String>,
    /// SPDX id (else nixpkgs' short or full name) of the license; several joined with `, `.
    pub license: Option<String>,
}

impl Package {
    /// The package at attribute path `attr`, its name given by [`pullable_name`] and each field
    /// trimmed and cut to its bound (an empty one is none); `None` when it cannot be pulled.
    pub fn new(
        attr: String,
        version: Option<String>,
        description: Option<String>,
        homepage: Option<String>,
        license: Option<String>,
    ) -> Option<Package> {
        Some(Package {
            name: pullable_name(&attr)?,
            attr,
            version: bounded(version, MAX_VERSION_BYTES),
            description: bounded(description, MAX_DESCRIPTION_BYTES),
            homepage: bounded(homepage, MAX_HOMEPAGE_BYTES),
            license: bounded(license, MAX_LICENSE_BYTES),
        })
    }

    /// Bytes of heap its strings hold.
    fn heap_bytes(&self) -> usize {
        let optional = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
        self.name.capacity()
            + self.attr.capacity()
            + optional(&self.version)
            + optional(&self.description)
            + optional(&self.homepage)
            + optional(&self.license)
    }
}

/// `text` trimmed and cut to at most `max` bytes (at a character boundary); none if empty.
fn bounded(text: Option<String>, max: usize) -> Option<String> {
    let text = text?;
    let trimmed = text.trim();
    let mut end = trimmed.len().min(max);
    while !trimmed.is_char_boundary(end) {
        end -= 1;
    }
    let kept = &trimmed[..end];
    if kept.is_empty() {
        None
    } else if kept.len() == text.len() {
        Some(text)
    } else {
        Some(kept.to_owned())
    }
}

/// Why there is no catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "nix-instantiate could not be run to list the packages (is Nix installed? `apt-get install nix-bin`)"
    )]
    Unavailable(#[source] CommandError),
    #[error("listing the package set's packages took longer than {}s", .0.as_secs())]
    Timeout(Duration, #[source] CommandError),
    #[error("Nix could not list the package set's packages: {0}")]
    EvalFailed(String, #[source] CommandError),
    #[error("nix-instantiate gave a package list nixery cannot read: {0}")]
    BadOutput(String),
    #[error("writing the catalog expression: {0}")]
    WorkDir(#[source] std::io::Error),
    #[error("packages.json cannot be read: {0}")]
    PackagesJson(String),
    #[error("{}", packages_json_version(.0))]
    PackagesJsonVersion(Option<u64>),
    #[error("the stored package catalog is damaged: {0}")]
    Corrupt(String),
    #[error("the stored package catalog has format {0}; this nixery reads format {FORMAT}")]
    UnsupportedFormat(u8),
    #[error("the package catalog is too large: {0}")]
    TooLarge(String),
    #[error("building the package catalog failed: {0}")]
    Internal(String),
}

fn packages_json_version(version: &Option<u64>) -> String {
    match version {
        Some(v) => format!("packages.json has format version {v}; nixery reads version 2"),
        None => "packages.json has no version".to_owned(),
    }
}

impl CatalogError {
    /// A failed `nix-instantiate`, in words a person can act on; the command's stderr stays in
    /// the source for the log.
    fn from_command(err: CommandError) -> CatalogError {
        match &err {
            CommandError::Spawn { .. } | CommandError::Io { .. } => CatalogError::Unavailable(err),
            CommandError::Timeout { timeout, .. } => CatalogError::Timeout(*timeout, err),
            CommandError::Failed { stderr_tail, .. } => {
                CatalogError::EvalFailed(crate::nix::error_cause(stderr_tail), err)
            }
            CommandError::TooMuchOutput { limit, .. } => CatalogError::TooLarge(format!(
                "Nix printed more than {limit} bytes listing the package set's packages"
            )),
        }
    }
}

impl From<ListingError> for CatalogError {
    fn from(err: ListingError) -> CatalogError {
        match err {
            ListingError::WorkDir(e) => CatalogError::WorkDir(e),
            ListingError::Panicked(e) => CatalogError::Internal(e),
            ListingError::Nix(e) => CatalogError::from_command(e),
        }
    }
}

/// A package as `nix/catalog.nix` lists it.
#[derive(Deserialize)]
struct Evaluated {
    attr: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    homepage: Option<String>,
    #[serde(default)]
    license: Option<String>,
}

/// A package as stored (format 1), written from borrowed fields; the name is not stored, it
/// follows from the attribute path.
#[derive(Serialize)]
struct StoredRef<'a> {
    attr: &'a str,
    version: Option<&'a str>,
    description: Option<&'a str>,
    homepage: Option<&'a str>,
    license: Option<&'a str>,
}

/// [`StoredRef`] read back: the same fields in the same order.
#[derive(Deserialize)]
struct Stored {
    attr: String,
    version: Option<String>,
    description: Option<String>,
    homepage: Option<String>,
    license: Option<String>,
}

/// The packages of one package source, indexed for search and suggestions. Building one from
/// 120,000 packages takes about 200 ms of CPU, and so do [`Catalog::from_bytes`],
/// [`Catalog::to_bytes`] and [`Catalog::from_packages_json_br`]: async callers should run them in
/// `spawn_blocking` ([`Catalog::evaluate`] does).
pub struct Catalog {
    /// Sorted by name, each name once.
    packages: Vec<Package>,
    index: index::Index,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("packages", &self.packages.len())
            .finish_non_exhaustive()
    }
}

impl Catalog {
    /// The catalog of `packages`. Each package's name is recomputed from its attribute path
    /// ([`Package::new`]: those that cannot be pulled are left out); when several attributes
    /// have the same name, the one the name resolver picks is kept. Past [`MAX_PACKAGES`], the
    /// rest (by name) is left out with a warning.
    pub fn from_packages(packages: Vec<Package>) -> Catalog {
        let mut packages: Vec<Package> = packages
            .into_iter()
            .filter_map(|p| Package::new(p.attr, p.version, p.description, p.homepage, p.license))
            .collect();
        packages.sort_unstable_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then_with(|| name::resolver_order(&a.attr, &b.attr))
        });
        packages.dedup_by(|later, kept| later.name == kept.name);
        if packages.len() > MAX_PACKAGES {
            tracing::warn!(
                packages = packages.len(),
                kept = MAX_PACKAGES,
                "the package catalog is too large: the last packages by name are left out"
            );
            packages.truncate(MAX_PACKAGES);
        }
        packages.shrink_to_fit();
        let index = index::Index::build(&packages);
        Catalog { packages, index }
    }

    /// [`Catalog::from_packages`], refusing more than [`MAX_PACKAGES`] instead of cutting.
    fn checked(packages: Vec<Package>, what: &str) -> Result<Catalog, CatalogError> {
        if packages.len() > MAX_PACKAGES {
            return Err(CatalogError::TooLarge(format!(
                "{what} has {} packages, more than {MAX_PACKAGES}",
                packages.len()
            )));
        }
        Ok(Catalog::from_packages(packages))
    }

    /// Evaluates `nix/catalog.nix` on the package set at `pkgs_path` for `system`
    /// ([`crate::nix::list_packages`], with `work_dir`, `env` and `timeout`); what Nix prints
    /// may be up to `max_output` bytes (the server allows [`MAX_EVALUATED_BYTES`]).
    pub async fn evaluate(
        pkgs_path: &Path,
        system: &str,
        work_dir: &Path,
        env: &crate::nix::NixEnv,
        timeout: Duration,
        max_output: usize,
    ) -> Result<Catalog, CatalogError> {
        tracing::info!(pkgs = %pkgs_path.display(), "listing packages for the catalog");
        let started = std::time::Instant::now();
        let listed =
            crate::nix::list_packages(pkgs_path, system, work_dir, env, timeout, max_output)
                .await?;
        let catalog = tokio::task::spawn_blocking(move || {
            let listed: Vec<Evaluated> = serde_json::from_slice(&listed)
                .map_err(|e| CatalogError::BadOutput(e.to_string()))?;
            let packages = listed
                .into_iter()
                .filter_map(|p| {
                    Package::new(p.attr, p.version, p.description, p.homepage, p.license)
                })
                .collect();
            Catalog::checked(packages, "the package set")
        })
        .await
        .map_err(|e| CatalogError::Internal(e.to_string()))??;
        tracing::info!(
            pkgs = %pkgs_path.display(),
            packages = catalog.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "package catalog evaluated"
        );
        Ok(catalog)
    }

    /// The catalog of a channel's `packages.json.br`, as nixos.org publishes it.
    pub fn from_packages_json_br(bytes: &[u8]) -> Result<Catalog, CatalogError> {
        Catalog::checked(packages_json::parse(bytes)?, "packages.json")
    }

    /// The catalog as bytes to store: a magic line, the format, and the packages zlib-compressed
    /// (about 4 MB for 120,000 packages; a quarter of a second of CPU, like reading it back).
    pub fn to_bytes(&self) -> Vec<u8> {
        let stored: Vec<StoredRef<'_>> = self
            .packages
            .iter()
            .map(|p| StoredRef {
                attr: &p.attr,
                version: p.version.as_deref(),
                description: p.description.as_deref(),
                homepage: p.homepage.as_deref(),
                license: p.license.as_deref(),
            })
            .collect();
        // Serializing strings into a Vec cannot fail, but if it did the bytes read back as an
        // error rather than as a wrong catalog.
        let payload = postcard::to_allocvec(&stored).unwrap_or_else(|e| {
            tracing::error!(error = %e, "serializing the package catalog failed");
            Vec::new()
        });
        let mut bytes = MAGIC.to_vec();
        bytes.push(FORMAT);
        let mut encoder = flate2::write::ZlibEncoder::new(bytes, flate2::Compression::default());
        let written = encoder.write_all(&payload);
        match written.and_then(|()| encoder.finish()) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "compressing the package catalog failed");
                MAGIC.to_vec()
            }
        }
    }

    /// A catalog stored by [`Catalog::to_bytes`]; damaged bytes are an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Catalog, CatalogError> {
        let corrupt = |what: &str| CatalogError::Corrupt(what.to_owned());
        let rest = bytes
            .strip_prefix(MAGIC)
            .ok_or_else(|| corrupt("it is not a nixery package catalog"))?;
        let (&format, compressed) = rest.split_first().ok_or_else(|| corrupt("it is empty"))?;
        if format != FORMAT {
            return Err(CatalogError::UnsupportedFormat(format));
        }
        let mut payload = Vec::new();
        flate2::read::ZlibDecoder::new(compressed)
            .take(MAX_STORED_BYTES + 1)
            .read_to_end(&mut payload)
            .map_err(|e| CatalogError::Corrupt(e.to_string()))?;
        if payload.len() as u64 > MAX_STORED_BYTES {
            return Err(CatalogError::TooLarge(format!(
                "the stored catalog unpacks to more than {MAX_STORED_BYTES} bytes"
            )));
        }
        let (stored, rest): (Vec<Stored>, &[u8]) = postcard::take_from_bytes(&payload)
            .map_err(|e| CatalogError::Corrupt(e.to_string()))?;
        if !rest.is_empty() {
            return Err(corrupt("it has bytes after its packages"));
        }
        let packages = stored
            .into_iter()
            .filter_map(|p| Package::new(p.attr, p.version, p.description, p.homepage, p.license))
            .collect();
        Catalog::checked(packages, "the stored catalog")
    }

    /// How many packages it has.
    pub fn len(&self) -> usize {
        self.packages.len()
    }

    /// Whether it has no package.
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty()
    }

    /// Every package, sorted by name.
    pub fn packages(&self) -> &[Package] {
        &self.packages
    }

    /// The package a client pulls as `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Package> {
        self.packages
            .binary_search_by(|p| p.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.packages.get(i))
    }

    /// Packages matching `query`, best first: exact (the name, or the last component of a dotted
    /// name: `xev` finds `xorg.xev`), then prefix (shorter first), then fuzzy (typos by edit
    /// distance, then subsequences by score); at most `limit`, and never more than
    /// [`MAX_RESULTS`]. The query is read as names are (`BashInteractive` and `_1password`
    /// work).
    pub fn search(&self, query: &str, limit: usize) -> Vec<&Package> {
        self.index.search(&self.packages, query, limit)
    }

    /// Up to [`MAX_SUGGESTIONS`] pullable names close to `missing` (a name the set does not
    /// have), the closest first; none when nothing is close.
    pub fn suggest(&self, missing: &str) -> Vec<String> {
        self.index.suggest(&self.packages, missing)
    }

    /// Bytes of heap the catalog holds (its strings, package list and index; not the
    /// allocator's own overhead).
    pub fn heap_bytes(&self) -> usize {
        self.packages.capacity() * std::mem::size_of::<Package>()
            + self.packages.iter().map(Package::heap_bytes).sum::<usize>()
            + self.index.heap_bytes()
    }
}

#[cfg(test)]
mod tests;
