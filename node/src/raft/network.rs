//! Raft transport over gRPC (service `meridian.v1.Raft`): the client side openraft uses to
//! reach peers, and the server side that hands incoming RPCs to the local `Raft`.
//!
//! openraft's values travel as serde-JSON bytes inside a `RaftRequest` envelope that names the
//! cluster; the server refuses a mismatched cluster before decoding anything. Raft knows peers
//! by name; this member's own address book maps names to the addresses it dials, so the same
//! peer may be reached at different addresses from different regions.
//!
//! One long-lived tonic `Channel` per peer (re-created only when the peer's address changes),
//! and every RPC is bounded by openraft's `RPCOption`: the soft TTL travels as the gRPC
//! deadline (so the server gives up too), the hard TTL cuts the call locally.
//!
//! Every request is authenticated as from this member (see [`crate::auth`]): signed with the
//! cluster secret when there is one, and over mutual TLS when `[tls]` is configured. The
//! server side's check is [`crate::auth::AuthLayer`], in front of this service.

use std::collections::HashMap;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use meridian_proto::raft_client::RaftClient;
use meridian_proto::raft_server::{Raft as RaftRpc, RaftServer};
use meridian_proto::{RaftRequest, RaftResponse};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::RPCTypes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use super::{MemberNode, MeridianRaft, NodeId, TypeConfig};
use crate::auth::{SignedChannel, Signer};

/// Largest gRPC message either side accepts. Snapshot chunks (`snapshot_max_chunk_size`, see
/// [`super::raft_config`]) grow ~4x as JSON byte arrays; this leaves room for that.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 32 << 20;

/// Bound on establishing a TCP + HTTP/2 connection to a peer; cross-region with margin.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;

/// Name → address this member dials for that peer. Shared and updatable at runtime (a config
/// reload); an address change takes effect on the next RPC to that peer.
#[derive(Clone, Debug, Default)]
pub struct AddressBook(Arc<RwLock<HashMap<String, SocketAddr>>>);

impl AddressBook {
    pub fn new(entries: HashMap<String, SocketAddr>) -> Self {
        AddressBook(Arc::new(RwLock::new(entries)))
    }

    pub fn get(&self, name: &str) -> Option<SocketAddr> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    pub fn set(&self, name: impl Into<String>, addr: SocketAddr) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), addr);
    }

    pub fn remove(&self, name: &str) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}

/// Channels by peer name, with the address each was made for.
type ChannelCache = Arc<Mutex<HashMap<String, (SocketAddr, Channel)>>>;

/// Makes the per-peer clients openraft asks for; all share one channel cache.
#[derive(Clone)]
pub struct GrpcNetworkFactory {
    local_id: NodeId,
    cluster: String,
    book: AddressBook,
    channels: ChannelCache,
    tls: Option<ClientTlsConfig>,
    signer: Option<Signer>,
}

impl GrpcNetworkFactory {
    pub fn new(local_id: NodeId, cluster: impl Into<String>, book: AddressBook) -> Self {
        GrpcNetworkFactory {
            local_id,
            cluster: cluster.into(),
            book,
            channels: Arc::default(),
            tls: None,
            signer: None,
        }
    }

    /// Signs every request with the cluster secret.
    pub fn with_signer(mut self, signer: Option<Signer>) -> Self {
        self.signer = signer;
        self
    }

    /// Dials peers over TLS: presents `tls`'s identity and checks that each peer's
    /// certificate is signed by its CA and names the peer (its member name).
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetworkFactory {
    type Network = GrpcNetwork;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> GrpcNetwork {
        GrpcNetwork {
            local_id: self.local_id,
            target,
            node: node.clone(),
            cluster: self.cluster.clone(),
            book: self.book.clone(),
            channels: self.channels.clone(),
            tls: self.tls.clone(),
            signer: self.signer.clone(),
        }
    }
}

/// The link to one peer.
pub struct GrpcNetwork {
    local_id: NodeId,
    target: NodeId,
    node: MemberNode,
    cluster: String,
    book: AddressBook,
    channels: ChannelCache,
    tls: Option<ClientTlsConfig>,
    signer: Option<Signer>,
}

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("no address for member {0:?} in the local address book")]
    NoAddress(String),
    #[error("invalid endpoint for member {name:?} at {addr}: {source}")]
    Endpoint {
        name: String,
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("peer {name:?} refused the request: {status}")]
    Status { name: String, status: Status },
    #[error("encoding or decoding a raft message for {name:?}: {source}")]
    Codec {
        name: String,
        source: serde_json::Error,
    },
}

impl GrpcNetwork {
    fn channel(&self) -> Result<SignedChannel, LinkError> {
        let ch = self.plain_channel()?;
        Ok(SignedChannel::new(ch, self.signer.clone(), &self.node.name))
    }

    fn plain_channel(&self) -> Result<Channel, LinkError> {
        let name = &self.node.name;
        let addr = self
            .book
            .get(name)
            .ok_or_else(|| LinkError::NoAddress(name.clone()))?;
        let mut cache = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached_addr, ch)) = cache.get(name) {
            if *cached_addr == addr {
                return Ok(ch.clone());
            }
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|source| LinkError::Endpoint {
                name: name.clone(),
                addr,
                source,
            })?
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone().domain_name(name.clone()))
                .map_err(|source| LinkError::Endpoint {
                    name: name.clone(),
                    addr,
                    source,
                })?;
        }
        // Lazy: connects on first use and reconnects by itself after the peer comes back.
        let ch = endpoint.connect_lazy();
        cache.insert(name.clone(), (addr, ch.clone()));
        Ok(ch)
    }

    /// Sends one RPC and decodes the peer's `Result<Resp, E>`.
    async fn call<Req, Resp, E>(
        &mut self,
        action: RPCTypes,
        rpc: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, MemberNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: Error + DeserializeOwned,
    {
        let name = self.node.name.clone();
        let codec = |source| LinkError::Codec {
            name: name.clone(),
            source,
        };
        let payload =
            serde_json::to_vec(rpc).map_err(|e| RPCError::Network(NetworkError::new(&codec(e))))?;
        let channel = self
            .channel()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        let mut request = tonic::Request::new(RaftRequest {
            cluster: self.cluster.clone(),
            payload,
        });
        request.set_timeout(option.soft_ttl());
        let send = async {
            match action {
                RPCTypes::AppendEntries => client.append_entries(request).await,
                RPCTypes::Vote => client.vote(request).await,
                RPCTypes::InstallSnapshot => client.install_snapshot(request).await,
            }
        };
        let timeout = || {
            RPCError::Timeout(Timeout {
                action,
                id: self.local_id,
                target: self.target,
                timeout: option.hard_ttl(),
            })
        };
        let response = match tokio::time::timeout(option.hard_ttl(), send).await {
            Err(_) => return Err(timeout()),
            Ok(Err(status)) => {
                return Err(match status.code() {
                    Code::DeadlineExceeded | Code::Cancelled => timeout(),
                    // Down, unknown, or another cluster: back off rather than retry at once.
                    Code::Unavailable | Code::FailedPrecondition | Code::Unknown => {
                        RPCError::Unreachable(Unreachable::new(&LinkError::Status { name, status }))
                    }
                    _ => RPCError::Network(NetworkError::new(&LinkError::Status { name, status })),
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, E> = serde_json::from_slice(&response.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&codec(e))))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for GrpcNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>>
    {
        self.call(RPCTypes::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, MemberNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(RPCTypes::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>> {
        self.call(RPCTypes::Vote, &rpc, &option).await
    }
}

/// Server side: checks the cluster name, decodes, and calls the local `Raft`.
pub struct RaftGrpcService {
    cluster: String,
    raft: MeridianRaft,
}

impl RaftGrpcService {
    pub fn new(cluster: impl Into<String>, raft: MeridianRaft) -> Self {
        RaftGrpcService {
            cluster: cluster.into(),
            raft,
        }
    }

    /// The tonic service to add to a `Server`, with message limits matching the client's.
    pub fn into_server(self) -> RaftServer<RaftGrpcService> {
        RaftServer::new(self)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
    }

    fn open<T: DeserializeOwned>(&self, request: tonic::Request<RaftRequest>) -> Result<T, Status> {
        let req = request.into_inner();
        if req.cluster != self.cluster {
            warn_cluster_mismatch(&self.cluster, &req.cluster);
            return Err(Status::failed_precondition(format!(
                "cluster mismatch: this member belongs to {:?}, the request to {:?}",
                self.cluster, req.cluster
            )));
        }
        serde_json::from_slice(&req.payload)
            .map_err(|e| Status::invalid_argument(format!("decoding raft request: {e}")))
    }
}

/// Logs a refused request from another cluster, at most once per 10 s (peers retry often).
fn warn_cluster_mismatch(ours: &str, theirs: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_WARN_S: AtomicU64 = AtomicU64::new(0);
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let last = LAST_WARN_S.load(Ordering::Relaxed);
    if now_s >= last + 10
        && LAST_WARN_S
            .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            "refused a raft request from cluster {theirs:?}: this member belongs to {ours:?}"
        );
    }
}

fn reply<T: Serialize>(result: &T) -> Result<tonic::Response<RaftResponse>, Status> {
    let payload = serde_json::to_vec(result)
        .map_err(|e| Status::internal(format!("encoding raft response: {e}")))?;
    Ok(tonic::Response::new(RaftResponse { payload }))
}

#[tonic::async_trait]
impl RaftRpc for RaftGrpcService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self.open(request)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, Status> {
        let rpc: VoteRequest<NodeId> = self.open(request)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = self.open(request)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
