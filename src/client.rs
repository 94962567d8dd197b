//! A small HTTP/1.1 client for pforte's API over its Unix socket, with keep-alive. Used by the
//! hook, the load generator and the tests.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::app::{ConnectResponse, DisconnectRequest};
use crate::policy::ConnectRequest;

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
