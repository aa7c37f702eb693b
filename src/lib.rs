//! nixery: a container registry that builds images on demand with Nix.
//!
//! A request walks one way through the modules: [`http`] parses it, [`image`] turns the name into
//! packages, [`source`] turns the tag into a pinned package set, [`builder`] runs [`nix`], groups
//! and packs [`layers`], writes [`manifest`] documents and keeps everything in [`storage`];
//! [`error`] turns failures into registry errors. [`state`] wires them together from the
//! [`config`]; [`server`] accepts connections and counts and logs what they do.

#![forbid(unsafe_code)]
// Data from outside (Nix, storage, clients) never meets an unwrap: a failure is an error result.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admission;
pub mod builder;
pub mod catalog;
pub mod command;
pub mod config;
pub mod error;
pub mod http;
pub mod image;
pub mod layers;
pub mod manifest;
pub mod nix;
pub mod sbom;
pub mod server;
pub mod signing;
pub mod source;
pub mod state;
pub mod storage;
pub mod sync;
pub mod ttl;
pub mod web;

pub use http::router as app;
