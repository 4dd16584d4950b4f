//! The failover decision core: from a [`ClusterView`] and the leader's clock, what the
//! Raft leader should do next ([`decide`] → [`Decision`]).
//!
//! Owns the rules of DESIGN §3: when the primary counts as failed, who may replace it
//! (and why nobody may), the planned-switchover state machine and the sync-set ordering
//! rule. What a member does with its own Postgres (fence, resume, re-point, rewind) is
//! the local planner's ([`crate::plan`]), from the intent the leader commits: the leader
//! emits only Raft writes and lease breaks, each of which its runtime carries out.
//!
//! # Invariants
//! - **The decision core does no I/O.** No tokio, no network, no files, no
//!   `Instant::now()`: the clock is the `now_ms` argument (the leader's monotonic clock)
//!   and everything else is in the view. Same view and clock → same decision.
//! - **Level-triggered.** The core says what should be true now, not what changed:
//!   an action is repeated on every call until the observations show it done. The
//!   runtime de-duplicates actions already in flight.
//! - **Raft first.** [`Action::is_raft_write`] actions must be committed by a leader that
//!   has confirmed its leadership before anything depends on them; the core emits at
//!   most one step of a two-step change per call, so the next call sees the committed
//!   step (e.g. the sync set is recorded before Postgres is told to wait on it).
//! - **No surprise loss.** When no member is safe, the answer is no promotion and a
//!   reason ([`Wait::NoCandidate`]), never a guess.

mod display;
mod failover;
pub mod from_intent;
mod resume;
mod switchover;
mod sync;
mod view;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

pub use from_intent::{cluster_view, LeaderBookkeeping};
pub use resume::{primary_stop_token, resume_in_place, ResumeInPlace};
pub use view::{
    ClusterView, LeaseView, Limits, MemberView, Observation, PeerProbe, PrimaryView,
    SwitchoverAbort, SwitchoverPhase, SwitchoverView, SyncSet,
};

use crate::types::{Generation, Lsn};

/// What the leader should do now, and what (if anything) it is waiting for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// In order; Raft writes come before the lease break that relies on them.
    pub actions: Vec<Action>,
    /// Why something the cluster needs is not (yet) happening; `None` when all is well.
    pub wait: Option<Wait>,
}

/// One step for the runtime to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Raft: make `member` the primary at `generation` (always the current one + 1);
    /// then its agent replays, runs `pg_promote` and checks it is writable. A promotion
    /// with reason `Switchover` also ends the pending switchover.
    Promote {
        member: String,
        generation: Generation,
        reason: PromoteReason,
        /// WAL the old primary was known to hold beyond what `member` received.
        expected_loss_bytes: u64,
    },
    /// Leader: ask every voter to break `member`'s lease of `generation` (a voter breaks
    /// it only once its own grant ran out); the result comes back as
    /// [`PrimaryView::lease`].
    BreakLease {
        member: String,
        generation: Generation,
    },
    /// Raft: record the sync set. `degraded`: the primary may acknowledge commits with no
    /// sync standby although the policy asks for one (see `Intent::sync_degraded`).
    /// `degraded_until_lsn`: once the primary waits on a set again, every commit it
    /// acknowledged alone lies at or before this position.
    RecordSyncSet {
        set: SyncSet,
        degraded: bool,
        degraded_until_lsn: Option<Lsn>,
    },
    /// Agent of `primary`: set `synchronous_standby_names = 'ANY k (names)'`.
    ApplySyncStandbyNames { primary: String, set: SyncSet },
    /// Raft: move the pending switchover to `phase`.
    SetSwitchoverPhase { phase: SwitchoverPhase },
    /// Raft: drop the pending switchover, recording why in the history.
    AbandonSwitchover { reason: SwitchoverAbort },
}

impl Action {
    /// Actions that are entries of the Raft log (the rest are commands to agents).
    pub fn is_raft_write(&self) -> bool {
        matches!(
            self,
            Action::Promote { .. }
                | Action::RecordSyncSet { .. }
                | Action::SetSwitchoverPhase { .. }
                | Action::AbandonSwitchover { .. }
        )
    }
}

/// Why a promotion happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromoteReason {
    /// The primary's own agent confirmed its Postgres is down and fenced.
    PrimaryFenced,
    /// The primary's agent is unreachable and a majority of the voters broke its lease.
    LeaseExpired,
    /// A planned switchover reached its last step.
    Switchover,
}

/// Why the cluster is holding back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// No primary is recorded (bootstrap is not the core's job).
    NoPrimary,
    /// The primary's agent is unreachable but a majority has not broken its lease yet
    /// (some grants still run). `expires_in_ms`: until enough of the voters' grants that
    /// answered run out for a majority; None when no break round has answered yet.
    PrimaryLeaseValid {
        primary: String,
        expires_in_ms: Option<u64>,
    },
    /// The primary's agent is unreachable from the leader, yet these members still see
    /// its Postgres taking writes.
    PrimaryWritableForOthers {
        primary: String,
        seen_by: Vec<String>,
    },
    /// The primary's Postgres is down or not writable; waiting for its agent to confirm
    /// the fence before promoting.
    PrimaryFencing {
        primary: String,
    },
    /// The primary was resumed in place in this generation and its agent may still take
    /// writes again: its fence is not final until the agent resumed or gave up.
    PrimaryResuming {
        primary: String,
    },
    /// A newly elected leader has not heard from these data members yet: it waits (at
    /// most one staleness bound) before choosing a candidate without them.
    GatheringObservations {
        missing: Vec<String>,
        remaining_ms: u64,
    },
    /// The primary failed; enough of the recorded sync set answers to make up the quorum,
    /// but these members' positions are not final yet (they have not said they stopped
    /// confirming the old primary's WAL since its lease was broken). `remaining_ms`: how
    /// long the leader still waits for them (None: until the lease is broken).
    SyncPositionsPending {
        primary: String,
        pending: Vec<String>,
        remaining_ms: Option<u64>,
    },
    /// A new primary is finishing its promotion.
    PrimaryPromoting {
        primary: String,
        remaining_ms: u64,
    },
    /// The primary failed and no member may replace it automatically.
    NoCandidate(NoCandidate),
    Switchover(SwitchoverWait),
    /// `durability = required` and fewer than `quorum` sync standbys are healthy: the
    /// sync set is kept, not shrunk below `quorum` names (shrinking is what `preferred`
    /// does), so the primary's commits wait on `waiting_on` until enough are back.
    SyncQuorumShort {
        primary: String,
        /// The healthy standbys of the sync regions.
        healthy: BTreeSet<String>,
        quorum: u32,
        /// What the primary's Postgres waits on meanwhile (empty: nobody yet).
        waiting_on: SyncSet,
    },
    /// Maintenance mode: these actions (and this wait) are what the core would otherwise do.
    Maintenance {
        suppressed: Vec<Action>,
        would_wait: Option<Box<Wait>>,
    },
}

/// Why no member may be promoted, member by member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoCandidate {
    pub failed_primary: String,
    pub reason: NoCandidateReason,
    /// Every other member and why it was passed over.
    pub rejected: BTreeMap<String, Rejection>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoCandidateReason {
    /// Under a sync policy, fewer than n−k+1 of the recorded sync set answered, so the
    /// highest acknowledged LSN is unknown.
    SyncQuorumNotAnswering {
        answered: BTreeSet<String>,
        needed: usize,
        of: usize,
    },
    /// Every member was rejected (see `rejected`).
    NoQualifiedMember,
    /// The policy asks for sync standbys, but the old primary may have acknowledged
    /// commits with none (`durability = preferred` emptied its set, or it started without
    /// one): only it is known to hold them, and `async_failover` is off.
    AcknowledgedAlone,
}

/// Why one member cannot be promoted. Serde because a switchover abandoned for it is
/// recorded in the Raft intent.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    NotAMember,
    Witness,
    NoObservation,
    StaleObservation {
        age_ms: u64,
    },
    Fenced,
    PostgresDown,
    NotInRecovery,
    NoFailover,
    RegionFailoverManual {
        region: String,
    },
    NoLsn,
    /// It never followed the old primary's latest timeline.
    OlderTimeline {
        timeline: u32,
        primary_timeline: u32,
    },
    LagTooHigh {
        lag_bytes: u64,
        max_bytes: u64,
    },
    /// Under a sync policy: below the highest LSN of the answering sync quorum.
    BehindSyncQuorum {
        lsn: Lsn,
        quorum_lsn: Lsn,
    },
    /// Not in the recorded sync set, and the policy forbids async failover here.
    NotInSyncSet,
    /// In the recorded sync set, but too few of the set answered to know whether it holds
    /// every commit a sync standby acknowledged.
    SyncQuorumUnknown,
}

/// What a pending switchover is waiting for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchoverWait {
    TargetNotReady {
        target: String,
        why: Rejection,
        remaining_ms: u64,
    },
    WritesStopping {
        primary: String,
        remaining_ms: u64,
    },
    TargetCatchingUp {
        target: String,
        received_lsn: Option<Lsn>,
        final_lsn: Lsn,
        remaining_ms: u64,
    },
    PrimaryResuming {
        primary: String,
        remaining_ms: u64,
    },
}

/// Decides what the Raft leader should do now. Pure: see the module invariants.
pub fn decide(view: &ClusterView, now_ms: u64) -> Decision {
    let cx = Cx { view, now_ms };
    // An operator-requested switchover runs even in maintenance mode.
    if let Some(sw) = &view.switchover {
        return switchover::step(&cx, sw);
    }
    let decision = automatic(&cx);
    if view.maintenance && (!decision.actions.is_empty() || decision.wait.is_some()) {
        // Bookkeeping of the degraded mark goes on (the set itself stays): a primary
        // acknowledging alone must be known as such when automatic failover comes back,
        // and one whose standbys caught up must not stay marked.
        let (kept, suppressed): (Vec<Action>, Vec<Action>) =
            decision.actions.into_iter().partition(|a| {
                matches!(a, Action::RecordSyncSet { set, .. } if *set == view.recorded_sync_set)
            });
        return Decision {
            actions: kept,
            wait: Some(Wait::Maintenance {
                suppressed,
                would_wait: decision.wait.map(Box::new),
            }),
        };
    }
    decision
}

/// Everything the core does on its own: failover when the primary failed, otherwise
/// housekeeping around a live primary.
fn automatic(cx: &Cx) -> Decision {
    let Some(primary) = &cx.view.primary else {
        return Decision {
            actions: Vec::new(),
            wait: Some(Wait::NoPrimary),
        };
    };
    let name = primary.name.as_str();
    match failover::primary_state(cx, primary) {
        failover::PrimaryState::Healthy(pobs) => {
            let (actions, wait) = sync::step(cx, name, pobs);
            Decision { actions, wait }
        }
        failover::PrimaryState::Promoting { remaining_ms } => Decision {
            actions: Vec::new(),
            wait: Some(Wait::PrimaryPromoting {
                primary: name.to_string(),
                remaining_ms,
            }),
        },
        failover::PrimaryState::NotFenced => Decision {
            actions: Vec::new(),
            wait: Some(Wait::PrimaryFencing {
                primary: name.to_string(),
            }),
        },
        failover::PrimaryState::Failed(reason) => match failover::gathering(cx, name) {
            Some(wait) => Decision {
                actions: Vec::new(),
                wait: Some(wait),
            },
            None => failover::replace(cx, name, reason),
        },
        failover::PrimaryState::Holding(wait) => Decision {
            actions: Vec::new(),
            wait: Some(wait),
        },
        failover::PrimaryState::LeaseHeld(wait) => Decision {
            actions: vec![Action::BreakLease {
                member: name.to_string(),
                generation: cx.view.generation,
            }],
            wait: Some(wait),
        },
    }
}

/// The view and the clock, with the small queries every rule needs.
struct Cx<'a> {
    view: &'a ClusterView,
    now_ms: u64,
}

impl<'a> Cx<'a> {
    fn age_ms(&self, obs: &Observation) -> u64 {
        self.now_ms.saturating_sub(obs.received_at_ms)
    }

    fn is_fresh(&self, obs: &Observation) -> bool {
        self.age_ms(obs) <= self.view.limits.stale_after_ms
    }

    /// The member's observation if it is fresh (its agent is reachable).
    fn fresh(&self, name: &str) -> Option<&'a Observation> {
        self.view
            .observations
            .get(name)
            .filter(|obs| self.is_fresh(obs))
    }

    /// Deadline arithmetic: ms left until `since + bound`, 0 once passed.
    fn remaining_ms(&self, since_ms: u64, bound_ms: u64) -> u64 {
        since_ms
            .saturating_add(bound_ms)
            .saturating_sub(self.now_ms)
    }
}
