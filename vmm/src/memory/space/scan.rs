//! Walking the guest's leaves for reclaim, the way Linux's reclaim walks page tables (MGLRU's
//! `walk_mm`): which pages the guest has touched since the last pass, read from the accessed
//! bits of the leaf entries the VMM built.
//!
//! Only the heap and slab zones are walked: the VMM's own pages (page tables, the system area,
//! per-vCPU areas and stacks, BootInfo, the shared page, the image) are never reclaim
//! candidates. The walk reads the tables in guest memory without changing them, except for
//! the accessed bits it is asked to clear (atomically: a dirty bit set meanwhile stays).

use protocol::layout::{HEAP_VA_START, SLAB_VA_END};

use crate::memory::addr::{Gfn, Gva, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::memory::backing::ram::GuestMemoryMmap;
use crate::memory::frames::page_state::{FrameState, PageStates};

use super::AddressSpace;
use super::pagetable::{PageSize, PteFlags, entry_slot, read_entry, test_and_clear_accessed};

/// Where the walk starts and ends: the heaps and the slab zone, which are contiguous.
const SCAN_START: u64 = HEAP_VA_START;
const SCAN_END: u64 = SLAB_VA_END;
const _: () = assert!(protocol::layout::HUGE_HEAP_VA_START > HEAP_VA_START);

/// A present leaf the walk found.
#[derive(Clone, Copy, Debug)]
pub struct Leaf {
    pub va: Gva,
    /// Guest-physical address of the entry.
    pub slot: u64,
    /// The first frame it maps.
    pub gfn: Gfn,
    pub size: PageSize,
    /// Whether its accessed bit was set (and, when the walk clears them, now is not).
    pub accessed: bool,
}

/// Where a walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanEnd {
    /// Where the next walk continues.
    pub next: Gva,
    /// Whether the walk passed the end of the zones (and went on from their start).
    pub wrapped: bool,
}

impl AddressSpace {
    /// Walks present leaves in address order from `from` (wrapping once from the end of the
    /// zones to their start, and stopping where it began), clearing each leaf's accessed bit
    /// when `clear` is set, and calls `f` on each until `f` returns `false` or `max_leaves`
    /// leaves were seen.
    pub fn scan_leaves(
        &self,
        mem: &GuestMemoryMmap,
        states: &PageStates,
        from: Gva,
        max_leaves: usize,
        clear: bool,
        mut f: impl FnMut(&Leaf) -> bool,
    ) -> ScanEnd {
        let start = if (SCAN_START..SCAN_END).contains(&from.0) { from.0 } else { SCAN_START };
        let mut va = start;
        let mut wrapped = false;
        let mut seen = 0;
        loop {
            if va >= SCAN_END {
                va = SCAN_START;
                wrapped = true;
            }
            if (wrapped && va >= start) || seen >= max_leaves {
                return ScanEnd { next: Gva(va), wrapped };
            }
            match self.next_leaf_table(mem, states, va) {
                Step::Skip(to) => va = to.max(va + PAGE_SIZE),
                Step::Huge(slot, entry) => {
                    seen += 1;
                    let leaf = self.leaf(mem, Gva(va & !(HUGE_PAGE_SIZE - 1)), slot, entry, PageSize::Size2M, clear);
                    va = (va & !(HUGE_PAGE_SIZE - 1)) + HUGE_PAGE_SIZE;
                    if !f(&leaf) {
                        return ScanEnd { next: Gva(va), wrapped };
                    }
                }
                Step::Table(table) => {
                    // Every entry of this leaf table from va on.
                    let table_end = (va & !(HUGE_PAGE_SIZE - 1)) + HUGE_PAGE_SIZE;
                    while va < table_end {
                        if (wrapped && va >= start) || seen >= max_leaves {
                            return ScanEnd { next: Gva(va), wrapped };
                        }
                        let slot = entry_slot(table, Gva(va), 1);
                        let here = va;
                        va += PAGE_SIZE;
                        let Ok(e) = read_entry(mem, slot) else { continue };
                        if !e.is_present() {
                            continue;
                        }
                        seen += 1;
                        let leaf = self.leaf(mem, Gva(here), slot, e.0, PageSize::Size4K, clear);
                        if !f(&leaf) {
                            return ScanEnd { next: Gva(va), wrapped };
                        }
                    }
                }
            }
        }
    }

    fn leaf(&self, mem: &GuestMemoryMmap, va: Gva, slot: u64, entry: u64, size: PageSize, clear: bool) -> Leaf {
        let e = super::pagetable::Pte(entry);
        let accessed = if clear {
            test_and_clear_accessed(mem, slot).unwrap_or(false)
        } else {
            e.flags().contains(PteFlags::ACCESSED)
        };
        Leaf { va, slot, gfn: e.gfn(), size, accessed }
    }

    /// From `va`, the walk's next step: the leaf table covering it, a 2 MiB leaf, or where the
    /// next mapped address could be. A leaf table whose
    /// frame is not resident (an emptied table, `Zero`) has no leaves and is not read: reading
    /// it would fault to the handler, and the swapper, which scans holding the manager's lock,
    /// must not depend on a handler.
    fn next_leaf_table(&self, mem: &GuestMemoryMmap, states: &PageStates, va: u64) -> Step {
        let mut table = self.pt.root();
        for level in (2..=4u8).rev() {
            let span = 1u64 << (12 + 9 * (u32::from(level) - 1));
            let slot = entry_slot(table, Gva(va), level);
            let Ok(e) = read_entry(mem, slot) else { return Step::Skip((va & !(span - 1)) + span) };
            if !e.is_present() {
                return Step::Skip((va & !(span - 1)) + span);
            }
            if level == 2 && e.flags().contains(PteFlags::HUGE) {
                return Step::Huge(slot, e.0);
            }
            table = e.gfn();
        }
        if states.get(table) != FrameState::Resident {
            return Step::Skip((va & !(HUGE_PAGE_SIZE - 1)) + HUGE_PAGE_SIZE);
        }
        Step::Table(table)
    }
}

enum Step {
    Skip(u64),
    Huge(u64, u64),
    Table(Gfn),
}
