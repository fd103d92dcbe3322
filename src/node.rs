//! This node's identity: the `--node-id` given, or one generated once and kept in the data
//! directory (`node-id`), so a restarted node keeps its name. It appears in the log, in
//! `GET /health`, in `/metrics` (`corecast_node_info`) and in every HTTP response
//! (`X-Corecast-Node`).

use std::path::Path;

/// The file under `--data-dir` that keeps a generated node id.
pub const FILE: &str = "node-id";

/// Longest node id accepted.
pub const MAX_LEN: usize = 64;

/// Whether `id` is a usable node id: 1 to 64 of `A-Z a-z 0-9 . _ -` (it goes into HTTP
/// headers, Prometheus labels and JSON unescaped).
pub fn valid(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Where the node id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `--node-id` / `CORECAST_NODE_ID`.
    Flag,
    /// Read back from the data directory.
    Kept,
    /// Generated now and written to the data directory.
    Generated,
    /// Generated now; the data directory could not keep it (the next start gets another).
    Unkept,
}

/// The node id: `given` when set, else the one kept in `data_dir`, else a new one, written
/// there. A kept file with an invalid id is an error (someone edited it): better to stop than
/// to rename the node silently.
pub fn resolve(given: Option<&str>, data_dir: &Path) -> Result<(String, Source), String> {
    if let Some(id) = given {
        return Ok((id.to_string(), Source::Flag));
    }
    let path = data_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim();
            if valid(id) {
                return Ok((id.to_string(), Source::Kept));
            }
            return Err(format!(
                "{} holds {id:?}, which is not a node id (1 to {MAX_LEN} of A-Z a-z 0-9 . _ -): fix or remove it",
                path.display()
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let id = generate();
    let written = std::fs::create_dir_all(data_dir).and_then(|()| {
        // Write then rename: a crash mid-write must not leave a half id behind.
        let tmp = data_dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, format!("{id}\n"))?;
        std::fs::rename(&tmp, &path)
    });
    Ok((id, if written.is_ok() { Source::Generated } else { Source::Unkept }))
}

/// `cc-` and 12 hex digits (48 bits) from OS randomness.
fn generate() -> String {
    format!("cc-{:012x}", crate::entropy::u64() >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_kept_and_a_flag_wins() {
        let dir = std::env::temp_dir().join(format!("cc-node-{}-{}", std::process::id(), line!()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, src) = resolve(None, &dir).unwrap();
        assert_eq!(src, Source::Generated);
        assert!(valid(&a) && a.starts_with("cc-") && a.len() == 15, "{a}");
        assert_eq!(resolve(None, &dir).unwrap(), (a.clone(), Source::Kept));
        assert_eq!(resolve(Some("edge-1"), &dir).unwrap(), ("edge-1".to_string(), Source::Flag));
        std::fs::write(dir.join(FILE), "bad id\n").unwrap();
        assert!(resolve(None, &dir).unwrap_err().contains("not a node id"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn validity() {
        assert!(valid("node-1") && valid("a.b_c") && valid(&"x".repeat(MAX_LEN)));
        assert!(!valid("") && !valid("a b") && !valid("é") && !valid("a\"b") && !valid(&"x".repeat(MAX_LEN + 1)));
    }
}
