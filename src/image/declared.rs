//! Declared images (`NIXERY_IMAGES`): a YAML or JSON file that gives image names of the
//! operator's choosing their contents and image config.
//!
//! ```yaml
//! curl-and-jq:
//!   contents: [shell, curl, jq]     # as in a path: meta-packages included
//!   user: "65532:65532"
//!   env: { LANG: C.UTF-8 }
//!   entrypoint: [curl]
//!   cmd: [--help]
//!   workdir: /work
//!   labels: { org.example.team: tools }
//! ```
//!
//! A declared name wins over the package-path reading of the same name; a tag keeps its meaning
//! from the package source. The file is checked whole when read (start-up, SIGHUP): a malformed
//! one is refused with its line, and on SIGHUP the images read before stay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::ImageName;

/// A declared image's config, beside its contents: what the image config gets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Config {
    /// `User`: a name or uid, with an optional `:group`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Variables added to `Env` (replacing nixery's of the same name).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`, instead of nixery's (`bash` when the image has it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Labels added to nixery's (replacing those of the same name).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Config {
    /// The sha256 of the config's canonical JSON: what cache keys name it by, so that a changed
    /// entry gives a new image.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).expect("a config serialises");
        hex::encode(Sha256::digest(json))
    }
}

/// One entry of the file, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    contents: Contents,
    user: Option<String>,
    #[serde(default)]
    env: BTreeMap<EnvName, String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    workdir: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// An entry's `contents`: package names as in an image path, checked as one.
struct Contents(ImageName);

impl<'de> Deserialize<'de> for Contents {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(deserializer)?;
        if names.is_empty() {
            return Err(serde::de::Error::custom(
                "contents is empty: name a package",
            ));
        }
        let path = names.join("/");
        let image: ImageName = path
            .parse()
            .map_err(|e| serde::de::Error::custom(format!("contents: {e}")))?;
        if image.packages().is_empty() {
            return Err(serde::de::Error::custom(
                "contents names no package, only meta-packages that choose a platform or user",
            ));
        }
        Ok(Contents(image))
    }
}

/// An environment variable's name: not empty, no `=`.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct EnvName(String);

impl<'de> Deserialize<'de> for EnvName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(serde::de::Error::custom(format!(
                "env: {name:?} is not a variable name"
            )));
        }
        Ok(EnvName(name))
    }
}

/// A declared image, read.
#[derive(Debug)]
struct Declared {
    /// The contents, read as an image path.
    contents: ImageName,
    config: Arc<Config>,
}

/// Why the file was refused.
#[derive(Debug, thiserror::Error)]
#[error("NIXERY_IMAGES={}: {message}", path.display())]
pub struct DeclaredError {
    path: PathBuf,
    message: String,
}

/// The declared images, read again on [`DeclaredImages::reload`].
#[derive(Debug)]
pub struct DeclaredImages {
    path: Option<PathBuf>,
    images: RwLock<Arc<BTreeMap<String, Declared>>>,
}

impl DeclaredImages {
    /// No declared images.
    pub fn none() -> Self {
        DeclaredImages {
            path: None,
            images: RwLock::default(),
        }
    }

    /// The images declared in the file at `path`.
    pub fn open(path: &Path) -> Result<Self, DeclaredError> {
        let images = read(path)?;
        tracing::info!(path = %path.display(), images = images.len(), "declared images read");
        Ok(DeclaredImages {
            path: Some(path.to_path_buf()),
            images: RwLock::new(Arc::new(images)),
        })
    }

    /// Reads the file again: the images it declares now replace the old ones, unless it is
    /// malformed, in which case the old ones stay (and the error is returned). Returns how many
    /// images are declared; `None` when there is no file.
    pub fn reload(&self) -> Result<Option<usize>, DeclaredError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let images = read(path)?;
        let count = images.len();
        *self.images.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(images);
        Ok(Some(count))
    }

    fn current(&self) -> Arc<BTreeMap<String, Declared>> {
        self.images
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many images are declared.
    pub fn len(&self) -> usize {
        self.current().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The image `name` stands for: a declared image when the name (or the name after a
    /// leading platform component, as in `arm64/curl-and-jq`) is declared, else `name` as its
    /// path reads.
    pub fn resolve(&self, name: ImageName) -> ImageName {
        let images = self.current();
        if images.is_empty() {
            return name;
        }
        let without_platform = name
            .as_str()
            .split_once('/')
            .filter(|(first, _)| super::Platform::of_name_component(first).is_some())
            .map(|(_, rest)| rest);
        let declared = images
            .get(name.as_str())
            .or_else(|| without_platform.and_then(|rest| images.get(rest)));
        match declared {
            Some(declared) => {
                ImageName::declared(&name, &declared.contents, declared.config.clone())
            }
            None => name,
        }
    }
}

/// Reads and checks the file at `path` (JSON when its name ends in `.json`, else YAML).
fn read(path: &Path) -> Result<BTreeMap<String, Declared>, DeclaredError> {
    let refused = |message: String| DeclaredError {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| refused(e.to_string()))?;
    let entries: BTreeMap<String, Entry> = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| refused(format!("line {}: {e}", e.line())))?
    } else if text.trim().is_empty() {
        BTreeMap::new()
    } else {
        serde_yaml_ng::from_str(&text).map_err(|e| {
            refused(match e.location() {
                Some(at) => format!("line {}: {e}", at.line()),
                None => e.to_string(),
            })
        })?
    };
    // Names are checked here, where the parsers no longer know their place: the line is the
    // first that holds the name.
    for name in entries.keys() {
        if let Err(e) = name.parse::<ImageName>() {
            let line = text
                .lines()
                .position(|l| l.contains(name.as_str()))
                .unwrap_or(0);
            return Err(refused(format!(
                "line {}: image name {name:?}: {e}",
                line + 1
            )));
        }
    }
    Ok(entries
        .into_iter()
        .map(|(name, entry)| {
            let config = Config {
                user: entry.user,
                env: entry.env.into_iter().map(|(k, v)| (k.0, v)).collect(),
                entrypoint: entry.entrypoint,
                cmd: entry.cmd,
                workdir: entry.workdir,
                labels: entry.labels,
            };
            let declared = Declared {
                contents: entry.contents.0,
                config: Arc::new(config),
            };
            (name, declared)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    const YAML: &str = "\
curl-and-jq:
  contents: [shell, curl, jq]
  user: \"65532:65532\"
  env: { LANG: C.UTF-8 }
  entrypoint: [curl]
  cmd: [--help]
  workdir: /work
  labels: { org.example.team: tools }
tools/hello:
  contents: [nonroot, hello]
";

    #[test]
    fn a_declared_name_stands_for_its_contents_and_config() {
        let (_dir, path) = write("images.yaml", YAML);
        let images = DeclaredImages::open(&path).unwrap();
        assert_eq!(images.len(), 2);
        let image = images.resolve("curl-and-jq".parse().unwrap());
        assert_eq!(image.as_str(), "curl-and-jq");
        assert!(image.packages().contains("curl") && image.packages().contains("bashInteractive"));
        let config = image.setup().config.clone().unwrap();
        assert_eq!(config.user.as_deref(), Some("65532:65532"));
        assert_eq!(config.env["LANG"], "C.UTF-8");
        assert_eq!(config.entrypoint, Some(vec!["curl".to_owned()]));
        assert_eq!(config.workdir.as_deref(), Some("/work"));
        assert!(!image.setup().nonroot);
        let hello = images.resolve("tools/hello".parse().unwrap());
        assert!(hello.setup().nonroot);
        assert_eq!(hello.packages().iter().collect::<Vec<_>>(), ["hello"]);
        // With a platform in front, and names that are not declared.
        let arm = images.resolve("arm64/curl-and-jq".parse().unwrap());
        assert_eq!(arm.packages(), image.packages());
        assert!(arm.platform().is_some());
        let plain = images.resolve("curl/jq".parse().unwrap());
        assert!(plain.setup().config.is_none());
        assert_eq!(plain, "curl/jq".parse().unwrap());
    }

    #[test]
    fn json_is_read_too_and_configs_differ_by_fingerprint() {
        let (_dir, path) = write(
            "images.json",
            r#"{"a": {"contents": ["hello"], "env": {"A": "1"}},
                "b": {"contents": ["hello"], "env": {"A": "2"}}}"#,
        );
        let images = DeclaredImages::open(&path).unwrap();
        let a = images.resolve("a".parse().unwrap());
        let b = images.resolve("b".parse().unwrap());
        assert_eq!(a.packages(), b.packages());
        assert_ne!(a.setup().key_lines(), b.setup().key_lines());
    }

    #[test]
    fn a_malformed_file_is_refused_with_its_line() {
        for (text, line, says) in [
            ("a:\n  contents: [hello\n", 3, ""),
            ("a:\n  contents: [hello]\n  colour: red\n", 3, "colour"),
            ("a:\n  contents: []\n", 2, "empty"),
            ("a:\n  contents: [Hello]\n", 2, "Hello"),
            (
                "ok:\n  contents: [hello]\nBad Name:\n  contents: [hello]\n",
                3,
                "Bad Name",
            ),
            ("a:\n  contents: [hello]\n  env: { \"A=B\": c }\n", 3, "A=B"),
        ] {
            let (_dir, path) = write("images.yaml", text);
            let err = DeclaredImages::open(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("line {line}")), "{text:?}: {err}");
            assert!(err.contains(says), "{text:?}: {err}");
            assert!(err.contains("NIXERY_IMAGES="), "{err}");
        }
    }

    #[test]
    fn a_reload_of_a_malformed_file_keeps_the_images() {
        let (_dir, path) = write("images.yaml", YAML);
        let images = DeclaredImages::open(&path).unwrap();
        std::fs::write(&path, "new:\n  contents: [hello]\n").unwrap();
        assert_eq!(images.reload().unwrap(), Some(1));
        assert!(
            images
                .resolve("new".parse().unwrap())
                .setup()
                .config
                .is_some()
        );
        std::fs::write(&path, "broken: [").unwrap();
        assert!(images.reload().is_err());
        assert!(
            images
                .resolve("new".parse().unwrap())
                .setup()
                .config
                .is_some()
        );
        assert_eq!(DeclaredImages::none().reload().unwrap(), None);
    }
}
