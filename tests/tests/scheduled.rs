//! Scheduled operations stored in the intent and run by the leader, `query` in the
//! history, and `on_stop` on a graceful stop — end to end with real agents, real Postgres
//! and the real `meridianctl` on 127.0.0.1: a1 (bootstrap, primary) and a2 in east, a
//! witness w in south; every member has callbacks (a script appending its arguments).
//!
//! - `switchover --scheduled` records the switchover in the intent (`list` shows it) and
//!   returns at once; a second one is refused; `flush switchover` cancels it (history);
//! - scheduled again a few seconds ahead, the leader starts it at its time: a2 becomes the
//!   primary with nobody waiting in `meridianctl`; the history says it started and ended;
//! - `restart --scheduled --role replica`: the leader restarts the standby a1 (history);
//! - `query` is recorded in the history with who asked, the member and the SQL's first line;
//! - SIGTERM to a1's agent: its `on_stop` callback runs (role replica) before it exits.
//!
//! Needs the binaries built first: `cargo build -p meridian-node -p meridianctl`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meridian_tests::agents::{AgentCluster, ClusterSetup, ConfigExtra, MemberSpec};
use meridian_tests::ctl::{run_ctl, CtlRun};
use meridian_tests::wait_until;

const FORM_PG: Duration = Duration::from_secs(90);
const CHANGE: Duration = Duration::from_secs(60);
const TOKEN: &str = "scheduled-admin-token";

fn endpoints(c: &AgentCluster) -> String {
    c.running()
        .iter()
        .map(|n| format!("{n}={}", c.member(n).grpc))
        .collect::<Vec<_>>()
        .join(",")
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

async fn history(eps: &str) -> String {
    ctl(eps, &["history", "--all", "--json"]).await.stdout
}

/// RFC 3339 for now + `ahead`.
fn at(ahead: Duration) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + ahead).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_runs_scheduled_operations_and_the_history_records_queries() {
    let started = Instant::now();
    let scripts = tempfile::Builder::new()
        .prefix("meridian-scheduled-")
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
    let hook = Arc::new(move |_: &meridian_tests::agents::ConfigContext<'_>| {
        Ok(ConfigExtra {
            postgres_keys: String::new(),
            member_keys: String::new(),
            sections: format!("[callbacks]\non_stop = [\"{script_s}\"]\ntimeout = \"5s\"\n"),
        })
    });
    let mut c = AgentCluster::build_with(
        vec![
            MemberSpec::data("a1", "east").bootstrap(),
            MemberSpec::data("a2", "east").join("a1"),
            MemberSpec::witness("w", "south").join("a1"),
        ],
        ClusterSetup {
            token: Some(TOKEN.into()),
            postgres: true,
            config_hook: Some(hook),
            ..ClusterSetup::default()
        },
    )
    .unwrap();
    for n in ["a1", "a2", "w"] {
        c.start(n).unwrap();
    }
    let eps = endpoints(&c);
    wait_until("a1 primary, a2 streaming", FORM_PG, || async {
        try_list(&eps)
            .await
            .is_some_and(|v| v["primary"] == "a1" && row(&v, "a2")["state"] == "streaming")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!("formed in {} ms", started.elapsed().as_millis());

    // ---- scheduled, shown, refused twice, cancelled
    let r = ctl(
        &eps,
        &[
            "switchover",
            "--scheduled",
            &at(Duration::from_secs(3600)),
            "--force",
        ],
    )
    .await;
    assert_eq!(r.code, Some(0), "{r:#?}");
    let v = try_list(&eps).await.unwrap();
    assert_eq!(v["scheduled"][0]["kind"], "switchover", "{v}");
    let text = ctl(&eps, &["list"]).await.stdout;
    assert!(text.contains("Scheduled: switchover at "), "{text}");
    let again = ctl(
        &eps,
        &[
            "switchover",
            "--scheduled",
            &at(Duration::from_secs(60)),
            "--force",
        ],
    )
    .await;
    assert_eq!(again.code, Some(1), "{again:#?}");
    assert!(again.stderr.contains("already scheduled"), "{again:#?}");
    let r = ctl(&eps, &["flush", "switchover"]).await;
    assert_eq!(r.code, Some(0), "{r:#?}");
    let v = try_list(&eps).await.unwrap();
    assert!(v["scheduled"].as_array().unwrap().is_empty(), "{v}");
    let r = ctl(&eps, &["flush", "switchover"]).await;
    assert_eq!(r.code, Some(1), "nothing left to cancel: {r:#?}");
    let h = history(&eps).await;
    assert!(h.contains("scheduled: switchover at"), "{h}");
    assert!(h.contains(": cancelled"), "{h}");

    // ---- the leader starts it at its time; nobody waits in meridianctl
    let r = ctl(
        &eps,
        &[
            "switchover",
            "--candidate",
            "a2",
            "--scheduled",
            &at(Duration::from_secs(4)),
            "--force",
        ],
    )
    .await;
    assert_eq!(r.code, Some(0), "{r:#?}");
    let asked = Instant::now();
    wait_until("the scheduled switchover to a2 ran", CHANGE, || async {
        try_list(&eps).await.is_some_and(|v| {
            v["primary"] == "a2"
                && row(&v, "a2")["state"] == "running"
                && row(&v, "a1")["state"] == "streaming"
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "started before its time: {:?}",
        asked.elapsed()
    );
    wait_until("the history says it ran", CHANGE, || async {
        let h = history(&eps).await;
        h.contains(": started")
            && h.contains("scheduled switchover done: switched over from a1 to a2")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    // ---- a scheduled rolling restart of the standbys
    let r = ctl(
        &eps,
        &[
            "restart",
            "--role",
            "replica",
            "--scheduled",
            &at(Duration::from_secs(2)),
            "--force",
        ],
    )
    .await;
    assert_eq!(r.code, Some(0), "{r:#?}");
    wait_until("the scheduled restart ran", CHANGE, || async {
        history(&eps)
            .await
            .contains("scheduled restart done: restarted a1's Postgres")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    // ---- query in the history: who, which member, the first line
    let r = ctl(
        &eps,
        &["query", "SELECT 42 AS answer\n, 1", "--member", "a1"],
    )
    .await;
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stdout.contains("42"), "{r:#?}");
    let h = history(&eps).await;
    assert!(
        h.contains("query on a1: SELECT 42 AS answer… (1 row(s)) (requested by token"),
        "{h}"
    );

    // ---- on_stop on a graceful stop of the standby's agent (the switchover and the
    // restart above stopped a1's Postgres too: count what the stop adds)
    let stops_of_a1 = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("on_stop ") && l.ends_with(" a1"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let before = stops_of_a1();
    assert!(
        before.iter().any(|l| l.starts_with("on_stop primary ")),
        "the switchover stopped a1 as the primary: {before:?}"
    );
    let status = c.stop("a1").unwrap();
    assert!(status.success(), "{status:?}");
    // Read right after the agent exited: it waited for the callback.
    let after = stops_of_a1();
    assert_eq!(after.len(), before.len() + 1, "{after:?}\n{}", c.logs());
    assert!(
        after.last().unwrap().starts_with("on_stop replica "),
        "{after:?}"
    );
    eprintln!("done in {} ms", started.elapsed().as_millis());
}
