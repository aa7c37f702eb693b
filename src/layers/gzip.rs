//! Parallel gzip: the stream is cut into blocks of [`BLOCK`] bytes, each compressed by libdeflate
//! on a worker thread into a gzip member of its own, and the members are written in order. A
//! sequence of members is one valid gzip file (RFC 1952 §2.2) that every registry client's gzip
//! reader decompresses whole; the independent blocks let one large layer use every core, at the
//! price of a dictionary reset per block (well under 1% on binaries). Memory is bounded: at most
//! two blocks per worker are in flight.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use libdeflater::{CompressionLvl, Compressor};

/// Uncompressed bytes per gzip member.
pub const BLOCK: usize = 1 << 20;

type Job = (Vec<u8>, SyncSender<Vec<u8>>);

/// A writer that gzips what it is given on `workers` threads and writes it to `out`. Dropping it
/// without [`ParallelGzip::finish`] closes the queue, and the idle workers end.
pub struct ParallelGzip<W: Write> {
    out: W,
    block: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    in_flight: VecDeque<Receiver<Vec<u8>>>,
    max_in_flight: usize,
    workers: Vec<JoinHandle<()>>,
    wrote_member: bool,
}

impl<W: Write> ParallelGzip<W> {
    /// A writer compressing at libdeflate `level` (1 fastest … 12 smallest) on `workers` threads.
    pub fn new(out: W, level: i32, workers: usize) -> io::Result<Self> {
        let level = CompressionLvl::new(level)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "gzip level out of range"))?;
        let workers = workers.max(1);
        let (jobs, queue) = sync_channel::<Job>(workers);
        let queue = Arc::new(Mutex::new(queue));
        let workers = (0..workers)
            .map(|_| {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    let mut compressor = Compressor::new(level);
                    let mut scratch = Vec::new();
                    loop {
                        let job = queue.lock().expect("queue lock").recv();
                        let Ok((input, reply)) = job else { return };
                        scratch.resize(compressor.gzip_compress_bound(input.len()), 0);
                        let n = compressor
                            .gzip_compress(&input, &mut scratch)
                            .expect("the output buffer has the bound's size");
                        // The writer may be gone (an error elsewhere): nothing to do then.
                        let _ = reply.send(scratch[..n].to_vec());
                    }
                })
            })
            .collect::<Vec<_>>();
        Ok(ParallelGzip {
            out,
            block: Vec::with_capacity(BLOCK),
            jobs: Some(jobs),
            in_flight: VecDeque::new(),
            max_in_flight: 2 * workers.len(),
            workers,
            wrote_member: false,
        })
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.in_flight.len() >= self.max_in_flight {
            self.write_oldest()?;
        }
        let input = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
        let (reply, result) = sync_channel(1);
        self.jobs
            .as_ref()
            .expect("jobs are open until finish")
            .send((input, reply))
            .map_err(|_| io::Error::other("a gzip worker stopped"))?;
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
        self.jobs = None;
        for worker in self.workers.drain(..) {
            worker
                .join()
                .map_err(|_| io::Error::other("a gzip worker panicked"))?;
        }
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

    fn gzip(input: &[u8], workers: usize) -> Vec<u8> {
        let mut writer = ParallelGzip::new(Vec::new(), 6, workers).unwrap();
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
            "the worker count changed the bytes"
        );
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
