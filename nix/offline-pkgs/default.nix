# offline-pkgs: a small Nix package set built from nothing but Debian's busybox-static.
#
# nixery normally serves images built from nixpkgs, which cannot be fetched on a machine without
# network access. This set is an offline stand-in for it: `import ./nix/offline-pkgs { }` takes the
# same arguments as `import <nixpkgs> { }` (`system`, and anything else is ignored) and yields an
# attribute set of real derivations with nixpkgs' attribute names (busybox, hello, bashInteractive,
# coreutils, curl, xorg.xev, haskellPackages.shellcheck, _1password, ...). Most of them are small
# shell-script stand-ins around busybox, so the tests and the demo can build and serve images with
# no network. It is also the worked example of a private package set (NIXERY_PKGS_PATH pointing at
# a directory with a default.nix).
#
# How it is built:
#   * The only thing taken from outside /nix/store is the busybox-static binary, imported once with
#     builtins.path at evaluation time from /usr/local/lib/busybox-static/<system>/busybox, or for
#     the system evaluating, when that is missing, from /usr/bin/busybox (Debian's
#     busybox-static package). scripts/lib.sh's ensure_busybox puts the host's busybox in the
#     first place, where nixery's restricted evaluation can import it under Nix 2.8 too (2.8
#     refuses to import from /usr/bin unless all of /usr/bin may be read), and ensure_arm64 puts
#     Debian's arm64 one beside it. For another system than the one evaluating (`system =
#     "aarch64-linux"` on an x86_64 machine) the packages are real aarch64 programs, built by
#     that busybox under emulation (`extra-platforms`), by a remote builder, or on an arm64
#     machine. Both places give the same store path: only the file's bytes and name count.
#     Every builder is that busybox's shell and reads nothing outside /nix/store and its own build
#     directory (no /bin, /usr, /etc, /dev/urandom).
#   * There is no stdenv: every package is a plain `derivation` made by `mkPackage` below.
#   * Every output is deterministic (`nix-build --check` passes), and every script's shebang is an
#     absolute store path (`#!/nix/store/...-busybox/bin/sh`), so images need no /bin/sh.
#   * Runtime references are real: scripts name their dependencies' store paths, and
#     $out/nix-support/runtime-dependencies lists the rest (glibc, openssl, cacert stand-ins), so
#     `nix-store -qR` shows closures shaped like nixpkgs' ones and images share store paths.
#   * `big` is 64 MiB of deterministic, incompressible data (see big.sh); `failing` never builds.
{ system ? builtins.currentSystem, ... }:

let
  # The static busybox binary, alone in a store directory. It has to be imported from a directory
  # (not /bin/busybox itself) so that it keeps the file name "busybox": busybox picks its applet
  # from argv[0]'s base name. /usr/bin is used because /bin is a symlink to usr/bin on Debian.
  busyboxStatic =
    let
      native = system == builtins.currentSystem;
      own = /. + "/usr/local/lib/busybox-static/${system}";
      dir = if native && !builtins.pathExists (own + "/busybox") then /usr/bin else own;
      install =
        if native then "apt-get install busybox-static, and under Nix 2.8 copy it to ${toString own}/busybox; scripts/lib.sh's ensure_busybox does both"
        else "apt-get download busybox-static:<arch> and put its bin/busybox there; scripts/lib.sh's ensure_arm64 does it for aarch64-linux";
    in
    if !builtins.pathExists (dir + "/busybox")
    then throw "nix/offline-pkgs needs ${toString dir}/busybox for ${system} (Debian: ${install})"
    else builtins.path {
      path = dir;
      name = "busybox-static";
      filter = path: type: baseNameOf path == "busybox";
    };

  cpu = builtins.head (builtins.split "-" system);
  gnuTriple = "${cpu}-pc-linux-gnu";

  # A derivation whose builder is `shell` running `buildCommand` with `set -eu`. Every attribute
  # that is not special below becomes an environment variable of the build, as with `derivation`.
  #
  #   scripts      { NAME = TEXT; }  each becomes $out/bin/NAME, mode 0555, with a
  #                                  `#!<busybox>/bin/sh` line put in front of TEXT
  #   links        { NAME = TARGET; } each becomes the symlink $out/bin/NAME -> TARGET
  #   runtimeDeps  [ drv ... ]        store paths written to $out/nix-support/runtime-dependencies,
  #                                   so they are runtime references of the output
  #   meta         { ... }            kept on the result (not passed to the builder)
  mkPackageWith = { shell, shellArgs, path }:
    { pname
    , version ? null
    , buildCommand ? ""
    , scripts ? { }
    , links ? { }
    , runtimeDeps ? [ ]
    , meta ? { }
    , ...
    }@attrs:
    let
      name = if version == null then pname else "${pname}-${version}";
      scriptNames = builtins.attrNames scripts;
      linkNames = builtins.attrNames links;
      # Script texts travel as environment variables script_0, script_1, ... (names like `[` or
      # `sha256sum` need not be valid variable names).
      scriptVars = builtins.listToAttrs (builtins.genList
        (i: {
          name = "script_${toString i}";
          value = "#!${busybox}/bin/sh\n" + scripts.${builtins.elemAt scriptNames i};
        })
        (builtins.length scriptNames));
      prelude = ''
        set -eu
        mkdir -p "$out"
        if [ -n "$scriptNames$linkNames" ]; then mkdir -p "$out/bin"; fi
        i=0
        for n in $scriptNames; do
          eval "printf '%s' \"\$script_$i\"" > "$out/bin/$n"
          chmod 0555 "$out/bin/$n"
          i=$((i + 1))
        done
        set -- $linkTargets
        for n in $linkNames; do
          ln -s "$1" "$out/bin/$n"
          shift
        done
        if [ -n "$runtimeDeps" ]; then
          mkdir -p "$out/nix-support"
          for d in $runtimeDeps; do echo "$d"; done > "$out/nix-support/runtime-dependencies"
        fi
      '';
      drv = derivation (removeAttrs attrs [ "scripts" "links" "meta" "version" "buildCommand" ] // scriptVars // {
        inherit name system;
        builder = shell;
        args = shellArgs ++ [ "-c" (prelude + buildCommand) ];
        PATH = path;
        scriptNames = toString scriptNames;
        linkNames = toString linkNames;
        linkTargets = toString (map (n: links.${n}) linkNames);
        runtimeDeps = toString runtimeDeps;
      } // (if version == null then { } else { inherit version; }));
    in
    drv // {
      meta = { offlineStandIn = true; } // meta;
    };

  # Builds with the full busybox package (builder ${busybox}/bin/sh, PATH its bin directory).
  mkPackage = mkPackageWith {
    shell = "${busybox}/bin/sh";
    shellArgs = [ ];
    path = "${busybox}/bin";
  };

  # The licenses of the packages' `meta`, as nixpkgs' lib.licenses spells them (what an image's
  # SBOM reports; `meta` is not passed to builders, so it changes no derivation).
  licenses = {
    gpl2Only = { spdxId = "GPL-2.0-only"; shortName = "gpl2Only"; fullName = "GNU General Public License v2.0 only"; };
    gpl3Plus = { spdxId = "GPL-3.0-or-later"; shortName = "gpl3Plus"; fullName = "GNU General Public License v3.0 or later"; };
    curl = { spdxId = "curl"; shortName = "curl"; fullName = "curl License"; };
    unfree = { shortName = "unfree"; fullName = "Unfree"; free = false; };
  };

  # A plain text file in the store.
  writeText = name: text: derivation {
    inherit name system text;
    builder = "${busybox}/bin/sh";
    args = [ "-c" ''printf '%s' "$text" > "$out"'' ];
    PATH = "${busybox}/bin";
  };

  # nixpkgs-style `runCommand name env command`.
  runCommand = name: env: buildCommand: mkPackage (env // { pname = name; inherit buildCommand; });

  # Marks a package as linked against the shared-library stand-ins.
  libDeps = [ glibc ];

  # ---------------------------------------------------------------------------------------------
  # The packages.

  # The full busybox: the static binary plus a symlink for every applet. Everything else is built
  # with it and refers to it, so it is in (almost) every closure.
  busybox = mkPackageWith
    {
      shell = "${busyboxStatic}/busybox";
      shellArgs = [ "sh" ];
      path = "/path-not-set";
    }
    {
      pname = "busybox";
      bb = "${busyboxStatic}/busybox";
      buildCommand = ''
        # A dynamically linked busybox (Debian's `busybox` package) would need the host's libc.
        if grep -aqE '/lib(64)?/ld-(linux|musl)' "$bb"; then
          echo "offline-pkgs: $bb has a program interpreter: install Debian's busybox-static" >&2
          exit 1
        fi
        mkdir -p "$out/bin"
        cp "$bb" "$out/bin/busybox"
        chmod 0555 "$out/bin/busybox"
        for applet in $("$out/bin/busybox" --list); do
          [ "$applet" = busybox ] || ln -s busybox "$out/bin/$applet"
        done
      '';
      meta.description = "BusyBox (Debian's busybox-static binary) with a symlink for every applet";
      meta.license = licenses.gpl2Only;
      meta.homepage = "https://busybox.net";
    };

  # Shared-library stand-ins: no real libraries, but store paths that many packages reference, as
  # in nixpkgs, so that images built from this set share store paths (and layers).
  glibc = mkPackage {
    pname = "glibc";
    version = "2.38";
    buildCommand = ''
      mkdir -p "$out/lib" "$out/share/doc/glibc"
      for f in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 ld-linux-offline.so.2; do
        printf 'offline stand-in for %s (nix/offline-pkgs): not a real library\n' "$f" > "$out/lib/$f"
      done
      ln -s libc.so.6 "$out/lib/libc.so"
      echo "glibc stand-in from nix/offline-pkgs; programs here are busybox-static based." \
        > "$out/share/doc/glibc/README"
    '';
    meta.description = "Offline stand-in for the GNU C library (placeholder files under lib/)";
  };

  openssl = mkPackage {
    pname = "openssl";
    version = "3.0.12";
    runtimeDeps = libDeps;
    scripts.openssl = ''
      # openssl stand-in (nix/offline-pkgs): only `version` and `dgst` work.
      case "''${1:-}" in
        version) echo "OpenSSL 3.0.12-offline 24 Oct 2023 (busybox stand-in)" ;;
        dgst)
          shift
          alg=sha256
          case "''${1:-}" in -md5|-sha1|-sha256|-sha512) alg=''${1#-}; shift ;; esac
          exec ${busybox}/bin/''${alg}sum "$@"
          ;;
        *) echo "openssl (offline stand-in): only 'version' and 'dgst' are supported" >&2; exit 1 ;;
      esac
    '';
    buildCommand = ''
      mkdir -p "$out/lib" "$out/etc/ssl"
      for f in libssl.so.3 libcrypto.so.3; do
        printf 'offline stand-in for %s (nix/offline-pkgs): not a real library\n' "$f" > "$out/lib/$f"
      done
      echo "# openssl.cnf (offline stand-in)" > "$out/etc/ssl/openssl.cnf"
    '';
    meta.description = "Offline stand-in for OpenSSL (placeholder libraries, a tiny bin/openssl)";
  };

  hello = mkPackage {
    pname = "hello";
    version = "2.12.1";
    runtimeDeps = libDeps;
    scripts.hello = ''
      # GNU hello stand-in (nix/offline-pkgs).
      case "''${1:-}" in
        --version|-v) echo "hello (GNU Hello) 2.12.1-offline"; exit 0 ;;
        --help|-h) echo "Usage: hello [--version]"; echo "Print a friendly greeting."; exit 0 ;;
      esac
      echo 'Hello, world!'
    '';
    meta.description = "Prints 'Hello, world!' (stand-in for GNU hello)";
    meta.license = licenses.gpl3Plus;
    meta.homepage = "https://www.gnu.org/software/hello/";
  };

  bashInteractive = mkPackage {
    pname = "bash-interactive";
    version = "5.2";
    runtimeDeps = libDeps;
    scripts.bash = ''
      # bash stand-in (nix/offline-pkgs): busybox's ash, which runs most simple bash scripts.
      case "''${1:-}" in
        --version)
          echo "GNU bash, version 5.2.0(1)-release-offline (${gnuTriple}) (busybox ash stand-in)"
          exit 0
          ;;
        --norc|--noprofile|--noediting) shift ;;
        --login) shift; set -- -l "$@" ;;
      esac
      exec ${busybox}/bin/sh "$@"
    '';
    # busybox picks the applet from the name it is run as, so bin/sh -> <busybox>/bin/sh is ash.
    links.sh = "${busybox}/bin/sh";
    meta.description = "Stand-in for bash: runs busybox's shell (ash)";
  };

  # GNU coreutils' program names. Those busybox has become symlinks to it (it dispatches on the
  # name it is run as); a few others are small scripts.
  coreutilsNames = [
    "[" "arch" "b2sum" "base32" "base64" "basename" "basenc" "cat" "chcon" "chgrp" "chmod"
    "chown" "chroot" "cksum" "comm" "cp" "csplit" "cut" "date" "dd" "df" "dir" "dircolors"
    "dirname" "du" "echo" "env" "expand" "expr" "factor" "false" "fmt" "fold" "groups" "head"
    "hostid" "id" "install" "join" "kill" "link" "ln" "logname" "ls" "md5sum" "mkdir" "mkfifo"
    "mknod" "mktemp" "mv" "nice" "nl" "nohup" "nproc" "numfmt" "od" "paste" "pathchk" "pinky"
    "pr" "printenv" "printf" "ptx" "pwd" "readlink" "realpath" "rm" "rmdir" "runcon" "seq"
    "sha1sum" "sha224sum" "sha256sum" "sha384sum" "sha512sum" "shred" "shuf" "sleep" "sort"
    "split" "stat" "stdbuf" "stty" "sum" "sync" "tac" "tail" "tee" "test" "timeout" "touch" "tr"
    "true" "truncate" "tsort" "tty" "uname" "unexpand" "uniq" "unlink" "uptime" "users" "vdir"
    "wc" "who" "whoami" "yes"
  ];

  coreutils = mkPackage {
    pname = "coreutils";
    version = "9.3";
    runtimeDeps = libDeps ++ [ openssl ];
    names = toString coreutilsNames;
    scripts = {
      install = ''
        # install stand-in (nix/offline-pkgs): -d, -D, -m MODE, -o/-g ignored, -t DIR.
        PATH=${busybox}/bin
        mode=0755 dirs=0 mkparents=0 target=
        while [ $# -gt 0 ]; do
          case "$1" in
            -d|--directory) dirs=1 ;;
            -D) mkparents=1 ;;
            -m) mode=$2; shift ;;
            -m*) mode=''${1#-m} ;;
            --mode=*) mode=''${1#--mode=} ;;
            -o|-g) shift ;;
            -t) target=$2; shift ;;
            --target-directory=*) target=''${1#--target-directory=} ;;
            -c|-s|-p|-v|-C) ;;
            --) shift; break ;;
            -*) echo "install (offline stand-in): unsupported option $1" >&2; exit 1 ;;
            *) break ;;
          esac
          shift
        done
        if [ $dirs = 1 ]; then
          for d in "$@"; do mkdir -p "$d" && chmod "$mode" "$d" || exit 1; done
          exit 0
        fi
        if [ -z "$target" ]; then
          if [ $# -lt 2 ]; then echo "install: missing destination file operand" >&2; exit 1; fi
          eval "target=\''${$#}"
          if [ $# -eq 2 ] && [ ! -d "$target" ]; then
            [ $mkparents = 1 ] && mkdir -p "$(dirname "$target")"
            cp "$1" "$target" && chmod "$mode" "$target"
            exit $?
          fi
          n=$(($# - 1)); i=0
          for a in "$@"; do i=$((i + 1)); [ $i -le $n ] && set -- "$@" "$a"; done
          shift $(($n + 1))
        fi
        [ $mkparents = 1 ] && mkdir -p "$target"
        for f in "$@"; do
          cp "$f" "$target/$(basename "$f")" && chmod "$mode" "$target/$(basename "$f")" || exit 1
        done
      '';
      nohup = ''
        # nohup stand-in (nix/offline-pkgs).
        trap "" HUP
        exec "$@"
      '';
      printenv = ''
        # printenv stand-in (nix/offline-pkgs).
        if [ $# -eq 0 ]; then exec ${busybox}/bin/env; fi
        rc=0
        for v in "$@"; do
          case "$v" in ""|[0-9]*|*[!A-Za-z0-9_]*) rc=1; continue ;; esac
          if eval "[ -n \"\''${$v+x}\" ]"; then eval "printf '%s\n' \"\$$v\""; else rc=1; fi
        done
        exit $rc
      '';
      nice = ''
        # nice stand-in (nix/offline-pkgs): runs the command without changing its niceness.
        case "''${1:-}" in
          -n) shift 2 ;;
          -n*|-[0-9]*|--adjustment=*) shift ;;
        esac
        if [ $# -eq 0 ]; then echo 0; exit 0; fi
        exec "$@"
      '';
    };
    buildCommand = ''
      have=" $(busybox --list | tr '\n' ' ') "
      for n in $names; do
        [ -e "$out/bin/$n" ] && continue
        case "$have" in
          *" $n "*) ln -s "${busybox}/bin/busybox" "$out/bin/$n" ;;
        esac
      done
    '';
    meta.description = "Stand-in for GNU coreutils: busybox applets under coreutils' names";
  };

  moreutils = mkPackage {
    pname = "moreutils";
    version = "0.67";
    runtimeDeps = libDeps;
    scripts = {
      sponge = ''
        # sponge stand-in (nix/offline-pkgs): soak up standard input, then write it out.
        PATH=${busybox}/bin
        append=0
        if [ "''${1:-}" = -a ]; then append=1; shift; fi
        if [ $# -eq 0 ]; then
          # No file: keep it in memory (there may be no /tmp in a container).
          data=$(cat; echo x) || exit 1
          printf '%s' "''${data%x}"
          exit 0
        fi
        file=$1
        tmp=$(mktemp "$file.sponge.XXXXXX") || exit 1
        trap 'rm -f "$tmp"' EXIT
        cat > "$tmp" || exit 1
        if [ $append = 1 ]; then cat "$tmp" >> "$file"; else cat "$tmp" > "$file"; fi
      '';
      chronic = ''
        # chronic stand-in (nix/offline-pkgs): show a command's output only if it fails.
        out=$("$@" 2>&1)
        rc=$?
        if [ $rc -ne 0 ] && [ -n "$out" ]; then printf '%s\n' "$out"; fi
        exit $rc
      '';
      ifne = ''
        # ifne stand-in (nix/offline-pkgs): run the command only if standard input is not empty.
        PATH=${busybox}/bin
        invert=0
        if [ "''${1:-}" = -n ]; then invert=1; shift; fi
        data=$(cat; echo x)
        data=''${data%x}
        if [ -n "$data" ]; then
          [ $invert = 1 ] && { printf '%s' "$data"; exit 0; }
          printf '%s' "$data" | "$@"
        else
          [ $invert = 1 ] && exec "$@"
          exit 0
        fi
      '';
    };
    # busybox has a `ts` applet with moreutils' behaviour (ts [-is] [FORMAT]).
    links.ts = "${busybox}/bin/busybox";
    meta.description = "Stand-in for moreutils: sponge, ts, chronic, ifne";
  };

  nano = mkPackage {
    pname = "nano";
    version = "7.2";
    runtimeDeps = libDeps;
    scripts.nano = ''
      # nano stand-in (nix/offline-pkgs): opens busybox vi.
      case "''${1:-}" in
        --version|-V) echo " GNU nano, version 7.2-offline (busybox vi stand-in)"; exit 0 ;;
      esac
      exec ${busybox}/bin/vi "$@"
    '';
    meta.description = "Stand-in for GNU nano: runs busybox vi";
  };

  # What nixery's `builder` meta-package brings: a setup script and the usual build tools.
  stdenvTools = [
    "awk" "bunzip2" "bzip2" "cmp" "diff" "egrep" "fgrep" "find" "grep" "gunzip" "gzip" "patch"
    "sed" "tar" "unxz" "unzip" "xargs" "xz" "xzcat" "zcat"
  ];

  stdenv = mkPackage {
    pname = "stdenv-linux";
    runtimeDeps = [ coreutils bashInteractive ];
    tools = toString stdenvTools;
    buildCommand = ''
      mkdir -p "$out/bin"
      for t in $tools; do ln -s "${busybox}/bin/busybox" "$out/bin/$t"; done
      ln -s "${bashInteractive}/bin/bash" "$out/bin/bash"
      cat > "$out/setup" <<EOF
      # stdenv setup (nix/offline-pkgs stand-in). Source it from a POSIX shell.
      export SHELL=${bashInteractive}/bin/bash
      export PATH="$out/bin:${coreutils}/bin:${busybox}/bin\''${PATH:+:\$PATH}"
      export NIX_ENFORCE_PURITY=0
      runHook() { :; }
      genericBuild() {
        echo "genericBuild: offline stand-in stdenv; there is no compiler here" >&2
        return 1
      }
      EOF
    '';
    meta.description = "Stand-in for stdenv: a setup script plus the usual build tools from busybox";
  };

  cacert = mkPackage {
    pname = "nss-cacert";
    version = "3.95";
    buildCommand = ''
      mkdir -p "$out/etc/ssl/certs"
      cat > "$out/etc/ssl/certs/ca-bundle.crt" <<'EOF'
      ##
      ## ca-bundle.crt: OFFLINE STAND-IN from nix/offline-pkgs.
      ##
      ## This file contains NO certificates. It only stands in for nixpkgs' cacert (the Mozilla
      ## CA bundle) so that images built without network access have the usual path
      ## /etc/ssl/certs/ca-bundle.crt. TLS verification against it will fail.
      ##
      EOF
      ln -s ca-bundle.crt "$out/etc/ssl/certs/ca-certificates.crt"
    '';
    meta.description = "Offline stand-in for the Mozilla CA bundle (contains no certificates)";
  };

  iana-etc = mkPackage {
    pname = "iana-etc";
    version = "20231117";
    buildCommand = ''
      mkdir -p "$out/etc"
      cp "$servicesPath" "$out/etc/services"
      cp "$protocolsPath" "$out/etc/protocols"
    '';
    passAsFile = [ "services" "protocols" ];
    services = ''
      # /etc/services: a small excerpt of the IANA Service Name and Transport Protocol Port Number
      # Registry (nix/offline-pkgs stand-in for iana-etc).
      tcpmux            1/tcp
      echo              7/tcp
      echo              7/udp
      discard           9/tcp     sink null
      discard           9/udp     sink null
      daytime          13/tcp
      daytime          13/udp
      ftp-data         20/tcp
      ftp              21/tcp
      ssh              22/tcp
      telnet           23/tcp
      smtp             25/tcp     mail
      time             37/tcp     timserver
      time             37/udp     timserver
      whois            43/tcp     nicname
      domain           53/tcp
      domain           53/udp
      bootps           67/udp
      bootpc           68/udp
      tftp             69/udp
      gopher           70/tcp
      finger           79/tcp
      http             80/tcp     www
      http             80/udp     www
      kerberos         88/tcp     kerberos5 krb5
      kerberos         88/udp     kerberos5 krb5
      pop3            110/tcp     pop-3
      sunrpc          111/tcp     portmapper
      sunrpc          111/udp     portmapper
      nntp            119/tcp     readnews untp
      ntp             123/udp
      imap            143/tcp     imap2
      snmp            161/udp
      snmp-trap       162/udp     snmptrap
      bgp             179/tcp
      ldap            389/tcp
      https           443/tcp
      https           443/udp
      submissions     465/tcp     smtps
      syslog          514/udp
      submission      587/tcp
      ldaps           636/tcp
      rsync           873/tcp
      imaps           993/tcp
      pop3s           995/tcp
      mysql          3306/tcp
      postgresql     5432/tcp
      redis          6379/tcp
      http-alt       8080/tcp     webcache
    '';
    protocols = ''
      # /etc/protocols: a small excerpt of the IANA Assigned Internet Protocol Numbers registry
      # (nix/offline-pkgs stand-in for iana-etc).
      ip               0  IP          # internet protocol, pseudo protocol number
      hopopt           0  HOPOPT      # IPv6 Hop-by-Hop Option
      icmp             1  ICMP        # internet control message protocol
      igmp             2  IGMP        # Internet Group Management
      ipencap          4  IP-ENCAP    # IP encapsulated in IP
      tcp              6  TCP         # transmission control protocol
      egp              8  EGP         # exterior gateway protocol
      udp             17  UDP         # user datagram protocol
      ipv6            41  IPv6        # Internet Protocol, version 6
      ipv6-route      43  IPv6-Route  # Routing Header for IPv6
      ipv6-frag       44  IPv6-Frag   # Fragment Header for IPv6
      gre             47  GRE         # General Routing Encapsulation
      esp             50  IPSEC-ESP   # Encap Security Payload
      ah              51  IPSEC-AH    # Authentication Header
      ipv6-icmp       58  IPv6-ICMP   # ICMP for IPv6
      ipv6-nonxt      59  IPv6-NoNxt  # No Next Header for IPv6
      ipv6-opts       60  IPv6-Opts   # Destination Options for IPv6
      ospf            89  OSPFIGP     # Open Shortest Path First IGP
      pim            103  PIM         # Protocol Independent Multicast
      vrrp           112  VRRP        # Virtual Router Redundancy Protocol
      l2tp           115  L2TP        # Layer Two Tunneling Protocol
      sctp           132  SCTP        # Stream Control Transmission Protocol
      udplite        136  UDPLite     # UDP-Lite
      mpls-in-ip     137  MPLS-in-IP  # MPLS-in-IP
    '';
    meta.description = "/etc/services and /etc/protocols (a small excerpt of the IANA registries)";
  };

  curl = mkPackage {
    pname = "curl";
    version = "8.4.0";
    runtimeDeps = libDeps ++ [ openssl cacert ];
    scripts.curl = ''
      # curl stand-in (nix/offline-pkgs): translates common curl options to busybox wget.
      export SSL_CERT_FILE="''${SSL_CERT_FILE:-${cacert}/etc/ssl/certs/ca-bundle.crt}"
      case "''${1:-}" in
        -V|--version)
          echo "curl 8.4.0-offline (${gnuTriple}) busybox-wget"
          echo "Release-Date: 2023-10-11 (offline stand-in from nix/offline-pkgs, runs busybox wget)"
          echo "Protocols: ftp http https"
          echo "Features: offline-stand-in"
          exit 0
          ;;
        -h|--help)
          echo "Usage: curl [options...] <url>   (offline stand-in running busybox wget)"
          echo "Supported: -o FILE -O -s -S -f -L -k -v -H HDR -A UA -d DATA -m SECS -C - -I"
          exit 0
          ;;
      esac
      quiet=-q output=stdout
      n=$#
      while [ $n -gt 0 ]; do
        a=$1; shift; n=$((n - 1))
        case "$a" in
          -o|--output) set -- "$@" -O "$1"; shift; n=$((n - 1)); output=file ;;
          -O|--remote-name) output=remote ;;
          -s|--silent|-S|--show-error|-f|--fail|-L|--location|--compressed|-\#|--progress-bar|-sS|-fsSL|-sSL|-fsS|-fL|-sL|-fs) ;;
          -v|--verbose) quiet= ;;
          -k|--insecure) set -- "$@" --no-check-certificate ;;
          -H|--header) set -- "$@" --header "$1"; shift; n=$((n - 1)) ;;
          -A|--user-agent) set -- "$@" -U "$1"; shift; n=$((n - 1)) ;;
          -d|--data|--data-raw|--data-binary) set -- "$@" --post-data "$1"; shift; n=$((n - 1)) ;;
          -m|--max-time|--connect-timeout) set -- "$@" -T "$1"; shift; n=$((n - 1)) ;;
          -C|--continue-at) set -- "$@" -c; shift; n=$((n - 1)) ;;
          -I|--head) set -- "$@" --spider -S ;;
          -X|--request) shift; n=$((n - 1)) ;;
          -*) echo "curl (offline stand-in): option $a is not supported" >&2; exit 2 ;;
          *) set -- "$@" "$a" ;;
        esac
      done
      if [ $output = stdout ]; then set -- -O - "$@"; fi
      exec ${busybox}/bin/wget $quiet "$@"
    '';
    meta.description = "Stand-in for curl: translates common options to busybox wget";
    meta.license = licenses.curl;
    meta.homepage = "https://curl.se";
  };

  xorg = {
    recurseForDerivations = true;
    xev = mkPackage {
      pname = "xev";
      version = "1.2.5";
      runtimeDeps = libDeps;
      scripts.xev = ''
        # xev stand-in (nix/offline-pkgs).
        case "''${1:-}" in
          -version|--version) echo "xev 1.2.5-offline"; exit 0 ;;
        esac
        echo "xev (offline stand-in from nix/offline-pkgs): no X server here, no events to print."
      '';
      meta.description = "Stand-in for xorg.xev";
    };
  };

  haskellPackages = {
    recurseForDerivations = true;
    shellcheck = mkPackage {
      pname = "ShellCheck";
      version = "0.9.0";
      runtimeDeps = libDeps;
      scripts.shellcheck = ''
        # ShellCheck stand-in (nix/offline-pkgs): only checks syntax, with busybox sh -n.
        case "''${1:-}" in
          -V|--version)
            echo "ShellCheck - shell script analysis tool"
            echo "version: 0.9.0-offline"
            echo "license: GNU General Public License, version 3"
            echo "website: https://www.shellcheck.net (offline stand-in: syntax check only)"
            exit 0
            ;;
        esac
        rc=0
        for f in "$@"; do
          case "$f" in -*) continue ;; esac
          ${busybox}/bin/sh -n "$f" || rc=1
        done
        exit $rc
      '';
      meta.description = "Stand-in for ShellCheck: syntax check with busybox sh -n";
    };
  };

  _1password = mkPackage {
    pname = "1password-cli";
    version = "2.24.0";
    runtimeDeps = [ cacert ];
    scripts.op = ''
      # 1Password CLI stand-in (nix/offline-pkgs).
      case "''${1:-}" in
        -v|--version) echo "2.24.0-offline"; exit 0 ;;
      esac
      echo "op (offline stand-in from nix/offline-pkgs): no 1Password account is reachable offline." >&2
      exit 1
    '';
    meta.description = "Stand-in for the 1Password CLI (op)";
    meta.license = licenses.unfree;
  };

  # 64 MiB of deterministic, incompressible data: see big.sh.
  big = mkPackage {
    pname = "big";
    sizeMiB = "64";
    buildCommand = ''. ${./big.sh}'';
    meta.description = "64 MiB of deterministic pseudo-random data (share/big/data.bin)";
  };

  failing = mkPackage {
    pname = "failing";
    buildCommand = ''
      echo "failing: this package always fails to build (nix/offline-pkgs uses it to test build errors)" >&2
      exit 1
    '';
    meta.description = "A package whose build always fails";
  };
in
{
  inherit system;
  inherit mkPackage runCommand writeText;

  inherit busybox glibc openssl hello bashInteractive coreutils moreutils nano stdenv cacert
    iana-etc curl xorg haskellPackages _1password big failing;

  # nixpkgs spellings of the same packages.
  bash = bashInteractive;
  shellcheck = haskellPackages.shellcheck;
}
