//! `meridianctl`: the operator's command line. Talks to the admin API of any member.

use clap::{Parser, Subcommand};

/// Operate a Meridian cluster: list members, switch over, fail over, pause, show history.
///
/// Exit codes: 0 success, 1 the operation failed or was refused, 2 usage error.
#[derive(Parser, Debug)]
#[command(name = "meridianctl", version, about)]
struct Args {
    /// Admin API endpoint of a member (host:port); repeatable.
    #[arg(long, env = "MERIDIAN_ENDPOINTS", value_delimiter = ',')]
    endpoint: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print meridianctl's version.
    Version,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Version => {
            println!("meridianctl {}", env!("CARGO_PKG_VERSION"));
            std::process::ExitCode::SUCCESS
        }
    }
}
