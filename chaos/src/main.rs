//! `meridian-chaos`: runs a real local Meridian cluster (real `meridian-node` agents and
//! real Postgres on 127.0.0.1, every link through the fault-injecting proxy mesh), plays
//! seeded fault scenarios against it under a client workload, and prints scorecards.
//!
//! Every command owns its cluster inside the future it runs; Ctrl-C or SIGTERM drops that
//! future, and dropping the cluster kills every process it started and removes its files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args as ClapArgs, Parser, Subcommand};
use meridian_chaos::cluster::{
    Cluster, ClusterOptions, HostsMode, Kind, Topology, DEFAULT_TOPOLOGY,
};
use meridian_chaos::mesh::LatencyMatrix;
use meridian_chaos::pg_cluster::PgCluster;
use meridian_chaos::runner::{run_scenario, PolicyChoice, RunOptions};
use meridian_chaos::schedule::Scenario;
use meridian_chaos::scorecard::{BenchReport, Scorecard};

/// Run a real local Meridian cluster behind a fault-injecting proxy mesh, drive it under
/// faults and score it.
///
/// Exit codes: 0 success (for run/bench: no invariant violated), 1 failure or violation,
/// 2 usage error.
#[derive(Parser, Debug)]
#[command(name = "meridian-chaos", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(ClapArgs, Debug, Clone)]
struct ClusterArgs {
    /// Regions and members: N data members, wN witnesses, e.g. us-east:2,us-west:2,eu-central:w1.
    #[arg(long, default_value = DEFAULT_TOPOLOGY)]
    topology: Topology,
    /// One-way latency overrides in ms on top of the default matrix, e.g. us-east:us-west=35.
    #[arg(long, default_value = "")]
    latency: LatencyMatrix,
    /// Directory holding meridian-node (default: next to this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep the run dir (configs, agent logs) instead of removing it.
    #[arg(long)]
    keep_run_dir: bool,
    /// Where members run: loopback (127.0.0.1, every member link through the proxy mesh)
    /// or netns (root only: one network namespace per member with its own address,
    /// partitions by packet filter, no latency injection).
    #[arg(long, default_value = "loopback")]
    hosts: HostsMode,
    /// pgBackRest repository directory (must be writable by the Postgres OS user): the
    /// data members archive into it and each scorecard gets `archive_gap`.
    #[arg(long, value_name = "DIR")]
    backup_repo: Option<PathBuf>,
}

impl ClusterArgs {
    fn options(&self, seed: u64) -> ClusterOptions {
        ClusterOptions {
            topology: self.topology.clone(),
            matrix: self.latency.clone(),
            seed,
            bin_dir: self.bin_dir.clone(),
            keep_dir: self.keep_run_dir,
            hosts: self.hosts,
            backup_repo: self.backup_repo.clone(),
            ..ClusterOptions::default()
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the topology with real agents and Postgres, print the members, their
    /// connection strings and meridianctl commands to try; run until Ctrl-C, then stop
    /// everything and remove its files.
    Demo {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Stop by itself after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// The plain Postgres demo instead: a primary and N streaming standbys, no agents.
        #[arg(long, value_name = "STANDBYS")]
        postgres_only: Option<u8>,
    },
    /// Run scenarios and print one scorecard each.
    Run {
        /// A scenario name or `all`: primary-kill, postgres-crash, agent-crash,
        /// primary-partition, region-loss, region-partition, latency-spike, flapping,
        /// switchover, raft-leader-kill, partial-partition, agent-freeze-partition,
        /// agent-kill-partition, cascade-kill, membership-partition, graceful-stop.
        #[arg(long)]
        scenario: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Replication policy: default | zero-rpo | async.
        #[arg(long, default_value = "default")]
        policy: PolicyChoice,
        /// Write the scorecard JSON here (an object for one scenario, an array for `all`).
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Measure what a healthy idle cluster costs (agent and watchdog CPU, the probes' CPU
    /// on Postgres against a plain Postgres, new sessions per second, agent RSS after a
    /// connection churn); exit 1 when a target of issue 14 is missed.
    IdleBench {
        /// Length of each measurement window, in seconds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=3600))]
        seconds: u64,
        /// gRPC and HTTP connections (each) opened and closed against one agent.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
        churn: u64,
        /// Regions and members.
        #[arg(long, default_value = meridian_chaos::idle_bench::IDLE_TOPOLOGY)]
        topology: Topology,
        /// Directory holding meridian-node (default: next to this executable).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Repeat a scenario with seeds 1..=N; print min/p50/p99/max of each timing.
    Bench {
        #[arg(long)]
        scenario: Scenario,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
        runs: u64,
        #[arg(long, default_value = "default")]
        policy: PolicyChoice,
        /// Write `{"runs": [...], "summary": {...}}` here.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meridian-chaos: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        // Dropping the command's future on a signal drops its cluster: every process dies.
        tokio::select! {
            r = execute(args.command) => r,
            r = stop_signal() => {
                r?;
                eprintln!("meridian-chaos: interrupted; stopping every process and removing the run dir");
                Ok(false)
            }
        }
    });
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("meridian-chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; Ok(false) when a scenario broke an invariant.
async fn execute(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Demo {
            postgres_only: Some(standbys),
            seconds,
            ..
        } => postgres_demo(usize::from(standbys), seconds)
            .await
            .map(|_| true),
        Command::Demo {
            cluster, seconds, ..
        } => demo(&cluster, seconds).await.map(|_| true),
        Command::Run {
            scenario,
            seed,
            policy,
            json,
            cluster,
        } => {
            let scenarios: Vec<Scenario> = if scenario == "all" {
                Scenario::ALL
                    .into_iter()
                    .filter(|sc| {
                        let skip =
                            cluster.hosts == HostsMode::Netns && sc.needs_latency_injection();
                        if skip {
                            eprintln!(
                                "meridian-chaos: skipping {sc}: it injects latency, which only --hosts loopback can (separate hosts have no latency injection)"
                            );
                        }
                        !skip
                    })
                    .collect()
            } else {
                vec![scenario.parse()?]
            };
            let mut cards = Vec::new();
            for sc in &scenarios {
                let card = one_run(*sc, seed, policy, &cluster).await;
                println!("{}", card.render_table());
                cards.push(card);
            }
            if let Some(path) = json {
                let v = if scenarios.len() == 1 {
                    serde_json::to_value(&cards[0])?
                } else {
                    serde_json::to_value(&cards)?
                };
                write_json(&path, &v)?;
            }
            if scenarios.len() > 1 {
                println!("{}", summary_line(&cards));
            }
            Ok(cards.iter().all(Scorecard::passed))
        }
        Command::IdleBench {
            seconds,
            churn,
            topology,
            bin_dir,
        } => {
            let opts = meridian_chaos::idle_bench::IdleBenchOptions {
                window: Duration::from_secs(seconds),
                churn: usize::try_from(churn)?,
                cluster: ClusterOptions {
                    topology,
                    bin_dir,
                    ..ClusterOptions::default()
                },
            };
            let report = meridian_chaos::idle_bench::run(&opts).await?;
            print!("{}", report.render());
            let misses = report.misses();
            for m in &misses {
                println!("MISSED: {m}");
            }
            if misses.is_empty() {
                println!("all targets met");
            }
            Ok(misses.is_empty())
        }
        Command::Bench {
            scenario,
            runs,
            policy,
            json,
            cluster,
        } => {
            let mut cards = Vec::new();
            for seed in 1..=runs {
                let card = one_run(scenario, seed, policy, &cluster).await;
                println!("{}", card.render_table());
                cards.push(card);
            }
            let report = BenchReport::from_runs(cards);
            println!(
                "{scenario} x{runs} ({policy}): {} failed",
                report.failures()
            );
            println!(
                "{:<28} {:>10} {:>10} {:>10} {:>10}",
                "field", "min", "p50", "p99", "max"
            );
            for (field, s) in &report.summary {
                println!(
                    "{field:<28} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                    s.min, s.p50, s.p99, s.max
                );
            }
            if let Some(path) = json {
                write_json(&path, &serde_json::to_value(&report)?)?;
            }
            Ok(report.failures() == 0)
        }
    }
}

/// One scenario run; a cluster that cannot even start becomes a failed scorecard, so
/// `run --scenario all` carries on with the next scenario.
async fn one_run(
    sc: Scenario,
    seed: u64,
    policy: PolicyChoice,
    cluster: &ClusterArgs,
) -> Scorecard {
    let mut opts = RunOptions::new(sc, seed, policy);
    opts.cluster = cluster.options(seed);
    match run_scenario(&opts).await {
        Ok(card) => card,
        Err(e) => {
            let mut card = Scorecard::new(sc.name(), seed, policy.name());
            card.violations.push(format!("harness: {e:#}"));
            card
        }
    }
}

fn summary_line(cards: &[Scorecard]) -> String {
    let failed: Vec<&str> = cards
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.scenario.as_str())
        .collect();
    if failed.is_empty() {
        format!("all {} scenarios passed", cards.len())
    } else {
        format!(
            "{} of {} scenarios FAILED: {}",
            failed.len(),
            cards.len(),
            failed.join(", ")
        )
    }
}

fn write_json(path: &std::path::Path, v: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))
}

async fn demo(args: &ClusterArgs, seconds: Option<u64>) -> anyhow::Result<()> {
    println!(
        "meridian-chaos demo: starting {} (hosts: {}) ...",
        args.topology, args.hosts
    );
    let cluster = Cluster::start(args.options(1))
        .await
        .context("bring up the cluster")?;
    println!("run dir: {}", cluster.dir().display());
    let formed = cluster.wait_raft_formed(Duration::from_secs(90)).await?;
    println!(
        "Raft group formed: leader {}",
        formed.leader().unwrap_or("-")
    );
    match cluster.wait_converged(Duration::from_secs(120)).await {
        Ok(s) => println!(
            "primary {} on timeline {}; every standby streams",
            s.primary().unwrap_or("-"),
            s.primary_timeline().unwrap_or_default()
        ),
        Err(e) => {
            println!("WARNING: Postgres has not converged yet ({e:#}); the agents keep trying")
        }
    }
    println!(
        "\n{:<14} {:<11} {:<8} {:<17} {:<17} postgres (direct)",
        "member", "region", "kind", "agent gRPC", "HTTP health"
    );
    for m in cluster.members() {
        println!(
            "{:<14} {:<11} {:<8} {:<17} {:<17} {}",
            m.name,
            m.region,
            if m.kind == Kind::Data {
                "data"
            } else {
                "witness"
            },
            m.grpc.to_string(),
            m.http.to_string(),
            m.pg_port
                .map_or("-".to_string(), |p| format!("{}:{p}", m.addr))
        );
    }
    if let Some(h) = cluster.netns() {
        println!(
            "\nhosts: one network namespace per member on {} (bridge {}):",
            h.subnet(),
            h.bridge_addr()
        );
        for host in h.hosts() {
            println!(
                "  {:<14} {:<15} ip netns exec {} ...",
                host.name,
                host.addr.to_string(),
                host.netns
            );
        }
        println!("\nwrite (finds the primary):");
    } else {
        println!("\nwrite from a region (through its proxies, finds the primary):");
    }
    for r in cluster.regions() {
        println!("  {r:<11} psql \"{}\"", cluster.client_conninfo(&r)?);
    }
    let endpoints: Vec<String> = cluster.members().map(|m| m.grpc.to_string()).collect();
    let a_standby = cluster
        .data_members()
        .into_iter()
        .last()
        .unwrap_or_default();
    println!("\ntry meridianctl:");
    println!("  export MERIDIAN_ENDPOINTS={}", endpoints.join(","));
    println!("  meridianctl list");
    println!("  meridianctl switchover --candidate {a_standby}");
    println!("  meridianctl history");
    println!(
        "  curl -s http://{}/cluster",
        cluster
            .members()
            .next()
            .map(|m| m.http.to_string())
            .unwrap_or_default()
    );
    println!("agent logs: {}/<member>/agent.log", cluster.dir().display());
    match seconds {
        Some(s) => {
            println!("\nrunning for {s} s ...");
            tokio::time::sleep(Duration::from_secs(s)).await;
        }
        None => {
            println!("\nrunning until Ctrl-C ...");
            std::future::pending::<()>().await;
        }
    }
    println!(
        "stopping: killing every agent and postmaster, removing {}",
        cluster.dir().display()
    );
    drop(cluster);
    Ok(())
}

async fn postgres_demo(standbys: usize, seconds: Option<u64>) -> anyhow::Result<()> {
    println!(
        "meridian-chaos demo --postgres-only: a primary and {standbys} streaming standbys ..."
    );
    // Dropping the cluster (also on error, panic or Ctrl-C) kills every postmaster and
    // removes the temp dir.
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
    match seconds {
        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        None => {
            println!("running until Ctrl-C ...");
            std::future::pending::<()>().await;
        }
    }
    drop(cluster);
    Ok(())
}

async fn stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("listen for Ctrl-C"),
        _ = term.recv() => Ok(()),
    }
}
