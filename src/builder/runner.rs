//! The seam between the builder and Nix: what the builder asks of Nix, so that single flight,
//! failure memory, admission and caching are tested against a fake instead of `nix-build`.

use std::collections::BTreeSet;
use std::path::Path;

use crate::nix::{Closure, Derivation, GcRoot, Nix, NixError, NixProgress};

/// Evaluates and builds images ([`Nix`] on a server, a fake in tests).
#[async_trait::async_trait]
pub trait NixRunner: Send + Sync + 'static {
    /// Evaluates the image of `packages` in the package set at `tree`, for Nix system `system`,
    /// to the derivation that builds it. Nothing is built.
    async fn evaluate(
        &self,
        tree: &Path,
        packages: &BTreeSet<String>,
        system: &str,
    ) -> Result<Derivation, NixError>;

    /// The NAR hash (sha256, hex) of the package set at `tree`.
    async fn tree_hash(&self, tree: &Path) -> Result<String, NixError>;

    /// Builds an evaluated image, telling `on_progress` how it goes, and reads its closure. The
    /// [`GcRoot`] keeps the closure in the store: hold it until the image is packed.
    async fn build_observed(
        &self,
        drv: &Derivation,
        on_progress: &mut (dyn FnMut(NixProgress) + Send),
    ) -> Result<(Closure, GcRoot), NixError>;
}

#[async_trait::async_trait]
impl NixRunner for Nix {
    async fn evaluate(
        &self,
        tree: &Path,
        packages: &BTreeSet<String>,
        system: &str,
    ) -> Result<Derivation, NixError> {
        Nix::evaluate(self, tree, packages, system).await
    }

    async fn tree_hash(&self, tree: &Path) -> Result<String, NixError> {
        Nix::tree_hash(self, tree).await
    }

    async fn build_observed(
        &self,
        drv: &Derivation,
        on_progress: &mut (dyn FnMut(NixProgress) + Send),
    ) -> Result<(Closure, GcRoot), NixError> {
        Nix::build_observed(self, drv, on_progress).await
    }
}
