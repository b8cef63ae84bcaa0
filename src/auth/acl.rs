//! Mosquitto's `acl_file`, unchanged grammar and meaning: which topics a
//! client may read (receive, subscribe) and write (publish).
//!
//! Sans-IO: text in, rules out. Loaded once (and again on reload) and
//! shared read-only by every shard; each connection gets a [`ClientAcl`]
//! at CONNECT, on its home shard, with the patterns filled in for it.
//!
//! The grammar, line by line (leading whitespace ignored; `#` starts a
//! comment line; blank lines skipped):
//!
//! - `user NAME`: the `topic` lines that follow apply to the client
//!   logged in as NAME (the name is the rest of the line, spaces
//!   included);
//! - `topic [read|write|readwrite|deny] TOPIC`: one rule (no access word:
//!   readwrite). Before any `user` line the rules apply to anonymous
//!   clients (no user name);
//! - `pattern [read|write|readwrite|deny] TOPIC`: a rule for every client,
//!   with `%c` replaced by its client id and `%u` by its user name (a
//!   client without a user name skips the patterns that use `%u`).
//!
//! The check, as Mosquitto's default ACL check does it: a client's own
//! rules (its user's, or the anonymous ones), then the patterns; in each
//! list a matching `deny` refuses, a matching rule with the access allows;
//! nothing matching refuses. A rule matches a `$` topic only if it starts
//! with `$` itself. A client whose id or user name holds `+` or `#` is
//! refused by every pattern (it could make a pattern match what it should
//! not).
//!
//! Rules are indexed by filter in a [`FilterTrie`], so a check walks the
//! topic's levels, not the file's lines.

use std::sync::Arc;

use crate::hash::HashMap;
use crate::router::topic::validate_topic_filter;
use crate::router::FilterTrie;

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Receive and subscribe.
    Read,
    /// Publish.
    Write,
    /// Both.
    ReadWrite,
    /// Nothing: refuses both, whatever else matches.
    Deny,
}

impl Access {
    fn grants(self, want: Want) -> bool {
        matches!(
            (self, want),
            (Access::ReadWrite, _) | (Access::Read, Want::Read) | (Access::Write, Want::Write)
        )
    }
}

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Receive it (a delivery, or a SUBSCRIBE's filter).
    Read = 0,
    /// Publish to it.
    Write = 1,
}

/// One list of rules (a user's, the anonymous block, or the patterns
/// filled in for one client), indexed by filter.
#[derive(Default)]
struct Rules {
    trie: FilterTrie<u32, Access>,
    /// The same rules in file order, for SUBSCRIBE's wildcard filters.
    list: Vec<(String, Access)>,
}

impl Rules {
    fn push(&mut self, filter: &str, access: Access) {
        let n = self.list.len() as u32;
        self.trie.insert(filter, n, access);
        self.list.push((filter.to_string(), access));
    }

    /// Some(verdict) when a rule decides `topic` (a topic name).
    fn check_topic(&self, topic: &str, want: Want) -> Option<bool> {
        let mut verdict = None;
        self.trie.for_each_match(topic, |_, &access| match access {
            Access::Deny => verdict = Some(false),
            a if a.grants(want) && verdict.is_none() => verdict = Some(true),
            _ => {}
        });
        verdict
    }

    /// Some(verdict) when a rule decides SUBSCRIBE `filter`: a `deny` rule
    /// that covers every topic of the filter refuses it; a rule that
    /// grants reading some topic of the filter allows it (Mosquitto
    /// grants every SUBSCRIBE and checks deliveries only: a subscription
    /// to `sensors/#` under `topic read sensors/+/temp` keeps working, its
    /// other topics left to the delivery check). Wildcard filters scan
    /// the list; a plain topic uses the index.
    fn check_filter(&self, filter: &str) -> Option<bool> {
        if !crate::router::topic::has_wildcard(filter) {
            return self.check_topic(filter, Want::Read);
        }
        let mut verdict = None;
        for (rule, access) in &self.list {
            match access {
                Access::Deny if covers(rule, filter) => return Some(false),
                a if a.grants(Want::Read) && intersects(rule, filter) => verdict = Some(true),
                _ => {}
            }
        }
        verdict
    }
}

/// True when some topic name matches both filters (both valid).
fn intersects(a: &str, b: &str) -> bool {
    let wild_first = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (a.starts_with('$') && wild_first(b)) || (b.starts_with('$') && wild_first(a)) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            _ => return false,
        }
    }
}

/// True when every topic `filter` matches is matched by `rule` (both
/// valid filters).
fn covers(rule: &str, filter: &str) -> bool {
    if filter.starts_with('$') && !rule.starts_with('$') {
        return false;
    }
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    loop {
        match (r.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(fl)) if fl != "#" => {}
            (Some(rl), Some(fl)) if rl == fl && fl != "+" && fl != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A pattern: its access and its filter with `%c` / `%u` still in it.
#[derive(Debug, Clone)]
struct Pattern {
    access: Access,
    filter: String,
}

/// A line the ACL file cannot hold, with its number (from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct AclError {
    /// Line number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub why: String,
}

/// A whole ACL file.
#[derive(Default)]
pub struct Acl {
    anonymous: Arc<Rules>,
    users: HashMap<String, Arc<Rules>>,
    patterns: Vec<Pattern>,
    rules: usize,
}

impl std::fmt::Debug for Acl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acl")
            .field("users", &self.users.len())
            .field("patterns", &self.patterns.len())
            .field("rules", &self.rules)
            .finish()
    }
}

impl Acl {
    /// Read an ACL file; a line in no known form, or a topic that is no
    /// valid filter, is an error naming the line (the whole file is
    /// refused: half a file could open what it means to close).
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut anonymous = Rules::default();
        let mut users: HashMap<String, Rules> = HashMap::default();
        let mut patterns = Vec::new();
        let mut user: Option<String> = None;
        let mut rules = 0;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_start().trim_end_matches(['\r', '\n']);
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |why: String| AclError { line: i + 1, why };
            let (word, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim_start();
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` without a name".into()));
                    }
                    users.entry(rest.to_string()).or_default();
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let (access, filter) = access_and_filter(rest).map_err(err)?;
                    if let Err(e) = validate_topic_filter(filter, usize::MAX) {
                        return Err(err(format!("{filter:?} is not a topic filter: {e}")));
                    }
                    rules += 1;
                    match (word, &user) {
                        ("pattern", _) => patterns.push(Pattern {
                            access,
                            filter: filter.to_string(),
                        }),
                        (_, Some(u)) => users.entry(u.clone()).or_default().push(filter, access),
                        (_, None) => anonymous.push(filter, access),
                    }
                }
                other => {
                    return Err(err(format!(
                        "{}: not `user`, `topic` or `pattern`",
                        crate::text::quote(other)
                    )))
                }
            }
        }
        Ok(Acl {
            anonymous: Arc::new(anonymous),
            users: users.into_iter().map(|(u, r)| (u, Arc::new(r))).collect(),
            patterns,
            rules,
        })
    }

    /// Number of `topic` and `pattern` lines.
    pub fn rules(&self) -> usize {
        self.rules
    }

    /// The rules of client `client_id` logged in as `username` (None:
    /// anonymous), patterns filled in.
    pub fn for_client(&self, client_id: &str, username: Option<&str>) -> ClientAcl {
        let own = match username {
            Some(u) => self.users.get(u).cloned(),
            None => Some(self.anonymous.clone()),
        };
        let dangerous = |s: &str| s.contains(['+', '#']);
        let mut patterns = Rules::default();
        let refuse_patterns = dangerous(client_id) || username.is_some_and(dangerous);
        if !refuse_patterns {
            for p in &self.patterns {
                if p.filter.contains("%u") && username.is_none() {
                    continue;
                }
                let filter = p
                    .filter
                    .replace("%c", client_id)
                    .replace("%u", username.unwrap_or(""));
                patterns.push(&filter, p.access);
            }
        }
        ClientAcl {
            own,
            patterns,
            cache: Default::default(),
        }
    }
}

/// `[ACCESS] FILTER`: the access word is optional (readwrite without
/// one); the filter is the rest of the line, spaces included.
fn access_and_filter(rest: &str) -> Result<(Access, &str), String> {
    let (word, after) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
    let access = match word {
        "read" => Some(Access::Read),
        "write" => Some(Access::Write),
        "readwrite" => Some(Access::ReadWrite),
        "deny" => Some(Access::Deny),
        _ => None,
    };
    let filter = match access {
        Some(_) => after.trim(),
        // `topic a b`: Mosquitto refuses a second word that is no access
        // word (a topic with spaces needs one before it).
        None if !after.trim().is_empty() => {
            return Err(format!(
                "{}: not read, write, readwrite or deny",
                crate::text::quote(word)
            ))
        }
        None => rest.trim(),
    };
    if filter.is_empty() {
        return Err("a rule without a topic".into());
    }
    Ok((access.unwrap_or(Access::ReadWrite), filter))
}

/// How many topics a client's cache of answers holds before it starts
/// over.
pub const CACHE_MAX: usize = 256;

/// One connection's rules, with its recent answers cached (one hash
/// lookup per publish or delivery once a topic was seen).
pub struct ClientAcl {
    own: Option<Arc<Rules>>,
    patterns: Rules,
    /// Answers by topic: reading, writing.
    cache: [std::cell::RefCell<HashMap<Arc<str>, bool>>; 2],
}

impl std::fmt::Debug for ClientAcl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientAcl")
    }
}

impl ClientAcl {
    /// Exactly `rules` (a login token's topics): nothing else allowed.
    pub fn from_rules(rules: &[(String, Access)]) -> ClientAcl {
        let mut own = Rules::default();
        for (filter, access) in rules {
            own.push(filter, *access);
        }
        ClientAcl {
            own: Some(Arc::new(own)),
            patterns: Rules::default(),
            cache: Default::default(),
        }
    }

    /// May the client `want` topic name `topic`?
    pub fn allows(&self, topic: &str, want: Want) -> bool {
        let cache = &self.cache[want as usize];
        if let Some(&v) = cache.borrow().get(topic) {
            return v;
        }
        let v = self
            .own
            .as_ref()
            .and_then(|r| r.check_topic(topic, want))
            .or_else(|| self.patterns.check_topic(topic, want))
            .unwrap_or(false);
        let mut cache = cache.borrow_mut();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(Arc::from(topic), v);
        v
    }

    /// May the client subscribe to `filter` (without its `$share/G/`)?
    pub fn allows_subscribe(&self, filter: &str) -> bool {
        self.own
            .as_ref()
            .and_then(|r| r.check_filter(filter))
            .or_else(|| self.patterns.check_filter(filter))
            .unwrap_or(false)
    }
}

/// Reference check without the index (for the tests): the rules in file
/// order, as Mosquitto walks them.
#[cfg(test)]
fn reference(
    acl_text: &str,
    client_id: &str,
    username: Option<&str>,
    topic: &str,
    want: Want,
) -> bool {
    use crate::router::topic::matches;
    let acl = Acl::parse(acl_text).unwrap();
    let c = acl.for_client(client_id, username);
    let hit = |f: &str| (f.starts_with('$') || !topic.starts_with('$')) && matches(f, topic);
    let walk = |rules: &Rules| {
        let list = &rules.list;
        if list.iter().any(|(f, a)| *a == Access::Deny && hit(f)) {
            return Some(false);
        }
        list.iter()
            .any(|(f, a)| a.grants(want) && hit(f))
            .then_some(true)
    };
    c.own
        .as_deref()
        .and_then(walk)
        .or_else(|| walk(&c.patterns))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(acl: &Acl, id: &str, user: Option<&str>, topic: &str, want: Want) -> bool {
        acl.for_client(id, user).allows(topic, want)
    }

    const FILE: &str = "\
# anonymous clients
topic read public/#
topic deny public/secret

user alice
topic readwrite alice/#
topic write logs/alice
topic deny alice/private/#
topic sensors/+/temp

user bob smith
topic read alice/#

pattern readwrite devices/%c/#
pattern read users/%u/inbox
pattern deny devices/%c/locked
";

    #[test]
    fn mosquitto_semantics() {
        let acl = Acl::parse(FILE).unwrap();
        assert_eq!(acl.rules(), 10);
        use Want::*;
        // The anonymous block, its deny first.
        assert!(allows(&acl, "x", None, "public/news", Read));
        assert!(!allows(&acl, "x", None, "public/news", Write));
        assert!(!allows(&acl, "x", None, "public/secret", Read));
        // A user's block; a name with a space.
        assert!(allows(&acl, "x", Some("alice"), "alice/a/b", Write));
        assert!(allows(&acl, "x", Some("alice"), "alice", Read));
        assert!(!allows(&acl, "x", Some("alice"), "alice/private/k", Read));
        assert!(allows(&acl, "x", Some("alice"), "logs/alice", Write));
        assert!(!allows(&acl, "x", Some("alice"), "logs/alice", Read));
        assert!(allows(&acl, "x", Some("alice"), "sensors/k/temp", Write));
        assert!(allows(&acl, "x", Some("bob smith"), "alice/x", Read));
        assert!(!allows(&acl, "x", Some("bob smith"), "alice/x", Write));
        // Users get none of the anonymous block; unknown users only
        // patterns.
        assert!(!allows(&acl, "x", Some("alice"), "public/news", Read));
        assert!(!allows(&acl, "x", Some("carol"), "alice/x", Read));
        // Patterns, with the client id and user name filled in.
        assert!(allows(&acl, "dev1", None, "devices/dev1/up", Write));
        assert!(!allows(&acl, "dev1", None, "devices/dev2/up", Write));
        assert!(!allows(&acl, "dev1", None, "devices/dev1/locked", Write));
        assert!(allows(&acl, "x", Some("carol"), "users/carol/inbox", Read));
        assert!(!allows(&acl, "x", None, "users//inbox", Read), "%u skipped");
        // An id with a wildcard gets no patterns at all.
        assert!(!allows(&acl, "+", None, "devices/+/up", Write));
        assert!(!allows(&acl, "#", None, "devices/x/up", Write));
        // A user's own rules decide before the patterns.
        assert!(allows(&acl, "alice", Some("alice"), "alice/x", Write));
    }

    #[test]
    fn dollar_topics_need_dollar_rules() {
        let acl = Acl::parse("topic read #\ntopic read $SYS/broker/#\n").unwrap();
        assert!(allows(&acl, "x", None, "a/b", Want::Read));
        assert!(allows(&acl, "x", None, "$SYS/broker/uptime", Want::Read));
        assert!(!allows(&acl, "x", None, "$other/x", Want::Read));
    }

    #[test]
    fn subscriptions_need_a_readable_topic_and_no_deny_covering_them_all() {
        let acl = Acl::parse(FILE).unwrap();
        let alice = acl.for_client("x", Some("alice"));
        assert!(
            alice.allows_subscribe("alice/#"),
            "a deny inside is left to delivery"
        );
        assert!(alice.allows_subscribe("alice/+/b"));
        assert!(!alice.allows_subscribe("alice/private/#"));
        assert!(!alice.allows_subscribe("alice/private/+/x"));
        assert!(alice.allows_subscribe("#"), "alice/# is readable in it");
        assert!(!alice.allows_subscribe("logs/alice"), "write only");
        assert!(!alice.allows_subscribe("logs/+"), "write only");
        assert!(alice.allows_subscribe("sensors/+/temp"));
        assert!(alice.allows_subscribe("sensors/#"));
        assert!(!alice.allows_subscribe("other/#"));
        assert!(!alice.allows_subscribe("$SYS/#"));
        let anon = acl.for_client("d", None);
        assert!(anon.allows_subscribe("public/+"));
        assert!(!anon.allows_subscribe("public/secret"));
        assert!(anon.allows_subscribe("devices/d/#"));
        assert!(anon.allows_subscribe("devices/+/#"));
        assert!(!anon.allows_subscribe("other/x/+"));
        assert!(anon.allows_subscribe("+/x/y"), "public/x/y is readable");
    }

    #[test]
    fn intersecting() {
        assert!(intersects("a/#", "a"));
        assert!(intersects("a", "a/#"));
        assert!(intersects("+/b", "a/+"));
        assert!(!intersects("a/b", "a/c"));
        assert!(!intersects("a/+", "a/b/c"));
        assert!(!intersects("#", "$SYS/x"));
        assert!(intersects("$SYS/#", "$SYS/+"));
    }

    #[test]
    fn covering() {
        assert!(covers("#", "a/+/#"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(covers("a/#", "a"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("#", "$SYS/#"));
        assert!(covers("$SYS/#", "$SYS/+/x"));
    }

    #[test]
    fn bad_lines_name_their_number() {
        for (text, line, says) in [
            ("user\n", 1, "without a name"),
            ("\n\ntopic read\n", 3, "without a topic"),
            ("topic read a/#/b\n", 1, "not a topic filter"),
            ("pattern\n", 1, "without a topic"),
            ("topics read a\n", 1, "not `user`"),
        ] {
            let e = Acl::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text}");
            assert!(e.why.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn no_access_word_means_readwrite_and_topics_keep_spaces() {
        let acl = Acl::parse("topic a/b\n  topic   read   x y \n").unwrap();
        assert!(allows(&acl, "i", None, "a/b", Want::Write));
        assert!(allows(&acl, "i", None, "x y", Want::Read));
        // As Mosquitto: a topic with spaces needs its access word.
        let e = Acl::parse("topic a b\n").unwrap_err();
        assert!(e.why.contains("not read, write"), "{e}");
    }

    #[test]
    fn a_big_file_is_indexed() {
        let mut text = String::from("user u\n");
        for i in 0..10_000 {
            text.push_str(&format!("topic readwrite t/{i}/#\n"));
        }
        let acl = Acl::parse(&text).unwrap();
        let c = acl.for_client("x", Some("u"));
        assert!(c.allows("t/9999/x", Want::Write));
        assert!(!c.allows("t/10000/x", Want::Write));
    }

    proptest::proptest! {
        /// The index agrees with a walk of the rules in file order.
        #[test]
        fn index_agrees_with_the_walk(
            rules in proptest::collection::vec(
                (0..4u8, "(a|b|\\+)(/(a|b|\\+|#))?"), 0..8),
            topic in "(a|b|\\$s)(/(a|b))?",
            read in proptest::bool::ANY,
        ) {
            let mut text = String::new();
            for (a, f) in &rules {
                if f.contains("#/") { continue; }
                let word = ["read", "write", "readwrite", "deny"][*a as usize];
                text.push_str(&format!("topic {word} {f}\n"));
            }
            let want = if read { Want::Read } else { Want::Write };
            let acl = Acl::parse(&text).unwrap();
            proptest::prop_assert_eq!(
                allows(&acl, "c", None, &topic, want),
                reference(&text, "c", None, &topic, want)
            );
        }
    }
}
