# Shared by the scripts: install Debian packages that are missing.

# ensure_packages PKG... installs those of the Debian packages PKG that are not installed.
ensure_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}" >&2
  fi
}

# ensure_busybox installs Debian's busybox-static and copies it to
# /usr/local/lib/busybox-static/<system>/busybox, where nix/offline-pkgs imports it from: nixery's
# restricted evaluation lets Nix 2.8 read that file, and would have to let it read all of /usr/bin
# to import /usr/bin/busybox.
ensure_busybox() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  ensure_packages busybox-static
  local own
  own="/usr/local/lib/busybox-static/$(uname -m)-linux/busybox"
  if ! cmp -s /usr/bin/busybox "$own"; then
    $sudo install -D -m 0755 /usr/bin/busybox "$own"
  fi
}

# ensure_arm64 makes aarch64-linux images buildable on an x86_64 machine: Debian's
# qemu-user-static registered with binfmt_misc (the kernel then runs arm64 programs, and Nix
# builds aarch64-linux derivations when told `extra-platforms = aarch64-linux`), and Debian's arm64
# busybox-static where nix/offline-pkgs looks for it.
ensure_arm64() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  [ "$(uname -m)" = aarch64 ] && return 0
  ensure_packages qemu-user-static
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    $sudo mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    echo "registering qemu-aarch64 with binfmt_misc" >&2
    $sudo sh -c 'cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register'
  fi
  local busybox=/usr/local/lib/busybox-static/aarch64-linux/busybox
  if [ ! -x "$busybox" ]; then
    echo "fetching Debian's arm64 busybox-static into $busybox" >&2
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
      $sudo dpkg --add-architecture arm64
      $sudo apt-get update -q >&2
    fi
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q busybox-static:arm64 >&2)
    dpkg-deb -x "$tmp"/busybox-static_*_arm64.deb "$tmp/root"
    $sudo install -D -m 0755 "$tmp/root/bin/busybox" "$busybox"
    rm -rf "$tmp"
  fi
}
