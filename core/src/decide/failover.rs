//! When the primary counts as failed, and who replaces it.
//!
//! Failed: its own agent reports Postgres down (or read-only) and fenced → promote at
//! once, but only a member that holds every acknowledged commit (the old primary's data is
//! still there: rather than lose any of it, it is resumed in place); or its agent is
//! unreachable, no other member still sees it writable, and a majority of the voters
//! broke its lease. The "others agree" check is the absence of contrary evidence: safety
//! rests on the lease and the primary's self-fencing, and the probes only stop a promotion
//! while someone still sees the old primary take writes.
//!
//! Under a sync set, the replacement holds the highest *final* position of n − k + 1 of
//! the recorded set: a position read once the member could confirm nothing more of the
//! old primary ([`position_final`], sim finding F7b).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::{
    Action, ClusterView, Cx, Decision, NoCandidate, NoCandidateReason, Observation, PrimaryView,
    PromoteReason, Rejection, Wait,
};
use crate::policy::{FailoverMode, SyncMode};
use crate::types::Lsn;
use crate::types::MemberKind;

pub(super) enum PrimaryState<'a> {
    Healthy(&'a Observation),
    /// A new primary still in recovery, within its promotion bound.
    Promoting {
        remaining_ms: u64,
    },
    /// Its agent answers but its Postgres is not writable and not (yet) fenced.
    NotFenced,
    Failed(PromoteReason),
    /// Possibly failed, but not yet safe to replace.
    Holding(Wait),
    /// Unreachable; its lease must be broken by a majority before it is replaced.
    LeaseHeld(Wait),
}

pub(super) fn primary_state<'a>(cx: &Cx<'a>, primary: &PrimaryView) -> PrimaryState<'a> {
    let name = primary.name.as_str();
    if let Some(obs) = cx.fresh(name) {
        if obs.writable() {
            return PrimaryState::Healthy(obs);
        }
        // A stop reported before the current generation began says nothing about it: a
        // primary resumed in place takes writes again before its next report (sim
        // finding F3: promoting on the stale report lost acknowledged commits).
        if obs.writes_stopped() && obs.seen_generation >= cx.view.generation {
            // Resumed in place and not yet resumed: the agent may still take writes in
            // this generation, so its fence proves nothing yet (sim finding F3b: the
            // leader promoted on such a report while the resumed primary acknowledged).
            if obs.resume_pending {
                return PrimaryState::Holding(Wait::PrimaryResuming {
                    primary: name.to_string(),
                });
            }
            return PrimaryState::Failed(PromoteReason::PrimaryFenced);
        }
        if !obs.fenced && obs.postgres_up && obs.in_recovery {
            let remaining_ms = cx.remaining_ms(
                primary.generation_since_ms,
                cx.view.limits.promote_timeout_ms,
            );
            if remaining_ms > 0 {
                return PrimaryState::Promoting { remaining_ms };
            }
        }
        return PrimaryState::NotFenced;
    }
    let seen_by: Vec<String> = cx
        .view
        .members
        .keys()
        .filter(|m| m.as_str() != name)
        .filter(|m| {
            cx.fresh(m)
                .and_then(|obs| obs.probes.get(name))
                .is_some_and(|p| p.postgres_writable)
        })
        .cloned()
        .collect();
    if !seen_by.is_empty() {
        return PrimaryState::Holding(Wait::PrimaryWritableForOthers {
            primary: name.to_string(),
            seen_by,
        });
    }
    if !primary.lease.broken {
        return PrimaryState::LeaseHeld(Wait::PrimaryLeaseValid {
            primary: name.to_string(),
            expires_in_ms: primary
                .lease
                .majority_runs_out_at_ms
                .map(|at| at.saturating_sub(cx.now_ms)),
        });
    }
    PrimaryState::Failed(PromoteReason::LeaseExpired)
}

/// A newly elected leader holds only the observations sent to it since: before it picks a
/// candidate it gives every data member one staleness bound to report (else the sync
/// standby that holds every commit may be passed over for one that reported first).
pub(super) fn gathering(cx: &Cx, old: &str) -> Option<Wait> {
    let view = cx.view;
    let remaining_ms = cx.remaining_ms(view.leader_since_ms, view.limits.stale_after_ms);
    if remaining_ms == 0 {
        return None;
    }
    let missing: Vec<String> = view
        .members
        .iter()
        .filter(|(name, m)| name.as_str() != old && m.kind == MemberKind::Data)
        .filter(|(name, _)| cx.fresh(name).is_none())
        .map(|(name, _)| name.clone())
        .collect();
    (!missing.is_empty()).then_some(Wait::GatheringObservations {
        missing,
        remaining_ms,
    })
}

/// Whether `obs` gives a sync member's final position for replacing the primary of the
/// view's generation (sim finding F7b): it broke that lease in the broken round the
/// promotion relies on (or a later one) and its WAL receiver was off before the probe, so
/// it confirms nothing more of the old primary; or, when that primary's own agent reported
/// its Postgres stopped, the probe ran after the leader knew it.
fn position_final(cx: &Cx, obs: &Observation, reason: PromoteReason) -> bool {
    let generation = cx.view.generation;
    if reason == PromoteReason::PrimaryFenced && obs.after_primary_stop == Some(generation) {
        return true;
    }
    let Some(lease) = cx.view.primary.as_ref().map(|p| p.lease) else {
        return false;
    };
    let Some(round) = lease.round.filter(|_| lease.broken) else {
        return false;
    };
    obs.receiver_off_since
        .is_some_and(|(g, r)| g == generation && r >= round)
}

/// The recorded sync set without the failed primary.
fn recorded_sync_names<'v>(view: &'v ClusterView, old: &str) -> BTreeSet<&'v str> {
    view.recorded_sync_set
        .names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != old)
        .collect()
}

/// Before a candidate is chosen under a sync set: the answering sync members whose
/// positions are not final yet. They get the break request again (it is how a member
/// stops confirming and says so), and the leader waits for them while they could still
/// make up the quorum: for a fenced primary until its lease is broken, then for one
/// staleness bound after the break. Past that, `choose` counts them as not answered.
fn sealing(cx: &Cx, old: &str, reason: PromoteReason) -> Option<Decision> {
    let view = cx.view;
    let primary = view.primary.as_ref()?;
    let k = view.recorded_sync_set.k as usize;
    let sync_names = recorded_sync_names(view, old);
    if sync_names.is_empty() || k == 0 {
        return None;
    }
    let needed = (sync_names.len() + 1).saturating_sub(k).max(1);
    let (mut finals, mut pending) = (0usize, Vec::new());
    for name in &sync_names {
        let Some(obs) = cx.fresh(name) else { continue };
        if !(obs.postgres_up && obs.in_recovery) || standby_lsn(obs).is_none() {
            continue;
        }
        if position_final(cx, obs, reason) {
            finals += 1;
        } else {
            pending.push(name.to_string());
        }
    }
    if finals >= needed || finals + pending.len() < needed {
        return None;
    }
    // A fenced primary's standbys learn of the stop from the leader's answers to their
    // reports: no break needed, and their reports stay fresh only while they answer.
    let actions = if reason == PromoteReason::PrimaryFenced {
        Vec::new()
    } else {
        vec![Action::BreakLease {
            member: old.to_string(),
            generation: view.generation,
        }]
    };
    let remaining_ms = match primary.lease.broken_since_ms {
        Some(since) if primary.lease.broken && reason == PromoteReason::LeaseExpired => {
            let left = cx.remaining_ms(since, view.limits.stale_after_ms);
            if left == 0 {
                return None;
            }
            Some(left)
        }
        _ => None,
    };
    Some(Decision {
        actions,
        wait: Some(Wait::SyncPositionsPending {
            primary: old.to_string(),
            pending,
            remaining_ms,
        }),
    })
}

/// The break request again for the sync members whose positions are not final yet, when
/// the answer for now is "no candidate": a member that missed the round, or whose
/// Postgres was down then, stops confirming once asked, and may yet make up the quorum.
fn ask_again(cx: &Cx, old: &str, reason: PromoteReason, decision: &mut Decision) {
    if reason != PromoteReason::LeaseExpired {
        return;
    }
    let Some(Wait::NoCandidate(nc)) = &decision.wait else {
        return;
    };
    if !matches!(nc.reason, NoCandidateReason::SyncQuorumNotAnswering { .. }) {
        return;
    }
    let unsealed = cx.view.recorded_sync_set.names.iter().any(|n| {
        n != old
            && cx
                .fresh(n)
                .is_some_and(|o| o.postgres_up && o.in_recovery && !position_final(cx, o, reason))
    });
    if unsealed {
        decision.actions.push(Action::BreakLease {
            member: old.to_string(),
            generation: cx.view.generation,
        });
    }
}

/// Promote the best candidate for `old`, or say why there is none.
pub(super) fn replace(cx: &Cx, old: &str, reason: PromoteReason) -> Decision {
    if let Some(d) = sealing(cx, old, reason) {
        return d;
    }
    let mut d = choose_decision(cx, old, reason);
    ask_again(cx, old, reason, &mut d);
    d
}

fn choose_decision(cx: &Cx, old: &str, reason: PromoteReason) -> Decision {
    // A primary whose own agent stopped it still holds all its data: no async fallback
    // then (the leader resumes it in place when nobody qualifies).
    match choose(cx, old, reason) {
        Ok(c) => Decision {
            actions: vec![Action::Promote {
                member: c.name,
                generation: cx.view.generation.next(),
                reason,
                expected_loss_bytes: c.expected_loss_bytes,
            }],
            wait: None,
        },
        Err(nc) => Decision {
            actions: Vec::new(),
            wait: Some(Wait::NoCandidate(nc)),
        },
    }
}

pub(super) struct Chosen {
    pub name: String,
    pub expected_loss_bytes: u64,
}

/// A member that passed the per-member checks.
struct Qualified {
    name: String,
    lsn: Lsn,
    same_region: bool,
    region_priority: i32,
    priority: i32,
}

fn choose(cx: &Cx, old: &str, reason: PromoteReason) -> Result<Chosen, NoCandidate> {
    let allow_async = reason != PromoteReason::PrimaryFenced;
    let view = cx.view;
    let best_known = best_known_lsn(view);
    let old_obs = view.observations.get(old);
    let old_region = view.members.get(old).map(|m| m.region.as_str());
    let primary_timeline = old_obs.map(|o| o.timeline);

    let mut rejected = BTreeMap::new();
    let mut qualified = Vec::new();
    for name in view.members.keys().filter(|n| n.as_str() != old) {
        match qualify(cx, name, best_known, primary_timeline) {
            Ok(lsn) => {
                let m = &view.members[name];
                qualified.push(Qualified {
                    name: name.clone(),
                    lsn,
                    same_region: old_region == Some(m.region.as_str()),
                    region_priority: view.policy.region(&m.region).priority,
                    priority: m.priority,
                });
            }
            Err(r) => {
                rejected.insert(name.clone(), r);
            }
        }
    }
    let no_candidate = |reason, rejected| NoCandidate {
        failed_primary: old.to_string(),
        reason,
        rejected,
    };

    let sync_names = recorded_sync_names(view, old);
    let k = view.recorded_sync_set.k as usize;
    // An explicit `mode = sync` is the user asking for zero loss: no async fallback then.
    let strict = !allow_async
        || !view.policy.async_failover
        || sync_names.iter().any(|n| {
            view.members
                .get(*n)
                .is_some_and(|m| view.policy.region(&m.region).mode == SyncMode::Sync)
        });

    // The old primary may have acknowledged commits with no standby although the policy
    // asked for sync ones: nobody else is known to hold them, so no automatic promotion
    // unless the policy accepts the loss (sim finding F5, the flapping loss in chaos).
    if view.recorded_sync_degraded {
        let explicit_sync = view.members.iter().any(|(name, m)| {
            name.as_str() != old
                && m.kind == MemberKind::Data
                && view.policy.region(&m.region).mode == SyncMode::Sync
        });
        let accept_loss = allow_async && view.policy.async_failover && !explicit_sync;
        if !accept_loss {
            for q in qualified {
                rejected.insert(q.name, Rejection::NotInSyncSet);
            }
            return Err(no_candidate(NoCandidateReason::AcknowledgedAlone, rejected));
        }
        if sync_names.is_empty() {
            if qualified.is_empty() {
                return Err(no_candidate(NoCandidateReason::NoQualifiedMember, rejected));
            }
            return Ok(best(qualified, best_known));
        }
    }

    if !sync_names.is_empty() && k > 0 {
        let n = sync_names.len();
        let needed = if crate::mutant!(PromoteWithoutSyncQuorum) {
            // Mutant: one answering sync member is taken as the quorum's position.
            1
        } else {
            (n + 1).saturating_sub(k).max(1)
        };
        // Only a final position counts: one read once the member could no longer confirm
        // the old primary's WAL (sim finding F7b: a stale report of a standby still
        // connected to a frozen primary passed for the quorum's position).
        let answered: BTreeMap<&str, Lsn> = sync_names
            .iter()
            .filter_map(|name| {
                let obs = cx.fresh(name)?;
                let lsn = standby_lsn(obs)?;
                (obs.postgres_up && obs.in_recovery && position_final(cx, obs, reason))
                    .then_some((*name, lsn))
            })
            .collect();
        if answered.len() >= needed {
            let quorum_lsn = answered.values().copied().max().unwrap_or(Lsn::ZERO);
            // Holding the quorum's position means holding every commit a sync standby
            // could have acknowledged, in the set or not.
            let (safe, others): (Vec<_>, Vec<_>) =
                qualified.into_iter().partition(|q| q.lsn >= quorum_lsn);
            let (sync_ok, safe_outside): (Vec<_>, Vec<_>) = safe
                .into_iter()
                .partition(|q| sync_names.contains(q.name.as_str()));
            if !sync_ok.is_empty() {
                return Ok(best(sync_ok, best_known));
            }
            if !safe_outside.is_empty() {
                return Ok(best(safe_outside, best_known));
            }
            // A recorded sync member known to be behind the quorum is never promoted
            // automatically; an async one may be where the policy allows the loss.
            let (behind, outside): (Vec<_>, Vec<_>) = others
                .into_iter()
                .partition(|q| sync_names.contains(q.name.as_str()));
            if !strict && !outside.is_empty() {
                return Ok(best(outside, best_known));
            }
            for q in behind {
                rejected.insert(
                    q.name,
                    Rejection::BehindSyncQuorum {
                        lsn: q.lsn,
                        quorum_lsn,
                    },
                );
            }
            for q in outside {
                rejected.insert(q.name, Rejection::NotInSyncSet);
            }
            return Err(no_candidate(NoCandidateReason::NoQualifiedMember, rejected));
        }
        // Too few of the recorded sync set answered to know who holds the newest
        // acknowledged commit: none of them may be promoted automatically (that would be a
        // known shortfall passed off as sync); an async member may be where the policy
        // allows the loss, and the history records it.
        let outside: Vec<Qualified> = qualified
            .iter()
            .filter(|q| !sync_names.contains(q.name.as_str()))
            .map(|q| Qualified {
                name: q.name.clone(),
                ..*q
            })
            .collect();
        if !strict && !outside.is_empty() {
            return Ok(best(outside, best_known));
        }
        for q in qualified {
            rejected.insert(
                q.name.clone(),
                if sync_names.contains(q.name.as_str()) {
                    Rejection::SyncQuorumUnknown
                } else {
                    Rejection::NotInSyncSet
                },
            );
        }
        let reason = if strict {
            NoCandidateReason::SyncQuorumNotAnswering {
                answered: answered.keys().map(|s| s.to_string()).collect(),
                needed,
                of: n,
            }
        } else {
            NoCandidateReason::NoQualifiedMember
        };
        return Err(no_candidate(reason, rejected));
    }

    // No sync set recorded and not degraded: every standby is async by policy (`async`
    // regions, or `auto` ones beyond the latency budget) and no commit waited for one, so
    // the policy promised nothing beyond `max_lag_on_failover_bytes` (checked per member).
    if allow_async && !qualified.is_empty() {
        return Ok(best(qualified, best_known));
    }
    for q in qualified {
        rejected.insert(q.name, Rejection::NotInSyncSet);
    }
    Err(no_candidate(NoCandidateReason::NoQualifiedMember, rejected))
}

/// Preference: same region as the old primary, region priority, LSN, member priority,
/// then name.
fn best(mut candidates: Vec<Qualified>, best_known: Lsn) -> Chosen {
    candidates.sort_by(|a, b| {
        let key = |q: &Qualified| {
            (
                Reverse(q.same_region),
                Reverse(q.region_priority),
                Reverse(q.lsn),
                Reverse(q.priority),
            )
        };
        key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
    });
    let q = candidates.swap_remove(0);
    Chosen {
        expected_loss_bytes: best_known.bytes_after(q.lsn),
        name: q.name,
    }
}

/// The per-member checks; on success, the WAL the member holds.
fn qualify(
    cx: &Cx,
    name: &str,
    best_known: Lsn,
    primary_timeline: Option<u32>,
) -> Result<Lsn, Rejection> {
    let view = cx.view;
    let m = view.members.get(name).ok_or(Rejection::NotAMember)?;
    if m.kind == MemberKind::Witness {
        return Err(Rejection::Witness);
    }
    let obs = view
        .observations
        .get(name)
        .ok_or(Rejection::NoObservation)?;
    if !cx.is_fresh(obs) {
        return Err(Rejection::StaleObservation {
            age_ms: cx.age_ms(obs),
        });
    }
    if obs.fenced {
        return Err(Rejection::Fenced);
    }
    if !obs.postgres_up {
        return Err(Rejection::PostgresDown);
    }
    if !obs.in_recovery {
        return Err(Rejection::NotInRecovery);
    }
    if m.nofailover {
        return Err(Rejection::NoFailover);
    }
    if view.policy.region(&m.region).failover == FailoverMode::Manual {
        return Err(Rejection::RegionFailoverManual {
            region: m.region.clone(),
        });
    }
    let lsn = standby_lsn(obs).ok_or(Rejection::NoLsn)?;
    if let Some(pt) = primary_timeline {
        if obs.timeline < pt {
            return Err(Rejection::OlderTimeline {
                timeline: obs.timeline,
                primary_timeline: pt,
            });
        }
    }
    let lag_bytes = best_known.bytes_after(lsn);
    let max_bytes = view.policy.max_lag_on_failover_bytes;
    if lag_bytes > max_bytes {
        return Err(Rejection::LagTooHigh {
            lag_bytes,
            max_bytes,
        });
    }
    Ok(lsn)
}

/// The WAL a standby holds: what it received (it replays that before promoting).
pub(super) fn standby_lsn(obs: &Observation) -> Option<Lsn> {
    obs.received_lsn.max(obs.replayed_lsn)
}

/// The most WAL the old primary is known to have written: its own last report (however
/// old), what it told the voters with its lease renewals, or anything a standby received
/// from it.
fn best_known_lsn(view: &ClusterView) -> Lsn {
    let from_lease = view.primary.as_ref().and_then(|p| p.lease.primary_lsn);
    view.observations
        .values()
        .filter_map(Observation::best_lsn)
        .chain(from_lease)
        .max()
        .unwrap_or(Lsn::ZERO)
}
