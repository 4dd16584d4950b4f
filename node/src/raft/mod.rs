//! The Raft group of the agents: openraft's type configuration, the durable storage (log and
//! state machine on one redb file), and the cluster intent that the state machine holds.
//!
//! Raft knows members by id and name only; addresses live in each agent's local config.

/// The persisted model lives in the core crate; re-exported here so the runtime's paths
/// stay `raft::intent::...`.
pub mod intent {
    pub use meridian_core::intent::*;
}
pub mod log_store;
pub mod network;
pub mod state_machine;

use std::fmt;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub use intent::{Command, Intent, Refused, Response};
pub use log_store::LogStore;
pub use network::{AddressBook, GrpcNetworkFactory, RaftGrpcService};
pub use state_machine::{AppliedState, IntentSnapshotBuilder, StateMachineStore};

/// A member as Raft's membership config knows it: by name. Addresses are not replicated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberNode {
    pub name: String,
}

impl MemberNode {
    pub fn new(name: impl Into<String>) -> Self {
        MemberNode { name: name.into() }
    }
}

impl fmt::Display for MemberNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

openraft::declare_raft_types!(
    /// Openraft types of Meridian: commands in, responses out, `u64` ids (`MemberId.0`).
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = MemberNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type MeridianRaft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, MemberNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, MemberNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// File name of the Raft database inside the agent's data dir.
pub const RAFT_DB_FILE: &str = "raft.redb";

/// Opens (or creates) the Raft database in `dir` and returns the log store and the state
/// machine sharing it. The state machine comes back with the intent of the last snapshot;
/// openraft re-applies the committed entries after it on start.
///
/// A redb file can be open only once per process, so call this once per member.
pub fn open_store(dir: &Path) -> anyhow::Result<(LogStore, StateMachineStore)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating raft data dir {}", dir.display()))?;
    let path = dir.join(RAFT_DB_FILE);
    let db = redb::Database::create(&path)
        .with_context(|| format!("opening raft database {}", path.display()))?;
    let db = Arc::new(db);
    log_store::create_tables(&db).context("creating raft log tables")?;
    state_machine::create_tables(&db).context("creating raft snapshot tables")?;
    let sm = StateMachineStore::load(db.clone()).context("loading raft state machine")?;
    Ok((LogStore::new(db), sm))
}

/// Raft timing for members spread over regions: round trips of 20-90 ms (and spikes of x10)
/// would make openraft's LAN defaults (50 ms heartbeat, 150-300 ms election) elect constantly.
pub const HEARTBEAT_INTERVAL_MS: u64 = 250;
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 1_000;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 2_000;
/// Snapshot chunk size; keeps a JSON-encoded chunk well under the gRPC message limit.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1 << 20;

/// A validated openraft config with Meridian's cross-region timing.
pub fn raft_config(cluster: &str) -> anyhow::Result<Arc<openraft::Config>> {
    raft_config_with_timing(
        cluster,
        HEARTBEAT_INTERVAL_MS,
        ELECTION_TIMEOUT_MIN_MS,
        ELECTION_TIMEOUT_MAX_MS,
    )
}

/// Like [`raft_config`] with other timing (tests on one host use shorter timeouts).
pub fn raft_config_with_timing(
    cluster: &str,
    heartbeat_interval_ms: u64,
    election_timeout_min_ms: u64,
    election_timeout_max_ms: u64,
) -> anyhow::Result<Arc<openraft::Config>> {
    let config = openraft::Config {
        cluster_name: cluster.to_string(),
        heartbeat_interval: heartbeat_interval_ms,
        election_timeout_min: election_timeout_min_ms,
        election_timeout_max: election_timeout_max_ms,
        // Snapshot transfers cross regions: allow a few chunks' worth of slow round trips.
        install_snapshot_timeout: 4 * election_timeout_max_ms,
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        ..Default::default()
    };
    Ok(Arc::new(
        config.validate().context("validating raft config")?,
    ))
}

/// Runs a blocking redb operation (fsync on commit) off the async workers.
async fn blocking<T, F>(f: F) -> anyhow::Result<T>
where
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .context("joining blocking storage task")?
}

/// openraft's storage errors carry an `AnyError`; keep the whole context chain in it.
fn any_error(e: anyhow::Error) -> openraft::AnyError {
    openraft::AnyError::error(format!("{e:#}"))
}

#[cfg(test)]
mod storage_tests;
