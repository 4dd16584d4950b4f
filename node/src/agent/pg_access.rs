//! From the agent's config to how its Postgres is reached and who may log in
//! ([`PgAccess`]): listen addresses, the unix socket, Meridian's roles and passwords, the
//! members' addresses that `pg_hba.conf` admits (the address book's hosts, resolved, or
//! `postgres.replication_cidrs`), the user's hba lines, TLS and the passfile's directory.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use crate::config::{Config, PostgresConfig};
use crate::pg::{cidr_of, ClientSsl, HbaSpec, PgAccess, PgRole, PgRoles, RunAs, ServerSsl};

/// Sub-directory of `state_dir` for the passfile and the server's TLS files.
pub const PG_FILES_SUBDIR: &str = "pg-files";
/// Bound on resolving one address book host name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The roles of a data member's config.
pub fn roles(config: &Config, pg: &PostgresConfig) -> PgRoles {
    let role = |user: &str, pw: &Option<crate::config::Secret>| {
        PgRole::new(user, pw.as_ref().map(|s| s.expose().to_string()))
    };
    PgRoles {
        superuser: role(&pg.superuser, &pg.password),
        replication: role(&pg.replication.user, &pg.replication.password),
        rewind: role(&pg.rewind.user, &pg.rewind.password),
        monitor: role(
            &config.pg_client.monitor.user,
            &config.pg_client.monitor.password,
        ),
    }
}

/// The client TLS every member uses towards other members' Postgres.
pub fn client_ssl(config: &Config) -> ClientSsl {
    ClientSsl {
        mode: config.pg_client.sslmode,
        root_cert: config.pg_client.sslrootcert.clone(),
    }
}

/// The host part of an address book entry (`host:port`, `[v6]:port`).
fn host_of(addr: &str) -> Option<&str> {
    let (host, _) = addr.rsplit_once(':')?;
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

/// The CIDRs the other members connect from: `postgres.replication_cidrs` when set, else
/// every other member's API and Postgres hosts from the address book, resolved (a name
/// that does not resolve is skipped with a warning).
pub async fn member_cidrs(config: &Config, pg: &PostgresConfig) -> Vec<String> {
    if !pg.replication_cidrs.is_empty() {
        return pg.replication_cidrs.clone();
    }
    let mut hosts = BTreeSet::new();
    for (name, peer) in &config.peers {
        if *name == config.member.name {
            continue;
        }
        for addr in std::iter::once(&peer.api).chain(peer.postgres.iter()) {
            if let Some(h) = host_of(addr) {
                hosts.insert(h.to_string());
            }
        }
    }
    let mut cidrs = Vec::new();
    for h in hosts {
        let ips: Vec<IpAddr> = match h.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                match tokio::time::timeout(
                    RESOLVE_TIMEOUT,
                    tokio::net::lookup_host((h.as_str(), 0)),
                )
                .await
                {
                    Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
                    Ok(Err(e)) => {
                        tracing::warn!(host = %h, "address book host does not resolve ({e}): pg_hba.conf does not admit it");
                        vec![]
                    }
                    Err(_) => {
                        tracing::warn!(host = %h, "resolving an address book host timed out: pg_hba.conf does not admit it");
                        vec![]
                    }
                }
            }
        };
        for ip in ips {
            let c = cidr_of(ip);
            if !cidrs.contains(&c) {
                cidrs.push(c);
            }
        }
    }
    cidrs
}

/// The whole access setup of a data member.
pub async fn access(config: &Config, pg: &PostgresConfig, run_as: &RunAs) -> PgAccess {
    let mut ident_os_users = vec![RunAs::CurrentUser.user_name()];
    let pg_user = run_as.user_name();
    if !ident_os_users.contains(&pg_user) {
        ident_os_users.push(pg_user);
    }
    let hba = HbaSpec {
        local_method: pg.local_auth_method.clone(),
        host_method: pg.auth_method.clone(),
        member_cidrs: member_cidrs(config, pg).await,
        hostssl: pg.server_ssl.is_some(),
        user_lines: pg.hba.clone(),
        ident_os_users,
    };
    PgAccess {
        listen_addresses: pg.listen_addr.iter().map(|a| a.to_string()).collect(),
        socket_dir: Some(pg.socket_dir.clone()),
        roles: roles(config, pg),
        hba,
        client_ssl: client_ssl(config),
        server_ssl: pg.server_ssl.as_ref().map(|s| ServerSsl {
            cert_file: s.cert_file.clone(),
            key_file: s.key_file.clone(),
            ca_file: s.ca_file.clone(),
        }),
        files_dir: Some(config.state_dir.join(PG_FILES_SUBDIR)),
        max_slot_wal_keep_size: Some(pg.max_slot_wal_keep_size.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_address_book_entries() {
        assert_eq!(host_of("10.0.0.1:5432"), Some("10.0.0.1"));
        assert_eq!(host_of("[::1]:5432"), Some("::1"));
        assert_eq!(host_of("db-a.example:5432"), Some("db-a.example"));
        assert_eq!(host_of("nocolon"), None);
    }
}
