//! The RADIUS packet: codes, the wire format (RFC 2865 3, 5), decoding and encoding, and typed
//! access to attributes.
//!
//! Decoding never panics and allocates at most the packet's own size: a datagram is cut to its
//! Length field (octets past it are padding, RFC 2865 3) and refused when anything in it lies.

use std::net::Ipv4Addr;

use thiserror::Error;

use super::attr::{self, AttrError, MAX_VALUE_LEN, VendorAttr};

/// The smallest packet: the header alone.
pub const HEADER_LEN: usize = 20;
/// The largest packet RFC 2865 allows.
pub const MAX_PACKET_LEN: usize = 4096;

/// A packet's Code (RFC 2865 3, RFC 2866 4, RFC 5176 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    /// Access-Request (1).
    AccessRequest = 1,
    /// Access-Accept (2).
    AccessAccept = 2,
    /// Access-Reject (3).
    AccessReject = 3,
    /// Accounting-Request (4).
    AccountingRequest = 4,
    /// Accounting-Response (5).
    AccountingResponse = 5,
    /// Access-Challenge (11).
    AccessChallenge = 11,
    /// Disconnect-Request (40).
    DisconnectRequest = 40,
    /// Disconnect-ACK (41).
    DisconnectAck = 41,
    /// Disconnect-NAK (42).
    DisconnectNak = 42,
    /// CoA-Request (43).
    CoaRequest = 43,
    /// CoA-ACK (44).
    CoaAck = 44,
    /// CoA-NAK (45).
    CoaNak = 45,
}

impl Code {
    /// The code for a number, or `None` for one this codec does not know.
    pub fn from_u8(n: u8) -> Option<Code> {
        Some(match n {
            1 => Code::AccessRequest,
            2 => Code::AccessAccept,
            3 => Code::AccessReject,
            4 => Code::AccountingRequest,
            5 => Code::AccountingResponse,
            11 => Code::AccessChallenge,
            40 => Code::DisconnectRequest,
            41 => Code::DisconnectAck,
            42 => Code::DisconnectNak,
            43 => Code::CoaRequest,
            44 => Code::CoaAck,
            45 => Code::CoaNak,
            _ => return None,
        })
    }

    /// Whether a packet of this code is a request (its sender picks the authenticator).
    pub fn is_request(self) -> bool {
        matches!(
            self,
            Code::AccessRequest
                | Code::AccountingRequest
                | Code::DisconnectRequest
                | Code::CoaRequest
        )
    }
}

impl From<Code> for u8 {
    fn from(code: Code) -> u8 {
        code as u8
    }
}

impl TryFrom<u8> for Code {
    type Error = PacketError;

    fn try_from(n: u8) -> Result<Code, PacketError> {
        Code::from_u8(n).ok_or(PacketError::UnknownCode(n))
    }
}

/// Why bytes are not a RADIUS packet, or a packet cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PacketError {
    /// Fewer octets than the 20-octet header.
    #[error("datagram of {0} octets is shorter than the 20-octet header")]
    TooShort(usize),
    /// A Length field below 20 or above 4096.
    #[error("length field {0} is outside 20..=4096")]
    BadLength(u16),
    /// A Length field larger than the datagram.
    #[error("length field {length} is larger than the {received}-octet datagram")]
    Truncated {
        /// The Length field.
        length: u16,
        /// The datagram's size.
        received: usize,
    },
    /// An attribute whose length is below 2 or runs past the packet's end.
    #[error("attribute at offset {offset} has a bad length")]
    BadAttribute {
        /// Its offset in the packet.
        offset: usize,
    },
    /// A code this codec does not know.
    #[error("unknown packet code {0}")]
    UnknownCode(u8),
    /// A packet that would be longer than 4096 octets.
    #[error("packet of {0} octets is longer than 4096")]
    TooLong(usize),
    /// An attribute value longer than 253 octets.
    #[error("attribute {kind} value of {len} octets is longer than 253")]
    ValueTooLong {
        /// The attribute type.
        kind: u8,
        /// The value's length.
        len: usize,
    },
}

/// One attribute: its type and its value (at most 253 octets on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    /// The attribute type (see [`attr`]).
    pub kind: u8,
    /// The value, without the type and length octets.
    pub value: Vec<u8>,
}

/// A RADIUS packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The packet's code.
    pub code: Code,
    /// The identifier that pairs a response with its request.
    pub identifier: u8,
    /// The Request or Response Authenticator.
    pub authenticator: [u8; 16],
    /// The attributes, in wire order.
    pub attributes: Vec<Attribute>,
}

impl Packet {
    /// A packet without attributes.
    pub fn new(code: Code, identifier: u8, authenticator: [u8; 16]) -> Packet {
        Packet {
            code,
            identifier,
            authenticator,
            attributes: Vec::new(),
        }
    }

    /// A response to `request` (its identifier; the authenticator is zero until signed).
    pub fn response_to(request: &Packet, code: Code) -> Packet {
        Packet::new(code, request.identifier, [0; 16])
    }

    /// Reads a packet from a datagram. Octets past the Length field are ignored.
    pub fn decode(datagram: &[u8]) -> Result<Packet, PacketError> {
        let Some((header, _)) = datagram.split_first_chunk::<HEADER_LEN>() else {
            return Err(PacketError::TooShort(datagram.len()));
        };
        let code = Code::try_from(header[0])?;
        let length = u16::from_be_bytes([header[2], header[3]]);
        let len = usize::from(length);
        if !(HEADER_LEN..=MAX_PACKET_LEN).contains(&len) {
            return Err(PacketError::BadLength(length));
        }
        let Some(body) = datagram.get(HEADER_LEN..len) else {
            return Err(PacketError::Truncated {
                length,
                received: datagram.len(),
            });
        };
        let mut authenticator = [0; 16];
        authenticator.copy_from_slice(&header[4..]);
        let mut attributes = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            let offset = len - rest.len();
            let [kind, alen, tail @ ..] = rest else {
                return Err(PacketError::BadAttribute { offset });
            };
            let alen = usize::from(*alen);
            if alen < 2 || alen - 2 > tail.len() {
                return Err(PacketError::BadAttribute { offset });
            }
            let (value, after) = tail.split_at(alen - 2);
            attributes.push(Attribute {
                kind: *kind,
                value: value.to_vec(),
            });
            rest = after;
        }
        Ok(Packet {
            code,
            identifier: header[1],
            authenticator,
            attributes,
        })
    }

    /// The packet's length on the wire, checked against the limits.
    pub fn wire_len(&self) -> Result<usize, PacketError> {
        let mut len = HEADER_LEN;
        for a in &self.attributes {
            if a.value.len() > MAX_VALUE_LEN {
                return Err(PacketError::ValueTooLong {
                    kind: a.kind,
                    len: a.value.len(),
                });
            }
            len += 2 + a.value.len();
        }
        if len > MAX_PACKET_LEN {
            return Err(PacketError::TooLong(len));
        }
        Ok(len)
    }

    /// Writes the packet as it stands (see [`auth`](super::auth) to sign it first).
    pub fn encode(&self) -> Result<Vec<u8>, PacketError> {
        let len = self.wire_len()?;
        let mut out = Vec::with_capacity(len);
        out.push(u8::from(self.code));
        out.push(self.identifier);
        // `wire_len` checked len <= 4096.
        out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&self.authenticator);
        for a in &self.attributes {
            out.push(a.kind);
            // `wire_len` checked every value <= 253.
            out.push(u8::try_from(a.value.len() + 2).unwrap_or(u8::MAX));
            out.extend_from_slice(&a.value);
        }
        Ok(out)
    }

    /// Appends an attribute.
    pub fn add(&mut self, kind: u8, value: impl Into<Vec<u8>>) -> Result<(), PacketError> {
        let value = value.into();
        if value.len() > MAX_VALUE_LEN {
            return Err(PacketError::ValueTooLong {
                kind,
                len: value.len(),
            });
        }
        self.attributes.push(Attribute { kind, value });
        Ok(())
    }

    /// Appends a 32-bit integer attribute.
    pub fn add_u32(&mut self, kind: u8, value: u32) {
        self.attributes.push(Attribute {
            kind,
            value: value.to_be_bytes().to_vec(),
        });
    }

    /// Appends an IPv4 address attribute.
    pub fn add_ipv4(&mut self, kind: u8, value: Ipv4Addr) {
        self.attributes.push(Attribute {
            kind,
            value: value.octets().to_vec(),
        });
    }

    /// Appends a Vendor-Specific attribute holding one vendor sub-attribute.
    pub fn add_vendor(
        &mut self,
        vendor_id: u32,
        vendor_type: u8,
        value: &[u8],
    ) -> Result<(), AttrError> {
        let vsa = attr::build_vsa(vendor_id, &[(vendor_type, value)])?;
        self.attributes.push(Attribute {
            kind: attr::VENDOR_SPECIFIC,
            value: vsa,
        });
        Ok(())
    }

    /// The value of the first attribute of a type.
    pub fn get(&self, kind: u8) -> Option<&[u8]> {
        self.get_all(kind).next()
    }

    /// The values of every attribute of a type, in order.
    pub fn get_all(&self, kind: u8) -> impl Iterator<Item = &[u8]> {
        self.attributes
            .iter()
            .filter(move |a| a.kind == kind)
            .map(|a| a.value.as_slice())
    }

    /// The first attribute of a type as UTF-8 text.
    pub fn get_str(&self, kind: u8) -> Result<Option<&str>, AttrError> {
        self.get(kind)
            .map(|v| std::str::from_utf8(v).map_err(|_| AttrError::NotUtf8 { kind }))
            .transpose()
    }

    /// The first attribute of a type as a 32-bit integer.
    pub fn get_u32(&self, kind: u8) -> Result<Option<u32>, AttrError> {
        self.get(kind)
            .map(|v| fixed::<4>(kind, v).map(u32::from_be_bytes))
            .transpose()
    }

    /// The first attribute of a type as an IPv4 address.
    pub fn get_ipv4(&self, kind: u8) -> Result<Option<Ipv4Addr>, AttrError> {
        self.get(kind)
            .map(|v| fixed::<4>(kind, v).map(Ipv4Addr::from))
            .transpose()
    }

    /// Every vendor sub-attribute of every well-formed Vendor-Specific attribute, in order.
    /// A malformed Vendor-Specific attribute is skipped (see [`attr::parse_vsa`] to see it).
    pub fn vendor_attrs(&self) -> impl Iterator<Item = VendorAttr<'_>> {
        self.get_all(attr::VENDOR_SPECIFIC)
            .filter_map(|v| attr::parse_vsa(v).ok())
            .flatten()
    }

    /// The values of one vendor attribute, in order.
    pub fn vendor_values(&self, vendor_id: u32, vendor_type: u8) -> impl Iterator<Item = &[u8]> {
        self.vendor_attrs()
            .filter(move |v| v.vendor_id == vendor_id && v.vendor_type == vendor_type)
            .map(|v| v.value)
    }

    /// The first value of one vendor attribute as UTF-8 text (`None` also when not UTF-8).
    pub fn vendor_str(&self, vendor_id: u32, vendor_type: u8) -> Option<&str> {
        self.vendor_values(vendor_id, vendor_type)
            .find_map(|v| std::str::from_utf8(v).ok())
    }

    /// Every Cisco-AVPair (vendor 9, type 1) that is UTF-8 text, in order.
    pub fn cisco_avpairs(&self) -> impl Iterator<Item = &str> {
        self.vendor_values(attr::cisco::VENDOR_ID, attr::cisco::AVPAIR)
            .filter_map(|v| std::str::from_utf8(v).ok())
    }

    /// The value after `name=` of the first Cisco-AVPair that starts so: `"mdm-tlv=device-uid"`
    /// finds `ABC123` in `mdm-tlv=device-uid=ABC123`.
    pub fn cisco_avpair(&self, name: &str) -> Option<&str> {
        self.cisco_avpairs().find_map(|pair| {
            pair.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
        })
    }
}

/// A fixed-size value, or the error naming its size.
fn fixed<const N: usize>(kind: u8, v: &[u8]) -> Result<[u8; N], AttrError> {
    <[u8; N]>::try_from(v).map_err(|_| AttrError::WrongSize {
        kind,
        expected: N,
        got: v.len(),
    })
}

#[cfg(test)]
#[path = "packet_tests.rs"]
mod tests;
