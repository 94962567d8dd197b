//! Reading request bodies: the common, well-formed body in one pass; anything else looked at
//! field by field, so that the 400 names the field that is wrong.

use serde_json::Value;

use crate::wire::{ConnectRequest, DisconnectRequest, Malformed};

/// The string fields of a connect request.
const CONNECT_FIELDS: [&str; 12] = [
    "vpn",
    "instance",
    "zone",
    "username",
    "common_name",
    "cert_sha256",
    "cert_serial",
    "hwaddr",
    "platform",
    "remote_addr",
    "tunnel_ip",
    "session_key",
];

/// Whether a body is a JSON object at first sight: serde would also read a JSON array into a
/// struct, so only objects take the one-pass decoding.
fn is_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// A [`Malformed`] with a formatted message.
macro_rules! malformed {
    ($($t:tt)*) => {
        Malformed(format!($($t)*))
    };
}

fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Malformed> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| malformed!("body is not valid JSON: {e}"))?;
    match value {
        Value::Object(m) => Ok(m),
        _ => Err(Malformed("body must be a JSON object".into())),
    }
}

/// Parses a connect body; errors name the field.
pub fn parse_connect(body: &[u8]) -> Result<ConnectRequest, Malformed> {
    // The common case, a well-formed body, is decoded in one pass; only a body that fails is
    // looked at again, to say which field is wrong.
    if is_object(body)
        && let Ok(req) = serde_json::from_slice::<ConnectRequest>(body)
    {
        return Ok(req);
    }
    let mut obj = json_object(body)?;
    obj.retain(|_, v| !v.is_null());
    for field in CONNECT_FIELDS {
        if let Some(v) = obj.get(field)
            && !v.is_string()
        {
            return Err(malformed!("field `{field}` must be a string"));
        }
    }
    serde_json::from_value(Value::Object(obj))
        .map_err(|e| malformed!("invalid connect request: {e}"))
}

/// Parses a disconnect body; byte counts may be numbers or digit strings.
pub fn parse_disconnect(body: &[u8]) -> Result<DisconnectRequest, Malformed> {
    // The common case (strings, numeric counts) in one pass, as for connects; anything else
    // (counts as digit strings, a wrong type) through the field-by-field path below.
    #[derive(serde::Deserialize)]
    struct Wire {
        session_id: Option<String>,
        vpn: Option<String>,
        instance: Option<String>,
        session_key: Option<String>,
        bytes_received: Option<u64>,
        bytes_sent: Option<u64>,
    }
    if is_object(body)
        && let Ok(w) = serde_json::from_slice::<Wire>(body)
    {
        let fields = [&w.session_id, &w.vpn, &w.instance, &w.session_key];
        if fields.iter().all(|f| {
            f.as_ref()
                .is_none_or(|s| s.len() <= crate::wire::MAX_FIELD_LEN)
        }) {
            let d = DisconnectRequest {
                session_id: w.session_id.unwrap_or_default(),
                vpn: w.vpn.unwrap_or_default(),
                instance: w.instance.unwrap_or_default(),
                session_key: w.session_key.unwrap_or_default(),
                bytes_received: w.bytes_received,
                bytes_sent: w.bytes_sent,
            };
            d.selector()?;
            return Ok(d);
        }
    }
    parse_disconnect_fields(body)
}

/// The field-by-field reading of a disconnect body: counts may be digit strings, and an error
/// names the field.
fn parse_disconnect_fields(body: &[u8]) -> Result<DisconnectRequest, Malformed> {
    let obj = json_object(body)?;
    let text = |k: &str| -> Result<String, Malformed> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) if s.len() <= crate::wire::MAX_FIELD_LEN => Ok(s.clone()),
            Some(Value::String(_)) => Err(malformed!("field `{k}` is too long")),
            Some(_) => Err(malformed!("field `{k}` must be a string")),
        }
    };
    let count = |k: &str| -> Result<Option<u64>, Malformed> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| malformed!("field `{k}` must be a non-negative integer")),
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| malformed!("field `{k}` must be a non-negative integer")),
            Some(_) => Err(malformed!("field `{k}` must be a non-negative integer")),
        }
    };
    let d = DisconnectRequest {
        session_id: text("session_id")?,
        vpn: text("vpn")?,
        instance: text("instance")?,
        session_key: text("session_key")?,
        bytes_received: count("bytes_received")?,
        bytes_sent: count("bytes_sent")?,
    };
    d.selector()?;
    Ok(d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_name_the_field() {
        assert!(
            parse_connect(b"{\"vpn\": 5}")
                .unwrap_err()
                .0
                .contains("`vpn`")
        );
        assert!(parse_connect(b"[1]").unwrap_err().0.contains("object"));
        assert!(parse_connect(b"{\"vpn\": \"openvpn\"").is_err());
        assert!(parse_connect(&[0xff, 0xfe]).is_err());
        let ok = parse_connect(b"{\"vpn\":\"openvpn\",\"zone\":null,\"extra\":1}").unwrap();
        assert_eq!(ok.vpn, "openvpn");
    }

    #[test]
    fn disconnect_accepts_string_counts() {
        let d =
            parse_disconnect(b"{\"session_id\":\"x\",\"bytes_received\":\"12\",\"bytes_sent\":3}")
                .unwrap();
        assert_eq!((d.bytes_received, d.bytes_sent), (Some(12), Some(3)));
        assert!(parse_disconnect(b"{\"bytes_sent\":3}").is_err());
        assert!(
            parse_disconnect(b"{\"session_id\":\"x\",\"bytes_sent\":-3}")
                .unwrap_err()
                .0
                .contains("bytes_sent")
        );
    }

    /// The one-pass reading of a disconnect gives what the field-by-field reading gives.
    #[test]
    fn disconnect_fast_path_agrees_with_the_field_by_field_path() {
        let long = "k".repeat(crate::wire::MAX_FIELD_LEN + 1);
        let bodies = [
            r#"{"vpn":"openvpn","instance":"a","session_key":"1.2.3.4:5@6","bytes_received":1,"bytes_sent":2}"#.to_string(),
            r#"{"session_id":"s-1"}"#.to_string(),
            r#"{"session_id":"s-1","bytes_sent":null,"extra":[1,2]}"#.to_string(),
            r#"{"session_id":"s-1","bytes_sent":"7"}"#.to_string(),
            r#"{"session_id":"s-1","bytes_sent":-7}"#.to_string(),
            r#"{"session_id":"s-1","bytes_sent":1.5}"#.to_string(),
            r#"{"session_id":5}"#.to_string(),
            r#"{"bytes_sent":3}"#.to_string(),
            r#"["s-1"]"#.to_string(),
            r#"{"session_id":"a","session_id":"b"}"#.to_string(),
            format!(r#"{{"session_id":"{long}"}}"#),
            format!(r#"{{"vpn":"openvpn","instance":"a","session_key":"{long}"}}"#),
            " {\"session_id\":\"s-2\"} ".to_string(),
        ];
        for b in &bodies {
            let fast = parse_disconnect(b.as_bytes());
            let fields = parse_disconnect_fields(b.as_bytes());
            assert_eq!(format!("{fast:?}"), format!("{fields:?}"), "{b}");
        }
    }
}
