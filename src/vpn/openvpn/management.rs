//! OpenVPN management-interface lines: notifications (with their `>CLIENT:ENV` blocks), command
//! replies, and the `status 3` table. Pure parsing, so it can be tested and fuzzed alone.
//!
//! The management interface hands over `password=` in clear text: the parser drops it at once,
//! and bounds the environment it keeps, so hostile or broken input cannot grow memory.

use std::collections::HashMap;

/// Longest line kept; longer ones are cut (the reader enforces it before parsing).
pub const MAX_LINE: usize = 16 * 1024;
/// Most environment variables kept per client event.
pub const MAX_ENV_VARS: usize = 512;

/// What a `>CLIENT:` notification announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEventKind {
    /// A new client asks to be authenticated (management-client-auth).
    Connect,
    /// A TLS renegotiation asks again.
    Reauth,
    /// The client is connected (also without client-auth).
    Established,
    /// The client is gone; the env has the final byte counts.
    Disconnect,
}

/// A `>CLIENT:` notification with its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEvent {
    /// What happened.
    pub kind: ClientEventKind,
    /// OpenVPN's client id.
    pub cid: u64,
    /// Key id (CONNECT and REAUTH).
    pub kid: Option<u64>,
    /// The environment (without `password`).
    pub env: HashMap<String, String>,
}

/// One parsed line, or a completed client event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A client notification, complete with its environment.
    Client(ClientEvent),
    /// `>BYTECOUNT_CLI:cid,in,out`: bytes received from and sent to the client.
    ByteCount {
        /// Client id.
        cid: u64,
        /// Bytes received from the client.
        received: u64,
        /// Bytes sent to the client.
        sent: u64,
    },
    /// `>INFO:` (the greeting).
    Info(String),
    /// `>HOLD:`: OpenVPN waits for `hold release`.
    Hold,
    /// Any other notification.
    Other(String),
    /// A line of a command's reply.
    Reply(String),
}

/// Accumulates `>CLIENT:ENV` blocks.
#[derive(Debug, Default)]
pub struct Parser {
    pending: Option<ClientEvent>,
}

fn nums(s: &str) -> Vec<Option<u64>> {
    s.split(',').map(|p| p.trim().parse().ok()).collect()
}

impl Parser {
    /// A fresh parser (one per connection).
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Feeds one line (without its line end); returns an event when one is complete.
    pub fn feed(&mut self, line: &str) -> Option<Event> {
        let line = line.trim_end_matches(['\r', '\n']);
        let Some(rest) = line.strip_prefix('>') else {
            return Some(Event::Reply(line.to_string()));
        };
        if let Some(env) = rest.strip_prefix("CLIENT:ENV,") {
            if env == "END" {
                return self.pending.take().map(Event::Client);
            }
            if let Some(ev) = self.pending.as_mut()
                && let Some((k, v)) = env.split_once('=')
                && k != "password"
                && ev.env.len() < MAX_ENV_VARS
            {
                ev.env.insert(k.to_string(), v.to_string());
            }
            return None;
        }
        if let Some(c) = rest.strip_prefix("CLIENT:") {
            let (name, args) = c.split_once(',').unwrap_or((c, ""));
            let n = nums(args);
            let kind = match name {
                "CONNECT" => ClientEventKind::Connect,
                "REAUTH" => ClientEventKind::Reauth,
                "ESTABLISHED" => ClientEventKind::Established,
                "DISCONNECT" => ClientEventKind::Disconnect,
                _ => return Some(Event::Other(line.to_string())),
            };
            let cid = n.first().copied().flatten()?;
            // A new notification replaces an unterminated one (a broken stream).
            self.pending = Some(ClientEvent {
                kind,
                cid,
                kid: n.get(1).copied().flatten(),
                env: HashMap::new(),
            });
            return None;
        }
        if let Some(b) = rest.strip_prefix("BYTECOUNT_CLI:") {
            let n = nums(b);
            if let [Some(cid), Some(received), Some(sent)] = n[..] {
                return Some(Event::ByteCount {
                    cid,
                    received,
                    sent,
                });
            }
            return Some(Event::Other(line.to_string()));
        }
        if let Some(i) = rest.strip_prefix("INFO:") {
            return Some(Event::Info(i.to_string()));
        }
        if rest.starts_with("HOLD:") {
            return Some(Event::Hold);
        }
        Some(Event::Other(line.to_string()))
    }
}

/// Whether a reply line ends a command's reply.
pub fn ends_reply(line: &str) -> bool {
    line == "END" || line.starts_with("SUCCESS:") || line.starts_with("ERROR:")
}

/// One client of `status 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusClient {
    /// Common name.
    pub common_name: String,
    /// Real address `ip:port`.
    pub real_address: String,
    /// Tunnel address.
    pub virtual_address: String,
    /// Bytes received from the client.
    pub bytes_received: u64,
    /// Bytes sent to the client.
    pub bytes_sent: u64,
    /// Connected since (unix time).
    pub connected_since: i64,
    /// Username (`UNDEF` when none).
    pub username: String,
    /// Client id.
    pub client_id: u64,
}

/// Parses `status 3` (tab-separated, columns found through the `HEADER CLIENT_LIST` line, so
/// added columns in later versions do not break it). Rows it cannot read are skipped.
pub fn parse_status(lines: &[String]) -> Vec<StatusClient> {
    let mut cols: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for line in lines {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.first().copied() {
            Some("HEADER") if fields.get(1) == Some(&"CLIENT_LIST") => {
                cols = fields[2..]
                    .iter()
                    .enumerate()
                    .map(|(i, name)| (name.to_string(), i + 1))
                    .collect();
            }
            Some("CLIENT_LIST") => {
                let get = |name: &str, default: usize| -> &str {
                    let i = cols.get(name).copied().unwrap_or(default);
                    fields.get(i).copied().unwrap_or("")
                };
                let Ok(client_id) = get("Client ID", 10).parse() else {
                    continue;
                };
                out.push(StatusClient {
                    common_name: get("Common Name", 1).to_string(),
                    real_address: get("Real Address", 2).to_string(),
                    virtual_address: get("Virtual Address", 3).to_string(),
                    bytes_received: get("Bytes Received", 5).parse().unwrap_or(0),
                    bytes_sent: get("Bytes Sent", 6).parse().unwrap_or(0),
                    connected_since: get("Connected Since (time_t)", 8).parse().unwrap_or(0),
                    username: get("Username", 9).to_string(),
                    client_id,
                });
            }
            _ => {}
        }
    }
    out
}

/// Quotes a string for a management command argument.
pub fn quote(s: &str) -> String {
    let clean: String = s
        .chars()
        .filter(|c| !c.is_control())
        .map(|c| if c == '"' { '\'' } else { c })
        .take(200)
        .collect();
    format!("\"{}\"", clean.replace('\\', "\\\\"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_connect_block_without_password() {
        let mut p = Parser::new();
        assert_eq!(p.feed(">CLIENT:CONNECT,7,2\r"), None);
        assert_eq!(p.feed(">CLIENT:ENV,common_name=alice"), None);
        assert_eq!(p.feed(">CLIENT:ENV,password=hunter2"), None);
        assert_eq!(p.feed(">CLIENT:ENV,untrusted_ip=1.2.3.4"), None);
        let Some(Event::Client(ev)) = p.feed(">CLIENT:ENV,END") else {
            panic!("no event");
        };
        assert_eq!(
            (ev.kind, ev.cid, ev.kid),
            (ClientEventKind::Connect, 7, Some(2))
        );
        assert_eq!(ev.env["common_name"], "alice");
        assert!(!ev.env.contains_key("password"));
        assert_eq!(
            p.feed(">CLIENT:ENV,END"),
            None,
            "a stray END yields nothing"
        );
    }

    #[test]
    fn bytecount_info_replies() {
        let mut p = Parser::new();
        assert_eq!(
            p.feed(">BYTECOUNT_CLI:3,100,200"),
            Some(Event::ByteCount {
                cid: 3,
                received: 100,
                sent: 200
            })
        );
        assert!(matches!(
            p.feed(">BYTECOUNT_CLI:x,1"),
            Some(Event::Other(_))
        ));
        assert!(matches!(
            p.feed(">INFO:OpenVPN Management Interface Version 5"),
            Some(Event::Info(_))
        ));
        assert_eq!(
            p.feed("SUCCESS: bytecount interval changed"),
            Some(Event::Reply("SUCCESS: bytecount interval changed".into()))
        );
        assert!(ends_reply("END") && ends_reply("ERROR: x") && !ends_reply("TITLE\tx"));
        assert_eq!(p.feed(">CLIENT:CONNECT,notanumber,1"), None);
    }

    #[test]
    fn status_3() {
        let lines: Vec<String> = [
            "TITLE\tOpenVPN 2.6.14",
            "TIME\t2026-11-23 10:00:00\t1795440000",
            "HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\tBytes Received\tBytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\tPeer ID\tData Channel Cipher",
            "CLIENT_LIST\talice\t172.31.0.2:41000\t10.213.0.2\t\t5000\t6000\t2026-11-23 09:59:00\t1795439940\tUNDEF\t4\t0\tAES-256-GCM",
            "CLIENT_LIST\tbroken",
            "HEADER\tROUTING_TABLE\tVirtual Address\tCommon Name\tReal Address\tLast Ref\tLast Ref (time_t)",
            "END",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = parse_status(&lines);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].real_address, "172.31.0.2:41000");
        assert_eq!((s[0].client_id, s[0].connected_since), (4, 1795439940));
        assert_eq!((s[0].bytes_received, s[0].bytes_sent), (5000, 6000));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("a \"b\"\n"), "\"a 'b'\"");
    }
}
