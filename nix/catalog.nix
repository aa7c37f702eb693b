# The package catalog of a package set: the packages a client can pull, with what search shows
# of them. Called as
#   nix-instantiate --eval --strict --json catalog.nix --argstr pkgsPath PATH --argstr system S
# it yields a list of { attr; version?; description?; homepage?; license?; }: `attr` the dotted
# attribute path (`xorg.xev`), every other field a string when the package has it (license: the
# SPDX id, else nixpkgs' short or full name; several licenses joined with ", ").
#
# The walk lists what nix/build-image.nix's name resolver can reach: derivations at the top,
# inside nested sets (`xorg.xev`, `haskellPackages.shellcheck`: `nix-env -qa` lists only the
# sets nixpkgs marks with `recurseForDerivations`), and deeper inside marked sets
# (`linuxKernel.packages.linux_6_6.zfs`). Everything is tried with builtins.tryEval: nixpkgs
# throws for aliases of removed packages and for broken, unfree or unsupported ones (these are
# left out, as `meta.available` says, since a pull of them would fail).
#
# Bounded, because nixpkgs is huge: a package's path has at most `maxDepth` components through
# sets nixpkgs does not mark, `maxMarkedDepth` through marked ones; names the resolver cannot
# reach (`__splicedPackages`, `gtk+`) are skipped unevaluated; whole package sets inside the
# set (`pkgsStatic`, `pkgsCross.*`, `buildPackages`, `pkgs` itself: anything with `pkgsCross`)
# are never entered, since each would list all of nixpkgs again; nor are `skipped` below.
{ pkgsPath, system }:

let
  # Imported the way nixpkgs is: no user configuration or overlays from the server's machine.
  pkgs = import pkgsPath { inherit system; config = { }; overlays = [ ]; };

  # Unmarked nested sets only at the top: `set.package`. Nixpkgs' own package sets
  # (`python3Packages`, `haskellPackages`, `xorg`) are there; one more unmarked level would walk
  # every package's passthru and scope internals, for nothing the resolver's users look for.
  maxDepth = 2;
  # Marked sets are nixpkgs saying "packages inside": `linuxKernel.packages.linux_6_6.zfs` is 4.
  maxMarkedDepth = 4;

  # Top-level sets of nixpkgs that hold no package anyone pulls as an image, never entered:
  # NixOS and package tests (finding out whether each of nixosTests' entries is a derivation
  # evaluates a NixOS system), the library and the configuration.
  skipped = [ "nixosTests" "tests" "lib" "config" ];

  # The names the resolver can reach: a registry name component once lowercased, or `_` and a
  # digit before one (`_1password` for `1password`). The same rule as src/catalog/name.rs.
  reachable = name:
    builtins.match "[a-zA-Z0-9]+([_-][a-zA-Z0-9]+)*|_[0-9][a-z0-9]*([_-][a-z0-9]+)*" name != null;

  # `v` fully evaluated if that succeeds and it is a string, else null.
  string = v:
    let r = builtins.tryEval (builtins.deepSeq v v);
    in if r.success && builtins.isString r.value then r.value else null;

  # Whether `v` evaluates to true without throwing.
  holds = v: let r = builtins.tryEval (v == true); in r.success && r.value;

  # "package", "set" or "other" for an evaluated attribute value.
  kindOf = v:
    let
      r = builtins.tryEval (
        if !(builtins.isAttrs v) then "other"
        else if (v.type or null) == "derivation" then "package"
        else "set");
    in
    if r.success then r.value else "other";

  licenseName = l:
    if builtins.isString l then l
    else if builtins.isAttrs l then
      let names = builtins.filter builtins.isString [ (l.spdxId or null) (l.shortName or null) (l.fullName or null) ];
      in if names == [ ] then null else builtins.head names
    else null;

  licenseText = l:
    if builtins.isList l then
      let names = builtins.filter builtins.isString (map licenseName l);
      in if names == [ ] then null else builtins.concatStringsSep ", " names
    else licenseName l;

  firstOf = v: if builtins.isList v then (if v == [ ] then null else builtins.head v) else v;

  # The version: nixpkgs' `version`, else what the derivation's name has after its pname.
  versionOf = drv:
    let
      version = string (drv.version or null);
      name = string (drv.name or null);
      parsed = if name == null then "" else (builtins.parseDrvName name).version;
    in
    if version != null && version != "" then version
    else if parsed != "" then parsed
    else null;

  entry = attr: drv:
    let
      meta = drv.meta or { };
      fields = {
        version = versionOf drv;
        description = string (meta.description or null);
        homepage = string (firstOf (meta.homepage or null));
        license = string (licenseText (meta.license or null));
      };
    in
    { inherit attr; } // builtins.removeAttrs fields
      (builtins.filter (n: fields.${n} == null) (builtins.attrNames fields));

  # A set to walk into, at `depth` components below the top: not a whole package set, and
  # within the depth its marking allows.
  descend = depth: name: set:
    !(depth == 0 && builtins.elem name skipped)
    && !(holds (set ? pkgsCross))
    && (depth + 2 <= maxDepth
      || (depth + 2 <= maxMarkedDepth && holds (set.recurseForDerivations or false)));

  walk = prefix: depth: set:
    builtins.concatMap
      (name:
        let
          tried = builtins.tryEval set.${name};
          value = tried.value;
          kind = if tried.success then kindOf value else "other";
          attr = prefix + name;
        in
        if !(reachable name) then [ ]
        else if kind == "package" then
          (if holds (value.meta.available or true) then [ (entry attr value) ] else [ ])
        else if kind == "set" && descend depth name value then walk "${attr}." (depth + 1) value
        else [ ])
      (builtins.attrNames set);
in
walk "" 0 pkgs
