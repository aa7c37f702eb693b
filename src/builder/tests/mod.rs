//! Tests of the builder against a fake Nix.
