//! Backups taken on a standby with real pgBackRest (issue 13): every data member runs its
//! own `pgbackrest server` (TLS, client certificates named after the members), and
//! `meridianctl backup` picks the streaming standby by default. The backup must be
//! usable: `backup check` is green and a restore from it into a separate directory has
//! the rows. A member whose certificate the CA did not sign gets nothing from a server.
//! Needs `cargo build -p meridian-node -p meridianctl` and pgbackrest on PATH.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::WalReceiverStatus;
use meridian_tests::agents::{AgentCluster, ClusterSetup, ConfigExtra, MemberSpec};
use meridian_tests::ctl::{run_ctl_env, CtlRun};
use meridian_tests::pgbr::{chown_to_postgres, is_root, issue, new_ca, write_private};
use meridian_tests::{free_ports, wait_for};
use tokio_postgres::NoTls;

const FORM: Duration = Duration::from_secs(120);
const SQL: Duration = Duration::from_secs(10);
const TOKEN: &str = "backup-standby-token";

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

async fn query(conninfo: &str, q: &str) -> Result<String, String> {
    let (client, conn) = tokio::time::timeout(SQL, tokio_postgres::connect(conninfo, NoTls))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let rows = tokio::time::timeout(SQL, client.simple_query(q))
        .await
        .map_err(|_| format!("{q}: timed out"))?
        .map_err(|e| format!("{q}: {e}"))?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default())
}

/// A standalone Postgres the test started (the restored instance): stopped on drop.
struct Standalone {
    data_dir: PathBuf,
    pg_ctl: PathBuf,
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&self.pg_ctl);
            c
        } else {
            std::process::Command::new(&self.pg_ctl)
        };
        let _ = cmd
            .arg("-D")
            .arg(&self.data_dir)
            .args(["stop", "-m", "immediate", "-w"])
            .output();
    }
}

/// `pgbackrest check` of the cluster's stanza from outside, with a1 as a remote host
/// reached through its server and `client` (cert, key) as the client certificate.
fn check_through_server(
    c: &AgentCluster,
    dir: &Path,
    port: u16,
    ca: &Path,
    client: &(PathBuf, PathBuf),
) -> std::process::Output {
    let a1 = c.member("a1");
    let conf = dir.join("probe.conf");
    write_private(
        &conf,
        &format!(
            "[global]\nlog-path={d}\nlock-path={d}\nrepo1-path={repo}\nlog-level-console=error\n\
             io-timeout=10\ndb-timeout=10\narchive-timeout=30\n\
             [test-cluster]\npg1-host=127.0.0.1\npg1-host-type=tls\npg1-host-port={port}\n\
             pg1-host-ca-file={ca}\npg1-host-cert-file={cert}\npg1-host-key-file={key}\n\
             pg1-host-config={remote_conf}\npg1-path={data}\npg1-port={pg_port}\n\
             pg1-socket-path={socket}\npg1-user=postgres\n",
            d = dir.display(),
            repo = dir.parent().unwrap().join("repo").display(),
            ca = ca.display(),
            cert = client.0.display(),
            key = client.1.display(),
            remote_conf = a1
                .state_dir
                .join("pgbackrest")
                .join("pgbackrest.conf")
                .display(),
            data = a1.pg_data_dir().display(),
            pg_port = a1.pg_port,
            socket = a1.state_dir.join("pg-socket").display(),
        ),
        0o600,
    );
    let mut probe = if is_root() {
        let mut p = std::process::Command::new("runuser");
        p.args(["-u", "postgres", "--", "pgbackrest"]);
        p
    } else {
        std::process::Command::new("pgbackrest")
    };
    probe
        .arg(format!("--config={}", conf.display()))
        .args(["--stanza=test-cluster", "check"])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_on_a_standby_through_the_primarys_server_restores() {
    if std::process::Command::new("pgbackrest")
        .arg("version")
        .output()
        .is_err()
    {
        panic!("pgbackrest is not installed (scripts/ensure-deps.sh installs it)");
    }
    let started = Instant::now();
    let pg_ctl = meridian_node::pg::PgBinaries::detect()
        .await
        .expect("PostgreSQL binaries")
        .tool("pg_ctl");
    let root = tempfile::Builder::new()
        .prefix("meridian-standby-backup-")
        .tempdir()
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let repo = root.path().join("repo");
    let certs = root.path().join("certs");
    for d in [&repo, &certs] {
        std::fs::create_dir_all(d).unwrap();
        chown_to_postgres(d);
    }
    let ca = new_ca("pgbackrest test CA");
    let ca_file = certs.join("ca.pem");
    write_private(&ca_file, &ca.pem(), 0o644);
    let server_ports = free_ports(2).unwrap();
    let mut sections = std::collections::BTreeMap::new();
    for (i, name) in ["a1", "b1"].iter().enumerate() {
        let (sc, sk) = issue(
            &certs,
            &ca,
            name,
            &format!("{name}-server"),
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (cc, ck) = issue(
            &certs,
            &ca,
            name,
            &format!("{name}-client"),
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        sections.insert(
            name.to_string(),
            format!(
                "[backup]\nrepo_path = \"{}\"\narchive_mode = \"on\"\nretention_full = 2\n\
                 command_timeout = \"60s\"\nbackup_timeout = \"5m\"\n\
                 server_port = {}\nserver_address = \"127.0.0.1\"\n\
                 server_cert_file = \"{}\"\nserver_key_file = \"{}\"\ntls_ca_file = \"{}\"\n\
                 client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                repo.display(),
                server_ports[i],
                sc.display(),
                sk.display(),
                ca_file.display(),
                cc.display(),
                ck.display()
            ),
        );
    }
    let hook: meridian_tests::agents::ConfigHook = Arc::new(move |ctx| {
        Ok(ConfigExtra {
            sections: sections.get(&ctx.spec.name).cloned().unwrap_or_default(),
            ..ConfigExtra::default()
        })
    });
    let mut c = AgentCluster::build_with(
        vec![
            MemberSpec::data("a1", "a").bootstrap(),
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
    for m in ["b1", "w1"] {
        c.start(m).unwrap();
    }
    wait_for("b1 streaming from a1", FORM, || async {
        let s = c.status().await.ok()?;
        s.members
            .iter()
            .find(|m| m.name == "b1")
            .and_then(|m| m.observation.as_ref())
            .and_then(|o| o.postgres.as_ref())
            .is_some_and(|p| {
                p.up && p.in_recovery && p.wal_receiver() == WalReceiverStatus::Streaming
            })
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!("formed in {} ms", started.elapsed().as_millis());
    let a1 = c.member("a1").pg_conninfo();
    query(
        &a1,
        "CREATE TABLE kept AS SELECT generate_series(1, 777) AS id",
    )
    .await
    .unwrap();

    // The default takes the backup on the streaming standby, through a1's server.
    let r = ctl_ok(&c, &["backup", "--type", "full", "--json"]).await;
    let v = r.json();
    assert_eq!(v["member"], "b1", "the backup ran on the standby: {r:#?}");
    let label = v["label"].as_str().unwrap().to_string();
    assert!(label.ends_with('F'), "{r:#?}");
    eprintln!("standby backup at {} ms", started.elapsed().as_millis());
    let r = ctl_ok(
        &c,
        &["backup", "--from", "standby", "--type", "incr", "--json"],
    )
    .await;
    assert_eq!(r.json()["member"], "b1", "{r:#?}");
    let list = ctl_ok(&c, &["backup", "list", "--json"]).await.json();
    let labels: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["label"].as_str())
        .collect();
    assert_eq!(labels.len(), 2, "{list}");
    assert_eq!(labels[0], label, "{list}");
    let r = ctl(&c, &["backup", "check", "--json"]).await;
    assert_eq!(r.code, Some(0), "backup check: {r:#?}\n{}", c.logs());
    let history = ctl_ok(&c, &["history", "--all", "--json"]).await.stdout;
    assert!(
        history.contains(&format!("full backup {label} taken on b1 (a standby)")),
        "{history}"
    );

    // What the standby backed up restores, in a separate directory.
    let target_dir = root.path().join("restored");
    let port = free_ports(1).unwrap()[0].to_string();
    let r = ctl(
        &c,
        &[
            "restore",
            "--to",
            "latest",
            "--target-dir",
            &target_dir.display().to_string(),
            "--port",
            &port,
            "--member",
            "b1",
            "--json",
        ],
    )
    .await;
    let _restored = Standalone {
        data_dir: target_dir.clone(),
        pg_ctl: pg_ctl.clone(),
    };
    assert_eq!(r.code, Some(0), "restore: {r:#?}\n{}", c.logs());
    let restored = format!(
        "host=127.0.0.1 port={port} user=postgres password={} dbname=postgres connect_timeout=2",
        meridian_tests::agents::SUPERUSER_PASSWORD
    );
    assert_eq!(
        query(&restored, "SELECT count(*)::text FROM kept")
            .await
            .unwrap(),
        "777"
    );
    drop(_restored);

    // a1's server serves a member's genuine client certificate (the control: the same
    // check through the same server succeeds), and nothing to the same name signed by
    // another CA.
    let probe_dir = root.path().join("probe");
    std::fs::create_dir_all(&probe_dir).unwrap();
    chown_to_postgres(&probe_dir);
    let genuine = (certs.join("b1-client.pem"), certs.join("b1-client.key"));
    let out = check_through_server(&c, &probe_dir, server_ports[0], &ca_file, &genuine);
    assert!(
        out.status.success(),
        "pgbackrest check through a1's server with b1's certificate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rogue = new_ca("rogue CA");
    let rogue_cert = issue(
        &probe_dir,
        &rogue,
        "b1",
        "rogue-b1-client",
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let out = check_through_server(&c, &probe_dir, server_ports[0], &ca_file, &rogue_cert);
    assert!(
        !out.status.success(),
        "a client certificate of another CA was served: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!(
        "rogue client refused: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .chain(String::from_utf8_lossy(&out.stdout).lines())
            .find(|l| l.contains("ERROR"))
            .unwrap_or("(no error line)")
    );
    eprintln!("done in {} ms", started.elapsed().as_millis());
}
