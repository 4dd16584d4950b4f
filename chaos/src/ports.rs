//! Owns picking TCP ports for test clusters (agents, Postgres, the mesh's proxies).
//!
//! Ports come from below the kernel's ephemeral range (`ip_local_port_range`, 32768 and up
//! by default). A port asked of the kernel with `bind(:0)` and then released can be handed
//! out again at once as the *source* port of any outgoing connection, and a Postgres that
//! starts a moment later finds it taken ("Address already in use"): seen in CI. Below the
//! ephemeral range only an explicit bind can take a port, so a process-wide cursor (started
//! at a pid-derived offset so two test processes seldom overlap) plus a bind check is
//! enough.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// First port handed out; below it live well-known and registered services.
const LOW_PORT: u32 = 20_000;
/// One past the last port handed out: the default start of the ephemeral range.
const HIGH_PORT: u32 = 32_768;
/// Bound on candidates tried for one call (the range holds 12 768).
const MAX_TRIES: usize = 4_096;

static CURSOR: AtomicU32 = AtomicU32::new(0);

fn next_candidate() -> u16 {
    let span = HIGH_PORT - LOW_PORT;
    let start = (std::process::id().wrapping_mul(2_654_435_761)) % span;
    let _ = CURSOR.compare_exchange(0, start + 1, Ordering::Relaxed, Ordering::Relaxed);
    let n = CURSOR.fetch_add(1, Ordering::Relaxed);
    u16::try_from(LOW_PORT + n % span).expect("the range lies below 65536")
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago and that the kernel does not
/// give out as ephemeral source ports. Within this process no port is handed out twice
/// until the whole range has been cycled through.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    let mut tries = 0;
    while ports.len() < n {
        anyhow::ensure!(
            tries < MAX_TRIES,
            "no free TCP port between {LOW_PORT} and {HIGH_PORT} after {MAX_TRIES} tries"
        );
        tries += 1;
        let port = next_candidate();
        if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            held.push(l);
            ports.push(port);
        }
    }
    drop(held);
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let a = free_ports(50).context("first batch").unwrap();
        let b = free_ports(50).context("second batch").unwrap();
        let mut all: Vec<u16> = a.iter().chain(b.iter()).copied().collect();
        assert!(all
            .iter()
            .all(|&p| (LOW_PORT..HIGH_PORT).contains(&u32::from(p))));
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 100, "a port was handed out twice");
        // Still free: nothing holds them after the call.
        for p in a.iter().take(5) {
            TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).expect("port released");
        }
    }
}
