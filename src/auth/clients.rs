//! Who may connect before any password is looked at: client id patterns
//! allowed or denied, source networks allowed or denied, and client ids
//! bound to one user.
//!
//! Sans-IO: the rules come from `[auth]` and are checked for each CONNECT
//! on the shard that reads it.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::AuthConfig;

/// Why a connection is refused by these rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRefusal {
    /// Its address is not allowed (5.0 0x8A banned; 3.1.1 code 5).
    Address,
    /// Its client id is not allowed (0x85; 3.1.1 code 2).
    ClientId,
    /// Its client id is bound to another user (0x87; 3.1.1 code 5).
    BoundToOther(String),
}

/// The rules of `[auth]` about client ids and addresses.
#[derive(Debug, Clone, Default)]
pub struct ClientRules {
    id_allow: Vec<String>,
    id_deny: Vec<String>,
    net_allow: Vec<IpNet>,
    net_deny: Vec<IpNet>,
    /// Client id pattern → the only user that may use it.
    bound: Vec<(String, String)>,
}

impl ClientRules {
    /// The rules `config` gives (already validated).
    pub fn new(config: &AuthConfig) -> ClientRules {
        ClientRules {
            id_allow: config.client_id_allow.clone(),
            id_deny: config.client_id_deny.clone(),
            net_allow: config.address_allow.clone(),
            net_deny: config.address_deny.clone(),
            bound: config
                .client_id_users
                .iter()
                .map(|(p, u)| (p.clone(), u.clone()))
                .collect(),
        }
    }

    /// True when no rule is set.
    pub fn is_empty(&self) -> bool {
        self.id_allow.is_empty()
            && self.id_deny.is_empty()
            && self.net_allow.is_empty()
            && self.net_deny.is_empty()
            && self.bound.is_empty()
    }

    /// Check a CONNECT from `ip` (None: unknown, refused by any address
    /// rule) for `client_id` (None: the broker assigns one, which no id
    /// rule concerns) as `username`.
    pub fn check(
        &self,
        ip: Option<IpAddr>,
        client_id: Option<&str>,
        username: Option<&str>,
    ) -> Result<(), ClientRefusal> {
        if !self.net_allow.is_empty() || !self.net_deny.is_empty() {
            let Some(ip) = ip.map(|i| i.to_canonical()) else {
                return Err(ClientRefusal::Address);
            };
            let denied = self.net_deny.iter().any(|n| n.contains(&ip));
            let allowed =
                self.net_allow.is_empty() || self.net_allow.iter().any(|n| n.contains(&ip));
            if denied || !allowed {
                return Err(ClientRefusal::Address);
            }
        }
        let Some(id) = client_id else {
            return Ok(());
        };
        let denied = self.id_deny.iter().any(|p| glob(p, id));
        let allowed = self.id_allow.is_empty() || self.id_allow.iter().any(|p| glob(p, id));
        if denied || !allowed {
            return Err(ClientRefusal::ClientId);
        }
        for (pattern, user) in &self.bound {
            if glob(pattern, id) && username != Some(user.as_str()) {
                return Err(ClientRefusal::BoundToOther(user.clone()));
            }
        }
        Ok(())
    }
}

/// True when `text` matches `pattern`, where `*` stands for any run of
/// characters (none included) and every other character for itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("sensor-*", "sensor-12"));
        assert!(glob("sensor-*", "sensor-"));
        assert!(!glob("sensor-*", "sensor"));
        assert!(glob("*-gw-*", "eu-gw-7"));
        assert!(glob("a*b*c", "abbbc"));
        assert!(!glob("a*b*c", "abbb"));
        assert!(glob("*", ""));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }

    fn rules(text: &str) -> ClientRules {
        let c = crate::Config::from_toml(&format!("[auth]\n{text}")).unwrap();
        ClientRules::new(&c.auth)
    }

    #[test]
    fn addresses_ids_and_bindings() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let r = rules(
            "address_allow = [\"10.0.0.0/8\", \"127.0.0.1/32\"]\naddress_deny = [\"10.9.0.0/16\"]\n\
             client_id_allow = [\"dev-*\", \"gw-*\"]\nclient_id_deny = [\"dev-bad*\"]\n\
             client_id_users = { \"gw-*\" = \"gateway\" }\n",
        );
        assert_eq!(r.check(ip("10.1.2.3"), Some("dev-1"), None), Ok(()));
        assert_eq!(r.check(ip("::ffff:127.0.0.1"), Some("dev-1"), None), Ok(()));
        assert_eq!(
            r.check(ip("10.9.1.1"), Some("dev-1"), None),
            Err(ClientRefusal::Address)
        );
        assert_eq!(
            r.check(ip("192.168.1.1"), Some("dev-1"), None),
            Err(ClientRefusal::Address)
        );
        assert_eq!(
            r.check(None, Some("dev-1"), None),
            Err(ClientRefusal::Address)
        );
        assert_eq!(
            r.check(ip("10.1.2.3"), Some("other"), None),
            Err(ClientRefusal::ClientId)
        );
        assert_eq!(
            r.check(ip("10.1.2.3"), Some("dev-bad1"), None),
            Err(ClientRefusal::ClientId)
        );
        assert_eq!(
            r.check(ip("10.1.2.3"), None, None),
            Ok(()),
            "an assigned id"
        );
        assert_eq!(
            r.check(ip("10.1.2.3"), Some("gw-1"), Some("gateway")),
            Ok(())
        );
        assert_eq!(
            r.check(ip("10.1.2.3"), Some("gw-1"), Some("mallory")),
            Err(ClientRefusal::BoundToOther("gateway".into()))
        );
        assert!(rules("").is_empty());
        assert_eq!(rules("").check(None, Some("x"), None), Ok(()));
    }
}
