//! Probes of the other members' Postgres, as this agent reaches them (through its own
//! address book, so a partition or a proxy between regions is seen as the clients in this
//! region would see it).
//!
//! Two things come out of one probe, `SELECT pg_is_in_recovery()` on a kept-open session:
//! whether that Postgres currently takes writes (the decision core never promotes while a
//! fresh observer still sees the old primary writable: a primary whose agent froze or
//! crashed keeps its Postgres, and promoting then would make two writers), and the
//! application-level round trip to that member, which `auto` replication regions are
//! judged by. A TCP connect time would not do: a local proxy accepts at once whatever the
//! latency or partition behind it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::Shared;
use crate::config::Config;

/// The latest probe of one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerResult {
    pub at: Instant,
    /// Reached and not in recovery: it would take a write.
    pub writable: bool,
    /// Round trip of the probe query, when it answered.
    pub rtt_us: Option<u64>,
    /// When it takes writes: the timeline it writes on.
    pub timeline: Option<u32>,
}

/// Round trips kept per peer: the reported one is their median, so one slow probe on a
/// busy machine does not flip an `auto` region between sync and async.
const RTT_WINDOW: usize = 5;

#[derive(Clone, Debug, Default)]
struct PeerEntry {
    last: Option<PeerResult>,
    /// Recent round trips (µs) of answered probes, oldest first.
    rtts_us: std::collections::VecDeque<u64>,
}

/// Shared between the prober task and the reporter.
#[derive(Clone, Default)]
pub struct PeerProbes(Arc<Mutex<BTreeMap<String, PeerEntry>>>);

impl PeerProbes {
    fn set(&self, name: &str, r: PeerResult) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = g.entry(name.to_string()).or_default();
        e.last = Some(r);
        if let Some(rtt) = r.rtt_us {
            e.rtts_us.push_back(rtt);
            while e.rtts_us.len() > RTT_WINDOW {
                e.rtts_us.pop_front();
            }
        }
    }

    /// Results no older than `max_age`, by member name; an answered probe's round trip is
    /// the median of the recent ones.
    pub fn fresh(&self, max_age: Duration) -> BTreeMap<String, PeerResult> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(n, e)| {
                let mut r = e.last.filter(|r| r.at.elapsed() <= max_age)?;
                if r.rtt_us.is_some() {
                    let mut v: Vec<u64> = e.rtts_us.iter().copied().collect();
                    v.sort_unstable();
                    r.rtt_us = v.get(v.len() / 2).copied();
                }
                Some((n.clone(), r))
            })
            .collect()
    }

    /// The proto form for an observation: probe results and round trips.
    pub fn to_proto(
        &self,
        max_age: Duration,
    ) -> (
        HashMap<String, meridian_proto::PeerProbe>,
        HashMap<String, u64>,
    ) {
        let mut probes = HashMap::new();
        let mut rtts = HashMap::new();
        for (name, r) in self.fresh(max_age) {
            probes.insert(
                name.clone(),
                meridian_proto::PeerProbe {
                    // Only Postgres is probed here; the agent's reachability shows in
                    // its own reports to the leader.
                    agent_reachable: false,
                    postgres_writable: r.writable,
                },
            );
            if let Some(rtt) = r.rtt_us {
                rtts.insert(name, rtt);
            }
        }
        (probes, rtts)
    }
}

/// Peers with a Postgres address in this agent's address book, other than itself.
fn targets(config: &Config) -> Vec<(String, String, u16)> {
    config
        .peers
        .iter()
        .filter(|(name, _)| **name != config.member.name)
        .filter_map(|(name, p)| {
            let (host, port) = super::dial::split_host_port(p.postgres.as_deref()?)?;
            Some((name.clone(), host, port))
        })
        .collect()
}

fn client_config(
    config: &Config,
    host: &str,
    port: u16,
    timeout: Duration,
) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(host)
        .port(port)
        .dbname("postgres")
        .application_name("meridian-peer-probe")
        .connect_timeout(timeout);
    // The least-privilege monitor role (pg_monitor), on data members and witnesses alike.
    let monitor = &config.pg_client.monitor;
    c.user(&monitor.user);
    if let Some(p) = &monitor.password {
        c.password(p.expose());
    }
    c
}

/// The client TLS towards peers' Postgres, built once per process from the config.
fn peer_tls(config: &Config) -> &'static crate::pg::PgTls {
    static TLS: std::sync::OnceLock<crate::pg::PgTls> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        crate::pg::PgTls::from_client_ssl(&super::pg_access::client_ssl(config)).unwrap_or_else(
            |e| {
                tracing::error!("TLS to the peers' Postgres: {e}; probing them in plain text");
                crate::pg::PgTls::default()
            },
        )
    })
}

/// One probe, on the kept session if there is one. Bounded by `timeout` overall.
async fn probe_one(
    config: &Config,
    host: &str,
    port: u16,
    session: &mut Option<(Client, tokio::task::JoinHandle<()>)>,
    timeout: Duration,
) -> PeerResult {
    let attempt = async {
        if session.is_none() {
            let c = client_config(config, host, port, timeout);
            let (client, task) = crate::pg::connect_tls(&c, peer_tls(config)).await.ok()?;
            *session = Some((client, task));
        }
        let (client, _) = session.as_ref()?;
        let started = Instant::now();
        let row = client.query_one(PROBE_SQL, &[]).await.ok()?;
        let rtt = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let timeline = row
            .get::<_, Option<String>>(1)
            .and_then(|w| timeline_of_walfile(&w));
        Some((!row.get::<_, bool>(0), rtt, timeline))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Some((writable, rtt, timeline))) => PeerResult {
            at: Instant::now(),
            writable,
            rtt_us: Some(rtt),
            timeline: timeline.filter(|_| writable),
        },
        _ => {
            // A session that failed or hung is not trusted again: reconnect next round.
            if let Some((_, task)) = session.take() {
                task.abort();
            }
            PeerResult {
                at: Instant::now(),
                writable: false,
                rtt_us: None,
                timeline: None,
            }
        }
    }
}

/// Whether the peer takes writes, and then the WAL file it writes (its timeline).
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END";

/// The timeline in a WAL file name (its first 8 hex digits).
fn timeline_of_walfile(name: &str) -> Option<u32> {
    u32::from_str_radix(name.get(..8)?, 16).ok()
}

/// Probes every peer each `timing.observe_interval`, all at once, each bounded so a
/// partitioned peer cannot hold up the others. Runs until the agent stops.
pub async fn run(shared: Arc<Shared>, probes: PeerProbes) {
    let config = &shared.config;
    let interval = config.timing.observe_interval;
    // Room for a cross-region round trip under a latency spike, but below the lease.
    let timeout = config
        .timing
        .pg_probe_timeout
        .min(config.timing.lease_ttl / 2);
    let targets = targets(config);
    let mut sessions: Vec<Option<(Client, tokio::task::JoinHandle<()>)>> =
        targets.iter().map(|_| None).collect();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let rounds = targets
            .iter()
            .zip(sessions.iter_mut())
            .map(|((_, host, port), session)| probe_one(config, host, *port, session, timeout));
        let results = futures::future::join_all(rounds).await;
        for ((name, _, _), r) in targets.iter().zip(results) {
            probes.set(name, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_results_are_left_out() {
        let p = PeerProbes::default();
        let old = Instant::now() - Duration::from_secs(10);
        p.set(
            "old",
            PeerResult {
                at: old,
                writable: true,
                rtt_us: Some(5),
                timeline: None,
            },
        );
        p.set(
            "new",
            PeerResult {
                at: Instant::now(),
                writable: true,
                rtt_us: Some(70_000),
                timeline: None,
            },
        );
        p.set(
            "down",
            PeerResult {
                at: Instant::now(),
                writable: false,
                rtt_us: None,
                timeline: None,
            },
        );
        let (probes, rtts) = p.to_proto(Duration::from_secs(1));
        assert_eq!(probes.len(), 2);
        assert!(probes["new"].postgres_writable);
        assert!(!probes["down"].postgres_writable);
        assert!(!probes.contains_key("old"));
        assert_eq!(rtts, HashMap::from([("new".to_string(), 70_000)]));
    }

    #[test]
    fn round_trips_are_the_median_of_the_recent_answers() {
        let p = PeerProbes::default();
        let answer = |rtt_us| PeerResult {
            at: Instant::now(),
            writable: false,
            rtt_us: Some(rtt_us),
            timeline: None,
        };
        for rtt in [900, 1_000, 50_000, 1_100, 1_200, 60_000] {
            p.set("e2", answer(rtt));
        }
        // Window: 1_000, 50_000, 1_100, 1_200, 60_000 → median 1_200.
        let (_, rtts) = p.to_proto(Duration::from_secs(1));
        assert_eq!(rtts["e2"], 1_200);
        // A probe that did not answer reports no round trip at all.
        p.set(
            "e2",
            PeerResult {
                at: Instant::now(),
                writable: false,
                rtt_us: None,
                timeline: None,
            },
        );
        let (_, rtts) = p.to_proto(Duration::from_secs(1));
        assert!(!rtts.contains_key("e2"));
    }
}
