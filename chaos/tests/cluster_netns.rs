//! The chaos cluster on separate hosts (`--hosts netns`): one network namespace per
//! member, address books with the members' own addresses (no proxy on member links), a
//! member cut off by packet filters loses the Raft leadership to the majority, latency
//! injection is refused, and dropping the cluster removes every namespace and link.
//! Root only: without root each test prints "skipped: needs root" and passes.
//!
//! Needs the agent binary: `cargo build -p meridian-node` first.

use std::time::Duration;

use meridian_chaos::cluster::{AgentTiming, Cluster, ClusterOptions, HostsMode};
use meridian_chaos::netns;
use meridian_chaos::runner::{run_scenario, PolicyChoice, RunOptions};
use meridian_chaos::schedule::Scenario;
use meridian_chaos::wait::wait_for;
use meridian_node::pg::pid_alive;

fn root_or_skip() -> bool {
    match netns::check_available() {
        Ok(_) => true,
        Err(e) => {
            println!("skipped: needs root ({e})");
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_their_own_hosts_form_raft_and_a_cut_off_leader_is_replaced() {
    if !root_or_skip() {
        return;
    }
    let mut c = Cluster::start(ClusterOptions {
        topology: "a:1,b:w1,c:w1".parse().unwrap(),
        timing: AgentTiming {
            heartbeat: Some("100ms".into()),
            election_timeout_min: Some("500ms".into()),
            election_timeout_max: Some("1000ms".into()),
            observe_interval: Some("200ms".into()),
            ..AgentTiming::default()
        },
        hosts: HostsMode::Netns,
        seed: 5,
        ..ClusterOptions::default()
    })
    .await
    .expect("start the cluster on hosts");
    assert_eq!(c.hosts_mode(), HostsMode::Netns);
    let dir = c.dir().to_path_buf();
    let h = c.netns().expect("hosts");
    let namespaces: Vec<String> = h.hosts().iter().map(|x| x.netns.clone()).collect();
    let links = h.links();
    // Address books: every peer at its host's own address, no proxy, no loopback.
    let names: Vec<String> = c.members().map(|m| m.name.clone()).collect();
    for m in c.members() {
        assert!(!m.addr.is_loopback());
        assert_eq!(m.addr, h.addr(&m.name).unwrap());
        let config = std::fs::read_to_string(&m.config_path).unwrap();
        assert!(!config.contains("127.0.0.1"), "{config}");
        for p in c.members() {
            assert!(
                config.contains(&format!("api = \"{}\"", p.grpc)),
                "{config}"
            );
        }
        assert!(h.pids(&m.name).unwrap().contains(&m.agent_pid().unwrap()));
    }
    assert_eq!(c.mesh.links().count(), 0, "no proxy in netns mode");

    let s = c
        .wait_raft_formed(Duration::from_secs(60))
        .await
        .expect("raft group formed across hosts");
    let leader = s.leader().unwrap().to_string();
    let term = s.raw.term;
    assert!(c.latency_spike(10.0, Duration::ZERO).is_err());

    // Cut the leader off: a majority member leads in a newer term.
    assert_eq!(c.isolate_member(&leader).unwrap(), 4);
    let others: Vec<String> = names.iter().filter(|n| **n != leader).cloned().collect();
    let new_leader = wait_for("a leader among the others", Duration::from_secs(30), || {
        let c = &c;
        let others = others.clone();
        let leader = leader.clone();
        async move {
            for n in &others {
                if let Ok(s) = c.status_of(n, false).await {
                    if s.from_leader && s.leader != leader && s.term > term {
                        return Some(s.leader);
                    }
                }
            }
            None
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails(20)));
    assert!(others.contains(&new_leader));

    // Heal: everyone under one fresh leader again.
    c.heal_all().unwrap();
    assert!(c.netns().unwrap().cuts().is_empty());
    c.wait_raft_formed(Duration::from_secs(30))
        .await
        .expect("formed again after the heal");
    // The cut-off leader (which never stepped down by itself) is in a newer term (as a
    // follower, or elected again).
    wait_for(
        &format!("{leader} to follow a newer term"),
        Duration::from_secs(30),
        || async {
            let old = c.status_of(&leader, true).await.ok()?;
            (!old.leader.is_empty() && old.term > term).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.log_tails(20)));

    let pids: Vec<i32> = c.members().filter_map(|m| m.agent_pid()).collect();
    c.shutdown();
    drop(c);
    for p in pids {
        assert!(!pid_alive(p), "agent {p} survived the drop");
    }
    assert!(!dir.exists(), "run dir left behind");
    for ns in &namespaces {
        assert!(
            !std::path::Path::new("/run/netns").join(ns).exists(),
            "{ns} left behind"
        );
    }
    for l in &links {
        let out = std::process::Command::new("ip")
            .args(["link", "show", "dev", l])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{l} left behind");
    }
}

#[tokio::test]
async fn latency_spike_is_refused_on_separate_hosts() {
    let mut opts = RunOptions::new(Scenario::LatencySpike, 1, PolicyChoice::Default);
    opts.cluster.hosts = HostsMode::Netns;
    // Refused before anything starts (so also without root).
    let e = run_scenario(&opts).await.unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("--hosts loopback"), "{msg}");
}
