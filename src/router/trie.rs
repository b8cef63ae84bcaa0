//! The subscription filter trie: each shard's subscriber trie and the route
//! replica (which shards have subscribers for which filters).
//!
//! Layout, chosen for memory at 100k+ filters:
//! - nodes live in an arena (`Vec<Node>`) and are named by `u32` ids; freed
//!   slots go to a free list and are reused;
//! - named children of every node are in ONE hash map keyed by
//!   `(parent id, level)`, so a node with one child costs no map of its own,
//!   and matching a level is one hash lookup (skipped when the node has no
//!   named children);
//! - `+` and `#` children are slots (`u32` ids) in the node;
//! - the entries of a filter sit in its node: inline (one) or a short vector
//!   searched linearly, a hash map above 8 entries.

use core::hash::Hash;
use core::mem;

use crate::hash::HashMap;
use hashbrown::Equivalent;
use smallvec::SmallVec;

use super::entries::{Entries, EntriesIter};
use super::topic::split_level;

/// "No node" in a `+` or `#` slot.
const NONE: u32 = u32::MAX;
/// The root node: never freed.
const ROOT: u32 = 0;

/// One level of the trie.
struct Node<K, V> {
    /// Entries of the filter that ends at this node.
    entries: Entries<K, V>,
    /// The `+` child, or `NONE`.
    plus: u32,
    /// The `#` child (only its entries are used), or `NONE`.
    hash: u32,
    /// Number of named children in the edge map.
    children: u32,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            entries: Entries::default(),
            plus: NONE,
            hash: NONE,
            children: 0,
        }
    }
}

impl<K: Eq + Hash, V> Node<K, V> {
    /// True if the node holds nothing and can be pruned.
    fn is_vacant(&self) -> bool {
        self.entries.is_empty() && self.plus == NONE && self.hash == NONE && self.children == 0
    }
}

/// Key of the edge map: a named child `level` of node `parent`.
#[derive(PartialEq, Eq, Hash)]
struct EdgeKey {
    parent: u32,
    level: Box<str>,
}

/// Borrowed form of [`EdgeKey`] for lookups; hashes identically.
#[derive(Hash)]
struct EdgeQuery<'a> {
    parent: u32,
    level: &'a str,
}

impl Equivalent<EdgeKey> for EdgeQuery<'_> {
    fn equivalent(&self, key: &EdgeKey) -> bool {
        self.parent == key.parent && self.level == &*key.level
    }
}

/// What a filter level is.
#[derive(Clone, Copy)]
enum Step<'a> {
    Plus,
    Hash,
    Named(&'a str),
}

impl<'a> Step<'a> {
    fn of(level: &'a str) -> Self {
        match level {
            "+" => Step::Plus,
            "#" => Step::Hash,
            _ => Step::Named(level),
        }
    }
}

/// Topic filters → entries keyed by `K` with a value `V` (`K` = subscriber
/// key, e.g. a session index, or a shard id in the route replica).
///
/// Filters are expected to be valid
/// ([`validate_topic_filter`](crate::router::topic::validate_topic_filter));
/// an invalid one (e.g. `#` not last) is stored and removable but the `#`
/// level never lets matching go deeper. Single-threaded; each shard owns its
/// own instance.
pub struct FilterTrie<K, V> {
    nodes: Vec<Node<K, V>>,
    free: Vec<u32>,
    edges: HashMap<EdgeKey, u32>,
    filters: usize,
    len: usize,
}

impl<K: Eq + Hash + Clone, V> Default for FilterTrie<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone, V> FilterTrie<K, V> {
    /// An empty trie (one root node, no allocation for the edge map).
    pub fn new() -> Self {
        FilterTrie {
            nodes: vec![Node::default()],
            free: Vec::new(),
            edges: HashMap::default(),
            filters: 0,
            len: 0,
        }
    }

    /// Insert or replace the entry for `key` under `filter`. Returns the
    /// previous value if any, and true if the filter had no entries before
    /// (a 0→1 transition).
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> (Option<V>, bool) {
        let mut node = ROOT;
        for level in filter.split('/') {
            node = self.child_or_insert(node, Step::of(level));
        }
        let entries = &mut self.nodes[node as usize].entries;
        let was_empty = entries.is_empty();
        let prev = entries.insert(key, value);
        if prev.is_none() {
            self.len += 1;
        }
        if was_empty {
            self.filters += 1;
        }
        (prev, was_empty)
    }

    /// Remove `key` under `filter`. Returns the removed value, and true if
    /// the filter now has no entries (a 1→0 transition; false when `key` was
    /// not there). Prunes nodes left empty; their slots are reused, see
    /// [`shrink_to_fit`](Self::shrink_to_fit) to hand memory back.
    pub fn remove(&mut self, filter: &str, key: &K) -> (Option<V>, bool) {
        let mut path: SmallVec<[(u32, Step<'_>); 16]> = SmallVec::new();
        let mut node = ROOT;
        for level in filter.split('/') {
            let step = Step::of(level);
            let child = self.child(node, step);
            if child == NONE {
                return (None, false);
            }
            path.push((node, step));
            node = child;
        }
        let entries = &mut self.nodes[node as usize].entries;
        let Some(value) = entries.remove(key) else {
            return (None, false);
        };
        self.len -= 1;
        let now_empty = entries.is_empty();
        if now_empty {
            self.filters -= 1;
            self.prune(node, &path);
        }
        (Some(value), now_empty)
    }

    /// The value of `key` under exactly `filter`.
    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        let node = self.find(filter)?;
        self.nodes[node as usize].entries.get(key)
    }

    /// The value of `key` under exactly `filter`, mutably.
    pub fn get_mut(&mut self, filter: &str, key: &K) -> Option<&mut V> {
        let node = self.find(filter)?;
        self.nodes[node as usize].entries.get_mut(key)
    }

    /// Calls `f(key, value)` for every entry whose filter matches the topic
    /// name `topic` (same semantics as
    /// [`topic::matches`](crate::router::topic::matches), including the `$`
    /// rule at the first level). Each matching entry is visited once, in no
    /// particular order. Does not allocate unless more than 16 branches are
    /// pending at once.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&K, &V)) {
        // `+` branches wait on the stack; the named branch is followed in
        // place, so a plain path never round-trips through memory.
        let mut stack: SmallVec<[(u32, Option<&str>); 16]> = SmallVec::new();
        let root = &self.nodes[ROOT as usize];
        let (first, rest) = split_level(topic);
        if !topic.starts_with('$') {
            self.emit_hash(root, &mut f);
            if root.plus != NONE {
                stack.push((root.plus, rest));
            }
        }
        let mut next = self.named(ROOT, root, first).map(|id| (id, rest));
        while let Some((id, rest)) = next.take().or_else(|| stack.pop()) {
            let node = &self.nodes[id as usize];
            self.emit_hash(node, &mut f);
            let Some(rest) = rest else {
                node.entries.for_each(&mut f);
                continue;
            };
            let (level, rest) = split_level(rest);
            if node.plus != NONE {
                stack.push((node.plus, rest));
            }
            next = self.named(id, node, level).map(|id| (id, rest));
        }
    }

    /// Number of distinct filters with at least one entry.
    pub fn filter_count(&self) -> usize {
        self.filters
    }

    /// Number of entries (over all filters).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries under exactly `filter`.
    pub fn entries(&self, filter: &str) -> EntriesIter<'_, K, V> {
        match self.find(filter) {
            Some(node) => self.nodes[node as usize].entries.iter(),
            None => EntriesIter::empty(),
        }
    }

    /// Visits every `(filter, key, value)`, e.g. to resync a replica.
    /// Allocates (a child index and the filter string being built).
    pub fn for_each(&self, mut f: impl FnMut(&str, &K, &V)) {
        let mut kids: HashMap<u32, Vec<(&str, u32)>> = HashMap::default();
        for (edge, &child) in &self.edges {
            kids.entry(edge.parent)
                .or_default()
                .push((&edge.level, child));
        }
        let mut filter = String::new();
        // (node, length of `filter` at its parent, its level)
        let mut stack: Vec<(u32, usize, &str)> = Vec::new();
        self.push_children(ROOT, usize::MAX, &kids, &mut stack);
        while let Some((id, parent_len, level)) = stack.pop() {
            if parent_len == usize::MAX {
                filter.clear();
            } else {
                filter.truncate(parent_len);
                filter.push('/');
            }
            filter.push_str(level);
            let node = &self.nodes[id as usize];
            node.entries.for_each(&mut |k, v| f(&filter, k, v));
            self.push_children(id, filter.len(), &kids, &mut stack);
        }
    }

    /// Hands back memory kept after removals: renumbers the nodes densely
    /// (dropping free slots) and rebuilds the edge map at its exact size.
    /// O(nodes); call it after mass unsubscribes, not per operation.
    pub fn shrink_to_fit(&mut self) {
        let mut vacant = vec![false; self.nodes.len()];
        for &id in &self.free {
            vacant[id as usize] = true;
        }
        let mut remap = vec![NONE; self.nodes.len()];
        let old = mem::take(&mut self.nodes);
        let mut nodes = Vec::with_capacity(old.len() - self.free.len());
        for (id, node) in old.into_iter().enumerate() {
            if !vacant[id] {
                remap[id] = Self::id(nodes.len());
                nodes.push(node);
            }
        }
        let fix = |id: u32| if id == NONE { NONE } else { remap[id as usize] };
        for node in &mut nodes {
            node.plus = fix(node.plus);
            node.hash = fix(node.hash);
        }
        self.edges = mem::take(&mut self.edges)
            .into_iter()
            .map(|(edge, child)| {
                let key = EdgeKey {
                    parent: fix(edge.parent),
                    level: edge.level,
                };
                (key, fix(child))
            })
            .collect();
        self.nodes = nodes;
        self.free = Vec::new();
    }

    /// Live nodes including the root (for tests and memory accounting).
    #[doc(hidden)]
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    /// Approximate heap bytes owned by the trie: node arena, free list, edge
    /// map buckets, level strings and spilled entry storage. Ignores
    /// allocator overhead and heap memory owned by `K`/`V` themselves. O(n).
    pub fn heap_bytes(&self) -> usize {
        let nodes = self.nodes.capacity() * mem::size_of::<Node<K, V>>();
        let free = self.free.capacity() * mem::size_of::<u32>();
        let buckets = if self.edges.capacity() == 0 {
            0
        } else {
            (self.edges.capacity() * 8 / 7).next_power_of_two()
        };
        let edges = buckets * (mem::size_of::<(EdgeKey, u32)>() + 1);
        let levels: usize = self.edges.keys().map(|e| e.level.len()).sum();
        let entries: usize = self.nodes.iter().map(|n| n.entries.heap_bytes()).sum();
        nodes + free + edges + levels + entries
    }

    /// Node id from an arena index.
    fn id(index: usize) -> u32 {
        u32::try_from(index)
            .ok()
            .filter(|&id| id != NONE)
            .expect("FilterTrie: more than 2^32-1 nodes")
    }

    /// The named child `level` of `node`, skipping the lookup for nodes
    /// without named children.
    #[inline]
    fn named(&self, id: u32, node: &Node<K, V>, level: &str) -> Option<u32> {
        if node.children == 0 {
            return None;
        }
        let query = EdgeQuery { parent: id, level };
        self.edges.get(&query).copied()
    }

    /// Calls `f` for the entries of `node`'s `#` child.
    #[inline]
    fn emit_hash(&self, node: &Node<K, V>, f: &mut impl FnMut(&K, &V)) {
        if node.hash != NONE {
            self.nodes[node.hash as usize].entries.for_each(f);
        }
    }

    /// The child of `node` for `step`, or `NONE`.
    fn child(&self, node: u32, step: Step<'_>) -> u32 {
        let n = &self.nodes[node as usize];
        match step {
            Step::Plus => n.plus,
            Step::Hash => n.hash,
            Step::Named(level) => self.named(node, n, level).unwrap_or(NONE),
        }
    }

    /// The node of exactly `filter`, if it exists.
    fn find(&self, filter: &str) -> Option<u32> {
        let mut node = ROOT;
        for level in filter.split('/') {
            node = self.child(node, Step::of(level));
            if node == NONE {
                return None;
            }
        }
        Some(node)
    }

    /// The child of `node` for `step`, created if missing.
    fn child_or_insert(&mut self, node: u32, step: Step<'_>) -> u32 {
        let existing = self.child(node, step);
        if existing != NONE {
            return existing;
        }
        let child = self.alloc();
        let parent = &mut self.nodes[node as usize];
        match step {
            Step::Plus => parent.plus = child,
            Step::Hash => parent.hash = child,
            Step::Named(level) => {
                parent.children += 1;
                let key = EdgeKey {
                    parent: node,
                    level: level.into(),
                };
                self.edges.insert(key, child);
            }
        }
        child
    }

    /// A fresh empty node.
    fn alloc(&mut self) -> u32 {
        if let Some(id) = self.free.pop() {
            return id;
        }
        let id = Self::id(self.nodes.len());
        self.nodes.push(Node::default());
        id
    }

    /// Frees `node` and its now-vacant ancestors along `path`
    /// (`(parent, step to child)` from the root down to `node`).
    fn prune(&mut self, mut node: u32, path: &[(u32, Step<'_>)]) {
        for &(parent, step) in path.iter().rev() {
            if !self.nodes[node as usize].is_vacant() {
                return;
            }
            let p = &mut self.nodes[parent as usize];
            match step {
                Step::Plus => p.plus = NONE,
                Step::Hash => p.hash = NONE,
                Step::Named(level) => {
                    p.children -= 1;
                    self.edges.remove(&EdgeQuery { parent, level });
                }
            }
            self.nodes[node as usize] = Node::default();
            self.free.push(node);
            node = parent;
        }
    }

    /// Pushes the children of `id` onto the `for_each` stack.
    fn push_children<'a>(
        &self,
        id: u32,
        len: usize,
        kids: &HashMap<u32, Vec<(&'a str, u32)>>,
        stack: &mut Vec<(u32, usize, &'a str)>,
    ) {
        let node = &self.nodes[id as usize];
        if node.plus != NONE {
            stack.push((node.plus, len, "+"));
        }
        if node.hash != NONE {
            stack.push((node.hash, len, "#"));
        }
        for &(level, child) in kids.get(&id).into_iter().flatten() {
            stack.push((child, len, level));
        }
    }
}
