//! Cluster-wide Postgres parameters (`edit-config --set postgresql.parameters.NAME=VALUE`):
//! the part of the policy that holds them, the names Meridian owns and refuses, and the
//! validation of one name and value against a server's catalog (`pg_settings`).
//!
//! Pure: the catalog rows are read elsewhere (the agent answering `Admin.PgCatalog`, from
//! its own Postgres) and handed in. The values are kept as the operator wrote them and
//! rendered into Meridian's `meridian.conf` by the Postgres control layer, so every
//! member applies the same settings after init, clone, rewind and adoption alike.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest parameter value kept (a longer one is a paste accident, not a setting).
pub const MAX_VALUE_LEN: usize = 1024;
/// At most this many parameters in the policy (it lives in every Raft snapshot).
pub const MAX_PARAMETERS: usize = 256;

/// `[postgresql]` of the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresqlPolicy {
    /// Server parameters every member applies, by name (lowercase), as written.
    pub parameters: BTreeMap<String, String>,
}

impl PostgresqlPolicy {
    pub fn is_empty(&self) -> bool {
        self.parameters.is_empty()
    }
}

/// Why a parameter (name or value) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error(
        "{name:?} is not a parameter name (letters, digits, '_' and, for extensions, one '.')"
    )]
    BadName { name: String },
    #[error("{name} is managed by Meridian and cannot be set cluster-wide: {why}")]
    Owned { name: String, why: &'static str },
    #[error("{name} is not a parameter this Postgres knows (no row in pg_settings)")]
    Unknown { name: String },
    #[error("{name} cannot be changed: it is fixed when the server is built or initialized (context internal)")]
    Internal { name: String },
    #[error("{name} = {value:?}: {reason}")]
    BadValue {
        name: String,
        value: String,
        reason: String,
    },
    #[error("at most {max} parameters can be set cluster-wide", max = MAX_PARAMETERS)]
    TooMany,
}

/// One row of `pg_settings`, as much of it as validation needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub name: String,
    /// `bool`, `integer`, `real`, `string` or `enum`.
    pub vartype: String,
    /// `internal`, `postmaster`, `sighup`, `superuser-backend`, `backend`, `superuser`,
    /// `user`.
    pub context: String,
    /// e.g. `8kB`, `ms`, `s`; None when unitless.
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub min_val: Option<String>,
    #[serde(default)]
    pub max_val: Option<String>,
    #[serde(default)]
    pub enumvals: Vec<String>,
}

impl CatalogEntry {
    /// A change takes effect only at the next server start.
    pub fn needs_restart(&self) -> bool {
        self.context == "postmaster"
    }
}

/// Names Meridian sets itself (replication, addresses, files, archiving): a cluster-wide
/// value would fight the agent's. `None` when the name is the operator's.
pub fn owned(name: &str) -> Option<&'static str> {
    let n = name.to_ascii_lowercase();
    let exact: &[(&str, &'static str)] = &[
        (
            "primary_conninfo",
            "the agent points each standby at its upstream",
        ),
        ("primary_slot_name", "the agent names each standby's slot"),
        (
            "synchronous_standby_names",
            "the replication policy decides the sync set",
        ),
        (
            "synchronous_commit",
            "it decides what a sync commit waits for; the replication policy owns that",
        ),
        ("port", "set it in the agent config ([postgres] port)"),
        (
            "listen_addresses",
            "set it in the agent config ([postgres] listen_addr)",
        ),
        (
            "unix_socket_directories",
            "set it in the agent config ([postgres] socket_dir)",
        ),
        ("hba_file", "Meridian writes pg_hba.conf ([postgres] hba)"),
        ("ident_file", "Meridian writes pg_ident.conf"),
        (
            "config_file",
            "Meridian includes its settings from postgresql.conf",
        ),
        (
            "data_directory",
            "set it in the agent config ([postgres] data_dir)",
        ),
        ("external_pid_file", "the agent reads postmaster.pid"),
        ("cluster_name", "it carries the member name"),
        ("wal_level", "streaming replication needs replica"),
        ("hot_standby", "standbys must serve reads and probes"),
        ("wal_log_hints", "pg_rewind needs it"),
        ("restore_command", "the backup integration owns WAL restore"),
        (
            "max_slot_wal_keep_size",
            "set it in the agent config ([postgres] max_slot_wal_keep_size)",
        ),
        ("password_encryption", "Meridian's roles use scram-sha-256"),
        ("promote_trigger_file", "promotion goes through pg_promote"),
        ("ssl", "set it in the agent config ([postgres.ssl])"),
    ];
    if let Some((_, why)) = exact.iter().find(|(k, _)| *k == n) {
        return Some(why);
    }
    let prefixes: &[(&str, &'static str)] = &[
        ("archive_", "the backup integration owns WAL archiving"),
        (
            "recovery_",
            "recovery targets belong to point-in-time restores, not the cluster",
        ),
        ("ssl_", "set it in the agent config ([postgres.ssl])"),
    ];
    prefixes
        .iter()
        .find(|(p, _)| n.starts_with(p))
        .map(|(_, why)| *why)
}

/// Checks the syntax of a name and that Meridian does not own it; returns it lowercased
/// (Postgres' names are case-insensitive).
pub fn check_name(name: &str) -> Result<String, ParamError> {
    let n = name.trim().to_ascii_lowercase();
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !p.starts_with(|c: char| c.is_ascii_digit())
    };
    let parts: Vec<&str> = n.split('.').collect();
    if n.len() > 63 || parts.len() > 2 || !parts.iter().all(|p| ok_part(p)) {
        return Err(ParamError::BadName {
            name: name.to_string(),
        });
    }
    if let Some(why) = owned(&n) {
        return Err(ParamError::Owned { name: n, why });
    }
    Ok(n)
}

/// Checks what can be checked without a server: the name, no control characters, the
/// length. The policy's own validation runs this on every parameter.
pub fn check_offline(name: &str, value: &str) -> Result<(), ParamError> {
    let n = check_name(name)?;
    let bad = |reason: &str| ParamError::BadValue {
        name: n.clone(),
        value: value.to_string(),
        reason: reason.to_string(),
    };
    if value.len() > MAX_VALUE_LEN {
        return Err(bad(&format!("longer than {MAX_VALUE_LEN} bytes")));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(bad("holds a control character (newline, tab, ...)"));
    }
    Ok(())
}

/// Validates `value` for the parameter `entry` describes, as Postgres would parse it
/// (booleans, integers and reals with their units and range, enum values); `entry` is
/// None when the server has no such parameter. Custom (`ext.name`) parameters are only
/// checked offline: an extension's placeholder has no type until it is loaded.
pub fn validate(name: &str, value: &str, entry: Option<&CatalogEntry>) -> Result<(), ParamError> {
    check_offline(name, value)?;
    let n = name.trim().to_ascii_lowercase();
    let Some(e) = entry else {
        if n.contains('.') {
            return Ok(());
        }
        return Err(ParamError::Unknown { name: n });
    };
    if e.context == "internal" {
        return Err(ParamError::Internal { name: n });
    }
    let bad = |reason: String| ParamError::BadValue {
        name: n.clone(),
        value: value.to_string(),
        reason,
    };
    let v = value.trim();
    match e.vartype.as_str() {
        "bool" => {
            const WORDS: [&str; 12] = [
                "on", "off", "true", "false", "yes", "no", "1", "0", "t", "f", "y", "n",
            ];
            if !WORDS.contains(&v.to_ascii_lowercase().as_str()) {
                return Err(bad(
                    "expected a boolean: on, off, true, false, yes, no, 1 or 0".into(),
                ));
            }
        }
        "integer" | "real" => {
            let x = in_setting_units(v, e.unit.as_deref(), e.vartype == "integer").map_err(bad)?;
            let min = e.min_val.as_deref().and_then(|m| m.parse::<f64>().ok());
            let max = e.max_val.as_deref().and_then(|m| m.parse::<f64>().ok());
            let unit = e.unit.as_deref().map_or(String::new(), |u| format!(" {u}"));
            if let (Some(min), Some(max)) = (min, max) {
                if x < min || x > max {
                    return Err(bad(format!(
                        "out of range: {} to {}{unit} (this value is {}{unit})",
                        e.min_val.as_deref().unwrap_or_default(),
                        e.max_val.as_deref().unwrap_or_default(),
                        trim_float(x)
                    )));
                }
            }
        }
        "enum" if !e.enumvals.iter().any(|a| a.eq_ignore_ascii_case(v)) => {
            return Err(bad(format!("expected one of {}", e.enumvals.join(", "))));
        }
        // Strings: anything printable (checked offline).
        _ => {}
    }
    Ok(())
}

fn trim_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// A memory unit in bytes, or a time unit in microseconds, with its kind.
fn unit_scale(u: &str) -> Option<(bool, f64)> {
    // (is_memory, scale)
    Some(match u {
        "B" => (true, 1.0),
        "kB" => (true, 1024.0),
        "MB" => (true, 1024.0 * 1024.0),
        "GB" => (true, 1024.0 * 1024.0 * 1024.0),
        "TB" => (true, 1024.0 * 1024.0 * 1024.0 * 1024.0),
        "us" => (false, 1.0),
        "ms" => (false, 1e3),
        "s" => (false, 1e6),
        "min" => (false, 60e6),
        "h" => (false, 3600e6),
        "d" => (false, 86400e6),
        _ => return None,
    })
}

/// `unit` of pg_settings (`8kB`, `kB`, `ms`, ...) as (is_memory, scale).
fn setting_unit(unit: &str) -> Option<(bool, f64)> {
    let digits: String = unit.chars().take_while(|c| c.is_ascii_digit()).collect();
    let rest = &unit[digits.len()..];
    let mult: f64 = if digits.is_empty() {
        1.0
    } else {
        digits.parse().ok()?
    };
    let (mem, s) = unit_scale(rest)?;
    Some((mem, s * mult))
}

/// The number `v` means in the setting's own unit (Postgres' rule: a bare number is in
/// the setting's unit; a suffix converts, and must be of the same kind).
fn in_setting_units(v: &str, unit: Option<&str>, integer: bool) -> Result<f64, String> {
    let split = v
        .char_indices()
        .find(|(i, c)| {
            !(c.is_ascii_digit() || *c == '.' || ((*c == '-' || *c == '+') && *i == 0))
                && !((*c == 'e' || *c == 'E') && !integer)
        })
        .map_or(v.len(), |(i, _)| i);
    let (num, suffix) = v.split_at(split);
    let suffix = suffix.trim();
    let what = if integer { "an integer" } else { "a number" };
    // Postgres rounds a fractional value of an integer parameter (`1.5GB`).
    let x: f64 = num
        .parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
        .ok_or_else(|| format!("expected {what}{}", unit_hint(unit)))?;
    if suffix.is_empty() {
        return Ok(x);
    }
    let Some((mem, scale)) = unit.and_then(setting_unit) else {
        return Err(format!(
            "this parameter takes no unit, but {suffix:?} was given"
        ));
    };
    match unit_scale(suffix) {
        Some((m, s)) if m == mem => Ok(x * s / scale),
        _ => Err(format!(
            "unknown unit {suffix:?}; valid units here are {}",
            if mem {
                "B, kB, MB, GB and TB"
            } else {
                "us, ms, s, min, h and d"
            }
        )),
    }
}

fn unit_hint(unit: Option<&str>) -> String {
    match unit.and_then(setting_unit) {
        Some((true, _)) => " with an optional unit (B, kB, MB, GB, TB)".into(),
        Some((false, _)) => " with an optional unit (us, ms, s, min, h, d)".into(),
        None => String::new(),
    }
}

/// The parameters a member applies: the cluster's, then its own `[postgres.parameters]`
/// overrides on top.
pub fn effective(
    cluster: &BTreeMap<String, String>,
    overrides: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = cluster.clone();
    out.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vartype: &str, unit: Option<&str>, min: &str, max: &str) -> CatalogEntry {
        CatalogEntry {
            name: "x".into(),
            vartype: vartype.into(),
            context: "user".into(),
            unit: unit.map(str::to_string),
            min_val: Some(min.into()),
            max_val: Some(max.into()),
            enumvals: vec![],
        }
    }

    #[test]
    fn names_meridian_owns_are_refused_with_the_reason() {
        for n in [
            "primary_conninfo",
            "Synchronous_Standby_Names",
            "port",
            "listen_addresses",
            "hba_file",
            "ident_file",
            "archive_command",
            "archive_mode",
            "restore_command",
            "recovery_target_time",
            "ssl_cert_file",
        ] {
            let e = check_name(n).unwrap_err();
            assert!(matches!(e, ParamError::Owned { .. }), "{n}: {e}");
        }
        assert_eq!(
            check_name("port").unwrap_err().to_string(),
            "port is managed by Meridian and cannot be set cluster-wide: set it in the agent config ([postgres] port)"
        );
        assert_eq!(check_name("Work_Mem").unwrap(), "work_mem");
        assert_eq!(
            check_name("pg_stat_statements.max").unwrap(),
            "pg_stat_statements.max"
        );
        for n in ["", "work mem", "a.b.c", "1abc", "work-mem", "x;y"] {
            assert!(
                matches!(check_name(n), Err(ParamError::BadName { .. })),
                "{n}"
            );
        }
    }

    #[test]
    fn integers_with_units_are_converted_and_range_checked() {
        // shared_buffers: unit 8kB, 16..1073741823.
        let sb = entry("integer", Some("8kB"), "16", "1073741823");
        validate("shared_buffers", "128MB", Some(&sb)).unwrap();
        validate("shared_buffers", "16384", Some(&sb)).unwrap();
        let e = validate("shared_buffers", "64kB", Some(&sb)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shared_buffers = \"64kB\": out of range: 16 to 1073741823 8kB (this value is 8 8kB)"
        );
        let e = validate("shared_buffers", "128mb", Some(&sb)).unwrap_err();
        assert!(e.to_string().contains("unknown unit \"mb\""), "{e}");
        let e = validate("shared_buffers", "10s", Some(&sb)).unwrap_err();
        assert!(e.to_string().contains("B, kB, MB, GB and TB"), "{e}");
        let e = validate("shared_buffers", "lots", Some(&sb)).unwrap_err();
        assert!(e.to_string().contains("expected an integer"), "{e}");
        // statement_timeout: ms, 0..2147483647.
        let st = entry("integer", Some("ms"), "0", "2147483647");
        validate("statement_timeout", "30s", Some(&st)).unwrap();
        validate("statement_timeout", "5min", Some(&st)).unwrap();
        assert!(validate("statement_timeout", "-1", Some(&st)).is_err());
        // max_connections: unitless.
        let mc = entry("integer", None, "1", "262143");
        validate("max_connections", "200", Some(&mc)).unwrap();
        let e = validate("max_connections", "200MB", Some(&mc)).unwrap_err();
        assert!(e.to_string().contains("takes no unit"), "{e}");
        assert!(validate("max_connections", "0", Some(&mc)).is_err());
    }

    #[test]
    fn reals_bools_enums_and_strings() {
        let r = entry("real", None, "0", "1");
        validate("checkpoint_completion_target", "0.9", Some(&r)).unwrap();
        assert!(validate("checkpoint_completion_target", "1.5", Some(&r)).is_err());
        let b = CatalogEntry {
            vartype: "bool".into(),
            context: "sighup".into(),
            ..CatalogEntry::default()
        };
        for v in ["on", "OFF", "true", "0"] {
            validate("log_checkpoints", v, Some(&b)).unwrap();
        }
        assert!(validate("log_checkpoints", "maybe", Some(&b)).is_err());
        let en = CatalogEntry {
            vartype: "enum".into(),
            context: "superuser".into(),
            enumvals: vec!["none".into(), "ddl".into(), "mod".into(), "all".into()],
            ..CatalogEntry::default()
        };
        validate("log_statement", "DDL", Some(&en)).unwrap();
        let e = validate("log_statement", "some", Some(&en)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "log_statement = \"some\": expected one of none, ddl, mod, all"
        );
        let s = CatalogEntry {
            vartype: "string".into(),
            context: "user".into(),
            ..CatalogEntry::default()
        };
        validate("application_name", "x", Some(&s)).unwrap();
        assert!(validate("application_name", "a\nb", Some(&s)).is_err());
    }

    #[test]
    fn unknown_internal_and_custom_names() {
        let e = validate("work_mme", "4MB", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "work_mme is not a parameter this Postgres knows (no row in pg_settings)"
        );
        validate("myext.setting", "on", None).unwrap();
        let i = CatalogEntry {
            vartype: "integer".into(),
            context: "internal".into(),
            ..CatalogEntry::default()
        };
        assert!(matches!(
            validate("block_size", "8192", Some(&i)),
            Err(ParamError::Internal { .. })
        ));
        let p = CatalogEntry {
            context: "postmaster".into(),
            ..CatalogEntry::default()
        };
        assert!(p.needs_restart());
    }

    #[test]
    fn member_overrides_win() {
        let c = BTreeMap::from([
            ("work_mem".to_string(), "4MB".to_string()),
            ("a".into(), "1".into()),
        ]);
        let o = BTreeMap::from([("work_mem".to_string(), "8MB".to_string())]);
        let e = effective(&c, &o);
        assert_eq!(e["work_mem"], "8MB");
        assert_eq!(e["a"], "1");
    }
}
