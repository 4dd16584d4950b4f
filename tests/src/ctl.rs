//! Runs the built `meridianctl` binary for end-to-end tests: bounded in time (killed when
//! it overruns), with a clean environment (no inherited `MERIDIAN_*` variables, `HOME`
//! pointed at an empty directory so no user config file is read), and its exit code,
//! stdout and stderr captured.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

/// Bound on one `meridianctl` run unless the caller gives another.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of the built `meridianctl`: next to the test executable's `deps/` directory.
pub fn ctl_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target/<profile> directory")?;
    let bin = profile_dir.join("meridianctl");
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: build it first (cargo build -p meridianctl)",
        bin.display()
    );
    Ok(bin)
}

/// What one run produced.
#[derive(Debug)]
pub struct CtlRun {
    /// `None` when it was killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CtlRun {
    /// stdout parsed as JSON (panics with the output when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// Runs `meridianctl args...` with `env` added to a clean environment, stdin closed
/// (not a terminal), bounded by `within`.
pub async fn run_ctl_env(
    args: &[&str],
    env: &[(&str, &str)],
    within: Duration,
) -> anyhow::Result<CtlRun> {
    let home = tempfile::Builder::new()
        .prefix("meridianctl-home-")
        .tempdir()
        .context("creating an empty HOME")?;
    let mut cmd = tokio::process::Command::new(ctl_binary()?);
    cmd.args(args)
        .env_remove("MERIDIAN_ENDPOINTS")
        .env_remove("MERIDIAN_TOKEN")
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let child = cmd.spawn().context("spawning meridianctl")?;
    let out = tokio::time::timeout(within, child.wait_with_output())
        .await
        .with_context(|| {
            format!(
                "meridianctl {args:?} still ran after {} s",
                within.as_secs()
            )
        })?
        .context("waiting for meridianctl")?;
    Ok(CtlRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    })
}

/// [`run_ctl_env`] with no extra environment and [`CTL_TIMEOUT`].
pub async fn run_ctl(args: &[&str]) -> anyhow::Result<CtlRun> {
    run_ctl_env(args, &[], CTL_TIMEOUT).await
}
