//! A primary whose agent dies (or freezes) while its Postgres keeps running must NOT be
//! replaced: the other members still see that Postgres take writes, and promoting another
//! member would make two writers. Real agents and real Postgres on 127.0.0.1; needs
//! `cargo build -p meridian-node` first.

use std::time::Duration;

use meridian_proto::WalReceiverStatus;
use meridian_tests::agents::{AgentCluster, MemberSpec};
use meridian_tests::wait_for;
use tokio_postgres::NoTls;

const FORM: Duration = Duration::from_secs(90);
const SQL: Duration = Duration::from_secs(5);

async fn exec(conninfo: &str, sql: &str) -> Result<(), String> {
    let (client, conn) = tokio::time::timeout(SQL, tokio_postgres::connect(conninfo, NoTls))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tokio::time::timeout(SQL, client.batch_execute(sql))
        .await
        .map_err(|_| "statement timed out".to_string())?
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_only_the_primarys_agent_promotes_nobody() {
    let mut c = AgentCluster::with_postgres(
        vec![
            MemberSpec::data("a1", "a").bootstrap(),
            MemberSpec::data("a2", "a").join("a1"),
            MemberSpec::data("b1", "b").join("a1"),
            MemberSpec::witness("w1", "c").join("a1"),
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
    for m in ["a2", "b1", "w1"] {
        c.start(m).unwrap();
    }
    wait_for("a2 and b1 streaming from a1", FORM, || async {
        let s = c.status().await.ok()?;
        let ok = ["a2", "b1"].iter().all(|n| {
            s.members
                .iter()
                .find(|m| m.name == *n)
                .and_then(|m| m.observation.as_ref())
                .and_then(|o| o.postgres.as_ref())
                .is_some_and(|p| p.wal_receiver() == WalReceiverStatus::Streaming)
        });
        ok.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let a1_pg = c.member("a1").pg_conninfo();
    exec(&a1_pg, "CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .unwrap();

    // The agent dies; its Postgres does not.
    c.kill("a1").unwrap();
    // Several lease lifetimes (2 s in the fixture) pass: a promotion would have happened.
    let mut id = 0;
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        id += 1;
        exec(&a1_pg, &format!("INSERT INTO t VALUES ({id})"))
            .await
            .unwrap_or_else(|e| panic!("a1's Postgres stopped taking writes: {e}\n{}", c.logs()));
        let s = c.status().await;
        if let Ok(s) = s {
            assert_eq!(
                (s.primary.as_str(), s.generation),
                ("a1", 1),
                "a member was promoted while a1's Postgres still took writes\n{}",
                c.logs()
            );
        }
    }

    // The agent comes back and carries on as the primary of the same generation.
    c.start("a1").unwrap();
    wait_for("a1 reporting again as the primary", FORM, || async {
        let s = c.status().await.ok()?;
        let fresh = s
            .members
            .iter()
            .find(|m| m.name == "a1")
            .is_some_and(|m| m.observation.is_some() && m.observation_age_ms < 2_000);
        (s.primary == "a1" && s.generation == 1 && fresh).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    exec(&a1_pg, "INSERT INTO t VALUES (1000)").await.unwrap();
}
