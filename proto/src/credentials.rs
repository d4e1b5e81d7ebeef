//! Agent API keys: `fp_<id>_<secret>`, parsed once at the edge.
//!
//! The id (16 hex digits) is public: keys are looked up by it. The secret (64
//! hex digits, 32 random bytes) is shown once when the key is created and
//! stored only as its SHA-256; a fast hash suffices because the secret is
//! random, not a password. Comparison is in constant time. Neither the secret
//! nor a whole key ever appears in `Debug` output, logs or errors.
//!
//! ```
//! use fleetplane_proto::credentials::{MintedKey, PresentedKey};
//!
//! let minted = MintedKey::generate();
//! let presented = PresentedKey::parse(minted.token()).unwrap();
//! assert_eq!(presented.id(), minted.id());
//! assert!(presented.matches(&minted.secret_sha256()));
//! assert!(!format!("{presented:?}").contains(&minted.token()[20..]));
//! assert!(PresentedKey::parse("fp_nothex_x").is_err());
//! ```

use rand::RngCore;
use sha2::{Digest, Sha256};

const PREFIX: &str = "fp_";
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

/// Why a presented key is not one of ours (the message never repeats it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    /// Not `fp_<16 hex>_<64 hex>`.
    #[error("not a Fleetplane API key (expected fp_<id>_<secret>)")]
    Malformed,
}

/// A key as an agent presented it.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedKey {
    id: String,
    secret: String,
}

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresentedKey")
            .field("id", &self.id)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl PresentedKey {
    /// Parses `fp_<id>_<secret>` (lowercase hex).
    pub fn parse(text: &str) -> Result<Self, KeyFormatError> {
        let rest = text.trim().strip_prefix(PREFIX).ok_or(KeyFormatError::Malformed)?;
        let (id, secret) = rest.split_once('_').ok_or(KeyFormatError::Malformed)?;
        if !is_hex(id, ID_HEX) || !is_hex(secret, SECRET_HEX) {
            return Err(KeyFormatError::Malformed);
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The public id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the secret hashes to `stored` (constant time).
    pub fn matches(&self, stored: &[u8]) -> bool {
        let hash = Sha256::digest(self.secret.as_bytes());
        hash.len() == stored.len() && hash.iter().zip(stored).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// A freshly generated key: the token to hand to the operator once, and what
/// to store.
#[derive(Clone)]
pub struct MintedKey {
    id: String,
    token: String,
    secret_sha256: [u8; 32],
}

impl std::fmt::Debug for MintedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedKey")
            .field("id", &self.id)
            .field("token", &"[REDACTED]")
            .finish()
    }
}

impl MintedKey {
    /// A new random key (id and secret from the OS's random source).
    pub fn generate() -> Self {
        let mut id = [0u8; ID_HEX / 2];
        let mut secret = [0u8; SECRET_HEX / 2];
        rand::rng().fill_bytes(&mut id);
        rand::rng().fill_bytes(&mut secret);
        let (id, secret) = (hex::encode(id), hex::encode(secret));
        let secret_sha256 = Sha256::digest(secret.as_bytes()).into();
        Self {
            token: format!("{PREFIX}{id}_{secret}"),
            id,
            secret_sha256,
        }
    }

    /// The public id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The whole key, `fp_<id>_<secret>`: shown to the operator once.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// What the store keeps.
    pub fn secret_sha256(&self) -> [u8; 32] {
        self.secret_sha256
    }
}

/// The identity of an agent's client certificate, as reports carry it in
/// `key_id`: `cert:` and the first 32 hex digits of the SHA-256 of the leaf
/// certificate's DER. Instance uids are bound to it as to an API key's id.
pub fn certificate_id(leaf_der: &[u8]) -> String {
    let digest = Sha256::digest(leaf_der);
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{CERTIFICATE_ID_PREFIX}{hex}")
}

/// What every [`certificate_id`] starts with (API key ids never do).
pub const CERTIFICATE_ID_PREFIX: &str = "cert:";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_secrets_and_shapes_are_refused() {
        let minted = MintedKey::generate();
        let mut wrong = minted.token().to_owned();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert!(!PresentedKey::parse(&wrong).unwrap().matches(&minted.secret_sha256()));
        for bad in [
            "",
            "fp_",
            "Bearer x",
            "fp_0011223344556677",
            "fp_0011223344556677_ABC",
            "xx_0011223344556677_00",
        ] {
            assert_eq!(PresentedKey::parse(bad), Err(KeyFormatError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_distinct() {
        assert_ne!(MintedKey::generate().token(), MintedKey::generate().token());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn arbitrary_text_never_parses_unless_it_has_the_shape(text in ".{0,120}") {
            if PresentedKey::parse(&text).is_ok() {
                let t = text.trim();
                prop_assert!(t.starts_with("fp_") && t.len() == 3 + 16 + 1 + 64, "{t:?}");
            }
        }
    }
}
