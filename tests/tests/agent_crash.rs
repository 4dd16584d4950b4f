//! A primary whose agent dies while its Postgres keeps running: fencing is absolute, so
//! the watchdog fences that Postgres once the lease deadline passes (whoever still probes
//! it: an observer may be cut off from the Raft leader together with it), and the cluster
//! fails over with every acknowledged commit. The returning agent rejoins as a standby.
//! Real agents and real Postgres on 127.0.0.1; needs `cargo build -p meridian-node` first.

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
        .map_err(|e| match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => e.to_string(),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primarys_agent_fences_its_postgres_and_fails_over_without_loss() {
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

    // The agent dies; its watchdog and its Postgres do not.
    c.kill("a1").unwrap();
    // Writes go on against a1's Postgres until the watchdog fences it: every one of them
    // that was acknowledged must survive the failover.
    let mut acked = Vec::new();
    let mut fenced = false;
    for id in 1..=200 {
        match exec(&a1_pg, &format!("INSERT INTO t VALUES ({id})")).await {
            Ok(()) => acked.push(id),
            Err(_) => {
                fenced = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        fenced,
        "a1's Postgres kept taking writes for 200 rounds after its agent died\n{}",
        c.logs()
    );
    let new_primary = wait_for("a new primary of a later generation", FORM, || async {
        let s = c.status().await.ok()?;
        (s.primary != "a1" && !s.primary.is_empty() && s.generation > 1).then(|| s.primary.clone())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let new_pg = c.member(&new_primary).pg_conninfo();
    wait_for("the new primary taking writes", FORM, || async {
        exec(
            &new_pg,
            "INSERT INTO t VALUES (1000) ON CONFLICT DO NOTHING",
        )
        .await
        .ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));

    let (client, conn) = tokio_postgres::connect(&new_pg, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let rows = client.query("SELECT id FROM t", &[]).await.unwrap();
    let present: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged rows missing on {new_primary}: {lost:?}\n{}",
        lost.len(),
        c.logs()
    );
    // The agent comes back and rejoins as a standby of the new primary.
    c.start("a1").unwrap();
    wait_for("a1 streaming from the new primary", FORM, || async {
        let s = c.status().await.ok()?;
        let streaming = s
            .members
            .iter()
            .find(|m| m.name == "a1")
            .and_then(|m| m.observation.as_ref())
            .and_then(|o| o.postgres.as_ref())
            .is_some_and(|p| p.wal_receiver() == WalReceiverStatus::Streaming);
        (s.primary == new_primary && streaming).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
}
