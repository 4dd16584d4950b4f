//! The `Admin` gRPC service: cluster status, member add / admit / remove, and generic
//! intent commands — what `meridianctl`, joining members and the tests call.
//!
//! Any member answers. A write that reaches a follower is forwarded to the leader it
//! knows, once: the forwarded request carries [`FORWARDED_HEADER`], and a member that
//! receives a forwarded request it cannot serve answers `Unavailable` naming the leader
//! instead of forwarding again. `Status` is forwarded too (observations live on the
//! leader); when the leader cannot be reached, or `local` is asked for, the member answers
//! with its own view, flagged `from_leader = false`.
//!
//! Every write goes through `client_write` / `change_membership`, which need a quorum.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::admin_client::AdminClient;
use meridian_proto::admin_server::{Admin, AdminServer};
use meridian_proto::{
    AddMemberRequest, AddMemberResponse, AdmitMemberRequest, AdmitMemberResponse, BackupOpRequest,
    BackupOpResponse, CommandRequest, CommandResponse, MemberActionRequest, MemberActionResponse,
    MemberStatus, PgCatalogRequest, PgCatalogResponse, QueryRequest, QueryResponse,
    RemoveMemberRequest, RemoveMemberResponse, StatusRequest, StatusResponse,
};
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tonic::{Request, Response as GrpcResponse, Status};

use super::join::{unix_ms, ADMIT_CALL_TIMEOUT};
use super::Shared;
use crate::auth::Caller;
use crate::raft::intent::{Command, MemberKind, MemberTags, Promote, PromotionKind, Response};
use crate::raft::{MemberNode, NodeId};

/// Marks a request a member forwarded to its leader; it is never forwarded again.
pub const FORWARDED_HEADER: &str = crate::auth::HDR_FORWARDED;
/// Bound on a forwarded call other than AdmitMember.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one Raft write (commit by a quorum) made for an admin request.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a membership change is retried while another one is in progress.
const MEMBERSHIP_RETRIES: usize = 20;
const MEMBERSHIP_RETRY_EVERY: Duration = Duration::from_millis(200);
/// How long a membership change waits for the primary to report the current members.
/// How long a write waits for an election in progress to settle (this member campaigning
/// or just elected, or no leader known) before it answers "no leader": an election takes
/// about one election timeout, and an operator's switchover should not fail for it.
const LEADER_SETTLE_WAIT: Duration = Duration::from_secs(3);
const PRIMARY_CURRENT_WAIT: Duration = Duration::from_secs(5);
const PRIMARY_CURRENT_POLL: Duration = Duration::from_millis(100);

pub struct AdminService {
    shared: Arc<Shared>,
    /// Serializes this leader's membership changes: concurrent joiners would otherwise
    /// collide on openraft's one-change-at-a-time rule and spin on `InProgress`.
    membership_lock: tokio::sync::Mutex<()>,
}

impl AdminService {
    pub fn new(shared: Arc<Shared>) -> Self {
        AdminService {
            shared,
            membership_lock: tokio::sync::Mutex::new(()),
        }
    }

    async fn lock_membership(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, Status> {
        tokio::time::timeout(ADMIT_CALL_TIMEOUT, self.membership_lock.lock())
            .await
            .map_err(|_| Status::unavailable("another membership change is still running"))
    }

    pub fn into_server(self) -> AdminServer<AdminService> {
        AdminServer::new(self)
    }

    /// Who may call the admin API's writes: a member (cluster secret or
    /// member certificate; a forwarded request was authorized by the member that forwarded
    /// it), a client certificate signed by the cluster CA, or the admin token (in the
    /// message's `token` field or an `authorization: Bearer` header). Without a configured
    /// token only `[security] insecure = true` lets anyone else in. Returns how the caller
    /// was authorized (sent along when the request is forwarded).
    fn authorize<T>(&self, request: &Request<T>, body_token: &str) -> Result<&'static str, Status> {
        let caller = request.extensions().get::<Caller>();
        if let Some(Caller::Member(_)) = caller {
            return Ok("member");
        }
        let given = if body_token.is_empty() {
            request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(crate::auth::bearer_token)
        } else {
            Some(body_token)
        };
        let config = &self.shared.config;
        if let (Some(t), Some(g)) = (&config.api.token, given) {
            // A presented token must be right, whatever else the caller has.
            return if crate::auth::token_matches(t.expose(), g) {
                Ok("token")
            } else {
                Err(Status::permission_denied("wrong admin token"))
            };
        }
        if let Some(Caller::Certified) = caller {
            return Ok("certificate");
        }
        match &config.api.token {
            None if config.security.insecure => Ok("insecure"),
            Some(_) => Err(Status::unauthenticated(
                "this admin request needs the admin token (meridianctl --token / MERIDIAN_TOKEN) \
                 or a client certificate signed by the cluster CA",
            )),
            None => Err(Status::unauthenticated(
                "no admin token is configured on this member ([api] token_file / token_env): \
                 admin requests need a client certificate signed by the cluster CA",
            )),
        }
    }

    fn check_cluster(&self, what: &str, name: &str, cluster: &str) -> Result<(), Status> {
        let ours = &self.shared.config.cluster;
        if cluster != ours {
            tracing::warn!(
                "refused {what} of member {name:?}: it names cluster {cluster:?}, this is cluster {ours:?}"
            );
            return Err(Status::failed_precondition(format!(
                "cluster mismatch: this member belongs to cluster {ours:?}, the request names {cluster:?}"
            )));
        }
        Ok(())
    }

    /// `None`: serve here (this member leads). `Some(leader)`: forward there.
    fn route<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        if self.shared.believes_leader() {
            return Ok(None);
        }
        let leader = self.shared.leader();
        if request.metadata().get(FORWARDED_HEADER).is_some() {
            return Err(not_leader(leader.map(|l| l.1)));
        }
        match leader {
            Some((id, name)) if id != self.shared.id => Ok(Some(name)),
            other => Err(not_leader(other.map(|l| l.1))),
        }
    }

    /// [`Self::route`] for a write, once leadership has settled: while no leader is known,
    /// or this member is named leader but is not leading yet (a campaign or a transfer in
    /// progress), it waits for that to end, bounded by [`LEADER_SETTLE_WAIT`].
    async fn route_write<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        let deadline = tokio::time::Instant::now() + LEADER_SETTLE_WAIT;
        let mut metrics = self.shared.raft.metrics();
        loop {
            let settled = self.shared.believes_leader()
                || matches!(self.shared.leader(), Some((id, _)) if id != self.shared.id);
            if settled || tokio::time::Instant::now() >= deadline {
                return self.route(request);
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                // Raft stopped, or the deadline passed: answer with what is known.
                Ok(Err(_)) | Err(_) => return self.route(request),
            }
        }
    }

    /// `None`: serve here (`member` is this member, or empty). `Some(name)`: forward to
    /// that member's agent, once.
    fn route_to_member<T>(
        &self,
        request: &Request<T>,
        member: &str,
    ) -> Result<Option<String>, Status> {
        if member.is_empty() || member == self.shared.name() {
            return Ok(None);
        }
        if request.metadata().get(FORWARDED_HEADER).is_some() {
            return Err(Status::failed_precondition(format!(
                "this is {}, not {member}: a forwarded request is not forwarded again",
                self.shared.name()
            )));
        }
        if self.shared.applied().intent.member(member).is_none() {
            return Err(Status::not_found(format!("no member named {member:?}")));
        }
        Ok(Some(member.to_string()))
    }

    fn client(&self, leader: &str) -> Result<AdminClient<crate::auth::SignedChannel>, Status> {
        let ch = self
            .shared
            .dialer
            .channel(leader)
            .map_err(|e| Status::unavailable(format!("cannot reach leader {leader}: {e:#}")))?;
        Ok(AdminClient::new(ch))
    }
}

fn not_leader(leader: Option<String>) -> Status {
    match leader {
        Some(l) => Status::unavailable(format!("not the leader; the leader is {l}")),
        None => Status::unavailable("no leader is known; try again later"),
    }
}

/// The request to send to the leader: same message, marked forwarded with how this member
/// authorized it, bounded. The leader accepts it because this member signs it (or presents
/// its member certificate): only requests authorized here are forwarded.
/// Who asked, for the history: how the request was authorized and where it came from
/// (the member that forwarded it, with the way that member authorized it).
fn requested_by<T>(request: &Request<T>, how: &str) -> String {
    match request.extensions().get::<Caller>() {
        Some(Caller::Member(m)) => {
            let first = request
                .metadata()
                .get(crate::auth::HDR_AUTHORIZED_BY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("member");
            format!("{first} via {m}")
        }
        _ => match request.remote_addr() {
            Some(addr) => format!("{how} from {addr}"),
            None => how.to_string(),
        },
    }
}

pub(crate) fn forwarded<T>(
    message: T,
    timeout: Duration,
    authorized_by: &'static str,
) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        FORWARDED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    r.metadata_mut().insert(
        crate::auth::HDR_AUTHORIZED_BY,
        tonic::metadata::MetadataValue::from_static(authorized_by),
    );
    r.set_timeout(timeout);
    r
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<GrpcResponse<T>, Status>>,
) -> Result<GrpcResponse<T>, Status> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "the leader did not answer in time",
            ))
        })
}

/// Maps a failed Raft write to a gRPC status; leadership changes are `Unavailable`
/// (retry), the rest explain themselves.
fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, MemberNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            not_leader(f.leader_node.map(|n| n.name))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(p),
        )) => Status::unavailable(format!("another membership change is in progress: {p}")),
        RaftError::APIError(e) => Status::failed_precondition(e.to_string()),
        RaftError::Fatal(f) => Status::unavailable(format!("raft stopped: {f}")),
    }
}

/// Bounds a Raft write: without a quorum, a write would wait forever.
async fn within<T>(
    fut: impl std::future::Future<
        Output = Result<T, RaftError<NodeId, ClientWriteError<NodeId, MemberNode>>>,
    >,
) -> Result<Result<T, RaftError<NodeId, ClientWriteError<NodeId, MemberNode>>>, Status> {
    tokio::time::timeout(WRITE_TIMEOUT, fut).await.map_err(|_| {
        Status::unavailable(format!(
            "the write was not committed within {} s (no quorum?)",
            WRITE_TIMEOUT.as_secs()
        ))
    })
}

fn is_in_progress(e: &RaftError<NodeId, ClientWriteError<NodeId, MemberNode>>) -> bool {
    matches!(
        e,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(_)
        ))
    )
}

fn parse_kind(kind: &str) -> Result<MemberKind, Status> {
    match kind {
        "data" => Ok(MemberKind::Data),
        "witness" => Ok(MemberKind::Witness),
        other => Err(Status::invalid_argument(format!(
            "member kind {other:?} is neither data nor witness"
        ))),
    }
}

fn kind_name(kind: MemberKind) -> &'static str {
    match kind {
        MemberKind::Data => "data",
        MemberKind::Witness => "witness",
    }
}

fn parse_tags(tags: &HashMap<String, String>) -> Result<MemberTags, Status> {
    let mut t = MemberTags::default();
    for (k, v) in tags {
        match k.as_str() {
            "priority" => {
                t.priority = v
                    .parse()
                    .map_err(|_| Status::invalid_argument(format!("tag priority={v:?}")))?
            }
            "nofailover" => {
                t.nofailover = v
                    .parse()
                    .map_err(|_| Status::invalid_argument(format!("tag nofailover={v:?}")))?
            }
            "nosync" => {
                t.nosync = v
                    .parse()
                    .map_err(|_| Status::invalid_argument(format!("tag nosync={v:?}")))?
            }
            "clonefrom" => {
                t.clonefrom = v
                    .parse()
                    .map_err(|_| Status::invalid_argument(format!("tag clonefrom={v:?}")))?
            }
            "replicatefrom" => {
                if v.is_empty() || v.len() > crate::raft::intent::MAX_NAME_LEN {
                    return Err(Status::invalid_argument(format!("tag replicatefrom={v:?}")));
                }
                t.replicatefrom = Some(v.clone());
            }
            other => return Err(Status::invalid_argument(format!("unknown tag {other:?}"))),
        }
    }
    Ok(t)
}

impl AdminService {
    /// Runs a membership change, repeating it while another one is in progress (a joint
    /// config left behind by a leader change must settle first).
    async fn change_membership(
        &self,
        changes: ChangeMembers<NodeId, MemberNode>,
    ) -> Result<(), Status> {
        let mut attempt = 0;
        loop {
            match within(self.shared.raft.change_membership(changes.clone(), false)).await? {
                Ok(_) => return Ok(()),
                Err(e) if is_in_progress(&e) && attempt < MEMBERSHIP_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(MEMBERSHIP_RETRY_EVERY).await;
                }
                Err(e) => return Err(write_error(e)),
            }
        }
    }

    /// Waits (bounded) until the primary reported counting its lease over the members this
    /// leader counts over now ([`meridian_core::lease::membership_change_may_proceed`]);
    /// called before every step that changes that set. Unavailable when it did not in
    /// time, so a joiner asks again.
    async fn await_primary_current(&self) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + PRIMARY_CURRENT_WAIT;
        loop {
            let intent = self.shared.applied().intent.clone();
            let current = super::lease::lease_voters(&self.shared, &intent);
            let primary = intent.primary.as_deref();
            let reported = match primary {
                // The leader's own count is the one computed here.
                Some(p) if p == self.shared.name() => Some(current.clone()),
                Some(p) => self.shared.observations.get(p).map(|(o, _)| o.lease_voters),
                None => None,
            };
            let verdict = meridian_core::lease::membership_change_may_proceed(
                primary,
                &current,
                reported.as_deref(),
            );
            match verdict {
                Ok(()) => return Ok(()),
                Err(wait) if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::unavailable(wait.to_string()))
                }
                Err(_) => tokio::time::sleep(PRIMARY_CURRENT_POLL).await,
            }
        }
    }

    async fn add_member_here(&self, req: AddMemberRequest) -> Result<AddMemberResponse, Status> {
        let kind = parse_kind(&req.kind)?;
        let tags = parse_tags(&req.tags)?;
        // Serialized with admissions and removals, so a retried registration sees the
        // outcome of the first one instead of racing it into a MemberExists refusal.
        let _guard = self.lock_membership().await?;
        let intent = self.shared.applied().intent.clone();
        if intent.members.is_empty() {
            // Id 1 belongs to the bootstrap member, which has not recorded itself yet.
            return Err(Status::unavailable(
                "the cluster is still bootstrapping; try again shortly",
            ));
        }
        let still_in_raft = self
            .shared
            .raft_metrics()
            .membership_config
            .membership()
            .nodes()
            .any(|(_, n)| n.name == req.name);
        if still_in_raft && intent.member(&req.name).is_none() {
            return Err(Status::already_exists(format!(
                "member {:?} is being removed; finish the removal before it joins again",
                req.name
            )));
        }
        if let Some(m) = intent.member(&req.name) {
            let in_raft = self
                .shared
                .raft_metrics()
                .membership_config
                .membership()
                .get_node(&m.id.0)
                .is_some();
            if !in_raft && m.region == req.region && m.kind == kind {
                // Registered before, never admitted: it has no Raft state, so its id is
                // still safe to hand back (the earlier answer was lost).
                return Ok(AddMemberResponse { id: m.id.0 });
            }
            return Err(Status::already_exists(format!(
                "member {:?} already exists with id {}; remove it before it joins again",
                req.name, m.id
            )));
        }
        let cmd = Command::AddMember {
            name: req.name.clone(),
            region: req.region,
            kind,
            tags,
            at_unix_ms: unix_ms(),
        };
        intent
            .validate(&cmd)
            .map_err(|r| Status::failed_precondition(r.to_string()))?;
        let w = within(self.shared.raft.client_write(cmd))
            .await?
            .map_err(write_error)?;
        match w.data {
            Response::MemberAdded(id) => {
                tracing::info!(member = %req.name, id = id.0, "member registered");
                Ok(AddMemberResponse { id: id.0 })
            }
            Response::Refused(r) => Err(Status::failed_precondition(r.to_string())),
            other => Err(Status::internal(format!("unexpected response {other:?}"))),
        }
    }

    async fn admit_member_here(&self, req: AdmitMemberRequest) -> Result<(), Status> {
        let intent = self.shared.applied().intent.clone();
        let member = intent.member(&req.name).ok_or_else(|| {
            Status::failed_precondition(format!("no member named {:?} is registered", req.name))
        })?;
        if member.id.0 != req.id {
            return Err(Status::failed_precondition(format!(
                "member {:?} is registered with id {}, not {}",
                req.name, member.id, req.id
            )));
        }
        let id = req.id;
        let _guard = self.lock_membership().await?;
        let metrics = self.shared.raft_metrics();
        let membership = metrics.membership_config.membership();
        if membership.voter_ids().any(|v| v == id) {
            return Ok(());
        }
        // Blocks until the learner has caught up with the leader's log (bounded by the
        // caller's deadline); repeated calls are harmless.
        match tokio::time::timeout(
            ADMIT_CALL_TIMEOUT,
            self.shared
                .raft
                .add_learner(id, MemberNode::new(&req.name), true),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(write_error(e)),
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "learner {} did not catch up within {} s",
                    req.name,
                    ADMIT_CALL_TIMEOUT.as_secs()
                )))
            }
        }
        self.await_primary_current().await?;
        self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await?;
        tracing::info!(member = %req.name, id, "member is now a voter");
        Ok(())
    }

    /// Removes `name` from the intent first, then from the Raft membership. In that order
    /// "recorded in the intent but not in Raft" only ever means "registered, never admitted",
    /// which is what lets [`Self::add_member_here`] hand such a member its id back without
    /// ever reusing the id of a member that had Raft state. A retry after a crash between
    /// the two steps finds the name only in Raft and finishes the job.
    async fn remove_member_here(&self, name: &str) -> Result<(), Status> {
        let _guard = self.lock_membership().await?;
        let intent = self.shared.applied().intent.clone();
        let in_raft = |name: &str| -> Option<NodeId> {
            let metrics = self.shared.raft_metrics();
            let membership = metrics.membership_config.membership();
            let found = membership
                .nodes()
                .find(|(_, n)| n.name == name)
                .map(|(id, _)| *id);
            found
        };
        if let Some(id) = in_raft(name) {
            let voters: BTreeSet<NodeId> = self
                .shared
                .raft_metrics()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            if voters.len() == 1 && voters.contains(&id) {
                return Err(Status::failed_precondition(format!(
                    "member {name:?} is the last voter; the cluster cannot be left without one"
                )));
            }
        }
        let is_voter = |name: &str| -> bool {
            in_raft(name).is_some_and(|id| {
                self.shared
                    .raft_metrics()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == id)
            })
        };
        if intent.member(name).is_some() {
            if is_voter(name) {
                // Leaving the intent takes it out of the lease count.
                self.await_primary_current().await?;
            }
            let cmd = Command::RemoveMember {
                name: name.to_string(),
                at_unix_ms: unix_ms(),
            };
            intent
                .validate(&cmd)
                .map_err(|r| Status::failed_precondition(r.to_string()))?;
            let w = within(self.shared.raft.client_write(cmd))
                .await?
                .map_err(write_error)?;
            if let Response::Refused(r) = w.data {
                return Err(Status::failed_precondition(r.to_string()));
            }
        } else if in_raft(name).is_none() {
            return Err(Status::not_found(format!("no member named {name:?}")));
        }
        if let Some(id) = in_raft(name) {
            let change = if is_voter(name) {
                self.await_primary_current().await?;
                ChangeMembers::RemoveVoters(BTreeSet::from([id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([id]))
            };
            self.change_membership(change).await?;
            tracing::info!(member = %name, id, "member removed");
        }
        Ok(())
    }

    /// This member's view of the cluster.
    fn local_status(&self) -> StatusResponse {
        let shared = &self.shared;
        let metrics = shared.raft_metrics();
        let applied = shared.applied();
        let intent = &applied.intent;
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let is_leader = metrics.current_leader == Some(shared.id);
        let role_of = |id: NodeId| -> &'static str {
            if metrics.current_leader == Some(id) {
                "leader"
            } else if voters.contains(&id) {
                "follower"
            } else if membership.get_node(&id).is_some() {
                "learner"
            } else {
                "none"
            }
        };
        let now = Instant::now();
        let observations = if is_leader {
            shared.observations.snapshot()
        } else {
            HashMap::new()
        };
        let mut members: Vec<MemberStatus> = intent
            .members
            .values()
            .map(|m| {
                let obs = observations.get(&m.name);
                MemberStatus {
                    name: m.name.clone(),
                    id: m.id.0,
                    region: m.region.clone(),
                    kind: kind_name(m.kind).to_string(),
                    voter: voters.contains(&m.id.0),
                    raft_role: role_of(m.id.0).to_string(),
                    observation: obs.map(|(o, _)| o.clone()),
                    observation_age_ms: obs
                        .map(|(_, at)| {
                            i64::try_from(now.duration_since(*at).as_millis()).unwrap_or(i64::MAX)
                        })
                        .unwrap_or(-1),
                    tags: [
                        ("priority".to_string(), m.tags.priority.to_string()),
                        ("nofailover".to_string(), m.tags.nofailover.to_string()),
                        ("nosync".to_string(), m.tags.nosync.to_string()),
                        ("clonefrom".to_string(), m.tags.clonefrom.to_string()),
                    ]
                    .into_iter()
                    .chain(
                        m.tags
                            .replicatefrom
                            .clone()
                            .map(|up| ("replicatefrom".to_string(), up)),
                    )
                    .collect(),
                    postgres_addr: self
                        .shared
                        .config
                        .peers
                        .get(&m.name)
                        .and_then(|p| p.postgres.clone())
                        .unwrap_or_default(),
                }
            })
            .collect();
        // Raft members the intent does not know yet (e.g. the bootstrap member before it
        // recorded itself).
        for (id, node) in membership.nodes() {
            if intent.member_by_id(crate::types::MemberId(*id)).is_none() {
                members.push(MemberStatus {
                    name: node.name.clone(),
                    id: *id,
                    kind: "unknown".into(),
                    voter: voters.contains(id),
                    raft_role: role_of(*id).to_string(),
                    observation_age_ms: -1,
                    ..MemberStatus::default()
                });
            }
        }
        let leader = metrics
            .current_leader
            .and_then(|id| membership.get_node(&id).map(|n| n.name.clone()))
            .unwrap_or_default();
        StatusResponse {
            cluster: shared.config.cluster.clone(),
            leader,
            term: metrics.current_term,
            applied_index: metrics.last_applied.map(|l| l.index).unwrap_or_default(),
            generation: intent.generation.0,
            primary: intent.primary.clone().unwrap_or_default(),
            paused: intent.maintenance,
            members,
            intent_json: serde_json::to_string(intent).unwrap_or_default(),
            answered_by: shared.name().to_string(),
            answered_role: role_name(metrics.state).to_string(),
            // The leader's own belief; `status` confirms it with a quorum before it says so.
            from_leader: is_leader && metrics.state == ServerState::Leader,
            last_log_index: metrics.last_log_index.unwrap_or_default(),
            quorum_ack_age_ms: metrics
                .millis_since_quorum_ack
                .and_then(|ms| i64::try_from(ms).ok())
                .unwrap_or(-1),
            stale_after_ms: i64::try_from(super::leader::limits(shared).stale_after_ms)
                .unwrap_or(i64::MAX),
            insecure: shared.config.security.insecure,
        }
    }
}

fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<GrpcResponse<StatusResponse>, Status> {
        // Read-only and open, like the HTTP `/cluster` and `/history` endpoints that publish
        // the same topology and history: it carries no secret (docs/security.md).
        let how = "read-only";
        if request.get_ref().local {
            return Ok(GrpcResponse::new(self.local_status()));
        }
        match self.route(&request) {
            Ok(Some(leader)) => {
                let fwd = async {
                    let mut client = self.client(&leader)?;
                    bounded(
                        FORWARD_TIMEOUT,
                        client.status(forwarded(request.into_inner(), FORWARD_TIMEOUT, how)),
                    )
                    .await
                };
                match fwd.await {
                    Ok(r) => Ok(r),
                    Err(e) => {
                        tracing::debug!(
                            "status: leader {leader} unreachable ({e}); answering locally"
                        );
                        Ok(GrpcResponse::new(self.local_status()))
                    }
                }
            }
            // The leader, or not the leader and cannot forward: this member's view, flagged.
            Ok(None) | Err(_) => {
                let mut status = self.local_status();
                // A deposed leader that has not heard it yet (thawed after a freeze) still
                // believes it leads: a heartbeat round to a quorum decides (a newer leader's
                // vote deposes it), so a stale view is never passed off as the leader's.
                if status.from_leader {
                    let bound = self.shared.config.raft.election_timeout_max;
                    let confirmed =
                        tokio::time::timeout(bound, self.shared.raft.ensure_linearizable()).await;
                    if !matches!(confirmed, Ok(Ok(_))) {
                        status.from_leader = false;
                    }
                }
                Ok(GrpcResponse::new(status))
            }
        }
    }

    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<GrpcResponse<AddMemberResponse>, Status> {
        let req = request.get_ref();
        self.check_cluster("registration", &req.name, &req.cluster)?;
        let how = self.authorize(&request, &req.token)?;
        match self.route_write(&request).await? {
            Some(leader) => {
                let mut client = self.client(&leader)?;
                bounded(
                    FORWARD_TIMEOUT,
                    client.add_member(forwarded(request.into_inner(), FORWARD_TIMEOUT, how)),
                )
                .await
            }
            None => Ok(GrpcResponse::new(
                self.add_member_here(request.into_inner()).await?,
            )),
        }
    }

    async fn admit_member(
        &self,
        request: Request<AdmitMemberRequest>,
    ) -> Result<GrpcResponse<AdmitMemberResponse>, Status> {
        let req = request.get_ref();
        self.check_cluster("admission", &req.name, &req.cluster)?;
        let how = self.authorize(&request, &req.token)?;
        match self.route_write(&request).await? {
            Some(leader) => {
                let mut client = self.client(&leader)?;
                let bound = ADMIT_CALL_TIMEOUT + FORWARD_TIMEOUT;
                bounded(
                    bound,
                    client.admit_member(forwarded(request.into_inner(), bound, how)),
                )
                .await
            }
            None => {
                self.admit_member_here(request.into_inner()).await?;
                Ok(GrpcResponse::new(AdmitMemberResponse {}))
            }
        }
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<GrpcResponse<RemoveMemberResponse>, Status> {
        let how = self.authorize(&request, &request.get_ref().token)?;
        match self.route_write(&request).await? {
            Some(leader) => {
                let mut client = self.client(&leader)?;
                bounded(
                    FORWARD_TIMEOUT * 2,
                    client.remove_member(forwarded(request.into_inner(), FORWARD_TIMEOUT * 2, how)),
                )
                .await
            }
            None => {
                self.remove_member_here(&request.get_ref().name).await?;
                Ok(GrpcResponse::new(RemoveMemberResponse {}))
            }
        }
    }

    async fn pg_catalog(
        &self,
        request: Request<PgCatalogRequest>,
    ) -> Result<GrpcResponse<PgCatalogResponse>, Status> {
        let how = self.authorize(&request, &request.get_ref().token)?;
        let mut target = request.get_ref().member.clone();
        if target.is_empty() && !super::admin_ops::has_running_pg(&self.shared) {
            // No Postgres here (a witness, or down): the primary's has the catalog.
            target = self
                .shared
                .applied()
                .intent
                .primary
                .clone()
                .unwrap_or_default();
            if request.metadata().get(FORWARDED_HEADER).is_some() {
                target.clear();
            }
        }
        match self.route_to_member(&request, &target)? {
            Some(m) => {
                let mut client = self.client(&m)?;
                bounded(
                    FORWARD_TIMEOUT,
                    client.pg_catalog(forwarded(request.into_inner(), FORWARD_TIMEOUT, how)),
                )
                .await
            }
            None => Ok(GrpcResponse::new(
                super::admin_ops::pg_catalog(&self.shared, request.get_ref()).await?,
            )),
        }
    }

    async fn member_action(
        &self,
        request: Request<MemberActionRequest>,
    ) -> Result<GrpcResponse<MemberActionResponse>, Status> {
        let how = self.authorize(&request, &request.get_ref().token)?;
        let target = request.get_ref().member.clone();
        match self.route_to_member(&request, &target)? {
            Some(m) => {
                let t = super::admin_ops::ACTION_TIMEOUT;
                let mut client = self.client(&m)?;
                bounded(
                    t,
                    client.member_action(forwarded(request.into_inner(), t, how)),
                )
                .await
            }
            None => Ok(GrpcResponse::new(
                super::admin_ops::member_action(&self.shared, request.get_ref()).await?,
            )),
        }
    }

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<GrpcResponse<QueryResponse>, Status> {
        let how = self.authorize(&request, &request.get_ref().token)?;
        let target = request.get_ref().member.clone();
        match self.route_to_member(&request, &target)? {
            Some(m) => {
                let t = super::admin_ops::query_timeout(request.get_ref()) + FORWARD_TIMEOUT;
                let mut client = self.client(&m)?;
                bounded(t, client.query(forwarded(request.into_inner(), t, how))).await
            }
            None => {
                let who = requested_by(&request, how);
                Ok(GrpcResponse::new(
                    super::admin_ops::query(&self.shared, request.get_ref(), &who).await?,
                ))
            }
        }
    }

    async fn command(
        &self,
        request: Request<CommandRequest>,
    ) -> Result<GrpcResponse<CommandResponse>, Status> {
        let how = self.authorize(&request, &request.get_ref().token)?;
        let cmd: Command = serde_json::from_str(&request.get_ref().command_json)
            .map_err(|e| Status::invalid_argument(format!("decoding command_json: {e}")))?;
        if matches!(
            cmd,
            Command::AddMember { .. } | Command::RemoveMember { .. }
        ) {
            return Err(Status::invalid_argument(
                "members are added and removed with AddMember/RemoveMember, which also change the Raft membership",
            ));
        }
        match self.route_write(&request).await? {
            Some(leader) => {
                let mut client = self.client(&leader)?;
                bounded(
                    FORWARD_TIMEOUT,
                    client.command(forwarded(request.into_inner(), FORWARD_TIMEOUT, how)),
                )
                .await
            }
            None => {
                let mut cmd = cmd;
                if let Command::ClearScheduled { fired, .. } = &mut cmd {
                    // Only members (the leader) start a scheduled operation; an operator
                    // cancels it.
                    *fired &= how == "member";
                }
                if let Command::Promote(p) = &mut cmd {
                    // Only the leader's own decisions may vouch for the old lease.
                    p.old_lease_released = false;
                    if p.kind == PromotionKind::Manual {
                        check_manual_promotion(&self.shared, p)?;
                    }
                }
                let w = within(self.shared.raft.client_write(cmd))
                    .await?
                    .map_err(write_error)?;
                Ok(GrpcResponse::new(crate::admin_client::encode(
                    w.log_id.index,
                    &w.data,
                )))
            }
        }
    }

    async fn backup_op(
        &self,
        request: Request<BackupOpRequest>,
    ) -> Result<GrpcResponse<BackupOpResponse>, Status> {
        let how = self.authorize(&request, &request.get_ref().token)?;
        super::backup_admin::serve(self.shared.clone(), request, how).await
    }
}

/// The safety check of an operator's failover (`Promote{Manual}`), on the leader: the
/// candidate must be a healthy standby (fresh observation, Postgres up, in recovery, not
/// fenced); without `force` (= allow data loss) the primary must not be taking writes (a
/// switchover is the way then) and the candidate must hold every byte of WAL any member is
/// known to hold. Fills the history's LSNs and possible loss.
fn check_manual_promotion(shared: &Shared, p: &mut Promote) -> Result<(), Status> {
    let intent = shared.applied().intent.clone();
    let stale_after = (shared.config.timing.observe_interval * 4).max(Duration::from_secs(1));
    let now = Instant::now();
    let obs: HashMap<String, crate::decide::Observation> = shared
        .observations
        .snapshot()
        .into_iter()
        .filter(|(_, (_, at))| now.duration_since(*at) <= stale_after)
        .map(|(n, (o, _))| (n, crate::decide::observation_from_proto(&o, 0)))
        .collect();
    let refuse = |why: String| Err(Status::failed_precondition(why));
    let Some(c) = obs.get(&p.member) else {
        return refuse(format!(
            "no recent observation of {}: its agent is unreachable",
            p.member
        ));
    };
    if !(c.postgres_up && c.in_recovery && !c.fenced) {
        return refuse(format!(
            "{} is not a healthy standby (up {}, in recovery {}, fenced {})",
            p.member, c.postgres_up, c.in_recovery, c.fenced
        ));
    }
    let best_known = obs
        .values()
        .filter_map(crate::decide::Observation::best_lsn)
        .max()
        .unwrap_or(crate::types::Lsn::ZERO);
    let candidate_lsn = c.received_lsn.max(c.replayed_lsn);
    let loss = best_known.bytes_after(candidate_lsn.unwrap_or(crate::types::Lsn::ZERO));
    let old = intent.primary.clone();
    p.old_primary_lsn = old
        .as_deref()
        .and_then(|o| obs.get(o))
        .and_then(crate::decide::Observation::best_lsn);
    p.new_primary_lsn = candidate_lsn;
    p.possible_loss_bytes = Some(loss);
    if p.force {
        return Ok(());
    }
    if let Some(o) = old.as_deref().and_then(|o| obs.get(o)) {
        if o.writable() {
            return refuse(format!(
                "the primary {} is healthy and taking writes: use a switchover",
                old.as_deref().unwrap_or_default()
            ));
        }
    }
    if loss > 0 {
        return refuse(format!(
            "{} is {loss} bytes behind the most WAL any member holds; promoting it may lose data (allow_data_loss / force to override)",
            p.member
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_kinds_parse_strictly() {
        let tags = HashMap::from([
            ("priority".to_string(), "5".to_string()),
            ("nofailover".to_string(), "true".to_string()),
        ]);
        assert_eq!(
            parse_tags(&tags).unwrap(),
            MemberTags {
                priority: 5,
                nofailover: true,
                ..MemberTags::default()
            }
        );
        let bad = HashMap::from([("colour".to_string(), "red".to_string())]);
        assert_eq!(
            parse_tags(&bad).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let bad = HashMap::from([("priority".to_string(), "high".to_string())]);
        assert!(parse_tags(&bad).is_err());
        assert_eq!(parse_kind("data").unwrap(), MemberKind::Data);
        assert_eq!(parse_kind("witness").unwrap(), MemberKind::Witness);
        assert!(parse_kind("arbiter").is_err());
    }

    #[test]
    fn not_leader_names_the_leader_when_known() {
        let s = not_leader(Some("a1".into()));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("a1"));
        assert!(not_leader(None).message().contains("no leader"));
    }
}
