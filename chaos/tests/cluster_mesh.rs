//! Real `meridian-node` processes behind the proxy mesh: they form one Raft group through
//! the proxies, a partitioned region goes silent on its links and its member loses contact,
//! process control works, and dropping the cluster leaves no process or file behind.
//!
//! Needs the agent binary: `cargo build -p meridian-node` first (the test fails, naming it,
//! when it is missing).

use std::time::Duration;

use meridian_chaos::cluster::{AgentTiming, Cluster, ClusterOptions};
use meridian_chaos::mesh::{Service, Source};
use meridian_chaos::wait::wait_until;
use meridian_node::pg::pid_alive;

fn fast_timing() -> AgentTiming {
    AgentTiming {
        heartbeat: Some("100ms".into()),
        election_timeout_min: Some("500ms".into()),
        election_timeout_max: Some("1000ms".into()),
        observe_interval: Some("200ms".into()),
        ..AgentTiming::default()
    }
}

/// Bytes delivered by every member link from or to `member`.
fn member_link_bytes(c: &Cluster, member: &str) -> u64 {
    c.mesh
        .stats()
        .into_iter()
        .filter(|(k, _)| k.dest == member || k.source == Source::Member(member.to_string()))
        .filter(|(k, _)| matches!(k.source, Source::Member(_)))
        .map(|(_, s)| s.bytes_to_upstream + s.bytes_to_client)
        .sum()
}

fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let i = stat.rfind(')')?;
    stat[i + 1..].trim_start().chars().next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_form_raft_through_the_mesh_and_partitions_cut_them_off() {
    let mut c = Cluster::start(ClusterOptions {
        topology: "a:1,b:w1,c:w1".parse().unwrap(),
        timing: fast_timing(),
        // Short links: the fast Raft timing (RPC timeouts near the 100 ms heartbeat) is for
        // a LAN; the real matrix is exercised by the scenarios with the default timing.
        matrix: "a:b=5,a:c=5,b:c=5".parse().unwrap(),
        seed: 3,
        ..ClusterOptions::default()
    })
    .await
    .expect("start the cluster");
    let dir = c.dir().to_path_buf();
    assert_eq!(c.members().count(), 3);

    // Every member a voter under one leader, with its observations reaching the leader.
    let s = c
        .wait_raft_formed(Duration::from_secs(60))
        .await
        .expect("raft group formed");
    let leader = s.leader().unwrap().to_string();
    let names: Vec<String> = c.members().map(|m| m.name.clone()).collect();
    for n in &names {
        assert!(
            s.member(n).is_some_and(|m| m.voter),
            "{n} is a voter: {s:?}"
        );
    }

    // The traffic between members really crosses the proxies (the address books hold only
    // proxy addresses for peers), and the leader's own links carry it.
    for n in names.iter().filter(|n| **n != leader) {
        let to_leader = c.mesh.member_addr(n, &leader, Service::Api).unwrap();
        assert_ne!(to_leader, c.member(&leader).unwrap().grpc);
        let config = std::fs::read_to_string(&c.member(n).unwrap().config_path).unwrap();
        assert!(
            config.contains(&format!("api = \"{to_leader}\"")),
            "{config}"
        );
        assert!(member_link_bytes(&c, n) > 0, "{n}'s links carried nothing");
    }

    // Partition the region of a member that does not lead.
    let victim = names
        .iter()
        .find(|n| **n != leader && c.member(n).unwrap().region != "a")
        .unwrap()
        .clone();
    let region = c.member(&victim).unwrap().region.clone();
    let others: Vec<String> = c.regions().into_iter().filter(|r| *r != region).collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    let cut = c.mesh.partition(&[region.as_str()], &others).unwrap();
    assert!(cut > 0);
    // Bytes in flight may still land within the link latency; after that, nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = member_link_bytes(&c, &victim);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        member_link_bytes(&c, &victim),
        before,
        "a partitioned member's links delivered bytes"
    );
    // The leader stops hearing from it: its observation ages past the partition.
    wait_until(
        &format!("the leader to lose contact with {victim}"),
        Duration::from_secs(15),
        || async {
            c.status().await.is_ok_and(|s| {
                s.member(&victim)
                    .is_some_and(|m| m.observation.is_none() || m.observation_age_ms > 1_500)
            })
        },
    )
    .await
    .unwrap();
    // And the victim has no fresh leader of its own.
    let local = c.status_of(&victim, true).await.unwrap();
    assert!(
        !(local.from_leader && local.quorum_ack_age_ms >= 0 && local.quorum_ack_age_ms < 1_000),
        "the partitioned member still has a fresh quorum: {local:?}"
    );

    // Heal: the victim's links carry bytes again and the leader hears from it.
    c.mesh.heal_all();
    wait_until(
        &format!("{victim} to be heard again"),
        Duration::from_secs(20),
        || async {
            c.status().await.is_ok_and(|s| {
                s.member(&victim)
                    .is_some_and(|m| m.observation.is_some() && m.observation_age_ms < 1_000)
            })
        },
    )
    .await
    .unwrap();
    assert!(member_link_bytes(&c, &victim) > before);

    // Process control: freeze and continue, kill and restart.
    let pid = c.member(&victim).unwrap().agent_pid().unwrap();
    c.stop_agent(&victim).unwrap();
    wait_until(
        "the agent to be stopped",
        Duration::from_secs(5),
        || async { proc_state(pid) == Some('T') },
    )
    .await
    .unwrap();
    assert!(!c.responsive().contains(&victim));
    c.cont_agent(&victim).unwrap();
    wait_until("the agent to run again", Duration::from_secs(5), || async {
        proc_state(pid).is_some_and(|s| s != 'T')
    })
    .await
    .unwrap();
    c.kill_agent(&victim).unwrap();
    assert!(!pid_alive(pid));
    assert!(c.member(&victim).unwrap().agent_pid().is_none());
    c.restart_member(&victim).unwrap();
    let new_pid = c.member(&victim).unwrap().agent_pid().unwrap();
    assert_ne!(new_pid, pid);
    c.wait_raft_formed(Duration::from_secs(30))
        .await
        .expect("the restarted member is back in the group");

    // Cleanup: every agent dead and the run dir gone once the cluster is dropped.
    let pids: Vec<i32> = c.members().filter_map(|m| m.agent_pid()).collect();
    assert_eq!(pids.len(), 3);
    drop(c);
    for p in pids {
        assert!(!pid_alive(p), "agent {p} survived the drop");
    }
    assert!(!dir.exists(), "{} survived the drop", dir.display());
}

#[tokio::test]
async fn a_missing_binary_dir_is_named() {
    let e = match Cluster::start(ClusterOptions {
        bin_dir: Some("/nonexistent-meridian-bin".into()),
        ..ClusterOptions::default()
    })
    .await
    {
        Ok(_) => panic!("started without a binary"),
        Err(e) => e,
    };
    assert!(
        format!("{e:#}").contains("/nonexistent-meridian-bin/meridian-node"),
        "{e:#}"
    );
}

/// The Postgres side of process control and of the workload's connection strings, with a
/// postmaster the test starts itself in a declared member's data dir (no agent runs, so
/// nothing else manages it): the region's multi-host string reaches it through the
/// proxies, SIGSTOP / SIGCONT / SIGKILL find it through its pid file, and dropping the
/// cluster kills it and removes the run dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_control_and_client_conninfo_through_the_mesh() {
    use meridian_node::pg::{PgBinaries, PgInstance, RunAs, DEFAULT_OS_USER};

    let mut c = Cluster::declare(ClusterOptions {
        topology: "a:1,b:w1".parse().unwrap(),
        matrix: "a:b=5".parse().unwrap(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let dir = c.dir().to_path_buf();
    let m = c.member("a-1").unwrap();
    let run_as = RunAs::resolve(DEFAULT_OS_USER).unwrap();
    std::fs::create_dir_all(&m.state_dir).unwrap();
    run_as.chown(&m.state_dir).unwrap();
    let pg = PgInstance::new(
        PgBinaries::detect().await.unwrap(),
        m.data_dir.clone().unwrap(),
        m.pg_port.unwrap(),
        "a-1",
        run_as,
    )
    .with_setting("shared_buffers", "'16MB'")
    .with_setting("fsync", "off");
    pg.init().await.unwrap();
    pg.start(Duration::from_secs(30)).await.unwrap();
    let pid = c
        .member("a-1")
        .unwrap()
        .postmaster_pid()
        .expect("postmaster pid");

    // Clients of region b reach a-1's Postgres through their proxy; direct works too.
    for conninfo in [
        c.client_conninfo("b").unwrap(),
        c.member("a-1").unwrap().direct_conninfo().unwrap(),
    ] {
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{conninfo}: {e}"));
        let task = tokio::spawn(conn);
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        drop(client);
        let _ = task.await;
    }
    assert!(c
        .client_conninfo("b")
        .unwrap()
        .contains("target_session_attrs=read-write"));
    let through = c
        .mesh
        .stats()
        .into_iter()
        .find(|(k, _)| k.source == Source::Clients("b".into()) && k.service == Service::Postgres)
        .unwrap()
        .1;
    assert!(through.bytes_to_upstream > 0, "{through:?}");

    // Freeze, continue, kill.
    assert!(c.stop_postgres("a-1").unwrap());
    wait_until(
        "the postmaster to be stopped",
        Duration::from_secs(5),
        || async { proc_state(pid) == Some('T') },
    )
    .await
    .unwrap();
    assert!(c.cont_postgres("a-1").unwrap());
    wait_until(
        "the postmaster to run again",
        Duration::from_secs(5),
        || async { proc_state(pid).is_some_and(|s| s != 'T') },
    )
    .await
    .unwrap();
    assert!(c.kill_postgres("a-1").unwrap());
    wait_until("the postmaster to die", Duration::from_secs(5), || async {
        !pid_alive(pid)
    })
    .await
    .unwrap();
    assert!(!c.kill_postgres("a-1").unwrap(), "nothing left to kill");

    // Started again, then frozen: dropping the cluster still kills it. Without a reaper in
    // a container the killed postmaster can linger as a zombie that Postgres's own lock
    // check takes for alive, so the stale pid file goes first.
    let pid_file = c
        .member("a-1")
        .unwrap()
        .data_dir
        .clone()
        .unwrap()
        .join("postmaster.pid");
    let _ = std::fs::remove_file(pid_file);
    pg.start(Duration::from_secs(30)).await.unwrap();
    let pid = c.member("a-1").unwrap().postmaster_pid().unwrap();
    c.stop_postgres("a-1").unwrap();
    drop(c);
    assert!(!pid_alive(pid), "postmaster {pid} survived the drop");
    assert!(!dir.exists());
}
