//! Server-Sent Events encoding (filled in with the SSE transport).
