//! End-to-end failover with real agents and real Postgres on 127.0.0.1: the agents create
//! their servers (bootstrap + clones), and the tests kill processes and check what
//! clients see. Data members a1, a2 in region a, b1 in region b, witness w1 in region c.
//! The tests run one at a time (a shared lock): each runs three Postgres servers and four
//! agents on a 2-core machine. Needs `cargo build -p meridian-node` first.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_node::raft::intent::Intent;
use meridian_node::raft::Command;
use meridian_proto::{StatusResponse, WalReceiverStatus};
use meridian_tests::agents::{AgentCluster, MemberSpec};
use meridian_tests::wait_for;
use tokio_postgres::NoTls;

/// Bound on bringing up the cluster (initdb, two clones, streaming).
const FORM: Duration = Duration::from_secs(90);
/// Bound on a failover or switchover, including the client reconnecting.
const FAILOVER: Duration = Duration::from_secs(45);
/// Bound on an old primary rejoining as a standby.
const REJOIN: Duration = Duration::from_secs(60);
/// Bound on one SQL step from the tests.
const SQL: Duration = Duration::from_secs(5);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DATA: [&str; 3] = ["a1", "a2", "b1"];
const TOKEN: &str = "failover-test-token";

/// One bounded HTTP/1.1 request; returns the status code and the body.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let out = tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .expect("HTTP answer in time");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (code, body)
}

fn intent(s: &StatusResponse) -> Intent {
    serde_json::from_str(&s.intent_json).expect("intent_json decodes")
}

/// Starts the four members and waits until a1 is the primary and a2, b1 stream from it.
async fn form() -> AgentCluster {
    let mut c = AgentCluster::with_postgres(
        vec![
            MemberSpec::data("a1", "a").bootstrap(),
            MemberSpec::data("a2", "a").join("a1"),
            MemberSpec::data("b1", "b").join("a1"),
            MemberSpec::witness("w1", "c").join("a1"),
        ],
        Some(TOKEN),
    )
    .unwrap();
    let started = Instant::now();
    c.start("a1").unwrap();
    wait_for("a1 primary of generation 1", FORM, || async {
        let s = c.status().await.ok()?;
        (s.primary == "a1" && s.generation == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    for m in ["a2", "b1", "w1"] {
        c.start(m).unwrap();
    }
    wait_streaming(&c, &["a2", "b1"], "a1", FORM).await;
    // The default policy makes the in-region standby synchronous: every test starts from
    // commits that a2 acknowledged (a crash of a1 alone is then a failover to a2, not a
    // restart in place).
    wait_for("a1 waiting on a2 for its commits", FORM, || async {
        let s = c.status().await.ok()?;
        let names = s
            .members
            .iter()
            .find(|m| m.name == "a1")?
            .observation
            .as_ref()?
            .postgres
            .as_ref()?
            .sync_standby_names
            .as_ref()?
            .names
            .clone();
        names.iter().any(|n| n == "a2").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!("cluster formed in {} ms", started.elapsed().as_millis());
    c
}

/// A formed cluster, its read-write connection string, and the table `t` the tests write.
async fn form_with_table() -> (AgentCluster, String) {
    let c = form().await;
    let rw = read_write_conninfo(&c);
    exec(&rw, "CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    (c, rw)
}

/// Waits until every one of `names` is a standby streaming from `primary` (as the leader
/// sees it), not fenced.
async fn wait_streaming(
    c: &AgentCluster,
    names: &[&str],
    primary: &str,
    within: Duration,
) -> StatusResponse {
    let what = format!("{names:?} streaming from {primary}");
    wait_for(&what, within, || async {
        let s = c.status().await.ok()?;
        if s.primary != primary {
            return None;
        }
        let ok = names.iter().all(|n| {
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
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()))
}

/// Waits until some data member is the primary and the other two stream from it; returns
/// the primary.
async fn settle(c: &AgentCluster, within: Duration) -> String {
    wait_for("one primary and two streaming standbys", within, || async {
        let s = c.status().await.ok()?;
        let primary = s.primary.clone();
        let ok = DATA.iter().filter(|n| **n != primary).all(|n| {
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
        (ok && DATA.contains(&primary.as_str())).then_some(primary)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()))
}

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

/// A libpq string over every data member that only accepts a writable server.
fn read_write_conninfo(c: &AgentCluster) -> String {
    let ports: Vec<String> = DATA
        .iter()
        .map(|n| c.member(n).pg_port.to_string())
        .collect();
    format!(
        "host=127.0.0.1,127.0.0.1,127.0.0.1 port={} user=postgres dbname=postgres \
         password={} connect_timeout=2 target_session_attrs=read-write",
        ports.join(","),
        meridian_tests::agents::SUPERUSER_PASSWORD
    )
}

async fn exec(conninfo: &str, sql: &str) -> Result<(), String> {
    let client = connect(conninfo).await?;
    tokio::time::timeout(SQL, client.batch_execute(sql))
        .await
        .map_err(|_| "statement timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// Every id in `t` on `member`'s Postgres.
async fn ids_on(c: &AgentCluster, member: &str) -> BTreeSet<i64> {
    let client = connect(&c.member(member).pg_conninfo())
        .await
        .unwrap_or_else(|e| panic!("connecting to {member}: {e}"));
    let rows = tokio::time::timeout(SQL, client.query("SELECT id FROM t", &[]))
        .await
        .expect("select in time")
        .expect("select");
    rows.iter().map(|r| r.get::<_, i64>(0)).collect()
}

/// Whether `member`'s Postgres answers and is out of recovery (None: it does not answer).
async fn writable(c: &AgentCluster, member: &str) -> Option<bool> {
    let mut info = c.member(member).pg_conninfo();
    info = info.replace("connect_timeout=2", "connect_timeout=1");
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

/// Polls every data member until stopped; records the most writable servers seen in one
/// round and which they were.
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
            .map(|n| (n.to_string(), c.member(n).pg_conninfo()))
            .collect();
        let (s, m, w) = (stop.clone(), max_writable.clone(), worst.clone());
        let task = tokio::spawn(async move {
            // Bounded: at most ~10 minutes of rounds.
            for _ in 0..6000 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let mut now_writable = Vec::new();
                for (name, info) in &infos {
                    let info = info.replace("connect_timeout=2", "connect_timeout=1");
                    let Ok(client) = connect(&info).await else {
                        continue;
                    };
                    let r = tokio::time::timeout(
                        Duration::from_secs(1),
                        client.query_one("SELECT NOT pg_is_in_recovery()", &[]),
                    )
                    .await;
                    if let Ok(Ok(row)) = r {
                        if row.get::<_, bool>(0) {
                            now_writable.push(name.clone());
                        }
                    }
                }
                if now_writable.len() > m.load(Ordering::SeqCst) {
                    m.store(now_writable.len(), Ordering::SeqCst);
                    *w.lock().unwrap() = now_writable;
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

/// Acknowledged inserts as (id, when).
type Acked = Arc<Mutex<Vec<(i64, Instant)>>>;

/// A writer inserting ids from `first` up through `rw`, one session, reconnecting on
/// error, until `stop` is set (bounded: at most 100k attempts).
fn spawn_writer(rw: &str, first: i64) -> (Arc<AtomicBool>, Acked, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let writer = {
        let (stop, acked, rw) = (stop.clone(), acked.clone(), rw.to_string());
        tokio::spawn(async move {
            let mut id = first;
            let mut client = None;
            for _ in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if client.is_none() {
                    client = connect(&rw).await.ok();
                    if client.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
                let cl = client.as_ref().unwrap();
                let r = tokio::time::timeout(
                    SQL,
                    cl.batch_execute(&format!("INSERT INTO t VALUES ({id})")),
                )
                .await;
                match r {
                    Ok(Ok(())) => acked.lock().unwrap().push((id, Instant::now())),
                    _ => client = None,
                }
                id += 1;
            }
        })
    };
    (stop, acked, writer)
}

/// Inserts `ids` one by one through the read-write connection string; returns the ids
/// whose commit was acknowledged. Gives up on an id after `within`.
async fn insert_until_ok(conninfo: &str, id: i64, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        match exec(conninfo, &format!("INSERT INTO t VALUES ({id})")).await {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "insert {id} not acknowledged within {within:?}: {last}"
    ))
}

/// (a) + (d): kill -9 of the primary's agent and Postgres; with the in-region standby in
/// the sync set every acknowledged commit survives; a client with
/// `target_session_attrs=read-write` writes again; the killed member rejoins as a standby
/// on the new timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_promotes_a_standby_without_losing_acknowledged_commits() {
    let _serial = SERIAL.lock().await;
    let (mut c, rw) = form_with_table().await;
    // Default policy: auto regions with a 10 ms budget; on 127.0.0.1 every standby fits,
    // so the sync set grows to ANY 1 (a2, b1).
    wait_for("a2 in the recorded sync set", FORM, || async {
        let s = c.status().await.ok()?;
        let i = intent(&s);
        let applied = i
            .sync_target
            .as_ref()
            .is_some_and(|t| t.set.names.contains("a2"));
        (i.sync_set.names.contains("a2") && applied).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // Every acknowledged commit waited for a sync standby.
    let mut acked = BTreeSet::new();
    for id in 0..200 {
        exec(&rw, &format!("INSERT INTO t VALUES ({id})"))
            .await
            .unwrap_or_else(|e| panic!("insert {id}: {e}"));
        acked.insert(id);
    }
    let probe = SplitBrainProbe::start(&c);
    let killed_at = Instant::now();
    c.member("a1").kill_postgres();
    c.kill("a1").unwrap();
    let took = insert_until_ok(&rw, 1000, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!(
        "FAILOVER (kill -9 of primary agent + postgres): writes accepted again after {} ms",
        killed_at.elapsed().as_millis()
    );
    let _ = took;
    let s = c.status().await.unwrap();
    assert_eq!(s.generation, 2, "{s:?}");
    assert_eq!(s.primary, "a2", "same-region standby preferred: {s:?}");
    let i = intent(&s);
    let last = i.history.last().unwrap();
    assert_eq!(last.old_primary.as_deref(), Some("a1"));
    assert_eq!(last.new_primary.as_deref(), Some("a2"));
    let on_new = ids_on(&c, "a2").await;
    let lost: Vec<_> = acked.difference(&on_new).collect();
    assert!(lost.is_empty(), "acknowledged commits lost: {lost:?}");

    // The old primary comes back and rejoins the new timeline as a standby.
    c.start("a1").unwrap();
    let s = wait_streaming(&c, &["a1", "b1"], "a2", REJOIN).await;
    let timeline = |n: &str| {
        s.members
            .iter()
            .find(|m| m.name == n)
            .and_then(|m| m.observation.as_ref())
            .and_then(|o| o.postgres.as_ref())
            .map(|p| p.timeline)
    };
    assert_eq!(timeline("a1"), timeline("a2"), "{s:?}");
    assert!(timeline("a2").unwrap() >= 2);
    assert_eq!(writable(&c, "a1").await, Some(false));

    // A frozen primary Postgres (SIGSTOP of the postmaster): its agent fences it (kills
    // the frozen group) and another member takes over.
    let frozen_pid = c
        .member("a2")
        .postmaster_pid()
        .expect("a2's postmaster pid");
    let frozen_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(frozen_pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    insert_until_ok(&rw, 2000, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!(
        "FAILOVER (SIGSTOP of the primary's postmaster): writes accepted again after {} ms",
        frozen_at.elapsed().as_millis()
    );
    let s = c.status().await.unwrap();
    assert_eq!(s.generation, 3, "{s:?}");
    assert_ne!(s.primary, "a2");
    let (max, worst) = probe.finish().await;
    assert!(max <= 1, "two writable primaries at once: {worst:?}");
}

/// (b): only the primary's Postgres crashes: its agent fences it and the leader promotes
/// at once; never two writable servers; the crashed member rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_postgres_fails_over_with_one_writer_at_a_time() {
    let _serial = SERIAL.lock().await;
    let (c, rw) = form_with_table().await;
    let probe = SplitBrainProbe::start(&c);
    let killed_at = Instant::now();
    c.member("a1").kill_postgres();
    insert_until_ok(&rw, 1, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!(
        "FAILOVER (primary postgres crash, agent alive): writes accepted again after {} ms",
        killed_at.elapsed().as_millis()
    );
    let s = c.status().await.unwrap();
    assert_eq!(s.generation, 2, "{s:?}");
    assert_ne!(s.primary, "a1");
    let new = s.primary.clone();
    let others: Vec<&str> = DATA.iter().copied().filter(|n| *n != new).collect();
    wait_streaming(&c, &others, &new, REJOIN).await;

    // `meridianctl reinit a1`: a1 re-clones from the primary and streams again.
    c.command("w1", &Command::Reinit { name: "a1".into() })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.logs()));
    wait_for("a1 re-cloned", REJOIN, || async {
        let s = c.status().await.ok()?;
        intent(&s).reinit.is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    wait_streaming(&c, &others, &new, REJOIN).await;

    // Maintenance mode: a crash of the primary's Postgres is fenced but not failed over;
    // an operator failover (HTTP) to the remaining standby brings writes back.
    let w1 = c.member("w1").http;
    let (code, body) = http(w1, "POST", "/pause", Some(TOKEN), "").await;
    assert_eq!(code, 200, "{body}");
    wait_for("maintenance on", FAILOVER, || async {
        c.status().await.ok()?.paused.then_some(())
    })
    .await
    .unwrap();
    c.member(&new).kill_postgres();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = c.status().await.unwrap();
    assert_eq!(
        (s.primary.as_str(), s.generation),
        (new.as_str(), 2),
        "no automatic failover while paused"
    );
    let candidate = if new == "a2" { "a1" } else { "a2" };
    let body = format!(r#"{{"candidate":"{candidate}"}}"#);
    let (code, answer) = http(w1, "POST", "/failover", Some(TOKEN), &body).await;
    assert_eq!(code, 200, "{answer}\n{}", c.logs());
    insert_until_ok(&rw, 2, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let s = c.status().await.unwrap();
    assert_eq!((s.primary.as_str(), s.generation), (candidate, 3));
    let (code, _) = http(w1, "POST", "/resume", Some(TOKEN), "").await;
    assert_eq!(code, 200);
    let (max, worst) = probe.finish().await;
    assert!(max <= 1, "two writable primaries at once: {worst:?}");
}

/// (c): a switchover while a client inserts continuously: every acknowledged row is there
/// afterwards, and the old primary streams from the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_under_writes_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (c, rw) = form_with_table().await;
    let (stop, acked, writer) = spawn_writer(&rw, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let w1 = c.member("w1").http;
    // A wrong token is refused; an unsafe operator failover (healthy primary) too.
    let (code, _) = http(
        w1,
        "POST",
        "/switchover",
        Some("wrong"),
        r#"{"candidate":"a2"}"#,
    )
    .await;
    assert_eq!(code, 401);
    let (code, body) = http(
        w1,
        "POST",
        "/failover",
        Some(TOKEN),
        r#"{"candidate":"b1"}"#,
    )
    .await;
    assert_eq!(code, 409, "{body}");
    let asked_at = Instant::now();
    let (code, body) = http(
        w1,
        "POST",
        "/switchover",
        Some(TOKEN),
        r#"{"leader":"a1","candidate":"a2"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}\n{}", c.logs());
    wait_for("a2 primary of generation 2", FAILOVER, || async {
        let s = c.status().await.ok()?;
        (s.primary == "a2" && s.generation == 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!(
        "SWITCHOVER committed {} ms after it was asked for",
        asked_at.elapsed().as_millis()
    );
    // Writes resume on a2.
    let n_before = acked.lock().unwrap().len();
    wait_for("writes on the new primary", FAILOVER, || async {
        (acked.lock().unwrap().len() > n_before + 20).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // The new primary keeps its generation for several lease periods: it must not fence
    // itself while the old primary's lease runs out (that cascaded into more promotions).
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok(s) = c.status().await {
            assert_eq!(
                (s.primary.as_str(), s.generation),
                ("a2", 2),
                "the switchover's new primary was replaced\n{}",
                c.logs()
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(15), writer)
        .await
        .expect("writer stops")
        .unwrap();
    let acked = acked.lock().unwrap().clone();
    let pause = acked
        .windows(2)
        .map(|w| w[1].1.duration_since(w[0].1))
        .max()
        .unwrap_or_default();
    eprintln!(
        "SWITCHOVER longest pause between acknowledged writes: {} ms ({} rows)",
        pause.as_millis(),
        acked.len()
    );
    let present = ids_on(&c, "a2").await;
    let lost: Vec<i64> = acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged rows lost: {lost:?}");
    let s = wait_streaming(&c, &["a1", "b1"], "a2", REJOIN).await;
    let i = intent(&s);
    let last = i.history.last().unwrap();
    assert_eq!(
        last.kind,
        meridian_node::raft::intent::HistoryKind::Switchover
    );
    assert!(last.new_primary_lsn.is_some(), "{last:?}");
    // /primary moved with the primary.
    wait_for("/primary 200 on a2 only", FAILOVER, || async {
        let mut ok = true;
        for n in DATA {
            let (code, _) = http(c.member(n).http, "GET", "/primary", None, "").await;
            ok &= (code == 200) == (n == "a2");
        }
        ok.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    // A frozen agent (SIGSTOP) of the primary: fencing is absolute, so its watchdog
    // process fences its Postgres at the lease deadline (whoever still probes it), the
    // cluster fails over, every write a2 acknowledged survives, and there is never a
    // second writer.
    let probe = SplitBrainProbe::start(&c);
    let agent = nix::unistd::Pid::from_raw(c.member("a2").pid().unwrap() as i32);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let a2_pg = c.member("a2").pg_conninfo();
    let mut frozen_acked = Vec::new();
    let mut fenced = false;
    for i in 0..200 {
        if exec(&a2_pg, &format!("INSERT INTO t VALUES ({})", 2_000_000 + i))
            .await
            .is_err()
        {
            fenced = true;
            break;
        }
        frozen_acked.push(2_000_000 + i);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replaced = wait_for("a primary other than the frozen a2", FAILOVER, || async {
        let s = c.status().await.ok()?;
        (s.primary != "a2" && !s.primary.is_empty() && s.generation > 2).then(|| s.primary.clone())
    })
    .await;
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        fenced,
        "a2's Postgres took writes for 10 s with its agent frozen\n{}",
        c.logs()
    );
    let replaced = replaced.unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    insert_until_ok(&rw, 3_000_000, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let present = ids_on(&c, &replaced).await;
    let lost: Vec<i64> = frozen_acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged rows lost after the freeze: {lost:?}"
    );
    // The thawed agent may disrupt the Raft group (a new election); whatever happens
    // next, the cluster settles with one primary and two streaming standbys.
    let settled = settle(&c, REJOIN).await;
    eprintln!("settled with {settled} as the primary");
    let (max, worst) = probe.finish().await;
    assert!(max <= 1, "two writable primaries at once: {worst:?}");
}

/// Only the primary's Postgres crashes while no member may replace it (both data regions
/// fail over manually): instead of staying without a primary, the leader resumes the same
/// primary in place, in a new generation, and writes come back on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_without_a_candidate_is_resumed_in_place() {
    use meridian_node::policy::{FailoverMode, RegionPolicy};
    let _serial = SERIAL.lock().await;
    let (c, rw) = form_with_table().await;
    let manual = RegionPolicy {
        failover: FailoverMode::Manual,
        ..RegionPolicy::default()
    };
    c.set_region_policy(
        "w1",
        &["a", "b"],
        manual,
        "test: manual failover everywhere",
    )
    .await;
    exec(&rw, "INSERT INTO t VALUES (1)").await.unwrap();
    let probe = SplitBrainProbe::start(&c);
    let killed_at = Instant::now();
    c.member("a1").kill_postgres();
    insert_until_ok(&rw, 2, FAILOVER)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!(
        "RESUME (primary postgres crash, no candidate): writes accepted again after {} ms",
        killed_at.elapsed().as_millis()
    );
    let s = c.status().await.unwrap();
    assert_eq!((s.primary.as_str(), s.generation), ("a1", 2), "{s:?}");
    assert_eq!(intent(&s).resumed.map(|g| g.0), Some(2));
    assert_eq!(ids_on(&c, "a1").await, BTreeSet::from([1, 2]));
    wait_streaming(&c, &["a2", "b1"], "a1", REJOIN).await;
    let (max, worst) = probe.finish().await;
    assert!(max <= 1, "two writable primaries at once: {worst:?}");
}

/// Stopping the primary's agent on purpose (SIGTERM, as `systemctl stop` does) hands the
/// primary over first: a switchover to the in-region standby, no acknowledged write lost,
/// /primary answers on the new primary, and the stopped member's Postgres is down (not a
/// writable server nobody routes to). Restarted, it rejoins as a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_primarys_agent_hands_over_before_it_stops() {
    let _serial = SERIAL.lock().await;
    let (mut c, rw) = form_with_table().await;
    let probe = SplitBrainProbe::start(&c);
    let (stop, acked, writer) = spawn_writer(&rw, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a1_pg = c
        .member("a1")
        .postmaster_pid()
        .expect("a1's postmaster runs");
    let stopped_at = Instant::now();
    let status = c.stop("a1").unwrap();
    assert!(
        status.success(),
        "a1's agent exited with {status} on SIGTERM\n{}",
        c.logs()
    );
    eprintln!(
        "GRACEFUL STOP of the primary's agent took {} ms",
        stopped_at.elapsed().as_millis()
    );
    let s = c.status().await.unwrap();
    assert_eq!(
        (s.primary.as_str(), s.generation),
        ("a2", 2),
        "the stopped primary handed over to a2\n{}",
        c.logs()
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{a1_pg}")).exists()
            || std::fs::read_to_string(format!("/proc/{a1_pg}/stat"))
                .is_ok_and(|st| st.contains(") Z ")),
        "a1's Postgres still runs after its agent stopped"
    );
    let n_before = acked.lock().unwrap().len();
    wait_for("writes on the new primary", FAILOVER, || async {
        (acked.lock().unwrap().len() > n_before + 20).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(15), writer)
        .await
        .expect("writer stops")
        .unwrap();
    let history = intent(&s);
    assert_eq!(
        history.history.last().map(|h| h.kind),
        Some(meridian_node::raft::intent::HistoryKind::Switchover),
        "the hand-over was a switchover"
    );
    let present = ids_on(&c, "a2").await;
    let lost: Vec<i64> = acked
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged rows lost: {lost:?}");
    c.start("a1").unwrap();
    wait_streaming(&c, &["a1", "b1"], "a2", REJOIN).await;
    let (max, worst) = probe.finish().await;
    assert!(max <= 1, "two writable primaries at once: {worst:?}");
}

/// Issue 12's wedge: the primary's agent and Postgres are killed where nobody may replace
/// it (failover manual everywhere). The leader has a majority break the lost primary's
/// lease, and no promotion follows. When the agent comes back, the break must not stand
/// for ever (the agent would wait for a lease it can never get while the leader waits for
/// a fence it never reports): the cluster releases the breaks no promotion followed, the
/// agent renews, and its Postgres takes writes again with every acknowledged row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_primary_with_no_candidate_takes_writes_again_when_its_agent_returns() {
    use meridian_node::policy::{FailoverMode, RegionPolicy};
    let _serial = SERIAL.lock().await;
    let (mut c, rw) = form_with_table().await;
    let manual = RegionPolicy {
        failover: FailoverMode::Manual,
        ..RegionPolicy::default()
    };
    c.set_region_policy(
        "w1",
        &["a", "b"],
        manual,
        "test: manual failover everywhere",
    )
    .await;
    let mut acked = BTreeSet::new();
    for id in 0..50 {
        exec(&rw, &format!("INSERT INTO t VALUES ({id})"))
            .await
            .unwrap_or_else(|e| panic!("insert {id}: {e}"));
        acked.insert(id);
    }
    let probe = SplitBrainProbe::start(&c);
    c.member("a1").kill_postgres();
    c.kill("a1").unwrap();
    // Long enough for the grants to run out (lease 2 s) and a majority to break it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = c.status().await.unwrap();
    assert_eq!(
        (s.primary.as_str(), s.generation),
        ("a1", 1),
        "nobody may be promoted: {s:?}"
    );
    let back_at = Instant::now();
    c.start("a1").unwrap();
    insert_until_ok(&rw, 1000, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!(
        "RETURN (primary agent and postgres killed, no candidate): writes again {} ms after the agent restarted",
        back_at.elapsed().as_millis()
    );
    acked.insert(1000);
    let s = c.status().await.unwrap();
    assert_eq!(s.primary, "a1", "{s:?}");
    let present = ids_on(&c, "a1").await;
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(lost.is_empty(), "acknowledged rows lost: {lost:?}");
    let (max, worst) = probe.finish().await;
    assert!(max <= 1, "two writable primaries at once: {worst:?}");
}

/// Every process of `member`'s "host": its agent and the agent's children (the watchdog),
/// and its postmaster and the postmaster's children (backends, walsenders, ...).
fn host_pids(c: &AgentCluster, member: &str) -> (Vec<i32>, Vec<i32>) {
    use meridian_chaos::cluster::children_of as children;
    let agent = c.member(member).pid().expect("agent running") as i32;
    let mut agents = vec![agent];
    agents.extend(children(agent));
    let postmaster = c
        .member(member)
        .postmaster_pid()
        .expect("postmaster running");
    let mut pg = vec![postmaster];
    pg.extend(children(postmaster));
    (agents, pg)
}

fn signal_all(pids: &[i32], sig: nix::sys::signal::Signal) {
    for p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), sig);
    }
}

/// #12: every process of the primary's host frozen (SIGSTOP, as a VM pause does) past
/// its lease under an all-async policy, then its Postgres thawed before its agent (the
/// worst order a scheduler can pick). No standby gates its commits, so before the lease
/// gate the thawed backends acknowledged what their clients sent at once — a second
/// writer beside the new primary. Now every commit waits for the gate, which confirms
/// only under a valid lease: the thawed primary acknowledges nothing, is fenced, and
/// rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_frozen_with_its_host_acknowledges_nothing_after_the_thaw() {
    use meridian_node::policy::{RegionPolicy, SyncMode};
    use nix::sys::signal::Signal;
    let _serial = SERIAL.lock().await;
    let (c, rw) = form_with_table().await;
    let asynchronous = RegionPolicy {
        mode: SyncMode::Async,
        ..RegionPolicy::default()
    };
    c.set_region_policy("w1", &["a", "b"], asynchronous, "test: every region async")
        .await;
    let a1 = c.member("a1").pg_conninfo();
    wait_for(
        "a1's commits wait on its lease gate only",
        FAILOVER,
        || async {
            let client = connect(&a1).await.ok()?;
            let row = client
                .query_one("SHOW synchronous_standby_names", &[])
                .await
                .ok()?;
            (row.get::<_, String>(0) == "meridian_lease_gate").then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // The gate confirms under the lease: commits go through.
    insert_until_ok(&rw, 1, SQL)
        .await
        .unwrap_or_else(|e| panic!("a gated commit under a valid lease: {e}\n{}", c.logs()));
    let old = connect(&a1).await.unwrap();
    tokio::time::timeout(SQL, old.batch_execute("INSERT INTO t VALUES (2)"))
        .await
        .expect("a commit on a1 in time")
        .expect("a commit on a1");

    let (agent_pids, pg_pids) = host_pids(&c, "a1");
    signal_all(&agent_pids, Signal::SIGSTOP);
    signal_all(&pg_pids, Signal::SIGSTOP);
    let frozen_at = Instant::now();
    let others: Vec<String> = ["a2", "b1"]
        .iter()
        .map(|n| c.member(n).pg_port.to_string())
        .collect();
    let rw_others = format!(
        "host=127.0.0.1,127.0.0.1 port={} user=postgres dbname=postgres password={} \
         connect_timeout=2 target_session_attrs=read-write",
        others.join(","),
        meridian_tests::agents::SUPERUSER_PASSWORD
    );
    let took_over = insert_until_ok(&rw_others, 3, FAILOVER).await;
    if let Err(e) = took_over {
        signal_all(&pg_pids, Signal::SIGCONT);
        signal_all(&agent_pids, Signal::SIGCONT);
        panic!(
            "no new primary while a1's host is frozen: {e}\n{}",
            c.logs()
        );
    }
    eprintln!(
        "HOST FREEZE (async): the new primary acknowledged its first write {} ms after the freeze",
        frozen_at.elapsed().as_millis()
    );
    // A client of the old primary sends a commit; its backend is still frozen.
    let pending = tokio::spawn(async move {
        tokio::time::timeout(
            Duration::from_secs(20),
            old.batch_execute("INSERT INTO t VALUES (4)"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Postgres first, the agent 500 ms later.
    signal_all(&pg_pids, Signal::SIGCONT);
    let thawed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = pending.is_finished();
    signal_all(&agent_pids, Signal::SIGCONT);
    let outcome = pending.await.expect("the client task");
    eprintln!(
        "HOST FREEZE (async): the thawed primary's commit ended {} ms after its Postgres thawed (before its agent thawed: {early})",
        thawed_at.elapsed().as_millis()
    );
    if let Ok(Ok(())) = outcome {
        panic!(
            "the thawed old primary acknowledged a commit after the new primary took writes \
             (within 500 ms of the thaw: {early})\n{}",
            c.logs()
        );
    }
    eprintln!(
        "HOST FREEZE (async): the thawed primary's commit ended without acknowledgement: {}",
        match outcome {
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => "still waiting after 20 s".into(),
            Ok(Ok(())) => unreachable!(),
        }
    );
    wait_for("a1 fenced or a standby", FAILOVER, || async {
        (writable(&c, "a1").await != Some(true)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let primary = settle(&c, REJOIN).await;
    let present = ids_on(&c, &primary).await;
    assert!(present.contains(&3), "the new primary's write is there");
    assert!(
        !present.contains(&4),
        "the commit sent to the thawed old primary reached the new timeline"
    );
}

/// #12 defect 8: in a 3-member cluster with one member down, a member added to the
/// intent (its agent not started yet) must not grow the lease majority before it can
/// grant: the primary keeps renewing with the two members that run and stays writable in
/// the same generation. Before the fix the majority became 3 of 4 and the primary fenced
/// itself within `fence_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_member_while_one_is_down_keeps_the_primarys_lease() {
    let _serial = SERIAL.lock().await;
    let mut c = AgentCluster::with_postgres(
        vec![
            MemberSpec::data("a1", "a").bootstrap(),
            MemberSpec::data("a2", "a").join("a1"),
            MemberSpec::witness("w1", "c").join("a1"),
        ],
        Some(TOKEN),
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
    wait_streaming(&c, &["a2"], "a1", FORM).await;
    c.kill("a2").unwrap();
    c.member("a2").kill_postgres();
    // What a joiner's first step does (`Admin.AddMember`); its agent never starts here.
    // a2 may have been the Raft leader: retried (bounded) until another leads.
    wait_for("b9 added through a1", FAILOVER, || async {
        let mut admin = c.admin("a1").await.ok()?;
        let r = tokio::time::timeout(
            SQL,
            admin.add_member(meridian_proto::AddMemberRequest {
                name: "b9".into(),
                region: "b".into(),
                kind: "data".into(),
                tags: Default::default(),
                cluster: c.cluster.clone(),
                token: TOKEN.into(),
            }),
        )
        .await
        .ok()?;
        match r {
            Ok(_) => Some(()),
            Err(e) => {
                eprintln!("AddMember b9: {}", e.message());
                tokio::time::sleep(Duration::from_millis(300)).await;
                None
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // Four fence periods (lease_ttl 2 s, fence_after 1.5 s in the test config).
    let watch_until = Instant::now() + Duration::from_secs(8);
    let mut rounds = 0;
    while Instant::now() < watch_until {
        rounds += 1;
        assert_eq!(
            writable(&c, "a1").await,
            Some(true),
            "a1 stopped being a writable primary after b9 was added (round {rounds})\n{}",
            c.logs()
        );
        if let Ok(s) = c.status().await {
            assert_eq!(
                (s.primary.as_str(), s.generation),
                ("a1", 1),
                "the primary changed after b9 was added\n{}",
                c.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        !c.member("a1").log().contains("fencing the local Postgres"),
        "a1 fenced itself\n{}",
        c.logs()
    );
}

/// The postmaster's startup process (recovery) of `member`.
fn startup_process(c: &AgentCluster, member: &str) -> Option<i32> {
    use meridian_chaos::cluster::children_of as children;
    let postmaster = c.member(member).postmaster_pid()?;
    children(postmaster).into_iter().find(|p| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("startup"))
    })
}

/// #12, defect 2: a promotion that never completes is given up, not waited on forever.
/// a2's recovery is frozen (its startup process SIGSTOPped), so `pg_promote` cannot
/// finish when the leader picks a2 after a1's Postgres crashes (b1's region is
/// `failover = manual`, so nobody else qualifies). Before, a2 stayed in recovery for good
/// and the leader waited for a fence nobody carried out: no primary, ever. Now a2's agent
/// fences its own Postgres once `promote_timeout` (20 s here) passed, the leader resumes
/// a2 in place in a new generation, and every acknowledged row is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_that_never_completes_is_given_up_and_retried() {
    use meridian_node::policy::{FailoverMode, RegionPolicy};
    use nix::sys::signal::Signal;
    let _serial = SERIAL.lock().await;
    let (c, rw) = form_with_table().await;
    let manual = RegionPolicy {
        failover: FailoverMode::Manual,
        ..RegionPolicy::default()
    };
    c.set_region_policy("w1", &["b"], manual, "test: only a2 may be promoted")
        .await;
    for id in 1..=3 {
        exec(&rw, &format!("INSERT INTO t VALUES ({id})"))
            .await
            .unwrap();
    }
    let startup = startup_process(&c, "a2").expect("a2 runs a startup process");
    // Whatever the outcome, the stopped process is continued before the cluster goes
    // (a SIGSTOPped child outlives its postmaster's shutdown otherwise).
    struct Continue(i32);
    impl Drop for Continue {
        fn drop(&mut self) {
            signal_all(&[self.0], nix::sys::signal::Signal::SIGCONT);
        }
    }
    let _continue = Continue(startup);
    signal_all(&[startup], Signal::SIGSTOP);
    let probe = SplitBrainProbe::start(&c);
    let killed_at = Instant::now();
    c.member("a1").kill_postgres();
    wait_for("a2 named primary of generation 2", FAILOVER, || async {
        let s = c.status().await.ok()?;
        (s.primary == "a2" && s.generation == 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // 20 s of promote_timeout, then the fence, the resume and its crash recovery.
    insert_until_ok(&rw, 4, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!(
        "STUCK PROMOTION: writes accepted again after {} ms",
        killed_at.elapsed().as_millis()
    );
    let s = c.status().await.unwrap();
    assert_eq!(s.primary, "a2", "{s:?}");
    assert!(
        s.generation >= 3,
        "a new generation after the give-up: {s:?}"
    );
    assert_eq!(ids_on(&c, "a2").await, BTreeSet::from([1, 2, 3, 4]));
    let (max, worst) = probe.finish().await;
    assert!(max <= 1, "two writable primaries at once: {worst:?}");
}
