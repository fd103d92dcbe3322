//! Minimal JSON writing for the hot path: string escaping and a few framing helpers.
//!
//! Outgoing messages are assembled from pieces that are already valid JSON (payloads kept as
//! raw text after validation) plus strings that must be escaped (topics, events). Writing the
//! bytes directly avoids building a `serde_json::Value` per message.

/// Appends `s` as a JSON string literal (with quotes) to `out`.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends an unsigned integer in decimal.
pub fn write_u64(out: &mut Vec<u8>, v: u64) {
    let mut buf = itoa_buf(v);
    out.extend_from_slice(buf.as_slice());
    buf.clear();
}

fn itoa_buf(mut v: u64) -> Digits {
    let mut d = Digits { buf: [0; 20], start: 20 };
    if v == 0 {
        d.start -= 1;
        d.buf[d.start] = b'0';
        return d;
    }
    while v > 0 {
        d.start -= 1;
        d.buf[d.start] = b'0' + (v % 10) as u8;
        v /= 10;
    }
    d
}

struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..]
    }
    fn clear(&mut self) {
        self.start = 20;
    }
}

/// Writes Unix milliseconds as RFC 3339 UTC with milliseconds, `2025-11-19T00:22:40.877Z`
/// (years clamped to 0000–9999), without allocating.
pub fn write_iso8601_ms(out: &mut Vec<u8>, unix_ms: i64) {
    let days = unix_ms.div_euclid(86_400_000);
    let ms_of_day = unix_ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, ms) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    let two = |out: &mut Vec<u8>, v: i64| out.extend_from_slice(&[b'0' + (v / 10) as u8, b'0' + (v % 10) as u8]);
    let y = y.clamp(0, 9999);
    out.extend_from_slice(&[
        b'0' + (y / 1000) as u8,
        b'0' + (y / 100 % 10) as u8,
        b'0' + (y / 10 % 10) as u8,
        b'0' + (y % 10) as u8,
    ]);
    out.push(b'-');
    two(out, m as i64);
    out.push(b'-');
    two(out, d as i64);
    out.push(b'T');
    two(out, h);
    out.push(b':');
    two(out, mi);
    out.push(b':');
    two(out, s);
    out.push(b'.');
    out.extend_from_slice(&[b'0' + (ms / 100) as u8, b'0' + (ms / 10 % 10) as u8, b'0' + (ms % 10) as u8]);
    out.push(b'Z');
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm; inverse of
/// [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    debug_assert_eq!(days_from_civil(if m <= 2 { y + 1 } else { y }, m, d), z - 719_468);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Returns `s` as a JSON string literal.
pub fn quote(s: &str) -> String {
    let mut v = Vec::with_capacity(s.len() + 2);
    write_str(&mut v, s);
    // Escaping valid UTF-8 with ASCII escapes keeps it valid UTF-8.
    String::from_utf8(v).expect("escaped UTF-8 stays UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_serde() {
        for s in ["plain", "q\"uote", "back\\slash", "nl\n\t\r", "\u{1}\u{1f}", "ünï ☃", ""] {
            assert_eq!(quote(s), serde_json::to_string(s).unwrap());
        }
    }

    #[test]
    fn formats_timestamps() {
        let iso = |ms: i64| {
            let mut out = Vec::new();
            write_iso8601_ms(&mut out, ms);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(iso(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso(1_763_511_760_877), "2025-11-19T00:22:40.877Z");
        assert_eq!(iso(951_782_400_000), "2000-02-29T00:00:00.000Z");
        for days in [-719_468i64, -1, 0, 59, 60, 365, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn writes_numbers() {
        for v in [0u64, 7, 10, 12345, u64::MAX] {
            let mut out = Vec::new();
            write_u64(&mut out, v);
            assert_eq!(out, v.to_string().into_bytes());
        }
    }
}
