//! Cascading replication (`[member] replicatefrom`) end to end, with real agents, real
//! Postgres and the real `meridianctl` on 127.0.0.1: a1 (bootstrap, primary) and a2 in
//! region east, b1 and b2 in west, a witness w in south. b2 is tagged
//! `replicatefrom = "b1"`, b1 `nofailover` (so the failover goes to a2).
//!
//! - formed: b2's `primary_conninfo` points at b1's Postgres, b2 streams from b1 through
//!   its slot there, the primary keeps no slot for b2, and b2 is never in the sync set
//!   (on 127.0.0.1 west would be sync under `auto`);
//! - kill -9 of the primary a1 (agent and Postgres): a2 takes over, b1 follows it and b2
//!   keeps cascading from b1 — a write on a2 reaches b2;
//! - kill -9 of the upstream b1: b2 re-points to the primary a2 and a write reaches it;
//! - b1 comes back: b2 cascades from it again and a write reaches it.
//!
//! Needs the binaries built first: `cargo build -p meridian-node -p meridianctl`.

use std::time::{Duration, Instant};

use meridian_tests::agents::{AgentCluster, ClusterSetup, ConfigExtra, MemberSpec};
use meridian_tests::ctl::run_ctl;
use meridian_tests::wait_until;
use tokio_postgres::NoTls;

const FORM_PG: Duration = Duration::from_secs(90);
const CHANGE: Duration = Duration::from_secs(60);
const SQL: Duration = Duration::from_secs(5);

fn endpoints(c: &AgentCluster) -> String {
    c.running()
        .iter()
        .map(|n| format!("{n}={}", c.member(n).grpc))
        .collect::<Vec<_>>()
        .join(",")
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

/// The first column of the first row of `sql` on `member` as text, None when unreadable.
async fn one(c: &AgentCluster, member: &str, sql: &str) -> Option<String> {
    let client = pg(c, member).await?;
    let row = tokio::time::timeout(SQL, client.query_opt(sql, &[]))
        .await
        .ok()?
        .ok()??;
    row.get::<_, Option<String>>(0)
}

/// The port b2's WAL receiver streams from (`pg_stat_wal_receiver`), when it streams.
async fn streams_from_port(c: &AgentCluster, member: &str) -> Option<u16> {
    one(
        c,
        member,
        "SELECT sender_port::text FROM pg_stat_wal_receiver WHERE status = 'streaming'",
    )
    .await?
    .parse()
    .ok()
}

/// Inserts `id` on the primary `on` (bounded retries while it settles).
async fn write(c: &AgentCluster, on: &str, id: i32) {
    wait_until(&format!("row {id} written on {on}"), CHANGE, || async {
        let Some(client) = pg(c, on).await else {
            return false;
        };
        tokio::time::timeout(
            SQL,
            client.execute("INSERT INTO cascade_t VALUES ($1)", &[&id]),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}

/// Waits until `member` has replayed row `id`.
async fn has_row(c: &AgentCluster, member: &str, id: i32) {
    let sql = format!("SELECT id::text FROM cascade_t WHERE id = {id}");
    wait_until(&format!("row {id} on {member}"), CHANGE, || async {
        one(c, member, &sql).await.is_some()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}

/// `list` shows `member` streaming from `upstream`, and its WAL receiver is connected to
/// that member's Postgres.
async fn cascades(c: &AgentCluster, eps: &str, member: &str, upstream: &str) {
    let port = c.member(upstream).pg_port;
    wait_until(
        &format!("{member} streams from {upstream}"),
        CHANGE,
        || async {
            try_list(eps).await.is_some_and(|v| {
                row(&v, member)["state"] == "streaming" && row(&v, member)["upstream"] == upstream
            }) && streams_from_port(c, member).await == Some(port)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_standbys_cascade_from_their_regional_upstream_across_failovers() {
    let started = Instant::now();
    let hook = std::sync::Arc::new(|ctx: &meridian_tests::agents::ConfigContext<'_>| {
        let member_keys = match ctx.spec.name.as_str() {
            "b1" => "nofailover = true\n".to_string(),
            "b2" => "replicatefrom = \"b1\"\n".to_string(),
            _ => String::new(),
        };
        Ok(ConfigExtra {
            postgres_keys: String::new(),
            member_keys,
            sections: String::new(),
        })
    });
    let mut c = AgentCluster::build_with(
        vec![
            MemberSpec::data("a1", "east").bootstrap(),
            MemberSpec::data("a2", "east").join("a1"),
            MemberSpec::data("b1", "west").join("a1"),
            MemberSpec::data("b2", "west").join("a1"),
            MemberSpec::witness("w", "south").join("a1"),
        ],
        ClusterSetup {
            postgres: true,
            config_hook: Some(hook),
            ..ClusterSetup::default()
        },
    )
    .unwrap();
    for n in ["a1", "a2", "b1", "b2", "w"] {
        c.start(n).unwrap();
    }
    let eps = endpoints(&c);
    wait_until(
        "a1 primary, a2 and b1 streaming from it",
        FORM_PG,
        || async {
            try_list(&eps).await.is_some_and(|v| {
                v["primary"] == "a1"
                    && ["a2", "b1"].iter().all(|s| {
                        row(&v, s)["state"] == "streaming" && row(&v, s)["upstream"] == "a1"
                    })
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    cascades(&c, &eps, "b2", "b1").await;
    eprintln!("formed in {} ms", started.elapsed().as_millis());

    // primary_conninfo names b1's Postgres; b2's slot is on b1 (active), not on a1.
    let info = one(&c, "b2", "SHOW primary_conninfo").await.unwrap();
    assert!(
        info.contains(&format!("port={}", c.member("b1").pg_port)),
        "{info}"
    );
    let slot_active =
        "SELECT active::text FROM pg_replication_slots WHERE slot_name = 'meridian_b2'";
    wait_until("b2's slot on b1 in use", CHANGE, || async {
        one(&c, "b1", slot_active).await.as_deref() == Some("true")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(
        one(&c, "a1", slot_active).await,
        None,
        "a1 keeps no slot for b2"
    );
    // West is within the commit budget here: b1 may be sync, b2 never.
    wait_until("a sync set without b2", CHANGE, || async {
        try_list(&eps).await.is_some_and(|v| {
            v["sync_standbys"]
                .as_array()
                .is_some_and(|s| !s.is_empty() && !s.iter().any(|n| n == "b2"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    pg(&c, "a1")
        .await
        .unwrap()
        .batch_execute("CREATE TABLE cascade_t (id int primary key)")
        .await
        .unwrap();
    write(&c, "a1", 1).await;
    has_row(&c, "b2", 1).await;

    // ---- failover of the primary: b2 keeps cascading from b1
    c.kill("a1").unwrap();
    c.member("a1").kill_postgres();
    let eps = endpoints(&c);
    wait_until("a2 is the primary", CHANGE, || async {
        try_list(&eps)
            .await
            .is_some_and(|v| v["primary"] == "a2" && row(&v, "a2")["state"] == "running")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    write(&c, "a2", 2).await;
    cascades(&c, &eps, "b1", "a2").await;
    cascades(&c, &eps, "b2", "b1").await;
    has_row(&c, "b2", 2).await;
    eprintln!(
        "primary failover done at {} ms",
        started.elapsed().as_millis()
    );

    // ---- the upstream fails: b2 streams from the primary
    c.kill("b1").unwrap();
    c.member("b1").kill_postgres();
    let eps = endpoints(&c);
    cascades(&c, &eps, "b2", "a2").await;
    write(&c, "a2", 3).await;
    has_row(&c, "b2", 3).await;
    eprintln!(
        "upstream failover done at {} ms",
        started.elapsed().as_millis()
    );

    // ---- the upstream returns: b2 cascades from it again
    c.start("b1").unwrap();
    let eps = endpoints(&c);
    cascades(&c, &eps, "b1", "a2").await;
    cascades(&c, &eps, "b2", "b1").await;
    write(&c, "a2", 4).await;
    has_row(&c, "b2", 4).await;
    let list = try_list(&eps).await.unwrap();
    assert!(
        !list["sync_standbys"]
            .as_array()
            .is_some_and(|s| s.iter().any(|n| n == "b2")),
        "{list}"
    );
    eprintln!("done in {} ms", started.elapsed().as_millis());
}
