//! Tests of the router module: spec cases for topic rules, and property
//! tests of the trie and the retained store against `topic::matches`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::topic::{
    has_wildcard, level_count, matches, parse_shared, validate_topic_filter, validate_topic_name,
    TopicError,
};
use super::{choose_member, Fan, FilterTrie, Match, MatchWalk, RetainedStore, SharedPick};
use crate::codec::{QoS, SubOptions};
use crate::message::Message;

const MAX: usize = 32;

#[test]
fn valid_topic_names() {
    for name in [
        "a",
        "a/b",
        "/",
        "a//b",
        "/a",
        "a/",
        "$SYS/broker/load",
        "sport/tennis/player1",
        "ü/日本",
        " ",
    ] {
        assert_eq!(validate_topic_name(name, MAX), Ok(()), "{name:?}");
    }
}

#[test]
fn invalid_topic_names() {
    use TopicError::*;
    let long = "a".repeat(65_536);
    let deep = "a/".repeat(32) + "a"; // 33 levels
    let cases: &[(&str, TopicError)] = &[
        ("", Empty),
        (&long, TooLong),
        (
            &deep,
            TooManyLevels {
                levels: 33,
                max: 32,
            },
        ),
        ("a/+", WildcardInName),
        ("#", WildcardInName),
        ("a/b#", WildcardInName),
        ("a\0b", NullChar),
    ];
    for (name, err) in cases {
        assert_eq!(validate_topic_name(name, MAX), Err(*err), "{name:?}");
    }
    assert_eq!(validate_topic_name(&"a".repeat(65_535), MAX), Ok(()));
    assert_eq!(validate_topic_name(&("a/".repeat(31) + "a"), MAX), Ok(()));
}

#[test]
fn valid_topic_filters() {
    for filter in [
        "#",
        "+",
        "+/+",
        "/+",
        "a/#",
        "a/+/b",
        "+/tennis/#",
        "sport/tennis/player1/#",
        "a//b",
        "/",
        "$SYS/#",
        "$share/g/a",
    ] {
        assert_eq!(validate_topic_filter(filter, MAX), Ok(()), "{filter:?}");
    }
}

#[test]
fn invalid_topic_filters() {
    use TopicError::*;
    let long = "a".repeat(65_536);
    let cases: &[(&str, TopicError)] = &[
        ("", Empty),
        (&long, TooLong),
        ("a/b/c", TooManyLevels { levels: 3, max: 2 }),
        ("sport/tennis#", BadWildcard),
        ("sport/tennis/#/ranking", BadWildcard),
        ("#/a", BadWildcard),
        ("sport+", BadWildcard),
        ("a/+b/c", BadWildcard),
        ("++", BadWildcard),
        ("##", BadWildcard),
        ("a/\0", NullChar),
    ];
    for (filter, err) in cases {
        let max = if *filter == "a/b/c" { 2 } else { MAX };
        assert_eq!(validate_topic_filter(filter, max), Err(*err), "{filter:?}");
    }
}

#[test]
fn shared_subscriptions() {
    use TopicError::*;
    assert_eq!(parse_shared("$share/g/a/+"), Ok(Some(("g", "a/+"))));
    assert_eq!(parse_shared("$share/g/#"), Ok(Some(("g", "#"))));
    assert_eq!(parse_shared("$share/g//"), Ok(Some(("g", "/"))));
    assert_eq!(parse_shared("$share/g/$SYS/x"), Ok(Some(("g", "$SYS/x"))));
    assert_eq!(parse_shared("a/b"), Ok(None));
    assert_eq!(parse_shared("$SYS/a"), Ok(None));
    assert_eq!(parse_shared("$shared/a"), Ok(None));
    assert_eq!(parse_shared("a/$share/g/b"), Ok(None));
    for bad in ["$share", "$share/", "$share//a", "$share/g", "$share/g/"] {
        assert_eq!(parse_shared(bad), Err(BadSharedSubscription), "{bad:?}");
    }
    for bad in ["$share/g+/a", "$share/g#/a", "$share/+/a", "$share/#/a"] {
        assert_eq!(parse_shared(bad), Err(BadSharedSubscription), "{bad:?}");
    }
    assert_eq!(parse_shared("$share/g/a/#/b"), Err(BadWildcard));
    assert_eq!(parse_shared("$share/g/a\0"), Err(NullChar));
    assert_eq!(parse_shared("$share/g\0/a"), Err(BadSharedSubscription));
}

#[test]
fn delayed_publishes() {
    use super::topic::parse_delayed;
    assert_eq!(parse_delayed("$delayed/10/a/b"), Ok(Some((10, "a/b"))));
    assert_eq!(parse_delayed("$delayed/0/x"), Ok(Some((0, "x"))));
    assert_eq!(
        parse_delayed("$delayed/4294967/x"),
        Ok(Some((4_294_967, "x")))
    );
    for not_delayed in ["a/b", "$delayedx/1/a", "$delayed", "$SYS/x"] {
        assert_eq!(parse_delayed(not_delayed), Ok(None), "{not_delayed}");
    }
    for bad in [
        "$delayed/",
        "$delayed/10",
        "$delayed/10/",
        "$delayed/x/a",
        "$delayed/-1/a",
        "$delayed/+5/a",
        "$delayed/4294968/a",
        "$delayed/10/$SYS/a",
    ] {
        assert_eq!(
            parse_delayed(bad),
            Err(TopicError::BadDelayedPublish),
            "{bad}"
        );
    }
}

#[test]
fn error_messages_cite_the_spec() {
    assert_eq!(
        TopicError::WildcardInName.to_string(),
        "[MQTT-3.3.2-2] topic name contains a wildcard"
    );
    for e in [
        TopicError::Empty,
        TopicError::TooLong,
        TopicError::BadWildcard,
        TopicError::NullChar,
        TopicError::BadSharedSubscription,
    ] {
        assert!(e.to_string().starts_with("[MQTT-"), "{e}");
    }
    let e = TopicError::TooManyLevels {
        levels: 40,
        max: 32,
    };
    assert!(e.to_string().contains("40") && e.to_string().contains("32"));
}

#[test]
fn wildcard_and_level_helpers() {
    assert!(has_wildcard("a/+"));
    assert!(has_wildcard("#"));
    assert!(has_wildcard("a+b"));
    assert!(!has_wildcard("a/b"));
    assert_eq!(level_count("a"), 1);
    assert_eq!(level_count("/"), 2);
    assert_eq!(level_count("a//b/"), 4);
}

#[test]
fn matches_spec_examples() {
    let cases: &[(&str, &str, bool)] = &[
        ("sport/tennis/player1/#", "sport/tennis/player1", true),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking",
            true,
        ),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon",
            true,
        ),
        ("sport/tennis/player1/#", "sport/tennis/player2", false),
        ("sport/#", "sport", true),
        ("sport/tennis/+", "sport/tennis/player1", true),
        ("sport/tennis/+", "sport/tennis/player2", true),
        ("sport/tennis/+", "sport/tennis/player1/ranking", false),
        ("sport/+", "sport", false),
        ("sport/+", "sport/", true),
        ("+/+", "/finance", true),
        ("/+", "/finance", true),
        ("+", "/finance", false),
        ("#", "/finance", true),
        ("+/tennis/#", "sport/tennis/player1", true),
        ("#", "$SYS", false),
        ("#", "$SYS/monitor/Clients", false),
        ("+/monitor/Clients", "$SYS/monitor/Clients", false),
        ("$SYS/#", "$SYS/monitor/Clients", true),
        ("$SYS/#", "$SYS", true),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
        ("a/#", "a", true),
        ("a/#", "ab", false),
        ("a/+/#", "a/b", true),
        ("a/b", "a/b", true),
        ("a/b", "a/b/", false),
        ("a//b", "a//b", true),
        ("a/+/b", "a//b", true),
        ("+", "a", true),
        ("+", "$", false),
        ("a/$b", "a/$b", true),
        ("a/+", "a/$b", true),
        ("a/#", "a/$b", true),
    ];
    for &(filter, topic, expected) in cases {
        assert_eq!(matches(filter, topic), expected, "{filter:?} vs {topic:?}");
    }
}

/// Entries the trie reports for `topic`.
fn trie_matches(trie: &FilterTrie<u8, String>, topic: &str) -> BTreeSet<(String, u8)> {
    let mut out = BTreeSet::new();
    trie.for_each_match(topic, |k, v| {
        assert!(out.insert((v.clone(), *k)), "entry visited twice");
    });
    out
}

/// Entries of `model` whose filter matches `topic`.
fn model_matches(model: &HashMap<String, HashSet<u8>>, topic: &str) -> BTreeSet<(String, u8)> {
    let mut out = BTreeSet::new();
    for (filter, keys) in model {
        if matches(filter, topic) {
            out.extend(keys.iter().map(|k| (filter.clone(), *k)));
        }
    }
    out
}

#[test]
fn trie_basic() {
    let mut t: FilterTrie<u32, &str> = FilterTrie::new();
    assert_eq!(t.insert("a/+", 1, "x"), (None, true));
    assert_eq!(t.insert("a/+", 2, "y"), (None, false));
    assert_eq!(t.insert("a/+", 1, "z"), (Some("x"), false));
    assert_eq!(t.insert("#", 1, "h"), (None, true));
    assert_eq!((t.len(), t.filter_count()), (3, 2));
    assert_eq!(t.get("a/+", &1), Some(&"z"));
    *t.get_mut("a/+", &2).unwrap() = "w";
    let mut e: Vec<_> = t.entries("a/+").map(|(k, v)| (*k, *v)).collect();
    e.sort();
    assert_eq!(e, [(1, "z"), (2, "w")]);
    assert_eq!(t.entries("a").count(), 0);
    let mut hits = Vec::new();
    t.for_each_match("a/b", |k, v| hits.push((*k, *v)));
    hits.sort();
    assert_eq!(hits, [(1, "h"), (1, "z"), (2, "w")]);
    let mut hits = Vec::new();
    t.for_each_match("$SYS/b", |k, v| hits.push((*k, *v)));
    assert!(hits.is_empty());
    assert_eq!(t.remove("a/+", &3), (None, false));
    assert_eq!(t.remove("x/y", &1), (None, false));
    assert_eq!(t.remove("a/+", &1), (Some("z"), false));
    assert_eq!(t.remove("a/+", &2), (Some("w"), true));
    assert_eq!(t.remove("#", &1), (Some("h"), true));
    assert!(t.is_empty());
    assert_eq!((t.node_count(), t.filter_count()), (1, 0));
}

#[test]
fn trie_for_each_and_shrink() {
    let mut t: FilterTrie<u32, u32> = FilterTrie::new();
    let filters = ["a", "a/b", "+/b/#", "#", "/", "a//+", "$SYS/#", "x/#/y"];
    for (i, f) in filters.iter().enumerate() {
        for k in 0..20 {
            t.insert(f, k, i as u32);
        }
    }
    for k in 0..20 {
        t.remove("a/b", &k);
    }
    assert!(t.heap_bytes() > 0);
    t.shrink_to_fit();
    let mut seen = BTreeSet::new();
    t.for_each(|f, k, v| {
        assert_eq!(filters[*v as usize], f);
        seen.insert((f.to_owned(), *k));
    });
    assert_eq!(seen.len(), 7 * 20);
    let mut n = 0;
    t.for_each_match("a/b/c", |_, _| n += 1);
    assert_eq!(n, 40); // "+/b/#" and "#"
    for f in filters {
        for k in 0..20 {
            t.remove(f, &k);
        }
    }
    assert_eq!((t.len(), t.node_count()), (0, 1));
}

#[test]
fn retained_basic() {
    let mut r = RetainedStore::new();
    assert_eq!(r.insert("a/b", 1), None);
    assert_eq!(r.insert("a/b", 2), Some(1));
    assert_eq!(r.insert("a", 3), None);
    assert_eq!(r.insert("$SYS/x", 4), None);
    assert_eq!(r.get("a/b"), Some(&2));
    assert_eq!(r.get("a/c"), None);
    assert_eq!(r.len(), 3);
    let mut hits = Vec::new();
    r.for_each_match("#", |t, v| hits.push((t.to_owned(), *v)));
    hits.sort();
    assert_eq!(hits, [("a".to_owned(), 3), ("a/b".to_owned(), 2)]);
    r.retain(|t, v| {
        *v += 10;
        t != "a"
    });
    assert_eq!((r.get("a"), r.get("a/b"), r.len()), (None, Some(&12), 2));
    assert_eq!(r.remove("a"), None);
    assert_eq!(r.remove("a/b"), Some(12));
    assert_eq!(r.remove("$SYS/x"), Some(14));
    assert!(r.is_empty());
    assert_eq!(r.node_count(), 1);
}

#[test]
fn retained_many_children_switch_to_map() {
    let mut r = RetainedStore::new();
    for i in 0..100 {
        r.insert(&format!("s/{i}/v"), i);
    }
    let mut n = 0;
    r.for_each_match("s/+/v", |_, _| n += 1);
    assert_eq!(n, 100);
    r.retain(|_, v| *v % 10 == 0);
    assert_eq!(r.len(), 10);
    let mut got = Vec::new();
    r.for_each_match("s/#", |t, _| got.push(t.to_owned()));
    got.sort();
    assert_eq!(got.len(), 10);
    r.retain(|_, _| false);
    assert_eq!((r.len(), r.node_count()), (0, 1));
}

/// One level of a random filter.
fn filter_level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "$SYS", "a", "b", "+", "#"])
}

/// One level of a random topic name.
fn topic_level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "$SYS", "a", "b", "c"])
}

/// A valid random filter: levels after the first `#` are dropped.
fn filter() -> impl Strategy<Value = String> {
    prop::collection::vec(filter_level(), 1..5)
        .prop_map(|levels| {
            let end = levels
                .iter()
                .position(|l| *l == "#")
                .map_or(levels.len(), |i| i + 1);
            levels[..end].join("/")
        })
        .prop_filter("non-empty", |f| !f.is_empty())
}

fn topic() -> impl Strategy<Value = String> {
    prop::collection::vec(topic_level(), 1..5)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("non-empty", |t| !t.is_empty())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn trie_matches_reference(
        subs in prop::collection::vec((filter(), 0u8..12), 0..60),
        topics in prop::collection::vec(topic(), 1..20),
    ) {
        let mut trie = FilterTrie::new();
        let mut model: HashMap<String, HashSet<u8>> = HashMap::new();
        for (f, k) in &subs {
            prop_assert_eq!(validate_topic_filter(f, MAX), Ok(()));
            trie.insert(f, *k, f.clone());
            model.entry(f.clone()).or_default().insert(*k);
        }
        for t in &topics {
            prop_assert_eq!(trie_matches(&trie, t), model_matches(&model, t), "topic {:?}", t);
        }
        // Remove half, compact, check again, then remove the rest.
        for (f, k) in subs.iter().step_by(2) {
            trie.remove(f, k);
            let gone = model.get_mut(f).is_some_and(|s| s.remove(k) && s.is_empty());
            if gone {
                model.remove(f);
            }
        }
        trie.shrink_to_fit();
        for t in &topics {
            prop_assert_eq!(trie_matches(&trie, t), model_matches(&model, t), "topic {:?}", t);
        }
        for (f, k) in &subs {
            trie.remove(f, k);
        }
        prop_assert!(trie.is_empty());
        prop_assert_eq!(trie.filter_count(), 0);
        prop_assert_eq!(trie.node_count(), 1);
    }

    #[test]
    fn retained_matches_reference(
        stored in prop::collection::vec(topic(), 0..60),
        filters in prop::collection::vec(filter(), 1..20),
    ) {
        let mut store = RetainedStore::new();
        let mut model = BTreeSet::new();
        for t in &stored {
            prop_assert_eq!(validate_topic_name(t, MAX), Ok(()));
            store.insert(t, t.clone());
            model.insert(t.clone());
        }
        prop_assert_eq!(store.len(), model.len());
        for f in &filters {
            let mut got = BTreeSet::new();
            store.for_each_match(f, |t, v| {
                assert_eq!(t, v);
                assert!(got.insert(t.to_owned()), "topic visited twice");
            });
            let want: BTreeSet<String> =
                model.iter().filter(|t| matches(f, t)).cloned().collect();
            prop_assert_eq!(got, want, "filter {:?}", f);
        }
        for t in &stored {
            store.remove(t);
            prop_assert_eq!(store.get(t), None);
        }
        prop_assert!(store.is_empty());
        prop_assert_eq!(store.node_count(), 1);
    }

    #[test]
    fn a_walk_in_small_steps_finds_what_one_match_does(
        stored in prop::collection::vec(topic(), 0..60),
        filters in prop::collection::vec(filter(), 1..10),
        visits in 1usize..6,
        found_max in 1usize..4,
        removed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let mut store = RetainedStore::new();
        for t in &stored {
            store.insert(t, t.clone());
        }
        for f in &filters {
            let mut want = BTreeSet::new();
            store.for_each_match(f, |t, _| {
                want.insert(t.to_owned());
            });
            let mut walk = MatchWalk::new(f);
            let mut got = BTreeSet::new();
            let mut steps = 0;
            while !walk.is_done() {
                let n = store.walk(&mut walk, visits, found_max, |t, v| {
                    assert_eq!(t, v);
                    assert!(got.insert(t.to_owned()), "topic found twice");
                });
                prop_assert!(n <= found_max);
                steps += 1;
                prop_assert!(steps < 10_000, "the walk ends");
            }
            prop_assert_eq!(&got, &want, "filter {:?}", f);
        }
        // The walk over everything finds every topic, `$` ones too, once.
        let mut walk = MatchWalk::all();
        let mut got = BTreeSet::new();
        while !walk.is_done() {
            store.walk(&mut walk, visits, found_max, |t, _| {
                assert!(got.insert(t.to_owned()), "topic found twice");
            });
        }
        let every: BTreeSet<String> = stored.iter().cloned().collect();
        prop_assert_eq!(got, every);
        // Topics removed between steps are never found; the others are.
        for f in &filters {
            let mut copy = RetainedStore::new();
            for t in &stored {
                copy.insert(t, t.clone());
            }
            let mut walk = MatchWalk::new(f);
            let mut got = BTreeSet::new();
            let mut gone = BTreeSet::new();
            let mut removals = removed.iter();
            while !walk.is_done() {
                copy.walk(&mut walk, visits, found_max, |t, _| {
                    got.insert(t.to_owned());
                });
                if let Some(i) = removals.next().filter(|_| !stored.is_empty()) {
                    let t = i.get(&stored);
                    if copy.remove(t).is_some() && !got.contains(t.as_str()) {
                        gone.insert(t.clone());
                    }
                }
            }
            let want: BTreeSet<String> = stored
                .iter()
                .filter(|t| matches(f, t) && !gone.contains(*t))
                .cloned()
                .collect();
            prop_assert_eq!(got, want, "filter {:?}", f);
        }
    }

    #[test]
    fn the_fan_out_over_trie_matches_is_the_rule_over_every_subscription(
        subs in prop::collection::vec(
            (filter(), 0u8..6, prop::option::of(0usize..2), 0u8..3, any::<bool>(), any::<bool>(), prop::option::of(1u32..4)),
            0..40,
        ),
        topic in topic(),
        message_qos in 0u8..3,
        retain in any::<bool>(),
        publisher in prop::option::of(0u8..6),
        ordinary in any::<bool>(),
        wanted in prop::collection::vec(any::<bool>(), 4),
    ) {
        const GROUPS: [&str; 2] = ["g", "h"];
        let qos = |q: u8| [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(q)];
        // The subscriber trie: (session, group) per inner filter; a later
        // subscription replaces an earlier one with the same key.
        type Key = (u8, Option<Arc<str>>);
        type Value = (SubOptions, Arc<str>, Option<u32>);
        type ModelKey = (String, u8, Option<usize>);
        type Shared = BTreeMap<(String, String), Vec<(u8, QoS, bool, Vec<u32>)>>;
        let mut trie: FilterTrie<Key, Value> = FilterTrie::new();
        let mut model: BTreeMap<ModelKey, (SubOptions, Option<u32>)> = BTreeMap::new();
        for (f, session, group, q, nl, rap, id) in &subs {
            let options = SubOptions {
                qos: qos(*q),
                no_local: *nl,
                retain_as_published: *rap,
                ..SubOptions::default()
            };
            let g = group.map(|g| Arc::<str>::from(GROUPS[g]));
            trie.insert(f, (*session, g), (options, Arc::from(f.as_str()), *id));
            model.insert((f.clone(), *session, *group), (options, *id));
        }
        let message = Message {
            topic: topic.as_str().into(),
            payload: Default::default(),
            qos: qos(message_qos),
            retain,
            properties: Default::default(),
            expires_at: None,
            publisher: None,
            id: 0,
            late: false,
        };
        let wants = |p: &SharedPick| {
            let g = GROUPS.iter().position(|g| **g == *p.group).unwrap();
            wanted[g * 2 + p.filter.len() % 2]
        };
        let is_publisher = |s: u8| publisher == Some(s);
        let mut fan = Fan::new(&message, ordinary, wants, is_publisher);
        trie.for_each_match(&topic, |(session, group), (options, inner, id)| {
            fan.add(Match {
                session: *session,
                group: group.as_ref(),
                filter: inner,
                options,
                subscription_id: *id,
            });
        });
        let got = fan.finish();
        // The rule, over every subscription, with the reference matcher.
        let mut want_ordinary: BTreeMap<u8, (QoS, bool, Vec<u32>)> = BTreeMap::new();
        let mut want_shared: Shared = BTreeMap::new();
        for ((f, session, group), (options, id)) in &model {
            if !matches(f, &topic) {
                continue;
            }
            let q = options.qos.min(message.qos);
            let r = retain && options.retain_as_published;
            let ids: Vec<u32> = id.iter().copied().collect();
            match group {
                None => {
                    if !ordinary || (options.no_local && publisher == Some(*session)) {
                        continue;
                    }
                    let e = want_ordinary.entry(*session).or_insert((QoS::AtMostOnce, false, vec![]));
                    e.0 = e.0.max(q);
                    e.1 |= r;
                    e.2.extend(ids);
                }
                Some(g) => {
                    let pick = SharedPick { group: GROUPS[*g].into(), filter: f.as_str().into() };
                    if wants(&pick) {
                        want_shared
                            .entry((GROUPS[*g].to_string(), f.clone()))
                            .or_default()
                            .push((*session, q, r, ids));
                    }
                }
            }
        }
        let got_ordinary: BTreeMap<u8, (QoS, bool, Vec<u32>)> = got
            .ordinary
            .iter()
            .map(|t| {
                let mut ids = t.subscription_ids.to_vec();
                ids.sort_unstable();
                (t.session, (t.qos, t.retain, ids))
            })
            .collect();
        prop_assert_eq!(got_ordinary.len(), got.ordinary.len(), "one target per session");
        for v in want_ordinary.values_mut() {
            v.2.sort_unstable();
        }
        prop_assert_eq!(got_ordinary, want_ordinary);
        let got_shared: Shared = got
            .shared
            .iter()
            .map(|(p, members)| {
                let m = members
                    .iter()
                    .map(|t| (t.session, t.qos, t.retain, t.subscription_ids.to_vec()))
                    .collect();
                ((p.group.to_string(), p.filter.to_string()), m)
            })
            .collect();
        for v in want_shared.values_mut() {
            v.sort_by_key(|m| m.0);
        }
        prop_assert_eq!(got_shared, want_shared);
        // A member is chosen from those preferred, round-robin.
        for (_, members) in &got.shared {
            let mut next = 0;
            let mut seen = BTreeSet::new();
            for _ in 0..members.len() * 2 {
                let i = choose_member(members, &mut next, |s| s % 2 == 0).unwrap();
                seen.insert(members[i].session);
            }
            let even: BTreeSet<u8> = members.iter().map(|t| t.session).filter(|s| s % 2 == 0).collect();
            let all: BTreeSet<u8> = members.iter().map(|t| t.session).collect();
            prop_assert_eq!(seen, if even.is_empty() { all } else { even });
        }
    }

    #[test]
    fn trie_transitions(ops in prop::collection::vec((any::<bool>(), 0usize..6, 0u8..20), 0..300)) {
        const FILTERS: [&str; 6] = ["a", "a/+", "#", "a/b/#", "/", "$SYS/+"];
        let mut trie = FilterTrie::new();
        let mut model: HashMap<String, HashSet<u8>> = HashMap::new();
        for (insert, fi, k) in ops {
            let f = FILTERS[fi];
            let keys = model.entry(f.to_owned()).or_default();
            if insert {
                let was_empty = keys.is_empty();
                let had = !keys.insert(k);
                let (prev, first) = trie.insert(f, k, u32::from(k) * 7);
                prop_assert_eq!(prev.is_some(), had);
                prop_assert_eq!(first, was_empty);
            } else {
                let had = keys.remove(&k);
                let (removed, last) = trie.remove(f, &k);
                prop_assert_eq!(removed, had.then_some(u32::from(k) * 7));
                prop_assert_eq!(last, had && keys.is_empty());
            }
            let want: BTreeSet<u8> = model[f].iter().copied().collect();
            let got: BTreeSet<u8> = trie.entries(f).map(|(k, _)| *k).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(trie.get(f, &k).is_some(), model[f].contains(&k));
            prop_assert_eq!(trie.len(), model.values().map(HashSet::len).sum::<usize>());
            prop_assert_eq!(trie.filter_count(), model.values().filter(|s| !s.is_empty()).count());
        }
    }
}
