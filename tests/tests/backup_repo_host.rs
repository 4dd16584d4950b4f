//! A dedicated pgBackRest repository host (issue 13), with real pgBackRest, Postgres and
//! agents on 127.0.0.1: the test runs the repository host's `pgbackrest server`; the
//! members archive to it over TLS (`backup.repo_host`), `backup check` and `backup list`
//! read it, and a backup taken *on* the repository host pulls the primary's files through
//! the primary's Meridian-managed `pgbackrest server`, which serves the repository host's
//! certificate because `server_clients` names it. `meridianctl backup` on a member is
//! refused by pgBackRest 2.45 and says where backups run instead.
//! Needs `cargo build -p meridian-node -p meridianctl` and pgbackrest on PATH.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_proto::WalReceiverStatus;
use meridian_tests::agents::{AgentCluster, ClusterSetup, ConfigExtra, MemberSpec};
use meridian_tests::ctl::{run_ctl_env, CtlRun};
use meridian_tests::pgbr::{
    chown_to_postgres, issue, new_ca, pgbackrest, write_private, TestServer,
};
use meridian_tests::{free_ports, wait_for};

const FORM: Duration = Duration::from_secs(120);
const TOKEN: &str = "repo-host-token";
const STANZA: &str = "test-cluster";

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

/// The `pgN-*` lines that reach `name`'s Postgres through its pgbackrest server.
fn pg_host_lines(
    c: &AgentCluster,
    n: usize,
    name: &str,
    server_port: u16,
    ca: &Path,
    cert: &(std::path::PathBuf, std::path::PathBuf),
) -> String {
    let m = c.member(name);
    format!(
        "pg{n}-host=127.0.0.1\npg{n}-host-type=tls\npg{n}-host-port={server_port}\n\
         pg{n}-host-ca-file={}\npg{n}-host-cert-file={}\npg{n}-host-key-file={}\n\
         pg{n}-host-config={}\npg{n}-path={}\npg{n}-port={}\npg{n}-socket-path={}\n\
         pg{n}-user=postgres\n",
        ca.display(),
        cert.0.display(),
        cert.1.display(),
        m.state_dir
            .join("pgbackrest")
            .join("pgbackrest.conf")
            .display(),
        m.pg_data_dir().display(),
        m.pg_port,
        m.state_dir.join("pg-socket").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_archive_to_a_repository_host_which_pulls_backups_through_their_servers() {
    if std::process::Command::new("pgbackrest")
        .arg("version")
        .output()
        .is_err()
    {
        panic!("pgbackrest is not installed (scripts/ensure-deps.sh installs it)");
    }
    let started = Instant::now();
    let root = tempfile::Builder::new()
        .prefix("meridian-repo-host-")
        .tempdir()
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let repo = root.path().join("repo");
    let certs = root.path().join("certs");
    let host_dir = root.path().join("repo-host");
    for d in [&repo, &certs, &host_dir] {
        std::fs::create_dir_all(d).unwrap();
        chown_to_postgres(d);
    }
    let ca = new_ca("pgbackrest test CA");
    let ca_file = certs.join("ca.pem");
    write_private(&ca_file, &ca.pem(), 0o644);
    let ports = free_ports(3).unwrap();
    let (repo_host_port, member_ports) = (ports[0], [ports[1], ports[2]]);
    let host_server = issue(
        &certs,
        &ca,
        "backup-host",
        "repo-host-server",
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let host_client = issue(
        &certs,
        &ca,
        "backup-host",
        "repo-host-client",
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
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
                "[backup]\nrepo_path = \"{repo}\"\nrepo_host = \"127.0.0.1\"\n\
                 repo_host_port = {repo_host_port}\nrepo_host_ca_file = \"{ca}\"\n\
                 repo_host_cert_file = \"{cc}\"\nrepo_host_key_file = \"{ck}\"\n\
                 archive_mode = \"on\"\ncommand_timeout = \"60s\"\nbackup_timeout = \"5m\"\n\
                 server_port = {port}\nserver_address = \"127.0.0.1\"\n\
                 server_cert_file = \"{sc}\"\nserver_key_file = \"{sk}\"\ntls_ca_file = \"{ca}\"\n\
                 client_cert_file = \"{cc}\"\nclient_key_file = \"{ck}\"\n\
                 server_clients = [\"backup-host\"]\n",
                repo = repo.display(),
                ca = ca_file.display(),
                cc = cc.display(),
                ck = ck.display(),
                sc = sc.display(),
                sk = sk.display(),
                port = member_ports[i],
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

    // The repository host: its own config (the repository is local to it; the members are
    // remote pg hosts reached through their servers) and its server for the members.
    let host_conf = host_dir.join("pgbackrest.conf");
    write_private(
        &host_conf,
        &format!(
            "[global]\nrepo1-path={repo}\nlog-path={d}\nlock-path={d}\nlog-level-console=warn\n\
             start-fast=y\narchive-timeout=60\n\
             tls-server-address=127.0.0.1\ntls-server-port={repo_host_port}\n\
             tls-server-cert-file={sc}\ntls-server-key-file={sk}\ntls-server-ca-file={ca}\n\
             tls-server-auth=a1={STANZA}\ntls-server-auth=b1={STANZA}\n\n[{STANZA}]\n{pg1}{pg2}",
            repo = repo.display(),
            d = host_dir.display(),
            sc = host_server.0.display(),
            sk = host_server.1.display(),
            ca = ca_file.display(),
            pg1 = pg_host_lines(&c, 1, "a1", member_ports[0], &ca_file, &host_client),
            pg2 = pg_host_lines(&c, 2, "b1", member_ports[1], &ca_file, &host_client),
        ),
        0o600,
    );
    let _repo_host = TestServer::start(&host_conf).expect("starting the repository host's server");
    wait_for(
        "the repository host's server listens",
        Duration::from_secs(20),
        || async {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], repo_host_port)),
                Duration::from_millis(500),
            )
            .ok()
            .map(|_| ())
        },
    )
    .await
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
    wait_for("b1 streaming", FORM, || async {
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

    // Archiving goes through the repository host: check switches WAL and waits for it.
    let r = ctl(&c, &["backup", "check", "--json"]).await;
    assert_eq!(
        r.code,
        Some(0),
        "backup check through the repository host: {r:#?}\n{}",
        c.logs()
    );
    // pgBackRest 2.45 takes backups only on the repository host; the refusal says so.
    let r = ctl(&c, &["backup", "--from", "primary"]).await;
    eprintln!("backup on a member: exit {:?}: {}", r.code, r.stderr.trim());
    if r.code == Some(1) {
        assert!(r.stderr.contains("only on the repository host"), "{r:#?}");
    } else {
        assert_eq!(r.code, Some(0), "{r:#?}");
    }

    // A backup on the repository host pulls a1's files through a1's server.
    let out = pgbackrest()
        .arg(format!("--config={}", host_conf.display()))
        .args([&format!("--stanza={STANZA}"), "--type=full", "backup"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgbackrest backup on the repository host: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    let r = ctl(&c, &["backup", "list", "--json"]).await;
    assert_eq!(r.code, Some(0), "{r:#?}");
    let list = r.json();
    let full: Vec<&serde_json::Value> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "full")
        .collect();
    assert!(
        !full.is_empty(),
        "the repository host's backup is listed: {list}"
    );
    let r = ctl(&c, &["backup", "check", "--json"]).await;
    assert_eq!(r.code, Some(0), "{r:#?}\n{}", c.logs());
    assert_eq!(r.json()["from_backup"], true, "{r:#?}");
    eprintln!("done in {} ms", started.elapsed().as_millis());
}
