//! Disaster recovery through pgBackRest: WAL archiving on every data member, backups,
//! replicas restored from the repository, point-in-time recovery into a separate
//! directory, and the proof that the archive has no gap across failovers.
//!
//! - `config.rs`: the `[backup]` table of the agent config.
//! - `pgbackrest.rs`: the `pgbackrest.conf` this agent owns, the archive/restore commands
//!   written into `meridian.conf`, every (bounded) pgBackRest call, its JSON.
//! - `archive.rs`: archive continuity as a pure function (segments and history files).
//! - `ops.rs`: the admin operations (`backup`, `backup list`, `backup check`,
//!   `restore-point`, `restore`) an agent runs for `meridianctl`.
//! - `new_cluster.rs`: `restore --as-new-cluster`: the new one-member cluster's config.
//! - `metrics.rs`: last good backup age, WAL waiting to be archived, archive failures.
//! - `schedule.rs`: scheduled backups on the Raft leader (the rule is
//!   `meridian_core::backup_schedule`), one run per slot, recorded in the history.
//! - `server.rs`: this member's supervised `pgbackrest server`, which backups taken on a
//!   standby reach the primary through.
//! - `replica.rs`: a standby restored from the repository; the old primary's unarchived
//!   WAL pushed before it is rewound.

pub mod archive;
pub mod config;
pub mod metrics;
pub mod new_cluster;
pub mod ops;
pub mod pgbackrest;
pub mod replica;
pub mod schedule;
pub mod server;

pub use config::{ArchiveMode, BackupConfig, ReplicaMethod};
pub use ops::{BackupKind, BackupOp, RestoreTarget};
pub use pgbackrest::Pgbackrest;

use crate::config::Config;
use crate::pg::PgInstance;

/// Adds the archiving settings to a data member's instance and writes its
/// `pgbackrest.conf`; without `[backup]` the instance is returned unchanged.
pub fn with_archiving(config: &Config, instance: PgInstance) -> Result<PgInstance, String> {
    let Some(br) = Pgbackrest::from_config(config) else {
        return Ok(instance);
    };
    let br = br.map_err(|e| format!("[backup]: {e}"))?;
    br.write_conf().map_err(|e| format!("[backup]: {e}"))?;
    let mut instance = instance;
    for (k, v) in br.pg_settings() {
        instance = instance.with_setting(k, v);
    }
    Ok(instance)
}
