# What `nixery popularity` asks Nix: the top-level packages of a package set, and the runtime
# closure of each, from which it counts in how many closures every store path appears.
#
# Called as
#   nix-instantiate --eval --strict --json popularity.nix --argstr pkgsPath PATH --argstr system S -A list
#   nix-build popularity.nix --argstr pkgsPath PATH --argstr system S --argstr attrs '[...]' -A packages
#   nix-build popularity.nix --argstr pkgsPath PATH --argstr system S --argstr attrs '[...]' -A closures
# `attrs` (JSON) names the packages to build or graph; attribute names are only ever looked up,
# never spliced into Nix code.
{ pkgsPath, system, attrs ? "[]" }:

let
  # Imported the way nixpkgs is: no user configuration or overlays from this machine.
  pkgs = import pkgsPath { inherit system; config = { }; overlays = [ ]; };

  isDerivation = v: builtins.isAttrs v && (v.type or null) == "derivation";
  # Whether a derivation can be instantiated at all (broken or unfree packages throw).
  evaluates = v: (builtins.tryEval (builtins.seq v.drvPath true)).value == true;

  # The derivations at the top of `set`, and one level into sets marked recurseForDerivations
  # (`xorg.xev`), as nix-env lists packages: { attr = "xorg.xev"; value = <drv>; }.
  packagesOf = prefix: set: depth:
    builtins.concatMap
      (name:
        let
          tried = builtins.tryEval set.${name};
          value = tried.value;
          attr = prefix + name;
        in
        if !tried.success then [ ]
        else if isDerivation value then (if evaluates value then [{ inherit attr value; }] else [ ])
        else if depth > 0 && builtins.isAttrs value && (value.recurseForDerivations or false) == true
        then packagesOf "${attr}." value (depth - 1)
        else [ ])
      (builtins.attrNames set);

  all = packagesOf "" pkgs 1;
  byAttr = builtins.listToAttrs (map (p: { name = p.attr; value = p.value; }) all);
  wanted = map (attr: byAttr.${attr}) (builtins.fromJSON attrs);
  toolbox = "${pkgs.busybox}/bin/busybox";
in
{
  # Every package's attribute path and output path.
  list = map (p: { inherit (p) attr; out = p.value.outPath; }) all;

  # The wanted packages, to build (with --keep-going: one failure does not stop the others).
  packages = wanted;

  # The runtime closure of each wanted package, as exportReferencesGraph writes it: `p0`, `p1`, …
  # in the order of `attrs`, each a list of { path, narSize, references, … }.
  closures = derivation {
    name = "nixery-popularity-closures.json";
    inherit system;
    __structuredAttrs = true;
    exportReferencesGraph = builtins.listToAttrs
      (builtins.genList (i: { name = "p${toString i}"; value = [ (builtins.elemAt wanted i) ]; })
        (builtins.length wanted));
    builder = toolbox;
    # The attributes files are read from the build directory: Nix 2.8's sandbox sets
    # NIX_ATTRS_*_FILE to where they are outside it.
    args = [ "sh" "-euc" ''
      out="$(sed -n "s/.*\['out'\]='\([^']*\)'.*/\1/p" "$NIX_BUILD_TOP/.attrs.sh")"
      cp "$NIX_BUILD_TOP/.attrs.json" "$out"
    '' ];
  };
}
