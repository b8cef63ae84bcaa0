//! The hash maps of the broker's state: hashbrown with foldhash, seeded at
//! random per map (a client cannot aim keys at one bucket), or, on a
//! thread where the simulator fixed the seeds, from that seed, so that the
//! iteration order of every map, and with it a whole simulated run,
//! replays from its seed.
//!
//! Used on every core; the seed setting is per thread.

use std::cell::Cell;
use std::hash::BuildHasher;

use foldhash::fast::{FoldHasher, SeedableRandomState};
use foldhash::SharedSeed;

/// A `hashbrown::HashMap` seeded as the module docs say.
pub type HashMap<K, V> = hashbrown::HashMap<K, V, BuildHash>;

/// A `hashbrown::HashSet` seeded as the module docs say.
pub type HashSet<K> = hashbrown::HashSet<K, BuildHash>;

thread_local! {
    /// The seed the next map built on this thread gets, when fixed.
    static FIXED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// From now on, maps built on this thread are seeded from `seed` (each
/// the next value of a sequence that starts there); `None` goes back to
/// random seeds. For the simulator: never set in the broker.
pub fn fix_seeds_on_this_thread(seed: Option<u64>) {
    FIXED.with(|f| f.set(seed));
}

/// The hasher builder of [`HashMap`] and [`HashSet`]: foldhash's own
/// seedable state, so a fixed seed costs the hot path nothing.
#[derive(Clone, Debug)]
pub struct BuildHash(SeedableRandomState);

impl Default for BuildHash {
    fn default() -> BuildHash {
        match FIXED.with(Cell::get) {
            None => BuildHash(SeedableRandomState::random()),
            Some(seed) => {
                let next = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                FIXED.with(|f| f.set(Some(next)));
                BuildHash(SeedableRandomState::with_seed(
                    seed,
                    SharedSeed::global_fixed(),
                ))
            }
        }
    }
}

impl BuildHasher for BuildHash {
    type Hasher = FoldHasher;

    #[inline]
    fn build_hasher(&self) -> FoldHasher {
        self.0.build_hasher()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(seed: Option<u64>) -> Vec<u32> {
        fix_seeds_on_this_thread(seed);
        let set: HashSet<u32> = (0..64).collect();
        fix_seeds_on_this_thread(None);
        set.into_iter().collect()
    }

    #[test]
    fn a_fixed_seed_gives_one_iteration_order_and_another_seed_another() {
        assert_eq!(order(Some(7)), order(Some(7)));
        assert_ne!(order(Some(7)), order(Some(8)));
    }
}
