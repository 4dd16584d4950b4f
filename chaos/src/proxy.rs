//! One fault-injecting userspace TCP proxy: listens on 127.0.0.1, forwards every accepted
//! connection to one upstream address, and applies this link's faults (latency with jitter per
//! direction, blackhole, reset) at runtime to existing and new connections.
//!
//! Semantics, chosen to look like a real network to the programs behind it:
//! - **Latency**: each chunk read from one side is delivered to the other at
//!   `max(previous delivery, arrival + latency + jitter)`, so bytes never reorder. Jitter is
//!   uniform in `[0, jitter]`, drawn from a per-proxy seeded ChaCha8 stream. Timers have tokio's
//!   1 ms granularity, so sub-millisecond latencies round up to about 1 ms.
//! - **Bounded memory**: at most [`QUEUE_CHUNKS`] chunks of [`CHUNK_BYTES`] wait per direction;
//!   when full the proxy stops reading, so the sender sees TCP backpressure.
//! - **Blackhole**: nothing moves in either direction and nothing is closed. The proxy stops
//!   reading (the sender's kernel buffers fill, like unacknowledged segments) and holds what it
//!   already queued. A connection accepted while blackholed stays open but the proxy does not
//!   dial the upstream: the client's `connect` succeeds and then its first request hangs. (A real
//!   partition would leave `connect` itself hanging; a userspace proxy cannot refuse to complete
//!   the handshake, so clients must bound their requests, not just their connects.)
//! - **Reset**: every current connection is closed with RST (`SO_LINGER` 0) on both sides; new
//!   connections work unless blackholed.
//! - **Heal**: back to the base latency, no blackhole. With [`HealMode::ResetHeld`] (the
//!   default) every connection that lived through the blackhole is reset at heal time, like a
//!   partition long enough for TCP or application timeouts to kill the sessions; the held bytes
//!   are dropped with it. With [`HealMode::Resume`] held bytes are delivered after the heal,
//!   like TCP retransmission after a short outage.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::seeded;

/// Largest chunk read from one side in one go.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks that may wait for delivery per direction of one connection (1 MiB with full chunks).
pub const QUEUE_CHUNKS: usize = 64;
/// Connections one proxy holds at once; further ones are reset at accept.
pub const MAX_CONNECTIONS: usize = 1024;
/// Bound on dialing the upstream once the link is open.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// ChaCha stream of jitter draws (the seed, not the port, picks the sequence, so a run replays).
const JITTER_STREAM: u64 = 0x4A17;

/// Delay added to one direction of a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirectionDelay {
    pub latency: Duration,
    /// Extra delay drawn uniformly from `[0, jitter]` per chunk.
    pub jitter: Duration,
}

impl DirectionDelay {
    pub fn new(latency: Duration, jitter: Duration) -> Self {
        Self { latency, jitter }
    }
}

/// The faults currently applied to a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LinkFaults {
    /// Client → upstream (requests).
    pub to_upstream: DirectionDelay,
    /// Upstream → client (responses).
    pub to_client: DirectionDelay,
    pub blackhole: bool,
}

impl LinkFaults {
    /// Same one-way latency and jitter both ways, no blackhole.
    pub fn symmetric(one_way_latency: Duration, jitter: Duration) -> Self {
        let d = DirectionDelay::new(one_way_latency, jitter);
        Self {
            to_upstream: d,
            to_client: d,
            blackhole: false,
        }
    }
}

/// What happens to connections that lived through a blackhole when it is lifted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum HealMode {
    /// Reset them (RST): the session died in the partition.
    #[default]
    ResetHeld,
    /// Deliver what was held and carry on.
    Resume,
}

/// Counters of one proxy since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStats {
    pub connections_total: u64,
    pub connections_active: u64,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    /// Connections this proxy closed with RST (resets, heals, errors, overflow).
    pub resets: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    ToUpstream,
    ToClient,
}

struct Shared {
    upstream: SocketAddr,
    base: Mutex<LinkFaults>,
    faults: watch::Sender<LinkFaults>,
    heal_mode: Mutex<HealMode>,
    rng: Mutex<ChaCha8Rng>,
    /// Kill switches of live connections; firing one closes that connection with RST.
    conns: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_conn: AtomicU64,
    connections_total: AtomicU64,
    bytes_to_upstream: AtomicU64,
    bytes_to_client: AtomicU64,
    resets: AtomicU64,
}

/// A running proxy. Dropping it stops accepting and resets its connections.
pub struct Proxy {
    shared: Arc<Shared>,
    listen_addr: SocketAddr,
    accept_task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1 at a free port and forwards to `upstream` with `base` faults.
    /// `seed` drives the jitter draws (give each proxy its own). Must be called inside a tokio
    /// runtime.
    pub async fn start(upstream: SocketAddr, base: LinkFaults, seed: u64) -> io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let listen_addr = listener.local_addr()?;
        let (faults, _) = watch::channel(base);
        let shared = Arc::new(Shared {
            upstream,
            base: Mutex::new(base),
            faults,
            heal_mode: Mutex::new(HealMode::default()),
            rng: Mutex::new(seeded::rng(seed, JITTER_STREAM)),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            shared,
            listen_addr,
            accept_task,
        })
    }

    /// Where clients connect.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The faults in force now.
    pub fn faults(&self) -> LinkFaults {
        *self.shared.faults.borrow()
    }

    /// What [`Proxy::heal`] returns to.
    pub fn base(&self) -> LinkFaults {
        *lock(&self.shared.base)
    }

    /// Changes what heal returns to (the blackhole flag of `base` is ignored).
    pub fn set_base(&self, base: LinkFaults) {
        *lock(&self.shared.base) = LinkFaults {
            blackhole: false,
            ..base
        };
    }

    pub fn set_heal_mode(&self, mode: HealMode) {
        *lock(&self.shared.heal_mode) = mode;
    }

    /// Applies `faults` to existing and new connections. Lifting a blackhole follows the
    /// heal mode.
    pub fn set_faults(&self, faults: LinkFaults) {
        let was_blackholed = self.faults().blackhole;
        if was_blackholed
            && !faults.blackhole
            && *lock(&self.shared.heal_mode) == HealMode::ResetHeld
        {
            // Kill before opening, so no held byte slips through (connections poll their
            // kill switch first).
            self.reset_connections();
        }
        self.shared.faults.send_replace(faults);
    }

    /// Changes the delays, keeping the blackhole state.
    pub fn set_delay(&self, to_upstream: DirectionDelay, to_client: DirectionDelay) {
        self.shared.faults.send_modify(|f| {
            f.to_upstream = to_upstream;
            f.to_client = to_client;
        });
    }

    /// Starts holding all traffic (see the module doc).
    pub fn blackhole(&self) {
        self.shared.faults.send_modify(|f| f.blackhole = true);
    }

    /// Base latency, no blackhole.
    pub fn heal(&self) {
        let base = self.base();
        self.set_faults(base);
    }

    /// Closes every current connection with RST; returns how many.
    pub fn reset_connections(&self) -> usize {
        self.shared.kill_all()
    }

    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            connections_total: s.connections_total.load(Ordering::Relaxed),
            connections_active: lock(&s.conns).len() as u64,
            bytes_to_upstream: s.bytes_to_upstream.load(Ordering::Relaxed),
            bytes_to_client: s.bytes_to_client.load(Ordering::Relaxed),
            resets: s.resets.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.shared.kill_all();
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("listen_addr", &self.listen_addr)
            .field("upstream", &self.shared.upstream)
            .field("faults", &self.faults())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections leaves consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn kill_all(&self) -> usize {
        let killed: Vec<_> = lock(&self.conns).drain().collect();
        let n = killed.len();
        for (_, kill) in killed {
            let _ = kill.send(());
        }
        n
    }

    fn sample_delay(&self, dir: Dir) -> Duration {
        let f = *self.faults.borrow();
        let d = match dir {
            Dir::ToUpstream => f.to_upstream,
            Dir::ToClient => f.to_client,
        };
        if d.jitter.is_zero() {
            return d.latency;
        }
        let jitter_ns = u64::try_from(d.jitter.as_nanos()).unwrap_or(u64::MAX - 1);
        let extra = seeded::range_inclusive(&mut lock(&self.rng), 0, jitter_ns);
        d.latency + Duration::from_nanos(extra)
    }

    fn count_bytes(&self, dir: Dir, n: usize) {
        let counter = match dir {
            Dir::ToUpstream => &self.bytes_to_upstream,
            Dir::ToClient => &self.bytes_to_client,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        shared.connections_total.fetch_add(1, Ordering::Relaxed);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let (kill_tx, kill_rx) = oneshot::channel();
        {
            let mut conns = lock(&shared.conns);
            if conns.len() >= MAX_CONNECTIONS {
                drop(conns);
                shared.resets.fetch_add(1, Ordering::Relaxed);
                rst(&client);
                continue;
            }
            conns.insert(id, kill_tx);
        }
        tokio::spawn(serve(shared.clone(), id, client, kill_rx));
    }
}

/// Drops the socket with RST instead of FIN.
fn rst(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Waits while the link is blackholed. Err when the proxy is gone.
async fn wait_open(rx: &mut watch::Receiver<LinkFaults>) -> Result<(), ()> {
    rx.wait_for(|f| !f.blackhole)
        .await
        .map(|_| ())
        .map_err(|_| ())
}

async fn serve(
    shared: Arc<Shared>,
    id: u64,
    mut client: TcpStream,
    mut kill: oneshot::Receiver<()>,
) {
    let mut faults = shared.faults.subscribe();
    let dial = async {
        wait_open(&mut faults).await?;
        match tokio::time::timeout(
            UPSTREAM_CONNECT_TIMEOUT,
            TcpStream::connect(shared.upstream),
        )
        .await
        {
            Ok(Ok(up)) => Ok(up),
            // Refused or unreachable upstream: the closest the client can see is a reset.
            _ => Err(()),
        }
    };
    let dialed = tokio::select! {
        biased;
        _ = &mut kill => None,
        up = dial => Some(up),
    };
    let mut upstream = match dialed {
        Some(Ok(up)) => up,
        _ => {
            lock(&shared.conns).remove(&id);
            shared.resets.fetch_add(1, Ordering::Relaxed);
            rst(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);

    let clean = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let pumps = async {
            tokio::try_join!(
                pipe(&shared, Dir::ToUpstream, cr, uw),
                pipe(&shared, Dir::ToClient, ur, cw)
            )
        };
        tokio::select! {
            biased;
            _ = &mut kill => false,
            r = pumps => r.is_ok(),
        }
    };
    lock(&shared.conns).remove(&id);
    if !clean {
        shared.resets.fetch_add(1, Ordering::Relaxed);
        rst(&client);
        rst(&upstream);
    }
}

enum Chunk {
    Data(Instant, Vec<u8>),
    Eof(Instant),
}

/// Forwards one direction until EOF (then half-closes the destination). Err aborts the
/// whole connection.
async fn pipe(
    shared: &Shared,
    dir: Dir,
    mut src: ReadHalf<'_>,
    mut dst: WriteHalf<'_>,
) -> Result<(), ()> {
    let (tx, mut rx) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
    let reader = async move {
        let mut faults = shared.faults.subscribe();
        let mut last_delivery = Instant::now();
        loop {
            wait_open(&mut faults).await?;
            let mut buf = vec![0u8; CHUNK_BYTES];
            let n = src.read(&mut buf).await.map_err(|_| ())?;
            let due = (Instant::now() + shared.sample_delay(dir)).max(last_delivery);
            last_delivery = due;
            if n == 0 {
                tx.send(Chunk::Eof(due)).await.map_err(|_| ())?;
                return Ok(());
            }
            buf.truncate(n);
            tx.send(Chunk::Data(due, buf)).await.map_err(|_| ())?;
        }
    };
    let writer = async move {
        let mut faults = shared.faults.subscribe();
        while let Some(chunk) = rx.recv().await {
            let due = match &chunk {
                Chunk::Data(due, _) | Chunk::Eof(due) => *due,
            };
            tokio::time::sleep_until(due).await;
            wait_open(&mut faults).await?;
            match chunk {
                Chunk::Data(_, data) => {
                    dst.write_all(&data).await.map_err(|_| ())?;
                    shared.count_bytes(dir, data.len());
                }
                Chunk::Eof(_) => {
                    let _ = dst.shutdown().await;
                    return Ok(());
                }
            }
        }
        // The reader stopped without EOF: it failed and reports the error itself.
        Ok(())
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::ErrorKind;
    use tokio::time::timeout;

    /// Bound on any single step of these tests.
    const STEP: Duration = Duration::from_secs(5);

    /// An echo server on 127.0.0.1 that first sends `greeting` (if any). Runs until the test's
    /// runtime ends.
    pub(crate) async fn echo_server(greeting: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if !greeting.is_empty() && s.write_all(greeting).await.is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    async fn connect(addr: SocketAddr) -> TcpStream {
        let s = timeout(STEP, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Sends `msg` and reads the same number of bytes back within `within`.
    async fn round_trip(s: &mut TcpStream, msg: &[u8], within: Duration) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        match timeout(within, s.read_exact(&mut back)).await {
            Ok(r) => r.map(|_| back),
            Err(_) => Err(io::Error::new(ErrorKind::TimedOut, "no echo in time")),
        }
    }

    #[tokio::test]
    async fn echoes_and_counts() {
        let echo = echo_server(b"").await;
        let proxy = Proxy::start(echo, LinkFaults::default(), 1).await.unwrap();
        let mut c = connect(proxy.listen_addr()).await;
        assert_eq!(round_trip(&mut c, b"hello", STEP).await.unwrap(), b"hello");
        let st = proxy.stats();
        assert_eq!(st.connections_total, 1);
        assert_eq!(st.connections_active, 1);
        assert_eq!(st.bytes_to_upstream, 5);
        assert_eq!(st.bytes_to_client, 5);
        drop(c);
        // The close propagates (FIN both ways) and the connection leaves the table.
        let gone = timeout(STEP, async {
            while proxy.stats().connections_active != 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(gone.is_ok(), "connection not released: {:?}", proxy.stats());
        assert_eq!(proxy.stats().resets, 0);
    }

    #[tokio::test]
    async fn latency_applies_per_direction_and_at_runtime() {
        let echo = echo_server(b"").await;
        let faults = LinkFaults::symmetric(Duration::from_millis(20), Duration::ZERO);
        let proxy = Proxy::start(echo, faults, 1).await.unwrap();
        let mut c = connect(proxy.listen_addr()).await;
        for _ in 0..3 {
            let t = Instant::now();
            round_trip(&mut c, b"x", STEP).await.unwrap();
            let rtt = t.elapsed();
            assert!(rtt >= Duration::from_millis(40), "{rtt:?}");
            assert!(rtt < Duration::from_millis(100), "{rtt:?}");
        }
        // Only the response direction delayed, changed on the live connection.
        proxy.set_delay(
            DirectionDelay::default(),
            DirectionDelay::new(Duration::from_millis(60), Duration::ZERO),
        );
        let t = Instant::now();
        round_trip(&mut c, b"y", STEP).await.unwrap();
        let rtt = t.elapsed();
        assert!(
            rtt >= Duration::from_millis(60) && rtt < Duration::from_millis(120),
            "{rtt:?}"
        );
        proxy.heal();
        assert_eq!(proxy.faults(), faults);
    }

    #[tokio::test]
    async fn blackhole_hangs_without_closing_and_heal_resets_held_connections() {
        let echo = echo_server(b"").await;
        let proxy = Proxy::start(echo, LinkFaults::default(), 1).await.unwrap();
        let mut old = connect(proxy.listen_addr()).await;
        round_trip(&mut old, b"before", STEP).await.unwrap();

        proxy.blackhole();
        let err = round_trip(&mut old, b"held", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        // A new connection is accepted, then hangs.
        let mut fresh = connect(proxy.listen_addr()).await;
        let err = round_trip(&mut fresh, b"new", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        assert_eq!(proxy.stats().bytes_to_client, 6);

        proxy.heal();
        // Held connections die with RST at heal (HealMode::ResetHeld).
        for s in [&mut old, &mut fresh] {
            let mut buf = [0u8; 16];
            let r = timeout(STEP, s.read(&mut buf)).await.unwrap();
            assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionReset);
        }
        let mut after = connect(proxy.listen_addr()).await;
        assert_eq!(
            round_trip(&mut after, b"after", STEP).await.unwrap(),
            b"after"
        );
        assert_eq!(proxy.stats().resets, 2);
    }

    #[tokio::test]
    async fn resume_mode_delivers_held_bytes_after_heal() {
        let echo = echo_server(b"").await;
        let proxy = Proxy::start(echo, LinkFaults::default(), 1).await.unwrap();
        proxy.set_heal_mode(HealMode::Resume);
        let mut c = connect(proxy.listen_addr()).await;
        round_trip(&mut c, b"a", STEP).await.unwrap();
        proxy.blackhole();
        c.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 4];
        assert!(timeout(Duration::from_millis(300), c.read_exact(&mut buf))
            .await
            .is_err());
        proxy.heal();
        timeout(STEP, c.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"held");
    }

    #[tokio::test]
    async fn reset_gives_connection_reset_and_new_connections_work() {
        let echo = echo_server(b"").await;
        let proxy = Proxy::start(echo, LinkFaults::default(), 1).await.unwrap();
        let mut c = connect(proxy.listen_addr()).await;
        round_trip(&mut c, b"ping", STEP).await.unwrap();
        assert_eq!(proxy.reset_connections(), 1);
        let mut buf = [0u8; 4];
        let r = timeout(STEP, c.read(&mut buf)).await.unwrap();
        assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionReset);
        let mut again = connect(proxy.listen_addr()).await;
        assert_eq!(
            round_trip(&mut again, b"pong", STEP).await.unwrap(),
            b"pong"
        );
    }

    #[tokio::test]
    async fn dead_upstream_resets_the_client() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let proxy = Proxy::start(closed, LinkFaults::default(), 1)
            .await
            .unwrap();
        let mut c = connect(proxy.listen_addr()).await;
        let mut buf = [0u8; 1];
        let r = timeout(STEP, c.read(&mut buf)).await.unwrap();
        assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn jitter_varies_the_delay_within_its_bound() {
        let echo = echo_server(b"").await;
        let faults = LinkFaults {
            to_upstream: DirectionDelay::new(Duration::from_millis(2), Duration::from_millis(30)),
            ..LinkFaults::default()
        };
        let proxy = Proxy::start(echo, faults, 7).await.unwrap();
        let mut c = connect(proxy.listen_addr()).await;
        let mut rtts = Vec::new();
        for _ in 0..12 {
            let t = Instant::now();
            round_trip(&mut c, b"j", STEP).await.unwrap();
            rtts.push(t.elapsed());
        }
        let (min, max) = (*rtts.iter().min().unwrap(), *rtts.iter().max().unwrap());
        assert!(min >= Duration::from_millis(2), "{rtts:?}");
        assert!(max < Duration::from_millis(80), "{rtts:?}");
        assert!(
            max - min > Duration::from_millis(5),
            "no jitter seen: {rtts:?}"
        );
    }

    #[tokio::test]
    async fn jitter_draws_replay_from_the_seed() {
        let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let f = LinkFaults::symmetric(Duration::from_millis(1), Duration::from_millis(50));
        let draws = |p: &Proxy| -> Vec<Duration> {
            (0..16)
                .map(|_| p.shared.sample_delay(Dir::ToClient))
                .collect()
        };
        let a = draws(&Proxy::start(up, f, 11).await.unwrap());
        let b = draws(&Proxy::start(up, f, 11).await.unwrap());
        let c = draws(&Proxy::start(up, f, 12).await.unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a
            .iter()
            .all(|d| *d >= Duration::from_millis(1) && *d <= Duration::from_millis(51)));
    }

    /// Chunks leave each direction's FIFO in order whatever their jitter draw (a chunk due
    /// earlier than its predecessor waits for it), and a burst far larger than the queues
    /// arrives intact through backpressure.
    #[tokio::test]
    async fn jitter_never_reorders_and_big_transfers_flow_through_bounded_queues() {
        let echo = echo_server(b"").await;
        let faults = LinkFaults::symmetric(Duration::from_millis(1), Duration::from_millis(15));
        let proxy = Proxy::start(echo, faults, 99).await.unwrap();
        let c = connect(proxy.listen_addr()).await;
        let (mut r, mut w) = c.into_split();
        // Many small separate writes (each likely its own chunk with its own jitter draw),
        // then one large burst that must cross the bounded queues by backpressure.
        let small: Vec<u8> = (0..400u32).flat_map(|i| i.to_be_bytes()).collect();
        let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut expected = small.clone();
        expected.extend_from_slice(&big);
        let total = expected.len();
        let writer = tokio::spawn(async move {
            for piece in small.chunks(4) {
                w.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            w.write_all(&big).await.unwrap();
            w
        });
        let mut got = vec![0u8; total];
        timeout(Duration::from_secs(20), r.read_exact(&mut got))
            .await
            .expect("transfer finished in time")
            .unwrap();
        assert!(got == expected, "bytes reordered or corrupted");
        drop(writer.await.unwrap());
        assert_eq!(proxy.stats().bytes_to_upstream, total as u64);
    }
}
