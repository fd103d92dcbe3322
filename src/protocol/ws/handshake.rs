//! The RFC 6455 opening handshake: validate the upgrade request, compute
//! `Sec-WebSocket-Accept`, negotiate the subprotocol, and write the `101 Switching Protocols`
//! response.
//!
//! Subprotocols: Phoenix 1.8 clients with an `authToken` offer
//! `Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.<token>`; the server selects `phoenix`
//! (a client that offered protocols refuses a response that selects none) and the token is read
//! with [`auth_token`]. No other subprotocol is selected.

use base64::Engine;

use crate::protocol::error::HandshakeError;
use crate::protocol::http::Request;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &str) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.digest().bytes())
}

/// Validates an upgrade request; on success returns the complete `101` response.
pub fn accept(req: &Request<'_>) -> Result<Vec<u8>, HandshakeError> {
    if req.method != "GET" {
        return Err(HandshakeError::NotGet);
    }
    let upgrade = req.header("upgrade").unwrap_or("");
    if !upgrade.split(',').any(|t| t.trim().eq_ignore_ascii_case("websocket")) {
        return Err(HandshakeError::NoUpgradeHeader);
    }
    let conn = req.header("connection").unwrap_or("");
    if !conn.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")) {
        return Err(HandshakeError::NoConnectionUpgrade);
    }
    if req.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(HandshakeError::BadVersion);
    }
    let key = req.header("sec-websocket-key").map(str::trim).ok_or(HandshakeError::BadKey)?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    let mut resp = Vec::with_capacity(192);
    resp.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    resp.extend_from_slice(accept_key(key).as_bytes());
    if offered(req).any(|p| p == PHOENIX) {
        resp.extend_from_slice(b"\r\nSec-WebSocket-Protocol: phoenix");
    }
    resp.extend_from_slice(b"\r\n");
    resp.extend_from_slice(crate::protocol::http::node_header());
    resp.extend_from_slice(b"\r\n");
    Ok(resp)
}

/// The subprotocol Phoenix clients offer (and the only one selected).
const PHOENIX: &str = "phoenix";
/// Prefix of the subprotocol that carries a Phoenix 1.8 `authToken`.
const AUTH_TOKEN_PREFIX: &str = "base64url.bearer.phx.";

/// The subprotocols a request offers, in order.
fn offered<'a>(req: &'a Request<'a>) -> impl Iterator<Item = &'a str> {
    req.headers_named("sec-websocket-protocol").flat_map(|v| v.split(',')).map(str::trim).filter(|p| !p.is_empty())
}

/// The token a Phoenix 1.8 client sent as its `authToken` (the subprotocol
/// `base64url.bearer.phx.<base64url(token)>`, unpadded; the standard alphabet is accepted too),
/// if it sent one.
pub fn auth_token(req: &Request<'_>) -> Result<Option<String>, HandshakeError> {
    let Some(enc) = offered(req).find_map(|p| p.strip_prefix(AUTH_TOKEN_PREFIX)) else {
        return Ok(None);
    };
    let enc = enc.trim_end_matches('=');
    let raw = if enc.contains(['+', '/']) {
        base64::engine::general_purpose::STANDARD_NO_PAD.decode(enc)
    } else {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(enc)
    };
    let token = raw.ok().and_then(|b| String::from_utf8(b).ok()).ok_or(HandshakeError::BadAuthToken)?;
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_example_key() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ==")
        );
    }

    fn req(raw: &str) -> Result<Vec<u8>, HandshakeError> {
        let (r, _) = crate::protocol::http::parse_request(raw.as_bytes(), 8192).unwrap().unwrap();
        accept(&r)
    }

    #[test]
    fn validates_headers() {
        let ok = "GET /socket/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let resp = String::from_utf8(req(ok).unwrap()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 101"));
        assert!(resp.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert_eq!(req(&ok.replace("Upgrade: websocket", "Upgrade: h2c")), Err(HandshakeError::NoUpgradeHeader));
        assert_eq!(req(&ok.replace("Version: 13", "Version: 8")), Err(HandshakeError::BadVersion));
        assert_eq!(req(&ok.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")), Err(HandshakeError::BadKey));
        assert_eq!(req(&ok.replace("keep-alive, Upgrade", "close")), Err(HandshakeError::NoConnectionUpgrade));
        assert_eq!(req(&ok.replace("GET", "POST")), Err(HandshakeError::NotGet));
        assert!(!resp.contains("Sec-WebSocket-Protocol"), "nothing offered, nothing selected");
    }

    #[test]
    fn phoenix_subprotocol_and_auth_token() {
        let head = |protocols: &str| {
            format!("GET /socket/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n")
        };
        let token = |raw: &str| {
            let (r, _) = crate::protocol::http::parse_request(raw.as_bytes(), 8192).unwrap().unwrap();
            auth_token(&r)
        };
        // What phoenix.js 1.8 sends for `authToken: "a.b-c"`: btoa() with the padding removed.
        let h = head("phoenix, base64url.bearer.phx.YS5iLWM");
        let resp = String::from_utf8(req(&h).unwrap()).unwrap();
        assert!(resp.contains("\r\nSec-WebSocket-Protocol: phoenix\r\n"), "{resp}");
        assert_eq!(token(&h), Ok(Some("a.b-c".into())));
        // Bytes outside base64url's alphabet in standard base64 ("?>?" → "Pz4/").
        assert_eq!(token(&head("phoenix, base64url.bearer.phx.Pz4/")), Ok(Some("?>?".into())));
        assert_eq!(token(&head("phoenix")), Ok(None));
        assert_eq!(token(&head("phoenix, base64url.bearer.phx.%%%")), Err(HandshakeError::BadAuthToken));
        let other = String::from_utf8(req(&head("mqtt")).unwrap()).unwrap();
        assert!(!other.contains("Sec-WebSocket-Protocol"), "only phoenix is ever selected");
    }
}
