//! Running the PostgreSQL tools as the right OS user, bounded by a timeout (the child is
//! killed when it runs out), with stderr captured; plus the file-system chores that go with
//! it (files and directories owned by that user, with Postgres' modes) and process liveness.
//!
//! Postgres refuses to run as root. When this process is root, every tool runs as an
//! unprivileged OS user (default `postgres`) via uid/gid on the child, and whatever Postgres
//! must write is chowned to that user. When not root, tools run as ourselves.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{Pid, Uid, User};
use tokio::process::Command;

use super::error::{tail, PgError};

/// The OS user PostgreSQL runs as when the agent is root.
pub const DEFAULT_OS_USER: &str = "postgres";

/// How much of a tool's stderr goes into an error message.
const STDERR_TAIL_CHARS: usize = 2000;

/// Which OS user runs the PostgreSQL processes and owns their files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunAs {
    /// Not root: run as ourselves; files we create are already ours.
    CurrentUser,
    /// Root: drop to this user on every child and chown what Postgres must write.
    User { name: String, uid: u32, gid: u32 },
}

impl RunAs {
    /// Decides for this process: as root, `os_user` (looked up in the passwd database);
    /// otherwise the current user.
    pub fn resolve(os_user: &str) -> Result<RunAs, PgError> {
        RunAs::decide(Uid::effective().as_raw(), os_user, |name| {
            User::from_name(name)
                .ok()
                .flatten()
                .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
        })
    }

    /// The pure decision behind [`RunAs::resolve`]: `lookup` maps a user name to (uid, gid).
    pub fn decide(
        euid: u32,
        os_user: &str,
        lookup: impl Fn(&str) -> Option<(u32, u32)>,
    ) -> Result<RunAs, PgError> {
        if euid != 0 {
            return Ok(RunAs::CurrentUser);
        }
        let err = |why: &str| PgError::OsUser {
            user: os_user.to_string(),
            why: why.to_string(),
        };
        let (uid, gid) = lookup(os_user).ok_or_else(|| err("no such user"))?;
        if uid == 0 {
            return Err(err("it is root, and PostgreSQL refuses to run as root"));
        }
        Ok(RunAs::User {
            name: os_user.to_string(),
            uid,
            gid,
        })
    }

    /// The user name processes run as (for messages).
    pub fn user_name(&self) -> String {
        match self {
            RunAs::User { name, .. } => name.clone(),
            RunAs::CurrentUser => User::from_uid(Uid::effective())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| Uid::effective().to_string()),
        }
    }

    /// Makes `cmd` run as this user.
    pub fn apply(&self, cmd: &mut Command) {
        if let RunAs::User { uid, gid, .. } = self {
            // std drops supplementary groups itself when root sets a uid.
            cmd.uid(*uid).gid(*gid);
            // Root's HOME is not readable by the user: libpq (with any sslmode) stats
            // ~/.postgresql/postgresql.crt and fails on "Permission denied". The user's
            // own home from the passwd database ("/" when it has none).
            let home = User::from_uid(Uid::from_raw(*uid))
                .ok()
                .flatten()
                .map_or_else(|| std::path::PathBuf::from("/"), |u| u.dir);
            cmd.env("HOME", home);
        }
    }

    /// Gives `path` (not following symlinks) to this user; a no-op for the current user.
    pub fn chown(&self, path: &Path) -> std::io::Result<()> {
        match self {
            RunAs::CurrentUser => Ok(()),
            RunAs::User { uid, gid, .. } => std::os::unix::fs::lchown(path, Some(*uid), Some(*gid)),
        }
    }

    /// [`RunAs::chown`] on `path` and everything below it.
    pub fn chown_recursive(&self, path: &Path) -> std::io::Result<()> {
        if *self == RunAs::CurrentUser {
            return Ok(());
        }
        self.chown(path)?;
        let meta = fs::symlink_metadata(path)?;
        if meta.is_dir() {
            for entry in fs::read_dir(path)? {
                self.chown_recursive(&entry?.path())?;
            }
        }
        Ok(())
    }

    /// Creates `dir` (and missing parents) if needed, mode 0700, owned by this user.
    pub fn create_private_dir(&self, dir: &Path) -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        self.chown(dir)
    }

    /// Writes `contents` to `path` (replacing it) with `mode`, owned by this user.
    pub fn write_file(&self, path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".meridian-tmp");
        let tmp = std::path::PathBuf::from(tmp);
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)?;
            f.write_all(contents)?;
            f.sync_all()?;
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        self.chown(&tmp)?;
        fs::rename(&tmp, path)
    }
}

/// What a tool printed.
#[derive(Clone, Debug, Default)]
pub struct ToolOutput {
    pub stdout: String,
    pub stderr: String,
}

/// Environment variables that would silently redirect libpq-based tools elsewhere.
const LIBPQ_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGAPPNAME",
    "PGDATA",
    "PGTARGETSESSIONATTRS",
];

/// Runs `program args` as `run_as`, stdin from /dev/null, killing it if it has not exited
/// within `timeout`. Fails unless it exits 0.
pub(crate) async fn run_tool<I, S>(
    step: &'static str,
    program: &Path,
    args: I,
    run_as: &RunAs,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<ToolOutput, PgError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let tool = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.display().to_string());
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The unprivileged user may not be able to enter our working directory.
        .current_dir("/")
        .kill_on_drop(true);
    for k in LIBPQ_ENV {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_as.apply(&mut cmd);
    let child = cmd.spawn().map_err(|source| PgError::Spawn {
        step,
        tool: tool.clone(),
        source,
    })?;
    // Dropping the wait future on timeout drops the child, and kill_on_drop kills it.
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => {
            return Err(PgError::Spawn { step, tool, source });
        }
        Err(_) => {
            return Err(PgError::ToolTimeout {
                step,
                tool,
                timeout_ms: timeout.as_millis() as u64,
                stderr_tail: String::new(),
            })
        }
    };
    let output = ToolOutput {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if !out.status.success() {
        let mut text = output.stderr.clone();
        if text.trim().is_empty() {
            text = output.stdout.clone();
        }
        return Err(PgError::ToolFailed {
            step,
            tool,
            status: out.status.to_string(),
            stderr_tail: tail(&text, STDERR_TAIL_CHARS),
        });
    }
    Ok(output)
}

/// True when `pid` names a live process (a zombie counts as dead: with no reaper in a
/// container, a killed postmaster can linger as one).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    match proc_state(pid) {
        Some(state) => !matches!(state, Some('Z' | 'X')),
        None => false,
    }
}

/// The state letter of `pid` in `/proc/PID/stat` (`Some(None)` when it cannot be parsed;
/// `None` when there is no such process). One open and one read of the line's head: the
/// agent asks several times a round.
pub(crate) fn proc_state(pid: i32) -> Option<Option<char>> {
    use std::io::Read;
    let mut f = fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    // pid, the command name (at most 16 bytes, in parentheses) and the state fit easily.
    let mut buf = [0u8; 256];
    let n = f.read(&mut buf).ok()?;
    let head = &buf[..n];
    // The state follows the parenthesised command name, which may itself hold ')'.
    Some(
        head.iter()
            .rposition(|b| *b == b')')
            .and_then(|i| head[i + 1..].iter().find(|b| !b.is_ascii_whitespace()))
            .map(|b| char::from(*b)),
    )
}

/// The direct children of `pid` (from `/proc/*/stat`'s parent field).
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        if parent_in_stat(&stat) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// The parent pid in a `/proc/PID/stat` line: the second field after the parenthesised
/// command name (which may itself hold ')' or spaces).
fn parent_in_stat(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// SIGKILLs a postmaster and every one of its backends at once. Each backend is its own
/// process group leader (Postgres' `InitPostmasterChild` calls `setsid`), so killing the
/// postmaster's group does not reach them, and a backend in the middle of a statement
/// would finish it — and acknowledge its commit — before it noticed the postmaster's
/// death. The postmaster is stopped first, so it forks nothing between the listing of its
/// children and their end; a frozen (SIGSTOPped) postmaster and its backends die too.
pub(crate) fn kill_group(pid: i32) {
    if pid <= 0 {
        return;
    }
    let p = Pid::from_raw(pid);
    let _ = kill(p, Signal::SIGSTOP);
    for child in children_of(pid) {
        let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    }
    let _ = killpg(p, Signal::SIGKILL);
    let _ = kill(p, Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<(u32, u32)> {
        match name {
            "postgres" => Some((101, 104)),
            "root" => Some((0, 0)),
            _ => None,
        }
    }

    #[test]
    fn parent_pid_is_read_after_the_command_name() {
        assert_eq!(parent_in_stat("123 (postgres) S 42 123 123 0"), Some(42));
        assert_eq!(parent_in_stat("9 (a) b) (c) R 7 9 9"), Some(7));
        assert_eq!(parent_in_stat("garbage"), None);
    }

    #[test]
    fn non_root_runs_as_itself() {
        assert_eq!(
            RunAs::decide(1000, "postgres", lookup).unwrap(),
            RunAs::CurrentUser
        );
        // Even a user that does not exist does not matter when not root.
        assert_eq!(
            RunAs::decide(1000, "nobody-here", lookup).unwrap(),
            RunAs::CurrentUser
        );
    }

    #[test]
    fn root_drops_to_the_os_user() {
        assert_eq!(
            RunAs::decide(0, "postgres", lookup).unwrap(),
            RunAs::User {
                name: "postgres".into(),
                uid: 101,
                gid: 104
            }
        );
    }

    #[test]
    fn root_refuses_missing_or_root_user() {
        let e = RunAs::decide(0, "nobody-here", lookup).unwrap_err();
        assert!(e.to_string().contains("no such user"), "{e}");
        let e = RunAs::decide(0, "root", lookup).unwrap_err();
        assert!(e.to_string().contains("refuses to run as root"), "{e}");
    }

    #[test]
    fn our_own_pid_is_alive_and_a_bogus_one_is_not() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_alive(i32::MAX));
    }

    #[tokio::test]
    async fn tool_timeout_kills_and_says_so() {
        let started = std::time::Instant::now();
        let e = run_tool(
            "sleep test",
            Path::new("/bin/sleep"),
            ["10"],
            &RunAs::CurrentUser,
            &[],
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(e, PgError::ToolTimeout { .. }), "{e}");
        assert!(e.to_string().contains("sleep test"), "{e}");
    }

    #[tokio::test]
    async fn tool_failure_carries_stderr() {
        let e = run_tool(
            "sh test",
            Path::new("/bin/sh"),
            ["-c", "echo boom >&2; exit 3"],
            &RunAs::CurrentUser,
            &[],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("boom") && msg.contains("sh test"), "{msg}");
    }
}
