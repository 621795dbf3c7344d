//! Creating and destroying regions: ALLOC, FREE, and the slabs of the slab allocator.

use protocol::layout::{SLAB_SLOT, SLAB_VA_END, SLAB_VA_START};
use protocol::memcall::{flags, prot};
use protocol::slab::class_of_addr;

use crate::memory::addr::{Gfn, HUGE_PAGE_SIZE, NodeId, Order, PAGE_SIZE, to_usize};
use crate::memory::backing::Backing;
use crate::memory::frames::policy::Policy;
use crate::memory::frames::{Frames, Placement, Run};

use super::mapping::Span;
use super::pagetable::{PageSize, Pte};
use super::region::{Region, RegionKind};
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
        let base = prot::READ | prot::WRITE;
        let region = |len, page| Region { len, page, kind: RegionKind::Alloc, policy, home: local, dma32, base };
        if fl & flags::HUGE != 0 && !dma32 {
            match self.alloc_huge(phys, size, policy, local, fl & flags::CONTIGUOUS != 0) {
                Ok((va, runs, page)) => {
                    let len = runs.iter().map(|r| r.1).sum::<u64>() * PAGE_SIZE;
                    return self.install(phys, va, region(len, page), &runs, fl);
                }
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
        self.install(phys, va, region(pages * PAGE_SIZE, PageSize::Size4K), &runs, fl)
    }

    /// Maps a new region's pages to `runs`, in order, and records it. If its page tables cannot
    /// be built, everything is given back and the request fails with `NoMemory`.
    fn install(
        &mut self,
        phys: &mut Phys<'_>,
        va: u64,
        region: Region,
        runs: &[Run],
        fl: u32,
    ) -> Result<(u64, u64), SpaceError> {
        if let Err(e) = self.ensure_tables(phys, va, region.len, region.page) {
            phys.give_back(runs)?;
            self.release_va(va, region.len, region.page);
            return Err(e);
        }
        let step = region.frames_per_page();
        let mut frames = runs.iter().flat_map(|&(g, n)| (0..n).step_by(to_usize(step)).map(move |k| g.plus(k)));
        let span = Span { base: va, size: region.page, first: 0, end: region.pages() };
        self.edit(phys, span, true, |_, _| region.entry_for(frames.next(), region.base))?;
        if fl & flags::POPULATE != 0 {
            for &(g, n) in runs {
                phys.backing.populate(g, n)?;
            }
        }
        self.regions.insert(va, region);
        self.counters.regions_created += 1;
        Ok((va, region.len))
    }

    /// 2 MiB blocks from order-9 buddies, and where to map them; `NoMemory` if any block is
    /// missing (the caller falls back to 4 KiB pages).
    fn alloc_huge(
        &mut self,
        phys: &mut Phys<'_>,
        size: u64,
        policy: Policy,
        local: NodeId,
        contiguous: bool,
    ) -> Result<(u64, Vec<Run>, PageSize), SpaceError> {
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
        Ok((va, runs, page))
    }

    /// FREE: unmaps a region and releases its frames (at the next [`flush`](Self::flush)) and
    /// its addresses.
    pub fn free_region(&mut self, phys: &mut Phys<'_>, va: u64) -> Result<(), SpaceError> {
        let Some(region) = self.regions.remove(&va) else {
            if self.va_small.recently_freed(va) || self.va_huge.recently_freed(va) {
                return Err(SpaceError::DoubleFree);
            }
            return Err(SpaceError::NotFound);
        };
        self.clear(phys, va, region.page, region.pages())?;
        self.release_va(va, region.len, region.page);
        self.counters.regions_freed += 1;
        Ok(())
    }

    /// Clears every entry of `pages` pages of `size` at `va` and queues the frames they held
    /// for the next flush, whose discard also drops their translations.
    fn clear(&mut self, phys: &mut Phys<'_>, va: u64, size: PageSize, pages: u64) -> Result<(), SpaceError> {
        let step = size.bytes() / PAGE_SIZE;
        let mut frames = Vec::new();
        let span = Span { base: va, size, first: 0, end: pages };
        self.edit(phys, span, false, |_, old| {
            let frame = if old.is_present() { Some(old.gfn()) } else { old.soft_frame() };
            if let Some(g) = frame {
                frames.push((g, step));
            }
            Pte(0)
        })?;
        self.pending_free.extend(frames);
        Ok(())
    }

    /// A slab: `pages` contiguous frames placed by `policy`, mapped read-write in one slot of
    /// the slab zone. Slabs are the slab allocator's, not regions: the guest cannot free,
    /// protect or move them. Returns the address and the first frame.
    pub fn map_slab(
        &mut self,
        phys: &mut Phys<'_>,
        class: usize,
        pages: u64,
        policy: Policy,
        local: NodeId,
    ) -> Result<(u64, Gfn), SpaceError> {
        let placement = Placement { policy, local, dma32: false, contiguous: true };
        let runs = self.take_frames(phys, pages, placement)?;
        let span = (pages * PAGE_SIZE).max(SLAB_SLOT);
        let Some(va) = self.va_slab[class].alloc(span) else {
            phys.give_back(&runs)?;
            return Err(SpaceError::NoMemory);
        };
        if let Err(e) = self.ensure_tables(phys, va, pages * PAGE_SIZE, PageSize::Size4K) {
            phys.give_back(&runs)?;
            self.va_slab[class].free(va, span);
            return Err(e);
        }
        let first = runs[0].0;
        let flags = super::region::leaf_flags(prot::READ | prot::WRITE).expect("accessible");
        let span = Span { base: va, size: PageSize::Size4K, first: 0, end: pages };
        self.edit(phys, span, true, |i, _| super::pagetable::leaf_pte(first.plus(i), PageSize::Size4K, flags))?;
        // The guest touches every page of a slab soon (its objects go out at once). Host pages
        // present now let KVM map eight of them per shadow fault (see `leaf_pte`), where each
        // page took a fault of its own, plus a host fault (rptest, 1 vCPU: 3.2k -> 0.4k faults).
        phys.backing.populate(first, pages)?;
        Ok((va, first))
    }

    /// Unmaps the `pages`-page slab at `va` and releases its frames (at the next flush).
    pub fn unmap_slab(&mut self, phys: &mut Phys<'_>, va: u64, pages: u64) -> Result<(), SpaceError> {
        self.clear(phys, va, PageSize::Size4K, pages)?;
        self.release_slab_va(va, pages * PAGE_SIZE);
        Ok(())
    }

    /// The frames the slab at `va` maps, if it maps `pages` contiguous frames read-write.
    pub fn slab_frames(&self, frames: &Frames, backing: &Backing, va: u64, pages: u64) -> Option<Gfn> {
        let entry = |i| self.entry(frames, backing, va, PageSize::Size4K, i);
        let first = entry(0).ok().filter(|e| e.is_present())?.gfn();
        (0..pages)
            .all(|i| {
                entry(i).is_ok_and(|e| {
                    e.is_present()
                        && e.gfn() == first.plus(i)
                        && super::region::prot_of(e.flags()) == prot::READ | prot::WRITE
                })
            })
            .then_some(first)
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
        if size > frames.total_pages() * PAGE_SIZE || self.regions.len() >= self.max_regions {
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

    /// Gives back the slot(s) of the `len`-byte slab at `va`.
    fn release_slab_va(&mut self, va: u64, len: u64) {
        let class = class_of_addr(va).expect("slab addresses lie in a class's zone");
        self.va_slab[class].free(va, len.max(SLAB_SLOT));
    }

    pub(super) fn release_va(&mut self, va: u64, len: u64, page: PageSize) {
        if (SLAB_VA_START..SLAB_VA_END).contains(&va) {
            return self.release_slab_va(va, len);
        }
        match page {
            PageSize::Size4K => self.va_small.free(va, len),
            PageSize::Size2M => self.va_huge.free(va, len),
        }
    }
}
