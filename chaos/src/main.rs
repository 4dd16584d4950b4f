//! `meridian-chaos`: runs a real local cluster and, later, scenarios under faults.
//!
//! Today `demo` brings up a real primary with streaming standbys on 127.0.0.1 through the
//! control layer; the agents, the proxy mesh and the scenario runner join it as they land.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meridian_chaos::pg_cluster::PgCluster;

/// Run a real local Meridian cluster (real Postgres on 127.0.0.1) and, as the harness
/// grows, drive it under faults and print a scorecard.
///
/// Exit codes: 0 success, 1 failure, 2 usage error.
#[derive(Parser, Debug)]
#[command(name = "meridian-chaos", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a local cluster (a primary and streaming standbys, real PostgreSQL), print
    /// how to reach it, keep it running until Ctrl-C, then stop it and remove its files.
    Demo {
        /// Number of streaming standbys.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=8))]
        standbys: u8,
        /// Stop by itself after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meridian-chaos: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        match args.command {
            Command::Demo { standbys, seconds } => demo(usize::from(standbys), seconds).await,
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meridian-chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(standbys: usize, seconds: Option<u64>) -> anyhow::Result<()> {
    println!("meridian-chaos demo: starting a primary and {standbys} streaming standbys ...");
    // Dropping the cluster (also on error or panic) kills every postmaster and removes
    // the temp dir.
    let cluster = PgCluster::start(standbys)
        .await
        .context("bring up the local cluster")?;
    println!("data dir: {}", cluster.dir().display());
    println!("{:<6} {:<8} {:<6} conninfo", "member", "role", "port");
    for (i, inst) in cluster.instances().iter().enumerate() {
        let role = if i == 0 { "primary" } else { "standby" };
        println!(
            "{:<6} {:<8} {:<6} {}",
            inst.application_name(),
            role,
            inst.port(),
            cluster.conninfo(i)
        );
    }
    let hosts = vec!["127.0.0.1"; cluster.instances().len()].join(",");
    let ports: Vec<String> = cluster
        .instances()
        .iter()
        .map(|i| i.port().to_string())
        .collect();
    println!(
        "\nwrite through any member: psql \"host={hosts} port={} user=postgres dbname=postgres target_session_attrs=read-write\"",
        ports.join(",")
    );
    let primary = cluster.primary().probe().await;
    println!(
        "primary: timeline {}, WAL at {}, {} standby(s) streaming",
        primary.timeline.unwrap_or_default(),
        primary.current_lsn.unwrap_or_default(),
        primary
            .standbys
            .iter()
            .filter(|s| s.state == "streaming")
            .count()
    );
    match seconds {
        Some(s) => {
            println!("running for {s} s ...");
            tokio::time::sleep(Duration::from_secs(s)).await;
        }
        None => {
            println!("running until Ctrl-C ...");
            wait_for_stop_signal().await?;
        }
    }
    println!(
        "stopping: killing every postmaster and removing {}",
        cluster.dir().display()
    );
    drop(cluster);
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("listen for Ctrl-C"),
        _ = term.recv() => Ok(()),
    }
}
