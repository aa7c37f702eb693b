//! Parallel compression of a layer's tarball: the stream is cut into fixed-size blocks, each
//! compressed on a worker thread into a unit of its own, a gzip member or a zstd frame, and the
//! units are written in order. A sequence of gzip members is one valid gzip file (RFC 1952 §2.2)
//! and a sequence of zstd frames one valid zstd stream (RFC 8878 §3.1), which every registry
//! client's reader decompresses whole; the independent blocks let one large layer use every
//! core, at the price of a dictionary reset per block (well under 1% on binaries, see
//! [`Codec::block_size`]). A block's unit depends only on its bytes and the codec, so the blob is
//! the same whatever the number of threads or blocks in flight.
//!
//! The workers are one pool for the whole process, a thread per core, shared by every layer being
//! packed in either format: layers packed side by side take turns on the same cores instead of
//! each starting threads of its own. Memory is bounded: each writer has at most a fixed number of
//! blocks in flight.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, LazyLock, Mutex};

use libdeflater::{CompressionLvl, Compressor};
use zstd::zstd_safe::CParameter;

/// Uncompressed bytes per gzip member.
const GZIP_BLOCK: usize = 1 << 20;

/// Uncompressed bytes per zstd frame. At level 3, frames of 4 MiB come within 0.5% of one zstd
/// stream of the whole tarball (`zstd -3`), where 1 MiB frames cost 1.8%, 2 MiB 1.0% and 8 MiB
/// 0.2% (measured on a 751 MB tar of /usr/lib/x86_64-linux-gnu): 4 MiB keeps the blocks in
/// flight small while losing little at the cuts.
const ZSTD_BLOCK: usize = 4 << 20;

/// How blocks are compressed: gzip members at a libdeflate level (1 fastest … 12 smallest), or
/// zstd frames at a zstd level (1 … 19).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Gzip(i32),
    Zstd(i32),
}

impl Codec {
    /// Uncompressed bytes per block: one member or frame.
    pub fn block_size(self) -> usize {
        match self {
            Codec::Gzip(_) => GZIP_BLOCK,
            Codec::Zstd(_) => ZSTD_BLOCK,
        }
    }
}

/// A block to compress, the buffer its unit is written into, how, and where to send both back.
struct Job {
    input: Vec<u8>,
    output: Vec<u8>,
    codec: Codec,
    reply: SyncSender<io::Result<Compressed>>,
}

/// A compressed block: its unit, and the block's buffer handed back for the writer to reuse.
/// Both buffers go round between a writer and the pool, so a block costs no allocation and its
/// unit no copy out of a worker's scratch buffer (that copy was 0.5% of packing's CPU time).
struct Compressed {
    input: Vec<u8>,
    unit: Vec<u8>,
}

/// The compression threads: one per core, for the life of the process.
static POOL: LazyLock<SyncSender<Job>> = LazyLock::new(|| {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (jobs, queue) = sync_channel::<Job>(2 * threads);
    let queue = Arc::new(Mutex::new(queue));
    for _ in 0..threads {
        let queue = queue.clone();
        std::thread::spawn(move || compress_jobs(&queue));
    }
    jobs
});

/// A pool thread's compressors, kept from one block to the next (a zstd context holds megabytes
/// of tables that are costly to set up for every block).
#[derive(Default)]
struct Compressors {
    gzip: Option<(CompressionLvl, Compressor)>,
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
}

impl Compressors {
    /// Compresses `input` into `output`, which is cleared first.
    fn compress(&mut self, input: &[u8], codec: Codec, output: &mut Vec<u8>) -> io::Result<()> {
        match codec {
            Codec::Gzip(level) => self.gzip(input, level, output),
            Codec::Zstd(level) => self.zstd(input, level, output),
        }
    }

    fn gzip(&mut self, input: &[u8], level: i32, output: &mut Vec<u8>) -> io::Result<()> {
        let level = gzip_level(level)?;
        let compressor = match &mut self.gzip {
            Some((current, compressor)) if *current == level => compressor,
            slot => &mut slot.insert((level, Compressor::new(level))).1,
        };
        output.resize(compressor.gzip_compress_bound(input.len()), 0);
        let n = compressor
            .gzip_compress(input, output)
            .map_err(|e| io::Error::other(format!("gzip: {e:?}")))?;
        output.truncate(n);
        Ok(())
    }

    fn zstd(&mut self, input: &[u8], level: i32, output: &mut Vec<u8>) -> io::Result<()> {
        let compressor = match &mut self.zstd {
            Some((current, compressor)) if *current == level => compressor,
            slot => {
                let mut compressor = zstd::bulk::Compressor::new(level)?;
                // As the zstd command line writes them: a checksum and the size in each frame.
                compressor.include_checksum(true)?;
                compressor.include_contentsize(true)?;
                if let Some((hash_log, chain_log)) = zstd_tables(level) {
                    compressor.set_parameter(CParameter::HashLog(hash_log))?;
                    compressor.set_parameter(CParameter::ChainLog(chain_log))?;
                }
                &mut slot.insert((level, compressor)).1
            }
        };
        // Written into the buffer's spare capacity: nothing to zero first.
        output.clear();
        output.reserve(zstd::zstd_safe::compress_bound(input.len()));
        compressor.compress_to_buffer(input, output)?;
        Ok(())
    }
}

/// The sizes of the match finder's two tables at `level` (log2 of their entries: hashLog and
/// chainLog), where they differ from libzstd's own. At level 3, the default, libzstd's tables for
/// inputs over 256 KB (2^17 and 2^16 entries of 4 bytes, 768 KB beside the 4 MiB block in a
/// core's cache) are halved: packing bench/run's 1.8 GB corpus then takes 13% less CPU time, for
/// frames 1.1% larger, 1.001× the size of `zstd -3` of the whole tarball (halving one table alone
/// costs 0.5% of size, a hash table a quarter the size 1.9%). Other levels keep libzstd's
/// tables: nothing here measured them.
pub fn zstd_tables(level: i32) -> Option<(u32, u32)> {
    (level == 3).then_some((16, 15))
}

fn gzip_level(level: i32) -> io::Result<CompressionLvl> {
    CompressionLvl::new(level)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "gzip level out of range"))
}

/// A pool thread: compresses blocks until the process ends.
fn compress_jobs(queue: &Mutex<Receiver<Job>>) {
    let mut compressors = Compressors::default();
    loop {
        let job = crate::sync::lock(queue).recv();
        let Ok(Job {
            input,
            mut output,
            codec,
            reply,
        }) = job
        else {
            return;
        };
        let result = compressors
            .compress(&input, codec, &mut output)
            .map(|()| Compressed {
                input,
                unit: output,
            });
        // The writer may be gone (an error elsewhere): nothing to do then.
        let _ = reply.send(result);
    }
}

/// A writer that compresses what it is given on the shared pool and writes it to `out`, with at
/// most `in_flight` blocks queued or compressing at a time.
pub struct ParallelWriter<W: Write> {
    out: W,
    codec: Codec,
    block_size: usize,
    block: Vec<u8>,
    in_flight: VecDeque<Receiver<io::Result<Compressed>>>,
    max_in_flight: usize,
    wrote_unit: bool,
    /// Buffers back from the pool, for the next blocks and units.
    spare_blocks: Vec<Vec<u8>>,
    spare_units: Vec<Vec<u8>>,
}

impl<W: Write> ParallelWriter<W> {
    /// A writer compressing with `codec`, keeping up to `in_flight` blocks in the pool at once.
    /// A level the codec does not have is refused here, before anything is written.
    pub fn new(out: W, codec: Codec, in_flight: usize) -> io::Result<Self> {
        match codec {
            Codec::Gzip(level) => {
                gzip_level(level)?;
            }
            Codec::Zstd(level) => {
                if !zstd::compression_level_range().contains(&level) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "zstd level out of range",
                    ));
                }
            }
        }
        Ok(ParallelWriter {
            out,
            codec,
            block_size: codec.block_size(),
            block: Vec::with_capacity(codec.block_size()),
            in_flight: VecDeque::new(),
            max_in_flight: in_flight.max(1),
            wrote_unit: false,
            spare_blocks: Vec::new(),
            spare_units: Vec::new(),
        })
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.in_flight.len() >= self.max_in_flight {
            self.write_oldest()?;
        }
        let next = self
            .spare_blocks
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.block_size));
        let input = std::mem::replace(&mut self.block, next);
        let (reply, result) = sync_channel(1);
        let job = Job {
            input,
            output: self.spare_units.pop().unwrap_or_default(),
            codec: self.codec,
            reply,
        };
        POOL.send(job)
            .map_err(|_| io::Error::other("the compression pool stopped"))?;
        self.in_flight.push_back(result);
        self.wrote_unit = true;
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(result) = self.in_flight.pop_front() {
            let Compressed { mut input, unit } = result
                .recv()
                .map_err(|_| io::Error::other("a compression worker stopped"))??;
            self.out.write_all(&unit)?;
            input.clear();
            self.spare_blocks.push(input);
            self.spare_units.push(unit);
        }
        Ok(())
    }

    /// Compresses what is left, writes every unit and returns the inner writer. An empty stream
    /// is one unit of nothing, so the blob is still a valid compressed file.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.block.is_empty() || !self.wrote_unit {
            self.submit()?;
        }
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for ParallelWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.block_size - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == self.block_size {
            self.submit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn unzstd(bytes: &[u8]) -> Vec<u8> {
        zstd::stream::decode_all(bytes).unwrap()
    }

    /// `input` compressed with `codec`, written in chunks of `chunk` bytes.
    fn compress(codec: Codec, input: &[u8], in_flight: usize, chunk: usize) -> Vec<u8> {
        let mut writer = ParallelWriter::new(Vec::new(), codec, in_flight).unwrap();
        for piece in input.chunks(chunk.max(1)) {
            writer.write_all(piece).unwrap();
        }
        writer.finish().unwrap()
    }

    fn gzip(input: &[u8], in_flight: usize) -> Vec<u8> {
        // Odd-sized writes, across block boundaries.
        compress(Codec::Gzip(6), input, in_flight, 77_777)
    }

    /// Bytes that compress somewhat, like binaries: a repeating pattern with noise.
    fn sample(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        (0..len)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if i % 3 == 0 {
                    state as u8
                } else {
                    (i * 7 % 251) as u8
                }
            })
            .collect()
    }

    #[test]
    fn members_decompress_to_the_input() {
        let input: Vec<u8> = (0..(3 * GZIP_BLOCK + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let compressed = gzip(&input, 3);
        assert_eq!(gunzip(&compressed), input);
        assert_eq!(
            compressed,
            gzip(&input, 1),
            "the number of blocks in flight changed the bytes"
        );
        // Writers at different levels share the pool without mixing up their levels.
        let fast = std::thread::spawn({
            let input = input.clone();
            move || compress(Codec::Gzip(1), &input, 4, input.len())
        });
        let small = gzip(&input, 4);
        let fast = fast.join().unwrap();
        assert_eq!(gunzip(&fast), input);
        assert_eq!(small, compressed);
    }

    #[test]
    fn empty_input_is_one_valid_member() {
        let compressed = gzip(&[], 2);
        assert!(!compressed.is_empty());
        assert!(gunzip(&compressed).is_empty());
    }

    #[test]
    fn the_system_gzip_reads_it() {
        let input: Vec<u8> = (0..(2 * GZIP_BLOCK + 5)).map(|i| (i % 13) as u8).collect();
        let compressed = gzip(&input, 2);
        assert_eq!(system_decompress("gzip", &compressed), input);
    }

    /// What `tool -dc` makes of `compressed`.
    fn system_decompress(tool: &str, compressed: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, compressed).unwrap();
        let out = std::process::Command::new(tool)
            .arg("-dc")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("{tool} cannot be run ({e}): apt-get install {tool}"));
        assert!(out.status.success(), "{tool} -dc failed");
        out.stdout
    }

    #[test]
    fn zstd_frames_decompress_to_the_input_whatever_the_blocks_in_flight() {
        let input = sample(2 * ZSTD_BLOCK + 54_321);
        let compressed = compress(Codec::Zstd(3), &input, 4, 77_777);
        assert_eq!(unzstd(&compressed), input);
        assert!(compressed.len() < input.len());
        // One block in flight is one compression at a time: what a one-core machine does.
        for (in_flight, chunk) in [(1, 1 << 20), (2, ZSTD_BLOCK), (8, 4093), (3, input.len())] {
            assert_eq!(
                compress(Codec::Zstd(3), &input, in_flight, chunk),
                compressed,
                "{in_flight} blocks in flight, writes of {chunk} bytes changed the bytes"
            );
        }
        // Three frames: one per whole block and the rest.
        let frames = zstd_frames(&compressed);
        assert_eq!(frames, 3);
        assert_eq!(system_decompress("zstd", &compressed), input);
    }

    /// How many frames `compressed` holds (each begins with zstd's magic number).
    fn zstd_frames(mut compressed: &[u8]) -> usize {
        let mut frames = 0;
        while !compressed.is_empty() {
            let size = zstd::zstd_safe::find_frame_compressed_size(compressed).unwrap();
            compressed = &compressed[size..];
            frames += 1;
        }
        frames
    }

    #[test]
    fn zstd_frames_carry_their_size_and_a_checksum() {
        let input = sample(ZSTD_BLOCK + 1000);
        let mut compressed = &compress(Codec::Zstd(3), &input, 2, 65_536)[..];
        while !compressed.is_empty() {
            // The frame header descriptor follows the 4-byte magic number (RFC 8878 §3.1.1.1.1):
            // bits 7-6 give the size of the content size field, bit 2 the checksum flag.
            let descriptor = compressed[4];
            assert_ne!(descriptor >> 6, 0, "a frame without its content size");
            assert_ne!(descriptor & 0b100, 0, "a frame without a checksum");
            let size = zstd::zstd_safe::find_frame_compressed_size(compressed).unwrap();
            compressed = &compressed[size..];
        }
    }

    #[test]
    fn level_3_frames_are_libzstds_level_3_with_smaller_tables() {
        let block = sample(ZSTD_BLOCK);
        let mut reference = zstd::bulk::Compressor::new(3).unwrap();
        reference.include_checksum(true).unwrap();
        reference.include_contentsize(true).unwrap();
        let libzstds = reference.compress(&block).unwrap();
        reference.set_parameter(CParameter::HashLog(16)).unwrap();
        reference.set_parameter(CParameter::ChainLog(15)).unwrap();
        let smaller_tables = reference.compress(&block).unwrap();
        assert_ne!(libzstds, smaller_tables);
        assert_eq!(compress(Codec::Zstd(3), &block, 1, 65_536), smaller_tables);
        // Other levels are libzstd's own.
        let mut level_4 = zstd::bulk::Compressor::new(4).unwrap();
        level_4.include_checksum(true).unwrap();
        level_4.include_contentsize(true).unwrap();
        assert_eq!(
            compress(Codec::Zstd(4), &block, 1, 65_536),
            level_4.compress(&block).unwrap()
        );
    }

    #[test]
    fn zstd_blocks_end_exactly_at_the_boundary() {
        for len in [ZSTD_BLOCK - 1, ZSTD_BLOCK, ZSTD_BLOCK + 1, 2 * ZSTD_BLOCK] {
            let input = sample(len);
            let compressed = compress(Codec::Zstd(3), &input, 2, 100_000);
            assert_eq!(unzstd(&compressed), input, "{len} bytes");
            assert_eq!(zstd_frames(&compressed), len.div_ceil(ZSTD_BLOCK), "{len}");
        }
    }

    #[test]
    fn zstd_of_nothing_is_one_valid_frame() {
        let compressed = compress(Codec::Zstd(3), &[], 2, 1);
        assert_eq!(zstd_frames(&compressed), 1);
        assert!(unzstd(&compressed).is_empty());
    }

    #[test]
    fn zstd_levels_share_the_pool_and_differ() {
        let input = sample(ZSTD_BLOCK + 17);
        let other = std::thread::spawn({
            let input = input.clone();
            move || compress(Codec::Zstd(19), &input, 2, 65_536)
        });
        let fast = compress(Codec::Zstd(1), &input, 2, 65_536);
        let small = other.join().unwrap();
        assert_eq!(unzstd(&fast), input);
        assert_eq!(unzstd(&small), input);
        assert_ne!(fast, small);
        assert_eq!(fast, compress(Codec::Zstd(1), &input, 1, 65_536));
    }

    #[test]
    fn levels_out_of_range_are_refused() {
        assert!(ParallelWriter::new(Vec::new(), Codec::Zstd(23), 1).is_err());
        assert!(ParallelWriter::new(Vec::new(), Codec::Gzip(13), 1).is_err());
    }
}
