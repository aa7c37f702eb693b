//! Layers kept in storage: a layer is found by its cache key when its blob is still stored,
//! else packed now to a staged file and committed under its digest (so a half-packed layer is
//! never visible), and recorded under its key for the next image that has it.

use super::pack::pack_tarball;
use super::{Codec, LayerContents};
use crate::manifest::Layer;
use crate::storage::{Cache, StagedBlob, Storage, StorageError};

/// What a layer holds: [`LayerContents`], owned, to be packed on a blocking thread.
#[derive(Clone, Debug)]
pub enum Packed {
    /// Store paths, each at its own place under `/nix/store`.
    StorePaths(Vec<String>),
    /// The image root at store path `path`, with the `nonroot` user when `nonroot`.
    Root { path: String, nonroot: bool },
}

impl Packed {
    fn contents(&self) -> LayerContents<'_> {
        match self {
            Packed::StorePaths(paths) => LayerContents::StorePaths(paths),
            Packed::Root { path, nonroot } => LayerContents::Root {
                path: std::path::Path::new(path),
                nonroot: *nonroot,
            },
        }
    }
}

/// Why a layer could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("packing a layer failed: {0}")]
    Pack(#[source] std::io::Error),
}

/// The layer of `contents` under cache key `key`: from the layer cache when its blob is stored
/// (`false`), else packed with `codec`, stored and recorded now (`true`).
pub async fn stored_or_packed(
    storage: &dyn Storage,
    key: &str,
    contents: Packed,
    codec: Codec,
) -> Result<(Layer, bool), LayerError> {
    if let Some(bytes) = storage.read_cache(Cache::Layers, key).await?
        && let Ok(layer) = serde_json::from_slice::<Layer>(&bytes)
        && storage.has_blob(&layer.digest).await?
    {
        return Ok((layer, false));
    }
    let staging = storage.staging().clone();
    let (staged, layer) =
        tokio::task::spawn_blocking(move || -> std::io::Result<(StagedBlob, Layer)> {
            let mut staged = staging.stage()?;
            let out = std::io::BufWriter::with_capacity(1 << 20, &mut staged);
            // Two blocks per core in flight keep the shared pool busy. The staged blob hashes
            // the compressed bytes as they are written: its digest is the layer's.
            let tarball = pack_tarball(contents.contents(), codec, 2 * cores(), out)?;
            let layer = Layer {
                digest: staged.digest(),
                diff_id: tarball.diff_id,
                size: tarball.size,
            };
            Ok((staged, layer))
        })
        .await
        .unwrap_or_else(|panicked| Err(std::io::Error::other(panicked)))
        .map_err(LayerError::Pack)?;
    storage.commit(staged, &layer.digest, None).await?;
    let entry = serde_json::to_vec(&layer).expect("layer serialises");
    storage.write_cache(Cache::Layers, key, &entry).await?;
    tracing::debug!(digest = %layer.digest, size = layer.size, "layer packed");
    Ok((layer, true))
}

/// How many cores this machine has (two when it cannot tell): how many layers are packed at
/// once.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
