//! The sync set: which standbys the primary's commits wait for, and the order in which
//! a change reaches Raft and Postgres.
//!
//! Ordering rule: the set recorded in Raft is always a superset of what Postgres may wait
//! on, with a k no larger — so a failover that asks n−k+1 recorded members always meets
//! one holding every acknowledged commit. Growing: record first, then Postgres.
//! Shrinking: Postgres first, then the record, once k of the new set hold everything the
//! primary wrote (else a member that acknowledged commits alone would be forgotten). One
//! step per call. A primary that may acknowledge with no standby although the policy asks
//! for one is recorded as degraded before it may, and stays so until k of its set caught
//! up.
//!
//! Under `durability = required` with fewer than `sync_quorum` healthy sync standbys, the
//! set is never cut below `k` names (the intent would refuse it) nor emptied (that would
//! make the primary acknowledge alone): it is filled up with eligible standbys that are
//! not streaming yet, commits wait, and the core says so ([`Wait::SyncQuorumShort`]).

use std::collections::BTreeSet;

use super::{Action, Cx, Observation, SyncSet, Wait};
use crate::policy::{Durability, SyncMode};
use crate::types::{Lsn, MemberKind};

/// The next step towards the target sync set, if any, and the wait when `required`
/// durability is short of its quorum. Needs the primary to report what its Postgres has in
/// `synchronous_standby_names`.
pub(super) fn step(cx: &Cx, primary: &str, pobs: &Observation) -> (Vec<Action>, Option<Wait>) {
    let Some(applied) = &pobs.sync_standby_names else {
        return (Vec::new(), None);
    };
    let Target {
        set: target,
        wants_sync,
        short,
    } = target(cx, primary, applied);
    // Too few standbys to name a valid `ANY k` set: the record and Postgres stay as they
    // are, so the rule holds as it did.
    let Some(target) = target else {
        return (Vec::new(), short);
    };
    let view = cx.view;
    let recorded = &view.recorded_sync_set;
    // The primary will acknowledge with no standby once `target` is applied, although the
    // policy asks for sync standbys (`preferred` gave them up). Like the set, that is
    // recorded before Postgres may do it: a failover must know commits may exist on the
    // old primary only. Only a primary that had a sync set (or was already marked)
    // degrades: a set growing from none (a new cluster whose standbys were still cloning,
    // an async policy turning sync) promised nothing before it is applied.
    let had_sync = !recorded.is_empty() || view.recorded_sync_degraded;
    let alone = wants_sync && target.is_empty() && had_sync;
    if alone && !view.recorded_sync_degraded {
        return (
            vec![Action::RecordSyncSet {
                set: recorded.clone(),
                degraded: true,
                degraded_until_lsn: None,
            }],
            short,
        );
    }
    if *applied == target {
        // What the primary acknowledged alone lies before the position it reports now
        // that it waits on `target`; once k of `target` hold that, any n−k+1 of them
        // include one that does, and the mark goes.
        let (degraded, until) = if alone || !view.recorded_sync_degraded {
            (alone, None)
        } else {
            match view.recorded_sync_degraded_until_lsn.or(pobs.wal_lsn) {
                Some(until) if held_by_k(cx, &target, until) => (false, None),
                until => (true, until),
            }
        };
        let unchanged = *recorded == target
            && view.recorded_sync_degraded == degraded
            && view.recorded_sync_degraded_until_lsn == until;
        if unchanged {
            return (Vec::new(), short);
        }
        // A record that drops names (or raises k) forgets who may hold the commits
        // acknowledged under the old set: a member that acknowledged alone, now left out,
        // would never be asked (sim seed 280: ANY 1 (e2, w1) shrank to ANY 1 (e2) while e2
        // was down, and e2 was promoted without what w1 acknowledged). Only once k of the
        // new set hold everything the primary wrote; meanwhile the wider record stays
        // (with the degraded bound, if that is what changed).
        let forgets = !target.names.is_superset(&recorded.names) || target.k > recorded.k;
        // Nor on a report older than the newest target (sim seed 29193: e1 reported
        // `ANY 1 (e2)` just before it applied `ANY 1 (e2, w1)`; the record shrank on that
        // report while w1 alone confirmed e1's commits). The primary names the target it
        // applied; when that is not the newest, the newest becomes `target`, and the
        // record shrinks once a report shows it applied.
        let current = pobs.sync_target_seq == view.sync_target.as_ref().map(|(seq, _)| *seq);
        if forgets && !current {
            if let Some((_, newest)) = view.sync_target.as_ref().filter(|(_, s)| *s != target) {
                debug_assert!(recorded.names.is_superset(&newest.names));
                return (
                    vec![Action::ApplySyncStandbyNames {
                        primary: primary.to_string(),
                        set: target,
                    }],
                    short,
                );
            }
        }
        let set =
            if forgets && !(current && pobs.wal_lsn.is_some_and(|p| held_by_k(cx, &target, p))) {
                if view.recorded_sync_degraded == degraded
                    && view.recorded_sync_degraded_until_lsn == until
                {
                    return (Vec::new(), short);
                }
                recorded.clone()
            } else {
                target
            };
        // Postgres already waits on exactly `target`: recording it keeps the superset.
        return (
            vec![Action::RecordSyncSet {
                set,
                degraded,
                degraded_until_lsn: until,
            }],
            short,
        );
    }
    // While Postgres moves from `applied` to `target` it may wait on either.
    let must_cover: BTreeSet<String> = applied.names.union(&target.names).cloned().collect();
    let min_k = [applied.k, target.k]
        .into_iter()
        .filter(|k| *k > 0)
        .min()
        .unwrap_or(0);
    let action = if recorded.names.is_superset(&must_cover) && recorded.k <= min_k {
        Action::ApplySyncStandbyNames {
            primary: primary.to_string(),
            set: target,
        }
    } else {
        Action::RecordSyncSet {
            set: SyncSet::new(must_cover, min_k),
            degraded: view.recorded_sync_degraded,
            degraded_until_lsn: view.recorded_sync_degraded_until_lsn,
        }
    };
    (vec![action], short)
}

/// At least k of `set` are known to hold WAL up to `lsn` (vacuously true for an empty
/// set: nothing is waited on, nothing promised).
fn held_by_k(cx: &Cx, set: &SyncSet, lsn: Lsn) -> bool {
    if set.is_empty() {
        return true;
    }
    let holding = set
        .names
        .iter()
        .filter_map(|n| cx.fresh(n))
        .filter_map(super::failover::standby_lsn)
        .filter(|held| *held >= lsn)
        .count();
    holding >= set.k as usize
}

/// The sync set the policy asks for now.
struct Target {
    /// `None`: keep the record and Postgres as they are (`required` durability with too
    /// few standbys to name `k` of them).
    set: Option<SyncSet>,
    /// Some standby is eligible as sync: the policy asks for sync replication (an empty
    /// set then means `preferred` durability gave it up for now).
    wants_sync: bool,
    /// `required` durability with fewer than `k` healthy sync standbys: commits wait.
    short: Option<Wait>,
}

fn target(cx: &Cx, primary: &str, applied: &SyncSet) -> Target {
    let view = cx.view;
    let policy = &view.policy;
    let eligible: BTreeSet<&str> = view
        .members
        .iter()
        .filter(|(name, m)| {
            name.as_str() != primary && m.kind == MemberKind::Data && !m.nofailover && !m.nosync
        })
        .filter(|(name, m)| match policy.region(&m.region).mode {
            SyncMode::Sync => true,
            SyncMode::Async => false,
            // Hysteresis: a standby Postgres already waits on stays sync up to twice the
            // budget, so a round trip hovering at the budget does not flip the set (and
            // the Raft log) back and forth.
            SyncMode::Auto => {
                let budget_ms = if applied.names.contains(name.as_str()) {
                    policy.commit_latency_budget_ms.saturating_mul(2)
                } else {
                    policy.commit_latency_budget_ms
                };
                view.rtt_from_primary_ms
                    .get(name.as_str())
                    .is_some_and(|rtt| *rtt <= budget_ms)
            }
        })
        .map(|(name, _)| name.as_str())
        .collect();
    let healthy: BTreeSet<&str> = eligible
        .iter()
        .copied()
        .filter(|name| {
            cx.fresh(name).is_some_and(|obs| {
                obs.postgres_up
                    && obs.in_recovery
                    && !obs.fenced
                    && obs.wal_receiver_streaming
                    && obs.upstream.as_deref() == Some(primary)
            })
        })
        .collect();
    let k = policy.sync_quorum;
    // No standby in a sync region at all: the policy asks for async replication.
    if healthy.len() >= k as usize || eligible.is_empty() {
        return Target {
            set: Some(SyncSet::new(healthy, k)),
            wants_sync: !eligible.is_empty(),
            short: None,
        };
    }
    match policy.durability {
        // Keep waiting on the eligible standbys Postgres already waits on: zero loss,
        // commits block until k of them are back. A set of 1..k names would be invalid
        // (and refused by the intent): then nothing changes at all.
        Durability::Required => {
            let kept = applied
                .names
                .iter()
                .map(String::as_str)
                .filter(|n| eligible.contains(n));
            let mut names: BTreeSet<&str> = healthy.iter().copied().chain(kept).collect();
            // Never fewer than k names, and never none: an empty set would let the
            // primary acknowledge commits nobody else holds. Fill up with eligible
            // standbys that are not healthy yet; commits wait until k of them stream.
            for n in &eligible {
                if names.len() >= k as usize {
                    break;
                }
                names.insert(n);
            }
            let set = (names.len() >= k as usize).then(|| SyncSet::new(names, k));
            Target {
                set,
                wants_sync: true,
                short: Some(Wait::SyncQuorumShort {
                    primary: primary.to_string(),
                    healthy: healthy.iter().map(|n| n.to_string()).collect(),
                    quorum: k,
                    waiting_on: applied.clone(),
                }),
            }
        }
        Durability::Preferred => {
            let n = healthy.len() as u32;
            Target {
                set: Some(SyncSet::new(healthy, k.min(n))),
                wants_sync: true,
                short: None,
            }
        }
    }
}
