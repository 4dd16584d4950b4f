//! `meridian-sim`: runs long simulation campaigns (`--seeds N --from S`) with a progress
//! line and a summary (violations per invariant, slowest convergence), or replays one seed
//! with its trace (`--seed S --trace`).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use clap::Parser;
use meridian_sim::{run, Invariant, Outcome, Scenario};

#[derive(Parser)]
#[command(about = "Deterministic simulation of a Meridian cluster under seeded fault schedules")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Replay this one seed and print its schedule and trace.
    #[arg(long)]
    seed: Option<u64>,
    /// With --seed: print the trace of the run.
    #[arg(long)]
    trace: bool,
    /// Worker threads (default: the available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Every fault combination, including those of open findings (sim/FINDINGS.md) that
    /// the green campaign leaves out.
    #[arg(long)]
    all: bool,
    /// Re-introduce a known bad rule (builds with `--features mutants` only):
    /// promote-without-sync-quorum, fence-after-lease, grant-without-generation-check.
    #[arg(long)]
    mutation: Option<String>,
    /// Print at most this many failing seeds in the summary.
    #[arg(long, default_value_t = 20)]
    show: usize,
}

fn main() {
    let args = Args::parse();
    let mutation = mutation(args.mutation.as_deref());
    set_mutation(&mutation);
    if let Some(seed) = args.seed {
        let sc = profile(args.all)(seed);
        println!("{sc}");
        let out = run(&sc, args.trace);
        for line in &out.trace {
            println!("{line}");
        }
        report_one(&out);
        std::process::exit(if out.ok() { 0 } else { 1 });
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let next = AtomicU64::new(args.from);
    let done = AtomicU64::new(0);
    let end = args.from + args.seeds;
    let results: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                set_mutation(&mutation);
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                let out = run(&profile(args.all)(seed), false);
                results.lock().unwrap_or_else(|e| e.into_inner()).push(out);
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d.is_multiple_of(500) || d == args.seeds {
                    let failed = results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .filter(|o| !o.ok())
                        .count();
                    eprint!(
                        "\r{d}/{} seeds, {failed} failing, {:.1} s",
                        args.seeds,
                        started.elapsed().as_secs_f64()
                    );
                    let _ = std::io::stderr().flush();
                }
            });
        }
    });
    eprintln!();
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|o| o.seed);
    println!(
        "{} seeds from {} in {:.1} s on {threads} threads",
        args.seeds,
        args.from,
        started.elapsed().as_secs_f64()
    );
    for inv in Invariant::ALL {
        let seeds: Vec<u64> = results
            .iter()
            .filter(|o| o.violations.iter().any(|v| v.invariant == inv))
            .map(|o| o.seed)
            .collect();
        let shown: Vec<String> = seeds.iter().take(args.show).map(u64::to_string).collect();
        println!(
            "  {inv:<22} {:>6} seeds{}{}",
            seeds.len(),
            if seeds.is_empty() { "" } else { ": " },
            shown.join(" ")
        );
    }
    let acked: usize = results.iter().map(|o| o.acked).sum();
    let allowed: usize = results.iter().map(|o| o.allowed_loss).sum();
    let failovers: u64 = results.iter().map(|o| o.failovers).sum();
    println!("  acknowledged commits {acked}, lost where the policy allowed it {allowed}, promotions {failovers}");
    if let Some(slowest) = results
        .iter()
        .filter_map(|o| o.converged_after_ms.map(|ms| (ms, o.seed)))
        .max()
    {
        println!(
            "  slowest convergence {} ms (seed {})",
            slowest.0, slowest.1
        );
    }
    if results.iter().any(|o| !o.ok()) {
        std::process::exit(1);
    }
}

#[cfg(feature = "mutants")]
type Mutation = Option<meridian_core::mutants::Mutation>;
#[cfg(not(feature = "mutants"))]
type Mutation = Option<()>;

#[cfg(feature = "mutants")]
fn mutation(name: Option<&str>) -> Mutation {
    use meridian_core::mutants::Mutation as M;
    let name = name?;
    Some(match name {
        "promote-without-sync-quorum" => M::PromoteWithoutSyncQuorum,
        "fence-after-lease" => M::FenceAfterLease,
        "grant-without-generation-check" => M::GrantWithoutGenerationCheck,
        "gate-ignores-lease" => M::GateIgnoresLease,
        other => {
            eprintln!("unknown mutation {other:?}");
            std::process::exit(2);
        }
    })
}

#[cfg(not(feature = "mutants"))]
fn mutation(name: Option<&str>) -> Mutation {
    if name.is_some() {
        eprintln!("--mutation needs a build with --features mutants");
        std::process::exit(2);
    }
    None
}

#[cfg(feature = "mutants")]
fn set_mutation(m: &Mutation) {
    meridian_core::mutants::set(*m);
}

#[cfg(not(feature = "mutants"))]
fn set_mutation(_: &Mutation) {}

fn profile(all: bool) -> fn(u64) -> Scenario {
    if all {
        Scenario::generate
    } else {
        Scenario::campaign
    }
}

fn report_one(out: &Outcome) {
    if out.ok() {
        println!(
            "seed {}: ok ({} acknowledged commits, {} promotions, converged {:?} ms after the heal)",
            out.seed, out.acked, out.failovers, out.converged_after_ms
        );
    } else {
        for v in &out.violations {
            println!("seed {}: {v}", out.seed);
        }
    }
}
