//! Keeps the Raft leader off the primary's member. When the machine of a primary that
//! also leads dies, the failover waits for a Raft election on top of the lease; with the
//! leader elsewhere, only the lease counts (the primary's lease is held from the members,
//! not from the leader, so who leads does not matter to it).
//!
//! openraft 0.9 has no leadership transfer, so the leader yields: once it has led for a
//! while as the primary's member, it stops its heartbeats and its own campaigning
//! (`runtime_config`), skips its decision rounds, and waits until another member leads —
//! the followers' leases run out and one of them is elected. It takes both back as soon as
//! it no longer leads, or after a bound if nobody took over (then it keeps leading and
//! tries again only after a cool-down). Raft safety is untouched: this only chooses when
//! an election happens; while yielding the cluster makes no decisions, for at most the
//! bound.

use std::time::{Duration, Instant};

use super::Shared;

/// How long the primary's member leads before it yields (lets a fresh cluster settle).
const SETTLE: Duration = Duration::from_secs(3);
/// After a yield nobody took over, how long before trying again.
const COOL_DOWN: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Handoff {
    /// Since when this member has led while being the primary's member.
    leading_primary_since: Option<Instant>,
    /// Yielding since.
    yielding: Option<Instant>,
    cool_down_until: Option<Instant>,
}

impl Handoff {
    /// One step, every leader-loop iteration. True while yielding: the leader makes no
    /// decisions then (a write would keep the followers' leases alive).
    pub fn step(&mut self, shared: &Shared) -> bool {
        let leads = shared.believes_leader();
        let now = Instant::now();
        if let Some(since) = self.yielding {
            if !leads {
                self.resume(shared);
                tracing::info!(
                    leader = ?shared.leader().map(|l| l.1),
                    after_ms = since.elapsed().as_millis() as u64,
                    "Raft leadership handed over: the primary's member no longer leads"
                );
                return false;
            }
            if now.duration_since(since) > bound(shared) {
                self.resume(shared);
                self.cool_down_until = Some(now + COOL_DOWN);
                tracing::warn!(
                    "no other member took over Raft leadership within {} ms: leading on",
                    bound(shared).as_millis()
                );
                return false;
            }
            return true;
        }
        // The shared snapshot, not a deep copy: the history alone holds up to 1,000 entries.
        let applied_now = shared.applied();
        let intent = &applied_now.intent;
        let voters = shared
            .raft_metrics()
            .membership_config
            .membership()
            .voter_ids()
            .count();
        let should_yield = leads
            && intent.primary.as_deref() == Some(shared.name())
            && voters > 1
            && intent.pending_switchover.is_none()
            && self.cool_down_until.is_none_or(|t| now >= t);
        if !should_yield {
            self.leading_primary_since = None;
            return false;
        }
        let since = *self.leading_primary_since.get_or_insert(now);
        if now.duration_since(since) < SETTLE {
            return false;
        }
        tracing::info!("this member leads Raft and is the primary: yielding leadership");
        let rc = shared.raft.runtime_config();
        rc.heartbeat(false);
        rc.elect(false);
        self.yielding = Some(now);
        self.leading_primary_since = None;
        true
    }

    fn resume(&mut self, shared: &Shared) {
        let rc = shared.raft.runtime_config();
        rc.heartbeat(true);
        rc.elect(true);
        self.yielding = None;
    }
}

/// Followers' leases run out `election_timeout_max` after the last heartbeat, then one
/// election timeout elects: a few of those, with room for a split vote.
fn bound(shared: &Shared) -> Duration {
    shared.config.raft.election_timeout_max * 4
}
