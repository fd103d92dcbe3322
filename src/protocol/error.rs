//! Typed errors of the protocol layer, one variant per cause the caller acts on, and the one
//! place where each maps to what goes on the wire (close code or HTTP status).

use crate::protocol::ws::CloseCode;

/// Errors from the WebSocket codec. Each ends the connection with the close code from
/// [`WsError::close_code`]; the shard and other connections carry on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// The peer broke RFC 6455 (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A frame or reassembled message exceeded the limit (close 1009).
    #[error("message too big: {size} bytes exceeds the limit of {limit}")]
    TooBig { size: u64, limit: usize },
    /// A text message (or close reason) was not UTF-8 (close 1007).
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
}

impl WsError {
    /// The close code this error is answered with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::Protocol(_) => CloseCode::Protocol,
            Self::TooBig { .. } => CloseCode::TooBig,
            Self::InvalidUtf8 => CloseCode::InvalidPayload,
        }
    }
}

/// Errors while reading an HTTP/1.1 request head or body. Each is answered with
/// [`HttpError::status`] and a JSON body `{"error": "<Display>"}`, then the connection closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The head is not valid HTTP/1.x.
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
    /// The head exceeded the limit.
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// The body exceeded the limit.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(usize),
    /// A body without Content-Length (chunked uploads are not accepted).
    #[error("a request body needs a Content-Length header")]
    LengthRequired,
}

impl HttpError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::Malformed(_) => 400,
            Self::HeadTooLarge(_) => 431,
            Self::BodyTooLarge(_) => 413,
            Self::LengthRequired => 411,
        }
    }
}

/// Why a WebSocket upgrade request was refused (answered 400 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("WebSocket upgrade needs the GET method")]
    NotGet,
    #[error("missing or wrong `Upgrade: websocket` header")]
    NoUpgradeHeader,
    #[error("missing `Connection: upgrade` header")]
    NoConnectionUpgrade,
    #[error("unsupported Sec-WebSocket-Version (only 13 is supported)")]
    BadVersion,
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
    #[error("unsupported vsn `{0}` (use 1.0.0 or 2.0.0)")]
    BadVsn(String),
    #[error("malformed auth token subprotocol (`base64url.bearer.phx.` + an unpadded base64url token)")]
    BadAuthToken,
}
