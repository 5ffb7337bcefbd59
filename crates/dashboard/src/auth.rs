//! Who may use the dashboard, and proof that a POST comes from its own page.
//!
//! - With a token configured, every page and action needs either the header
//!   `Authorization: Bearer TOKEN` or the session cookie that signing in
//!   with the token sets (`/login`). The cookie is `EXPIRY.MAC`: an expiry
//!   (Unix seconds) and HMAC-SHA256 over it with a key derived from the
//!   token, so every dashboard process with the same token accepts it and
//!   changing the token signs everyone out. It is `HttpOnly`,
//!   `SameSite=Strict` and expires after [`SESSION_SECONDS`].
//! - Every POST (sign-in included) carries a CSRF token: a random nonce
//!   lives in a cookie, and each form carries HMAC(nonce). A page of another
//!   site can neither read the cookie nor compute the MAC, so it cannot
//!   forge the field.
//!
//! Comparisons of secrets are constant-time (`Mac::verify_slice`).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// How long a session lasts.
pub const SESSION_SECONDS: i64 = 12 * 60 * 60;
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "hephaestus_session";
/// The CSRF nonce cookie's name.
pub const CSRF_COOKIE: &str = "hephaestus_csrf";
/// The CSRF form field's name.
pub const CSRF_FIELD: &str = "csrf";

/// The keys of one dashboard.
pub(crate) struct Keys {
    /// The token's SHA-256 (the token itself is not kept).
    token_digest: Option<[u8; 32]>,
    session_key: [u8; 32],
    csrf_key: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("token", &self.token_digest.map(|_| "(set)"))
            .finish_non_exhaustive()
    }
}

fn derive(secret: &[u8], purpose: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"hephaestus-dashboard\0");
    hasher.update(purpose.as_bytes());
    hasher.update(b"\0");
    hasher.update(secret);
    hasher.finalize().into()
}

fn mac(key: &[u8; 32]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail.
    HmacSha256::new_from_slice(key).expect("HMAC accepts any key length")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// A fresh random nonce (two v4 UUIDs: 244 random bits from the OS).
pub(crate) fn nonce() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Keys {
    /// Keys for `token` (none: nothing to sign in with; CSRF keys are then
    /// random for this process).
    pub(crate) fn new(token: Option<&str>) -> Self {
        if let Some(token) = token {
            Self {
                token_digest: Some(Sha256::digest(token.as_bytes()).into()),
                session_key: derive(token.as_bytes(), "session"),
                csrf_key: derive(token.as_bytes(), "csrf"),
            }
        } else {
            let random = nonce();
            Self {
                token_digest: None,
                session_key: derive(random.as_bytes(), "session"),
                csrf_key: derive(random.as_bytes(), "csrf"),
            }
        }
    }

    /// Whether a token protects this dashboard.
    pub(crate) fn has_token(&self) -> bool {
        self.token_digest.is_some()
    }

    /// Whether `given` is the token (constant time).
    pub(crate) fn token_matches(&self, given: &str) -> bool {
        let Some(expected) = &self.token_digest else {
            return false;
        };
        // Compare MACs of the digests: constant time, whatever the lengths.
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let mut m = mac(&self.session_key);
        m.update(&given);
        let mut e = mac(&self.session_key);
        e.update(expected);
        m.verify_slice(&e.finalize().into_bytes()).is_ok()
    }

    /// The session cookie's value for a session ending at `expiry`.
    pub(crate) fn session(&self, expiry: i64) -> String {
        let mut m = mac(&self.session_key);
        m.update(b"session:");
        m.update(expiry.to_string().as_bytes());
        format!("{expiry}.{}", hex(&m.finalize().into_bytes()))
    }

    /// Whether `cookie` is a session this dashboard signed that has not
    /// expired at `now`.
    pub(crate) fn session_valid(&self, cookie: &str, now: i64) -> bool {
        if !self.has_token() {
            return false;
        }
        let Some((expiry, signature)) = cookie.split_once('.') else {
            return false;
        };
        let Ok(at) = expiry.parse::<i64>() else {
            return false;
        };
        let Some(signature) = unhex(signature) else {
            return false;
        };
        let mut m = mac(&self.session_key);
        m.update(b"session:");
        m.update(expiry.as_bytes());
        m.verify_slice(&signature).is_ok() && at > now
    }

    /// The CSRF field value for the nonce cookie `nonce`.
    pub(crate) fn csrf(&self, nonce: &str) -> String {
        let mut m = mac(&self.csrf_key);
        m.update(nonce.as_bytes());
        hex(&m.finalize().into_bytes())
    }

    /// Whether `field` is the CSRF token of `nonce` (constant time).
    pub(crate) fn csrf_valid(&self, nonce: &str, field: &str) -> bool {
        let Some(field) = unhex(field) else {
            return false;
        };
        let mut m = mac(&self.csrf_key);
        m.update(nonce.as_bytes());
        m.verify_slice(&field).is_ok()
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub(crate) fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_matches_only_itself() {
        let keys = Keys::new(Some("a-long-enough-token"));
        assert!(keys.token_matches("a-long-enough-token"));
        assert!(!keys.token_matches("a-long-enough-tokeN"));
        assert!(!keys.token_matches(""));
        assert!(!Keys::new(None).token_matches(""));
    }

    #[test]
    fn a_session_is_valid_until_it_expires_and_only_with_its_signature() {
        let keys = Keys::new(Some("a-long-enough-token"));
        let cookie = keys.session(1_000);
        assert!(keys.session_valid(&cookie, 999));
        assert!(!keys.session_valid(&cookie, 1_000));
        let forged = cookie.replacen("1000", "9000", 1);
        assert!(!keys.session_valid(&forged, 999));
        let other = Keys::new(Some("another-long-token"));
        assert!(!other.session_valid(&cookie, 999));
        assert!(!keys.session_valid("garbage", 0));
        assert!(!keys.session_valid("1000.zz", 0));
    }

    #[test]
    fn a_csrf_token_belongs_to_its_nonce() {
        let keys = Keys::new(None);
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        let token = keys.csrf(&a);
        assert!(keys.csrf_valid(&a, &token));
        assert!(!keys.csrf_valid(&b, &token));
        assert!(!keys.csrf_valid(&a, ""));
        assert!(!keys.csrf_valid(&a, "not hex"));
    }

    #[test]
    fn cookies_are_found_by_name() {
        let header = "a=1; hephaestus_csrf=abc; b=2";
        assert_eq!(cookie(header, CSRF_COOKIE), Some("abc"));
        assert_eq!(cookie(header, "c"), None);
    }
}
