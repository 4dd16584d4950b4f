//! The replication policy as text: parsing TOML and JSON into a validated
//! [`Policy`], with the offending key named. Kept out of the core crate, which does not
//! depend on a TOML parser.

use std::fmt;

use meridian_core::policy::{Policy, PolicyError};

/// Parses a policy from TOML and validates it.
pub fn policy_from_toml_str(text: &str) -> Result<Policy, PolicyError> {
    let de = toml::de::Deserializer::parse(text)
        .map_err(|e| PolicyError::new("(syntax)", None, e.message().trim().to_string()))?;
    finish(serde_path_to_error::deserialize(de))
}

/// Parses a policy from JSON and validates it.
pub fn policy_from_json_str(text: &str) -> Result<Policy, PolicyError> {
    let mut de = serde_json::Deserializer::from_str(text);
    finish(serde_path_to_error::deserialize(&mut de))
}

fn finish<E: fmt::Display>(
    parsed: Result<Policy, serde_path_to_error::Error<E>>,
) -> Result<Policy, PolicyError> {
    let policy = parsed.map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." {
            "(top level)".into()
        } else {
            key
        };
        PolicyError::new(key, None, e.into_inner().to_string())
    })?;
    policy.validate()?;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::policy::{Durability, FailoverMode, SyncMode};

    #[test]
    fn parses_toml_and_json_and_round_trips() {
        let p = policy_from_toml_str(
            r#"
            sync_quorum = 2
            durability = "preferred"
            [regions.us-west]
            mode = "sync"
            priority = 5
            [regions.eu]
            failover = "manual"
            "#,
        )
        .unwrap();
        assert_eq!(p.sync_quorum, 2);
        assert_eq!(p.durability, Durability::Preferred);
        assert_eq!(p.region("us-west").mode, SyncMode::Sync);
        assert_eq!(p.region("us-west").priority, 5);
        assert_eq!(p.region("us-west").failover, FailoverMode::Auto);
        assert_eq!(p.region("eu").failover, FailoverMode::Manual);
        assert_eq!(p.commit_latency_budget_ms, 10, "unset keys keep defaults");

        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(policy_from_json_str(&json).unwrap(), p);
        let toml_text = toml::to_string(&p).unwrap();
        assert_eq!(policy_from_toml_str(&toml_text).unwrap(), p);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = policy_from_toml_str("sync_qorum = 2").unwrap_err();
        assert!(e.reason.contains("sync_qorum"), "{e}");
        let e = policy_from_toml_str("[regions.eu]\nmode = \"fast\"").unwrap_err();
        assert_eq!(e.key, "regions.eu.mode", "{e}");
        let e = policy_from_json_str(r#"{"sync_quorum": 0}"#).unwrap_err();
        assert_eq!(e.key, "sync_quorum");
        let e = policy_from_toml_str("[regions.\"US.West\"]\nmode = \"sync\"").unwrap_err();
        assert_eq!(e.key, "regions.US.West");
    }
}
