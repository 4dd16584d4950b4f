//! The sync set: which standbys the primary's commits wait for, and the order in which
//! a change reaches Raft and Postgres.
//!
//! Ordering rule: the set recorded in Raft is always a superset of what Postgres may wait
//! on, with a k no larger — so a failover that asks n−k+1 recorded members always meets
//! one holding every acknowledged commit. Growing: record first, then Postgres.
//! Shrinking: Postgres first, then the record. One step per call.
//!
//! Under `durability = required` with fewer than `sync_quorum` healthy sync standbys, the
//! set is never cut below `k` names (the intent would refuse it) nor emptied (that would
//! make the primary acknowledge alone): it is filled up with eligible standbys that are
//! not streaming yet, commits wait, and the core says so ([`Wait::SyncQuorumShort`]).

use std::collections::BTreeSet;

use super::{Action, Cx, Observation, SyncSet, Wait};
use crate::policy::{Durability, SyncMode};
use crate::types::MemberKind;

/// The next step towards the target sync set, if any, and the wait when `required`
/// durability is short of its quorum. Needs the primary to report what its Postgres has in
/// `synchronous_standby_names`.
pub(super) fn step(cx: &Cx, primary: &str, pobs: &Observation) -> (Vec<Action>, Option<Wait>) {
    let Some(applied) = &pobs.sync_standby_names else {
        return (Vec::new(), None);
    };
    let Target {
        set: target,
        degraded,
        short,
    } = target(cx, primary, applied);
    // Too few standbys to name a valid `ANY k` set: the record and Postgres stay as they
    // are, so the rule holds as it did.
    let Some(target) = target else {
        return (Vec::new(), short);
    };
    let recorded = &cx.view.recorded_sync_set;
    if *applied == target {
        if *recorded == target {
            return (Vec::new(), short);
        }
        // Postgres already waits on exactly `target`: recording it keeps the superset.
        return (
            vec![Action::RecordSyncSet {
                set: target,
                degraded,
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
            degraded,
        }
    };
    (vec![action], short)
}

/// The sync set the policy asks for now.
struct Target {
    /// `None`: keep the record and Postgres as they are (`required` durability with too
    /// few standbys to name `k` of them).
    set: Option<SyncSet>,
    /// `preferred` durability shrank the set below the policy's quorum.
    degraded: bool,
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
            degraded: false,
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
                degraded: false,
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
                degraded: true,
                short: None,
            }
        }
    }
}
