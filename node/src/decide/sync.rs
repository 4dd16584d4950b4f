//! The sync set: which standbys the primary's commits wait for, and the order in which
//! a change reaches Raft and Postgres.
//!
//! Ordering rule: the set recorded in Raft is always a superset of what Postgres may wait
//! on, with a k no larger — so a failover that asks n−k+1 recorded members always meets
//! one holding every acknowledged commit. Growing: record first, then Postgres.
//! Shrinking: Postgres first, then the record. One step per call.

use std::collections::BTreeSet;

use super::{Action, Cx, Observation, SyncSet};
use crate::config::MemberKind;
use crate::policy::{Durability, SyncMode};

/// The next step towards the target sync set, if any. Needs the primary to report what
/// its Postgres has in `synchronous_standby_names`.
pub(super) fn step(cx: &Cx, primary: &str, pobs: &Observation) -> Vec<Action> {
    let Some(applied) = &pobs.sync_standby_names else {
        return Vec::new();
    };
    let (target, degraded) = target(cx, primary, applied);
    let recorded = &cx.view.recorded_sync_set;
    if *applied == target {
        if *recorded == target {
            return Vec::new();
        }
        // Postgres already waits on exactly `target`: recording it keeps the superset.
        return vec![Action::RecordSyncSet {
            set: target,
            degraded,
        }];
    }
    // While Postgres moves from `applied` to `target` it may wait on either.
    let must_cover: BTreeSet<String> = applied.names.union(&target.names).cloned().collect();
    let min_k = [applied.k, target.k]
        .into_iter()
        .filter(|k| *k > 0)
        .min()
        .unwrap_or(0);
    if recorded.names.is_superset(&must_cover) && recorded.k <= min_k {
        vec![Action::ApplySyncStandbyNames {
            primary: primary.to_string(),
            set: target,
        }]
    } else {
        vec![Action::RecordSyncSet {
            set: SyncSet::new(must_cover, min_k),
            degraded,
        }]
    }
}

/// The sync set the policy asks for now, and whether `preferred` shrank it below the
/// policy's quorum.
fn target(cx: &Cx, primary: &str, applied: &SyncSet) -> (SyncSet, bool) {
    let view = cx.view;
    let policy = &view.policy;
    let eligible: BTreeSet<&str> = view
        .members
        .iter()
        .filter(|(name, m)| name.as_str() != primary && m.kind == MemberKind::Data && !m.nofailover)
        .filter(|(name, m)| match policy.region(&m.region).mode {
            SyncMode::Sync => true,
            SyncMode::Async => false,
            SyncMode::Auto => view
                .rtt_from_primary_ms
                .get(name.as_str())
                .is_some_and(|rtt| *rtt <= policy.commit_latency_budget_ms),
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
    if healthy.len() >= k as usize {
        return (SyncSet::new(healthy, k), false);
    }
    match policy.durability {
        // Keep waiting on the eligible standbys Postgres already waits on: zero loss,
        // commits block until k of them are back.
        Durability::Required => {
            let kept = applied
                .names
                .iter()
                .map(String::as_str)
                .filter(|n| eligible.contains(n));
            (SyncSet::new(healthy.iter().copied().chain(kept), k), false)
        }
        Durability::Preferred => {
            let n = healthy.len() as u32;
            (SyncSet::new(healthy, k.min(n)), true)
        }
    }
}
