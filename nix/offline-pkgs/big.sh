# big.sh: builds the `big` package of nix/offline-pkgs, $sizeMiB MiB of deterministic,
# incompressible data in $out/share/big/data.bin. Sourced by the builder (busybox sh, set -eu,
# PATH = busybox's bin directory, the build directory as working directory); uses only busybox.
#
# 1. A 1 MiB base block B in counter mode: the SHA-512 digests of the 16384 distinct lines
#    "nix/offline-pkgs big <i>", one small file each so that a single sha512sum process hashes
#    them all (one process per digest would take minutes).
# 2. Output block k (k = 0 .. sizeMiB-1) is B rotated by a block-specific offset, with every byte
#    mapped through a block-specific permutation of 0..255 (`tr`; the permutations come from a
#    Fisher-Yates shuffle with busybox awk's seeded rand()).
# Any 32 KiB window (gzip's) is pseudo-random, and no long byte string repeats anywhere in the file,
# not even far apart, so long-range compressors (xz, zstd --long) find nothing either. About 2 s.

blocks=${sizeMiB:-64}
digests=16384 # 16384 * 64 bytes = 1 MiB

mkdir counter
awk -v n=$digests 'BEGIN {
  for (i = 0; i < n; i++) {
    f = sprintf("counter/%05d", i)
    print "nix/offline-pkgs big " i > f
    close(f)
  }
}'
# The glob is sorted, and the zero-padded names sort in counter order.
sha512sum counter/* | cut -c1-128 | xxd -r -p > base.bin
rm -r counter
[ "$(wc -c < base.bin)" -eq 1048576 ] || { echo "big.sh: base block has the wrong size" >&2; exit 1; }

# One byte permutation per output block, as `tr` octal escapes, one line each.
awk -v n=$blocks 'BEGIN {
  for (k = 0; k < n; k++) {
    srand(1000003 + k)
    for (i = 0; i < 256; i++) p[i] = i
    for (i = 255; i > 0; i--) { j = int(rand() * (i + 1)); t = p[i]; p[i] = p[j]; p[j] = t }
    s = ""
    for (i = 0; i < 256; i++) s = s sprintf("\\%03o", p[i])
    print s
  }
}' > perms
identity=$(awk 'BEGIN { for (i = 0; i < 256; i++) printf "\\%03o", i }')

mkdir -p "$out/share/big"
k=0
while [ $k -lt $blocks ]; do
  perm=$(sed -n "$((k + 1))p" perms)
  offset=$(((k * 40503 + 977) * 61 % 1048576))
  { tail -c +$((offset + 1)) base.bin; head -c $offset base.bin; } | tr "$identity" "$perm"
  k=$((k + 1))
done > "$out/share/big/data.bin"

size=$(wc -c < "$out/share/big/data.bin")
[ "$size" -eq $((blocks * 1048576)) ] || { echo "big.sh: data.bin is $size bytes" >&2; exit 1; }
cat > "$out/share/big/README" <<EOF
data.bin: $size bytes of deterministic pseudo-random data from nix/offline-pkgs (big.sh), for
testing large layers. It does not compress (gzip output is slightly larger than the input).
EOF
