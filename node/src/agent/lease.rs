//! The primary's lease (DESIGN §3), held from a majority of the members rather than from
//! the Raft leader, so a leader change never costs the primary its lease.
//!
//! - **Primary side** ([`LeaseState`], [`renew_once`], [`run`]): every
//!   `timing.lease_renew_interval` the primary's agent sends `RenewLease` to every member
//!   (itself included); a renewal counts when a majority granted it. The fence deadline is
//!   the *send* time of the last counted renewal plus `timing.fence_after`; past it the
//!   agent (or its watchdog) fences the local Postgres for real.
//! - **Voter side** ([`Grants`]): every member grants a renewal when its applied intent
//!   names the sender primary of that generation, and records when it *received* it. A
//!   grant runs `timing.lease_ttl` on the voter's clock. A voter grants a newly promoted
//!   primary only once the previous generation's grant ran out here, unless the promotion
//!   says the old lease was released.
//! - **Breaking** ([`break_round`]): before a failover the Raft leader asks every member to
//!   break the primary's lease. A voter breaks it only when its own grant has run out, and
//!   then never grants that generation again (recorded on disk before it answers). Once a
//!   majority broke it, the old primary cannot renew (any majority it could reach contains
//!   a breaker) and its last counted renewal was sent at least `lease_ttl` before the
//!   break, so past its fence deadline (`fence_after` < `lease_ttl`): a new primary may
//!   take writes at once.
//!
//! The clocks of different members are never compared: each counts its own intervals.
//! Majorities are counted over the intent's members (all of them are Raft voters).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_proto::agent_client::AgentClient;
use meridian_proto::{
    BreakLeaseRequest, BreakLeaseResponse, RenewLeaseRequest, RenewLeaseResponse,
};
use tokio::task::JoinSet;
use tonic::Request;

use super::Shared;
use crate::raft::intent::{BreakRound, Intent};
use crate::types::Generation;

/// How long a break round waits for more answers once a majority answered.
const BREAK_GRACE: Duration = Duration::from_millis(200);

/// File under `state_dir` recording the newest generation whose lease this voter broke.
pub const BROKEN_FILE: &str = "lease-broken";

/// Member side: the send time of the last renewal a majority granted, and for which
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
    /// `fence_after` ago was granted by a majority.
    pub fn valid(&self, generation: Generation, fence_after: Duration) -> bool {
        self.last_ok(generation)
            .is_some_and(|at| at.elapsed() < fence_after)
    }

    /// Send time of the last counted renewal for `generation`.
    pub fn last_ok(&self, generation: Generation) -> Option<Instant> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.filter(|(_, gen)| *gen == generation).map(|(at, _)| at)
    }
}

/// What a voter's grants say about one primary and generation, given its applied intent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BreakOutcome {
    /// Broken here (now or before): this voter never grants it again.
    Broken,
    /// This voter's grant still runs for that long.
    Held { remaining: Duration },
    /// The voter cannot answer (its intent names another primary for that generation,
    /// or recording the break failed).
    Refused(String),
}

/// Voter side of the lease: the grants this member gave, on its own monotonic clock.
pub struct Grants {
    ttl: Duration,
    file: Option<PathBuf>,
    inner: Mutex<GrantInner>,
}

#[derive(Debug)]
struct GrantInner {
    /// The generation the fields below are about (0: none seen yet).
    generation: Generation,
    /// The last grant in `generation`, or when this voter started counting it (it learned
    /// of the generation, or it started: a grant may have been given before a restart).
    since: Instant,
    /// Whether this voter granted anything in `generation` since it started counting.
    granted: bool,
    /// Until when a grant of an earlier generation may still run here.
    previous_until: Instant,
    /// Every generation up to this one is broken here, by the round named (or a later
    /// one) — unless the applied intent released the breaks of that round.
    broken_upto: Generation,
    broken_round: BreakRound,
    /// The highest WAL position `generation`'s primary reported here, and the previous
    /// generation's.
    primary_lsn: u64,
    previous_primary_lsn: u64,
}

impl Grants {
    /// Grants for a voter starting now. `state_dir` keeps the broken generation across
    /// restarts (None: in memory only, for tests).
    pub fn new(ttl: Duration, state_dir: Option<&std::path::Path>) -> Grants {
        let file = state_dir.map(|d| d.join(BROKEN_FILE));
        let (broken_upto, broken_round) = file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|s| parse_broken(&s))
            .unwrap_or_default();
        let now = Instant::now();
        Grants {
            ttl,
            file,
            inner: Mutex::new(GrantInner {
                generation: Generation(0),
                since: now,
                granted: false,
                // A grant given before a restart may still run.
                previous_until: now + ttl,
                broken_upto,
                broken_round,
                primary_lsn: 0,
                previous_primary_lsn: 0,
            }),
        }
    }

    /// Whether `generation`'s lease is broken here: an older generation always is once a
    /// newer one was broken; the newest broken one until the intent releases its round.
    fn is_broken(g: &GrantInner, generation: Generation, intent: &Intent) -> bool {
        generation < g.broken_upto
            || (generation == g.broken_upto
                && generation > Generation(0)
                && !intent.lease_break_released(generation, g.broken_round))
    }

    /// The standing break of `generation` here, if any (for status and metrics).
    pub fn standing_break(&self, intent: &Intent) -> Option<(Generation, BreakRound)> {
        let g = self.lock();
        Self::is_broken(&g, g.broken_upto, intent).then_some((g.broken_upto, g.broken_round))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GrantInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the applied intent: a newer generation starts a new count, and whatever was
    /// granted in the older one may run until its grant's end.
    fn follow(&self, g: &mut GrantInner, intent: &Intent, now: Instant) {
        if intent.generation > g.generation {
            g.previous_until = g.previous_until.max(g.since + self.ttl);
            g.previous_primary_lsn = if intent.generation.0 == g.generation.0 + 1 {
                g.primary_lsn
            } else {
                0
            };
            g.primary_lsn = 0;
            g.generation = intent.generation;
            g.since = now;
            g.granted = false;
        }
    }

    /// A renewal from `member` for `generation`, received at `now`, with the primary's
    /// WAL position (0: unknown).
    pub fn renew(
        &self,
        member: &str,
        generation: Generation,
        wal_lsn: u64,
        intent: &Intent,
        now: Instant,
    ) -> Result<(), String> {
        let mut g = self.lock();
        self.follow(&mut g, intent, now);
        if Self::is_broken(&g, generation, intent) {
            return Err(format!(
                "the lease of generation {generation} was broken here (round {})",
                g.broken_round
            ));
        }
        if intent.generation != generation || intent.primary.as_deref() != Some(member) {
            return Err(format!(
                "{member} is not the primary of generation {generation} here (the intent has {:?} at {})",
                intent.primary, intent.generation
            ));
        }
        if !g.granted && !intent.lease_released && now < g.previous_until {
            return Err(format!(
                "the previous primary's lease may run {} ms more here",
                (g.previous_until - now).as_millis()
            ));
        }
        g.since = now;
        g.granted = true;
        g.primary_lsn = g.primary_lsn.max(wal_lsn);
        Ok(())
    }

    /// The highest WAL position the primary of `generation` reported here (0: none).
    pub fn primary_lsn(&self, generation: Generation) -> u64 {
        let g = self.lock();
        if generation == g.generation {
            g.primary_lsn
        } else if generation.0 + 1 == g.generation.0 {
            g.previous_primary_lsn
        } else {
            0
        }
    }

    /// The leader asks to break `member`'s lease of `generation`.
    pub fn break_lease(
        &self,
        member: &str,
        generation: Generation,
        round: BreakRound,
        intent: &Intent,
        now: Instant,
    ) -> BreakOutcome {
        let mut g = self.lock();
        self.follow(&mut g, intent, now);
        if generation < g.broken_upto {
            return BreakOutcome::Broken;
        }
        if Self::is_broken(&g, generation, intent) {
            if round > g.broken_round {
                // Still broken: it now counts until the newer round is released.
                if let Some(f) = &self.file {
                    if let Err(e) = write_durably(f, generation, round) {
                        return BreakOutcome::Refused(format!("recording the break: {e}"));
                    }
                }
                g.broken_round = round;
            }
            return BreakOutcome::Broken;
        }
        if intent.lease_break_released(generation, round) {
            return BreakOutcome::Refused(format!(
                "break round {round} of generation {generation} was already released"
            ));
        }
        let runs_until = if intent.generation > generation {
            // Over here; a grant given just before this voter applied the newer
            // generation may still run.
            g.previous_until
        } else if intent.generation < generation {
            // Not applied here yet, so never granted here: breaking it only means this
            // voter will refuse it once it applies it.
            now
        } else if intent.primary.as_deref() != Some(member) {
            return BreakOutcome::Refused(format!(
                "{member} is not the primary of generation {generation} here (the intent has {:?})",
                intent.primary
            ));
        } else {
            g.since + self.ttl
        };
        if now < runs_until {
            return BreakOutcome::Held {
                remaining: runs_until - now,
            };
        }
        if let Some(f) = &self.file {
            // Durable before it counts: a restarted voter must not grant it again.
            if let Err(e) = write_durably(f, generation, round) {
                return BreakOutcome::Refused(format!("recording the break: {e}"));
            }
        }
        g.broken_upto = generation;
        g.broken_round = round;
        BreakOutcome::Broken
    }
}

/// `GENERATION [TERM SEQ]` (a file without the round, from an older version, names round
/// 0.0: released by any release of that generation).
fn parse_broken(text: &str) -> Option<(Generation, BreakRound)> {
    let mut parts = text.split_whitespace();
    let generation = Generation(parts.next()?.parse().ok()?);
    let term = parts.next().map_or(Some(0), |t| t.parse().ok())?;
    let seq = parts.next().map_or(Some(0), |t| t.parse().ok())?;
    Some((generation, BreakRound { term, seq }))
}

fn write_durably(
    path: &std::path::Path,
    generation: Generation,
    round: BreakRound,
) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{} {} {}", generation.0, round.term, round.seq)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A voter's answer to a renewal.
pub fn handle_renew(shared: &Shared, req: RenewLeaseRequest) -> RenewLeaseResponse {
    let now = Instant::now();
    let refuse = |reason: String| RenewLeaseResponse {
        ok: false,
        leader: String::new(),
        reason,
    };
    if req.cluster != shared.config.cluster {
        return refuse(format!(
            "cluster mismatch: {:?} vs {:?}",
            req.cluster, shared.config.cluster
        ));
    }
    let intent = shared.applied().intent.clone();
    match shared.grants.renew(
        &req.member,
        Generation(req.generation),
        req.wal_lsn,
        &intent,
        now,
    ) {
        Ok(()) => RenewLeaseResponse {
            ok: true,
            leader: String::new(),
            reason: String::new(),
        },
        Err(why) => refuse(why),
    }
}

/// A voter's answer to the leader's request to break a lease.
pub fn handle_break(shared: &Shared, req: BreakLeaseRequest) -> BreakLeaseResponse {
    if req.cluster != shared.config.cluster {
        return BreakLeaseResponse {
            reason: format!(
                "cluster mismatch: {:?} vs {:?}",
                req.cluster, shared.config.cluster
            ),
            ..BreakLeaseResponse::default()
        };
    }
    let intent = shared.applied().intent.clone();
    let generation = Generation(req.generation);
    let round = BreakRound {
        term: req.round_term,
        seq: req.round_seq,
    };
    let outcome =
        shared
            .grants
            .break_lease(&req.member, generation, round, &intent, Instant::now());
    let primary_lsn = shared.grants.primary_lsn(generation);
    let mut resp = match outcome {
        BreakOutcome::Broken => {
            tracing::info!(primary = %req.member, generation = req.generation, "lease broken here");
            BreakLeaseResponse {
                broken: true,
                ..BreakLeaseResponse::default()
            }
        }
        BreakOutcome::Held { remaining } => BreakLeaseResponse {
            remaining_ms: u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX),
            reason: "the grant still runs here".into(),
            ..BreakLeaseResponse::default()
        },
        BreakOutcome::Refused(reason) => BreakLeaseResponse {
            reason,
            ..BreakLeaseResponse::default()
        },
    };
    resp.primary_lsn = primary_lsn;
    resp
}

/// Majority of `n` voters.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// One renewal: sent to every member at once, counted when a majority granted it. On
/// success the member's [`LeaseState`] moves to the send time. Bounded by `timeout`.
pub async fn renew_once(
    shared: &Arc<Shared>,
    generation: Generation,
    timeout: Duration,
) -> Result<(), String> {
    let sent_at = Instant::now();
    let sent_mono_ms = super::watchdog::monotonic_ms();
    let intent = shared.applied().intent.clone();
    let voters: Vec<String> = intent.members.keys().cloned().collect();
    let need = majority(voters.len());
    let req = RenewLeaseRequest {
        cluster: shared.config.cluster.clone(),
        member: shared.name().to_string(),
        generation: generation.0,
        wal_lsn: shared
            .local_wal_lsn
            .load(std::sync::atomic::Ordering::Relaxed),
    };
    let mut granted = 0usize;
    let mut refusals: Vec<String> = Vec::new();
    let mut calls = JoinSet::new();
    for voter in voters {
        if voter == shared.name() {
            let r = handle_renew(shared, req.clone());
            if r.ok {
                granted += 1;
            } else {
                refusals.push(format!("{voter}: {}", r.reason));
            }
            continue;
        }
        let shared = shared.clone();
        let req = req.clone();
        calls.spawn(async move {
            let r = call_renew(&shared, &voter, req, timeout).await;
            (voter, r)
        });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while granted < need {
        match tokio::time::timeout_at(deadline, calls.join_next()).await {
            Ok(Some(Ok((_, Ok(()))))) => granted += 1,
            Ok(Some(Ok((voter, Err(e))))) => refusals.push(format!("{voter}: {e}")),
            Ok(Some(Err(e))) => refusals.push(format!("renewal task: {e}")),
            Ok(None) => break,
            Err(_) => {
                refusals.push("no more answers in time".into());
                break;
            }
        }
    }
    if granted < need {
        return Err(format!(
            "granted by {granted} of {need} needed ({})",
            refusals.join("; ")
        ));
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

async fn call_renew(
    shared: &Shared,
    voter: &str,
    req: RenewLeaseRequest,
    timeout: Duration,
) -> Result<(), String> {
    let channel = shared.dialer.channel(voter).map_err(|e| format!("{e:#}"))?;
    let mut request = Request::new(req);
    request.set_timeout(timeout);
    let resp = tokio::time::timeout(timeout, AgentClient::new(channel).renew_lease(request))
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|s| super::join::describe(&s))?
        .into_inner();
    if resp.ok {
        Ok(())
    } else {
        Err(resp.reason)
    }
}

/// What one break round found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BreakResult {
    /// Members that broke the lease (now or before).
    pub broken_by: Vec<String>,
    /// A majority broke it.
    pub broken: bool,
    /// When not broken: how long until enough of the answering voters' grants run out for
    /// a majority (None: too few answered to tell).
    pub majority_runs_out_in: Option<Duration>,
    /// The highest WAL position the primary reported to any answering voter.
    pub primary_lsn: Option<crate::types::Lsn>,
}

/// The leader asks every member to break `member`'s lease of `generation`; returns as soon
/// as a majority broke it, or a majority answered, or after `timeout`.
pub async fn break_round(
    shared: &Arc<Shared>,
    member: &str,
    generation: Generation,
    round: BreakRound,
    timeout: Duration,
) -> BreakResult {
    let intent = shared.applied().intent.clone();
    let voters: Vec<String> = intent.members.keys().cloned().collect();
    let need = majority(voters.len());
    let req = BreakLeaseRequest {
        cluster: shared.config.cluster.clone(),
        member: member.to_string(),
        generation: generation.0,
        round_term: round.term,
        round_seq: round.seq,
    };
    let mut broken_by = Vec::new();
    let mut held: Vec<Duration> = Vec::new();
    let mut lsn = 0u64;
    let mut calls = JoinSet::new();
    for voter in voters {
        if voter == shared.name() {
            let r = handle_break(shared, req.clone());
            lsn = lsn.max(r.primary_lsn);
            tally(&voter, Ok(r), &mut broken_by, &mut held);
            continue;
        }
        let shared = shared.clone();
        let req = req.clone();
        calls.spawn(async move {
            let r = call_break(&shared, &voter, req, timeout).await;
            (voter, r)
        });
    }
    let mut deadline = tokio::time::Instant::now() + timeout;
    let mut answered_by_majority = false;
    while broken_by.len() < need {
        if !answered_by_majority && broken_by.len() + held.len() >= need {
            // Enough answers to tell when a majority runs out; the rest get a short grace
            // (a partitioned voter must not hold the round until the timeout).
            answered_by_majority = true;
            deadline = deadline.min(tokio::time::Instant::now() + BREAK_GRACE);
        }
        match tokio::time::timeout_at(deadline, calls.join_next()).await {
            Ok(Some(Ok((voter, r)))) => {
                if let Ok(r) = &r {
                    lsn = lsn.max(r.primary_lsn);
                }
                tally(&voter, r, &mut broken_by, &mut held)
            }
            Ok(Some(Err(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let broken = broken_by.len() >= need;
    held.sort();
    let majority_runs_out_in = if broken {
        None
    } else {
        need.checked_sub(broken_by.len() + 1)
            .and_then(|i| held.get(i).copied())
    };
    BreakResult {
        broken_by,
        broken,
        majority_runs_out_in,
        primary_lsn: (lsn > 0).then_some(crate::types::Lsn(lsn)),
    }
}

fn tally(
    voter: &str,
    r: Result<BreakLeaseResponse, String>,
    broken_by: &mut Vec<String>,
    held: &mut Vec<Duration>,
) {
    match r {
        Ok(r) if r.broken => broken_by.push(voter.to_string()),
        Ok(r) if r.remaining_ms > 0 => held.push(Duration::from_millis(r.remaining_ms)),
        Ok(r) => tracing::debug!(%voter, reason = %r.reason, "lease break refused"),
        Err(e) => tracing::debug!(%voter, "lease break: {e}"),
    }
}

async fn call_break(
    shared: &Shared,
    voter: &str,
    req: BreakLeaseRequest,
    timeout: Duration,
) -> Result<BreakLeaseResponse, String> {
    let channel = shared.dialer.channel(voter).map_err(|e| format!("{e:#}"))?;
    let mut request = Request::new(req);
    request.set_timeout(timeout);
    Ok(
        tokio::time::timeout(timeout, AgentClient::new(channel).break_lease(request))
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|s| super::join::describe(&s))?
            .into_inner(),
    )
}

/// The primary's renewal loop; also fences the local Postgres once the lease ran out.
pub async fn run(shared: Arc<Shared>, pg: Option<crate::pg::PgInstance>) {
    let t = &shared.config.timing;
    let mut ticker = tokio::time::interval(t.lease_renew_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    // When this loop first saw this member named primary of a generation.
    let mut named_since: Option<(Generation, Instant)> = None;
    // Whether this loop disarmed the watchdog since it last saw this member primary. It
    // starts false: a deadline armed by a previous agent of this member is disarmed as
    // soon as the applied intent (which may still be catching up at start) names another.
    let mut disarmed = false;
    loop {
        ticker.tick().await;
        let intent = shared.applied().intent.clone();
        if intent.primary.as_deref() != Some(shared.name()) {
            last_error = None;
            named_since = None;
            if !disarmed && pg.is_some() {
                // Not the primary: nothing for the watchdog to enforce.
                match super::watchdog::write(&shared.config.state_dir, None) {
                    Ok(()) => disarmed = true,
                    Err(e) => tracing::warn!("disarming the watchdog: {e}"),
                }
            }
            continue;
        }
        disarmed = false;
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
        // The deadline counts from the send time of the last counted renewal (or when this
        // agent saw itself named primary, when it has none yet: one grace period).
        // The renewal may not run past it: the fence must not wait for slow voters.
        let deadline = shared.lease.last_ok(generation).unwrap_or(started) + t.fence_after;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        // A renewal that started before the deadline may still count: keep trying past
        // it for at most one fence period (a fenced standby-to-be waits for its first).
        let budget = left.max(t.fence_after.min(t.lease_ttl / 2));
        let result = renew_once(&shared, generation, budget.min(t.fence_after)).await;
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
            // first counted renewal (`member::promote`), which voters withhold while the
            // previous primary's lease may still run: that gate, not this deadline, keeps
            // one writer. A probe that fails counts as writable: fence.
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
                "no lease renewal granted by a majority within fence_after: fencing the local Postgres"
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
    use crate::raft::intent::Intent;

    const TTL: Duration = Duration::from_millis(2_000);
    const R1: BreakRound = BreakRound { term: 2, seq: 1 };
    const R2: BreakRound = BreakRound { term: 2, seq: 2 };

    fn released(mut i: Intent, upto: BreakRound) -> Intent {
        i.lease_break_release = Some(crate::raft::intent::LeaseBreakRelease {
            generation: i.generation,
            upto,
        });
        i
    }

    fn intent(primary: &str, generation: u64, released: bool) -> Intent {
        Intent {
            primary: Some(primary.into()),
            generation: Generation(generation),
            lease_released: released,
            ..Intent::default()
        }
    }

    /// Grants that have been running for a while (past the start-up wait).
    fn settled(t0: Instant) -> Grants {
        let g = Grants::new(TTL, None);
        g.lock().previous_until = t0;
        g.lock().since = t0 - TTL;
        g
    }

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
    fn majorities() {
        assert_eq!(majority(1), 1);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(4), 3);
        assert_eq!(majority(5), 3);
    }

    #[test]
    fn a_voter_grants_only_the_intents_primary_of_that_generation() {
        let t0 = Instant::now();
        let g = settled(t0);
        let i = intent("a1", 3, false);
        assert!(g.renew("a1", Generation(3), 0, &i, t0).is_ok());
        let e = g.renew("a2", Generation(3), 0, &i, t0).unwrap_err();
        assert!(e.contains("not the primary"), "{e}");
        let e = g.renew("a1", Generation(2), 0, &i, t0).unwrap_err();
        assert!(e.contains("not the primary"), "{e}");
        // A voter that has not applied the promotion yet refuses too.
        let e = g.renew("a1", Generation(4), 0, &i, t0).unwrap_err();
        assert!(e.contains("not the primary"), "{e}");
    }

    #[test]
    fn a_held_lease_is_not_broken_and_a_run_out_one_is_broken_for_good() {
        let t0 = Instant::now();
        let g = settled(t0);
        let i = intent("a1", 3, false);
        g.renew("a1", Generation(3), 0, &i, t0).unwrap();
        let ms = Duration::from_millis;
        assert_eq!(
            g.break_lease("a1", Generation(3), R1, &i, t0 + ms(500)),
            BreakOutcome::Held {
                remaining: ms(1_500)
            }
        );
        // Renewed later: the grant runs from the last renewal.
        g.renew("a1", Generation(3), 0, &i, t0 + ms(1_000)).unwrap();
        assert_eq!(
            g.break_lease("a1", Generation(3), R1, &i, t0 + ms(2_500)),
            BreakOutcome::Held { remaining: ms(500) }
        );
        assert_eq!(
            g.break_lease("a1", Generation(3), R1, &i, t0 + ms(3_000)),
            BreakOutcome::Broken
        );
        // Sticky: the primary cannot renew that generation here any more.
        let e = g
            .renew("a1", Generation(3), 0, &i, t0 + ms(3_001))
            .unwrap_err();
        assert!(e.contains("broken"), "{e}");
        assert_eq!(
            g.break_lease("a1", Generation(3), R1, &i, t0 + ms(3_002)),
            BreakOutcome::Broken
        );
    }

    #[test]
    fn an_expired_but_unbroken_grant_may_be_renewed() {
        let t0 = Instant::now();
        let g = settled(t0);
        let i = intent("a1", 3, false);
        g.renew("a1", Generation(3), 0, &i, t0).unwrap();
        assert!(g
            .renew("a1", Generation(3), 0, &i, t0 + Duration::from_secs(10))
            .is_ok());
    }

    #[test]
    fn a_new_primary_waits_out_the_old_grant_unless_it_was_released() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let g = settled(t0);
        let old = intent("a1", 3, false);
        g.renew("a1", Generation(3), 0, &old, t0).unwrap();
        // A forced promotion: the old grant may run until t0 + TTL here.
        let new = intent("a2", 4, false);
        let e = g
            .renew("a2", Generation(4), 0, &new, t0 + ms(100))
            .unwrap_err();
        assert!(e.contains("previous primary"), "{e}");
        // The old primary is refused at once in the new generation.
        assert!(g.renew("a1", Generation(3), 0, &new, t0 + ms(100)).is_err());
        assert!(g.renew("a2", Generation(4), 0, &new, t0 + TTL).is_ok());

        // Released (a majority broke the old lease): granted at once.
        let g = settled(t0);
        g.renew("a1", Generation(3), 0, &old, t0).unwrap();
        let released = intent("a2", 4, true);
        assert!(g
            .renew("a2", Generation(4), 0, &released, t0 + ms(100))
            .is_ok());
    }

    #[test]
    fn breaking_an_older_generation_waits_for_its_last_grant() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let g = settled(t0);
        g.renew("a1", Generation(3), 0, &intent("a1", 3, false), t0)
            .unwrap();
        let newer = intent("a2", 4, false);
        assert_eq!(
            g.break_lease("a1", Generation(3), R1, &newer, t0 + ms(400)),
            BreakOutcome::Held {
                remaining: ms(1_600)
            }
        );
        assert_eq!(
            g.break_lease("a1", Generation(3), R1, &newer, t0 + TTL),
            BreakOutcome::Broken
        );
        // A generation this voter has not applied yet was never granted here.
        let lagging = intent("a1", 3, false);
        assert_eq!(
            g.break_lease("a2", Generation(5), R1, &lagging, t0 + TTL),
            BreakOutcome::Broken
        );
        let e = g
            .renew("a2", Generation(5), 0, &intent("a2", 5, true), t0 + TTL)
            .unwrap_err();
        assert!(e.contains("broken"), "{e}");
    }

    #[test]
    fn voters_keep_the_highest_wal_position_per_generation() {
        let t0 = Instant::now();
        let g = settled(t0);
        let i3 = intent("a1", 3, false);
        g.renew("a1", Generation(3), 500, &i3, t0).unwrap();
        g.renew("a1", Generation(3), 0, &i3, t0).unwrap();
        assert_eq!(g.primary_lsn(Generation(3)), 500);
        // A refused renewal records nothing.
        assert!(g.renew("a2", Generation(3), 900, &i3, t0).is_err());
        assert_eq!(g.primary_lsn(Generation(3)), 500);
        // The next generation keeps the previous one's for the leader's break round.
        let i4 = intent("a2", 4, true);
        g.renew("a2", Generation(4), 700, &i4, t0).unwrap();
        assert_eq!(g.primary_lsn(Generation(4)), 700);
        assert_eq!(g.primary_lsn(Generation(3)), 500);
        assert_eq!(g.primary_lsn(Generation(2)), 0);
    }

    #[test]
    fn a_restarted_voter_counts_as_having_just_granted() {
        let t0 = Instant::now();
        let g = Grants::new(TTL, None);
        let i = intent("a1", 3, false);
        assert!(matches!(
            g.break_lease("a1", Generation(3), R1, &i, t0),
            BreakOutcome::Held { .. }
        ));
        // Nor does it grant a primary whose predecessor it may have granted before.
        assert!(g.renew("a1", Generation(3), 0, &i, t0).is_err());
        assert!(g.renew("a1", Generation(3), 0, &i, t0 + TTL * 2).is_ok());
    }

    #[test]
    fn a_break_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let i = intent("a1", 3, false);
        {
            let g = Grants::new(TTL, Some(dir.path()));
            g.lock().previous_until = t0;
            g.lock().since = t0 - TTL;
            g.lock().generation = Generation(3);
            assert_eq!(
                g.break_lease("a1", Generation(3), R1, &i, t0),
                BreakOutcome::Broken
            );
        }
        let g = Grants::new(TTL, Some(dir.path()));
        let e = g
            .renew("a1", Generation(3), 0, &i, t0 + TTL * 3)
            .unwrap_err();
        assert!(e.contains("broken"), "{e}");
    }

    #[test]
    fn a_break_no_promotion_followed_is_released_through_the_intent() {
        let t0 = Instant::now();
        let g = settled(t0);
        let i = intent("a1", 3, false);
        let ms = Duration::from_millis;
        g.renew("a1", Generation(3), 0, &i, t0).unwrap();
        assert_eq!(
            g.break_lease("a1", Generation(3), R1, &i, t0 + ms(3_000)),
            BreakOutcome::Broken
        );
        assert_eq!(g.standing_break(&i), Some((Generation(3), R1)));
        assert!(g.renew("a1", Generation(3), 0, &i, t0 + ms(3_100)).is_err());
        // The cluster released round R1 (no promotion followed): the primary may renew.
        let i = released(i, R1);
        assert_eq!(g.standing_break(&i), None);
        g.renew("a1", Generation(3), 0, &i, t0 + ms(3_200)).unwrap();
        // A late request of the released round breaks nothing.
        assert!(matches!(
            g.break_lease("a1", Generation(3), R1, &i, t0 + ms(9_000)),
            BreakOutcome::Refused(_)
        ));
        // A new round breaks it again once the grant ran out.
        assert_eq!(
            g.break_lease("a1", Generation(3), R2, &i, t0 + ms(5_300)),
            BreakOutcome::Broken
        );
        assert!(g.renew("a1", Generation(3), 0, &i, t0 + ms(5_400)).is_err());
    }

    #[test]
    fn a_break_renewed_by_a_newer_round_outlives_the_release_of_the_older() {
        let t0 = Instant::now();
        let g = settled(t0);
        let i = intent("a1", 3, false);
        let ms = Duration::from_millis;
        g.renew("a1", Generation(3), 0, &i, t0).unwrap();
        assert_eq!(
            g.break_lease("a1", Generation(3), R1, &i, t0 + ms(3_000)),
            BreakOutcome::Broken
        );
        assert_eq!(
            g.break_lease("a1", Generation(3), R2, &i, t0 + ms(3_500)),
            BreakOutcome::Broken
        );
        let i = released(i, R1);
        assert_eq!(g.standing_break(&i), Some((Generation(3), R2)));
        assert!(g.renew("a1", Generation(3), 0, &i, t0 + ms(3_600)).is_err());
    }

    #[test]
    fn a_break_and_its_round_survive_a_restart_and_old_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let i = intent("a1", 3, false);
        {
            let g = Grants::new(TTL, Some(dir.path()));
            g.lock().previous_until = t0;
            g.lock().since = t0 - TTL;
            g.lock().generation = Generation(3);
            assert_eq!(
                g.break_lease("a1", Generation(3), R2, &i, t0),
                BreakOutcome::Broken
            );
        }
        let g = Grants::new(TTL, Some(dir.path()));
        assert_eq!(g.standing_break(&i), Some((Generation(3), R2)));
        assert_eq!(
            g.standing_break(&released(i.clone(), R1)),
            Some((Generation(3), R2))
        );
        assert_eq!(g.standing_break(&released(i, R2)), None);
        assert_eq!(
            parse_broken("7\n"),
            Some((Generation(7), BreakRound::default()))
        );
        assert_eq!(
            parse_broken("7 3 9\n"),
            Some((Generation(7), BreakRound { term: 3, seq: 9 }))
        );
        assert_eq!(parse_broken("x"), None);
    }
}
