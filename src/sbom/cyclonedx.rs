//! The CycloneDX 1.6 JSON document of an image
//! ([spec](https://cyclonedx.org/docs/1.6/json/)): the image as the `container` the metadata
//! describes, one component per store path (its `bom-ref` the path), and the dependency graph
//! of the closure below the image. cyclonedx-python-lib's strict JSON validator accepts it
//! (see `scripts/sbom-validators`).

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::spdx::{License, licenses};
use super::{Entry, PackageMeta, Subject, digest_hex, entries, web_url};
use crate::nix::Closure;

/// The `bom-ref` of the image (store paths, the other refs, start with `/`).
const IMAGE_REF: &str = "image";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bom<'a> {
    bom_format: &'static str,
    spec_version: &'static str,
    serial_number: String,
    version: u32,
    metadata: Metadata<'a>,
    components: Vec<Component<'a>>,
    dependencies: Vec<Dependency<'a>>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    timestamp: &'a str,
    tools: Tools,
    component: Component<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    supplier: Option<Organization<'a>>,
}

#[derive(Serialize)]
struct Tools {
    components: [Tool; 1],
}

#[derive(Serialize)]
struct Tool {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Component<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "bom-ref")]
    bom_ref: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    supplier: Option<Organization<'a>>,
    name: &'a str,
    version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hashes: Vec<Hash>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    licenses: Vec<LicenseChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purl: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    external_references: Vec<ExternalReference<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    properties: Vec<Property>,
}

#[derive(Clone, Serialize)]
struct Organization<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    url: Vec<&'a str>,
}

#[derive(Serialize)]
struct Hash {
    alg: &'static str,
    content: String,
}

/// One entry of a component's `licenses`: a license by id or name, or (alone) an SPDX
/// expression.
#[derive(Serialize)]
#[serde(untagged)]
enum LicenseChoice {
    License {
        license: LicenseEntry,
    },
    Expression {
        expression: String,
        acknowledgement: &'static str,
    },
}

#[derive(Serialize)]
struct LicenseEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    acknowledgement: &'static str,
}

#[derive(Serialize)]
struct ExternalReference<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    url: &'a str,
}

#[derive(Serialize)]
struct Property {
    name: &'static str,
    value: String,
}

impl Property {
    fn new(name: &'static str, value: impl Into<String>) -> Self {
        Property {
            name,
            value: value.into(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Dependency<'a> {
    #[serde(rename = "ref")]
    reference: &'a str,
    depends_on: Vec<&'a str>,
}

/// The CycloneDX 1.6 JSON document of `closure`, as the module says.
pub(super) fn document(subject: &Subject, closure: &Closure, packages: &[PackageMeta]) -> Vec<u8> {
    let entries = entries(closure, packages);
    let supplier = organization(subject);

    let mut dependencies = Vec::with_capacity(entries.len() + 1);
    dependencies.push(Dependency {
        reference: IMAGE_REF,
        depends_on: vec![closure.root.as_str()],
    });
    dependencies.extend(entries.iter().map(|entry| Dependency {
        reference: &entry.path.path,
        depends_on: entry.depends_on.clone(),
    }));

    let bom = Bom {
        bom_format: "CycloneDX",
        spec_version: "1.6",
        serial_number: serial_number(&subject.digest),
        version: 1,
        metadata: Metadata {
            timestamp: &subject.created,
            tools: Tools {
                components: [Tool {
                    kind: "application",
                    name: "nixery",
                    version: env!("CARGO_PKG_VERSION"),
                }],
            },
            component: image_component(subject, closure, supplier.clone()),
            supplier: supplier.clone(),
        },
        components: entries
            .iter()
            .map(|entry| path_component(entry, supplier.clone()))
            .collect(),
        dependencies,
    };
    // Strings, numbers and sequences only: nothing here can fail to serialise.
    serde_json::to_vec_pretty(&bom).expect("a CycloneDX document serialises")
}

/// The supplier of every component: the package source, with its URL when it is one.
fn organization(subject: &Subject) -> Option<Organization<'_>> {
    let supplier = &subject.supplier;
    let name = supplier.name.trim();
    (!name.is_empty()).then(|| Organization {
        name,
        url: supplier
            .url
            .as_deref()
            .and_then(web_url)
            .into_iter()
            .collect(),
    })
}

/// The component of the image itself, the one the metadata describes.
fn image_component<'a>(
    subject: &'a Subject,
    closure: &'a Closure,
    supplier: Option<Organization<'a>>,
) -> Component<'a> {
    let mut properties = vec![
        Property::new("nixery:manifest_digest", &subject.digest),
        Property::new("nixery:platform", &subject.platform),
        Property::new("nixery:root", &closure.root),
    ];
    if let Some(commit) = &subject.supplier.commit {
        properties.push(Property::new("nixery:package_set_commit", commit));
    }
    Component {
        kind: "container",
        bom_ref: IMAGE_REF,
        supplier,
        name: &subject.image,
        version: &subject.tag,
        description: Some(format!(
            "The {} container image of the Nix packages {}",
            subject.platform,
            closure.packages.join(", ")
        )),
        hashes: digest_hex(&subject.digest)
            .map(|hex| Hash {
                alg: "SHA-256",
                content: hex,
            })
            .into_iter()
            .collect(),
        licenses: Vec::new(),
        purl: None,
        external_references: Vec::new(),
        properties,
    }
}

/// The component of one store path.
fn path_component<'a>(entry: &'a Entry, supplier: Option<Organization<'a>>) -> Component<'a> {
    let path = entry.path;
    let meta = entry.meta.first();
    let mut properties = vec![
        Property::new("nix:store_path", &path.path),
        Property::new("nix:nar_hash", &path.nar_hash),
        Property::new("nix:nar_size", path.nar_size.to_string()),
    ];
    if !entry.versioned {
        properties.push(Property::new(
            "nix:version",
            "none; the store hash stands in",
        ));
    }
    for meta in &entry.meta {
        properties.push(Property::new("nix:attribute", &meta.attr));
    }
    Component {
        kind: if entry.meta.is_empty() {
            "library"
        } else {
            "application"
        },
        bom_ref: &path.path,
        supplier,
        name: entry.name,
        version: entry.version,
        description: meta
            .and_then(|m| m.description.as_deref())
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_owned),
        hashes: entry
            .sha256
            .iter()
            .map(|hex| Hash {
                alg: "SHA-256",
                content: hex.clone(),
            })
            .collect(),
        licenses: meta.map_or_else(Vec::new, |meta| license_choices(meta)),
        purl: Some(&entry.purl),
        external_references: meta
            .and_then(|m| m.homepage.as_deref())
            .and_then(web_url)
            .map(|url| ExternalReference {
                kind: "website",
                url,
            })
            .into_iter()
            .collect(),
        properties,
    }
}

/// The licenses `meta` declares: each by its SPDX id, or by name when it is not on the list
/// CycloneDX's schema accepts as ids. A license with an exception has no id of its own, so
/// when one is there and all are on the list they become one SPDX expression instead.
fn license_choices(meta: &PackageMeta) -> Vec<LicenseChoice> {
    let licenses = licenses(meta);
    let expressions: Option<Vec<String>> = licenses.iter().map(License::expression).collect();
    let has_exception = licenses.iter().any(|license| {
        matches!(
            license,
            License::Listed {
                exception: Some(_),
                ..
            }
        )
    });
    if let (Some(expressions), true) = (expressions, has_exception) {
        return vec![LicenseChoice::Expression {
            expression: expressions.join(" AND "),
            acknowledgement: "declared",
        }];
    }
    licenses
        .iter()
        .map(|license| {
            let (id, name) = match license {
                License::Listed {
                    id,
                    exception: None,
                } => (Some(*id), None),
                // Beside a license with no id, one with an exception goes by its expression.
                License::Listed { .. } => (None, license.expression()),
                License::Named(name) => (None, Some((*name).to_owned())),
            };
            LicenseChoice::License {
                license: LicenseEntry {
                    id,
                    name,
                    acknowledgement: "declared",
                },
            }
        })
        .collect()
}

/// `urn:uuid:` and a UUID of the image digest's first 16 bytes, marked as a version 8
/// (custom) UUID of the RFC 9562 variant: the same image always has the same serial number.
fn serial_number(digest: &str) -> String {
    let bytes: Vec<u8> = match digest_hex(digest).and_then(|hex| hex::decode(hex).ok()) {
        Some(bytes) => bytes,
        None => Sha256::digest(digest.as_bytes()).to_vec(),
    };
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&bytes[..16]);
    uuid[6] = (uuid[6] & 0x0f) | 0x80;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let hex = hex::encode(uuid);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::tests::{
        BUSYBOX, CURL, GLIBC, HELLO, HEX, ROOT, STDENV, closure, edges, metas, subject,
    };
    use super::*;

    fn bom() -> Value {
        serde_json::from_slice(&document(&subject(), &closure(), &metas())).unwrap()
    }

    fn component<'a>(bom: &'a Value, path: &str) -> &'a Value {
        bom["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["bom-ref"] == path)
            .unwrap()
    }

    fn property<'a>(component: &'a Value, name: &str) -> Vec<&'a str> {
        component["properties"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == name)
            .map(|p| p["value"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn the_metadata_describes_the_image() {
        let bom = bom();
        assert_eq!(bom["bomFormat"], "CycloneDX");
        assert_eq!(bom["specVersion"], "1.6");
        assert_eq!(bom["version"], 1);
        // The digest's first 16 bytes, 4c1b1e8e1b5bb4a7b2a5e8bd2c6b0a2f, marked version 8.
        assert_eq!(
            bom["serialNumber"],
            "urn:uuid:4c1b1e8e-1b5b-84a7-b2a5-e8bd2c6b0a2f"
        );
        let metadata = &bom["metadata"];
        assert_eq!(metadata["timestamp"], "2024-05-01T12:00:00Z");
        assert_eq!(
            metadata["tools"],
            json!({"components": [
                {"type": "application", "name": "nixery", "version": env!("CARGO_PKG_VERSION")}
            ]})
        );
        let supplier = json!({"name": "nixpkgs", "url": ["https://github.com/NixOS/nixpkgs"]});
        assert_eq!(metadata["supplier"], supplier);
        let image = &metadata["component"];
        assert_eq!(image["type"], "container");
        assert_eq!(image["bom-ref"], IMAGE_REF);
        assert_eq!(image["name"], "hello/stdenv/curl");
        assert_eq!(image["version"], "latest");
        assert_eq!(image["supplier"], supplier);
        assert_eq!(
            image["hashes"],
            json!([{
                "alg": "SHA-256",
                "content": "4c1b1e8e1b5bb4a7b2a5e8bd2c6b0a2f9f3e8c3b1a0d9e8f7a6b5c4d3e2f1a0b",
            }])
        );
        assert_eq!(
            property(image, "nixery:package_set_commit"),
            ["0123456789abcdef0123456789abcdef01234567"]
        );
    }

    #[test]
    fn serial_numbers_are_uuids_even_of_odd_digests() {
        let pattern = regex::Regex::new(
            "^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
        )
        .unwrap();
        for digest in [
            "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "",
            "sha512:abc",
        ] {
            let serial = serial_number(digest);
            assert!(pattern.is_match(&serial), "{digest:?}: {serial}");
        }
        assert_ne!(serial_number(""), serial_number("sha512:abc"));
    }

    #[test]
    fn every_store_path_is_one_component_with_its_hex_hash() {
        let bom = bom();
        let components = bom["components"].as_array().unwrap();
        assert_eq!(components.len(), HEX.len());
        let refs: Vec<&str> = components
            .iter()
            .map(|c| c["bom-ref"].as_str().unwrap())
            .collect();
        let mut sorted = refs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(refs, sorted, "sorted, each once");
        for (path, hex) in HEX {
            let component = component(&bom, path);
            assert_eq!(
                component["hashes"],
                json!([{"alg": "SHA-256", "content": hex}])
            );
            assert_eq!(property(component, "nix:store_path"), [path]);
            assert_eq!(property(component, "nix:nar_size"), ["1216"]);
            assert_eq!(component["supplier"]["name"], "nixpkgs");
        }
        assert_eq!(
            property(component(&bom, HELLO), "nix:nar_hash"),
            ["sha256:1a142cx1wypy6i7y2ysia9fjwhlg6w394p73ff2rajw374pn0k7a"]
        );
    }

    #[test]
    fn dependencies_are_the_closure_graph() {
        let bom = bom();
        let dependencies = bom["dependencies"].as_array().unwrap();
        assert_eq!(dependencies[0]["ref"], IMAGE_REF);
        assert_eq!(dependencies.len(), HEX.len() + 1);
        let mut edges_found = Vec::new();
        for dependency in dependencies {
            let from = dependency["ref"].as_str().unwrap();
            let to: Vec<&str> = dependency["dependsOn"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_str().unwrap())
                .collect();
            let mut sorted = to.clone();
            sorted.sort();
            assert_eq!(to, sorted, "{from}");
            edges_found.extend(to.into_iter().map(|to| (from, to)));
        }
        let mut expected = edges();
        expected.sort();
        edges_found.sort();
        assert_eq!(edges_found, expected);
        // Leaves are listed with no dependencies, as the spec asks.
        let busybox = dependencies.iter().find(|d| d["ref"] == BUSYBOX).unwrap();
        assert_eq!(busybox["dependsOn"], json!([]));
    }

    #[test]
    fn a_path_without_a_version_has_its_hash_and_says_so() {
        let bom = bom();
        for path in [BUSYBOX, STDENV, ROOT] {
            let component = component(&bom, path);
            assert_eq!(component["version"], super::super::store_hash(path));
            assert_eq!(
                property(component, "nix:version"),
                ["none; the store hash stands in"]
            );
        }
        let glibc = component(&bom, GLIBC);
        assert_eq!(
            (&glibc["name"], &glibc["version"]),
            (&json!("glibc"), &json!("2.38"))
        );
        assert!(property(glibc, "nix:version").is_empty());
        assert_eq!(glibc["purl"], "pkg:nix/glibc@2.38");
    }

    #[test]
    fn requested_packages_carry_their_meta() {
        let bom = bom();
        let hello = component(&bom, HELLO);
        assert_eq!(hello["type"], "application");
        assert_eq!(property(hello, "nix:attribute"), ["hello"]);
        assert_eq!(
            hello["licenses"],
            json!([
                {"license": {"id": "GPL-3.0-or-later", "acknowledgement": "declared"}},
                {"license": {"name": "unfree", "acknowledgement": "declared"}},
                {"license": {"id": "MIT", "acknowledgement": "declared"}},
            ])
        );
        assert_eq!(
            hello["externalReferences"],
            json!([{"type": "website", "url": "https://www.gnu.org/software/hello/manual/"}])
        );
        assert_eq!(
            hello["description"],
            "A program that produces a familiar, friendly greeting"
        );
        let stdenv = component(&bom, STDENV);
        assert_eq!(
            stdenv["licenses"],
            json!([{"expression": "Apache-2.0 WITH LLVM-exception", "acknowledgement": "declared"}])
        );
        assert!(stdenv.get("externalReferences").is_none());
        let curl = component(&bom, CURL);
        assert_eq!(
            curl["licenses"],
            json!([{"license": {"id": "curl", "acknowledgement": "declared"}}])
        );
        assert!(curl.get("description").is_none());
        let glibc = component(&bom, GLIBC);
        assert_eq!(glibc["type"], "library");
        assert!(glibc.get("licenses").is_none());
    }

    #[test]
    fn an_exception_beside_an_unlisted_license_is_a_name() {
        let meta = PackageMeta {
            licenses: vec![
                "GPL-2.0+ WITH Classpath-exception-2.0".to_owned(),
                "free".to_owned(),
            ],
            ..PackageMeta::default()
        };
        assert_eq!(
            serde_json::to_value(license_choices(&meta)).unwrap(),
            json!([
                {"license": {
                    "name": "GPL-2.0-or-later WITH Classpath-exception-2.0",
                    "acknowledgement": "declared",
                }},
                {"license": {"name": "free", "acknowledgement": "declared"}},
            ])
        );
    }
}
