//! Metric handles resolved once per label set. `counter!(name, labels)`
//! builds a key (allocating its labels), hashes it and looks it up in the
//! recorder's registry on every call: about 2,000 instructions and several
//! allocations each, eight times a request (benches/instr). A handle found
//! here costs a hash of the label values and a read lock.
//!
//! Owner: each `HandleCache`'s own `RwLock`, held for one lookup or insert.
//! Label sets are bounded by the configuration (regions, models, tenants,
//! outcomes); should a cache ever pass `MAX_ENTRIES` it starts again
//! empty rather than grow (series stay registered in the recorder).

use std::collections::HashMap;
use std::hash::Hash;

use foldhash::fast::RandomState;
use parking_lot::RwLock;

const MAX_ENTRIES: usize = 4096;

pub(super) struct HandleCache<K, H> {
    /// Keys are names from the configuration, not a caller's bytes: a fast
    /// hasher (SipHash was most of a lookup) is safe here.
    map: RwLock<HashMap<K, H, RandomState>>,
}

impl<K: Eq + Hash, H: Clone> HandleCache<K, H> {
    pub fn new() -> Self {
        Self {
            map: RwLock::new(HashMap::default()),
        }
    }

    /// The handles for `key`, registered with `make` the first time.
    pub fn get(&self, key: K, make: impl FnOnce(&K) -> H) -> H {
        if let Some(h) = self.map.read().get(&key) {
            return h.clone();
        }
        let handles = make(&key);
        let mut map = self.map.write();
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.entry(key).or_insert(handles).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_once_per_key_and_stays_bounded() {
        let cache: HandleCache<u32, u32> = HandleCache::new();
        let mut made = 0;
        for _ in 0..3 {
            assert_eq!(
                cache.get(7, |k| {
                    made += 1;
                    k * 2
                }),
                14
            );
        }
        assert_eq!(made, 1, "registered once");
        for k in 0..(MAX_ENTRIES as u32 + 10) {
            cache.get(k, |k| *k);
        }
        assert!(cache.map.read().len() <= MAX_ENTRIES);
    }
}
