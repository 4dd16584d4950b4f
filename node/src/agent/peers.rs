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
//!
//! Pacing: a peer is probed every `timing.observe_interval`, except while it is steady
//! ([`Pacing`]: its last answers were quick and alike and as the intent expects, the
//! cluster has a primary, no switchover runs and the generation stands still); then every
//! other round. Each probe costs the peer's Postgres a wake-up and a transaction, and at
//! idle these were half of what the agents cost it. Every bound that reads these results
//! holds at the idle pace: results are at most two rounds plus one quick answer old
//! (below the reporter's 4 rounds and [`primary_position_max_age`]); any change, slow or
//! missing answer, or intent change brings the full pace back for the next round.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};

use super::Shared;
use crate::config::Config;
use crate::types::Lsn;

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
    /// When it takes writes: its current WAL position (`pg_current_wal_lsn()`), read no
    /// earlier than `lsn_at`. Standbys measure their lag against it.
    pub current_lsn: Option<Lsn>,
    /// When the probe query was sent (the position is at least this fresh).
    pub lsn_at: Instant,
    /// In recovery: its replay position and whether its WAL receiver streams.
    pub replayed_lsn: Option<Lsn>,
    pub streaming: bool,
}

impl PeerResult {
    /// A probe that got no answer.
    pub fn unanswered(at: Instant) -> PeerResult {
        PeerResult {
            at,
            writable: false,
            rtt_us: None,
            timeline: None,
            current_lsn: None,
            lsn_at: at,
            replayed_lsn: None,
            streaming: false,
        }
    }
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

    /// The latest answered probe of `name` whose position is no older than `max_age`.
    pub fn answered(&self, name: &str, max_age: Duration) -> Option<PeerResult> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.get(name)?
            .last
            .filter(|r| r.rtt_us.is_some() && r.lsn_at.elapsed() <= max_age)
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

/// The kept session to one peer and its reconnect backoff.
#[derive(Default)]
struct PeerSession {
    open: Option<(Client, Statement, tokio::task::JoinHandle<()>)>,
    /// Connects that failed in a row and when the next may be tried.
    failures: u32,
    retry_at: Option<Instant>,
}

/// Reconnect backoff after consecutive failed connects: the first retry comes the next
/// round, then the wait doubles from this, capped at [`RECONNECT_MAX`].
const RECONNECT_BASE: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_millis(500);

impl PeerSession {
    fn drop_open(&mut self) {
        if let Some((_, _, task)) = self.open.take() {
            task.abort();
        }
    }

    fn connect_failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let shift = self.failures.saturating_sub(2).min(16);
        let wait = if self.failures < 2 {
            Duration::ZERO
        } else {
            RECONNECT_BASE
                .saturating_mul(1u32 << shift)
                .min(RECONNECT_MAX)
        };
        self.retry_at = Some(Instant::now() + wait);
    }
}

/// One probe, on the kept session (opened when there is none). Bounded by `timeout`
/// overall; a session that failed or hung is closed and reopened.
async fn probe_one(
    config: &Config,
    host: &str,
    port: u16,
    session: &mut PeerSession,
    timeout: Duration,
) -> PeerResult {
    if session.open.is_none() && session.retry_at.is_some_and(|at| Instant::now() < at) {
        return PeerResult::unanswered(Instant::now());
    }
    let mut connected = false;
    let attempt = async {
        if session.open.is_none() {
            let c = client_config(config, host, port, timeout);
            let (client, task) = crate::pg::connect_tls(&c, peer_tls(config)).await.ok()?;
            let stmt = client.prepare(PROBE_SQL).await;
            session.open = Some((client, stmt.ok()?, task));
            connected = true;
        }
        let (client, stmt, _) = session.open.as_ref()?;
        let sent = Instant::now();
        let row = client.query_one(stmt, &[]).await.ok()?;
        let rtt = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        Some((row, rtt, sent))
    };
    let answer = tokio::time::timeout(timeout, attempt).await.ok().flatten();
    let Some((row, rtt, sent)) = answer else {
        // A session that failed or hung is not trusted again: reconnect (with backoff).
        let had_session = session.open.is_some() && !connected;
        session.drop_open();
        if had_session {
            session.failures = 0;
            session.retry_at = None;
        } else {
            session.connect_failed();
        }
        return PeerResult::unanswered(Instant::now());
    };
    session.failures = 0;
    session.retry_at = None;
    let writable = !row.get::<_, bool>(0);
    let timeline = row
        .get::<_, Option<String>>(1)
        .and_then(|w| timeline_of_walfile(&w));
    let lsn = |i: usize| {
        row.get::<_, Option<String>>(i)
            .and_then(|s| s.parse::<Lsn>().ok())
    };
    PeerResult {
        at: Instant::now(),
        writable,
        rtt_us: Some(rtt),
        timeline: timeline.filter(|_| writable),
        current_lsn: lsn(2).filter(|_| writable),
        lsn_at: sent,
        replayed_lsn: lsn(3).filter(|_| !writable),
        streaming: row.get::<_, Option<bool>>(4).unwrap_or(false),
    }
}

/// Whether the peer takes writes, the WAL file it writes (its timeline) and its current
/// position; in recovery, its replay position and whether its WAL receiver streams.
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
     pg_last_wal_replay_lsn()::text, \
     EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')";

/// The timeline in a WAL file name (its first 8 hex digits).
fn timeline_of_walfile(name: &str) -> Option<u32> {
    u32::from_str_radix(name.get(..8)?, 16).ok()
}

/// Bound on one peer probe: room for a cross-region round trip under a latency spike, but
/// below the lease.
pub fn probe_timeout(t: &crate::config::TimingConfig) -> Duration {
    t.pg_probe_timeout.min(t.lease_ttl / 2)
}

/// How old the primary's position, as a peer probe read it, may be for a standby to
/// measure its lag against it: a probe each `observe_interval`, taking up to the probe
/// timeout, read by a reporter that publishes each `observe_interval`. (A steady primary is
/// probed every other round, but only while it answers within one `observe_interval`, so
/// its position is at most three rounds old then: within the bound.) Older (or never
/// read): the lag is unknown and `/replica?lag=` answers 503.
pub fn primary_position_max_age(t: &crate::config::TimingConfig) -> Duration {
    t.observe_interval * 2 + probe_timeout(t)
}

/// Answers alike in a row that make a peer steady.
const STEADY_AFTER: usize = 3;

/// Whether a peer may skip a round (module doc: pacing). Pure: fed each probe's result and
/// what the intent says.
#[derive(Clone, Debug, Default)]
pub struct Pacing {
    /// The last answers' (writable, streaming, timeline), newest last; cleared by anything
    /// unsteady.
    alike: Vec<(bool, bool, Option<u32>)>,
    skipped_last: bool,
}

/// What the applied intent says, as far as pacing goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calm {
    /// The intent names a primary and no switchover runs.
    pub calm: bool,
    pub generation: u64,
    /// The peer is the intent's primary (so it should be writable; the others not).
    pub peer_is_primary: bool,
}

impl Pacing {
    /// Records a probe's result, read under `calm`; `quick_us`: answers slower than this
    /// are not steady.
    pub fn record(&mut self, r: &PeerResult, calm: &Calm, quick_us: u64) {
        let steady = calm.calm
            && r.rtt_us.is_some_and(|us| us < quick_us)
            && r.writable == calm.peer_is_primary;
        let key = (r.writable, r.streaming, r.timeline);
        if !steady || self.alike.last().is_some_and(|k| *k != key) {
            self.alike.clear();
        }
        if steady {
            self.alike.push(key);
            if self.alike.len() > STEADY_AFTER {
                self.alike.remove(0);
            }
        }
    }

    /// Whether to probe this round, given the intent now and the generation the last
    /// answers were read under (a change probes at once).
    pub fn probe_now(&mut self, calm: &Calm, last: Option<&Calm>) -> bool {
        let steady = calm.calm && last == Some(calm) && self.alike.len() >= STEADY_AFTER;
        let skip = steady && !self.skipped_last;
        self.skipped_last = skip;
        !skip
    }
}

fn calm_for(shared: &Shared, peer: &str) -> Calm {
    let applied = shared.applied();
    let intent = &applied.intent;
    Calm {
        calm: intent.primary.is_some() && intent.pending_switchover.is_none(),
        generation: intent.generation.0,
        peer_is_primary: intent.primary.as_deref() == Some(peer),
    }
}

/// Probes every peer each `timing.observe_interval` (steady peers every other round), all
/// at once, each bounded so a partitioned peer cannot hold up the others. Runs until the
/// agent stops.
pub async fn run(shared: Arc<Shared>, probes: PeerProbes) {
    let config = &shared.config;
    let interval = config.timing.observe_interval;
    let timeout = probe_timeout(&config.timing);
    let quick_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
    let targets = targets(config);
    let mut sessions: Vec<PeerSession> = targets.iter().map(|_| PeerSession::default()).collect();
    let mut pacing: Vec<(Pacing, Option<Calm>)> =
        targets.iter().map(|_| (Pacing::default(), None)).collect();
    // On the member loop's and the reporter's grid: one wake-up a round for all three.
    let mut ticker = shared.observe_ticker();
    loop {
        ticker.tick().await;
        let calm: Vec<Calm> = targets
            .iter()
            .map(|(n, _, _)| calm_for(&shared, n))
            .collect();
        let due: Vec<bool> = pacing
            .iter_mut()
            .zip(&calm)
            .map(|((p, last), c)| p.probe_now(c, last.as_ref()))
            .collect();
        let rounds = targets
            .iter()
            .zip(sessions.iter_mut())
            .zip(&due)
            .filter(|(_, due)| **due)
            .map(|(((name, host, port), session), _)| async move {
                (name, probe_one(config, host, *port, session, timeout).await)
            });
        let results = futures::future::join_all(rounds).await;
        for (name, r) in results {
            if let Some(i) = targets.iter().position(|(n, _, _)| n == name) {
                pacing[i].0.record(&r, &calm[i], quick_us);
                pacing[i].1 = Some(calm[i].clone());
            }
            probes.set(name, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_peer_is_probed_every_other_round_and_any_change_restores_the_pace() {
        let calm = Calm {
            calm: true,
            generation: 3,
            peer_is_primary: true,
        };
        let now = Instant::now();
        let answer = |writable: bool, rtt_us: u64| PeerResult {
            writable,
            rtt_us: Some(rtt_us),
            timeline: Some(3),
            ..PeerResult::unanswered(now)
        };
        let mut p = Pacing::default();
        // Probed every round until it answered alike STEADY_AFTER times.
        for _ in 0..STEADY_AFTER {
            assert!(p.probe_now(&calm, Some(&calm)));
            p.record(&answer(true, 500), &calm, 250_000);
        }
        // Steady: every other round.
        let pattern: Vec<bool> = (0..4).map(|_| p.probe_now(&calm, Some(&calm))).collect();
        assert_eq!(pattern, vec![false, true, false, true]);
        // A new generation: probed at once.
        let next = Calm {
            generation: 4,
            ..calm.clone()
        };
        assert!(p.probe_now(&next, Some(&calm)));
        assert!(!p.probe_now(&calm, Some(&calm)));
        // A slow answer, an unanswered probe, or a primary that does not take writes: full
        // pace again until steady anew.
        for unsteady in [
            answer(true, 300_000),
            PeerResult::unanswered(now),
            answer(false, 500),
        ] {
            let mut q = p.clone();
            q.record(&unsteady, &calm, 250_000);
            assert!((0..4).all(|_| q.probe_now(&calm, Some(&calm))));
        }
        // A switchover or no primary: every round.
        let busy = Calm {
            calm: false,
            ..calm.clone()
        };
        assert!((0..4).all(|_| p.probe_now(&busy, Some(&busy))));
    }

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
                ..PeerResult::unanswered(old)
            },
        );
        p.set(
            "new",
            PeerResult {
                at: Instant::now(),
                writable: true,
                rtt_us: Some(70_000),
                timeline: None,
                ..PeerResult::unanswered(Instant::now())
            },
        );
        p.set(
            "down",
            PeerResult {
                at: Instant::now(),
                writable: false,
                rtt_us: None,
                timeline: None,
                ..PeerResult::unanswered(Instant::now())
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
    fn the_primary_position_is_used_only_while_fresh() {
        let p = PeerProbes::default();
        let at = Instant::now() - Duration::from_millis(500);
        p.set(
            "a1",
            PeerResult {
                writable: true,
                rtt_us: Some(100),
                current_lsn: Some(Lsn(42)),
                ..PeerResult::unanswered(at)
            },
        );
        assert_eq!(
            p.answered("a1", Duration::from_secs(1))
                .and_then(|r| r.current_lsn),
            Some(Lsn(42))
        );
        assert_eq!(p.answered("a1", Duration::from_millis(100)), None);
        p.set("a1", PeerResult::unanswered(Instant::now()));
        assert_eq!(p.answered("a1", Duration::from_secs(1)), None, "no answer");
    }

    #[test]
    fn round_trips_are_the_median_of_the_recent_answers() {
        let p = PeerProbes::default();
        let answer = |rtt_us| PeerResult {
            at: Instant::now(),
            writable: false,
            rtt_us: Some(rtt_us),
            timeline: None,
            ..PeerResult::unanswered(Instant::now())
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
                ..PeerResult::unanswered(Instant::now())
            },
        );
        let (_, rtts) = p.to_proto(Duration::from_secs(1));
        assert!(!rtts.contains_key("e2"));
    }
}
