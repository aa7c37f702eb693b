#!/usr/bin/env python3
"""bench/layering/universe.py: the Python half of bench/layering/universe (read that first).

Three steps, each a subcommand, each reading and writing files under the cache directory:

  resolve   packages.txt -> <cache>/closure.json: the Depends/Pre-Depends closure of the pinned
            packages over APT's candidate versions (`apt-cache dumpavail`), and
            <cache>/download.tsv: `name=version<TAB>file<TAB>size` of every .deb of the closure.
  unpack    every <cache>/debs/<file> -> <cache>/unpacked/<name> (`dpkg-deb -x`, hard links made
            symlinks, anything but files, directories and symlinks removed), plus the NAR
            sha256 of the tree in <cache>/stamps/<name>.json, from which generate knows the
            tree's store path without asking Nix.
  generate  closure.json + stamps -> <out>/default.nix, <out>/offline-pkgs/ (a copy of
            nix/offline-pkgs, for busybox), <out>/top-level.txt, <out>/universe.json; each
            unpacked tree is put into the store first (builtins.path, unrestricted) when it is not
            there, and made a GC root, because the set names them by store path: nixery
            evaluates a set restricted to its own directory and the store.

Python 3 standard library only. Everything is sorted, so equal inputs give byte-identical output.
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections import defaultdict

# nixery's rule for a name component of an image name (a `.` separates attribute path components).
ATTR_RE = re.compile(r"^[a-z0-9]+([_-][a-z0-9]+)*$")
# Attribute names of the generated set that are not Debian packages.
RESERVED_ATTRS = {"busybox"}
# APT as on a machine with nothing installed and no pins: the candidate of every package is then
# the one Debian's archive offers (on this machine nodejs 20 from nodesource is installed and
# pinned, and would otherwise be the candidate, with no .deb to download).
APT_OPTS = ["-o", "Dir::State::status=/dev/null", "-o", "Dir::Cache::pkgcache=",
            "-o", "Dir::Cache::srcpkgcache=", "-o", "Dir::Etc::preferences=/dev/null",
            "-o", "Dir::Etc::preferencesparts=/dev/null"]
# Characters Nix allows in a store path name.
STORE_NAME_BAD = re.compile(r"[^A-Za-z0-9+._?=-]")


def log(msg):
    print(f"[universe.py] {msg}", file=sys.stderr, flush=True)


def die(msg):
    log(f"ERROR: {msg}")
    sys.exit(1)


def set_suffix(name):
    """The suffix of a package set's files in the cache: none for the first set (`packages.txt`,
    closure.json), `-NAME` for another (`packages-b.txt`, closure-b.json)."""
    return "" if name == "a" else f"-{name}"


def closure_file(args):
    return os.path.join(args.cache, f"closure{set_suffix(args.set)}.json")


def write_if_changed(path, text):
    """Writes text to path through a temporary file, leaving the file alone if it is equal."""
    data = text.encode()
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except FileNotFoundError:
        pass
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# resolve


def read_pinned(path):
    """The package names of packages.txt, in file order; `#` starts a comment."""
    names = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", line):
                die(f"{path}:{lineno}: {line!r} is not a Debian package name (one per line)")
            if line in names:
                die(f"{path}:{lineno}: {line} is listed twice")
            names.append(line)
    return names


def parse_avail(text, arch):
    """The records of `apt-cache dumpavail` (one per package: its candidate version) by name.

    Only the native architecture's records and `all` ones: with a foreign architecture added
    (`dpkg --add-architecture arm64`, as scripts/test does), APT lists each package once per
    architecture, and the set is built from the native .debs."""
    wanted = {"Package", "Version", "Architecture", "Depends", "Pre-Depends", "Provides", "Section",
              "Filename", "Size", "Installed-Size", "SHA256"}
    records = {}
    for block in text.split("\n\n"):
        rec = {}
        field = None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] in " \t":
                if field in wanted:
                    rec[field] += " " + line.strip()
                continue
            field, _, value = line.partition(":")
            if field in wanted:
                rec[field] = value.strip()
        if "Package" in rec and rec.get("Architecture", arch) in (arch, "all"):
            if rec["Package"] in records:
                die(f"apt-cache dumpavail lists {rec['Package']} twice")
            records[rec["Package"]] = rec
    return records


def relation_groups(value):
    """`a (>= 1) | b:any, c` -> [["a", "b"], ["c"]]: versions and architecture qualifiers dropped."""
    groups = []
    for group in value.split(","):
        alts = []
        for alt in group.split("|"):
            alt = re.sub(r"\(.*?\)|\[.*?\]|<.*?>", "", alt).strip()
            if alt:
                alts.append(alt.split(":", 1)[0])
        if alts:
            groups.append(alts)
    return groups


class Archive:
    """APT's candidate records of the native architecture, and who provides each virtual name."""

    def __init__(self):
        origins = subprocess.run(["apt-get", "indextargets", "--format", "$(ORIGIN) $(SITE)",
                                  "Identifier: Packages"], check=True, capture_output=True,
                                 text=True).stdout.split("\n")
        for origin in sorted(set(o for o in origins if o and not o.startswith("Debian "))):
            log(f"warning: APT also has packages from {origin}; they count as much as Debian's")
        self.arch = subprocess.run(["dpkg", "--print-architecture"], check=True,
                                   capture_output=True, text=True).stdout.strip()
        text = subprocess.run(["apt-cache", *APT_OPTS, "dumpavail"], check=True,
                              capture_output=True, text=True).stdout
        self.records = parse_avail(text, self.arch)
        if not self.records:
            die("apt-cache dumpavail lists no packages: run apt-get update")
        self.providers = defaultdict(set)
        for name, rec in self.records.items():
            if "Filename" not in rec:
                continue
            for group in relation_groups(rec.get("Provides", "")):
                for virtual in group:
                    self.providers[virtual].add(name)

    def downloadable(self, name):
        return name in self.records and "Filename" in self.records[name]

    def closure(self, roots):
        """The Depends + Pre-Depends closure of roots: (name -> its dependencies chosen,
        virtual name -> the provider chosen, dependency nobody provides -> who wants it).
        The first alternative that exists wins, a virtual name's first provider by name."""
        virtuals = {}
        unsatisfied = defaultdict(list)

        def choose(alts, wanter):
            for alt in alts:
                if self.downloadable(alt):
                    return alt
                if self.providers.get(alt):
                    chosen = sorted(self.providers[alt])[0]
                    virtuals[alt] = chosen
                    return chosen
            unsatisfied[" | ".join(alts)].append(wanter)
            return None

        deps = {}
        todo = sorted(roots)
        while todo:
            name = todo.pop()
            if name in deps:
                continue
            rec = self.records[name]
            out = set()
            for field in ("Pre-Depends", "Depends"):
                for alts in relation_groups(rec.get(field, "")):
                    chosen = choose(alts, name)
                    if chosen is not None and chosen != name:
                        out.add(chosen)
            deps[name] = sorted(out)
            todo.extend(d for d in sorted(out, reverse=True) if d not in deps)
        return deps, virtuals, unsatisfied


def cmd_resolve(args):
    pinned = read_pinned(args.packages)
    archive = Archive()
    records, providers, arch = archive.records, archive.providers, archive.arch
    for name in pinned:
        if name not in records:
            hint = f" (a virtual package provided by {', '.join(sorted(providers[name]))})" \
                if name in providers else ""
            die(f"{args.packages}: {name} is not an available package{hint}")
        if "Filename" not in records[name]:
            die(f"{args.packages}: {name} has no .deb to download")
    deps, virtuals, unsatisfied = archive.closure(pinned)

    for dep, wanters in sorted(unsatisfied.items()):
        log(f"warning: nothing provides {dep} (wanted by {', '.join(sorted(set(wanters)))}); left out")

    # apt-cache dumpavail prints each package's candidate; ask apt-cache show once more for the
    # closure, so a difference (say, a pin dumpavail ignored) stops the run instead of going by.
    shown = subprocess.run(["apt-cache", *APT_OPTS, "show", "--no-all-versions",
                            *sorted(deps)], check=True,
                           capture_output=True, text=True).stdout
    for name, rec in parse_avail(shown, arch).items():
        if name in deps and rec.get("Version") != records[name]["Version"]:
            die(f"{name}: apt-cache dumpavail says {records[name]['Version']}, apt-cache show says "
                f"{rec.get('Version')}")

    packages = {}
    for name in sorted(deps):
        rec = records[name]
        version = rec["Version"]
        pkg_arch = rec.get("Architecture", arch)
        packages[name] = {
            "version": version,
            "architecture": pkg_arch,
            # The file name apt-get download gives it (an epoch's `:` is written `%3a`).
            "deb": f"{name}_{version.replace(':', '%3a')}_{pkg_arch}.deb",
            "size": int(rec.get("Size", "0")),
            "installed_size_kib": int(rec.get("Installed-Size", "0")),
            "sha256": rec.get("SHA256", ""),
            "depends": deps[name],
        }
    closure = {
        "architecture": arch,
        "packages_file": os.path.basename(args.packages),
        "pinned": pinned,
        "virtuals": dict(sorted(virtuals.items())),
        "unsatisfied": sorted(unsatisfied),
        "packages": packages,
    }
    os.makedirs(args.cache, exist_ok=True)
    write_if_changed(closure_file(args), json.dumps(closure, indent=1, sort_keys=True) + "\n")
    write_if_changed(os.path.join(args.cache, f"download{set_suffix(args.set)}.tsv"),
                     "".join(f"{n}={p['version']}\t{p['deb']}\t{p['size']}\n"
                             for n, p in packages.items()))
    size = sum(p["size"] for p in packages.values())
    installed = sum(p["installed_size_kib"] for p in packages.values())
    log(f"{len(pinned)} pinned packages, {len(packages)} in the closure, "
        f"{len(virtuals)} virtual packages chosen; download {size / 1e6:.1f} MB, "
        f"installed {installed * 1024 / 1e6:.1f} MB")


# ------------------------------------------------------------------------------------------------
# draw

# The sections a drawn package may come from: programs people put in images, not libraries,
# documentation, fonts or desktops (a library comes in as a dependency).
DRAW_SECTIONS = {"admin", "database", "devel", "editors", "httpd", "interpreters", "mail", "math",
                 "net", "perl", "python", "ruby", "science", "shells", "text", "utils", "vcs",
                 "web", "java", "php", "lisp", "ocaml", "rust", "golang", "javascript"}
DRAW_SKIP = re.compile(r"^(lib|linux-|firmware-|fonts-|node-|golang-github-|librust-)|"
                       r"-(dev|doc|dbg|dbgsym|data|common|examples|tests)$|"
                       r"-linux-gnu")  # cross toolchains, dozens of near copies


def cmd_draw(args):
    """A seeded draw of packages for another package set: the archive's candidates in
    DRAW_SECTIONS (main only, not DRAW_SKIP, not already pinned by --exclude), ordered by
    sha256(seed:name), each taken while its own closure stays under --max-package-mb of .debs and
    the set's under --max-total-mb."""
    exclude = set(read_pinned(args.exclude)) if args.exclude else set()
    archive = Archive()
    pool = []
    for name, rec in archive.records.items():
        section = rec.get("Section", "")
        if "/" in section or section not in DRAW_SECTIONS or DRAW_SKIP.search(name):
            continue
        if name in exclude or not archive.downloadable(name):
            continue
        pool.append(name)
    pool.sort(key=lambda n: hashlib.sha256(f"{args.seed}:{n}".encode()).hexdigest())
    size = lambda names: sum(int(archive.records[n].get("Size", "0")) for n in names)
    chosen, closure = [], set()
    for name in pool:
        if len(chosen) == args.count:
            break
        deps, _, _ = archive.closure([name])
        if size(deps) > args.max_package_mb * 1e6:
            continue
        if size(closure | set(deps)) > args.max_total_mb * 1e6:
            continue
        chosen.append(name)
        closure |= set(deps)
    if len(chosen) < args.count:
        die(f"only {len(chosen)} of {args.count} packages fit")
    log(f"drew {len(chosen)} of {len(pool)} candidates (seed {args.seed}); their closure: "
        f"{len(closure)} packages, {size(closure) / 1e6:.1f} MB of .debs")
    print("\n".join(chosen))


# ------------------------------------------------------------------------------------------------
# unpack


def nar_sha256(root):
    """The sha256 (hex) and size of the NAR serialisation of root, as `nix-hash --type sha256`.

    See Eelco Dolstra's thesis, figure 5.2: strings are length-prefixed (u64 little endian) and
    padded to 8 bytes; directory entries are sorted by name; a regular file is executable when
    its owner may execute it."""
    h = hashlib.sha256()
    total = 0

    def raw(b):
        nonlocal total
        h.update(b)
        total += len(b)

    def pad(n):
        if n % 8:
            raw(b"\0" * (8 - n % 8))

    def s(b):
        raw(len(b).to_bytes(8, "little"))
        raw(b)
        pad(len(b))

    def dump(path):
        st = os.lstat(path)
        s(b"(")
        s(b"type")
        if stat.S_ISREG(st.st_mode):
            s(b"regular")
            if st.st_mode & stat.S_IXUSR:
                s(b"executable")
                s(b"")
            s(b"contents")
            raw(st.st_size.to_bytes(8, "little"))
            n = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    raw(chunk)
                    n += len(chunk)
            if n != st.st_size:
                raise RuntimeError(f"{path} changed while it was read")
            pad(n)
        elif stat.S_ISLNK(st.st_mode):
            s(b"symlink")
            s(b"target")
            s(os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            s(b"directory")
            for name in sorted(os.listdir(path)):
                s(b"entry")
                s(b"(")
                s(b"name")
                s(name)
                s(b"node")
                dump(os.path.join(path, name))
                s(b")")
        else:
            raise RuntimeError(f"{path} has a type Nix cannot import")
        s(b")")

    s(b"nix-archive-1")
    dump(os.fsencode(root))
    return h.hexdigest(), total


# Bumped when unpacking changes, so that older trees are unpacked again.
STAMP_FORMAT = 2


def unpack_one(cache, name, pkg):
    """Unpacks one .deb unless its stamp says it is done; returns (name, stamp, did_work)."""
    deb = os.path.join(cache, "debs", pkg["deb"])
    dest = os.path.join(cache, "unpacked", name)
    stamp_path = os.path.join(cache, "stamps", f"{name}.json")
    try:
        with open(stamp_path) as f:
            stamp = json.load(f)
        if (stamp.get("format") == STAMP_FORMAT and stamp.get("deb") == pkg["deb"]
                and os.path.isdir(dest)):
            return name, stamp, False
    except (FileNotFoundError, ValueError):
        pass
    if not os.path.isfile(deb):
        raise RuntimeError(f"{deb} is missing (the download step did not get it)")
    if pkg["sha256"]:
        h = hashlib.sha256()
        with open(deb, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != pkg["sha256"]:
            raise RuntimeError(f"{deb}: sha256 {h.hexdigest()}, the archive says {pkg['sha256']}: "
                               "delete it and run again")
    tmp = os.path.join(cache, "unpacked", f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(tmp)
    subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
    # Nix imports only regular files, directories and symlinks; anything else (a fifo, a socket, a
    # device node) is removed here and named in the stamp, so the NAR hash is of what Nix imports.
    #
    # Hard links become relative symlinks to the first of their names (in sorted order): a NAR
    # has no hard links, so Nix would store (and nixery pack) every name as a full copy, which
    # for Mesa's drivers (13 names of one 25 MB file) is 335 MB instead of 26. nixpkgs' mesa
    # does the same.
    skipped = []
    linked = []
    first_name = {}
    for dirpath, dirnames, filenames in os.walk(tmp):
        dirnames.sort()
        for entry in sorted(dirnames + filenames):
            p = os.path.join(dirpath, entry)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                first = first_name.setdefault((st.st_dev, st.st_ino), p)
                if first != p:
                    os.unlink(p)
                    os.symlink(os.path.relpath(first, dirpath), p)
                    linked.append(os.path.relpath(p, tmp))
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
                      or stat.S_ISLNK(st.st_mode)):
                skipped.append(os.path.relpath(p, tmp))
                os.unlink(p)
    os.rename(tmp, dest)
    digest, nar_size = nar_sha256(dest)
    stamp = {"format": STAMP_FORMAT, "deb": pkg["deb"], "nar_sha256": digest,
             "nar_size": nar_size, "skipped": sorted(skipped), "hard_links": sorted(linked)}
    with open(f"{stamp_path}.tmp", "w") as f:
        json.dump(stamp, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(f"{stamp_path}.tmp", stamp_path)
    return name, stamp, True


def cmd_unpack(args):
    with open(closure_file(args)) as f:
        closure = json.load(f)
    os.makedirs(os.path.join(args.cache, "unpacked"), exist_ok=True)
    os.makedirs(os.path.join(args.cache, "stamps"), exist_ok=True)
    packages = closure["packages"]
    work = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(unpack_one, args.cache, n, p) for n, p in sorted(packages.items())]
        for future in concurrent.futures.as_completed(futures):
            try:
                name, stamp, did = future.result()
            except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                for f in futures:
                    f.cancel()
                die(f"unpacking failed: {e}")
            if did:
                work += 1
                if work % 100 == 0:
                    log(f"unpacked {work} .debs")
            for rel in stamp["skipped"]:
                log(f"warning: {name}: skipped {rel} (not a file, directory or symlink)")
            if did and stamp["hard_links"]:
                log(f"{name}: {len(stamp['hard_links'])} hard links made symlinks")
    log(f"{work} packages unpacked, {len(packages) - work} already were")


# ------------------------------------------------------------------------------------------------
# generate


def sccs_of(nodes, edges):
    """Tarjan's strongly connected components, iteratively; each sorted, the list sorted."""
    index = {}
    low = {}
    on_stack = set()
    stack = []
    out = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == node:
                        break
                out.append(sorted(comp))
    return sorted(out)


def attr_name(debian_name):
    """nixery-safe attribute name: `+` -> `p`, `.` -> `_` (libstdc++6 -> libstdcpp6)."""
    return debian_name.replace("+", "p").replace(".", "_")


def parse_drv_name(name):
    """Nix's builtins.parseDrvName: split at the first `-` not followed by a letter."""
    for i, c in enumerate(name):
        if c == "-" and i + 1 < len(name) and not name[i + 1].isalpha():
            return name[:i], name[i + 1:]
    return name, ""


def store_pname(debian_name):
    """The package-name part of a store path name. A `-` followed by a digit (libsasl2-2,
    gcc-12, openjdk-17-jre-headless) becomes `_`, or parseDrvName would cut the name there."""
    return re.sub(r"-(?=[0-9])", "_", debian_name)


def store_name(debian_name, version):
    name = f"{store_pname(debian_name)}-{version}"
    name = name.replace(":", "_").replace("~", "_")
    name = STORE_NAME_BAD.sub("_", name)
    pname, ver = parse_drv_name(name)
    if pname != store_pname(debian_name) or not ver:
        die(f"store name {name} of {debian_name} does not split into its name and version")
    return name


def nix_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


NIX_KEYWORDS = {"if", "then", "else", "assert", "with", "let", "in", "rec", "inherit", "or"}


def nix_attr(name):
    """An attribute name as Nix code: bare when it is an identifier, else quoted."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_'-]*", name) and name not in NIX_KEYWORDS:
        return name
    return nix_string(name)


STORE_DIR = "/nix/store"
# Where the unpacked trees' GC roots are: a symlink a tree, named as its store path.
GC_ROOTS = "/nix/var/nix/gcroots/nixery-bench-layering"
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"


def nix_base32(data):
    """Nix's base-32 of data (its own alphabet, last byte first)."""
    out = []
    for n in range((len(data) * 8 - 1) // 5, -1, -1):
        b = n * 5
        i, j = divmod(b, 8)
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        out.append(NIX_BASE32[c & 0x1F])
    return "".join(out)


def source_store_path(name, nar_sha256):
    """The store path `builtins.path { name; sha256 = nar_sha256; }` gives (a recursive
    fixed-output path with no references: Nix's makeFixedOutputPath), computed without Nix."""
    digest = hashlib.sha256(f"source:sha256:{nar_sha256}:{STORE_DIR}:{name}".encode()).digest()
    folded = bytearray(20)
    for i, byte in enumerate(digest):
        folded[i % 20] ^= byte
    return f"{STORE_DIR}/{nix_base32(bytes(folded))}-{name}"


def import_trees(trees):
    """Puts each unpacked tree into the store at the path the generated set names, unless it is
    there: builtins.path reads the cache, outside the set's directory, so this runs here in an
    unrestricted evaluation and the set itself only names store paths. Each is a GC root (a
    symlink in GC_ROOTS), so that a `nix-store --gc` (the server's, another program's) leaves
    the set evaluable. trees: (store path, unpacked directory, name, NAR sha256) each."""
    # The roots first, so that no collection runs between an import and its root.
    os.makedirs(GC_ROOTS, exist_ok=True)
    for path, _, _, _ in trees:
        link = os.path.join(GC_ROOTS, os.path.basename(path))
        if os.path.islink(link) and os.readlink(link) == path:
            continue
        tmp = f"{link}.tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(path, tmp)
        os.replace(tmp, link)
    missing = [t for t in trees if not os.path.exists(t[0])]
    if missing:
        add_to_store(missing)


def add_to_store(missing):
    """Imports the trees (see import_trees) in one unrestricted evaluation, checking that each
    lands at the store path computed for it."""
    log(f"importing {len(missing)} unpacked trees into the store")
    expr = "[\n" + "".join(
        f"  (builtins.path {{ path = /. + {nix_string(d)}; name = {nix_string(n)}; "
        f"sha256 = \"{h}\"; }})\n" for _, d, n, h in missing) + "]\n"
    # On standard input: the expression is too long for one argument.
    got = json.loads(subprocess.run(["nix-instantiate", "--eval", "--read-write-mode", "--strict",
                                     "--json", "-"],
                                    input=expr, check=True, capture_output=True,
                                    text=True).stdout)
    for (want, d, _, _), path in zip(missing, got):
        if path != want:
            die(f"{d} went into the store as {path}, not {want}")


def cmd_generate(args):
    with open(closure_file(args)) as f:
        closure = json.load(f)
    packages = closure["packages"]
    stamps = {}
    for name in packages:
        with open(os.path.join(args.cache, "stamps", f"{name}.json")) as f:
            stamps[name] = json.load(f)
        if stamps[name]["deb"] != packages[name]["deb"]:
            die(f"{name}: unpacked from {stamps[name]['deb']}, not {packages[name]['deb']}: "
                "run the unpack step")

    # Attribute names: checked against nixery's rule and against each other.
    attrs = {}
    seen = {}
    for name in sorted(packages):
        a = attr_name(name)
        if not ATTR_RE.match(a):
            die(f"{name}: attribute name {a} does not match {ATTR_RE.pattern}")
        if a in RESERVED_ATTRS:
            die(f"{name}: attribute name {a} is taken by the set itself (pkgs.{a})")
        if a in seen:
            die(f"{name} and {seen[a]} both map to the attribute name {a}")
        seen[a] = name
        attrs[name] = a

    nodes = sorted(packages)
    edges = {n: [d for d in packages[n]["depends"] if d in packages] for n in nodes}
    comps = sccs_of(nodes, edges)
    comp_of = {}
    for i, comp in enumerate(comps):
        for n in comp:
            comp_of[n] = i
    comp_deps = []
    for i, comp in enumerate(comps):
        ds = {comp_of[d] for n in comp for d in edges[n]} - {i}
        comp_deps.append(sorted(ds, key=lambda j: comps[j][0]))

    # Names of the components inside the expression: the representative's attribute, quoted
    # where Nix would not read it as an identifier (`0ad`, `or`).
    var = [nix_attr(attrs[c[0]]) for c in comps]
    names = [store_name(c[0], packages[c[0]]["version"]) for c in comps]

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    # nixery evaluates a package set restricted to its own directory and the store: the set gets
    # its own copy of nix/offline-pkgs (for busybox), and names the unpacked trees by store path.
    offline_src = os.path.join(args.repo, "nix", "offline-pkgs")
    os.makedirs(os.path.join(out, "offline-pkgs"), exist_ok=True)
    for f in sorted(os.listdir(offline_src)):
        with open(os.path.join(offline_src, f)) as src:
            write_if_changed(os.path.join(out, "offline-pkgs", f), src.read())
    trees = {}
    for n in packages:
        deb_name = "deb-" + store_name(n, packages[n]["version"])
        sha = stamps[n]["nar_sha256"]
        trees[n] = (source_store_path(deb_name, sha), os.path.join(args.cache, "unpacked", n),
                    deb_name, sha)
    import_trees([trees[n] for n in sorted(trees)])

    pinned = closure["pinned"]
    lines = []
    w = lines.append
    w("# Generated by bench/layering/universe: do not edit, run it again.")
    w("#")
    w(f"# {len(packages)} Debian bookworm packages ({closure['architecture']}): the Depends and "
      f"Pre-Depends closure of the")
    w(f"# {len(pinned)} packages of bench/layering/{closure.get('packages_file', 'packages.txt')} "
      f"at APT's candidate versions, as "
      f"{len(comps)} derivations:")
    w("# one per strongly connected component of the dependency graph, holding the files of its")
    w("# packages (their .debs unpacked) and listing the components it depends on in")
    w("# $out/nix-support/debian-dependencies, so they are its runtime references.")
    w("# Every Debian package is an attribute (`+` written `p`, `.` written `_`); `busybox` is")
    w("# nix/offline-pkgs' (nixery builds images with it), copied into ./offline-pkgs. The")
    w("# unpacked .debs are named by store path (bench/layering/universe puts them there), so")
    w("# that nixery's restricted evaluation, which reads only this directory and the store,")
    w("# evaluates the set.")
    w("{ system ? builtins.currentSystem, ... }:")
    w("")
    w("let")
    w("  offline = import ./offline-pkgs { inherit system; };")
    w("  inherit (offline) busybox;")
    w("")
    w("  # An unpacked .deb, already in the store.")
    w("  deb = builtins.storePath;")
    w("")
    w("  # One component: its packages' trees copied in order (a later file wins), and the")
    w("  # components it depends on written down, so that they are references of the output.")
    w("  component = name: debs: deps: derivation {")
    w("    inherit name system debs;")
    w("    debianDependencies = deps;")
    w('    builder = "${busybox}/bin/sh";')
    w('    PATH = "${busybox}/bin";')
    w("    args = [ \"-c\" ''")
    w("      set -eu")
    w('      mkdir "$out"')
    w("      for d in $debs; do")
    w("        # The build user cannot give files the store's owner; Nix resets owners anyway.")
    w('        if ! cp -a "$d/." "$out/" 2>cp.err; then cat cp.err >&2; exit 1; fi')
    w("        grep -v \"can't preserve ownership\" cp.err >&2 || :")
    w('        chmod -R u+w "$out"')
    w("      done")
    w('      mkdir -p "$out/nix-support"')
    w('      for d in $debianDependencies; do echo "$d"; done > "$out/nix-support/debian-dependencies"')
    w("    '' ];")
    w("  };")
    w("")
    w("  c = {")
    for i, comp in enumerate(comps):
        debs = " ".join(f"(deb \"{trees[n][0]}\")" for n in comp)
        deps = " ".join(f"c.{var[j]}" for j in comp_deps[i])
        w(f"    {var[i]} = component {nix_string(names[i])}")
        w(f"      [ {debs} ]")
        w(f"      [ {deps} ];" if deps else "      [ ];")
    w("  };")
    w("in")
    w("{")
    w("  inherit busybox;")
    for name in sorted(packages, key=lambda n: attrs[n]):
        w(f"  {nix_attr(attrs[name])} = c.{var[comp_of[name]]};")
    w("}")
    write_if_changed(os.path.join(out, "default.nix"), "\n".join(lines) + "\n")

    write_if_changed(os.path.join(out, "top-level.txt"), "".join(f"{attrs[n]}\n" for n in pinned))

    universe = {
        "architecture": closure["architecture"],
        "packages": len(packages),
        "components": len(comps),
        "download_bytes": sum(p["size"] for p in packages.values()),
        "installed_size_kib": sum(p["installed_size_kib"] for p in packages.values()),
        "nar_bytes": sum(s["nar_size"] for s in stamps.values()),
        "pinned": [attrs[n] for n in pinned],
        "virtuals": closure["virtuals"],
        "unsatisfied": closure["unsatisfied"],
        "sccs": [
            {
                "name": names[i],
                "members": comp,
                "attributes": [attrs[n] for n in comp],
                "versions": {n: packages[n]["version"] for n in comp},
                "installed_size_kib": sum(packages[n]["installed_size_kib"] for n in comp),
                "download_bytes": sum(packages[n]["size"] for n in comp),
                "nar_bytes": sum(stamps[n]["nar_size"] for n in comp),
                "depends": [names[j] for j in comp_deps[i]],
                "skipped_files": {n: stamps[n]["skipped"] for n in comp if stamps[n]["skipped"]},
                "hard_links_made_symlinks": {n: stamps[n]["hard_links"] for n in comp
                                             if stamps[n]["hard_links"]},
            }
            for i, comp in enumerate(comps)
        ],
    }
    write_if_changed(os.path.join(out, "universe.json"),
                     json.dumps(universe, indent=1, sort_keys=True) + "\n")

    big = sorted((c for c in comps if len(c) > 1), key=lambda c: (-len(c), c))
    log(f"{len(packages)} packages in {len(comps)} components ({len(big)} with more than one "
        f"package); wrote {out}/default.nix")
    for c in big[:5]:
        log(f"  component of {len(c)}: {' '.join(c)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resolve")
    r.add_argument("--packages", required=True)
    r.add_argument("--cache", required=True)
    r.add_argument("--set", default="a")
    d = sub.add_parser("draw")
    d.add_argument("--seed", type=int, required=True)
    d.add_argument("--count", type=int, required=True)
    d.add_argument("--exclude")
    d.add_argument("--max-package-mb", type=float, default=150)
    d.add_argument("--max-total-mb", type=float, default=800)
    u = sub.add_parser("unpack")
    u.add_argument("--cache", required=True)
    u.add_argument("--set", default="a")
    u.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    g = sub.add_parser("generate")
    g.add_argument("--cache", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--repo", required=True)
    g.add_argument("--set", default="a")
    args = p.parse_args()
    {"resolve": cmd_resolve, "draw": cmd_draw, "unpack": cmd_unpack,
     "generate": cmd_generate}[args.cmd](args)


if __name__ == "__main__":
    main()
