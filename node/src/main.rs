//! `meridian-node`: the agent binary. Loads and validates its config, initializes logging,
//! runs the agent on a tokio runtime, and stops it cleanly on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use meridian_node::agent::Agent;
use meridian_node::config::Config;
use tokio::signal::unix::{signal, SignalKind};

/// Meridian agent: runs beside one PostgreSQL instance (or as a witness), joins the
/// cluster's Raft group, observes its Postgres and acts on the cluster's decisions.
///
/// Exit codes: 0 clean shutdown, 1 runtime failure, 2 usage or configuration error.
#[derive(Parser, Debug)]
#[command(name = "meridian-node", version, about)]
struct Args {
    /// Path of the agent's TOML configuration file (see examples/ for one per member).
    #[arg(long, short = 'c', value_name = "FILE.toml")]
    config: PathBuf,
    /// Only load and validate the configuration, print a summary, and exit.
    #[arg(long)]
    check: bool,
    /// Internal: run as the fencing watchdog of the agent with this pid.
    #[arg(long, hide = true, value_name = "PID")]
    watchdog_of: Option<i32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meridian-node: {e}");
            return ExitCode::from(2);
        }
    };
    // An address that is not on this host is a config error too (the watchdog shares the
    // agent's host and config, and binds nothing).
    if args.watchdog_of.is_none() {
        if let Err(e) = meridian_node::config::check_local_addresses(&config) {
            eprintln!("meridian-node: {e}");
            return ExitCode::from(2);
        }
    }
    if args.check {
        println!(
            "config {} is valid: member {} ({}, region {}) of cluster {}",
            config.source.display(),
            config.member.name,
            config.member.kind,
            config.member.region,
            config.cluster
        );
        return ExitCode::SUCCESS;
    }
    init_logging();
    if let Some(agent_pid) = args.watchdog_of {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("meridian-node watchdog: cannot start the async runtime: {e}");
                return ExitCode::from(1);
            }
        };
        return match runtime.block_on(meridian_node::agent::watchdog::run(config, agent_pid)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("watchdog: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    // One worker: at idle the agent is a few dozen small wake-ups a second, and a second
    // worker only added cross-thread wake-ups (issue 14's idle cost). Blocking work never
    // runs on it: redb commits go through spawn_blocking, tools are child processes.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("meridian")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meridian-node: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

/// The default log filter: info; openraft's own chatter only from warn, except its core's
/// notices of a stale message ignored after a vote or membership change (a warning on
/// every leader change, nothing to act on), which need `error`; and tonic's refused TLS
/// handshakes (a peer with a bad certificate), which tonic logs at debug.
pub const DEFAULT_LOG_FILTER: &str =
    "info,openraft=warn,openraft::core::raft_core=error,tonic::transport::server::io_stream=debug";

/// One line per event on stderr; `RUST_LOG` overrides the default.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let agent = Agent::start(config).await?;
    let which = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!("{which} received; stopping");
    agent.stop_gracefully().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::DEFAULT_LOG_FILTER;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_default_filter_hides_openraft_vote_changed_notices_only() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                target: "openraft::core::raft_core",
                "A message will be ignored because vote changed"
            );
            tracing::warn!(target: "openraft::replication", "replication warning");
            tracing::info!(target: "openraft::engine", "openraft info");
            tracing::info!(target: "meridian_node::agent", "agent info");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("vote changed"), "{text}");
        assert!(!text.contains("openraft info"), "{text}");
        assert!(text.contains("replication warning"), "{text}");
        assert!(text.contains("agent info"), "{text}");
    }
}
