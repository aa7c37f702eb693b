//! Writing a layer: a deterministic tarball (entries sorted, mtime 1, owner root but for the
//! `nonroot` user's home, modes and symlinks kept, parent directories present), compressed in
//! parallel with gzip or zstd ([`super::parallel`]), with the sha256 of the compressed blob and of the tarball (its `diff_id`) computed as the
//! bytes stream through. The same inputs always give byte-identical blobs.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

use super::parallel::{Codec, ParallelWriter};
use crate::image::nonroot;
use crate::manifest::{Digest, Layer};

/// The modification time of every entry (the one Nix gives store paths).
const MTIME: u64 = 1;

/// What goes into a layer.
pub enum LayerContents<'a> {
    /// Store paths, each at its own place under `/nix/store`.
    StorePaths(&'a [String]),
    /// The image root: the tree at `path` becomes `/`, plus a world-writable `/tmp`; with
    /// `nonroot`, `/etc/passwd` and `/etc/group` naming the user `nonroot` and its home
    /// directory, owned by it (these win over the tree's entries of the same names).
    Root { path: &'a Path, nonroot: bool },
}

/// One entry of the tarball: where it goes, where it comes from and whose it is (uid and gid).
struct Entry {
    name: PathBuf,
    kind: Kind,
    owner: u64,
}

enum Kind {
    Dir {
        mode: u32,
    },
    File {
        source: PathBuf,
        mode: u32,
        size: u64,
    },
    /// A file nixery writes itself.
    Text {
        text: &'static str,
    },
    Symlink {
        target: PathBuf,
    },
}

/// Bytes read from a file at a time while packing.
const READ_BUFFER: usize = 256 * 1024;

/// Packs `contents` into `out` as a tarball compressed with `codec` on the process's
/// compression pool, with at most `in_flight` blocks at a time.
pub fn pack(
    contents: LayerContents<'_>,
    codec: Codec,
    in_flight: usize,
    out: impl Write,
) -> io::Result<Layer> {
    let mut compressed = HashingWriter::new(out);
    let tarball = pack_tarball(contents, codec, in_flight, &mut compressed)?;
    Ok(Layer {
        digest: compressed.digest(),
        diff_id: tarball.diff_id,
        size: tarball.size,
    })
}

/// What [`pack_tarball`] knows of a layer it wrote: all of [`Layer`] but the compressed blob's
/// digest.
pub struct Tarball {
    /// The sha256 of the tarball, uncompressed.
    pub diff_id: Digest,
    /// Compressed bytes written.
    pub size: u64,
}

/// [`pack`] into a writer that hashes the compressed bytes itself, as a staged blob does: a
/// second sha256 of them here would cost packing a few percent of its CPU time for nothing.
pub fn pack_tarball(
    contents: LayerContents<'_>,
    codec: Codec,
    in_flight: usize,
    out: impl Write,
) -> io::Result<Tarball> {
    let mut entries = Vec::new();
    match contents {
        LayerContents::StorePaths(paths) => {
            entries.push(dir("nix", 0o755));
            entries.push(dir("nix/store", 0o755));
            for path in paths {
                let path = Path::new(path);
                let name = path.strip_prefix("/").map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "store paths are absolute")
                })?;
                collect(path, name.to_path_buf(), None, &mut entries)?;
            }
        }
        LayerContents::Root { path, nonroot } => {
            for child in sorted_children(path)? {
                let name = PathBuf::from(child.file_name().expect("a child has a name"));
                collect(&child, name, Some(0o755), &mut entries)?;
            }
            entries.push(dir("tmp", 0o1777));
            if nonroot {
                add_nonroot_user(&mut entries);
            }
        }
    }
    entries.sort_by(|a, b| a.name.as_os_str().cmp(b.name.as_os_str()));

    let compressed = Counting {
        inner: out,
        count: 0,
    };
    let compressing = ParallelWriter::new(compressed, codec, in_flight)?;
    let mut tar = tar::Builder::new(HashingWriter::new(compressing));
    for entry in &entries {
        append(&mut tar, entry)?;
    }
    let uncompressed = tar.into_inner()?;
    let diff_id = uncompressed.digest();
    let mut compressed = uncompressed.inner.finish()?;
    compressed.inner.flush()?;
    Ok(Tarball {
        diff_id,
        size: compressed.count,
    })
}

fn dir(name: &str, mode: u32) -> Entry {
    Entry {
        name: PathBuf::from(name),
        kind: Kind::Dir { mode },
        owner: 0,
    }
}

/// The `nonroot` user's entries, in place of the root tree's of the same names (a package's
/// `etc/passwd`, or an `etc` that is a symlink into the store).
fn add_nonroot_user(entries: &mut Vec<Entry>) {
    let home = nonroot::HOME.trim_start_matches('/');
    let parent = Path::new(home)
        .parent()
        .expect("the home is in a directory");
    let ours = [
        dir("etc", 0o755),
        Entry {
            name: PathBuf::from("etc/passwd"),
            kind: Kind::Text {
                text: nonroot::PASSWD,
            },
            owner: 0,
        },
        Entry {
            name: PathBuf::from("etc/group"),
            kind: Kind::Text {
                text: nonroot::GROUP,
            },
            owner: 0,
        },
        Entry {
            name: parent.to_path_buf(),
            kind: Kind::Dir { mode: 0o755 },
            owner: 0,
        },
        Entry {
            name: PathBuf::from(home),
            kind: Kind::Dir { mode: 0o755 },
            owner: nonroot::ID,
        },
    ];
    entries.retain(|e| !ours.iter().any(|o| o.name == e.name) && !e.name.starts_with(home));
    entries.extend(ours);
}

fn sorted_children(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut children = fs::read_dir(path)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()?;
    children.sort();
    Ok(children)
}

/// Adds `source` and everything below it, named from `name` down. Directories get `dir_mode`
/// when given (the image root's directories come from the read-only store but should look like
/// an ordinary root's), else their own.
fn collect(
    source: &Path,
    name: PathBuf,
    dir_mode: Option<u32>,
    entries: &mut Vec<Entry>,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(source)?;
    let mode = meta.permissions().mode() & 0o7777;
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        entries.push(Entry {
            name,
            kind: Kind::Symlink {
                target: fs::read_link(source)?,
            },
            owner: 0,
        });
    } else if file_type.is_dir() {
        for child in sorted_children(source)? {
            let child_name = name.join(child.file_name().expect("a child has a name"));
            collect(&child, child_name, dir_mode, entries)?;
        }
        entries.push(Entry {
            name,
            kind: Kind::Dir {
                mode: dir_mode.unwrap_or(mode),
            },
            owner: 0,
        });
    } else if file_type.is_file() {
        entries.push(Entry {
            name,
            kind: Kind::File {
                source: source.to_path_buf(),
                mode,
                size: meta.len(),
            },
            owner: 0,
        });
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is neither a file, a directory nor a symlink",
                source.display()
            ),
        ));
    }
    Ok(())
}

fn append<W: Write>(tar: &mut tar::Builder<W>, entry: &Entry) -> io::Result<()> {
    let mut header = Header::new_gnu();
    header.set_uid(entry.owner);
    header.set_gid(entry.owner);
    header.set_mtime(MTIME);
    match &entry.kind {
        Kind::Dir { mode } => {
            header.set_entry_type(EntryType::Directory);
            header.set_mode(*mode);
            header.set_size(0);
            tar.append_data(&mut header, &entry.name, io::empty())
        }
        Kind::File { source, mode, size } => {
            header.set_entry_type(EntryType::Regular);
            header.set_mode(*mode);
            header.set_size(*size);
            let file = io::BufReader::with_capacity(READ_BUFFER, fs::File::open(source)?);
            let read = io::Read::take(file, *size);
            tar.append_data(&mut header, &entry.name, read)
        }
        Kind::Text { text } => {
            header.set_entry_type(EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(text.len() as u64);
            tar.append_data(&mut header, &entry.name, text.as_bytes())
        }
        Kind::Symlink { target } => {
            header.set_entry_type(EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, &entry.name, target)
        }
    }
}

/// Passes bytes through while hashing them.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn digest(&self) -> Digest {
        Digest::from_sha256(self.hasher.clone().finalize().into())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Passes bytes through while counting them.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    const GZIP: Codec = Codec::Gzip(6);

    /// The store paths of [`fixture`]'s package set.
    fn fixture_paths(dir: &tempfile::TempDir) -> [String; 1] {
        [dir.path()
            .join("nix/store/abc-pkg")
            .to_string_lossy()
            .into_owned()]
    }

    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("nix/store/abc-pkg");
        fs::create_dir_all(pkg.join("bin")).unwrap();
        fs::write(pkg.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
        fs::set_permissions(pkg.join("bin/tool"), fs::Permissions::from_mode(0o555)).unwrap();
        symlink("tool", pkg.join("bin/alias")).unwrap();
        let long = pkg.join("x".repeat(120)).join("y".repeat(120));
        fs::create_dir_all(&long).unwrap();
        fs::write(long.join("z".repeat(50)), b"deep").unwrap();
        dir
    }

    /// One unpacked entry: name, type, mode, contents and link target.
    type Unpacked = (String, EntryType, u32, Vec<u8>, Option<String>);

    fn unpack(blob: &[u8]) -> Vec<Unpacked> {
        let mut tar_bytes = Vec::new();
        flate2::read::MultiGzDecoder::new(blob)
            .read_to_end(&mut tar_bytes)
            .unwrap();
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let header = e.header().clone();
                assert_eq!(header.mtime().unwrap(), MTIME);
                let owner = (header.uid().unwrap(), header.gid().unwrap());
                let home = nonroot::HOME.trim_start_matches('/');
                let expected = if e.path().unwrap() == Path::new(home) {
                    nonroot::ID
                } else {
                    0
                };
                assert_eq!(owner, (expected, expected));
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned());
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (
                    name,
                    header.entry_type(),
                    header.mode().unwrap(),
                    data,
                    link,
                )
            })
            .collect()
    }

    #[test]
    fn store_paths_are_packed_with_parents_modes_and_links() {
        let dir = fixture();
        let path = dir.path().join("nix/store/abc-pkg");
        let paths = [path.to_string_lossy().into_owned()];
        let mut blob = Vec::new();
        let layer = pack(LayerContents::StorePaths(&paths), GZIP, 2, &mut blob).unwrap();
        assert_eq!(layer.size, blob.len() as u64);
        assert_eq!(layer.digest, Digest::of(&blob));

        let mut tar_bytes = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut tar_bytes)
            .unwrap();
        assert_eq!(layer.diff_id, Digest::of(&tar_bytes));

        let entries = unpack(&blob);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "entries are sorted");
        assert_eq!(names[0], "nix");
        assert_eq!(names[1], "nix/store");
        let tool = entries.iter().find(|e| e.0.ends_with("bin/tool")).unwrap();
        assert_eq!(tool.2, 0o555);
        assert_eq!(tool.3, b"#!/bin/sh\necho tool\n");
        let alias = entries.iter().find(|e| e.0.ends_with("bin/alias")).unwrap();
        assert_eq!(alias.1, EntryType::Symlink);
        assert_eq!(alias.4.as_deref(), Some("tool"));
        assert!(
            entries
                .iter()
                .any(|e| e.0.ends_with(&"z".repeat(50)) && e.3 == b"deep")
        );
    }

    #[test]
    fn packing_is_deterministic() {
        let dir = fixture();
        let paths = fixture_paths(&dir);
        let mut a = Vec::new();
        let mut b = Vec::new();
        pack(LayerContents::StorePaths(&paths), GZIP, 2, &mut a).unwrap();
        pack(LayerContents::StorePaths(&paths), GZIP, 1, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_zstd_layer_holds_the_same_tarball_as_the_gzip_one() {
        let dir = fixture();
        let paths = fixture_paths(&dir);
        let mut gzip = Vec::new();
        let mut zstd = Vec::new();
        let gzipped = pack(LayerContents::StorePaths(&paths), GZIP, 2, &mut gzip).unwrap();
        let zstded = pack(
            LayerContents::StorePaths(&paths),
            Codec::Zstd(3),
            2,
            &mut zstd,
        )
        .unwrap();
        assert_eq!(zstded.diff_id, gzipped.diff_id);
        assert_eq!(zstded.digest, Digest::of(&zstd));
        assert_eq!(zstded.size, zstd.len() as u64);
        assert_ne!(zstded.digest, gzipped.digest);
        let tar_bytes = ::zstd::stream::decode_all(&zstd[..]).unwrap();
        assert_eq!(Digest::of(&tar_bytes), zstded.diff_id);
    }

    #[test]
    fn the_root_gets_tmp_and_ordinary_directory_modes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("bin")).unwrap();
        symlink("/nix/store/abc-pkg/bin/tool", root.join("bin/tool")).unwrap();
        fs::set_permissions(root.join("bin"), fs::Permissions::from_mode(0o555)).unwrap();
        let mut blob = Vec::new();
        let contents = LayerContents::Root {
            path: &root,
            nonroot: false,
        };
        pack(contents, GZIP, 2, &mut blob).unwrap();
        let entries = unpack(&blob);
        let summary: Vec<(&str, u32)> = entries.iter().map(|e| (e.0.as_str(), e.2)).collect();
        assert_eq!(
            summary,
            [("bin", 0o755), ("bin/tool", 0o777), ("tmp", 0o1777)]
        );
        assert_eq!(entries[1].4.as_deref(), Some("/nix/store/abc-pkg/bin/tool"));
    }

    #[test]
    fn a_nonroot_root_gets_the_user_and_its_home() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        // A package's etc/passwd is replaced; its other files in etc stay.
        fs::create_dir_all(root.join("etc/ssl")).unwrap();
        symlink("/nix/store/abc-pkg/etc/passwd", root.join("etc/passwd")).unwrap();
        let mut blob = Vec::new();
        let contents = LayerContents::Root {
            path: &root,
            nonroot: true,
        };
        pack(contents, GZIP, 2, &mut blob).unwrap();
        let entries = unpack(&blob);
        let summary: Vec<(&str, EntryType, u32)> =
            entries.iter().map(|e| (e.0.as_str(), e.1, e.2)).collect();
        assert_eq!(
            summary,
            [
                ("etc", EntryType::Directory, 0o755),
                ("etc/group", EntryType::Regular, 0o644),
                ("etc/passwd", EntryType::Regular, 0o644),
                ("etc/ssl", EntryType::Directory, 0o755),
                ("home", EntryType::Directory, 0o755),
                ("home/nonroot", EntryType::Directory, 0o755),
                ("tmp", EntryType::Directory, 0o1777),
            ]
        );
        let passwd = String::from_utf8(entries[2].3.clone()).unwrap();
        assert!(passwd.contains("nonroot:x:65532:65532:nonroot:/home/nonroot:"));
        let group = String::from_utf8(entries[1].3.clone()).unwrap();
        assert!(group.contains("nonroot:x:65532:"));
    }
}
