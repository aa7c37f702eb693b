//! The one helper that runs every subprocess: stdin closed, its own process group (stopped on
//! timeout and when the caller goes away), stdout and stderr read concurrently, and the command
//! and the tail of its stderr kept in the error.
//!
//! Stopping sends SIGTERM to the group first: nix-build runs its builders in sessions of their
//! own, out of reach of the group, and only stops them itself when it is asked to terminate.
//! Whatever is still alive after [`KILL_GRACE`] gets SIGKILL.

use std::ffi::OsString;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// How long a stopped command's group has between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// How much of a failed command's stderr is kept for the log.
const STDERR_TAIL_BYTES: usize = 4096;

/// What a command printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
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

/// Stops a whole process group when dropped (on timeout, or when the awaiting future is
/// dropped), unless the command finished and [`ProcessGroup::finished`] disarmed it.
struct ProcessGroup(Option<i32>);

impl ProcessGroup {
    fn finished(&mut self) {
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: killpg has no memory-safety preconditions; a group that is already gone
            // makes it fail with ESRCH, which is fine.
            unsafe {
                libc::killpg(pgid, libc::SIGTERM);
            }
            std::thread::spawn(move || {
                std::thread::sleep(KILL_GRACE);
                // SAFETY: as above.
                unsafe {
                    libc::killpg(pgid, libc::SIGKILL);
                }
            });
        }
    }
}

/// Runs `program` with `args` and extra environment `envs`, waiting at most `timeout`.
pub async fn run(
    program: &str,
    args: &[OsString],
    envs: &[(&str, String)],
    timeout: Duration,
) -> Result<Output, CommandError> {
    let command_line = std::iter::once(program.to_owned())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command.spawn().map_err(|source| CommandError::Spawn {
        command: command_line.clone(),
        source,
    })?;
    let mut group = ProcessGroup(child.id().and_then(|id| i32::try_from(id).ok()));
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");

    let finished = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (read_out, read_err, status) = tokio::join!(
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err),
            child.wait()
        );
        read_out
            .and(read_err)
            .and(status)
            .map(|status| (status, out, err))
    };
    let (status, stdout, stderr) = match tokio::time::timeout(timeout, finished).await {
        Err(_) => {
            return Err(CommandError::Timeout {
                command: command_line,
                timeout,
                stderr_tail: String::new(),
            });
        }
        Ok(Err(source)) => {
            return Err(CommandError::Io {
                command: command_line,
                source,
            });
        }
        Ok(Ok(done)) => done,
    };
    group.finished();
    if !status.success() {
        return Err(CommandError::Failed {
            command: command_line,
            status,
            stderr_tail: tail(&stderr),
        });
    }
    Ok(Output { stdout, stderr })
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[tokio::test]
    async fn output_is_collected() {
        let out = run(
            "sh",
            &args(&["-c", "echo out; echo err >&2"]),
            &[],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[tokio::test]
    async fn failure_keeps_stderr_tail() {
        let err = run(
            "sh",
            &args(&["-c", "echo boom >&2; exit 3"]),
            &[],
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
            &[],
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
            &[],
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        tokio::time::sleep(KILL_GRACE + Duration::from_secs(4)).await;
        assert!(!marker.exists(), "the group outlived SIGKILL");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = run("nixery-no-such-program", &[], &[], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }
}
