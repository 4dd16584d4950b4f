//! The admin API as meridianctl uses it: tries the endpoints in order (each connect and
//! request bounded), prefers an answer from the Raft leader, and turns gRPC failures and
//! intent refusals into one-line reasons.

use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_node::raft::{Command, Intent};
use meridian_proto::admin_client::AdminClient;
use meridian_proto::{
    MemberActionRequest, MemberActionResponse, PgCatalogRequest, QueryRequest, QueryResponse,
    RemoveMemberRequest, StatusRequest, StatusResponse,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::settings::{Endpoint, Settings};

/// Connecting to one endpoint never takes longer than this (or the request timeout, if lower):
/// a dead address must not hold up the next one.
const MAX_CONNECT_MS: u64 = 3_000;
/// How long an idempotent write is retried while the cluster has no leader.
pub const LEADERLESS_RETRY: Duration = Duration::from_secs(10);
const LEADERLESS_RETRY_EVERY: Duration = Duration::from_millis(300);

/// A status answer and what the answer's intent decodes to.
pub struct Snapshot {
    pub status: StatusResponse,
    pub intent: Intent,
    /// The same intent as raw JSON: history fields newer than this build are kept.
    pub intent_raw: serde_json::Value,
}

pub struct Client {
    settings: Settings,
    tls: Option<ClientTlsConfig>,
}

impl Client {
    pub fn new(settings: Settings) -> anyhow::Result<Client> {
        let tls = match &settings.tls {
            Some(t) => {
                let ca = std::fs::read(&t.ca_file)
                    .with_context(|| format!("reading the CA file {}", t.ca_file.display()))?;
                let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let (Some(c), Some(k)) = (&t.cert_file, &t.key_file) {
                    let cert = std::fs::read(c)
                        .with_context(|| format!("reading the certificate {}", c.display()))?;
                    let key = std::fs::read(k)
                        .with_context(|| format!("reading the key {}", k.display()))?;
                    cfg = cfg.identity(Identity::from_pem(cert, key));
                }
                Some(cfg)
            }
            None => None,
        };
        Ok(Client { settings, tls })
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.timeout_ms)
    }

    async fn connect(&self, ep: &Endpoint) -> anyhow::Result<AdminClient<Channel>> {
        self.connect_with(ep, self.timeout()).await
    }

    /// Like `connect`, with a request bound of its own (a backup outlasts `timeout_ms`).
    async fn connect_with(
        &self,
        ep: &Endpoint,
        request_timeout: Duration,
    ) -> anyhow::Result<AdminClient<Channel>> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let connect = Duration::from_millis(self.settings.timeout_ms.min(MAX_CONNECT_MS));
        let mut e = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", ep.address))
            .with_context(|| format!("endpoint {}", ep.label()))?
            .connect_timeout(connect)
            .timeout(request_timeout);
        if request_timeout > self.timeout() {
            // A long call (backup, restore) must outlive the members' 30 s idle limit on
            // connections: HTTP/2 pings keep this one in use.
            e = e
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true);
        }
        if let Some(tls) = &self.tls {
            let mut tls = tls.clone();
            if let Some(name) = &ep.server_name {
                tls = tls.domain_name(name.clone());
            }
            e = e
                .tls_config(tls)
                .with_context(|| format!("TLS settings for {}", ep.label()))?;
        }
        let ch = tokio::time::timeout(connect, e.connect())
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {} ms", connect.as_millis()))?
            .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))?;
        Ok(AdminClient::new(ch))
    }

    /// The first endpoint that accepts a connection, in order.
    async fn first(&self) -> anyhow::Result<(Endpoint, AdminClient<Channel>)> {
        let mut failures = Vec::new();
        for ep in &self.settings.endpoints {
            match self.connect(ep).await {
                Ok(c) => return Ok((ep.clone(), c)),
                Err(e) => failures.push(format!("{}: {e:#}", ep.label())),
            }
        }
        anyhow::bail!("no endpoint answered ({})", failures.join("; "))
    }

    /// Cluster status. Tries the endpoints in order and keeps the first answer that comes
    /// from the leader; when none does, the first answer (a follower's view) is returned.
    pub async fn status(&self) -> anyhow::Result<Snapshot> {
        let mut failures = Vec::new();
        let mut fallback = None;
        for ep in &self.settings.endpoints {
            let answer = async {
                let mut c = self.connect(ep).await?;
                let r = tokio::time::timeout(self.timeout(), c.status(self.status_request()))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("no answer within {} ms", self.settings.timeout_ms)
                    })?
                    .map_err(|s| anyhow::anyhow!("{}", describe_status(&s)))?;
                anyhow::Ok(r.into_inner())
            }
            .await;
            match answer {
                Ok(s) if s.from_leader => return snapshot(s),
                Ok(s) => {
                    if fallback.is_none() {
                        fallback = Some(s);
                    }
                }
                Err(e) => failures.push(format!("{}: {e:#}", ep.label())),
            }
        }
        match fallback {
            Some(s) => snapshot(s),
            None => anyhow::bail!("no endpoint answered ({})", failures.join("; ")),
        }
    }

    /// Sends an intent command (forwarded to the leader by whoever answers). With
    /// `retry_leaderless`, an `Unavailable` answer (no leader yet, leadership moving) is
    /// retried for at most [`LEADERLESS_RETRY`]: only for commands whose repetition is
    /// harmless. Returns the log index; a refusal is an error carrying its reason.
    pub async fn command(&self, cmd: &Command, retry_leaderless: bool) -> anyhow::Result<u64> {
        use meridian_node::admin_client::{submit, SubmitError};
        let deadline = Instant::now() + LEADERLESS_RETRY;
        loop {
            let (ep, mut c) = self.first().await?;
            match submit(&mut c, cmd, &self.settings.token, self.timeout()).await {
                Ok(committed) => {
                    if let Some(refusal) = committed.refusal() {
                        anyhow::bail!("refused by the cluster: {refusal}");
                    }
                    return Ok(committed.log_index);
                }
                Err(SubmitError::Status(s))
                    if retry_leaderless
                        && s.code() == tonic::Code::Unavailable
                        && Instant::now() + LEADERLESS_RETRY_EVERY < deadline =>
                {
                    tokio::time::sleep(LEADERLESS_RETRY_EVERY).await;
                }
                Err(SubmitError::Status(s)) => anyhow::bail!("{}", describe_status(&s)),
                Err(SubmitError::Timeout(ms)) => {
                    anyhow::bail!("{} did not answer within {ms} ms", ep.label())
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn remove_member(&self, name: &str) -> anyhow::Result<()> {
        let (ep, mut c) = self.first().await?;
        // Removal changes the Raft membership (a joint consensus): give it twice the bound.
        let bound = self.timeout() * 2;
        let mut req = tonic::Request::new(RemoveMemberRequest {
            name: name.to_string(),
            token: self.settings.token.clone(),
        });
        req.set_timeout(bound);
        tokio::time::timeout(bound, c.remove_member(req))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} did not answer within {} ms",
                    ep.label(),
                    bound.as_millis()
                )
            })?
            .map_err(|s| anyhow::anyhow!("{}", describe_status(&s)))?;
        Ok(())
    }
}

impl Client {
    /// `Admin.BackupOp` (ctl/src/backup.rs): runs on `member` (empty: the cluster picks),
    /// bounded by `bound`. Returns the member that ran it and its JSON result.
    pub async fn backup_op(
        &self,
        member: &str,
        op_json: &str,
        bound: Duration,
    ) -> anyhow::Result<(String, serde_json::Value)> {
        let mut failures = Vec::new();
        let mut client = None;
        for ep in &self.settings.endpoints {
            match self.connect_with(ep, bound).await {
                Ok(c) => {
                    client = Some((ep.clone(), c));
                    break;
                }
                Err(e) => failures.push(format!("{}: {e:#}", ep.label())),
            }
        }
        let Some((ep, mut c)) = client else {
            anyhow::bail!("no endpoint answered ({})", failures.join("; "));
        };
        let mut req = tonic::Request::new(meridian_proto::BackupOpRequest {
            token: self.settings.token.clone(),
            member: member.to_string(),
            op_json: op_json.to_string(),
            timeout_ms: bound.as_millis() as u64,
        });
        req.set_timeout(bound + Duration::from_secs(1));
        let r = tokio::time::timeout(bound + Duration::from_secs(2), c.backup_op(req))
            .await
            .map_err(|_| {
                anyhow::anyhow!("{} did not answer within {} s", ep.label(), bound.as_secs())
            })?
            .map_err(|s| anyhow::Error::new(RpcFailure::from(&s)))?
            .into_inner();
        let v = serde_json::from_str(&r.result_json).context("decoding the member's answer")?;
        Ok((r.member, v))
    }

    /// One unary call on the first endpoint that answers, bounded by `bound`.
    async fn call<T, R, F, Fut>(&self, bound: Duration, message: T, f: F) -> anyhow::Result<R>
    where
        F: FnOnce(AdminClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let (ep, c) = self.first().await?;
        let mut req = tonic::Request::new(message);
        req.set_timeout(bound);
        let r = tokio::time::timeout(bound, f(c, req))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} did not answer within {} ms",
                    ep.label(),
                    bound.as_millis()
                )
            })?
            .map_err(|s| anyhow::anyhow!("{}", describe_status(&s)))?;
        Ok(r.into_inner())
    }

    /// The `pg_settings` rows of `names` from `member`'s Postgres (empty: whichever
    /// member answers, or the primary's), and who answered.
    pub async fn pg_catalog(
        &self,
        names: &[String],
        member: &str,
    ) -> anyhow::Result<(Vec<meridian_node::pgparams::CatalogEntry>, String)> {
        let msg = PgCatalogRequest {
            names: names.to_vec(),
            member: member.to_string(),
            token: self.settings.token.clone(),
        };
        let r = self
            .call(self.timeout(), msg, |mut c, r| async move {
                c.pg_catalog(r).await
            })
            .await?;
        let entries = serde_json::from_str(&r.entries_json)
            .with_context(|| format!("decoding the catalog from {}", r.answered_by))?;
        Ok((entries, r.answered_by))
    }

    /// `reload` or `restart` of one member's Postgres, executed by its agent.
    pub async fn member_action(
        &self,
        member: &str,
        action: &str,
        bound: Duration,
    ) -> anyhow::Result<MemberActionResponse> {
        let msg = MemberActionRequest {
            member: member.to_string(),
            action: action.to_string(),
            token: self.settings.token.clone(),
        };
        self.call(
            bound,
            msg,
            |mut c, r| async move { c.member_action(r).await },
        )
        .await
    }

    pub async fn query(
        &self,
        member: &str,
        sql: &str,
        max_rows: u32,
        timeout: Duration,
    ) -> anyhow::Result<QueryResponse> {
        let msg = QueryRequest {
            member: member.to_string(),
            sql: sql.to_string(),
            token: self.settings.token.clone(),
            max_rows,
            timeout_ms: timeout.as_millis() as u64,
        };
        self.call(timeout + self.timeout(), msg, |mut c, r| async move {
            c.query(r).await
        })
        .await
    }

    /// A status request carrying the admin token (status needs it too: see the agent's
    /// admin API), as `authorization: Bearer`.
    fn status_request(&self) -> tonic::Request<StatusRequest> {
        let mut r = tonic::Request::new(StatusRequest { local: false });
        if !self.settings.token.is_empty() {
            if let Ok(v) = format!("Bearer {}", self.settings.token).parse() {
                r.metadata_mut().insert("authorization", v);
            }
        }
        r
    }
}

fn snapshot(status: StatusResponse) -> anyhow::Result<Snapshot> {
    let intent_raw: serde_json::Value = serde_json::from_str(&status.intent_json)
        .with_context(|| format!("decoding the intent from {}", status.answered_by))?;
    let intent: Intent = serde_json::from_value(intent_raw.clone())
        .with_context(|| format!("decoding the intent from {}", status.answered_by))?;
    Ok(Snapshot {
        status,
        intent,
        intent_raw,
    })
}

/// A refused or failed call, with its gRPC code for callers that branch on it; shown as
/// [`describe_status`].
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct RpcFailure {
    pub code: tonic::Code,
    pub text: String,
}

impl From<&tonic::Status> for RpcFailure {
    fn from(s: &tonic::Status) -> Self {
        RpcFailure {
            code: s.code(),
            text: describe_status(s),
        }
    }
}

/// A gRPC failure as one line an operator can act on.
pub fn describe_status(s: &tonic::Status) -> String {
    let msg = one_line(s.message());
    match s.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            format!("permission denied: {msg} (check --token / MERIDIAN_TOKEN)")
        }
        tonic::Code::Unavailable => format!("unavailable: {msg}"),
        tonic::Code::DeadlineExceeded => format!("timed out: {msg}"),
        tonic::Code::NotFound => format!("not found: {msg}"),
        tonic::Code::FailedPrecondition => format!("refused: {msg}"),
        tonic::Code::InvalidArgument => format!("invalid request: {msg}"),
        tonic::Code::Unimplemented => format!("not supported: {msg}"),
        _ => format!("{}: {msg}", s.code().description()),
    }
}

/// Joins an error and its sources: transport errors hide the useful part in a source.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    one_line(&parts.join(": "))
}

pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
