//! The proxy mesh: one [`Proxy`] per link so every link can get its own faults, plus the
//! region latency matrix and the cluster-level fault operations (partition, isolate, latency
//! spike, heal).
//!
//! A link is keyed by `(source, destination member, service)` where the source is either one
//! member or the clients of one region ([`Source`]). Keying member sources per member (not per
//! region) is what makes isolating one member of a two-member region exact: its region-mate's
//! links to it can be cut while the region's clients still reach it. A member reaches itself
//! directly (no proxy).
//!
//! The latency matrix holds **one-way** latencies per region pair; each direction of a link
//! gets the full value, so a request/response through one proxy costs twice it (us-east to
//! us-west: 35 ms one way, a 70 ms round trip; a x10 spike makes that 700 ms).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proxy::{DirectionDelay, LinkFaults, Proxy, ProxyStats};

/// A service a member exposes through the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Service {
    /// Agent API and Raft gRPC.
    Api,
    /// PostgreSQL (client sessions and replication).
    Postgres,
    /// Patroni-compatible HTTP health endpoints.
    Http,
}

/// Who dials through a link.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Another member (its agent or its Postgres, e.g. a standby's WAL receiver).
    Member(String),
    /// Client workload running in this region.
    Clients(String),
}

/// The key of one link proxy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LinkKey {
    pub source: Source,
    pub dest: String,
    pub service: Service,
}

impl fmt::Display for LinkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Member(m) => write!(f, "{m}")?,
            Source::Clients(r) => write!(f, "clients@{r}")?,
        }
        write!(f, "->{}:{:?}", self.dest, self.service)
    }
}

/// One member as the mesh sees it: where its services really listen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpec {
    pub name: String,
    pub region: String,
    pub upstreams: BTreeMap<Service, SocketAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeshError {
    #[error("unknown member {0:?}")]
    UnknownMember(String),
    #[error("unknown region {0:?}")]
    UnknownRegion(String),
    #[error("duplicate member {0:?}")]
    DuplicateMember(String),
    #[error("bad latency matrix entry {entry:?}: {reason}")]
    BadLatency { entry: String, reason: String },
}

/// Round-trip times between regions.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyMatrix {
    /// One-way latency between two endpoints of the same region.
    pub intra_region_one_way: Duration,
    /// One-way latency per unordered region pair (stored with the names sorted).
    pairs: BTreeMap<(String, String), Duration>,
    /// One-way latency for a cross-region pair missing from `pairs`.
    pub default_cross_one_way: Duration,
}

impl Default for LatencyMatrix {
    /// 0.5 ms inside a region; us-east↔us-west 35 ms, us-east↔eu-central 40 ms,
    /// us-west↔eu-central 70 ms; 50 ms for other pairs.
    fn default() -> Self {
        let mut m = LatencyMatrix {
            intra_region_one_way: Duration::from_micros(500),
            pairs: BTreeMap::new(),
            default_cross_one_way: Duration::from_millis(50),
        };
        m.set("us-east", "us-west", Duration::from_millis(35));
        m.set("us-east", "eu-central", Duration::from_millis(40));
        m.set("us-west", "eu-central", Duration::from_millis(70));
        m
    }
}

impl LatencyMatrix {
    /// Sets the one-way latency of a pair; `a == b` sets the intra-region latency for all regions.
    pub fn set(&mut self, a: &str, b: &str, one_way: Duration) {
        if a == b {
            self.intra_region_one_way = one_way;
        } else {
            self.pairs.insert(pair(a, b), one_way);
        }
    }

    pub fn one_way(&self, a: &str, b: &str) -> Duration {
        if a == b {
            return self.intra_region_one_way;
        }
        self.pairs
            .get(&pair(a, b))
            .copied()
            .unwrap_or(self.default_cross_one_way)
    }

    /// Overrides on top of the defaults, e.g. `us-east:us-west=35,us-east:us-east=0.5`
    /// (milliseconds, fractions allowed).
    pub fn parse_overrides(spec: &str) -> Result<LatencyMatrix, MeshError> {
        let mut m = LatencyMatrix::default();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = |reason: &str| MeshError::BadLatency {
                entry: entry.to_string(),
                reason: reason.to_string(),
            };
            let (regions, ms) = entry
                .split_once('=')
                .ok_or_else(|| bad("expected a:b=ms"))?;
            let (a, b) = regions
                .split_once(':')
                .ok_or_else(|| bad("expected a:b=ms"))?;
            let ms: f64 = ms.trim().parse().map_err(|_| bad("ms is not a number"))?;
            if !(0.0..=60_000.0).contains(&ms) {
                return Err(bad("ms must be within 0..=60000"));
            }
            m.set(a.trim(), b.trim(), Duration::from_secs_f64(ms / 1000.0));
        }
        Ok(m)
    }
}

impl FromStr for LatencyMatrix {
    type Err = MeshError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LatencyMatrix::parse_overrides(s)
    }
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// All link proxies of one cluster.
#[derive(Debug)]
pub struct Mesh {
    members: BTreeMap<String, MemberSpec>,
    regions: BTreeSet<String>,
    matrix: LatencyMatrix,
    proxies: BTreeMap<LinkKey, Proxy>,
}

impl Mesh {
    /// Starts a proxy for every (other member or region's clients, member, service the member
    /// exposes). Client regions are the members' regions. `seed` drives all jitter.
    pub async fn start(
        members: Vec<MemberSpec>,
        matrix: LatencyMatrix,
        seed: u64,
    ) -> anyhow::Result<Mesh> {
        let mut by_name = BTreeMap::new();
        for m in members {
            if by_name.contains_key(&m.name) {
                return Err(MeshError::DuplicateMember(m.name).into());
            }
            by_name.insert(m.name.clone(), m);
        }
        let regions: BTreeSet<String> = by_name.values().map(|m| m.region.clone()).collect();
        let mut sources: Vec<(Source, String)> = by_name
            .values()
            .map(|m| (Source::Member(m.name.clone()), m.region.clone()))
            .collect();
        sources.extend(
            regions
                .iter()
                .map(|r| (Source::Clients(r.clone()), r.clone())),
        );

        let mut proxies = BTreeMap::new();
        for (source, source_region) in &sources {
            for dest in by_name.values() {
                if *source == Source::Member(dest.name.clone()) {
                    continue;
                }
                let one_way = matrix.one_way(source_region, &dest.region);
                for (&service, &upstream) in &dest.upstreams {
                    let key = LinkKey {
                        source: source.clone(),
                        dest: dest.name.clone(),
                        service,
                    };
                    // Distinct per link and deterministic (the build order is fixed).
                    let link_seed =
                        seed ^ (proxies.len() as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let proxy = Proxy::start(
                        upstream,
                        LinkFaults::symmetric(one_way, Duration::ZERO),
                        link_seed,
                    )
                    .await
                    .map_err(|e: io::Error| anyhow::anyhow!("starting proxy for {key}: {e}"))?;
                    proxies.insert(key, proxy);
                }
            }
        }
        Ok(Mesh {
            members: by_name,
            regions,
            matrix,
            proxies,
        })
    }

    pub fn regions(&self) -> &BTreeSet<String> {
        &self.regions
    }

    pub fn members(&self) -> impl Iterator<Item = &MemberSpec> {
        self.members.values()
    }

    pub fn matrix(&self) -> &LatencyMatrix {
        &self.matrix
    }

    pub fn region_of(&self, member: &str) -> Result<&str, MeshError> {
        self.members
            .get(member)
            .map(|m| m.region.as_str())
            .ok_or_else(|| MeshError::UnknownMember(member.to_string()))
    }

    /// Where `source` dials `member`'s `service`: its link proxy, or the member's own address
    /// when a member dials itself. None if the member does not expose that service.
    pub fn addr(&self, source: &Source, member: &str, service: Service) -> Option<SocketAddr> {
        if *source == Source::Member(member.to_string()) {
            return self.members.get(member)?.upstreams.get(&service).copied();
        }
        let key = LinkKey {
            source: source.clone(),
            dest: member.to_string(),
            service,
        };
        self.proxies.get(&key).map(Proxy::listen_addr)
    }

    /// The address `from` dials to reach `to`'s `service` (for `from`'s address book).
    pub fn member_addr(&self, from: &str, to: &str, service: Service) -> Option<SocketAddr> {
        self.addr(&Source::Member(from.to_string()), to, service)
    }

    /// The address clients in `region` dial to reach `member`'s `service`.
    pub fn client_addr(&self, region: &str, member: &str, service: Service) -> Option<SocketAddr> {
        self.addr(&Source::Clients(region.to_string()), member, service)
    }

    pub fn proxy(&self, key: &LinkKey) -> Option<&Proxy> {
        self.proxies.get(key)
    }

    pub fn links(&self) -> impl Iterator<Item = (&LinkKey, &Proxy)> {
        self.proxies.iter()
    }

    pub fn stats(&self) -> Vec<(LinkKey, ProxyStats)> {
        self.proxies
            .iter()
            .map(|(k, p)| (k.clone(), p.stats()))
            .collect()
    }

    fn source_region<'a>(&'a self, source: &'a Source) -> &'a str {
        match source {
            Source::Member(m) => self.members.get(m).map_or("", |m| m.region.as_str()),
            Source::Clients(r) => r,
        }
    }

    fn check_regions(&self, regions: &[&str]) -> Result<(), MeshError> {
        match regions.iter().find(|r| !self.regions.contains(**r)) {
            Some(r) => Err(MeshError::UnknownRegion(r.to_string())),
            None => Ok(()),
        }
    }

    /// Blackholes every link between a region of `a` and a region of `b`, both ways (member
    /// links and client links). Returns the number of links blackholed.
    pub fn partition(&self, a: &[&str], b: &[&str]) -> Result<usize, MeshError> {
        self.check_regions(a)?;
        self.check_regions(b)?;
        let mut n = 0;
        for (key, proxy) in &self.proxies {
            let from = self.source_region(&key.source);
            let to = self.members[&key.dest].region.as_str();
            let crosses =
                (a.contains(&from) && b.contains(&to)) || (b.contains(&from) && a.contains(&to));
            if crosses {
                proxy.blackhole();
                n += 1;
            }
        }
        Ok(n)
    }

    /// Blackholes the member links between `a` and `b`, both ways (clients keep reaching
    /// both). Returns the number of links blackholed.
    pub fn cut_members(&self, a: &str, b: &str) -> Result<usize, MeshError> {
        self.region_of(a)?;
        self.region_of(b)?;
        let mut n = 0;
        for (key, proxy) in &self.proxies {
            let cut = match &key.source {
                Source::Member(m) => (m == a && key.dest == b) || (m == b && key.dest == a),
                Source::Clients(_) => false,
            };
            if cut {
                proxy.blackhole();
                n += 1;
            }
        }
        Ok(n)
    }

    /// Cuts `member` off: every member-to-member link from or to it, and the links from other
    /// regions' clients to it, are blackholed. Clients in its own region still reach it (as when
    /// one machine's uplink dies but the local load balancer still sees it). Returns the number
    /// of links blackholed.
    pub fn isolate_member(&self, member: &str) -> Result<usize, MeshError> {
        let region = self.region_of(member)?.to_string();
        let mut n = 0;
        for (key, proxy) in &self.proxies {
            let cut = match &key.source {
                Source::Member(m) => m == member || key.dest == member,
                Source::Clients(r) => key.dest == member && *r != region,
            };
            if cut {
                proxy.blackhole();
                n += 1;
            }
        }
        Ok(n)
    }

    /// Multiplies every link's base latency by `factor` and adds `jitter` per direction,
    /// keeping blackholes.
    pub fn latency_spike(&self, factor: f64, jitter: Duration) {
        let factor = if factor.is_finite() && factor >= 0.0 {
            factor
        } else {
            1.0
        };
        for proxy in self.proxies.values() {
            let base = proxy.base();
            let scale = |d: DirectionDelay| DirectionDelay::new(d.latency.mul_f64(factor), jitter);
            proxy.set_delay(scale(base.to_upstream), scale(base.to_client));
        }
    }

    /// Every link back to its base latency, no blackhole.
    pub fn heal_all(&self) {
        for proxy in self.proxies.values() {
            proxy.heal();
        }
    }

    /// Resets (RST) every connection through links to or from `member`, e.g. to model a host
    /// that rebooted (its peers' next packet gets RST). A killed process needs no help: its
    /// kernel closes its sockets and the proxies pass the close on.
    pub fn reset_member(&self, member: &str) -> Result<usize, MeshError> {
        self.region_of(member)?;
        Ok(self
            .proxies
            .iter()
            .filter(|(k, _)| k.dest == member || k.source == Source::Member(member.to_string()))
            .map(|(_, p)| p.reset_connections())
            .sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::tests::echo_server;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::timeout;

    const STEP: Duration = Duration::from_secs(5);

    fn ms(x: f64) -> Duration {
        Duration::from_secs_f64(x / 1000.0)
    }

    #[test]
    fn latency_matrix_defaults_and_overrides() {
        let m = LatencyMatrix::default();
        assert_eq!(m.one_way("us-east", "us-east"), ms(0.5));
        assert_eq!(m.one_way("us-west", "us-east"), ms(35.0));
        assert_eq!(m.one_way("us-east", "eu-central"), ms(40.0));
        assert_eq!(m.one_way("eu-central", "us-west"), ms(70.0));
        assert_eq!(m.one_way("us-east", "ap-south"), ms(50.0));

        let m: LatencyMatrix =
            "us-west:us-east=20, eu-central:eu-central=1.5 ,us-east:ap-south=180"
                .parse()
                .unwrap();
        assert_eq!(m.one_way("us-east", "us-west"), ms(20.0));
        assert_eq!(m.one_way("us-east", "us-east"), ms(1.5));
        assert_eq!(m.one_way("ap-south", "us-east"), ms(180.0));
        assert_eq!(m.one_way("us-west", "eu-central"), ms(70.0));
        assert_eq!(
            "".parse::<LatencyMatrix>().unwrap(),
            LatencyMatrix::default()
        );

        for bad in ["us-east=3", "a:b", "a:b=x", "a:b=-1"] {
            assert!(
                matches!(
                    bad.parse::<LatencyMatrix>(),
                    Err(MeshError::BadLatency { .. })
                ),
                "{bad}"
            );
        }
    }

    /// m1, m2 in us-east, m3 in us-west, each exposing Api on an echo server that first says
    /// its name, so a connection shows where it landed.
    async fn three_members() -> Mesh {
        let mut members = Vec::new();
        for (name, region, greeting) in [
            ("m1", "us-east", b"m1" as &'static [u8]),
            ("m2", "us-east", b"m2"),
            ("m3", "us-west", b"m3"),
        ] {
            members.push(MemberSpec {
                name: name.into(),
                region: region.into(),
                upstreams: [(Service::Api, echo_server(greeting).await)]
                    .into_iter()
                    .collect(),
            });
        }
        Mesh::start(members, LatencyMatrix::default(), 5)
            .await
            .unwrap()
    }

    /// Connects and reads the 2-byte greeting within `within`: Some(name) or None on timeout.
    async fn greeting(addr: SocketAddr, within: Duration) -> Option<String> {
        let mut s = timeout(STEP, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        let mut buf = [0u8; 2];
        match timeout(within, s.read_exact(&mut buf)).await {
            Ok(r) => {
                r.unwrap();
                Some(String::from_utf8(buf.to_vec()).unwrap())
            }
            Err(_) => None,
        }
    }

    fn key(source: Source, dest: &str) -> LinkKey {
        LinkKey {
            source,
            dest: dest.into(),
            service: Service::Api,
        }
    }

    fn m(name: &str) -> Source {
        Source::Member(name.into())
    }

    fn c(region: &str) -> Source {
        Source::Clients(region.into())
    }

    fn blackholed(mesh: &Mesh) -> Vec<String> {
        mesh.links()
            .filter(|(_, p)| p.faults().blackhole)
            .map(|(k, _)| k.to_string())
            .collect()
    }

    #[tokio::test]
    async fn addresses_route_to_the_right_member_with_the_matrix_latency() {
        let mesh = three_members().await;
        // 3 members × 2 other members + 2 client regions × 3 members, Api only.
        assert_eq!(mesh.links().count(), 12);
        let direct = mesh.members().find(|s| s.name == "m1").unwrap().upstreams[&Service::Api];
        assert_eq!(mesh.member_addr("m1", "m1", Service::Api), Some(direct));
        assert_eq!(mesh.member_addr("m1", "m2", Service::Postgres), None);
        assert_eq!(mesh.client_addr("eu-central", "m1", Service::Api), None);

        let m1_to_m3 = mesh.member_addr("m1", "m3", Service::Api).unwrap();
        assert_ne!(
            m1_to_m3,
            mesh.member_addr("m2", "m3", Service::Api).unwrap()
        );
        assert_eq!(greeting(m1_to_m3, STEP).await.as_deref(), Some("m3"));
        for (src, dest) in [(m("m3"), "m2"), (c("us-west"), "m1"), (c("us-east"), "m3")] {
            let addr = mesh.addr(&src, dest, Service::Api).unwrap();
            assert_eq!(greeting(addr, STEP).await.as_deref(), Some(dest));
        }

        // The full one-way latency each way: 35 ms across, 0.5 ms inside us-east.
        let cross = mesh.proxy(&key(m("m1"), "m3")).unwrap().base();
        assert_eq!(cross.to_upstream.latency, ms(35.0));
        assert_eq!(cross.to_client.latency, ms(35.0));
        let local = mesh.proxy(&key(c("us-east"), "m2")).unwrap().base();
        assert_eq!(local.to_client.latency, ms(0.5));

        // Measured: one echo round trip m1 -> m3 costs at least twice the 35 ms one-way latency.
        let mut s = TcpStream::connect(m1_to_m3).await.unwrap();
        let mut buf = [0u8; 2];
        timeout(STEP, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let t = tokio::time::Instant::now();
        s.write_all(b"ab").await.unwrap();
        timeout(STEP, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let rtt = t.elapsed();
        assert!(rtt >= ms(70.0) && rtt < ms(140.0), "{rtt:?}");
    }

    #[tokio::test]
    async fn partition_cuts_links_between_region_sets_both_ways() {
        let mesh = three_members().await;
        assert_eq!(mesh.partition(&["us-east"], &["us-west"]), Ok(7));
        assert_eq!(
            blackholed(&mesh),
            vec![
                "m1->m3:Api",
                "m2->m3:Api",
                "m3->m1:Api",
                "m3->m2:Api",
                "clients@us-east->m3:Api",
                "clients@us-west->m1:Api",
                "clients@us-west->m2:Api",
            ]
        );
        let short = Duration::from_millis(300);
        let cut = mesh.member_addr("m1", "m3", Service::Api).unwrap();
        assert_eq!(greeting(cut, short).await, None);
        let open = mesh.member_addr("m1", "m2", Service::Api).unwrap();
        assert_eq!(greeting(open, STEP).await.as_deref(), Some("m2"));

        mesh.heal_all();
        assert!(blackholed(&mesh).is_empty());
        assert_eq!(greeting(cut, STEP).await.as_deref(), Some("m3"));
        assert_eq!(
            mesh.partition(&["us-east"], &["mars"]),
            Err(MeshError::UnknownRegion("mars".into()))
        );
    }

    #[tokio::test]
    async fn isolating_one_member_spares_its_region_mate_and_local_clients() {
        let mesh = three_members().await;
        assert_eq!(mesh.isolate_member("m1"), Ok(5));
        assert_eq!(
            blackholed(&mesh),
            vec![
                "m1->m2:Api",
                "m1->m3:Api",
                "m2->m1:Api",
                "m3->m1:Api",
                "clients@us-west->m1:Api",
            ]
        );
        let short = Duration::from_millis(300);
        assert_eq!(
            greeting(mesh.member_addr("m2", "m1", Service::Api).unwrap(), short).await,
            None
        );
        let local = mesh.client_addr("us-east", "m1", Service::Api).unwrap();
        assert_eq!(greeting(local, STEP).await.as_deref(), Some("m1"));
        let mate = mesh.member_addr("m2", "m3", Service::Api).unwrap();
        assert_eq!(greeting(mate, STEP).await.as_deref(), Some("m3"));
        assert_eq!(
            mesh.isolate_member("m9"),
            Err(MeshError::UnknownMember("m9".into()))
        );
    }

    #[tokio::test]
    async fn latency_spike_scales_base_and_keeps_blackholes_until_heal() {
        let mesh = three_members().await;
        mesh.isolate_member("m3").unwrap();
        mesh.latency_spike(10.0, Duration::from_millis(5));
        let f = mesh.proxy(&key(m("m1"), "m3")).unwrap().faults();
        assert!(f.blackhole);
        assert_eq!(f.to_upstream.latency, ms(350.0));
        assert_eq!(f.to_client.jitter, ms(5.0));
        let local = mesh.proxy(&key(m("m1"), "m2")).unwrap().faults();
        assert_eq!(local.to_upstream.latency, ms(5.0));
        assert!(!local.blackhole);

        mesh.heal_all();
        for (k, p) in mesh.links() {
            assert_eq!(p.faults(), p.base(), "{k}");
        }
        assert_eq!(mesh.reset_member("m3"), Ok(0));
    }
}
