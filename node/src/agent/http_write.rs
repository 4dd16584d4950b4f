//! The runtime behind the HTTP write endpoints: turns a [`WriteRequest`] into the same
//! intent command the admin API takes and runs it through [`AdminService`] (which routes
//! it to the Raft leader and applies the manual-failover safety check there).

use std::sync::Arc;

use axum::http::StatusCode;
use meridian_proto::admin_server::Admin;
use tonic::Request;

use super::admin::AdminService;
use super::join::unix_ms;
use super::Shared;
use crate::http::{WriteError, WriteFn, WriteRequest};
use crate::raft::intent::{Command, PendingSwitchover, Promote, PromotionKind};

/// The [`WriteFn`] of this agent.
pub fn write_fn(shared: Arc<Shared>) -> WriteFn {
    Arc::new(move |req| {
        let shared = shared.clone();
        Box::pin(async move { carry_out(&shared, req).await })
    })
}

/// The intent command for `req`, built on this member's view of the intent (the leader
/// validates it again against the committed one).
pub fn command_for(intent: &crate::raft::Intent, req: WriteRequest) -> Result<Command, WriteError> {
    let conflict = |m: String| (StatusCode::CONFLICT, m);
    Ok(match req {
        WriteRequest::Switchover { from, to } => {
            let primary = intent
                .primary
                .clone()
                .ok_or_else(|| conflict("the cluster has no primary".into()))?;
            if let Some(f) = from.filter(|f| *f != primary) {
                return Err(conflict(format!("{f} is not the primary ({primary} is)")));
            }
            Command::BeginSwitchover(PendingSwitchover {
                from: primary,
                to,
                started_at_unix_ms: unix_ms(),
                phase: Default::default(),
            })
        }
        WriteRequest::Failover {
            candidate,
            allow_data_loss,
        } => Command::Promote(Promote {
            member: candidate,
            generation: intent.generation.next(),
            kind: PromotionKind::Manual,
            force: allow_data_loss,
            reason: format!(
                "operator failover over HTTP{}",
                if allow_data_loss {
                    " (data loss allowed)"
                } else {
                    ""
                }
            ),
            at_unix_ms: unix_ms(),
            old_primary_lsn: None,
            new_primary_lsn: None,
            possible_loss_bytes: None,
            old_lease_released: false,
            lease_break_round: None,
        }),
        WriteRequest::Pause(on) => Command::SetMaintenance { on },
    })
}

async fn carry_out(
    shared: &Arc<Shared>,
    req: WriteRequest,
) -> Result<serde_json::Value, WriteError> {
    let intent = shared.applied().intent.clone();
    let cmd = command_for(&intent, req)?;
    let token = super::join::admin_token(&shared.config);
    let svc = AdminService::new(shared.clone());
    let r = svc
        .command(Request::new(crate::admin_client::request(&cmd, &token)))
        .await
        .map_err(|s| {
            let code = match s.code() {
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (code, s.message().to_string())
        })?;
    let committed = crate::admin_client::decode(r.get_ref())
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(refusal) = committed.refusal() {
        return Err((StatusCode::CONFLICT, refusal));
    }
    // The body callers have always had: the log index and the response as the log has it.
    Ok(serde_json::json!({
        "log_index": committed.log_index,
        "response": committed.response,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::intent::Intent;
    use crate::types::Generation;

    #[test]
    fn requests_become_intent_commands() {
        let mut i = Intent {
            primary: Some("a1".into()),
            generation: Generation(4),
            ..Intent::default()
        };
        match command_for(
            &i,
            WriteRequest::Switchover {
                from: None,
                to: "a2".into(),
            },
        )
        .unwrap()
        {
            Command::BeginSwitchover(sw) => {
                assert_eq!((sw.from.as_str(), sw.to.as_str()), ("a1", "a2"))
            }
            other => panic!("{other:?}"),
        }
        let wrong = command_for(
            &i,
            WriteRequest::Switchover {
                from: Some("b1".into()),
                to: "a2".into(),
            },
        );
        assert_eq!(wrong.unwrap_err().0, StatusCode::CONFLICT);
        match command_for(
            &i,
            WriteRequest::Failover {
                candidate: "b1".into(),
                allow_data_loss: true,
            },
        )
        .unwrap()
        {
            Command::Promote(p) => {
                assert_eq!(p.generation, Generation(5));
                assert!(p.force);
                assert_eq!(p.kind, PromotionKind::Manual);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            command_for(&i, WriteRequest::Pause(true)).unwrap(),
            Command::SetMaintenance { on: true }
        );
        i.primary = None;
        assert!(command_for(
            &i,
            WriteRequest::Switchover {
                from: None,
                to: "a2".into()
            }
        )
        .is_err());
    }
}
