//! One bounded look at a running instance: role, timeline, WAL positions, the WAL receiver
//! (on a standby) and the connected standbys with their lag (on a primary).
//!
//! Timeline: on a just-promoted primary `pg_control_checkpoint()` still shows the old
//! timeline until the end-of-recovery checkpoint completes, so a primary's timeline is read
//! from the WAL file name of its insert position, which switches at promotion. A standby's
//! is the newer of the WAL receiver's `received_tli` and the last checkpoint's.

use std::str::FromStr;

use tokio_postgres::Client;

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

const STATUS_SQL: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
     pg_last_wal_receive_lsn()::text, \
     pg_last_wal_replay_lsn()::text, \
     (SELECT timeline_id FROM pg_control_checkpoint())";

const RECEIVER_SQL: &str = "SELECT status, received_tli, flushed_lsn::text, sender_host, \
     sender_port, slot_name FROM pg_stat_wal_receiver";

const REPLICATION_SQL: &str = "SELECT coalesce(application_name, ''), coalesce(state, ''), \
     coalesce(sync_state, ''), sent_lsn::text, write_lsn::text, flush_lsn::text, \
     replay_lsn::text FROM pg_stat_replication ORDER BY application_name";

impl PgInstance {
    /// Probes the instance within the probe timeout (2 s by default). Never fails: an
    /// unreachable or misbehaving server gives `up == false` with the reason.
    pub async fn probe(&self) -> PgStatus {
        let bound = self.timeouts().probe;
        let connect_bound = self.timeouts().connect.min(bound);
        let fut = async {
            let client = self
                .connect_monitor_within("probe: connect", connect_bound)
                .await?;
            probe_with(&client).await
        };
        match tokio::time::timeout(bound, fut).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => PgStatus::down(e.to_string()),
            Err(_) => PgStatus::down(format!("probe: no answer within {} ms", bound.as_millis())),
        }
    }
}

fn lsn(s: Option<String>) -> Option<Lsn> {
    s.and_then(|s| Lsn::from_str(&s).ok())
}

/// The timeline encoded in the first 8 hex digits of a WAL file name.
pub(crate) fn timeline_of_walfile(name: &str) -> Option<u32> {
    u32::from_str_radix(name.get(..8)?, 16).ok()
}

async fn probe_with(client: &Client) -> Result<PgStatus, PgError> {
    let row = client
        .query_one(STATUS_SQL, &[])
        .await
        .map_err(|e| PgError::sql("probe: status", e))?;
    let in_recovery: bool = row.get(0);
    let current_lsn = lsn(row.get(1));
    let walfile: Option<String> = row.get(2);
    let received_lsn = lsn(row.get(3));
    let replayed_lsn = lsn(row.get(4));
    let checkpoint_tli: Option<i32> = row.get(5);

    let wal_receiver = client
        .query_opt(RECEIVER_SQL, &[])
        .await
        .map_err(|e| PgError::sql("probe: wal receiver", e))?
        .map(|r| WalReceiverInfo {
            status: r.get::<_, Option<String>>(0).unwrap_or_default(),
            received_tli: r.get::<_, Option<i32>>(1).map(|t| t as u32),
            flushed_lsn: lsn(r.get(2)),
            sender_host: r.get(3),
            sender_port: r.get::<_, Option<i32>>(4).map(|p| p as u16),
            slot_name: r.get(5),
        });

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

    let standbys = client
        .query(REPLICATION_SQL, &[])
        .await
        .map_err(|e| PgError::sql("probe: replication", e))?
        .into_iter()
        .map(|r| {
            let replay_lsn = lsn(r.get(6));
            StandbyInfo {
                application_name: r.get(0),
                state: r.get(1),
                sync_state: r.get(2),
                sent_lsn: lsn(r.get(3)),
                write_lsn: lsn(r.get(4)),
                flush_lsn: lsn(r.get(5)),
                replay_lsn,
                lag_bytes: match (current_lsn, replay_lsn) {
                    (Some(cur), Some(rep)) => Some(cur.bytes_after(rep)),
                    _ => None,
                },
            }
        })
        .collect();

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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_from_walfile_name() {
        assert_eq!(timeline_of_walfile("000000020000000000000003"), Some(2));
        assert_eq!(timeline_of_walfile("0000001A0000000000000003"), Some(26));
        assert_eq!(timeline_of_walfile("xyz"), None);
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
