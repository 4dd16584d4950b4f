//! The fencing watchdog: a separate `meridian-node --watchdog-of <agent pid>` process that
//! enforces the primary's fence deadline even when the agent itself cannot — frozen
//! (SIGSTOP), killed, or starved. The agent arms it after every accepted lease renewal by
//! writing the deadline (send time + `timing.fence_after`, on the system-wide
//! `CLOCK_MONOTONIC`, the same clock in both processes) to `state_dir/watchdog`, and
//! disarms it when it is not the primary. Past an armed deadline the watchdog fences the
//! local Postgres (marker, then kill) — unless other members' agents still probe it (their
//! `meridian-peer-probe` sessions ran a query within two observe intervals): the leader
//! never promotes while a fresh observer sees this Postgres take writes, so it may keep
//! serving (an agent crash alone must not take the primary down). It exits once its agent
//! is gone and nothing is left to enforce, so it never outlives its agent by more than one
//! deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::pg::PgInstance;

/// File name of the deadline under `state_dir`.
pub const FILE: &str = "watchdog";
/// How often the watchdog checks.
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// Now on `CLOCK_MONOTONIC`, in milliseconds.
pub fn monotonic_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            u64::try_from(ts.tv_sec()).unwrap_or(0) * 1000
                + u64::try_from(ts.tv_nsec()).unwrap_or(0) / 1_000_000
        }
        Err(_) => 0,
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Arms the watchdog with `deadline_ms` (CLOCK_MONOTONIC) or disarms it (None). Atomic
/// (write then rename), so the watchdog never reads half a line.
pub fn write(state_dir: &Path, deadline_ms: Option<u64>) -> std::io::Result<()> {
    let text = match deadline_ms {
        Some(d) => format!("armed {d}\n"),
        None => "disarmed\n".to_string(),
    };
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path(state_dir))
}

/// The armed deadline, if armed.
pub fn read(state_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    text.strip_prefix("armed ")?.trim().parse().ok()
}

/// Spawns the watchdog process of this agent (same binary, same config).
pub fn spawn(config: &Config) -> anyhow::Result<std::process::Child> {
    write(&config.state_dir, None).context("disarming the watchdog file")?;
    let exe = std::env::current_exe().context("locating the agent's binary")?;
    std::process::Command::new(exe)
        .arg("--config")
        .arg(&config.source)
        .arg("--watchdog-of")
        .arg(std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("spawning the watchdog")
}

/// How long ago another member's agent last probed this Postgres (the end of its last
/// query on a `meridian-peer-probe` session); None when none does or the server does not
/// answer in time (a frozen postmaster is then fenced).
async fn last_peer_probe(pg: &PgInstance) -> Option<Duration> {
    let bound = Duration::from_millis(300);
    let client = tokio::time::timeout(bound, pg.connect()).await.ok()?.ok()?;
    let row = tokio::time::timeout(
        bound,
        client.query_one(
            "SELECT (extract(epoch FROM now() - max(state_change)) * 1000)::float8 \
             FROM pg_stat_activity WHERE application_name = 'meridian-peer-probe'",
            &[],
        ),
    )
    .await
    .ok()?
    .ok()?;
    let ms: Option<f64> = row.get(0);
    ms.map(|m| Duration::from_millis(m.max(0.0) as u64))
}

/// The watchdog's loop (in its own process).
pub async fn run(config: Config, agent_pid: i32) -> anyhow::Result<()> {
    let pg: PgInstance = super::observe::local_instance(&config)
        .await
        .context("this member manages no Postgres")?;
    let fence_timeout = config.timing.pg_probe_timeout * 2;
    tracing::info!(agent_pid, "watchdog running");
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let deadline = read(&config.state_dir);
        let agent_alive = crate::pg::pid_alive(agent_pid);
        match deadline {
            Some(d) if monotonic_ms() >= d => {
                let watched = pg.is_running()
                    && !pg.is_fenced()
                    && last_peer_probe(&pg)
                        .await
                        .is_some_and(|age| age < config.timing.observe_interval * 2);
                if !watched && pg.is_running() && !pg.is_fenced() {
                    tracing::error!(
                        "watchdog: the primary's lease deadline passed without a renewal; fencing the local Postgres"
                    );
                    if let Err(e) = pg.fence(fence_timeout).await {
                        tracing::error!("watchdog: fencing: {e}");
                    }
                }
                if !agent_alive {
                    return Ok(());
                }
            }
            Some(_) => {}
            None if !agent_alive => return Ok(()),
            None => {}
        }
    }
}
