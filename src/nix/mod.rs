//! Everything that runs Nix, and reading what it prints: evaluating and building images
//! ([`Nix`]), listing a package set's packages for the catalog ([`list_packages`]), collecting
//! the store ([`gc`]), counting store paths' popularity ([`popularity_count`]), and the
//! environment every Nix command runs in ([`environment`]). No other module starts a Nix
//! process.

mod build;
mod config;
pub mod environment;
mod error;
pub mod gc;
mod package_list;
pub mod popularity_count;
pub mod progress;
pub mod public;
mod store;

pub use build::Nix;
pub use config::{Version, current_system, installed_version, remote_build_slots};
pub use environment::{Isolation, NixEnv, prepare};
pub use error::NixError;
pub(crate) use error::{error_cause, first_build_error};
pub use package_list::{ListingError, list_packages};
pub use progress::{NixProgress, machine_name};
pub use public::public_text;
pub(crate) use store::shorten_store_paths;
pub use store::{Closure, Derivation, GcRoot, PackageMeta, StorePath, store_path_name};
