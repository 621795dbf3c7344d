//! Lazy regions: MAP_LAZY reserves address space only; FAULT (the guest's #PF handler, through
//! the LAZY_FAULT port) gives a touched page a frame, with its untouched neighbours in the same
//! small window.

use protocol::memcall::{flags, prot};

use crate::memory::addr::{Gva, NodeId, PAGE_SIZE};
use crate::memory::frames::policy::Policy;
use crate::memory::frames::{Frames, Placement};

use super::pagetable::PageSize;
use super::region::{Region, RegionKind, leaf_flags};
use super::{AddressSpace, Phys, SpaceError};

impl AddressSpace {
    /// MAP_LAZY: reserves `size` bytes of address space; frames come on first touch.
    pub fn map_lazy(
        &mut self,
        frames: &Frames,
        size: u64,
        fl: u32,
        policy: Policy,
        local: NodeId,
    ) -> Result<(u64, u64), SpaceError> {
        self.check_request(frames, size, fl, policy)?;
        if fl & (flags::HUGE | flags::CONTIGUOUS | flags::POPULATE) != 0 {
            return Err(SpaceError::Invalid("lazy regions take 4 KiB pages, one at a time"));
        }
        let pages = size.div_ceil(PAGE_SIZE);
        let va = self.va_small.alloc(pages * PAGE_SIZE).ok_or(SpaceError::NoMemory)?;
        let p = prot::READ | prot::WRITE | if fl & flags::EXEC != 0 { prot::EXEC } else { 0 };
        let dma32 = fl & flags::DMA32 != 0;
        let region =
            Region::new(va, pages * PAGE_SIZE, PageSize::Size4K, RegionKind::Lazy, policy, local, dma32, Vec::new(), p);
        self.regions.insert(va, region);
        self.counters.regions_created += 1;
        Ok((va, pages * PAGE_SIZE))
    }

    /// FAULT: gives the page at `va` in a lazy region a frame (and its untouched neighbours in
    /// the same fault-around window). Returns the pages mapped (0: it already was).
    pub fn fault_lazy(&mut self, phys: &mut Phys<'_>, va: u64) -> Result<u64, SpaceError> {
        let start = self.region_containing(va).ok_or(SpaceError::NotFound)?;
        let r = &self.regions[&start];
        if r.kind != RegionKind::Lazy {
            return Err(SpaceError::NotFound);
        }
        let page = (va - start) / PAGE_SIZE;
        if r.lazy.contains_key(&page) {
            return Ok(0);
        }
        if r.prot_at(page) == prot::NONE {
            return Err(SpaceError::NotFound);
        }
        let placement = Placement { policy: r.policy, local: r.home, dma32: r.dma32, contiguous: true };
        let first = page - page % self.lazy_window;
        let window: Vec<u64> = (first..(first + self.lazy_window).min(r.pages()))
            .filter(|&p| !r.lazy.contains_key(&p) && r.prot_at(p) != prot::NONE)
            .collect();
        let mut mapped = 0;
        for p in window {
            let runs = match self.take_frames(phys, 1, placement) {
                Ok(runs) => runs,
                // Neighbours are best effort; the faulting page itself must succeed.
                Err(SpaceError::NoMemory) if p != page => continue,
                Err(e) => return Err(e),
            };
            let gfn = runs[0].0;
            let pva = start + p * PAGE_SIZE;
            if let Err(e) = self.ensure_tables(phys, pva, PAGE_SIZE, PageSize::Size4K) {
                phys.give_back(&runs)?;
                if p == page {
                    return Err(e);
                }
                continue;
            }
            let r = self.regions.get_mut(&start).expect("looked up above");
            r.lazy.insert(p, gfn);
            let flags = leaf_flags(r.prot_at(p)).expect("checked accessible");
            self.map_one(phys, Gva(pva), gfn, PageSize::Size4K, flags)?;
            mapped += 1;
        }
        self.counters.lazy_faults += 1;
        self.counters.lazy_pages += mapped;
        Ok(mapped)
    }
}
