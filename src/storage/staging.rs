//! Where blobs are written before they are committed: a local directory that only storage
//! knows, and the staged writer that hashes a blob while it is written, so that a backend
//! commits it under a digest only once the bytes are shown to have that digest.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tempfile::NamedTempFile;

use super::StorageError;
use crate::manifest::Digest;

/// A backend's staging directory. Cloning it hands out the same directory (to blocking work
/// that stages a blob, or to what removes the leftovers once the server has stopped); where it
/// is stays private to storage.
#[derive(Clone, Debug)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// Staging in `dir`, emptied (and created if needed) now: what a crash left there is never
    /// committed.
    pub(super) fn open(dir: PathBuf) -> io::Result<Self> {
        clear_staging(&dir)?;
        Ok(Staging { dir })
    }

    /// A new, empty blob to write into (a blocking call: it creates a file).
    pub fn stage(&self) -> io::Result<StagedBlob> {
        Ok(StagedBlob {
            file: self.file()?,
            hasher: Sha256::new(),
        })
    }

    /// A new, empty staging file, removed when dropped unless a backend persists it.
    pub(super) fn file(&self) -> io::Result<NamedTempFile> {
        NamedTempFile::new_in(&self.dir)
    }

    /// What a write to the staging directory failed on, for errors.
    pub(super) fn describe(&self) -> String {
        format!("writing to {}", self.dir.display())
    }

    /// Removes what is left in the staging directory once every task has stopped: a file that
    /// blocking work (a layer being packed) was still writing when the process was left to
    /// exit. Nothing can commit it any more; the next start would remove it anyway.
    pub fn remove_leftovers(&self) {
        let dir = &self.dir;
        let leftovers = std::fs::read_dir(dir).map_or(0, |entries| entries.count());
        if leftovers == 0 {
            return;
        }
        match clear_staging(dir) {
            Ok(()) => {
                tracing::info!(files = leftovers, dir = %dir.display(), "removed staging files of work cut short")
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "could not remove staging files")
            }
        }
    }
}

/// Empties (creating if needed) the staging directory `dir`.
pub(crate) fn clear_staging(dir: &Path) -> io::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)
}

/// A blob being written to a staging file, hashed (sha256) as it is written. Committing it
/// ([`super::Storage::commit`]) stores it under its digest; dropping it removes the file.
pub struct StagedBlob {
    file: NamedTempFile,
    hasher: Sha256,
}

impl Write for StagedBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl StagedBlob {
    /// The digest of the bytes written so far (a writer that wrapped this one must have been
    /// flushed).
    pub fn digest(&self) -> Digest {
        Digest::from_sha256(self.hasher.clone().finalize().into())
    }

    /// The staged bytes, once shown to be those of `expected`: every backend's commit starts
    /// here, and only a verified blob gives its file up. A mismatch drops (removes) the file.
    pub(super) fn verify(self, expected: &Digest) -> Result<VerifiedBlob, StorageError> {
        let sha256: [u8; 32] = self.hasher.finalize().into();
        let actual = Digest::from_sha256(sha256);
        if actual != *expected {
            return Err(StorageError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        Ok(VerifiedBlob {
            file: self.file,
            sha256,
        })
    }
}

/// A staged blob whose bytes have the digest it is committed under.
pub(super) struct VerifiedBlob {
    file: NamedTempFile,
    sha256: [u8; 32],
}

impl VerifiedBlob {
    pub(super) fn path(&self) -> &Path {
        self.file.path()
    }

    pub(super) fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    pub(super) fn into_file(self) -> NamedTempFile {
        self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_blob_is_verified_only_against_its_own_digest() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(dir.path().join("tmp")).unwrap();
        let mut staged = staging.stage().unwrap();
        let mut out = io::BufWriter::with_capacity(3, &mut staged);
        out.write_all(b"a layer").unwrap();
        out.flush().unwrap();
        drop(out);
        let verified = staged.verify(&Digest::of(b"a layer")).unwrap();
        assert_eq!(std::fs::read(verified.path()).unwrap(), b"a layer");
        assert_eq!(
            Digest::from_sha256(verified.sha256()),
            Digest::of(b"a layer")
        );
        drop(verified);

        let mut staged = staging.stage().unwrap();
        staged.write_all(b"a layer").unwrap();
        let err = staged.verify(&Digest::of(b"other")).err().unwrap();
        assert!(
            matches!(&err, StorageError::DigestMismatch { expected, actual }
                if *expected == Digest::of(b"other") && *actual == Digest::of(b"a layer")),
            "{err}"
        );
        // Nothing is left of a refused blob.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn leftovers_are_removed_and_the_directory_kept() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/half-a-layer"), b"...").unwrap();
        staging.remove_leftovers();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
