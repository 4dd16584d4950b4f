//! `meridian-node`: the agent binary. Parses its config and runs the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Meridian agent: runs beside one PostgreSQL instance (or as a witness), joins the
/// cluster's Raft group, observes its Postgres and acts on the cluster's decisions.
#[derive(Parser, Debug)]
#[command(name = "meridian-node", version, about)]
struct Args {
    /// Path of the agent's TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE.toml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = args;
    ExitCode::SUCCESS
}
