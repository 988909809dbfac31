//! Session tokens: 32 random bytes, written as 43 characters of unpadded base64url (RFC 4648
//! §5). Only the SHA-256 of the 32 bytes is stored. Decoding is strict: one spelling per
//! token (the last character's two spare bits must be zero), so a token matches exactly one
//! stored hash and a malformed one is refused before any lookup.

use sha2::{Digest, Sha256};

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;

/// Characters in a token: ceil(32 * 8 / 6).
pub const TOKEN_CHARS: usize = 43;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Why a string is not a token. Never carries the string itself: it may be a real token
/// with a typo, and error messages end up in logs.
#[derive(Debug, PartialEq, Eq)]
pub enum Malformed {
    Length(usize),
    Character,
    NonCanonical,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::Length(n) => write!(
                f,
                "it is {n} characters long; a session token is {TOKEN_CHARS}"
            ),
            Malformed::Character => write!(
                f,
                "it contains a character outside base64url (A-Z a-z 0-9 - _)"
            ),
            Malformed::NonCanonical => write!(f, "its last character is not a valid ending"),
        }
    }
}

/// The token text for 32 bytes.
pub fn encode(bytes: &[u8; TOKEN_BYTES]) -> String {
    let mut out = String::with_capacity(TOKEN_CHARS);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

fn sextet(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// The 32 bytes of a token text, or why it is not one.
pub fn decode(token: &str) -> Result<[u8; TOKEN_BYTES], Malformed> {
    let text = token.as_bytes();
    if text.len() != TOKEN_CHARS {
        return Err(Malformed::Length(token.chars().count()));
    }
    let mut out = [0u8; TOKEN_BYTES];
    let mut written = 0;
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= sextet(c).ok_or(Malformed::Character)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let take = chunk.len() - 1;
        // A short last group leaves bits that encode nothing; they must be zero.
        if take < 3 && bytes[take..].iter().any(|&b| b != 0) {
            return Err(Malformed::NonCanonical);
        }
        out[written..written + take].copy_from_slice(&bytes[..take]);
        written += take;
    }
    Ok(out)
}

/// What is stored for a token: SHA-256 of its 32 bytes.
pub fn hash(bytes: &[u8; TOKEN_BYTES]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The pad that seals a rotation's new token under the old one: SHA-256 of a label and the
/// old token's bytes (a one-time pad, since each old token is rotated once).
fn pad(old: &[u8; TOKEN_BYTES]) -> [u8; TOKEN_BYTES] {
    let mut h = Sha256::new();
    h.update(b"pg_keel session rotation grace\0");
    h.update(old);
    h.finalize().into()
}

/// `new` sealed under `old`: only a holder of the old token can open it (see `open`).
pub fn seal(old: &[u8; TOKEN_BYTES], new: &[u8; TOKEN_BYTES]) -> [u8; TOKEN_BYTES] {
    let pad = pad(old);
    std::array::from_fn(|i| new[i] ^ pad[i])
}

/// The new token `seal` sealed under `old`.
pub fn open(old: &[u8; TOKEN_BYTES], sealed: &[u8; TOKEN_BYTES]) -> [u8; TOKEN_BYTES] {
    seal(old, sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(seed: u8) -> [u8; TOKEN_BYTES] {
        let mut b = [0u8; TOKEN_BYTES];
        for (i, v) in b.iter_mut().enumerate() {
            *v = seed
                .wrapping_mul(31)
                .wrapping_add((i as u8).wrapping_mul(97));
        }
        b
    }

    #[test]
    fn known_encodings() {
        assert_eq!(encode(&[0u8; 32]), "A".repeat(43));
        assert_eq!(encode(&[0xffu8; 32]), format!("{}8", "_".repeat(42)));
        // RFC 4648 base64 of 32 bytes 0..31, with + / replaced and the padding dropped.
        let mut seq = [0u8; 32];
        for (i, v) in seq.iter_mut().enumerate() {
            *v = i as u8;
        }
        assert_eq!(encode(&seq), "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8");
    }

    #[test]
    fn round_trips_and_is_url_safe() {
        for seed in 0..=255u8 {
            let b = bytes(seed);
            let t = encode(&b);
            assert_eq!(t.len(), TOKEN_CHARS);
            assert!(t
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            assert_eq!(decode(&t), Ok(b));
        }
    }

    #[test]
    fn refuses_what_is_not_a_token() {
        let good = encode(&bytes(7));
        assert_eq!(decode(""), Err(Malformed::Length(0)));
        assert_eq!(decode(&good[..42]), Err(Malformed::Length(42)));
        assert_eq!(decode(&format!("{good}A")), Err(Malformed::Length(44)));
        // Standard base64's + and /, padding, spaces, non-ASCII of the right byte length.
        for bad in ['+', '/', '=', ' ', '.'] {
            let t = format!("{bad}{}", &good[1..]);
            assert_eq!(decode(&t), Err(Malformed::Character), "{t}");
        }
        let t = format!("é{}", &good[2..]);
        assert_eq!(decode(&t), Err(Malformed::Character));
        // The last character carries 4 bits of data and 2 spare bits; only one spelling.
        let zero = "A".repeat(43);
        assert!(decode(&zero).is_ok());
        assert_eq!(
            decode(&format!("{}B", "A".repeat(42))),
            Err(Malformed::NonCanonical)
        );
        assert!(decode(&format!("{}E", "A".repeat(42))).is_ok());
    }

    #[test]
    fn messages_never_repeat_the_input() {
        let secret = encode(&bytes(9));
        let almost = &secret[..40];
        let e = decode(almost).expect_err("too short");
        assert!(!e.to_string().contains(almost));
        assert!(e.to_string().contains("40 characters"));
    }

    #[test]
    fn a_sealed_token_opens_with_the_old_one_only() {
        let (old, new, other) = (bytes(1), bytes(2), bytes(3));
        let sealed = seal(&old, &new);
        assert_ne!(sealed, new);
        assert_eq!(open(&old, &sealed), new);
        assert_ne!(open(&other, &sealed), new);
    }

    #[test]
    fn hash_is_sha256_of_the_bytes() {
        // SHA-256 of 32 zero bytes.
        let h = hash(&[0u8; 32]);
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"
        );
        assert_ne!(hash(&bytes(1)), hash(&bytes(2)));
    }
}
