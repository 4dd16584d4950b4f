//! `meridianctl restore --as-new-cluster` end to end (issue 13): real agents, real
//! Postgres, real pgBackRest. A one-member cluster with a `[backup]` repository takes a
//! full backup, writes more rows (archived), then restores the newest state into a new
//! directory as the data of a new cluster; the agent started from the config meridianctl
//! wrote bootstraps that cluster on the restored data: it becomes primary, and the rows
//! written before and after the backup are there and writable.
//! Needs `cargo build -p meridian-node -p meridianctl` and pgbackrest on PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use meridian_tests::agents::{node_binary, AgentCluster, ClusterSetup, ConfigExtra, MemberSpec};
use meridian_tests::ctl::{run_ctl_env, CtlRun};
use meridian_tests::{free_ports, wait_for};
use tokio_postgres::NoTls;

const FORM: Duration = Duration::from_secs(120);
const TOKEN: &str = "new-cluster-test-token";

fn chown_to_postgres(p: &Path) {
    if nix::unistd::Uid::effective().is_root() {
        let u = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres OS user");
        nix::unistd::chown(p, Some(u.uid), Some(u.gid)).unwrap();
    }
}

async fn ctl_at(endpoints: &str, args: &[&str]) -> CtlRun {
    let mut all = vec![
        "--endpoint",
        endpoints,
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

async fn query(conninfo: &str, q: &str) -> Result<String, String> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(conninfo, NoTls),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let row = tokio::time::timeout(Duration::from_secs(10), client.query_one(q, &[]))
        .await
        .map_err(|_| format!("{q}: timed out"))?
        .map_err(|e| format!("{q}: {e}"))?;
    Ok(row.get::<_, String>(0))
}

/// The new cluster's agent and its Postgres: killed and stopped on drop.
struct NewAgent {
    child: Child,
    data_dir: PathBuf,
}

impl Drop for NewAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut c = if nix::unistd::Uid::effective().is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl"]);
            c
        } else {
            Command::new("/usr/lib/postgresql/15/bin/pg_ctl")
        };
        let _ = c
            .args([
                "-D",
                &self.data_dir.display().to_string(),
                "stop",
                "-m",
                "immediate",
                "-w",
            ])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_becomes_the_primary_of_a_new_cluster() {
    if Command::new("pgbackrest").arg("version").output().is_err() {
        panic!("pgbackrest is not installed (scripts/ensure-deps.sh installs it)");
    }
    let repo_root = tempfile::Builder::new()
        .prefix("meridian-newcl-repo-")
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
        "[backup]\nrepo_path = \"{}\"\ncommand_timeout = \"60s\"\nbackup_timeout = \"5m\"\n",
        repo.display()
    );
    let hook: meridian_tests::agents::ConfigHook = Arc::new(move |_ctx| {
        Ok(ConfigExtra {
            sections: section.clone(),
            ..ConfigExtra::default()
        })
    });
    let mut c = AgentCluster::build_with(
        vec![MemberSpec::data("a1", "a").bootstrap()],
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
    let eps = format!("a1={}", c.member("a1").grpc);
    let a1 = c.member("a1").pg_conninfo();
    query(&a1, "SELECT 'x' FROM (SELECT 1) s").await.unwrap();
    let setup = |q: &'static str| {
        let a1 = a1.clone();
        async move {
            let (client, conn) = tokio_postgres::connect(&a1, NoTls).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client.batch_execute(q).await.unwrap();
        }
    };
    setup("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)").await;
    // (The first backup may race the agent's stanza-create at start: retry, bounded.)
    let mut backed_up = None;
    for _ in 0..10 {
        let r = ctl_at(&eps, &["backup", "--type", "full", "--json"]).await;
        if r.code == Some(0) {
            backed_up = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(backed_up.is_some(), "no backup\n{}", c.logs());
    setup("INSERT INTO t SELECT generate_series(1001, 1500)").await;
    // check switches WAL and waits for it in the repository: the rows are archived.
    let r = ctl_at(&eps, &["backup", "check", "--json"]).await;
    assert_eq!(r.code, Some(0), "{r:#?}\n{}", c.logs());

    let target_dir = repo_root.path().join("restored");
    let ports = free_ports(3).unwrap();
    let (pg_port, grpc, http) = (ports[0], ports[1], ports[2]);
    let new_grpc = format!("127.0.0.1:{grpc}");
    let new_http = format!("127.0.0.1:{http}");
    let r = ctl_at(
        &eps,
        &[
            "restore",
            "--to",
            "latest",
            "--target-dir",
            &target_dir.display().to_string(),
            "--port",
            &pg_port.to_string(),
            "--as-new-cluster",
            "reborn",
            "--new-listen",
            &new_grpc,
            "--new-http-listen",
            &new_http,
        ],
    )
    .await;
    assert_eq!(r.code, Some(0), "restore: {r:#?}\n{}", c.logs());
    assert!(r.stdout.contains("meridian-node --config "), "{r:#?}");
    let config = PathBuf::from(
        r.stdout
            .rsplit("meridian-node --config ")
            .next()
            .unwrap()
            .trim(),
    );
    assert!(config.is_file(), "{r:#?}");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("cluster = \"reborn\""), "{text}");
    assert!(!text.lines().any(|l| l.trim() == "[backup]"), "{text}");
    // The old cluster keeps running beside the new one (other ports, no peers in common).

    let log_path = repo_root.path().join("reborn.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(node_binary().unwrap())
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _agent = NewAgent {
        child,
        data_dir: target_dir.clone(),
    };
    let new_eps = format!("a1={new_grpc}");
    let logs = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for("the new cluster's bootstrap", FORM, || async {
        let r = ctl_at(&new_eps, &["--json", "history"]).await;
        (r.code == Some(0)
            && r.json()
                .as_array()?
                .iter()
                .any(|h| h["kind"] == "bootstrap" && h["new_primary"] == "a1"))
        .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let restored = format!(
        "host=127.0.0.1 port={pg_port} user=postgres password={} dbname=postgres connect_timeout=2",
        meridian_tests::agents::SUPERUSER_PASSWORD
    );
    let rows = wait_for("the restored rows on the new primary", FORM, || async {
        let rec = query(&restored, "SELECT pg_is_in_recovery()::text")
            .await
            .ok()?;
        if rec != "false" {
            return None;
        }
        query(&restored, "SELECT count(*)::text FROM t").await.ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(rows, "1500", "rows before and after the backup");
    let (client, conn) = tokio_postgres::connect(&restored, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .batch_execute("INSERT INTO t VALUES (0)")
        .await
        .unwrap_or_else(|e| panic!("the new primary takes writes: {e}\n{}", logs()));
    // Two clusters now: the old one still has its primary and its own history.
    let s = c.status().await.unwrap();
    assert_eq!(s.primary, "a1");
    assert_eq!(
        query(&a1, "SELECT count(*)::text FROM t").await.unwrap(),
        "1500"
    );
}
