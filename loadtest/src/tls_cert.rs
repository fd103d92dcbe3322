//! The certificate `--tls` runs use: a fresh self-signed ECDSA P-256 certificate for
//! 127.0.0.1/localhost, made with the `openssl` command into a directory of the run; the
//! server is given the certificate and key, the workers trust exactly that certificate.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Makes `dir/cert.pem` and `dir/key.pem`; returns their paths.
pub fn make(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // An end-entity certificate (openssl marks self-signed ones CA:TRUE, which webpki
        // refuses as a server's certificate); trusted directly, as its own anchor.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .map_err(|e| format!("openssl (needed for --tls): {e}"))?;
    if !out.status.success() {
        return Err(format!("openssl req failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok((cert, key))
}
