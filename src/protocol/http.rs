//! HTTP/1.1 request heads (parsed with `httparse`), query strings, and responses.
//!
//! Only what corecast serves is here: WebSocket upgrades, SSE streams, small REST requests with
//! a `Content-Length` body, and plain responses. Every request gets open CORS headers, as
//! Supabase's REST API does, so browsers can call `httpSend` and the history endpoint.

use std::borrow::Cow;

use crate::protocol::error::HttpError;

/// The most headers one request may carry.
const MAX_HEADERS: usize = 48;

/// A parsed request head. Header names are matched case-insensitively.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path without the query string, still percent-encoded.
    pub path: &'a str,
    /// The raw query string (after `?`), empty if none.
    pub query: &'a str,
    /// HTTP minor version: 0 or 1.
    pub version: u8,
    headers: Vec<(&'a str, &'a str)>,
}

impl<'a> Request<'a> {
    /// Every header named `name` (case-insensitive) whose value is UTF-8, in order.
    pub fn headers_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a str> + 's {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }

    /// The first header named `name` (case-insensitive) whose value is UTF-8.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }

    /// The first query parameter named `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<Cow<'a, str>> {
        query_pairs(self.query).find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// All values of query parameter `name`, percent-decoded, in order.
    pub fn query_params(&self, name: &'a str) -> impl Iterator<Item = Cow<'a, str>> + 'a {
        query_pairs(self.query).filter(move |(k, _)| k == name).map(|(_, v)| v)
    }

    /// How the body is framed: a length (0 when there is none) or chunked.
    pub fn body(&self) -> Result<Body, HttpError> {
        if let Some(te) = self.header("transfer-encoding") {
            let te = te.trim();
            if te.eq_ignore_ascii_case("chunked") {
                return Ok(Body::Chunked);
            }
            if !te.eq_ignore_ascii_case("identity") {
                return Err(HttpError::Malformed("unsupported Transfer-Encoding (only chunked)"));
            }
        }
        match self.header("content-length") {
            None => Ok(Body::Length(0)),
            Some(v) => v.trim().parse().map(Body::Length).map_err(|_| HttpError::Malformed("bad Content-Length")),
        }
    }

    /// Whether the client waits for `100 Continue` before sending the body (`Expect:
    /// 100-continue`; ignored in HTTP/1.0, as RFC 9110 §10.1.1 requires). curl sends it for
    /// bodies over 1 MiB and waits a second for the answer.
    pub fn expects_continue(&self) -> bool {
        self.version == 1 && self.header("expect").is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
    }

    /// Whether the client asked to keep the connection open after this request.
    pub fn keep_alive(&self) -> bool {
        match self.header("connection") {
            Some(v) if v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) => false,
            Some(v) if v.split(',').any(|t| t.trim().eq_ignore_ascii_case("keep-alive")) => true,
            _ => self.version == 1,
        }
    }
}

/// The interim response to [`Request::expects_continue`].
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How a request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    Length(usize),
    Chunked,
}

/// Decodes a chunked body from the front of `buf` (RFC 9112 §7.1; extensions and trailers are
/// skipped). `Ok(None)`: incomplete. `Ok(Some((body, consumed)))` when the last chunk and the
/// trailer section are in. A body over `max` is an error.
pub fn decode_chunked(buf: &[u8], max: usize) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = find_crlf(&buf[pos..]) else {
            return if buf.len() - pos > 1024 {
                Err(HttpError::Malformed("chunk size line too long"))
            } else {
                Ok(None)
            };
        };
        let line = std::str::from_utf8(&buf[pos..pos + eol]).map_err(|_| HttpError::Malformed("bad chunk size"))?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| HttpError::Malformed("bad chunk size"))?;
        pos += eol + 2;
        if size == 0 {
            // Trailer section: header lines until an empty line.
            loop {
                let Some(eol) = find_crlf(&buf[pos..]) else { return Ok(None) };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if body.len() + size > max {
            return Err(HttpError::BodyTooLarge(max));
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(HttpError::Malformed("chunk not followed by CRLF"));
        }
        pos += size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Parses a request head from the front of `buf`.
///
/// `Ok(None)` means the head is incomplete (nothing consumed); `Ok(Some((req, n)))` gives the
/// request and the head length, after which the body (if any) starts.
pub fn parse_request(buf: &[u8], max_head: usize) -> Result<Option<(Request<'_>, usize)>, HttpError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge(max_head)),
        Err(_) => return Err(HttpError::Malformed("invalid request head")),
    };
    let n = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            if buf.len() > max_head {
                return Err(HttpError::HeadTooLarge(max_head));
            }
            return Ok(None);
        }
    };
    if n > max_head {
        return Err(HttpError::HeadTooLarge(max_head));
    }
    let method = req.method.ok_or(HttpError::Malformed("no method"))?;
    let target = req.path.ok_or(HttpError::Malformed("no target"))?;
    let version = req.version.ok_or(HttpError::Malformed("no version"))?;
    let (path, query) = match target.find('?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, ""),
    };
    let headers = req.headers.iter().filter_map(|h| std::str::from_utf8(h.value).ok().map(|v| (h.name, v))).collect();
    Ok(Some((Request { method, path, query, version, headers }, n)))
}

/// Iterates `k=v` pairs of a query string, percent-decoding both (`+` is a space).
pub fn query_pairs(q: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    q.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (percent_decode(k), percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+`. Invalid escapes are kept as they are; invalid UTF-8 after
/// decoding is replaced (U+FFFD), so the result is always a string.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Reason phrase for the statuses corecast sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

const CORS: &str = "Access-Control-Allow-Origin: *\r\nAccess-Control-Allow-Headers: authorization, apikey, x-api-key, content-type, x-client-info, last-event-id\r\nAccess-Control-Allow-Methods: GET, POST, OPTIONS\r\nAccess-Control-Expose-Headers: content-type, x-corecast-node\r\n";

/// A complete response with a body.
pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    head(&mut out, status, keep_alive);
    if !body.is_empty() || status != 204 {
        out.extend_from_slice(b"Content-Type: ");
        out.extend_from_slice(content_type.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
    out
}

/// A JSON error response: `{"error": message}`.
pub fn json_error(status: u16, message: &str, keep_alive: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(message.len() + 16);
    body.extend_from_slice(b"{\"error\":");
    crate::protocol::json::write_str(&mut body, message);
    body.push(b'}');
    response(status, "application/json", &body, keep_alive)
}

/// `X-Corecast-Node: <id>\r\n`, set once at boot ([`set_node_id`]); empty until then.
static NODE_HEADER: std::sync::OnceLock<Box<str>> = std::sync::OnceLock::new();

/// Names this process's node in every response head from now on (`X-Corecast-Node`). The
/// first call wins: a process is one node. `id` must be a valid node id (no CR/LF).
pub fn set_node_id(id: &str) {
    debug_assert!(!id.contains(['\r', '\n']));
    let _ = NODE_HEADER.set(format!("X-Corecast-Node: {id}\r\n").into_boxed_str());
}

/// The `X-Corecast-Node` header line, or nothing before [`set_node_id`].
pub fn node_header() -> &'static [u8] {
    NODE_HEADER.get().map_or(&[][..], |h| h.as_bytes())
}

/// Status line, date-less standard headers and CORS; the caller adds the rest and the blank line.
pub fn head(out: &mut Vec<u8>, status: u16, keep_alive: bool) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\nServer: corecast\r\n");
    out.extend_from_slice(node_header());
    out.extend_from_slice(CORS.as_bytes());
    out.extend_from_slice(if keep_alive { b"Connection: keep-alive\r\n" } else { b"Connection: close\r\n" });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expect_100_continue_only_in_http_1_1() {
        let expects = |raw: &[u8]| parse_request(raw, 8192).unwrap().unwrap().0.expects_continue();
        assert!(expects(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"));
        assert!(expects(b"POST / HTTP/1.1\r\nexpect:  100-Continue \r\n\r\n"));
        assert!(!expects(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n"));
        assert!(!expects(b"POST / HTTP/1.1\r\nExpect: something-else\r\n\r\n"));
        assert!(!expects(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n"));
    }

    #[test]
    fn parses_head_and_query() {
        let raw = b"GET /realtime/v1/websocket?apikey=a%20b&vsn=2.0.0&topic=x&topic=y+z HTTP/1.1\r\nHost: h\r\nX-Api-Key: k\r\n\r\nrest";
        let (r, n) = parse_request(raw, 8192).unwrap().unwrap();
        assert_eq!(&raw[n..], b"rest");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/realtime/v1/websocket");
        assert_eq!(r.query_param("apikey").as_deref(), Some("a b"));
        assert_eq!(r.query_param("vsn").as_deref(), Some("2.0.0"));
        assert_eq!(r.query_params("topic").collect::<Vec<_>>(), vec!["x", "y z"]);
        assert_eq!(r.header("x-api-key"), Some("k"));
        assert!(r.keep_alive());
    }

    #[test]
    fn partial_and_limits() {
        assert!(parse_request(b"GET / HTTP/1.1\r\nHost:", 8192).unwrap().is_none());
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(100));
        assert_eq!(parse_request(big.as_bytes(), 64).unwrap_err(), HttpError::HeadTooLarge(64));
        assert!(parse_request(b"\x00\x01garbage\r\n\r\n", 8192).is_err());
    }

    #[test]
    fn body_framing_rules() {
        let (r, _) = parse_request(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n", 8192).unwrap().unwrap();
        assert_eq!(r.body(), Ok(Body::Length(12)));
        let (r, _) = parse_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 8192).unwrap().unwrap();
        assert_eq!(r.body(), Ok(Body::Chunked));
        let (r, _) = parse_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 8192).unwrap().unwrap();
        assert!(r.body().is_err());
        let (r, _) = parse_request(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 8192).unwrap().unwrap();
        assert!(r.body().is_err());
    }

    #[test]
    fn chunked_bodies() {
        let b = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let (body, used) = decode_chunked(b, 100).unwrap().unwrap();
        assert_eq!((body.as_slice(), &b[used..]), (&b"hello world"[..], &b"NEXT"[..]));
        for cut in 0..used {
            assert_eq!(decode_chunked(&b[..cut], 100).unwrap(), None, "cut {cut}");
        }
        assert_eq!(decode_chunked(b, 5).unwrap_err(), HttpError::BodyTooLarge(5));
        assert!(decode_chunked(b"zz\r\n", 100).is_err());
        assert!(decode_chunked(b"2\r\nabXX", 100).is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Cb%zz%"), "a,b%zz%");
        assert_eq!(percent_decode("%E2%98%83+x"), "☃ x");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }
}
