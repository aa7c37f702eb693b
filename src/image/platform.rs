//! Platforms images are built for: the OS and CPU a client runs on, as registries name them
//! (`linux/arm64`), and the Nix system double that builds for it (`aarch64-linux`).

use std::fmt;
use std::str::FromStr;

/// An OS and CPU images can be built for. Only Linux: Nix builds container images for Linux.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    /// GOARCH-style architecture, as image configurations and indexes spell it (`arm64`).
    architecture: &'static str,
    /// The CPU variant, for architectures that have several (`v7` of `arm`).
    variant: Option<&'static str>,
    /// The Nix system double that builds for it (`aarch64-linux`).
    system: &'static str,
}

/// The platforms nixery knows: those Nix builds Linux for and registries name.
const KNOWN: &[Platform] = &[
    Platform::new("amd64", None, "x86_64-linux"),
    Platform::new("arm64", None, "aarch64-linux"),
    Platform::new("386", None, "i686-linux"),
    Platform::new("arm", Some("v7"), "armv7l-linux"),
    Platform::new("arm", Some("v6"), "armv6l-linux"),
    Platform::new("riscv64", None, "riscv64-linux"),
    Platform::new("ppc64le", None, "powerpc64le-linux"),
    Platform::new("s390x", None, "s390x-linux"),
];

/// The image name component that selects a platform (a meta-package, as in Nixery), and the
/// platform's architecture.
const NAME_PREFIXES: &[&str] = &["arm64"];

/// Why a platform was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a platform nixery builds for: use one of {known}", known = known())]
pub struct PlatformError(String);

fn known() -> String {
    KNOWN
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Platform {
    const fn new(
        architecture: &'static str,
        variant: Option<&'static str>,
        system: &'static str,
    ) -> Self {
        Platform {
            architecture,
            variant,
            system,
        }
    }

    /// The platform of a Nix system double (`x86_64-linux`), if nixery knows it.
    pub fn of_system(system: &str) -> Option<Platform> {
        KNOWN.iter().copied().find(|p| p.system == system)
    }

    /// The platform a name component selects (`arm64`), if it is one.
    pub fn of_name_component(component: &str) -> Option<Platform> {
        NAME_PREFIXES
            .contains(&component)
            .then(|| KNOWN.iter().copied().find(|p| p.architecture == component))
            .flatten()
    }

    /// The name component that selects this platform, if there is one.
    pub fn name_component(self) -> Option<&'static str> {
        NAME_PREFIXES
            .iter()
            .copied()
            .find(|c| Platform::of_name_component(c) == Some(self))
    }

    /// GOARCH-style architecture (`amd64`, `arm64`).
    pub fn architecture(self) -> &'static str {
        self.architecture
    }

    pub fn variant(self) -> Option<&'static str> {
        self.variant
    }

    /// The Nix system double that builds for this platform (`aarch64-linux`).
    pub fn system(self) -> &'static str {
        self.system
    }

    /// The OS: always `linux`.
    pub fn os(self) -> &'static str {
        "linux"
    }
}

impl fmt::Display for Platform {
    /// `linux/arm64`, `linux/arm/v7`: as `docker pull --platform` takes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "linux/{}", self.architecture)?;
        if let Some(variant) = self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = PlatformError;

    /// `linux/arm64` (`os/architecture[/variant]`), also spelt with Nix's or uname's names
    /// (`linux/aarch64`, `linux/x86_64`); `linux/arm64/v8` is `linux/arm64` and `linux/arm` is
    /// `linux/arm/v7`, as containerd normalises them.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let refused = || PlatformError(text.chars().take(100).collect());
        let mut parts = text.trim().split('/');
        let (Some("linux"), Some(architecture), variant, None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refused());
        };
        let architecture = match architecture {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let variant = match (architecture, variant) {
            ("arm64", Some("v8")) => None,
            ("arm", None) => Some("v7"),
            (_, variant) => variant,
        };
        KNOWN
            .iter()
            .copied()
            .find(|p| p.architecture == architecture && p.variant == variant)
            .ok_or_else(refused)
    }
}

/// The platforms a server builds for: the one a name without a platform gets, and those an
/// image index lists (`NIXERY_PLATFORMS`; none: no index is served).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platforms {
    default: Platform,
    indexed: Vec<Platform>,
}

impl Platforms {
    /// The platforms of `NIXERY_PLATFORMS` (`linux/amd64,linux/arm64`; empty: none) on a server
    /// running on `host`. A name without a platform gets `host` when a client accepts no index
    /// and `host` is listed (or none are); else the first one listed.
    pub fn new(host: Platform, listed: &str) -> Result<Platforms, PlatformError> {
        let mut indexed: Vec<Platform> = Vec::new();
        for text in listed.split(',').filter(|t| !t.trim().is_empty()) {
            let platform = text.parse()?;
            if !indexed.contains(&platform) {
                indexed.push(platform);
            }
        }
        let default = match indexed.first() {
            Some(first) if !indexed.contains(&host) => *first,
            _ => host,
        };
        Ok(Platforms { default, indexed })
    }

    /// The platform an image of `name` is built for when one image is asked for: the name's own
    /// (`arm64/…`), else the default.
    pub fn of(&self, name: &super::ImageName) -> Platform {
        name.platform().unwrap_or(self.default)
    }

    /// The platforms an index of `name` lists: none when no platforms are configured or the name
    /// chooses its own.
    pub fn indexed(&self, name: &super::ImageName) -> &[Platform] {
        if name.platform().is_some() {
            &[]
        } else {
            &self.indexed
        }
    }

    /// Every platform listed in `NIXERY_PLATFORMS`.
    pub fn listed(&self) -> &[Platform] {
        &self.indexed
    }

    pub fn default_platform(&self) -> Platform {
        self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(text: &str) -> Platform {
        text.parse().unwrap()
    }

    #[test]
    fn platforms_parse_in_every_spelling_clients_use() {
        assert_eq!(platform("linux/amd64").system(), "x86_64-linux");
        assert_eq!(platform("linux/x86_64"), platform("linux/amd64"));
        assert_eq!(platform("linux/arm64").system(), "aarch64-linux");
        assert_eq!(platform("linux/arm64/v8"), platform("linux/arm64"));
        assert_eq!(platform("linux/aarch64"), platform("linux/arm64"));
        assert_eq!(platform("linux/arm/v7").system(), "armv7l-linux");
        assert_eq!(platform("linux/arm"), platform("linux/arm/v7"));
        assert_eq!(platform("linux/arm64").to_string(), "linux/arm64");
        assert_eq!(platform("linux/arm/v6").to_string(), "linux/arm/v6");
        for bad in [
            "",
            "arm64",
            "windows/amd64",
            "linux/sparc",
            "linux/amd64/v2/x",
            "linux/",
        ] {
            let err = bad.parse::<Platform>().unwrap_err().to_string();
            assert!(err.contains("linux/amd64, linux/arm64"), "{err}");
        }
    }

    #[test]
    fn systems_and_name_components_map_to_platforms() {
        assert_eq!(
            Platform::of_system("aarch64-linux"),
            Some(platform("linux/arm64"))
        );
        assert_eq!(Platform::of_system("x86_64-darwin"), None);
        assert_eq!(
            Platform::of_name_component("arm64"),
            Some(platform("linux/arm64"))
        );
        assert_eq!(Platform::of_name_component("amd64"), None);
        assert_eq!(platform("linux/arm64").name_component(), Some("arm64"));
        assert_eq!(platform("linux/amd64").name_component(), None);
    }

    #[test]
    fn the_default_platform_is_the_hosts_unless_it_is_not_listed() {
        let amd64 = platform("linux/amd64");
        let arm64 = platform("linux/arm64");
        let none = Platforms::new(amd64, "").unwrap();
        assert_eq!(none.default_platform(), amd64);
        assert!(none.listed().is_empty());
        let both = Platforms::new(amd64, "linux/arm64, linux/amd64,linux/arm64").unwrap();
        assert_eq!(both.default_platform(), amd64);
        assert_eq!(both.listed(), [arm64, amd64]);
        let other = Platforms::new(amd64, "linux/arm64").unwrap();
        assert_eq!(other.default_platform(), arm64);
        assert!(Platforms::new(amd64, "linux/amd64,linux/mips").is_err());
    }

    #[test]
    fn a_name_with_a_platform_gets_no_index() {
        let platforms = Platforms::new(platform("linux/amd64"), "linux/amd64,linux/arm64").unwrap();
        let plain: super::super::ImageName = "shell/hello".parse().unwrap();
        let arm: super::super::ImageName = "arm64/shell/hello".parse().unwrap();
        assert_eq!(platforms.indexed(&plain).len(), 2);
        assert!(platforms.indexed(&arm).is_empty());
        assert_eq!(platforms.of(&plain), platform("linux/amd64"));
        assert_eq!(platforms.of(&arm), platform("linux/arm64"));
    }
}
