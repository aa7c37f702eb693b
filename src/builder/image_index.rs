//! OCI image indexes (Docker manifest lists): the image of every platform a name is built for, each built (or found) as any
//! image is, then listed in a Docker manifest list and an OCI image index (zstd images in an OCI
//! image index alone, as they have no Docker manifest).

use std::sync::Arc;

use super::{BuildError, Builder, Image, Request};
use crate::image::Platform;
use crate::manifest::{self, Compression, Format, Manifest};
use crate::storage;

/// An image index: the image of each platform, listed in each manifest family (OCI's alone for
/// zstd images, answered whatever the family, as [`Image::manifest`] is).
#[derive(Debug)]
pub struct Index {
    docker: Option<Arc<Manifest>>,
    oci: Arc<Manifest>,
}

impl Index {
    /// The index of `images` (all of one compression), each with its platform, in the order
    /// given.
    pub fn of(images: &[(Arc<Image>, Platform)]) -> Self {
        let document = |format: Format| {
            let listed: Vec<(&Manifest, Platform)> = images
                .iter()
                .map(|(image, platform)| (image.manifest(format).as_ref(), *platform))
                .collect();
            Arc::new(Manifest::new(
                manifest::index_document(format, &listed),
                format.index_type(),
            ))
        };
        let gzip = images
            .iter()
            .all(|(image, _)| image.compression() == Compression::Gzip);
        Index {
            docker: gzip.then(|| document(Format::Docker)),
            oci: document(Format::Oci),
        }
    }

    /// The index in `format`'s family (a zstd images' OCI index in either).
    pub fn manifest(&self, format: Format) -> &Arc<Manifest> {
        match (format, &self.docker) {
            (Format::Docker, Some(docker)) => docker,
            _ => &self.oci,
        }
    }

    /// Each of the index's documents, once.
    pub(super) fn manifests(&self) -> impl Iterator<Item = &Arc<Manifest>> {
        self.docker.iter().chain(std::iter::once(&self.oci))
    }
}

/// Why an image index could not be made: the platform whose image failed (none when storing
/// the index failed), and why.
#[derive(Debug)]
pub struct PlatformFailure {
    pub platform: Option<Platform>,
    pub err: Arc<BuildError>,
}

impl Builder {
    /// See [`super::Images::index`]. The index is stored (so clients can fetch it by digest) the first
    /// time this server makes it.
    pub async fn index(
        self: &Arc<Self>,
        request: &Request,
        platforms: &[Platform],
    ) -> Result<Arc<Index>, PlatformFailure> {
        let images = futures::future::try_join_all(platforms.iter().map(|&platform| {
            let request = request.for_platform(platform);
            async move {
                match self.image(&request).await {
                    Ok(image) => {
                        let signed = self.sign_image(&request, &image).await;
                        Ok((image, platform, signed))
                    }
                    Err(err) => Err(PlatformFailure {
                        platform: Some(platform),
                        err,
                    }),
                }
            }
        }))
        .await?;
        let signed = images.iter().all(|(_, _, signed)| *signed);
        let images: Vec<(Arc<Image>, Platform)> = images
            .into_iter()
            .map(|(image, platform, _)| (image, platform))
            .collect();
        let index = Index::of(&images);
        if self
            .known_manifest(&index.manifest(Format::Docker).digest)
            .is_none()
        {
            let storage = self.storage.as_ref();
            for manifest in index.manifests() {
                storage::put_bytes(storage, &manifest.bytes, Some(manifest.media_type))
                    .await
                    .map_err(|err| PlatformFailure {
                        platform: None,
                        err: Arc::new(err.into()),
                    })?;
            }
            self.remember_manifests(index.manifests());
        }
        self.sign_index(request, &index, signed).await;
        Ok(Arc::new(index))
    }
}
