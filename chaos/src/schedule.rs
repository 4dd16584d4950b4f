//! Seeded fault schedules: for each scenario name, a list of timed abstract fault steps
//! generated deterministically from `--seed`. Targets are abstract ([`Target`],
//! [`RegionSet`]) and resolved by the runner when the step fires, because which member is the
//! primary or the Raft leader is only known then.
//!
//! The seed varies the fault start and durations a little (never the kind of fault), so runs
//! of one scenario explore timing without becoming different experiments.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::seeded;

/// The named chaos scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// SIGKILL the primary's agent and Postgres (host gone), restart them later.
    PrimaryKill,
    /// SIGKILL the primary's Postgres only; its agent sees it and reports.
    PostgresCrash,
    /// SIGKILL the primary's agent only; its watchdog fences the Postgres at the lease
    /// deadline and the cluster fails over; the agent comes back as a standby.
    AgentCrash,
    /// Network-isolate the primary member, heal later.
    PrimaryPartition,
    /// Kill every member of the primary's region, restart them later.
    RegionLoss,
    /// Partition the primary's region from all others, heal later.
    RegionPartition,
    /// Multiply every link latency (×10) with jitter, heal later.
    LatencySpike,
    /// Isolate and heal the primary repeatedly with periods around the lease.
    Flapping,
    /// Planned switchover to a standby.
    Switchover,
    /// SIGKILL the Raft leader when it is not the primary's member, restart it later.
    RaftLeaderKill,
    /// A partial partition: the members in a seeded ring (the primary first), each link
    /// between non-neighbours cut, so every member still sees a majority (itself and its
    /// two neighbours of five) but no two see the same one; heal later.
    PartialPartition,
    /// SIGSTOP the primary's agent, then partition its region from the others; heal,
    /// SIGCONT. Its region's peers keep seeing its Postgres; the majority does not.
    AgentFreezePartition,
    /// SIGKILL the primary's agent, then partition its region from the others; heal,
    /// restart the agent.
    AgentKillPartition,
    /// Kill a streaming standby, then the primary, then the new primary, a lease apart
    /// each; everything restarts at the end (the zero-rpo policy's hardest sequence).
    CascadeKill,
    /// Partition the primary's region from the others, then remove the primary's
    /// in-region peer from the membership through the majority side; heal.
    MembershipPartition,
    /// SIGTERM the primary's agent (`systemctl stop`): it hands over, then stops; start
    /// it again later.
    GracefulStop,
    /// Freeze every process of the primary's host (agent, watchdog, Postgres: a VM pause)
    /// for several leases; thaw Postgres first and the agent 500 ms later. The thawed old
    /// primary must acknowledge nothing once another took over (the lease gate under an
    /// async policy, the standbys under a sync one).
    HostFreeze,
}

impl Scenario {
    pub const ALL: [Scenario; 17] = [
        Scenario::PrimaryKill,
        Scenario::PostgresCrash,
        Scenario::AgentCrash,
        Scenario::PrimaryPartition,
        Scenario::RegionLoss,
        Scenario::RegionPartition,
        Scenario::LatencySpike,
        Scenario::Flapping,
        Scenario::Switchover,
        Scenario::RaftLeaderKill,
        Scenario::PartialPartition,
        Scenario::AgentFreezePartition,
        Scenario::AgentKillPartition,
        Scenario::CascadeKill,
        Scenario::MembershipPartition,
        Scenario::GracefulStop,
        Scenario::HostFreeze,
    ];

    /// Whether the scenario's faults include latency, which only the proxy mesh injects
    /// (`--hosts loopback`).
    pub fn needs_latency_injection(self) -> bool {
        self == Scenario::LatencySpike
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::PrimaryKill => "primary-kill",
            Scenario::PostgresCrash => "postgres-crash",
            Scenario::AgentCrash => "agent-crash",
            Scenario::PrimaryPartition => "primary-partition",
            Scenario::RegionLoss => "region-loss",
            Scenario::RegionPartition => "region-partition",
            Scenario::LatencySpike => "latency-spike",
            Scenario::Flapping => "flapping",
            Scenario::Switchover => "switchover",
            Scenario::RaftLeaderKill => "raft-leader-kill",
            Scenario::PartialPartition => "partial-partition",
            Scenario::AgentFreezePartition => "agent-freeze-partition",
            Scenario::AgentKillPartition => "agent-kill-partition",
            Scenario::CascadeKill => "cascade-kill",
            Scenario::MembershipPartition => "membership-partition",
            Scenario::GracefulStop => "graceful-stop",
            Scenario::HostFreeze => "host-freeze",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct UnknownScenario(pub String);

impl fmt::Display for UnknownScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
        write!(
            f,
            "unknown scenario {:?} (known: {}, all)",
            self.0,
            known.join(", ")
        )
    }
}

impl std::error::Error for UnknownScenario {}

impl FromStr for Scenario {
    type Err = UnknownScenario;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == s)
            .ok_or_else(|| UnknownScenario(s.to_string()))
    }
}

/// A member, resolved when the step fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The member currently holding the primary.
    Primary,
    /// The Raft leader, provided it is not the primary's member; if it is, the runner waits
    /// (bounded) for or arranges a leader elsewhere, or skips the step and says so.
    RaftLeaderNotPrimary,
    /// Whatever member the first member-targeting step of this schedule resolved to.
    Victim,
    /// The n-th (mod count) healthy standby in name order.
    Standby(u32),
    /// A member by name.
    Member(String),
    /// Another member of the primary's region (data or witness, in name order); the first
    /// streaming standby when the primary's region has no other member.
    PeerOfPrimary,
}

/// A set of regions, resolved when the step fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegionSet {
    /// The current primary's region.
    PrimaryRegion,
    /// Every region except the current primary's.
    OtherThanPrimary,
    /// Whatever region the first region-targeting step of this schedule resolved to.
    VictimRegion,
    Named(Vec<String>),
}

impl RegionSet {
    /// The concrete regions, given the current primary's region, the victim region recorded
    /// by an earlier step, and all regions. None when a needed input is unknown (e.g. no
    /// primary yet). Sorted, without duplicates; names are not checked against `all`.
    pub fn resolve(
        &self,
        primary_region: Option<&str>,
        victim_region: Option<&str>,
        all: &BTreeSet<String>,
    ) -> Option<Vec<String>> {
        let v: Vec<String> = match self {
            RegionSet::PrimaryRegion => vec![primary_region?.to_string()],
            RegionSet::VictimRegion => vec![victim_region?.to_string()],
            RegionSet::OtherThanPrimary => {
                let p = primary_region?;
                all.iter().filter(|r| *r != p).cloned().collect()
            }
            RegionSet::Named(names) => {
                let set: BTreeSet<String> = names.iter().cloned().collect();
                set.into_iter().collect()
            }
        };
        Some(v)
    }
}

/// One abstract fault action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    /// SIGKILL the agent process.
    KillAgent { target: Target },
    /// SIGKILL the postmaster.
    KillPostgres { target: Target },
    /// SIGKILL the agent and the postmaster (host crash).
    KillMember { target: Target },
    /// Start the agent again (it brings its Postgres back as it sees fit).
    RestartAgent { target: Target },
    /// Start the agent (and, if down, its Postgres via the agent) after a host crash.
    RestartMember { target: Target },
    /// SIGSTOP the agent.
    StopAgent { target: Target },
    /// SIGCONT the agent.
    ContAgent { target: Target },
    /// Blackhole every member link to and from the target (see `Mesh::isolate_member`).
    Isolate { target: Target },
    /// Blackhole every link between the two region sets.
    Partition { a: RegionSet, b: RegionSet },
    /// Every link back to base latency, no blackhole.
    Heal,
    /// Multiply every link latency by `factor`, add `jitter_ms` per direction.
    LatencySpike { factor: f64, jitter_ms: u64 },
    /// Planned switchover (to the given member, or the cluster's choice).
    Switchover { to: Option<Target> },
    /// Kill every member of the regions (agents and Postgres) and blackhole their links.
    KillRegion { regions: RegionSet },
    /// Heal the regions' links and restart their members.
    RestartRegion { regions: RegionSet },
    /// A partial partition: order the members in a ring, the primary first and the others
    /// shuffled by `order_seed`, and cut every member link between non-neighbours.
    Ring { order_seed: u64 },
    /// SIGTERM the agent (a graceful stop, as `systemctl stop` sends).
    TermAgent { target: Target },
    /// Remove the member from the cluster's membership (through the Raft leader).
    RemoveMember { target: Target },
    /// SIGSTOP every process of the member's host (agent, watchdog, Postgres).
    FreezeHost { target: Target },
    /// SIGCONT them: Postgres first, the agent 500 ms later.
    ThawHost { target: Target },
}

/// An action at an offset from the start of the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub at_ms: u64,
    pub action: Action,
}

/// How long `latency-spike` keeps every link ×10 (plus up to 2 s from the seed).
pub const LATENCY_SPIKE_MS: u64 = 30_000;

/// Timing knobs the generator varies around.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleParams {
    /// The cluster's primary lease (fault durations and flapping periods scale with it).
    pub lease_ms: u64,
    /// Earliest fault time: the workload has warmed up by then.
    pub warmup_ms: u64,
    /// Observation time after the last step, to measure recovery and convergence.
    pub settle_ms: u64,
}

impl Default for ScheduleParams {
    fn default() -> Self {
        ScheduleParams {
            lease_ms: 2_000,
            warmup_ms: 5_000,
            settle_ms: 15_000,
        }
    }
}

/// A deterministic fault schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub scenario: Scenario,
    pub seed: u64,
    pub params: ScheduleParams,
    /// Sorted by `at_ms`.
    pub steps: Vec<Step>,
    /// When the run ends (last step plus `settle_ms`).
    pub end_ms: u64,
}

impl Schedule {
    /// The schedule for `scenario` under `seed`; the same inputs always give the same
    /// schedule.
    pub fn generate(scenario: Scenario, seed: u64, params: ScheduleParams) -> Schedule {
        let index = Scenario::ALL
            .iter()
            .position(|s| *s == scenario)
            .unwrap_or(0);
        let mut rng = seeded::rng(seed, 0x5C4E_0000 + index as u64);
        let lease = params.lease_ms.max(1);
        let start = params.warmup_ms + seeded::range_inclusive(&mut rng, 0, 1_000);
        // Long enough for the lease to expire and a failover to finish, varied by the seed.
        let outage = |rng: &mut ChaCha8Rng| 3 * lease + seeded::range_inclusive(rng, 0, 2_000);
        let mut steps = Vec::new();
        let mut at = |at_ms: u64, action: Action| steps.push(Step { at_ms, action });
        match scenario {
            Scenario::PrimaryKill => {
                at(
                    start,
                    Action::KillMember {
                        target: Target::Primary,
                    },
                );
                let back = start + outage(&mut rng);
                at(
                    back,
                    Action::RestartMember {
                        target: Target::Victim,
                    },
                );
            }
            Scenario::PostgresCrash => {
                at(
                    start,
                    Action::KillPostgres {
                        target: Target::Primary,
                    },
                );
            }
            Scenario::AgentCrash => {
                at(
                    start,
                    Action::KillAgent {
                        target: Target::Primary,
                    },
                );
                let back = start + outage(&mut rng);
                at(
                    back,
                    Action::RestartAgent {
                        target: Target::Victim,
                    },
                );
            }
            Scenario::PrimaryPartition => {
                at(
                    start,
                    Action::Isolate {
                        target: Target::Primary,
                    },
                );
                at(start + outage(&mut rng), Action::Heal);
            }
            Scenario::HostFreeze => {
                at(
                    start,
                    Action::FreezeHost {
                        target: Target::Primary,
                    },
                );
                at(
                    start + outage(&mut rng),
                    Action::ThawHost {
                        target: Target::Victim,
                    },
                );
            }
            Scenario::RegionLoss => {
                at(
                    start,
                    Action::KillRegion {
                        regions: RegionSet::PrimaryRegion,
                    },
                );
                let back = start + outage(&mut rng) + lease;
                at(
                    back,
                    Action::RestartRegion {
                        regions: RegionSet::VictimRegion,
                    },
                );
            }
            Scenario::RegionPartition => {
                at(
                    start,
                    Action::Partition {
                        a: RegionSet::PrimaryRegion,
                        b: RegionSet::OtherThanPrimary,
                    },
                );
                at(start + outage(&mut rng), Action::Heal);
            }
            Scenario::LatencySpike => {
                let jitter_ms = seeded::range_inclusive(&mut rng, 5, 20);
                at(
                    start,
                    Action::LatencySpike {
                        factor: 10.0,
                        jitter_ms,
                    },
                );
                // The spike lasts 30 s: long enough for many lease periods to
                // renew over ~700 ms round trips.
                at(
                    start + LATENCY_SPIKE_MS + seeded::range_inclusive(&mut rng, 0, 2_000),
                    Action::Heal,
                );
            }
            Scenario::Flapping => {
                let cycles = seeded::range_inclusive(&mut rng, 4, 6);
                let mut t = start;
                for cycle in 0..cycles {
                    let target = if cycle == 0 {
                        Target::Primary
                    } else {
                        Target::Victim
                    };
                    at(t, Action::Isolate { target });
                    t += seeded::range_inclusive(&mut rng, lease / 2, lease * 3 / 2);
                    at(t, Action::Heal);
                    t += seeded::range_inclusive(&mut rng, lease / 2, lease * 3 / 2);
                }
            }
            Scenario::Switchover => {
                let n = seeded::range_inclusive(&mut rng, 0, 3) as u32;
                at(
                    start,
                    Action::Switchover {
                        to: Some(Target::Standby(n)),
                    },
                );
            }
            Scenario::PartialPartition => {
                at(
                    start,
                    Action::Ring {
                        order_seed: seeded::range_inclusive(&mut rng, 0, u32::MAX as u64),
                    },
                );
                // Long enough for a lease break, a promotion and a second break round.
                at(
                    start + 5 * lease + seeded::range_inclusive(&mut rng, 0, 4_000),
                    Action::Heal,
                );
            }
            Scenario::AgentFreezePartition => {
                at(
                    start,
                    Action::StopAgent {
                        target: Target::Primary,
                    },
                );
                let cut = start + seeded::range_inclusive(&mut rng, lease / 4, lease / 2);
                at(
                    cut,
                    Action::Partition {
                        a: RegionSet::PrimaryRegion,
                        b: RegionSet::OtherThanPrimary,
                    },
                );
                let heal = cut + outage(&mut rng);
                at(heal, Action::Heal);
                at(
                    heal + seeded::range_inclusive(&mut rng, 0, lease),
                    Action::ContAgent {
                        target: Target::Victim,
                    },
                );
            }
            Scenario::AgentKillPartition => {
                at(
                    start,
                    Action::KillAgent {
                        target: Target::Primary,
                    },
                );
                let cut = start + seeded::range_inclusive(&mut rng, lease / 4, lease / 2);
                at(
                    cut,
                    Action::Partition {
                        a: RegionSet::PrimaryRegion,
                        b: RegionSet::OtherThanPrimary,
                    },
                );
                let heal = cut + outage(&mut rng);
                at(heal, Action::Heal);
                at(
                    heal + seeded::range_inclusive(&mut rng, 0, lease),
                    Action::RestartAgent {
                        target: Target::Victim,
                    },
                );
            }
            Scenario::CascadeKill => {
                at(
                    start,
                    Action::KillMember {
                        target: Target::Standby(seeded::range_inclusive(&mut rng, 0, 3) as u32),
                    },
                );
                let second = start + seeded::range_inclusive(&mut rng, lease, 2 * lease);
                at(
                    second,
                    Action::KillMember {
                        target: Target::Primary,
                    },
                );
                // After the failover that the second kill caused (a few leases).
                let third = second + outage(&mut rng);
                at(
                    third,
                    Action::KillMember {
                        target: Target::Primary,
                    },
                );
            }
            Scenario::MembershipPartition => {
                at(
                    start,
                    Action::Partition {
                        a: RegionSet::PrimaryRegion,
                        b: RegionSet::OtherThanPrimary,
                    },
                );
                at(
                    start + seeded::range_inclusive(&mut rng, lease / 2, 2 * lease),
                    Action::RemoveMember {
                        target: Target::PeerOfPrimary,
                    },
                );
                at(start + outage(&mut rng) + lease, Action::Heal);
            }
            Scenario::GracefulStop => {
                at(
                    start,
                    Action::TermAgent {
                        target: Target::Primary,
                    },
                );
                at(
                    start + outage(&mut rng),
                    Action::RestartAgent {
                        target: Target::Victim,
                    },
                );
            }
            Scenario::RaftLeaderKill => {
                at(
                    start,
                    Action::KillMember {
                        target: Target::RaftLeaderNotPrimary,
                    },
                );
                let back = start + outage(&mut rng);
                at(
                    back,
                    Action::RestartMember {
                        target: Target::Victim,
                    },
                );
            }
        }
        steps.sort_by_key(|s| s.at_ms);
        let last = steps.last().map_or(start, |s| s.at_ms);
        Schedule {
            scenario,
            seed,
            params,
            steps,
            end_ms: last + params.settle_ms,
        }
    }

    /// When the first fault fires (the origin of RTO and detection times).
    pub fn fault_at_ms(&self) -> u64 {
        self.steps.first().map_or(0, |s| s.at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>(), Ok(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.name())
            );
        }
        assert!("primary_kill".parse::<Scenario>().is_err());
    }

    #[test]
    fn same_seed_same_schedule_and_seeds_vary_timing() {
        let p = ScheduleParams::default();
        for s in Scenario::ALL {
            assert_eq!(Schedule::generate(s, 17, p), Schedule::generate(s, 17, p));
            let starts: std::collections::BTreeSet<u64> = (0..20)
                .map(|seed| Schedule::generate(s, seed, p).fault_at_ms())
                .collect();
            assert!(starts.len() > 5, "{s}: start should vary with the seed");
            for seed in 0..20 {
                let sch = Schedule::generate(s, seed, p);
                assert!((5_000..=6_000).contains(&sch.fault_at_ms()), "{s}");
                assert!(sch.steps.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
                assert_eq!(sch.end_ms, sch.steps.last().unwrap().at_ms + p.settle_ms);
            }
        }
    }

    #[test]
    fn partition_heals_after_the_lease_expired() {
        let p = ScheduleParams::default();
        for seed in 0..50 {
            let s = Schedule::generate(Scenario::PrimaryPartition, seed, p);
            assert_eq!(s.steps.len(), 2);
            assert_eq!(
                s.steps[0].action,
                Action::Isolate {
                    target: Target::Primary
                }
            );
            assert_eq!(s.steps[1].action, Action::Heal);
            let held = s.steps[1].at_ms - s.steps[0].at_ms;
            assert!((6_000..=8_000).contains(&held), "{held}");
        }
    }

    #[test]
    fn flapping_periods_are_around_the_lease() {
        let p = ScheduleParams {
            lease_ms: 2_000,
            ..ScheduleParams::default()
        };
        for seed in 0..50 {
            let s = Schedule::generate(Scenario::Flapping, seed, p);
            let n = s.steps.len();
            assert!((8..=12).contains(&n) && n & 1 == 0, "{n}");
            for (i, w) in s.steps.windows(2).enumerate() {
                let expect_isolate = i % 2 == 0;
                assert_eq!(
                    matches!(w[0].action, Action::Isolate { .. }),
                    expect_isolate
                );
                let period = w[1].at_ms - w[0].at_ms;
                assert!((1_000..=3_000).contains(&period), "{period}");
            }
            assert_eq!(
                s.steps[2].action,
                Action::Isolate {
                    target: Target::Victim
                }
            );
        }
    }

    #[test]
    fn region_sets_resolve_against_the_current_primary() {
        let all: BTreeSet<String> = ["eu-central", "us-east", "us-west"]
            .into_iter()
            .map(String::from)
            .collect();
        let p = Some("us-east");
        assert_eq!(
            RegionSet::PrimaryRegion.resolve(p, None, &all),
            Some(vec!["us-east".to_string()])
        );
        assert_eq!(
            RegionSet::OtherThanPrimary.resolve(p, None, &all),
            Some(vec!["eu-central".to_string(), "us-west".to_string()])
        );
        assert_eq!(RegionSet::OtherThanPrimary.resolve(None, None, &all), None);
        assert_eq!(RegionSet::VictimRegion.resolve(p, None, &all), None);
        assert_eq!(
            RegionSet::VictimRegion.resolve(p, Some("us-west"), &all),
            Some(vec!["us-west".to_string()])
        );
        let named = RegionSet::Named(vec!["b".into(), "a".into(), "b".into()]);
        assert_eq!(
            named.resolve(None, None, &all),
            Some(vec!["a".to_string(), "b".to_string()])
        );
    }

    #[test]
    fn schedule_serializes_readably() {
        let s = Schedule::generate(Scenario::LatencySpike, 1, ScheduleParams::default());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["scenario"], "latency-spike");
        assert_eq!(v["steps"][0]["action"]["action"], "latency-spike");
        assert_eq!(v["steps"][0]["action"]["factor"], 10.0);
        assert_eq!(v["steps"][1]["action"]["action"], "heal");
        let spike_ms = s.steps[1].at_ms - s.steps[0].at_ms;
        assert!(
            (LATENCY_SPIKE_MS..=LATENCY_SPIKE_MS + 2_000).contains(&spike_ms),
            "{spike_ms}"
        );
        let back: Schedule = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }
}
