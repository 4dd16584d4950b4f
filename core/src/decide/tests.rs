//! Exact-decision tests of the core: each builds a view, calls `decide`, and compares the
//! whole `Decision`.
//!
//! Base cluster: primary e1 and standby e2 in `east`, standbys w1 and w2 in `west`,
//! witness x1 in `central`; generation 3; sync set `ANY 1 (e2)` recorded and applied.
//! WAL: e1 last wrote 1_000_100, e2 received 1_000_000, w1 990_000, w2 980_000.

use std::collections::BTreeMap;

use super::*;
use crate::intent::BreakRound;
use crate::policy::{Durability, FailoverMode, Policy, SyncMode};
use crate::types::MemberKind;

const NOW: u64 = 100_000;
const FRESH: u64 = NOW - 100;
const STALE: u64 = NOW - 5_000;

fn member(region: &str, kind: MemberKind) -> MemberView {
    MemberView {
        region: region.into(),
        kind,
        priority: 0,
        nofailover: false,
        nosync: false,
    }
}

fn standby(lsn: u64, upstream: &str) -> Observation {
    Observation {
        received_at_ms: FRESH,
        postgres_up: true,
        in_recovery: true,
        timeline: 1,
        received_lsn: Some(Lsn(lsn)),
        replayed_lsn: Some(Lsn(lsn)),
        wal_receiver_streaming: true,
        upstream: Some(upstream.into()),
        seen_generation: Generation(3),
        ..Observation::default()
    }
}

fn base() -> ClusterView {
    let members = BTreeMap::from([
        ("e1".to_string(), member("east", MemberKind::Data)),
        ("e2".to_string(), member("east", MemberKind::Data)),
        ("w1".to_string(), member("west", MemberKind::Data)),
        ("w2".to_string(), member("west", MemberKind::Data)),
        ("x1".to_string(), member("central", MemberKind::Witness)),
    ]);
    let primary_obs = Observation {
        received_at_ms: FRESH,
        postgres_up: true,
        timeline: 1,
        wal_lsn: Some(Lsn(1_000_100)),
        seen_generation: Generation(3),
        sync_standby_names: Some(SyncSet::new(["e2"], 1)),
        ..Observation::default()
    };
    let witness_obs = Observation {
        received_at_ms: FRESH,
        seen_generation: Generation(3),
        ..Observation::default()
    };
    ClusterView {
        leader_since_ms: 0,
        members,
        primary: Some(PrimaryView {
            name: "e1".into(),
            lease: held_for(1_500),
            generation_since_ms: 0,
        }),
        generation: Generation(3),
        policy: Policy::default(),
        recorded_sync_set: SyncSet::new(["e2"], 1),
        recorded_sync_degraded: false,
        recorded_sync_degraded_until_lsn: None,
        sync_target: None,
        maintenance: false,
        switchover: None,
        observations: BTreeMap::from([
            ("e1".to_string(), primary_obs),
            ("e2".to_string(), standby(1_000_000, "e1")),
            ("w1".to_string(), standby(990_000, "e1")),
            ("w2".to_string(), standby(980_000, "e1")),
            ("x1".to_string(), witness_obs),
        ]),
        rtt_from_primary_ms: BTreeMap::from([
            ("e2".to_string(), 1),
            ("w1".to_string(), 50),
            ("w2".to_string(), 52),
            ("x1".to_string(), 30),
        ]),
        limits: Limits::default(),
    }
}

/// The last break round: a majority's grants run out `ms` after NOW.
fn held_for(ms: u64) -> LeaseView {
    LeaseView {
        broken: false,
        majority_runs_out_at_ms: Some(NOW + ms),
        primary_lsn: None,
        round: Some(ROUND),
        broken_since_ms: None,
    }
}

/// The break round the tests' promotions rely on.
const ROUND: BreakRound = BreakRound { term: 2, seq: 7 };

/// `name` broke the lease of generation 3 in [`ROUND`] and its WAL receiver is off since.
fn seal(v: &mut ClusterView, name: &str) {
    obs(v, name).receiver_off_since = Some((Generation(3), ROUND));
}

fn obs<'a>(v: &'a mut ClusterView, name: &str) -> &'a mut Observation {
    v.observations.get_mut(name).unwrap()
}

/// The primary's agent vanished and a majority broke its lease.
fn lose_primary(v: &mut ClusterView) {
    obs(v, "e1").received_at_ms = STALE;
    break_lease(v);
}

/// A majority broke the primary's lease in [`ROUND`] at NOW, and every standby that
/// answers stopped confirming since.
fn break_lease(v: &mut ClusterView) {
    v.primary.as_mut().unwrap().lease = LeaseView {
        broken: true,
        majority_runs_out_at_ms: None,
        primary_lsn: None,
        round: Some(ROUND),
        broken_since_ms: Some(NOW),
    };
    for name in ["e2", "w1", "w2"] {
        if v.observations.contains_key(name) {
            seal(v, name);
        }
    }
}

/// The primary's own agent reports Postgres down and fenced, and every standby that
/// answers has reported since it learned of that from the leader.
fn primary_fenced(v: &mut ClusterView) {
    let o = obs(v, "e1");
    o.postgres_up = false;
    o.fenced = true;
    for name in ["e2", "w1", "w2"] {
        if let Some(o) = v.observations.get_mut(name) {
            o.after_primary_stop = Some(Generation(3));
        }
    }
}

fn promote(member: &str, reason: PromoteReason, loss: u64) -> Decision {
    Decision {
        actions: vec![Action::Promote {
            member: member.into(),
            generation: Generation(4),
            reason,
            expected_loss_bytes: loss,
        }],
        wait: None,
    }
}

fn no_candidate(reason: NoCandidateReason, rejected: &[(&str, Rejection)]) -> Decision {
    Decision {
        actions: vec![],
        wait: Some(Wait::NoCandidate(NoCandidate {
            failed_primary: "e1".into(),
            reason,
            rejected: rejected
                .iter()
                .map(|(n, r)| (n.to_string(), r.clone()))
                .collect(),
        })),
    }
}

fn stale(age_ms: u64) -> Rejection {
    Rejection::StaleObservation { age_ms }
}

// ------------------------------------------------------------------ steady state

#[test]
fn healthy_cluster_needs_nothing() {
    assert_eq!(decide(&base(), NOW), Decision::default());
}

// ------------------------------------------------------------------ primary failure

#[test]
fn primary_lost_with_lease_still_valid_waits_and_asks_to_break_it() {
    let mut v = base();
    obs(&mut v, "e1").received_at_ms = STALE;
    let waiting = |expires_in_ms: Option<u64>| Decision {
        actions: vec![Action::BreakLease {
            member: "e1".into(),
            generation: Generation(3),
        }],
        wait: Some(Wait::PrimaryLeaseValid {
            primary: "e1".into(),
            expires_in_ms,
        }),
    };
    assert_eq!(decide(&v, NOW), waiting(Some(1_500)));
    assert_eq!(decide(&v, NOW + 1_499), waiting(Some(1)));
    // Past the estimate but not broken by a majority yet: still only asking.
    assert_eq!(decide(&v, NOW + 5_000), waiting(Some(0)));
    // No round answered yet.
    v.primary.as_mut().unwrap().lease = LeaseView::default();
    assert_eq!(decide(&v, NOW), waiting(None));
}

#[test]
fn lease_broken_by_a_majority_promotes_the_best_candidate_at_the_next_generation() {
    let mut v = base();
    lose_primary(&mut v);
    // e2 is the answering sync standby, same region; loss = what e1 wrote beyond it.
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::LeaseExpired, 100)
    );
}

#[test]
fn a_new_leader_hears_from_every_data_member_before_choosing() {
    let mut v = base();
    // Ordering among async fallbacks, which the user allowed.
    v.policy.async_failover = true;
    lose_primary(&mut v);
    v.leader_since_ms = NOW - 200;
    // e2 (the sync standby) has not reported to this leader yet.
    v.observations.remove("e2");
    let wait = Decision {
        actions: vec![],
        wait: Some(Wait::GatheringObservations {
            missing: vec!["e2".into()],
            remaining_ms: v.limits.stale_after_ms - 200,
        }),
    };
    assert_eq!(decide(&v, NOW), wait);
    // Once it reported, no more waiting.
    v.observations.insert("e2".into(), standby(1_000_000, "e1"));
    seal(&mut v, "e2");
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::LeaseExpired, 100)
    );
    // Past the bound, it chooses among those that did report.
    v.observations.remove("e2");
    let later = v.leader_since_ms + v.limits.stale_after_ms;
    assert!(matches!(
        decide(&v, later).actions.as_slice(),
        [Action::Promote { member, .. }] if member == "w1"
    ));
}

#[test]
fn the_wal_position_told_to_the_voters_counts_towards_the_loss() {
    // A leader that never received the old primary's reports still learns how far its WAL
    // went from the break round (the renewals carry it).
    let mut v = base();
    lose_primary(&mut v);
    v.observations.remove("e1");
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::LeaseExpired, 0)
    );
    v.primary.as_mut().unwrap().lease.primary_lsn = Some(Lsn(1_000_500));
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::LeaseExpired, 500)
    );
}

/// Sim finding F3 (seed 9088): a primary resumed in place reports "fenced and down" from
/// the generation before its resume; that report must not justify a promotion in the new
/// generation (the primary takes writes again before its next report).
#[test]
fn a_fence_reported_before_the_current_generation_is_not_a_reason_to_promote() {
    let mut v = base();
    primary_fenced(&mut v);
    obs(&mut v, "e1").seen_generation = Generation(2);
    let d = decide(&v, NOW);
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::Promote { .. })),
        "{d:?}"
    );
}

#[test]
fn primary_confirming_its_fence_is_replaced_at_once_without_lease_wait() {
    let mut v = base();
    primary_fenced(&mut v);
    assert!(!v.primary.as_ref().unwrap().lease.broken);
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::PrimaryFenced, 100)
    );
}

/// Sim finding F7b (seeds 11224, 28417): a sync standby's report made while it could
/// still confirm the old primary's WAL is no final position. After a lease break only a
/// report of a standby that stopped confirming in the round the promotion relies on counts;
/// the leader asks the others again and waits one staleness bound for them.
#[test]
fn after_a_lease_break_only_a_sync_standby_that_stopped_confirming_counts() {
    let mut v = base();
    lose_primary(&mut v);
    obs(&mut v, "e2").receiver_off_since = None;
    let ask = Action::BreakLease {
        member: "e1".into(),
        generation: Generation(3),
    };
    assert_eq!(
        decide(&v, NOW + 200),
        Decision {
            actions: vec![ask.clone()],
            wait: Some(Wait::SyncPositionsPending {
                primary: "e1".into(),
                pending: vec!["e2".into()],
                remaining_ms: Some(v.limits.stale_after_ms - 200),
            }),
        }
    );
    // A stop in an earlier round (released since: the receiver may be back on) does not
    // count for this one; nor does one of another generation.
    let earlier = BreakRound { term: 2, seq: 6 };
    obs(&mut v, "e2").receiver_off_since = Some((Generation(3), earlier));
    assert!(matches!(
        decide(&v, NOW).wait,
        Some(Wait::SyncPositionsPending { .. })
    ));
    obs(&mut v, "e2").receiver_off_since = Some((Generation(2), ROUND));
    assert!(matches!(
        decide(&v, NOW).wait,
        Some(Wait::SyncPositionsPending { .. })
    ));
    // A later round counts.
    let later = BreakRound { term: 3, seq: 1 };
    obs(&mut v, "e2").receiver_off_since = Some((Generation(3), later));
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::LeaseExpired, 100)
    );
    // Past the bound, e2 counts as not answered: no promotion under the default policy,
    // and the leader keeps asking.
    obs(&mut v, "e2").receiver_off_since = None;
    v.primary.as_mut().unwrap().lease.broken_since_ms = Some(NOW - v.limits.stale_after_ms);
    let d = decide(&v, NOW);
    assert!(
        matches!(
            &d.wait,
            Some(Wait::NoCandidate(NoCandidate {
                reason: NoCandidateReason::SyncQuorumNotAnswering { .. },
                ..
            }))
        ),
        "{d:?}"
    );
    assert_eq!(d.actions, vec![ask]);
}

/// Sim finding F7b (seed 20066): a fenced primary's sync standby reported during the
/// primary's pause, and confirmed more of its commits at the thaw before the fence. Only a
/// report made after the leader knew of the stop counts; no break round is needed.
#[test]
fn a_fenced_primarys_sync_standby_counts_once_it_reported_after_the_stop() {
    let mut v = base();
    primary_fenced(&mut v);
    obs(&mut v, "e2").after_primary_stop = None;
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(Wait::SyncPositionsPending {
                primary: "e1".into(),
                pending: vec!["e2".into()],
                remaining_ms: None,
            }),
        }
    );
    // A token of an older generation says nothing about this stop.
    obs(&mut v, "e2").after_primary_stop = Some(Generation(2));
    assert!(matches!(
        decide(&v, NOW).wait,
        Some(Wait::SyncPositionsPending { .. })
    ));
    obs(&mut v, "e2").after_primary_stop = Some(Generation(3));
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::PrimaryFenced, 100)
    );
    // A standby whose report went stale is no longer awaited: nobody else may replace the
    // primary, so the answer is no candidate (and the leader resumes it in place).
    obs(&mut v, "e2").after_primary_stop = None;
    obs(&mut v, "e2").received_at_ms = STALE;
    assert!(matches!(decide(&v, NOW).wait, Some(Wait::NoCandidate(_))));
}

#[test]
fn a_fenced_primary_is_never_replaced_by_an_async_standby() {
    // Nothing recorded as sync: every standby is async. An unreachable primary whose lease
    // was broken may be replaced by one (the policy allows it); one whose own agent stopped
    // it still holds every commit, so nobody replaces it (the leader resumes it).
    let mut v = base();
    v.recorded_sync_set = SyncSet::default();
    obs(&mut v, "e1").sync_standby_names = Some(SyncSet::default());
    primary_fenced(&mut v);
    assert_eq!(
        decide(&v, NOW),
        no_candidate(
            NoCandidateReason::NoQualifiedMember,
            &[
                ("e2", Rejection::NotInSyncSet),
                ("w1", Rejection::NotInSyncSet),
                ("w2", Rejection::NotInSyncSet),
                ("x1", Rejection::Witness),
            ],
        )
    );
    let mut v = base();
    v.recorded_sync_set = SyncSet::default();
    lose_primary(&mut v);
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::LeaseExpired, 100)
    );
}

#[test]
fn primary_down_but_not_fenced_is_waited_for_to_fence_first() {
    let mut v = base();
    obs(&mut v, "e1").postgres_up = false;
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: Vec::new(),
            wait: Some(Wait::PrimaryFencing {
                primary: "e1".into()
            }),
        }
    );
}

#[test]
fn no_promotion_while_another_member_still_sees_the_primary_writable() {
    let mut v = base();
    lose_primary(&mut v);
    obs(&mut v, "w2").probes.insert(
        "e1".into(),
        PeerProbe {
            agent_reachable: true,
            postgres_writable: true,
        },
    );
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(Wait::PrimaryWritableForOthers {
                primary: "e1".into(),
                seen_by: vec!["w2".into()],
            }),
        }
    );
    // A stale probe is no evidence.
    obs(&mut v, "w2").received_at_ms = STALE;
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::LeaseExpired, 100)
    );
}

// ------------------------------------------------------------------ candidates

#[test]
fn whole_region_lost_under_the_default_policy_promotes_nobody() {
    let mut v = base();
    lose_primary(&mut v);
    obs(&mut v, "e2").received_at_ms = STALE;
    // Sync set {e2} does not answer: w1 and w2 may lack commits e2 acknowledged.
    assert_eq!(
        decide(&v, NOW),
        no_candidate(
            NoCandidateReason::SyncQuorumNotAnswering {
                answered: Default::default(),
                needed: 1,
                of: 1
            },
            &[
                ("e2", stale(5_000)),
                ("w1", Rejection::NotInSyncSet),
                ("w2", Rejection::NotInSyncSet),
                ("x1", Rejection::Witness),
            ],
        )
    );
}

#[test]
fn whole_region_lost_with_async_failover_on_fails_over_async_and_reports_the_loss() {
    let mut v = base();
    v.policy.async_failover = true;
    lose_primary(&mut v);
    obs(&mut v, "e2").received_at_ms = STALE;
    // Sync set {e2} does not answer; the user traded it for availability: best async.
    assert_eq!(
        decide(&v, NOW),
        promote("w1", PromoteReason::LeaseExpired, 1_000_100 - 990_000)
    );
}

#[test]
fn no_safe_candidate_under_the_policy_means_no_promotion_and_a_reason() {
    let mut v = base();
    lose_primary(&mut v);
    obs(&mut v, "e2").received_at_ms = STALE;
    v.policy.async_failover = false;
    assert_eq!(
        decide(&v, NOW),
        no_candidate(
            NoCandidateReason::SyncQuorumNotAnswering {
                answered: Default::default(),
                needed: 1,
                of: 1
            },
            &[
                ("e2", stale(5_000)),
                ("w1", Rejection::NotInSyncSet),
                ("w2", Rejection::NotInSyncSet),
                ("x1", Rejection::Witness),
            ],
        )
    );
}

#[test]
fn async_failover_disabled_without_a_sync_set_promotes_nobody() {
    let mut v = base();
    primary_fenced(&mut v);
    v.recorded_sync_set = SyncSet::default();
    v.policy.async_failover = false;
    assert_eq!(
        decide(&v, NOW),
        no_candidate(
            NoCandidateReason::NoQualifiedMember,
            &[
                ("e2", Rejection::NotInSyncSet),
                ("w1", Rejection::NotInSyncSet),
                ("w2", Rejection::NotInSyncSet),
                ("x1", Rejection::Witness),
            ],
        )
    );
}

/// West is explicitly `sync`, recorded set ANY 2 (e2, w1, w2): n − k + 1 = 2 must answer.
fn explicit_sync_view() -> ClusterView {
    let mut v = base();
    v.policy.set("regions.west.mode", "sync").unwrap();
    v.policy.set("sync_quorum", "2").unwrap();
    v.recorded_sync_set = SyncSet::new(["e2", "w1", "w2"], 2);
    lose_primary(&mut v);
    v
}

#[test]
fn sync_quorum_not_answering_means_no_promotion() {
    let mut v = explicit_sync_view();
    obs(&mut v, "e2").received_at_ms = STALE;
    obs(&mut v, "w1").received_at_ms = STALE;
    assert_eq!(
        decide(&v, NOW),
        no_candidate(
            NoCandidateReason::SyncQuorumNotAnswering {
                answered: ["w2".to_string()].into(),
                needed: 2,
                of: 3
            },
            &[
                ("e2", stale(5_000)),
                ("w1", stale(5_000)),
                ("w2", Rejection::SyncQuorumUnknown),
                ("x1", Rejection::Witness)
            ],
        )
    );
}

/// Issue 12's lost writes: `auto` made every standby sync, ANY 1 (e2, w1, w2); the leader
/// hears only from e2 (w1, w2 are cut off from it but may still have acknowledged commits
/// the old primary made after e2's last position). Under the default, non-strict policy
/// the async fallback must not pick a recorded sync member: that is a known shortfall, not
/// an async standby. Nobody outside the set exists, so nobody is promoted.
#[test]
fn a_sync_member_is_never_promoted_while_the_sync_quorum_is_unknown() {
    let mut v = base();
    v.recorded_sync_set = SyncSet::new(["e2", "w1", "w2"], 1);
    obs(&mut v, "e1").sync_standby_names = Some(SyncSet::new(["e2", "w1", "w2"], 1));
    lose_primary(&mut v);
    obs(&mut v, "w1").received_at_ms = STALE;
    obs(&mut v, "w2").received_at_ms = STALE;
    assert_eq!(
        decide(&v, NOW),
        no_candidate(
            NoCandidateReason::SyncQuorumNotAnswering {
                answered: ["e2".to_string()].into(),
                needed: 3,
                of: 3
            },
            &[
                ("e2", Rejection::SyncQuorumUnknown),
                ("w1", stale(5_000)),
                ("w2", stale(5_000)),
                ("x1", Rejection::Witness)
            ],
        )
    );
    // Once the whole quorum answered, the member holding its highest position is safe.
    obs(&mut v, "w1").received_at_ms = FRESH;
    obs(&mut v, "w2").received_at_ms = FRESH;
    obs(&mut v, "w2").received_lsn = Some(Lsn(1_000_050));
    obs(&mut v, "w2").replayed_lsn = Some(Lsn(1_000_050));
    assert_eq!(
        decide(&v, NOW),
        promote("w2", PromoteReason::LeaseExpired, 1_000_100 - 1_000_050)
    );
}

/// With the quorum answering, a member outside the sync set that holds the quorum's
/// position is as safe as a sync member; one behind it is only an async fallback, and a
/// recorded sync member behind it never.
#[test]
fn a_sync_member_behind_the_answering_quorum_is_never_the_async_fallback() {
    let mut v = base();
    v.recorded_sync_set = SyncSet::new(["e2", "w1"], 1);
    lose_primary(&mut v);
    // e2 and w1 answered (n - k + 1 = 2); w1 is ahead, but down (not qualified).
    obs(&mut v, "w1").postgres_up = true;
    obs(&mut v, "w1").received_lsn = Some(Lsn(1_000_090));
    obs(&mut v, "w1").replayed_lsn = Some(Lsn(1_000_090));
    obs(&mut v, "w1").fenced = true;
    // w2 (async, not in the set) is behind: a fallback the default refuses; with
    // async_failover on it may take w2, never e2.
    assert!(decide(&v, NOW).actions.is_empty());
    v.policy.async_failover = true;
    assert_eq!(
        decide(&v, NOW),
        promote("w2", PromoteReason::LeaseExpired, 1_000_100 - 980_000)
    );
}

#[test]
fn sync_quorum_answering_promotes_the_member_holding_its_highest_lsn() {
    let mut v = explicit_sync_view();
    obs(&mut v, "e2").received_at_ms = STALE;
    assert_eq!(
        decide(&v, NOW),
        promote("w1", PromoteReason::LeaseExpired, 10_100)
    );
    // If the holder of the quorum's highest LSN may not be promoted, the one behind it
    // may not be either: it could lack acknowledged commits.
    v.members.get_mut("w1").unwrap().nofailover = true;
    assert_eq!(
        decide(&v, NOW),
        no_candidate(
            NoCandidateReason::NoQualifiedMember,
            &[
                ("e2", stale(5_000)),
                ("w1", Rejection::NoFailover),
                (
                    "w2",
                    Rejection::BehindSyncQuorum {
                        lsn: Lsn(980_000),
                        quorum_lsn: Lsn(990_000)
                    }
                ),
                ("x1", Rejection::Witness),
            ],
        )
    );
}

#[test]
fn same_region_is_preferred_over_a_higher_lsn() {
    let mut v = base();
    lose_primary(&mut v);
    v.recorded_sync_set = SyncSet::default();
    obs(&mut v, "e2").received_lsn = Some(Lsn(900_000));
    obs(&mut v, "e2").replayed_lsn = Some(Lsn(900_000));
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::LeaseExpired, 100_100)
    );
}

#[test]
fn region_priority_comes_before_lsn() {
    let mut v = base();
    // Ordering among async fallbacks, which the user allowed.
    v.policy.async_failover = true;
    lose_primary(&mut v);
    obs(&mut v, "e2").received_at_ms = STALE;
    v.members
        .insert("s1".into(), member("south", MemberKind::Data));
    v.observations.insert("s1".into(), standby(970_000, "e1"));
    assert_eq!(
        decide(&v, NOW),
        promote("w1", PromoteReason::LeaseExpired, 10_100)
    );
    v.policy.set("regions.south.priority", "5").unwrap();
    assert_eq!(
        decide(&v, NOW),
        promote("s1", PromoteReason::LeaseExpired, 30_100)
    );
}

#[test]
fn nofailover_member_is_never_promoted() {
    let mut v = base();
    lose_primary(&mut v);
    v.recorded_sync_set = SyncSet::default();
    v.members.get_mut("e2").unwrap().nofailover = true;
    assert_eq!(
        decide(&v, NOW),
        promote("w1", PromoteReason::LeaseExpired, 10_100)
    );
}

#[test]
fn lag_above_the_bound_excludes_a_standby() {
    let mut v = base();
    // Ordering among async fallbacks, which the user allowed.
    v.policy.async_failover = true;
    lose_primary(&mut v);
    obs(&mut v, "e2").received_at_ms = STALE;
    v.policy.set("max_lag_on_failover_bytes", "15000").unwrap();
    assert_eq!(
        decide(&v, NOW),
        promote("w1", PromoteReason::LeaseExpired, 10_100)
    );
    v.policy.set("max_lag_on_failover_bytes", "5000").unwrap();
    assert_eq!(
        decide(&v, NOW),
        no_candidate(
            NoCandidateReason::NoQualifiedMember,
            &[
                ("e2", stale(5_000)),
                (
                    "w1",
                    Rejection::LagTooHigh {
                        lag_bytes: 10_100,
                        max_bytes: 5_000
                    }
                ),
                (
                    "w2",
                    Rejection::LagTooHigh {
                        lag_bytes: 20_100,
                        max_bytes: 5_000
                    }
                ),
                ("x1", Rejection::Witness),
            ],
        )
    );
}

#[test]
fn stale_observation_excludes_a_standby() {
    let mut v = base();
    lose_primary(&mut v);
    v.recorded_sync_set = SyncSet::default();
    // Just inside the staleness bound, e2 (same region) wins.
    obs(&mut v, "e2").received_at_ms = NOW - 1_000;
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::LeaseExpired, 100)
    );
    obs(&mut v, "e2").received_at_ms = NOW - 1_001;
    assert_eq!(
        decide(&v, NOW),
        promote("w1", PromoteReason::LeaseExpired, 10_100)
    );
}

#[test]
fn region_with_manual_failover_is_excluded() {
    let mut v = base();
    lose_primary(&mut v);
    v.recorded_sync_set = SyncSet::default();
    v.policy.set("regions.east.failover", "manual").unwrap();
    assert_eq!(
        decide(&v, NOW),
        promote("w1", PromoteReason::LeaseExpired, 10_100)
    );
    v.policy.set("regions.west.failover", "manual").unwrap();
    assert_eq!(
        decide(&v, NOW),
        no_candidate(
            NoCandidateReason::NoQualifiedMember,
            &[
                (
                    "e2",
                    Rejection::RegionFailoverManual {
                        region: "east".into()
                    }
                ),
                (
                    "w1",
                    Rejection::RegionFailoverManual {
                        region: "west".into()
                    }
                ),
                (
                    "w2",
                    Rejection::RegionFailoverManual {
                        region: "west".into()
                    }
                ),
                ("x1", Rejection::Witness),
            ],
        )
    );
}

#[test]
fn ties_break_by_member_priority_then_name() {
    let mut v = base();
    // Ordering among async fallbacks, which the user allowed.
    v.policy.async_failover = true;
    lose_primary(&mut v);
    obs(&mut v, "e2").received_at_ms = STALE;
    for n in ["w1", "w2"] {
        obs(&mut v, n).received_lsn = Some(Lsn(990_000));
    }
    assert_eq!(
        decide(&v, NOW),
        promote("w1", PromoteReason::LeaseExpired, 10_100)
    );
    v.members.get_mut("w2").unwrap().priority = 5;
    assert_eq!(
        decide(&v, NOW),
        promote("w2", PromoteReason::LeaseExpired, 10_100)
    );
    // LSN ranks above member priority.
    obs(&mut v, "w1").received_lsn = Some(Lsn(990_001));
    assert_eq!(
        decide(&v, NOW),
        promote("w1", PromoteReason::LeaseExpired, 10_099)
    );
}

// ------------------------------------------------------------------ maintenance

#[test]
fn maintenance_mode_takes_no_automatic_action_but_reports_it() {
    let mut v = base();
    v.maintenance = true;
    assert_eq!(decide(&v, NOW), Decision::default());
    primary_fenced(&mut v);
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(Wait::Maintenance {
                suppressed: promote("e2", PromoteReason::PrimaryFenced, 100).actions,
                would_wait: None,
            }),
        }
    );
}

// ------------------------------------------------------------------ switchover

/// An aborted switchover waits for e1 to take writes again (its agent resumes on the
/// committed `Aborting` phase).
fn resuming_e1(remaining_ms: u64) -> Decision {
    Decision {
        actions: Vec::new(),
        wait: Some(Wait::Switchover(SwitchoverWait::PrimaryResuming {
            primary: "e1".into(),
            remaining_ms,
        })),
    }
}

fn switchover(phase: SwitchoverPhase, since_ms: u64) -> Option<SwitchoverView> {
    Some(SwitchoverView {
        target: "w1".into(),
        phase,
        phase_since_ms: since_ms,
    })
}

#[test]
fn a_new_leader_hears_from_both_ends_of_a_switchover_before_judging_it() {
    let mut v = base();
    v.switchover = switchover(SwitchoverPhase::Requested, NOW - 100);
    v.leader_since_ms = NOW - 300;
    v.observations.remove("e1");
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(Wait::GatheringObservations {
                missing: vec!["e1".into()],
                remaining_ms: v.limits.stale_after_ms - 300,
            }),
        }
    );
    // Past the bound, a primary it never heard from is not healthy: abandoned.
    let later = v.leader_since_ms + v.limits.stale_after_ms;
    assert!(matches!(
        decide(&v, later).actions.as_slice(),
        [Action::AbandonSwitchover { .. }]
    ));
}

#[test]
fn switchover_walks_its_steps() {
    let mut v = base();
    v.maintenance = true; // an operator's switchover still runs
    v.switchover = switchover(SwitchoverPhase::Requested, NOW);
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![Action::SetSwitchoverPhase {
                phase: SwitchoverPhase::StoppingWrites
            }],
            wait: None,
        }
    );

    v.switchover = switchover(SwitchoverPhase::StoppingWrites, NOW);
    assert_eq!(
        decide(&v, NOW + 200),
        Decision {
            actions: Vec::new(),
            wait: Some(Wait::Switchover(SwitchoverWait::WritesStopping {
                primary: "e1".into(),
                remaining_ms: 4_800
            })),
        }
    );

    primary_fenced(&mut v);
    obs(&mut v, "e1").wal_lsn = Some(Lsn(1_000_200));
    assert_eq!(
        decide(&v, NOW + 300),
        Decision {
            actions: vec![],
            wait: Some(Wait::Switchover(SwitchoverWait::TargetCatchingUp {
                target: "w1".into(),
                received_lsn: Some(Lsn(990_000)),
                final_lsn: Lsn(1_000_200),
                remaining_ms: 4_700
            })),
        }
    );

    obs(&mut v, "w1").received_lsn = Some(Lsn(1_000_200));
    assert_eq!(
        decide(&v, NOW + 400),
        promote("w1", PromoteReason::Switchover, 0)
    );

    // Promotion committed: w1 is primary at generation 4; the old primary rejoins, the
    // standbys follow, and the sync set follows the new primary's region.
    v.switchover = None;
    v.maintenance = false;
    v.generation = Generation(4);
    v.primary = Some(PrimaryView {
        name: "w1".into(),
        lease: held_for(2_000),
        generation_since_ms: NOW,
    });
    *obs(&mut v, "w1") = Observation {
        received_at_ms: FRESH,
        postgres_up: true,
        timeline: 2,
        wal_lsn: Some(Lsn(1_000_300)),
        seen_generation: Generation(4),
        sync_standby_names: Some(SyncSet::default()),
        ..Observation::default()
    };
    // It waits on nobody yet: as the promotion recorded, it may acknowledge alone.
    v.recorded_sync_degraded = true;
    v.rtt_from_primary_ms = BTreeMap::from([
        ("e1".to_string(), 50),
        ("e2".to_string(), 50),
        ("w2".to_string(), 1),
    ]);
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![
                // w2 does not stream from w1 yet: under `required` the new primary's
                // commits still wait, on w2 (record first, then Postgres), never on nobody.
                Action::RecordSyncSet {
                    set: SyncSet::new(["w2"], 1),
                    degraded: true,
                    degraded_until_lsn: None,
                },
            ],
            // East is out of the budget and w2 not streaming from w1 yet: commits wait.
            wait: Some(short("w1", &[], 1, SyncSet::default())),
        }
    );
}

#[test]
fn switchover_gives_up_within_its_bounds() {
    let mut v = base();
    v.switchover = switchover(SwitchoverPhase::Requested, NOW);
    obs(&mut v, "w1").received_at_ms = STALE;
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(Wait::Switchover(SwitchoverWait::TargetNotReady {
                target: "w1".into(),
                why: stale(5_000),
                remaining_ms: 5_000
            })),
        }
    );
    v.switchover = switchover(SwitchoverPhase::Requested, NOW - 5_000);
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![Action::AbandonSwitchover {
                reason: SwitchoverAbort::TargetNotReady(stale(5_000))
            }],
            wait: None,
        }
    );
    // A witness can never be the target: abandoned at once.
    v.switchover.as_mut().unwrap().target = "x1".into();
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::AbandonSwitchover {
            reason: SwitchoverAbort::TargetNotEligible(Rejection::Witness)
        }]
    );

    // Writes stopped but the target never caught up: un-fence, then drop.
    let mut v = base();
    primary_fenced(&mut v);
    v.switchover = switchover(SwitchoverPhase::StoppingWrites, NOW);
    let reason = SwitchoverAbort::TargetDidNotCatchUp {
        received_lsn: Some(Lsn(990_000)),
        final_lsn: Lsn(1_000_100),
    };
    let at = NOW + 5_000;
    for o in v.observations.values_mut() {
        o.received_at_ms = at - 100;
    }
    assert_eq!(
        decide(&v, at),
        Decision {
            actions: vec![Action::SetSwitchoverPhase {
                phase: SwitchoverPhase::Aborting(reason.clone())
            }],
            wait: None,
        }
    );
    // While aborting, the fenced primary is not mistaken for a crash.
    v.switchover = switchover(SwitchoverPhase::Aborting(reason.clone()), at);
    assert_eq!(decide(&v, at), resuming_e1(5_000));
    let o = obs(&mut v, "e1");
    o.postgres_up = true;
    o.fenced = false;
    o.received_at_ms = at; // reported since the abort began
    assert_eq!(
        decide(&v, at),
        Decision {
            actions: vec![Action::AbandonSwitchover { reason }],
            wait: None,
        }
    );
}

/// An operator cancelled while writes were stopped (the intent moved the switchover to
/// `aborting`): the fenced old primary is un-fenced and the switchover dropped once it
/// takes writes, never a failover, even though its Postgres is down and fenced.
#[test]
fn a_switchover_cancelled_after_writes_stopped_resumes_the_old_primary() {
    let mut v = base();
    primary_fenced(&mut v);
    let cancelled = SwitchoverAbort::CancelledByOperator;
    v.switchover = switchover(SwitchoverPhase::Aborting(cancelled.clone()), NOW - 1_000);
    assert_eq!(decide(&v, NOW), resuming_e1(4_000));
    // A "writable" report from before the abort began (it may predate the fence) does
    // not end it.
    let o = obs(&mut v, "e1");
    o.postgres_up = true;
    o.fenced = false;
    o.received_at_ms = NOW - 1_001;
    assert_eq!(decide(&v, NOW), resuming_e1(4_000));
    obs(&mut v, "e1").received_at_ms = NOW - 1_000;
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![Action::AbandonSwitchover { reason: cancelled }],
            wait: None,
        }
    );
}

// ------------------------------------------------------------------ sync set

fn with_applied(v: &mut ClusterView, set: SyncSet) {
    obs(v, "e1").sync_standby_names = Some(set);
}

#[test]
fn growing_the_sync_set_records_it_in_raft_before_postgres_waits_on_it() {
    let mut v = base();
    v.policy.set("regions.west.mode", "sync").unwrap();
    let grown = SyncSet::new(["e2", "w1", "w2"], 1);
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![Action::RecordSyncSet {
                set: grown.clone(),
                degraded: false,
                degraded_until_lsn: None,
            }],
            wait: None,
        }
    );
    v.recorded_sync_set = grown.clone();
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![Action::ApplySyncStandbyNames {
                primary: "e1".into(),
                set: grown.clone()
            }],
            wait: None,
        }
    );
    with_applied(&mut v, grown);
    assert_eq!(decide(&v, NOW), Decision::default());
}

#[test]
fn a_nosync_member_is_never_in_the_sync_set() {
    let mut v = base();
    v.policy.set("regions.west.mode", "sync").unwrap();
    v.members.get_mut("w1").unwrap().nosync = true;
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: SyncSet::new(["e2", "w2"], 1),
            degraded: false,
            degraded_until_lsn: None,
        }]
    );
}

#[test]
fn shrinking_the_sync_set_changes_postgres_before_the_record() {
    let mut v = base();
    let wide = SyncSet::new(["e2", "w1", "w2"], 1);
    v.recorded_sync_set = wide.clone();
    with_applied(&mut v, wide);
    // Default policy: west is `auto` and 50 ms away, over the 10 ms budget.
    let narrow = SyncSet::new(["e2"], 1);
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![Action::ApplySyncStandbyNames {
                primary: "e1".into(),
                set: narrow.clone()
            }],
            wait: None,
        }
    );
    with_applied(&mut v, narrow.clone());
    // Not before e2 holds everything e1 wrote: commits w1 or w2 acknowledged alone would
    // be forgotten by a record that no longer names them.
    assert_eq!(decide(&v, NOW), Decision::default());
    obs(&mut v, "e2").received_lsn = Some(Lsn(1_000_100));
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![Action::RecordSyncSet {
                set: narrow,
                degraded: false,
                degraded_until_lsn: None,
            }],
            wait: None,
        }
    );
}

/// Sim F8: a report made before the primary applied the newest target says nothing of
/// what Postgres waits on now; the record shrinks only on a report of the newest target.
#[test]
fn the_record_shrinks_only_on_a_report_of_the_newest_target() {
    let mut v = base();
    let wide = SyncSet::new(["e2", "w1", "w2"], 1);
    let narrow = SyncSet::new(["e2"], 1);
    v.recorded_sync_set = wide.clone();
    obs(&mut v, "e2").received_lsn = Some(Lsn(1_000_100));
    // The leader asked for `wide` (target 7); the report shows `narrow` of target 6.
    v.sync_target = Some((7, wide.clone()));
    with_applied(&mut v, narrow.clone());
    obs(&mut v, "e1").sync_target_seq = Some(6);
    // Not the record: the newest target becomes `narrow`, so a report can show it.
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::ApplySyncStandbyNames {
            primary: "e1".into(),
            set: narrow.clone()
        }]
    );
    // Asked (target 8), but the report still predates it: the record stays.
    v.sync_target = Some((8, narrow.clone()));
    assert_eq!(decide(&v, NOW), Decision::default());
    // An agent that names no target (an older version) never shrinks the record either.
    obs(&mut v, "e1").sync_target_seq = None;
    assert_eq!(decide(&v, NOW), Decision::default());
    obs(&mut v, "e1").sync_target_seq = Some(8);
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: narrow,
            degraded: false,
            degraded_until_lsn: None,
        }]
    );
    let _ = wide;
}

#[test]
fn lowering_k_records_the_lower_k_before_postgres_uses_it() {
    let mut v = base();
    v.policy.set("regions.west.mode", "sync").unwrap();
    let k2 = SyncSet::new(["e2", "w1", "w2"], 2);
    v.recorded_sync_set = k2.clone();
    with_applied(&mut v, k2);
    let k1 = SyncSet::new(["e2", "w1", "w2"], 1);
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: k1.clone(),
            degraded: false,
            degraded_until_lsn: None,
        }]
    );
    v.recorded_sync_set = k1.clone();
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::ApplySyncStandbyNames {
            primary: "e1".into(),
            set: k1
        }]
    );
}

#[test]
fn durability_required_keeps_waiting_and_preferred_shrinks_and_says_so() {
    let mut v = base();
    obs(&mut v, "e2").wal_receiver_streaming = false;
    assert_eq!(v.policy.durability, Durability::Required);
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(short("e1", &[], 1, SyncSet::new(["e2"], 1))),
        }
    );

    v.policy.set("durability", "preferred").unwrap();
    // Before Postgres may acknowledge alone, the intent records that it may.
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: SyncSet::new(["e2"], 1),
            degraded: true,
            degraded_until_lsn: None,
        }]
    );
    v.recorded_sync_degraded = true;
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::ApplySyncStandbyNames {
            primary: "e1".into(),
            set: SyncSet::default()
        }]
    );
    with_applied(&mut v, SyncSet::default());
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: SyncSet::default(),
            degraded: true,
            degraded_until_lsn: None,
        }]
    );
    v.recorded_sync_set = SyncSet::default();
    assert_eq!(decide(&v, NOW), Decision::default());

    // e2 streams again: the set grows (record, then Postgres), and the record stays
    // degraded until e2 holds what e1 wrote while it acknowledged alone.
    obs(&mut v, "e2").wal_receiver_streaming = true;
    let e2 = SyncSet::new(["e2"], 1);
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: e2.clone(),
            degraded: true,
            degraded_until_lsn: None,
        }]
    );
    v.recorded_sync_set = e2.clone();
    with_applied(&mut v, e2.clone());
    obs(&mut v, "e2").received_lsn = Some(Lsn(1_000_000));
    obs(&mut v, "e2").replayed_lsn = Some(Lsn(1_000_000));
    // e1 waits on e2 again: whatever it acknowledged alone lies before what it reports
    // now, and that bound is recorded.
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: e2.clone(),
            degraded: true,
            degraded_until_lsn: Some(Lsn(1_000_100)),
        }]
    );
    v.recorded_sync_degraded_until_lsn = Some(Lsn(1_000_100));
    assert_eq!(decide(&v, NOW), Decision::default());
    // The primary writes on; e2 needs only to pass the recorded bound, not the moving
    // position (under a steady load it might never be seen ahead of it).
    obs(&mut v, "e1").wal_lsn = Some(Lsn(1_000_900));
    obs(&mut v, "e2").received_lsn = Some(Lsn(1_000_100));
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: e2,
            degraded: false,
            degraded_until_lsn: None,
        }]
    );
}

/// A new cluster's primary runs alone until its first sync set is established: nothing
/// was promised then, so it is not marked degraded; maintenance mode keeps the mark's
/// bookkeeping going (not the set's).
#[test]
fn the_degraded_mark_is_kept_from_a_first_set_and_through_maintenance() {
    let mut v = base();
    v.recorded_sync_set = SyncSet::default();
    with_applied(&mut v, SyncSet::default());
    let e2 = SyncSet::new(["e2"], 1);
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: e2.clone(),
            degraded: false,
            degraded_until_lsn: None,
        }]
    );
    // Marked, in maintenance, with e2 holding the bound: the mark is cleared, the set kept.
    v.recorded_sync_set = e2.clone();
    with_applied(&mut v, e2.clone());
    v.recorded_sync_degraded = true;
    v.recorded_sync_degraded_until_lsn = Some(Lsn(1_000_000));
    v.maintenance = true;
    let d = decide(&v, NOW);
    assert_eq!(
        d.actions,
        vec![Action::RecordSyncSet {
            set: e2,
            degraded: false,
            degraded_until_lsn: None,
        }]
    );
    assert!(matches!(d.wait, Some(Wait::Maintenance { .. })), "{d:?}");
}

/// The flapping loss (chaos seed 3, default policy): `preferred` emptied the set while the
/// in-region standby's stream was cut, the primary acknowledged alone, and that standby
/// was promoted without those commits. With the degraded record nobody is promoted
/// automatically unless `async_failover` accepts the loss.
#[test]
fn a_primary_that_acknowledged_alone_is_not_replaced_without_async_failover() {
    let mut v = base();
    v.policy.set("durability", "preferred").unwrap();
    v.recorded_sync_set = SyncSet::default();
    v.recorded_sync_degraded = true;
    lose_primary(&mut v);
    let d = decide(&v, NOW);
    assert!(d.actions.is_empty(), "{d:?}");
    let Some(Wait::NoCandidate(nc)) = &d.wait else {
        panic!("expected no candidate: {d:?}");
    };
    assert_eq!(nc.reason, NoCandidateReason::AcknowledgedAlone);
    assert!(nc.to_string().contains("no sync standby"), "{nc}");

    // Not degraded (every standby async by policy): the best member is promoted.
    v.recorded_sync_degraded = false;
    assert!(matches!(
        decide(&v, NOW).actions.as_slice(),
        [Action::Promote { .. }]
    ));

    // async_failover accepts the loss, unless a region is explicitly sync.
    v.recorded_sync_degraded = true;
    v.policy.set("async_failover", "true").unwrap();
    assert!(matches!(
        decide(&v, NOW).actions.as_slice(),
        [Action::Promote { .. }]
    ));
    v.policy.set("regions.west.mode", "sync").unwrap();
    assert!(decide(&v, NOW).actions.is_empty());
}

/// Right after a failover the intent carries the old sync set minus the new primary, and
/// the new primary already waits on it. While that standby still follows the old primary,
/// the core re-points it and keeps the set (required durability): no async window, no
/// shrink before the standby had its chance to reconnect.
#[test]
fn a_carried_sync_set_is_kept_while_its_standby_repoints() {
    let mut v = base();
    v.policy.regions.insert(
        "west".into(),
        crate::policy::RegionPolicy {
            mode: SyncMode::Sync,
            ..Default::default()
        },
    );
    v.generation = Generation(4);
    v.primary = Some(PrimaryView {
        name: "e2".into(),
        lease: held_for(1_500),
        generation_since_ms: NOW - 500,
    });
    v.rtt_from_primary_ms.clear();
    obs(&mut v, "e1").received_at_ms = STALE;
    *obs(&mut v, "e2") = Observation {
        received_at_ms: FRESH,
        postgres_up: true,
        timeline: 2,
        wal_lsn: Some(Lsn(1_000_200)),
        seen_generation: Generation(4),
        sync_standby_names: Some(SyncSet::new(["w1"], 1)),
        ..Observation::default()
    };
    v.recorded_sync_set = SyncSet::new(["w1"], 1);
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: Vec::new(),
            // Commits on e2 wait for w1 meanwhile, and the leader says so.
            wait: Some(short("e2", &[], 1, SyncSet::new(["w1"], 1))),
        }
    );
}

fn short(primary: &str, healthy: &[&str], quorum: u32, waiting_on: SyncSet) -> Wait {
    Wait::SyncQuorumShort {
        primary: primary.into(),
        healthy: healthy.iter().map(|n| n.to_string()).collect(),
        quorum,
        waiting_on,
    }
}

/// Every sync set in `d` is a valid `ANY k (names)` (what the intent accepts), and an
/// `ApplySyncStandbyNames` stays within `recorded` (ordering rule).
fn assert_sync_sets_valid(d: &Decision, recorded: &SyncSet) {
    for a in &d.actions {
        let (set, applies) = match a {
            Action::RecordSyncSet { set, .. } => (set, false),
            Action::ApplySyncStandbyNames { set, .. } => (set, true),
            _ => continue,
        };
        let n = set.names.len();
        assert!(
            if n == 0 {
                set.k == 0
            } else {
                (1..=n as u32).contains(&set.k)
            },
            "invalid set {set:?} in {d:?}"
        );
        if applies {
            assert!(
                set.names.is_subset(&recorded.names) && (n == 0 || set.k >= recorded.k),
                "{set:?} not covered by the record {recorded:?}"
            );
        }
    }
}

/// `required` durability, sync_quorum 2, west `sync`: the policy asks for two of e2, w1,
/// w2. With only one healthy, a set `ANY 2` of one name would be invalid and an empty set
/// would let the primary acknowledge alone: the set is filled up with an eligible standby
/// that does not stream yet (record first, then Postgres), commits wait until two stream,
/// and the core reports it.
#[test]
fn required_durability_short_of_quorum_keeps_the_set_and_reports_the_wait() {
    let mut v = base();
    v.policy.set("regions.west.mode", "sync").unwrap();
    v.policy.set("sync_quorum", "2").unwrap();
    // Just after a failover whose carried set was too small: Postgres waits on nobody,
    // and the promotion recorded that.
    v.recorded_sync_set = SyncSet::default();
    v.recorded_sync_degraded = true;
    with_applied(&mut v, SyncSet::default());
    obs(&mut v, "w1").wal_receiver_streaming = false;
    obs(&mut v, "w2").postgres_up = false;
    let d = decide(&v, NOW);
    assert_sync_sets_valid(&d, &v.recorded_sync_set);
    assert_eq!(
        d,
        Decision {
            actions: vec![Action::RecordSyncSet {
                set: SyncSet::new(["e2", "w1"], 2),
                degraded: true,
                degraded_until_lsn: None,
            }],
            wait: Some(short("e1", &["e2"], 2, SyncSet::default())),
        }
    );
    // w1 streams again: two healthy, the set grows (record first, then Postgres).
    obs(&mut v, "w1").wal_receiver_streaming = true;
    let two = SyncSet::new(["e2", "w1"], 2);
    let d = decide(&v, NOW);
    assert_sync_sets_valid(&d, &v.recorded_sync_set);
    assert_eq!(
        d,
        Decision {
            actions: vec![Action::RecordSyncSet {
                set: two.clone(),
                degraded: true,
                degraded_until_lsn: None,
            }],
            wait: None,
        }
    );
    v.recorded_sync_set = two.clone();
    let d = decide(&v, NOW);
    assert_sync_sets_valid(&d, &v.recorded_sync_set);
    assert_eq!(
        d.actions,
        vec![Action::ApplySyncStandbyNames {
            primary: "e1".into(),
            set: two.clone()
        }]
    );
    with_applied(&mut v, two.clone());
    // Waiting on two again: the bound of what was acknowledged alone is recorded, and the
    // mark goes once both hold it.
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: two.clone(),
            degraded: true,
            degraded_until_lsn: Some(Lsn(1_000_100)),
        }]
    );
    v.recorded_sync_degraded_until_lsn = Some(Lsn(1_000_100));
    assert_eq!(decide(&v, NOW), Decision::default());
    obs(&mut v, "e2").received_lsn = Some(Lsn(1_000_100));
    obs(&mut v, "w1").received_lsn = Some(Lsn(1_000_100));
    assert_eq!(
        decide(&v, NOW).actions,
        vec![Action::RecordSyncSet {
            set: two.clone(),
            degraded: false,
            degraded_until_lsn: None,
        }]
    );
    v.recorded_sync_degraded = false;
    v.recorded_sync_degraded_until_lsn = None;
    assert_eq!(decide(&v, NOW), Decision::default());

    // w1 drops out again: the names Postgres waits on are kept, nothing changes.
    obs(&mut v, "w1").wal_receiver_streaming = false;
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(short("e1", &["e2"], 2, two.clone())),
        }
    );
    // West turns async meanwhile: only e2 is eligible, and `ANY 2 (e2)` is no set at all.
    // Postgres keeps waiting on ANY 2 (e2, w1); the record is untouched.
    v.policy.set("regions.west.mode", "async").unwrap();
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(short("e1", &["e2"], 2, two.clone())),
        }
    );
    // The same in maintenance mode: reported, nothing suppressed.
    v.maintenance = true;
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(Wait::Maintenance {
                suppressed: vec![],
                would_wait: Some(Box::new(short("e1", &["e2"], 2, two)))
            }),
        }
    );
}

/// Short of quorum with more names kept than k: Postgres keeps waiting on the healthy
/// one and the down ones it already waits on (a valid set), and the wait is reported.
#[test]
fn required_durability_keeps_the_names_postgres_waits_on() {
    let mut v = base();
    v.policy.set("regions.west.mode", "sync").unwrap();
    v.policy.set("sync_quorum", "2").unwrap();
    let three = SyncSet::new(["e2", "w1", "w2"], 2);
    v.recorded_sync_set = three.clone();
    with_applied(&mut v, three.clone());
    assert_eq!(decide(&v, NOW), Decision::default());
    // w2 down: two healthy meet the quorum, Postgres stops waiting on w2 first.
    obs(&mut v, "w2").postgres_up = false;
    let two = SyncSet::new(["e2", "w1"], 2);
    let d = decide(&v, NOW);
    assert_sync_sets_valid(&d, &v.recorded_sync_set);
    assert_eq!(
        d,
        Decision {
            actions: vec![Action::ApplySyncStandbyNames {
                primary: "e1".into(),
                set: two.clone()
            }],
            wait: None,
        }
    );
    // Before that lands, w1 goes too: one healthy; the three names already waited on
    // stay, so Postgres is left alone.
    obs(&mut v, "w1").received_at_ms = STALE;
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(short("e1", &["e2"], 2, three.clone())),
        }
    );
    // Had Postgres already moved to ANY 2 (e2, w1), the record shrinks to it (Postgres
    // first, then the record) once both hold everything e1 wrote, and the wait goes on.
    with_applied(&mut v, two.clone());
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![],
            wait: Some(short("e1", &["e2"], 2, two.clone())),
        }
    );
    obs(&mut v, "e2").received_lsn = Some(Lsn(1_000_100));
    obs(&mut v, "w1").received_lsn = Some(Lsn(1_000_100));
    obs(&mut v, "w1").received_at_ms = FRESH;
    obs(&mut v, "w1").wal_receiver_streaming = false;
    let d = decide(&v, NOW);
    assert_sync_sets_valid(&d, &v.recorded_sync_set);
    assert_eq!(
        d,
        Decision {
            actions: vec![Action::RecordSyncSet {
                set: two.clone(),
                degraded: false,
                degraded_until_lsn: None,
            }],
            wait: Some(short("e1", &["e2"], 2, two)),
        }
    );
}

/// Every region async (or no standby in reach of the budget): the policy asks for async
/// replication, which is no shortfall even under `required`.
#[test]
fn no_sync_region_means_async_without_a_wait() {
    let mut v = base();
    v.policy.set("regions.east.mode", "async").unwrap();
    let d = decide(&v, NOW);
    assert_sync_sets_valid(&d, &v.recorded_sync_set);
    assert_eq!(
        d,
        Decision {
            actions: vec![Action::ApplySyncStandbyNames {
                primary: "e1".into(),
                set: SyncSet::default()
            }],
            wait: None,
        }
    );
}

/// `auto`: a standby Postgres already waits on stays sync up to twice the budget; a new
/// one must fit the budget itself.
#[test]
fn an_auto_sync_standby_stays_until_twice_the_budget() {
    let mut v = base();
    // e2 is applied; 15 ms is over the 10 ms budget but within twice it: nothing changes.
    v.rtt_from_primary_ms.insert("e2".into(), 15);
    assert_eq!(decide(&v, NOW), Decision::default());
    // Past twice the budget: Postgres stops waiting on it first.
    v.rtt_from_primary_ms.insert("e2".into(), 21);
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: vec![Action::ApplySyncStandbyNames {
                primary: "e1".into(),
                set: SyncSet::default()
            }],
            wait: None,
        }
    );
    // w1 is not applied: 15 ms keeps it out (the set stays {e2}).
    let mut v = base();
    v.rtt_from_primary_ms.insert("w1".into(), 15);
    assert_eq!(decide(&v, NOW), Decision::default());
}

#[test]
fn a_new_primary_gets_a_bounded_time_to_finish_promoting() {
    let mut v = base();
    v.primary.as_mut().unwrap().generation_since_ms = NOW - 1_000;
    obs(&mut v, "e1").in_recovery = true;
    obs(&mut v, "w2").upstream = Some("e2".into());
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: Vec::new(),
            wait: Some(Wait::PrimaryPromoting {
                primary: "e1".into(),
                remaining_ms: 29_000
            }),
        }
    );
    v.primary.as_mut().unwrap().generation_since_ms = NOW - 30_000;
    assert_eq!(
        decide(&v, NOW),
        Decision {
            actions: Vec::new(),
            wait: Some(Wait::PrimaryFencing {
                primary: "e1".into()
            }),
        }
    );
    // Issue #12 defect 2: a promotion that never completes is retried with another
    // candidate. Once the stuck member's agent confirms the fence, the next one holding
    // every commit is promoted.
    obs(&mut v, "e1").wal_lsn = None;
    obs(&mut v, "e1").received_lsn = Some(Lsn(1_000_000));
    primary_fenced(&mut v);
    obs(&mut v, "e1").in_recovery = true;
    assert_eq!(
        decide(&v, NOW),
        promote("e2", PromoteReason::PrimaryFenced, 0)
    );
}

#[test]
fn sync_policy_settings_reach_the_view_types() {
    // Guards the test fixture itself: the base policy is the documented default.
    let v = base();
    assert_eq!(v.policy.region("west").mode, SyncMode::Auto);
    assert_eq!(v.policy.region("east").failover, FailoverMode::Auto);
}
