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
