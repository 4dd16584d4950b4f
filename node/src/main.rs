//! `meridian-node`: the agent binary. Loads and validates its config, then runs the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use meridian_node::config::Config;

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
    eprintln!(
        "meridian-node: the agent runtime is not built yet; use --check to validate {}",
        config.source.display()
    );
    ExitCode::from(1)
}
