//! `meridianctl` end to end: the real binary against real `meridian-node` processes.
//! Needs the binaries built first: `cargo build -p meridian-node -p meridianctl`.
//!
//! The switchover / pause-stops-failover / sync-policy tests need the failover runtime
//! (agents that run Postgres, promote and fence); they are ignored until it is merged.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meridian_node::raft::intent::{Promote, PromotionKind};
use meridian_node::raft::{Command, Intent};
use meridian_node::types::Generation;
use meridian_tests::agents::{AgentCluster, MemberSpec};
use meridian_tests::ctl::{run_ctl, run_ctl_env, CtlRun};
use meridian_tests::{free_ports, wait_for, wait_until};

const FORM: Duration = Duration::from_secs(40);
const TOKEN: &str = "s3cret-admin-token";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `a1=127.0.0.1:P,...` for every running member.
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

/// A failure is reported on exactly one line of stderr.
fn assert_one_line_error(r: &CtlRun, needle: &str, what: &str) {
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected: {r:#?}");
    assert!(lines[0].starts_with("error: "), "{what}: {r:#?}");
    assert!(
        lines[0].contains(needle),
        "{what}: {needle:?} expected: {r:#?}"
    );
}

/// Forms a1, a2 (east), b1 (west), w1 (eu witness) with an admin token; waits until the
/// leader reports all four as voters with fresh observations.
async fn four_members() -> AgentCluster {
    let mut c = AgentCluster::with_options(
        vec![
            MemberSpec::data("a1", "east").bootstrap(),
            MemberSpec::data("a2", "east").join("a1"),
            MemberSpec::data("b1", "west").join("a1"),
            MemberSpec::witness("w1", "eu").join("a1"),
        ],
        false,
        Some(TOKEN),
    )
    .unwrap();
    for n in ["a1", "a2", "b1", "w1"] {
        c.start(n).unwrap();
    }
    let r = wait_for("four voters reporting to the leader", FORM, || async {
        let s = c.status().await.ok()?;
        let ok = s.members.len() == 4
            && s.members
                .iter()
                .all(|m| m.voter && m.observation.is_some() && m.observation_age_ms < 2_000);
        ok.then_some(())
    })
    .await;
    if let Err(e) = r {
        panic!("{e}\n{}", c.logs());
    }
    c
}

/// Makes sure a1 is the recorded primary. Without the failover runtime nobody bootstraps a
/// primary, so the test commits the bootstrap promotion (and a sync set of a2) itself;
/// returns whether it did (then the roles are exactly known).
async fn ensure_primary(c: &AgentCluster) -> bool {
    let promote = Command::Promote(Promote {
        member: "a1".into(),
        generation: Generation(1),
        kind: PromotionKind::Bootstrap,
        force: false,
        reason: "bootstrap by the ctl test".into(),
        at_unix_ms: now_ms(),
        old_primary_lsn: None,
        new_primary_lsn: None,
        possible_loss_bytes: None,
    });
    if c.status().await.unwrap().primary.is_empty() && c.command("a2", &promote).await.is_ok() {
        let sync = Command::RecordSyncSet {
            generation: Generation(1),
            set: meridian_node::decide::SyncSet::new(["a2"], 1),
        };
        c.command("a2", &sync).await.unwrap();
        return true;
    }
    wait_until("a1 is the primary", FORM, || async {
        c.status().await.is_ok_and(|s| s.primary == "a1")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    false
}

fn roles(list: &serde_json::Value) -> BTreeMap<String, String> {
    list["members"]
        .as_array()
        .expect("members array")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn policy_json(eps: &str) -> serde_json::Value {
    let r = run_ctl(&["--endpoint", eps, "show-config", "--json"])
        .await
        .unwrap();
    assert_code(&r, 0, "show-config");
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_lists_pauses_edits_and_refuses_bad_input_on_a_real_cluster() {
    let c = four_members().await;
    let exact_roles = ensure_primary(&c).await;
    let eps = endpoints(&c);

    // list --json: roles, generation, pause state and the placement warning (2 of 4
    // voters in east: losing east leaves no majority).
    let r = run_ctl(&["--endpoint", &eps, "list", "--json"])
        .await
        .unwrap();
    assert_code(&r, 0, "list --json");
    let list = r.json();
    let roles = roles(&list);
    assert_eq!(roles["a1"], "primary", "{list:#}");
    assert_eq!(roles["w1"], "witness", "{list:#}");
    if exact_roles {
        assert_eq!(roles["a2"], "sync standby", "{list:#}");
        assert_eq!(roles["b1"], "async standby", "{list:#}");
    } else {
        assert!(roles["a2"].ends_with("standby") && roles["b1"].ends_with("standby"));
    }
    assert_eq!(list["generation"], 1, "{list:#}");
    assert_eq!(list["paused"], false);
    assert_eq!(list["from_leader"], true);
    let warnings = list["warnings"].to_string();
    assert!(
        warnings.contains("cannot survive the loss of region east"),
        "{list:#}"
    );

    // Human output: a table with every member, and the same warning.
    let r = run_ctl(&["--endpoint", &eps, "list"]).await.unwrap();
    assert_code(&r, 0, "list");
    for n in ["a1", "a2", "b1", "w1"] {
        assert!(
            r.stdout.lines().any(|l| l.starts_with(&format!("| {n} "))),
            "{r:#?}"
        );
    }
    assert!(r.stdout.contains("WARNING: voter placement"), "{r:#?}");
    assert!(r.stdout.contains("primary: a1"), "{r:#?}");

    // topology: a tree by region; endpoints from the environment this time, the first
    // one dead (the next is used).
    let dead = format!("127.0.0.1:{}", free_ports(1).unwrap()[0]);
    let env_eps = format!("{dead},{eps}");
    let r = run_ctl_env(
        &["topology"],
        &[("MERIDIAN_ENDPOINTS", &env_eps)],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_code(&r, 0, "topology");
    assert!(r.stdout.contains("── region east\n"), "{r:#?}");
    assert!(r.stdout.contains("── region eu\n"), "{r:#?}");
    assert!(r.stdout.contains("a1  [primary]"), "{r:#?}");
    assert!(r.stdout.contains("w1  [witness]"), "{r:#?}");

    // --watch is bounded by --count.
    let r = run_ctl(&["--endpoint", &eps, "list", "--watch", "0.2", "--count", "2"])
        .await
        .unwrap();
    assert_code(&r, 0, "list --watch");
    assert_eq!(r.stdout.matches("| Member").count(), 2, "{r:#?}");

    // pause with a wrong token: refused, nothing changes.
    let r = run_ctl(&["--endpoint", &eps, "--token", "wrong", "pause"])
        .await
        .unwrap();
    assert_code(&r, 1, "pause with a wrong token");
    assert_one_line_error(&r, "permission denied", "pause with a wrong token");
    assert!(!c.status().await.unwrap().paused);

    // pause / resume with the token from a config file; visible in list.
    let cfg = c.dir().join("ctl.toml");
    let token_file = c.dir().join("ctl-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let eps_toml: Vec<String> = eps.split(',').map(|e| format!("\"{e}\"")).collect();
    std::fs::write(
        &cfg,
        format!(
            "endpoints = [{}]\ntoken_file = \"{}\"\n",
            eps_toml.join(", "),
            token_file.display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let r = run_ctl(&["--config", cfg, "pause"]).await.unwrap();
    assert_code(&r, 0, "pause");
    let r = run_ctl(&["--config", cfg, "list", "--json"]).await.unwrap();
    assert_eq!(r.json()["paused"], true, "{r:#?}");
    let r = run_ctl(&["--config", cfg, "list"]).await.unwrap();
    assert!(r.stdout.contains("PAUSED"), "{r:#?}");
    let r = run_ctl_env(
        &["--endpoint", &eps, "resume"],
        &[("MERIDIAN_TOKEN", TOKEN)],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_code(&r, 0, "resume");
    let r = run_ctl(&["--endpoint", &eps, "list", "--json"])
        .await
        .unwrap();
    assert_eq!(r.json()["paused"], false, "{r:#?}");

    // edit-config: a valid change is committed and visible in show-config.
    let before = policy_json(&eps).await;
    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "edit-config",
        "--set",
        "regions.west.mode=sync",
        "--set",
        "commit_latency_budget_ms=25",
    ])
    .await
    .unwrap();
    assert_code(&r, 0, "edit-config");
    assert!(
        r.stdout.contains("commit_latency_budget_ms: 10 -> 25"),
        "{r:#?}"
    );
    let after = policy_json(&eps).await;
    assert_eq!(after["regions"]["west"]["mode"], "sync", "{after:#}");
    assert_eq!(after["commit_latency_budget_ms"], 25, "{after:#}");
    assert_ne!(before, after);
    let r = run_ctl(&["--endpoint", &eps, "show-config"]).await.unwrap();
    assert!(r.stdout.contains("commit_latency_budget_ms = 25"), "{r:#?}");

    // Bad edits: one-line reason, exit 1, nothing changes (not even the valid --set
    // given alongside).
    for (set, needle) in [
        (vec!["sync_quorum=0"], "must be at least 1"),
        (vec!["colour=red"], "unknown key"),
        (
            vec!["durability=sometimes"],
            "expected one of required, preferred",
        ),
        (
            vec!["commit_latency_budget_ms=30", "sync_quorum"],
            "malformed --set",
        ),
        (vec!["regions.West.mode=sync"], "lowercase"),
    ] {
        let mut args = vec!["--endpoint", &eps, "--token", TOKEN, "edit-config"];
        for s in &set {
            args.extend(["--set", s]);
        }
        let r = run_ctl(&args).await.unwrap();
        assert_code(&r, 1, &format!("edit-config {set:?}"));
        assert_one_line_error(&r, needle, &format!("edit-config {set:?}"));
        assert_eq!(
            policy_json(&eps).await,
            after,
            "edit-config {set:?} changed the policy"
        );
    }

    // history: the bootstrap promotion.
    let r = run_ctl(&["--endpoint", &eps, "history", "--json"])
        .await
        .unwrap();
    assert_code(&r, 0, "history");
    let h = r.json();
    assert!(
        h.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "bootstrap" && e["new_primary"] == "a1" && e["generation"] == 1),
        "{h:#}"
    );
    let r = run_ctl(&["--endpoint", &eps, "history", "--all"])
        .await
        .unwrap();
    assert!(r.stdout.contains("meridianctl edit-config"), "{r:#?}");

    // version: the ctl's and every member's.
    let r = run_ctl(&["--endpoint", &eps, "version"]).await.unwrap();
    assert_code(&r, 0, "version");
    assert!(r.stdout.starts_with("meridianctl 0.1.0\n"), "{r:#?}");
    for n in ["a1", "a2", "b1", "w1"] {
        assert!(r.stdout.contains(&format!("{n}: 0.1.0")), "{r:#?}");
    }

    // Unknown member, ineligible candidates: exit 1 with the reason, nothing changes.
    let gen_before = c.status().await.unwrap().generation;
    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "remove",
        "nosuch",
        "--force",
    ])
    .await
    .unwrap();
    assert_code(&r, 1, "remove nosuch");
    assert_one_line_error(&r, "no member named \"nosuch\"", "remove nosuch");
    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "remove",
        "a1",
        "--force",
    ])
    .await
    .unwrap();
    assert_code(&r, 1, "remove the primary");
    assert_one_line_error(&r, "is the current primary", "remove the primary");
    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "failover",
        "--candidate",
        "w1",
        "--force",
    ])
    .await
    .unwrap();
    assert_code(&r, 1, "failover to a witness");
    assert_one_line_error(&r, "witness", "failover to a witness");
    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "switchover",
        "--candidate",
        "nosuch",
        "--force",
    ])
    .await
    .unwrap();
    assert_code(&r, 1, "switchover to an unknown member");
    assert_one_line_error(&r, "no member named", "switchover to an unknown member");
    if exact_roles {
        // Without the runtime nobody runs Postgres: every standby is down, so a failover
        // to one is refused as impossible, even with --allow-data-loss.
        let r = run_ctl(&[
            "--endpoint",
            &eps,
            "--token",
            TOKEN,
            "failover",
            "--candidate",
            "b1",
            "--allow-data-loss",
            "--force",
        ])
        .await
        .unwrap();
        assert_code(&r, 1, "failover to a down standby");
        assert_one_line_error(&r, "b1 cannot be promoted", "failover to a down standby");
    }
    let s = c.status().await.unwrap();
    assert_eq!(
        s.generation, gen_before,
        "a refused command changed the generation"
    );
    assert_eq!(s.members.len(), 4);
    let intent: Intent = serde_json::from_str(&s.intent_json).unwrap();
    assert!(intent.pending_switchover.is_none());

    // reinit: sent as a command; a cluster that does not know it says so clearly.
    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "reinit",
        "b1",
        "--force",
    ])
    .await
    .unwrap();
    if r.code != Some(0) {
        assert_code(&r, 1, "reinit");
        assert_one_line_error(&r, "does not support reinit", "reinit");
    }

    // Usage errors exit 2: unknown command, missing --set, no --force without a terminal.
    let r = run_ctl(&["--endpoint", &eps, "frobnicate"]).await.unwrap();
    assert_code(&r, 2, "unknown command");
    let r = run_ctl(&["--endpoint", &eps, "edit-config"]).await.unwrap();
    assert_code(&r, 2, "edit-config without --set");
    let r = run_ctl(&["--endpoint", &eps, "--token", TOKEN, "switchover"])
        .await
        .unwrap();
    assert_code(&r, 2, "switchover without --force and without a terminal");
    assert_one_line_error(&r, "pass --force", "switchover without --force");
    let r = run_ctl(&["list"]).await.unwrap();
    assert_code(&r, 2, "no endpoint configured");
    assert_one_line_error(&r, "no endpoint", "no endpoint configured");
    let r = run_ctl(&["--help"]).await.unwrap();
    assert_code(&r, 0, "--help");
    assert!(r.stdout.contains("Exit codes:"), "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoints_fail_fast_with_one_line() {
    let ports = free_ports(2).unwrap();
    let eps = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    for args in [vec!["list"], vec!["pause"], vec!["switchover", "--force"]] {
        let mut full = vec!["--endpoint", eps.as_str(), "--timeout-ms", "2000"];
        full.extend(args.iter().copied());
        let started = Instant::now();
        let r = run_ctl(&full).await.unwrap();
        assert_code(&r, 1, &format!("{args:?} against dead endpoints"));
        assert_one_line_error(&r, "no endpoint answered", &format!("{args:?}"));
        assert!(
            r.stderr.contains(&ports[0].to_string()) && r.stderr.contains(&ports[1].to_string())
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{r:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_over_mutual_tls() {
    let mut c = AgentCluster::new(
        vec![
            MemberSpec::data("a1", "east").bootstrap(),
            MemberSpec::data("b1", "west").join("a1"),
            MemberSpec::witness("w1", "eu").join("a1"),
        ],
        true,
    )
    .unwrap();
    for n in ["a1", "b1", "w1"] {
        c.start(n).unwrap();
    }
    wait_until("three voters", FORM, || async {
        c.status()
            .await
            .is_ok_and(|s| s.members.len() == 3 && s.members.iter().all(|m| m.voter))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let pki = c.dir().join("pki");
    let (ca, cert, key) = (
        pki.join("ca.pem"),
        pki.join("admin-client.pem"),
        pki.join("admin-client.key"),
    );
    let eps = endpoints(&c);
    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--tls-ca",
        ca.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "list",
        "--json",
    ])
    .await
    .unwrap();
    assert_code(&r, 0, "list over TLS");
    let list = r.json();
    assert_eq!(list["members"].as_array().unwrap().len(), 3, "{list:#}");
    // One voter per region: no placement warning.
    assert!(
        !list["warnings"].to_string().contains("voter placement"),
        "{list:#}"
    );
    // Without TLS settings the members do not answer.
    let r = run_ctl(&["--endpoint", &eps, "--timeout-ms", "2000", "list"])
        .await
        .unwrap();
    assert_code(&r, 1, "plaintext against a TLS cluster");
}

// ------------------------------------------------------------ with the failover runtime

/// Waits until the cluster has a primary and both east members stream (the runtime runs
/// Postgres).
async fn wait_streaming(eps: &str, standbys: &[&str]) {
    wait_until("the standbys stream from the primary", FORM, || async {
        let Ok(r) = run_ctl(&["--endpoint", eps, "list", "--json"]).await else {
            return false;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&r.stdout) else {
            return false;
        };
        let states: BTreeMap<String, String> = v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        standbys
            .iter()
            .all(|s| states.get(*s).map(String::as_str) == Some("streaming"))
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the failover runtime (issue 4)"]
async fn switchover_moves_the_primary_and_history_records_it() {
    let c = four_members().await;
    let eps = endpoints(&c);
    wait_until("a primary", FORM, || async {
        c.status().await.is_ok_and(|s| !s.primary.is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let old = c.status().await.unwrap().primary;
    let target = if old == "a1" { "a2" } else { "a1" };
    let standbys: Vec<&str> = ["a1", "a2", "b1"]
        .into_iter()
        .filter(|n| *n != old)
        .collect();
    wait_streaming(&eps, &standbys).await;
    let gen = c.status().await.unwrap().generation;

    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "switchover",
        "--candidate",
        target,
        "--force",
    ])
    .await
    .unwrap();
    assert_code(&r, 0, "switchover");
    assert!(r.stdout.contains("Switchover complete"), "{r:#?}");

    let r = run_ctl(&["--endpoint", &eps, "list", "--json"])
        .await
        .unwrap();
    let list = r.json();
    assert_eq!(roles(&list)[target], "primary", "{list:#}");
    assert_eq!(list["generation"], gen + 1, "{list:#}");
    let r = run_ctl(&["--endpoint", &eps, "history", "--json"])
        .await
        .unwrap();
    let h = r.json();
    assert!(
        h.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "switchover"
                && e["old_primary"] == old.as_str()
                && e["new_primary"] == target
                && e["generation"] == gen + 1),
        "{h:#}"
    );
    // The old primary rejoins as a standby.
    wait_streaming(&eps, &[old.as_str()]).await;
    // A failover to a healthy cluster's standby is refused as unsafe (use switchover).
    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "failover",
        "--candidate",
        &old,
        "--force",
    ])
    .await
    .unwrap();
    assert_code(&r, 1, "failover on a healthy cluster");
    assert_one_line_error(
        &r,
        "use `meridianctl switchover`",
        "failover on a healthy cluster",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the failover runtime (issue 4)"]
async fn pause_stops_automatic_failover_and_resume_restores_it() {
    let mut c = four_members().await;
    let eps = endpoints(&c);
    wait_until("a primary", FORM, || async {
        c.status().await.is_ok_and(|s| !s.primary.is_empty())
    })
    .await
    .unwrap();
    let s = c.status().await.unwrap();
    let (old, gen) = (s.primary.clone(), s.generation);
    let standbys: Vec<&str> = ["a1", "a2", "b1"]
        .into_iter()
        .filter(|n| *n != old)
        .collect();
    wait_streaming(&eps, &standbys).await;

    let r = run_ctl(&["--endpoint", &eps, "--token", TOKEN, "pause"])
        .await
        .unwrap();
    assert_code(&r, 0, "pause");
    // Kill the primary's agent and its Postgres.
    let pgdata = c.member(&old).state_dir.join("pgdata");
    c.kill(&old).unwrap();
    // Postgres refuses to be driven by root: run pg_ctl as the postgres OS user then.
    let pg_ctl = [
        "pg_ctl",
        "-D",
        pgdata.to_str().unwrap(),
        "stop",
        "-m",
        "immediate",
    ];
    let _ = if nix::unistd::geteuid().is_root() {
        std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(pg_ctl)
            .status()
    } else {
        std::process::Command::new(pg_ctl[0])
            .args(&pg_ctl[1..])
            .status()
    };
    let others: Vec<String> = c.running();
    let eps_alive: String = others
        .iter()
        .map(|n| format!("{n}={}", c.member(n).grpc))
        .collect::<Vec<_>>()
        .join(",");
    // Paused: nobody is promoted for well past the lease.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let s = c.status().await.unwrap();
    assert_eq!(
        (s.primary.as_str(), s.generation),
        (old.as_str(), gen),
        "promoted while paused"
    );

    let r = run_ctl(&["--endpoint", &eps_alive, "--token", TOKEN, "resume"])
        .await
        .unwrap();
    assert_code(&r, 0, "resume");
    wait_until("a new primary after resume", FORM, || async {
        c.status()
            .await
            .is_ok_and(|s| s.generation > gen && s.primary != old)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let r = run_ctl(&["--endpoint", &eps_alive, "history", "--json"])
        .await
        .unwrap();
    assert!(
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "failover" && e["old_primary"] == old.as_str()),
        "{r:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the failover runtime (issue 4)"]
async fn edit_config_sync_policy_reaches_synchronous_standby_names() {
    let c = four_members().await;
    let eps = endpoints(&c);
    wait_until("a primary", FORM, || async {
        c.status().await.is_ok_and(|s| !s.primary.is_empty())
    })
    .await
    .unwrap();
    let primary = c.status().await.unwrap().primary;
    let standbys: Vec<&str> = ["a1", "a2", "b1"]
        .into_iter()
        .filter(|n| *n != primary)
        .collect();
    wait_streaming(&eps, &standbys).await;
    // Every region async: the primary waits on nobody.
    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "edit-config",
        "--set",
        "regions.east.mode=async",
        "--set",
        "regions.west.mode=async",
    ])
    .await
    .unwrap();
    assert_code(&r, 0, "edit-config async");
    let sync_names = |s: &meridian_proto::StatusResponse| {
        s.members
            .iter()
            .find(|m| m.name == primary)
            .and_then(|m| m.observation.as_ref())
            .and_then(|o| o.postgres.as_ref())
            .and_then(|p| p.sync_standby_names.clone())
    };
    wait_until("no synchronous standby on the primary", FORM, || async {
        c.status()
            .await
            .is_ok_and(|s| sync_names(&s).is_some_and(|n| n.names.is_empty()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // West sync: b1 (when it is not the primary) must appear in synchronous_standby_names.
    let r = run_ctl(&[
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "edit-config",
        "--set",
        "regions.west.mode=sync",
    ])
    .await
    .unwrap();
    assert_code(&r, 0, "edit-config west sync");
    if primary != "b1" {
        wait_until("b1 in synchronous_standby_names", FORM, || async {
            c.status().await.is_ok_and(|s| {
                sync_names(&s).is_some_and(|n| n.names.contains(&"b1".to_string()) && n.k >= 1)
            })
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    }
}
