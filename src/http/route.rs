//! The registry path after `/v2/`, parsed into what it asks for. Names and references are
//! validated here, from the raw (still percent-encoded) path, so nothing unchecked reaches a
//! service.

use crate::error::Error;
use crate::image::{ImageName, Tag};
use crate::manifest::Digest;

/// What a `/v2/...` request asks for.
#[derive(Debug)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/<name>/manifests/<tag>`
    ManifestByTag(ImageName, Tag),
    /// `/v2/<name>/manifests/<digest>`
    ManifestByDigest(ImageName, Digest),
    /// `/v2/<name>/blobs/<digest>`
    Blob(ImageName, Digest),
    /// `/v2/<name>/tags/list`
    Tags(ImageName),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(ImageName, Digest),
}

impl Route {
    /// Parses a request path such as `/v2/shell/hello/manifests/latest`.
    pub fn parse(path: &str) -> Result<Route, Error> {
        let no_route = || Error::NoRoute(path.chars().take(200).collect());
        let rest = path.strip_prefix("/v2/").ok_or_else(no_route)?;
        if rest.is_empty() {
            return Ok(Route::Base);
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Ok(Route::Tags(name.parse()?));
        }
        // `<name>/<kind>/<reference>`: the reference is the last component, the kind the one
        // before it, and the name all before that (it may hold the route words themselves).
        let (item, reference) = rest.rsplit_once('/').ok_or_else(no_route)?;
        let (name, kind) = item.rsplit_once('/').ok_or_else(no_route)?;
        if !matches!(kind, "manifests" | "blobs" | "referrers") {
            return Err(no_route());
        }
        let name: ImageName = name.parse()?;
        // A manifest reference that is neither a tag nor a digest names no manifest: the
        // distribution spec's answer is 404 MANIFEST_UNKNOWN, not a grammar error.
        let unknown = || Error::NoSuchReference(reference.chars().take(140).collect());
        Ok(match kind {
            "blobs" => Route::Blob(name, reference.parse()?),
            "referrers" => Route::Referrers(name, reference.parse()?),
            _ if reference.contains(':') => {
                Route::ManifestByDigest(name, reference.parse().map_err(|_| unknown())?)
            }
            _ => Route::ManifestByTag(name, reference.parse().map_err(|_| unknown())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_routed() {
        assert!(matches!(Route::parse("/v2/").unwrap(), Route::Base));
        let Route::ManifestByTag(name, tag) =
            Route::parse("/v2/shell/hello/manifests/latest").unwrap()
        else {
            panic!("not a manifest route");
        };
        assert_eq!(name.as_str(), "shell/hello");
        assert_eq!(tag.to_string(), "latest");
        let digest = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(
            Route::parse(&format!("/v2/a/manifests/{digest}")).unwrap(),
            Route::ManifestByDigest(..)
        ));
        assert!(matches!(
            Route::parse(&format!("/v2/a/b/blobs/{digest}")).unwrap(),
            Route::Blob(..)
        ));
        assert!(matches!(
            Route::parse("/v2/a/b/tags/list").unwrap(),
            Route::Tags(..)
        ));
        assert!(matches!(
            Route::parse(&format!("/v2/a/b/referrers/{digest}")).unwrap(),
            Route::Referrers(..)
        ));
        assert!(matches!(
            Route::parse("/v2/a/referrers/sha256:x"),
            Err(Error::Digest(_))
        ));
    }

    #[test]
    fn a_package_named_like_a_route_word_still_parses() {
        let Route::ManifestByTag(name, _) =
            Route::parse("/v2/manifests/blobs/manifests/x").unwrap()
        else {
            panic!("not a manifest route");
        };
        assert_eq!(name.as_str(), "manifests/blobs");
    }

    #[test]
    fn bad_input_gets_the_right_error() {
        assert!(matches!(
            Route::parse("/v2/A/manifests/latest"),
            Err(Error::Name(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a%2Fb/manifests/latest"),
            Err(Error::Name(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/sha256:..%2F..%2Fetc"),
            Err(Error::Digest(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/latest"),
            Err(Error::Digest(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/manifests/-x"),
            Err(Error::NoSuchReference(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/manifests/sha256:short"),
            Err(Error::NoSuchReference(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/other/x"),
            Err(Error::NoRoute(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/manifests/x/y"),
            Err(Error::NoRoute(_))
        ));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Cases per property.
        const CASES: u32 = 5_000;

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: CASES,
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        proptest! {
            #![proptest_config(config())]

            /// Any path at all: no panic, and whatever is accepted is within the grammar.
            #[test]
            fn arbitrary_paths_never_panic(path in "\\PC{0,300}") {
                if let Ok(Route::ManifestByTag(name, _) | Route::ManifestByDigest(name, _)
                    | Route::Blob(name, _) | Route::Tags(name)) = Route::parse(&format!("/v2/{path}"))
                {
                    prop_assert!(name.as_str().len() <= crate::image::MAX_NAME_LEN);
                    for package in name.packages() {
                        prop_assert!(package.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
                    }
                }
            }

            /// Paths shaped like registry requests, with hostile pieces mixed in.
            #[test]
            fn registry_shaped_paths_never_panic(
                components in prop::collection::vec(
                    prop_oneof![
                        "[a-z0-9]{1,12}",
                        "[a-z0-9._-]{0,12}",
                        Just("..".to_owned()),
                        Just("%2e%2e".to_owned()),
                        Just("${x}".to_owned()),
                        Just("\"".to_owned()),
                        Just("/nix/store/x".to_owned()),
                        "\\PC{0,8}",
                    ],
                    0..70,
                ),
                kind in prop_oneof![Just("manifests"), Just("blobs"), Just("tags")],
                reference in prop_oneof![
                    "[a-zA-Z0-9_.-]{0,130}",
                    "sha256:[0-9a-f]{64}",
                    "sha256:[0-9a-zA-Z./%]{0,70}",
                    "\\PC{0,20}",
                ],
            ) {
                let path = format!("/v2/{}/{kind}/{reference}", components.join("/"));
                if let Ok(Route::ManifestByTag(name, _) | Route::ManifestByDigest(name, _)
                    | Route::Blob(name, _) | Route::Tags(name)) = Route::parse(&path)
                {
                    prop_assert!(!name.as_str().contains(".."));
                    prop_assert!(!name.as_str().contains('$'));
                    prop_assert!(!name.as_str().contains('"'));
                }
            }
        }
    }
}
