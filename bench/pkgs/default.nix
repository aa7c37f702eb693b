# The benchmark package set (bench/run): nix/offline-pkgs plus packages made of real binaries.
#
#   corpus      ~1.3 GB of this machine's real binaries and libraries: one package whose runtime
#               closure is the corpus-NN parts below (so the image `corpus` has them all)
#   corpus-NN   the parts: each a small package linking to a copy of a slice of
#               /usr/lib/<cpu>-linux-gnu, /usr/bin, /usr/libexec or /usr/lib/gcc, brought into the
#               store with builtins.path (at evaluation time; no builder reads outside /nix/store).
#               Sockets, fifos and device nodes are skipped. Each is a package of its own, so an
#               image that names several parts (`corpus-01/corpus-02/...`) gets one layer per part.
#   big256      256 MiB of deterministic, incompressible data (four differently byte-permuted
#               copies of offline-pkgs' 64 MiB `big`), for the blob throughput test
#   big8        8 MiB of the same kind (offline-pkgs' big.sh), the blob of `bench/run --quick`
#   corpusSlices
#               the slices as data, [ { name, dir, buckets, index, src } ] with `src` the store
#               path of the slice's copy. Evaluating it (nix-instantiate --eval --strict --json
#               --read-write-mode -A corpusSlices) reads /usr and adds the copies to the store.
#
# With `corpusSize = "quick"` (bench/run --quick) the corpus is two slices of glibc's gconv
# modules, /usr/lib/<cpu>-linux-gnu/gconv (~8 MB of small shared objects, on every glibc Debian),
# instead of the ~1.3 GB above: the same packages and code paths, sizes fit for CI.
#
# Like nix/offline-pkgs it takes `{ system, ... }`, so NIXERY_PKGS_PATH can point here. It also
# takes `corpusSlices`, that list as evaluated earlier: then the corpus does not read /usr at all
# (offline-pkgs still imports /usr/bin/busybox), its parts are made from those store paths with
# builtins.storePath, and it is the same store paths and derivations whatever was installed in
# the meantime. bench/run evaluates the slices once at its start and gives every contender,
# nixery's servers included, a package set pinned that way.
{ system ? builtins.currentSystem, corpusSlices ? null, corpusSize ? "full", ... }@args:

let
  offline = import ../../nix/offline-pkgs (removeAttrs args [ "corpusSlices" "corpusSize" ]);
  inherit (offline) mkPackage big;

  cpu = builtins.head (builtins.split "-" system);

  hexDigits = {
    "0" = 0; "1" = 1; "2" = 2; "3" = 3; "4" = 4; "5" = 5; "6" = 6; "7" = 7;
    "8" = 8; "9" = 9; a = 10; b = 11; c = 12; d = 13; e = 14; f = 15;
  };
  # A number 0..255 that depends only on the string.
  hashByte = s:
    let h = builtins.hashString "sha256" s;
    in hexDigits.${builtins.substring 0 1 h} * 16 + hexDigits.${builtins.substring 1 1 h};
  mod = a: b: a - (a / b) * b;

  # Slice `index` of `buckets` of directory `dir`: the top-level entries whose name hashes into
  # that bucket, with everything below them. Only regular files, directories and symlinks; not
  # `dri` (Mesa's drivers: one 25 MB file under a dozen hard-linked names).
  slice = { dir, buckets, index, name }:
    builtins.path {
      path = dir;
      inherit name;
      filter = path: type:
        let
          rel = builtins.substring (builtins.stringLength (toString dir) + 1) (-1) path;
          top = builtins.head (builtins.match "([^/]*).*" rel);
        in
        (type == "regular" || type == "directory" || type == "symlink")
        && top != "dri"
        && mod (hashByte top) buckets == index;
    };

  # Where the corpus comes from: [ directory, number of slices ]. Missing directories are left out.
  sources = builtins.filter (s: builtins.pathExists (builtins.elemAt s 0)) {
    full = [
      [ (/usr/lib + "/${cpu}-linux-gnu") 8 ]
      [ /usr/bin 3 ]
      [ /usr/libexec 1 ]
      [ /usr/lib/gcc 1 ]
    ];
    quick = [ [ (/usr/lib + "/${cpu}-linux-gnu/gconv") 2 ] ];
  }.${corpusSize};

  slices = builtins.concatLists (map
    (s:
      let dir = builtins.elemAt s 0; buckets = builtins.elemAt s 1;
      in builtins.genList (index: { inherit dir buckets index; }) buckets)
    sources);

  pad = n: if n < 10 then "0${toString n}" else toString n;

  # The slices of this machine's /usr, as data (reading /usr when `src` is forced).
  usrSlices = builtins.genList
    (i:
      let
        s = builtins.elemAt slices i;
        name = "corpus-${pad (i + 1)}";
      in
      {
        inherit name;
        inherit (s) buckets index;
        dir = toString s.dir;
        src = slice (s // { name = "${name}-src"; });
      })
    (builtins.length slices);

  # The slices the parts are made of: this machine's, or the ones evaluated earlier (then the
  # same store paths, and the same derivations: builtins.storePath gives `src` the same context
  # builtins.path did).
  corpusSlices' =
    if corpusSlices == null then usrSlices
    else map (s: s // { src = builtins.storePath s.src; }) corpusSlices;

  # corpus-01 .. corpus-NN: each links to one slice (a store path of its own).
  parts = map
    (s: {
      inherit (s) name;
      value = mkPackage {
        pname = s.name;
        inherit (s) src;
        # The slice itself is the store path with the data; the package points at it, so the
        # slice is in the package's closure (and its layer) without a second copy in the store.
        buildCommand = ''
          mkdir -p "$out/share/corpus"
          ln -s "$src" "$out/share/corpus/$pname"
        '';
        meta.description = "Slice ${toString (s.index + 1)}/${toString s.buckets} of ${s.dir}";
      };
    })
    corpusSlices';
  partSet = builtins.listToAttrs parts;
  partList = map (p: p.value) parts;

  corpus = mkPackage {
    pname = "corpus";
    runtimeDeps = partList;
    buildCommand = ''
      mkdir -p "$out/share/corpus"
      for p in $runtimeDeps; do ln -s "$p/share/corpus/''${p#*-}" "$out/share/corpus/''${p#*-}"; done
    '';
    meta.description = "Real binaries of this machine (${toString (builtins.length parts)} store paths)";
  };

  # 256 MiB that gzip cannot compress: `big` four times, each copy with its bytes mapped through a
  # different rotation of 0..255 (no 32 KiB window of one copy repeats in another).
  big256 = mkPackage {
    pname = "big256";
    data = "${big}/share/big/data.bin";
    buildCommand = ''
      mkdir -p "$out/share/big256"
      identity=$(awk 'BEGIN { for (i = 0; i < 256; i++) printf "\\%03o", i }')
      for k in 0 1 2 3; do
        perm=$(awk -v k=$k 'BEGIN { for (i = 0; i < 256; i++) printf "\\%03o", (i + 89 * k) % 256 }')
        tr "$identity" "$perm" < "$data"
      done > "$out/share/big256/data.bin"
      size=$(wc -c < "$out/share/big256/data.bin")
      [ "$size" -eq $((4 * $(wc -c < "$data"))) ] || { echo "big256: wrong size $size" >&2; exit 1; }
    '';
    meta.description = "256 MiB of deterministic pseudo-random data (share/big256/data.bin)";
  };
  big8 = mkPackage {
    pname = "big8";
    sizeMiB = "8";
    buildCommand = ''. ${../../nix/offline-pkgs/big.sh}'';
    meta.description = "8 MiB of deterministic pseudo-random data (share/big/data.bin)";
  };
in
offline // partSet // { inherit corpus big256 big8; corpusSlices = corpusSlices'; }
