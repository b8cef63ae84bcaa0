//! Who may connect, and what each client may read and write: Mosquitto's
//! password file ([`passwd`]) and ACL file ([`acl`]), and the default
//! policy for anonymous clients.
//!
//! Loaded once at start by the broker (files read here, the only I/O of
//! the module) and shared read-only by every shard as one `Arc<Auth>`:
//! a CONNECT is checked on the shard that accepted it, and the
//! connection's [`acl::ClientAcl`] lives with its session on its home
//! shard.

pub mod acl;
pub mod clients;
pub mod passwd;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::AuthConfig;
use crate::hash::HashMap;
use crate::text::quote;

pub use acl::{Acl, ClientAcl, Want};
pub use passwd::Passwords;

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// An unknown user name or a wrong password (5.0 0x86, 3.1.1 code 4).
    BadCredentials,
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

    /// Check a CONNECT's user name and password; `loopback`: it arrived
    /// on a loopback address.
    pub fn login(
        &self,
        loopback: bool,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<(), Refused> {
        match (username, &self.passwords) {
            (Some(u), Some(p)) => match p.verify(u, password.unwrap_or_default()) {
                true => Ok(()),
                false => Err(Refused::BadCredentials),
            },
            // Without a password file a user name is taken as given.
            (Some(_), None) => Ok(()),
            (None, _) if self.anonymous_allowed(loopback) => Ok(()),
            (None, _) => Err(Refused::NotAuthorized),
        }
    }

    /// True when a client without a user name may connect (`loopback`:
    /// on a loopback address).
    pub fn anonymous_allowed(&self, loopback: bool) -> bool {
        match self.allow_anonymous {
            Some(allowed) => allowed,
            None => loopback && self.passwords.is_none(),
        }
    }

    /// The rules of a client, or None when no ACL file is configured
    /// (everything allowed).
    pub fn client_acl(&self, client_id: &str, username: Option<&str>) -> Option<ClientAcl> {
        self.acl.as_ref().map(|a| a.for_client(client_id, username))
    }

    /// The start-up log line: what is checked, and who may connect.
    pub fn describe(&self) -> String {
        let users = match &self.passwords {
            Some(p) => format!("{} users in the password file", p.len()),
            None => "no password file (any user name accepted)".to_string(),
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
            None if self.passwords.is_some() => {
                "anonymous clients refused (a password file is configured)"
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
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let shown = || path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        key,
        path: shown(),
        source,
    })?;
    let parsed = parse(&text).map_err(|e| AuthError::Parse {
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
        assert_eq!(a.login(true, None, None), Ok(()));
        assert_eq!(a.login(false, None, None), Err(Refused::NotAuthorized));
        assert_eq!(a.login(false, Some("any"), Some(b"x")), Ok(()));
        assert_eq!(auth(None, Some(true)).login(false, None, None), Ok(()));
        assert_eq!(
            auth(None, Some(false)).login(true, None, None),
            Err(Refused::NotAuthorized)
        );
    }

    #[test]
    fn a_password_file_refuses_wrong_passwords_and_anonymous_clients() {
        let salt = [7u8; passwd::SALT_BYTES];
        let line = format!("u:{}\n", passwd::hash_pbkdf2(b"pw", &salt));
        let a = auth(Some(&line), None);
        assert_eq!(a.login(true, Some("u"), Some(b"pw")), Ok(()));
        assert_eq!(
            a.login(true, Some("u"), Some(b"px")),
            Err(Refused::BadCredentials)
        );
        assert_eq!(a.login(true, Some("u"), None), Err(Refused::BadCredentials));
        assert_eq!(
            a.login(true, Some("v"), Some(b"pw")),
            Err(Refused::BadCredentials)
        );
        assert_eq!(a.login(true, None, None), Err(Refused::NotAuthorized));
        let open = auth(Some(&line), Some(true));
        assert_eq!(open.login(false, None, None), Ok(()));
        assert_eq!(
            open.login(false, Some("u"), Some(b"px")),
            Err(Refused::BadCredentials)
        );
    }
}
