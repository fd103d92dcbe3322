//! Token verification (HS256 JWTs, `jsonwebtoken` crate) and the rule that decides private
//! channel joins when no database decides it.
//!
//! Pure CPU work: the current time is a parameter, so the session that calls this stays
//! sans-IO. With no secret configured corecast is in development mode: any apikey is accepted
//! and its claims are read without verification when it looks like a JWT.

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// The claims of a verified token, as RLS checks and authorization rules need them.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// The `role` claim (`anon` when absent in development mode).
    pub role: String,
    /// Expiry (Unix seconds), if the token has one.
    pub exp: Option<u64>,
    /// The `sub` claim, if any (shared: every message the connection publishes records it).
    pub sub: Option<Arc<str>>,
    /// Every claim, for `request.jwt.claims` in RLS checks.
    pub all: Map<String, Value>,
    /// The raw token (compared on `access_token` refresh to skip unchanged tokens).
    pub token: Arc<str>,
}

impl Claims {
    /// Claims of an unauthenticated development-mode connection (one shared value).
    pub fn anonymous() -> Arc<Self> {
        static ANON: std::sync::OnceLock<Arc<Claims>> = std::sync::OnceLock::new();
        ANON.get_or_init(|| {
            Arc::new(Self { role: "anon".into(), exp: None, sub: None, all: Map::new(), token: Arc::from("") })
        })
        .clone()
    }

    /// Whether these claims allow joining the private topic `name` without a database.
    ///
    /// The rule (documented in the README): `service_role` may join every private topic;
    /// otherwise the token needs a `topics` claim, an array of patterns where `*` matches any
    /// run of characters (`"room-*"`, `"*"`, `"chat:42"`).
    pub fn allows_private(&self, name: &str) -> bool {
        if self.role == "service_role" {
            return true;
        }
        match self.all.get("topics") {
            Some(Value::Array(pats)) => pats.iter().filter_map(Value::as_str).any(|p| glob(p, name)),
            _ => false,
        }
    }
}

/// `*` matches any (possibly empty) run of characters; everything else is literal.
pub fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Why a token was refused. The `Display` text is what Supabase Realtime answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("API key is missing")]
    Missing,
    #[error("Token has expired")]
    Expired,
    #[error("Field `role` is required in JWT")]
    MissingRole,
    #[error("The token provided is not a valid JWT")]
    Malformed,
    #[error("Failed to validate JWT signature")]
    BadSignature,
}

impl AuthError {
    /// The join-error code prefix realtime clients see (`<Code>: <message>`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Expired => "InvalidJWTExpiration",
            Self::BadSignature => "JwtSignatureError",
            Self::Malformed => "MalformedJWT",
            Self::Missing | Self::MissingRole => "InvalidJWTToken",
        }
    }
}

/// Verifies tokens against the configured secret (or accepts everything in development mode).
#[derive(Clone)]
pub struct Verifier {
    key: Option<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("development_mode", &self.key.is_none()).finish()
    }
}

impl Verifier {
    /// A verifier for HS256 tokens signed with `secret`, or development mode for `None`.
    pub fn new(secret: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked by `verify` against the caller's clock; audiences are not used.
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        Self { key: secret.map(|s| DecodingKey::from_secret(s.as_bytes())), validation }
    }

    /// Whether tokens are accepted without verification.
    pub fn development_mode(&self) -> bool {
        self.key.is_none()
    }

    /// Verifies `token` at Unix time `now` (seconds).
    pub fn verify(&self, token: Option<&str>, now: u64) -> Result<Arc<Claims>, AuthError> {
        let token = token.map(str::trim).filter(|t| !t.is_empty());
        let Some(key) = &self.key else {
            return Ok(token.and_then(|t| unverified(t, now)).unwrap_or_else(Claims::anonymous));
        };
        let token = token.ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Malformed,
            }
        })?;
        let claims = from_map(data.claims, token);
        if claims.exp.is_some_and(|exp| exp <= now) {
            return Err(AuthError::Expired);
        }
        if claims.role.is_empty() {
            return Err(AuthError::MissingRole);
        }
        Ok(Arc::new(claims))
    }
}

fn from_map(all: Map<String, Value>, token: &str) -> Claims {
    let role = all.get("role").and_then(Value::as_str).unwrap_or("").to_string();
    let exp = all.get("exp").and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)));
    let sub = all.get("sub").and_then(Value::as_str).map(Arc::from);
    Claims { role, exp, sub, all, token: Arc::from(token) }
}

/// Development mode: read a JWT's claims without checking the signature, so roles and `sub`
/// still flow to authorization. Expired tokens are refused even here.
fn unverified(token: &str, now: u64) -> Option<Arc<Claims>> {
    let payload = token.split('.').nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let Value::Object(map) = serde_json::from_slice(&raw).ok()? else {
        return None;
    };
    let mut c = from_map(map, token);
    if c.exp.is_some_and(|exp| exp <= now) {
        return None;
    }
    if c.role.is_empty() {
        c.role = "anon".into();
    }
    Some(Arc::new(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn token(secret: &str, claims: Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn verifies_signature_role_and_expiry() {
        let v = Verifier::new(Some("s3cret"));
        let now = 1_000_000;
        let ok = token("s3cret", json!({"role":"authenticated","exp":now + 60,"sub":"u1","aud":"authenticated"}));
        let c = v.verify(Some(&ok), now).unwrap();
        assert_eq!((c.role.as_str(), c.sub.as_deref(), c.exp), ("authenticated", Some("u1"), Some(now + 60)));
        assert_eq!(v.verify(Some(&ok), now + 60).unwrap_err(), AuthError::Expired);
        let wrong = token("other", json!({"role":"anon"}));
        assert_eq!(v.verify(Some(&wrong), now).unwrap_err(), AuthError::BadSignature);
        let norole = token("s3cret", json!({"sub":"x"}));
        assert_eq!(v.verify(Some(&norole), now).unwrap_err(), AuthError::MissingRole);
        assert_eq!(v.verify(Some("garbage"), now).unwrap_err(), AuthError::Malformed);
        assert_eq!(v.verify(None, now).unwrap_err(), AuthError::Missing);
    }

    #[test]
    fn development_mode_accepts_anything() {
        let v = Verifier::new(None);
        assert_eq!(v.verify(Some("anon-key"), 0).unwrap().role, "anon");
        let t = token("whatever", json!({"role":"authenticated","sub":"u9"}));
        assert_eq!(v.verify(Some(&t), 0).unwrap().sub.as_deref(), Some("u9"));
    }

    #[test]
    fn private_topic_rule() {
        let c = |v: Value| from_map(v.as_object().unwrap().clone(), "");
        assert!(c(json!({"role":"service_role"})).allows_private("anything"));
        let u = c(json!({"role":"authenticated","topics":["room-*","chat:42"]}));
        assert!(u.allows_private("room-1") && u.allows_private("chat:42"));
        assert!(!u.allows_private("chat:43") && !u.allows_private("xroom-1"));
        assert!(!c(json!({"role":"authenticated"})).allows_private("room-1"));
    }

    #[test]
    fn globbing() {
        assert!(glob("*", "") && glob("a*c", "abc") && glob("a*b*c", "a-b-c") && glob("*x", "yx"));
        assert!(!glob("a*c", "ab") && !glob("a*b*c", "acb") && !glob("abc", "abcd"));
    }
}
