//! The lease gate's wire side: a physical-replication client of the local primary that
//! confirms WAL only while a caller-supplied check (the lease) holds.
//!
//! Why it exists: with no synchronous standby, a primary acknowledges a commit as soon as
//! its own disk has it. When every process of the primary's host was frozen (SIGSTOP, a VM
//! pause) past the lease, all of them resume together on thaw, and backends acknowledge
//! the commits their clients send in the milliseconds before the agent or its watchdog
//! fences — while a new primary already takes writes: two writers. Naming this client in
//! `synchronous_standby_names` makes every commit wait for it, and it answers only after
//! checking the lease *at the moment it answers*, on the monotonic clock, so a thawed
//! primary's commits wait until the fence ends them. A standby's own walreceiver cannot
//! serve: it is on another host and does not know this member's lease.
//!
//! The client stores nothing. It reports as written, flushed and applied the end of the
//! WAL it received, which is what the commit wait needs; durability comes from the
//! primary's own flush and, under a sync policy, from real standbys.
//!
//! Protocol: startup with `replication=true`, authentication (trust, peer, password, md5,
//! SCRAM-SHA-256), `IDENTIFY_SYSTEM`, `START_REPLICATION PHYSICAL <flush> TIMELINE <tli>`,
//! then CopyData both ways (`w` XLogData and `k` keepalive in, `r` standby status out).
//! Messages and SCRAM come from `postgres-protocol`; the framing is done here because the
//! crate does not parse CopyBothResponse.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::types::Lsn;

/// The application_name the gate streams under; a member may not be named so.
pub const GATE_APPLICATION_NAME: &str = "meridian_lease_gate";

/// Bound on one frame (XLogData carries at most a few WAL pages; 16 MiB is far beyond).
const MAX_FRAME_BYTES: usize = 16 << 20;
/// How often an unconfirmed position is checked against the lease again.
const RECHECK_INTERVAL: Duration = Duration::from_millis(20);
/// A status message at least this often, so `wal_sender_timeout` never ends the stream
/// (Meridian sets 5 s; the sender's reply requests are answered at once as well).
const STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// Microseconds from the Unix epoch to the Postgres epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Where and as whom the gate connects.
#[derive(Clone, Debug)]
pub struct GateTarget {
    /// A unix socket directory (starts with `/`) or an IP address / host name.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("lease gate: connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lease gate: connect to {target}: no answer within {timeout_ms} ms")]
    ConnectTimeout { target: String, timeout_ms: u64 },
    #[error("lease gate: {0}")]
    Io(#[from] std::io::Error),
    #[error("lease gate: the server refused: {0}")]
    Server(String),
    #[error("lease gate: {0}")]
    Protocol(String),
    #[error("lease gate: the server asks for a password and role {0:?} has none configured")]
    NoPassword(String),
}

/// What one streaming session did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateProgress {
    /// End of the WAL received so far.
    pub received: Lsn,
    /// End of the WAL confirmed to the server (commits up to here were released).
    pub confirmed: Lsn,
}

/// Connects, authenticates and streams until `stop` resolves or the stream ends. WAL is
/// confirmed only when `may_confirm()` answers true at the moment of confirming.
pub async fn run<F, S>(
    target: &GateTarget,
    may_confirm: F,
    stop: S,
    progress: &std::sync::Mutex<GateProgress>,
) -> Result<(), GateError>
where
    F: Fn() -> bool,
    S: std::future::Future<Output = ()>,
{
    let where_ = describe(target);
    let connect = async {
        if target.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", target.host, target.port);
            tokio::net::UnixStream::connect(&path)
                .await
                .map(Stream::Unix)
        } else {
            tokio::net::TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map(|s| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                })
        }
    };
    let stream = tokio::time::timeout(target.connect_timeout, connect)
        .await
        .map_err(|_| GateError::ConnectTimeout {
            target: where_.clone(),
            timeout_ms: target.connect_timeout.as_millis() as u64,
        })?
        .map_err(|source| GateError::Connect {
            target: where_.clone(),
            source,
        })?;
    let mut conn = Conn {
        stream,
        rbuf: BytesMut::with_capacity(64 * 1024),
        wbuf: BytesMut::with_capacity(256),
    };
    tokio::time::timeout(target.connect_timeout * 2, conn.handshake(target))
        .await
        .map_err(|_| GateError::ConnectTimeout {
            target: where_.clone(),
            timeout_ms: (target.connect_timeout * 2).as_millis() as u64,
        })??;
    let (tli, flush) = tokio::time::timeout(target.connect_timeout * 2, conn.identify_system())
        .await
        .map_err(|_| GateError::Protocol("IDENTIFY_SYSTEM got no answer in time".into()))??;
    conn.start_replication(tli, flush).await?;
    {
        let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
        *p = GateProgress {
            received: flush,
            confirmed: flush,
        };
    }
    tokio::pin!(stop);
    let mut received = flush;
    let mut confirmed = flush;
    let mut last_status = tokio::time::Instant::now();
    loop {
        let pending = received > confirmed;
        let wait = if pending {
            RECHECK_INTERVAL
        } else {
            STATUS_INTERVAL.saturating_sub(last_status.elapsed())
        };
        let mut reply_requested = false;
        tokio::select! {
            _ = &mut stop => {
                conn.wbuf.clear();
                frontend::copy_done(&mut conn.wbuf);
                frontend::terminate(&mut conn.wbuf);
                let _ = tokio::time::timeout(Duration::from_millis(200), conn.flush()).await;
                return Ok(());
            }
            r = conn.fill() => r?,
            _ = tokio::time::sleep(wait) => {}
        }
        while let Some((tag, body)) = conn.next_frame()? {
            match tag {
                b'd' => match parse_copy_data(&body)? {
                    CopyIn::XLogData { end } => received = received.max(end),
                    CopyIn::Keepalive { reply } => reply_requested |= reply,
                },
                b'c' => return Err(GateError::Protocol("the server ended the stream".into())),
                b'E' => return Err(GateError::Server(error_text(tag, body)?)),
                // Notices and anything else the server may interleave.
                _ => {}
            }
        }
        let mut send = reply_requested || last_status.elapsed() >= STATUS_INTERVAL;
        if received > confirmed && may_confirm() {
            confirmed = received;
            send = true;
        }
        if send {
            conn.wbuf.clear();
            status_update(confirmed, &mut conn.wbuf);
            conn.flush().await?;
            last_status = tokio::time::Instant::now();
        }
        let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
        *p = GateProgress {
            received,
            confirmed,
        };
    }
}

fn describe(t: &GateTarget) -> String {
    if t.host.starts_with('/') {
        format!("{}/.s.PGSQL.{} as {}", t.host, t.port, t.user)
    } else {
        format!("{}:{} as {}", t.host, t.port, t.user)
    }
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

struct Conn {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    async fn fill(&mut self) -> Result<(), GateError> {
        let n = match &mut self.stream {
            Stream::Unix(s) => read_some(s, &mut self.rbuf).await?,
            Stream::Tcp(s) => read_some(s, &mut self.rbuf).await?,
        };
        if n == 0 {
            return Err(GateError::Protocol(
                "the server closed the connection".into(),
            ));
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), GateError> {
        match &mut self.stream {
            Stream::Unix(s) => write_all(s, &self.wbuf).await?,
            Stream::Tcp(s) => write_all(s, &self.wbuf).await?,
        }
        self.wbuf.clear();
        Ok(())
    }

    /// The next whole frame as (tag, body), if buffered.
    fn next_frame(&mut self) -> Result<Option<(u8, BytesMut)>, GateError> {
        next_frame(&mut self.rbuf)
    }

    async fn frame(&mut self) -> Result<(u8, BytesMut), GateError> {
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    async fn handshake(&mut self, t: &GateTarget) -> Result<(), GateError> {
        frontend::startup_message(
            [
                ("user", t.user.as_str()),
                ("replication", "true"),
                ("application_name", GATE_APPLICATION_NAME),
            ],
            &mut self.wbuf,
        )?;
        self.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.frame().await?;
            match tag {
                b'R' => {
                    let msg = reparse(tag, body)?;
                    match msg {
                        backend::Message::AuthenticationOk => {}
                        backend::Message::AuthenticationCleartextPassword => {
                            let pw = password(t)?;
                            frontend::password_message(pw.as_bytes(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        backend::Message::AuthenticationMd5Password(b) => {
                            let pw = password(t)?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                t.user.as_bytes(),
                                pw.as_bytes(),
                                b.salt(),
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        backend::Message::AuthenticationSasl(b) => {
                            let mut mechs = b.mechanisms();
                            let mut found = false;
                            while let Some(m) = mechs.next()? {
                                found |= m == SCRAM_SHA_256;
                            }
                            if !found {
                                return Err(GateError::Protocol(
                                    "the server offers no SASL mechanism this client speaks \
                                     (SCRAM-SHA-256)"
                                        .into(),
                                ));
                            }
                            let pw = password(t)?;
                            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                SCRAM_SHA_256,
                                s.message(),
                                &mut self.wbuf,
                            )?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        backend::Message::AuthenticationSaslContinue(b) => {
                            let s = scram.as_mut().ok_or_else(|| {
                                GateError::Protocol("SASL continue before SASL start".into())
                            })?;
                            s.update(b.data())?;
                            frontend::sasl_response(s.message(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        backend::Message::AuthenticationSaslFinal(b) => {
                            let s = scram.as_mut().ok_or_else(|| {
                                GateError::Protocol("SASL final before SASL start".into())
                            })?;
                            s.finish(b.data())?;
                        }
                        _ => {
                            return Err(GateError::Protocol(
                                "the server asks for an authentication method this client does \
                                 not speak (use trust, peer, password, md5 or scram-sha-256)"
                                    .into(),
                            ))
                        }
                    }
                }
                b'E' => return Err(GateError::Server(error_text(tag, body)?)),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, notices.
                _ => {}
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: the server's timeline and WAL flush position.
    async fn identify_system(&mut self) -> Result<(u32, Lsn), GateError> {
        frontend::query("IDENTIFY_SYSTEM", &mut self.wbuf)?;
        self.flush().await?;
        let mut row: Option<(u32, Lsn)> = None;
        loop {
            let (tag, body) = self.frame().await?;
            match tag {
                b'D' => {
                    let cols = data_row(tag, body)?;
                    let tli = cols
                        .get(1)
                        .and_then(|c| c.as_deref())
                        .and_then(|s| s.parse::<u32>().ok())
                        .ok_or_else(|| {
                            GateError::Protocol("IDENTIFY_SYSTEM sent no timeline".into())
                        })?;
                    let lsn = cols
                        .get(2)
                        .and_then(|c| c.as_deref())
                        .and_then(|s| s.parse::<Lsn>().ok())
                        .ok_or_else(|| {
                            GateError::Protocol("IDENTIFY_SYSTEM sent no WAL position".into())
                        })?;
                    row = Some((tli, lsn));
                }
                b'E' => return Err(GateError::Server(error_text(tag, body)?)),
                b'Z' => {
                    return row.ok_or_else(|| {
                        GateError::Protocol("IDENTIFY_SYSTEM returned no row".into())
                    })
                }
                _ => {}
            }
        }
    }

    async fn start_replication(&mut self, tli: u32, from: Lsn) -> Result<(), GateError> {
        let q = format!("START_REPLICATION PHYSICAL {from} TIMELINE {tli}");
        frontend::query(&q, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.frame().await?;
            match tag {
                // CopyBothResponse: streaming starts.
                b'W' => return Ok(()),
                b'E' => return Err(GateError::Server(error_text(tag, body)?)),
                _ => {}
            }
        }
    }
}

async fn read_some<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    buf.reserve(16 * 1024);
    r.read_buf(buf).await
}

async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> std::io::Result<()> {
    w.write_all(buf).await?;
    w.flush().await
}

fn password(t: &GateTarget) -> Result<&str, GateError> {
    t.password
        .as_deref()
        .ok_or_else(|| GateError::NoPassword(t.user.clone()))
}

/// Splits one frame (tag, 4-byte length including itself, body) off `buf`.
fn next_frame(buf: &mut BytesMut) -> Result<Option<(u8, BytesMut)>, GateError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(GateError::Protocol(format!(
            "a frame of type {:?} declares {len} bytes",
            tag as char
        )));
    }
    if len > MAX_FRAME_BYTES {
        return Err(GateError::Protocol(format!(
            "a frame of type {:?} declares {len} bytes (more than {MAX_FRAME_BYTES})",
            tag as char
        )));
    }
    if buf.len() < 1 + len {
        return Ok(None);
    }
    let mut frame = buf.split_to(1 + len);
    frame.advance(5);
    Ok(Some((tag, frame)))
}

/// A frame handed back to `postgres-protocol`'s parser.
fn reparse(tag: u8, body: BytesMut) -> Result<backend::Message, GateError> {
    let mut buf = BytesMut::with_capacity(body.len() + 5);
    buf.put_u8(tag);
    buf.put_u32(u32::try_from(body.len() + 4).unwrap_or(u32::MAX));
    buf.extend_from_slice(&body);
    backend::Message::parse(&mut buf)?
        .ok_or_else(|| GateError::Protocol("a truncated message".into()))
}

/// The human text of an ErrorResponse: severity, message and detail.
fn error_text(tag: u8, body: BytesMut) -> Result<String, GateError> {
    let backend::Message::ErrorResponse(e) = reparse(tag, body)? else {
        return Err(GateError::Protocol("an unreadable error response".into()));
    };
    let mut fields = e.fields();
    let (mut message, mut detail, mut code) = (String::new(), String::new(), String::new());
    while let Some(f) = fields.next()? {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'M' => message = v,
            b'D' => detail = v,
            b'C' => code = v,
            _ => {}
        }
    }
    let mut s = message;
    if !detail.is_empty() {
        s.push_str(&format!(" ({detail})"));
    }
    if !code.is_empty() {
        s.push_str(&format!(" [SQLSTATE {code}]"));
    }
    Ok(s)
}

fn data_row(tag: u8, body: BytesMut) -> Result<Vec<Option<String>>, GateError> {
    let backend::Message::DataRow(row) = reparse(tag, body)? else {
        return Err(GateError::Protocol("an unreadable data row".into()));
    };
    let buf = row.buffer();
    let mut ranges = row.ranges();
    let mut out = Vec::new();
    while let Some(r) = ranges.next()? {
        out.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
    }
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
enum CopyIn {
    /// XLogData ending at `end`.
    XLogData {
        end: Lsn,
    },
    Keepalive {
        reply: bool,
    },
}

fn parse_copy_data(body: &[u8]) -> Result<CopyIn, GateError> {
    let short = || GateError::Protocol("a short replication message".into());
    match body.first() {
        Some(b'w') => {
            let start = body.get(1..9).ok_or_else(short)?;
            let start = u64::from_be_bytes(start.try_into().map_err(|_| short())?);
            let data_len = body.len().checked_sub(25).ok_or_else(short)?;
            Ok(CopyIn::XLogData {
                end: Lsn(start.saturating_add(data_len as u64)),
            })
        }
        Some(b'k') => {
            let reply = *body.get(17).ok_or_else(short)? != 0;
            Ok(CopyIn::Keepalive { reply })
        }
        Some(other) => Err(GateError::Protocol(format!(
            "an unknown replication message {:?}",
            *other as char
        ))),
        None => Err(short()),
    }
}

/// Standby status update: written, flushed and applied all at `at`.
fn status_update(at: Lsn, out: &mut BytesMut) {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let mut body = BytesMut::with_capacity(34);
    body.put_u8(b'r');
    body.put_u64(at.0);
    body.put_u64(at.0);
    body.put_u64(at.0);
    body.put_i64(now_us - PG_EPOCH_OFFSET_US);
    body.put_u8(0);
    out.put_u8(b'd');
    out.put_u32(u32::try_from(body.len() + 4).unwrap_or(u32::MAX));
    out.extend_from_slice(&body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_split_only_when_whole_and_refuse_absurd_lengths() {
        let mut buf = BytesMut::new();
        let f = frame(b'd', b"kxxxxxxxxxxxxxxxx\x01");
        buf.extend_from_slice(&f[..7]);
        assert!(next_frame(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&f[7..]);
        let (tag, body) = next_frame(&mut buf).unwrap().unwrap();
        assert_eq!(tag, b'd');
        assert_eq!(
            parse_copy_data(&body).unwrap(),
            CopyIn::Keepalive { reply: true }
        );
        assert!(buf.is_empty());

        let mut bad = BytesMut::from(&[b'd', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(next_frame(&mut bad)
            .unwrap_err()
            .to_string()
            .contains("declares"));
        let mut bad = BytesMut::from(&[b'd', 0, 0, 0, 2][..]);
        assert!(next_frame(&mut bad).is_err());
    }

    #[test]
    fn xlogdata_ends_where_its_bytes_end() {
        let mut body = vec![b'w'];
        body.extend_from_slice(&0x0100_0000u64.to_be_bytes());
        body.extend_from_slice(&0u64.to_be_bytes());
        body.extend_from_slice(&0u64.to_be_bytes());
        body.extend_from_slice(&[0u8; 100]);
        assert_eq!(
            parse_copy_data(&body).unwrap(),
            CopyIn::XLogData {
                end: Lsn(0x0100_0000 + 100)
            }
        );
        assert!(parse_copy_data(&body[..10]).is_err());
        assert!(parse_copy_data(b"z").is_err());
        assert!(parse_copy_data(b"").is_err());
    }

    #[test]
    fn a_status_update_reports_one_position_three_times() {
        let mut out = BytesMut::new();
        status_update(Lsn(0x1234), &mut out);
        let (tag, body) = next_frame(&mut out).unwrap().unwrap();
        assert_eq!(tag, b'd');
        assert_eq!(body[0], b'r');
        assert_eq!(body.len(), 34);
        for i in 0..3 {
            let at = u64::from_be_bytes(body[1 + 8 * i..9 + 8 * i].try_into().unwrap());
            assert_eq!(at, 0x1234);
        }
        assert_eq!(body[33], 0, "no reply requested");
    }
}
