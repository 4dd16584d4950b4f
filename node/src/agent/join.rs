//! Membership from the joining member's side: the persisted identity (member id), the
//! bootstrap of a new cluster, registration with an existing one, and admission as a voter.
//!
//! Ids are allocated by the cluster (the intent's `AddMember` counter) and persisted in
//! `state_dir/member.json` before Raft starts, so a restart reuses its id. A member whose
//! state dir was wiped has no identity: it must join again, and the cluster refuses a name
//! that is still in the Raft membership — an id is never reused after its data is lost.
//!
//! Sequence of a joiner: `Admin.AddMember` on a `raft.join` peer (forwarded to the leader,
//! which commits `AddMember`) → persist the id → start Raft and the gRPC server →
//! `Admin.AdmitMember` (the leader adds it as a learner, waits until it caught up, and makes
//! it a voter) → persist `admitted`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_proto::admin_client::AdminClient;
use meridian_proto::{AddMemberRequest, AdmitMemberRequest};
use serde::{Deserialize, Serialize};
use tonic::Code;

use super::{Dialer, Shared};
use crate::config::{Config, MemberKind};
use crate::raft::intent::{Command, MemberKind as IntentKind, MemberTags, Refused, Response};
use crate::raft::{MemberNode, NodeId};

/// File in `state_dir` holding the member's identity.
pub const IDENTITY_FILE: &str = "member.json";

/// The id the bootstrap member gives itself: the first one the intent allocates.
pub const BOOTSTRAP_ID: NodeId = 1;

/// How long a joiner keeps trying to register (cluster not reachable yet, no leader).
pub const REGISTER_DEADLINE: Duration = Duration::from_secs(60);
/// How long a registered member keeps asking to become a voter before giving up.
pub const ADMIT_DEADLINE: Duration = Duration::from_secs(120);
/// How long the bootstrap member keeps trying to record itself in the intent.
pub const BOOTSTRAP_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between attempts of the loops above.
const RETRY_EVERY: Duration = Duration::from_millis(300);
/// Bound on one AddMember call (it commits one entry).
const REGISTER_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one AdmitMember call (the leader waits for the learner to catch up).
pub const ADMIT_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Who this member is in its cluster; persisted so restarts keep the id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub cluster: String,
    pub name: String,
    pub id: NodeId,
    /// The member has been made a voter (joiners only; the bootstrap member always is).
    pub admitted: bool,
}

pub fn load_identity(state_dir: &Path) -> anyhow::Result<Option<Identity>> {
    let path = state_dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("decoding {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the identity durably (temp file, fsync, rename, fsync of the dir).
pub fn save_identity(state_dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    use std::io::Write;
    let path = state_dir.join(IDENTITY_FILE);
    let tmp = state_dir.join(format!("{IDENTITY_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(identity)?;
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&bytes)?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    std::fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", state_dir.display()))?;
    Ok(())
}

/// The identity this run uses: the persisted one, a new bootstrap identity, or one the
/// cluster allocates when this member registers through `raft.join`.
pub async fn establish_identity(config: &Config, dialer: &Dialer) -> anyhow::Result<Identity> {
    if let Some(identity) = load_identity(&config.state_dir)? {
        if identity.cluster != config.cluster || identity.name != config.member.name {
            anyhow::bail!(
                "state dir {} belongs to member {:?} of cluster {:?}, but the config says member {:?} of cluster {:?}",
                config.state_dir.display(),
                identity.name,
                identity.cluster,
                config.member.name,
                config.cluster
            );
        }
        return Ok(identity);
    }
    if config.raft.bootstrap {
        let identity = Identity {
            cluster: config.cluster.clone(),
            name: config.member.name.clone(),
            id: BOOTSTRAP_ID,
            admitted: true,
        };
        save_identity(&config.state_dir, &identity)?;
        tracing::info!("no state yet and raft.bootstrap is set: bootstrapping a new cluster");
        return Ok(identity);
    }
    if config.raft.join.is_empty() {
        anyhow::bail!(
            "member {:?} has no state in {} and its config neither bootstraps (raft.bootstrap) nor joins (raft.join)",
            config.member.name,
            config.state_dir.display()
        );
    }
    let id = register(config, dialer).await?;
    let identity = Identity {
        cluster: config.cluster.clone(),
        name: config.member.name.clone(),
        id,
        admitted: false,
    };
    save_identity(&config.state_dir, &identity)?;
    tracing::info!(id, "registered with the cluster");
    Ok(identity)
}

/// Whether a gRPC error is worth retrying (no leader yet, peer down, leader changed).
/// A TLS failure (certificate refused either way) does not heal by retrying.
fn transient(status: &tonic::Status) -> bool {
    !is_tls_failure(status)
        && matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        )
}

/// Whether the status comes from a failed TLS handshake (bad or untrusted certificate).
pub fn is_tls_failure(status: &tonic::Status) -> bool {
    let text = describe(status).to_ascii_lowercase();
    ["certificate", "handshake", "tls", "alert"]
        .iter()
        .any(|w| text.contains(w))
}

/// Describes a status with its whole source chain (transport errors hide the cause).
pub fn describe(status: &tonic::Status) -> String {
    let mut s = format!("{}: {}", code_name(status.code()), status.message());
    let mut src = std::error::Error::source(status);
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::FailedPrecondition => "refused",
        Code::PermissionDenied => "permission denied",
        Code::AlreadyExists => "already exists",
        Code::InvalidArgument => "invalid argument",
        Code::Unauthenticated => "unauthenticated",
        _ => "error",
    }
}

/// The admin token this agent sends with its own admin calls (empty: none configured).
pub fn admin_token(config: &Config) -> String {
    config
        .api
        .token
        .as_ref()
        .map(|t| t.expose().to_string())
        .unwrap_or_default()
}

/// Asks the `raft.join` peers, in turn, to register this member; returns its id.
async fn register(config: &Config, dialer: &Dialer) -> anyhow::Result<NodeId> {
    let started = Instant::now();
    let mut attempt = 0usize;
    let mut last_error = String::from("no attempt made");
    while started.elapsed() < REGISTER_DEADLINE {
        let peer = &config.raft.join[attempt % config.raft.join.len()];
        attempt += 1;
        let request = AddMemberRequest {
            name: config.member.name.clone(),
            region: config.member.region.clone(),
            kind: config.member.kind.to_string(),
            tags: {
                let mut tags: std::collections::HashMap<String, String> = [
                    ("priority".to_string(), config.member.priority.to_string()),
                    (
                        "nofailover".to_string(),
                        config.member.nofailover.to_string(),
                    ),
                ]
                .into();
                // Sent only when set: a leader of an older version refuses unknown tags.
                if config.member.nosync {
                    tags.insert("nosync".into(), "true".into());
                }
                if config.member.clonefrom {
                    tags.insert("clonefrom".into(), "true".into());
                }
                if let Some(up) = &config.member.replicatefrom {
                    tags.insert("replicatefrom".into(), up.clone());
                }
                tags
            },
            cluster: config.cluster.clone(),
            token: admin_token(config),
        };
        let result = async {
            let channel = dialer
                .channel(peer)
                .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
            let mut request = tonic::Request::new(request);
            request.set_timeout(REGISTER_CALL_TIMEOUT);
            tokio::time::timeout(
                REGISTER_CALL_TIMEOUT,
                AdminClient::new(channel).add_member(request),
            )
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")))
        }
        .await;
        match result {
            Ok(r) => return Ok(r.into_inner().id),
            Err(status) if transient(&status) => {
                last_error = describe(&status);
                tracing::info!(peer = %peer, "cannot register yet: {last_error}; retrying");
            }
            Err(status) => {
                anyhow::bail!(
                    "joining cluster {:?}: {peer} refused member {:?}: {}",
                    config.cluster,
                    config.member.name,
                    describe(&status)
                );
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    anyhow::bail!(
        "joining cluster {:?}: no peer of raft.join {:?} registered this member within {} s; last error: {last_error}",
        config.cluster,
        config.raft.join,
        REGISTER_DEADLINE.as_secs()
    )
}

/// Background task of a registered member: asks to become a voter until it is one.
pub async fn seek_admission(shared: Arc<Shared>, mut identity: Identity) {
    let config = &shared.config;
    let started = Instant::now();
    let mut attempt = 0usize;
    let peers: Vec<String> = if config.raft.join.is_empty() {
        config
            .peers
            .keys()
            .filter(|p| *p != &config.member.name)
            .cloned()
            .collect()
    } else {
        config.raft.join.clone()
    };
    if peers.is_empty() {
        tracing::error!("cannot seek admission: no peer to ask");
        return;
    }
    while started.elapsed() < ADMIT_DEADLINE {
        // Already a voter (a previous run got that far before crashing)?
        let is_voter = shared
            .raft_metrics()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == shared.id);
        let result = if is_voter {
            Ok(())
        } else {
            let peer = &peers[attempt % peers.len()];
            attempt += 1;
            admit_via(&shared, peer)
                .await
                .map_err(|s| (peer.clone(), s))
        };
        match result {
            Ok(()) => {
                identity.admitted = true;
                if let Err(e) = save_identity(&config.state_dir, &identity) {
                    tracing::error!("recording the admission: {e:#}");
                }
                tracing::info!(id = shared.id, "admitted to the cluster as a voter");
                return;
            }
            Err((peer, status)) if transient(&status) => {
                tracing::info!(peer = %peer, "not admitted yet: {}; retrying", describe(&status));
            }
            Err((peer, status)) => {
                tracing::error!(
                    peer = %peer,
                    "admission refused: {}; this member stays out of the cluster",
                    describe(&status)
                );
                return;
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    tracing::error!(
        "not admitted as a voter within {} s; restart the member to try again",
        ADMIT_DEADLINE.as_secs()
    );
}

async fn admit_via(shared: &Shared, peer: &str) -> Result<(), tonic::Status> {
    let channel = shared
        .dialer
        .channel(peer)
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let mut request = tonic::Request::new(AdmitMemberRequest {
        cluster: shared.config.cluster.clone(),
        name: shared.name().to_string(),
        id: shared.id,
        token: admin_token(&shared.config),
    });
    request.set_timeout(ADMIT_CALL_TIMEOUT);
    tokio::time::timeout(
        ADMIT_CALL_TIMEOUT,
        AdminClient::new(channel).admit_member(request),
    )
    .await
    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")))
    .map(|_| ())
}

/// Background task of the bootstrap member: initializes a one-member Raft group if there
/// is no Raft state yet, then records itself in the intent (which allocates id 1).
pub async fn bootstrap(shared: Arc<Shared>) {
    if let Err(e) = bootstrap_inner(&shared).await {
        tracing::error!("bootstrapping the cluster: {e:#}");
    }
}

async fn bootstrap_inner(shared: &Shared) -> anyhow::Result<()> {
    if shared.id != BOOTSTRAP_ID {
        // A member that joined once keeps its id even if its config later says bootstrap.
        return Ok(());
    }
    let initialized = shared
        .raft
        .is_initialized()
        .await
        .context("reading raft state")?;
    if !initialized {
        let members = [(shared.id, MemberNode::new(shared.name()))]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>();
        shared
            .raft
            .initialize(members)
            .await
            .context("initializing a one-member raft group")?;
        tracing::info!("initialized a new one-member raft group");
    }
    let started = Instant::now();
    loop {
        // Others were admitted only after this member was recorded (registration is
        // refused while the intent is empty): nothing left to do.
        let alone = shared
            .raft_metrics()
            .membership_config
            .membership()
            .nodes()
            .all(|(id, _)| *id == shared.id);
        // The applied intent may still be replaying after a restart; a stale "missing"
        // only costs a write that the state machine then refuses as MemberExists.
        if !alone || shared.applied().intent.member(shared.name()).is_some() {
            return Ok(());
        }
        if started.elapsed() > BOOTSTRAP_DEADLINE {
            anyhow::bail!(
                "could not record this member in the intent within {} s",
                BOOTSTRAP_DEADLINE.as_secs()
            );
        }
        if shared.believes_leader() {
            let cmd = Command::AddMember {
                name: shared.name().to_string(),
                region: shared.config.member.region.clone(),
                kind: intent_kind(shared.config.member.kind),
                tags: config_tags(&shared.config),
                at_unix_ms: unix_ms(),
            };
            let write = tokio::time::timeout(BOOTSTRAP_DEADLINE, shared.raft.client_write(cmd));
            match write.await {
                Ok(Ok(w)) => match w.data {
                    Response::MemberAdded(id) if id.0 == BOOTSTRAP_ID => {
                        tracing::info!(id = id.0, "recorded the bootstrap member in the intent");
                        return Ok(());
                    }
                    Response::Refused(Refused::MemberExists(_)) => return Ok(()),
                    other => anyhow::bail!(
                        "recording the bootstrap member gave {other:?}, expected id {BOOTSTRAP_ID}"
                    ),
                },
                Ok(Err(e)) => tracing::info!("recording the bootstrap member: {e}; retrying"),
                Err(_) => tracing::info!("recording the bootstrap member: no commit yet; retrying"),
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

pub fn intent_kind(kind: MemberKind) -> IntentKind {
    match kind {
        MemberKind::Data => IntentKind::Data,
        MemberKind::Witness => IntentKind::Witness,
    }
}

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The tags this member's configuration asks for.
pub fn config_tags(config: &Config) -> MemberTags {
    MemberTags {
        priority: config.member.priority,
        nofailover: config.member.nofailover,
        nosync: config.member.nosync,
        clonefrom: config.member.clonefrom,
        replicatefrom: config.member.replicatefrom.clone(),
    }
}

/// How long a started agent keeps trying to bring the intent's tags for it in line with
/// its configuration.
const TAGS_DEADLINE: Duration = Duration::from_secs(120);
const TAGS_RETRY_EVERY: Duration = Duration::from_secs(1);

/// Tags follow the member's configuration, as in Patroni: when the intent records other
/// tags for this member than its config asks for (the config was edited and the agent
/// restarted), the agent proposes `SetMemberTags` once it finds itself in the intent.
/// Bounded; a refusal is logged and ends the task (nothing changed).
pub async fn sync_tags(shared: Arc<Shared>) {
    let wanted = config_tags(&shared.config);
    let started = Instant::now();
    let mut last_error = None;
    while started.elapsed() < TAGS_DEADLINE {
        let recorded = shared
            .applied()
            .intent
            .member(shared.name())
            .map(|m| m.tags.clone());
        match recorded {
            Some(t) if t == wanted => return,
            Some(t) => {
                let cmd = Command::SetMemberTags {
                    name: shared.name().to_string(),
                    tags: wanted.clone(),
                };
                match super::member::propose(&shared, cmd).await {
                    Ok(Response::Refused(r)) => {
                        tracing::error!("updating this member's tags was refused: {r}");
                        return;
                    }
                    Ok(_) => {
                        tracing::info!(
                            "this member's tags now follow its configuration: {wanted} \
                             (were {t})"
                        );
                        return;
                    }
                    Err(e) => last_error = Some(format!("{e:#}")),
                }
            }
            // Not in the intent yet (still joining, or replaying after a restart).
            None => {}
        }
        tokio::time::sleep(TAGS_RETRY_EVERY).await;
    }
    if let Some(e) = last_error {
        tracing::warn!(
            "this member's tags in the cluster differ from its configuration and could not \
             be updated within {} s: {e}",
            TAGS_DEADLINE.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::AddressBook;

    fn config(dir: &Path, raft: &str) -> Config {
        let text = format!(
            r#"
cluster = "c1"
state_dir = "{}"
[member]
name = "w1"
region = "eu"
kind = "witness"
[api]
listen = "127.0.0.1:7101"
http_listen = "127.0.0.1:8101"
[security]
insecure = true
[raft]
{raft}
[peers.a1]
api = "127.0.0.1:7102"
"#,
            dir.display()
        );
        Config::from_toml(&dir.join("m.toml"), &text).unwrap()
    }

    fn dialer() -> Dialer {
        Dialer::new(AddressBook::default(), None)
    }

    #[test]
    fn identity_round_trips_durably() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_identity(dir.path()).unwrap(), None);
        let id = Identity {
            cluster: "c1".into(),
            name: "w1".into(),
            id: 7,
            admitted: false,
        };
        save_identity(dir.path(), &id).unwrap();
        assert_eq!(load_identity(dir.path()).unwrap(), Some(id));
        assert!(!dir.path().join(format!("{IDENTITY_FILE}.tmp")).exists());
    }

    #[tokio::test]
    async fn bootstrap_takes_id_1_and_a_restart_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), "bootstrap = true");
        let first = establish_identity(&c, &dialer()).await.unwrap();
        assert_eq!(first.id, BOOTSTRAP_ID);
        assert!(first.admitted);
        let again = establish_identity(&c, &dialer()).await.unwrap();
        assert_eq!(again, first);
    }

    #[tokio::test]
    async fn neither_bootstrap_nor_join_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = establish_identity(&config(dir.path(), ""), &dialer())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("neither bootstraps"), "{e}");
    }

    #[tokio::test]
    async fn a_state_dir_of_another_cluster_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        save_identity(
            dir.path(),
            &Identity {
                cluster: "other".into(),
                name: "w1".into(),
                id: 3,
                admitted: true,
            },
        )
        .unwrap();
        let e = establish_identity(&config(dir.path(), "bootstrap = true"), &dialer())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cluster \"other\""), "{e}");
    }

    #[test]
    fn tls_failures_are_not_retried() {
        assert!(transient(&tonic::Status::unavailable("no leader is known")));
        assert!(!transient(&tonic::Status::unavailable(
            "transport error: received fatal alert: UnknownCA"
        )));
        assert!(!transient(&tonic::Status::failed_precondition(
            "cluster mismatch"
        )));
        assert!(!transient(&tonic::Status::already_exists("member exists")));
    }
}
