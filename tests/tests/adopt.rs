//! Adopting an existing database: the bootstrap member's agent takes over a plain,
//! running Postgres made by hand (rows present before and after, no initdb: the system
//! identifier is unchanged), restarts it under its own settings, creates Meridian's roles
//! and records the system identifier in the intent; a fresh member clones from it as the
//! replication role with a passfile (no password in `postgresql.auto.conf`); a member
//! whose data dir holds another cluster is refused with both identifiers named, and its
//! data dir is left exactly as it was. Needs `cargo build -p meridian-node` first.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use meridian_chaos::pg_cluster::PlainPostgres;
use meridian_node::pg::{PgBinaries, PgInstance, RunAs, DEFAULT_OS_USER};
use meridian_node::raft::intent::Intent;
use meridian_tests::agents::{AgentCluster, MemberSpec};
use meridian_tests::{wait_for, wait_until};
use tokio_postgres::NoTls;

/// Bound on the adoption (restart under Meridian, roles, bootstrap promotion).
const FORM: Duration = Duration::from_secs(60);
/// Bound on one SQL step.
const SQL: Duration = Duration::from_secs(5);

fn intent(c: &meridian_proto::StatusResponse) -> Intent {
    serde_json::from_str(&c.intent_json).expect("intent_json decodes")
}

/// A superuser session over the agent-managed socket (peer through Meridian's ident map:
/// the test runs as the agent's OS user).
async fn socket_client(socket_dir: &Path, port: u16) -> Result<tokio_postgres::Client, String> {
    let mut c = tokio_postgres::Config::new();
    c.host_path(socket_dir)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(SQL);
    let (client, conn) = tokio::time::timeout(SQL, c.connect(NoTls))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(client)
}

async fn system_identifier(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Names, sizes and modification times of everything in `dir`, recursively.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            out.insert(
                e.path().strip_prefix(dir).unwrap().display().to_string(),
                (meta.len(), meta.modified().unwrap()),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_postgres_is_adopted_and_a_foreign_data_dir_is_refused() {
    let mut c = AgentCluster::with_postgres(
        vec![
            MemberSpec::data("a1", "a").bootstrap(),
            MemberSpec::data("a2", "a").join("a1"),
            MemberSpec::data("a3", "a").join("a1"),
            MemberSpec::data("a4", "a").join("a1"),
        ],
        None,
    )
    .unwrap();
    let (a1_data, a1_port, a1_state) = {
        let m = c.member("a1");
        (m.pg_data_dir(), m.pg_port, m.state_dir.clone())
    };

    // The DBA's database: a plain server with rows, running before Meridian arrives.
    let plain = PlainPostgres::init(&a1_data, &c.dir().join("dba-socket"), a1_port)
        .await
        .unwrap();
    plain.start().await.unwrap();
    let dba = plain.client().await.unwrap();
    dba.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text); \
         INSERT INTO accounts SELECT g, 'owner ' || g FROM generate_series(1, 100) g",
    )
    .await
    .unwrap();
    let sysid = system_identifier(&dba).await;
    let pid_before = plain.postmaster_pid().expect("the plain server runs");
    // ... and its own streaming standby, in a2's data dir.
    let (a2_data, a2_port) = {
        let m = c.member("a2");
        (m.pg_data_dir(), m.pg_port)
    };
    let dba_standby = plain
        .clone_standby(&a2_data, &c.dir().join("dba-standby-socket"), a2_port)
        .await
        .unwrap();
    dba_standby.start().await.unwrap();
    wait_until("the DBA's standby streams", FORM, || async {
        dba.query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) == 1)
        .unwrap_or(false)
    })
    .await
    .unwrap();
    drop(dba);
    assert!(!std::fs::read_to_string(a1_data.join("postgresql.conf"))
        .unwrap()
        .contains("meridian.conf"));

    c.start("a1").unwrap();
    let s = wait_for(
        "a1 primary of generation 1 with the system identifier",
        FORM,
        || async {
            let s = c.status().await.ok()?;
            (s.primary == "a1" && s.generation == 1 && intent(&s).system_identifier.is_some())
                .then_some(s)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(intent(&s).system_identifier, Some(sysid as u64));
    let log = c.member("a1").log();
    assert!(
        log.contains("adopting an existing Postgres data directory"),
        "{log}"
    );
    assert!(!log.contains("initializing a new cluster"), "{log}");

    // Restarted under the agent: Meridian's settings apply, the data and identity stay.
    let socket = a1_state.join("pg-socket");
    let client = wait_for("a session on Meridian's socket", FORM, || async {
        socket_client(&socket, a1_port).await.ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let pid_after = c.member("a1").postmaster_pid().expect("a1's postmaster");
    assert_ne!(
        pid_before, pid_after,
        "the adopted server was restarted under the agent"
    );
    assert_eq!(system_identifier(&client).await, sysid, "no initdb");
    let n: i64 = client
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
    let name: String = client
        .query_one("SHOW cluster_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "a1");
    let keep: String = client
        .query_one("SHOW max_slot_wal_keep_size", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(keep, "1GB");
    // The DBA's own settings are kept (the include line comes last, appended once).
    let conf = std::fs::read_to_string(a1_data.join("postgresql.conf")).unwrap();
    assert!(conf.contains("# the DBA's own settings"), "{conf}");
    assert_eq!(
        conf.matches("include_if_exists = 'meridian.conf'").count(),
        1
    );
    // Meridian's roles, none of them a superuser.
    let roles = client
        .query(
            "SELECT rolname::text, rolsuper, rolreplication, rolcanlogin, \
             pg_has_role(oid, 'pg_monitor', 'member') FROM pg_roles \
             WHERE rolname IN ('replicator', 'rewinder', 'meridian_monitor') ORDER BY rolname",
            &[],
        )
        .await
        .unwrap();
    let roles: Vec<(String, bool, bool, bool, bool)> = roles
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        roles,
        vec![
            ("meridian_monitor".into(), false, false, true, true),
            ("replicator".into(), false, true, true, false),
            ("rewinder".into(), false, false, true, false),
        ]
    );
    // Rows written through the agent-managed server survive too.
    client
        .execute("INSERT INTO accounts VALUES (101, 'after adoption')", &[])
        .await
        .unwrap();

    // A fresh member clones from the adopted primary as the replication role, through a
    // passfile: no password in its postgresql.auto.conf.
    c.start("a3").unwrap();
    let a3_socket = c.member("a3").state_dir.join("pg-socket");
    let a3_port = c.member("a3").pg_port;
    wait_until("a3 has row 101", FORM, || async {
        match socket_client(&a3_socket, a3_port).await {
            Ok(s) => s
                .query_opt("SELECT 1 FROM accounts WHERE id = 101", &[])
                .await
                .ok()
                .flatten()
                .is_some(),
            Err(_) => false,
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let auto =
        std::fs::read_to_string(c.member("a3").pg_data_dir().join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("user=replicator"), "{auto}");
    assert!(auto.contains("passfile="), "{auto}");
    assert!(!auto.contains("password"), "{auto}");
    assert!(!auto.contains("test-replication-pw"), "{auto}");
    wait_until(
        "a3 streams from a1 as the replication role",
        FORM,
        || async {
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE usename = 'replicator' \
                 AND application_name = 'a3' AND state = 'streaming'",
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // Over TLS: the standby streams encrypted, its conninfo verifies the server fully.
    let ssl: bool = client
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid) \
             WHERE r.application_name = 'a3'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "a3 streams without TLS");
    assert!(auto.contains("sslmode=verify-full"), "{auto}");
    // a3's probes of a1 log in as the monitor role over TLS (rustls, verify-full).
    wait_until("a3's peer probe session on a1 over TLS", FORM, || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.usename = 'meridian_monitor' \
                 AND a.application_name = 'meridian-peer-probe' AND s.ssl",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    // The DBA's standby joins as a2 without a re-clone: same data dir, same identity,
    // streaming from the adopted primary as the replication role.
    c.start("a2").unwrap();
    wait_until(
        "a2 streams from a1 as the replication role",
        FORM,
        || async {
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE usename = 'replicator' \
                 AND application_name = 'a2' AND state = 'streaming'",
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let a2_log = c.member("a2").log();
    assert!(!a2_log.contains("cloning from"), "{a2_log}");
    assert!(!a2_log.contains("rewinding from"), "{a2_log}");
    let a2_client = socket_client(&c.member("a2").state_dir.join("pg-socket"), a2_port)
        .await
        .unwrap();
    assert_eq!(system_identifier(&a2_client).await, sysid);
    let n: i64 = a2_client
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n >= 100, "{n}");

    // a4's data dir holds another cluster: refused, both identifiers named, untouched.
    let (a4_data, a4_port) = {
        let m = c.member("a4");
        (m.pg_data_dir(), m.pg_port)
    };
    let foreign = PlainPostgres::init(&a4_data, &c.dir().join("foreign-socket"), a4_port)
        .await
        .unwrap();
    let foreign_id = PgInstance::new(
        PgBinaries::detect().await.unwrap(),
        a4_data.clone(),
        a4_port,
        "a4",
        RunAs::resolve(DEFAULT_OS_USER).unwrap(),
    )
    .system_identifier()
    .await
    .unwrap();
    assert_ne!(foreign_id, sysid as u64);
    let before = snapshot(&a4_data);
    c.start("a4").unwrap();
    let want = [
        "holds another Postgres cluster".to_string(),
        foreign_id.to_string(),
        sysid.to_string(),
        a4_data.display().to_string(),
    ];
    wait_until("a4 refuses its data dir", FORM, || async {
        let log = c.member("a4").log();
        want.iter().all(|w| log.contains(w.as_str()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    // Give it a few more rounds to do something wrong.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(snapshot(&a4_data), before, "a4's data dir was changed");
    assert!(
        foreign.postmaster_pid().is_none(),
        "nothing started the foreign cluster"
    );
    let siblings: Vec<String> = std::fs::read_dir(a4_data.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pgdata."))
        .collect();
    assert!(siblings.is_empty(), "moved aside: {siblings:?}");
    let s = c.status().await.unwrap();
    assert_eq!(s.primary, "a1");
    assert_eq!(intent(&s).system_identifier, Some(sysid as u64));
    drop(dba_standby);
    drop(plain);
}
