//! Signing what nixery builds (`NIXERY_SIGNING_KEY`), in the formats cosign, podman and skopeo
//! verify: the [`key`] and who signs with it ([`Signer`]).

pub mod cosign;
pub mod key;
pub mod provenance;

pub use key::{KeyError, SigningKey};

/// What signs images: the key, and the host clients pull from, which signatures name images
/// under (`NIXERY_REGISTRY_HOST`).
#[derive(Debug)]
pub struct Signer {
    key: SigningKey,
    registry_host: String,
}

impl Signer {
    /// A signer with `key` naming images under `registry_host` (`host` or `host:port`, as
    /// clients write it before the image name).
    pub fn new(key: SigningKey, registry_host: &str) -> Result<Self, String> {
        let valid = !registry_host.is_empty()
            && registry_host.len() <= 255
            && registry_host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if !valid {
            return Err(format!(
                "NIXERY_REGISTRY_HOST={registry_host:?} is not a host or host:port (such as \
                 registry.example.com or 127.0.0.1:5000, without a scheme or path)"
            ));
        }
        Ok(Self {
            key,
            registry_host: registry_host.to_owned(),
        })
    }

    /// The key signatures are made with.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// The host signatures name images under.
    pub fn registry_host(&self) -> &str {
        &self.registry_host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_pem(include_str!("testdata/pkcs8.pem"), None).unwrap()
    }

    #[test]
    fn the_registry_host_is_a_host_and_port_without_scheme_or_path() {
        for host in [
            "registry.example.com",
            "127.0.0.1:5000",
            "[::1]:5000",
            "localhost",
        ] {
            assert_eq!(Signer::new(key(), host).unwrap().registry_host(), host);
        }
        for host in [
            "",
            "https://registry.example.com",
            "registry.example.com/nixery",
            "a b",
        ] {
            let err = Signer::new(key(), host).unwrap_err();
            assert!(err.contains("NIXERY_REGISTRY_HOST"), "{err}");
        }
    }
}
