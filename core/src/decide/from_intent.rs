//! Builds the decision core's input from what the Raft leader holds: the committed
//! [`Intent`], its own bookkeeping on its monotonic clock ([`LeaderBookkeeping`]) and the
//! observations agents reported (the runtime converts them off the wire).
//!
//! Pure like the rest of the core: no I/O, no clock reads; every instant is an argument.

use std::collections::BTreeMap;

use super::view::{
    ClusterView, LeaseView, Limits, MemberView, Observation, PrimaryView, SwitchoverView,
};
use crate::intent::Intent;

/// What only the leader's runtime knows, all on its monotonic clock (the clock of the
/// `now_ms` given to [`decide`](super::decide)). The runtime resets the fields when what
/// they time changes (a new primary, generation or switchover phase).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderBookkeeping {
    /// When this member became leader.
    pub elected_at_ms: u64,
    /// The last lease break round for the current primary and generation.
    pub lease: LeaseView,
    /// When this leader saw the current generation committed.
    pub generation_seen_at_ms: u64,
    /// When this leader saw the pending switchover's phase committed.
    pub switchover_phase_since_ms: u64,
}

/// The decision core's view of the cluster. Observations of names that are not members
/// of the intent (a removed member still reporting) are left out.
pub fn cluster_view(
    intent: &Intent,
    leader: &LeaderBookkeeping,
    observations: &BTreeMap<String, Observation>,
    rtt_from_primary_ms: BTreeMap<String, u64>,
    limits: Limits,
) -> ClusterView {
    let members = intent
        .members
        .iter()
        .map(|(name, m)| {
            let view = MemberView {
                region: m.region.clone(),
                kind: m.kind,
                priority: m.tags.priority,
                nofailover: m.tags.nofailover,
                // A cascading standby's name never reaches the primary's
                // pg_stat_replication: a commit could not wait for it.
                nosync: m.tags.nosync || crate::cascade::cascade_source(intent, name).is_some(),
            };
            (name.clone(), view)
        })
        .collect();
    // A bound that started before this leader's election counts from the election:
    // the leader cannot know what happened on the clock of a predecessor.
    let since_election = |at_ms: u64| at_ms.max(leader.elected_at_ms);
    let primary = intent.primary.as_ref().map(|name| PrimaryView {
        name: name.clone(),
        lease: leader.lease,
        generation_since_ms: since_election(leader.generation_seen_at_ms),
    });
    let switchover = intent.pending_switchover.as_ref().map(|sw| SwitchoverView {
        target: sw.to.clone(),
        phase: sw.phase.clone(),
        phase_since_ms: since_election(leader.switchover_phase_since_ms),
    });
    let observations = observations
        .iter()
        .filter(|(name, _)| intent.members.contains_key(name.as_str()))
        .map(|(name, obs)| (name.clone(), obs.clone()))
        .collect();
    ClusterView {
        leader_since_ms: leader.elected_at_ms,
        members,
        primary,
        generation: intent.generation,
        policy: intent.policy.clone(),
        recorded_sync_set: intent.sync_set.clone(),
        recorded_sync_degraded: intent.sync_degraded,
        recorded_sync_degraded_until_lsn: intent.sync_degraded_until_lsn,
        sync_target: intent
            .sync_target
            .as_ref()
            .filter(|t| t.generation == intent.generation)
            .map(|t| (t.seq, t.set.clone())),
        maintenance: intent.maintenance,
        switchover,
        observations,
        rtt_from_primary_ms,
        limits,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::decide::{SwitchoverAbort, SwitchoverPhase, SyncSet};
    use crate::intent::{Command, MemberTags, PendingSwitchover, Promote, PromotionKind};
    use crate::policy::{Durability, Policy};
    use crate::types::{Generation, Lsn, MemberKind};

    fn add(i: &mut Intent, name: &str, region: &str, kind: MemberKind, tags: MemberTags) {
        i.apply(&Command::AddMember {
            name: name.into(),
            region: region.into(),
            kind,
            tags,
            at_unix_ms: 1,
        });
    }

    /// e1 (primary, generation 1), e2 and w1 (priority 3, nofailover) data members,
    /// x1 witness; sync set ANY 1 (e2, w1) recorded; preferred durability.
    fn intent() -> Intent {
        let mut i = Intent::default();
        add(
            &mut i,
            "e1",
            "east",
            MemberKind::Data,
            MemberTags::default(),
        );
        add(
            &mut i,
            "e2",
            "east",
            MemberKind::Data,
            MemberTags::default(),
        );
        let w1_tags = MemberTags {
            priority: 3,
            nofailover: true,
            ..MemberTags::default()
        };
        add(&mut i, "w1", "west", MemberKind::Data, w1_tags);
        add(
            &mut i,
            "x1",
            "central",
            MemberKind::Witness,
            MemberTags::default(),
        );
        let steps = [
            Command::Promote(Promote {
                member: "e1".into(),
                generation: Generation(1),
                kind: PromotionKind::Bootstrap,
                force: false,
                reason: "bootstrap".into(),
                at_unix_ms: 2,
                old_primary_lsn: None,
                new_primary_lsn: None,
                possible_loss_bytes: None,
                old_lease_released: false,
                lease_break_round: None,
            }),
            Command::SetPolicy {
                expected_version: None,
                policy: Policy {
                    durability: Durability::Preferred,
                    ..Policy::default()
                },
                reason: "test".into(),
                at_unix_ms: 3,
            },
            Command::RecordSyncSet {
                generation: Generation(1),
                set: SyncSet::new(["e2", "w1"], 1),
                degraded: false,
                degraded_until_lsn: None,
            },
        ];
        for cmd in steps {
            assert_eq!(i.validate(&cmd), Ok(()), "{cmd:?}");
            i.apply(&cmd);
        }
        i
    }

    fn member(region: &str, kind: MemberKind, priority: i32, nofailover: bool) -> MemberView {
        MemberView {
            region: region.into(),
            kind,
            priority,
            nofailover,
            nosync: false,
        }
    }

    fn obs(received_at_ms: u64) -> Observation {
        Observation {
            received_at_ms,
            postgres_up: true,
            ..Observation::default()
        }
    }

    fn bookkeeping() -> LeaderBookkeeping {
        LeaderBookkeeping {
            elected_at_ms: 1_000,
            lease: LeaseView::default(),
            generation_seen_at_ms: 1_200,
            switchover_phase_since_ms: 0,
        }
    }

    #[test]
    fn view_carries_the_intent_and_the_leaders_bookkeeping() {
        let i = intent();
        let observations = BTreeMap::from([
            ("e1".to_string(), obs(900)),
            ("e2".to_string(), obs(950)),
            // Not a member (any more): left out.
            ("gone".to_string(), obs(990)),
        ]);
        let rtt = BTreeMap::from([("e2".to_string(), 1), ("w1".to_string(), 40)]);
        let limits = Limits {
            stale_after_ms: 7,
            ..Limits::default()
        };
        let view = cluster_view(
            &i,
            &bookkeeping(),
            &observations,
            rtt.clone(),
            limits.clone(),
        );
        let expected = ClusterView {
            leader_since_ms: 1_000,
            members: BTreeMap::from([
                ("e1".to_string(), member("east", MemberKind::Data, 0, false)),
                ("e2".to_string(), member("east", MemberKind::Data, 0, false)),
                ("w1".to_string(), member("west", MemberKind::Data, 3, true)),
                (
                    "x1".to_string(),
                    member("central", MemberKind::Witness, 0, false),
                ),
            ]),
            primary: Some(PrimaryView {
                name: "e1".into(),
                lease: LeaseView::default(),
                generation_since_ms: 1_200,
            }),
            generation: Generation(1),
            policy: Policy {
                durability: Durability::Preferred,
                ..Policy::default()
            },
            recorded_sync_set: SyncSet {
                names: BTreeSet::from(["e2".to_string(), "w1".to_string()]),
                k: 1,
            },
            recorded_sync_degraded: false,
            recorded_sync_degraded_until_lsn: None,
            sync_target: Some((1, SyncSet::default())),
            maintenance: false,
            switchover: None,
            observations: BTreeMap::from([
                ("e1".to_string(), obs(900)),
                ("e2".to_string(), obs(950)),
            ]),
            rtt_from_primary_ms: rtt,
            limits,
        };
        assert_eq!(view, expected);
    }

    #[test]
    fn view_carries_the_last_lease_break_round() {
        let mut b = bookkeeping();
        b.lease = LeaseView {
            broken: false,
            majority_runs_out_at_ms: Some(7_000),
            primary_lsn: None,
            round: Some(crate::intent::BreakRound { term: 4, seq: 2 }),
            broken_since_ms: None,
        };
        let view = cluster_view(
            &intent(),
            &b,
            &BTreeMap::new(),
            BTreeMap::new(),
            Limits::default(),
        );
        assert_eq!(
            view.primary,
            Some(PrimaryView {
                name: "e1".into(),
                lease: b.lease,
                generation_since_ms: 1_200,
            })
        );
    }

    #[test]
    fn switchover_phase_and_bounds_start_no_earlier_than_the_election() {
        let mut i = intent();
        let cmds = [
            Command::BeginSwitchover(PendingSwitchover {
                from: "e1".into(),
                to: "e2".into(),
                started_at_unix_ms: 4,
                phase: SwitchoverPhase::Requested,
            }),
            Command::SetSwitchoverPhase {
                to: "e2".into(),
                phase: SwitchoverPhase::StoppingWrites,
            },
        ];
        for cmd in cmds {
            assert_eq!(i.validate(&cmd), Ok(()), "{cmd:?}");
            i.apply(&cmd);
        }
        let mut b = bookkeeping();
        b.switchover_phase_since_ms = 1_500;
        let view = cluster_view(&i, &b, &BTreeMap::new(), BTreeMap::new(), Limits::default());
        assert_eq!(
            view.switchover,
            Some(SwitchoverView {
                target: "e2".into(),
                phase: SwitchoverPhase::StoppingWrites,
                phase_since_ms: 1_500,
            })
        );
        // Committed before this leader was elected: its bounds count from the election.
        b.switchover_phase_since_ms = 10;
        b.generation_seen_at_ms = 20;
        let view = cluster_view(&i, &b, &BTreeMap::new(), BTreeMap::new(), Limits::default());
        assert_eq!(view.switchover.map(|s| s.phase_since_ms), Some(1_000));
        assert_eq!(view.primary.map(|p| p.generation_since_ms), Some(1_000));

        let abort = SwitchoverPhase::Aborting(SwitchoverAbort::WritesNotStopped);
        i.apply(&Command::SetSwitchoverPhase {
            to: "e2".into(),
            phase: abort.clone(),
        });
        let view = cluster_view(&i, &b, &BTreeMap::new(), BTreeMap::new(), Limits::default());
        assert_eq!(view.switchover.map(|s| s.phase), Some(abort));
    }

    #[test]
    fn no_primary_no_switchover() {
        let view = cluster_view(
            &Intent::default(),
            &bookkeeping(),
            &BTreeMap::new(),
            BTreeMap::new(),
            Limits::default(),
        );
        let expected = ClusterView {
            leader_since_ms: 1_000,
            members: BTreeMap::new(),
            primary: None,
            generation: Generation(0),
            policy: Policy::default(),
            recorded_sync_set: SyncSet::default(),
            recorded_sync_degraded: false,
            recorded_sync_degraded_until_lsn: None,
            sync_target: None,
            maintenance: false,
            switchover: None,
            observations: BTreeMap::new(),
            rtt_from_primary_ms: BTreeMap::new(),
            limits: Limits::default(),
        };
        assert_eq!(view, expected);
    }

    /// The raft writes the core decides on a view built from the intent are commands
    /// the intent accepts: the two halves fit.
    #[test]
    fn decisions_on_the_view_are_accepted_by_the_intent() {
        use crate::decide::{decide, Action, PromoteReason};
        let mut i = intent();
        i.apply(&Command::BeginSwitchover(PendingSwitchover {
            from: "e1".into(),
            to: "e2".into(),
            started_at_unix_ms: 4,
            phase: SwitchoverPhase::Requested,
        }));
        let now_ms = 2_000;
        let standby = |lsn: u64| Observation {
            received_at_ms: now_ms,
            postgres_up: true,
            in_recovery: true,
            timeline: 1,
            received_lsn: Some(Lsn(lsn)),
            replayed_lsn: Some(Lsn(lsn)),
            wal_receiver_streaming: true,
            upstream: Some("e1".into()),
            seen_generation: Generation(1),
            ..Observation::default()
        };
        let mut primary = Observation {
            received_at_ms: now_ms,
            postgres_up: true,
            timeline: 1,
            wal_lsn: Some(Lsn(500)),
            seen_generation: Generation(1),
            sync_standby_names: Some(SyncSet::new(["e2", "w1"], 1)),
            ..Observation::default()
        };
        let mut observations = BTreeMap::from([
            ("e1".to_string(), primary.clone()),
            ("e2".to_string(), standby(500)),
            ("w1".to_string(), standby(400)),
        ]);
        let b = bookkeeping();
        let view = cluster_view(&i, &b, &observations, BTreeMap::new(), Limits::default());
        let d = decide(&view, now_ms);
        let Some(Action::SetSwitchoverPhase { phase }) = d.actions.first() else {
            panic!("expected a phase step: {d:?}");
        };
        assert_eq!(*phase, SwitchoverPhase::StoppingWrites);
        let step = Command::SetSwitchoverPhase {
            to: "e2".into(),
            phase: phase.clone(),
        };
        assert_eq!(i.validate(&step), Ok(()));
        i.apply(&step);

        // Writes stopped and the target caught up: the promotion is accepted.
        primary.fenced = true;
        primary.in_recovery = true;
        observations.insert("e1".into(), primary);
        let view = cluster_view(&i, &b, &observations, BTreeMap::new(), Limits::default());
        let d = decide(&view, now_ms);
        let Some(Action::Promote {
            member,
            generation,
            reason: PromoteReason::Switchover,
            ..
        }) = d.actions.first()
        else {
            panic!("expected a switchover promotion: {d:?}");
        };
        let promote = Command::Promote(Promote {
            member: member.clone(),
            generation: *generation,
            kind: PromotionKind::Switchover,
            force: false,
            reason: "switchover".into(),
            at_unix_ms: 5,
            old_primary_lsn: Some(Lsn(500)),
            new_primary_lsn: Some(Lsn(500)),
            possible_loss_bytes: None,
            old_lease_released: false,
            lease_break_round: None,
        });
        assert_eq!(i.validate(&promote), Ok(()));
        i.apply(&promote);
        assert_eq!(i.primary.as_deref(), Some("e2"));

        // The new primary's sync set: the core records it before Postgres waits on it.
        let new_primary = Observation {
            received_at_ms: now_ms,
            postgres_up: true,
            timeline: 2,
            wal_lsn: Some(Lsn(600)),
            seen_generation: Generation(2),
            // The promoting agent applied the carried set before promoting.
            sync_standby_names: Some(SyncSet::new(["w1"], 1)),
            ..Observation::default()
        };
        let mut w1 = standby(600);
        w1.upstream = Some("e2".into());
        let mut e1 = standby(600);
        e1.upstream = Some("e2".into());
        let observations = BTreeMap::from([
            ("e1".to_string(), e1),
            ("e2".to_string(), new_primary),
            ("w1".to_string(), w1),
        ]);
        let rtt = BTreeMap::from([("e1".to_string(), 1)]);
        let view = cluster_view(&i, &b, &observations, rtt, Limits::default());
        let d = decide(&view, now_ms);
        let Some(Action::RecordSyncSet { set, .. }) = d.actions.first() else {
            panic!("expected a sync set record: {d:?}");
        };
        assert_eq!(*set, SyncSet::new(["e1", "w1"], 1));
        let record = Command::RecordSyncSet {
            generation: i.generation,
            set: set.clone(),
            degraded: false,
            degraded_until_lsn: None,
        };
        assert_eq!(i.validate(&record), Ok(()));
    }
}
