//! The decision core's input: a plain, self-contained snapshot of the cluster as the
//! Raft leader sees it (intent from the state machine, observations from its memory,
//! timestamps on its own monotonic clock). The runtime fills it; nothing here refers
//! to Raft, gRPC or Postgres types.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::intent::BreakRound;
use crate::policy::Policy;
use crate::types::MemberKind;
use crate::types::{Generation, Lsn};

/// Everything [`decide`](super::decide) looks at. All `*_ms` instants are on the
/// leader's monotonic clock, the same clock as `now_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    /// Every member of the cluster by name (from the Raft intent).
    pub members: BTreeMap<String, MemberView>,
    /// The primary recorded in the intent, if any.
    pub primary: Option<PrimaryView>,
    /// The current fencing generation.
    pub generation: Generation,
    pub policy: Policy,
    /// The sync set recorded in Raft: always a superset of what Postgres may wait on.
    pub recorded_sync_set: SyncSet,
    /// The intent records that the primary may have acknowledged commits with no sync
    /// standby although the policy asks for one (`Intent::sync_degraded`).
    pub recorded_sync_degraded: bool,
    /// While degraded: every commit acknowledged alone lies at or before this position
    /// (None: the primary may still acknowledge alone, or the bound is not known yet).
    pub recorded_sync_degraded_until_lsn: Option<Lsn>,
    /// The newest `synchronous_standby_names` target of this generation the intent asked
    /// the primary to apply, and its sequence number (`SyncTarget::seq`).
    pub sync_target: Option<(u64, SyncSet)>,
    /// Maintenance mode: no automatic action (a pending switchover still proceeds,
    /// since an operator asked for it).
    pub maintenance: bool,
    pub switchover: Option<SwitchoverView>,
    /// The latest observation the leader holds per member (absent = never heard of).
    pub observations: BTreeMap<String, Observation>,
    /// Round trips measured from the current primary to each member, for `auto` regions.
    /// A member without a measurement is treated as outside the budget.
    pub rtt_from_primary_ms: BTreeMap<String, u64>,
    pub limits: Limits,
    /// When this leader was elected (its clock): observations are kept by the leader only,
    /// so a new one knows little until every member reported to it.
    pub leader_since_ms: u64,
}

/// One member as the intent describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub region: String,
    pub kind: MemberKind,
    /// Higher is preferred among otherwise equal candidates.
    pub priority: i32,
    /// Never promote automatically (nor by switchover); never a sync standby.
    pub nofailover: bool,
    /// Never a sync standby (`nosync` tag).
    pub nosync: bool,
}

/// The recorded primary and the leader's bookkeeping about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryView {
    pub name: String,
    /// What the leader's last round of lease breaking found (the lease is held from a
    /// majority of the voters, each counting on its own clock).
    pub lease: LeaseView,
    /// When this leader saw the current generation committed, or its own election if
    /// later: the start of the bounded wait for a new primary to finish promoting.
    pub generation_since_ms: u64,
}

/// The primary's lease as the leader's break rounds found it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseView {
    /// A majority of the voters broke the lease of this generation: the primary can never
    /// renew it, and its last renewal was sent before its fence deadline passed.
    pub broken: bool,
    /// When not broken: when (leader's clock) enough answering voters' grants run out for
    /// a majority; None when no round has answered yet.
    pub majority_runs_out_at_ms: Option<u64>,
    /// The highest WAL position the primary reported to the answering voters with its
    /// renewals (known even to a leader that never received its observations).
    pub primary_lsn: Option<Lsn>,
    /// The round of that result: a promotion relies on it, so only a sync member that
    /// stopped confirming in it (or a later one) gives a final position (sim F7b).
    pub round: Option<BreakRound>,
    /// When broken: when (leader's clock) this leader first saw a majority break it in
    /// `round`; the wait for the sync members' final positions counts from there.
    pub broken_since_ms: Option<u64>,
}

/// `synchronous_standby_names = 'ANY k (names)'`; empty names (k = 0) means async.
/// Also the sync set the Raft intent records (hence serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SyncSet {
    pub names: BTreeSet<String>,
    pub k: u32,
}

impl SyncSet {
    /// A set with `k` normalised: 0 for an empty set, else at least 1.
    pub fn new<I, S>(names: I, k: u32) -> SyncSet
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: BTreeSet<String> = names.into_iter().map(Into::into).collect();
        let k = if names.is_empty() { 0 } else { k.max(1) };
        SyncSet { names, k }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// What one member's agent last reported (as received by the leader).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// When the leader received it; its age decides whether the agent is reachable.
    pub received_at_ms: u64,
    pub postgres_up: bool,
    pub in_recovery: bool,
    /// The agent has stopped its Postgres from accepting writes, for real.
    pub fenced: bool,
    pub timeline: u32,
    /// On a primary: its flushed WAL position (after a fence: the final one).
    pub wal_lsn: Option<Lsn>,
    /// On a standby: the last WAL position received.
    pub received_lsn: Option<Lsn>,
    /// On a standby: the last WAL position replayed.
    pub replayed_lsn: Option<Lsn>,
    pub wal_receiver_streaming: bool,
    /// The member its `primary_conninfo` points to.
    pub upstream: Option<String>,
    /// The newest generation this agent has seen.
    pub seen_generation: Generation,
    /// On a primary: what its Postgres has in `synchronous_standby_names`.
    pub sync_standby_names: Option<SyncSet>,
    /// On a primary: the sequence number of the intent's sync target that
    /// `sync_standby_names` is known to be (the agent applied it before this probe and
    /// applies targets in log order), None when not known. Only a report of the newest
    /// target tells what Postgres waits on now (sim F8).
    pub sync_target_seq: Option<u64>,
    /// This agent's probes of other members, by member name.
    pub probes: BTreeMap<String, PeerProbe>,
    /// The primary of a generation it was resumed in place in, fenced, and may still take
    /// writes again in it: its fence is not final (sim finding F3b).
    pub resume_pending: bool,
    /// On a standby: it broke the lease of this generation in this round (or a later one)
    /// and its WAL receiver was off that primary, before this probe and since: what it
    /// reports received is all it will ever confirm of that primary (sim finding F7b).
    pub receiver_off_since: Option<(Generation, BreakRound)>,
    /// This probe ran after the leader had told this agent that the primary of this
    /// generation reported its Postgres stopped (the token of the leader's answer to an
    /// earlier report): what it reports received is all that primary ever sent it.
    pub after_primary_stop: Option<Generation>,
    /// The members this agent counts a lease majority over (its intent's members that are
    /// Raft voters), sorted; empty when an older agent did not say. Gates membership
    /// changes ([`crate::lease::membership_change_may_proceed`]), not decisions.
    pub lease_voters: Vec<String>,
}

impl Observation {
    /// The most WAL this member is known to hold.
    pub fn best_lsn(&self) -> Option<Lsn> {
        [self.wal_lsn, self.received_lsn, self.replayed_lsn]
            .into_iter()
            .flatten()
            .max()
    }

    /// Postgres is up and accepts writes.
    pub fn writable(&self) -> bool {
        self.postgres_up && !self.in_recovery && !self.fenced
    }

    /// The agent confirms the fence and its Postgres is down or read-only: writes
    /// have really stopped.
    pub fn writes_stopped(&self) -> bool {
        self.fenced && (!self.postgres_up || self.in_recovery)
    }
}

/// One agent's view of another member.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerProbe {
    pub agent_reachable: bool,
    /// The member's Postgres answered and accepted writes (not in recovery).
    pub postgres_writable: bool,
}

/// A pending planned switchover (from the Raft intent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchoverView {
    pub target: String,
    pub phase: SwitchoverPhase,
    /// When this leader saw the phase committed (or its own election if later).
    pub phase_since_ms: u64,
}

/// The switchover state machine's phases, recorded in the Raft intent (hence serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchoverPhase {
    /// Checking that the target is healthy and caught up.
    #[default]
    Requested,
    /// The primary is told to stop writes; waiting for its final LSN to reach the target.
    StoppingWrites,
    /// Giving up: the old primary is told to take writes again.
    Aborting(SwitchoverAbort),
}

/// Why a switchover was given up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchoverAbort {
    NoPrimary,
    PrimaryNotHealthy,
    /// The target can never be promoted (witness, `nofailover`, not a member).
    TargetNotEligible(super::Rejection),
    /// The target stayed unhealthy or behind for the whole step timeout.
    TargetNotReady(super::Rejection),
    /// The primary did not confirm its writes stopped within the step timeout.
    WritesNotStopped,
    TargetDidNotCatchUp {
        received_lsn: Option<Lsn>,
        final_lsn: Lsn,
    },
    /// `meridianctl switchover --cancel` after writes were asked to stop.
    CancelledByOperator,
}

/// Bounds the core applies (from the agent config's timing section).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// An observation older than this means the agent is unreachable.
    pub stale_after_ms: u64,
    /// How long a new primary may stay in recovery after its promotion was committed.
    pub promote_timeout_ms: u64,
    /// Bound on each switchover phase.
    pub switchover_step_timeout_ms: u64,
    /// A switchover target must be at most this far behind before writes stop.
    pub switchover_max_lag_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // ~3 missed observations at the 250 ms default interval.
            stale_after_ms: 1_000,
            promote_timeout_ms: 30_000,
            switchover_step_timeout_ms: 5_000,
            switchover_max_lag_bytes: 16 * 1024 * 1024,
        }
    }
}
