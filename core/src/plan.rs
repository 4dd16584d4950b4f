//! The local planner: what a member's agent does next with its own Postgres, given what the
//! committed intent says about this member ([`MemberIntent`]) and what the agent sees
//! locally ([`LocalObserved`]). [`plan`] returns one [`Step`]; the runtime executes it and
//! plans again on its next tick (level-triggered, like the leader's core).
//!
//! The decision tree is the one of `node/src/agent/member.rs` (`tick`, `not_running`,
//! `as_standby`), written as a pure function so that it can be tested exactly and run by
//! the simulation. The runtime does not execute these steps yet (member.rs keeps its own
//! copy of the tree); the unit tests below pin the rules both share.

use crate::decide::{SwitchoverPhase, SyncSet};
use crate::intent::Intent;
use crate::types::Generation;

/// What the committed intent says about one member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberIntent {
    /// This member is in the intent at all.
    pub is_member: bool,
    /// No primary was ever recorded (generation 0).
    pub bootstrap: bool,
    /// The primary of the current generation, if any.
    pub primary: Option<String>,
    pub i_am_primary: bool,
    pub generation: Generation,
    /// An operator asked this member to re-clone.
    pub reinit: bool,
    /// The pending switchover's phase, when this member is the one switched away from.
    pub switchover_from_me: Option<SwitchoverPhase>,
    /// The leader resumed this member in place in the current generation.
    pub resumed: bool,
    /// What this generation's primary sets `synchronous_standby_names` to.
    pub sync_target: Option<SyncSet>,
}

impl MemberIntent {
    /// The intent as `me` reads it.
    pub fn of(intent: &Intent, me: &str) -> MemberIntent {
        let i_am_primary = intent.primary.as_deref() == Some(me);
        let switchover_from_me = intent
            .pending_switchover
            .as_ref()
            .filter(|sw| sw.from == me)
            .map(|sw| sw.phase.clone());
        MemberIntent {
            is_member: intent.members.contains_key(me),
            bootstrap: intent.generation == Generation(0) && intent.primary.is_none(),
            primary: intent.primary.clone(),
            i_am_primary,
            generation: intent.generation,
            reinit: intent.reinit.contains(me),
            switchover_from_me,
            resumed: intent.resumed == Some(intent.generation),
            sync_target: intent
                .sync_target
                .as_ref()
                .filter(|t| t.generation == intent.generation)
                .map(|t| t.set.clone()),
        }
    }
}

/// What the local Postgres answered to a probe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    pub in_recovery: bool,
    /// The WAL receiver streams.
    pub streaming: bool,
    /// The timeline the WAL receiver streams.
    pub streamed_timeline: Option<u32>,
    /// `synchronous_standby_names` as shown (primary only).
    pub sync_standby_names: Option<SyncSet>,
}

/// What the agent sees locally, with the durations it measured on its own clock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalObserved {
    /// A data directory exists.
    pub has_data: bool,
    /// The postmaster runs (under this agent).
    pub running: bool,
    /// The fence mark is set (Postgres must not take writes until cleared).
    pub fenced: bool,
    /// The data directory has a `standby.signal`.
    pub standby_signal: bool,
    /// The probe's answer; `None` when the server did not answer (starting, frozen).
    pub probe: Option<Probe>,
    /// How long the running server has not answered (0 when it answers).
    pub unresponsive_for_ms: u64,
    /// This agent saw its Postgres up as the primary since it last fenced it.
    pub seen_primary_up: bool,
    /// This member holds the current generation's lease.
    pub lease_valid: bool,
    /// The timeline the primary writes on, from a fresh peer probe.
    pub primary_timeline: Option<u32>,
    /// The primary the standby's `primary_conninfo` points at.
    pub upstream: Option<String>,
    /// The WAL receiver was disconnected because this member broke the primary's lease.
    pub disconnected: bool,
    /// How long the standby has not streamed (0 when it streams).
    pub not_streaming_for_ms: u64,
    /// This agent already resumed, or gave up resuming, in the current generation
    /// (durable): it never takes writes again in it without a new `Resume`.
    pub resume_spent: bool,
    /// How long this agent has waited, fenced and resumed in place, for the lease to take
    /// writes again in the current generation.
    pub resume_waiting_ms: u64,
    /// This member, as a voter, broke the current generation's lease (a standing break,
    /// not released): as a standby it must stop confirming that primary's WAL.
    pub broke_primary_lease: bool,
}

/// What the agent tells the leader about a resume in place: its fence is not final while
/// it may still take writes again in this generation. The report must read `resume_spent`
/// before the fence mark (a resume clears the mark, then marks the resume spent).
pub fn resume_pending(intent: &MemberIntent, fenced: bool, resume_spent: bool) -> bool {
    intent.i_am_primary && intent.resumed && fenced && !resume_spent
}

/// The planner's bounds, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    /// A primary's server unresponsive for this long is fenced.
    pub fence_after_ms: u64,
    /// A standby not streaming for this long is rewound.
    pub rejoin_after_ms: u64,
    /// A primary resumed in place that cannot take its lease within this gives the resume
    /// up: its fence becomes final and the leader may promote another member.
    pub resume_within_ms: u64,
}

/// Why a member fences its own Postgres.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceWhy {
    /// The primary's server stopped answering for `fence_after`.
    Unresponsive,
    /// The primary's server crashed under this agent.
    Crashed,
    /// It accepts writes but the intent names another primary.
    NotPrimary,
}

/// One step for the agent to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now.
    Idle,
    /// Not a member: leave the data alone.
    NotAMember,
    /// Bootstrap the cluster (only the bootstrap member acts on it).
    Bootstrap,
    /// Re-clone on the operator's request.
    Reinit,
    /// No data yet: clone it from the primary.
    Clone { from: String },
    /// Start the server where it was (a stopped standby, or a primary with its lease).
    Start,
    /// Start as the primary: wait for the current generation's lease first.
    WaitForLease,
    /// Stop writes for real.
    Fence(FenceWhy),
    /// Named primary while in recovery: win the first renewal, then `pg_promote`.
    Promote,
    /// The switchover away from this member asks it to stop taking writes.
    StopWrites,
    /// Take writes again (switchover aborted, or resumed in place with the lease). For a
    /// resume in place the runtime clears the fence mark, then marks the resume spent,
    /// then starts the server.
    Resume,
    /// Resumed in place, but no lease within `resume_within_ms`: mark this generation's
    /// resume spent (durably), so the fence is final.
    GiveUpResume,
    /// Set `synchronous_standby_names` to this generation's target.
    ApplySyncNames(SyncSet),
    /// Point `primary_conninfo` at the primary.
    Repoint { to: String },
    /// A fenced former primary streams from the new one: clear the fence mark.
    ClearFence,
    /// This voter broke the primary's lease: disconnect the WAL receiver, so it confirms
    /// nothing more of that primary and its position becomes final.
    DisconnectUpstream,
    /// Diverged or an old primary: `pg_rewind` onto `onto` and start as its standby
    /// (re-clone when rewind fails).
    Rewind { onto: String },
}

/// The next step for this member.
pub fn plan(intent: &MemberIntent, local: &LocalObserved, limits: &PlanLimits) -> Step {
    if !intent.is_member {
        return Step::NotAMember;
    }
    if intent.bootstrap {
        return Step::Bootstrap;
    }
    if intent.reinit && !intent.i_am_primary {
        return Step::Reinit;
    }
    if !local.has_data {
        return match &intent.primary {
            Some(p) if !intent.i_am_primary => Step::Clone { from: p.clone() },
            _ => Step::Idle,
        };
    }
    if !local.running {
        return not_running(intent, local, limits);
    }
    let Some(probe) = &local.probe else {
        if intent.i_am_primary && local.unresponsive_for_ms >= limits.fence_after_ms {
            return Step::Fence(FenceWhy::Unresponsive);
        }
        return Step::Idle;
    };
    if intent.i_am_primary {
        if probe.in_recovery {
            return if local.fenced {
                Step::Idle
            } else {
                Step::Promote
            };
        }
        if intent.switchover_from_me == Some(SwitchoverPhase::StoppingWrites) {
            return Step::StopWrites;
        }
        if let Some(target) = &intent.sync_target {
            if probe.sync_standby_names.as_ref() != Some(target) {
                return Step::ApplySyncNames(target.clone());
            }
        }
        return Step::Idle;
    }
    if !probe.in_recovery {
        // A second writer: fence before anything else (DESIGN invariant 4).
        return Step::Fence(FenceWhy::NotPrimary);
    }
    let Some(primary) = intent.primary.clone() else {
        return Step::Idle;
    };
    // Streaming an older timeline than the primary writes on means it diverged.
    let behind_timeline = matches!(
        (probe.streamed_timeline, local.primary_timeline),
        (Some(s), Some(p)) if s < p
    );
    let streaming = probe.streaming && !behind_timeline;
    // A standby that cannot reach any Raft leader keeps confirming the primary's WAL: the
    // leader promotes only on final positions (`decide::failover::position_final`), so its
    // confirmations cannot make a promotion lose a commit, and disconnecting stalled the
    // primary's commits for a whole partial partition when it was the only sync standby
    // the primary reached (#12).
    // This voter broke the primary's lease: its WAL receiver stays off that primary until
    // a promotion (a new generation) or a release of the break, so a thawed primary's
    // waiting commits are not confirmed here after a promotion was decided (sim F7).
    if local.broke_primary_lease {
        return if local.disconnected {
            Step::Idle
        } else {
            Step::DisconnectUpstream
        };
    }
    if local.upstream.as_deref() != Some(primary.as_str()) || local.disconnected {
        return Step::Repoint { to: primary };
    }
    if streaming {
        return if local.fenced {
            Step::ClearFence
        } else {
            Step::Idle
        };
    }
    if local.not_streaming_for_ms < limits.rejoin_after_ms {
        return Step::Idle;
    }
    Step::Rewind { onto: primary }
}

fn not_running(intent: &MemberIntent, local: &LocalObserved, limits: &PlanLimits) -> Step {
    if intent.i_am_primary {
        if local.fenced {
            if matches!(
                intent.switchover_from_me,
                Some(SwitchoverPhase::Aborting(_))
            ) {
                return Step::Resume;
            }
            // At most once per generation, and only while the leader waits for it (the
            // report says the resume is pending until it is spent).
            if intent.resumed && !local.resume_spent {
                if local.lease_valid {
                    return Step::Resume;
                }
                if local.resume_waiting_ms >= limits.resume_within_ms {
                    return Step::GiveUpResume;
                }
            }
            // Stays down: the leader promotes another member.
            return Step::Idle;
        }
        if local.seen_primary_up {
            return Step::Fence(FenceWhy::Crashed);
        }
        if local.standby_signal {
            // Named primary while down as a standby: start, then promote.
            return Step::Start;
        }
        return if local.lease_valid {
            Step::Start
        } else {
            Step::WaitForLease
        };
    }
    let Some(primary) = intent.primary.clone() else {
        return Step::Idle;
    };
    if local.standby_signal && !local.fenced {
        return Step::Start;
    }
    // An old primary (or a fenced member): rejoin the current primary.
    Step::Rewind { onto: primary }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::SwitchoverAbort;

    const LIMITS: PlanLimits = PlanLimits {
        fence_after_ms: 1_500,
        rejoin_after_ms: 10_000,
        resume_within_ms: 5_000,
    };

    fn standby_intent() -> MemberIntent {
        MemberIntent {
            is_member: true,
            primary: Some("p".into()),
            generation: Generation(3),
            ..MemberIntent::default()
        }
    }

    fn primary_intent() -> MemberIntent {
        MemberIntent {
            i_am_primary: true,
            primary: Some("me".into()),
            ..standby_intent()
        }
    }

    fn streaming_standby() -> LocalObserved {
        LocalObserved {
            has_data: true,
            running: true,
            standby_signal: true,
            probe: Some(Probe {
                in_recovery: true,
                streaming: true,
                streamed_timeline: Some(3),
                sync_standby_names: None,
            }),
            primary_timeline: Some(3),
            upstream: Some("p".into()),
            ..LocalObserved::default()
        }
    }

    fn writable_primary() -> LocalObserved {
        LocalObserved {
            has_data: true,
            running: true,
            probe: Some(Probe {
                in_recovery: false,
                ..Probe::default()
            }),
            seen_primary_up: true,
            lease_valid: true,
            ..LocalObserved::default()
        }
    }

    #[test]
    fn membership_bootstrap_reinit_and_clone_come_first() {
        let l = streaming_standby();
        assert_eq!(
            plan(&MemberIntent::default(), &l, &LIMITS),
            Step::NotAMember
        );
        let boot = MemberIntent {
            is_member: true,
            bootstrap: true,
            ..MemberIntent::default()
        };
        assert_eq!(plan(&boot, &l, &LIMITS), Step::Bootstrap);
        let reinit = MemberIntent {
            reinit: true,
            ..standby_intent()
        };
        assert_eq!(plan(&reinit, &l, &LIMITS), Step::Reinit);
        let empty = LocalObserved::default();
        assert_eq!(
            plan(&standby_intent(), &empty, &LIMITS),
            Step::Clone { from: "p".into() }
        );
        assert_eq!(plan(&primary_intent(), &empty, &LIMITS), Step::Idle);
    }

    #[test]
    fn a_stopped_primary_starts_only_with_its_lease_and_a_crashed_one_is_fenced() {
        let mut l = writable_primary();
        l.running = false;
        l.probe = None;
        assert_eq!(
            plan(&primary_intent(), &l, &LIMITS),
            Step::Fence(FenceWhy::Crashed)
        );
        l.seen_primary_up = false;
        assert_eq!(plan(&primary_intent(), &l, &LIMITS), Step::Start);
        l.lease_valid = false;
        assert_eq!(plan(&primary_intent(), &l, &LIMITS), Step::WaitForLease);
        l.standby_signal = true;
        assert_eq!(plan(&primary_intent(), &l, &LIMITS), Step::Start);
    }

    #[test]
    fn a_fenced_primary_resumes_only_when_resumed_with_the_lease_or_aborted() {
        let l = LocalObserved {
            has_data: true,
            fenced: true,
            lease_valid: true,
            ..LocalObserved::default()
        };
        assert_eq!(plan(&primary_intent(), &l, &LIMITS), Step::Idle);
        let resumed = MemberIntent {
            resumed: true,
            ..primary_intent()
        };
        assert_eq!(plan(&resumed, &l, &LIMITS), Step::Resume);
        let no_lease = LocalObserved {
            lease_valid: false,
            ..l.clone()
        };
        assert_eq!(plan(&resumed, &no_lease, &LIMITS), Step::Idle);
        let aborting = MemberIntent {
            switchover_from_me: Some(SwitchoverPhase::Aborting(SwitchoverAbort::WritesNotStopped)),
            ..primary_intent()
        };
        assert_eq!(plan(&aborting, &no_lease, &LIMITS), Step::Resume);
    }

    /// F7: a standby that broke the primary's lease stops streaming from it, and picks up
    /// again once the break is gone (released, or a new generation).
    #[test]
    fn a_standby_that_broke_the_primarys_lease_stops_confirming_its_wal() {
        let mut l = streaming_standby();
        l.broke_primary_lease = true;
        assert_eq!(
            plan(&standby_intent(), &l, &LIMITS),
            Step::DisconnectUpstream
        );
        l.disconnected = true;
        assert_eq!(plan(&standby_intent(), &l, &LIMITS), Step::Idle);
        l.broke_primary_lease = false;
        assert_eq!(
            plan(&standby_intent(), &l, &LIMITS),
            Step::Repoint { to: "p".into() }
        );
    }

    /// F3b: a resume in place happens at most once per generation, and the fence of a
    /// resumed primary is final (for the leader) only once the resume is spent.
    #[test]
    fn a_resume_in_place_is_taken_or_given_up_once_per_generation() {
        let resumed = MemberIntent {
            resumed: true,
            ..primary_intent()
        };
        let mut l = LocalObserved {
            has_data: true,
            fenced: true,
            lease_valid: false,
            resume_waiting_ms: 4_999,
            ..LocalObserved::default()
        };
        assert_eq!(plan(&resumed, &l, &LIMITS), Step::Idle);
        assert!(resume_pending(&resumed, l.fenced, l.resume_spent));
        l.resume_waiting_ms = 5_000;
        assert_eq!(plan(&resumed, &l, &LIMITS), Step::GiveUpResume);
        l.resume_spent = true;
        assert_eq!(plan(&resumed, &l, &LIMITS), Step::Idle);
        assert!(!resume_pending(&resumed, l.fenced, l.resume_spent));
        // Spent: even with the lease, no second resume in this generation.
        l.lease_valid = true;
        assert_eq!(plan(&resumed, &l, &LIMITS), Step::Idle);
        // Not resumed, not primary, or not fenced: nothing pending.
        assert!(!resume_pending(&primary_intent(), true, false));
        assert!(!resume_pending(&resumed, false, false));
    }

    #[test]
    fn an_unresponsive_primary_is_fenced_after_fence_after() {
        let mut l = writable_primary();
        l.probe = None;
        l.unresponsive_for_ms = 1_499;
        assert_eq!(plan(&primary_intent(), &l, &LIMITS), Step::Idle);
        l.unresponsive_for_ms = 1_500;
        assert_eq!(
            plan(&primary_intent(), &l, &LIMITS),
            Step::Fence(FenceWhy::Unresponsive)
        );
        // A standby that does not answer is left alone.
        assert_eq!(plan(&standby_intent(), &l, &LIMITS), Step::Idle);
    }

    #[test]
    fn the_primary_promotes_stops_writes_and_applies_its_sync_target() {
        let l = streaming_standby();
        assert_eq!(plan(&primary_intent(), &l, &LIMITS), Step::Promote);
        let fenced = LocalObserved { fenced: true, ..l };
        assert_eq!(plan(&primary_intent(), &fenced, &LIMITS), Step::Idle);
        let w = writable_primary();
        assert_eq!(plan(&primary_intent(), &w, &LIMITS), Step::Idle);
        let stopping = MemberIntent {
            switchover_from_me: Some(SwitchoverPhase::StoppingWrites),
            ..primary_intent()
        };
        assert_eq!(plan(&stopping, &w, &LIMITS), Step::StopWrites);
        let set = SyncSet::new(["a", "b"], 1);
        let target = MemberIntent {
            sync_target: Some(set.clone()),
            ..primary_intent()
        };
        assert_eq!(
            plan(&target, &w, &LIMITS),
            Step::ApplySyncNames(set.clone())
        );
        let mut applied = w;
        applied.probe.as_mut().unwrap().sync_standby_names = Some(set);
        assert_eq!(plan(&target, &applied, &LIMITS), Step::Idle);
    }

    #[test]
    fn a_second_writer_is_fenced_before_anything_else() {
        assert_eq!(
            plan(&standby_intent(), &writable_primary(), &LIMITS),
            Step::Fence(FenceWhy::NotPrimary)
        );
    }

    #[test]
    fn a_standby_repoints_streams_and_rewinds_when_diverged() {
        let l = streaming_standby();
        assert_eq!(plan(&standby_intent(), &l, &LIMITS), Step::Idle);
        let elsewhere = LocalObserved {
            upstream: Some("old".into()),
            ..l.clone()
        };
        assert_eq!(
            plan(&standby_intent(), &elsewhere, &LIMITS),
            Step::Repoint { to: "p".into() }
        );
        let fenced = LocalObserved {
            fenced: true,
            ..l.clone()
        };
        assert_eq!(plan(&standby_intent(), &fenced, &LIMITS), Step::ClearFence);
        // Streaming an older timeline than the primary's counts as not streaming.
        let mut behind = l.clone();
        behind.primary_timeline = Some(4);
        behind.not_streaming_for_ms = 9_999;
        assert_eq!(plan(&standby_intent(), &behind, &LIMITS), Step::Idle);
        behind.not_streaming_for_ms = 10_000;
        assert_eq!(
            plan(&standby_intent(), &behind, &LIMITS),
            Step::Rewind { onto: "p".into() }
        );
    }

    #[test]
    fn a_stopped_standby_restarts_and_an_old_primary_rewinds() {
        let mut l = streaming_standby();
        l.running = false;
        l.probe = None;
        assert_eq!(plan(&standby_intent(), &l, &LIMITS), Step::Start);
        l.standby_signal = false;
        assert_eq!(
            plan(&standby_intent(), &l, &LIMITS),
            Step::Rewind { onto: "p".into() }
        );
        l.standby_signal = true;
        l.fenced = true;
        assert_eq!(
            plan(&standby_intent(), &l, &LIMITS),
            Step::Rewind { onto: "p".into() }
        );
    }
}
