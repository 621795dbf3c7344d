//! The guest's virtual address space: page tables, VA zones and regions.
//!
//! Built on the two layers below, which every operation borrows together as [`Phys`]: frames
//! (who owns a frame) and backing (its host memory). One file per operation, the way Linux's
//! `mm/` splits `mmap.c`, `mprotect.c` and `mremap.c`:
//!
//! - `mmap`: ALLOC, FREE and slab regions; `lazy`: MAP_LAZY and its first-touch faults;
//!   `mprotect`: PROTECT; `mremap`: MOVE;
//! - `mapping`: installing and clearing leaves, leaf-table counts and translation invalidation;
//! - `pagetable` (the x86-64 tables), `zone` (VA zones), `region` (the region type).
//!
//! Every request is validated; a bad one gets a [`SpaceError`] that becomes a status code, and
//! changes nothing.
//!
//! Translation safety: whenever a present leaf changes or goes away, the frames it pointed to
//! either lose their host backing (freed frames, at [`AddressSpace::flush`]) or have their
//! translations dropped (`Backing::invalidate`) before the memory call returns. That is what
//! makes the change visible to every vCPU, on shadow paging and on EPT alike.

mod lazy;
mod mapping;
mod mmap;
mod mprotect;
mod mremap;
pub mod pagetable;
mod phys;
pub mod region;
pub mod scan;
pub mod zone;

use std::collections::{BTreeMap, HashMap};

use protocol::layout::{HEAP_VA_END, HEAP_VA_START, HUGE_HEAP_VA_END, HUGE_HEAP_VA_START, SLAB_SLOT};
use protocol::slab::{NR_CLASSES, class_zone};

use crate::memory::addr::{Gfn, Gva, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::memory::backing::{Backing, BackingError};
use crate::memory::frames::page_state::FrameState;
use crate::memory::frames::{FrameError, Frames, Run};

use pagetable::{PageTables, PtError, Pte};
use region::{PageEntry, Region, RegionKind, coalesce};
use zone::VaZone;

pub use phys::Phys;

/// Most frames one lazy-region fault maps.
const LAZY_WINDOW_MAX: u64 = 16;

/// Regions the guest may hold with `ram` bytes of RAM: 1024, plus one per 128 KiB.
pub fn region_limit(ram: u64) -> usize {
    usize::try_from(1024 + ram / (128 << 10)).unwrap_or(usize::MAX)
}

#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("out of guest memory")]
    NoMemory,
    #[error("no region there")]
    NotFound,
    #[error("region already freed")]
    DoubleFree,
    #[error(transparent)]
    Frames(FrameError),
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error("page tables: cannot update {va}")]
    PageTable {
        va: Gva,
        #[source]
        source: PtError,
    },
}

impl From<FrameError> for SpaceError {
    fn from(e: FrameError) -> Self {
        if e.is_exhausted() { SpaceError::NoMemory } else { SpaceError::Frames(e) }
    }
}

impl SpaceError {
    /// The status code the guest gets, or `None` for a host failure (the VM cannot continue).
    pub fn guest_status(&self) -> Option<u64> {
        use protocol::status::*;
        match self {
            SpaceError::Invalid(_) => Some(EINVAL),
            SpaceError::NoMemory => Some(ENOMEM),
            SpaceError::NotFound => Some(EFAULT),
            SpaceError::DoubleFree => Some(EALREADY),
            SpaceError::Frames(_) | SpaceError::Backing(_) | SpaceError::PageTable { .. } => None,
        }
    }
}

/// What the address space has done (the stats JSON's `memory.counters`).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SpaceCounters {
    pub regions_created: u64,
    pub regions_freed: u64,
    pub huge_fallbacks: u64,
    pub lazy_faults: u64,
    pub lazy_pages: u64,
    pub tables_discarded: u64,
    pub discard_calls: u64,
    pub discarded_pages: u64,
    pub invalidations: u64,
    /// Frames given back to the frames layer by frees.
    pub frames_freed: u64,
}

/// What the address space reports.
#[derive(Clone, Debug)]
pub struct SpaceSnapshot {
    /// Live regions.
    pub regions: usize,
    pub page_table_pages: u64,
    /// Whether HUGE allocations get 2 MiB leaves.
    pub huge_leaves: bool,
    pub counters: SpaceCounters,
}

/// The guest's address space.
#[derive(Debug)]
pub struct AddressSpace {
    pt: PageTables,
    /// Present leaves in each leaf table; a table whose count drops to zero loses its host
    /// backing (it stays in place: tables are never repointed).
    leaves: HashMap<Gfn, u32>,
    /// Guest regions (allocations, lazy regions, slabs) by start address.
    regions: BTreeMap<u64, Region>,
    va_small: VaZone,
    va_huge: VaZone,
    /// Slabs: one 64 KiB slot each, no guards (the slot's unused tail is unmapped).
    /// One slab zone per size class (`protocol::slab::class_zone`).
    va_slab: Vec<VaZone>,
    /// Frames unmapped by this batch's frees, discarded and returned at [`Self::flush`].
    pending_free: Vec<Run>,
    /// Frames a lazy-region fault maps at once.
    lazy_window: u64,
    /// Most regions the guest may hold (each costs the VMM a few dozen bytes and may cost the
    /// guest no frames at all).
    max_regions: usize,
    /// Map HUGE allocations with 2 MiB leaves. Off under shadow paging: there KVM's shadow
    /// entries are 4 KiB whatever the guest leaf size, and this host's shadow MMU (PVM) keeps
    /// translations of guest 2 MiB leaves across MMU-notifier invalidations, so a freed or moved
    /// 2 MiB page stays readable (`scenario=ptstress huge=100` shows it with
    /// `--memory huge-leaves=on`).
    huge_leaves: bool,
    counters: SpaceCounters,
}

impl AddressSpace {
    /// An empty address space: a root table from `phys`, nothing mapped. Lazy regions map up to
    /// the `fault_around` window (at most 16 pages) per fault; the guest may hold
    /// [`region_limit`] regions.
    pub fn new(phys: &mut Phys<'_>, fault_around: u64) -> Result<Self, SpaceError> {
        let max_regions = region_limit(phys.frames.total_pages() * PAGE_SIZE);
        let root = phys.alloc_table().ok_or(SpaceError::NoMemory)?;
        Ok(AddressSpace {
            pt: PageTables::new(root),
            leaves: HashMap::new(),
            regions: BTreeMap::new(),
            va_small: VaZone::new(HEAP_VA_START, HEAP_VA_END, PAGE_SIZE),
            va_huge: VaZone::new(HUGE_HEAP_VA_START, HUGE_HEAP_VA_END, HUGE_PAGE_SIZE),
            va_slab: (0..NR_CLASSES)
                .map(|c| {
                    let (start, end) = class_zone(c);
                    VaZone::with_guard(start, end, SLAB_SLOT, false)
                })
                .collect(),
            pending_free: Vec::new(),
            lazy_window: (fault_around / PAGE_SIZE).clamp(1, LAZY_WINDOW_MAX),
            max_regions,
            huge_leaves: false,
            counters: SpaceCounters::default(),
        })
    }

    /// The guest's page tables.
    pub fn page_tables(&self) -> &PageTables {
        &self.pt
    }

    /// Whether HUGE allocations get 2 MiB leaves.
    pub fn set_huge_leaves(&mut self, on: bool) {
        self.huge_leaves = on;
    }

    /// Whether HUGE allocations get 2 MiB leaves.
    pub fn huge_leaves(&self) -> bool {
        self.huge_leaves
    }

    /// The region starting at `va`.
    pub fn region(&self, va: u64) -> Option<&Region> {
        self.regions.get(&va)
    }

    /// Most regions the guest may hold.
    pub fn max_regions(&self) -> usize {
        self.max_regions
    }

    /// Live regions.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Event counts.
    pub fn counters(&self) -> &SpaceCounters {
        &self.counters
    }

    /// TRANSLATE: the guest-physical address and node behind `va`.
    pub fn translate(&self, frames: &Frames, backing: &Backing, va: u64) -> Result<(u64, u32), SpaceError> {
        if va >= 1 << 47 {
            return Err(SpaceError::Invalid("non-canonical address"));
        }
        let (pte, size) = self.pt.translate(backing.ram().mem(), Gva(va)).ok_or(SpaceError::NotFound)?;
        let gpa = pte.gfn().gpa().0 + (va & (size.bytes() - 1));
        let node = frames.node_of(pte.gfn()).ok_or(SpaceError::NotFound)?;
        Ok((gpa, node.0))
    }

    /// The guest-physical address behind `va` if the guest may write there (a present leaf
    /// with the user and writable bits).
    pub fn user_writable(&self, backing: &Backing, va: u64) -> Option<u64> {
        if va >= 1 << 47 {
            return None;
        }
        let (pte, size) = self.pt.translate(backing.ram().mem(), Gva(va))?;
        let f = pte.flags();
        (f.contains(pagetable::PteFlags::USER) && f.contains(pagetable::PteFlags::WRITABLE))
            .then(|| pte.gfn().gpa().0 + (va & (size.bytes() - 1)))
    }

    /// Discards the host backing of, and frees, every frame the batch's FREEs released: one
    /// `MADV_DONTNEED` per physically contiguous stretch.
    pub fn flush(&mut self, phys: &mut Phys<'_>) -> Result<(), SpaceError> {
        if self.pending_free.is_empty() {
            return Ok(());
        }
        // Frames of several regions that touch become one stretch: one call each below.
        let runs = phys.frames.split_at_ranges(coalesce(std::mem::take(&mut self.pending_free)));
        for &(g, n) in &runs {
            phys.frames.unassign(g, n)?;
        }
        let (calls, pages) = phys.backing.discard_runs(&runs)?;
        self.counters.discard_calls += calls;
        self.counters.discarded_pages += pages;
        for (g, n) in runs {
            phys.frames.release(g, n)?;
            self.counters.frames_freed += n;
        }
        Ok(())
    }

    /// What the layer reports.
    pub fn snapshot(&self) -> SpaceSnapshot {
        SpaceSnapshot {
            regions: self.regions.len(),
            page_table_pages: self.pt.table_pages(),
            huge_leaves: self.huge_leaves,
            counters: self.counters.clone(),
        }
    }

    /// Regions own disjoint, allocated frames and disjoint addresses, every accessible page
    /// translates to its own frame (others to nothing), every leaf table's count matches its
    /// present entries, and no frees wait for a flush.
    pub fn check_invariants(&self, frames: &Frames, backing: &Backing) -> Result<(), String> {
        self.check_regions(frames, backing)?;
        self.check_leaf_counts(frames, backing)?;
        if !self.pending_free.is_empty() {
            return Err(format!("{} runs wait for a flush", self.pending_free.len()));
        }
        Ok(())
    }

    fn check_regions(&self, frames: &Frames, backing: &Backing) -> Result<(), String> {
        let states = frames.states();
        // One bit per frame: owned by a region seen so far.
        let frames_end = states.ranges().last().map_or(0, |r| r.1.0);
        let mut owned = vec![0u64; usize::try_from(frames_end.div_ceil(64)).unwrap_or(0)];
        let mut end = 0;
        for (&va, r) in &self.regions {
            if va < end {
                return Err(format!("region {va:#x} overlaps the previous one"));
            }
            end = va + r.len;
            for i in 0..r.pages() {
                let e = self.entry(frames, backing, va, r.page, i).map_err(|e| e.to_string())?;
                let page = r.page_entry(e);
                let Some(g) = page.frame() else {
                    if page == PageEntry::Foreign || r.kind == RegionKind::Alloc {
                        return Err(format!("page {i} of region {va:#x}: entry {e:?}"));
                    }
                    continue;
                };
                for k in 0..r.frames_per_page() {
                    let f = g.plus(k);
                    if states.get(f) == FrameState::Free {
                        return Err(format!("region {va:#x} owns free frame {f}"));
                    }
                    let (w, bit) = (usize::try_from(f.0 / 64).unwrap_or(usize::MAX), 1u64 << (f.0 % 64));
                    match owned.get_mut(w) {
                        Some(word) if *word & bit == 0 => *word |= bit,
                        _ => return Err(format!("frame {f} owned twice (the second time by region {va:#x})")),
                    }
                }
            }
        }
        Ok(())
    }

    fn check_leaf_counts(&self, frames: &Frames, backing: &Backing) -> Result<(), String> {
        let mem = backing.ram().mem();
        for (&t, &count) in &self.leaves {
            if frames.states().get(t) != FrameState::Resident {
                return Err(format!("leaf table {t} holds {count} entries but is not resident"));
            }
            let mut table = [0u8; 4096];
            vm_memory::Bytes::read_slice(mem, &mut table, t.gpa()).map_err(|e| e.to_string())?;
            let occupied = table
                .chunks_exact(8)
                .filter(|e| Pte(u64::from_le_bytes((*e).try_into().expect("8 bytes"))).is_occupied())
                .count();
            let occupied = u32::try_from(occupied).expect("at most 512");
            if occupied != count {
                return Err(format!("leaf table {t}: count {count}, {occupied} occupied entries"));
            }
        }
        Ok(())
    }

    fn region_containing(&self, va: u64) -> Option<u64> {
        self.regions.range(..=va).next_back().filter(|(s, r)| va < *s + r.len).map(|(s, _)| *s)
    }
}
