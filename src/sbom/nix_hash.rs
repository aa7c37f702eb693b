//! NAR hashes in the forms Nix writes them, turned into the lowercase hex sha256 that SPDX
//! `checksums` and CycloneDX `hashes` want.

/// Bytes in a sha256.
const SHA256_LEN: usize = 32;

/// Nix's base32 alphabet: digits and lowercase letters without `e`, `o`, `t` and `u`.
const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Characters of a sha256 in Nix's base32: 256 bits in 5-bit digits.
const NIX_BASE32_LEN: usize = (SHA256_LEN * 8 - 1) / 5 + 1;

/// The sha256 `text` holds, as 64 lowercase hex digits: `text` is hex, Nix's base32 or base64,
/// with or without a `sha256:` prefix (as `nix-store --dump-db` and `nix path-info` print it),
/// or an SRI hash `sha256-<base64>`. `None` for anything else (another algorithm, a malformed or
/// truncated hash).
pub fn nar_hash_hex(text: &str) -> Option<String> {
    let text = text.trim();
    let bytes = if let Some(base64) = text.strip_prefix("sha256-") {
        decode_base64(base64)?
    } else {
        let digits = text.strip_prefix("sha256:").unwrap_or(text);
        match digits.len() {
            64 => hex::decode(digits).ok()?,
            NIX_BASE32_LEN => decode_nix_base32(digits)?,
            44 => decode_base64(digits)?,
            _ => return None,
        }
    };
    (bytes.len() == SHA256_LEN).then(|| hex::encode(bytes))
}

/// A sha256 in Nix's base32 (`libutil`'s `parseHash`): the last character holds the lowest
/// five bits of the first byte, and so on backwards, so the string reads as one little-endian
/// number written most significant digit first. The first character may only hold the 256th
/// bit; anything above it is not a hash Nix would print.
fn decode_nix_base32(text: &str) -> Option<Vec<u8>> {
    let mut bytes = [0u8; SHA256_LEN];
    for (n, c) in text.bytes().rev().enumerate() {
        let digit = NIX_BASE32.iter().position(|&d| d == c)? as u16;
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let shifted = digit << j;
        bytes[i] |= shifted as u8;
        let carry = (shifted >> 8) as u8;
        match bytes.get_mut(i + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return None,
            None => {}
        }
    }
    Some(bytes.to_vec())
}

/// Standard base64 with its padding, as in SRI hashes (non-zero bits past the last byte are
/// refused, as the `base64` crate's standard engine does).
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hello-2.12.1 of nix/offline-pkgs: the hex `nix-store --dump-db` printed, and the base32
    /// `nix-hash --type sha256 --to-base32` and the base64 `xxd -r -p | base64` made of it.
    const HEX: &str = "ea4c602f39834b958573e35c9206378f422e5d52517be14f34fe7a1e3a1324a8";
    const BASE32: &str = "1a142cx1wypy6i7y2ysia9fjwhlg6w394p73ff2rajw374pn0k7a";
    const BASE64: &str = "6kxgLzmDS5WFc+NckgY3j0IuXVJRe+FPNP56HjoTJKg=";

    #[test]
    fn every_form_nix_writes_gives_the_same_hex() {
        let hex = Some(HEX.to_owned());
        assert_eq!(nar_hash_hex(HEX), hex);
        assert_eq!(nar_hash_hex(&HEX.to_uppercase()), hex);
        assert_eq!(nar_hash_hex(&format!("sha256:{HEX}")), hex);
        assert_eq!(nar_hash_hex(BASE32), hex);
        assert_eq!(nar_hash_hex(&format!("sha256:{BASE32}")), hex);
        assert_eq!(nar_hash_hex(&format!("sha256-{BASE64}")), hex);
        assert_eq!(nar_hash_hex(&format!("sha256:{BASE64}")), hex);
    }

    #[test]
    fn base32_matches_nix_hash() {
        // `nix-hash --type sha256 --to-base16 <base32>` of other pairs: the bit order shows in
        // a hash whose only set bit is in its last byte.
        let pairs = [
            (
                "1kq0vmx4a8k4fbx6n2mxwz1pvnypmn6pmgf0dy8jqi95xm7f8i8m",
                "1545e44eed25452c916fc0bd7a8dadd7db7dc3e7bd0a6bfa726422457add00cf",
            ),
            (
                "0080000000000000000000000000000000000000000000000000",
                "0000000000000000000000000000000000000000000000000000000000000001",
            ),
            (
                "0dpnhxl4nrzl63dwzm2frzkbjw9qqapzzw5j5gj844kqlvvccyl2",
                "827ac6f6a6781282e42bb2f0ffafc23871b9e6cf4ed4cfdb30f4674b6887f636",
            ),
        ];
        for (base32, hex) in pairs {
            assert_eq!(nar_hash_hex(base32).as_deref(), Some(hex), "{base32}");
        }
    }

    #[test]
    fn anything_else_is_none() {
        for text in [
            "",
            "sha256:",
            &HEX[1..],
            &format!("{HEX}00"),
            &format!("sha512:{HEX}"),
            &format!("md5:{HEX}"),
            // `e` is not in Nix's alphabet.
            "1a142cx1wypy6i7y2ysia9fjwhlg6w394p73ff2rajw374pn0k7e",
            // 257 bits: the first digit can only be 0 or 1.
            "2a142cx1wypy6i7y2ysia9fjwhlg6w394p73ff2rajw374pn0k7a",
            &format!("sha256-{}", &BASE64[..43]),
            "sha256-6kxgLzmDS5WFc+NckgY3j0IuXVJRe+FPNP56HjoTJKh=",
            &format!("sha512-{BASE64}"),
            "sha256-!kxgLzmDS5WFc+NckgY3j0IuXVJRe+FPNP56HjoTJKg=",
        ] {
            assert_eq!(nar_hash_hex(text), None, "{text:?}");
        }
    }
}
