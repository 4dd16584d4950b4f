//! The cluster intent: what the Raft group has decided (members, primary, generation,
//! replication policy, sync set, maintenance, pending switchover, history), the typed
//! commands that change it, and their validation.
//!
//! The policy type is [`crate::policy::Policy`] and the recorded sync set and switchover
//! phase are the decision core's own types ([`SyncSet`], [`SwitchoverPhase`]), so the
//! runtime hands the intent to the core without translating (see `decide::from_intent`).
//!
//! Validation is one pure function, [`Intent::validate`], run twice: by the proposer before
//! it proposes (so a refusal costs no log entry) and again by every member at apply time,
//! because the intent may have moved between proposal and commit. An entry refused at apply
//! time changes nothing; the refusal travels back to the proposer in the [`Response`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backup_schedule::{ScheduleState, ScheduledRun};
use crate::decide::{SwitchoverAbort, SwitchoverPhase, SyncSet};
use crate::policy::{Durability, FailoverMode, Policy};
pub use crate::schedule::{Scheduled, ScheduledKind, ScheduledOp};
use crate::types::{Generation, Lsn, MemberId};

/// The same kind as in the agent config (one type, so the intent and the config agree).
pub use crate::types::MemberKind;

/// History entries kept in the intent; older ones are dropped so snapshots stay small.
pub const MAX_HISTORY_ENTRIES: usize = 1000;

/// Longest member or region name: Postgres truncates `application_name` (which carries the
/// member name into `synchronous_standby_names`) at NAMEDATALEN - 1 = 63 bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Longest free-text reason kept in a command or history entry.
pub const MAX_REASON_LEN: usize = 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemberTags {
    /// Higher is preferred among otherwise equal failover candidates.
    pub priority: i32,
    /// Never promoted automatically (a forced promotion may still pick it).
    pub nofailover: bool,
    /// Never in the sync set (still a failover candidate as an async standby).
    pub nosync: bool,
    /// Preferred source of clones (a new member copies from it instead of the primary).
    pub clonefrom: bool,
    /// Cascading replication: stream from this member instead of the primary while it is
    /// a streaming standby (see [`crate::cascade`]). Absent in version-1 entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicatefrom: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub id: MemberId,
    pub region: String,
    pub kind: MemberKind,
    #[serde(default)]
    pub tags: MemberTags,
}

/// A planned switchover in progress. The decision core moves it through its phases
/// ([`Command::SetSwitchoverPhase`]) and ends it with a promotion of `to` or
/// [`Command::AbandonSwitchover`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSwitchover {
    pub from: String,
    pub to: String,
    pub started_at_unix_ms: i64,
    /// Always `requested` when it begins.
    #[serde(default)]
    pub phase: SwitchoverPhase,
}

/// The phase changes the decision core emits: forward only, and `aborting` only once
/// writes were asked to stop (before that, giving up needs no un-fencing and the core
/// abandons directly).
fn switchover_step_allowed(from: &SwitchoverPhase, to: &SwitchoverPhase) -> bool {
    matches!(
        (from, to),
        (SwitchoverPhase::Requested, SwitchoverPhase::StoppingWrites)
            | (
                SwitchoverPhase::StoppingWrites,
                SwitchoverPhase::Aborting(_)
            )
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    /// The first primary of a new cluster.
    Bootstrap,
    Failover,
    Switchover,
    Policy,
    Member,
    /// Anything else worth keeping (e.g. a sync set shrunk under `preferred` durability).
    Note,
    /// A scheduled backup's outcome ([`Command::ScheduledBackupFinish`]).
    Backup,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The proposer's wall clock: apply must not read clocks, so time travels in the command.
    pub at_unix_ms: i64,
    pub kind: HistoryKind,
    pub reason: String,
    pub old_primary: Option<String>,
    pub new_primary: Option<String>,
    pub generation: Generation,
    /// Last known position of the old primary, when known.
    pub old_primary_lsn: Option<Lsn>,
    /// Position of the promoted member when it was chosen.
    pub new_primary_lsn: Option<Lsn>,
    /// Bytes the promotion may have lost (async failover), when known.
    pub possible_loss_bytes: Option<u64>,
    /// For a switchover: how long writes were paused, as the leader measured it (from the
    /// stop-writes phase committed to the new primary's first report of taking writes);
    /// filled in by [`Command::RecordWritePause`] once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_pause_ms: Option<u64>,
}

/// Why a promotion happens; decides the history kind and which guards apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromotionKind {
    /// First primary of the cluster; only valid at generation 0 with no primary.
    Bootstrap,
    /// Automatic replacement of a failed primary: refused in maintenance mode.
    Failover,
    /// Completes the pending switchover, whose target must be this member and whose
    /// phase must be `stopping_writes` (never once it is aborting: the old primary may be
    /// taking writes again).
    Switchover,
    /// Operator-requested (`meridianctl failover --candidate`).
    Manual,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promote {
    pub member: String,
    /// Must be exactly the current generation + 1: a proposal built on a stale view is refused.
    pub generation: Generation,
    pub kind: PromotionKind,
    /// Allows a `nofailover` member or a region whose failover mode is manual.
    #[serde(default)]
    pub force: bool,
    pub reason: String,
    pub at_unix_ms: i64,
    #[serde(default)]
    pub old_primary_lsn: Option<Lsn>,
    #[serde(default)]
    pub new_primary_lsn: Option<Lsn>,
    #[serde(default)]
    pub possible_loss_bytes: Option<u64>,
    /// The issuer made sure the previous primary takes no more writes: a majority of voters
    /// broke its lease, or its own agent confirmed its writes stopped. Voters then grant
    /// the new primary's lease at once instead of waiting out the old one locally.
    #[serde(default)]
    pub old_lease_released: bool,
    /// The break round whose majority released the old lease (failovers of an unreachable
    /// primary). Refused once that round's breaks were released: the old primary may have
    /// renewed since.
    #[serde(default)]
    pub lease_break_round: Option<BreakRound>,
}

/// Identifies one round of lease breaking: the term of the leader that ran it and that
/// leader's round counter. Ordered, so a release "up to" a round covers every earlier one,
/// whichever leader ran it (terms only grow).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct BreakRound {
    pub term: u64,
    pub seq: u64,
}

impl std::fmt::Display for BreakRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.term, self.seq)
    }
}

/// Lease breaks of `generation` made in rounds up to `upto` no longer count: no promotion
/// followed them ([`Command::ReleaseLeaseBreaks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseBreakRelease {
    pub generation: Generation,
    pub upto: BreakRound,
}

/// Version of the persisted format: the JSON encoding of [`Command`] (Raft log entries)
/// and [`Intent`] (snapshots). Bump it for any change that an older agent could not read
/// or that changes what an older entry means, and keep decoding the older format:
/// `core/tests/format.rs` decodes fixtures written by each version (`core/tests/fixtures/`).
/// Renaming a variant or a field of any type reachable from these two breaks logs on disk.
pub const FORMAT_VERSION: u32 = 1;

/// Every change to the intent. Apply is deterministic: no clocks, no I/O, no randomness.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Allocates the next member id (never reused) and records the member.
    AddMember {
        name: String,
        region: String,
        kind: MemberKind,
        #[serde(default)]
        tags: MemberTags,
        at_unix_ms: i64,
    },
    RemoveMember {
        name: String,
        at_unix_ms: i64,
    },
    SetMemberTags {
        name: String,
        tags: MemberTags,
    },
    Promote(Promote),
    /// Replaces the policy and bumps [`Intent::policy_version`].
    SetPolicy {
        policy: Policy,
        reason: String,
        at_unix_ms: i64,
        /// The `policy_version` the change was made on: refused when the policy changed
        /// meanwhile (two operators editing at once would otherwise lose one's edit).
        /// `None` replaces whatever is there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_version: Option<u64>,
    },
    /// The sync set Postgres may wait on (`ANY k (names)`), recorded for the current
    /// generation's primary. Keeping the record a superset of what Postgres waits on is
    /// the runtime's job (grow the record first, shrink Postgres first).
    RecordSyncSet {
        generation: Generation,
        set: SyncSet,
        /// The primary may acknowledge commits with no sync standby although the policy
        /// asks for one (see [`Intent::sync_degraded`]). Absent in logs written before it
        /// existed: false.
        #[serde(default)]
        degraded: bool,
        /// While degraded: every commit acknowledged alone lies at or before this.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        degraded_until_lsn: Option<Lsn>,
    },
    SetMaintenance {
        on: bool,
    },
    /// Starts a switchover; its phase must be `requested`.
    BeginSwitchover(PendingSwitchover),
    /// Moves the pending switchover to `to` to its next phase.
    SetSwitchoverPhase {
        /// The pending switchover's target: a step decided for an earlier switchover is
        /// refused.
        to: String,
        phase: SwitchoverPhase,
    },
    /// The decision core gives up the pending switchover to `to` (from any phase) and
    /// records why in the history.
    AbandonSwitchover {
        to: String,
        reason: SwitchoverAbort,
        at_unix_ms: i64,
    },
    /// An operator cancels the pending switchover (`meridianctl switchover --cancel`),
    /// recorded in the history. Before writes were asked to stop it is dropped at once;
    /// once they were (`stopping_writes`), no promotion has been committed, so it moves to
    /// `aborting` ([`SwitchoverAbort::CancelledByOperator`]): the old primary resumes
    /// writes in place before the decision core drops it. Dropping it there instead would
    /// leave a fenced primary and no switchover, which the failover rules take for a
    /// crash. Already `aborting`: it stays so.
    ClearSwitchover {
        #[serde(default)]
        at_unix_ms: i64,
    },
    AppendHistory(HistoryEntry),
    /// What the current generation's primary sets `synchronous_standby_names` to (the
    /// decision core's `ApplySyncStandbyNames`, carried to the primary's agent through the
    /// intent). Must stay within the recorded sync set (ordering rule).
    SetSyncTarget {
        generation: Generation,
        set: SyncSet,
    },
    /// `meridianctl reinit NAME`: the member re-clones its Postgres from the primary.
    Reinit {
        name: String,
    },
    /// Breaks of the current primary's lease that no promotion followed stop counting: the
    /// voters that broke it may grant it again (a break by a minority, or one whose
    /// failover never came, must not fence the primary later).
    ReleaseLeaseBreaks {
        generation: Generation,
        upto: BreakRound,
    },
    /// The member finished its re-clone.
    ReinitDone {
        name: String,
    },
    /// The leader measured how long a switchover paused writes: fills `write_pause_ms` of
    /// the history entry of the switchover promotion at `generation` (the current one).
    RecordWritePause {
        generation: Generation,
        write_pause_ms: u64,
    },
    /// The leader found no member to replace a primary that stopped (fenced, down): the
    /// same primary takes writes again, in a new generation (so a promotion decided on the
    /// old one is refused). Its Postgres kept every commit it ever acknowledged.
    Resume {
        member: String,
        /// Must be exactly the current generation + 1.
        generation: Generation,
        reason: String,
        at_unix_ms: i64,
    },
    /// Records the Postgres cluster's system identifier (`pg_controldata`'s "Database
    /// system identifier"), reported by the primary: from then on a member whose data
    /// directory holds another one refuses to touch it. Set once; the same value again is
    /// a no-op, another value is refused.
    RecordSystemIdentifier {
        member: String,
        system_identifier: u64,
    },
    /// The leader takes a schedule slot and starts its backup
    /// ([`crate::backup_schedule::decide`]): refused for a slot at or before the recorded
    /// one and while another run is in flight, so each slot runs once whoever leads.
    ScheduledBackupStart(ScheduledRun),
    /// The scheduled run of `slot_unix_ms` ended: its member's result, or its deadline
    /// passed. Recorded in the history.
    ScheduledBackupFinish {
        slot_unix_ms: i64,
        ok: bool,
        /// The backup's label, or the error.
        detail: String,
        at_unix_ms: i64,
    },
    /// `switchover --scheduled` / `restart --scheduled`: the leader starts it at its time
    /// (see [`crate::schedule`]); recorded in the history.
    Schedule(Scheduled),
    /// Takes the scheduled operation of `kind` away: `fired` when the leader starts it
    /// (committed before it acts, so it starts once), else cancelled (`meridianctl
    /// flush`). Recorded in the history.
    ClearScheduled {
        kind: ScheduledKind,
        fired: bool,
        at_unix_ms: i64,
    },
}

/// Why a command was refused. Serializable so it crosses the Raft log and the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "refused", content = "detail", rename_all = "snake_case")]
pub enum Refused {
    #[error("invalid {what} name {name:?}: 1 to 63 characters of A-Z a-z 0-9 '-' '_'")]
    InvalidName { what: String, name: String },
    #[error("member {0:?} already exists")]
    MemberExists(String),
    #[error("no member named {0:?}")]
    UnknownMember(String),
    #[error("member {0:?} is the current primary; switch over first")]
    MemberIsPrimary(String),
    #[error("member {0:?} is in the recorded sync set; shrink the sync set first")]
    MemberInSyncSet(String),
    #[error("member {0:?} is part of the pending switchover")]
    MemberInSwitchover(String),
    #[error("member {0:?} is a witness and cannot hold a Postgres role")]
    NotDataMember(String),
    #[error("member {0:?} is tagged nofailover (force to override)")]
    NoFailover(String),
    #[error("failover is manual in region {region:?} of member {member:?} (force to override)")]
    ManualFailoverRegion { member: String, region: String },
    #[error("stale generation: expected {expected}, got {got}")]
    StaleGeneration {
        expected: Generation,
        got: Generation,
    },
    #[error("member {0:?} is already the primary")]
    AlreadyPrimary(String),
    #[error("bootstrap promotion needs generation 0 and no primary")]
    AlreadyBootstrapped,
    #[error("automatic failover is refused in maintenance mode")]
    Maintenance,
    #[error("no switchover is pending")]
    NoSwitchoverPending,
    #[error("a switchover from {from:?} to {to:?} is already pending")]
    SwitchoverPending { from: String, to: String },
    #[error("switchover target {expected:?} differs from {got:?}")]
    SwitchoverTargetMismatch { expected: String, got: String },
    #[error("switchover source {got:?} is not the current primary {primary:?}")]
    SwitchoverSourceNotPrimary {
        got: String,
        primary: Option<String>,
    },
    #[error("switchover phase cannot go from {from:?} to {to:?}")]
    InvalidSwitchoverPhase {
        /// `None` when a switchover would begin in `to`.
        from: Option<SwitchoverPhase>,
        to: SwitchoverPhase,
    },
    #[error("switchover promotion needs phase stopping_writes, the switchover is {phase:?}")]
    SwitchoverWritesNotStopping { phase: SwitchoverPhase },
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),
    #[error("sync set of {size} names cannot have k = {k} (1 <= k <= size, 0 when empty)")]
    InvalidSyncQuorum { k: u32, size: usize },
    #[error("sync set of {size} is below sync_quorum {quorum} under required durability")]
    SyncSetBelowQuorum { size: usize, quorum: u32 },
    #[error(
        "sync_quorum {quorum} under required durability can never be met: the cluster has \
         {standbys} data standbys"
    )]
    SyncQuorumUnreachable { quorum: u32, standbys: usize },
    #[error("reason is longer than {MAX_REASON_LEN} bytes")]
    ReasonTooLong,
    #[error("member ids are exhausted")]
    MemberIdsExhausted,
    #[error("sync target {names:?} (k = {k}) is not covered by the recorded sync set")]
    SyncTargetNotRecorded { names: Vec<String>, k: u32 },
    #[error("member {0:?} has no re-clone pending")]
    NoReinitPending(String),
    #[error("member {0:?} is not the primary")]
    NotPrimary(String),
    #[error(
        "the policy changed meanwhile: this change was made on policy version {expected}, \
         the cluster's policy is at version {current}; read it again and retry"
    )]
    StalePolicyVersion { expected: u64, current: u64 },
    #[error("no switchover promotion at generation {0} awaits its write pause")]
    NoWritePauseToRecord(Generation),
    #[error(
        "the lease break round {round} this promotion relies on was released (the old \
         primary may have renewed its lease since); break it again"
    )]
    LeaseBreakReleased { round: BreakRound },
    #[error("lease breaks of generation {got} cannot be released: the generation is {current}")]
    LeaseBreakReleaseStale {
        current: Generation,
        got: Generation,
    },
    #[error(
        "the cluster's Postgres system identifier is {recorded}; {member:?} reported {got}: \
         its data directory belongs to another cluster"
    )]
    ForeignSystemIdentifier {
        member: String,
        recorded: u64,
        got: u64,
    },
    #[error("schedule slot {slot_unix_ms} is not after the last one taken ({last_unix_ms})")]
    ScheduleSlotTaken {
        slot_unix_ms: i64,
        last_unix_ms: i64,
    },
    #[error("the scheduled backup of slot {slot_unix_ms} on {member:?} is still running")]
    ScheduledBackupRunning { slot_unix_ms: i64, member: String },
    #[error("no scheduled backup of slot {0} is running")]
    NoScheduledBackupRunning(i64),
    #[error("already scheduled: {0}; cancel it first (meridianctl flush)")]
    AlreadyScheduled(String),
    #[error("scheduled time {at} is more than 24 h ahead or more than 60 s in the past")]
    ScheduleOutOfRange { at: String },
    #[error("role {0:?}: expected primary or replica")]
    InvalidScheduledRole(String),
    #[error("no {0} is scheduled")]
    NothingScheduled(ScheduledKind),
}

/// What the state machine answers for each applied log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", content = "detail", rename_all = "snake_case")]
pub enum Response {
    /// A blank or membership entry: nothing happened to the intent.
    Empty,
    /// The command changed the intent.
    Applied,
    /// `AddMember` allocated this id.
    MemberAdded(MemberId),
    /// The command was refused at apply time; the intent is unchanged.
    Refused(Refused),
}

/// The replicated state: everything the cluster has decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Intent {
    /// By name; ordered so serialization (and thus snapshots) is deterministic.
    pub members: BTreeMap<String, Member>,
    /// The next id `AddMember` hands out: a high-water mark that never goes down, so a removed
    /// member's id is never reused (reuse after a wipe could let two quorums form).
    pub next_member_id: MemberId,
    pub primary: Option<String>,
    pub generation: Generation,
    pub policy: Policy,
    /// Bumped by every applied `SetPolicy`: what `expected_version` is checked against.
    pub policy_version: u64,
    /// The recorded sync set: a superset of what the primary's Postgres may wait on.
    pub sync_set: SyncSet,
    /// The policy asks for sync standbys, yet the current primary may have acknowledged
    /// commits no standby is known to hold: `durability = preferred` emptied its set, or it
    /// started without one (a promotion that carried no set), and the standbys it waits on
    /// since have not yet been seen holding everything it wrote. Recorded *before* its
    /// Postgres may acknowledge alone; while set, no standby is promoted automatically
    /// unless `async_failover` allows the loss.
    #[serde(default)]
    pub sync_degraded: bool,
    /// While degraded and the primary waits on a set again: every commit it acknowledged
    /// alone lies at or before this position; k of the set holding it clears the mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_degraded_until_lsn: Option<Lsn>,
    pub maintenance: bool,
    pub pending_switchover: Option<PendingSwitchover>,
    pub history: Vec<HistoryEntry>,
    /// What the primary's Postgres should have in `synchronous_standby_names`, for the
    /// generation it was decided in (ignored in any other).
    pub sync_target: Option<SyncTarget>,
    /// Members asked to re-clone their Postgres from the primary.
    pub reinit: std::collections::BTreeSet<String>,
    /// The generation in which the primary was resumed in place ([`Command::Resume`]).
    pub resumed: Option<Generation>,
    /// The current generation's primary may be granted its lease at once: the previous
    /// holder's lease was released (see [`Promote::old_lease_released`]).
    #[serde(default)]
    pub lease_released: bool,
    /// Breaks of the current generation's lease that no longer count.
    #[serde(default)]
    pub lease_break_release: Option<LeaseBreakRelease>,
    /// The Postgres cluster's system identifier, once the primary reported it
    /// ([`Command::RecordSystemIdentifier`]); `None` in logs written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<u64>,
    /// Scheduled backups: the newest slot taken and the run in flight.
    #[serde(default, skip_serializing_if = "ScheduleState::is_empty")]
    pub backup_schedule: ScheduleState,
    /// Operations the leader starts at a time (at most one per kind,
    /// [`crate::schedule`]); absent in logs written before they existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scheduled: Vec<Scheduled>,
}

/// `synchronous_standby_names` for one generation's primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncTarget {
    pub generation: Generation,
    pub set: SyncSet,
    /// Counts targets across the log (each `SetSyncTarget` and promotion takes the next),
    /// so a primary's report can say which target it applied: a report made before the
    /// newest target was applied must not be read as what Postgres waits on now (sim
    /// F8). 0 in logs written before it existed.
    #[serde(default)]
    pub seq: u64,
}

impl SyncTarget {
    fn next(prev: &Option<SyncTarget>, generation: Generation, set: SyncSet) -> SyncTarget {
        SyncTarget {
            generation,
            set,
            seq: prev.as_ref().map_or(0, |t| t.seq) + 1,
        }
    }
}

impl Default for Intent {
    fn default() -> Self {
        Intent {
            members: BTreeMap::new(),
            // Id 0 is left unused so a zero never looks like a valid member by accident.
            next_member_id: MemberId(1),
            primary: None,
            generation: Generation(0),
            policy: Policy::default(),
            policy_version: 0,
            sync_set: SyncSet::default(),
            sync_degraded: false,
            sync_degraded_until_lsn: None,
            maintenance: false,
            pending_switchover: None,
            history: Vec::new(),
            sync_target: None,
            reinit: std::collections::BTreeSet::new(),
            resumed: None,
            lease_released: false,
            lease_break_release: None,
            system_identifier: None,
            backup_schedule: ScheduleState::default(),
            scheduled: Vec::new(),
        }
    }
}

impl Intent {
    /// Whether a break of `generation`'s lease made in `round` was released.
    pub fn lease_break_released(&self, generation: Generation, round: BreakRound) -> bool {
        self.lease_break_release
            .is_some_and(|r| r.generation == generation && round <= r.upto)
    }
}

fn check_name(what: &str, name: &str) -> Result<(), Refused> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Refused::InvalidName {
            what: what.to_string(),
            name: name.to_string(),
        })
    }
}

/// Regions also key the policy, whose rule is stricter (lowercase, no dots): a member in
/// a region the policy cannot name would be beyond its reach.
fn check_region(region: &str) -> Result<(), Refused> {
    check_name("region", region)?;
    if region.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(Refused::InvalidName {
            what: "region (lowercase)".to_string(),
            name: region.to_string(),
        });
    }
    Ok(())
}

fn check_reason(reason: &str) -> Result<(), Refused> {
    if reason.len() > MAX_REASON_LEN {
        Err(Refused::ReasonTooLong)
    } else {
        Ok(())
    }
}

/// `ANY k (names)` is well formed: 1 <= k <= size, and k = 0 only for the empty set.
fn check_sync_quorum(set: &SyncSet) -> Result<(), Refused> {
    let size = set.names.len();
    let k_ok = if size == 0 {
        set.k == 0
    } else {
        set.k >= 1 && set.k as usize <= size
    };
    if !k_ok {
        return Err(Refused::InvalidSyncQuorum { k: set.k, size });
    }
    Ok(())
}

/// Under `required` durability a recorded set, unless empty (no sync standby at all),
/// names at least `sync_quorum` members: fewer could never acknowledge a commit, and
/// shrinking below the quorum is what `preferred` is for.
fn check_sync_set_size(policy: &Policy, set: &SyncSet) -> Result<(), Refused> {
    let size = set.names.len();
    if policy.durability == Durability::Required && size > 0 && size < policy.sync_quorum as usize {
        return Err(Refused::SyncSetBelowQuorum {
            size,
            quorum: policy.sync_quorum,
        });
    }
    Ok(())
}

/// `h` records the switchover promotion of `primary` at `generation` (not a cancel or an
/// abandon, which keep the same primary).
fn is_switchover_promotion(
    h: &HistoryEntry,
    generation: Generation,
    primary: Option<&str>,
) -> bool {
    h.kind == HistoryKind::Switchover
        && h.generation == generation
        && h.new_primary.as_deref() == primary
        && primary.is_some()
        && h.old_primary != h.new_primary
}

impl Intent {
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.get(name)
    }

    pub fn member_by_id(&self, id: MemberId) -> Option<&Member> {
        self.members.values().find(|m| m.id == id)
    }

    fn known(&self, name: &str) -> Result<&Member, Refused> {
        self.members
            .get(name)
            .ok_or_else(|| Refused::UnknownMember(name.to_string()))
    }

    fn data_member(&self, name: &str) -> Result<&Member, Refused> {
        let m = self.known(name)?;
        if m.kind != MemberKind::Data {
            return Err(Refused::NotDataMember(name.to_string()));
        }
        Ok(m)
    }

    /// The pending switchover, if its target is `to`.
    fn pending_switchover_to(&self, to: &str) -> Result<&PendingSwitchover, Refused> {
        let sw = self
            .pending_switchover
            .as_ref()
            .ok_or(Refused::NoSwitchoverPending)?;
        if sw.to != to {
            return Err(Refused::SwitchoverTargetMismatch {
                expected: sw.to.clone(),
                got: to.to_string(),
            });
        }
        Ok(sw)
    }

    /// Whether `command` may be applied to this intent. Pure: the same intent and command
    /// always give the same answer, on the proposer and on every member at apply time.
    pub fn validate(&self, command: &Command) -> Result<(), Refused> {
        match command {
            Command::AddMember { name, region, .. } => {
                check_name("member", name)?;
                check_region(region)?;
                if self.members.contains_key(name) {
                    return Err(Refused::MemberExists(name.clone()));
                }
                if self.next_member_id.0 == u64::MAX {
                    return Err(Refused::MemberIdsExhausted);
                }
                Ok(())
            }
            Command::RemoveMember { name, .. } => {
                self.known(name)?;
                if self.primary.as_deref() == Some(name) {
                    return Err(Refused::MemberIsPrimary(name.clone()));
                }
                if self.sync_set.names.contains(name) {
                    return Err(Refused::MemberInSyncSet(name.clone()));
                }
                if let Some(sw) = &self.pending_switchover {
                    if sw.from == *name || sw.to == *name {
                        return Err(Refused::MemberInSwitchover(name.clone()));
                    }
                }
                Ok(())
            }
            Command::SetMemberTags { name, .. } => self.known(name).map(|_| ()),
            Command::Promote(p) => self.validate_promote(p),
            Command::SetPolicy {
                policy,
                reason,
                expected_version,
                ..
            } => {
                if let Some(expected) = *expected_version {
                    if expected != self.policy_version {
                        return Err(Refused::StalePolicyVersion {
                            expected,
                            current: self.policy_version,
                        });
                    }
                }
                check_reason(reason)?;
                policy
                    .validate()
                    .map_err(|e| Refused::InvalidPolicy(e.to_string()))?;
                // The recorded set carries its own k, so a larger quorum is fine now: the
                // leader grows the record first, then Postgres. Only one that no set of
                // standbys could ever meet is refused.
                let standbys = self
                    .members
                    .values()
                    .filter(|m| m.kind == MemberKind::Data)
                    .count()
                    .saturating_sub(1);
                if policy.durability == Durability::Required
                    && policy.sync_quorum as usize > standbys
                    && !self.members.is_empty()
                {
                    return Err(Refused::SyncQuorumUnreachable {
                        quorum: policy.sync_quorum,
                        standbys,
                    });
                }
                Ok(())
            }
            Command::RecordSyncSet {
                generation, set, ..
            } => {
                if *generation != self.generation {
                    return Err(Refused::StaleGeneration {
                        expected: self.generation,
                        got: *generation,
                    });
                }
                for name in &set.names {
                    self.data_member(name)?;
                    if self.primary.as_deref() == Some(name.as_str()) {
                        return Err(Refused::MemberIsPrimary(name.clone()));
                    }
                }
                check_sync_quorum(set)?;
                check_sync_set_size(&self.policy, set)
            }
            Command::SetMaintenance { .. } => Ok(()),
            Command::BeginSwitchover(sw) => {
                if let Some(p) = &self.pending_switchover {
                    return Err(Refused::SwitchoverPending {
                        from: p.from.clone(),
                        to: p.to.clone(),
                    });
                }
                if self.primary.as_deref() != Some(sw.from.as_str()) {
                    return Err(Refused::SwitchoverSourceNotPrimary {
                        got: sw.from.clone(),
                        primary: self.primary.clone(),
                    });
                }
                let to = self.data_member(&sw.to)?;
                if sw.to == sw.from {
                    return Err(Refused::AlreadyPrimary(sw.to.clone()));
                }
                if to.tags.nofailover {
                    return Err(Refused::NoFailover(sw.to.clone()));
                }
                if sw.phase != SwitchoverPhase::Requested {
                    return Err(Refused::InvalidSwitchoverPhase {
                        from: None,
                        to: sw.phase.clone(),
                    });
                }
                Ok(())
            }
            Command::SetSwitchoverPhase { to, phase } => {
                let sw = self.pending_switchover_to(to)?;
                if !switchover_step_allowed(&sw.phase, phase) {
                    return Err(Refused::InvalidSwitchoverPhase {
                        from: Some(sw.phase.clone()),
                        to: phase.clone(),
                    });
                }
                Ok(())
            }
            Command::AbandonSwitchover { to, .. } => self.pending_switchover_to(to).map(|_| ()),
            Command::ClearSwitchover { .. } => {
                if self.pending_switchover.is_none() {
                    return Err(Refused::NoSwitchoverPending);
                }
                Ok(())
            }
            Command::AppendHistory(entry) => check_reason(&entry.reason),
            Command::SetSyncTarget { generation, set } => {
                if *generation != self.generation {
                    return Err(Refused::StaleGeneration {
                        expected: self.generation,
                        got: *generation,
                    });
                }
                // `ANY k` of fewer than k names would hang every commit for good.
                check_sync_quorum(set)?;
                // Ordering rule: Postgres may only wait on members the record names, with
                // a k no smaller than the record's.
                let covered = set.names.is_subset(&self.sync_set.names)
                    && (set.names.is_empty() || set.k >= self.sync_set.k);
                if !covered {
                    return Err(Refused::SyncTargetNotRecorded {
                        names: set.names.iter().cloned().collect(),
                        k: set.k,
                    });
                }
                Ok(())
            }
            Command::RecordWritePause { generation, .. } => {
                if *generation != self.generation {
                    return Err(Refused::StaleGeneration {
                        expected: self.generation,
                        got: *generation,
                    });
                }
                match self.switchover_entry_awaiting_pause() {
                    Some(_) => Ok(()),
                    None => Err(Refused::NoWritePauseToRecord(*generation)),
                }
            }
            Command::Reinit { name } => {
                self.data_member(name)?;
                if self.primary.as_deref() == Some(name.as_str()) {
                    return Err(Refused::MemberIsPrimary(name.clone()));
                }
                Ok(())
            }
            Command::ReleaseLeaseBreaks { generation, .. } => {
                if *generation != self.generation {
                    return Err(Refused::LeaseBreakReleaseStale {
                        current: self.generation,
                        got: *generation,
                    });
                }
                Ok(())
            }
            Command::ReinitDone { name } => {
                if !self.reinit.contains(name) {
                    return Err(Refused::NoReinitPending(name.clone()));
                }
                Ok(())
            }
            Command::Resume {
                member,
                generation,
                reason,
                ..
            } => {
                check_reason(reason)?;
                let expected = self.generation.next();
                if *generation != expected {
                    return Err(Refused::StaleGeneration {
                        expected,
                        got: *generation,
                    });
                }
                if self.primary.as_deref() != Some(member.as_str()) {
                    return Err(Refused::NotPrimary(member.clone()));
                }
                Ok(())
            }
            Command::ScheduledBackupStart(run) => self.validate_scheduled_start(run),
            Command::ScheduledBackupFinish {
                slot_unix_ms,
                detail,
                ..
            } => {
                check_reason(detail)?;
                match &self.backup_schedule.running {
                    Some(r) if r.slot_unix_ms == *slot_unix_ms => Ok(()),
                    _ => Err(Refused::NoScheduledBackupRunning(*slot_unix_ms)),
                }
            }
            Command::RecordSystemIdentifier {
                member,
                system_identifier,
            } => {
                self.data_member(member)?;
                match self.system_identifier {
                    Some(recorded) if recorded != *system_identifier => {
                        Err(Refused::ForeignSystemIdentifier {
                            member: member.clone(),
                            recorded,
                            got: *system_identifier,
                        })
                    }
                    _ => Ok(()),
                }
            }
            Command::Schedule(sch) => {
                crate::schedule::validate(self, sch)?;
                Ok(())
            }
            Command::ClearScheduled { kind, .. } => {
                if self.scheduled.iter().any(|s| s.op.kind() == *kind) {
                    Ok(())
                } else {
                    Err(Refused::NothingScheduled(*kind))
                }
            }
        }
    }

    fn validate_promote(&self, p: &Promote) -> Result<(), Refused> {
        check_reason(&p.reason)?;
        let expected = self.generation.next();
        if p.generation != expected {
            return Err(Refused::StaleGeneration {
                expected,
                got: p.generation,
            });
        }
        let member = self.data_member(&p.member)?;
        if self.primary.as_deref() == Some(p.member.as_str()) {
            return Err(Refused::AlreadyPrimary(p.member.clone()));
        }
        match p.kind {
            PromotionKind::Bootstrap => {
                if self.generation != Generation(0) || self.primary.is_some() {
                    return Err(Refused::AlreadyBootstrapped);
                }
            }
            PromotionKind::Failover => {
                if self.maintenance {
                    return Err(Refused::Maintenance);
                }
            }
            PromotionKind::Switchover => {
                let sw = self.pending_switchover_to(&p.member)?;
                if sw.phase != SwitchoverPhase::StoppingWrites {
                    return Err(Refused::SwitchoverWritesNotStopping {
                        phase: sw.phase.clone(),
                    });
                }
            }
            PromotionKind::Manual => {}
        }
        if let Some(round) = p.lease_break_round {
            if self.lease_break_released(self.generation, round) {
                return Err(Refused::LeaseBreakReleased { round });
            }
        }
        if !p.force {
            if member.tags.nofailover {
                return Err(Refused::NoFailover(p.member.clone()));
            }
            // A switchover target was chosen by an operator, so a manual region does not block it.
            if p.kind == PromotionKind::Failover
                && self.policy.region(&member.region).failover == FailoverMode::Manual
            {
                return Err(Refused::ManualFailoverRegion {
                    member: p.member.clone(),
                    region: member.region.clone(),
                });
            }
        }
        Ok(())
    }

    /// Validates then applies `command`. A refused command leaves the intent untouched.
    pub fn apply(&mut self, command: &Command) -> Response {
        if let Err(refused) = self.validate(command) {
            return Response::Refused(refused);
        }
        match command {
            Command::AddMember {
                name,
                region,
                kind,
                tags,
                at_unix_ms,
            } => {
                let id = self.next_member_id;
                self.next_member_id = MemberId(id.0 + 1);
                self.members.insert(
                    name.clone(),
                    Member {
                        name: name.clone(),
                        id,
                        region: region.clone(),
                        kind: *kind,
                        tags: tags.clone(),
                    },
                );
                let entry = self.note(
                    *at_unix_ms,
                    HistoryKind::Member,
                    format!("added member {name} (id {id}) in region {region}"),
                );
                self.push_history(entry);
                return Response::MemberAdded(id);
            }
            Command::RemoveMember { name, at_unix_ms } => {
                let removed = self.members.remove(name);
                self.reinit.remove(name);
                let id = removed.map(|m| m.id).unwrap_or_default();
                let entry = self.note(
                    *at_unix_ms,
                    HistoryKind::Member,
                    format!("removed member {name} (id {id})"),
                );
                self.push_history(entry);
            }
            Command::SetMemberTags { name, tags } => {
                if let Some(m) = self.members.get_mut(name) {
                    m.tags = tags.clone();
                }
            }
            Command::Promote(p) => {
                let old = self.primary.replace(p.member.clone());
                self.generation = p.generation;
                // The old record minus the new primary carries over when it still holds k
                // names, and becomes the new primary's first target: it starts waiting on
                // the same standbys at once (no async window under a sync policy), and the
                // record is a superset of it. Otherwise the new primary starts async and
                // the leader grows a fresh set (record first, then Postgres).
                let mut carried = self.sync_set.clone();
                carried.names.remove(&p.member);
                if carried.k > 0
                    && carried.names.len() < carried.k as usize
                    && self.policy.durability == Durability::Required
                {
                    // Required durability: the new primary never starts acknowledging
                    // alone. Fill the set up to k with the old primary (it rejoins as a
                    // standby), then other data members; commits wait until k stream, and
                    // the leader then shapes the set by the policy.
                    let fill: Vec<String> = old
                        .iter()
                        .cloned()
                        .chain(
                            self.members
                                .values()
                                .filter(|m| m.kind == MemberKind::Data)
                                .map(|m| m.name.clone()),
                        )
                        .filter(|n| *n != p.member)
                        .collect();
                    for n in fill {
                        if carried.names.len() >= carried.k as usize {
                            break;
                        }
                        carried.names.insert(n);
                    }
                }
                if carried.k == 0 || carried.names.len() < carried.k as usize {
                    carried = SyncSet::default();
                }
                // A new primary that starts with no set where the old one had one (or was
                // already acknowledging alone) acknowledges alone until the leader grows a
                // set: degraded from its first commit.
                self.sync_degraded =
                    carried.is_empty() && (!self.sync_set.is_empty() || self.sync_degraded);
                self.sync_degraded_until_lsn = None;
                self.sync_set = carried.clone();
                self.sync_target = Some(SyncTarget::next(&self.sync_target, p.generation, carried));
                self.resumed = None;
                self.lease_released = p.old_lease_released || p.kind == PromotionKind::Bootstrap;
                self.pending_switchover = None;
                self.reinit.remove(&p.member);
                let kind = match p.kind {
                    PromotionKind::Bootstrap => HistoryKind::Bootstrap,
                    PromotionKind::Switchover => HistoryKind::Switchover,
                    PromotionKind::Failover | PromotionKind::Manual => HistoryKind::Failover,
                };
                self.push_history(HistoryEntry {
                    at_unix_ms: p.at_unix_ms,
                    kind,
                    reason: p.reason.clone(),
                    old_primary: old,
                    new_primary: Some(p.member.clone()),
                    generation: p.generation,
                    old_primary_lsn: p.old_primary_lsn,
                    new_primary_lsn: p.new_primary_lsn,
                    possible_loss_bytes: p.possible_loss_bytes,
                    write_pause_ms: None,
                });
            }
            Command::SetPolicy {
                policy,
                reason,
                at_unix_ms,
                ..
            } => {
                self.policy = policy.clone();
                self.policy_version = self.policy_version.saturating_add(1);
                let entry = self.note(*at_unix_ms, HistoryKind::Policy, reason.clone());
                self.push_history(entry);
            }
            Command::RecordSyncSet {
                set,
                degraded,
                degraded_until_lsn,
                ..
            } => {
                self.sync_set = set.clone();
                self.sync_degraded = *degraded;
                self.sync_degraded_until_lsn = degraded_until_lsn.filter(|_| *degraded);
            }
            Command::SetMaintenance { on } => self.maintenance = *on,
            Command::BeginSwitchover(sw) => self.pending_switchover = Some(sw.clone()),
            Command::SetSwitchoverPhase { phase, .. } => {
                if let Some(sw) = &mut self.pending_switchover {
                    sw.phase = phase.clone();
                }
            }
            Command::AbandonSwitchover {
                to,
                reason,
                at_unix_ms,
            } => {
                let from = self.pending_switchover.take().map(|sw| sw.from);
                let entry = self.note(
                    *at_unix_ms,
                    HistoryKind::Switchover,
                    format!(
                        "switchover from {} to {to} abandoned: {reason}",
                        from.as_deref().unwrap_or("?")
                    ),
                );
                self.push_history(entry);
            }
            Command::ClearSwitchover { at_unix_ms } => {
                let Some(sw) = self.pending_switchover.take() else {
                    return Response::Applied;
                };
                let what = format!(
                    "switchover from {} to {} cancelled by operator",
                    sw.from, sw.to
                );
                let (reason, still_pending) = match &sw.phase {
                    SwitchoverPhase::Requested => (format!("{what} before writes stopped"), None),
                    SwitchoverPhase::StoppingWrites => (
                        format!("{what} after writes stopped: {} resumes writes", sw.from),
                        Some(PendingSwitchover {
                            phase: SwitchoverPhase::Aborting(SwitchoverAbort::CancelledByOperator),
                            ..sw
                        }),
                    ),
                    SwitchoverPhase::Aborting(why) => (
                        format!("{what} while already aborting ({why})"),
                        Some(sw.clone()),
                    ),
                };
                self.pending_switchover = still_pending;
                let entry = self.note(*at_unix_ms, HistoryKind::Switchover, reason);
                self.push_history(entry);
            }
            Command::AppendHistory(entry) => self.push_history(entry.clone()),
            Command::SetSyncTarget { generation, set } => {
                self.sync_target = Some(SyncTarget::next(
                    &self.sync_target,
                    *generation,
                    set.clone(),
                ))
            }
            Command::RecordWritePause { write_pause_ms, .. } => {
                let generation = self.generation;
                let primary = self.primary.clone();
                if let Some(entry) = self.history.iter_mut().rev().find(|h| {
                    is_switchover_promotion(h, generation, primary.as_deref())
                        && h.write_pause_ms.is_none()
                }) {
                    entry.write_pause_ms = Some(*write_pause_ms);
                }
            }
            Command::Reinit { name } => {
                self.reinit.insert(name.clone());
            }
            Command::ReleaseLeaseBreaks { generation, upto } => {
                let upto = self
                    .lease_break_release
                    .filter(|r| r.generation == *generation)
                    .map_or(*upto, |r| r.upto.max(*upto));
                self.lease_break_release = Some(LeaseBreakRelease {
                    generation: *generation,
                    upto,
                });
            }
            Command::ReinitDone { name } => {
                self.reinit.remove(name);
            }
            Command::RecordSystemIdentifier {
                system_identifier, ..
            } => {
                self.system_identifier = Some(*system_identifier);
            }
            Command::ScheduledBackupStart(run) => {
                self.backup_schedule.last_slot_unix_ms = Some(run.slot_unix_ms);
                self.backup_schedule.running = Some(run.clone());
            }
            Command::ScheduledBackupFinish {
                ok,
                detail,
                at_unix_ms,
                ..
            } => {
                if let Some(run) = self.backup_schedule.running.take() {
                    let entry =
                        self.note(*at_unix_ms, HistoryKind::Backup, run.outcome(*ok, detail));
                    self.push_history(entry);
                }
            }
            Command::Schedule(sch) => {
                let entry = self.note(
                    sch.requested_at_unix_ms,
                    HistoryKind::Note,
                    format!("scheduled: {sch}"),
                );
                self.push_history(entry);
                self.scheduled.push(sch.clone());
            }
            Command::ClearScheduled {
                kind,
                fired,
                at_unix_ms,
            } => {
                let mut text = String::new();
                self.scheduled.retain(|s| {
                    let this = s.op.kind() == *kind;
                    if this {
                        text = s.to_string();
                    }
                    !this
                });
                let what = if *fired { "started" } else { "cancelled" };
                let entry = self.note(
                    *at_unix_ms,
                    HistoryKind::Note,
                    format!("scheduled {text}: {what}"),
                );
                self.push_history(entry);
            }
            Command::Resume {
                member,
                generation,
                reason,
                at_unix_ms,
            } => {
                self.generation = *generation;
                self.resumed = Some(*generation);
                // Only issued for a primary whose agent confirmed its Postgres stopped.
                self.lease_released = true;
                // The sync set stays: the same Postgres waits on the same standbys.
                if let Some(t) = &mut self.sync_target {
                    t.generation = *generation;
                }
                self.push_history(HistoryEntry {
                    at_unix_ms: *at_unix_ms,
                    kind: HistoryKind::Failover,
                    reason: reason.clone(),
                    old_primary: Some(member.clone()),
                    new_primary: Some(member.clone()),
                    generation: *generation,
                    old_primary_lsn: None,
                    new_primary_lsn: None,
                    possible_loss_bytes: Some(0),
                    write_pause_ms: None,
                });
            }
        }
        Response::Applied
    }

    /// The history entry of the switchover that made the current primary, if its write
    /// pause is not recorded yet.
    pub fn switchover_entry_awaiting_pause(&self) -> Option<&HistoryEntry> {
        self.history.iter().rev().find(|h| {
            is_switchover_promotion(h, self.generation, self.primary.as_deref())
                && h.write_pause_ms.is_none()
        })
    }

    /// A history entry about the current primary and generation (no promotion).
    fn note(&self, at_unix_ms: i64, kind: HistoryKind, reason: impl Into<String>) -> HistoryEntry {
        HistoryEntry {
            at_unix_ms,
            kind,
            reason: reason.into(),
            old_primary: self.primary.clone(),
            new_primary: self.primary.clone(),
            generation: self.generation,
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: None,
            write_pause_ms: None,
        }
    }

    fn validate_scheduled_start(&self, run: &ScheduledRun) -> Result<(), Refused> {
        self.data_member(&run.member)?;
        if let Some(r) = &self.backup_schedule.running {
            return Err(Refused::ScheduledBackupRunning {
                slot_unix_ms: r.slot_unix_ms,
                member: r.member.clone(),
            });
        }
        match self.backup_schedule.last_slot_unix_ms {
            Some(last) if run.slot_unix_ms <= last => Err(Refused::ScheduleSlotTaken {
                slot_unix_ms: run.slot_unix_ms,
                last_unix_ms: last,
            }),
            _ => Ok(()),
        }
    }

    fn push_history(&mut self, entry: HistoryEntry) {
        self.history.push(entry);
        if self.history.len() > MAX_HISTORY_ENTRIES {
            let excess = self.history.len() - MAX_HISTORY_ENTRIES;
            self.history.drain(..excess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Rejection;
    use crate::policy::{RegionPolicy, SyncMode};

    fn add(intent: &mut Intent, name: &str, region: &str, kind: MemberKind) -> MemberId {
        match intent.apply(&Command::AddMember {
            name: name.into(),
            region: region.into(),
            kind,
            tags: MemberTags::default(),
            at_unix_ms: 1,
        }) {
            Response::MemberAdded(id) => id,
            other => panic!("add {name}: {other:?}"),
        }
    }

    fn promote(member: &str, generation: u64, kind: PromotionKind) -> Command {
        Command::Promote(Promote {
            member: member.into(),
            generation: Generation(generation),
            kind,
            force: false,
            reason: "test".into(),
            at_unix_ms: 2,
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: None,
            old_lease_released: false,
            lease_break_round: None,
        })
    }

    /// a1, a2 in region a; b1 in region b; w1 witness in region c; a1 primary at generation 1.
    fn cluster() -> Intent {
        let mut i = Intent::default();
        add(&mut i, "a1", "a", MemberKind::Data);
        add(&mut i, "a2", "a", MemberKind::Data);
        add(&mut i, "b1", "b", MemberKind::Data);
        add(&mut i, "w1", "c", MemberKind::Witness);
        assert_eq!(
            i.apply(&promote("a1", 1, PromotionKind::Bootstrap)),
            Response::Applied
        );
        i
    }

    /// Applies a command that must be refused and checks the intent did not move.
    fn refused(intent: &mut Intent, cmd: Command) -> Refused {
        let before = intent.clone();
        let err = intent.validate(&cmd).expect_err("validate must refuse");
        assert_eq!(intent.apply(&cmd), Response::Refused(err.clone()));
        assert_eq!(*intent, before, "a refused command changed the intent");
        err
    }

    #[test]
    fn a_promotion_relying_on_a_released_break_round_is_refused() {
        let mut i = cluster();
        let r = |term, seq| BreakRound { term, seq };
        let release = |g: u64, upto| Command::ReleaseLeaseBreaks {
            generation: Generation(g),
            upto,
        };
        assert_eq!(
            refused(&mut i, release(7, r(3, 1))),
            Refused::LeaseBreakReleaseStale {
                current: Generation(1),
                got: Generation(7)
            }
        );
        assert_eq!(i.apply(&release(1, r(3, 2))), Response::Applied);
        // The mark only moves forward.
        assert_eq!(i.apply(&release(1, r(2, 9))), Response::Applied);
        assert!(i.lease_break_released(Generation(1), r(3, 2)));
        assert!(!i.lease_break_released(Generation(1), r(3, 3)));
        let relying_on = |round| {
            let Command::Promote(mut p) = promote("a2", 2, PromotionKind::Failover) else {
                unreachable!()
            };
            p.old_lease_released = true;
            p.lease_break_round = Some(round);
            Command::Promote(p)
        };
        assert_eq!(
            refused(&mut i, relying_on(r(3, 2))),
            Refused::LeaseBreakReleased { round: r(3, 2) }
        );
        assert_eq!(i.apply(&relying_on(r(3, 3))), Response::Applied);
        // Releases are per generation: the new one starts with none.
        assert!(!i.lease_break_released(Generation(2), r(0, 0)));
    }

    #[test]
    fn add_member_allocates_ids_and_never_reuses_them() {
        let mut i = Intent::default();
        let a = add(&mut i, "a1", "a", MemberKind::Data);
        let b = add(&mut i, "b1", "b", MemberKind::Data);
        assert_eq!((a, b), (MemberId(1), MemberId(2)));
        assert_eq!(
            i.apply(&Command::RemoveMember {
                name: "b1".into(),
                at_unix_ms: 3
            }),
            Response::Applied
        );
        // Same name again gets a fresh id: the high-water mark survives removal.
        assert_eq!(add(&mut i, "b1", "b", MemberKind::Data), MemberId(3));
        assert_eq!(i.next_member_id, MemberId(4));
    }

    #[test]
    fn add_member_refuses_duplicates_and_bad_names() {
        let mut i = cluster();
        let dup = Command::AddMember {
            name: "a1".into(),
            region: "a".into(),
            kind: MemberKind::Data,
            tags: MemberTags::default(),
            at_unix_ms: 1,
        };
        assert_eq!(refused(&mut i, dup), Refused::MemberExists("a1".into()));
        for bad in ["", "has space", "semi;colon", &"x".repeat(64)] {
            let cmd = Command::AddMember {
                name: bad.into(),
                region: "a".into(),
                kind: MemberKind::Data,
                tags: MemberTags::default(),
                at_unix_ms: 1,
            };
            assert!(matches!(refused(&mut i, cmd), Refused::InvalidName { .. }));
        }
        let bad_region = Command::AddMember {
            name: "z1".into(),
            region: "".into(),
            kind: MemberKind::Data,
            tags: MemberTags::default(),
            at_unix_ms: 1,
        };
        assert!(matches!(
            refused(&mut i, bad_region),
            Refused::InvalidName { .. }
        ));
        // The policy keys regions in lowercase only, so members may not use other regions.
        let upper_region = Command::AddMember {
            name: "z1".into(),
            region: "West".into(),
            kind: MemberKind::Data,
            tags: MemberTags::default(),
            at_unix_ms: 1,
        };
        assert_eq!(
            refused(&mut i, upper_region),
            Refused::InvalidName {
                what: "region (lowercase)".into(),
                name: "West".into()
            }
        );
    }

    #[test]
    fn remove_member_refuses_unknown_primary_sync_and_switchover_members() {
        let mut i = cluster();
        let rm = |n: &str| Command::RemoveMember {
            name: n.into(),
            at_unix_ms: 5,
        };
        assert_eq!(
            refused(&mut i, rm("nobody")),
            Refused::UnknownMember("nobody".into())
        );
        assert_eq!(
            refused(&mut i, rm("a1")),
            Refused::MemberIsPrimary("a1".into())
        );
        i.apply(&Command::RecordSyncSet {
            generation: Generation(1),
            set: SyncSet::new(["a2"], 1),
            degraded: false,
            degraded_until_lsn: None,
        });
        assert_eq!(
            refused(&mut i, rm("a2")),
            Refused::MemberInSyncSet("a2".into())
        );
        i.apply(&Command::BeginSwitchover(PendingSwitchover {
            from: "a1".into(),
            to: "b1".into(),
            started_at_unix_ms: 6,
            phase: SwitchoverPhase::Requested,
        }));
        assert_eq!(
            refused(&mut i, rm("b1")),
            Refused::MemberInSwitchover("b1".into())
        );
        assert_eq!(i.apply(&rm("w1")), Response::Applied);
        assert!(i.member("w1").is_none());
    }

    #[test]
    fn promote_requires_exactly_next_generation() {
        let mut i = cluster();
        for g in [0, 1, 3] {
            assert_eq!(
                refused(&mut i, promote("a2", g, PromotionKind::Failover)),
                Refused::StaleGeneration {
                    expected: Generation(2),
                    got: Generation(g)
                }
            );
        }
        assert_eq!(
            i.apply(&promote("a2", 2, PromotionKind::Failover)),
            Response::Applied
        );
        assert_eq!(i.primary.as_deref(), Some("a2"));
        assert_eq!(i.generation, Generation(2));
        let last = i.history.last().unwrap();
        assert_eq!(last.kind, HistoryKind::Failover);
        assert_eq!(last.old_primary.as_deref(), Some("a1"));
        assert_eq!(last.new_primary.as_deref(), Some("a2"));
    }

    #[test]
    fn promote_requires_a_known_data_member_that_is_not_primary() {
        let mut i = cluster();
        assert_eq!(
            refused(&mut i, promote("zz", 2, PromotionKind::Failover)),
            Refused::UnknownMember("zz".into())
        );
        assert_eq!(
            refused(&mut i, promote("w1", 2, PromotionKind::Failover)),
            Refused::NotDataMember("w1".into())
        );
        assert_eq!(
            refused(&mut i, promote("a1", 2, PromotionKind::Manual)),
            Refused::AlreadyPrimary("a1".into())
        );
    }

    #[test]
    fn promote_refuses_nofailover_unless_forced() {
        let mut i = cluster();
        i.apply(&Command::SetMemberTags {
            name: "a2".into(),
            tags: MemberTags {
                priority: 0,
                nofailover: true,
                ..MemberTags::default()
            },
        });
        assert_eq!(
            refused(&mut i, promote("a2", 2, PromotionKind::Failover)),
            Refused::NoFailover("a2".into())
        );
        let Command::Promote(mut p) = promote("a2", 2, PromotionKind::Manual) else {
            unreachable!()
        };
        p.force = true;
        assert_eq!(i.apply(&Command::Promote(p)), Response::Applied);
    }

    #[test]
    fn failover_refused_in_maintenance_and_manual_regions() {
        let mut i = cluster();
        i.apply(&Command::SetMaintenance { on: true });
        assert_eq!(
            refused(&mut i, promote("a2", 2, PromotionKind::Failover)),
            Refused::Maintenance
        );
        i.apply(&Command::SetMaintenance { on: false });
        let mut policy = Policy::default();
        policy.regions.insert(
            "b".into(),
            RegionPolicy {
                mode: SyncMode::Async,
                failover: FailoverMode::Manual,
                priority: 0,
            },
        );
        assert_eq!(
            i.apply(&Command::SetPolicy {
                expected_version: None,
                policy,
                reason: "b is manual".into(),
                at_unix_ms: 3
            }),
            Response::Applied
        );
        assert_eq!(
            refused(&mut i, promote("b1", 2, PromotionKind::Failover)),
            Refused::ManualFailoverRegion {
                member: "b1".into(),
                region: "b".into()
            }
        );
        // Region a has no entry: the default (auto) applies.
        i.validate(&promote("a2", 2, PromotionKind::Failover))
            .unwrap();
        // An operator's manual promotion is not blocked by the region's automatic mode.
        assert_eq!(
            i.apply(&promote("b1", 2, PromotionKind::Manual)),
            Response::Applied
        );
    }

    #[test]
    fn bootstrap_only_once() {
        let mut i = cluster();
        assert_eq!(
            refused(&mut i, promote("a2", 2, PromotionKind::Bootstrap)),
            Refused::AlreadyBootstrapped
        );
    }

    fn begin(from: &str, to: &str) -> Command {
        Command::BeginSwitchover(PendingSwitchover {
            from: from.into(),
            to: to.into(),
            started_at_unix_ms: 9,
            phase: SwitchoverPhase::Requested,
        })
    }

    fn phase(to: &str, phase: SwitchoverPhase) -> Command {
        Command::SetSwitchoverPhase {
            to: to.into(),
            phase,
        }
    }

    fn aborting() -> SwitchoverPhase {
        SwitchoverPhase::Aborting(SwitchoverAbort::WritesNotStopped)
    }

    #[test]
    fn switchover_lifecycle_and_guards() {
        let mut i = cluster();
        assert_eq!(
            refused(&mut i, promote("a2", 2, PromotionKind::Switchover)),
            Refused::NoSwitchoverPending
        );
        assert!(matches!(
            refused(&mut i, begin("a2", "b1")),
            Refused::SwitchoverSourceNotPrimary { .. }
        ));
        assert_eq!(
            refused(&mut i, begin("a1", "w1")),
            Refused::NotDataMember("w1".into())
        );
        assert_eq!(
            refused(&mut i, begin("a1", "a1")),
            Refused::AlreadyPrimary("a1".into())
        );
        assert_eq!(
            refused(&mut i, Command::ClearSwitchover { at_unix_ms: 1 }),
            Refused::NoSwitchoverPending
        );
        assert_eq!(
            refused(&mut i, phase("b1", SwitchoverPhase::StoppingWrites)),
            Refused::NoSwitchoverPending
        );
        let Command::BeginSwitchover(mut late) = begin("a1", "b1") else {
            unreachable!()
        };
        late.phase = SwitchoverPhase::StoppingWrites;
        assert_eq!(
            refused(&mut i, Command::BeginSwitchover(late)),
            Refused::InvalidSwitchoverPhase {
                from: None,
                to: SwitchoverPhase::StoppingWrites
            }
        );

        assert_eq!(i.apply(&begin("a1", "b1")), Response::Applied);
        assert_eq!(
            i.pending_switchover.as_ref().map(|sw| &sw.phase),
            Some(&SwitchoverPhase::Requested)
        );
        assert!(matches!(
            refused(&mut i, begin("a1", "a2")),
            Refused::SwitchoverPending { .. }
        ));
        // Writes have not been asked to stop: no promotion yet.
        assert_eq!(
            refused(&mut i, promote("b1", 2, PromotionKind::Switchover)),
            Refused::SwitchoverWritesNotStopping {
                phase: SwitchoverPhase::Requested
            }
        );
        // A step decided for another switchover is refused.
        assert_eq!(
            refused(&mut i, phase("a2", SwitchoverPhase::StoppingWrites)),
            Refused::SwitchoverTargetMismatch {
                expected: "b1".into(),
                got: "a2".into()
            }
        );
        // Only the forward steps the decision core emits.
        for bad in [SwitchoverPhase::Requested, aborting()] {
            assert_eq!(
                refused(&mut i, phase("b1", bad.clone())),
                Refused::InvalidSwitchoverPhase {
                    from: Some(SwitchoverPhase::Requested),
                    to: bad
                }
            );
        }
        assert_eq!(
            i.apply(&phase("b1", SwitchoverPhase::StoppingWrites)),
            Response::Applied
        );
        for bad in [SwitchoverPhase::Requested, SwitchoverPhase::StoppingWrites] {
            assert_eq!(
                refused(&mut i, phase("b1", bad.clone())),
                Refused::InvalidSwitchoverPhase {
                    from: Some(SwitchoverPhase::StoppingWrites),
                    to: bad
                }
            );
        }
        assert_eq!(
            refused(&mut i, promote("a2", 2, PromotionKind::Switchover)),
            Refused::SwitchoverTargetMismatch {
                expected: "b1".into(),
                got: "a2".into()
            }
        );
        assert_eq!(
            i.apply(&promote("b1", 2, PromotionKind::Switchover)),
            Response::Applied
        );
        assert_eq!(i.pending_switchover, None);
        assert_eq!(i.history.last().unwrap().kind, HistoryKind::Switchover);

        assert_eq!(i.apply(&begin("b1", "a1")), Response::Applied);
        assert_eq!(
            i.apply(&Command::ClearSwitchover { at_unix_ms: 3 }),
            Response::Applied
        );
        assert_eq!(i.pending_switchover, None);
    }

    #[test]
    fn switchover_abort_and_abandon() {
        let mut i = cluster();
        let abandon = |to: &str| Command::AbandonSwitchover {
            to: to.into(),
            reason: SwitchoverAbort::TargetNotReady(Rejection::LagTooHigh {
                lag_bytes: 10,
                max_bytes: 5,
            }),
            at_unix_ms: 11,
        };
        assert_eq!(refused(&mut i, abandon("b1")), Refused::NoSwitchoverPending);
        // Abandon straight from `requested`.
        i.apply(&begin("a1", "b1"));
        assert_eq!(
            refused(&mut i, abandon("a2")),
            Refused::SwitchoverTargetMismatch {
                expected: "b1".into(),
                got: "a2".into()
            }
        );
        assert_eq!(i.apply(&abandon("b1")), Response::Applied);
        assert_eq!(i.pending_switchover, None);
        let last = i.history.last().unwrap();
        assert_eq!(last.kind, HistoryKind::Switchover);
        assert_eq!(
            last.reason,
            "switchover from a1 to b1 abandoned: the target is not ready: 10 bytes behind \
             (at most 5 allowed)"
        );
        assert_eq!(last.at_unix_ms, 11);
        assert_eq!(i.primary.as_deref(), Some("a1"));
        assert_eq!(i.generation, Generation(1));

        // Through `stopping_writes` and `aborting`, then abandon.
        i.apply(&begin("a1", "b1"));
        assert_eq!(
            i.apply(&phase("b1", SwitchoverPhase::StoppingWrites)),
            Response::Applied
        );
        assert_eq!(i.apply(&phase("b1", aborting())), Response::Applied);
        for bad in [
            SwitchoverPhase::Requested,
            SwitchoverPhase::StoppingWrites,
            aborting(),
        ] {
            assert_eq!(
                refused(&mut i, phase("b1", bad.clone())),
                Refused::InvalidSwitchoverPhase {
                    from: Some(aborting()),
                    to: bad
                }
            );
        }
        // Once aborting, the old primary may take writes again: never promote for it.
        assert_eq!(
            refused(&mut i, promote("b1", 2, PromotionKind::Switchover)),
            Refused::SwitchoverWritesNotStopping { phase: aborting() }
        );
        assert_eq!(i.apply(&abandon("b1")), Response::Applied);
        assert_eq!(i.pending_switchover, None);
    }

    /// What an operator's cancel leaves behind, phase by phase.
    #[test]
    fn cancelling_a_switchover_resumes_the_old_primary_once_writes_stopped() {
        let cancel = Command::ClearSwitchover { at_unix_ms: 20 };
        let cancelled = SwitchoverPhase::Aborting(SwitchoverAbort::CancelledByOperator);
        let entry = |reason: &str| HistoryEntry {
            at_unix_ms: 20,
            kind: HistoryKind::Switchover,
            reason: reason.into(),
            old_primary: Some("a1".into()),
            new_primary: Some("a1".into()),
            generation: Generation(1),
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: None,
            write_pause_ms: None,
        };

        // Requested: nothing was fenced, the switchover is dropped at once.
        let mut i = cluster();
        i.apply(&begin("a1", "b1"));
        assert_eq!(i.apply(&cancel), Response::Applied);
        assert_eq!(i.pending_switchover, None);
        assert_eq!(
            i.history.last(),
            Some(&entry(
                "switchover from a1 to b1 cancelled by operator before writes stopped"
            ))
        );
        assert_eq!(
            refused(&mut i, cancel.clone()),
            Refused::NoSwitchoverPending
        );

        // Stopping writes: aborting, so the old primary resumes in place; the promotion
        // the leader may have decided meanwhile is refused.
        i.apply(&begin("a1", "b1"));
        i.apply(&phase("b1", SwitchoverPhase::StoppingWrites));
        let before = i.history.len();
        assert_eq!(i.apply(&cancel), Response::Applied);
        assert_eq!(
            i.pending_switchover,
            Some(PendingSwitchover {
                from: "a1".into(),
                to: "b1".into(),
                started_at_unix_ms: 9,
                phase: cancelled.clone(),
            })
        );
        assert_eq!(i.history.len(), before + 1);
        assert_eq!(
            i.history.last(),
            Some(&entry(
                "switchover from a1 to b1 cancelled by operator after writes stopped: a1 \
                 resumes writes"
            ))
        );
        assert_eq!(
            refused(&mut i, promote("b1", 2, PromotionKind::Switchover)),
            Refused::SwitchoverWritesNotStopping {
                phase: cancelled.clone()
            }
        );
        assert_eq!(
            (i.primary.as_deref(), i.generation),
            (Some("a1"), Generation(1))
        );
        // Cancelling again changes nothing but the history.
        assert_eq!(i.apply(&cancel), Response::Applied);
        assert_eq!(
            i.pending_switchover.as_ref().map(|sw| &sw.phase),
            Some(&cancelled)
        );
        assert_eq!(
            i.history.last(),
            Some(&entry(
                "switchover from a1 to b1 cancelled by operator while already aborting \
                 (cancelled by the operator)"
            ))
        );
        // Once a1 takes writes again the decision core drops it.
        assert_eq!(
            i.apply(&Command::AbandonSwitchover {
                to: "b1".into(),
                reason: SwitchoverAbort::CancelledByOperator,
                at_unix_ms: 21,
            }),
            Response::Applied
        );
        assert_eq!(i.pending_switchover, None);
        assert_eq!(
            i.history.last().map(|h| h.reason.as_str()),
            Some("switchover from a1 to b1 abandoned: cancelled by the operator")
        );

        // A cancel that comes after the promotion finds nothing to cancel.
        i.apply(&begin("a1", "b1"));
        i.apply(&phase("b1", SwitchoverPhase::StoppingWrites));
        assert_eq!(
            i.apply(&promote("b1", 2, PromotionKind::Switchover)),
            Response::Applied
        );
        assert_eq!(refused(&mut i, cancel), Refused::NoSwitchoverPending);
        // The JSON of an older meridianctl (no time) still decodes.
        let c: Command = serde_json::from_str(r#"{"type":"clear_switchover"}"#).unwrap();
        assert_eq!(c, Command::ClearSwitchover { at_unix_ms: 0 });
    }

    #[test]
    fn the_write_pause_fills_the_switchover_entry_once() {
        let mut i = cluster();
        let pause = |g: u64, ms: u64| Command::RecordWritePause {
            generation: Generation(g),
            write_pause_ms: ms,
        };
        // No switchover made the current primary.
        assert_eq!(
            refused(&mut i, pause(1, 300)),
            Refused::NoWritePauseToRecord(Generation(1))
        );
        // A cancelled switchover keeps the primary: nothing to time either.
        i.apply(&begin("a1", "b1"));
        i.apply(&Command::ClearSwitchover { at_unix_ms: 3 });
        assert_eq!(
            refused(&mut i, pause(1, 300)),
            Refused::NoWritePauseToRecord(Generation(1))
        );
        i.apply(&begin("a1", "b1"));
        i.apply(&phase("b1", SwitchoverPhase::StoppingWrites));
        i.apply(&promote("b1", 2, PromotionKind::Switchover));
        assert!(matches!(
            refused(&mut i, pause(1, 300)),
            Refused::StaleGeneration { .. }
        ));
        let before = i.history.clone();
        assert_eq!(i.apply(&pause(2, 300)), Response::Applied);
        let (last, earlier) = i.history.split_last().unwrap();
        assert_eq!(
            earlier,
            &before[..before.len() - 1],
            "only the promotion entry changes"
        );
        assert_eq!(
            last,
            &HistoryEntry {
                write_pause_ms: Some(300),
                ..before.last().unwrap().clone()
            }
        );
        assert_eq!(
            serde_json::to_value(last).unwrap()["write_pause_ms"],
            300,
            "meridianctl reads this field"
        );
        // Once only.
        assert_eq!(
            refused(&mut i, pause(2, 400)),
            Refused::NoWritePauseToRecord(Generation(2))
        );
    }

    #[test]
    fn switchover_refuses_nofailover_target() {
        let mut i = cluster();
        i.apply(&Command::SetMemberTags {
            name: "b1".into(),
            tags: MemberTags {
                priority: 5,
                nofailover: true,
                ..MemberTags::default()
            },
        });
        assert_eq!(
            refused(&mut i, begin("a1", "b1")),
            Refused::NoFailover("b1".into())
        );
    }

    fn rec(g: u64, names: &[&str], k: u32) -> Command {
        Command::RecordSyncSet {
            generation: Generation(g),
            set: SyncSet {
                names: names.iter().map(|s| s.to_string()).collect(),
                k,
            },
            degraded: false,
            degraded_until_lsn: None,
        }
    }

    #[test]
    fn sync_set_rules() {
        let mut i = cluster();
        assert!(matches!(
            refused(&mut i, rec(0, &["a2"], 1)),
            Refused::StaleGeneration { .. }
        ));
        assert_eq!(
            refused(&mut i, rec(1, &["a1"], 1)),
            Refused::MemberIsPrimary("a1".into())
        );
        assert_eq!(
            refused(&mut i, rec(1, &["w1"], 1)),
            Refused::NotDataMember("w1".into())
        );
        assert_eq!(
            refused(&mut i, rec(1, &["nope"], 1)),
            Refused::UnknownMember("nope".into())
        );
        // k must fit the names: 1..=n, and 0 only for the empty (async) set.
        for (names, k) in [(&["a2", "b1"][..], 0), (&["a2", "b1"][..], 3), (&[][..], 1)] {
            assert_eq!(
                refused(&mut i, rec(1, names, k)),
                Refused::InvalidSyncQuorum {
                    k,
                    size: names.len()
                }
            );
        }
        assert_eq!(i.apply(&rec(1, &["a2", "b1"], 2)), Response::Applied);
        assert_eq!(i.sync_set, SyncSet::new(["a2", "b1"], 2));

        // Under required durability the record may not drop below the quorum...
        let policy = Policy {
            durability: Durability::Required,
            sync_quorum: 2,
            ..Policy::default()
        };
        assert_eq!(
            i.apply(&Command::SetPolicy {
                expected_version: None,
                policy: policy.clone(),
                reason: "zero loss".into(),
                at_unix_ms: 4
            }),
            Response::Applied
        );
        assert_eq!(
            refused(&mut i, rec(1, &["a2"], 1)),
            Refused::SyncSetBelowQuorum { size: 1, quorum: 2 }
        );
        // ...except to empty (no sync standby at all, e.g. every region went async)...
        assert_eq!(i.apply(&rec(1, &[], 0)), Response::Applied);
        assert_eq!(i.apply(&rec(1, &["a2", "b1"], 1)), Response::Applied);
        // ...and a policy no set of standbys could ever meet is refused (a larger quorum
        // than the record holds is fine: the record grows first).
        let policy3 = Policy {
            sync_quorum: 3,
            ..policy.clone()
        };
        let standbys = i
            .members
            .values()
            .filter(|m| m.kind == MemberKind::Data)
            .count()
            - 1;
        let unreachable = Policy {
            sync_quorum: standbys as u32 + 1,
            ..policy.clone()
        };
        assert_eq!(
            refused(
                &mut i,
                Command::SetPolicy {
                    expected_version: None,
                    policy: unreachable.clone(),
                    reason: "".into(),
                    at_unix_ms: 5
                }
            ),
            Refused::SyncQuorumUnreachable {
                quorum: unreachable.sync_quorum,
                standbys
            }
        );
        // Preferred durability may shrink below the quorum.
        let preferred = Policy {
            durability: Durability::Preferred,
            ..policy3
        };
        assert_eq!(
            i.apply(&Command::SetPolicy {
                expected_version: None,
                policy: preferred,
                reason: "availability first".into(),
                at_unix_ms: 6
            }),
            Response::Applied
        );
        assert_eq!(i.apply(&rec(1, &["a2"], 1)), Response::Applied);

        // A promotion of the only recorded name resets the record (nobody is left to
        // wait on); the new primary's first target is the same.
        assert_eq!(
            i.apply(&promote("a2", 2, PromotionKind::Manual)),
            Response::Applied
        );
        assert_eq!(i.sync_set, SyncSet::default());
        assert_eq!(
            i.sync_target.clone().map(|t| (t.generation, t.set)),
            Some((Generation(2), SyncSet::default()))
        );
    }

    /// Under `required` durability (the default) a promotion of the only recorded name
    /// does not leave the new primary acknowledging alone: its first target waits on the
    /// old primary (it rejoins as a standby) until the leader shapes the set.
    #[test]
    fn under_required_durability_a_new_primary_never_starts_without_a_sync_standby() {
        let mut i = cluster();
        assert_eq!(i.policy.durability, Durability::Required);
        assert_eq!(
            i.apply(&Command::RecordSyncSet {
                generation: Generation(1),
                set: SyncSet::new(["a2"], 1),
                degraded: false,
                degraded_until_lsn: None,
            }),
            Response::Applied
        );
        assert_eq!(
            i.apply(&promote("a2", 2, PromotionKind::Manual)),
            Response::Applied
        );
        assert_eq!(i.sync_set, SyncSet::new(["a1"], 1));
        assert_eq!(
            i.sync_target.clone().map(|t| (t.generation, t.set)),
            Some((Generation(2), SyncSet::new(["a1"], 1)))
        );
    }

    /// A promotion that carries no set where the old primary had one starts a primary that
    /// acknowledges alone: recorded from its first commit, cleared only by the leader.
    #[test]
    fn a_promotion_that_carries_no_sync_set_records_it_as_degraded() {
        let mut i = cluster();
        // (`required` would fill the carried set up with the old primary.)
        i.policy.durability = Durability::Preferred;
        i.apply(&Command::RecordSyncSet {
            generation: Generation(1),
            set: SyncSet::new(["a2"], 1),
            degraded: false,
            degraded_until_lsn: None,
        });
        assert!(!i.sync_degraded);
        i.apply(&promote("a2", 2, PromotionKind::Manual));
        assert_eq!(i.sync_set, SyncSet::default());
        assert!(i.sync_degraded);
        // Still degraded after the next promotion, though no set was recorded since.
        i.apply(&promote("b1", 3, PromotionKind::Manual));
        assert!(i.sync_degraded);
        i.apply(&Command::RecordSyncSet {
            generation: Generation(3),
            set: SyncSet::new(["a2"], 1),
            degraded: false,
            degraded_until_lsn: None,
        });
        assert!(!i.sync_degraded);
        // A set carried over keeps the new primary covered.
        i.apply(&promote("a1", 4, PromotionKind::Manual));
        assert!(!i.sync_degraded);
    }

    #[test]
    fn a_promotion_carries_the_sync_set_minus_the_new_primary() {
        let mut i = cluster();
        assert_eq!(
            i.apply(&Command::RecordSyncSet {
                generation: Generation(1),
                set: SyncSet::new(["a2", "b1"], 1),
                degraded: false,
                degraded_until_lsn: None,
            }),
            Response::Applied
        );
        assert_eq!(
            i.apply(&promote("a2", 2, PromotionKind::Manual)),
            Response::Applied
        );
        assert_eq!(i.sync_set, SyncSet::new(["b1"], 1));
        assert_eq!(
            i.sync_target.clone().map(|t| (t.generation, t.set)),
            Some((Generation(2), SyncSet::new(["b1"], 1)))
        );
        // The target may shrink within the record, never leave it.
        assert_eq!(
            i.apply(&Command::SetSyncTarget {
                generation: Generation(2),
                set: SyncSet::default(),
            }),
            Response::Applied
        );
        assert!(matches!(
            i.apply(&Command::SetSyncTarget {
                generation: Generation(2),
                set: SyncSet::new(["a1"], 1),
            }),
            Response::Refused(Refused::SyncTargetNotRecorded { .. })
        ));
        // `ANY 2 (b1)` would hang every commit for good.
        assert_eq!(
            i.apply(&Command::SetSyncTarget {
                generation: Generation(2),
                set: SyncSet {
                    names: ["b1".to_string()].into(),
                    k: 2
                },
            }),
            Response::Refused(Refused::InvalidSyncQuorum { k: 2, size: 1 })
        );
        assert!(matches!(
            i.apply(&Command::SetSyncTarget {
                generation: Generation(1),
                set: SyncSet::default(),
            }),
            Response::Refused(Refused::StaleGeneration { .. })
        ));
    }

    #[test]
    fn resume_bumps_the_generation_for_the_same_primary_only() {
        let mut i = cluster();
        let resume = |m: &str, g: u64| Command::Resume {
            member: m.into(),
            generation: Generation(g),
            reason: "no candidate".into(),
            at_unix_ms: 9,
        };
        assert_eq!(
            refused(&mut i, resume("a2", 2)),
            Refused::NotPrimary("a2".into())
        );
        assert!(matches!(
            refused(&mut i, resume("a1", 3)),
            Refused::StaleGeneration { .. }
        ));
        assert_eq!(i.apply(&resume("a1", 2)), Response::Applied);
        assert_eq!(
            (i.primary.as_deref(), i.generation, i.resumed),
            (Some("a1"), Generation(2), Some(Generation(2)))
        );
        // A promotion decided on generation 1 is now stale.
        assert!(matches!(
            refused(&mut i, promote("a2", 2, PromotionKind::Failover)),
            Refused::StaleGeneration { .. }
        ));
        assert_eq!(
            i.apply(&promote("a2", 3, PromotionKind::Failover)),
            Response::Applied
        );
        assert_eq!(i.resumed, None);
    }

    #[test]
    fn reinit_is_recorded_and_cleared() {
        let mut i = cluster();
        let cmd = |n: &str| Command::Reinit { name: n.into() };
        assert_eq!(i.apply(&cmd("a2")), Response::Applied);
        assert!(i.reinit.contains("a2"));
        assert_eq!(
            refused(&mut i, cmd("a1")),
            Refused::MemberIsPrimary("a1".into())
        );
        assert_eq!(
            refused(&mut i, cmd("w1")),
            Refused::NotDataMember("w1".into())
        );
        assert_eq!(
            i.apply(&Command::ReinitDone { name: "a2".into() }),
            Response::Applied
        );
        assert_eq!(
            refused(&mut i, Command::ReinitDone { name: "a2".into() }),
            Refused::NoReinitPending("a2".into())
        );
    }

    #[test]
    fn system_identifier_is_recorded_once_and_old_intents_decode() {
        let mut i = cluster();
        let rec = |id: u64| Command::RecordSystemIdentifier {
            member: "a1".into(),
            system_identifier: id,
        };
        assert_eq!(i.apply(&rec(7)), Response::Applied);
        assert_eq!(i.system_identifier, Some(7));
        assert_eq!(i.apply(&rec(7)), Response::Applied);
        assert_eq!(
            refused(&mut i, rec(8)),
            Refused::ForeignSystemIdentifier {
                member: "a1".into(),
                recorded: 7,
                got: 8
            }
        );
        assert_eq!(i.system_identifier, Some(7));
        // An intent serialized before the field existed still decodes.
        let mut v = serde_json::to_value(cluster()).unwrap();
        v.as_object_mut().unwrap().remove("system_identifier");
        let old: Intent = serde_json::from_value(v).unwrap();
        assert_eq!(old.system_identifier, None);
    }

    #[test]
    fn policy_validation() {
        let mut i = cluster();
        let set = |p: Policy| Command::SetPolicy {
            expected_version: None,
            policy: p,
            reason: "r".into(),
            at_unix_ms: 1,
        };
        assert_eq!(
            refused(
                &mut i,
                set(Policy {
                    sync_quorum: 0,
                    ..Default::default()
                })
            ),
            Refused::InvalidPolicy(
                "policy sync_quorum = \"0\": must be at least 1 (ANY 0 would wait for nobody; \
                 use mode = async instead)"
                    .into()
            )
        );
        assert!(matches!(
            refused(
                &mut i,
                set(Policy {
                    commit_latency_budget_ms: crate::policy::MAX_COMMIT_LATENCY_BUDGET_MS + 1,
                    ..Default::default()
                })
            ),
            Refused::InvalidPolicy(_)
        ));
        let mut bad_region = Policy::default();
        bad_region
            .regions
            .insert("bad region".into(), RegionPolicy::default());
        assert!(matches!(
            refused(&mut i, set(bad_region)),
            Refused::InvalidPolicy(_)
        ));
        assert_eq!(
            refused(
                &mut i,
                Command::SetPolicy {
                    expected_version: None,
                    policy: Policy::default(),
                    reason: "x".repeat(MAX_REASON_LEN + 1),
                    at_unix_ms: 1
                }
            ),
            Refused::ReasonTooLong
        );
        assert_eq!(i.apply(&set(Policy::default())), Response::Applied);
        assert_eq!(i.history.last().unwrap().kind, HistoryKind::Policy);
    }

    /// Two operators read version 0 and both edit: the second edit is refused, naming both
    /// versions, and changes nothing.
    #[test]
    fn a_policy_edit_made_on_a_stale_version_is_refused() {
        let mut i = cluster();
        assert_eq!(i.policy_version, 0);
        let edit = |quorum: u32, expected: Option<u64>| Command::SetPolicy {
            policy: Policy {
                sync_quorum: quorum,
                ..Policy::default()
            },
            reason: format!("sync_quorum={quorum}"),
            at_unix_ms: 7,
            expected_version: expected,
        };
        assert_eq!(i.apply(&edit(2, Some(0))), Response::Applied);
        assert_eq!((i.policy.sync_quorum, i.policy_version), (2, 1));
        let before = i.clone();
        let r = i.apply(&edit(3, Some(0)));
        assert_eq!(
            r,
            Response::Refused(Refused::StalePolicyVersion {
                expected: 0,
                current: 1
            })
        );
        assert_eq!(i, before, "a refused edit changed the intent");
        let Response::Refused(refused) = r else {
            unreachable!()
        };
        assert_eq!(
            refused.to_string(),
            "the policy changed meanwhile: this change was made on policy version 0, the \
             cluster's policy is at version 1; read it again and retry"
        );
        // On the current version, or without a version (the runtime, older clients), it applies.
        assert_eq!(i.apply(&edit(2, Some(1))), Response::Applied);
        assert_eq!(i.apply(&edit(1, None)), Response::Applied);
        assert_eq!((i.policy.sync_quorum, i.policy_version), (1, 3));
        // The version survives a snapshot; an older snapshot without it starts at 0.
        let json = serde_json::to_string(&i).unwrap();
        assert_eq!(
            serde_json::from_str::<Intent>(&json)
                .unwrap()
                .policy_version,
            3
        );
        let old: Intent = serde_json::from_str(r#"{"policy": {}}"#).unwrap();
        assert_eq!(old.policy_version, 0);
        // A command without the field (older meridianctl) decodes to None.
        let c: Command = serde_json::from_str(
            r#"{"type":"set_policy","policy":{},"reason":"r","at_unix_ms":1}"#,
        )
        .unwrap();
        assert!(matches!(
            c,
            Command::SetPolicy {
                expected_version: None,
                ..
            }
        ));
    }

    #[test]
    fn intent_uses_the_policy_defaults() {
        assert_eq!(Intent::default().policy, Policy::default());
        // A partial policy in an intent's JSON fills the rest from the policy defaults.
        let parsed: Intent = serde_json::from_str(r#"{"policy": {"sync_quorum": 2}}"#).unwrap();
        assert_eq!(
            parsed.policy,
            Policy {
                sync_quorum: 2,
                ..Policy::default()
            }
        );
        assert_eq!(parsed.sync_set, SyncSet::default());
    }

    #[test]
    fn history_is_bounded_and_append_history_checks_reason() {
        let mut i = Intent::default();
        let entry = HistoryEntry {
            at_unix_ms: 1,
            kind: HistoryKind::Note,
            reason: "sync set shrunk".into(),
            old_primary: None,
            new_primary: None,
            generation: Generation(0),
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: None,
            write_pause_ms: None,
        };
        for _ in 0..MAX_HISTORY_ENTRIES + 5 {
            assert_eq!(
                i.apply(&Command::AppendHistory(entry.clone())),
                Response::Applied
            );
        }
        assert_eq!(i.history.len(), MAX_HISTORY_ENTRIES);
        let long = HistoryEntry {
            reason: "x".repeat(MAX_REASON_LEN + 1),
            ..entry
        };
        assert_eq!(
            refused(&mut i, Command::AppendHistory(long)),
            Refused::ReasonTooLong
        );
    }

    #[test]
    fn commands_and_responses_round_trip_through_json() {
        let cmds = vec![
            promote("a2", 2, PromotionKind::Failover),
            Command::ClearSwitchover { at_unix_ms: 4 },
            Command::SetMaintenance { on: true },
            rec(1, &["a2", "b1"], 1),
            begin("a1", "b1"),
            phase(
                "b1",
                SwitchoverPhase::Aborting(SwitchoverAbort::TargetDidNotCatchUp {
                    received_lsn: None,
                    final_lsn: Lsn(7),
                }),
            ),
            Command::AbandonSwitchover {
                to: "b1".into(),
                reason: SwitchoverAbort::TargetNotEligible(Rejection::RegionFailoverManual {
                    region: "b".into(),
                }),
                at_unix_ms: 3,
            },
        ];
        for c in cmds {
            let s = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Command>(&s).unwrap(), c);
        }
        let r = Response::Refused(Refused::StaleGeneration {
            expected: Generation(2),
            got: Generation(1),
        });
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), r);
        let r = Response::Refused(Refused::InvalidSwitchoverPhase {
            from: Some(SwitchoverPhase::Requested),
            to: aborting(),
        });
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), r);
        // An operator's JSON need not name the phase of a switchover it begins.
        let c: Command = serde_json::from_str(
            r#"{"type":"begin_switchover","from":"a1","to":"b1","started_at_unix_ms":1}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            Command::BeginSwitchover(PendingSwitchover {
                from: "a1".into(),
                to: "b1".into(),
                started_at_unix_ms: 1,
                phase: SwitchoverPhase::Requested,
            })
        );
        let i = cluster();
        let s = serde_json::to_string(&i).unwrap();
        assert_eq!(serde_json::from_str::<Intent>(&s).unwrap(), i);
    }
}
