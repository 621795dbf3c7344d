//! A hierarchical bitset: set, clear and test in O(1) amortized, "lowest set bit" in
//! O(log64 n). The buddy allocator keeps one per order as its free list: bit `i` set means
//! block `i` of that order is free.
//!
//! Level 0 holds one bit per item; each higher level holds one bit per word of the level below,
//! set when that word is non-zero. Storage is zero-initialised with `calloc`, so a large, mostly
//! empty bitset costs no resident memory until bits are set.

use crate::memory::zeroed::ZeroedVec;

#[derive(Debug)]
pub struct BitTree {
    /// `levels[0]` is the leaf level; the last level has a single word.
    levels: Vec<ZeroedVec<u64>>,
    len: u64,
    count: u64,
}

impl BitTree {
    /// A bitset of `len` bits, all clear; fails if the host cannot map its storage.
    pub fn new(len: u64) -> std::io::Result<Self> {
        let mut levels = Vec::new();
        let mut bits = len.max(1);
        loop {
            let words = bits.div_ceil(64);
            let words = usize::try_from(words).map_err(|_| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
            levels.push(ZeroedVec::try_new(words)?);
            if words == 1 {
                break;
            }
            bits = words as u64;
        }
        Ok(BitTree { levels, len, count: 0 })
    }

    /// Number of bits.
    pub fn bits(&self) -> u64 {
        self.len
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes of metadata this bitset reserves (resident only where touched).
    pub fn metadata_bytes(&self) -> u64 {
        self.levels.iter().map(|l| l.len() as u64 * 8).sum()
    }

    /// Releases all-zero metadata pages (see `ZeroedVec::trim`).
    pub fn trim(&mut self) -> usize {
        self.levels.iter_mut().map(ZeroedVec::trim).sum()
    }

    /// Whether bit `i` is set. `i` must be `< len`.
    pub fn test(&self, i: u64) -> bool {
        debug_assert!(i < self.len);
        let (w, b) = split(i);
        self.levels[0][w] & (1 << b) != 0
    }

    /// Sets bit `i`; returns whether it was clear.
    pub fn set(&mut self, i: u64) -> bool {
        debug_assert!(i < self.len);
        let mut idx = i;
        for (lvl, words) in self.levels.iter_mut().enumerate() {
            let (w, b) = split(idx);
            let was = words[w];
            words[w] = was | (1 << b);
            if lvl == 0 {
                if was & (1 << b) != 0 {
                    return false;
                }
                self.count += 1;
            }
            if was != 0 {
                // The summary bits above are already set.
                break;
            }
            idx = w as u64;
        }
        true
    }

    /// Clears bit `i`; returns whether it was set.
    pub fn clear(&mut self, i: u64) -> bool {
        debug_assert!(i < self.len);
        let mut idx = i;
        for (lvl, words) in self.levels.iter_mut().enumerate() {
            let (w, b) = split(idx);
            let was = words[w];
            let now = was & !(1 << b);
            words[w] = now;
            if lvl == 0 {
                if was == now {
                    return false;
                }
                self.count -= 1;
            }
            if now != 0 {
                break;
            }
            idx = w as u64;
        }
        true
    }

    /// The lowest set bit, if any.
    pub fn first_set(&self) -> Option<u64> {
        let top = self.levels.len() - 1;
        if self.levels[top][0] == 0 {
            return None;
        }
        let mut idx = 0u64;
        for lvl in (0..=top).rev() {
            let word = self.levels[lvl][usize::try_from(idx).ok()?];
            debug_assert!(word != 0, "summary bit set over an empty word");
            idx = idx * 64 + u64::from(word.trailing_zeros());
        }
        Some(idx)
    }

    /// Iterates over set bits in ascending order (for invariant checks and stats).
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.levels[0].iter().enumerate().flat_map(|(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let b = rest.trailing_zeros();
                rest &= rest - 1;
                Some(w as u64 * 64 + u64::from(b))
            })
        })
    }

    /// Checks that every summary bit matches the level below and that `count` is exact.
    pub fn check_invariants(&self) -> Result<(), String> {
        for lvl in 1..self.levels.len() {
            let below = &self.levels[lvl - 1];
            for (w, &word) in below.iter().enumerate() {
                let (sw, sb) = split(w as u64);
                let summary = self.levels[lvl][sw] & (1 << sb) != 0;
                if summary != (word != 0) {
                    return Err(format!("level {lvl} summary bit {w} is {summary}, word is {word:#x}"));
                }
            }
        }
        let counted: u64 = self.levels[0].iter().map(|w| u64::from(w.count_ones())).sum();
        if counted != self.count {
            return Err(format!("count {} but {counted} bits set", self.count));
        }
        if let Some(last) = self.iter().last()
            && last >= self.len
        {
            return Err(format!("bit {last} set beyond length {}", self.len));
        }
        Ok(())
    }
}

fn split(i: u64) -> (usize, u32) {
    // Word indices fit in usize: the level was allocated with that many words.
    #[allow(clippy::cast_possible_truncation)]
    ((i / 64) as usize, (i % 64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn basics() {
        let mut b = BitTree::new(100_000).unwrap();
        assert_eq!(b.first_set(), None);
        assert!(b.set(70_000));
        assert!(!b.set(70_000));
        assert!(b.set(5));
        assert_eq!(b.first_set(), Some(5));
        assert!(b.clear(5));
        assert!(!b.clear(5));
        assert_eq!(b.first_set(), Some(70_000));
        assert_eq!(b.count(), 1);
        b.check_invariants().unwrap();
    }

    proptest! {
        #[test]
        fn matches_btreeset(len in 1u64..20_000, ops in prop::collection::vec((any::<bool>(), any::<u64>()), 0..400)) {
            let mut b = BitTree::new(len).unwrap();
            let mut m = BTreeSet::new();
            for (set, x) in ops {
                let i = x % len;
                if set {
                    prop_assert_eq!(b.set(i), m.insert(i));
                } else {
                    prop_assert_eq!(b.clear(i), m.remove(&i));
                }
                prop_assert_eq!(b.first_set(), m.iter().next().copied());
                prop_assert_eq!(b.count(), m.len() as u64);
            }
            b.check_invariants().unwrap();
            prop_assert_eq!(b.iter().collect::<Vec<_>>(), m.into_iter().collect::<Vec<_>>());
        }
    }
}
