//! Three in-process Raft members talking real gRPC on 127.0.0.1: they elect a leader,
//! replicate intent commands (and refusals), survive the loss of the leader, and refuse
//! RPCs from another cluster.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use meridian_node::raft::intent::{Command, MemberKind, MemberTags, Refused, Response};
use meridian_node::raft::{
    open_store, raft_config_with_timing, AddressBook, GrpcNetworkFactory, MemberNode, MeridianRaft,
    NodeId, RaftGrpcService, StateMachineStore,
};
use meridian_proto::raft_client::RaftClient;
use meridian_proto::RaftRequest;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

const CLUSTER: &str = "test-cluster";
/// Every wait in this test is bounded by this.
const WAIT: Duration = Duration::from_secs(15);

struct Member {
    id: NodeId,
    raft: MeridianRaft,
    applied: tokio::sync::watch::Receiver<std::sync::Arc<meridian_node::raft::AppliedState>>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    /// Kept so a stopped member can be restarted on the same data.
    dir: Option<TempDir>,
}

impl Member {
    async fn stop(&mut self) {
        self.raft.shutdown().await.expect("raft shutdown");
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            tokio::time::timeout(WAIT, h)
                .await
                .expect("server stops in time")
                .expect("server task");
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(h) = self.server.take() {
            h.abort();
        }
    }
}

fn name(id: NodeId) -> String {
    format!("n{id}")
}

async fn start_member(
    id: NodeId,
    listener: TcpListener,
    book: AddressBook,
    cluster: &str,
) -> Member {
    start_member_in(id, listener, book, cluster, tempfile::tempdir().unwrap()).await
}

async fn start_member_in(
    id: NodeId,
    listener: TcpListener,
    book: AddressBook,
    cluster: &str,
    dir: TempDir,
) -> Member {
    let addr = listener.local_addr().unwrap();
    let (log, sm): (_, StateMachineStore) = open_store(dir.path()).unwrap();
    let applied = sm.subscribe();
    let config = raft_config_with_timing(cluster, 100, 500, 1000).unwrap();
    let network = GrpcNetworkFactory::new(id, cluster, book);
    let raft = MeridianRaft::new(id, config, network, log, sm)
        .await
        .expect("raft starts");
    let svc = RaftGrpcService::new(cluster, raft.clone()).into_server();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = rx.await;
            })
            .await
            .expect("grpc server");
    });
    Member {
        id,
        raft,
        applied,
        addr,
        stop: Some(tx),
        server: Some(server),
        dir: Some(dir),
    }
}

async fn start_cluster(n: u64) -> (Vec<Member>, AddressBook) {
    let mut listeners = Vec::new();
    let mut addrs = HashMap::new();
    for id in 1..=n {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.insert(name(id), l.local_addr().unwrap());
        listeners.push((id, l));
    }
    let book = AddressBook::new(addrs);
    let mut members = Vec::new();
    for (id, l) in listeners {
        members.push(start_member(id, l, book.clone(), CLUSTER).await);
    }
    (members, book)
}

async fn wait_leader(members: &[Member], not: Option<NodeId>) -> NodeId {
    let m = members[0]
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != not,
            "a leader is elected",
        )
        .await
        .expect("leader elected within bound");
    m.current_leader.unwrap()
}

fn add(name: &str) -> Command {
    Command::AddMember {
        name: name.into(),
        region: "r1".into(),
        kind: MemberKind::Data,
        tags: MemberTags::default(),
        at_unix_ms: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_elect_replicate_and_fail_over_over_grpc() {
    let (mut members, book) = start_cluster(3).await;
    let voters: BTreeMap<NodeId, MemberNode> =
        (1..=3).map(|id| (id, MemberNode::new(name(id)))).collect();
    members[0]
        .raft
        .initialize(voters)
        .await
        .expect("initialize");

    let leader = wait_leader(&members, None).await;
    let lraft = members
        .iter()
        .find(|m| m.id == leader)
        .unwrap()
        .raft
        .clone();
    lraft.ensure_linearizable().await.expect("leader confirmed");

    let w = lraft.client_write(add("n1")).await.expect("write");
    assert!(matches!(w.data, Response::MemberAdded(_)), "{:?}", w.data);
    // Refusals travel back from the state machine to the proposer.
    let dup = lraft.client_write(add("n1")).await.expect("write dup");
    assert_eq!(
        dup.data,
        Response::Refused(Refused::MemberExists("n1".into()))
    );

    // Every member applies both entries, with the same outcome.
    for m in &members {
        m.raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(dup.log_id.index), "replicated")
            .await
            .expect("applied on every member");
        let state = m.applied.borrow().clone();
        assert!(
            state.intent.member("n1").is_some(),
            "member {} lacks n1",
            m.id
        );
        assert_eq!(state.intent.members.len(), 1);
    }

    // Lose the leader: the other two elect a new one and keep committing.
    let idx = members.iter().position(|m| m.id == leader).unwrap();
    let mut old = members.remove(idx);
    old.stop().await;
    let new_leader = wait_leader(&members, Some(leader)).await;
    assert_ne!(new_leader, leader);
    let nraft = members
        .iter()
        .find(|m| m.id == new_leader)
        .unwrap()
        .raft
        .clone();
    let w2 = tokio::time::timeout(WAIT, nraft.client_write(add("n2")))
        .await
        .expect("write after failover in time")
        .expect("write after failover");
    assert!(matches!(w2.data, Response::MemberAdded(_)));
    for m in &members {
        m.raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(w2.log_id.index), "replicated after failover")
            .await
            .expect("applied after failover");
        assert_eq!(m.applied.borrow().intent.members.len(), 2);
    }

    // The old leader restarts on its data at a new address (the address book follows): it
    // comes back with its durable log and vote, catches up, and applies what it missed.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    book.set(name(old.id), listener.local_addr().unwrap());
    let dir = old.dir.take().unwrap();
    let back = start_member_in(old.id, listener, book.clone(), CLUSTER, dir).await;
    back.raft
        .wait(Some(WAIT))
        .applied_index_at_least(Some(w2.log_id.index), "restarted member catches up")
        .await
        .expect("restarted member catches up");
    let state = back.applied.borrow().clone();
    assert_eq!(state.intent.members.len(), 2);
    assert!(state.intent.member("n2").is_some());
    members.push(back);

    for m in &mut members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_from_another_cluster_is_refused() {
    let (mut members, _book) = start_cluster(1).await;
    let addr = members[0].addr;
    let mut client = RaftClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let status = client
        .vote(RaftRequest {
            cluster: "other-cluster".into(),
            payload: b"{}".to_vec(),
        })
        .await
        .expect_err("another cluster must be refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    // Same cluster but garbage payload: refused as invalid, not crashing the member.
    let status = client
        .vote(RaftRequest {
            cluster: CLUSTER.into(),
            payload: b"not json".to_vec(),
        })
        .await
        .expect_err("garbage must be refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    members[0].stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_different_clusters_never_form_a_quorum() {
    // Same address book, but n2 and n3 believe they are in another cluster: n1 cannot win.
    let mut listeners = Vec::new();
    let mut addrs = HashMap::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.insert(name(id), l.local_addr().unwrap());
        listeners.push((id, l));
    }
    let book = AddressBook::new(addrs);
    let mut members = Vec::new();
    for (id, l) in listeners {
        let cluster = if id == 1 { CLUSTER } else { "other-cluster" };
        members.push(start_member(id, l, book.clone(), cluster).await);
    }
    let voters: BTreeMap<NodeId, MemberNode> =
        (1..=3).map(|id| (id, MemberNode::new(name(id)))).collect();
    members[0]
        .raft
        .initialize(voters)
        .await
        .expect("initialize");
    let res = members[0]
        .raft
        .wait(Some(Duration::from_secs(3)))
        .metrics(|m| m.current_leader.is_some(), "no leader across clusters")
        .await;
    assert!(
        res.is_err(),
        "a leader was elected across clusters: {res:?}"
    );
    for m in &mut members {
        m.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_to_a_silent_or_unknown_peer_is_bounded_by_its_ttl() {
    use openraft::error::RPCError;
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::VoteRequest;
    use openraft::Vote;

    // Accepts TCP connections and then says nothing: a frozen peer.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let book = AddressBook::new(HashMap::from([("frozen".to_string(), silent_addr)]));
    let mut factory = GrpcNetworkFactory::new(1, CLUSTER, book);
    let req = VoteRequest::new(Vote::new(1, 1), None);

    let mut frozen = factory.new_client(2, &MemberNode::new("frozen")).await;
    let started = std::time::Instant::now();
    let res = frozen
        .vote(req.clone(), RPCOption::new(Duration::from_millis(300)))
        .await;
    let took = started.elapsed();
    assert!(matches!(res, Err(RPCError::Timeout(_))), "{res:?}");
    assert!(took < Duration::from_millis(900), "took {took:?}");

    let mut unknown = factory.new_client(3, &MemberNode::new("nobody")).await;
    let res = unknown
        .vote(req, RPCOption::new(Duration::from_millis(300)))
        .await;
    assert!(matches!(res, Err(RPCError::Unreachable(_))), "{res:?}");
    hold.abort();
}
