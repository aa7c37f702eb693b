//! Image names and tags: what a client asks for, turned into the set of packages to build.
//!
//! Names follow the OCI distribution spec's grammar
//! (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests>):
//! lowercase components `[a-z0-9]+([._-][a-z0-9]+)*` joined by `/`. Each component names a
//! package; `shell` and `builder` are meta-packages that stand for several, `nonroot` makes the
//! image run as an unprivileged user ([`nonroot`]), `zstd-layers` gives the image zstd-compressed
//! layers, and `arm64` among the leading components chooses the platform ([`platform`]). A name the operator declared ([`declared`]) stands for
//! the packages and image config the declaration gives.

pub mod declared;
pub mod nonroot;
pub mod platform;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use platform::{Platform, PlatformError, Platforms};

/// Longest image name accepted, in bytes (the limit CNCF distribution uses for repositories).
pub const MAX_NAME_LEN: usize = 255;

/// Most path components (packages) in one image name.
pub const MAX_COMPONENTS: usize = 64;

/// The leading component that asks for zstd-compressed layers (`zstd` alone is the package).
pub const ZSTD_LAYERS: &str = "zstd-layers";

/// What `shell` expands to: an interactive environment.
const SHELL_PACKAGES: &[&str] = &["bashInteractive", "coreutils", "moreutils", "nano"];

/// What `builder` adds to `shell`: Nix's standard build environment.
const BUILDER_EXTRA: &[&str] = &["stdenv"];

/// A name component: lowercase letters and digits, with single `.`, `_` or `-` between them
/// (`[a-z0-9]+(?:[._-][a-z0-9]+)*`, the distribution spec's component without its `__`).
fn is_component(component: &str) -> bool {
    let separator = |b: u8| matches!(b, b'.' | b'_' | b'-');
    let bytes = component.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    !separator(first)
        && !separator(last)
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || separator(b))
        && !bytes
            .windows(2)
            .any(|pair| separator(pair[0]) && separator(pair[1]))
}

/// A tag as the distribution spec has it: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
fn is_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    match tag.as_bytes() {
        [first, rest @ ..] => {
            word(*first)
                && rest.len() <= 127
                && rest.iter().all(|&b| word(b) || b == b'.' || b == b'-')
        }
        [] => false,
    }
}

/// Why an image name or tag was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("the image name is empty")]
    Empty,
    #[error("the image name is {0} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong(usize),
    #[error("the image name has {0} components; at most {MAX_COMPONENTS} packages are allowed")]
    TooManyComponents(usize),
    #[error(
        "'{0}' is not a valid name component: use lowercase letters, digits and single '.', '_' or '-' between them"
    )]
    BadComponent(String),
    #[error("'{0}' is not a valid tag")]
    BadTag(String),
}

/// A validated image name such as `shell/curl`, with the packages it stands for, the platform
/// it names, if any, and what else makes the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageName {
    name: String,
    packages: BTreeSet<String>,
    platform: Option<Platform>,
    setup: Setup,
    zstd_layers: bool,
}

/// What makes an image besides its packages and platform. The default (no `nonroot`, not
/// declared) is a plain image, whose cache keys stay what they were before this existed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Setup {
    /// The `nonroot` meta-package: the image has the user `nonroot` and runs as it.
    pub nonroot: bool,
    /// A declared image's own config.
    pub config: Option<Arc<declared::Config>>,
}

impl Setup {
    /// Lines that tell this setup apart in cache keys; empty for a plain image.
    pub fn key_lines(&self) -> String {
        let mut lines = String::new();
        if self.nonroot {
            lines.push_str("nonroot\n");
        }
        if let Some(config) = &self.config {
            lines.push_str(&format!("declared {}\n", config.fingerprint()));
        }
        lines
    }
}

impl ImageName {
    /// The name as the client sent it.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The packages to build, meta-packages expanded, sorted and without duplicates, so that the
    /// order and repetition of components never change the image.
    pub fn packages(&self) -> &BTreeSet<String> {
        &self.packages
    }

    /// The platform the name chooses (`arm64/shell`), if it does.
    pub fn platform(&self) -> Option<Platform> {
        self.platform
    }

    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// Whether the name asks for zstd-compressed layers (`zstd-layers/…`).
    pub fn zstd_layers(&self) -> bool {
        self.zstd_layers
    }

    /// The image a declaration gives `name`: the packages, platform, `nonroot` and
    /// `zstd-layers` of its `contents` (read as a path), with `config`; a platform `name`
    /// chooses wins, and `zstd-layers` in either asks for zstd.
    pub fn declared(
        name: &ImageName,
        contents: &ImageName,
        config: Arc<declared::Config>,
    ) -> ImageName {
        ImageName {
            name: name.name.clone(),
            packages: contents.packages.clone(),
            platform: name.platform.or(contents.platform),
            setup: Setup {
                nonroot: contents.setup.nonroot,
                config: Some(config),
            },
            zstd_layers: name.zstd_layers || contents.zstd_layers,
        }
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl FromStr for ImageName {
    type Err = NameError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(name.len()));
        }
        let components: Vec<&str> = name.split('/').collect();
        if components.len() > MAX_COMPONENTS {
            return Err(NameError::TooManyComponents(components.len()));
        }
        let mut packages = BTreeSet::new();
        let mut platform = None;
        let mut setup = Setup::default();
        let mut zstd_layers = false;
        // A platform, `nonroot` and `zstd-layers` are chosen among the leading meta-packages
        // (`arm64/shell/x`, `shell/nonroot/x`), as in Nixery; after the first package they are
        // package names.
        let mut leading = true;
        for component in components {
            if !is_component(component) {
                return Err(NameError::BadComponent(component.to_owned()));
            }
            if leading && let Some(chosen) = Platform::of_name_component(component) {
                platform = Some(chosen);
                continue;
            }
            if leading && component == "nonroot" {
                setup.nonroot = true;
                continue;
            }
            if leading && component == ZSTD_LAYERS {
                zstd_layers = true;
                continue;
            }
            leading &= matches!(component, "shell" | "builder");
            match component {
                "shell" => packages.extend(SHELL_PACKAGES.iter().map(|p| p.to_string())),
                "builder" => packages.extend(
                    SHELL_PACKAGES
                        .iter()
                        .chain(BUILDER_EXTRA)
                        .map(|p| p.to_string()),
                ),
                package => {
                    packages.insert(package.to_owned());
                }
            }
        }
        Ok(ImageName {
            name: name.to_owned(),
            packages,
            platform,
            setup,
            zstd_layers,
        })
    }
}

/// A validated tag; what it means depends on the package source (see [`crate::source`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag(String);

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(tag: &str) -> Result<Self, Self::Err> {
        if is_tag(tag) {
            Ok(Tag(tag.to_owned()))
        } else {
            Err(NameError::BadTag(tag.chars().take(140).collect()))
        }
    }
}

impl Tag {
    /// `latest`: what clients ask for when no tag is given.
    pub fn latest() -> Tag {
        Tag("latest".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The hand-written checks accept exactly what the spec's patterns match.
        #[test]
        fn components_and_tags_are_checked_as_the_patterns_say(
            text in prop_oneof!["[a-z0-9._-]{0,12}", "[a-zA-Z0-9_][a-zA-Z0-9._/-]{0,130}"],
        ) {
            let component = regex::Regex::new(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$").unwrap();
            let tag = regex::Regex::new(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$").unwrap();
            prop_assert_eq!(is_component(&text), component.is_match(&text));
            prop_assert_eq!(is_tag(&text), tag.is_match(&text));
        }
    }

    fn packages(name: &str) -> Vec<String> {
        name.parse::<ImageName>()
            .unwrap()
            .packages()
            .iter()
            .cloned()
            .collect()
    }

    #[test]
    fn shell_expands_to_the_interactive_set() {
        assert_eq!(
            packages("shell/hello"),
            ["bashInteractive", "coreutils", "hello", "moreutils", "nano"]
        );
    }

    #[test]
    fn builder_adds_stdenv() {
        assert!(packages("builder").contains(&"stdenv".to_owned()));
        assert!(packages("builder").contains(&"nano".to_owned()));
    }

    #[test]
    fn order_and_duplicates_do_not_matter() {
        assert_eq!(
            packages("curl/shell/hello/curl"),
            packages("shell/hello/curl")
        );
    }

    #[test]
    fn arm64_among_the_leading_meta_packages_chooses_the_platform() {
        let arm64 = Some("linux/arm64".parse::<Platform>().unwrap());
        for name in [
            "arm64/shell/hello",
            "shell/arm64/hello",
            "arm64/hello",
            "arm64",
        ] {
            let parsed: ImageName = name.parse().unwrap();
            assert_eq!(parsed.platform(), arm64, "{name}");
            assert!(!parsed.packages().contains("arm64"), "{name}");
        }
        assert_eq!(packages("arm64/shell/hello"), packages("shell/hello"));
        let package: ImageName = "hello/arm64".parse().unwrap();
        assert_eq!(package.platform(), None);
        assert!(package.packages().contains("arm64"));
        assert_eq!("shell/hello".parse::<ImageName>().unwrap().platform(), None);
    }

    #[test]
    fn nonroot_among_the_leading_meta_packages_makes_a_nonroot_image() {
        for name in [
            "nonroot/shell/hello",
            "shell/nonroot/hello",
            "arm64/nonroot/hello",
        ] {
            let parsed: ImageName = name.parse().unwrap();
            assert!(parsed.setup().nonroot, "{name}");
            assert!(!parsed.packages().contains("nonroot"), "{name}");
        }
        assert_eq!(packages("nonroot/shell/hello"), packages("shell/hello"));
        let package: ImageName = "hello/nonroot".parse().unwrap();
        assert!(!package.setup().nonroot);
        assert!(package.packages().contains("nonroot"));
        // A plain image's keys are unchanged; a non-root one's differ.
        assert_eq!(
            "hello".parse::<ImageName>().unwrap().setup().key_lines(),
            ""
        );
        assert_eq!(
            "nonroot/hello"
                .parse::<ImageName>()
                .unwrap()
                .setup()
                .key_lines(),
            "nonroot\n"
        );
    }

    #[test]
    fn zstd_layers_among_the_leading_meta_packages_asks_for_zstd() {
        for name in [
            "zstd-layers/hello",
            "zstd-layers/shell/hello",
            "shell/zstd-layers/hello",
            "arm64/zstd-layers/hello",
            "nonroot/zstd-layers/arm64/hello",
            "zstd-layers/zstd",
        ] {
            let parsed: ImageName = name.parse().unwrap();
            assert!(parsed.zstd_layers(), "{name}");
            assert!(!parsed.packages().contains(ZSTD_LAYERS), "{name}");
        }
        let combined: ImageName = "nonroot/zstd-layers/arm64/hello".parse().unwrap();
        assert!(combined.setup().nonroot);
        assert_eq!(combined.platform(), Some("linux/arm64".parse().unwrap()));
        assert_eq!(packages("zstd-layers/shell/hello"), packages("shell/hello"));
        // `zstd` is the package; after the first package, `zstd-layers` is a package name.
        let zstd: ImageName = "zstd".parse().unwrap();
        assert!(!zstd.zstd_layers());
        assert_eq!(packages("zstd"), ["zstd"]);
        assert_eq!(packages("zstd-layers/zstd"), ["zstd"]);
        let late: ImageName = "hello/zstd-layers".parse().unwrap();
        assert!(!late.zstd_layers());
        assert!(late.packages().contains(ZSTD_LAYERS));
        // The layers' compression is not part of the setup's keys: keys.rs adds it.
        assert_eq!(
            "zstd-layers/hello"
                .parse::<ImageName>()
                .unwrap()
                .setup()
                .key_lines(),
            ""
        );
    }

    #[test]
    fn nested_and_digit_names_are_valid() {
        assert_eq!(packages("xorg.xev/1password"), ["1password", "xorg.xev"]);
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "",
            "Shell",
            "a//b",
            "/a",
            "a/",
            "..",
            "a/../b",
            "a..b",
            "-a",
            "a;b",
            "a\"b",
            "${x}",
            "nix/store/x y",
        ] {
            assert!(bad.parse::<ImageName>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            long.parse::<ImageName>(),
            Err(NameError::TooLong(MAX_NAME_LEN + 1))
        );
        let many = vec!["a"; MAX_COMPONENTS + 1].join("/");
        assert_eq!(
            many.parse::<ImageName>(),
            Err(NameError::TooManyComponents(MAX_COMPONENTS + 1))
        );
    }

    #[test]
    fn tags_follow_the_spec() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("v1.2_3-x".parse::<Tag>().is_ok());
        assert!(".hidden".parse::<Tag>().is_err());
        assert!("a".repeat(129).parse::<Tag>().is_err());
    }
}
