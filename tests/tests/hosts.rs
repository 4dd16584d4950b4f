//! Every member on its own host: one network namespace per member, each with its own
//! address on a bridge (`meridian_chaos::netns`), address books with those addresses, and
//! partitions made by packet filters inside the namespaces (a real partition, no proxy).
//! Root only: without root each test prints "skipped: needs root" and passes. Every
//! namespace, veth, bridge and rule is gone after each test (checked at its end).
//!
//! `raft_forms_across_hosts`: the default 2 + 2 + 1 topology as Raft-only agents (no
//! Postgres): the group forms, the leader's host cut off elects a leader on the majority
//! side while writes through the cut-off one fail, heal and rejoin.
//!
//! `postgres_fails_over_across_hosts`: the same topology with real Postgres: the
//! replication role (not the superuser) streams across hosts; kill -9 of the primary's
//! agent and Postgres, rejoin; a switchover; the primary's host cut off fences it and a
//! member of the majority is promoted; heal, rejoin; every acknowledged row present and
//! never two writable servers. Postgres TLS (verify-full, certificates naming the hosts'
//! addresses) and the roles come from the fixture.
//!
//! `a_membership_change_waits_until_the_primary_counts_over_the_current_members`: the
//! primary cut off from the Raft leader only (it keeps its lease through a witness); one
//! witness joins, a second is held back as a learner until the primary reports counting
//! over the current members, and is admitted after the heal.
//!
//! The tests run one at a time (a shared lock): five agents (and four Postgres) on 2 cores.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_chaos::netns;
use meridian_node::decide::SwitchoverPhase;
use meridian_node::raft::intent::{HistoryEntry, HistoryKind, Intent, PendingSwitchover};
use meridian_node::raft::Command;
use meridian_node::types::Generation;
use meridian_proto::{StatusResponse, WalReceiverStatus};
use meridian_tests::agents::{AgentCluster, ClusterSetup, Hosts, MemberSpec, SUPERUSER_PASSWORD};
use meridian_tests::{wait_for, wait_until};
use tokio_postgres::NoTls;

/// Bound on forming the Raft group.
const FORM_RAFT: Duration = Duration::from_secs(60);
/// Bound on forming with Postgres (initdb, three clones, streaming).
const FORM_PG: Duration = Duration::from_secs(150);
const ELECT: Duration = Duration::from_secs(30);
const FAILOVER: Duration = Duration::from_secs(60);
const REJOIN: Duration = Duration::from_secs(90);
const SQL: Duration = Duration::from_secs(5);
const TOKEN: &str = "hosts-test-token";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ALL: [&str; 5] = ["a1", "a2", "b1", "b2", "w1"];
const DATA: [&str; 4] = ["a1", "a2", "b1", "b2"];

/// The default topology: 2 + 2 data members in two regions, a witness in a third.
fn topology() -> Vec<MemberSpec> {
    vec![
        MemberSpec::data("a1", "us-east").bootstrap(),
        MemberSpec::data("a2", "us-east").join("a1"),
        MemberSpec::data("b1", "us-west").join("a1"),
        MemberSpec::data("b2", "us-west").join("a1"),
        MemberSpec::witness("w1", "eu-central").join("a1"),
    ]
}

/// None (after printing why) when this machine cannot build hosts: not root, or no
/// `ip`/`iptables`.
fn skip_unless_hosts() -> Option<()> {
    match netns::check_available() {
        Ok(_) => Some(()),
        Err(e @ netns::NetnsError::NeedsRoot { .. }) => {
            println!("skipped: needs root ({e})");
            None
        }
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

fn intent(s: &StatusResponse) -> Intent {
    serde_json::from_str(&s.intent_json).expect("intent_json decodes")
}

fn note(reason: &str) -> Command {
    Command::AppendHistory(HistoryEntry {
        at_unix_ms: 1,
        kind: HistoryKind::Note,
        reason: reason.to_string(),
        old_primary: None,
        new_primary: None,
        generation: Generation(0),
        old_primary_lsn: None,
        new_primary_lsn: None,
        possible_loss_bytes: None,
        write_pause_ms: None,
    })
}

fn notes(s: &StatusResponse) -> BTreeSet<String> {
    intent(s).history.into_iter().map(|h| h.reason).collect()
}

/// The status of the freshest leader among `among` (an isolated old leader does not step
/// down by itself, so whom to ask matters).
async fn leader_status(c: &AgentCluster, among: &[&str]) -> Option<StatusResponse> {
    let mut best: Option<StatusResponse> = None;
    for m in among {
        if let Ok(s) = c.status_of(m, false).await {
            if s.from_leader && best.as_ref().is_none_or(|b| s.term > b.term) {
                best = Some(s);
            }
        }
    }
    best
}

/// The namespaces and root-side links of `c`'s hosts, to check after drop that they are
/// gone.
fn host_resources(c: &AgentCluster) -> (Vec<String>, Vec<String>) {
    let h = c.hosts().expect("the cluster runs on hosts");
    (
        h.hosts().iter().map(|x| x.netns.clone()).collect(),
        h.links(),
    )
}

fn assert_hosts_removed((namespaces, links): &(Vec<String>, Vec<String>)) {
    assert!(!namespaces.is_empty() && !links.is_empty());
    for ns in namespaces {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "namespace {ns} left behind"
        );
    }
    for l in links {
        let out = std::process::Command::new("ip")
            .args(["link", "show", "dev", l])
            .output()
            .expect("ip link show");
        assert!(!out.status.success(), "link {l} left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_forms_across_hosts() {
    if skip_unless_hosts().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut c = AgentCluster::build_with(
        topology(),
        ClusterSetup {
            hosts: Hosts::Netns,
            ..ClusterSetup::default()
        },
    )
    .unwrap();
    let namespaces = host_resources(&c);
    // Each member has its own, non-loopback address.
    let addrs: BTreeSet<String> = ALL.iter().map(|m| c.member(m).addr.to_string()).collect();
    assert_eq!(addrs.len(), 5, "{addrs:?}");
    assert!(ALL.iter().all(|m| !c.member(m).addr.is_loopback()));
    for m in ALL {
        c.start(m).unwrap();
    }
    // Each agent runs inside its own host.
    let h = c.hosts().unwrap();
    for m in ALL {
        let pid = c.member(m).pid().unwrap() as i32;
        assert!(
            h.pids(m).unwrap().contains(&pid),
            "{m}'s agent ({pid}) is not inside its namespace"
        );
    }
    let s = wait_for("five voters under one leader", FORM_RAFT, || async {
        let s = c.status().await.ok()?;
        let voters = s.members.iter().filter(|m| m.voter).count();
        (voters == 5 && !s.leader.is_empty()).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let old_leader = s.leader.clone();
    let old_term = s.term;
    eprintln!("formed across hosts: leader {old_leader} (term {old_term})");
    let mut acked = Vec::new();
    for i in 0..5 {
        let r = format!("before-{i}");
        c.command(&old_leader, &note(&r))
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
        acked.push(r);
    }

    // Cut the leader's host off from every other host (iptables inside the namespaces).
    let h = c.hosts().unwrap();
    let cut = h.isolate(&old_leader).unwrap();
    assert_eq!(cut, 8, "four peers, both ways");
    let other = ALL.iter().copied().find(|m| *m != old_leader).unwrap();
    let to_other = c.member(other).grpc;
    assert!(
        !h.can_connect(&old_leader, to_other, Duration::from_millis(500))
            .unwrap(),
        "the cut-off host still reaches {other}"
    );
    let majority: Vec<&str> = ALL.iter().copied().filter(|m| *m != old_leader).collect();
    let s = wait_for("a new leader on the majority side", ELECT, || async {
        let s = leader_status(&c, &majority).await?;
        (s.leader != old_leader && s.term > old_term).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let new_leader = s.leader.clone();
    assert!(majority.contains(&new_leader.as_str()));
    eprintln!(
        "leader {old_leader} cut off: {new_leader} leads (term {})",
        s.term
    );
    for i in 0..5 {
        let r = format!("during-{i}");
        c.command(&new_leader, &note(&r))
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
        acked.push(r);
    }
    // The cut-off member cannot commit anything.
    let refused = c.command(&old_leader, &note("from-the-minority")).await;
    assert!(
        refused.is_err(),
        "the cut-off member committed: {refused:?}"
    );

    // Heal: the old leader rejoins, follows, and has every acknowledged entry.
    c.hosts().unwrap().heal().unwrap();
    assert!(c
        .hosts()
        .unwrap()
        .can_connect(&old_leader, to_other, Duration::from_secs(2))
        .unwrap());
    // (It may follow, or win a later election itself: either way in a newer term, caught up.)
    let back = wait_for("the old leader to rejoin and catch up", ELECT, || async {
        let s = c.status_of(&old_leader, true).await.ok()?;
        let leader = leader_status(&c, &ALL).await?;
        let caught_up = s.applied_index >= leader.applied_index;
        (!s.leader.is_empty() && s.term > old_term && caught_up).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let have = notes(&back);
    for a in &acked {
        assert!(have.contains(a), "acknowledged {a} missing on {old_leader}");
    }
    assert!(!have.contains("from-the-minority"));
    let s = c.status().await.unwrap();
    assert_eq!(s.members.iter().filter(|m| m.voter).count(), 5, "{s:?}");

    drop(c);
    assert_hosts_removed(&namespaces);
}

// ---------------------------------------------------------------------------------------
// With Postgres.

async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio::time::timeout(SQL, tokio_postgres::connect(conninfo, NoTls))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn exec(conninfo: &str, sql: &str) -> Result<(), String> {
    let client = connect(conninfo).await?;
    tokio::time::timeout(SQL, client.batch_execute(sql))
        .await
        .map_err(|_| "statement timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// Every data member at its host's address, only a writable server accepted.
fn read_write_conninfo(c: &AgentCluster) -> String {
    let hosts: Vec<String> = DATA.iter().map(|n| c.member(n).addr.to_string()).collect();
    let ports: Vec<String> = DATA
        .iter()
        .map(|n| c.member(n).pg_port.to_string())
        .collect();
    format!(
        "host={} port={} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=2 target_session_attrs=read-write",
        hosts.join(","),
        ports.join(",")
    )
}

/// Whether `member`'s Postgres answers and is out of recovery (None: no answer).
async fn writable(c: &AgentCluster, member: &str) -> Option<bool> {
    let info = c
        .member(member)
        .pg_conninfo()
        .replace("connect_timeout=2", "connect_timeout=1");
    let client = connect(&info).await.ok()?;
    let row = tokio::time::timeout(
        Duration::from_secs(1),
        client.query_one("SELECT NOT pg_is_in_recovery()", &[]),
    )
    .await
    .ok()?
    .ok()?;
    Some(row.get(0))
}

/// Waits until `primary` is the primary and every other data member streams from it.
async fn wait_streaming_from(c: &AgentCluster, primary: &str, within: Duration) -> StatusResponse {
    let others: Vec<&str> = DATA.iter().copied().filter(|m| *m != primary).collect();
    wait_for(
        &format!("{others:?} streaming from {primary}"),
        within,
        || async {
            let s = leader_status(c, &ALL).await?;
            if s.primary != primary {
                return None;
            }
            let ok = others.iter().all(|n| {
                s.members
                    .iter()
                    .find(|m| m.name == *n)
                    .and_then(|m| m.observation.as_ref())
                    .and_then(|o| o.postgres.as_ref())
                    .is_some_and(|p| {
                        p.up && p.in_recovery
                            && !p.fenced
                            && p.wal_receiver() == WalReceiverStatus::Streaming
                            && p.upstream == primary
                    })
            });
            ok.then_some(s)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()))
}

/// Polls every data member's `pg_is_in_recovery()`; keeps the most writable seen at once.
struct SplitBrainProbe {
    stop: Arc<AtomicBool>,
    max_writable: Arc<AtomicUsize>,
    worst: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SplitBrainProbe {
    fn start(c: &AgentCluster) -> SplitBrainProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let max_writable = Arc::new(AtomicUsize::new(0));
        let worst = Arc::new(Mutex::new(Vec::new()));
        let infos: Vec<(String, String)> = DATA
            .iter()
            .map(|n| {
                let info = c
                    .member(n)
                    .pg_conninfo()
                    .replace("connect_timeout=2", "connect_timeout=1");
                (n.to_string(), info)
            })
            .collect();
        let (s, m, w) = (stop.clone(), max_writable.clone(), worst.clone());
        let task = tokio::spawn(async move {
            // Bounded: at most ~15 minutes of rounds.
            for _ in 0..9000 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let rounds = infos.iter().map(|(name, info)| async move {
                    let client = connect(info).await.ok()?;
                    let row = tokio::time::timeout(
                        Duration::from_secs(1),
                        client.query_one("SELECT NOT pg_is_in_recovery()", &[]),
                    )
                    .await
                    .ok()?
                    .ok()?;
                    row.get::<_, bool>(0).then(|| name.clone())
                });
                let now: Vec<String> = futures::future::join_all(rounds)
                    .await
                    .into_iter()
                    .flatten()
                    .collect();
                if now.len() > m.load(Ordering::SeqCst) {
                    m.store(now.len(), Ordering::SeqCst);
                    *w.lock().unwrap() = now;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        SplitBrainProbe {
            stop,
            max_writable,
            worst,
            task,
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let worst = self.worst.lock().unwrap().clone();
        (self.max_writable.load(Ordering::SeqCst), worst)
    }
}

/// A writer with increasing row ids through the read-write connection string; records
/// every id whose commit was acknowledged. Bounded in attempts.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(rw: String) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let mut id = 0i64;
            let mut client = None;
            for _ in 0..200_000 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if client.is_none() {
                    client = connect(&rw).await.ok();
                    if client.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
                let cl = client.as_ref().expect("connected above");
                let r = tokio::time::timeout(
                    SQL,
                    cl.batch_execute(&format!("INSERT INTO t VALUES ({id})")),
                )
                .await;
                match r {
                    Ok(Ok(())) => a.lock().unwrap().push(id),
                    // Failed or indeterminate: not counted; a new session finds the primary.
                    _ => client = None,
                }
                id += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Writer { stop, acked, task }
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        self.acked.lock().unwrap().clone()
    }
}

/// Waits until the writer has `n` more acknowledged rows than now (writes flow again).
async fn writes_flow(c: &AgentCluster, w: &Writer, n: usize, within: Duration, what: &str) {
    let base = w.acked_count();
    wait_until(what, within, || async { w.acked_count() >= base + n })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fails_over_across_hosts() {
    if skip_unless_hosts().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut c = AgentCluster::build_with(
        topology(),
        ClusterSetup {
            token: Some(TOKEN.into()),
            postgres: true,
            hosts: Hosts::Netns,
            ..ClusterSetup::default()
        },
    )
    .unwrap();
    let namespaces = host_resources(&c);
    c.start("a1").unwrap();
    wait_for("a1 primary of generation 1", FORM_PG, || async {
        let s = c.status().await.ok()?;
        (s.primary == "a1" && s.generation == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    for m in ["a2", "b1", "b2", "w1"] {
        c.start(m).unwrap();
    }
    wait_streaming_from(&c, "a1", FORM_PG).await;

    // Replication crosses hosts, as the replication role, not the superuser.
    let primary = connect(&c.member("a1").pg_conninfo()).await.unwrap();
    let rows = primary
        .query(
            "SELECT r.usename::text, host(r.client_addr), coalesce(s.ssl, false) \
             FROM pg_stat_replication r LEFT JOIN pg_stat_ssl s ON s.pid = r.pid \
             WHERE r.application_name <> 'meridian_lease_gate'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "three walsenders on a1");
    let standby_addrs: BTreeSet<String> = ["a2", "b1", "b2"]
        .iter()
        .map(|m| c.member(m).addr.to_string())
        .collect();
    let mut seen_addrs = BTreeSet::new();
    for r in &rows {
        let (user, addr, ssl): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        assert_ne!(user, "postgres", "replication streams as the superuser");
        assert!(ssl, "replication from {addr} is not over TLS");
        seen_addrs.insert(addr);
    }
    assert_eq!(
        seen_addrs, standby_addrs,
        "standbys stream from their own hosts"
    );
    drop(primary);

    // Both regions `sync`: the test promises that no acknowledged row is lost. (Under the
    // default `auto`, a loaded 2-core machine measures round trips over the 10 ms budget,
    // the standbys turn async, and an async failover may lose the last commits — allowed by
    // that policy, and recorded in the history.)
    {
        use meridian_node::policy::{RegionPolicy, SyncMode};
        let sync = RegionPolicy {
            mode: SyncMode::Sync,
            ..RegionPolicy::default()
        };
        c.set_region_policy(
            "w1",
            &["us-east", "us-west"],
            sync,
            "test: zero loss across hosts",
        )
        .await;
    }
    let rw = read_write_conninfo(&c);
    exec(&rw, "CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let writer = Writer::start(rw.clone());
    let probe = SplitBrainProbe::start(&c);
    writes_flow(&c, &writer, 20, FAILOVER, "the writer to start").await;

    // 1. kill -9 of the primary's agent and Postgres: failover, then the old one rejoins.
    let killed_at = Instant::now();
    c.member("a1").kill_postgres();
    c.kill("a1").unwrap();
    let s = wait_for("a new primary after the kill", FAILOVER, || async {
        let s = leader_status(&c, &["a2", "b1", "b2", "w1"]).await?;
        (s.primary != "a1" && !s.primary.is_empty() && s.generation >= 2).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    writes_flow(&c, &writer, 10, FAILOVER, "writes after the kill").await;
    eprintln!(
        "kill -9: {} promoted, writes again after {} ms",
        s.primary,
        killed_at.elapsed().as_millis()
    );
    let p1 = s.primary.clone();
    c.start("a1").unwrap();
    wait_streaming_from(&c, &p1, REJOIN).await;
    assert_eq!(writable(&c, "a1").await, Some(false));

    // 2. A planned switchover to a standby in the other region.
    let to = DATA
        .iter()
        .copied()
        .find(|m| *m != p1 && c.member(m).spec.region != c.member(&p1).spec.region)
        .unwrap();
    c.command(
        "w1",
        &Command::BeginSwitchover(PendingSwitchover {
            from: p1.clone(),
            to: to.to_string(),
            started_at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64,
            phase: SwitchoverPhase::Requested,
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    wait_streaming_from(&c, to, FAILOVER).await;
    writes_flow(&c, &writer, 10, FAILOVER, "writes after the switchover").await;
    eprintln!("switchover {p1} -> {to} done");

    // 3. The primary's host cut off by packet filters: it fences itself, the majority
    // promotes one of its members.
    let p2 = to.to_string();
    let gen_before = leader_status(&c, &ALL).await.unwrap().generation;
    let cut_at = Instant::now();
    assert_eq!(c.hosts().unwrap().isolate(&p2).unwrap(), 8);
    let majority: Vec<&str> = ALL.iter().copied().filter(|m| *m != p2).collect();
    let s = wait_for("a primary on the majority side", FAILOVER, || async {
        let s = leader_status(&c, &majority).await?;
        (s.primary != p2 && !s.primary.is_empty() && s.generation > gen_before).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let p3 = s.primary.clone();
    assert!(majority.contains(&p3.as_str()));
    // The cut-off primary's Postgres (still reachable from the test's namespace) no longer
    // takes writes.
    wait_until("the cut-off primary to fence itself", FAILOVER, || async {
        writable(&c, &p2).await != Some(true)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    writes_flow(&c, &writer, 10, FAILOVER, "writes after the partition").await;
    eprintln!(
        "{p2} cut off: {p3} promoted, writes again after {} ms",
        cut_at.elapsed().as_millis()
    );

    // 4. Heal: the old primary rejoins as a standby of the new one.
    c.hosts().unwrap().heal().unwrap();
    wait_streaming_from(&c, &p3, REJOIN).await;
    writes_flow(&c, &writer, 10, FAILOVER, "writes after the heal").await;

    let acked = writer.finish().await;
    let (max, worst) = probe.finish().await;
    assert!(max <= 1, "two writable servers at once: {worst:?}");
    let client = connect(&c.member(&p3).pg_conninfo()).await.unwrap();
    let rows = client.query("SELECT id FROM t", &[]).await.unwrap();
    let have: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|i| !have.contains(i))
        .collect();
    assert!(lost.is_empty(), "acknowledged rows lost: {lost:?}");
    assert!(acked.len() >= 60, "only {} rows acknowledged", acked.len());
    drop(client);

    drop(c);
    assert_hosts_removed(&namespaces);
}

/// The hosts' own addresses are what the members dial (a guard against a launcher that
/// falls back to loopback): every address-book entry in every config is a host address.
#[test]
fn configs_list_host_addresses() {
    if skip_unless_hosts().is_none() {
        return;
    }
    let c = AgentCluster::build_with(
        topology(),
        ClusterSetup {
            postgres: true,
            hosts: Hosts::Netns,
            ..ClusterSetup::default()
        },
    )
    .unwrap();
    let namespaces = host_resources(&c);
    for m in ALL {
        let text = std::fs::read_to_string(&c.member(m).config_path).unwrap();
        assert!(!text.contains("127.0.0.1"), "{m}'s config:\n{text}");
        for peer in ALL {
            let p = c.member(peer);
            let api = format!("api = \"{}\"", p.grpc);
            assert!(text.contains(&api), "{m} lacks {api}:\n{text}");
            if p.pg_port != 0 {
                let pg = format!("postgres = \"{}\"", SocketAddr::new(p.addr, p.pg_port));
                assert!(text.contains(&pg), "{m} lacks {pg}:\n{text}");
            }
        }
        if c.member(m).pg_port != 0 {
            let listen = format!("listen_addr = \"{}\"", c.member(m).addr);
            assert!(text.contains(&listen), "{m} lacks {listen}:\n{text}");
        }
    }
    drop(c);
    assert_hosts_removed(&namespaces);
}

/// Whether `member` is a Raft voter in `s`.
fn is_voter(s: &StatusResponse, member: &str) -> bool {
    s.members.iter().any(|m| m.name == member && m.voter)
}

/// The lease majority and membership versions: the primary a2, cut off from the Raft
/// leader but still renewing its lease with the witness w1, keeps counting over the three
/// members it knows of. One member added (w2) is safe: every majority of four shares a
/// voter with a2's two of three. A second (w3) would let the leader break a2's lease with
/// three of five (itself, w2, w3) while a2 still holds two of three, so the leader admits
/// it only once a2 reported counting over the current members: w3 stays a learner for as
/// long as the cut lasts, a2 stays the only writer, and after the heal w3 is admitted.
/// Without the rule w3 became a voter during the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_waits_until_the_primary_counts_over_the_current_members() {
    if skip_unless_hosts().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    const MEMBERS: [&str; 5] = ["a1", "a2", "w1", "w2", "w3"];
    let mut c = AgentCluster::build_with(
        vec![
            MemberSpec::data("a1", "us-east").bootstrap(),
            MemberSpec::data("a2", "us-west").join("a1"),
            MemberSpec::witness("w1", "eu-central").join("a1"),
            MemberSpec::witness("w2", "eu-west").join("a1"),
            MemberSpec::witness("w3", "ap-south").join("a1"),
        ],
        ClusterSetup {
            token: Some(TOKEN.into()),
            postgres: true,
            hosts: Hosts::Netns,
            ..ClusterSetup::default()
        },
    )
    .unwrap();
    let namespaces = host_resources(&c);
    c.start("a1").unwrap();
    wait_for("a1 primary of generation 1", FORM_PG, || async {
        let s = c.status().await.ok()?;
        (s.primary == "a1" && s.generation == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    c.start("a2").unwrap();
    c.start("w1").unwrap();
    let streaming = |s: &StatusResponse, standby: &str, from: &str| {
        s.members
            .iter()
            .find(|m| m.name == standby)
            .and_then(|m| m.observation.as_ref())
            .and_then(|o| o.postgres.as_ref())
            .is_some_and(|p| {
                p.up && p.in_recovery
                    && p.wal_receiver() == WalReceiverStatus::Streaming
                    && p.upstream == from
            })
    };
    wait_for("a2 streaming from a1, three voters", FORM_PG, || async {
        let s = leader_status(&c, &MEMBERS).await?;
        (streaming(&s, "a2", "a1") && ["a1", "a2", "w1"].iter().all(|m| is_voter(&s, m)))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // The bootstrap member leads Raft; make a2 the primary so the two differ.
    c.command(
        "a1",
        &Command::BeginSwitchover(PendingSwitchover {
            from: "a1".into(),
            to: "a2".into(),
            started_at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64,
            phase: SwitchoverPhase::Requested,
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    let s = wait_for("a2 primary, a1 streaming from it", FAILOVER, || async {
        let s = leader_status(&c, &MEMBERS).await?;
        (s.primary == "a2" && streaming(&s, "a1", "a2")).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let leader = s.leader.clone();
    let generation = s.generation;
    assert_ne!(
        leader, "a2",
        "the test needs the Raft leader apart from the primary"
    );

    // The primary cut off from the leader only: it renews with w1, the leader commits
    // with w1, and the primary's reports stop reaching the leader.
    assert_eq!(c.hosts().unwrap().cut("a2", &leader).unwrap(), 2);
    c.start("w2").unwrap();
    wait_for("w2 a voter", FAILOVER, || async {
        let s = leader_status(&c, &MEMBERS).await?;
        is_voter(&s, "w2").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    c.start("w3").unwrap();
    let watch_until = Instant::now() + Duration::from_secs(12);
    let mut rounds = 0;
    while Instant::now() < watch_until {
        rounds += 1;
        if let Some(s) = leader_status(&c, &MEMBERS).await {
            assert!(
                !is_voter(&s, "w3"),
                "w3 was admitted while the primary still counted over three members \
                 (round {rounds})\n{}",
                c.logs()
            );
            assert_eq!(
                (s.primary.as_str(), s.generation),
                ("a2", generation),
                "the primary changed during the cut\n{}",
                c.logs()
            );
        }
        assert_ne!(
            writable(&c, "a1").await,
            Some(true),
            "a1 became writable beside a2\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(writable(&c, "a2").await, Some(true), "a2 kept its lease");
    assert!(
        c.member("w3").log().contains("still counts its lease over"),
        "w3's log does not say what its admission waits for\n{}",
        c.logs()
    );

    c.hosts().unwrap().heal().unwrap();
    wait_for("w3 a voter after the heal", FAILOVER, || async {
        let s = leader_status(&c, &MEMBERS).await?;
        is_voter(&s, "w3").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    drop(c);
    assert_hosts_removed(&namespaces);
}
