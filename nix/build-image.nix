# What nixery asks Nix for one image: the symlink forest that becomes the image's root (whose
# runtime closure the server then reads from the store) and the attribute each name resolved to;
# or the list of packages the set does not have.
#
# Called as
#   nix-instantiate build-image.nix --argstr pkgsPath PATH --argstr packages '["hello"]' \
#     --argstr system aarch64-linux --argstr hostSystem x86_64-linux
# and the derivation it prints is then built with nix-build.
# Package names arrive as JSON data and are only ever used as attribute names: nothing from a
# request is spliced into Nix code. The set at pkgsPath must provide `busybox`, the toolbox for
# the small derivations below (nixpkgs and nix/offline-pkgs both do).
#
# The packages are the image's platform's (`system`). The small derivations below are the
# server's own (`hostSystem`), built with its own system's busybox whatever the image's platform:
# no binary cache holds them, so building them for aarch64-linux would need an aarch64 machine
# even when a cache has every package of the image.
{ pkgsPath, packages, system, hostSystem ? system }:

let
  # Imported the way nixpkgs is: no user configuration or overlays from the server's machine.
  importFor = system: import pkgsPath { inherit system; config = { }; overlays = [ ]; };
  pkgs = importFor system;
  hostPkgs = if hostSystem == system then pkgs else importFor hostSystem;
  names = builtins.fromJSON packages;
  toolbox = "${hostPkgs.busybox}/bin/busybox";

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # The attribute of `set` that a registry name component stands for. Registry names are
  # lowercase, so an exact match comes first, then a case-insensitive one (`bashinteractive` is
  # `bashInteractive`), then the `_`-prefixed spelling of names that start with a digit
  # (`1password` is `_1password`). Null when there is none.
  attrFor = set: name:
    let
      caseless = builtins.filter (n: toLower n == name) (builtins.attrNames set);
    in
    if builtins.hasAttr name set then name
    else if caseless != [ ] then builtins.head caseless
    else if builtins.match "[0-9].*" name != null && builtins.hasAttr "_${name}" set then "_${name}"
    else null;

  # Follows a dotted name (`xorg.xev`) through nested sets: the attribute path it stands for and
  # the derivation there. Null unless it ends at a derivation.
  lookup = name:
    let
      step = found: component:
        if found == null || !(builtins.isAttrs found.value) then null
        else
          let attr = attrFor found.value component;
          in if attr == null then null else { path = found.path ++ [ attr ]; value = found.value.${attr}; };
      found = builtins.foldl' step { path = [ ]; value = pkgs; }
        (builtins.filter builtins.isString (builtins.split "\\." name));
    in
    if found != null && builtins.isAttrs found.value && (found.value.type or null) == "derivation"
    then { attr = builtins.concatStringsSep "." found.path; package = found.value; }
    else null;

  # What the image's SBOM says of a requested package, from its `meta`: its licenses (SPDX ids
  # where nixpkgs gives them), homepage and description.
  licensesOf = license:
    if builtins.isList license then builtins.concatMap licensesOf license
    else if builtins.isAttrs license then [ (license.spdxId or license.shortName or license.fullName or "unknown") ]
    else if builtins.isString license then [ license ]
    else [ ];
  metaOf = found:
    let
      meta = found.package.meta or { };
      homepage = meta.homepage or null;
    in
    {
      inherit (found) attr;
      path = found.package.outPath;
      licenses = licensesOf (meta.license or [ ]);
      homepage = if builtins.isList homepage then (if homepage == [ ] then null else builtins.head homepage) else homepage;
      description = meta.description or null;
    };

  resolved = map (name: { inherit name; found = lookup name; }) names;
  missing = map (r: r.name) (builtins.filter (r: r.found == null) resolved);
  found = map (r: r.found) (builtins.filter (r: r.found != null) resolved);
  contents = map (f: f.package) found;

  # The image root: each package's top-level tree (but nix-support/) merged into one, the first
  # package to provide a file winning, every file a symlink into the store, plus /usr/bin/env when
  # there is a bin/env.
  root = derivation {
    name = "nixery-image-root";
    system = hostSystem;
    builder = toolbox;
    paths = contents;
    args = [ "sh" "-euc" ''
      mkdir "$out"
      for pkg in $paths; do
        [ -d "$pkg" ] || continue
        cd "$pkg"
        find . -mindepth 1 | sort | while IFS= read -r rel; do
          rel="''${rel#./}"
          # Nix's metadata about a package is no part of the image's root.
          case "$rel" in nix-support | nix-support/*) continue ;; esac
          target="$out/$rel"
          parent="$(dirname "$target")"
          if [ -L "$parent" ] || [ ! -d "$parent" ] || [ -e "$target" ] || [ -L "$target" ]; then
            continue
          fi
          if [ -d "$pkg/$rel" ] && [ ! -L "$pkg/$rel" ]; then
            mkdir "$target"
          else
            ln -s "$pkg/$rel" "$target"
          fi
        done
      done
      if [ -e "$out/bin/env" ] && [ ! -e "$out/usr/bin/env" ]; then
        mkdir -p "$out/usr/bin"
        ln -s /bin/env "$out/usr/bin/env"
      fi
    '' ];
  };

  # What the build yields: the image root, the attribute each name resolved to and its meta. The root's
  # closure (each path's size and references) is read from the store once this is built: Nix's
  # exportReferencesGraph with structured attributes, which would hand it over here, fails on a
  # remote builder (the legacy ssh protocol does not carry .attrs.sh), and a plain derivation
  # builds anywhere. The file's reference to the root keeps the whole closure alive for as long
  # as the file is a GC root.
  image = derivation {
    name = "nixery-image.json";
    system = hostSystem;
    builder = toolbox;
    result = builtins.toJSON {
      nixeryRoot = root;
      nixeryPackages = map (f: f.attr) found;
      nixeryMeta = map metaOf found;
    };
    args = [ "sh" "-euc" ''printf '%s' "$result" > "$out"'' ];
  };

  notFound = derivation {
    name = "nixery-packages-not-found.json";
    system = hostSystem;
    builder = toolbox;
    result = builtins.toJSON { error = "not_found"; pkgs = missing; };
    args = [ "sh" "-euc" ''printf '%s' "$result" > "$out"'' ];
  };
in
if missing != [ ] then notFound else image
