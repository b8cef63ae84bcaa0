//! The entries of one filter: a small inline vector searched linearly, which
//! becomes a hash map when a filter has many subscribers.

use core::hash::Hash;
use core::mem;

use crate::hash::HashMap;
use smallvec::SmallVec;

/// Above this many entries a filter's entries move to a hash map.
const SMALL_MAX: usize = 8;
/// At or below this many entries a hash map moves back to the inline vector.
const SMALL_BACK: usize = SMALL_MAX / 2;

/// Entries of one filter, keyed by `K`.
pub(crate) enum Entries<K, V> {
    /// Few entries: inline (one) or a short vector, linear search.
    Small(SmallVec<[(K, V); 1]>),
    /// Many entries: hash map, boxed to keep nodes small.
    Large(Box<HashMap<K, V>>),
}

impl<K, V> Default for Entries<K, V> {
    fn default() -> Self {
        Entries::Small(SmallVec::new())
    }
}

impl<K: Eq + Hash, V> Entries<K, V> {
    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        match self {
            Entries::Small(v) => v.len(),
            Entries::Large(m) => m.len(),
        }
    }

    /// True if there are no entries.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of `key`.
    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        match self {
            Entries::Small(v) => v.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            Entries::Large(m) => m.get(key),
        }
    }

    /// The value of `key`, mutably.
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self {
            Entries::Small(v) => v.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            Entries::Large(m) => m.get_mut(key),
        }
    }

    /// Inserts or replaces; returns the previous value.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self {
            Entries::Small(v) => {
                if let Some((_, old)) = v.iter_mut().find(|(k, _)| *k == key) {
                    return Some(mem::replace(old, value));
                }
                if v.len() < SMALL_MAX {
                    v.push((key, value));
                    return None;
                }
                let mut map: HashMap<K, V> = mem::take(v).into_iter().collect();
                map.insert(key, value);
                *self = Entries::Large(Box::new(map));
                None
            }
            Entries::Large(m) => m.insert(key, value),
        }
    }

    /// Removes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        match self {
            Entries::Small(v) => {
                let i = v.iter().position(|(k, _)| k == key)?;
                let (_, value) = v.swap_remove(i);
                if v.is_empty() {
                    // Give back a spilled buffer once the filter is empty.
                    *v = SmallVec::new();
                }
                Some(value)
            }
            Entries::Large(m) => {
                let value = m.remove(key)?;
                if m.len() <= SMALL_BACK {
                    let small = mem::take(m.as_mut()).into_iter().collect();
                    *self = Entries::Small(small);
                }
                Some(value)
            }
        }
    }

    /// Calls `f` for every entry.
    #[inline]
    pub(crate) fn for_each(&self, f: &mut impl FnMut(&K, &V)) {
        match self {
            Entries::Small(v) => v.iter().for_each(|(k, v)| f(k, v)),
            Entries::Large(m) => m.iter().for_each(|(k, v)| f(k, v)),
        }
    }

    /// Iterates over the entries.
    pub(crate) fn iter(&self) -> EntriesIter<'_, K, V> {
        match self {
            Entries::Small(v) => EntriesIter(Inner::Small(v.iter())),
            Entries::Large(m) => EntriesIter(Inner::Large(m.iter())),
        }
    }

    /// Bytes this value owns on the heap (approximate for the map).
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Entries::Small(v) if v.spilled() => v.capacity() * mem::size_of::<(K, V)>(),
            Entries::Small(_) => 0,
            Entries::Large(m) => {
                mem::size_of::<HashMap<K, V>>()
                    + m.capacity() * 8 / 7 * (mem::size_of::<(K, V)>() + 1)
            }
        }
    }
}

/// Iterator over the entries of one filter, see
/// [`FilterTrie::entries`](crate::router::FilterTrie::entries).
pub struct EntriesIter<'a, K, V>(Inner<'a, K, V>);

enum Inner<'a, K, V> {
    Empty,
    Small(core::slice::Iter<'a, (K, V)>),
    Large(hashbrown::hash_map::Iter<'a, K, V>),
}

impl<K, V> EntriesIter<'_, K, V> {
    /// An iterator over nothing.
    pub(crate) fn empty() -> Self {
        EntriesIter(Inner::Empty)
    }
}

impl<'a, K, V> Iterator for EntriesIter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            Inner::Empty => None,
            Inner::Small(it) => it.next().map(|(k, v)| (k, v)),
            Inner::Large(it) => it.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match &self.0 {
            Inner::Empty => (0, Some(0)),
            Inner::Small(it) => it.size_hint(),
            Inner::Large(it) => it.size_hint(),
        }
    }
}
