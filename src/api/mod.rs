//! The HTTP API (hyper 1, HTTP/1.1) on the Unix socket and on TCP.
//!
//! Unix socket: every route; the peer's uid/gid (SO_PEERCRED) must be on the allow-list.
//! TCP: `/metrics`, `/healthz`, `/readyz` for anyone; `/v1/*` only with the bearer token, and not
//! at all without a token file. Bodies are bounded, reads are timed, and bad input gets a 400
//! that names the field.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};

mod body;

pub use body::{parse_connect, parse_disconnect};

use crate::app::App;
use crate::config::ServerConfig;
use crate::session::Selector;
use crate::wire::{ConnectRequest, ConnectResponse, Malformed, Reason};

/// Largest accepted request body.
pub const MAX_BODY: usize = 64 * 1024;

/// How long in-flight requests get to finish at shutdown.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// A bearer token; its Debug output is masked.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Reads a token file (trimmed; an empty file is an error).
    pub fn read(path: &std::path::Path) -> Result<Token, String> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("{}: cannot read token file: {e}", path.display()))?;
        if meta.permissions().mode() & 0o002 != 0 {
            return Err(format!(
                "{}: token file is writable by every user; refusing it (chmod o-w)",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read token file: {e}", path.display()))?;
        let t = text.trim();
        if t.len() < 16 {
            return Err(format!(
                "{}: token must be at least 16 characters",
                path.display()
            ));
        }
        Ok(Token(t.to_string()))
    }

    /// Constant-time comparison with a presented token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let want = self.0.as_bytes();
        let mut diff: u8 = 0;
        for (i, w) in want.iter().enumerate() {
            let p = presented.get(i).copied().unwrap_or(0);
            diff |= w ^ p;
        }
        diff == 0 && want.len() == presented.len()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(****)")
    }
}

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Unix,
    Tcp,
}

/// The API's shared parts.
pub struct Api {
    app: Arc<App>,
    server: ServerConfig,
    token: Option<Token>,
    ready: AtomicBool,
}

type Body = Full<Bytes>;

impl Api {
    /// Wraps the app.
    pub fn new(app: Arc<App>, server: ServerConfig, token: Option<Token>) -> Arc<Api> {
        Arc::new(Api {
            app,
            server,
            token,
            ready: AtomicBool::new(false),
        })
    }

    /// Marks the daemon ready (every listener bound, state loaded).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    fn builder(&self) -> hyper::server::conn::http1::Builder {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.server.header_timeout)
            // Headers must fit in 16 KiB (bodies are streamed and limited separately).
            .max_buf_size(16 * 1024)
            .keep_alive(true);
        b
    }
}

fn peer_allowed(stream: &UnixStream, server: &ServerConfig) -> Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    let (uid, gid) = (cred.uid(), cred.gid());
    let own = nix::unistd::geteuid().as_raw();
    if uid == 0 || uid == own || server.peer_uids.contains(&uid) || server.peer_gids.contains(&gid)
    {
        Ok(())
    } else {
        Err(format!("peer uid {uid} gid {gid} is not on the allow-list"))
    }
}

/// A listening socket the API serves: how it accepts, and which peers it keeps.
trait Listener: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    const ORIGIN: Origin;
    fn accept_stream(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
    /// Whether to serve this peer.
    fn admit(stream: &Self::Stream, server: &ServerConfig) -> bool;
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    const ORIGIN: Origin = Origin::Unix;
    async fn accept_stream(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
    /// Peers not on the allow-list are closed at once.
    fn admit(stream: &UnixStream, server: &ServerConfig) -> bool {
        match peer_allowed(stream, server) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(%why, "unix socket peer refused");
                false
            }
        }
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    const ORIGIN: Origin = Origin::Tcp;
    async fn accept_stream(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(s, _)| s)
    }
    fn admit(stream: &TcpStream, _: &ServerConfig) -> bool {
        let _ = stream.set_nodelay(true);
        true
    }
}

/// Serves the Unix socket until `shutdown` changes, then drains.
pub async fn serve_unix(listener: UnixListener, api: Arc<Api>, shutdown: watch::Receiver<bool>) {
    serve(listener, api, shutdown).await;
}

/// Serves TCP until `shutdown` changes, then drains.
pub async fn serve_tcp(listener: TcpListener, api: Arc<Api>, shutdown: watch::Receiver<bool>) {
    serve(listener, api, shutdown).await;
}

/// The accept loop both listeners share: at most `max_connections` at once, each connection in
/// its own task, a failed accept (out of file descriptors, say) retried after a pause, and on
/// shutdown a drain with a deadline.
async fn serve<L: Listener>(listener: L, api: Arc<Api>, mut shutdown: watch::Receiver<bool>) {
    let origin = L::ORIGIN;
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(api.server.max_connections));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let stream = tokio::select! {
            r = listener.accept_stream() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%e, ?origin, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        if !L::admit(&stream, &api.server) {
            continue;
        }
        let api2 = api.clone();
        let svc = hyper::service::service_fn(move |req| handle(api2.clone(), origin, req));
        let conn = api.builder().serve_connection(TokioIo::new(stream), svc);
        let fut = graceful.watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = fut.await {
                tracing::debug!(%e, ?origin, "connection ended with an error");
            }
        });
    }
    drain(graceful).await;
}

async fn drain(graceful: GracefulShutdown) {
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain deadline; closing them");
    }
}

/// Whether `?name=true` (or `1`, or a bare `name`) is in a query string.
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.unwrap_or("").split('&').any(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
        k == name && matches!(v, "true" | "1" | "yes")
    })
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// `{"result": …, "session": {…}}`, serialised straight from the session (no JSON value tree in
/// between: this is the answer to every disconnect).
#[derive(Serialize)]
struct SessionResult<'a, S: Serialize> {
    result: &'static str,
    session: &'a S,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json_response(status, &json!({ "error": message.into() }))
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

async fn handle(
    api: Arc<Api>,
    origin: Origin,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let resp = match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            api.app.metrics.render(),
            "text/plain; version=0.0.4",
        ),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        (&Method::GET, "/readyz") => {
            if api.ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ready\n".into(), "text/plain")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "starting\n".into(),
                    "text/plain",
                )
            }
        }
        (_, p) if p == "/v1" || p.starts_with("/v1/") => match authorize(&api, origin, &req) {
            Ok(()) => v1(&api, req, &method, &path).await,
            Err(resp) => resp,
        },
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route for {method} {path}"),
        ),
    };
    Ok(resp)
}

#[allow(clippy::result_large_err)] // the error is the response itself, built once
fn authorize(api: &Api, origin: Origin, req: &Request<Incoming>) -> Result<(), Response<Body>> {
    if origin == Origin::Unix {
        return Ok(());
    }
    let Some(token) = &api.token else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "the /v1 API is served on TCP only with server.api_token_file; use the Unix socket",
        ));
    };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(p) if token.matches(p) => Ok(()),
        _ => {
            let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            Err(r)
        }
    }
}

#[allow(clippy::result_large_err)] // the error is the response itself, built once
async fn read_body(api: &Api, req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY} bytes"),
        ));
    }
    let limited = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(api.server.body_timeout, limited.collect()).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "request body did not arrive in time",
        )),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {MAX_BODY} bytes"),
                ))
            } else {
                Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read body: {e}"),
                ))
            }
        }
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

async fn v1(api: &Api, req: Request<Incoming>, method: &Method, path: &str) -> Response<Body> {
    match (method, path) {
        (&Method::POST, "/v1/connect") => {
            let body = match read_body(api, req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            match parse_connect(&body) {
                Ok(creq) => {
                    let resp = api.app.connect(creq).await;
                    json_response(status_of(&resp), &resp)
                }
                Err(Malformed(message)) => {
                    let resp = ConnectResponse::deny(&crate::wire::Denial {
                        reason: Reason::BadRequest,
                        message,
                    });
                    api.app
                        .record_decision(&ConnectRequest::default(), &resp, None);
                    json_response(StatusCode::BAD_REQUEST, &resp)
                }
            }
        }
        (&Method::POST, "/v1/verify") => {
            let body = match read_body(api, req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            match parse_connect(&body) {
                Ok(creq) => {
                    let resp = api.app.verify(creq);
                    json_response(status_of(&resp), &resp)
                }
                Err(m) => error(StatusCode::BAD_REQUEST, m.0),
            }
        }
        (&Method::POST, "/v1/disconnect") => {
            let body = match read_body(api, req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let dreq = match parse_disconnect(&body) {
                Ok(d) => d,
                Err(m) => return error(StatusCode::BAD_REQUEST, m.0),
            };
            match api.app.disconnect(&dreq).await {
                Ok(Some(s)) => json_response(
                    StatusCode::OK,
                    &SessionResult {
                        result: "ended",
                        session: &s,
                    },
                ),
                Ok(None) => json_response(
                    StatusCode::OK,
                    &json!({"result": "unknown", "message": "no live session matches; nothing to free"}),
                ),
                Err(m) => error(StatusCode::BAD_REQUEST, m.0),
            }
        }
        (&Method::GET, "/v1/status") => json_response(StatusCode::OK, &api.app.status()),
        (&Method::GET, "/v1/sessions") => {
            let sessions = api.app.sessions.list_all().await;
            json_response(
                StatusCode::OK,
                &json!({"count": sessions.len(), "sessions": sessions}),
            )
        }
        (&Method::DELETE, p) if p.starts_with("/v1/sessions/") => {
            let id = &p["/v1/sessions/".len()..];
            if id.is_empty() || id.len() > 64 || id.contains('/') {
                return error(StatusCode::BAD_REQUEST, "session id missing or malformed");
            }
            match api
                .app
                .kill(&Selector::Id(id.to_string()), "killed by operator")
                .await
            {
                Some(s) => json_response(
                    StatusCode::OK,
                    &SessionResult {
                        result: "killed",
                        session: &s,
                    },
                ),
                None => error(StatusCode::NOT_FOUND, format!("no live session {id}")),
            }
        }
        (&Method::POST, "/v1/registry/reload") => {
            let force = query_flag(req.uri().query(), "force");
            match api.app.reload("api", force).await {
                Ok(r) => json_response(
                    StatusCode::OK,
                    &json!({"result": "reloaded", "devices": r.devices, "users": r.users, "revoked": r.revoked}),
                ),
                Err(e) => error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("reload refused, previous registry kept: {e}"),
                ),
            }
        }
        (
            _,
            "/v1/connect"
            | "/v1/verify"
            | "/v1/disconnect"
            | "/v1/sessions"
            | "/v1/status"
            | "/v1/registry/reload",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} not allowed on {path}"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route for {method} {path}"),
        ),
    }
}

fn status_of(resp: &ConnectResponse) -> StatusCode {
    match resp.reason {
        None => StatusCode::OK,
        Some(Reason::BadRequest) => StatusCode::BAD_REQUEST,
        Some(_) => StatusCode::FORBIDDEN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        let t = Token("0123456789abcdef".into());
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert!(!t.matches(b"0123456789abcde"));
        assert!(!t.matches(b"0123456789abcdef0"));
        assert!(!t.matches(b""));
        assert_eq!(format!("{t:?}"), "Token(****)");
    }
}
