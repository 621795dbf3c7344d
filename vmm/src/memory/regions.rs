//! Guest regions: what memory calls allocate, map lazily, protect, move and free.
//!
//! A region is a range of guest-virtual addresses in one of the two heap zones, backed either by
//! frames chosen at allocation (`Alloc`) or by frames allocated page by page when the guest first
//! touches them (`Lazy`, the guest's #PF handler asks with FAULT). Every request is validated;
//! a bad one gets a [`RegionError`] that becomes a status code, and changes nothing.
//!
//! Translation safety: whenever a present leaf changes or goes away, the frames it pointed to
//! either lose their host backing (freed frames, at [`MemoryManager::flush`]) or have their
//! translations dropped ([`Populate::invalidate`]) before the memory call returns. That is what
//! makes the change visible to every vCPU, on shadow paging and on EPT alike.

use std::collections::BTreeMap;
use std::sync::Arc;

use protocol::MemStats;
use protocol::layout::{SLAB_SLOT, SLAB_VA_END, SLAB_VA_START};
use protocol::memcall::{flags, prot};

use super::addr::{Gfn, Gva, HUGE_PAGE_SIZE, NodeId, Order, PAGE_SIZE};
use super::buddy::BuddyError;
use super::manager::{MemoryError, MemoryManager};
use super::page_state::FrameState;
use super::pagetable::{self, PageSize, Pte, PteFlags};
use super::policy::Policy;

/// Frames freed between two trims of the VMM's own memory.
const TRIM_AFTER_FRAMES: u64 = 8192;

/// Frames below this are below 4 GiB guest-physical.
const DMA32_LIMIT: Gfn = Gfn(1 << 20);

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("out of guest memory")]
    NoMemory,
    #[error("no region there")]
    NotFound,
    #[error("region already freed")]
    DoubleFree,
    /// A host-side failure: the VM cannot continue.
    #[error(transparent)]
    Internal(#[from] MemoryError),
}

impl RegionError {
    /// The status code the guest gets.
    pub fn status(&self) -> u64 {
        use protocol::status::*;
        match self {
            RegionError::Invalid(_) => EINVAL,
            RegionError::NoMemory => ENOMEM,
            RegionError::NotFound => EFAULT,
            RegionError::DoubleFree => EALREADY,
            RegionError::Internal(_) => EFAULT,
        }
    }
}

/// How a region's pages get frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Frames chosen at allocation.
    Alloc,
    /// Frames allocated when a page is first touched.
    Lazy,
    /// A slab of the slab allocator: mapped for the guest, owned by the VMM (the guest cannot
    /// free, protect or move it).
    Slab,
}

/// One guest region.
#[derive(Debug)]
pub struct Region {
    pub va: u64,
    /// Bytes of address space (whole pages).
    pub len: u64,
    pub page: PageSize,
    pub kind: RegionKind,
    pub policy: Policy,
    /// Node of the vCPU that created it (for `Policy::Local` lazy faults).
    pub home: NodeId,
    pub dma32: bool,
    /// `Alloc`: runs of frames backing consecutive pages, in address order.
    pub runs: Vec<(Gfn, u64)>,
    /// `Lazy`: page index -> frame, for pages touched so far.
    pub lazy: BTreeMap<u64, Gfn>,
    /// Access as a step function: page index -> `prot` bits from that page on.
    pub prot: BTreeMap<u64, u32>,
}

impl Region {
    /// A region of `kind` at `va` backed by `runs` (none for lazy regions), all of it with
    /// access `p`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        va: u64,
        len: u64,
        page: PageSize,
        kind: RegionKind,
        policy: Policy,
        home: NodeId,
        dma32: bool,
        runs: Vec<(Gfn, u64)>,
        p: u32,
    ) -> Region {
        Region { va, len, page, kind, policy, home, dma32, runs, lazy: BTreeMap::new(), prot: BTreeMap::from([(0, p)]) }
    }

    /// Number of pages of `self.page` size.
    pub fn pages(&self) -> u64 {
        self.len / self.page.bytes()
    }

    /// Frames per page.
    fn frames_per_page(&self) -> u64 {
        self.page.bytes() / PAGE_SIZE
    }

    /// Access of page `i`.
    pub fn prot_at(&self, i: u64) -> u32 {
        self.prot.range(..=i).next_back().map_or(prot::NONE, |(_, &p)| p)
    }

    /// Sets the access of pages `[a, b)`.
    fn set_prot(&mut self, a: u64, b: u64, p: u32) {
        let after = (b < self.pages()).then(|| self.prot_at(b));
        let inside: Vec<u64> = self.prot.range(a..b).map(|(&k, _)| k).collect();
        for k in inside {
            self.prot.remove(&k);
        }
        self.prot.insert(a, p);
        if let Some(after) = after {
            self.prot.insert(b, after);
        }
    }

    /// The first frame of page `i`, if it has one.
    pub fn frame(&self, i: u64) -> Option<Gfn> {
        match self.kind {
            RegionKind::Lazy => self.lazy.get(&i).copied(),
            RegionKind::Alloc | RegionKind::Slab => {
                let mut frame = i * self.frames_per_page();
                for &(g, n) in &self.runs {
                    if frame < n {
                        return Some(g.plus(frame));
                    }
                    frame -= n;
                }
                None
            }
        }
    }

    /// Address of page `i`.
    fn page_va(&self, i: u64) -> Gva {
        Gva(self.va + i * self.page.bytes())
    }

    /// Every frame run the region owns.
    fn owned_runs(&self) -> Vec<(Gfn, u64)> {
        match self.kind {
            RegionKind::Alloc | RegionKind::Slab => self.runs.clone(),
            RegionKind::Lazy => self.lazy.values().map(|&g| (g, 1)).collect(),
        }
    }
}

/// Leaf flags for `prot` bits (`None`: no access, nothing mapped).
fn leaf_flags(p: u32) -> Option<PteFlags> {
    if p & prot::ALL == prot::NONE {
        return None;
    }
    let mut f = PteFlags::USER;
    f.set(PteFlags::WRITABLE, p & prot::WRITE != 0);
    f.set(PteFlags::NO_EXECUTE, p & prot::EXEC == 0);
    Some(f)
}

/// Sorts runs and merges the adjacent ones, for fewer host calls.
fn coalesce(mut runs: Vec<(Gfn, u64)>) -> Vec<(Gfn, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(Gfn, u64)> = Vec::with_capacity(runs.len());
    for (g, n) in runs {
        match out.last_mut() {
            Some((lg, ln)) if lg.plus(*ln) == g => *ln += n,
            _ => out.push((g, n)),
        }
    }
    out
}

impl MemoryManager {
    /// ALLOC: `size` bytes of zeroed memory placed by `policy`, mapped read-write. Returns the
    /// address and the mapped length.
    pub fn alloc_region(
        &mut self,
        size: u64,
        fl: u32,
        policy: Policy,
        local: NodeId,
    ) -> Result<(u64, u64), RegionError> {
        self.check_request(size, fl, policy)?;
        let dma32 = fl & flags::DMA32 != 0;
        let p = prot::READ | prot::WRITE | if fl & flags::EXEC != 0 { prot::EXEC } else { 0 };
        if fl & flags::HUGE != 0 && !dma32 {
            match self.alloc_huge(size, p, policy, local, fl & flags::CONTIGUOUS != 0) {
                Ok(r) => return self.finish_alloc(r, fl),
                Err(RegionError::NoMemory) => self.counters.huge_fallbacks += 1,
                Err(e) => return Err(e),
            }
        }
        let pages = size.div_ceil(PAGE_SIZE);
        let runs = self.take_frames(pages, policy, local, dma32, fl & flags::CONTIGUOUS != 0)?;
        let Some(va) = self.va_small.alloc(pages * PAGE_SIZE) else {
            self.give_back(&runs)?;
            return Err(RegionError::NoMemory);
        };
        let region =
            Region::new(va, pages * PAGE_SIZE, PageSize::Size4K, RegionKind::Alloc, policy, local, dma32, runs, p);
        self.finish_alloc(region, fl)
    }

    /// Maps a new region and records it. If its page tables cannot be built, everything is
    /// given back and the request fails with `NoMemory`.
    fn finish_alloc(&mut self, region: Region, fl: u32) -> Result<(u64, u64), RegionError> {
        if let Err(e) = self.ensure_tables(region.va, region.len, region.page) {
            self.give_back(&region.runs)?;
            self.release_va(region.va, region.len, region.page);
            return Err(e);
        }
        let flags = leaf_flags(region.prot_at(0)).expect("allocations start accessible");
        let pages: Vec<(u64, Gfn)> =
            (0..region.pages()).map(|i| (i, region.frame(i).expect("every page has a frame"))).collect();
        self.map_pages_of(&region, &pages, flags)?;
        if fl & flags::POPULATE != 0 {
            for &(g, n) in &region.runs {
                let populate = self.pool.populate.clone();
                populate
                    .claim_and_fill(&self.pool.ram, &self.pool.states, g, n)
                    .map_err(|source| RegionError::Internal(MemoryError::Populate { gfn: g, source }))?;
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
        size: u64,
        p: u32,
        policy: Policy,
        local: NodeId,
        contiguous: bool,
    ) -> Result<Region, RegionError> {
        let blocks = size.div_ceil(HUGE_PAGE_SIZE);
        let mut runs = Vec::with_capacity(usize::try_from(blocks).unwrap_or(0));
        if contiguous {
            // One run of whole 2 MiB blocks (an exact run is aligned to at least its first block).
            runs = self.take_frames(blocks * Order::HUGE.pages(), policy, local, false, true)?;
        }
        for _ in 0..if contiguous { 0 } else { blocks } {
            let nodes = self.fallback.candidates(policy, local, self.rotor);
            self.rotor += 1;
            let got = nodes.iter().find_map(|&n| self.pool.alloc(n, Order::HUGE.pages(), None).ok());
            match got {
                Some(g) => runs.push((g, Order::HUGE.pages())),
                None => {
                    self.give_back(&runs)?;
                    return Err(RegionError::NoMemory);
                }
            }
        }
        // 2 MiB leaves only where the host can invalidate them (see `huge_leaves`); otherwise
        // the same 2 MiB blocks are mapped with 4 KiB leaves.
        let (zone, page) = if self.huge_leaves {
            (&mut self.va_huge, PageSize::Size2M)
        } else {
            (&mut self.va_small, PageSize::Size4K)
        };
        let Some(va) = zone.alloc(blocks * HUGE_PAGE_SIZE) else {
            self.give_back(&runs)?;
            return Err(RegionError::NoMemory);
        };
        Ok(Region::new(va, blocks * HUGE_PAGE_SIZE, page, RegionKind::Alloc, policy, local, false, runs, p))
    }

    /// MAP_LAZY: reserves `size` bytes of address space; frames come on first touch.
    pub fn map_lazy(&mut self, size: u64, fl: u32, policy: Policy, local: NodeId) -> Result<(u64, u64), RegionError> {
        self.check_request(size, fl, policy)?;
        if fl & (flags::HUGE | flags::CONTIGUOUS | flags::POPULATE) != 0 {
            return Err(RegionError::Invalid("lazy regions take 4 KiB pages, one at a time"));
        }
        let pages = size.div_ceil(PAGE_SIZE);
        let va = self.va_small.alloc(pages * PAGE_SIZE).ok_or(RegionError::NoMemory)?;
        let p = prot::READ | prot::WRITE | if fl & flags::EXEC != 0 { prot::EXEC } else { 0 };
        self.regions.insert(
            va,
            Region::new(
                va,
                pages * PAGE_SIZE,
                PageSize::Size4K,
                RegionKind::Lazy,
                policy,
                local,
                fl & flags::DMA32 != 0,
                Vec::new(),
                p,
            ),
        );
        self.counters.regions_created += 1;
        Ok((va, pages * PAGE_SIZE))
    }

    /// FAULT: gives the page at `va` in a lazy region a frame (and its untouched neighbours in
    /// the same fault-around window). Returns the pages mapped (0: it already was).
    pub fn fault_lazy(&mut self, va: u64) -> Result<u64, RegionError> {
        let start = self.region_containing(va).ok_or(RegionError::NotFound)?;
        let r = &self.regions[&start];
        if r.kind != RegionKind::Lazy {
            return Err(RegionError::NotFound);
        }
        let page = (va - start) / PAGE_SIZE;
        if r.lazy.contains_key(&page) {
            return Ok(0);
        }
        if r.prot_at(page) == prot::NONE {
            return Err(RegionError::NotFound);
        }
        let (policy, home, dma32, pages) = (r.policy, r.home, r.dma32, r.pages());
        let first = page - page % self.lazy_window;
        let window: Vec<u64> = (first..(first + self.lazy_window).min(pages))
            .filter(|&p| !r.lazy.contains_key(&p) && r.prot_at(p) != prot::NONE)
            .collect();
        let mut mapped = 0;
        for p in window {
            let runs = match self.take_frames(1, policy, home, dma32, true) {
                Ok(runs) => runs,
                // Neighbours are best effort; the faulting page itself must succeed.
                Err(RegionError::NoMemory) if p != page => continue,
                Err(e) => return Err(e),
            };
            let gfn = runs[0].0;
            let pva = start + p * PAGE_SIZE;
            if let Err(e) = self.ensure_tables(pva, PAGE_SIZE, PageSize::Size4K) {
                self.give_back(&runs)?;
                if p == page {
                    return Err(e);
                }
                continue;
            }
            let r = self.regions.get_mut(&start).expect("looked up above");
            r.lazy.insert(p, gfn);
            let flags = leaf_flags(r.prot_at(p)).expect("checked accessible");
            self.map_one(Gva(pva), gfn, PageSize::Size4K, flags)?;
            mapped += 1;
        }
        self.counters.lazy_faults += 1;
        self.counters.lazy_pages += mapped;
        Ok(mapped)
    }

    /// FREE: unmaps a region and releases its frames (at the next [`flush`](Self::flush)) and
    /// its addresses.
    pub fn free_region(&mut self, va: u64) -> Result<(), RegionError> {
        if self.regions.get(&va).is_some_and(|r| r.kind == RegionKind::Slab) {
            return Err(RegionError::NotFound);
        }
        let Some(region) = self.regions.remove(&va) else {
            if self.va_small.recently_freed(va) || self.va_huge.recently_freed(va) {
                return Err(RegionError::DoubleFree);
            }
            return Err(RegionError::NotFound);
        };
        self.drop_region(region)
    }

    /// Unmaps a region that was taken out of the map and releases its frames (at the next
    /// flush) and addresses.
    pub(super) fn drop_region(&mut self, region: Region) -> Result<(), RegionError> {
        let mut present = Vec::new();
        self.unmap_pages_of(&region, 0, region.pages(), &mut present)?;
        self.pending_free.extend(region.owned_runs());
        self.release_va(region.va, region.len, region.page);
        self.counters.regions_freed += 1;
        Ok(())
    }

    /// A slab: `pages` contiguous frames placed by `policy`, mapped read-write in one slot of
    /// the slab zone. Returns its address.
    pub(super) fn map_slab(&mut self, pages: u64, policy: Policy, local: NodeId) -> Result<u64, RegionError> {
        let runs = self.take_frames(pages, policy, local, false, true)?;
        let Some(va) = self.va_slab.alloc(SLAB_SLOT) else {
            self.give_back(&runs)?;
            return Err(RegionError::NoMemory);
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
        self.finish_alloc(region, 0).map(|(va, _)| va)
    }

    /// PROTECT: sets the access of whole pages `[va, va + size)` of one region. `prot::NONE`
    /// unmaps them and keeps their frames; making them accessible again maps the same frames.
    pub fn protect_region(&mut self, va: u64, size: u64, p: u32) -> Result<(), RegionError> {
        if p & !prot::ALL != 0 {
            return Err(RegionError::Invalid("unknown protection bits"));
        }
        let start = self.region_containing(va).ok_or(RegionError::NotFound)?;
        if self.regions[&start].kind == RegionKind::Slab {
            return Err(RegionError::NotFound);
        }
        let region = self.regions.remove(&start).expect("found above");
        let res = self.protect_in(&region, va, size, p);
        let mut region = region;
        if res.is_ok() {
            let ps = region.page.bytes();
            region.set_prot((va - start) / ps, (va - start + size) / ps, p);
        }
        self.regions.insert(start, region);
        res
    }

    fn protect_in(&mut self, region: &Region, va: u64, size: u64, p: u32) -> Result<(), RegionError> {
        let ps = region.page.bytes();
        if size == 0 || !va.is_multiple_of(ps) || !size.is_multiple_of(ps) {
            return Err(RegionError::Invalid("protect needs whole pages"));
        }
        let end = va.checked_add(size).ok_or(RegionError::Invalid("range overflows"))?;
        if end > region.va + region.len {
            return Err(RegionError::Invalid("range crosses the end of the region"));
        }
        let (a, b) = ((va - region.va) / ps, (end - region.va) / ps);
        let mut changed = Vec::new();
        match leaf_flags(p) {
            None => self.unmap_pages_of(region, a, b, &mut changed)?,
            Some(flags) => {
                let mut newly = Vec::new();
                for i in a..b {
                    let Some(gfn) = region.frame(i) else { continue };
                    match self.protect_one(region.page_va(i), region.page, flags)? {
                        Some(old) => changed.push((old.gfn(), region.frames_per_page())),
                        None => newly.push((i, gfn)),
                    }
                }
                self.map_pages_of(region, &newly, flags)?;
            }
        }
        self.invalidate(changed)
    }

    /// MOVE: maps the region's frames at a new address and unmaps the old one.
    pub fn move_region(&mut self, va: u64) -> Result<u64, RegionError> {
        if self.regions.get(&va).is_some_and(|r| r.kind == RegionKind::Slab) {
            return Err(RegionError::NotFound);
        }
        let mut region = self.regions.remove(&va).ok_or(RegionError::NotFound)?;
        let zone = match region.page {
            PageSize::Size4K => &mut self.va_small,
            PageSize::Size2M => &mut self.va_huge,
        };
        let Some(new_va) = zone.alloc(region.len) else {
            self.regions.insert(va, region);
            return Err(RegionError::NoMemory);
        };
        if let Err(e) = self.ensure_tables(new_va, region.len, region.page) {
            self.release_va(new_va, region.len, region.page);
            self.regions.insert(va, region);
            return Err(e);
        }
        let mut present = Vec::new();
        self.unmap_pages_of(&region, 0, region.pages(), &mut present)?;
        let old_va = region.va;
        region.va = new_va;
        // Map every page that has a frame and is accessible, with its own access.
        let mut by_flags: BTreeMap<u64, Vec<(u64, Gfn)>> = BTreeMap::new();
        for i in 0..region.pages() {
            if let (Some(g), Some(f)) = (region.frame(i), leaf_flags(region.prot_at(i))) {
                by_flags.entry(f.bits()).or_default().push((i, g));
            }
        }
        for (bits, pages) in by_flags {
            self.map_pages_of(&region, &pages, PteFlags::from_bits_truncate(bits))?;
        }
        self.invalidate(present)?;
        self.release_va(old_va, region.len, region.page);
        self.regions.insert(new_va, region);
        Ok(new_va)
    }

    /// TRANSLATE: the guest-physical address and node behind `va`.
    pub fn translate(&self, va: u64) -> Result<(u64, u32), RegionError> {
        if va >= 1 << 47 {
            return Err(RegionError::Invalid("non-canonical address"));
        }
        let (pte, size) = self.pt.translate(self.pool.ram.mem(), Gva(va)).ok_or(RegionError::NotFound)?;
        let gpa = pte.gfn().gpa().0 + (va & (size.bytes() - 1));
        let node = self.pool.states.node(pte.gfn()).ok_or(RegionError::NotFound)?;
        Ok((gpa, u32::try_from(node).expect("few nodes")))
    }

    /// Discards the host backing of, and frees, every frame the batch's FREEs released: one
    /// `MADV_DONTNEED` per physically contiguous stretch.
    pub fn flush(&mut self) -> Result<(), MemoryError> {
        if self.pending_free.is_empty() {
            return Ok(());
        }
        let runs = std::mem::take(&mut self.pending_free);
        for &(g, n) in &runs {
            self.pool.states.set_range(g, n, FrameState::Free);
        }
        for (g, n) in coalesce(runs.clone()) {
            // Split where a stretch leaves a RAM range (the MMIO hole).
            let mut at = g;
            let end = g.plus(n);
            while at < end {
                let (_, range_end) = self.pool.states.range_of(at).expect("frames are RAM");
                let stop = range_end.min(end);
                let pages = stop.0 - at.0;
                self.pool.ram.discard(at.gpa(), pages * PAGE_SIZE).map_err(|source| MemoryError::Discard {
                    gfn: at,
                    pages,
                    source,
                })?;
                self.counters.discard_calls += 1;
                self.counters.discarded_pages += pages;
                at = stop;
            }
        }
        for (g, n) in runs {
            let node = self.pool.states.node(g).expect("frames are RAM");
            self.pool.nodes[node].buddy.free_exact(g, n).map_err(|source| MemoryError::Free {
                gfn: g,
                pages: n,
                source,
            })?;
            self.freed_since_trim += n;
        }
        if self.freed_since_trim >= TRIM_AFTER_FRAMES {
            self.trim();
        }
        Ok(())
    }

    /// Gives the host back the VMM's own memory that guest frees left idle: all-zero allocator
    /// metadata pages and free heap memory. Runs after large frees.
    pub fn trim(&mut self) {
        self.freed_since_trim = 0;
        let mut released = 0;
        for n in &mut self.pool.nodes {
            released += n.buddy.trim_metadata() as u64;
        }
        self.counters.trims += 1;
        self.counters.trimmed_bytes += released;
        // SAFETY: malloc_trim only returns free heap memory to the kernel.
        unsafe { libc::malloc_trim(0) };
    }

    /// STATS for one node or all.
    pub fn mem_stats(&self, node: Option<usize>) -> Result<MemStats, RegionError> {
        let nodes: Vec<&super::manager::NodeMem> = match node {
            None => self.pool.nodes.iter().collect(),
            Some(n) => vec![self.pool.nodes.get(n).ok_or(RegionError::Invalid("no such node"))?],
        };
        let total: u64 = nodes.iter().map(|n| n.buddy.managed_pages()).sum();
        let free: u64 = nodes.iter().map(|n| n.buddy.free_pages()).sum();
        let resident = nodes.iter().map(|n| self.pool.states.resident(n.id.0 as usize)).sum();
        Ok(MemStats {
            total_frames: total,
            free_frames: free,
            allocated_frames: total - free,
            resident_frames: resident,
            page_table_pages: self.pt.table_pages(),
            slab_objects_active: self.slab.active(),
            slab_frames: self.slab.frames(),
            ..MemStats::default()
        })
    }

    /// Regions own disjoint frames that are allocated, lie in disjoint address ranges, and
    /// every accessible page translates to its own frame (others to nothing).
    pub(super) fn check_regions(&self) -> Result<(), String> {
        let mut owner: BTreeMap<u64, u64> = BTreeMap::new();
        let mut end = 0;
        for (&va, r) in &self.regions {
            if va < end {
                return Err(format!("region {va:#x} overlaps the previous one"));
            }
            end = va + r.len;
            for (g, n) in r.owned_runs() {
                for i in 0..n {
                    let f = g.plus(i);
                    if self.pool.states.get(f) == FrameState::Free {
                        return Err(format!("region {va:#x} owns free frame {f}"));
                    }
                    if let Some(other) = owner.insert(f.0, va) {
                        return Err(format!("frame {f} owned by regions {other:#x} and {va:#x}"));
                    }
                }
            }
            for i in 0..r.pages() {
                let mapped = self.pt.translate(self.pool.ram.mem(), r.page_va(i));
                let want = r.frame(i).filter(|_| r.prot_at(i) != prot::NONE);
                match (mapped, want) {
                    (None, None) => {}
                    (Some((pte, size)), Some(g)) if pte.gfn() == g && size == r.page => {
                        let w = pte.flags().contains(PteFlags::WRITABLE);
                        if w != (r.prot_at(i) & prot::WRITE != 0) {
                            return Err(format!("page {i} of region {va:#x}: writable {w}, prot {:#x}", r.prot_at(i)));
                        }
                    }
                    (m, w) => return Err(format!("page {i} of region {va:#x}: mapped {m:?}, expected frame {w:?}")),
                }
            }
        }
        Ok(())
    }

    /// Live regions.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Event counts.
    pub fn counters(&self) -> &super::manager::MmCounters {
        &self.counters
    }

    fn check_request(&self, size: u64, fl: u32, policy: Policy) -> Result<(), RegionError> {
        if fl & !flags::ALL != 0 {
            return Err(RegionError::Invalid("unknown flags"));
        }
        if size == 0 {
            return Err(RegionError::Invalid("size is zero"));
        }
        if let Policy::Bind(n) | Policy::Preferred(n) = policy
            && n.0 as usize >= self.pool.nodes.len()
        {
            return Err(RegionError::Invalid("no such node"));
        }
        let total: u64 = self.pool.nodes.iter().map(|n| n.buddy.managed_pages()).sum();
        if size > total * PAGE_SIZE {
            return Err(RegionError::NoMemory);
        }
        Ok(())
    }

    fn region_containing(&self, va: u64) -> Option<u64> {
        self.regions.range(..=va).next_back().filter(|(s, r)| va < *s + r.len).map(|(s, _)| *s)
    }

    /// `pages` frames placed by `policy`: one run when `contiguous`, else the largest blocks
    /// available (like `vmalloc`). Frees pending in this batch are flushed and retried before
    /// giving up.
    fn take_frames(
        &mut self,
        pages: u64,
        policy: Policy,
        local: NodeId,
        dma32: bool,
        contiguous: bool,
    ) -> Result<Vec<(Gfn, u64)>, RegionError> {
        match self.try_take_frames(pages, policy, local, dma32, contiguous) {
            Err(RegionError::NoMemory) if !self.pending_free.is_empty() => {
                self.flush()?;
                self.try_take_frames(pages, policy, local, dma32, contiguous)
            }
            other => other,
        }
    }

    fn try_take_frames(
        &mut self,
        pages: u64,
        policy: Policy,
        local: NodeId,
        dma32: bool,
        contiguous: bool,
    ) -> Result<Vec<(Gfn, u64)>, RegionError> {
        let limit = dma32.then_some(DMA32_LIMIT);
        let mut taken: Vec<(Gfn, u64)> = Vec::new();
        let result = (|| {
            if contiguous {
                for n in self.fallback.candidates(policy, local, self.rotor) {
                    match self.pool.alloc(n, pages, limit) {
                        Ok(g) => {
                            taken.push((g, pages));
                            self.rotor += 1;
                            return Ok(());
                        }
                        Err(e) if is_exhausted(&e) => continue,
                        Err(e) => return Err(RegionError::Internal(e)),
                    }
                }
                return Err(RegionError::NoMemory);
            }
            if policy == Policy::Interleave {
                for _ in 0..pages {
                    let nodes = self.fallback.candidates(policy, local, self.rotor);
                    self.rotor += 1;
                    let mut got = None;
                    for n in nodes {
                        match self.pool.alloc(n, 1, limit) {
                            Ok(g) => {
                                got = Some(g);
                                break;
                            }
                            Err(e) if is_exhausted(&e) => continue,
                            Err(e) => return Err(RegionError::Internal(e)),
                        }
                    }
                    taken.push((got.ok_or(RegionError::NoMemory)?, 1));
                }
                return Ok(());
            }
            let mut left = pages;
            for n in self.fallback.candidates(policy, local, self.rotor) {
                let mut k = floor_log2(left).min(u32::from(Order::MAX.get()));
                while left > 0 {
                    match self.pool.alloc(n, 1 << k, limit) {
                        Ok(g) => {
                            taken.push((g, 1 << k));
                            left -= 1 << k;
                            if left > 0 {
                                k = k.min(floor_log2(left));
                            }
                        }
                        Err(e) if is_exhausted(&e) => {
                            if k == 0 {
                                break;
                            }
                            k -= 1;
                        }
                        Err(e) => return Err(RegionError::Internal(e)),
                    }
                }
                if left == 0 {
                    return Ok(());
                }
            }
            Err(RegionError::NoMemory)
        })();
        match result {
            Ok(()) => Ok(taken),
            Err(e) => {
                self.give_back(&taken)?;
                Err(e)
            }
        }
    }

    /// Builds every page table `[va, va + len)` needs, before anything is mapped, so a request
    /// that cannot get its tables fails cleanly with `NoMemory`.
    fn ensure_tables(&mut self, va: u64, len: u64, size: PageSize) -> Result<(), RegionError> {
        let span = pagetable::table_span(size);
        let mem = Arc::clone(&self.pool.ram);
        let mut at = va;
        while at < va + len {
            let super::manager::MemoryManager { pool, pt, .. } = self;
            let mut alloc = || pool.alloc_table();
            match pt.walk_to_leaf_table(mem.mem(), Some(&mut alloc), Gva(at), size) {
                Ok(_) => {}
                Err(pagetable::PtError::NoTableMemory) => return Err(RegionError::NoMemory),
                Err(source) => return Err(RegionError::Internal(MemoryError::PageTable { va: Gva(at), source })),
            }
            at = (at / span + 1) * span;
        }
        Ok(())
    }

    fn release_va(&mut self, va: u64, len: u64, page: PageSize) {
        if (SLAB_VA_START..SLAB_VA_END).contains(&va) {
            return self.va_slab.free(va, SLAB_SLOT);
        }
        match page {
            PageSize::Size4K => self.va_small.free(va, len),
            PageSize::Size2M => self.va_huge.free(va, len),
        }
    }

    /// Returns frames that were never mapped.
    fn give_back(&mut self, runs: &[(Gfn, u64)]) -> Result<(), RegionError> {
        for &(g, n) in runs {
            self.pool.free(g, n)?;
        }
        Ok(())
    }

    /// Maps `(page index, frame)` pairs of `region` with `flags`, one leaf table at a time.
    fn map_pages_of(&mut self, region: &Region, pages: &[(u64, Gfn)], flags: PteFlags) -> Result<(), RegionError> {
        let size = region.page;
        let mem = Arc::clone(&self.pool.ram);
        let mut i = 0;
        while i < pages.len() {
            let va = region.page_va(pages[i].0);
            // The leaf table for this stretch: created if missing, backed if discarded.
            let table = {
                let super::manager::MemoryManager { pool, pt, .. } = self;
                let mut alloc = || pool.alloc_table();
                pt.walk_to_leaf_table(mem.mem(), Some(&mut alloc), va, size)
                    .map_err(|source| MemoryError::PageTable { va, source })?
                    .expect("tables are created")
            };
            self.make_resident(table)?;
            let span_end = (va.0 / pagetable::table_span(size) + 1) * pagetable::table_span(size);
            let mut count = 0;
            while i < pages.len() && region.page_va(pages[i].0).0 < span_end {
                let (idx, gfn) = pages[i];
                let v = region.page_va(idx);
                let slot = pagetable::leaf_slot(table, v, size);
                let ok = pagetable::install_entry(mem.mem(), slot, pagetable::leaf_pte(gfn, size, flags))
                    .map_err(|source| MemoryError::PageTable { va: v, source })?;
                if !ok {
                    return Err(RegionError::Internal(MemoryError::PageTable {
                        va: v,
                        source: pagetable::PtError::AlreadyMapped { va: v },
                    }));
                }
                count += 1;
                i += 1;
            }
            *self.leaves.entry(table).or_default() += count;
        }
        Ok(())
    }

    /// Clears the leaves of pages `[a, b)` of `region`, one leaf table at a time, collecting
    /// the frames that were mapped into `present`. Empty tables lose their backing.
    fn unmap_pages_of(
        &mut self,
        region: &Region,
        a: u64,
        b: u64,
        present: &mut Vec<(Gfn, u64)>,
    ) -> Result<(), RegionError> {
        let size = region.page;
        let mem = Arc::clone(&self.pool.ram);
        let span = pagetable::table_span(size);
        let mut i = a;
        while i < b {
            let va = region.page_va(i);
            let span_end = (va.0 / span + 1) * span;
            let last = ((span_end - region.va) / size.bytes()).min(b);
            let table = self.pt.leaf_table(mem.mem(), va, size);
            if let Some(t) = table.filter(|&t| self.pool.states.get(t) == FrameState::Resident) {
                let mut cleared = 0;
                for j in i..last {
                    let v = region.page_va(j);
                    let old: Pte = pagetable::clear_entry(mem.mem(), pagetable::leaf_slot(t, v, size))
                        .map_err(|source| MemoryError::PageTable { va: v, source })?;
                    if old.is_present() {
                        present.push((old.gfn(), region.frames_per_page()));
                        cleared += 1;
                    }
                }
                if cleared > 0 {
                    let n = self.leaves.get_mut(&t).expect("mapped leaves are counted");
                    *n -= cleared;
                    if *n == 0 {
                        self.leaves.remove(&t);
                        self.discard_empty_table(t)?;
                    }
                }
            }
            i = last;
        }
        Ok(())
    }

    /// Drops every translation of frames whose present leaf changed.
    fn invalidate(&mut self, changed: Vec<(Gfn, u64)>) -> Result<(), RegionError> {
        if changed.is_empty() {
            return Ok(());
        }
        let runs = coalesce(changed);
        self.counters.invalidations += runs.len() as u64;
        let populate = self.pool.populate.clone();
        populate
            .invalidate(&self.pool.ram, &runs)
            .map_err(|source| RegionError::Internal(MemoryError::Populate { gfn: runs[0].0, source }))
    }
}

fn is_exhausted(e: &MemoryError) -> bool {
    matches!(e, MemoryError::Alloc { source: BuddyError::OutOfMemory { .. } | BuddyError::TooLarge { .. }, .. })
}

fn floor_log2(x: u64) -> u32 {
    63 - x.max(1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A two-node memory manager over real (unregistered) guest RAM, without KVM.
    fn manager() -> MemoryManager {
        crate::memory::manager::standalone(&[32 << 20, 32 << 20]).unwrap()
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { size: u64, fl: u32, policy: u8, node: u8 },
        Lazy { size: u64 },
        Free(usize),
        Protect { i: usize, first: u64, pages: u64, p: u32 },
        Move(usize),
        Fault { i: usize, page: u64 },
        Wild(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let fl = prop::sample::select(vec![
            0,
            flags::CONTIGUOUS,
            flags::HUGE,
            flags::POPULATE,
            flags::DMA32,
            flags::HUGE | flags::CONTIGUOUS,
            1 << 30,
        ]);
        prop_oneof![
            4 => (1u64..6 << 20, fl, 0u8..5, 0u8..3).prop_map(|(size, fl, policy, node)| Op::Alloc { size, fl, policy, node }),
            1 => (1u64..4 << 20).prop_map(|size| Op::Lazy { size }),
            3 => any::<usize>().prop_map(Op::Free),
            2 => (any::<usize>(), 0u64..8, 0u64..8, 0u32..8).prop_map(|(i, first, pages, p)| Op::Protect { i, first, pages, p }),
            1 => any::<usize>().prop_map(Op::Move),
            2 => (any::<usize>(), 0u64..1024).prop_map(|(i, page)| Op::Fault { i, page }),
            1 => any::<u64>().prop_map(Op::Wild),
        ]
    }

    fn policy(p: u8, node: u8) -> Policy {
        match p {
            0 => Policy::Local,
            1 => Policy::Bind(NodeId(node.into())),
            2 => Policy::Preferred(NodeId(node.into())),
            _ => Policy::Interleave,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn invariants_hold_after_every_operation(ops in prop::collection::vec(op(), 1..60)) {
            let mut mm = manager();
            let total: u64 = mm.node_stats().iter().map(|n| n.frames_total).sum();
            let mut live: Vec<u64> = Vec::new();
            for op in ops {
                let pick = |i: usize, live: &Vec<u64>| (!live.is_empty()).then(|| live[i % live.len()]);
                match op {
                    Op::Alloc { size, fl, policy: p, node } => {
                        match mm.alloc_region(size, fl, policy(p, node), NodeId(0)) {
                            Ok((va, len)) => {
                                prop_assert!(len >= size);
                                live.push(va);
                            }
                            Err(RegionError::Internal(e)) => return Err(TestCaseError::fail(e.to_string())),
                            Err(_) => {}
                        }
                    }
                    Op::Lazy { size } => {
                        if let Ok((va, _)) = mm.map_lazy(size, 0, Policy::Local, NodeId(1)) {
                            live.push(va);
                        }
                    }
                    Op::Free(i) => {
                        if let Some(va) = pick(i, &live) {
                            mm.free_region(va).unwrap();
                            live.retain(|&v| v != va);
                            // A second free is refused and changes nothing.
                            prop_assert!(matches!(mm.free_region(va), Err(RegionError::DoubleFree)));
                        }
                    }
                    Op::Protect { i, first, pages, p } => {
                        if let Some(va) = pick(i, &live) {
                            let r = mm.protect_region(va + first * 4096, pages * 4096, p);
                            prop_assert!(!matches!(r, Err(RegionError::Internal(_))), "{r:?}");
                        }
                    }
                    Op::Move(i) => {
                        if let Some(va) = pick(i, &live) {
                            let new = mm.move_region(va).unwrap();
                            live.retain(|&v| v != va);
                            live.push(new);
                        }
                    }
                    Op::Fault { i, page } => {
                        if let Some(va) = pick(i, &live) {
                            let r = mm.fault_lazy(va + page * 4096);
                            prop_assert!(!matches!(r, Err(RegionError::Internal(_))), "{r:?}");
                        }
                    }
                    Op::Wild(va) => {
                        if !live.contains(&va) {
                            prop_assert!(mm.free_region(va).is_err());
                        }
                    }
                }
                mm.flush().unwrap();
                mm.check_invariants().map_err(TestCaseError::fail)?;
            }
            for va in live {
                mm.free_region(va).unwrap();
            }
            mm.flush().unwrap();
            mm.check_invariants().map_err(TestCaseError::fail)?;
            // Everything is back but the page tables.
            let free: u64 = mm.node_stats().iter().map(|n| n.frames_free).sum();
            prop_assert_eq!(free + mm.page_tables().table_pages(), total);
        }
    }

    #[test]
    fn coalesce_merges_adjacent() {
        let runs = vec![(Gfn(8), 4), (Gfn(0), 4), (Gfn(4), 2), (Gfn(20), 1)];
        assert_eq!(coalesce(runs), vec![(Gfn(0), 6), (Gfn(8), 4), (Gfn(20), 1)]);
    }
}
