//! Lazy regions: MAP_LAZY reserves address space only; FAULT (the guest's #PF handler, through
//! the LAZY_FAULT port) gives a touched page a frame, with its untouched neighbours in the same
//! small window.

use protocol::memcall::{flags, prot};

use crate::memory::addr::{Gfn, NodeId, PAGE_SIZE};
use crate::memory::frames::policy::Policy;
use crate::memory::frames::{Frames, Placement};

use super::mapping::Span;
use super::pagetable::PageSize;
use super::region::{PageEntry, Region, RegionKind};
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
        let base = prot::READ | prot::WRITE;
        let region = Region {
            len: pages * PAGE_SIZE,
            page: PageSize::Size4K,
            kind: RegionKind::Lazy,
            policy,
            home: local,
            dma32: fl & flags::DMA32 != 0,
            base,
        };
        self.regions.insert(va, region);
        self.counters.regions_created += 1;
        Ok((va, region.len))
    }

    /// FAULT: gives the page at `va` in a lazy region a frame (and its untouched neighbours in
    /// the same fault-around window). Returns the pages mapped (0: it already had one).
    pub fn fault_lazy(&mut self, phys: &mut Phys<'_>, va: u64) -> Result<u64, SpaceError> {
        let start = self.region_containing(va).ok_or(SpaceError::NotFound)?;
        let r = self.regions[&start];
        if r.kind != RegionKind::Lazy {
            return Err(SpaceError::NotFound);
        }
        let page = (va - start) / PAGE_SIZE;
        match r.page_entry(self.entry(phys.frames, phys.backing, start, r.page, page)?) {
            PageEntry::Mapped(..) | PageEntry::Parked(..) => return Ok(0),
            PageEntry::Untouched(p) if p != prot::NONE => {}
            PageEntry::Untouched(_) | PageEntry::Foreign => return Err(SpaceError::NotFound),
        }
        let first = page - page % self.lazy_window;
        let span = Span { base: start, size: r.page, first, end: (first + self.lazy_window).min(r.pages()) };
        // Neighbours are best effort; the faulting page itself must get a frame.
        let mut wanted = Vec::new();
        for i in span.first..span.end {
            if let PageEntry::Untouched(p) = r.page_entry(self.entry(phys.frames, phys.backing, start, r.page, i)?)
                && p != prot::NONE
            {
                wanted.push(i);
            }
        }
        let placement = Placement { policy: r.policy, local: r.home, dma32: r.dma32, contiguous: true };
        let mut got: Vec<(u64, Gfn)> = Vec::with_capacity(wanted.len());
        for i in wanted {
            match self.take_frames(phys, 1, placement) {
                Ok(runs) => got.push((i, runs[0].0)),
                Err(SpaceError::NoMemory) if i != page => {}
                Err(e) => {
                    phys.give_back(&got.iter().map(|&(_, g)| (g, 1)).collect::<Vec<_>>())?;
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.ensure_tables(phys, start + span.first * PAGE_SIZE, PAGE_SIZE, r.page) {
            phys.give_back(&got.iter().map(|&(_, g)| (g, 1)).collect::<Vec<_>>())?;
            return Err(e);
        }
        let mut next = got.iter().peekable();
        self.edit(phys, span, true, |i, old| match next.peek() {
            Some(&&(j, g)) if j == i => {
                next.next();
                r.entry_for(Some(g), r.page_entry(old).prot())
            }
            _ => old,
        })?;
        let mapped = got.len() as u64;
        self.counters.lazy_faults += 1;
        self.counters.lazy_pages += mapped;
        Ok(mapped)
    }
}
