//! Disaster recovery end to end with real pgBackRest, real Postgres and real agents on
//! 127.0.0.1 (issue 13). One cluster (a1, a2 in region a, b1 in region b, witness w1) with
//! a `[backup]` repository in a temp dir, shared by the steps to keep the runtime modest:
//! a full backup, `backup list` and `backup check` on the running cluster; b1 re-cloned
//! from the repository (`create_replica_methods = ["pgbackrest", "basebackup"]`); b1
//! stopped while the primary lets go of the WAL its slot needed, catching up through
//! `restore_command` without a re-clone; a point-in-time restore to just before a
//! `DROP TABLE` in a separate directory while the cluster keeps running; kill -9 of the
//! primary (agent and postmaster), failover, the old primary rejoining, `backup check`
//! green and every segment up to the final position fetchable with `archive-get`.
//! Needs `cargo build -p meridian-node -p meridianctl` and pgbackrest on PATH.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::WalReceiverStatus;
use meridian_tests::agents::{AgentCluster, ClusterSetup, ConfigExtra, MemberSpec};
use meridian_tests::ctl::{run_ctl_env, CtlRun};
use meridian_tests::{free_ports, wait_for};
use tokio_postgres::NoTls;

const FORM: Duration = Duration::from_secs(120);
const CHANGE: Duration = Duration::from_secs(90);
const SQL: Duration = Duration::from_secs(10);
const TOKEN: &str = "backup-test-token";
const STANZA: &str = "test-cluster";

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A command as the Postgres OS user (as root) or as ourselves.
fn as_postgres(program: &str) -> std::process::Command {
    if is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        std::process::Command::new(program)
    }
}

fn chown_to_postgres(p: &Path) {
    if is_root() {
        let u = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres OS user");
        nix::unistd::chown(p, Some(u.uid), Some(u.gid)).unwrap();
    }
}

async fn ctl(c: &AgentCluster, args: &[&str]) -> CtlRun {
    let eps: Vec<String> = c
        .running()
        .iter()
        .map(|n| format!("{n}={}", c.member(n).grpc))
        .collect();
    let eps = eps.join(",");
    let mut all = vec![
        "--endpoint",
        &eps,
        "--token",
        TOKEN,
        "--timeout-ms",
        "10000",
    ];
    all.extend_from_slice(args);
    run_ctl_env(&all, &[], Duration::from_secs(300))
        .await
        .unwrap()
}

async fn ctl_ok(c: &AgentCluster, args: &[&str]) -> CtlRun {
    let r = ctl(c, args).await;
    assert_eq!(
        r.code,
        Some(0),
        "meridianctl {args:?}: {r:#?}\n{}",
        c.logs()
    );
    r
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

async fn sql(conninfo: &str, q: &str) -> Result<(), String> {
    let c = connect(conninfo).await?;
    tokio::time::timeout(SQL, c.batch_execute(q))
        .await
        .map_err(|_| format!("{q}: timed out"))?
        .map_err(|e| format!("{q}: {e}"))
}

async fn text(conninfo: &str, q: &str) -> Result<String, String> {
    let c = connect(conninfo).await?;
    let row = tokio::time::timeout(SQL, c.query_one(q, &[]))
        .await
        .map_err(|_| format!("{q}: timed out"))?
        .map_err(|e| format!("{q}: {e}"))?;
    Ok(row.get::<_, String>(0))
}

/// Waits until `standbys` stream from `primary`, as the leader sees it.
async fn wait_streaming(c: &AgentCluster, standbys: &[&str], primary: &str) {
    let what = format!("{standbys:?} streaming from {primary}");
    wait_for(&what, CHANGE, || async {
        let s = c.status().await.ok()?;
        if s.primary != primary {
            return None;
        }
        standbys
            .iter()
            .all(|n| {
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
            })
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}

/// A standalone Postgres the test started (the restored instance): stopped on drop.
struct Standalone(PathBuf);

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = as_postgres("/usr/lib/postgresql/15/bin/pg_ctl")
            .args([
                "-D",
                &self.0.display().to_string(),
                "stop",
                "-m",
                "immediate",
                "-w",
            ])
            .output();
    }
}

/// `backup check --json`, asserting exit 0 and no gap; returns the report.
async fn check_green(c: &AgentCluster, what: &str) -> serde_json::Value {
    let r = ctl(c, &["backup", "check", "--json"]).await;
    assert_eq!(r.code, Some(0), "{what}: {r:#?}\n{}", c.logs());
    let v = r.json();
    assert!(v["report"]["first_missing"].is_null(), "{what}: {v}");
    assert!(
        v["report"]["checked"].as_u64().unwrap_or(0) >= 1,
        "{what}: {v}"
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_backups_replicas_and_pitr_survive_a_failover() {
    if std::process::Command::new("pgbackrest")
        .arg("version")
        .output()
        .is_err()
    {
        panic!("pgbackrest is not installed (scripts/ensure-deps.sh installs it)");
    }
    let started = Instant::now();
    // The repository: a directory the Postgres OS user owns.
    let repo_root = tempfile::Builder::new()
        .prefix("meridian-repo-")
        .tempdir()
        .unwrap();
    let repo = repo_root.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(repo_root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    chown_to_postgres(&repo);
    let section = format!(
        "[backup]\nrepo_path = \"{}\"\narchive_mode = \"on\"\n\
         create_replica_methods = [\"pgbackrest\", \"basebackup\"]\n\
         retention_full = 2\ncommand_timeout = \"60s\"\nbackup_timeout = \"5m\"\n",
        repo.display()
    );
    let hook: meridian_tests::agents::ConfigHook = Arc::new(move |ctx| {
        Ok(ConfigExtra {
            sections: if ctx.spec.name.starts_with('w') {
                String::new()
            } else {
                section.clone()
            },
            ..ConfigExtra::default()
        })
    });
    let mut c = AgentCluster::build_with(
        vec![
            MemberSpec::data("a1", "a").bootstrap(),
            MemberSpec::data("a2", "a").join("a1"),
            MemberSpec::data("b1", "b").join("a1"),
            MemberSpec::witness("w1", "c").join("a1"),
        ],
        ClusterSetup {
            token: Some(TOKEN.into()),
            postgres: true,
            config_hook: Some(hook),
            ..ClusterSetup::default()
        },
    )
    .unwrap();
    c.start("a1").unwrap();
    wait_for("a1 primary", FORM, || async {
        let s = c.status().await.ok()?;
        (s.primary == "a1" && s.generation == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    for m in ["a2", "b1", "w1"] {
        c.start(m).unwrap();
    }
    wait_streaming(&c, &["a2", "b1"], "a1").await;
    eprintln!("formed in {} ms", started.elapsed().as_millis());
    let a1 = c.member("a1").pg_conninfo();
    sql(
        &a1,
        "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)",
    )
    .await
    .unwrap();

    // 1. A full backup, the list, and a green check on the running cluster.
    // The members run no pgbackrest server: the default (`--from auto`) tries a standby,
    // which says it cannot, and the backup runs on the primary.
    let r = ctl_ok(&c, &["backup", "--type", "full", "--json"]).await;
    let label = r.json()["label"].as_str().unwrap().to_string();
    assert!(label.ends_with('F'), "{r:#?}");
    assert_eq!(r.json()["member"], "a1", "{r:#?}");
    assert!(r.stderr.contains("backing up on the primary"), "{r:#?}");
    let r = ctl_ok(&c, &["backup", "list", "--json"]).await;
    let list = r.json();
    assert_eq!(list["backups"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["backups"][0]["label"], label.as_str());
    let r = ctl_ok(&c, &["backup", "list"]).await;
    assert!(r.stdout.contains(&label), "{r:#?}");
    check_green(&c, "check after the first backup").await;
    eprintln!("backup + check at {} ms", started.elapsed().as_millis());

    // 2. A replica re-created from the repository, not from the primary.
    ctl_ok(&c, &["reinit", "b1", "--force", "--wait", "120"]).await;
    wait_streaming(&c, &["a2", "b1"], "a1").await;
    assert!(
        c.member("b1")
            .log()
            .contains("replica restored from the pgBackRest repository"),
        "b1 was not restored from the repository:\n{}",
        c.member("b1").log()
    );
    let b1 = c.member("b1").pg_conninfo();
    wait_for("b1 has t", CHANGE, || async {
        (text(&b1, "SELECT count(*)::text FROM t").await.ok()? == "1000").then_some(())
    })
    .await
    .unwrap();
    eprintln!(
        "replica from the repository at {} ms",
        started.elapsed().as_millis()
    );

    // 3. b1 down while the primary lets go of the WAL b1's slot needs: b1 catches up from
    // the archive (restore_command) and streams again, without a re-clone.
    let marker = c.member("b1").pg_data_dir().join("meridian-test-marker");
    std::fs::write(&marker, "same data dir").unwrap();
    c.kill("b1").unwrap();
    let b1_data = c.member("b1").pg_data_dir();
    let out = as_postgres("/usr/lib/postgresql/15/bin/pg_ctl")
        .args([
            "-D",
            &b1_data.display().to_string(),
            "stop",
            "-m",
            "fast",
            "-w",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "stopping b1: {out:?}");
    // (ALTER SYSTEM cannot run in a multi-statement batch: one at a time.)
    for q in [
        "ALTER SYSTEM SET wal_keep_size = 0",
        "ALTER SYSTEM SET max_slot_wal_keep_size = '32MB'",
        "SELECT pg_reload_conf()",
    ] {
        sql(&a1, q).await.unwrap();
    }
    wait_for("b1's slot lost on a1", CHANGE, || async {
        sql(
            &a1,
            "INSERT INTO t SELECT generate_series(1, 100); SELECT pg_switch_wal(); \
             INSERT INTO t SELECT 1; SELECT pg_switch_wal(); INSERT INTO t SELECT 1; \
             SELECT pg_switch_wal(); CHECKPOINT",
        )
        .await
        .ok()?;
        let st = text(
            &a1,
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = 'meridian_b1'",
        )
        .await
        .ok()?;
        (st == "lost").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    sql(&a1, "CREATE TABLE after_gap AS SELECT 42 AS v")
        .await
        .unwrap();
    let b1_log_before = c.member("b1").log().len();
    c.start("b1").unwrap();
    wait_streaming(&c, &["a2", "b1"], "a1").await;
    wait_for("b1 has after_gap", CHANGE, || async {
        (text(&b1, "SELECT v::text FROM after_gap").await.ok()? == "42").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert!(
        marker.exists(),
        "b1 was re-cloned:\n{}",
        c.member("b1").log()
    );
    let since = &c.member("b1").log()[b1_log_before..];
    assert!(
        !since.contains("cloning") && !since.contains("rewinding"),
        "b1 was re-cloned or rewound:\n{since}"
    );
    let pg_log = std::fs::read_to_string(format!("{}.log", b1_data.display())).unwrap_or_default();
    assert!(
        pg_log.contains("restored log file"),
        "b1 did not read the archive (restore_command):\n{pg_log}"
    );
    eprintln!("archive catch-up at {} ms", started.elapsed().as_millis());

    // 4. Point-in-time recovery to just before a DROP TABLE, into a separate directory,
    // while the cluster keeps running.
    sql(
        &a1,
        "CREATE TABLE precious AS SELECT generate_series(1, 500) AS id",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before_drop = text(&a1, "SELECT clock_timestamp()::text").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sql(&a1, "DROP TABLE precious").await.unwrap();
    // The commit after the target must reach the archive: recovery stops there.
    sql(&a1, "SELECT pg_switch_wal()").await.unwrap();
    let target_dir = repo_root.path().join("pitr");
    let port = free_ports(1).unwrap()[0].to_string();
    let r = ctl(
        &c,
        &[
            "restore",
            "--to",
            &before_drop,
            "--target-dir",
            &target_dir.display().to_string(),
            "--port",
            &port,
            "--member",
            "a2",
            "--json",
        ],
    )
    .await;
    let _restored = Standalone(target_dir.clone());
    assert_eq!(r.code, Some(0), "restore: {r:#?}\n{}", c.logs());
    let restored = format!(
        "host=127.0.0.1 port={port} user=postgres password={} dbname=postgres connect_timeout=2",
        meridian_tests::agents::SUPERUSER_PASSWORD
    );
    assert_eq!(
        text(&restored, "SELECT count(*)::text FROM precious")
            .await
            .unwrap(),
        "500"
    );
    // The cluster kept running: the primary takes writes, the restore is no member.
    sql(&a1, "INSERT INTO t VALUES (7)").await.unwrap();
    let s = c.status().await.unwrap();
    assert_eq!(s.primary, "a1");
    assert_eq!(s.members.len(), 4);
    // Never over an existing directory.
    let r = ctl(
        &c,
        &[
            "restore",
            "--to",
            &before_drop,
            "--target-dir",
            &target_dir.display().to_string(),
            "--port",
            &port,
        ],
    )
    .await;
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains("not empty"), "{r:#?}");
    drop(_restored);
    eprintln!("PITR at {} ms", started.elapsed().as_millis());

    // 5. kill -9 of the primary (agent and postmaster): a2 takes over, archiving continues
    // on its timeline, a1 comes back (its unarchived WAL pushed, rewound) and the archive
    // is whole up to the final position.
    c.kill("a1").unwrap();
    c.member("a1").kill_postgres();
    wait_for("a2 primary", CHANGE, || async {
        let s = c.status().await.ok()?;
        (s.primary == "a2").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let a2 = c.member("a2").pg_conninfo();
    wait_for("a2 takes writes", CHANGE, || async {
        sql(&a2, "INSERT INTO t VALUES (8)").await.ok()
    })
    .await
    .unwrap();
    c.start("a1").unwrap();
    wait_streaming(&c, &["a1", "b1"], "a2").await;
    // Rewound (pg_rewind --restore-target-wal, restore_command is set), not re-cloned.
    let a1_log = c.member("a1").log();
    assert!(
        a1_log.contains("rewound and rejoined as a standby")
            && !a1_log.contains("pg_rewind failed"),
        "a1 was not rewound:\n{a1_log}"
    );
    sql(&a2, "INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    let v = check_green(&c, "check after the failover").await;
    assert_eq!(v["member"], "a2", "{v}");
    assert!(v["timeline"].as_u64().unwrap() >= 2, "{v}");
    assert!(
        v["report"]["histories"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t.as_u64() == Some(v["timeline"].as_u64().unwrap())),
        "{v}"
    );
    // Every segment from the oldest backup to the final position is fetchable.
    let from = v["report"]["from"].as_str().unwrap();
    let to = v["report"]["to"].as_str().unwrap();
    let conf = c
        .member("a1")
        .state_dir
        .join("pgbackrest")
        .join("pgbackrest.conf");
    let scratch = c.member("a1").state_dir.join("pgbackrest").join("tmp");
    let history_text = |tli: u32| -> String {
        let dest = scratch.join(format!("{tli:08X}.history"));
        let out = as_postgres("pgbackrest")
            .args([
                &format!("--config={}", conf.display()),
                &format!("--stanza={STANZA}"),
                "archive-get",
                &format!("{tli:08X}.history"),
                &dest.display().to_string(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "archive-get history {tli}: {out:?}");
        std::fs::read_to_string(dest).unwrap()
    };
    let tli = v["timeline"].as_u64().unwrap() as u32;
    let history = meridian_node::backup::archive::parse_history(&history_text(tli)).unwrap();
    let size = 16 * 1024 * 1024;
    let first = meridian_node::backup::archive::Segment::parse(from, size).unwrap();
    let last = meridian_node::backup::archive::Segment::parse(to, size).unwrap();
    let mut fetched = 0;
    for n in first.number..=last.number {
        // The timeline recovery reads segment n from.
        let mut t = tli;
        for sw in history.iter().rev() {
            if n < sw.at.0 / size {
                t = sw.parent;
            }
        }
        let name = meridian_node::backup::archive::Segment {
            timeline: t,
            number: n,
        }
        .name(size);
        let dest = scratch.join(&name);
        let out = as_postgres("pgbackrest")
            .args([
                &format!("--config={}", conf.display()),
                &format!("--stanza={STANZA}"),
                "archive-get",
                &name,
                &dest.display().to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "segment {name} is not fetchable: {out:?}"
        );
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), size);
        let _ = std::fs::remove_file(&dest);
        fetched += 1;
    }
    assert!(
        fetched >= 5,
        "only {fetched} segments between {from} and {to}"
    );
    // The history records the backup.
    let r = ctl_ok(&c, &["history", "--all", "--json"]).await;
    assert!(r.stdout.contains(&label), "{r:#?}");
    eprintln!(
        "failover + archive continuity ({fetched} segments fetched) at {} ms",
        started.elapsed().as_millis()
    );
}
