//! How freed objects and empty slabs are kept for reuse and given back: objects past their
//! quarantine handed out again as they are, the ready ones trimmed to what refills take, and
//! cached empty slabs released once unused for a while or when the guest goes idle.

use std::time::Duration;

use crate::memory::space::{AddressSpace, Phys};

use super::{SlabAllocator, SlabError, SlabId, cache};
use protocol::slab::{CLASSES, NR_CLASSES};

impl SlabAllocator {
    /// Gives the freed objects of `class` past the newest `keep` of each node back to their
    /// slabs.
    pub(super) fn trim(
        &mut self,
        space: &mut AddressSpace,
        phys: &mut Phys<'_>,
        class: usize,
        keep: usize,
    ) -> Result<(), SlabError> {
        for q in 0..self.caches[class].quarantine.len() {
            while self.caches[class].quarantine[q].len() > keep {
                let (id, i) = self.caches[class].quarantine[q].pop_front().expect("non-empty");
                self.release_object(space, phys, id, i)?;
            }
        }
        Ok(())
    }

    /// Hands out, into `out` (up to `want` in all), freed objects of `class` on `node` that have
    /// served their quarantine, the most recently freed first (their memory is the warmest in
    /// the caches and the TLB): they stay handed out in their slabs and only leave the
    /// quarantine. Older ready ones wait for a later refill or go back to their slabs (`trim`).
    pub(super) fn recycle(&mut self, class: usize, node: usize, want: usize, out: &mut Vec<u64>) {
        let size = u64::from(CLASSES[class]);
        let keep = cache::KEPT[class].quarantine;
        let q = &mut self.caches[class].quarantine[node];
        let ready = q.len().saturating_sub(keep);
        let n = want.saturating_sub(out.len()).min(ready);
        for (id, i) in q.drain(ready - n..ready).rev() {
            let s = self.arena[id as usize].as_mut().expect("live slab id");
            s.set_held(i, false);
            out.push(s.va + u64::from(i) * size);
        }
    }

    /// Gives back every cached empty slab but one per class and node (and the ready objects
    /// past each quarantine), and forgets the classes' peaks: for a guest that has stopped
    /// allocating. Returns the slabs released.
    pub fn trim_empty(&mut self, space: &mut AddressSpace, phys: &mut Phys<'_>) -> Result<u64, SlabError> {
        for class in 0..NR_CLASSES {
            self.trim(space, phys, class, cache::KEPT[class].quarantine)?;
            self.caches[class].peak = 0;
        }
        self.purge(space, phys, Duration::ZERO)
    }

    /// Gives back the cached empty slabs that stayed unused for `older_than` (all but one per
    /// class and node). Returns the slabs released.
    pub fn purge(
        &mut self,
        space: &mut AddressSpace,
        phys: &mut Phys<'_>,
        older_than: Duration,
    ) -> Result<u64, SlabError> {
        let before = self.counters.slabs_released;
        for class in 0..NR_CLASSES {
            for node in 0..self.caches[class].empty.len() {
                // Oldest first: slabs are reused from the back.
                let list = &self.caches[class].empty[node];
                let old = list[..list.len().saturating_sub(1)]
                    .iter()
                    .take_while(|&&id| self.slab(id).empty_since.is_none_or(|t| t.elapsed() >= older_than))
                    .count();
                let gone: Vec<SlabId> = self.caches[class].empty[node].drain(..old).collect();
                for id in gone {
                    self.release_slab(space, phys, id)?;
                }
            }
        }
        Ok(self.counters.slabs_released - before)
    }
}
