//! The Postgres control layer against real PostgreSQL: replication, promotion, rewind,
//! synchronous commit, fencing and probes. Each test brings up its own cluster.

use std::time::Duration;

use meridian_node::pg::{PgError, StopMode};
use meridian_tests::{wait_for, wait_until, PgCluster};
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(20);
const STOP: Duration = Duration::from_secs(10);

async fn create_table(c: &Client) {
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
}

async fn has_row(c: &Client, id: i32) -> bool {
    c.query_opt("SELECT 1 FROM t WHERE id = $1", &[&id])
        .await
        .map(|r| r.is_some())
        .unwrap_or(false)
}

#[tokio::test]
async fn row_inserted_on_primary_appears_on_standby() {
    let cluster = PgCluster::start(2).await.unwrap();
    let p = cluster.client(0).await.unwrap();
    create_table(&p).await;
    p.execute("INSERT INTO t VALUES (1, 'one')", &[])
        .await
        .unwrap();
    for i in 1..=2 {
        let s = cluster.client(i).await.unwrap();
        wait_until("row 1 on the standby", WAIT, || has_row(&s, 1))
            .await
            .unwrap();
        // A standby refuses writes.
        let e = s
            .execute("INSERT INTO t VALUES (2, 'x')", &[])
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
        );
    }
}

#[tokio::test]
async fn promote_raises_timeline_and_accepts_writes() {
    let cluster = PgCluster::start(1).await.unwrap();
    create_table(&cluster.client(0).await.unwrap()).await;
    let s1 = cluster.instance(1);
    let before = s1.probe().await;
    assert!(before.up && before.in_recovery, "{before:?}");
    let tl = before.timeline.expect("standby timeline");

    s1.promote(Duration::from_secs(10)).await.unwrap();

    let after = s1.probe().await;
    assert!(after.up && !after.in_recovery, "{after:?}");
    assert_eq!(after.timeline, Some(tl + 1), "{after:?}");
    assert!(after.current_lsn.is_some());
    let c = cluster.client(1).await.unwrap();
    wait_until("t replicated before promotion", WAIT, || async {
        c.execute("INSERT INTO t VALUES (10, 'on new primary')", &[])
            .await
            .is_ok()
    })
    .await
    .unwrap();
    assert!(has_row(&c, 10).await);
    // Promoting again is a no-op that still checks writability.
    s1.promote(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn old_primary_is_rewound_and_streams_from_the_new_one() {
    let cluster = PgCluster::start(1).await.unwrap();
    let (s0, s1) = (cluster.instance(0), cluster.instance(1));
    let c0 = cluster.client(0).await.unwrap();
    create_table(&c0).await;
    c0.execute("INSERT INTO t VALUES (1, 'common')", &[])
        .await
        .unwrap();
    let c1 = cluster.client(1).await.unwrap();
    wait_until("row 1 on s1", WAIT, || has_row(&c1, 1))
        .await
        .unwrap();

    s1.promote(Duration::from_secs(10)).await.unwrap();
    let new_tl = s1.probe().await.timeline.unwrap();
    // The old primary diverges: a write only it has.
    c0.execute("INSERT INTO t VALUES (2, 'diverged')", &[])
        .await
        .unwrap();
    c0.execute("CHECKPOINT", &[]).await.unwrap();
    drop(c0);
    // A crash-like stop, so the rewind has to run crash recovery first.
    s0.fence(Duration::from_secs(5)).await.unwrap();
    assert!(!s0.is_running());

    s1.create_slot("s0").await.unwrap();
    s0.rewind(s1.host(), s1.port(), Some("s0")).await.unwrap();
    assert!(s0.has_standby_signal());
    assert!(s0.is_fenced(), "the fence survives the rewind");
    s0.start(Duration::from_secs(30)).await.unwrap();

    let st = wait_for("s0 to stream from s1 on the new timeline", WAIT, || async {
        let st = s0.probe().await;
        (st.is_streaming() && st.timeline == Some(new_tl)).then_some(st)
    })
    .await
    .unwrap_or_else(|e| {
        let log = std::fs::read_to_string(s0.log_file()).unwrap_or_default();
        panic!("{e}\ns0 log:\n{log}")
    });
    let rx = st.wal_receiver.unwrap();
    assert_eq!(rx.sender_port, Some(s1.port()));
    assert_eq!(rx.slot_name.as_deref(), Some("s0"));
    cluster.wait_streaming_to(1, "s0", WAIT).await.unwrap();

    c1.execute("INSERT INTO t VALUES (3, 'after failover')", &[])
        .await
        .unwrap();
    let c0 = cluster.client(0).await.unwrap();
    wait_until("row 3 on the rewound s0", WAIT, || has_row(&c0, 3))
        .await
        .unwrap();
    assert!(!has_row(&c0, 2).await, "the diverged row was rewound away");
    assert!(has_row(&c0, 1).await);
}

#[tokio::test]
async fn sync_commit_waits_for_the_sync_standby() {
    let cluster = PgCluster::builder()
        .standbys(1)
        .synchronous_standby_names("ANY 1 (s1)")
        .start()
        .await
        .unwrap();
    let c0 = cluster.client(0).await.unwrap();
    create_table(&c0).await;
    wait_until("s1 to be a quorum standby", WAIT, || async {
        cluster
            .primary()
            .probe()
            .await
            .standby("s1")
            .is_some_and(|s| s.sync_state == "quorum")
    })
    .await
    .unwrap();

    let s1 = cluster.instance(1);
    s1.stop(StopMode::Fast, STOP).await.unwrap();
    let mut commit =
        tokio::spawn(async move { c0.execute("INSERT INTO t VALUES (1, 'sync')", &[]).await });
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut commit)
            .await
            .is_err(),
        "the commit completed without its sync standby"
    );

    s1.start(Duration::from_secs(30)).await.unwrap();
    tokio::time::timeout(WAIT, commit)
        .await
        .expect("the commit completes once s1 is back")
        .unwrap()
        .unwrap();
    let c1 = cluster.client(1).await.unwrap();
    assert!(
        has_row(&c1, 1).await,
        "a sync commit is on the sync standby"
    );
}

#[tokio::test]
async fn fenced_primary_refuses_commits() {
    let cluster = PgCluster::start(0).await.unwrap();
    let p = cluster.primary();
    create_table(&cluster.client(0).await.unwrap()).await;

    p.fence(Duration::from_secs(5)).await.unwrap();
    assert!(p.is_fenced() && !p.is_running());
    // Down: a fresh session cannot even connect, so it cannot commit.
    let write = async {
        let c = p.connect().await?;
        c.batch_execute("SET default_transaction_read_only = off; INSERT INTO t VALUES (1, 'x')")
            .await
            .map_err(|e| PgError::Sql {
                step: "write",
                source: e,
            })
    };
    assert!(write.await.is_err(), "a fenced primary accepted a commit");
    // Nothing restarts it as a primary by accident.
    assert!(matches!(
        p.start(Duration::from_secs(10)).await,
        Err(PgError::Fenced { .. })
    ));
    assert!(matches!(
        p.promote(Duration::from_secs(1)).await,
        Err(PgError::Fenced { .. })
    ));

    // Restarted as a standby it serves reads but refuses writes for real.
    p.restart_as_standby(Duration::from_secs(30)).await.unwrap();
    let c = p.connect().await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let e = c
        .batch_execute("SET default_transaction_read_only = off; INSERT INTO t VALUES (1, 'x')")
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{e}"
    );
    let st = p.probe().await;
    assert!(st.up && st.in_recovery, "{st:?}");
}

#[tokio::test]
async fn fence_kills_a_frozen_postmaster_and_its_sessions() {
    let cluster = PgCluster::start(0).await.unwrap();
    let p = cluster.primary();
    let c = cluster.client(0).await.unwrap();
    create_table(&c).await;
    let pid = p.postmaster_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    // A backend of a frozen postmaster still commits: exactly what fencing must stop.
    c.execute("INSERT INTO t VALUES (1, 'while frozen')", &[])
        .await
        .unwrap();

    // A frozen server cannot answer: the probe gives up within its bound.
    let started = std::time::Instant::now();
    let st = p.probe().await;
    assert!(!st.up, "{st:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    let started = std::time::Instant::now();
    p.fence(Duration::from_secs(3)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!p.is_running() && p.is_fenced());
    let after = tokio::time::timeout(
        Duration::from_secs(5),
        c.execute("INSERT INTO t VALUES (2, 'after fence')", &[]),
    )
    .await
    .expect("the old session answers or fails quickly");
    assert!(after.is_err(), "an old session committed after the fence");
}

#[tokio::test]
async fn probes_report_lsns_and_lag() {
    let cluster = PgCluster::start(1).await.unwrap();
    let (s0, s1) = (cluster.instance(0), cluster.instance(1));
    let c0 = cluster.client(0).await.unwrap();
    create_table(&c0).await;

    let p = s0.probe().await;
    assert!(p.up && !p.in_recovery && p.received_lsn.is_none(), "{p:?}");
    let s = s1.probe().await;
    assert!(s.up && s.in_recovery && s.current_lsn.is_none(), "{s:?}");
    // The primary's position read after the standby's: WAL written between the two probes
    // (background records) may already be replayed by the time the standby is asked.
    let p_after = s0.probe().await;
    assert!(p_after.current_lsn.unwrap() >= s.replayed_lsn.unwrap());
    assert!(s.received_lsn.unwrap() >= s.replayed_lsn.unwrap());
    let rx = s.wal_receiver.clone().unwrap();
    assert_eq!(rx.status, "streaming");
    assert_eq!(rx.sender_port, Some(s0.port()));
    assert_eq!(rx.slot_name.as_deref(), Some("s1"));
    assert_eq!(p.timeline, s.timeline);

    // Replay paused: the standby receives but does not apply, so the primary sees lag.
    let c1 = cluster.client(1).await.unwrap();
    c1.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    c0.execute(
        "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 1000) g",
        &[],
    )
    .await
    .unwrap();
    let lagging = wait_for("lag on s1 with replay paused", WAIT, || async {
        let p = s0.probe().await;
        let sb = p.standby("s1")?.clone();
        (sb.lag_bytes? > 0 && sb.flush_lsn == p.current_lsn).then_some((p, sb))
    })
    .await
    .unwrap();
    let (p, sb) = lagging;
    assert!(sb.replay_lsn.unwrap() < p.current_lsn.unwrap());
    let s = s1.probe().await;
    assert!(s.received_lsn.unwrap() > s.replayed_lsn.unwrap(), "{s:?}");

    c1.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    wait_until("s1 to catch up to zero lag", WAIT, || async {
        let p = s0.probe().await;
        p.standby("s1").and_then(|s| s.lag_bytes) == Some(0)
    })
    .await
    .unwrap();
    let s = s1.probe().await;
    let p = s0.probe().await;
    assert!(s.replayed_lsn.unwrap() <= p.current_lsn.unwrap());
}

#[tokio::test]
async fn password_cluster_uses_scram_for_sessions_and_replication() {
    let cluster = PgCluster::builder()
        .standbys(1)
        .password("se cret'pw")
        .start()
        .await
        .unwrap();
    let c0 = cluster.client(0).await.unwrap();
    create_table(&c0).await;
    c0.execute("INSERT INTO t VALUES (1, 'x')", &[])
        .await
        .unwrap();
    let c1 = cluster.client(1).await.unwrap();
    wait_until("row 1 on s1", WAIT, || has_row(&c1, 1))
        .await
        .unwrap();
    // Without the password the server says no.
    let mut cfg = cluster.primary().client_config();
    cfg.password("wrong");
    assert!(cfg.connect(tokio_postgres::NoTls).await.is_err());
}

#[tokio::test]
async fn probe_of_a_stopped_instance_is_down_and_bounded() {
    let cluster = PgCluster::start(0).await.unwrap();
    let p = cluster.primary();
    p.stop(StopMode::Fast, STOP).await.unwrap();
    assert!(!p.is_running());
    let started = std::time::Instant::now();
    let st = p.probe().await;
    assert!(!st.up && st.error.is_some(), "{st:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Start again after a clean stop works (not fenced).
    p.start(Duration::from_secs(30)).await.unwrap();
    assert!(p.probe().await.up);
}

#[tokio::test]
async fn running_standby_is_repointed_to_the_promoted_one() {
    let cluster = PgCluster::start(2).await.unwrap();
    let (s1, s2) = (cluster.instance(1), cluster.instance(2));
    let c0 = cluster.client(0).await.unwrap();
    create_table(&c0).await;
    c0.execute("INSERT INTO t VALUES (1, 'before')", &[])
        .await
        .unwrap();
    let c2 = cluster.client(2).await.unwrap();
    wait_until("row 1 on s2", WAIT, || has_row(&c2, 1))
        .await
        .unwrap();
    // The old primary goes away first, as in a failover.
    cluster
        .primary()
        .fence(Duration::from_secs(5))
        .await
        .unwrap();

    s1.promote(Duration::from_secs(10)).await.unwrap();
    let new_tl = s1.probe().await.timeline.unwrap();
    s1.create_slot("s2").await.unwrap();
    s1.create_slot("s2").await.unwrap(); // idempotent
    s2.configure_standby(s1.host(), s1.port(), Some("s2"))
        .await
        .unwrap();
    assert!(s2.is_running(), "re-pointing needs no restart");

    wait_until("s2 to stream from s1 on the new timeline", WAIT, || async {
        let st = s2.probe().await;
        st.is_streaming()
            && st.timeline == Some(new_tl)
            && st.wal_receiver.as_ref().and_then(|w| w.sender_port) == Some(s1.port())
    })
    .await
    .unwrap();
    let c1 = cluster.client(1).await.unwrap();
    c1.execute("INSERT INTO t VALUES (2, 'after')", &[])
        .await
        .unwrap();
    wait_until("row 2 on s2", WAIT, || has_row(&c2, 2))
        .await
        .unwrap();

    // Slots: a used slot cannot be dropped; an unknown one drops as a no-op.
    s1.create_slot("spare").await.unwrap();
    s1.drop_slot("spare").await.unwrap();
    s1.drop_slot("spare").await.unwrap();
    let e = s1.drop_slot("s2").await.unwrap_err();
    // The error carries the server's own words, not just "db error".
    assert!(e.to_string().contains("is active"), "{e}");
}

#[tokio::test]
async fn restarts_after_the_postmaster_was_sigkilled() {
    // Orphaned postmasters are re-parented to this process, which never reaps them: the
    // killed postmaster stays a zombie, as it does under an init that does not reap.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let cluster = PgCluster::start(0).await.unwrap();
    let p = cluster.primary();
    let c = cluster.client(0).await.unwrap();
    create_table(&c).await;
    c.execute("INSERT INTO t VALUES (1, 'kept')", &[])
        .await
        .unwrap();
    drop(c);
    let pid = p
        .postmaster_pid()
        .expect("a running postmaster has a pid file");
    // SIGKILL the postmaster alone, as a crash would: postmaster.pid stays behind and,
    // when nobody reaps the process, names a zombie.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the postmaster to die", WAIT, || async { !p.is_running() })
        .await
        .unwrap();
    assert_eq!(
        p.postmaster_pid(),
        Some(pid),
        "the stale lock file is still there"
    );
    // Its orphaned backends notice within a moment and exit; start must then recover.
    wait_for("a restart after the crash", WAIT, || async {
        p.start(STOP).await.ok()
    })
    .await
    .unwrap();
    let c = cluster.client(0).await.unwrap();
    assert!(has_row(&c, 1).await, "the committed row survived the crash");
}
