//! Listening sockets and the process's file limit: a listen backlog deep enough for a reconnect
//! storm, and as many open files as the system allows.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use tokio::net::{TcpListener, TcpSocket, UnixListener};

/// Connections the kernel queues for a listener before `accept`. The kernel caps it at
/// `net.core.somaxconn` (4,096 on current kernels).
///
/// Why 128 (the standard library's) was not enough: in a burst, the accept loop takes every
/// queued connection and spawns a task for each; the request thread then runs those tasks, and
/// tokio looks at its I/O driver, which wakes the accept loop, only every 61 scheduler ticks
/// while tasks are queued. Meanwhile the next 129 connects fill the queue and the kernel drops
/// the following SYN: that client waits a second for its retry. Measured with 3,000 sequential
/// connects: 8–13 one-second waits with a backlog of 128, none with `event_interval(1)` (which
/// would cost every request a driver poll) and none with this backlog
/// (`tests/it/limits.rs`).
pub const LISTEN_BACKLOG: i32 = 4096;

/// A socket that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {what}: {source}")]
pub struct BindError {
    /// Address or socket path.
    pub what: String,
    /// Cause.
    pub source: std::io::Error,
}

/// Binds a TCP listener with [`LISTEN_BACKLOG`].
pub fn bind_tcp(addr: std::net::SocketAddr) -> Result<TcpListener, BindError> {
    let err = |source| BindError {
        what: addr.to_string(),
        source,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG as u32).map_err(err)
}

/// Binds a UDP socket (the RADIUS front), non-blocking, for the running tokio runtime.
pub fn bind_udp(addr: std::net::SocketAddr) -> Result<tokio::net::UdpSocket, BindError> {
    let err = |source| BindError {
        what: format!("udp {addr}"),
        source,
    };
    let std = std::net::UdpSocket::bind(addr).map_err(err)?;
    std.set_nonblocking(true).map_err(err)?;
    tokio::net::UdpSocket::from_std(std).map_err(err)
}

/// Binds a Unix socket with [`LISTEN_BACKLOG`]: creates its folder, removes a stale socket file
/// first (never another kind of file), sets the mode right after.
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    let err = |source| BindError {
        what: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(err)?;
        } else {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; not removing it",
            )));
        }
    }
    let fd: OwnedFd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| err(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
        .map_err(|e| err(e.into()))?;
    let backlog = Backlog::new(LISTEN_BACKLOG).map_err(|e| err(e.into()))?;
    nix::sys::socket::listen(&fd, backlog).map_err(|e| err(e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd)).map_err(err)
}

/// Raises the soft limit of open files to the hard limit (systemd starts services with a soft
/// limit of 1,024, which a few hundred hooks and management connections can reach). Returns the
/// soft limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        return Ok(hard);
    }
    Ok(soft)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_another_file_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/pforte.sock");
        drop(bind_unix(&path, 0o600).unwrap());
        let l = bind_unix(&path, 0o640).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let c = tokio::net::UnixStream::connect(&path).await.unwrap();
        l.accept().await.unwrap();
        drop(c);
        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep").unwrap();
        let e = bind_unix(&file, 0o600).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    #[test]
    fn the_open_files_limit_ends_at_the_hard_limit() {
        let now = raise_open_files_limit().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((now, soft), (hard, hard));
    }
}
