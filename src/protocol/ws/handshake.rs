//! The RFC 6455 opening handshake: validate the upgrade request, compute
//! `Sec-WebSocket-Accept`, and write the `101 Switching Protocols` response.

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
    let mut resp = Vec::with_capacity(160);
    resp.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    resp.extend_from_slice(accept_key(key).as_bytes());
    resp.extend_from_slice(b"\r\n\r\n");
    Ok(resp)
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
    }
}
