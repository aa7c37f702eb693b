//! Reading the `packages.json.br` that nixos.org publishes with every channel release: brotli
//! JSON, `{"version":2,"packages":{"<attr>":{"pname","version","meta":{…}}}}`, as
//! `nix-env -qa --json --meta` writes it. Only the fields the catalog keeps are read; the rest
//! (platforms, maintainers, long descriptions) is skipped while parsing, never held.

use std::fmt;
use std::io::{BufReader, Read};

use serde::Deserialize;
use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde_json::Value;

use super::{CatalogError, MAX_PACKAGES, Package};

/// The format version this reader knows.
const VERSION: u64 = 2;

/// Most bytes of JSON read from one file (a real channel's is well under it, mostly `platforms`
/// and `maintainers` lists, skipped): a file past this is refused rather than parsed for minutes.
pub const MAX_JSON_BYTES: u64 = 1 << 30;

/// The packages of a `packages.json.br`.
pub fn parse(bytes: &[u8]) -> Result<Vec<Package>, CatalogError> {
    let decompressed = brotli_decompressor::Decompressor::new(bytes, 64 * 1024);
    let mut reader = BufReader::new(decompressed.take(MAX_JSON_BYTES));
    let mut deserializer = serde_json::Deserializer::from_reader(&mut reader);
    let parsed = File::deserialize(&mut deserializer).and_then(|file| {
        deserializer.end()?;
        Ok(file)
    });
    let file = match parsed {
        Ok(file) => file,
        Err(_) if reader.get_ref().limit() == 0 => {
            return Err(CatalogError::TooLarge(format!(
                "packages.json has more than {MAX_JSON_BYTES} bytes"
            )));
        }
        Err(e) => return Err(CatalogError::PackagesJson(e.to_string())),
    };
    match file.version {
        Some(VERSION) => {}
        other => return Err(CatalogError::PackagesJsonVersion(other)),
    }
    file.packages
        .ok_or_else(|| CatalogError::PackagesJson("no \"packages\" object".into()))
}

/// The top level of the file.
#[derive(Deserialize)]
struct File {
    version: Option<u64>,
    #[serde(default, deserialize_with = "packages")]
    packages: Option<Vec<Package>>,
}

/// One package as the file has it.
#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    version: Value,
    #[serde(default)]
    meta: Meta,
}

/// The part of `meta` the catalog keeps; each field kept loosely, since nixpkgs allows several
/// shapes (a homepage or a list of them; a license as a set, a list of sets or a string).
#[derive(Default, Deserialize)]
struct Meta {
    #[serde(default)]
    description: Value,
    #[serde(default)]
    homepage: Value,
    #[serde(default)]
    license: Value,
}

/// `packages`, read one entry at a time into [`Package`]s (those that can be pulled), refused
/// past [`MAX_PACKAGES`] entries.
fn packages<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Package>>, D::Error> {
    struct Packages;
    impl<'de> Visitor<'de> for Packages {
        type Value = Vec<Package>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of packages by attribute path")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<Package>, A::Error> {
            let mut packages = Vec::with_capacity(map.size_hint().unwrap_or(0).min(MAX_PACKAGES));
            while let Some(attr) = map.next_key::<String>()? {
                let entry: Entry = map.next_value()?;
                if packages.len() == MAX_PACKAGES {
                    return Err(serde::de::Error::custom(format!(
                        "more than {MAX_PACKAGES} packages"
                    )));
                }
                packages.extend(Package::new(
                    attr,
                    text(&entry.version),
                    text(&entry.meta.description),
                    homepage(&entry.meta.homepage),
                    license(&entry.meta.license),
                ));
            }
            Ok(packages)
        }
    }
    struct Seed;
    impl<'de> DeserializeSeed<'de> for Seed {
        type Value = Vec<Package>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<Package>, D::Error> {
            d.deserialize_map(Packages)
        }
    }
    Seed.deserialize(d).map(Some)
}

/// A non-empty string, else nothing.
fn text(value: &Value) -> Option<String> {
    value.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

/// A homepage, or the first of a list of them.
fn homepage(value: &Value) -> Option<String> {
    match value {
        Value::Array(list) => list.iter().find_map(text),
        other => text(other),
    }
}

/// A license as nixpkgs writes it (`lib.licenses.mit`, a list of them, or a string), as one
/// string: each license's SPDX id, else its short name, else its full name; several joined
/// with `, `.
pub fn license(value: &Value) -> Option<String> {
    let one = |value: &Value| match value {
        Value::Object(set) => ["spdxId", "shortName", "fullName"]
            .iter()
            .find_map(|field| set.get(*field).and_then(text)),
        other => text(other),
    };
    match value {
        Value::Array(list) => {
            let names: Vec<String> = list.iter().filter_map(one).collect();
            (!names.is_empty()).then(|| names.join(", "))
        }
        other => one(other),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    pub fn brotli(json: &str) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut writer = brotli::CompressorWriter::new(&mut out, 4096, 9, 22);
            writer.write_all(json.as_bytes()).unwrap();
        }
        out
    }

    #[test]
    fn channel_files_are_read() {
        let json = r#"{"version":2,"packages":{
            "hello":{"name":"hello-2.12.1","pname":"hello","version":"2.12.1","system":"x86_64-linux",
                "meta":{"description":"A program that produces a familiar, friendly greeting",
                    "homepage":"https://www.gnu.org/software/hello/manual/",
                    "license":{"deprecated":false,"free":true,"fullName":"GNU General Public License v3.0 or later","shortName":"gpl3Plus","spdxId":"GPL-3.0-or-later","url":"https://spdx.org/licenses/GPL-3.0-or-later.html"},
                    "platforms":["x86_64-linux","aarch64-linux"],"maintainers":[{"name":"x"}]}},
            "xorg.xev":{"pname":"xev","version":"1.2.5","meta":{"homepage":["https://x.org","https://y.org"],
                "license":[{"shortName":"mit"},{"fullName":"Some License"},"custom"]}},
            "_1password":{"pname":"1password-cli","version":"2.24.0","meta":{"license":{"shortName":"unfree","free":false}}},
            "__splicedPackages":{"pname":"x","version":"1","meta":{}},
            "odd":{"version":3,"meta":{"description":["not","a","string"],"license":null}}
        }}"#;
        let mut packages = parse(&brotli(json)).unwrap();
        packages.sort_by(|a, b| a.attr.cmp(&b.attr));
        let attrs: Vec<&str> = packages.iter().map(|p| p.attr.as_str()).collect();
        // `__splicedPackages` cannot be pulled, so it is left out.
        assert_eq!(attrs, ["_1password", "hello", "odd", "xorg.xev"]);
        let hello = &packages[1];
        assert_eq!(hello.name, "hello");
        assert_eq!(hello.version.as_deref(), Some("2.12.1"));
        assert_eq!(
            hello.description.as_deref(),
            Some("A program that produces a familiar, friendly greeting")
        );
        assert_eq!(
            hello.homepage.as_deref(),
            Some("https://www.gnu.org/software/hello/manual/")
        );
        assert_eq!(hello.license.as_deref(), Some("GPL-3.0-or-later"));
        let xev = &packages[3];
        assert_eq!(xev.homepage.as_deref(), Some("https://x.org"));
        assert_eq!(xev.license.as_deref(), Some("mit, Some License, custom"));
        assert_eq!(packages[0].name, "1password");
        assert_eq!(packages[0].license.as_deref(), Some("unfree"));
        let odd = &packages[2];
        assert_eq!(
            (&odd.version, &odd.description, &odd.license),
            (&None, &None, &None)
        );
    }

    #[test]
    fn bad_files_are_errors() {
        let err = |bytes: &[u8]| parse(bytes).unwrap_err().to_string();
        assert!(
            err(b"not brotli at all").contains("packages.json"),
            "{}",
            err(b"x")
        );
        assert!(err(&brotli(r#"{"version":1,"packages":{}}"#)).contains("version 1"));
        assert!(err(&brotli(r#"{"packages":{}}"#)).contains("no version"));
        assert!(err(&brotli(r#"{"version":2}"#)).contains("no \"packages\""));
        assert!(err(&brotli(r#"{"version":2,"packages":[]}"#)).contains("packages.json"));
        assert!(err(&brotli(r#"{"version":2,"packages":{"a":{}}"#)).contains("packages.json"));
        let truncated = brotli(r#"{"version":2,"packages":{"hello":{"version":"1"}}}"#);
        assert!(err(&truncated[..truncated.len() / 2]).contains("packages.json"));
    }
}
