//! A small HTTP/1.1 client for pforte's API over its Unix socket: [`UnixClient`] (async,
//! keep-alive) for the load generator and the tests, [`request_once`] (one blocking request,
//! no runtime) for the hook.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, setsockopt, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};
use tokio::net::UnixStream;

use crate::wire::ConnectRequest;
use crate::wire::{ConnectResponse, DisconnectRequest};

/// A client error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the socket.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// Building the request failed.
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    /// No (complete) answer within the time allowed.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Writing the request or reading the answer failed.
    #[error("socket: {0}")]
    Io(std::io::Error),
    /// The answer was not the expected JSON.
    #[error("unexpected answer (status {status}): {body}")]
    Answer {
        /// HTTP status.
        status: u16,
        /// Body, cut short.
        body: String,
    },
}

/// One keep-alive connection to the daemon.
pub struct UnixClient {
    sender: SendRequest<Full<Bytes>>,
}

impl UnixClient {
    /// Connects to the socket.
    pub async fn connect(path: &Path) -> Result<UnixClient, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(UnixClient { sender })
    }

    /// Sends a request; returns status and body.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        self.sender.ready().await?;
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "pforte");
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = builder.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    /// `POST /v1/connect`.
    pub async fn connect_request(
        &mut self,
        req: &ConnectRequest,
    ) -> Result<(u16, ConnectResponse), ClientError> {
        let body = serde_json::to_vec(req).unwrap_or_default();
        let (status, bytes) = self
            .request(Method::POST, "/v1/connect", Some(body))
            .await?;
        let resp = serde_json::from_slice(&bytes).map_err(|_| ClientError::Answer {
            status,
            body: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        })?;
        Ok((status, resp))
    }

    /// `POST /v1/disconnect`; returns status and the JSON answer.
    pub async fn disconnect_request(
        &mut self,
        req: &DisconnectRequest,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let body = serde_json::to_vec(req).unwrap_or_default();
        let (status, bytes) = self
            .request(Method::POST, "/v1/disconnect", Some(body))
            .await?;
        let v = serde_json::from_slice(&bytes).map_err(|_| ClientError::Answer {
            status,
            body: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        })?;
        Ok((status, v))
    }
}

/// Longest answer [`request_once`] reads.
const MAX_ANSWER: usize = 1 << 20;

/// One request on a fresh connection, blocking and without an async runtime: for a
/// short-lived process such as the hook, where starting a runtime and an HTTP stack costs more
/// than the request itself. Sends `connection: close` and reads the answer to its end.
/// `timeout` bounds the whole exchange, the connect included (`SO_SNDTIMEO`, set before
/// connecting, bounds a connect to a Unix socket whose listen queue is full). Returns the
/// status and the body; a JSON body is sent as `application/json`.
pub fn request_once(
    path: &Path,
    method: &str,
    uri: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    let deadline = Instant::now() + timeout;
    let left = || {
        let d = deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err(ClientError::Timeout(timeout))
        } else {
            Ok(d)
        }
    };
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ClientError::Timeout(timeout)
        }
        _ => ClientError::Io(e),
    };
    let connect_err = |e: nix::Error| match e {
        nix::Error::EAGAIN | nix::Error::ETIMEDOUT => ClientError::Timeout(timeout),
        e => ClientError::Connect {
            path: path.display().to_string(),
            source: std::io::Error::from(e),
        },
    };
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(connect_err)?;
    let micros = i64::try_from(timeout.as_micros())
        .unwrap_or(i64::MAX)
        .max(1);
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::microseconds(micros)).map_err(connect_err)?;
    let addr = UnixAddr::new(path).map_err(connect_err)?;
    nix::sys::socket::connect(fd.as_raw_fd(), &addr).map_err(connect_err)?;
    let mut stream = std::os::unix::net::UnixStream::from(fd);

    let mut out = format!(
        "{method} {uri} HTTP/1.1\r\nhost: pforte\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        out.push_str("content-type: application/json\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    // The send timeout set before connecting bounds the write too (a request of a few hundred
    // bytes into an empty socket buffer).
    stream.write_all(&out).map_err(io)?;

    let mut answer = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    // Read until the answer is whole by its content-length, not until the daemon closes: the
    // hook's time is OpenVPN's, and the close comes after the answer.
    while !whole(&answer) {
        stream.set_read_timeout(Some(left()?)).map_err(io)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.len() > MAX_ANSWER {
                    return Err(ClientError::Answer {
                        status: 0,
                        body: format!("answer longer than {MAX_ANSWER} bytes"),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    parse_answer(&answer)
}

/// Where an answer's headers end (the index of the blank line's `\r\n\r\n`).
fn end_of_headers(answer: &[u8]) -> Option<usize> {
    answer.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The value of a header line if it is `content-length` (any case), as written.
fn content_length(line: &str) -> Option<&str> {
    let (name, value) = line.split_once(':')?;
    name.trim()
        .eq_ignore_ascii_case("content-length")
        .then(|| value.trim())
}

/// Whether an answer read so far has all its headers and as many body bytes as its
/// `content-length` says.
fn whole(answer: &[u8]) -> bool {
    let Some(split) = end_of_headers(answer) else {
        return false;
    };
    let length = std::str::from_utf8(&answer[..split]).ok().and_then(|head| {
        head.split("\r\n")
            .find_map(content_length)
            .and_then(|v| v.parse::<usize>().ok())
    });
    length.is_some_and(|n| answer.len() - split - 4 >= n)
}

/// Status and body of a complete HTTP/1.1 answer: the body is `content-length` bytes, or
/// everything after the headers when there is none. A chunked answer is refused (the daemon
/// never sends one).
fn parse_answer(answer: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let bad = |why: &str| ClientError::Answer {
        status: 0,
        body: why.to_string(),
    };
    let split =
        end_of_headers(answer).ok_or_else(|| bad("incomplete answer (no end of headers)"))?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| bad("headers not UTF-8"))?;
    let rest = &answer[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| {
            l.strip_prefix("HTTP/1.1 ")
                .or_else(|| l.strip_prefix("HTTP/1.0 "))
        })
        .and_then(|l| l.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut length = None;
    for line in lines {
        let Some((name, _)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("chunked answer"));
        }
        if let Some(value) = content_length(line) {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| bad("bad content-length"))?,
            );
        }
    }
    let body = match length {
        Some(n) if n <= rest.len() => rest[..n].to_vec(),
        Some(_) => {
            return Err(ClientError::Answer {
                status,
                body: "answer cut short".into(),
            });
        }
        None => rest.to_vec(),
    };
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_complete_answer() {
        let a = b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\nContent-Length: 2\r\ndate: x\r\n\r\n{}";
        let (status, body) = parse_answer(a).unwrap_or_default();
        assert_eq!(status, 403);
        assert_eq!(body, b"{}");
    }

    #[test]
    fn an_answer_is_whole_by_its_content_length() {
        assert!(whole(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"));
        assert!(!whole(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{}"));
        assert!(!whole(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"));
        assert!(!whole(b"HTTP/1.1 200 OK\r\nx: y\r\n\r\n{}"));
        assert!(!whole(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n{}"));
    }

    /// The answer is taken as soon as it is whole, though the daemon keeps the connection.
    #[test]
    fn does_not_wait_for_the_close_after_a_whole_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                .unwrap();
            // Holds the connection open well past the client's timeout.
            std::thread::sleep(Duration::from_secs(1));
        });
        let (status, body) =
            request_once(&path, "GET", "/healthz", b"", Duration::from_millis(500)).unwrap();
        assert_eq!((status, body.as_slice()), (200, b"{}".as_slice()));
        server.join().unwrap();
    }

    #[test]
    fn refuses_cut_short_chunked_and_headless_answers() {
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}").is_err());
        assert!(
            parse_answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}").is_err()
        );
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2").is_err());
        assert!(parse_answer(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn a_missing_daemon_is_a_connect_error_and_a_silent_one_a_timeout() {
        let dir = std::env::temp_dir().join(format!("pforte-client-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let missing = dir.join("missing.sock");
        assert!(matches!(
            request_once(&missing, "GET", "/healthz", b"", Duration::from_millis(200)),
            Err(ClientError::Connect { .. })
        ));
        let path = dir.join("silent.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path);
        assert!(listener.is_ok());
        let started = Instant::now();
        let r = request_once(&path, "GET", "/healthz", b"", Duration::from_millis(200));
        assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
