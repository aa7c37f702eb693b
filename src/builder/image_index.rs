//! OCI image indexes (Docker manifest lists): the image of every platform a name is built for, each built (or found) as any
//! image is, then listed in a Docker manifest list and an OCI image index.

use std::sync::Arc;

use super::{BuildError, Builder, Image, Request};
use crate::image::Platform;
use crate::manifest::{self, Format, Manifest};
use crate::storage;

/// An image index: the image of each platform, listed in each manifest family.
#[derive(Debug)]
pub struct Index {
    docker: Arc<Manifest>,
    oci: Arc<Manifest>,
}

impl Index {
    /// The index of `images`, each with its platform, in the order given.
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
        Index {
            docker: document(Format::Docker),
            oci: document(Format::Oci),
        }
    }

    /// The index in `format`'s family.
    pub fn manifest(&self, format: Format) -> &Arc<Manifest> {
        match format {
            Format::Docker => &self.docker,
            Format::Oci => &self.oci,
        }
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
                    Ok(image) => Ok((image, platform)),
                    Err(err) => Err(PlatformFailure {
                        platform: Some(platform),
                        err,
                    }),
                }
            }
        }))
        .await?;
        let index = Index::of(&images);
        if self.known_manifest(&index.docker.digest).is_none() {
            let storage = self.storage.as_ref();
            for manifest in [&index.oci, &index.docker] {
                storage::put_bytes(storage, &manifest.bytes, Some(manifest.media_type))
                    .await
                    .map_err(|err| PlatformFailure {
                        platform: None,
                        err: Arc::new(err.into()),
                    })?;
            }
            self.remember_manifests([&index.docker, &index.oci]);
        }
        Ok(Arc::new(index))
    }
}
