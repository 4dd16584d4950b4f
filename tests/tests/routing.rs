//! Honest routing and idle cost with real agents and real Postgres on 127.0.0.1: data
//! members a1 (bootstrap, primary), a2 in region a and b1 in region b.
//!
//! - A standby whose WAL receiver is frozen (SIGSTOP: `pg_stat_wal_receiver` still says
//!   `streaming`, nothing arrives) while the primary writes: `/replica?lag=1MB` on it turns
//!   503 within the bound, because its lag is measured against the primary's current
//!   position; it answers 200 again once it caught up. `/cluster` names the primary
//!   `leader` and shows the lag.
//! - A standby whose WAL receiver stopped (`primary_conninfo = ''`): `/replica` 503.
//! - A healthy idle cluster opens no new Postgres session (`pg_stat_database.sessions`).
//!
//! The tests run one at a time (a shared lock). Needs `cargo build -p meridian-node` first.

use std::time::{Duration, Instant};

use meridian_proto::{StatusResponse, WalReceiverStatus};
use meridian_tests::agents::{AgentCluster, MemberSpec};
use meridian_tests::wait_for;
use tokio_postgres::NoTls;

/// Bound on bringing up the cluster (initdb, two clones, streaming).
const FORM: Duration = Duration::from_secs(90);
/// Bound on one SQL step from the tests.
const SQL: Duration = Duration::from_secs(10);
/// The fixture's timing: observe every 200 ms, probes bounded by 500 ms, so the primary's
/// position a standby measures against is at most 2 × 200 + 500 ms old
/// (`peers::primary_position_max_age`). A lag appears within about that; the assertion
/// leaves room for a loaded 2-core machine.
const LAG_SEEN_WITHIN: Duration = Duration::from_secs(3);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DATA: [&str; 3] = ["a1", "a2", "b1"];

/// One bounded HTTP/1.1 GET; the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (code, body)
}

async fn connect(conninfo: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio::time::timeout(SQL, tokio_postgres::connect(conninfo, NoTls))
        .await
        .expect("connect in time")
        .expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Starts a1, a2, b1 and waits until a1 is the primary and both others stream from it.
async fn form() -> AgentCluster {
    let mut c = AgentCluster::with_postgres(
        vec![
            MemberSpec::data("a1", "a").bootstrap(),
            MemberSpec::data("a2", "a").join("a1"),
            MemberSpec::data("b1", "b").join("a1"),
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
    c.start("b1").unwrap();
    wait_for("a2 and b1 streaming from a1", FORM, || async {
        let s: StatusResponse = c.status().await.ok()?;
        let ok = ["a2", "b1"].iter().all(|n| {
            s.members
                .iter()
                .find(|m| m.name == *n)
                .and_then(|m| m.observation.as_ref())
                .and_then(|o| o.postgres.as_ref())
                .is_some_and(|p| {
                    p.up && p.in_recovery
                        && p.wal_receiver() == WalReceiverStatus::Streaming
                        && p.upstream == "a1"
                })
        });
        ok.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    c
}

/// Waits until `path` on `member`'s HTTP API answers `code`; how long that took.
async fn wait_code(
    c: &AgentCluster,
    member: &str,
    path: &str,
    code: u16,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let addr = c.member(member).http;
    let what = format!("{path} on {member} answering {code}");
    let r = wait_for(&what, within, || async {
        (get(addr, path).await.0 == code).then_some(())
    })
    .await;
    let took = started.elapsed();
    if let Err(e) = r {
        let last = get(addr, path).await;
        panic!("{e}: last answer {last:?}\n{}", c.logs());
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_lag_is_measured_against_the_primary() {
    let _serial = SERIAL.lock().await;
    let c = form().await;
    // Healthy: both standbys are replicas within 1 MB.
    for m in ["a2", "b1"] {
        wait_code(&c, m, "/replica?lag=1MB", 200, Duration::from_secs(10)).await;
    }
    assert_eq!(get(c.member("a1").http, "/replica").await.0, 503);

    // Patroni's status document, as check_patroni and Patroni's tooling read it: 200 on
    // every member, with `patroni.{name,scope,version}` and the WAL positions.
    for (m, role) in [("a1", "primary"), ("a2", "replica"), ("b1", "replica")] {
        // The primary's walsender list is as old as its last round: wait for both rows.
        let http = c.member(m).http;
        let (code, body) = wait_for(
            &format!("{m}'s /patroni"),
            Duration::from_secs(5),
            || async {
                let (code, body) = get(http, "/patroni").await;
                let rows = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["replication"].as_array().map(Vec::len))
                    .unwrap_or(0);
                (code != 200 || role != "primary" || rows >= 2).then_some((code, body))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        assert_eq!(code, 200, "{m} /patroni: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("/patroni is JSON");
        assert_eq!(v["patroni"]["name"], m, "{body}");
        assert_eq!(v["patroni"]["scope"], "test-cluster", "{body}");
        assert!(v["patroni"]["version"].is_string(), "{body}");
        assert_eq!(v["role"], role, "{body}");
        assert_eq!(v["state"], "running", "{body}");
        assert!(
            v["server_version"].as_u64().is_some_and(|n| n >= 150000),
            "{body}"
        );
        assert!(v["database_system_identifier"].is_string(), "{body}");
        assert!(v["postmaster_start_time"].is_string(), "{body}");
        if role == "primary" {
            assert!(
                v["xlog"]["location"].as_u64().is_some_and(|l| l > 0),
                "{body}"
            );
            let names: Vec<&str> = v["replication"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .filter_map(|x| x["application_name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            assert!(names.contains(&"a2") && names.contains(&"b1"), "{body}");
        } else {
            assert!(
                v["xlog"]["replayed_location"]
                    .as_u64()
                    .is_some_and(|l| l > 0),
                "{body}"
            );
        }
    }

    let (code, body) = get(c.member("a2").http, "/config").await;
    assert_eq!(code, 200, "/config: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/config is JSON");
    assert!(v["synchronous_node_count"].as_u64().is_some(), "{body}");
    assert!(v["policy_version"].as_u64().is_some(), "{body}");

    // Freeze b1's WAL receiver: its row still says streaming, nothing arrives.
    let b1 = connect(&c.member("b1").pg_conninfo()).await;
    let pid: i32 = b1
        .query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
        .await
        .expect("b1 has a WAL receiver")
        .get(0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP the WAL receiver");
    let a1 = connect(&c.member("a1").pg_conninfo()).await;
    tokio::time::timeout(
        SQL,
        a1.batch_execute(
            "CREATE TABLE big AS SELECT g, repeat('x', 100) AS pad \
             FROM generate_series(1, 40000) g",
        ),
    )
    .await
    .expect("the write commits in time (a2 acknowledges)")
    .expect("write on the primary");
    let took = wait_code(&c, "b1", "/replica?lag=1MB", 503, LAG_SEEN_WITHIN).await;
    eprintln!(
        "b1's /replica?lag=1MB turned 503 {} ms after the write committed",
        took.as_millis()
    );
    let (code, body) = get(c.member("b1").http, "/replica?lag=1MB").await;
    assert_eq!(code, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    let lag = health["replication_lag_bytes"]
        .as_u64()
        .expect("a known lag");
    assert!(lag > 1 << 20, "{body}");
    // Without a bound it is still a streaming replica; a2 is within 1 MB.
    assert_eq!(get(c.member("b1").http, "/replica").await.0, 200);
    wait_code(&c, "a2", "/replica?lag=1MB", 200, Duration::from_secs(5)).await;

    // /cluster in Patroni's shape, from a standby's point of view (a2 probes a1 and b1
    // itself: wait until its probe of a1 is past the write).
    let a2_http = c.member("a2").http;
    let lag_of_b1 = |v: &serde_json::Value| {
        v["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == "b1"))
            .and_then(|m| m["lag"].as_u64())
    };
    let v: serde_json::Value = wait_for(
        "a2's /cluster showing b1 behind",
        LAG_SEEN_WITHIN,
        || async {
            let (code, body) = get(a2_http, "/cluster").await;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (code == 200 && lag_of_b1(&v).is_some_and(|l| l > 1 << 20)).then_some(v)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let body = v.to_string();
    assert_eq!(v["scope"], "test-cluster", "{body}");
    assert!(v["raft_leader"].is_string(), "{body}");
    let member = |name: &str| {
        v["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {body}"))
    };
    assert_eq!(member("a1")["role"], "leader", "{body}");
    assert_eq!(member("a1")["state"], "running", "{body}");
    assert_eq!(member("a1")["port"], c.member("a1").pg_port, "{body}");
    assert!(member("a1")["timeline"].as_u64().is_some(), "{body}");
    assert!(
        ["replica", "sync_standby"].contains(&member("b1")["role"].as_str().unwrap_or("")),
        "{body}"
    );
    assert_eq!(member("a2")["state"], "streaming", "{body}");
    assert!(
        member("a2")["api_url"]
            .as_str()
            .is_some_and(|u| u.ends_with(&format!(":{}/patroni", a2_http.port()))),
        "{body}"
    );

    // Thawed, it catches up and is a replica within 1 MB again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT the WAL receiver");
    wait_code(&c, "b1", "/replica?lag=1MB", 200, Duration::from_secs(30)).await;

    // Its WAL receiver stopped: not a replica any more, though Postgres runs.
    for sql in [
        "ALTER SYSTEM SET primary_conninfo = ''",
        "SELECT pg_reload_conf()",
    ] {
        tokio::time::timeout(SQL, b1.batch_execute(sql))
            .await
            .expect("in time")
            .unwrap_or_else(|e| panic!("{sql} on b1: {e}"));
    }
    let took = wait_code(&c, "b1", "/replica", 503, LAG_SEEN_WITHIN).await;
    eprintln!(
        "b1's /replica turned 503 {} ms after its receiver was stopped",
        took.as_millis()
    );
    assert_eq!(get(c.member("b1").http, "/health").await.0, 200);
    for n in DATA {
        assert!(
            !c.member(n).log().contains("panicked"),
            "{n} panicked:\n{}",
            c.logs()
        );
    }
}

/// Sessions established to database `postgres` so far, on each data member's Postgres,
/// read over one kept connection per server (so the test adds none).
async fn sessions(clients: &[(String, tokio_postgres::Client)]) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for (name, client) in clients {
        let row = tokio::time::timeout(
            SQL,
            client.query_one(
                "SELECT sessions FROM pg_stat_database WHERE datname = 'postgres'",
                &[],
            ),
        )
        .await
        .expect("in time")
        .expect("read pg_stat_database");
        out.push((name.clone(), row.get(0)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cluster_opens_no_new_postgres_sessions() {
    let _serial = SERIAL.lock().await;
    let c = form().await;
    let mut clients = Vec::new();
    for n in DATA {
        clients.push((n.to_string(), connect(&c.member(n).pg_conninfo()).await));
    }
    // Let start-up sessions (clones, slots, settings) end and their statistics arrive.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let before = sessions(&clients).await;
    let pids_before = agent_backends(&clients).await;
    assert!(
        pids_before.iter().all(|(_, p)| !p.is_empty()),
        "every server has agent sessions: {pids_before:?}"
    );
    let window = Duration::from_secs(12);
    tokio::time::sleep(window).await;
    let after = sessions(&clients).await;
    let grown: Vec<(String, i64)> = before
        .iter()
        .zip(&after)
        .map(|((n, b), (_, a))| (n.clone(), a - b))
        .collect();
    eprintln!("new sessions in {} s at idle: {grown:?}", window.as_secs());
    // Before kept sessions: +16/s on the primary and +8/s on each standby.
    for (n, g) in &grown {
        assert!(
            *g <= 1,
            "{n}'s Postgres got {g} new sessions in {window:?} at idle"
        );
    }
    // And the agents' sessions are the same ones throughout.
    assert_eq!(
        agent_backends(&clients).await,
        pids_before,
        "the agents' sessions changed at idle"
    );
}

/// Per server, the pids of the agents' sessions (application names `meridian...`).
async fn agent_backends(clients: &[(String, tokio_postgres::Client)]) -> Vec<(String, Vec<i32>)> {
    let mut out = Vec::new();
    for (name, client) in clients {
        let rows = tokio::time::timeout(
            SQL,
            client.query(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'meridian%' \
                 AND backend_type = 'client backend' ORDER BY pid",
                &[],
            ),
        )
        .await
        .expect("in time")
        .expect("read pg_stat_activity");
        out.push((name.clone(), rows.iter().map(|r| r.get(0)).collect()));
    }
    out
}
