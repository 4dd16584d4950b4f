//! Postgres control layer: everything the agent does to its local PostgreSQL — create,
//! start, stop, probe, promote, re-point, clone, rewind and fence it — on tokio-postgres and
//! the server tools (`initdb`, `pg_ctl`, `pg_basebackup`, `pg_rewind`). Every step is bounded
//! by a timeout and fails with a [`PgError`] naming the step and why.

mod access;
mod binaries;
mod conninfo;
mod error;
mod exec;
pub mod gate;
mod instance;
mod probe;
mod tls;

pub use access::{
    cidr_of, parse_cidr, render_hba, render_ident, render_passfile, validate_hba_line, ClientSsl,
    HbaSpec, PgRole, PgRoles, ServerSsl, SslMode, IDENT_MAP,
};
pub use binaries::{PgBinaries, REQUIRED_TOOLS};
pub use conninfo::{conninfo, quote_conf_value, quote_conninfo_value, quote_literal};
pub use error::PgError;
pub(crate) use exec::run_tool;
pub use exec::{pid_alive, RunAs, ToolOutput, DEFAULT_OS_USER};
pub use instance::{PgAccess, PgInstance, PgTimeouts, StopMode, FENCE_MARKER};
pub use probe::{PgStatus, StandbyInfo, WalReceiverInfo};
pub use tls::{connect as connect_tls, PgTls};
