//! `meridianctl`: the operator's command line. Talks to the admin API of any member (the
//! member forwards to the Raft leader). Owns argument parsing, exit codes and the mapping
//! of failures to one-line reasons; the commands live in `ops`.

mod backup;
mod client;
mod day2;
mod ops;
mod settings;
#[cfg(test)]
mod test_support;
mod view;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args as ClapArgs, Parser, Subcommand};

const AFTER_HELP: &str = "\
Endpoints: --endpoint (repeatable, or comma separated), else MERIDIAN_ENDPOINTS, else the
`endpoints` list of the config file. Each is HOST:PORT or NAME=HOST:PORT (NAME is the member
name its TLS certificate carries). They are tried in order; the first that answers is used.

Config file (TOML, --config, default ~/.config/meridian/ctl.toml):
  endpoints = [\"a1=10.0.0.1:7001\", \"b1=10.0.1.1:7001\"]
  token_file = \"/etc/meridian/admin-token\"
  timeout_ms = 5000
  [tls]
  ca_file = \"ca.pem\"
  cert_file = \"client.pem\"
  key_file = \"client.key\"

Exit codes:
  0  success
  1  the operation failed or was refused (the reason is printed on one line)
  2  usage error";

/// Operate a Meridian cluster: list members, switch over, fail over, pause, show history.
#[derive(Parser, Debug)]
#[command(name = "meridianctl", version, about, after_help = AFTER_HELP)]
struct Args {
    #[command(flatten)]
    conn: ConnArgs,
    /// Print stable JSON instead of text meant for people.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(ClapArgs, Debug, Default)]
struct ConnArgs {
    /// Admin API endpoint of a member (HOST:PORT or NAME=HOST:PORT); repeatable.
    #[arg(long, global = true, value_name = "ENDPOINT")]
    endpoint: Vec<String>,
    /// Config file [default: ~/.config/meridian/ctl.toml].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Admin token for commands that change the cluster.
    #[arg(long, global = true, env = "MERIDIAN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the admin token.
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) of the cluster's TLS; turns TLS on.
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Bound on connecting to and waiting for one endpoint, in milliseconds [default: 5000].
    #[arg(long, global = true, value_name = "MS")]
    timeout_ms: Option<u64>,
}

#[derive(ClapArgs, Debug, Clone, Copy)]
pub struct WatchArgs {
    /// Refresh every SECONDS until Ctrl-C (or --count refreshes).
    #[arg(long, value_name = "SECONDS", value_parser = parse_watch)]
    pub watch: Option<f64>,
    /// With --watch: stop after N refreshes.
    #[arg(long, value_name = "N", requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
}

fn parse_watch(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if (0.1..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be between 0.1 and 3600 seconds".into())
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Members with their role, state, timeline, lag and last report; generation, pause state.
    List {
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// The members as a tree by region.
    Topology {
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Planned switchover to a healthy standby (zero loss, short write pause).
    Switchover {
        /// Standby to promote [default: the best healthy standby].
        #[arg(long, value_name = "NAME")]
        candidate: Option<String>,
        /// Cancel the pending switchover instead: if writes already stopped, the primary
        /// takes writes again (no promotion happens). Needs no confirmation.
        #[arg(long, conflicts_with = "candidate")]
        cancel: bool,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        force: bool,
        /// How long to wait for the switchover to finish.
        #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        wait: u64,
        /// Switch over at this time (RFC 3339, e.g. 2026-12-01T03:00:00Z), at most 24 h
        /// ahead: recorded in the cluster (see `list`, cancel with `flush switchover`);
        /// the Raft leader starts it then, with the candidate healthy at that time.
        #[arg(long, value_name = "TIME", conflicts_with = "cancel")]
        scheduled: Option<String>,
    },
    /// Reload the Postgres configuration of members (all data members by default).
    Reload {
        /// Members to reload [default: every data member].
        members: Vec<String>,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        force: bool,
    },
    /// Rolling restart of members' Postgres: standbys first, one at a time, each back
    /// streaming before the next; the primary last, by a switchover when a healthy
    /// candidate exists (or in place with --in-place).
    Restart {
        /// Members to restart [default: every data member].
        members: Vec<String>,
        /// Only members with a parameter change waiting for a restart.
        #[arg(long)]
        pending: bool,
        /// Only members in this role.
        #[arg(long, value_name = "ROLE", value_parser = ["primary", "replica"])]
        role: Option<String>,
        /// Start at this time (RFC 3339), at most 24 h ahead: recorded in the cluster (see
        /// `list`, cancel with `flush restart`); the Raft leader runs it then.
        #[arg(long, value_name = "TIME")]
        scheduled: Option<String>,
        /// Restart the primary in place (a short outage) instead of switching over first.
        #[arg(long)]
        in_place: bool,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        force: bool,
        /// Bound on each member's restart and return to streaming.
        #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
        wait: u64,
    },
    /// Cancel a scheduled switchover or restart (`switchover|restart --scheduled`).
    Flush {
        /// What to cancel.
        #[arg(value_parser = ["switchover", "restart"])]
        what: String,
    },
    /// A libpq connection string for a member's Postgres, or for the members in a role.
    Dsn {
        /// The member.
        #[arg(required_unless_present = "role", conflicts_with = "role")]
        member: Option<String>,
        /// Every member in this role (primary first in a multi-host string for replica).
        #[arg(long, value_name = "ROLE", value_parser = ["primary", "replica", "any"])]
        role: Option<String>,
        /// dbname in the string.
        #[arg(long, value_name = "NAME", default_value = "postgres")]
        dbname: String,
        /// user in the string [default: none, libpq's default].
        #[arg(long, value_name = "USER")]
        user: Option<String>,
    },
    /// Run SQL on a member's Postgres (as its superuser, through the member's agent).
    Query {
        /// The SQL text (several statements: the last one's rows are shown).
        sql: String,
        /// The member to run it on [default: the primary].
        #[arg(long, value_name = "NAME", conflicts_with = "role")]
        member: Option<String>,
        /// Run it on the first healthy member in this role.
        #[arg(long, value_name = "ROLE", value_parser = ["primary", "replica"])]
        role: Option<String>,
        /// Output format.
        #[arg(long, value_name = "FORMAT", default_value = "table", value_parser = ["table", "json", "csv"])]
        format: String,
        /// Bound on the statement (also its statement_timeout).
        #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
        timeout: u64,
        /// Most rows shown.
        #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10000))]
        max_rows: u32,
    },
    /// Manual promotion of a standby (when the primary is gone).
    Failover {
        /// Standby to promote.
        #[arg(long, value_name = "NAME")]
        candidate: String,
        /// Promote even if committed data may be lost (a lagging or async candidate).
        #[arg(long)]
        allow_data_loss: bool,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        force: bool,
        /// How long to wait for the candidate to accept writes.
        #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        wait: u64,
    },
    /// Maintenance mode: no automatic failover until `resume`.
    Pause,
    /// Leave maintenance mode.
    Resume,
    /// Failovers and switchovers: time, reason, old/new primary, generation, LSNs, possible loss.
    History {
        /// Also policy changes, member changes and notes.
        #[arg(long)]
        all: bool,
    },
    /// The cluster-wide replication policy.
    ShowConfig,
    /// Change the policy: validated locally and by the cluster before it is committed.
    /// `postgresql.parameters.NAME` are Postgres parameters every member applies, checked
    /// against a member's pg_settings (name, type, unit, range, enum values).
    EditConfig {
        /// KEY=VALUE, e.g. sync_quorum=2, regions.us-west.mode=sync or
        /// postgresql.parameters.work_mem=64MB; repeatable.
        #[arg(
            long = "set",
            value_name = "KEY=VALUE",
            required_unless_present = "unset"
        )]
        set: Vec<String>,
        /// Remove a Postgres parameter: postgresql.parameters.NAME; repeatable.
        #[arg(long = "unset", value_name = "KEY")]
        unset: Vec<String>,
        /// Show the change without committing it.
        #[arg(long)]
        dry_run: bool,
        /// Refuse the change unless the policy is still at this version (as `show-config`
        /// printed it) [default: the version this command reads].
        #[arg(long, value_name = "N")]
        expected_version: Option<u64>,
    },
    /// Remove a member from the cluster (and from the Raft group).
    Remove {
        name: String,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        force: bool,
    },
    /// Re-clone a standby from the primary.
    Reinit {
        name: String,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        force: bool,
        /// How long to wait for the re-clone to finish and the standby to stream again
        /// (0: only request it).
        #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=86400))]
        wait: u64,
    },
    /// meridianctl's version and every member's.
    Version,
    /// pgBackRest backup (`--type full|diff|incr`); `backup list`, `backup check`.
    Backup(backup::BackupArgs),
    /// Point-in-time restore into a new directory, started standalone for inspection.
    Restore(backup::RestoreArgs),
    /// A named restore point (pg_create_restore_point) on the primary, before risky work.
    RestorePoint { name: String },
}

/// How a command ended badly.
#[derive(Debug)]
pub enum Failure {
    /// Exit 2: the command line cannot be acted on.
    Usage(String),
    /// Exit 1: the operation failed or was refused.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Failed(e)
    }
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            // clap: 0 for --help / --version, 2 for usage errors.
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("error: {}", client::one_line(&msg));
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("error: {}", client::one_line(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    if let Command::Version = args.command {
        // The ctl's own version needs no cluster; members' versions are best effort.
        return ops::version(&args.conn, args.json).await;
    }
    let client = connect(&args.conn)?;
    match args.command {
        Command::Backup(b) => backup::backup(&client, b, args.json).await,
        Command::Restore(r) => backup::restore(&client, r, args.json).await,
        Command::RestorePoint { name } => backup::restore_point(&client, &name, args.json).await,
        command => ops::run(&client, command, args.json).await,
    }
}

fn overrides(c: &ConnArgs) -> settings::Overrides {
    settings::Overrides {
        endpoints: c.endpoint.clone(),
        env_endpoints: std::env::var("MERIDIAN_ENDPOINTS").ok(),
        token: c.token.clone(),
        token_file: c.token_file.clone(),
        tls_ca: c.tls_ca.clone(),
        tls_cert: c.tls_cert.clone(),
        tls_key: c.tls_key.clone(),
        timeout_ms: c.timeout_ms,
    }
}

/// Resolves the connection settings; bad settings are usage errors.
fn connect(c: &ConnArgs) -> Result<client::Client, Failure> {
    let file =
        settings::load_file(c.config.as_deref()).map_err(|e| Failure::Usage(format!("{e:#}")))?;
    let s =
        settings::resolve(&overrides(c), &file).map_err(|e| Failure::Usage(format!("{e:#}")))?;
    client::Client::new(s).map_err(|e| Failure::Usage(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn usage_errors_exit_2_and_help_documents_exit_codes() {
        let e = Args::try_parse_from(["meridianctl", "frobnicate"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = Args::try_parse_from(["meridianctl", "edit-config"]).unwrap_err();
        assert_eq!(e.exit_code(), 2, "--set is required");
        let e = Args::try_parse_from(["meridianctl", "failover"]).unwrap_err();
        assert_eq!(e.exit_code(), 2, "--candidate is required");
        let e = Args::try_parse_from(["meridianctl", "list", "--watch", "0"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let help = Args::command().render_long_help().to_string();
        assert!(
            help.contains("Exit codes:") && help.contains("2  usage error"),
            "{help}"
        );
        let a = Args::try_parse_from([
            "meridianctl",
            "edit-config",
            "--set",
            "sync_quorum=2",
            "--set",
            "durability=preferred",
            "--endpoint",
            "a:1",
            "--json",
        ])
        .unwrap();
        assert!(a.json);
        assert_eq!(a.conn.endpoint, ["a:1"]);
        match a.command {
            Command::EditConfig { set, .. } => assert_eq!(set.len(), 2),
            other => panic!("{other:?}"),
        }
        let a = Args::try_parse_from([
            "meridianctl",
            "edit-config",
            "--set",
            "sync_quorum=2",
            "--expected-version",
            "7",
        ])
        .unwrap();
        assert!(matches!(
            a.command,
            Command::EditConfig {
                expected_version: Some(7),
                ..
            }
        ));
        let a = Args::try_parse_from(["meridianctl", "switchover", "--cancel"]).unwrap();
        assert!(matches!(
            a.command,
            Command::Switchover { cancel: true, .. }
        ));
        let e =
            Args::try_parse_from(["meridianctl", "switchover", "--cancel", "--candidate", "b1"])
                .unwrap_err();
        assert_eq!(e.exit_code(), 2, "--cancel names no candidate");
    }
}
