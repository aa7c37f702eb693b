//! The image config nixery writes: its defaults (`bash` to run when the image has it, labels
//! saying where the image came from), then what `nonroot` and a declaration set.

use std::collections::{BTreeMap, BTreeSet};

use super::Request;
use crate::image::nonroot;
use crate::manifest::ImageSettings;
use crate::nix::Closure;
use crate::source::Pin;

/// The labels that say where an image came from: the commit and source URL (for a commit), and
/// the attributes its packages resolved to.
fn labels(pin: &Pin, closure: &Closure) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if let Pin::Commit { commit, source } = pin {
        labels.insert(
            "org.opencontainers.image.revision".to_owned(),
            commit.to_string(),
        );
        labels.insert("org.opencontainers.image.source".to_owned(), source.clone());
    }
    let resolved: BTreeSet<&String> = closure.packages.iter().collect();
    labels.insert(
        "nixery.packages".to_owned(),
        serde_json::to_string(&resolved).unwrap_or_default(),
    );
    labels
}

/// The image config of `request`: nixery's defaults (`bash` to run when the image has it, where
/// the image came from), then what `nonroot` and a declaration set.
pub(super) fn image_settings(request: &Request, closure: &Closure) -> ImageSettings {
    let mut settings = ImageSettings {
        architecture: request.platform.architecture().to_owned(),
        variant: request.platform.variant().map(str::to_owned),
        cmd: has_shell(request.packages()).then(|| vec!["bash".to_owned()]),
        labels: labels(&request.pin, closure),
        ..ImageSettings::default()
    };
    let setup = request.name.setup();
    if setup.nonroot {
        settings.user = Some(nonroot::USER.to_owned());
        settings
            .env
            .insert("HOME".to_owned(), nonroot::HOME.to_owned());
    }
    if let Some(config) = &setup.config {
        settings.user = config.user.clone().or(settings.user);
        settings.env.extend(config.env.clone());
        settings.labels.extend(config.labels.clone());
        // An entrypoint of the declaration's own gets no `bash` to run as its arguments.
        if config.entrypoint.is_some() {
            settings.cmd = None;
        }
        settings.entrypoint = config.entrypoint.clone();
        settings.cmd = config.cmd.clone().or(settings.cmd);
        settings.working_dir = config.workdir.clone();
    }
    settings
}

/// Whether the image has an interactive shell to start by default.
fn has_shell(packages: &BTreeSet<String>) -> bool {
    packages
        .iter()
        .any(|p| p.eq_ignore_ascii_case("bashInteractive"))
}
