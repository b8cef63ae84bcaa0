//! The cluster's shared secret (`cluster.secret_file`): only nodes that
//! hold it join the membership and open bridge links.
//!
//! Node-wide, read once at start and shared by every shard. Sans-IO apart
//! from [`ClusterSecret::load`]: it makes and checks HMAC-SHA256 tags,
//! over each membership datagram (`membership`) and over the two sides of
//! a link's handshake (`link`); and it keys the encryption of each record
//! of frames a link carries after it ([`RecordCipher`]). Membership
//! datagrams are authenticated, not encrypted.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The fewest bytes a secret may have.
pub const SECRET_BYTES_MIN: usize = 16;

/// A cluster's shared secret; its bytes never reach a log line.
pub struct ClusterSecret {
    key: Vec<u8>,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// The secret `bytes` (trailing whitespace, a file's last newline,
    /// left out); Err when fewer than [`SECRET_BYTES_MIN`] remain.
    pub fn new(bytes: &[u8]) -> Result<ClusterSecret, String> {
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if end < SECRET_BYTES_MIN {
            return Err(format!(
                "{end} bytes; a cluster secret has at least {SECRET_BYTES_MIN}"
            ));
        }
        Ok(ClusterSecret {
            key: bytes[..end].to_vec(),
        })
    }

    /// The secret of `cluster.secret_file` (`path`; empty: none), with a
    /// warning for the log when others than its owner may read the file;
    /// Err (naming the setting) when it cannot be read or is too short.
    /// The broker's start and `check-config` both read it so.
    pub fn from_setting(path: &str) -> Result<Option<(ClusterSecret, Option<String>)>, String> {
        if path.is_empty() {
            return Ok(None);
        }
        let (secret, warning) =
            Self::load(path.as_ref()).map_err(|e| format!("cluster.secret_file: {e}"))?;
        Ok(Some((
            secret,
            warning.map(|w| format!("cluster.secret_file: {w}")),
        )))
    }

    /// Read the secret from the file at `path`. A file that others than
    /// its owner may read is taken, with a warning for the log (the
    /// second value).
    fn load(path: &std::path::Path) -> Result<(ClusterSecret, Option<String>), String> {
        use std::os::unix::fs::PermissionsExt;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let secret = Self::new(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = std::fs::metadata(path)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        let warning = (mode & 0o077 != 0).then(|| {
            format!(
                "{} may be read by others than its owner (mode {:o}): chmod 600 it",
                path.display(),
                mode & 0o777
            )
        });
        Ok((secret, warning))
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(label);
        for p in parts {
            // Each part with its length, so two splits of the same bytes
            // differ.
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        m
    }

    /// The tag of `parts` under `label` (what the tag is for).
    pub fn tag(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.mac(label, parts).finalize().into_bytes().into()
    }

    /// Whether `tag` (the whole tag, or its first bytes, at least 16) is
    /// the tag of `parts` under `label`; constant-time.
    pub fn verify(&self, label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        tag.len() >= 16 && self.mac(label, parts).verify_truncated_left(tag).is_ok()
    }
}

/// One direction of a link after its handshake: each record (the frames
/// written at once) is encrypted and authenticated with AES-256-GCM under
/// the direction's key (derived from the secret and the handshake), its
/// number the nonce, so a record changed, dropped, reordered or replayed
/// from another record or link does not open.
pub struct RecordCipher {
    key: ring::aead::LessSafeKey,
    /// The key's bytes, from which the next key is derived.
    raw: [u8; 32],
    seq: u64,
}

/// Records under one key before both sides move to the next (derived
/// from it), well below AES-GCM's limits per key.
pub const RECORDS_PER_KEY: u64 = 1 << 24;

impl std::fmt::Debug for RecordCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordCipher {{ seq: {} }}", self.seq)
    }
}

impl RecordCipher {
    /// Records under `key`, numbered from 0.
    pub fn new(key: [u8; 32]) -> RecordCipher {
        RecordCipher {
            key: Self::aes(&key),
            raw: key,
            seq: 0,
        }
    }

    fn aes(key: &[u8; 32]) -> ring::aead::LessSafeKey {
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
            .expect("a 32-byte AES-256 key");
        ring::aead::LessSafeKey::new(unbound)
    }

    fn nonce(&mut self) -> ring::aead::Nonce {
        if self.seq > 0 && self.seq % RECORDS_PER_KEY == 0 {
            let mut m = HmacSha256::new_from_slice(&self.raw).expect("HMAC takes any key length");
            m.update(b"shardmq bridge: the next key");
            self.raw = m.finalize().into_bytes().into();
            self.key = Self::aes(&self.raw);
        }
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.seq.to_be_bytes());
        self.seq += 1;
        ring::aead::Nonce::assume_unique_for_key(n)
    }

    /// Encrypt the next record in place; its tag (16 bytes) to append.
    pub fn seal(&mut self, record: &mut [u8]) -> [u8; TAG_BYTES] {
        let nonce = self.nonce();
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::empty(), record)
            .expect("AES-GCM seals any record under 64 GiB");
        let mut out = [0u8; TAG_BYTES];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Decrypt the next record (its tag at the end) in place: the length
    /// of the plaintext at its front, or None when it does not open.
    pub fn open(&mut self, record: &mut [u8]) -> Option<usize> {
        let nonce = self.nonce();
        self.key
            .open_in_place(nonce, ring::aead::Aad::empty(), record)
            .ok()
            .map(|plain| plain.len())
    }
}

/// Bytes of a record's tag.
pub const TAG_BYTES: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_checks_only_with_the_same_secret_label_and_parts() {
        let s = ClusterSecret::new(b"0123456789abcdef\n").unwrap();
        let t = s.tag(b"l", &[b"ab", b"c"]);
        assert!(s.verify(b"l", &[b"ab", b"c"], &t));
        assert!(s.verify(b"l", &[b"ab", b"c"], &t[..16]), "truncated");
        assert!(!s.verify(b"l", &[b"ab", b"c"], &t[..15]), "too short");
        assert!(!s.verify(b"m", &[b"ab", b"c"], &t));
        assert!(!s.verify(b"l", &[b"a", b"bc"], &t), "parts are framed");
        let other = ClusterSecret::new(b"0123456789abcdeg").unwrap();
        assert!(!other.verify(b"l", &[b"ab", b"c"], &t));
        assert!(ClusterSecret::new(b"0123456789abcde\n\n").is_err());
        assert_eq!(format!("{s:?}"), "ClusterSecret(..)");
    }

    #[test]
    fn records_open_in_order_only() {
        let (mut tx, mut rx) = (RecordCipher::new([1; 32]), RecordCipher::new([1; 32]));
        let mut first = b"one".to_vec();
        let tag = tx.seal(&mut first);
        assert_ne!(&first, b"one", "encrypted");
        first.extend_from_slice(&tag);
        let mut second = b"two".to_vec();
        let tag = tx.seal(&mut second);
        second.extend_from_slice(&tag);
        let mut changed = first.clone();
        changed[1] ^= 1;
        assert_eq!(RecordCipher::new([1; 32]).open(&mut changed), None);
        let mut replayed = first.clone();
        assert_eq!(rx.open(&mut first), Some(3));
        assert_eq!(&first[..3], b"one");
        assert_eq!(
            rx.open(&mut replayed),
            None,
            "a record does not open as the next"
        );
        assert_eq!(RecordCipher::new([2; 32]).open(&mut second), None);
        // Both sides move to the next key at the same record.
        let (mut tx, mut rx) = (RecordCipher::new([3; 32]), RecordCipher::new([3; 32]));
        tx.seq = RECORDS_PER_KEY;
        rx.seq = RECORDS_PER_KEY;
        let mut next = b"next".to_vec();
        let tag = tx.seal(&mut next);
        next.extend_from_slice(&tag);
        let mut stale = RecordCipher::new([3; 32]);
        stale.seq = RECORDS_PER_KEY;
        stale.raw = [0; 32]; // derives another key
        assert_eq!(stale.open(&mut next.clone()), None);
        assert_eq!(rx.open(&mut next), Some(4));
        assert_ne!(rx.raw, [3; 32]);
    }
}
