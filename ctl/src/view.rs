//! What meridianctl shows, derived from a status answer: member rows (role, state, lag),
//! the voter-placement warning, and their renderings (table, tree by region, history),
//! plus the stable JSON shapes `--json` prints. Pure: no I/O, no clocks.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use meridian_node::raft::intent::{HistoryKind, MemberKind};
use meridian_node::raft::Intent;
use meridian_node::types::Lsn;
use meridian_proto::{MemberStatus, StatusResponse, WalReceiverStatus};
use serde::Serialize;

/// An observation older than this means the leader has lost touch with the member, when
/// the leader does not say its own bound (an agent older than `stale_after_ms`).
pub const STALE_AFTER_MS: i64 = 3_000;

/// The staleness bound of the answering leader (the one its decisions use), else
/// [`STALE_AFTER_MS`].
pub fn stale_after_ms(status: &StatusResponse) -> i64 {
    if status.stale_after_ms > 0 {
        status.stale_after_ms
    } else {
        STALE_AFTER_MS
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberRow {
    pub name: String,
    pub region: String,
    pub kind: String,
    /// primary | sync standby | async standby | witness | unknown
    pub role: String,
    /// running | streaming | catching up | in recovery | stopped | fenced | cloning |
    /// rewinding | re-cloning | promoting | unreachable | unknown
    pub state: String,
    pub timeline: Option<u32>,
    /// Bytes of WAL the primary has that this standby has not received.
    pub lag_bytes: Option<u64>,
    /// Age of the leader's latest observation of the member.
    pub last_seen_ms: Option<u64>,
    pub raft_role: String,
    pub voter: bool,
    /// The member its Postgres streams from.
    pub upstream: Option<String>,
    pub version: Option<String>,
    /// The last probe's error, when it failed.
    pub error: Option<String>,
    /// What the member's agent is doing to its Postgres (e.g. "rewinding from a2").
    pub activity: Option<String>,
    /// `meridianctl reinit` asked for a re-clone that has not finished yet.
    pub reinit_pending: bool,
    /// Parameters whose change waits for a restart of this member's Postgres
    /// (`pg_settings.pending_restart`); `meridianctl restart --pending` clears them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SwitchoverRow {
    pub from: String,
    pub to: String,
    pub phase: serde_json::Value,
    pub started_at_unix_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScheduledRow {
    pub kind: String,
    pub at_unix_ms: i64,
    pub what: String,
}

/// `meridianctl list --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    pub cluster: String,
    pub leader: Option<String>,
    pub term: u64,
    pub generation: u64,
    pub primary: Option<String>,
    pub paused: bool,
    /// False when no leader answered: observations are then missing and the rest may be stale.
    pub from_leader: bool,
    pub answered_by: String,
    pub sync_standbys: Vec<String>,
    pub sync_quorum: u32,
    /// The intent records that the primary may acknowledge with no sync standby although
    /// the policy asks for one: no automatic failover then without `async_failover`.
    pub sync_degraded: bool,
    pub pending_switchover: Option<SwitchoverRow>,
    /// Scheduled switchover / restart (`--scheduled`), as text with their times.
    pub scheduled: Vec<ScheduledRow>,
    pub warnings: Vec<String>,
    pub members: Vec<MemberRow>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// The best position the cluster knows: the primary's own, else the furthest standby's.
/// The primary's current WAL position from its own observation, when that observation is
/// fresh (no older than the leader's [`stale_after_ms`]); None otherwise: a lag measured
/// against an old position would look smaller than it is.
fn primary_lsn(status: &StatusResponse, intent: &Intent) -> Option<u64> {
    let p = intent.primary.as_deref()?;
    let m = status.members.iter().find(|m| m.name == p)?;
    let pg = fresh_pg(m, stale_after_ms(status))?;
    (pg.up && !pg.in_recovery && pg.current_lsn > 0).then_some(pg.current_lsn)
}

/// A member's Postgres observation if the leader received it recently.
fn fresh_pg(m: &MemberStatus, stale_ms: i64) -> Option<&meridian_proto::PostgresObservation> {
    if !(0..=stale_ms).contains(&m.observation_age_ms) {
        return None;
    }
    m.observation.as_ref().and_then(|o| o.postgres.as_ref())
}

pub fn member_row(m: &MemberStatus, intent: &Intent, status: &StatusResponse) -> MemberRow {
    let is_primary = intent.primary.as_deref() == Some(m.name.as_str());
    let role = match m.kind.as_str() {
        "witness" => "witness",
        _ if is_primary => "primary",
        "data" if intent.sync_set.names.contains(&m.name) => "sync standby",
        "data" => "async standby",
        _ => "unknown",
    };
    let obs = m.observation.as_ref();
    let pg = obs.and_then(|o| o.postgres.as_ref());
    let fresh = obs.is_some()
        && m.observation_age_ms >= 0
        && m.observation_age_ms <= stale_after_ms(status);
    let activity = pg.and_then(|pg| non_empty(&pg.activity));
    let reinit_pending = intent.reinit.contains(&m.name);
    // A long operation on the data dir says more than the probe of a Postgres it stopped.
    let busy = activity.as_deref().and_then(|a| {
        if a.starts_with("reinit") {
            Some("re-cloning")
        } else if a.starts_with("cloning") {
            Some("cloning")
        } else if a.starts_with("rewinding") {
            Some("rewinding")
        } else if a.starts_with("promoting") {
            Some("promoting")
        } else {
            None
        }
    });
    let state = if !status.from_leader {
        "unknown"
    } else if obs.is_none() || !fresh {
        "unreachable"
    } else if m.kind == "witness" {
        "running"
    } else if let Some(busy) = busy {
        busy
    } else {
        match pg {
            None => "unknown",
            Some(pg) if pg.fenced => "fenced",
            Some(pg) if !pg.up => "stopped",
            Some(pg) if !pg.in_recovery => "running",
            Some(pg) => match WalReceiverStatus::try_from(pg.wal_receiver) {
                Ok(WalReceiverStatus::Streaming) => "streaming",
                Ok(WalReceiverStatus::Starting | WalReceiverStatus::Waiting) => "catching up",
                _ => "in recovery",
            },
        }
    };
    let up_pg = pg.filter(|pg| pg.up);
    // What reads on the standby see: the primary's current position minus its replay
    // position, both freshly observed (the same definition as `/replica?lag=`).
    let lag_bytes = match fresh_pg(m, stale_after_ms(status)).filter(|pg| pg.up) {
        Some(pg) if pg.in_recovery => {
            primary_lsn(status, intent).map(|p| p.saturating_sub(pg.replayed_lsn))
        }
        _ => None,
    };
    MemberRow {
        name: m.name.clone(),
        region: m.region.clone(),
        kind: m.kind.clone(),
        role: role.to_string(),
        state: state.to_string(),
        timeline: up_pg.map(|pg| pg.timeline).filter(|t| *t > 0),
        lag_bytes,
        last_seen_ms: obs.and_then(|_| u64::try_from(m.observation_age_ms).ok()),
        raft_role: m.raft_role.clone(),
        voter: m.voter,
        upstream: pg.and_then(|pg| non_empty(&pg.upstream)),
        version: obs.and_then(|o| non_empty(&o.version)),
        error: pg.and_then(|pg| non_empty(&pg.error)),
        activity,
        reinit_pending,
        pending_restart: up_pg
            .filter(|_| fresh)
            .map(|pg| pg.pending_restart.clone())
            .unwrap_or_default(),
    }
}

/// Voter placement: the group keeps a majority after losing any one region only if every
/// region holds fewer voters than the others together hold beyond half.
pub fn placement_warning<'a>(voter_regions: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut by_region: BTreeMap<&str, usize> = BTreeMap::new();
    for r in voter_regions {
        *by_region.entry(r).or_default() += 1;
    }
    let total: usize = by_region.values().sum();
    if total == 0 {
        return None;
    }
    let majority = total / 2 + 1;
    let fatal: Vec<String> = by_region
        .iter()
        .filter(|(_, n)| total - **n < majority)
        .map(|(r, n)| format!("{r} ({n} of {total})"))
        .collect();
    if fatal.is_empty() {
        return None;
    }
    Some(format!(
        "voter placement cannot survive the loss of region {}: a majority needs {majority} of {total} voters; \
         place voters so no region holds {limit} or more (e.g. 2 + 2 data members and a witness in a third region)",
        fatal.join(", "),
        limit = total - majority + 1,
    ))
}

pub fn cluster_view(status: &StatusResponse, intent: &Intent) -> ClusterView {
    let mut members: Vec<MemberRow> = status
        .members
        .iter()
        .map(|m| member_row(m, intent, status))
        .collect();
    members.sort_by(|a, b| (&a.region, &a.name).cmp(&(&b.region, &b.name)));
    let mut warnings = Vec::new();
    if !status.from_leader {
        warnings.push(format!(
            "no leader answered: this is {}'s own view ({}); observations are missing and it may be stale",
            status.answered_by,
            if status.answered_role.is_empty() { "unknown role" } else { &status.answered_role }
        ));
    }
    if let Some(w) = placement_warning(
        status
            .members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.region.as_str()),
    ) {
        warnings.push(w);
    }
    if intent.primary.is_none() {
        warnings.push("no primary is recorded".to_string());
    }
    if status.insecure {
        warnings.push(format!(
            "INSECURE: {} runs with [security] insecure = true: member links are not \
             authenticated and anyone who can reach a member's port can change the cluster",
            status.answered_by
        ));
    }
    ClusterView {
        cluster: status.cluster.clone(),
        leader: non_empty(&status.leader),
        term: status.term,
        generation: status.generation,
        primary: intent.primary.clone(),
        paused: status.paused,
        from_leader: status.from_leader,
        answered_by: status.answered_by.clone(),
        sync_standbys: intent.sync_set.names.iter().cloned().collect(),
        sync_quorum: intent.sync_set.k,
        sync_degraded: intent.sync_degraded,
        pending_switchover: intent.pending_switchover.as_ref().map(|sw| SwitchoverRow {
            from: sw.from.clone(),
            to: sw.to.clone(),
            phase: serde_json::to_value(&sw.phase).unwrap_or_default(),
            started_at_unix_ms: sw.started_at_unix_ms,
        }),
        scheduled: intent
            .scheduled
            .iter()
            .map(|s| ScheduledRow {
                kind: s.op.kind().to_string(),
                at_unix_ms: s.at_unix_ms,
                what: s.to_string(),
            })
            .collect(),
        warnings,
        members,
    }
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub fn age(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(ms) if ms < 10_000 => format!("{:.1}s ago", ms as f64 / 1000.0),
        Some(ms) => format!("{}s ago", ms / 1000),
    }
}

/// A plain ASCII table; the first row is the header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let rule = {
        let parts: Vec<String> = widths.iter().map(|w| "-".repeat(w + 2)).collect();
        format!("+{}+\n", parts.join("+"))
    };
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!(" {c:<w$} "))
            .collect();
        format!("|{}|\n", parts.join("|"))
    };
    let mut out = rule.clone();
    out.push_str(&line(header.iter().map(|h| h.to_string()).collect()));
    out.push_str(&rule);
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out.push_str(&rule);
    out
}

fn headline(v: &ClusterView) -> String {
    let mut s = format!(
        "Cluster: {}  generation: {}  primary: {}  leader: {} (term {})",
        v.cluster,
        v.generation,
        v.primary.as_deref().unwrap_or("none"),
        v.leader.as_deref().unwrap_or("none"),
        v.term
    );
    if v.paused {
        s.push_str("  [PAUSED: maintenance mode, no automatic failover]");
    }
    s.push('\n');
    if !v.sync_standbys.is_empty() {
        s.push_str(&format!(
            "Sync standbys: ANY {} ({})\n",
            v.sync_quorum,
            v.sync_standbys.join(", ")
        ));
    }
    if v.sync_degraded {
        s.push_str(
            "Sync set DEGRADED: the primary may acknowledge commits no standby holds; \
             no automatic failover until a sync standby caught up (or async_failover = true)\n",
        );
    }
    if let Some(sw) = &v.pending_switchover {
        s.push_str(&format!(
            "Switchover pending: {} -> {} (phase {})\n",
            sw.from,
            sw.to,
            phase_name(&sw.phase)
        ));
    }
    for sch in &v.scheduled {
        s.push_str(&format!("Scheduled: {}\n", sch.what));
    }
    s
}

fn phase_name(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn warnings(v: &ClusterView) -> String {
    v.warnings
        .iter()
        .map(|w| format!("WARNING: {w}\n"))
        .collect()
}

/// The state, with what the agent is doing (or a pending reinit) when that adds something.
fn state_cell(m: &MemberRow) -> String {
    let mut s = m.state.clone();
    match &m.activity {
        Some(a) if *a != m.state => s.push_str(&format!(" ({a})")),
        None if m.reinit_pending => s.push_str(" (reinit pending)"),
        _ => {}
    }
    if !m.pending_restart.is_empty() {
        s.push_str(&format!(
            " [pending restart: {}]",
            m.pending_restart.join(", ")
        ));
    }
    s
}

pub fn render_list(v: &ClusterView) -> String {
    let rows: Vec<Vec<String>> = v
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.region.clone(),
                m.kind.clone(),
                m.role.clone(),
                state_cell(m),
                dash(m.timeline),
                dash(m.lag_bytes),
                age(m.last_seen_ms),
                format!(
                    "{}{}",
                    m.raft_role,
                    if m.voter { "" } else { " (non-voter)" }
                ),
            ]
        })
        .collect();
    let mut out = headline(v);
    out.push_str(&table(
        &[
            "Member",
            "Region",
            "Kind",
            "Role",
            "State",
            "TL",
            "Lag (bytes)",
            "Last seen",
            "Raft",
        ],
        &rows,
    ));
    out.push_str(&warnings(v));
    out
}

pub fn render_topology(v: &ClusterView) -> String {
    let mut regions: BTreeMap<&str, Vec<&MemberRow>> = BTreeMap::new();
    for m in &v.members {
        regions.entry(&m.region).or_default().push(m);
    }
    let mut out = headline(v);
    out.push_str(&format!("{}\n", v.cluster));
    let n = regions.len();
    for (i, (region, members)) in regions.iter().enumerate() {
        let last_region = i + 1 == n;
        out.push_str(&format!(
            "{} region {region}\n",
            if last_region {
                "└──"
            } else {
                "├──"
            }
        ));
        let indent = if last_region { "    " } else { "│   " };
        for (j, m) in members.iter().enumerate() {
            let branch = if j + 1 == members.len() {
                "└──"
            } else {
                "├──"
            };
            let mut line = format!(
                "{indent}{branch} {}  [{}] {}",
                m.name,
                m.role,
                state_cell(m)
            );
            if let Some(up) = &m.upstream {
                line.push_str(&format!("  <- {up}"));
            }
            if let Some(tl) = m.timeline {
                line.push_str(&format!("  TL {tl}"));
            }
            if let Some(lag) = m.lag_bytes {
                line.push_str(&format!("  lag {lag} B"));
            }
            line.push('\n');
            out.push_str(&line);
        }
    }
    out.push_str(&warnings(v));
    out
}

/// One history entry, as `history --json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HistoryRow {
    pub at_unix_ms: i64,
    pub time: String,
    pub kind: String,
    pub reason: String,
    pub old_primary: Option<String>,
    pub new_primary: Option<String>,
    pub generation: u64,
    pub old_primary_lsn: Option<String>,
    pub new_primary_lsn: Option<String>,
    pub possible_loss_bytes: Option<u64>,
    /// The write pause the runtime measured for a switchover, when it records one.
    pub write_pause_ms: Option<u64>,
}

pub fn time_of(unix_ms: i64) -> String {
    match u64::try_from(unix_ms) {
        Ok(ms) => {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Err(_) => "-".into(),
    }
}

/// Promotions (and abandoned switchovers) by default; every entry with `all`.
pub fn history_rows(intent: &Intent, raw: &serde_json::Value, all: bool) -> Vec<HistoryRow> {
    let raw_entries = raw["history"].as_array();
    intent
        .history
        .iter()
        .enumerate()
        .filter(|(_, h)| {
            all || matches!(
                h.kind,
                HistoryKind::Bootstrap | HistoryKind::Failover | HistoryKind::Switchover
            )
        })
        .map(|(i, h)| HistoryRow {
            at_unix_ms: h.at_unix_ms,
            time: time_of(h.at_unix_ms),
            kind: serde_json::to_value(h.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            reason: h.reason.clone(),
            old_primary: h.old_primary.clone(),
            new_primary: h.new_primary.clone(),
            generation: h.generation.0,
            old_primary_lsn: h.old_primary_lsn.map(|l: Lsn| l.to_string()),
            new_primary_lsn: h.new_primary_lsn.map(|l: Lsn| l.to_string()),
            possible_loss_bytes: h.possible_loss_bytes,
            write_pause_ms: raw_entries
                .and_then(|e| e.get(i))
                .and_then(|e| e["write_pause_ms"].as_u64()),
        })
        .collect()
}

pub fn render_history(rows: &[HistoryRow]) -> String {
    if rows.is_empty() {
        return "No failover or switchover recorded.\n".into();
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|h| {
            let mut reason = h.reason.clone();
            if let Some(p) = h.write_pause_ms {
                reason.push_str(&format!(" (writes paused {p} ms)"));
            }
            vec![
                h.time.clone(),
                h.kind.clone(),
                h.generation.to_string(),
                dash(h.old_primary.clone()),
                dash(h.new_primary.clone()),
                dash(h.old_primary_lsn.clone()),
                dash(h.new_primary_lsn.clone()),
                dash(h.possible_loss_bytes),
                reason,
            ]
        })
        .collect();
    table(
        &[
            "Time (UTC)",
            "Kind",
            "Gen",
            "Old primary",
            "New primary",
            "Old LSN",
            "New LSN",
            "Possible loss (bytes)",
            "Reason",
        ],
        &cells,
    )
}

/// Whether a member is a data member of the intent.
pub fn is_data(intent: &Intent, name: &str) -> bool {
    intent
        .member(name)
        .is_some_and(|m| m.kind == MemberKind::Data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_proto::{Observation, PostgresObservation};

    fn intent() -> Intent {
        let mut i = crate::test_support::four_member_intent();
        i.sync_set.names.insert("a2".into());
        i.sync_set.k = 1;
        i
    }

    fn member(
        name: &str,
        region: &str,
        kind: &str,
        pg: Option<PostgresObservation>,
        age_ms: i64,
    ) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            region: region.into(),
            kind: kind.into(),
            voter: true,
            raft_role: "follower".into(),
            observation: (age_ms >= 0).then(|| Observation {
                member: name.into(),
                postgres: pg,
                version: "0.1.0".into(),
                ..Observation::default()
            }),
            observation_age_ms: age_ms,
            ..MemberStatus::default()
        }
    }

    fn status() -> StatusResponse {
        let standby = |received: u64, wal: WalReceiverStatus| PostgresObservation {
            up: true,
            in_recovery: true,
            timeline: 1,
            received_lsn: received,
            replayed_lsn: received,
            wal_receiver: wal as i32,
            upstream: "a1".into(),
            ..PostgresObservation::default()
        };
        StatusResponse {
            cluster: "c".into(),
            leader: "a1".into(),
            generation: 1,
            from_leader: true,
            answered_by: "a1".into(),
            members: vec![
                member(
                    "a1",
                    "east",
                    "data",
                    Some(PostgresObservation {
                        up: true,
                        timeline: 1,
                        current_lsn: 1000,
                        ..PostgresObservation::default()
                    }),
                    100,
                ),
                member(
                    "a2",
                    "east",
                    "data",
                    Some(standby(1000, WalReceiverStatus::Streaming)),
                    150,
                ),
                member(
                    "b1",
                    "west",
                    "data",
                    Some(standby(400, WalReceiverStatus::Waiting)),
                    9_000,
                ),
                member("w1", "eu", "witness", None, -1),
            ],
            ..StatusResponse::default()
        }
    }

    #[test]
    fn rows_carry_roles_states_and_lag() {
        let v = cluster_view(&status(), &intent());
        let by: BTreeMap<&str, &MemberRow> =
            v.members.iter().map(|m| (m.name.as_str(), m)).collect();
        assert_eq!(by["a1"].role, "primary");
        assert_eq!(by["a1"].state, "running");
        assert_eq!(by["a1"].lag_bytes, None);
        assert_eq!(by["a2"].role, "sync standby");
        assert_eq!(by["a2"].state, "streaming");
        assert_eq!(by["a2"].lag_bytes, Some(0));
        assert_eq!(by["b1"].role, "async standby");
        assert_eq!(
            by["b1"].state, "unreachable",
            "a 9 s old observation is stale"
        );
        assert_eq!(
            by["b1"].lag_bytes, None,
            "the lag of a standby last heard of 9 s ago is unknown"
        );
        assert_eq!(by["w1"].role, "witness");
        assert_eq!(by["w1"].state, "unreachable");
        assert_eq!(by["w1"].last_seen_ms, None);
        assert_eq!(v.sync_standbys, ["a2"]);
        // 2 of 4 voters in east: losing east leaves 2, a majority needs 3.
        assert_eq!(v.warnings.len(), 1, "{:?}", v.warnings);
        assert!(v.warnings[0].contains("east (2 of 4)"), "{:?}", v.warnings);
    }

    #[test]
    fn lag_is_unknown_when_the_primary_was_not_heard_of_recently() {
        let mut st = status();
        st.members[0].observation_age_ms = STALE_AFTER_MS + 1;
        let v = cluster_view(&st, &intent());
        let a2 = v.members.iter().find(|m| m.name == "a2").unwrap();
        assert_eq!(a2.lag_bytes, None);
        // Fresh again, behind by what it has not replayed.
        let mut st = status();
        if let Some(pg) = st.members[1]
            .observation
            .as_mut()
            .and_then(|o| o.postgres.as_mut())
        {
            pg.replayed_lsn = 300;
        }
        let v = cluster_view(&st, &intent());
        let a2 = v.members.iter().find(|m| m.name == "a2").unwrap();
        assert_eq!(a2.lag_bytes, Some(700));
        // The leader's own bound wins over the fallback, both ways.
        let mut st = status();
        st.stale_after_ms = 1_000;
        st.members[0].observation_age_ms = 1_500;
        let v = cluster_view(&st, &intent());
        let a2 = v.members.iter().find(|m| m.name == "a2").unwrap();
        assert_eq!(
            a2.lag_bytes, None,
            "1.5 s is stale for a leader whose bound is 1 s"
        );
        let mut st = status();
        st.stale_after_ms = 10_000;
        st.members[0].observation_age_ms = STALE_AFTER_MS + 1;
        let v = cluster_view(&st, &intent());
        let a2 = v.members.iter().find(|m| m.name == "a2").unwrap();
        assert!(
            a2.lag_bytes.is_some(),
            "fresh for a leader whose bound is 10 s"
        );
    }

    #[test]
    fn a_degraded_sync_set_is_shown() {
        let mut i = intent();
        assert!(!render_list(&cluster_view(&status(), &i)).contains("DEGRADED"));
        i.sync_degraded = true;
        let t = render_list(&cluster_view(&status(), &i));
        assert!(t.contains("Sync set DEGRADED"), "{t}");
    }

    #[test]
    fn table_and_tree_render_every_member() {
        let v = cluster_view(&status(), &intent());
        let t = render_list(&v);
        assert!(
            t.contains("| a2     | east   | data    | sync standby  | streaming"),
            "{t}"
        );
        assert!(t.contains("generation: 1  primary: a1"), "{t}");
        assert!(t.contains("WARNING: voter placement"), "{t}");
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(lines.len(), 5, "header + 4 members:\n{t}");
        let widths: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "aligned:\n{t}");
        let tree = render_topology(&v);
        assert!(
            tree.contains("├── region east\n│   ├── a1  [primary] running"),
            "{tree}"
        );
        assert!(
            tree.contains("a2  [sync standby] streaming  <- a1  TL 1  lag 0 B"),
            "{tree}"
        );
        assert!(tree.contains("└── region west\n    └── b1"), "{tree}");
    }

    #[test]
    fn long_operations_show_as_states() {
        let mut s = status();
        let mut i = intent();
        let pg_of = |s: &mut StatusResponse, n: usize| {
            s.members[n]
                .observation
                .as_mut()
                .unwrap()
                .postgres
                .as_mut()
                .unwrap()
                .clone()
        };
        let mut a2 = pg_of(&mut s, 1);
        a2.up = false;
        a2.activity = "reinit: re-cloning".into();
        s.members[1].observation.as_mut().unwrap().postgres = Some(a2);
        i.reinit.insert("a2".into());
        let v = cluster_view(&s, &i);
        let a2 = v.members.iter().find(|m| m.name == "a2").unwrap();
        assert_eq!(a2.state, "re-cloning");
        assert!(a2.reinit_pending);
        assert_eq!(a2.activity.as_deref(), Some("reinit: re-cloning"));
        let t = render_list(&v);
        assert!(t.contains("| re-cloning (reinit: re-cloning) |"), "{t}");
        let mut a1 = pg_of(&mut s, 0);
        a1.activity = "rewinding from a2".into();
        s.members[0].observation.as_mut().unwrap().postgres = Some(a1);
        let v = cluster_view(&s, &i);
        let a1 = v.members.iter().find(|m| m.name == "a1").unwrap();
        assert_eq!(a1.state, "rewinding");
        assert!(!a1.reinit_pending);
        assert!(render_topology(&v).contains("a1  [primary] rewinding (rewinding from a2)"));
    }

    #[test]
    fn a_follower_view_says_so() {
        let mut s = status();
        s.from_leader = false;
        s.answered_role = "follower".into();
        let v = cluster_view(&s, &intent());
        assert!(v.members.iter().all(|m| m.state == "unknown"));
        assert!(
            v.warnings[0].contains("no leader answered"),
            "{:?}",
            v.warnings
        );
    }

    #[test]
    fn an_insecure_cluster_is_warned_about() {
        let mut s = status();
        assert!(!cluster_view(&s, &intent())
            .warnings
            .iter()
            .any(|w| w.contains("INSECURE")));
        s.insecure = true;
        let v = cluster_view(&s, &intent());
        assert!(
            v.warnings
                .iter()
                .any(|w| w.contains("INSECURE") && w.contains("a1")),
            "{:?}",
            v.warnings
        );
    }

    #[test]
    fn placement_survives_one_region_loss_only_without_a_regional_majority() {
        assert_eq!(placement_warning(["a", "a", "b", "b", "c"]), None);
        assert_eq!(placement_warning(["a", "b", "c"]), None);
        assert_eq!(placement_warning(Vec::<&str>::new()), None);
        let w = placement_warning(["a", "a", "b"]).unwrap();
        assert!(
            w.contains("region a (2 of 3)") && w.contains("needs 2 of 3"),
            "{w}"
        );
        assert!(w.contains("no region holds 2 or more"), "{w}");
        let w = placement_warning(["a"]).unwrap();
        assert!(w.contains("a (1 of 1)"), "{w}");
        let w = placement_warning(["a", "a", "b", "b"]).unwrap();
        assert!(w.contains("a (2 of 4), b (2 of 4)"), "{w}");
    }

    #[test]
    fn history_keeps_promotions_and_reads_the_write_pause() {
        use meridian_node::raft::intent::HistoryEntry;
        use meridian_node::types::Generation;
        let mut i = intent();
        let entry = |kind, reason: &str, gen| HistoryEntry {
            at_unix_ms: 1_700_000_000_000,
            kind,
            reason: reason.into(),
            old_primary: Some("a1".into()),
            new_primary: Some("a2".into()),
            generation: Generation(gen),
            old_primary_lsn: Some(Lsn(0x1_0000_0010)),
            new_primary_lsn: None,
            possible_loss_bytes: Some(0),
            write_pause_ms: None,
        };
        i.history = vec![
            entry(HistoryKind::Member, "added", 0),
            entry(HistoryKind::Switchover, "planned", 2),
        ];
        let mut raw = serde_json::to_value(&i).unwrap();
        raw["history"][1]["write_pause_ms"] = 420.into();
        let rows = history_rows(&i, &raw, false);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].kind, "switchover");
        assert_eq!(rows[0].write_pause_ms, Some(420));
        assert_eq!(rows[0].old_primary_lsn.as_deref(), Some("1/10"));
        assert_eq!(rows[0].time, "2023-11-14T22:13:20.000Z");
        assert_eq!(history_rows(&i, &raw, true).len(), 2);
        let t = render_history(&rows);
        assert!(t.contains("(writes paused 420 ms)"), "{t}");
    }
}
