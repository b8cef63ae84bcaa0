//! The retained message store for the topics one shard owns.
//!
//! A tree of topic levels. Each node's children are a short vector searched
//! linearly (up to 8) or a hash map; a node holding a message keeps its full
//! topic next to the value so matches need no string building. Walks that
//! follow a filter (`+` = every child, `#` = the whole subtree) use an
//! explicit stack; insert/remove/retain recurse or loop once per level, so
//! their depth is bounded by the topic level limit the broker validates.

use core::mem;

use crate::hash::HashMap;
use smallvec::SmallVec;

use super::topic::split_level;

/// Above this many children a node's children move to a hash map.
const FEW_MAX: usize = 8;
/// At or below this many children a hash map moves back to a vector.
const FEW_BACK: usize = FEW_MAX / 2;

/// Children of a retained node, by level.
enum Children<V> {
    Few(Vec<(Box<str>, RNode<V>)>),
    Many(Box<HashMap<Box<str>, RNode<V>>>),
}

/// One level of the retained tree.
struct RNode<V> {
    children: Children<V>,
    /// The full topic and message of the topic ending here.
    value: Option<(Box<str>, V)>,
}

impl<V> Default for RNode<V> {
    fn default() -> Self {
        RNode {
            children: Children::Few(Vec::new()),
            value: None,
        }
    }
}

impl<V> RNode<V> {
    fn is_vacant(&self) -> bool {
        self.value.is_none() && self.children.is_empty()
    }

    /// Number of nodes in this subtree (including this one).
    fn count(&self) -> usize {
        let mut n = 1;
        self.children.for_each(|_, c| n += c.count());
        n
    }
}

impl<V> Children<V> {
    fn len(&self) -> usize {
        match self {
            Children::Few(v) => v.len(),
            Children::Many(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, level: &str) -> Option<&RNode<V>> {
        match self {
            Children::Few(v) => v.iter().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Many(m) => m.get(level),
        }
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut RNode<V>> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Many(m) => m.get_mut(level),
        }
    }

    fn get_or_insert(&mut self, level: &str) -> &mut RNode<V> {
        if let Children::Few(v) = self {
            if v.len() >= FEW_MAX && !v.iter().any(|(l, _)| &**l == level) {
                *self = Children::Many(Box::new(mem::take(v).into_iter().collect()));
            }
        }
        match self {
            Children::Few(v) => match v.iter().position(|(l, _)| &**l == level) {
                Some(i) => &mut v[i].1,
                None => {
                    // Grow one at a time: most nodes have one or two children.
                    v.reserve_exact(1);
                    v.push((level.into(), RNode::default()));
                    &mut v.last_mut().expect("just pushed").1
                }
            },
            Children::Many(m) => m.entry_ref(level).or_default(),
        }
    }

    fn remove(&mut self, level: &str) {
        match self {
            Children::Few(v) => v.retain(|(l, _)| &**l != level),
            Children::Many(m) => {
                m.remove(level);
            }
        }
        self.demote();
    }

    /// Keeps the children for which `f` returns true.
    fn retain(&mut self, mut f: impl FnMut(&mut RNode<V>) -> bool) {
        match self {
            Children::Few(v) => v.retain_mut(|(_, n)| f(n)),
            Children::Many(m) => m.retain(|_, n| f(n)),
        }
        self.demote();
    }

    /// Moves a small map back to a vector; frees an empty vector.
    fn demote(&mut self) {
        match self {
            Children::Many(m) if m.len() <= FEW_BACK => {
                *self = Children::Few(mem::take(m.as_mut()).into_iter().collect());
            }
            Children::Few(v) if v.is_empty() => *v = Vec::new(),
            _ => {}
        }
    }

    fn for_each<'a>(&'a self, mut f: impl FnMut(&'a str, &'a RNode<V>)) {
        match self {
            Children::Few(v) => v.iter().for_each(|(l, n)| f(l, n)),
            Children::Many(m) => m.iter().for_each(|(l, n)| f(l, n)),
        }
    }
}

/// Where a [`MatchWalk`] goes on below a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Below {
    /// Match the filter's levels from this index on.
    Filter(usize),
    /// Everything in the subtree (a `#` above), the node itself included.
    Subtree,
}

/// A walk over the stored topics matching a filter that stops after a
/// bounded amount of work and goes on later ([`RetainedStore::walk`]), so
/// a wildcard over a million retained topics is spread over many loop
/// turns. It holds owned topic paths, not references into the tree, so
/// the store may change between steps: a topic removed meanwhile is not
/// found, one added where the walk has not been yet may be, one added
/// where it has been is not (it reaches the subscriber live instead).
/// Owned data only: it can travel to another shard and back.
#[derive(Debug, Clone)]
pub struct MatchWalk {
    filter: Box<str>,
    /// Every topic, `$` topics included (the filter is `#`).
    all: bool,
    /// Branches still to walk: a node's path (`None`: the root) and what
    /// is to be matched below it. Depth first.
    pending: Vec<(Option<Box<str>>, Below)>,
}

impl MatchWalk {
    /// A walk over the topics matching `filter` (a valid filter).
    pub fn new(filter: &str) -> MatchWalk {
        MatchWalk {
            filter: filter.into(),
            all: false,
            pending: vec![(None, Below::Filter(0))],
        }
    }

    /// A walk over every stored topic, `$` topics included (what a filter
    /// cannot ask for): a shard's whole store, a part at a time.
    pub fn all() -> MatchWalk {
        MatchWalk {
            all: true,
            ..MatchWalk::new("#")
        }
    }

    /// The filter walked.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// True when nothing is left to walk.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }
}

/// The path of `level` below `path`.
fn child_path(path: Option<&str>, level: &str) -> Box<str> {
    match path {
        None => level.into(),
        Some(p) => format!("{p}/{level}").into(),
    }
}

/// Topic names (no wildcards) → `V`, searchable by filter without a full
/// scan. Topics are expected to be valid names
/// ([`validate_topic_name`](crate::router::topic::validate_topic_name)).
/// Single-threaded; each shard owns its own instance.
pub struct RetainedStore<V> {
    root: RNode<V>,
    len: usize,
}

impl<V> Default for RetainedStore<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> RetainedStore<V> {
    /// An empty store.
    pub fn new() -> Self {
        RetainedStore {
            root: RNode::default(),
            len: 0,
        }
    }

    /// Stores `value` under `topic`, returning the value it replaces.
    pub fn insert(&mut self, topic: &str, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_or_insert(level);
        }
        match &mut node.value {
            Some((_, old)) => Some(mem::replace(old, value)),
            slot @ None => {
                *slot = Some((topic.into(), value));
                self.len += 1;
                None
            }
        }
    }

    /// Removes the value of `topic`, pruning nodes left empty.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let (level, rest) = split_level(topic);
        let removed = Self::remove_below(&mut self.root, level, rest);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// The value of `topic`.
    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.value.as_ref().map(|(_, v)| v)
    }

    /// Calls `f(topic, value)` for every stored topic matching `filter`
    /// ([`topic::matches`](crate::router::topic::matches) semantics,
    /// including the `$` rule): a [`MatchWalk`] taken to its end at once.
    pub fn for_each_match(&self, filter: &str, mut f: impl FnMut(&str, &V)) {
        let mut walk = MatchWalk::new(filter);
        while !walk.is_done() {
            self.walk(&mut walk, usize::MAX, usize::MAX, &mut f);
        }
    }

    /// Go on with `walk`: call `f(topic, value)` for the matches found
    /// while visiting at most `visits_max` nodes, stopping early once `f`
    /// has been called `found_max` times. Returns how many were found;
    /// [`MatchWalk::is_done`] says whether the walk is over. Walks only
    /// the branches the filter allows (`+` = every child of a level, `#` =
    /// the whole subtree, the parent level included); together, the steps
    /// of a walk over an unchanged store find each matching topic once.
    pub fn walk(
        &self,
        walk: &mut MatchWalk,
        visits_max: usize,
        found_max: usize,
        mut f: impl FnMut(&str, &V),
    ) -> usize {
        let levels: SmallVec<[&str; 8]> = walk.filter.split('/').collect();
        let all = walk.all;
        let mut found = 0;
        let mut visits = 0;
        while visits < visits_max && found < found_max {
            let Some((path, below)) = walk.pending.pop() else {
                break;
            };
            visits += 1;
            let Some(node) = self.node(path.as_deref()) else {
                continue; // removed since the walk passed its parent
            };
            let at_root = path.is_none();
            let mut emit = |node: &RNode<V>| {
                if let Some((topic, value)) = &node.value {
                    f(topic, value);
                    found += 1;
                }
            };
            let mut push_children = |below: Below| {
                node.children.for_each(|l, _| {
                    if all || !(at_root && l.starts_with('$')) {
                        walk.pending
                            .push((Some(child_path(path.as_deref(), l)), below));
                    }
                });
            };
            match below {
                Below::Subtree => {
                    emit(node);
                    push_children(Below::Subtree);
                }
                Below::Filter(i) if i == levels.len() => emit(node),
                Below::Filter(i) => match levels[i] {
                    "#" => {
                        // "a/#" matches "a" too; the root holds no topic.
                        if !at_root {
                            emit(node);
                        }
                        push_children(Below::Subtree);
                    }
                    "+" => push_children(Below::Filter(i + 1)),
                    level => {
                        if node.children.get(level).is_some() {
                            let child = child_path(path.as_deref(), level);
                            walk.pending.push((Some(child), Below::Filter(i + 1)));
                        }
                    }
                },
            }
        }
        found
    }

    /// The node at `path` (`None`: the root).
    fn node(&self, path: Option<&str>) -> Option<&RNode<V>> {
        let mut node = &self.root;
        if let Some(path) = path {
            for level in path.split('/') {
                node = node.children.get(level)?;
            }
        }
        Some(node)
    }

    /// Visits every stored `(topic, value)`, `$` topics included.
    pub fn for_each(&self, mut f: impl FnMut(&str, &V)) {
        let mut stack: SmallVec<[&RNode<V>; 16]> = SmallVec::new();
        stack.push(&self.root);
        while let Some(node) = stack.pop() {
            if let Some((topic, value)) = &node.value {
                f(topic, value);
            }
            node.children.for_each(|_, child| stack.push(child));
        }
    }

    /// Number of stored topics.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only the values for which `f(topic, value)` returns true (e.g.
    /// drops expired messages), pruning nodes left empty.
    pub fn retain(&mut self, mut f: impl FnMut(&str, &mut V) -> bool) {
        let mut removed = 0;
        Self::retain_node(&mut self.root, &mut f, &mut removed);
        self.len -= removed;
    }

    /// Nodes in the tree including the root (for tests). O(n).
    #[doc(hidden)]
    pub fn node_count(&self) -> usize {
        self.root.count()
    }

    /// Removes `level`/`rest` below `node`; prunes the child if left vacant.
    fn remove_below(node: &mut RNode<V>, level: &str, rest: Option<&str>) -> Option<V> {
        let child = node.children.get_mut(level)?;
        let removed = match rest {
            None => child.value.take().map(|(_, v)| v),
            Some(rest) => {
                let (next, rest) = split_level(rest);
                Self::remove_below(child, next, rest)
            }
        };
        if removed.is_some() && child.is_vacant() {
            node.children.remove(level);
        }
        removed
    }

    /// Post-order retain: drops rejected values, then vacant children.
    fn retain_node(
        node: &mut RNode<V>,
        f: &mut impl FnMut(&str, &mut V) -> bool,
        removed: &mut usize,
    ) {
        if let Some((topic, value)) = &mut node.value {
            if !f(topic, value) {
                node.value = None;
                *removed += 1;
            }
        }
        node.children.retain(|child| {
            Self::retain_node(child, f, removed);
            !child.is_vacant()
        });
    }
}
