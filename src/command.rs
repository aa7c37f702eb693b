//! The one helper that runs every subprocess: stdin closed, its own process group (stopped on
//! timeout and when the caller goes away), stdout and stderr read concurrently, and the command
//! and the tail of its stderr kept in the error. [`run_observed`] also hands each stderr line to
//! the caller as it arrives (nix-build's progress).
//!
//! What a command prints is bounded: stdout up to a limit (past it the command is stopped with
//! [`CommandError::TooMuchOutput`]), stderr only as its last [`STDERR_TAIL_BYTES`], so a builder
//! that prints a gigabyte costs the server a few kilobytes. A command gets the server's
//! environment plus some variables, or ([`Env::Only`]) exactly the variables given.
//!
//! Stopping sends SIGTERM to the group first: nix-build runs its builders in sessions of their
//! own, out of reach of the group, and only stops them itself when it is asked to terminate.
//! Whatever is still alive after [`KILL_GRACE`] gets SIGKILL.
//!
//! Every group whose leader has not been reaped is also listed, so that [`stop_all`] can stop
//! them when the server exits: the thread that stops a dropped command's group dies with the
//! process.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use crate::sync::lock;

/// How long a stopped command's group has between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// How much of a command's stderr is kept (for the log, and the end of a failure's output).
pub const STDERR_TAIL_BYTES: usize = 4096;

/// The most of one stderr line an observer is given; the rest of a longer line (a builder that
/// prints a megabyte without a newline) is dropped.
pub const OBSERVED_LINE_BYTES: usize = 4096;

/// The most a command may print on stdout unless its caller says otherwise ([`run_limited`]):
/// Nix prints a path or two, git a listing of refs.
pub const MAX_STDOUT_BYTES: usize = 16 << 20;

/// What a command printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    /// The last [`STDERR_TAIL_BYTES`] of its stderr.
    pub stderr_tail: String,
}

/// The environment a command starts with.
#[derive(Clone, Copy, Debug)]
pub enum Env<'a> {
    /// The server's own, with these variables added or replaced.
    Inherited(&'a [(&'a str, String)]),
    /// These variables and nothing else.
    Only(&'a [(&'a str, String)]),
}

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not start `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` ran longer than {}s and was killed", timeout.as_secs())]
    Timeout {
        command: String,
        timeout: Duration,
        stderr_tail: String,
    },
    #[error("`{command}` failed ({status})")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr_tail: String,
    },
    #[error("reading the output of `{command}` failed: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` printed more than {limit} bytes and was stopped")]
    TooMuchOutput { command: String, limit: usize },
}

impl CommandError {
    /// The end of what the command wrote to stderr, if it got that far.
    pub fn stderr_tail(&self) -> &str {
        match self {
            CommandError::Timeout { stderr_tail, .. }
            | CommandError::Failed { stderr_tail, .. } => stderr_tail,
            _ => "",
        }
    }
}

/// Owns a running command's process group: when dropped (on timeout, or when the awaiting
/// future is dropped) before [`ProcessGroup::finished`], the group is stopped by [`stop_group`]
/// on a thread of its own.
struct ProcessGroup {
    child: Option<Child>,
    /// The group's id, listed in [`LIVE`] until its leader is reaped.
    pgid: Option<u32>,
}

impl ProcessGroup {
    fn child(&mut self) -> Result<&mut Child, std::io::Error> {
        self.child
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the command was already stopped"))
    }

    fn finished(&mut self) {
        self.child = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let pgid = self.pgid;
        let Some(child) = self.child.take() else {
            forget(pgid);
            return;
        };
        // The thread below sends SIGTERM; stop_all need not send another.
        if let Some(pgid) = pgid
            && let Some(stopping) = lock(&LIVE).get_mut(&pgid)
        {
            *stopping = Stopping::Terminated;
        }
        std::thread::spawn(move || {
            stop_group(child, KILL_GRACE, signal_group);
            forget(pgid);
        });
    }
}

/// Whether a live group has been asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stopping {
    /// Not yet: [`stop_all`] sends it SIGTERM.
    NotYet,
    /// SIGTERM was sent, by the thread stopping a dropped [`ProcessGroup`] or by [`stop_all`].
    Terminated,
}

/// The process groups started by [`run_observed`] whose leader has not been reaped, by group
/// id. A group is forgotten as soon as its leader is reaped, since its id may then be reused.
static LIVE: Mutex<BTreeMap<u32, Stopping>> = Mutex::new(BTreeMap::new());

/// Takes `pgid` off [`LIVE`]: its leader has been reaped.
fn forget(pgid: Option<u32>) {
    if let Some(pgid) = pgid {
        lock(&LIVE).remove(&pgid);
    }
}

/// What [`stop_all`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stopped {
    /// Process groups that were running.
    pub groups: usize,
    /// Those still there after the grace, which got SIGKILL.
    pub killed: usize,
}

/// Stops every process group still running (at exit), synchronously: SIGTERM to each (unless
/// its owner has sent it already), then SIGKILL to those whose leader is still there after
/// `grace`. Leaders are reaped by their owners (the task awaiting the command, or the thread
/// stopping a dropped one), so the runtime must still be running while this waits; call it
/// from a blocking thread.
pub fn stop_all(grace: Duration) -> Stopped {
    let groups = {
        let mut live = lock(&LIVE);
        for (&pgid, stopping) in live.iter_mut() {
            if *stopping == Stopping::NotYet {
                signal_group(pgid, Signal::TERM);
                *stopping = Stopping::Terminated;
            }
        }
        live.len()
    };
    let deadline = Instant::now() + grace;
    while !lock(&LIVE).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Under the lock, so that a group forgotten meanwhile gets nothing. (A leader reaped but not
    // yet forgotten could still get it: its id would have to be reused in the few instructions
    // between the two, which takes the whole pid space wrapping around.)
    let live = lock(&LIVE);
    for &pgid in live.keys() {
        signal_group(pgid, Signal::KILL);
    }
    Stopped {
        groups,
        killed: live.len(),
    }
}

/// Sends `signal` to process group `pgid`; a group that is already gone is fine.
fn signal_group(pgid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) {
        let _gone = rustix::process::kill_process_group(pid, signal);
    }
}

/// Stops the process group that `child` leads: SIGTERM, then SIGKILL if the leader is still there
/// after `grace`. The leader is reaped here as soon as it exits, and no signal is sent after
/// that: once reaped, its group id may belong to an unrelated process. A leader reaped before
/// (`child.id()` is then `None`) gets no signal at all.
fn stop_group(mut child: Child, grace: Duration, signal: impl Fn(u32, Signal)) {
    let Some(pgid) = child.id() else {
        return;
    };
    signal(pgid, Signal::TERM);
    let deadline = std::time::Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(None) => break,
            Ok(Some(_)) | Err(_) => return,
        }
    }
    signal(pgid, Signal::KILL);
    // Reap it, so it does not linger as a zombie.
    let _reaped = child.try_wait();
}

/// Runs `program` with `args` in environment `env`, waiting at most `timeout`; its stdout may
/// be up to [`MAX_STDOUT_BYTES`].
pub async fn run(
    program: &str,
    args: &[OsString],
    env: Env<'_>,
    timeout: Duration,
) -> Result<Output, CommandError> {
    run_limited(program, args, env, timeout, MAX_STDOUT_BYTES).await
}

/// [`run`], with stdout allowed up to `max_stdout` bytes.
pub async fn run_limited(
    program: &str,
    args: &[OsString],
    env: Env<'_>,
    timeout: Duration,
    max_stdout: usize,
) -> Result<Output, CommandError> {
    run_with(program, args, env, timeout, max_stdout, &mut |_: &str| {}).await
}

/// Runs a command like [`run`], and calls `on_stderr_line` with each line of its stderr as it
/// arrives: without the newline, lossily decoded, cut to [`OBSERVED_LINE_BYTES`]; a last line
/// without a newline comes when stderr closes.
pub async fn run_observed(
    program: &str,
    args: &[OsString],
    env: Env<'_>,
    timeout: Duration,
    on_stderr_line: &mut (dyn FnMut(&str) + Send),
) -> Result<Output, CommandError> {
    run_with(
        program,
        args,
        env,
        timeout,
        MAX_STDOUT_BYTES,
        on_stderr_line,
    )
    .await
}

async fn run_with(
    program: &str,
    args: &[OsString],
    env: Env<'_>,
    timeout: Duration,
    max_stdout: usize,
    on_stderr_line: &mut (dyn FnMut(&str) + Send),
) -> Result<Output, CommandError> {
    let command_line = std::iter::once(program.to_owned())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = Command::new(program);
    let vars = match env {
        Env::Inherited(vars) => vars,
        Env::Only(vars) => {
            command.env_clear();
            vars
        }
    };
    command
        .args(args)
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let io_error = |source| CommandError::Io {
        command: command_line.clone(),
        source,
    };
    let mut child = command.spawn().map_err(|source| CommandError::Spawn {
        command: command_line.clone(),
        source,
    })?;
    let pipes = child.stdout.take().zip(child.stderr.take());
    let pgid = child.id();
    if let Some(pgid) = pgid {
        lock(&LIVE).insert(pgid, Stopping::NotYet);
    }
    let mut group = ProcessGroup {
        child: Some(child),
        pgid,
    };
    let (mut stdout, mut stderr) =
        pipes.ok_or_else(|| io_error(std::io::Error::other("no pipes to the command")))?;

    // Read as it comes, so that what a command printed before a timeout is kept.
    let mut out = Vec::new();
    let mut err = Tail::default();
    let mut overflowed = false;
    let result = {
        let finished = async {
            let child = group.child()?;
            let reaped = async {
                let status = child.wait().await;
                forget(pgid);
                status
            };
            // Stdout past its limit ends the wait at once (try_join), and the group is stopped
            // as for a timeout: waiting for the command to exit could take until then.
            let (_, (), status) = tokio::try_join!(
                read_limited(&mut stdout, &mut out, max_stdout, &mut overflowed),
                read_lines(&mut stderr, &mut err, on_stderr_line),
                reaped
            )?;
            Ok::<_, std::io::Error>(status)
        };
        tokio::time::timeout(timeout, finished).await
    };
    let status = match result {
        Err(_) => {
            return Err(CommandError::Timeout {
                command: command_line,
                timeout,
                stderr_tail: err.text(),
            });
        }
        Ok(Err(_)) if overflowed => {
            return Err(CommandError::TooMuchOutput {
                command: command_line,
                limit: max_stdout,
            });
        }
        Ok(Err(source)) => return Err(io_error(source)),
        Ok(Ok(status)) => status,
    };
    group.finished();
    if !status.success() {
        return Err(CommandError::Failed {
            command: command_line,
            status,
            stderr_tail: err.text(),
        });
    }
    Ok(Output {
        stdout: out,
        stderr_tail: err.text(),
    })
}

/// Reads `pipe` to its end into `out`; more than `limit` bytes is an error, with `overflowed`
/// set.
async fn read_limited(
    pipe: &mut (impl AsyncRead + Unpin),
    out: &mut Vec<u8>,
    limit: usize,
    overflowed: &mut bool,
) -> std::io::Result<()> {
    let read = pipe.take(limit as u64 + 1).read_to_end(out).await?;
    if read > limit {
        *overflowed = true;
        return Err(std::io::Error::other("output limit"));
    }
    Ok(())
}

/// The last [`STDERR_TAIL_BYTES`] of a stream, kept in a buffer of at most twice that.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
}

impl Tail {
    fn push(&mut self, more: &[u8]) {
        let more = &more[more.len().saturating_sub(STDERR_TAIL_BYTES)..];
        if self.bytes.len() + more.len() > 2 * STDERR_TAIL_BYTES {
            let keep = STDERR_TAIL_BYTES.saturating_sub(more.len());
            self.bytes
                .drain(..self.bytes.len() - keep.min(self.bytes.len()));
        }
        self.bytes.extend_from_slice(more);
    }

    fn text(&self) -> String {
        let start = self.bytes.len().saturating_sub(STDERR_TAIL_BYTES);
        String::from_utf8_lossy(&self.bytes[start..]).into_owned()
    }
}

/// Reads `pipe` to its end, keeping its tail in `tail` and calling `on_line` with each line as
/// soon as its newline has been read (cut to [`OBSERVED_LINE_BYTES`]), and with an unterminated
/// last line at the end. At most one cut line is held at a time.
async fn read_lines(
    pipe: &mut (impl AsyncRead + Unpin),
    tail: &mut Tail,
    on_line: &mut (dyn FnMut(&str) + Send),
) -> std::io::Result<()> {
    let mut chunk = [0u8; 8192];
    let mut line = Vec::with_capacity(256);
    loop {
        let read = pipe.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        let chunk = &chunk[..read];
        tail.push(chunk);
        for (i, piece) in chunk.split(|&b| b == b'\n').enumerate() {
            if i > 0 {
                on_line(&String::from_utf8_lossy(&line));
                line.clear();
            }
            let room = OBSERVED_LINE_BYTES - line.len();
            line.extend_from_slice(&piece[..piece.len().min(room)]);
        }
    }
    if !line.is_empty() {
        on_line(&String::from_utf8_lossy(&line));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[tokio::test]
    async fn only_the_given_environment_reaches_a_cleared_command() {
        let out = run(
            "/usr/bin/env",
            &[],
            Env::Only(&[("NIXERY_SEEN", "yes".into())]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "NIXERY_SEEN=yes\n");
    }

    #[tokio::test]
    async fn a_command_that_prints_too_much_is_stopped() {
        let started = std::time::Instant::now();
        let err = run_limited(
            "sh",
            &args(&[
                "-c",
                "while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done",
            ]),
            Env::Inherited(&[]),
            Duration::from_secs(60),
            1 << 20,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, CommandError::TooMuchOutput { limit, .. } if limit == 1 << 20),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn only_the_tail_of_a_long_stderr_is_kept() {
        let mut lines = 0;
        // 64 MiB in lines of 1 KiB, and one line of 1 MiB without a newline at the end.
        let out = run_observed(
            "sh",
            &args(&[
                "-c",
                "yes \"$(head -c 1023 /dev/zero | tr '\\0' x)\" | head -n 65536 >&2; \
                 echo end >&2; head -c 1048576 /dev/zero | tr '\\0' y >&2",
            ]),
            Env::Inherited(&[]),
            Duration::from_secs(60),
            &mut |line: &str| {
                assert!(line.len() <= OBSERVED_LINE_BYTES);
                lines += 1;
            },
        )
        .await
        .unwrap();
        assert_eq!(lines, 65536 + 2);
        assert_eq!(out.stderr_tail, "y".repeat(STDERR_TAIL_BYTES));
    }

    #[tokio::test]
    async fn output_is_collected() {
        let out = run(
            "sh",
            &args(&["-c", "echo out; echo err >&2"]),
            Env::Inherited(&[]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr_tail, "err\n");
    }

    #[tokio::test]
    async fn failure_keeps_stderr_tail() {
        let err = run(
            "sh",
            &args(&["-c", "echo boom >&2; exit 3"]),
            Env::Inherited(&[]),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Failed { .. }));
        assert_eq!(err.stderr_tail(), "boom\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("grandchild-survived");
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let started = std::time::Instant::now();
        let err = run(
            "sh",
            &args(&["-c", &script]),
            Env::Inherited(&[]),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.exists(), "a grandchild outlived the timeout");
    }

    #[tokio::test]
    async fn a_group_that_ignores_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let script = format!(
            "trap '' TERM; sleep {}; touch {}",
            KILL_GRACE.as_secs() + 2,
            marker.display()
        );
        let err = run(
            "sh",
            &args(&["-c", &script]),
            Env::Inherited(&[]),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        tokio::time::sleep(KILL_GRACE + Duration::from_secs(4)).await;
        assert!(!marker.exists(), "the group outlived SIGKILL");
    }

    #[tokio::test]
    async fn a_timeout_keeps_what_the_command_printed_to_stderr() {
        let err = run(
            "sh",
            &args(&["-c", "echo 'error: still evaluating' >&2; sleep 30"]),
            Env::Inherited(&[]),
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert_eq!(err.stderr_tail(), "error: still evaluating\n");
    }

    /// Signals `stop_group` sends, recorded instead of sent.
    fn recorded() -> (
        std::sync::Arc<std::sync::Mutex<Vec<Signal>>>,
        impl Fn(u32, Signal),
    ) {
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = sent.clone();
        (sent, move |pgid: u32, signal: Signal| {
            record.lock().unwrap().push(signal);
            signal_group(pgid, signal);
        })
    }

    fn spawn_group(script: &str) -> Child {
        Command::new("sh")
            .args(["-c", script])
            .process_group(0)
            .spawn()
            .unwrap()
    }

    #[tokio::test]
    async fn a_group_whose_leader_exits_on_sigterm_gets_no_sigkill() {
        let (sent, signal) = recorded();
        stop_group(spawn_group("sleep 30"), Duration::from_secs(5), signal);
        assert_eq!(*sent.lock().unwrap(), [Signal::TERM]);
    }

    #[tokio::test]
    async fn a_leader_that_ignores_sigterm_gets_sigkill_after_the_grace() {
        let (sent, signal) = recorded();
        let mut child = spawn_group("trap '' TERM; sleep 30 & wait");
        // Let the shell set its trap before the signal comes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(child.try_wait().unwrap().is_none());
        stop_group(child, Duration::from_millis(300), signal);
        assert_eq!(*sent.lock().unwrap(), [Signal::TERM, Signal::KILL]);
    }

    #[tokio::test]
    async fn a_reaped_leader_gets_no_signal_its_group_id_may_be_reused() {
        let (sent, signal) = recorded();
        let mut child = spawn_group("exit 0");
        child.wait().await.unwrap();
        stop_group(child, Duration::from_millis(300), signal);
        assert!(sent.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn stderr_lines_arrive_while_the_command_runs() {
        let started = std::time::Instant::now();
        let mut seen = Vec::new();
        let out = run_observed(
            "sh",
            &args(&["-c", "echo one >&2; sleep 1; echo two >&2; echo out"]),
            Env::Inherited(&[]),
            Duration::from_secs(10),
            &mut |line: &str| seen.push((line.to_owned(), started.elapsed())),
        )
        .await
        .unwrap();
        let lines: Vec<&str> = seen.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(lines, ["one", "two"]);
        assert!(
            seen[1].1 - seen[0].1 > Duration::from_millis(700),
            "the first line waited for the second: {seen:?}"
        );
        assert_eq!(out.stderr_tail, "one\ntwo\n");
        assert_eq!(out.stdout, b"out\n");
    }

    #[tokio::test]
    async fn an_unterminated_last_stderr_line_is_delivered_at_the_end() {
        let mut seen = Vec::new();
        let err = run_observed(
            "sh",
            &args(&["-c", "printf 'first\\n\\nlast' >&2; exit 1"]),
            Env::Inherited(&[]),
            Duration::from_secs(10),
            &mut |line: &str| seen.push(line.to_owned()),
        )
        .await
        .unwrap_err();
        assert_eq!(seen, ["first", "", "last"]);
        assert_eq!(err.stderr_tail(), "first\n\nlast");
    }

    #[tokio::test]
    async fn long_and_invalid_lines_are_cut_and_decoded_for_the_observer_only() {
        let mut input = vec![b'x'; 3 * OBSERVED_LINE_BYTES];
        input.extend_from_slice(b"\nbad \xff byte\n");
        let mut tail = Tail::default();
        let mut seen = Vec::new();
        read_lines(&mut &input[..], &mut tail, &mut |line: &str| {
            seen.push(line.to_owned())
        })
        .await
        .unwrap();
        assert_eq!(
            tail.text(),
            String::from_utf8_lossy(&input[input.len() - STDERR_TAIL_BYTES..])
        );
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], "x".repeat(OBSERVED_LINE_BYTES));
        assert_eq!(seen[1], "bad \u{fffd} byte");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = run(
            "nixery-no-such-program",
            &[],
            Env::Inherited(&[]),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }
}
