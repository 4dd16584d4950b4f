//! Who may connect to a managed Postgres, and how Meridian connects: the roles Meridian
//! uses (superuser, replication, rewind, monitor), the addresses Postgres listens on, the
//! unix socket the agent's own sessions use, `pg_hba.conf`, `pg_ident.conf`, the libpq
//! passfile, and the client side of TLS (`sslmode`, `sslrootcert`).
//!
//! Everything here is pure: [`render_hba`], [`render_ident`], [`render_passfile`],
//! [`validate_hba_line`] turn settings into file contents or refusals, so the same text is
//! written on every rewrite (init, clone, rewind, re-clone, adoption) by one writer
//! (`PgInstance::write_conf`).

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

/// One role Meridian logs in as. The password is never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct PgRole {
    pub name: String,
    pub password: Option<String>,
}

impl PgRole {
    pub fn new(name: impl Into<String>, password: Option<String>) -> PgRole {
        PgRole {
            name: name.into(),
            password,
        }
    }
}

impl fmt::Debug for PgRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgRole")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The four roles. A role equal to the superuser's name is the superuser itself (as in the
/// test fixtures) and is never created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgRoles {
    pub superuser: PgRole,
    /// `LOGIN REPLICATION`: standbys stream and `pg_basebackup` clones with it.
    pub replication: PgRole,
    /// pg_rewind's `--source-server` user: EXECUTE on the four functions it calls, plus
    /// `pg_checkpoint` (PG 15+) for the CHECKPOINT Meridian runs on the source first.
    pub rewind: PgRole,
    /// `pg_monitor`: probes of the local and the peers' Postgres.
    pub monitor: PgRole,
}

impl PgRoles {
    /// Every role is the superuser (fixtures, single-user setups).
    pub fn all_superuser(name: &str, password: Option<String>) -> PgRoles {
        let r = PgRole::new(name, password);
        PgRoles {
            superuser: r.clone(),
            replication: r.clone(),
            rewind: r.clone(),
            monitor: r,
        }
    }

    /// The roles other than the superuser, deduplicated by name.
    pub fn managed(&self) -> Vec<(&'static str, &PgRole)> {
        let mut out: Vec<(&'static str, &PgRole)> = Vec::new();
        for (kind, r) in [
            ("replication", &self.replication),
            ("rewind", &self.rewind),
            ("monitor", &self.monitor),
        ] {
            if r.name != self.superuser.name && !out.iter().any(|(_, o)| o.name == r.name) {
                out.push((kind, r));
            }
        }
        out
    }
}

/// libpq's `sslmode` for connections Meridian makes to other members' Postgres.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The client side of TLS to Postgres.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSsl {
    pub mode: SslMode,
    /// CA bundle that verifies the servers' certificates (verify-ca, verify-full).
    pub root_cert: Option<PathBuf>,
}

impl Default for ClientSsl {
    /// No TLS configured: libpq's own default (`prefer`), plain sessions from the agent.
    fn default() -> Self {
        ClientSsl {
            mode: SslMode::Prefer,
            root_cert: None,
        }
    }
}

impl ClientSsl {
    /// The libpq conninfo pairs for this TLS setting (none for the default `prefer`
    /// without a root certificate, so libpq's default applies).
    pub fn conninfo_pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if *self != ClientSsl::default() {
            v.push(("sslmode", self.mode.as_str().to_string()));
        }
        if let Some(rc) = &self.root_cert {
            v.push(("sslrootcert", rc.display().to_string()));
        }
        v
    }
}

/// The server side of TLS: Postgres' `ssl = on` with these files (absolute paths,
/// readable by the Postgres OS user).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSsl {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: Option<PathBuf>,
}

/// What `pg_hba.conf` and `pg_ident.conf` say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HbaSpec {
    /// Method of the `local` (unix socket) entries of Meridian's roles: `peer` (through
    /// the `meridian` ident map), `scram-sha-256`, or `trust` when the config says so.
    pub local_method: String,
    /// Method of the host entries of the replication, rewind and monitor roles.
    pub host_method: String,
    /// Where the other members connect from: CIDRs (`10.0.0.2/32`).
    pub member_cidrs: Vec<String>,
    /// `hostssl` instead of `host` for the members' entries (TLS configured).
    pub hostssl: bool,
    /// The user's own lines (`[postgres] hba`), validated, written after Meridian's.
    pub user_lines: Vec<String>,
    /// OS users that `peer` maps to Meridian's roles (the agent's and Postgres' users).
    pub ident_os_users: Vec<String>,
}

impl HbaSpec {
    /// The test fixtures' setup: `trust` (or scram with a password) from the loopback
    /// addresses, every database, every role.
    pub fn loopback(with_password: bool) -> HbaSpec {
        let method = if with_password {
            "scram-sha-256"
        } else {
            "trust"
        };
        HbaSpec {
            local_method: method.into(),
            host_method: method.into(),
            member_cidrs: vec![
                cidr_of(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
                cidr_of(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
            ],
            hostssl: false,
            user_lines: vec![],
            ident_os_users: vec![],
        }
    }
}

/// `a.b.c.d/32` or `x::y/128`.
pub fn cidr_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("{v4}/32"),
            None => format!("{v6}/128"),
        },
    }
}

/// Name of the ident map that `peer` entries use.
pub const IDENT_MAP: &str = "meridian";

fn local_method_text(method: &str) -> String {
    if method == "peer" {
        format!("peer map={IDENT_MAP}")
    } else {
        method.to_string()
    }
}

/// The contents of `pg_hba.conf`. Meridian's entries come first (Postgres takes the first
/// match), then the user's lines in their order.
pub fn render_hba(spec: &HbaSpec, roles: &PgRoles) -> String {
    let mut rows: Vec<[String; 5]> = Vec::new();
    let local = local_method_text(&spec.local_method);
    let mut local_users = vec![roles.superuser.name.clone()];
    for (_, r) in roles.managed() {
        local_users.push(r.name.clone());
    }
    for u in &local_users {
        rows.push([
            "local".into(),
            "all".into(),
            u.clone(),
            String::new(),
            local.clone(),
        ]);
    }
    // `all` does not match replication connections: the lease gate (a local replication
    // client of the primary, `pg::gate`) needs its own line.
    rows.push([
        "local".into(),
        "replication".into(),
        roles.replication.name.clone(),
        String::new(),
        local.clone(),
    ]);
    let ty = if spec.hostssl { "hostssl" } else { "host" };
    let all_superuser = roles.managed().is_empty();
    for cidr in &spec.member_cidrs {
        if all_superuser {
            // Fixtures: one role for everything.
            for db in ["all", "replication"] {
                rows.push([
                    ty.into(),
                    db.into(),
                    roles.superuser.name.clone(),
                    cidr.clone(),
                    spec.host_method.clone(),
                ]);
            }
            continue;
        }
        for (db, role) in [
            ("replication", &roles.replication),
            ("postgres", &roles.rewind),
            ("postgres", &roles.monitor),
        ] {
            let row = [
                ty.to_string(),
                db.to_string(),
                role.name.clone(),
                cidr.clone(),
                spec.host_method.clone(),
            ];
            if !rows.contains(&row) {
                rows.push(row);
            }
        }
    }
    let mut s = String::from(
        "# Written by Meridian from its config; rewritten on init, clone, rewind and adoption.\n\
         # Edit [postgres] hba in the agent's config instead.\n",
    );
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([["TYPE", "DATABASE", "USER", "ADDRESS"][i].len() + 2])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let fmt_row = |r: [&str; 5]| {
        let mut line = String::new();
        for (i, w) in widths.iter().enumerate() {
            line.push_str(&format!("{:<w$} ", r[i], w = *w));
        }
        line.push_str(r[4]);
        line.push('\n');
        line
    };
    s.push_str(&fmt_row([
        "# TYPE", "DATABASE", "USER", "ADDRESS", "METHOD",
    ]));
    for r in &rows {
        s.push_str(&fmt_row([&r[0], &r[1], &r[2], &r[3], &r[4]]));
    }
    if !spec.user_lines.is_empty() {
        s.push_str("# From [postgres] hba:\n");
        for l in &spec.user_lines {
            s.push_str(l.trim());
            s.push('\n');
        }
    }
    s
}

/// The contents of `pg_ident.conf`: the `meridian` map lets the agent's and Postgres' OS
/// users log in over the unix socket as Meridian's roles (`peer`).
pub fn render_ident(spec: &HbaSpec, roles: &PgRoles) -> String {
    let mut s = String::from("# Written by Meridian.\n# MAPNAME  SYSTEM-USERNAME  PG-USERNAME\n");
    let mut users = vec![roles.superuser.name.clone()];
    for (_, r) in roles.managed() {
        users.push(r.name.clone());
    }
    let mut os_users = spec.ident_os_users.clone();
    os_users.dedup();
    for os in &os_users {
        for u in &users {
            s.push_str(&format!("{IDENT_MAP} {os} {u}\n"));
        }
    }
    s
}

fn passfile_field(v: &str) -> String {
    v.replace('\\', "\\\\").replace(':', "\\:")
}

/// The contents of the libpq passfile (`hostname:port:database:username:password`): one
/// line per role with a password, any host, port and database.
pub fn render_passfile(roles: &PgRoles) -> String {
    let mut s = String::new();
    let mut seen = Vec::new();
    for r in [
        &roles.replication,
        &roles.rewind,
        &roles.monitor,
        &roles.superuser,
    ] {
        if seen.contains(&&r.name) {
            continue;
        }
        seen.push(&r.name);
        if let Some(p) = &r.password {
            s.push_str(&format!(
                "*:*:*:{}:{}\n",
                passfile_field(&r.name),
                passfile_field(p)
            ));
        }
    }
    s
}

const HBA_TYPES: &[&str] = &[
    "local",
    "host",
    "hostssl",
    "hostnossl",
    "hostgssenc",
    "hostnogssenc",
];
const HBA_METHODS: &[&str] = &[
    "trust",
    "reject",
    "scram-sha-256",
    "md5",
    "password",
    "gss",
    "sspi",
    "ident",
    "peer",
    "pam",
    "ldap",
    "radius",
    "cert",
];

/// Checks one `pg_hba.conf` line as the user wrote it (`host all app 10.0.0.0/8
/// scram-sha-256`): type, database, user, address (not for `local`), method, then
/// `key=value` options. Returns why it is refused.
pub fn validate_hba_line(line: &str) -> Result<(), String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let Some(ty) = fields.first() else {
        return Err("is empty".into());
    };
    if ty.starts_with('#') {
        return Err("is a comment; list only entries".into());
    }
    if !HBA_TYPES.contains(ty) {
        return Err(format!(
            "type {ty:?} is not one of {}",
            HBA_TYPES.join(", ")
        ));
    }
    let local = *ty == "local";
    let need = if local { 4 } else { 5 };
    if fields.len() < need {
        return Err(format!(
            "needs {}: type, database, user, {}method",
            need,
            if local { "" } else { "address, " }
        ));
    }
    let mut rest = &fields[3..];
    if !local {
        let addr = fields[3];
        let ok = matches!(addr, "all" | "samehost" | "samenet")
            || parse_cidr(addr).is_some()
            || (addr.parse::<IpAddr>().is_ok()
                && fields.len() > 5
                && fields[4].parse::<IpAddr>().is_ok())
            || is_hostname(addr);
        if !ok {
            return Err(format!(
                "address {addr:?} is not a CIDR (10.0.0.0/8), all, samehost, samenet or a host name"
            ));
        }
        rest = &fields[4..];
        if addr.parse::<IpAddr>().is_ok() {
            // IP address followed by a netmask.
            rest = &fields[5..];
        }
    }
    let Some(method) = rest.first() else {
        return Err("has no method".into());
    };
    if !HBA_METHODS.contains(method) {
        return Err(format!(
            "method {method:?} is not one of {}",
            HBA_METHODS.join(", ")
        ));
    }
    for opt in &rest[1..] {
        if !opt.contains('=') {
            return Err(format!("option {opt:?} is not key=value"));
        }
    }
    Ok(())
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && s.chars().any(|c| c.is_ascii_alphabetic())
}

/// Parses `ip/prefix`.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles() -> PgRoles {
        PgRoles {
            superuser: PgRole::new("postgres", Some("su".into())),
            replication: PgRole::new("replicator", Some("r:p\\w".into())),
            rewind: PgRole::new("rewinder", Some("w".into())),
            monitor: PgRole::new("meridian_monitor", Some("m".into())),
        }
    }

    fn spec() -> HbaSpec {
        HbaSpec {
            local_method: "peer".into(),
            host_method: "scram-sha-256".into(),
            member_cidrs: vec!["10.0.0.2/32".into(), "10.0.0.3/32".into()],
            hostssl: true,
            user_lines: vec!["host all app 10.0.0.0/8 scram-sha-256".into()],
            ident_os_users: vec!["root".into(), "postgres".into()],
        }
    }

    #[test]
    fn hba_has_local_member_and_user_entries_in_order() {
        let want = "\
# Written by Meridian from its config; rewritten on init, clone, rewind and adoption.
# Edit [postgres] hba in the agent's config instead.
# TYPE  DATABASE    USER             ADDRESS     METHOD
local   all         postgres                     peer map=meridian
local   all         replicator                   peer map=meridian
local   all         rewinder                     peer map=meridian
local   all         meridian_monitor             peer map=meridian
local   replication replicator                   peer map=meridian
hostssl replication replicator       10.0.0.2/32 scram-sha-256
hostssl postgres    rewinder         10.0.0.2/32 scram-sha-256
hostssl postgres    meridian_monitor 10.0.0.2/32 scram-sha-256
hostssl replication replicator       10.0.0.3/32 scram-sha-256
hostssl postgres    rewinder         10.0.0.3/32 scram-sha-256
hostssl postgres    meridian_monitor 10.0.0.3/32 scram-sha-256
# From [postgres] hba:
host all app 10.0.0.0/8 scram-sha-256
";
        assert_eq!(render_hba(&spec(), &roles()), want);
    }

    #[test]
    fn fixture_hba_is_loopback_for_the_superuser() {
        let h = render_hba(
            &HbaSpec::loopback(false),
            &PgRoles::all_superuser("postgres", None),
        );
        let want = "\
# Written by Meridian from its config; rewritten on init, clone, rewind and adoption.
# Edit [postgres] hba in the agent's config instead.
# TYPE DATABASE    USER     ADDRESS      METHOD
local  all         postgres              trust
local  replication postgres              trust
host   all         postgres 127.0.0.1/32 trust
host   replication postgres 127.0.0.1/32 trust
host   all         postgres ::1/128      trust
host   replication postgres ::1/128      trust
";
        assert_eq!(h, want);
        assert!(!h.contains("0.0.0.0"));
    }

    #[test]
    fn ident_maps_os_users_to_meridian_roles() {
        let i = render_ident(&spec(), &roles());
        assert!(i.contains("meridian root postgres\n"), "{i}");
        assert!(i.contains("meridian postgres meridian_monitor\n"), "{i}");
        assert_eq!(i.lines().filter(|l| l.starts_with("meridian ")).count(), 8);
    }

    #[test]
    fn passfile_escapes_colons_and_backslashes() {
        assert_eq!(
            render_passfile(&roles()),
            "*:*:*:replicator:r\\:p\\\\w\n*:*:*:rewinder:w\n*:*:*:meridian_monitor:m\n*:*:*:postgres:su\n"
        );
    }

    #[test]
    fn hba_lines_are_validated() {
        for ok in [
            "host all app 10.0.0.0/8 scram-sha-256",
            "hostssl app,reports all 0.0.0.0/0 scram-sha-256 clientcert=verify-full",
            "local all all peer map=x",
            "host all all 10.0.0.1 255.255.255.255 md5",
            "host all all db.example.com scram-sha-256",
            "host all all samenet reject",
        ] {
            assert_eq!(validate_hba_line(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("hots all all 10.0.0.0/8 md5", "type \"hots\""),
            ("host all app 10.0.0.0/8", "needs 5"),
            ("host all app 10.0.0.0/99 md5", "address"),
            ("host all app 10.0.0.0/8 scram", "method \"scram\""),
            ("local all all peer map", "option \"map\""),
        ] {
            let e = validate_hba_line(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn client_ssl_pairs() {
        assert!(ClientSsl::default().conninfo_pairs().is_empty());
        let c = ClientSsl {
            mode: SslMode::VerifyFull,
            root_cert: Some("/etc/ca.pem".into()),
        };
        assert_eq!(
            c.conninfo_pairs(),
            vec![
                ("sslmode", "verify-full".to_string()),
                ("sslrootcert", "/etc/ca.pem".to_string())
            ]
        );
    }
}
