//! Authenticated member links against a running 3-member cluster of real `meridian-node`
//! processes (Raft only): a process without the cluster secret cannot forge Raft messages,
//! lease renewals or breaks, nor run admin commands without the token; a captured valid
//! request cannot be replayed; and an agent with no member authentication configured
//! refuses to start. Needs the workspace built first (`cargo build --workspace`).

use std::time::{Duration, Instant};

use meridian_node::auth::{self, ClusterKey, SignedChannel, Signer};
use meridian_node::raft::{Command, TypeConfig};
use meridian_proto::admin_client::AdminClient;
use meridian_proto::agent_client::AgentClient;
use meridian_proto::raft_client::RaftClient;
use meridian_proto::{BreakLeaseRequest, CommandRequest, RaftRequest, RenewLeaseRequest};
use meridian_tests::agents::{node_binary, AgentCluster, MemberSpec};
use meridian_tests::wait_for;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use prost::Message;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const FORM: Duration = Duration::from_secs(40);
const CALL: Duration = Duration::from_secs(5);
/// A node id no member has.
const FORGER_ID: u64 = 4242;

async fn three_members() -> AgentCluster {
    let mut c = AgentCluster::new(
        vec![
            MemberSpec::data("a1", "east").bootstrap(),
            MemberSpec::data("a2", "east").join("a1"),
            MemberSpec::witness("w1", "eu").join("a1"),
        ],
        false,
    )
    .unwrap();
    for m in ["a1", "a2", "w1"] {
        c.start(m).unwrap();
    }
    wait_for("3 voters and a leader", FORM, || async {
        let s = c.status().await.ok()?;
        (s.members.iter().filter(|m| m.voter).count() == 3 && !s.leader.is_empty()).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    c
}

async fn channel(c: &AgentCluster, name: &str) -> Channel {
    let addr = c.member(name).grpc;
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(CALL)
        .timeout(CALL);
    tokio::time::timeout(CALL, ep.connect())
        .await
        .expect("connect in time")
        .expect("connect")
}

/// A channel that signs as the made-up member `forger` with a secret that is not the
/// cluster's.
async fn wrong_secret_channel(c: &AgentCluster, to: &str) -> SignedChannel {
    let key = ClusterKey::new(&[7u8; 32]).unwrap();
    SignedChannel::new(channel(c, to).await, Some(Signer::new(key, "forger")), to)
}

fn forged_append_entries(c: &AgentCluster) -> RaftRequest {
    let rpc: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
        vote: openraft::Vote::new_committed(1000, FORGER_ID),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    RaftRequest {
        cluster: c.cluster.clone(),
        payload: serde_json::to_vec(&rpc).unwrap(),
    }
}

fn vote_request(c: &AgentCluster, term: u64) -> RaftRequest {
    let rpc: VoteRequest<u64> = VoteRequest::new(openraft::Vote::new(term, FORGER_ID), None);
    RaftRequest {
        cluster: c.cluster.clone(),
        payload: serde_json::to_vec(&rpc).unwrap(),
    }
}

fn assert_unauthenticated<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    match r {
        Err(s) if s.code() == Code::Unauthenticated => {}
        other => panic!("{what}: expected Unauthenticated, got {other:?}"),
    }
}

/// Leader, term and generation, as the leader reports them.
async fn state(c: &AgentCluster) -> (String, u64, u64, bool) {
    let s = c
        .status()
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    (s.leader, s.term, s.generation, s.paused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_forge_member_rpcs_or_admin_commands() {
    let c = three_members().await;
    let before = state(&c).await;
    let members = ["a1", "a2", "w1"];

    // (a) Forged Raft AppendEntries and Vote, right cluster name, made-up node id, huge term:
    // without any HMAC, and with an HMAC made with another secret. Sent to every member for
    // 2 s (longer than an election timeout).
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for m in members {
            let mut plain = RaftClient::new(channel(&c, m).await);
            assert_unauthenticated(
                plain.append_entries(forged_append_entries(&c)).await,
                "unsigned AppendEntries",
            );
            assert_unauthenticated(plain.vote(vote_request(&c, 1000)).await, "unsigned Vote");
            let mut wrong = RaftClient::new(wrong_secret_channel(&c, m).await);
            assert_unauthenticated(
                wrong.append_entries(forged_append_entries(&c)).await,
                "AppendEntries signed with a wrong secret",
            );
            assert_unauthenticated(
                wrong.vote(vote_request(&c, 1000)).await,
                "Vote signed with a wrong secret",
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // (b) Forged RenewLease / BreakLease for the members, in the current generation.
    for m in members {
        for target in members {
            let renew = RenewLeaseRequest {
                cluster: c.cluster.clone(),
                member: target.to_string(),
                generation: before.2,
                wal_lsn: u64::MAX,
            };
            let brk = BreakLeaseRequest {
                cluster: c.cluster.clone(),
                member: target.to_string(),
                generation: before.2,
                round_term: u64::MAX,
                round_seq: 1,
            };
            let mut plain = AgentClient::new(channel(&c, m).await);
            assert_unauthenticated(
                plain.renew_lease(renew.clone()).await,
                "unsigned RenewLease",
            );
            assert_unauthenticated(plain.break_lease(brk.clone()).await, "unsigned BreakLease");
            let mut wrong = AgentClient::new(wrong_secret_channel(&c, m).await);
            assert_unauthenticated(wrong.renew_lease(renew).await, "RenewLease, wrong secret");
            assert_unauthenticated(wrong.break_lease(brk).await, "BreakLease, wrong secret");
        }
    }

    // (c) Admin command (pause) without the token, with a wrong one, and signed with a
    // wrong secret: refused on every member.
    let pause = serde_json::to_string(&Command::SetMaintenance { on: true }).unwrap();
    for m in members {
        let mut admin = AdminClient::new(channel(&c, m).await);
        let none = admin
            .command(CommandRequest {
                command_json: pause.clone(),
                token: String::new(),
            })
            .await;
        assert_unauthenticated(none, "pause without a token");
        let wrong = admin
            .command(CommandRequest {
                command_json: pause.clone(),
                token: "wrong".into(),
            })
            .await
            .expect_err("pause with a wrong token must be refused");
        assert_eq!(wrong.code(), Code::PermissionDenied, "{wrong:?}");
        let mut req = tonic::Request::new(CommandRequest {
            command_json: pause.clone(),
            token: String::new(),
        });
        req.metadata_mut()
            .insert("authorization", "Bearer wrong".parse().unwrap());
        let wrong_header = admin
            .command(req)
            .await
            .expect_err("pause with a wrong bearer token must be refused");
        assert_eq!(wrong_header.code(), Code::PermissionDenied);
        let mut signed_wrong = AdminClient::new(wrong_secret_channel(&c, m).await);
        assert_unauthenticated(
            signed_wrong
                .command(CommandRequest {
                    command_json: pause.clone(),
                    token: String::new(),
                })
                .await,
            "pause signed with a wrong secret",
        );
    }

    // Nothing changed: same leader, same term, same generation, not paused.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = state(&c).await;
    assert_eq!(
        after,
        before,
        "the forgeries changed the cluster\n{}",
        c.logs()
    );
    assert!(!after.3);

    // The refusals are logged with the peer's address (rate-limited).
    let log = c.member("a1").log();
    assert!(
        log.contains("refused an unauthenticated request") && log.contains("127.0.0.1:"),
        "a1 does not log the refusals:\n{log}"
    );

    // Control: the same pause with the token (bearer scheme in lower case) is accepted, so
    // the refusals above were about the credentials.
    let mut admin = AdminClient::new(channel(&c, "a2").await);
    let mut req = tonic::Request::new(CommandRequest {
        command_json: pause.clone(),
        token: String::new(),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("bearer {}", c.token).parse().unwrap(),
    );
    admin.command(req).await.expect("pause with the token");
    assert!(state(&c).await.3, "the authorized pause did not apply");
    let resume = serde_json::to_string(&Command::SetMaintenance { on: false }).unwrap();
    admin
        .command(CommandRequest {
            command_json: resume,
            token: c.token.clone(),
        })
        .await
        .expect("resume with the token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_signed_request_is_refused() {
    let c = three_members().await;
    let before = state(&c).await;
    let secret = c.secret.clone().expect("the fixture uses a cluster secret");
    let key = ClusterKey::new(secret.as_bytes()).unwrap();
    let signer = Signer::new(key, "a2");
    let target = "a1";

    // A valid, harmless request (a vote for term 1, below the cluster's term), signed by
    // hand so that it can be sent twice byte for byte.
    let message = vote_request(&c, 1);
    let encoded = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&encoded);
    let path = "/meridian.v1.Raft/Vote";
    let mut headers = http::HeaderMap::new();
    let nonce = "0123456789abcdef0123456789abcdef";
    signer.sign_with(
        &mut headers,
        path,
        target,
        &body,
        auth::unix_now_ms(),
        nonce,
    );

    let send = |message: RaftRequest, headers: http::HeaderMap| {
        let c = &c;
        async move {
            let mut client = RaftClient::new(channel(c, target).await);
            let mut req = tonic::Request::new(message);
            for (k, v) in headers.iter() {
                let key = tonic::metadata::MetadataKey::from_bytes(k.as_str().as_bytes()).unwrap();
                req.metadata_mut()
                    .insert(key, v.to_str().unwrap().parse().unwrap());
            }
            client.vote(req).await
        }
    };
    let first = send(message.clone(), headers.clone()).await;
    assert!(
        first.is_ok(),
        "the first, valid signed request was refused: {first:?}\n{}",
        c.logs()
    );
    let second = send(message.clone(), headers.clone()).await;
    match second {
        Err(s) if s.code() == Code::Unauthenticated && s.message().contains("replay") => {}
        other => panic!("the replay was not refused as one: {other:?}"),
    }

    // The same headers on another body (a huge-term vote) do not verify either.
    let mut other_nonce = http::HeaderMap::new();
    signer.sign_with(
        &mut other_nonce,
        path,
        target,
        &body,
        auth::unix_now_ms(),
        "fedcba9876543210fedcba9876543210",
    );
    assert_unauthenticated(
        send(vote_request(&c, 1000), other_nonce).await,
        "a signature moved to another body",
    );

    // A stale timestamp (two minutes old) is refused.
    let mut stale = http::HeaderMap::new();
    signer.sign_with(
        &mut stale,
        path,
        target,
        &body,
        auth::unix_now_ms() - 120_000,
        "00000000000000000000000000000abc",
    );
    assert_unauthenticated(send(message, stale).await, "a stale request");

    let after = state(&c).await;
    assert_eq!(
        (after.0, after.1),
        (before.0, before.1),
        "leader or term changed"
    );
}

/// Runs `meridian-node --config path` and waits (bounded) for it to exit.
fn run_node(path: &std::path::Path) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(node_binary().unwrap())
        .arg("--config")
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("meridian-node did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_agent_without_member_authentication_refuses_to_start() {
    let c = AgentCluster::new(vec![MemberSpec::data("a1", "east").bootstrap()], false).unwrap();
    let text = std::fs::read_to_string(&c.member("a1").config_path).unwrap();
    assert!(text.contains("[security]\ncluster_secret_file"), "{text}");
    let cut = |t: &str| -> String {
        let start = t.find("[security]").unwrap();
        let end = start + t[start..].find("\n\n").unwrap();
        format!("{}{}", &t[..start], &t[end..])
    };

    // Neither TLS nor a secret, insecure not set: exit 2, naming [security].
    let bare = c.dir().join("bare.toml");
    std::fs::write(&bare, cut(&text)).unwrap();
    let (status, err) = run_node(&bare);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("[security]"),
        "the error does not name [security]: {err}"
    );

    // Explicitly insecure = false: the same.
    let explicit = c.dir().join("explicit.toml");
    std::fs::write(
        &explicit,
        format!("{}\n[security]\ninsecure = false\n", cut(&text)),
    )
    .unwrap();
    let (status, err) = run_node(&explicit);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("[security]"), "{err}");

    // A secret that is too short: exit 2, naming the key.
    let short_file = c.dir().join("short-secret");
    std::fs::write(&short_file, "too-short").unwrap();
    let short = c.dir().join("short.toml");
    std::fs::write(
        &short,
        format!(
            "{}\n[security]\ncluster_secret_file = \"{}\"\n",
            cut(&text),
            short_file.display()
        ),
    )
    .unwrap();
    let (status, err) = run_node(&short);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("security.cluster_secret_file") && err.contains("at least 32"),
        "{err}"
    );
}

/// (b) with real Postgres: while a stranger keeps sending forged `RenewLease`s for the
/// primary (unsigned and signed with a wrong secret), the primary's agent and Postgres are
/// killed; the failover still happens in normal time (the forgeries once delayed it from
/// ~2.4 s to 25.5 s) and every forgery is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_lease_renewals_do_not_delay_a_failover() {
    let mut c = AgentCluster::with_postgres(
        vec![
            MemberSpec::data("a1", "a").bootstrap(),
            MemberSpec::data("a2", "a").join("a1"),
            MemberSpec::witness("w1", "b").join("a1"),
        ],
        None,
    )
    .unwrap();
    c.start("a1").unwrap();
    wait_for("a1 primary of generation 1", FORM, || async {
        let s = c.status().await.ok()?;
        (s.primary == "a1" && s.generation == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    c.start("a2").unwrap();
    c.start("w1").unwrap();
    // a2 streams and a1 waits on it for its commits: a2 is a lossless candidate.
    wait_for(
        "a1 waiting on a2 for its commits",
        Duration::from_secs(90),
        || async {
            let s = c.status().await.ok()?;
            let a1 = s.members.iter().find(|m| m.name == "a1")?;
            let names = &a1
                .observation
                .as_ref()?
                .postgres
                .as_ref()?
                .sync_standby_names
                .as_ref()?
                .names;
            names.iter().any(|n| n == "a2").then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forger = {
        let stop = stop.clone();
        let cluster = c.cluster.clone();
        let targets: Vec<(String, std::net::SocketAddr)> = ["a2", "w1"]
            .iter()
            .map(|n| (n.to_string(), c.member(n).grpc))
            .collect();
        tokio::spawn(async move {
            let (mut refused, mut other) = (0u32, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                for (name, addr) in &targets {
                    let ep = Endpoint::from_shared(format!("http://{addr}"))
                        .unwrap()
                        .connect_timeout(CALL)
                        .timeout(CALL);
                    let Ok(ch) = ep.connect().await else { continue };
                    let renew = RenewLeaseRequest {
                        cluster: cluster.clone(),
                        member: "a1".into(),
                        generation: 1,
                        wal_lsn: u64::MAX,
                    };
                    let key = ClusterKey::new(&[9u8; 32]).unwrap();
                    let signed = SignedChannel::new(ch.clone(), Some(Signer::new(key, "a1")), name);
                    for r in [
                        AgentClient::new(ch).renew_lease(renew.clone()).await,
                        AgentClient::new(signed).renew_lease(renew).await,
                    ] {
                        match r {
                            Err(s) if s.code() == Code::Unauthenticated => refused += 1,
                            r => other.push(format!("{r:?}")),
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (refused, other)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    c.kill("a1").unwrap();
    c.member("a1").kill_postgres();
    let r = wait_for(
        "a2 promoted in generation 2",
        Duration::from_secs(30),
        || async {
            let s = c.status().await.ok()?;
            (s.primary == "a2" && s.generation == 2).then_some(())
        },
    )
    .await;
    let took = killed.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (refused, other) = forger.await.unwrap();
    r.unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!(
        "failover took {} ms under {refused} forged renewals",
        took.as_millis()
    );
    assert!(
        other.is_empty(),
        "forged renewals not refused as unauthenticated: {other:?}"
    );
    assert!(refused >= 8, "too few forgeries were sent: {refused}");
    assert!(
        took < Duration::from_secs(15),
        "the failover took {} ms under forged renewals\n{}",
        took.as_millis(),
        c.logs()
    );
}

/// With `[security] insecure = true` (and no secret, no TLS) the agent starts, and both
/// `/health` and the admin status say that it runs insecure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_agent_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c =
        AgentCluster::new(vec![MemberSpec::witness("w1", "eu").bootstrap()], false).unwrap();
    let m = c.member("w1");
    let text = std::fs::read_to_string(&m.config_path).unwrap();
    let start = text.find("[security]").unwrap();
    let end = start + text[start..].find("\n\n").unwrap();
    let insecure = format!(
        "{}[security]\ninsecure = true{}",
        &text[..start],
        &text[end..]
    );
    std::fs::write(&m.config_path, insecure).unwrap();
    let http = m.http;
    c.start("w1").unwrap();
    let s = wait_for("w1 leads", FORM, || async {
        c.status().await.ok().filter(|s| s.leader == "w1")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert!(s.insecure, "status does not say insecure: {s:?}");
    let mut conn = tokio::net::TcpStream::connect(http).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(CALL, conn.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.contains("\"insecure\":true"), "{out}");
    assert!(
        c.member("w1").log().contains("insecure = true"),
        "the agent does not warn that it runs insecure"
    );
}
