//! JSON Web Tokens as passwords, as EMQX's JWT authentication: a CONNECT
//! whose password is a token signed with a configured key logs in; the
//! token's `exp` ends the connection when it passes, and an ACL claim can
//! name the client's topics.
//!
//! Keys are read once (and again on reload) by [`TokenKeys::load`], the
//! module's only I/O, and shared read-only by every shard; a token is
//! checked on the shard that accepted the connection, and what it grants
//! ([`Grant`]) travels with the connection to its home shard.
//!
//! - **Keys**: `auth.jwt_secret_file` (HS256, HS384, HS512; at least 32
//!   bytes, RFC 7518 3.2) and `auth.jwt_public_key_file` (PEM public keys:
//!   RSA for RS* and PS*, EC P-256 / P-384 for ES256 / ES384, Ed25519 for
//!   EdDSA; several keys in one file, for rotation). A token is tried with
//!   every key of its algorithm's kind; a token whose algorithm has no key
//!   is refused (no `none`, and no HMAC with a public key).
//! - **Time**: `nbf` in the future or `exp` passed refuses the login; a
//!   token without `exp` never expires. No leeway: the broker's clock is
//!   the judge.
//! - **Claims that must match** (`auth.jwt_verify_claims`): claim name →
//!   value, with `%c` the client id and `%u` the user name.
//! - **ACL claim** (`auth.jwt_acl_claim`, default `acl`): an object
//!   `{"pub": [...], "sub": [...], "all": [...]}` of topic filters (EMQX's
//!   first form), `%c` / `%u` (or `${clientid}` / `${username}`) filled
//!   in. With it, the client may publish and receive exactly those topics
//!   and the ACL file does not apply to it; without it, the ACL file does.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::acl::Access;
use super::AuthError;

/// Longest password taken for a token, bytes (longer is not one).
pub const TOKEN_BYTES_MAX: usize = 16 * 1024;
/// Most topic filters an ACL claim may hold.
pub const ACL_RULES_MAX: usize = 256;
/// Shortest HMAC secret, bytes (RFC 7518 3.2: a key as long as the hash).
pub const SECRET_BYTES_MIN: usize = 32;
/// Longest text a placeholder template may fill in to, bytes (a topic
/// filter's limit): a template with many `%u` and a long user name cannot
/// make more.
pub const FILLED_BYTES_MAX: usize = 65_535;

/// The rules of a token's ACL claim: topic filter and access, with the
/// placeholders filled in.
pub type TokenRules = Vec<(String, Access)>;

/// What a verified login grants beyond the login itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// How long until the token's `exp`; None: no `exp` (or no token).
    pub valid_for: Option<Duration>,
    /// The ACL claim's rules; None: no claim (the ACL file applies).
    pub rules: Option<Arc<TokenRules>>,
    /// The login did not prove the user name (a token whose claims do
    /// not bind `%u`): the ACL file and `client_id_users` see the client
    /// as anonymous, whatever user name it sent.
    pub user_unverified: bool,
}

/// Which algorithms a public key verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    Ec,
    Ed,
}

/// The configured keys and claim rules.
pub struct TokenKeys {
    secret: Option<DecodingKey>,
    public: Vec<(KeyKind, DecodingKey)>,
    verify_claims: BTreeMap<String, String>,
    acl_claim: String,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("secret", &self.secret.is_some())
            .field("public", &self.public.len())
            .finish()
    }
}

/// True when `password` has a token's shape: three base64url parts, the
/// first a JSON header naming an algorithm this module knows.
pub fn is_token(password: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(password) else {
        return false;
    };
    s.len() <= TOKEN_BYTES_MAX
        && s.bytes().filter(|&b| b == b'.').count() == 2
        && jsonwebtoken::decode_header(s).is_ok()
}

impl TokenKeys {
    /// The keys the config names, or None when it names none.
    pub fn load(config: &crate::config::AuthConfig) -> Result<Option<TokenKeys>, AuthError> {
        let secret = super::load_bytes("auth.jwt_secret_file", &config.jwt_secret_file, |b| {
            let trimmed = trim_newline(b);
            match trimmed.len() {
                n if n < SECRET_BYTES_MIN => Err(format!(
                    "{n} bytes; an HMAC secret needs at least {SECRET_BYTES_MIN}"
                )),
                _ => Ok(DecodingKey::from_secret(trimmed)),
            }
        })?;
        let public = super::load_bytes(
            "auth.jwt_public_key_file",
            &config.jwt_public_key_file,
            public_keys,
        )?
        .unwrap_or_default();
        if secret.is_none() && public.is_empty() {
            return Ok(None);
        }
        Ok(Some(TokenKeys {
            secret,
            public,
            verify_claims: config.jwt_verify_claims.clone(),
            acl_claim: config.jwt_acl_claim.clone(),
        }))
    }

    /// Keys from text, for tests and benchmarks: an HMAC secret and PEM
    /// public keys, claim rules as in the config.
    pub fn from_parts(
        secret: Option<&[u8]>,
        public_pem: Option<&[u8]>,
        verify_claims: BTreeMap<String, String>,
        acl_claim: &str,
    ) -> Result<TokenKeys, String> {
        Ok(TokenKeys {
            secret: secret.map(DecodingKey::from_secret),
            public: match public_pem {
                Some(pem) => public_keys(pem)?,
                None => Vec::new(),
            },
            verify_claims,
            acl_claim: acl_claim.to_string(),
        })
    }

    /// How many keys are configured (for the start-up line).
    pub fn len(&self) -> usize {
        usize::from(self.secret.is_some()) + self.public.len()
    }

    /// Always false: a `TokenKeys` exists only with a key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when `jwt_verify_claims` ties a claim to the user name, so a
    /// token proves it.
    pub fn binds_user(&self) -> bool {
        self.binds(&["%u", "${username}"])
    }

    /// True when `jwt_verify_claims` ties a claim to the client id.
    pub fn binds_client_id(&self) -> bool {
        self.binds(&["%c", "${clientid}"])
    }

    fn binds(&self, placeholders: &[&str]) -> bool {
        self.verify_claims
            .values()
            .any(|t| placeholders.iter().any(|p| t.contains(p)))
    }

    /// Verify `token` for client `client_id` logging in as `username`, at
    /// `unix_now` (seconds). Err: why not, for the log.
    pub fn verify(
        &self,
        token: &[u8],
        client_id: &str,
        username: Option<&str>,
        unix_now: u64,
    ) -> Result<Grant, String> {
        let token = std::str::from_utf8(token).map_err(|_| "not UTF-8".to_string())?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a token: {e}"))?;
        let kind = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Some(KeyKind::Rsa),
            Algorithm::ES256 | Algorithm::ES384 => Some(KeyKind::Ec),
            Algorithm::EdDSA => Some(KeyKind::Ed),
        };
        let keys: Vec<&DecodingKey> = match kind {
            None => self.secret.iter().collect(),
            Some(k) => self
                .public
                .iter()
                .filter(|(kind, _)| *kind == k)
                .map(|(_, key)| key)
                .collect(),
        };
        if keys.is_empty() {
            return Err(format!("no key for {:?}", header.alg));
        }
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = false; // checked below, against `unix_now`
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let claims = keys
            .iter()
            .find_map(|key| {
                jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation).ok()
            })
            .ok_or_else(|| format!("bad {:?} signature, or unreadable claims", header.alg))?
            .claims;
        if let Some(nbf) = seconds(&claims, "nbf")? {
            if nbf > unix_now {
                return Err(format!("not valid for {} s yet (nbf)", nbf - unix_now));
            }
        }
        let valid_for = match seconds(&claims, "exp")? {
            Some(exp) if exp <= unix_now => {
                return Err(format!("expired {} s ago (exp)", unix_now - exp))
            }
            Some(exp) => Some(Duration::from_secs(exp - unix_now)),
            None => None,
        };
        for (claim, template) in &self.verify_claims {
            let want = fill(template, Some(client_id), username).ok_or_else(|| {
                format!("claim {claim}: no user name for %u, or more than {FILLED_BYTES_MAX} bytes")
            })?;
            match claims.get(claim) {
                Some(Value::String(got)) if *got == want => {}
                _ => {
                    return Err(format!(
                        "claim {claim} is not {}",
                        crate::text::quote(&want)
                    ))
                }
            }
        }
        // The ACL claim's placeholders take only what the token proves.
        let user_bound = self.binds_user();
        let id = self.binds_client_id().then_some(client_id);
        let user = username.filter(|_| user_bound);
        let rules = match claims.get(&self.acl_claim) {
            None => None,
            Some(v) => Some(Arc::new(
                acl_rules(v, id, user).map_err(|why| format!("claim {}: {why}", self.acl_claim))?,
            )),
        };
        Ok(Grant {
            valid_for,
            rules,
            user_unverified: !user_bound,
        })
    }
}

/// A claim that is a time in Unix seconds (a JSON number), if present.
fn seconds(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, String> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => match (v.as_u64(), v.as_f64()) {
            (Some(s), _) => Ok(Some(s)),
            (None, Some(f)) if f >= 0.0 => Ok(Some(f as u64)),
            _ => Err(format!("{name} is not a time in seconds")),
        },
    }
}

/// The placeholders, and which value each stands for (true: the user
/// name).
const PLACEHOLDERS: [(&str, bool); 4] = [
    ("%c", false),
    ("${clientid}", false),
    ("%u", true),
    ("${username}", true),
];

/// True when `template` holds a placeholder.
fn has_placeholder(template: &str) -> bool {
    PLACEHOLDERS.iter().any(|(p, _)| template.contains(p))
}

/// `template` with `%c` / `${clientid}` the client id and `%u` /
/// `${username}` the user name, in one pass (a value filled in is never
/// read again as a template); None when it needs a value that is None, or
/// would pass [`FILLED_BYTES_MAX`].
fn fill(template: &str, client_id: Option<&str>, username: Option<&str>) -> Option<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['%', '$']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        match PLACEHOLDERS.iter().find(|(p, _)| tail.starts_with(p)) {
            Some((p, user)) => {
                let value = if *user { username? } else { client_id? };
                if out.len() + value.len() > FILLED_BYTES_MAX {
                    return None;
                }
                out.push_str(value);
                rest = &tail[p.len()..];
            }
            None => {
                out.push_str(&tail[..1]); // '%' or '$': one byte
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    (out.len() <= FILLED_BYTES_MAX).then_some(out)
}

/// The rules of an ACL claim `{"pub": [...], "sub": [...], "all": [...]}`.
/// A filter that needs a value not given (None: the token does not prove
/// it) is left out, as are filters with placeholders when the client id
/// or user name holds a wildcard (as the ACL file's patterns do).
fn acl_rules(
    v: &Value,
    client_id: Option<&str>,
    username: Option<&str>,
) -> Result<TokenRules, String> {
    let Value::Object(map) = v else {
        return Err("not an object of pub, sub and all lists".into());
    };
    let dangerous = |s: &str| s.contains(['+', '#']);
    let refuse_placeholders = client_id.is_some_and(dangerous) || username.is_some_and(dangerous);
    let mut rules = TokenRules::new();
    for (key, list) in map {
        let access = match key.as_str() {
            "pub" => Access::Write,
            "sub" => Access::Read,
            "all" => Access::ReadWrite,
            other => return Err(format!("{other:?} is not pub, sub or all")),
        };
        let Value::Array(filters) = list else {
            return Err(format!("{key} is not a list"));
        };
        for f in filters {
            let Value::String(f) = f else {
                return Err(format!("{key}: {f} is not a topic filter"));
            };
            if has_placeholder(f) && refuse_placeholders {
                continue;
            }
            let Some(filter) = fill(f, client_id, username) else {
                continue;
            };
            crate::router::topic::validate_topic_filter(&filter, usize::MAX)
                .map_err(|e| format!("{key}: {}: {e}", crate::text::quote(&filter)))?;
            if rules.len() == ACL_RULES_MAX {
                return Err(format!("more than {ACL_RULES_MAX} topic filters"));
            }
            rules.push((filter, access));
        }
    }
    Ok(rules)
}

/// Every key in a PEM file: `PUBLIC KEY` blocks (RSA, EC or Ed25519, told
/// apart by trying each) and `RSA PUBLIC KEY` blocks.
fn public_keys(text: &[u8]) -> Result<Vec<(KeyKind, DecodingKey)>, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("not PEM: {e}"))?;
    if blocks.is_empty() {
        return Err("no PEM block".into());
    }
    let mut keys = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        let one = pem::encode(block);
        let key = match block.tag() {
            "RSA PUBLIC KEY" => DecodingKey::from_rsa_pem(one.as_bytes())
                .ok()
                .map(|k| (KeyKind::Rsa, k)),
            "PUBLIC KEY" => DecodingKey::from_rsa_pem(one.as_bytes())
                .map(|k| (KeyKind::Rsa, k))
                .or_else(|_| DecodingKey::from_ec_pem(one.as_bytes()).map(|k| (KeyKind::Ec, k)))
                .or_else(|_| DecodingKey::from_ed_pem(one.as_bytes()).map(|k| (KeyKind::Ed, k)))
                .ok(),
            _ => None,
        };
        match key {
            Some(k) => keys.push(k),
            None => {
                return Err(format!(
                    "block {} ({}) is not an RSA, EC or Ed25519 public key",
                    i + 1,
                    block.tag()
                ))
            }
        }
    }
    Ok(keys)
}

/// `bytes` without one final `\n` or `\r\n`.
fn trim_newline(bytes: &[u8]) -> &[u8] {
    let b = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    b.strip_suffix(b"\r").unwrap_or(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn hs(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn keys(verify: &[(&str, &str)]) -> TokenKeys {
        let claims = verify
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TokenKeys::from_parts(Some(SECRET), None, claims, "acl").unwrap()
    }

    #[test]
    fn time_claims_decide_and_exp_sets_the_connection_s_end() {
        let k = keys(&[]);
        let ok = k.verify(hs(json!({"exp": NOW + 60})).as_bytes(), "c", Some("u"), NOW);
        assert_eq!(ok.unwrap().valid_for, Some(Duration::from_secs(60)));
        let never = k.verify(hs(json!({"sub": "x"})).as_bytes(), "c", None, NOW);
        assert_eq!(
            never.unwrap(),
            Grant {
                user_unverified: true,
                ..Grant::default()
            },
            "nothing binds the user name"
        );
        for (claims, why) in [
            (json!({"exp": NOW}), "expired"),
            (json!({"nbf": NOW + 5}), "not valid"),
            (json!({"exp": "soon"}), "not a time"),
        ] {
            let e = k.verify(hs(claims).as_bytes(), "c", None, NOW).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_wrong_secret_another_algorithm_or_garbage_is_refused() {
        let k = keys(&[]);
        let other = encode(
            &Header::new(Algorithm::HS256),
            &json!({}),
            &EncodingKey::from_secret(b"another secret, also 32 bytes long!"),
        )
        .unwrap();
        assert!(k
            .verify(other.as_bytes(), "c", None, NOW)
            .unwrap_err()
            .contains("signature"));
        // ES256 with no public key configured: refused, whatever it says.
        let ec = rcgen::KeyPair::generate().unwrap();
        let es = encode(
            &Header::new(Algorithm::ES256),
            &json!({}),
            &EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(k
            .verify(es.as_bytes(), "c", None, NOW)
            .unwrap_err()
            .contains("no key"));
        for junk in [&b"a.b.c"[..], b"\xff", b"password"] {
            assert!(k.verify(junk, "c", None, NOW).is_err());
            assert!(!is_token(junk));
        }
        // alg "none" is no algorithm here.
        let none = "eyJhbGciOiJub25lIn0.e30.";
        assert!(!is_token(none.as_bytes()));
        assert!(k.verify(none.as_bytes(), "c", None, NOW).is_err());
        assert!(is_token(hs(json!({})).as_bytes()));
    }

    #[test]
    fn public_keys_verify_their_algorithms_and_an_hmac_made_with_one_fails() {
        let ec = rcgen::KeyPair::generate().unwrap();
        let public = ec.public_key_pem();
        let k =
            TokenKeys::from_parts(None, Some(public.as_bytes()), BTreeMap::new(), "acl").unwrap();
        let es = encode(
            &Header::new(Algorithm::ES256),
            &json!({"exp": NOW + 1}),
            &EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(k.verify(es.as_bytes(), "c", None, NOW).is_ok());
        // The classic confusion: HS256 keyed with the public key's text.
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &json!({}),
            &EncodingKey::from_secret(public.as_bytes()),
        )
        .unwrap();
        assert!(k.verify(confused.as_bytes(), "c", None, NOW).is_err());
        let rsa = TokenKeys::from_parts(None, Some(RSA_PUBLIC.as_bytes()), BTreeMap::new(), "acl")
            .unwrap();
        let rs = encode(
            &Header::new(Algorithm::RS256),
            &json!({}),
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(rsa.verify(rs.as_bytes(), "c", None, NOW).is_ok());
        assert!(
            k.verify(rs.as_bytes(), "c", None, NOW).is_err(),
            "no RSA key there"
        );
        assert!(
            public_keys(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err()
        );
    }

    #[test]
    fn claims_must_match_the_client() {
        let k = keys(&[("clientid", "%c"), ("username", "${username}")]);
        let t = hs(json!({"clientid": "dev-1", "username": "alice"}));
        assert!(k.verify(t.as_bytes(), "dev-1", Some("alice"), NOW).is_ok());
        assert!(k.verify(t.as_bytes(), "dev-2", Some("alice"), NOW).is_err());
        assert!(k.verify(t.as_bytes(), "dev-1", Some("bob"), NOW).is_err());
        assert!(k.verify(t.as_bytes(), "dev-1", None, NOW).is_err());
    }

    #[test]
    fn the_acl_claim_names_the_topics() {
        let k = keys(&[("clientid", "%c")]);
        let t = hs(json!({"clientid": "dev-1", "acl": {
            "pub": ["up/%c"], "sub": ["down/${clientid}/#", "u/%u"], "all": ["shared/+"]
        }}));
        let g = k.verify(t.as_bytes(), "dev-1", Some("alice"), NOW).unwrap();
        assert!(g.user_unverified, "nothing binds the user name");
        let rules = g.rules.unwrap();
        assert_eq!(
            *rules,
            vec![
                ("shared/+".to_string(), Access::ReadWrite),
                ("up/dev-1".to_string(), Access::Write),
                ("down/dev-1/#".to_string(), Access::Read),
            ],
            "u/%u left out: the token does not prove the user name"
        );
        let t = hs(json!({"clientid": "dev+1", "acl": {
            "pub": ["up/%c"], "all": ["shared/+"]
        }}));
        let g = k.verify(t.as_bytes(), "dev+1", None, NOW).unwrap();
        assert_eq!(
            g.rules.unwrap().len(),
            1,
            "no placeholders for a wildcard id"
        );
        for bad in [
            json!({"acl": [{"permission": "allow"}]}),
            json!({"acl": {"pub": "x"}}),
            json!({"acl": {"pub": [1]}}),
            json!({"acl": {"publish": ["x"]}}),
            json!({"acl": {"pub": ["a/#/b"]}}),
            json!({"acl": {"sub": vec!["t"; ACL_RULES_MAX + 1]}}),
        ] {
            assert!(
                k.verify(hs(bad.clone()).as_bytes(), "c", None, NOW)
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn placeholders_take_only_what_the_token_proves() {
        // No claim binds the client id or the user name: a client may send
        // any, so filters that use them are left out.
        let k = keys(&[]);
        let t = hs(json!({"acl": {"sub": ["d/%c/#", "u/${username}/#", "open"]}}));
        let g = k.verify(t.as_bytes(), "dev-1", Some("$SYS"), NOW).unwrap();
        assert_eq!(*g.rules.unwrap(), vec![("open".to_string(), Access::Read)]);
        assert!(g.user_unverified);
        let k = keys(&[("username", "%u")]);
        let t = hs(json!({"username": "alice", "acl": {"sub": ["u/%u/#"]}}));
        let g = k.verify(t.as_bytes(), "dev-1", Some("alice"), NOW).unwrap();
        assert_eq!(
            *g.rules.unwrap(),
            vec![("u/alice/#".to_string(), Access::Read)]
        );
        assert!(!g.user_unverified);
    }

    #[test]
    fn filling_in_is_one_pass_and_bounded() {
        // A value that looks like a placeholder stays as it is.
        assert_eq!(
            fill("%c/%u", Some("%u"), Some("${clientid}")).unwrap(),
            "%u/${clientid}"
        );
        assert_eq!(fill("100%/$x", Some("c"), None).unwrap(), "100%/$x");
        assert_eq!(fill("%u", Some("c"), None), None);
        // Many placeholders and a long value: refused, not built.
        let user = "${username}".repeat(5957);
        assert_eq!(fill(&"%u".repeat(128), Some("c"), Some(&user)), None);
    }

    /// A 2048-bit RSA key made for these tests (`openssl genrsa 2048`).
    const RSA_PRIVATE: &str = include_str!("testdata/rsa-private.pem");
    const RSA_PUBLIC: &str = include_str!("testdata/rsa-public.pem");
}
