//! Who may connect, and what each client may read and write: Mosquitto's
//! password file ([`passwd`]) and ACL file ([`acl`]), JSON Web Tokens as
//! passwords ([`token`]), and the default policy for anonymous clients.
//!
//! Loaded once at start by the broker (files read here, the only I/O of
//! the module) and shared read-only by every shard as one `Arc<Auth>`:
//! a CONNECT is checked on the shard that accepted it, and the
//! connection's [`acl::ClientAcl`] lives with its session on its home
//! shard.

pub mod acl;
pub mod clients;
pub mod passwd;
pub mod token;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::AuthConfig;
use crate::hash::HashMap;
use crate::text::quote;

pub use acl::{Acl, ClientAcl, Want};
pub use passwd::Passwords;
pub use token::{Grant, TokenKeys};

/// Why a CONNECT is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// An unknown user name or a wrong password (5.0 0x86, 3.1.1 code 4).
    BadCredentials,
    /// A login token that does not verify, and why (5.0 0x86, 3.1.1
    /// code 4).
    BadToken(String),
    /// No user name where one is needed (5.0 0x87, 3.1.1 code 5).
    NotAuthorized,
    /// A listener that takes the user name from the client certificate
    /// got none (5.0 0x87, 3.1.1 code 5).
    NoCertificate,
}

/// The loaded authentication and authorization rules.
#[derive(Debug, Default)]
pub struct Auth {
    passwords: Option<Passwords>,
    acl: Option<Acl>,
    tokens: Option<TokenKeys>,
    /// `auth.allow_anonymous`; None: only on loopback, and only without a
    /// password file.
    allow_anonymous: Option<bool>,
    /// Client id and address rules.
    clients: clients::ClientRules,
}

/// A file `Auth::load` could not use.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unreadable.
    #[error("{key} {path}: {source}")]
    Read {
        /// The config key naming it.
        key: &'static str,
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A bad line.
    #[error("{key} {path}: {why}")]
    Parse {
        /// The config key naming it.
        key: &'static str,
        /// Its path.
        path: String,
        /// The line and what is wrong with it.
        why: String,
    },
}

impl Auth {
    /// Read the files `config` names (paths as given, relative to the
    /// working directory, as Mosquitto takes them).
    pub fn load(config: &AuthConfig) -> Result<Auth, AuthError> {
        let passwords = load_file(
            "auth.password_file",
            &config.password_file,
            Passwords::parse,
        )?;
        let acl = load_file("auth.acl_file", &config.acl_file, Acl::parse)?;
        Ok(Auth {
            passwords,
            acl,
            tokens: TokenKeys::load(config)?,
            allow_anonymous: config.allow_anonymous,
            clients: clients::ClientRules::new(config),
        })
    }

    /// The rules of `config` without its files: the anonymous policy only
    /// (no password file, no ACL file). What a shard starts with until
    /// the broker hands it the loaded rules.
    pub fn without_files(config: &AuthConfig) -> Auth {
        Auth {
            allow_anonymous: config.allow_anonymous,
            clients: clients::ClientRules::new(config),
            ..Auth::default()
        }
    }

    /// The client id and address rules.
    pub fn clients(&self) -> &clients::ClientRules {
        &self.clients
    }

    /// True when a password file is configured.
    pub fn has_passwords(&self) -> bool {
        self.passwords.is_some()
    }

    /// True when an ACL file is configured.
    pub fn has_acl(&self) -> bool {
        self.acl.is_some()
    }

    /// True when a token login proves its user name: a claim is bound to
    /// `%u` (see [`Grant::user_unverified`]).
    pub fn tokens_bind_user(&self) -> bool {
        self.tokens.as_ref().is_some_and(TokenKeys::binds_user)
    }

    /// True when `password` is a login token this broker checks (JWT keys
    /// are configured and it has a token's shape).
    pub fn is_token(&self, password: Option<&[u8]>) -> bool {
        self.tokens.is_some() && password.is_some_and(token::is_token)
    }

    /// Check a CONNECT's user name and password; `loopback`: it arrived
    /// on a loopback address; `unix_now`: the wall clock, for tokens.
    /// A token (with JWT keys configured) is checked first, then the
    /// password file; with JWT keys but no password file, a user name
    /// needs a token.
    pub fn login(
        &self,
        loopback: bool,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        unix_now: u64,
    ) -> Result<Grant, Refused> {
        if let (true, Some(keys), Some(token)) = (self.is_token(password), &self.tokens, password) {
            return keys
                .verify(token, client_id, username, unix_now)
                .map_err(Refused::BadToken);
        }
        match (username, &self.passwords) {
            (Some(u), Some(p)) => match p.verify(u, password.unwrap_or_default()) {
                true => Ok(Grant::default()),
                false => Err(Refused::BadCredentials),
            },
            (Some(_), None) if self.tokens.is_some() => Err(Refused::BadCredentials),
            // Without a password file or keys a user name is taken as given.
            (Some(_), None) => Ok(Grant::default()),
            (None, _) if self.anonymous_allowed(loopback) => Ok(Grant::default()),
            (None, _) => Err(Refused::NotAuthorized),
        }
    }

    /// True when a client without a user name may connect (`loopback`:
    /// on a loopback address).
    pub fn anonymous_allowed(&self, loopback: bool) -> bool {
        match self.allow_anonymous {
            Some(allowed) => allowed,
            None => loopback && self.passwords.is_none() && self.tokens.is_none(),
        }
    }

    /// The rules of a client, or None when no ACL file is configured
    /// (everything allowed).
    pub fn client_acl(&self, client_id: &str, username: Option<&str>) -> Option<ClientAcl> {
        self.acl.as_ref().map(|a| a.for_client(client_id, username))
    }

    /// The start-up log line: what is checked, and who may connect.
    pub fn describe(&self) -> String {
        let users = match (&self.passwords, &self.tokens) {
            (Some(p), None) => format!("{} users in the password file", p.len()),
            (Some(p), Some(t)) => format!(
                "{} users in the password file, tokens signed with {} keys",
                p.len(),
                t.len()
            ),
            (None, Some(t)) => format!("tokens signed with {} keys", t.len()),
            (None, None) => "no password file (any user name accepted)".to_string(),
        };
        let acl = match &self.acl {
            Some(a) => format!("{} ACL rules", a.rules()),
            None => "no ACL file (every topic allowed)".to_string(),
        };
        let clients = match self.clients.is_empty() {
            true => "",
            false => "; client id and address rules",
        };
        let anonymous = match self.allow_anonymous {
            Some(true) => "anonymous clients allowed",
            Some(false) => "anonymous clients refused",
            None if self.passwords.is_some() || self.tokens.is_some() => {
                "anonymous clients refused (a password file or JWT keys are configured)"
            }
            None => {
                "anonymous clients allowed on loopback addresses only (set \
                 auth.allow_anonymous = true to allow them from anywhere)"
            }
        };
        format!("auth: {users}; {acl}{clients}; {anonymous}")
    }
}

/// Failed logins a client address has before its refusals slow down.
pub const FREE_FAILURES: u32 = 3;
/// The first slowed-down refusal waits this long; each next one twice as
/// long, up to [`FAILURE_DELAY_MAX`].
pub const FAILURE_DELAY: Duration = Duration::from_millis(250);
/// The longest a refusal waits.
pub const FAILURE_DELAY_MAX: Duration = Duration::from_secs(8);
/// An address without a failed login for this long starts afresh.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(600);
/// Addresses one shard remembers failures of.
pub const FAILURE_ADDRESSES_MAX: usize = 10_000;

/// Failed logins by client address (one per shard): after
/// [`FREE_FAILURES`], each refusal from the address waits longer before
/// it is sent, so guessing passwords from one address gets slow.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: HashMap<IpAddr, (u32, Instant)>,
    /// Failures not tracked because the table was full.
    pub untracked: u64,
}

impl LoginThrottle {
    /// A login from `ip` failed at `now`: how long its refusal waits.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> Duration {
        if self.failures.len() >= FAILURE_ADDRESSES_MAX && !self.failures.contains_key(&ip) {
            self.forget_before(now, Duration::from_secs(60));
            if self.failures.len() >= FAILURE_ADDRESSES_MAX {
                self.untracked += 1;
                return Duration::ZERO;
            }
        }
        let entry = self.failures.entry(ip).or_insert((0, now));
        if now.saturating_duration_since(entry.1) >= FAILURE_MEMORY {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        match entry.0.checked_sub(FREE_FAILURES + 1) {
            None => Duration::ZERO,
            Some(doublings) => FAILURE_DELAY
                .saturating_mul(1u32 << doublings.min(16))
                .min(FAILURE_DELAY_MAX),
        }
    }

    /// A login from `ip` succeeded: its count starts afresh.
    pub fn succeeded(&mut self, ip: IpAddr) {
        self.failures.remove(&ip);
    }

    /// Forget addresses whose last failure is older than `age`.
    pub fn forget_before(&mut self, now: Instant, age: Duration) {
        self.failures
            .retain(|_, (_, last)| now.saturating_duration_since(*last) < age);
    }

    /// Addresses remembered now.
    pub fn len(&self) -> usize {
        self.failures.len()
    }

    /// True when no address is remembered.
    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The file at `path` (named by config `key`) parsed with `parse`; None
/// when no file is named.
fn load_file<T, E: std::fmt::Display>(
    key: &'static str,
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<Option<T>, AuthError> {
    load(
        key,
        path,
        |p| std::fs::read_to_string(p),
        |t: String| parse(&t),
    )
}

/// [`load_file`] for a file of bytes (a key, a secret).
fn load_bytes<T, E: std::fmt::Display>(
    key: &'static str,
    path: &Path,
    parse: impl FnOnce(&[u8]) -> Result<T, E>,
) -> Result<Option<T>, AuthError> {
    load(key, path, |p| std::fs::read(p), |b: Vec<u8>| parse(&b))
}

/// The file at `path` read with `read` and parsed with `parse`, errors
/// named by the config `key`; None when no file is named.
fn load<C, T, E: std::fmt::Display>(
    key: &'static str,
    path: &Path,
    read: fn(&Path) -> std::io::Result<C>,
    parse: impl FnOnce(C) -> Result<T, E>,
) -> Result<Option<T>, AuthError> {
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let shown = || path.display().to_string();
    let text = read(path).map_err(|source| AuthError::Read {
        key,
        path: shown(),
        source,
    })?;
    let parsed = parse(text).map_err(|e| AuthError::Parse {
        key,
        path: shown(),
        why: e.to_string(),
    })?;
    Ok(Some(parsed))
}

/// A user name for a log line.
pub fn user_for_log(username: Option<&str>) -> String {
    match username {
        Some(u) => quote(u).to_string(),
        None => "(anonymous)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(passwords: Option<&str>, allow_anonymous: Option<bool>) -> Auth {
        Auth {
            passwords: passwords.map(|t| Passwords::parse(t).unwrap()),
            acl: None,
            tokens: None,
            allow_anonymous,
            clients: Default::default(),
        }
    }

    #[test]
    fn refusals_from_one_address_slow_down_and_start_afresh() {
        let mut t = LoginThrottle::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let delays: Vec<u128> = (0..10).map(|_| t.failed(ip, t0).as_millis()).collect();
        assert_eq!(delays, [0, 0, 0, 250, 500, 1000, 2000, 4000, 8000, 8000]);
        assert_eq!(t.failed(other, t0), Duration::ZERO, "per address");
        assert_eq!(
            t.failed(ip, t0 + FAILURE_MEMORY),
            Duration::ZERO,
            "forgotten"
        );
        for _ in 0..5 {
            t.failed(ip, t0);
        }
        t.succeeded(ip);
        assert_eq!(t.failed(ip, t0), Duration::ZERO, "a success starts afresh");
        t.forget_before(t0 + FAILURE_MEMORY, FAILURE_MEMORY);
        assert!(t.is_empty());
    }

    #[test]
    fn the_throttle_table_is_bounded() {
        let mut t = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..FAILURE_ADDRESSES_MAX as u32 {
            t.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert_eq!(t.len(), FAILURE_ADDRESSES_MAX);
        t.failed("255.0.0.1".parse().unwrap(), t0);
        assert_eq!((t.len(), t.untracked), (FAILURE_ADDRESSES_MAX, 1));
        // A minute later the old ones make room.
        t.failed("255.0.0.1".parse().unwrap(), t0 + Duration::from_secs(61));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_default_lets_anonymous_clients_in_on_loopback_only() {
        let a = auth(None, None);
        assert_eq!(a.login(true, "c", None, None, 0), Ok(Grant::default()));
        assert_eq!(
            a.login(false, "c", None, None, 0),
            Err(Refused::NotAuthorized)
        );
        assert_eq!(
            a.login(false, "c", Some("any"), Some(b"x"), 0),
            Ok(Grant::default())
        );
        assert_eq!(
            auth(None, Some(true)).login(false, "c", None, None, 0),
            Ok(Grant::default())
        );
        assert_eq!(
            auth(None, Some(false)).login(true, "c", None, None, 0),
            Err(Refused::NotAuthorized)
        );
    }

    #[test]
    fn a_password_file_refuses_wrong_passwords_and_anonymous_clients() {
        let salt = [7u8; passwd::SALT_BYTES];
        let line = format!("u:{}\n", passwd::hash_pbkdf2(b"pw", &salt));
        let a = auth(Some(&line), None);
        assert_eq!(
            a.login(true, "c", Some("u"), Some(b"pw"), 0),
            Ok(Grant::default())
        );
        assert_eq!(
            a.login(true, "c", Some("u"), Some(b"px"), 0),
            Err(Refused::BadCredentials)
        );
        assert_eq!(
            a.login(true, "c", Some("u"), None, 0),
            Err(Refused::BadCredentials)
        );
        assert_eq!(
            a.login(true, "c", Some("v"), Some(b"pw"), 0),
            Err(Refused::BadCredentials)
        );
        assert_eq!(
            a.login(true, "c", None, None, 0),
            Err(Refused::NotAuthorized)
        );
        let open = auth(Some(&line), Some(true));
        assert_eq!(open.login(false, "c", None, None, 0), Ok(Grant::default()));
        assert_eq!(
            open.login(false, "c", Some("u"), Some(b"px"), 0),
            Err(Refused::BadCredentials)
        );
    }

    #[test]
    fn with_jwt_keys_a_user_name_needs_a_token_and_a_good_one_lets_in() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let keys = TokenKeys::from_parts(Some(secret), None, Default::default(), "acl").unwrap();
        let a = Auth {
            tokens: Some(keys),
            ..auth(None, None)
        };
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"exp": 100}),
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap();
        let grant = a.login(false, "c", Some("u"), Some(token.as_bytes()), 40);
        assert_eq!(grant.unwrap().valid_for, Some(Duration::from_secs(60)));
        assert!(matches!(
            a.login(false, "c", Some("u"), Some(token.as_bytes()), 100),
            Err(Refused::BadToken(_))
        ));
        assert_eq!(
            a.login(false, "c", Some("u"), Some(b"guess"), 40),
            Err(Refused::BadCredentials)
        );
        assert_eq!(
            a.login(true, "c", None, None, 40),
            Err(Refused::NotAuthorized),
            "no anonymous clients by default, loopback or not"
        );
    }
}
