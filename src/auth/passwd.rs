//! Mosquitto's password file: one `username:hash` line per user, as
//! `mosquitto_passwd` writes it, read and written both ways.
//!
//! Sans-IO: text in, rules out; the file is read by whoever loads the
//! config (`auth::Auth::load`) and shared read-only by every shard.
//!
//! Hash formats (base64 is the standard alphabet with padding, as
//! Mosquitto writes it):
//!
//! - `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512, what
//!   `mosquitto_passwd` 2.0 writes (101 iterations, 12-byte salt, 64-byte
//!   hash), and what `shardmq passwd` writes;
//! - `$6$SALT$HASH`: SHA-512 of the password followed by the salt
//!   (Mosquitto 1.x);
//! - `$argon2id$v=19$m=...,t=...,p=...$SALT$HASH`: argon2id in the PHC
//!   string format (Mosquitto 2.1).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

use crate::hash::HashMap;

/// PBKDF2 iterations `shardmq passwd` writes: Mosquitto 2.0's default, so
/// a CONNECT costs the same on both brokers.
pub const ITERATIONS: u32 = 101;
/// Salt bytes `shardmq passwd` writes (Mosquitto's length).
pub const SALT_BYTES: usize = 12;
/// The most PBKDF2 iterations a line may ask for: a file that asks more
/// would let one CONNECT stall a shard.
pub const ITERATIONS_MAX: u32 = 100_000;

/// One user's stored hash.
#[derive(Clone, PartialEq, Eq)]
enum Hash {
    /// `$6$`: SHA-512(password ‖ salt).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// `$argon2id$...`, the PHC string as written.
    Argon2(String),
}

impl std::fmt::Debug for Hash {
    // Never print a hash: a log line is no place for one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hash::Sha512 { .. } => "$6$",
            Hash::Pbkdf2 { .. } => "$7$",
            Hash::Argon2(_) => "$argon2id$",
        })
    }
}

/// A line the password file cannot hold, with its number (from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct PasswdError {
    /// Line number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub why: String,
}

/// The users of a password file and their hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Passwords {
    users: HashMap<String, Hash>,
}

impl Passwords {
    /// Read a password file. Blank lines and lines starting with `#` are
    /// skipped, as Mosquitto does; a line without a `:`, a hash in no
    /// known format, or a user twice is an error naming the line (the
    /// whole file is refused: half a file would lock users out).
    pub fn parse(text: &str) -> Result<Passwords, PasswdError> {
        let mut users = HashMap::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |why: &str| PasswdError {
                line: i + 1,
                why: why.to_string(),
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| err("no ':' between user name and hash"))?;
            if user.is_empty() {
                return Err(err("empty user name"));
            }
            let hash = parse_hash(hash).map_err(|why| err(&why))?;
            if users.insert(user.to_string(), hash).is_some() {
                return Err(err("user listed twice"));
            }
        }
        Ok(Passwords { users })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when the file lists nobody.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True when `user` is listed and `password` is theirs. Comparisons
    /// take the same time whatever bytes differ.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(h) => verify(h, password),
            None => false,
        }
    }
}

fn parse_hash(s: &str) -> Result<Hash, String> {
    let b64 = |part: &str, what: &str| {
        B64.decode(part)
            .map_err(|e| format!("{what} is not base64: {e}"))
    };
    if s.starts_with("$argon2id$") {
        argon2::PasswordHash::new(s).map_err(|e| format!("argon2id hash: {e}"))?;
        return Ok(Hash::Argon2(s.to_string()));
    }
    let parts: Vec<&str> = s.split('$').collect();
    match parts.as_slice() {
        ["", "6", salt, hash] => {
            let hash = b64(hash, "hash")?;
            if hash.len() != 64 {
                return Err(format!("$6$ hash of {} bytes, not 64", hash.len()));
            }
            Ok(Hash::Sha512 {
                salt: b64(salt, "salt")?,
                hash,
            })
        }
        ["", "7", iterations, salt, hash] => {
            let iterations: u32 = iterations
                .parse()
                .map_err(|_| format!("iteration count {iterations:?} is not a number"))?;
            if !(1..=ITERATIONS_MAX).contains(&iterations) {
                return Err(format!(
                    "{iterations} iterations: 1 to {ITERATIONS_MAX} allowed"
                ));
            }
            let hash = b64(hash, "hash")?;
            if hash.is_empty() || hash.len() > 64 {
                return Err(format!("$7$ hash of {} bytes", hash.len()));
            }
            Ok(Hash::Pbkdf2 {
                iterations,
                salt: b64(salt, "salt")?,
                hash,
            })
        }
        _ => Err("not a $6$, $7$ or $argon2id$ hash (a plain password? \
                  `shardmq passwd -U` hashes a file of them)"
            .to_string()),
    }
}

fn verify(h: &Hash, password: &[u8]) -> bool {
    match h {
        Hash::Sha512 { salt, hash } => {
            let mut d = Sha512::new();
            d.update(password);
            d.update(salt);
            d.finalize().as_slice().ct_eq(hash).into()
        }
        Hash::Pbkdf2 {
            iterations,
            salt,
            hash,
        } => {
            let mut out = [0u8; 64];
            let out = &mut out[..hash.len()];
            pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, out);
            (*out).ct_eq(hash).into()
        }
        Hash::Argon2(phc) => {
            use argon2::PasswordVerifier;
            let Ok(parsed) = argon2::PasswordHash::new(phc) else {
                return false;
            };
            argon2::Argon2::default()
                .verify_password(password, &parsed)
                .is_ok()
        }
    }
}

/// The `$7$` hash of `password` with `salt` (what `shardmq passwd`
/// writes, [`ITERATIONS`] rounds).
pub fn hash_pbkdf2(password: &[u8], salt: &[u8]) -> String {
    let mut out = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, ITERATIONS, &mut out);
    format!("$7${ITERATIONS}${}${}", B64.encode(salt), B64.encode(out))
}

/// A fresh random salt of [`SALT_BYTES`].
pub fn new_salt() -> std::io::Result<[u8; SALT_BYTES]> {
    let mut salt = [0u8; SALT_BYTES];
    getrandom::fill(&mut salt).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(salt)
}

/// The text of a password file after `edit`: lines of other users, blank
/// lines and comments kept as they were, in order.
pub fn edit_file(text: &str, user: &str, edit: Edit) -> String {
    let mut out = String::with_capacity(text.len() + 128);
    let mut done = false;
    for line in text.lines() {
        let ours = is_line_of(line, user);
        if !ours {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if let (Edit::Set(hash), false) = (&edit, done) {
            out.push_str(&format!("{user}:{hash}\n"));
            done = true;
        }
    }
    if let (Edit::Set(hash), false) = (&edit, done) {
        out.push_str(&format!("{user}:{hash}\n"));
    }
    out
}

/// True when `line` of a password file is `user`'s.
fn is_line_of(line: &str, user: &str) -> bool {
    line.split_once(':').is_some_and(|(u, _)| u == user)
}

/// True when the password file `text` has a line for `user`.
pub fn lists(text: &str, user: &str) -> bool {
    text.lines().any(|l| is_line_of(l, user))
}

/// A change to one user's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Add the user or replace their hash.
    Set(String),
    /// Remove the user.
    Delete,
}

/// The text of a file of `user:plain password` lines with every password
/// hashed (`mosquitto_passwd -U`); lines already hashed are refused, as
/// hashing a hash would lock the user out.
pub fn hash_plain_file(
    text: &str,
    mut salt: impl FnMut() -> std::io::Result<[u8; SALT_BYTES]>,
) -> Result<String, PasswdError> {
    let mut out = String::with_capacity(text.len() * 4);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let err = |why: String| PasswdError { line: i + 1, why };
        let (user, plain) = line
            .split_once(':')
            .ok_or_else(|| err("no ':' between user name and password".into()))?;
        if parse_hash(plain).is_ok() {
            return Err(err(format!("the password of {user:?} is hashed already")));
        }
        let salt = salt().map_err(|e| err(format!("no random salt: {e}")))?;
        out.push_str(&format!(
            "{user}:{}\n",
            hash_pbkdf2(plain.as_bytes(), &salt)
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Mosquitto 2.0.11's `mosquitto_passwd -b` (`-H sha512`
    /// for old): alice "secret", bob "s3cr3t pass", old "oldpw".
    const MOSQUITTO: &str = "\
alice:$7$101$0HhrEORGXunNRLHn$7UVs/GTBVgpiYv4EjVpC97K9cTqmv0uwBZVouscR8y2TJ0Jz8zBYcgsmNOQXzpNQmbEHDkbblNaVYiyI/RFdeg==
bob:$7$101$6euR5NGwZ2faTBBF$YGtkSLK/bigPYGOvWB9jRjEtDV6H7fNPIV81O+yPv7LNz1H8uGpWqiM1IVN2Ykyd9T9ikJo3NS6SA3Jcc2f92Q==
old:$6$Y6KalkzmKrSzH95O$gwvYr3Inu7zr+9AC3Z/BcyfUsgh1v3YNMryhy2bLMX/kycrRq6V+FS+63zExjs+lxKxM3iiqMExKwJI/LsLSHA==
";

    #[test]
    fn reads_what_mosquitto_passwd_writes() {
        let p = Passwords::parse(MOSQUITTO).unwrap();
        assert_eq!(p.len(), 3);
        assert!(p.verify("alice", b"secret"));
        assert!(!p.verify("alice", b"secreT"));
        assert!(!p.verify("alice", b""));
        assert!(p.verify("bob", b"s3cr3t pass"));
        assert!(!p.verify("bob", b"secret"));
        assert!(p.verify("old", b"oldpw"));
        assert!(!p.verify("carol", b"secret"));
    }

    #[test]
    fn sha512_lines_are_password_then_salt() {
        let salt = b"0123456789ab";
        let mut d = Sha512::new();
        d.update(b"pw");
        d.update(salt);
        let line = format!("u:$6${}${}\n", B64.encode(salt), B64.encode(d.finalize()));
        let p = Passwords::parse(&line).unwrap();
        assert!(p.verify("u", b"pw"));
        assert!(!p.verify("u", b"pw "));
    }

    #[test]
    fn argon2id_lines_verify() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"saltsaltsalt").unwrap();
        let phc = argon2::Argon2::default()
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        let p = Passwords::parse(&format!("u:{phc}\n")).unwrap();
        assert!(p.verify("u", b"pw"));
        assert!(!p.verify("u", b"px"));
    }

    #[test]
    fn what_shardmq_writes_it_reads() {
        let salt = new_salt().unwrap();
        let text = edit_file("", "carol", Edit::Set(hash_pbkdf2(b"pw", &salt)));
        let p = Passwords::parse(&text).unwrap();
        assert!(p.verify("carol", b"pw"));
        assert!(text.starts_with("carol:$7$101$"), "{text}");
    }

    #[test]
    fn edits_keep_other_lines_and_replace_or_remove_one() {
        let text = "# users\nalice:x\n\nbob:y\n";
        assert_eq!(
            edit_file(text, "alice", Edit::Set("z".into())),
            "# users\nalice:z\n\nbob:y\n"
        );
        assert_eq!(
            edit_file(text, "carol", Edit::Set("w".into())),
            "# users\nalice:x\n\nbob:y\ncarol:w\n"
        );
        assert_eq!(edit_file(text, "bob", Edit::Delete), "# users\nalice:x\n\n");
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let cases = [
            ("\nalice\n", 2, "no ':'"),
            ("alice:plain\n", 1, "not a $6$"),
            ("a:$7$x$AAAA$AAAA\n", 1, "not a number"),
            ("a:$7$0$AAAA$AAAA\n", 1, "iterations"),
            ("a:$7$1000000$AAAA$AAAA\n", 1, "iterations"),
            ("a:$7$101$!!$AAAA\n", 1, "base64"),
            ("a:$6$AAAA$AAAA\n", 1, "not 64"),
            (&format!("{MOSQUITTO}{MOSQUITTO}"), 4, "twice"),
            (":$6$AAAA$AAAA\n", 1, "empty user"),
        ];
        for (text, line, says) in cases {
            let e = Passwords::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.why.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn plain_files_are_hashed_once() {
        let mut n = 0u8;
        let salt = || {
            n += 1;
            Ok([n; SALT_BYTES])
        };
        let hashed = hash_plain_file("# c\nalice:secret\nbob:two words\n", salt).unwrap();
        let p = Passwords::parse(&hashed).unwrap();
        assert!(p.verify("alice", b"secret"));
        assert!(p.verify("bob", b"two words"));
        assert!(hashed.starts_with("# c\n"));
        let again = hash_plain_file(&hashed, || Ok([0; SALT_BYTES]));
        assert!(again.unwrap_err().why.contains("hashed already"));
    }
}
