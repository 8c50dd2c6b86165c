//! Local sign-in records: user name, id, display name, argon2 password hash.
//! Verified passwords are remembered (by a keyed digest, never in clear) so
//! that HTTP Basic on every request does not pay argon2 every time.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::Principal;

/// Most remembered verifications; the cache is cleared when full.
const CACHE_LIMIT: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Credential {
    pub id: String,
    pub username: String,
    pub name: String,
    pub hash: String,
}

impl Credential {
    pub fn principal(&self) -> Principal {
        Principal {
            id: self.id.clone(),
            name: self.name.clone(),
            roles: Vec::new(),
        }
    }
}

pub(crate) fn hash_password(password: &str) -> Result<String, String> {
    let salt_bytes: [u8; 16] = rand::rng().random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A password of 20 random letters and digits.
pub(crate) fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Remembers successful verifications, keyed by a digest of the user name,
/// the password and the stored hash (so a changed password misses).
#[derive(Debug, Default)]
pub(crate) struct VerifiedCache {
    key: [u8; 32],
    map: Mutex<HashMap<[u8; 32], ()>>,
}

impl VerifiedCache {
    pub fn new() -> Self {
        VerifiedCache {
            key: rand::rng().random(),
            map: Mutex::default(),
        }
    }

    fn digest(&self, cred: &Credential, password: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        for part in [cred.username.as_bytes(), password.as_bytes(), cred.hash.as_bytes()] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        *h.finalize().as_bytes()
    }

    /// True when `password` is right for `cred`; argon2 only on a miss.
    pub fn verify(&self, cred: &Credential, password: &str) -> bool {
        let d = self.digest(cred, password);
        if self.map.lock().map(|m| m.contains_key(&d)).unwrap_or(false) {
            return true;
        }
        if !verify_password(password, &cred.hash) {
            return false;
        }
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= CACHE_LIMIT {
                m.clear();
            }
            m.insert(d, ());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_right_and_wrong() {
        let cred = Credential {
            id: "0".repeat(24),
            username: "admin".into(),
            name: "admin".into(),
            hash: hash_password("secret").expect("hash"),
        };
        let cache = VerifiedCache::new();
        assert!(cache.verify(&cred, "secret"));
        assert!(cache.verify(&cred, "secret"), "cached");
        assert!(!cache.verify(&cred, "Secret"));
        let changed = Credential {
            hash: hash_password("other").expect("hash"),
            ..cred.clone()
        };
        assert!(
            !cache.verify(&changed, "secret"),
            "a changed password is not served from the cache"
        );
    }
}

/// Failed sign-ins in a row a user name gets before it has to wait.
const FREE_FAILURES: u32 = 5;
/// The longest wait between attempts on one user name.
const MAX_WAIT_MS: u64 = 60_000;
/// Most user names tracked; beyond it expired entries go, then all.
const GUARD_LIMIT: usize = 10_000;

/// Slows down password guessing: after [`FREE_FAILURES`] failed sign-ins
/// in a row for one user name (known or not, so the answer does not tell
/// which), each further attempt must wait 1 s, then 2 s, 4 s, ... up to
/// [`MAX_WAIT_MS`]. A success clears the name. Time comes in as an
/// argument (the node's wall clock).
#[derive(Debug, Default)]
pub(crate) struct SignInGuard {
    failures: Mutex<HashMap<String, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    blocked_until_ms: u64,
}

impl SignInGuard {
    /// `Err(ms to wait)` while `user` is blocked.
    pub(crate) fn check(&self, user: &str, now_ms: u64) -> Result<(), u64> {
        let Ok(map) = self.failures.lock() else { return Ok(()) };
        match map.get(user) {
            Some(f) if f.blocked_until_ms > now_ms => Err(f.blocked_until_ms - now_ms),
            _ => Ok(()),
        }
    }

    pub(crate) fn failed(&self, user: &str, now_ms: u64) {
        let Ok(mut map) = self.failures.lock() else { return };
        if map.len() >= GUARD_LIMIT && !map.contains_key(user) {
            map.retain(|_, f| f.blocked_until_ms > now_ms);
            if map.len() >= GUARD_LIMIT {
                map.clear();
            }
        }
        let f = map.entry(user.to_owned()).or_insert(Failures {
            count: 0,
            blocked_until_ms: 0,
        });
        f.count = f.count.saturating_add(1);
        if f.count > FREE_FAILURES {
            let doublings = (f.count - FREE_FAILURES - 1).min(16);
            f.blocked_until_ms = now_ms + (1000u64 << doublings).min(MAX_WAIT_MS);
        }
    }

    pub(crate) fn succeeded(&self, user: &str) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(user);
        }
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;

    #[test]
    fn failures_beyond_the_free_ones_wait_longer_each_time_and_success_clears() {
        let g = SignInGuard::default();
        for _ in 0..FREE_FAILURES {
            assert_eq!(g.check("eve", 0), Ok(()));
            g.failed("eve", 0);
        }
        assert_eq!(g.check("eve", 0), Ok(()), "the free failures do not block");
        g.failed("eve", 0);
        assert_eq!(g.check("eve", 0), Err(1000));
        assert_eq!(g.check("eve", 1000), Ok(()));
        g.failed("eve", 1000);
        assert_eq!(g.check("eve", 1000), Err(2000));
        assert_eq!(g.check("bob", 1000), Ok(()), "other names are not affected");
        for _ in 0..20 {
            g.failed("eve", 5000);
        }
        assert_eq!(g.check("eve", 5000), Err(MAX_WAIT_MS));
        g.succeeded("eve");
        assert_eq!(g.check("eve", 5000), Ok(()));
    }

    #[test]
    fn the_table_stays_bounded() {
        let g = SignInGuard::default();
        for i in 0..GUARD_LIMIT + 10 {
            g.failed(&format!("user{i}"), 0);
        }
        assert!(g.failures.lock().map(|m| m.len()).unwrap_or(0) <= GUARD_LIMIT);
    }
}
