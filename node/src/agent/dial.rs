//! How this agent reaches its peers' gRPC APIs (`Agent`, `Admin`): one lazily connected
//! channel per peer, re-created when the peer's address changes, optionally over mutual TLS.
//!
//! TLS (the `[tls]` config section): every member presents a certificate signed by the
//! cluster's CA, whose DNS name is the member's name; servers require a client certificate
//! signed by that CA, and clients check that the server's certificate names the member
//! they meant to reach. A peer without such a certificate is refused at the handshake.
//!
//! Cluster secret (`[security]`): every request on these channels is signed (see
//! [`crate::auth`]); the channel type is [`SignedChannel`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity, ServerTlsConfig,
};

use crate::auth::{SignedChannel, Signer};
use crate::config::TlsConfig;
use crate::raft::network::CONNECT_TIMEOUT_MS;
use crate::raft::AddressBook;

/// Bound on a TLS handshake, either side.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The TLS configuration of both sides, built from the `[tls]` files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Without a domain name: [`Dialer`] sets it to the peer's member name per channel.
    pub client: ClientTlsConfig,
    pub server: ServerTlsConfig,
}

impl TlsFiles {
    pub fn load(t: &TlsConfig) -> anyhow::Result<TlsFiles> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        let ca = Certificate::from_pem(read(&t.ca_file)?);
        let identity = TlsIdentity::from_pem(read(&t.cert_file)?, read(&t.key_file)?);
        let client = ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .identity(identity.clone())
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        let server = ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(ca)
            .client_auth_optional(false)
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        Ok(TlsFiles { client, server })
    }
}

/// Builds the endpoint for `name` at `addr`: plain HTTP/2, or TLS checking that the
/// server's certificate names `name`.
pub fn endpoint(
    name: &str,
    addr: SocketAddr,
    tls: Option<&ClientTlsConfig>,
) -> anyhow::Result<Endpoint> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .with_context(|| format!("building the endpoint of {name} at {addr}"))?
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        ep = ep
            .tls_config(tls.clone().domain_name(name))
            .with_context(|| format!("configuring TLS to {name}"))?;
    }
    Ok(ep)
}

/// Splits an address-book entry `host:port` into host and port; an IPv6 literal may be
/// written in brackets (`[fd00::2]:5432`), which libpq and tokio-postgres want without.
pub fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// Channels to peers by member name.
#[derive(Clone)]
pub struct Dialer {
    book: AddressBook,
    tls: Option<ClientTlsConfig>,
    signer: Option<Signer>,
    cache: Arc<Mutex<HashMap<String, (SocketAddr, Channel)>>>,
}

impl Dialer {
    pub fn new(book: AddressBook, tls: Option<ClientTlsConfig>) -> Self {
        Dialer {
            book,
            tls,
            signer: None,
            cache: Arc::default(),
        }
    }

    /// Signs every request with the cluster secret.
    pub fn with_signer(mut self, signer: Option<Signer>) -> Self {
        self.signer = signer;
        self
    }

    /// The channel to member `name`; connects on first use, reconnects by itself.
    pub fn channel(&self, name: &str) -> anyhow::Result<SignedChannel> {
        let addr = self
            .book
            .get(name)
            .with_context(|| format!("no address for member {name:?} in the address book"))?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, ch)) = cache.get(name) {
            if *cached == addr {
                return Ok(SignedChannel::new(ch.clone(), self.signer.clone(), name));
            }
        }
        let ch = endpoint(name, addr, self.tls.as_ref())?.connect_lazy();
        cache.insert(name.to_string(), (addr, ch.clone()));
        Ok(SignedChannel::new(ch, self.signer.clone(), name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_splits_names_ipv4_and_bracketed_ipv6() {
        let hp = |h: &str, p: u16| Some((h.to_string(), p));
        assert_eq!(split_host_port("10.77.3.12:5432"), hp("10.77.3.12", 5432));
        assert_eq!(
            split_host_port("db-1.example:5433"),
            hp("db-1.example", 5433)
        );
        assert_eq!(split_host_port("[fd00::2]:5432"), hp("fd00::2", 5432));
        for bad in ["5432", ":5432", "[]:5432", "h:port", "h:70000"] {
            assert_eq!(split_host_port(bad), None, "{bad}");
        }
    }
}
