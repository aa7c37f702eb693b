//! Pullable names: the registry name component that reaches an attribute path through the
//! name resolver of `nix/build-image.nix` (`attrFor`, `lookup`), and which attribute the resolver
//! picks when several spell the same name.

use std::cmp::Ordering;

use crate::image::ImageName;

/// The name a client pulls to get the package at attribute path `attr` (`xorg.xev`,
/// `bashInteractive`, `_1password`): each component lowercased (the resolver matches without
/// regard to case), and a `_` before a leading digit dropped (the resolver tries `_1password`
/// for `1password`). `None` when the resolver cannot reach it: a component that is not a valid
/// registry name once mapped (`__splicedPackages`, `gtk+`), a `_`-digit component that is not
/// all lowercase (the resolver tries only the exact `_`-prefixed spelling), or the
/// meta-packages (`shell`, `builder`, `nonroot`, `arm64`), which a pull reads as such.
pub fn pullable_name(attr: &str) -> Option<String> {
    let mut name = String::with_capacity(attr.len());
    for (i, component) in attr.split('.').enumerate() {
        if i > 0 {
            name.push('.');
        }
        match underscore_digit(component) {
            Some(rest) if rest.bytes().any(|b| b.is_ascii_uppercase()) => return None,
            Some(rest) => name.push_str(rest),
            None => name.extend(component.chars().map(|c| c.to_ascii_lowercase())),
        }
    }
    // The image name grammar is the one judge of what a client can send: the name must be an
    // image name on its own that stands for exactly this one package.
    let image: ImageName = name.parse().ok()?;
    (image.packages().len() == 1 && image.packages().contains(&name)).then_some(name)
}

/// `1password` for `_1password`: the rest of a component that is `_` before a digit.
fn underscore_digit(component: &str) -> Option<&str> {
    component
        .strip_prefix('_')
        .filter(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Orders two attribute paths with the same pullable name the way the resolver chooses between
/// them, the one it picks first: per component, an exact match (already lowercase) before a
/// case-insensitive one (the first in Nix's sorted attribute order) before the `_`-digit
/// spelling.
pub fn resolver_order(a: &str, b: &str) -> Ordering {
    let ranks = |attr: &str| {
        attr.split('.')
            .map(|c| {
                let rank = if underscore_digit(c).is_some() {
                    2
                } else if c.bytes().any(|b| b.is_ascii_uppercase()) {
                    1
                } else {
                    0
                };
                (rank, c.to_owned())
            })
            .collect::<Vec<_>>()
    };
    ranks(a).cmp(&ranks(b))
}

/// A search query or missing name in the form pullable names have: trimmed, lowercase, a `_`
/// before a leading digit of a component dropped (so `_1password` finds `1password`).
pub fn normalize(query: &str) -> String {
    query
        .trim()
        .split('.')
        .map(|c| underscore_digit(c).unwrap_or(c).to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pullable_names_follow_the_resolver() {
        let name = |attr: &str| pullable_name(attr);
        assert_eq!(name("hello").as_deref(), Some("hello"));
        assert_eq!(name("bashInteractive").as_deref(), Some("bashinteractive"));
        assert_eq!(name("_1password").as_deref(), Some("1password"));
        assert_eq!(name("xorg.xev").as_deref(), Some("xorg.xev"));
        assert_eq!(
            name("haskellPackages.shellcheck").as_deref(),
            Some("haskellpackages.shellcheck")
        );
        assert_eq!(
            name("python3Packages._3to2").as_deref(),
            Some("python3packages.3to2")
        );
        assert_eq!(name("iana-etc").as_deref(), Some("iana-etc"));
        assert_eq!(name("linux_6_1").as_deref(), Some("linux_6_1"));
    }

    #[test]
    fn unreachable_attributes_have_no_name() {
        for attr in [
            "__splicedPackages",
            "_internal",
            "gtk+",
            "foo--bar",
            "foo_",
            "",
            "xorg.",
            ".xev",
            "a/b",
            "shell",
            "builder",
            "_1Password",
            "caf\u{e9}",
            &"a".repeat(256),
        ] {
            assert_eq!(pullable_name(attr), None, "{attr:?}");
        }
    }

    #[test]
    fn the_resolver_prefers_exact_then_caseless_then_underscore() {
        assert_eq!(resolver_order("foo", "Foo"), Ordering::Less);
        assert_eq!(resolver_order("Foo", "fOO"), Ordering::Less);
        assert_eq!(resolver_order("fOO", "_1"), Ordering::Less);
        assert_eq!(resolver_order("xorg.xev", "Xorg.xev"), Ordering::Less);
        assert_eq!(resolver_order("xorg.Xev", "Xorg.xev"), Ordering::Less);
    }

    #[test]
    fn queries_are_normalized_like_names() {
        assert_eq!(normalize("  BashInteractive "), "bashinteractive");
        assert_eq!(normalize("_1password"), "1password");
        assert_eq!(normalize("python3Packages._3to2"), "python3packages.3to2");
        assert_eq!(normalize("_foo"), "_foo");
    }
}
