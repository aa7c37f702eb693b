//! From a closure to layers: which store paths share a layer ([`group`], guided by
//! [`Popularity`] data), how a layer's tarball is written ([`pack`]), and how layers are kept
//! in storage ([`store`]).

pub mod group;
pub mod pack;
pub mod parallel;
pub mod popularity;
pub mod store;

pub use group::{Thresholds, group, group_with};
pub use pack::{LayerContents, pack};
pub use parallel::Codec;
pub use popularity::Popularity;
