//! The cluster's shared secret (`cluster.secret_file`): only nodes that
//! hold it join the membership and open bridge links.
//!
//! Node-wide, read once at start and shared by every shard. Sans-IO apart
//! from [`ClusterSecret::load`]: it makes and checks HMAC-SHA256 tags,
//! over each membership datagram (`membership`) and over the two sides of
//! a link's handshake, and over each record of frames a link carries after
//! it (`link`, [`RecordMac`]). It authenticates; it does not encrypt.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The fewest bytes a secret may have.
pub const SECRET_BYTES_MIN: usize = 16;

/// A cluster's shared secret; its bytes never reach a log line.
#[derive(Clone)]
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

    /// Read the secret from the file at `path`. A file that others than
    /// its owner may read is taken, with a warning for the log (the
    /// second value).
    pub fn load(path: &std::path::Path) -> Result<(ClusterSecret, Option<String>), String> {
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

/// The running tag of one direction of a link after its handshake: each
/// record (the frames between two seals) is tagged under the direction's
/// key with its number, so a frame changed, dropped, reordered or
/// replayed from another record or link does not check.
pub struct RecordMac {
    key: [u8; 32],
    seq: u64,
    mac: HmacSha256,
}

impl std::fmt::Debug for RecordMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordMac {{ seq: {} }}", self.seq)
    }
}

impl RecordMac {
    /// Records tagged under `key` (derived from the secret and the
    /// handshake), numbered from 0.
    pub fn new(key: [u8; 32]) -> RecordMac {
        RecordMac {
            mac: Self::start(&key, 0),
            key,
            seq: 0,
        }
    }

    fn start(key: &[u8; 32], seq: u64) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        m.update(&seq.to_be_bytes());
        m
    }

    /// Bytes of the current record.
    pub fn update(&mut self, bytes: &[u8]) {
        self.mac.update(bytes);
    }

    /// End the current record: its tag (16 bytes); the next one starts.
    pub fn seal(&mut self) -> [u8; TAG_BYTES] {
        self.seq += 1;
        let m = std::mem::replace(&mut self.mac, Self::start(&self.key, self.seq));
        let tag = m.finalize().into_bytes();
        let mut out = [0u8; TAG_BYTES];
        out.copy_from_slice(&tag[..TAG_BYTES]);
        out
    }

    /// End the current record: whether `tag` is its tag (constant-time).
    pub fn check(&mut self, tag: &[u8]) -> bool {
        self.seq += 1;
        let m = std::mem::replace(&mut self.mac, Self::start(&self.key, self.seq));
        tag.len() == TAG_BYTES && m.verify_truncated_left(tag).is_ok()
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
    fn records_check_in_order_only() {
        let (mut tx, mut rx) = (RecordMac::new([1; 32]), RecordMac::new([1; 32]));
        tx.update(b"one");
        let first = tx.seal();
        tx.update(b"two");
        let second = tx.seal();
        rx.update(b"one");
        assert!(rx.check(&first));
        rx.update(b"two");
        assert!(
            !rx.check(&first),
            "a record's tag does not check as the next one's"
        );
        let mut again = RecordMac::new([1; 32]);
        again.update(b"onf");
        assert!(!again.check(&first));
        let _ = second;
    }
}
