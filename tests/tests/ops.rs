//! Day-2 operations end to end, with real agents, real Postgres and the real `meridianctl`
//! on 127.0.0.1: data members a1 (bootstrap, primary) and a2 in region east, b1 in west;
//! b1 overrides `work_mem` in its own config (`[postgres.parameters]`); every member has
//! callbacks (a script that appends its arguments to a file).
//!
//! One test, one cluster (forming it is most of the cost):
//! - `edit-config --set postgresql.parameters.*` refuses a name Meridian owns, an unknown
//!   name, a value out of range and a wrong enum value (checked against pg_settings), and
//!   commits nothing then;
//! - a reloadable parameter reaches every member (b1 keeps its override), one that needs a
//!   restart shows as pending in `list` and `/metrics`;
//! - `query`, `dsn`, `reload`;
//! - `restart --pending` under writes: standbys first, then the primary by exactly one
//!   switchover; nothing pending afterwards, no acknowledged write lost, the history
//!   records the restarts;
//! - callbacks: across that switchover `on_role_change` fired exactly once on the new
//!   primary (role primary) and once on the old one (role replica), never on b1;
//! - `--unset` takes the parameter away again;
//! - b2 joins last and clones from b1 (tagged `clonefrom`), then streams from the primary;
//! - b1 is tagged `nosync`: on 127.0.0.1 its region would be sync under `auto`, but only
//!   a2 (then a1) is ever in the sync set.
//!
//! Needs the binaries built first: `cargo build -p meridian-node -p meridianctl`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_tests::agents::{AgentCluster, ClusterSetup, ConfigExtra, MemberSpec};
use meridian_tests::ctl::{run_ctl, run_ctl_env, CtlRun};
use meridian_tests::{wait_for, wait_until};
use tokio_postgres::NoTls;

const FORM_PG: Duration = Duration::from_secs(90);
const CHANGE: Duration = Duration::from_secs(60);
const SQL: Duration = Duration::from_secs(5);
const TOKEN: &str = "ops-admin-token";

fn endpoints(c: &AgentCluster) -> String {
    c.running()
        .iter()
        .map(|n| format!("{n}={}", c.member(n).grpc))
        .collect::<Vec<_>>()
        .join(",")
}

fn assert_code(r: &CtlRun, code: i32, what: &str) {
    assert_eq!(r.code, Some(code), "{what}: {r:#?}");
}

async fn ctl(eps: &str, args: &[&str]) -> CtlRun {
    let mut all = vec!["--endpoint", eps, "--token", TOKEN];
    all.extend_from_slice(args);
    run_ctl(&all).await.unwrap()
}

async fn try_list(eps: &str) -> Option<serde_json::Value> {
    let r = run_ctl(&["--endpoint", eps, "list", "--json"]).await.ok()?;
    serde_json::from_str(&r.stdout).ok()
}

fn row<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

async fn pg(c: &AgentCluster, member: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        SQL,
        tokio_postgres::connect(&c.member(member).pg_conninfo(), NoTls),
    )
    .await
    .ok()?
    .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

/// `SHOW name` on `member`, None when it cannot be read now.
async fn show(c: &AgentCluster, member: &str, name: &str) -> Option<String> {
    let client = pg(c, member).await?;
    let row = tokio::time::timeout(SQL, client.query_one(&format!("SHOW {name}"), &[]))
        .await
        .ok()?
        .ok()?;
    Some(row.get(0))
}

/// One bounded HTTP GET of `/metrics`; the body.
async fn metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The callback lines of `member` with `action` (each "ACTION ROLE CLUSTER MEMBER").
fn callback_lines(file: &std::path::Path, member: &str, action: &str) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(action) && l.ends_with(&format!(" {member}")))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_restart_and_callbacks_on_a_real_cluster() {
    let started = Instant::now();
    let scripts = tempfile::Builder::new()
        .prefix("meridian-ops-")
        .tempdir()
        .unwrap();
    let log = scripts.path().join("callbacks.log");
    let script = scripts.path().join("callback.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", log.display()),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script_s = script.display().to_string();
    let hook = Arc::new(move |ctx: &meridian_tests::agents::ConfigContext<'_>| {
        let mut sections = format!(
            "[callbacks]\non_start = [\"{s}\"]\non_stop = [\"{s}\"]\non_role_change = [\"{s}\"]\ntimeout = \"5s\"\n",
            s = script_s
        );
        let mut member_keys = String::new();
        if ctx.spec.name == "b1" {
            sections.push_str("[postgres.parameters]\nwork_mem = \"7MB\"\n");
            // On 127.0.0.1 every region is within the commit budget: b1 would be sync.
            member_keys.push_str("nosync = true\nclonefrom = true\n");
        }
        Ok(ConfigExtra {
            postgres_keys: String::new(),
            member_keys,
            sections,
        })
    });
    let mut c = AgentCluster::build_with(
        vec![
            MemberSpec::data("a1", "east").bootstrap(),
            MemberSpec::data("a2", "east").join("a1"),
            MemberSpec::data("b1", "west").join("a1"),
            MemberSpec::data("b2", "west").join("a1"),
        ],
        ClusterSetup {
            token: Some(TOKEN.into()),
            postgres: true,
            config_hook: Some(hook),
            ..ClusterSetup::default()
        },
    )
    .unwrap();
    // b2 joins at the end (its clone comes from b1, tagged clonefrom).
    for n in ["a1", "a2", "b1"] {
        c.start(n).unwrap();
    }
    let eps = endpoints(&c);
    wait_until("a1 primary, a2 and b1 streaming", FORM_PG, || async {
        try_list(&eps).await.is_some_and(|v| {
            v["primary"] == "a1"
                && row(&v, "a1")["state"] == "running"
                && ["a2", "b1"]
                    .iter()
                    .all(|s| row(&v, s)["state"] == "streaming" && row(&v, s)["upstream"] == "a1")
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!("formed in {} ms", started.elapsed().as_millis());
    // nosync: a2 (same region) is the sync standby, b1 (tagged) never is.
    wait_until("a2 in the sync set", CHANGE, || async {
        try_list(&eps)
            .await
            .is_some_and(|v| v["sync_standbys"] == serde_json::json!(["a2"]))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    // ---- refusals: each names the problem, nothing is committed
    let before = ctl(&eps, &["show-config", "--json"]).await.json();
    for (set, needle) in [
        ("postgresql.parameters.port=6000", "managed by Meridian"),
        (
            "postgresql.parameters.primary_conninfo=host=x",
            "managed by Meridian",
        ),
        (
            "postgresql.parameters.work_mme=4MB",
            "not a parameter this Postgres knows",
        ),
        ("postgresql.parameters.shared_buffers=64kB", "out of range"),
        (
            "postgresql.parameters.log_statement=some",
            "expected one of",
        ),
        ("postgresql.parameters.work_mem=lots", "expected an integer"),
    ] {
        let r = ctl(&eps, &["edit-config", "--set", set]).await;
        assert_code(&r, 1, set);
        assert!(
            r.stderr.contains(needle),
            "{set}: {needle:?} expected: {r:#?}"
        );
        assert_eq!(r.stderr.lines().count(), 1, "{r:#?}");
    }
    assert_eq!(ctl(&eps, &["show-config", "--json"]).await.json(), before);

    // ---- a reloadable parameter and one that needs a restart
    let r = ctl(
        &eps,
        &[
            "edit-config",
            "--set",
            "postgresql.parameters.work_mem=12MB",
            "--set",
            "postgresql.parameters.max_connections=120",
        ],
    )
    .await;
    assert_code(&r, 0, "edit-config parameters");
    assert!(
        r.stdout.contains("after a restart: max_connections"),
        "{r:#?}"
    );
    wait_until("work_mem applied by reload everywhere", CHANGE, || async {
        show(&c, "a1", "work_mem").await.as_deref() == Some("12MB")
            && show(&c, "a2", "work_mem").await.as_deref() == Some("12MB")
            && show(&c, "b1", "work_mem").await.as_deref() == Some("7MB")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    wait_until(
        "max_connections pending restart on every member",
        CHANGE,
        || async {
            try_list(&eps).await.is_some_and(|v| {
                ["a1", "a2", "b1"].iter().all(|m| {
                    row(&v, m)["pending_restart"] == serde_json::json!(["max_connections"])
                })
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let text = ctl(&eps, &["list"]).await;
    assert!(
        text.stdout.contains("[pending restart: max_connections]"),
        "{text:#?}"
    );
    let m = metrics(c.member("a2").http).await;
    assert!(m.contains("meridian_pending_restart 1"), "{m}");
    assert!(m.contains("meridian_postgres_up 1"), "{m}");
    assert!(
        m.contains("meridian_wal_position_bytes{kind=\"replayed\"}"),
        "{m}"
    );
    assert!(m.contains("member=\"a2\""), "{m}");
    assert_eq!(
        show(&c, "a1", "max_connections").await.as_deref(),
        Some("100")
    );

    // ---- query, dsn, reload
    let q = ctl(
        &eps,
        &[
            "query",
            "SHOW work_mem",
            "--member",
            "b1",
            "--format",
            "json",
        ],
    )
    .await;
    assert_code(&q, 0, "query");
    let qj = q.json();
    assert_eq!(qj["rows"][0]["work_mem"], "7MB", "{qj:#}");
    assert_eq!(qj["member"], "b1");
    let q = ctl(
        &eps,
        &[
            "query",
            "SELECT 1 AS one, NULL AS nothing",
            "--format",
            "csv",
        ],
    )
    .await;
    assert_code(&q, 0, "query csv");
    assert_eq!(q.stdout, "one,nothing\n1,\n", "{q:#?}");
    let d = ctl(&eps, &["dsn", "a2"]).await;
    assert_code(&d, 0, "dsn");
    let port = c.member("a2").pg_port;
    assert_eq!(
        d.stdout.trim(),
        format!("host=127.0.0.1 port={port} dbname=postgres"),
        "{d:#?}"
    );
    let r = ctl(&eps, &["reload", "a1", "--force"]).await;
    assert_code(&r, 0, "reload");
    assert!(
        r.stdout.contains("reloaded a1's Postgres configuration"),
        "{r:#?}"
    );

    // ---- rolling restart under writes: at most one switchover, nothing lost
    let generation = try_list(&eps).await.unwrap()["generation"]
        .as_u64()
        .unwrap();
    let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Both east members: libpq finds the writable one across the switchover.
    let multi = c.member("a1").pg_conninfo().replacen(
        &format!("host=127.0.0.1 port={}", c.member("a1").pg_port),
        &format!(
            "host=127.0.0.1,127.0.0.1 port={},{} target_session_attrs=read-write",
            c.member("a1").pg_port,
            c.member("a2").pg_port
        ),
        1,
    );
    {
        let client = pg(&c, "a1").await.unwrap();
        client
            .batch_execute("CREATE TABLE ops_writes (id bigint PRIMARY KEY)")
            .await
            .unwrap();
    }
    let writer = {
        let acked = acked.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut next = 0i64;
            let deadline = Instant::now() + Duration::from_secs(170);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(Ok((client, conn))) = tokio::time::timeout(
                    Duration::from_secs(3),
                    tokio_postgres::connect(&multi, NoTls),
                )
                .await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    next += 1;
                    let r = tokio::time::timeout(
                        Duration::from_secs(5),
                        client.execute("INSERT INTO ops_writes VALUES ($1)", &[&next]),
                    )
                    .await;
                    match r {
                        Ok(Ok(_)) => acked.lock().unwrap().push(next),
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restart_started = Instant::now();
    let r = run_ctl_env(
        &[
            "--endpoint",
            &eps,
            "--token",
            TOKEN,
            "restart",
            "--pending",
            "--force",
            "--wait",
            "90",
        ],
        &[],
        Duration::from_secs(150),
    )
    .await
    .unwrap();
    assert_code(&r, 0, "restart --pending");
    eprintln!(
        "rolling restart took {} ms:\n{}",
        restart_started.elapsed().as_millis(),
        r.stdout
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    let v = wait_for(
        "nothing pending, a2 primary, a1 and b1 streaming",
        CHANGE,
        || async {
            let v = try_list(&eps).await?;
            let ok = v["primary"] == "a2"
                && ["a1", "a2", "b1"]
                    .iter()
                    .all(|m| row(&v, m)["pending_restart"].is_null())
                && ["a1", "b1"]
                    .iter()
                    .all(|s| row(&v, s)["state"] == "streaming");
            ok.then_some(v)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(
        v["generation"].as_u64().unwrap(),
        generation + 1,
        "exactly one switchover: {v:#}"
    );
    for m in ["a1", "a2", "b1"] {
        assert_eq!(
            show(&c, m, "max_connections").await.as_deref(),
            Some("120"),
            "{m}"
        );
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "the writer made progress: {}",
        acked.len()
    );
    let client = pg(&c, "a2").await.unwrap();
    let rows = client
        .query("SELECT id FROM ops_writes", &[])
        .await
        .unwrap();
    let present: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<&i64> = acked.iter().filter(|id| !present.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let h = ctl(&eps, &["history", "--all", "--json"]).await;
    assert_code(&h, 0, "history");
    let hist = h.stdout;
    assert!(hist.contains("restarted b1's Postgres"), "{hist}");
    assert!(hist.contains("restarted a2's Postgres"), "{hist}");

    // ---- callbacks: one role change each on a1 and a2 (the switchover), none on b1
    wait_until(
        "the callbacks of the switchover ran",
        Duration::from_secs(20),
        || async {
            callback_lines(&log, "a2", "on_role_change").len() == 1
                && callback_lines(&log, "a1", "on_role_change").len() == 1
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            c.logs()
        )
    });
    assert_eq!(
        callback_lines(&log, "a2", "on_role_change"),
        ["on_role_change primary test-cluster a2"]
    );
    assert_eq!(
        callback_lines(&log, "a1", "on_role_change"),
        ["on_role_change replica test-cluster a1"]
    );
    assert!(callback_lines(&log, "b1", "on_role_change").is_empty());
    // b1 was restarted: stopped and started as a replica.
    assert!(callback_lines(&log, "b1", "on_stop")
        .iter()
        .any(|l| l == "on_stop replica test-cluster b1"));
    assert!(!callback_lines(&log, "b1", "on_start").is_empty());

    // ---- unset
    let r = ctl(
        &eps,
        &["edit-config", "--unset", "postgresql.parameters.work_mem"],
    )
    .await;
    assert_code(&r, 0, "unset");
    wait_until(
        "work_mem back to its default on a1 and a2",
        CHANGE,
        || async {
            show(&c, "a1", "work_mem").await.as_deref() == Some("4MB")
                && show(&c, "a2", "work_mem").await.as_deref() == Some("4MB")
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // ---- clonefrom: a new member copies from b1 (tagged), then streams from the primary
    c.start("b2").unwrap();
    let eps = endpoints(&c);
    wait_until("b2 cloned and streaming from a2", FORM_PG, || async {
        try_list(&eps).await.is_some_and(|v| {
            row(&v, "b2")["state"] == "streaming" && row(&v, "b2")["upstream"] == "a2"
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let b2 = c.member("b2").log();
    assert!(
        b2.contains("cloning from b1") && !b2.contains("cloning from a2"),
        "b2 cloned from b1, not the primary:\n{b2}"
    );
    eprintln!("ops test took {} ms", started.elapsed().as_millis());
    drop(c);
}
