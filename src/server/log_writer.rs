//! Where log lines go: gathered in memory and written to stderr by a thread of their own, a
//! batch at a time, at most [`GATHER`] after the first line of the batch.
//!
//! A busy server logs tens of thousands of requests a second. A write(2) for each, from the
//! thread that answered the request (and waiting for stderr's lock while another thread wrote),
//! cost more in the profile than answering a warm manifest; a line added here costs a short lock
//! and a copy. Lines keep their order. At exit, [`LogGuard`]'s drop writes what is still
//! gathered; only a process killed outright loses its last [`GATHER`] of lines.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

use crate::sync::lock;

/// How long the writer thread waits after the first line of a batch for more to join it.
pub const GATHER: Duration = Duration::from_millis(10);

/// Gathered lines past this size are written at once by the thread that adds to them, so a
/// burst of lines (or a stderr that blocks) cannot take unbounded memory.
const MOST_GATHERED: usize = 1 << 20;

/// Log lines on their way to an output (stderr, or a buffer in tests).
pub struct LogWriter<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
}

/// Keeps the writer thread; dropping it writes the lines still gathered and ends the thread.
#[must_use = "dropping the guard stops the log's writer thread"]
pub struct LogGuard<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
    thread: Option<JoinHandle<()>>,
}

struct Shared<W> {
    gathered: Mutex<Gathered>,
    /// Signalled when the first line of a batch arrives, and when the guard is dropped.
    arrived: Condvar,
    /// Held while a batch is taken and written, so batches are written in the order taken.
    output: Mutex<W>,
}

#[derive(Default)]
struct Gathered {
    lines: Vec<u8>,
    stopping: bool,
}

impl<W: Write + Send + 'static> LogWriter<W> {
    /// Starts the writer thread for `output`.
    pub fn start(output: W) -> io::Result<(Self, LogGuard<W>)> {
        let shared = Arc::new(Shared {
            gathered: Mutex::new(Gathered::default()),
            arrived: Condvar::new(),
            output: Mutex::new(output),
        });
        let thread = std::thread::Builder::new()
            .name("nixery-log".to_owned())
            .spawn({
                let shared = shared.clone();
                move || shared.write_batches()
            })?;
        let guard = LogGuard {
            shared: shared.clone(),
            thread: Some(thread),
        };
        Ok((Self { shared }, guard))
    }
}

impl<W: Write + Send + 'static> Drop for LogGuard<W> {
    fn drop(&mut self) {
        lock(&self.shared.gathered).stopping = true;
        self.shared.arrived.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread writes what is left before it ends; if it panicked, nothing more is lost.
            let _ = thread.join();
        }
    }
}

impl<W: Write + Send> Shared<W> {
    /// The writer thread: waits for a line, lets more gather for [`GATHER`], writes them all.
    fn write_batches(&self) {
        loop {
            let mut gathered = lock(&self.gathered);
            while gathered.lines.is_empty() && !gathered.stopping {
                gathered = self
                    .arrived
                    .wait(gathered)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            let stopping = gathered.stopping;
            drop(gathered);
            if !stopping {
                std::thread::sleep(GATHER);
            }
            self.write_gathered();
            if stopping {
                return;
            }
        }
    }

    /// Takes every line gathered so far and writes them. A failed write loses the batch: there
    /// is nowhere else to say so.
    fn write_gathered(&self) {
        let mut output = lock(&self.output);
        let lines = std::mem::take(&mut lock(&self.gathered).lines);
        if !lines.is_empty() {
            let _ = output.write_all(&lines).and_then(|()| output.flush());
        }
    }

    fn add(&self, line: &[u8]) {
        let mut gathered = lock(&self.gathered);
        let first = gathered.lines.is_empty();
        gathered.lines.extend_from_slice(line);
        let full = gathered.lines.len() >= MOST_GATHERED;
        drop(gathered);
        if full {
            self.write_gathered();
        } else if first {
            self.arrived.notify_one();
        }
    }
}

/// What one event writes through: tracing's formatter writes each event's whole line at once.
pub struct LineWriter<'a, W>(&'a Shared<W>);

impl<W: Write + Send> Write for LineWriter<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.add(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + Send + 'static> MakeWriter<'a> for LogWriter<W> {
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output shared with the test, counting the writes it was given.
    #[derive(Clone, Default)]
    struct Output(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Output {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let mut output = lock(&self.0);
            output.0.extend_from_slice(bytes);
            output.1 += 1;
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(writer: &LogWriter<Output>, text: &str) {
        writer.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn lines_from_many_threads_are_written_whole_in_few_writes() {
        let output = Output::default();
        let (writer, guard) = LogWriter::start(output.clone()).unwrap();
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let writer = &writer;
                scope.spawn(move || {
                    for n in 0..1000 {
                        line(writer, &format!("thread {thread} line {n}\n"));
                    }
                });
            }
        });
        drop(guard);
        let (bytes, writes) = lock(&output.0).clone();
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(text.lines().count(), 4000);
        for thread in 0..4 {
            let numbers: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {thread} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(numbers, (0..1000).collect::<Vec<_>>(), "thread {thread}");
        }
        assert!(writes < 100, "{writes} writes for 4000 lines");
    }

    #[test]
    fn a_line_is_written_soon_without_more_lines_or_an_exit() {
        let output = Output::default();
        let (writer, _guard) = LogWriter::start(output.clone()).unwrap();
        line(&writer, "alone\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lock(&output.0).0.is_empty() {
            assert!(std::time::Instant::now() < deadline, "not written");
            std::thread::sleep(GATHER);
        }
        assert_eq!(lock(&output.0).0, b"alone\n");
    }

    #[test]
    fn more_than_the_most_gathered_is_written_by_the_adding_thread() {
        let output = Output::default();
        let (writer, _guard) = LogWriter::start(output.clone()).unwrap();
        let long = "x".repeat(MOST_GATHERED);
        line(&writer, &long);
        assert_eq!(lock(&output.0).0.len(), MOST_GATHERED);
    }
}
