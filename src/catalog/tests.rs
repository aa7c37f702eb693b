use std::path::PathBuf;

use super::*;

fn package(attr: &str) -> Package {
    Package {
        name: String::new(),
        attr: attr.to_owned(),
        version: Some("1.0".to_owned()),
        description: Some(format!("The {attr} package")),
        homepage: None,
        license: Some("MIT".to_owned()),
    }
}

fn catalog_of(attrs: &[&str]) -> Catalog {
    Catalog::from_packages(attrs.iter().map(|a| package(a)).collect())
}

fn names(found: Vec<&Package>) -> Vec<&str> {
    found.into_iter().map(|p| p.name.as_str()).collect()
}

/// A catalog shaped like nix/offline-pkgs plus neighbours that compete for the same queries.
fn sample() -> Catalog {
    catalog_of(&[
        "hello",
        "hello-wayland",
        "help2man",
        "shellcheck",
        "haskellPackages.shellcheck",
        "xorg.xev",
        "xorg.xeyes",
        "xevd",
        "_1password",
        "_1password-gui",
        "nodejs",
        "nodejs_20",
        "bashInteractive",
        "bash",
        "coreutils",
        "mkPackage.x/y",
        "__splicedPackages",
        "shell",
    ])
}

#[test]
fn search_finds_what_the_issue_asks_for() {
    let catalog = sample();
    assert_eq!(names(catalog.search("hel", 1)), ["hello"]);
    assert_eq!(names(catalog.search("xev", 1)), ["xorg.xev"]);
    let onepassword = catalog.search("1password", 1);
    assert_eq!(names(onepassword.clone()), ["1password"]);
    assert_eq!(onepassword[0].attr, "_1password");
    assert_eq!(names(catalog.search("_1password", 1)), ["1password"]);
    assert_eq!(
        names(catalog.search("BashInteractive", 1)),
        ["bashinteractive"]
    );
}

#[test]
fn search_puts_exact_before_prefix_before_fuzzy() {
    let catalog = sample();
    // `xev` is exact as the last component of `xorg.xev`, `xevd` a prefix match; `xorg.xeyes`
    // is neither one edit away nor has x, e, v in order.
    assert_eq!(names(catalog.search("xev", 10)), ["xorg.xev", "xevd"]);
    // A typo: one edit from `nodejs`, then the subsequence n…o…d…j…s.
    assert_eq!(names(catalog.search("nodjs", 10)), ["nodejs", "nodejs_20"]);
    // Exact first, prefixes shorter first, then fuzzy (h…e…l…l…o, not a prefix).
    let found = names(catalog.search("hello", 10));
    assert_eq!(found[..2], ["hello", "hello-wayland"]);
    // Exact on the full name before exact on a last component.
    assert_eq!(
        names(catalog.search("shellcheck", 10))[..2],
        ["shellcheck", "haskellpackages.shellcheck"]
    );
    // Subsequences after typos.
    assert_eq!(
        names(catalog.search("shck", 10))[..2],
        ["shellcheck", "haskellpackages.shellcheck"]
    );
    assert_eq!(
        names(catalog.search("1pass", 10)),
        ["1password", "1password-gui"]
    );
    assert_eq!(
        names(catalog.search("h", 3)),
        ["hello", "help2man", "hello-wayland"]
    );
}

#[test]
fn search_is_bounded_and_never_repeats() {
    let catalog = sample();
    assert!(catalog.search("", 10).is_empty());
    assert!(catalog.search("   ", 10).is_empty());
    assert!(catalog.search("hello", 0).is_empty());
    assert!(catalog.search(&"a".repeat(300), 10).is_empty());
    assert!(catalog.search("zzzzzz", 10).is_empty());
    let all = catalog.search("e", usize::MAX);
    let mut unique: Vec<&str> = names(all.clone());
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), all.len());
    // Strange queries are no matches, never a panic.
    for query in ["é", "\u{0}", "..", "._1", "a b", "-", "🦀🦀🦀🦀🦀🦀🦀"] {
        catalog.search(query, 10);
        catalog.suggest(query);
    }
}

#[test]
fn suggestions_are_close_names() {
    let catalog = sample();
    assert_eq!(catalog.suggest("nodjs"), ["nodejs"]);
    assert!(catalog.suggest("zzzzzz").is_empty());
    assert!(catalog.suggest("q").is_empty());
    // The last component counts; the name itself is never suggested.
    assert_eq!(catalog.suggest("xev"), ["xorg.xev", "xevd"]);
    assert_eq!(
        catalog.suggest("shelcheck"),
        ["shellcheck", "haskellpackages.shellcheck"]
    );
    // A transposition is one edit.
    assert_eq!(catalog.suggest("ndoejs"), ["nodejs"]);
    assert!(catalog.suggest("hello").iter().all(|s| s != "hello"));
    let many = catalog_of(&["hellp", "hellq", "hellr", "hells", "hellt"]);
    assert_eq!(many.suggest("hello").len(), MAX_SUGGESTIONS);
}

#[test]
fn names_are_pullable_and_unique() {
    let catalog = sample();
    assert!(catalog.get("mkpackage.x/y").is_none());
    assert!(catalog.get("__splicedpackages").is_none());
    assert!(catalog.get("shell").is_none());
    assert_eq!(catalog.get("1password").unwrap().attr, "_1password");
    assert_eq!(
        catalog.get("bashinteractive").unwrap().attr,
        "bashInteractive"
    );
    // Names given by the caller are recomputed from the attribute path.
    let mut wrong = package("xorg.xev");
    wrong.name = "something-else".into();
    let catalog = Catalog::from_packages(vec![wrong]);
    assert_eq!(catalog.packages()[0].name, "xorg.xev");
    // Of two attributes with one name, the one the resolver picks stays.
    let catalog = catalog_of(&["Foo", "foo", "fOO"]);
    assert_eq!(catalog.len(), 1);
    assert_eq!(catalog.get("foo").unwrap().attr, "foo");
    let catalog = catalog_of(&["fOO", "Foo"]);
    assert_eq!(catalog.get("foo").unwrap().attr, "Foo");
}

#[test]
fn fields_are_bounded() {
    let mut long = package("hello");
    long.description = Some(format!("  {}  ", "é".repeat(1000)));
    long.version = Some("   ".into());
    let catalog = Catalog::from_packages(vec![long]);
    let hello = &catalog.packages()[0];
    let description = hello.description.as_deref().unwrap();
    assert!(description.len() <= MAX_DESCRIPTION_BYTES);
    assert!(description.starts_with('é'));
    assert_eq!(hello.version, None);
}

#[test]
fn stored_catalogs_round_trip() {
    let catalog = sample();
    let bytes = catalog.to_bytes();
    let read = Catalog::from_bytes(&bytes).unwrap();
    assert_eq!(read.packages(), catalog.packages());
    assert_eq!(names(read.search("xev", 1)), ["xorg.xev"]);
    let empty = Catalog::from_packages(Vec::new());
    assert!(Catalog::from_bytes(&empty.to_bytes()).unwrap().is_empty());
}

#[test]
fn damaged_catalogs_are_errors() {
    let bytes = sample().to_bytes();
    let err = |bytes: &[u8]| Catalog::from_bytes(bytes).unwrap_err();
    assert!(matches!(err(b""), CatalogError::Corrupt(_)));
    assert!(matches!(
        err(b"{\"packages\":[]}"),
        CatalogError::Corrupt(_)
    ));
    assert!(matches!(err(MAGIC), CatalogError::Corrupt(_)));
    let mut future = bytes.clone();
    future[MAGIC.len()] = FORMAT + 1;
    assert!(matches!(err(&future), CatalogError::UnsupportedFormat(2)));
    // Every truncation is an error, and every flipped bit an error (zlib's checksum) unless it
    // is one of the padding bits after the last deflate block, which carry nothing: never a
    // panic, never a different catalog.
    for len in 0..bytes.len() {
        assert!(
            Catalog::from_bytes(&bytes[..len]).is_err(),
            "truncated to {len}"
        );
    }
    let original = sample();
    let mut unread = 0;
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.clone();
            flipped[i] ^= 1 << bit;
            if let Ok(read) = Catalog::from_bytes(&flipped) {
                assert_eq!(read.packages(), original.packages(), "byte {i} bit {bit}");
                unread += 1;
            }
        }
    }
    assert!(unread < 8, "{unread} bits changed nothing");
    // A valid zlib stream of a payload that is not a catalog.
    let mut junk = MAGIC.to_vec();
    junk.push(FORMAT);
    let mut encoder = flate2::write::ZlibEncoder::new(junk, flate2::Compression::default());
    encoder.write_all(&[0xff; 64]).unwrap();
    assert!(matches!(
        err(&encoder.finish().unwrap()),
        CatalogError::Corrupt(_)
    ));
}

#[test]
fn channel_packages_json_makes_a_catalog() {
    let json = r#"{"version":2,"packages":{
        "hello":{"pname":"hello","version":"2.12.1","meta":{"description":"A program that produces a familiar, friendly greeting","license":{"spdxId":"GPL-3.0-or-later"}}},
        "xorg.xev":{"pname":"xev","version":"1.2.5","meta":{}},
        "_1password":{"pname":"1password","version":"2.24.0","meta":{}}
    }}"#;
    let mut br = Vec::new();
    {
        let mut writer = brotli::CompressorWriter::new(&mut br, 4096, 9, 22);
        writer.write_all(json.as_bytes()).unwrap();
    }
    let catalog = Catalog::from_packages_json_br(&br).unwrap();
    assert_eq!(catalog.len(), 3);
    assert_eq!(names(catalog.search("hel", 1)), ["hello"]);
    assert_eq!(names(catalog.search("xev", 1)), ["xorg.xev"]);
    assert_eq!(names(catalog.search("1password", 1)), ["1password"]);
    assert_eq!(
        catalog.get("hello").unwrap().license.as_deref(),
        Some("GPL-3.0-or-later")
    );
}

#[test]
fn command_failures_keep_nix_s_cause() {
    let status = std::process::Command::new("false").status().unwrap();
    let failed = |stderr: &str| {
        CatalogError::from_command(CommandError::Failed {
            command: "nix-instantiate".into(),
            status,
            stderr_tail: stderr.into(),
        })
        .to_string()
    };
    assert_eq!(
        failed("error: getting status of '/nope': No such file or directory\n"),
        "Nix could not list the package set's packages: getting status of '/nope': No such file or directory"
    );
    assert_eq!(
        failed("error:\n       … while calling\n\n       error: boom\n"),
        "Nix could not list the package set's packages: boom"
    );
    assert_eq!(
        failed("Killed\n"),
        "Nix could not list the package set's packages: see the server log"
    );
}

/// The real thing: nix/offline-pkgs evaluated by nix-instantiate (about a second).
#[tokio::test]
async fn offline_pkgs_evaluate_to_a_catalog() {
    let found = std::process::Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "nix-instantiate is not on PATH: `apt-get install -y nix-bin busybox-static` (scripts/test does)"
    );
    let pkgs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("nix/offline-pkgs");
    let work = tempfile::tempdir().unwrap();
    let env = crate::nix::NixEnv::new("substituters =", "", "", work.path());
    let started = std::time::Instant::now();
    let catalog = Catalog::evaluate(
        &pkgs,
        &crate::nix::current_system(),
        work.path(),
        &env,
        Duration::from_secs(120),
        MAX_EVALUATED_BYTES,
    )
    .await
    .unwrap();
    eprintln!(
        "evaluated nix/offline-pkgs: {} packages in {:?}",
        catalog.len(),
        started.elapsed()
    );
    let attrs: Vec<&str> = catalog.packages().iter().map(|p| p.attr.as_str()).collect();
    for wanted in [
        "xorg.xev",
        "haskellPackages.shellcheck",
        "_1password",
        "hello",
        "bashInteractive",
    ] {
        assert!(attrs.contains(&wanted), "{wanted} missing from {attrs:?}");
    }
    for unwanted in ["mkPackage", "system", "runCommand", "writeText"] {
        assert!(!attrs.contains(&unwanted), "{unwanted} in {attrs:?}");
    }
    let hello = catalog.get("hello").unwrap();
    assert_eq!(hello.attr, "hello");
    assert!(hello.version.is_some(), "{hello:?}");
    assert!(hello.description.is_some(), "{hello:?}");
    let password = catalog.get("1password").unwrap();
    assert_eq!(password.attr, "_1password");
    assert_eq!(password.version.as_deref(), Some("2.24.0"));
    assert_eq!(names(catalog.search("xev", 1)), ["xorg.xev"]);
    assert_eq!(names(catalog.search("hel", 1)), ["hello"]);

    // A package set that does not evaluate is an error that says why.
    let broken = work.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(
        broken.join("default.nix"),
        "{ ... }: throw \"no packages here\"",
    )
    .unwrap();
    let err = Catalog::evaluate(
        &broken,
        "x86_64-linux",
        work.path(),
        &env,
        Duration::from_secs(60),
        MAX_EVALUATED_BYTES,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no packages here"), "{err}");

    // An evaluation that prints more than its limit is stopped, and says so.
    let err = Catalog::evaluate(
        &pkgs,
        &crate::nix::current_system(),
        work.path(),
        &env,
        Duration::from_secs(120),
        1024,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the package catalog is too large: Nix printed more than 1024 bytes listing the package set's packages"
    );
}

/// The walk's bounds, on a package set made to test them: what nixpkgs throws, hides or nests.
#[tokio::test]
async fn the_walk_lists_what_the_resolver_reaches_and_no_more() {
    let work = tempfile::tempdir().unwrap();
    let set = work.path().join("set");
    std::fs::create_dir(&set).unwrap();
    std::fs::write(
        set.join("default.nix"),
        r#"{ system ? builtins.currentSystem, ... }:
let
  drv = name: extra: derivation { inherit name system; builder = "/bin/sh"; } // extra;
  marked = set: set // { recurseForDerivations = true; };
  self = {
    hello = drv "hello-2.12" {
      meta.description = "Hi";
      meta.homepage = [ "https://a.example" "https://b.example" ];
      meta.license = [ { spdxId = "MIT"; shortName = "mit"; } { shortName = "bsd3"; } ];
    };
    withVersion = drv "with-version-1" { version = "1.0.0"; };
    removed = throw "removed: use hello";
    unfree = drv "unfree-1" { meta.available = false; };
    brokenMeta = drv "broken-meta-1" { meta = throw "no meta"; };
    "gtk+" = drv "gtk-3" { };
    __internal = drv "internal-1" { };
    top = { inner = drv "inner-1" { }; deeper = { deepest = drv "deepest-1" { }; }; };
    outer = marked { sub = marked { subsub = marked {
      pkg = drv "pkg-1" { };
      tooDeep = marked { x = drv "x-1" { }; };
    }; }; };
    pkgsStatic = self // { pkgsCross = { }; };
    nixosTests = { login = drv "nixos-test-login" { }; };
    inherit system;
    f = x: x;
    n = 1;
  };
in self
"#,
    )
    .unwrap();
    let catalog = Catalog::evaluate(
        &set,
        "x86_64-linux",
        work.path(),
        &crate::nix::NixEnv::new("substituters =", "", "", work.path()),
        Duration::from_secs(60),
        MAX_EVALUATED_BYTES,
    )
    .await
    .unwrap();
    let attrs: Vec<&str> = catalog.packages().iter().map(|p| p.attr.as_str()).collect();
    assert_eq!(
        attrs,
        ["hello", "outer.sub.subsub.pkg", "top.inner", "withVersion"]
    );
    let hello = catalog.get("hello").unwrap();
    assert_eq!(hello.version.as_deref(), Some("2.12"));
    assert_eq!(hello.description.as_deref(), Some("Hi"));
    assert_eq!(hello.homepage.as_deref(), Some("https://a.example"));
    assert_eq!(hello.license.as_deref(), Some("MIT, bsd3"));
    assert_eq!(
        catalog.get("withversion").unwrap().version.as_deref(),
        Some("1.0.0")
    );
    assert_eq!(
        catalog.get("top.inner").unwrap().version.as_deref(),
        Some("1")
    );
}

/// Evaluations at once in one work directory each read a whole expression of their own, and
/// leave no file behind.
#[tokio::test]
async fn concurrent_evaluations_each_read_their_own_expression() {
    let work = tempfile::tempdir().unwrap();
    let set = work.path().join("set");
    std::fs::create_dir(&set).unwrap();
    std::fs::write(
        set.join("default.nix"),
        r#"{ system ? builtins.currentSystem, ... }: {
  hello = derivation { name = "hello-1"; inherit system; builder = "/bin/sh"; };
}
"#,
    )
    .unwrap();
    let nix = work.path().join("nix");
    let env = crate::nix::NixEnv::new("substituters =", "", "", &nix);
    for round in 0..5 {
        let evaluations = (0..16).map(|_| {
            Catalog::evaluate(
                &set,
                "x86_64-linux",
                &nix,
                &env,
                Duration::from_secs(120),
                MAX_EVALUATED_BYTES,
            )
        });
        for result in futures::future::join_all(evaluations).await {
            let catalog = result.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(catalog.len(), 1);
        }
    }
    assert_eq!(std::fs::read_dir(&nix).unwrap().count(), 0);
}
