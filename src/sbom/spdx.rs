//! The SPDX 2.3 JSON document of an image
//! ([spec](https://spdx.github.io/spdx-spec/v2.3/)): the image as a CONTAINER package that
//! depends on the closure's root, one package per store path, one DEPENDS_ON per reference.
//! It carries the NTIA minimum elements (names, versions, identifiers, suppliers, author,
//! timestamp, relationships), which `ntia-checker` checks (see `scripts/sbom-validators`).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{Entry, PackageMeta, Subject, digest_hex, entries, web_url};
use crate::nix::Closure;

/// The image's package.
const IMAGE_ID: &str = "SPDXRef-Image";

/// The SPDX license list ids ([list](https://spdx.org/licenses/)) a document names as they are:
/// those nixpkgs' `lib/licenses.nix` gives as `spdxId` that the SPDX tools (`license-expression`)
/// and CycloneDX 1.6's schema both know. A license not here is named by what Nix calls it (a
/// `LicenseRef-` here, a license `name` in CycloneDX), so a document never carries an id a
/// validator rejects. Deprecated GNU ids (`GPL-2.0`, `GPL-2.0+`) become their `-only` and
/// `-or-later` forms.
const LICENSE_IDS: &str = "\
    0BSD Abstyles AFL-2.0 AFL-2.1 AFL-3.0 AGPL-3.0-only AGPL-3.0-or-later Aladdin \
    Apache-1.0 Apache-1.1 Apache-2.0 APSL-1.0 APSL-2.0 Arphic-1999 Artistic-1.0 \
    Artistic-1.0-cl8 Artistic-2.0 Beerware Bitstream-Vera BitTorrent-1.0 BitTorrent-1.1 \
    BlueOak-1.0.0 BSD-1-Clause BSD-2-Clause BSD-2-Clause-Patent BSD-2-Clause-Views \
    BSD-3-Clause BSD-3-Clause-Clear BSD-3-Clause-LBNL BSD-4-Clause BSD-4-Clause-Shortened \
    BSD-4-Clause-UC BSD-Protection BSD-Source-Code BSL-1.0 BUSL-1.1 bzip2-1.0.6 CAL-1.0 \
    Caldera CC-BY-1.0 CC-BY-2.0 CC-BY-3.0 CC-BY-4.0 CC-BY-NC-3.0 CC-BY-NC-4.0 \
    CC-BY-NC-ND-3.0 CC-BY-NC-ND-4.0 CC-BY-NC-SA-2.0 CC-BY-NC-SA-2.5 CC-BY-NC-SA-3.0 \
    CC-BY-NC-SA-4.0 CC-BY-ND-3.0 CC-BY-ND-4.0 CC-BY-SA-1.0 CC-BY-SA-2.0 CC-BY-SA-2.5 \
    CC-BY-SA-3.0 CC-BY-SA-4.0 CC-PDDC CC0-1.0 CDDL-1.0 CECILL-2.0 CECILL-2.1 CECILL-B \
    CECILL-C ClArtistic CPAL-1.0 CPL-1.0 curl DOC DRL-1.0 dtoa ECL-2.0 EFL-1.0 EFL-2.0 \
    Elastic-2.0 EPL-1.0 EPL-2.0 EUPL-1.1 EUPL-1.2 Fair FDK-AAC FTL GFDL-1.1-only \
    GFDL-1.1-or-later GFDL-1.2-only GFDL-1.2-or-later GFDL-1.3-only GFDL-1.3-or-later \
    Giftware GPL-1.0-only GPL-1.0-or-later GPL-2.0-only GPL-2.0-or-later GPL-3.0-only \
    GPL-3.0-or-later HPND HPND-sell-variant HPND-UC ICU IJG ImageMagick Imlib2 Info-ZIP \
    Intel-ACPI IPA IPL-1.0 ISC Knuth-CTAN LAL-1.2 LAL-1.3 LGPL-2.0-only LGPL-2.0-or-later \
    LGPL-2.1-only LGPL-2.1-or-later LGPL-3.0-only LGPL-3.0-or-later LGPLLR Libpng \
    libpng-2.0 libtiff LPL-1.02 LPPL-1.0 LPPL-1.2 LPPL-1.3a LPPL-1.3c MirOS MIT MIT-0 \
    MIT-advertising MIT-CMU MIT-feh MIT-Modern-Variant MPL-1.0 MPL-1.1 MPL-2.0 mplus MS-PL \
    MulanPSL-2.0 NASA-1.3 NCBI-PD NCSA NIST-Software NLPL NPOSL-3.0 ODbL-1.0 OFL-1.0 \
    OFL-1.1 OLDAP-2.8 OML OpenSSL OPUBL-1.0 OSL-2.0 OSL-2.1 OSL-3.0 Parity-7.0.0 PHP-3.01 \
    PostgreSQL PSF-2.0 Python-2.0 Qhull QPL-1.0 Ruby Sendmail SGI-B-2.0 Sleepycat SMLNJ \
    SSPL-1.0 TCL Unicode-3.0 Unicode-DFS-2015 Unicode-DFS-2016 Unicode-TOU Unlicense \
    UPL-1.0 Vim VSL-1.0 W3C Watcom-1.0 WTFPL wxWindows X11 \
    X11-distribute-modifications-variant Xfig xinetd XSkat Zlib ZPL-2.0 ZPL-2.1";

/// The SPDX license exceptions a `<license> WITH <exception>` may name (nixpkgs'
/// `Apache-2.0 WITH LLVM-exception`), known to the same tools.
const EXCEPTION_IDS: &str = "\
    389-exception Autoconf-exception-2.0 Autoconf-exception-3.0 Bison-exception-2.2 \
    Classpath-exception-2.0 FLTK-exception Font-exception-2.0 GCC-exception-2.0 \
    GCC-exception-3.1 GPL-3.0-linking-exception GPL-3.0-linking-source-exception \
    LGPL-3.0-linking-exception Libtool-exception Linux-syscall-note LLVM-exception \
    OCaml-LGPL-linking-exception OpenJDK-assembly-exception-1.0 openvpn-openssl-exception \
    Qt-LGPL-exception-1.1 Universal-FOSS-exception-1.0 WxWindows-exception-3.1";

/// One license of a package's `meta.license`, as both documents name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum License<'a> {
    /// On the SPDX license list, with an exception from its exceptions list.
    Listed {
        id: &'static str,
        exception: Option<&'static str>,
    },
    /// Anything else, by the name Nix gives it (`unfree`, `Unfree redistributable`).
    Named(&'a str),
}

impl License<'_> {
    /// As an SPDX expression term, when it is one.
    pub(super) fn expression(&self) -> Option<String> {
        match self {
            License::Listed {
                id,
                exception: None,
            } => Some((*id).to_owned()),
            License::Listed {
                id,
                exception: Some(exception),
            } => Some(format!("{id} WITH {exception}")),
            License::Named(_) => None,
        }
    }
}

/// The licenses `meta` declares, each once, in its order.
pub(super) fn licenses(meta: &PackageMeta) -> Vec<License<'_>> {
    let mut licenses: Vec<License> = Vec::new();
    for name in &meta.licenses {
        let license = license(name);
        if !licenses.contains(&license) {
            licenses.push(license);
        }
    }
    licenses
}

/// How the documents name the license Nix calls `name`.
fn license(name: &str) -> License<'_> {
    let name = name.trim();
    let listed = match name.split_once(" WITH ") {
        Some((id, exception)) => listed_id(id.trim())
            .zip(find(EXCEPTION_IDS, exception.trim()))
            .map(|(id, exception)| License::Listed {
                id,
                exception: Some(exception),
            }),
        None => listed_id(name).map(|id| License::Listed {
            id,
            exception: None,
        }),
    };
    listed.unwrap_or(License::Named(name))
}

/// The license list id `id` stands for: itself, or the current form of a deprecated GNU id.
fn listed_id(id: &str) -> Option<&'static str> {
    find(LICENSE_IDS, id).or_else(|| match id.strip_suffix('+') {
        Some(base) => find(LICENSE_IDS, &format!("{base}-or-later")),
        None => find(LICENSE_IDS, &format!("{id}-only")),
    })
}

/// `id` as `list` spells it (SPDX ids match without regard to case).
fn find(list: &'static str, id: &str) -> Option<&'static str> {
    list.split_ascii_whitespace()
        .find(|known| known.eq_ignore_ascii_case(id))
}

/// An SPDX document; the fields in the order the spec lists them.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<'a> {
    spdx_version: &'static str,
    data_license: &'static str,
    #[serde(rename = "SPDXID")]
    spdx_id: &'static str,
    name: String,
    document_namespace: String,
    creation_info: CreationInfo<'a>,
    document_describes: [&'static str; 1],
    packages: Vec<Package<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    has_extracted_licensing_infos: Vec<ExtractedLicense<'a>>,
    relationships: Vec<Relationship>,
}

#[derive(Serialize)]
struct CreationInfo<'a> {
    created: &'a str,
    creators: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Package<'a> {
    #[serde(rename = "SPDXID")]
    spdx_id: String,
    name: &'a str,
    version_info: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    package_file_name: Option<&'a str>,
    supplier: &'a str,
    download_location: &'static str,
    files_analyzed: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checksums: Vec<Checksum>,
    #[serde(skip_serializing_if = "Option::is_none")]
    homepage: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_info: Option<String>,
    license_declared: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    comment: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    external_refs: Vec<ExternalRef<'a>>,
    primary_package_purpose: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Checksum {
    algorithm: &'static str,
    checksum_value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExternalRef<'a> {
    reference_category: &'static str,
    reference_type: &'static str,
    reference_locator: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExtractedLicense<'a> {
    license_id: String,
    name: &'a str,
    extracted_text: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Relationship {
    spdx_element_id: String,
    relationship_type: &'static str,
    related_spdx_element: String,
}

impl Relationship {
    fn new(from: impl Into<String>, kind: &'static str, to: impl Into<String>) -> Self {
        Relationship {
            spdx_element_id: from.into(),
            relationship_type: kind,
            related_spdx_element: to.into(),
        }
    }
}

/// The SPDX 2.3 JSON document of `closure`, as the module says.
pub(super) fn document(subject: &Subject, closure: &Closure, packages: &[PackageMeta]) -> Vec<u8> {
    let entries = entries(closure, packages);
    let organization = organization(&subject.supplier.name);
    let supplier = organization.as_deref().unwrap_or("NOASSERTION");
    let license_refs = license_refs(&entries);

    let mut spdx_packages = Vec::with_capacity(entries.len() + 1);
    spdx_packages.push(image_package(subject, closure, supplier));
    let mut relationships = vec![
        Relationship::new("SPDXRef-DOCUMENT", "DESCRIBES", IMAGE_ID),
        Relationship::new(IMAGE_ID, "DEPENDS_ON", package_id(&closure.root)),
    ];
    for entry in &entries {
        spdx_packages.push(path_package(entry, supplier, &license_refs));
        let id = package_id(&entry.path.path);
        relationships.extend(
            entry
                .depends_on
                .iter()
                .map(|reference| Relationship::new(&id, "DEPENDS_ON", package_id(reference))),
        );
    }

    let document = Document {
        spdx_version: "SPDX-2.3",
        data_license: "CC0-1.0",
        spdx_id: "SPDXRef-DOCUMENT",
        name: format!("{}:{}", subject.image, subject.tag),
        document_namespace: format!(
            "https://spdx.org/spdxdocs/nixery-{}-{}-{}",
            uri_segment(&subject.image),
            uri_segment(&subject.tag),
            digest_hex(&subject.digest).unwrap_or_else(|| uri_segment(&subject.digest))
        ),
        creation_info: CreationInfo {
            created: &subject.created,
            creators: std::iter::once(concat!("Tool: nixery-", env!("CARGO_PKG_VERSION")))
                .chain(organization.as_deref())
                .map(str::to_owned)
                .collect(),
        },
        document_describes: [IMAGE_ID],
        packages: spdx_packages,
        has_extracted_licensing_infos: license_refs
            .iter()
            .map(|(name, id)| ExtractedLicense {
                license_id: id.clone(),
                name,
                extracted_text: format!(
                    "The license Nix's meta.license calls {name:?}; the package set's metadata \
                     gives no text of it."
                ),
            })
            .collect(),
        relationships,
    };
    // Strings, numbers and sequences only: nothing here can fail to serialise.
    serde_json::to_vec_pretty(&document).expect("an SPDX document serialises")
}

/// The package of the image itself.
fn image_package<'a>(subject: &'a Subject, closure: &Closure, supplier: &'a str) -> Package<'a> {
    let source = &subject.supplier;
    let source_info = match (&source.url, &source.commit) {
        (Some(url), Some(commit)) => format!("{} from {url} at commit {commit}", source.name),
        (Some(url), None) => format!("{} from {url}", source.name),
        (None, Some(commit)) => format!("{} at commit {commit}", source.name),
        (None, None) => source.name.clone(),
    };
    Package {
        spdx_id: IMAGE_ID.to_owned(),
        name: &subject.image,
        version_info: &subject.tag,
        package_file_name: None,
        supplier,
        download_location: "NOASSERTION",
        files_analyzed: false,
        checksums: digest_hex(&subject.digest)
            .map(|hex| Checksum {
                algorithm: "SHA256",
                checksum_value: hex,
            })
            .into_iter()
            .collect(),
        homepage: None,
        source_info: Some(format!("Nix packages of {source_info}")),
        license_declared: "NOASSERTION".to_owned(),
        description: Some(format!(
            "The {} container image of the Nix packages {}",
            subject.platform,
            closure.packages.join(", ")
        )),
        comment: format!(
            "Image manifest {}; its root is the store path {}.",
            subject.digest, closure.root
        ),
        external_refs: Vec::new(),
        primary_package_purpose: "CONTAINER",
    }
}

/// The package of one store path.
fn path_package<'a>(
    entry: &'a Entry,
    supplier: &'a str,
    license_refs: &BTreeMap<&str, String>,
) -> Package<'a> {
    let path = entry.path;
    let meta = entry.meta.first();
    let mut comment = format!(
        "Nix store path {}; NAR hash {}; NAR size {} bytes.",
        path.path, path.nar_hash, path.nar_size
    );
    if !entry.versioned {
        comment.push_str(" Its name has no version: the version given is its store hash.");
    }
    if !entry.meta.is_empty() {
        let attrs: Vec<&str> = entry.meta.iter().map(|m| m.attr.as_str()).collect();
        comment.push_str(&format!(" Requested as {}.", attrs.join(", ")));
    }
    let license_declared = meta
        .map(|meta| {
            licenses(meta)
                .iter()
                .filter_map(|license| match license {
                    License::Named(name) => license_refs.get(name).cloned(),
                    listed => listed.expression(),
                })
                .collect::<Vec<_>>()
                .join(" AND ")
        })
        .filter(|expression| !expression.is_empty())
        .unwrap_or_else(|| "NOASSERTION".to_owned());
    Package {
        spdx_id: package_id(&path.path),
        name: entry.name,
        version_info: entry.version,
        package_file_name: Some(&path.path),
        supplier,
        download_location: "NOASSERTION",
        files_analyzed: false,
        checksums: entry
            .sha256
            .iter()
            .map(|hex| Checksum {
                algorithm: "SHA256",
                checksum_value: hex.clone(),
            })
            .collect(),
        homepage: meta.and_then(|m| m.homepage.as_deref()).and_then(web_url),
        source_info: None,
        license_declared,
        description: meta
            .and_then(|m| m.description.as_deref())
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_owned),
        comment,
        external_refs: vec![ExternalRef {
            reference_category: "PACKAGE-MANAGER",
            reference_type: "purl",
            reference_locator: &entry.purl,
        }],
        primary_package_purpose: if entry.meta.is_empty() {
            "LIBRARY"
        } else {
            "APPLICATION"
        },
    }
}

/// The `LicenseRef-` of each license name not on the SPDX list that a requested package
/// declares: its name with what an id may not hold replaced by `-`, numbered when two names
/// come out the same.
fn license_refs<'a>(entries: &[Entry<'a>]) -> BTreeMap<&'a str, String> {
    let names: BTreeSet<&str> = entries
        .iter()
        .filter_map(|entry| entry.meta.first().copied())
        .flat_map(licenses)
        .filter_map(|license| match license {
            License::Named(name) => Some(name),
            License::Listed { .. } => None,
        })
        .collect();
    let mut taken = BTreeSet::new();
    names
        .into_iter()
        .map(|name| {
            let mut base: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            if base.is_empty() {
                base.push_str("unnamed");
            }
            let mut id = format!("LicenseRef-{base}");
            let mut n = 2;
            while !taken.insert(id.clone()) {
                id = format!("LicenseRef-{base}-{n}");
                n += 1;
            }
            (name, id)
        })
        .collect()
}

/// The SPDXID of a store path's package.
fn package_id(store_path: &str) -> String {
    format!("SPDXRef-Nix-{}", super::store_hash(store_path))
}

/// The supplier `name` as an SPDX actor: `Organization: <name>`, whose name ends at a `(` (an
/// email address would follow it).
fn organization(name: &str) -> Option<String> {
    let name = name.trim().replace(['(', ')'], "-");
    (!name.is_empty()).then(|| format!("Organization: {name}"))
}

/// `text` with everything but ASCII letters, digits and `._-` replaced by `-`, for the
/// document namespace.
fn uri_segment(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::tests::{
        BUSYBOX, CURL, GLIBC, HELLO, HEX, ROOT, STDENV, closure, edges, metas, subject,
    };
    use super::*;

    fn spdx() -> Value {
        serde_json::from_slice(&document(&subject(), &closure(), &metas())).unwrap()
    }

    fn package<'a>(document: &'a Value, path: &str) -> &'a Value {
        let id = package_id(path);
        document["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["SPDXID"] == id.as_str())
            .unwrap()
    }

    #[test]
    fn the_document_describes_the_image() {
        let doc = spdx();
        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        assert_eq!(doc["dataLicense"], "CC0-1.0");
        assert_eq!(doc["name"], "hello/stdenv/curl:latest");
        assert_eq!(
            doc["documentNamespace"],
            "https://spdx.org/spdxdocs/nixery-hello-stdenv-curl-latest-\
             4c1b1e8e1b5bb4a7b2a5e8bd2c6b0a2f9f3e8c3b1a0d9e8f7a6b5c4d3e2f1a0b"
        );
        assert_eq!(doc["creationInfo"]["created"], "2024-05-01T12:00:00Z");
        assert_eq!(
            doc["creationInfo"]["creators"],
            serde_json::json!([
                concat!("Tool: nixery-", env!("CARGO_PKG_VERSION")),
                "Organization: nixpkgs"
            ])
        );
        assert_eq!(
            doc["documentDescribes"],
            serde_json::json!(["SPDXRef-Image"])
        );
        let image = &doc["packages"][0];
        assert_eq!(image["SPDXID"], "SPDXRef-Image");
        assert_eq!(image["primaryPackagePurpose"], "CONTAINER");
        assert_eq!(
            image["checksums"][0]["checksumValue"],
            "4c1b1e8e1b5bb4a7b2a5e8bd2c6b0a2f9f3e8c3b1a0d9e8f7a6b5c4d3e2f1a0b"
        );
        assert_eq!(
            image["sourceInfo"],
            "Nix packages of nixpkgs from https://github.com/NixOS/nixpkgs at commit \
             0123456789abcdef0123456789abcdef01234567"
        );
    }

    #[test]
    fn every_store_path_is_one_package_with_its_hex_hash() {
        let doc = spdx();
        let packages = doc["packages"].as_array().unwrap();
        assert_eq!(packages.len(), HEX.len() + 1);
        for (path, hex) in HEX {
            let found: Vec<&Value> = packages
                .iter()
                .filter(|p| p["packageFileName"] == path)
                .collect();
            assert_eq!(found.len(), 1, "{path}");
            let package = found[0];
            assert_eq!(package["SPDXID"], package_id(path));
            assert_eq!(
                package["checksums"],
                serde_json::json!([{"algorithm": "SHA256", "checksumValue": hex}])
            );
            assert_eq!(package["supplier"], "Organization: nixpkgs");
            assert_eq!(package["downloadLocation"], "NOASSERTION");
            assert_eq!(package["filesAnalyzed"], false);
            let comment = package["comment"].as_str().unwrap();
            assert!(comment.contains(path), "{comment}");
        }
        // The NAR hash stays in the comment as the store gave it.
        assert!(
            package(&doc, HELLO)["comment"]
                .as_str()
                .unwrap()
                .contains("NAR hash sha256:1a142cx1wypy6i7y2ysia9fjwhlg6w394p73ff2rajw374pn0k7a;")
        );
    }

    #[test]
    fn relationships_are_the_closure_graph() {
        let doc = spdx();
        let mut relationships: Vec<(String, String, String)> = doc["relationships"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let field = |name: &str| r[name].as_str().unwrap().to_owned();
                (
                    field("spdxElementId"),
                    field("relationshipType"),
                    field("relatedSpdxElement"),
                )
            })
            .collect();
        relationships.sort();
        let id = |path: &str| match path {
            "image" => IMAGE_ID.to_owned(),
            path => package_id(path),
        };
        let mut expected: Vec<(String, String, String)> = edges()
            .into_iter()
            .map(|(from, to)| (id(from), "DEPENDS_ON".to_owned(), id(to)))
            .chain([(
                "SPDXRef-DOCUMENT".to_owned(),
                "DESCRIBES".to_owned(),
                IMAGE_ID.to_owned(),
            )])
            .collect();
        expected.sort();
        assert_eq!(relationships, expected);
    }

    #[test]
    fn a_path_without_a_version_has_its_hash_and_says_so() {
        let doc = spdx();
        for path in [BUSYBOX, STDENV, ROOT] {
            let package = package(&doc, path);
            assert_eq!(package["versionInfo"], super::super::store_hash(path));
            assert!(
                package["comment"]
                    .as_str()
                    .unwrap()
                    .contains("the version given is its store hash"),
                "{path}"
            );
        }
        let glibc = package(&doc, GLIBC);
        assert_eq!(glibc["name"], "glibc");
        assert_eq!(glibc["versionInfo"], "2.38");
        assert!(!glibc["comment"].as_str().unwrap().contains("store hash"));
    }

    #[test]
    fn requested_packages_carry_their_meta() {
        let doc = spdx();
        let hello = package(&doc, HELLO);
        assert_eq!(hello["primaryPackagePurpose"], "APPLICATION");
        assert_eq!(
            hello["licenseDeclared"],
            "GPL-3.0-or-later AND LicenseRef-unfree AND MIT"
        );
        assert_eq!(
            hello["homepage"],
            "https://www.gnu.org/software/hello/manual/"
        );
        assert_eq!(
            hello["description"],
            "A program that produces a familiar, friendly greeting"
        );
        assert_eq!(
            hello["externalRefs"],
            serde_json::json!([{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": "pkg:nix/hello@2.12.1",
            }])
        );
        let stdenv = package(&doc, STDENV);
        assert_eq!(stdenv["licenseDeclared"], "Apache-2.0 WITH LLVM-exception");
        assert!(stdenv.get("homepage").is_none());
        let curl = package(&doc, CURL);
        assert_eq!(curl["licenseDeclared"], "curl");
        assert!(curl.get("description").is_none());
        let glibc = package(&doc, GLIBC);
        assert_eq!(glibc["primaryPackagePurpose"], "LIBRARY");
        assert_eq!(glibc["licenseDeclared"], "NOASSERTION");
        assert_eq!(
            doc["hasExtractedLicensingInfos"],
            serde_json::json!([{
                "licenseId": "LicenseRef-unfree",
                "name": "unfree",
                "extractedText": "The license Nix's meta.license calls \"unfree\"; the package \
                                  set's metadata gives no text of it.",
            }])
        );
    }

    #[test]
    fn licenses_are_named_by_the_list_or_by_a_ref() {
        let listed = |id| License::Listed {
            id,
            exception: None,
        };
        assert_eq!(license("MIT"), listed("MIT"));
        assert_eq!(license("mit"), listed("MIT"));
        assert_eq!(license("GPL-2.0"), listed("GPL-2.0-only"));
        assert_eq!(license("GPL-2.0+"), listed("GPL-2.0-or-later"));
        assert_eq!(license("LGPL-2.1-or-later"), listed("LGPL-2.1-or-later"));
        assert_eq!(
            license("GPL-2.0-or-later WITH Classpath-exception-2.0"),
            License::Listed {
                id: "GPL-2.0-or-later",
                exception: Some("Classpath-exception-2.0"),
            }
        );
        for name in [
            "unfree",
            "Unfree redistributable",
            "NCUL1",
            "MIT WITH nothing",
            "Apache-2.0+",
        ] {
            assert_eq!(license(name), License::Named(name));
        }
        // Every id is unique and of the characters SPDX ids have.
        let ids: Vec<&str> = LICENSE_IDS.split_ascii_whitespace().collect();
        let unique: BTreeSet<String> = ids.iter().map(|id| id.to_ascii_lowercase()).collect();
        assert_eq!(unique.len(), ids.len());
        assert!(ids.iter().all(|id| {
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
        }));

        let entries_of = |names: &[&str]| {
            let closure = closure();
            let meta = PackageMeta {
                attr: "hello".to_owned(),
                path: HELLO.to_owned(),
                licenses: names.iter().map(|n| (*n).to_owned()).collect(),
                ..PackageMeta::default()
            };
            let entries = entries(&closure, std::slice::from_ref(&meta));
            license_refs(&entries)
                .into_iter()
                .map(|(name, id)| (name.to_owned(), id))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            entries_of(&["Foo Bar", "Foo-Bar", "MIT", "Foo/Bar"]),
            [
                ("Foo Bar".to_owned(), "LicenseRef-Foo-Bar".to_owned()),
                ("Foo-Bar".to_owned(), "LicenseRef-Foo-Bar-2".to_owned()),
                ("Foo/Bar".to_owned(), "LicenseRef-Foo-Bar-3".to_owned()),
            ]
        );
    }
}
