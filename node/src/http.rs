//! The agent's HTTP endpoints, compatible with Patroni's REST API health checks so an
//! existing HAProxy configuration works unchanged, plus `/cluster`, `/history` and a
//! Prometheus `/metrics`.
//!
//! Owns only the mapping from the agent's published [`NodeHealth`] to status codes and
//! bodies; it decides nothing. The runtime publishes a fresh `NodeHealth` through a
//! `watch` channel after every observation and lease renewal.
//!
//! Semantics (as Patroni's): `GET /`, `/primary`, `/read-write`, `/leader`: 200 only on a
//! primary that holds a valid lease, else 503. `/replica`: 200 on a running standby
//! (`?lag=` bounds its lag, in bytes or with a unit such as `16MB`). `/read-only`: 200 on a
//! running primary or standby. `/health`: 200 when Postgres is running. `/patroni` and
//! `/liveness`: 200 whenever the agent answers (the body is the status document, with
//! Patroni's `patroni`, `xlog`, `server_version`, `postmaster_start_time`,
//! `database_system_identifier`, `replication`, `pending_restart` and `cluster_unlocked`
//! fields). `/sync` and
//! `/async`: 200 on a synchronous / asynchronous standby. Health checks answer `GET`,
//! `HEAD` and `OPTIONS` (HAProxy's `option httpchk` sends `OPTIONS` by default).
//!
//! `GET /config`: the cluster-wide configuration as the Raft log holds it (the replication
//! policy, `postgresql.parameters`, maintenance mode, its version), with Patroni's names
//! `maximum_lag_on_failover`, `synchronous_node_count` and `pause` alongside, so tools that
//! watch Patroni's dynamic configuration for changes work; it is changed with
//! `meridianctl edit-config`, not over HTTP.
//!
//! Write endpoints (`POST /switchover`, `/failover`, `/pause`, `/resume`) need
//! `Authorization: Bearer <api token>` and are thin wrappers over the admin commands
//! ([`WriteRequest`], carried out by the runtime's [`WriteFn`]); without a configured
//! token they are refused. The bearer scheme name is matched case-insensitively and the
//! token compared in constant time. Health endpoints stay open, and say `"insecure": true`
//! when the member runs without member authentication (`[security] insecure = true`).
//! Served over HTTPS when `[api] http_tls_cert_file` / `http_tls_key_file` are set (see
//! [`serve`]).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// What this member is, from the point of view of routing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    SyncStandby,
    AsyncStandby,
    Witness,
    #[default]
    Unknown,
}

/// Everything the endpoints need about this member, published by the runtime.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeHealth {
    pub cluster: String,
    pub member: String,
    pub region: String,
    pub role: Role,
    /// Postgres answers queries.
    pub running: bool,
    pub in_recovery: bool,
    /// This member is the primary in the newest generation and its lease is valid.
    pub lease_valid: bool,
    pub fenced: bool,
    pub timeline: u32,
    pub generation: u64,
    /// Bytes this standby's replay position is behind the primary's current position
    /// (read within `peers::primary_position_max_age`); None when unknown.
    pub lag_bytes: Option<u64>,
    /// A standby whose WAL receiver is streaming (only those are healthy replicas).
    pub streaming: bool,
    pub paused: bool,
    pub noloadbalance: bool,
    pub version: String,
    /// WAL positions as this member's Postgres reported them last (Patroni's `xlog`).
    pub wal: WalPositions,
    /// Some parameter's new value waits for a restart (`pg_settings.pending_restart`).
    pub pending_restart: bool,
    /// On a primary: its walsenders (Patroni's `replication`).
    pub replication: Vec<ReplicationRow>,
    /// The intent names no primary (Patroni's `cluster_unlocked`).
    pub cluster_unlocked: bool,
    /// The running server, as its last probe read it.
    pub server: ServerInfo,
    /// The cluster as this member sees it (for `/cluster`), built on request.
    #[serde(skip)]
    pub cluster_json: LazyJson,
    /// History entries (for `/history`), built on request.
    #[serde(skip)]
    pub history_json: LazyJson,
    /// The cluster-wide configuration (for `/config`), built on request.
    #[serde(skip)]
    pub config_json: LazyJson,
}

/// Where this member's WAL stands; each None when unknown or not applicable to its role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WalPositions {
    /// Primary: `pg_current_wal_lsn()`.
    pub current: Option<u64>,
    /// Standby: received and flushed.
    pub received: Option<u64>,
    /// Standby: replayed.
    pub replayed: Option<u64>,
}

/// The running server itself (Patroni's `server_version`, `postmaster_start_time`,
/// `database_system_identifier`); each None when not known.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServerInfo {
    pub server_version: Option<u32>,
    pub postmaster_start_time: Option<String>,
    pub system_identifier: Option<String>,
}

/// One standby connected to this primary (`pg_stat_replication`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplicationRow {
    pub application_name: String,
    pub state: String,
    pub sync_state: String,
}

/// A JSON document built when it is asked for, not each time health is published.
#[derive(Clone)]
pub struct LazyJson(Arc<dyn Fn() -> serde_json::Value + Send + Sync>);

impl LazyJson {
    pub fn new(f: impl Fn() -> serde_json::Value + Send + Sync + 'static) -> Self {
        LazyJson(Arc::new(f))
    }

    pub fn get(&self) -> serde_json::Value {
        (self.0)()
    }
}

impl Default for LazyJson {
    fn default() -> Self {
        LazyJson::new(|| serde_json::Value::Null)
    }
}

impl std::fmt::Debug for LazyJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LazyJson")
    }
}

#[derive(Clone)]
pub struct HttpState {
    pub health: watch::Receiver<NodeHealth>,
    pub metrics: Arc<Metrics>,
    /// Carries out write requests; None refuses them.
    pub writes: Option<WriteFn>,
    /// The API token write requests must present.
    pub token: Option<String>,
    /// `[security] insecure = true` (reported in the health bodies).
    pub insecure: bool,
}

/// A write the HTTP API accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteRequest {
    /// Planned switchover from the primary (`from`, if given, must be it) to `to`.
    Switchover { from: Option<String>, to: String },
    /// Operator failover to `candidate`; `allow_data_loss` skips the safety check.
    Failover {
        candidate: String,
        allow_data_loss: bool,
    },
    /// Maintenance mode on (true) or off.
    Pause(bool),
}

/// The error of a write: HTTP status and message.
pub type WriteError = (StatusCode, String);

/// Carries out a [`WriteRequest`] (the runtime routes it to the Raft leader).
pub type WriteFn = Arc<
    dyn Fn(
            WriteRequest,
        ) -> futures::future::BoxFuture<'static, Result<serde_json::Value, WriteError>>
        + Send
        + Sync,
>;

/// The router with every endpoint; the caller binds and serves it.
pub fn router(state: HttpState) -> Router {
    let check = |f: fn(&NodeHealth, &CheckQuery) -> bool| {
        let h = move |State(s): State<HttpState>, Query(q): Query<CheckQuery>| async move {
            respond(&s.health.borrow().clone(), &q, f, s.insecure)
        };
        get(h).options(h)
    };
    Router::new()
        .route("/", check(is_writable_primary))
        .route("/primary", check(is_writable_primary))
        .route("/master", check(is_writable_primary))
        .route("/leader", check(is_writable_primary))
        .route("/read-write", check(is_writable_primary))
        .route("/replica", check(is_replica))
        .route("/read-only", check(is_read_only))
        .route("/health", check(|h, _| h.running))
        .route(
            "/sync",
            check(|h, _| h.running && h.role == Role::SyncStandby),
        )
        .route(
            "/synchronous",
            check(|h, _| h.running && h.role == Role::SyncStandby),
        )
        .route(
            "/async",
            check(|h, _| h.running && h.role == Role::AsyncStandby),
        )
        .route(
            "/asynchronous",
            check(|h, _| h.running && h.role == Role::AsyncStandby),
        )
        // Patroni's status document: 200 whenever the agent answers, whatever the role.
        .route("/patroni", check(|_, _| true))
        .route("/liveness", check(|_, _| true))
        .route("/readiness", check(is_read_only))
        .route("/cluster", get(cluster))
        .route("/history", get(history))
        .route("/config", get(config))
        .route("/metrics", get(metrics))
        .route("/switchover", axum::routing::post(switchover))
        .route("/failover", axum::routing::post(failover))
        .route("/pause", axum::routing::post(pause))
        .route("/resume", axum::routing::post(resume))
        .with_state(state)
}

#[derive(Debug, Default, Deserialize)]
pub struct CheckQuery {
    /// Maximum replication lag: bytes, or a number with a unit (`kB`, `MB`, `GB`).
    lag: Option<String>,
}

fn is_writable_primary(h: &NodeHealth, _: &CheckQuery) -> bool {
    h.running && h.role == Role::Primary && h.lease_valid && !h.fenced && !h.in_recovery
}

fn is_standby(h: &NodeHealth) -> bool {
    h.running && h.in_recovery && matches!(h.role, Role::SyncStandby | Role::AsyncStandby)
}

fn lag_ok(h: &NodeHealth, q: &CheckQuery) -> bool {
    match q.lag.as_deref().map(parse_lag_bytes) {
        None => true,
        // A malformed bound must not route traffic to a replica of unknown lag.
        Some(None) => false,
        Some(Some(max)) => h.lag_bytes.is_some_and(|l| l <= max),
    }
}

/// A running standby whose WAL receiver streams, not tagged `noloadbalance`, within the
/// `?lag=` bound if one is given. Stricter than Patroni, which answers 200 for any running
/// replica: one whose receiver stopped falls behind without bound, so it stops being a
/// replica at the first observation that sees it not streaming.
fn is_replica(h: &NodeHealth, q: &CheckQuery) -> bool {
    is_standby(h) && h.streaming && !h.noloadbalance && lag_ok(h, q)
}

fn is_read_only(h: &NodeHealth, q: &CheckQuery) -> bool {
    is_writable_primary(h, q) || is_replica(h, q)
}

/// Parses Patroni-style lag bounds: `1048576`, `16MB`, `1 GB`, `512kB`.
pub fn parse_lag_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn respond(
    h: &NodeHealth,
    q: &CheckQuery,
    f: fn(&NodeHealth, &CheckQuery) -> bool,
    insecure: bool,
) -> Response {
    let code = if f(h, q) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = patroni_body(h);
    body["insecure"] = serde_json::Value::Bool(insecure);
    (code, Json(body)).into_response()
}

/// The body Patroni returns from its health endpoints (the fields HAProxy users and
/// scripts read), with Meridian's additions.
fn patroni_body(h: &NodeHealth) -> serde_json::Value {
    let state = if h.fenced {
        "fenced"
    } else if h.running {
        "running"
    } else {
        "stopped"
    };
    let role = match h.role {
        Role::Primary => "primary",
        Role::SyncStandby | Role::AsyncStandby => "replica",
        Role::Witness => "witness",
        Role::Unknown => "unknown",
    };
    let mut body = serde_json::json!({
        "state": state,
        "role": role,
        "timeline": h.timeline,
        "replication_lag_bytes": h.lag_bytes,
        "sync_standby": h.role == Role::SyncStandby,
        "pause": h.paused,
        // Patroni's own fields, read by check_patroni and other Patroni tooling.
        "patroni": {
            "version": h.version,
            "scope": h.cluster,
            "name": h.member,
        },
        "meridian": {
            "version": h.version,
            "scope": h.cluster,
            "name": h.member,
            "region": h.region,
            "generation": h.generation,
            "lease_valid": h.lease_valid,
        },
    });
    if h.running {
        let xlog = if h.in_recovery {
            serde_json::json!({
                "received_location": h.wal.received,
                "replayed_location": h.wal.replayed,
                "paused": false,
            })
        } else {
            serde_json::json!({ "location": h.wal.current })
        };
        body["xlog"] = xlog;
        if let Some(v) = h.server.server_version {
            body["server_version"] = serde_json::json!(v);
        }
        if let Some(t) = &h.server.postmaster_start_time {
            body["postmaster_start_time"] = serde_json::json!(t);
        }
        if let Some(id) = &h.server.system_identifier {
            body["database_system_identifier"] = serde_json::json!(id);
        }
    }
    if h.role == Role::Primary && h.running && !h.in_recovery {
        body["replication"] = serde_json::to_value(&h.replication).unwrap_or_default();
    }
    // As Patroni: present only when true.
    if h.pending_restart {
        body["pending_restart"] = serde_json::Value::Bool(true);
    }
    if h.cluster_unlocked {
        body["cluster_unlocked"] = serde_json::Value::Bool(true);
    }
    body
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WriteBody {
    /// Patroni's name for the current primary.
    leader: Option<String>,
    candidate: Option<String>,
    allow_data_loss: bool,
}

fn authorized(s: &HttpState, headers: &axum::http::HeaderMap) -> Result<(), WriteError> {
    let Some(token) = &s.token else {
        return Err((
            StatusCode::FORBIDDEN,
            "no api token is configured: write endpoints are disabled".into(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_token);
    if !given.is_some_and(|g| crate::auth::token_matches(token, g)) {
        return Err((
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ));
    }
    Ok(())
}

async fn write(
    s: HttpState,
    headers: axum::http::HeaderMap,
    body: &str,
    make: fn(WriteBody) -> Result<WriteRequest, WriteError>,
) -> Response {
    let result = async {
        authorized(&s, &headers)?;
        let parsed: WriteBody = if body.trim().is_empty() {
            WriteBody::default()
        } else {
            serde_json::from_str(body)
                .map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?
        };
        let req = make(parsed)?;
        let writes = s.writes.as_ref().ok_or((
            StatusCode::SERVICE_UNAVAILABLE,
            "writes are not available on this member".to_string(),
        ))?;
        writes(req).await
    }
    .await;
    match result {
        Ok(v) => (StatusCode::OK, Json(v)).into_response(),
        Err((code, msg)) => (code, Json(serde_json::json!({ "error": msg }))).into_response(),
    }
}

fn need_candidate(b: &WriteBody) -> Result<String, WriteError> {
    b.candidate
        .clone()
        .filter(|c| !c.is_empty())
        .ok_or((StatusCode::BAD_REQUEST, "candidate is required".into()))
}

async fn switchover(
    State(s): State<HttpState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    write(s, headers, &body, |b| {
        Ok(WriteRequest::Switchover {
            to: need_candidate(&b)?,
            from: b.leader,
        })
    })
    .await
}

async fn failover(
    State(s): State<HttpState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    write(s, headers, &body, |b| {
        Ok(WriteRequest::Failover {
            candidate: need_candidate(&b)?,
            allow_data_loss: b.allow_data_loss,
        })
    })
    .await
}

async fn pause(
    State(s): State<HttpState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    write(s, headers, &body, |_| Ok(WriteRequest::Pause(true))).await
}

async fn resume(
    State(s): State<HttpState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    write(s, headers, &body, |_| Ok(WriteRequest::Pause(false))).await
}

async fn cluster(State(s): State<HttpState>) -> Response {
    let view = s.health.borrow().cluster_json.clone();
    Json(view.get()).into_response()
}

async fn history(State(s): State<HttpState>) -> Response {
    let view = s.health.borrow().history_json.clone();
    Json(view.get()).into_response()
}

async fn config(State(s): State<HttpState>) -> Response {
    let view = s.health.borrow().config_json.clone();
    Json(view.get()).into_response()
}

async fn metrics(State(s): State<HttpState>) -> Response {
    match s.metrics.render() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "render metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics\n").into_response()
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true: plain HTTP, or HTTPS with `tls`
/// (see [`https_config`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<rustls::ServerConfig>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use crate::agent::limits;
    use anyhow::Context;
    let Some(tls) = tls else {
        axum::serve(limits::http_listener(listener), app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await?;
        return Ok(());
    };
    let config = tls;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    });
    let listener = listener
        .into_std()
        .context("taking over the HTTP listener")?;
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config)),
    )
    .acceptor(limits::https_limit());
    axum_server::from_tcp(listener)
        .acceptor(acceptor)
        .handle(handle)
        .serve(app.into_make_service())
        .await
        .context("serving HTTPS")
}

/// The rustls server configuration of the HTTPS endpoint (ring provider, no client auth).
pub fn https_config(tls: &crate::config::HttpTlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    use anyhow::Context;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", tls.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", tls.key_file.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the HTTP TLS certificate and key do not form a valid pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> NodeHealth {
        NodeHealth {
            role: Role::Primary,
            running: true,
            lease_valid: true,
            ..Default::default()
        }
    }

    fn standby(role: Role, lag: u64) -> NodeHealth {
        NodeHealth {
            role,
            running: true,
            in_recovery: true,
            streaming: true,
            lag_bytes: Some(lag),
            ..Default::default()
        }
    }

    fn q(lag: Option<&str>) -> CheckQuery {
        CheckQuery {
            lag: lag.map(str::to_string),
        }
    }

    #[test]
    fn the_status_document_has_patronis_fields() {
        let mut h = primary();
        h.member = "a1".into();
        h.cluster = "c".into();
        h.version = "0.1.0".into();
        h.wal.current = Some(4096);
        h.server.server_version = Some(150004);
        h.server.system_identifier = Some("7312345678901234567".into());
        h.replication = vec![ReplicationRow {
            application_name: "a2".into(),
            state: "streaming".into(),
            sync_state: "quorum".into(),
        }];
        let b = patroni_body(&h);
        assert_eq!(b["patroni"]["name"], "a1");
        assert_eq!(b["patroni"]["scope"], "c");
        assert_eq!(b["patroni"]["version"], "0.1.0");
        assert_eq!(b["role"], "primary");
        assert_eq!(b["xlog"]["location"], 4096);
        assert_eq!(b["server_version"], 150004);
        assert_eq!(b["database_system_identifier"], "7312345678901234567");
        assert_eq!(b["replication"][0]["application_name"], "a2");
        assert!(b.get("pending_restart").is_none(), "absent unless true");
        assert!(b.get("cluster_unlocked").is_none(), "absent unless true");
        let mut s = standby(Role::SyncStandby, 0);
        s.wal.received = Some(10);
        s.wal.replayed = Some(8);
        s.pending_restart = true;
        s.cluster_unlocked = true;
        let b = patroni_body(&s);
        assert_eq!(b["role"], "replica");
        assert_eq!(b["xlog"]["received_location"], 10);
        assert_eq!(b["xlog"]["replayed_location"], 8);
        assert!(b.get("replication").is_none(), "only on a primary");
        assert_eq!(b["pending_restart"], true);
        assert_eq!(b["cluster_unlocked"], true);
        let stopped = NodeHealth {
            running: false,
            ..s
        };
        assert!(patroni_body(&stopped).get("xlog").is_none());
    }

    #[test]
    fn primary_needs_a_valid_lease() {
        assert!(is_writable_primary(&primary(), &q(None)));
        let expired = NodeHealth {
            lease_valid: false,
            ..primary()
        };
        assert!(!is_writable_primary(&expired, &q(None)));
        let fenced = NodeHealth {
            fenced: true,
            ..primary()
        };
        assert!(!is_writable_primary(&fenced, &q(None)));
    }

    #[test]
    fn replica_lag_bound() {
        let s = standby(Role::AsyncStandby, 2 << 20);
        assert!(is_replica(&s, &q(None)));
        assert!(is_replica(&s, &q(Some("16MB"))));
        assert!(!is_replica(&s, &q(Some("1MB"))));
        assert!(!is_replica(&s, &q(Some("lots"))));
        assert!(!is_replica(&primary(), &q(None)));
        assert!(is_read_only(&primary(), &q(None)));
    }

    #[test]
    fn a_replica_streams_is_load_balanced_and_has_a_known_lag() {
        let s = standby(Role::AsyncStandby, 0);
        assert!(is_replica(&s, &q(Some("1MB"))));
        let stopped = NodeHealth {
            streaming: false,
            ..s.clone()
        };
        assert!(!is_replica(&stopped, &q(None)), "receiver stopped");
        assert!(!is_read_only(&stopped, &q(None)));
        let unknown = NodeHealth {
            lag_bytes: None,
            ..s.clone()
        };
        assert!(is_replica(&unknown, &q(None)));
        assert!(!is_replica(&unknown, &q(Some("1MB"))), "unknown lag");
        let excluded = NodeHealth {
            noloadbalance: true,
            ..s
        };
        assert!(!is_replica(&excluded, &q(None)), "noloadbalance");
    }

    #[test]
    fn lag_units() {
        assert_eq!(parse_lag_bytes("1024"), Some(1024));
        assert_eq!(parse_lag_bytes("16MB"), Some(16 << 20));
        assert_eq!(parse_lag_bytes("1 GB"), Some(1 << 30));
        assert_eq!(parse_lag_bytes("512kB"), Some(512 << 10));
        assert_eq!(parse_lag_bytes("MB"), None);
        assert_eq!(parse_lag_bytes("3 parsecs"), None);
    }

    #[tokio::test]
    async fn endpoints_answer_over_http() {
        let (tx, rx) = watch::channel(standby(Role::SyncStandby, 0));
        let state = HttpState {
            health: rx,
            metrics: Arc::new(Metrics::new()),
            writes: None,
            token: None,
            insecure: false,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, router(state)).await.unwrap();
        });
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                s.read_to_string(&mut out),
            )
            .await
            .unwrap()
            .unwrap();
            out
        };
        assert!(get("/primary").await.starts_with("HTTP/1.1 503"));
        assert!(get("/replica").await.starts_with("HTTP/1.1 200"));
        assert!(get("/sync").await.starts_with("HTTP/1.1 200"));
        assert!(get("/async").await.starts_with("HTTP/1.1 503"));
        tx.send(primary()).unwrap();
        assert!(get("/primary").await.starts_with("HTTP/1.1 200"));
        assert!(get("/").await.starts_with("HTTP/1.1 200"));
        assert!(get("/replica").await.starts_with("HTTP/1.1 503"));
        let m = get("/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("meridian_generation"), "{m}");
        server.abort();
    }

    /// With a certificate and key, the endpoints answer over HTTPS only; the health body
    /// says whether the member runs insecure; writes need the token, bearer in any case.
    #[tokio::test]
    async fn https_serves_health_and_checks_the_write_token() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let tls = crate::config::HttpTlsConfig {
            cert_file: dir.path().join("http.pem"),
            key_file: dir.path().join("http.key"),
        };
        std::fs::write(&tls.cert_file, ck.cert.pem()).unwrap();
        std::fs::write(&tls.key_file, ck.signing_key.serialize_pem()).unwrap();
        let (_tx, rx) = watch::channel(primary());
        let writes: WriteFn = Arc::new(|_| Box::pin(async { Ok(serde_json::json!({"ok": true})) }));
        let app = router(HttpState {
            health: rx,
            metrics: Arc::new(Metrics::new()),
            writes: Some(writes),
            token: Some("tok".into()),
            insecure: true,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            app,
            Some(https_config(&tls).unwrap()),
            stop_rx,
        ));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let request = |req: String| {
            let client = client.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                let mut s = tokio_rustls::TlsConnector::from(client)
                    .connect(name, tcp)
                    .await
                    .unwrap();
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = String::new();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    s.read_to_string(&mut out),
                )
                .await
                .unwrap();
                out
            }
        };
        let get = |path: &str| {
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        };
        let post = |auth: &str| {
            format!(
                "POST /pause HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
        };
        let health = request(get("/health")).await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(health.contains("\"insecure\":true"), "{health}");
        let r = request(post("")).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        let r = request(post("Authorization: Bearer wrong\r\n")).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        let r = request(post("Authorization: bEaReR tok\r\n")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");

        // Plain HTTP on the HTTPS port gets no HTTP answer.
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain.write_all(get("/health").as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            plain.read_to_end(&mut out),
        )
        .await;
        assert!(!String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));

        stop_tx.send_replace(true);
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("the HTTPS server stops")
            .unwrap()
            .unwrap();
    }
}
