//! The idle-cost benchmark (`meridian-chaos idle-bench`, `scripts/bench-idle.sh`): what a
//! healthy, idle Meridian cluster costs, against the targets of issue 14.
//!
//! 1. A plain Postgres primary with two streaming standbys and no agents, measured for the
//!    window: the baseline of Postgres' own idle work (checkpointer, walwriter, walsenders).
//! 2. A Meridian cluster (default timing, 3 data members), once healthy, measured the same
//!    way: per member the CPU of its agent and watchdog processes, of its Postgres (the
//!    postmaster, its live children and the children it reaped, from `/proc/PID/stat`),
//!    new sessions per second (`pg_stat_database.sessions`), and the agent's RSS.
//! 3. Connection churn against one agent: `churn` gRPC connections (each one `Admin.Status`
//!    call) and `churn` HTTP connections (each one `GET /health`) open and close, bounded
//!    concurrency; the agent's RSS after.
//!
//! The probes' cost on a member's Postgres is its CPU minus the baseline server in the
//! same role. Every wait and the churn are bounded.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::NoTls;

use crate::cluster::{Cluster, ClusterOptions};
use crate::pg_cluster::PgCluster;

/// The targets (issue 14, item 2).
pub const MAX_AGENT_CPU_PCT: f64 = 1.0;
pub const MAX_PROBE_CPU_PCT: f64 = 0.5;
pub const MAX_NEW_SESSIONS_PER_S: f64 = 0.0;
pub const MAX_RSS_MIB: f64 = 30.0;

/// The benchmark's topology: three data members, as the comparison with Patroni.
pub const IDLE_TOPOLOGY: &str = "us-east:2,us-west:1";

/// Bound on the connection churn.
const CHURN_TIMEOUT: Duration = Duration::from_secs(300);
/// Concurrent connections during the churn, per kind.
const CHURN_CONCURRENCY: usize = 32;

#[derive(Clone, Debug)]
pub struct IdleBenchOptions {
    pub window: Duration,
    pub churn: usize,
    pub cluster: ClusterOptions,
}

/// CPU ticks of a process: its own user + system time, and (`with_children`) that of the
/// children it waited for.
fn cpu_ticks(pid: i32, with_children: bool) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let mut t = field(14)? + field(15)?;
    if with_children {
        t += field(16)? + field(17)?;
    }
    Some(t)
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Live processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

/// CPU ticks of a Postgres server: postmaster (with reaped children) plus live children.
fn postgres_ticks(postmaster: i32) -> u64 {
    let own = cpu_ticks(postmaster, true).unwrap_or(0);
    own + children_of(postmaster)
        .into_iter()
        .filter_map(|c| cpu_ticks(c, false))
        .sum::<u64>()
}

/// The agent's watchdog process (a child started with `--watchdog-of`).
fn watchdog_of(agent: i32) -> Option<i32> {
    children_of(agent).into_iter().find(|c| {
        std::fs::read(format!("/proc/{c}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).contains("--watchdog-of"))
            .unwrap_or(false)
    })
}

fn rss_mib(pid: i32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when it cannot be asked).
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

async fn pg_client(conninfo: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(conninfo, NoTls),
    )
    .await
    .context("connect: timed out")??;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn sessions(client: &tokio_postgres::Client) -> anyhow::Result<i64> {
    let row = tokio::time::timeout(
        Duration::from_secs(5),
        client.query_one(
            "SELECT coalesce(sum(sessions), 0)::bigint FROM pg_stat_database",
            &[],
        ),
    )
    .await
    .context("sessions: timed out")??;
    Ok(row.get(0))
}

/// One measured server or member over the window.
#[derive(Clone, Debug, Default)]
pub struct Measured {
    pub name: String,
    pub primary: bool,
    pub agent_cpu_pct: f64,
    pub postgres_cpu_pct: f64,
    pub sessions_per_s: f64,
    pub rss_mib: f64,
}

/// A process set to sample: postmaster and, for a member, agent and watchdog.
struct Target {
    name: String,
    primary: bool,
    postmaster: i32,
    agent: Option<i32>,
    watchdog: Option<i32>,
    client: tokio_postgres::Client,
}

async fn measure(targets: &[Target], window: Duration) -> anyhow::Result<Vec<Measured>> {
    let hz = ticks_per_second();
    let sample = |t: &Target| {
        let agent = t.agent.and_then(|p| cpu_ticks(p, false)).unwrap_or(0)
            + t.watchdog.and_then(|p| cpu_ticks(p, false)).unwrap_or(0);
        (agent, postgres_ticks(t.postmaster))
    };
    let mut before = Vec::new();
    for t in targets {
        before.push((sample(t), sessions(&t.client).await?));
    }
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let mut out = Vec::new();
    for (t, ((agent0, pg0), s0)) in targets.iter().zip(before) {
        let (agent1, pg1) = sample(t);
        let s1 = sessions(&t.client).await?;
        let secs = started.elapsed().as_secs_f64();
        let pct = |d: u64| d as f64 / hz / secs * 100.0;
        out.push(Measured {
            name: t.name.clone(),
            primary: t.primary,
            agent_cpu_pct: pct(agent1.saturating_sub(agent0)),
            postgres_cpu_pct: pct(pg1.saturating_sub(pg0)),
            sessions_per_s: (s1 - s0).max(0) as f64 / secs,
            rss_mib: t.agent.and_then(rss_mib).unwrap_or(0.0),
        });
    }
    Ok(out)
}

/// The plain Postgres baseline: a primary and two standbys, no agents.
async fn baseline(window: Duration) -> anyhow::Result<Vec<Measured>> {
    let pg = PgCluster::start(2)
        .await
        .context("start the plain Postgres cluster")?;
    for i in 1..=2 {
        pg.wait_streaming(&format!("s{i}"), Duration::from_secs(60))
            .await?;
    }
    let mut targets = Vec::new();
    for (i, inst) in pg.instances().iter().enumerate() {
        let postmaster = postmaster_of(inst.data_dir()).context("plain postmaster pid")?;
        targets.push(Target {
            name: inst.application_name().to_string(),
            primary: i == 0,
            postmaster,
            agent: None,
            watchdog: None,
            client: pg_client(&pg.conninfo(i)).await?,
        });
    }
    // Start-up work (checkpoints after initdb and clones) settles first.
    tokio::time::sleep(Duration::from_secs(5)).await;
    measure(&targets, window).await
}

fn postmaster_of(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// What the churn did.
#[derive(Clone, Debug, Default)]
pub struct Churn {
    pub grpc_ok: usize,
    pub http_ok: usize,
    pub failed: usize,
    pub took: Duration,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub fds_after: usize,
}

async fn churn(
    grpc: std::net::SocketAddr,
    http: std::net::SocketAddr,
    n: usize,
) -> (usize, usize, usize) {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let grpc_one = |_| async move {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .ok()?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        let ch = ep.connect().await.ok()?;
        let mut c = meridian_proto::admin_client::AdminClient::new(ch);
        // An answer or a refusal: either way the connection came and went.
        let _ = c
            .status(meridian_proto::StatusRequest { local: true })
            .await;
        Some(())
    };
    let http_one = |_| async move {
        let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        out.starts_with(b"HTTP/1.1").then_some(())
    };
    let g = futures::stream::iter(0..n)
        .map(grpc_one)
        .buffer_unordered(CHURN_CONCURRENCY)
        .collect::<Vec<_>>();
    let h = futures::stream::iter(0..n)
        .map(http_one)
        .buffer_unordered(CHURN_CONCURRENCY)
        .collect::<Vec<_>>();
    let (g, h) = tokio::join!(g, h);
    let grpc_ok = g.iter().filter(|r| r.is_some()).count();
    let http_ok = h.iter().filter(|r| r.is_some()).count();
    (grpc_ok, http_ok, 2 * n - grpc_ok - http_ok)
}

/// The whole benchmark's figures.
pub struct IdleBenchReport {
    pub window: Duration,
    pub baseline: Vec<Measured>,
    pub members: Vec<Measured>,
    pub churn: Churn,
}

impl IdleBenchReport {
    /// The baseline's CPU for a server in this role (the mean of the plain standbys for a
    /// standby).
    fn baseline_pct(&self, primary: bool) -> f64 {
        let same: Vec<f64> = self
            .baseline
            .iter()
            .filter(|b| b.primary == primary)
            .map(|b| b.postgres_cpu_pct)
            .collect();
        if same.is_empty() {
            0.0
        } else {
            same.iter().sum::<f64>() / same.len() as f64
        }
    }

    pub fn probe_pct(&self, m: &Measured) -> f64 {
        (m.postgres_cpu_pct - self.baseline_pct(m.primary)).max(0.0)
    }

    /// Targets missed, as sentences (empty: all met).
    pub fn misses(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in &self.members {
            if m.agent_cpu_pct > MAX_AGENT_CPU_PCT {
                out.push(format!(
                    "{}: agent + watchdog {:.2} % of a core > {MAX_AGENT_CPU_PCT} %",
                    m.name, m.agent_cpu_pct
                ));
            }
            let probe = self.probe_pct(m);
            if probe > MAX_PROBE_CPU_PCT {
                out.push(format!(
                    "{}: probes {probe:.2} % of a core on Postgres > {MAX_PROBE_CPU_PCT} %",
                    m.name
                ));
            }
            if m.sessions_per_s > MAX_NEW_SESSIONS_PER_S {
                out.push(format!(
                    "{}: {:.2} new Postgres sessions per second at idle",
                    m.name, m.sessions_per_s
                ));
            }
        }
        if self.churn.rss_after_mib > MAX_RSS_MIB {
            out.push(format!(
                "agent RSS {:.1} MiB after the churn > {MAX_RSS_MIB} MiB",
                self.churn.rss_after_mib
            ));
        }
        if self.churn.failed > 0 {
            out.push(format!("{} churn connections failed", self.churn.failed));
        }
        out
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "idle {} s; plain Postgres baseline: primary {:.2} %, standby {:.2} % of a core\n",
            self.window.as_secs(),
            self.baseline_pct(true),
            self.baseline_pct(false)
        );
        s.push_str(&format!(
            "{:<12} {:<8} {:>18} {:>14} {:>14} {:>12} {:>9}\n",
            "member", "role", "agent+watchdog %", "postgres %", "probes %", "sessions/s", "RSS MiB"
        ));
        for m in &self.members {
            s.push_str(&format!(
                "{:<12} {:<8} {:>18.2} {:>14.2} {:>14.2} {:>12.2} {:>9.1}\n",
                m.name,
                if m.primary { "primary" } else { "standby" },
                m.agent_cpu_pct,
                m.postgres_cpu_pct,
                self.probe_pct(m),
                m.sessions_per_s,
                m.rss_mib
            ));
        }
        let c = &self.churn;
        s.push_str(&format!(
            "churn: {} gRPC + {} HTTP connections in {:.1} s ({} failed); agent RSS {:.1} → {:.1} MiB, {} open fds after\n",
            c.grpc_ok,
            c.http_ok,
            c.took.as_secs_f64(),
            c.failed,
            c.rss_before_mib,
            c.rss_after_mib,
            c.fds_after
        ));
        s.push_str(&format!(
            "targets: agent + watchdog ≤ {MAX_AGENT_CPU_PCT} %, probes ≤ {MAX_PROBE_CPU_PCT} %, {MAX_NEW_SESSIONS_PER_S} new sessions/s, RSS ≤ {MAX_RSS_MIB} MiB after the churn\n"
        ));
        s
    }
}

/// Runs the benchmark (see the module doc).
pub async fn run(opts: &IdleBenchOptions) -> anyhow::Result<IdleBenchReport> {
    println!(
        "baseline: a plain primary and two standbys for {} s ...",
        opts.window.as_secs()
    );
    let base = baseline(opts.window).await?;

    let cluster_opts = opts.cluster.clone();
    println!("meridian: starting {} ...", cluster_opts.topology);
    let cluster = Cluster::start(cluster_opts)
        .await
        .context("bring up the cluster")?;
    cluster.wait_raft_formed(Duration::from_secs(90)).await?;
    let status = cluster
        .wait_converged(Duration::from_secs(180))
        .await
        .context("the cluster did not become healthy")?;
    let primary = status.primary().unwrap_or_default().to_string();
    // Start-up work (clones, slots, checkpoints) settles first.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut targets = Vec::new();
    let mut agents = BTreeMap::new();
    for name in cluster.data_members() {
        let m = cluster.member(&name)?;
        let agent = m.agent_pid().context("agent pid")?;
        agents.insert(name.clone(), (agent, m.grpc, m.http));
        targets.push(Target {
            name: name.clone(),
            primary: name == primary,
            postmaster: m.postmaster_pid().context("postmaster pid")?,
            agent: Some(agent),
            watchdog: watchdog_of(agent),
            client: pg_client(&m.direct_conninfo().context("conninfo")?).await?,
        });
    }
    println!(
        "measuring the idle cluster for {} s ...",
        opts.window.as_secs()
    );
    let members = measure(&targets, opts.window).await?;

    // Churn against a standby's agent (the one HAProxy health checks hit most).
    let (who, (agent, grpc, http)) = agents
        .iter()
        .find(|(n, _)| **n != primary)
        .or_else(|| agents.iter().next())
        .map(|(n, a)| (n.clone(), *a))
        .context("no agent to churn against")?;
    println!(
        "churn: {} gRPC and {} HTTP connections to {who} ...",
        opts.churn, opts.churn
    );
    let rss_before_mib = rss_mib(agent).unwrap_or(0.0);
    let started = Instant::now();
    let (grpc_ok, http_ok, failed) =
        tokio::time::timeout(CHURN_TIMEOUT, churn(grpc, http, opts.churn))
            .await
            .with_context(|| {
                format!(
                    "the churn did not finish within {} s",
                    CHURN_TIMEOUT.as_secs()
                )
            })?;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fds_after = std::fs::read_dir(format!("/proc/{agent}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let churn = Churn {
        grpc_ok,
        http_ok,
        failed,
        took,
        rss_before_mib,
        rss_after_mib: rss_mib(agent).unwrap_or(0.0),
        fds_after,
    };
    drop(cluster);
    Ok(IdleBenchReport {
        window: opts.window,
        baseline: base,
        members,
        churn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_cpu_and_rss_are_read_from_proc() {
        let me = std::process::id() as i32;
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_ticks(me, true).is_some());
        assert!(rss_mib(me).is_some_and(|r| r > 0.0));
        assert_eq!(parent_of(me), Some(nix::unistd::getppid().as_raw()));
    }

    #[test]
    fn targets_are_checked() {
        let member = |name: &str, agent: f64, pg: f64, s: f64| Measured {
            name: name.into(),
            primary: name == "p",
            agent_cpu_pct: agent,
            postgres_cpu_pct: pg,
            sessions_per_s: s,
            rss_mib: 20.0,
        };
        let mut r = IdleBenchReport {
            window: Duration::from_secs(60),
            baseline: vec![member("p", 0.0, 0.2, 0.0), member("s", 0.0, 0.1, 0.0)],
            members: vec![member("p", 0.5, 0.6, 0.0), member("s", 0.4, 0.3, 0.0)],
            churn: Churn {
                rss_after_mib: 25.0,
                ..Churn::default()
            },
        };
        assert!(r.misses().is_empty(), "{:?}", r.misses());
        assert!((r.probe_pct(&r.members[0]) - 0.4).abs() < 1e-9);
        r.members[1].sessions_per_s = 8.0;
        r.members[0].agent_cpu_pct = 3.0;
        r.churn.rss_after_mib = 53.6;
        assert_eq!(r.misses().len(), 3, "{:?}", r.misses());
        assert!(r.render().contains("primary"));
    }
}
