//! The slab allocator: small guest objects (8 B to 4 KiB) carved from slabs of buddy pages, on
//! the model of Linux's SLUB.
//!
//! - A slab is a run of frames from one node, mapped read-write into the guest as a region of
//!   kind `Slab` (the guest cannot free, protect or move it). Its metadata (one bit per object:
//!   handed out or free) lives here, never in guest RAM.
//! - Per vCPU and class, a *current slab* serves refills, so a vCPU's objects come from its own
//!   slabs (no false sharing between vCPUs). Per node and class, a *partial list* holds slabs with
//!   free objects that no vCPU owns, and empty slabs stay cached, mapped and resident, so that
//!   a workload whose live objects swing reuses them without a fault: up to half the most slabs
//!   the class had in use lately (at least 8, at most 1024). The rings' service gives back
//!   empty slabs unused for 200 ms, and all but one per class when the guest goes idle; they go
//!   back to the buddy allocator and lose their host backing.
//! - Objects move in batches through per-vCPU magazines in guest memory (`protocol::slab`): one
//!   SLAB_EXCHANGE drains up to a batch of freed objects and refills up to a batch of new ones.
//!   Every object coming back is validated (a live slab, an object boundary, handed out); a bad
//!   one changes nothing and is reported.
//! - A freed object is not reusable at once: it waits in a per-class and per-node quarantine (a
//!   FIFO of about 64 KiB of objects) first. Meanwhile a second free of it, or any use of its
//!   handle, is caught as a double free, and a dangling pointer does not alias a new object yet.
//!   Past the quarantine, up to a ring refill of them stay ready and are the first handed out
//!   again, the most recently freed first (no bitmap search; a guest freeing and allocating at
//!   the same rate gets its own objects back while they are warmest in its caches and TLB);
//!   older ones go back to their slabs. Memory pressure drains the quarantine before an
//!   allocation fails.
//!
//! - Each slab sits in its own 64 KiB slot of the slab address zone, so the slab of any pointer
//!   is one array lookup (no search), and releasing a slab leaves its slot unmapped for a while
//!   (the zone's quarantine), so a dangling pointer faults.
//!
//! Layering: slabs are regions of the address space (`space`), whose frames come from the layers
//! below; every operation borrows them. Locking: the slab allocator runs under the memory
//! manager's lock.

mod cache;
mod reuse;

use std::collections::VecDeque;
use std::time::Instant;

use protocol::layout::{SLAB_SLOT, SLAB_VA_END, SLAB_VA_START};
use protocol::slab::{CLASSES, FIRST_LARGE, NR_CLASSES};

use crate::memory::addr::{NodeId, PAGE_SIZE, to_usize};
use crate::memory::backing::Backing;
use crate::memory::frames::Frames;
use crate::memory::frames::policy::Policy;
use crate::memory::space::{AddressSpace, Phys, SpaceError};
use crate::memory::zeroed::ZeroedVec;

use cache::{Arena, Cache, Slab, SlabId, partial_push, partial_remove};

pub use cache::{objects_per_slab, quarantine_len, ready_max, slab_pages};

#[derive(Debug, thiserror::Error)]
pub enum SlabError {
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("out of guest memory")]
    NoMemory,
    #[error("not an object")]
    NotFound,
    #[error("object already free")]
    DoubleFree,
    #[error(transparent)]
    Space(SpaceError),
}

impl From<SpaceError> for SlabError {
    fn from(e: SpaceError) -> Self {
        match e {
            SpaceError::NoMemory => SlabError::NoMemory,
            e => SlabError::Space(e),
        }
    }
}

impl SlabError {
    /// The status code the guest gets, or `None` for a host failure (the VM cannot continue).
    pub fn guest_status(&self) -> Option<u64> {
        use protocol::status::*;
        match self {
            SlabError::Invalid(_) => Some(EINVAL),
            SlabError::NoMemory => Some(ENOMEM),
            SlabError::NotFound => Some(EFAULT),
            SlabError::DoubleFree => Some(EALREADY),
            SlabError::Space(e) => e.guest_status(),
        }
    }
}

/// What the slab layer reports (the stats JSON's `slab`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SlabSnapshot {
    /// One entry per size class, like /proc/slabinfo.
    pub classes: Vec<SlabInfo>,
    pub counters: SlabCounters,
    /// Objects handed out (in magazines or in use) at this moment.
    pub active_objects: u64,
    /// Frames in slabs.
    pub frames: u64,
}

/// What an exchange gives back: the objects handed out, and the bad frees with their status.
pub type Exchanged = (Vec<u64>, Vec<(u64, u64)>);

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

/// `ceil(2^32 / size)` per class: `(off * r) >> 32 == off / size` for every `off < 2^16`,
/// because `off / size` is never within `2^-16` below an integer (its fraction is at most
/// `1 - 1/size`, `size <= 2^15`) and the error of `r` adds less than `2^16 / 2^32`.
const RECIPROCALS: [u64; NR_CLASSES] = {
    let mut r = [0u64; NR_CLASSES];
    let mut c = 0;
    while c < NR_CLASSES {
        r[c] = (1u64 << 32).div_ceil(CLASSES[c] as u64);
        c += 1;
    }
    r
};
const _: () = assert!(SLAB_SLOT <= 1 << 16 && protocol::slab::SMALL_MAX <= 1 << 15);

/// All slabs and classes.
#[derive(Debug)]
pub struct SlabAllocator {
    caches: Vec<Cache>,
    /// Slabs by id; `None` marks a free id.
    arena: Arena,
    free_ids: Vec<SlabId>,
    /// Per 64 KiB slot of the slab zone: the id of the slab there, plus one (0: none).
    slots: ZeroedVec<u32>,
    counters: SlabCounters,
}

impl SlabAllocator {
    pub fn new(nodes: usize) -> Self {
        let caches = (0..NR_CLASSES)
            .map(|_| Cache {
                partial: vec![Vec::new(); nodes],
                empty: vec![Vec::new(); nodes],
                quarantine: vec![VecDeque::new(); nodes],
                ..Default::default()
            })
            .collect();
        SlabAllocator {
            caches,
            arena: Vec::new(),
            free_ids: Vec::new(),
            slots: ZeroedVec::new(to_usize((SLAB_VA_END - SLAB_VA_START) / SLAB_SLOT)),
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
    fn locate(&self, ptr: u64) -> Result<(SlabId, u32), SlabError> {
        let slot = Self::slot_of(ptr).ok_or(SlabError::NotFound)?;
        let id = self.slots[slot].checked_sub(1).ok_or(SlabError::NotFound)?;
        let s = self.slab(id);
        let off = ptr - s.va;
        // off / size by a multiply: exact for offsets inside a slot (below 2^16; see
        // RECIPROCALS). Page-run slabs span several slots: a division (they are few).
        let i =
            if s.class < FIRST_LARGE { (off * RECIPROCALS[s.class]) >> 32 } else { off / u64::from(CLASSES[s.class]) };
        if i * u64::from(CLASSES[s.class]) != off || i >= u64::from(s.objects) {
            return Err(SlabError::NotFound);
        }
        Ok((id, u32::try_from(i).expect("fewer objects than u32")))
    }

    /// The slots slab `s` covers.
    fn slots_of(s: &Slab) -> std::ops::Range<usize> {
        let first = Self::slot_of(s.va).expect("slabs live in the slab zone");
        let n = to_usize((slab_pages(CLASSES[s.class]) * PAGE_SIZE).div_ceil(SLAB_SLOT));
        first..first + n
    }

    fn insert(&mut self, s: Slab) -> SlabId {
        let slots = Self::slots_of(&s);
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
        for slot in slots {
            self.slots[slot] = id + 1;
        }
        id
    }

    fn remove(&mut self, id: SlabId) -> Slab {
        let s = self.arena[id as usize].take().expect("live slab id");
        for slot in Self::slots_of(&s) {
            self.slots[slot] = 0;
        }
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
                    cached_empty: cache.empty.iter().map(|e| e.len() as u64).sum(),
                    quarantined: cache.quarantined(),
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

    /// What the layer reports.
    pub fn snapshot(&self) -> SlabSnapshot {
        SlabSnapshot {
            classes: self.info(),
            counters: self.counters.clone(),
            active_objects: self.active(),
            frames: self.frames(),
        }
    }
}

impl SlabAllocator {
    /// SLAB_EXCHANGE for vCPU `cpu` on `node`: returns `frees` to their slabs (the bad ones,
    /// with their status, in the second result), then hands out up to `want` objects of `class`.
    /// Fewer (or none) when memory runs out.
    #[allow(clippy::too_many_arguments)]
    pub fn exchange(
        &mut self,
        space: &mut AddressSpace,
        phys: &mut Phys<'_>,
        cpu: u32,
        node: NodeId,
        class: usize,
        frees: &[u64],
        want: usize,
    ) -> Result<Exchanged, SlabError> {
        if class >= NR_CLASSES {
            return Err(SlabError::Invalid("no such size class"));
        }
        let mut bad = Vec::new();
        for &p in frees {
            if let Err(e) = self.free(space, phys, p) {
                match e.guest_status() {
                    Some(st) => bad.push((p, st)),
                    None => return Err(e),
                }
            }
        }
        self.counters.exchanges += 1;
        let out = match self.take(space, phys, cpu, node, class, want) {
            Ok(out) => out,
            // The drain still counts; the caller reports ENOMEM for an empty refill.
            Err(SlabError::NoMemory) => Vec::new(),
            Err(e) => return Err(e),
        };
        // Keep ready only about what this refill took (what the guest used since the last
        // one): a guest that frees more than it allocates gives the rest back to the slabs.
        self.trim(space, phys, class, cache::KEPT[class].quarantine + want.min(cache::KEPT[class].ready))?;
        Ok((out, bad))
    }

    /// Returns one object (into quarantine). `NotFound` for anything but an object of a live
    /// slab, `DoubleFree` for one that is free or in quarantine; neither changes anything.
    pub fn free(&mut self, space: &mut AddressSpace, phys: &mut Phys<'_>, ptr: u64) -> Result<(), SlabError> {
        let located = self.locate(ptr);
        let Ok((id, i)) = located else {
            self.counters.bad_frees += 1;
            return located.map(|_| ());
        };
        let s = self.slab_mut(id);
        if !s.is_handed(i) || s.is_held(i) {
            self.counters.bad_frees += 1;
            return Err(SlabError::DoubleFree);
        }
        s.set_held(i, true);
        let (class, node) = (s.class, s.node.0 as usize);
        let cache = &mut self.caches[class];
        cache.active -= 1;
        cache.quarantine[node].push_back((id, i));
        self.counters.objects_in += 1;
        if cache.quarantine[node].len() > cache::KEPT[class].quarantine + cache::KEPT[class].ready {
            let (oldest, j) = cache.quarantine[node].pop_front().expect("non-empty");
            self.release_object(space, phys, oldest, j)?;
        }
        Ok(())
    }

    /// Makes a quarantined object free in its slab, moving the slab between lists (and
    /// releasing it when it is empty and enough empty slabs are cached already).
    fn release_object(
        &mut self,
        space: &mut AddressSpace,
        phys: &mut Phys<'_>,
        id: SlabId,
        i: u32,
    ) -> Result<(), SlabError> {
        let s = self.slab_mut(id);
        s.set_held(i, false);
        s.set_handed(i, false);
        s.in_use -= 1;
        let (class, node, in_use, objects, owned) =
            (s.class, s.node.0 as usize, s.in_use, s.objects, s.owner.is_some());
        if owned {
            return Ok(());
        }
        let cache = &mut self.caches[class];
        if in_use + 1 == objects {
            // Was full: now it has room.
            partial_push(&mut cache.partial[node], &mut self.arena, id);
        }
        if in_use == 0 {
            partial_remove(&mut cache.partial[node], &mut self.arena, id);
            // Keep it (and as many others as the class's recent peak justifies); give back the
            // rest.
            cache.note_peak();
            let keep = (cache.peak / 2).clamp(cache::EMPTY_MIN, cache::EMPTY_KEPT);
            cache.empty[node].push(id);
            self.arena[id as usize].as_mut().expect("live slab id").empty_since = Some(Instant::now());
            let cache = &mut self.caches[class];
            let over = cache.empty[node].len().saturating_sub(keep);
            let excess: Vec<SlabId> = cache.empty[node].drain(..over).collect();
            for old in excess {
                self.release_slab(space, phys, old)?;
            }
        }
        Ok(())
    }

    /// SLAB_INFO: the size of the handed-out object at `ptr`.
    pub fn object_size(&self, ptr: u64) -> Result<u32, SlabError> {
        let (id, i) = self.locate(ptr)?;
        let s = self.slab(id);
        if !s.is_handed(i) || s.is_held(i) {
            return Err(SlabError::DoubleFree);
        }
        Ok(CLASSES[s.class])
    }

    /// Up to `want` objects of `class` for `cpu`: from its current slab, then a partial slab of
    /// its node, the node's cached empty slab, a new slab (on the node, else nearby), and last
    /// other nodes' partial slabs.
    fn take(
        &mut self,
        space: &mut AddressSpace,
        phys: &mut Phys<'_>,
        cpu: u32,
        node: NodeId,
        class: usize,
        want: usize,
    ) -> Result<Vec<u64>, SlabError> {
        let size = u64::from(CLASSES[class]);
        let c = cpu as usize;
        let mut out = Vec::with_capacity(want);
        while out.len() < want {
            let cache = &mut self.caches[class];
            if cache.cpu_slab.len() <= c {
                cache.cpu_slab.resize(c + 1, None);
            }
            if let Some(id) = cache.cpu_slab[c] {
                let s = self.slab_mut(id);
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
                self.caches[class].cpu_slab[c] = None;
            }
            // Then freed objects past their quarantine, before another slab.
            self.recycle(class, node.0 as usize, want, &mut out);
            if out.len() == want {
                break;
            }
            let Some(next) = self.next_slab(space, phys, class, node, cpu)? else { break };
            let s = self.slab_mut(next);
            s.owner = Some(cpu);
            self.caches[class].cpu_slab[c] = Some(next);
        }
        let n = out.len() as u64;
        self.caches[class].active += n;
        self.counters.objects_out += n;
        if out.is_empty() && want > 0 {
            return Err(SlabError::NoMemory);
        }
        Ok(out)
    }

    /// A slab with free objects for vCPU `cpu` on `node` to own next: preferably one it owned
    /// before.
    fn next_slab(
        &mut self,
        space: &mut AddressSpace,
        phys: &mut Phys<'_>,
        class: usize,
        node: NodeId,
        cpu: u32,
    ) -> Result<Option<SlabId>, SlabError> {
        let n = node.0 as usize;
        let arena = &mut self.arena;
        let cache = &mut self.caches[class];
        // The most recently listed slabs first (their memory is the warmest).
        let list = &cache.partial[n];
        let own = list
            .iter()
            .rev()
            .take(16)
            .copied()
            .find(|&id| arena[id as usize].as_ref().is_some_and(|s| s.last_owner == Some(cpu)));
        if let Some(id) = own.or_else(|| list.last().copied()) {
            partial_remove(&mut cache.partial[n], arena, id);
            return Ok(Some(id));
        }
        if let Some(va) = cache.empty[n].pop() {
            return Ok(Some(va));
        }
        match self.new_slab(space, phys, class, node) {
            Ok(va) => return Ok(Some(va)),
            Err(SlabError::NoMemory) => {}
            Err(e) => return Err(e),
        }
        // Out of memory: release the quarantine, then take another node's partial or empty
        // slab rather than fail.
        self.trim(space, phys, class, 0)?;
        let cache = &mut self.caches[class];
        for other in 0..cache.partial.len() {
            if let Some(&id) = cache.partial[other].last() {
                partial_remove(&mut cache.partial[other], &mut self.arena, id);
                return Ok(Some(id));
            }
            if let Some(id) = cache.empty[other].pop() {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// Maps a new slab on `node` (or, if it is full, the nearest node with room).
    fn new_slab(
        &mut self,
        space: &mut AddressSpace,
        phys: &mut Phys<'_>,
        class: usize,
        node: NodeId,
    ) -> Result<SlabId, SlabError> {
        let size = CLASSES[class];
        let (va, first) = space.map_slab(phys, class, slab_pages(size), Policy::Preferred(node), node)?;
        let node = phys.frames.node_of(first).expect("slab frames are RAM");
        let id = self.insert(Slab::new(va, class, node, objects_per_slab(size)));
        let cache = &mut self.caches[class];
        cache.slabs += 1;
        cache.note_peak();
        self.counters.slabs_created += 1;
        Ok(id)
    }

    /// Unmaps an empty slab and gives its frames back (at the next flush).
    fn release_slab(&mut self, space: &mut AddressSpace, phys: &mut Phys<'_>, id: SlabId) -> Result<(), SlabError> {
        let s = self.remove(id);
        debug_assert_eq!(s.in_use, 0);
        self.caches[s.class].slabs -= 1;
        self.counters.slabs_released += 1;
        Ok(space.unmap_slab(phys, s.va, slab_pages(CLASSES[s.class]))?)
    }

    /// Checks every slab against its region and lists, and the per-class counts.
    pub fn check_invariants(&self, space: &AddressSpace, frames: &Frames, backing: &Backing) -> Result<(), String> {
        let mut slabs = [0u64; NR_CLASSES];
        let mut active = [0u64; NR_CLASSES];
        let mut quarantined = [0u64; NR_CLASSES];
        for (id, s) in self.live() {
            let va = s.va;
            if self.locate(va).ok().map(|l| l.0) != Some(id) {
                return Err(format!("slab {va:#x}: its slot does not lead to it"));
            }
            let handed: u32 = s.bits.iter().map(|w| w[cache::HANDED].count_ones()).sum();
            if handed != s.in_use {
                return Err(format!("slab {va:#x}: {} handed bits, in_use {}", handed, s.in_use));
            }
            let q: u32 = s.bits.iter().map(|w| w[cache::HELD].count_ones()).sum();
            if s.bits.iter().any(|w| w[cache::HELD] & !w[cache::HANDED] != 0) {
                return Err(format!("slab {va:#x}: a quarantined object is marked free"));
            }
            quarantined[s.class] += u64::from(q);
            if space.slab_frames(frames, backing, va, slab_pages(CLASSES[s.class])).is_none() {
                return Err(format!("slab {va:#x}: not mapped read-write to its frames"));
            }
            let cache = &self.caches[s.class];
            let n = s.node.0 as usize;
            let in_partial = match s.partial_at {
                Some(at) if cache.partial[n].get(at as usize) == Some(&id) => true,
                Some(at) => return Err(format!("slab {va:#x}: not at its place {at} in the partial list")),
                None => false,
            };
            let is_empty = cache.empty[n].contains(&id);
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
        for (c, cache) in self.caches.iter().enumerate() {
            if cache.slabs != slabs[c] || cache.active != active[c] || cache.quarantined() != quarantined[c] {
                return Err(format!(
                    "class {}: counts {} slabs / {} active / {} quarantined, found {} / {} / {}",
                    CLASSES[c],
                    cache.slabs,
                    cache.active,
                    cache.quarantined(),
                    slabs[c],
                    active[c],
                    quarantined[c]
                ));
            }
            for list in &cache.partial {
                for (k, &id) in list.iter().enumerate() {
                    let at = self.arena.get(id as usize).and_then(Option::as_ref).and_then(|s| s.partial_at);
                    if at != Some(u32::try_from(k).expect("fewer slabs than u32")) {
                        return Err(format!(
                            "class {}: partial entry {k} (slab {id}) does not know its place",
                            CLASSES[c]
                        ));
                    }
                }
            }
            for (cpu, s) in cache.cpu_slab.iter().enumerate() {
                if let Some(id) = *s
                    && self.arena[id as usize].as_ref().and_then(|s| s.owner)
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
mod tests;
