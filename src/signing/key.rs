//! The signing key (`NIXERY_SIGNING_KEY`): an ECDSA P-256 private key read from a PEM file, as
//! PKCS#8 (`openssl genpkey`), SEC1 (`openssl ecparam -genkey`) or cosign's encrypted format
//! (`cosign generate-key-pair`, with `NIXERY_SIGNING_KEY_PASSWORD`); signatures are ASN.1 DER,
//! as cosign makes and checks them.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use crypto_secretbox::aead::{Aead, KeyInit};
use crypto_secretbox::{Key, Nonce, XSalsa20Poly1305};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{DerSignature, SigningKey as EcdsaKey};
use p256::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// The PEM labels of cosign's password-encrypted private keys (cosign 2 writes the first, cosign
/// 1 wrote the second).
const ENCRYPTED_LABELS: [&str; 2] = [
    "ENCRYPTED SIGSTORE PRIVATE KEY",
    "ENCRYPTED COSIGN PRIVATE KEY",
];

/// The most scrypt work a key file may ask for (2^20, 16 times cosign's 2^16): a larger `N`
/// would take minutes and gigabytes at start-up.
const MAX_SCRYPT_LOG_N: u8 = 20;

/// What is wrong with a key file, in words for the operator.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "not a PEM private key (expected -----BEGIN PRIVATE KEY-----, EC PRIVATE KEY or \
         ENCRYPTED SIGSTORE PRIVATE KEY)"
    )]
    NotPem,
    #[error("not an ECDSA P-256 private key: {0}")]
    NotP256(String),
    #[error("the key is encrypted (cosign's format): set NIXERY_SIGNING_KEY_PASSWORD")]
    PasswordNeeded,
    #[error("cannot decrypt the key: wrong NIXERY_SIGNING_KEY_PASSWORD, or a damaged file")]
    WrongPassword,
    #[error("cosign's encrypted key format, but {0}")]
    Encrypted(String),
}

/// An ECDSA P-256 key that signs payloads as cosign does.
pub struct SigningKey {
    key: EcdsaKey,
    public_pem: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private half.
        f.debug_struct("SigningKey")
            .field("id", &self.id())
            .finish()
    }
}

impl SigningKey {
    /// Reads the key in the file at `path`; `password` decrypts cosign's encrypted format.
    pub fn read(path: &std::path::Path, password: Option<&str>) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&text, password)
    }

    /// The key in PEM `text`.
    pub fn from_pem(text: &str, password: Option<&str>) -> Result<Self, KeyError> {
        let (label, der) = pem_block(text).ok_or(KeyError::NotPem)?;
        let key = match label.as_str() {
            "PRIVATE KEY" => {
                EcdsaKey::from_pkcs8_der(&der).map_err(|e| KeyError::NotP256(e.to_string()))?
            }
            "EC PRIVATE KEY" => p256::SecretKey::from_sec1_der(&der)
                .map(EcdsaKey::from)
                .map_err(|e| KeyError::NotP256(e.to_string()))?,
            label if ENCRYPTED_LABELS.contains(&label) => {
                let password = password.ok_or(KeyError::PasswordNeeded)?;
                let pkcs8 = decrypt(&der, password)?;
                EcdsaKey::from_pkcs8_der(&pkcs8).map_err(|e| KeyError::NotP256(e.to_string()))?
            }
            _ => return Err(KeyError::NotPem),
        };
        let public_pem = key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::NotP256(e.to_string()))?;
        Ok(Self { key, public_pem })
    }

    /// The public key as cosign writes it (`cosign.pub`: SubjectPublicKeyInfo in PEM), which
    /// `cosign verify --key` reads.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// A short name for the key: the hex SHA-256 of its public key's DER, which tells the
    /// signatures of two keys apart in storage.
    pub fn id(&self) -> String {
        let der = self
            .key
            .verifying_key()
            .to_public_key_der()
            .map(|der| der.into_vec())
            .unwrap_or_default();
        hex::encode(Sha256::digest(der))
    }

    /// The signature of `payload` (ECDSA over its SHA-256, ASN.1 DER, base64), as cosign puts
    /// in `dev.cosignproject.cosign/signature` and in DSSE envelopes. Deterministic (RFC 6979):
    /// the same key signs the same payload to the same bytes.
    pub fn sign(&self, payload: &[u8]) -> String {
        let signature: DerSignature = self.key.sign(payload);
        BASE64.encode(signature.as_bytes())
    }
}

/// The label and decoded bytes of the first PEM block in `text`.
fn pem_block(text: &str) -> Option<(String, Vec<u8>)> {
    let start = text.find("-----BEGIN ")?;
    let rest = &text[start + "-----BEGIN ".len()..];
    let label_end = rest.find("-----")?;
    let label = &rest[..label_end];
    let body = &rest[label_end + "-----".len()..];
    let end = body.find(&format!("-----END {label}-----"))?;
    let base64: String = body[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    Some((label.to_owned(), BASE64.decode(base64).ok()?))
}

/// cosign's encrypted key: JSON naming scrypt's parameters and salt, and a NaCl secretbox
/// nonce and ciphertext, which holds the PKCS#8 DER of the key
/// (<https://github.com/secure-systems-lab/go-securesystemslib>, `encrypted`).
#[derive(Deserialize)]
struct Encrypted {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

#[derive(Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    salt: String,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct ScryptParams {
    N: u64,
    r: u32,
    p: u32,
}

#[derive(Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

/// The PKCS#8 DER inside cosign's encrypted key `json`.
fn decrypt(json: &[u8], password: &str) -> Result<Vec<u8>, KeyError> {
    let bad = |what: &str| KeyError::Encrypted(what.to_owned());
    let encrypted: Encrypted =
        serde_json::from_slice(json).map_err(|e| KeyError::Encrypted(e.to_string()))?;
    if encrypted.kdf.name != "scrypt" || encrypted.cipher.name != "nacl/secretbox" {
        return Err(KeyError::Encrypted(format!(
            "{} and {} instead of scrypt and nacl/secretbox",
            encrypted.kdf.name, encrypted.cipher.name
        )));
    }
    let ScryptParams { N: n, r, p } = encrypted.kdf.params;
    if !n.is_power_of_two() || n < 2 {
        return Err(bad("scrypt's N is not a power of two"));
    }
    let log_n = n.trailing_zeros() as u8;
    if log_n > MAX_SCRYPT_LOG_N {
        return Err(KeyError::Encrypted(format!(
            "scrypt's N of {n} is over 2^{MAX_SCRYPT_LOG_N}"
        )));
    }
    let params = scrypt::Params::new(log_n, r, p).map_err(|_| bad("bad scrypt parameters"))?;
    let salt = BASE64
        .decode(&encrypted.kdf.salt)
        .map_err(|_| bad("its salt is not base64"))?;
    let nonce = BASE64
        .decode(&encrypted.cipher.nonce)
        .map_err(|_| bad("its nonce is not base64"))?;
    let nonce: [u8; 24] = nonce
        .try_into()
        .map_err(|_| bad("its nonce is not 24 bytes"))?;
    let ciphertext = BASE64
        .decode(&encrypted.ciphertext)
        .map_err(|_| bad("its ciphertext is not base64"))?;
    let mut key = [0u8; 32];
    scrypt::scrypt(password.as_bytes(), &salt, &params, &mut key)
        .map_err(|_| bad("scrypt failed"))?;
    XSalsa20Poly1305::new(Key::from_slice(&key))
        .decrypt(Nonce::from_slice(&nonce), ciphertext.as_slice())
        .map_err(|_| KeyError::WrongPassword)
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::signature::Verifier as _;
    use p256::ecdsa::{DerSignature, VerifyingKey};
    use p256::pkcs8::DecodePublicKey;

    use super::*;

    /// A key `cosign generate-key-pair` (2.5) wrote with COSIGN_PASSWORD=nixery, and its public
    /// half as it wrote it.
    const COSIGN_KEY: &str = include_str!("testdata/cosign.key");
    const COSIGN_PUB: &str = include_str!("testdata/cosign.pub");
    /// The same key as `openssl pkcs8 -topk8 -nocrypt` and `openssl ec` write it.
    const PKCS8_KEY: &str = include_str!("testdata/pkcs8.pem");
    const SEC1_KEY: &str = include_str!("testdata/sec1.pem");

    fn verifies(key: &SigningKey, payload: &[u8], signature: &str) -> bool {
        let public = VerifyingKey::from_public_key_pem(key.public_pem()).unwrap();
        let der = BASE64.decode(signature).unwrap();
        let signature = DerSignature::from_bytes(&der).unwrap();
        public.verify(payload, &signature).is_ok()
    }

    #[test]
    fn cosigns_encrypted_key_is_read_with_its_password() {
        let key = SigningKey::from_pem(COSIGN_KEY, Some("nixery")).unwrap();
        assert_eq!(key.public_pem(), COSIGN_PUB);
    }

    #[test]
    fn the_same_key_in_every_format_has_the_same_public_key_and_signatures() {
        let keys = [
            SigningKey::from_pem(COSIGN_KEY, Some("nixery")).unwrap(),
            SigningKey::from_pem(PKCS8_KEY, None).unwrap(),
            SigningKey::from_pem(SEC1_KEY, None).unwrap(),
        ];
        let payload = b"{\"critical\":{}}";
        for key in &keys {
            assert_eq!(key.public_pem(), COSIGN_PUB);
            assert_eq!(key.id(), keys[0].id());
            // RFC 6979: the same bytes each time, from each format.
            assert_eq!(key.sign(payload), keys[0].sign(payload));
            assert!(verifies(key, payload, &key.sign(payload)));
            assert!(!verifies(key, b"{\"critical\":{ }}", &key.sign(payload)));
        }
    }

    #[test]
    fn a_wrong_or_missing_password_is_named() {
        assert!(matches!(
            SigningKey::from_pem(COSIGN_KEY, None),
            Err(KeyError::PasswordNeeded)
        ));
        assert!(matches!(
            SigningKey::from_pem(COSIGN_KEY, Some("not it")),
            Err(KeyError::WrongPassword)
        ));
    }

    #[test]
    fn what_is_not_a_p256_private_key_is_refused() {
        assert!(matches!(
            SigningKey::from_pem("not a key", None),
            Err(KeyError::NotPem)
        ));
        assert!(matches!(
            SigningKey::from_pem(COSIGN_PUB, None),
            Err(KeyError::NotPem)
        ));
        let truncated = PKCS8_KEY.replacen("M", "", 1);
        assert!(SigningKey::from_pem(&truncated, None).is_err());
        // An RSA key (`openssl genpkey -algorithm rsa`).
        let rsa = include_str!("testdata/rsa.pem");
        assert!(matches!(
            SigningKey::from_pem(rsa, None),
            Err(KeyError::NotP256(_))
        ));
    }

    #[test]
    fn an_encrypted_key_asking_for_too_much_scrypt_work_is_refused() {
        let (_, json) = pem_block(COSIGN_KEY).unwrap();
        let json = String::from_utf8(json)
            .unwrap()
            .replace("\"N\":65536", "\"N\":1073741824");
        let pem = format!(
            "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n{}\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n",
            BASE64.encode(json)
        );
        let err = SigningKey::from_pem(&pem, Some("nixery")).unwrap_err();
        assert!(err.to_string().contains("over 2^20"), "{err}");
    }
}
