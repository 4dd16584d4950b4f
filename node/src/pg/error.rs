//! The error every control-layer step returns: which step failed and why (with the tail of
//! the tool's stderr where a tool ran). Callers branch on the variant.

use std::path::PathBuf;

/// A failed control-layer step. `step` is a short verb phrase such as `"initdb"` or
/// `"promote: pg_promote"`.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{step}: could not run {tool}: {source}")]
    Spawn {
        step: &'static str,
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {tool} did not finish within {timeout_ms} ms and was killed; stderr: {stderr_tail}")]
    ToolTimeout {
        step: &'static str,
        tool: String,
        timeout_ms: u64,
        stderr_tail: String,
    },
    #[error("{step}: {tool} failed ({status}); stderr: {stderr_tail}")]
    ToolFailed {
        step: &'static str,
        tool: String,
        status: String,
        stderr_tail: String,
    },
    #[error("{step}: {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {}", sql_detail(source))]
    Sql {
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{step}: no answer within {timeout_ms} ms")]
    Timeout { step: &'static str, timeout_ms: u64 },
    #[error("no PostgreSQL bin dir found: {0}")]
    NoBinDir(String),
    #[error("PostgreSQL bin dir {dir} lacks {missing}")]
    MissingBinaries { dir: PathBuf, missing: String },
    #[error("cannot run PostgreSQL as OS user {user:?}: {why}")]
    OsUser { user: String, why: String },
    #[error("{step}: data dir {data_dir} is fenced (marker {marker} present); clear the fence or start it as a standby")]
    Fenced {
        step: &'static str,
        data_dir: PathBuf,
        marker: PathBuf,
    },
    #[error("{step}: {what}")]
    State { step: &'static str, what: String },
}

impl PgError {
    pub(crate) fn io(step: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PgError::Io {
            step,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn sql(step: &'static str, source: tokio_postgres::Error) -> Self {
        PgError::Sql { step, source }
    }

    pub(crate) fn state(step: &'static str, what: impl Into<String>) -> Self {
        PgError::State {
            step,
            what: what.into(),
        }
    }

    /// The SQLSTATE of a server-side SQL error, if this is one.
    pub fn sql_state(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            PgError::Sql { source, .. } => source.code(),
            _ => None,
        }
    }
}

/// tokio-postgres shows a server error as just "db error": spell out the server's words.
fn sql_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => match std::error::Error::source(e) {
            Some(inner) => format!("{e}: {inner}"),
            None => e.to_string(),
        },
    }
}

/// The last `max_chars` characters of a tool's output, trimmed, for error messages.
pub(crate) fn tail(s: &str, max_chars: usize) -> String {
    let s = s.trim();
    let n = s.chars().count();
    if n <= max_chars {
        return s.to_string();
    }
    let skip = n - max_chars;
    format!("…{}", s.chars().skip(skip).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail("  abc \n", 10), "abc");
        assert_eq!(tail("abcdef", 3), "…def");
    }
}
