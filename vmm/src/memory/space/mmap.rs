//! Creating and destroying regions: ALLOC, FREE, and the slabs of the slab allocator.

use protocol::layout::{SLAB_SLOT, SLAB_VA_END, SLAB_VA_START};
use protocol::memcall::{flags, prot};

use crate::memory::addr::{Gfn, HUGE_PAGE_SIZE, NodeId, Order, PAGE_SIZE};
use crate::memory::frames::policy::Policy;
use crate::memory::frames::{Frames, Placement, Run};

use super::pagetable::PageSize;
use super::region::{Region, RegionKind, leaf_flags};
use super::{AddressSpace, Phys, SpaceError};

impl AddressSpace {
    /// ALLOC: `size` bytes of zeroed memory placed by `policy`, mapped read-write. Returns the
    /// address and the mapped length.
    pub fn alloc_region(
        &mut self,
        phys: &mut Phys<'_>,
        size: u64,
        fl: u32,
        policy: Policy,
        local: NodeId,
    ) -> Result<(u64, u64), SpaceError> {
        self.check_request(phys.frames, size, fl, policy)?;
        let dma32 = fl & flags::DMA32 != 0;
        let p = prot::READ | prot::WRITE | if fl & flags::EXEC != 0 { prot::EXEC } else { 0 };
        if fl & flags::HUGE != 0 && !dma32 {
            match self.alloc_huge(phys, size, p, policy, local, fl & flags::CONTIGUOUS != 0) {
                Ok(r) => return self.finish_alloc(phys, r, fl),
                Err(SpaceError::NoMemory) => self.counters.huge_fallbacks += 1,
                Err(e) => return Err(e),
            }
        }
        let pages = size.div_ceil(PAGE_SIZE);
        let placement = Placement { policy, local, dma32, contiguous: fl & flags::CONTIGUOUS != 0 };
        let runs = self.take_frames(phys, pages, placement)?;
        let Some(va) = self.va_small.alloc(pages * PAGE_SIZE) else {
            phys.give_back(&runs)?;
            return Err(SpaceError::NoMemory);
        };
        let region =
            Region::new(va, pages * PAGE_SIZE, PageSize::Size4K, RegionKind::Alloc, policy, local, dma32, runs, p);
        self.finish_alloc(phys, region, fl)
    }

    /// Maps a new region and records it. If its page tables cannot be built, everything is
    /// given back and the request fails with `NoMemory`.
    fn finish_alloc(&mut self, phys: &mut Phys<'_>, region: Region, fl: u32) -> Result<(u64, u64), SpaceError> {
        if let Err(e) = self.ensure_tables(phys, region.va, region.len, region.page) {
            phys.give_back(&region.runs)?;
            self.release_va(region.va, region.len, region.page);
            return Err(e);
        }
        let flags = leaf_flags(region.prot_at(0)).expect("allocations start accessible");
        let pages: Vec<(u64, Gfn)> =
            (0..region.pages()).map(|i| (i, region.frame(i).expect("every page has a frame"))).collect();
        self.map_pages_of(phys, &region, &pages, flags)?;
        if fl & flags::POPULATE != 0 {
            for &(g, n) in &region.runs {
                phys.backing.populate(g, n)?;
            }
        }
        let (va, len) = (region.va, region.len);
        self.regions.insert(va, region);
        self.counters.regions_created += 1;
        Ok((va, len))
    }

    /// 2 MiB pages from order-9 blocks; `NoMemory` if any block is missing (the caller falls
    /// back to 4 KiB pages).
    fn alloc_huge(
        &mut self,
        phys: &mut Phys<'_>,
        size: u64,
        p: u32,
        policy: Policy,
        local: NodeId,
        contiguous: bool,
    ) -> Result<Region, SpaceError> {
        let blocks = size.div_ceil(HUGE_PAGE_SIZE);
        let runs = if contiguous {
            // One run of whole 2 MiB blocks (an exact run is aligned to at least its first block).
            let placement = Placement { policy, local, dma32: false, contiguous: true };
            self.take_frames(phys, blocks * Order::HUGE.pages(), placement)?
        } else {
            phys.take_huge_blocks(blocks, policy, local)?
        };
        // 2 MiB leaves only where the host can invalidate them (see `huge_leaves`); otherwise
        // the same 2 MiB blocks are mapped with 4 KiB leaves.
        let (zone, page) = if self.huge_leaves {
            (&mut self.va_huge, PageSize::Size2M)
        } else {
            (&mut self.va_small, PageSize::Size4K)
        };
        let Some(va) = zone.alloc(blocks * HUGE_PAGE_SIZE) else {
            phys.give_back(&runs)?;
            return Err(SpaceError::NoMemory);
        };
        Ok(Region::new(va, blocks * HUGE_PAGE_SIZE, page, RegionKind::Alloc, policy, local, false, runs, p))
    }

    /// FREE: unmaps a region and releases its frames (at the next [`flush`](Self::flush)) and
    /// its addresses.
    pub fn free_region(&mut self, phys: &mut Phys<'_>, va: u64) -> Result<(), SpaceError> {
        if self.regions.get(&va).is_some_and(|r| r.kind == RegionKind::Slab) {
            return Err(SpaceError::NotFound);
        }
        let Some(region) = self.regions.remove(&va) else {
            if self.va_small.recently_freed(va) || self.va_huge.recently_freed(va) {
                return Err(SpaceError::DoubleFree);
            }
            return Err(SpaceError::NotFound);
        };
        self.drop_region(phys, region)
    }

    /// Unmaps a region that was taken out of the map and releases its frames (at the next
    /// flush) and addresses.
    fn drop_region(&mut self, phys: &mut Phys<'_>, region: Region) -> Result<(), SpaceError> {
        let mut present = Vec::new();
        self.unmap_pages_of(phys, &region, 0, region.pages(), &mut present)?;
        self.pending_free.extend(region.owned_runs());
        self.release_va(region.va, region.len, region.page);
        self.counters.regions_freed += 1;
        Ok(())
    }

    /// A slab: `pages` contiguous frames placed by `policy`, mapped read-write in one slot of
    /// the slab zone, owned by the VMM (the guest cannot free, protect or move it). Returns its
    /// address.
    pub fn map_slab(
        &mut self,
        phys: &mut Phys<'_>,
        pages: u64,
        policy: Policy,
        local: NodeId,
    ) -> Result<u64, SpaceError> {
        let placement = Placement { policy, local, dma32: false, contiguous: true };
        let runs = self.take_frames(phys, pages, placement)?;
        let Some(va) = self.va_slab.alloc(SLAB_SLOT) else {
            phys.give_back(&runs)?;
            return Err(SpaceError::NoMemory);
        };
        let region = Region::new(
            va,
            pages * PAGE_SIZE,
            PageSize::Size4K,
            RegionKind::Slab,
            policy,
            local,
            false,
            runs,
            prot::READ | prot::WRITE,
        );
        self.finish_alloc(phys, region, 0).map(|(va, _)| va)
    }

    /// Unmaps the slab at `va` and releases its frames (at the next flush).
    pub fn unmap_slab(&mut self, phys: &mut Phys<'_>, va: u64) -> Result<(), SpaceError> {
        match self.regions.get(&va) {
            Some(r) if r.kind == RegionKind::Slab => {}
            _ => return Err(SpaceError::NotFound),
        }
        let region = self.regions.remove(&va).expect("checked above");
        self.drop_region(phys, region)
    }

    pub(super) fn check_request(&self, frames: &Frames, size: u64, fl: u32, policy: Policy) -> Result<(), SpaceError> {
        if fl & !flags::ALL != 0 {
            return Err(SpaceError::Invalid("unknown flags"));
        }
        if size == 0 {
            return Err(SpaceError::Invalid("size is zero"));
        }
        if let Policy::Bind(n) | Policy::Preferred(n) = policy
            && n.0 as usize >= frames.nr_nodes()
        {
            return Err(SpaceError::Invalid("no such node"));
        }
        if size > frames.total_pages() * PAGE_SIZE {
            return Err(SpaceError::NoMemory);
        }
        Ok(())
    }

    /// `pages` frames placed by `placement`. Frees pending in this batch are flushed and
    /// retried before giving up.
    pub(super) fn take_frames(
        &mut self,
        phys: &mut Phys<'_>,
        pages: u64,
        placement: Placement,
    ) -> Result<Vec<Run>, SpaceError> {
        match phys.take(pages, placement) {
            Err(SpaceError::NoMemory) if !self.pending_free.is_empty() => {
                self.flush(phys)?;
                phys.take(pages, placement)
            }
            other => other,
        }
    }

    pub(super) fn release_va(&mut self, va: u64, len: u64, page: PageSize) {
        if (SLAB_VA_START..SLAB_VA_END).contains(&va) {
            return self.va_slab.free(va, SLAB_SLOT);
        }
        match page {
            PageSize::Size4K => self.va_small.free(va, len),
            PageSize::Size2M => self.va_huge.free(va, len),
        }
    }
}
