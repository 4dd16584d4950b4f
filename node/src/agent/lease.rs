//! The primary's lease (DESIGN §3): the primary's agent renews it with the Raft leader
//! every `timing.lease_renew_interval` (`Agent.RenewLease`); the leader answers ok only
//! when it has confirmed its leadership with a quorum (`ensure_linearizable`, bounded) and
//! the sender is the intent's primary in that generation, and records when it *received*
//! the renewal ([`LeaseBook`]). The primary counts its fence deadline from when it *sent*
//! its last successful renewal ([`LeaseState`]); after `timing.fence_after` without one it
//! fences its Postgres for real. The two clocks are never compared.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_proto::agent_client::AgentClient;
use meridian_proto::{RenewLeaseRequest, RenewLeaseResponse};
use tonic::Request;

use super::Shared;
use crate::decide::SwitchoverPhase;
use crate::types::Generation;

/// Member side: the send time of the last renewal the leader accepted, and for which
/// generation.
#[derive(Default)]
pub struct LeaseState(Mutex<Option<(Instant, Generation)>>);

impl LeaseState {
    pub fn renewed(&self, sent_at: Instant, generation: Generation) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Renewals may complete out of order; keep the newest send time.
        match *g {
            Some((at, gen)) if gen == generation && at >= sent_at => {}
            _ => *g = Some((sent_at, generation)),
        }
    }

    /// Whether this member holds the lease of `generation` now: a renewal sent less than
    /// `fence_after` ago was accepted.
    pub fn valid(&self, generation: Generation, fence_after: Duration) -> bool {
        self.last_ok(generation)
            .is_some_and(|at| at.elapsed() < fence_after)
    }

    /// Send time of the last accepted renewal for `generation`.
    pub fn last_ok(&self, generation: Generation) -> Option<Instant> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.filter(|(_, gen)| *gen == generation).map(|(at, _)| at)
    }
}

/// Leader side: the last renewal this leader accepted (member, generation, receive time).
#[derive(Default, Clone)]
pub struct LeaseBook(Arc<Mutex<Option<(String, Generation, Instant)>>>);

impl LeaseBook {
    pub fn record(&self, member: &str, generation: Generation, received_at: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((member.to_string(), generation, received_at));
    }

    /// The last accepted renewal: holder, generation, receive time.
    pub fn last(&self) -> Option<(String, Generation, Instant)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// When the last renewal of `member` in `generation` was received, if any.
    pub fn received_at(&self, member: &str, generation: Generation) -> Option<Instant> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref()
            .filter(|(m, gen, _)| m == member && *gen == generation)
            .map(|(_, _, at)| *at)
    }
}

/// Bound on the leader's leadership check for one renewal.
fn confirm_timeout(shared: &Shared) -> Duration {
    (shared.config.timing.lease_renew_interval * 2).max(Duration::from_millis(300))
}

/// The leader's answer to a renewal.
pub async fn handle_renew(shared: &Shared, req: RenewLeaseRequest) -> RenewLeaseResponse {
    let received_at = Instant::now();
    let refuse = |reason: String| RenewLeaseResponse {
        ok: false,
        leader: shared.leader().map(|l| l.1).unwrap_or_default(),
        reason,
    };
    if req.cluster != shared.config.cluster {
        return refuse(format!(
            "cluster mismatch: {:?} vs {:?}",
            req.cluster, shared.config.cluster
        ));
    }
    if !shared.believes_leader() {
        return refuse("not the leader".into());
    }
    let intent = shared.applied().intent.clone();
    let generation = Generation(req.generation);
    if intent.primary.as_deref() != Some(req.member.as_str()) || intent.generation != generation {
        return refuse(format!(
            "{} is not the primary of generation {} (the intent has {:?} at {})",
            req.member, generation, intent.primary, intent.generation
        ));
    }
    if intent
        .pending_switchover
        .as_ref()
        .is_some_and(|sw| sw.from == req.member && sw.phase != SwitchoverPhase::Requested)
    {
        // It is stopping writes: a renewal now would only delay its successor (which
        // waits for this lease unless the stop was observed after the last renewal).
        return refuse("a switchover away from this member is stopping its writes".into());
    }
    if let Some(why) = previous_lease_holds(shared, &req.member, generation) {
        return refuse(why);
    }
    match tokio::time::timeout(confirm_timeout(shared), shared.raft.ensure_linearizable()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return refuse(format!("leadership not confirmed: {e}")),
        Err(_) => return refuse("leadership not confirmed in time".into()),
    }
    // Generation fencing: a Promote may have been committed while leadership was being
    // confirmed (the read index covers it, so it is applied by now). A renewal checked
    // against the older intent must not extend the old primary's lease past it.
    let now = shared.applied().intent.clone();
    if now.primary.as_deref() != Some(req.member.as_str()) || now.generation != generation {
        return refuse(format!(
            "{} is not the primary of generation {} any more (the intent has {:?} at {})",
            req.member, generation, now.primary, now.generation
        ));
    }
    shared
        .lease_book
        .record(&req.member, generation, received_at);
    RenewLeaseResponse {
        ok: true,
        leader: shared.name().to_string(),
        reason: String::new(),
    }
}

/// A new primary's first renewal waits until the previous holder's lease (as this leader
/// granted it) has run out, unless that member's agent confirmed its writes stopped: one
/// writer even for an operator's forced promotion.
fn previous_lease_holds(shared: &Shared, member: &str, generation: Generation) -> Option<String> {
    let (holder, held_gen, received_at) = shared.lease_book.last()?;
    if holder == member && held_gen == generation {
        return None;
    }
    let ttl = shared.config.timing.lease_ttl;
    let age = received_at.elapsed();
    if age >= ttl {
        return None;
    }
    let stale_after = (shared.config.timing.observe_interval * 4).max(Duration::from_secs(1));
    let stopped = shared
        .observations
        .snapshot()
        .get(&holder)
        .filter(|(_, at)| at.elapsed() <= stale_after && *at > received_at)
        .and_then(|(o, _)| {
            o.postgres
                .as_ref()
                .map(|p| p.fenced && (!p.up || p.in_recovery))
        })
        .unwrap_or(false);
    if stopped {
        return None;
    }
    Some(format!(
        "the lease of the previous primary {holder} (generation {held_gen}) is valid for {} ms more",
        (ttl - age).as_millis()
    ))
}

/// One renewal: sent to the leader (or answered here when this member leads). On success
/// the member's [`LeaseState`] moves to the send time.
pub async fn renew_once(shared: &Shared, generation: Generation) -> Result<(), String> {
    let sent_at = Instant::now();
    let sent_mono_ms = super::watchdog::monotonic_ms();
    let req = RenewLeaseRequest {
        cluster: shared.config.cluster.clone(),
        member: shared.name().to_string(),
        generation: generation.0,
    };
    let timeout = confirm_timeout(shared) + Duration::from_millis(200);
    let resp = if shared.believes_leader() {
        handle_renew(shared, req).await
    } else {
        let Some((_, leader)) = shared.leader() else {
            return Err("no leader is known".into());
        };
        let channel = shared
            .dialer
            .channel(&leader)
            .map_err(|e| format!("{e:#}"))?;
        let mut request = Request::new(req);
        request.set_timeout(timeout);
        tokio::time::timeout(timeout, AgentClient::new(channel).renew_lease(request))
            .await
            .map_err(|_| format!("leader {leader} did not answer the renewal in time"))?
            .map_err(|s| format!("leader {leader}: {}", super::join::describe(&s)))?
            .into_inner()
    };
    if !resp.ok {
        return Err(resp.reason);
    }
    shared.lease.renewed(sent_at, generation);
    if shared.config.postgres.is_some() {
        let fence_after_ms = shared.config.timing.fence_after.as_millis() as u64;
        let deadline = sent_mono_ms + fence_after_ms;
        if let Err(e) = super::watchdog::write(&shared.config.state_dir, Some(deadline)) {
            tracing::warn!("arming the watchdog: {e}");
        }
    }
    Ok(())
}

/// The primary's renewal loop; also fences the local Postgres once the lease ran out.
pub async fn run(shared: Arc<Shared>, pg: Option<crate::pg::PgInstance>) {
    let t = &shared.config.timing;
    let mut ticker = tokio::time::interval(t.lease_renew_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    // When this loop first saw this member named primary of a generation.
    let mut named_since: Option<(Generation, Instant)> = None;
    loop {
        ticker.tick().await;
        let intent = shared.applied().intent.clone();
        if intent.primary.as_deref() != Some(shared.name()) {
            last_error = None;
            if named_since.take().is_some() && pg.is_some() {
                // Not the primary any more: nothing for the watchdog to enforce.
                if let Err(e) = super::watchdog::write(&shared.config.state_dir, None) {
                    tracing::warn!("disarming the watchdog: {e}");
                }
            }
            continue;
        }
        let generation = intent.generation;
        if named_since.is_none_or(|(g, _)| g != generation) {
            named_since = Some((generation, Instant::now()));
        }
        let started = named_since.map_or_else(Instant::now, |(_, at)| at);
        if intent.resumed != Some(generation)
            && pg
                .as_ref()
                .is_some_and(|p| p.is_fenced() && !p.is_running())
        {
            // Fenced and stopped: nothing takes writes here, nothing to renew for (unless
            // resumed in place, which starts with a renewal).
            continue;
        }
        // The deadline counts from the send time of the last accepted renewal (or when this
        // agent saw itself named primary, when it has none yet: one grace period).
        // The renewal may not run past it: the fence must not wait for a slow leader.
        let deadline = shared.lease.last_ok(generation).unwrap_or(started) + t.fence_after;
        let left = deadline.saturating_duration_since(Instant::now());
        let result = match tokio::time::timeout(left, renew_once(&shared, generation)).await {
            Ok(r) => r,
            Err(_) => Err("no answer before the fence deadline".to_string()),
        };
        match result {
            Ok(()) => {
                if last_error.take().is_some() {
                    tracing::info!(%generation, "lease renewed again");
                }
            }
            Err(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(%generation, "lease renewal failed: {e}");
                }
                last_error = Some(e);
            }
        }
        let since = shared.lease.last_ok(generation).unwrap_or(started);
        if since.elapsed() < t.fence_after {
            continue;
        }
        let Some(pg) = &pg else { continue };
        if pg.is_running() && !pg.is_fenced() {
            // A member named primary that has not promoted yet is still a standby: it
            // takes no writes, so there is nothing to fence. Its promotion waits for its
            // first accepted renewal (`member::promote`), which the leader withholds while
            // the previous primary's lease may still hold (`previous_lease_holds`): that
            // gate, not this deadline, keeps one writer. Fencing it here instead turned the
            // wait into a self-fence (fenced + in recovery reads as "writes stopped") and a
            // cascade of promotions. A probe that fails counts as writable: fence.
            let status = pg.probe().await;
            if !needs_fence(status.up.then_some(status.in_recovery)) {
                continue;
            }
            // The member may have won its first renewal and promoted during the probe.
            if shared.lease.valid(generation, t.fence_after) {
                continue;
            }
            tracing::error!(
                %generation,
                fence_after_ms = t.fence_after.as_millis() as u64,
                "no lease renewal accepted within fence_after: fencing the local Postgres"
            );
            shared.set_activity("fenced: lease lost");
            if let Err(e) = pg.fence(t.pg_probe_timeout * 2).await {
                tracing::error!("fencing after the lease ran out: {e}");
            }
        }
    }
}

/// Whether a Postgres past its fence deadline must be fenced, given whether it is in
/// recovery (`None`: unknown, it did not answer). Only a server that may take writes needs
/// it; not knowing counts as writable.
fn needs_fence(in_recovery: Option<bool>) -> bool {
    in_recovery != Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_possibly_writable_postgres_is_fenced_at_the_deadline() {
        assert!(!needs_fence(Some(true)));
        assert!(needs_fence(Some(false)));
        assert!(needs_fence(None));
    }

    #[test]
    fn lease_state_keeps_the_newest_send_time_per_generation() {
        let s = LeaseState::default();
        assert!(!s.valid(Generation(1), Duration::from_secs(1)));
        let t0 = Instant::now();
        s.renewed(t0, Generation(1));
        assert!(s.valid(Generation(1), Duration::from_secs(5)));
        assert!(!s.valid(Generation(2), Duration::from_secs(5)));
        s.renewed(t0 - Duration::from_secs(10), Generation(1));
        assert_eq!(s.last_ok(Generation(1)), Some(t0));
        assert!(!s.valid(Generation(1), Duration::ZERO));
    }

    #[test]
    fn lease_book_matches_member_and_generation() {
        let b = LeaseBook::default();
        let t = Instant::now();
        b.record("a1", Generation(3), t);
        assert_eq!(b.received_at("a1", Generation(3)), Some(t));
        assert_eq!(b.received_at("a1", Generation(2)), None);
        assert_eq!(b.received_at("a2", Generation(3)), None);
    }
}
