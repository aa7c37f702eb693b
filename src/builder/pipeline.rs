//! One build, once it has a place: the package set evaluated (one step, whatever the pin), the
//! image found in memory or storage by its key, else built by Nix, its layers packed (in
//! parallel, each only once) and its documents and SBOMs stored. Each phase is an event of the
//! build's [`Run`] and a sample of `nixery_build_phase_seconds`.

use std::sync::Arc;
use std::time::Instant;

use futures::future::FutureExt;
use futures::stream::StreamExt;

use super::events::{Event, LayerSummary, Run};
use super::image_config::image_settings;
use super::{BuildError, Builder, Built, Image, Request, artifacts};
use crate::layers::store::{self, Packed};
use crate::layers::{self, Popularity};
use crate::manifest::{self, Compression, Format, Layer};
use crate::nix::{Closure, Derivation, NixError, NixProgress};
use crate::server::metrics::{InFlight, METRICS};
use crate::source::Pin;
use crate::storage::{self, Cache};

/// A package set evaluated for an image: the derivation that builds it, and when the set was
/// made (for the SBOMs).
struct Evaluated {
    drv: Derivation,
    created: String,
    /// The package set's NAR hash, for the image's provenance (made when images are signed).
    tree_sha256: Option<String>,
}

impl Builder {
    /// [`Builder::run_build`] once it has a place and holds the store. A commit's manifest key
    /// (`commit_key`) is known before evaluation, so its set is evaluated only when no image is
    /// cached; a path's key is its evaluation's.
    pub(super) async fn build_held(
        &self,
        run: &Run,
        request: &Request,
        commit_key: Option<String>,
    ) -> Result<Built, BuildError> {
        let (key, evaluated) = match commit_key {
            Some(key) => (key, None),
            None => {
                let evaluated = self.evaluate(run, request).await?;
                let key = self.manifest_key(request, Some(&evaluated.drv));
                (key, Some(evaluated))
            }
        };
        let cached = self.in_memory(Some(&key));
        if let Some(image) = cached {
            METRICS.cache_lookup("memory");
            METRICS.build_outcome("cached");
            return Ok(Built::cached(image, "memory"));
        }
        let built = self.stored_or_built(run, &key, request, evaluated).await?;
        self.remember(&key, &built.image);
        Ok(built)
    }

    /// The image of manifest key `key` from storage, else built now (evaluated first unless it
    /// is already) and recorded under `key`.
    async fn stored_or_built(
        &self,
        run: &Run,
        key: &str,
        request: &Request,
        evaluated: Option<Evaluated>,
    ) -> Result<Built, BuildError> {
        if let Some(built) = self.stored(key).await? {
            return Ok(built);
        }
        METRICS.cache_lookup("miss");
        let _in_flight = InFlight::start();
        let evaluated = match evaluated {
            Some(evaluated) => evaluated,
            None => self.evaluate(run, request).await?,
        };
        let built = self.build(run, &evaluated, request, key).await?;
        METRICS.build_outcome("built");
        self.storage
            .write_cache(Cache::Manifests, key, &built.image.main().bytes)
            .await?;
        Ok(built)
    }

    /// Evaluates `request`'s image in its package set: a commit's tree is fetched first (Nix
    /// reads it only while it evaluates: what a build needs from it is then in the store, and
    /// the tree may go); a path's evaluation is reused for the source TTL.
    async fn evaluate(&self, run: &Run, request: &Request) -> Result<Evaluated, BuildError> {
        let started = Instant::now();
        let tree = self.sources.tree(&request.pin).await?;
        let created = match &request.pin {
            Pin::Commit { .. } => {
                METRICS.phase("source", started.elapsed());
                artifacts::commit_time(tree.path())
            }
            Pin::Path(_) => artifacts::no_time(),
        };
        run.emit(Event::Source {
            package_set: run.package_set.clone(),
        });
        let started = Instant::now();
        let drv = match &request.pin {
            Pin::Path(_) => self.evaluate_path(tree.path(), request).await,
            Pin::Commit { .. } => self
                .nix
                .evaluate(tree.path(), request.packages(), request.platform.system())
                .await
                .map_err(Arc::new),
        };
        METRICS.phase("evaluate", started.elapsed());
        let drv = drv.map_err(BuildError::Nix)?;
        run.emit(Event::Evaluated {
            derivation: drv.as_str().to_owned(),
        });
        // While the tree is here: a commit's is removed once evaluated.
        let tree_sha256 = match &self.settings.signer {
            Some(_) => {
                let started = Instant::now();
                let nix = self.nix.clone();
                let path = tree.path().to_path_buf();
                let hash = self
                    .tree_hashes
                    .get(&path.clone(), move || {
                        async move { nix.tree_hash(&path).await }.boxed()
                    })
                    .await;
                METRICS.phase("provenance", started.elapsed());
                Some(hash.map_err(BuildError::Nix)?)
            }
            None => None,
        };
        Ok(Evaluated {
            drv,
            created,
            tree_sha256,
        })
    }

    /// The derivation of `request`'s image in the package set at `path`, evaluated at most once
    /// per source TTL: a path's contents can change under the server, and what Nix makes of them
    /// is what the image is keyed on.
    async fn evaluate_path(
        &self,
        path: &std::path::Path,
        request: &Request,
    ) -> Result<Derivation, Arc<NixError>> {
        let nix = self.nix.clone();
        let system = request.platform.system();
        let key = (path.to_path_buf(), request.packages().clone(), system);
        // Evaluations are bounded by the TTL cache's own limit.
        let (path, packages, _) = key.clone();
        self.evaluations
            .get(&key, move || {
                async move { nix.evaluate(&path, &packages, system).await }.boxed()
            })
            .await
    }

    /// Builds the image `evaluated` for `request` (manifest key `key`): runs Nix, packs and
    /// stores the layers, config, manifests and SBOMs, and its provenance when images are signed.
    async fn build(
        &self,
        run: &Run,
        evaluated: &Evaluated,
        request: &Request,
        key: &str,
    ) -> Result<Built, BuildError> {
        // The GC root keeps the closure in the store until the image is packed and stored.
        let (closure, _gc_root) = self.nix_build(run, &evaluated.drv).await?;
        let started = Instant::now();
        let (layers, summaries) = self.layers(run, &closure, request).await?;
        let settings = image_settings(request, &closure);
        let docs = manifest::image_documents(&layers, &settings, request.compression);
        let storage = self.storage.as_ref();
        storage::put_bytes(storage, &docs.config, None).await?;
        storage::put_bytes(storage, &docs.oci, Some(Format::Oci.manifest_type())).await?;
        if let Some(docker) = &docs.docker {
            storage::put_bytes(storage, docker, Some(Format::Docker.manifest_type())).await?;
        }
        let image = Image::of(docs);
        METRICS.phase("layers", started.elapsed());
        let started = Instant::now();
        let created = evaluated.created.clone();
        let sboms = self.store_sboms(request, &image, &closure, created).await?;
        METRICS.phase("sbom", started.elapsed());
        if let Some(tree_sha256) = &evaluated.tree_sha256 {
            let started = Instant::now();
            self.store_provenance(
                request,
                key,
                evaluated.drv.as_str(),
                tree_sha256,
                &closure,
                &sboms,
            )
            .await?;
            METRICS.phase("provenance", started.elapsed());
        }
        run.emit(Event::Stored {
            blobs: 3 + sboms.blobs,
        });
        tracing::info!(digest = %image.main().digest, layers = layers.len(), platform = %request.platform, compression = %request.compression, "image built");
        Ok(Built {
            image: Arc::new(image),
            cached: None,
            layers: summaries,
        })
    }

    /// Runs Nix on `drv`, telling `run` how many derivations it built, and what the closure is.
    async fn nix_build(
        &self,
        run: &Run,
        drv: &Derivation,
    ) -> Result<(Closure, crate::nix::GcRoot), BuildError> {
        let started = Instant::now();
        let mut derivations = DerivationCount::default();
        let (closure, gc_root) = self
            .nix
            .build_observed(drv, &mut |progress| {
                if derivations.saw(progress) {
                    run.emit(derivations.event());
                }
            })
            .await?;
        derivations.finished();
        run.emit(derivations.event());
        METRICS.phase("build", started.elapsed());
        run.emit(Event::Built {
            paths: closure.paths.len(),
            bytes: closure.paths.iter().map(|p| p.nar_size).sum(),
        });
        Ok((closure, gc_root))
    }

    /// The layers of `closure`, the root layer last, with what the build page shows of each.
    /// Layers are packed as they come (a small layer does not wait behind a large one) and put
    /// back in order afterwards. The first failure ends the build: the layers still in flight
    /// are dropped rather than each waiting out storage retries.
    async fn layers(
        &self,
        run: &Run,
        closure: &Closure,
        request: &Request,
    ) -> Result<(Vec<Layer>, Vec<LayerSummary>), BuildError> {
        log_popularity(closure, &self.settings.popularity);
        let groups = layers::group(
            closure,
            &self.settings.popularity,
            self.settings.max_layers - 1,
        )
        .ok_or_else(|| BuildError::NoRoot(closure.root.clone()))?;
        let total = groups.len() + 1;
        let mut packing =
            futures::stream::iter(groups.into_iter().enumerate().map(|(i, paths)| async move {
                let contents = Packed::StorePaths(paths.clone());
                let (layer, new) = self.layer(contents, request.compression).await?;
                Ok::<_, BuildError>((i, summary(&layer, Some(paths), new), layer))
            }))
            .buffer_unordered(store::cores());
        let mut numbered = Vec::with_capacity(total);
        let mut bytes = 0;
        while let Some(packed) = packing.next().await {
            let (i, summary, layer) = packed?;
            bytes += layer.size;
            numbered.push((i, layer, summary));
            run.emit(Event::Layers {
                done: numbered.len(),
                total,
                bytes,
            });
        }
        drop(packing);
        numbered.sort_by_key(|(i, ..)| *i);
        let (mut layers, mut summaries): (Vec<Layer>, Vec<LayerSummary>) =
            numbered.into_iter().map(|(_, l, s)| (l, s)).unzip();
        let root = Packed::Root {
            path: closure.root.clone(),
            nonroot: request.name.setup().nonroot,
        };
        let (root, new) = self.layer(root, request.compression).await?;
        run.emit(Event::Layers {
            done: total,
            total,
            bytes: bytes + root.size,
        });
        summaries.push(summary(&root, None, new));
        layers.push(root);
        Ok((layers, summaries))
    }

    /// The layer holding `contents` compressed with `compression`
    /// ([`store::stored_or_packed`]), and whether it is new.
    async fn layer(
        &self,
        contents: Packed,
        compression: Compression,
    ) -> Result<(Layer, bool), BuildError> {
        let key = self.layer_key(&contents, compression);
        let codec = self.settings.codec(compression);
        Ok(store::stored_or_packed(self.storage.as_ref(), &key, contents, codec).await?)
    }
}

/// What the build page shows of a layer.
fn summary(layer: &Layer, paths: Option<Vec<String>>, new: bool) -> LayerSummary {
    LayerSummary {
        digest: layer.digest.to_string(),
        size: layer.size,
        paths: Some(paths.unwrap_or_default()),
        new: Some(new),
    }
}

/// nix-build's derivations, counted from what it prints: how many it has to build, how many it
/// started (they run one at a time unless `max-jobs` says otherwise), the one building now.
#[derive(Default)]
struct DerivationCount {
    total: usize,
    started: usize,
    current: Option<String>,
    fetched: usize,
    finished: bool,
}

impl DerivationCount {
    /// Counts `progress`; whether it changed what the build page shows.
    fn saw(&mut self, progress: NixProgress) -> bool {
        match progress {
            NixProgress::Planned { derivations } => self.total += derivations,
            NixProgress::Building { name, machine } => {
                self.started += 1;
                self.current = Some(match machine {
                    Some(machine) => format!("{name} on {machine}"),
                    None => name,
                });
            }
            NixProgress::Copying { .. } => self.fetched += 1,
            NixProgress::Fetching { .. } => return false,
        }
        true
    }

    fn finished(&mut self) {
        self.finished = true;
        self.current = None;
    }

    fn event(&self) -> Event {
        let done = if self.finished {
            self.total.max(self.started)
        } else {
            self.started.saturating_sub(1)
        };
        Event::Derivations {
            done,
            total: self.total.max(self.started),
            current: self.current.clone(),
            fetched: self.fetched,
        }
    }
}

/// Logs how many of a closure's paths the popularity data knows, by full name and by name
/// without the version (data from another revision of the package set mostly misses).
fn log_popularity(closure: &Closure, popularity: &Popularity) {
    if popularity.is_empty() {
        return;
    }
    let (mut exact, mut by_name) = (0, 0);
    for path in &closure.paths {
        match popularity.count(&path.path) {
            Some((_, layers::popularity::Match::Exact)) => exact += 1,
            Some((_, layers::popularity::Match::Name)) => by_name += 1,
            None => {}
        }
    }
    tracing::info!(
        paths = closure.paths.len(),
        exact,
        by_name,
        "popularity data for {} of {} paths",
        exact + by_name,
        closure.paths.len()
    );
}
