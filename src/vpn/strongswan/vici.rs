//! The VICI wire format (strongSwan's Versatile IKE Control Interface), both ways: packets
//! (`u32` big-endian length, then a type byte, a name for the named types, a message) and
//! messages (sections, key/values and lists of values, nested). A small codec of our own rather
//! than the `rsvici` crate: pforte needs generic trees (events carry IKE_SAs keyed by their
//! names), strict limits on hostile input, and a fuzz target over exactly this code.

use thiserror::Error;

/// Largest packet accepted or sent (charon's own limit, `VICI_MESSAGE_SIZE_MAX`).
pub const MAX_PACKET: usize = 512 * 1024;
/// Deepest nesting of sections accepted.
pub const MAX_DEPTH: usize = 16;

/// A value in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A key/value.
    Str(Vec<u8>),
    /// A section.
    Section(Message),
    /// A list of values.
    List(Vec<Vec<u8>>),
}

/// A message: named entries in order (names may repeat, as charon sends them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message(pub Vec<(String, Value)>);

/// A packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// A command (client → charon).
    CmdRequest(String, Message),
    /// A command's answer.
    CmdResponse(Message),
    /// The command is unknown.
    CmdUnknown,
    /// Register for an event.
    EventRegister(String),
    /// Unregister from an event.
    EventUnregister(String),
    /// A (un)registration succeeded.
    EventConfirm,
    /// The event is unknown.
    EventUnknown,
    /// An event and its message.
    Event(String, Message),
}

/// Why bytes are not a VICI packet or message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ViciError {
    /// Ends in the middle of an element.
    #[error("truncated VICI data")]
    Truncated,
    /// An element type byte that VICI does not have.
    #[error("unknown VICI element type {0}")]
    BadElement(u8),
    /// A packet type byte that VICI does not have.
    #[error("unknown VICI packet type {0}")]
    BadPacket(u8),
    /// Sections and ends do not pair, or nest too deep.
    #[error("unbalanced or too deeply nested VICI message")]
    Unbalanced,
    /// A name is not UTF-8, or a name or value is too long to encode.
    #[error("VICI name or value not encodable: {0}")]
    Invalid(&'static str),
    /// Larger than [`MAX_PACKET`].
    #[error("VICI packet of {0} bytes is larger than the limit")]
    TooLarge(usize),
}

const SECTION_START: u8 = 1;
const SECTION_END: u8 = 2;
const KEY_VALUE: u8 = 3;
const LIST_START: u8 = 4;
const LIST_ITEM: u8 = 5;
const LIST_END: u8 = 6;

impl Message {
    /// An empty message.
    pub fn new() -> Message {
        Message(Vec::new())
    }

    /// Adds a key/value (builder style).
    pub fn kv(mut self, key: &str, value: impl AsRef<[u8]>) -> Message {
        self.0
            .push((key.to_string(), Value::Str(value.as_ref().to_vec())));
        self
    }

    /// The first value named `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The key/value named `key` as text (invalid UTF-8 replaced).
    pub fn str(&self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::Str(v) => Some(String::from_utf8_lossy(v).into_owned()),
            _ => None,
        }
    }

    /// The section named `key`.
    pub fn section(&self, key: &str) -> Option<&Message> {
        match self.get(key)? {
            Value::Section(m) => Some(m),
            _ => None,
        }
    }

    /// The list named `key`, as text.
    pub fn list(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            Some(Value::List(items)) => items
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The sections of this message, with their names.
    pub fn sections(&self) -> impl Iterator<Item = (&str, &Message)> {
        self.0.iter().filter_map(|(k, v)| match v {
            Value::Section(m) => Some((k.as_str(), m)),
            _ => None,
        })
    }

    /// Appends the encoding of the message.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ViciError> {
        for (name, value) in &self.0 {
            match value {
                Value::Str(v) => {
                    out.push(KEY_VALUE);
                    put_name(out, name)?;
                    put_value(out, v)?;
                }
                Value::Section(m) => {
                    out.push(SECTION_START);
                    put_name(out, name)?;
                    m.encode(out)?;
                    out.push(SECTION_END);
                }
                Value::List(items) => {
                    out.push(LIST_START);
                    put_name(out, name)?;
                    for v in items {
                        out.push(LIST_ITEM);
                        put_value(out, v)?;
                    }
                    out.push(LIST_END);
                }
            }
        }
        Ok(())
    }

    /// Decodes a whole message.
    pub fn decode(bytes: &[u8]) -> Result<Message, ViciError> {
        let mut r = Reader { bytes, at: 0 };
        // A stack of open sections: (name, entries so far).
        let mut stack: Vec<(String, Vec<(String, Value)>)> = vec![(String::new(), Vec::new())];
        while let Some(kind) = r.byte() {
            match kind {
                SECTION_START => {
                    if stack.len() > MAX_DEPTH {
                        return Err(ViciError::Unbalanced);
                    }
                    let name = r.name()?;
                    stack.push((name, Vec::new()));
                }
                SECTION_END => {
                    if stack.len() < 2 {
                        return Err(ViciError::Unbalanced);
                    }
                    let (name, entries) = stack.pop().ok_or(ViciError::Unbalanced)?;
                    let parent = stack.last_mut().ok_or(ViciError::Unbalanced)?;
                    parent.1.push((name, Value::Section(Message(entries))));
                }
                KEY_VALUE => {
                    let name = r.name()?;
                    let value = r.value()?;
                    let top = stack.last_mut().ok_or(ViciError::Unbalanced)?;
                    top.1.push((name, Value::Str(value)));
                }
                LIST_START => {
                    let name = r.name()?;
                    let mut items = Vec::new();
                    loop {
                        match r.byte().ok_or(ViciError::Truncated)? {
                            LIST_ITEM => items.push(r.value()?),
                            LIST_END => break,
                            other => return Err(ViciError::BadElement(other)),
                        }
                    }
                    let top = stack.last_mut().ok_or(ViciError::Unbalanced)?;
                    top.1.push((name, Value::List(items)));
                }
                other => return Err(ViciError::BadElement(other)),
            }
        }
        if stack.len() != 1 {
            return Err(ViciError::Unbalanced);
        }
        let (_, entries) = stack.pop().ok_or(ViciError::Unbalanced)?;
        Ok(Message(entries))
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), ViciError> {
    let len = u8::try_from(name.len()).map_err(|_| ViciError::Invalid("name over 255 bytes"))?;
    out.push(len);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn put_value(out: &mut Vec<u8>, v: &[u8]) -> Result<(), ViciError> {
    let len = u16::try_from(v.len()).map_err(|_| ViciError::Invalid("value over 65535 bytes"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(v);
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], ViciError> {
        let end = self.at.checked_add(n).ok_or(ViciError::Truncated)?;
        let s = self.bytes.get(self.at..end).ok_or(ViciError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn name(&mut self) -> Result<String, ViciError> {
        let n = usize::from(self.byte().ok_or(ViciError::Truncated)?);
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| ViciError::Invalid("name not UTF-8"))
    }

    fn value(&mut self) -> Result<Vec<u8>, ViciError> {
        let len = self.take(2)?;
        let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
        Ok(self.take(n)?.to_vec())
    }
}

impl Packet {
    /// The packet with its 4-byte length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, ViciError> {
        let mut body = Vec::new();
        let (kind, name, msg): (u8, Option<&str>, Option<&Message>) = match self {
            Packet::CmdRequest(n, m) => (0, Some(n), Some(m)),
            Packet::CmdResponse(m) => (1, None, Some(m)),
            Packet::CmdUnknown => (2, None, None),
            Packet::EventRegister(n) => (3, Some(n), None),
            Packet::EventUnregister(n) => (4, Some(n), None),
            Packet::EventConfirm => (5, None, None),
            Packet::EventUnknown => (6, None, None),
            Packet::Event(n, m) => (7, Some(n), Some(m)),
        };
        body.push(kind);
        if let Some(n) = name {
            put_name(&mut body, n)?;
        }
        if let Some(m) = msg {
            m.encode(&mut body)?;
        }
        if body.len() > MAX_PACKET {
            return Err(ViciError::TooLarge(body.len()));
        }
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes a packet's body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Packet, ViciError> {
        if body.len() > MAX_PACKET {
            return Err(ViciError::TooLarge(body.len()));
        }
        let mut r = Reader { bytes: body, at: 0 };
        let kind = r.byte().ok_or(ViciError::Truncated)?;
        let rest = |r: &Reader| Message::decode(&r.bytes[r.at..]);
        Ok(match kind {
            0 => {
                let n = r.name()?;
                Packet::CmdRequest(n, rest(&r)?)
            }
            1 => Packet::CmdResponse(rest(&r)?),
            2 => Packet::CmdUnknown,
            3 => Packet::EventRegister(r.name()?),
            4 => Packet::EventUnregister(r.name()?),
            5 => Packet::EventConfirm,
            6 => Packet::EventUnknown,
            7 => {
                let n = r.name()?;
                Packet::Event(n, rest(&r)?)
            }
            other => return Err(ViciError::BadPacket(other)),
        })
    }
}

/// Reads the length prefix of a packet: the body's length, refused over [`MAX_PACKET`].
pub fn body_len(prefix: [u8; 4]) -> Result<usize, ViciError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if n > MAX_PACKET {
        return Err(ViciError::TooLarge(n));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_nested_message() {
        let inner = Message(vec![
            ("uniqueid".into(), Value::Str(b"7".to_vec())),
            (
                "remote-vips".into(),
                Value::List(vec![b"10.99.1.1".to_vec()]),
            ),
            (
                "child-sas".into(),
                Value::Section(Message::new().kv("bytes-in", "100")),
            ),
        ]);
        let msg = Message(vec![
            ("up".into(), Value::Str(b"yes".to_vec())),
            ("rw".into(), Value::Section(inner)),
        ]);
        let p = Packet::Event("ike-updown".into(), msg.clone());
        let bytes = p.encode().unwrap();
        assert_eq!(
            body_len(bytes[..4].try_into().unwrap()).unwrap(),
            bytes.len() - 4
        );
        let back = Packet::decode(&bytes[4..]).unwrap();
        assert_eq!(back, p);
        let Packet::Event(_, m) = back else { panic!() };
        let sa = m.section("rw").unwrap();
        assert_eq!(sa.str("uniqueid").as_deref(), Some("7"));
        assert_eq!(sa.list("remote-vips"), vec!["10.99.1.1".to_string()]);
        assert_eq!(m.sections().count(), 1);
    }

    #[test]
    fn known_bytes_of_a_command() {
        // `terminate` with ike-id 3, as charon expects it.
        let p = Packet::CmdRequest("terminate".into(), Message::new().kv("ike-id", "3"));
        let bytes = p.encode().unwrap();
        let mut want = vec![0u8, 0, 0, 0, 0, 9];
        want.extend_from_slice(b"terminate");
        want.extend_from_slice(&[3, 6]);
        want.extend_from_slice(b"ike-id");
        want.extend_from_slice(&[0, 1, b'3']);
        want[3] = (want.len() - 4) as u8;
        assert_eq!(bytes, want);
    }

    #[test]
    fn refuses_malformed_input() {
        assert_eq!(Message::decode(&[2]), Err(ViciError::Unbalanced));
        assert_eq!(Message::decode(&[1, 1, b'a']), Err(ViciError::Unbalanced));
        assert_eq!(Message::decode(&[3, 5, b'a']), Err(ViciError::Truncated));
        assert_eq!(Message::decode(&[9]), Err(ViciError::BadElement(9)));
        assert_eq!(
            Message::decode(&[4, 1, b'l', 3]),
            Err(ViciError::BadElement(3))
        );
        let deep: Vec<u8> = std::iter::repeat_n([1u8, 0], MAX_DEPTH + 2)
            .flatten()
            .collect();
        assert_eq!(Message::decode(&deep), Err(ViciError::Unbalanced));
        assert_eq!(Packet::decode(&[8]), Err(ViciError::BadPacket(8)));
        assert_eq!(Packet::decode(&[]), Err(ViciError::Truncated));
        assert!(body_len([0, 0x10, 0, 0]).is_err());
        let long = "x".repeat(256);
        assert!(
            Message::new()
                .kv(&long, "v")
                .encode(&mut Vec::new())
                .is_err()
        );
    }

    fn seed() -> Vec<u8> {
        let sa = Message(vec![
            ("uniqueid".into(), Value::Str(b"1".to_vec())),
            (
                "remote-vips".into(),
                Value::List(vec![b"10.99.1.1".to_vec()]),
            ),
            (
                "child-sas".into(),
                Value::Section(Message::new().kv("bytes-in", "5")),
            ),
        ]);
        let m = Message(vec![("rw".into(), Value::Section(sa))]);
        Packet::Event("ike-updown".into(), m).encode().unwrap()
    }

    fn round_trip_holds(body: &[u8]) {
        if let Ok(p) = Packet::decode(body) {
            let again = p.encode().unwrap();
            assert_eq!(Packet::decode(&again[4..]).unwrap(), p);
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_without_panic_and_round_trip(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            round_trip_holds(&body);
        }

        #[test]
        fn mutated_packets_decode_without_panic_and_round_trip(
            edits in proptest::collection::vec((0usize..200, proptest::prelude::any::<u8>()), 1..6),
            cut in 0usize..200,
        ) {
            let mut bytes = seed();
            for (at, b) in edits {
                let n = bytes.len();
                bytes[at % n] = b;
            }
            let body = &bytes[4..];
            round_trip_holds(&body[..cut.min(body.len())]);
            round_trip_holds(body);
        }
    }
}
