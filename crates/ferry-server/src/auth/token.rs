//! Bearer tokens: how they are made, and the only form in which the broker keeps them.
//!
//! The configuration holds a token's SHA-256 hash, never the token, so a leaked file grants
//! nothing. A fast hash is enough because tokens are random (`ferry token new` draws 256 bits,
//! and `ferry token hash` refuses short ones): no dictionary reaches them, and checking a call
//! costs microseconds rather than the tens of milliseconds a password hash would add to every
//! call. Presented tokens are compared to every declared hash in constant time.

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

/// How a stored hash begins, naming its algorithm so that another can follow.
pub const HASH_PREFIX: &str = "sha256:";
/// The shortest token `ferry token hash` accepts: shorter ones could be guessed offline from a
/// leaked hash.
pub const MIN_TOKEN_LEN: usize = 20;

/// A token's SHA-256 digest.
pub type Digest = [u8; 32];

/// A new random token: `ferry_` and 64 hex digits (256 bits).
pub fn generate() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random number generator failed".to_owned())?;
    Ok(format!("ferry_{}", hex(&bytes)))
}

/// The hash of `token` as the configuration stores it (`sha256:` and 64 hex digits).
pub fn hash(token: &str) -> String {
    format!("{HASH_PREFIX}{}", hex(&digest_of(token.as_bytes())))
}

/// The SHA-256 digest of a presented token.
pub fn digest_of(token: &[u8]) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, token).as_ref());
    out
}

/// Reads a stored hash; the error says what a hash looks like.
pub fn parse_hash(text: &str) -> Result<Digest, String> {
    let wrong = || {
        format!(
            "{text:?} is not a token hash: it must be \"{HASH_PREFIX}\" and 64 hex digits, as \
             `ferry token hash` prints (never the token itself)"
        )
    };
    let digits = text.strip_prefix(HASH_PREFIX).ok_or_else(wrong)?;
    // ASCII first: slicing below must not split a character.
    if digits.len() != 64 || !digits.is_ascii() {
        return Err(wrong());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| wrong())?;
    }
    Ok(out)
}

/// Whether two digests are equal, compared in constant time.
pub fn same(known: &Digest, presented: &Digest) -> bool {
    bool::from(known.ct_eq(presented))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_found_by_its_hash_only() {
        let token = generate().unwrap();
        assert!(token.starts_with("ferry_") && token.len() == 70, "{token}");
        assert_ne!(token, generate().unwrap());
        let stored = parse_hash(&hash(&token)).unwrap();
        assert!(same(&stored, &digest_of(token.as_bytes())));
        assert!(!same(&stored, &digest_of(b"ferry_guess")));
    }

    #[test]
    fn a_malformed_hash_is_explained() {
        for bad in [
            "ferry_abc",
            "sha256:abc",
            &format!("sha256:{}", "g".repeat(64)),
            &format!("sha256:{}é", "0".repeat(62)),
        ] {
            let message = parse_hash(bad).unwrap_err();
            assert!(message.contains("ferry token hash"), "{message}");
        }
        // Known vector: SHA-256 of "abc".
        assert_eq!(
            hash("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
