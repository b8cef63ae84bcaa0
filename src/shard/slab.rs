//! A vector of slots with a free list: stable `u32` keys for sessions, so
//! the subscriber trie stores four bytes per entry instead of a client id.
//!
//! Shard-local.

/// Slots addressed by `u32` keys; freed keys are reused.
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Store `value`, returning its key.
    pub fn insert(&mut self, value: T) -> u32 {
        self.len += 1;
        if let Some(key) = self.free.pop() {
            self.slots[key as usize] = Some(value);
            return key;
        }
        self.slots.push(Some(value));
        u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 sessions per shard")
    }

    /// Take the value out; its key becomes free.
    pub fn remove(&mut self, key: u32) -> Option<T> {
        let v = self.slots.get_mut(key as usize)?.take()?;
        self.free.push(key);
        self.len -= 1;
        Some(v)
    }

    /// The value under `key`.
    pub fn get(&self, key: u32) -> Option<&T> {
        self.slots.get(key as usize)?.as_ref()
    }

    /// The value under `key`, mutably.
    pub fn get_mut(&mut self, key: u32) -> Option<&mut T> {
        self.slots.get_mut(key as usize)?.as_mut()
    }

    /// Number of values stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Every stored value with its key.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(k, s)| Some((k as u32, s.as_ref()?)))
    }

    /// Every stored value with its key, from key `from` on.
    pub fn iter_from(&self, from: u32) -> impl Iterator<Item = (u32, &T)> + '_ {
        let start = (from as usize).min(self.slots.len());
        self.slots[start..]
            .iter()
            .enumerate()
            .filter_map(move |(i, s)| Some(((start + i) as u32, s.as_ref()?)))
    }

    /// Every stored value, mutably.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.slots.iter_mut().flatten()
    }

    /// Keys of every stored value.
    pub fn keys(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(k, _)| k as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn iteration_can_start_at_any_key() {
        let mut s = Slab::default();
        for v in 0..5 {
            s.insert(v);
        }
        s.remove(2);
        let from = |k| s.iter_from(k).map(|(k, v)| (k, *v)).collect::<Vec<_>>();
        assert_eq!(from(1), [(1, 1), (3, 3), (4, 4)]);
        assert_eq!(from(2), [(3, 3), (4, 4)]);
        assert!(from(5).is_empty() && from(99).is_empty());
    }

    #[test]
    fn keys_are_reused_and_len_tracks() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.len(), 2);
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None);
        let c = s.insert("c");
        assert_eq!(c, a);
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.keys().collect::<Vec<_>>(), vec![a, b]);
    }
}
