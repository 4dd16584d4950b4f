//! One bounded look at a running instance: role, timeline, WAL positions, the WAL receiver
//! (on a standby) and the connected standbys with their lag (on a primary).
//!
//! Timeline: on a just-promoted primary `pg_control_checkpoint()` still shows the old
//! timeline until the end-of-recovery checkpoint completes, so a primary's timeline is read
//! from the WAL file name of its insert position, which switches at promotion. A standby's
//! is the newer of the WAL receiver's `received_tli` and the last checkpoint's.
//!
//! Also owns the instance's kept session ([`KeptSession`]): probes and setting reads
//! reuse one open monitor-role session with prepared statements instead of a new session per
//! round. Probes are single-flight: the member loop and the reporter tick on the same grid
//! (`agent::Shared::tick_grid`), and a caller that arrives while a probe runs, or at most
//! [`PROBE_SHARE_WINDOW`] after one started, takes that probe's result instead of sending
//! the same query again (each query costs the server a wake-up, a transaction and a
//! `pg_control` read; at idle that was most of the agents' cost on Postgres).

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};

use super::error::PgError;
use super::instance::PgInstance;
use crate::types::Lsn;

/// What a probe saw. `up == false` means no session could be opened or a query failed
/// within the probe's bound; `error` then says why and the other fields are empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgStatus {
    pub up: bool,
    pub error: Option<String>,
    pub in_recovery: bool,
    pub timeline: Option<u32>,
    /// The primary's WAL write position (`pg_current_wal_lsn()`); None on a standby.
    pub current_lsn: Option<Lsn>,
    /// Standby: last WAL position received and flushed (`pg_last_wal_receive_lsn()`).
    pub received_lsn: Option<Lsn>,
    /// Standby: last WAL position replayed (`pg_last_wal_replay_lsn()`).
    pub replayed_lsn: Option<Lsn>,
    pub wal_receiver: Option<WalReceiverInfo>,
    /// Walsenders of this server (`pg_stat_replication`), sorted by application_name.
    pub standbys: Vec<StandbyInfo>,
    /// `synchronous_standby_names` as the server has it now (unparsed).
    pub synchronous_standby_names: Option<String>,
    /// Standby: milliseconds since the last replayed transaction was committed on the
    /// primary, 0 when everything received is replayed; None when unknown or a primary.
    pub replay_delay_ms: Option<u64>,
    /// `server_version_num`, e.g. 150004 (for Patroni's status document).
    pub server_version: Option<u32>,
    /// `pg_postmaster_start_time()` as text.
    pub postmaster_start_time: Option<String>,
    /// `pg_control_system().system_identifier` as text.
    pub system_identifier: Option<String>,
}

/// A standby's WAL receiver (`pg_stat_wal_receiver`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalReceiverInfo {
    /// `streaming`, `starting`, `waiting`, `restarting`, `stopping`...
    pub status: String,
    pub received_tli: Option<u32>,
    pub flushed_lsn: Option<Lsn>,
    pub sender_host: Option<String>,
    pub sender_port: Option<u16>,
    pub slot_name: Option<String>,
}

/// One connected standby as its primary sees it (`pg_stat_replication`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StandbyInfo {
    pub application_name: String,
    /// `streaming`, `catchup`, `startup`, `backup`, `stopping`.
    pub state: String,
    /// `async`, `potential`, `sync`, `quorum`.
    pub sync_state: String,
    pub sent_lsn: Option<Lsn>,
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// Bytes from the standby's replay position to the primary's current position; None
    /// until the standby has reported a replay position.
    pub lag_bytes: Option<u64>,
}

impl PgStatus {
    fn down(why: String) -> PgStatus {
        PgStatus {
            up: false,
            error: Some(why),
            ..PgStatus::default()
        }
    }

    /// The standby with this application_name, if connected.
    pub fn standby(&self, application_name: &str) -> Option<&StandbyInfo> {
        self.standbys
            .iter()
            .find(|s| s.application_name == application_name)
    }

    /// True when this is a standby whose WAL receiver is streaming.
    pub fn is_streaming(&self) -> bool {
        self.in_recovery
            && self
                .wal_receiver
                .as_ref()
                .is_some_and(|w| w.status == "streaming")
    }
}

/// Everything a probe reads, in one statement (one round trip, prepared once per kept
/// session): role, positions, timeline, the WAL receiver (at most one row), the
/// `synchronous_standby_names` in effect and the walsenders as JSON (without the lease
/// gate's, which is no member: `pg::gate`).
const STATUS_SQL: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
     pg_last_wal_receive_lsn()::text, \
     pg_last_wal_replay_lsn()::text, \
     (SELECT timeline_id FROM pg_control_checkpoint()), \
     r.pid, r.status, r.received_tli, r.flushed_lsn::text, r.sender_host, r.sender_port, \
     r.slot_name, current_setting('synchronous_standby_names'), \
     (SELECT coalesce(json_agg(json_build_array(coalesce(application_name, ''), \
        coalesce(state, ''), coalesce(sync_state, ''), sent_lsn::text, write_lsn::text, \
        flush_lsn::text, replay_lsn::text) ORDER BY application_name), '[]')::text \
      FROM pg_stat_replication WHERE application_name IS DISTINCT FROM 'meridian_lease_gate'), \
     CASE WHEN NOT pg_is_in_recovery() THEN NULL \
          WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0 \
          ELSE (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint END, \
     current_setting('server_version_num')::int, pg_postmaster_start_time()::text, \
     (SELECT system_identifier FROM pg_control_system())::text \
     FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true";

/// One setting's current value on the kept session.
const SETTING_SQL: &str = "SELECT current_setting($1)";

/// How long after a probe started another caller may take its result instead of probing
/// again: enough to catch the member loop and the reporter ticking together, far below any
/// bound the result feeds (fence after 1.5 s unresponsive, observations stale after 1 s).
pub const PROBE_SHARE_WINDOW: Duration = Duration::from_millis(30);

/// Reconnect backoff of a kept session after consecutive failed connects: first retry at
/// once, then doubling from this, capped at [`RECONNECT_MAX`].
const RECONNECT_BASE: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_millis(500);

/// The kept-open monitor-role session (local socket) of one instance, shared by its clones: the probes of
/// the observe loop, the member loop and the lease go over it, so an idle agent opens no
/// new Postgres session per round. A session whose query fails or times out is dropped
/// and reopened (at once, then with a bounded backoff while connects keep failing).
#[derive(Default)]
pub(crate) struct KeptSession {
    state: tokio::sync::Mutex<KeptState>,
    /// The last probe: when it started and ended and what it saw. Held across a probe, so
    /// callers arriving meanwhile wait for it and share its result (single flight).
    last_probe: tokio::sync::Mutex<Option<LastProbe>>,
}

struct LastProbe {
    started: Instant,
    ended: Instant,
    status: PgStatus,
}

impl LastProbe {
    /// Whether a caller that arrived at `arrived` may take this result: the probe was still
    /// running then (its answer came after the call, on the same session the call's own
    /// query would have queued behind), or started at most [`PROBE_SHARE_WINDOW`] before.
    fn answers(&self, arrived: Instant) -> bool {
        self.ended >= arrived || self.started + PROBE_SHARE_WINDOW >= arrived
    }
}

#[derive(Default)]
struct KeptState {
    session: Option<Arc<Session>>,
    /// Connects that failed in a row, when the next may be tried, and why the last failed.
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

struct Session {
    client: Client,
    status: Statement,
    setting: Statement,
}

impl KeptState {
    fn backoff(&self) -> Duration {
        let shift = self.failures.saturating_sub(1).min(16);
        RECONNECT_BASE
            .saturating_mul(1u32 << shift)
            .min(RECONNECT_MAX)
    }
}

impl PgInstance {
    /// The open kept session (and `true`), or a new one (bounded by `bound`, and `false`).
    async fn kept_session(&self, bound: Duration) -> Result<(Arc<Session>, bool), PgError> {
        let mut st = self.kept().state.lock().await;
        if let Some(s) = st.session.as_ref().filter(|s| !s.client.is_closed()) {
            return Ok((s.clone(), true));
        }
        st.session = None;
        if let Some(at) = st.retry_at.filter(|at| Instant::now() < *at) {
            return Err(PgError::state(
                "probe: connect",
                format!(
                    "{} (next attempt in {} ms)",
                    st.last_error,
                    at.saturating_duration_since(Instant::now()).as_millis()
                ),
            ));
        }
        let opened = async {
            let connect_bound = self.timeouts().connect.min(bound);
            let client = self
                .connect_monitor_within("probe: connect", connect_bound)
                .await?;
            let status = client
                .prepare(STATUS_SQL)
                .await
                .map_err(|e| PgError::sql("probe: prepare", e))?;
            let setting = client
                .prepare(SETTING_SQL)
                .await
                .map_err(|e| PgError::sql("probe: prepare", e))?;
            Ok::<_, PgError>(Session {
                client,
                status,
                setting,
            })
        };
        let opened = match tokio::time::timeout(bound, opened).await {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout {
                step: "probe: connect",
                timeout_ms: bound.as_millis() as u64,
            }),
        };
        match opened {
            Ok(s) => {
                let s = Arc::new(s);
                st.session = Some(s.clone());
                st.failures = 0;
                st.retry_at = None;
                Ok((s, false))
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                st.last_error = e.to_string();
                st.retry_at = Some(Instant::now() + st.backoff());
                Err(e)
            }
        }
    }

    /// Drops `s` if it is still the kept session (it failed or hung: not trusted again).
    async fn drop_kept(&self, s: &Arc<Session>) {
        let mut st = self.kept().state.lock().await;
        if st.session.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, s)) {
            st.session = None;
        }
    }

    /// Runs `f` on the kept session within `bound`. A session that was open before this
    /// call and fails is dropped and `f` is tried once more on a fresh one (the server
    /// may have restarted since the last round).
    async fn on_kept<T, F, Fut>(&self, bound: Duration, f: F) -> Result<T, PgError>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: std::future::Future<Output = Result<T, PgError>>,
    {
        let deadline = Instant::now() + bound;
        let left = || deadline.saturating_duration_since(Instant::now());
        let timeout = || PgError::Timeout {
            step: "probe",
            timeout_ms: bound.as_millis() as u64,
        };
        for attempt in 0..2 {
            let (s, was_open) = match tokio::time::timeout(left(), self.kept_session(left())).await
            {
                Ok(r) => r?,
                Err(_) => return Err(timeout()),
            };
            let reused = attempt == 0 && was_open;
            match tokio::time::timeout(left(), f(s.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    self.drop_kept(&s).await;
                    if !reused || left().is_zero() {
                        return Err(e);
                    }
                }
                Err(_) => {
                    self.drop_kept(&s).await;
                    return Err(timeout());
                }
            }
        }
        Err(timeout())
    }

    /// Probes the instance within the probe timeout (2 s by default), on the kept session.
    /// Never fails: an unreachable or misbehaving server gives `up == false` with the
    /// reason.
    ///
    /// A kept session answers even when the postmaster is frozen (SIGSTOP): its backend
    /// runs on and may still commit, while no new session can start. A fresh session per
    /// probe used to reveal that; now the postmaster's process state does, so a frozen
    /// primary is still seen unresponsive and fenced.
    ///
    /// Single flight: a probe still running when this call comes, or started at most
    /// [`PROBE_SHARE_WINDOW`] before it, answers this call too.
    pub async fn probe(&self) -> PgStatus {
        let arrived = Instant::now();
        let mut last = self.kept().last_probe.lock().await;
        if let Some(l) = last.as_ref().filter(|l| l.answers(arrived)) {
            return l.status.clone();
        }
        let started = Instant::now();
        let status = self.probe_now().await;
        *last = Some(LastProbe {
            started,
            ended: Instant::now(),
            status: status.clone(),
        });
        status
    }

    /// Drops the last probe's result, so the next probe asks the server (after the agent
    /// changed its settings).
    pub(crate) async fn forget_probe(&self) {
        *self.kept().last_probe.lock().await = None;
    }

    async fn probe_now(&self) -> PgStatus {
        if let Some(pid) = self.postmaster_pid() {
            if process_stopped(pid) {
                return PgStatus::down(format!(
                    "probe: the postmaster (pid {pid}) is stopped and accepts no sessions"
                ));
            }
        }
        let bound = self.timeouts().probe;
        let r = self
            .on_kept(
                bound,
                |s| async move { probe_with(&s.client, &s.status).await },
            )
            .await;
        match r {
            Ok(status) => status,
            Err(e) => PgStatus::down(e.to_string()),
        }
    }

    /// The current value of one server setting (`current_setting(name)`), on the kept
    /// session, bounded by the probe timeout.
    pub async fn setting(&self, name: &str) -> Result<String, PgError> {
        let bound = self.timeouts().probe;
        self.on_kept(bound, |s| async move {
            let row = s
                .client
                .query_one(&s.setting, &[&name])
                .await
                .map_err(|e| PgError::sql("read setting", e))?;
            Ok(row.get::<_, String>(0))
        })
        .await
    }
}

/// The rows of `pg_settings` validation needs, for the names given.
const CATALOG_SQL: &str = "SELECT name, vartype, context, unit, min_val, max_val, \
     coalesce(array_to_string(enumvals, E'\\x1f'), '') \
     FROM pg_settings WHERE name = ANY($1::text[])";

impl PgInstance {
    /// Parameters whose new value waits for a restart (`pg_settings.pending_restart`), on
    /// the kept session, bounded by the probe timeout. Sorted.
    pub async fn pending_restart(&self) -> Result<Vec<String>, PgError> {
        let bound = self.timeouts().probe;
        self.on_kept(bound, |s| async move {
            let rows = s
                .client
                .query(
                    "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name",
                    &[],
                )
                .await
                .map_err(|e| PgError::sql("read pending_restart", e))?;
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        })
        .await
    }

    /// The `pg_settings` rows of `names` (lowercase), on the kept session, bounded by the
    /// probe timeout. A name the server does not know has no entry.
    pub async fn catalog(
        &self,
        names: &[String],
    ) -> Result<Vec<crate::pgparams::CatalogEntry>, PgError> {
        let bound = self.timeouts().probe;
        let names = names.to_vec();
        self.on_kept(bound, |s| {
            let names = names.clone();
            async move {
                let rows = s
                    .client
                    .query(CATALOG_SQL, &[&names])
                    .await
                    .map_err(|e| PgError::sql("read pg_settings", e))?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        let enums: String = r.get(6);
                        crate::pgparams::CatalogEntry {
                            name: r.get(0),
                            vartype: r.get(1),
                            context: r.get(2),
                            unit: r.get(3),
                            min_val: r.get(4),
                            max_val: r.get(5),
                            enumvals: if enums.is_empty() {
                                Vec::new()
                            } else {
                                enums.split('\u{1f}').map(str::to_string).collect()
                            },
                        }
                    })
                    .collect())
            }
        })
        .await
    }
}

/// Whether process `pid` is stopped by a signal or traced (`T`/`t` in `/proc/PID/stat`).
fn process_stopped(pid: i32) -> bool {
    matches!(super::exec::proc_state(pid), Some(Some('T' | 't')))
}

fn lsn(s: Option<String>) -> Option<Lsn> {
    s.and_then(|s| Lsn::from_str(&s).ok())
}

/// The timeline encoded in the first 8 hex digits of a WAL file name.
pub(crate) fn timeline_of_walfile(name: &str) -> Option<u32> {
    u32::from_str_radix(name.get(..8)?, 16).ok()
}

/// The walsenders from the probe's JSON column: arrays of application_name, state,
/// sync_state, sent, write, flush and replay LSN.
fn standbys_from_json(json: &str, current_lsn: Option<Lsn>) -> Result<Vec<StandbyInfo>, String> {
    let rows: Vec<Vec<Option<String>>> =
        serde_json::from_str(json).map_err(|e| format!("probe: replication rows: {e}"))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let col = |i: usize| r.get(i).cloned().flatten();
            let replay_lsn = lsn(col(6));
            StandbyInfo {
                application_name: col(0).unwrap_or_default(),
                state: col(1).unwrap_or_default(),
                sync_state: col(2).unwrap_or_default(),
                sent_lsn: lsn(col(3)),
                write_lsn: lsn(col(4)),
                flush_lsn: lsn(col(5)),
                replay_lsn,
                lag_bytes: match (current_lsn, replay_lsn) {
                    (Some(cur), Some(rep)) => Some(cur.bytes_after(rep)),
                    _ => None,
                },
            }
        })
        .collect())
}

async fn probe_with(client: &Client, status: &Statement) -> Result<PgStatus, PgError> {
    let row = client
        .query_one(status, &[])
        .await
        .map_err(|e| PgError::sql("probe: status", e))?;
    let in_recovery: bool = row.get(0);
    let current_lsn = lsn(row.get(1));
    let walfile: Option<String> = row.get(2);
    let received_lsn = lsn(row.get(3));
    let replayed_lsn = lsn(row.get(4));
    let checkpoint_tli: Option<i32> = row.get(5);

    let wal_receiver = row.get::<_, Option<i32>>(6).map(|_pid| WalReceiverInfo {
        status: row.get::<_, Option<String>>(7).unwrap_or_default(),
        received_tli: row.get::<_, Option<i32>>(8).map(|t| t as u32),
        flushed_lsn: lsn(row.get(9)),
        sender_host: row.get(10),
        sender_port: row.get::<_, Option<i32>>(11).map(|p| p as u16),
        slot_name: row.get(12),
    });
    let synchronous_standby_names: Option<String> = row.get(13);

    let timeline = if in_recovery {
        let rx = wal_receiver
            .as_ref()
            .and_then(|w| w.received_tli)
            .filter(|t| *t > 0);
        let cp = checkpoint_tli.map(|t| t as u32);
        rx.max(cp)
    } else {
        walfile.as_deref().and_then(timeline_of_walfile)
    };

    let standbys = standbys_from_json(&row.get::<_, String>(14), current_lsn)
        .map_err(|what| PgError::state("probe: replication", what))?;

    Ok(PgStatus {
        up: true,
        error: None,
        in_recovery,
        timeline,
        current_lsn,
        received_lsn,
        replayed_lsn,
        wal_receiver,
        standbys,
        synchronous_standby_names,
        replay_delay_ms: row
            .get::<_, Option<i64>>(15)
            .map(|ms| u64::try_from(ms).unwrap_or(0)),
        server_version: row
            .get::<_, Option<i32>>(16)
            .and_then(|v| u32::try_from(v).ok()),
        postmaster_start_time: row.get(17),
        system_identifier: row.get(18),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_leaves_the_lease_gate_out_of_the_standbys() {
        assert!(STATUS_SQL.contains(&format!(
            "application_name IS DISTINCT FROM '{}'",
            crate::pg::gate::GATE_APPLICATION_NAME
        )));
    }

    #[test]
    fn a_probe_answers_calls_made_while_it_ran_or_just_after_it_started() {
        let t0 = Instant::now();
        let l = LastProbe {
            started: t0,
            ended: t0 + Duration::from_millis(500),
            status: PgStatus::default(),
        };
        // Arrived while it ran (even long after it started): shared.
        assert!(l.answers(t0 + Duration::from_millis(400)));
        let quick = LastProbe {
            ended: t0 + Duration::from_millis(2),
            ..l
        };
        assert!(quick.answers(t0 + PROBE_SHARE_WINDOW));
        // Ended before the call and started longer ago than the window: probe again.
        assert!(!quick.answers(t0 + PROBE_SHARE_WINDOW + Duration::from_millis(1)));
    }

    #[test]
    fn timeline_from_walfile_name() {
        assert_eq!(timeline_of_walfile("000000020000000000000003"), Some(2));
        assert_eq!(timeline_of_walfile("0000001A0000000000000003"), Some(26));
        assert_eq!(timeline_of_walfile("xyz"), None);
    }

    #[test]
    fn a_stopped_process_is_seen_stopped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        assert!(!process_stopped(pid));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGSTOP).unwrap();
        let seen = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            process_stopped(pid)
        });
        let _ = child.kill();
        let _ = child.wait();
        assert!(seen, "a SIGSTOPped process was not seen stopped");
    }

    #[test]
    fn status_helpers() {
        let s = PgStatus {
            up: true,
            in_recovery: true,
            wal_receiver: Some(WalReceiverInfo {
                status: "streaming".into(),
                ..Default::default()
            }),
            standbys: vec![StandbyInfo {
                application_name: "s1".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(s.is_streaming());
        assert!(s.standby("s1").is_some() && s.standby("s2").is_none());
        assert!(!PgStatus::down("x".into()).is_streaming());
    }
}
