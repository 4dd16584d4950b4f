//! The simulated world: members (agent + Raft + Postgres on one host), the network between
//! them, the client writers, and the checker. Time advances in fixed steps of
//! [`timing::TICK_MS`]; within a step, messages due are delivered in (time, send order),
//! then every live agent acts on its own drifting clock, then Postgres replicates and the
//! clients commit. Randomness comes only from the scenario's seeded generator, so a run is
//! exactly reproducible.
//!
//! The decisions are the real ones: `Intent::apply` for every committed entry,
//! `decide::decide` on the leader, `lease::VoterLease` on every voter,
//! `lease::fence_deadline_ms` on the primary and `plan::plan` on every member. What is
//! simulated instead of real is listed with each part below; the runtime glue that has no
//! pure owner yet (building a `Promote` from an action, releasing stale lease breaks,
//! resuming in place) follows `node/src/agent/leader.rs`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::rc::Rc;

use meridian_core::decide::{
    cluster_view, decide, primary_stop_token, Action, LeaderBookkeeping, LeaseView, Limits,
    Observation, PeerProbe, PromoteReason, SyncSet,
};
use meridian_core::intent::{
    BreakRound, Command, Intent, MemberTags, Promote, PromotionKind, Response,
};
use meridian_core::lease::{self, BreakDecision, VoterLease};
use meridian_core::plan::{self, LocalObserved, MemberIntent, PlanLimits, Probe, Step};
use meridian_core::types::{Generation, Lsn, MemberKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::scenario::{timing::*, FaultKind, Scenario};
use crate::{Invariant, Violation};

/// What one run found.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub seed: u64,
    pub violations: Vec<Violation>,
    /// The trace (only when asked for).
    pub trace: Vec<String>,
    /// Commits acknowledged to clients.
    pub acked: usize,
    /// Acknowledged commits missing from the final primary where no zero-loss policy
    /// covered them (the policy allowed the loss).
    pub allowed_loss: usize,
    pub failovers: u64,
    /// Simulated ms from the heal to the first converged step (None: never converged).
    pub converged_after_ms: Option<u64>,
    /// The longest simulated time without an acknowledged commit between the first
    /// fault's start and the heal (writes unavailable for that long).
    pub longest_write_gap_ms: u64,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

// ------------------------------------------------------------------------------ messages

#[derive(Clone, Debug)]
struct Entry {
    term: u64,
    /// None: the blank entry a new leader commits first.
    cmd: Option<Command>,
}

#[derive(Clone, Debug)]
enum Msg {
    Append {
        term: u64,
        log: Rc<Vec<Entry>>,
        commit: usize,
    },
    AppendResp {
        term: u64,
        match_len: usize,
        ok: bool,
    },
    Vote {
        term: u64,
        last_term: u64,
        len: usize,
    },
    VoteResp {
        term: u64,
        granted: bool,
    },
    Report {
        obs: Box<Observation>,
    },
    ReportAck {
        /// `decide::primary_stop_token` at the leader when it accepted the report.
        primary_stopped: Option<Generation>,
    },
    Renew {
        generation: Generation,
        wal_lsn: u64,
        req: u64,
    },
    RenewResp {
        req: u64,
        ok: bool,
    },
    Break {
        member: String,
        generation: Generation,
        round: BreakRound,
        id: u64,
    },
    BreakResp {
        id: u64,
        broken: bool,
        remaining_ms: u64,
        primary_lsn: u64,
    },
}

struct InFlight {
    from: usize,
    to: usize,
    msg: Msg,
}

// ------------------------------------------------------------------------------ postgres

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PgOp {
    Start,
    Promote,
    Fence,
    Rewind(usize),
    Resume,
}

/// A simulated Postgres: the WAL as a list of (commit id, timeline), a fence mark,
/// `synchronous_standby_names`, and the operation in progress (they take time).
#[derive(Clone, Debug, Default)]
struct Pg {
    running: bool,
    in_recovery: bool,
    fenced: bool,
    standby_signal: bool,
    wal: Vec<(u64, u32)>,
    timeline: u32,
    upstream: Option<usize>,
    streaming: bool,
    streamed_timeline: Option<u32>,
    sync: SyncSet,
    /// The generation this server took writes in (promotion, start or resume).
    writer_generation: Generation,
    /// Commits waiting for their sync acknowledgements: (wal position, id).
    pending: Vec<(usize, u64)>,
    op: Option<(PgOp, u64)>,
    /// The intent's generation when the operation in progress started.
    op_generation: Generation,
    /// Bumped at every stop: a SIGSTOP hits the processes running when it is sent, not a
    /// server started later.
    incarnation: u64,
}

impl Pg {
    fn writable(&self) -> bool {
        self.running && !self.in_recovery && !self.fenced
    }

    fn lsn(&self) -> u64 {
        self.wal.len() as u64
    }

    fn stop(&mut self) {
        self.incarnation += 1;
        self.running = false;
        self.streaming = false;
        self.pending.clear();
    }
}

// ------------------------------------------------------------------------------ members

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Follower,
    Candidate,
    Leader,
}

/// The break round in flight.
#[derive(Clone, Debug, Default)]
struct RunningRound {
    id: u64,
    deadline: u64,
    broken_by: BTreeSet<usize>,
    /// Remaining grant times of the voters that hold the lease.
    held_ms: Vec<u64>,
    primary_lsn: u64,
    /// A majority answered: the rest get a short grace only.
    graced: bool,
}

/// A break round the leader runs.
#[derive(Clone, Debug, Default)]
struct BreakTrack {
    key: Option<(String, Generation)>,
    seq: u64,
    round: Option<(BreakRound, u64)>,
    running: Option<RunningRound>,
    last: Option<LeaseView>,
    next_at: u64,
    /// When a broken round may be asked again (re-asks are spaced by `REASK_MS`).
    reask_at: u64,
    breaks_since_release: Option<(BreakRound, u64)>,
}

/// Spacing of the re-asks of a broken round (`node`'s `REASK_SPACING`).
const REASK_MS: u64 = 250;

/// The leader's runtime bookkeeping (local clock).
#[derive(Clone, Debug, Default)]
struct LeaderState {
    elected_at: u64,
    generation: Option<(Generation, u64)>,
    observations: BTreeMap<String, Observation>,
    brk: BreakTrack,
    next_round: u64,
    next_heartbeat: u64,
    match_len: BTreeMap<usize, usize>,
}

struct Member {
    name: &'static str,
    data: bool,
    drift_ppm: i64,
    // Durable.
    term: u64,
    voted_for: Option<(u64, usize)>,
    /// Shared with the messages that carry it; copied on write.
    log: Rc<Vec<Entry>>,
    intent: Intent,
    applied: usize,
    broken_record: Option<(Generation, BreakRound)>,
    pg: Pg,
    // Volatile (lost at a crash).
    role: Role,
    commit: usize,
    leader: Option<usize>,
    election_at: u64,
    votes: BTreeSet<usize>,
    leader_state: Option<LeaderState>,
    grants: VoterLease,
    lease: Option<(u64, Generation)>,
    named_since: Option<(Generation, u64)>,
    renewals: BTreeMap<u64, (u64, Generation, BTreeSet<usize>)>,
    next_renew: u64,
    next_report: u64,
    next_plan: u64,
    seen_primary_up: bool,
    unresponsive_since: Option<u64>,
    not_streaming_since: Option<u64>,
    /// The generation whose resume in place this agent took or gave up (durable, like
    /// `node`'s `state_dir/resume-spent`).
    resume_spent: Option<Generation>,
    /// Since when (local clock) the agent waits, fenced, to resume in that generation.
    resume_wait_since: Option<(Generation, u64)>,
    disconnected: bool,
    /// Like `node`'s `Shared::receiver_off`: the break (generation, round) after which the
    /// WAL receiver went off; cleared when it is pointed anywhere again.
    receiver_off: Option<(Generation, BreakRound)>,
    /// The newest stopped-primary token of the leader's answers to this agent's reports.
    primary_stop_token: Option<Generation>,
    watchdog_deadline: Option<u64>,
    /// Paused processes and crash state.
    agent_paused: bool,
    pg_paused: bool,
    crashed: bool,
    /// The agent acts again only from this true time (resume latency after SIGCONT).
    agent_wakes_at: u64,
}

impl Member {
    fn local(&self, now: u64) -> u64 {
        // Offset so that no local clock is near 0 (bounds count from the start).
        let scaled = (now as i128 * (1_000_000 + self.drift_ppm as i128)) / 1_000_000;
        100_000 + scaled as u64
    }

    fn agent_alive(&self) -> bool {
        !self.crashed && !self.agent_paused
    }
}

// ------------------------------------------------------------------------------ the world

struct Ack {
    id: u64,
    member: usize,
    covered: bool,
    at_ms: u64,
}

struct World<'s> {
    sc: &'s Scenario,
    rng: ChaCha8Rng,
    now: u64,
    members: Vec<Member>,
    queue: BTreeMap<(u64, u64), InFlight>,
    seq: u64,
    next_id: u64,
    next_timeline: u32,
    cut: HashSet<(usize, usize)>,
    extra_latency: Vec<u64>,
    acks: Vec<Ack>,
    /// Last step any member acknowledged, and who; the highest writer generation acked.
    last_ack: Option<(u64, usize)>,
    max_ack_generation: Generation,
    violations: Vec<Violation>,
    trace: Option<Vec<String>>,
    failovers: u64,
    converged_at: Option<u64>,
    allowed_loss: usize,
    /// The Postgres incarnation each Postgres-pausing fault froze (by fault index).
    frozen: BTreeMap<usize, u64>,
}

/// Runs one scenario; `trace` keeps a human-readable trace of the run.
pub fn run(sc: &Scenario, trace: bool) -> Outcome {
    let mut w = World::new(sc, trace);
    while w.now < sc.end_ms {
        w.step();
        if w.violations
            .iter()
            .any(|v| v.invariant != Invariant::Converges)
        {
            break;
        }
    }
    w.finish()
}

impl<'s> World<'s> {
    fn new(sc: &'s Scenario, trace: bool) -> World<'s> {
        let mut rng = ChaCha8Rng::seed_from_u64(sc.seed ^ 0x5eed_5eed_5eed_5eed);
        let topo = sc.topology.members();
        // The cluster as bootstrap left it: every member added, the first data member
        // promoted, every other data member a streaming standby of it.
        let mut intent = Intent::default();
        for (name, region, data) in topo {
            let cmd = Command::AddMember {
                name: name.to_string(),
                region: region.to_string(),
                kind: if *data {
                    MemberKind::Data
                } else {
                    MemberKind::Witness
                },
                tags: MemberTags::default(),
                at_unix_ms: 0,
            };
            assert!(!matches!(intent.apply(&cmd), Response::Refused(_)));
        }
        let set_policy = Command::SetPolicy {
            policy: sc.policy.clone(),
            reason: "scenario".into(),
            at_unix_ms: 0,
            expected_version: None,
        };
        assert!(!matches!(intent.apply(&set_policy), Response::Refused(_)));
        let boot = Command::Promote(Promote {
            member: topo[0].0.to_string(),
            generation: Generation(1),
            kind: PromotionKind::Bootstrap,
            force: false,
            reason: "bootstrap".into(),
            at_unix_ms: 0,
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: None,
            old_lease_released: true,
            lease_break_round: None,
        });
        assert!(!matches!(intent.apply(&boot), Response::Refused(_)));
        // Settled: the sync set recorded and applied (every standby, ANY 1), unless the
        // policy is async (the leader then empties it on its first rounds).
        let async_policy = sc
            .policy
            .regions
            .values()
            .any(|r| r.mode == meridian_core::policy::SyncMode::Async);
        let initial_sync = if async_policy {
            SyncSet::default()
        } else {
            SyncSet::new(
                topo.iter().skip(1).filter(|m| m.2).map(|m| m.0.to_string()),
                1,
            )
        };
        for cmd in [
            Command::RecordSyncSet {
                generation: Generation(1),
                set: initial_sync.clone(),
                degraded: false,
                degraded_until_lsn: None,
            },
            Command::SetSyncTarget {
                generation: Generation(1),
                set: initial_sync.clone(),
            },
        ] {
            assert!(
                !matches!(intent.apply(&cmd), Response::Refused(_)),
                "{cmd:?}"
            );
        }
        let log: Rc<Vec<Entry>> = Rc::new(Vec::new());
        let members = topo
            .iter()
            .enumerate()
            .map(|(i, (name, _, data))| {
                let pg = Pg {
                    sync: if i == 0 {
                        initial_sync.clone()
                    } else {
                        SyncSet::default()
                    },
                    running: *data,
                    in_recovery: i != 0,
                    standby_signal: i != 0,
                    timeline: 1,
                    upstream: (i != 0).then_some(0),
                    writer_generation: Generation(1),
                    ..Pg::default()
                };
                let mut m = Member {
                    name,
                    data: *data,
                    drift_ppm: sc.drift_ppm[i],
                    term: 1,
                    voted_for: None,
                    log: log.clone(),
                    intent: intent.clone(),
                    applied: 0,
                    broken_record: None,
                    pg: if *data { pg } else { Pg::default() },
                    role: Role::Follower,
                    commit: 0,
                    leader: None,
                    election_at: 0,
                    votes: BTreeSet::new(),
                    leader_state: None,
                    grants: VoterLease::new(LEASE_TTL_MS, 0, None),
                    lease: None,
                    named_since: None,
                    renewals: BTreeMap::new(),
                    next_renew: 0,
                    next_report: 0,
                    next_plan: 0,
                    receiver_off: None,
                    primary_stop_token: None,
                    seen_primary_up: i == 0,
                    unresponsive_since: None,
                    not_streaming_since: None,
                    resume_spent: None,
                    resume_wait_since: None,
                    disconnected: false,
                    watchdog_deadline: None,
                    agent_paused: false,
                    pg_paused: false,
                    crashed: false,
                    agent_wakes_at: 0,
                };
                let l0 = m.local(0);
                m.grants = VoterLease::new(LEASE_TTL_MS, l0, None);
                // Past the start-up wait: the bootstrap primary may renew at once.
                m.grants.previous_until_ms = l0;
                m.election_at = l0 + rng.random_range(ELECTION_MIN_MS..ELECTION_MAX_MS);
                m.lease = (i == 0).then_some((l0, Generation(1)));
                m.named_since = (i == 0).then_some((Generation(1), l0));
                m
            })
            .collect();
        let n = topo.len();
        World {
            sc,
            rng,
            now: 0,
            members,
            queue: BTreeMap::new(),
            seq: 0,
            next_id: 1,
            next_timeline: 2,
            cut: HashSet::new(),
            extra_latency: vec![0; n],
            acks: Vec::new(),
            last_ack: None,
            max_ack_generation: Generation(0),
            violations: Vec::new(),
            trace: trace.then(Vec::new),
            failovers: 0,
            converged_at: None,
            allowed_loss: 0,
            frozen: BTreeMap::new(),
        }
    }

    fn log(&mut self, what: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            t.push(format!("{:>6} ms  {}", self.now, what()));
        }
    }

    fn violate(&mut self, invariant: Invariant, detail: String) {
        self.log(|| format!("VIOLATION {invariant}: {detail}"));
        self.violations.push(Violation {
            invariant,
            at_ms: self.now,
            detail,
        });
    }

    fn n(&self) -> usize {
        self.members.len()
    }

    fn idx(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    // -------------------------------------------------------------------------- network

    fn link_up(&self, a: usize, b: usize) -> bool {
        a == b
            || (!self.cut.contains(&(a, b)) && !self.members[a].crashed && !self.members[b].crashed)
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if from == to {
            self.seq += 1;
            let seq = self.seq;
            self.queue
                .insert((self.now, seq), InFlight { from, to, msg });
            return;
        }
        if !self.link_up(from, to) {
            return;
        }
        if self.sc.loss_permille > 0 && self.rng.random_range(0..1000) < self.sc.loss_permille {
            return;
        }
        let base = self.sc.latency_ms[from][to] + self.extra_latency[from] + self.extra_latency[to];
        let jitter = self.rng.random_range(0..=base / 4 + 1);
        let at = self.now + base + jitter;
        self.seq += 1;
        let seq = self.seq;
        self.queue.insert((at, seq), InFlight { from, to, msg });
    }

    fn deliver_due(&mut self) {
        while let Some((&key, _)) = self.queue.iter().next() {
            if key.0 > self.now {
                break;
            }
            let f = self.queue.remove(&key).expect("present");
            let to = &self.members[f.to];
            if to.crashed {
                continue;
            }
            if to.agent_paused || self.now < to.agent_wakes_at {
                // Buffered by the kernel until the process runs again.
                self.seq += 1;
                let at = self.now + TICK_MS;
                let seq = self.seq;
                self.queue.insert((at, seq), f);
                continue;
            }
            // A link cut while the message was in flight drops it.
            if !self.link_up(f.from, f.to) {
                continue;
            }
            self.handle(f.from, f.to, f.msg);
        }
    }

    // -------------------------------------------------------------------------- step

    fn step(&mut self) {
        self.apply_faults();
        self.deliver_due();
        for i in 0..self.n() {
            let m = &self.members[i];
            if m.agent_alive() && self.now >= m.agent_wakes_at {
                self.agent_tick(i);
            }
            self.watchdog(i);
        }
        self.postgres_step();
        self.check_step();
        self.now += TICK_MS;
    }

    fn apply_faults(&mut self) {
        let now = self.now;
        let mut cut = HashSet::new();
        let mut extra = vec![0; self.n()];
        let mut agent_paused = vec![false; self.n()];
        let mut pg_paused = vec![false; self.n()];
        let mut crashed = vec![false; self.n()];
        let sc = self.sc;
        for (fi, f) in sc.faults.iter().enumerate() {
            if !(f.start_ms <= now && now < f.end_ms()) {
                self.frozen.remove(&fi);
                continue;
            }
            match &f.kind {
                FaultKind::Partition { side } => {
                    for a in 0..self.n() {
                        for b in 0..self.n() {
                            if side.contains(&a) != side.contains(&b) {
                                cut.insert((a, b));
                            }
                        }
                    }
                }
                FaultKind::CutLinks { links } => cut.extend(links.iter().copied()),
                FaultKind::Slow { member, extra_ms } => extra[*member] += extra_ms,
                FaultKind::PauseAgent { member } => agent_paused[*member] = true,
                FaultKind::PausePostgres { member } => {
                    let inc = self.members[*member].pg.incarnation;
                    let frozen = *self.frozen.entry(fi).or_insert(inc);
                    pg_paused[*member] |= frozen == inc;
                }
                FaultKind::PauseHost { member } => {
                    agent_paused[*member] = true;
                    let inc = self.members[*member].pg.incarnation;
                    let frozen = *self.frozen.entry(fi).or_insert(inc);
                    pg_paused[*member] |= frozen == inc;
                }
                FaultKind::Crash { member } => crashed[*member] = true,
            }
        }
        if cut != self.cut {
            let n = cut.len();
            self.log(|| format!("network: {n} directed links cut"));
        }
        self.cut = cut;
        self.extra_latency = extra;
        for i in 0..self.n() {
            let was_paused = self.members[i].agent_paused;
            if was_paused && !agent_paused[i] {
                // SIGCONT: the agent needs a moment before it acts (Postgres does not).
                let delay = self.rng.random_range(20..90);
                self.members[i].agent_wakes_at = now + delay;
                let name = self.members[i].name;
                self.log(|| format!("{name}: agent resumed (acts in {delay} ms)"));
            }
            if !was_paused && agent_paused[i] {
                let name = self.members[i].name;
                self.log(|| format!("{name}: agent paused"));
            }
            self.members[i].agent_paused = agent_paused[i];
            if self.members[i].pg_paused != pg_paused[i] {
                let name = self.members[i].name;
                let p = pg_paused[i];
                self.log(|| format!("{name}: postgres {}", if p { "paused" } else { "resumed" }));
            }
            self.members[i].pg_paused = pg_paused[i];
            if crashed[i] && !self.members[i].crashed {
                self.crash(i);
            } else if !crashed[i] && self.members[i].crashed {
                self.restart(i);
            }
        }
    }

    fn crash(&mut self, i: usize) {
        let name = self.members[i].name;
        self.log(|| format!("{name}: host crashed"));
        let m = &mut self.members[i];
        m.crashed = true;
        m.pg.stop();
        m.pg.op = None;
    }

    fn restart(&mut self, i: usize) {
        let name = self.members[i].name;
        self.log(|| format!("{name}: host restarted"));
        let now = self.now;
        let election = self.rng.random_range(ELECTION_MIN_MS..ELECTION_MAX_MS);
        let m = &mut self.members[i];
        let l = m.local(now);
        m.crashed = false;
        m.role = Role::Follower;
        m.commit = 0;
        m.leader = None;
        m.election_at = l + election;
        m.votes.clear();
        m.leader_state = None;
        m.grants = VoterLease::new(LEASE_TTL_MS, l, m.broken_record);
        m.lease = None;
        m.named_since = None;
        m.renewals.clear();
        m.seen_primary_up = false;
        m.unresponsive_since = None;
        m.not_streaming_since = None;
        m.resume_wait_since = None;
        m.disconnected = false;
        m.receiver_off = None;
        m.primary_stop_token = None;
        m.watchdog_deadline = None;
        m.agent_wakes_at = now;
    }

    // -------------------------------------------------------------------------- raft

    fn last_term(m: &Member) -> u64 {
        m.log.last().map_or(0, |e| e.term)
    }

    fn become_follower(&mut self, i: usize, term: u64) {
        let m = &mut self.members[i];
        if term > m.term {
            m.term = term;
            m.voted_for = None;
        }
        if m.role == Role::Leader {
            let name = m.name;
            self.log(|| format!("{name}: no longer leader (term {term})"));
        }
        let m = &mut self.members[i];
        m.role = Role::Follower;
        m.leader_state = None;
    }

    fn raft_tick(&mut self, i: usize) {
        let now = self.now;
        let l = self.members[i].local(now);
        match self.members[i].role {
            Role::Leader => {
                let due = self.members[i]
                    .leader_state
                    .as_ref()
                    .is_some_and(|s| l >= s.next_heartbeat);
                if due {
                    self.heartbeat(i);
                }
            }
            Role::Follower | Role::Candidate => {
                if l >= self.members[i].election_at {
                    self.start_election(i);
                }
            }
        }
    }

    fn start_election(&mut self, i: usize) {
        let election = self.rng.random_range(ELECTION_MIN_MS..ELECTION_MAX_MS);
        let now = self.now;
        let m = &mut self.members[i];
        m.term += 1;
        m.role = Role::Candidate;
        m.voted_for = Some((m.term, i));
        m.votes = BTreeSet::from([i]);
        m.election_at = m.local(now) + election;
        let (term, last_term, len) = (m.term, Self::last_term(m), m.log.len());
        for j in 0..self.n() {
            if j != i {
                self.send(
                    i,
                    j,
                    Msg::Vote {
                        term,
                        last_term,
                        len,
                    },
                );
            }
        }
        self.maybe_win(i);
    }

    fn maybe_win(&mut self, i: usize) {
        let n = self.n();
        let m = &mut self.members[i];
        if m.role != Role::Candidate || !lease::is_majority(m.votes.len(), n) {
            return;
        }
        m.role = Role::Leader;
        m.leader = Some(i);
        let l = m.local(self.now);
        let term = m.term;
        Rc::make_mut(&mut m.log).push(Entry { term, cmd: None });
        m.leader_state = Some(LeaderState {
            elected_at: l,
            ..LeaderState::default()
        });
        let name = m.name;
        self.log(|| format!("{name}: elected leader (term {term})"));
        self.heartbeat(i);
    }

    fn heartbeat(&mut self, i: usize) {
        let m = &mut self.members[i];
        let l = m.local(self.now);
        let log = m.log.clone();
        let (term, commit) = (m.term, m.commit);
        if let Some(s) = &mut m.leader_state {
            s.next_heartbeat = l + HEARTBEAT_MS;
        }
        for j in 0..self.n() {
            if j != i {
                self.send(
                    i,
                    j,
                    Msg::Append {
                        term,
                        log: log.clone(),
                        commit,
                    },
                );
            }
        }
        self.advance_commit(i);
    }

    fn advance_commit(&mut self, i: usize) {
        let n = self.n();
        let m = &mut self.members[i];
        let Some(s) = &m.leader_state else { return };
        let mut lens: Vec<usize> = (0..n)
            .map(|j| {
                if j == i {
                    m.log.len()
                } else {
                    s.match_len.get(&j).copied().unwrap_or(0)
                }
            })
            .collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        let majority_len = lens[lease::majority(n) - 1];
        if majority_len > m.commit && m.log[majority_len - 1].term == m.term {
            m.commit = majority_len;
        }
    }

    /// Applies committed entries to the member's intent (the real `Intent::apply`).
    fn apply_committed(&mut self, i: usize) {
        loop {
            let m = &self.members[i];
            let upto = m.commit.min(m.log.len());
            if m.applied >= upto {
                break;
            }
            let idx = m.applied;
            let entry = m.log[idx].clone();
            let before = m.intent.generation;
            let m = &mut self.members[i];
            m.applied += 1;
            if let Some(cmd) = &entry.cmd {
                let r = m.intent.apply(cmd);
                let after = m.intent.generation;
                let name = m.name;
                if after < before {
                    self.violate(
                        Invariant::GenerationGrows,
                        format!("{name}: applied generation went from {before} to {after}"),
                    );
                }
                if i == 0 || self.trace.is_some() {
                    let what = cmd.to_string();
                    let refused = matches!(r, Response::Refused(_));
                    self.log(|| {
                        format!(
                            "{name}: applied #{idx} {what}{}",
                            if refused { " (refused)" } else { "" }
                        )
                    });
                }
            }
            // Raft safety of the simulated log: the same entry at the same index everywhere.
            let term = entry.term;
            for j in 0..self.n() {
                let o = &self.members[j];
                if j != i && o.applied > idx && o.log.get(idx).is_some_and(|e| e.term != term) {
                    let (a, b) = (self.members[i].name, o.name);
                    self.violate(
                        Invariant::GenerationGrows,
                        format!("{a} and {b} committed different entries at index {idx}"),
                    );
                }
            }
        }
    }

    /// The leader appends a command when nothing it proposed is uncommitted (the real
    /// leader waits for each write before the next). The proposer validates first.
    fn propose(&mut self, i: usize, cmd: Command) -> bool {
        let m = &mut self.members[i];
        if m.role != Role::Leader || m.log.len() > m.commit || m.applied < m.commit {
            return false;
        }
        if m.intent.validate(&cmd).is_err() {
            return false;
        }
        let term = m.term;
        let name = m.name;
        let what = cmd.to_string();
        Rc::make_mut(&mut m.log).push(Entry {
            term,
            cmd: Some(cmd),
        });
        self.log(|| format!("{name}: proposes {what}"));
        self.heartbeat(i);
        true
    }

    // -------------------------------------------------------------------------- handlers

    fn handle(&mut self, from: usize, to: usize, msg: Msg) {
        let now = self.now;
        match msg {
            Msg::Append { term, log, commit } => {
                if term < self.members[to].term {
                    let t = self.members[to].term;
                    self.send(
                        to,
                        from,
                        Msg::AppendResp {
                            term: t,
                            match_len: 0,
                            ok: false,
                        },
                    );
                    return;
                }
                self.become_follower(to, term);
                let election = self.rng.random_range(ELECTION_MIN_MS..ELECTION_MAX_MS);
                let m = &mut self.members[to];
                m.leader = Some(from);
                m.election_at = m.local(now) + election;
                // Keep a longer log of the same leader's (a reordered, older message);
                // otherwise take the leader's log (it holds every committed entry).
                let own_is_extension = m.log.len() > log.len()
                    && log
                        .last()
                        .is_none_or(|e| m.log[log.len() - 1].term == e.term)
                    && m.log.last().is_some_and(|e| e.term == term);
                if !own_is_extension {
                    m.log = log.clone();
                }
                let match_len = log.len();
                m.commit = m.commit.max(commit.min(match_len));
                self.send(
                    to,
                    from,
                    Msg::AppendResp {
                        term,
                        match_len,
                        ok: true,
                    },
                );
                self.apply_committed(to);
            }
            Msg::AppendResp {
                term,
                match_len,
                ok,
            } => {
                if term > self.members[to].term {
                    self.become_follower(to, term);
                    return;
                }
                let m = &mut self.members[to];
                if m.role != Role::Leader || term != m.term || !ok {
                    return;
                }
                if let Some(s) = &mut m.leader_state {
                    let e = s.match_len.entry(from).or_default();
                    *e = (*e).max(match_len);
                }
                self.advance_commit(to);
                self.apply_committed(to);
            }
            Msg::Vote {
                term,
                last_term,
                len,
            } => {
                if term > self.members[to].term {
                    self.become_follower(to, term);
                }
                let m = &mut self.members[to];
                let up_to_date = (last_term, len) >= (Self::last_term(m), m.log.len());
                let free = m.voted_for.is_none_or(|(t, c)| t < term || c == from);
                let granted = term == m.term && up_to_date && free;
                if granted {
                    m.voted_for = Some((term, from));
                    let election = self.rng.random_range(ELECTION_MIN_MS..ELECTION_MAX_MS);
                    let m = &mut self.members[to];
                    m.election_at = m.local(now) + election;
                }
                let t = self.members[to].term;
                self.send(to, from, Msg::VoteResp { term: t, granted });
            }
            Msg::VoteResp { term, granted } => {
                if term > self.members[to].term {
                    self.become_follower(to, term);
                    return;
                }
                let m = &mut self.members[to];
                if m.role == Role::Candidate && term == m.term && granted {
                    m.votes.insert(from);
                    self.maybe_win(to);
                }
            }
            Msg::Report { obs } => {
                let m = &mut self.members[to];
                if m.role != Role::Leader {
                    return;
                }
                let l = m.local(now);
                let name = self.members[from].name.to_string();
                let m = &mut self.members[to];
                let mut primary_stopped = None;
                if let Some(s) = &mut m.leader_state {
                    let mut obs = *obs;
                    obs.received_at_ms = l;
                    s.observations.insert(name, obs);
                    let limits = Limits {
                        stale_after_ms: STALE_AFTER_MS,
                        ..Limits::default()
                    };
                    primary_stopped = primary_stop_token(&m.intent, &s.observations, &limits, l);
                }
                self.send(to, from, Msg::ReportAck { primary_stopped });
            }
            Msg::ReportAck { primary_stopped } => {
                let m = &mut self.members[to];
                if primary_stopped.is_some() {
                    m.primary_stop_token = m.primary_stop_token.max(primary_stopped);
                }
            }
            Msg::Renew {
                generation,
                wal_lsn,
                req,
            } => {
                let name = self.members[from].name;
                let m = &mut self.members[to];
                let l = m.local(now);
                let ok = m
                    .grants
                    .renew(name, generation, wal_lsn, &m.intent, l)
                    .is_ok();
                self.send(to, from, Msg::RenewResp { req, ok });
            }
            Msg::RenewResp { req, ok } => {
                if !ok {
                    return;
                }
                let n_voters = self.members[to].intent.members.len();
                let m = &mut self.members[to];
                let Some((sent, generation, granted)) = m.renewals.get_mut(&req) else {
                    return;
                };
                granted.insert(from);
                if lease::is_majority(granted.len(), n_voters) {
                    let (sent, generation) = (*sent, *generation);
                    m.renewals.remove(&req);
                    self.renewed(to, sent, generation);
                }
            }
            Msg::Break {
                member,
                generation,
                round,
                id,
            } => {
                let primary_idx = self.idx(&member);
                let m = &mut self.members[to];
                let l = m.local(now);
                let d = m
                    .grants
                    .decide_break(&member, generation, round, &m.intent, l);
                let (broken, remaining_ms) = match d {
                    BreakDecision::AlreadyBroken => (true, 0),
                    BreakDecision::Record { generation, round } => {
                        m.broken_record = Some((generation, round));
                        m.grants.record_break(generation, round);
                        (true, 0)
                    }
                    BreakDecision::Held { remaining_ms } => (false, remaining_ms),
                    BreakDecision::Refused(_) => (false, 0),
                };
                // Like `node`'s break handler: a standby streaming from the primary whose
                // lease it broke disconnects before it answers (F7).
                let from_primary = m.pg.upstream.is_some() && m.pg.upstream == primary_idx;
                if broken && m.pg.in_recovery && from_primary {
                    m.pg.upstream = None;
                    m.pg.streaming = false;
                    m.disconnected = true;
                }
                // Like `stop_confirming`: a running standby off that primary says so.
                let is_primary = m.intent.primary.as_deref() == Some(member.as_str());
                if broken && is_primary && m.pg.running && !m.pg_paused && m.pg.in_recovery {
                    m.receiver_off = Some((generation, round));
                }
                let primary_lsn = m.grants.primary_lsn(generation);
                let recorded = match d {
                    BreakDecision::Record { generation, round } => Some((generation, round)),
                    _ => None,
                };
                let name = m.name;
                if let Some((generation, round)) = recorded {
                    self.log(|| {
                        format!("{name}: breaks {member}'s lease of generation {generation} (round {round})")
                    });
                }
                self.send(
                    to,
                    from,
                    Msg::BreakResp {
                        id,
                        broken,
                        remaining_ms,
                        primary_lsn,
                    },
                );
            }
            Msg::BreakResp {
                id,
                broken,
                remaining_ms,
                primary_lsn,
            } => {
                let m = &mut self.members[to];
                let Some(s) = &mut m.leader_state else { return };
                let Some(r) = &mut s.brk.running else { return };
                if r.id != id {
                    return;
                }
                if broken {
                    r.broken_by.insert(from);
                } else if remaining_ms > 0 {
                    r.held_ms.push(remaining_ms);
                }
                r.primary_lsn = r.primary_lsn.max(primary_lsn);
            }
        }
    }

    fn renewed(&mut self, i: usize, sent: u64, generation: Generation) {
        let m = &mut self.members[i];
        let (at, gen) = lease::newest_renewal(m.lease, sent, generation);
        m.lease = Some((at, gen));
        if m.data {
            m.watchdog_deadline = Some(lease::fence_deadline_ms(at, FENCE_AFTER_MS, LEASE_TTL_MS));
        }
    }

    // -------------------------------------------------------------------------- agents

    fn agent_tick(&mut self, i: usize) {
        self.raft_tick(i);
        self.apply_committed(i);
        if self.members[i].role == Role::Leader {
            self.leader_round(i);
        }
        self.report(i);
        self.lease_loop(i);
        self.planner(i);
    }

    fn observation(&self, i: usize) -> Observation {
        let m = &self.members[i];
        let pg = &m.pg;
        let up = m.data && pg.running && !m.pg_paused;
        let lsn = (pg.lsn() > 0).then_some(Lsn(pg.lsn()));
        let probes = (0..self.n())
            .filter(|j| *j != i)
            .map(|j| {
                let o = &self.members[j];
                let reach = self.link_up(i, j) && self.link_up(j, i);
                (
                    o.name.to_string(),
                    PeerProbe {
                        agent_reachable: reach && o.agent_alive(),
                        postgres_writable: reach && !o.pg_paused && o.pg.writable(),
                    },
                )
            })
            .collect();
        Observation {
            received_at_ms: 0,
            postgres_up: up,
            in_recovery: up && pg.in_recovery,
            fenced: pg.fenced,
            timeline: pg.timeline,
            wal_lsn: (up && !pg.in_recovery).then_some(lsn).flatten(),
            received_lsn: (up && pg.in_recovery).then_some(lsn).flatten(),
            replayed_lsn: (up && pg.in_recovery).then_some(lsn).flatten(),
            wal_receiver_streaming: up && pg.in_recovery && pg.streaming,
            upstream: pg.upstream.map(|u| self.members[u].name.to_string()),
            seen_generation: m.intent.generation,
            sync_standby_names: (up && !pg.in_recovery).then(|| pg.sync.clone()),
            // The simulated agent applies a target in the step that reads it and never an
            // older one after a newer: Postgres showing the newest target's set it knows
            // is that target.
            sync_target_seq: m
                .intent
                .sync_target
                .as_ref()
                .filter(|t| {
                    up && !pg.in_recovery && t.generation == m.intent.generation && t.set == pg.sync
                })
                .map(|t| t.seq),
            probes,
            resume_pending: plan::resume_pending(
                &MemberIntent::of(&m.intent, m.name),
                pg.fenced,
                m.resume_spent == Some(m.intent.generation),
            ),
            // Like `node`'s reporter: only while that break still stands here.
            receiver_off_since: m.receiver_off.filter(|(g, _)| {
                up && pg.in_recovery
                    && m.grants
                        .standing_break(&m.intent)
                        .is_some_and(|(sg, _)| sg == *g)
            }),
            after_primary_stop: m.primary_stop_token,
            // The simulated membership never changes; nothing reads this here.
            lease_voters: Vec::new(),
        }
    }

    fn report(&mut self, i: usize) {
        let l = self.members[i].local(self.now);
        if l < self.members[i].next_report {
            return;
        }
        self.members[i].next_report = l + OBSERVE_INTERVAL_MS;
        let Some(leader) = self.members[i].leader else {
            return;
        };
        if leader == i {
            // The leader answers its own reports: it knows the token before it probes.
            let m = &mut self.members[i];
            if let Some(s) = &m.leader_state {
                let limits = Limits {
                    stale_after_ms: STALE_AFTER_MS,
                    ..Limits::default()
                };
                let token = primary_stop_token(&m.intent, &s.observations, &limits, l);
                if token.is_some() {
                    m.primary_stop_token = m.primary_stop_token.max(token);
                }
            }
        }
        let obs = Box::new(self.observation(i));
        if leader == i && self.members[i].role == Role::Leader {
            let name = self.members[i].name.to_string();
            if let Some(s) = &mut self.members[i].leader_state {
                let mut obs = *obs;
                obs.received_at_ms = l;
                s.observations.insert(name, obs);
            }
            return;
        }
        self.send(i, leader, Msg::Report { obs });
    }

    /// The primary's renewal loop and its fence deadline (`node/src/agent/lease.rs::run`).
    fn lease_loop(&mut self, i: usize) {
        let now = self.now;
        let m = &mut self.members[i];
        let l = m.local(now);
        let intent = &m.intent;
        if intent.primary.as_deref() != Some(m.name) {
            m.named_since = None;
            m.watchdog_deadline = None;
            return;
        }
        let generation = intent.generation;
        if m.named_since.is_none_or(|(g, _)| g != generation) {
            m.named_since = Some((generation, l));
        }
        let started = m.named_since.map_or(l, |(_, at)| at);
        let last_ok = m.lease.filter(|(_, g)| *g == generation).map(|(at, _)| at);
        // Fence at the deadline (the real loop checks after each renewal; per step here).
        let deadline =
            lease::fence_deadline_ms(last_ok.unwrap_or(started), FENCE_AFTER_MS, LEASE_TTL_MS);
        if m.data
            && l >= deadline
            && m.pg.running
            && !m.pg.fenced
            && !m.pg_paused
            && !m.pg.in_recovery
        {
            self.fence(
                i,
                "no lease renewal granted by a majority within fence_after",
            );
            return;
        }
        let m = &mut self.members[i];
        let resting = m.intent.resumed != Some(generation) && m.pg.fenced && !m.pg.running;
        if resting || l < m.next_renew {
            return;
        }
        m.next_renew = l + RENEW_INTERVAL_MS;
        m.renewals
            .retain(|_, (sent, _, _)| l < *sent + FENCE_AFTER_MS);
        self.seq += 1;
        let req = self.seq;
        let m = &mut self.members[i];
        let wal_lsn = if m.pg.writable() { m.pg.lsn() } else { 0 };
        m.renewals.insert(req, (l, generation, BTreeSet::new()));
        for j in 0..self.n() {
            self.send(
                i,
                j,
                Msg::Renew {
                    generation,
                    wal_lsn,
                    req,
                },
            );
        }
    }

    /// The watchdog: a separate process that fences the local Postgres at the deadline the
    /// agent armed, even while the agent is stopped (not while the whole host is).
    fn watchdog(&mut self, i: usize) {
        let now = self.now;
        let m = &self.members[i];
        if m.crashed || !m.data || (m.agent_paused && m.pg_paused) {
            return;
        }
        let Some(deadline) = m.watchdog_deadline else {
            return;
        };
        let l = m.local(now);
        if m.agent_paused && l >= deadline && m.pg.running && !m.pg.fenced && !m.pg.in_recovery {
            self.fence(i, "watchdog: the lease deadline passed");
        }
    }

    fn fence(&mut self, i: usize, why: &str) {
        let m = &mut self.members[i];
        if matches!(m.pg.op, Some((PgOp::Fence, _))) {
            return;
        }
        // The server takes a moment to stop (and may acknowledge commits meanwhile); the
        // fence mark is set once it stopped.
        let delay = self.rng.random_range(10..80);
        let m = &mut self.members[i];
        m.pg.op = Some((PgOp::Fence, self.now + delay));
        m.seen_primary_up = false;
        let name = m.name;
        let why = why.to_string();
        self.log(|| format!("{name}: fencing its Postgres ({why})"));
    }

    fn planner(&mut self, i: usize) {
        let now = self.now;
        let m = &self.members[i];
        let l = m.local(now);
        if !m.data || l < m.next_plan || m.pg.op.is_some() {
            return;
        }
        let mi = MemberIntent::of(&m.intent, m.name);
        let answers = m.pg.running && !m.pg_paused;
        let local = LocalObserved {
            has_data: true,
            running: m.pg.running,
            fenced: m.pg.fenced,
            standby_signal: m.pg.standby_signal,
            probe: answers.then(|| Probe {
                in_recovery: m.pg.in_recovery,
                streaming: m.pg.streaming,
                streamed_timeline: m.pg.streamed_timeline,
                sync_standby_names: (!m.pg.in_recovery).then(|| m.pg.sync.clone()),
            }),
            unresponsive_for_ms: m.unresponsive_since.map_or(0, |s| l.saturating_sub(s)),
            seen_primary_up: m.seen_primary_up,
            lease_valid: lease::lease_valid(
                m.lease
                    .filter(|(_, g)| *g == m.intent.generation)
                    .map(|(at, _)| at),
                l,
                FENCE_AFTER_MS,
                LEASE_TTL_MS,
            ),
            primary_timeline: m
                .intent
                .primary
                .as_deref()
                .and_then(|p| self.idx(p))
                .filter(|p| self.link_up(i, *p) && self.link_up(*p, i))
                .map(|p| self.members[p].pg.timeline),
            upstream: m.pg.upstream.map(|u| self.members[u].name.to_string()),
            disconnected: m.disconnected,
            not_streaming_for_ms: m.not_streaming_since.map_or(0, |s| l.saturating_sub(s)),
            resume_spent: m.resume_spent == Some(m.intent.generation),
            broke_primary_lease: m
                .grants
                .standing_break(&m.intent)
                .is_some_and(|(g, _)| g == m.intent.generation),
            resume_waiting_ms: m
                .resume_wait_since
                .filter(|(g, _)| *g == m.intent.generation)
                .map_or(0, |(_, since)| l.saturating_sub(since)),
        };
        let limits = PlanLimits {
            fence_after_ms: FENCE_AFTER_MS,
            rejoin_after_ms: REJOIN_AFTER_MS,
            resume_within_ms: RESUME_WITHIN_MS,
        };
        let step = plan::plan(&mi, &local, &limits);
        let m = &mut self.members[i];
        m.next_plan = l + PLAN_INTERVAL_MS;
        // Timers the runtime keeps beside the planner.
        if answers {
            m.unresponsive_since = None;
        } else if m.pg.running {
            m.unresponsive_since.get_or_insert(l);
        }
        if answers && m.pg.in_recovery && !m.pg.streaming {
            m.not_streaming_since.get_or_insert(l);
        } else {
            m.not_streaming_since = None;
        }
        if answers && !m.pg.in_recovery && !m.pg.fenced && mi.i_am_primary {
            m.seen_primary_up = true;
        }
        if mi.i_am_primary && mi.resumed && m.pg.fenced && !m.pg.running {
            let g = mi.generation;
            if m.resume_wait_since.is_none_or(|(wg, _)| wg != g) {
                m.resume_wait_since = Some((g, l));
            }
        } else {
            m.resume_wait_since = None;
        }
        self.execute(i, step, &mi);
    }

    fn execute(&mut self, i: usize, step: Step, mi: &MemberIntent) {
        let now = self.now;
        let name = self.members[i].name;
        match step {
            Step::Idle | Step::NotAMember | Step::Bootstrap | Step::Reinit | Step::Clone { .. } => {
            }
            Step::WaitForLease => {}
            Step::GiveUpResume => {
                let m = &mut self.members[i];
                m.resume_spent = Some(mi.generation);
                self.log(|| format!("{name}: gives up resuming in place (no lease in time)"));
            }
            Step::Start => {
                let d = self.rng.random_range(50..300);
                self.members[i].pg.op = Some((PgOp::Start, now + d));
                self.members[i].pg.op_generation = mi.generation;
                self.log(|| format!("{name}: starting Postgres"));
            }
            Step::Fence(why) => self.fence(i, &format!("{why:?}")),
            Step::Promote => {
                let m = &mut self.members[i];
                let l = m.local(now);
                let valid = lease::lease_valid(
                    m.lease
                        .filter(|(_, g)| *g == mi.generation)
                        .map(|(at, _)| at),
                    l,
                    FENCE_AFTER_MS,
                    LEASE_TTL_MS,
                );
                if !valid {
                    // Win the first renewal first (`member::promote`).
                    m.next_renew = m.next_renew.min(l);
                    return;
                }
                let d = self.rng.random_range(100..600);
                self.members[i].pg.op = Some((PgOp::Promote, now + d));
                self.members[i].pg.op_generation = mi.generation;
                self.log(|| format!("{name}: promoting (generation {})", mi.generation));
            }
            Step::StopWrites => {
                self.fence(i, "switchover: stop writes");
            }
            Step::Resume => {
                let d = self.rng.random_range(50..300);
                self.members[i].pg.op = Some((PgOp::Resume, now + d));
                self.members[i].pg.op_generation = mi.generation;
                self.log(|| format!("{name}: resuming writes in place"));
            }
            Step::ApplySyncNames(set) => {
                let what = format!("{set:?}");
                self.members[i].pg.sync = set;
                self.log(|| format!("{name}: synchronous_standby_names = {what}"));
            }
            Step::Repoint { to } => {
                let u = self.idx(&to);
                let m = &mut self.members[i];
                m.pg.upstream = u;
                m.pg.streaming = false;
                m.disconnected = false;
                m.receiver_off = None;
                m.not_streaming_since = None;
                self.log(|| format!("{name}: follows {to}"));
            }
            Step::ClearFence => {
                self.members[i].pg.fenced = false;
            }
            Step::DisconnectUpstream => {
                let m = &mut self.members[i];
                m.pg.upstream = None;
                m.pg.streaming = false;
                m.disconnected = true;
                self.log(|| format!("{name}: isolated, WAL receiver disconnected"));
            }
            Step::Rewind { onto } => {
                let Some(u) = self.idx(&onto) else { return };
                let reachable = self.link_up(i, u) && self.link_up(u, i);
                let up = &self.members[u];
                if !reachable || !up.pg.running || up.pg_paused || up.pg.in_recovery {
                    return;
                }
                let m = &mut self.members[i];
                m.pg.stop();
                let d = self.rng.random_range(300..1_000);
                self.members[i].pg.op = Some((PgOp::Rewind(u), now + d));
                self.log(|| format!("{name}: rewinding onto {onto}"));
            }
        }
    }

    // -------------------------------------------------------------------------- leader

    fn leader_round(&mut self, i: usize) {
        let now = self.now;
        let l = self.members[i].local(now);
        {
            let m = &mut self.members[i];
            let s = m.leader_state.as_mut().expect("leader");
            if l < s.next_round {
                return;
            }
            s.next_round = l + LEADER_ROUND_MS;
            if s.generation.map(|g| g.0) != Some(m.intent.generation) {
                s.generation = Some((m.intent.generation, l));
            }
        }
        self.break_round_progress(i);
        let m = &self.members[i];
        let s = m.leader_state.as_ref().expect("leader");
        let intent = &m.intent;
        let valid = (LEASE_TTL_MS * 2).max(2_000);
        let key = intent.primary.clone().map(|p| (p, intent.generation));
        let round_usable = s.brk.key == key
            && s.brk.round.is_some_and(|(round, started)| {
                l.saturating_sub(started) < valid
                    && !intent.lease_break_released(intent.generation, round)
            });
        let lease_view = match (&s.brk.last, s.brk.key == key) {
            (Some(v), true) => LeaseView {
                broken: v.broken && round_usable,
                ..*v
            },
            _ => LeaseView::default(),
        };
        let book = LeaderBookkeeping {
            elected_at_ms: s.elected_at,
            lease: lease_view,
            generation_seen_at_ms: s.generation.map_or(l, |g| g.1),
            switchover_phase_since_ms: 0,
        };
        let limits = Limits {
            stale_after_ms: STALE_AFTER_MS,
            promote_timeout_ms: PROMOTE_TIMEOUT_MS,
            ..Limits::default()
        };
        // Round trips the primary's agent would measure (the links' latency now).
        let rtt: BTreeMap<String, u64> = intent
            .primary
            .as_deref()
            .and_then(|p| self.idx(p))
            .map(|p| {
                (0..self.n())
                    .filter(|j| *j != p)
                    .map(|j| {
                        let one_way = |a: usize, b: usize| {
                            self.sc.latency_ms[a][b] + self.extra_latency[a] + self.extra_latency[b]
                        };
                        (
                            self.members[j].name.to_string(),
                            one_way(p, j) + one_way(j, p),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let view = cluster_view(intent, &book, &s.observations, rtt, limits.clone());
        let decision = decide(&view, l);
        // A broken round that is usable stands: no new round starts this call, so the
        // round read here is the one the promotion relies on.
        let usable_round = lease_view
            .broken
            .then(|| s.brk.round.map(|r| r.0))
            .flatten();
        let mut commands: Vec<Command> = decision
            .actions
            .iter()
            .filter_map(|a| {
                command_for(
                    a,
                    intent,
                    &s.observations,
                    lease_view.primary_lsn,
                    usable_round,
                )
            })
            .collect();
        let resume = resume_in_place(&decision, intent, &s.observations, &limits, l);
        for a in &decision.actions {
            if let Action::BreakLease { member, generation } = a {
                self.start_break_round(i, member, *generation, valid);
            }
        }
        if !commands.iter().any(|c| matches!(c, Command::Promote(_))) {
            let releases = self.break_releases(i, &self.members[i].intent, valid);
            commands.extend(releases);
        }
        commands.extend(resume);
        // One write per round, like the real leader awaiting each commit.
        if let Some(cmd) = commands.into_iter().next() {
            let promote = matches!(cmd, Command::Promote(_));
            if self.propose(i, cmd) && promote {
                self.failovers += 1;
            }
        }
    }

    fn start_break_round(&mut self, i: usize, member: &str, generation: Generation, valid: u64) {
        let now = self.now;
        let m = &mut self.members[i];
        let l = m.local(now);
        let term = m.term;
        let intent_released = |round| m.intent.lease_break_released(generation, round);
        let s = m.leader_state.as_mut().expect("leader");
        let key = Some((member.to_string(), generation));
        if s.brk.key != key {
            s.brk = BreakTrack {
                key: key.clone(),
                seq: s.brk.seq,
                ..BreakTrack::default()
            };
        }
        let standing = s.brk.round.is_some_and(|(round, started)| {
            l.saturating_sub(started) < valid && !intent_released(round)
        });
        if s.brk.running.is_none() && s.brk.last.is_some_and(|v| v.broken) && standing {
            // The decision asks again for a broken round: the sync members whose positions
            // are not final yet get the same round once more (`node`'s `ask_again`); the
            // answers are not awaited, their reports tell.
            if l < s.brk.reask_at {
                return;
            }
            s.brk.reask_at = l + REASK_MS;
            let round = s.brk.round.expect("standing").0;
            for j in 0..self.n() {
                if j != i {
                    self.send(
                        i,
                        j,
                        Msg::Break {
                            member: member.to_string(),
                            generation,
                            round,
                            id: 0,
                        },
                    );
                }
            }
            return;
        }
        if s.brk.running.is_some()
            || s.brk.last.is_some_and(|v| v.broken) && standing
            || l < s.brk.next_at
        {
            return;
        }
        s.brk.seq += 1;
        let round = BreakRound {
            term,
            seq: s.brk.seq,
        };
        s.brk.round = Some((round, l));
        self.seq += 1;
        let id = self.seq;
        let timeout = FENCE_AFTER_MS.max(500);
        let m = &mut self.members[i];
        let s = m.leader_state.as_mut().expect("leader");
        s.brk.running = Some(RunningRound {
            id,
            deadline: l + timeout,
            ..RunningRound::default()
        });
        for j in 0..self.n() {
            self.send(
                i,
                j,
                Msg::Break {
                    member: member.to_string(),
                    generation,
                    round,
                    id,
                },
            );
        }
    }

    /// Ends a running break round once a majority broke, or a majority answered and the
    /// grace passed, or at its timeout (`node/src/agent/lease.rs::break_round`).
    fn break_round_progress(&mut self, i: usize) {
        let now = self.now;
        let voters = self.members[i].intent.members.len();
        let m = &mut self.members[i];
        let l = m.local(now);
        let Some(s) = &mut m.leader_state else { return };
        let Some(r) = &mut s.brk.running else { return };
        let need = lease::majority(voters);
        let broken = r.broken_by.len() >= need;
        if !broken && !r.graced && r.broken_by.len() + r.held_ms.len() >= need {
            r.graced = true;
            r.deadline = r.deadline.min(l + 200);
        }
        if !broken && l < r.deadline {
            return;
        }
        let RunningRound {
            broken_by: by,
            held_ms: held,
            primary_lsn: lsn,
            ..
        } = s.brk.running.take().expect("running");
        let runs_out = lease::majority_runs_out_in_ms(by.len(), held, voters);
        let round_started = s.brk.round.map_or(l, |r| r.1);
        // Even a round nobody answered "broken" in time may have left breaks: a voter that
        // was paused handles the request late (seed 380). Releasing it costs nothing.
        s.brk.breaks_since_release = s.brk.round.map(|r| (r.0, round_started));
        let round = s.brk.round.map(|r| r.0);
        let broken_since_ms = match s.brk.last {
            Some(prev) if broken && prev.broken && prev.round == round => prev.broken_since_ms,
            _ => broken.then_some(l),
        };
        s.brk.last = Some(LeaseView {
            broken,
            majority_runs_out_at_ms: runs_out.map(|d| l + d),
            primary_lsn: (lsn > 0).then_some(Lsn(lsn)),
            round,
            broken_since_ms,
        });
        let wait = runs_out.unwrap_or(100).clamp(20, FENCE_AFTER_MS.max(500));
        s.brk.next_at = l + wait;
        if broken {
            let name = m.name;
            let who: Vec<&str> = by.iter().map(|j| self.members[*j].name).collect();
            self.log(|| format!("{name}: a majority broke the lease ({})", who.join(",")));
        }
    }

    fn break_releases(&self, i: usize, intent: &Intent, valid: u64) -> Vec<Command> {
        let m = &self.members[i];
        let l = m.local(self.now);
        let generation = intent.generation;
        let mut out = Vec::new();
        if intent.primary.is_none() {
            return out;
        }
        let older = BreakRound {
            term: m.term.saturating_sub(1),
            seq: u64::MAX,
        };
        if m.term > 0 && !intent.lease_break_released(generation, older) {
            out.push(Command::ReleaseLeaseBreaks {
                generation,
                upto: older,
            });
        }
        let s = m.leader_state.as_ref().expect("leader");
        let key = intent.primary.clone().map(|p| (p, generation));
        if let Some((round, started)) = s.brk.breaks_since_release.filter(|_| s.brk.key == key) {
            if s.brk.running.is_none()
                && l.saturating_sub(started) >= valid
                && !intent.lease_break_released(generation, round)
            {
                out.push(Command::ReleaseLeaseBreaks {
                    generation,
                    upto: round,
                });
            }
        }
        out
    }

    // -------------------------------------------------------------------------- postgres

    fn postgres_step(&mut self) {
        let now = self.now;
        // Operations that finish now.
        for i in 0..self.n() {
            let Some((op, done)) = self.members[i].pg.op else {
                continue;
            };
            if now < done || self.members[i].pg_paused && op != PgOp::Fence {
                continue;
            }
            self.members[i].pg.op = None;
            self.finish_op(i, op);
        }
        // Replication: a standby streams from its upstream when both run and the link
        // works both ways, and its WAL is a prefix of the upstream's (else it diverged).
        for i in 0..self.n() {
            let m = &self.members[i];
            let pg = &m.pg;
            if !m.data || !pg.running || m.pg_paused || !pg.in_recovery {
                continue;
            }
            let Some(u) = pg.upstream else {
                self.members[i].pg.streaming = false;
                continue;
            };
            let up = &self.members[u];
            let connected = up.pg.running
                && !up.pg_paused
                && self.link_up(i, u)
                && self.link_up(u, i)
                && (!up.pg.fenced || up.pg.in_recovery);
            let len = pg.wal.len();
            let prefix =
                len <= up.pg.wal.len() && (len == 0 || up.pg.wal[len - 1] == pg.wal[len - 1]);
            let lossy =
                self.sc.loss_permille > 0 && self.rng.random_range(0..1000) < self.sc.loss_permille;
            if connected && prefix {
                if !lossy {
                    let tail: Vec<(u64, u32)> = self.members[u].pg.wal[len..].to_vec();
                    let tl = self.members[u].pg.timeline;
                    let m = &mut self.members[i];
                    m.pg.wal.extend(tail);
                    m.pg.timeline = tl;
                    m.pg.streamed_timeline = Some(tl);
                }
                self.members[i].pg.streaming = true;
            } else {
                self.members[i].pg.streaming = false;
            }
        }
        // Clients commit on every server that takes writes; a commit is acknowledged once
        // `ANY k (names)` of its streaming standbys hold it (at once when async).
        for i in 0..self.n() {
            let m = &self.members[i];
            if !m.data || m.pg_paused || !m.pg.writable() {
                continue;
            }
            if m.pg.pending.len() < 50 && self.rng.random_bool(0.5) {
                let id = self.next_id;
                self.next_id += 1;
                let m = &mut self.members[i];
                let tl = m.pg.timeline;
                m.pg.wal.push((id, tl));
                let pos = m.pg.wal.len();
                m.pg.pending.push((pos, id));
            }
            let m = &self.members[i];
            let sync = m.pg.sync.clone();
            let holders: Vec<usize> = (0..self.n())
                .filter(|j| {
                    let s = &self.members[*j];
                    sync.names.contains(s.name)
                        && s.pg.upstream == Some(i)
                        && s.pg.streaming
                        && s.pg.running
                })
                .map(|j| self.members[j].pg.wal.len())
                .collect();
            let k = sync.k as usize;
            // With no sync standby the commits wait on the agent's lease gate
            // (`node/src/agent/gate.rs`, on by default): it answers only while the agent
            // runs, and then only under the lease, read at this step.
            let gate_open = k == 0 && {
                let m = &self.members[i];
                let l = m.local(self.now);
                m.agent_alive()
                    && self.now >= m.agent_wakes_at
                    && lease::gate_may_confirm(
                        m.intent.primary.as_deref() == Some(m.name),
                        m.lease
                            .filter(|(_, g)| *g == m.intent.generation)
                            .map(|(at, _)| at),
                        l,
                        FENCE_AFTER_MS,
                        LEASE_TTL_MS,
                    )
            };
            let mut acked = Vec::new();
            self.members[i].pg.pending.retain(|(pos, id)| {
                let ok = if k == 0 {
                    gate_open
                } else {
                    holders.iter().filter(|h| **h >= *pos).count() >= k
                };
                if ok {
                    acked.push(*id);
                }
                !ok
            });
            // Promised (no automatic loss): a commit a sync standby acknowledged, or one the
            // primary acknowledged alone while the intent recorded that the policy wanted
            // sync standbys, unless `async_failover` accepts losing it.
            let covered =
                !self.sc.policy.async_failover && (k > 0 || self.newest_intent().sync_degraded);
            for id in acked {
                self.ack(i, id, covered);
            }
        }
    }

    fn finish_op(&mut self, i: usize, op: PgOp) {
        let name = self.members[i].name;
        match op {
            PgOp::Fence => {
                let m = &mut self.members[i];
                m.pg.stop();
                m.pg.fenced = true;
                self.log(|| format!("{name}: Postgres fenced and stopped"));
            }
            PgOp::Start => {
                let m = &mut self.members[i];
                m.pg.running = true;
                m.pg.in_recovery = m.pg.standby_signal;
                if !m.pg.in_recovery {
                    m.pg.writer_generation = m.pg.op_generation;
                }
                self.log(|| format!("{name}: Postgres started"));
            }
            PgOp::Resume => {
                let m = &mut self.members[i];
                if m.intent.generation != m.pg.op_generation
                    || m.intent.primary.as_deref() != Some(name)
                {
                    return;
                }
                // The fence mark goes, then the resume is spent, then the server takes
                // writes: one step here, so a report sees either "pending" or not fenced.
                m.pg.fenced = false;
                if m.intent.resumed == Some(m.pg.op_generation) {
                    m.resume_spent = Some(m.pg.op_generation);
                }
                m.pg.running = true;
                m.pg.in_recovery = false;
                m.pg.standby_signal = false;
                m.pg.writer_generation = m.pg.op_generation;
                self.log(|| format!("{name}: Postgres takes writes again"));
            }
            PgOp::Promote => {
                let tl = self.next_timeline;
                self.next_timeline += 1;
                let m = &mut self.members[i];
                let generation = m.pg.op_generation;
                if !m.pg.running
                    || !m.pg.in_recovery
                    || m.intent.primary.as_deref() != Some(name)
                    || m.intent.generation != generation
                {
                    return;
                }
                m.pg.in_recovery = false;
                m.pg.standby_signal = false;
                m.pg.upstream = None;
                m.pg.streaming = false;
                m.pg.timeline = tl;
                m.pg.writer_generation = generation;
                m.pg.sync = m
                    .intent
                    .sync_target
                    .as_ref()
                    .filter(|t| t.generation == generation)
                    .map(|t| t.set.clone())
                    .unwrap_or_default();
                m.seen_primary_up = true;
                let lsn = m.pg.lsn();
                self.log(|| {
                    format!("{name}: promoted at {lsn} on timeline {tl} (generation {generation})")
                });
            }
            PgOp::Rewind(u) => {
                let wal = self.members[u].pg.wal.clone();
                let tl = self.members[u].pg.timeline;
                let m = &mut self.members[i];
                m.pg.wal = wal;
                m.pg.timeline = tl;
                m.pg.fenced = false;
                m.pg.standby_signal = true;
                m.pg.in_recovery = true;
                m.pg.running = true;
                m.pg.upstream = Some(u);
                m.pg.streaming = false;
                m.receiver_off = None;
                m.pg.sync = SyncSet::default();
                let to = self.members[u].name;
                self.log(|| format!("{name}: rewound onto {to}, streaming"));
            }
        }
    }

    // -------------------------------------------------------------------------- checks

    fn ack(&mut self, i: usize, id: u64, covered: bool) {
        let generation = self.members[i].pg.writer_generation;
        if let Some((at, who)) = self.last_ack {
            if at == self.now && who != i {
                let (a, b) = (self.members[who].name, self.members[i].name);
                self.violate(
                    Invariant::OneWriter,
                    format!("{a} and {b} both acknowledged commits in the same step"),
                );
            }
        }
        if generation < self.max_ack_generation {
            let name = self.members[i].name;
            let max = self.max_ack_generation;
            self.violate(
                Invariant::OneWriter,
                format!(
                    "{name} (writer of generation {generation}) acknowledged commit {id} after a writer of generation {max} did"
                ),
            );
        }
        self.max_ack_generation = self.max_ack_generation.max(generation);
        self.last_ack = Some((self.now, i));
        self.acks.push(Ack {
            id,
            member: i,
            covered,
            at_ms: self.now,
        });
    }

    /// The newest committed intent any member holds.
    fn newest_intent(&self) -> &Intent {
        self.members
            .iter()
            .max_by_key(|m| (m.intent.generation, m.applied))
            .map(|m| &m.intent)
            .expect("members")
    }

    fn converged(&self) -> bool {
        let intent = self.newest_intent();
        let Some(p) = intent.primary.as_deref().and_then(|p| self.idx(p)) else {
            return false;
        };
        let writers: Vec<usize> = (0..self.n())
            .filter(|j| self.members[*j].data && self.members[*j].pg.writable())
            .collect();
        if writers != [p] {
            return false;
        }
        (0..self.n()).all(|j| {
            let m = &self.members[j];
            !m.data
                || j == p
                || (m.pg.running && m.pg.in_recovery && m.pg.upstream == Some(p) && m.pg.streaming)
        })
    }

    fn check_step(&mut self) {
        if self.now >= self.sc.heal_ms && self.converged_at.is_none() && self.converged() {
            self.converged_at = Some(self.now);
            let after = self.now - self.sc.heal_ms;
            self.log(|| format!("converged {after} ms after the heal"));
        }
    }

    fn finish(mut self) -> Outcome {
        if self.violations.is_empty()
            || self
                .violations
                .iter()
                .all(|v| v.invariant == Invariant::Converges)
        {
            if self.converged_at.is_none() {
                let intent = self.newest_intent();
                let detail = format!(
                    "no convergence within {} ms of the heal: intent primary {:?} at generation {}; {}",
                    CONVERGE_MS,
                    intent.primary,
                    intent.generation,
                    self.members
                        .iter()
                        .filter(|m| m.data)
                        .map(|m| format!(
                            "{}: {}{}{}{} up={:?} lsn {}",
                            m.name,
                            if m.pg.running { "running" } else { "stopped" },
                            if m.pg.in_recovery { " standby" } else { " primary" },
                            if m.pg.fenced { " fenced" } else { "" },
                            if m.pg.streaming { " streaming" } else { "" },
                            m.pg.upstream.map(|u| self.members[u].name),
                            m.pg.lsn()
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                self.violate(Invariant::Converges, detail);
            }
            // Acknowledged commits against the final primary's history.
            let intent = self.newest_intent().clone();
            if let Some(p) = intent.primary.as_deref().and_then(|p| self.idx(p)) {
                let have: HashSet<u64> = self.members[p].pg.wal.iter().map(|(id, _)| *id).collect();
                let mut lost_covered = Vec::new();
                let mut allowed = 0;
                for a in &self.acks {
                    if !have.contains(&a.id) {
                        if a.covered {
                            lost_covered.push((a.id, a.member));
                        } else {
                            allowed += 1;
                        }
                    }
                }
                self.allowed_loss = allowed;
                if let Some((id, m)) = lost_covered.first().copied() {
                    let n = lost_covered.len();
                    let (on, fin) = (self.members[m].name, self.members[p].name);
                    self.violate(
                        Invariant::NoAcknowledgedLoss,
                        format!("{n} acknowledged commits (first: {id}, acknowledged by {on}) missing from the final primary {fin}"),
                    );
                }
            }
        }
        Outcome {
            seed: self.sc.seed,
            violations: self.violations,
            trace: self.trace.unwrap_or_default(),
            acked: self.acks.len(),
            allowed_loss: self.allowed_loss,
            failovers: self.failovers,
            converged_after_ms: self.converged_at.map(|at| at - self.sc.heal_ms),
            longest_write_gap_ms: write_gap_ms(
                self.acks.iter().map(|a| a.at_ms),
                self.sc.faults.iter().map(|f| f.start_ms).min(),
                self.sc.heal_ms,
            ),
        }
    }
}

/// The longest stretch of `[from, to]` without an acknowledgement (`acks` in time order).
fn write_gap_ms(acks: impl Iterator<Item = u64>, from: Option<u64>, to: u64) -> u64 {
    let Some(from) = from else { return 0 };
    let mut last = from;
    let mut longest = 0;
    for at in acks.filter(|at| (from..=to).contains(at)) {
        longest = longest.max(at - last);
        last = at;
    }
    longest.max(to.saturating_sub(last))
}

/// The Raft command for a core action (`node/src/agent/leader.rs::command_for`); None for
/// actions the members derive from the intent.
fn command_for(
    action: &Action,
    intent: &Intent,
    observations: &BTreeMap<String, Observation>,
    lease_lsn: Option<Lsn>,
    break_round: Option<BreakRound>,
) -> Option<Command> {
    match action {
        Action::Promote {
            member,
            generation,
            reason,
            expected_loss_bytes,
        } => {
            let old = intent.primary.as_deref();
            let old_lsn = old
                .and_then(|o| observations.get(o))
                .and_then(|o| o.best_lsn())
                .max(lease_lsn);
            let new_lsn = observations.get(member).and_then(|o| o.best_lsn());
            let kind = match reason {
                PromoteReason::Switchover => PromotionKind::Switchover,
                _ => PromotionKind::Failover,
            };
            Some(Command::Promote(Promote {
                member: member.clone(),
                generation: *generation,
                kind,
                force: false,
                reason: format!("{reason:?}"),
                at_unix_ms: 0,
                old_primary_lsn: old_lsn,
                new_primary_lsn: new_lsn,
                possible_loss_bytes: old_lsn.map(|_| *expected_loss_bytes),
                old_lease_released: true,
                lease_break_round: match reason {
                    PromoteReason::LeaseExpired => break_round,
                    _ => None,
                },
            }))
        }
        Action::RecordSyncSet {
            set,
            degraded,
            degraded_until_lsn,
        } => Some(Command::RecordSyncSet {
            generation: intent.generation,
            set: set.clone(),
            degraded: *degraded,
            degraded_until_lsn: *degraded_until_lsn,
        }),
        Action::ApplySyncStandbyNames { set, .. } => {
            let current = intent
                .sync_target
                .as_ref()
                .filter(|t| t.generation == intent.generation);
            if current.is_some_and(|t| t.set == *set) {
                return None;
            }
            Some(Command::SetSyncTarget {
                generation: intent.generation,
                set: set.clone(),
            })
        }
        _ => None,
    }
}

/// The core's resume-in-place rule as a command (`meridian_core::decide::resume_in_place`).
fn resume_in_place(
    decision: &meridian_core::decide::Decision,
    intent: &Intent,
    observations: &BTreeMap<String, Observation>,
    limits: &Limits,
    now_ms: u64,
) -> Option<Command> {
    let r = meridian_core::decide::resume_in_place(decision, intent, observations, limits, now_ms)?;
    Some(Command::Resume {
        member: r.member.to_string(),
        generation: r.generation,
        reason: "resumed in place".into(),
        at_unix_ms: 0,
    })
}
