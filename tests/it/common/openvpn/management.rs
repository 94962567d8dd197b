//! A client of OpenVPN's management interface, and its `status 3` rows.

use super::*;

/// A client of OpenVPN's management interface on a unix socket. OpenVPN serves one management
/// client at a time: a second connection waits silently until the first closes.
#[derive(Debug)]
pub struct Management {
    stream: UnixStream,
    pending: Vec<u8>,
    notifications: VecDeque<String>,
    timeout: Duration,
}

/// One `CLIENT_LIST` row of `status 3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusClient {
    /// Certificate common name.
    pub common_name: String,
    /// Real address `ip:port`.
    pub real_address: String,
    /// Tunnel address.
    pub virtual_address: String,
    /// Link bytes received from the client.
    pub bytes_received: u64,
    /// Link bytes sent to the client.
    pub bytes_sent: u64,
    /// Username or `UNDEF`.
    pub username: String,
    /// Client id (CID) for `client-kill`, `client-auth`, ….
    pub client_id: u64,
    /// Peer id.
    pub peer_id: u64,
    /// Every column by its header name.
    pub fields: HashMap<String, String>,
}

impl Management {
    /// Connects (retrying while the socket is not there yet, bounded by `timeout`), reads the
    /// `>INFO:` banner. `timeout` also bounds each later command.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Management, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("connect {}: {e}", path.display()));
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        let mut m = Management {
            stream,
            pending: Vec::new(),
            notifications: VecDeque::new(),
            timeout,
        };
        let banner = m.read_line(deadline)?;
        if !banner.starts_with(">INFO:") {
            return Err(format!("unexpected management banner {banner:?}"));
        }
        Ok(m)
    }

    fn read_line(&mut self, deadline: Instant) -> Result<String, String> {
        loop {
            if let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "management: timeout; partial input {:?}",
                    String::from_utf8_lossy(&self.pending)
                ));
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err("management: connection closed".to_owned()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(format!("management read: {e}")),
            }
        }
    }

    /// Sends `cmd` (one or more lines, e.g. `"client-auth 0 1\npush \"route …\"\nEND"`) and reads
    /// the reply up to a line `END`, `SUCCESS: …` or `ERROR: …` (included). Notifications (`>…`)
    /// that arrive meanwhile are queued for [`Management::wait_notification`]. An `ERROR:` reply is
    /// an `Err`.
    pub fn command(&mut self, cmd: &str) -> Result<Vec<String>, String> {
        let mut text = cmd.trim_end().to_owned();
        text.push('\n');
        self.stream
            .write_all(text.as_bytes())
            .map_err(|e| format!("management write: {e}"))?;
        let deadline = Instant::now() + self.timeout;
        let mut lines = Vec::new();
        loop {
            let line = self
                .read_line(deadline)
                .map_err(|e| format!("{e} (after {cmd:?}; got {lines:?})"))?;
            if line.starts_with('>') {
                self.notifications.push_back(line);
                continue;
            }
            let last = line == "END" || line.starts_with("SUCCESS:") || line.starts_with("ERROR:");
            let error = line.starts_with("ERROR:");
            lines.push(line);
            if error {
                return Err(format!("management {cmd:?}: {}", lines.join("\n")));
            }
            if last {
                return Ok(lines);
            }
        }
    }

    /// Waits for a notification starting with `prefix` (e.g. `">CLIENT:ESTABLISHED"`), skipping
    /// (and dropping) earlier ones. For `>CLIENT:` notifications other than ADDRESS, the following
    /// `>CLIENT:ENV,…` lines up to `>CLIENT:ENV,END` are returned with it.
    pub fn wait_notification(
        &mut self,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let line = match self.notifications.pop_front() {
                Some(l) => l,
                None => self
                    .read_line(deadline)
                    .map_err(|e| format!("{e} waiting for {prefix:?}; skipped {skipped:?}"))?,
            };
            if !line.starts_with(prefix) {
                skipped.push(line);
                continue;
            }
            let mut block = vec![line];
            if block[0].starts_with(">CLIENT:")
                && !block[0].starts_with(">CLIENT:ADDRESS")
                && !block[0].starts_with(">CLIENT:ENV")
            {
                loop {
                    let l = match self.notifications.pop_front() {
                        Some(l) => l,
                        None => self.read_line(deadline)?,
                    };
                    let end = l == ">CLIENT:ENV,END";
                    block.push(l);
                    if end {
                        break;
                    }
                }
            }
            return Ok(block);
        }
    }

    /// Notifications received so far and not yet consumed.
    pub fn take_notifications(&mut self) -> Vec<String> {
        self.notifications.drain(..).collect()
    }

    /// `status 3`, parsed: one entry per `CLIENT_LIST` row.
    pub fn status_clients(&mut self) -> Result<Vec<StatusClient>, String> {
        let lines = self.command("status 3")?;
        parse_status3(&lines)
    }
}

/// Parses the `CLIENT_LIST` rows of a `status 3` reply using its `HEADER\tCLIENT_LIST` line.
pub fn parse_status3(lines: &[String]) -> Result<Vec<StatusClient>, String> {
    let header: Vec<&str> = lines
        .iter()
        .find_map(|l| l.strip_prefix("HEADER\tCLIENT_LIST\t"))
        .ok_or_else(|| format!("no CLIENT_LIST header in {lines:?}"))?
        .split('\t')
        .collect();
    let mut out = Vec::new();
    for row in lines.iter().filter_map(|l| l.strip_prefix("CLIENT_LIST\t")) {
        let fields: HashMap<String, String> = header
            .iter()
            .zip(row.split('\t'))
            .map(|(k, v)| ((*k).to_owned(), v.to_owned()))
            .collect();
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        let num = |k: &str| {
            get(k)
                .parse::<u64>()
                .map_err(|e| format!("{k} in {row:?}: {e}"))
        };
        out.push(StatusClient {
            common_name: get("Common Name"),
            real_address: get("Real Address"),
            virtual_address: get("Virtual Address"),
            bytes_received: num("Bytes Received")?,
            bytes_sent: num("Bytes Sent")?,
            username: get("Username"),
            client_id: num("Client ID")?,
            peer_id: num("Peer ID")?,
            fields,
        });
    }
    Ok(out)
}
