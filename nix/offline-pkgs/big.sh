# big.sh: builds the `big` package of nix/offline-pkgs, $sizeMiB MiB of deterministic,
# incompressible data in $out/share/big/data.bin. Sourced by the builder (busybox sh, set -eu,
# PATH = busybox's bin directory, the build directory as working directory); uses only busybox.
#
# 1. A 256 KiB base block B in counter mode: the SHA-512 digests of the 4096 distinct lines
#    "nix/offline-pkgs big <i>". One sha512sum process hashes them all: it is given the two FIFOs
#    f0 f1 f0 f1 ... as its files, and a writer in the background sends line i through f(i%2).
#    Alternating keeps it in step (the writer's open of one FIFO waits until sha512sum has
#    finished the other), and is much faster than 4096 small files (file creation is slow on
#    some disks) or 4096 sha512sum processes.
# 2. Output block k (k = 0 .. 4*sizeMiB-1, 256 KiB each) is B rotated by a block-specific
#    offset, with every byte mapped through a block-specific permutation of 0..255 (`tr`; the
#    offsets and permutations come from busybox awk's rand() seeded with k: a Fisher-Yates
#    shuffle).
# Any 32 KiB window (gzip's) is pseudo-random, and no long byte string repeats anywhere in the
# file, so long-range compressors (xz, zstd --long) find nothing either. About a second.

digests=4096 # 4096 * 64 bytes = 256 KiB
blockSize=$((digests * 64))
blocks=$((${sizeMiB:-64} * 1048576 / blockSize))

# The writer and sha512sum run side by side as the two ends of a pipeline; nothing goes through
# the pipe itself. (A pipeline rather than `&`, because ash points a background job's standard
# input at /dev/null, and the builder is to touch nothing outside the store and its directory.)
mkfifo f0 f1
{
  i=0
  while [ $i -lt $digests ]; do
    echo "nix/offline-pkgs big $i" > f$((i % 2))
    i=$((i + 1))
  done
} | {
  sha512sum $(awk -v n=$digests 'BEGIN { for (i = 0; i < n; i++) print "f" (i % 2) }') \
    | cut -c1-128 | xxd -r -p > base.bin
}
[ "$(wc -c < base.bin)" -eq $blockSize ] || { echo "big.sh: the base block has the wrong size" >&2; exit 1; }

# The output, as a script with one line per block (sourcing it is much faster than the shell's
# `read`, which reads a byte at a time): each line cuts block k out of B+B at a random offset and
# maps it through a random byte permutation, given as `tr` octal escapes.
cat base.bin base.bin > double.bin
awk -v n=$blocks -v size=$blockSize 'BEGIN {
  for (i = 0; i < 256; i++) identity = identity sprintf("\\%03o", i)
  for (k = 0; k < n; k++) {
    srand(1000003 + k)
    for (i = 0; i < 256; i++) p[i] = i
    for (i = 255; i > 0; i--) { j = int(rand() * (i + 1)); t = p[i]; p[i] = p[j]; p[j] = t }
    perm = ""
    for (i = 0; i < 256; i++) perm = perm sprintf("\\%03o", p[i])
    printf "dd if=double.bin bs=%d count=1 skip=%d iflag=skip_bytes,fullblock status=none | tr %s %s\n",
      size, int(rand() * size), "\047" identity "\047", "\047" perm "\047"
  }
}' > blocks.sh

mkdir -p "$out/share/big"
. ./blocks.sh > "$out/share/big/data.bin"

size=$(wc -c < "$out/share/big/data.bin")
expected=$((blocks * blockSize))
[ "$size" -eq $expected ] || { echo "big.sh: data.bin is $size bytes, not $expected" >&2; exit 1; }
cat > "$out/share/big/README" <<EOF
data.bin: $size bytes of deterministic pseudo-random data from nix/offline-pkgs (big.sh), for
testing large layers. It does not compress (gzip output is slightly larger than the input).
EOF
