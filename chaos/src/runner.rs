//! Runs one chaos scenario end to end and scores it: start a real cluster behind the mesh,
//! wait until it has converged, set the replication policy, start the writers (one per
//! region) and the split-brain probe, play the seeded schedule (resolving abstract targets
//! against the cluster's live status when each step fires), heal everything, wait (bounded)
//! for convergence, read the final table, check it, and fill the [`Scorecard`].
//!
//! The timing fields come from two clocks that are the same machine's: the history entry
//! of the leader's decision carries its wall-clock time, the workload records offsets from
//! the run start `t0`; [`Timings::compute`] relates them through `t0`'s wall-clock time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use meridian_node::decide::SwitchoverPhase;
use meridian_node::policy::{Policy, RegionPolicy, SyncMode};
use meridian_node::raft::intent::{HistoryEntry, HistoryKind, PendingSwitchover};
use meridian_node::raft::Command as IntentCommand;
use tokio::sync::watch;

use crate::check::{check, CheckInput, Outcome, ProbeRound, WriteRecord};
use crate::cluster::{Cluster, ClusterOptions, ClusterStatus, HostsMode, Kind};
use crate::schedule::{Action, RegionSet, Scenario, Schedule, ScheduleParams, Target};
use crate::scorecard::{to_ms, Scorecard};
use crate::workload::{self, ProbeTarget, WriterSpec};

/// The replication policy a run uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PolicyChoice {
    /// The cluster's default: every region `auto` with a small commit-latency budget.
    #[default]
    Default,
    /// Every data region `sync`, with a quorum no primary's own region can fill alone.
    ZeroRpo,
    /// Every data region `async`: no standby gates commits (the lease gate does), a
    /// failover may lose the last unreplicated commits within `max_lag_on_failover`.
    Async,
}

impl PolicyChoice {
    pub fn name(self) -> &'static str {
        match self {
            PolicyChoice::Default => "default",
            PolicyChoice::ZeroRpo => "zero-rpo",
            PolicyChoice::Async => "async",
        }
    }
}

impl fmt::Display for PolicyChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PolicyChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" => Ok(PolicyChoice::Default),
            "zero-rpo" => Ok(PolicyChoice::ZeroRpo),
            "async" => Ok(PolicyChoice::Async),
            _ => Err(format!(
                "unknown policy {s:?} (known: default, zero-rpo, async)"
            )),
        }
    }
}

/// The zero-RPO policy for a set of data regions: each `sync`, and `sync_quorum` equal to
/// the largest region's data member count, so any quorum of standbys includes one outside
/// the primary's region (which has at most that count minus one standbys). No async
/// failover.
pub fn zero_rpo_policy(data_members_per_region: &BTreeMap<String, usize>) -> Policy {
    let mut p = Policy::default();
    for region in data_members_per_region.keys() {
        p.regions.insert(
            region.clone(),
            RegionPolicy {
                mode: SyncMode::Sync,
                ..RegionPolicy::default()
            },
        );
    }
    let largest = data_members_per_region.values().copied().max().unwrap_or(1);
    p.sync_quorum = u32::try_from(largest.max(1)).unwrap_or(1);
    p.async_failover = false;
    p
}

/// Everything one run needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub scenario: Scenario,
    pub seed: u64,
    pub policy: PolicyChoice,
    pub cluster: ClusterOptions,
    pub params: ScheduleParams,
    /// Bound on the cluster converging before the workload starts.
    pub initial_converge_timeout: Duration,
    /// Bound on the cluster converging after everything is healed.
    pub final_converge_timeout: Duration,
    pub write_interval: Duration,
    pub write_timeout: Duration,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
}

impl RunOptions {
    pub fn new(scenario: Scenario, seed: u64, policy: PolicyChoice) -> RunOptions {
        RunOptions {
            scenario,
            seed,
            policy,
            cluster: ClusterOptions {
                seed,
                ..ClusterOptions::default()
            },
            params: ScheduleParams::default(),
            initial_converge_timeout: Duration::from_secs(120),
            final_converge_timeout: Duration::from_secs(90),
            write_interval: Duration::from_millis(50),
            write_timeout: Duration::from_secs(3),
            probe_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(400),
        }
    }
}

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Bound on finding a target in the live status when a step fires.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a step that needs the leader's view waits out a stale quorum acknowledgement.
const STATUS_SETTLE: Duration = Duration::from_secs(5);

/// Resolves abstract targets; remembers the first victim and victim region.
#[derive(Debug, Default)]
struct Resolver {
    victim: Option<String>,
    victim_region: Option<String>,
}

impl Resolver {
    async fn member(&mut self, c: &Cluster, target: &Target) -> anyhow::Result<String> {
        let name = match target {
            Target::Victim => self
                .victim
                .clone()
                .context("the schedule names the victim before any step chose one")?,
            Target::Member(n) => n.clone(),
            Target::Primary => {
                crate::wait::wait_for("a primary to target", RESOLVE_TIMEOUT, || async {
                    c.status().await.ok()?.primary().map(str::to_string)
                })
                .await?
            }
            Target::RaftLeaderNotPrimary => {
                crate::wait::wait_for(
                    "a Raft leader that is not the primary's member",
                    RESOLVE_TIMEOUT,
                    || async {
                        let s = c.status().await.ok()?;
                        let leader = s.leader()?;
                        (Some(leader) != s.primary()).then(|| leader.to_string())
                    },
                )
                .await?
            }
            Target::PeerOfPrimary => {
                let primary =
                    crate::wait::wait_for("a primary to target", RESOLVE_TIMEOUT, || async {
                        c.status().await.ok()?.primary().map(str::to_string)
                    })
                    .await?;
                let region = c.member(&primary)?.region.clone();
                match c.members_of(&region).into_iter().find(|m| *m != primary) {
                    Some(peer) => peer,
                    None => c
                        .status()
                        .await?
                        .streaming_standbys()
                        .into_iter()
                        .next()
                        .context("the primary has no peer in its region and no standby")?,
                }
            }
            Target::Standby(n) => {
                crate::wait::wait_for("a streaming standby to target", RESOLVE_TIMEOUT, || async {
                    let s = c.status().await.ok()?;
                    let standbys: Vec<String> = s.streaming_standbys().into_iter().collect();
                    if standbys.is_empty() {
                        return None;
                    }
                    Some(standbys[*n as usize % standbys.len()].clone())
                })
                .await?
            }
        };
        c.member(&name)?;
        if self.victim.is_none() {
            self.victim = Some(name.clone());
        }
        Ok(name)
    }

    async fn regions(&mut self, c: &Cluster, set: &RegionSet) -> anyhow::Result<Vec<String>> {
        let primary_region = match set {
            RegionSet::PrimaryRegion | RegionSet::OtherThanPrimary => {
                let p = crate::wait::wait_for("a primary to target", RESOLVE_TIMEOUT, || async {
                    c.status().await.ok()?.primary().map(str::to_string)
                })
                .await?;
                Some(c.member(&p)?.region.clone())
            }
            _ => None,
        };
        let regions = set
            .resolve(
                primary_region.as_deref(),
                self.victim_region.as_deref(),
                &c.regions(),
            )
            .with_context(|| format!("cannot resolve {set:?} yet"))?;
        if self.victim_region.is_none() && !matches!(set, RegionSet::OtherThanPrimary) {
            self.victim_region = regions.first().cloned();
        }
        Ok(regions)
    }
}

/// Plays one action; returns when its effect began (after the target was resolved, which
/// asks the cluster and can take a while under load) and a line saying what it did.
async fn play(
    c: &mut Cluster,
    r: &mut Resolver,
    action: &Action,
) -> anyhow::Result<(Instant, String)> {
    let fired: Instant;
    let what = match action {
        Action::KillAgent { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            c.kill_agent(&m)?;
            format!("SIGKILL agent of {m}")
        }
        Action::KillPostgres { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            anyhow::ensure!(c.kill_postgres(&m)?, "{m} has no running postmaster");
            format!("SIGKILL Postgres of {m}")
        }
        Action::KillMember { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            c.kill_member(&m)?;
            format!("SIGKILL agent and Postgres of {m}")
        }
        Action::RestartAgent { target } | Action::RestartMember { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            c.start_agent(&m)?;
            format!("restart {m}")
        }
        Action::StopAgent { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            c.stop_agent(&m)?;
            format!("SIGSTOP agent of {m}")
        }
        Action::FreezeHost { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            let n = c.freeze_host(&m)?;
            format!("SIGSTOP every process of {m}'s host ({n})")
        }
        Action::ThawHost { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            c.thaw_host(&m, Duration::from_millis(500)).await?;
            format!("SIGCONT {m}'s Postgres, its agent 500 ms later")
        }
        Action::ContAgent { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            c.cont_agent(&m)?;
            format!("SIGCONT agent of {m}")
        }
        Action::Isolate { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            let n = c.isolate_member(&m)?;
            format!("isolate {m} ({n} links)")
        }
        Action::Partition { a, b } => {
            let a = r.regions(c, a).await?;
            let b = r.regions(c, b).await?;
            fired = Instant::now();
            let ar: Vec<&str> = a.iter().map(String::as_str).collect();
            let br: Vec<&str> = b.iter().map(String::as_str).collect();
            let n = c.partition(&ar, &br)?;
            format!("partition {a:?} from {b:?} ({n} links)")
        }
        Action::Heal => {
            fired = Instant::now();
            c.heal_all()?;
            "heal every link".to_string()
        }
        Action::LatencySpike { factor, jitter_ms } => {
            fired = Instant::now();
            c.latency_spike(*factor, Duration::from_millis(*jitter_ms))?;
            format!("latency x{factor} with {jitter_ms} ms jitter")
        }
        Action::Switchover { to } => {
            let s = c.status_within(STATUS_SETTLE).await?;
            let from = s
                .primary()
                .context("no primary to switch over from")?
                .to_string();
            let to = match to {
                Some(t) => r.member(c, t).await?,
                None => s
                    .streaming_standbys()
                    .into_iter()
                    .next()
                    .context("no streaming standby to switch over to")?,
            };
            fired = Instant::now();
            c.command(&IntentCommand::BeginSwitchover(PendingSwitchover {
                from: from.clone(),
                to: to.clone(),
                started_at_unix_ms: unix_ms_now(),
                phase: SwitchoverPhase::Requested,
            }))
            .await?;
            format!("switchover {from} -> {to}")
        }
        Action::KillRegion { regions } => {
            let regions = r.regions(c, regions).await?;
            fired = Instant::now();
            let mut killed = Vec::new();
            for region in &regions {
                killed.extend(c.kill_region(region)?);
            }
            let others: Vec<String> = c
                .regions()
                .into_iter()
                .filter(|x| !regions.contains(x))
                .collect();
            let ar: Vec<&str> = regions.iter().map(String::as_str).collect();
            let br: Vec<&str> = others.iter().map(String::as_str).collect();
            c.partition(&ar, &br)?;
            format!("kill region {regions:?} ({})", killed.join(", "))
        }
        Action::Ring { order_seed } => {
            let primary = r.member(c, &Target::Primary).await?;
            let mut others: Vec<String> = c
                .members()
                .map(|m| m.name.clone())
                .filter(|n| *n != primary)
                .collect();
            others.sort();
            let mut rng = crate::seeded::rng(*order_seed, 0x0052_494E_4700);
            rand::seq::SliceRandom::shuffle(others.as_mut_slice(), &mut rng);
            let mut ring = vec![primary];
            ring.extend(others);
            fired = Instant::now();
            let cuts = ring_cuts(ring.len());
            let mut n = 0;
            for (i, j) in &cuts {
                n += c.cut_members(&ring[*i], &ring[*j])?;
            }
            format!(
                "partial partition: ring {} ({} pairs cut, {n} links)",
                ring.join(" - "),
                cuts.len()
            )
        }
        Action::TermAgent { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            c.term_agent(&m)?;
            format!("SIGTERM agent of {m}")
        }
        Action::RemoveMember { target } => {
            let m = r.member(c, target).await?;
            fired = Instant::now();
            match c.remove_member(&m).await? {
                Ok(via) => format!("remove {m} from the membership (via {via})"),
                Err(refusal) => format!("remove {m}: refused, nothing changed ({refusal})"),
            }
        }
        Action::RestartRegion { regions } => {
            let regions = r.regions(c, regions).await?;
            fired = Instant::now();
            c.heal_all()?;
            let mut started = Vec::new();
            for region in &regions {
                for m in c.members_of(region) {
                    c.start_agent(&m)?;
                    started.push(m);
                }
            }
            format!(
                "heal and restart region {regions:?} ({})",
                started.join(", ")
            )
        }
    };
    Ok((fired, what))
}

/// The member pairs (indices into a ring of `n`) that are not ring neighbours: cutting
/// them leaves every member its two neighbours.
fn ring_cuts(n: usize) -> Vec<(usize, usize)> {
    let mut cuts = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            let neighbours = j == i + 1 || (i == 0 && j == n - 1);
            if !neighbours {
                cuts.push((i, j));
            }
        }
    }
    cuts
}

/// Timing fields derived from the history and the workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    pub rto_ms: Option<u64>,
    pub detection_ms: Option<u64>,
    pub promote_ms: Option<u64>,
    pub failovers: u64,
    /// The first promotion after the fault.
    pub first_promotion: Option<HistoryEntry>,
}

/// A change of primary (failover, manual or switchover), not a bootstrap nor an abandoned
/// switchover.
pub fn is_promotion(e: &HistoryEntry) -> bool {
    matches!(e.kind, HistoryKind::Failover | HistoryKind::Switchover)
        && e.new_primary.is_some()
        && e.new_primary != e.old_primary
}

impl Timings {
    /// `t0_unix_ms`: wall clock of offset zero. `fault`: offset of the first fault.
    /// `surviving`: writers whose writes count for the RTO. `pg_ports`: each data member's
    /// Postgres port, to tell which member took a write.
    ///
    /// The RTO ends with the first acknowledged write of a surviving writer that started
    /// after the fault and, when the fault led to a promotion, landed on the new primary:
    /// writes the old primary still took (a switchover's drain, an isolated primary before
    /// it fenced) are not a recovery.
    pub fn compute(
        history: &[HistoryEntry],
        t0_unix_ms: i64,
        fault: Option<Duration>,
        writes: &[WriteRecord],
        probes: &[ProbeRound],
        surviving: &BTreeSet<String>,
        pg_ports: &BTreeMap<String, u16>,
    ) -> Timings {
        let mut t = Timings {
            failovers: history
                .iter()
                .filter(|e| is_promotion(e) && e.at_unix_ms >= t0_unix_ms)
                .count() as u64,
            ..Timings::default()
        };
        let Some(fault) = fault else {
            return t;
        };
        let fault_unix = t0_unix_ms + i64::try_from(fault.as_millis()).unwrap_or(i64::MAX);
        let decision = history
            .iter()
            .find(|e| is_promotion(e) && e.at_unix_ms >= fault_unix);
        let new_port = decision
            .and_then(|d| d.new_primary.as_ref())
            .map(|n| pg_ports.get(n).copied());
        t.rto_ms = writes
            .iter()
            .filter(|w| w.outcome == Outcome::Ok && surviving.contains(&w.writer))
            .filter(|w| w.start >= fault)
            .filter(|w| match new_port {
                None => true,
                Some(port) => port.is_some() && w.server_port == port,
            })
            .map(|w| w.end)
            .min()
            .map(|end| to_ms(end - fault));
        if let Some(d) = decision {
            t.detection_ms = u64::try_from(d.at_unix_ms - fault_unix).ok();
            let decided =
                Duration::from_millis(u64::try_from(d.at_unix_ms - t0_unix_ms).unwrap_or(0));
            let new = d.new_primary.clone().unwrap_or_default();
            t.promote_ms = probes
                .iter()
                .filter(|p| p.at >= decided && p.accepted.contains(&new))
                .map(|p| p.at)
                .min()
                .map(|at| to_ms(at - decided));
            t.first_promotion = Some(d.clone());
        }
        t
    }
}

/// Violations of what a scenario must (not) do, beyond the checker's invariants.
pub fn scenario_expectations(scenario: Scenario, card: &Scorecard) -> Vec<String> {
    let mut v = Vec::new();
    match scenario {
        Scenario::LatencySpike | Scenario::RaftLeaderKill if card.failovers > 0 => {
            v.push(format!(
                "{scenario} must cause no promotion, saw {}",
                card.failovers
            ));
        }
        Scenario::Switchover if card.failovers == 0 => {
            v.push("the planned switchover did not change the primary".to_string());
        }
        // The agent is down for several leases: its watchdog fences the Postgres at the
        // deadline and the cluster must fail over (its in-region sync standby answers).
        // With its region cut off as well (agent-*-partition) whether anyone may be
        // promoted depends on where the sync set is: only safety is checked there.
        Scenario::AgentCrash if card.failovers == 0 => {
            v.push(format!(
                "{scenario}: the primary's agent was gone past its lease, yet nobody was promoted"
            ));
        }
        Scenario::HostFreeze if card.failovers == 0 => {
            v.push(
                "host-freeze: the primary's host was frozen past its lease, yet nobody was promoted"
                    .to_string(),
            );
        }
        Scenario::GracefulStop if card.failovers == 0 => {
            v.push("the stopping primary's agent did not hand over".to_string());
        }
        _ => {}
    }
    v
}

/// When acknowledged writes were lost under a policy that allows it, the history must say
/// so and stay within the policy's bound.
pub fn allowed_loss_violations(
    acked_lost: u64,
    promotion: Option<&HistoryEntry>,
    max_lag_on_failover_bytes: u64,
) -> Vec<String> {
    if acked_lost == 0 {
        return Vec::new();
    }
    match promotion.and_then(|p| p.possible_loss_bytes) {
        None => vec![format!(
            "{acked_lost} acknowledged writes lost but the failover's history entry reports no possible loss"
        )],
        Some(b) if b > max_lag_on_failover_bytes => vec![format!(
            "failover may have lost {b} bytes, above max_lag_on_failover_bytes = {max_lag_on_failover_bytes}"
        )],
        Some(_) => Vec::new(),
    }
}

/// Runs `opts.scenario` and scores it. Errors only when the cluster cannot even be brought
/// up; problems during the run become violations in the scorecard.
pub async fn run_scenario(opts: &RunOptions) -> anyhow::Result<Scorecard> {
    let sc = opts.scenario;
    let schedule = Schedule::generate(sc, opts.seed, opts.params);
    let mut card = Scorecard::new(sc.name(), opts.seed, opts.policy.name());
    card.hosts = opts.cluster.hosts.name().to_string();
    anyhow::ensure!(
        !(sc.needs_latency_injection() && opts.cluster.hosts == HostsMode::Netns),
        "{sc} injects latency, which only the proxy mesh can (--hosts loopback): separate hosts have no latency injection (no netem on this kernel)"
    );
    eprintln!(
        "[{sc}] seed {} policy {} hosts {}: starting {} ...",
        opts.seed, opts.policy, opts.cluster.hosts, opts.cluster.topology
    );
    let mut c = Cluster::start(opts.cluster.clone())
        .await
        .context("start the cluster")?;
    eprintln!("[{sc}] run dir {}", c.dir().display());
    let s0 = match c.wait_converged(opts.initial_converge_timeout).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "[{sc}] no initial convergence; agent logs:\n{}",
                c.log_tails(15)
            );
            return Err(e.context("initial convergence"));
        }
    };
    eprintln!(
        "[{sc}] converged: primary {}, leader {}",
        s0.primary().unwrap_or("-"),
        s0.leader().unwrap_or("-")
    );

    match opts.policy {
        PolicyChoice::ZeroRpo => set_zero_rpo(&c).await?,
        PolicyChoice::Async => set_async(&c).await?,
        PolicyChoice::Default => {}
    }
    if sc == Scenario::RaftLeaderKill {
        separate_leader_from_primary(&c, opts.initial_converge_timeout).await?;
    }
    let max_lag = c
        .status_within(STATUS_SETTLE)
        .await
        .map(|s| s.intent.policy.max_lag_on_failover_bytes)
        .unwrap_or(0);

    let primary = c
        .status_within(STATUS_SETTLE)
        .await?
        .primary()
        .context("no primary after convergence")?
        .to_string();
    let primary_conninfo = c
        .member(&primary)?
        .direct_conninfo()
        .context("the primary has no Postgres")?;
    workload::setup(&primary_conninfo, Duration::from_secs(10)).await?;

    // The workload.
    let t0 = Instant::now();
    let t0_unix = unix_ms_now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut writers = Vec::new();
    for (i, region) in c.regions().into_iter().enumerate() {
        let spec = WriterSpec {
            name: format!("writer-{region}"),
            region: region.clone(),
            conninfo: c.client_conninfo(&region)?,
            id_base: (i as u64 + 1) * 1_000_000_000,
            interval: opts.write_interval,
            write_timeout: opts.write_timeout,
            connect_timeout: opts.write_timeout,
        };
        writers.push(tokio::spawn(workload::run_writer(
            spec,
            t0,
            stop_rx.clone(),
        )));
    }
    let probe_targets: Vec<ProbeTarget> = c
        .members()
        .filter(|m| m.kind == Kind::Data)
        .filter_map(|m| {
            Some(ProbeTarget {
                member: m.name.clone(),
                conninfo: m.direct_conninfo()?,
            })
        })
        .collect();
    let probe = tokio::spawn(workload::run_split_brain_probe(
        probe_targets,
        opts.probe_interval,
        opts.probe_timeout,
        t0,
        stop_rx.clone(),
    ));

    // The faults.
    let mut resolver = Resolver::default();
    let mut fault_at: Option<Duration> = None;
    for step in &schedule.steps {
        tokio::time::sleep_until((t0 + Duration::from_millis(step.at_ms)).into()).await;
        let at = t0.elapsed();
        match play(&mut c, &mut resolver, &step.action).await {
            Ok((fired, what)) => {
                let at = fired.saturating_duration_since(t0);
                fault_at.get_or_insert(at);
                eprintln!("[{sc}] t={} ms: {what}", at.as_millis());
            }
            Err(e) => {
                eprintln!("[{sc}] t={} ms: step failed: {e:#}", at.as_millis());
                card.violations
                    .push(format!("harness: step at {} ms failed: {e:#}", step.at_ms));
            }
        }
    }
    tokio::time::sleep_until((t0 + Duration::from_millis(schedule.end_ms)).into()).await;

    // Heal, and wait for one primary with everyone streaming from it.
    if let Err(e) = c.heal_all() {
        card.violations.push(format!("harness: heal: {e:#}"));
    }
    let revived = c.revive_all()?;
    if !revived.is_empty() {
        eprintln!("[{sc}] restarted {}", revived.join(", "));
    }
    let final_status: Option<ClusterStatus> =
        match c.wait_converged(opts.final_converge_timeout).await {
            Ok(s) => {
                card.converged = true;
                Some(s)
            }
            Err(e) => {
                card.violations.push(format!("not converged: {e:#}"));
                c.status().await.ok()
            }
        };
    stop_tx.send_replace(true);
    let observe_to = t0.elapsed();
    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await.context("join a writer")?);
    }
    let probes = probe.await.context("join the probe")?;

    let final_primary = final_status
        .as_ref()
        .and_then(|s| s.primary().map(str::to_string));
    card.final_primary = final_primary.clone();
    card.final_timeline = final_status
        .as_ref()
        .and_then(ClusterStatus::primary_timeline)
        .map(u64::from);
    let final_ids = match final_primary
        .as_deref()
        .and_then(|p| c.member(p).ok()?.direct_conninfo())
    {
        Some(ci) => match workload::read_final_ids(&ci, Duration::from_secs(10)).await {
            Ok(ids) => Some(ids),
            Err(e) => {
                card.violations
                    .push(format!("harness: read the final table: {e:#}"));
                None
            }
        },
        None => {
            card.violations
                .push("harness: no primary to read the final table from".into());
            None
        }
    };

    let victim_region = resolver.victim_region.clone();
    let surviving: BTreeSet<String> = c
        .regions()
        .into_iter()
        .filter(|r| Some(r) != victim_region.as_ref())
        .map(|r| format!("writer-{r}"))
        .collect();
    // Under the default policy the remote regions are async: a fault that keeps the
    // leader from the primary's in-region sync standby may end in a failover to an async
    // member, which the policy allows with the possible loss recorded in the history
    // (checked below against `max_lag_on_failover`). Under zero-rpo nothing may be lost.
    let allow_loss = opts.policy == PolicyChoice::Async
        || opts.policy == PolicyChoice::Default
            && matches!(
                sc,
                Scenario::RegionLoss
                    | Scenario::RegionPartition
                    | Scenario::AgentFreezePartition
                    | Scenario::AgentKillPartition
                    | Scenario::MembershipPartition
                    | Scenario::PartialPartition
                    | Scenario::CascadeKill
            );
    let read_final = final_ids.is_some();
    let mut report = check(&CheckInput {
        writes: writes.clone(),
        // Unread, the table counts as empty: only the fields that depend on it are wrong,
        // and they are zeroed below; a violation already says the read failed.
        final_ids: final_ids.unwrap_or_default(),
        surviving_writers: Some(surviving.clone()),
        observe_from: Duration::ZERO,
        observe_to,
        probes: probes.clone(),
        allow_acked_loss: allow_loss || !read_final,
    });
    if !read_final {
        report.acked_lost = 0;
        report.lost_ids.clear();
        report.indeterminate_recovered = 0;
    }
    card.apply_check(&report);
    let history = final_status
        .as_ref()
        .map(|s| s.intent.history.clone())
        .unwrap_or_default();
    let pg_ports: BTreeMap<String, u16> = c
        .members()
        .filter_map(|m| Some((m.name.clone(), m.pg_port?)))
        .collect();
    let t = Timings::compute(
        &history, t0_unix, fault_at, &writes, &probes, &surviving, &pg_ports,
    );
    card.rto_ms = t.rto_ms;
    card.detection_ms = t.detection_ms;
    card.promote_ms = t.promote_ms;
    card.failovers = t.failovers;
    if allow_loss {
        card.violations.extend(allowed_loss_violations(
            card.acked_lost,
            t.first_promotion.as_ref(),
            max_lag,
        ));
    }
    card.violations.extend(scenario_expectations(sc, &card));
    if opts.cluster.backup_repo.is_some() {
        let gap = crate::archive::archive_gap(&c).await;
        if gap != "none" {
            card.violations.push(format!("archive gap: {gap}"));
        }
        card.archive_gap = Some(gap);
    }
    if !card.passed() {
        eprintln!("[{sc}] FAILED; agent logs:\n{}", c.log_tails(25));
    }
    drop(c);
    Ok(card)
}

/// Sets the zero-RPO policy and waits (bounded) until the recorded sync set names a member
/// outside the primary's region.
/// Every data region async; waits until the recorded sync set is empty (the primary's
/// commits then wait on its lease gate only).
async fn set_async(c: &Cluster) -> anyhow::Result<()> {
    let regions: BTreeSet<String> = c
        .members()
        .filter(|m| m.kind == Kind::Data)
        .map(|m| m.region.clone())
        .collect();
    let policy = Policy {
        regions: regions
            .into_iter()
            .map(|r| {
                (
                    r,
                    RegionPolicy {
                        mode: SyncMode::Async,
                        ..RegionPolicy::default()
                    },
                )
            })
            .collect(),
        ..Policy::default()
    };
    c.command(&IntentCommand::SetPolicy {
        expected_version: None,
        policy,
        reason: "meridian-chaos --policy async".into(),
        at_unix_ms: unix_ms_now(),
    })
    .await
    .context("set the async policy")?;
    crate::wait::wait_until(
        "the recorded sync set to be empty",
        Duration::from_secs(30),
        || async {
            c.status()
                .await
                .is_ok_and(|s| s.intent.sync_set.names.is_empty())
        },
    )
    .await
}

async fn set_zero_rpo(c: &Cluster) -> anyhow::Result<()> {
    let mut per_region: BTreeMap<String, usize> = BTreeMap::new();
    for m in c.members().filter(|m| m.kind == Kind::Data) {
        *per_region.entry(m.region.clone()).or_default() += 1;
    }
    let policy = zero_rpo_policy(&per_region);
    c.command(&IntentCommand::SetPolicy {
        expected_version: None,
        policy,
        reason: "meridian-chaos --policy zero-rpo".into(),
        at_unix_ms: unix_ms_now(),
    })
    .await
    .context("set the zero-rpo policy")?;
    crate::wait::wait_until(
        "the recorded sync set to include another region",
        Duration::from_secs(30),
        || async {
            let Ok(s) = c.status().await else {
                return false;
            };
            let Some(p) = s.primary().and_then(|p| c.member(p).ok()) else {
                return false;
            };
            s.intent
                .sync_set
                .names
                .iter()
                .any(|n| c.member(n).is_ok_and(|m| m.region != p.region))
        },
    )
    .await
}

/// raft-leader-kill needs a leader that is not the primary's member: when they coincide,
/// a planned switchover moves the primary away before the workload starts.
async fn separate_leader_from_primary(c: &Cluster, within: Duration) -> anyhow::Result<()> {
    let s = c.status_within(STATUS_SETTLE).await?;
    let (Some(leader), Some(primary)) = (s.leader(), s.primary()) else {
        anyhow::bail!("no leader or no primary to separate");
    };
    if leader != primary {
        return Ok(());
    }
    let to = s
        .streaming_standbys()
        .into_iter()
        .next()
        .context("no standby to move the primary to")?;
    eprintln!(
        "[raft-leader-kill] the leader {leader} is the primary: switching over to {to} first"
    );
    c.command(&IntentCommand::BeginSwitchover(PendingSwitchover {
        from: primary.to_string(),
        to: to.clone(),
        started_at_unix_ms: unix_ms_now(),
        phase: SwitchoverPhase::Requested,
    }))
    .await?;
    crate::wait::wait_until("the switchover to finish", within, || async {
        c.wait_converged(Duration::from_secs(2))
            .await
            .is_ok_and(|s| s.primary() == Some(to.as_str()))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_of_five_leaves_each_member_two_neighbours() {
        let cuts = ring_cuts(5);
        assert_eq!(cuts.len(), 5);
        for m in 0..5 {
            let cut = cuts.iter().filter(|(i, j)| *i == m || *j == m).count();
            assert_eq!(cut, 2, "member {m} keeps 2 of its 4 links");
        }
        assert!(!cuts.contains(&(0, 4)) && !cuts.contains(&(0, 1)));
    }
    use meridian_node::types::Generation;

    fn entry(at: i64, kind: HistoryKind, old: &str, new: &str) -> HistoryEntry {
        HistoryEntry {
            at_unix_ms: at,
            kind,
            reason: String::new(),
            old_primary: Some(old.into()).filter(|s: &String| !s.is_empty()),
            new_primary: Some(new.into()),
            generation: Generation(2),
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: None,
            write_pause_ms: None,
        }
    }

    fn write(writer: &str, outcome: Outcome, start_ms: u64, end_ms: u64) -> WriteRecord {
        WriteRecord {
            id: start_ms,
            writer: writer.into(),
            region: "r".into(),
            outcome,
            start: Duration::from_millis(start_ms),
            end: Duration::from_millis(end_ms),
            server_port: None,
        }
    }

    fn on(mut w: WriteRecord, port: u16) -> WriteRecord {
        w.server_port = Some(port);
        w
    }

    fn round(at_ms: u64, accepted: &[&str]) -> ProbeRound {
        ProbeRound {
            at: Duration::from_millis(at_ms),
            accepted: accepted.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn timings_relate_history_and_workload_through_t0() {
        let t0 = 1_000_000;
        let history = vec![
            entry(t0 - 5_000, HistoryKind::Bootstrap, "", "m1"),
            // A switchover abandoned before the run: not a promotion.
            entry(t0 + 100, HistoryKind::Switchover, "m1", "m1"),
            entry(t0 + 7_500, HistoryKind::Failover, "m1", "m2"),
            entry(t0 + 20_000, HistoryKind::Failover, "m2", "m1"),
        ];
        let surviving: BTreeSet<String> = ["w-east".to_string()].into();
        let writes = vec![
            write("w-east", Outcome::Ok, 5_900, 5_901),
            // Started before the fault: not the recovery.
            write("w-east", Outcome::Ok, 5_990, 8_000),
            write("w-west", Outcome::Ok, 6_100, 6_101),
            write("w-east", Outcome::Failed, 6_050, 6_060),
            // Still taken by the old primary after the fault: not the recovery either.
            on(write("w-east", Outcome::Ok, 6_200, 6_210), 5401),
            on(write("w-east", Outcome::Ok, 8_100, 8_110), 5402),
        ];
        let ports: BTreeMap<String, u16> =
            [("m1".to_string(), 5401), ("m2".to_string(), 5402)].into();
        let probes = vec![
            round(7_400, &["m1"]),
            round(7_500, &[]),
            round(7_600, &[]),
            round(7_900, &["m2"]),
        ];
        let t = Timings::compute(
            &history,
            t0,
            Some(Duration::from_millis(6_000)),
            &writes,
            &probes,
            &surviving,
            &ports,
        );
        assert_eq!(t.failovers, 2);
        assert_eq!(t.rto_ms, Some(2_110));
        assert_eq!(t.detection_ms, Some(1_500));
        assert_eq!(t.promote_ms, Some(400));
        assert_eq!(
            t.first_promotion.unwrap().new_primary.as_deref(),
            Some("m2")
        );

        let none = Timings::compute(
            &history[..2],
            t0,
            None,
            &writes,
            &probes,
            &surviving,
            &ports,
        );
        assert_eq!(none, Timings::default());
        let quiet = Timings::compute(
            &history[..2],
            t0,
            Some(Duration::from_millis(6_000)),
            &writes,
            &probes,
            &surviving,
            &ports,
        );
        assert_eq!((quiet.detection_ms, quiet.promote_ms), (None, None));
        // Without a promotion any acknowledged write after the fault ends the outage.
        assert_eq!(quiet.rto_ms, Some(210));
    }

    #[test]
    fn zero_rpo_quorum_needs_a_remote_standby() {
        let per: BTreeMap<String, usize> =
            [("us-east".to_string(), 2), ("us-west".to_string(), 2)].into();
        let p = zero_rpo_policy(&per);
        assert_eq!(p.sync_quorum, 2);
        assert!(!p.async_failover);
        assert_eq!(p.region("us-west").mode, SyncMode::Sync);
        assert_eq!(p.region("eu-central").mode, SyncMode::Auto);
        p.validate().unwrap();
    }

    #[test]
    fn expectations_and_allowed_loss() {
        let mut card = Scorecard::new("latency-spike", 1, "default");
        card.failovers = 1;
        assert_eq!(
            scenario_expectations(Scenario::LatencySpike, &card).len(),
            1
        );
        assert_eq!(
            scenario_expectations(Scenario::RaftLeaderKill, &card).len(),
            1
        );
        assert!(scenario_expectations(Scenario::PrimaryKill, &card).is_empty());
        assert!(scenario_expectations(Scenario::AgentCrash, &card).is_empty());
        card.failovers = 0;
        assert_eq!(scenario_expectations(Scenario::AgentCrash, &card).len(), 1);
        assert_eq!(
            scenario_expectations(Scenario::GracefulStop, &card).len(),
            1
        );
        assert_eq!(scenario_expectations(Scenario::Switchover, &card).len(), 1);

        let mut e = entry(1, HistoryKind::Failover, "a", "b");
        assert!(allowed_loss_violations(0, None, 10).is_empty());
        assert_eq!(allowed_loss_violations(3, Some(&e), 10).len(), 1);
        e.possible_loss_bytes = Some(8);
        assert!(allowed_loss_violations(3, Some(&e), 10).is_empty());
        e.possible_loss_bytes = Some(11);
        assert_eq!(allowed_loss_violations(3, Some(&e), 10).len(), 1);
        assert_eq!("zero-rpo".parse(), Ok(PolicyChoice::ZeroRpo));
        assert!("sync".parse::<PolicyChoice>().is_err());
    }
}
