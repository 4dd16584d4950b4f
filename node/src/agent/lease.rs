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
use meridian_core::lease::{BreakDecision, VoterLease};

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

/// Voter side of the lease: the pure [`VoterLease`] on this member's monotonic clock
/// (milliseconds since `epoch`), plus the file that keeps a break across restarts.
pub struct Grants {
    epoch: Instant,
    file: Option<PathBuf>,
    inner: Mutex<VoterLease>,
}

impl Grants {
    /// Grants for a voter starting now. `state_dir` keeps the broken generation across
    /// restarts (None: in memory only, for tests).
    pub fn new(ttl: Duration, state_dir: Option<&std::path::Path>) -> Grants {
        let file = state_dir.map(|d| d.join(BROKEN_FILE));
        let broken = file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|s| parse_broken(&s));
        // The epoch lies one day back so that instants a little before the start (tests
        // build grants "given long ago") stay representable.
        let now = Instant::now();
        let epoch = now.checked_sub(EPOCH_BACK).unwrap_or(now);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        Grants {
            epoch,
            file,
            inner: Mutex::new(VoterLease::new(ttl_ms, ms_since(epoch, now), broken)),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        ms_since(self.epoch, at)
    }

    /// The standing break of `generation` here, if any (for status and metrics).
    pub fn standing_break(&self, intent: &Intent) -> Option<(Generation, BreakRound)> {
        self.lock().standing_break(intent)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VoterLease> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
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
        let now_ms = self.ms(now);
        self.lock()
            .renew(member, generation, wal_lsn, intent, now_ms)
            .map_err(|r| r.to_string())
    }

    /// The highest WAL position the primary of `generation` reported here (0: none).
    pub fn primary_lsn(&self, generation: Generation) -> u64 {
        self.lock().primary_lsn(generation)
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
        let now_ms = self.ms(now);
        let mut g = self.lock();
        match g.decide_break(member, generation, round, intent, now_ms) {
            BreakDecision::AlreadyBroken => BreakOutcome::Broken,
            BreakDecision::Held { remaining_ms } => BreakOutcome::Held {
                remaining: Duration::from_millis(remaining_ms),
            },
            BreakDecision::Refused(why) => BreakOutcome::Refused(why),
            BreakDecision::Record { generation, round } => {
                if let Some(f) = &self.file {
                    // Durable before it counts: a restarted voter must not grant it again.
                    if let Err(e) = write_durably(f, generation, round) {
                        return BreakOutcome::Refused(format!("recording the break: {e}"));
                    }
                }
                g.record_break(generation, round);
                BreakOutcome::Broken
            }
        }
    }
}

/// How far back [`Grants`] puts its clock's epoch.
const EPOCH_BACK: Duration = Duration::from_secs(86_400);

fn ms_since(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
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
    // The shared snapshot, not a deep copy: the history alone holds up to 1,000 entries.
    let applied_now = shared.applied();
    let intent = &applied_now.intent;
    match shared.grants.renew(
        &req.member,
        Generation(req.generation),
        req.wal_lsn,
        intent,
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

/// After this voter broke `primary`'s lease: a local standby stops confirming its WAL
/// before the answer counts (sim finding F7: a thawed primary's waiting commits were
/// confirmed by a sync standby after the promotion was decided). Bounded; a Postgres that
/// is down or frozen confirms nothing anyway, so a failure only logs.
///
/// Once the receiver is off (on a running Postgres), `Shared::receiver_off` records the
/// break's generation and round: the reporter names them, and a sync standby's position
/// counts for a promotion only with them (sim finding F7b).
pub async fn stop_confirming(
    shared: &Shared,
    primary: &str,
    generation: Generation,
    round: BreakRound,
) {
    const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    if primary == shared.name() || shared.applied().intent.primary.as_deref() != Some(primary) {
        return;
    }
    let Some(pg) = shared.local_pg.get() else {
        return;
    };
    // A stopped server confirms nothing now, but its configuration still points at the
    // primary: only a running one that was disconnected says so.
    let running = pg.is_running();
    match tokio::time::timeout(DISCONNECT_TIMEOUT, pg.disconnect_upstream()).await {
        Ok(Ok(())) => {
            if running {
                let mut off = shared
                    .receiver_off
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if off.is_none_or(|(g, r)| (g, r) < (generation, round)) {
                    *off = Some((generation, round));
                }
            }
            tracing::info!(%primary, "lease broken here: WAL receiver disconnected from it")
        }
        Ok(Err(e)) => {
            tracing::warn!(%primary, "disconnecting the WAL receiver after a lease break: {e}")
        }
        Err(_) => tracing::warn!(
            %primary,
            "disconnecting the WAL receiver after a lease break: no answer within {} ms",
            DISCONNECT_TIMEOUT.as_millis()
        ),
    }
}

pub use meridian_core::lease::majority;

/// The members a lease majority is counted over (sorted): the intent's members that are
/// Raft voters. A member the intent already names but that has not been admitted as a
/// voter (its agent may not even run yet) would grow the majority before it can grant:
/// with one member down, adding one would fence the primary (#12, defect 8). Membership
/// moves one voter at a time, and a change is proposed only once the primary reported
/// this set for the last one ([`meridian_core::lease::membership_change_may_proceed`]),
/// so the primary's count and a breaker's differ by at most one member and their
/// majorities intersect.
pub fn lease_voters(shared: &Shared, intent: &Intent) -> Vec<String> {
    let metrics = shared.raft_metrics();
    let membership = metrics.membership_config.membership();
    let voter_names: std::collections::BTreeSet<String> = membership
        .voter_ids()
        .filter_map(|id| membership.get_node(&id).map(|n| n.name.clone()))
        .collect();
    voters_among(intent, &voter_names)
}

/// [`lease_voters`]' rule: the intent's members that are voters; all of the intent's
/// members when no voter is known yet (a Raft membership not loaded).
fn voters_among(intent: &Intent, voter_names: &std::collections::BTreeSet<String>) -> Vec<String> {
    if voter_names.is_empty() {
        return intent.members.keys().cloned().collect();
    }
    intent
        .members
        .keys()
        .filter(|n| voter_names.contains(*n))
        .cloned()
        .collect()
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
    let voters = lease_voters(shared, &intent);
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

/// The request to break `member`'s lease of `generation` in `round`.
fn break_request(
    shared: &Shared,
    member: &str,
    generation: Generation,
    round: BreakRound,
) -> BreakLeaseRequest {
    BreakLeaseRequest {
        cluster: shared.config.cluster.clone(),
        member: member.to_string(),
        generation: generation.0,
        round_term: round.term,
        round_seq: round.seq,
    }
}

/// The leader asks every member to break `member`'s lease of `generation`; returns as soon
/// as a majority broke it, or a majority answered, or after `timeout`. The calls still
/// running then go on in the background (bounded by `timeout`).
pub async fn break_round(
    shared: &Arc<Shared>,
    member: &str,
    generation: Generation,
    round: BreakRound,
    timeout: Duration,
) -> BreakResult {
    let intent = shared.applied().intent.clone();
    let voters = lease_voters(shared, &intent);
    let voters_n = voters.len();
    let need = majority(voters_n);
    let req = break_request(shared, member, generation, round);
    let mut broken_by = Vec::new();
    let mut held: Vec<Duration> = Vec::new();
    let mut lsn = 0u64;
    let mut calls = JoinSet::new();
    for voter in voters {
        if voter == shared.name() {
            let r = handle_break(shared, req.clone());
            if r.broken {
                stop_confirming(shared, member, generation, round).await;
            }
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
    // The rest still get the request (bounded by `timeout`): a sync standby that breaks
    // late stops confirming, and its next report says so (sim F7b).
    calls.detach_all();
    let broken = broken_by.len() >= need;
    let held_ms = held
        .iter()
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .collect();
    let majority_runs_out_in =
        meridian_core::lease::majority_runs_out_in_ms(broken_by.len(), held_ms, voters_n)
            .map(Duration::from_millis);
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

/// Asks every voter again to break `member`'s lease in the standing broken `round`,
/// without waiting for the answers: a voter that missed the round (or whose Postgres was
/// down then) stops confirming the old primary's WAL, and its next report says so. Each
/// call is bounded by `timeout`.
pub async fn ask_again(
    shared: &Arc<Shared>,
    member: &str,
    generation: Generation,
    round: BreakRound,
    timeout: Duration,
) {
    let intent = shared.applied().intent.clone();
    let req = break_request(shared, member, generation, round);
    let mut calls = JoinSet::new();
    for voter in lease_voters(shared, &intent) {
        if voter == shared.name() {
            if handle_break(shared, req.clone()).broken {
                stop_confirming(shared, member, generation, round).await;
            }
            continue;
        }
        let shared = shared.clone();
        let req = req.clone();
        calls.spawn(async move { call_break(&shared, &voter, req, timeout).await });
    }
    calls.detach_all();
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
        // The shared snapshot, not a deep copy: the history alone holds up to 1,000 entries.
        let applied_now = shared.applied();
        let intent = &applied_now.intent;
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
        let fence_in = fence_offset(t);
        let deadline = shared.lease.last_ok(generation).unwrap_or(started) + fence_in;
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
        if since.elapsed() < fence_in {
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

/// How long after the send time of the last counted renewal the primary must fence
/// (`meridian_core::lease::fence_deadline_ms`).
fn fence_offset(t: &crate::config::TimingConfig) -> Duration {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(meridian_core::lease::fence_deadline_ms(
        0,
        ms(t.fence_after),
        ms(t.lease_ttl),
    ))
}

/// Whether a Postgres past its fence deadline must be fenced, given whether it is in
/// recovery (`None`: unknown, it did not answer). Only a server that may take writes needs
/// it; not knowing counts as writable.
fn needs_fence(in_recovery: Option<bool>) -> bool {
    in_recovery != Some(true)
}

#[cfg(test)]
mod tests {
    //! The grant and break arithmetic is tested exactly in `meridian_core::lease`; these
    //! tests cover what the runtime adds: the real clock, the durable break file.
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

    /// Grants whose last grant of generation 3 ran out long before `t0`.
    fn run_out(g: &Grants, t0: Instant) {
        let t0_ms = g.ms(t0);
        let mut v = g.lock();
        v.previous_until_ms = t0_ms;
        v.since_ms = t0_ms - TTL.as_millis() as u64;
        v.generation = Generation(3);
    }

    #[test]
    fn a_member_not_yet_a_voter_does_not_grow_the_lease_majority() {
        let mut i = intent("a", 1, false);
        for n in ["a", "b", "c", "d"] {
            i.members.insert(
                n.to_string(),
                crate::raft::intent::Member {
                    name: n.to_string(),
                    id: crate::types::MemberId(i.members.len() as u64 + 1),
                    region: "r".into(),
                    kind: crate::raft::intent::MemberKind::Data,
                    tags: Default::default(),
                },
            );
        }
        let voters: std::collections::BTreeSet<String> =
            ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let v = voters_among(&i, &voters);
        assert_eq!(v, vec!["a", "b", "c"], "d is added but not admitted");
        assert_eq!(majority(v.len()), 2);
        assert_eq!(voters_among(&i, &Default::default()).len(), i.members.len());
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
    fn grants_count_on_the_real_clock() {
        let t0 = Instant::now();
        let g = Grants::new(TTL, None);
        let i = intent("a1", 3, false);
        // A restarted voter counts as having just granted.
        assert!(matches!(
            g.break_lease("a1", Generation(3), R1, &i, t0),
            BreakOutcome::Held { .. }
        ));
        assert!(g.renew("a1", Generation(3), 0, &i, t0).is_err());
        assert!(g.renew("a1", Generation(3), 0, &i, t0 + TTL * 2).is_ok());
        assert_eq!(
            g.break_lease("a1", Generation(3), R1, &i, t0 + TTL * 2 + TTL / 4),
            BreakOutcome::Held {
                remaining: TTL - TTL / 4
            }
        );
        let e = g.renew("a2", Generation(3), 0, &i, t0).unwrap_err();
        assert!(e.contains("not the primary"), "{e}");
    }

    #[test]
    fn a_break_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let i = intent("a1", 3, false);
        {
            let g = Grants::new(TTL, Some(dir.path()));
            run_out(&g, t0);
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
    fn a_break_and_its_round_survive_a_restart_and_old_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let i = intent("a1", 3, false);
        {
            let g = Grants::new(TTL, Some(dir.path()));
            run_out(&g, t0);
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
