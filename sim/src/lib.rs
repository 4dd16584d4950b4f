//! meridian-sim: a deterministic, seeded discrete-time simulation of a Meridian cluster
//! that runs the real pure cores of `meridian-core` under generated fault schedules.
//!
//! What is real: `Intent::validate`/`apply` for every command the simulated Raft commits,
//! the leader's `decide` over the committed intent and the members' reports, the lease
//! arithmetic of voters and primary (`meridian_core::lease`), and the local planner
//! (`meridian_core::plan`). What is simulated ([`world`]): Raft as a majority-committed log
//! with terms and elections, the network (per-link latency, jitter, loss, full, one-way and
//! partial partitions), per-member clock-rate drift, pauses and crashes, Postgres (WAL,
//! timelines, `ANY k (...)` sync acks, promote, rewind, fence) and client writers.
//!
//! Everything follows from the seed ([`Scenario::generate`]); [`run`] replays it exactly and
//! reports every invariant violation ([`Violation`]). The checks ([`Invariant`]):
//! at most one Postgres acknowledges commits, no commit acknowledged under a zero-loss
//! policy is missing from the final primary, the generation only grows, and the cluster
//! converges after the faults heal.

pub mod scenario;
pub mod world;

pub use scenario::{Fault, FaultKind, Scenario, Topology};
pub use world::{run, Outcome};

use std::fmt;

/// The properties checked at every step (and at the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    /// At most one Postgres acknowledges commits: two members acknowledged in the same
    /// step, or a Postgres promoted in an older generation acknowledged after one of a
    /// newer generation did.
    OneWriter,
    /// A commit acknowledged while a zero-loss policy covered it is missing from the
    /// final primary's history.
    NoAcknowledgedLoss,
    /// A member's applied generation went down, or two members committed different
    /// entries at the same log index.
    GenerationGrows,
    /// After the faults healed, the cluster did not reach one primary with every standby
    /// streaming from it within the bound.
    Converges,
}

impl Invariant {
    pub const ALL: [Invariant; 4] = [
        Invariant::OneWriter,
        Invariant::NoAcknowledgedLoss,
        Invariant::GenerationGrows,
        Invariant::Converges,
    ];
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Invariant::OneWriter => "one writer",
            Invariant::NoAcknowledgedLoss => "no acknowledged loss",
            Invariant::GenerationGrows => "generation grows",
            Invariant::Converges => "converges after heal",
        })
    }
}

/// One violation: which invariant, when (simulated ms) and what was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: Invariant,
    pub at_ms: u64,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {} ms: {}",
            self.invariant, self.at_ms, self.detail
        )
    }
}

/// Runs `seed`: the scenario it generates, under the real rules.
pub fn run_seed(seed: u64) -> Outcome {
    run(&Scenario::generate(seed), false)
}

/// The seed to replay from `MERIDIAN_SIM_SEED`, if set.
pub fn seed_from_env() -> Option<u64> {
    std::env::var("MERIDIAN_SIM_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}
