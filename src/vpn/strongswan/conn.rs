//! A connection to charon's VICI socket: packets framed both ways, commands with their answers,
//! event registration, and a reader task for an event stream.

use std::path::Path;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::mpsc;

use super::vici::{Message, Packet, ViciError, body_len};

/// The longest a command may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why talking to charon failed.
#[derive(Debug, Error)]
pub enum ConnError {
    /// The socket failed or closed.
    #[error("VICI socket: {0}")]
    Io(#[from] std::io::Error),
    /// charon sent something that is not VICI.
    #[error(transparent)]
    Vici(#[from] ViciError),
    /// charon does not know the command or event.
    #[error("charon does not know `{0}`")]
    Unknown(String),
    /// No answer in time.
    #[error("no answer from charon to `{0}` within {CALL_TIMEOUT:?}")]
    Timeout(String),
}

/// One VICI connection.
pub struct Conn {
    stream: UnixStream,
}

async fn read_packet(r: &mut (impl AsyncReadExt + Unpin)) -> Result<Packet, ConnError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let n = body_len(prefix)?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await?;
    Ok(Packet::decode(&body)?)
}

impl Conn {
    /// Connects to the socket.
    pub async fn connect(path: &Path) -> Result<Conn, ConnError> {
        Ok(Conn {
            stream: UnixStream::connect(path).await?,
        })
    }

    async fn send(&mut self, p: &Packet) -> Result<(), ConnError> {
        let bytes = p.encode()?;
        self.stream.write_all(&bytes).await?;
        Ok(())
    }

    /// Registers for an event (on a connection that carries no other traffic yet).
    pub async fn register(&mut self, event: &str) -> Result<(), ConnError> {
        self.send(&Packet::EventRegister(event.to_string())).await?;
        let fut = async {
            loop {
                match read_packet(&mut self.stream).await? {
                    Packet::EventConfirm => return Ok(()),
                    Packet::EventUnknown => return Err(ConnError::Unknown(event.to_string())),
                    _ => continue,
                }
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| ConnError::Timeout(format!("register {event}")))?
    }

    /// Runs a command; with `stream_event` (e.g. `list-sa` for `list-sas`) registers for it
    /// first and returns the events that came before the answer.
    pub async fn call(
        &mut self,
        cmd: &str,
        args: Message,
        stream_event: Option<&str>,
    ) -> Result<(Vec<Message>, Message), ConnError> {
        if let Some(ev) = stream_event {
            self.register(ev).await?;
        }
        self.send(&Packet::CmdRequest(cmd.to_string(), args))
            .await?;
        let fut = async {
            let mut events = Vec::new();
            loop {
                match read_packet(&mut self.stream).await? {
                    Packet::Event(_, m) => events.push(m),
                    Packet::CmdResponse(m) => return Ok((events, m)),
                    Packet::CmdUnknown => return Err(ConnError::Unknown(cmd.to_string())),
                    _ => continue,
                }
            }
        };
        let out = tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| ConnError::Timeout(cmd.to_string()))??;
        if let Some(ev) = stream_event {
            self.send(&Packet::EventUnregister(ev.to_string())).await?;
            let fut = async {
                loop {
                    match read_packet(&mut self.stream).await? {
                        Packet::EventConfirm | Packet::EventUnknown => {
                            return Ok::<_, ConnError>(());
                        }
                        _ => continue,
                    }
                }
            };
            tokio::time::timeout(CALL_TIMEOUT, fut)
                .await
                .map_err(|_| ConnError::Timeout(format!("unregister {ev}")))??;
        }
        Ok(out)
    }

    /// Turns a connection registered for its events into a stream of `(event, message)`; the
    /// stream ends (with the error) when the socket does.
    pub fn into_events(self) -> mpsc::Receiver<Result<(String, Message), ConnError>> {
        let (tx, rx) = mpsc::channel(1024);
        let (mut read, _write) = self.stream.into_split();
        tokio::spawn(async move {
            // The write half stays alive with the task: charon keeps the registration.
            let _keep = _write;
            loop {
                let item = next_event(&mut read).await;
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        rx
    }
}

async fn next_event(read: &mut OwnedReadHalf) -> Result<(String, Message), ConnError> {
    loop {
        if let Packet::Event(name, m) = read_packet(read).await? {
            return Ok((name, m));
        }
    }
}
