//! Parallel gzip: the stream is cut into blocks of [`BLOCK`] bytes, each compressed by libdeflate
//! on a worker thread into a gzip member of its own, and the members are written in order. A
//! sequence of members is one valid gzip file (RFC 1952 §2.2) that every registry client's gzip
//! reader decompresses whole; the independent blocks let one large layer use every core, at the
//! price of a dictionary reset per block (well under 1% on binaries).
//!
//! The workers are one pool for the whole process, a thread per core, shared by every layer being
//! packed: layers packed side by side take turns on the same cores instead of each starting
//! threads of its own. Memory is bounded: each writer has at most a fixed number of blocks in
//! flight.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, LazyLock, Mutex};

use libdeflater::{CompressionLvl, Compressor};

/// Uncompressed bytes per gzip member.
pub const BLOCK: usize = 1 << 20;

/// A block to compress at a level, and where to send the member.
type Job = (Vec<u8>, CompressionLvl, SyncSender<Vec<u8>>);

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

/// A pool thread: compresses blocks until the process ends.
fn compress_jobs(queue: &Mutex<Receiver<Job>>) {
    let mut compressor: Option<(CompressionLvl, Compressor)> = None;
    let mut scratch = Vec::new();
    loop {
        let job = crate::sync::lock(queue).recv();
        let Ok((input, level, reply)) = job else {
            return;
        };
        let compressor = match &mut compressor {
            Some((current, compressor)) if *current == level => compressor,
            slot => &mut slot.insert((level, Compressor::new(level))).1,
        };
        scratch.resize(compressor.gzip_compress_bound(input.len()), 0);
        // The bound is the output's worst case, so this cannot fail; if it ever did, the writer
        // would see no member and report a stopped worker.
        if let Ok(n) = compressor.gzip_compress(&input, &mut scratch) {
            // The writer may be gone (an error elsewhere): nothing to do then.
            let _ = reply.send(scratch[..n].to_vec());
        }
    }
}

/// A writer that gzips what it is given on the shared pool and writes it to `out`, with at
/// most `in_flight` blocks queued or compressing at a time.
pub struct ParallelGzip<W: Write> {
    out: W,
    level: CompressionLvl,
    block: Vec<u8>,
    in_flight: VecDeque<Receiver<Vec<u8>>>,
    max_in_flight: usize,
    wrote_member: bool,
}

impl<W: Write> ParallelGzip<W> {
    /// A writer compressing at libdeflate `level` (1 fastest … 12 smallest), keeping up to
    /// `in_flight` blocks in the pool at once.
    pub fn new(out: W, level: i32, in_flight: usize) -> io::Result<Self> {
        let level = CompressionLvl::new(level)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "gzip level out of range"))?;
        Ok(ParallelGzip {
            out,
            level,
            block: Vec::with_capacity(BLOCK),
            in_flight: VecDeque::new(),
            max_in_flight: in_flight.max(1),
            wrote_member: false,
        })
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.in_flight.len() >= self.max_in_flight {
            self.write_oldest()?;
        }
        let input = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
        let (reply, result) = sync_channel(1);
        POOL.send((input, self.level, reply))
            .map_err(|_| io::Error::other("the gzip pool stopped"))?;
        self.in_flight.push_back(result);
        self.wrote_member = true;
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(result) = self.in_flight.pop_front() {
            let member = result
                .recv()
                .map_err(|_| io::Error::other("a gzip worker stopped"))?;
            self.out.write_all(&member)?;
        }
        Ok(())
    }

    /// Compresses what is left, writes every member and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.block.is_empty() || !self.wrote_member {
            self.submit()?;
        }
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == BLOCK {
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

    fn gzip(input: &[u8], in_flight: usize) -> Vec<u8> {
        let mut writer = ParallelGzip::new(Vec::new(), 6, in_flight).unwrap();
        // Odd-sized writes, across block boundaries.
        for chunk in input.chunks(77_777) {
            writer.write_all(chunk).unwrap();
        }
        writer.finish().unwrap()
    }

    #[test]
    fn members_decompress_to_the_input() {
        let input: Vec<u8> = (0..(3 * BLOCK + 12345))
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
            move || {
                let mut writer = ParallelGzip::new(Vec::new(), 1, 4).unwrap();
                writer.write_all(&input).unwrap();
                writer.finish().unwrap()
            }
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
        let input: Vec<u8> = (0..(2 * BLOCK + 5)).map(|i| (i % 13) as u8).collect();
        let compressed = gzip(&input, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.gz");
        std::fs::write(&path, &compressed).unwrap();
        let out = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, input);
    }
}
