//! The slab allocator: small guest objects (8 B to 4 KiB) carved from slabs of buddy pages, on
//! the model of Linux's SLUB.
//!
//! - A slab is a run of frames from one node, mapped read-write into the guest as a region of
//!   kind `Slab` (the guest cannot free, protect or move it). Its metadata (one bit per object:
//!   handed out or free) lives here, never in guest RAM.
//! - Per vCPU and class, a *current slab* serves refills, so a vCPU's objects come from its own
//!   slabs (no false sharing between vCPUs). Per node and class, a *partial list* holds slabs with
//!   free objects that no vCPU owns, and one empty slab stays cached; further empty slabs go back
//!   to the buddy allocator and lose their host backing.
//! - Objects move in batches through per-vCPU magazines in guest memory (`protocol::slab`): one
//!   SLAB_EXCHANGE drains up to a batch of freed objects and refills up to a batch of new ones.
//!   Every object coming back is validated (a live slab, an object boundary, handed out); a bad
//!   one changes nothing and is reported.
//! - A freed object is not reusable at once: it waits in a per-class quarantine (a FIFO of about
//!   two batches) first. Meanwhile a second free of it, or any use of its handle, is caught as a
//!   double free, and a dangling pointer does not alias a new object yet. Memory pressure drains
//!   the quarantine before an allocation fails.
//!
//! - Each slab sits in its own 64 KiB slot of the slab address zone, so the slab of any pointer
//!   is one array lookup (no search), and releasing a slab leaves its slot unmapped for a while
//!   (the zone's quarantine), so a dangling pointer faults.
//!
//! Locking: the slab allocator is part of the memory manager and runs under its lock.

use std::collections::BTreeSet;

use protocol::layout::{SLAB_SLOT, SLAB_VA_END, SLAB_VA_START};
use protocol::memcall::prot;
use protocol::slab::{CLASSES, NR_CLASSES};

use super::addr::{NodeId, PAGE_SIZE, to_usize};
use super::manager::MemoryManager;
use super::policy::Policy;
use super::regions::{RegionError, RegionKind};

/// Pages per slab for `size`: at least 16 objects and 16 KiB (so page tables stay under 1% of
/// slab memory), a power of two, at most a slot.
pub fn slab_pages(size: u32) -> u64 {
    (u64::from(size) * 16).div_ceil(PAGE_SIZE).next_power_of_two().clamp(4, SLAB_SLOT / PAGE_SIZE)
}

/// Slab id: index into the arena.
type SlabId = u32;

/// One slab.
#[derive(Debug)]
pub struct Slab {
    pub va: u64,
    pub class: usize,
    pub node: NodeId,
    pub objects: u32,
    /// Objects handed out (in a magazine or in use by the guest).
    pub in_use: u32,
    /// Bit `i`: object `i` is not available (handed out, or in quarantine).
    handed: Vec<u64>,
    /// Bit `i`: object `i` is in quarantine.
    quarantined: Vec<u64>,
    /// The vCPU whose current slab this is.
    pub owner: Option<u32>,
    /// The vCPU that owned it last: it gets the slab back first, so a slab whose objects may
    /// still sit in that vCPU's magazines does not move to another vCPU.
    pub last_owner: Option<u32>,
    /// Where the search for a free object starts (next-fit).
    cursor: u32,
}

impl Slab {
    fn is_handed(&self, i: u32) -> bool {
        self.handed[i as usize / 64] & (1 << (i % 64)) != 0
    }

    fn set_handed(&mut self, i: u32, on: bool) {
        set_bit(&mut self.handed, i, on);
    }

    fn is_quarantined(&self, i: u32) -> bool {
        self.quarantined[i as usize / 64] & (1 << (i % 64)) != 0
    }

    /// The next free object at or after the cursor (wrapping), if any.
    fn next_free(&mut self) -> Option<u32> {
        let words = self.handed.len();
        let start = self.cursor as usize / 64;
        for k in 0..=words {
            let w = (start + k) % words;
            // On the first word, ignore the bits below the cursor; they come last.
            let mask = if k == 0 { !0u64 << (self.cursor % 64) } else { !0u64 };
            let free = !self.handed[w] & mask;
            if free != 0 {
                let i = u32::try_from(w * 64).ok()? + free.trailing_zeros();
                if i < self.objects {
                    self.cursor = (i + 1) % self.objects;
                    return Some(i);
                }
            }
        }
        None
    }
}

fn set_bit(words: &mut [u64], i: u32, on: bool) {
    let w = &mut words[i as usize / 64];
    if on {
        *w |= 1 << (i % 64);
    } else {
        *w &= !(1 << (i % 64));
    }
}

/// What an exchange gives back: the objects handed out, and the bad frees with their status.
pub type Exchanged = (Vec<u64>, Vec<(u64, u64)>);

/// Objects of `size` a class keeps in quarantine: two exchange batches.
pub fn quarantine_len(size: u32) -> usize {
    2 * protocol::slab::batch(size)
}

/// Per-class state.
#[derive(Debug, Default)]
struct Cache {
    /// Current slab of each vCPU (by id).
    cpu_slab: Vec<Option<SlabId>>,
    /// Per node: slabs with free objects that no vCPU owns.
    partial: Vec<BTreeSet<SlabId>>,
    /// Per node: one empty slab kept for reuse.
    empty: Vec<Option<SlabId>>,
    /// Freed objects waiting to become reusable, oldest first: (slab, object index).
    quarantine: std::collections::VecDeque<(SlabId, u32)>,
    slabs: u64,
    /// Objects handed to the guest (not counting the quarantine).
    active: u64,
}

/// What the slab allocator has done.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SlabCounters {
    pub exchanges: u64,
    pub objects_out: u64,
    pub objects_in: u64,
    pub bad_frees: u64,
    pub slabs_created: u64,
    pub slabs_released: u64,
}

/// `/proc/slabinfo`-style figures for one class.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlabInfo {
    pub size: u32,
    /// Object capacity of all slabs.
    pub objects: u64,
    /// Objects handed out.
    pub active: u64,
    pub slabs: u64,
    pub pages: u64,
    pub partial: u64,
    pub cached_empty: u64,
    /// Freed objects waiting in quarantine.
    pub quarantined: u64,
}

/// All slabs and classes.
#[derive(Debug)]
pub struct SlabAllocator {
    caches: Vec<Cache>,
    /// Slabs by id; `None` marks a free id.
    arena: Vec<Option<Slab>>,
    free_ids: Vec<SlabId>,
    /// Per 64 KiB slot of the slab zone: the id of the slab there, plus one (0: none).
    slots: super::zeroed::ZeroedVec<u32>,
    pub counters: SlabCounters,
}

impl SlabAllocator {
    pub fn new(nodes: usize) -> Self {
        let caches = (0..NR_CLASSES)
            .map(|_| Cache { partial: vec![BTreeSet::new(); nodes], empty: vec![None; nodes], ..Default::default() })
            .collect();
        SlabAllocator {
            caches,
            arena: Vec::new(),
            free_ids: Vec::new(),
            slots: super::zeroed::ZeroedVec::new(to_usize((SLAB_VA_END - SLAB_VA_START) / SLAB_SLOT)),
            counters: SlabCounters::default(),
        }
    }

    fn slab(&self, id: SlabId) -> &Slab {
        self.arena[id as usize].as_ref().expect("live slab id")
    }

    fn slab_mut(&mut self, id: SlabId) -> &mut Slab {
        self.arena[id as usize].as_mut().expect("live slab id")
    }

    fn slot_of(va: u64) -> Option<usize> {
        (SLAB_VA_START..SLAB_VA_END).contains(&va).then(|| to_usize((va - SLAB_VA_START) / SLAB_SLOT))
    }

    /// The slab containing `ptr` and the object's index: `NotFound` unless `ptr` is exactly
    /// an object of a live slab. One array lookup.
    fn locate(&self, ptr: u64) -> Result<(SlabId, u32), RegionError> {
        let slot = Self::slot_of(ptr).ok_or(RegionError::NotFound)?;
        let id = self.slots[slot].checked_sub(1).ok_or(RegionError::NotFound)?;
        let s = self.slab(id);
        let size = u64::from(CLASSES[s.class]);
        let off = ptr - s.va;
        if !off.is_multiple_of(size) || off / size >= u64::from(s.objects) {
            return Err(RegionError::NotFound);
        }
        Ok((id, u32::try_from(off / size).expect("fewer objects than u32")))
    }

    fn insert(&mut self, s: Slab) -> SlabId {
        let slot = Self::slot_of(s.va).expect("slabs live in the slab zone");
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.arena[id as usize] = Some(s);
                id
            }
            None => {
                self.arena.push(Some(s));
                SlabId::try_from(self.arena.len() - 1).expect("fewer slabs than u32")
            }
        };
        self.slots[slot] = id + 1;
        id
    }

    fn remove(&mut self, id: SlabId) -> Slab {
        let s = self.arena[id as usize].take().expect("live slab id");
        self.slots[Self::slot_of(s.va).expect("slab zone")] = 0;
        self.free_ids.push(id);
        s
    }

    fn live(&self) -> impl Iterator<Item = (SlabId, &Slab)> {
        self.arena.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (SlabId::try_from(i).expect("u32"), s)))
    }

    /// Per-class figures.
    pub fn info(&self) -> Vec<SlabInfo> {
        self.caches
            .iter()
            .enumerate()
            .map(|(c, cache)| {
                let size = CLASSES[c];
                let per = u64::from(objects_per_slab(size));
                SlabInfo {
                    size,
                    objects: cache.slabs * per,
                    active: cache.active,
                    slabs: cache.slabs,
                    pages: cache.slabs * slab_pages(size),
                    partial: cache.partial.iter().map(|p| p.len() as u64).sum(),
                    cached_empty: cache.empty.iter().filter(|e| e.is_some()).count() as u64,
                    quarantined: cache.quarantine.len() as u64,
                }
            })
            .collect()
    }

    /// Objects handed out, all classes.
    pub fn active(&self) -> u64 {
        self.caches.iter().map(|c| c.active).sum()
    }

    /// Frames in slabs.
    pub fn frames(&self) -> u64 {
        self.live().map(|(_, s)| slab_pages(CLASSES[s.class])).sum()
    }
}

/// Objects per slab of `size`.
pub fn objects_per_slab(size: u32) -> u32 {
    u32::try_from(slab_pages(size) * PAGE_SIZE / u64::from(size)).expect("a slab holds few objects")
}

impl MemoryManager {
    /// SLAB_EXCHANGE for vCPU `cpu` on `node`: returns `frees` to their slabs (the bad ones,
    /// with their status, in the second result), then hands out up to `want` objects of `class`.
    /// Fewer (or none) when memory runs out.
    pub fn slab_exchange(
        &mut self,
        cpu: u32,
        node: NodeId,
        class: usize,
        frees: &[u64],
        want: usize,
    ) -> Result<Exchanged, RegionError> {
        if class >= NR_CLASSES {
            return Err(RegionError::Invalid("no such size class"));
        }
        let mut bad = Vec::new();
        for &p in frees {
            match self.slab_free(p) {
                Ok(()) => {}
                Err(RegionError::Internal(e)) => return Err(RegionError::Internal(e)),
                Err(e) => bad.push((p, e.status())),
            }
        }
        self.slab.counters.exchanges += 1;
        let out = match self.slab_take(cpu, node, class, want) {
            Ok(out) => out,
            // The drain still counts; the caller reports ENOMEM for an empty refill.
            Err(RegionError::NoMemory) => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok((out, bad))
    }

    /// Returns one object (into quarantine). `NotFound` for anything but an object of a live
    /// slab, `DoubleFree` for one that is free or in quarantine; neither changes anything.
    pub fn slab_free(&mut self, ptr: u64) -> Result<(), RegionError> {
        let located = self.slab.locate(ptr);
        let Ok((id, i)) = located else {
            self.slab.counters.bad_frees += 1;
            return located.map(|_| ());
        };
        let s = self.slab.slab_mut(id);
        if !s.is_handed(i) || s.is_quarantined(i) {
            self.slab.counters.bad_frees += 1;
            return Err(RegionError::DoubleFree);
        }
        set_bit(&mut s.quarantined, i, true);
        let class = s.class;
        let cache = &mut self.slab.caches[class];
        cache.active -= 1;
        cache.quarantine.push_back((id, i));
        self.slab.counters.objects_in += 1;
        if cache.quarantine.len() > quarantine_len(CLASSES[class]) {
            let (oldest, j) = cache.quarantine.pop_front().expect("non-empty");
            self.release_object(oldest, j)?;
        }
        Ok(())
    }

    /// Makes a quarantined object free in its slab, moving the slab between lists (and
    /// releasing it when it is empty and one empty slab is already cached).
    fn release_object(&mut self, id: SlabId, i: u32) -> Result<(), RegionError> {
        let s = self.slab.slab_mut(id);
        set_bit(&mut s.quarantined, i, false);
        s.set_handed(i, false);
        s.in_use -= 1;
        let (class, node, in_use, objects, owned) =
            (s.class, s.node.0 as usize, s.in_use, s.objects, s.owner.is_some());
        let cache = &mut self.slab.caches[class];
        if owned {
            return Ok(());
        }
        if in_use + 1 == objects {
            // Was full: now it has room.
            cache.partial[node].insert(id);
        }
        if in_use == 0 {
            cache.partial[node].remove(&id);
            if cache.empty[node].is_none() {
                cache.empty[node] = Some(id);
            } else {
                self.release_slab(id)?;
            }
        }
        Ok(())
    }

    /// SLAB_INFO: the size of the handed-out object at `ptr`.
    pub fn slab_info(&self, ptr: u64) -> Result<u32, RegionError> {
        let (id, i) = self.slab.locate(ptr)?;
        let s = self.slab.slab(id);
        if !s.is_handed(i) || s.is_quarantined(i) {
            return Err(RegionError::DoubleFree);
        }
        Ok(CLASSES[s.class])
    }

    /// Up to `want` objects of `class` for `cpu`: from its current slab, then a partial slab of
    /// its node, the node's cached empty slab, a new slab (on the node, else nearby), and last
    /// other nodes' partial slabs.
    fn slab_take(&mut self, cpu: u32, node: NodeId, class: usize, want: usize) -> Result<Vec<u64>, RegionError> {
        let size = u64::from(CLASSES[class]);
        let c = cpu as usize;
        let mut out = Vec::with_capacity(want);
        while out.len() < want {
            let cache = &mut self.slab.caches[class];
            if cache.cpu_slab.len() <= c {
                cache.cpu_slab.resize(c + 1, None);
            }
            if let Some(id) = cache.cpu_slab[c] {
                let s = self.slab.slab_mut(id);
                let va = s.va;
                while out.len() < want {
                    let Some(i) = s.next_free() else { break };
                    s.set_handed(i, true);
                    s.in_use += 1;
                    out.push(va + u64::from(i) * size);
                }
                if out.len() == want {
                    break;
                }
                // Exhausted (full): give it up; frees will put it on the partial list.
                s.last_owner = s.owner.take();
                self.slab.caches[class].cpu_slab[c] = None;
            }
            let Some(next) = self.next_slab(class, node, cpu)? else { break };
            let s = self.slab.slab_mut(next);
            s.owner = Some(cpu);
            self.slab.caches[class].cpu_slab[c] = Some(next);
        }
        let n = out.len() as u64;
        self.slab.caches[class].active += n;
        self.slab.counters.objects_out += n;
        if out.is_empty() && want > 0 {
            return Err(RegionError::NoMemory);
        }
        Ok(out)
    }

    /// A slab with free objects for vCPU `cpu` on `node` to own next: preferably one it owned
    /// before.
    fn next_slab(&mut self, class: usize, node: NodeId, cpu: u32) -> Result<Option<SlabId>, RegionError> {
        let n = node.0 as usize;
        let arena = &self.slab.arena;
        let cache = &mut self.slab.caches[class];
        let own = cache.partial[n]
            .iter()
            .take(16)
            .copied()
            .find(|&id| arena[id as usize].as_ref().is_some_and(|s| s.last_owner == Some(cpu)));
        if let Some(va) = own.or_else(|| cache.partial[n].first().copied()) {
            cache.partial[n].remove(&va);
            return Ok(Some(va));
        }
        if let Some(va) = cache.empty[n].take() {
            return Ok(Some(va));
        }
        match self.new_slab(class, node) {
            Ok(va) => return Ok(Some(va)),
            Err(RegionError::NoMemory) => {}
            Err(e) => return Err(e),
        }
        // Out of memory: release the quarantine, then take another node's partial or empty
        // slab rather than fail.
        while let Some((id, i)) = self.slab.caches[class].quarantine.pop_front() {
            self.release_object(id, i)?;
        }
        let cache = &mut self.slab.caches[class];
        for other in 0..cache.partial.len() {
            if let Some(va) = cache.partial[other].pop_first().or_else(|| cache.empty[other].take()) {
                return Ok(Some(va));
            }
        }
        Ok(None)
    }

    /// Maps a new slab on `node` (or, if it is full, the nearest node with room).
    fn new_slab(&mut self, class: usize, node: NodeId) -> Result<SlabId, RegionError> {
        let size = CLASSES[class];
        let pages = slab_pages(size);
        let va = self.map_slab(pages, Policy::Preferred(node), node)?;
        let objects = objects_per_slab(size);
        let first = self.regions[&va].frame(0).expect("slabs have frames");
        let node = NodeId(u32::try_from(self.pool.states.node(first).expect("RAM")).expect("few nodes"));
        let id = self.slab.insert(Slab {
            va,
            class,
            node,
            objects,
            in_use: 0,
            handed: vec![0; objects.div_ceil(64) as usize],
            quarantined: vec![0; objects.div_ceil(64) as usize],
            owner: None,
            last_owner: None,
            cursor: 0,
        });
        let cache = &mut self.slab.caches[class];
        cache.slabs += 1;
        self.slab.counters.slabs_created += 1;
        Ok(id)
    }

    /// Unmaps an empty slab and gives its frames back (at the next flush).
    fn release_slab(&mut self, id: SlabId) -> Result<(), RegionError> {
        let s = self.slab.remove(id);
        debug_assert_eq!(s.in_use, 0);
        self.slab.caches[s.class].slabs -= 1;
        self.slab.counters.slabs_released += 1;
        let region = self.regions.remove(&s.va).expect("slabs are regions");
        self.drop_region(region)
    }

    /// Checks every slab against its region and lists, and the per-class counts.
    pub(super) fn check_slabs(&self) -> Result<(), String> {
        let mut slabs = [0u64; NR_CLASSES];
        let mut active = [0u64; NR_CLASSES];
        let mut quarantined = [0u64; NR_CLASSES];
        for (id, s) in self.slab.live() {
            let va = s.va;
            if self.slab.locate(va).ok().map(|l| l.0) != Some(id) {
                return Err(format!("slab {va:#x}: its slot does not lead to it"));
            }
            let handed: u32 = s.handed.iter().map(|w| w.count_ones()).sum();
            if handed != s.in_use {
                return Err(format!("slab {va:#x}: {} handed bits, in_use {}", handed, s.in_use));
            }
            if s.quarantined.iter().zip(&s.handed).any(|(q, h)| q & !h != 0) {
                return Err(format!("slab {va:#x}: a quarantined object is marked free"));
            }
            let q: u32 = s.quarantined.iter().map(|w| w.count_ones()).sum();
            quarantined[s.class] += u64::from(q);
            let r = self.regions.get(&va).ok_or(format!("slab {va:#x} has no region"))?;
            if r.kind != RegionKind::Slab
                || r.len != slab_pages(CLASSES[s.class]) * PAGE_SIZE
                || r.prot_at(0) != prot::READ | prot::WRITE
            {
                return Err(format!("slab {va:#x}: region does not match"));
            }
            let cache = &self.slab.caches[s.class];
            let n = s.node.0 as usize;
            let in_partial = cache.partial[n].contains(&id);
            let is_empty = cache.empty[n] == Some(id);
            match s.owner {
                Some(cpu) => {
                    if cache.cpu_slab.get(cpu as usize).copied().flatten() != Some(id) || in_partial || is_empty {
                        return Err(format!("slab {va:#x}: owned by vCPU {cpu} but listed elsewhere"));
                    }
                }
                None => {
                    let want_partial = s.in_use > 0 && s.in_use < s.objects;
                    if in_partial != want_partial || is_empty != (s.in_use == 0) {
                        return Err(format!(
                            "slab {va:#x}: in_use {} of {}, partial {in_partial}, empty {is_empty}",
                            s.in_use, s.objects
                        ));
                    }
                }
            }
            slabs[s.class] += 1;
            active[s.class] += u64::from(s.in_use - q);
        }
        for (c, cache) in self.slab.caches.iter().enumerate() {
            if cache.slabs != slabs[c] || cache.active != active[c] || cache.quarantine.len() as u64 != quarantined[c] {
                return Err(format!(
                    "class {}: counts {} slabs / {} active / {} quarantined, found {} / {} / {}",
                    CLASSES[c],
                    cache.slabs,
                    cache.active,
                    cache.quarantine.len(),
                    slabs[c],
                    active[c],
                    quarantined[c]
                ));
            }
            for (cpu, s) in cache.cpu_slab.iter().enumerate() {
                if let Some(id) = *s
                    && self.slab.arena[id as usize].as_ref().and_then(|s| s.owner)
                        != Some(u32::try_from(cpu).expect("few vCPUs"))
                {
                    return Err(format!("class {}: vCPU {cpu}'s slab {id} is not owned by it", CLASSES[c]));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// A two-node memory manager over real (unregistered) guest RAM, without KVM.
    fn manager() -> MemoryManager {
        crate::memory::manager::standalone(&[16 << 20, 16 << 20]).unwrap()
    }

    #[derive(Debug, Clone)]
    enum Pick {
        /// A live object of the class (by index into the model's set).
        Live(usize),
        /// An object freed earlier.
        Freed(usize),
        /// A live object plus a few bytes: inside an object, not at its start.
        Inside(usize, u64),
        /// An address that is no object.
        Wild(u64),
    }

    #[derive(Debug, Clone)]
    enum Op {
        Exchange { cpu: u32, class: usize, frees: Vec<Pick>, want: usize },
        Free(usize, Pick),
        Info(usize, Pick),
    }

    fn pick() -> impl Strategy<Value = Pick> {
        prop_oneof![
            6 => any::<usize>().prop_map(Pick::Live),
            2 => any::<usize>().prop_map(Pick::Freed),
            1 => (any::<usize>(), 1u64..8).prop_map(|(i, d)| Pick::Inside(i, d)),
            1 => (0u64..1 << 20).prop_map(Pick::Wild),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        // A few classes, so slabs fill, empty and get reused.
        let class = prop::sample::select(vec![0usize, 4, 9, 16]);
        prop_oneof![
            6 => (0u32..3, class.clone(), prop::collection::vec(pick(), 0..40), 0usize..=128)
                .prop_map(|(cpu, class, frees, want)| Op::Exchange { cpu, class, frees, want }),
            2 => (class.clone(), pick()).prop_map(|(c, p)| Op::Free(c, p)),
            1 => (class, pick()).prop_map(|(c, p)| Op::Info(c, p)),
        ]
    }

    /// Resolves a pick against the model: the address and the status a free of it must get.
    fn resolve(p: &Pick, live: &BTreeSet<u64>, freed: &[u64]) -> Option<(u64, u64)> {
        use protocol::status::*;
        let nth = |s: &BTreeSet<u64>, i: usize| (!s.is_empty()).then(|| *s.iter().nth(i % s.len()).unwrap());
        match *p {
            Pick::Live(i) => nth(live, i).map(|a| (a, OK)),
            Pick::Freed(i) => {
                (!freed.is_empty()).then(|| freed[i % freed.len()]).filter(|a| !live.contains(a)).map(|a| (a, EALREADY))
            }
            Pick::Inside(i, d) => nth(live, i).map(|a| (a + d, EFAULT)),
            Pick::Wild(a) => Some((a, EFAULT)),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_model_with_invariants_after_every_operation(ops in prop::collection::vec(op(), 1..80)) {
            use protocol::status::OK;
            let mut mm = manager();
            // Model: live objects per class, and everything ever freed.
            let mut live: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); NR_CLASSES];
            let mut freed: Vec<Vec<u64>> = vec![Vec::new(); NR_CLASSES];
            for op in ops {
                match op {
                    Op::Exchange { cpu, class, frees, want } => {
                        let mut addrs = Vec::new();
                        let mut expect = Vec::new();
                        for p in &frees {
                            if let Some((a, st)) = resolve(p, &live[class], &freed[class]) {
                                // A pick may name the same live object twice: the second is a
                                // double free.
                                let st = if st == OK && addrs.contains(&a) { protocol::status::EALREADY } else { st };
                                addrs.push(a);
                                expect.push((a, st));
                            }
                        }
                        let (out, bad) = mm.slab_exchange(cpu, NodeId(cpu % 2), class, &addrs, want).unwrap();
                        let mut bad_iter = bad.iter();
                        for (a, st) in expect {
                            if st == OK {
                                prop_assert!(live[class].remove(&a));
                                freed[class].push(a);
                            } else {
                                prop_assert_eq!(bad_iter.next(), Some(&(a, st)), "free of {:#x}", a);
                            }
                        }
                        prop_assert!(bad_iter.next().is_none());
                        prop_assert!(out.len() <= want);
                        for o in out {
                            prop_assert!(live.iter().all(|l| !l.contains(&o)), "{:#x} handed out twice", o);
                            prop_assert_eq!(mm.slab_info(o).unwrap(), CLASSES[class]);
                            live[class].insert(o);
                        }
                    }
                    Op::Free(class, p) => {
                        if let Some((a, st)) = resolve(&p, &live[class], &freed[class]) {
                            let r = mm.slab_free(a);
                            match r {
                                Ok(()) => {
                                    prop_assert_eq!(st, OK);
                                    live[class].remove(&a);
                                    freed[class].push(a);
                                }
                                Err(e) => prop_assert_eq!(e.status(), st),
                            }
                        }
                    }
                    Op::Info(class, p) => {
                        if let Some((a, st)) = resolve(&p, &live[class], &freed[class]) {
                            match mm.slab_info(a) {
                                Ok(size) => {
                                    prop_assert_eq!(st, OK);
                                    prop_assert_eq!(size, CLASSES[class]);
                                }
                                Err(e) => prop_assert_eq!(e.status(), st),
                            }
                        }
                    }
                }
                mm.flush().unwrap();
                mm.check_invariants().map_err(TestCaseError::fail)?;
                let active: u64 = live.iter().map(|l| l.len() as u64).sum();
                prop_assert_eq!(mm.slabs().active(), active);
            }
        }
    }
}
