//! The one client of `Admin.Command`: a typed [`Command`] in, the committed log index and
//! the state machine's typed [`Response`] out. meridianctl, the chaos harness, the tests,
//! an agent proposing through its leader and the HTTP write endpoints all encode and
//! decode through here, so the JSON carried in the gRPC messages has one owner. Retries
//! stay with each caller: what is safe to repeat depends on the command.

use std::time::Duration;

use meridian_proto::admin_client::AdminClient;
use meridian_proto::{CommandRequest, CommandResponse};
use tonic::codegen::{Body, Bytes, StdError};

use crate::raft::intent::{Command, Response};

/// A command the leader committed, and what applying it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub log_index: u64,
    pub response: Response,
}

impl Committed {
    /// The refusal, when applying the command changed nothing.
    pub fn refusal(&self) -> Option<String> {
        match &self.response {
            Response::Refused(r) => Some(r.to_string()),
            _ => None,
        }
    }
}

/// Why a command did not come back committed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The cluster answered with an error status (not the leader's commit).
    #[error("{}", .0.message())]
    Status(tonic::Status),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("the cluster's answer could not be read: {0}")]
    Decode(String),
}

impl SubmitError {
    /// The gRPC status code, when the cluster answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            SubmitError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// The request for `cmd`, with the admin token (empty: none).
pub fn request(cmd: &Command, token: &str) -> CommandRequest {
    CommandRequest {
        // A `Command` always serializes: its fields are strings, numbers and maps with
        // string keys.
        command_json: serde_json::to_string(cmd).unwrap_or_default(),
        token: token.to_string(),
    }
}

/// Reads the leader's answer.
pub fn decode(reply: &CommandResponse) -> Result<Committed, SubmitError> {
    #[derive(serde::Deserialize)]
    struct Wire {
        log_index: u64,
        response: Response,
    }
    let w: Wire = serde_json::from_str(&reply.result_json)
        .map_err(|e| SubmitError::Decode(format!("{e} in {:?}", reply.result_json)))?;
    Ok(Committed {
        log_index: w.log_index,
        response: w.response,
    })
}

/// The answer as the server writes it (the admin service's half of [`decode`]).
pub fn encode(log_index: u64, response: &Response) -> CommandResponse {
    CommandResponse {
        result_json: serde_json::json!({
            "log_index": log_index,
            "response": response,
        })
        .to_string(),
    }
}

/// Sends `cmd` once through `client` (any member: a follower forwards it to the leader),
/// bounded by `timeout`.
pub async fn submit<T>(
    client: &mut AdminClient<T>,
    cmd: &Command,
    token: &str,
    timeout: Duration,
) -> Result<Committed, SubmitError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut req = tonic::Request::new(request(cmd, token));
    req.set_timeout(timeout);
    let reply = tokio::time::timeout(timeout, client.command(req))
        .await
        .map_err(|_| SubmitError::Timeout(timeout.as_millis() as u64))?
        .map_err(SubmitError::Status)?;
    decode(reply.get_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::intent::Refused;
    use crate::types::MemberId;

    #[test]
    fn an_answer_round_trips() {
        for response in [
            Response::Applied,
            Response::Empty,
            Response::MemberAdded(MemberId(7)),
            Response::Refused(Refused::UnknownMember("x".into())),
        ] {
            let back = decode(&encode(42, &response)).unwrap();
            assert_eq!(
                back,
                Committed {
                    log_index: 42,
                    response: response.clone()
                }
            );
        }
        let refused = decode(&encode(
            1,
            &Response::Refused(Refused::UnknownMember("x".into())),
        ))
        .unwrap();
        assert_eq!(refused.refusal().as_deref(), Some("no member named \"x\""));
    }

    #[test]
    fn a_garbled_answer_is_a_decode_error_naming_it() {
        let e = decode(&CommandResponse {
            result_json: "{\"log_index\": \"x\"}".into(),
        })
        .unwrap_err();
        assert!(matches!(e, SubmitError::Decode(_)), "{e}");
        assert!(e.to_string().contains("could not be read"), "{e}");
    }

    #[test]
    fn a_command_request_carries_the_command_and_token() {
        let cmd = Command::SetMaintenance { on: true };
        let r = request(&cmd, "t");
        assert_eq!(r.token, "t");
        let back: Command = serde_json::from_str(&r.command_json).unwrap();
        assert_eq!(back, cmd);
    }
}
